//! The sidecar's xDS client: one ADS stream (State of the World) to the
//! control plane, subscribed to every `Cluster` and to the
//! `ClusterLoadAssignment` of each.
//!
//! ```text
//! DiscoveryResponse ─▶ decode + validate each resource, ConfigSink::check each cluster
//!   ─▶ a resource that fails keeps its last good version (none yet: the cluster
//!      is left out, "rejected") ─▶ ConfigSink::apply(the clusters that passed)
//!   │ all passed: ACK (version_info = the version applied)
//!   └ some failed: NACK naming them (error_detail); the others are applied
//!     all the same, as Envoy does, so one bad service never holds back the rest
//! ```
//! A new cluster is held back ("warming") until its endpoints arrive, so it
//! never serves with an empty endpoint set; one whose endpoints were refused
//! is not waited for (the sidecar becomes ready without it). If the stream breaks (control
//! plane down or restarting) the sidecar keeps serving what it has and
//! reconnects with jittered exponential backoff — to the next control plane
//! of its list, so with several replicas it fails over; on reconnect it
//! resubscribes and the control plane sends the current state again. A
//! response identical to what is applied (the same state from another
//! replica) is ACKed without touching the sink: nothing is rebuilt.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::resources::{self, CLUSTER, ENDPOINT};
use meshwire_mesh::model::{Cluster, Endpoint};

/// Why a sink refused a configuration; becomes the NACK's `error_detail`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub String);

/// Why one ADS stream ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("bad control-plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("connect {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("ADS: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the stream's request queue closed")]
    RequestsClosed,
}

/// Where a validated configuration goes.
pub trait ConfigSink: Send + Sync + 'static {
    /// Applies a whole new set of clusters. An error rejects it: nothing
    /// changes, the previous set keeps serving, and the update is NACKed.
    fn apply(&self, clusters: &[Cluster]) -> Result<(), ApplyError>;

    /// Checks one cluster, with its endpoints, as `apply` would, so a cluster
    /// that fails is left out (or keeps its last good version) instead of
    /// refusing the whole update. The default accepts every cluster.
    fn check(&self, cluster: &Cluster) -> Result<(), ApplyError> {
        let _ = cluster;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The control-plane replicas, e.g. `http://127.0.0.1:15010`; the client
    /// uses one at a time and moves to the next when its stream breaks.
    pub servers: Vec<String>,
    pub node_id: String,
    /// The service this sidecar belongs to (`node.cluster`).
    pub service: String,
    /// The sidecar's zone, sent as the node's `locality.zone`.
    pub zone: Option<String>,
    pub user_agent: String,
    pub connect_timeout: Duration,
    /// Connect over mutual TLS with these credentials (`server` may then say
    /// `https://`); `None`: plaintext HTTP/2.
    pub tls: Option<meshwire_tls::TlsConnector>,
}

/// A refused update.
#[derive(Debug, Clone, PartialEq)]
pub struct NackInfo {
    pub type_url: String,
    pub version: String,
    pub error: String,
}

