//! The whole mesh as real processes: the control plane, a sidecar per
//! backend and a client sidecar, all taking their config over xDS, changed
//! only through the admin API, under steady load.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshwire_examples::echo::EchoHandle;
use meshwire_tests::*;

use meshwire_tests::bins::MESHCTL;

struct World {
    _data: tempfile::TempDir,
    cp: ControlPlaneProcess,
    admin: Admin,
    backends: Vec<EchoHandle>,
    servers: Vec<SidecarProcess>,
    client: SidecarProcess,
}

impl World {
    /// `n` echo backends, each behind a sidecar process registered in the
    /// control plane as an endpoint of `echo` (weight 1), and a client sidecar.
    async fn new(n: usize, client_args: &[&str]) -> World {
        init_tracing();
        let data = tempfile::tempdir().unwrap();
        let cp = ControlPlaneProcess::spawn(data.path()).await;
        let mut admin = cp.client().await;
        api::create_service(&mut admin, "echo").await;
        let url = cp.url();
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for i in 0..n {
            let b = echo(&format!("b{i}")).await;
            let app = b.addr.to_string();
            let s = SidecarProcess::spawn(
                &["--app", &app, "--control-plane", &url, "--service", "echo"],
                &[],
            )
            .await;
            api::add_endpoint(&mut admin, "echo", s.addrs.inbound.unwrap(), 1).await;
            backends.push(b);
            servers.push(s);
        }
        let mut args = vec!["--control-plane", url.as_str(), "--service", "caller"];
        args.extend_from_slice(client_args);
        let client = SidecarProcess::spawn(&args, &[]).await;
        let w = World {
            _data: data,
            cp,
            admin,
            backends,
            servers,
            client,
        };
        eventually(
            "the client sidecar is ready",
            Duration::from_secs(20),
            || async {
                http1_get(w.client.addrs.admin, "a", "/ready")
                    .await
                    .is_ok_and(|r| r.0 == 200)
            },
        )
        .await;
        w
    }

    fn inbound(&self, i: usize) -> SocketAddr {
        self.servers[i].addrs.inbound.unwrap()
    }

    /// Waits until the client sidecar runs endpoint version `v` or later.
    async fn applied(&self, v: u64, limit: Duration) -> serde_json::Value {
        config_dump_until(
            self.client.addrs.admin,
            &format!("version {v}"),
            limit,
            |d| applied_eds(d) >= v,
        )
        .await
    }

    async fn client(
        &self,
    ) -> meshwire_proto::example::v1::echo_client::EchoClient<tonic::transport::Channel> {
        echo_client(self.client.addrs.outbound, "echo").await
    }
}

