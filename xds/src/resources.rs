//! Translation between the mesh model and Envoy's xDS v3 resources.
//!
//! Encoding (control plane) covers what three kinds of clients need:
//! - **Meshwire sidecars** and **stock Envoy**: `Cluster` (type EDS over ADS,
//!   `LEAST_REQUEST` with `active_request_bias`, `RING_HASH` or `MAGLEV`
//!   with `hash_balance_factor`, HTTP/2 upstream, zone-aware routing as the
//!   least-request / round-robin policy's `locality_lb_config` with its
//!   threshold in our metadata) and `ClusterLoadAssignment` (endpoint weights, zones as
//!   localities, draining endpoints as `DRAINING`, unhealthy ones as
//!   `UNHEALTHY`).
//! - **Stock Envoy** also gets an outbound `Listener` (HTTP connection manager
//!   over RDS) and a `RouteConfiguration` with one virtual host per service.
//! - **Proxyless gRPC** (gRFC A27) asks for a `Listener` by service name and
//!   gets an API listener whose RDS route sends everything to that cluster.
//! - Hash keys go where each client reads them: the route's `hash_policy`
//!   (Envoy, and gRPC's `ring_hash`, gRFC A42), and the cluster's metadata
//!   for Meshwire sidecars, which take no routes.
//!
//! Decoding (sidecar) validates everything it reads; an error names the
//! resource and field so the NACK's `error_detail` says what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbConfig, LbPolicy as XLbPolicy,
    LeastRequestLbConfig, MaglevLbConfig, RingHashLbConfig,
};
use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as XCluster, LoadBalancingPolicy, load_balancing_policy,
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Http2ProtocolOptions,
    Locality, Metadata, RuntimeDouble, SocketAddress, TypedExtensionConfig, address, config_source,
    socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as XEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, Listener, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::load_balancing_policies::common::v3::locality_lb_config::{
    LocalityConfigSpecifier as LocalitySpecifier, ZoneAwareLbConfig as XZoneAwareLbConfig,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::common::v3::{
    ConsistentHashingLbConfig, LocalityLbConfig,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::least_request::v3::LeastRequest;
use envoy_types::pb::envoy::extensions::load_balancing_policies::maglev::v3::Maglev;
use envoy_types::pb::envoy::extensions::load_balancing_policies::ring_hash::v3::{
    RingHash, ring_hash,
};
use envoy_types::pb::envoy::extensions::load_balancing_policies::round_robin::v3::RoundRobin;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{
    Any, Duration as PDuration, Struct, UInt32Value, UInt64Value, Value, value,
};
use prost::Message;

use meshwire_mesh::model::{
    self, Cluster, Endpoint, HashLb, HashSource, LbPolicy, ModelError, Protocol, ZoneRouting,
};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub(crate) const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub(crate) const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const ROUTE_RETRY_POLICY: &str = "type.googleapis.com/envoy.config.route.v3.RetryPolicy";
const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_OPTIONS: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const LEAST_REQUEST: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest";
const ROUND_ROBIN: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin";
const RING_HASH: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash";
const MAGLEV: &str =
    "type.googleapis.com/envoy.extensions.load_balancing_policies.maglev.v3.Maglev";
/// What Envoy and gRPC build their own rings from (gRPC's defaults).
const MIN_RING_SIZE: u64 = 1024;
const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
const MAGLEV_TABLE_SIZE: u64 = 65_537;

/// `filter_metadata` key for Meshwire's own attributes.
pub const META: &str = "meshwire";
/// `filter_metadata` key for an endpoint's user metadata (string values).
pub(crate) const USER_META: &str = "meshwire.metadata";

/// The listener and route names a stock Envoy gets (wildcard LDS).
pub(crate) const ENVOY_LISTENER: &str = "meshwire_outbound";
pub(crate) const ENVOY_ROUTE: &str = "meshwire_outbound";
/// Node metadata key naming the port of Envoy's outbound listener.
pub(crate) const NODE_OUTBOUND_PORT: &str = "meshwire.outbound_port";
pub(crate) const DEFAULT_OUTBOUND_PORT: u32 = 15001;
/// Node metadata key: a struct of `service name → local port` for the `tcp`
/// services a stock Envoy should offer (one listener each).
pub const NODE_SERVICE_PORTS: &str = "meshwire.service_ports";
/// Stock Envoy's listener for `tcp` service `name` is `meshwire_tcp_<name>`.
pub(crate) const ENVOY_TCP_LISTENER_PREFIX: &str = "meshwire_tcp_";

/// Why a resource could not be decoded or is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResourceError {
    // The name is quoted bounded (`grpc::shown`): NACKs echo it.
    #[error("{kind} {}: cannot decode: {reason}", meshwire_mesh::grpc::shown(name))]
    Decode {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("{kind} {}: {field}: {reason}", meshwire_mesh::grpc::shown(name))]
    Invalid {
        kind: &'static str,
        name: String,
        field: String,
        reason: String,
    },
    #[error("unexpected type {}, want {want}", meshwire_mesh::grpc::shown(got))]
    WrongType { got: String, want: &'static str },
}

impl ResourceError {
    /// The name of the refused resource, when it could be read.
    pub fn resource_name(&self) -> Option<&str> {
        match self {
            ResourceError::Decode { name, .. } | ResourceError::Invalid { name, .. } => {
                Some(name.as_str()).filter(|n| !n.is_empty())
            }
            ResourceError::WrongType { .. } => None,
        }
    }
}

fn invalid(kind: &'static str, name: &str, e: ModelError) -> ResourceError {
    ResourceError::Invalid {
        kind,
        name: name.to_owned(),
        field: e.field,
        reason: e.reason,
    }
}

pub(crate) fn to_any(type_url: &str, msg: &impl Message) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: msg.encode_to_vec(),
    }
}

/// A stable content hash, used as a per-resource version and to skip pushes
/// that would change nothing.
pub(crate) fn content_hash(any: &Any) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    any.type_url.hash(&mut h);
    any.value.hash(&mut h);
    h.finish()
}

fn pduration(d: Duration) -> PDuration {
    PDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn from_pduration(d: &PDuration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn str_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_owned())),
    }
}

fn num_value(n: f64) -> Value {
    Value {
        kind: Some(value::Kind::NumberValue(n)),
    }
}

fn meta_kind<'a>(m: Option<&'a Metadata>, key: &str, field: &str) -> Option<&'a value::Kind> {
    m?.filter_metadata
        .get(key)?
        .fields
        .get(field)?
        .kind
        .as_ref()
}

