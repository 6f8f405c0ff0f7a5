//! The shared store: the configuration in etcd, for several interchangeable
//! control-plane replicas (`--etcd URL[,URL...]`).
//!
//! Keys, all under the prefix (`--etcd-prefix`, default `/meshwire/`, so
//! several meshes can share one etcd without seeing each other's keys):
//! - `version` → the configuration version, decimal;
//! - `services/<name>` → JSON [`ServiceRecord`];
//! - `endpoints/<service>/<address>` → JSON [`EndpointRecord`].
//!
//! ```text
//! commit(base, change) ─▶ etcd Txn: if version == base
//!                            then put/delete the change's keys, version = base + 1
//!                            else → StoreError::Conflict (another replica was first)
//! follow ─▶ Watch(prefix, from the loaded revision + 1), one etcd revision = one commit
//!           ─▶ Remote::Commit { version, changes } ─▶ Registry::apply_remote
//!   stream broken ─▶ jittered backoff, watch again from the last revision applied
//!   revision compacted ─▶ full re-list ─▶ Remote::Reset (swapped in whole, no gap)
//! ```
//! Every replica so holds the same state at the same version; xDS versions
//! come from it, so they are the same on every replica.
//!
//! Presence and leadership (`presence`): each replica holds an etcd lease
//! (TTL [`LEASE_TTL`], kept alive every third of it) and, on it,
//! `replicas/<id>` → JSON [`ReplicaRecord`] (address, applied revision,
//! version) and, if nobody holds it, `leader` → its id (a Txn that creates
//! the key only if it does not exist). A replica that dies loses its lease, so
//! its keys vanish and another one takes `leader` within the TTL plus one
//! keep-alive period. These keys carry no version: the watch skips them.
//! While it holds `leader` a replica publishes [`Leadership`] (its lease and
//! the key's create revision); leader-only writes ([`EtcdKv::txn_as_leader`])
//! compare that create revision in the same Txn, so a leader paused past its
//! lease (another replica has created the key anew since) cannot write.
//!
//! The CA keeps its state under `ca/` ([`EtcdKv`], see `crate::ca`): the roots
//! (keys sealed), the signing choice and the join tokens; the configuration
//! watch skips those keys too.
//!
//! The etcd v3 API is spoken through the `etcd-client` crate, one client per
//! member on its own lazily connected tonic channel: fail-over is ours, so we
//! know whether a write was sent (a call that cannot reach one member goes
//! to the next; one that was sent and not answered is reported unconfirmed).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient,
    LeaseClient, PutOptions, Txn, TxnOp, WatchClient, WatchOptions,
};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use super::{
    Change, EndpointRecord, Loaded, Presence, Remote, ReplicaRecord, Replicas, ServiceRecord,
    Store, StoreError, assemble,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/meshwire/";

const VERSION_KEY: &str = "version";
const REPLICAS: &str = "replicas/";
const LEADER_KEY: &str = "leader";
/// The CA's keys (roots, signing choice, join tokens): not configuration.
const CA: &str = "ca/";

/// How long a dead replica stays listed (and leader).
pub const LEASE_TTL: Duration = Duration::from_secs(5);
const SERVICES: &str = "services/";
const ENDPOINTS: &str = "endpoints/";

/// Commits reported from the watch that the registry has not applied yet.
const FOLLOW_BUFFER: usize = 256;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://host:2379`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// Every key lives under it; ends with `/`.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// Longest wait for one etcd call before the next member is tried (reads)
    /// or the write is refused as unavailable.
    pub request_timeout: Duration,
}

/// TLS to etcd: the CA that signed its serving certificates, and optionally
/// a client certificate (etcd's `--client-cert-auth`).
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.into(),
            tls: None,
            request_timeout: Duration::from_secs(5),
        }
    }

    /// `prefix` with exactly one trailing `/`.
    pub fn normalize_prefix(prefix: &str) -> String {
        format!("{}/", prefix.trim_end_matches('/'))
    }

    /// Checks the URLs and TLS files; the error names the flag.
    pub fn check(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("--etcd: at least one URL".into());
        }
        for u in &self.endpoints {
            let uri: http::Uri = u
                .parse()
                .map_err(|e| format!("--etcd {u:?}: not a URL ({e})"))?;
            match (uri.scheme_str(), &self.tls) {
                (Some("http"), None) | (Some("https"), Some(_)) => {}
                (Some("https"), None) => {
                    return Err(format!("--etcd {u:?}: https needs --etcd-ca"));
                }
                (Some("http"), Some(_)) => {
                    return Err(format!("--etcd {u:?}: --etcd-ca given, so use https://"));
                }
                _ => {
                    return Err(format!(
                        "--etcd {u:?}: write http://host:port or https://host:port"
                    ));
                }
            }
            if uri.host().is_none() || uri.port_u16().is_none() {
                return Err(format!(
                    "--etcd {u:?}: write http://host:port or https://host:port"
                ));
            }
        }
        if self.prefix.is_empty() || self.prefix == "/" {
            return Err(
                "--etcd-prefix: must not be empty (every mesh on one etcd needs its own)".into(),
            );
        }
        Ok(())
    }
}

