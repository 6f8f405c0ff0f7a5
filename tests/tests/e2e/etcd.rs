//! The control plane on real etcd (`/usr/bin/etcd`, started here on
//! loopback): replicas share one configuration, see each other's writes
//! through the watch, serve identical xDS, and meshes on one etcd stay apart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use meshwire_proto::admin::v1 as pb;
use meshwire_tests::etcd::{Etcd, Relay};
use meshwire_tests::{
    Admin, ControlPlaneProcess, Load, SidecarProcess, admin_json, api, applied_eds,
    config_dump_until, echo, echo_client,
};
use tokio_stream::StreamExt;

const TOKEN: &str = "etcd-test-admin-token-0123456789abcdef";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// A replica on `etcd` (URLs) under `prefix`, with the shared admin token.
async fn replica(etcd: &str, prefix: &str) -> (ControlPlaneProcess, tempfile::TempDir) {
    replica_with(etcd, prefix, &[]).await
}

/// [`replica`] with more environment (flags).
async fn replica_with(
    etcd: &str,
    prefix: &str,
    envs: &[(&str, &str)],
) -> (ControlPlaneProcess, tempfile::TempDir) {
    replica_at(etcd, prefix, None, tempfile::tempdir().unwrap(), envs).await
}

/// A replica listening on `listen` (to come back on the same address).
async fn replica_at(
    etcd: &str,
    prefix: &str,
    listen: Option<SocketAddr>,
    dir: tempfile::TempDir,
    envs: &[(&str, &str)],
) -> (ControlPlaneProcess, tempfile::TempDir) {
    let mut all = vec![
        ("MESHWIRE_ETCD", etcd),
        ("MESHWIRE_ETCD_PREFIX", prefix),
        ("MESHWIRE_ADMIN_TOKEN", TOKEN),
    ];
    all.extend_from_slice(envs);
    let cp = ControlPlaneProcess::spawn_with(dir.path(), listen, &all).await;
    (cp, dir)
}

