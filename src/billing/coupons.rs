//! Coupons: admin-managed codes for a percentage or a fixed amount off a package's price, or
//! for bonus credits on top of it.
//!
//! A coupon is checked twice: once to quote the discount ([`evaluate`]), and again under the
//! coupon's row lock when the order is written, where its use is counted. So a coupon with
//! `max_uses = 100` is never held by a 101st order, however many buyers race for it. A use
//! is given back when its order fails or expires.

use serde::{Deserialize, Serialize};

use super::money::to_minor;
use crate::config::packages::Package;
use crate::domain::Credits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CouponKind {
    Percent,
    Fixed,
    Bonus,
}

impl CouponKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CouponKind::Percent => "percent",
            CouponKind::Fixed => "fixed",
            CouponKind::Bonus => "bonus",
        }
    }

    pub fn parse(raw: &str) -> Option<CouponKind> {
        Some(match raw {
            "percent" => CouponKind::Percent,
            "fixed" => CouponKind::Fixed,
            "bonus" => CouponKind::Bonus,
            _ => return None,
        })
    }
}

/// One row of `coupons`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coupon {
    /// Upper case.
    pub code: String,
    pub kind: CouponKind,
    /// Hundredths of a percent: 1250 is 12.5 % off.
    pub percent_off_bp: Option<i64>,
    /// Off the price, in `currency`'s minor unit.
    pub amount_off: Option<i64>,
    pub currency: Option<String>,
    pub bonus_credits: Credits,
    pub valid_from_ms: Option<i64>,
    pub valid_until_ms: Option<i64>,
    pub max_uses: Option<i64>,
    pub max_uses_per_account: Option<i64>,
    /// Applies only to packages costing at least this package's price.
    pub min_package: Option<String>,
    pub active: bool,
    /// Orders holding a use.
    pub uses: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What a coupon does to one order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discount {
    /// Off the package price, in its currency's minor unit.
    pub amount_off: i64,
    pub bonus_credits: Credits,
}

/// A code as typed by a buyer, normalized (`spring-25 ` → `SPRING-25`); `None` if it cannot
/// be a code at all.
pub fn normalize_code(raw: &str) -> Option<String> {
    let code = raw.trim().to_ascii_uppercase();
    let valid = !code.is_empty()
        && code.len() <= 64
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    valid.then_some(code)
}

/// Whether `coupon` applies to `package` for an account that already holds `account_uses`
/// of it, and what it takes off. The error says why not, for the buyer.
pub fn evaluate(
    coupon: &Coupon,
    package: &Package,
    packages: &[Package],
    account_uses: i64,
    now_ms: i64,
) -> Result<Discount, String> {
    if !coupon.active {
        return Err("this coupon is no longer active".into());
    }
    if coupon.valid_from_ms.is_some_and(|from| now_ms < from) {
        return Err("this coupon is not valid yet".into());
    }
    if coupon.valid_until_ms.is_some_and(|until| now_ms >= until) {
        return Err("this coupon has expired".into());
    }
    if coupon.max_uses.is_some_and(|max| coupon.uses >= max) {
        return Err("this coupon has been used up".into());
    }
    if coupon
        .max_uses_per_account
        .is_some_and(|max| account_uses >= max)
    {
        return Err("you have already used this coupon".into());
    }
    if let Some(min_id) = &coupon.min_package {
        let min = packages.iter().find(|p| &p.id == min_id);
        let qualifies =
            min.is_some_and(|min| min.currency == package.currency && package.price >= min.price);
        if !qualifies {
            return Err(format!(
                "this coupon applies only to packages from `{min_id}` up"
            ));
        }
    }
    let price = to_minor(package.price, &package.currency)
        .ok_or_else(|| "this package cannot be charged".to_owned())?;
    let amount_off = match coupon.kind {
        CouponKind::Percent => {
            let bp = coupon.percent_off_bp.unwrap_or(0);
            // Rounded down: the buyer never gets more off than the stated percentage.
            i64::try_from(i128::from(price) * i128::from(bp) / 10_000).unwrap_or(price)
        }
        CouponKind::Fixed => {
            if coupon.currency.as_deref() != Some(package.currency.as_str()) {
                return Err(format!(
                    "this coupon is in {} and cannot be used for a price in {}",
                    coupon.currency.as_deref().unwrap_or("?"),
                    package.currency
                ));
            }
            coupon.amount_off.unwrap_or(0).min(price)
        }
        CouponKind::Bonus => 0,
    };
    if amount_off >= price && price > 0 {
        return Err("this coupon would make the package free; ask for a bonus coupon".into());
    }
    Ok(Discount {
        amount_off,
        bonus_credits: if coupon.kind == CouponKind::Bonus {
            coupon.bonus_credits
        } else {
            Credits::ZERO
        },
    })
}