// === the etcd client ===

/// The clients of one member, sharing its channel.
#[derive(Clone)]
struct Member {
    kv: KvClient,
    lease: LeaseClient,
    /// Asks for etcd's `hasleader`: a member cut off from the leader cancels
    /// the watch instead of going quiet.
    watch: WatchClient,
}

/// One channel per member; calls go to the one that answered last.
#[derive(Clone)]
struct Client {
    members: Arc<[Member]>,
    current: Arc<AtomicUsize>,
    names: Arc<str>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.names)
            .finish_non_exhaustive()
    }
}

/// What a failed call tells about etcd.
enum Failure {
    /// Nothing could reach etcd: the request was never sent.
    NotSent(String),
    /// etcd (or the link to it) failed after the request was sent.
    Unavailable(String),
    /// etcd refused the request itself.
    Refused(String),
}

fn failure(e: &etcd_client::Error) -> Failure {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return match e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
                Failure::NotSent(e.to_string())
            }
            _ => Failure::Refused(e.to_string()),
        };
    };
    let from_etcd = s.message().contains("etcdserver:");
    let unavailable = matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    ) || (s.code() == tonic::Code::Unknown && !from_etcd);
    // Only a failed connection proves the request never left.
    let never_sent = s.code() == tonic::Code::Unavailable
        && !from_etcd
        && (s.message().contains("connect") || s.message().contains("refused"));
    let msg = s.message().to_owned();
    if never_sent {
        Failure::NotSent(msg)
    } else if unavailable {
        Failure::Unavailable(msg)
    } else {
        Failure::Refused(msg)
    }
}

impl Client {
    async fn new(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        let open = |reason: String| StoreError::Open {
            path: format!("etcd {}", cfg.endpoints.join(",")),
            reason,
        };
        let tls = match &cfg.tls {
            Some(t) => Some(tls::connector(t).map_err(open)?),
            None => None,
        };
        let mut members = Vec::with_capacity(cfg.endpoints.len());
        for url in &cfg.endpoints {
            let ep = Endpoint::from_shared(url.clone())
                .map_err(|e| open(format!("{url}: {e}")))?
                .connect_timeout(Duration::from_secs(2))
                // A member that stops answering (partitioned, SIGSTOPped) is
                // noticed, and its watch moved to another one.
                .http2_keep_alive_interval(Duration::from_secs(2))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            // Our connector does the TLS (tonic's own would need its TLS
            // feature, which refuses https:// origins on custom connectors).
            let channel = etcd_client::Channel::Tonic(match &tls {
                Some(c) => ep.connect_with_connector_lazy(c.clone()),
                None => ep.connect_lazy(),
            });
            let client = |options| async {
                etcd_client::Client::from_channel(channel.clone(), Some(options))
                    .await
                    .map_err(|e| open(format!("{url}: {e}")))
            };
            let plain = client(ConnectOptions::new()).await?;
            let kv = plain.kv_client().max_decoding_message_size(256 << 20);
            let lease = plain.lease_client();
            let watch = client(ConnectOptions::new().with_require_leader(true))
                .await?
                .watch_client()
                .max_decoding_message_size(256 << 20);
            members.push(Member { kv, lease, watch });
        }
        Ok(Self {
            members: members.into(),
            current: Arc::default(),
            names: cfg.endpoints.join(",").into(),
            timeout: cfg.request_timeout,
        })
    }

    fn unavailable(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.names.to_string(),
            reason: reason.into(),
        }
    }

    fn unconfirmed(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Unconfirmed {
            endpoints: self.names.to_string(),
            reason: reason.into(),
        }
    }

    /// Runs `f` on the current member, then on the others while they cannot
    /// be reached (a write only while it surely was not sent).
    async fn call<T, F, Fut>(&self, write: bool, f: F) -> Result<T, StoreError>
    where
        F: Fn(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.members.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let outcome = tokio::time::timeout(self.timeout, f(self.members[i].kv.clone())).await;
            let reason = match outcome {
                Ok(Ok(r)) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(r);
                }
                Ok(Err(e)) => match failure(&e) {
                    Failure::NotSent(m) => m,
                    Failure::Unavailable(m) if !write => m,
                    // Sent, but not confirmed: it may still be applied. The
                    // next call tries the next member first.
                    Failure::Unavailable(m) => {
                        self.current.store((i + 1) % n, Ordering::Relaxed);
                        return Err(self.unconfirmed(m));
                    }
                    Failure::Refused(m) => return Err(StoreError::Database(format!("etcd: {m}"))),
                },
                Err(_) if write => {
                    self.current.store((i + 1) % n, Ordering::Relaxed);
                    return Err(self
                        .unconfirmed(format!("no answer within {:?} (no quorum?)", self.timeout)));
                }
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            last = reason;
        }
        Err(self.unavailable(last))
    }
}

/// The end of `prefix`'s key range.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

// === the store ===

/// The configuration in etcd; see the module docs.
pub struct EtcdStore {
    client: Client,
    prefix: String,
    closed: CancellationToken,
    /// The last revision the watch delivered (for `describe`).
    applied: Arc<AtomicI64>,
    /// This replica's id, once announced.
    me: std::sync::OnceLock<String>,
    /// `Some` while this replica holds the leader key.
    leadership: watch::Sender<Option<Leadership>>,
}

