//! Observability end to end: call tracing across two sidecars into a real
//! OTLP/gRPC collector (`meshwire_examples::otlp`, a tonic `TraceService`
//! server, since no Jaeger runs here), Prometheus metrics that move by
//! exactly the calls made, the exporter never holding calls up when the
//! collector is down or stuck, the sidecar's admin surface, and the control
//! plane's own admin port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meshwire_examples::echo::EchoService;
use meshwire_examples::otlp::{Collector, Span, SpanKind};
use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_proto::example::v1::echo_server::EchoServer;
use meshwire_sidecar::telemetry::TraceConfig;
use meshwire_sidecar::{Sidecar, SidecarConfig};
use meshwire_tests::prom::{Metrics, scrape};
use meshwire_tests::*;
use tokio::net::TcpListener;
use tonic::transport::Channel;

const LIMIT: Duration = Duration::from_secs(10);
const ECHO_SERVICE: &str = "meshwire.example.v1.Echo";

// === helpers ===

/// The trace headers one request reached the app with.
#[derive(Debug, Clone, Default)]
struct Seen {
    traceparent: Option<String>,
    tracestate: Option<String>,
    b3: Option<String>,
    x_b3_traceid: Option<String>,
    x_b3_spanid: Option<String>,
}

/// The echo service, recording the trace headers of every request it gets
/// (as an app that forwards `traceparent` would read them).
async fn recording_app() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let l = TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = EchoServer::with_interceptor(
        EchoService::new("app", addr.port()),
        move |req: tonic::Request<()>| {
            let md = req.metadata();
            let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
            log.lock().unwrap().push(Seen {
                traceparent: get("traceparent"),
                tracestate: get("tracestate"),
                b3: get("b3"),
                x_b3_traceid: get("x-b3-traceid"),
                x_b3_spanid: get("x-b3-spanid"),
            });
            Ok(req)
        },
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    (addr, seen)
}

fn trace_config(endpoint: &str, service: &str, ratio: f64) -> TraceConfig {
    let mut t = TraceConfig::new(endpoint, service);
    t.sample_ratio = ratio;
    // Short batches keep the test quick; the defaults are for production.
    t.batch_interval = Duration::from_millis(20);
    t
}

/// client sidecar (`frontend`) -> server sidecar (`echo`) -> recording app,
/// both sidecars tracing into `endpoint`.
struct TracedMesh {
    app: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: Sidecar,
    client: Sidecar,
}

async fn traced_mesh(client_trace: TraceConfig, server_trace: TraceConfig) -> TracedMesh {
    init_tracing();
    let (app, seen) = recording_app().await;
    let mut cfg = SidecarConfig::local();
    cfg.app = Some(app);
    cfg.inbound = Some(localhost());
    cfg.trace = Some(server_trace);
    let server = Sidecar::start(cfg).await.expect("server sidecar");
    let mut cfg = SidecarConfig::local();
    cfg.clusters = vec![cluster("echo", &[(server.inbound_addr.unwrap(), 1)])];
    cfg.trace = Some(client_trace);
    let client = Sidecar::start(cfg).await.expect("client sidecar");
    TracedMesh {
        app,
        seen,
        server,
        client,
    }
}

impl TracedMesh {
    async fn client(&self) -> EchoClient<Channel> {
        echo_client(self.client.outbound_addr, "echo").await
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// One unary call with `headers` as request metadata; returns its gRPC code.
async fn call(c: &mut EchoClient<Channel>, headers: &[(&'static str, &str)], fail: i32) -> i32 {
    let mut req = tonic::Request::new(EchoRequest {
        payload: b"traced".to_vec(),
        fail_code: fail,
        ..Default::default()
    });
    for (k, v) in headers {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    match c.echo(req).await {
        Ok(_) => 0,
        Err(s) => s.code() as i32,
    }
}

fn of_trace<'a>(spans: &'a [Span], trace: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.trace_id == trace).collect()
}

fn kind<'a>(spans: &[&'a Span], k: SpanKind) -> &'a Span {
    let m: Vec<&&Span> = spans.iter().filter(|s| s.kind == k).collect();
    assert_eq!(m.len(), 1, "one {k:?} span in {spans:#?}");
    m[0]
}

/// The client and server span of `trace`, once both arrived.
async fn pair(c: &Collector, trace: &str) -> (Span, Span) {
    let all = c.wait_for(LIMIT, |s| of_trace(s, trace).len() >= 2).await;
    let spans = of_trace(&all, trace);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    (
        kind(&spans, SpanKind::Client).clone(),
        kind(&spans, SpanKind::Server).clone(),
    )
}

/// A random 32-hex-digit trace id (so reruns never mix).
fn trace_id() -> String {
    format!("{:032x}", fastrand::u128(1..))
}

