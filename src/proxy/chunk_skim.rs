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
//! How: one pass over the payload's string literals (a `"` outside a string opens one; inside,
//! `\` escapes the next byte), comparing each to the names metering reads. A name found anywhere
//! but where the shape expects it, even as a value, sends the chunk to the full parse; so does a
//! key written with escapes, which could spell one of those names.
//!
//! Within one stream, the chunks of a content delta differ only in their text: the bytes before
//! it (id, model, creation time, the choice's index) repeat. [`ChatSkimmer`] remembers them from
//! the first plain content delta the scan accepted and, for a chunk that starts with the same
//! bytes, scans only what follows the text. Those bytes tokenize the same way in both chunks, so
//! what the first scan learnt about them holds for the second.

use std::borrow::Cow;

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

/// Skims the chat chunks of one stream; see the module docs.
#[derive(Debug, Default)]
pub struct ChatSkimmer {
    /// The bytes up to and including the opening quote of the text of an accepted content
    /// delta whose prefix holds no `usage`; empty until one is seen.
    prefix: Vec<u8>,
}

impl ChatSkimmer {
    /// Classifies a chat or completions chunk (the payload of one `data:` event).
    pub fn skim<'a>(&mut self, json: &'a [u8]) -> Skim<'a> {
        if !self.prefix.is_empty() && json.starts_with(&self.prefix) {
            // The template's text literal opens at the end of the prefix.
            let Ok(text) = literal_at(json, self.prefix.len() - 1) else {
                return Skim::Parse;
            };
            let found = scan(json, text.close + 1, Found::text(text));
            return found.skim(json);
        }
        let found = scan(json, 0, Found::default());
        if let Found {
            text: Some(text),
            usage_before_text: false,
            ..
        } = found
        {
            self.prefix.clear();
            self.prefix.extend_from_slice(&json[..=text.open]);
        }
        found.skim(json)
    }
}

/// A string literal: the offsets of its quotes and whether it contains escapes.
#[derive(Debug, Clone, Copy)]
struct Literal {
    open: usize,
    close: usize,
    escaped: bool,
}

impl Literal {
    fn body<'a>(&self, json: &'a [u8]) -> &'a [u8] {
        &json[self.open + 1..self.close]
    }
}

/// A string literal that does not end.
struct Unended;

/// The string literal whose opening quote is at `open`.
fn literal_at(json: &[u8], open: usize) -> Result<Literal, Unended> {
    let mut pos = open + 1;
    let mut escaped = false;
    loop {
        pos += memchr::memchr2(b'"', b'\\', json.get(pos..).ok_or(Unended)?).ok_or(Unended)?;
        if json[pos] == b'"' {
            return Ok(Literal {
                open,
                close: pos,
                escaped,
            });
        }
        escaped = true;
        pos += 2;
    }
}

/// What a scan found: the chunk's content delta, whether it must be parsed.
#[derive(Debug, Default)]
struct Found {
    parse: bool,
    /// The text literal of the `"delta":{"content":"…"` seen.
    text: Option<Literal>,
    usage_seen: bool,
    /// A `usage` came before the text (so a prefix ending at the text holds it).
    usage_before_text: bool,
}

impl Found {
    fn text(text: Literal) -> Self {
        Found {
            text: Some(text),
            ..Found::default()
        }
    }

    fn parse() -> Self {
        Found {
            parse: true,
            ..Found::default()
        }
    }

    fn skim(self, json: &[u8]) -> Skim<'_> {
        if self.parse {
            return Skim::Parse;
        }
        match self.text {
            None => Skim::Nothing,
            Some(text) => decode(json, text).map_or(Skim::Parse, Skim::Content),
        }
    }
}

/// Scans the string literals of `json` from `from` on (outside any literal).
fn scan(json: &[u8], mut from: usize, mut found: Found) -> Found {
    // The literal before the current one, to check that a `content` key is a delta's.
    let mut previous: Option<Literal> = None;
    while let Some(offset) = json.get(from..).and_then(|rest| memchr::memchr(b'"', rest)) {
        let Ok(literal) = literal_at(json, from + offset) else {
            return Found::parse();
        };
        from = literal.close + 1;
        if literal.escaped {
            if is_key(json, from) {
                return Found::parse();
            }
            previous = Some(literal);
            continue;
        }
        match literal.body(json) {
            b"content" => {
                let is_delta_text = found.text.is_none()
                    && previous.is_some_and(|key| {
                        !key.escaped
                            && key.body(json) == b"delta"
                            && &json[key.close + 1..literal.open] == b":{"
                    })
                    && json.get(from) == Some(&b':')
                    && json.get(from + 1) == Some(&b'"');
                if !is_delta_text {
                    return Found::parse();
                }
                let Ok(text) = literal_at(json, from + 1) else {
                    return Found::parse();
                };
                found.text = Some(text);
                found.usage_before_text = found.usage_seen;
                from = text.close + 1;
                previous = Some(text);
                continue;
            }
            b"usage" => {
                if found.usage_seen || !is_null_member(&json[from..]) {
                    return Found::parse();
                }
                found.usage_seen = true;
            }
            b"error" | b"refusal" | b"text" | b"tool_calls" | b"function_call" | b"arguments" => {
                return Found::parse();
            }
            _ => {}
        }
        previous = Some(literal);
    }
    found
}

