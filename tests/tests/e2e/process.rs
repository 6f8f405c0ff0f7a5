//! The `meshwire-sidecar` binary as a real process: configuration from the
//! environment, start-up failures with non-zero exits, and graceful shutdown
//! on SIGTERM/SIGINT (bad flags: `sidecar/tests/cli.rs`).

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshwire_tests::*;
use prost::Message;
use tonic::Code;

use meshwire_tests::bins::SIDECAR;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_in_use_fails_start_up() {
    let taken = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(SIDECAR)
            .args(["--outbound", &addr, "--admin", "127.0.0.1:0"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outbound") && err.contains("in use"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_entirely_from_the_environment() {
    let backend = echo("env-backend").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = SidecarProcess::write_config(
        dir.path(),
        &format!(
            "services:\n  - name: echo\n    endpoints:\n      - address: {}\n",
            backend.addr
        ),
    );
    // Server sidecar: its app and config from MESHWIRE_* variables only.
    let server = SidecarProcess::spawn(
        &[],
        &[
            ("MESHWIRE_APP", &backend.addr.to_string()),
            ("MESHWIRE_LOG", "debug"),
        ],
    )
    .await;
    let inbound = server.addrs.inbound.expect("inbound from MESHWIRE_APP");
    let client_cfg = SidecarProcess::write_config(
        dir.path(),
        &format!("services:\n  - name: echo\n    endpoints:\n      - address: {inbound}\n"),
    );
    let client = SidecarProcess::spawn(
        &[],
        &[("MESHWIRE_STATIC_CONFIG", client_cfg.to_str().unwrap())],
    )
    .await;
    drop(cfg);
    let mut c = echo_client(client.addrs.outbound, "echo").await;
    let r = c
        .echo(EchoRequest::default())
        .await
        .expect("call via env-configured sidecars");
    assert_eq!(r.into_inner().server, "env-backend");
    assert!(server.log().contains("DEBUG"), "MESHWIRE_LOG applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_then_exits() {
    let backend = echo("drain-backend").await;
    let stats = backend.stats.clone();
    let mut server = SidecarProcess::spawn(
        &["--app", &backend.addr.to_string(), "--drain-timeout", "30s"],
        &[],
    )
    .await;
    let inbound = server.addrs.inbound.unwrap();
    let admin = server.addrs.admin;
    let client = client_sidecar(vec![cluster("echo", &[(inbound, 1)])]).await;
    let mut c = echo_client(client.outbound_addr, "echo").await;
    c.echo(EchoRequest::default()).await.unwrap();

    let mut slow = c.clone();
    let call = tokio::spawn(async move {
        slow.echo(EchoRequest {
            delay_ms: 1500,
            ..Default::default()
        })
        .await
    });
    eventually(
        "the slow call reached the app",
        Duration::from_secs(5),
        || async { stats.calls.load(Ordering::Relaxed) == 2 },
    )
    .await;
    // A raw HTTP/2 connection to the inbound port (as another sidecar's) with a
    // client-streaming call open on it: the call lasts until we end our stream.
    let raw = h2_client(inbound).await;
    let (open_resp, mut open_body) = raw
        .clone()
        .send_request(
            grpc_request("echo", "/meshwire.example.v1.Echo/ClientStream"),
            false,
        )
        .expect("stream opened");
    let msg = || {
        grpc_frame(&EchoRequest {
            payload: vec![7; 100],
            ..Default::default()
        })
    };
    open_body.send_data(msg(), false).unwrap();
    eventually(
        "the open stream reached the app",
        Duration::from_secs(5),
        || async { stats.calls.load(Ordering::Relaxed) == 3 },
    )
    .await;
    server.signal("TERM");
    // The open connection is told to go away: it refuses new streams...
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let since = tokio::time::Instant::now();
    while raw.clone().ready().await.is_ok() {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "no GOAWAY on the open connection 5s after SIGTERM"
        );
        tick.tick().await;
    }
    let refused = raw
        .clone()
        .send_request(grpc_request("echo", "/meshwire.example.v1.Echo/Echo"), true)
        .expect_err("a new stream after GOAWAY");
    assert!(refused.is_go_away(), "{refused:?}");
    assert_eq!(refused.reason(), Some(h2::Reason::NO_ERROR), "{refused:?}");
    // ...while the stream it already had still completes, after the GOAWAY.
    open_body.send_data(msg(), true).unwrap();
    let resp = open_resp.await.expect("response on the open stream");
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut resp_body = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = resp_body.data().await {
        let chunk = chunk.expect("response data");
        let _ = resp_body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = resp_body
        .trailers()
        .await
        .expect("trailers")
        .expect("grpc trailers");
    assert_eq!(trailers["grpc-status"], "0", "{trailers:?}");
    let reply = EchoReply::decode(data.get(5..).expect("one message")).expect("EchoReply");
    assert_eq!((reply.seq, reply.received_bytes), (2, 200), "{reply:?}");
    // Draining: not ready, no new connections, the call in flight continues.
    eventually("/ready turns 503", Duration::from_secs(5), || async {
        http1_get(admin, "a", "/ready")
            .await
            .is_ok_and(|r| r.0 == http::StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    eventually(
        "the inbound port stops accepting",
        Duration::from_secs(5),
        || async { tokio::net::TcpStream::connect(inbound).await.is_err() },
    )
    .await;
    let reply = call
        .await
        .unwrap()
        .expect("the in-flight call completes during the drain");
    assert_eq!(reply.into_inner().server, "drain-backend");
    assert_eq!(stats.cancelled.load(Ordering::Relaxed), 0);
    let code = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "clean drain exits 0:\n{}", server.log());
    assert!(server.log().contains("drained"), "{}", server.log());

    // Later calls see the endpoint gone (the only one): a proper UNAVAILABLE.
    let err = c.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

/// `POST /drain` (what an app's stop hook sends, `probe::drain_sidecar`):
/// the same graceful drain as SIGTERM, then the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_drain_drains_in_flight_calls_then_exits() {
    let backend = echo("drain-hook-backend").await;
    let stats = backend.stats.clone();
    let mut server = SidecarProcess::spawn(
        &["--app", &backend.addr.to_string(), "--drain-timeout", "30s"],
        &[],
    )
    .await;
    let inbound = server.addrs.inbound.unwrap();
    let admin = server.addrs.admin;
    let client = client_sidecar(vec![cluster("echo", &[(inbound, 1)])]).await;
    let mut c = echo_client(client.outbound_addr, "echo").await;
    let call = tokio::spawn(async move {
        c.echo(EchoRequest {
            delay_ms: 1000,
            ..Default::default()
        })
        .await
    });
    eventually(
        "the slow call reached the app",
        Duration::from_secs(5),
        || async { stats.calls.load(Ordering::Relaxed) == 1 },
    )
    .await;
    // Returns once the sidecar has finished draining (its admin port closes).
    meshwire_examples::probe::drain_sidecar(&admin.to_string(), Duration::from_secs(20))
        .await
        .expect("drained");
    let reply = call
        .await
        .unwrap()
        .expect("the in-flight call completes during the drain");
    assert_eq!(reply.into_inner().server, "drain-hook-backend");
    assert_eq!(stats.cancelled.load(Ordering::Relaxed), 0);
    let code = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "clean drain exits 0:\n{}", server.log());
    assert!(server.log().contains("drain requested"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_shutdown() {
    let backend = echo("stuck-backend").await;
    let stats = backend.stats.clone();
    let mut server = SidecarProcess::spawn(
        &[
            "--app",
            &backend.addr.to_string(),
            "--drain-timeout",
            "300ms",
        ],
        &[],
    )
    .await;
    let client = client_sidecar(vec![cluster("echo", &[(server.addrs.inbound.unwrap(), 1)])]).await;
    let mut c = echo_client(client.outbound_addr, "echo").await;
    let call = tokio::spawn(async move {
        c.echo(EchoRequest {
            delay_ms: 60_000,
            ..Default::default()
        })
        .await
    });
    eventually(
        "the call reached the app",
        Duration::from_secs(5),
        || async { stats.calls.load(Ordering::Relaxed) == 1 },
    )
    .await;
    let started = std::time::Instant::now();
    server.signal("INT");
    let code = server.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(3), "drain cut short: exit 3\n{}", server.log());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}
