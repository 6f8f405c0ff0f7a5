//! The default store: one `redb` file in the data directory.
//!
//! Tables: `services` (name → JSON [`ServiceRecord`]), `endpoints`
//! (`service/address` → JSON [`EndpointRecord`]; service names cannot contain
//! `/`) and `meta` (`version` → u64). A commit is one redb write transaction
//! with immediate durability (fsync before `commit` returns), touching only
//! the rows of its [`Change`] plus the version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Change, EndpointRecord, Loaded, ServiceRecord, Store, StoreError, assemble};

const SERVICES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("services");
const ENDPOINTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("endpoints");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const VERSION_KEY: &str = "version";

/// The embedded store. Opening takes an exclusive lock on the file, so a
/// second control plane on the same data directory fails to start.
pub struct RedbStore {
    path: PathBuf,
    db: Mutex<Option<Arc<Database>>>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// One row write, prepared (serialized) before the blocking transaction.
enum Op {
    PutService(String, Vec<u8>),
    DeleteService(String),
    PutEndpoint(String, Vec<u8>),
    DeleteEndpoint(String),
}

fn endpoint_key(service: &str, address: &std::net::SocketAddr) -> String {
    format!("{service}/{address}")
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(e.into().to_string())
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize to JSON")
}

impl RedbStore {
    /// Opens (or creates) the database file, blocking; call it off the
    /// async runtime or at start-up.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.display().to_string(),
            reason,
        };
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                "the database is locked by another process (is another control plane using this data directory?)".into(),
            ),
            e => open_err(e.to_string()),
        })?;
        // Create the tables up front so reads never meet a missing table.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        {
            txn.open_table(SERVICES)
                .map_err(|e| open_err(e.to_string()))?;
            txn.open_table(ENDPOINTS)
                .map_err(|e| open_err(e.to_string()))?;
            txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        tracing::debug!(path = %path.display(), "store opened");
        Ok(Self {
            path: path.to_owned(),
            db: Mutex::new(Some(Arc::new(db))),
        })
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Closed)
    }

    fn load_blocking(db: &Database) -> Result<Loaded, StoreError> {
        let txn = db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let version = meta
            .get(VERSION_KEY)
            .map_err(db_err)?
            .map(|v| v.value())
            .unwrap_or(0);

        let mut services = Vec::new();
        for row in txn
            .open_table(SERVICES)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let rec: ServiceRecord =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                    key: format!("services/{}", k.value()),
                    reason: e.to_string(),
                })?;
            services.push(rec);
        }
        let mut endpoints: BTreeMap<String, Vec<EndpointRecord>> = BTreeMap::new();
        for row in txn
            .open_table(ENDPOINTS)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value();
            let corrupt = |reason: String| StoreError::Corrupt {
                key: format!("endpoints/{key}"),
                reason,
            };
            let (service, _) = key
                .split_once('/')
                .ok_or_else(|| corrupt("key has no service".into()))?;
            let rec: EndpointRecord =
                serde_json::from_slice(v.value()).map_err(|e| corrupt(e.to_string()))?;
            endpoints.entry(service.to_owned()).or_default().push(rec);
        }
        Ok(Loaded {
            version,
            clusters: assemble(services, endpoints)?,
            revision: 0,
        })
    }

    fn commit_blocking(db: &Database, ops: Vec<Op>) -> Result<u64, StoreError> {
        let txn = db.begin_write().map_err(db_err)?;
        let version = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let version = meta
                .get(VERSION_KEY)
                .map_err(db_err)?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            meta.insert(VERSION_KEY, version).map_err(db_err)?;
            let mut services = txn.open_table(SERVICES).map_err(db_err)?;
            let mut endpoints = txn.open_table(ENDPOINTS).map_err(db_err)?;
            for op in &ops {
                match op {
                    Op::PutService(k, v) => {
                        services.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
                    }
                    Op::DeleteService(k) => {
                        services.remove(k.as_str()).map_err(db_err)?;
                    }
                    Op::PutEndpoint(k, v) => {
                        endpoints.insert(k.as_str(), v.as_slice()).map_err(db_err)?;
                    }
                    Op::DeleteEndpoint(k) => {
                        endpoints.remove(k.as_str()).map_err(db_err)?;
                    }
                }
            }
            version
        };
        // Dropping an uncommitted transaction aborts it, so an error above
        // leaves nothing behind.
        txn.commit().map_err(db_err)?;
        Ok(version)
    }
}

