//! Every xDS client connected to this control plane, and what it did with
//! what we sent: the version it ACKed per resource type, its last NACK.
//! Written by the xDS server, read by the admin API (`meshctl status`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

/// One connected (or recently connected) xDS client.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// `node.id` from its first DiscoveryRequest.
    pub node_id: String,
    /// `node.cluster`: the service the node belongs to.
    pub service: String,
    /// `node.user_agent_name` (e.g. `meshwire-sidecar`, `envoy`, `gRPC Python`).
    pub user_agent: String,
    pub connected_since: SystemTime,
    pub connected: bool,
    /// Version last ACKed, per type URL.
    pub acked: BTreeMap<String, String>,
    pub last_nack: Option<Nack>,
    /// Responses sent on the current stream.
    pub pushes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Nack {
    pub type_url: String,
    /// The version the node refused.
    pub version: String,
    pub error: String,
    pub at: SystemTime,
}

/// Node statuses, keyed by stream (a node may reconnect on a new stream
/// before the old one is noticed gone).
#[derive(Debug, Default)]
pub struct NodeRegistry {
    streams: Mutex<BTreeMap<u64, NodeStatus>>,
}

impl NodeRegistry {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<u64, NodeStatus>) -> R) -> R {
        f(&mut self.streams.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn connected(&self, stream: u64, node_id: &str, service: &str, user_agent: &str) {
        self.with(|m| {
            // A reconnect replaces the node's earlier, now dead, entries.
            m.retain(|_, n| n.node_id != node_id || n.connected);
            m.insert(
                stream,
                NodeStatus {
                    node_id: node_id.to_owned(),
                    service: service.to_owned(),
                    user_agent: user_agent.to_owned(),
                    connected_since: SystemTime::now(),
                    connected: true,
                    acked: BTreeMap::new(),
                    last_nack: None,
                    pushes: 0,
                },
            );
        });
    }

    pub fn pushed(&self, stream: u64) {
        self.with(|m| {
            if let Some(n) = m.get_mut(&stream) {
                n.pushes += 1;
            }
        });
    }

    pub fn acked(&self, stream: u64, type_url: &str, version: &str) {
        self.with(|m| {
            if let Some(n) = m.get_mut(&stream) {
                n.acked.insert(type_url.to_owned(), version.to_owned());
            }
        });
    }

    pub fn nacked(&self, stream: u64, type_url: &str, version: &str, error: &str) {
        self.with(|m| {
            if let Some(n) = m.get_mut(&stream) {
                n.last_nack = Some(Nack {
                    type_url: type_url.to_owned(),
                    version: version.to_owned(),
                    error: error.to_owned(),
                    at: SystemTime::now(),
                });
            }
        });
    }

    /// The stream ended; the entry stays (disconnected) until the node reconnects.
    pub fn disconnected(&self, stream: u64) {
        self.with(|m| {
            if let Some(n) = m.get_mut(&stream) {
                n.connected = false;
            }
            // Keep a bounded history of disconnected nodes.
            let dead: Vec<u64> = m
                .iter()
                .filter(|(_, n)| !n.connected)
                .map(|(k, _)| *k)
                .collect();
            if dead.len() > 1000 {
                for k in &dead[..dead.len() - 1000] {
                    m.remove(k);
                }
            }
        });
    }

    /// Everything, connected nodes first, then by node id.
    pub fn list(&self) -> Vec<NodeStatus> {
        let mut v: Vec<NodeStatus> = self.with(|m| m.values().cloned().collect());
        v.sort_by(|a, b| {
            b.connected
                .cmp(&a.connected)
                .then(a.node_id.cmp(&b.node_id))
        });
        v
    }

    pub fn connected_count(&self) -> usize {
        self.with(|m| m.values().filter(|n| n.connected).count())
    }
}