/// This replica holds the leader key: on this lease, created at this revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// This replica's id (the leader key's value).
    pub replica: String,
    pub lease: i64,
    pub create_revision: i64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.client.names)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn key(prefix: &str, rest: &str) -> Vec<u8> {
    format!("{prefix}{rest}").into_bytes()
}

fn endpoint_key(prefix: &str, service: &str, address: &std::net::SocketAddr) -> Vec<u8> {
    key(prefix, &format!("{ENDPOINTS}{service}/{address}"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize to JSON")
}

fn put(key: Vec<u8>, value: Vec<u8>) -> TxnOp {
    TxnOp::put(key, value, None)
}

fn delete(key: Vec<u8>, range_end: Option<Vec<u8>>) -> TxnOp {
    TxnOp::delete(
        key,
        range_end.map(|end| DeleteOptions::new().with_range(end)),
    )
}

impl EtcdStore {
    /// Connects lazily: nothing is sent until the first call.
    pub async fn new(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        Ok(Self {
            client: Client::new(cfg).await?,
            prefix: EtcdConfig::normalize_prefix(&cfg.prefix),
            closed: CancellationToken::new(),
            applied: Arc::default(),
            me: std::sync::OnceLock::new(),
            leadership: watch::channel(None).0,
        })
    }

    /// A handle on the CA's keys (`ca/...`) and on leader-only writes.
    pub fn kv(&self) -> EtcdKv {
        EtcdKv {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            leadership: self.leadership.subscribe(),
            closed: self.closed.clone(),
        }
    }

    fn ops_for(&self, change: &Change) -> Vec<TxnOp> {
        let p = &self.prefix;
        match change {
            Change::ServiceCreated(c) | Change::ServiceUpdated(c) => vec![put(
                key(p, &format!("{SERVICES}{}", c.name)),
                to_json(&ServiceRecord::from(c)),
            )],
            Change::ServiceDeleted { name, .. } => {
                // Service names contain no '/': this is exactly its endpoints.
                let eps = key(p, &format!("{ENDPOINTS}{name}/"));
                let end = range_end(&eps);
                vec![
                    delete(eps, Some(end)),
                    delete(key(p, &format!("{SERVICES}{name}")), None),
                ]
            }
            Change::EndpointAdded { service, endpoint }
            | Change::EndpointUpdated { service, endpoint } => vec![put(
                endpoint_key(p, service, &endpoint.address),
                to_json(&EndpointRecord::from(endpoint)),
            )],
            Change::EndpointRemoved { service, address } => {
                vec![delete(endpoint_key(p, service, address), None)]
            }
        }
    }
}

/// Reads everything under `prefix` at one revision.
async fn load(client: &Client, prefix: &str) -> Result<Loaded, StoreError> {
    let k = prefix.as_bytes().to_vec();
    let end = range_end(&k);
    let resp = client
        .call(false, |mut kv| {
            let (k, end) = (k.clone(), end.clone());
            async move { kv.get(k, Some(GetOptions::new().with_range(end))).await }
        })
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut version = 0;
    let mut services = Vec::new();
    let mut endpoints: std::collections::BTreeMap<String, Vec<EndpointRecord>> = Default::default();
    for kv in resp.kvs() {
        let full = String::from_utf8_lossy(kv.key()).into_owned();
        let rel = &full[prefix.len().min(full.len())..];
        let corrupt = |reason: String| StoreError::Corrupt {
            key: full.clone(),
            reason,
        };
        if rel == VERSION_KEY {
            version = parse_version(kv.value()).map_err(corrupt)?;
        } else if rel.starts_with(SERVICES) {
            services.push(serde_json::from_slice(kv.value()).map_err(|e| corrupt(e.to_string()))?);
        } else if let Some(rest) = rel.strip_prefix(ENDPOINTS) {
            let (service, _) = rest
                .split_once('/')
                .ok_or_else(|| corrupt("key has no service".into()))?;
            let rec: EndpointRecord =
                serde_json::from_slice(kv.value()).map_err(|e| corrupt(e.to_string()))?;
            endpoints.entry(service.to_owned()).or_default().push(rec);
        } else {
            tracing::debug!(key = %full, "unknown key under the prefix ignored");
        }
    }
    Ok(Loaded {
        version,
        clusters: assemble(services, endpoints)?,
        revision,
    })
}

fn parse_version(v: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("version {:?} is not a number", String::from_utf8_lossy(v)))
}

impl Store for EtcdStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            if self.closed.is_cancelled() {
                return Err(StoreError::Closed);
            }
            let loaded = load(&self.client, &self.prefix).await?;
            self.applied.store(loaded.revision, Ordering::Relaxed);
            Ok(loaded)
        })
    }

    fn commit<'a>(
        &'a self,
        base: u64,
        change: &'a Change,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            if self.closed.is_cancelled() {
                return Err(StoreError::Closed);
            }
            let version_key = key(&self.prefix, VERSION_KEY);
            let guard = if base == 0 {
                // Version 0 is the key not existing yet.
                Compare::version(version_key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::value(version_key.clone(), CompareOp::Equal, base.to_string())
            };
            let next = base + 1;
            let mut success = self.ops_for(change);
            success.push(put(version_key, next.to_string().into_bytes()));
            let txn = Txn::new().when([guard]).and_then(success);
            let resp = self
                .client
                .call(true, |mut kv| {
                    let txn = txn.clone();
                    async move { kv.txn(txn).await }
                })
                .await?;
            if !resp.succeeded() {
                return Err(StoreError::Conflict { base });
            }
            tracing::debug!(
                version = next,
                revision = resp.header().map(|h| h.revision()).unwrap_or(0),
                service = change.service(),
                "committed to etcd"
            );
            Ok(next)
        })
    }

    fn follow(&self, revision: i64) -> Option<mpsc::Receiver<Remote>> {
        let (tx, rx) = mpsc::channel(FOLLOW_BUFFER);
        tokio::spawn(follow(
            self.client.clone(),
            self.prefix.clone(),
            revision,
            tx,
            self.applied.clone(),
            self.closed.clone(),
        ));
        Some(rx)
    }

    fn announce(&self, me: Presence) {
        if self.me.set(me.id.clone()).is_err() {
            return;
        }
        tokio::spawn(presence(
            self.client.clone(),
            self.prefix.clone(),
            me,
            self.applied.clone(),
            self.leadership.clone(),
            self.closed.clone(),
        ));
    }

    fn replicas(&self) -> BoxFuture<'_, Result<Option<Replicas>, StoreError>> {
        Box::pin(async move {
            let k = key(&self.prefix, REPLICAS);
            let end = range_end(&k);
            let listed = self
                .client
                .call(false, |mut kv| {
                    let (k, end) = (k.clone(), end.clone());
                    async move { kv.get(k, Some(GetOptions::new().with_range(end))).await }
                })
                .await?;
            let leader_key = key(&self.prefix, LEADER_KEY);
            let leader = self
                .client
                .call(false, |mut kv| {
                    let k = leader_key.clone();
                    async move { kv.get(k, None).await }
                })
                .await?;
            let mut replicas: Vec<ReplicaRecord> = listed
                .kvs()
                .iter()
                .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                .collect();
            replicas.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(Some(Replicas {
                me: self.me.get().cloned().unwrap_or_default(),
                replicas,
                leader: leader
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            }))
        })
    }

    fn describe(&self) -> String {
        format!(
            "etcd:{} prefix {} revision {}",
            self.client.names,
            self.prefix,
            self.applied.load(Ordering::Relaxed)
        )
    }

    fn close(&self) {
        self.closed.cancel();
    }
}

