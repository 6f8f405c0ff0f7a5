//! Authorization of inbound calls: the local service's policy (pushed with
//! its cluster by the control plane) decides, per call, from the caller's
//! SPIFFE ID, its IP and the gRPC method. A denied call gets
//! `PERMISSION_DENIED` and never reaches the app.
//!
//! The policy is swapped atomically with each config update; a call reads it
//! once, lock-free. The service's inbound rate limit comes with it and is
//! checked after the policy allowed a call ([`Authz::rate_limit`]).

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use meshwire_mesh::policy::{Action, Call, Policy};

/// What the local service's cluster says about its inbound side.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalPolicy {
    /// What the local app speaks: how the inbound side reaches it.
    pub protocol: meshwire_mesh::Protocol,
    /// Plaintext callers (no identity) accepted beside mutual TLS.
    pub permissive: bool,
    /// `None`: every caller that passed the TLS handshake is allowed.
    pub policy: Option<Policy>,
    /// Calls admitted per service, caller or IP ([`crate::ratelimit`]).
    pub rate_limit: Option<meshwire_mesh::RateLimit>,
}

#[derive(Debug, Default)]
pub struct Authz {
    current: ArcSwap<LocalPolicy>,
    /// The buckets of `current.rate_limit`, kept while it is unchanged.
    rate_limit: Arc<crate::ratelimit::InboundRateLimit>,
}

impl Authz {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn store(&self, p: LocalPolicy) {
        self.rate_limit.store(p.rate_limit.as_ref());
        if **self.current.load() != p {
            tracing::info!(
                permissive = p.permissive,
                has_policy = p.policy.is_some(),
                "inbound policy updated"
            );
            self.current.store(Arc::new(p));
        }
    }

    /// The local service's inbound rate limit (checked after the policy).
    pub fn rate_limit(&self) -> &Arc<crate::ratelimit::InboundRateLimit> {
        &self.rate_limit
    }

    pub fn current(&self) -> Arc<LocalPolicy> {
        self.current.load_full()
    }

    pub fn permissive(&self) -> bool {
        self.current.load().permissive
    }

    /// The local service's protocol (gRPC until its cluster says otherwise).
    pub fn protocol(&self) -> meshwire_mesh::Protocol {
        self.current.load().protocol
    }

    /// `true` if the call may go through.
    pub fn allows(&self, source: Option<&str>, path: &str, ip: IpAddr) -> bool {
        match &self.current.load().policy {
            None => true,
            Some(p) => p.evaluate(Call { source, path, ip }) == Action::Allow,
        }
    }
}