/// Whether the literal that ended just before `after` is a key (a `:` follows it).
fn is_key(json: &[u8], after: usize) -> bool {
    json.get(after..)
        .is_some_and(|rest| rest.trim_ascii_start().first() == Some(&b':'))
}

/// Whether `rest` (what follows a key) is `: null`, spaces allowed.
fn is_null_member(rest: &[u8]) -> bool {
    rest.trim_ascii_start()
        .strip_prefix(b":")
        .is_some_and(|value| value.trim_ascii_start().starts_with(b"null"))
}

/// The text of a literal, decoded; `None` if it is not valid UTF-8 or does not decode.
fn decode(json: &[u8], text: Literal) -> Option<Cow<'_, str>> {
    if text.escaped {
        serde_json::from_slice::<Cow<'_, str>>(&json[text.open..=text.close])
            .ok()
            .map(|text| Cow::Owned(text.into_owned()))
    } else {
        std::str::from_utf8(text.body(json)).ok().map(Cow::Borrowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skim(chunk: &str) -> Skim<'_> {
        ChatSkimmer::default().skim(chunk.as_bytes())
    }

    #[test]
    fn a_plain_content_delta_is_read_without_parsing() {
        let chunk = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hé \"q\" 東京\n"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
        assert_eq!(
            skim(chunk),
            Skim::Content(Cow::Owned("Hé \"q\" 東京\n".into()))
        );
        let plain = r#"{"id":"c1","choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}"#;
        assert_eq!(skim(plain), Skim::Content(Cow::Borrowed(" the")));
    }

    #[test]
    fn a_chunk_without_anything_metered_needs_nothing() {
        let finish = r#"{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage": null}"#;
        assert_eq!(skim(finish), Skim::Nothing);
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
            // a key spelt with escapes, a `delta` that is the end of an escaped string
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"us\u0061ge":{"prompt_tokens":1}}"#,
            r#"{"x\"delta":{"content":"a"}}"#,
        ] {
            assert_eq!(skim(chunk), Skim::Parse, "{chunk}");
        }
        // Text that is not UTF-8.
        let mut chunk = br#"{"choices":[{"index":0,"delta":{"content":"ab"}}]}"#.to_vec();
        let a = chunk.iter().rposition(|&b| b == b'a').expect("the text");
        chunk[a] = 0xff;
        assert_eq!(ChatSkimmer::default().skim(&chunk), Skim::Parse);
    }

    #[test]
    fn a_stream_s_later_deltas_are_read_from_the_first_one_s_prefix() {
        let chunk = |text: &str, tail: &str| {
            format!(
                r#"{{"id":"c1","created":1,"choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason":null}}]{tail}}}"#
            )
        };
        let mut skimmer = ChatSkimmer::default();
        let first = chunk("a", "");
        assert_eq!(skimmer.skim(first.as_bytes()), Skim::Content("a".into()));
        let prefix = skimmer.prefix.clone();
        assert!(first.as_bytes().starts_with(&prefix) && prefix.ends_with(b"\"content\":\""));
        let second = chunk(r#" \"b\""#, "");
        assert_eq!(
            skimmer.skim(second.as_bytes()),
            Skim::Content(Cow::Owned(r#" "b""#.into()))
        );
        // What follows the text is still read: usage there, or anything else, is parsed.
        for tail in [
            r#","usage":{"prompt_tokens":1}"#,
            r#","error":{}"#,
            r#","usage":null,"usage":null"#,
        ] {
            assert_eq!(
                skimmer.skim(chunk("c", tail).as_bytes()),
                Skim::Parse,
                "{tail}"
            );
        }
        assert_eq!(
            skimmer.skim(chunk("c", r#","usage":null"#).as_bytes()),
            Skim::Content("c".into())
        );
        // An unended text under the same prefix.
        assert_eq!(
            skimmer.skim(br#"{"id":"c1","created":1,"choices":[{"index":0,"delta":{"content":"ab"#),
            Skim::Parse
        );
        assert_eq!(skimmer.prefix, prefix, "the prefix is kept");
    }

    #[test]
    fn a_prefix_holding_usage_is_not_remembered() {
        let mut skimmer = ChatSkimmer::default();
        let chunk = br#"{"usage":null,"choices":[{"index":0,"delta":{"content":"a"}}]}"#;
        assert_eq!(skimmer.skim(chunk), Skim::Content("a".into()));
        assert!(skimmer.prefix.is_empty());
    }
}
