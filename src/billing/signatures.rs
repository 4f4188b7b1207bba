//! Webhook signature checks for the payment providers, as pure functions.
//!
//! Each check takes the raw request body exactly as received (never a re-serialized JSON value),
//! the provider's signature header(s), the configured secret(s) and, where the scheme is
//! timestamped, the current Unix time and a tolerance. Comparisons are constant-time (hmac's
//! `verify_slice`). Errors never carry a secret, a signature or the body, so they are safe to log.
//!
//! - Stripe: `Stripe-Signature: t=…,v1=…[,v1=…]`, HMAC-SHA256 over `"{t}." + body`, keyed by the
//!   whole `whsec_…` string's bytes.
//! - Standard Webhooks (and Polar): `webhook-id`, `webhook-timestamp`, `webhook-signature:
//!   v1,<base64> [v1,<base64> …]`, HMAC-SHA256 over `"{id}.{timestamp}.{body}"`; the key is the
//!   base64 decoding of the secret after `whsec_` ([`SecretEncoding::Standard`]) or, for Polar,
//!   the secret string's UTF-8 bytes ([`SecretEncoding::Polar`]).
//! - Lemon Squeezy: `X-Signature: <hex>`, HMAC-SHA256 of the raw body, keyed by the signing
//!   secret's bytes.
//!
//! Test vectors: `tests/fixtures/webhooks/webhook-signatures.json`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

use crate::config::payments::PolarSecretEncoding;

/// Why a webhook signature was rejected. Carries no data, so `Display` never leaks a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required signature header (or one of its Standard Webhooks companions) is absent or empty.
    #[error("webhook signature header is missing")]
    MissingHeader,
    /// The signature header cannot be parsed (no timestamp, non-numeric timestamp, bad entry).
    #[error("webhook signature header is malformed")]
    MalformedHeader,
    /// The signed timestamp is further from now than the tolerance allows.
    #[error("webhook timestamp is outside the tolerance window")]
    TimestampOutsideTolerance,
    /// No signature of the expected scheme matches any configured secret.
    #[error("no webhook signature matches the configured secret")]
    NoMatchingSignature,
    /// The configured secret cannot be decoded into an HMAC key.
    #[error("webhook secret is not correctly encoded")]
    BadSecretEncoding,
}

/// How a Standard Webhooks secret becomes the HMAC key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretEncoding {
    /// Polar: the key is the secret string's UTF-8 bytes, exactly as configured.
    Polar,
    /// Standard Webhooks: the key is the base64 decoding of the secret, after an optional
    /// `whsec_` prefix is stripped.
    Standard,
}

impl From<PolarSecretEncoding> for SecretEncoding {
    fn from(configured: PolarSecretEncoding) -> Self {
        match configured {
            PolarSecretEncoding::Polar => SecretEncoding::Polar,
            PolarSecretEncoding::Standard => SecretEncoding::Standard,
        }
    }
}

/// The three Standard Webhooks request headers, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardWebhookHeaders<'a> {
    /// `webhook-id`: the message id.
    pub id: &'a str,
    /// `webhook-timestamp`: Unix seconds, as a decimal string (signed verbatim).
    pub timestamp: &'a str,
    /// `webhook-signature`: space-separated `v1,<base64>` entries.
    pub signature: &'a str,
}

/// Verifies a Stripe webhook.
///
/// `header` is the `Stripe-Signature` value: `t=<unix>,v1=<hex>[,v1=<hex>…]`; other schemes
/// (`v0`, …) are ignored. Passes if any `v1` matches any of `secrets` (secret rotation), each
/// used whole (including `whsec_`) as the HMAC key. The signature is checked before the
/// timestamp; then `|now_unix − t| > tolerance_secs` is rejected (Stripe's default is
/// [`DEFAULT_TOLERANCE_SECS`](crate::config::payments::DEFAULT_TOLERANCE_SECS); a negative tolerance acts as zero). A header with no `v1`
/// entry yields [`SignatureError::NoMatchingSignature`].
pub fn verify_stripe(
    payload: &[u8],
    header: &str,
    secrets: &[String],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header.trim();
    if header.is_empty() {
        return Err(SignatureError::MissingHeader);
    }

    let mut timestamp: Option<&str> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for item in header.split(',') {
        let (key, value) = item
            .trim()
            .split_once('=')
            .ok_or(SignatureError::MalformedHeader)?;
        match key.trim() {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::MalformedHeader);
                }
                timestamp = Some(value.trim());
            }
            // A v1 value that is not hex cannot match; skip it rather than fail the others.
            "v1" => {
                if let Ok(bytes) = hex::decode(value.trim()) {
                    signatures.push(bytes);
                }
            }
            _ => {}
        }
    }
    let timestamp_str = timestamp.ok_or(SignatureError::MalformedHeader)?;
    let timestamp = parse_unix(timestamp_str)?;

    let matched = secrets.iter().any(|secret| {
        let mut mac = hmac_sha256(secret.as_bytes());
        mac.update(timestamp_str.as_bytes());
        mac.update(b".");
        mac.update(payload);
        signatures
            .iter()
            .any(|signature| mac.clone().verify_slice(signature).is_ok())
    });
    if !matched {
        return Err(SignatureError::NoMatchingSignature);
    }
    check_tolerance(timestamp, now_unix, tolerance_secs)
}

