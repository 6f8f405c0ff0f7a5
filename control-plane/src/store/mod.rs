//! Where the mesh configuration is kept: a small [`Store`] trait, its
//! default, embedded implementation on `redb` ([`RedbStore`]), the shared one
//! on etcd for several control-plane replicas ([`EtcdStore`]), and an
//! in-memory one for tests ([`MemoryStore`]).
//!
//! The store sees one [`Change`] at a time, already validated against the
//! current state (at version `base`) by the [`crate::registry::Registry`],
//! and writes only what that change touches (one endpoint row, one service
//! row, ...) in one transaction together with the new version. A shared store
//! commits only if its version still is `base` (else [`StoreError::Conflict`]:
//! another replica wrote first) and tells every replica what the others
//! committed ([`Store::follow`]). Records are our own serde types
//! ([`ServiceRecord`], [`EndpointRecord`]) so the on-disk format does not move
//! when the model does.

pub mod etcd;
mod memory;
mod redb;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::BoxFuture;
use meshwire_mesh::{Cluster, Endpoint, LbPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use self::etcd::{EtcdConfig, EtcdKv, EtcdStore, Leadership};
pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;

/// A store of services and endpoints with a version that strictly increases
/// with every commit, also across restarts.
///
/// Within one control plane the registry serializes commits; a store shared
/// by several (etcd) detects the others' commits by comparing versions.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Everything stored and the version of the last commit (0 when empty).
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>>;

    /// Writes one change, validated against the state at version `base`, in
    /// one transaction together with the next version, and returns that
    /// version. When it returns `Ok` the change is durable; on `Err` nothing
    /// of it was written ([`StoreError::Conflict`]: the store is past `base`).
    fn commit<'a>(
        &'a self,
        base: u64,
        change: &'a Change,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// For a store shared by several control planes: from the revision of
    /// the state `load` returned on, everything committed (by anyone, in
    /// order), until `close`. `None` for a store this process alone writes.
    fn follow(&self, _revision: i64) -> Option<mpsc::Receiver<Remote>> {
        None
    }

    /// For a shared store: announces this replica while it runs (a key on a
    /// lease) and campaigns for leadership. Nothing for other stores.
    fn announce(&self, _me: Presence) {}

    /// For a shared store: the live replicas and the leader. `None` for a
    /// store this process alone writes.
    fn replicas(&self) -> BoxFuture<'_, Result<Option<Replicas>, StoreError>> {
        Box::pin(async { Ok(None) })
    }

    /// Where the store is (`redb:<path>`, `etcd:<urls>`), and for a shared
    /// store the revision it has applied; for `meshctl cp status` and logs.
    fn describe(&self) -> String;

    /// Releases the underlying database (file locks, connections); later
    /// calls fail with [`StoreError::Closed`].
    fn close(&self);
}

/// What a replica announces about itself.
#[derive(Debug, Clone)]
pub struct Presence {
    /// Unique per process.
    pub id: String,
    /// Its `--listen` address.
    pub address: String,
    /// Its configuration version.
    pub version: tokio::sync::watch::Receiver<u64>,
}

/// One replica as announced in the shared store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    pub address: String,
    pub revision: i64,
    pub version: u64,
}

/// The replicas of a shared store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replicas {
    /// This replica's id.
    pub me: String,
    /// By id.
    pub replicas: Vec<ReplicaRecord>,
    /// The leader's id, if one is elected.
    pub leader: Option<String>,
}

/// The state of a store as loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    pub version: u64,
    /// Every service with its endpoints (sorted by address).
    pub clusters: Vec<Cluster>,
    /// The etcd revision this state is at (0 for other stores).
    pub revision: i64,
}

/// What a shared store reports from [`Store::follow`].
#[derive(Debug, Clone, PartialEq)]
pub enum Remote {
    /// One commit (by this or another replica): the changes in it, and the
    /// version it made.
    Commit {
        version: u64,
        revision: i64,
        changes: Vec<Change>,
    },
    /// The whole state, when the history since the last commit seen is gone
    /// (etcd compacted it): the registry switches to it in one step.
    Reset(Loaded),
}

/// One committed change. Service changes carry the service's settings only
/// (`endpoints` is ignored); endpoints change one at a time.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    ServiceCreated(Cluster),
    ServiceUpdated(Cluster),
    /// The service and every endpoint it had.
    ServiceDeleted {
        name: String,
        endpoints: Vec<SocketAddr>,
    },
    EndpointAdded {
        service: String,
        endpoint: Endpoint,
    },
    /// Weight, draining state or other fields of an existing endpoint.
    EndpointUpdated {
        service: String,
        endpoint: Endpoint,
    },
    EndpointRemoved {
        service: String,
        address: SocketAddr,
    },
}