fn meta_str<'a>(m: Option<&'a Metadata>, key: &str, field: &str) -> Option<&'a str> {
    match meta_kind(m, key, field)? {
        value::Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

fn meta_num(m: Option<&Metadata>, key: &str, field: &str) -> Option<f64> {
    match meta_kind(m, key, field)? {
        value::Kind::NumberValue(n) => Some(*n),
        _ => None,
    }
}

// === Cluster ===

fn policy(name: &str, config: Any) -> load_balancing_policy::Policy {
    load_balancing_policy::Policy {
        typed_extension_config: Some(TypedExtensionConfig {
            name: name.to_owned(),
            typed_config: Some(config),
        }),
    }
}

/// Bounded loads as Envoy spells them: a percentage, at least 100.
fn consistent_hashing(h: &HashLb) -> Option<ConsistentHashingLbConfig> {
    h.balance_factor.map(|f| ConsistentHashingLbConfig {
        hash_balance_factor: Some(UInt32Value {
            value: (f * 100.0).round() as u32,
        }),
        ..Default::default()
    })
}

fn ring_hash_policy(h: &HashLb) -> load_balancing_policy::Policy {
    policy(
        "envoy.load_balancing_policies.ring_hash",
        to_any(
            RING_HASH,
            &RingHash {
                hash_function: ring_hash::HashFunction::XxHash as i32,
                minimum_ring_size: Some(UInt64Value {
                    value: MIN_RING_SIZE,
                }),
                maximum_ring_size: Some(UInt64Value {
                    value: MAX_RING_SIZE,
                }),
                consistent_hashing_lb_config: consistent_hashing(h),
                ..Default::default()
            },
        ),
    )
}

fn hash_lb(c: Option<&ConsistentHashingLbConfig>) -> Result<HashLb, String> {
    let balance_factor = match c.and_then(|c| c.hash_balance_factor.as_ref()) {
        Some(f) if f.value < 100 => {
            return Err(format!("hash_balance_factor {} is below 100", f.value));
        }
        Some(f) => Some(f64::from(f.value) / 100.0),
        None => None,
    };
    Ok(HashLb { balance_factor })
}

/// The policy list clients pick from (the first they support): least
/// request, then round robin for clients without it (proxyless gRPC
/// rejects the legacy `lb_policy: LEAST_REQUEST` enum). Maglev is followed
/// by ring hash, so gRPC (which has no Maglev) still hashes.
fn lb_policies(
    lb: LbPolicy,
    slow_start: Option<Duration>,
    zones: ZoneRouting,
) -> LoadBalancingPolicy {
    let slow_start_config = crate::resilience::slow_start_config(slow_start);
    let locality_lb_config = Some(zone_aware(zones));
    let round_robin = policy(
        "envoy.load_balancing_policies.round_robin",
        to_any(
            ROUND_ROBIN,
            &RoundRobin {
                slow_start_config: slow_start_config.clone(),
                locality_lb_config,
            },
        ),
    );
    let policies = match lb {
        LbPolicy::LeastRequest {
            active_request_bias,
        } => vec![
            policy(
                "envoy.load_balancing_policies.least_request",
                to_any(
                    LEAST_REQUEST,
                    &LeastRequest {
                        choice_count: Some(UInt32Value { value: 2 }),
                        active_request_bias: Some(RuntimeDouble {
                            default_value: active_request_bias,
                            runtime_key: "meshwire.active_request_bias".into(),
                        }),
                        slow_start_config,
                        locality_lb_config,
                        ..Default::default()
                    },
                ),
            ),
            round_robin,
        ],
        LbPolicy::RoundRobin => vec![round_robin],
        LbPolicy::RingHash(h) => vec![ring_hash_policy(&h), round_robin],
        LbPolicy::Maglev(h) => vec![
            policy(
                "envoy.load_balancing_policies.maglev",
                to_any(
                    MAGLEV,
                    &Maglev {
                        table_size: Some(UInt64Value {
                            value: MAGLEV_TABLE_SIZE,
                        }),
                        consistent_hashing_lb_config: consistent_hashing(&h),
                        ..Default::default()
                    },
                ),
            ),
            ring_hash_policy(&h),
            round_robin,
        ],
    };
    LoadBalancingPolicy { policies }
}

/// Our policy from a `load_balancing_policy` list: the first we support.
fn decode_lb_policies(p: &LoadBalancingPolicy) -> Result<LbPolicy, String> {
    for entry in &p.policies {
        let Some(any) = entry
            .typed_extension_config
            .as_ref()
            .and_then(|t| t.typed_config.as_ref())
        else {
            continue;
        };
        match any.type_url.as_str() {
            LEAST_REQUEST => {
                let lr = LeastRequest::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
                return Ok(LbPolicy::LeastRequest {
                    active_request_bias: lr
                        .active_request_bias
                        .map_or(model::DEFAULT_ACTIVE_REQUEST_BIAS, |b| b.default_value),
                });
            }
            ROUND_ROBIN => return Ok(LbPolicy::RoundRobin),
            RING_HASH => {
                let r = RingHash::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
                // Our keys are xxHash64, Envoy's default; a murmur ring is not ours.
                if r.hash_function == ring_hash::HashFunction::MurmurHash2 as i32 {
                    continue;
                }
                return Ok(LbPolicy::RingHash(hash_lb(
                    r.consistent_hashing_lb_config.as_ref(),
                )?));
            }
            MAGLEV => {
                let m = Maglev::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
                return Ok(LbPolicy::Maglev(hash_lb(
                    m.consistent_hashing_lb_config.as_ref(),
                )?));
            }
            _ => {}
        }
    }
    Err(
        "no supported policy in load_balancing_policy (least_request, round_robin, ring_hash, maglev)"
            .into(),
    )
}

/// The slow-start window of the policy [`decode_lb_policies`] picks (or of
/// the legacy `lb_config`); hash policies carry it in our metadata.
fn decode_slow_start(x: &XCluster) -> Result<Option<Duration>, String> {
    use crate::resilience::decode_slow_start as window;
    let Some(p) = &x.load_balancing_policy else {
        return Ok(match &x.lb_config {
            Some(LbConfig::LeastRequestLbConfig(c)) => c
                .slow_start_config
                .as_ref()
                .and_then(|s| s.slow_start_window.as_ref())
                .and_then(from_pduration),
            Some(LbConfig::RoundRobinLbConfig(c)) => c
                .slow_start_config
                .as_ref()
                .and_then(|s| s.slow_start_window.as_ref())
                .and_then(from_pduration),
            _ => meta_slow_start(x),
        });
    };
    for any in p.policies.iter().filter_map(|e| {
        e.typed_extension_config
            .as_ref()
            .and_then(|t| t.typed_config.as_ref())
    }) {
        match any.type_url.as_str() {
            LEAST_REQUEST => {
                let lr = LeastRequest::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
                return Ok(window(lr.slow_start_config.as_ref()));
            }
            ROUND_ROBIN => {
                let rr = RoundRobin::decode(any.value.as_slice()).map_err(|e| e.to_string())?;
                return Ok(window(rr.slow_start_config.as_ref()));
            }
            RING_HASH | MAGLEV => return Ok(meta_slow_start(x)),
            _ => {}
        }
    }
    Ok(None)
}

fn meta_slow_start(x: &XCluster) -> Option<Duration> {
    meta_num(x.metadata.as_ref(), META, "slow_start_ms")
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_millis(ms as u64))
}

/// `typed_filter_metadata` key of the route's retry policy, for Meshwire
/// sidecars (which take no routes): the same Envoy message.
const RETRY_META: &str = "meshwire.retry_policy";

