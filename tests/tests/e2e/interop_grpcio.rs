//! gRPC's official interop test cases (`grpc.testing.TestService`) through a
//! sidecar pair, with a third-party gRPC stack (grpcio, from PyPI) on one or
//! both ends:
//!
//! - grpcio client → sidecars → tonic server (`meshwire_examples::interop`);
//! - grpcio client → sidecars → grpcio server;
//! - tonic client → sidecars → grpcio server (the cases written out in Rust).
//!
//! The same pairs without sidecars are run as baselines, so that a failure
//! through the mesh can be told apart from a disagreement between the stacks.
//!
//! The Python side is `tests/interop/interop.py`; it needs grpcio and
//! grpcio-tools (`./scripts/setup-test-deps.sh` installs them into
//! `<repo>/.venv`). The interpreter is `$MESHWIRE_PYTHON`, else
//! `<repo>/.venv/bin/python` if it exists, else `python3`.

#![allow(clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use meshwire_examples::echo::MAX_MESSAGE;
use meshwire_examples::interop::{self, ECHO_INITIAL, ECHO_TRAILING, InteropHandle};
use meshwire_proto::grpc_testing::test_service_client::TestServiceClient;
use meshwire_proto::grpc_testing::unimplemented_service_client::UnimplementedServiceClient;
use meshwire_proto::grpc_testing::{
    EchoStatus, Empty, Payload, PayloadType, ResponseParameters, SimpleRequest,
    StreamingInputCallRequest, StreamingOutputCallRequest, StreamingOutputCallResponse,
};
use meshwire_sidecar::Sidecar;
use meshwire_tests::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{BinaryMetadataValue, MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Every client test case `interop.py client` runs.
const ALL_CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "custom_metadata",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "unimplemented_service",
];

/// The service name the client sidecar knows the interop server by.
const SERVICE: &str = "interop";

const INITIAL_VALUE: &str = "test_initial_metadata_value";
const TRAILING_VALUE: &[u8] = &[0xab, 0xab, 0xab];
const SPECIAL_MESSAGE: &str =
    "\t\ntest with whitespace\r\nand Unicode BMP \u{263a} and non-BMP \u{1f608}\t\n";

// === the Python side ===

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repo")
        .to_path_buf()
}

fn script() -> PathBuf {
    repo().join("tests/interop/interop.py")
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHWIRE_PYTHON") {
        return p.into();
    }
    let venv = repo().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// The Python interpreter, after checking it has grpcio and grpcio-tools.
async fn grpcio_python() -> PathBuf {
    let py = python();
    let check = py.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(check)
            .args(["-c", "import grpc, grpc_tools"])
            .stdin(Stdio::null())
            .output()
    })
    .await
    .expect("python check");
    let problem = match out {
        Ok(o) if o.status.success() => return py,
        Ok(o) => format!(
            "`import grpc, grpc_tools` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("cannot run it: {e}"),
    };
    panic!(
        "the grpcio interop tests need grpcio and grpcio-tools in Python {}: {problem}\n\
         Run ./scripts/setup-test-deps.sh (it installs them into <repo>/.venv), \
         or point MESHWIRE_PYTHON at an interpreter that has them.",
        py.display()
    );
}

/// A child process, killed (and reaped) on drop.
#[derive(Debug)]
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let log_file = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc(child)
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().expect("try_wait")
    }
}

/// A grpcio `TestService` server process; killed on drop.
#[derive(Debug)]
struct PyServer {
    addr: SocketAddr,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl PyServer {
    async fn start() -> PyServer {
        let py = grpcio_python().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let port_file = dir.path().join("port");
        let log = dir.path().join("server.log");
        let mut proc = Proc::spawn(
            Command::new(&py)
                .arg(script())
                .args(["server", "--port", "0", "--port-file"])
                .arg(&port_file),
            &log,
        );
        // Start-up includes generating the stubs with grpc_tools.protoc.
        let limit = Duration::from_secs(60);
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let port = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.trim().parse::<u16>().ok());
            if let Some(port) = port {
                return PyServer {
                    addr: ([127, 0, 0, 1], port).into(),
                    _proc: proc,
                    _dir: dir,
                };
            }
            let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = proc.exited() {
                panic!(
                    "grpcio server exited with {status} before serving:\n{}",
                    read_log()
                );
            }
            assert!(
                start.elapsed() < limit,
                "grpcio server did not write {} within {limit:?}:\n{}",
                port_file.display(),
                read_log()
            );
        }
    }
}

