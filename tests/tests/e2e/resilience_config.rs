//! Resilience settings per service (issue 10 point 7), set through the admin
//! API and `meshctl`, pushed over xDS in Envoy's own fields and applied by
//! real sidecar processes: the caller's circuit breaker, which codes are
//! retried, the per-try timeout, changes under load, invalid values refused,
//! and a stock Envoy getting the same fields.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshwire_proto::admin::v1 as pb;
use meshwire_proto::example::v1::EchoRequest;
use meshwire_tests::bins::MESHCTL;
use meshwire_tests::*;

struct World {
    _data: tempfile::TempDir,
    cp: ControlPlaneProcess,
    admin: Admin,
    servers: Vec<SidecarProcess>,
    client: SidecarProcess,
}

impl World {
    /// The service `echo` with one server sidecar per app (health checks
    /// off, so an app's failures reach the caller), and a client sidecar.
    async fn new(apps: &[SocketAddr]) -> World {
        init_tracing();
        let data = tempfile::tempdir().unwrap();
        let cp = ControlPlaneProcess::spawn(data.path()).await;
        let mut admin = cp.client().await;
        api::create_service(&mut admin, "echo").await;
        let url = cp.url();
        let mut servers = Vec::new();
        for app in apps {
            let app = app.to_string();
            let s = SidecarProcess::spawn(
                &[
                    "--app",
                    &app,
                    "--control-plane",
                    &url,
                    "--service",
                    "echo",
                    "--health",
                    "none",
                ],
                &[],
            )
            .await;
            api::add_endpoint(&mut admin, "echo", s.addrs.inbound.unwrap(), 1).await;
            servers.push(s);
        }
        let client = SidecarProcess::spawn(
            &["--control-plane", url.as_str(), "--service", "caller"],
            &[],
        )
        .await;
        let w = World {
            _data: data,
            cp,
            admin,
            servers,
            client,
        };
        eventually(
            "the client sidecar is ready",
            Duration::from_secs(20),
            || async {
                http1_get(w.client.addrs.admin, "a", "/ready")
                    .await
                    .is_ok_and(|r| r.0 == 200)
            },
        )
        .await;
        w
    }

    /// `meshctl service update echo ARGS...`, then waits until the client
    /// sidecar runs that version of the clusters.
    async fn update(&self, args: &[&str]) {
        let out = std::process::Command::new(MESHCTL)
            .args(["--server", &self.cp.url(), "--token", &self.cp.token])
            .args(["--output", "json", "service", "update", "echo"])
            .args(args)
            .output()
            .expect("run meshctl");
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("meshctl JSON");
        let version = v["version"].as_u64().expect("a version");
        config_dump_until(
            self.client.addrs.admin,
            &format!("clusters version {version}"),
            Duration::from_secs(5),
            |d| {
                d["source"]["versions"]["clusters"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok())
                    .or_else(|| d["source"]["versions"]["clusters"].as_u64())
                    .is_some_and(|v| v >= version)
            },
        )
        .await;
    }
}

/// `n` calls at once through `client`, each held `hold` by the app; how
/// many succeeded and the failures' (code, meshwire-error).
async fn burst(
    client: SocketAddr,
    n: usize,
    hold: Duration,
) -> (usize, Vec<(tonic::Code, String)>) {
    let echo = echo_client(client, "echo").await;
    let calls = (0..n).map(|_| {
        let mut echo = echo.clone();
        async move {
            echo.echo(EchoRequest {
                delay_ms: hold.as_millis() as u32,
                ..Default::default()
            })
            .await
        }
    });
    let mut ok = 0;
    let mut failed = Vec::new();
    for r in futures_util::future::join_all(calls).await {
        match r {
            Ok(_) => ok += 1,
            Err(st) => failed.push((
                st.code(),
                st.metadata()
                    .get("meshwire-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
            )),
        }
    }
    (ok, failed)
}

/// `n` calls one after another (2 s deadline each); the failures' codes.
async fn sequential(client: SocketAddr, n: usize) -> Vec<tonic::Code> {
    let mut echo = echo_client(client, "echo").await;
    let mut failed = Vec::new();
    for _ in 0..n {
        let mut req = tonic::Request::new(EchoRequest::default());
        req.set_timeout(Duration::from_secs(2));
        if let Err(st) = echo.echo(req).await {
            failed.push(st.code());
        }
    }
    failed
}

/// An h2 "app" answering every call with `status` in its response headers
/// (trailers-only), or, with `status` `None`, never answering at all.
/// Returns its address and how many calls it got.
async fn scripted_app(status: Option<&'static str>) -> (SocketAddr, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut hung = Vec::new();
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    counter.fetch_add(1, Ordering::Relaxed);
                    match status {
                        Some(code) => {
                            let head = http::Response::builder()
                                .header("content-type", "application/grpc")
                                .header("grpc-status", code)
                                .header("grpc-message", "scripted failure")
                                .body(())
                                .unwrap();
                            let _ = respond.send_response(head, true);
                        }
                        // Held open, never answered.
                        None => hung.push(respond),
                    }
                }
            });
        }
    });
    (addr, calls)
}

