//! The control plane's xDS endpoint: the shared ADS server from
//! `meshwire_xds::server`, reporting every stream into the [`NodeRegistry`].

use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use meshwire_xds::Snapshot;
use meshwire_xds::server::{AdsServer, StreamObserver};
use tokio::sync::watch;

use crate::nodes::NodeRegistry;

impl StreamObserver for NodeRegistry {
    fn connected(&self, stream: u64, node_id: &str, service: &str, user_agent: &str) {
        NodeRegistry::connected(self, stream, node_id, service, user_agent);
    }
    fn pushed(&self, stream: u64, _type_url: &str, _version: &str) {
        NodeRegistry::pushed(self, stream);
    }
    fn acked(&self, stream: u64, type_url: &str, version: &str) {
        NodeRegistry::acked(self, stream, type_url, version);
    }
    fn nacked(&self, stream: u64, type_url: &str, version: &str, error: &str) {
        NodeRegistry::nacked(self, stream, type_url, version, error);
    }
    fn disconnected(&self, stream: u64) {
        NodeRegistry::disconnected(self, stream);
    }
}

/// The ADS gRPC service to add to the control plane's tonic server;
/// `observer` is told of every stream (the [`NodeRegistry`], or
/// `telemetry::XdsObserver` to count them too).
pub fn ads_service(
    snapshots: watch::Receiver<Arc<Snapshot>>,
    observer: Arc<dyn StreamObserver>,
) -> AggregatedDiscoveryServiceServer<AdsServer> {
    AdsServer::new(snapshots, observer).into_service()
}
