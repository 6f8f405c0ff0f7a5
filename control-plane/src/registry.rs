//! The mesh configuration as the control plane holds it: every service with
//! its endpoints in memory, backed by a [`Store`].
//!
//! Every mutation is one step under a writer lock: read the current state,
//! validate the change against it, commit it to the store (durable when the
//! store returns), then apply it to memory and announce it. A failed
//! validation or commit leaves store and memory untouched. The step runs in
//! its own task, so a caller that goes away mid-commit cannot leave the store
//! and memory apart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use meshwire_mesh::model::{DEFAULT_ACTIVE_REQUEST_BIAS, MAX_ENDPOINTS, validate_service_name};
use meshwire_mesh::{Cluster, Endpoint, LbPolicy, ModelError, ReportedHealth};
use meshwire_xds::Snapshot;
use tokio::sync::{broadcast, watch};

use crate::store::{Change, Remote, Store, StoreError};

/// How many events a slow watcher may fall behind before it is cut off.
const EVENT_BACKLOG: usize = 4096;

/// How long a change keeps being re-checked after losing races with other
/// replicas. Each lost race means another write committed, so the system
/// progresses; a count would fail writes in a burst through several replicas
/// (each replica's writes go one at a time, so one can lose to all of
/// another's queue).
const CONFLICT_BUDGET: Duration = Duration::from_secs(10);
/// How long we wait for the other replica's commit to reach us.
const CONFLICT_CATCH_UP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("service {0:?} not found")]
    ServiceNotFound(String),
    #[error("service {0:?} already exists")]
    ServiceExists(String),
    #[error("endpoint {address} not found in service {service:?}")]
    EndpointNotFound {
        service: String,
        address: SocketAddr,
    },
    #[error("endpoint {address} already exists in service {service:?}")]
    EndpointExists {
        service: String,
        address: SocketAddr,
    },
    #[error(
        "service {service:?} has {max} endpoints, the most a sidecar accepts; remove one first"
    )]
    TooManyEndpoints { service: String, max: usize },
    /// The field path is relative to the service or endpoint being changed.
    #[error("{0}")]
    Invalid(#[from] ModelError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// One committed change, as announced to watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub version: u64,
    pub change: Change,
}

/// A service's settings and how many endpoints it has.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInfo {
    /// The service without its endpoints.
    pub settings: Cluster,
    pub endpoints: usize,
}

/// The load-balancing policy alone (its bias is a field of its own in a patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbKind {
    LeastRequest,
    RoundRobin,
    RingHash,
    Maglev,
}

/// Changes to a service's settings; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePatch {
    pub lb_policy: Option<LbKind>,
    /// `Some(None)` resets the bias to its default.
    pub active_request_bias: Option<Option<f64>>,
    pub connect_timeout: Option<Duration>,
    pub request_timeout: Option<Option<Duration>>,
    pub authority: Option<Option<String>>,
    pub permissive: Option<bool>,
    pub protocol: Option<meshwire_mesh::Protocol>,
    /// `Some(None)` removes the policy (every mesh identity may call).
    pub policy: Option<Option<meshwire_mesh::policy::Policy>>,
    pub hash_policy: Option<Vec<meshwire_mesh::HashSource>>,
    /// `Some(None)` turns bounded loads off.
    pub hash_balance_factor: Option<Option<f64>>,
    /// Resilience settings named by path (`retry.max_attempts`), with their
    /// new values (unset: back to the default).
    pub resilience: Option<(meshwire_mesh::Resilience, Vec<String>)>,
    /// `Some(None)` removes the inbound rate limit.
    pub rate_limit: Option<Option<meshwire_mesh::RateLimit>>,
    pub zone_aware: Option<bool>,
    /// `Some(None)` resets the threshold to its default.
    pub zone_min_healthy: Option<Option<f64>>,
}

