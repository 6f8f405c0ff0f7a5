//! Resilience under real faults (issue 10): real app processes killed with
//! SIGKILL, restarted, and server sidecars drained, under a 16-caller load
//! with a 2 s deadline per call. Calls that never reached an app are
//! retried on another endpoint without the caller seeing anything.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use meshwire_examples::load::{Load, LoadConfig};
use meshwire_sidecar::{Sidecar, SidecarConfig};
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

    /// Sends `sig` (e.g. `STOP`, `CONT`, `USR1`) to the running process.
    fn signal(&self, sig: &str) {
        let c = self.child.as_ref().expect("running");
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &c.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_never_reached_an_app_go_to_another_endpoint() {
    let mut w = World::new(3).await;
    let load = w.load().await;
    let warm = next_calls(&load, 1000).await;
    assert_eq!(warm.failures(), 0, "before any fault: {warm:?}");

    // kill -9 of an app: only the calls in flight on it at that moment may fail.
    let before_kill = load.total();
    let retries_before = w.transparent_retries().await;
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
    // Calls the client had already seen end may still be counting.
    next_calls(&load, 200).await;
    let at_kill = Tally::between(&before_kill, &load.total());
    assert!(
        at_kill.failures() <= CALLERS as u64,
        "{} calls failed at the kill, more than the {CALLERS} that can be in flight: {at_kill:?}",
        at_kill.failures()
    );

    // Its sidecar is up but the app refuses connections: every call it gets
    // is refused unprocessed and goes to another endpoint.
    let refused = next_calls(&load, 3000).await;
    assert_eq!(refused.failures(), 0, "while the app was down: {refused:?}");
    assert!(!refused.ok.contains_key("echo-1"), "{refused:?}");

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
    // While echo-1 was down its sidecar refused what it was sent (the
    // client's probes once it was ejected), and each went elsewhere.
    assert!(
        w.transparent_retries().await > retries_before,
        "calls the dead app's sidecar refused were retried elsewhere"
    );

    let total = load.stop().await;
    assert!(total.calls() > 7000, "{total:?}");
}

/// An app that fails every call with UNAVAILABLE, at once: every other call
/// trailers-only, the rest in trailers after a reply message (the case
/// Envoy misses, envoy#8228). Returns its address and its call count.
async fn failing_app() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    failing_app_with(false).await
}

/// [`failing_app`]; with `trailers_only`, every call is failed in its
/// response headers (the case a retry can take elsewhere).
async fn failing_app_with(
    trailers_only: bool,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
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
                    if trailers_only || n.is_multiple_of(2) {
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
        // No health checks: the caller's outlier detection alone must do it
        // (with them the failing app's sidecar would refuse its calls).
        let mut cfg = SidecarConfig::local();
        cfg.app = Some(a);
        cfg.inbound = Some(([127, 0, 0, 1], 0).into());
        cfg.health.check = meshwire_sidecar::health::HealthCheck::None;
        servers.push(Sidecar::start(cfg).await.unwrap());
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

/// `/ready` of server sidecar `i`: its status code.
async fn ready_status(w: &World, i: usize) -> u16 {
    http1_get(w.servers[i].admin_addr, "admin", "/ready")
        .await
        .map_or(0, |(status, _, _)| status.as_u16())
}

/// Waits until calls reach the app named `name` again, failing none meanwhile.
async fn until_it_serves_again(load: &Load, name: &str, limit: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let t = next_calls(load, 100).await;
        assert_eq!(t.failures(), 0, "while {name} came back: {t:?}");
        if t.ok.contains_key(name) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{name} did not serve again within {limit:?}"
        );
    }
}

