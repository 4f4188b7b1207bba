//! Authentication through HTTP: JWTs, forged and stale credentials (401 in OpenAI's shape, and
//! nothing written), admin access, and the routes that need no credential.

use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tollgate::config::{SHIPPED_ADMIN_TOKEN, SHIPPED_JWT_SECRET};
use tollgate::domain::AccountId;

use crate::helpers::*;

async fn table_counts(app: &TestApp) -> [i64; 4] {
    app.row_counts().await
}

fn now() -> i64 {
    i64::try_from(jsonwebtoken::get_current_timestamp()).expect("timestamp fits")
}

fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// Sends `POST path` with `body` and exactly the given Authorization header (or none).
async fn post_with(
    app: &TestApp,
    path: &str,
    authorization: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = app.client.post(app.url(path)).json(body);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.expect("request sent")
}

async fn get_with(app: &TestApp, path: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(app.url(path));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.expect("request sent")
}

#[tokio::test]
async fn a_valid_hs256_jwt_authenticates_and_bills_its_subject() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("alice", "10").await;
        let alice = token("alice");

        let response = app.chat(&alice, &chat_body("mock-1", "hello")).await;
        assert_eq!(response.status(), 200);
        let balance = app.settled_balance(&alice).await;
        assert_eq!(balance["account"], "alice");
        assert!(credits(&balance["balance"]) < rust_decimal::Decimal::from(10));
        assert_eq!(app.list("/api/credits/usage", &alice).await.len(), 1);

        // A token that expired a moment ago is still inside the 30 s clock-skew leeway.
        let skewed = hs256(JWT_SECRET, &json!({"sub": "alice", "exp": now() - 5}));
        assert_eq!(app.get("/api/credits/balance", &skewed).await.status(), 200);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn bad_credentials_get_401_and_write_nothing() {
    run_test(async || {
        let app = spawn_app().await;
        let valid = token("mallory");
        let parts: Vec<&str> = valid.split('.').collect();
        assert_eq!(parts.len(), 3);

        let expired = hs256(
            JWT_SECRET,
            &json!({"sub": "mallory", "iat": now() - 7200, "exp": now() - 120}),
        );
        let other_secret = hs256(
            "some-other-secret-that-is-also-32-bytes-long",
            &json!({"sub": "mallory", "exp": now() + 3600}),
        );
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(&json!({"sub": "mallory-rich", "exp": now() + 3600, "role": "admin"})),
            parts[2]
        );
        let alg_none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT"})),
            b64(&json!({"sub": "mallory", "exp": now() + 3600}))
        );
        let no_exp = hs256(JWT_SECRET, &json!({"sub": "mallory"}));
        let cases: Vec<(&str, Option<String>)> = vec![
            ("missing header", None),
            (
                "basic scheme",
                Some("Basic bWFsbG9yeTpwYXNzd29yZA==".into()),
            ),
            ("valid jwt without a scheme", Some(valid.clone())),
            (
                "valid jwt with another scheme",
                Some(format!("Token {valid}")),
            ),
            ("empty bearer", Some("Bearer ".into())),
            ("garbage", Some("Bearer not.a.jwt".into())),
            ("garbage without dots", Some("Bearer xyzzy".into())),
            ("unknown api key", Some("Bearer tg-0000000000000000".into())),
            ("expired", Some(format!("Bearer {expired}"))),
            ("other secret", Some(format!("Bearer {other_secret}"))),
            ("tampered payload", Some(format!("Bearer {tampered}"))),
            ("alg none", Some(format!("Bearer {alg_none}"))),
            ("no exp claim", Some(format!("Bearer {no_exp}"))),
        ];
        for (name, authorization) in &cases {
            let response = post_with(
                &app,
                "/v1/chat/completions",
                authorization.as_deref(),
                &chat_body("mock-1", "let me in"),
            )
            .await;
            let error = openai_error(response, 401).await;
            assert_eq!(error["code"], "invalid_api_key", "{name}: {error}");
            let response = get_with(&app, "/api/credits/balance", authorization.as_deref()).await;
            let error = openai_error(response, 401).await;
            assert_eq!(error["code"], "invalid_api_key", "{name}: {error}");
        }

        assert!(
            app.upstream.log.requests().is_empty(),
            "a bad credential reached the upstream"
        );
        for sub in ["mallory", "mallory-rich"] {
            let id = AccountId::parse(sub).expect("account id");
            assert!(
                app.ledger.account(&id).await.expect("ledger").is_none(),
                "{sub} was created"
            );
        }
        assert_eq!(table_counts(&app).await, [0, 0, 0, 0]);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn admin_routes_need_the_admin_role_or_token() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("alice", "5").await;
        let path = "/admin/accounts/alice";

        let admin_jwt = tollgate::auth::jwt::mint_hs256(
            JWT_SECRET,
            "root",
            Duration::from_secs(3600),
            None,
            None,
            Some("admin"),
        )
        .expect("mint admin jwt");
        let response = app.get(path, &admin_jwt).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["account"], "alice");
        assert_eq!(body["balance"], "5");
        let response = app.get(path, ADMIN_TOKEN).await;
        assert_eq!(response.status(), 200);

        // An admin-role JWT can also change things.
        let response = app
            .post(
                "/admin/accounts/alice/credits",
                &admin_jwt,
                &json!({"amount": "1", "type": "bonus"}),
            )
            .await;
        assert_eq!(response.status(), 201);

        // A user's JWT, or one with another role: authenticated, but not allowed.
        let user_role = tollgate::auth::jwt::mint_hs256(
            JWT_SECRET,
            "bob",
            Duration::from_secs(3600),
            None,
            None,
            Some("user"),
        )
        .expect("mint");
        for forbidden in [token("alice"), user_role] {
            let error = openai_error(app.get(path, &forbidden).await, 403).await;
            assert_eq!(error["code"], "permission_denied");
            let response = app
                .post(
                    "/admin/accounts/alice/credits",
                    &forbidden,
                    &json!({"amount": "100", "type": "bonus"}),
                )
                .await;
            openai_error(response, 403).await;
        }

        // No credential, garbage, or an admin-role token signed with another secret.
        let forged_admin = tollgate::auth::jwt::mint_hs256(
            "some-other-secret-that-is-also-32-bytes-long",
            "root",
            Duration::from_secs(3600),
            None,
            None,
            Some("admin"),
        )
        .expect("mint");
        let error = openai_error(get_with(&app, path, None).await, 401).await;
        assert_eq!(error["code"], "invalid_api_key");
        for bad in ["garbage", forged_admin.as_str(), "integration-admin-tokeN"] {
            let error = openai_error(app.get(path, bad).await, 401).await;
            assert_eq!(error["code"], "invalid_api_key", "{bad}");
            let response = app
                .post(
                    "/admin/accounts/alice/credits",
                    bad,
                    &json!({"amount": "100", "type": "bonus"}),
                )
                .await;
            openai_error(response, 401).await;
        }

        // Only the two grants that were allowed moved money.
        let balance = app.settled_balance(&token("alice")).await;
        assert_eq!(balance["balance"], "6");
        assert_eq!(
            app.list("/api/credits/transactions", &token("alice"))
                .await
                .len(),
            2
        );
        assert!(
            app.ledger
                .account(&AccountId::parse("bob").expect("id"))
                .await
                .expect("ledger")
                .is_none()
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn the_admin_token_is_not_a_user_credential() {
    run_test(async || {
        let app = spawn_app().await;
        let error = openai_error(
            app.chat(ADMIN_TOKEN, &chat_body("mock-1", "hello")).await,
            401,
        )
        .await;
        assert_eq!(error["code"], "invalid_api_key");
        let error = openai_error(app.get("/api/credits/balance", ADMIN_TOKEN).await, 401).await;
        assert_eq!(error["code"], "invalid_api_key");
        let error = openai_error(app.get("/v1/models", ADMIN_TOKEN).await, 401).await;
        assert_eq!(error["code"], "invalid_api_key");
        assert!(app.upstream.log.requests().is_empty());
        assert_eq!(table_counts(&app).await, [0, 0, 0, 0]);
    })
    .await;
}

#[tokio::test]
async fn health_needs_no_credential_and_unknown_routes_are_404_with_or_without_one() {
    run_test(async || {
        let app = spawn_app().await;
        let response = get_with(&app, "/healthz", None).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["status"], "ok");
        // A bad credential does not make a health check fail.
        assert_eq!(
            get_with(&app, "/healthz", Some("Bearer garbage"))
                .await
                .status(),
            200
        );

        let alice = token("alice");
        for path in [
            "/v1/nope",
            "/nope",
            "/api/credits/nope",
            "/v1/chat/completions/x",
        ] {
            let error = openai_error(app.get(path, &alice).await, 404).await;
            assert_eq!(error["code"], "not_found", "{path}");
        }
        let response = post_with(
            &app,
            "/v1/engines/x/completions",
            Some(&format!("Bearer {alice}")),
            &json!({}),
        )
        .await;
        let error = openai_error(response, 404).await;
        assert_eq!(error["code"], "not_found");

        // Without a credential too: the routes are documented, so a 404 reveals nothing, and a
        // client with a wrong base URL learns what is wrong instead of blaming its key.
        for path in ["/v1/nope", "/nope", "/admin/nope"] {
            let error = openai_error(get_with(&app, path, None).await, 404).await;
            assert_eq!(error["code"], "not_found", "{path}");
        }
        // A route that exists still asks for the credential first.
        openai_error(get_with(&app, "/v1/models", None).await, 401).await;
        assert!(app.upstream.log.requests().is_empty());
    })
    .await;
}

