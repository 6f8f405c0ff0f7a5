//! Mutual TLS on the sidecar-to-sidecar hop, the peer identity check and
//! inbound authorization, with real sidecars on loopback and certificates
//! from a CA made at run time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use meshwire_examples::echo::EchoHandle;
use meshwire_mesh::policy::{Action, Policy, Rule};
use meshwire_mesh::{Cluster, Endpoint};
use meshwire_proto::example::v1::EchoRequest;
use meshwire_sidecar::identity::MeshTls;
use meshwire_sidecar::{IdentitySource, Sidecar, SidecarConfig};
use meshwire_tests::*;
use meshwire_tls::Credentials;
use meshwire_tls::testing::TestCa;
use tonic::Code;

fn id(service: &str) -> String {
    format!("spiffe://test.local/ns/default/sa/{service}")
}

fn identity_of(ca: &TestCa, service: &str) -> IdentitySource {
    IdentitySource::Fixed(MeshTls::fixed(ca.leaf(&id(service)), ca.bundle()).unwrap())
}

/// A sidecar for `service` in front of `app`, with `local` as its own
/// cluster (policy, permissive).
async fn server(ca: &TestCa, service: &str, app: SocketAddr, local: Option<Cluster>) -> Sidecar {
    init_tracing();
    let mut cfg = SidecarConfig::local();
    cfg.app = Some(app);
    cfg.inbound = Some(localhost());
    cfg.identity = Some(identity_of(ca, service));
    cfg.service = Some(service.to_owned());
    cfg.clusters = local.into_iter().collect();
    Sidecar::start(cfg).await.unwrap()
}

/// A client sidecar of `service` knowing one cluster `target` at `inbound`,
/// which must present `expect`.
async fn client(
    identity: Option<IdentitySource>,
    target: &str,
    inbound: SocketAddr,
    expect: Option<&str>,
) -> Sidecar {
    init_tracing();
    let mut cfg = SidecarConfig::local();
    let mut ep = Endpoint::new(inbound);
    ep.identity = expect.map(str::to_owned);
    let mut c = Cluster::new(target);
    c.endpoints = vec![ep];
    cfg.clusters = vec![c];
    cfg.identity = identity;
    Sidecar::start(cfg).await.unwrap()
}

fn calls(app: &EchoHandle) -> u64 {
    app.stats.calls.load(Ordering::Relaxed)
}

