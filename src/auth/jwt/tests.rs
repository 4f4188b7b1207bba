//! The verifier against real tokens, key files and a JWKS server on loopback.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures_util::future::join_all;
use serde_json::json;

use super::keys::*;
use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
const SECRET: &str = "test-only-hs256-secret-of-more-than-32-bytes";

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture is readable")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// `sub: user-1`, `exp` in five minutes, then `extra` (a `null` removes a claim).
fn claims(extra: Value) -> Value {
    let mut claims = json!({ "sub": "user-1", "exp": now() + 300 });
    if let (Some(map), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        for (name, value) in extra {
            if value.is_null() {
                map.remove(&name);
            } else {
                map.insert(name, value);
            }
        }
    }
    claims
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("token signs")
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        None,
        claims,
    )
}

fn rsa_signer() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read_fixture("rsa_private.pem")).expect("rsa private key")
}

fn ec_signer() -> EncodingKey {
    EncodingKey::from_ec_pem(&read_fixture("ec_private.pem")).expect("ec private key")
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
}

fn secret_settings() -> JwtSettings {
    JwtSettings {
        secret: Some(SECRET.to_owned()),
        ..JwtSettings::default()
    }
}

async fn verifier(settings: &JwtSettings) -> JwtVerifier {
    JwtVerifier::from_settings(settings)
        .await
        .expect("verifier builds")
}

async fn setup_error(settings: &JwtSettings) -> String {
    JwtVerifier::from_settings(settings)
        .await
        .expect_err("settings are rejected")
        .to_string()
}

#[tokio::test]
async fn hs256_token_is_accepted() {
    crate::test_support::time_limit::limited(async move {
        let v = verifier(&secret_settings()).await;
        assert!(v.is_configured());
        let token = hs256(&claims(json!({ "plan": "pro" })));
        let verified = v.verify(&token).await.expect("valid token");
        assert_eq!(verified.subject, "user-1");
        assert_eq!(verified.role, None);
        assert_eq!(verified.claims["plan"], "pro");
    })
    .await;
}

#[tokio::test]
async fn expired_token_is_rejected() {
    crate::test_support::time_limit::limited(async move {
        let v = verifier(&secret_settings()).await;
        let token = hs256(&claims(json!({ "exp": now() - 120 })));
        let error = v.verify(&token).await.expect_err("expired");
        assert_eq!(error, JwtError::Expired);
        assert_eq!(error.to_string(), "token expired");
    })
    .await;
}

