//! Prices per model, the cost of a request in credits, and hot reload of `config/pricing.toml`.
//!
//! Money stays exact: prices are `Decimal` parsed from TOML strings, and a request's cost is
//! rounded once, up, into micro-credits (docs/architecture.md, "Prices"; I3). The watcher polls the file instead of
//! using inotify on purpose: polling also sees atomic renames, bind-mounted config maps and edits
//! on network file systems, which inotify can miss.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use globset::{Glob, GlobSet, GlobSetBuilder};
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::domain::{Credits, MICROS_PER_CREDIT, TokenUsage};

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

fn utf8(bytes: Vec<u8>, origin: &str) -> Result<String, PricingError> {
    String::from_utf8(bytes).map_err(|err| PricingError::Read {
        origin: origin.to_owned(),
        cause: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
    })
}

type Entry<'t, 'i> = (
    &'t Spanned<std::borrow::Cow<'i, str>>,
    &'t Spanned<DeValue<'i>>,
);

/// Walks the parsed document by hand (not serde) so every error can carry the exact span and
/// field path of the offending key or value.
struct Parser<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Parser<'_> {
    fn parse(&self) -> Result<PriceTable, PricingError> {
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

/// The prices in force, shared by every request and swapped atomically on reload.
///
/// A `std::sync::RwLock` around an `Arc` (no extra dependency): readers hold the lock only long
/// enough to clone the `Arc`, and writes happen at most once per poll interval.
#[derive(Debug, Clone)]
pub struct PricingHandle {
    current: Arc<RwLock<Arc<PriceTable>>>,
}

impl PricingHandle {
    /// Installs `table` as version 1.
    pub fn new(mut table: PriceTable) -> Self {
        table.version = 1;
        PricingHandle {
            current: Arc::new(RwLock::new(Arc::new(table))),
        }
    }

    /// The table in force; keep it for the whole request so reserve and settle use one price.
    pub fn current(&self) -> Arc<PriceTable> {
        // The lock only guards an `Arc` swap, so a poisoned lock still holds a valid table.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn version(&self) -> u64 {
        self.current().version()
    }

    /// Re-reads `path`; on success installs it and returns the new version, on error keeps the
    /// table in force. Does a small blocking read.
    pub fn reload_from(&self, path: &Path) -> Result<u64, PricingError> {
        PriceTable::load(path).map(|table| self.install(table))
    }

    fn install(&self, mut table: PriceTable) -> u64 {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        // Numbered under the write lock so concurrent reloads still get increasing versions.
        table.version = current.version.saturating_add(1);
        let version = table.version;
        *current = Arc::new(table);
        version
    }

    /// Polls `path` every `interval` (and whenever `nudge` is notified, e.g. by a sibling
    /// instance that saw the file change) and reloads it when its modified time, length or
    /// content hash changes (the hash catches same-second, same-length edits). A rejected file is
    /// logged and the last good prices stay in force. Stops when `shutdown` becomes `true` or its
    /// sender is dropped; aborting the returned handle also stops it. Must be called inside a
    /// Tokio runtime; it reads the file once, synchronously, to record the starting state.
    pub fn spawn_watcher(
        &self,
        path: PathBuf,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
        nudge: Arc<tokio::sync::Notify>,
    ) -> JoinHandle<()> {
        let handle = self.clone();
        // Taken before spawning so an edit made right after this call is not mistaken for the
        // starting state.
        let mut seen = Snapshot::read_blocking(&path)
            .ok()
            .map(|snapshot| snapshot.fingerprint);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                if *shutdown.borrow_and_update() {
                    break;
                }
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = nudge.notified() => {}
                    changed = shutdown.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        continue;
                    }
                }
                match handle.poll_once(&path, &mut seen).await {
                    PollOutcome::Unchanged => {}
                    PollOutcome::Reloaded(version) => {
                        tracing::info!(version, path = %path.display(), "pricing reloaded");
                    }
                    PollOutcome::Rejected(error) => {
                        tracing::error!(
                            %error,
                            version = handle.version(),
                            "pricing file rejected; the last good prices stay in force"
                        );
                    }
                }
            }
        })
    }

    /// One watcher step: reloads if the file differs from `seen`. An unreadable file is reported
    /// once, not on every tick, and a rejected file is not re-parsed until it changes again.
    async fn poll_once(&self, path: &Path, seen: &mut Option<Fingerprint>) -> PollOutcome {
        let origin = path.display().to_string();
        let snapshot = match Snapshot::read(path).await {
            Ok(snapshot) => snapshot,
            Err(cause) => {
                if seen.take().is_none() {
                    return PollOutcome::Unchanged;
                }
                return PollOutcome::Rejected(PricingError::Read { origin, cause });
            }
        };
        if seen.as_ref() == Some(&snapshot.fingerprint) {
            return PollOutcome::Unchanged;
        }
        *seen = Some(snapshot.fingerprint);
        match utf8(snapshot.bytes, &origin).and_then(|text| PriceTable::parse(&text, &origin)) {
            Ok(table) => PollOutcome::Reloaded(self.install(table)),
            Err(error) => PollOutcome::Rejected(error),
        }
    }
}

