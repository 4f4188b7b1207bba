//! Token counts of one request.

use serde::{Deserialize, Serialize};

/// Token counts of one request, as reported by the upstream or counted by the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the upstream's prompt cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
}

impl TokenUsage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requests_tokens_add_up_without_overflowing() {
        let usage = TokenUsage {
            prompt_tokens: 1_000,
            completion_tokens: 24,
            cached_tokens: 600,
        };
        assert_eq!(usage.total(), 1_024);
        let huge = TokenUsage {
            prompt_tokens: u64::MAX,
            completion_tokens: 1,
            cached_tokens: 0,
        };
        assert_eq!(huge.total(), u64::MAX);
    }
}