#[tokio::test]
async fn token_without_exp_is_rejected() {
    crate::test_support::time_limit::limited(async move {
        let v = verifier(&secret_settings()).await;
        let token = hs256(&claims(json!({ "exp": null })));
        assert_eq!(
            v.verify(&token).await,
            Err(JwtError::MissingClaim("exp".to_owned()))
        );
        let token = hs256(&claims(json!({ "exp": "tomorrow" })));
        assert!(v.verify(&token).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn not_yet_valid_token_is_rejected() {
    crate::test_support::time_limit::limited(async move {
        let v = verifier(&secret_settings()).await;
        let token = hs256(&claims(json!({ "nbf": now() + 120 })));
        let error = v.verify(&token).await.expect_err("not yet valid");
        assert_eq!(error, JwtError::NotYetValid);
        assert_eq!(error.to_string(), "token not yet valid");
    })
    .await;
}

#[tokio::test]
async fn leeway_accepts_small_clock_skew_only() {
    crate::test_support::time_limit::limited(async move {
        let skewed = hs256(&claims(json!({ "exp": now() - 10, "nbf": now() + 10 })));
        let v = verifier(&secret_settings()).await;
        assert!(
            v.verify(&skewed).await.is_ok(),
            "within the default 30 s leeway"
        );

        let strict = JwtSettings {
            leeway_secs: 0,
            ..secret_settings()
        };
        let v = verifier(&strict).await;
        assert_eq!(v.verify(&skewed).await, Err(JwtError::Expired));
    })
    .await;
}

#[tokio::test]
async fn tampered_payload_or_signature_is_rejected() {
    crate::test_support::time_limit::limited(async move {
        let v = verifier(&secret_settings()).await;
        let token = hs256(&claims(json!({ "role": "user" })));
        let parts: Vec<&str> = token.split('.').collect();

        let forged_payload = b64_json(&claims(json!({ "role": "admin" })));
        let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
        assert_eq!(v.verify(&tampered).await, Err(JwtError::InvalidSignature));

        let mut signature: Vec<char> = parts[2].chars().collect();
        let middle = signature.len() / 2;
        signature[middle] = if signature[middle] == 'A' { 'B' } else { 'A' };
        let signature: String = signature.into_iter().collect();
        let tampered = format!("{}.{}.{signature}", parts[0], parts[1]);
        let error = v.verify(&tampered).await.expect_err("tampered signature");
        assert_eq!(error.to_string(), "invalid token signature");

        assert_eq!(v.verify("not-a-token").await, Err(JwtError::Malformed));
        assert_eq!(
            v.verify(&format!("{token}.extra")).await,
            Err(JwtError::Malformed)
        );
    })
    .await;
}

#[tokio::test]
async fn alg_none_and_other_algorithms_are_rejected() {
    crate::test_support::time_limit::limited(async move {
        let v = verifier(&secret_settings()).await;
        let payload = b64_json(&claims(json!({})));
        for alg in ["none", "None", "NONE"] {
            let header = b64_json(&json!({ "alg": alg, "typ": "JWT" }));
            let unsigned = format!("{header}.{payload}.");
            let error = v.verify(&unsigned).await.expect_err("unsigned token");
            assert_eq!(
                error.to_string(),
                "token algorithm not allowed",
                "alg {alg}"
            );
        }
        let hs512 = sign(
            Algorithm::HS512,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            None,
            &claims(json!({})),
        );
        assert_eq!(v.verify(&hs512).await, Err(JwtError::AlgorithmNotAllowed));
    })
    .await;
}

#[tokio::test]
async fn algorithm_confusion_is_rejected() {
    crate::test_support::time_limit::limited(async move {
        let public_pem = read_fixture("rsa_public.pem");
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&public_pem),
            None,
            &claims(json!({ "role": "admin" })),
        );

        let rsa_only = JwtSettings {
            public_key_file: Some(fixture("rsa_public.pem")),
            ..JwtSettings::default()
        };
        let v = verifier(&rsa_only).await;
        assert_eq!(
            v.verify(&confused).await,
            Err(JwtError::AlgorithmNotAllowed)
        );

        // Even with HS256 enabled the RSA key is never used as an HMAC secret.
        let both = JwtSettings {
            secret: Some(SECRET.to_owned()),
            ..rsa_only
        };
        let v = verifier(&both).await;
        assert_eq!(v.verify(&confused).await, Err(JwtError::InvalidSignature));

        // And the reverse: an RS256 token is not checked against the shared secret.
        let v = verifier(&secret_settings()).await;
        let rs256 = sign(Algorithm::RS256, &rsa_signer(), None, &claims(json!({})));
        assert_eq!(v.verify(&rs256).await, Err(JwtError::AlgorithmNotAllowed));
    })
    .await;
}

#[tokio::test]
async fn rs256_via_pem_is_accepted() {
    crate::test_support::time_limit::limited(async move {
        let settings = JwtSettings {
            public_key_file: Some(fixture("rsa_public.pem")),
            ..JwtSettings::default()
        };
        let v = verifier(&settings).await;
        let token = sign(Algorithm::RS256, &rsa_signer(), None, &claims(json!({})));
        assert_eq!(
            v.verify(&token).await.expect("valid RS256").subject,
            "user-1"
        );

        let es256 = sign(Algorithm::ES256, &ec_signer(), None, &claims(json!({})));
        assert_eq!(v.verify(&es256).await, Err(JwtError::AlgorithmNotAllowed));
    })
    .await;
}

#[tokio::test]
async fn es256_via_pem_is_accepted() {
    crate::test_support::time_limit::limited(async move {
        let settings = JwtSettings {
            public_key_file: Some(fixture("ec_public.pem")),
            ..JwtSettings::default()
        };
        let v = verifier(&settings).await;
        let token = sign(
            Algorithm::ES256,
            &ec_signer(),
            Some("any-kid"),
            &claims(json!({})),
        );
        assert_eq!(
            v.verify(&token).await.expect("valid ES256").subject,
            "user-1"
        );

        let rs256 = sign(Algorithm::RS256, &rsa_signer(), None, &claims(json!({})));
        assert_eq!(v.verify(&rs256).await, Err(JwtError::AlgorithmNotAllowed));
    })
    .await;
}

#[tokio::test]
async fn jwks_file_picks_the_key_by_kid() {
    crate::test_support::time_limit::limited(async move {
        let settings = JwtSettings {
            jwks_file: Some(fixture("jwks.json")),
            ..JwtSettings::default()
        };
        let v = verifier(&settings).await;
        let body = claims(json!({}));

        let rs = sign(Algorithm::RS256, &rsa_signer(), Some("rsa-1"), &body);
        assert!(v.verify(&rs).await.is_ok(), "RS256 with kid rsa-1");
        let es = sign(Algorithm::ES256, &ec_signer(), Some("ec-1"), &body);
        assert!(v.verify(&es).await.is_ok(), "ES256 with kid ec-1");

        let no_kid = sign(Algorithm::ES256, &ec_signer(), None, &body);
        assert!(
            v.verify(&no_kid).await.is_ok(),
            "no kid: keys of the right type are tried"
        );

        let wrong_kid = sign(Algorithm::ES256, &ec_signer(), Some("rsa-1"), &body);
        assert_eq!(v.verify(&wrong_kid).await, Err(JwtError::UnknownKey));
        let unknown = sign(Algorithm::RS256, &rsa_signer(), Some("rsa-2"), &body);
        let error = v.verify(&unknown).await.expect_err("unknown kid");
        assert_eq!(error.to_string(), "token signed by an unknown key");
    })
    .await;
}

#[tokio::test]
async fn jwks_symmetric_keys_never_enable_hs256() {
    crate::test_support::time_limit::limited(async move {
        let mut set: Value =
            serde_json::from_slice(&read_fixture("jwks.json")).expect("fixture jwks");
        let oct = json!({ "kty": "oct", "kid": "shared", "k": URL_SAFE_NO_PAD.encode(SECRET) });
        set["keys"].as_array_mut().expect("keys array").push(oct);
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), set.to_string()).expect("write jwks");

        let settings = JwtSettings {
            jwks_file: Some(file.path().to_owned()),
            ..JwtSettings::default()
        };
        let v = verifier(&settings).await;
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            Some("shared"),
            &claims(json!({})),
        );
        assert_eq!(v.verify(&token).await, Err(JwtError::AlgorithmNotAllowed));
    })
    .await;
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    crate::test_support::time_limit::limited(async move {
        let settings = JwtSettings {
            issuer: Some("https://id.tollgate.test".to_owned()),
            audience: Some("tollgate".to_owned()),
            ..secret_settings()
        };
        let v = verifier(&settings).await;
        let good = json!({ "iss": "https://id.tollgate.test", "aud": "tollgate" });
        assert!(v.verify(&hs256(&claims(good))).await.is_ok());
        let listed = json!({ "iss": "https://id.tollgate.test", "aud": ["other", "tollgate"] });
        assert!(v.verify(&hs256(&claims(listed))).await.is_ok());

        let wrong_iss = json!({ "iss": "https://evil.test", "aud": "tollgate" });
        let error = v
            .verify(&hs256(&claims(wrong_iss)))
            .await
            .expect_err("wrong iss");
        assert_eq!(error.to_string(), "token issuer mismatch");
        let no_iss = json!({ "aud": "tollgate" });
        assert_eq!(
            v.verify(&hs256(&claims(no_iss))).await,
            Err(JwtError::MissingClaim("iss".to_owned()))
        );
        let wrong_aud = json!({ "iss": "https://id.tollgate.test", "aud": "other" });
        assert_eq!(
            v.verify(&hs256(&claims(wrong_aud))).await,
            Err(JwtError::AudienceMismatch)
        );
        let no_aud = json!({ "iss": "https://id.tollgate.test" });
        assert_eq!(
            v.verify(&hs256(&claims(no_aud))).await,
            Err(JwtError::MissingClaim("aud".to_owned()))
        );

        // Without configured values, whatever iss/aud a token carries is accepted.
        let v = verifier(&secret_settings()).await;
        let any = json!({ "iss": "https://elsewhere.test", "aud": "someone" });
        assert!(v.verify(&hs256(&claims(any))).await.is_ok());
    })
    .await;
}

