//! Hostile and broken input against real processes (issue 17): descriptor
//! exhaustion (`prlimit` on the running process), silent and slow
//! connections, input the sidecars would reject. Connection counts are
//! bounded; every wait is on a condition with a limit, except the
//! observation windows that check something does *not* happen (named so).

use std::process::Command;
use std::time::Duration;

use std::net::SocketAddr;

use meshwire_proto::admin::v1 as pb;
use meshwire_tests::{
    ControlPlaneProcess, EchoRequest, SidecarProcess, api, config_dump_until, echo, echo_client,
    eventually, http1_get,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// === harness ===

/// Sets the soft and hard descriptor limit of a running process.
fn set_nofile(pid: u32, limit: usize) {
    let ok = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("run prlimit")
        .success();
    assert!(ok, "prlimit --pid {pid} failed");
}

/// How many descriptors a process has open.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// User + system CPU time of a process, in clock ticks (`/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Sends one HTTP/1.1 GET on an open connection and reads the answer
/// (bounded by `limit`).
async fn http_get_on(mut tcp: TcpStream, path: &str, limit: Duration) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn data_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// The last lines of a log, for a failure message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// === defect 1: accept loops back off ===

/// Out of descriptors, the control plane's accept loops (plaintext gRPC,
/// admin HTTP) wait instead of spinning: little CPU and a few log lines
/// while it lasts, and every port serves again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_accept_loops_back_off_when_out_of_descriptors() {
    let data = data_dir();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let pid = cp.id();
    let open = fd_count(pid);
    let limit = open + 40;
    set_nofile(pid, limit);

    // More connections to the plaintext port than it has descriptors left.
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(TcpStream::connect(cp.addr).await.expect("connect"));
    }
    eventually(
        "the control plane to run out of descriptors",
        Duration::from_secs(10),
        || {
            let n = fd_count(pid);
            async move { n >= limit }
        },
    )
    .await;
    // A probe waits in the admin port's backlog meanwhile.
    let probe = TcpStream::connect(cp.admin).await.expect("connect admin");
    eventually(
        "the accept error to be logged",
        Duration::from_secs(10),
        || {
            let log = cp.log();
            async move { log.contains("accept failed") }
        },
    )
    .await;

    // Observation window: the shortage lasts 3 s; a spinning loop would
    // burn a core and log a line per try.
    let (cpu0, log0) = (cpu_ticks(pid), count(&cp.log(), "accept failed"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu1, log1) = (cpu_ticks(pid), count(&cp.log(), "accept failed"));
    let used = cpu1 - cpu0;
    let window = 3 * clock_ticks_per_second();
    assert!(
        used * 4 < window,
        "{used} of {window} clock ticks of CPU while out of descriptors"
    );
    assert!(
        log1 - log0 <= 4,
        "{} 'accept failed' lines in 3 s:\n{}",
        log1 - log0,
        tail(&cp.log())
    );

    // Descriptors free again: the waiting probe is answered, the API serves.
    drop(held);
    let answer = http_get_on(probe, "/live", Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let mut api = cp.client().await;
    api.list_services(meshwire_proto::admin::v1::ListServicesRequest {})
        .await
        .expect("the admin API serves again");
    assert!(
        cp.log().contains("accepting connections again"),
        "{}",
        cp.log()
    );
}

// === defects 3 and 2: one validation, and per-resource acceptance ===

/// The admin API refuses an endpoint every sidecar would refuse (its
/// identity is not a SPIFFE ID), naming the field; nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_an_identity_sidecars_would_reject() {
    let data = data_dir();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut admin = cp.client().await;
    let version = api::create_service(&mut admin, "echo").await;
    let err = admin
        .add_endpoint(pb::AddEndpointRequest {
            service: "echo".into(),
            endpoint: Some(pb::Endpoint {
                address: "10.0.0.1:80".into(),
                identity: Some("not-spiffe".into()),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .starts_with("endpoint.identity: \"not-spiffe\" is not a SPIFFE ID"),
        "{err:?}"
    );
    let list = admin
        .list_endpoints(pb::ListEndpointsRequest {
            service: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((list.version, list.endpoints.len()), (version, 0));
}

/// A service with more endpoints than one sidecar accepts: that sidecar,
/// started afterwards, still becomes ready and serves the other services,
/// and their later changes reach it; the refused one is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_one_sidecar_refuses_blocks_neither_its_start_nor_other_services() {
    let data = data_dir();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut admin = cp.client().await;
    let (b1, b2) = (echo("b1").await, echo("b2").await);
    api::create_service(&mut admin, "echo").await;
    api::add_endpoint(&mut admin, "echo", b1.addr, 1).await;
    api::create_service(&mut admin, "big").await;
    for port in 1..=3 {
        api::add_endpoint(
            &mut admin,
            "big",
            SocketAddr::from(([10, 0, 0, 1], port)),
            1,
        )
        .await;
    }

    let url = cp.url();
    let sc = SidecarProcess::spawn(
        &[
            "--control-plane",
            &url,
            "--service",
            "caller",
            "--max-endpoints",
            "2",
        ],
        &[],
    )
    .await;
    eventually(
        "the new sidecar to be ready",
        Duration::from_secs(15),
        || async {
            http1_get(sc.addrs.admin, "a", "/ready")
                .await
                .is_ok_and(|r| r.0 == 200)
        },
    )
    .await;
    let dump = config_dump_until(
        sc.addrs.admin,
        "big refused",
        Duration::from_secs(10),
        |v| v["source"]["rejected"]["big"].is_string(),
    )
    .await;
    let why = dump["source"]["rejected"]["big"].as_str().unwrap();
    assert!(why.contains("at most 2"), "{why}");
    assert!(
        dump["source"]["last_nack"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"big\"")),
        "{dump}"
    );
    let mut client = echo_client(sc.addrs.outbound, "echo").await;
    let reply = client
        .echo(EchoRequest::default())
        .await
        .expect("echo serves");
    assert_eq!(reply.into_inner().server, "b1");

    // A later change to echo reaches this sidecar while big is still refused.
    api::add_endpoint(&mut admin, "echo", b2.addr, 1).await;
    eventually("calls to reach b2", Duration::from_secs(15), || {
        let mut client = client.clone();
        async move {
            client
                .echo(EchoRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().server == "b2")
        }
    })
    .await;
}

// === defect 4: silent connections cannot hold the TLS port ===

/// Silent TCP connections from one host (256, as many as the TLS port
/// handshakes at once) leave the TLS port usable for everyone else: the
/// admin API over TLS and certificate issuance answer within 3 s each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_one_host_leave_the_tls_port_usable() {
    use meshwire_control_plane::ca::{CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE};
    use meshwire_control_plane::{ControlPlane, ControlPlaneConfig};
    use meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient;
    use meshwire_proto::identity::v1 as ipb;
    use meshwire_proto::identity::v1::identity_client::IdentityClient;

    let data = data_dir();
    let cp = ControlPlane::start(ControlPlaneConfig::local(data.path()))
        .await
        .expect("control plane starts");
    let tls_addr = cp.tls_addr.expect("TLS port");
    let expect = cp
        .ca
        .spiffe_id(CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE)
        .unwrap();
    let bundle = cp.ca.bundle().bundle.clone();
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", cp.admin_token).parse().unwrap();

    // The silent host: another loopback address.
    let mut silent = Vec::new();
    for _ in 0..256 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
        silent.push(sock.connect(tls_addr).await.expect("connect"));
    }

    for round in 0..5 {
        let connector =
            meshwire_control_plane::tls::connector(&bundle, None, Some(&expect)).unwrap();
        let channel = tokio::time::timeout(
            Duration::from_secs(3),
            tonic::transport::Endpoint::from_shared(format!("https://{tls_addr}"))
                .unwrap()
                .connect_with_connector(connector),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: no TLS connection within 3 s"))
        .expect("TLS connect");
        let b = bearer.clone();
        let mut admin =
            MeshAdminClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", b.clone());
                Ok(r)
            });
        if round == 0 {
            admin
                .create_service(pb::CreateServiceRequest {
                    service: Some(pb::Service {
                        name: "echo".into(),
                        ..Default::default()
                    }),
                })
                .await
                .expect("create over TLS");
        }
        let token = admin
            .create_join_token(pb::CreateJoinTokenRequest {
                service: "echo".into(),
                ..Default::default()
            })
            .await
            .expect("token over TLS")
            .into_inner();
        let (_key, csr) = meshwire_tls::new_key_and_csr().unwrap();
        let cert = IdentityClient::new(channel)
            .issue(ipb::IssueRequest {
                join_token: token.token,
                csr_pem: csr,
            })
            .await
            .expect("issuance while the silent host holds connections")
            .into_inner();
        assert_eq!(cert.spiffe_id, token.spiffe_id);
    }
    drop(silent);
    cp.stop().await.unwrap();
}