impl Change {
    /// The service the change is about.
    pub fn service(&self) -> &str {
        match self {
            Change::ServiceCreated(c) | Change::ServiceUpdated(c) => &c.name,
            Change::ServiceDeleted { name, .. } => name,
            Change::EndpointAdded { service, .. }
            | Change::EndpointUpdated { service, .. }
            | Change::EndpointRemoved { service, .. } => service,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("{0}")]
    Database(String),
    #[error("stored record {key:?} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("the store is closed")]
    Closed,
    /// The shared store moved past the version the change was checked against.
    #[error(
        "another control-plane replica changed the configuration first (version {base} is no longer current)"
    )]
    Conflict { base: u64 },
    /// etcd cannot be reached (or has no quorum); nothing was written.
    #[error("etcd is unavailable ({endpoints}): {reason}")]
    Unavailable { endpoints: String, reason: String },
    /// The write reached etcd but was not confirmed (etcd lost quorum or
    /// the connection mid-call): it may still be applied when etcd recovers.
    #[error(
        "etcd did not confirm the write ({endpoints}): {reason}; it may still be applied once etcd recovers, check before retrying"
    )]
    Unconfirmed { endpoints: String, reason: String },
    /// A leader-only write from a replica that no longer holds the leader
    /// key (its lease ran out, another replica leads): etcd refused it.
    #[error("this replica is no longer the leader (its etcd lease ran out); the write was refused")]
    NotLeader,
}

// === records ===

/// A service's settings as stored (its endpoints are rows of their own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    pub lb: LbRecord,
    pub connect_timeout: Duration,
    #[serde(default)]
    pub request_timeout: Option<Duration>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub permissive: bool,
    #[serde(default)]
    pub policy: Option<meshwire_mesh::policy::Policy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_policy: Vec<meshwire_mesh::HashSource>,
    /// `grpc`, `http` or `tcp`; records written before protocols are gRPC.
    #[serde(default, with = "protocol_name")]
    pub protocol: meshwire_mesh::Protocol,
    /// Only what is set (records written before are all defaults).
    #[serde(default, skip_serializing_if = "meshwire_mesh::Resilience::is_unset")]
    pub resilience: meshwire_mesh::Resilience,
    /// The inbound rate limit (records written before have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<meshwire_mesh::RateLimit>,
    /// Zone-aware routing; absent (records written before, or the defaults):
    /// on with the default threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones: Option<ZonesRecord>,
}

/// Zone-aware routing as stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ZonesRecord {
    pub enabled: bool,
    pub min_healthy: f64,
}

/// The protocol as its name, so stored records stay readable.
mod protocol_name {
    use meshwire_mesh::Protocol;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "snake_case")]
pub enum LbRecord {
    LeastRequest {
        active_request_bias: f64,
    },
    RoundRobin,
    RingHash {
        #[serde(default)]
        balance_factor: Option<f64>,
    },
    Maglev {
        #[serde(default)]
        balance_factor: Option<f64>,
    },
}

/// One endpoint as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub address: SocketAddr,
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// What its sidecar reported (`Identity.ReportHealth`); absent: nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthRecord>,
}

/// A reported health as stored: it goes through the store like any other
/// endpoint change, so every replica publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthRecord {
    pub healthy: bool,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl From<meshwire_mesh::ReportedHealth> for HealthRecord {
    fn from(h: meshwire_mesh::ReportedHealth) -> Self {
        let ms =
            h.at.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            healthy: h.healthy,
            at_ms: ms,
        }
    }
}

impl From<HealthRecord> for meshwire_mesh::ReportedHealth {
    fn from(r: HealthRecord) -> Self {
        Self {
            healthy: r.healthy,
            at: std::time::UNIX_EPOCH + Duration::from_millis(r.at_ms),
        }
    }
}

impl From<&Cluster> for ServiceRecord {
    fn from(c: &Cluster) -> Self {
        Self {
            name: c.name.clone(),
            lb: match c.lb {
                LbPolicy::LeastRequest {
                    active_request_bias,
                } => LbRecord::LeastRequest {
                    active_request_bias,
                },
                LbPolicy::RoundRobin => LbRecord::RoundRobin,
                LbPolicy::RingHash(h) => LbRecord::RingHash {
                    balance_factor: h.balance_factor,
                },
                LbPolicy::Maglev(h) => LbRecord::Maglev {
                    balance_factor: h.balance_factor,
                },
            },
            connect_timeout: c.connect_timeout,
            request_timeout: c.request_timeout,
            authority: c.authority.clone(),
            permissive: c.permissive,
            policy: c.policy.clone(),
            protocol: c.protocol,
            hash_policy: c.hash_policy.clone(),
            resilience: (*c.resilience).clone(),
            rate_limit: c.rate_limit.clone(),
            zones: (c.zones != meshwire_mesh::ZoneRouting::default()).then_some(ZonesRecord {
                enabled: c.zones.enabled,
                min_healthy: c.zones.min_healthy,
            }),
        }
    }
}