impl ServicePatch {
    /// Applies the patch to `c`'s settings (not validated here).
    pub fn apply(&self, c: &mut Cluster) -> Result<(), ModelError> {
        let current_bias = match c.lb {
            LbPolicy::LeastRequest {
                active_request_bias,
            } => Some(active_request_bias),
            _ => None,
        };
        let kind = self.lb_policy.unwrap_or(match c.lb {
            LbPolicy::LeastRequest { .. } => LbKind::LeastRequest,
            LbPolicy::RoundRobin => LbKind::RoundRobin,
            LbPolicy::RingHash(_) => LbKind::RingHash,
            LbPolicy::Maglev(_) => LbKind::Maglev,
        });
        let hash = meshwire_mesh::HashLb {
            balance_factor: match self.hash_balance_factor {
                Some(f) => f,
                None => c.lb.hash().and_then(|h| h.balance_factor),
            },
        };
        if !matches!(kind, LbKind::RingHash | LbKind::Maglev)
            && matches!(self.hash_balance_factor, Some(Some(_)))
        {
            return Err(ModelError::new(
                "hash_balance_factor",
                "only applies to ring-hash or maglev load balancing",
            ));
        }
        if let Some(h) = &self.hash_policy {
            c.hash_policy = h.clone();
        }
        c.lb = match kind {
            LbKind::RingHash | LbKind::Maglev => {
                if let Some(Some(_)) = self.active_request_bias {
                    return Err(ModelError::new(
                        "active_request_bias",
                        "only applies to least-request load balancing",
                    ));
                }
                if kind == LbKind::RingHash {
                    LbPolicy::RingHash(hash)
                } else {
                    LbPolicy::Maglev(hash)
                }
            }
            LbKind::RoundRobin => {
                if let Some(Some(_)) = self.active_request_bias {
                    return Err(ModelError::new(
                        "active_request_bias",
                        "only applies to least-request load balancing",
                    ));
                }
                LbPolicy::RoundRobin
            }
            LbKind::LeastRequest => LbPolicy::LeastRequest {
                active_request_bias: match self.active_request_bias {
                    Some(b) => b.unwrap_or(DEFAULT_ACTIVE_REQUEST_BIAS),
                    None => current_bias.unwrap_or(DEFAULT_ACTIVE_REQUEST_BIAS),
                },
            },
        };
        if let Some(t) = self.connect_timeout {
            c.connect_timeout = t;
        }
        if let Some(t) = self.request_timeout {
            c.request_timeout = t;
        }
        if let Some(a) = &self.authority {
            c.authority = a.clone();
        }
        if let Some(p) = self.permissive {
            c.permissive = p;
        }
        if let Some(p) = self.protocol {
            c.protocol = p;
        }
        if let Some(p) = &self.policy {
            c.policy = p.clone();
        }
        if let Some(l) = &self.rate_limit {
            c.rate_limit = l.clone();
        }
        if let Some(on) = self.zone_aware {
            c.zones.enabled = on;
        }
        if let Some(f) = self.zone_min_healthy {
            c.zones.min_healthy = f.unwrap_or(meshwire_mesh::ZoneRouting::DEFAULT_MIN_HEALTHY);
        }
        if let Some((from, paths)) = &self.resilience {
            for p in paths {
                if !c.resilience.copy_field(p, from) {
                    return Err(ModelError::new(p.clone(), "not a resilience setting"));
                }
            }
        }
        Ok(())
    }
}

/// Changes to one endpoint; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointPatch {
    pub weight: Option<u32>,
    pub draining: Option<bool>,
}

/// A service's settings: the cluster without its endpoints.
pub fn settings(c: &Cluster) -> Cluster {
    Cluster {
        name: c.name.clone(),
        protocol: c.protocol,
        lb: c.lb,
        connect_timeout: c.connect_timeout,
        request_timeout: c.request_timeout,
        authority: c.authority.clone(),
        endpoints: Vec::new(),
        policy: c.policy.clone(),
        permissive: c.permissive,
        hash_policy: c.hash_policy.clone(),
        resilience: c.resilience.clone(),
        rate_limit: c.rate_limit.clone(),
        zones: c.zones,
    }
}

// === State ===

/// What is committed, in memory. Endpoints are kept sorted by address.
#[derive(Debug, Default)]
pub struct State {
    pub version: u64,
    pub clusters: BTreeMap<String, Cluster>,
}

