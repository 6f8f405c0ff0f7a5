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
                identity: Some(format!(
                    "spiffe://{}/ns/default/sa/echo",
                    cp.ca.trust_domain()
                )),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
        apps.push(app);
        servers.push(s);
    }
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