/// A hung app (SIGSTOP: its TCP port still accepts) is noticed by its
/// sidecar's grpc.health.v1 watch (HTTP/2 PINGs unanswered): at most the
/// calls in flight on it fail, it is out within 5 s, and no call fails after.
/// SIGCONT: it takes calls again within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_app_is_taken_out_and_fails_only_what_was_in_flight() {
    let w = World::new(3).await;
    let load = w.load().await;
    let warm = next_calls(&load, 1000).await;
    assert_eq!(warm.failures(), 0, "before any fault: {warm:?}");

    let before = load.total();
    w.apps[0].signal("STOP");
    let stopped = tokio::time::Instant::now();
    eventually(
        "the hung app's sidecar is not ready",
        Duration::from_secs(5),
        || {
            let w = &w;
            async move { ready_status(w, 0).await == 503 }
        },
    )
    .await;
    let detected = stopped.elapsed();
    // Calls sent to it before it was out are stuck until their 2 s deadline.
    eventually(
        "the calls stuck on the hung app ended",
        Duration::from_secs(5),
        || {
            let w = &w;
            async move { w.in_flight_on_app(0).await == 0 }
        },
    )
    .await;
    // Their answers may still be on the way back to the load.
    next_calls(&load, 200).await;
    let at_hang = Tally::between(&before, &load.total());
    assert!(
        at_hang.failures() <= CALLERS as u64 * 2,
        "{} calls failed while the app hung, more than can be in flight: {at_hang:?}",
        at_hang.failures()
    );
    let after = next_calls(&load, 3000).await;
    assert_eq!(after.failures(), 0, "once the hung app was out: {after:?}");
    assert!(!after.ok.contains_key("echo-0"), "{after:?}");

    w.apps[0].signal("CONT");
    let back = until_it_serves_again(&load, "echo-0", Duration::from_secs(2) + CHECK_SLACK).await;
    let total = load.stop().await;
    tracing::info!(
        ?detected,
        failed_at_hang = at_hang.failures(),
        ?back,
        calls = total.calls(),
        "hung app: out after `detected`, serving again `back` after SIGCONT"
    );
}

/// An app whose grpc.health.v1 says NOT_SERVING (SIGUSR1 to echo-server)
/// gets no calls and fails none: its sidecar refuses them unprocessed and
/// reports not-ready; SERVING again (SIGUSR2) and it takes calls within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_says_not_serving_gets_no_calls_until_it_serves_again() {
    let w = World::new(3).await;
    let load = w.load().await;
    let warm = next_calls(&load, 500).await;
    assert_eq!(warm.failures(), 0, "before any fault: {warm:?}");
    assert_eq!(ready_status(&w, 1).await, 200);

    w.apps[1].signal("USR1");
    eventually(
        "the sidecar follows NOT_SERVING",
        Duration::from_secs(2),
        || {
            let w = &w;
            async move { ready_status(w, 1).await == 503 }
        },
    )
    .await;
    // Calls it accepted before the change may still finish.
    let settle = next_calls(&load, 200).await;
    assert_eq!(
        settle.failures(),
        0,
        "as the app turned NOT_SERVING: {settle:?}"
    );
    let out = next_calls(&load, 3000).await;
    assert_eq!(out.failures(), 0, "while the app was NOT_SERVING: {out:?}");
    assert!(!out.ok.contains_key("echo-1"), "{out:?}");
    let metrics = metrics_text(w.servers[1].admin_addr).await;
    assert!(metrics.contains("meshwire_app_healthy 0"), "{metrics}");
    let clusters = admin_json(w.servers[1].admin_addr, "/clusters").await;
    assert_eq!(clusters["app_health"]["healthy"], false, "{clusters}");

    w.apps[1].signal("USR2");
    until_it_serves_again(&load, "echo-1", Duration::from_secs(2) + CHECK_SLACK).await;
    assert_eq!(ready_status(&w, 1).await, 200);
    let clusters = admin_json(w.servers[1].admin_addr, "/clusters").await;
    assert_eq!(clusters["app_health"]["healthy"], true, "{clusters}");
    assert_eq!(clusters["app_health"]["changes"], 2, "{clusters}");
    load.stop().await;
}

/// Time for the load to show a change: calls are counted in batches of 100.
const CHECK_SLACK: Duration = Duration::from_millis(500);

