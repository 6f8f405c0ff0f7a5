//! xDS from the tests' side: an in-process ADS server (the control plane's
//! server alone) that records what its clients ACK and NACK, and what a
//! sidecar reports it has applied.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use meshwire_mesh::Cluster;
use tokio::net::TcpListener;

use crate::{http1_get, localhost};

/// What an in-process ADS server saw its clients do.
#[derive(Debug, Default)]
pub struct XdsEvents {
    pub events: std::sync::Mutex<Vec<String>>,
}

impl XdsEvents {
    pub fn any(&self, needle: &str) -> bool {
        self.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains(needle))
    }
}

impl meshwire_xds::server::StreamObserver for XdsEvents {
    fn connected(&self, s: u64, node: &str, svc: &str, ua: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("connected {s} {node} {svc} {ua}"));
    }
    fn pushed(&self, _: u64, _: &str, _: &str) {}
    fn acked(&self, s: u64, t: &str, v: &str) {
        self.events.lock().unwrap().push(format!("ack {s} {t} {v}"));
    }
    fn nacked(&self, s: u64, t: &str, v: &str, e: &str) {
        self.events
            .lock()
            .unwrap()
            .push(format!("nack {s} {t} {v} {e}"));
    }
    fn disconnected(&self, s: u64) {
        self.events
            .lock()
            .unwrap()
            .push(format!("disconnected {s}"));
    }
}

/// An ADS server serving whatever is sent on `tx`.
#[derive(Debug)]
pub struct Ads {
    pub addr: SocketAddr,
    pub tx: tokio::sync::watch::Sender<std::sync::Arc<meshwire_xds::Snapshot>>,
    pub events: std::sync::Arc<XdsEvents>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Ads {
    /// Serves on an already bound listener (so a client can be pointed at it first).
    pub fn serve(listener: TcpListener, snap: meshwire_xds::Snapshot) -> Ads {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(snap));
        let events = std::sync::Arc::new(XdsEvents::default());
        let svc = meshwire_xds::server::AdsServer::new(rx, events.clone()).into_service();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ads {
            addr,
            tx,
            events,
            task,
        }
    }

    pub async fn start(snap: meshwire_xds::Snapshot) -> Ads {
        Self::serve(TcpListener::bind(localhost()).await.unwrap(), snap)
    }

    pub fn publish(&self, version: u64, clusters: Vec<Cluster>) {
        self.tx
            .send(std::sync::Arc::new(meshwire_xds::Snapshot::new(
                version, clusters,
            )))
            .unwrap();
    }
}

/// Polls a sidecar's `/config_dump` until `f` holds.
pub async fn config_dump_until(
    admin: SocketAddr,
    what: &str,
    limit: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let start = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if let Ok((StatusCode::OK, _, body)) = http1_get(admin, "admin", "/config_dump").await
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            && f(&v)
        {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
    }
}

/// The endpoint version a sidecar has applied (from `/config_dump`).
pub fn applied_eds(dump: &serde_json::Value) -> u64 {
    dump["source"]["versions"]["endpoints"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