/// The xDS `Cluster` for a service (its endpoints go in the CLA).
pub(crate) fn encode_cluster(c: &Cluster) -> XCluster {
    let (lb_policy, lb_config) = match c.lb {
        LbPolicy::LeastRequest {
            active_request_bias,
        } => (
            XLbPolicy::LeastRequest,
            Some(LbConfig::LeastRequestLbConfig(LeastRequestLbConfig {
                choice_count: Some(UInt32Value { value: 2 }),
                active_request_bias: Some(RuntimeDouble {
                    default_value: active_request_bias,
                    runtime_key: format!("meshwire.{}.active_request_bias", c.name),
                }),
                slow_start_config: crate::resilience::legacy_slow_start(c.resilience.slow_start),
            })),
        ),
        LbPolicy::RoundRobin => (
            XLbPolicy::RoundRobin,
            c.resilience.slow_start.map(|_| {
                LbConfig::RoundRobinLbConfig(
                    envoy_types::pb::envoy::config::cluster::v3::cluster::RoundRobinLbConfig {
                        slow_start_config: crate::resilience::legacy_slow_start(
                            c.resilience.slow_start,
                        ),
                    },
                )
            }),
        ),
        LbPolicy::RingHash(_) => (
            XLbPolicy::RingHash,
            Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: Some(UInt64Value {
                    value: MIN_RING_SIZE,
                }),
                ..Default::default()
            })),
        ),
        LbPolicy::Maglev(_) => (
            XLbPolicy::Maglev,
            Some(LbConfig::MaglevLbConfig(MaglevLbConfig {
                table_size: Some(UInt64Value {
                    value: MAGLEV_TABLE_SIZE,
                }),
            })),
        ),
    };
    // No common_lb_config: beside load_balancing_policy, Envoy refuses its
    // consistent_hashing_lb_config and locality fields ("cannot be combined
    // with partial fields ... of common_lb_config"), which would reject the
    // cluster. The typed ring-hash / Maglev policies carry the balance
    // factor; clients reading only the legacy fields do without it.
    let mut fields = BTreeMap::new();
    if !c.hash_policy.is_empty() {
        let json = serde_json::to_string(&c.hash_policy).unwrap_or_default();
        fields.insert("hash_policy".to_owned(), str_value(&json));
    }
    if let Some(t) = c.request_timeout {
        fields.insert(
            "request_timeout_ms".to_owned(),
            num_value(t.as_millis() as f64),
        );
    }
    if let Some(a) = &c.authority {
        fields.insert("authority".to_owned(), str_value(a));
    }
    if let Some(p) = &c.policy {
        // Carried as JSON: Envoy and gRPC ignore our metadata.
        let json = serde_json::to_string(p).unwrap_or_default();
        fields.insert("policy".to_owned(), str_value(&json));
    }
    if let Some(l) = &c.rate_limit {
        // Enforced by the service's own sidecars (inbound); stock Envoy
        // gets no inbound listener from us, so no limit either.
        let json = serde_json::to_string(l).unwrap_or_default();
        fields.insert("rate_limit".to_owned(), str_value(&json));
    }
    if c.protocol != Protocol::Grpc {
        fields.insert("protocol".to_owned(), str_value(c.protocol.as_str()));
    }
    if c.permissive {
        fields.insert(
            "permissive".to_owned(),
            Value {
                kind: Some(value::Kind::BoolValue(true)),
            },
        );
    }
    // What Envoy's fields cannot say exactly.
    let res = &c.resilience;
    if let Some(codes) = res.outlier.failure_codes {
        fields.insert(
            "outlier_failure_codes".to_owned(),
            str_value(&codes.to_string()),
        );
    }
    if let Some(n) = res.circuit_breakers.max_requests_per_endpoint {
        fields.insert("max_requests_per_endpoint".to_owned(), num_value(n.into()));
    }
    if c.zones.min_healthy != ZoneRouting::DEFAULT_MIN_HEALTHY {
        // Envoy's zone-aware routing has no such threshold.
        fields.insert(
            "zone_min_healthy".to_owned(),
            num_value(c.zones.min_healthy),
        );
    }
    if let (Some(w), Some(_)) = (res.slow_start, c.lb.hash()) {
        fields.insert("slow_start_ms".to_owned(), num_value(w.as_millis() as f64));
    }
    let metadata = Some(Metadata {
        filter_metadata: (!fields.is_empty())
            .then(|| {
                (
                    META.to_owned(),
                    Struct {
                        fields: fields.into_iter().collect(),
                    },
                )
            })
            .into_iter()
            .collect(),
        typed_filter_metadata: [(
            RETRY_META.to_owned(),
            to_any(
                ROUTE_RETRY_POLICY,
                &crate::resilience::encode_retry(&res.retry),
            ),
        )]
        .into_iter()
        .collect(),
    });
    // Upstreams are sidecars' inbound listeners, HTTP/2 whatever the
    // protocol (`tcp` rides CONNECT streams); stock Envoy needs to be told.
    let http2 = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    XCluster {
        name: c.name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(pduration(c.connect_timeout)),
        // The legacy enum for older clients; `load_balancing_policy` wins where understood.
        lb_policy: lb_policy as i32,
        lb_config,
        load_balancing_policy: Some(lb_policies(c.lb, c.resilience.slow_start, c.zones)),
        outlier_detection: Some(crate::resilience::encode_outlier(&c.resilience.outlier)),
        circuit_breakers: Some(crate::resilience::encode_circuit_breakers(&c.resilience)),
        typed_extension_protocol_options: [(
            HTTP_OPTIONS_KEY.to_owned(),
            to_any(HTTP_OPTIONS, &http2),
        )]
        .into_iter()
        .collect(),
        metadata,
        ..Default::default()
    }
}

/// Zone-aware routing in Envoy's field, the least-request / round-robin
/// policy's `locality_lb_config.zone_aware_lb_config`: on is
/// `routing_enabled` 100 %, off 0 %; `min_cluster_size` 1, since Meshwire
/// applies zones to any size (a stock Envoy routes by zone only with a
/// `local_cluster_name` in its bootstrap, and then by its own model of the
/// callers' spread).
fn zone_aware(z: ZoneRouting) -> LocalityLbConfig {
    LocalityLbConfig {
        locality_config_specifier: Some(LocalitySpecifier::ZoneAwareLbConfig(XZoneAwareLbConfig {
            routing_enabled: Some(Percent {
                value: if z.enabled { 100.0 } else { 0.0 },
            }),
            min_cluster_size: Some(UInt64Value { value: 1 }),
            ..Default::default()
        })),
    }
}

/// The zone settings back: `routing_enabled` 0 % is off, anything else (or
/// no setting) on; the threshold from our metadata, else the default.
fn decode_zones(x: &XCluster) -> Result<ZoneRouting, String> {
    let mut z = ZoneRouting::default();
    let mut routing = None;
    for entry in x.load_balancing_policy.iter().flat_map(|p| &p.policies) {
        let Some(any) = entry
            .typed_extension_config
            .as_ref()
            .and_then(|t| t.typed_config.as_ref())
        else {
            continue;
        };
        let locality = match any.type_url.as_str() {
            LEAST_REQUEST => {
                LeastRequest::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())?
                    .locality_lb_config
            }
            ROUND_ROBIN => {
                RoundRobin::decode(any.value.as_slice())
                    .map_err(|e| e.to_string())?
                    .locality_lb_config
            }
            _ => continue,
        };
        if let Some(LocalitySpecifier::ZoneAwareLbConfig(cfg)) =
            locality.and_then(|l| l.locality_config_specifier)
        {
            routing = cfg.routing_enabled;
        }
        break;
    }
    if let Some(p) = routing {
        if !(0.0..=100.0).contains(&p.value) {
            return Err(format!("routing_enabled {} is not a percentage", p.value));
        }
        z.enabled = p.value > 0.0;
    }
    if let Some(f) = meta_num(x.metadata.as_ref(), META, "zone_min_healthy") {
        z.min_healthy = f;
    }
    Ok(z)
}