/// What the client has done, for readiness and `/config_dump`.
#[derive(Debug, Clone, Default)]
pub struct ClientStatus {
    pub connected: bool,
    /// A complete configuration (every cluster with its endpoints) has been applied.
    pub warm: bool,
    pub cds_version: Option<String>,
    pub eds_version: Option<String>,
    pub last_nack: Option<NackInfo>,
    /// Updates refused (NACKed) since start.
    pub nacks: u64,
    /// The clusters as last applied.
    pub applied: Vec<Cluster>,
    /// Clusters known from CDS still waiting for their endpoints.
    pub warming: Vec<String>,
    /// Clusters left out because their resources were refused, with why.
    pub rejected: BTreeMap<String, String>,
    pub streams_opened: u64,
    pub last_error: Option<String>,
    /// The control plane of the current (or last) stream.
    pub server: Option<String>,
    /// Configurations handed to the sink (a response equal to the applied
    /// config is not).
    pub applies: u64,
}

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs until the task is dropped/aborted.
pub async fn run(
    cfg: ClientConfig,
    sink: Arc<dyn ConfigSink>,
    status: watch::Sender<ClientStatus>,
) {
    let mut state = State::default();
    let mut failures = 0u32;
    let mut current = 0usize;
    loop {
        let Some(server) = cfg.servers.get(current % cfg.servers.len().max(1)) else {
            tracing::error!("no control plane configured");
            return;
        };
        status.send_modify(|s| {
            s.streams_opened += 1;
            s.server = Some(server.clone());
        });
        match stream_once(&cfg, server, &*sink, &status, &mut state).await {
            Ok(()) => {
                tracing::warn!(%server, "xDS stream closed by the control plane")
            }
            Err(e) => {
                tracing::warn!(%server, error = %e, "xDS stream failed; keeping the current config");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
        status.send_modify(|s| s.connected = false);
        // The next attempt goes to the next replica.
        current = current.wrapping_add(1);
        if state.had_response {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        state.had_response = false;
        let exp = BACKOFF_BASE.saturating_mul(1 << failures.min(10).saturating_sub(1));
        let delay = exp.min(BACKOFF_MAX).mul_f64(0.5 + fastrand::f64() * 0.5);
        tokio::time::sleep(delay).await;
    }
}

/// Everything the client knows, kept across reconnects.
#[derive(Debug, Default)]
struct State {
    settings: BTreeMap<String, Cluster>,
    endpoints: BTreeMap<String, Vec<Endpoint>>,
    cds_version: String,
    eds_version: String,
    cds_nonce: String,
    eds_nonce: String,
    applied: Vec<Cluster>,
    /// `applied` was given to the sink (an empty first config still is).
    had_applied: bool,
    /// Clusters whose endpoints were refused and that have no good ones.
    rejected: BTreeMap<String, String>,
    had_response: bool,
}

impl State {
    fn warming(&self) -> Vec<String> {
        self.settings
            .keys()
            .filter(|n| !self.endpoints.contains_key(*n) && !self.rejected.contains_key(*n))
            .cloned()
            .collect()
    }

    /// The clusters that can serve (those whose endpoints are known), each
    /// checked by the sink: one that fails
    /// falls back to its last good endpoints, or is left out (and marked
    /// rejected). `endpoints` and `rejected` are updated to match.
    fn checked_config(
        &self,
        sink: &dyn ConfigSink,
        settings: &BTreeMap<String, Cluster>,
        endpoints: &mut BTreeMap<String, Vec<Endpoint>>,
        rejected: &mut BTreeMap<String, String>,
        errors: &mut Vec<String>,
    ) -> Vec<Cluster> {
        let mut out = Vec::with_capacity(settings.len());
        for c in settings.values() {
            let Some(eps) = endpoints.get(&c.name) else {
                continue;
            };
            let mut c = c.clone();
            c.endpoints = eps.clone();
            let Err(ApplyError(e)) = sink.check(&c) else {
                rejected.remove(&c.name);
                out.push(c);
                continue;
            };
            errors.push(format!("cluster {:?}: {e}", c.name));
            let last_good = self
                .endpoints
                .get(&c.name)
                .filter(|old| **old != c.endpoints)
                .cloned();
            if let Some(old) = last_good {
                c.endpoints = old.clone();
                if sink.check(&c).is_ok() {
                    endpoints.insert(c.name.clone(), old);
                    out.push(c);
                    continue;
                }
            }
            endpoints.remove(&c.name);
            rejected.insert(c.name.clone(), e);
        }
        out
    }
}

async fn stream_once(
    cfg: &ClientConfig,
    server: &str,
    sink: &dyn ConfigSink,
    status: &watch::Sender<ClientStatus>,
    state: &mut State,
) -> Result<(), ClientError> {
    // Our connector does the TLS: tonic sees a plain `http` origin.
    let origin = match server.strip_prefix("https://") {
        Some(rest) if cfg.tls.is_some() => format!("http://{rest}"),
        _ => server.to_owned(),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(origin)
        .map_err(|e| ClientError::Address {
            address: server.to_owned(),
            reason: e.to_string(),
        })?
        .connect_timeout(cfg.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let channel = match &cfg.tls {
        Some(tls) => tokio::time::timeout(
            cfg.connect_timeout,
            endpoint.connect_with_connector(tls.clone()),
        )
        .await
        .map_err(|_| ClientError::Connect {
            address: server.to_owned(),
            reason: "timed out".into(),
        })?,
        None => endpoint.connect().await,
    }
    .map_err(|e| ClientError::Connect {
        address: server.to_owned(),
        reason: e.to_string(),
    })?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let node = Node {
        id: cfg.node_id.clone(),
        cluster: cfg.service.clone(),
        user_agent_name: cfg.user_agent.clone(),
        locality: cfg.zone.as_ref().map(|zone| Locality {
            zone: zone.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Resubscribe to everything we had; the control plane sends its current state.
    tx.send(DiscoveryRequest {
        version_info: state.cds_version.clone(),
        node: Some(node.clone()),
        type_url: CLUSTER.into(),
        ..Default::default()
    })
    .await
    .map_err(|_| ClientError::RequestsClosed)?;
    if !state.settings.is_empty() {
        tx.send(eds_request(state, String::new()))
            .await
            .map_err(|_| ClientError::RequestsClosed)?;
    }
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    status.send_modify(|s| {
        s.connected = true;
        s.last_error = None;
    });
    tracing::info!(%server, node = %cfg.node_id, "xDS stream open");
    while let Some(resp) = responses.next().await {
        let resp = resp?;
        state.had_response = true;
        let reply = match resp.type_url.as_str() {
            CLUSTER => on_clusters(resp, sink, status, state),
            ENDPOINT => on_endpoints(resp, sink, status, state),
            other => {
                // Not subscribed; ACK so the server does not wait on us.
                tracing::debug!(type_url = other, "ignoring unrequested resource type");
                vec![DiscoveryRequest {
                    version_info: resp.version_info,
                    type_url: resp.type_url,
                    response_nonce: resp.nonce,
                    ..Default::default()
                }]
            }
        };
        for r in reply {
            tx.send(r).await.map_err(|_| ClientError::RequestsClosed)?;
        }
    }
    Ok(())
}

fn eds_request(state: &State, nonce: String) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: state.eds_version.clone(),
        resource_names: state.settings.keys().cloned().collect(),
        type_url: ENDPOINT.into(),
        response_nonce: nonce,
        ..Default::default()
    }
}

/// A NACK. In State of the World every request restates the subscription,
/// so it carries the current names too (without them the server would read
/// an unsubscribe).
fn nack(resp: &DiscoveryResponse, state: &State, last_good: &str, error: &str) -> DiscoveryRequest {
    let resource_names = if resp.type_url == ENDPOINT {
        state.settings.keys().cloned().collect()
    } else {
        Vec::new()
    };
    DiscoveryRequest {
        version_info: last_good.to_owned(),
        resource_names,
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: tonic::Code::InvalidArgument as i32,
            message: error.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn record_nack(status: &watch::Sender<ClientStatus>, resp: &DiscoveryResponse, error: &str) {
    tracing::warn!(type_url = %resp.type_url, version = %resp.version_info, error, "rejecting xDS update (NACK); the last good config keeps serving");
    status.send_modify(|s| {
        s.nacks += 1;
        s.last_nack = Some(NackInfo {
            type_url: resp.type_url.clone(),
            version: resp.version_info.clone(),
            error: error.to_owned(),
        });
    });
}

fn publish(status: &watch::Sender<ClientStatus>, state: &State) {
    let warming = state.warming();
    status.send_modify(|s| {
        s.cds_version = (!state.cds_version.is_empty()).then(|| state.cds_version.clone());
        s.eds_version = (!state.eds_version.is_empty()).then(|| state.eds_version.clone());
        s.applied = state.applied.clone();
        // A CDS response was taken (wholly or in part: its nonce is kept).
        s.warm = warming.is_empty() && !state.cds_nonce.is_empty();
        s.warming = warming;
        s.rejected = state.rejected.clone();
    });
}

/// Hands `config` to the sink unless it is what is applied already (the
/// same state again, e.g. from another replica after a failover).
fn apply(
    sink: &dyn ConfigSink,
    status: &watch::Sender<ClientStatus>,
    state: &State,
    config: &[Cluster],
) -> Result<(), ApplyError> {
    if state.had_applied && state.applied.as_slice() == config {
        return Ok(());
    }
    sink.apply(config)?;
    status.send_modify(|s| s.applies += 1);
    Ok(())
}

fn on_clusters(
    resp: DiscoveryResponse,
    sink: &dyn ConfigSink,
    status: &watch::Sender<ClientStatus>,
    state: &mut State,
) -> Vec<DiscoveryRequest> {
    let mut settings = BTreeMap::new();
    let mut errors = Vec::new();
    for any in &resp.resources {
        match resources::decode_cluster(any) {
            Ok(c) => {
                if settings.insert(c.name.clone(), c).is_some() {
                    let e = "duplicate cluster in one response";
                    record_nack(status, &resp, e);
                    return vec![nack(&resp, state, &state.cds_version, e)];
                }
            }
            Err(e) => {
                // The last good version of this cluster stays, if there is one.
                if let Some(old) = e.resource_name().and_then(|n| state.settings.get(n)) {
                    settings.insert(old.name.clone(), old.clone());
                }
                errors.push(e.to_string());
            }
        }
    }
    // Endpoints of clusters that are gone are forgotten.
    let mut endpoints = state.endpoints.clone();
    endpoints.retain(|name, _| settings.contains_key(name));
    let mut rejected = state.rejected.clone();
    rejected.retain(|name, _| settings.contains_key(name));
    let config = state.checked_config(sink, &settings, &mut endpoints, &mut rejected, &mut errors);
    if let Err(ApplyError(e)) = apply(sink, status, state, &config) {
        record_nack(status, &resp, &e);
        return vec![nack(&resp, state, &state.cds_version, &e)];
    }
    let names_changed = settings.keys().ne(state.settings.keys());
    state.settings = settings;
    state.endpoints = endpoints;
    state.rejected = rejected;
    state.applied = config;
    state.had_applied = true;
    state.cds_nonce = resp.nonce.clone();
    let mut out = if errors.is_empty() {
        state.cds_version = resp.version_info.clone();
        publish(status, state);
        vec![DiscoveryRequest {
            version_info: resp.version_info,
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        }]
    } else {
        let e = errors.join("; ");
        record_nack(status, &resp, &e);
        publish(status, state);
        vec![nack(&resp, state, &state.cds_version, &e)]
    };
    if names_changed {
        out.push(eds_request(state, state.eds_nonce.clone()));
    }
    out
}

fn on_endpoints(
    resp: DiscoveryResponse,
    sink: &dyn ConfigSink,
    status: &watch::Sender<ClientStatus>,
    state: &mut State,
) -> Vec<DiscoveryRequest> {
    let mut endpoints = state.endpoints.clone();
    let mut rejected = state.rejected.clone();
    let mut errors = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for any in &resp.resources {
        match resources::decode_cla(any) {
            Ok((name, eps)) => {
                if !seen.insert(name.clone()) {
                    let e = format!("ClusterLoadAssignment {name:?} twice in one response");
                    record_nack(status, &resp, &e);
                    return vec![nack(&resp, state, &state.eds_version, &e)];
                }
                if state.settings.contains_key(&name) {
                    endpoints.insert(name, eps);
                }
            }
            Err(e) => {
                // The cluster keeps its last good endpoints; without any it
                // is not waited for.
                if let Some(name) = e.resource_name()
                    && state.settings.contains_key(name)
                    && !endpoints.contains_key(name)
                {
                    rejected.insert(name.to_owned(), e.to_string());
                }
                errors.push(e.to_string());
            }
        }
    }
    let config = state.checked_config(
        sink,
        &state.settings,
        &mut endpoints,
        &mut rejected,
        &mut errors,
    );
    if let Err(ApplyError(e)) = apply(sink, status, state, &config) {
        record_nack(status, &resp, &e);
        return vec![nack(&resp, state, &state.eds_version, &e)];
    }
    state.endpoints = endpoints;
    state.rejected = rejected;
    state.applied = config;
    state.had_applied = true;
    state.eds_nonce = resp.nonce.clone();
    if !errors.is_empty() {
        let e = errors.join("; ");
        record_nack(status, &resp, &e);
        publish(status, state);
        return vec![nack(&resp, state, &state.eds_version, &e)];
    }
    state.eds_version = resp.version_info.clone();
    publish(status, state);
    vec![DiscoveryRequest {
        version_info: resp.version_info,
        resource_names: state.settings.keys().cloned().collect(),
        type_url: resp.type_url,
        response_nonce: resp.nonce,
        ..Default::default()
    }]
}