/// `n` calls at once through `client`, each held 1 s by the app; returns
/// how many succeeded and the failures' (code, meshwire-error) pairs.
async fn burst(client: SocketAddr, n: usize) -> (usize, Vec<(tonic::Code, String)>) {
    let echo = echo_client(client, "echo").await;
    let calls = (0..n).map(|_| {
        let mut echo = echo.clone();
        async move {
            echo.echo(EchoRequest {
                delay_ms: 1000,
                ..Default::default()
            })
            .await
        }
    });
    let mut ok = 0;
    let mut failed = Vec::new();
    for r in futures_util::future::join_all(calls).await {
        match r {
            Ok(_) => ok += 1,
            Err(st) => {
                let kind = st
                    .metadata()
                    .get("meshwire-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                failed.push((st.code(), kind));
            }
        }
    }
    (ok, failed)
}

/// The caller's circuit breaker (--max-requests-per-service): with 4 allowed
/// in flight, 12 calls at once give exactly 4 answers; the other 8 fail at
/// once with UNAVAILABLE + `meshwire-error: overloaded` and never reach the
/// app. Once the 4 finish, calls pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_circuit_breaker_sheds_exactly_what_is_over_the_limit() {
    let app = echo("echo-0").await;
    let server = server_sidecar(app.addr).await;
    let mut cfg = SidecarConfig::local();
    cfg.clusters = vec![cluster("echo", &[(server.inbound_addr.unwrap(), 1)])];
    cfg.max_requests_per_service = 4;
    let client = Sidecar::start(cfg).await.unwrap();

    let (ok, failed) = burst(client.outbound_addr, 12).await;
    assert_eq!(ok, 4, "{failed:?}");
    assert_eq!(failed.len(), 8);
    for (code, kind) in &failed {
        assert_eq!(
            (*code, kind.as_str()),
            (tonic::Code::Unavailable, "overloaded")
        );
    }
    assert_eq!(
        app.stats.calls.load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    // The places are free again.
    let (ok, failed) = burst(client.outbound_addr, 4).await;
    assert_eq!((ok, failed.len()), (4, 0), "{failed:?}");
}

/// The inbound limit (--max-app-calls 2, --app-queue-timeout 50ms): of 8
/// calls at once the app sees exactly 2; the others are refused unprocessed
/// (REFUSED_STREAM), which the caller's sidecar would send elsewhere — here
/// there is nowhere else, so they fail UNAVAILABLE without touching the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_limit_refuses_excess_calls_unprocessed() {
    let app = echo("echo-0").await;
    let mut cfg = SidecarConfig::local();
    cfg.app = Some(app.addr);
    cfg.inbound = Some(([127, 0, 0, 1], 0).into());
    cfg.max_app_calls = 2;
    cfg.app_queue_timeout = Duration::from_millis(50);
    let limited = Sidecar::start(cfg).await.unwrap();
    let client = client_sidecar(vec![cluster("echo", &[(limited.inbound_addr.unwrap(), 1)])]).await;

    let (ok, failed) = burst(client.outbound_addr, 8).await;
    assert_eq!(ok, 2, "{failed:?}");
    assert_eq!(failed.len(), 6);
    assert!(
        failed.iter().all(|(c, _)| *c == tonic::Code::Unavailable),
        "{failed:?}"
    );
    assert_eq!(
        app.stats.calls.load(std::sync::atomic::Ordering::Relaxed),
        2
    );

    // With a second endpoint the refused calls go there: nothing fails.
    let other = echo("echo-1").await;
    let other_sidecar = server_sidecar(other.addr).await;
    let client = client_sidecar(vec![cluster(
        "echo",
        &[
            (limited.inbound_addr.unwrap(), 1),
            (other_sidecar.inbound_addr.unwrap(), 1),
        ],
    )])
    .await;
    let (ok, failed) = burst(client.outbound_addr, 8).await;
    assert_eq!((ok, failed.len()), (8, 0), "{failed:?}");
}

