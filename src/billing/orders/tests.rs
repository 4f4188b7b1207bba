use super::transitions::DAY_MS;
use super::*;
use crate::config::InvoiceSettings;

/// The names stored in the database are the names the API shows (serde's), and each reads
/// back as what was stored.
#[test]
fn stored_names_are_the_api_names_and_read_back() {
    let api_name = |value: serde_json::Value| value.as_str().map(str::to_owned);
    for status in [
        OrderStatus::Pending,
        OrderStatus::Paid,
        OrderStatus::PartiallyRefunded,
        OrderStatus::Refunded,
        OrderStatus::Disputed,
        OrderStatus::ChargedBack,
        OrderStatus::Failed,
        OrderStatus::Expired,
        OrderStatus::Review,
    ] {
        let json = serde_json::to_value(status).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(api_name(json).as_deref(), Some(status.as_str()));
        assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
    }
    for provider in [Provider::Stripe, Provider::LemonSqueezy, Provider::Polar] {
        let json = serde_json::to_value(provider).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(api_name(json).as_deref(), Some(provider.as_str()));
        assert_eq!(Provider::parse(provider.as_str()), Some(provider));
    }
    assert_eq!(OrderStatus::parse("settled"), None);
    assert_eq!(Provider::parse("paypal"), None);
}

fn order() -> Order {
    Order {
        id: "ord_1".into(),
        account: AccountId::parse("alice").unwrap_or_else(|_| panic!("account id")),
        package_id: "starter".into(),
        description: "Starter".into(),
        provider: Provider::Stripe,
        status: OrderStatus::Pending,
        checkout_id: Some("cs_1".into()),
        checkout_url: None,
        provider_order_id: Some("cs_1".into()),
        payment_ref: None,
        credits: Credits::from_micros(1_000_000_000),
        bonus_credits: Credits::ZERO,
        validity_days: Some(30),
        currency: "USD".into(),
        list_amount: 999,
        discount_amount: 0,
        amount: 999,
        paid_amount: None,
        refunded_amount: 0,
        credits_refunded: Credits::ZERO,
        dispute_id: None,
        dispute_status: None,
        dispute_credits: Credits::ZERO,
        coupon_code: None,
        invoice_id: None,
        buyer_email: None,
        buyer_name: None,
        review_reason: None,
        grant_expires_at_ms: None,
        created_at_ms: 0,
        updated_at_ms: 0,
        paid_at_ms: None,
        refunded_at_ms: None,
        closed_at_ms: None,
    }
}

fn facts(amount: i64) -> PaymentFacts {
    PaymentFacts {
        provider_order_id: "cs_1".into(),
        payment_ref: Some("pi_1".into()),
        amount,
        currency: "usd".into(),
        buyer_email: None,
        buyer_name: None,
    }
}

fn step(result: Step) -> Transition {
    match result {
        Ok(Some(transition)) => transition,
        other => panic!("expected a transition, got {other:?}"),
    }
}

fn paid() -> Order {
    step(pay(
        &order(),
        &facts(999),
        &InvoiceSettings::default(),
        1_000,
    ))
    .order
}

#[test]
fn a_payment_grants_once_with_the_package_expiry_and_an_invoice() {
    let t = step(pay(
        &order(),
        &facts(999),
        &InvoiceSettings::default(),
        1_000,
    ));
    assert_eq!(t.order.status, OrderStatus::Paid);
    assert_eq!(t.moves.len(), 1);
    assert_eq!(t.moves[0].reference, "stripe:cs_1");
    assert_eq!(t.moves[0].expires_at_ms, Some(1_000 + 30 * DAY_MS));
    assert!(t.invoice.is_some());
    // The same payment again changes nothing; another payment for it is for an admin.
    assert_eq!(
        pay(&t.order, &facts(999), &InvoiceSettings::default(), 2_000),
        Ok(None)
    );
    let mut other = facts(999);
    other.provider_order_id = "cs_2".into();
    assert!(matches!(
        pay(&t.order, &other, &InvoiceSettings::default(), 2_000),
        Err(Deferred::Review(_))
    ));
}

