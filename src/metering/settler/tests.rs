//! The settler against both ledgers and caches: batching, refusals, set-aside, recovery.

use std::sync::Arc;

use super::*;
use crate::cache::local::LocalCache;
use crate::domain::{RequestId, TokenUsage};
use crate::ledger::sqlite::SqliteLedger;
use crate::ledger::{EntryType, GrantRequest, UsageSource};
use crate::metering::LedgerSource;

#[test]
fn a_refusal_while_the_ledger_answers_is_retried_until_the_bound_then_set_aside() {
    let since = Instant::now();
    let bound = Duration::from_secs(30);
    let backoff = Duration::from_secs(5);
    let at = |secs| since + Duration::from_secs(secs);
    // Retried after the backoff; the last retry falls exactly on the bound.
    assert_eq!(
        verdict(true, false, since, at(1), backoff, bound),
        Verdict::RetryAt(at(6))
    );
    assert_eq!(
        verdict(true, false, since, at(28), backoff, bound),
        Verdict::RetryAt(at(30))
    );
    assert_eq!(
        verdict(true, false, since, at(30), backoff, bound),
        Verdict::SetAside
    );
    // Stopping: no later retry would come.
    assert_eq!(
        verdict(true, true, since, at(1), backoff, bound),
        Verdict::SetAside
    );
}

#[test]
fn each_retry_waits_longer_than_the_last_up_to_the_cap() {
    let mut pauses = vec![FIRST_BACKOFF];
    while pauses.len() < 10 {
        let next = doubled(*pauses.last().expect("one"));
        pauses.push(next);
    }
    let millis: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
    assert_eq!(
        millis,
        [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
    );
    // A retry is due one pause after the failure, never before it.
    let now = Instant::now();
    assert_eq!(
        retry_after(now, Duration::from_millis(800)),
        now + Duration::from_millis(800)
    );
    assert!(retry_after(now, FIRST_BACKOFF) > now);
}

#[test]
fn an_outage_sets_nothing_aside_however_long_it_lasts() {
    let since = Instant::now();
    let later = since + Duration::from_secs(3600);
    let backoff = Duration::from_secs(5);
    for stopping in [false, true] {
        assert_eq!(
            verdict(false, stopping, since, later, backoff, Duration::ZERO),
            Verdict::RetryAt(later + backoff)
        );
    }
}

struct Fixture {
    ledger: SharedLedger,
    cache: SharedCache,
    account: AccountId,
    dir: tempfile::TempDir,
}

/// A fresh SQLite ledger where `acct` has 10 credits, and an in-process cache that has
/// loaded `acct`.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let ledger = SqliteLedger::open_file(&dir.path().join("ledger.db"))
        .await
        .expect("open");
    ledger.migrate().await.expect("migrate");
    let ledger: SharedLedger = Arc::new(ledger);
    let account = AccountId::parse("acct").expect("valid");
    ledger
        .grant(&GrantRequest {
            account: account.clone(),
            entry_type: EntryType::Bonus,
            amount: Credits::from_whole(10).expect("small"),
            description: "test".into(),
            reference: None,
            expires_at_ms: None,
            draw_first_from: Vec::new(),
        })
        .await
        .expect("grant");
    let cache: SharedCache = Arc::new(LocalCache::new());
    let fixture = Fixture {
        ledger,
        cache,
        account,
        dir,
    };
    fixture.view().await;
    fixture
}

impl Fixture {
    /// A settler on the fixture's ledger and cache, batches of up to 16, setting a refused
    /// settlement aside after `set_aside_after`.
    fn settler(&self, set_aside_after: Duration) -> (SettlerHandle, JoinHandle<()>) {
        spawn(
            self.ledger.clone(),
            self.cache.clone(),
            SettlerConfig {
                batch_max: 16,
                set_aside_after,
            },
        )
    }

    async fn view(&self) -> crate::cache::BalanceView {
        let source = LedgerSource {
            ledger: self.ledger.clone(),
            signup_grant: Credits::ZERO,
        };
        self.cache
            .view(&Bucket::Account(self.account.clone()), &source)
            .await
            .expect("view")
    }

    /// A settlement of `acct`; a negative cost makes both ledgers refuse it.
    fn settlement(&self, id: &str, cost: i64) -> Settlement {
        Settlement {
            request_id: RequestId::from_string(id.into()),
            account: self.account.clone(),
            api_key_id: None,
            endpoint: "chat/completions".into(),
            model: "mock-1".into(),
            upstream: "fake".into(),
            usage: TokenUsage {
                prompt_tokens: 1,
                completion_tokens: 1,
                cached_tokens: 0,
            },
            source: UsageSource::Reported,
            cost: Credits::from_micros(cost),
            uncharged: Credits::ZERO,
            hold: Credits::from_micros(cost.abs()),
            stream: false,
            status: "completed".into(),
            started_at_ms: now_ms(),
            finished_at_ms: now_ms(),
        }
    }