fn span_id() -> String {
    format!("{:016x}", fastrand::u64(1..))
}

/// A plain HTTP/1.1 request to an admin port: (status, body).
async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// === tracing ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_one_trace_across_both_sidecars() {
    let collector = Collector::start(true).await.unwrap();
    let ep = collector.endpoint();
    let mesh = traced_mesh(
        trace_config(&ep, "frontend", 1.0),
        trace_config(&ep, "echo", 1.0),
    )
    .await;
    let inbound = mesh.server.inbound_addr.unwrap();
    let mut c = mesh.client().await;

    // W3C traceparent (sampled) and tracestate from the calling app.
    let (trace, parent) = (trace_id(), span_id());
    let tp = format!("00-{trace}-{parent}-01");
    let code = call(
        &mut c,
        &[("traceparent", &tp), ("tracestate", "vendor=abc")],
        0,
    )
    .await;
    assert_eq!(code, 0);
    let (client, server) = pair(&collector, &trace).await;

    assert_eq!(
        client.parent_span_id, parent,
        "client span hangs under the caller's span"
    );
    assert_eq!(
        server.parent_span_id, client.span_id,
        "server span hangs under the client span"
    );
    assert_ne!(client.span_id, parent);
    assert_eq!(client.service, "frontend");
    assert_eq!(server.service, "echo");
    for s in [&client, &server] {
        assert_eq!(s.name, format!("{ECHO_SERVICE}/Echo"));
        assert_eq!(s.str_attr("rpc.system"), Some("grpc"), "{s:#?}");
        assert_eq!(s.str_attr("rpc.service"), Some(ECHO_SERVICE));
        assert_eq!(s.str_attr("rpc.method"), Some("Echo"));
        assert_eq!(s.int_attr("rpc.grpc.status_code"), Some(0));
        assert_eq!(s.int_attr("meshwire.attempt"), Some(1));
        assert_ne!(s.status_code, 2, "an OK call is no error: {s:#?}");
    }
    assert_eq!(client.str_attr("server.address"), Some("echo"));
    assert_eq!(
        client.str_attr("meshwire.endpoint"),
        Some(inbound.to_string().as_str()),
        "the endpoint the balancer chose"
    );
    assert_eq!(
        client.str_attr("network.peer.address"),
        Some(inbound.ip().to_string().as_str())
    );
    assert_eq!(
        client.int_attr("network.peer.port"),
        Some(i64::from(inbound.port()))
    );
    assert_eq!(
        server.str_attr("meshwire.endpoint"),
        Some(mesh.app.to_string().as_str())
    );
    // The app gets a traceparent naming the server span, and the tracestate unchanged.
    let seen = mesh.seen();
    let last = seen.last().unwrap();
    assert_eq!(
        last.traceparent.as_deref(),
        Some(format!("00-{trace}-{}-01", server.span_id).as_str())
    );
    assert_eq!(last.tracestate.as_deref(), Some("vendor=abc"));

    // A failed call: status code on both spans; an error on the client span,
    // not on the server span for NOT_FOUND (OTel RPC conventions).
    let (trace, parent) = (trace_id(), span_id());
    let tp = format!("00-{trace}-{parent}-01");
    assert_eq!(call(&mut c, &[("traceparent", &tp)], 5).await, 5);
    let (client, server) = pair(&collector, &trace).await;
    assert_eq!(client.int_attr("rpc.grpc.status_code"), Some(5));
    assert_eq!(server.int_attr("rpc.grpc.status_code"), Some(5));
    assert_eq!(client.status_code, 2, "{client:#?}");
    assert_ne!(server.status_code, 2, "{server:#?}");
    // UNAVAILABLE is a server error too.
    let trace = trace_id();
    let tp = format!("00-{trace}-{}-01", span_id());
    assert_eq!(call(&mut c, &[("traceparent", &tp)], 14).await, 14);
    let (client, server) = pair(&collector, &trace).await;
    assert_eq!((client.status_code, server.status_code), (2, 2));

    // No trace header, ratio 1: the client sidecar starts the trace.
    let before = mesh.seen().len();
    assert_eq!(call(&mut c, &[], 0).await, 0);
    let seen = mesh.seen();
    assert_eq!(seen.len(), before + 1);
    let tp = seen[before]
        .traceparent
        .clone()
        .expect("a traceparent reaches the app");
    let trace = tp.split('-').nth(1).unwrap().to_owned();
    let (client, server) = pair(&collector, &trace).await;
    assert_eq!(client.parent_span_id, "", "a root span");
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(tp, format!("00-{trace}-{}-01", server.span_id));

    // B3, single header.
    let (trace, parent) = (trace_id(), span_id());
    let b3 = format!("{trace}-{parent}-1");
    assert_eq!(call(&mut c, &[("b3", &b3)], 0).await, 0);
    let (client, server) = pair(&collector, &trace).await;
    assert_eq!(client.parent_span_id, parent);
    assert_eq!(server.parent_span_id, client.span_id);
    let last = mesh.seen().last().cloned().unwrap();
    assert_eq!(
        last.b3.as_deref(),
        Some(format!("{trace}-{}-1", server.span_id).as_str()),
        "b3 rewritten hop by hop"
    );
    assert_eq!(
        last.traceparent.as_deref(),
        Some(format!("00-{trace}-{}-01", server.span_id).as_str())
    );

    // B3, multiple headers.
    let (trace, parent) = (trace_id(), span_id());
    assert_eq!(
        call(
            &mut c,
            &[
                ("x-b3-traceid", &trace),
                ("x-b3-spanid", &parent),
                ("x-b3-sampled", "1"),
            ],
            0,
        )
        .await,
        0
    );
    let (client, server) = pair(&collector, &trace).await;
    assert_eq!(client.parent_span_id, parent);
    assert_eq!(server.parent_span_id, client.span_id);
    let last = mesh.seen().last().cloned().unwrap();
    assert_eq!(last.x_b3_traceid.as_deref(), Some(trace.as_str()));
    assert_eq!(last.x_b3_spanid.as_deref(), Some(server.span_id.as_str()));

    // A caller that decided not to sample is honoured even at ratio 1:
    // no span, and its headers reach the app untouched.
    let (untraced, parent) = (trace_id(), span_id());
    let tp_off = format!("00-{untraced}-{parent}-00");
    assert_eq!(call(&mut c, &[("traceparent", &tp_off)], 0).await, 0);
    assert_eq!(
        mesh.seen().last().unwrap().traceparent.as_deref(),
        Some(tp_off.as_str())
    );
    let (b3_off, b3_parent) = (trace_id(), span_id());
    let b3 = format!("{b3_off}-{b3_parent}-0");
    assert_eq!(call(&mut c, &[("b3", &b3)], 0).await, 0);
    // Spans leave each sidecar in order: once a later trace is in, the
    // unsampled calls would have been too.
    let marker = trace_id();
    let tp = format!("00-{marker}-{}-01", span_id());
    assert_eq!(call(&mut c, &[("traceparent", &tp)], 0).await, 0);
    pair(&collector, &marker).await;
    let all = collector.spans();
    assert!(of_trace(&all, &untraced).is_empty(), "{all:#?}");
    assert!(of_trace(&all, &b3_off).is_empty(), "{all:#?}");

    // Every span is accounted for: 7 sampled calls, one span each per sidecar.
    for (s, dir) in [(&mesh.client, "outbound"), (&mesh.server, "inbound")] {
        let m = scrape(s.admin_addr).await;
        assert_eq!(
            m.one("meshwire_trace_calls_sampled_total", &[("direction", dir)]),
            7.0
        );
    }
    assert_eq!(collector.spans().len(), 14);
    for s in [&mesh.client, &mesh.server] {
        let admin = s.admin_addr;
        eventually("every span reported exported", LIMIT, || async move {
            scrape(admin)
                .await
                .one("meshwire_trace_spans_exported_total", &[])
                == 7.0
        })
        .await;
        let m = scrape(admin).await;
        assert_eq!(m.sum("meshwire_trace_spans_dropped_total", &[]), 0.0);
    }
}