/// An h2 "app" that fails every other call with UNAVAILABLE (trailers-only)
/// and answers the others properly: never two failures in a row.
async fn alternating_app() -> (SocketAddr, Arc<AtomicU64>) {
    use prost::Message;
    let l = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let reply = meshwire_proto::example::v1::EchoReply {
        server: "flaky".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(reply.len() as u32).to_be_bytes());
    frame.extend_from_slice(&reply);
    let frame = bytes::Bytes::from(frame);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (counter, frame) = (counter.clone(), frame.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let head = http::Response::builder().header("content-type", "application/grpc");
                    if n % 2 == 0 {
                        let head = head.header("grpc-status", "14").body(()).unwrap();
                        let _ = respond.send_response(head, true);
                        continue;
                    }
                    let Ok(mut body) = respond.send_response(head.body(()).unwrap(), false) else {
                        continue;
                    };
                    let _ = body.send_data(frame.clone(), false);
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = body.send_trailers(trailers);
                }
            });
        }
    });
    (addr, calls)
}

/// The ejections `/clusters` on `admin` shows for the endpoint at `addr`.
async fn ejections(admin: SocketAddr, addr: SocketAddr) -> u64 {
    let v = admin_json(admin, "/clusters").await;
    v["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == addr.to_string())
        .and_then(|e| e["ejections"].as_u64())
        .unwrap_or(0)
}

/// An endpoint failing every other call never fails 5 in a row, so
/// consecutive-failure detection leaves it in, taking its full share. With
/// failure-percentage ejection set to 40 % of 10+ calls a second (five
/// endpoints judged, the default), the sweep ejects it and it gets no call
/// while it is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_every_other_call_is_ejected_by_its_failure_percentage() {
    let mut apps = Vec::new();
    for i in 0..4 {
        apps.push(echo(&format!("echo-{i}")).await);
    }
    let (flaky, flaky_calls) = alternating_app().await;
    let mut addrs: Vec<_> = apps.iter().map(|a| a.addr).collect();
    addrs.push(flaky);
    let w = World::new(&addrs).await;
    let flaky_ep = w.servers[4].addrs.inbound.expect("inbound");
    w.update(&["--eject-failing", "0", "--retry-budget", "100%"])
        .await;
    let before = flaky_calls.load(Ordering::Relaxed);
    sequential(w.client.addrs.outbound, 300).await;
    let got = flaky_calls.load(Ordering::Relaxed) - before;
    assert!(got >= 30, "a full share without the mode: {got} of 300");
    assert_eq!(
        ejections(w.client.addrs.admin, flaky_ep).await,
        0,
        "never five failures in a row"
    );

    w.update(&[
        "--eject-failing",
        "40%",
        "--eject-failing-min-calls",
        "10",
        "--eject-failing-interval",
        "1s",
        "--ejection-time",
        "30s",
    ])
    .await;
    eventually(
        "the flaky endpoint is ejected for its failure percentage",
        Duration::from_secs(20),
        || {
            let w = &w;
            async move {
                sequential(w.client.addrs.outbound, 100).await;
                ejections(w.client.addrs.admin, flaky_ep).await >= 1
            }
        },
    )
    .await;
    // Out for its 30 s ejection: not a call.
    let before = flaky_calls.load(Ordering::Relaxed);
    sequential(w.client.addrs.outbound, 300).await;
    assert_eq!(flaky_calls.load(Ordering::Relaxed) - before, 0);
}

