//! Verified provider events: what each does to its order, and the credit moves applied to the
//! ledger afterwards (see [`super`] for the keys that make crediting happen once).

use super::checkout::new_order;
use super::*;

impl Payments {
    /// Applies one verified event. `raw` is kept when the event is left for an admin.
    pub async fn handle_event(
        &self,
        provider: Provider,
        event: ParsedEvent,
        raw: &[u8],
    ) -> Result<Handled, PaymentError> {
        if self.store().event_seen(provider, &event.event_id).await? {
            return Ok(Handled::Duplicate);
        }
        let handled = self.apply_action(provider, &event.action).await?;
        let (outcome, order_id, detail) = match &handled {
            Handled::Processed { order_id } => ("processed", Some(order_id.clone()), String::new()),
            Handled::Ignored(why) => ("ignored", None, why.clone()),
            Handled::Review(why) => ("review", None, why.clone()),
            Handled::Duplicate => return Ok(Handled::Duplicate),
        };
        if let Handled::Review(why) = &handled {
            tracing::warn!(provider = provider.as_str(), event = %event.event_id, %why,
                "payment event kept for review; nothing credited");
        }
        let record = EventRecord {
            provider,
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            outcome: outcome.to_owned(),
            order_id,
            detail,
            payload: matches!(handled, Handled::Review(_))
                .then(|| String::from_utf8_lossy(raw).into_owned()),
            received_at_ms: now_ms(),
            cursor: 0,
        };
        if !self.store().record_event(&record).await? {
            return Ok(Handled::Duplicate);
        }
        Ok(handled)
    }

    async fn apply_action(
        &self,
        provider: Provider,
        action: &Action,
    ) -> Result<Handled, PaymentError> {
        let now = now_ms();
        let (lookup, step): (&OrderLookup, Box<StepFn<'_>>) = match action {
            Action::Ignore(why) => return Ok(Handled::Ignored(why.clone())),
            Action::Paid { lookup, facts, .. } => {
                let invoices = &self.invoices;
                (
                    lookup,
                    Box::new(move |o| orders::pay(o, facts, invoices, now)),
                )
            }
            Action::AwaitingPayment {
                lookup,
                provider_order_id,
                payment_ref,
            } => (
                lookup,
                Box::new(move |o| {
                    orders::awaiting_payment(o, provider_order_id, payment_ref.as_deref(), now)
                }),
            ),
            Action::Closed { lookup, status } => {
                (lookup, Box::new(move |o| orders::close(o, *status, now)))
            }
            Action::Refunded {
                lookup,
                refunded_total,
                currency,
            } => (
                lookup,
                Box::new(move |o| orders::refund(o, *refunded_total, currency, now)),
            ),
            Action::RefundFailed {
                lookup,
                refund_id,
                amount,
                currency,
                reason,
            } => (
                lookup,
                Box::new(move |o| orders::refund_failed(o, refund_id, *amount, currency, reason)),
            ),
            Action::DisputeOpened {
                lookup,
                dispute_id,
                amount,
                currency,
            } => (
                lookup,
                Box::new(move |o| orders::dispute_opened(o, dispute_id, *amount, currency, now)),
            ),
            Action::DisputeClosed {
                lookup,
                dispute_id,
                won,
            } => (
                lookup,
                Box::new(move |o| orders::dispute_closed(o, dispute_id, *won, now)),
            ),
        };
        let mut found = self.store().find_order(provider, lookup).await?;
        if found.is_none()
            && let Action::Paid { claim, facts, .. } = action
        {
            // A payment Tollgate did not start: its order is created as it arrives.
            if let Err(why) = self.order_on_arrival(provider, claim, facts, now).await? {
                return Ok(Handled::Review(why));
            }
            found = self.store().find_order(provider, lookup).await?;
        }
        let Some(order) = found else {
            return Ok(match action {
                // The payment's own event, which creates the order, has not arrived yet:
                // providers do not deliver events in order. Answered 409 and not recorded, so
                // the provider's retry applies it once the payment is in (recorded as ignored,
                // the payment would later be credited and never clawed back).
                Action::Refunded { .. }
                | Action::RefundFailed { .. }
                | Action::DisputeOpened { .. }
                | Action::DisputeClosed { .. }
                    if lookup.order_id.is_none() && lookup.order_may_follow =>
                {
                    return Err(PaymentError::Retry(
                        "no order is paid by this payment yet; its payment event may still \
                         be on its way"
                            .into(),
                    ));
                }
                // Not an order of ours: another integration's payment on the same account.
                Action::Refunded { .. }
                | Action::RefundFailed { .. }
                | Action::DisputeOpened { .. }
                | Action::DisputeClosed { .. }
                    if lookup.order_id.is_none() =>
                {
                    Handled::Ignored("no order of Tollgate's is paid by this payment".into())
                }
                _ if lookup.order_id.is_some() => Handled::Review(format!(
                    "order {} does not exist",
                    lookup.order_id.as_deref().unwrap_or("")
                )),
                _ => Handled::Ignored("no order of Tollgate's matches this event".into()),
            });
        };
        match self.store().update_order(&order.id, &*step).await? {
            UpdateOutcome::NotFound => Err(PaymentError::NotFound(order.id)),
            UpdateOutcome::Deferred(Deferred::Retry(why)) => Err(PaymentError::Retry(why)),
            UpdateOutcome::Deferred(Deferred::Review(why)) => Ok(Handled::Review(why)),
            UpdateOutcome::Applied(order) => {
                let order = *order;
                self.apply_moves(Some(&order.id)).await?;
                if order.status == OrderStatus::Review {
                    return Ok(Handled::Review(
                        order
                            .review_reason
                            .unwrap_or_else(|| "held for review".into()),
                    ));
                }
                Ok(Handled::Processed { order_id: order.id })
            }
        }
    }

