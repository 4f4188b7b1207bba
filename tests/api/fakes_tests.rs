//! Tests of the fakes themselves (their signatures against the shared vectors, their webhook
//! bodies' shape) and of the real provider API clients against them. None of them touches a
//! ledger or a cache, so they live in the api binary only: the production binary includes
//! `fakes.rs` too, and would run them a second time under another name.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::fakes::*;
use crate::helpers::*;

// ---------------------------------------------------------------------------------------------
// Tests: the signing helpers against the shared vectors
// ---------------------------------------------------------------------------------------------

fn signature_vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/webhooks/webhook-signatures.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("read vectors")).expect("json")
}

fn s<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{pointer} in the vectors"))
}

fn ts(v: &Value, pointer: &str) -> i64 {
    v.pointer(pointer)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("{pointer} in the vectors"))
}

#[test]
fn stripe_signing_matches_the_shared_vectors() {
    let v = signature_vectors();
    let (secret, body) = (s(&v, "/stripe/secret"), s(&v, "/stripe/body"));
    let t = ts(&v, "/stripe/timestamp");
    assert_eq!(
        stripe_signature_header(secret, t, body),
        s(&v, "/stripe/header")
    );
    assert_eq!(
        stripe_signature_header_multi(&[s(&v, "/stripe/old_secret"), secret], t, body),
        s(&v, "/stripe/rotation_header")
    );
}

#[test]
fn standard_webhooks_signing_matches_the_shared_vectors() {
    let v = signature_vectors();
    for case in ["spec", "own"] {
        let headers = polar_signature_headers(
            s(&v, &format!("/{case}/secret")),
            false,
            s(&v, &format!("/{case}/id")),
            ts(&v, &format!("/{case}/ts")),
            s(&v, &format!("/{case}/body")),
        );
        assert_eq!(
            headers[0],
            ("webhook-id".into(), s(&v, &format!("/{case}/id")).into())
        );
        assert_eq!(
            headers[1],
            (
                "webhook-timestamp".into(),
                ts(&v, &format!("/{case}/ts")).to_string()
            )
        );
        assert_eq!(
            headers[2],
            (
                "webhook-signature".into(),
                s(&v, &format!("/{case}/signature")).into()
            ),
            "{case}"
        );
    }
}

#[test]
fn polar_signing_matches_the_shared_vectors() {
    let v = signature_vectors();
    let headers = polar_signature_headers(
        s(&v, "/polar/secret"),
        true,
        s(&v, "/polar/id"),
        ts(&v, "/polar/ts"),
        s(&v, "/polar/body"),
    );
    assert_eq!(headers[2].1, s(&v, "/polar/signature"));
}

#[test]
fn lemonsqueezy_signing_matches_the_shared_vectors() {
    let v = signature_vectors();
    assert_eq!(
        lemonsqueezy_signature(s(&v, "/lemonsqueezy/secret"), s(&v, "/lemonsqueezy/body")),
        s(&v, "/lemonsqueezy/x_signature")
    );
}

#[test]
fn webhook_bodies_have_the_providers_shape() {
    let event: Value = serde_json::from_str(&stripe_event(
        "evt_1",
        "checkout.session.completed",
        checkout_session_object(
            "cs_1", "ord_1", "acct_1", "pkg_1", 500, "USD", "paid", "pi_1",
        ),
    ))
    .expect("stripe event json");
    assert_eq!(event["type"], "checkout.session.completed");
    assert_eq!(
        event["data"]["object"]["client_reference_id"],
        "ord_1:acct_1"
    );
    assert_eq!(event["data"]["object"]["metadata"]["package_id"], "pkg_1");
    assert_eq!(event["data"]["object"]["currency"], "usd");
    assert_eq!(
        event["data"]["object"]["customer_details"]["email"],
        "buyer@example.test"
    );

    let charge = charge_object(
        "ch_1",
        "pi_1",
        500,
        500,
        "usd",
        json!({"order_id": "ord_1"}),
    );
    assert_eq!(charge["refunded"], true);
    let dispute = dispute_object("dp_1", "ch_1", "pi_1", 500, "usd", "needs_response");
    assert_eq!(dispute["charge"], "ch_1");

    let ls: Value = serde_json::from_str(&lemonsqueezy_order_event(
        "order_refunded",
        "1001",
        "refunded",
        500,
        500,
        "USD",
        json!({"order_id": "ord_1"}),
    ))
    .expect("ls json");
    assert_eq!(ls["meta"]["custom_data"]["order_id"], "ord_1");
    assert_eq!(ls["data"]["attributes"]["refunded"], true);
    assert_eq!(ls["data"]["attributes"]["order_number"], 1001);
    assert_eq!(ls["data"]["attributes"]["first_order_item"]["price"], 500);

    let polar: Value = serde_json::from_str(&polar_order_event(
        "order.paid",
        "ord_polar_1",
        "paid",
        500,
        0,
        "usd",
        json!({"order_id": "ord_1"}),
    ))
    .expect("polar json");
    assert_eq!(polar["data"]["total_amount"], 500);
    assert_eq!(polar["data"]["metadata"]["order_id"], "ord_1");
    assert_eq!(polar["data"]["customer"]["email"], "buyer@example.test");
}

