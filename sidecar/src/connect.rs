//! The transport under every HTTP/2 connection the sidecar opens or accepts.
//!
//! [`MeshIo`] is the one byte-stream type the HTTP layer sees: plain TCP (the
//! hop to the local app, and the mesh hop when the sidecar has no identity),
//! or TLS 1.3 over TCP (the mesh hop). [`Connector`] opens both; on the mesh
//! hop it checks, before a single request byte is sent, that the peer's
//! SPIFFE ID is the one the control plane pushed for that endpoint.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::identity::MeshTls;

/// Why opening a connection failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr}: {reason}")]
    Io { addr: SocketAddr, reason: String },
    #[error("HTTP/2 handshake with {addr}: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("TLS with {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("{addr} presented {got:?}, expected {want:?}")]
    WrongPeer {
        addr: SocketAddr,
        got: Option<String>,
        want: String,
    },
    #[error("no mesh certificate yet; cannot connect to {addr}")]
    NoIdentity { addr: SocketAddr },
    #[error("{addr} is backing off after {failures} failed connects (last: {last})")]
    BackingOff {
        addr: SocketAddr,
        failures: u32,
        last: String,
    },
}

/// A connected byte stream.
#[derive(Debug)]
pub enum MeshIo {
    Plain(TcpStream),
    /// Mesh hop, our side the client.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Mesh hop, our side the server.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! each_io {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            MeshIo::Plain($s) => $e,
            MeshIo::Client($s) => $e,
            MeshIo::Server($s) => $e,
        }
    };
}

impl MeshIo {
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            MeshIo::Plain(s) => s.peer_addr(),
            MeshIo::Client(s) => s.get_ref().0.peer_addr(),
            MeshIo::Server(s) => s.get_ref().0.peer_addr(),
        }
    }
}

impl AsyncRead for MeshIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for MeshIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each_io!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_io!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Opens transport connections to one kind of peer (other sidecars, or the
/// local app). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Connector {
    /// `Some`: the mesh hop is mutual TLS with this identity.
    tls: Option<Arc<MeshTls>>,
    /// The SPIFFE ID the peer must present (pushed with the endpoint).
    expect: Option<Arc<str>>,
}

impl Connector {
    /// Mutual TLS with the sidecar's identity.
    pub fn mesh(tls: Arc<MeshTls>) -> Self {
        Self {
            tls: Some(tls),
            expect: None,
        }
    }

    /// The same, for a peer that must present `identity`.
    pub fn expecting(&self, identity: Option<&str>) -> Self {
        Self {
            tls: self.tls.clone(),
            expect: identity.map(Arc::from),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<MeshIo, ConnectError> {
        tokio::time::timeout(timeout, self.connect_inner(addr))
            .await
            .map_err(|_| ConnectError::Timeout { addr, timeout })?
    }

    async fn connect_inner(&self, addr: SocketAddr) -> Result<MeshIo, ConnectError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectError::Io {
                addr,
                reason: e.to_string(),
            })?;
        // Small gRPC frames must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(MeshIo::Plain(tcp));
        };
        let state = tls.current().ok_or(ConnectError::NoIdentity { addr })?;
        let stream = tokio_rustls::TlsConnector::from(state.client.clone())
            .connect(meshwire_tls::mesh_server_name(), tcp)
            .await
            .map_err(|e| ConnectError::Tls {
                addr,
                reason: e.to_string(),
            })?;
        if let Some(want) = &self.expect {
            let got = meshwire_tls::peer_id(stream.get_ref().1.peer_certificates());
            if got.as_deref() != Some(&**want) {
                tracing::warn!(%addr, presented = ?got, expected = %want, "peer identity mismatch; closing");
                return Err(ConnectError::WrongPeer {
                    addr,
                    got,
                    want: want.to_string(),
                });
            }
        }
        Ok(MeshIo::Client(Box::new(stream)))
    }
}
