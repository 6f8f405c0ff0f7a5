//! Service protocols (`grpc`, `http`, `tcp`) end to end: set with `meshctl`
//! on a real control plane and carried over xDS to sidecars and to Envoy-style
//! consumers; REST apps over HTTP/1.1 (Python's `http.server`, `curl`); TCP
//! services (a real mosquitto broker with `mosquitto_pub`/`mosquitto_sub`, a
//! server-first service) through client and server sidecars over mTLS.

#![allow(clippy::print_stderr)] // the measured RSS of the 1 GiB upload

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use meshwire_mesh::{Cluster, Endpoint, Protocol};
use meshwire_sidecar::identity::MeshTls;
use meshwire_sidecar::{ControlPlaneConfig, IdentitySource, Sidecar, SidecarConfig};
use meshwire_tests::*;
use meshwire_tls::testing::TestCa;
use prost::Message;

use meshwire_tests::bins::MESHCTL;
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

use meshwire_tests::CommandOut as Out;

async fn meshctl(cp: &ControlPlaneProcess, data: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(MESHCTL);
    cmd.args(["--server", &cp.url(), "--data-dir"])
        .arg(data)
        .args(args)
        .env_remove("MESHWIRE_ADMIN_TOKEN")
        .env_remove("MESHCTL_SERVER")
        .stdin(Stdio::null());
    run_command(cmd).await
}

