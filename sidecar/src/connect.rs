//! The transport under every HTTP/2 connection the sidecar opens or accepts.
//!
//! [`MeshIo`] is the one byte-stream type the HTTP layer sees; the
//! sidecar-to-sidecar hop and the hop to the local app both go through
//! [`Connector`]. mTLS (the identity issue) slots in here as another
//! `MeshIo` variant and a TLS step in [`Connector::connect`], so nothing above
//! this module changes when it lands.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Why opening a connection failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("connect to {addr}: {reason}")]
    Io { addr: SocketAddr, reason: String },
    #[error("HTTP/2 handshake with {addr}: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("{addr} is backing off after {failures} failed connects (last: {last})")]
    BackingOff {
        addr: SocketAddr,
        failures: u32,
        last: String,
    },
}

/// A connected byte stream: plain TCP today, TLS over TCP with the identity issue.
#[derive(Debug)]
pub enum MeshIo {
    Plain(TcpStream),
}

impl MeshIo {
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            MeshIo::Plain(s) => s.peer_addr(),
        }
    }
}

impl AsyncRead for MeshIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MeshIo::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens transport connections to one kind of peer (other sidecars, or the
/// local app). Cheap to clone; the TLS client config will live here.
#[derive(Debug, Clone, Default)]
pub struct Connector {}

impl Connector {
    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<MeshIo, ConnectError> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout { addr, timeout })?
            .map_err(|e| ConnectError::Io {
                addr,
                reason: e.to_string(),
            })?;
        // Small gRPC frames must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        Ok(MeshIo::Plain(tcp))
    }
}