    /// Creates the order for a paid event Tollgate did not start, from the account and package
    /// its metadata names. `Err(why)` when it names no known package or account.
    async fn order_on_arrival(
        &self,
        provider: Provider,
        claim: &Claim,
        facts: &orders::PaymentFacts,
        now: i64,
    ) -> Result<Result<(), String>, PaymentError> {
        let Some(package) = claim.package_id.as_deref().and_then(|id| self.package(id)) else {
            return Ok(Err(format!(
                "payment {} names no known package ({:?})",
                facts.provider_order_id, claim.package_id
            )));
        };
        let Some(account) = claim
            .account_id
            .as_deref()
            .and_then(|id| AccountId::parse(id).ok())
        else {
            return Ok(Err(format!(
                "payment {} names no valid account_id",
                facts.provider_order_id
            )));
        };
        let Some(amount) = to_minor(package.price, &package.currency) else {
            return Ok(Err(format!("package {} cannot be charged", package.id)));
        };
        let mut order = new_order(&account, package, provider, amount, now);
        order.provider_order_id = Some(facts.provider_order_id.clone());
        match self.store().insert_order(&order).await {
            Ok(()) => Ok(Ok(())),
            // A concurrent delivery of the same payment created it first.
            Err(LedgerError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                Ok(Ok(()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Applies pending credit moves (of one order, or of all) to the ledger and the cache.
    pub async fn apply_moves(&self, order_id: Option<&str>) -> Result<usize, PaymentError> {
        let moves = self.store().pending_moves(order_id, 500).await?;
        for credit in &moves {
            // A claw-back draws from its order's own grants first, so it needs the order.
            let order = if credit.amount.is_negative() {
                self.store().order(&credit.order_id).await?
            } else {
                None
            };
            let request = credit.grant_request(order.as_ref());
            let outcome = self.ledger.grant(&request).await?;
            // The move stays pending until the cache has the new balance too: a retry then
            // replays the grant (a no-op returning the current balance) and updates the cache.
            self.cache
                .apply(&Bucket::Account(credit.account.clone()), outcome.snapshot)
                .await?;
            self.store()
                .mark_move_applied(&credit.reference, now_ms())
                .await?;
            tracing::info!(order = %credit.order_id, reference = %credit.reference,
                amount = %credit.amount, applied = outcome.applied, "order credit move applied");
        }
        Ok(moves.len())
    }
}