/// `meshctl service update echo --max-requests 4`: the caller's circuit
/// breaker goes from its flag's 1024 to 4 — of 12 calls at once exactly 4
/// are answered and 8 shed at once (UNAVAILABLE, `meshwire-error:
/// overloaded`); `--max-requests default` gives the flag's limit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_set_with_meshctl_changes_the_callers_limit() {
    let app = echo("echo-0").await;
    let w = World::new(&[app.addr]).await;
    let hold = Duration::from_millis(1000);
    let (ok, failed) = burst(w.client.addrs.outbound, 12, hold).await;
    assert_eq!((ok, failed.len()), (12, 0), "default limit: {failed:?}");

    w.update(&["--max-requests", "4"]).await;
    let before = app.stats.calls.load(Ordering::Relaxed);
    let (ok, failed) = burst(w.client.addrs.outbound, 12, hold).await;
    assert_eq!(ok, 4, "{failed:?}");
    assert_eq!(failed.len(), 8);
    for (code, kind) in &failed {
        assert_eq!(
            (*code, kind.as_str()),
            (tonic::Code::Unavailable, "overloaded")
        );
    }
    assert_eq!(app.stats.calls.load(Ordering::Relaxed) - before, 4);

    w.update(&["--max-requests", "default"]).await;
    let (ok, failed) = burst(w.client.addrs.outbound, 12, hold).await;
    assert_eq!((ok, failed.len()), (12, 0), "back to the flag: {failed:?}");
}

/// `--max-requests-per-endpoint 2` over two endpoints: of 6 calls at once,
/// held by the apps, exactly 2 reach each app (a full endpoint sends the call
/// to the other; the count is exact, not approximate) and the other 2 are shed
/// at once as overloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_endpoint_holds_exactly_and_sends_the_rest_elsewhere() {
    let apps = [echo("echo-0").await, echo("echo-1").await];
    let w = World::new(&[apps[0].addr, apps[1].addr]).await;
    w.update(&["--max-requests-per-endpoint", "2"]).await;
    let before: Vec<u64> = apps
        .iter()
        .map(|a| a.stats.calls.load(Ordering::Relaxed))
        .collect();
    let (ok, failed) = burst(w.client.addrs.outbound, 6, Duration::from_millis(1000)).await;
    assert_eq!((ok, failed.len()), (4, 2), "{failed:?}");
    for (code, kind) in &failed {
        assert_eq!(
            (*code, kind.as_str()),
            (tonic::Code::Unavailable, "overloaded")
        );
    }
    for (a, b) in apps.iter().zip(&before) {
        assert_eq!(
            a.stats.calls.load(Ordering::Relaxed) - b,
            2,
            "each endpoint took 2"
        );
    }
    w.update(&["--max-requests-per-endpoint", "default"]).await;
    let (ok, failed) = burst(w.client.addrs.outbound, 6, Duration::from_millis(300)).await;
    assert_eq!((ok, failed.len()), (6, 0), "no limit again: {failed:?}");
}

/// `meshctl service update echo --slow-start 6s` while the client sidecar's
/// own `--slow-start` is off: an endpoint added under load starts with well
/// under the half least-request would give it (nothing in flight there) and
/// takes its share once the window is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_set_for_the_service_ramps_a_new_endpoint_up() {
    let (a, b) = (echo("echo-0").await, echo("echo-1").await);
    let mut w = World::new(&[a.addr]).await;
    w.update(&["--slow-start", "6s"]).await;
    let channel = meshwire_examples::load::channel(&w.client.addrs.outbound.to_string(), "echo")
        .expect("channel");
    let load = meshwire_examples::load::Load::start(
        channel,
        &meshwire_examples::load::LoadConfig {
            concurrency: 16,
            timeout: Duration::from_secs(2),
            ..Default::default()
        },
    );
    next_calls(&load, 500).await;
    let b_sidecar = SidecarProcess::spawn(
        &[
            "--app",
            &b.addr.to_string(),
            "--control-plane",
            &w.cp.url(),
            "--service",
            "echo",
            "--health",
            "none",
        ],
        &[],
    )
    .await;
    api::add_endpoint(&mut w.admin, "echo", b_sidecar.addrs.inbound.unwrap(), 1).await;
    eventually(
        "the client sidecar has the new endpoint",
        Duration::from_secs(5),
        || async {
            admin_json(w.client.addrs.admin, "/clusters").await["clusters"][0]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 2)
        },
    )
    .await;
    let share = |t: &Tally| t.ok.get("echo-1").copied().unwrap_or(0) as f64 / t.calls() as f64;
    let early = next_calls(&load, 300).await;
    assert_eq!(early.failures(), 0, "{early:?}");
    assert!(
        share(&early) < 0.3,
        "the new endpoint took {:.0} % of the first calls: {early:?}",
        share(&early) * 100.0
    );
    eventually(
        "the new endpoint takes its share",
        Duration::from_secs(20),
        || {
            let load = &load;
            async move {
                let t = next_calls(load, 1000).await;
                assert_eq!(t.failures(), 0, "{t:?}");
                share(&t) > 0.4
            }
        },
    )
    .await;
    load.stop().await;
}

