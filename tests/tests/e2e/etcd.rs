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
    config_dump_until, echo, echo_client, endpoint_stats, eventually,
};
use tokio_stream::StreamExt;

const TOKEN: &str = "etcd-test-admin-token-0123456789abcdef";
/// Seals the CA roots' keys in etcd; the same for every replica.
const SEAL: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
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
    replica_full(etcd, prefix, listen, None, dir, envs).await
}

/// [`replica_at`] with its admin HTTP port on `admin`.
async fn replica_full(
    etcd: &str,
    prefix: &str,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    dir: tempfile::TempDir,
    envs: &[(&str, &str)],
) -> (ControlPlaneProcess, tempfile::TempDir) {
    let mut all = vec![
        ("MESHWIRE_ETCD", etcd),
        ("MESHWIRE_ETCD_PREFIX", prefix),
        ("MESHWIRE_ADMIN_TOKEN", TOKEN),
        ("MESHWIRE_ETCD_ENCRYPTION_KEY", SEAL),
    ];
    all.extend_from_slice(envs);
    let cp = ControlPlaneProcess::spawn_full(dir.path(), listen, admin, &all).await;
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
    // The balancer's connection to e1, by its connect count (load keeps it open).
    let admin1 = s1.addrs.admin;
    let e1_addr = e1.addr;
    eventually(
        "s1 connected to e1",
        Duration::from_secs(10),
        || async move {
            endpoint_stats(admin1, "echo", e1_addr).await["connections"].as_u64() >= Some(1)
        },
    )
    .await;
    let connects_before = endpoint_stats(s1.addrs.admin, "echo", e1.addr).await;
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5)).await;
    let after = moved_to(&s1, &b.url()).await;
    let connects_after = endpoint_stats(s1.addrs.admin, "echo", e1.addr).await;
    assert_eq!(
        connects_after["connect_attempts"], connects_before["connect_attempts"],
        "the endpoint kept its connection across the move: {connects_before} → {connects_after}"
    );
    assert!(
        connects_after["connections"].as_u64() >= Some(1),
        "{connects_after}"
    );
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
    // Its admin port on a known address: probed before the addr file exists.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let waiting = tokio::spawn(async move {
        let dir = tempfile::tempdir().unwrap();
        replica_full(&url, "/mesh/", None, Some(admin), dir, &[]).await
    });
    // It tries etcd again and again, without giving up.
    let start = tokio::time::Instant::now();
    while relay.attempts.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(!waiting.is_finished(), "started without etcd");
        assert!(start.elapsed() < Duration::from_secs(10), "no retries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!waiting.is_finished(), "serving before the state is loaded");
    // Probes see it not ready, and why.
    let (status, _, body) = meshwire_tests::clients::http1_get(admin, "cp", "/ready")
        .await
        .expect("the admin port is served while etcd is awaited");
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("waiting for etcd"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    relay.restore();
    let (b, _db) = waiting.await.unwrap();
    assert!(b.log().contains("etcd unreachable at start"), "{}", b.log());
    let mut cb = b.client().await;
    assert_eq!(listing(&mut cb).await.0, v);
    let (cds, _) = sotw_at(b.addr, &["greeter"], v).await;
    assert_eq!(cds.version_info, v.to_string());
    let (status, _, _) = meshwire_tests::clients::http1_get(b.admin, "cp", "/ready")
        .await
        .unwrap();
    assert_eq!(status, 200, "ready once loaded");
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

// === the CA on etcd ===

/// The trust bundle a replica serves, as meshctl gets it.
async fn ca_status(a: &mut Admin) -> pb::CaStatus {
    a.get_ca(pb::GetCaRequest {}).await.unwrap().into_inner()
}

/// A join token for `service` through `a`.
async fn join_token(a: &mut Admin, service: &str, ttl: Duration) -> pb::JoinToken {
    a.create_join_token(pb::CreateJoinTokenRequest {
        service: service.into(),
        namespace: String::new(),
        ttl: Some(ttl.try_into().unwrap()),
    })
    .await
    .unwrap()
    .into_inner()
}

/// A channel to a replica's TLS port, verified against `bundle_pem` (and
/// the control plane's SPIFFE ID), presenting `creds` if given.
async fn tls_channel(
    cp: &ControlPlaneProcess,
    bundle_pem: &str,
    creds: Option<&meshwire_tls::Credentials>,
) -> tonic::transport::Channel {
    let bundle = meshwire_tls::TrustBundle::from_pem(bundle_pem).unwrap();
    let expect = meshwire_tls::SpiffeId::for_service(
        "meshwire.local",
        meshwire_control_plane::ca::CONTROL_PLANE_NAMESPACE,
        meshwire_control_plane::ca::CONTROL_PLANE_SERVICE,
    )
    .unwrap();
    let connector = meshwire_control_plane::tls::connector(&bundle, creds, Some(&expect)).unwrap();
    tonic::transport::Endpoint::from_shared(cp.tls_url())
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("TLS to the replica")
}

/// Identity.Issue with a fresh key: the credentials, or the refusal.
async fn issue(
    ch: tonic::transport::Channel,
    token: &str,
) -> Result<meshwire_tls::Credentials, tonic::Status> {
    use meshwire_proto::identity::v1 as ipb;
    let (key, csr) = meshwire_tls::new_key_and_csr().unwrap();
    let cert = ipb::identity_client::IdentityClient::new(ch)
        .issue(ipb::IssueRequest {
            join_token: token.into(),
            csr_pem: csr,
        })
        .await?
        .into_inner();
    let chain = meshwire_tls::certs_from_pem(&cert.cert_chain_pem).unwrap();
    Ok(meshwire_tls::Credentials { chain, key })
}

/// Identity.Renew over mutual TLS with `creds`: the replica verified them
/// against its trust bundle.
async fn renew_at(
    cp: &ControlPlaneProcess,
    bundle_pem: &str,
    creds: &meshwire_tls::Credentials,
) -> Result<String, tonic::Status> {
    use meshwire_proto::identity::v1 as ipb;
    let ch = tls_channel(cp, bundle_pem, Some(creds)).await;
    let (_, csr) = meshwire_tls::new_key_and_csr().unwrap();
    Ok(ipb::identity_client::IdentityClient::new(ch)
        .renew(ipb::RenewRequest { csr_pem: csr })
        .await?
        .into_inner()
        .spiffe_id)
}

/// Join tokens live in etcd (hashed): one made through replica A works at
/// B, and a token presented to both replicas at the same moment yields
/// exactly one certificate, round after round (the spend is a
/// compare-and-swap on the token's key in etcd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_is_spent_once_across_replicas() {
    const ROUNDS: usize = 25;
    let etcd = Etcd::start().await;
    let (a, _da) = replica(&etcd.urls(), "/mesh/").await;
    let (b, _db) = replica(&etcd.urls(), "/mesh/").await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let v = api::create_service(&mut ca, "echo").await;
    // B knows the service before tokens for it are made through B.
    wait_version(&mut cb, v).await;
    // One CA for both: the same bundle from either replica.
    let bundle = ca_status(&mut ca).await.trust_bundle_pem;
    assert_eq!(bundle, ca_status(&mut cb).await.trust_bundle_pem);

    // Made at A, used at B; then refused at A.
    let t = join_token(&mut ca, "echo", Duration::from_secs(60)).await;
    let creds = issue(tls_channel(&b, &bundle, None).await, &t.token)
        .await
        .expect("a token made through A works at B");
    let id = meshwire_tls::cert_info(&creds.chain[0]).unwrap().spiffe_id;
    assert_eq!(id.as_deref(), Some(t.spiffe_id.as_str()));
    let again = issue(tls_channel(&a, &bundle, None).await, &t.token)
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unauthenticated, "{again:?}");
    // Hashed in etcd: the secret is nowhere in it.
    let secret = t.token.rsplit('.').next().unwrap();
    for (k, v) in etcd.all_values().await {
        assert!(!v.contains(secret), "{k} holds the token's secret");
    }

    // The same token at both replicas at once: one certificate per round.
    let (cha, chb) = (
        tls_channel(&a, &bundle, None).await,
        tls_channel(&b, &bundle, None).await,
    );
    let mut issued = 0;
    for round in 0..ROUNDS {
        let maker = if round % 2 == 0 { &mut ca } else { &mut cb };
        let t = join_token(maker, "echo", Duration::from_secs(60)).await;
        let (ra, rb) = tokio::join!(issue(cha.clone(), &t.token), issue(chb.clone(), &t.token));
        let oks = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "round {round}: {:?} / {:?}", ra.err(), rb.err());
        let refused = [ra, rb].into_iter().find_map(Result::err).unwrap();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        issued += oks;
    }
    assert_eq!(issued, ROUNDS);
}

