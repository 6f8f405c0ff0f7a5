//! The one place a new config enters the sidecar, whether it comes from a
//! static file, from the control plane over xDS ([`ConfigSink`]) or from an
//! in-process caller ([`crate::Sidecar::apply`]).
//!
//! ```text
//! Vec<Cluster> ─▶ Applier::apply ─▶ Routes::update (validate whole, then swap the table)
//!                                ─▶ Authz::store (the local service's policy, permissive flag and rate limit)
//! ```
//! The outbound route table and the inbound authorization are fed separately;
//! neither knows about the other. Nothing changes unless the whole config is valid.

use std::sync::Arc;

use meshwire_mesh::{Cluster, ModelError};
use meshwire_xds::client::{ApplyError, ConfigSink};

use crate::authz::{Authz, LocalPolicy};
use crate::outbound::route::Routes;

/// Applies configs to the route table and to the inbound authorization.
#[derive(Debug)]
pub struct Applier {
    routes: Arc<Routes>,
    /// The service this sidecar belongs to, and where its inbound policy goes.
    local: Option<(String, Arc<Authz>)>,
}

impl Applier {
    /// `local`: the sidecar's own service, whose cluster's policy and
    /// permissive flag `authz` enforces on the inbound side.
    pub fn new(routes: Arc<Routes>, local: Option<(String, Arc<Authz>)>) -> Self {
        Self { routes, local }
    }

    /// Applies a whole new set of services (validated whole; on error nothing changes).
    pub fn apply(&self, clusters: &[Cluster]) -> Result<(), ModelError> {
        self.routes.update(clusters)?;
        if let Some((name, authz)) = &self.local {
            let own = clusters.iter().find(|c| &c.name == name);
            authz.store(LocalPolicy {
                protocol: own.map(|c| c.protocol).unwrap_or_default(),
                permissive: own.is_some_and(|c| c.permissive),
                policy: own.and_then(|c| c.policy.clone()),
                rate_limit: own.and_then(|c| c.rate_limit.clone()),
            });
        }
        Ok(())
    }
}

impl ConfigSink for Applier {
    fn apply(&self, clusters: &[Cluster]) -> Result<(), ApplyError> {
        Applier::apply(self, clusters).map_err(|e| ApplyError(e.to_string()))
    }

    fn check(&self, cluster: &Cluster) -> Result<(), ApplyError> {
        self.routes
            .check(cluster)
            .map_err(|e| ApplyError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::Connector;
    use crate::pool::H2Settings;

    #[test]
    fn routes_and_policy_change_together_or_not_at_all() {
        let routes = Arc::new(Routes::new(
            Connector::default(),
            Arc::new(H2Settings::default()),
        ));
        let authz = Authz::new();
        let a = Applier::new(routes.clone(), Some(("me".into(), authz.clone())));
        let mut me = Cluster::new("me");
        me.permissive = true;
        a.apply(&[me.clone(), Cluster::new("other")]).unwrap();
        assert!(authz.permissive());
        assert!(routes.load().get("other").is_some());

        // Invalid as a whole: neither the routes nor the policy change.
        me.permissive = false;
        let mut bad = Cluster::new("bad");
        bad.endpoints =
            vec![meshwire_mesh::Endpoint::new(([127, 0, 0, 1], 1).into()).with_weight(0)];
        assert!(a.apply(&[me.clone(), bad]).is_err());
        assert!(authz.permissive());
        assert!(routes.load().get("bad").is_none());

        a.apply(&[me]).unwrap();
        assert!(!authz.permissive());
        assert!(routes.load().get("other").is_none());
    }
}