/// Runs the real binary on a copy of the app's config changed by `edit`.
async fn run_with_config(app: &TestApp, edit: impl Fn(String) -> String, args: &[&str]) -> Output {
    let text = edit(std::fs::read_to_string(&app.config_path).expect("config"));
    let path = app.dir.path().join("edited.toml");
    std::fs::write(&path, text).expect("edited config");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run tollgate");
    // A `serve` that starts instead of refusing is killed here, and the test fails.
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("tollgate {args:?} did not exit"))
        .expect("tollgate output")
}

#[tokio::test]
async fn the_shipped_development_secrets_work_only_in_a_development_setup() {
    run_test(async || {
        let app = spawn_app().await;
        let shipped = include_str!("../../config/tollgate.toml");
        assert!(shipped.contains(SHIPPED_JWT_SECRET) && shipped.contains(SHIPPED_ADMIN_TOKEN));
        assert!(
            shipped.contains("\ndevelopment = true"),
            "the shipped config is a dev setup"
        );
        let with_dev_jwt = |text: String| {
            text.replace(
                &format!("secret = \"{JWT_SECRET}\""),
                &format!("secret = \"{SHIPPED_JWT_SECRET}\""),
            )
        };
        let with_dev_admin = |text: String| {
            text.replace(
                &format!("token = \"{ADMIN_TOKEN}\""),
                &format!("token = \"{SHIPPED_ADMIN_TOKEN}\""),
            )
        };
        for (edit, field) in [
            (
                &with_dev_jwt as &dyn Fn(String) -> String,
                "auth.jwt.secret",
            ),
            (&with_dev_admin, "admin.token"),
        ] {
            for args in [&["serve"][..], &["token", "mint", "--sub", "alice"]] {
                let output = run_with_config(&app, edit, args).await;
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(
                    !output.status.success(),
                    "{args:?} with the shipped {field} ran"
                );
                assert!(
                    stderr.contains(field) && stderr.contains("server.development"),
                    "{args:?}: {stderr}"
                );
            }
            // Declared a development setup, the same config mints.
            let development = |text: String| {
                edit(text).replacen("[server]\n", "[server]\ndevelopment = true\n", 1)
            };
            let output =
                run_with_config(&app, development, &["token", "mint", "--sub", "alice"]).await;
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    })
    .await;
}

#[tokio::test]
async fn token_mint_refuses_a_secret_that_serve_refuses() {
    run_test(async || {
        let app = spawn_app().await;
        let short = |text: String| {
            text.replace(
                &format!("secret = \"{JWT_SECRET}\""),
                "secret = \"too-short\"",
            )
        };
        for args in [&["serve"][..], &["token", "mint", "--sub", "alice"]] {
            let output = run_with_config(&app, short, args).await;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                !output.status.success(),
                "{args:?} ran with a 9-byte secret"
            );
            assert!(stderr.contains("at least 32 bytes"), "{args:?}: {stderr}");
        }
    })
    .await;
}