impl State {
    fn cluster(&self, name: &str) -> Result<&Cluster, RegistryError> {
        self.clusters
            .get(name)
            .ok_or_else(|| RegistryError::ServiceNotFound(name.to_owned()))
    }

    fn endpoint(&self, service: &str, address: SocketAddr) -> Result<&Endpoint, RegistryError> {
        let c = self.cluster(service)?;
        find(c, address)
            .map(|i| &c.endpoints[i])
            .map_err(|_| RegistryError::EndpointNotFound {
                service: service.to_owned(),
                address,
            })
    }

    fn apply(&mut self, change: &Change) {
        match change {
            Change::ServiceCreated(c) => {
                self.clusters.insert(c.name.clone(), settings(c));
            }
            Change::ServiceUpdated(c) => {
                if let Some(old) = self.clusters.get_mut(&c.name) {
                    let endpoints = std::mem::take(&mut old.endpoints);
                    *old = settings(c);
                    old.endpoints = endpoints;
                }
            }
            Change::ServiceDeleted { name, .. } => {
                self.clusters.remove(name);
            }
            Change::EndpointAdded { service, endpoint }
            | Change::EndpointUpdated { service, endpoint } => {
                if let Some(c) = self.clusters.get_mut(service) {
                    match find(c, endpoint.address) {
                        Ok(i) => c.endpoints[i] = endpoint.clone(),
                        Err(i) => c.endpoints.insert(i, endpoint.clone()),
                    }
                }
            }
            Change::EndpointRemoved { service, address } => {
                if let Some(c) = self.clusters.get_mut(service)
                    && let Ok(i) = find(c, *address)
                {
                    c.endpoints.remove(i);
                }
            }
        }
    }
}

fn find(c: &Cluster, address: SocketAddr) -> Result<usize, usize> {
    c.endpoints.binary_search_by_key(&address, |e| e.address)
}

/// What a mutation decided, given the current state.
// One short-lived value per API call: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Plan<R> {
    /// Nothing to write (the state already is what was asked).
    Unchanged(R),
    Commit(Change, R),
}

// === Registry ===