#[track_caller]
fn ok(out: &Out) -> serde_json::Value {
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// The listeners a wildcard LDS request gets for a node offering `ports`.
async fn envoy_listeners(cp: &ControlPlaneProcess, ports: &[(&str, u32)]) -> Vec<Listener> {
    let mut ads = AggregatedDiscoveryServiceClient::connect(cp.url())
        .await
        .unwrap();
    let ports = Struct {
        fields: ports
            .iter()
            .map(|(s, p)| {
                (
                    (*s).to_owned(),
                    Value {
                        kind: Some(value::Kind::NumberValue(f64::from(*p))),
                    },
                )
            })
            .collect(),
    };
    let node = Node {
        id: "envoy-1".into(),
        cluster: "edge".into(),
        metadata: Some(Struct {
            fields: [(
                meshwire_xds::resources::NODE_SERVICE_PORTS.to_owned(),
                Value {
                    kind: Some(value::Kind::StructValue(ports)),
                },
            )]
            .into_iter()
            .collect(),
        }),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(node),
        type_url: LDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), responses.message())
        .await
        .expect("an LDS response")
        .unwrap()
        .expect("stream open");
    first
        .resources
        .iter()
        .map(|a| Listener::decode(a.value.as_slice()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_protocol_goes_from_meshctl_over_xds() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let d = data.path();

    ok(&meshctl(&cp, d, &["service", "create", "web", "--protocol", "http"]).await);
    ok(&meshctl(&cp, d, &["service", "create", "mqtt", "--protocol", "tcp"]).await);
    ok(&meshctl(&cp, d, &["service", "create", "greeter"]).await);
    let get = |name: &'static str| {
        let (cp, d) = (&cp, d);
        async move { ok(&meshctl(cp, d, &["--output", "json", "service", "get", name]).await) }
    };
    assert_eq!(get("web").await["protocol"], "http");
    assert_eq!(get("mqtt").await["protocol"], "tcp");
    assert_eq!(get("greeter").await["protocol"], "grpc", "the default");

    // A bad value names the flag and the choices; nothing changes.
    let bad = meshctl(&cp, d, &["service", "update", "web", "--protocol", "udp"]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(
        bad.stderr.contains("--protocol") && bad.stderr.contains("tcp"),
        "{bad:?}"
    );
    assert_eq!(get("web").await["protocol"], "http");

    // The table has the column.
    let list = meshctl(&cp, d, &["service", "list"]).await;
    let header = list.stdout.lines().next().unwrap();
    assert!(header.contains("PROTOCOL"), "{}", list.stdout);
    let mqtt_row = list.stdout.lines().find(|l| l.starts_with("mqtt")).unwrap();
    assert!(
        mqtt_row.split_whitespace().nth(1) == Some("tcp"),
        "{mqtt_row}"
    );

    // A sidecar gets it over xDS.
    init_tracing();
    let mut cfg = SidecarConfig::local();
    cfg.control_plane = Some(ControlPlaneConfig {
        server: cp.url(),
        service: "edge".into(),
        node_id: "edge-1".into(),
    });
    let sc = Sidecar::start(cfg).await.unwrap();
    let protocol_of = |v: &serde_json::Value, name: &str| -> Option<String> {
        v["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["protocol"].as_str().map(str::to_owned))
    };
    config_dump_until(sc.admin_addr, "mqtt is tcp", Duration::from_secs(10), |v| {
        protocol_of(v, "mqtt").as_deref() == Some("tcp")
    })
    .await;
    ok(&meshctl(&cp, d, &["service", "update", "mqtt", "--protocol", "http"]).await);
    let dump = config_dump_until(
        sc.admin_addr,
        "mqtt is http",
        Duration::from_secs(10),
        |v| protocol_of(v, "mqtt").as_deref() == Some("http"),
    )
    .await;
    assert_eq!(protocol_of(&dump, "web").as_deref(), Some("http"));
    assert_eq!(protocol_of(&dump, "greeter").as_deref(), Some("grpc"));
    ok(&meshctl(&cp, d, &["service", "update", "mqtt", "--protocol", "tcp"]).await);
    config_dump_until(
        sc.admin_addr,
        "mqtt is tcp again",
        Duration::from_secs(10),
        |v| protocol_of(v, "mqtt").as_deref() == Some("tcp"),
    )
    .await;

    // Envoy consumers: a tcp_proxy listener for the tcp service they name,
    // the shared HTTP listener for the rest.
    let listeners = envoy_listeners(&cp, &[("mqtt", 0), ("web", 0)]).await;
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert!(names.contains(&"meshwire_outbound"), "{names:?}");
    assert!(names.contains(&"meshwire_tcp_mqtt"), "{names:?}");
    assert!(
        !names.contains(&"meshwire_tcp_web"),
        "web is http, not tcp: {names:?}"
    );
    let tcp = listeners
        .iter()
        .find(|l| l.name == "meshwire_tcp_mqtt")
        .unwrap();
    assert_eq!(
        tcp.filter_chains[0].filters[0].name,
        "envoy.filters.network.tcp_proxy"
    );
    sc.shutdown();
}

// === a mesh pair over mTLS ===

fn spiffe(service: &str) -> String {
    format!("spiffe://test.local/ns/default/sa/{service}")
}

fn identity_of(ca: &TestCa, service: &str) -> IdentitySource {
    IdentitySource::Fixed(MeshTls::fixed(ca.leaf(&spiffe(service)), ca.bundle()).unwrap())
}

/// A server sidecar of `local` (its own cluster: protocol, policy) in front
/// of `app`, and a client sidecar of `caller` that reaches it; `listen`
/// gives the client a per-service port for the service.
struct Pair {
    server: Sidecar,
    client: Sidecar,
}

impl Pair {
    async fn start(
        ca: &TestCa,
        local: Cluster,
        app: SocketAddr,
        caller: &str,
        listen: bool,
    ) -> Pair {
        init_tracing();
        let mut cfg = SidecarConfig::local();
        cfg.app = Some(app);
        cfg.inbound = Some(localhost());
        cfg.identity = Some(identity_of(ca, &local.name));
        cfg.service = Some(local.name.clone());
        cfg.clusters = vec![local.clone()];
        let server = Sidecar::start(cfg).await.unwrap();
        let client =
            Self::client(ca, &local, &[server.inbound_addr.unwrap()], caller, listen).await;
        Pair { server, client }
    }

    async fn client(
        ca: &TestCa,
        local: &Cluster,
        inbounds: &[SocketAddr],
        caller: &str,
        listen: bool,
    ) -> Sidecar {
        let mut cfg = SidecarConfig::local();
        let mut c = local.clone();
        c.policy = None;
        c.endpoints = inbounds
            .iter()
            .map(|a| {
                let mut ep = Endpoint::new(*a);
                ep.identity = Some(spiffe(&local.name));
                ep
            })
            .collect();
        cfg.clusters = vec![c];
        if listen {
            cfg.service_listeners = vec![(localhost(), local.name.clone())];
        }
        cfg.identity = Some(identity_of(ca, caller));
        Sidecar::start(cfg).await.unwrap()
    }

    fn port(&self) -> SocketAddr {
        self.client.service_addrs[0].1
    }
}

/// A sidecar process with a fixed certificate for `service` (PEM files in
/// its own directory), `yaml` as its static config.
async fn sidecar_process(ca: &TestCa, service: &str, yaml: &str, extra: &[&str]) -> SidecarProcess {
    let dir = tempfile::tempdir().unwrap();
    let creds = ca.leaf(&spiffe(service));
    let pem = |tag: &str, der: &[u8]| pem::encode(&pem::Pem::new(tag, der.to_vec()));
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&cert, pem("CERTIFICATE", &creds.chain[0])).unwrap();
    std::fs::write(&key, pem("PRIVATE KEY", creds.key.secret_der())).unwrap();
    std::fs::write(&bundle, pem("CERTIFICATE", ca.root())).unwrap();
    let config = SidecarProcess::write_config(dir.path(), yaml);
    let mut args = vec![
        "--cert".to_owned(),
        cert.to_str().unwrap().to_owned(),
        "--key".to_owned(),
        key.to_str().unwrap().to_owned(),
        "--trust-bundle".to_owned(),
        bundle.to_str().unwrap().to_owned(),
        "--static-config".to_owned(),
        config.to_str().unwrap().to_owned(),
        "--service".to_owned(),
        service.to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = SidecarProcess::spawn(&args, &[]).await;
    std::mem::forget(dir);
    p
}

/// A process's peak resident set (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}

fn service(name: &str, protocol: Protocol) -> Cluster {
    Cluster {
        protocol,
        ..Cluster::new(name)
    }
}

// === HTTP/1.1 apps ===

/// The REST app (Python's http.server) on a free port.
struct RestApp {
    child: std::process::Child,
    addr: SocketAddr,
}

impl RestApp {
    fn start() -> RestApp {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/rest_app.py");
        let mut child = Command::new(venv_python())
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the REST app");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the app prints its port");
        RestApp {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for RestApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs curl (a real HTTP/1.1 client) and returns (exit code, stdout, stderr).
async fn curl(args: Vec<String>) -> (i32, Vec<u8>, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "300"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        (
            out.status.code().unwrap_or(-1),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

fn json_of(b: &[u8]) -> serde_json::Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_app_over_http1_through_the_mtls_pair() {
    let ca = TestCa::new("test.local");
    let app = RestApp::start();
    let pair = Pair::start(&ca, service("web", Protocol::Http), app.addr, "shop", false).await;
    let out = format!("http://{}", pair.client.outbound_addr);

    // A GET: Host is the service, the caller's address is forwarded, app headers kept.
    let (code, body, err) = curl(s(&[
        "-i",
        "-H",
        "Host: web",
        "-H",
        "X-Custom: a b",
        &format!("{out}/hello?q=1"),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("x-app-header: kept"),
        "{text}"
    );
    let v = json_of(text.split("\r\n\r\n").nth(1).unwrap().as_bytes());
    assert_eq!(v["path"], "/hello?q=1");
    assert_eq!(v["version"], "HTTP/1.1", "the app got HTTP/1.1");
    assert_eq!(v["host"], "web");
    assert_eq!(v["x_custom"], "a b");
    assert_eq!(v["x_forwarded_for"], "127.0.0.1");
    assert_eq!(v["forwarded"], "for=127.0.0.1;proto=https");

    // Keep-alive on both sides: five requests on one curl connection, and
    // the app sees pooled connections reused (a connection goes back to the
    // pool just after its response ends, so a request may race it).
    let hello = format!("{out}/hello");
    let mut args = vec!["-v".to_owned()];
    for _ in 0..5 {
        args.extend(s(&["-H", "Host: web", &hello]));
    }
    let (code, body, err) = curl(args).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&body).into_owned();
    let conns: std::collections::BTreeSet<u64> = text
        .split("}{")
        .map(|p| {
            let p = p.trim_start_matches('{').trim_end_matches('}');
            json_of(format!("{{{p}}}").as_bytes())["conn"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        conns.len() < 5,
        "the sidecar reused app connections: {text}"
    );

    // A chunked response arrives whole; HEAD, 204 and 304 have no body.
    let (_, body, _) = curl(s(&["-H", "Host: web", &format!("{out}/chunked")])).await;
    assert_eq!(body, b"one,two,three");
    let (code, body, err) = curl(s(&["-I", "-H", "Host: web", &format!("{out}/hello")])).await;
    assert_eq!(code, 0, "{err}");
    let head = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 200") && head.contains("content-length:"),
        "{head}"
    );
    for (path, status) in [("/empty", "204"), ("/cached", "304")] {
        let (code, body, err) = curl(s(&["-i", "-H", "Host: web", &format!("{out}{path}")])).await;
        assert_eq!(code, 0, "{path}: {err}");
        let t = String::from_utf8_lossy(&body).into_owned();
        assert!(t.starts_with(&format!("HTTP/1.1 {status}")), "{t}");
        assert!(t.ends_with("\r\n\r\n"), "no body after {status}: {t:?}");
    }

    // Connection: close from the app: the next call still works (new connection).
    let (_, b1, _) = curl(s(&["-H", "Host: web", &format!("{out}/close")])).await;
    let (_, b2, _) = curl(s(&["-H", "Host: web", &format!("{out}/hello")])).await;
    assert_ne!(json_of(&b1)["conn"], json_of(&b2)["conn"]);
    // Connection: close from the client is honoured.
    let (code, _, err) = curl(s(&[
        "-v",
        "-H",
        "Host: web",
        "-H",
        "Connection: close",
        &format!("{out}/hello"),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("Connection: close") || err.contains("Closing connection"),
        "{err}"
    );

    // Uploads: Content-Length and chunked, with Expect: 100-continue.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let sha = {
        let out = Command::new("sha256sum").arg(file.path()).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let path = file.path().to_str().unwrap().to_owned();
    let (code, body, err) = curl(s(&[
        "-v",
        "-H",
        "Host: web",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{path}"),
        &format!("{out}/upload"),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    let v = json_of(&body);
    assert_eq!(
        (v["bytes"].as_u64(), v["sha256"].as_str()),
        (Some(3_000_000), Some(sha.as_str()))
    );
    let (code, body, err) = curl(s(&[
        "-H",
        "Host: web",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{path}"),
        &format!("{out}/upload"),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&body)["sha256"], sha.as_str());

    // A 64 MiB download with Content-Length streams through.
    let (code, body, err) = curl(s(&["-H", "Host: web", &format!("{out}/big?n=67108864")])).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body.len(), 64 << 20);

    // The calls were counted on the app endpoint with HTTP outcomes.
    let m = http1_get(pair.server.admin_addr, "admin", "/metrics")
        .await
        .unwrap()
        .2;
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains("meshwire_requests_total{direction=\"inbound\",cluster=\"inbound\"")
            && !m.contains("grpc_code=\"CANCELLED\""),
        "every call to the app finished with its HTTP outcome: {m}"
    );
}

/// HTTP calls are counted by status class on both sidecars, beside the gRPC
/// code they map to (which stays as it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_status_classes_are_counted_on_both_sidecars() {
    let ca = TestCa::new("test.local");
    let app = RestApp::start();
    let pair = Pair::start(&ca, service("web", Protocol::Http), app.addr, "shop", false).await;
    let out = format!("http://{}", pair.client.outbound_addr);
    // Two 503s stay under outlier detection's consecutive-failure threshold.
    for (code, n) in [(200, 5), (404, 3), (503, 2)] {
        for _ in 0..n {
            let (rc, _, err) = curl(s(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Host: web",
                &format!("{out}/status?code={code}"),
            ]))
            .await;
            assert_eq!(rc, 0, "{err}");
        }
    }
    let inbound = pair.server.inbound_addr.unwrap().to_string();
    let app_addr = app.addr.to_string();
    let sides = [
        (&pair.client, "outbound", "web", inbound.as_str()),
        (&pair.server, "inbound", "inbound", app_addr.as_str()),
    ];
    for (sc, direction, cluster, endpoint) in sides {
        let labels = |class: &'static str| {
            [
                ("direction", direction),
                ("cluster", cluster),
                ("endpoint", endpoint),
                ("class", class),
            ]
        };
        // A call is counted when its response body ends, just after curl has it.
        eventually(
            &format!("10 HTTP calls counted on the {direction} side"),
            Duration::from_secs(10),
            || async {
                prom::scrape(sc.admin_addr)
                    .await
                    .sum("meshwire_http_responses_total", &[("direction", direction)])
                    == 10.0
            },
        )
        .await;
        let m = prom::scrape(sc.admin_addr).await;
        for (class, n) in [("2xx", 5.0), ("4xx", 3.0), ("5xx", 2.0)] {
            assert_eq!(
                m.one("meshwire_http_responses_total", &labels(class)),
                n,
                "{direction} {class}:\n{}",
                m.text
            );
        }
        for class in ["1xx", "3xx"] {
            assert_eq!(
                m.sum("meshwire_http_responses_total", &labels(class)),
                0.0,
                "{}",
                m.text
            );
        }
        // The gRPC-code accounting is unchanged: 2xx and 4xx are OK, 503 UNAVAILABLE.
        let code = |c: &'static str| {
            m.sum(
                "meshwire_requests_total",
                &[("direction", direction), ("grpc_code", c)],
            )
        };
        assert_eq!(code("OK"), 8.0, "{}", m.text);
        assert_eq!(code("UNAVAILABLE"), 2.0, "{}", m.text);
    }
    // `/clusters` shows the classes per endpoint, the app's included.
    let v = admin_json(pair.client.admin_addr, "/clusters").await;
    let ep = v["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == inbound.as_str())
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(
        ep["http_responses"],
        serde_json::json!({"2xx": 5, "4xx": 3, "5xx": 2}),
        "{v}"
    );
    let v = admin_json(pair.server.admin_addr, "/clusters").await;
    assert_eq!(
        v["app"]["http_responses"],
        serde_json::json!({"2xx": 5, "4xx": 3, "5xx": 2}),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_upload_streams_with_bounded_memory() {
    let ca = TestCa::new("test.local");
    let app = RestApp::start();
    let app_addr = app.addr.to_string();
    let server = sidecar_process(
        &ca,
        "web",
        "services:\n  - name: web\n    protocol: http\n",
        &["--app", &app_addr],
    )
    .await;
    let inbound = server.addrs.inbound.unwrap();
    let client = sidecar_process(
        &ca,
        "shop",
        &format!(
            "services:\n  - name: web\n    protocol: http\n    endpoints:\n      - address: {inbound}\n        identity: {}\n",
            spiffe("web")
        ),
        &[],
    )
    .await;
    let url = format!("http://{}/upload", client.addrs.outbound);
    // 1 GiB of zeros, chunked from curl's stdin, never on disk.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c 1073741824 /dev/zero | curl -sS --max-time 600 -H 'Host: web' -T - {url}"
            ))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out.stdout);
    assert_eq!(v["bytes"], 1u64 << 30);
    // sha256 of 1 GiB of zeros.
    assert_eq!(
        v["sha256"],
        "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"
    );
    let (c, s) = (peak_rss_mib(client.id()), peak_rss_mib(server.id()));
    eprintln!(
        "1 GiB upload through the mTLS pair: peak RSS client sidecar {c} MiB, server sidecar {s} MiB"
    );
    // A buffered body would need ≥ 1024 MiB.
    assert!(c < 64 && s < 64, "peak RSS client {c} MiB, server {s} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http1_input_gets_a_clear_answer() {
    let ca = TestCa::new("test.local");
    let app = RestApp::start();
    let pair = Pair::start(&ca, service("web", Protocol::Http), app.addr, "shop", false).await;
    let out = pair.client.outbound_addr;
    let ask =
        |raw: Vec<u8>| async move { raw_tcp_exchange(out, &raw, Duration::from_secs(10)).await };
    let r = ask(b"GARBAGE\r\n\r\n".to_vec()).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // Content-Length beside Transfer-Encoding: hyper drops the length and
    // reads chunked (RFC 9112 §6.3), so what is forwarded is unambiguous:
    // the app gets a chunked body, never the length ...
    let r = ask(b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()).await;
    // ... and it closes that connection after the answer, so no request can
    // hide behind the ambiguous one.
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("connection: close"),
        "{r}"
    );
    let r = ask(b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec()).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let mut big = b"GET /hello HTTP/1.1\r\nHost: web\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    big.extend(b"\r\n\r\n");
    let r = ask(big).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // A WebSocket upgrade to a grpc service: a clear error.
    let r = ask(b"GET /chat HTTP/1.1\r\nHost: greeter\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec()).await;
    assert!(
        r.contains("unknown-service") || r.contains("grpc service"),
        "{r}"
    );
    // Still serving.
    let (code, body, err) = curl(s(&["-H", "Host: web", &format!("http://{out}/hello")])).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&body)["host"], "web");
}

/// An HTTP/1.1 app whose response head is fine and whose chunked body is
/// not: the caller's response is cut (too late for a status); the app's sidecar counts the call as INTERNAL
/// (the app broke HTTP), not as unreachable, and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_response_body_from_the_app_counts_as_internal() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A hand-made bad peer: no real server sends this on purpose.
    let bad = tokio::net::TcpListener::bind(localhost()).await.unwrap();
    let app = bad.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = bad.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\nxx\r\n")
                    .await;
                let _ = tcp.read(&mut buf).await;
            });
        }
    });
    let ca = TestCa::new("test.local");
    let pair = Pair::start(&ca, service("web", Protocol::Http), app, "shop", false).await;
    let out = format!("http://{}", pair.client.outbound_addr);
    let (code, _, err) = curl(s(&["-H", "Host: web", &format!("{out}/hello")])).await;
    assert_ne!(code, 0, "the cut body is not a complete response: {err}");
    let internal = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("meshwire_requests_total{direction=\"inbound\"")
                && l.contains("grpc_code=\"INTERNAL\"")
        })
    };
    let admin = pair.server.admin_addr;
    eventually(
        "the inbound counted INTERNAL",
        Duration::from_secs(5),
        || async move {
            let (_, _, body) = http1_get(admin, "admin", "/metrics")
                .await
                .expect("metrics");
            internal(&String::from_utf8_lossy(&body))
        },
    )
    .await;
    let (status, _, _) = http1_get(admin, "admin", "/ready").await.expect("ready");
    assert_eq!(status, 200, "the sidecar keeps serving");
}

