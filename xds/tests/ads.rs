//! The ADS server and the sidecar's client against each other, in-process
//! on 127.0.0.1:0, plus a raw Delta client against the server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshwire_mesh::{Cluster, Endpoint};
use meshwire_xds::Snapshot;
use meshwire_xds::client::{self, ClientConfig, ClientStatus, ConfigSink};
use meshwire_xds::resources::{CLUSTER, ENDPOINT};
use meshwire_xds::server::{AdsServer, StreamObserver};
use tokio::sync::watch;
use tokio_stream::StreamExt;

#[derive(Default)]
struct Observer {
    events: Mutex<Vec<String>>,
}

impl StreamObserver for Observer {
    fn connected(&self, s: u64, node: &str, svc: &str, ua: &str) {
        self.push(format!("connected {s} {node} {svc} {ua}"));
    }
    fn pushed(&self, _: u64, _: &str, _: &str) {}
    fn acked(&self, s: u64, t: &str, v: &str) {
        self.push(format!("ack {s} {} {v}", short(t)));
    }
    fn nacked(&self, s: u64, t: &str, v: &str, e: &str) {
        self.push(format!("nack {s} {} {v} {e}", short(t)));
    }
    fn disconnected(&self, s: u64) {
        self.push(format!("disconnected {s}"));
    }
}

impl Observer {
    fn push(&self, e: String) {
        self.events.lock().unwrap().push(e);
    }
    /// This exact event.
    fn saw(&self, event: &str) -> bool {
        self.events.lock().unwrap().iter().any(|e| e == event)
    }
    fn has(&self, needle: &str) -> bool {
        self.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains(needle))
    }
}

/// Bounded polling of the observer's events.
async fn until(obs: &Observer, f: impl Fn(&Observer) -> bool) {
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for _ in 0..1000 {
        if f(obs) {
            return;
        }
        tick.tick().await;
    }
    panic!("observer never saw it: {:?}", obs.events.lock().unwrap());
}

fn short(t: &str) -> &str {
    t.rsplit('.').next().unwrap_or(t)
}

/// Records what is applied; rejects clusters named `reject-me` (the whole
/// update), and clusters with more than `max_endpoints` (that cluster alone,
/// through `check`).
#[derive(Default)]
struct Sink {
    applied: Mutex<Vec<Vec<Cluster>>>,
    max_endpoints: Option<usize>,
}

impl ConfigSink for Sink {
    fn apply(&self, clusters: &[Cluster]) -> Result<(), meshwire_xds::client::ApplyError> {
        if clusters.iter().any(|c| c.name == "reject-me") {
            return Err(meshwire_xds::client::ApplyError(
                "cluster reject-me is not allowed here".into(),
            ));
        }
        self.applied.lock().unwrap().push(clusters.to_vec());
        Ok(())
    }

    fn check(&self, c: &Cluster) -> Result<(), meshwire_xds::client::ApplyError> {
        match self.max_endpoints {
            Some(max) if c.endpoints.len() > max => Err(meshwire_xds::client::ApplyError(format!(
                "{} endpoints, at most {max} here",
                c.endpoints.len()
            ))),
            _ => Ok(()),
        }
    }
}

fn cluster(name: &str, ports: &[(u16, u32)]) -> Cluster {
    let mut c = Cluster::new(name);
    c.endpoints = ports
        .iter()
        .map(|&(p, w)| Endpoint::new(SocketAddr::from(([127, 0, 0, 1], p))).with_weight(w))
        .collect();
    c
}

async fn serve(
    snap: Snapshot,
) -> (
    SocketAddr,
    watch::Sender<Arc<Snapshot>>,
    Arc<Observer>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(Arc::new(snap));
    let obs = Arc::new(Observer::default());
    let svc = AdsServer::new(rx, obs.clone()).into_service();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    (addr, tx, obs, task)
}

