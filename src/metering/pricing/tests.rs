//! Prices, costs, the parser's errors and the watcher, against real files.

use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use tokio::sync::watch;

use crate::domain::{Credits, TokenUsage};

use super::watcher::*;
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

const SHIPPED: &str = include_str!("../../../config/pricing.toml");

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
    let prices = table("[default]\nprompt_per_1k = \"1000000000\"\ncompletion_per_1k = \"1\"\n");
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
    assert!(rejects(&unknown_in_model, 5, "models[0].completoin_per_1k").contains("unknown key"));
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
        let mut seen = PricingFile::read_blocking(&path)
            .ok()
            .map(|s| s.fingerprint);

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
