//! How the sidecar behaves at the edges of a call: deadlines, cancellation in
//! both directions, flow control, the errors it makes itself, HTTP/1.1
//! callers, hop-by-hop headers, `:authority` rewriting and per-service ports.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use meshwire_examples::echo::EchoOptions;
use meshwire_sidecar::{Sidecar, SidecarConfig};
use meshwire_tests::*;
use tokio::sync::Semaphore;
use tonic::Code;

// === deadlines ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_is_forwarded_and_enforced_by_the_sidecar() {
    let mesh = Mesh::new(1).await;
    let stats = mesh.backends[0].stats.clone();

    // A client that does not enforce its own deadline: the sidecar must.
    let mut h2 = h2_client(mesh.client.outbound_addr).await;
    let mut req = grpc_request("echo", "/meshwire.example.v1.Echo/Echo");
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("300m"));
    let started = Instant::now();
    let (resp, mut body) = h2.send_request(req, false).unwrap();
    body.send_data(
        grpc_frame(&EchoRequest {
            delay_ms: 30_000,
            ..Default::default()
        }),
        true,
    )
    .unwrap();
    let resp = resp.await.expect("a response, not a hang");
    let elapsed = started.elapsed();
    assert_eq!(resp.headers()["grpc-status"], "4", "{resp:?}");
    assert_eq!(resp.headers()["meshwire-error"], "deadline-exceeded");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(250),
        "fired early: {elapsed:?}"
    );

    // The app saw the (remaining) deadline, and the sidecar cancelled its call.
    let seen = Duration::from_micros(stats.last_timeout_us.load(Ordering::Relaxed));
    assert!(
        seen > Duration::ZERO && seen <= Duration::from_millis(300),
        "app saw grpc-timeout {seen:?}"
    );
    eventually(
        "the app's call is cancelled",
        Duration::from_secs(5),
        || async { stats.cancelled.load(Ordering::Relaxed) == 1 },
    )
    .await;
    eventually(
        "no call left outstanding",
        Duration::from_secs(5),
        || async {
            let ep = endpoint_stats(
                mesh.client.admin_addr,
                "echo",
                mesh.servers[0].inbound_addr.unwrap(),
            )
            .await;
            ep["outstanding"] == 0
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_mid_stream_ends_with_deadline_exceeded_trailers() {
    let mesh = Mesh::new(1).await;
    let stats = mesh.backends[0].stats.clone();
    let mut h2 = h2_client(mesh.client.outbound_addr).await;
    let mut req = grpc_request("echo", "/meshwire.example.v1.Echo/ServerStream");
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("400m"));
    let (resp, mut body) = h2.send_request(req, false).unwrap();
    body.send_data(
        grpc_frame(&StreamRequest {
            count: 1000,
            size: 10,
            interval_ms: 50,
        }),
        true,
    )
    .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers().get("grpc-status").is_none(),
        "headers first, then messages"
    );
    let mut recv = resp.into_body();
    let mut got = 0;
    while let Some(chunk) = recv.data().await {
        got += chunk.unwrap().len();
    }
    let trailers = recv.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "4");
    assert!(got > 0, "some messages arrived before the deadline");
    eventually(
        "the app's stream is cancelled",
        Duration::from_secs(5),
        || async { stats.cancelled.load(Ordering::Relaxed) == 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_request_timeout_caps_calls_without_a_deadline() {
    // (A tonic client's own deadline is enforced by tonic too and races ours;
    // the raw-client test above shows the sidecar's. Here the client sets none.)
    let backend = echo("slow").await;
    let stats = backend.stats.clone();
    let mut c = cluster("echo", &[(backend.addr, 1)]);
    c.request_timeout = Some(Duration::from_millis(200));
    let client = client_sidecar(vec![c]).await;
    let mut tonic_client = echo_client(client.outbound_addr, "echo").await;
    let err = tonic_client
        .echo(EchoRequest {
            delay_ms: 10_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        err.metadata().get("meshwire-error").unwrap(),
        "deadline-exceeded"
    );
    let seen = Duration::from_micros(stats.last_timeout_us.load(Ordering::Relaxed));
    assert!(
        seen > Duration::ZERO && seen <= Duration::from_millis(200),
        "the cap is forwarded as grpc-timeout: {seen:?}"
    );
    eventually(
        "the app's call is cancelled",
        Duration::from_secs(5),
        || async { stats.cancelled.load(Ordering::Relaxed) == 1 },
    )
    .await;
}

// === cancellation ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cancel_reaches_the_app() {
    let mesh = Mesh::new(1).await;
    let stats = mesh.backends[0].stats.clone();
    let mut client = mesh.client().await;
    let call = tokio::spawn(async move {
        client
            .echo(EchoRequest {
                delay_ms: 60_000,
                ..Default::default()
            })
            .await
    });
    eventually(
        "the call reaches the app",
        Duration::from_secs(5),
        || async { stats.calls.load(Ordering::Relaxed) == 1 },
    )
    .await;
    call.abort(); // drops the call: tonic sends RST_STREAM(CANCEL)
    eventually(
        "the app's handler is cancelled",
        Duration::from_secs(5),
        || async { stats.cancelled.load(Ordering::Relaxed) == 1 },
    )
    .await;
    for s in &mesh.servers {
        eventually(
            "inbound outstanding back to 0",
            Duration::from_secs(5),
            || async { admin_json(s.admin_addr, "/clusters").await["app"]["outstanding"] == 0 },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_reach_the_caller() {
    let (app, _task) = raw_h2_app().await;
    let server = server_sidecar(app).await;
    let client = client_sidecar(vec![cluster("raw", &[(server.inbound_addr.unwrap(), 1)])]).await;
    let mut h2 = h2_client(client.outbound_addr).await;

    // Reset before headers: the sidecar answers trailers-only.
    for (path, code) in [
        ("/reset/before/cancel", "1"),
        ("/reset/before/internal", "14"),
        ("/reset/before/refused", "14"),
    ] {
        let (resp, _) = h2.send_request(grpc_request("raw", path), true).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.headers()["grpc-status"], code, "{path}: {resp:?}");
    }
    // Reset after headers: the reset itself is propagated, reason intact.
    for (path, reason) in [
        ("/reset/after/cancel", h2::Reason::CANCEL),
        ("/reset/after/internal", h2::Reason::INTERNAL_ERROR),
    ] {
        let (resp, mut req_body) = h2.send_request(grpc_request("raw", path), false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body
            .data()
            .await
            .expect("a message")
            .expect("a message, not an error");
        assert_eq!(first.len(), 5, "one empty gRPC message");
        req_body
            .send_data(grpc_frame(&EchoRequest::default()), false)
            .unwrap();
        let mut err = None;
        while let Some(r) = body.data().await {
            if let Err(e) = r {
                err = Some(e);
                break;
            }
        }
        let err = match err {
            Some(e) => e,
            None => body
                .trailers()
                .await
                .expect_err("the stream must end in a reset"),
        };
        assert_eq!(err.reason(), Some(reason), "{path}: {err:?}");
    }
}

// === flow control ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_slows_the_writer() {
    const COUNT: u32 = 2000;
    const SIZE: u32 = 64 << 10; // 2000 x 64 KiB = 125 MiB if nothing pushed back
    let mesh = Mesh::new(1).await;
    let stats = mesh.backends[0].stats.clone();
    let mut client = mesh.client().await;
    let mut stream = client
        .server_stream(StreamRequest {
            count: COUNT,
            size: SIZE,
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.seq, 0);
    // The reader stops; the writer must stall once the windows along the path are full.
    let stalled_at = settled(Duration::from_secs(20), Duration::from_millis(500), || {
        stats.stream_sent.load(Ordering::Relaxed)
    })
    .await;
    let buffered_mib = (stalled_at * u64::from(SIZE)) >> 20;
    assert!(
        stalled_at < 200,
        "the app wrote {stalled_at} messages (~{buffered_mib} MiB) ahead of a reader that took 1"
    );
    // Reading resumes and everything arrives, in order.
    let mut next = 1;
    while let Some(m) = stream.next().await {
        let m = m.unwrap();
        assert_eq!(m.seq, next);
        assert_eq!(m.payload.len(), SIZE as usize);
        next += 1;
    }
    assert_eq!(next, COUNT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_app_reading_a_client_stream_slows_the_sender() {
    const COUNT: u64 = 1000;
    const SIZE: usize = 64 << 10; // 1000 x 64 KiB = 62.5 MiB if nothing pushed back
    // Windows along the path (client -> sidecar -> sidecar -> app) hold a few
    // MiB; this is far below what an unbounded buffer would take in.
    const BOUND: u64 = 200;
    // The app reads one client-stream message per permit.
    let gate = Arc::new(Semaphore::new(1));
    let mesh = Mesh::with_options(&[EchoOptions {
        read_gate: Some(gate.clone()),
        ..Default::default()
    }])
    .await;
    let stats = mesh.backends[0].stats.clone();
    let mut client = mesh.client().await;
    // Messages the client's stream handed to tonic to send.
    let pulled = Arc::new(AtomicU64::new(0));
    let counter = pulled.clone();
    let messages = futures_util::stream::iter(0..COUNT).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        EchoRequest {
            payload: vec![i as u8; SIZE],
            ..Default::default()
        }
    });
    let call = tokio::spawn(async move { client.client_stream(messages).await });
    eventually(
        "the app took its first message",
        Duration::from_secs(10),
        || async { stats.calls.load(Ordering::Relaxed) == 1 && gate.available_permits() == 0 },
    )
    .await;
    // The app reads no more: the sender must stall once the windows are full.
    let stalled_at = settled(Duration::from_secs(20), Duration::from_millis(500), || {
        pulled.load(Ordering::Relaxed)
    })
    .await;
    assert!(
        stalled_at < BOUND,
        "the client sent {stalled_at} messages (~{} MiB) to an app that read 1",
        (stalled_at * SIZE as u64) >> 20
    );
    // The app reads slowly, a few messages at a time, past where the sender
    // stalled: the sender follows it, never more than the windows ahead.
    let mut read = 1;
    while read <= stalled_at {
        gate.add_permits(8);
        read += 8;
        eventually(
            "the app read its next messages",
            Duration::from_secs(10),
            || async { gate.available_permits() == 0 },
        )
        .await;
        let sent = pulled.load(Ordering::Relaxed);
        assert!(
            sent - read < BOUND,
            "the client sent {sent} messages to an app that read {read}"
        );
    }
    assert!(
        pulled.load(Ordering::Relaxed) > stalled_at,
        "the sender resumed as the app read"
    );
    // Reading at full speed, everything arrives.
    gate.add_permits(Semaphore::MAX_PERMITS - gate.available_permits());
    let reply = call
        .await
        .unwrap()
        .expect("client stream completes")
        .into_inner();
    assert_eq!(u64::from(reply.seq), COUNT);
    assert_eq!(reply.received_bytes, COUNT * SIZE as u64);
    assert_eq!(stats.cancelled.load(Ordering::Relaxed), 0);
}

// === errors the sidecar makes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_errors_are_proper_grpc_statuses() {
    let dead1 = dead_addr().await;
    let dead2 = dead_addr().await;
    let client = client_sidecar(vec![
        cluster("empty", &[]),
        cluster("gone", &[(dead1, 1), (dead2, 1)]),
    ])
    .await;

    let check = |svc: &'static str, kind: &'static str, needle: &'static str| {
        let addr = client.outbound_addr;
        async move {
            let mut c = echo_client(addr, svc).await;
            let err = c.echo(EchoRequest::default()).await.unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{svc}: {err:?}");
            assert!(err.message().contains(needle), "{svc}: {:?}", err.message());
            assert_eq!(err.metadata().get("meshwire-error").unwrap(), kind);
        }
    };
    check("nosuch", "unknown-service", "\"nosuch\"").await;
    check("empty", "no-endpoints", "no endpoints").await;
    check("gone", "unreachable", "no endpoint could be reached").await;

    // HTTP/1.1 callers get the matching HTTP status.
    let (status, headers, body) = http1_get(client.outbound_addr, "nosuch", "/")
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["meshwire-error"], "unknown-service");
    assert!(String::from_utf8_lossy(&body).contains("nosuch"));
    let (status, _, _) = http1_get(client.outbound_addr, "gone:8080", "/x")
        .await
        .unwrap();
    assert_eq!(status, 503);

    // A request naming no service at all.
    let out = raw_tcp_exchange(
        client.outbound_addr,
        b"GET / HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Garbage is refused without taking the sidecar down.
    let out = raw_tcp_exchange(
        client.outbound_addr,
        b"\x00\x01garbage\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    let (status, _, _) = http1_get(client.admin_addr, "admin", "/live")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let mut c = echo_client(client.outbound_addr, "nosuch").await;
    assert_eq!(
        c.echo(EchoRequest::default()).await.unwrap_err().code(),
        Code::Unavailable
    );
}

// === HTTP/1.1, headers, authority ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_callers_hop_by_hop_stripping_and_authority_rewrite() {
    let (app, _task) = raw_h2_app().await;
    let server = server_sidecar(app).await;
    let inbound = server.inbound_addr.unwrap();
    let mut rewritten = cluster("web2", &[(inbound, 1)]);
    rewritten.authority = Some("internal.web:8080".into());
    let client = client_sidecar(vec![cluster("web", &[(inbound, 1)]), rewritten]).await;

    let raw = b"GET /hello?x=1 HTTP/1.1\r\nHost: web:80\r\nConnection: keep-alive, x-private\r\n\
x-private: secret\r\nKeep-Alive: timeout=5\r\nx-visible: yes\r\nTE: gzip\r\n\r\n";
    let out = raw_tcp_exchange(client.outbound_addr, raw, Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-app: raw"), "{out}");

    let (status, _, body) = http1_get(client.outbound_addr, "web", "/path?q=2")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["authority"], "web");
    assert_eq!(info["path"], "/path");
    assert_eq!(info["version"], "HTTP/2.0");

    // Hop-by-hop headers never reach the app; end-to-end ones do.
    let mut h1 = tokio::net::TcpStream::connect(client.outbound_addr)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    h1.write_all(raw).await.unwrap();
    let mut buf = vec![0u8; 16384];
    let mut got = Vec::new();
    // A chunked body ends with the zero-size chunk.
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let n = h1.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let json = &text[text.find('{').unwrap()..=text.rfind('}').unwrap()];
    let info: serde_json::Value = serde_json::from_str(json).unwrap();
    let h = &info["headers"];
    assert_eq!(h["x-visible"], "yes");
    for hop in [
        "connection",
        "x-private",
        "keep-alive",
        "te",
        "host",
        "transfer-encoding",
    ] {
        assert!(h.get(hop).is_none(), "{hop} reached the app: {h}");
    }
    assert_eq!(info["authority"], "web:80");

    // Rewritten authority.
    let (status, _, body) = http1_get(client.outbound_addr, "web2", "/").await.unwrap();
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["authority"], "internal.web:8080");

    // gRPC over h2c with a rewritten authority.
    let mut h2 = h2_client(client.outbound_addr).await;
    let (resp, _) = h2
        .send_request(grpc_request("web2:1234", "/pkg.Svc/Method"), true)
        .unwrap();
    let mut body = resp.await.unwrap().into_body();
    let data = body.data().await.unwrap().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&data).unwrap();
    assert_eq!(info["authority"], "internal.web:8080");
    assert_eq!(
        info["headers"]["te"], "trailers",
        "gRPC's te: trailers survives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_service_port_routes_without_authority() {
    let backend = echo("solo").await;
    let mut cfg = SidecarConfig::local();
    cfg.clusters = vec![cluster("echo", &[(backend.addr, 1)])];
    cfg.service_listeners = vec![(localhost(), "echo".into())];
    let sc = Sidecar::start(cfg).await.unwrap();
    let (name, addr) = sc.service_addrs[0].clone();
    assert_eq!(name, "echo");
    // The authority names nothing the sidecar knows; the port decides.
    let mut c = echo_client(addr, "127.0.0.1").await;
    let r = c.echo(EchoRequest::default()).await.unwrap().into_inner();
    assert_eq!(r.server, "solo");
    let (status, _, _) = http1_get(addr, "whatever", "/").await.unwrap();
    assert_ne!(status, 503, "routed to echo, not 'unknown service'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_liveness_readiness_and_clusters() {
    let mesh = Mesh::with_options(&[EchoOptions::default(), EchoOptions::default()]).await;
    let mut c = mesh.client().await;
    for _ in 0..10 {
        c.echo(EchoRequest::default()).await.unwrap();
    }
    let admin = mesh.client.admin_addr;
    assert_eq!(http1_get(admin, "a", "/live").await.unwrap().0, 200);
    assert_eq!(http1_get(admin, "a", "/ready").await.unwrap().0, 200);
    assert_eq!(http1_get(admin, "a", "/nope").await.unwrap().0, 404);
    let v = admin_json(admin, "/clusters").await;
    let eps = v["clusters"][0]["endpoints"].as_array().unwrap();
    assert_eq!(v["clusters"][0]["name"], "echo");
    assert_eq!(v["clusters"][0]["lb_policy"], "least_request");
    let total: u64 = eps.iter().map(|e| e["requests"].as_u64().unwrap()).sum();
    let ok: u64 = eps.iter().map(|e| e["success"].as_u64().unwrap()).sum();
    assert_eq!((total, ok), (10, 10), "{v}");
    for e in eps {
        assert_eq!(e["weight"], 1);
        assert_eq!(e["outstanding"], 0);
        assert!(e["connections"].as_u64().unwrap() <= 1);
    }
    let app = admin_json(mesh.servers[0].admin_addr, "/clusters").await["app"].clone();
    assert_eq!(app["address"], mesh.backends[0].addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_unprocessed_are_replayed_on_another_endpoint() {
    let (refusing, refused) = refusing_h2_app().await;
    let good = echo("good").await;
    let client = client_sidecar(vec![cluster("echo", &[(refusing, 1), (good.addr, 1)])]).await;
    let mut c = echo_client(client.outbound_addr, "echo").await;
    for i in 0..100u32 {
        let payload = format!("payload-{i}-{}", "x".repeat(i as usize * 50)).into_bytes();
        let r = c
            .echo(EchoRequest {
                payload: payload.clone(),
                ..Default::default()
            })
            .await
            .expect("a refused call is sent again elsewhere");
        let r = r.into_inner();
        assert_eq!(r.server, "good");
        assert_eq!(r.payload, payload, "the replayed body arrives intact");
    }
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the refusing endpoint was tried (so calls were replayed)"
    );
}
