//! Circuit breaking: exact limits on calls in flight, so an overloaded
//! service or app sheds excess calls at once instead of queueing them
//! without bound.
//!
//! ```text
//! outbound: dispatch ─▶ InFlight::try_admit (per service, --max-requests-per-service)
//!             full → UNAVAILABLE + meshwire-error: overloaded, in microseconds
//! inbound:  send_to_app ─▶ semaphore (--max-app-calls), waiting at most --app-queue-timeout
//!             full → RST_STREAM(REFUSED_STREAM): not processed, the caller goes elsewhere
//! ```
//! The held slot or permit travels with the call's [`crate::endpoint::CallGuard`]
//! (into the response body), so a streaming call counts until it ends. One
//! atomic counter (or one semaphore) per service, shared by all worker
//! threads: the limit is exact, not per thread (envoy#2927).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Calls in flight to one service.
#[derive(Debug, Default)]
pub struct InFlight {
    n: AtomicUsize,
}

impl InFlight {
    /// One more call, if fewer than `limit` are in flight (0: no limit).
    pub fn try_admit(self: &Arc<Self>, limit: usize) -> Option<Slot> {
        let before = self.n.fetch_add(1, Ordering::Relaxed);
        if limit != 0 && before >= limit {
            self.n.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(self.clone()))
    }

    pub fn current(&self) -> usize {
        self.n.load(Ordering::Relaxed)
    }
}

/// One admitted call; dropping it frees the place.
#[derive(Debug)]
pub struct Slot(Arc<InFlight>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a call holds while it runs.
#[derive(Debug)]
pub enum Hold {
    Slot(Slot),
    Permit(tokio::sync::OwnedSemaphorePermit),
    /// A permit kept across attempts (the last holder frees it).
    Shared(Arc<tokio::sync::OwnedSemaphorePermit>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_exact_under_contention() {
        let f = Arc::new(InFlight::default());
        let admitted = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if let Some(slot) = f.try_admit(10) {
                            admitted.lock().unwrap().push(slot);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.lock().unwrap().len(), 10);
        assert_eq!(f.current(), 10);
        admitted.lock().unwrap().clear();
        assert_eq!(f.current(), 0);
        let unlimited: Vec<_> = (0..100).filter_map(|_| f.try_admit(0)).collect();
        assert_eq!(unlimited.len(), 100);
    }
}