/// Sends one gRPC request over TLS with `creds` (or none) and reports
/// whether it got a response.
async fn raw_tls_call(
    addr: SocketAddr,
    creds: Option<&Credentials>,
    trust: &meshwire_tls::TrustBundle,
) -> Result<u16, String> {
    let cfg = meshwire_tls::client_config(creds, trust).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(meshwire_tls::mesh_server_name(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut h2, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = grpc_request("b", "/meshwire.example.v1.Echo/Echo");
    let (resp, mut send) = h2
        .send_request(req, false)
        .map_err(|e| format!("send: {e}"))?;
    send.send_data(grpc_frame(&EchoRequest::default()), true)
        .map_err(|e| format!("send data: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .map_err(|_| "no response in 5s".to_owned())?
        .map_err(|e| format!("response: {e}"))?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_between_sidecars_are_mutual_tls() {
    let ca = TestCa::new("mesh");
    let app = echo("b-0").await;
    let b = server(&ca, "b", app.addr, None).await;
    let inbound = b.inbound_addr.unwrap();
    let a = client(Some(identity_of(&ca, "a")), "b", inbound, Some(&id("b"))).await;

    let mut c = echo_client(a.outbound_addr, "b").await;
    for _ in 0..5 {
        let r = c.echo(EchoRequest::default()).await.unwrap().into_inner();
        assert_eq!(r.server, "b-0");
    }
    assert_eq!(calls(&app), 5);

    // The same request over TLS with a certificate from the mesh CA works...
    let good = ca.leaf(&id("a"));
    assert_eq!(
        raw_tls_call(inbound, Some(&good), &ca.bundle()).await,
        Ok(200)
    );
    assert_eq!(calls(&app), 6);
    // ... but not without a client certificate,
    let r = raw_tls_call(inbound, None, &ca.bundle()).await;
    assert!(r.is_err(), "no client certificate was accepted: {r:?}");
    // nor with one from another CA (same SPIFFE ID),
    let other = TestCa::new("other");
    let r = raw_tls_call(inbound, Some(&other.leaf(&id("a"))), &ca.bundle()).await;
    assert!(
        r.is_err(),
        "a certificate from another CA was accepted: {r:?}"
    );
    // nor in plaintext HTTP/2.
    let r = raw_tcp_exchange(
        inbound,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        !r.contains("\u{0}\u{0}\u{0}\u{4}"),
        "a plaintext client got HTTP/2 SETTINGS: {r:?}"
    );
    let plain = client(None, "b", inbound, None).await;
    let mut pc = echo_client(plain.outbound_addr, "b").await;
    let e = pc.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(calls(&app), 6, "refused callers reached the app");

    // The client sidecar reports the hop as TLS, with its identity.
    let certs = admin_json(a.admin_addr, "/certs").await;
    assert_eq!(certs["spiffe_id"], id("a"));
    assert_eq!(
        certs["trust_bundle"]["fingerprints"][0],
        meshwire_tls::fingerprint(ca.root())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_identity_is_refused() {
    let ca = TestCa::new("mesh");
    let app = echo("b-0").await;
    // The endpoint presents b's certificate, but the control plane said c.
    let b = server(&ca, "b", app.addr, None).await;
    let a = client(
        Some(identity_of(&ca, "a")),
        "c",
        b.inbound_addr.unwrap(),
        Some(&id("c")),
    )
    .await;
    let mut c = echo_client(a.outbound_addr, "c").await;
    let e = c.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(&id("b")) && e.message().contains(&id("c")),
        "{}",
        e.message()
    );
    assert_eq!(calls(&app), 0, "a call reached an impostor");
}

fn rule(action: Action, sources: &[&str], methods: &[&str], cidrs: &[&str]) -> Rule {
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
    Rule {
        action: Some(action),
        sources: v(sources),
        methods: v(methods),
        cidrs: v(cidrs),
    }
}

fn with_policy(name: &str, p: Option<Policy>, permissive: bool) -> Cluster {
    let mut c = Cluster::new(name);
    c.policy = p;
    c.permissive = permissive;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_allow_and_deny_as_written() {
    let ca = TestCa::new("mesh");
    let app = echo("b-0").await;
    let policy = Policy {
        default_action: Action::Deny,
        rules: vec![
            // a: every method of the Echo service but one.
            rule(
                Action::Allow,
                &[&id("a")],
                &["meshwire.example.v1.Echo/*"],
                &[],
            ),
            rule(
                Action::Deny,
                &[&id("a")],
                &["meshwire.example.v1.Echo/ClientStream"],
                &[],
            ),
            // c: only from 10.0.0.0/8 (the test calls from 127.0.0.1).
            rule(Action::Allow, &[&id("c")], &[], &["10.0.0.0/8"]),
            // anything in the "ops-" prefix from loopback.
            rule(
                Action::Allow,
                &["spiffe://test.local/ns/default/sa/ops-*"],
                &[],
                &["127.0.0.0/8"],
            ),
        ],
    };
    let b = server(
        &ca,
        "b",
        app.addr,
        Some(with_policy("b", Some(policy), false)),
    )
    .await;
    let inbound = b.inbound_addr.unwrap();
    let caller = |svc: &str| {
        let ident = identity_of(&ca, svc);
        async move { client(Some(ident), "b", inbound, Some(&id("b"))).await }
    };
    let a = caller("a").await;
    let c = caller("c").await;
    let ops = caller("ops-1").await;
    let d = caller("d").await;

    let mut ca_ = echo_client(a.outbound_addr, "b").await;
    ca_.echo(EchoRequest::default()).await.unwrap();
    let denied = ca_
        .client_stream(tokio_stream::iter(vec![EchoRequest::default()]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(&id("a")), "{}", denied.message());
    let before = calls(&app);

    let e = echo_client(c.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "CIDR rule: {e:?}");
    echo_client(ops.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap();
    let e = echo_client(d.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "default deny: {e:?}");
    assert_eq!(
        calls(&app),
        before + 1,
        "only the allowed call reached the app"
    );

    // A new policy applies to the next call, on the same connections.
    b.apply(&[with_policy(
        "b",
        Some(Policy {
            default_action: Action::Allow,
            rules: vec![rule(Action::Deny, &[&id("ops-1")], &[], &[])],
        }),
        false,
    )])
    .unwrap();
    echo_client(d.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap();
    let e = echo_client(ops.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_unless_the_service_is_permissive() {
    let ca = TestCa::new("mesh");
    let app = echo("b-0").await;
    let b = server(&ca, "b", app.addr, Some(with_policy("b", None, false))).await;
    let inbound = b.inbound_addr.unwrap();
    let plain = client(None, "b", inbound, None).await;
    let mtls = client(Some(identity_of(&ca, "a")), "b", inbound, Some(&id("b"))).await;
    let mut pc = echo_client(plain.outbound_addr, "b").await;
    let mut mc = echo_client(mtls.outbound_addr, "b").await;
    assert_eq!(
        pc.echo(EchoRequest::default()).await.unwrap_err().code(),
        Code::Unavailable
    );
    mc.echo(EchoRequest::default()).await.unwrap();

    b.apply(&[with_policy("b", None, true)]).unwrap();
    // The plaintext sidecar backs off after its failed connects; wait it out.
    eventually("plaintext accepted", Duration::from_secs(15), || {
        let mut pc = pc.clone();
        async move { pc.echo(EchoRequest::default()).await.is_ok() }
    })
    .await;
    mc.echo(EchoRequest::default()).await.unwrap();

    // Permissive off again: new plaintext connections are refused.
    b.apply(&[with_policy("b", None, false)]).unwrap();
    let plain2 = client(None, "b", inbound, None).await;
    let e = echo_client(plain2.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    mc.echo(EchoRequest::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_made_during_start_up_wait_for_the_first_config() {
    let app = echo("b-0").await;
    let listener = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let cp = listener.local_addr().unwrap();
    let mut cfg = SidecarConfig::local();
    cfg.control_plane = Some(meshwire_sidecar::ControlPlaneConfig {
        server: format!("http://{cp}"),
        service: "caller".into(),
        node_id: "caller-1".into(),
    });
    let sc = Sidecar::start(cfg).await.unwrap();
    let mut c = echo_client(sc.outbound_addr, "echo").await;
    // The call starts before the sidecar has any config...
    let call = tokio::spawn(async move { c.echo(EchoRequest::default()).await });
    eventually("the call is waiting", Duration::from_secs(5), || async {
        sc.waiting_at_start() == 1
    })
    .await;
    // ... and succeeds once the config arrives.
    let _ads = Ads::serve(
        listener,
        meshwire_xds::Snapshot::new(1, [cluster("echo", &[(app.addr, 1)])]),
    );
    let r = call.await.unwrap().unwrap().into_inner();
    assert_eq!(r.server, "b-0");
    assert_eq!(sc.waiting_at_start(), 0);
}

/// On a permissive service a plaintext caller has no identity to match
/// against a deny naming sources: it is denied too (fail closed), so turning
/// TLS off on the caller's side is no way around the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_caller_cannot_slip_past_a_deny_on_a_permissive_service() {
    let ca = TestCa::new("mesh");
    let app = echo("b-0").await;
    let policy = Policy {
        default_action: Action::Allow,
        rules: vec![rule(Action::Deny, &[&id("batch")], &[], &[])],
    };
    let b = server(
        &ca,
        "b",
        app.addr,
        Some(with_policy("b", Some(policy), true)),
    )
    .await;
    let inbound = b.inbound_addr.unwrap();
    let batch = client(
        Some(identity_of(&ca, "batch")),
        "b",
        inbound,
        Some(&id("b")),
    )
    .await;
    let web = client(Some(identity_of(&ca, "web")), "b", inbound, Some(&id("b"))).await;
    let plain = client(None, "b", inbound, None).await;
    echo_client(web.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap();
    let before = calls(&app);
    for (who, sc) in [("batch", &batch), ("plaintext", &plain)] {
        let e = echo_client(sc.outbound_addr, "b")
            .await
            .echo(EchoRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
    }
    assert_eq!(calls(&app), before, "no denied call reached the app");
}

/// A certificate chained to the mesh's root but without a SPIFFE ID, or with
/// one from another trust domain, is no mesh workload: the inbound refuses
/// the connection after the handshake, and the app sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_without_a_spiffe_id_or_from_another_trust_domain_are_refused() {
    let ca = TestCa::new("mesh");
    let app = echo("b-0").await;
    let b = server(&ca, "b", app.addr, Some(with_policy("b", None, false))).await;
    let inbound = b.inbound_addr.unwrap();
    assert_eq!(
        raw_tls_call(inbound, Some(&ca.leaf(&id("a"))), &ca.bundle()).await,
        Ok(200)
    );
    let before = calls(&app);
    for leaf in [
        "spiffe://other.example/ns/default/sa/a",
        "https://workload.example/a",
    ] {
        let got = raw_tls_call(inbound, Some(&ca.leaf(leaf)), &ca.bundle()).await;
        assert!(got.is_err(), "{leaf}: {got:?}");
    }
    assert_eq!(calls(&app), before, "no refused caller reached the app");
}

/// An HTTP/1.1 request to the inbound (sidecar-to-sidecar, HTTP/2 only),
/// sent as-is over `io`; what came back until the peer closed or 3 s passed.
async fn http1_on<S>(mut io: S) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = b"POST /meshwire.example.v1.Echo/Echo HTTP/1.1\r\nhost: b\r\n\
        content-type: application/grpc\r\nte: trailers\r\ncontent-length: 5\r\n\r\n\0\0\0\0\0";
    if io.write_all(req).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The sidecar-to-sidecar listener is HTTP/2 only: HTTP/1.1 gets no answer,
/// neither in plaintext (a permissive service) nor over mutual TLS without
/// ALPN, and never reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_answers_http1_with_nothing() {
    let ca = TestCa::new("mesh");
    let app = echo("b-0").await;
    let b = server(&ca, "b", app.addr, Some(with_policy("b", None, true))).await;
    let inbound = b.inbound_addr.unwrap();
    // The same request as HTTP/2 works (plaintext, permissive).
    let plain = client(None, "b", inbound, None).await;
    echo_client(plain.outbound_addr, "b")
        .await
        .echo(EchoRequest::default())
        .await
        .unwrap();
    let before = calls(&app);

    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let got = http1_on(tcp).await;
    assert!(
        !got.starts_with("HTTP/1"),
        "plaintext HTTP/1.1 was served: {got:?}"
    );

    let mut cfg =
        (*meshwire_tls::client_config(Some(&ca.leaf(&id("a"))), &ca.bundle()).unwrap()).clone();
    cfg.alpn_protocols.clear();
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(meshwire_tls::mesh_server_name(), tcp)
        .await
        .expect("handshake without ALPN");
    let got = http1_on(tls).await;
    assert!(
        !got.starts_with("HTTP/1"),
        "HTTP/1.1 over mTLS was served: {got:?}"
    );
    assert_eq!(calls(&app), before, "no HTTP/1.1 request reached the app");
}

/// gRPC over HTTP/1.1 from an app that sent `te: trailers` (a gRPC-over-
/// HTTP/1.1 bridge): the status arrives in the chunked trailers, declared in
/// the head as HTTP/1.1 requires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_callers_get_grpc_trailers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::new(1).await;
    let mut tcp = tokio::net::TcpStream::connect(mesh.client.outbound_addr)
        .await
        .unwrap();
    tcp.write_all(
        b"POST /meshwire.example.v1.Echo/Echo HTTP/1.1\r\nhost: echo\r\n\
        content-type: application/grpc\r\nte: trailers\r\ncontent-length: 5\r\n\r\n\0\0\0\0\0",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let done = |b: &[u8]| {
        let t = String::from_utf8_lossy(b);
        t.contains("\r\n0\r\n") && t.ends_with("\r\n\r\n")
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !done(&out) {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text:?}");
    assert!(text.contains("\r\ntrailer: grpc-status"), "{text:?}");
    let trailers = text.rsplit("\r\n0\r\n").next().unwrap_or("");
    assert!(
        trailers.contains("grpc-status: 0"),
        "no status in the trailers: {text:?}"
    );
}
