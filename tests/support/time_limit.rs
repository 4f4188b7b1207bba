//! Time limits for async tests: a test that gets stuck (a settler that never finishes, a lost
//! wake-up) fails instead of hanging the run, and waiting on background work checks for the
//! outcome instead of sleeping a guessed time.

use std::time::{Duration, Instant};

/// How long a test may run before it fails as stuck.
pub const TEST_TIME_LIMIT: Duration = Duration::from_secs(60);

/// Runs `body`, failing the test if it runs past `limit`.
pub async fn within(limit: Duration, body: impl Future<Output = ()>) {
    // On the heap: a test's future is large, and a test thread's stack is not.
    if tokio::time::timeout(limit, Box::pin(body)).await.is_err() {
        panic!("the test did not finish within {limit:?}");
    }
}

/// How often [`eventually`] checks.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Checks `check` until it gives `Ok`, every 20 ms, and returns that; fails with the last
/// `Err` (what was seen instead) once `within` has passed. For waiting on what the gateway
/// does in the background, in place of a sleep that guesses how long it takes.
pub async fn eventually<T>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "not so within {within:?}: {seen}"
            ),
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`within`] the usual [`TEST_TIME_LIMIT`].
pub async fn limited(body: impl Future<Output = ()>) {
    within(TEST_TIME_LIMIT, body).await;
}