/// Slow start (--slow-start): an endpoint added under load starts with about
/// a tenth of the calls instead of the half least-request would hand it (it
/// has nothing in flight), and takes its full share once the window is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_ramps_up_over_the_slow_start_window() {
    let (a, b) = (echo("echo-0").await, echo("echo-1").await);
    let (sa, sb) = (server_sidecar(a.addr).await, server_sidecar(b.addr).await);
    let (ea, eb) = (sa.inbound_addr.unwrap(), sb.inbound_addr.unwrap());
    let mut cfg = SidecarConfig::local();
    cfg.clusters = vec![cluster("echo", &[(ea, 1)])];
    cfg.slow_start = Duration::from_secs(6);
    let client = Sidecar::start(cfg).await.unwrap();
    let channel = meshwire_examples::load::channel(&client.outbound_addr.to_string(), "echo")
        .expect("channel");
    let load = Load::start(
        channel,
        &LoadConfig {
            concurrency: CALLERS,
            timeout: Duration::from_secs(2),
            ..Default::default()
        },
    );
    next_calls(&load, 500).await;

    client
        .apply(&[cluster("echo", &[(ea, 1), (eb, 1)])])
        .unwrap();
    let early = next_calls(&load, 300).await;
    let share = |t: &Tally| t.ok.get("echo-1").copied().unwrap_or(0) as f64 / t.calls() as f64;
    assert_eq!(early.failures(), 0, "{early:?}");
    assert!(
        share(&early) < 0.3,
        "the new endpoint took {:.0} % of the first calls: {early:?}",
        share(&early) * 100.0
    );
    let start = tokio::time::Instant::now();
    loop {
        let t = next_calls(&load, 1000).await;
        assert_eq!(t.failures(), 0, "{t:?}");
        if share(&t) > 0.4 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the new endpoint never took its share: {t:?}"
        );
    }
    load.stop().await;
}

/// A server sidecar without health checks (so the app's failures reach the
/// caller, whose outlier detection and retries must handle them).
async fn unchecked_server_sidecar(app: SocketAddr) -> Sidecar {
    let mut cfg = SidecarConfig::local();
    cfg.app = Some(app);
    cfg.inbound = Some(([127, 0, 0, 1], 0).into());
    cfg.health.check = meshwire_sidecar::health::HealthCheck::None;
    Sidecar::start(cfg).await.unwrap()
}

/// The client sidecar's `meshwire_retries_total{outcome}`.
async fn retries(admin: SocketAddr, outcome: &str) -> u64 {
    let text = metrics_text(admin).await;
    let prefix = format!("meshwire_retries_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}in {text}"))
}

/// An app failing every call with UNAVAILABLE in its response headers,
/// beside two good ones: each failed call is retried once on another
/// endpoint (the outlier detector soon ejects the bad one), so the callers
/// see no failure at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_an_app_fails_with_unavailable_are_retried_elsewhere() {
    let good: Vec<App> = vec![App::start("echo-0").await, App::start("echo-1").await];
    let (bad_addr, bad_calls) = failing_app_with(true).await;
    let mut servers = Vec::new();
    for a in good.iter().map(|a| a.addr).chain([bad_addr]) {
        servers.push(unchecked_server_sidecar(a).await);
    }
    let eps: Vec<_> = servers
        .iter()
        .map(|s| (s.inbound_addr.unwrap(), 1))
        .collect();
    let client = client_sidecar(vec![cluster("echo", &eps)]).await;
    let w = World {
        apps: good,
        servers,
        client,
    };
    let load = w.load().await;
    let t = next_calls(&load, 5000).await;
    assert_eq!(t.failures(), 0, "{t:?}");
    let failed_by_app = bad_calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(failed_by_app > 0, "the bad app got no call");
    assert!(
        retries(w.client.admin_addr, "retried").await >= failed_by_app.min(10),
        "its failures were retried"
    );
    load.stop().await;
}

