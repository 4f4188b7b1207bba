//! Prices per model and the cost of a request in credits (this file); the parser of
//! `config/pricing.toml` ([`parse`]); the table in force and its hot reload ([`watcher`]).
//!
//! Money stays exact: prices are `Decimal` parsed from TOML strings, and a request's cost is
//! rounded once, up, into micro-credits (docs/architecture.md, "Prices"; I3). The watcher polls
//! the file instead of using inotify on purpose: polling also sees atomic renames, bind-mounted
//! config maps and edits on network file systems, which inotify can miss.

mod parse;
#[cfg(test)]
mod tests;
mod watcher;

use std::path::Path;

use globset::GlobSet;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::domain::{Credits, MICROS_PER_CREDIT, TokenUsage};
use parse::*;
pub use watcher::PricingHandle;

/// Output cap used for estimates when neither the request nor the model entry sets one.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 4096;
/// Input reserved for a request whose input cannot be sized from its body (images, files,
/// earlier responses) when the model entry sets no `max_input_tokens`.
pub const DEFAULT_MAX_INPUT_TOKENS: u64 = 128_000;

/// Charged instead of overflowing: no account can afford it, so the reservation fails cleanly.
const SATURATED: Credits = Credits::from_micros(i64::MAX);

const TOP_LEVEL_KEYS: &[&str] = &[
    "rounding",
    "default_max_output_tokens",
    "default_max_input_tokens",
    "default",
    "models",
];
const DEFAULT_KEYS: &[&str] = &["prompt_per_1k", "completion_per_1k", "cached_prompt_per_1k"];
const MODEL_KEYS: &[&str] = &[
    "match",
    "prompt_per_1k",
    "completion_per_1k",
    "cached_prompt_per_1k",
    "max_output_tokens",
    "max_input_tokens",
];

/// How a request's exact cost becomes a ledger amount. Both rules round up, so nobody is
/// undercharged by truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rounding {
    /// Up to the ledger's scale (1 micro-credit).
    #[default]
    Exact,
    /// Up to whole credits.
    Ceil,
}

/// The price of one model (or of the default), in credits per 1000 tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelPrice {
    pub prompt_per_1k: Decimal,
    pub completion_per_1k: Decimal,
    /// Price of prompt tokens served from the upstream's cache; `None` means the prompt price.
    pub cached_prompt_per_1k: Option<Decimal>,
    /// Output cap per choice sent upstream (and reserved) when a request sets no `max_tokens`.
    pub max_output_tokens: u64,
    /// The model's context window: the input reserved for a request whose input the gateway
    /// cannot size from its body.
    pub max_input_tokens: u64,
}

impl ModelPrice {
    fn cached_price(&self) -> Decimal {
        self.cached_prompt_per_1k.unwrap_or(self.prompt_per_1k)
    }
}

#[derive(Debug, Clone)]
struct ModelEntry {
    pattern: String,
    price: ModelPrice,
}

/// A validated pricing file. Immutable: a reload builds a new table and swaps it in.
#[derive(Debug, Clone)]
pub struct PriceTable {
    rounding: Rounding,
    default: ModelPrice,
    /// Same order as the file; `globs` index `i` is `models[i]`.
    models: Vec<ModelEntry>,
    globs: GlobSet,
    version: u64,
}

/// A pricing file that cannot be read or is invalid. Display names the file and the line.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("{origin}: cannot read the pricing file: {cause}")]
    Read {
        origin: String,
        cause: std::io::Error,
    },
    #[error("{origin} line {line}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        message: String,
    },
    #[error("{origin} line {line}: {field}: {problem}")]
    Invalid {
        origin: String,
        line: usize,
        field: String,
        problem: String,
    },
}

impl PricingError {
    /// The 1-based line the error points at, when there is one.
    pub fn line(&self) -> Option<usize> {
        match self {
            PricingError::Read { .. } => None,
            PricingError::Syntax { line, .. } | PricingError::Invalid { line, .. } => Some(*line),
        }
    }
}

impl PriceTable {
    /// Parses and validates a pricing file; `origin` (usually its path) prefixes every error.
    pub fn parse(text: &str, origin: &str) -> Result<PriceTable, PricingError> {
        Parser { text, origin }.parse()
    }

