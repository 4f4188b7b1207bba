//! Selling: a quote, a new pending order and the provider's hosted checkout for it.

use super::*;

impl Payments {
    /// A new pending order for `package_id` and the provider's hosted checkout for it.
    pub async fn create_checkout(
        &self,
        account: &AccountId,
        package_id: &str,
        provider: Option<&str>,
        coupon_code: Option<&str>,
    ) -> Result<CheckoutStarted, PaymentError> {
        let package = self.active_package(package_id)?;
        let provider = match provider {
            Some(name) => Provider::parse(name).ok_or_else(|| {
                PaymentError::invalid(
                    format!("provider `{name}` is not one of stripe, lemonsqueezy"),
                    "provider",
                )
            })?,
            None => self.default_provider.ok_or_else(|| {
                PaymentError::invalid("no payment provider is configured", "provider")
            })?,
        };
        let amount = to_minor(package.price, &package.currency).ok_or_else(|| {
            PaymentError::invalid(
                format!("package `{package_id}` has a price its currency cannot charge"),
                "package_id",
            )
        })?;
        let now = now_ms();
        let mut order = new_order(account, package, provider, amount, now);
        let quoted = match coupon_code {
            Some(code) => Some(self.quote(account, code, package_id).await?),
            None => None,
        };
        if let Some(quote) = &quoted {
            order.coupon_code = Some(quote.coupon.code.clone());
            order.discount_amount = quote.discount.amount_off;
            order.amount = amount - quote.discount.amount_off;
            order.bonus_credits = quote.discount.bonus_credits;
        }
        let request = CheckoutRequest {
            order_id: order.id.clone(),
            account_id: account.as_str().to_owned(),
            package_id: package.id.clone(),
            product_name: package.name.clone(),
            currency: package.currency.clone(),
            amount_minor: order.amount,
            success_url: self.success_url.replace("{ORDER_ID}", &order.id),
            cancel_url: self.cancel_url.replace("{ORDER_ID}", &order.id),
        };
        // Checked before the order is written, so a refused request leaves nothing behind.
        match provider {
            Provider::Stripe if self.stripe.as_ref().is_some_and(|s| s.api.is_some()) => {}
            Provider::LemonSqueezy => {
                let setup = self
                    .lemonsqueezy
                    .as_ref()
                    .filter(|l| l.api.is_some())
                    .ok_or_else(|| not_configured(provider))?;
                if !setup.config.variants.contains_key(&package.id) {
                    return Err(PaymentError::invalid(
                        format!("package `{package_id}` is not sold through Lemon Squeezy"),
                        "package_id",
                    ));
                }
            }
            _ => return Err(not_configured(provider)),
        }
        match &quoted {
            None => self.store().insert_order(&order).await?,
            Some(quote) => {
                // Re-checked under the coupon's lock, where the use is counted: the quote must
                // still hold, or the buyer is told why not.
                let expected = quote.discount;
                let check = |coupon: &Coupon, held: i64| {
                    let now = now_ms();
                    match coupons::evaluate(coupon, package, &self.packages, held, now) {
                        Ok(discount) if discount == expected => Ok(()),
                        Ok(_) => Err("this coupon changed; apply it again".to_owned()),
                        Err(why) => Err(why),
                    }
                };
                if let Err(why) = self
                    .store()
                    .insert_order_with_coupon(&order, &check)
                    .await?
                {
                    return Err(PaymentError::invalid(why, "coupon_code"));
                }
            }
        }
        let created = match self.call_provider(provider, &request, &package.id).await {
            Ok(created) => created,
            Err(error) => {
                // The buyer can start again; this order will never be paid.
                let failed = self
                    .store()
                    .update_order(&order.id, &|o| {
                        orders::close(o, OrderStatus::Failed, now_ms())
                    })
                    .await;
                if let Err(store_error) = failed {
                    tracing::warn!(%store_error, order = %order.id, "cannot close a failed order");
                }
                return Err(error.into());
            }
        };
        let (checkout_id, url) = (created.checkout_id, created.url);
        let outcome = self
            .store()
            .update_order(&order.id, &|o| {
                let mut next = o.clone();
                next.checkout_id = Some(checkout_id.clone());
                next.checkout_url = Some(url.clone());
                if provider == Provider::Stripe && next.provider_order_id.is_none() {
                    // A Stripe session is the payment's natural key.
                    next.provider_order_id = Some(checkout_id.clone());
                }
                Ok(Some(orders::Transition::order_only(next)))
            })
            .await?;
        let order = match outcome {
            UpdateOutcome::Applied(order) => *order,
            _ => order,
        };
        Ok(CheckoutStarted {
            order,
            checkout_url: url,
        })
    }

