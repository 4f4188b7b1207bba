//! What bounds a request's cost, read from its body before anything is reserved: how many
//! choices the upstream generates, the output cap per choice, whether some input cannot be
//! sized, and identifiers small enough for the ledger's columns.
//!
//! The hold must be an upper bound of the charge (docs/architecture.md I1), so every quantity here is read
//! strictly: a malformed `n` or `max_tokens` is a 400, never a default.

use serde_json::Value;

use super::Endpoint;

/// A request field this gateway cannot accept, with why (answered as 400 `invalid_value`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InvalidField {
    pub field: &'static str,
    pub message: String,
}

/// The most choices one request may ask for (`n`, `best_of`); OpenAI's own limit.
pub const MAX_CHOICES: u64 = 128;
/// The longest model name accepted: it is stored with every usage record and ledger entry.
pub const MAX_MODEL_BYTES: usize = 256;

/// How many choices the upstream generates (and bills): `n`, or `max(n, best_of)` on the
/// completions endpoint, where `best_of` candidates are generated and `n` returned.
pub fn generated_choices(endpoint: Endpoint, request: &Value) -> Result<u64, InvalidField> {
    let n = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => count(request, "n")?,
        Endpoint::Responses | Endpoint::Embeddings => 1,
    };
    let best_of = match endpoint {
        Endpoint::Completions => count(request, "best_of")?,
        _ => 1,
    };
    Ok(n.max(best_of))
}

fn count(request: &Value, name: &'static str) -> Result<u64, InvalidField> {
    match request.get(name) {
        None | Some(Value::Null) => Ok(1),
        Some(value) => value
            .as_u64()
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| InvalidField {
                field: name,
                message: format!("`{name}` must be an integer from 1 to {MAX_CHOICES}"),
            }),
    }
}

/// The output-cap fields each endpoint takes, the preferred one first.
pub fn cap_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::ChatCompletions => &["max_completion_tokens", "max_tokens"],
        Endpoint::Completions => &["max_tokens"],
        Endpoint::Responses => &["max_output_tokens"],
        Endpoint::Embeddings => &[],
    }
}

/// The output cap per choice the request sets, if any. With both chat fields set, the smaller
/// one binds.
pub fn requested_cap(endpoint: Endpoint, request: &Value) -> Result<Option<u64>, InvalidField> {
    let mut cap: Option<u64> = None;
    for &name in cap_fields(endpoint) {
        match request.get(name) {
            None | Some(Value::Null) => {}
            Some(value) => {
                let tokens = value.as_u64().ok_or_else(|| InvalidField {
                    field: name,
                    message: format!("`{name}` must be a non-negative integer"),
                })?;
                cap = Some(cap.map_or(tokens, |c| c.min(tokens)));
            }
        }
    }
    Ok(cap)
}

/// Why the gateway cannot size this request's input from its body, if it cannot: media and
/// file parts, and inputs the upstream fetches itself (earlier responses, conversations, stored
/// prompts, hosted search tools).
pub fn unsized_input(endpoint: Endpoint, request: &Value) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions => {
            if request
                .get("web_search_options")
                .is_some_and(|v| !v.is_null())
            {
                return Some("web_search_options");
            }
            let messages = request.get("messages").and_then(Value::as_array)?;
            messages
                .iter()
                .find_map(|m| media_part(m.get("content"), "messages"))
        }
        Endpoint::Responses => {
            for field in ["previous_response_id", "conversation", "prompt"] {
                if request.get(field).is_some_and(|v| !v.is_null()) {
                    return Some(field);
                }
            }
            let hosted_tool = request
                .get("tools")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|tool| {
                    tool.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(|kind| kind != "function" && kind != "custom")
                });
            if hosted_tool {
                return Some("tools");
            }
            let items = request.get("input").and_then(Value::as_array)?;
            items
                .iter()
                .find_map(|item| match item.get("type").and_then(Value::as_str) {
                    Some("item_reference") => Some("input"),
                    _ => media_part(item.get("content"), "input"),
                })
        }
        Endpoint::Completions | Endpoint::Embeddings => None,
    }
}

/// A content array's first part that is not text (an image, audio, a file).
fn media_part(content: Option<&Value>, field: &'static str) -> Option<&'static str> {
    let parts = content?.as_array()?;
    parts.iter().find_map(|part| {
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "text" | "input_text" | "output_text" | "refusal" => None,
            _ => Some(field),
        }
    })
}

/// Refuses identifiers the ledger could not store.
pub fn check_model_name(model: &str) -> Result<(), InvalidField> {
    if model.len() > MAX_MODEL_BYTES {
        return Err(InvalidField {
            field: "model",
            message: format!(
                "`model` is {} bytes long; the most this gateway accepts is {MAX_MODEL_BYTES}",
                model.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn choices_are_n_or_best_of_whichever_is_larger() {
        let chat = Endpoint::ChatCompletions;
        assert_eq!(generated_choices(chat, &json!({})).ok(), Some(1));
        assert_eq!(generated_choices(chat, &json!({"n": 8})).ok(), Some(8));
        // Chat has no best_of: it is not billed there.
        assert_eq!(
            generated_choices(chat, &json!({"best_of": 8})).ok(),
            Some(1)
        );
        let completions = Endpoint::Completions;
        assert_eq!(
            generated_choices(completions, &json!({"n": 2, "best_of": 5})).ok(),
            Some(5)
        );
        assert_eq!(
            generated_choices(Endpoint::Responses, &json!({"n": 9})).ok(),
            Some(1)
        );
    }

    #[test]
    fn a_malformed_choice_count_is_refused() {
        for bad in [json!(0), json!(-1), json!(1.5), json!("2"), json!(129)] {
            let error = generated_choices(Endpoint::ChatCompletions, &json!({ "n": bad }));
            assert!(
                matches!(error, Err(InvalidField { field: "n", .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_smaller_of_two_chat_caps_binds() {
        let chat = Endpoint::ChatCompletions;
        let both = json!({"max_tokens": 10, "max_completion_tokens": 7});
        assert_eq!(requested_cap(chat, &both).ok(), Some(Some(7)));
        assert_eq!(requested_cap(chat, &json!({})).ok(), Some(None));
        assert!(requested_cap(chat, &json!({"max_tokens": "5"})).is_err());
        assert!(requested_cap(chat, &json!({"max_tokens": -5})).is_err());
        assert_eq!(
            requested_cap(Endpoint::Embeddings, &json!({"max_tokens": 5})).ok(),
            Some(None)
        );
    }

    #[test]
    fn media_and_fetched_inputs_cannot_be_sized() {
        let chat = Endpoint::ChatCompletions;
        let text =
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        assert_eq!(unsized_input(chat, &text), None);
        let image = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        ]}]});
        assert_eq!(unsized_input(chat, &image), Some("messages"));
        let responses = Endpoint::Responses;
        assert_eq!(
            unsized_input(
                responses,
                &json!({"input": "hi", "previous_response_id": "resp_1"})
            ),
            Some("previous_response_id")
        );
        assert_eq!(
            unsized_input(
                responses,
                &json!({"input": "hi", "tools": [{"type": "web_search"}]})
            ),
            Some("tools")
        );
        assert_eq!(
            unsized_input(
                responses,
                &json!({"input": "hi", "tools": [{"type": "function", "name": "f"}]})
            ),
            None
        );
        let file = json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]});
        assert_eq!(unsized_input(responses, &file), Some("input"));
    }
}
