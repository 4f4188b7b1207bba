//! Stripe events: Checkout Sessions, refunds and disputes.
//!
//! A refund reaches Tollgate twice: as the charge's cumulative `amount_refunded`
//! (`charge.refunded`), the only event that takes credits back, and as a `refund` object
//! (`refund.*`, `charge.refund.updated`) whose status says whether it went through. Only a
//! refund that failed or was canceled matters there: it is held for review.
//!
//! A dispute opens with `charge.dispute.created` or `charge.dispute.funds_withdrawn`,
//! whichever arrives first (the other finds the same dispute id and changes nothing), and
//! closes with `charge.dispute.closed` or `charge.dispute.funds_reinstated` (a won one).

use serde_json::Value;

use super::{
    Action, Claim, Malformed, ParsedEvent, int_at, metadata, parse_json, required_int,
    required_str, str_at,
};
use crate::billing::orders::{OrderStatus, PaymentFacts};
use crate::billing::store::OrderLookup;

pub fn parse(body: &[u8]) -> Result<ParsedEvent, Malformed> {
    let event = parse_json(body)?;
    let event_id = required_str(&event, &["id"])?;
    let event_type = required_str(&event, &["type"])?;
    let object = event
        .pointer("/data/object")
        .ok_or_else(|| Malformed("`data.object` is missing".into()))?;
    let action = match event_type.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            session_paid(object, event_type == "checkout.session.completed")?
        }
        "checkout.session.async_payment_failed" => Action::Closed {
            lookup: session_lookup(object)?,
            status: OrderStatus::Failed,
        },
        "checkout.session.expired" => Action::Closed {
            lookup: session_lookup(object)?,
            status: OrderStatus::Expired,
        },
        "charge.refunded" => Action::Refunded {
            lookup: charge_lookup(object),
            refunded_total: required_int(object, &["amount_refunded"])?,
            currency: required_str(object, &["currency"])?,
        },
        "refund.created" | "refund.updated" | "refund.failed" | "charge.refund.updated" => {
            let action = refund_changed(object)?;
            if let Action::RefundFailed { refund_id, .. } = &action {
                // Stripe tells of one failure up to three times (`refund.updated`,
                // `refund.failed`, `charge.refund.updated`): keyed by the refund, the first
                // is held for review and the others are duplicates.
                return Ok(ParsedEvent {
                    event_id: format!("refund_failed:{refund_id}"),
                    event_type,
                    action,
                });
            }
            action
        }
        "charge.dispute.created" | "charge.dispute.funds_withdrawn" => Action::DisputeOpened {
            lookup: charge_lookup(object),
            dispute_id: required_str(object, &["id"])?,
            amount: required_int(object, &["amount"])?,
            currency: required_str(object, &["currency"])?,
        },
        // Stripe returns the disputed funds when the merchant wins.
        "charge.dispute.funds_reinstated" => Action::DisputeClosed {
            lookup: charge_lookup(object),
            dispute_id: required_str(object, &["id"])?,
            won: true,
        },
        "charge.dispute.closed" => {
            let status = required_str(object, &["status"])?;
            let won = match status.as_str() {
                "won" | "warning_closed" => true,
                "lost" => false,
                other => {
                    return Ok(ParsedEvent {
                        event_id,
                        event_type,
                        action: Action::Ignore(format!("dispute closed with status {other}")),
                    });
                }
            };
            Action::DisputeClosed {
                lookup: charge_lookup(object),
                dispute_id: required_str(object, &["id"])?,
                won,
            }
        }
        other => Action::Ignore(format!("event type {other} is not handled")),
    };
    Ok(ParsedEvent {
        event_id,
        event_type,
        action,
    })
}

/// A session's order: its metadata, else `client_reference_id` (`order:account`), else the
/// session id Tollgate stored when it created the session.
fn session_lookup(session: &Value) -> Result<OrderLookup, Malformed> {
    let order_id = metadata(session, &["metadata"], "order_id").or_else(|| {
        str_at(session, &["client_reference_id"])
            .and_then(|r| r.split_once(':').map(|(order, _)| order.to_owned()))
    });
    Ok(OrderLookup {
        order_id,
        provider_order_id: Some(required_str(session, &["id"])?),
        payment_ref: id_or_object(session, "payment_intent"),
        order_may_follow: false,
    })
}

