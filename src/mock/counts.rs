//! How the mock counts tokens and words, and the replies it makes up.

use serde_json::{Value, json};

use super::*;

/// Token counts the mock reports for one answer.
pub(super) struct Counts {
    /// Audio tokens included.
    pub(super) prompt: u64,
    pub(super) audio: u64,
    /// Reasoning tokens included.
    pub(super) completion: u64,
    pub(super) reasoning: u64,
    pub(super) cached: u64,
}

impl Counts {
    /// `visible` words and `reasoning` tokens in each of `generated` choices; `audio` of the
    /// `prompt` tokens were audio.
    pub(super) fn new(
        prompt: u64,
        audio: u64,
        (visible, reasoning): (usize, usize),
        generated: usize,
        knobs: Knobs,
    ) -> Self {
        let extra = if knobs.overreport { 1000 } else { 0 };
        Self {
            prompt,
            audio,
            completion: ((visible + reasoning) * generated) as u64 + extra,
            reasoning: (reasoning * generated) as u64,
            cached: if knobs.cached { prompt / 2 } else { 0 },
        }
    }

    pub(super) fn chat(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": self.audio},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        })
    }

    pub(super) fn completions(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        })
    }

    pub(super) fn responses(&self) -> Value {
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt + self.completion,
        })
    }
}

/// The body of an in-band error (`-inbanderror`), in OpenAI's error shape.
pub(super) fn inband_error() -> Value {
    json!({"error": {
        "message": "The server had an error while processing your request. Sorry about that! \
                    (mock knob -inbanderror)",
        "type": "server_error",
        "param": null,
        "code": "server_error",
    }})
}

pub(super) fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The text of a message `content`: a string, or the `text` of each content part.
pub(super) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| {
                part.as_str()
                    .or_else(|| part.get("text").and_then(Value::as_str))
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

pub(super) fn reply_words(prompt: &str, len: usize) -> Vec<String> {
    let base: Vec<&str> = "Mock reply to:"
        .split_whitespace()
        .chain(prompt.split_whitespace())
        .collect();
    base.iter()
        .cycle()
        .take(len)
        .map(|word| (*word).to_owned())
        .collect()
}

/// One streamed delta per word; concatenated they equal the non-streamed text.
pub(super) fn word_deltas(words: &[String]) -> impl Iterator<Item = String> + '_ {
    words.iter().enumerate().map(|(i, word)| {
        if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        }
    })
}

/// The `input_audio` parts of a message `content`.
pub(super) fn audio_parts(content: Option<&Value>) -> u64 {
    let parts = content
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    parts
        .iter()
        .filter(|part| part.get("type").and_then(Value::as_str) == Some("input_audio"))
        .count() as u64
}
