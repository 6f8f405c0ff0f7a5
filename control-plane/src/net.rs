//! Accepting connections on the control plane's ports.
//!
//! Every port accepts through [`accept`]: an accept error (out of file
//! descriptors, `ENFILE`, `ENOBUFS`, ...) never makes a loop spin. The loop
//! waits, doubling from 5 ms up to 1 s while the errors last, and logs the
//! first error of a run and then at most one line every 10 s with the count,
//! so a descriptor shortage costs neither CPU nor gigabytes of log. The
//! connections that could not be taken wait in the kernel's backlog and are
//! accepted once descriptors are free again.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// First wait after an accept error.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest wait between two tries while errors last.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this long during a run of errors.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The accept state of one port: its name (for logs) and the current run of
/// errors.
#[derive(Debug)]
pub(crate) struct Acceptor {
    port: &'static str,
    backoff: Duration,
    errors: u64,
    logged_at: Option<Instant>,
}

impl Acceptor {
    pub(crate) fn new(port: &'static str) -> Self {
        Self {
            port,
            backoff: FIRST_BACKOFF,
            errors: 0,
            logged_at: None,
        }
    }

    /// The next connection; errors are waited out (see the module docs).
    /// Cancel-safe: dropping the future loses no connection.
    pub(crate) async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(c) => {
                    if self.errors > 0 {
                        tracing::info!(
                            port = self.port,
                            errors = self.errors,
                            "accepting connections again"
                        );
                    }
                    self.errors = 0;
                    self.backoff = FIRST_BACKOFF;
                    self.logged_at = None;
                    return c;
                }
                Err(e) => {
                    self.errors += 1;
                    let now = Instant::now();
                    if self.logged_at.is_none_or(|t| now - t >= LOG_EVERY) {
                        tracing::warn!(
                            port = self.port,
                            error = %e,
                            errors = self.errors,
                            retry_in = ?self.backoff,
                            "accept failed; backing off"
                        );
                        self.logged_at = Some(now);
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// The plaintext gRPC port's connections for tonic, through an [`Acceptor`]
/// (tonic's own loop over a listener stream retries errors at once).
pub(crate) fn incoming(
    listener: TcpListener,
    port: &'static str,
) -> impl futures_util::Stream<Item = std::io::Result<TcpStream>> + Send + 'static {
    futures_util::stream::unfold(
        (listener, Acceptor::new(port)),
        |(listener, mut acceptor)| async move {
            let (tcp, _) = acceptor.accept(&listener).await;
            let _ = tcp.set_nodelay(true);
            Some((Ok(tcp), (listener, acceptor)))
        },
    )
}
