//! One endpoint's HTTP/2 connections: a single multiplexed connection, more
//! only when the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` is reached, and
//! reconnects with jittered exponential backoff.
//!
//! Connections are driven by the `h2` client directly (not hyper's client):
//! its `SendRequest` reports the peer's live stream limit at lease time, a
//! request's head can be refused (GOAWAY, closed) without losing its body, and
//! a call needs no dispatch task. A new connection is only handed out after a
//! PING round trip, which guarantees the peer's SETTINGS (sent before anything
//! else) have been applied, so a burst of calls on a fresh connection already
//! respects the peer's limit.
//!
//! The hot path ([`Pool::acquire`] finding a connection with room) takes one
//! uncontended `std` mutex for a few instructions and never across an
//! `.await`. Callers that find no usable connection share one connect attempt
//! and wait for it on a [`Notify`], bounded by the connect timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::connect::{ConnectError, Connector};

/// Streams assumed allowed before the peer's SETTINGS arrive (RFC 9113 recommends ≥ 100).
const INITIAL_MAX_STREAMS: usize = 100;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// HTTP/2 client settings shared by every connection a sidecar opens.
#[derive(Debug, Clone)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_header_list_size: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Most connections one endpoint gets; past it calls queue in HTTP/2.
    pub max_connections: usize,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            stream_window: 1 << 20,
            connection_window: 4 << 20,
            max_frame_size: 64 << 10,
            max_header_list_size: 64 << 10,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            max_connections: 8,
        }
    }
}

pub(crate) type SendRequest = h2::client::SendRequest<Bytes>;

/// One established HTTP/2 connection.
#[derive(Debug)]
struct Conn {
    id: u64,
    send: SendRequest,
    /// Streams we have open on it (our count; h2 keeps its own).
    active: AtomicUsize,
    /// Set once the peer sent GOAWAY or the connection failed: no new streams.
    closed: AtomicBool,
}

impl Conn {
    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.is_open() && self.active.load(Ordering::Relaxed) < self.send.current_max_send_streams()
    }
}

/// A stream slot on a connection, held for the life of one call.
#[derive(Debug)]
pub struct Lease {
    conn: Arc<Conn>,
}

impl Lease {
    pub(crate) fn sender(&self) -> SendRequest {
        self.conn.send.clone()
    }

    /// The connection refused new streams (GOAWAY, closed): lease no more on it.
    pub(crate) fn mark_closed(&self) {
        self.conn.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct State {
    conns: Vec<Arc<Conn>>,
    connecting: bool,
    /// Bumped each time a connect attempt finishes, so waiters know theirs did.
    epoch: u64,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<ConnectError>,
}

/// Counters shown on the admin `/clusters` page.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
}

#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    connector: Connector,
    connect_timeout_ms: AtomicU64,
    settings: Arc<H2Settings>,
    state: Mutex<State>,
    changed: Notify,
    /// Mirrors "no connection and inside a backoff window", read lock-free by the balancer.
    backing_off: AtomicBool,
    /// Bumped when `backing_off` changes (the cluster's health generation).
    changes: Arc<AtomicU32>,
    next_id: AtomicU64,
    pub stats: PoolStats,
}