// === the CA's keys ===

/// One value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// What a leader-only write does (keys relative to the prefix).
#[derive(Debug, Clone)]
pub enum LeaderOp {
    Put(String, Vec<u8>),
    Delete(String),
}

/// The CA's handle on etcd: keys relative to the prefix, compare-and-swap
/// writes, leader-only (fenced) writes, and a follower of one key. Cheap to
/// clone; every call fails with [`StoreError::Unavailable`] (naming etcd)
/// when no member answers.
#[derive(Clone)]
pub struct EtcdKv {
    client: Client,
    prefix: String,
    leadership: watch::Receiver<Option<Leadership>>,
    closed: CancellationToken,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("endpoints", &self.client.names)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdKv {
    fn key(&self, rel: &str) -> Vec<u8> {
        key(&self.prefix, rel)
    }

    fn open(&self) -> Result<(), StoreError> {
        if self.closed.is_cancelled() {
            Err(StoreError::Closed)
        } else {
            Ok(())
        }
    }

    /// The value at `rel`, if any.
    pub async fn get(&self, rel: &str) -> Result<Option<Versioned>, StoreError> {
        self.open()?;
        let k = self.key(rel);
        let resp = self
            .client
            .call(false, |mut kv| {
                let k = k.clone();
                async move { kv.get(k, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// Every key under `rel` (names relative to it).
    pub async fn list(&self, rel: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.open()?;
        let k = self.key(rel);
        let end = range_end(&k);
        let resp = self
            .client
            .call(false, |mut kv| {
                let (k, end) = (k.clone(), end.clone());
                async move { kv.get(k, Some(GetOptions::new().with_range(end))).await }
            })
            .await?;
        let skip = k.len();
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key()[skip.min(kv.key().len())..]).into_owned(),
                    Versioned {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                )
            })
            .collect())
    }

    /// Writes `value` at `rel` if the key was last written at `expect`
    /// (0: if it does not exist). `Ok(false)`: another writer was first,
    /// nothing was written.
    pub async fn put_if(&self, rel: &str, value: Vec<u8>, expect: i64) -> Result<bool, StoreError> {
        self.open()?;
        let k = self.key(rel);
        let guard = if expect == 0 {
            Compare::create_revision(k.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(k.clone(), CompareOp::Equal, expect)
        };
        let txn = Txn::new().when([guard]).and_then([put(k, value)]);
        let resp = self
            .client
            .call(true, |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// `Some` while this replica holds the leader key.
    pub fn leadership(&self) -> watch::Receiver<Option<Leadership>> {
        self.leadership.clone()
    }

    /// Runs `ops` only if the leader key is still the one `lead` created:
    /// a replica that lost its lease (paused, cut off) and has not noticed
    /// yet is refused by etcd itself ([`StoreError::NotLeader`]).
    pub async fn txn_as_leader(
        &self,
        lead: &Leadership,
        ops: &[LeaderOp],
    ) -> Result<(), StoreError> {
        self.open()?;
        let fence =
            Compare::create_revision(self.key(LEADER_KEY), CompareOp::Equal, lead.create_revision);
        let ops: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                LeaderOp::Put(rel, v) => put(self.key(rel), v.clone()),
                LeaderOp::Delete(rel) => delete(self.key(rel), None),
            })
            .collect();
        let txn = Txn::new().when([fence]).and_then(ops);
        let resp = self
            .client
            .call(true, |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(StoreError::NotLeader)
        }
    }

    /// Follows the value at `rel`: its current value (read on every
    /// (re)connect, so nothing missed while cut off is lost), then every
    /// change; `None` for a deleted key. Ends when the store closes.
    pub fn follow_key(&self, rel: &str) -> mpsc::Receiver<Option<Versioned>> {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let rel = rel.to_owned();
        tokio::spawn(async move {
            let mut failures = 0u32;
            let mut member = this.client.current.load(Ordering::Relaxed);
            loop {
                let end = tokio::select! {
                    () = this.closed.cancelled() => return,
                    end = this.follow_key_once(member, &rel, &tx) => end,
                };
                match end {
                    WatchEnd::Closed => return,
                    WatchEnd::Compacted(_) | WatchEnd::Failed(_) => {
                        if let WatchEnd::Failed(reason) = end {
                            tracing::debug!(key = %rel, member, %reason, "etcd key watch broken; resuming");
                        }
                        member = (member + 1) % this.client.members.len();
                    }
                }
                failures = failures.saturating_add(1);
                let exp = BACKOFF_BASE.saturating_mul(1 << failures.min(6).saturating_sub(1));
                let delay = exp.min(BACKOFF_MAX).mul_f64(0.5 + fastrand::f64() * 0.5);
                tokio::select! {
                    () = this.closed.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        });
        rx
    }

    async fn follow_key_once(
        &self,
        member: usize,
        rel: &str,
        tx: &mpsc::Sender<Option<Versioned>>,
    ) -> WatchEnd {
        let k = self.key(rel);
        let mut kv = self.client.members[member].kv.clone();
        let got = match tokio::time::timeout(self.client.timeout, kv.get(k.clone(), None)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return WatchEnd::Failed(e.to_string()),
            Err(_) => return WatchEnd::Failed("no answer".into()),
        };
        let revision = got.header().map_or(0, |h| h.revision());
        let current = got.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        });
        if tx.send(current).await.is_err() {
            return WatchEnd::Closed;
        }
        let mut watch = self.client.members[member].watch.clone();
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = match watch.watch(k, Some(options)).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Failed(e.to_string()),
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return WatchEnd::Failed("stream ended".into()),
                Err(e) => return WatchEnd::Failed(e.to_string()),
            };
            if resp.compact_revision() > 0 {
                return WatchEnd::Compacted(resp.compact_revision());
            }
            if resp.canceled() {
                return WatchEnd::Failed(format!("watch canceled: {}", resp.cancel_reason()));
            }
            for e in resp.events() {
                let v = match (e.event_type(), e.kv()) {
                    (EventType::Put, Some(kv)) => Some(Versioned {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    }),
                    _ => None,
                };
                if tx.send(v).await.is_err() {
                    return WatchEnd::Closed;
                }
            }
        }
    }
}

// === the watch ===

/// Why one watch stream ended.
enum WatchEnd {
    /// The revision we wanted to resume from is compacted away.
    Compacted(i64),
    Failed(String),
    Closed,
}

/// Follows every change under the prefix from `revision` on; see the module docs.
async fn follow(
    client: Client,
    prefix: String,
    mut revision: i64,
    tx: mpsc::Sender<Remote>,
    applied: Arc<AtomicI64>,
    closed: CancellationToken,
) {
    let mut failures = 0u32;
    let mut member = client.current.load(Ordering::Relaxed);
    loop {
        let end = tokio::select! {
            () = closed.cancelled() => return,
            end = watch_once(&client, member, &prefix, &mut revision, &tx, &applied) => end,
        };
        match end {
            WatchEnd::Closed => return,
            WatchEnd::Compacted(at) => {
                tracing::warn!(
                    revision,
                    compacted = at,
                    "etcd compacted the history we missed; re-listing"
                );
                match load(&client, &prefix).await {
                    Ok(loaded) => {
                        revision = loaded.revision;
                        applied.store(revision, Ordering::Relaxed);
                        if tx.send(Remote::Reset(loaded)).await.is_err() {
                            return;
                        }
                        failures = 0;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "re-list failed; retrying");
                    }
                }
            }
            WatchEnd::Failed(reason) => {
                tracing::warn!(revision, member, %reason, "etcd watch broken; resuming");
                // The next attempt goes to another member.
                member = (member + 1) % client.members.len();
            }
        }
        failures = failures.saturating_add(1);
        let exp = BACKOFF_BASE.saturating_mul(1 << failures.min(6).saturating_sub(1));
        let delay = exp.min(BACKOFF_MAX).mul_f64(0.5 + fastrand::f64() * 0.5);
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One watch stream on one member, from `revision + 1`; advances `revision`
/// as commits are handed on.
async fn watch_once(
    client: &Client,
    member: usize,
    prefix: &str,
    revision: &mut i64,
    tx: &mpsc::Sender<Remote>,
    applied: &AtomicI64,
) -> WatchEnd {
    let k = prefix.as_bytes().to_vec();
    let options = WatchOptions::new()
        .with_range(range_end(&k))
        .with_start_revision(*revision + 1)
        .with_progress_notify();
    let mut watch = client.members[member].watch.clone();
    let mut stream = match watch.watch(k, Some(options)).await {
        Ok(s) => s,
        Err(e) => return WatchEnd::Failed(e.to_string()),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return WatchEnd::Failed("stream ended".into()),
            Err(e) => return WatchEnd::Failed(e.to_string()),
        };
        if resp.compact_revision() > 0 {
            return WatchEnd::Compacted(resp.compact_revision());
        }
        if resp.canceled() {
            return WatchEnd::Failed(format!("watch canceled: {}", resp.cancel_reason()));
        }
        if resp.created() {
            tracing::debug!(member, from = *revision + 1, "etcd watch started");
        }
        let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let events: Vec<Ev<'_>> = resp
            .events()
            .iter()
            .filter_map(Ev::from_etcd)
            .filter(|e| !is_presence(prefix, e.key))
            .collect();
        for (rev, remote) in group(prefix, &events) {
            if let Some(remote) = remote
                && tx.send(remote).await.is_err()
            {
                return WatchEnd::Closed;
            }
            *revision = rev;
            applied.store(rev, Ordering::Relaxed);
        }
        // A progress notification: nothing under the prefix up to here.
        if header_rev > *revision {
            *revision = header_rev;
            applied.store(header_rev, Ordering::Relaxed);
        }
    }
}

/// A replica's presence, the leader key or the CA's keys: no configuration in them.
fn is_presence(prefix: &str, key: &[u8]) -> bool {
    key.strip_prefix(prefix.as_bytes()).is_some_and(|rel| {
        rel.starts_with(REPLICAS.as_bytes())
            || rel == LEADER_KEY.as_bytes()
            || rel.starts_with(CA.as_bytes())
    })
}

// === presence and leadership ===

/// Keeps this replica announced and campaigns for leadership until the
/// store closes; see the module docs.
async fn presence(
    client: Client,
    prefix: String,
    me: Presence,
    applied: Arc<AtomicI64>,
    leadership: watch::Sender<Option<Leadership>>,
    closed: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let member = client.current.load(Ordering::Relaxed) % client.members.len();
        let result = tokio::select! {
            () = closed.cancelled() => None,
            r = present_once(&client.members[member], &prefix, &me, &applied, &leadership, &closed) => Some(r),
        };
        // Whatever ended the lease, we no longer lead on it.
        if leadership.send_replace(None).is_some() {
            tracing::warn!(replica = %me.id, "leadership lost");
        }
        let Some(result) = result else { return };
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(member, error = %e, "etcd lease lost; announcing again");
                // The next attempt goes to another member.
                let _ = client.current.compare_exchange(
                    member,
                    (member + 1) % client.members.len(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        failures = failures.saturating_add(1);
        let exp = BACKOFF_BASE.saturating_mul(1 << failures.min(6).saturating_sub(1));
        let delay = exp.min(BACKOFF_MAX).mul_f64(0.5 + fastrand::f64() * 0.5);
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One lease: announce, keep alive, campaign, until an error (or close:
/// then the lease is revoked so the others take over at once).
async fn present_once(
    member: &Member,
    prefix: &str,
    me: &Presence,
    applied: &AtomicI64,
    leadership: &watch::Sender<Option<Leadership>>,
    closed: &CancellationToken,
) -> Result<(), etcd_client::Error> {
    let mut lease = member.lease.clone();
    let mut kv = member.kv.clone();
    let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(5);
    let id = lease.grant(ttl, None).await?.id();
    let (mut keeper, mut acks) = lease.keep_alive(id).await?;
    let on_lease = || Some(PutOptions::new().with_lease(id));
    let mine = key(prefix, &format!("{REPLICAS}{}", me.id));
    let leader = key(prefix, LEADER_KEY);
    let mut tick = tokio::time::interval(LEASE_TTL / 3);
    let mut announced = None;
    let mut leading = false;
    loop {
        tokio::select! {
            () = closed.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), lease.revoke(id)).await;
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        keeper.keep_alive().await?;
        match acks.message().await? {
            Some(r) if r.ttl() > 0 => {}
            _ => {
                return Err(etcd_client::Error::LeaseKeepAliveError(
                    "lease expired".into(),
                ));
            }
        }
        let record = ReplicaRecord {
            id: me.id.clone(),
            address: me.address.clone(),
            revision: applied.load(Ordering::Relaxed),
            version: *me.version.borrow(),
        };
        if announced.as_ref() != Some(&record) {
            kv.put(mine.clone(), to_json(&record), on_lease()).await?;
            announced = Some(record);
        }
        if !leading {
            // Takes the key only if nobody holds it.
            let txn = Txn::new()
                .when([Compare::create_revision(
                    leader.clone(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(leader.clone(), me.id.clone(), on_lease())]);
            let resp = kv.txn(txn).await?;
            if resp.succeeded() {
                leading = true;
                // The Txn created the key: its revision is the key's create revision.
                let create_revision = resp.header().map_or(0, |h| h.revision());
                leadership.send_replace(Some(Leadership {
                    replica: me.id.clone(),
                    lease: id,
                    create_revision,
                }));
                tracing::info!(replica = %me.id, lease = id, create_revision, "elected leader");
            }
        }
    }
}

/// One watch event, as [`group`] reads it.
#[derive(Debug, Clone, Copy)]
struct Ev<'a> {
    put: bool,
    key: &'a [u8],
    value: &'a [u8],
    /// The etcd revision of the write.
    revision: i64,
    /// etcd's per-key version: 1 is a new key.
    version: i64,
}

impl<'a> Ev<'a> {
    fn from_etcd(e: &'a etcd_client::Event) -> Option<Self> {
        let kv = e.kv()?;
        Some(Ev {
            put: e.event_type() == EventType::Put,
            key: kv.key(),
            value: kv.value(),
            revision: kv.mod_revision(),
            version: kv.version(),
        })
    }
}

/// Splits a watch response's events into commits (one etcd revision each),
/// turned into the changes they make. A revision without our version key was
/// not written by a control plane and is skipped (logged).
fn group(prefix: &str, events: &[Ev<'_>]) -> Vec<(i64, Option<Remote>)> {
    let mut out: Vec<(i64, Option<Remote>)> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        let rev = events[i].revision;
        let mut j = i;
        while j < events.len() && events[j].revision == rev {
            j += 1;
        }
        out.push((rev, to_commit(prefix, rev, &events[i..j])));
        i = j;
    }
    out
}

fn to_commit(prefix: &str, revision: i64, events: &[Ev<'_>]) -> Option<Remote> {
    let mut version = None;
    let mut changes = Vec::new();
    let mut deleted_services: Vec<String> = Vec::new();
    let mut removed: Vec<(String, std::net::SocketAddr)> = Vec::new();
    for ev in events {
        let full = String::from_utf8_lossy(ev.key);
        let Some(rel) = full.strip_prefix(prefix) else {
            continue;
        };
        let is_put = ev.put;
        let bad = |reason: String| {
            tracing::error!(key = %full, revision, %reason, "unreadable change in etcd skipped");
        };
        if rel == VERSION_KEY {
            if is_put {
                match parse_version(ev.value) {
                    Ok(v) => version = Some(v),
                    Err(e) => bad(e),
                }
            }
        } else if let Some(name) = rel.strip_prefix(SERVICES) {
            if is_put {
                match serde_json::from_slice::<ServiceRecord>(ev.value) {
                    Ok(r) => {
                        let c = r.into_cluster();
                        // etcd's per-key version: 1 is a new key.
                        changes.push(if ev.version == 1 {
                            Change::ServiceCreated(c)
                        } else {
                            Change::ServiceUpdated(c)
                        });
                    }
                    Err(e) => bad(e.to_string()),
                }
            } else {
                deleted_services.push(name.to_owned());
            }
        } else if let Some(rest) = rel.strip_prefix(ENDPOINTS) {
            let Some((service, addr)) = rest.split_once('/') else {
                bad("key has no service".into());
                continue;
            };
            if is_put {
                match serde_json::from_slice::<EndpointRecord>(ev.value) {
                    Ok(r) => {
                        let change = if ev.version == 1 {
                            Change::EndpointAdded {
                                service: service.to_owned(),
                                endpoint: r.into(),
                            }
                        } else {
                            Change::EndpointUpdated {
                                service: service.to_owned(),
                                endpoint: r.into(),
                            }
                        };
                        changes.push(change);
                    }
                    Err(e) => bad(e.to_string()),
                }
            } else {
                match addr.parse() {
                    Ok(a) => removed.push((service.to_owned(), a)),
                    Err(_) => bad("not an address".into()),
                }
            }
        }
    }
    let Some(version) = version else {
        if !events.is_empty() {
            tracing::warn!(
                revision,
                "a write under the prefix without a version change ignored"
            );
        }
        return None;
    };
    // A service delete takes its endpoints with it, in one change.
    for name in deleted_services {
        let endpoints = removed
            .iter()
            .filter(|(s, _)| *s == name)
            .map(|(_, a)| *a)
            .collect();
        removed.retain(|(s, _)| *s != name);
        changes.push(Change::ServiceDeleted { name, endpoints });
    }
    changes.extend(
        removed
            .into_iter()
            .map(|(service, address)| Change::EndpointRemoved { service, address }),
    );
    Some(Remote::Commit {
        version,
        revision,
        changes,
    })
}

// === TLS to etcd ===

mod tls {
    use super::*;

    /// Dials TCP, then TLS with the server name from the URL (etcd's
    /// certificates name their hosts; no SPIFFE here).
    #[derive(Clone)]
    pub(super) struct Connector(Arc<rustls::ClientConfig>);

    pub(super) fn connector(t: &EtcdTls) -> Result<Connector, String> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile_certs(&read(&t.ca)?, &t.ca)? {
            roots
                .add(c)
                .map_err(|e| format!("--etcd-ca {}: {e}", t.ca.display()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(meshwire_tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match (&t.cert, &t.key) {
            (Some(cert), Some(key)) => {
                let chain = rustls_pemfile_certs(&read(cert)?, cert)?;
                let key_pem = String::from_utf8_lossy(&read(key)?).into_owned();
                let key = meshwire_tls::key_from_pem(&key_pem)
                    .map_err(|e| format!("--etcd-key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("--etcd-cert: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Connector(Arc::new(config)))
    }

    fn rustls_pemfile_certs(
        pem: &[u8],
        path: &std::path::Path,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
        let certs = meshwire_tls::certs_from_pem(&String::from_utf8_lossy(pem))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        Ok(certs)
    }

    type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    impl tower_service::Service<http::Uri> for Connector {
        type Response = Io;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Io, BoxError>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, uri: http::Uri) -> Self::Future {
            let config = self.0.clone();
            Box::pin(async move {
                let host = uri
                    .host()
                    .ok_or("no host in the etcd URL")?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let port = uri.port_u16().unwrap_or(2379);
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                let name = rustls::pki_types::ServerName::try_from(host)?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok(hyper_util::rt::TokioIo::new(tls))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_covers_the_prefix() {
        assert_eq!(range_end(b"/meshwire/"), b"/meshwire0".to_vec());
        assert_eq!(range_end(b"a\xff"), b"b".to_vec());
    }

    #[test]
    fn flags_are_checked() {
        let mut c = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]);
        assert_eq!(c.check(), Ok(()));
        c.endpoints.push("127.0.0.1:2379".into());
        assert!(c.check().unwrap_err().contains("127.0.0.1:2379"));
        c.endpoints = vec!["https://etcd:2379".into()];
        assert!(c.check().unwrap_err().contains("--etcd-ca"));
        c.endpoints = vec!["http://etcd:2379".into()];
        c.prefix = "/".into();
        assert!(c.check().unwrap_err().contains("--etcd-prefix"));
        assert_eq!(EtcdConfig::normalize_prefix("/a//"), "/a/");
        assert_eq!(EtcdConfig::normalize_prefix("mesh"), "mesh/");
    }

    fn ev<'a>(put: bool, key: &'a str, revision: i64, version: i64, value: &'a [u8]) -> Ev<'a> {
        Ev {
            put,
            key: key.as_bytes(),
            value,
            revision,
            version,
        }
    }

    #[test]
    fn watch_events_become_commits() {
        const PUT: bool = true;
        const DELETE: bool = false;
        let ep = to_json(&EndpointRecord::from(&meshwire_mesh::Endpoint::new(
            "10.0.0.1:80".parse().unwrap(),
        )));
        let svc = to_json(&ServiceRecord::from(&meshwire_mesh::Cluster::new("a")));
        let events = vec![
            ev(PUT, "/m/services/a", 5, 1, &svc),
            ev(PUT, "/m/version", 5, 1, b"1"),
            ev(PUT, "/m/endpoints/a/10.0.0.1:80", 6, 1, &ep),
            ev(PUT, "/m/version", 6, 2, b"2"),
            ev(DELETE, "/m/endpoints/a/10.0.0.1:80", 7, 0, b""),
            ev(DELETE, "/m/services/a", 7, 0, b""),
            ev(PUT, "/m/version", 7, 3, b"3"),
            ev(PUT, "/m/stray", 8, 1, b"x"),
        ];
        let got = group("/m/", &events);
        assert_eq!(got.len(), 4);
        assert!(
            matches!(&got[0].1, Some(Remote::Commit { version: 1, revision: 5, changes }) if matches!(changes[..], [Change::ServiceCreated(_)]))
        );
        assert!(
            matches!(&got[1].1, Some(Remote::Commit { version: 2, changes, .. }) if matches!(changes[..], [Change::EndpointAdded { .. }]))
        );
        match &got[2].1 {
            Some(Remote::Commit {
                version: 3,
                changes,
                ..
            }) => assert_eq!(
                changes,
                &vec![Change::ServiceDeleted {
                    name: "a".into(),
                    endpoints: vec!["10.0.0.1:80".parse().unwrap()]
                }]
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(got[3], (8, None));
    }

    #[test]
    fn presence_keys_are_not_configuration() {
        assert!(is_presence("/m/", b"/m/leader"));
        assert!(is_presence("/m/", b"/m/replicas/0a1b2c3d"));
        assert!(!is_presence("/m/", b"/m/version"));
        assert!(!is_presence("/m/", b"/m/services/leader"));
        assert!(!is_presence("/m/", b"/other/leader"));
        assert!(is_presence("/m/", b"/m/ca/tokens/00aa"));
    }
}