fn session_paid(session: &Value, completed: bool) -> Result<Action, Malformed> {
    let lookup = session_lookup(session)?;
    let session_id = required_str(session, &["id"])?;
    let payment_status = required_str(session, &["payment_status"])?;
    if completed && payment_status == "unpaid" {
        return Ok(Action::AwaitingPayment {
            lookup,
            provider_order_id: session_id,
            payment_ref: id_or_object(session, "payment_intent"),
        });
    }
    if payment_status != "paid" && payment_status != "no_payment_required" {
        return Ok(Action::Ignore(format!(
            "payment_status is {payment_status}"
        )));
    }
    Ok(Action::Paid {
        claim: Claim {
            account_id: metadata(session, &["metadata"], "account_id"),
            package_id: metadata(session, &["metadata"], "package_id"),
        },
        facts: PaymentFacts {
            provider_order_id: session_id,
            payment_ref: id_or_object(session, "payment_intent"),
            amount: int_at(session, &["amount_total"]).unwrap_or(0),
            currency: required_str(session, &["currency"])?,
            buyer_email: str_at(session, &["customer_details", "email"]).map(str::to_owned),
            buyer_name: str_at(session, &["customer_details", "name"]).map(str::to_owned),
        },
        lookup,
    })
}

/// A `refund` object: failed or canceled is for an admin, any other status is news that
/// `charge.refunded` already carried.
fn refund_changed(refund: &Value) -> Result<Action, Malformed> {
    let refund_id = required_str(refund, &["id"])?;
    // Nullable in Stripe's spec: a refund without a status has not failed.
    let status = str_at(refund, &["status"]).unwrap_or("without a status");
    if status != "failed" && status != "canceled" {
        return Ok(Action::Ignore(format!(
            "refund {refund_id} is {status}; charge.refunded carries the refunded total"
        )));
    }
    Ok(Action::RefundFailed {
        lookup: charge_lookup(refund),
        amount: required_int(refund, &["amount"])?,
        currency: required_str(refund, &["currency"])?,
        reason: str_at(refund, &["failure_reason"])
            .unwrap_or(status)
            .to_owned(),
        refund_id,
    })
}

/// A charge's, refund's or dispute's order: by metadata if present, else by its
/// PaymentIntent.
fn charge_lookup(object: &Value) -> OrderLookup {
    let payment_ref = id_or_object(object, "payment_intent").filter(|id| !id.is_empty());
    OrderLookup {
        order_id: metadata(object, &["metadata"], "order_id"),
        provider_order_id: None,
        // Charges and disputes do not carry the Checkout Session's metadata, so nothing here
        // tells a Payment Link's payment (its order is created when the session event
        // arrives) from another integration's: any PaymentIntent's may yet be Tollgate's.
        order_may_follow: payment_ref.is_some(),
        payment_ref,
    }
}