/// A coupon's bonus is a grant of its own, under a reference tied to its payment: two
/// orders' bonuses never share one (the ledger would apply the second as a replay), and a
/// refund finds the bonus among the grants the order created.
#[test]
fn each_payment_grants_its_bonus_under_a_reference_of_its_own() {
    let bonus_move = |session: &str| {
        let mut with_bonus = order();
        with_bonus.bonus_credits = Credits::from_micros(100_000_000);
        let mut paid_by = facts(999);
        paid_by.provider_order_id = session.into();
        let t = step(pay(
            &with_bonus,
            &paid_by,
            &InvoiceSettings::default(),
            1_000,
        ));
        let [purchase, bonus] = t.moves.as_slice() else {
            panic!("{:?}", t.moves)
        };
        assert_eq!(bonus.entry_type, EntryType::Bonus);
        assert_ne!(bonus.reference, purchase.reference);
        assert_eq!(
            t.order.granting_entries(),
            vec![
                (EntryType::Purchase, purchase.reference.clone()),
                (EntryType::Bonus, bonus.reference.clone())
            ]
        );
        bonus.reference.clone()
    };
    let (one, two) = (bonus_move("cs_1"), bonus_move("cs_2"));
    assert_ne!(one, two);
    assert!(one.starts_with("stripe:cs_1"), "{one}");
}

#[test]
fn a_wrong_amount_holds_the_order_for_review_without_credit() {
    let t = step(pay(
        &order(),
        &facts(998),
        &InvoiceSettings::default(),
        1_000,
    ));
    assert_eq!(t.order.status, OrderStatus::Review);
    assert!(t.moves.is_empty() && t.invoice.is_none());
}

#[test]
fn partial_refunds_in_any_steps_take_back_exactly_everything_in_the_end() {
    for steps in [
        vec![1, 2, 3, 999],
        vec![333, 666, 999],
        vec![998, 999],
        vec![500, 400, 999],
    ] {
        let mut current = paid();
        let mut taken = 0;
        for total in steps {
            if let Ok(Some(t)) = refund(&current, total, "USD", 5) {
                taken -= t.moves.iter().map(|m| m.amount.micros()).sum::<i64>();
                current = t.order;
            }
        }
        assert_eq!(taken, 1_000_000_000);
        assert_eq!(current.status, OrderStatus::Refunded);
    }
}

#[test]
fn refunds_and_disputes_never_take_more_than_was_granted() {
    let all = 1_000_000_000;
    let disputed = step(dispute_opened(&paid(), "dp_1", 999, "usd", 5)).order;
    assert_eq!(disputed.dispute_credits, Credits::from_micros(all));
    // The dispute took everything: a refund of a third takes nothing more, but that third
    // now belongs to the refund, so a won dispute gives back only the other two thirds.
    let refunded = step(refund(&disputed, 333, "usd", 6));
    assert!(refunded.moves.is_empty());
    assert_eq!(refunded.order.status, OrderStatus::Disputed);
    assert_eq!(
        refunded.order.credits_refunded,
        Credits::from_micros(all / 3)
    );
    let won = step(dispute_closed(&refunded.order, "dp_1", true, 7));
    assert_eq!(won.moves[0].amount, Credits::from_micros(all - all / 3));
    assert_eq!(won.order.status, OrderStatus::PartiallyRefunded);
    // Fully refunded while disputed: winning gives nothing back.
    let full = step(refund(&disputed, 999, "usd", 6)).order;
    let won = step(dispute_closed(&full, "dp_1", true, 7));
    assert!(won.moves.is_empty());
    assert_eq!(won.order.status, OrderStatus::Refunded);
}