fn calls(b: &EchoHandle) -> u64 {
    b.stats.calls.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_change_through_the_api_moves_the_split_within_a_second() {
    let mut w = World::new(2, &[]).await;
    let client = w.client().await;
    let (b0, b1) = (w.inbound(0), w.inbound(1));

    let v = api::set_weight(&mut w.admin, "echo", b0, 9).await;
    let returned = Instant::now();
    w.applied(v, Duration::from_secs(1)).await;
    let applied_in = returned.elapsed();

    let load = Load::start(&client, 4);
    let start0 = calls(&w.backends[0]);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while calls(&w.backends[0]) < start0 + 1800 {
        tick.tick().await;
    }
    let (counts, failed) = load.finish().await;
    assert!(failed.is_empty(), "{failed:?}");
    let share = 100.0 * counts["b0"] as f64
        / (counts["b0"] + counts.get("b1").copied().unwrap_or(0)) as f64;
    assert!(
        (share - 90.0).abs() < 4.5,
        "9:1 gave {share:.1} % ({counts:?}); applied in {applied_in:?}"
    );
    let _ = b1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_then_remove_under_load_fails_no_call() {
    let mut w = World::new(3, &[]).await;
    let client = w.client().await;
    let load = Load::start(&client, 8);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while calls(&w.backends[1]) < 200 {
        tick.tick().await;
    }
    let drained = w.inbound(1);
    let v = api::drain(&mut w.admin, "echo", drained).await;
    w.applied(v, Duration::from_secs(5)).await;
    // Calls in flight when the drain landed finish; then the endpoint is idle.
    let settled_at = settled(Duration::from_secs(10), Duration::from_millis(300), || {
        calls(&w.backends[1])
    })
    .await;
    eventually(
        "no call outstanding on the drained endpoint",
        Duration::from_secs(5),
        || async {
            endpoint_stats(w.client.addrs.admin, "echo", drained).await["outstanding"] == 0
        },
    )
    .await;
    let v = api::remove(&mut w.admin, "echo", drained).await;
    w.applied(v, Duration::from_secs(5)).await;
    let others = calls(&w.backends[0]) + calls(&w.backends[2]);
    while calls(&w.backends[0]) + calls(&w.backends[2]) < others + 500 {
        tick.tick().await;
    }
    let (counts, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "calls failed during drain and removal: {failed:?}"
    );
    assert_eq!(
        calls(&w.backends[1]),
        settled_at,
        "the drained endpoint got calls after the drain"
    );
    assert!(counts["b0"] > 0 && counts["b2"] > 0, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_and_restarted_under_load() {
    let mut w = World::new(2, &[]).await;
    let client = w.client().await;
    let load = Load::start(&client, 4);
    let addr = w.cp.addr;
    w.cp.signal("KILL");
    w.cp.wait_exit(Duration::from_secs(5)).await;
    // The sidecar notices and keeps serving what it has.
    config_dump_until(
        w.client.addrs.admin,
        "xDS disconnected",
        Duration::from_secs(20),
        |d| d["source"]["connected"] == false,
    )
    .await;
    let before = calls(&w.backends[0]) + calls(&w.backends[1]);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while calls(&w.backends[0]) + calls(&w.backends[1]) < before + 300 {
        tick.tick().await;
    }

    // Same data, same address: sidecars resubscribe and see the same state.
    w.cp = ControlPlaneProcess::spawn_with(w._data.path(), Some(addr), &[]).await;
    w.admin = w.cp.client().await;
    let dump = config_dump_until(
        w.client.addrs.admin,
        "resubscribed",
        Duration::from_secs(20),
        |d| d["source"]["connected"] == true && d["source"]["streams_opened"].as_u64() >= Some(2),
    )
    .await;
    assert_eq!(
        dump["clusters"][0]["endpoints"].as_array().unwrap().len(),
        2
    );
    // And changes flow again.
    let third = echo("b2").await;
    let url = w.cp.url();
    let s = SidecarProcess::spawn(
        &[
            "--app",
            &third.addr.to_string(),
            "--control-plane",
            &url,
            "--service",
            "echo",
        ],
        &[],
    )
    .await;
    let v = api::add_endpoint(&mut w.admin, "echo", s.addrs.inbound.unwrap(), 1).await;
    w.applied(v, Duration::from_secs(5)).await;
    eventually(
        "the new endpoint gets calls",
        Duration::from_secs(5),
        || async { calls(&third) > 0 },
    )
    .await;
    let status = w
        .admin
        .status(meshwire_proto::admin::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        status
            .nodes
            .iter()
            .any(|n| n.service == "caller" && n.connected),
        "the client sidecar is connected again: {:?}",
        status.nodes
    );
    let (_, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "calls failed while the control plane was down: {failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_a_sidecar_cannot_apply_is_nacked_and_shown_in_status() {
    let mut w = World::new(2, &["--max-endpoints", "2"]).await;
    let client = w.client().await;
    let load = Load::start(&client, 4);
    let extra = echo("b2").await;
    // The API accepts a third endpoint; this client sidecar refuses more than 2.
    let v = api::add_endpoint(&mut w.admin, "echo", extra.addr, 1).await;
    let dump = config_dump_until(
        w.client.addrs.admin,
        "a NACK",
        Duration::from_secs(10),
        |d| !d["source"]["last_nack"].is_null(),
    )
    .await;
    assert_eq!(dump["source"]["last_nack"]["version"], v.to_string());
    assert!(
        applied_eds(&dump) < v,
        "the refused version is not applied: {dump}"
    );
    let mut admin = w.admin.clone();
    eventually(
        "meshctl status shows the NACK",
        Duration::from_secs(5),
        || {
            let mut admin = admin.clone();
            async move {
                let st = admin
                    .status(meshwire_proto::admin::v1::StatusRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                st.nodes.iter().any(|n| {
                    n.service == "caller"
                        && n.last_nack
                            .as_ref()
                            .is_some_and(|k| k.error.contains("at most 2"))
                })
            }
        },
    )
    .await;
    // The same through meshctl: a row per connected sidecar with its node,
    // service, ACKed versions and the last NACK; and as JSON.
    let meshctl = |args: &[&str]| {
        let out = std::process::Command::new(MESHCTL)
            .args(["--server", &w.cp.url(), "--token", &w.cp.token])
            .args(args)
            .output()
            .expect("run meshctl");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = meshctl(&["status"]);
    let row = table
        .lines()
        .find(|l| l.contains("caller"))
        .unwrap_or_else(|| panic!("no row for the client sidecar:\n{table}"));
    assert!(
        row.contains("at most 2"),
        "the NACK error is shown: {table}"
    );
    let v: serde_json::Value = serde_json::from_str(&meshctl(&["-o", "json", "status"])).unwrap();
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "two server sidecars and the client: {v}");
    let caller = nodes
        .iter()
        .find(|n| n["service"] == "caller")
        .expect("the client sidecar's node");
    assert!(
        caller["last_nack"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("at most 2")),
        "{caller}"
    );
    assert!(
        !caller["node_id"].as_str().unwrap_or("").is_empty(),
        "{caller}"
    );
    assert_eq!(caller["connected"], true, "{caller}");
    assert!(
        caller["connected_since_unix"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "{caller}"
    );
    assert!(
        caller["acked"].as_object().is_some_and(|a| !a.is_empty())
            || caller["acked"].as_array().is_some_and(|a| !a.is_empty()),
        "what it ACKed is shown: {caller}"
    );
    let before = calls(&w.backends[0]) + calls(&w.backends[1]);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while calls(&w.backends[0]) + calls(&w.backends[1]) < before + 300 {
        tick.tick().await;
    }
    // Endpoint updates still flow after the NACK (the subscription survived it).
    let v2 = api::remove(&mut w.admin, "echo", extra.addr).await;
    w.applied(v2, Duration::from_secs(5)).await;
    let (_, failed) = load.finish().await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(calls(&extra), 0, "the refused endpoint got no calls");
    admin = w.admin.clone();
    drop(admin);
}