    /// Reads and parses the pricing file at `path` (a small blocking read).
    pub fn load(path: &Path) -> Result<PriceTable, PricingError> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|cause| PricingError::Read {
            origin: origin.clone(),
            cause,
        })?;
        let text = utf8(bytes, &origin)?;
        PriceTable::parse(&text, &origin)
    }

    /// 1 credit per 1000 prompt or completion tokens for every model, exact rounding.
    pub fn builtin_default() -> PriceTable {
        PriceTable {
            rounding: Rounding::Exact,
            default: ModelPrice {
                prompt_per_1k: Decimal::ONE,
                completion_per_1k: Decimal::ONE,
                cached_prompt_per_1k: None,
                max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
                max_input_tokens: DEFAULT_MAX_INPUT_TOKENS,
            },
            models: Vec::new(),
            globs: GlobSet::empty(),
            version: 1,
        }
    }

    /// The first `[[models]]` entry whose pattern matches `model`, else `[default]`.
    pub fn price_for(&self, model: &str) -> &ModelPrice {
        // `matches` lists indices in ascending order, i.e. file order.
        self.globs
            .matches(model)
            .first()
            .and_then(|&index| self.models.get(index))
            .map_or(&self.default, |entry| &entry.price)
    }

    /// The settled cost of a request: uncached prompt tokens at the prompt price, cached ones at
    /// the cached price, completion tokens at the completion price, rounded once.
    pub fn cost(&self, model: &str, usage: &TokenUsage) -> Credits {
        let price = self.price_for(model);
        // Cached tokens are a subset of the prompt; a report claiming more is clamped to it.
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let uncached = usage.prompt_tokens - cached;
        self.charge(&[
            (uncached, price.prompt_per_1k),
            (cached, price.cached_price()),
            (usage.completion_tokens, price.completion_per_1k),
        ])
    }

    /// The most a request can cost: every prompt token at the prompt price (or the cached price,
    /// if that is dearer) plus `max_output_tokens` (or the model's cap) completion tokens, rounded
    /// like [`Self::cost`].
    pub fn estimate(
        &self,
        model: &str,
        prompt_tokens: u64,
        max_output_tokens: Option<u64>,
    ) -> Credits {
        let price = self.price_for(model);
        let output = max_output_tokens.unwrap_or(price.max_output_tokens);
        self.charge(&[
            (prompt_tokens, price.prompt_per_1k.max(price.cached_price())),
            (output, price.completion_per_1k),
        ])
    }

    pub fn rounding(&self) -> Rounding {
        self.rounding
    }

    /// 1 for a freshly parsed table; [`PricingHandle`] numbers the tables it installs.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The `[default]` price, used for models no entry matches.
    pub fn default_price(&self) -> &ModelPrice {
        &self.default
    }

    /// The `[[models]]` entries as `(pattern, price)` in file order (for admin listings).
    pub fn entries(&self) -> impl Iterator<Item = (&str, &ModelPrice)> {
        self.models
            .iter()
            .map(|entry| (entry.pattern.as_str(), &entry.price))
    }

    /// Sums `tokens × price per 1k` exactly, then rounds once.
    fn charge(&self, parts: &[(u64, Decimal)]) -> Credits {
        let mut thousandths = Decimal::ZERO; // credits × 1000
        for &(tokens, price) in parts {
            match Decimal::from(tokens)
                .checked_mul(price)
                .and_then(|part| thousandths.checked_add(part))
            {
                Some(sum) => thousandths = sum,
                None => return SATURATED,
            }
        }
        let micros = match self.rounding {
            // credits × 10^6 = thousandths × 1000; ceil never truncates a fraction away.
            Rounding::Exact => thousandths
                .checked_mul(Decimal::ONE_THOUSAND)
                .map(|m| m.ceil()),
            // ceil(x / 1000) == ceil(ceil(x) / 1000) for x >= 0, and the inner ceil keeps the
            // division exact.
            Rounding::Ceil => thousandths
                .ceil()
                .checked_div(Decimal::ONE_THOUSAND)
                .map(|credits| credits.ceil())
                .and_then(|credits| credits.checked_mul(Decimal::from(MICROS_PER_CREDIT))),
        };
        micros
            .and_then(|m| i64::try_from(m).ok())
            .map_or(SATURATED, Credits::from_micros)
    }
}