#[tokio::test]
async fn subject_comes_from_the_configured_claim() {
    crate::test_support::time_limit::limited(async move {
        let settings = JwtSettings {
            subject_claim: "email".to_owned(),
            ..secret_settings()
        };
        let v = verifier(&settings).await;
        let token = hs256(&claims(json!({ "email": "ada@tollgate.test" })));
        assert_eq!(
            v.verify(&token).await.expect("valid").subject,
            "ada@tollgate.test"
        );

        let error = v
            .verify(&hs256(&claims(json!({}))))
            .await
            .expect_err("no email claim");
        assert_eq!(error.to_string(), "token is missing the `email` claim");
        for bad in [json!(""), json!(42), json!(["a"])] {
            let token = hs256(&claims(json!({ "email": bad })));
            assert_eq!(
                v.verify(&token).await,
                Err(JwtError::InvalidClaim("email".to_owned()))
            );
        }

        let v = verifier(&secret_settings()).await;
        let error = v
            .verify(&hs256(&claims(json!({ "sub": null }))))
            .await
            .expect_err("no sub");
        assert_eq!(error.to_string(), "token is missing the `sub` claim");
    })
    .await;
}

#[tokio::test]
async fn role_comes_from_the_configured_claim() {
    crate::test_support::time_limit::limited(async move {
        let v = verifier(&secret_settings()).await;
        let token = hs256(&claims(json!({ "role": "admin" })));
        assert_eq!(
            v.verify(&token).await.expect("valid").role.as_deref(),
            Some("admin")
        );

        let custom = JwtSettings {
            role_claim: "https://tollgate/role".to_owned(),
            ..secret_settings()
        };
        let v = verifier(&custom).await;
        let token = hs256(&claims(
            json!({ "role": "admin", "https://tollgate/role": "billing" }),
        ));
        assert_eq!(
            v.verify(&token).await.expect("valid").role.as_deref(),
            Some("billing")
        );
        let token = hs256(&claims(json!({ "role": "admin" })));
        assert_eq!(v.verify(&token).await.expect("valid").role, None);
    })
    .await;
}