    /// Renames the ledger's table of set-aside settlements away (`away`) or back, from a
    /// connection of its own: while it is away, setting a settlement aside fails though the
    /// ledger still answers.
    async fn take_set_aside_table(&self, away: bool) {
        use sqlx::Connection as _;
        let url = format!("sqlite://{}", self.dir.path().join("ledger.db").display());
        let mut conn = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("a second connection");
        let sql = if away {
            "ALTER TABLE settlements_set_aside RENAME TO set_aside_away"
        } else {
            "ALTER TABLE set_aside_away RENAME TO settlements_set_aside"
        };
        sqlx::query(sql).execute(&mut conn).await.expect("rename");
        conn.close().await.expect("close");
    }

    async fn balance(&self) -> Credits {
        self.ledger
            .account(&self.account)
            .await
            .expect("read")
            .expect("exists")
            .balance
    }

    async fn set_aside(&self) -> Vec<String> {
        self.ledger
            .set_aside_settlements(None)
            .await
            .expect("list")
            .into_iter()
            .map(|entry| entry.request_id)
            .collect()
    }
}

/// A recovery pass says what it did: the holds it released, the orphans it wrote.
#[tokio::test]
async fn a_recovery_pass_counts_the_holds_it_released() {
    crate::test_support::time_limit::limited(async move {
        let fx = fixture().await;
        let source = LedgerSource {
            ledger: fx.ledger.clone(),
            signup_grant: Credits::ZERO,
        };
        for (id, deadline_ms) in [("gone", 1), ("running", i64::MAX)] {
            let hold = crate::cache::HoldSpec {
                request_id: id.into(),
                amount: Credits::from_whole(1).expect("small"),
                owner: "test".into(),
                deadline_ms,
            };
            fx.cache
                .reserve(
                    &Bucket::Account(fx.account.clone()),
                    &hold,
                    Credits::ZERO,
                    &source,
                )
                .await
                .expect("fits");
        }
        let recovered = recover(&*fx.ledger, &*fx.cache, Duration::from_secs(60))
            .await
            .expect("recovers");
        assert_eq!(
            recovered,
            Recovered {
                reaped: 1,
                written: 0,
                set_aside: 0
            }
        );
        assert_eq!(fx.view().await.held, Credits::from_whole(1).expect("small"));
    })
    .await;
}

// On a current-thread runtime nothing runs before the test awaits, so the three settlements
// reach the committer as one batch, which the ledger refuses for the bad one.
#[tokio::test]
async fn a_refused_settlement_holds_up_neither_its_batch_nor_later_ones() {
    crate::test_support::time_limit::limited(async move {
        let fx = fixture().await;
        let (settler, task) = fx.settler(Duration::from_secs(2));
        let good = settler.settle(fx.settlement("good-1", 1_000), None);
        let bad = settler.settle(fx.settlement("bad", -1), None);
        let also_good = settler.settle(fx.settlement("good-2", 2_000), None);
        let quick = Duration::from_millis(1_500);
        tokio::time::timeout(quick, good)
            .await
            .expect("good-1 in time")
            .expect("told");
        tokio::time::timeout(quick, also_good)
            .await
            .expect("good-2 in time")
            .expect("told");
        // A later settlement is not held up either.
        let later = settler.settle(fx.settlement("good-3", 3_000), None);
        tokio::time::timeout(quick, later)
            .await
            .expect("good-3 in time")
            .expect("told");
        assert_eq!(
            fx.ledger
                .account(&fx.account)
                .await
                .expect("read")
                .expect("exists")
                .balance,
            Credits::from_micros(10_000_000 - 6_000)
        );
        assert!(fx.set_aside().await.is_empty(), "set aside before its time");

        // The bad one is set aside after its bound (about 2 s); its waiter is told, a flush
        // waits for it, and the cache no longer counts its pending charge.
        settler.flush().await;
        assert_eq!(fx.set_aside().await, ["bad"]);
        tokio::time::timeout(quick, bad)
            .await
            .expect("told in time")
            .expect("told");
        let entry = &fx
            .ledger
            .set_aside_settlements(Some(false))
            .await
            .expect("list")[0];
        assert!(entry.error.contains("negative cost"), "{entry:?}");
        assert_eq!(entry.account, "acct");
        let record: Settlement = serde_json::from_str(&entry.record).expect("the record");
        assert_eq!(record.cost, Credits::from_micros(-1));
        let view = fx.view().await;
        assert_eq!(
            (view.balance, view.held),
            (Credits::from_micros(10_000_000 - 6_000), Credits::ZERO)
        );
        let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].problem.contains("settlement bad was set aside"));
        settler.stop().await;
        task.await.expect("settler ends");
    })
    .await;
}

