//! Outlier detection at the caller, per endpoint: consecutive failures eject
//! an endpoint for a while (exponential backoff with jitter), then exactly
//! one probe call decides whether it comes back.
//!
//! ```text
//! healthy ──N consecutive failures──▶ ejected (base × 2^k, jittered, ≤ max)
//!    ▲                                   │ time's up: the next pick takes it as the probe
//!    └────────── probe succeeds ◀── probing (no other call) ──probe fails──▶ ejected (k + 1)
//! ```
//! A failure is a gRPC status in the failure set (`UNAVAILABLE`, `INTERNAL`,
//! `UNKNOWN`, `DATA_LOSS` by default), read from trailers-only responses and
//! from trailers after data alike, a connect failure, or a call the peer
//! refused unprocessed. The balancer never picks an ejected endpoint unless
//! more than the cluster's share would be out (panic mode: all count again),
//! and counts recent failures as load, so a fast-failing endpoint does not
//! look idle between ejections.
//!
//! Failure-percentage ejection (for large services, where an endpoint can fail
//! a large share of its calls without ever failing N in a row): each
//! endpoint counts its calls and failures, and [`sweep`] (every
//! interval, off the call path) ejects those failing at least the threshold
//! percent of at least `min_calls` calls, once `min_hosts` endpoints had that
//! many calls, within the same share and with the same backoff.
//!
//! Everything is a few relaxed atomics on the call path; time comes from
//! `tokio::time::Instant`, so the tests run in virtual time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

/// Settings of one cluster's detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierSettings {
    /// Consecutive failures that eject an endpoint (0: detection off).
    pub consecutive_failures: u32,
    /// First ejection; doubled for each further one in a row.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Most endpoints ejected at once, in percent of the cluster.
    pub max_ejection_percent: u32,
    /// gRPC codes counted as failures, as a bit set (bit `c` for code `c`).
    pub failure_codes: u32,
    /// Failure-percentage ejection threshold, in percent (0: off).
    pub failure_percentage: u32,
    pub failure_percentage_min_hosts: u32,
    pub failure_percentage_min_calls: u32,
    pub failure_percentage_interval: Duration,
}

/// `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS`.
pub const DEFAULT_FAILURE_CODES: u32 = 1 << 14 | 1 << 13 | 1 << 2 | 1 << 15;

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
            failure_codes: DEFAULT_FAILURE_CODES,
            failure_percentage: 85,
            failure_percentage_min_hosts: 5,
            failure_percentage_min_calls: 50,
            failure_percentage_interval: Duration::from_secs(10),
        }
    }
}

impl OutlierSettings {
    pub fn is_failure(&self, code: u8) -> bool {
        code < 32 && self.failure_codes & (1 << code) != 0
    }
}

const HEALTHY: u8 = 0;
const EJECTED: u8 = 1;
const PROBING: u8 = 2;

/// One endpoint's detector state.
#[derive(Debug)]
pub struct Outlier {
    state: AtomicU8,
    consecutive: AtomicU32,
    /// Ejections in a row (the backoff exponent); reset by a good probe.
    ejections: AtomicU32,
    /// Ejected until this many µs after `epoch`.
    until_us: AtomicU64,
    epoch: Instant,
    /// Ejections so far (for `/metrics`).
    pub ejected_total: AtomicU64,
    /// Refused unprocessed by its sidecar: skipped until this many µs after
    /// `epoch` (0: not refusing).
    refused_until_us: AtomicU64,
    /// Slow start: ramping up since this many µs after `epoch` (creation or
    /// recovery); `u64::MAX` once warm (no clock read per pick then).
    warm_since_us: AtomicU64,
    /// This interval's calls (high 32 bits) and failures (low 32 bits), for
    /// failure-percentage ejection: one add per call.
    interval_counts: AtomicU64,
}

/// The share of calls a slow-starting endpoint is offered at first; it then
/// grows linearly to all of them at the end of the window.
const SLOW_START_MIN: f64 = 0.1;

/// The share of picks a slow-starting endpoint accepts, `elapsed` into a
/// ramp of `window`: from [`SLOW_START_MIN`] up to 1.
pub fn slow_start_share(elapsed: Duration, window: Duration) -> f64 {
    if window.is_zero() || elapsed >= window {
        return 1.0;
    }
    (elapsed.as_secs_f64() / window.as_secs_f64()).max(SLOW_START_MIN)
}