/// A cluster's settings from xDS (endpoints come separately, from EDS).
pub fn decode_cluster(any: &Any) -> Result<Cluster, ResourceError> {
    if any.type_url != CLUSTER {
        return Err(ResourceError::WrongType {
            got: any.type_url.clone(),
            want: CLUSTER,
        });
    }
    let x = XCluster::decode(any.value.as_slice()).map_err(|e| ResourceError::Decode {
        kind: "Cluster",
        name: String::new(),
        reason: e.to_string(),
    })?;
    let name = x.name.clone();
    let err = |field: &str, reason: String| ResourceError::Invalid {
        kind: "Cluster",
        name: name.clone(),
        field: field.to_owned(),
        reason,
    };
    match x.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => {}
        other => {
            return Err(err(
                "type",
                format!("only EDS clusters are supported, got {other:?}"),
            ));
        }
    }
    let lb = match &x.load_balancing_policy {
        Some(p) => decode_lb_policies(p).map_err(|e| err("load_balancing_policy", e))?,
        None => legacy_lb_policy(&x).map_err(|e| err("lb_policy", e))?,
    };
    let mut c = Cluster::new(name.clone());
    c.lb = lb;
    if let Some(t) = &x.connect_timeout {
        c.connect_timeout =
            from_pduration(t).ok_or_else(|| err("connect_timeout", "negative".into()))?;
    }
    let md = x.metadata.as_ref();
    if let Some(ms) = meta_num(md, META, "request_timeout_ms") {
        if !(ms.is_finite() && ms >= 0.0) {
            return Err(err("metadata.request_timeout_ms", format!("invalid {ms}")));
        }
        c.request_timeout = Some(Duration::from_millis(ms as u64));
    }
    c.authority = meta_str(md, META, "authority").map(str::to_owned);
    if let Some(p) = meta_str(md, META, "protocol") {
        c.protocol = p
            .parse()
            .map_err(|e: ModelError| err("metadata.protocol", e.reason))?;
    }
    if let Some(json) = meta_str(md, META, "hash_policy") {
        c.hash_policy = serde_json::from_str(json)
            .map_err(|e| err("metadata.hash_policy", format!("invalid hash policy: {e}")))?;
    }
    if let Some(json) = meta_str(md, META, "policy") {
        c.policy = Some(
            serde_json::from_str(json)
                .map_err(|e| err("metadata.policy", format!("invalid policy: {e}")))?,
        );
    }
    if let Some(json) = meta_str(md, META, "rate_limit") {
        c.rate_limit = Some(
            serde_json::from_str(json)
                .map_err(|e| err("metadata.rate_limit", format!("invalid rate limit: {e}")))?,
        );
    }
    c.zones = decode_zones(&x).map_err(|e| err("load_balancing_policy", e))?;
    c.permissive = md
        .and_then(|m| m.filter_metadata.get(META))
        .and_then(|s| s.fields.get("permissive"))
        .is_some_and(|v| matches!(v.kind, Some(value::Kind::BoolValue(true))));
    let codes = meta_str(md, META, "outlier_failure_codes")
        .map(meshwire_mesh::CodeSet::parse)
        .transpose()
        .map_err(|e| err("metadata.outlier_failure_codes", e))?;
    let slow_start = decode_slow_start(&x).map_err(|e| err("load_balancing_policy", e))?;
    c.resilience =
        Box::new(crate::resilience::decode(&x, codes, slow_start).map_err(|(f, e)| err(f, e))?);
    if let Some(n) = meta_num(md, META, "max_requests_per_endpoint") {
        if !(n.is_finite() && n >= 0.0 && n <= f64::from(u32::MAX)) {
            return Err(err(
                "metadata.max_requests_per_endpoint",
                format!("invalid {n}"),
            ));
        }
        c.resilience.circuit_breakers.max_requests_per_endpoint = Some(n as u32);
    }
    if let Some(any) = md.and_then(|m| m.typed_filter_metadata.get(RETRY_META)) {
        let x =
            envoy_types::pb::envoy::config::route::v3::RetryPolicy::decode(any.value.as_slice())
                .map_err(|e| err("metadata.retry_policy", e.to_string()))?;
        let budget = c.resilience.retry;
        c.resilience.retry =
            crate::resilience::decode_retry(&x).map_err(|e| err("metadata.retry_policy", e))?;
        c.resilience.retry.budget_percent = budget.budget_percent;
        c.resilience.retry.min_retries_per_second = budget.min_retries_per_second;
    }
    c.validate().map_err(|e| invalid("Cluster", &name, e))?;
    Ok(c)
}

fn legacy_lb_policy(x: &XCluster) -> Result<LbPolicy, String> {
    Ok(match XLbPolicy::try_from(x.lb_policy) {
        Ok(XLbPolicy::LeastRequest) => LbPolicy::LeastRequest {
            active_request_bias: match &x.lb_config {
                Some(LbConfig::LeastRequestLbConfig(c)) => c
                    .active_request_bias
                    .as_ref()
                    .map_or(model::DEFAULT_ACTIVE_REQUEST_BIAS, |b| b.default_value),
                _ => model::DEFAULT_ACTIVE_REQUEST_BIAS,
            },
        },
        Ok(XLbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(kind @ (XLbPolicy::RingHash | XLbPolicy::Maglev)) => {
            let ch = x
                .common_lb_config
                .as_ref()
                .and_then(|c| c.consistent_hashing_lb_config.as_ref())
                .map(|c| ConsistentHashingLbConfig {
                    hash_balance_factor: c.hash_balance_factor,
                    ..Default::default()
                });
            let h = hash_lb(ch.as_ref())?;
            if kind == XLbPolicy::RingHash {
                LbPolicy::RingHash(h)
            } else {
                LbPolicy::Maglev(h)
            }
        }
        Ok(other) => {
            return Err(format!(
                "{other:?} is not supported (LEAST_REQUEST, ROUND_ROBIN, RING_HASH or MAGLEV)"
            ));
        }
        Err(_) => return Err(format!("unknown value {}", x.lb_policy)),
    })
}

// === ClusterLoadAssignment ===

/// Endpoints grouped by zone (one locality each), weights as
/// `load_balancing_weight`, draining endpoints `DRAINING`, endpoints whose
/// sidecar reports them unhealthy `UNHEALTHY` (every client drops or skips
/// those), the others `HEALTHY`.
pub(crate) fn encode_cla(c: &Cluster) -> ClusterLoadAssignment {
    let mut by_zone: BTreeMap<&str, Vec<&Endpoint>> = BTreeMap::new();
    for e in &c.endpoints {
        by_zone
            .entry(e.zone.as_deref().unwrap_or(""))
            .or_default()
            .push(e);
    }
    let endpoints = by_zone
        .into_iter()
        .map(|(zone, eps)| LocalityLbEndpoints {
            locality: Some(Locality {
                zone: zone.to_owned(),
                ..Default::default()
            }),
            // gRPC drops localities without a weight.
            load_balancing_weight: Some(UInt32Value {
                value: eps.iter().map(|e| e.weight).sum::<u32>().max(1),
            }),
            lb_endpoints: eps.into_iter().map(encode_lb_endpoint).collect(),
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: c.name.clone(),
        endpoints,
        ..Default::default()
    }
}

fn encode_lb_endpoint(e: &Endpoint) -> LbEndpoint {
    let mut filter_metadata = std::collections::HashMap::new();
    if let Some(id) = &e.identity {
        filter_metadata.insert(
            META.to_owned(),
            Struct {
                fields: [("identity".to_owned(), str_value(id))]
                    .into_iter()
                    .collect(),
            },
        );
    }
    if !e.metadata.is_empty() {
        filter_metadata.insert(
            USER_META.to_owned(),
            Struct {
                fields: e
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), str_value(v)))
                    .collect(),
            },
        );
    }
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(XEndpoint {
            address: Some(socket(e.address)),
            ..Default::default()
        })),
        health_status: if e.draining {
            HealthStatus::Draining
        } else if e.is_unhealthy() {
            HealthStatus::Unhealthy
        } else {
            HealthStatus::Healthy
        } as i32,
        load_balancing_weight: Some(UInt32Value { value: e.weight }),
        metadata: (!filter_metadata.is_empty()).then(|| Metadata {
            filter_metadata,
            ..Default::default()
        }),
    }
}

