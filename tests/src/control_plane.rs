//! The control plane as a real process ([`ControlPlaneProcess`]) and
//! clients of its admin API.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic::transport::Channel;

use crate::{Process, bins};

/// Adds `authorization: Bearer <token>` (or nothing) to every call.
#[derive(Debug, Clone)]
pub struct Bearer(pub Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Admin = meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient<
    tonic::service::interceptor::InterceptedService<Channel, Bearer>,
>;

pub async fn admin(addr: SocketAddr, header: Option<&str>) -> Admin {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the control plane");
    meshwire_proto::admin::v1::mesh_admin_client::MeshAdminClient::with_interceptor(
        channel,
        Bearer(header.map(|h| h.parse().unwrap())),
    )
}

/// A real `meshwire-control-plane` process; killed on drop if still running.
#[derive(Debug)]
pub struct ControlPlaneProcess {
    pub process: Process,
    pub addr: SocketAddr,
    /// Its admin HTTP port (`/live`, `/ready`, `/metrics`).
    pub admin: SocketAddr,
    pub token: String,
}

impl ControlPlaneProcess {
    /// Waits until the xDS streams serve the committed version (snapshots are
    /// published coalesced), so a sidecar started now gets every change
    /// made so far in its first push.
    pub async fn published(&self) {
        let admin = self.admin;
        crate::wait::eventually(
            "the last change is published",
            Duration::from_secs(10),
            || async move {
                let Ok((_, _, body)) = crate::clients::http1_get(admin, "cp", "/metrics").await
                else {
                    return false;
                };
                let text = String::from_utf8_lossy(&body);
                let gauge = |name: &str| {
                    text.lines().find_map(|l| {
                        l.strip_prefix(name)?
                            .strip_prefix(' ')?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                };
                matches!(
                    (gauge("meshwire_cp_config_version"), gauge("meshwire_cp_published_version")),
                    (Some(c), Some(p)) if p >= c
                )
            },
        )
        .await;
    }

    /// Starts `meshwire-control-plane` on `127.0.0.1:0` with `data_dir`.
    pub async fn spawn(data_dir: &Path) -> Self {
        Self::spawn_with(data_dir, None, &[]).await
    }

    /// Starts it on `listen` (default `127.0.0.1:0`; a fixed address to come
    /// back on the same port after a restart) and waits for its addr file.
    pub async fn spawn_with(
        data_dir: &Path,
        listen: Option<SocketAddr>,
        envs: &[(&str, &str)],
    ) -> Self {
        Self::start(data_dir, listen, None, envs, true, None, &[]).await
    }

    /// Starts it under `prlimit --nofile=N:N` (if given: the limit holds from
    /// the start) with `args` added to its command line.
    pub async fn spawn_limited(data_dir: &Path, nofile: Option<usize>, args: &[&str]) -> Self {
        Self::start(data_dir, None, None, &[], true, nofile, args).await
    }

    /// [`Self::spawn_with`], the admin HTTP port on `admin` (default
    /// `127.0.0.1:0`): to probe `/ready` before the addr file is written.
    pub async fn spawn_full(
        data_dir: &Path,
        listen: Option<SocketAddr>,
        admin: Option<SocketAddr>,
        envs: &[(&str, &str)],
    ) -> Self {
        Self::start(data_dir, listen, admin, envs, true, None, &[]).await
    }

    /// As deployed: xDS only to clients with a mesh certificate (no
    /// `--plaintext-xds`).
    pub async fn spawn_secure(data_dir: &Path) -> Self {
        Self::start(data_dir, None, None, &[], false, None, &[]).await
    }

    async fn start(
        data_dir: &Path,
        listen: Option<SocketAddr>,
        admin: Option<SocketAddr>,
        envs: &[(&str, &str)],
        plaintext_xds: bool,
        nofile: Option<usize>,
        extra: &[&str],
    ) -> Self {
        let run = tempfile::tempdir().unwrap();
        let addr_file = run.path().join(ADDR_FILE);
        let mut cmd = match nofile {
            // prlimit execs the control plane: same pid, the limit from the start.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(bins::CONTROL_PLANE);
                c
            }
            None => Command::new(bins::CONTROL_PLANE),
        };
        let listen = listen.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        let admin = admin.map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        cmd.args([
            "--listen",
            &listen,
            "--tls-listen",
            "127.0.0.1:0",
            "--admin",
            &admin,
            "--log",
            "info",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--addr-file")
        .arg(&addr_file)
        .env_remove("MESHWIRE_ADMIN_TOKEN")
        .envs(envs.iter().copied());
        if plaintext_xds {
            // The tests' Envoy and grpcio peers, and sidecars given an
            // http:// URL, take xDS without a certificate (loopback only).
            cmd.arg("--plaintext-xds");
        }
        cmd.args(extra);
        let (process, (addr, admin)) = Process::start(
            "control-plane",
            cmd,
            run,
            Duration::from_secs(10),
            Duration::from_millis(10),
            |_| read_cp_addr(&addr_file),
        )
        .await;
        let token = match envs.iter().find(|(k, _)| *k == "MESHWIRE_ADMIN_TOKEN") {
            Some((_, t)) => (*t).to_owned(),
            None => std::fs::read_to_string(data_dir.join("admin.token"))
                .expect("admin.token written before listening")
                .trim()
                .to_owned(),
        };
        Self {
            process,
            addr,
            admin,
            token,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Admin {
        admin(self.addr, Some(&format!("Bearer {}", self.token))).await
    }

    /// The TLS port (Identity, ADS, admin API), from its addr file.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        let path = self.process.dir().join(ADDR_FILE);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        v["tls"].as_str()?.parse().ok()
    }

    /// `https://127.0.0.1:PORT` of the TLS port.
    pub fn tls_url(&self) -> String {
        format!(
            "https://{}",
            self.tls_addr().expect("the control plane serves TLS")
        )
    }
}

// A control-plane process is a `Process` with known addresses: `signal`,
// `wait_exit` and `log` come from there.
impl std::ops::Deref for ControlPlaneProcess {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for ControlPlaneProcess {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Its `--addr-file`, in the process's temp dir.
const ADDR_FILE: &str = "addr.json";

fn read_cp_addr(path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    assert!(v["pid"].as_u64().is_some(), "addr file has the pid: {v}");
    let admin = v["admin"].as_str().expect("addr file has the admin port");
    Some((v["listen"].as_str()?.parse().ok()?, admin.parse().ok()?))
}

/// Short admin API calls for tests; each returns the committed version.
pub mod api {
    use super::Admin;
    use meshwire_proto::admin::v1 as pb;

    pub async fn create_service(a: &mut Admin, name: &str) -> u64 {
        a.create_service(pb::CreateServiceRequest {
            service: Some(pb::Service {
                name: name.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("create service")
        .into_inner()
        .version
    }

    pub async fn add_endpoint(
        a: &mut Admin,
        service: &str,
        addr: std::net::SocketAddr,
        weight: u32,
    ) -> u64 {
        a.add_endpoint(pb::AddEndpointRequest {
            service: service.into(),
            endpoint: Some(pb::Endpoint {
                address: addr.to_string(),
                weight: Some(weight),
                ..Default::default()
            }),
        })
        .await
        .expect("add endpoint")
        .into_inner()
        .version
    }

    pub async fn set_weight(
        a: &mut Admin,
        service: &str,
        addr: std::net::SocketAddr,
        weight: u32,
    ) -> u64 {
        a.set_endpoint_weight(pb::SetEndpointWeightRequest {
            service: service.into(),
            address: addr.to_string(),
            weight,
        })
        .await
        .expect("set weight")
        .into_inner()
        .version
    }

    pub async fn drain(a: &mut Admin, service: &str, addr: std::net::SocketAddr) -> u64 {
        a.drain_endpoint(pb::DrainEndpointRequest {
            service: service.into(),
            address: addr.to_string(),
            draining: Some(true),
        })
        .await
        .expect("drain")
        .into_inner()
        .version
    }

    pub async fn remove(a: &mut Admin, service: &str, addr: std::net::SocketAddr) -> u64 {
        a.remove_endpoint(pb::RemoveEndpointRequest {
            service: service.into(),
            address: addr.to_string(),
        })
        .await
        .expect("remove endpoint")
        .into_inner()
        .version
    }
}