/// A dispute over part of the payment, then a refund of part of the rest: the refund takes
/// its own share on top of what the dispute holds; winning gives back the dispute's share.
#[test]
fn a_refund_beside_a_partial_dispute_takes_its_own_share() {
    let all: i64 = 1_000_000_000;
    // Disputed: 333 of 999 paid, a third of the credits.
    let disputed = step(dispute_opened(&paid(), "dp_1", 333, "usd", 5)).order;
    assert_eq!(disputed.dispute_credits, Credits::from_micros(all / 3));
    // Refunded: 333 more, another third, which the dispute never held.
    let refunded = step(refund(&disputed, 333, "usd", 6));
    let taken: i64 = refunded.moves.iter().map(|m| -m.amount.micros()).sum();
    assert_eq!(taken, all / 3);
    assert_eq!(
        refunded.order.dispute_credits,
        Credits::from_micros(all / 3)
    );
    let won = step(dispute_closed(&refunded.order, "dp_1", true, 7));
    assert_eq!(won.moves[0].amount, Credits::from_micros(all / 3));
    assert_eq!(won.order.status, OrderStatus::PartiallyRefunded);
    // Without a refund, a won dispute leaves the order simply paid.
    let won = step(dispute_closed(&disputed, "dp_1", true, 7));
    assert_eq!(won.order.status, OrderStatus::Paid);
}

/// A checkout finished without money yet: the pending order learns the provider's ids, once;
/// a later event adds a payment reference it lacked; an order past pending stays as it is.
#[test]
fn awaiting_payment_records_the_providers_ids_on_a_pending_order_only() {
    let mut pending = order();
    pending.provider_order_id = None;
    let noted = step(awaiting_payment(&pending, "cs_1", Some("pi_1"), 5)).order;
    assert_eq!(noted.provider_order_id.as_deref(), Some("cs_1"));
    assert_eq!(noted.payment_ref.as_deref(), Some("pi_1"));
    assert_eq!(noted.status, OrderStatus::Pending);
    // The same news again, with or without the reference: nothing to change.
    assert_eq!(awaiting_payment(&noted, "cs_1", Some("pi_1"), 6), Ok(None));
    assert_eq!(awaiting_payment(&noted, "cs_1", None, 6), Ok(None));
    // Another session for the order, or the reference arriving later: recorded.
    let moved = step(awaiting_payment(&noted, "cs_2", None, 7)).order;
    assert_eq!(moved.provider_order_id.as_deref(), Some("cs_2"));
    assert_eq!(moved.payment_ref.as_deref(), Some("pi_1"));
    let mut without_ref = noted.clone();
    without_ref.payment_ref = None;
    let referenced = step(awaiting_payment(&without_ref, "cs_1", Some("pi_9"), 8)).order;
    assert_eq!(referenced.payment_ref.as_deref(), Some("pi_9"));
    // Paid already: a late "awaiting" event changes nothing.
    assert_eq!(awaiting_payment(&paid(), "cs_3", Some("pi_3"), 9), Ok(None));
}

/// An order held for review was never credited: a refund or dispute of its payment takes
/// nothing and waits for the admin, as does one of an order not paid yet.
#[test]
fn refunds_and_disputes_of_an_uncredited_order_take_nothing() {
    let in_review = step(pay(
        &order(),
        &facts(500),
        &InvoiceSettings::default(),
        1_000,
    ))
    .order;
    assert_eq!(in_review.status, OrderStatus::Review);
    assert_eq!(in_review.paid_amount, Some(500));
    assert!(matches!(
        refund(&in_review, 500, "usd", 2_000),
        Err(Deferred::Review(_))
    ));
    assert!(matches!(
        dispute_opened(&in_review, "dp_1", 500, "usd", 2_000),
        Err(Deferred::Review(_))
    ));
    let mut unpaid = order();
    unpaid.paid_amount = Some(999);
    assert!(matches!(
        refund(&unpaid, 999, "usd", 2_000),
        Err(Deferred::Retry(_))
    ));
}

/// The invoice of a payment: issued when the payment arrived (its year numbers it), and
/// the tax included in the price worked out of the total.
#[test]
fn a_payment_invoices_the_price_with_its_tax_on_the_day_it_arrived() {
    let settings = InvoiceSettings {
        tax_rate_percent: rust_decimal::Decimal::from(19),
        ..InvoiceSettings::default()
    };
    let mut priced = order();
    (priced.list_amount, priced.amount) = (11_900, 11_900);
    // 2027-03-15T12:00:00Z
    let at_ms = 1_805_112_000_000;
    let draft = step(pay(&priced, &facts(11_900), &settings, at_ms))
        .invoice
        .expect("an invoice");
    assert_eq!(draft.year, 2027);
    assert_eq!(draft.invoice.issued_at, "2027-03-15T12:00:00Z");
    let invoice = &draft.invoice;
    assert_eq!(invoice.total.to_string(), "119.00");
    assert_eq!(invoice.tax.to_string(), "19.00");
    assert_eq!(invoice.total_excluding_tax.to_string(), "100.00");
}