/// Runs `interop.py client` against `target` and fails the test, showing
/// its report, unless every case in `cases` passed.
async fn grpcio_client(target: SocketAddr, authority: &str, cases: &[&str]) {
    let py = grpcio_python().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("client.log");
    let mut proc = Proc::spawn(
        Command::new(&py)
            .arg(script())
            .args(["client", "--target", &target.to_string()])
            .args(["--authority", authority, "--cases", &cases.join(",")]),
        &log,
    );
    let limit = Duration::from_secs(180);
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let status = loop {
        tick.tick().await;
        if let Some(status) = proc.exited() {
            break status;
        }
        assert!(
            start.elapsed() < limit,
            "grpcio client still running after {limit:?}:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    let report = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("grpcio client -> {target} (:authority {authority}):\n{report}");
    assert!(
        status.success(),
        "grpcio interop client failed ({status}) against {target} (:authority {authority}):\n{report}"
    );
    for case in cases {
        let pass = format!("PASS {case} ");
        assert!(
            report.lines().any(|l| l.starts_with(&pass)),
            "case {case} did not report PASS:\n{report}"
        );
    }
}

// === the mesh ===

/// A server sidecar in front of `app` and a client sidecar that knows it as
/// [`SERVICE`]: callers send to `client.outbound_addr`.
struct Pair {
    client: Sidecar,
    server: Sidecar,
}

async fn sidecars(app: SocketAddr) -> Pair {
    let server = server_sidecar(app).await;
    let inbound = server.inbound_addr.expect("server sidecar has inbound");
    let client = client_sidecar(vec![cluster(SERVICE, &[(inbound, 1)])]).await;
    Pair { client, server }
}

async fn tonic_server() -> InteropHandle {
    interop::serve(TcpListener::bind(localhost()).await.expect("bind"))
}

// === grpcio client ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_through_sidecars_to_tonic_server() {
    let app = tonic_server().await;
    let mesh = sidecars(app.addr).await;
    grpcio_client(mesh.client.outbound_addr, SERVICE, ALL_CASES).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_client_through_sidecars_to_grpcio_server() {
    let app = PyServer::start().await;
    let mesh = sidecars(app.addr).await;
    grpcio_client(mesh.client.outbound_addr, SERVICE, ALL_CASES).await;
}

/// Baseline: the two stacks agree without the mesh in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_grpcio_client_direct_to_tonic_server() {
    let app = tonic_server().await;
    grpcio_client(app.addr, SERVICE, ALL_CASES).await;
    app.stop().await;
}

// === tonic client ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_client_through_sidecars_to_grpcio_server() {
    let app = PyServer::start().await;
    let mesh = sidecars(app.addr).await;
    tonic_cases(mesh.client.outbound_addr, Some(&mesh)).await;
}

/// Baseline: the Rust cases against grpcio without the mesh in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_tonic_client_direct_to_grpcio_server() {
    let app = PyServer::start().await;
    tonic_cases(app.addr, None).await;
}

/// The Rust client cases against `target` (a client sidecar's outbound port
/// when `mesh` is the pair in between, else the grpcio server itself).
async fn tonic_cases(target: SocketAddr, mesh: Option<&Pair>) {
    let ch = channel(target, SERVICE).await;
    let mut client = TestServiceClient::new(ch.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let c = &mut client;
    bounded("empty_unary", empty_unary(c)).await;
    bounded("large_unary", large_unary(c)).await;
    bounded("client_streaming", client_streaming(c)).await;
    bounded("server_streaming", server_streaming(c)).await;
    bounded("ping_pong", ping_pong(c)).await;
    bounded(
        "timeout_on_sleeping_server",
        timeout_on_sleeping_server(target, mesh),
    )
    .await;
    bounded("cancel_after_begin", cancel_after_begin(target, mesh)).await;
    bounded(
        "cancel_after_first_response",
        cancel_after_first_response(target, mesh),
    )
    .await;
    // The cancelled calls left the connection usable.
    bounded("empty_unary", empty_unary(c)).await;
    bounded("custom_metadata", custom_metadata(c)).await;
    bounded("status_code_and_message", status_code_and_message(c)).await;
    bounded("special_status_message", special_status_message(c)).await;
    bounded("unimplemented", unimplemented(c, ch)).await;
}

/// Runs one case, failing it (by name) if it hangs.
async fn bounded(case: &str, f: impl std::future::Future<Output = ()>) {
    let limit = Duration::from_secs(30);
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("case {case} did not finish within {limit:?}"));
}

type Client = TestServiceClient<Channel>;

fn zeros(size: i32) -> Option<Payload> {
    Some(Payload {
        r#type: PayloadType::Compressable as i32,
        body: vec![0; usize::try_from(size).expect("size")],
    })
}