/// The CA's state is in etcd, shared: a root added and activated through
/// replica A reaches a sidecar whose identity comes from replica B (its
/// trust bundle, then a certificate signed by the new root, through B); a
/// certificate B issues verifies at A; a replica started later has the same
/// roots; and etcd's values hold no private key in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_through_one_replica_reaches_sidecars_on_another() {
    let etcd = Etcd::start().await;
    let (a, _da) = replica(&etcd.urls(), "/mesh/").await;
    let (b, _db) = replica(&etcd.urls(), "/mesh/").await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let v = api::create_service(&mut ca, "echo").await;
    wait_version(&mut cb, v).await;
    let first = ca_status(&mut ca).await;
    assert_eq!(first.roots.len(), 1);
    let old = first.roots[0].fingerprint.clone();
    assert_eq!(ca_status(&mut cb).await.roots[0].fingerprint, old);

    // A sidecar joining through B.
    let t = join_token(&mut cb, "echo", Duration::from_secs(60)).await;
    let run = tempfile::tempdir().unwrap();
    let bundle_file = run.path().join("bundle.pem");
    std::fs::write(&bundle_file, &first.trust_bundle_pem).unwrap();
    let tls = b.tls_url();
    let sc = SidecarProcess::spawn(
        &[
            "--control-plane",
            &tls,
            "--service",
            "echo",
            "--join-token",
            &t.token,
            "--trust-bundle",
            bundle_file.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let certs = |sc: &SidecarProcess| {
        let admin = sc.addrs.admin;
        async move { admin_json(admin, "/certs").await }
    };
    eventually(
        "the sidecar's identity",
        Duration::from_secs(15),
        || async { certs(&sc).await["ready"] == true },
    )
    .await;
    let c = certs(&sc).await;
    assert_eq!(c["signed_by"], old.as_str(), "{c}");

    // Through A: add a root. B's sidecar trusts it within moments.
    let added = ca
        .add_root(pb::AddRootRequest {})
        .await
        .unwrap()
        .into_inner();
    let new = added
        .roots
        .iter()
        .find(|r| r.fingerprint != old)
        .expect("the new root")
        .fingerprint
        .clone();
    eventually(
        "the root added through A to reach B's sidecar",
        Duration::from_secs(10),
        || async {
            let c = certs(&sc).await;
            let fps: Vec<String> =
                serde_json::from_value(c["trust_bundle"]["fingerprints"].clone())
                    .unwrap_or_default();
            fps.contains(&new) && fps.contains(&old)
        },
    )
    .await;
    // Through A: activate it. B signs with it: the sidecar renews through B.
    ca.activate_root(pb::ActivateRootRequest {
        fingerprint: new[..12].to_owned(),
    })
    .await
    .unwrap();
    eventually(
        "B's sidecar re-signed by the root activated through A",
        Duration::from_secs(15),
        || async { certs(&sc).await["signed_by"] == new.as_str() },
    )
    .await;
    let now_b = ca_status(&mut cb).await;
    let signing: Vec<_> = now_b.roots.iter().filter(|r| r.signing).collect();
    assert_eq!(signing.len(), 1);
    assert_eq!(signing[0].fingerprint, new, "B signs with the new root");

    // A certificate issued by B verifies at A (A checks the client chain
    // against its bundle, and renews the identity it carries).
    let bundle = now_b.trust_bundle_pem.clone();
    assert_eq!(bundle, ca_status(&mut ca).await.trust_bundle_pem);
    let t = join_token(&mut ca, "echo", Duration::from_secs(60)).await;
    let creds = issue(tls_channel(&b, &bundle, None).await, &t.token)
        .await
        .unwrap();
    assert_eq!(
        renew_at(&a, &bundle, &creds).await.unwrap(),
        t.spiffe_id,
        "A accepts B's certificate"
    );

    // `admin-cert` with --etcd signs with the shared CA too: A accepts it.
    let out = run.path().join("admin");
    let urls = etcd.urls();
    let cmd_out = {
        let out = out.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(meshwire_tests::bins::CONTROL_PLANE)
                .arg("--data-dir")
                .arg(out.join("data"))
                .args(["admin-cert", "--out"])
                .arg(&out)
                .env("MESHWIRE_ETCD", urls)
                .env("MESHWIRE_ETCD_PREFIX", "/mesh/")
                .env("MESHWIRE_ETCD_ENCRYPTION_KEY", SEAL)
                .output()
                .expect("run admin-cert")
        })
        .await
        .unwrap()
    };
    assert!(
        cmd_out.status.success(),
        "{}",
        String::from_utf8_lossy(&cmd_out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("bundle.pem")).unwrap(),
        bundle
    );
    let admin_creds = meshwire_tls::Credentials {
        chain: meshwire_tls::certs_from_pem(
            &std::fs::read_to_string(out.join("admin.crt")).unwrap(),
        )
        .unwrap(),
        key: meshwire_tls::key_from_pem(&std::fs::read_to_string(out.join("admin.key")).unwrap())
            .unwrap(),
    };
    // A takes it as the admin identity (no token), and does not renew it
    // (admin certificates end at their not-after).
    meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient::new(
        tls_channel(&a, &bundle, Some(&admin_creds)).await,
    )
    .list_services(meshwire_proto::admin::v1::ListServicesRequest {})
    .await
    .expect("A accepts the admin certificate");
    let refused = renew_at(&a, &bundle, &admin_creds).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // A replica started now has the same CA.
    let (c, _dc) = replica(&etcd.urls(), "/mesh/").await;
    assert_eq!(
        ca_status(&mut c.client().await).await.trust_bundle_pem,
        bundle
    );
    // No private key in the clear anywhere in etcd.
    let values = etcd.all_values().await;
    assert!(
        values.iter().any(|(k, _)| k == "/mesh/ca/state"),
        "{values:?}"
    );
    for (k, v) in &values {
        assert!(!v.contains("PRIVATE KEY"), "{k} holds a PEM private key");
    }
}