/// How long an endpoint whose sidecar refused a call unprocessed is skipped.
/// Short and never growing: its sidecar refuses while its app is unhealthy
/// and stops the moment the app is back, so the next try after this finds
/// out, at the cost of one retried attempt per hold. With a control plane
/// this covers only the moments until its report arrives: an unhealthy
/// endpoint then leaves the route table through EDS (`identity::report`).
pub const REFUSED_HOLD: Duration = Duration::from_millis(250);

impl Default for Outlier {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(HEALTHY),
            consecutive: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            until_us: AtomicU64::new(0),
            epoch: Instant::now(),
            ejected_total: AtomicU64::new(0),
            refused_until_us: AtomicU64::new(0),
            warm_since_us: AtomicU64::new(0),
            interval_counts: AtomicU64::new(0),
        }
    }
}

/// Whether the balancer may send a call to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, as the one probe after an ejection (claimed by the caller).
    Probe,
    No,
}

impl Outlier {
    fn now_us(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_micros() as u64
    }

    /// Ejected (or probing) now: it should get no ordinary calls.
    pub fn is_out(&self) -> bool {
        self.state.load(Ordering::Relaxed) != HEALTHY
    }

    /// Its sidecar refused a call a moment ago ([`REFUSED_HOLD`]).
    pub fn refusing(&self) -> bool {
        let until = self.refused_until_us.load(Ordering::Relaxed);
        // The clock is read only while a refusal is recent.
        until != 0 && self.now_us() < until
    }

    /// Slow start: whether this pick may go here (always once warm). While
    /// ramping, a pick is accepted with the ramp's share, so least-request
    /// cannot flood a new endpoint just because it has nothing in flight
    /// (envoy#19437).
    pub fn warm_admits(&self, window: Duration) -> bool {
        let since = self.warm_since_us.load(Ordering::Relaxed);
        if since == u64::MAX || window.is_zero() {
            return true;
        }
        let elapsed = Duration::from_micros(self.now_us().saturating_sub(since));
        if elapsed >= window {
            self.warm_since_us.store(u64::MAX, Ordering::Relaxed);
            return true;
        }
        fastrand::f64() < slow_start_share(elapsed, window)
    }

    /// No ramp for this endpoint (e.g. one of a service's first endpoints:
    /// with nothing warm to prefer, ramping would only refuse calls).
    pub fn mark_warm(&self) {
        self.warm_since_us.store(u64::MAX, Ordering::Relaxed);
    }

    /// Failures since the last success. Not counted as load: an endpoint
    /// that failed and came back would then never be picked at low
    /// concurrency, so never succeed again; ejection takes a failing one out.
    pub fn consecutive_failures(&self) -> usize {
        self.consecutive.load(Ordering::Relaxed) as usize
    }

    /// Time left in the current ejection (zero if not ejected).
    pub fn remaining(&self) -> Duration {
        if self.state.load(Ordering::Relaxed) != EJECTED {
            return Duration::ZERO;
        }
        let left = self
            .until_us
            .load(Ordering::Relaxed)
            .saturating_sub(self.now_us());
        Duration::from_micros(left)
    }

    /// May this call go here? Past its ejection, the first caller to ask
    /// becomes the probe; everyone else keeps away until it answers.
    pub fn admit(&self) -> Admit {
        match self.state.load(Ordering::Relaxed) {
            HEALTHY => Admit::Yes,
            EJECTED if self.now_us() >= self.until_us.load(Ordering::Relaxed) => {
                match self.state.compare_exchange(
                    EJECTED,
                    PROBING,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => Admit::Probe,
                    Err(_) => Admit::No,
                }
            }
            _ => Admit::No,
        }
    }

