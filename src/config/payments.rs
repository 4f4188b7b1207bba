//! `[payments]`: the payment providers, and where buyers return after paying.
//!
//! Each secret is given in the file (`secret_key = "…"`) or, better, named by an environment
//! variable (`secret_key_env = "STRIPE_SECRET_KEY"`); [`PaymentsConfig::resolve`] reads them
//! once at start-up and names the field of anything missing.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// Where the provider sends the buyer after paying; `{ORDER_ID}` becomes the order id.
    pub success_url: String,
    /// Where the provider sends a buyer who gave up.
    pub cancel_url: String,
    /// The provider of `create-checkout` when the request names none: `stripe` or
    /// `lemonsqueezy`. Default: Stripe if configured, else Lemon Squeezy.
    pub default_provider: Option<String>,
    pub stripe: Option<StripeConfig>,
    pub lemonsqueezy: Option<LemonSqueezyConfig>,
    pub polar: Option<PolarConfig>,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            success_url: "http://127.0.0.1:8080/payment/success?order={ORDER_ID}".to_owned(),
            cancel_url: "http://127.0.0.1:8080/payment/cancel?order={ORDER_ID}".to_owned(),
            default_provider: None,
            stripe: None,
            lemonsqueezy: None,
            polar: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StripeConfig {
    pub secret_key: Option<String>,
    pub secret_key_env: Option<String>,
    /// Webhook signing secrets (`whsec_…`); list two while rotating.
    pub webhook_secrets: Vec<String>,
    /// A variable holding the signing secrets, comma-separated.
    pub webhook_secrets_env: Option<String>,
    /// Stripe's API; tests point it at a fake on loopback.
    pub api_base: Option<String>,
    /// Webhooks whose signed timestamp is further than this from now are refused.
    pub tolerance_secs: Option<i64>,
    /// The most one Stripe API call may take (connect to the last byte of the answer), in
    /// seconds. Default 10.
    pub api_timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LemonSqueezyConfig {
    pub api_key: Option<String>,
    pub api_key_env: Option<String>,
    pub store_id: String,
    pub signing_secret: Option<String>,
    pub signing_secret_env: Option<String>,
    pub api_base: Option<String>,
    /// The Lemon Squeezy variant sold for each package id (`starter = "123456"`); checkouts
    /// charge the package's own price.
    pub variants: BTreeMap<String, String>,
}

/// How long after its timestamp a signed webhook is still accepted, unless a provider's
/// `tolerance_secs` says otherwise: Stripe's own default, and the Standard Webhooks libraries'.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// The most one Stripe API call may take (connect, request and the whole answer) unless
/// `[payments.stripe] api_timeout_secs` says otherwise. The buyer waits for it: a checkout
/// that Stripe has not created by then answers 502 and leaves its order `failed`.
pub const DEFAULT_STRIPE_API_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PolarSecretEncoding {
    /// Polar's own: the secret string's UTF-8 bytes are the key.
    #[default]
    Polar,
    /// Standard Webhooks: the key is the base64 after `whsec_`.
    Standard,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolarConfig {
    pub webhook_secret: Option<String>,
    pub webhook_secret_env: Option<String>,
    pub secret_encoding: PolarSecretEncoding,
    pub tolerance_secs: Option<i64>,
}

/// The providers with their secrets read.
#[derive(Debug, Clone, Default)]
pub struct ResolvedPayments {
    pub stripe: Option<ResolvedStripe>,
    pub lemonsqueezy: Option<ResolvedLemonSqueezy>,
    pub polar: Option<ResolvedPolar>,
}

#[derive(Clone)]
pub struct ResolvedStripe {
    /// `None`: webhooks only (no checkout).
    pub secret_key: Option<String>,
    pub webhook_secrets: Vec<String>,
    pub api_base: Option<String>,
    pub tolerance_secs: i64,
    pub api_timeout: Duration,
}

#[derive(Clone)]
pub struct ResolvedLemonSqueezy {
    pub api_key: Option<String>,
    pub store_id: String,
    pub signing_secret: String,
    pub api_base: Option<String>,
    pub variants: BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct ResolvedPolar {
    pub webhook_secret: String,
    pub encoding: PolarSecretEncoding,
    pub tolerance_secs: i64,
}

macro_rules! redacted_debug {
    ($($ty:ty),*) => {$(
        impl std::fmt::Debug for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!(stringify!($ty), " { <secrets redacted> }"))
            }
        }
    )*};
}
redacted_debug!(ResolvedStripe, ResolvedLemonSqueezy, ResolvedPolar);