fn assert_zeros(what: &str, payload: Option<&Payload>, size: usize) {
    let body = &payload.unwrap_or_else(|| panic!("{what}: no payload")).body;
    assert_eq!(body.len(), size, "{what}: payload size");
    assert!(body.iter().all(|&b| b == 0), "{what}: payload not zeros");
}

fn output_request(sizes: &[i32], request_size: i32) -> StreamingOutputCallRequest {
    StreamingOutputCallRequest {
        response_type: PayloadType::Compressable as i32,
        response_parameters: sizes
            .iter()
            .map(|&size| ResponseParameters {
                size,
                ..Default::default()
            })
            .collect(),
        payload: zeros(request_size),
        ..Default::default()
    }
}

fn large_request() -> SimpleRequest {
    SimpleRequest {
        response_type: PayloadType::Compressable as i32,
        response_size: 314_159,
        payload: zeros(271_828),
        ..Default::default()
    }
}

fn with_echo_metadata<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(ECHO_INITIAL, MetadataValue::from_static(INITIAL_VALUE));
    req.metadata_mut().insert_bin(
        ECHO_TRAILING,
        BinaryMetadataValue::from_bytes(TRAILING_VALUE),
    );
    req
}

async fn empty_unary(client: &mut Client) {
    let resp = client.empty_call(Empty {}).await.expect("empty_unary");
    assert_eq!(resp.into_inner(), Empty {});
}

async fn large_unary(client: &mut Client) {
    let resp = client
        .unary_call(large_request())
        .await
        .expect("large_unary")
        .into_inner();
    assert_zeros("large_unary", resp.payload.as_ref(), 314_159);
}

async fn client_streaming(client: &mut Client) {
    let reqs = [27_182, 8, 1_828, 45_904].map(|size| StreamingInputCallRequest {
        payload: zeros(size),
        ..Default::default()
    });
    let resp = client
        .streaming_input_call(tokio_stream::iter(reqs))
        .await
        .expect("client_streaming")
        .into_inner();
    assert_eq!(resp.aggregated_payload_size, 74_922, "client_streaming");
}

async fn server_streaming(client: &mut Client) {
    let sizes = [31_415, 9, 2_653, 58_979];
    let mut req = output_request(&sizes, 0);
    // Spaced out, so each reply crosses the mesh on its own.
    for p in &mut req.response_parameters {
        p.interval_us = 2_000;
    }
    let mut stream = client
        .streaming_output_call(req)
        .await
        .expect("server_streaming")
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.next().await {
        got.push(m.expect("server_streaming message"));
    }
    assert_eq!(got.len(), sizes.len(), "server_streaming: replies");
    for (m, size) in got.iter().zip(sizes) {
        assert_zeros("server_streaming", m.payload.as_ref(), size as usize);
    }
}

async fn ping_pong(client: &mut Client) {
    let pings = [(31_415, 27_182), (9, 8), (2_653, 1_828), (58_979, 45_904)];
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // The first ping goes before the call: a server may hold its response
    // headers until it has something to answer (grpcio does), and tonic
    // returns the call only once the headers are in.
    let (size, request_size) = pings[0];
    tx.send(output_request(&[size], request_size))
        .await
        .expect("send ping");
    let mut replies = client
        .full_duplex_call(ReceiverStream::new(rx))
        .await
        .expect("ping_pong")
        .into_inner();
    for (i, (size, request_size)) in pings.into_iter().enumerate() {
        if i > 0 {
            tx.send(output_request(&[size], request_size))
                .await
                .expect("send ping");
        }
        let r: StreamingOutputCallResponse = replies
            .next()
            .await
            .expect("a pong per ping")
            .expect("pong");
        assert_zeros("ping_pong", r.payload.as_ref(), size as usize);
    }
    drop(tx);
    assert!(replies.next().await.is_none(), "ping_pong: extra replies");
}

/// Calls in flight for the interop service in the client sidecar (to the
/// server sidecar) and in the server sidecar (to the app).
async fn outstanding(mesh: &Pair) -> (u64, u64) {
    let inbound = mesh.server.inbound_addr.expect("inbound");
    let client = endpoint_stats(mesh.client.admin_addr, SERVICE, inbound).await;
    let app = admin_json(mesh.server.admin_addr, "/clusters").await["app"].clone();
    let n = |v: &serde_json::Value| {
        v["outstanding"]
            .as_u64()
            .unwrap_or_else(|| panic!("no outstanding count: {v}"))
    };
    (n(&client), n(&app))
}

