//! A real sidecar process taking its config over xDS from an ADS server
//! (the control plane's, in-process here): readiness, applying updates under
//! load, NACKing what it cannot apply while traffic continues.

use std::time::{Duration, Instant};

use meshwire_tests::*;
use meshwire_xds::Snapshot;

async fn sidecar_for(ads: std::net::SocketAddr, extra: &[&str]) -> SidecarProcess {
    let cp = format!("http://{ads}");
    let mut args = vec![
        "--control-plane",
        &cp,
        "--service",
        "caller",
        "--node-id",
        "caller-1",
    ];
    args.extend_from_slice(extra);
    SidecarProcess::spawn(&args, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_config_then_serves() {
    let backend = echo("b1").await;
    // The control plane's port exists but serves nothing yet.
    let listener = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let cp = listener.local_addr().unwrap();
    let sc = sidecar_for(cp, &[]).await;
    let (status, _, body) = http1_get(sc.addrs.admin, "a", "/ready").await.unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, "starting\n");
    let dump = admin_json(sc.addrs.admin, "/config_dump").await;
    assert_eq!(dump["source"]["type"], "xds");
    assert_eq!(dump["source"]["warm"], false);

    let ads = Ads::serve(
        listener,
        Snapshot::new(1, [cluster("echo", &[(backend.addr, 1)])]),
    );
    eventually("ready", Duration::from_secs(15), || async {
        http1_get(sc.addrs.admin, "a", "/ready")
            .await
            .is_ok_and(|r| r.0 == 200)
    })
    .await;
    let mut c = echo_client(sc.addrs.outbound, "echo").await;
    assert_eq!(
        c.echo(EchoRequest::default())
            .await
            .unwrap()
            .into_inner()
            .server,
        "b1"
    );
    let dump = admin_json(sc.addrs.admin, "/config_dump").await;
    assert_eq!(dump["source"]["versions"]["clusters"], "1");
    assert_eq!(dump["source"]["versions"]["endpoints"], "1");
    assert_eq!(
        dump["clusters"][0]["endpoints"][0]["address"],
        backend.addr.to_string()
    );
    assert!(
        ads.events
            .any("connected 1 caller-1 caller meshwire-sidecar")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_it_cannot_apply_is_nacked_while_traffic_continues() {
    let b1 = echo("b1").await;
    let b2 = echo("b2").await;
    let b3 = echo("b3").await;
    let ads = Ads::start(Snapshot::new(
        1,
        [cluster("echo", &[(b1.addr, 1), (b2.addr, 1)])],
    ))
    .await;
    let sc = sidecar_for(ads.addr, &["--max-endpoints", "2"]).await;
    eventually("ready", Duration::from_secs(15), || async {
        http1_get(sc.addrs.admin, "a", "/ready")
            .await
            .is_ok_and(|r| r.0 == 200)
    })
    .await;
    let client = echo_client(sc.addrs.outbound, "echo").await;
    let load = Load::start(&client, 4);

    // Three endpoints: more than this sidecar accepts.
    ads.publish(
        2,
        vec![cluster("echo", &[(b1.addr, 1), (b2.addr, 1), (b3.addr, 1)])],
    );
    let dump = config_dump_until(sc.addrs.admin, "a NACK", Duration::from_secs(10), |v| {
        !v["source"]["last_nack"].is_null()
    })
    .await;
    let err = dump["source"]["last_nack"]["error"].as_str().unwrap();
    assert!(err.contains("at most 2"), "{err}");
    assert_eq!(dump["source"]["last_nack"]["version"], "2");
    assert_eq!(
        dump["source"]["versions"]["endpoints"], "1",
        "last good version still applied"
    );
    eventually(
        "the control plane saw the NACK",
        Duration::from_secs(5),
        || async { ads.events.any("nack") && ads.events.any("at most 2") },
    )
    .await;

    // A good update afterwards is applied.
    ads.publish(3, vec![cluster("echo", &[(b2.addr, 1), (b3.addr, 1)])]);
    config_dump_until(sc.addrs.admin, "version 3", Duration::from_secs(10), |v| {
        v["source"]["versions"]["endpoints"] == "3"
    })
    .await;
    eventually("b3 gets calls", Duration::from_secs(5), || async {
        b3.stats.calls.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "calls failed during the updates: {failed:?}"
    );
    assert!(
        ok.get("b3").copied().unwrap_or(0) > 0 && ok.get("b1").copied().unwrap_or(0) > 0,
        "{ok:?}"
    );
    assert_eq!(
        b3.stats.calls.load(std::sync::atomic::Ordering::Relaxed),
        ok["b3"],
        "b3 only after v3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_change_moves_the_split_within_a_second() {
    let a = echo("a").await;
    let b = echo("b").await;
    let ads = Ads::start(Snapshot::new(
        1,
        [cluster("echo", &[(a.addr, 1), (b.addr, 1)])],
    ))
    .await;
    let sc = sidecar_for(ads.addr, &[]).await;
    eventually("ready", Duration::from_secs(15), || async {
        http1_get(sc.addrs.admin, "a", "/ready")
            .await
            .is_ok_and(|r| r.0 == 200)
    })
    .await;
    let client = echo_client(sc.addrs.outbound, "echo").await;
    let (before, failed) = {
        let l = Load::start(&client, 4);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while a.stats.calls.load(std::sync::atomic::Ordering::Relaxed) < 500 {
            tick.tick().await;
        }
        l.finish().await
    };
    assert!(failed.is_empty());
    let share = |m: &std::collections::HashMap<String, u64>| {
        100.0 * m["a"] as f64 / (m["a"] + m.get("b").copied().unwrap_or(0)) as f64
    };
    assert!((share(&before) - 50.0).abs() < 10.0, "{before:?}");

    let pushed = Instant::now();
    ads.publish(2, vec![cluster("echo", &[(a.addr, 9), (b.addr, 1)])]);
    config_dump_until(
        sc.addrs.admin,
        "weights 9:1 applied",
        Duration::from_secs(1),
        |v| v["source"]["versions"]["endpoints"] == "2",
    )
    .await;
    let applied_in = pushed.elapsed();
    let counts = {
        let l = Load::start(&client, 4);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let a0 = a.stats.calls.load(std::sync::atomic::Ordering::Relaxed);
        while a.stats.calls.load(std::sync::atomic::Ordering::Relaxed) < a0 + 1800 {
            tick.tick().await;
        }
        l.finish().await
    };
    assert!(counts.1.is_empty());
    let s = share(&counts.0);
    assert!(
        (s - 90.0).abs() < 4.5,
        "split after 9:1 is {s:.1} % ({:?}), applied in {applied_in:?}",
        counts.0
    );
}