/// A field that is an id, or the expanded object carrying it.
fn id_or_object(object: &Value, field: &str) -> Option<String> {
    match object.get(field)? {
        Value::String(id) => Some(id.clone()),
        Value::Object(expanded) => expanded.get("id")?.as_str().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(kind: &str, object: Value) -> Vec<u8> {
        json!({"id": "evt_1", "object": "event", "type": kind, "data": {"object": object}})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_paid_session_carries_the_order_and_the_amount() {
        let body = event(
            "checkout.session.completed",
            json!({"id": "cs_1", "payment_status": "paid", "amount_total": 999,
                   "currency": "usd", "payment_intent": "pi_1",
                   "metadata": {"order_id": "ord_1", "account_id": "alice", "package_id": "starter"},
                   "customer_details": {"email": "a@example.com", "name": "Alice"}}),
        );
        let parsed = parse(&body).unwrap_or_else(|e| panic!("{e}"));
        let Action::Paid {
            lookup,
            claim,
            facts,
        } = parsed.action
        else {
            panic!("{:?}", parsed.action)
        };
        assert_eq!(lookup.order_id.as_deref(), Some("ord_1"));
        assert_eq!(claim.package_id.as_deref(), Some("starter"));
        assert_eq!((facts.amount, facts.currency.as_str()), (999, "usd"));
        assert_eq!(facts.payment_ref.as_deref(), Some("pi_1"));
    }

    #[test]
    fn an_unpaid_completed_session_waits_for_the_money() {
        let body = event(
            "checkout.session.completed",
            json!({"id": "cs_1", "payment_status": "unpaid", "currency": "usd",
                   "client_reference_id": "ord_9:alice"}),
        );
        let parsed = parse(&body).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(&parsed.action, Action::AwaitingPayment { lookup, .. }
                if lookup.order_id.as_deref() == Some("ord_9")),
            "{:?}",
            parsed.action
        );
    }

    #[test]
    fn a_refund_of_a_payment_intent_may_precede_its_order() {
        let refund = |payment_intent: Value| {
            let body = event(
                "charge.refunded",
                json!({"id": "ch_1", "amount_refunded": 999, "currency": "usd",
                       "payment_intent": payment_intent, "metadata": {}}),
            );
            match parse(&body) {
                Ok(ParsedEvent {
                    action: Action::Refunded { lookup, .. },
                    ..
                }) => lookup,
                other => panic!("{other:?}"),
            }
        };
        let lookup = refund(json!("pi_1"));
        assert!(lookup.order_may_follow);
        assert_eq!(lookup.payment_ref.as_deref(), Some("pi_1"));
        // A charge made without a PaymentIntent never came from a Checkout Session.
        assert!(!refund(Value::Null).order_may_follow);
        assert!(!refund(json!("")).order_may_follow);
    }

    fn refund(status: &str, failure_reason: Value) -> Value {
        json!({"id": "re_1", "object": "refund", "amount": 333, "currency": "usd",
               "charge": "ch_1", "payment_intent": "pi_1", "status": status,
               "failure_reason": failure_reason, "metadata": {}})
    }

    #[test]
    fn a_failed_or_canceled_refund_is_keyed_by_the_refund_whichever_event_tells_of_it() {
        for kind in [
            "refund.failed",
            "refund.updated",
            "charge.refund.updated",
            "refund.created",
        ] {
            for (status, reason, expected) in [
                (
                    "failed",
                    json!("expired_or_canceled_card"),
                    "expired_or_canceled_card",
                ),
                ("canceled", Value::Null, "canceled"),
            ] {
                let parsed = parse(&event(kind, refund(status, reason)))
                    .unwrap_or_else(|e| panic!("{kind}: {e}"));
                assert_eq!(parsed.event_id, "refund_failed:re_1", "{kind}");
                assert_eq!(parsed.event_type, kind);
                match parsed.action {
                    Action::RefundFailed {
                        lookup,
                        refund_id,
                        amount,
                        currency,
                        reason,
                    } => {
                        assert_eq!(refund_id, "re_1");
                        assert_eq!((amount, currency.as_str()), (333, "usd"));
                        assert_eq!(reason, expected);
                        assert_eq!(lookup.payment_ref.as_deref(), Some("pi_1"));
                        assert!(lookup.order_may_follow);
                    }
                    other => panic!("{kind} {status}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_refund_on_its_way_or_through_is_left_to_charge_refunded() {
        let mut no_status = refund("failed", Value::Null);
        no_status["status"] = Value::Null;
        for object in [
            refund("pending", Value::Null),
            refund("requires_action", Value::Null),
            refund("succeeded", Value::Null),
            no_status,
        ] {
            let parsed = parse(&event("charge.refund.updated", object.clone()))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(parsed.event_id, "evt_1");
            assert!(
                matches!(&parsed.action, Action::Ignore(why) if why.contains("charge.refunded")),
                "{object}: {:?}",
                parsed.action
            );
        }
        let no_id = json!({"status": "failed", "amount": 333, "currency": "usd"});
        assert!(parse(&event("refund.failed", no_id)).is_err());
    }

    #[test]
    fn funds_withdrawn_opens_and_funds_reinstated_wins_the_same_dispute() {
        let dispute = json!({"id": "dp_1", "object": "dispute", "amount": 999, "currency": "usd",
                             "charge": "ch_1", "payment_intent": "pi_1", "status": "needs_response",
                             "metadata": {}});
        let opened = |kind: &str| match parse(&event(kind, dispute.clone())) {
            Ok(ParsedEvent {
                action:
                    Action::DisputeOpened {
                        dispute_id, amount, ..
                    },
                ..
            }) => (dispute_id, amount),
            other => panic!("{kind}: {other:?}"),
        };
        assert_eq!(opened("charge.dispute.created"), ("dp_1".to_owned(), 999));
        assert_eq!(
            opened("charge.dispute.funds_withdrawn"),
            ("dp_1".to_owned(), 999)
        );
        let reinstated = parse(&event("charge.dispute.funds_reinstated", dispute.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(&reinstated.action, Action::DisputeClosed { dispute_id, won: true, .. }
                if dispute_id == "dp_1"),
            "{:?}",
            reinstated.action
        );
        let updated =
            parse(&event("charge.dispute.updated", dispute)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(updated.action, Action::Ignore(_)));
        // An inquiry closed without a chargeback counts as won.
        let closed = json!({"id": "dp_2", "amount": 999, "currency": "usd",
                            "payment_intent": "pi_1", "status": "warning_closed"});
        let parsed =
            parse(&event("charge.dispute.closed", closed)).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            parsed.action,
            Action::DisputeClosed { won: true, .. }
        ));
    }

    #[test]
    fn unknown_types_are_ignored_and_bad_shapes_are_malformed() {
        let parsed = parse(&event("customer.created", json!({"id": "cus_1"})))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(parsed.action, Action::Ignore(_)));
        assert!(parse(b"not json").is_err());
        assert!(parse(&event("charge.refunded", json!({"id": "ch_1"}))).is_err());
    }
}
