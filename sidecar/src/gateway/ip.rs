//! Who the client is, by address, and the per-route CIDR rules.
//!
//! The client IP is the connection's peer address, unless that peer is one
//! of the configured trusted proxies: then it is the `hops`-th address from
//! the right of `x-forwarded-for` (what the nearest trusted proxy saw). An
//! untrusted peer's `x-forwarded-for` is ignored, so it cannot claim another
//! address, and is replaced on the way upstream.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// The proxies in front of the gateway whose `x-forwarded-for` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    pub cidrs: Vec<IpNet>,
    /// How many trusted proxies a request passed (≥ 1 when `cidrs` is set).
    pub hops: usize,
}

/// The client's address and the `x-forwarded-for` to send upstream.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub ip: IpAddr,
    /// The full chain a trusted proxy reported plus the peer; for an
    /// untrusted peer, the peer alone.
    pub forwarded_for: String,
    /// The peer is a trusted proxy (its `forwarded` header is kept too).
    pub via_proxy: bool,
    pub peer: IpAddr,
}

impl ClientAddr {
    /// The RFC 7239 `forwarded` value to send upstream: the trusted proxy's
    /// (`prev`) with this hop appended, or this hop alone.
    pub fn forwarded(&self, prev: Option<&str>) -> String {
        let node = match self.peer {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        match prev.filter(|p| self.via_proxy && !p.is_empty()) {
            Some(p) => format!("{p}, for={node};proto=https"),
            None => format!("for={node};proto=https"),
        }
    }
}

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.cidrs.iter().any(|c| c.contains(&ip))
    }

    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddr {
        let peer = peer.to_canonical();
        if self.hops == 0 || !self.trusts(peer) {
            return ClientAddr {
                ip: peer,
                forwarded_for: peer.to_string(),
                via_proxy: false,
                peer,
            };
        }
        // All x-forwarded-for lines, in order, as one list.
        let chain: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        // hops = 1: the last entry (what the trusted peer saw), and so on.
        let ip = chain
            .len()
            .checked_sub(self.hops)
            .and_then(|i| chain[i].parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .unwrap_or(peer);
        let mut forwarded_for = chain.join(", ");
        if !forwarded_for.is_empty() {
            forwarded_for.push_str(", ");
        }
        forwarded_for.push_str(&peer.to_string());
        ClientAddr {
            ip,
            forwarded_for,
            via_proxy: true,
            peer,
        }
    }
}

/// A route's CIDR rules: any deny match refuses; a non-empty allow list
/// must match.
#[derive(Debug, Clone, Default)]
pub struct IpRules {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl IpRules {
    pub fn admits(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|c| c.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(xff: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in xff {
            m.append("x-forwarded-for", v.parse().unwrap());
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peers_cannot_claim_an_address() {
        let t = TrustedProxies {
            cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            hops: 1,
        };
        let c = t.client(ip("192.0.2.9"), &h(&["198.51.100.1"]));
        assert_eq!(c.ip, ip("192.0.2.9"));
        assert_eq!(c.forwarded_for, "192.0.2.9", "the spoofed chain is dropped");
        let c = t.client(ip("10.1.1.1"), &h(&["203.0.113.5, 198.51.100.1"]));
        assert_eq!(c.ip, ip("198.51.100.1"), "what the trusted proxy saw");
        assert_eq!(c.forwarded_for, "203.0.113.5, 198.51.100.1, 10.1.1.1");
        let two = TrustedProxies {
            hops: 2,
            ..t.clone()
        };
        let c = two.client(ip("10.1.1.1"), &h(&["203.0.113.5", "198.51.100.1"]));
        assert_eq!(c.ip, ip("203.0.113.5"));
        assert_eq!(
            c.forwarded(Some("for=203.0.113.5")),
            "for=203.0.113.5, for=10.1.1.1;proto=https"
        );
        let spoofed = t.client(ip("192.0.2.9"), &h(&[]));
        assert_eq!(
            spoofed.forwarded(Some("for=1.2.3.4")),
            "for=192.0.2.9;proto=https"
        );
        let c = t.client(ip("10.1.1.1"), &h(&[]));
        assert_eq!(c.ip, ip("10.1.1.1"), "no header: the peer");
        let c = t.client(ip("10.1.1.1"), &h(&["garbage"]));
        assert_eq!(c.ip, ip("10.1.1.1"));
    }

    #[test]
    fn deny_wins_and_allow_lists_restrict() {
        let r = IpRules {
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            deny: vec!["10.9.0.0/16".parse().unwrap()],
        };
        assert!(r.admits(ip("10.1.2.3")));
        assert!(!r.admits(ip("10.9.2.3")));
        assert!(!r.admits(ip("192.0.2.1")));
        assert!(IpRules::default().admits(ip("192.0.2.1")));
    }
}