    /// Gives back a probe that was claimed but never sent (the pick went
    /// elsewhere): the next caller may probe.
    pub fn release_probe(&self) {
        let _ = self
            .state
            .compare_exchange(PROBING, EJECTED, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A call finished well: the endpoint is healthy again.
    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.refused_until_us.store(0, Ordering::Relaxed);
        if self.state.load(Ordering::Relaxed) == PROBING {
            self.ejections.store(0, Ordering::Relaxed);
            self.state.store(HEALTHY, Ordering::Relaxed);
            // Back from an ejection: ramp up again (with slow start on).
            self.warm_since_us.store(self.now_us(), Ordering::Relaxed);
            tracing::info!("outlier probe succeeded; endpoint back");
        }
    }

    /// A call failed. `may_eject` says whether the cluster's share allows one
    /// more ejection. Returns true if this ejected the endpoint.
    pub fn failure(&self, s: &OutlierSettings, may_eject: impl FnOnce() -> bool) -> bool {
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let probing = self.state.load(Ordering::Relaxed) == PROBING;
        let trip = probing
            || (s.consecutive_failures > 0
                && n >= s.consecutive_failures
                && self.state.load(Ordering::Relaxed) == HEALTHY);
        if !trip || (!probing && !may_eject()) {
            return false;
        }
        self.eject(s);
        true
    }

    /// Ejects for the next backoff step: base × 2^k, jittered, at most max.
    fn eject(&self, s: &OutlierSettings) {
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let full = s.base_ejection.saturating_mul(1 << k).min(s.max_ejection);
        // ±10 % jitter, so endpoints ejected together do not return together.
        let time = full
            .mul_f64(0.9 + fastrand::f64() * 0.2)
            .min(s.max_ejection);
        self.until_us
            .store(self.now_us() + time.as_micros() as u64, Ordering::Relaxed);
        self.state.store(EJECTED, Ordering::Relaxed);
        self.consecutive.store(0, Ordering::Relaxed);
        self.ejected_total.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one cluster's endpoints share: the settings and how many are out.
#[derive(Debug)]
pub struct ClusterHealth {
    settings: ArcSwap<OutlierSettings>,
    /// A copy of the failure codes, read on every call's end.
    failure_codes: AtomicU32,
    /// Endpoints in the cluster now.
    members: AtomicUsize,
    /// Endpoints ejected (or probing) now.
    ejected: AtomicUsize,
    /// Bumped whenever an endpoint is ejected or comes back, or its pool
    /// starts or stops backing off (unreachable), so what is
    /// derived from the endpoints' health (zone shares) is recomputed once
    /// per change, not per call.
    changes: Arc<AtomicU32>,
    /// Slow-start window in µs (0: off).
    slow_start_us: AtomicU64,
    /// Whether endpoints count their calls for failure-percentage ejection.
    counting: std::sync::atomic::AtomicBool,
    /// When the interval being counted began (µs after `epoch`).
    interval_start_us: AtomicU64,
    epoch: Instant,
    /// How many retries of failed calls the cluster may still make.
    pub retry_budget: RetryBudget,
}

/// Retries of calls an app failed are bounded so a failing service is not
/// hammered: each call adds a fifth of a retry (20 % of calls, the service's
/// `retry.budget_percent`), at most [`RetryBudget::MAX_SAVED`] saved up, plus
/// [`RetryBudget::MIN_PER_SEC`] retries every second whatever the traffic
/// (`retry.min_retries_per_second`; Finagle's and Linkerd's budget).
#[derive(Debug)]
pub struct RetryBudget {
    /// Saved retries, in thousandths.
    balance_milli: AtomicU64,
    /// What each call adds, in thousandths of a retry (10 × the percent).
    per_call_milli: AtomicU64,
    /// Retries every second whatever the traffic.
    min_per_sec: AtomicU32,
    /// The second (since `epoch`) `floor_used` counts in.
    second: AtomicU64,
    floor_used: AtomicU32,
    epoch: Instant,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            balance_milli: AtomicU64::new(0),
            per_call_milli: AtomicU64::new(Self::PER_CALL_MILLI),
            min_per_sec: AtomicU32::new(Self::MIN_PER_SEC),
            second: AtomicU64::new(0),
            floor_used: AtomicU32::new(0),
            epoch: Instant::now(),
        }
    }
}

impl RetryBudget {
    pub const PER_CALL_MILLI: u64 = 200;
    pub const MAX_SAVED: u64 = 100;
    pub const MIN_PER_SEC: u32 = 10;

    /// The service's budget: `percent` of calls, plus `min_per_sec` a second
    /// (savings so far are kept).
    pub fn configure(&self, percent: u32, min_per_sec: u32) {
        self.per_call_milli
            .store(u64::from(percent) * 10, Ordering::Relaxed);
        self.min_per_sec.store(min_per_sec, Ordering::Relaxed);
    }