/// An endpoint failing every call with INTERNAL beside a good one (outlier
/// detection off, budget 100 %, so only the retry policy decides): by
/// default INTERNAL is not retried (about half the calls fail with it);
/// after `--retry-on unavailable,internal` no call fails, and the bad
/// endpoint still gets calls (they are retried on the good one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_decides_which_codes_are_retried() {
    let good = echo("echo-0").await;
    let (bad, bad_calls) = scripted_app(Some("13")).await;
    let w = World::new(&[good.addr, bad]).await;
    w.update(&["--eject-after", "0", "--retry-budget", "100%"])
        .await;

    let failed = sequential(w.client.addrs.outbound, 200).await;
    assert!(
        (20..=180).contains(&failed.len()),
        "INTERNAL not retried by default: {} failed",
        failed.len()
    );
    assert!(
        failed.iter().all(|c| *c == tonic::Code::Internal),
        "{failed:?}"
    );

    w.update(&["--retry-on", "unavailable,internal"]).await;
    let before = bad_calls.load(Ordering::Relaxed);
    let failed = sequential(w.client.addrs.outbound, 200).await;
    assert_eq!(failed, [], "retried on the good endpoint");
    assert!(
        bad_calls.load(Ordering::Relaxed) - before >= 20,
        "the bad endpoint still got its share"
    );

    // One attempt only: nothing is retried, whatever the codes.
    w.update(&["--retry-attempts", "1"]).await;
    let failed = sequential(w.client.addrs.outbound, 100).await;
    assert!(!failed.is_empty(), "no retries with --retry-attempts 1");
}

/// One endpoint that never answers beside a good one: with
/// `--per-try-timeout 200ms` each call that lands on the hung one is cut
/// after 200 ms and retried on the good one, well within the call's 2 s
/// deadline: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_takes_calls_off_a_hung_endpoint() {
    let good = echo("echo-0").await;
    let (hung, hung_calls) = scripted_app(None).await;
    let w = World::new(&[good.addr, hung]).await;
    w.update(&[
        "--per-try-timeout",
        "200ms",
        "--eject-after",
        "0",
        "--retry-budget",
        "100%",
    ])
    .await;
    let started = std::time::Instant::now();
    let failed = sequential(w.client.addrs.outbound, 40).await;
    assert_eq!(failed, [], "every call answered by the good endpoint");
    let hung_got = hung_calls.load(Ordering::Relaxed);
    assert!(hung_got >= 5, "the hung endpoint got {hung_got} calls");
    // Each of those cost one per-try timeout, not a whole deadline.
    assert!(
        started.elapsed() < Duration::from_millis(200) * (hung_got as u32) + Duration::from_secs(5),
        "{:?} for {hung_got} timed-out tries",
        started.elapsed()
    );
}

/// Settings changed while 4 callers keep calling: no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_resilience_settings_under_load_fails_no_call() {
    let a = echo("echo-0").await;
    let b = echo("echo-1").await;
    let w = World::new(&[a.addr, b.addr]).await;
    let client = echo_client(w.client.addrs.outbound, "echo").await;
    let load = Load::start(&client, 4);
    for args in [
        &[
            "--retry-attempts",
            "3",
            "--retry-on",
            "unavailable,internal",
        ][..],
        &["--max-requests", "100", "--eject-after", "3"],
        &[
            "--slow-start",
            "1s",
            "--ejection-time",
            "2s",
            "--max-ejection",
            "30%",
        ],
        &[
            "--per-try-timeout",
            "1s",
            "--max-requests-per-endpoint",
            "50",
        ],
        &["--retry-attempts", "default", "--max-requests", "default"],
    ] {
        w.update(args).await;
        // Calls run under each setting: at least 25 more answered.
        let answered =
            || a.stats.calls.load(Ordering::Relaxed) + b.stats.calls.load(Ordering::Relaxed);
        let before = answered();
        eventually(
            "calls under the new setting",
            Duration::from_secs(30),
            || {
                let now = answered();
                async move { now >= before + 25 }
            },
        )
        .await;
    }
    let (counts, failed) = load.finish().await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(counts.values().sum::<u64>() > 100, "{counts:?}");
}