/// An admin's request for a new coupon (`POST /admin/coupons`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouponSpec {
    pub code: String,
    pub kind: CouponKind,
    /// `"12.5"` for 12.5 % off (kind `percent`).
    #[serde(default)]
    pub percent_off: Option<rust_decimal::Decimal>,
    /// `"2.00"` off, in `currency` (kind `fixed`).
    #[serde(default)]
    pub amount_off: Option<rust_decimal::Decimal>,
    #[serde(default)]
    pub currency: Option<String>,
    /// Credits added to the order (kind `bonus`).
    #[serde(default)]
    pub bonus_credits: Option<Credits>,
    /// RFC 3339.
    #[serde(default)]
    pub valid_from: Option<String>,
    #[serde(default)]
    pub valid_until: Option<String>,
    #[serde(default)]
    pub max_uses: Option<i64>,
    #[serde(default)]
    pub max_uses_per_account: Option<i64>,
    #[serde(default)]
    pub min_package: Option<String>,
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

fn rfc3339_ms(
    field: &'static str,
    raw: &Option<String>,
) -> Result<Option<i64>, (String, &'static str)> {
    raw.as_deref()
        .map(|text| {
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
                .map_err(|e| {
                    (
                        format!("{field}: `{text}` is not an RFC 3339 time: {e}"),
                        field,
                    )
                })
        })
        .transpose()
}