/// A call that goes to a second endpoint keeps one client span: the endpoint
/// and attempt of the attempt that answered, and an event for each attempt
/// that did not (here the app's UNAVAILABLE, retried by the default policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_attempt_is_an_event_of_the_client_span() {
    init_tracing();
    let collector = Collector::start(true).await.unwrap();
    let (app, _seen) = recording_app().await;
    let mut servers = Vec::new();
    for _ in 0..2 {
        let mut cfg = SidecarConfig::local();
        cfg.app = Some(app);
        cfg.inbound = Some(localhost());
        servers.push(Sidecar::start(cfg).await.expect("server sidecar"));
    }
    let eps: Vec<_> = servers
        .iter()
        .map(|s| (s.inbound_addr.expect("inbound"), 1))
        .collect();
    let mut cfg = SidecarConfig::local();
    cfg.clusters = vec![cluster("echo", &eps)];
    cfg.trace = Some(trace_config(&collector.endpoint(), "frontend", 1.0));
    let client = Sidecar::start(cfg).await.expect("client sidecar");
    let mut c = echo_client(client.outbound_addr, "echo").await;

    let trace = trace_id();
    let tp = format!("00-{trace}-{}-01", span_id());
    let unavailable = tonic::Code::Unavailable as i32;
    assert_eq!(
        call(&mut c, &[("traceparent", &tp)], unavailable).await,
        unavailable
    );
    let all = collector
        .wait_for(LIMIT, |s| !of_trace(s, &trace).is_empty())
        .await;
    let span = kind(&of_trace(&all, &trace), SpanKind::Client).clone();
    let failed = span.events_named("meshwire.attempt_failed");
    assert_eq!(failed.len(), 1, "{span:#?}");
    assert_eq!(failed[0]["meshwire.reason"], "retried", "{failed:?}");
    assert_eq!(failed[0]["meshwire.attempt"], 1, "{failed:?}");
    assert_eq!(span.int_attr("meshwire.attempt"), Some(2), "{span:#?}");
    let first = failed[0]["meshwire.endpoint"].as_str().expect("endpoint");
    let last = span.str_attr("meshwire.endpoint").expect("endpoint");
    assert_ne!(first, last, "the retry went to the other endpoint");
    for e in [first, last] {
        assert!(
            eps.iter().any(|(a, _)| a.to_string() == e),
            "{e} in {eps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_zero_starts_no_trace_but_honours_a_sampled_caller() {
    let collector = Collector::start(true).await.unwrap();
    let ep = collector.endpoint();
    let mesh = traced_mesh(
        trace_config(&ep, "frontend", 0.0),
        trace_config(&ep, "echo", 0.0),
    )
    .await;
    let mut c = mesh.client().await;
    for _ in 0..20 {
        assert_eq!(call(&mut c, &[], 0).await, 0);
    }
    assert!(
        mesh.seen().iter().all(|s| s.traceparent.is_none()),
        "no trace started, no header invented"
    );
    for s in [&mesh.client, &mesh.server] {
        let m = scrape(s.admin_addr).await;
        assert_eq!(m.sum("meshwire_trace_calls_sampled_total", &[]), 0.0);
    }

    let (trace, parent) = (trace_id(), span_id());
    let tp = format!("00-{trace}-{parent}-01");
    assert_eq!(call(&mut c, &[("traceparent", &tp)], 0).await, 0);
    let (client, server) = pair(&collector, &trace).await;
    assert_eq!(client.parent_span_id, parent);
    assert_eq!(server.parent_span_id, client.span_id);
    // Spans leave in order, so nothing of the 20 unsampled calls is on its way.
    assert_eq!(collector.spans().len(), 2, "{:#?}", collector.spans());
    for (s, dir) in [(&mesh.client, "outbound"), (&mesh.server, "inbound")] {
        let m = scrape(s.admin_addr).await;
        assert_eq!(
            m.one("meshwire_trace_calls_sampled_total", &[("direction", dir)]),
            1.0
        );
    }
}

/// Calls `n` times with `conc` in flight; returns the failures.
async fn calls(c: &EchoClient<Channel>, n: usize, conc: usize) -> Vec<String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (mut c, next) = (c.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                if let Err(e) = c.echo(EchoRequest::default()).await {
                    failed.push(format!("{:?}: {}", e.code(), e.message()));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.unwrap());
    }
    failed
}

