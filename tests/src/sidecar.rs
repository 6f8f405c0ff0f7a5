//! Sidecars under test: in-process ([`Sidecar`], on `127.0.0.1:0`) alone or
//! as a small [`Mesh`], and the real `meshwire-sidecar` binary as a
//! [`SidecarProcess`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshwire_examples::echo::{EchoHandle, EchoOptions};
use meshwire_mesh::{Cluster, Endpoint};
use meshwire_proto::example::v1::echo_client::EchoClient;
use meshwire_sidecar::{Sidecar, SidecarConfig};
use tonic::transport::Channel;

use crate::{Process, bins, echo_client, echo_with, init_tracing, localhost};

pub fn cluster(name: &str, endpoints: &[(SocketAddr, u32)]) -> Cluster {
    let mut c = Cluster::new(name);
    c.endpoints = endpoints
        .iter()
        .map(|&(a, w)| Endpoint::new(a).with_weight(w))
        .collect();
    c
}

/// A sidecar in front of `app`, serving inbound only.
pub async fn server_sidecar(app: SocketAddr) -> Sidecar {
    init_tracing();
    let mut cfg = SidecarConfig::local();
    cfg.app = Some(app);
    cfg.inbound = Some(localhost());
    Sidecar::start(cfg).await.expect("server sidecar starts")
}

/// A sidecar that calls out to `clusters`.
pub async fn client_sidecar(clusters: Vec<Cluster>) -> Sidecar {
    init_tracing();
    let mut cfg = SidecarConfig::local();
    cfg.clusters = clusters;
    Sidecar::start(cfg).await.expect("client sidecar starts")
}

/// `n` echo backends, each behind its own server sidecar, and a client
/// sidecar that knows them as service `echo`.
#[derive(Debug)]
pub struct Mesh {
    pub backends: Vec<EchoHandle>,
    pub servers: Vec<Sidecar>,
    pub client: Sidecar,
}

impl Mesh {
    pub async fn new(n: usize) -> Mesh {
        Self::with_options(&vec![EchoOptions::default(); n]).await
    }

    pub async fn with_options(opts: &[EchoOptions]) -> Mesh {
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        let mut eps = Vec::new();
        for (i, o) in opts.iter().enumerate() {
            let b = echo_with(&format!("echo-{i}"), o.clone()).await;
            let s = server_sidecar(b.addr).await;
            eps.push((s.inbound_addr.expect("inbound"), 1));
            backends.push(b);
            servers.push(s);
        }
        let client = client_sidecar(vec![cluster("echo", &eps)]).await;
        Mesh {
            backends,
            servers,
            client,
        }
    }

    pub async fn client(&self) -> EchoClient<Channel> {
        echo_client(self.client.outbound_addr, "echo").await
    }
}

/// The addresses a sidecar process bound (its `--addr-file`).
#[derive(Debug, Clone)]
pub struct Addrs {
    pub outbound: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub services: Vec<(String, SocketAddr)>,
    /// The gateway's public listeners (`--gateway`), in file order.
    pub gateway: Vec<SocketAddr>,
}

/// A real `meshwire-sidecar` process; killed on drop if still running.
#[derive(Debug)]
pub struct SidecarProcess {
    pub process: Process,
    pub addrs: Addrs,
}

impl SidecarProcess {
    /// Starts `meshwire-sidecar` with `args` (plus local-only listeners the
    /// args do not name, and an addr file) and waits until it has bound its ports.
    pub async fn spawn(args: &[&str], envs: &[(&str, &str)]) -> SidecarProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr_file = dir.path().join("addrs.json");
        let mut cmd = Command::new(bins::SIDECAR);
        // Local-only listeners unless the test names its own (e.g. a fixed
        // inbound port, so a restarted sidecar comes back at the same endpoint).
        for (flag, default) in [
            ("--outbound", "127.0.0.1:0"),
            ("--inbound", "127.0.0.1:0"),
            ("--admin", "127.0.0.1:0"),
            ("--workers", "1"),
        ] {
            if !args.contains(&flag) {
                cmd.args([flag, default]);
            }
        }
        cmd.args(args)
            .env("MESHWIRE_ADDR_FILE", &addr_file)
            .envs(envs.iter().copied());
        let (process, addrs) = Process::start(
            "sidecar",
            cmd,
            dir,
            Duration::from_secs(10),
            Duration::from_millis(10),
            |_| read_addrs(&addr_file),
        )
        .await;
        SidecarProcess { process, addrs }
    }

    /// Writes a static config file into this test's temp dir.
    pub fn write_config(dir: &Path, yaml: &str) -> PathBuf {
        let p = dir.join("mesh.yaml");
        std::fs::write(&p, yaml).expect("write config");
        p
    }
}

// A sidecar process is a `Process` with known addresses: `signal`,
// `wait_exit` and `log` come from there.
impl std::ops::Deref for SidecarProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for SidecarProcess {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

fn read_addrs(path: &Path) -> Option<Addrs> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let addr = |k: &str| v[k].as_str().and_then(|s| s.parse().ok());
    Some(Addrs {
        outbound: addr("outbound")?,
        inbound: addr("inbound"),
        admin: addr("admin")?,
        services: v["services"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, a)| Some((k.clone(), a.as_str()?.parse().ok()?)))
                    .collect()
            })
            .unwrap_or_default(),
        gateway: v["gateway"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str()?.parse().ok()).collect())
            .unwrap_or_default(),
    })
}
