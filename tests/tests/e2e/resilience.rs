//! Resilience under real faults (issue 10): real app processes killed with
//! SIGKILL, restarted, and server sidecars drained, under a 16-caller load
//! with a 2 s deadline per call. Calls that never reached an app are
//! retried on another endpoint without the caller seeing anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshwire_examples::load::{Load, LoadConfig, Report};
use meshwire_sidecar::Sidecar;
use meshwire_tests::*;

const CALLERS: usize = 16;

/// An echo app as its own process, on a fixed port so it can come back there.
struct App {
    addr: SocketAddr,
    name: String,
    child: Option<Child>,
}

impl App {
    async fn start(name: &str) -> App {
        let mut app = App {
            addr: dead_addr().await,
            name: name.to_owned(),
            child: None,
        };
        app.restart().await;
        app
    }

    /// (Re)starts the process and waits until it accepts connections.
    async fn restart(&mut self) {
        let child = Command::new(bins::ECHO_SERVER.path())
            .args(["--listen", &self.addr.to_string(), "--name", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn echo");
        self.child = Some(child);
        let addr = self.addr;
        eventually(
            "the app accepts connections",
            Duration::from_secs(10),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-KILL", &c.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -9 failed");
        c.wait().expect("wait");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct World {
    apps: Vec<App>,
    servers: Vec<Sidecar>,
    client: Sidecar,
}

impl World {
    async fn new(n: usize) -> World {
        let mut apps = Vec::new();
        let mut servers = Vec::new();
        let mut eps = Vec::new();
        for i in 0..n {
            let app = App::start(&format!("echo-{i}")).await;
            let s = server_sidecar(app.addr).await;
            eps.push((s.inbound_addr.expect("inbound"), 1));
            apps.push(app);
            servers.push(s);
        }
        let client = client_sidecar(vec![cluster("echo", &eps)]).await;
        World {
            apps,
            servers,
            client,
        }
    }

    async fn load(&self) -> Load {
        let channel =
            meshwire_examples::load::channel(&self.client.outbound_addr.to_string(), "echo")
                .expect("channel");
        Load::start(
            channel,
            &LoadConfig {
                concurrency: CALLERS,
                timeout: Duration::from_secs(2),
                ..Default::default()
            },
        )
    }

    /// Calls the app behind server sidecar `i` has in flight.
    async fn in_flight_on_app(&self, i: usize) -> u64 {
        admin_json(self.servers[i].admin_addr, "/clusters").await["app"]["outstanding"]
            .as_u64()
            .expect("outstanding")
    }

    async fn transparent_retries(&self) -> u64 {
        let text = metrics_text(self.client.admin_addr).await;
        text.lines()
            .filter(|l| l.starts_with("meshwire_transparent_retries_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

async fn metrics_text(admin: SocketAddr) -> String {
    let (status, _, body) = http1_get(admin, "admin", "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body).into_owned()
}

/// What the load saw between two of its totals.
#[derive(Debug, Default)]
struct Tally {
    /// Calls answered, per app.
    ok: BTreeMap<String, u64>,
    /// Calls failed, per gRPC code name.
    failed: BTreeMap<String, u64>,
}

impl Tally {
    fn between(before: &Report, now: &Report) -> Tally {
        let mut t = Tally::default();
        for s in &now.servers {
            let was = before.server(&s.name).map_or(0, |b| b.calls);
            if s.calls > was {
                t.ok.insert(s.name.clone(), s.calls - was);
            }
        }
        for (code, n) in &now.errors {
            let was = before.errors.get(code).copied().unwrap_or(0);
            if *n > was {
                t.failed.insert(code.clone(), n - was);
            }
        }
        t
    }

    fn calls(&self) -> u64 {
        self.ok.values().sum::<u64>() + self.failures()
    }

    fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Waits (bounded) until `n` more calls finished, and returns what they did.
async fn next_calls(load: &Load, n: u64) -> Tally {
    let before = load.total();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let start = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let t = Tally::between(&before, &load.total());
        if t.calls() >= n {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} calls in 60 s: {t:?}",
            t.calls()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_never_reached_an_app_go_to_another_endpoint() {
    let mut w = World::new(3).await;
    let load = w.load().await;
    let warm = next_calls(&load, 1000).await;
    assert_eq!(warm.failures(), 0, "before any fault: {warm:?}");

    // kill -9 of an app: only the calls in flight on it at that moment may fail.
    let before_kill = load.total();
    w.apps[1].kill9();
    eventually(
        "the killed app's calls ended",
        Duration::from_secs(5),
        || {
            let w = &w;
            async move { w.in_flight_on_app(1).await == 0 }
        },
    )
    .await;
    let at_kill = Tally::between(&before_kill, &load.total());
    assert!(
        at_kill.failures() <= CALLERS as u64,
        "{} calls failed at the kill, more than the {CALLERS} that can be in flight: {at_kill:?}",
        at_kill.failures()
    );

    // Its sidecar is up but the app refuses connections: every call it gets
    // is refused unprocessed and goes to another endpoint.
    let retries_before = w.transparent_retries().await;
    let refused = next_calls(&load, 3000).await;
    assert_eq!(refused.failures(), 0, "while the app was down: {refused:?}");
    assert!(!refused.ok.contains_key("echo-1"), "{refused:?}");
    assert!(
        w.transparent_retries().await > retries_before,
        "calls the dead app's sidecar refused were retried elsewhere"
    );

    // The app comes back on the same port: it serves again, nothing fails.
    w.apps[1].restart().await;
    let start = tokio::time::Instant::now();
    loop {
        let t = next_calls(&load, 200).await;
        assert_eq!(t.failures(), 0, "while the app came back: {t:?}");
        if t.ok.contains_key("echo-1") {
            break;
        }
        // Bounded by its sidecar's connect backoff (at most 10 s).
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "echo-1 never served again"
        );
    }

    // A server sidecar drains (as on SIGTERM): nothing fails.
    w.servers[2].shutdown();
    let drained = next_calls(&load, 3000).await;
    assert_eq!(drained.failures(), 0, "during the drain: {drained:?}");
    assert!(w.servers[2].wait().await, "drained in time");

    let total = load.stop().await;
    assert!(total.calls() > 7000, "{total:?}");
}

/// An app that fails every call with UNAVAILABLE, at once: every other call
/// trailers-only, the rest in trailers after a reply message (the case
/// Envoy misses, envoy#8228). Returns its address and its call count.
async fn failing_app() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::Ordering;
    let l = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let mut head =
                        http::Response::builder().header("content-type", "application/grpc");
                    if n.is_multiple_of(2) {
                        head = head
                            .header("grpc-status", "14")
                            .header("grpc-message", "app says no");
                        let _ = respond.send_response(head.body(()).unwrap(), true);
                    } else {
                        let Ok(mut body) = respond.send_response(head.body(()).unwrap(), false)
                        else {
                            continue;
                        };
                        let reply = meshwire_proto::example::v1::EchoReply::default();
                        let _ = body.send_data(grpc_frame(&reply), false);
                        let mut t = http::HeaderMap::new();
                        t.insert("grpc-status", http::HeaderValue::from_static("14"));
                        let _ = body.send_trailers(t);
                    }
                }
            });
        }
    });
    (addr, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_failing_endpoint_is_ejected_and_fails_under_one_percent() {
    use std::sync::atomic::Ordering;
    let good: Vec<App> = vec![App::start("echo-0").await, App::start("echo-1").await];
    let (bad_addr, bad_calls) = failing_app().await;
    let mut servers = Vec::new();
    for a in good.iter().map(|a| a.addr).chain([bad_addr]) {
        servers.push(server_sidecar(a).await);
    }
    let eps: Vec<_> = servers
        .iter()
        .map(|s| (s.inbound_addr.unwrap(), 1))
        .collect();
    let bad_ep = eps[2].0;
    let client = client_sidecar(vec![cluster("echo", &eps)]).await;
    let w = World {
        apps: good,
        servers,
        client,
    };
    let load = w.load().await;
    let t = next_calls(&load, 5000).await;
    let failed = t.failures();
    assert!(
        failed * 100 < t.calls(),
        "{failed} of {} calls failed (default settings must keep it under 1 %): {t:?}",
        t.calls()
    );
    let bad = endpoint_stats(w.client.admin_addr, "echo", bad_ep).await;
    assert!(bad["ejections"].as_u64().unwrap() >= 1, "{bad}");
    // Ejected, it only gets the probes: far fewer than its third of the calls.
    let got = bad_calls.load(Ordering::Relaxed);
    assert!(
        got * 20 < t.calls(),
        "the failing app got {got} of {} calls",
        t.calls()
    );
    load.stop().await;
}
