//! The fast path of the metering tap: tells, without parsing a chat chunk's JSON, that it is one
//! of the two shapes nearly every chunk of a chat stream has, or that it must be parsed.
//!
//! - a plain content delta, `…"choices":[{"index":0,"delta":{"content":"…"},…}],…`: only its
//!   text matters;
//! - a chunk with nothing metering reads (a finish-reason chunk with an empty delta).
//!
//! Anything that may carry something else metering reads (usage, an error, a refusal, tool or
//! function calls, completion text, several choices) is parsed in full, so the fast path never
//! changes what is metered, only how quickly (the tests check both give the same summary).
//!
//! Why searching the text for quoted key names is sound: inside a JSON string every `"` is
//! escaped as `\"`, so the bytes `"content"` (with both quotes bare) occur only as a key, or as a
//! whole string value that happens to be `content`. A payload where a name we look for occurs
//! anywhere but where the shape expects it goes to the full parse.

use std::borrow::Cow;
use std::sync::LazyLock;

use memchr::memmem::Finder;

/// What a chat chunk needs from the observer.
#[derive(Debug, PartialEq, Eq)]
pub enum Skim<'a> {
    /// Nothing metering reads.
    Nothing,
    /// A content delta of the chunk's only choice, and nothing else metering reads.
    Content(Cow<'a, str>),
    /// Parse it in full.
    Parse,
}

/// The content delta of a single choice, written the way providers write it (no spaces).
const CONTENT_DELTA: &str = r#""delta":{"content":""#;

struct Finders {
    content_delta: Finder<'static>,
    content: Finder<'static>,
    usage: Finder<'static>,
    /// Keys whose presence needs the full parse (besides `content` and `usage`).
    others: [Finder<'static>; 6],
}

static FINDERS: LazyLock<Finders> = LazyLock::new(|| Finders {
    content_delta: Finder::new(CONTENT_DELTA),
    content: Finder::new(r#""content""#),
    usage: Finder::new(r#""usage""#),
    others: [
        Finder::new(r#""error""#),
        Finder::new(r#""refusal""#),
        Finder::new(r#""text""#),
        Finder::new(r#""tool_calls""#),
        Finder::new(r#""function_call""#),
        Finder::new(r#""arguments""#),
    ],
});

/// Classifies a chat or completions chunk (a JSON object, valid UTF-8); see the module docs.
pub fn chat_chunk(json: &str) -> Skim<'_> {
    let bytes = json.as_bytes();
    let finders = &*FINDERS;
    if !usage_absent_or_null(bytes, &finders.usage)
        || finders.others.iter().any(|f| f.find(bytes).is_some())
    {
        return Skim::Parse;
    }
    let Some(at) = finders.content_delta.find(bytes) else {
        return if finders.content.find(bytes).is_none() {
            Skim::Nothing
        } else {
            Skim::Parse
        };
    };
    // The only `"content"` of the payload must be this one (another choice's text, say, would
    // be missed). Another choice without any of the names above has nothing metering reads.
    let key = at + r#""delta":{"#.len();
    let after_key = key + r#""content""#.len();
    if finders.content.find(&bytes[..key]).is_some()
        || finders.content.find(&bytes[after_key..]).is_some()
    {
        return Skim::Parse;
    }
    let open = at + CONTENT_DELTA.len() - 1;
    match string_literal(json, open) {
        Some(text) => Skim::Content(text),
        None => Skim::Parse,
    }
}

/// Whether `"usage"` does not occur, or occurs once as `"usage": null`.
fn usage_absent_or_null(bytes: &[u8], usage: &Finder<'_>) -> bool {
    let Some(at) = usage.find(bytes) else {
        return true;
    };
    let rest = &bytes[at + usage.needle().len()..];
    let rest = rest.trim_ascii_start();
    let Some(rest) = rest.strip_prefix(b":") else {
        return false;
    };
    let rest = rest.trim_ascii_start();
    rest.starts_with(b"null") && usage.find(rest).is_none()
}

/// The JSON string literal whose opening quote is at `open`, decoded; `None` if it does not end
/// or does not decode.
fn string_literal(json: &str, open: usize) -> Option<Cow<'_, str>> {
    let bytes = json.as_bytes();
    let mut pos = open + 1;
    let mut escaped = false;
    loop {
        pos += memchr::memchr2(b'"', b'\\', bytes.get(pos..)?)?;
        if bytes[pos] == b'"' {
            break;
        }
        escaped = true;
        pos += 2;
    }
    if escaped {
        serde_json::from_str::<Cow<'_, str>>(&json[open..=pos])
            .ok()
            .map(|text| Cow::Owned(text.into_owned()))
    } else {
        // Both ends are ASCII quotes, so these are character boundaries.
        Some(Cow::Borrowed(&json[open + 1..pos]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_content_delta_is_read_without_parsing() {
        let chunk = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hé \"q\" 東京\n"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
        assert_eq!(
            chat_chunk(chunk),
            Skim::Content(Cow::Owned("Hé \"q\" 東京\n".into()))
        );
        let plain = r#"{"id":"c1","choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}"#;
        assert_eq!(chat_chunk(plain), Skim::Content(Cow::Borrowed(" the")));
    }

    #[test]
    fn a_chunk_without_anything_metered_needs_nothing() {
        let finish = r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage": null}"#;
        assert_eq!(chat_chunk(finish), Skim::Nothing);
    }

    #[test]
    fn every_other_shape_is_parsed() {
        for chunk in [
            // usage
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":1}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":null,"usage":{}}"#,
            // an error, a refusal, tool and function calls, completions text
            r#"{"error":{"message":"overloaded"}}"#,
            r#"{"choices":[{"index":0,"delta":{"refusal":"no"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"function_call":{"arguments":"{}"}}}]}"#,
            r#"{"choices":[{"index":0,"text":"hi"}]}"#,
            // several choices, the role chunk, spaces, a null content, an unended string
            r#"{"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":0,"delta": {"content": "a"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"abc"#,
            // the word as a value
            r#"{"object":"content","choices":[{"index":0,"delta":{"content":"a"}}]}"#,
        ] {
            assert_eq!(chat_chunk(chunk), Skim::Parse, "{chunk}");
        }
    }
}
