//! An in-memory [`Store`] for tests: same semantics as the real one (version
//! per commit, all-or-nothing), nothing on disk, and failures on demand.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;
use meshwire_mesh::{Cluster, Endpoint};

use super::{Change, Loaded, Store, StoreError};

#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    fail_next: AtomicBool,
    closed: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    version: u64,
    clusters: BTreeMap<String, Cluster>,
}

impl MemoryStore {
    /// A store that already holds `clusters` at `version`.
    pub fn with(version: u64, clusters: impl IntoIterator<Item = Cluster>) -> Self {
        let s = Self::default();
        {
            let mut st = s.lock();
            st.version = version;
            st.clusters = clusters.into_iter().map(|c| (c.name.clone(), c)).collect();
        }
        s
    }

    /// The next commit fails (as a full disk would) and writes nothing.
    pub fn fail_next_commit(&self) {
        self.fail_next.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(st: &mut State, change: &Change) {
        let mut upsert = |service: &str, ep: &Endpoint| {
            if let Some(c) = st.clusters.get_mut(service) {
                c.endpoints.retain(|e| e.address != ep.address);
                c.endpoints.push(ep.clone());
                c.endpoints.sort_by_key(|e| e.address);
            }
        };
        match change {
            Change::EndpointAdded { service, endpoint }
            | Change::EndpointUpdated { service, endpoint } => upsert(service, endpoint),
            Change::ServiceCreated(c) | Change::ServiceUpdated(c) => {
                let endpoints = st
                    .clusters
                    .remove(&c.name)
                    .map(|old| old.endpoints)
                    .unwrap_or_default();
                let mut c = c.clone();
                c.endpoints = endpoints;
                st.clusters.insert(c.name.clone(), c);
            }
            Change::ServiceDeleted { name, .. } => {
                st.clusters.remove(name);
            }
            Change::EndpointRemoved { service, address } => {
                if let Some(c) = st.clusters.get_mut(service) {
                    c.endpoints.retain(|e| e.address != *address);
                }
            }
        }
    }
}

impl Store for MemoryStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::SeqCst) {
                return Err(StoreError::Closed);
            }
            let st = self.lock();
            Ok(Loaded {
                version: st.version,
                clusters: st.clusters.values().cloned().collect(),
                revision: 0,
            })
        })
    }

    fn commit<'a>(
        &'a self,
        _base: u64,
        change: &'a Change,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::SeqCst) {
                return Err(StoreError::Closed);
            }
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return Err(StoreError::Database("injected failure".into()));
            }
            let mut st = self.lock();
            Self::apply(&mut st, change);
            st.version += 1;
            Ok(st.version)
        })
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