/// Invalid values are refused by the API with the field named, and nothing
/// is committed; `meshctl` says so and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resilience_settings_are_refused_with_the_field() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut admin = cp.client().await;
    api::create_service(&mut admin, "echo").await;
    let before = admin
        .get_service(pb::GetServiceRequest {
            name: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let e = admin
        .update_service(pb::UpdateServiceRequest {
            service: Some(pb::Service {
                name: "echo".into(),
                retry: Some(pb::RetryPolicy {
                    max_attempts: Some(9),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["retry.max_attempts".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.message(), "service.retry.max_attempts: must be 1..=5");
    let e = admin
        .create_service(pb::CreateServiceRequest {
            service: Some(pb::Service {
                name: "other".into(),
                outlier: Some(pb::OutlierDetection {
                    failure_codes: vec!["not-found".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().starts_with("service.outlier.failure_codes: "),
        "{}",
        e.message()
    );
    let after = admin
        .get_service(pb::GetServiceRequest {
            name: "echo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.version, before.version, "nothing committed");
    assert_eq!(after.service, before.service);

    let out = std::process::Command::new(MESHCTL)
        .args(["--server", &cp.url(), "--token", &cp.token])
        .args(["service", "update", "echo", "--max-ejection", "150%"])
        .output()
        .expect("run meshctl");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outlier.max_ejection_percent"), "{err}");

    // What was set shows in `meshctl service get`, table and JSON.
    let ok = std::process::Command::new(MESHCTL)
        .args(["--server", &cp.url(), "--token", &cp.token])
        .args(["service", "update", "echo", "--max-requests", "500"])
        .args(["--retry-attempts", "3", "--per-try-timeout", "200ms"])
        .output()
        .expect("run meshctl");
    assert!(ok.status.success(), "{ok:?}");
    let get = |json: bool| {
        let mut c = std::process::Command::new(MESHCTL);
        c.args(["--server", &cp.url(), "--token", &cp.token]);
        if json {
            c.args(["--output", "json"]);
        }
        let out = c.args(["service", "get", "echo"]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = get(false);
    assert!(table.contains("500 per service"), "{table}");
    assert!(
        table.contains("3 attempts on unavailable, per try 200ms"),
        "{table}"
    );
    let v: serde_json::Value = serde_json::from_str(&get(true)).unwrap();
    assert_eq!(v["circuit_breakers"]["max_requests"], 500);
    assert_eq!(v["retry"]["max_attempts"], 3);
    assert_eq!(v["retry"]["per_try_timeout"], "200ms");
}

/// A stock Envoy fed by our control plane gets the same settings in its own
/// fields: `/config_dump` shows the cluster's outlier detection and circuit
/// breakers and the route's retry policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_envoy_gets_the_settings_in_its_own_fields() {
    let a = echo("a").await;
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let mut admin = cp.client().await;
    api::create_service(&mut admin, "echo").await;
    api::add_endpoint(&mut admin, "echo", a.addr, 1).await;
    let out = std::process::Command::new(MESHCTL)
        .args(["--server", &cp.url(), "--token", &cp.token])
        .args(["service", "update", "echo", "--max-requests", "7"])
        .args([
            "--retry-attempts",
            "3",
            "--retry-on",
            "unavailable,internal",
        ])
        .args(["--per-try-timeout", "300ms", "--eject-after", "4"])
        .args(["--ejection-time", "2s", "--max-ejection", "40%"])
        .output()
        .expect("run meshctl");
    assert!(out.status.success(), "{out:?}");
    let envoy = EnvoyProcess::start(cp.addr, "envoy-resilience", false).await;
    let target = envoy.listener().await;
    let dump = || async {
        let (_, _, body) = http1_get(envoy.admin, "envoy", "/config_dump")
            .await
            .expect("Envoy's /config_dump");
        String::from_utf8_lossy(&body).into_owned()
    };
    eventually(
        "Envoy has the cluster's resilience settings",
        Duration::from_secs(10),
        || async {
            let text = dump().await;
            text.contains("outlier_detection") && text.contains("retry_policy")
        },
    )
    .await;
    let dump = dump().await;
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let cluster = find_key(&v, "outlier_detection").expect("a cluster with outlier_detection");
    assert_eq!(cluster["consecutive_5xx"], 4, "{cluster}");
    assert_eq!(cluster["base_ejection_time"], "2s", "{cluster}");
    assert_eq!(cluster["max_ejection_percent"], 40, "{cluster}");
    let cb = find_key(&v, "circuit_breakers").expect("circuit_breakers");
    assert_eq!(cb["thresholds"][0]["max_requests"], 7, "{cb}");
    let rp = find_key(&v, "retry_policy").expect("retry_policy");
    assert_eq!(rp["retry_on"], "internal,unavailable", "{rp}");
    assert_eq!(rp["num_retries"], 2, "{rp}");
    assert_eq!(rp["per_try_timeout"], "0.300s", "{rp}");
    // And Envoy still serves calls with them.
    let mut echo = echo_client(target, "echo").await;
    echo.echo(EchoRequest::default())
        .await
        .expect("a call through Envoy");
}

/// The first value under `key` anywhere in `v`.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}
