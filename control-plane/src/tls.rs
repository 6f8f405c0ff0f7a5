//! The control plane's TLS port (default 15012): Identity, ADS and the admin
//! API over TLS 1.3 (ALPN `h2`).
//!
//! The serving certificate comes from the mesh CA ([`Ca::serving_credentials`]):
//! re-issued at about two-thirds of its lifetime and whenever the trust
//! bundle changes (a new signing root, a root added or removed), and swapped
//! into an [`ArcSwap`] that every accepted connection reads, so nothing
//! restarts. A client certificate is optional; when one is presented it must
//! chain to the current trust bundle, and its SPIFFE ID reaches the handlers
//! as [`TlsConnectInfo`] in the request extensions (Identity.Renew, admin
//! access with the admin identity).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use meshwire_mesh::conn::ConnActivity;
use meshwire_tls::SpiffeId;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::ca::{Ca, CaError};
use crate::net::{Acceptor, Conn, Connections};

/// A handshake that takes longer than this is dropped (a client on a slow
/// link needs a few round trips; a silent one holds a slot this long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; more connections wait in the backlog.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in progress from one IP address: one host cannot take every
/// slot (a connection over the cap is closed at once).
const MAX_HANDSHAKES_PER_PEER: usize = 16;
/// Connections handshaken but not yet picked up by the server.
const ACCEPTED_BACKLOG: usize = 64;
/// After a failed re-issue, try again this soon.
const RETRY: Duration = Duration::from_secs(5);

/// What handlers know about a TLS connection (a request extension).
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    pub remote_addr: SocketAddr,
    /// The SPIFFE ID of the client certificate, if one was presented (it
    /// chained to the trust bundle, or the handshake would have failed).
    pub peer_id: Option<SpiffeId>,
    /// The connection's calls, for its first-request and idle timeouts.
    pub(crate) activity: Arc<ConnActivity>,
}

/// An accepted, handshaken connection.
pub type TlsIo = Conn<tokio_rustls::server::TlsStream<TcpStream>, TlsConnectInfo>;

/// The default `--tls-name`s: this host's name, `localhost`, `127.0.0.1`.
pub fn default_names() -> Vec<String> {
    let mut names = Vec::new();
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(h) = std::fs::read_to_string(path) {
            let h = h.trim().to_ascii_lowercase();
            if !h.is_empty() && h != "localhost" {
                names.push(h);
            }
            break;
        }
    }
    names.push("localhost".into());
    names.push("127.0.0.1".into());
    names
}

/// Builds the server configuration from fresh credentials and the current
/// bundle; returns it with the moment it should be replaced.
fn build(ca: &Ca, names: &[String]) -> Result<(Arc<ServerConfig>, SystemTime), CaError> {
    let bundle = ca.bundle();
    let creds = ca.serving_credentials(names)?;
    let info = meshwire_tls::cert_info(&creds.chain[0])?;
    let cfg = meshwire_tls::server_config(&creds, &bundle.bundle, false)?;
    let life = info
        .not_after
        .duration_since(info.not_before)
        .unwrap_or_default();
    let renew_at = info.not_before + life * 2 / 3;
    tracing::info!(serial = %info.serial, not_after = ?info.not_after, signing = %bundle.signing_fingerprint, "control-plane serving certificate issued");
    Ok((cfg, renew_at))
}

/// The first serving configuration, checked now (so a bad `--tls-name`
/// fails the start), and the time it should be replaced.
pub fn initial_config(
    ca: &Ca,
    names: &[String],
) -> Result<(Arc<ArcSwap<ServerConfig>>, SystemTime), CaError> {
    let (cfg, renew_at) = build(ca, names)?;
    Ok((Arc::new(ArcSwap::new(cfg)), renew_at))
}