/// Verifies a Standard Webhooks (or Polar) webhook.
///
/// Signed content is `"{id}.{timestamp}.{body}"` with the headers' strings verbatim; the
/// signature header may hold several space-separated `v1,<base64>` entries and any match passes
/// (other versions are ignored). The key comes from `secret` per `encoding`. The signature is
/// checked before the timestamp; then `|now_unix − timestamp| > tolerance_secs` is rejected.
pub fn verify_standard_webhook(
    payload: &[u8],
    headers: &StandardWebhookHeaders<'_>,
    secret: &str,
    encoding: SecretEncoding,
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let id = headers.id.trim();
    let timestamp_str = headers.timestamp.trim();
    let signature_header = headers.signature.trim();
    if id.is_empty() || timestamp_str.is_empty() || signature_header.is_empty() {
        return Err(SignatureError::MissingHeader);
    }
    let timestamp = parse_unix(timestamp_str)?;

    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for entry in signature_header.split_whitespace() {
        let (version, value) = entry
            .split_once(',')
            .ok_or(SignatureError::MalformedHeader)?;
        // A v1 value that is not base64 cannot match; skip it rather than fail the others.
        if version == "v1"
            && let Ok(bytes) = BASE64.decode(value)
        {
            signatures.push(bytes);
        }
    }

    let key = match encoding {
        SecretEncoding::Polar => secret.as_bytes().to_vec(),
        SecretEncoding::Standard => {
            let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
            BASE64
                .decode(encoded)
                .map_err(|_| SignatureError::BadSecretEncoding)?
        }
    };
    let mut mac = hmac_sha256(&key);
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_str.as_bytes());
    mac.update(b".");
    mac.update(payload);
    let matched = signatures
        .iter()
        .any(|signature| mac.clone().verify_slice(signature).is_ok());
    if !matched {
        return Err(SignatureError::NoMatchingSignature);
    }
    check_tolerance(timestamp, now_unix, tolerance_secs)
}

/// Verifies a Lemon Squeezy webhook: `signature_hex` (the `X-Signature` value) must be the hex
/// HMAC-SHA256 of the raw body keyed by `secret`'s bytes; hex case does not matter.
pub fn verify_lemonsqueezy(
    payload: &[u8],
    signature_hex: &str,
    secret: &str,
) -> Result<(), SignatureError> {
    let signature_hex = signature_hex.trim();
    if signature_hex.is_empty() {
        return Err(SignatureError::MissingHeader);
    }
    let signature = hex::decode(signature_hex).map_err(|_| SignatureError::MalformedHeader)?;
    let mut mac = hmac_sha256(secret.as_bytes());
    mac.update(payload);
    mac.verify_slice(&signature)
        .map_err(|_| SignatureError::NoMatchingSignature)
}

fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length (long keys are hashed), so this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn parse_unix(timestamp: &str) -> Result<i64, SignatureError> {
    if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SignatureError::MalformedHeader);
    }
    timestamp
        .parse()
        .map_err(|_| SignatureError::MalformedHeader)
}

