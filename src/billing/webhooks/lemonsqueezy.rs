//! Lemon Squeezy events: `order_created` and `order_refunded`.
//!
//! The scheme signs the body only, with no timestamp or event id: an event is identified by
//! its name and the order id (plus the refunded total for refunds, which grow).

use serde_json::Value;

use super::{
    Action, Claim, Malformed, ParsedEvent, int_at, metadata, parse_json, required_int,
    required_str, str_at,
};
use crate::billing::orders::{OrderStatus, PaymentFacts};
use crate::billing::store::OrderLookup;

pub fn parse(body: &[u8]) -> Result<ParsedEvent, Malformed> {
    let event = parse_json(body)?;
    let event_type = required_str(&event, &["meta", "event_name"])?;
    let data = event
        .get("data")
        .ok_or_else(|| Malformed("`data` is missing".into()))?;
    let order_id = required_str(data, &["id"])?;
    let attributes = data
        .get("attributes")
        .ok_or_else(|| Malformed("`data.attributes` is missing".into()))?;
    let lookup = OrderLookup {
        order_id: metadata(&event, &["meta", "custom_data"], "order_id"),
        provider_order_id: Some(order_id.clone()),
        payment_ref: None,
        // Every order event carries the checkout's custom data: one naming an account and a
        // package is a payment that creates its order on arrival.
        order_may_follow: claim(&event).names_a_purchase(),
    };
    let mut event_id = format!("{event_type}:{order_id}");
    let action = match event_type.as_str() {
        "order_created" => {
            let status = required_str(attributes, &["status"])?;
            match status.as_str() {
                "paid" => Action::Paid {
                    claim: claim(&event),
                    facts: facts(&order_id, attributes)?,
                    lookup,
                },
                "pending" => Action::AwaitingPayment {
                    lookup,
                    provider_order_id: order_id,
                    payment_ref: None,
                },
                "failed" => Action::Closed {
                    lookup,
                    status: OrderStatus::Failed,
                },
                other => Action::Ignore(format!("order status {other}")),
            }
        }
        "order_refunded" => {
            let refunded_total = match int_at(attributes, &["refunded_amount"]) {
                Some(amount) => amount,
                // Older payloads only flag a full refund.
                None => required_int(attributes, &["total"])?,
            };
            event_id = format!("{event_id}:{refunded_total}");
            Action::Refunded {
                lookup,
                refunded_total: without_tax(refunded_total, attributes),
                currency: required_str(attributes, &["currency"])?,
            }
        }
        other => Action::Ignore(format!("event {other} is not handled")),
    };
    Ok(ParsedEvent {
        event_id,
        event_type,
        action,
    })
}

fn claim(event: &Value) -> Claim {
    Claim {
        account_id: metadata(event, &["meta", "custom_data"], "account_id"),
        package_id: metadata(event, &["meta", "custom_data"], "package_id"),
    }
}

/// `refunded` (out of the order's `total`, tax included: Lemon Squeezy refunds the tax with the
/// price) in the units of the order's amount, which excludes the tax: ⌊refunded × (total − tax)
/// / total⌋. A full refund is exactly the amount paid for the credits; a partial one rounds
/// down, in the buyer's favour.
fn without_tax(refunded: i64, attributes: &Value) -> i64 {
    let total = int_at(attributes, &["total"]).unwrap_or(0);
    let tax = int_at(attributes, &["tax"]).unwrap_or(0);
    if tax <= 0 || total <= tax {
        return refunded;
    }
    let net = i128::from(refunded) * i128::from(total - tax) / i128::from(total);
    i64::try_from(net).unwrap_or(refunded)
}

/// The amount paid for the credits: the total less any tax Lemon Squeezy added.
fn facts(order_id: &str, attributes: &Value) -> Result<PaymentFacts, Malformed> {
    let total = required_int(attributes, &["total"])?;
    let tax = int_at(attributes, &["tax"]).unwrap_or(0);
    Ok(PaymentFacts {
        provider_order_id: order_id.to_owned(),
        payment_ref: None,
        amount: total - tax,
        currency: required_str(attributes, &["currency"])?,
        buyer_email: str_at(attributes, &["user_email"]).map(str::to_owned),
        buyer_name: str_at(attributes, &["user_name"]).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn refund_events_are_identified_by_their_cumulative_total() {
        let body = json!({"meta": {"event_name": "order_refunded", "custom_data": {"order_id": "ord_1"}},
                          "data": {"id": "42", "attributes": {"refunded_amount": 300, "currency": "USD", "total": 999}}});
        let parsed = parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.event_id, "order_refunded:42:300");
        assert!(matches!(
            parsed.action,
            Action::Refunded {
                refunded_total: 300,
                ..
            }
        ));
    }

    /// The tax comes back with the price, and the order's amount is the price without it: a
    /// refund counts against the order in the same units, so a partial refund takes only its
    /// share of the credits.
    #[test]
    fn a_refund_of_a_taxed_order_is_counted_without_its_tax() {
        let refunded = |refunded_amount: i64| {
            let body = json!({"meta": {"event_name": "order_refunded", "custom_data": {"order_id": "ord_1"}},
                              "data": {"id": "42", "attributes": {"refunded_amount": refunded_amount,
                                       "currency": "USD", "total": 1189, "subtotal": 999, "tax": 190}}});
            let parsed = parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                parsed.event_id,
                format!("order_refunded:42:{refunded_amount}")
            );
            match parsed.action {
                Action::Refunded { refunded_total, .. } => refunded_total,
                other => panic!("{other:?}"),
            }
        };
        // 400 of 1189 paid is 400 × 999 / 1189 = 336.09… of the 999 the credits cost.
        assert_eq!(refunded(400), 336);
        assert_eq!(refunded(1189), 999);
        assert_eq!(refunded(0), 0);
    }

    #[test]
    fn a_refund_naming_an_account_and_a_package_may_precede_its_order() {
        let refund = |custom: Value| {
            let body = json!({"meta": {"event_name": "order_refunded", "custom_data": custom},
                              "data": {"id": "42", "attributes": {"refunded_amount": 999, "currency": "USD", "total": 999}}});
            match parse(body.to_string().as_bytes()) {
                Ok(ParsedEvent {
                    action: Action::Refunded { lookup, .. },
                    ..
                }) => lookup.order_may_follow,
                other => panic!("{other:?}"),
            }
        };
        assert!(refund(
            json!({"account_id": "bob", "package_id": "starter"})
        ));
        assert!(!refund(json!({"account_id": "bob"})));
        assert!(!refund(json!({})));
    }

    #[test]
    fn a_paid_order_carries_the_custom_data() {
        let body = json!({"meta": {"event_name": "order_created",
                                   "custom_data": {"order_id": "ord_1", "account_id": "bob", "package_id": "starter"}},
                          "data": {"id": "42", "attributes": {"status": "paid", "total": 999, "currency": "USD"}}});
        let parsed = parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.event_id, "order_created:42");
        let Action::Paid { claim, facts, .. } = parsed.action else {
            panic!()
        };
        assert_eq!(claim.account_id.as_deref(), Some("bob"));
        assert_eq!(facts.amount, 999);
    }
}