    /// One call made: a fifth of a retry more (by default).
    pub fn deposit(&self) {
        let b = self.balance_milli.fetch_add(
            self.per_call_milli.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if b > Self::MAX_SAVED * 1000 {
            self.balance_milli
                .store(Self::MAX_SAVED * 1000, Ordering::Relaxed);
        }
    }

    /// Takes one retry if the budget has one.
    pub fn withdraw(&self) -> bool {
        let now = self.epoch.elapsed().as_secs();
        let s = self.second.load(Ordering::Relaxed);
        if s != now
            && self
                .second
                .compare_exchange(s, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.floor_used.store(0, Ordering::Relaxed);
        }
        if self.floor_used.fetch_add(1, Ordering::Relaxed)
            < self.min_per_sec.load(Ordering::Relaxed)
        {
            return true;
        }
        self.balance_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(1000)
            })
            .is_ok()
    }
}

impl ClusterHealth {
    pub fn new(settings: OutlierSettings) -> Arc<Self> {
        Arc::new(Self {
            failure_codes: AtomicU32::new(settings.failure_codes),
            settings: ArcSwap::from_pointee(settings),
            members: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            changes: Arc::new(AtomicU32::new(0)),
            slow_start_us: AtomicU64::new(0),
            counting: std::sync::atomic::AtomicBool::new(
                settings.failure_percentage > 0 && settings.consecutive_failures > 0,
            ),
            interval_start_us: AtomicU64::new(0),
            epoch: Instant::now(),
            retry_budget: RetryBudget::default(),
        })
    }

    /// New and recovered endpoints ramp up over `window` (zero: off).
    pub fn set_slow_start(&self, window: Duration) {
        self.slow_start_us
            .store(window.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn slow_start(&self) -> Duration {
        Duration::from_micros(self.slow_start_us.load(Ordering::Relaxed))
    }

    /// Detection off (the local app behind the inbound side).
    pub fn off() -> Arc<Self> {
        Self::new(OutlierSettings {
            consecutive_failures: 0,
            ..OutlierSettings::default()
        })
    }

    pub fn update(&self, settings: OutlierSettings, members: usize) {
        self.failure_codes
            .store(settings.failure_codes, Ordering::Relaxed);
        self.counting.store(
            settings.failure_percentage > 0 && settings.consecutive_failures > 0,
            Ordering::Relaxed,
        );
        self.settings.store(Arc::new(settings));
        self.members.store(members, Ordering::Relaxed);
    }

    /// Changes when any endpoint is ejected or comes back, or becomes
    /// unreachable or reachable again (wraps).
    pub fn generation(&self) -> u32 {
        self.changes.load(Ordering::Acquire)
    }

    /// The counter behind [`ClusterHealth::generation`], for the endpoints'
    /// pools to bump when they start or stop backing off.
    pub fn change_counter(&self) -> Arc<AtomicU32> {
        self.changes.clone()
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// Whether any endpoint is out (one load; the pick scans only then).
    pub fn any_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed) > 0
    }

    /// More endpoints out than the share allows (members changed since):
    /// the balancer then ignores ejections (panic mode).
    pub fn panic(&self) -> bool {
        let s = self.settings.load();
        let out = self.ejected.load(Ordering::Relaxed);
        out > 0
            && out * 100 > s.max_ejection_percent as usize * self.members.load(Ordering::Relaxed)
    }

    fn is_failure(&self, code: u8) -> bool {
        code < 32 && self.failure_codes.load(Ordering::Relaxed) & (1 << code) != 0
    }

    /// One more ejection stays within the share (never the last endpoints).
    fn may_eject(&self) -> bool {
        let s = self.settings.load();
        let members = self.members.load(Ordering::Relaxed);
        (self.ejected.load(Ordering::Relaxed) + 1) * 100
            <= s.max_ejection_percent as usize * members
    }
}

/// How a call ended, for the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished with this gRPC status.
    Status(u8),
    /// Never reached the endpoint: connect failure, or a closed connection.
    NotProcessed,
    /// The endpoint's sidecar turned it away unprocessed (REFUSED_STREAM,
    /// GOAWAY): skipped for [`REFUSED_HOLD`], not a failure (no ejection,
    /// no growing backoff).
    Refused,
    /// The per-try timeout fired before the response started: a failure.
    TimedOut,
    /// No verdict on the endpoint (the caller went away first).
    None,
}

