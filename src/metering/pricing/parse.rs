//! `config/pricing.toml` to a [`PriceTable`]: strict, every error naming its line and key.

use std::ops::Range;

use globset::{Glob, GlobSetBuilder};
use rust_decimal::Decimal;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::*;

pub(super) fn utf8(bytes: Vec<u8>, origin: &str) -> Result<String, PricingError> {
    String::from_utf8(bytes).map_err(|err| PricingError::Read {
        origin: origin.to_owned(),
        cause: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
    })
}

pub(super) type Entry<'t, 'i> = (
    &'t Spanned<std::borrow::Cow<'i, str>>,
    &'t Spanned<DeValue<'i>>,
);

/// Walks the parsed document by hand (not serde) so every error can carry the exact span and
/// field path of the offending key or value.
pub(super) struct Parser<'a> {
    pub(super) text: &'a str,
    pub(super) origin: &'a str,
}

impl Parser<'_> {
    pub(super) fn parse(&self) -> Result<PriceTable, PricingError> {
        let doc = DeTable::parse(self.text).map_err(|err| PricingError::Syntax {
            origin: self.origin.to_owned(),
            line: self.line(err.span().map_or(0, |span| span.start)),
            message: err.message().to_owned(),
        })?;
        let root = doc.get_ref();
        self.check_keys(root, TOP_LEVEL_KEYS, "")?;

        let rounding = match root.get("rounding") {
            None => Rounding::default(),
            Some(value) => match self.string(value, "rounding")? {
                "exact" => Rounding::Exact,
                "ceil" => Rounding::Ceil,
                other => {
                    return Err(self.invalid(
                        value.span(),
                        "rounding",
                        format!(
                            "{other:?} is not a rounding rule (expected \"exact\" or \"ceil\")"
                        ),
                    ));
                }
            },
        };
        let default_cap = match root.get("default_max_output_tokens") {
            None => DEFAULT_MAX_OUTPUT_TOKENS,
            Some(value) => self.tokens(value, "default_max_output_tokens")?,
        };
        let default_input = match root.get("default_max_input_tokens") {
            None => DEFAULT_MAX_INPUT_TOKENS,
            Some(value) => self.tokens(value, "default_max_input_tokens")?,
        };
        let limits = (default_cap, default_input);

        let default = match root.get("default") {
            None => ModelPrice {
                max_output_tokens: default_cap,
                max_input_tokens: default_input,
                ..PriceTable::builtin_default().default
            },
            Some(value) => {
                let table = self.table(value, "default")?;
                self.check_keys(table, DEFAULT_KEYS, "default.")?;
                self.price(value.span(), table, "default.", limits)?
            }
        };

        let mut models = Vec::new();
        let mut globs = GlobSetBuilder::new();
        if let Some(value) = root.get("models") {
            let DeValue::Array(array) = value.get_ref() else {
                return Err(self.invalid(
                    value.span(),
                    "models",
                    format!(
                        "expected an array of tables ([[models]]), found a TOML {}",
                        value.get_ref().type_str()
                    ),
                ));
            };
            for (index, item) in array.iter().enumerate() {
                let path = format!("models[{index}]");
                let table = self.table(item, &path)?;
                self.check_keys(table, MODEL_KEYS, &format!("{path}."))?;
                let field = format!("{path}.match");
                let Some(pattern_value) = table.get("match") else {
                    return Err(self.invalid(
                        item.span(),
                        &field,
                        "missing (every model entry needs a name or glob)",
                    ));
                };
                let pattern = self.string(pattern_value, &field)?;
                if pattern.is_empty() {
                    return Err(self.invalid(pattern_value.span(), &field, "must not be empty"));
                }
                let glob = Glob::new(pattern).map_err(|err| {
                    self.invalid(
                        pattern_value.span(),
                        &field,
                        format!("{pattern:?} is not a valid glob: {}", err.kind()),
                    )
                })?;
                globs.add(glob);
                let mut price = self.price(item.span(), table, &format!("{path}."), limits)?;
                if let Some(cap) = table.get("max_output_tokens") {
                    price.max_output_tokens =
                        self.tokens(cap, &format!("{path}.max_output_tokens"))?;
                }
                if let Some(window) = table.get("max_input_tokens") {
                    price.max_input_tokens =
                        self.tokens(window, &format!("{path}.max_input_tokens"))?;
                }
                models.push(ModelEntry {
                    pattern: pattern.to_owned(),
                    price,
                });
            }
        }
        // Each glob compiled on its own above, so a set of them only fails on a size limit.
        let globs = globs.build().map_err(|err| {
            self.invalid(
                root.get("models").map_or(0..0, |v| v.span()),
                "models",
                err.to_string(),
            )
        })?;

        Ok(PriceTable {
            rounding,
            default,
            models,
            globs,
            version: 1,
        })
    }

    /// Reads the three price fields of `[default]` or a `[[models]]` entry.
    fn price(
        &self,
        table_span: Range<usize>,
        table: &DeTable<'_>,
        prefix: &str,
        (max_output_tokens, max_input_tokens): (u64, u64),
    ) -> Result<ModelPrice, PricingError> {
        let required = |key: &str| -> Result<Decimal, PricingError> {
            let field = format!("{prefix}{key}");
            match table.get(key) {
                Some(value) => self.decimal(value, &field),
                None => Err(self.invalid(
                    table_span.clone(),
                    &field,
                    "missing (a decimal string such as \"1\")",
                )),
            }
        };
        let prompt_per_1k = required("prompt_per_1k")?;
        let completion_per_1k = required("completion_per_1k")?;
        let cached_prompt_per_1k = table
            .get("cached_prompt_per_1k")
            .map(|value| self.decimal(value, &format!("{prefix}cached_prompt_per_1k")))
            .transpose()?;
        Ok(ModelPrice {
            prompt_per_1k,
            completion_per_1k,
            cached_prompt_per_1k,
            max_output_tokens,
            max_input_tokens,
        })
    }

    /// Rejects unknown keys, reporting the first one in file order.
    fn check_keys(
        &self,
        table: &DeTable<'_>,
        allowed: &[&str],
        prefix: &str,
    ) -> Result<(), PricingError> {
        let mut entries: Vec<Entry<'_, '_>> = table.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        match entries
            .into_iter()
            .find(|(key, _)| !allowed.contains(&key.get_ref().as_ref()))
        {
            None => Ok(()),
            Some((key, _)) => Err(self.invalid(
                key.span(),
                &format!("{prefix}{}", key.get_ref()),
                format!("unknown key (expected one of: {})", allowed.join(", ")),
            )),
        }
    }

    fn decimal(&self, value: &Spanned<DeValue<'_>>, field: &str) -> Result<Decimal, PricingError> {
        let problem = match value.get_ref() {
            DeValue::String(text) => match Decimal::from_str_exact(text.trim()) {
                Ok(price) if price < Decimal::ZERO => {
                    format!("{text:?} is negative (prices are zero or more)")
                }
                Ok(price) => return Ok(price),
                Err(_) => format!("{text:?} is not a decimal number"),
            },
            DeValue::Float(float) => {
                format!(
                    "{float} is a TOML float; write prices as strings (\"{float}\") to keep them exact"
                )
            }
            DeValue::Integer(int) => {
                format!("{int} is a TOML integer; write prices as strings (\"{int}\")")
            }
            other => format!(
                "expected a decimal string such as \"2.5\", found a TOML {}",
                other.type_str()
            ),
        };
        Err(self.invalid(value.span(), field, problem))
    }

    fn tokens(&self, value: &Spanned<DeValue<'_>>, field: &str) -> Result<u64, PricingError> {
        let problem = match value.get_ref() {
            DeValue::Integer(int) => match u64::from_str_radix(int.as_str(), int.radix()) {
                Ok(0) | Err(_) => format!("{int} is not a positive whole number of tokens"),
                Ok(tokens) => return Ok(tokens),
            },
            other => format!(
                "expected a whole number of tokens such as 4096, found a TOML {}",
                other.type_str()
            ),
        };
        Err(self.invalid(value.span(), field, problem))
    }

    fn string<'v>(
        &self,
        value: &'v Spanned<DeValue<'_>>,
        field: &str,
    ) -> Result<&'v str, PricingError> {
        match value.get_ref() {
            DeValue::String(text) => Ok(text.as_ref()),
            other => Err(self.invalid(
                value.span(),
                field,
                format!("expected a string, found a TOML {}", other.type_str()),
            )),
        }
    }

    fn table<'v, 'i>(
        &self,
        value: &'v Spanned<DeValue<'i>>,
        field: &str,
    ) -> Result<&'v DeTable<'i>, PricingError> {
        match value.get_ref() {
            DeValue::Table(table) => Ok(table),
            other => Err(self.invalid(
                value.span(),
                field,
                format!("expected a table, found a TOML {}", other.type_str()),
            )),
        }
    }

    fn invalid(&self, span: Range<usize>, field: &str, problem: impl Into<String>) -> PricingError {
        PricingError::Invalid {
            origin: self.origin.to_owned(),
            line: self.line(span.start),
            field: field.to_owned(),
            problem: problem.into(),
        }
    }

    /// 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        let bytes = self.text.as_bytes();
        let before = bytes.get(..offset).unwrap_or(bytes);
        before.iter().filter(|&&b| b == b'\n').count() + 1
    }
}