/// When every endpoint fails, retries stay within the budget: at most a
/// fifth of the calls plus 10 a second (and the rest is counted as
/// budget exhausted), so a failing service is not hammered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_service_gets_no_more_retries_than_the_budget() {
    let (a, a_calls) = failing_app_with(true).await;
    let (b, b_calls) = failing_app_with(true).await;
    let (sa, sb) = (
        unchecked_server_sidecar(a).await,
        unchecked_server_sidecar(b).await,
    );
    let client = client_sidecar(vec![cluster(
        "echo",
        &[(sa.inbound_addr.unwrap(), 1), (sb.inbound_addr.unwrap(), 1)],
    )])
    .await;
    let start = tokio::time::Instant::now();
    let w = World {
        apps: Vec::new(),
        servers: vec![sa, sb],
        client,
    };
    let load = w.load().await;
    let t = next_calls(&load, 3000).await;
    let total = load.stop().await;
    let secs = start.elapsed().as_secs() + 1;
    assert_eq!(t.ok.len(), 0, "{t:?}");
    let calls = total.calls() + total.errors.values().sum::<u64>();
    let retried = retries(w.client.admin_addr, "retried").await;
    let at_apps = a_calls.load(std::sync::atomic::Ordering::Relaxed)
        + b_calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        retried <= calls / 5 + 10 * secs,
        "{retried} retries for {calls} calls in {secs} s: over the budget"
    );
    // Each call and each retry reached an app once (calls cut short when the
    // load stopped are in neither count).
    assert!(
        at_apps.abs_diff(calls + retried) <= 2 * CALLERS as u64,
        "{at_apps} calls at the apps for {calls} calls and {retried} retries"
    );
    assert!(retries(w.client.admin_addr, "budget_exhausted").await > 0);
}

/// An app and its server sidecar as two real processes, the sidecar's inbound
/// on a fixed port so a restarted pair comes back at the same endpoint.
struct Pod {
    app: App,
    inbound: SocketAddr,
    sidecar: Option<SidecarProcess>,
}

impl Pod {
    async fn start(name: &str) -> Pod {
        let mut pod = Pod {
            app: App::start(name).await,
            inbound: dead_addr().await,
            sidecar: None,
        };
        pod.start_sidecar().await;
        pod
    }

    async fn start_sidecar(&mut self) {
        let (app, inbound) = (self.app.addr.to_string(), self.inbound.to_string());
        let args = [
            "--app",
            &app,
            "--inbound",
            &inbound,
            "--drain-timeout",
            "5s",
        ];
        self.sidecar = Some(SidecarProcess::spawn(&args, &[]).await);
    }

    /// kill -9 of the sidecar process: its connections drop mid-call.
    async fn kill9_sidecar(&mut self) {
        let mut s = self.sidecar.take().expect("sidecar running");
        s.signal("KILL");
        s.wait_exit(Duration::from_secs(5)).await;
    }

    /// A rolling restart's step: the sidecar drains and exits (SIGTERM), the
    /// app is replaced, then the sidecar starts again on the same port.
    async fn replace(&mut self) {
        let mut s = self.sidecar.take().expect("sidecar running");
        s.signal("TERM");
        assert_eq!(
            s.wait_exit(Duration::from_secs(10)).await,
            Some(0),
            "the sidecar drained and exited cleanly:\n{}",
            s.log()
        );
        self.app.kill9();
        self.app.restart().await;
        self.start_sidecar().await;
    }
}

/// Server sidecars as processes, a client sidecar in this process.
async fn pods(n: usize) -> (Vec<Pod>, Sidecar) {
    let mut pods = Vec::new();
    for i in 0..n {
        pods.push(Pod::start(&format!("echo-{i}")).await);
    }
    let eps: Vec<_> = pods.iter().map(|p| (p.inbound, 1)).collect();
    let client = client_sidecar(vec![cluster("echo", &eps)]).await;
    (pods, client)
}