    /// What `code` takes off `package_id` for this account, without holding a use of it.
    pub async fn quote(
        &self,
        account: &AccountId,
        code: &str,
        package_id: &str,
    ) -> Result<Quote, PaymentError> {
        let package = self.active_package(package_id)?;
        let unknown = || PaymentError::invalid("no such coupon", "coupon_code");
        let code = coupons::normalize_code(code).ok_or_else(unknown)?;
        let coupon = self.store().coupon(&code).await?.ok_or_else(unknown)?;
        let held = self.store().coupon_uses_by(&code, account).await?;
        let discount = coupons::evaluate(&coupon, package, &self.packages, held, now_ms())
            .map_err(|why| PaymentError::invalid(why, "coupon_code"))?;
        let price = to_minor(package.price, &package.currency).unwrap_or(0);
        Ok(Quote {
            coupon,
            package: package.clone(),
            discount,
            price,
        })
    }

    async fn call_provider(
        &self,
        provider: Provider,
        request: &CheckoutRequest,
        package_id: &str,
    ) -> Result<crate::billing::provider::CheckoutCreated, ProviderError> {
        match provider {
            Provider::Stripe => {
                let api = self.stripe.as_ref().and_then(|s| s.api.as_ref());
                let api = api.ok_or_else(|| ProviderError::Config("stripe".into()))?;
                api.create_checkout(request).await
            }
            Provider::LemonSqueezy => {
                let setup = self.lemonsqueezy.as_ref();
                let (api, variant) = setup
                    .and_then(|l| Some((l.api.as_ref()?, l.config.variants.get(package_id)?)))
                    .ok_or_else(|| ProviderError::Config("lemonsqueezy".into()))?;
                api.create_checkout(request, variant).await
            }
            Provider::Polar => Err(ProviderError::Config(
                "Polar checkouts are created in Polar".into(),
            )),
        }
    }
}

fn not_configured(provider: Provider) -> PaymentError {
    PaymentError::invalid(
        format!("checkout through {} is not configured", provider.as_str()),
        "provider",
    )
}

pub(super) fn new_order(
    account: &AccountId,
    package: &Package,
    provider: Provider,
    amount: i64,
    now: i64,
) -> Order {
    Order {
        id: format!("ord_{}", uuid::Uuid::new_v4().simple()),
        account: account.clone(),
        package_id: package.id.clone(),
        description: package.name.clone(),
        provider,
        status: OrderStatus::Pending,
        checkout_id: None,
        checkout_url: None,
        provider_order_id: None,
        payment_ref: None,
        credits: package.credits,
        bonus_credits: crate::domain::Credits::ZERO,
        validity_days: package.validity_days,
        currency: package.currency.clone(),
        list_amount: amount,
        discount_amount: 0,
        amount,
        paid_amount: None,
        refunded_amount: 0,
        credits_refunded: crate::domain::Credits::ZERO,
        dispute_id: None,
        dispute_status: None,
        dispute_credits: crate::domain::Credits::ZERO,
        coupon_code: None,
        invoice_id: None,
        buyer_email: None,
        buyer_name: None,
        review_reason: None,
        grant_expires_at_ms: None,
        created_at_ms: now,
        updated_at_ms: now,
        paid_at_ms: None,
        refunded_at_ms: None,
        closed_at_ms: None,
    }
}
