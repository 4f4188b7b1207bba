//! A request's charge: its hold, settled once its output is known.

use super::Endpoint;
use crate::domain::TokenUsage;
use crate::ledger::UsageSource;
use crate::metering::settler::Durable;
use crate::metering::{Finished, Hold, Meter};

/// A request's charge in progress: its hold and what is known of the request, settled once
/// its output is known.
pub struct Charge {
    pub meter: Meter,
    pub hold: Hold,
    pub api_key_id: Option<String>,
    pub endpoint: Endpoint,
    pub model: String,
    pub upstream: String,
    /// The tokenizer's count of the prompt, used when the upstream reports no usage.
    pub prompt_tokens: u64,
    pub stream: bool,
}

impl Charge {
    /// What to charge: reported usage, or counted usage when there is output (or the client
    /// hung up); `None` when nothing is owed (an upstream that failed before producing output).
    pub(super) fn finished(
        &self,
        reported: Option<TokenUsage>,
        output_text: &str,
        saw_output: bool,
        status: &'static str,
    ) -> Option<Finished> {
        let (usage, source) = match reported {
            Some(usage) => (usage, UsageSource::Reported),
            None if saw_output || status == "client_disconnected" => {
                let usage = TokenUsage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: super::tokens::count_text(&self.model, output_text),
                    cached_tokens: 0,
                };
                (usage, UsageSource::Counted)
            }
            None => return None,
        };
        Some(Finished {
            api_key_id: self.api_key_id.clone(),
            endpoint: self.endpoint.path(),
            model: self.model.clone(),
            upstream: self.upstream.clone(),
            usage,
            source,
            stream: self.stream,
            status,
        })
    }

    /// Queues the settlement (or, when nothing is owed, releases the hold by dropping it).
    /// The returned [`Durable`] resolves once a crash can no longer lose the settlement; a
    /// context that cannot wait (a `Drop`) ignores it.
    pub fn settle(
        self,
        reported: Option<TokenUsage>,
        output_text: &str,
        saw_output: bool,
        status: &'static str,
    ) -> Option<Durable> {
        let finished = self.finished(reported, output_text, saw_output, status)?;
        Some(self.meter.finish(self.hold, finished))
    }
}