/// Keeps `config` current: re-issued at `renew_at` (about 2/3 of the
/// lifetime) and on every trust-bundle change, until `shutdown`.
pub async fn rotate(
    ca: Arc<Ca>,
    names: Vec<String>,
    config: Arc<ArcSwap<ServerConfig>>,
    mut renew_at: SystemTime,
    shutdown: CancellationToken,
) {
    let mut bundle = ca.watch_bundle();
    bundle.mark_unchanged();
    loop {
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
            r = bundle.changed() => if r.is_err() { return },
        }
        bundle.mark_unchanged();
        let (ca2, names2) = (ca.clone(), names.clone());
        match tokio::task::spawn_blocking(move || build(&ca2, &names2)).await {
            Ok(Ok((cfg, at))) => {
                config.store(cfg);
                renew_at = at;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot renew the control plane's serving certificate; retrying");
                renew_at = SystemTime::now() + RETRY;
            }
            Err(e) => {
                tracing::error!(error = %e, "serving certificate task failed; retrying");
                renew_at = SystemTime::now() + RETRY;
            }
        }
    }
}

/// Accepts TCP connections on `listener`, handshakes them with the current
/// `config`, and yields them to tonic; ends on `shutdown`. Each takes a
/// place in `conns` from its accept (a handshake in progress is a silent
/// connection there); its first-request timeout runs from the end of its
/// handshake.
pub(crate) fn incoming(
    listener: TcpListener,
    config: Arc<ArcSwap<ServerConfig>>,
    conns: Arc<Connections>,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsIo>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let per_peer = Arc::new(PerPeer::default());
        let mut acceptor = Acceptor::new("tls");
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote_addr) = tokio::select! {
                () = shutdown.cancelled() => return,
                c = acceptor.accept(&listener) => c,
            };
            let Some(peer_slot) = per_peer.clone().enter(remote_addr.ip()) else {
                tracing::debug!(remote = %remote_addr, "too many TLS handshakes from this address; closed");
                continue;
            };
            let Some(slot) = conns.admit("tls").await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slots = (permit, peer_slot);
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                let stream = tokio::select! {
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(remote = %remote_addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(remote = %remote_addr, "TLS handshake timed out");
                            return;
                        }
                    },
                    () = slot.evict.cancelled() => {
                        tracing::debug!(remote = %remote_addr, "TLS handshake closed for a newer connection (connection budget full)");
                        return;
                    }
                };
                let peer_id = meshwire_tls::peer_id(stream.get_ref().1.peer_certificates())
                    .and_then(|id| SpiffeId::parse(&id).ok());
                let info = TlsConnectInfo {
                    remote_addr,
                    peer_id,
                    activity: slot.activity.clone(),
                };
                let io = Conn::new(stream, info, slot, "tls", remote_addr);
                let _ = tx.send(Ok(io)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Handshakes in progress per peer address.
#[derive(Debug, Default)]
struct PerPeer(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

impl PerPeer {
    /// A slot for one more handshake from `ip`, or `None` at the cap.
    fn enter(self: Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *n += 1;
        drop(m);
        Some(PeerSlot { peers: self, ip })
    }
}

/// Gives its peer's slot back when the handshake ends, however it ends.
#[derive(Debug)]
struct PeerSlot {
    peers: Arc<PerPeer>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// A client connector for the TLS port (meshctl, tests): the server's chain
/// verified against `bundle` and, if given, its SPIFFE ID checked against
/// `expect` (the control plane's own, from [`crate::ca::CONTROL_PLANE_SERVICE`]);
/// `creds` are presented as the client certificate. Use it with
/// `tonic::transport::Endpoint::connect_with_connector` on an `https://` URI.
pub fn connector(
    bundle: &meshwire_tls::TrustBundle,
    creds: Option<&meshwire_tls::Credentials>,
    expect: Option<&SpiffeId>,
) -> Result<meshwire_tls::TlsConnector, meshwire_tls::IdentityError> {
    Ok(meshwire_tls::TlsConnector {
        config: Arc::new(ArcSwap::new(meshwire_tls::client_config(creds, bundle)?)),
        expect: expect.map(ToString::to_string),
    })
}
