//! Payment events as the providers really send them: several events per refund or dispute,
//! in whatever order they arrive, each signed and posted to the webhook route. Every story
//! checks what the buyer sees (balance, transactions) and what an admin sees, that the ledger
//! verifies, and that a replay of every event delivered changes nothing.

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::fakes::*;
use crate::helpers::*;
use crate::payments::{Shop, WHSEC, dec, shop};
use crate::payments_providers::{
    POLAR_SECRET, app_with, balance_of, checkout, lemon_shop, lemonsqueezy_event, ls_paid,
    order_of, polar_event, polar_paid, polar_table,
};

/// One buyer's purchase of Starter (9.99 for 1000 credits) through Stripe, and the events
/// delivered about it.
struct Story<'a> {
    shop: &'a Shop,
    user: String,
    order_id: String,
    session: StripeSession,
    /// Every body Stripe delivered and Tollgate accepted (200), for the replays.
    delivered: Vec<String>,
}

impl<'a> Story<'a> {
    /// A checkout, not paid yet.
    async fn started(shop: &'a Shop, user: &str) -> Story<'a> {
        let (order_id, session) = shop.checkout(user, "starter").await;
        Story {
            shop,
            user: user.to_owned(),
            order_id,
            session,
            delivered: Vec::new(),
        }
    }

    /// A checkout, paid.
    async fn paid(shop: &'a Shop, user: &str) -> Story<'a> {
        let mut story = Story::started(shop, user).await;
        let paid = story.payment();
        assert_eq!(story.deliver(&paid).await, (200, "processed".into()));
        assert_eq!(story.balance().await, dec("1000"));
        story
    }

    fn event_id(&self, name: &str) -> String {
        format!("evt_{name}_{}", self.session.id)
    }

    fn charge_id(&self) -> String {
        format!("ch_{}", self.session.id)
    }

    fn payment_intent(&self) -> String {
        format!("pi_{}", self.session.id)
    }

    fn refund_id(&self) -> String {
        format!("re_{}", self.session.id)
    }

    fn dispute_id(&self) -> String {
        format!("dp_{}", self.session.id)
    }

    fn payment(&self) -> String {
        let session = self.shop.paid_session(&self.session, &self.user, 999);
        stripe_event(
            &self.event_id("paid"),
            "checkout.session.completed",
            session,
        )
    }

    /// `charge.refunded` with the charge's cumulative `amount_refunded`.
    fn charge_refunded(&self, name: &str, total: i64) -> String {
        let charge = charge_object(
            &self.charge_id(),
            &self.payment_intent(),
            999,
            total,
            "usd",
            json!({}),
        );
        stripe_event(&self.event_id(name), "charge.refunded", charge)
    }

    fn refund(&self, amount: i64, status: &str, failure_reason: Option<&str>) -> Value {
        refund_object(
            &self.refund_id(),
            &self.charge_id(),
            &self.payment_intent(),
            amount,
            "usd",
            status,
            failure_reason,
        )
    }

    fn refund_created(&self, amount: i64) -> String {
        let refund = self.refund(amount, "pending", None);
        stripe_event(&self.event_id("refund_created"), "refund.created", refund)
    }

    /// `refund.updated` or `charge.refund.updated`: the refund went from pending to `status`.
    fn refund_updated(
        &self,
        kind: &str,
        amount: i64,
        status: &str,
        reason: Option<&str>,
    ) -> String {
        let previous = match status {
            "failed" => json!({
                "status": "pending",
                "failure_reason": null,
                "failure_balance_transaction": null
            }),
            _ => json!({ "status": "pending" }),
        };
        stripe_updated_event(
            &self.event_id(kind),
            kind,
            self.refund(amount, status, reason),
            previous,
        )
    }

    fn refund_failed(&self, amount: i64) -> String {
        let refund = self.refund(amount, "failed", Some("expired_or_canceled_card"));
        stripe_event(&self.event_id("refund_failed"), "refund.failed", refund)
    }

    fn dispute(&self, kind: &str, status: &str) -> String {
        let dispute = dispute_object(
            &self.dispute_id(),
            &self.charge_id(),
            &self.payment_intent(),
            999,
            "usd",
            status,
        );
        let name = format!("{kind}_{status}");
        if kind == "charge.dispute.updated" {
            let previous = json!({ "status": "needs_response" });
            stripe_updated_event(&self.event_id(&name), kind, dispute, previous)
        } else {
            stripe_event(&self.event_id(&name), kind, dispute)
        }
    }

    /// Posts a signed body; returns the status and the outcome (or the error message).
    async fn deliver(&mut self, body: &str) -> (u16, String) {
        let signature = stripe_signature_header(WHSEC, now_unix(), body);
        let response = self.shop.post_webhook(body, Some(signature)).await;
        let status = response.status().as_u16();
        let text = response.text().await.expect("webhook answer");
        let answer: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("a {status} answer that is not JSON ({e}): {text}"));
        if status == 200 {
            self.delivered.push(body.to_owned());
            let outcome = answer["outcome"].as_str().expect("an outcome");
            (status, outcome.to_owned())
        } else {
            (status, answer["error"]["message"].to_string())
        }
    }

    /// Delivers `body` and expects it accepted with `outcome`.
    async fn expect(&mut self, body: &str, outcome: &str) {
        let (status, got) = self.deliver(body).await;
        assert_eq!((status, got.as_str()), (200, outcome), "{body}");
    }

    /// Delivers `body` and expects 409: it may apply later, so Stripe must deliver it again.
    async fn expect_retry(&mut self, body: &str) {
        let (status, why) = self.deliver(body).await;
        assert_eq!(status, 409, "{why}: {body}");
    }

    async fn balance(&self) -> Decimal {
        self.shop.balance_of(&self.user).await
    }

    /// The buyer's transactions as `(type, amount)`, oldest first.
    async fn moves(&self) -> Vec<(String, Decimal)> {
        let mut entries = self
            .shop
            .app
            .list("/api/credits/transactions", &token(&self.user))
            .await;
        entries.sort_by_key(|e| e["id"].as_i64().unwrap_or_default());
        entries
            .iter()
            .map(|e| {
                let kind = e["type"].as_str().expect("type").to_owned();
                (kind, credits(&e["amount"]))
            })
            .collect()
    }

    async fn order(&self) -> Value {
        self.shop.order(&self.user, &self.order_id).await
    }

    /// Stripe delivers every accepted event again: each is a duplicate, and the balance and
    /// the transactions stay as they are.
    async fn replays_change_nothing(&mut self) {
        let (balance, moves) = (self.balance().await, self.moves().await);
        for body in std::mem::take(&mut self.delivered) {
            let signature = stripe_signature_header(WHSEC, now_unix(), &body);
            let response = self.shop.post_webhook(&body, Some(signature)).await;
            assert_eq!(response.status(), 200, "{body}");
            let answer: Value = response.json().await.expect("json");
            assert_eq!(answer["outcome"], "duplicate", "{body}");
        }
        assert_eq!(self.balance().await, balance);
        assert_eq!(self.moves().await, moves);
    }
}

fn moves(expected: &[(&str, &str)]) -> Vec<(String, Decimal)> {
    expected
        .iter()
        .map(|(kind, amount)| ((*kind).to_owned(), dec(amount)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Stripe refunds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_full_refund_takes_the_credits_once_whatever_order_its_events_arrive_in() {
    run_test(async || {
        let shop = shop().await;
        // charge.refunded (0), refund.created (1), charge.refund.updated succeeded (2).
        let orders = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for (n, order) in orders.into_iter().enumerate() {
            let mut story = Story::paid(&shop, &format!("refund-order-{n}")).await;
            let events = [
                (story.charge_refunded("refunded", 999), "processed"),
                (story.refund_created(999), "ignored"),
                (
                    story.refund_updated("charge.refund.updated", 999, "succeeded", None),
                    "ignored",
                ),
            ];
            for i in order {
                let (body, outcome) = &events[i];
                story.expect(body, outcome).await;
            }
            assert_eq!(story.balance().await, Decimal::ZERO, "{order:?}");
            assert_eq!(
                story.moves().await,
                moves(&[("purchase", "1000"), ("refund", "-1000")]),
                "{order:?}"
            );
            assert_eq!(story.order().await["status"], "refunded");
            story.replays_change_nothing().await;
        }
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn refund_events_before_the_payment_wait_for_it_and_then_take_the_credits_once() {
    run_test(async || {
        let shop = shop().await;
        let mut story = Story::started(&shop, "refund-first").await;
        // The refund's news arrives while the session's event is still on its way.
        story.expect(&story.refund_created(999), "ignored").await;
        let refunded = story.charge_refunded("refunded", 999);
        story.expect_retry(&refunded).await;
        let succeeded = story.refund_updated("charge.refund.updated", 999, "succeeded", None);
        story.expect(&succeeded, "ignored").await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        assert!(story.moves().await.is_empty());

        story.expect(&story.payment(), "processed").await;
        assert_eq!(story.balance().await, dec("1000"));
        // Stripe's retry of the refunded charge now applies.
        story.expect(&refunded, "processed").await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        assert_eq!(
            story.moves().await,
            moves(&[("purchase", "1000"), ("refund", "-1000")])
        );
        story.replays_change_nothing().await;
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_failed_refund_is_held_for_review_once_and_its_credits_are_taken_once() {
    run_test(async || {
        let shop = shop().await;
        let mut story = Story::paid(&shop, "refund-fails").await;
        // A third refunded: a third of the credits go.
        story
            .expect(&story.charge_refunded("refunded", 333), "processed")
            .await;
        story.expect(&story.refund_created(333), "ignored").await;
        assert_eq!(story.balance().await, dec("666.666667"));

        // The card is closed: the refund fails, and Stripe says so three times.
        story.expect(&story.refund_failed(333), "review").await;
        let updated = story.refund_updated(
            "charge.refund.updated",
            333,
            "failed",
            Some("expired_or_canceled_card"),
        );
        story.expect(&updated, "duplicate").await;
        let updated = story.refund_updated(
            "refund.updated",
            333,
            "failed",
            Some("expired_or_canceled_card"),
        );
        story.expect(&updated, "duplicate").await;

        // Nothing comes back by itself, and the order stays as refunded.
        assert_eq!(story.balance().await, dec("666.666667"));
        assert_eq!(
            story.moves().await,
            moves(&[("purchase", "1000"), ("refund", "-333.333333")])
        );
        assert_eq!(story.order().await["status"], "partially_refunded");

        // One event for an admin, saying what to give back and how.
        let review = shop
            .app
            .list("/admin/payments/events?outcome=review", ADMIN_TOKEN)
            .await;
        assert_eq!(review.len(), 1, "{review:?}");
        let refund_id = story.refund_id();
        assert_eq!(review[0]["event_id"], format!("refund_failed:{refund_id}"));
        assert_eq!(review[0]["event_type"], "refund.failed");
        let detail = review[0]["detail"].as_str().expect("detail");
        for expected in [
            format!("refund {refund_id} of 3.33 USD"),
            "expired_or_canceled_card".to_owned(),
            "stay taken".to_owned(),
            "333.333333 credits".to_owned(),
            "POST /admin/accounts/refund-fails/credits".to_owned(),
            format!("refund-failed:{refund_id}"),
        ] {
            assert!(detail.contains(&expected), "{expected} not in {detail}");
        }
        assert!(
            review[0]["payload"]
                .as_str()
                .is_some_and(|p| p.contains(&refund_id))
        );

        // The merchant refunds again: Stripe's refunded total is back where it was, and takes
        // nothing more.
        story
            .expect(&story.charge_refunded("refunded_again", 333), "processed")
            .await;
        assert_eq!(story.balance().await, dec("666.666667"));

        // Had the buyer kept the money, the admin gives the credits back, once.
        for expected in [201, 200] {
            let response = shop
                .app
                .post(
                    "/admin/accounts/refund-fails/credits",
                    ADMIN_TOKEN,
                    &json!({"amount": "333.333333", "type": "adjustment",
                            "description": "refund failed",
                            "reference": format!("refund-failed:{refund_id}")}),
                )
                .await;
            assert_eq!(response.status(), expected);
        }
        assert_eq!(story.balance().await, dec("1000"));
        story.replays_change_nothing().await;
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_failed_refund_before_its_payment_waits_and_before_its_refund_takes_nothing() {
    run_test(async || {
        let shop = shop().await;
        // Before the payment: 409 until the session's event is in.
        let mut early = Story::started(&shop, "refund-fails-early").await;
        let failed = early.refund_failed(999);
        early.expect_retry(&failed).await;
        early.expect(&early.payment(), "processed").await;
        early.expect(&failed, "review").await;
        // Its charge.refunded (sent when the refund was issued) still counts it: once.
        early
            .expect(&early.charge_refunded("refunded", 999), "processed")
            .await;
        assert_eq!(early.balance().await, Decimal::ZERO);
        assert_eq!(
            early.moves().await,
            moves(&[("purchase", "1000"), ("refund", "-1000")])
        );
        early.replays_change_nothing().await;

        // A refund canceled before it went out is for an admin too.
        let mut canceled = Story::paid(&shop, "refund-canceled").await;
        let body = canceled.refund_updated("refund.updated", 999, "canceled", None);
        canceled.expect(&body, "review").await;
        assert_eq!(canceled.balance().await, dec("1000"));
        canceled.replays_change_nothing().await;

        let review = shop
            .app
            .list("/admin/payments/events?outcome=review", ADMIN_TOKEN)
            .await;
        assert_eq!(review.len(), 2, "{review:?}");
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Stripe disputes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_won_dispute_nets_to_nothing_however_many_events_tell_of_it() {
    run_test(async || {
        let shop = shop().await;
        let mut story = Story::paid(&shop, "dispute-won").await;
        story
            .expect(
                &story.dispute("charge.dispute.created", "needs_response"),
                "processed",
            )
            .await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        story
            .expect(
                &story.dispute("charge.dispute.funds_withdrawn", "needs_response"),
                "processed",
            )
            .await;
        story
            .expect(
                &story.dispute("charge.dispute.updated", "under_review"),
                "ignored",
            )
            .await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        assert_eq!(story.order().await["status"], "disputed");
        story
            .expect(&story.dispute("charge.dispute.closed", "won"), "processed")
            .await;
        story
            .expect(
                &story.dispute("charge.dispute.funds_reinstated", "won"),
                "processed",
            )
            .await;
        assert_eq!(story.balance().await, dec("1000"));
        assert_eq!(
            story.moves().await,
            moves(&[
                ("purchase", "1000"),
                ("adjustment", "-1000"),
                ("adjustment", "1000")
            ])
        );
        let order = story.order().await;
        assert_eq!(
            (order["status"].as_str(), order["dispute_status"].as_str()),
            (Some("paid"), Some("won"))
        );
        story.replays_change_nothing().await;
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_lost_dispute_takes_the_credits_once() {
    run_test(async || {
        let shop = shop().await;
        let mut story = Story::paid(&shop, "dispute-lost").await;
        for kind in ["charge.dispute.created", "charge.dispute.funds_withdrawn"] {
            story
                .expect(&story.dispute(kind, "needs_response"), "processed")
                .await;
        }
        story
            .expect(&story.dispute("charge.dispute.closed", "lost"), "processed")
            .await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        assert_eq!(
            story.moves().await,
            moves(&[("purchase", "1000"), ("adjustment", "-1000")])
        );
        let order = story.order().await;
        assert_eq!(
            (order["status"].as_str(), order["dispute_status"].as_str()),
            (Some("charged_back"), Some("lost"))
        );
        story.replays_change_nothing().await;
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn an_inquiry_closed_without_a_chargeback_gives_the_credits_back() {
    run_test(async || {
        let shop = shop().await;
        let mut story = Story::paid(&shop, "inquiry").await;
        story
            .expect(
                &story.dispute("charge.dispute.created", "warning_needs_response"),
                "processed",
            )
            .await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        story
            .expect(
                &story.dispute("charge.dispute.closed", "warning_closed"),
                "processed",
            )
            .await;
        assert_eq!(story.balance().await, dec("1000"));
        assert_eq!(
            story.moves().await,
            moves(&[
                ("purchase", "1000"),
                ("adjustment", "-1000"),
                ("adjustment", "1000")
            ])
        );
        assert_eq!(story.order().await["status"], "paid");
        story.replays_change_nothing().await;
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn funds_withdrawn_before_the_dispute_created_opens_it_once() {
    run_test(async || {
        let shop = shop().await;
        let mut story = Story::paid(&shop, "withdrawn-first").await;
        story
            .expect(
                &story.dispute("charge.dispute.funds_withdrawn", "needs_response"),
                "processed",
            )
            .await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        story
            .expect(
                &story.dispute("charge.dispute.created", "needs_response"),
                "processed",
            )
            .await;
        story
            .expect(&story.dispute("charge.dispute.closed", "lost"), "processed")
            .await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        assert_eq!(
            story.moves().await,
            moves(&[("purchase", "1000"), ("adjustment", "-1000")])
        );
        story.replays_change_nothing().await;
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_dispute_closed_before_it_was_opened_waits_until_it_is() {
    run_test(async || {
        let shop = shop().await;
        let mut story = Story::paid(&shop, "closed-first").await;
        let closed = story.dispute("charge.dispute.closed", "won");
        let reinstated = story.dispute("charge.dispute.funds_reinstated", "won");
        story.expect_retry(&closed).await;
        story.expect_retry(&reinstated).await;
        assert_eq!(story.balance().await, dec("1000"));

        story
            .expect(
                &story.dispute("charge.dispute.created", "needs_response"),
                "processed",
            )
            .await;
        assert_eq!(story.balance().await, Decimal::ZERO);
        // Stripe's retries now apply: the dispute closes won, once.
        story.expect(&closed, "processed").await;
        story.expect(&reinstated, "processed").await;
        assert_eq!(story.balance().await, dec("1000"));
        assert_eq!(
            story.moves().await,
            moves(&[
                ("purchase", "1000"),
                ("adjustment", "-1000"),
                ("adjustment", "1000")
            ])
        );
        story.replays_change_nothing().await;
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Lemon Squeezy and Polar
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_lemonsqueezy_partial_then_full_refund_as_documented_takes_everything_once() {
    run_test(async || {
        let (app, lemon) = lemon_shop().await;
        let user = "ls-refunds";
        let started = checkout(&app, user, json!({"package_id": "starter"})).await;
        let order_id = started["order_id"].as_str().expect("order id").to_owned();
        let custom = lemon.checkouts()[0].custom.clone();
        let paid = ls_paid("7001", 999, custom.clone());
        let (status, body) = lemonsqueezy_event(&app, &paid).await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("processed")));

        // A partial refund leaves the order `paid` (not `refunded`), as the API reference
        // shows; only `refunded_amount` tells.
        let partial = lemonsqueezy_order_event(
            "order_refunded",
            "7001",
            "paid",
            999,
            400,
            "USD",
            custom.clone(),
        );
        let full = lemonsqueezy_order_event(
            "order_refunded",
            "7001",
            "refunded",
            999,
            999,
            "USD",
            custom,
        );
        for (body, balance) in [(&partial, "599.599600"), (&full, "0")] {
            let (status, answer) = lemonsqueezy_event(&app, body).await;
            assert_eq!(
                (status, answer["outcome"].as_str()),
                (200, Some("processed"))
            );
            assert_eq!(balance_of(&app, user).await, dec(balance));
        }
        assert_eq!(order_of(&app, user, &order_id).await["status"], "refunded");
        for body in [&paid, &partial, &full] {
            let (status, answer) = lemonsqueezy_event(&app, body).await;
            assert_eq!(
                (status, answer["outcome"].as_str()),
                (200, Some("duplicate"))
            );
        }
        let entries = app.list("/api/credits/transactions", &token(user)).await;
        let refunded: Decimal = entries
            .iter()
            .filter(|e| e["type"] == "refund")
            .map(|e| credits(&e["amount"]))
            .sum();
        assert_eq!(refunded, dec("-1000"));
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_polar_partial_then_full_refund_takes_everything_once() {
    run_test(async || {
        let app = app_with(&polar_table(POLAR_SECRET, "polar")).await;
        let user = "polar-refunds";
        let metadata = json!({"account_id": user, "package_id": "starter"});
        let now = now_unix();
        let paid = polar_paid("po_seq", 999, metadata.clone());
        let refund = |status: &str, total: i64| {
            polar_order_event(
                "order.refunded",
                "po_seq",
                status,
                999,
                total,
                "usd",
                metadata.clone(),
            )
        };
        let (partial, full) = (refund("partially_refunded", 400), refund("refunded", 999));
        for (msg, body, balance) in [
            ("msg_seq_paid", &paid, "1000"),
            ("msg_seq_partial", &partial, "599.599600"),
            ("msg_seq_full", &full, "0"),
        ] {
            let (status, answer) = polar_event(&app, POLAR_SECRET, true, msg, now, body).await;
            assert_eq!(
                (status, answer["outcome"].as_str()),
                (200, Some("processed")),
                "{msg}"
            );
            assert_eq!(balance_of(&app, user).await, dec(balance), "{msg}");
        }
        for (msg, body) in [
            ("msg_seq_paid", &paid),
            ("msg_seq_partial", &partial),
            ("msg_seq_full", &full),
        ] {
            let (status, answer) = polar_event(&app, POLAR_SECRET, true, msg, now, body).await;
            assert_eq!(
                (status, answer["outcome"].as_str()),
                (200, Some("duplicate")),
                "{msg}"
            );
        }
        let orders = app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0]["status"], "refunded");
        let entries = app.list("/api/credits/transactions", &token(user)).await;
        let kinds: Vec<&str> = entries.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            kinds.iter().filter(|k| **k == "refund").count(),
            2,
            "{kinds:?}"
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        app.assert_ledger_consistent().await;
    })
    .await;
}
