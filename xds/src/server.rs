//! The xDS v3 ADS server, State-of-the-World and Delta, over [`Snapshot`]s.
//!
//! ```text
//! watch<Arc<Snapshot>> ──▶ per-stream task: on a new snapshot, for each subscribed type,
//!                          compute the resources this node asked for; if their content
//!                          changed since the last push, send them (new nonce)
//! client requests ───────▶ the same task: ACK/NACK bookkeeping (observer), subscription changes
//! ```
//! Resources are encoded once per snapshot and shared by every stream; a
//! cluster unchanged since the previous snapshot reuses its encoding. A
//! stream whose client reads slowly blocks on a bounded channel and then
//! sends only the latest state: pushes coalesce instead of queueing.
//!
//! What a node gets, by type:
//! - `Cluster`: every service (wildcard) or the ones named.
//! - `ClusterLoadAssignment`: the ones named.
//! - `Listener`: a wildcard request (stock Envoy) gets the outbound listener on
//!   the port in node metadata `meshwire.outbound_port` (default 15001, 0 for
//!   an ephemeral port), and one `tcp_proxy` listener per `tcp` service named
//!   in node metadata `meshwire.service_ports` (`{service: port}`);
//!   named listeners (proxyless gRPC, `xds:///<service>`) get API listeners.
//! - `RouteConfiguration`: `meshwire_outbound` (Envoy) routes by authority to
//!   every service; a service's name (gRPC) routes everything to it.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::{ControlPlane, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, value};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Snapshot;
use crate::resources::{self, CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// What the server tells its owner about each stream (for `meshctl status`).
pub trait StreamObserver: Send + Sync + 'static {
    fn connected(&self, stream: u64, node_id: &str, service: &str, user_agent: &str);
    fn pushed(&self, stream: u64, type_url: &str, version: &str);
    fn acked(&self, stream: u64, type_url: &str, version: &str);
    fn nacked(&self, stream: u64, type_url: &str, version: &str, error: &str);
    fn disconnected(&self, stream: u64);
}

/// Responses buffered per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 4;

/// The client went away: its stream's response channel is closed.
#[derive(Debug, thiserror::Error)]
#[error("the ADS stream closed")]
struct StreamClosed;

/// Serves the latest [`Snapshot`] to every ADS stream.
#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    observer: Arc<dyn StreamObserver>,
    cache: Arc<Mutex<Option<Arc<Encoded>>>>,
    next_stream: Arc<AtomicU64>,
}

impl std::fmt::Debug for AdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsServer").finish_non_exhaustive()
    }
}

/// One snapshot's resources, encoded once for all streams.
#[derive(Debug)]
struct Encoded {
    snapshot: Arc<Snapshot>,
    clusters: BTreeMap<String, (Any, u64)>,
    clas: BTreeMap<String, (Any, u64)>,
}

fn entry(type_url: &str, msg: &impl prost::Message) -> (Any, u64) {
    let any = resources::to_any(type_url, msg);
    let h = resources::content_hash(&any);
    (any, h)
}

impl Encoded {
    fn build(snapshot: Arc<Snapshot>, prev: Option<&Encoded>) -> Self {
        let mut clusters = BTreeMap::new();
        let mut clas = BTreeMap::new();
        for (name, c) in &snapshot.clusters {
            let unchanged = prev.and_then(|p| {
                (p.snapshot.clusters.get(name) == Some(c))
                    .then(|| (p.clusters.get(name), p.clas.get(name)))
            });
            match unchanged {
                Some((Some(cl), Some(cla))) => {
                    clusters.insert(name.clone(), cl.clone());
                    clas.insert(name.clone(), cla.clone());
                }
                _ => {
                    clusters.insert(name.clone(), entry(CLUSTER, &resources::encode_cluster(c)));
                    clas.insert(name.clone(), entry(ENDPOINT, &resources::encode_cla(c)));
                }
            }
        }
        Self {
            snapshot,
            clusters,
            clas,
        }
    }
}

/// A node's identity as the first request of a stream gives it.
#[derive(Debug, Default, Clone)]
struct NodeInfo {
    outbound_port: u32,
    /// `tcp` services this node offers on a local port each.
    service_ports: BTreeMap<String, u32>,
}