fn span_counts(m: &Metrics) -> (f64, f64, f64, f64) {
    (
        m.sum("meshwire_trace_calls_sampled_total", &[]),
        m.one("meshwire_trace_spans_exported_total", &[]),
        m.one(
            "meshwire_trace_spans_dropped_total",
            &[("reason", "queue_full")],
        ),
        m.one(
            "meshwire_trace_spans_dropped_total",
            &[("reason", "export_failed")],
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_spans_not_calls() {
    const CALLS: usize = 300;
    // Nothing listens there: every export fails at once.
    let down = format!("http://{}", dead_addr().await);
    let small = |name: &str| {
        let mut t = trace_config(&down, name, 1.0);
        t.queue_size = 16;
        t.batch_size = 8;
        t
    };
    let mesh = traced_mesh(small("frontend"), small("echo")).await;
    for s in [&mesh.client, &mesh.server] {
        let (st, _, _) = http1_get(s.admin_addr, "a", "/ready").await.unwrap();
        assert_eq!(st, StatusCode::OK, "ready without a collector");
    }
    let c = mesh.client().await;
    let failed = calls(&c, CALLS, 8).await;
    assert!(failed.is_empty(), "{failed:?}");
    // Every span is either dropped at the full queue or dropped after its
    // export failed: none waits anywhere, none is lost uncounted.
    for s in [&mesh.client, &mesh.server] {
        let admin = s.admin_addr;
        eventually("all spans counted as dropped", LIMIT, || async move {
            let (sampled, exported, full, failed) = span_counts(&scrape(admin).await);
            sampled == CALLS as f64 && exported == 0.0 && full + failed == sampled
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_collector_never_holds_calls_up() {
    const CALLS: usize = 400;
    // Accepts connections and never answers: an export hangs until its
    // timeout, far longer than this test's calls take.
    let stuck = TcpListener::bind(localhost()).await.unwrap();
    let stuck_addr = format!("http://{}", stuck.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = stuck.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let slow = |name: &str| {
        let mut t = trace_config(&stuck_addr, name, 1.0);
        t.queue_size = 16;
        t.batch_size = 8;
        t.export_timeout = Duration::from_secs(600);
        t
    };
    let mesh = traced_mesh(slow("frontend"), slow("echo")).await;
    let c = mesh.client().await;
    let failed = calls(&c, CALLS, 8).await;
    assert!(failed.is_empty(), "{failed:?}");
    for s in [&mesh.client, &mesh.server] {
        let (sampled, exported, full, failed) = span_counts(&scrape(s.admin_addr).await);
        assert_eq!(sampled, CALLS as f64);
        // All calls finished while the first export was still hanging...
        assert_eq!((exported, failed), (0.0, 0.0));
        // ... because the queue stayed bounded and the rest was dropped.
        assert!(
            full >= (CALLS - 16 - 8) as f64,
            "at most a queue and a batch kept, dropped {full}"
        );
    }
    assert!(!held.lock().unwrap().is_empty(), "the exporter did connect");
}

// === metrics ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_the_calls_made() {
    let mesh = Mesh::new(1).await;
    let inbound = mesh.servers[0].inbound_addr.unwrap().to_string();
    let app = mesh.backends[0].addr.to_string();
    let (ca, sa) = (mesh.client.admin_addr, mesh.servers[0].admin_addr);
    let out = [
        ("direction", "outbound"),
        ("cluster", "echo"),
        ("endpoint", inbound.as_str()),
    ];
    let inb = [
        ("direction", "inbound"),
        ("cluster", "inbound"),
        ("endpoint", app.as_str()),
    ];
    let mut c = mesh.client().await;
    // Warm up the connections, then measure deltas from here.
    assert_eq!(call(&mut c, &[], 0).await, 0);
    let (c0, s0) = (scrape(ca).await, scrape(sa).await);

    let plan = [(0, 7usize), (5, 3), (14, 2), (3, 1)];
    let mut sent_bytes = 0u64;
    for (code, n) in plan {
        for _ in 0..n {
            assert_eq!(call(&mut c, &[], code).await, code);
            sent_bytes += grpc_frame(&EchoRequest {
                payload: b"traced".to_vec(),
                fail_code: code,
                ..Default::default()
            })
            .len() as u64;
        }
    }
    // One call the sidecar answers itself.
    let mut other = echo_client(mesh.client.outbound_addr, "nosuch").await;
    assert_eq!(
        call(&mut other, &[], 0).await,
        tonic::Code::Unavailable as i32
    );

    let total: usize = plan.iter().map(|(_, n)| n).sum();
    let names = ["OK", "NOT_FOUND", "UNAVAILABLE", "INVALID_ARGUMENT"];
    let (c1, s1) = (scrape(ca).await, scrape(sa).await);
    for ((m0, m1), labels) in [((&c0, &c1), &out), ((&s0, &s1), &inb)] {
        let d = |name: &str, extra: &[(&str, &str)]| {
            let l: Vec<(&str, &str)> = labels.iter().chain(extra).copied().collect();
            m1.sum(name, &l) - m0.sum(name, &l)
        };
        for ((_, n), code) in plan.iter().zip(names) {
            assert_eq!(
                d("meshwire_requests_total", &[("grpc_code", code)]),
                *n as f64,
                "{code} {labels:?}"
            );
        }
        assert_eq!(d("meshwire_requests_total", &[]), total as f64);
        assert_eq!(
            d("meshwire_request_duration_seconds_count", &[]),
            total as f64
        );
        let inf = |m: &Metrics| {
            let b = m.buckets("meshwire_request_duration_seconds", labels);
            assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative: {b:?}");
            let last = *b.last().unwrap();
            assert!(last.0.is_infinite());
            last.1
        };
        assert_eq!(inf(m1) - inf(m0), total as f64);
        assert_eq!(d("meshwire_lb_picks_total", &[]), total as f64);
        assert_eq!(
            d("meshwire_request_body_bytes_total", &[]),
            sent_bytes as f64
        );
        assert!(d("meshwire_response_body_bytes_total", &[]) > 0.0);
        assert_eq!(
            d("meshwire_upstream_connects_total", &[]),
            0.0,
            "connections reused"
        );
        assert_eq!(m1.one("meshwire_requests_in_flight", labels), 0.0);
        assert_eq!(m1.one("meshwire_upstream_connections", labels), 1.0);
        assert_eq!(
            m1.one("meshwire_upstream_connect_errors_total", labels),
            0.0
        );
    }
    let errors = |m: &Metrics| {
        m.sum(
            "meshwire_sidecar_errors_total",
            &[("direction", "outbound"), ("kind", "unknown-service")],
        )
    };
    assert_eq!(errors(&c1) - errors(&c0), 1.0);
    // Bounded labels: no request-derived label values anywhere.
    assert!(!c1.text.contains("nosuch"), "{}", c1.text);
}

// === admin surface ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_stops_the_sidecar_gracefully() {
    let mesh = Mesh::new(1).await;
    let mut c = mesh.client().await;
    assert_eq!(call(&mut c, &[], 0).await, 0);
    // A call in flight across the drain: a client stream we keep open.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let msg = |p: &[u8]| EchoRequest {
        payload: p.to_vec(),
        ..Default::default()
    };
    tx.send(msg(b"ab")).await.unwrap();
    let mut streaming = c.clone();
    let open = tokio::spawn(async move {
        streaming
            .client_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let app = mesh.servers[0].admin_addr;
    eventually("the stream reaches the app", LIMIT, || async move {
        admin_json(app, "/clusters").await["app"]["outstanding"] == 1
    })
    .await;

    let admin = mesh.client.admin_addr;
    let (st, body) = admin_request(admin, "GET", "/drain").await;
    assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    let (st, body) = admin_request(admin, "POST", "/drain").await;
    assert_eq!((st, body.as_str()), (StatusCode::OK, "draining\n"));
    tokio::time::timeout(LIMIT, mesh.client.stopping())
        .await
        .expect("drain started");
    let (st, body) = admin_request(admin, "GET", "/ready").await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    );
    // The call in flight finishes normally.
    tx.send(msg(b"cde")).await.unwrap();
    drop(tx);
    let reply = open.await.unwrap().expect("the open call completes");
    assert_eq!(reply.into_inner().received_bytes, 5);
    assert!(mesh.client.wait().await, "drained within the drain timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_process_logs_json_changes_its_filter_and_flushes_spans_on_drain() {
    let collector = Collector::start(true).await.unwrap();
    let backend = echo("backend").await;
    let dir = tempfile::tempdir().unwrap();
    let config = SidecarProcess::write_config(
        dir.path(),
        &format!(
            "services:\n  - name: echo\n    endpoints:\n      - address: {}\n",
            backend.addr
        ),
    );
    let mut sc = SidecarProcess::spawn(
        &[
            "--static-config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
            "--trace-service-name",
            "edge",
        ],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint().as_str())],
    )
    .await;
    let admin = sc.addrs.admin;

    // /logging: read, change, refuse a bad filter.
    assert_eq!(
        admin_request(admin, "GET", "/logging").await,
        (StatusCode::OK, "info\n".into())
    );
    let (st, body) = admin_request(
        admin,
        "POST",
        "/logging?level=meshwire_sidecar%3Ddebug%2Cinfo",
    )
    .await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::OK, "meshwire_sidecar=debug,info\n")
    );
    assert_eq!(
        admin_request(admin, "GET", "/logging").await.1,
        "meshwire_sidecar=debug,info\n"
    );
    let (st, body) = admin_request(admin, "POST", "/logging?level=%5Bbad").await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{body}");
    let (st, _) = admin_request(admin, "POST", "/logging").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(
        admin_request(admin, "GET", "/logging").await.1,
        "meshwire_sidecar=debug,info\n",
        "a refused filter changes nothing"
    );
    for page in ["/live", "/ready", "/clusters", "/config_dump", "/metrics"] {
        assert_eq!(
            admin_request(admin, "GET", page).await.0,
            StatusCode::OK,
            "{page}"
        );
    }

    // A traced call; the default batch interval (500 ms) has not passed when
    // the drain starts, so the span arrives only if the drain flushes it.
    let (trace, parent) = (trace_id(), span_id());
    let mut c = echo_client(sc.addrs.outbound, "echo").await;
    let tp = format!("00-{trace}-{parent}-01");
    assert_eq!(call(&mut c, &[("traceparent", &tp)], 0).await, 0);
    drop(c);
    let (st, _) = admin_request(admin, "POST", "/drain").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(sc.wait_exit(LIMIT).await, Some(0), "{}", sc.log());
    let spans = collector.spans();
    let mine = of_trace(&spans, &trace);
    assert_eq!(mine.len(), 1, "{spans:#?}\n{}", sc.log());
    assert_eq!(mine[0].parent_span_id, parent);
    assert_eq!(mine[0].service, "edge");
    assert_eq!(mine[0].kind, SpanKind::Client);

    // JSON logs: every line an object with a level, and the new filter at work.
    let log = sc.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object()),
        "{log}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "log filter changed"),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"
            && l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("meshwire_sidecar"))),
        "debug lines once the filter allows them: {log}"
    );
}