#[tokio::test]
async fn an_account_id_with_invisible_or_bidi_characters_is_refused_everywhere() {
    run_test(async || {
        let app = spawn_app().await;
        // Shown as `alice` (or reordered), but another id: refused before anything is created.
        for sub in ["ali\u{200b}ce", "alice\u{202e}gnp", "\u{feff}alice"] {
            let error =
                openai_error(app.chat(&token(sub), &chat_body("mock-1", "hi")).await, 401).await;
            assert!(
                error["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("bidi"),
                "{sub:?}: {error}"
            );
            let path = format!("/admin/accounts/{sub}/credits"); // the URL encodes it
            let response = app
                .post(
                    &path,
                    ADMIN_TOKEN,
                    &json!({"amount": "5", "description": "test"}),
                )
                .await;
            openai_error(response, 400).await;
        }
        assert_eq!(
            table_counts(&app).await,
            [0, 0, 0, 0],
            "nothing was created"
        );
        assert!(app.upstream.log.requests().is_empty());
    })
    .await;
}

#[tokio::test]
async fn without_an_admin_role_configured_no_user_jwt_reaches_admin() {
    run_test(async || {
        let app = spawn_app_with(Options {
            admin_jwt_role: None,
            ..Options::default()
        })
        .await;
        let claims = json!({"sub": "mallory", "exp": now() + 3600, "role": "admin"});
        let response = get_with(
            &app,
            "/admin/pricing",
            Some(&format!("Bearer {}", hs256(JWT_SECRET, &claims))),
        )
        .await;
        openai_error(response, 401).await;
        // The admin token still works.
        assert_eq!(app.get("/admin/pricing", ADMIN_TOKEN).await.status(), 200);
    })
    .await;
}
