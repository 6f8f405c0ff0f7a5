//! Telling the control plane how the local app is (`Identity.ReportHealth`,
//! over the same mutual-TLS channels as renewals), so every caller stops
//! sending to an unhealthy app through EDS — Envoy and proxyless gRPC too,
//! not only sidecars that meet its refusals.
//!
//! ```text
//! health::AppHealth (watch) ─▶ HealthReport{service, address, healthy}: the current
//!   health when the stream opens, each change at once, the same again every
//!   10 s (so the control plane knows the reporter is alive)
//!   ─▶ the control plane: stored (a change only), pushed as EDS UNHEALTHY
//!   stream broken ─▶ the next replica, jittered backoff; refused (another
//!   identity's endpoint, an unregistered address) ─▶ logged, retried slowly
//! ```
//!
//! The address is the one the endpoint is registered with: `--advertise`,
//! else the inbound listener's when it is a specific IP, else the IP this
//! host uses to reach the control plane with the inbound port. Nothing here
//! touches a call: reports follow health changes only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshwire_proto::identity::v1 as pb;
use meshwire_proto::identity::v1::identity_client::IdentityClient;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;

use super::client::backoff;
use crate::health::AppHealth;

/// The report is repeated this often (the control plane takes a stream
/// silent for 30 s as gone).
const REPEAT_EVERY: Duration = Duration::from_secs(10);
/// An unregistered endpoint may be added any moment: look again soon.
const NOT_FOUND_RETRY_MAX: Duration = Duration::from_secs(5);
/// A refusal that retrying will not fix soon (another identity's endpoint).
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Which endpoint the sidecar reports for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advertise {
    /// `--advertise`, or the inbound listener's specific address.
    Fixed(SocketAddr),
    /// The inbound listener is on an unspecified IP: the IP of the
    /// interface toward the control plane, with this port.
    TowardControlPlane { port: u16 },
}

/// What a sidecar with an app reports, and about which endpoint.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub service: String,
    pub advertise: Advertise,
    pub health: Arc<AppHealth>,
}

/// The local IP this host would use to reach `server` (`https://host:port`).
async fn local_ip_toward(server: &str) -> Option<std::net::IpAddr> {
    let authority = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))?
        .split('/')
        .next()?;
    let peer = tokio::net::lookup_host(authority).await.ok()?.next()?;
    let bind: SocketAddr = if peer.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // A connected UDP socket sends nothing: it only asks the routing table.
    let s = tokio::net::UdpSocket::bind(bind).await.ok()?;
    s.connect(peer).await.ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// Reports until the task is dropped, through `chs` (one per replica, in
/// the order of `servers`), moving to the next replica after a failure.
pub(super) async fn run(chs: Arc<[Channel]>, servers: Vec<String>, r: Reporter) {
    let mut failures = 0u32;
    let mut at = 0usize;
    let mut refused_before: Option<Code> = None;
    loop {
        let i = at % chs.len();
        let address = match r.advertise {
            Advertise::Fixed(a) => Some(a),
            Advertise::TowardControlPlane { port } => {
                local_ip_toward(servers.get(i).map_or("", String::as_str))
                    .await
                    .map(|ip| SocketAddr::new(ip, port))
            }
        };
        let result = match address {
            Some(address) => session(IdentityClient::new(chs[i].clone()), &r, address).await,
            None => Err(tonic::Status::unavailable(
                "cannot tell which local address reaches the control plane; set --advertise",
            )),
        };
        let Err(status) = result else {
            // The stream ended cleanly (the control plane stopping): again.
            failures = 0;
            refused_before = None;
            at = at.wrapping_add(1);
            tokio::time::sleep(backoff(1)).await;
            continue;
        };
        failures = failures.saturating_add(1);
        let wait = match status.code() {
            Code::NotFound => backoff(failures).min(NOT_FOUND_RETRY_MAX),
            Code::PermissionDenied
            | Code::InvalidArgument
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::FailedPrecondition => REFUSED_RETRY,
            _ => {
                at = at.wrapping_add(1);
                backoff(failures)
            }
        };
        let refused = !matches!(
            status.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown | Code::DeadlineExceeded
        );
        if status.code() == Code::NotFound && refused_before != Some(Code::NotFound) {
            // Often only until the operator registers the endpoint.
            tracing::warn!(
                service = %r.service,
                address = ?address,
                reason = status.message(),
                retry_in = ?wait,
                "the control plane does not know this sidecar's endpoint yet; health reports wait for it"
            );
        } else if refused && refused_before != Some(status.code()) {
            tracing::error!(
                service = %r.service,
                address = ?address,
                code = ?status.code(),
                reason = status.message(),
                retry_in = ?wait,
                "the control plane refuses this sidecar's health reports: callers learn of an unhealthy app only from refused calls"
            );
        } else {
            tracing::debug!(code = ?status.code(), reason = status.message(), retry_in = ?wait, "health report stream ended");
        }
        refused_before = refused.then_some(status.code());
        tokio::time::sleep(wait).await;
    }
}

fn report(r: &Reporter, address: SocketAddr, healthy: bool) -> pb::HealthReport {
    pb::HealthReport {
        service: r.service.clone(),
        address: address.to_string(),
        healthy,
    }
}

/// One stream: the current health first, then every change and the
/// periodic repeat, while reading the acks. Returns how it ended.
async fn session(
    mut client: IdentityClient<Channel>,
    r: &Reporter,
    address: SocketAddr,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let mut health = r.health.subscribe();
    let now = *health.borrow_and_update();
    let _ = tx.try_send(report(r, address, now));
    let feed = async {
        loop {
            tokio::select! {
                c = health.changed() => if c.is_err() {
                    std::future::pending::<()>().await;
                },
                () = tokio::time::sleep(REPEAT_EVERY) => {}
            }
            let h = *health.borrow_and_update();
            if tx.send(report(r, address, h)).await.is_err() {
                return;
            }
        }
    };
    let talk = async {
        let mut acks = client
            .report_health(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                rx,
            ))
            .await?
            .into_inner();
        let mut first = true;
        loop {
            match acks.message().await? {
                Some(ack) if first => {
                    first = false;
                    tracing::info!(service = %r.service, %address, healthy = ack.healthy, version = ack.version, "reporting the app's health to the control plane");
                }
                Some(ack) => {
                    tracing::debug!(
                        healthy = ack.healthy,
                        version = ack.version,
                        "health report acknowledged"
                    );
                }
                None => return Ok(()),
            }
        }
    };
    tokio::select! {
        () = feed => Ok(()),
        r = talk => r,
    }
}