// === TCP services ===

/// A real mosquitto broker on a free loopback port, with a generated config.
struct Mosquitto {
    child: std::process::Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    async fn start(port: Option<u16>) -> Mosquitto {
        let port = match port {
            Some(p) => p,
            None => std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\nlog_dest stderr\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        eventually(
            "mosquitto listens",
            Duration::from_secs(10),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await;
        Mosquitto { child, addr, dir }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = &self.dir;
    }
}

/// `mosquitto_sub` through `port`: prints each message on its own line.
fn mqtt_sub(port: SocketAddr, topic: &str, id: &str, count: Option<usize>) -> std::process::Child {
    // Line-buffered: its debug lines (SUBACK) must arrive as they happen.
    let mut cmd = Command::new("stdbuf");
    cmd.args([
        "-oL",
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        &port.port().to_string(),
        "-t",
        topic,
        "-q",
        "1",
        "-i",
        id,
        "-d",
    ]);
    if let Some(n) = count {
        cmd.args(["-C", &n.to_string()]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto_sub")
}

/// Reads `child`'s stdout lines on a thread, into a channel.
fn lines(child: &mut std::process::Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

async fn next_line(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    want: impl Fn(&str) -> bool,
    what: &str,
) -> String {
    let wait = async {
        while let Some(l) = rx.recv().await {
            if want(&l) {
                return l;
            }
        }
        panic!("{what}: output ended");
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within 30s"))
}

async fn mqtt_pub(port: SocketAddr, topic: &str, lines: String) -> std::process::Output {
    let port = port.port().to_string();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut c = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                &topic,
                "-q",
                "1",
                "-l",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

fn metric(text: &str, name: &str, direction: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{direction=\"{direction}\"}}")))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn metrics(sc: &Sidecar) -> String {
    let b = http1_get(sc.admin_addr, "admin", "/metrics")
        .await
        .unwrap()
        .2;
    String::from_utf8_lossy(&b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_through_the_mtls_pair_qos1_and_broker_restart() {
    let ca = TestCa::new("test.local");
    let mut broker = Mosquitto::start(None).await;
    let pair = Pair::start(
        &ca,
        service("mqtt", Protocol::Tcp),
        broker.addr,
        "sensor",
        true,
    )
    .await;
    let port = pair.port();

    // QoS 1: every message arrives, in order.
    const N: usize = 500;
    let mut sub = mqtt_sub(port, "meters/1", "sub-1", Some(N));
    let mut out = lines(&mut sub);
    // `-d` prints the SUBACK on stdout: subscribed before we publish.
    let _ = next_line(&mut out, |l| l.contains("SUBACK"), "subscription").await;
    let msgs: String = (0..N).map(|i| format!("reading {i}\n")).collect();
    let p = mqtt_pub(port, "meters/1", msgs).await;
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    let mut got = Vec::new();
    while got.len() < N {
        let l = next_line(&mut out, |l| l.starts_with("reading "), "a message").await;
        got.push(l);
    }
    let want: Vec<String> = (0..N).map(|i| format!("reading {i}")).collect();
    assert_eq!(got, want);
    assert!(sub.wait().unwrap().success());
    let m = metrics(&pair.client).await;
    assert!(
        metric(&m, "meshwire_tcp_connections_opened_total", "outbound") >= 2,
        "{m}"
    );
    // Bytes are counted when a connection ends (the publisher's just did).
    eventually("bytes counted", Duration::from_secs(10), || async {
        metric(
            &metrics(&pair.client).await,
            "meshwire_tcp_sent_bytes_total",
            "outbound",
        ) > (N * 10) as u64
    })
    .await;
    assert!(
        metric(&m, "meshwire_tcp_connections_opened_total", "outbound") >= 2,
        "{m}"
    );

    // The broker restarts: the subscriber reconnects through the sidecars and
    // gets messages published afterwards.
    let mut sub = mqtt_sub(port, "meters/after", "sub-2", Some(1));
    let mut out = lines(&mut sub);
    let _ = next_line(&mut out, |l| l.contains("SUBACK"), "subscription").await;
    let broker_port = broker.addr.port();
    broker.kill();
    let _broker2 = Mosquitto::start(Some(broker_port)).await;
    // It resubscribes once reconnected; publish until it has the message.
    let wait = async {
        loop {
            let p = mqtt_pub(port, "meters/after", "back\n".into()).await;
            if p.status.success()
                && let Ok(Some(l)) =
                    tokio::time::timeout(Duration::from_millis(500), out.recv()).await
                && l == "back"
            {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("the subscriber reconnected after the broker restart");
    let _ = sub.kill();
    let _ = sub.wait();
}

/// An MQTT 3.1.1 CONNECT with no keep-alive (the broker never times it out).
fn mqtt_connect(id: &str) -> Vec<u8> {
    let mut var = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    var.extend((id.len() as u16).to_be_bytes());
    var.extend(id.as_bytes());
    let mut p = vec![0x10, var.len() as u8];
    p.extend(var);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_mqtt_connections_are_held() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CONNS: usize = 1000;
    let ca = TestCa::new("test.local");
    let broker = Mosquitto::start(None).await;
    let pair = Pair::start(
        &ca,
        service("mqtt", Protocol::Tcp),
        broker.addr,
        "sensor",
        true,
    )
    .await;
    let port = pair.port();
    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let mut c = tokio::net::TcpStream::connect(port).await.unwrap();
        c.write_all(&mqtt_connect(&format!("idle-{i}")))
            .await
            .unwrap();
        let mut ack = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut ack))
            .await
            .expect("CONNACK in time")
            .unwrap();
        assert_eq!(ack, [0x20, 0x02, 0x00, 0x00], "connection {i}");
        conns.push(c);
    }
    let m = metrics(&pair.client).await;
    assert_eq!(
        metric(&m, "meshwire_tcp_connections_active", "outbound"),
        CONNS as u64,
        "{m}"
    );
    let m = metrics(&pair.server).await;
    assert_eq!(
        metric(&m, "meshwire_tcp_connections_active", "inbound"),
        CONNS as u64,
        "{m}"
    );
    // Every one still works: PINGREQ → PINGRESP.
    for c in &mut conns {
        c.write_all(&[0xC0, 0x00]).await.unwrap();
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut r = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(20), c.read_exact(&mut r))
            .await
            .expect("PINGRESP in time")
            .unwrap();
        assert_eq!(r, [0xD0, 0x00], "connection {i}");
    }
    // The mesh hop multiplexes them: a handful of HTTP/2 connections, not 1,000.
    let set = pair
        .client
        .routes()
        .load()
        .get("mqtt")
        .unwrap()
        .endpoints
        .load_full();
    let h2 = set.entries()[0].endpoint.pool.connection_count();
    assert!(
        (1..=2).contains(&h2),
        "{h2} mesh connections for {CONNS} TCP connections"
    );
    drop(conns);
    eventually("connections closed", Duration::from_secs(20), || async {
        let m = metrics(&pair.client).await;
        metric(&m, "meshwire_tcp_connections_active", "outbound") == 0
    })
    .await;
}

/// A server-first service (like SMTP): a banner on connect, then it counts
/// what the client sends until the client half-closes, answers and closes.
async fn banner_server() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                c.write_all(b"220 banner ready\r\n").await.unwrap();
                let mut all = Vec::new();
                c.read_to_end(&mut all).await.unwrap();
                c.write_all(format!("got {} bytes\r\n", all.len()).as_bytes())
                    .await
                    .unwrap();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_tcp_half_close_failover_and_policy() {
    use meshwire_mesh::policy::{Action, Policy, Rule};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::new("test.local");
    let app = banner_server().await;
    let mut local = service("smtp", Protocol::Tcp);
    local.policy = Some(Policy {
        default_action: Action::Deny,
        rules: vec![Rule {
            action: Some(Action::Allow),
            sources: vec![spiffe("mailer")],
            ..Default::default()
        }],
    });
    let pair = Pair::start(&ca, local.clone(), app, "mailer", true).await;
    // A second client whose first endpoint is dead: it fails over before any byte.
    let dead = dead_addr().await;
    let failover = Pair::client(
        &ca,
        &local,
        &[dead, pair.server.inbound_addr.unwrap()],
        "mailer",
        true,
    )
    .await;
    for port in [pair.port(), failover.service_addrs[0].1] {
        for _ in 0..4 {
            let mut c = tokio::net::TcpStream::connect(port).await.unwrap();
            // The banner comes before we send anything.
            let mut banner = [0u8; 18];
            tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut banner))
                .await
                .expect("banner without sending first")
                .unwrap();
            assert_eq!(&banner, b"220 banner ready\r\n");
            c.write_all(b"HELO mesh\r\n").await.unwrap();
            c.shutdown().await.unwrap(); // half-close: we can still read
            let mut rest = String::new();
            c.read_to_string(&mut rest).await.unwrap();
            assert_eq!(rest, "got 11 bytes\r\n");
        }
    }
    // A caller the policy does not allow gets nothing from the app.
    let intruder = Pair::client(
        &ca,
        &local,
        &[pair.server.inbound_addr.unwrap()],
        "intruder",
        true,
    )
    .await;
    let mut c = tokio::net::TcpStream::connect(intruder.service_addrs[0].1)
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "denied caller read {buf:?}");
    let m = metrics(&intruder).await;
    assert_eq!(
        metric(&m, "meshwire_tcp_connections_failed_total", "outbound"),
        1,
        "{m}"
    );
    assert_eq!(
        metric(&m, "meshwire_tcp_connections_opened_total", "outbound"),
        0,
        "{m}"
    );
}

// === WebSocket ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_extended_connect_through_the_mtls_pair() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let ca = TestCa::new("test.local");
    let app = websocket_echo().await;
    let pair = Pair::start(&ca, service("chat", Protocol::Http), app, "browser", false).await;
    let mut req = format!("ws://{}/room/1", pair.client.outbound_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_static("chat"));
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade through the mesh");
    assert_eq!(resp.status(), 101);

    // 1 MiB binary frames, both ways, several times.
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    for _ in 0..4 {
        ws.send(Message::binary(big.clone())).await.unwrap();
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert!(b[..] == big[..], "1 MiB frame intact"),
            other => panic!("{other:?}"),
        }
    }
    ws.send(Message::text("hello mesh")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello mesh")
    );
    // Ping → the app's pong.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    // The close code crosses both sidecars and comes back.
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    match ws.next().await.unwrap().unwrap() {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Library(4001));
            assert_eq!(f.reason.as_str(), "bye");
        }
        other => panic!("expected the echoed close, got {other:?}"),
    }

