//! Identities from the control plane's CA, end to end: sidecars join with
//! single-use tokens, call each other over mutual TLS, renew their
//! certificates and follow a root rotation, all under continuous load with
//! zero failed calls.

use std::net::SocketAddr;
use std::time::Duration;

use meshwire_control_plane::{ControlPlane, ControlPlaneConfig, ControlPlaneHandle};
use meshwire_examples::echo::EchoHandle;
use meshwire_proto::admin::v1 as pb;
use meshwire_sidecar::identity::{Bootstrap, IdentityClientConfig};
use meshwire_sidecar::{ControlPlaneConfig as SidecarCp, IdentitySource, Sidecar, SidecarConfig};
use meshwire_tests::*;

struct Cluster {
    cp: ControlPlaneHandle,
    _dir: tempfile::TempDir,
    apps: Vec<EchoHandle>,
    servers: Vec<Sidecar>,
    client: Sidecar,
}

async fn control_plane(cert_lifetime: Duration) -> (ControlPlaneHandle, tempfile::TempDir) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControlPlaneConfig::local(dir.path());
    cfg.ca.cert_lifetime = cert_lifetime;
    let cp = ControlPlane::start(cfg).await.unwrap();
    (cp, dir)
}

/// A sidecar of `service` with an identity from the control plane's CA.
async fn sidecar(cp: &ControlPlaneHandle, service: &str, app: Option<SocketAddr>) -> Sidecar {
    let (token, _, _) = cp
        .ca
        .create_token("default", service, Duration::from_secs(60))
        .unwrap();
    let server = format!("https://{}", cp.tls_addr.expect("TLS port"));
    let mut cfg = SidecarConfig::local();
    cfg.app = app;
    cfg.inbound = app.map(|_| localhost());
    cfg.control_plane = Some(SidecarCp {
        server: server.clone(),
        service: service.to_owned(),
        node_id: format!("{service}-{}", next_id()),
    });
    cfg.identity = Some(IdentitySource::ControlPlane(IdentityClientConfig {
        server,
        join_token: token,
        bootstrap: Bootstrap::Bundle(cp.ca.bundle().bundle.clone()),
        connect_timeout: Duration::from_secs(2),
    }));
    Sidecar::start(cfg).await.unwrap()
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

async fn mesh(cert_lifetime: Duration) -> Cluster {
    let (cp, dir) = control_plane(cert_lifetime).await;
    let mut a = admin(cp.local_addr, Some(&format!("Bearer {}", cp.admin_token))).await;
    api::create_service(&mut a, "echo").await;
    api::create_service(&mut a, "caller").await;
    // The client starts first and gets calls before anything else is up:
    // they must wait for its certificate and config, not fail.
    let client = sidecar(&cp, "caller", None).await;
    let mut apps = Vec::new();
    let mut servers = Vec::new();
    for i in 0..2 {
        let app = echo(&format!("echo-{i}")).await;
        let s = sidecar(&cp, "echo", Some(app.addr)).await;
        a.add_endpoint(pb::AddEndpointRequest {
            service: "echo".into(),
            endpoint: Some(pb::Endpoint {
                address: s.inbound_addr.unwrap().to_string(),
                weight: Some(1),
                // Explicit for one; the other gets the service's default
                // identity from the control plane.
                identity: (i == 0)
                    .then(|| format!("spiffe://{}/ns/default/sa/echo", cp.ca.trust_domain())),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
        apps.push(app);
        servers.push(s);
    }
    eventually(
        "the client knows both endpoints",
        Duration::from_secs(20),
        || async {
            client
                .routes()
                .load()
                .get("echo")
                .is_some_and(|c| c.endpoints.load().entries().len() == 2)
        },
    )
    .await;
    Cluster {
        cp,
        _dir: dir,
        apps,
        servers,
        client,
    }
}

async fn certs(s: &Sidecar) -> serde_json::Value {
    admin_json(s.admin_addr, "/certs").await
}

impl Cluster {
    fn sidecars(&self) -> impl Iterator<Item = &Sidecar> {
        self.servers.iter().chain(std::iter::once(&self.client))
    }

    /// Waits until every sidecar's `/certs` satisfies `f`.
    async fn all_certs(&self, what: &str, limit: Duration, f: impl Fn(&serde_json::Value) -> bool) {
        eventually(what, limit, || async {
            let mut ok = true;
            for s in self.sidecars() {
                ok &= f(&certs(s).await);
            }
            ok
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_call() {
    let m = mesh(Duration::from_secs(60)).await;
    let client = echo_client(m.client.outbound_addr, "echo").await;
    let load = Load::start(&client, 4);
    m.all_certs(
        "every sidecar has a certificate",
        Duration::from_secs(20),
        |c| c["ready"] == true,
    )
    .await;
    let first: Vec<String> = {
        let mut v = Vec::new();
        for s in m.sidecars() {
            v.push(certs(s).await["serial"].as_str().unwrap().to_owned());
        }
        v
    };
    for c in m.sidecars() {
        let c = certs(c).await;
        let life = c["not_after"].as_u64().unwrap() - c["not_before"].as_u64().unwrap();
        // 1 minute, plus the minute the CA backdates for clock skew.
        assert!(life <= 180, "certificate lifetime {life}s");
    }
    // Three renewals each: ~40 s apart with 1-minute certificates.
    m.all_certs("three renewals everywhere", Duration::from_secs(240), |c| {
        c["renewals"].as_u64().unwrap_or(0) >= 3
    })
    .await;
    let outcome = load.finish().await;
    let (ok, failed) = &outcome;
    assert!(
        failed.is_empty(),
        "{} failed calls: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok.values().sum::<u64>() > 100, "{ok:?}");
    assert_eq!(ok.len(), 2, "both backends served: {ok:?}");
    for (s, before) in m.sidecars().zip(first) {
        let now = certs(s).await;
        assert_ne!(now["serial"].as_str().unwrap(), before, "serial unchanged");
        assert_eq!(now["renew_failures"], 0);
    }
    // New connections after the rotations use the new certificates: a
    // sidecar that joins now reaches both backends.
    let late = sidecar(&m.cp, "caller", None).await;
    let mut c = echo_client(late.outbound_addr, "echo").await;
    for _ in 0..10 {
        c.echo(meshwire_proto::example::v1::EchoRequest::default())
            .await
            .unwrap();
    }
    assert_eq!(m.apps.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_under_load_fails_no_call() {
    let m = mesh(Duration::from_secs(3600)).await;
    let client = echo_client(m.client.outbound_addr, "echo").await;
    let load = Load::start(&client, 4);
    m.all_certs(
        "every sidecar has a certificate",
        Duration::from_secs(20),
        |c| c["ready"] == true,
    )
    .await;
    let old = m.cp.ca.bundle().signing_fingerprint.clone();

    // 1. A new root, trusted everywhere before it signs anything.
    let new = m.cp.ca.add_root().unwrap();
    m.all_certs("both roots trusted", Duration::from_secs(20), |c| {
        let fps = c["trust_bundle"]["fingerprints"].as_array().unwrap();
        fps.len() == 2
    })
    .await;
    // 2. It signs: every sidecar renews early, onto the new root.
    m.cp.ca.activate(&new).unwrap();
    m.all_certs("renewed onto the new root", Duration::from_secs(30), |c| {
        c["signed_by"] == new.as_str()
    })
    .await;
    // 3. The old root leaves the bundle.
    m.cp.ca.remove_root(&old).unwrap();
    m.all_certs("old root gone", Duration::from_secs(20), |c| {
        c["trust_bundle"]["fingerprints"] == serde_json::json!([new.clone()])
    })
    .await;
    // New connections work with the new root alone.
    let late = sidecar(&m.cp, "caller", None).await;
    let mut c = echo_client(late.outbound_addr, "echo").await;
    for _ in 0..10 {
        c.echo(meshwire_proto::example::v1::EchoRequest::default())
            .await
            .unwrap();
    }
    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} failed calls: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(ok.len(), m.apps.len(), "every backend served: {ok:?}");
}

use meshwire_tests::bins::SIDECAR;

/// Runs the sidecar binary expecting a usage error; returns its stderr.
fn usage_error(args: &[&str]) -> String {
    let out = std::process::Command::new(SIDECAR)
        .args(["--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run sidecar");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_binary_joins_with_a_token_and_a_pinned_root() {
    let (cp, _dir) = control_plane(Duration::from_secs(3600)).await;
    let mut a = admin(cp.local_addr, Some(&format!("Bearer {}", cp.admin_token))).await;
    api::create_service(&mut a, "echo").await;
    let app = echo("echo-0").await;
    let (token, id, _) = cp
        .ca
        .create_token("default", "echo", Duration::from_secs(60))
        .unwrap();
    let server = format!("https://{}", cp.tls_addr.unwrap());
    let fp = cp.ca.bundle().signing_fingerprint.clone();
    let app_addr = app.addr.to_string();
    let args = |token: &str| {
        vec![
            "--app".to_owned(),
            app_addr.clone(),
            "--control-plane".into(),
            server.clone(),
            "--service".into(),
            "echo".into(),
            "--ca-fingerprint".into(),
            fp.clone(),
            "--join-token".into(),
            token.to_owned(),
        ]
    };
    let a1 = args(&token);
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    let sc = SidecarProcess::spawn(&a1, &[]).await;
    eventually(
        "certificate and config",
        Duration::from_secs(20),
        || async {
            http1_get(sc.addrs.admin, "a", "/ready")
                .await
                .is_ok_and(|r| r.0 == 200)
        },
    )
    .await;
    let c = admin_json(sc.addrs.admin, "/certs").await;
    assert_eq!(c["spiffe_id"], id.as_str());
    assert_eq!(c["signed_by"], fp.as_str());

    // The same token again: refused, and the sidecar says why.
    let again = SidecarProcess::spawn(&a1, &[]).await;
    eventually(
        "the reused token is refused",
        Duration::from_secs(20),
        || async { again.log().contains("join token is not valid") },
    )
    .await;
    let (status, _, body) = http1_get(again.addrs.admin, "a", "/ready").await.unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        admin_json(again.addrs.admin, "/certs").await["ready"],
        false
    );

    // A wrong pin: the control plane is not trusted, nothing is sent.
    let (t2, _, _) = cp
        .ca
        .create_token("default", "echo", Duration::from_secs(60))
        .unwrap();
    let mut a2 = args(&t2);
    let wrong = "ab".repeat(32);
    a2[7] = wrong.clone();
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let pinned = SidecarProcess::spawn(&a2, &[]).await;
    eventually(
        "the unpinned server is refused",
        Duration::from_secs(20),
        || async { pinned.log().contains("pinned root") },
    )
    .await;
    assert_eq!(
        admin_json(pinned.addrs.admin, "/certs").await["ready"],
        false
    );

    // Flags that cannot work are refused up front.
    let err = usage_error(&[
        "--join-token",
        "x",
        "--control-plane",
        "http://127.0.0.1:1",
        "--service",
        "a",
    ]);
    assert!(
        err.contains("--join-token") && err.contains("https://"),
        "{err}"
    );
    let err = usage_error(&["--control-plane", "https://127.0.0.1:1", "--service", "a"]);
    assert!(err.contains("--join-token"), "{err}");
    let err = usage_error(&[
        "--join-token",
        "x",
        "--control-plane",
        "https://127.0.0.1:1",
        "--service",
        "a",
        "--ca-fingerprint",
        "nothex",
    ]);
    assert!(
        err.contains("--ca-fingerprint") && err.contains("64 hex digits"),
        "{err}"
    );
    let err = usage_error(&[
        "--join-token",
        "x",
        "--control-plane",
        "https://127.0.0.1:1",
        "--service",
        "a",
    ]);
    assert!(
        err.contains("--trust-bundle") && err.contains("--ca-fingerprint"),
        "{err}"
    );
    let err = usage_error(&[
        "--cert",
        "/nonexistent.crt",
        "--key",
        "/nonexistent.key",
        "--trust-bundle",
        "/nonexistent.pem",
    ]);
    assert!(err.contains("/nonexistent"), "{err}");
}
