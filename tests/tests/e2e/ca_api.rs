//! The control plane as the mesh's certificate authority, for real: an
//! in-process control plane (or a `meshwire-control-plane` process) on
//! `127.0.0.1:0`, its TLS port spoken to with the mesh's own TLS client.
//! Join tokens bind an identity and are single use and expiring; issuance
//! happens only over TLS; renewal takes the identity from the client
//! certificate; the trust bundle is watched through a root rotation; roots
//! and tokens survive a restart; an admin certificate replaces the admin
//! token; `meshctl token|ca|service policy` print and fail clearly; and a
//! service's permissive flag and policy reach the pushed xDS Cluster.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use meshwire_control_plane::auth::Bearer;
use meshwire_control_plane::ca::{CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE};
use meshwire_control_plane::{ControlPlane, ControlPlaneConfig, ControlPlaneHandle};
use meshwire_proto::admin::v1 as pb;
use meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient;
use meshwire_proto::identity::v1 as ipb;
use meshwire_proto::identity::v1::identity_client::IdentityClient;
use meshwire_tests::{ControlPlaneProcess, admin, eventually};
use meshwire_tls::{Credentials, SpiffeId, TrustBundle};
use tonic::Code;
use tonic::transport::Channel;

use meshwire_tests::bins::MESHCTL;
use meshwire_tests::bins::{Bin, CONTROL_PLANE as CP};
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

// === harness ===

async fn start(dir: &Path) -> ControlPlaneHandle {
    ControlPlane::start(ControlPlaneConfig::local(dir))
        .await
        .expect("control plane starts")
}

fn bundle(cp: &ControlPlaneHandle) -> TrustBundle {
    cp.ca.bundle().bundle.clone()
}

fn cp_id(cp: &ControlPlaneHandle) -> SpiffeId {
    cp.ca
        .spiffe_id(CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE)
        .unwrap()
}

/// A channel to the TLS port: the server verified against `bundle` and its
/// identity checked; `creds` presented as the client certificate.
async fn try_tls(
    addr: SocketAddr,
    bundle: &TrustBundle,
    expect: &SpiffeId,
    creds: Option<&Credentials>,
) -> Result<Channel, tonic::transport::Error> {
    let connector = meshwire_control_plane::tls::connector(bundle, creds, Some(expect)).unwrap();
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
}

async fn tls(cp: &ControlPlaneHandle, creds: Option<&Credentials>) -> Channel {
    try_tls(cp.tls_addr.unwrap(), &bundle(cp), &cp_id(cp), creds)
        .await
        .expect("TLS to the control plane")
}

async fn plain(cp: &ControlPlaneHandle) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", cp.local_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn admin_api(cp: &ControlPlaneHandle) -> meshwire_tests::Admin {
    admin(cp.local_addr, Some(&format!("Bearer {}", cp.admin_token))).await
}

