//! Consistent hashing end to end: a caller's sidecar process takes a
//! `ring-hash`/`maglev` cluster over xDS (the control plane's ADS server,
//! in-process), hashes a request header, and calls reach app instances each
//! behind its own sidecar process. Faults are real: an instance's sidecar is
//! killed with SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use meshwire_examples::echo::EchoHandle;
use meshwire_mesh::{Cluster, HashLb, HashSource, LbPolicy};
use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_tests::*;
use meshwire_xds::Snapshot;
use tonic::transport::Channel;

const KEYS: usize = 200;

/// Which instance answered each key (`x-user: user-<n>`). Every call must succeed.
async fn instance_by_key(client: &EchoClient<Channel>) -> BTreeMap<usize, String> {
    let mut out = BTreeMap::new();
    for k in 0..KEYS {
        let mut req = tonic::Request::new(EchoRequest::default());
        req.metadata_mut()
            .insert("x-user", format!("user-{k}").parse().unwrap());
        let r = client
            .clone()
            .echo(req)
            .await
            .unwrap_or_else(|e| panic!("key {k}: {e}"));
        out.insert(k, r.into_inner().server);
    }
    out
}

fn hashed(lb: LbPolicy, endpoints: &[SocketAddr]) -> Cluster {
    let mut c = cluster(
        "echo",
        &endpoints.iter().map(|&a| (a, 1)).collect::<Vec<_>>(),
    );
    c.lb = lb;
    c.hash_policy = vec![HashSource::Header("x-user".into())];
    c
}

struct Instances {
    apps: Vec<EchoHandle>,
    sidecars: Vec<SidecarProcess>,
}

impl Instances {
    async fn start(n: usize) -> Self {
        let mut apps = Vec::new();
        let mut sidecars = Vec::new();
        for i in 0..n {
            let app = echo(&format!("instance-{i}")).await;
            sidecars.push(SidecarProcess::spawn(&["--app", &app.addr.to_string()], &[]).await);
            apps.push(app);
        }
        Self { apps, sidecars }
    }

    fn inbound(&self, i: usize) -> SocketAddr {
        self.sidecars[i].addrs.inbound.expect("inbound")
    }

    fn all(&self) -> Vec<SocketAddr> {
        (0..self.sidecars.len()).map(|i| self.inbound(i)).collect()
    }
}

async fn caller(ads: SocketAddr) -> SidecarProcess {
    let cp = format!("http://{ads}");
    SidecarProcess::spawn(
        &[
            "--control-plane",
            &cp,
            "--service",
            "caller",
            "--node-id",
            "caller-1",
        ],
        &[],
    )
    .await
}