impl Pool {
    pub fn new(
        addr: SocketAddr,
        connector: Connector,
        connect_timeout: Duration,
        settings: Arc<H2Settings>,
        changes: Arc<AtomicU32>,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr,
            connector,
            connect_timeout_ms: AtomicU64::new(connect_timeout.as_millis() as u64),
            settings,
            state: Mutex::default(),
            changed: Notify::new(),
            backing_off: AtomicBool::new(false),
            changes,
            next_id: AtomicU64::new(1),
            stats: PoolStats::default(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed))
    }

    pub fn set_connect_timeout(&self, t: Duration) {
        self.connect_timeout_ms
            .store(t.as_millis() as u64, Ordering::Relaxed);
    }

    fn set_backing_off(&self, on: bool) {
        if self.backing_off.swap(on, Ordering::Relaxed) != on {
            self.changes.fetch_add(1, Ordering::Release);
        }
    }

    /// False while the endpoint is unreachable and waiting out a backoff.
    pub fn is_available(&self) -> bool {
        !self.backing_off.load(Ordering::Relaxed)
    }

    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent
        // in a way that matters more than refusing all traffic would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream slot on a connection with room, connecting if there is none.
    /// Fails fast while the endpoint is backing off, so the caller can fail over.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, ConnectError> {
        // The connect timeout bounds TCP connect plus the HTTP/2 handshake; give
        // waiters a little more so the attempt itself reports the timeout.
        let deadline =
            tokio::time::Instant::now() + self.connect_timeout() + Duration::from_millis(50);
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            let epoch = {
                let mut st = self.lock();
                if let Some(lease) = Self::lease_with_room(&mut st) {
                    return Ok(lease);
                }
                if st.conns.len() >= self.settings.max_connections {
                    // At the connection cap: share the least busy one; HTTP/2 queues the stream.
                    if let Some(c) = st
                        .conns
                        .iter()
                        .filter(|c| c.is_open())
                        .min_by_key(|c| c.active.load(Ordering::Relaxed))
                    {
                        c.active.fetch_add(1, Ordering::Relaxed);
                        return Ok(Lease { conn: c.clone() });
                    }
                }
                if st.conns.is_empty()
                    && let Some(at) = st.retry_at
                    && Instant::now() < at
                {
                    return Err(ConnectError::BackingOff {
                        addr: self.addr,
                        failures: st.failures,
                        last: st
                            .last_error
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                    });
                }
                if !st.connecting {
                    st.connecting = true;
                    tokio::spawn(connect_loop(Arc::downgrade(self)));
                }
                notified.as_mut().enable();
                st.epoch
            };
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(ConnectError::Timeout {
                    addr: self.addr,
                    timeout: self.connect_timeout(),
                });
            }
            let st = self.lock();
            if st.epoch != epoch
                && st.conns.is_empty()
                && let Some(err) = &st.last_error
            {
                return Err(err.clone());
            }
        }
    }

    fn lease_with_room(st: &mut State) -> Option<Lease> {
        st.conns.retain(|c| c.is_open());
        let c = st
            .conns
            .iter()
            .filter(|c| c.has_room())
            .min_by_key(|c| c.active.load(Ordering::Relaxed))?;
        c.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease { conn: c.clone() })
    }

    /// Opens one connection, starts its driver and keepalive tasks, and waits
    /// for a PING round trip so the peer's SETTINGS are in effect.
    async fn open(self: &Arc<Self>) -> Result<Arc<Conn>, ConnectError> {
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        let timeout = self.connect_timeout();
        let addr = self.addr;
        let setup = async {
            let io = self.connector.connect(addr, timeout).await?;
            let s = &self.settings;
            let handshake_err = |e: h2::Error| ConnectError::Handshake {
                addr,
                reason: e.to_string(),
            };
            let (send, mut conn) = h2::client::Builder::new()
                .initial_window_size(s.stream_window)
                .initial_connection_window_size(s.connection_window)
                .max_frame_size(s.max_frame_size)
                .max_header_list_size(s.max_header_list_size)
                .initial_max_send_streams(INITIAL_MAX_STREAMS)
                .enable_push(false)
                .handshake::<_, Bytes>(io)
                .await
                .map_err(handshake_err)?;
            let mut ping = conn.ping_pong().ok_or_else(|| ConnectError::Handshake {
                addr,
                reason: "no ping handle".into(),
            })?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let driver = tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%addr, conn = id, error = %e, "upstream connection ended");
                }
            });
            let abort = driver.abort_handle();
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                let _ = driver.await;
                if let Some(pool) = pool.upgrade() {
                    pool.lock().conns.retain(|c| c.id != id);
                    pool.changed.notify_waiters();
                }
            });
            if let Err(e) = ping.ping(h2::Ping::opaque()).await {
                abort.abort();
                return Err(handshake_err(e));
            }
            tokio::spawn(keepalive(
                ping,
                abort,
                s.keepalive_interval,
                s.keepalive_timeout,
                addr,
            ));
            Ok(Arc::new(Conn {
                id,
                send,
                active: AtomicUsize::new(0),
                closed: AtomicBool::new(false),
            }))
        };
        let conn = tokio::time::timeout(timeout, setup)
            .await
            .map_err(|_| ConnectError::Timeout { addr, timeout })??;
        tracing::debug!(%addr, conn = conn.id, max_streams = conn.send.current_max_send_streams(), "upstream connection established");
        Ok(conn)
    }
}

/// Pings the peer every `interval`; a pong missing for `timeout` closes the
/// connection, so a dead peer fails calls fast instead of hanging them.
async fn keepalive(
    mut ping: h2::PingPong,
    conn: tokio::task::AbortHandle,
    interval: Duration,
    timeout: Duration,
    addr: SocketAddr,
) {
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        if conn.is_finished() {
            return;
        }
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return, // connection gone
            Err(_) => {
                tracing::warn!(%addr, ?timeout, "keepalive ping timed out; closing connection");
                conn.abort();
                return;
            }
        }
    }
}

/// Connects, and while connecting fails, retries after a jittered exponential
/// backoff for as long as the pool exists and still has no connection.
async fn connect_loop(pool: Weak<Pool>) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        let result = p.open().await;
        let delay = {
            let mut st = p.lock();
            st.connecting = false;
            st.epoch += 1;
            match result {
                Ok(conn) => {
                    st.conns.push(conn);
                    st.failures = 0;
                    st.retry_at = None;
                    st.last_error = None;
                    p.set_backing_off(false);
                    None
                }
                Err(e) => {
                    p.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    st.failures = st.failures.saturating_add(1);
                    let delay = backoff(st.failures);
                    tracing::warn!(addr = %p.addr, error = %e, failures = st.failures, retry_in = ?delay, "connect failed");
                    st.retry_at = Some(Instant::now() + delay);
                    st.last_error = Some(e);
                    p.set_backing_off(st.conns.is_empty());
                    Some(delay)
                }
            }
        };
        p.changed.notify_waiters();
        drop(p);
        let Some(delay) = delay else { return };
        tokio::time::sleep(delay).await;
        let Some(p) = pool.upgrade() else { return };
        let mut st = p.lock();
        if st.connecting || !st.conns.is_empty() {
            return;
        }
        st.connecting = true;
    }
}

/// Full-jitter exponential backoff between half and all of `base * 2^n`, capped.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1 << failures.min(16).saturating_sub(1));
    let cap = exp.min(BACKOFF_MAX);
    cap.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for n in 1..40 {
            let d = backoff(n);
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << n.min(16).saturating_sub(1))
                .min(BACKOFF_MAX);
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "n={n} d={d:?} ceiling={ceiling:?}"
            );
        }
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(30) >= Duration::from_secs(5));
    }
}