/// A secret from the file (not empty) or from the variable its `_env` field names.
fn secret(
    section: &str,
    name: &str,
    value: &Option<String>,
    env: &Option<String>,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    if value.as_deref() == Some("") {
        return Err(format!("{section}.{name}: must not be empty"));
    }
    super::secret_or_env(section, name, value, env, lookup)
}

fn check_url(field: &str, url: &Option<String>) -> Result<(), String> {
    if let Some(url) = url {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{field}: `{url}` is not a URL: {e}"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "{field}: `{url}` must be an http(s) URL with a host"
            ));
        }
    }
    Ok(())
}

impl PaymentsConfig {
    /// Validates the section and reads its secrets; `package_ids` are the configured packages.
    pub fn resolve(
        &self,
        package_ids: &[&str],
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<ResolvedPayments, String> {
        let mut resolved = ResolvedPayments::default();
        if let Some(stripe) = &self.stripe {
            let secret_key = secret(
                "payments.stripe",
                "secret_key",
                &stripe.secret_key,
                &stripe.secret_key_env,
                &lookup,
            )?;
            let mut webhook_secrets = stripe.webhook_secrets.clone();
            if let Some(var) = &stripe.webhook_secrets_env {
                let value = lookup(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                    format!(
                        "payments.stripe.webhook_secrets_env: environment variable `{var}` is not set"
                    )
                })?;
                webhook_secrets.extend(value.split(',').map(|s| s.trim().to_owned()));
            }
            webhook_secrets.retain(|s| !s.is_empty());
            if webhook_secrets.is_empty() {
                return Err(
                    "payments.stripe.webhook_secrets: list at least one signing secret (whsec_…)"
                        .into(),
                );
            }
            check_url("payments.stripe.api_base", &stripe.api_base)?;
            resolved.stripe = Some(ResolvedStripe {
                secret_key,
                webhook_secrets,
                api_base: stripe.api_base.clone(),
                tolerance_secs: tolerance("payments.stripe", stripe.tolerance_secs)?,
                api_timeout: match stripe.api_timeout_secs {
                    None => DEFAULT_STRIPE_API_TIMEOUT,
                    Some(secs) if secs > 0 => Duration::from_secs(secs),
                    Some(_) => {
                        return Err("payments.stripe.api_timeout_secs: must be positive".into());
                    }
                },
            });
        }
        if let Some(ls) = &self.lemonsqueezy {
            let api_key = secret(
                "payments.lemonsqueezy",
                "api_key",
                &ls.api_key,
                &ls.api_key_env,
                &lookup,
            )?;
            let signing_secret = secret(
                "payments.lemonsqueezy",
                "signing_secret",
                &ls.signing_secret,
                &ls.signing_secret_env,
                &lookup,
            )?
            .ok_or("payments.lemonsqueezy.signing_secret: required (the webhook signing secret)")?;
            if api_key.is_some() && ls.store_id.is_empty() {
                return Err("payments.lemonsqueezy.store_id: required for checkouts".into());
            }
            for package in ls.variants.keys() {
                if !package_ids.contains(&package.as_str()) {
                    return Err(format!(
                        "payments.lemonsqueezy.variants.{package}: no package has this id"
                    ));
                }
            }
            check_url("payments.lemonsqueezy.api_base", &ls.api_base)?;
            resolved.lemonsqueezy = Some(ResolvedLemonSqueezy {
                api_key,
                store_id: ls.store_id.clone(),
                signing_secret,
                api_base: ls.api_base.clone(),
                variants: ls.variants.clone(),
            });
        }
        if let Some(polar) = &self.polar {
            let webhook_secret = secret(
                "payments.polar",
                "webhook_secret",
                &polar.webhook_secret,
                &polar.webhook_secret_env,
                &lookup,
            )?
            .ok_or("payments.polar.webhook_secret: required")?;
            let encoding = polar.secret_encoding;
            match encoding {
                PolarSecretEncoding::Polar => {}
                PolarSecretEncoding::Standard => {
                    use base64::Engine as _;
                    let encoded = webhook_secret
                        .strip_prefix("whsec_")
                        .unwrap_or(&webhook_secret);
                    if base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .is_err()
                    {
                        return Err("payments.polar.webhook_secret: with secret_encoding = \
                             \"standard\" it must be `whsec_` followed by base64"
                            .into());
                    }
                }
            }
            resolved.polar = Some(ResolvedPolar {
                webhook_secret,
                encoding,
                tolerance_secs: tolerance("payments.polar", polar.tolerance_secs)?,
            });
        }
        match self.default_provider.as_deref() {
            None => {}
            Some("stripe") if resolved.stripe.is_some() => {}
            Some("lemonsqueezy") if resolved.lemonsqueezy.is_some() => {}
            Some(other) => {
                return Err(format!(
                    "payments.default_provider: `{other}` is not a configured checkout provider \
                     (stripe or lemonsqueezy)"
                ));
            }
        }
        Ok(resolved)
    }
}

