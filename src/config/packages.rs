//! Credit packages: what a buyer can purchase, configured as `[[packages]]` in tollgate.toml.
//!
//! Prices are exact decimals in the package's currency (never floats); credits are exact
//! credits. A package can be retired with `active = false` without forgetting its id, so orders
//! that name it stay readable.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::Credits;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub id: String,
    pub name: String,
    pub credits: Credits,
    /// In `currency`, e.g. `"9.99"`.
    pub price: Decimal,
    /// ISO 4217 code, upper case (`USD`).
    pub currency: String,
    /// Credits bought expire this many days after purchase; absent never expire.
    #[serde(default)]
    pub validity_days: Option<u32>,
    #[serde(default = "active_by_default")]
    pub active: bool,
}

fn active_by_default() -> bool {
    true
}

/// Checks a package list; an error names the field (`packages[1].price: …`).
pub fn validate(packages: &[Package]) -> Result<(), String> {
    let mut ids = std::collections::HashSet::new();
    for (i, package) in packages.iter().enumerate() {
        let field = |name: &str| format!("packages[{i}].{name}");
        let id_ok = !package.id.is_empty()
            && package.id.len() <= 64
            && package
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !id_ok {
            return Err(format!(
                "{}: `{}` must be 1-64 letters, digits, `-` or `_`",
                field("id"),
                package.id
            ));
        }
        if !ids.insert(package.id.as_str()) {
            return Err(format!("{}: `{}` is used twice", field("id"), package.id));
        }
        if package.name.trim().is_empty() {
            return Err(format!("{}: must not be empty", field("name")));
        }
        if !package.credits.is_positive() {
            return Err(format!("{}: must be positive", field("credits")));
        }
        if package.price.is_sign_negative() {
            return Err(format!("{}: must not be negative", field("price")));
        }
        if package.price.scale() > 2 {
            return Err(format!(
                "{}: `{}` has more than 2 decimal places",
                field("price"),
                package.price
            ));
        }
        let currency_ok =
            package.currency.len() == 3 && package.currency.chars().all(|c| c.is_ascii_uppercase());
        if !currency_ok {
            return Err(format!(
                "{}: `{}` is not an ISO 4217 code like USD",
                field("currency"),
                package.currency
            ));
        }
        if package.validity_days == Some(0) {
            return Err(format!(
                "{}: must be at least 1 (or absent for no expiry)",
                field("validity_days")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(id: &str) -> Package {
        Package {
            id: id.into(),
            name: "Starter".into(),
            credits: "1000".parse().expect("credits"),
            price: "9.99".parse().expect("price"),
            currency: "USD".into(),
            validity_days: None,
            active: true,
        }
    }

    #[test]
    fn a_sound_list_passes_and_each_mistake_names_its_field() {
        assert_eq!(validate(&[package("starter"), package("pro")]), Ok(()));
        type Mutation = Box<dyn Fn(&mut Package)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|p| p.id = "has space".into()), "packages[1].id"),
            (Box::new(|p| p.id = "starter".into()), "used twice"),
            (Box::new(|p| p.name = " ".into()), "packages[1].name"),
            (
                Box::new(|p| p.credits = Credits::ZERO),
                "packages[1].credits",
            ),
            (
                Box::new(|p| p.price = "-1".parse().expect("price")),
                "packages[1].price",
            ),
            (
                Box::new(|p| p.price = "9.999".parse().expect("price")),
                "2 decimal places",
            ),
            (
                Box::new(|p| p.currency = "usd".into()),
                "packages[1].currency",
            ),
            (
                Box::new(|p| p.validity_days = Some(0)),
                "packages[1].validity_days",
            ),
        ];
        for (mutate, expected) in cases {
            let mut second = package("pro");
            mutate(&mut second);
            let error = validate(&[package("starter"), second]).expect_err("invalid");
            assert!(
                error.contains(expected),
                "{error} should mention {expected}"
            );
        }
    }
}
