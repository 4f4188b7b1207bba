//! The only changes the gateway makes to a request body on its way upstream: the output cap
//! the hold paid for, and asking a stream to report its usage.

use serde_json::{Map, Value};

use super::{Endpoint, bounds};

/// Makes every output-cap field the request set equal `cap` (per choice), or sets the
/// endpoint's preferred field when it set none; returns whether the body changed.
pub fn enforce_output_cap(endpoint: Endpoint, object: &mut Map<String, Value>, cap: u64) -> bool {
    let fields = bounds::cap_fields(endpoint);
    let mut changed = false;
    let mut present = false;
    for &name in fields {
        if let Some(value) = object.get_mut(name)
            && !value.is_null()
        {
            present = true;
            if value.as_u64() != Some(cap) {
                *value = Value::from(cap);
                changed = true;
            }
        }
    }
    if !present && let Some(&preferred) = fields.first() {
        object.insert(preferred.to_owned(), Value::from(cap));
        changed = true;
    }
    changed
}

/// Asks the upstream to report usage on a stream; returns true if the client had not asked
/// (so the usage-only chunk must be removed from what the client sees).
pub fn inject_include_usage(object: &mut Map<String, Value>) -> bool {
    let options = object
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !options.is_object() {
        *options = Value::Object(Map::new());
    }
    let Some(options) = options.as_object_mut() else {
        return false;
    };
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return false;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    true
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn include_usage_is_injected_only_when_missing() {
        let mut asked = json!({"stream_options": {"include_usage": true}});
        assert!(!inject_include_usage(
            asked.as_object_mut().expect("object")
        ));
        let mut silent = json!({"model": "m"});
        assert!(inject_include_usage(
            silent.as_object_mut().expect("object")
        ));
        assert_eq!(silent["stream_options"]["include_usage"], json!(true));
        let mut refused = json!({"stream_options": {"include_usage": false, "x": 1}});
        assert!(inject_include_usage(
            refused.as_object_mut().expect("object")
        ));
        assert_eq!(
            refused["stream_options"],
            json!({"include_usage": true, "x": 1})
        );
    }

    #[test]
    fn the_cap_the_hold_paid_for_replaces_or_joins_the_requests_own() {
        let mut none = json!({"model": "m"});
        assert!(enforce_output_cap(
            Endpoint::ChatCompletions,
            none.as_object_mut().expect("object"),
            256
        ));
        assert_eq!(none["max_completion_tokens"], 256);
        let mut same = json!({"max_tokens": 7});
        assert!(!enforce_output_cap(
            Endpoint::ChatCompletions,
            same.as_object_mut().expect("object"),
            7
        ));
        let mut both = json!({"max_tokens": 10, "max_completion_tokens": 9});
        assert!(enforce_output_cap(
            Endpoint::ChatCompletions,
            both.as_object_mut().expect("object"),
            3
        ));
        assert_eq!(both, json!({"max_tokens": 3, "max_completion_tokens": 3}));
        let mut responses = json!({"input": "hi"});
        enforce_output_cap(
            Endpoint::Responses,
            responses.as_object_mut().expect("object"),
            5,
        );
        assert_eq!(responses["max_output_tokens"], 5);
    }
}