impl NodeInfo {
    fn from(node: &Node) -> Self {
        let port = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(resources::NODE_OUTBOUND_PORT))
            .and_then(|v| match &v.kind {
                Some(value::Kind::NumberValue(n)) => Some(*n as u32),
                Some(value::Kind::StringValue(s)) => s.parse().ok(),
                _ => None,
            })
            // 0 is allowed: the listener binds an ephemeral port (tests).
            .filter(|p| *p <= 65535)
            .unwrap_or(resources::DEFAULT_OUTBOUND_PORT);
        let service_ports = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(resources::NODE_SERVICE_PORTS))
            .and_then(|v| match &v.kind {
                Some(value::Kind::StructValue(s)) => Some(s),
                _ => None,
            })
            .map(|s| {
                s.fields
                    .iter()
                    .filter_map(|(name, v)| match &v.kind {
                        Some(value::Kind::NumberValue(n)) if (0.0..=65535.0).contains(n) => {
                            Some((name.clone(), *n as u32))
                        }
                        Some(value::Kind::StringValue(p)) => p
                            .parse()
                            .ok()
                            .filter(|p| *p <= 65535)
                            .map(|p| (name.clone(), p)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            outbound_port: port,
            service_ports,
        }
    }
}

/// Which resources of one type a stream wants.
#[derive(Debug, Default, Clone, PartialEq)]
struct Interest {
    wildcard: bool,
    names: BTreeSet<String>,
}

impl AdsServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        observer: Arc<dyn StreamObserver>,
    ) -> Self {
        Self {
            snapshots,
            observer,
            cache: Arc::default(),
            next_stream: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn encoded(&self, snap: &Arc<Snapshot>) -> Arc<Encoded> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache.as_ref()
            && Arc::ptr_eq(&e.snapshot, snap)
        {
            return e.clone();
        }
        let e = Arc::new(Encoded::build(snap.clone(), cache.as_deref()));
        *cache = Some(e.clone());
        e
    }
}

/// The resources of `type_url` a stream with `interest` gets: `(name, Any, hash)`.
fn resources_for(
    enc: &Encoded,
    type_url: &str,
    interest: &Interest,
    node: &NodeInfo,
) -> Vec<(String, Any, u64)> {
    let pick = |map: &BTreeMap<String, (Any, u64)>| -> Vec<(String, Any, u64)> {
        let take = |(n, (a, h)): (&String, &(Any, u64))| (n.clone(), a.clone(), *h);
        if interest.wildcard {
            map.iter().map(take).collect()
        } else {
            interest
                .names
                .iter()
                .filter_map(|n| map.get_key_value(n).map(take))
                .collect()
        }
    };
    match type_url {
        CLUSTER => pick(&enc.clusters),
        ENDPOINT => pick(&enc.clas),
        LISTENER => {
            let mut out = Vec::new();
            if interest.wildcard {
                let (a, h) = entry(LISTENER, &resources::envoy_listener(node.outbound_port));
                out.push((resources::ENVOY_LISTENER.to_owned(), a, h));
                for (name, port) in &node.service_ports {
                    if let Some(c) = enc
                        .snapshot
                        .clusters
                        .get(name)
                        .filter(|c| c.protocol == meshwire_mesh::Protocol::Tcp)
                    {
                        let (a, h) = entry(LISTENER, &resources::envoy_tcp_listener(c, *port));
                        out.push((
                            format!("{}{name}", resources::ENVOY_TCP_LISTENER_PREFIX),
                            a,
                            h,
                        ));
                    }
                }
            }
            for n in &interest.names {
                if enc.snapshot.clusters.contains_key(n) {
                    let (a, h) = entry(LISTENER, &resources::grpc_api_listener(n));
                    out.push((n.clone(), a, h));
                }
            }
            out
        }
        ROUTE => interest
            .names
            .iter()
            .filter_map(|n| {
                let rc = if n == resources::ENVOY_ROUTE {
                    resources::envoy_route(enc.snapshot.clusters.values())
                } else {
                    resources::grpc_route(enc.snapshot.clusters.get(n)?)
                };
                let (a, h) = entry(ROUTE, &rc);
                Some((n.clone(), a, h))
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn set_hash(items: &[(String, Any, u64)]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (n, _, v) in items {
        n.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

/// CDS and LDS are wildcard when no name is given (the legacy convention),
/// or when `*` is named.
fn wildcard_default(type_url: &str) -> bool {
    type_url == CLUSTER || type_url == LISTENER
}

fn control_plane() -> Option<ControlPlane> {
    Some(ControlPlane {
        identifier: "meshwire".into(),
    })
}

// === the stream loop, shared by State of the World and Delta ===

/// The parts of a request both variants read the same way.
struct Head<'a> {
    node: Option<&'a Node>,
    type_url: &'a str,
    response_nonce: &'a str,
    error: Option<&'a str>,
}

/// What State of the World and Delta do differently. The stream loop, the
/// node handshake and the ACK/NACK bookkeeping are [`AdsStream`]'s, once.
trait Variant: Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// Per subscribed type, what the client has been sent.
    type Sent: Default + Send;
    /// What one response carries before it gets its version and nonce.
    type Update;
    /// For logs.
    const NAME: &'static str;

    fn head(r: &Self::Request) -> Head<'_>;

    /// Applies a request's subscription changes to `sub`; `Some(force)` to push
    /// now (`force`: even if nothing changed since the last push).
    fn subscribe(
        sub: &mut Sub<Self::Sent>,
        type_url: &str,
        first: bool,
        r: Self::Request,
    ) -> Option<bool>;

    /// What to send of `items` (the resources the subscription selects), or
    /// `None` when the client is up to date; records it as sent.
    fn update(
        sent: &mut Self::Sent,
        type_url: &str,
        items: Vec<(String, Any, u64)>,
        force: bool,
    ) -> Option<Self::Update>;

    fn response(u: Self::Update, type_url: &str, version: &str, nonce: &str) -> Self::Response;
}

/// Responses per type whose version an ACK for an older nonce still names.
const RECENT_NONCES: usize = 16;

/// One subscribed type of one stream.
#[derive(Debug, Default)]
struct Sub<S> {
    interest: Interest,
    /// The nonce of the last response; only a reply to it is a NACK.
    nonce: String,
    sent_version: String,
    /// The last responses' nonces and versions, oldest first (bounded).
    recent: std::collections::VecDeque<(String, String)>,
    /// The newest version ACKed on this stream.
    acked: Option<u64>,
    sent: S,
}

impl<S> Sub<S> {
    /// Records an ACK of the response `nonce`, if it is one of the recent
    /// ones and newer than what was ACKed; returns its version then.
    fn ack(&mut self, nonce: &str) -> Option<String> {
        let (_, version) = self.recent.iter().find(|(n, _)| n == nonce)?;
        let v = version.parse::<u64>().ok()?;
        if self.acked.is_some_and(|a| a >= v) {
            return None;
        }
        self.acked = Some(v);
        Some(version.clone())
    }
}

/// The service a stream's verified client certificate names
/// (`spiffe://.../sa/<service>`), put in the request's extensions by the
/// transport: the stream may only subscribe as a node of that service, under
/// a node id that names it ([`node_id_names_service`]), so a certificate
/// cannot be used to pose as another service's node.
#[derive(Debug, Clone)]
pub struct PeerService(pub Arc<str>);

/// On a stream bound to `service` (by its client certificate) a node id
/// must name that service: `service` itself or `service-...`, so a
/// certificate of one service cannot register a node under another
/// service's node ids (the sidecar's default id is `<service>-<host>-<pid>`).
pub fn node_id_names_service(node_id: &str, service: &str) -> bool {
    node_id
        .strip_prefix(service)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

struct AdsStream<V: Variant> {
    server: AdsServer,
    id: u64,
    /// From [`PeerService`]: the only node cluster this stream may claim.
    bound: Option<Arc<str>>,
    node: Option<NodeInfo>,
    subs: BTreeMap<String, Sub<V::Sent>>,
    nonce: u64,
    tx: mpsc::Sender<Result<V::Response, Status>>,
}

impl<V: Variant> AdsStream<V> {
    fn new(
        server: &AdsServer,
        bound: Option<Arc<str>>,
        tx: mpsc::Sender<Result<V::Response, Status>>,
    ) -> Self {
        Self {
            server: server.clone(),
            id: server.next_stream.fetch_add(1, Ordering::Relaxed),
            bound,
            node: None,
            subs: BTreeMap::new(),
            nonce: 0,
            tx,
        }
    }

    async fn run(mut self, mut incoming: Streaming<V::Request>) {
        let mut snapshots = self.server.snapshots.clone();
        let mut snap = snapshots.borrow_and_update().clone();
        loop {
            tokio::select! {
                req = incoming.next() => match req {
                    Some(Ok(r)) => {
                        if self.on_request(r, &snap).await.is_err() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(stream = self.id, variant = V::NAME, error = %e, "xDS stream error");
                        break;
                    }
                    None => break,
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    snap = snapshots.borrow_and_update().clone();
                    if self.push_all(&snap).await.is_err() {
                        break;
                    }
                }
            }
        }
        if self.node.is_some() {
            self.server.observer.disconnected(self.id);
        }
    }

    async fn push_all(&mut self, snap: &Arc<Snapshot>) -> Result<(), StreamClosed> {
        let types: Vec<String> = self.subs.keys().cloned().collect();
        for t in types {
            self.push(&t, snap, false).await?;
        }
        Ok(())
    }

    async fn on_request(
        &mut self,
        r: V::Request,
        snap: &Arc<Snapshot>,
    ) -> Result<(), StreamClosed> {
        let head = V::head(&r);
        if self.node.is_none() {
            let node = head.node.cloned().unwrap_or_default();
            if let Some(svc) = &self.bound
                && node.cluster != **svc
            {
                tracing::warn!(stream = self.id, node = %node.id, claimed = %node.cluster, certificate = %svc, "xDS stream refused: its node claims another service than its certificate");
                let _ = self
                    .tx
                    .send(Err(Status::permission_denied(format!(
                        "the node's cluster {} is not the service of the client certificate ({svc:?})",
                        meshwire_mesh::grpc::shown(&node.cluster)
                    ))))
                    .await;
                return Err(StreamClosed);
            }
            if let Some(svc) = &self.bound
                && !node_id_names_service(&node.id, svc)
            {
                tracing::warn!(stream = self.id, node = %node.id, certificate = %svc, "xDS stream refused: its node id does not name its certificate's service");
                let _ = self
                    .tx
                    .send(Err(Status::permission_denied(format!(
                        "the node id {} does not name the service of the client certificate: it must be {svc:?} or start with \"{svc}-\" (the sidecar's default is <service>-<host>-<pid>)",
                        meshwire_mesh::grpc::shown(&node.id)
                    ))))
                    .await;
                return Err(StreamClosed);
            }
            self.server
                .observer
                .connected(self.id, &node.id, &node.cluster, &node.user_agent_name);
            tracing::info!(stream = self.id, variant = V::NAME, node = %node.id, service = %node.cluster, agent = %node.user_agent_name, "xDS stream");
            self.node = Some(NodeInfo::from(&node));
        }
        let type_url = head.type_url.to_owned();
        let first = !self.subs.contains_key(&type_url);
        let sub = self.subs.entry(type_url.clone()).or_default();
        if !head.response_nonce.is_empty() {
            let current = head.response_nonce == sub.nonce;
            match head.error {
                Some(error) if current => {
                    tracing::warn!(stream = self.id, type_url = %type_url, version = %sub.sent_version, error = %error, "NACK");
                    self.server
                        .observer
                        .nacked(self.id, &type_url, &sub.sent_version, error);
                }
                // A NACK of an older response: a newer one is in flight.
                Some(_) => {}
                // An ACK of an older response still says the client applied
                // that version: recorded, so status shows progress while
                // pushes follow each other faster than the client answers.
                None => {
                    if let Some(version) = sub.ack(head.response_nonce) {
                        self.server.observer.acked(self.id, &type_url, &version);
                    }
                }
            }
            if !current {
                // Its subscription changes are stale too (the xDS protocol).
                return Ok(());
            }
        }
        match V::subscribe(sub, &type_url, first, r) {
            Some(force) => self.push(&type_url, snap, force).await,
            None => Ok(()),
        }
    }

    /// Sends this type's resources if the client lacks some (or `force`).
    async fn push(
        &mut self,
        type_url: &str,
        snap: &Arc<Snapshot>,
        force: bool,
    ) -> Result<(), StreamClosed> {
        let enc = self.server.encoded(snap);
        let node = self.node.clone().unwrap_or_default();
        let Some(sub) = self.subs.get_mut(type_url) else {
            return Ok(());
        };
        let items = resources_for(&enc, type_url, &sub.interest, &node);
        let Some(update) = V::update(&mut sub.sent, type_url, items, force) else {
            return Ok(());
        };
        self.nonce += 1;
        sub.nonce = self.nonce.to_string();
        sub.sent_version = snap.version.to_string();
        tracing::debug!(stream = self.id, type_url, version = %sub.sent_version, nonce = %sub.nonce, force, "push");
        if sub.recent.len() == RECENT_NONCES {
            sub.recent.pop_front();
        }
        sub.recent
            .push_back((sub.nonce.clone(), sub.sent_version.clone()));
        let resp = V::response(update, type_url, &sub.sent_version, &sub.nonce);
        self.server
            .observer
            .pushed(self.id, type_url, &sub.sent_version);
        self.tx.send(Ok(resp)).await.map_err(|_| StreamClosed)
    }
}

// === State of the World ===

#[derive(Debug)]
struct Sotw;

#[derive(Debug, Default)]
struct SotwSent {
    hash: Option<u64>,
    /// Per resource, the content last sent (EDS/RDS may be sent partially).
    resources: BTreeMap<String, u64>,
}

/// In State of the World, only Listener and Cluster responses must carry every
/// resource; for the others a response may carry just what changed (xDS
/// protocol, "Grouping resources into responses"). With 10,000 endpoints a
/// weight change then costs one CLA per client, not all of them.
fn partial_updates(type_url: &str) -> bool {
    type_url == ENDPOINT || type_url == ROUTE
}

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type Sent = SotwSent;
    type Update = Vec<Any>;
    const NAME: &'static str = "SotW";

    fn head(r: &DiscoveryRequest) -> Head<'_> {
        Head {
            node: r.node.as_ref(),
            type_url: &r.type_url,
            response_nonce: &r.response_nonce,
            error: r.error_detail.as_ref().map(|st| st.message.as_str()),
        }
    }

    fn subscribe(
        sub: &mut Sub<SotwSent>,
        type_url: &str,
        _first: bool,
        r: DiscoveryRequest,
    ) -> Option<bool> {
        let interest = Interest {
            wildcard: r.resource_names.iter().any(|n| n == "*")
                || (r.resource_names.is_empty() && wildcard_default(type_url)),
            names: r.resource_names.into_iter().filter(|n| n != "*").collect(),
        };
        let changed = interest != sub.interest;
        sub.interest = interest;
        // Every request that is not an ACK/NACK asks for the current state.
        (r.response_nonce.is_empty() || changed).then_some(true)
    }

    fn update(
        sent: &mut SotwSent,
        type_url: &str,
        mut items: Vec<(String, Any, u64)>,
        force: bool,
    ) -> Option<Vec<Any>> {
        let h = set_hash(&items);
        if !force && sent.hash == Some(h) {
            return None;
        }
        sent.hash = Some(h);
        if partial_updates(type_url) {
            let all: BTreeMap<String, u64> =
                items.iter().map(|(n, _, v)| (n.clone(), *v)).collect();
            let before = std::mem::replace(&mut sent.resources, all);
            if !force {
                items.retain(|(n, _, v)| before.get(n) != Some(v));
                if items.is_empty() {
                    // Only removals: the client learns of those from CDS.
                    return None;
                }
            }
        }
        Some(items.into_iter().map(|(_, a, _)| a).collect())
    }

    fn response(
        resources: Vec<Any>,
        type_url: &str,
        version: &str,
        nonce: &str,
    ) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.to_owned(),
            resources,
            type_url: type_url.to_owned(),
            nonce: nonce.to_owned(),
            control_plane: control_plane(),
            ..Default::default()
        }
    }
}

// === Delta ===

#[derive(Debug)]
struct Delta;

/// What one Delta response carries.
struct DeltaUpdate {
    resources: Vec<Resource>,
    removed: Vec<String>,
}

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    /// Resource versions the client has (or told us it has).
    type Sent = BTreeMap<String, String>;
    type Update = DeltaUpdate;
    const NAME: &'static str = "delta";

    fn head(r: &DeltaDiscoveryRequest) -> Head<'_> {
        Head {
            node: r.node.as_ref(),
            type_url: &r.type_url,
            response_nonce: &r.response_nonce,
            error: r.error_detail.as_ref().map(|st| st.message.as_str()),
        }
    }

    fn subscribe(
        sub: &mut Sub<Self::Sent>,
        type_url: &str,
        first: bool,
        r: DeltaDiscoveryRequest,
    ) -> Option<bool> {
        if first {
            sub.sent = r.initial_resource_versions.into_iter().collect();
            if r.resource_names_subscribe.is_empty() && wildcard_default(type_url) {
                sub.interest.wildcard = true;
            }
        }
        for n in r.resource_names_subscribe {
            if n == "*" {
                sub.interest.wildcard = true;
            } else {
                sub.interest.names.insert(n);
            }
        }
        for n in &r.resource_names_unsubscribe {
            if n == "*" {
                sub.interest.wildcard = false;
            } else {
                sub.interest.names.remove(n);
                sub.sent.remove(n);
            }
        }
        Some(false)
    }

    /// What this client does not have yet, and what it must remove.
    fn update(
        known: &mut Self::Sent,
        _type_url: &str,
        items: Vec<(String, Any, u64)>,
        _force: bool,
    ) -> Option<DeltaUpdate> {
        let current: BTreeMap<String, (Any, String)> = items
            .into_iter()
            .map(|(n, a, h)| (n, (a, format!("{h:016x}"))))
            .collect();
        let removed: Vec<String> = known
            .keys()
            .filter(|n| !current.contains_key(n.as_str()))
            .cloned()
            .collect();
        let resources: Vec<Resource> = current
            .into_iter()
            .filter(|(name, (_, version))| known.get(name) != Some(version))
            .map(|(name, (any, version))| Resource {
                name,
                version,
                resource: Some(any),
                ..Default::default()
            })
            .collect();
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        for r in &resources {
            known.insert(r.name.clone(), r.version.clone());
        }
        for n in &removed {
            known.remove(n);
        }
        Some(DeltaUpdate { resources, removed })
    }

    fn response(
        u: DeltaUpdate,
        type_url: &str,
        version: &str,
        nonce: &str,
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: version.to_owned(),
            resources: u.resources,
            type_url: type_url.to_owned(),
            removed_resources: u.removed,
            nonce: nonce.to_owned(),
            control_plane: control_plane(),
            ..Default::default()
        }
    }
}