fn load_through(client: &Sidecar) -> Load {
    let channel = meshwire_examples::load::channel(&client.outbound_addr.to_string(), "echo")
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

/// kill -9 of a server sidecar (its app stays up): only the calls in flight
/// on it may fail, none after (its port is closed: connects are refused and
/// go elsewhere); started again, it takes calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_sidecar_fails_only_its_calls_in_flight() {
    let (mut pods, client) = pods(3).await;
    let load = load_through(&client);
    let warm = next_calls(&load, 1000).await;
    assert_eq!(warm.failures(), 0, "before any fault: {warm:?}");

    let before = load.total();
    pods[1].kill9_sidecar().await;
    next_calls(&load, 200).await;
    let at_kill = Tally::between(&before, &load.total());
    assert!(
        at_kill.failures() <= CALLERS as u64,
        "{} calls failed at the kill, more than the {CALLERS} that can be in flight: {at_kill:?}",
        at_kill.failures()
    );

    let after = next_calls(&load, 3000).await;
    assert_eq!(after.failures(), 0, "after the kill: {after:?}");
    assert!(!after.ok.contains_key("echo-1"), "{after:?}");

    pods[1].start_sidecar().await;
    // Bounded by the client's connect backoff and ejection of the endpoint.
    until_it_serves_again(&load, "echo-1", Duration::from_secs(75)).await;
    let total = load.stop().await;
    assert!(total.calls() > 4000, "{total:?}");
}

/// Every endpoint replaced one after the other (sidecar drained, app
/// restarted, sidecar back on the same port), under load: no call fails, and
/// each new instance takes calls before the next one goes.
// In one fresh-clone CI run (2026-12-07) one call of ~2,500 failed UNAVAILABLE
// while echo-0 was replaced. Two causes were found in that window and fixed: a
// GOAWAY racing `poll_ready` made `send_request` fail a call nothing of which
// was sent (now handed back as not sent), and a drained connection closed with
// unread client bytes (WINDOW_UPDATEs) made the kernel send a RST that can
// destroy the last response and the GOAWAY still in flight (the server now
// lingers, `server::LINGER`). A failure names the load's last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_endpoint_fails_no_call() {
    let (mut pods, client) = pods(3).await;
    let load = load_through(&client);
    let warm = next_calls(&load, 1000).await;
    assert_eq!(warm.failures(), 0, "before the restart: {warm:?}");
    let before = load.total();
    for (i, pod) in pods.iter_mut().enumerate() {
        let name = format!("echo-{i}");
        pod.replace().await;
        until_it_serves_again(&load, &name, Duration::from_secs(75)).await;
        let so_far = Tally::between(&before, &load.total());
        assert_eq!(so_far.failures(), 0, "after replacing {name}: {so_far:?}");
    }
    let during = Tally::between(&before, &load.total());
    assert_eq!(
        during.failures(),
        0,
        "during the rolling restart: {during:?}"
    );
    for i in 0..pods.len() {
        assert!(during.ok.contains_key(&format!("echo-{i}")), "{during:?}");
    }
    load.stop().await;
}

/// An endpoint whose port accepts connections and never answers (no TLS or
/// HTTP/2 handshake ever completes): calls picked for it time out connecting
/// and go to another endpoint within their deadline, so none fails, and it
/// is ejected for its connect failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_accepts_and_never_answers_fails_no_call() {
    let silent = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = silent.accept().await {
            // Held open and never read: the peer waits for a handshake.
            keep.lock().expect("lock").push(tcp);
        }
    });
    let good = [App::start("echo-0").await, App::start("echo-1").await];
    let mut servers = Vec::new();
    for a in &good {
        servers.push(server_sidecar(a.addr).await);
    }
    let mut eps: Vec<_> = servers
        .iter()
        .map(|s| (s.inbound_addr.expect("inbound"), 1))
        .collect();
    eps.push((silent_addr, 1));
    let client = client_sidecar(vec![cluster("echo", &eps)]).await;
    let load = load_through(&client);
    let t = next_calls(&load, 3000).await;
    assert_eq!(t.failures(), 0, "with a silent endpoint: {t:?}");
    assert!(
        !held.lock().expect("lock").is_empty(),
        "the silent endpoint was tried"
    );
    let ejected = admin_json(client.admin_addr, "/clusters").await;
    let silent_view = ejected["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == silent_addr.to_string())
        .cloned()
        .expect("the silent endpoint in /clusters");
    assert!(
        silent_view["ejections"].as_u64().unwrap_or(0) >= 1,
        "the silent endpoint was ejected: {silent_view}"
    );
    let total = load.stop().await;
    assert!(total.errors.is_empty(), "{total:?}");
}