fn socket(a: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// A CLA's endpoints, validated. Unhealthy endpoints are kept, marked
/// unhealthy ([`Endpoint::is_unhealthy`]): the sidecar sends them nothing but
/// counts them in their zone's capacity (zone-aware routing); draining ones
/// are kept (marked) so their in-flight calls finish.
pub fn decode_cla(any: &Any) -> Result<(String, Vec<Endpoint>), ResourceError> {
    if any.type_url != ENDPOINT {
        return Err(ResourceError::WrongType {
            got: any.type_url.clone(),
            want: ENDPOINT,
        });
    }
    let x =
        ClusterLoadAssignment::decode(any.value.as_slice()).map_err(|e| ResourceError::Decode {
            kind: "ClusterLoadAssignment",
            name: String::new(),
            reason: e.to_string(),
        })?;
    let name = x.cluster_name.clone();
    let mut out = Vec::new();
    for (li, loc) in x.endpoints.iter().enumerate() {
        let zone = loc
            .locality
            .as_ref()
            .map(|l| l.zone.clone())
            .filter(|z| !z.is_empty());
        for (ei, lb) in loc.lb_endpoints.iter().enumerate() {
            let path = format!("endpoints[{li}].lb_endpoints[{ei}]");
            let err = |field: &str, reason: String| ResourceError::Invalid {
                kind: "ClusterLoadAssignment",
                name: name.clone(),
                field: format!("{path}.{field}"),
                reason,
            };
            let health = HealthStatus::try_from(lb.health_status).unwrap_or(HealthStatus::Unknown);
            let unhealthy = matches!(health, HealthStatus::Unhealthy | HealthStatus::Timeout);
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(err(
                    "endpoint",
                    "missing (named endpoints are not supported)".into(),
                ));
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(err("endpoint.address", "missing socket address".into()));
            };
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                err(
                    "endpoint.address.address",
                    format!("{:?} is not an IP", sa.address),
                )
            })?;
            let port = match sa.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) if p > 0 && p <= 65535 => {
                    p as u16
                }
                _ => {
                    return Err(err(
                        "endpoint.address.port_value",
                        "missing or out of range".into(),
                    ));
                }
            };
            let md = lb.metadata.as_ref();
            let metadata = md
                .and_then(|m| m.filter_metadata.get(USER_META))
                .map(|s| {
                    s.fields
                        .iter()
                        .filter_map(|(k, v)| match &v.kind {
                            Some(value::Kind::StringValue(s)) => Some((k.clone(), s.clone())),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let e = Endpoint {
                address: SocketAddr::new(ip, port),
                weight: lb.load_balancing_weight.as_ref().map_or(1, |w| w.value),
                zone: zone.clone(),
                draining: health == HealthStatus::Draining,
                identity: meta_str(md, META, "identity").map(str::to_owned),
                metadata,
                // Reports live on the control plane; HEALTHY and UNKNOWN
                // endpoints are used alike.
                health: unhealthy.then_some(meshwire_mesh::ReportedHealth {
                    healthy: false,
                    at: std::time::SystemTime::UNIX_EPOCH,
                }),
            };
            e.validate().map_err(|m| err(&m.field, m.reason))?;
            out.push(e);
        }
    }
    let mut seen = BTreeSet::new();
    for e in &out {
        if !seen.insert(e.address) {
            return Err(ResourceError::Invalid {
                kind: "ClusterLoadAssignment",
                name,
                field: "endpoints".into(),
                reason: format!("{} appears twice", e.address),
            });
        }
    }
    Ok((name, out))
}

// === Listener / RouteConfiguration ===

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(to_any(
            ROUTER,
            &Router::default(),
        ))),
        ..Default::default()
    }
}

fn hcm(stat_prefix: &str, route_name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_owned(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name.to_owned(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    }
}

/// Proxyless gRPC's listener for `xds:///<service>` (gRFC A27): an API
/// listener whose route configuration is named after the service.
pub(crate) fn grpc_api_listener(service: &str) -> Listener {
    Listener {
        name: service.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(to_any(HCM, &hcm(service, service))),
        }),
        ..Default::default()
    }
}

/// Each source stops the search once it yields a hash (`terminal`), so the
/// first one present wins, as in the sidecar.
fn hash_policies(cluster: &Cluster) -> Vec<route_action::HashPolicy> {
    use route_action::hash_policy::{self as hp, PolicySpecifier};
    if cluster.lb.hash().is_none() {
        return Vec::new();
    }
    cluster
        .hash_policy
        .iter()
        .map(|s| route_action::HashPolicy {
            terminal: true,
            policy_specifier: Some(match s {
                HashSource::Header(h) => PolicySpecifier::Header(hp::Header {
                    header_name: h.clone(),
                    ..Default::default()
                }),
                HashSource::SourceIp => {
                    PolicySpecifier::ConnectionProperties(hp::ConnectionProperties {
                        source_ip: true,
                    })
                }
                // A ttl (0: a session cookie) makes Envoy set the cookie when absent.
                HashSource::Cookie { name, ttl } => PolicySpecifier::Cookie(hp::Cookie {
                    name: name.clone(),
                    ttl: Some(pduration(ttl.unwrap_or_default())),
                    path: "/".into(),
                    ..Default::default()
                }),
            }),
        })
        .collect()
}