    // A WebSocket upgrade to a grpc service: a clear error.
    let grpc_client = Pair::client(
        &ca,
        &service("greeter", Protocol::Grpc),
        &[pair.server.inbound_addr.unwrap()],
        "browser",
        false,
    )
    .await;
    let mut req = format!("ws://{}/x", grpc_client.outbound_addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("greeter"),
    );
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 400);
            let body =
                String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("grpc service"), "{body}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
}

// === stock Envoy as the caller ===

/// A server sidecar for `local` (permissive: stock Envoy gets no client
/// certificate or transport socket from our CDS, so it reaches sidecars in
/// plaintext h2c, which only a permissive service accepts) in front of `app`.
async fn permissive_server(ca: &TestCa, mut local: Cluster, app: SocketAddr) -> Sidecar {
    init_tracing();
    local.permissive = true;
    let mut cfg = SidecarConfig::local();
    cfg.app = Some(app);
    cfg.inbound = Some(localhost());
    cfg.identity = Some(identity_of(ca, &local.name));
    cfg.service = Some(local.name.clone());
    cfg.clusters = vec![local];
    Sidecar::start(cfg).await.unwrap()
}

/// Stock Envoy fed by our control plane calls an `http` service (a REST app
/// behind a sidecar) through its HTTP listener and a `tcp` service (a
/// server-first service behind a sidecar) through its `tcp_proxy` listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_envoy_calls_http_and_tcp_services_through_sidecars() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = TestCa::new("test.local");
    let app = RestApp::start();
    let banner = banner_server().await;
    let web = permissive_server(&ca, service("web", Protocol::Http), app.addr).await;
    let smtp = permissive_server(&ca, service("smtp", Protocol::Tcp), banner).await;

    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::spawn(data.path()).await;
    let d = data.path();
    for (name, proto, sc) in [("web", "http", &web), ("smtp", "tcp", &smtp)] {
        ok(&meshctl(
            &cp,
            d,
            &[
                "service",
                "create",
                name,
                "--protocol",
                proto,
                "--permissive",
            ],
        )
        .await);
        let inbound = sc.inbound_addr.unwrap().to_string();
        ok(&meshctl(&cp, d, &["endpoint", "add", name, &inbound]).await);
    }
    let envoy = EnvoyProcess::start_with_ports(cp.addr, "envoy-proto", false, &[("smtp", 0)]).await;
    let http = envoy.listener().await;
    let tcp = envoy.listener_named("meshwire_tcp_smtp").await;

    // HTTP: a GET with the app's headers, a POST body, keep-alive on one curl connection.
    let base = format!("http://{http}");
    let (code, body, err) = curl(s(&[
        "-i",
        "-H",
        "Host: web",
        "-H",
        "X-Custom: a b",
        &format!("{base}/hello?q=1"),
    ]))
    .await;
    assert_eq!(code, 0, "{err}\n{}", envoy.log());
    let text = String::from_utf8_lossy(&body).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}\n{}", envoy.log());
    assert!(
        text.to_ascii_lowercase().contains("x-app-header: kept"),
        "{text}"
    );
    let v = json_of(text.split("\r\n\r\n").nth(1).unwrap().as_bytes());
    assert_eq!(v["path"], "/hello?q=1");
    assert_eq!(v["version"], "HTTP/1.1", "the app got HTTP/1.1");
    assert_eq!(v["host"], "web");
    assert_eq!(v["x_custom"], "a b");

    let payload = "x".repeat(100_000);
    let (code, body, err) = curl(s(&[
        "-H",
        "Host: web",
        "--data-binary",
        &payload,
        &format!("{base}/upload"),
    ]))
    .await;
    assert_eq!(code, 0, "{err}");
    let v = json_of(&body);
    assert_eq!(v["bytes"], 100_000, "{v}");

    let hello = format!("{base}/hello");
    let mut args = vec!["-v".to_owned()];
    for _ in 0..3 {
        args.extend(s(&["-H", "Host: web", &hello]));
    }
    let (code, body, err) = curl(args).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.matches("Re-using existing connection").count(),
        2,
        "keep-alive through Envoy: {err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&body).matches("\"path\"").count(),
        3
    );

    // TCP: the banner first, then bytes up, half-close, and the answer down.
    let mut c = tokio::net::TcpStream::connect(tcp).await.unwrap();
    let mut banner_line = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut banner_line))
        .await
        .unwrap_or_else(|_| panic!("no banner through envoy:\n{}", envoy.log()))
        .unwrap();
    assert_eq!(&banner_line, b"220 banner ready\r\n");
    c.write_all(&[7u8; 50_000]).await.unwrap();
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("no answer through envoy:\n{}", envoy.log()))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "got 50000 bytes\r\n");
    // Envoy took every resource we sent (the tcp_proxy listener included).
    let status = cp
        .client()
        .await
        .status(meshwire_proto::admin::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let n = status
        .nodes
        .iter()
        .find(|n| n.node_id == "envoy-proto")
        .unwrap_or_else(|| panic!("envoy not in status: {:?}", status.nodes));
    assert!(
        n.last_nack.is_none(),
        "envoy refused something: {n:?}\n{}",
        envoy.log()
    );
    // The server sidecar carried it: exactly our bytes towards the service
    // (Envoy's readiness probes of the listener opened connections but sent nothing).
    eventually(
        "the server sidecar counted 50000 bytes up",
        Duration::from_secs(10),
        || async {
            metric(
                &metrics(&smtp).await,
                "meshwire_tcp_sent_bytes_total",
                "inbound",
            ) == 50_000
        },
    )
    .await;
}
