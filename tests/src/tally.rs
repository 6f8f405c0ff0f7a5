//! Tallies of a running load ([`meshwire_examples::load::Load`]): what the
//! calls between two of its totals did, per app and per failure code.

use std::collections::BTreeMap;
use std::time::Duration;

use meshwire_examples::load::{Load, Report};

/// What the load saw between two of its totals.
#[derive(Debug, Default)]
pub struct Tally {
    /// Calls answered, per app.
    pub ok: BTreeMap<String, u64>,
    /// Calls failed, per gRPC code name.
    pub failed: BTreeMap<String, u64>,
    /// The load's last failure (perhaps older than this tally).
    pub last_error: Option<String>,
}

impl Tally {
    pub fn between(before: &Report, now: &Report) -> Tally {
        let mut t = Tally::default();
        for s in &now.servers {
            let was = before.server(&s.name).map_or(0, |b| b.calls);
            if s.calls > was {
                t.ok.insert(s.name.clone(), s.calls - was);
            }
        }
        for (code, n) in &now.errors {
            let was = before.errors.get(code).copied().unwrap_or(0);
            if *n > was {
                t.failed.insert(code.clone(), n - was);
            }
        }
        t.last_error = now.last_error.clone();
        t
    }

    pub fn calls(&self) -> u64 {
        self.ok.values().sum::<u64>() + self.failures()
    }

    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Waits (bounded) until `n` more calls finished, and returns what they did.
pub async fn next_calls(load: &Load, n: u64) -> Tally {
    let before = load.total();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let start = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let t = Tally::between(&before, &load.total());
        if t.calls() >= n {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} calls in 60 s: {t:?}",
            t.calls()
        );
    }
}
