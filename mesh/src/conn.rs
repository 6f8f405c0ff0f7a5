//! What one served connection's calls tell its task: the sidecar's
//! listeners and the control plane's ports both close a connection that
//! asks nothing in time, and one left idle, through [`ConnActivity`].
//!
//! A connection's calls are counted with [`ConnActivity::start`] and a
//! [`CallGuard`] (dropped when the call ends); [`ConnActivity::watch`]
//! resolves when the connection should end: no call within the first-request
//! timeout, no call in flight and none started for the idle timeout, or (the
//! sidecar's "slow reset" rule) most calls cancelled by the client before
//! they were answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Calls a connection starts before its cancellations are judged.
pub const RESET_MIN_STREAMS: u64 = 100;

/// One connection's calls (see the module docs).
#[derive(Debug)]
pub struct ConnActivity {
    epoch: Instant,
    started: AtomicU64,
    in_flight: AtomicUsize,
    /// Calls the client cancelled before they were answered.
    cancelled: AtomicU64,
    /// When a call last started or ended, in ms since `epoch`.
    last_ms: AtomicU64,
    abusive: tokio::sync::Notify,
}

/// Why [`ConnActivity::watch`] ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// No call within the first-request timeout.
    NoRequest,
    /// No call in flight and none started for the idle timeout.
    Idle,
    /// The client cancelled most of its calls before they were answered.
    Abusive,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::NoRequest => "no request in time",
            Ended::Idle => "idle",
            Ended::Abusive => "most calls cancelled",
        }
    }
}

impl Default for ConnActivity {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnActivity {
    /// A connection with no call yet; its clocks start now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            cancelled: AtomicU64::new(0),
            last_ms: AtomicU64::new(0),
            abusive: tokio::sync::Notify::new(),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// A call started; it ends when the returned guard is dropped (set
    /// [`CallGuard::answered`] once it was answered, for the slow-reset rule).
    pub fn start(self: &Arc<Self>) -> CallGuard {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        CallGuard {
            activity: self.clone(),
            answered: false,
        }
    }

    fn end(&self, answered: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.touch();
        if !answered {
            let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
            let started = self.started.load(Ordering::Relaxed);
            if started >= RESET_MIN_STREAMS && cancelled * 2 > started {
                self.abusive.notify_one();
            }
        }
    }

    /// Calls started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Calls not ended yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// When a call last started or ended (the connection's start if none did).
    pub fn last_active(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves when the connection should end: no call within `first` (from
    /// now), idle for `idle`, or abusive.
    pub async fn watch(&self, first: Duration, idle: Duration) -> Ended {
        // Instants cannot hold any duration a flag accepts.
        let idle = idle.min(Duration::from_secs(10 * 365 * 86_400));
        let first = first.min(Duration::from_secs(10 * 365 * 86_400));
        let abusive = self.abusive.notified();
        tokio::pin!(abusive);
        tokio::select! {
            () = abusive.as_mut() => return Ended::Abusive,
            () = tokio::time::sleep(first) => {}
        }
        if self.started() == 0 {
            return Ended::NoRequest;
        }
        loop {
            let last = self.last_active();
            let quiet = self.in_flight() == 0;
            if quiet && last.elapsed() >= idle {
                return Ended::Idle;
            }
            let wake = if quiet {
                last + idle
            } else {
                Instant::now() + idle
            };
            tokio::select! {
                () = abusive.as_mut() => return Ended::Abusive,
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// Ends its call in the connection's [`ConnActivity`] when dropped.
#[derive(Debug)]
pub struct CallGuard {
    activity: Arc<ConnActivity>,
    /// Set once the call was answered; a call dropped unanswered counts as
    /// cancelled by the client.
    pub answered: bool,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.activity.end(self.answered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silent_idle_and_abusive_connections_end() {
        let first = Duration::from_secs(10);
        let idle = Duration::from_secs(60);
        let a = Arc::new(ConnActivity::new());
        assert_eq!(a.watch(first, idle).await, Ended::NoRequest);

        let a = Arc::new(ConnActivity::new());
        a.start().answered = true;
        let t = Instant::now();
        assert_eq!(a.watch(first, idle).await, Ended::Idle);
        assert!(t.elapsed() >= idle);

        // A call in flight is never idle; once it ends, the clock starts.
        let a = Arc::new(ConnActivity::new());
        let mut call = a.start();
        let w = tokio::spawn({
            let a = a.clone();
            async move { a.watch(first, idle).await }
        });
        tokio::time::sleep(idle * 3).await;
        assert!(!w.is_finished());
        call.answered = true;
        drop(call);
        assert_eq!(w.await.unwrap(), Ended::Idle);

        // Cancelled calls: fine below half of the calls, abusive above.
        let a = Arc::new(ConnActivity::new());
        for _ in 0..RESET_MIN_STREAMS {
            a.start().answered = true;
        }
        for _ in 0..RESET_MIN_STREAMS {
            drop(a.start());
        }
        drop(a.start());
        assert_eq!(a.watch(first, idle).await, Ended::Abusive);
    }
}