impl Outlier {
    /// Feeds one call's outcome to the detector.
    pub fn observe(&self, health: &ClusterHealth, outcome: Outcome) {
        let failed = match outcome {
            Outcome::Status(code) => health.is_failure(code),
            Outcome::NotProcessed | Outcome::TimedOut => true,
            Outcome::Refused => {
                let hold = REFUSED_HOLD.as_micros() as u64;
                self.refused_until_us
                    .store(self.now_us() + hold, Ordering::Relaxed);
                self.release_probe();
                return;
            }
            Outcome::None => {
                self.release_probe();
                return;
            }
        };
        if health.counting.load(Ordering::Relaxed) {
            self.interval_counts
                .fetch_add(1 << 32 | u64::from(failed), Ordering::Relaxed);
        }
        if failed {
            let s = **health.settings.load();
            let was_out = self.is_out();
            if self.failure(&s, || health.may_eject()) {
                if !was_out {
                    health.ejected.fetch_add(1, Ordering::Relaxed);
                    health.changed();
                }
                tracing::info!(consecutive = s.consecutive_failures, remaining = ?self.remaining(), "outlier ejected");
            }
        } else if self.consecutive_failures() > 0
            || self.is_out()
            || self.refused_until_us.load(Ordering::Relaxed) != 0
        {
            let was_out = self.is_out();
            self.success();
            if was_out && !self.is_out() {
                health.ejected.fetch_sub(1, Ordering::Relaxed);
                health.changed();
            }
        }
    }

    /// This interval's (calls, failures), and a new interval begun.
    fn take_interval(&self) -> (u32, u32) {
        let c = self.interval_counts.swap(0, Ordering::Relaxed);
        ((c >> 32) as u32, c as u32)
    }

    /// The endpoint leaves its cluster: it no longer counts as ejected there.
    pub fn leave(&self, health: &ClusterHealth) {
        if self.is_out() {
            health.ejected.fetch_sub(1, Ordering::Relaxed);
            health.changed();
        }
    }
}

/// Failure-percentage ejection over one cluster's endpoints, if its interval
/// has passed (called often, off the call path; see the module docs).
/// Returns how many endpoints it ejected.
pub fn sweep<'a>(health: &ClusterHealth, endpoints: impl Iterator<Item = &'a Outlier>) -> usize {
    let s = **health.settings.load();
    if !health.counting.load(Ordering::Relaxed) {
        return 0;
    }
    let now = Instant::now()
        .saturating_duration_since(health.epoch)
        .as_micros() as u64;
    let start = health.interval_start_us.load(Ordering::Relaxed);
    if now.saturating_sub(start) < s.failure_percentage_interval.as_micros() as u64 {
        return 0;
    }
    health.interval_start_us.store(now, Ordering::Relaxed);
    // An endpoint set is bounded (the model's limit): this allocation is once
    // per interval, never per call.
    let judged: Vec<(&Outlier, u32, u32)> = endpoints
        .map(|o| {
            let (calls, failures) = o.take_interval();
            (o, calls, failures)
        })
        .filter(|(_, calls, _)| *calls >= s.failure_percentage_min_calls.max(1))
        .collect();
    if judged.len() < s.failure_percentage_min_hosts as usize {
        return 0;
    }
    let mut ejected = 0;
    for (o, calls, failures) in judged {
        if o.is_out()
            || u64::from(failures) * 100 < u64::from(s.failure_percentage) * u64::from(calls)
        {
            continue;
        }
        if !health.may_eject() {
            break;
        }
        o.eject(&s);
        health.ejected.fetch_add(1, Ordering::Relaxed);
        ejected += 1;
        tracing::info!(calls, failures, threshold = s.failure_percentage, remaining = ?o.remaining(), "outlier ejected for its failure percentage");
    }
    ejected
}

#[cfg(test)]
mod tests {
    //! The detector in virtual time (`tokio::time::pause`).

    use super::*;

    const UNAVAILABLE: Outcome = Outcome::Status(14);
    const OK: Outcome = Outcome::Status(0);

    fn cluster(members: usize) -> Arc<ClusterHealth> {
        let h = ClusterHealth::new(OutlierSettings::default());
        h.update(OutlierSettings::default(), members);
        h
    }