pub struct Registry {
    store: Arc<dyn Store>,
    /// Serializes mutations from reading the state to applying the commit.
    writer: tokio::sync::Mutex<()>,
    /// Only ever held for a few instructions (never across an `.await`).
    state: Mutex<State>,
    versions: watch::Sender<u64>,
    events: broadcast::Sender<Arc<Event>>,
    revision: AtomicI64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.store)
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Loads the store's current state.
    pub async fn load(store: Arc<dyn Store>) -> Result<Arc<Self>, StoreError> {
        let loaded = store.load().await?;
        let mut clusters = BTreeMap::new();
        for mut c in loaded.clusters {
            c.endpoints.sort_by_key(|e| e.address);
            clusters.insert(c.name.clone(), c);
        }
        tracing::info!(
            version = loaded.version,
            services = clusters.len(),
            endpoints = clusters.values().map(|c| c.endpoints.len()).sum::<usize>(),
            "configuration loaded"
        );
        let follow = store.follow(loaded.revision);
        let reg = Arc::new(Self {
            store,
            writer: tokio::sync::Mutex::new(()),
            versions: watch::channel(loaded.version).0,
            state: Mutex::new(State {
                version: loaded.version,
                clusters,
            }),
            events: broadcast::channel(EVENT_BACKLOG).0,
            revision: AtomicI64::new(loaded.revision),
        });
        if let Some(mut rx) = follow {
            // Ends when the store closes (its sender goes away); holds only
            // a weak reference so the registry can be dropped.
            let weak = Arc::downgrade(&reg);
            tokio::spawn(async move {
                while let Some(remote) = rx.recv().await {
                    let Some(reg) = weak.upgrade() else { break };
                    reg.apply_remote(remote);
                }
            });
        }
        Ok(reg)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store's current version.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// Everything, at the current version.
    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        Snapshot {
            version: st.version,
            clusters: st.clusters.clone(),
        }
    }

    /// Notified with the version after every commit.
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.versions.subscribe()
    }

    /// The current version and every event after it.
    pub fn subscribe(&self) -> (u64, broadcast::Receiver<Arc<Event>>) {
        // Under the state lock, which commits hold while announcing: no event
        // is both before `version` and in the receiver, or in neither.
        let st = self.lock();
        (st.version, self.events.subscribe())
    }

    pub fn service(&self, name: &str) -> Result<(u64, Cluster), RegistryError> {
        let st = self.lock();
        Ok((st.version, st.cluster(name)?.clone()))
    }

    pub fn services(&self) -> (u64, Vec<ServiceInfo>) {
        let st = self.lock();
        let infos = st
            .clusters
            .values()
            .map(|c| ServiceInfo {
                settings: settings(c),
                endpoints: c.endpoints.len(),
            })
            .collect();
        (st.version, infos)
    }

    /// One endpoint, at the current version.
    pub fn endpoint(
        &self,
        service: &str,
        address: SocketAddr,
    ) -> Result<(u64, Endpoint), RegistryError> {
        let st = self.lock();
        Ok((st.version, st.endpoint(service, address)?.clone()))
    }

    /// Endpoints whose sidecar reports them unhealthy.
    pub fn unhealthy_count(&self) -> usize {
        let st = self.lock();
        st.clusters
            .values()
            .flat_map(|c| &c.endpoints)
            .filter(|e| e.is_unhealthy())
            .count()
    }

    pub fn endpoints(&self, service: &str) -> Result<(u64, Vec<Endpoint>), RegistryError> {
        let st = self.lock();
        Ok((st.version, st.cluster(service)?.endpoints.clone()))
    }

    /// Stops writes and releases the store.
    pub fn close(&self) {
        self.store.close();
    }

    // === mutations ===

    /// Creates a service (its endpoints, if any, are ignored: they are added
    /// one by one).
    pub async fn create_service(
        self: &Arc<Self>,
        service: Cluster,
    ) -> Result<(u64, ServiceInfo), RegistryError> {
        let service = settings(&service);
        service.validate()?;
        self.mutate(move |st| {
            if st.clusters.contains_key(&service.name) {
                return Err(RegistryError::ServiceExists(service.name.clone()));
            }
            let info = ServiceInfo {
                settings: service.clone(),
                endpoints: 0,
            };
            Ok(Plan::Commit(Change::ServiceCreated(service.clone()), info))
        })
        .await
    }

    pub async fn update_service(
        self: &Arc<Self>,
        name: &str,
        patch: ServicePatch,
    ) -> Result<(u64, ServiceInfo), RegistryError> {
        let name = name.to_owned();
        self.mutate(move |st| {
            let current = st.cluster(&name)?;
            let mut next = settings(current);
            patch.apply(&mut next)?;
            next.validate()?;
            let info = ServiceInfo {
                settings: next.clone(),
                endpoints: current.endpoints.len(),
            };
            if next == settings(current) {
                return Ok(Plan::Unchanged(info));
            }
            Ok(Plan::Commit(Change::ServiceUpdated(next), info))
        })
        .await
    }

    /// Deletes a service and its endpoints; returns how many endpoints it had.
    pub async fn delete_service(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<(u64, usize), RegistryError> {
        let name = name.to_owned();
        self.mutate(move |st| {
            let endpoints: Vec<SocketAddr> = st
                .cluster(&name)?
                .endpoints
                .iter()
                .map(|e| e.address)
                .collect();
            let n = endpoints.len();
            let name = name.clone();
            Ok(Plan::Commit(Change::ServiceDeleted { name, endpoints }, n))
        })
        .await
    }

    pub async fn add_endpoint(
        self: &Arc<Self>,
        service: &str,
        endpoint: Endpoint,
    ) -> Result<(u64, Endpoint), RegistryError> {
        endpoint.validate()?;
        let service = service.to_owned();
        self.mutate(move |st| {
            let c = st.cluster(&service)?;
            if find(c, endpoint.address).is_ok() {
                return Err(RegistryError::EndpointExists {
                    service: service.clone(),
                    address: endpoint.address,
                });
            }
            // Never commit a service the sidecars would refuse.
            if c.endpoints.len() >= MAX_ENDPOINTS {
                return Err(RegistryError::TooManyEndpoints {
                    service: service.clone(),
                    max: MAX_ENDPOINTS,
                });
            }
            let change = Change::EndpointAdded {
                service: service.clone(),
                endpoint: endpoint.clone(),
            };
            Ok(Plan::Commit(change, endpoint.clone()))
        })
        .await
    }

    pub async fn update_endpoint(
        self: &Arc<Self>,
        service: &str,
        address: SocketAddr,
        patch: EndpointPatch,
    ) -> Result<(u64, Endpoint), RegistryError> {
        let service = service.to_owned();
        self.mutate(move |st| {
            let current = st.endpoint(&service, address)?;
            let mut next = current.clone();
            if let Some(w) = patch.weight {
                next.weight = w;
            }
            if let Some(d) = patch.draining {
                next.draining = d;
            }
            next.validate()?;
            if next == *current {
                return Ok(Plan::Unchanged(next));
            }
            let ep = next.clone();
            Ok(Plan::Commit(
                Change::EndpointUpdated {
                    service: service.clone(),
                    endpoint: next,
                },
                ep,
            ))
        })
        .await
    }

    /// Sets an endpoint's reported health to what `decide` returns for the
    /// current one (`None`: leave it), decided under the writer lock, so a
    /// decision made on a read is re-checked against what is committed.
    /// Returns the version and the health before and after.
    pub async fn set_health<F>(
        self: &Arc<Self>,
        service: &str,
        address: SocketAddr,
        decide: F,
    ) -> Result<(u64, Option<ReportedHealth>, Option<ReportedHealth>), RegistryError>
    where
        F: Fn(Option<ReportedHealth>) -> Option<Option<ReportedHealth>> + Send + Sync + 'static,
    {
        let service = service.to_owned();
        self.mutate(move |st| {
            let current = st.endpoint(&service, address)?;
            let before = current.health;
            let after = match decide(before) {
                Some(h) if h != before => h,
                _ => return Ok(Plan::Unchanged((before, before))),
            };
            let mut next = current.clone();
            next.health = after;
            Ok(Plan::Commit(
                Change::EndpointUpdated {
                    service: service.clone(),
                    endpoint: next,
                },
                (before, after),
            ))
        })
        .await
        .map(|(v, (before, after))| (v, before, after))
    }

    pub async fn remove_endpoint(
        self: &Arc<Self>,
        service: &str,
        address: SocketAddr,
    ) -> Result<u64, RegistryError> {
        let service = service.to_owned();
        self.mutate(move |st| {
            st.endpoint(&service, address)?;
            let service = service.clone();
            Ok(Plan::Commit(
                Change::EndpointRemoved { service, address },
                (),
            ))
        })
        .await
        .map(|(v, ())| v)
    }

    /// Runs one mutation to its end in a task of its own (see the module
    /// docs). On a shared store another replica may commit between our check
    /// and our commit: then we wait until its change has reached us and
    /// check again against the new state.
    async fn mutate<R, F>(self: &Arc<Self>, plan: F) -> Result<(u64, R), RegistryError>
    where
        R: Send + 'static,
        F: Fn(&State) -> Result<Plan<R>, RegistryError> + Send + Sync + 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut attempt = 0u32;
            let start = tokio::time::Instant::now();
            loop {
                match this.mutate_now(&plan).await {
                    Err(RegistryError::Store(StoreError::Conflict { base }))
                        if start.elapsed() < CONFLICT_BUDGET =>
                    {
                        attempt += 1;
                        tracing::debug!(
                            base,
                            attempt,
                            "another replica committed first; re-checking"
                        );
                        let mut versions = this.versions();
                        // The watch brings the other commit within
                        // milliseconds; if it does not, answer with the conflict.
                        let caught_up = tokio::time::timeout(
                            CONFLICT_CATCH_UP,
                            versions.wait_for(|v| *v > base),
                        )
                        .await;
                        if !matches!(caught_up, Ok(Ok(_))) {
                            return Err(StoreError::Conflict { base }.into());
                        }
                    }
                    r => return r,
                }
            }
        })
        .await
        .map_err(|e| StoreError::Database(format!("mutation task failed: {e}")))?
    }

    async fn mutate_now<R, F>(&self, plan: &F) -> Result<(u64, R), RegistryError>
    where
        F: Fn(&State) -> Result<Plan<R>, RegistryError>,
    {
        let _writer = self.writer.lock().await;
        let (base, planned) = {
            let st = self.lock();
            (st.version, plan(&st)?)
        };
        let (change, result) = match planned {
            Plan::Unchanged(r) => return Ok((base, r)),
            Plan::Commit(change, r) => (change, r),
        };
        let version = self.store.commit(base, &change).await.inspect_err(|e| {
            if !matches!(e, StoreError::Conflict { .. }) {
                tracing::error!(service = change.service(), error = %e, "commit failed; nothing changed");
            }
        })?;
        {
            let mut st = self.lock();
            // On a shared store the watch may have applied our own commit
            // already; it is the same change at the same version.
            if version > st.version {
                st.apply(&change);
                st.version = version;
                tracing::debug!(version, service = change.service(), "committed");
                // A send error only means nobody is watching.
                let _ = self.events.send(Arc::new(Event { version, change }));
            }
        }
        self.versions.send_if_modified(|v| {
            let newer = version > *v;
            if newer {
                *v = version;
            }
            newer
        });
        Ok((version, result))
    }

    /// Applies what a shared store reports: one commit (ours, already
    /// applied, or another replica's), or a whole new state after etcd
    /// compacted the history we missed — swapped in at once, announced as
    /// the differences, so no endpoint is ever missing in between.
    pub fn apply_remote(&self, remote: Remote) {
        let version = {
            let mut st = self.lock();
            match remote {
                Remote::Commit {
                    version,
                    revision,
                    changes,
                } => {
                    self.revision.store(revision, Ordering::Relaxed);
                    if version <= st.version {
                        return;
                    }
                    for change in changes {
                        st.apply(&change);
                        let _ = self.events.send(Arc::new(Event { version, change }));
                    }
                    st.version = version;
                    tracing::debug!(version, revision, "applied a commit from the store");
                    version
                }
                Remote::Reset(loaded) => {
                    self.revision.store(loaded.revision, Ordering::Relaxed);
                    let next: BTreeMap<String, Cluster> = loaded
                        .clusters
                        .into_iter()
                        .map(|mut c| {
                            c.endpoints.sort_by_key(|e| e.address);
                            (c.name.clone(), c)
                        })
                        .collect();
                    let changes = diff(&st.clusters, &next);
                    tracing::info!(
                        version = loaded.version,
                        revision = loaded.revision,
                        changes = changes.len(),
                        "state re-listed from the store"
                    );
                    st.clusters = next;
                    st.version = st.version.max(loaded.version);
                    for change in changes {
                        let _ = self.events.send(Arc::new(Event {
                            version: st.version,
                            change,
                        }));
                    }
                    st.version
                }
            }
        };
        self.versions.send_if_modified(|v| {
            let newer = version > *v;
            if newer {
                *v = version;
            }
            newer
        });
    }

    /// The store's revision last applied (etcd; 0 otherwise).
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    /// Where the state is kept (`redb:<path>`, `etcd:<urls>`).
    pub fn store_description(&self) -> String {
        self.store.describe()
    }

    /// On a shared store: announces this replica, listening on `address`
    /// (see [`Store::announce`]).
    pub fn announce(&self, address: SocketAddr) {
        self.store.announce(crate::store::Presence {
            id: format!("{:08x}", fastrand::u32(..)),
            address: address.to_string(),
            version: self.versions(),
        });
    }

    /// The replicas sharing the store, `None` on a store of our own.
    pub async fn replicas(&self) -> Result<Option<crate::store::Replicas>, StoreError> {
        self.store.replicas().await
    }
}