#[test]
fn claw_backs_draw_from_the_grants_the_payment_created_first() {
    let mut with_bonus = order();
    with_bonus.bonus_credits = Credits::from_micros(5_000_000);
    with_bonus.coupon_code = Some("MORE".into());
    let paid = step(pay(
        &with_bonus,
        &facts(999),
        &InvoiceSettings::default(),
        1_000,
    ));
    // The entries named are exactly those the payment's moves write.
    let granted: Vec<(EntryType, String)> = paid
        .moves
        .iter()
        .map(|m| (m.entry_type, m.reference.clone()))
        .collect();
    assert_eq!(paid.order.granting_entries(), granted);
    let refund = step(refund(&paid.order, 999, "usd", 2_000));
    let request = refund.moves[0].grant_request(Some(&paid.order));
    assert_eq!(request.draw_first_from, granted);
    // Without its order (a move left by a crash for an order since lost), or for a move
    // that gives credits, the usual order applies.
    assert!(
        refund.moves[0]
            .grant_request(None)
            .draw_first_from
            .is_empty()
    );
    assert!(
        paid.moves[0]
            .grant_request(Some(&paid.order))
            .draw_first_from
            .is_empty()
    );
}

#[test]
fn a_won_dispute_gives_the_credits_back_with_the_purchase_expiry_even_if_passed() {
    let mut order = paid();
    let expires = order.grant_expires_at_ms;
    assert_eq!(expires, Some(1_000 + 30 * DAY_MS));
    order = step(dispute_opened(&order, "dp_1", 999, "usd", 5)).order;
    for now in [10, 1_000 + 31 * DAY_MS] {
        let won = step(dispute_closed(&order, "dp_1", true, now));
        assert_eq!(won.moves[0].expires_at_ms, expires);
        assert_eq!(won.moves[0].amount, order.total_credits());
    }
}

#[test]
fn a_failed_refund_changes_nothing_and_tells_the_admin_what_to_give_back() {
    let refunded = step(refund(&paid(), 333, "usd", 5)).order;
    let why = match refund_failed(&refunded, "re_1", 333, "usd", "expired_or_canceled_card") {
        Err(Deferred::Review(why)) => why,
        other => panic!("{other:?}"),
    };
    for expected in [
        "refund re_1 of 3.33 USD on order ord_1 failed (expired_or_canceled_card)",
        "stay taken",
        // ⌊1000 × 333 / 999⌋ credits, to the micro-credit.
        "(333.333333 credits)",
        "POST /admin/accounts/alice/credits",
        "refund-failed:re_1",
    ] {
        assert!(why.contains(expected), "{expected} not in {why}");
    }
    // Before its payment it waits like a refund; on an order in review it stays there.
    assert!(matches!(
        refund_failed(&order(), "re_1", 333, "usd", "unknown"),
        Err(Deferred::Retry(_))
    ));
    let mut in_review = order();
    in_review.status = OrderStatus::Review;
    assert!(matches!(
        refund_failed(&in_review, "re_1", 333, "usd", "unknown"),
        Err(Deferred::Review(why)) if why.contains("held for review")
    ));
    // A re-issued refund of the same total takes nothing more.
    assert_eq!(refund(&refunded, 333, "usd", 6), Ok(None));
}

#[test]
fn events_before_the_payment_are_retried_and_closing_releases_the_coupon() {
    assert!(matches!(
        refund(&order(), 100, "usd", 1),
        Err(Deferred::Retry(_))
    ));
    assert!(matches!(
        dispute_closed(&paid(), "dp_9", false, 1),
        Err(Deferred::Retry(_))
    ));
    let mut with_coupon = order();
    with_coupon.coupon_code = Some("SAVE".into());
    let closed = step(close(&with_coupon, OrderStatus::Expired, 1));
    assert!(closed.release_coupon);
    assert_eq!(close(&paid(), OrderStatus::Expired, 1), Ok(None));
}