/// Through the mesh: waits until both sidecars have `want` calls in flight.
async fn wait_outstanding(case: &str, mesh: Option<&Pair>, want: u64) {
    if let Some(mesh) = mesh {
        eventually(
            &format!("{case}: {want} call(s) in flight in both sidecars"),
            Duration::from_secs(10),
            || async { outstanding(mesh).await == (want, want) },
        )
        .await;
    }
}

async fn timeout_on_sleeping_server(target: SocketAddr, mesh: Option<&Pair>) {
    let mut h2 = h2_client(target).await;
    let mut req = grpc_request(SERVICE, "/grpc.testing.TestService/FullDuplexCall");
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("1m"));
    let (resp, mut body) = h2.send_request(req, false).expect("open stream");
    // The request stream stays open and asks for no replies: only the 1 ms
    // deadline can end the call. (The deadline may already have ended the
    // stream, so a failed send is no failure.)
    let _ = body.send_data(
        grpc_frame(&StreamingOutputCallRequest {
            payload: zeros(27_182),
            ..Default::default()
        }),
        false,
    );
    let resp = resp.await.expect("timeout_on_sleeping_server: response");
    let status = match resp.headers().get("grpc-status") {
        // Trailers-only.
        Some(s) => s.clone(),
        None => {
            let mut replies = resp.into_body();
            while let Some(chunk) = replies.data().await {
                let chunk = chunk.expect("response data");
                assert!(
                    chunk.is_empty(),
                    "timeout_on_sleeping_server: a response arrived"
                );
            }
            let trailers = replies
                .trailers()
                .await
                .expect("trailers")
                .expect("grpc trailers");
            trailers["grpc-status"].clone()
        }
    };
    assert_eq!(
        status, "4",
        "timeout_on_sleeping_server: grpc-status {status:?}, expected DEADLINE_EXCEEDED"
    );
    // The expired call was cancelled upstream too, not left running.
    wait_outstanding("timeout_on_sleeping_server", mesh, 0).await;
}

/// A raw HTTP/2 stream for the deadline and cancel cases: tonic's client
/// enforces a deadline itself (reporting CANCELLED, "Timeout expired", before
/// the peer's DEADLINE_EXCEEDED can arrive), and once a response has begun it
/// cannot reset a call without half-closing it first; the interop cases
/// cancel without half-closing.
fn raw_call(
    h2: &mut h2::client::SendRequest<bytes::Bytes>,
    method: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let path = format!("/grpc.testing.TestService/{method}");
    h2.send_request(grpc_request(SERVICE, &path), false)
        .expect("open stream")
}

async fn cancel_after_begin(target: SocketAddr, mesh: Option<&Pair>) {
    let mut h2 = h2_client(target).await;
    let (resp, mut body) = raw_call(&mut h2, "StreamingInputCall");
    // Through the mesh: begun means it reached the app past both sidecars.
    wait_outstanding("cancel_after_begin", mesh, 1).await;
    body.send_reset(h2::Reason::CANCEL);
    let err = resp.await.expect_err("cancel_after_begin: cancelled call");
    assert_eq!(
        err.reason(),
        Some(h2::Reason::CANCEL),
        "cancel_after_begin: {err:?}"
    );
    // The cancel crossed both sidecars: neither holds the call any more.
    wait_outstanding("cancel_after_begin", mesh, 0).await;
}

async fn cancel_after_first_response(target: SocketAddr, mesh: Option<&Pair>) {
    let mut h2 = h2_client(target).await;
    let (resp, mut body) = raw_call(&mut h2, "FullDuplexCall");
    body.send_data(grpc_frame(&output_request(&[31_415], 27_182)), false)
        .expect("send request");
    let resp = resp.await.expect("cancel_after_first_response: response");
    assert_eq!(resp.status(), http::StatusCode::OK);
    let mut replies = resp.into_body();
    let mut buf = Vec::new();
    let reply = loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() >= 5 + len {
                break <StreamingOutputCallResponse as prost::Message>::decode(&buf[5..5 + len])
                    .expect("first response");
            }
        }
        let chunk = replies
            .data()
            .await
            .expect("cancel_after_first_response: a first response")
            .expect("response data");
        let _ = replies.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    };
    assert_zeros(
        "cancel_after_first_response",
        reply.payload.as_ref(),
        31_415,
    );
    // Not half-closed: the call stays open until cancelled.
    wait_outstanding("cancel_after_first_response", mesh, 1).await;
    body.send_reset(h2::Reason::CANCEL);
    match replies.data().await {
        Some(Err(err)) => assert_eq!(
            err.reason(),
            Some(h2::Reason::CANCEL),
            "cancel_after_first_response: {err:?}"
        ),
        other => panic!("cancel_after_first_response: {other:?} after cancel, expected CANCEL"),
    }
    wait_outstanding("cancel_after_first_response", mesh, 0).await;
}