fn ops_for(change: &Change) -> Vec<Op> {
    match change {
        Change::ServiceCreated(c) | Change::ServiceUpdated(c) => {
            vec![Op::PutService(
                c.name.clone(),
                to_json(&ServiceRecord::from(c)),
            )]
        }
        Change::ServiceDeleted { name, endpoints } => {
            let mut ops = vec![Op::DeleteService(name.clone())];
            ops.extend(
                endpoints
                    .iter()
                    .map(|a| Op::DeleteEndpoint(endpoint_key(name, a))),
            );
            ops
        }
        Change::EndpointAdded { service, endpoint }
        | Change::EndpointUpdated { service, endpoint } => vec![Op::PutEndpoint(
            endpoint_key(service, &endpoint.address),
            to_json(&EndpointRecord::from(endpoint)),
        )],
        Change::EndpointRemoved { service, address } => {
            vec![Op::DeleteEndpoint(endpoint_key(service, address))]
        }
    }
}

/// redb blocks on disk I/O (fsync): run it on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Database(format!("store task failed: {e}")))?
}

impl Store for RedbStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            let db = self.db()?;
            blocking(move || Self::load_blocking(&db)).await
        })
    }

    /// `base` is not checked: the file lock makes this process the only writer.
    fn commit<'a>(
        &'a self,
        _base: u64,
        change: &'a Change,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let ops = ops_for(change);
        Box::pin(async move {
            let db = self.db()?;
            blocking(move || Self::commit_blocking(&db, ops)).await
        })
    }

    fn close(&self) {
        if self
            .db
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
        {
            tracing::debug!(path = %self.path.display(), "store closed");
        }
    }

    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use meshwire_mesh::{Cluster, Endpoint, LbPolicy};

    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn added(service: &str, port: u16, weight: u32) -> Change {
        Change::EndpointAdded {
            service: service.into(),
            endpoint: Endpoint::new(addr(port)).with_weight(weight),
        }
    }

    #[tokio::test]
    async fn changes_survive_reopen_and_versions_keep_increasing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.load().await.unwrap(), Loaded::default());

        let mut c = Cluster::new("greeter");
        c.lb = LbPolicy::RoundRobin;
        assert_eq!(
            store
                .commit(0, &Change::ServiceCreated(c.clone()))
                .await
                .unwrap(),
            1
        );
        assert_eq!(store.commit(0, &added("greeter", 2, 5)).await.unwrap(), 2);
        assert_eq!(store.commit(0, &added("greeter", 1, 1)).await.unwrap(), 3);
        let updated = Endpoint::new(addr(2)).with_weight(9);
        store
            .commit(
                0,
                &Change::EndpointUpdated {
                    service: "greeter".into(),
                    endpoint: updated.clone(),
                },
            )
            .await
            .unwrap();
        store.close();
        assert!(matches!(
            store.commit(0, &added("greeter", 3, 1)).await,
            Err(StoreError::Closed)
        ));
        drop(store);

        let store = RedbStore::open(&path).unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.version, 4);
        c.endpoints = vec![Endpoint::new(addr(1)), updated];
        assert_eq!(loaded.clusters, vec![c]);

        // Deleting the service removes its endpoint rows in the same commit.
        let v = store
            .commit(
                0,
                &Change::ServiceDeleted {
                    name: "greeter".into(),
                    endpoints: vec![addr(1), addr(2)],
                },
            )
            .await
            .unwrap();
        assert_eq!(v, 5);
        store
            .commit(0, &Change::ServiceCreated(Cluster::new("greeter")))
            .await
            .unwrap();
        drop(store);
        let store = RedbStore::open(&path).unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.version, 6);
        assert_eq!(loaded.clusters, vec![Cluster::new("greeter")]);
    }

    #[tokio::test]
    async fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let _first = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("another control plane"), "{err}");
    }

    #[test]
    fn a_commit_writes_only_its_rows() {
        // One endpoint is one row (plus the version) whatever the size of
        // its service; only a service delete touches its endpoints.
        assert_eq!(ops_for(&added("big", 51, 1)).len(), 1);
        let mut c = Cluster::new("big");
        c.endpoints = (1..=100).map(|p| Endpoint::new(addr(p))).collect();
        assert_eq!(ops_for(&Change::ServiceUpdated(c)).len(), 1);
        let removed = Change::EndpointRemoved {
            service: "big".into(),
            address: addr(1),
        };
        assert_eq!(ops_for(&removed).len(), 1);
        let deleted = Change::ServiceDeleted {
            name: "big".into(),
            endpoints: vec![addr(1), addr(2)],
        };
        assert_eq!(ops_for(&deleted).len(), 3);
    }
}