type SotwResponses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = SotwResponses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwResponses>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let bound = req.extensions().get::<PeerService>().map(|p| p.0.clone());
        tokio::spawn(AdsStream::<Sotw>::new(self, bound, tx).run(req.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let bound = req.extensions().get::<PeerService>().map(|p| p.0.clone());
        tokio::spawn(AdsStream::<Delta>::new(self, bound, tx).run(req.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_node_id_names_its_service() {
        assert!(node_id_names_service("web", "web"));
        assert!(node_id_names_service("web-host-12", "web"));
        assert!(!node_id_names_service("webshop-1", "web"));
        assert!(!node_id_names_service("echo-host-12", "web"));
        assert!(!node_id_names_service("", "web"));
    }

    #[test]
    fn acks_of_older_responses_count_and_never_go_back() {
        let mut sub = Sub::<()>::default();
        for (nonce, version) in [("1", "5"), ("2", "6"), ("3", "7")] {
            sub.recent.push_back((nonce.into(), version.into()));
        }
        sub.nonce = "3".into();
        assert_eq!(sub.ack("1").as_deref(), Some("5"), "stale, still applied");
        assert_eq!(sub.ack("3").as_deref(), Some("7"));
        assert_eq!(sub.ack("2"), None, "never back to an older version");
        assert_eq!(sub.ack("9"), None, "unknown nonce");
    }
}
