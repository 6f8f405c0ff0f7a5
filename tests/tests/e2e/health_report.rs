//! Health reports, end to end (issue 10): a server sidecar tells the control
//! plane (a real process) its app's health over mutual TLS; the control
//! plane stores it and pushes EDS `health_status: UNHEALTHY` to every caller.
//! Our sidecars drop the endpoint from their route table (not a refusal
//! hold), stock Envoy stops sending to it, `meshctl` shows it, and nobody
//! can report for an endpoint of another identity.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use meshwire_control_plane::{ControlPlane, ControlPlaneConfig};
use meshwire_examples::load::{Load, LoadConfig, Report};
use meshwire_proto::admin::v1 as pb;
use meshwire_proto::identity::v1 as ipb;
use meshwire_proto::identity::v1::identity_client::IdentityClient;
use meshwire_sidecar::identity::{Bootstrap, IdentityClientConfig};
use meshwire_sidecar::{ControlPlaneConfig as SidecarCp, IdentitySource, Sidecar, SidecarConfig};
use meshwire_tests::bins::MESHCTL;
use meshwire_tests::*;
use meshwire_tls::{Credentials, TrustBundle};
use tonic::Code;

const CALLERS: usize = 16;

/// An `echo-server` process; SIGUSR1 makes its grpc.health.v1 say
/// NOT_SERVING (it keeps answering calls), SIGUSR2 SERVING again.
struct App {
    addr: SocketAddr,
    child: Child,
}