async fn wait_for(
    status: &mut watch::Receiver<ClientStatus>,
    what: &str,
    mut f: impl FnMut(&ClientStatus) -> bool,
) -> ClientStatus {
    let r = tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| f(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match r {
        Ok(Ok(s)) => s,
        _ => panic!("timed out waiting for {what}: {:?}", *status.borrow()),
    }
}

fn start_client(
    addr: SocketAddr,
    sink: Arc<Sink>,
) -> (watch::Receiver<ClientStatus>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(ClientStatus::default());
    let cfg = ClientConfig {
        servers: vec![format!("http://{addr}")],
        node_id: "node-1".into(),
        service: "caller".into(),
        zone: None,
        user_agent: "meshwire-sidecar".into(),
        connect_timeout: Duration::from_secs(1),
        tls: None,
    };
    (rx, tokio::spawn(client::run(cfg, sink, tx)))
}

#[tokio::test]
async fn client_applies_pushes_and_acks() {
    let (addr, tx, obs, _server) = serve(Snapshot::new(1, [cluster("a", &[(1001, 1)])])).await;
    let sink = Arc::new(Sink::default());
    let (mut status, _client) = start_client(addr, sink.clone());

    let s = wait_for(&mut status, "first config", |s| s.warm).await;
    assert_eq!(s.applied, vec![cluster("a", &[(1001, 1)])]);
    assert_eq!(s.cds_version.as_deref(), Some("1"));
    assert!(obs.has("connected 1 node-1 caller meshwire-sidecar"));

    // A weight change and a new service.
    tx.send(Arc::new(Snapshot::new(
        2,
        [
            cluster("a", &[(1001, 5)]),
            cluster("b", &[(2001, 1), (2002, 2)]),
        ],
    )))
    .unwrap();
    let s = wait_for(&mut status, "version 2 with b", |s| {
        s.warm && s.applied.len() == 2 && s.eds_version.as_deref() == Some("2")
    })
    .await;
    assert_eq!(s.applied[0].endpoints[0].weight, 5);
    assert_eq!(s.applied[1].endpoints.len(), 2);
    // No config was ever applied with b lacking its endpoints (warming).
    for applied in sink.applied.lock().unwrap().iter() {
        for c in applied {
            assert!(!c.endpoints.is_empty(), "{c:?} served without endpoints");
        }
    }
    until(&obs, |o| {
        o.has("ack 1 Cluster 2") && o.has("ack 1 ClusterLoadAssignment 2")
    })
    .await;

    // Removing a service.
    tx.send(Arc::new(Snapshot::new(3, [cluster("b", &[(2001, 1)])])))
        .unwrap();
    let s = wait_for(&mut status, "a removed", |s| {
        s.cds_version.as_deref() == Some("3")
    })
    .await;
    assert_eq!(s.applied.len(), 1);
    assert_eq!(s.applied[0].name, "b");
}

#[tokio::test]
async fn rejected_update_is_nacked_and_last_good_keeps_serving() {
    let (addr, tx, obs, _server) = serve(Snapshot::new(1, [cluster("a", &[(1001, 1)])])).await;
    let sink = Arc::new(Sink::default());
    let (mut status, _client) = start_client(addr, sink.clone());
    wait_for(&mut status, "first config", |s| s.warm).await;

    tx.send(Arc::new(Snapshot::new(
        2,
        [
            cluster("a", &[(1001, 1)]),
            cluster("reject-me", &[(3001, 1)]),
        ],
    )))
    .unwrap();
    let s = wait_for(&mut status, "a NACK", |s| s.last_nack.is_some()).await;
    let nack = s.last_nack.unwrap();
    assert_eq!(nack.version, "2");
    assert!(nack.error.contains("reject-me"), "{nack:?}");
    // The new cluster warms (CDS accepted) until its endpoints arrive; applying
    // it then fails, so the EDS update is refused.
    assert_eq!(nack.type_url, ENDPOINT);
    assert_eq!(
        s.applied,
        vec![cluster("a", &[(1001, 1)])],
        "last good config kept"
    );
    assert_eq!(s.eds_version.as_deref(), Some("1"));
    until(&obs, |o| {
        o.has("nack 1 ClusterLoadAssignment 2 cluster reject-me is not allowed here")
    })
    .await;

    // The next good version is applied.
    tx.send(Arc::new(Snapshot::new(3, [cluster("a", &[(1001, 2)])])))
        .unwrap();
    let s = wait_for(&mut status, "version 3", |s| {
        s.cds_version.as_deref() == Some("3") && s.eds_version.as_deref() == Some("3")
    })
    .await;
    assert_eq!(s.applied[0].endpoints[0].weight, 2);
}

/// One service this client refuses (too many endpoints) neither keeps a new
/// client from becoming ready nor holds back updates of the others.
#[tokio::test]
async fn one_refused_cluster_never_blocks_readiness_or_the_others() {
    let big = |n: u16| cluster("big", &(0..n).map(|i| (3001 + i, 1)).collect::<Vec<_>>());
    let (addr, tx, obs, _server) =
        serve(Snapshot::new(1, [cluster("a", &[(1001, 1)]), big(3)])).await;
    let sink = Arc::new(Sink {
        max_endpoints: Some(2),
        ..Default::default()
    });
    let (mut status, _client) = start_client(addr, sink.clone());

    let s = wait_for(&mut status, "ready without big", |s| s.warm).await;
    assert_eq!(s.applied, vec![cluster("a", &[(1001, 1)])]);
    assert!(s.rejected["big"].contains("3 endpoints"), "{s:?}");
    assert!(s.warming.is_empty(), "{s:?}");
    let nack = s.last_nack.expect("the refusal is reported");
    assert!(nack.error.contains("\"big\""), "{nack:?}");
    until(&obs, |o| o.has("nack 1 ClusterLoadAssignment 1")).await;

    // A change to `a` reaches the client while `big` is still refused.
    tx.send(Arc::new(Snapshot::new(
        2,
        [cluster("a", &[(1001, 5)]), big(3)],
    )))
    .unwrap();
    let s = wait_for(&mut status, "a's new weight", |s| {
        s.applied.first().map(|c| c.endpoints[0].weight) == Some(5)
    })
    .await;
    assert_eq!(s.applied.len(), 1);

    // Once `big` fits, it is applied and everything is ACKed.
    tx.send(Arc::new(Snapshot::new(
        3,
        [cluster("a", &[(1001, 5)]), big(2)],
    )))
    .unwrap();
    let s = wait_for(&mut status, "big applied", |s| {
        s.eds_version.as_deref() == Some("3")
    })
    .await;
    assert_eq!(s.applied.len(), 2);
    assert!(s.rejected.is_empty(), "{s:?}");
    for applied in sink.applied.lock().unwrap().iter() {
        for c in applied {
            assert!(c.endpoints.len() <= 2, "{c:?} applied over the limit");
        }
    }
}

#[tokio::test]
async fn client_survives_a_server_restart() {
    let (addr, tx, _obs, server) = serve(Snapshot::new(1, [cluster("a", &[(1001, 1)])])).await;
    let sink = Arc::new(Sink::default());
    let (mut status, _client) = start_client(addr, sink.clone());
    wait_for(&mut status, "first config", |s| s.warm).await;
    server.abort();
    drop(tx);
    wait_for(&mut status, "disconnected", |s| !s.connected).await;
    assert_eq!(
        status.borrow().applied.len(),
        1,
        "still serving while disconnected"
    );

    // A new server on the same port, with a newer version.
    let (tx2, rx2) = watch::channel(Arc::new(Snapshot::new(7, [cluster("a", &[(1001, 9)])])));
    let svc = AdsServer::new(rx2, Arc::new(Observer::default())).into_service();
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _server2 = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    let s = wait_for(&mut status, "resubscribed", |s| {
        s.eds_version.as_deref() == Some("7")
    })
    .await;
    assert_eq!(s.applied[0].endpoints[0].weight, 9);
    drop(tx2);
}

#[tokio::test]
async fn delta_subscribe_update_remove() {
    let (addr, tx, obs, _server) = serve(Snapshot::new(
        1,
        [cluster("a", &[(1001, 1)]), cluster("b", &[(2001, 1)])],
    ))
    .await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(8);
    req_tx
        .send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "envoy-1".into(),
                ..Default::default()
            }),
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut resp = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let r = resp.next().await.unwrap().unwrap();
    let names: Vec<_> = r.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "wildcard CDS");
    let versions: BTreeMap<_, _> = r
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // EDS for b only.
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: ENDPOINT.into(),
            resource_names_subscribe: vec!["b".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let e = resp.next().await.unwrap().unwrap();
    assert_eq!(e.type_url, ENDPOINT);
    assert_eq!(e.resources.len(), 1);
    assert_eq!(e.resources[0].name, "b");
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: ENDPOINT.into(),
            response_nonce: e.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    // a changes, b unchanged, c added: only a and c are sent; then a is removed.
    tx.send(Arc::new(Snapshot::new(
        2,
        [
            cluster("a", &[(1001, 1)]).tap_timeout(),
            cluster("b", &[(2001, 1)]),
            cluster("c", &[(3001, 1)]),
        ],
    )))
    .unwrap();
    let r2 = resp.next().await.unwrap().unwrap();
    assert_eq!(r2.type_url, CLUSTER);
    let names: Vec<_> = r2.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_ne!(r2.resources[0].version, versions["a"]);
    assert!(r2.removed_resources.is_empty());
    req_tx
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: r2.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    tx.send(Arc::new(Snapshot::new(
        3,
        [cluster("b", &[(2001, 1)]), cluster("c", &[(3001, 1)])],
    )))
    .unwrap();
    let r3 = resp.next().await.unwrap().unwrap();
    assert!(r3.resources.is_empty());
    assert_eq!(r3.removed_resources, ["a"]);
    assert!(obs.has("connected 1 envoy-1"));
}