/// A settlement waiting for its retry, an hour from being set aside, does not stop the
/// committer: every settlement sent meanwhile is written.
#[tokio::test]
async fn settlements_keep_being_written_while_a_refused_one_waits() {
    crate::test_support::time_limit::limited(async move {
        let fx = fixture().await;
        let (settler, task) = fx.settler(Duration::from_secs(3600));
        let bad = settler.settle(fx.settlement("bad", -1), None);
        // Refused alone, it now waits apart for its retry.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (id, cost) in [("good-1", 1_000), ("good-2", 2_000), ("good-3", 3_000)] {
            let durable = settler.settle(fx.settlement(id, cost), None);
            tokio::time::timeout(Duration::from_millis(1_500), durable)
                .await
                .expect("in time")
                .unwrap_or_else(|_| panic!("{id} was dropped unwritten"));
        }
        assert_eq!(fx.balance().await, Credits::from_micros(10_000_000 - 6_000));
        assert!(fx.set_aside().await.is_empty(), "set aside before its time");
        settler.stop().await;
        task.await.expect("settler ends");
        bad.await.expect("told");
        assert_eq!(fx.set_aside().await, ["bad"]);
    })
    .await;
}

/// Without `stop`, dropping every handle ends the settler all the same: what was queued is
/// written, and what the ledger refuses is set aside at once (no later try would come).
#[tokio::test]
async fn a_settler_whose_handles_are_all_dropped_writes_what_was_queued_and_ends() {
    crate::test_support::time_limit::limited(async move {
        let fx = fixture().await;
        let (settler, task) = fx.settler(Duration::from_secs(3600));
        let good = settler.settle(fx.settlement("good-1", 1_000), None);
        drop(settler);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends once no handle is left")
            .expect("no panic");
        good.await.expect("told");
        assert_eq!(fx.balance().await, Credits::from_micros(10_000_000 - 1_000));

        let (settler, task) = fx.settler(Duration::from_secs(3600));
        let good = settler.settle(fx.settlement("good-2", 2_000), None);
        let bad = settler.settle(fx.settlement("bad", -1), None);
        drop(settler);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends once no handle is left, though one settlement is refused")
            .expect("no panic");
        good.await.expect("told");
        bad.await.expect("told");
        assert_eq!(fx.balance().await, Credits::from_micros(10_000_000 - 3_000));
        assert_eq!(fx.set_aside().await, ["bad"]);
    })
    .await;
}

/// A refused settlement that cannot be set aside either (the ledger answers but fails the
/// write) is kept and tried again, its waiter and flushes still waiting, until it can be.
#[tokio::test]
async fn a_refused_settlement_that_cannot_be_set_aside_yet_is_kept_until_it_can() {
    crate::test_support::time_limit::limited(async move {
        let fx = fixture().await;
        fx.take_set_aside_table(true).await;
        let (settler, task) = fx.settler(Duration::from_millis(200));
        let mut bad = settler.settle(fx.settlement("bad", -1), None);
        // Past its bound, setting it aside has failed several times.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            matches!(bad.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "told before it was set aside"
        );
        fx.take_set_aside_table(false).await;
        tokio::time::timeout(Duration::from_secs(10), settler.flush())
            .await
            .expect("set aside once it can be");
        assert_eq!(fx.set_aside().await, ["bad"]);
        bad.await.expect("told");
        assert_eq!(fx.balance().await, Credits::from_whole(10).expect("small"));
        settler.stop().await;
        task.await.expect("settler ends");
    })
    .await;
}

/// At the stop no later try would come: a refused settlement that cannot be set aside is
/// given up (its record logged; a shared cache still journals it), and the stop ends.
#[tokio::test]
async fn stopping_gives_up_a_refused_settlement_that_cannot_be_set_aside() {
    crate::test_support::time_limit::limited(async move {
        let fx = fixture().await;
        fx.take_set_aside_table(true).await;
        let (settler, task) = fx.settler(Duration::from_secs(3600));
        let bad = settler.settle(fx.settlement("bad", -1), None);
        tokio::time::timeout(Duration::from_secs(5), settler.stop())
            .await
            .expect("stopped promptly");
        task.await.expect("settler ends");
        bad.await.expect("its waiter was told");
        fx.take_set_aside_table(false).await;
        assert!(fx.set_aside().await.is_empty());
        assert_eq!(fx.balance().await, Credits::from_whole(10).expect("small"));
    })
    .await;
}

#[tokio::test]
async fn stopping_sets_a_refused_settlement_aside_at_once() {
    crate::test_support::time_limit::limited(async move {
        let fx = fixture().await;
        let (settler, task) = fx.settler(Duration::from_secs(3600));
        let bad = settler.settle(fx.settlement("bad", -1), None);
        tokio::time::timeout(Duration::from_secs(5), settler.stop())
            .await
            .expect("stopped promptly");
        task.await.expect("settler ends");
        bad.await.expect("its waiter was told");
        assert_eq!(fx.set_aside().await, ["bad"]);
    })
    .await;
}