#[tokio::test]
async fn minted_tokens_verify() {
    crate::test_support::time_limit::limited(async move {
        let token = mint_hs256(
            SECRET,
            "acct-7",
            Duration::from_secs(600),
            Some("tollgate"),
            Some("tollgate-api"),
            Some("admin"),
        )
        .expect("mint");
        let settings = JwtSettings {
            issuer: Some("tollgate".to_owned()),
            audience: Some("tollgate-api".to_owned()),
            ..secret_settings()
        };
        let verified = verifier(&settings)
            .await
            .verify(&token)
            .await
            .expect("minted token");
        assert_eq!(verified.subject, "acct-7");
        assert_eq!(verified.role.as_deref(), Some("admin"));
        let exp = verified.claims["exp"].as_u64().expect("numeric exp");
        assert!(exp.abs_diff(now() + 600) <= 2, "exp is now + ttl");

        let other = mint_hs256(
            "another-secret-that-is-long-enough-xx",
            "x",
            Duration::from_secs(60),
            None,
            None,
            None,
        )
        .expect("mint");
        assert_eq!(
            verifier(&secret_settings()).await.verify(&other).await,
            Err(JwtError::InvalidSignature)
        );
    })
    .await;
}

#[tokio::test]
async fn empty_secret_counts_as_unset() {
    crate::test_support::time_limit::limited(async move {
        let empty = JwtSettings {
            secret: Some(String::new()),
            ..JwtSettings::default()
        };
        assert!(!empty.has_key_source());
        let with_pem = JwtSettings {
            public_key_file: Some(fixture("rsa_public.pem")),
            ..empty
        };
        let v = verifier(&with_pem).await;
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b""),
            None,
            &claims(json!({})),
        );
        assert_eq!(v.verify(&forged).await, Err(JwtError::AlgorithmNotAllowed));
    })
    .await;
}

#[tokio::test]
async fn disabled_verifier_accepts_nothing() {
    crate::test_support::time_limit::limited(async move {
        let v = JwtVerifier::disabled();
        assert!(!v.is_configured());
        assert!(!JwtSettings::default().has_key_source());
        assert_eq!(
            v.verify(&hs256(&claims(json!({})))).await,
            Err(JwtError::NotEnabled)
        );
    })
    .await;
}