fn check_tolerance(
    timestamp: i64,
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let tolerance = u64::try_from(tolerance_secs).unwrap_or(0);
    if now_unix.abs_diff(timestamp) > tolerance {
        return Err(SignatureError::TimestampOutsideTolerance);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::payments::DEFAULT_TOLERANCE_SECS;
    use serde_json::Value;

    const VECTORS: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/webhooks/webhook-signatures.json"
    ));

    fn vectors() -> Value {
        serde_json::from_str(VECTORS).expect("webhook vectors are valid JSON")
    }

    fn text<'a>(v: &'a Value, section: &str, field: &str) -> &'a str {
        v[section][field]
            .as_str()
            .unwrap_or_else(|| panic!("{section}.{field} is a string"))
    }

    fn int(v: &Value, section: &str, field: &str) -> i64 {
        v[section][field]
            .as_i64()
            .unwrap_or_else(|| panic!("{section}.{field} is an integer"))
    }

    /// The body with one byte changed.
    fn tampered(body: &str) -> Vec<u8> {
        let mut bytes = body.as_bytes().to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        bytes
    }

    /// `s` with the character at byte `index` (ASCII) replaced by a different one of the same
    /// alphabet class (hex digit or base64 letter).
    fn change_char(s: &str, index: usize) -> String {
        let mut bytes = s.as_bytes().to_vec();
        bytes[index] = if bytes[index] == b'a' { b'b' } else { b'a' };
        String::from_utf8(bytes).expect("ascii")
    }

    // ---- Stripe ----

    struct Stripe {
        secret: String,
        old_secret: String,
        timestamp: i64,
        body: String,
        v1: String,
        header: String,
        rotation_header: String,
    }

    fn stripe() -> Stripe {
        let v = vectors();
        Stripe {
            secret: text(&v, "stripe", "secret").to_owned(),
            old_secret: text(&v, "stripe", "old_secret").to_owned(),
            timestamp: int(&v, "stripe", "timestamp"),
            body: text(&v, "stripe", "body").to_owned(),
            v1: text(&v, "stripe", "v1").to_owned(),
            header: text(&v, "stripe", "header").to_owned(),
            rotation_header: text(&v, "stripe", "rotation_header").to_owned(),
        }
    }

    /// Stripe check with the default tolerance.
    fn check_stripe(
        body: &[u8],
        header: &str,
        secrets: &[&String],
        now: i64,
    ) -> Result<(), SignatureError> {
        let secrets: Vec<String> = secrets.iter().map(|s| (*s).clone()).collect();
        verify_stripe(body, header, &secrets, now, DEFAULT_TOLERANCE_SECS)
    }

    #[test]
    fn stripe_vector_header_is_consistent() {
        let s = stripe();
        assert_eq!(s.header, format!("t={},v1={}", s.timestamp, s.v1));
    }

    #[test]
    fn stripe_single_vector_passes() {
        let s = stripe();
        assert_eq!(
            check_stripe(s.body.as_bytes(), &s.header, &[&s.secret], s.timestamp),
            Ok(())
        );
    }

    #[test]
    fn stripe_rotation_header_passes_with_only_the_new_secret() {
        let s = stripe();
        assert_eq!(
            check_stripe(
                s.body.as_bytes(),
                &s.rotation_header,
                &[&s.secret],
                s.timestamp
            ),
            Ok(())
        );
    }

    #[test]
    fn stripe_rotation_header_passes_with_only_the_old_secret() {
        let s = stripe();
        assert_eq!(
            check_stripe(
                s.body.as_bytes(),
                &s.rotation_header,
                &[&s.old_secret],
                s.timestamp
            ),
            Ok(())
        );
    }

    #[test]
    fn stripe_rotation_header_passes_with_both_secrets_in_either_order() {
        let s = stripe();
        for secrets in [[&s.secret, &s.old_secret], [&s.old_secret, &s.secret]] {
            assert_eq!(
                check_stripe(s.body.as_bytes(), &s.rotation_header, &secrets, s.timestamp),
                Ok(())
            );
        }
    }

    #[test]
    fn stripe_single_header_passes_when_the_old_secret_is_also_configured() {
        let s = stripe();
        assert_eq!(
            check_stripe(
                s.body.as_bytes(),
                &s.header,
                &[&s.old_secret, &s.secret],
                s.timestamp
            ),
            Ok(())
        );
    }

    #[test]
    fn stripe_changed_body_byte_fails() {
        let s = stripe();
        for header in [&s.header, &s.rotation_header] {
            assert_eq!(
                check_stripe(
                    &tampered(&s.body),
                    header,
                    &[&s.secret, &s.old_secret],
                    s.timestamp
                ),
                Err(SignatureError::NoMatchingSignature)
            );
        }
    }

    #[test]
    fn stripe_changed_signature_fails() {
        let s = stripe();
        let header = format!("t={},v1={}", s.timestamp, change_char(&s.v1, 0));
        assert_eq!(
            check_stripe(s.body.as_bytes(), &header, &[&s.secret], s.timestamp),
            Err(SignatureError::NoMatchingSignature)
        );
        // The signed timestamp is part of the MAC: moving `t` breaks the signature.
        let header = format!("t={},v1={}", s.timestamp + 1, s.v1);
        assert_eq!(
            check_stripe(s.body.as_bytes(), &header, &[&s.secret], s.timestamp),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn stripe_wrong_secret_fails() {
        let s = stripe();
        let wrong = "whsec_not_the_right_secret".to_owned();
        assert_eq!(
            check_stripe(s.body.as_bytes(), &s.header, &[&wrong], s.timestamp),
            Err(SignatureError::NoMatchingSignature)
        );
        assert_eq!(
            check_stripe(
                s.body.as_bytes(),
                &s.rotation_header,
                &[&wrong],
                s.timestamp
            ),
            Err(SignatureError::NoMatchingSignature)
        );
        // The single header only carries the new secret's signature.
        assert_eq!(
            check_stripe(s.body.as_bytes(), &s.header, &[&s.old_secret], s.timestamp),
            Err(SignatureError::NoMatchingSignature)
        );
        // The key is the whole string, `whsec_` included.
        let stripped = s.secret.trim_start_matches("whsec_").to_owned();
        assert_eq!(
            check_stripe(s.body.as_bytes(), &s.header, &[&stripped], s.timestamp),
            Err(SignatureError::NoMatchingSignature)
        );
        assert_eq!(
            verify_stripe(s.body.as_bytes(), &s.header, &[], s.timestamp, 300),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn stripe_timestamp_tolerance_is_inclusive_300_seconds() {
        let s = stripe();
        for offset in [-301, 301] {
            assert_eq!(
                check_stripe(
                    s.body.as_bytes(),
                    &s.header,
                    &[&s.secret],
                    s.timestamp + offset
                ),
                Err(SignatureError::TimestampOutsideTolerance),
                "offset {offset}"
            );
        }
        for offset in [-300, -299, 0, 299, 300] {
            assert_eq!(
                check_stripe(
                    s.body.as_bytes(),
                    &s.header,
                    &[&s.secret],
                    s.timestamp + offset
                ),
                Ok(()),
                "offset {offset}"
            );
        }
    }

    #[test]
    fn stripe_bad_signature_is_reported_before_the_timestamp() {
        let s = stripe();
        assert_eq!(
            check_stripe(
                &tampered(&s.body),
                &s.header,
                &[&s.secret],
                s.timestamp + 10_000
            ),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn stripe_empty_header_is_missing() {
        let s = stripe();
        for header in ["", "   "] {
            assert_eq!(
                check_stripe(s.body.as_bytes(), header, &[&s.secret], s.timestamp),
                Err(SignatureError::MissingHeader)
            );
        }
    }

    #[test]
    fn stripe_malformed_headers_fail() {
        let s = stripe();
        let headers = [
            "garbage".to_owned(),
            format!("v1={}", s.v1),                           // no timestamp
            format!("t=,v1={}", s.v1),                        // empty timestamp
            format!("t=abc,v1={}", s.v1),                     // non-numeric timestamp
            format!("t=-{},v1={}", s.timestamp, s.v1),        // signed timestamp
            format!("t={},{}", s.timestamp, s.v1),            // entry without '='
            format!("t={0},t={0},v1={1}", s.timestamp, s.v1), // two timestamps
            format!("t={} v1={}", s.timestamp, s.v1),         // wrong separator
        ];
        for header in &headers {
            assert_eq!(
                check_stripe(s.body.as_bytes(), header, &[&s.secret], s.timestamp),
                Err(SignatureError::MalformedHeader),
                "{header}"
            );
        }
    }

    #[test]
    fn stripe_only_v0_signature_fails() {
        let s = stripe();
        let header = format!("t={},v0={}", s.timestamp, s.v1);
        assert_eq!(
            check_stripe(s.body.as_bytes(), &header, &[&s.secret], s.timestamp),
            Err(SignatureError::NoMatchingSignature)
        );
        let header = format!("t={}", s.timestamp);
        assert_eq!(
            check_stripe(s.body.as_bytes(), &header, &[&s.secret], s.timestamp),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn stripe_ignores_other_schemes_and_unparsable_v1_next_to_a_good_v1() {
        let s = stripe();
        let header = format!(
            "t={},v0=deadbeef,v1=not-hex,v1={},v1={}",
            s.timestamp,
            change_char(&s.v1, 3),
            s.v1
        );
        assert_eq!(
            check_stripe(s.body.as_bytes(), &header, &[&s.secret], s.timestamp),
            Ok(())
        );
        let spaced = format!("t={}, v1={}", s.timestamp, s.v1.to_uppercase());
        assert_eq!(
            check_stripe(s.body.as_bytes(), &spaced, &[&s.secret], s.timestamp),
            Ok(())
        );
    }

    // ---- Standard Webhooks / Polar ----

    struct Standard {
        secret: String,
        id: String,
        ts: i64,
        body: String,
        signature: String,
    }

    fn standard(section: &str) -> Standard {
        let v = vectors();
        Standard {
            secret: text(&v, section, "secret").to_owned(),
            id: text(&v, section, "id").to_owned(),
            ts: int(&v, section, "ts"),
            body: text(&v, section, "body").to_owned(),
            signature: text(&v, section, "signature").to_owned(),
        }
    }

    /// Each Standard Webhooks vector with the encoding its secret is meant for.
    fn standard_cases() -> [(&'static str, Standard, SecretEncoding); 3] {
        [
            ("spec", standard("spec"), SecretEncoding::Standard),
            ("own", standard("own"), SecretEncoding::Standard),
            ("polar", standard("polar"), SecretEncoding::Polar),
        ]
    }

    fn check_standard(
        c: &Standard,
        body: &[u8],
        signature: &str,
        secret: &str,
        encoding: SecretEncoding,
        now: i64,
    ) -> Result<(), SignatureError> {
        let ts = c.ts.to_string();
        let headers = StandardWebhookHeaders {
            id: &c.id,
            timestamp: &ts,
            signature,
        };
        verify_standard_webhook(
            body,
            &headers,
            secret,
            encoding,
            now,
            DEFAULT_TOLERANCE_SECS,
        )
    }

    #[test]
    fn standard_vectors_pass() {
        for (name, c, encoding) in standard_cases() {
            assert_eq!(
                check_standard(
                    &c,
                    c.body.as_bytes(),
                    &c.signature,
                    &c.secret,
                    encoding,
                    c.ts
                ),
                Ok(()),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_secret_without_whsec_prefix_decodes_the_same() {
        for name in ["spec", "own"] {
            let c = standard(name);
            let bare = c.secret.trim_start_matches("whsec_");
            assert_eq!(
                check_standard(
                    &c,
                    c.body.as_bytes(),
                    &c.signature,
                    bare,
                    SecretEncoding::Standard,
                    c.ts
                ),
                Ok(()),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_changed_body_byte_fails() {
        for (name, c, encoding) in standard_cases() {
            assert_eq!(
                check_standard(
                    &c,
                    &tampered(&c.body),
                    &c.signature,
                    &c.secret,
                    encoding,
                    c.ts
                ),
                Err(SignatureError::NoMatchingSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_changed_signature_fails() {
        for (name, c, encoding) in standard_cases() {
            // Index 3 is the first base64 character after "v1,".
            let signature = change_char(&c.signature, 3);
            assert_eq!(
                check_standard(&c, c.body.as_bytes(), &signature, &c.secret, encoding, c.ts),
                Err(SignatureError::NoMatchingSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_changed_id_or_timestamp_fails() {
        for (name, c, encoding) in standard_cases() {
            let ts = c.ts.to_string();
            let headers = StandardWebhookHeaders {
                id: "msg_other",
                timestamp: &ts,
                signature: &c.signature,
            };
            assert_eq!(
                verify_standard_webhook(
                    c.body.as_bytes(),
                    &headers,
                    &c.secret,
                    encoding,
                    c.ts,
                    300
                ),
                Err(SignatureError::NoMatchingSignature),
                "{name}"
            );
            let ts = (c.ts + 1).to_string();
            let headers = StandardWebhookHeaders {
                id: &c.id,
                timestamp: &ts,
                signature: &c.signature,
            };
            assert_eq!(
                verify_standard_webhook(
                    c.body.as_bytes(),
                    &headers,
                    &c.secret,
                    encoding,
                    c.ts,
                    300
                ),
                Err(SignatureError::NoMatchingSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_wrong_secret_fails() {
        let own = standard("own");
        for (name, c, encoding) in standard_cases() {
            let wrong = match encoding {
                SecretEncoding::Standard if name == "own" => standard("spec").secret,
                SecretEncoding::Standard => own.secret.clone(),
                SecretEncoding::Polar => "polar_whs_not_the_right_secret".to_owned(),
            };
            assert_eq!(
                check_standard(&c, c.body.as_bytes(), &c.signature, &wrong, encoding, c.ts),
                Err(SignatureError::NoMatchingSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn polar_secret_checked_with_standard_encoding_fails() {
        let c = standard("polar");
        // The Polar secret is not base64 (it has '_'), so it cannot become a Standard key.
        assert_eq!(
            check_standard(
                &c,
                c.body.as_bytes(),
                &c.signature,
                &c.secret,
                SecretEncoding::Standard,
                c.ts
            ),
            Err(SignatureError::BadSecretEncoding)
        );
    }

    #[test]
    fn standard_secret_checked_with_polar_encoding_fails() {
        for name in ["spec", "own"] {
            let c = standard(name);
            assert_eq!(
                check_standard(
                    &c,
                    c.body.as_bytes(),
                    &c.signature,
                    &c.secret,
                    SecretEncoding::Polar,
                    c.ts
                ),
                Err(SignatureError::NoMatchingSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_timestamp_tolerance_is_inclusive_300_seconds() {
        for (name, c, encoding) in standard_cases() {
            for offset in [-301, 301] {
                assert_eq!(
                    check_standard(
                        &c,
                        c.body.as_bytes(),
                        &c.signature,
                        &c.secret,
                        encoding,
                        c.ts + offset
                    ),
                    Err(SignatureError::TimestampOutsideTolerance),
                    "{name} offset {offset}"
                );
            }
            for offset in [-300, -299, 299, 300] {
                assert_eq!(
                    check_standard(
                        &c,
                        c.body.as_bytes(),
                        &c.signature,
                        &c.secret,
                        encoding,
                        c.ts + offset
                    ),
                    Ok(()),
                    "{name} offset {offset}"
                );
            }
        }
    }

    #[test]
    fn standard_several_signatures_any_match_passes() {
        for (name, c, encoding) in standard_cases() {
            let bogus = change_char(&c.signature, 3);
            let header = format!("v1a,AAAA {bogus} v1,not*base64 {}", c.signature);
            assert_eq!(
                check_standard(&c, c.body.as_bytes(), &header, &c.secret, encoding, c.ts),
                Ok(()),
                "{name}"
            );
            let header = format!("{}  {bogus}", c.signature);
            assert_eq!(
                check_standard(&c, c.body.as_bytes(), &header, &c.secret, encoding, c.ts),
                Ok(()),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_only_other_versions_fail() {
        for (name, c, encoding) in standard_cases() {
            let header = c.signature.replacen("v1,", "v0,", 1);
            assert_eq!(
                check_standard(&c, c.body.as_bytes(), &header, &c.secret, encoding, c.ts),
                Err(SignatureError::NoMatchingSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn standard_empty_headers_are_missing() {
        let c = standard("own");
        let ts = c.ts.to_string();
        let cases = [
            StandardWebhookHeaders {
                id: "",
                timestamp: &ts,
                signature: &c.signature,
            },
            StandardWebhookHeaders {
                id: &c.id,
                timestamp: "",
                signature: &c.signature,
            },
            StandardWebhookHeaders {
                id: &c.id,
                timestamp: &ts,
                signature: "",
            },
            StandardWebhookHeaders {
                id: &c.id,
                timestamp: &ts,
                signature: "  ",
            },
        ];
        for headers in &cases {
            assert_eq!(
                verify_standard_webhook(
                    c.body.as_bytes(),
                    headers,
                    &c.secret,
                    SecretEncoding::Standard,
                    c.ts,
                    300
                ),
                Err(SignatureError::MissingHeader),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn standard_malformed_headers_fail() {
        let c = standard("own");
        let ts = c.ts.to_string();
        let sig_b64 = c.signature.trim_start_matches("v1,").to_owned();
        let bad_signatures = [
            sig_b64.clone(),
            format!("v1={sig_b64}"),
            format!("{} garbage", c.signature),
        ];
        for signature in &bad_signatures {
            let headers = StandardWebhookHeaders {
                id: &c.id,
                timestamp: &ts,
                signature,
            };
            assert_eq!(
                verify_standard_webhook(
                    c.body.as_bytes(),
                    &headers,
                    &c.secret,
                    SecretEncoding::Standard,
                    c.ts,
                    300
                ),
                Err(SignatureError::MalformedHeader),
                "{signature}"
            );
        }
        for timestamp in ["abc", "-1700000000", "1700000000.5", "99999999999999999999"] {
            let headers = StandardWebhookHeaders {
                id: &c.id,
                timestamp,
                signature: &c.signature,
            };
            assert_eq!(
                verify_standard_webhook(
                    c.body.as_bytes(),
                    &headers,
                    &c.secret,
                    SecretEncoding::Standard,
                    c.ts,
                    300
                ),
                Err(SignatureError::MalformedHeader),
                "{timestamp}"
            );
        }
    }

    // ---- Lemon Squeezy ----

    fn lemonsqueezy() -> (String, String, String) {
        let v = vectors();
        (
            text(&v, "lemonsqueezy", "secret").to_owned(),
            text(&v, "lemonsqueezy", "body").to_owned(),
            text(&v, "lemonsqueezy", "x_signature").to_owned(),
        )
    }

    #[test]
    fn lemonsqueezy_vector_passes_in_either_hex_case() {
        let (secret, body, signature) = lemonsqueezy();
        assert_eq!(
            verify_lemonsqueezy(body.as_bytes(), &signature, &secret),
            Ok(())
        );
        assert_eq!(
            verify_lemonsqueezy(body.as_bytes(), &signature.to_uppercase(), &secret),
            Ok(())
        );
    }

    #[test]
    fn lemonsqueezy_changed_body_byte_fails() {
        let (secret, body, signature) = lemonsqueezy();
        assert_eq!(
            verify_lemonsqueezy(&tampered(&body), &signature, &secret),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn lemonsqueezy_changed_signature_fails() {
        let (secret, body, signature) = lemonsqueezy();
        assert_eq!(
            verify_lemonsqueezy(body.as_bytes(), &change_char(&signature, 0), &secret),
            Err(SignatureError::NoMatchingSignature)
        );
        // A truncated signature is valid hex but the wrong length.
        assert_eq!(
            verify_lemonsqueezy(body.as_bytes(), &signature[..32], &secret),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn lemonsqueezy_wrong_secret_fails() {
        let (_, body, signature) = lemonsqueezy();
        assert_eq!(
            verify_lemonsqueezy(body.as_bytes(), &signature, "ls_signing_secret_124"),
            Err(SignatureError::NoMatchingSignature)
        );
    }

    #[test]
    fn lemonsqueezy_empty_or_malformed_signature_fails() {
        let (secret, body, signature) = lemonsqueezy();
        for empty in ["", "  "] {
            assert_eq!(
                verify_lemonsqueezy(body.as_bytes(), empty, &secret),
                Err(SignatureError::MissingHeader)
            );
        }
        for malformed in ["not hex", &signature[1..], &format!("sha256={signature}")] {
            assert_eq!(
                verify_lemonsqueezy(body.as_bytes(), malformed, &secret),
                Err(SignatureError::MalformedHeader),
                "{malformed}"
            );
        }
    }

    // ---- Errors ----

    #[test]
    fn error_messages_are_fixed_and_carry_no_secret() {
        let v = vectors();
        let secrets: Vec<&str> = ["stripe", "spec", "own", "polar", "lemonsqueezy"]
            .iter()
            .map(|section| text(&v, section, "secret"))
            .collect();
        for error in [
            SignatureError::MissingHeader,
            SignatureError::MalformedHeader,
            SignatureError::TimestampOutsideTolerance,
            SignatureError::NoMatchingSignature,
            SignatureError::BadSecretEncoding,
        ] {
            let message = error.to_string();
            assert!(!message.is_empty());
            assert!(!message.contains("whsec_") && secrets.iter().all(|s| !message.contains(s)));
        }
    }
}