// ---------------------------------------------------------------------------------------------
// Tests: the real API clients against the fakes
// ---------------------------------------------------------------------------------------------

mod client_tests {
    use super::*;
    use tollgate::billing::lemonsqueezy::LemonSqueezyApi;
    use tollgate::billing::provider::{CheckoutRequest, ProviderError};
    use tollgate::billing::stripe::{DEFAULT_API_TIMEOUT, StripeApi};

    fn order(order_id: &str) -> CheckoutRequest {
        CheckoutRequest {
            order_id: order_id.into(),
            account_id: "acct_42".into(),
            package_id: "pkg_starter".into(),
            product_name: "Starter credits".into(),
            currency: "USD".into(),
            amount_minor: 1999,
            success_url: "https://tollgate.test/billing/success?order=ord".into(),
            cancel_url: "https://tollgate.test/billing/cancel".into(),
        }
    }

    fn ids() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("account_id".to_owned(), "acct_42".to_owned()),
            ("order_id".to_owned(), "ord_1".to_owned()),
            ("package_id".to_owned(), "pkg_starter".to_owned()),
        ])
    }

    /// A loopback port with nothing listening.
    async fn closed_base() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn stripe_create_is_idempotent_per_order_and_sends_the_order() {
        run_test(async || {
            let fake = FakeStripe::start().await;
            let api =
                StripeApi::new("sk_test_x", Some(&fake.base), DEFAULT_API_TIMEOUT).expect("client");
            let first = api.create_checkout(&order("ord_1")).await.expect("create");
            let again = api.create_checkout(&order("ord_1")).await.expect("replay");
            assert_eq!(first, again);
            assert_eq!(first.checkout_id, "cs_test_1");
            assert_eq!(first.url, "https://checkout.stripe.test/c/pay/cs_test_1");
            assert_eq!(fake.create_calls(), 2);

            let sessions = fake.sessions();
            assert_eq!(sessions.len(), 1);
            let session = &sessions[0];
            assert_eq!(session.amount, 1999);
            assert_eq!(session.currency, "usd");
            assert_eq!(session.quantity, Some(1));
            assert_eq!(session.mode.as_deref(), Some("payment"));
            assert_eq!(session.product_name.as_deref(), Some("Starter credits"));
            assert_eq!(
                session.client_reference_id.as_deref(),
                Some("ord_1:acct_42")
            );
            assert_eq!(
                session.success_url.as_deref(),
                Some("https://tollgate.test/billing/success?order=ord")
            );
            assert_eq!(
                session.cancel_url.as_deref(),
                Some("https://tollgate.test/billing/cancel")
            );
            assert_eq!(session.metadata, ids());
            assert_eq!(session.payment_intent_metadata, ids());
            assert_eq!(
                session.idempotency_key.as_deref(),
                Some("tollgate-checkout-ord_1")
            );
            assert!(session.stripe_version.is_some());

            let other = api.create_checkout(&order("ord_2")).await.expect("create");
            assert_eq!(other.checkout_id, "cs_test_2");
            assert_eq!(fake.sessions().len(), 2);
        })
        .await;
    }

    #[tokio::test]
    async fn stripe_errors_map_to_provider_errors() {
        run_test(async || {
            let fake = FakeStripe::start().await;
            let api =
                StripeApi::new("sk_test_x", Some(&fake.base), DEFAULT_API_TIMEOUT).expect("client");

            fake.fail_next(500);
            let err = api.create_checkout(&order("ord_1")).await.expect_err("500");
            assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

            fake.fail_next(429);
            let err = api.create_checkout(&order("ord_1")).await.expect_err("429");
            assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

            fake.fail_next(400);
            match api.create_checkout(&order("ord_1")).await {
                Err(ProviderError::Rejected { status, message }) => {
                    assert_eq!(status, 400);
                    assert_eq!(message, "Fake Stripe failure (400)");
                }
                other => panic!("{other:?}"),
            }
            // Every attempt reached the fake once (no hidden retries); none created a session.
            assert_eq!(fake.create_calls(), 3);
            assert!(fake.sessions().is_empty());

            // After failures, the same order still gets its session.
            api.create_checkout(&order("ord_1")).await.expect("create");

            // Same idempotency key, different parameters: Stripe refuses.
            let mut changed = order("ord_1");
            changed.amount_minor = 5000;
            match api.create_checkout(&changed).await {
                Err(ProviderError::Rejected {
                    status: 400,
                    message,
                }) => {
                    assert!(message.contains("idempotent"), "{message}")
                }
                other => panic!("{other:?}"),
            }

            fake.omit_url_next();
            let err = api
                .create_checkout(&order("ord_3"))
                .await
                .expect_err("no url");
            assert!(
                matches!(err, ProviderError::Unavailable(ref m) if m.contains("url")),
                "{err:?}"
            );

            let wrong = StripeApi::new("rk_live_wrong", Some(&fake.base), DEFAULT_API_TIMEOUT)
                .expect("client");
            match wrong.create_checkout(&order("ord_4")).await {
                Err(ProviderError::Rejected { status, message }) => {
                    assert_eq!(status, 401);
                    assert!(message.contains("Invalid API Key"), "{message}");
                }
                other => panic!("{other:?}"),
            }

            let down = StripeApi::new("sk_test_x", Some(&closed_base().await), DEFAULT_API_TIMEOUT)
                .expect("client");
            let err = down
                .create_checkout(&order("ord_5"))
                .await
                .expect_err("down");
            assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

            assert!(matches!(
                StripeApi::new("sk_test_x", Some("not a url"), DEFAULT_API_TIMEOUT),
                Err(ProviderError::Config(_))
            ));
        })
        .await;
    }

    #[tokio::test]
    async fn lemonsqueezy_create_sends_a_json_api_checkout() {
        run_test(async || {
            let fake = FakeLemonSqueezy::start().await;
            let api = LemonSqueezyApi::new("ls_test_x", "4242", Some(&fake.base)).expect("client");
            let created = api
                .create_checkout(&order("ord_1"), "777")
                .await
                .expect("create");
            assert_eq!(fake.create_calls(), 1);
            let checkouts = fake.checkouts();
            assert_eq!(checkouts.len(), 1);
            let checkout = &checkouts[0];
            assert_eq!(created.checkout_id, checkout.id);
            assert_eq!(
                created.url,
                format!(
                    "https://tollgate-test.lemonsqueezy.test/checkout/custom/{}",
                    checkout.id
                )
            );
            assert_eq!(checkout.store_id.as_deref(), Some("4242"));
            assert_eq!(checkout.variant_id.as_deref(), Some("777"));
            assert_eq!(checkout.custom_price, Some(1999));
            assert_eq!(
                checkout.custom,
                json!({"account_id": "acct_42", "order_id": "ord_1", "package_id": "pkg_starter"})
            );
            assert_eq!(
                checkout.redirect_url.as_deref(),
                Some("https://tollgate.test/billing/success?order=ord")
            );
            assert_eq!(checkout.body["data"]["type"], "checkouts");
        })
        .await;
    }

    #[tokio::test]
    async fn lemonsqueezy_errors_map_to_provider_errors() {
        run_test(async || {
            let fake = FakeLemonSqueezy::start().await;
            let api = LemonSqueezyApi::new("ls_test_x", "4242", Some(&fake.base)).expect("client");

            fake.fail_next(500);
            let err = api
                .create_checkout(&order("ord_1"), "777")
                .await
                .expect_err("500");
            assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

            fake.fail_next(429);
            let err = api
                .create_checkout(&order("ord_1"), "777")
                .await
                .expect_err("429");
            assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

            fake.fail_next(400);
            match api.create_checkout(&order("ord_1"), "777").await {
                Err(ProviderError::Rejected { status, message }) => {
                    assert_eq!(status, 400);
                    assert_eq!(message, "Fake Lemon Squeezy failure (400)");
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(fake.create_calls(), 3);
            assert!(fake.checkouts().is_empty());

            let wrong = LemonSqueezyApi::new("wrong", "4242", Some(&fake.base)).expect("client");
            match wrong.create_checkout(&order("ord_1"), "777").await {
                Err(ProviderError::Rejected { status, message }) => {
                    assert_eq!(status, 401);
                    assert_eq!(message, "Unauthenticated.");
                }
                other => panic!("{other:?}"),
            }

            let down = LemonSqueezyApi::new("ls_test_x", "4242", Some(&closed_base().await))
                .expect("client");
            let err = down
                .create_checkout(&order("ord_1"), "777")
                .await
                .expect_err("down");
            assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

            assert!(matches!(
                LemonSqueezyApi::new("ls_test_x", "4242", Some("ftp://x")),
                Err(ProviderError::Config(_))
            ));
        })
        .await;
    }
}