#[test]
fn settings_parse_from_toml_with_defaults() {
    let settings: JwtSettings =
        toml::from_str("secret = \"s\"\njwks_url = \"https://id.tollgate.test/jwks\"")
            .expect("valid table");
    assert_eq!(settings.jwks_refresh_secs, 300);
    assert_eq!(settings.subject_claim, "sub");
    assert_eq!(settings.role_claim, "role");
    assert_eq!(settings.leeway_secs, 30);
    assert!(settings.has_key_source());
    assert!(
        !format!("{settings:?}").contains("\"s\""),
        "Debug hides the secret"
    );
    assert!(
        toml::from_str::<JwtSettings>("secrett = \"s\"").is_err(),
        "typos are refused"
    );
}

#[tokio::test]
async fn startup_errors_name_the_field() {
    crate::test_support::time_limit::limited(async move {
        let message = setup_error(&JwtSettings::default()).await;
        assert!(
            message.starts_with("auth.jwt:") && message.contains("secret"),
            "{message}"
        );

        let short = JwtSettings {
            secret: Some("hunter2".to_owned()),
            ..JwtSettings::default()
        };
        let message = setup_error(&short).await;
        assert!(message.starts_with("auth.jwt.secret:"), "{message}");
        assert!(
            !message.contains("hunter2"),
            "the secret is not echoed: {message}"
        );

        let cases = [
            (
                "auth.jwt.public_key_file:",
                JwtSettings {
                    public_key_file: Some(fixture("missing.pem")),
                    ..JwtSettings::default()
                },
            ),
            (
                "auth.jwt.public_key_file:",
                JwtSettings {
                    public_key_file: Some(fixture("jwks.json")),
                    ..JwtSettings::default()
                },
            ),
            (
                "auth.jwt.public_key_file:",
                JwtSettings {
                    public_key_file: Some(fixture("rsa_private.pem")),
                    ..JwtSettings::default()
                },
            ),
            (
                "auth.jwt.jwks_file:",
                JwtSettings {
                    jwks_file: Some(fixture("rsa_public.pem")),
                    ..JwtSettings::default()
                },
            ),
            (
                "auth.jwt.jwks_file:",
                JwtSettings {
                    jwks_file: Some(fixture("missing.json")),
                    ..JwtSettings::default()
                },
            ),
            (
                "auth.jwt.jwks_url:",
                JwtSettings {
                    jwks_url: Some("ftp://127.0.0.1/jwks.json".to_owned()),
                    ..JwtSettings::default()
                },
            ),
            (
                "auth.jwt.jwks_url:",
                JwtSettings {
                    jwks_url: Some("not a url".to_owned()),
                    ..JwtSettings::default()
                },
            ),
            (
                "auth.jwt.leeway_secs:",
                JwtSettings {
                    leeway_secs: 1 << 40,
                    ..secret_settings()
                },
            ),
            (
                "auth.jwt.jwks_refresh_secs:",
                JwtSettings {
                    jwks_refresh_secs: 0,
                    ..secret_settings()
                },
            ),
            (
                "auth.jwt.subject_claim:",
                JwtSettings {
                    subject_claim: String::new(),
                    ..secret_settings()
                },
            ),
        ];
        for (prefix, settings) in cases {
            let message = setup_error(&settings).await;
            assert!(
                message.starts_with(prefix),
                "expected {prefix}, got {message}"
            );
        }

        let message = setup_error(&JwtSettings {
            public_key_file: Some(fixture("rsa_private.pem")),
            ..JwtSettings::default()
        })
        .await;
        assert!(message.contains("private key"), "{message}");
        assert!(
            !message.contains("MII"),
            "no key material in the message: {message}"
        );
    })
    .await;
}

#[tokio::test]
async fn broken_keys_in_a_jwks_file_are_reported_with_their_kid() {
    crate::test_support::time_limit::limited(async move {
        let set = json!({ "keys": [
            { "kty": "EC", "kid": "bent", "crv": "P-256", "x": "AAAA", "y": "AAAA" },
        ]});
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), set.to_string()).expect("write jwks");
        let settings = JwtSettings {
            jwks_file: Some(file.path().to_owned()),
            ..JwtSettings::default()
        };
        let message = setup_error(&settings).await;
        assert!(
            message.starts_with("auth.jwt.jwks_file:") && message.contains("bent"),
            "{message}"
        );
    })
    .await;
}

