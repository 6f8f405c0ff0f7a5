//! Publishing snapshots for the xDS server, coalesced.
//!
//! Every commit bumps a version on a `watch`; the publisher turns that into
//! a new `Arc<Snapshot>` on the channel the ADS streams follow. The first
//! change after a quiet period is published at once; changes during the
//! following window are folded into one publish at the end of it; and the
//! latest state is always published eventually. So a burst of 1,000 API calls
//! in a second costs at most about 1 s / window publishes (50 with 20 ms),
//! not 1,000 full snapshots pushed to every sidecar.

use std::sync::Arc;
use std::time::Duration;

use meshwire_xds::Snapshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The default coalescing window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(20);

/// Publishes `build()` on `tx` whenever `changes` moves, at most once per
/// `window`, until `shutdown` (then once more if something is unpublished).
pub async fn run(
    mut changes: watch::Receiver<u64>,
    build: impl Fn() -> Snapshot,
    tx: watch::Sender<Arc<Snapshot>>,
    window: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = changes.changed() => if r.is_err() { break },
        }
        publish(&build, &tx);
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(window) => {}
        }
    }
    // Never lose the last change.
    if changes.has_changed().unwrap_or(false) {
        publish(&build, &tx);
    }
    tracing::debug!("publisher stopped");
}

fn publish(build: &impl Fn() -> Snapshot, tx: &watch::Sender<Arc<Snapshot>>) {
    let snapshot = build();
    let version = snapshot.version;
    // A change that raced the last build may already be in it.
    if version == tx.borrow().version {
        return;
    }
    tracing::debug!(
        version,
        services = snapshot.clusters.len(),
        "snapshot published"
    );
    tx.send_replace(Arc::new(snapshot));
}

#[cfg(test)]
mod tests {
    use meshwire_mesh::{Cluster, Endpoint};
    use tokio::time::Instant;

    use super::*;
    use crate::registry::Registry;
    use crate::store::MemoryStore;

    /// A publisher over a bare version counter.
    struct Rig {
        changes: watch::Sender<u64>,
        rx: watch::Receiver<Arc<Snapshot>>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(window: Duration) -> Rig {
        let changes = watch::channel(0u64).0;
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let src = changes.subscribe();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            changes.subscribe(),
            move || Snapshot::new(*src.borrow(), []),
            tx,
            window,
            stop.clone(),
        ));
        Rig {
            changes,
            rx,
            stop,
            task,
        }
    }

    /// Records every published version with the (virtual) time it was seen.
    fn record(
        mut rx: watch::Receiver<Arc<Snapshot>>,
    ) -> tokio::task::JoinHandle<Vec<(u64, Instant)>> {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while rx.changed().await.is_ok() {
                seen.push((rx.borrow_and_update().version, Instant::now()));
            }
            seen
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_coalesced_and_the_last_change_is_published() {
        let Rig {
            changes,
            rx,
            stop,
            task,
        } = start(DEFAULT_WINDOW);
        let seen = record(rx);
        let start = Instant::now();
        // 1,000 changes in one second.
        for v in 1..=1000u64 {
            changes.send_replace(v);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(DEFAULT_WINDOW * 3).await;
        stop.cancel();
        task.await.unwrap();
        let seen = seen.await.unwrap();

        assert!(
            seen.len() <= 51,
            "{} publishes for 1,000 changes",
            seen.len()
        );
        assert!(
            seen.len() >= 40,
            "publishes are windowed, not skipped: {}",
            seen.len()
        );
        // The first change went out at once, the last one made it.
        assert_eq!(seen[0], (1, start));
        assert_eq!(seen.last().unwrap().0, 1000);
        // Versions only go forward, at most one publish per window.
        for w in seen.windows(2) {
            assert!(w[1].0 > w[0].0);
            assert!(w[1].1 - w[0].1 >= DEFAULT_WINDOW, "{:?}", w);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_quiet_period_a_change_goes_out_immediately() {
        let Rig {
            changes,
            mut rx,
            stop,
            task,
        } = start(DEFAULT_WINDOW);
        changes.send_replace(1);
        rx.changed().await.unwrap();
        changes.send_replace(2);
        // Folded into the end of the first window.
        let t = Instant::now();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().version, 2);
        assert!(Instant::now() - t <= DEFAULT_WINDOW);

        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = Instant::now();
        changes.send_replace(3);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().version, 3);
        assert_eq!(Instant::now(), t, "no delay after a quiet period");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_publishes_what_is_pending() {
        let Rig {
            changes,
            mut rx,
            stop,
            task,
        } = start(Duration::from_secs(3600));
        changes.send_replace(1);
        rx.changed().await.unwrap();
        changes.send_replace(2);
        stop.cancel();
        task.await.unwrap();
        assert_eq!(rx.borrow_and_update().version, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn registry_bursts_reach_the_snapshot_coalesced() {
        let reg = Registry::load(Arc::new(MemoryStore::default()))
            .await
            .unwrap();
        let (tx, rx) = watch::channel(Arc::new(reg.snapshot()));
        let stop = CancellationToken::new();
        let r = reg.clone();
        let task = tokio::spawn(run(
            reg.versions(),
            move || r.snapshot(),
            tx,
            DEFAULT_WINDOW,
            stop.clone(),
        ));
        let seen = record(rx);
        reg.create_service(Cluster::new("s")).await.unwrap();
        for p in 1..=1000u16 {
            let ep = Endpoint::new(([10, 0, 0, 1], p).into());
            reg.add_endpoint("s", ep).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(DEFAULT_WINDOW * 2).await;
        stop.cancel();
        task.await.unwrap();
        let seen = seen.await.unwrap();
        assert!(seen.len() <= 52, "{} publishes", seen.len());
        assert_eq!(seen.last().unwrap().0, 1001);
        assert_eq!(reg.snapshot().clusters["s"].endpoints.len(), 1000);
    }
}