impl App {
    async fn start(name: &str) -> App {
        let addr = dead_addr().await;
        let child = Command::new(bins::ECHO_SERVER.path())
            .args(["--listen", &addr.to_string(), "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn echo");
        eventually(
            "the app accepts connections",
            Duration::from_secs(10),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
        App { addr, child }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control-plane process with the services, and what sidecars need to join.
struct Cp {
    process: ControlPlaneProcess,
    admin: Admin,
    bundle: TrustBundle,
    _data: tempfile::TempDir,
}

impl Cp {
    async fn start(services: &[&str]) -> Cp {
        let data = tempfile::tempdir().unwrap();
        let process = ControlPlaneProcess::spawn(data.path()).await;
        Cp::with(process, data, services).await
    }

    async fn with(process: ControlPlaneProcess, data: tempfile::TempDir, services: &[&str]) -> Cp {
        init_tracing();
        let mut admin = process.client().await;
        for s in services {
            api::create_service(&mut admin, s).await;
        }
        let ca = admin
            .get_ca(pb::GetCaRequest {})
            .await
            .unwrap()
            .into_inner();
        let bundle = TrustBundle::from_pem(&ca.trust_bundle_pem).unwrap();
        Cp {
            process,
            admin,
            bundle,
            _data: data,
        }
    }

    /// A sidecar of `service` (identity from a join token, xDS over mTLS)
    /// in front of `app`, reporting for `advertise` (default: its inbound).
    async fn sidecar(
        &mut self,
        service: &str,
        app: Option<SocketAddr>,
        advertise: Option<SocketAddr>,
    ) -> Sidecar {
        let token = self
            .admin
            .create_join_token(pb::CreateJoinTokenRequest {
                service: service.into(),
                namespace: String::new(),
                ttl: None,
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let server = self.process.tls_url();
        let mut cfg = SidecarConfig::local();
        cfg.app = app;
        cfg.inbound = app.map(|_| localhost());
        cfg.advertise = advertise;
        cfg.control_plane = Some(SidecarCp {
            server: server.clone(),
            service: service.to_owned(),
            node_id: format!("{service}-{}", fastrand::u32(..)),
        });
        cfg.identity = Some(IdentitySource::ControlPlane(IdentityClientConfig {
            server,
            join_token: token,
            bootstrap: Bootstrap::Bundle(self.bundle.clone()),
            connect_timeout: Duration::from_secs(2),
        }));
        Sidecar::start(cfg).await.unwrap()
    }

    /// `address` → health, as the admin API shows it for `service`.
    async fn health(&mut self, service: &str) -> Vec<(String, pb::EndpointHealth)> {
        self.admin
            .list_endpoints(pb::ListEndpointsRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .endpoints
            .into_iter()
            .map(|e| (e.address.clone(), e.health()))
            .collect()
    }

    async fn wait_health(
        &mut self,
        what: &str,
        service: &str,
        want: &[(String, pb::EndpointHealth)],
    ) {
        let limit = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut got = self.health(service).await;
            got.sort();
            let mut want = want.to_vec();
            want.sort();
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < limit,
                "{what}: health {got:?}, want {want:?}\n{}",
                self.process.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `meshctl ARGS` against this control plane.
    async fn meshctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(MESHCTL);
        cmd.args(["--server", &self.process.url()])
            .args(args)
            .env("MESHWIRE_ADMIN_TOKEN", &self.process.token)
            .env_remove("MESHCTL_SERVER")
            .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("run meshctl"))
            .await
            .unwrap();
        assert!(out.status.success(), "meshctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, _, body) = http1_get(self.process.admin, "cp", "/metrics")
            .await
            .expect("metrics");
        let text = String::from_utf8_lossy(&body);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

fn all(addrs: &[SocketAddr], h: pb::EndpointHealth) -> Vec<(String, pb::EndpointHealth)> {
    addrs.iter().map(|a| (a.to_string(), h)).collect()
}

/// Calls answered per app and failed per code between two load totals.
fn between(before: &Report, now: &Report) -> (std::collections::BTreeMap<String, u64>, u64) {
    let ok = now
        .servers
        .iter()
        .map(|s| {
            let was = before.server(&s.name).map_or(0, |b| b.calls);
            (s.name.clone(), s.calls - was)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let failed = now.errors.values().sum::<u64>() - before.errors.values().sum::<u64>();
    (ok, failed)
}

/// Waits (bounded) for `n` more calls; what they did.
async fn next_calls(load: &Load, n: u64) -> (std::collections::BTreeMap<String, u64>, u64) {
    let before = load.total();
    let start = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (ok, failed) = between(&before, &load.total());
        if ok.values().sum::<u64>() + failed >= n {
            return (ok, failed);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {ok:?} in 60 s"
        );
    }
}

/// How long until `name` answers calls of `load` again (at most `limit`).
async fn until_it_serves(load: &Load, name: &str, limit: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    let calls = || load.total().server(name).map_or(0, |s| s.calls);
    let before = calls();
    eventually(&format!("{name} to get a call"), limit, || {
        let now = calls();
        async move { now > before }
    })
    .await;
    start.elapsed()
}

fn load_through(addr: SocketAddr) -> Load {
    let channel = meshwire_examples::load::channel(&addr.to_string(), "echo").expect("channel");
    Load::start(
        channel,
        &LoadConfig {
            concurrency: CALLERS,
            timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
}

/// The endpoints the caller sidecar's `/clusters` lists for `echo`.
async fn listed(client: &Sidecar) -> Vec<String> {
    let v = admin_json(client.admin_addr, "/clusters").await;
    v["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == "echo")
        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect()
}

/// Time for the load to show a change (it counts calls as they finish, and
/// one finishing call may have been in flight on the old state).
const SLACK: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_app_leaves_every_callers_eds_and_fails_no_call() {
    let mut cp = Cp::start(&["echo", "caller"]).await;
    let mut apps = Vec::new();
    let mut servers = Vec::new();
    let mut eps = Vec::new();
    for i in 0..3 {
        let app = App::start(&format!("echo-{i}")).await;
        let s = cp.sidecar("echo", Some(app.addr), None).await;
        let ep = s.inbound_addr.expect("inbound");
        // Registered by the operator, without an identity: the service's
        // default one (what the join token gave) is pushed and checked.
        api::add_endpoint(&mut cp.admin, "echo", ep, 1).await;
        eps.push(ep);
        apps.push(app);
        servers.push(s);
    }
    let client = cp.sidecar("caller", None, None).await;
    cp.wait_health(
        "every sidecar reports",
        "echo",
        &all(&eps, pb::EndpointHealth::Healthy),
    )
    .await;
    eventually(
        "the caller knows 3 endpoints",
        Duration::from_secs(10),
        || async { listed(&client).await.len() == 3 },
    )
    .await;

    let load = load_through(client.outbound_addr);
    let (warm, failed) = next_calls(&load, 500).await;
    assert_eq!(failed, 0, "before any fault: {warm:?}");

    apps[1].signal("USR1");
    let bad = eps[1].to_string();
    let mut want = all(&eps, pb::EndpointHealth::Healthy);
    want[1].1 = pb::EndpointHealth::Unhealthy;
    cp.wait_health("the report reaches the control plane", "echo", &want)
        .await;
    // Out of the caller's route table: EDS said UNHEALTHY (a refusal only
    // holds an endpoint back for 250 ms, it never removes it).
    eventually(
        "EDS drops it at the caller",
        Duration::from_secs(3),
        || async {
            let l = listed(&client).await;
            l.len() == 2 && !l.contains(&bad)
        },
    )
    .await;
    let (settle, failed) = next_calls(&load, 200).await;
    assert_eq!(failed, 0, "as the app turned NOT_SERVING: {settle:?}");
    let (out, failed) = next_calls(&load, 3000).await;
    assert_eq!(failed, 0, "while the app was NOT_SERVING: {out:?}");
    assert!(!out.contains_key("echo-1"), "{out:?}");

    // meshctl shows what the control plane sees, as a table and as JSON.
    let table = cp.meshctl(&["endpoint", "list", "echo"]).await;
    let header = table.lines().next().unwrap();
    let col = header.find("HEALTH").expect("a HEALTH column");
    let row = table.lines().find(|l| l.starts_with(&bad)).unwrap();
    assert!(row[col..].starts_with("unhealthy"), "{table}");
    let json: serde_json::Value = serde_json::from_str(
        &cp.meshctl(&["-o", "json", "endpoint", "list", "echo"])
            .await,
    )
    .unwrap();
    let by_addr = |a: &str| {
        json["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == a)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_addr(&bad)["health"], "unhealthy", "{json}");
    assert!(
        by_addr(&bad)["health_reported_at_unix"].as_u64().is_some(),
        "{json}"
    );
    assert_eq!(by_addr(&eps[0].to_string())["health"], "healthy", "{json}");
    let status = cp.meshctl(&["status"]).await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("echo") && l.contains(&bad) && l.contains("unhealthy")),
        "{status}"
    );
    assert_eq!(cp.metric("meshwire_cp_unhealthy_endpoints").await, 1.0);
    assert_eq!(
        cp.metric("meshwire_cp_endpoint_health_reports_total{health=\"unhealthy\"}")
            .await,
        1.0
    );

    // SERVING again: back in every caller's EDS and taking calls within 2 s.
    apps[1].signal("USR2");
    let back = until_it_serves(&load, "echo-1", Duration::from_secs(2) + SLACK).await;
    cp.wait_health(
        "healthy again",
        "echo",
        &all(&eps, pb::EndpointHealth::Healthy),
    )
    .await;
    let total = load.stop().await;
    assert_eq!(total.errors.values().sum::<u64>(), 0, "{total:?}");
    tracing::info!(
        ?back,
        calls = total.calls(),
        "unhealthy app left EDS and came back"
    );

    // The reporter goes (its sidecar stops): its mark goes with it, so
    // nothing stays marked from a sidecar that no longer reports.
    let gone = servers.remove(0);
    gone.shutdown();
    gone.wait().await;
    let mut want = all(&eps, pb::EndpointHealth::Healthy);
    want[0].1 = pb::EndpointHealth::Unknown;
    cp.wait_health("a stopped sidecar's mark is cleared", "echo", &want)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_envoy_stops_sending_to_an_endpoint_reported_unhealthy() {
    let mut cp = Cp::start(&["echo"]).await;
    let mut apps = Vec::new();
    let mut sidecars = Vec::new();
    let mut eps = Vec::new();
    for name in ["a", "b", "c"] {
        let app = App::start(name).await;
        // Envoy calls the apps directly (plaintext h2c); each app's sidecar
        // follows its health and reports for the app's registered address.
        api::add_endpoint(&mut cp.admin, "echo", app.addr, 1).await;
        sidecars.push(cp.sidecar("echo", Some(app.addr), Some(app.addr)).await);
        eps.push(app.addr);
        apps.push(app);
    }
    cp.wait_health(
        "every sidecar reports",
        "echo",
        &all(&eps, pb::EndpointHealth::Healthy),
    )
    .await;
    let envoy = EnvoyProcess::start(cp.process.addr, "envoy-health", false).await;
    let target = envoy.listener().await;
    let load = load_through(target);
    let (warm, failed) = next_calls(&load, 500).await;
    assert_eq!(failed, 0, "{warm:?}");
    assert_eq!(warm.len(), 3, "all three serve: {warm:?}");

    apps[1].signal("USR1");
    let bad = eps[1].to_string();
    eventually(
        "envoy marks b failed by EDS",
        Duration::from_secs(5),
        || async {
            envoy
                .health_flags("echo")
                .await
                .get(&bad)
                .is_some_and(|f| f.contains("failed_eds_health"))
        },
    )
    .await;
    // A call that was on its way to b when the flag flipped may still land.
    let (_, failed) = next_calls(&load, 200).await;
    assert_eq!(failed, 0);
    let (out, failed) = next_calls(&load, 2000).await;
    assert_eq!(failed, 0, "{out:?}");
    assert!(
        !out.contains_key("b"),
        "b got calls after the report: {out:?}"
    );

    apps[1].signal("USR2");
    let back = until_it_serves(&load, "b", Duration::from_secs(5)).await;
    let total = load.stop().await;
    assert_eq!(total.errors.values().sum::<u64>(), 0, "{total:?}");
    tracing::info!(?back, "envoy sends to b again");
}

/// Health goes through the store: on etcd, a report taken by one replica is
/// what every replica lists and pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_etcd_every_replica_publishes_what_one_was_told() {
    let etcd = meshwire_tests::etcd::Etcd::start().await;
    let token = "health-etcd-admin-token-0123456789abcdef";
    let envs = |urls: &str| {
        vec![
            ("MESHWIRE_ETCD", urls.to_owned()),
            ("MESHWIRE_ETCD_PREFIX", "/health/".to_owned()),
            ("MESHWIRE_ADMIN_TOKEN", token.to_owned()),
            // The shared CA's root keys are sealed in etcd with this key.
            (
                "MESHWIRE_ETCD_ENCRYPTION_KEY",
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".to_owned(),
            ),
        ]
    };
    let spawn = |dir: &tempfile::TempDir| {
        let e = envs(&etcd.urls());
        let dir = dir.path().to_owned();
        async move {
            let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ControlPlaneProcess::spawn_with(&dir, None, &e).await
        }
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = spawn(&da).await;
    let b = spawn(&db).await;
    let mut a = Cp::with(a, da, &["echo"]).await;
    let mut b = Cp::with(b, db, &[]).await;
    let app = App::start("echo-0").await;
    let s = a.sidecar("echo", Some(app.addr), None).await;
    let ep = s.inbound_addr.unwrap();
    api::add_endpoint(&mut a.admin, "echo", ep, 1).await;
    b.wait_health(
        "B sees A's report",
        "echo",
        &all(&[ep], pb::EndpointHealth::Healthy),
    )
    .await;
    app.signal("USR1");
    b.wait_health(
        "B sees it unhealthy",
        "echo",
        &all(&[ep], pb::EndpointHealth::Unhealthy),
    )
    .await;
    app.signal("USR2");
    b.wait_health(
        "and healthy again",
        "echo",
        &all(&[ep], pb::EndpointHealth::Healthy),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_reports_only_for_its_own_registered_endpoints() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(ControlPlaneConfig::local(dir.path()))
        .await
        .unwrap();
    let mut a = admin(cp.local_addr, Some(&format!("Bearer {}", cp.admin_token))).await;
    api::create_service(&mut a, "echo").await;
    api::create_service(&mut a, "caller").await;
    let echo_ep: SocketAddr = "127.0.0.1:7001".parse().unwrap();
    api::add_endpoint(&mut a, "echo", echo_ep, 1).await;

    // A certificate for `caller`, as its sidecar would get one.
    let bundle = cp.ca.bundle().bundle.clone();
    let cp_id = cp
        .ca
        .spiffe_id(
            meshwire_control_plane::ca::CONTROL_PLANE_NAMESPACE,
            meshwire_control_plane::ca::CONTROL_PLANE_SERVICE,
        )
        .unwrap();
    let channel = |creds: Option<Credentials>| {
        let connector =
            meshwire_control_plane::tls::connector(&bundle, creds.as_ref(), Some(&cp_id)).unwrap();
        tonic::transport::Endpoint::from_shared(format!("https://{}", cp.tls_addr.unwrap()))
            .unwrap()
            .connect_with_connector_lazy(connector)
    };
    let (token, _, _) = cp
        .ca
        .create_token("default", "caller", Duration::from_secs(60))
        .unwrap();
    let (key, csr) = meshwire_tls::new_key_and_csr().unwrap();
    let cert = IdentityClient::new(channel(None))
        .issue(ipb::IssueRequest {
            join_token: token,
            csr_pem: csr,
        })
        .await
        .unwrap()
        .into_inner();
    let chain = meshwire_tls::certs_from_pem(&cert.cert_chain_pem).unwrap();
    let creds = Credentials { chain, key };

    let report = |ch: tonic::transport::Channel, service: &str, address: &str| {
        let msg = ipb::HealthReport {
            service: service.into(),
            address: address.into(),
            healthy: false,
        };
        // The stream stays open (a closed one clears its mark).
        let reports = futures_util::stream::iter([msg]).chain(futures_util::stream::pending());
        async move {
            IdentityClient::new(ch)
                .report_health(reports)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    // Another service's endpoint: refused, nothing marked.
    let e = report(channel(Some(creds.clone())), "echo", &echo_ep.to_string())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("ns/default/sa/echo") && e.message().contains("sa/caller"),
        "{e:?}"
    );
    // An address nobody registered: refused, saying how to register it.
    let e = report(channel(Some(creds.clone())), "caller", "127.0.0.1:7002")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message()
            .contains("meshctl endpoint add caller 127.0.0.1:7002"),
        "{e:?}"
    );
    let e = report(channel(Some(creds.clone())), "nope", "127.0.0.1:7002")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // No certificate, no report; and none over the plaintext port.
    let e = report(channel(None), "echo", &echo_ep.to_string())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", cp.local_addr))
        .unwrap()
        .connect_lazy();
    let e = report(plain, "echo", &echo_ep.to_string())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let eps = a
        .list_endpoints(pb::ListEndpointsRequest {
            service: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    assert_eq!(eps[0].health(), pb::EndpointHealth::Unknown, "{eps:?}");

    // Its own endpoint: accepted, and stored.
    let own: SocketAddr = "127.0.0.1:7003".parse().unwrap();
    api::add_endpoint(&mut a, "caller", own, 1).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ipb::HealthReport {
        service: "caller".into(),
        address: own.to_string(),
        healthy: false,
    })
    .await
    .unwrap();
    let mut acks = IdentityClient::new(channel(Some(creds.clone())))
        .report_health(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().expect("an ack");
    assert!(!ack.healthy, "{ack:?}");
    let eps = a
        .list_endpoints(pb::ListEndpointsRequest {
            service: "caller".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    assert_eq!(eps[0].health(), pb::EndpointHealth::Unhealthy, "{eps:?}");
    assert!(eps[0].health_reported_at.is_some(), "{eps:?}");
    // Its sidecar closes the stream (as one does when it stops): the mark goes.
    drop(tx);
    assert!(acks.message().await.unwrap().is_none(), "the stream ends");
    eventually(
        "the closed stream's mark is cleared",
        Duration::from_secs(5),
        || {
            let mut a = a.clone();
            async move {
                let eps = a
                    .list_endpoints(pb::ListEndpointsRequest {
                        service: "caller".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .endpoints;
                eps[0].health() == pb::EndpointHealth::Unknown
            }
        },
    )
    .await;
    cp.stop().await.unwrap();
}
