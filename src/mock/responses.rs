//! `POST /v1/responses`: the Responses API and its event sequence.

use axum::response::Response;
use serde_json::{Value, json};

use super::*;

pub(super) fn responses(call: &Call) -> Result<Response, ApiError> {
    let stream = call.stream()?;
    let budget = call.reply_len(&["max_output_tokens"])?;
    let (visible, reasoning) = call.knobs.split_budget(budget);
    let instructions = match call.body.get("instructions") {
        Some(Value::String(text)) => MESSAGE_OVERHEAD + count_words(text),
        _ => 0,
    };
    let (input_tokens, last_user) = match call.body.get("input") {
        Some(Value::String(text)) => (MESSAGE_OVERHEAD + count_words(text), text.clone()),
        Some(Value::Array(items)) => {
            let tokens: u64 = items
                .iter()
                .map(|item| MESSAGE_OVERHEAD + count_words(&content_text(item.get("content"))))
                .sum();
            let last_user = items
                .iter()
                .rev()
                .find(|item| item.get("role").and_then(Value::as_str) == Some("user"))
                .map(|item| content_text(item.get("content")))
                .unwrap_or_default();
            (tokens, last_user)
        }
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(_) => {
            return Err(ApiError::invalid_value(
                "input",
                "a string or an array of items",
            ));
        }
    };
    let ending = Ending::of(call.knobs);
    let mut words = reply_words(&last_user, visible);
    if ending != Ending::Completed {
        words.truncate(FAIL_AFTER_WORDS);
    }
    let text = words.join(" ");
    let counts = Counts::new(
        instructions + input_tokens,
        0,
        (words.len(), reasoning),
        1,
        call.knobs,
    );
    let usage = if call.knobs.no_usage || ending == Ending::Failed {
        Value::Null
    } else {
        counts.responses()
    };
    if !stream && ending == Ending::Error {
        return Ok(json_response(&inband_error(), call.knobs));
    }
    let response_id = format!("resp_mock{}", call.id);
    let item_id = format!("msg_mock{}", call.id);
    let response = |status: &str, output: Value, usage: Value| {
        let mut response = json!({
            "id": response_id,
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": call.body.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": call.body.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "model": call.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "metadata": {},
            "usage": usage,
        });
        match status {
            "failed" => {
                response["error"] = json!({"code": "server_error", "message": "The model failed \
                    to generate a response. (mock knob -failed)"});
            }
            "incomplete" => {
                response["incomplete_details"] = json!({"reason": "content_filter"});
            }
            _ => {}
        }
        response
    };
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let message = |status: &str, content: Value| json!({"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content});
    // `-reasoning`: a reasoning item (its summary not asked for) comes before the message.
    let reasoning_item = (reasoning > 0)
        .then(|| json!({"id": format!("rs_mock{}", call.id), "type": "reasoning", "summary": []}));
    let message_index = usize::from(reasoning_item.is_some());
    let output = |message: Value| {
        let mut output: Vec<Value> = reasoning_item.iter().cloned().collect();
        output.push(message);
        Value::Array(output)
    };
    let (status, message_status) = match ending {
        Ending::Completed | Ending::Error => ("completed", "completed"),
        Ending::Incomplete => ("incomplete", "incomplete"),
        Ending::Failed => ("failed", "in_progress"),
    };
    let final_message = message(message_status, json!([part(&text)]));

    if !stream {
        let body = response(status, output(final_message), usage);
        return Ok(json_response(&body, call.knobs));
    }

    let in_progress = response("in_progress", json!([]), Value::Null);
    let at = |fields: Value| {
        let mut fields = fields;
        fields["item_id"] = json!(item_id);
        fields["output_index"] = json!(message_index);
        fields["content_index"] = json!(0);
        fields
    };
    let mut events = ResponseEvents::default();
    events.push("response.created", json!({"response": in_progress}));
    events.push("response.in_progress", json!({"response": in_progress}));
    if let Some(item) = &reasoning_item {
        events.push(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        );
        events.push(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        );
    }
    let added = json!({"output_index": message_index, "item": message("in_progress", json!([]))});
    events.push("response.output_item.added", added);
    events.push("response.content_part.added", at(json!({"part": part("")})));
    for delta in word_deltas(&words) {
        events.push(
            "response.output_text.delta",
            at(json!({"delta": delta, "logprobs": []})),
        );
    }
    match ending {
        Ending::Error => {
            let error = inband_error();
            let fields = json!({"code": error["error"]["code"], "message": error["error"]["message"], "param": null});
            events.push("error", fields);
        }
        Ending::Failed => {
            let failed = response(status, output(final_message), usage);
            events.push("response.failed", json!({"response": failed}));
        }
        Ending::Completed | Ending::Incomplete => {
            events.push(
                "response.output_text.done",
                at(json!({"text": text, "logprobs": []})),
            );
            events.push(
                "response.content_part.done",
                at(json!({"part": part(&text)})),
            );
            let item_done = json!({"output_index": message_index, "item": final_message});
            events.push("response.output_item.done", item_done);
            let terminal = response(status, output(final_message), usage);
            events.push(&format!("response.{status}"), json!({"response": terminal}));
        }
    }
    Ok(sse_response(events.events, call.knobs))
}

/// How a Responses answer ends (the in-band failure knobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ending {
    Completed,
    /// `-inbanderror`: an `error` event, or a `200` error body.
    Error,
    /// `-failed`: `status: "failed"`, no usage.
    Failed,
    /// `-incomplete`: `status: "incomplete"` with usage.
    Incomplete,
}

impl Ending {
    pub(super) fn of(knobs: Knobs) -> Self {
        if knobs.inband_error {
            Self::Error
        } else if knobs.failed {
            Self::Failed
        } else if knobs.incomplete {
            Self::Incomplete
        } else {
            Self::Completed
        }
    }
}

/// Numbers Responses stream events as OpenAI does (`sequence_number` from 0).
#[derive(Default)]
pub(super) struct ResponseEvents {
    pub(super) events: Vec<Event>,
}

impl ResponseEvents {
    pub(super) fn push(&mut self, name: &str, mut fields: Value) {
        fields["type"] = json!(name);
        fields["sequence_number"] = json!(self.events.len());
        self.events.push(Event {
            name: Some(name.to_owned()),
            data: fields.to_string(),
        });
    }
}