/// The changes that turn `old` into `new`, service by service.
fn diff(old: &BTreeMap<String, Cluster>, new: &BTreeMap<String, Cluster>) -> Vec<Change> {
    let mut out = Vec::new();
    for (name, o) in old {
        if !new.contains_key(name) {
            out.push(Change::ServiceDeleted {
                name: name.clone(),
                endpoints: o.endpoints.iter().map(|e| e.address).collect(),
            });
        }
    }
    for (name, n) in new {
        let Some(o) = old.get(name) else {
            out.push(Change::ServiceCreated(settings(n)));
            out.extend(n.endpoints.iter().map(|e| Change::EndpointAdded {
                service: name.clone(),
                endpoint: e.clone(),
            }));
            continue;
        };
        if settings(o) != settings(n) {
            out.push(Change::ServiceUpdated(settings(n)));
        }
        for e in &o.endpoints {
            if find(n, e.address).is_err() {
                out.push(Change::EndpointRemoved {
                    service: name.clone(),
                    address: e.address,
                });
            }
        }
        for e in &n.endpoints {
            match find(o, e.address) {
                Ok(i) if o.endpoints[i] == *e => {}
                Ok(_) => out.push(Change::EndpointUpdated {
                    service: name.clone(),
                    endpoint: e.clone(),
                }),
                Err(_) => out.push(Change::EndpointAdded {
                    service: name.clone(),
                    endpoint: e.clone(),
                }),
            }
        }
    }
    out
}

