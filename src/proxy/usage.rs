//! What each OpenAI endpoint reports as usage, and what text it generated.
//!
//! Chat and legacy completions report `prompt_tokens`/`completion_tokens`, the Responses API
//! `input_tokens`/`output_tokens`; both shapes are read by one lenient [`RawUsage`] that the SSE
//! observer shares, so a stream and a plain response are metered by the same rules.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::Endpoint;
use crate::domain::TokenUsage;

/// Reads the `usage` object of a non-streaming response; `None` when it is missing, null or
/// carries none of the endpoint's token fields.
pub fn usage_from_json(endpoint: Endpoint, body: &Value) -> Option<TokenUsage> {
    let usage = body.get("usage")?;
    if usage.is_null() {
        return None;
    }
    RawUsage::deserialize(usage).ok()?.into_usage(endpoint)
}

/// The generated text of a non-streaming response, for counting completion tokens when the
/// upstream reports no usage. Embeddings generate no text.
pub fn output_text_from_json(endpoint: Endpoint, body: &Value) -> String {
    let mut text = String::new();
    match endpoint {
        Endpoint::ChatCompletions => {
            for choice in array_at(body, "choices") {
                let Some(message) = choice.get("message") else {
                    continue;
                };
                push_str_field(&mut text, message, "content");
                push_str_field(&mut text, message, "refusal");
                for call in array_at(message, "tool_calls") {
                    if let Some(function) = call.get("function") {
                        push_str_field(&mut text, function, "arguments");
                    }
                }
                // The pre-tools `function_call` shape is still returned by some upstreams.
                if let Some(function) = message.get("function_call") {
                    push_str_field(&mut text, function, "arguments");
                }
            }
        }
        Endpoint::Completions => {
            for choice in array_at(body, "choices") {
                push_str_field(&mut text, choice, "text");
            }
        }
        Endpoint::Responses => {
            for item in array_at(body, "output") {
                match item.get("type").and_then(Value::as_str) {
                    Some("function_call") => push_str_field(&mut text, item, "arguments"),
                    _ => {
                        for part in array_at(item, "content") {
                            match part.get("type").and_then(Value::as_str) {
                                Some("output_text") => push_str_field(&mut text, part, "text"),
                                Some("refusal") => push_str_field(&mut text, part, "refusal"),
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
        Endpoint::Embeddings => {}
    }
    text
}

/// Whether a 2xx JSON answer says the request failed: a non-null `error` (some upstreams answer
/// `200` with `{"error": {…}}`; a failed Responses API object has `status: "failed"` and an
/// `error`). A successful Responses object carries `"error": null`.
pub fn reports_error(body: &Value) -> bool {
    body.get("error").is_some_and(|error| !error.is_null())
}

fn array_at<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn push_str_field(text: &mut String, value: &Value, key: &str) {
    if let Some(s) = value.get(key).and_then(Value::as_str) {
        text.push_str(s);
    }
}

/// A `usage` object in either naming. Every field is optional and lenient (a wrong type reads as
/// absent) because OpenAI-compatible upstreams differ in the details, and a malformed usage must
/// not make the metering of the rest of a chunk fail.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawUsage {
    #[serde(default, deserialize_with = "lenient_u64")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    output_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<RawDetails>,
    #[serde(default)]
    input_tokens_details: Option<RawDetails>,
}

#[derive(Debug, Default, Deserialize)]
struct RawDetails {
    #[serde(default, deserialize_with = "lenient_u64")]
    cached_tokens: Option<u64>,
}

impl RawUsage {
    /// Maps the endpoint's own field names, falling back to the other naming because some
    /// compatible upstreams answer the Responses API with chat-style usage (and vice versa).
    pub(crate) fn into_usage(self, endpoint: Endpoint) -> Option<TokenUsage> {
        let chat = (
            self.prompt_tokens,
            self.completion_tokens,
            self.prompt_tokens_details,
        );
        let responses = (
            self.input_tokens,
            self.output_tokens,
            self.input_tokens_details,
        );
        let (native, other) = match endpoint {
            Endpoint::Responses => (responses, chat),
            _ => (chat, responses),
        };
        let (prompt, completion, details) = if native.0.is_some() || native.1.is_some() {
            native
        } else if other.0.is_some() || other.1.is_some() {
            other
        } else {
            return None;
        };
        let prompt_tokens = prompt.unwrap_or(0);
        let completion_tokens = match endpoint {
            Endpoint::Embeddings => 0,
            _ => completion.unwrap_or(0),
        };
        let cached_tokens = details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .min(prompt_tokens);
        Some(TokenUsage {
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        })
    }
}

/// A token count: a non-negative integer (or a string of digits); anything else reads as absent.
fn lenient_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a token count")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(u64::try_from(v).ok())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.trim().parse().ok())
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    deserializer.deserialize_any(V)
}

/// A text field that borrows from the input when it has no escapes; a non-string reads as absent
/// (some upstreams send `content` as an array or a number where OpenAI sends a string).
pub(crate) fn lenient_str<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Cow<'de, str>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    deserializer.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_usage_with_cached_tokens() {
        let body = json!({
            "choices": [{"message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                      "prompt_tokens_details": {"cached_tokens": 8}}
        });
        assert_eq!(
            usage_from_json(Endpoint::ChatCompletions, &body),
            Some(TokenUsage {
                prompt_tokens: 12,
                completion_tokens: 5,
                cached_tokens: 8
            })
        );
    }

    #[test]
    fn embeddings_usage_has_no_completion_tokens() {
        let body = json!({"data": [], "usage": {"prompt_tokens": 7, "total_tokens": 7}});
        assert_eq!(
            usage_from_json(Endpoint::Embeddings, &body),
            Some(TokenUsage {
                prompt_tokens: 7,
                completion_tokens: 0,
                cached_tokens: 0
            })
        );
    }

    #[test]
    fn responses_usage_uses_input_and_output_tokens() {
        let body = json!({
            "object": "response",
            "usage": {"input_tokens": 30, "output_tokens": 9, "total_tokens": 39,
                      "input_tokens_details": {"cached_tokens": 4},
                      "output_tokens_details": {"reasoning_tokens": 2}}
        });
        assert_eq!(
            usage_from_json(Endpoint::Responses, &body),
            Some(TokenUsage {
                prompt_tokens: 30,
                completion_tokens: 9,
                cached_tokens: 4
            })
        );
    }

    #[test]
    fn missing_null_or_empty_usage_is_none() {
        assert_eq!(
            usage_from_json(Endpoint::ChatCompletions, &json!({"choices": []})),
            None
        );
        assert_eq!(
            usage_from_json(Endpoint::ChatCompletions, &json!({"usage": null})),
            None
        );
        assert_eq!(
            usage_from_json(Endpoint::Completions, &json!({"usage": {}})),
            None
        );
        assert_eq!(
            usage_from_json(Endpoint::Responses, &json!({"usage": "lots"})),
            None
        );
    }

    #[test]
    fn odd_field_types_do_not_hide_the_rest_of_the_usage() {
        let body = json!({"usage": {"prompt_tokens": 10, "completion_tokens": -1,
                                    "prompt_tokens_details": null}});
        assert_eq!(
            usage_from_json(Endpoint::ChatCompletions, &body),
            Some(TokenUsage {
                prompt_tokens: 10,
                completion_tokens: 0,
                cached_tokens: 0
            })
        );
    }

    #[test]
    fn chat_output_text_includes_content_and_tool_arguments() {
        let body = json!({"choices": [
            {"message": {"role": "assistant", "content": "Hello"}},
            {"message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}
            ]}}
        ]});
        assert_eq!(
            output_text_from_json(Endpoint::ChatCompletions, &body),
            "Hello{\"city\":\"Oslo\"}"
        );
    }

    #[test]
    fn completions_output_text_joins_choices() {
        let body = json!({"choices": [{"text": "one "}, {"text": "two"}]});
        assert_eq!(
            output_text_from_json(Endpoint::Completions, &body),
            "one two"
        );
    }

    #[test]
    fn responses_output_text_reads_output_text_parts_only() {
        let body = json!({"output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "Hi ", "annotations": []},
                {"type": "output_text", "text": "there"}
            ]},
            {"type": "function_call", "name": "f", "arguments": "{}"}
        ]});
        assert_eq!(
            output_text_from_json(Endpoint::Responses, &body),
            "Hi there{}"
        );
        assert_eq!(output_text_from_json(Endpoint::Embeddings, &body), "");
    }

    #[test]
    fn an_error_object_in_a_2xx_body_is_a_failure() {
        let error = json!({"message": "boom", "type": "server_error"});
        assert!(reports_error(&json!({"error": error})));
        assert!(reports_error(
            &json!({"object": "response", "status": "failed", "error": {"code": "server_error"}})
        ));
        assert!(!reports_error(
            &json!({"object": "response", "status": "completed", "error": null})
        ));
        assert!(!reports_error(&json!({"choices": []})));
    }

    #[test]
    fn endpoint_paths() {
        assert_eq!(Endpoint::ChatCompletions.path(), "chat/completions");
        assert_eq!(Endpoint::Completions.path(), "completions");
        assert_eq!(Endpoint::Embeddings.path(), "embeddings");
        assert_eq!(Endpoint::Responses.path(), "responses");
    }
}