#[derive(Debug)]
enum PollOutcome {
    Unchanged,
    Reloaded(u64),
    Rejected(PricingError),
}

/// What the watcher compares between polls.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    sha256: [u8; 32],
}

/// The file's bytes and the fingerprint of exactly those bytes (read through one open handle, so
/// a rename mid-read cannot mix two versions).
struct Snapshot {
    bytes: Vec<u8>,
    fingerprint: Fingerprint,
}

impl Snapshot {
    async fn read(path: &Path) -> std::io::Result<Snapshot> {
        let mut file = tokio::fs::File::open(path).await?;
        let metadata = file.metadata().await?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await?;
        Ok(Snapshot::new(bytes, &metadata))
    }

    fn read_blocking(path: &Path) -> std::io::Result<Snapshot> {
        use std::io::Read as _;
        let mut file = std::fs::File::open(path)?;
        let metadata = file.metadata()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(Snapshot::new(bytes, &metadata))
    }

    fn new(bytes: Vec<u8>, metadata: &std::fs::Metadata) -> Snapshot {
        let fingerprint = Fingerprint {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            sha256: Sha256::digest(&bytes).into(),
        };
        Snapshot { bytes, fingerprint }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str_exact(text).expect("test decimal")
    }

    fn usage(prompt: u64, completion: u64, cached: u64) -> TokenUsage {
        TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
        }
    }

    fn table(text: &str) -> PriceTable {
        PriceTable::parse(text, "test.toml").expect("valid pricing")
    }

    #[test]
    fn a_free_model_is_priced_at_zero() {
        let prices = table("[default]\nprompt_per_1k = \"0\"\ncompletion_per_1k = \"0\"\n");
        assert_eq!(prices.cost("any", &usage(1000, 1000, 0)), Credits::ZERO);
        assert_eq!(prices.estimate("any", 1000, Some(1000)), Credits::ZERO);
    }

    #[test]
    fn the_default_context_window_applies_without_a_default_table() {
        let prices = table("default_max_input_tokens = 5000\ndefault_max_output_tokens = 300\n");
        assert_eq!(prices.price_for("any").max_input_tokens, 5000);
        assert_eq!(prices.price_for("any").max_output_tokens, 300);
        let with_entry = table(
            "default_max_input_tokens = 5000\n[[models]]\nmatch = \"big\"\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\nmax_input_tokens = 900000\n",
        );
        assert_eq!(with_entry.price_for("big").max_input_tokens, 900_000);
        assert_eq!(with_entry.price_for("other").max_input_tokens, 5000);
    }

    fn credits(text: &str) -> Credits {
        text.parse().expect("test credits")
    }

    /// Asserts that `text` is rejected at `line` for `field`, returning the full message.
    fn rejects(text: &str, line: usize, field: &str) -> String {
        let error = PriceTable::parse(text, "config/pricing.toml").expect_err("should be rejected");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("config/pricing.toml line {line}: {field}: ")),
            "wrong line or field: {message}"
        );
        assert_eq!(error.line(), Some(line));
        message
    }

    const SHIPPED: &str = include_str!("../../config/pricing.toml");

    #[test]
    fn unpriced_model_costs_one_credit_per_thousand_tokens() {
        for prices in [PriceTable::builtin_default(), table(""), table(SHIPPED)] {
            assert_eq!(
                prices.cost("some-unlisted-model", &usage(1000, 1000, 0)),
                credits("2")
            );
            assert_eq!(
                prices.cost("some-unlisted-model", &usage(1, 0, 0)),
                credits("0.001")
            );
            assert_eq!(prices.rounding(), Rounding::Exact);
            assert_eq!(prices.price_for("x").max_output_tokens, 4096);
        }
    }

    #[test]
    fn shipped_file_prices_the_documented_models() {
        let prices = table(SHIPPED);
        assert_eq!(
            prices.cost("mock-echo", &usage(1000, 1000, 0)),
            credits("3")
        );
        let gpt = prices.price_for("gpt-4o-mini-2024-07-18");
        assert_eq!(gpt.prompt_per_1k, dec("2.5"));
        assert_eq!(gpt.cached_prompt_per_1k, Some(dec("1.25")));
        assert_eq!(gpt.max_output_tokens, 16384);
    }

    #[test]
    fn exact_names_and_globs_match_and_the_first_match_wins() {
        let prices = table(
            r#"
            [[models]]
            match = "gpt-4o-mini"
            prompt_per_1k = "0.15"
            completion_per_1k = "0.6"
            [[models]]
            match = "gpt-4o*"
            prompt_per_1k = "2.5"
            completion_per_1k = "10"
            [[models]]
            match = "gpt-4o-mini-2024-*"
            prompt_per_1k = "99"
            completion_per_1k = "99"
            [[models]]
            match = "{claude,anthropic/claude}-*"
            prompt_per_1k = "3"
            completion_per_1k = "15"
            "#,
        );
        assert_eq!(prices.price_for("gpt-4o-mini").prompt_per_1k, dec("0.15"));
        // The broader glob comes first in the file, so the later, more specific one never wins.
        assert_eq!(
            prices.price_for("gpt-4o-mini-2024-07-18").prompt_per_1k,
            dec("2.5")
        );
        assert_eq!(prices.price_for("gpt-4o").completion_per_1k, dec("10"));
        assert_eq!(
            prices.price_for("anthropic/claude-3").prompt_per_1k,
            dec("3")
        );
        // Exact names are whole-string matches, not prefixes; case matters.
        assert_eq!(prices.price_for("gpt-4o-mini2").prompt_per_1k, dec("2.5"));
        assert_eq!(prices.price_for("GPT-4o").prompt_per_1k, Decimal::ONE);
        assert_eq!(prices.price_for("gpt-4").prompt_per_1k, Decimal::ONE);
        assert_eq!(
            prices.cost("gpt-4o-mini", &usage(2000, 1000, 0)),
            credits("0.9")
        );
        let listed: Vec<&str> = prices.entries().map(|(pattern, _)| pattern).collect();
        assert_eq!(
            listed,
            [
                "gpt-4o-mini",
                "gpt-4o*",
                "gpt-4o-mini-2024-*",
                "{claude,anthropic/claude}-*"
            ]
        );
    }

    #[test]
    fn cached_prompt_tokens_use_the_cached_price_or_the_prompt_price() {
        let prices = table(
            r#"
            [default]
            prompt_per_1k = "2"
            completion_per_1k = "4"
            [[models]]
            match = "cached-*"
            prompt_per_1k = "2.5"
            completion_per_1k = "10"
            cached_prompt_per_1k = "1.25"
            "#,
        );
        // 600 uncached × 2.5 + 400 cached × 1.25 + 100 × 10 = 1500 + 500 + 1000 per 1k.
        assert_eq!(
            prices.cost("cached-a", &usage(1000, 100, 400)),
            credits("3")
        );
        // No cached price: cached tokens cost the prompt price.
        assert_eq!(prices.cost("other", &usage(1000, 0, 400)), credits("2"));
        // A report claiming more cached than prompt tokens is clamped to the prompt.
        assert_eq!(
            prices.cost("cached-a", &usage(1000, 0, 5000)),
            credits("1.25")
        );
    }

    #[test]
    fn exact_rounding_rounds_up_to_the_micro_credit_once_per_request() {
        let prices = table(
            r#"
            [[models]]
            match = "tiny"
            prompt_per_1k = "0.0000001"
            completion_per_1k = "0.0000001"
            [[models]]
            match = "micro"
            prompt_per_1k = "0.000001"
            completion_per_1k = "0.000001"
            "#,
        );
        // 1 token × 0.0000001 / 1000 = 0.0000000001 credits: charged 1 micro, not 0.
        assert_eq!(
            prices.cost("tiny", &usage(1, 0, 0)),
            Credits::from_micros(1)
        );
        // 0.0000012 credits is charged 2 micros (round-to-nearest would give 1).
        assert_eq!(
            prices.cost("micro", &usage(1200, 0, 0)),
            Credits::from_micros(2)
        );
        // Already on the ledger's scale: no extra micro.
        assert_eq!(
            prices.cost("micro", &usage(1000, 0, 0)),
            Credits::from_micros(1)
        );
        assert_eq!(prices.cost("micro", &usage(0, 0, 0)), Credits::ZERO);
        // 0.0000001 + 0.0000001 credits is rounded once (1 micro), not per part (2 micros).
        assert_eq!(
            prices.cost("micro", &usage(100, 100, 0)),
            Credits::from_micros(1)
        );
    }

    #[test]
    fn ceil_rounding_rounds_up_to_whole_credits() {
        let prices = table("rounding = \"ceil\"\n");
        assert_eq!(prices.rounding(), Rounding::Ceil);
        assert_eq!(prices.cost("m", &usage(1, 0, 0)), credits("1"));
        assert_eq!(prices.cost("m", &usage(1000, 1000, 0)), credits("2"));
        assert_eq!(prices.cost("m", &usage(1000, 1001, 0)), credits("3"));
        assert_eq!(prices.cost("m", &usage(0, 0, 0)), Credits::ZERO);
        assert_eq!(prices.estimate("m", 1, Some(0)), credits("1"));
    }

    #[test]
    fn huge_usage_saturates_instead_of_overflowing() {
        let prices =
            table("[default]\nprompt_per_1k = \"1000000000\"\ncompletion_per_1k = \"1\"\n");
        let max = Credits::from_micros(i64::MAX);
        assert_eq!(prices.cost("m", &usage(u64::MAX, u64::MAX, 0)), max);
        assert_eq!(prices.estimate("m", u64::MAX, Some(u64::MAX)), max);
        let ceil = table(
            "rounding = \"ceil\"\n[default]\nprompt_per_1k = \"1000000000\"\ncompletion_per_1k = \"1\"\n",
        );
        assert_eq!(ceil.cost("m", &usage(u64::MAX, 0, 0)), max);
    }

    #[test]
    fn estimate_uses_the_requested_cap_or_the_models_cap() {
        let prices = table(
            r#"
            default_max_output_tokens = 2000
            [[models]]
            match = "big-*"
            prompt_per_1k = "2"
            completion_per_1k = "10"
            cached_prompt_per_1k = "1"
            max_output_tokens = 16384
            [[models]]
            match = "odd"
            prompt_per_1k = "1"
            completion_per_1k = "1"
            cached_prompt_per_1k = "3"
            "#,
        );
        // 1000 × 2 + 500 × 10 = 7000 per 1k.
        assert_eq!(prices.estimate("big-1", 1000, Some(500)), credits("7"));
        // 1000 × 2 + 16384 × 10 = 165840 per 1k.
        assert_eq!(prices.estimate("big-1", 1000, None), credits("165.84"));
        // Unlisted models use default_max_output_tokens: 1000 + 2000.
        assert_eq!(prices.estimate("other", 1000, None), credits("3"));
        assert_eq!(prices.price_for("odd").max_output_tokens, 2000);
        // The estimate bounds the cost even when cached tokens are priced above the prompt.
        assert_eq!(prices.estimate("odd", 1000, Some(0)), credits("3"));
        assert!(prices.cost("odd", &usage(1000, 0, 1000)) <= prices.estimate("odd", 1000, Some(0)));
        assert_eq!(
            PriceTable::builtin_default().estimate("m", 0, None),
            credits("4.096")
        );
    }

    #[test]
    fn prices_serialize_as_decimal_strings() {
        let prices = table(SHIPPED);
        let json = serde_json::to_value(prices.price_for("gpt-4o")).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "prompt_per_1k": "2.5",
                "completion_per_1k": "10",
                "cached_prompt_per_1k": "1.25",
                "max_output_tokens": 16384,
                "max_input_tokens": 128000
            })
        );
    }

    const VALID_MODEL: &str =
        "[[models]]\nmatch = \"a\"\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\n";

    #[test]
    fn bad_prices_are_rejected_with_line_and_field() {
        let not_decimal = format!(
            "{VALID_MODEL}[[models]]\nmatch = \"b\"\nprompt_per_1k = \"abc\"\ncompletion_per_1k = \"1\"\n"
        );
        let message = rejects(&not_decimal, 7, "models[1].prompt_per_1k");
        assert!(
            message.ends_with("\"abc\" is not a decimal number"),
            "{message}"
        );

        let negative = "[default]\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"-0.5\"\n";
        assert!(rejects(negative, 3, "default.completion_per_1k").contains("negative"));

        let float = "[[models]]\nmatch = \"a\"\nprompt_per_1k = 2.5\ncompletion_per_1k = \"1\"\n";
        assert!(rejects(float, 3, "models[0].prompt_per_1k").contains("float"));

        let integer = "[[models]]\nmatch = \"a\"\nprompt_per_1k = \"1\"\ncompletion_per_1k = 10\n";
        assert!(rejects(integer, 4, "models[0].completion_per_1k").contains("integer"));

        let cached = "\n[[models]]\nmatch = \"a\"\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\ncached_prompt_per_1k = \"1e3\"\n";
        rejects(cached, 6, "models[0].cached_prompt_per_1k");

        let missing = "rounding = \"exact\"\n\n[[models]]\nmatch = \"a\"\nprompt_per_1k = \"1\"\n";
        assert!(rejects(missing, 3, "models[0].completion_per_1k").contains("missing"));
    }

    #[test]
    fn bad_globs_keys_and_settings_are_rejected_with_line_and_field() {
        let glob = format!(
            "{VALID_MODEL}\n[[models]]\nmatch = \"gpt-4o[\"\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\n"
        );
        assert!(rejects(&glob, 7, "models[1].match").contains("not a valid glob"));

        rejects(
            "[[models]]\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\n",
            1,
            "models[0].match",
        );

        let unknown_in_model = format!("{VALID_MODEL}completoin_per_1k = \"1\"\n");
        assert!(
            rejects(&unknown_in_model, 5, "models[0].completoin_per_1k").contains("unknown key")
        );
        rejects("rounding = \"exact\"\nprice = \"1\"\n", 2, "price");
        // Of several unknown keys, the first in the file is reported (not the first A-Z).
        rejects("zeta = 1\nalpha = 2\n", 1, "zeta");
        rejects(
            "[default]\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\nmax_output_tokens = 10\n",
            4,
            "default.max_output_tokens",
        );

        let rounding = rejects("\nrounding = \"floor\"\n", 2, "rounding");
        assert!(rounding.contains("\"exact\" or \"ceil\""), "{rounding}");
        rejects("rounding = 1\n", 1, "rounding");

        rejects(
            "default_max_output_tokens = \"4096\"\n",
            1,
            "default_max_output_tokens",
        );
        rejects(
            "default_max_output_tokens = -1\n",
            1,
            "default_max_output_tokens",
        );
        rejects(
            "default_max_output_tokens = 0\n",
            1,
            "default_max_output_tokens",
        );
        rejects(
            &format!("{VALID_MODEL}max_output_tokens = 1.5\n"),
            5,
            "models[0].max_output_tokens",
        );
        rejects("[models]\nmatch = \"a\"\n", 1, "models");
    }

    #[test]
    fn toml_syntax_errors_name_the_line() {
        let error = PriceTable::parse(
            "rounding = \"exact\"\n[default]\nprompt_per_1k = \"1\n",
            "p.toml",
        )
        .expect_err("unterminated string");
        assert!(
            matches!(error, PricingError::Syntax { line: 3, .. }),
            "{error}"
        );
        assert!(error.to_string().starts_with("p.toml line 3: "), "{error}");

        let duplicate = "rounding = \"exact\"\n\nrounding = \"ceil\"\n";
        let error = PriceTable::parse(duplicate, "p.toml").expect_err("duplicate key");
        assert_eq!(error.line(), Some(3), "{error}");
    }

    #[test]
    fn load_names_the_file_when_it_is_missing_or_invalid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pricing.toml");
        let error = PriceTable::load(&path).expect_err("missing file");
        assert!(matches!(error, PricingError::Read { .. }));
        assert!(error.to_string().contains("pricing.toml"), "{error}");

        std::fs::write(&path, "rounding = \"sometimes\"\n").expect("write");
        let error = PriceTable::load(&path).expect_err("invalid file");
        assert!(
            error
                .to_string()
                .starts_with(&format!("{} line 1: rounding: ", path.display())),
            "{error}"
        );
    }

    const PRICE_2: &str = "[default]\nprompt_per_1k = \"2\"\ncompletion_per_1k = \"2\"\n";
    const PRICE_3: &str = "[default]\nprompt_per_1k = \"3\"\ncompletion_per_1k = \"3\"\n";
    const PRICE_7: &str = "[default]\nprompt_per_1k = \"7\"\ncompletion_per_1k = \"7\"\n";

    fn thousand_prompt_tokens(handle: &PricingHandle) -> Credits {
        handle.current().cost("m", &usage(1000, 0, 0))
    }

    /// Waits (at most 5 s) until the handle reaches `version`.
    async fn wait_for_version(handle: &PricingHandle, version: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while handle.version() < version {
            assert!(
                tokio::time::Instant::now() < deadline,
                "version {version} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(handle.version(), version);
    }

    #[test]
    fn reload_from_keeps_the_old_table_on_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pricing.toml");
        std::fs::write(&path, PRICE_2).expect("write");
        let handle = PricingHandle::new(PriceTable::load(&path).expect("valid"));
        let before = handle.current();
        assert_eq!(handle.version(), 1);

        std::fs::write(&path, "[default]\nprompt_per_1k = 3\n").expect("write");
        let error = handle.reload_from(&path).expect_err("invalid");
        assert_eq!(error.line(), Some(2));
        assert_eq!(handle.version(), 1);
        assert_eq!(thousand_prompt_tokens(&handle), credits("2"));

        std::fs::write(&path, PRICE_3).expect("write");
        assert_eq!(handle.reload_from(&path).expect("valid"), 2);
        assert_eq!(thousand_prompt_tokens(&handle), credits("3"));
        // A request that took the table before the reload keeps its prices.
        assert_eq!(before.cost("m", &usage(1000, 0, 0)), credits("2"));
        assert_eq!(before.version(), 1);
    }

    #[tokio::test]
    async fn watcher_picks_up_edits_rejects_bad_ones_and_follows_renames() {
        crate::test_support::time_limit::limited(async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("pricing.toml");
            std::fs::write(&path, PRICE_2).expect("write");
            let handle = PricingHandle::new(PriceTable::load(&path).expect("valid"));
            let (stop, shutdown) = watch::channel(false);
            let watcher = handle.spawn_watcher(
                path.clone(),
                Duration::from_millis(20),
                shutdown,
                Arc::default(),
            );

            // An edit of the same length in the same second is seen through the content hash.
            std::fs::write(&path, PRICE_3).expect("write");
            wait_for_version(&handle, 2).await;
            assert_eq!(thousand_prompt_tokens(&handle), credits("3"));

            // An invalid edit is rejected: same version, same prices, for many poll intervals.
            std::fs::write(
                &path,
                "[default]\nprompt_per_1k = \"oops\"\ncompletion_per_1k = \"1\"\n",
            )
            .expect("write");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(handle.version(), 2);
            assert_eq!(thousand_prompt_tokens(&handle), credits("3"));

            // An editor's atomic save: write a sibling file, rename it over the original.
            let staged = dir.path().join(".pricing.toml.tmp");
            std::fs::write(&staged, PRICE_7).expect("write");
            std::fs::rename(&staged, &path).expect("rename");
            wait_for_version(&handle, 3).await;
            assert_eq!(thousand_prompt_tokens(&handle), credits("7"));

            stop.send(true).expect("watcher is listening");
            tokio::time::timeout(Duration::from_secs(5), watcher)
                .await
                .expect("watcher stops on shutdown")
                .expect("watcher did not panic");
        })
        .await;
    }

    #[tokio::test]
    async fn poll_reports_rejections_once_and_survives_a_missing_file() {
        crate::test_support::time_limit::limited(async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("pricing.toml");
            std::fs::write(&path, PRICE_2).expect("write");
            let handle = PricingHandle::new(PriceTable::load(&path).expect("valid"));
            let mut seen = Snapshot::read_blocking(&path).ok().map(|s| s.fingerprint);

            assert!(matches!(
                handle.poll_once(&path, &mut seen).await,
                PollOutcome::Unchanged
            ));

            std::fs::write(&path, "rounding = \"ceil\"\nbogus = 1\n").expect("write");
            match handle.poll_once(&path, &mut seen).await {
                PollOutcome::Rejected(error) => assert_eq!(error.line(), Some(2), "{error}"),
                other => panic!("expected a rejection, got {other:?}"),
            }
            // The same bad file is not re-parsed (or re-logged) on the next tick.
            assert!(matches!(
                handle.poll_once(&path, &mut seen).await,
                PollOutcome::Unchanged
            ));

            std::fs::remove_file(&path).expect("remove");
            assert!(matches!(
                handle.poll_once(&path, &mut seen).await,
                PollOutcome::Rejected(PricingError::Read { .. })
            ));
            assert!(matches!(
                handle.poll_once(&path, &mut seen).await,
                PollOutcome::Unchanged
            ));
            assert_eq!(thousand_prompt_tokens(&handle), credits("2"));

            std::fs::write(&path, PRICE_3).expect("write");
            assert!(matches!(
                handle.poll_once(&path, &mut seen).await,
                PollOutcome::Reloaded(2)
            ));
            assert_eq!(thousand_prompt_tokens(&handle), credits("3"));
        })
        .await;
    }

    #[tokio::test]
    async fn watcher_stops_when_the_shutdown_sender_is_dropped() {
        crate::test_support::time_limit::limited(async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("pricing.toml");
            std::fs::write(&path, PRICE_2).expect("write");
            let handle = PricingHandle::new(PriceTable::builtin_default());
            let (stop, shutdown) = watch::channel(false);
            let watcher =
                handle.spawn_watcher(path, Duration::from_millis(20), shutdown, Arc::default());
            drop(stop);
            tokio::time::timeout(Duration::from_secs(5), watcher)
                .await
                .expect("watcher stops")
                .expect("no panic");
        })
        .await;
    }
}
