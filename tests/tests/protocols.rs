//! Service protocols (`grpc`, `http`, `tcp`) end to end: set with `meshctl`
//! on a real control plane and carried over xDS to sidecars and to Envoy-style
//! consumers; REST apps over HTTP/1.1 (Python's `http.server`, `curl`); TCP
//! services (a real mosquitto broker with `mosquitto_pub`/`mosquitto_sub`, a
//! server-first service) through client and server sidecars over mTLS.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use meshwire_sidecar::{ControlPlaneConfig, Sidecar, SidecarConfig};
use meshwire_tests::*;
use prost::Message;

const CP: &str = env!("CARGO_BIN_EXE_mw-control-plane");
const MESHCTL: &str = env!("CARGO_BIN_EXE_mw-meshctl");
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// What a finished `meshctl` run printed.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn meshctl(cp: &ControlPlaneProcess, data: &Path, args: &[&str]) -> Out {
    let mut cmd = Command::new(MESHCTL);
    cmd.args(["--server", &cp.url(), "--data-dir"])
        .arg(data)
        .args(args)
        .env_remove("MESHWIRE_ADMIN_TOKEN")
        .env_remove("MESHCTL_SERVER")
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run meshctl"))
        .await
        .unwrap();
    Out {
        code: out.status.code().expect("meshctl exited"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
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
    let cp = ControlPlaneProcess::spawn(CP, data.path()).await;
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
