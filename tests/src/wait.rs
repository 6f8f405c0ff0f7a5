//! Waiting on conditions (bounded polling), never on fixed sleeps.

use std::future::Future;
use std::time::Duration;

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
    }
}

/// The blocking form of [`eventually`], for tests that drive processes
/// from a plain thread: polls `cond` every `every` until it returns `Some`,
/// and panics after `limit` with `what` and the last `Err` it gave.
pub fn poll_until<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Result<T, String>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        let why = match cond() {
            Ok(v) => return v,
            Err(why) => why,
        };
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}: {why}"
        );
        std::thread::sleep(every);
    }
}

/// Polls `value` until it stops changing for `quiet`, returning it.
pub async fn settled(limit: Duration, quiet: Duration, mut value: impl FnMut() -> u64) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let start = tokio::time::Instant::now();
    let mut last = value();
    let mut since = start;
    loop {
        tick.tick().await;
        let v = value();
        if v != last {
            last = v;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= quiet {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "value kept changing for {limit:?} (last {last})"
        );
    }
}