async fn create_service(a: &mut meshwire_tests::Admin, name: &str) {
    a.create_service(pb::CreateServiceRequest {
        service: Some(pb::Service {
            name: name.into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
}

async fn join_token(a: &mut meshwire_tests::Admin, service: &str, ttl: Duration) -> pb::JoinToken {
    a.create_join_token(pb::CreateJoinTokenRequest {
        service: service.into(),
        namespace: String::new(),
        ttl: Some(ttl.try_into().unwrap()),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Issue with a fresh key; the credentials that came back, or the status.
async fn issue(ch: Channel, token: &str) -> Result<(Credentials, ipb::Certificate), tonic::Status> {
    let (key, csr) = meshwire_tls::new_key_and_csr().unwrap();
    let cert = IdentityClient::new(ch)
        .issue(ipb::IssueRequest {
            join_token: token.into(),
            csr_pem: csr,
        })
        .await?
        .into_inner();
    let chain = meshwire_tls::certs_from_pem(&cert.cert_chain_pem).unwrap();
    Ok((Credentials { chain, key }, cert))
}

fn leaf_id(c: &Credentials) -> Option<String> {
    meshwire_tls::cert_info(&c.chain[0]).unwrap().spiffe_id
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_bind_one_identity_are_single_use_expire_and_work_only_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let mut a = admin_api(&cp).await;
    create_service(&mut a, "alpha").await;
    create_service(&mut a, "beta").await;

    let t = join_token(&mut a, "alpha", Duration::from_secs(3600)).await;
    assert_eq!(t.spiffe_id, "spiffe://meshwire.local/ns/default/sa/alpha");
    assert!(t.token.starts_with("mwjt."), "{}", t.token);

    // Over the plaintext port: refused, and the token is not spent.
    let e = issue(plain(&cp).await, &t.token).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("TLS"), "{e:?}");

    // Over TLS: alpha's identity, signed by the signing root, chains to the bundle.
    let (creds, cert) = issue(tls(&cp, None).await, &t.token).await.unwrap();
    assert_eq!(leaf_id(&creds).as_deref(), Some(t.spiffe_id.as_str()));
    assert_eq!(cert.spiffe_id, t.spiffe_id);
    let tb = cert.trust_bundle.unwrap();
    assert_eq!(tb.signing_fingerprint, cp.ca.bundle().signing_fingerprint);
    let lifetime = cert.not_after - cert.not_before;
    assert!(
        (24 * 3600..=24 * 3600 + 120).contains(&lifetime),
        "default lifetime 24h (+ backdating), got {lifetime}s"
    );

    // Spent: a second use is refused, whatever the port.
    let e = issue(tls(&cp, None).await, &t.token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Tampered or garbage tokens are refused the same way.
    let t2 = join_token(&mut a, "beta", Duration::from_secs(3600)).await;
    let tampered = format!("{}x", &t2.token[..t2.token.len() - 1]);
    let e = issue(tls(&cp, None).await, &tampered).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = issue(tls(&cp, None).await, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A bad CSR does not spend the token; beta's token gives beta, never alpha.
    let e = IdentityClient::new(tls(&cp, None).await)
        .issue(ipb::IssueRequest {
            join_token: t2.token.clone(),
            csr_pem: "not a CSR".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let (b, _) = issue(tls(&cp, None).await, &t2.token).await.unwrap();
    assert_eq!(
        leaf_id(&b).as_deref(),
        Some("spiffe://meshwire.local/ns/default/sa/beta")
    );

    // Tokens only for services that exist, with a sane ttl.
    let e = a
        .create_join_token(pb::CreateJoinTokenRequest {
            service: "gamma".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = a
        .create_join_token(pb::CreateJoinTokenRequest {
            service: "alpha".into(),
            ttl: Some(Duration::from_secs(365 * 24 * 3600).try_into().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("ttl:"), "{e:?}");
    let e = a
        .create_join_token(pb::CreateJoinTokenRequest {
            service: "alpha".into(),
            namespace: "Bad NS".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("namespace:"), "{e:?}");

    // Expiry: a 1s token, used once the clock has passed its expiry (wait on
    // the clock, bounded; expiry is kept to the second).
    let short = join_token(&mut a, "alpha", Duration::from_secs(1)).await;
    let expires = SystemTime::try_from(short.expires_at.unwrap()).unwrap();
    let past = expires + Duration::from_secs(1);
    eventually(
        "the token's expiry passes",
        Duration::from_secs(10),
        || async { SystemTime::now() >= past },
    )
    .await;
    let e = issue(tls(&cp, None).await, &short.token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    cp.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_takes_the_identity_from_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let mut a = admin_api(&cp).await;
    create_service(&mut a, "alpha").await;
    let t = join_token(&mut a, "alpha", Duration::from_secs(60)).await;
    let (creds, first) = issue(tls(&cp, None).await, &t.token).await.unwrap();

    let renew = |ch: Channel| async move {
        let (key, csr) = meshwire_tls::new_key_and_csr().unwrap();
        IdentityClient::new(ch)
            .renew(ipb::RenewRequest { csr_pem: csr })
            .await
            .map(|r| (r.into_inner(), key))
    };
    let (cert, key) = renew(tls(&cp, Some(&creds)).await).await.unwrap();
    assert_eq!(cert.spiffe_id, t.spiffe_id);
    let chain = meshwire_tls::certs_from_pem(&cert.cert_chain_pem).unwrap();
    let renewed = Credentials { chain, key };
    assert_eq!(leaf_id(&renewed).as_deref(), Some(t.spiffe_id.as_str()));
    assert_ne!(
        cert.cert_chain_pem, first.cert_chain_pem,
        "a new certificate"
    );
    // The renewed one renews too.
    let (again, _) = renew(tls(&cp, Some(&renewed)).await).await.unwrap();
    assert_eq!(again.spiffe_id, t.spiffe_id);

    let e = renew(tls(&cp, None).await).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = renew(plain(&cp).await).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A client certificate from another CA does not get through the handshake.
    let other = tempfile::tempdir().unwrap();
    let other_ca = meshwire_control_plane::ca::Ca::open(
        other.path(),
        &meshwire_control_plane::ca::CaConfig::default(),
    )
    .unwrap();
    let (chain_pem, key_pem) = other_ca
        .admin_credentials(Duration::from_secs(600))
        .unwrap();
    let foreign = Credentials {
        chain: meshwire_tls::certs_from_pem(&chain_pem).unwrap(),
        key: meshwire_tls::key_from_pem(&key_pem).unwrap(),
    };
    let refused = match try_tls(
        cp.tls_addr.unwrap(),
        &bundle(&cp),
        &cp_id(&cp),
        Some(&foreign),
    )
    .await
    {
        Err(_) => true,
        // TLS 1.3: the client may see the server's refusal only on first use.
        Ok(ch) => renew(ch).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");
    cp.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_bundle_is_watched_through_a_root_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let mut a = admin_api(&cp).await;
    let old = cp.ca.bundle().signing_fingerprint.clone();
    let mut watch = IdentityClient::new(tls(&cp, None).await)
        .watch_trust_bundle(ipb::WatchTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.fingerprints, vec![old.clone()]);
    assert_eq!(first.signing_fingerprint, old);
    assert_eq!(
        TrustBundle::from_pem(&first.roots_pem)
            .unwrap()
            .fingerprints(),
        first.fingerprints
    );

    // 1. Add: trusted, not signing.
    let st = a
        .add_root(pb::AddRootRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.roots.len(), 2);
    let new = st
        .roots
        .iter()
        .find(|r| r.fingerprint != old)
        .unwrap()
        .fingerprint
        .clone();
    let m = watch.message().await.unwrap().unwrap();
    assert!(m.version > first.version);
    assert_eq!(m.fingerprints.len(), 2);
    assert!(m.fingerprints.contains(&new));
    assert_eq!(m.signing_fingerprint, old);

    // 2. Activate (by prefix): the new root signs, listed first.
    let st = a
        .activate_root(pb::ActivateRootRequest {
            fingerprint: new[..10].to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        st.roots[0].signing && st.roots[0].fingerprint == new,
        "{st:?}"
    );
    let m = watch.message().await.unwrap().unwrap();
    assert_eq!(m.signing_fingerprint, new);
    assert_eq!(m.fingerprints[0], new);

    // The old root cannot go while it signs; an unknown one is NOT_FOUND.
    let e = a
        .remove_root(pb::RemoveRootRequest {
            fingerprint: new.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = a
        .remove_root(pb::RemoveRootRequest {
            fingerprint: "abcdef".repeat(2),
        })
        .await
        .unwrap_err();
    assert!(matches!(e.code(), Code::NotFound), "{e:?}");
    let e = a
        .activate_root(pb::ActivateRootRequest {
            fingerprint: "xyz!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("fingerprint:"), "{e:?}");

    // 3. Remove the old root.
    let st = a
        .remove_root(pb::RemoveRootRequest {
            fingerprint: old.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.roots.len(), 1);
    let m = watch.message().await.unwrap().unwrap();
    assert_eq!(m.fingerprints, vec![new.clone()]);

    // The TLS port now serves a certificate from the new root: a client that
    // trusts only the new root gets in (the swap follows the bundle change).
    let only_new = TrustBundle::from_pem(&m.roots_pem).unwrap();
    let (addr, id) = (cp.tls_addr.unwrap(), cp_id(&cp));
    eventually(
        "the TLS port serves from the new root",
        Duration::from_secs(10),
        || {
            let (only_new, id) = (only_new.clone(), id.clone());
            async move {
                match try_tls(addr, &only_new, &id, None).await {
                    Ok(ch) => IdentityClient::new(ch)
                        .watch_trust_bundle(ipb::WatchTrustBundleRequest {})
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    cp.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_roots_and_the_unused_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let mut a = admin_api(&cp).await;
    create_service(&mut a, "alpha").await;
    a.add_root(pb::AddRootRequest {}).await.unwrap();
    let before = cp.ca.bundle();
    let unused = join_token(&mut a, "alpha", Duration::from_secs(600)).await;
    let used = join_token(&mut a, "alpha", Duration::from_secs(600)).await;
    issue(tls(&cp, None).await, &used.token).await.unwrap();
    drop(a);
    cp.stop().await.unwrap();

    let cp = start(dir.path()).await;
    let after = cp.ca.bundle();
    assert_eq!(after.fingerprints, before.fingerprints);
    assert_eq!(after.signing_fingerprint, before.signing_fingerprint);
    let (c, _) = issue(tls(&cp, None).await, &unused.token).await.unwrap();
    assert_eq!(leaf_id(&c).as_deref(), Some(unused.spiffe_id.as_str()));
    let e = issue(tls(&cp, None).await, &used.token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "a used token stays used");
    // The stored tokens are hashes: the secret is nowhere in the data dir.
    let secret = unused.token.rsplit('.').next().unwrap();
    let stored = std::fs::read_to_string(dir.path().join("ca/tokens.json")).unwrap();
    assert!(!stored.contains(secret));
    cp.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_certificate_replaces_the_token_on_the_tls_port() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let (chain, key) = cp.ca.admin_credentials(Duration::from_secs(600)).unwrap();
    let admin_creds = Credentials {
        chain: meshwire_tls::certs_from_pem(&chain).unwrap(),
        key: meshwire_tls::key_from_pem(&key).unwrap(),
    };
    let anon = |ch: Channel| MeshAdminClient::with_interceptor(ch, Bearer::default());

    let mut client = anon(tls(&cp, Some(&admin_creds)).await);
    client
        .create_service(pb::CreateServiceRequest {
            service: Some(pb::Service {
                name: "alpha".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let r = client
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.services.len(), 1);

    // Anonymous: refused on both ports.
    let e = anon(tls(&cp, None).await)
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = anon(plain(&cp).await)
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // A workload certificate is not an admin one.
    let mut a = admin_api(&cp).await;
    let t = join_token(&mut a, "alpha", Duration::from_secs(60)).await;
    let (workload, _) = issue(tls(&cp, None).await, &t.token).await.unwrap();
    let e = anon(tls(&cp, Some(&workload)).await)
        .list_services(pb::ListServicesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The token still works over TLS too.
    let mut with_token = MeshAdminClient::with_interceptor(
        tls(&cp, None).await,
        Bearer::new(Some(&cp.admin_token)).unwrap(),
    );
    with_token.get_ca(pb::GetCaRequest {}).await.unwrap();
    cp.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_and_policy_round_trip_into_the_pushed_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path()).await;
    let mut a = admin_api(&cp).await;
    let policy = pb::Policy {
        default_action: pb::Action::Deny.into(),
        rules: vec![
            pb::Rule {
                action: pb::Action::Allow.into(),
                sources: vec!["spiffe://meshwire.local/ns/default/sa/web".into()],
                methods: vec!["meshwire.example.v1.Echo/*".into()],
                cidrs: vec![],
            },
            pb::Rule {
                action: pb::Action::Allow.into(),
                cidrs: vec!["127.0.0.0/8".into()],
                ..Default::default()
            },
        ],
    };
    a.create_service(pb::CreateServiceRequest {
        service: Some(pb::Service {
            name: "alpha".into(),
            permissive: true,
            policy: Some(policy.clone()),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let got = a
        .get_service(pb::GetServiceRequest {
            name: "alpha".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .service
        .unwrap();
    assert!(got.permissive);
    assert_eq!(got.policy.as_ref(), Some(&policy));

    // A bad CIDR names its place and changes nothing.
    let mut bad = policy.clone();
    bad.rules[1].cidrs.push("10.0.0.0/99".into());
    let e = a
        .update_service(pb::UpdateServiceRequest {
            service: Some(pb::Service {
                name: "alpha".into(),
                policy: Some(bad),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["policy".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("service.policy.rules[1].cidrs[1]:"),
        "{e:?}"
    );

    // What ADS pushes (over the TLS port) carries both.
    let fetch = |cp_addr: SocketAddr, bundle: TrustBundle, id: SpiffeId, want_version: u64| async move {
        let ch = try_tls(cp_addr, &bundle, &id, None).await.unwrap();
        let mut ads = AggregatedDiscoveryServiceClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(DiscoveryRequest {
            node: Some(Node {
                id: "test-node".into(),
                cluster: "test".into(),
                ..Default::default()
            }),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut resp = ads
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        loop {
            let r = resp.message().await.unwrap().unwrap();
            if r.version_info.parse::<u64>().unwrap_or(0) >= want_version {
                drop(tx);
                return r
                    .resources
                    .iter()
                    .map(|any| meshwire_xds::resources::decode_cluster(any).unwrap())
                    .collect::<Vec<_>>();
            }
        }
    };
    let v = cp.version();
    let mut snaps = cp.snapshots();
    snaps.wait_for(|s| s.version >= v).await.unwrap();
    let clusters = tokio::time::timeout(
        Duration::from_secs(10),
        fetch(cp.tls_addr.unwrap(), bundle(&cp), cp_id(&cp), v),
    )
    .await
    .expect("ADS pushes the version");
    let c = clusters.iter().find(|c| c.name == "alpha").unwrap();
    assert!(c.permissive);
    let p = c.policy.as_ref().unwrap();
    assert_eq!(p.default_action, meshwire_mesh::policy::Action::Deny);
    assert_eq!(p.rules.len(), 2);
    assert_eq!(p.rules[1].cidrs, vec!["127.0.0.0/8".to_owned()]);

    // Clear both through the mask; the next push has neither.
    let r = a
        .update_service(pb::UpdateServiceRequest {
            service: Some(pb::Service {
                name: "alpha".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["permissive".into(), "policy".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let s = r.service.unwrap();
    assert!(!s.permissive && s.policy.is_none());
    snaps.wait_for(|s| s.version >= r.version).await.unwrap();
    let clusters = tokio::time::timeout(
        Duration::from_secs(10),
        fetch(cp.tls_addr.unwrap(), bundle(&cp), cp_id(&cp), r.version),
    )
    .await
    .expect("ADS pushes the version");
    let c = clusters.iter().find(|c| c.name == "alpha").unwrap();
    assert!(!c.permissive && c.policy.is_none());
    cp.stop().await.unwrap();
}

// === meshctl ===

use meshwire_tests::CommandOut as Out;

async fn run(bin: Bin, cwd: &Path, args: Vec<String>) -> Out {
    let mut cmd = Command::new(bin);
    cmd.args(&args)
        .current_dir(cwd)
        .env_remove("MESHWIRE_ADMIN_TOKEN")
        .env_remove("MESHWIRE_DATA_DIR")
        .env_remove("MESHCTL_SERVER")
        .env_remove("MESHCTL_CA_BUNDLE")
        .env_remove("MESHCTL_CERT")
        .env_remove("MESHCTL_KEY")
        .stdin(Stdio::null());
    meshwire_tests::run_command(cmd).await
}

fn ok(out: &Out) -> &str {
    assert_eq!(out.code, 0, "{out:?}");
    &out.stdout
}

fn failed(out: &Out, code: i32, contains: &str) {
    assert_eq!(out.code, code, "{out:?}");
    assert!(out.stderr.contains(contains), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

fn json(out: &Out) -> serde_json::Value {
    serde_json::from_str(ok(out)).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_tokens_ca_and_policies() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let cwd = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();
    let url = cp.url();
    let ctl = |args: &[&str]| {
        let mut all: Vec<String> = vec![
            "--server".into(),
            url.clone(),
            "--data-dir".into(),
            dir.clone(),
        ];
        all.extend(args.iter().map(|s| (*s).to_owned()));
        run(MESHCTL, cwd.path(), all)
    };

    ok(&ctl(&["service", "create", "alpha", "--permissive"]).await);

    // token create: the token alone, or JSON.
    let out = ctl(&["token", "create", "--service", "alpha"]).await;
    let token = ok(&out).trim().to_owned();
    assert!(
        token.starts_with("mwjt.") && !token.contains(char::is_whitespace),
        "{out:?}"
    );
    let v = json(
        &ctl(&[
            "-o",
            "json",
            "token",
            "create",
            "--service",
            "alpha",
            "--namespace",
            "prod",
            "--ttl",
            "10m",
        ])
        .await,
    );
    assert_eq!(v["spiffe_id"], "spiffe://meshwire.local/ns/prod/sa/alpha");
    assert!(v["token"].as_str().unwrap().starts_with("mwjt."));
    let expires = v["expires_at"].as_str().unwrap();
    assert!(
        expires.len() == 20 && expires.ends_with('Z') && expires.as_bytes()[10] == b'T',
        "RFC 3339: {expires}"
    );
    failed(
        &ctl(&["token", "create", "--service", "nope"]).await,
        1,
        "NOT_FOUND",
    );
    failed(
        &ctl(&["token", "create", "--service", "alpha", "--ttl", "90d"]).await,
        1,
        "ttl:",
    );
    failed(&ctl(&["token", "create"]).await, 2, "--service");

    // ca show: a table of the roots, or JSON.
    let out = ctl(&["ca", "show"]).await;
    let text = ok(&out);
    assert!(text.starts_with("trust domain meshwire.local"), "{text}");
    let lines: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("FINGERPRINT"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let header = lines[0];
    let cell = |row: &str, col: &str| -> String {
        let at = header
            .find(col)
            .unwrap_or_else(|| panic!("no {col} in {header}"));
        row[at..].split_whitespace().next().unwrap_or("").to_owned()
    };
    let first_fp = cell(lines[1], "FINGERPRINT");
    assert_eq!(first_fp.len(), 64);
    assert_eq!(cell(lines[1], "SIGNING"), "yes");
    assert!(
        header.contains("NOT AFTER") && header.contains("SUBJECT"),
        "{header}"
    );
    let v = json(&ctl(&["-o", "json", "ca", "show"]).await);
    assert_eq!(v["roots"][0]["fingerprint"], first_fp.as_str());
    assert_eq!(v["roots"][0]["signing"], true);
    assert_eq!(v["cert_lifetime"], "1day");

    // ca bundle: the PEM the data directory holds.
    let pem = ok(&ctl(&["ca", "bundle"]).await).to_owned();
    assert_eq!(
        pem,
        std::fs::read_to_string(data.path().join("ca/bundle.pem")).unwrap()
    );
    assert_eq!(
        TrustBundle::from_pem(&pem).unwrap().fingerprints(),
        vec![first_fp.clone()]
    );

    // Rotation by meshctl.
    let v = json(&ctl(&["-o", "json", "ca", "add-root"]).await);
    let added = v["added"].as_str().unwrap().to_owned();
    assert_eq!(v["roots"].as_array().unwrap().len(), 2);
    assert_ne!(added, first_fp);
    let out = ctl(&["ca", "activate", &added[..12]]).await;
    assert!(ok(&out).contains(&added), "{out:?}");
    failed(
        &ctl(&["ca", "remove-root", &added[..12]]).await,
        1,
        "FAILED_PRECONDITION",
    );
    failed(&ctl(&["ca", "activate", "zz"]).await, 1, "fingerprint");
    failed(&ctl(&["ca", "activate", "abab"]).await, 1, "NOT_FOUND");
    let out = ctl(&["ca", "remove-root", &first_fp]).await;
    assert!(ok(&out).contains(&first_fp), "{out:?}");
    let v = json(&ctl(&["-o", "json", "ca", "show"]).await);
    assert_eq!(v["roots"].as_array().unwrap().len(), 1);
    assert_eq!(v["roots"][0]["fingerprint"], added.as_str());

    // Policies from a file; service update --no-permissive.
    let file = cwd.path().join("policy.yaml");
    std::fs::write(
        &file,
        "default_action: deny\nrules:\n  - action: allow\n    sources: [\"spiffe://meshwire.local/ns/default/*\"]\n    cidrs: [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let out = ctl(&[
        "service",
        "policy",
        "set",
        "alpha",
        "--file",
        file.to_str().unwrap(),
    ])
    .await;
    assert!(ok(&out).starts_with("set the policy of alpha"), "{out:?}");
    let v = json(&ctl(&["-o", "json", "service", "get", "alpha"]).await);
    assert_eq!(v["permissive"], true);
    assert_eq!(v["policy"]["default_action"], "deny");
    assert_eq!(v["policy"]["rules"][0]["cidrs"][0], "10.0.0.0/8");
    let out = ctl(&["service", "list"]).await;
    let text = ok(&out);
    let lines: Vec<&str> = text.lines().collect();
    let header = lines[0];
    let cell = |row: &str, col: &str| -> String {
        let at = header
            .find(col)
            .unwrap_or_else(|| panic!("no {col} in {header}"));
        row[at..].split_whitespace().next().unwrap_or("").to_owned()
    };
    assert_eq!(cell(lines[1], "PERMISSIVE"), "yes");
    assert_eq!(cell(lines[1], "POLICY"), "default-deny,1rule");
    let out = ctl(&["service", "policy", "get", "alpha"]).await;
    assert!(ok(&out).starts_with("default: deny\n"), "{out:?}");
    let json_file = cwd.path().join("bad.json");
    std::fs::write(
        &json_file,
        r#"{"default_action": "allow", "rules": [{"action": "deny", "cidrs": ["10.0.0.0/8", "300.0.0.0/8"]}]}"#,
    )
    .unwrap();
    failed(
        &ctl(&[
            "service",
            "policy",
            "set",
            "alpha",
            "-f",
            json_file.to_str().unwrap(),
        ])
        .await,
        1,
        "service.policy.rules[0].cidrs[1]",
    );
    std::fs::write(&json_file, "default_action: maybe\n").unwrap();
    failed(
        &ctl(&[
            "service",
            "policy",
            "set",
            "alpha",
            "-f",
            json_file.to_str().unwrap(),
        ])
        .await,
        2,
        "--file",
    );
    ok(&ctl(&["service", "policy", "clear", "alpha"]).await);
    ok(&ctl(&["service", "update", "alpha", "--no-permissive"]).await);
    let v = json(&ctl(&["-o", "json", "service", "get", "alpha"]).await);
    assert_eq!(v["permissive"], false);
    assert!(v["policy"].is_null());

    // Over TLS with an admin certificate from `meshwire-control-plane admin-cert`: no token.
    let certs = tempfile::tempdir().unwrap();
    let out = run(
        CP,
        cwd.path(),
        vec![
            "--data-dir".into(),
            dir.clone(),
            "admin-cert".into(),
            "--out".into(),
            certs.path().to_str().unwrap().into(),
        ],
    )
    .await;
    assert!(ok(&out).contains("admin.crt"), "{out:?}");
    let p = |f: &str| certs.path().join(f).to_str().unwrap().to_owned();
    let tls_url = cp.tls_url();
    let secure = |extra: &[&str]| {
        let mut all: Vec<String> = vec!["--server".into(), tls_url.clone()];
        all.extend(extra.iter().map(|s| (*s).to_owned()));
        run(MESHCTL, cwd.path(), all)
    };
    let with_cert = [
        "--ca-bundle".to_owned(),
        p("bundle.pem"),
        "--cert".to_owned(),
        p("admin.crt"),
        "--key".to_owned(),
        p("admin.key"),
    ];
    let mut args: Vec<&str> = with_cert.iter().map(String::as_str).collect();
    args.extend(["-o", "json", "service", "list"]);
    let v = json(&secure(&args).await);
    assert_eq!(v["services"][0]["name"], "alpha");
    // Without a certificate or token: refused; without a bundle: usage.
    let out = secure(&["--ca-bundle", &p("bundle.pem"), "service", "list"]).await;
    failed(&out, 1, "UNAUTHENTICATED");
    failed(&secure(&["service", "list"]).await, 2, "--ca-bundle");
    // A bundle from another mesh: the server is not trusted.
    let other = tempfile::tempdir().unwrap();
    meshwire_control_plane::ca::Ca::open(other.path(), &Default::default()).unwrap();
    let foreign = other.path().join("ca/bundle.pem");
    failed(
        &secure(&[
            "--ca-bundle",
            foreign.to_str().unwrap(),
            "--token",
            &cp.token,
            "service",
            "list",
        ])
        .await,
        3,
        "cannot connect",
    );
    // A certificate for plain http is a usage error.
    let mut args = vec!["--server".to_owned(), url.clone()];
    args.extend(with_cert.iter().cloned());
    args.extend(["service".into(), "list".into()]);
    let out = run(MESHCTL, cwd.path(), args).await;
    failed(&out, 2, "--cert needs an https://");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_flags_are_checked_and_a_user_ca_signs() {
    let data = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_owned();
    let cp_run = |args: &[&str]| {
        let mut all: Vec<String> = vec!["--data-dir".into(), dir.clone()];
        all.extend(args.iter().map(|s| (*s).to_owned()));
        run(CP, cwd.path(), all)
    };
    let bad = |out: Out, flag: &str| {
        assert_eq!(out.code, 2, "{out:?}");
        assert!(out.stderr.contains(flag), "{out:?}");
    };
    bad(cp_run(&["--cert-lifetime", "30s"]).await, "--cert-lifetime");
    bad(
        cp_run(&["--cert-lifetime", "soon"]).await,
        "--cert-lifetime",
    );
    bad(cp_run(&["--tls-listen", "nope"]).await, "--tls-listen");
    bad(cp_run(&["--tls-name", "not a name"]).await, "--tls-name");
    bad(
        cp_run(&["--trust-domain", "Mesh Wire"]).await,
        "--trust-domain",
    );
    bad(cp_run(&["--ca-cert", "x.pem"]).await, "--ca-key");
    bad(
        cp_run(&["--ca-cert", "missing.pem", "--ca-key", "missing.key"]).await,
        "--ca-cert",
    );

    // A user-supplied CA: here, the root another control plane generated.
    let other = tempfile::tempdir().unwrap();
    let other_ca = meshwire_control_plane::ca::Ca::open(other.path(), &Default::default()).unwrap();
    let fp = other_ca.bundle().signing_fingerprint.clone();
    let roots = other.path().join("ca/roots");
    let (crt, key) = (
        roots.join(format!("{fp}.crt")),
        roots.join(format!("{fp}.key")),
    );
    let cp = ControlPlaneProcess::spawn_with(
        data.path(),
        None,
        &[
            ("MESHWIRE_CA_CERT", crt.to_str().unwrap()),
            ("MESHWIRE_CA_KEY", key.to_str().unwrap()),
            ("MESHWIRE_CERT_LIFETIME", "5m"),
        ],
    )
    .await;
    let url = cp.url();
    let ctl = |args: &[&str]| {
        let mut all: Vec<String> = vec![
            "--server".into(),
            url.clone(),
            "--token".into(),
            cp.token.clone(),
        ];
        all.extend(args.iter().map(|s| (*s).to_owned()));
        run(MESHCTL, cwd.path(), all)
    };
    let v = json(&ctl(&["-o", "json", "ca", "show"]).await);
    assert_eq!(v["roots"][0]["fingerprint"], fp.as_str());
    assert_eq!(v["roots"][0]["generated"], false);
    assert_eq!(v["cert_lifetime"], "5m");
    failed(&ctl(&["ca", "add-root"]).await, 1, "FAILED_PRECONDITION");
    // Workload certificates chain to the user's root, with the configured lifetime.
    ok(&ctl(&["service", "create", "alpha"]).await);
    let token = ok(&ctl(&["token", "create", "--service", "alpha"]).await)
        .trim()
        .to_owned();
    let bundle = other_ca.bundle().bundle.clone();
    let id = SpiffeId::for_service(
        "meshwire.local",
        CONTROL_PLANE_NAMESPACE,
        CONTROL_PLANE_SERVICE,
    )
    .unwrap();
    let ch = try_tls(cp.tls_addr().unwrap(), &bundle, &id, None)
        .await
        .unwrap();
    let (_, cert) = issue(ch, &token).await.unwrap();
    assert!(
        (300..=420).contains(&(cert.not_after - cert.not_before)),
        "{cert:?}"
    );
    assert_eq!(cert.trust_bundle.unwrap().fingerprints, vec![fp]);
}