/// Replica `id`'s process and the other one, from `cp status`.
fn leader_and_follower<'a>(
    s: &serde_json::Value,
    a: &'a mut ControlPlaneProcess,
    b: &'a mut ControlPlaneProcess,
) -> (&'a mut ControlPlaneProcess, &'a mut ControlPlaneProcess) {
    let leader = s["leader"].as_str().unwrap();
    let addr = s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == leader)
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .to_owned();
    if addr == a.addr.to_string() {
        (a, b)
    } else {
        (b, a)
    }
}

/// `ca/housekeeping` in etcd: who swept last.
async fn housekeeping(etcd: &Etcd) -> Option<serde_json::Value> {
    let v = etcd.get("/mesh/ca/housekeeping").await?;
    serde_json::from_str(&v).ok()
}

/// The leader alone sweeps expired join tokens, in writes fenced on its
/// leader key: the leader paused with SIGSTOP past its lease, the other
/// replica is elected within the TTL + 2 s and sweeps from then on; resumed
/// with SIGCONT, the old leader's first write is refused by etcd, it steps
/// down, and every token is swept by one replica only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_cannot_write_after_losing_its_lease() {
    let etcd = Etcd::start().await;
    let fast = [("MESHWIRE_TOKEN_SWEEP_INTERVAL", "200ms")];
    let (mut a, _da) = replica_with(&etcd.urls(), "/mesh/", &fast).await;
    let (mut b, _db) = replica_with(&etcd.urls(), "/mesh/", &fast).await;
    api::create_service(&mut a.client().await, "echo").await;
    let both = format!("{},{}", a.url(), b.url());
    let s = cp_status_until(&both, Duration::from_secs(10), |s| {
        s["replicas"].as_array().unwrap().len() == 2 && !s["leader"].as_str().unwrap().is_empty()
    })
    .await;
    let old_id = s["leader"].as_str().unwrap().to_owned();
    let (old, new) = leader_and_follower(&s, &mut a, &mut b);
    let etcd = &etcd;
    let swept_by = |id: String| {
        move || {
            let id = id.clone();
            async move {
                housekeeping(etcd)
                    .await
                    .is_some_and(|h| h["leader"] == id.as_str())
            }
        }
    };
    // The leader sweeps.
    eventually(
        "the leader's first sweep",
        Duration::from_secs(10),
        swept_by(old_id.clone()),
    )
    .await;

    old.signal("STOP");
    let stopped = tokio::time::Instant::now();
    let limit = meshwire_control_plane::store::etcd::LEASE_TTL + Duration::from_secs(2);
    let s = cp_status_until(&new.url(), limit + Duration::from_secs(1), |s| {
        !s["leader"].as_str().unwrap_or("").is_empty() && s["leader"] != old_id.as_str()
    })
    .await;
    let elected = stopped.elapsed();
    assert!(elected <= limit, "new leader after {elected:?}");
    let new_id = s["leader"].as_str().unwrap().to_owned();
    assert_eq!(s["replica"], new_id.as_str(), "the survivor leads");
    eventually(
        "the new leader's first sweep",
        Duration::from_secs(5),
        swept_by(new_id.clone()),
    )
    .await;
    let mut admin_new = new.client().await;
    let t1 = join_token(&mut admin_new, "echo", Duration::from_secs(1)).await;

    // Resumed: its sweep was due long ago; etcd refuses it.
    old.signal("CONT");
    let logged = |p: &ControlPlaneProcess, what: &'static str| {
        let log = p.log();
        async move { log.contains(what) }
    };
    eventually(
        "the old leader's write to be refused",
        Duration::from_secs(10),
        || logged(old, "no longer holds the leader key (fenced)"),
    )
    .await;
    eventually(
        "the old leader to step down",
        Duration::from_secs(10),
        || logged(old, "leadership lost"),
    )
    .await;
    // Tokens made through either replica are swept by the leader alone.
    let t2 = join_token(&mut old.client().await, "echo", Duration::from_secs(1)).await;
    for t in [&t1, &t2] {
        let id = t.token.split('.').nth(1).unwrap().to_owned();
        eventually("the token to be swept", Duration::from_secs(10), || {
            let id = id.clone();
            let log = new.log();
            async move {
                log.lines()
                    .any(|l| l.contains("join tokens swept") && l.contains(&id))
            }
        })
        .await;
        assert!(
            etcd.get(&format!("/mesh/ca/tokens/{id}")).await.is_none(),
            "swept from etcd"
        );
    }
    assert!(
        !old.log().contains("join tokens swept"),
        "the old leader swept:\n{}",
        old.log()
    );
    let s = cp_status(both.clone()).await;
    assert_eq!(s["leader"], new_id.as_str(), "{s}");
    assert_eq!(
        housekeeping(etcd).await.unwrap()["leader"],
        new_id.as_str(),
        "only the new leader writes"
    );
}