impl CouponSpec {
    /// Checks the request; the error names the field.
    pub fn into_coupon(
        self,
        packages: &[Package],
        now_ms: i64,
    ) -> Result<Coupon, (String, &'static str)> {
        let invalid = |message: &str, field: &'static str| Err((message.to_owned(), field));
        let Some(code) = normalize_code(&self.code) else {
            return invalid("code: 1-64 letters, digits, `-` or `_`", "code");
        };
        let mut coupon = Coupon {
            code,
            kind: self.kind,
            percent_off_bp: None,
            amount_off: None,
            currency: None,
            bonus_credits: Credits::ZERO,
            valid_from_ms: rfc3339_ms("valid_from", &self.valid_from)?,
            valid_until_ms: rfc3339_ms("valid_until", &self.valid_until)?,
            max_uses: self.max_uses,
            max_uses_per_account: self.max_uses_per_account,
            min_package: self.min_package,
            active: self.active,
            uses: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        match self.kind {
            CouponKind::Percent => {
                let percent = self.percent_off.unwrap_or_default();
                let bp = percent * rust_decimal::Decimal::ONE_HUNDRED;
                if percent <= rust_decimal::Decimal::ZERO
                    || percent > rust_decimal::Decimal::ONE_HUNDRED
                    || !bp.fract().is_zero()
                {
                    return invalid(
                        "percent_off: a percentage above 0 and at most 100, with up to 2 decimals",
                        "percent_off",
                    );
                }
                coupon.percent_off_bp = i64::try_from(bp).ok();
            }
            CouponKind::Fixed => {
                let currency = self.currency.unwrap_or_default();
                let amount = self.amount_off.unwrap_or_default();
                let minor = to_minor(amount, &currency).filter(|m| *m > 0);
                if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
                    return invalid("currency: an ISO 4217 code like USD", "currency");
                }
                let Some(minor) = minor else {
                    return invalid(
                        "amount_off: a positive amount the currency can charge",
                        "amount_off",
                    );
                };
                coupon.amount_off = Some(minor);
                coupon.currency = Some(currency);
            }
            CouponKind::Bonus => {
                let bonus = self.bonus_credits.unwrap_or(Credits::ZERO);
                if !bonus.is_positive() {
                    return invalid("bonus_credits: must be positive", "bonus_credits");
                }
                coupon.bonus_credits = bonus;
            }
        }
        if coupon.max_uses.is_some_and(|m| m < 1) {
            return invalid("max_uses: at least 1", "max_uses");
        }
        if coupon.max_uses_per_account.is_some_and(|m| m < 1) {
            return invalid("max_uses_per_account: at least 1", "max_uses_per_account");
        }
        if let (Some(from), Some(until)) = (coupon.valid_from_ms, coupon.valid_until_ms)
            && until <= from
        {
            return invalid("valid_until: must be after valid_from", "valid_until");
        }
        if let Some(min) = &coupon.min_package
            && !packages.iter().any(|p| &p.id == min)
        {
            return invalid("min_package: no package has this id", "min_package");
        }
        Ok(coupon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(id: &str, price: &str) -> Package {
        Package {
            id: id.into(),
            name: id.into(),
            credits: Credits::from_micros(1_000_000_000),
            price: price.parse().unwrap_or_default(),
            currency: "USD".into(),
            validity_days: None,
            active: true,
        }
    }

    fn coupon(kind: CouponKind) -> Coupon {
        Coupon {
            code: "SAVE".into(),
            kind,
            percent_off_bp: Some(2_500),
            amount_off: Some(500),
            currency: Some("USD".into()),
            bonus_credits: Credits::from_micros(100_000_000),
            valid_from_ms: None,
            valid_until_ms: None,
            max_uses: None,
            max_uses_per_account: None,
            min_package: None,
            active: true,
            uses: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn each_kind_takes_off_what_it_says() {
        let starter = package("starter", "9.99");
        let all = [starter.clone()];
        let percent = evaluate(&coupon(CouponKind::Percent), &starter, &all, 0, 0);
        // 25 % of 999 cents is 249.75: rounded down.
        assert_eq!(percent.map(|d| d.amount_off), Ok(249));
        let fixed = evaluate(&coupon(CouponKind::Fixed), &starter, &all, 0, 0);
        assert_eq!(fixed.map(|d| d.amount_off), Ok(500));
        let bonus = evaluate(&coupon(CouponKind::Bonus), &starter, &all, 0, 0);
        assert_eq!(
            bonus,
            Ok(Discount {
                amount_off: 0,
                bonus_credits: Credits::from_micros(100_000_000)
            })
        );
    }

    #[test]
    fn limits_windows_and_minimum_packages_refuse() {
        let starter = package("starter", "9.99");
        let pro = package("pro", "39.99");
        let all = [starter.clone(), pro.clone()];
        let mut c = coupon(CouponKind::Percent);
        c.min_package = Some("pro".into());
        assert!(evaluate(&c, &starter, &all, 0, 0).is_err());
        assert!(evaluate(&c, &pro, &all, 0, 0).is_ok());

        let mut c = coupon(CouponKind::Percent);
        c.max_uses = Some(3);
        c.uses = 3;
        assert!(evaluate(&c, &starter, &all, 0, 0).is_err_and(|e| e.contains("used up")));
        let mut c = coupon(CouponKind::Percent);
        c.max_uses_per_account = Some(1);
        assert!(evaluate(&c, &starter, &all, 1, 0).is_err());
        let mut c = coupon(CouponKind::Percent);
        c.valid_until_ms = Some(1_000);
        assert!(evaluate(&c, &starter, &all, 0, 1_000).is_err_and(|e| e.contains("expired")));
        c.valid_until_ms = None;
        c.valid_from_ms = Some(5_000);
        assert!(evaluate(&c, &starter, &all, 0, 1_000).is_err());
        c.valid_from_ms = None;
        c.active = false;
        assert!(evaluate(&c, &starter, &all, 0, 0).is_err());
    }

    #[test]
    fn a_fixed_coupon_in_another_currency_or_for_the_whole_price_is_refused() {
        let starter = package("starter", "9.99");
        let mut c = coupon(CouponKind::Fixed);
        c.currency = Some("EUR".into());
        assert!(evaluate(&c, &starter, &[], 0, 0).is_err());
        let mut c = coupon(CouponKind::Fixed);
        c.amount_off = Some(5_000);
        assert!(evaluate(&c, &starter, &[], 0, 0).is_err_and(|e| e.contains("free")));
    }

    #[test]
    fn a_coupon_applies_from_its_first_millisecond() {
        let starter = package("starter", "9.99");
        let mut c = coupon(CouponKind::Percent);
        c.valid_from_ms = Some(5_000);
        assert_eq!(
            evaluate(&c, &starter, &[], 0, 4_999),
            Err("this coupon is not valid yet".to_owned())
        );
        assert_eq!(
            evaluate(&c, &starter, &[], 0, 5_000).map(|d| d.amount_off),
            Ok(249)
        );
    }

    #[test]
    fn a_free_package_still_takes_a_bonus_coupon() {
        let trial = package("trial", "0");
        assert_eq!(
            evaluate(&coupon(CouponKind::Bonus), &trial, &[], 0, 0),
            Ok(Discount {
                amount_off: 0,
                bonus_credits: Credits::from_micros(100_000_000)
            })
        );
    }

    #[test]
    fn kinds_are_stored_under_their_api_names_and_read_back() {
        for kind in [CouponKind::Percent, CouponKind::Fixed, CouponKind::Bonus] {
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::json!(kind.as_str()))
            );
            assert_eq!(CouponKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(CouponKind::parse("free"), None);
    }

    /// What `POST /admin/coupons` makes of `body`, or the field it refuses.
    fn define(body: serde_json::Value) -> Result<Coupon, &'static str> {
        let spec: CouponSpec = serde_json::from_value(body).map_err(|_| "json")?;
        let packages = [package("starter", "9.99"), package("pro", "39.99")];
        spec.into_coupon(&packages, 1_000)
            .map_err(|(_, field)| field)
    }

    #[test]
    fn a_coupon_definition_keeps_its_terms() {
        let c = define(serde_json::json!({
            "code": "spring-25", "kind": "percent", "percent_off": "12.5",
            "valid_from": "2026-01-01T00:00:00Z", "valid_until": "2026-01-02T00:00:00.250Z",
            "max_uses": 1, "max_uses_per_account": 1, "min_package": "pro"
        }))
        .expect("valid");
        assert_eq!(c.code, "SPRING-25");
        assert_eq!(c.percent_off_bp, Some(1_250));
        assert_eq!(c.valid_from_ms, Some(1_767_225_600_000));
        assert_eq!(c.valid_until_ms, Some(1_767_312_000_250));
        assert_eq!((c.max_uses, c.max_uses_per_account), (Some(1), Some(1)));
        assert_eq!(c.min_package.as_deref(), Some("pro"));
        assert!(
            c.active,
            "a coupon is active unless the admin says otherwise"
        );
        assert_eq!((c.uses, c.created_at_ms), (0, 1_000));

        // 100 % off is a valid definition ([`evaluate`] refuses to make a package free).
        let all =
            define(serde_json::json!({"code": "ALL", "kind": "percent", "percent_off": "100"}));
        assert_eq!(all.map(|c| c.percent_off_bp), Ok(Some(10_000)));
        let fixed = define(serde_json::json!({
            "code": "F", "kind": "fixed", "amount_off": "2.50", "currency": "USD"
        }))
        .expect("valid");
        assert_eq!(
            (fixed.amount_off, fixed.currency.as_deref()),
            (Some(250), Some("USD"))
        );
        let bonus = define(serde_json::json!({
            "code": "B", "kind": "bonus", "bonus_credits": "5", "active": false
        }))
        .expect("valid");
        assert_eq!(
            (bonus.bonus_credits, bonus.active),
            (Credits::from_micros(5_000_000), false)
        );
    }

    #[test]
    fn a_coupon_definition_out_of_bounds_is_refused_with_the_field_named() {
        let bonus = |extra: serde_json::Value| {
            let mut body = serde_json::json!({"code": "B", "kind": "bonus", "bonus_credits": "5"});
            if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
                body.extend(extra.clone());
            }
            body
        };
        let percent =
            |off: &str| serde_json::json!({"code": "P", "kind": "percent", "percent_off": off});
        let fixed = |amount: &str, currency: &str| serde_json::json!({"code": "F", "kind": "fixed", "amount_off": amount, "currency": currency});
        for (body, field) in [
            (percent("0"), "percent_off"),
            (percent("100.01"), "percent_off"),
            (percent("150"), "percent_off"),
            (percent("12.345"), "percent_off"),
            (fixed("0.00", "USD"), "amount_off"),
            (fixed("1.00", "usd"), "currency"),
            (fixed("1.00", "USDT"), "currency"),
            (
                bonus(serde_json::json!({"bonus_credits": "0"})),
                "bonus_credits",
            ),
            (bonus(serde_json::json!({"max_uses": 0})), "max_uses"),
            (
                bonus(serde_json::json!({"max_uses_per_account": 0})),
                "max_uses_per_account",
            ),
            (
                bonus(serde_json::json!({
                    "valid_from": "2026-01-01T00:00:00Z", "valid_until": "2026-01-01T00:00:00Z"
                })),
                "valid_until",
            ),
            (
                bonus(serde_json::json!({"valid_from": "tomorrow"})),
                "valid_from",
            ),
            (
                bonus(serde_json::json!({"min_package": "gold"})),
                "min_package",
            ),
            (bonus(serde_json::json!({"code": "A B"})), "code"),
        ] {
            assert_eq!(define(body.clone()).err(), Some(field), "{body}");
        }
    }

    #[test]
    fn codes_are_normalized() {
        assert_eq!(normalize_code(" spring-25 ").as_deref(), Some("SPRING-25"));
        assert_eq!(normalize_code("no spaces"), None);
        assert_eq!(normalize_code(""), None);
    }
}