async fn wait_endpoints(admin: SocketAddr, n: usize) {
    config_dump_until(
        admin,
        "the pushed endpoints",
        Duration::from_secs(15),
        |v| {
            v["clusters"][0]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == n)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_header_same_instance_and_losing_one_moves_only_its_keys() {
    let inst = Instances::start(4).await;
    let lb = LbPolicy::RingHash(HashLb::default());
    let ads = Ads::start(Snapshot::new(1, [hashed(lb, &inst.all())])).await;
    let sc = caller(ads.addr).await;
    wait_endpoints(sc.addrs.admin, 4).await;
    let client = echo_client(sc.addrs.outbound, "echo").await;

    let first = instance_by_key(&client).await;
    assert_eq!(
        first,
        instance_by_key(&client).await,
        "same key, same instance"
    );
    let used: BTreeSet<_> = first.values().cloned().collect();
    assert_eq!(used.len(), 4, "keys spread over every instance: {used:?}");
    // A call without the header is balanced (least request) and succeeds.
    client.clone().echo(EchoRequest::default()).await.unwrap();

    // /clusters shows each endpoint's share of the key space.
    let clusters = admin_json(sc.addrs.admin, "/clusters").await;
    let eps = clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .clone();
    let total: f64 = eps.iter().map(|e| e["hash_share"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-6, "{clusters}");

    // A real fault: instance 2's sidecar dies. Its keys fail over to their
    // successor on the ring; nobody else's move, and no call fails.
    let mut inst = inst;
    let gone = "instance-2";
    let dead = inst.inbound(2).to_string();
    inst.sidecars[2].signal("KILL");
    let _ = inst.sidecars[2].wait_exit(Duration::from_secs(10)).await;
    // Once the caller has seen the connection close (a call already written
    // to a dying connection may fail, which is not what this test is about).
    let admin = sc.addrs.admin;
    eventually(
        "the dead connection closed",
        Duration::from_secs(10),
        || {
            let dead = dead.clone();
            async move {
                let v = admin_json(admin, "/clusters").await;
                v["clusters"][0]["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["address"] == dead.as_str() && e["connections"] == 0)
            }
        },
    )
    .await;
    let killed = instance_by_key(&client).await;
    for (k, was) in &first {
        if was == gone {
            assert_ne!(&killed[k], gone);
        } else {
            assert_eq!(&killed[k], was, "key {k} of a live instance moved");
        }
    }

    // The control plane removes it: the same keys land where they failed over to.
    let rest: Vec<_> = [0, 1, 3].iter().map(|&i| inst.inbound(i)).collect();
    ads.publish(2, vec![hashed(lb, &rest)]);
    wait_endpoints(sc.addrs.admin, 3).await;
    let removed = instance_by_key(&client).await;
    assert_eq!(removed, killed, "removing is skipping, on the ring");
    let moved = first.iter().filter(|(k, v)| removed[*k] != **v).count();
    let own = first.values().filter(|v| *v == gone).count();
    assert_eq!(moved, own, "only {gone}'s keys moved");
    drop(inst.apps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_and_a_policy_change_under_load_fail_no_call() {
    let inst = Instances::start(3).await;
    let ring = LbPolicy::RingHash(HashLb {
        balance_factor: Some(1.25),
    });
    let ads = Ads::start(Snapshot::new(1, [hashed(ring, &inst.all())])).await;
    let sc = caller(ads.addr).await;
    wait_endpoints(sc.addrs.admin, 3).await;
    let client = echo_client(sc.addrs.outbound, "echo").await;
    let load = KeyedLoad::start(&client, 4);
    let on_ring = instance_by_key(&client).await;

    let maglev = LbPolicy::Maglev(HashLb::default());
    ads.publish(2, vec![hashed(maglev, &inst.all())]);
    config_dump_until(sc.addrs.admin, "maglev", Duration::from_secs(15), |v| {
        v["clusters"][0]["lb_policy"] == "maglev"
    })
    .await;
    let first = instance_by_key(&client).await;
    assert_eq!(
        first,
        instance_by_key(&client).await,
        "same key, same instance"
    );
    assert_eq!(first.values().collect::<BTreeSet<_>>().len(), 3);
    assert_ne!(first, on_ring, "a different table");

    ads.publish(
        3,
        vec![cluster(
            "echo",
            &inst.all().iter().map(|&a| (a, 1)).collect::<Vec<_>>(),
        )],
    );
    config_dump_until(
        sc.addrs.admin,
        "least request",
        Duration::from_secs(15),
        |v| v["clusters"][0]["lb_policy"] == "least_request",
    )
    .await;
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 0);
}

/// Callers with random `x-user` keys, calling until stopped.
struct KeyedLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl KeyedLoad {
    fn start(client: &EchoClient<Channel>, conc: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..conc)
            .map(|w| {
                let mut c = client.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0, Vec::new());
                    let mut n = w;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n = n.wrapping_mul(31).wrapping_add(7) % 10_000;
                        let mut req = tonic::Request::new(EchoRequest::default());
                        req.metadata_mut()
                            .insert("x-user", format!("load-{n}").parse().unwrap());
                        match c.echo(req).await {
                            Ok(_) => ok += 1,
                            Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for t in self.tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }
}