fn tolerance(section: &str, value: Option<i64>) -> Result<i64, String> {
    match value {
        None => Ok(DEFAULT_TOLERANCE_SECS),
        Some(secs) if secs > 0 => Ok(secs),
        Some(_) => Err(format!("{section}.tolerance_secs: must be positive")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PaymentsConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn secrets_come_from_the_file_or_the_named_variable() {
        let config = parse(
            "[stripe]\nsecret_key_env = \"SK\"\nwebhook_secrets = [\"whsec_a\"]\n\
             webhook_secrets_env = \"WH\"\n",
        );
        let lookup = |name: &str| match name {
            "SK" => Some("sk_test_1".to_owned()),
            "WH" => Some("whsec_b, whsec_c".to_owned()),
            _ => None,
        };
        let resolved = config
            .resolve(&[], lookup)
            .unwrap_or_else(|e| panic!("{e}"));
        let stripe = resolved.stripe.unwrap_or_else(|| panic!("stripe"));
        assert_eq!(stripe.secret_key.as_deref(), Some("sk_test_1"));
        assert_eq!(stripe.webhook_secrets, ["whsec_a", "whsec_b", "whsec_c"]);
        assert_eq!(stripe.tolerance_secs, 300);
        assert_eq!(stripe.api_timeout, Duration::from_secs(10));
        let slow = parse("[stripe]\nwebhook_secrets = [\"whsec_a\"]\napi_timeout_secs = 3\n")
            .resolve(&[], |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        let api_timeout = slow.stripe.map(|s| s.api_timeout);
        assert_eq!(api_timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "[stripe]\nsecret_key = \"sk\"\n",
                "payments.stripe.webhook_secrets",
            ),
            (
                "[stripe]\nsecret_key_env = \"NOPE\"\nwebhook_secrets = [\"w\"]\n",
                "payments.stripe.secret_key_env",
            ),
            (
                "[lemonsqueezy]\napi_key = \"k\"\nsigning_secret = \"s\"\n",
                "store_id",
            ),
            (
                "[lemonsqueezy]\nsigning_secret = \"s\"\nvariants = { gold = \"1\" }\n",
                "payments.lemonsqueezy.variants.gold",
            ),
            (
                "[polar]\nsecret_encoding = \"standard\"\n",
                "payments.polar.webhook_secret",
            ),
            (
                "[polar]\nwebhook_secret = \"whsec_not base64!\"\nsecret_encoding = \"standard\"\n",
                "payments.polar.webhook_secret",
            ),
            (
                "default_provider = \"stripe\"\n",
                "payments.default_provider",
            ),
            (
                "[stripe]\nwebhook_secrets = [\"w\"]\napi_timeout_secs = 0\n",
                "payments.stripe.api_timeout_secs",
            ),
        ];
        for (text, field) in cases {
            let err = parse(text)
                .resolve(&["starter"], |_| None)
                .err()
                .unwrap_or_else(|| panic!("{text} should fail"));
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let resolved = parse("[polar]\nwebhook_secret = \"polar_whs_topsecret\"\n")
            .resolve(&[], |_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!format!("{resolved:?}").contains("topsecret"));
    }
}