impl ServiceRecord {
    /// The cluster these settings describe, without endpoints.
    pub fn into_cluster(self) -> Cluster {
        let mut c = Cluster::new(self.name);
        c.lb = match self.lb {
            LbRecord::LeastRequest {
                active_request_bias,
            } => LbPolicy::LeastRequest {
                active_request_bias,
            },
            LbRecord::RoundRobin => LbPolicy::RoundRobin,
            LbRecord::RingHash { balance_factor } => {
                LbPolicy::RingHash(meshwire_mesh::HashLb { balance_factor })
            }
            LbRecord::Maglev { balance_factor } => {
                LbPolicy::Maglev(meshwire_mesh::HashLb { balance_factor })
            }
        };
        c.hash_policy = self.hash_policy;
        c.connect_timeout = self.connect_timeout;
        c.request_timeout = self.request_timeout;
        c.authority = self.authority;
        c.permissive = self.permissive;
        c.policy = self.policy;
        c.protocol = self.protocol;
        c.resilience = Box::new(self.resilience);
        c.rate_limit = self.rate_limit;
        if let Some(z) = self.zones {
            c.zones = meshwire_mesh::ZoneRouting {
                enabled: z.enabled,
                min_healthy: z.min_healthy,
            };
        }
        c
    }
}

impl From<&Endpoint> for EndpointRecord {
    fn from(e: &Endpoint) -> Self {
        Self {
            address: e.address,
            weight: e.weight,
            zone: e.zone.clone(),
            draining: e.draining,
            identity: e.identity.clone(),
            metadata: e.metadata.clone(),
            health: e.health.map(HealthRecord::from),
        }
    }
}

impl From<EndpointRecord> for Endpoint {
    fn from(r: EndpointRecord) -> Self {
        Self {
            address: r.address,
            weight: r.weight,
            zone: r.zone,
            draining: r.draining,
            identity: r.identity,
            metadata: r.metadata,
            health: r.health.map(meshwire_mesh::ReportedHealth::from),
        }
    }
}

/// Assembles loaded rows into validated clusters (endpoints sorted by
/// address); a row that no longer validates is reported as corrupt rather
/// than served.
fn assemble(
    services: Vec<ServiceRecord>,
    mut endpoints: BTreeMap<String, Vec<EndpointRecord>>,
) -> Result<Vec<Cluster>, StoreError> {
    let mut clusters = Vec::with_capacity(services.len());
    for s in services {
        let mut c = s.into_cluster();
        let mut eps: Vec<Endpoint> = endpoints
            .remove(&c.name)
            .unwrap_or_default()
            .into_iter()
            .map(Endpoint::from)
            .collect();
        eps.sort_by_key(|e| e.address);
        c.endpoints = eps;
        c.validate().map_err(|e| StoreError::Corrupt {
            key: c.name.clone(),
            reason: e.to_string(),
        })?;
        clusters.push(c);
    }
    for (service, eps) in endpoints {
        // Cannot happen through the registry (a delete removes both in one
        // transaction); kept out of the snapshot rather than failing start-up.
        tracing::warn!(%service, endpoints = eps.len(), "endpoints of an unknown service ignored");
    }
    Ok(clusters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_the_model() {
        let mut c = Cluster::new("greeter");
        c.lb = LbPolicy::RoundRobin;
        c.request_timeout = Some(Duration::from_millis(1500));
        c.authority = Some("greeter.internal:80".into());
        let back = ServiceRecord::from(&c).into_cluster();
        assert_eq!(back, c);

        let mut e = Endpoint::new("10.0.0.1:80".parse().unwrap()).with_weight(7);
        e.zone = Some("a".into());
        e.identity = Some("spiffe://mesh/greeter".into());
        e.metadata.insert("k".into(), "v".into());
        e.draining = true;
        let json = serde_json::to_vec(&EndpointRecord::from(&e)).unwrap();
        assert!(
            !String::from_utf8_lossy(&json).contains("health"),
            "no report, no field"
        );
        let back: EndpointRecord = serde_json::from_slice(&json).unwrap();
        assert_eq!(Endpoint::from(back), e);
        e.health = Some(meshwire_mesh::ReportedHealth {
            healthy: false,
            at: std::time::UNIX_EPOCH + Duration::from_millis(1_765_000_000_123),
        });
        let json = serde_json::to_vec(&EndpointRecord::from(&e)).unwrap();
        let back: EndpointRecord = serde_json::from_slice(&json).unwrap();
        assert_eq!(Endpoint::from(back), e);
    }
}