// === the control plane's admin port ===

mod control_plane {
    use meshwire_control_plane::{ControlPlane, ControlPlaneConfig};
    use meshwire_proto::admin::v1 as pb;

    use super::*;

    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

    /// Deltas of a control plane's metrics between two scrapes.
    fn delta(m0: &Metrics, m1: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        m1.sum(name, labels) - m0.sum(name, labels)
    }

    fn api(method: &'static str, code: &'static str) -> [(&'static str, &'static str); 2] {
        [("method", method), ("code", code)]
    }

    /// A raw call to a path the API does not have, without a token.
    async fn call_path(addr: SocketAddr, path: &str) -> Option<String> {
        let mut h2 = h2_client(addr).await;
        let (resp, mut body) = h2.send_request(grpc_request("cp", path), false).unwrap();
        // The server may refuse (trailers-only) before it reads the body, so
        // the stream can be closed already: the answer is in the response.
        let _ = body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
        let resp = resp.await.unwrap();
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_move_by_exactly_the_calls_and_pushes_made() {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlane::start(ControlPlaneConfig::local(dir.path()))
            .await
            .unwrap();
        let http = cp.admin_addr.expect("admin port");
        for page in ["/live", "/ready"] {
            assert_eq!(admin_request(http, "GET", page).await.0, StatusCode::OK);
        }
        assert_eq!(
            admin_request(http, "GET", "/nope").await.0,
            StatusCode::NOT_FOUND
        );
        let m0 = scrape(http).await;
        assert_eq!(m0.one("meshwire_cp_connected_sidecars", &[]), 0.0);

        // Admin API calls, by method and result.
        let mut a = admin(cp.local_addr, Some(&format!("Bearer {}", cp.admin_token))).await;
        let (e1, e2, e3) = (dead_addr().await, dead_addr().await, dead_addr().await);
        api::create_service(&mut a, "echo").await;
        let dup = a
            .create_service(pb::CreateServiceRequest {
                service: Some(pb::Service {
                    name: "echo".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(dup.code(), tonic::Code::AlreadyExists);
        api::add_endpoint(&mut a, "echo", e1, 1).await;
        api::add_endpoint(&mut a, "echo", e2, 1).await;
        let missing = a
            .get_service(pb::GetServiceRequest {
                name: "nosuch".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        let mut anon = admin(cp.local_addr, None).await;
        let denied = anon
            .list_services(pb::ListServicesRequest {})
            .await
            .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::Unauthenticated);
        // Made-up methods all land on one label value.
        for evil in ["Evil1", "Evil2", "CreateServiceX"] {
            let path = format!("/meshwire.admin.v1.MeshAdmin/{evil}");
            assert_eq!(call_path(cp.local_addr, &path).await.as_deref(), Some("16"));
        }
        let m1 = scrape(http).await;
        let d = |l: &[(&str, &str)]| delta(&m0, &m1, "meshwire_cp_api_requests_total", l);
        assert_eq!(d(&api("CreateService", "OK")), 1.0);
        assert_eq!(d(&api("CreateService", "ALREADY_EXISTS")), 1.0);
        assert_eq!(d(&api("AddEndpoint", "OK")), 2.0);
        assert_eq!(d(&api("GetService", "NOT_FOUND")), 1.0);
        assert_eq!(d(&api("ListServices", "UNAUTHENTICATED")), 1.0);
        assert_eq!(d(&api("unknown", "UNAUTHENTICATED")), 3.0);
        assert_eq!(d(&[]), 9.0, "nothing else counted:\n{}", m1.text);
        assert!(!m1.text.contains("Evil"), "{}", m1.text);
        assert_eq!(
            delta(
                &m0,
                &m1,
                "meshwire_cp_api_request_duration_seconds_count",
                &[("method", "CreateService")]
            ),
            2.0
        );
        assert_eq!(
            m1.one("meshwire_cp_config_version", &[]),
            cp.version() as f64
        );

        // Snapshots are published coalesced (20 ms window): wait for the one
        // with every change above, so the sidecar's first push is the last.
        let mut snaps = cp.snapshots();
        let want = cp.version();
        tokio::time::timeout(LIMIT, snaps.wait_for(|s| s.version >= want))
            .await
            .expect("the snapshot with every change is published")
            .unwrap();
        drop(snaps);

        // A sidecar that takes at most 2 endpoints per service.
        let mut cfg = SidecarConfig::local();
        cfg.control_plane = Some(meshwire_sidecar::ControlPlaneConfig {
            server: format!("http://{}", cp.local_addr),
            service: "caller".into(),
            node_id: "caller-1".into(),
        });
        cfg.max_endpoints = 2;
        let sidecar = Sidecar::start(cfg).await.unwrap();
        let acked = |n: f64| {
            move || async move {
                scrape(http)
                    .await
                    .sum("meshwire_cp_xds_acks_total", &[("type", "endpoint")])
                    == n
            }
        };
        eventually("the sidecar ACKs its endpoints", LIMIT, acked(1.0)).await;
        let m2 = scrape(http).await;
        assert_eq!(m2.one("meshwire_cp_connected_sidecars", &[]), 1.0);
        assert_eq!(delta(&m1, &m2, "meshwire_cp_xds_streams_total", &[]), 1.0);
        for ty in ["cluster", "endpoint"] {
            let t = [("type", ty)];
            assert_eq!(
                delta(&m1, &m2, "meshwire_cp_xds_pushes_total", &t),
                1.0,
                "{ty}"
            );
            assert_eq!(
                delta(&m1, &m2, "meshwire_cp_xds_push_latency_seconds_count", &t),
                1.0
            );
        }

        // One change: one snapshot, one endpoint push, its ACK, one latency sample.
        let v = api::set_weight(&mut a, "echo", e1, 5).await;
        eventually("the new weight ACKed", LIMIT, acked(2.0)).await;
        let m3 = scrape(http).await;
        let d = |name: &str, ty: &'static str| delta(&m2, &m3, name, &[("type", ty)]);
        assert_eq!(d("meshwire_cp_xds_pushes_total", "endpoint"), 1.0);
        assert_eq!(d("meshwire_cp_xds_pushes_total", "cluster"), 0.0);
        assert_eq!(
            d("meshwire_cp_xds_push_latency_seconds_count", "endpoint"),
            1.0
        );
        assert_eq!(d("meshwire_cp_xds_nacks_total", "endpoint"), 0.0);
        assert_eq!(
            delta(&m2, &m3, "meshwire_cp_snapshots_published_total", &[]),
            1.0
        );
        assert_eq!(m3.one("meshwire_cp_config_version", &[]), v as f64);
        let node = cp
            .nodes
            .list()
            .into_iter()
            .find(|n| n.node_id == "caller-1")
            .unwrap();
        assert_eq!(node.acked.get(EDS), Some(&v.to_string()));

        // A third endpoint is more than the sidecar takes: NACK.
        api::add_endpoint(&mut a, "echo", e3, 1).await;
        eventually("the NACK counted", LIMIT, || async move {
            scrape(http)
                .await
                .sum("meshwire_cp_xds_nacks_total", &[("type", "endpoint")])
                == 1.0
        })
        .await;
        let m4 = scrape(http).await;
        assert_eq!(
            delta(
                &m3,
                &m4,
                "meshwire_cp_xds_pushes_total",
                &[("type", "endpoint")]
            ),
            1.0
        );
        assert_eq!(
            delta(
                &m3,
                &m4,
                "meshwire_cp_xds_acks_total",
                &[("type", "endpoint")]
            ),
            0.0
        );
        // The sidecar's side of it: the version it ACKed, and the NACK.
        let sa = sidecar.admin_addr;
        eventually("the sidecar counts its NACK", LIMIT, || async move {
            scrape(sa).await.one("meshwire_xds_nacks_total", &[]) == 1.0
        })
        .await;
        let sm = scrape(sa).await;
        assert_eq!(sm.one("meshwire_xds_connected", &[]), 1.0);
        assert_eq!(
            sm.one("meshwire_xds_acked_version", &[("type", "endpoint")]),
            v as f64
        );
        assert_eq!(sm.one("meshwire_xds_nacks_total", &[]), 1.0);
        assert_eq!(sm.one("meshwire_xds_streams_total", &[]), 1.0);

        sidecar.shutdown();
        eventually("the sidecar counted gone", LIMIT, || async move {
            scrape(http)
                .await
                .one("meshwire_cp_connected_sidecars", &[])
                == 0.0
        })
        .await;
        cp.stop().await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(http).await.is_err(),
            "the admin port closes with the control plane"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_binary_serves_its_admin_port() {
        let dir = tempfile::tempdir().unwrap();
        let cp = ControlPlaneProcess::spawn(dir.path()).await;
        assert_ne!(cp.admin, cp.addr);
        for page in ["/live", "/ready"] {
            assert_eq!(admin_request(cp.admin, "GET", page).await.0, StatusCode::OK);
        }
        let mut a = cp.client().await;
        api::create_service(&mut a, "greeter").await;
        let m = scrape(cp.admin).await;
        assert_eq!(
            m.one(
                "meshwire_cp_api_requests_total",
                &api("CreateService", "OK")
            ),
            1.0
        );
        for family in [
            "meshwire_cp_connected_sidecars",
            "meshwire_cp_xds_pushes",
            "meshwire_cp_xds_push_latency_seconds",
            "meshwire_cp_xds_nacks",
            "meshwire_cp_api_requests",
        ] {
            assert!(m.has_family(family), "{family}:\n{}", m.text);
        }
    }
}