/// Checks a service name given in a request (`field` names it).
pub fn check_service_name(field: &str, name: &str) -> Result<(), ModelError> {
    validate_service_name(name).map_err(|e| e.within(field))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    async fn registry() -> (Arc<MemoryStore>, Arc<Registry>) {
        let store = Arc::new(MemoryStore::default());
        let reg = Registry::load(store.clone()).await.unwrap();
        (store, reg)
    }

    #[tokio::test]
    async fn mutations_commit_apply_and_announce_in_order() {
        let (store, reg) = registry().await;
        let (v0, mut events) = reg.subscribe();
        assert_eq!(v0, 0);
        let (v1, info) = reg.create_service(Cluster::new("greeter")).await.unwrap();
        assert_eq!((v1, info.endpoints), (1, 0));
        let (v2, _) = reg
            .add_endpoint("greeter", Endpoint::new(addr(2)))
            .await
            .unwrap();
        let (v3, _) = reg
            .add_endpoint("greeter", Endpoint::new(addr(1)))
            .await
            .unwrap();
        let (v4, ep) = reg
            .update_endpoint(
                "greeter",
                addr(2),
                EndpointPatch {
                    weight: Some(5),
                    draining: Some(true),
                },
            )
            .await
            .unwrap();
        assert_eq!((v2, v3, v4), (2, 3, 4));
        assert!(ep.draining && ep.weight == 5);

        // Memory, store and events agree.
        let (_, c) = reg.service("greeter").unwrap();
        let addrs: Vec<_> = c.endpoints.iter().map(|e| e.address).collect();
        assert_eq!(addrs, vec![addr(1), addr(2)], "sorted by address");
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.version, 4);
        assert_eq!(loaded.clusters, vec![c.clone()]);
        assert_eq!(reg.snapshot(), Snapshot::new(4, [c]));
        for want in 1..=4 {
            assert_eq!(events.recv().await.unwrap().version, want);
        }
    }

    #[tokio::test]
    async fn a_service_never_gets_more_endpoints_than_a_sidecar_accepts() {
        let (store, reg) = registry().await;
        reg.create_service(Cluster::new("big")).await.unwrap();
        for i in 0..MAX_ENDPOINTS {
            let a = SocketAddr::from(([10, 1, (i / 250) as u8, (i % 250) as u8 + 1], 80));
            reg.add_endpoint("big", Endpoint::new(a)).await.unwrap();
        }
        let version = reg.version();
        let e = reg
            .add_endpoint("big", Endpoint::new(addr(1)))
            .await
            .unwrap_err();
        assert!(
            matches!(e, RegistryError::TooManyEndpoints { max, .. } if max == MAX_ENDPOINTS),
            "{e}"
        );
        assert_eq!(reg.version(), version, "nothing committed");
        assert_eq!(store.load().await.unwrap().version, version);
        // What was committed passes the sidecar-side check.
        let snap = reg.snapshot();
        snap.clusters["big"].validate().unwrap();
    }

    #[tokio::test]
    async fn no_op_changes_commit_nothing() {
        let (_, reg) = registry().await;
        reg.create_service(Cluster::new("s")).await.unwrap();
        reg.add_endpoint("s", Endpoint::new(addr(1))).await.unwrap();
        let (v, _) = reg
            .update_endpoint(
                "s",
                addr(1),
                EndpointPatch {
                    weight: Some(1),
                    draining: Some(false),
                },
            )
            .await
            .unwrap();
        assert_eq!(v, 2);
        let (v, _) = reg
            .update_service(
                "s",
                ServicePatch {
                    connect_timeout: Some(Cluster::DEFAULT_CONNECT_TIMEOUT),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(v, 2);
    }

    #[tokio::test]
    async fn a_failed_change_changes_nothing() {
        let (store, reg) = registry().await;
        reg.create_service(Cluster::new("s")).await.unwrap();
        reg.add_endpoint("s", Endpoint::new(addr(1))).await.unwrap();
        let before = reg.snapshot();

        // Rejected by validation against the current state.
        let e = reg
            .add_endpoint("s", Endpoint::new(addr(1)))
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::EndpointExists { .. }), "{e}");
        let e = reg
            .update_endpoint(
                "s",
                addr(1),
                EndpointPatch {
                    weight: Some(0),
                    draining: None,
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("weight:"), "{e}");
        let e = reg
            .update_service(
                "s",
                ServicePatch {
                    lb_policy: Some(LbKind::RoundRobin),
                    active_request_bias: Some(Some(1.0)),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("active_request_bias:"), "{e}");
        let e = reg.delete_service("nope").await.unwrap_err();
        assert!(matches!(e, RegistryError::ServiceNotFound(_)), "{e}");

        // Rejected by the store: memory stays as the store is.
        store.fail_next_commit();
        let e = reg.delete_service("s").await.unwrap_err();
        assert!(matches!(e, RegistryError::Store(_)), "{e}");

        assert_eq!(reg.snapshot(), before);
        assert_eq!(store.load().await.unwrap().version, before.version);
        // And the next change gets the next version.
        assert_eq!(reg.delete_service("s").await.unwrap(), (3, 1));
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_does_not_split_store_and_memory() {
        let (store, reg) = registry().await;
        reg.create_service(Cluster::new("s")).await.unwrap();
        // Dropped at its first poll: the spawned mutation still completes.
        let fut = reg.add_endpoint("s", Endpoint::new(addr(1)));
        let _ = tokio::time::timeout(Duration::ZERO, fut).await;
        let mut versions = reg.versions();
        versions.wait_for(|v| *v == 2).await.unwrap();
        assert_eq!(store.load().await.unwrap().version, 2);
        assert_eq!(reg.endpoints("s").unwrap().1.len(), 1);
    }

    #[test]
    fn patches_follow_the_policy() {
        let mut c = Cluster::new("s");
        let rr = ServicePatch {
            lb_policy: Some(LbKind::RoundRobin),
            ..Default::default()
        };
        rr.apply(&mut c).unwrap();
        assert_eq!(c.lb, LbPolicy::RoundRobin);
        // Back to least-request: default bias unless given.
        let lr = ServicePatch {
            lb_policy: Some(LbKind::LeastRequest),
            ..Default::default()
        };
        lr.apply(&mut c).unwrap();
        assert_eq!(c.lb, LbPolicy::default());
        let bias = ServicePatch {
            active_request_bias: Some(Some(0.5)),
            authority: Some(Some("a:1".into())),
            ..Default::default()
        };
        bias.apply(&mut c).unwrap();
        assert_eq!(
            c.lb,
            LbPolicy::LeastRequest {
                active_request_bias: 0.5
            }
        );
        assert_eq!(c.authority.as_deref(), Some("a:1"));
        ServicePatch {
            active_request_bias: Some(None),
            authority: Some(None),
            ..Default::default()
        }
        .apply(&mut c)
        .unwrap();
        assert_eq!(c.lb, LbPolicy::default());
        assert_eq!(c.authority, None);
    }
}
