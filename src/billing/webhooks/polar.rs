//! Polar events (Standard Webhooks): `order.paid` and `order.refunded`.

use serde_json::Value;

use super::{
    Action, Claim, Malformed, ParsedEvent, int_at, metadata, parse_json, required_int,
    required_str, str_at,
};
use crate::billing::orders::PaymentFacts;
use crate::billing::store::OrderLookup;

/// `event_id` is the verified `webhook-id` header.
pub fn parse(body: &[u8], event_id: &str) -> Result<ParsedEvent, Malformed> {
    let event = parse_json(body)?;
    let event_type = required_str(&event, &["type"])?;
    let data = event
        .get("data")
        .ok_or_else(|| Malformed("`data` is missing".into()))?;
    let action = match event_type.as_str() {
        "order.paid" | "order.refunded" => {
            let order_id = required_str(data, &["id"])?;
            let claim = Claim {
                account_id: metadata(data, &["metadata"], "account_id"),
                package_id: metadata(data, &["metadata"], "package_id"),
            };
            let lookup = OrderLookup {
                order_id: metadata(data, &["metadata"], "order_id"),
                provider_order_id: Some(order_id.clone()),
                payment_ref: None,
                // Paid and refunded events carry the order's metadata alike, and Polar orders
                // are always created on arrival.
                order_may_follow: claim.names_a_purchase(),
            };
            if event_type == "order.paid" {
                Action::Paid {
                    claim,
                    facts: facts(&order_id, data)?,
                    lookup,
                }
            } else {
                Action::Refunded {
                    lookup,
                    refunded_total: required_int(data, &["refunded_amount"])?,
                    currency: required_str(data, &["currency"])?,
                }
            }
        }
        other => Action::Ignore(format!("event type {other} is not handled")),
    };
    Ok(ParsedEvent {
        event_id: event_id.to_owned(),
        event_type,
        action,
    })
}

/// The amount paid for the credits: `net_amount` (after discounts, before tax).
fn facts(order_id: &str, data: &Value) -> Result<PaymentFacts, Malformed> {
    let amount = int_at(data, &["net_amount"])
        .or_else(|| int_at(data, &["amount"]))
        .ok_or_else(|| Malformed("`data.net_amount` is missing or not an integer".into()))?;
    Ok(PaymentFacts {
        provider_order_id: order_id.to_owned(),
        payment_ref: None,
        amount,
        currency: required_str(data, &["currency"])?,
        buyer_email: str_at(data, &["customer", "email"]).map(str::to_owned),
        buyer_name: str_at(data, &["customer", "name"]).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_paid_order_uses_the_net_amount_and_the_webhook_id() {
        let body = json!({"type": "order.paid", "data": {"id": "po_1", "status": "paid",
                          "net_amount": 999, "total_amount": 1189, "currency": "usd",
                          "metadata": {"account_id": "carol", "package_id": "starter"}}});
        let parsed = parse(body.to_string().as_bytes(), "msg_1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.event_id, "msg_1");
        let Action::Paid { facts, claim, .. } = parsed.action else {
            panic!()
        };
        assert_eq!(facts.amount, 999);
        assert_eq!(claim.account_id.as_deref(), Some("carol"));
    }
}