/// etcd killed (SIGKILL) under a running replica: it keeps serving its last
/// state (reads, xDS to its sidecar), refuses writes and new join tokens
/// with UNAVAILABLE naming etcd, stays ready; etcd back, writes work again
/// and reach the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_under_a_replica_leaves_it_read_only_until_it_returns() {
    let mut etcd = Etcd::start().await;
    let (a, _da) = replica_with(&etcd.urls(), "/mesh/", &[("MESHWIRE_ETCD_TIMEOUT", "1s")]).await;
    let mut ca = a.client().await;
    let e1 = echo("e1").await;
    let e2 = echo("e2").await;
    api::create_service(&mut ca, "echo").await;
    let v = api::add_endpoint(&mut ca, "echo", e1.addr, 1).await;
    a.published().await;
    let s = sidecar_on(&[a.url()], "s").await;
    applied(&s, v, "the first config").await;

    etcd.kill(0);
    let refused = ca
        .add_endpoint(pb::AddEndpointRequest {
            service: "echo".into(),
            endpoint: Some(pb::Endpoint {
                address: e2.addr.to_string(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    let refused = ca
        .create_join_token(pb::CreateJoinTokenRequest {
            service: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    // Reads and xDS serve the last state; still ready (it serves).
    assert_eq!(
        listing(&mut ca).await,
        (
            v,
            BTreeMap::from([("echo".into(), vec![e1.addr.to_string()])])
        )
    );
    let (cds, eds) = sotw_at(a.addr, &["echo"], v).await;
    assert_eq!(cds.resources.len(), 1);
    assert_eq!(eds.resources.len(), 1);
    let c = echo_client(s.addrs.outbound, "echo").await;
    let l = Load::start(&c, 2);
    let (status, _, _) = meshwire_tests::clients::http1_get(a.admin, "cp", "/ready")
        .await
        .unwrap();
    assert_eq!(status, 200);

    etcd.restart(0);
    etcd.wait_member(0).await;
    let start = tokio::time::Instant::now();
    let v2 = loop {
        match api_try_add(&mut ca, e2.addr).await {
            Ok(v2) => break v2,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "still refused: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(v2, v + 1);
    applied(&s, v2, "the write after etcd came back").await;
    join_token(&mut ca, "echo", Duration::from_secs(60)).await;
    let (ok, failed) = l.finish().await;
    assert!(
        failed.is_empty(),
        "{} calls failed: {failed:?}",
        failed.len()
    );
    assert!(ok.get("e1").copied().unwrap_or(0) > 0, "{ok:?}");
}

async fn api_try_add(a: &mut Admin, addr: SocketAddr) -> Result<u64, tonic::Status> {
    a.add_endpoint(pb::AddEndpointRequest {
        service: "echo".into(),
        endpoint: Some(pb::Endpoint {
            address: addr.to_string(),
            ..Default::default()
        }),
    })
    .await
    .map(|r| r.into_inner().version)
}
