//! Zone-aware routing (issue 12 point 2), end to end: a `meshwire-sidecar`
//! process in zone `a` (`MESHWIRE_ZONE`) calls a service with three echo
//! apps in each of zones `a`, `b` and `c` under continuous load. While zone
//! `a` is healthy every call stays there; as its apps stop one by one (the
//! sidecar's pools find them unreachable) the share kept in `a` follows the
//! model, `healthy fraction / min_healthy`, the rest split between `b` and
//! `c`; with none left all calls go to `b` and `c`; when the apps come back
//! on their ports, calls return to `a`. No call fails at any step.

use std::net::SocketAddr;
use std::time::Duration;

use meshwire_examples::echo::EchoHandle;
use meshwire_examples::load::{Load, LoadConfig};
use meshwire_mesh::ZoneRouting;
use meshwire_tests::*;
use tokio::net::TcpListener;

const CALLERS: usize = 8;
/// Calls per measured step.
const WINDOW: u64 = 3000;
/// The service's threshold: with 3 endpoints, 2 healthy (0.67) is below it.
const MIN_HEALTHY: f64 = 0.8;

/// One echo app at a fixed address, so it can come back there.
struct App {
    name: String,
    addr: SocketAddr,
    handle: Option<EchoHandle>,
}

impl App {
    async fn start(name: &str) -> App {
        let l = TcpListener::bind(localhost()).await.expect("bind");
        let addr = l.local_addr().unwrap();
        App {
            name: name.to_owned(),
            addr,
            handle: Some(meshwire_examples::echo::serve(l, name)),
        }
    }

    /// Stops accepting; calls in flight finish (graceful shutdown).
    async fn stop(&mut self) {
        self.handle.take().expect("running").stop().await;
    }

    async fn restart(&mut self) {
        let l = TcpListener::bind(self.addr).await.expect("rebind");
        self.handle = Some(meshwire_examples::echo::serve(l, &self.name));
    }
}

/// The zone report of service `echo` on the caller's `/clusters`.
async fn zones(admin: SocketAddr) -> serde_json::Value {
    let v = admin_json(admin, "/clusters").await;
    v["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "echo"))
        .map(|c| c["zones"].clone())
        .expect("service echo on /clusters")
}

async fn wait_healthy(admin: SocketAddr, healthy: u64) {
    eventually(
        &format!("{healthy} healthy endpoints in zone a on /clusters"),
        Duration::from_secs(30),
        || async move { zones(admin).await["healthy_weight"] == healthy },
    )
    .await;
}

/// Share of `t`'s calls answered in `zone` (apps are named `<zone><i>`).
fn zone_share(t: &Tally, zone: &str) -> f64 {
    let n: u64 =
        t.ok.iter()
            .filter(|(name, _)| name.starts_with(zone))
            .map(|(_, n)| n)
            .sum();
    n as f64 / t.calls() as f64
}

/// The tolerance for a share `p` measured over `n` calls: each call draws
/// its zone independently, so the measured share is binomial with standard
/// deviation sqrt(p(1-p)/n); 5 of those make a false failure about one in a
/// million. The extra 0.01 covers the few calls of a window that were picked
/// before the last health change reached the picker.
fn tolerance(p: f64, n: u64) -> f64 {
    5.0 * (p * (1.0 - p) / n as f64).sqrt() + 0.01
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_in_the_callers_zone_and_spill_over_as_it_loses_endpoints() {
    init_tracing();
    let mut apps = Vec::new();
    for zone in ["a", "b", "c"] {
        for i in 0..3 {
            apps.push(App::start(&format!("{zone}{i}")).await);
        }
    }
    let mut yaml =
        format!("services:\n  - name: echo\n    zone_min_healthy: {MIN_HEALTHY}\n    endpoints:\n");
    for a in &apps {
        yaml.push_str(&format!(
            "      - {{address: \"{}\", zone: {}}}\n",
            a.addr,
            &a.name[..1]
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = SidecarProcess::write_config(dir.path(), &yaml);
    let sc = SidecarProcess::spawn(
        &["--static-config", config.to_str().unwrap()],
        &[("MESHWIRE_ZONE", "a")],
    )
    .await;
    let admin = sc.addrs.admin;
    let v = admin_json(admin, "/clusters").await;
    assert_eq!(v["zone"], "a", "{v}");
    let eps = v["clusters"][0]["endpoints"].as_array().unwrap().clone();
    assert_eq!(eps.iter().filter(|e| e["zone"] == "b").count(), 3, "{v}");

    let channel =
        meshwire_examples::load::channel(&sc.addrs.outbound.to_string(), "echo").expect("channel");
    let load = Load::start(
        channel,
        &LoadConfig {
            concurrency: CALLERS,
            timeout: Duration::from_secs(2),
            ..Default::default()
        },
    );
    let model = ZoneRouting {
        enabled: true,
        min_healthy: MIN_HEALTHY,
    };

    // (a) All healthy: everything stays in zone a.
    let t = next_calls(&load, WINDOW).await;
    assert_eq!(t.failures(), 0, "{t:?}");
    assert!(zone_share(&t, "a") >= 0.99, "{t:?}");

    // (b) Zone a loses its apps one by one; (c) the last one too.
    for lost in 1..=3u64 {
        let before = load.total();
        apps[lost as usize - 1].stop().await;
        let healthy = 3 - lost;
        wait_healthy(admin, healthy).await;
        let want = model.local_share(healthy, 3);
        let z = zones(admin).await;
        assert!(
            (z["local_share"].as_f64().unwrap() - want).abs() < 1e-6,
            "/clusters local share {z}, the model says {want}"
        );
        let t = next_calls(&load, WINDOW).await;
        let tol = tolerance(want, t.calls());
        let a = zone_share(&t, "a");
        assert!(
            (a - want).abs() <= tol,
            "{healthy} of 3 healthy: zone a got {a:.3}, the model {want:.3} ± {tol:.3}: {t:?}"
        );
        if healthy == 0 {
            assert_eq!(a, 0.0, "none healthy: all calls elsewhere: {t:?}");
        }
        // The rest goes to b and c alike (equal healthy weight).
        let spill = (1.0 - want) / 2.0;
        for zone in ["b", "c"] {
            let got = zone_share(&t, zone);
            let tol = tolerance(spill, t.calls());
            assert!(
                (got - spill).abs() <= tol,
                "zone {zone} got {got:.3}, the model {spill:.3} ± {tol:.3}: {t:?}"
            );
            assert!(
                (z["spill"][zone].as_f64().unwrap() - spill).abs() < 1e-6,
                "{z}"
            );
        }
        let through = Tally::between(&before, &load.total());
        assert_eq!(
            through.failures(),
            0,
            "failed calls losing app {lost}: {through:?}"
        );
    }

    // (d) The apps come back: calls return to zone a.
    let before = load.total();
    for app in &mut apps[..3] {
        app.restart().await;
    }
    wait_healthy(admin, 3).await;
    let t = next_calls(&load, WINDOW).await;
    assert!(zone_share(&t, "a") >= 0.99, "{t:?}");
    let report = load.stop().await;
    let through = Tally::between(&before, &report);
    assert_eq!(
        through.failures(),
        0,
        "failed calls on the way back: {through:?}"
    );
    assert_eq!(report.errors.values().sum::<u64>(), 0, "{report:?}");
}