/// A `-bin` metadata value, decoded (`None` if absent or not valid base64).
fn bin_value(md: &MetadataMap, key: &str) -> Option<Vec<u8>> {
    md.get_bin(key)?.to_bytes().ok().map(|b| b.to_vec())
}

async fn custom_metadata(client: &mut Client) {
    // Unary: tonic merges the trailers into the response metadata.
    let resp = client
        .unary_call(with_echo_metadata(large_request()))
        .await
        .expect("custom_metadata unary");
    assert_eq!(
        resp.metadata().get(ECHO_INITIAL).map(|v| v.as_bytes()),
        Some(INITIAL_VALUE.as_bytes()),
        "custom_metadata unary: initial metadata in {:?}",
        resp.metadata()
    );
    assert_eq!(
        bin_value(resp.metadata(), ECHO_TRAILING),
        Some(TRAILING_VALUE.to_vec()),
        "custom_metadata unary: trailing metadata in {:?}",
        resp.metadata()
    );
    assert_zeros(
        "custom_metadata unary",
        resp.get_ref().payload.as_ref(),
        314_159,
    );

    // Full duplex: headers on the response, trailers at the end of the stream.
    let reqs = tokio_stream::iter([output_request(&[314_159], 271_828)]);
    let resp = client
        .full_duplex_call(with_echo_metadata(reqs))
        .await
        .expect("custom_metadata full duplex");
    assert_eq!(
        resp.metadata().get(ECHO_INITIAL).map(|v| v.as_bytes()),
        Some(INITIAL_VALUE.as_bytes()),
        "custom_metadata full duplex: initial metadata in {:?}",
        resp.metadata()
    );
    let mut stream = resp.into_inner();
    let r = stream
        .next()
        .await
        .expect("one reply")
        .expect("custom_metadata full duplex reply");
    assert_zeros("custom_metadata full duplex", r.payload.as_ref(), 314_159);
    assert!(stream.next().await.is_none(), "exactly one reply");
    let trailers = stream
        .trailers()
        .await
        .expect("trailers")
        .expect("some trailers");
    assert_eq!(
        bin_value(&trailers, ECHO_TRAILING),
        Some(TRAILING_VALUE.to_vec()),
        "custom_metadata full duplex: trailing metadata in {trailers:?}"
    );
}

fn echo_status(message: &str) -> Option<EchoStatus> {
    Some(EchoStatus {
        code: Code::Unknown as i32,
        message: message.into(),
    })
}

async fn unary_status(client: &mut Client, message: &str) {
    let req = SimpleRequest {
        response_status: echo_status(message),
        ..Default::default()
    };
    let err = client
        .unary_call(req)
        .await
        .expect_err("UnaryCall with response_status fails");
    assert_eq!(err.code(), Code::Unknown, "unary status: {err:?}");
    assert_eq!(err.message(), message, "unary status message: {err:?}");
}

async fn status_code_and_message(client: &mut Client) {
    let message = "test status message";
    unary_status(client, message).await;

    let req = StreamingOutputCallRequest {
        response_status: echo_status(message),
        ..Default::default()
    };
    let outcome = match client.full_duplex_call(tokio_stream::iter([req])).await {
        // The status may come as the stream's end or (trailers-only) at once.
        Ok(resp) => resp.into_inner().next().await.expect("a status").err(),
        Err(status) => Some(status),
    };
    let err = outcome.expect("FullDuplexCall with response_status fails");
    assert_eq!(err.code(), Code::Unknown, "full duplex status: {err:?}");
    assert_eq!(
        err.message(),
        message,
        "full duplex status message: {err:?}"
    );
}

async fn special_status_message(client: &mut Client) {
    unary_status(client, SPECIAL_MESSAGE).await;
}

async fn unimplemented(client: &mut Client, ch: Channel) {
    let err = client
        .unimplemented_call(Empty {})
        .await
        .expect_err("unimplemented_method");
    assert_eq!(
        err.code(),
        Code::Unimplemented,
        "unimplemented_method: {err:?}"
    );
    let err = UnimplementedServiceClient::new(ch)
        .unimplemented_call(Empty {})
        .await
        .expect_err("unimplemented_service");
    assert_eq!(
        err.code(),
        Code::Unimplemented,
        "unimplemented_service: {err:?}"
    );
}