/// `service → sorted endpoint addresses`, and the version, as a replica lists them.
async fn listing(a: &mut Admin) -> (u64, BTreeMap<String, Vec<String>>) {
    let r = a
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut out = BTreeMap::new();
    for s in r.services {
        let eps = a
            .list_endpoints(pb::ListEndpointsRequest {
                service: s.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut addrs: Vec<String> = eps.endpoints.into_iter().map(|e| e.address).collect();
        addrs.sort();
        out.insert(s.name, addrs);
    }
    (r.version, out)
}

async fn wait_version(a: &mut Admin, want: u64) {
    let start = tokio::time::Instant::now();
    loop {
        let v = listing(a).await.0;
        if v >= want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "replica at version {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ep(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], port))
}

/// One SotW round on a fresh ADS stream: CDS (wildcard) and EDS for
/// `services`; returns both responses.
async fn sotw(addr: SocketAddr, services: &[&str]) -> (DiscoveryResponse, DiscoveryResponse) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let node = Some(Node {
        id: "probe".into(),
        cluster: "probe".into(),
        ..Default::default()
    });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: node.clone(),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(DiscoveryRequest {
        node,
        type_url: EDS.into(),
        resource_names: services.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut cds = None;
    let mut eds = None;
    while cds.is_none() || eds.is_none() {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("ADS answers")
            .unwrap()
            .unwrap();
        if r.type_url == CDS {
            cds = Some(r);
        } else if r.type_url == EDS {
            eds = Some(r);
        }
    }
    (cds.unwrap(), eds.unwrap())
}

/// [`sotw`] until the replica serves `version` (its snapshot follows the
/// registry within the publish window).
async fn sotw_at(
    addr: SocketAddr,
    services: &[&str],
    version: u64,
) -> (DiscoveryResponse, DiscoveryResponse) {
    let start = tokio::time::Instant::now();
    loop {
        let r = sotw(addr, services).await;
        if r.0.version_info == version.to_string() {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "xDS at {} after 10s, want {version}",
            r.0.version_info
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The per-resource versions a Delta stream gets for CDS.
async fn delta_versions(addr: SocketAddr) -> BTreeMap<String, String> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = DeltaDiscoveryRequest {
        node: Some(Node {
            id: "probe-delta".into(),
            cluster: "probe".into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        ..Default::default()
    };
    let mut stream = client
        .delta_aggregated_resources(tokio_stream::iter([req]).chain(tokio_stream::pending()))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("delta answers")
        .unwrap()
        .unwrap();
    r.resources
        .into_iter()
        .map(|r| (r.name, r.version))
        .collect()
}

/// Writes through either replica reach the other through etcd; concurrent
/// writes through both are all kept (compare-and-swap on the version, the
/// loser re-checks); and both replicas then serve byte-identical xDS with
/// the same versions, so a sidecar moving between them changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_writes_and_serve_identical_xds() {
    let etcd = Etcd::start().await;
    let (a, _da) = replica(&etcd.urls(), "/mesh/").await;
    let (b, _db) = replica(&etcd.urls(), "/mesh/").await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;

    assert_eq!(api::create_service(&mut ca, "greeter").await, 1);
    wait_version(&mut cb, 1).await;
    let v = api::add_endpoint(&mut cb, "greeter", ep(1), 3).await;
    assert_eq!(v, 2);
    wait_version(&mut ca, 2).await;
    assert_eq!(
        listing(&mut ca).await,
        (
            2,
            BTreeMap::from([("greeter".into(), vec![ep(1).to_string()])])
        )
    );

    // 40 writes at once, half through each replica: none lost, one version each.
    let mut tasks = Vec::new();
    for i in 0..40u16 {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            api::add_endpoint(&mut c, "greeter", ep(100 + i), 1).await
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.unwrap());
    }
    versions.sort();
    assert_eq!(
        versions,
        (3..=42).collect::<Vec<u64>>(),
        "one version per write"
    );
    wait_version(&mut ca, 42).await;
    wait_version(&mut cb, 42).await;
    let (la, lb) = (listing(&mut ca).await, listing(&mut cb).await);
    assert_eq!(la, lb);
    assert_eq!(la.1["greeter"].len(), 41);

    // A conflict that cannot be resolved is reported as such, not as success:
    // the same endpoint through both at once is added exactly once.
    let (mut c1, mut c2) = (ca.clone(), cb.clone());
    let add = |c: &mut Admin| {
        let mut c = c.clone();
        async move {
            c.add_endpoint(pb::AddEndpointRequest {
                service: "greeter".into(),
                endpoint: Some(pb::Endpoint {
                    address: ep(999).to_string(),
                    ..Default::default()
                }),
            })
            .await
        }
    };
    let (r1, r2) = tokio::join!(add(&mut c1), add(&mut c2));
    let oks = [&r1, &r2].iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 1, "{r1:?} {r2:?}");
    let err = [r1, r2].into_iter().find_map(Result::err).unwrap();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    // Identical xDS from both replicas: versions and bytes.
    wait_version(&mut ca, 43).await;
    wait_version(&mut cb, 43).await;
    let (cds_a, eds_a) = sotw_at(a.addr, &["greeter"], 43).await;
    let (cds_b, eds_b) = sotw_at(b.addr, &["greeter"], 43).await;
    assert_eq!(cds_a.version_info, "43");
    assert_eq!(cds_a.version_info, cds_b.version_info);
    assert_eq!(eds_a.version_info, eds_b.version_info);
    assert_eq!(cds_a.resources, cds_b.resources);
    assert_eq!(eds_a.resources, eds_b.resources);
    let (da, db) = (delta_versions(a.addr).await, delta_versions(b.addr).await);
    assert_eq!(da.len(), 1);
    assert_eq!(
        da, db,
        "delta resource versions are content hashes, equal everywhere"
    );
}

/// Two meshes on one etcd under different prefixes: neither sees the
/// other's services, every key is under its mesh's prefix, and a replica
/// started later on a prefix loads only that mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_meshes_on_one_etcd_never_see_each_other() {
    let etcd = Etcd::start().await;
    let (a, _da) = replica(&etcd.urls(), "/mesh-a").await;
    let (b, _db) = replica(&etcd.urls(), "/mesh-b/").await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    api::create_service(&mut ca, "only-in-a").await;
    api::add_endpoint(&mut ca, "only-in-a", ep(1), 1).await;
    api::create_service(&mut cb, "only-in-b").await;
    // Same name in both meshes, different endpoints.
    api::create_service(&mut ca, "shared").await;
    api::create_service(&mut cb, "shared").await;
    api::add_endpoint(&mut cb, "shared", ep(2), 1).await;

    let (va, la) = listing(&mut ca).await;
    let (vb, lb) = listing(&mut cb).await;
    assert_eq!(va, 3);
    assert_eq!(vb, 3);
    assert_eq!(
        la,
        BTreeMap::from([
            ("only-in-a".into(), vec![ep(1).to_string()]),
            ("shared".into(), vec![]),
        ])
    );
    assert_eq!(
        lb,
        BTreeMap::from([
            ("only-in-b".into(), vec![]),
            ("shared".into(), vec![ep(2).to_string()]),
        ])
    );
    let keys = etcd.all_keys().await;
    assert!(!keys.is_empty());
    for k in &keys {
        assert!(
            k.starts_with("/mesh-a/") || k.starts_with("/mesh-b/"),
            "key outside the meshes' prefixes: {k}"
        );
    }
    // A new replica of mesh b starts with mesh b's state only.
    let (b2, _db2) = replica(&etcd.urls(), "/mesh-b").await;
    assert_eq!(listing(&mut b2.client().await).await, (vb, lb));
}

/// A replica cut off from etcd keeps serving what it has, resumes its watch
/// from its revision when the link is back (catching up on what it missed),
/// and when the history it missed was compacted re-lists the whole state —
/// switching to it in one step: an endpoint present before and after is in
/// every EDS push it makes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_replica_resumes_its_watch_and_relists_after_compaction() {
    let etcd = Etcd::start().await;
    let relay = Relay::start(etcd.members[0].client).await;
    let (a, _da) = replica(&etcd.urls(), "/mesh/").await;
    let (b, _db) = replica(&relay.url(), "/mesh/").await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    api::create_service(&mut ca, "greeter").await;
    api::add_endpoint(&mut ca, "greeter", ep(1), 1).await;
    wait_version(&mut cb, 2).await;
    // b's snapshot follows its registry within the publish window: start
    // recording once it has ep(1), so every push must have it.
    sotw_at(b.addr, &["greeter"], 2).await;

    // Follow what b pushes to a sidecar over the whole test.
    let pushes = record_eds(b.addr, "greeter");

    // Cut: b keeps serving its state; writes through b are refused naming etcd.
    relay.cut();
    api::add_endpoint(&mut ca, "greeter", ep(2), 1).await;
    let refused = cb
        .add_endpoint(pb::AddEndpointRequest {
            service: "greeter".into(),
            endpoint: Some(pb::Endpoint {
                address: ep(3).to_string(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    assert_eq!(listing(&mut cb).await.0, 2, "b still serves version 2");
    relay.restore();
    wait_version(&mut cb, 3).await;
    assert_eq!(listing(&mut cb).await, listing(&mut ca).await);

    // Cut again; meanwhile endpoints come and go and etcd compacts it all away.
    relay.cut();
    api::remove(&mut ca, "greeter", ep(2)).await;
    api::add_endpoint(&mut ca, "greeter", ep(4), 1).await;
    api::set_weight(&mut ca, "greeter", ep(1), 7).await;
    api::create_service(&mut ca, "late").await;
    let v = api::add_endpoint(&mut ca, "late", ep(5), 1).await;
    etcd.compact().await;
    relay.restore();
    wait_version(&mut cb, v).await;
    assert_eq!(listing(&mut cb).await, listing(&mut ca).await);
    assert!(
        b.log().contains("re-list"),
        "b re-listed after the compaction:\n{}",
        b.log()
    );
    let pushes = pushes
        .until(|last| {
            last.get(&ep(1).to_string()) == Some(&7)
                && last.contains_key(&ep(4).to_string())
                && !last.contains_key(&ep(2).to_string())
        })
        .await;
    assert!(
        pushes.len() >= 3,
        "b pushed the catch-up and the re-list: {pushes:?}"
    );
    for p in &pushes {
        assert!(
            p.contains_key(&ep(1).to_string()),
            "ep(1) was never removed, yet a push lacked it: {pushes:?}"
        );
    }
}

/// Records the `greeter` endpoint sets (address → weight) an ADS stream
/// receives until `finish`.
struct EdsRecorder {
    seen: tokio::sync::watch::Receiver<Vec<BTreeMap<String, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EdsRecorder {
    /// Waits (bounded) until the latest push satisfies `done`; returns every push.
    async fn until(
        mut self,
        done: impl Fn(&BTreeMap<String, u32>) -> bool,
    ) -> Vec<BTreeMap<String, u32>> {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            self.seen.wait_for(|v| v.last().is_some_and(&done)),
        )
        .await
        .map(|r| r.is_ok());
        let seen = self.seen.borrow().clone();
        assert!(matches!(r, Ok(true)), "pushes never got there: {seen:?}");
        self.task.abort();
        seen
    }
}

fn record_eds(addr: SocketAddr, service: &str) -> EdsRecorder {
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let service = service.to_owned();
    let task = tokio::spawn(async move {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (reqs, rx) = tokio::sync::mpsc::channel(16);
        let node = Some(Node {
            id: "recorder".into(),
            cluster: "probe".into(),
            ..Default::default()
        });
        reqs.send(DiscoveryRequest {
            node,
            type_url: EDS.into(),
            resource_names: vec![service.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = client
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        while let Some(Ok(r)) = stream.next().await {
            for any in &r.resources {
                let cla = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
                let mut set = BTreeMap::new();
                for lb in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
                    let Some(envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else { continue };
                    let Some(sa) = e.address.as_ref().and_then(|a| a.address.as_ref()) else {
                        continue;
                    };
                    let envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                        s,
                    ) = sa
                    else {
                        continue;
                    };
                    let port = match s.port_specifier {
                        Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p,
                        _ => 0,
                    };
                    let w = lb.load_balancing_weight.map(|w| w.value).unwrap_or(1);
                    set.insert(format!("{}:{port}", s.address), w);
                }
                tx.send_modify(|v| v.push(set));
            }
            // ACK, so the next change is pushed.
            let _ = reqs
                .send(DiscoveryRequest {
                    type_url: EDS.into(),
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    resource_names: vec![service.clone()],
                    ..Default::default()
                })
                .await;
        }
    });
    EdsRecorder { seen: rx, task }
}

/// A sidecar process taking its config from `servers` (in that order).
async fn sidecar_on(servers: &[String], node: &str) -> SidecarProcess {
    let list = servers.join(",");
    SidecarProcess::spawn(
        &[
            "--control-plane",
            &list,
            "--service",
            "caller",
            "--node-id",
            node,
        ],
        &[],
    )
    .await
}

/// What a sidecar's `/config_dump` says about its xDS source.
async fn source(admin: SocketAddr) -> serde_json::Value {
    admin_json(admin, "/config_dump").await["source"].clone()
}

/// Waits until the sidecar has applied endpoint version `v`.
async fn applied(s: &SidecarProcess, v: u64, what: &str) {
    config_dump_until(s.addrs.admin, what, Duration::from_secs(15), |d| {
        applied_eds(d) == v
    })
    .await;
}

/// Waits until the sidecar is connected to `server`; returns its xDS source.
async fn moved_to(s: &SidecarProcess, server: &str) -> serde_json::Value {
    config_dump_until(s.addrs.admin, server, Duration::from_secs(15), |d| {
        d["source"]["control_plane"] == server && d["source"]["connected"] == true
    })
    .await["source"]
        .clone()
}

/// Two replicas, two sidecars listing both (in opposite orders), calls
/// through both sidecars all along; each replica in turn is killed with
/// SIGKILL. No call fails; a sidecar on the killed replica moves to the
/// other and re-ACKs without applying anything (same versions, same
/// content); a change through the survivor reaches every sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_fail_over_when_each_replica_is_killed_under_load() {
    let etcd = Etcd::start().await;
    let (mut a, da) = replica(&etcd.urls(), "/mesh/").await;
    let (mut b, _db) = replica(&etcd.urls(), "/mesh/").await;
    let e1 = echo("e1").await;
    let e2 = echo("e2").await;
    let mut ca = a.client().await;
    api::create_service(&mut ca, "echo").await;
    let v = api::add_endpoint(&mut ca, "echo", e1.addr, 1).await;
    // Both replicas publish v before the sidecars connect: xDS versions are
    // the state's version, so a sidecar that got its clusters from an older
    // snapshot would see a newer clusters version (same content) after moving.
    sotw_at(a.addr, &["echo"], v).await;
    sotw_at(b.addr, &["echo"], v).await;

    let s1 = sidecar_on(&[a.url(), b.url()], "s1").await;
    let s2 = sidecar_on(&[b.url(), a.url()], "s2").await;
    applied(&s1, v, "s1's first config").await;
    applied(&s2, v, "s2's first config").await;
    assert_eq!(source(s1.addrs.admin).await["control_plane"], a.url());
    assert_eq!(source(s2.addrs.admin).await["control_plane"], b.url());
    let c1 = echo_client(s1.addrs.outbound, "echo").await;
    let c2 = echo_client(s2.addrs.outbound, "echo").await;
    let (l1, l2) = (Load::start(&c1, 4), Load::start(&c2, 4));

    // Kill A: s1 moves to B and re-ACKs the same versions, applying nothing.
    let before = source(s1.addrs.admin).await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5)).await;
    let after = moved_to(&s1, &b.url()).await;
    assert_eq!(
        after["versions"], before["versions"],
        "same versions from B"
    );
    assert_eq!(
        after["applies"], before["applies"],
        "nothing re-applied: {before} → {after}"
    );
    assert!(after["streams_opened"].as_u64() > before["streams_opened"].as_u64());

    // A change through the survivor reaches both sidecars.
    let mut cb = b.client().await;
    let v = api::add_endpoint(&mut cb, "echo", e2.addr, 1).await;
    applied(&s1, v, "e2 (added through B) on s1").await;
    applied(&s2, v, "e2 (added through B) on s2").await;
    // One apply for the one change: the reconnect applied nothing, not even late.
    let now = source(s1.addrs.admin).await;
    assert_eq!(
        now["applies"].as_u64(),
        before["applies"].as_u64().map(|n| n + 1),
        "{before} → {now}"
    );

    // A comes back on its address (a new process: it loads the state from
    // etcd); then B is killed and both sidecars move to A.
    let (a2, _da2) = replica_at(&etcd.urls(), "/mesh/", Some(a.addr), da, &[]).await;
    let mut ca2 = a2.client().await;
    assert_eq!(
        listing(&mut ca2).await.0,
        v,
        "the new A has the current state"
    );
    let before = source(s2.addrs.admin).await;
    b.signal("KILL");
    b.wait_exit(Duration::from_secs(5)).await;
    moved_to(&s1, &a2.url()).await;
    let after = moved_to(&s2, &a2.url()).await;
    // The same endpoints version; the clusters version is the state's
    // version (the same on every replica), which on a fresh stream may be
    // newer than the one the old stream last pushed clusters at.
    assert_eq!(
        after["versions"]["endpoints"], before["versions"]["endpoints"],
        "same versions from A"
    );
    assert_eq!(after["versions"]["clusters"], v.to_string().as_str());
    assert_eq!(after["applies"], before["applies"], "nothing re-applied");
    let v = api::set_weight(&mut ca2, "echo", e2.addr, 3).await;
    applied(&s1, v, "the weight (set through A) on s1").await;
    applied(&s2, v, "the weight (set through A) on s2").await;

    for (name, l) in [("s1", l1), ("s2", l2)] {
        let (ok, failed) = l.finish().await;
        assert!(
            failed.is_empty(),
            "{name}: {} calls failed: {failed:?}",
            failed.len()
        );
        assert!(ok.get("e1").copied().unwrap_or(0) > 0, "{name}: {ok:?}");
        assert!(ok.get("e2").copied().unwrap_or(0) > 0, "{name}: {ok:?}");
    }
}

/// A 3-member etcd: with one member killed writes go on (through the
/// others); with a majority killed writes are refused with UNAVAILABLE
/// naming etcd while reads and xDS keep serving the last state; with the
/// members back, writes work again and every replica catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_etcd_quorum_and_serving_never_stops() {
    let mut etcd = Etcd::cluster(3).await;
    let (a, _da) = replica_with(&etcd.urls(), "/mesh/", &[("MESHWIRE_ETCD_TIMEOUT", "2s")]).await;
    let (b, _db) = replica_with(&etcd.urls(), "/mesh/", &[("MESHWIRE_ETCD_TIMEOUT", "2s")]).await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    api::create_service(&mut ca, "greeter").await;
    api::add_endpoint(&mut ca, "greeter", ep(1), 1).await;
    // b checks its writes against its own state: let it have a's first.
    wait_version(&mut cb, 2).await;

    // One member down (the first in everyone's list): writes continue. A
    // write in flight to the killed member may come back unconfirmed (it
    // may or may not have been applied); the next one goes to a live member.
    etcd.kill(0);
    let v = write_until_confirmed(&mut cb, ep(2)).await;
    assert_eq!(v, 3);
    wait_version(&mut ca, 3).await;

    // A majority down: writes refused, naming etcd; reads and xDS serve on.
    etcd.kill(1);
    let refused = ca
        .add_endpoint(pb::AddEndpointRequest {
            service: "greeter".into(),
            endpoint: Some(pb::Endpoint {
                address: ep(3).to_string(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    // Sent to a member without quorum: its outcome is open, and it says so.
    assert!(
        refused.message().contains("may still be applied"),
        "{refused:?}"
    );
    let (va, la) = listing(&mut ca).await;
    assert_eq!(va, 3);
    assert_eq!(la["greeter"].len(), 2);
    let (cds, eds) = sotw_at(b.addr, &["greeter"], 3).await;
    assert_eq!(cds.version_info, "3");
    assert_eq!(eds.resources.len(), 1);

    // Members back: writes work again and reach the other replica.
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_member(0).await;
    etcd.wait_member(1).await;
    let v = write_until_confirmed(&mut ca, ep(4)).await;
    // The unconfirmed write is in or out, the same on every replica.
    wait_version(&mut cb, v).await;
    let (_, la) = listing(&mut ca).await;
    let (_, lb) = listing(&mut cb).await;
    assert_eq!(la, lb);
    let ep3 = la["greeter"].contains(&ep(3).to_string());
    assert_eq!(
        v,
        4 + u64::from(ep3),
        "one version per applied write: {la:?}"
    );
    let mut want = vec![ep(1).to_string(), ep(2).to_string(), ep(4).to_string()];
    if ep3 {
        want.push(ep(3).to_string());
        want.sort();
    }
    assert_eq!(lb["greeter"], want);
}

/// etcd unreachable when a replica starts (here: the link to it refuses
/// every connection): the replica keeps retrying, saying so, and serves
/// nothing; once etcd is reachable it loads the state and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_without_etcd_waits_for_it() {
    let etcd = Etcd::start().await;
    let (a, _da) = replica(&etcd.urls(), "/mesh/").await;
    let mut ca = a.client().await;
    api::create_service(&mut ca, "greeter").await;
    let v = api::add_endpoint(&mut ca, "greeter", ep(1), 1).await;

    let relay = Relay::start(etcd.members[0].client).await;
    relay.cut();
    let url = relay.url();
    let waiting = tokio::spawn(async move { replica(&url, "/mesh/").await });
    // It tries etcd again and again, without giving up.
    let start = tokio::time::Instant::now();
    while relay.attempts.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(!waiting.is_finished(), "started without etcd");
        assert!(start.elapsed() < Duration::from_secs(10), "no retries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiting.is_finished(), "serving before the state is loaded");
    relay.restore();
    let (b, _db) = waiting.await.unwrap();
    assert!(b.log().contains("etcd unreachable at start"), "{}", b.log());
    let mut cb = b.client().await;
    assert_eq!(listing(&mut cb).await.0, v);
    let (cds, _) = sotw_at(b.addr, &["greeter"], v).await;
    assert_eq!(cds.version_info, v.to_string());
}

/// Adds `addr` to `greeter`, retrying while etcd is unavailable (bounded);
/// returns the version that has it.
async fn write_until_confirmed(a: &mut Admin, addr: SocketAddr) -> u64 {
    let start = tokio::time::Instant::now();
    loop {
        match a
            .add_endpoint(pb::AddEndpointRequest {
                service: "greeter".into(),
                endpoint: Some(pb::Endpoint {
                    address: addr.to_string(),
                    ..Default::default()
                }),
            })
            .await
        {
            Ok(r) => return r.into_inner().version,
            // An earlier unconfirmed attempt was applied after all.
            Err(e) if e.code() == tonic::Code::AlreadyExists => return listing(a).await.0,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "writes still refused: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `meshctl --server <servers> --output json cp status`, parsed.
async fn cp_status(servers: String) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(meshwire_tests::bins::MESHCTL)
            .args(["--server", &servers, "--token", TOKEN, "--output", "json"])
            .args(["cp", "status"])
            .env_remove("MESHCTL_SERVER")
            .env_remove("MESHWIRE_ADMIN_TOKEN")
            .output()
            .expect("run meshctl")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "meshctl cp status: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Polls `meshctl cp status` through `servers` until `done` holds (bounded).
async fn cp_status_until(
    servers: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = tokio::time::Instant::now();
    loop {
        let s = cp_status(servers.to_owned()).await;
        if done(&s) {
            return s;
        }
        assert!(start.elapsed() < limit, "cp status never got there: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `meshctl cp status` lists both replicas with the version and revision
/// each applied and exactly one leader; the leader killed with SIGKILL,
/// the survivor is elected within the lease TTL + 2 s and the dead one
/// drops out of the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_status_lists_replicas_and_a_new_leader_follows_a_killed_one() {
    let etcd = Etcd::start().await;
    let (mut a, _da) = replica(&etcd.urls(), "/mesh/").await;
    let (mut b, _db) = replica(&etcd.urls(), "/mesh/").await;
    let mut ca = a.client().await;
    let v = api::create_service(&mut ca, "greeter").await;

    let both = format!("{},{}", a.url(), b.url());
    let s = cp_status_until(&both, Duration::from_secs(10), |s| {
        let r = s["replicas"].as_array().unwrap();
        r.len() == 2
            && r.iter()
                .all(|r| r["version"] == v && r["revision"].as_i64() > Some(0))
            && r.iter().filter(|r| r["leader"] == true).count() == 1
    })
    .await;
    assert!(s["store"].as_str().unwrap().starts_with("etcd:"), "{s}");
    // meshctl asked the first server: a.
    let answered: Vec<_> = s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["answered"] == true)
        .collect();
    assert_eq!(answered.len(), 1, "{s}");
    assert_eq!(answered[0]["address"], a.addr.to_string(), "{s}");

    // Kill the leader; the other one takes over.
    let leader = s["leader"].as_str().unwrap().to_owned();
    let leader_addr = s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == leader.as_str())
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let (dead, survivor) = if leader_addr == a.addr.to_string() {
        (&mut a, b.url())
    } else {
        (&mut b, a.url())
    };
    dead.signal("KILL");
    dead.wait_exit(Duration::from_secs(5)).await;
    let killed = tokio::time::Instant::now();
    let limit = meshwire_control_plane::store::etcd::LEASE_TTL + Duration::from_secs(2);
    let s = cp_status_until(&survivor, limit, |s| {
        let r = s["replicas"].as_array().unwrap();
        r.len() == 1 && r[0]["leader"] == true && s["leader"] != leader.as_str()
    })
    .await;
    assert!(killed.elapsed() <= limit, "{:?}", killed.elapsed());
    assert_eq!(s["leader"], s["replica"], "{s}");
}