    fn percentage_cluster(members: usize, percent: u32) -> (Arc<ClusterHealth>, Vec<Outlier>) {
        let s = OutlierSettings {
            failure_percentage: percent,
            ..OutlierSettings::default()
        };
        let h = ClusterHealth::new(s);
        h.update(s, members);
        (h, (0..members).map(|_| Outlier::default()).collect())
    }

    /// `calls` calls on each endpoint; those in `flaky` fail every other one
    /// (never two in a row, so consecutive failures never eject them).
    fn alternate(h: &ClusterHealth, eps: &[Outlier], flaky: usize, calls: usize) {
        for i in 0..calls {
            for (n, o) in eps.iter().enumerate() {
                o.observe(
                    h,
                    if n < flaky && i % 2 == 0 {
                        UNAVAILABLE
                    } else {
                        OK
                    },
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failing_half_the_calls_without_a_streak_ejects_by_percentage() {
        let (h, eps) = percentage_cluster(6, 40);
        let interval = Duration::from_secs(10);
        alternate(&h, &eps, 1, 60);
        assert!(!eps[0].is_out(), "no streak of 5");
        assert_eq!(sweep(&h, eps.iter()), 0, "the interval has not passed");
        tokio::time::advance(interval).await;
        assert_eq!(sweep(&h, eps.iter()), 1);
        assert!(eps[0].is_out() && h.any_ejected());
        assert!(eps[1..].iter().all(|o| !o.is_out()));
        assert_eq!(eps[0].ejected_total.load(Ordering::Relaxed), 1);
        // A new interval: its own counts only, and too few calls to judge.
        alternate(&h, &eps[1..], 5, 10);
        tokio::time::advance(interval).await;
        assert_eq!(sweep(&h, eps.iter()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn percentage_needs_enough_endpoints_and_keeps_the_share() {
        // Four endpoints with calls: fewer than the five needed to judge.
        let (h, eps) = percentage_cluster(4, 40);
        alternate(&h, &eps, 1, 60);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(sweep(&h, eps.iter()), 0);
        // Four of six failing: at most half the cluster goes out.
        let (h, eps) = percentage_cluster(6, 40);
        alternate(&h, &eps, 4, 60);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(sweep(&h, eps.iter()), 3);
        assert!(!h.panic());
        // Below the threshold, or the mode off: nobody.
        let (h, eps) = percentage_cluster(6, 60);
        alternate(&h, &eps, 1, 60);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(sweep(&h, eps.iter()), 0, "50 % < 60 %");
        let (h, eps) = percentage_cluster(6, 0);
        alternate(&h, &eps, 6, 60);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(sweep(&h, eps.iter()), 0, "off");
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_then_one_probe_decides() {
        let h = cluster(3);
        let o = Outlier::default();
        for _ in 0..4 {
            o.observe(&h, UNAVAILABLE);
        }
        assert!(!o.is_out(), "4 < 5 consecutive");
        o.observe(&h, OK);
        for _ in 0..4 {
            o.observe(&h, UNAVAILABLE);
        }
        assert!(!o.is_out(), "a success in between resets the count");
        o.observe(&h, UNAVAILABLE);
        assert!(o.is_out() && h.any_ejected());
        assert_eq!(o.admit(), Admit::No, "ejected");
        let first = o.remaining();
        assert!(
            first >= Duration::from_millis(900) && first <= Duration::from_millis(1100),
            "{first:?}"
        );

        tokio::time::advance(first).await;
        assert_eq!(o.admit(), Admit::Probe, "time's up: one probe");
        assert_eq!(o.admit(), Admit::No, "exactly one");
        // The probe fails: ejected again, for about twice as long.
        o.observe(&h, UNAVAILABLE);
        let second = o.remaining();
        assert!(
            second >= Duration::from_millis(1800) && second <= Duration::from_millis(2200),
            "{second:?}"
        );
        tokio::time::advance(second).await;
        assert_eq!(o.admit(), Admit::Probe);
        // A probe with no verdict (the caller left) frees the slot for another.
        o.observe(&h, Outcome::None);
        assert_eq!(o.admit(), Admit::Probe);
        o.observe(&h, OK);
        assert!(
            !o.is_out() && !h.any_ejected(),
            "a good probe brings it back"
        );
        assert_eq!(o.admit(), Admit::Yes);
        assert_eq!(o.ejected_total.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_the_cap() {
        let h = cluster(2);
        let o = Outlier::default();
        let mut last = Duration::ZERO;
        for round in 0..10 {
            if round == 0 {
                for _ in 0..5 {
                    o.observe(&h, UNAVAILABLE);
                }
            } else {
                tokio::time::advance(last).await;
                assert_eq!(o.admit(), Admit::Probe);
                o.observe(&h, Outcome::NotProcessed);
            }
            last = o.remaining();
            assert!(last <= Duration::from_secs(60), "round {round}: {last:?}");
        }
        assert!(
            last >= Duration::from_secs(54),
            "capped near 60 s: {last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_share_nor_the_last_endpoint() {
        let h = cluster(4);
        let eps: Vec<Outlier> = (0..4).map(|_| Outlier::default()).collect();
        for o in &eps {
            for _ in 0..5 {
                o.observe(&h, UNAVAILABLE);
            }
        }
        let out = eps.iter().filter(|o| o.is_out()).count();
        assert_eq!(out, 2, "50 % of 4");
        assert!(!h.panic());
        // The cluster shrinks under the ejected ones: past the share, panic mode.
        h.update(OutlierSettings::default(), 3);
        assert!(h.panic());

        let lone = cluster(1);
        let o = Outlier::default();
        for _ in 0..50 {
            o.observe(&lone, UNAVAILABLE);
        }
        assert!(!o.is_out(), "the last endpoint is never ejected");
    }

    #[test]
    fn failure_codes() {
        let h = cluster(2);
        for code in [2, 13, 14, 15] {
            assert!(h.is_failure(code), "{code}");
        }
        for code in [0, 1, 3, 4, 5, 7, 8, 12, 16] {
            assert!(!h.is_failure(code), "{code}");
        }
    }
}

#[cfg(test)]
mod slow_start_tests {
    use super::*;

    #[test]
    fn the_share_ramps_from_a_tenth_to_all_over_the_window() {
        let w = Duration::from_secs(30);
        assert_eq!(slow_start_share(Duration::ZERO, w), SLOW_START_MIN);
        assert_eq!(slow_start_share(Duration::from_secs(1), w), SLOW_START_MIN);
        assert!((slow_start_share(Duration::from_secs(15), w) - 0.5).abs() < 1e-9);
        assert_eq!(slow_start_share(w, w), 1.0);
        assert_eq!(slow_start_share(Duration::from_secs(99), w), 1.0);
        assert_eq!(slow_start_share(Duration::ZERO, Duration::ZERO), 1.0);
    }

    #[test]
    fn a_new_endpoint_accepts_about_its_share_and_a_warm_one_all() {
        let o = Outlier::default();
        let window = Duration::from_secs(3600);
        let accepted = (0..10_000).filter(|_| o.warm_admits(window)).count();
        // 10 % at the start of a long window (binomial: ±~1 %).
        assert!((700..1300).contains(&accepted), "{accepted}");
        o.mark_warm();
        assert!((0..1000).all(|_| o.warm_admits(window)));
        assert!(Outlier::default().warm_admits(Duration::ZERO));
    }
}

#[cfg(test)]
mod retry_budget_tests {
    use super::*;

    #[test]
    fn ten_a_second_then_a_fifth_of_the_calls() {
        let b = RetryBudget::default();
        // No calls yet: only the per-second floor (the test runs well within
        // one second of the budget's creation, or the floor resets once).
        let floor = (0..100).filter(|_| b.withdraw()).count();
        assert!(
            (RetryBudget::MIN_PER_SEC as usize..=2 * RetryBudget::MIN_PER_SEC as usize)
                .contains(&floor),
            "{floor}"
        );
        // 50 calls earn 10 retries.
        let b = RetryBudget::default();
        for _ in 0..RetryBudget::MIN_PER_SEC {
            assert!(b.withdraw());
        }
        for _ in 0..50 {
            b.deposit();
        }
        let earned = (0..100).filter(|_| b.withdraw()).count();
        assert!(
            (10..=10 + RetryBudget::MIN_PER_SEC as usize).contains(&earned),
            "{earned}"
        );
        // Savings are capped.
        let b = RetryBudget::default();
        for _ in 0..100_000 {
            b.deposit();
        }
        let saved = (0..1000).filter(|_| b.withdraw()).count() as u64;
        assert!(
            saved <= RetryBudget::MAX_SAVED + 2 * u64::from(RetryBudget::MIN_PER_SEC),
            "{saved}"
        );
    }
}