fn route_to(cluster: &Cluster) -> Route {
    Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                cluster.name.clone(),
            )),
            // Envoy's default route timeout (15 s) would cut streams; follow the service's.
            timeout: Some(pduration(cluster.request_timeout.unwrap_or(Duration::ZERO))),
            hash_policy: hash_policies(cluster),
            retry_policy: Some(crate::resilience::encode_retry(&cluster.resilience.retry)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Proxyless gRPC's route configuration for one service.
pub(crate) fn grpc_route(cluster: &Cluster) -> RouteConfiguration {
    RouteConfiguration {
        name: cluster.name.clone(),
        virtual_hosts: vec![VirtualHost {
            name: cluster.name.clone(),
            domains: vec!["*".into()],
            routes: vec![route_to(cluster)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Stock Envoy's outbound listener: h2c/HTTP1 on `127.0.0.1:port`, routed by RDS.
pub(crate) fn envoy_listener(port: u32) -> Listener {
    Listener {
        name: ENVOY_LISTENER.into(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(to_any(
                    HCM,
                    &hcm(ENVOY_LISTENER, ENVOY_ROUTE),
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Stock Envoy's listener for one `tcp` service on `127.0.0.1:port`: a
/// `tcp_proxy` that tunnels each connection as an HTTP/2 CONNECT stream to
/// the service's sidecars (the same carriage Meshwire sidecars use). No idle
/// timeout: Envoy's default of 1 h cuts long-lived quiet connections (MQTT).
pub(crate) fn envoy_tcp_listener(cluster: &Cluster, port: u32) -> Listener {
    let name = format!("{ENVOY_TCP_LISTENER_PREFIX}{}", cluster.name);
    let proxy = TcpProxy {
        stat_prefix: name.clone(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.name.clone())),
        tunneling_config: Some(tcp_proxy::TunnelingConfig {
            hostname: cluster.name.clone(),
            ..Default::default()
        }),
        idle_timeout: Some(pduration(Duration::ZERO)),
        ..Default::default()
    };
    Listener {
        name,
        address: Some(socket(SocketAddr::from(([127, 0, 0, 1], port as u16)))),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(to_any(TCP_PROXY, &proxy))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Stock Envoy's routes: one virtual host per HTTP (`grpc`, `http`) service,
/// matched by authority (`greeter` and `greeter:<any port>`).
pub(crate) fn envoy_route<'a>(clusters: impl Iterator<Item = &'a Cluster>) -> RouteConfiguration {
    RouteConfiguration {
        name: ENVOY_ROUTE.into(),
        virtual_hosts: clusters
            .filter(|c| c.protocol.is_http())
            .map(|c| VirtualHost {
                name: c.name.clone(),
                domains: vec![c.name.clone(), format!("{}:*", c.name)],
                routes: vec![route_to(c)],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let mut c = Cluster::new("greeter");
        c.connect_timeout = Duration::from_millis(250);
        c.request_timeout = Some(Duration::from_secs(5));
        c.authority = Some("greeter.internal".into());
        c.lb = LbPolicy::LeastRequest {
            active_request_bias: 1.5,
        };
        let mut e1 = Endpoint::new("10.0.0.1:15006".parse().unwrap()).with_weight(3);
        e1.zone = Some("a".into());
        e1.identity = Some("spiffe://mesh/ns/default/sa/greeter".into());
        e1.metadata.insert("version".into(), "v2".into());
        let mut e2 = Endpoint::new("[fd00::2]:15006".parse().unwrap());
        e2.draining = true;
        c.endpoints = vec![e1, e2];
        c.permissive = true;
        c.protocol = Protocol::Http;
        c.policy = Some(meshwire_mesh::policy::Policy {
            default_action: meshwire_mesh::policy::Action::Deny,
            rules: vec![meshwire_mesh::policy::Rule {
                action: Some(meshwire_mesh::policy::Action::Allow),
                sources: vec!["spiffe://mesh/ns/prod/*".into()],
                methods: vec!["pkg.Echo/*".into()],
                cidrs: vec!["10.0.0.0/8".into()],
            }],
        });
        let mut limit = meshwire_mesh::RateLimit::new(meshwire_mesh::Rate::per_second(20));
        limit.per = meshwire_mesh::LimitPer::Caller;
        limit.burst = Some(5);
        limit.overrides = vec![
            meshwire_mesh::ratelimit::parse_override("spiffe://mesh/ns/prod/sa/batch=1000/m")
                .unwrap(),
        ];
        c.rate_limit = Some(limit);
        c
    }

    /// The fuzz seeds (`fuzz/corpus/xds_resources/`, first byte: 0 a
    /// Cluster, 1 a CLA) must decode; `--ignored` writes them anew.
    #[test]
    fn fuzz_seeds_decode() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/xds_resources");
        let mut hashed = cluster();
        hashed.lb = LbPolicy::RingHash(HashLb {
            balance_factor: Some(1.25),
        });
        hashed.hash_policy = vec![HashSource::Header("x-user".into()), HashSource::SourceIp];
        let seeds = [
            ("cluster", [0u8], encode_cluster(&cluster()).encode_to_vec()),
            ("cluster-hash", [0], encode_cluster(&hashed).encode_to_vec()),
            ("cla", [1], encode_cla(&cluster()).encode_to_vec()),
        ];
        for (name, kind, bytes) in seeds {
            let path = dir.join(name);
            let data = [&kind[..], &bytes].concat();
            if std::env::var_os("WRITE_FUZZ_SEEDS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &data).unwrap();
            }
            let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let value = stored[1..].to_vec();
            if stored[0] == 0 {
                decode_cluster(&Any {
                    type_url: CLUSTER.into(),
                    value,
                })
                .unwrap();
            } else {
                decode_cla(&Any {
                    type_url: ENDPOINT.into(),
                    value,
                })
                .unwrap();
            }
        }
    }

    #[test]
    fn cluster_and_endpoints_round_trip() {
        let c = cluster();
        let mut back = decode_cluster(&to_any(CLUSTER, &encode_cluster(&c))).unwrap();
        let (name, eps) = decode_cla(&to_any(ENDPOINT, &encode_cla(&c))).unwrap();
        assert_eq!(name, "greeter");
        back.endpoints = eps;
        // Zones group endpoints: order within the CLA is by zone.
        back.endpoints.sort_by_key(|e| e.address);
        let mut want = c.clone();
        want.endpoints.sort_by_key(|e| e.address);
        assert_eq!(back, want);
        let rr = Cluster {
            lb: LbPolicy::RoundRobin,
            ..Cluster::new("rr")
        };
        assert_eq!(
            decode_cluster(&to_any(CLUSTER, &encode_cluster(&rr)))
                .unwrap()
                .lb,
            LbPolicy::RoundRobin
        );
    }

    #[test]
    fn zone_routing_round_trips_through_envoys_field() {
        for zones in [
            ZoneRouting::default(),
            ZoneRouting {
                enabled: false,
                min_healthy: 0.5,
            },
            ZoneRouting {
                enabled: true,
                min_healthy: 1.0,
            },
        ] {
            for lb in [LbPolicy::default(), LbPolicy::RoundRobin] {
                let c = Cluster {
                    zones,
                    lb,
                    ..Cluster::new("z")
                };
                let x = encode_cluster(&c);
                assert!(
                    x.common_lb_config.is_none(),
                    "Envoy refuses common_lb_config's locality fields beside load_balancing_policy"
                );
                let any = x.load_balancing_policy.as_ref().unwrap().policies[0]
                    .typed_extension_config
                    .as_ref()
                    .unwrap()
                    .typed_config
                    .clone()
                    .unwrap();
                let locality = if lb == LbPolicy::RoundRobin {
                    RoundRobin::decode(any.value.as_slice())
                        .unwrap()
                        .locality_lb_config
                } else {
                    LeastRequest::decode(any.value.as_slice())
                        .unwrap()
                        .locality_lb_config
                };
                let Some(LocalitySpecifier::ZoneAwareLbConfig(z)) =
                    locality.and_then(|l| l.locality_config_specifier)
                else {
                    panic!("no zone_aware_lb_config: {x:?}");
                };
                let want = if zones.enabled { 100.0 } else { 0.0 };
                assert_eq!(z.routing_enabled.map(|p| p.value), Some(want));
                assert_eq!(z.min_cluster_size.map(|n| n.value), Some(1));
                let back = decode_cluster(&to_any(CLUSTER, &x)).unwrap();
                assert_eq!(back.zones, zones);
            }
        }
        // An out-of-range threshold is refused, naming the field.
        let mut x = encode_cluster(&Cluster::new("z"));
        x.metadata
            .get_or_insert_default()
            .filter_metadata
            .entry(META.to_owned())
            .or_default()
            .fields
            .insert("zone_min_healthy".into(), num_value(0.0));
        let e = decode_cluster(&to_any(CLUSTER, &x))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zones.min_healthy"), "{e}");
    }

    fn resilient(lb: LbPolicy) -> Cluster {
        use meshwire_mesh::resilience::*;
        let mut c = Cluster::new("echo");
        c.lb = lb;
        let r = &mut c.resilience;
        r.outlier = OutlierDetection {
            consecutive_failures: Some(3),
            base_ejection_time: Some(Duration::from_millis(500)),
            max_ejection_time: Some(Duration::from_secs(30)),
            max_ejection_percent: Some(34),
            failure_codes: Some(CodeSet::parse("unavailable,internal").unwrap()),
            failure_percentage: Some(60),
            failure_percentage_min_hosts: Some(3),
            failure_percentage_min_calls: Some(20),
            failure_percentage_interval: Some(Duration::from_secs(2)),
        };
        r.retry = RetryPolicy {
            retry_on: Some(CodeSet::parse("unavailable,internal,resource-exhausted").unwrap()),
            max_attempts: Some(3),
            per_try_timeout: Some(Duration::from_millis(200)),
            backoff_base: Some(Duration::from_millis(10)),
            backoff_max: Some(Duration::from_millis(100)),
            budget_percent: Some(50),
            min_retries_per_second: Some(3),
        };
        r.circuit_breakers = CircuitBreakers {
            max_requests: Some(4),
            max_requests_per_endpoint: Some(2),
        };
        r.slow_start = Some(Duration::from_secs(30));
        c
    }

    #[test]
    fn resilience_round_trips_through_envoys_fields() {
        for lb in [
            LbPolicy::default(),
            LbPolicy::RoundRobin,
            LbPolicy::RingHash(HashLb::default()),
            LbPolicy::Maglev(HashLb::default()),
        ] {
            let c = resilient(lb);
            let x = encode_cluster(&c);
            let back = decode_cluster(&to_any(CLUSTER, &x)).unwrap();
            assert_eq!(back.resilience, c.resilience, "{lb:?}");
            // A default cluster decodes as all defaults (nothing "set").
            let plain = Cluster {
                lb,
                ..Cluster::new("plain")
            };
            let back = decode_cluster(&to_any(CLUSTER, &encode_cluster(&plain))).unwrap();
            assert!(back.resilience.is_unset(), "{lb:?}: {:?}", back.resilience);
        }
        // Detection off, and the gateway-failure flavour.
        let mut c = Cluster::new("off");
        c.resilience.outlier.consecutive_failures = Some(0);
        let x = encode_cluster(&c);
        let o = x.outlier_detection.as_ref().unwrap();
        assert_eq!(o.enforcing_consecutive_5xx.as_ref().unwrap().value, 0);
        assert_eq!(
            o.enforcing_consecutive_gateway_failure
                .as_ref()
                .unwrap()
                .value,
            0
        );
        let back = decode_cluster(&to_any(CLUSTER, &x)).unwrap();
        assert_eq!(back.resilience.outlier.consecutive_failures, Some(0));
        c.resilience.outlier.consecutive_failures = None;
        c.resilience.outlier.failure_codes =
            Some(meshwire_mesh::CodeSet::parse("unavailable").unwrap());
        let x = encode_cluster(&c);
        let o = x.outlier_detection.as_ref().unwrap();
        assert_eq!(o.enforcing_consecutive_5xx.as_ref().unwrap().value, 0);
        assert_eq!(
            o.enforcing_consecutive_gateway_failure
                .as_ref()
                .unwrap()
                .value,
            100
        );
        assert_eq!(o.consecutive_gateway_failure.as_ref().unwrap().value, 5);
        let back = decode_cluster(&to_any(CLUSTER, &x)).unwrap();
        assert_eq!(back.resilience, c.resilience);
    }

    #[test]
    fn envoy_reads_resilience_in_its_own_fields() {
        let c = resilient(LbPolicy::default());
        let x = encode_cluster(&c);
        let o = x.outlier_detection.as_ref().unwrap();
        assert_eq!(o.consecutive_5xx.as_ref().unwrap().value, 3);
        assert_eq!(o.enforcing_consecutive_5xx.as_ref().unwrap().value, 100);
        assert_eq!(
            o.base_ejection_time,
            Some(pduration(Duration::from_millis(500)))
        );
        assert_eq!(
            o.max_ejection_time,
            Some(pduration(Duration::from_secs(30)))
        );
        assert_eq!(o.max_ejection_percent.as_ref().unwrap().value, 34);
        assert_eq!(o.enforcing_failure_percentage.as_ref().unwrap().value, 100);
        assert_eq!(o.failure_percentage_threshold.as_ref().unwrap().value, 60);
        assert_eq!(
            o.failure_percentage_minimum_hosts.as_ref().unwrap().value,
            3
        );
        assert_eq!(
            o.failure_percentage_request_volume.as_ref().unwrap().value,
            20
        );
        assert_eq!(o.interval, Some(pduration(Duration::from_secs(2))));
        let t = &x.circuit_breakers.as_ref().unwrap().thresholds[0];
        assert_eq!(t.max_requests.as_ref().unwrap().value, 4);
        let b = t.retry_budget.as_ref().unwrap();
        assert_eq!(b.budget_percent.as_ref().unwrap().value, 50.0);
        assert_eq!(b.min_retry_concurrency.as_ref().unwrap().value, 3);
        // Slow start in the least-request policy Envoy picks (and the legacy field).
        let any = x.load_balancing_policy.as_ref().unwrap().policies[0]
            .typed_extension_config
            .as_ref()
            .unwrap()
            .typed_config
            .as_ref()
            .unwrap();
        let lr = LeastRequest::decode(any.value.as_slice()).unwrap();
        let ss = lr.slow_start_config.unwrap();
        assert_eq!(
            ss.slow_start_window,
            Some(pduration(Duration::from_secs(30)))
        );
        assert_eq!(ss.min_weight_percent.unwrap().value, 10.0);
        // The route's retry policy, for Envoy and proxyless gRPC.
        let route = envoy_route(std::iter::once(&c));
        let Some(route::Action::Route(a)) = &route.virtual_hosts[0].routes[0].action else {
            panic!("no route action");
        };
        let rp = a.retry_policy.as_ref().unwrap();
        assert_eq!(rp.retry_on, "resource-exhausted,internal,unavailable");
        assert_eq!(rp.num_retries.as_ref().unwrap().value, 2);
        assert_eq!(
            rp.per_try_timeout,
            Some(pduration(Duration::from_millis(200)))
        );
        let bo = rp.retry_back_off.as_ref().unwrap();
        assert_eq!(bo.base_interval, Some(pduration(Duration::from_millis(10))));
        assert_eq!(bo.max_interval, Some(pduration(Duration::from_millis(100))));
        assert_eq!(
            rp.retry_host_predicate[0].name,
            "envoy.retry_host_predicates.previous_hosts"
        );
        // The route's policy decodes to the model's (the budget lives in CDS).
        let mut want = c.resilience.retry;
        want.budget_percent = None;
        want.min_retries_per_second = None;
        assert_eq!(crate::resilience::decode_retry(rp).unwrap(), want);
        // Defaults still reach Envoy: one retry of UNAVAILABLE, 5 failures eject.
        let plain = Cluster::new("plain");
        let route = envoy_route(std::iter::once(&plain));
        let Some(route::Action::Route(a)) = &route.virtual_hosts[0].routes[0].action else {
            panic!("no route action");
        };
        let rp = a.retry_policy.as_ref().unwrap();
        assert_eq!(
            (rp.retry_on.as_str(), rp.num_retries.unwrap().value),
            ("unavailable", 1)
        );
        let x = encode_cluster(&plain);
        assert_eq!(
            x.outlier_detection.unwrap().consecutive_5xx.unwrap().value,
            5
        );
        assert!(
            x.circuit_breakers.unwrap().thresholds[0]
                .max_requests
                .is_none(),
            "the sidecar's flag"
        );
    }

    #[test]
    fn invalid_resilience_is_refused_with_the_field() {
        let mut c = resilient(LbPolicy::default());
        c.resilience.retry.max_attempts = Some(5);
        let mut x = encode_cluster(&c);
        let any = x
            .metadata
            .as_mut()
            .unwrap()
            .typed_filter_metadata
            .get_mut(RETRY_META)
            .unwrap();
        let mut rp =
            envoy_types::pb::envoy::config::route::v3::RetryPolicy::decode(any.value.as_slice())
                .unwrap();
        rp.num_retries = Some(UInt32Value { value: 9 });
        *any = to_any(ROUTE_RETRY_POLICY, &rp);
        let e = decode_cluster(&to_any(CLUSTER, &x))
            .unwrap_err()
            .to_string();
        assert!(e.contains("retry.max_attempts"), "{e}");
    }

    #[test]
    fn hash_policies_round_trip_and_reach_the_route() {
        use route_action::hash_policy::PolicySpecifier;
        for lb in [
            LbPolicy::RingHash(HashLb {
                balance_factor: Some(1.25),
            }),
            LbPolicy::Maglev(HashLb::default()),
        ] {
            let mut c = cluster();
            c.lb = lb;
            c.hash_policy = vec![
                HashSource::Header("x-user".into()),
                HashSource::Cookie {
                    name: "sticky".into(),
                    ttl: Some(Duration::from_secs(600)),
                },
                HashSource::SourceIp,
            ];
            let x = encode_cluster(&c);
            let mut back = decode_cluster(&to_any(CLUSTER, &x)).unwrap();
            back.endpoints = c.endpoints.clone();
            assert_eq!(back, c);
            // Stock Envoy refuses common_lb_config's hashing fields beside the typed list.
            assert!(x.common_lb_config.is_none());
            // Clients without the typed list read the legacy fields: the same
            // policy, without a balance factor.
            let mut legacy = x.clone();
            legacy.load_balancing_policy = None;
            let plain = match lb {
                LbPolicy::RingHash(_) => LbPolicy::RingHash(HashLb::default()),
                _ => LbPolicy::Maglev(HashLb::default()),
            };
            assert_eq!(decode_cluster(&to_any(CLUSTER, &legacy)).unwrap().lb, plain);
            // gRPC has no Maglev: ring hash follows it in the list.
            let urls: Vec<_> = x
                .load_balancing_policy
                .as_ref()
                .unwrap()
                .policies
                .iter()
                .map(|p| {
                    p.typed_extension_config
                        .as_ref()
                        .unwrap()
                        .typed_config
                        .as_ref()
                        .unwrap()
                        .type_url
                        .as_str()
                })
                .collect();
            assert!(urls.contains(&RING_HASH), "{urls:?}");
            let route = grpc_route(&c);
            let Some(route::Action::Route(a)) = &route.virtual_hosts[0].routes[0].action else {
                panic!("no route action");
            };
            assert_eq!(a.hash_policy.len(), 3);
            assert!(a.hash_policy.iter().all(|h| h.terminal));
            assert!(matches!(&a.hash_policy[0].policy_specifier,
                Some(PolicySpecifier::Header(h)) if h.header_name == "x-user"));
            assert!(matches!(&a.hash_policy[2].policy_specifier,
                Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip));
        }
        // No hashing policy, no route hash policy.
        let mut c = cluster();
        c.hash_policy = vec![HashSource::SourceIp];
        let Some(route::Action::Route(a)) = &grpc_route(&c).virtual_hosts[0].routes[0].action
        else {
            panic!("no route action");
        };
        assert!(a.hash_policy.is_empty());
        // A balance factor below 100 % is refused.
        let mut c = cluster();
        c.lb = LbPolicy::RingHash(HashLb {
            balance_factor: Some(1.5),
        });
        let mut x = encode_cluster(&c);
        let p = &mut x.load_balancing_policy.as_mut().unwrap().policies[0];
        let any = p
            .typed_extension_config
            .as_mut()
            .unwrap()
            .typed_config
            .as_mut()
            .unwrap();
        let mut r = RingHash::decode(any.value.as_slice()).unwrap();
        r.consistent_hashing_lb_config
            .as_mut()
            .unwrap()
            .hash_balance_factor = Some(UInt32Value { value: 50 });
        *any = to_any(RING_HASH, &r);
        let e = decode_cluster(&to_any(CLUSTER, &x))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hash_balance_factor 50"), "{e}");
    }

    #[test]
    fn invalid_resources_name_the_problem() {
        // The policy list: the first supported entry wins; none supported is an error.
        let mut x = encode_cluster(&cluster());
        x.load_balancing_policy.as_mut().unwrap().policies.remove(0);
        assert_eq!(
            decode_cluster(&to_any(CLUSTER, &x)).unwrap().lb,
            LbPolicy::RoundRobin
        );
        x.load_balancing_policy.as_mut().unwrap().policies.clear();
        let e = decode_cluster(&to_any(CLUSTER, &x))
            .unwrap_err()
            .to_string();
        assert!(e.contains("load_balancing_policy"), "{e}");

        // Without the list, the legacy enum decides.
        let mut x = encode_cluster(&cluster());
        x.load_balancing_policy = None;
        x.lb_policy = XLbPolicy::Random as i32;
        let e = decode_cluster(&to_any(CLUSTER, &x))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"greeter\"") && e.contains("lb_policy") && e.contains("Random"),
            "{e}"
        );

        let mut x = encode_cluster(&cluster());
        x.name = "Bad Name".into();
        let e = decode_cluster(&to_any(CLUSTER, &x))
            .unwrap_err()
            .to_string();
        assert!(e.contains("name"), "{e}");

        let mut cla = encode_cla(&cluster());
        cla.endpoints[0].lb_endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
        let e = decode_cla(&to_any(ENDPOINT, &cla)).unwrap_err().to_string();
        assert!(
            e.contains("lb_endpoints[0].weight") && e.contains("between 1 and 10000"),
            "{e}"
        );

        let e = decode_cla(&to_any(CLUSTER, &cla)).unwrap_err();
        assert!(matches!(e, ResourceError::WrongType { .. }));
        let garbage = Any {
            type_url: CLUSTER.into(),
            value: vec![0xff, 0xff, 0xff],
        };
        assert!(matches!(
            decode_cluster(&garbage),
            Err(ResourceError::Decode { .. })
        ));
    }

    #[test]
    fn protocol_round_trips_and_bad_names_are_refused() {
        for p in Protocol::ALL {
            let c = Cluster {
                protocol: p,
                ..Cluster::new("svc")
            };
            let back = decode_cluster(&to_any(CLUSTER, &encode_cluster(&c))).unwrap();
            assert_eq!(back.protocol, p);
        }
        let mut x = encode_cluster(&cluster());
        x.metadata
            .as_mut()
            .unwrap()
            .filter_metadata
            .get_mut(META)
            .unwrap()
            .fields
            .insert("protocol".into(), str_value("udp"));
        let e = decode_cluster(&to_any(CLUSTER, &x))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metadata.protocol") && e.contains("\"udp\""),
            "{e}"
        );
    }

    #[test]
    fn envoy_gets_tcp_proxy_for_tcp_and_routes_for_http() {
        let tcp = Cluster {
            protocol: Protocol::Tcp,
            ..Cluster::new("mqtt")
        };
        let web = Cluster {
            protocol: Protocol::Http,
            ..Cluster::new("web")
        };
        let rc = envoy_route([&tcp, &web, &Cluster::new("greeter")].into_iter());
        let hosts: Vec<_> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(hosts, ["web", "greeter"]);
        let l = envoy_tcp_listener(&tcp, 18830);
        assert_eq!(l.name, "meshwire_tcp_mqtt");
        let f = &l.filter_chains[0].filters[0];
        let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
            panic!("typed config")
        };
        let p = TcpProxy::decode(any.value.as_slice()).unwrap();
        assert_eq!(
            p.cluster_specifier,
            Some(tcp_proxy::ClusterSpecifier::Cluster("mqtt".into()))
        );
        assert_eq!(p.tunneling_config.unwrap().hostname, "mqtt");
        assert_eq!(p.idle_timeout, Some(pduration(Duration::ZERO)));
    }

    #[test]
    fn unhealthy_endpoints_are_kept_marked() {
        let mut cla = encode_cla(&cluster());
        for loc in &mut cla.endpoints {
            for e in &mut loc.lb_endpoints {
                e.health_status = HealthStatus::Unhealthy as i32;
            }
        }
        let (_, eps) = decode_cla(&to_any(ENDPOINT, &cla)).unwrap();
        assert_eq!(eps.len(), cluster().endpoints.len());
        assert!(eps.iter().all(Endpoint::is_unhealthy), "{eps:?}");
        // Zones survive for them: they count in their zone's capacity.
        assert!(eps.iter().any(|e| e.zone.is_some()), "{eps:?}");
    }

    #[test]
    fn reported_health_is_pushed_and_unhealthy_endpoints_reach_a_sidecar_marked() {
        let mut c = cluster();
        c.endpoints[1].draining = false;
        let at = std::time::SystemTime::UNIX_EPOCH;
        c.endpoints[0].health = Some(meshwire_mesh::ReportedHealth { healthy: false, at });
        c.endpoints[1].health = Some(meshwire_mesh::ReportedHealth { healthy: true, at });
        let cla = encode_cla(&c);
        let status = |addr: SocketAddr| {
            cla.endpoints
                .iter()
                .flat_map(|l| &l.lb_endpoints)
                .find(|e| {
                    matches!(&e.host_identifier, Some(lb_endpoint::HostIdentifier::Endpoint(x))
                        if x.address == Some(socket(addr)))
                })
                .map(|e| e.health_status)
        };
        assert_eq!(
            status(c.endpoints[0].address),
            Some(HealthStatus::Unhealthy as i32)
        );
        assert_eq!(
            status(c.endpoints[1].address),
            Some(HealthStatus::Healthy as i32)
        );
        let (_, eps) = decode_cla(&to_any(ENDPOINT, &cla)).unwrap();
        let unhealthy: Vec<_> = eps
            .iter()
            .filter(|e| e.is_unhealthy())
            .map(|e| e.address)
            .collect();
        assert_eq!(unhealthy, [c.endpoints[0].address], "{eps:?}");
        // Draining wins over a report: its in-flight calls finish.
        c.endpoints[0].draining = true;
        let cla = encode_cla(&c);
        let (_, eps) = decode_cla(&to_any(ENDPOINT, &cla)).unwrap();
        assert!(
            eps.iter()
                .any(|e| e.address == c.endpoints[0].address && e.draining)
        );
    }
}