trait Tap {
    fn tap_timeout(self) -> Self;
}

impl Tap for Cluster {
    fn tap_timeout(mut self) -> Self {
        self.connect_timeout = Duration::from_millis(300);
        self
    }
}

#[tokio::test]
async fn sotw_eds_sends_only_changed_assignments() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    let (addr, tx, _obs, _server) = serve(Snapshot::new(
        1,
        [cluster("a", &[(1001, 1)]), cluster("b", &[(2001, 1)])],
    ))
    .await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(8);
    req_tx
        .send(DiscoveryRequest {
            node: Some(Node {
                id: "n".into(),
                ..Default::default()
            }),
            type_url: ENDPOINT.into(),
            resource_names: vec!["a".into(), "b".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut resp = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    let first = resp.next().await.unwrap().unwrap();
    assert_eq!(
        first.resources.len(),
        2,
        "the initial response has everything asked for"
    );
    req_tx
        .send(DiscoveryRequest {
            type_url: ENDPOINT.into(),
            resource_names: vec!["a".into(), "b".into()],
            version_info: first.version_info.clone(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    tx.send(Arc::new(Snapshot::new(
        2,
        [cluster("a", &[(1001, 7)]), cluster("b", &[(2001, 1)])],
    )))
    .unwrap();
    let second = resp.next().await.unwrap().unwrap();
    assert_eq!(second.version_info, "2");
    assert_eq!(second.resources.len(), 1, "only the changed assignment");
    let (name, eps) = meshwire_xds::resources::decode_cla(&second.resources[0]).unwrap();
    assert_eq!((name.as_str(), eps[0].weight), ("a", 7));
}

/// SotW and Delta replies go through the same ACK/NACK path: a NACK or ACK
/// of the latest response is reported with the version sent under that
/// nonce, a reply to an older response is ignored.
#[tokio::test]
async fn sotw_and_delta_ack_nack_and_ignore_stale_replies_alike() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    let nack = |msg: &str| {
        Some(RpcStatus {
            message: msg.into(),
            ..Default::default()
        })
    };
    let node = || {
        Some(Node {
            id: "n".into(),
            ..Default::default()
        })
    };
    let (addr, tx, obs, _server) = serve(Snapshot::new(1, [cluster("a", &[(1001, 1)])])).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // State of the World: stream 1.
    let (sotw_tx, rx) = tokio::sync::mpsc::channel(8);
    sotw_tx
        .send(DiscoveryRequest {
            node: node(),
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut sotw = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let s1 = sotw.next().await.unwrap().unwrap();

    // Delta: stream 2.
    let (delta_tx, rx) = tokio::sync::mpsc::channel(8);
    delta_tx
        .send(DeltaDiscoveryRequest {
            node: node(),
            type_url: CLUSTER.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut delta = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let d1 = delta.next().await.unwrap().unwrap();

    tx.send(Arc::new(Snapshot::new(
        2,
        [cluster("a", &[(1001, 1)]), cluster("b", &[(2001, 1)])],
    )))
    .unwrap();
    let s2 = sotw.next().await.unwrap().unwrap();
    let d2 = delta.next().await.unwrap().unwrap();

    for (nonce, error) in [(&s1.nonce, nack("stale")), (&s2.nonce, nack("bad sotw"))] {
        sotw_tx
            .send(DiscoveryRequest {
                type_url: CLUSTER.into(),
                response_nonce: nonce.clone(),
                error_detail: error,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for (nonce, error) in [(&d1.nonce, nack("stale")), (&d2.nonce, nack("bad delta"))] {
        delta_tx
            .send(DeltaDiscoveryRequest {
                type_url: CLUSTER.into(),
                response_nonce: nonce.clone(),
                error_detail: error,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    until(&obs, |o| {
        o.has("nack 1 Cluster 2 bad sotw") && o.has("nack 2 Cluster 2 bad delta")
    })
    .await;
    assert!(!obs.has("stale"), "a reply to an older response is ignored");

    sotw_tx
        .send(DiscoveryRequest {
            type_url: CLUSTER.into(),
            version_info: s2.version_info.clone(),
            response_nonce: s2.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    delta_tx
        .send(DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: d2.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    until(&obs, |o| {
        o.saw("ack 1 Cluster 2") && o.saw("ack 2 Cluster 2")
    })
    .await;
}