#[test]
fn debug_output_hides_key_material() {
    let rendered = format!("{:?}", secret_settings());
    assert!(!rendered.contains(SECRET), "{rendered}");
    let key = key_from_pem(&read_fixture("rsa_public.pem")).expect("rsa public key");
    assert_eq!(key.alg, Algorithm::RS256);
    assert!(!format!("{key:?}").contains("MII"));
    let key = key_from_pem(&read_fixture("ec_public.pem")).expect("ec public key");
    assert_eq!(key.alg, Algorithm::ES256);
}

// ---- JWKS over HTTP --------------------------------------------------------------------

#[derive(Clone)]
struct Reply {
    status: StatusCode,
    body: String,
    delay: Duration,
}

/// A real loopback HTTP server that serves a JWK set and counts how often it is asked.
#[derive(Clone)]
struct JwksServer {
    url: String,
    hits: Arc<AtomicUsize>,
    reply: Arc<Mutex<Reply>>,
}

impl JwksServer {
    async fn start(body: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let server = JwksServer {
            url: format!("http://{addr}/jwks.json"),
            hits: Arc::new(AtomicUsize::new(0)),
            reply: Arc::new(Mutex::new(Reply {
                status: StatusCode::OK,
                body,
                delay: Duration::ZERO,
            })),
        };
        let app = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .with_state(server.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        server
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, change: impl FnOnce(&mut Reply)) {
        change(&mut self.reply.lock().expect("reply lock"));
    }

    fn settings(&self) -> JwtSettings {
        JwtSettings {
            jwks_url: Some(self.url.clone()),
            ..JwtSettings::default()
        }
    }
}

async fn serve_jwks(State(server): State<JwksServer>) -> (StatusCode, String) {
    server.hits.fetch_add(1, Ordering::SeqCst);
    let reply = server.reply.lock().expect("reply lock").clone();
    tokio::time::sleep(reply.delay).await;
    (reply.status, reply.body)
}

/// The fixture set restricted to the given kids.
fn jwks_with(kids: &[&str]) -> String {
    let mut set: Value = serde_json::from_slice(&read_fixture("jwks.json")).expect("fixture jwks");
    set["keys"]
        .as_array_mut()
        .expect("keys array")
        .retain(|k| kids.contains(&k["kid"].as_str().unwrap_or_default()));
    set.to_string()
}

fn timing(refresh_every: Duration, kid_refetch_every: Duration) -> Timing {
    Timing {
        refresh_every,
        kid_refetch_every,
        fetch_timeout: JWKS_FETCH_TIMEOUT,
    }
}

#[tokio::test]
async fn jwks_url_is_cached_and_refetched_on_unknown_kid_within_the_rate_limit() {
    crate::test_support::time_limit::limited(async move {
        let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
        let v = verifier(&server.settings()).await;
        assert_eq!(server.hits(), 1, "fetched once at start-up");

        let rs = sign(
            Algorithm::RS256,
            &rsa_signer(),
            Some("rsa-1"),
            &claims(json!({})),
        );
        for _ in 0..3 {
            assert!(v.verify(&rs).await.is_ok());
        }
        assert_eq!(server.hits(), 1, "served from the cache");

        // The provider rotates in a new key: its first token triggers one refetch.
        server.set(|r| r.body = jwks_with(&["rsa-1", "ec-1"]));
        let es = sign(
            Algorithm::ES256,
            &ec_signer(),
            Some("ec-1"),
            &claims(json!({})),
        );
        assert!(
            v.verify(&es).await.is_ok(),
            "new kid accepted after refetch"
        );
        assert_eq!(server.hits(), 2);

        // Made-up kids cannot make us hammer the endpoint, one by one or all at once.
        let forged = sign(
            Algorithm::RS256,
            &rsa_signer(),
            Some("made-up"),
            &claims(json!({})),
        );
        for _ in 0..5 {
            assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
        }
        let results = join_all((0..20).map(|_| v.verify(&forged))).await;
        assert!(results.iter().all(|r| *r == Err(JwtError::UnknownKey)));
        assert_eq!(server.hits(), 2, "no refetch within 10 s of the last one");
        assert!(v.verify(&es).await.is_ok(), "known kids still work");
    })
    .await;
}

#[tokio::test]
async fn unknown_kid_refetches_again_once_the_interval_has_passed() {
    crate::test_support::time_limit::limited(async move {
        let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
        let t = timing(Duration::from_secs(300), Duration::from_secs(1));
        let v = JwtVerifier::build(&server.settings(), t)
            .await
            .expect("verifier");
        let forged = sign(
            Algorithm::RS256,
            &rsa_signer(),
            Some("made-up"),
            &claims(json!({})),
        );

        assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
        assert_eq!(server.hits(), 2, "start-up fetch plus one refetch");
        assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
        assert_eq!(server.hits(), 2, "rate limited");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
        assert_eq!(server.hits(), 3, "allowed again after the interval");
    })
    .await;
}

#[tokio::test]
async fn jwks_cache_expires_after_the_refresh_interval() {
    crate::test_support::time_limit::limited(async move {
        let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
        let t = timing(Duration::from_secs(1), KID_REFETCH_INTERVAL);
        let v = JwtVerifier::build(&server.settings(), t)
            .await
            .expect("verifier");
        let rs = sign(
            Algorithm::RS256,
            &rsa_signer(),
            Some("rsa-1"),
            &claims(json!({})),
        );

        assert!(v.verify(&rs).await.is_ok());
        assert_eq!(server.hits(), 1);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(v.verify(&rs).await.is_ok());
        assert_eq!(server.hits(), 2, "stale set refreshed");
        assert!(v.verify(&rs).await.is_ok());
        assert_eq!(server.hits(), 2, "fresh again");

        // When the provider is down, the last good set keeps working.
        server.set(|r| r.status = StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(
            v.verify(&rs).await.is_ok(),
            "stale keys used while the endpoint fails"
        );
        assert_eq!(server.hits(), 3);
        assert!(v.verify(&rs).await.is_ok());
        assert_eq!(server.hits(), 3, "failed fetches are not retried at once");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_jwks_url_is_not_fatal_and_fetched_on_first_use() {
    crate::test_support::time_limit::limited(async move {
        let server = JwksServer::start(jwks_with(&["rsa-1", "ec-1"])).await;
        server.set(|r| r.status = StatusCode::SERVICE_UNAVAILABLE);
        let v = verifier(&server.settings()).await;
        assert_eq!(server.hits(), 1, "tried at start-up");

        // Concurrent first requests share one slow fetch.
        server.set(|r| {
            r.status = StatusCode::OK;
            r.delay = Duration::from_millis(300);
        });
        let token = sign(
            Algorithm::ES256,
            &ec_signer(),
            Some("ec-1"),
            &claims(json!({})),
        );
        let results = join_all((0..20).map(|_| v.verify(&token))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(server.hits(), 2, "one shared fetch");

        // Nothing listening at all: start-up still succeeds, requests get a clear error.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr").port()
        };
        let dead = JwtSettings {
            jwks_url: Some(format!("http://127.0.0.1:{port}/jwks.json")),
            ..JwtSettings::default()
        };
        let v = verifier(&dead).await;
        let error = v.verify(&token).await.expect_err("no keys");
        assert_eq!(error, JwtError::KeysUnavailable);
    })
    .await;
}

#[tokio::test]
async fn jwks_fetch_enforces_body_limit_and_timeout() {
    crate::test_support::time_limit::limited(async move {
        let token = sign(
            Algorithm::RS256,
            &rsa_signer(),
            Some("rsa-1"),
            &claims(json!({})),
        );
        let padded = |pad: usize| {
            let mut set: Value = serde_json::from_str(&jwks_with(&["rsa-1"])).expect("jwks");
            set["padding"] = Value::from("x".repeat(pad));
            set.to_string()
        };

        let server = JwksServer::start(padded(1000)).await;
        let v = verifier(&server.settings()).await;
        assert!(v.verify(&token).await.is_ok(), "a small padded set is fine");

        let server = JwksServer::start(padded(JWKS_MAX_BYTES)).await;
        let v = verifier(&server.settings()).await;
        assert_eq!(
            v.verify(&token).await,
            Err(JwtError::KeysUnavailable),
            "over 1 MiB"
        );

        let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
        server.set(|r| r.delay = Duration::from_secs(3));
        let t = Timing {
            refresh_every: Duration::from_secs(300),
            kid_refetch_every: KID_REFETCH_INTERVAL,
            fetch_timeout: Duration::from_millis(200),
        };
        let started = Instant::now();
        let v = JwtVerifier::build(&server.settings(), t)
            .await
            .expect("slow endpoint is not fatal");
        assert_eq!(v.verify(&token).await, Err(JwtError::KeysUnavailable));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "gave up after the timeout"
        );
    })
    .await;
}
