//! What the control plane serves: the whole mesh configuration at one
//! version. Immutable once published; shared by every xDS stream (`Arc`).

use std::collections::BTreeMap;

use meshwire_mesh::model::Cluster;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Monotonic across control-plane restarts (it is the store's version).
    pub version: u64,
    /// Every service by name, each with its endpoints.
    pub clusters: BTreeMap<String, Cluster>,
}

impl Snapshot {
    pub fn new(version: u64, clusters: impl IntoIterator<Item = Cluster>) -> Self {
        Self {
            version,
            clusters: clusters.into_iter().map(|c| (c.name.clone(), c)).collect(),
        }
    }
}
