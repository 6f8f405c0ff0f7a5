//! PROXY protocol v2 on a public listener, from trusted proxies only: an L4
//! load balancer in front of the gateway (HAProxy `send-proxy-v2`, AWS NLB)
//! states the client's address in a binary header before the TLS handshake.
//!
//! A connection from a peer in `trusted_proxies.cidrs` must start with the
//! header; any other peer is served directly and never gets to name an
//! address (a header from it fails its TLS handshake). Parsing is `ppp`'s.

use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The fixed part: 12 signature bytes, version/command, family, length.
const FIXED: usize = 16;
/// Longest header accepted (addresses and TLVs); real ones are far shorter.
const MAX_HEADER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a PROXY protocol v2 header")]
    NotV2,
    #[error("PROXY header of {0} bytes is too long")]
    TooLong(usize),
    #[error("bad PROXY header: {0}")]
    Parse(String),
}

/// Reads the header; the client's address (`None` for a `LOCAL` command,
/// the proxy's own health checks, or an address family without one).
pub async fn read_v2(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyProtocolError> {
    let mut buf = vec![0u8; FIXED];
    tcp.read_exact(&mut buf).await?;
    if !buf.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        return Err(ProxyProtocolError::NotV2);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Err(ProxyProtocolError::TooLong(len));
    }
    buf.resize(FIXED + len, 0);
    tcp.read_exact(&mut buf[FIXED..]).await?;
    let h = ppp::v2::Header::try_from(buf.as_slice())
        .map_err(|e| ProxyProtocolError::Parse(e.to_string()))?;
    if h.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        _ => None,
    })
}

/// A public listener's TLS, and whether trusted peers speak PROXY v2 first.
#[derive(Debug)]
pub struct PublicTls {
    pub tls: std::sync::Arc<rustls::ServerConfig>,
    /// Peers that must send a PROXY v2 header (empty: PROXY protocol off).
    pub proxies: Vec<ipnet::IpNet>,
}

impl PublicTls {
    /// The PROXY header (from a trusted peer), then the TLS handshake; the
    /// stream and the client address the proxy reported.
    pub(crate) async fn accept(
        &self,
        mut tcp: TcpStream,
    ) -> Result<
        (
            tokio_rustls::server::TlsStream<TcpStream>,
            Option<SocketAddr>,
        ),
        std::io::Error,
    > {
        let peer = tcp.peer_addr()?.ip().to_canonical();
        let source = if self.proxies.iter().any(|c| c.contains(&peer)) {
            read_v2(&mut tcp)
                .await
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        } else {
            None
        };
        let stream = tokio_rustls::TlsAcceptor::from(self.tls.clone())
            .accept(tcp)
            .await?;
        Ok((stream, source))
    }
}
