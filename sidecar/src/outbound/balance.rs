//! Per-call endpoint choice: weighted least outstanding requests.
//!
//! *Outstanding* is calls in flight plus calls still waiting for a connection
//! (counted from the moment of the pick, see [`Endpoint::start_call`]), so an
//! endpoint that is slow to accept does not look idle (envoy#44989).
//!
//! - **Equal weights**: power of two choices: two distinct endpoints at
//!   random, the one with fewer outstanding calls wins (ties: the first draw).
//! - **Unequal weights**: stride scheduling (earliest virtual deadline first)
//!   over the *effective weight* `w / (1 + o/w)^bias`, where `o` is the
//!   endpoint's outstanding count. With equal latencies `o/w` is the same on
//!   every endpoint once the split follows the weights, so every endpoint's
//!   effective weight shrinks by the same factor and the split stays exactly
//!   proportional to the weights at any concurrency (at concurrency 1, `o` is
//!   always 0 and this is plain weighted round robin). A slow endpoint builds
//!   up a larger `o/w`, its effective weight drops, and it gets fewer calls;
//!   `bias` sets how hard. Envoy's `w / (o + 1)^bias` does not keep the
//!   weights at high concurrency (it tends to a `√w` split); a plain
//!   `argmin o/w` ties everything at concurrency 1.
//! - **Round robin** is the same scheduler with bias 0.
//! - **Ring hash / Maglev** ([`super::hash`]): a call with a hash key goes to
//!   the key's endpoint, or the first usable one after it; with a balance
//!   factor, endpoints over their bound are passed over too. A call without
//!   a key is balanced by least request.
//!
//! - **Zones** ([`meshwire_mesh::ZoneRouting`]): a sidecar that knows its
//!   zone splits the endpoints into its own zone's and the others'. Each call
//!   first draws which group it goes to: the local group with the *local
//!   share* `min(1, healthy / min_healthy)` (healthy: the fraction of the
//!   zone's weight neither ejected nor unreachable, counting endpoints the
//!   control plane reports unhealthy as unhealthy weight), the others with
//!   the rest; the
//!   picker above then balances within the group, so the spill-over
//!   reaches the other zones in proportion to their healthy weight. When
//!   the drawn group has nothing usable the other one takes the call. The
//!   share is recomputed once per endpoint set and per health change
//!   (ejection, return, pool starting or ending a backoff:
//!   [`ClusterHealth::generation`]), never per call. Calls with a hash key
//!   ignore zones (a key's endpoint is the same on every sidecar, whatever
//!   its zone); calls without one use them.
//!
//! Draining endpoints get no calls; endpoints backing off after failed
//! connects, and endpoints the outlier detector ejected, are skipped while
//! any other can be used (past the ejection share: panic mode, all count).
//! An ejected endpoint whose time is up takes exactly one call, the probe.
//! Recent consecutive failures count as outstanding calls, so an endpoint
//! that fails fast never looks like the least loaded one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meshwire_mesh::{LbPolicy, ZoneRouting};

use super::hash::{self, BoundedLoad, HashTable};
use crate::endpoint::Endpoint;
use crate::outlier::{Admit, ClusterHealth};

#[derive(Debug, Clone)]
pub struct Entry {
    pub endpoint: Arc<Endpoint>,
    pub weight: u32,
    pub draining: bool,
}

#[derive(Debug)]
enum Picker {
    PowerOfTwo,
    Stride { bias: f64, passes: Mutex<Vec<f64>> },
}

/// The consistent-hash side of a set: built once per endpoint set.
#[derive(Debug)]
struct Hashing {
    table: HashTable,
    balance_factor: Option<f64>,
    /// Sum of the weights of endpoints not draining.
    total_weight: u64,
}

/// Zone-aware routing over a set: the groups are built once per endpoint
/// set, the local share once per health change.
#[derive(Debug)]
struct Zones {
    /// The caller's zone.
    zone: Arc<str>,
    /// Endpoints in the caller's zone, and all the others (no zone included).
    local: Vec<usize>,
    remote: Vec<usize>,
    /// Weight of local endpoints the control plane reports unhealthy (not in
    /// the set, but part of the zone's capacity).
    unhealthy_weight: u64,
    routing: ZoneRouting,
    /// The local share in millionths (low 32 bits) and the
    /// [`ClusterHealth::generation`] it was computed at (high 32 bits).
    share: AtomicU64,
}

/// One million: shares are kept in millionths.
const PPM: u32 = 1_000_000;

/// How the caller's zone stands, for `/clusters`.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneReport {
    pub zone: Arc<str>,
    /// Healthy and total weight of the caller's zone (unhealthy included).
    pub healthy_weight: u64,
    pub total_weight: u64,
    /// Share of calls (without a hash key) kept in the zone, 0..=1.
    pub local_share: f64,
    /// Share of calls each other zone gets (`""`: endpoints without a zone).
    pub spill: Vec<(String, f64)>,
}

/// An immutable endpoint list with its picker; replaced as a whole on updates.
#[derive(Debug)]
pub struct EndpointSet {
    entries: Vec<Entry>,
    /// `0..entries.len()`: the candidates when zones do not apply.
    all: Vec<usize>,
    picker: Picker,
    health: Arc<ClusterHealth>,
    hashing: Option<Hashing>,
    zones: Option<Zones>,
}

impl EndpointSet {
    pub fn new(entries: Vec<Entry>, lb: LbPolicy, health: Arc<ClusterHealth>) -> Self {
        let equal = entries.windows(2).all(|w| w[0].weight == w[1].weight);
        let stride = |bias| Picker::Stride {
            bias,
            passes: Mutex::new(vec![0.0; entries.len()]),
        };
        let picker = match lb {
            LbPolicy::RoundRobin => stride(0.0),
            LbPolicy::LeastRequest { .. } | LbPolicy::RingHash(_) | LbPolicy::Maglev(_)
                if equal =>
            {
                Picker::PowerOfTwo
            }
            LbPolicy::LeastRequest {
                active_request_bias,
            } => stride(active_request_bias),
            // Calls without a hash key.
            LbPolicy::RingHash(_) | LbPolicy::Maglev(_) => {
                stride(meshwire_mesh::model::DEFAULT_ACTIVE_REQUEST_BIAS)
            }
        };
        let hashing = lb.hash().map(|h| {
            let eps: Vec<_> = entries
                .iter()
                .map(|e| (e.endpoint.addr, e.weight))
                .collect();
            Hashing {
                table: match lb {
                    LbPolicy::Maglev(_) => HashTable::maglev(&eps, hash::DEFAULT_MAGLEV_SIZE),
                    _ => HashTable::ring(&eps, hash::DEFAULT_POINTS_PER_WEIGHT),
                },
                balance_factor: h.balance_factor,
                total_weight: entries
                    .iter()
                    .filter(|e| !e.draining)
                    .map(|e| u64::from(e.weight))
                    .sum(),
            }
        });
        Self {
            all: (0..entries.len()).collect(),
            entries,
            picker,
            hashing,
            health,
            zones: None,
        }
    }

    /// Prefers the endpoints of `zone` (the caller's) as `routing` says.
    /// `unhealthy_weight`: the weight of that zone's endpoints the control
    /// plane reports unhealthy (left out of the set). Nothing changes when
    /// routing is off, or when the set has no other zone to spill to or none
    /// of the caller's zone at all.
    pub fn with_zones(mut self, zone: &str, routing: ZoneRouting, unhealthy_weight: u64) -> Self {
        let (local, remote): (Vec<usize>, Vec<usize>) = self
            .all
            .iter()
            .partition(|&&i| self.entries[i].endpoint.zone.as_deref() == Some(zone));
        if !routing.enabled || remote.is_empty() || (local.is_empty() && unhealthy_weight == 0) {
            return self;
        }
        let z = Zones {
            zone: Arc::from(zone),
            local,
            remote,
            unhealthy_weight,
            routing,
            share: AtomicU64::new(0),
        };
        z.refresh(&self.entries, self.health.generation());
        self.zones = Some(z);
        self
    }

    /// The caller's zone and how calls are split, when zones apply.
    pub fn zone_report(&self) -> Option<ZoneReport> {
        let z = self.zones.as_ref()?;
        let (healthy, total) = z.local_weights(&self.entries);
        let local_share = f64::from(self.local_share_ppm(z)) / f64::from(PPM);
        let mut by_zone: std::collections::BTreeMap<&str, u64> = Default::default();
        for &i in &z.remote {
            let e = &self.entries[i];
            let w = by_zone
                .entry(e.endpoint.zone.as_deref().unwrap_or(""))
                .or_default();
            if healthy_entry(e) {
                *w += u64::from(e.weight);
            }
        }
        let remote_healthy: u64 = by_zone.values().sum();
        let spill = by_zone
            .into_iter()
            .map(|(zone, w)| {
                let share = if remote_healthy == 0 {
                    0.0
                } else {
                    (1.0 - local_share) * w as f64 / remote_healthy as f64
                };
                (zone.to_owned(), share)
            })
            .collect();
        Some(ZoneReport {
            zone: z.zone.clone(),
            healthy_weight: healthy,
            total_weight: total,
            local_share,
            spill,
        })
    }

    /// Each endpoint's share of the hash key space, for consistent-hash sets.
    pub fn hash_shares(&self) -> Option<Vec<f64>> {
        self.hashing
            .as_ref()
            .map(|h| h.table.shares(self.entries.len()))
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Chooses an endpoint for one call, never one in `exclude` (endpoints that
    /// already failed this call). `None` when nothing can take it. `key` is
    /// the call's hash key, for consistent-hash sets.
    pub fn pick(&self, exclude: &[usize], key: Option<u64>) -> Option<usize> {
        if self.health.any_ejected()
            && let Some(i) = self.probe(exclude)
        {
            return Some(i);
        }
        if let (Some(h), Some(key)) = (&self.hashing, key) {
            return self.pick_hash(h, key, exclude);
        }
        let (first, second): (&[usize], &[usize]) = match &self.zones {
            None => (&self.all, &[]),
            Some(z) => {
                if fastrand::u32(..PPM) < self.local_share_ppm(z) {
                    (&z.local, &z.remote)
                } else {
                    (&z.remote, &z.local)
                }
            }
        };
        self.pick_in(first, exclude)
            .or_else(|| self.pick_in(second, exclude))
            .or_else(|| self.last_resort(exclude))
    }

    /// The picker over `candidates` only; `None` if none of them is usable.
    fn pick_in(&self, candidates: &[usize], exclude: &[usize]) -> Option<usize> {
        match &self.picker {
            Picker::PowerOfTwo => self.pick_p2c(candidates, exclude),
            Picker::Stride { bias, passes } => {
                let mut passes = passes.lock().unwrap_or_else(|e| e.into_inner());
                self.pick_stride(*bias, &mut passes, candidates, exclude)
            }
        }
    }

    /// The local share, recomputed only if an endpoint was ejected or came
    /// back since it was last computed.
    fn local_share_ppm(&self, z: &Zones) -> u32 {
        let generation = self.health.generation();
        let packed = z.share.load(Ordering::Relaxed);
        if (packed >> 32) as u32 == generation {
            return packed as u32;
        }
        z.refresh(&self.entries, generation)
    }

    /// Whether an endpoint outside `exclude` could still take a call.
    pub fn has_other(&self, exclude: &[usize]) -> bool {
        (0..self.entries.len()).any(|i| !self.entries[i].draining && !exclude.contains(&i))
    }

    /// An ejected endpoint whose ejection is over, claimed as the one probe.
    fn probe(&self, exclude: &[usize]) -> Option<usize> {
        (0..self.entries.len()).find(|&i| {
            let e = &self.entries[i];
            // A probe only once the pool can connect again.
            !e.draining
                && !exclude.contains(&i)
                && e.endpoint.outlier.is_out()
                && e.endpoint.pool.is_available()
                && e.endpoint.outlier.admit() == Admit::Probe
        })
    }

    /// The one "may this endpoint take a call" check every picker uses
    /// (hashing included): not draining, not backing off, not already tried.
    fn usable(&self, i: usize, exclude: &[usize]) -> bool {
        let e = &self.entries[i];
        !e.draining
            && e.endpoint.pool.is_available()
            && !exclude.contains(&i)
            && (!e.endpoint.outlier.is_out() || self.health.panic())
            && !e.endpoint.outlier.refusing()
            && e.endpoint.outlier.warm_admits(self.health.slow_start())
    }

    /// Outstanding calls plus recent consecutive failures.
    fn load(&self, i: usize) -> usize {
        self.entries[i].endpoint.outstanding()
    }

    fn pick_hash(&self, h: &Hashing, key: u64, exclude: &[usize]) -> Option<usize> {
        if let Some(factor) = h.balance_factor {
            // O(endpoints) per call, only with bounded loads.
            let bound = BoundedLoad {
                factor,
                total_in_flight: self.entries.iter().map(|e| e.endpoint.outstanding()).sum(),
                total_weight: h.total_weight,
            };
            let within = h.table.pick(key, |i| {
                let e = &self.entries[i];
                self.usable(i, exclude) && bound.admits(e.weight, e.endpoint.outstanding())
            });
            if within.is_some() {
                return within;
            }
        }
        h.table
            .pick(key, |i| self.usable(i, exclude))
            .or_else(|| self.last_resort(exclude))
    }

    /// Endpoints backing off are still better than nothing: their pool fails
    /// fast, which lets the caller report why.
    fn last_resort(&self, exclude: &[usize]) -> Option<usize> {
        (0..self.entries.len())
            .filter(|&i| !self.entries[i].draining && !exclude.contains(&i))
            .min_by_key(|&i| self.load(i))
    }

    fn pick_p2c(&self, candidates: &[usize], exclude: &[usize]) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            let only = candidates[0];
            return self.usable(only, exclude).then_some(only);
        }
        let x = fastrand::usize(..n);
        let mut y = fastrand::usize(..n - 1);
        if y >= x {
            y += 1;
        }
        let (a, b) = (candidates[x], candidates[y]);
        match (self.usable(a, exclude), self.usable(b, exclude)) {
            (true, true) => Some(if self.load(b) < self.load(a) { b } else { a }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => candidates
                .iter()
                .copied()
                .filter(|&i| self.usable(i, exclude))
                .min_by_key(|&i| self.load(i)),
        }
    }

    fn pick_stride(
        &self,
        bias: f64,
        passes: &mut [f64],
        candidates: &[usize],
        exclude: &[usize],
    ) -> Option<usize> {
        let mut best: Option<usize> = None;
        for &i in candidates {
            if self.usable(i, exclude) && best.is_none_or(|b| passes[i] < passes[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        let now = passes[best];
        // Skipped endpoints must not bank credit and burst when they return.
        for &i in candidates {
            if passes[i] < now && !self.usable(i, exclude) {
                passes[i] = now;
            }
        }
        let e = &self.entries[best];
        let w = f64::from(e.weight);
        let load = 1.0 + self.load(best) as f64 / w;
        let effective = if bias == 0.0 {
            w
        } else if bias == 1.0 {
            w / load
        } else if bias == 2.0 {
            w / (load * load)
        } else {
            w / load.powf(bias)
        };
        passes[best] = now + 1.0 / effective;
        Some(best)
    }
}

/// Counts as healthy capacity for zone shares: not draining, not ejected,
/// and reachable (its pool is not backing off after failed connects).
fn healthy_entry(e: &Entry) -> bool {
    !e.draining && !e.endpoint.outlier.is_out() && e.endpoint.pool.is_available()
}

// === impl Zones ===

impl Zones {
    /// Healthy and total weight of the caller's zone.
    fn local_weights(&self, entries: &[Entry]) -> (u64, u64) {
        let mut healthy = 0;
        let mut total = self.unhealthy_weight;
        for &i in &self.local {
            let e = &entries[i];
            if e.draining {
                // Leaving on purpose: no longer part of the zone's capacity.
                continue;
            }
            total += u64::from(e.weight);
            if healthy_entry(e) {
                healthy += u64::from(e.weight);
            }
        }
        (healthy, total)
    }

    /// Recomputes the local share as of `generation`; returns it in millionths.
    fn refresh(&self, entries: &[Entry], generation: u32) -> u32 {
        let (healthy, total) = self.local_weights(entries);
        let share = self.routing.local_share(healthy, total);
        let ppm = (share * f64::from(PPM)).round() as u32;
        self.share.store(
            u64::from(generation) << 32 | u64::from(ppm),
            Ordering::Relaxed,
        );
        ppm
    }
}

#[cfg(test)]
mod tests {
    //! The balancer against a closed-loop simulation: `conc` callers, each
    //! issuing its next call when the previous one completes, endpoints with
    //! fixed latencies (±10 % jitter). Deterministic in virtual time.

    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Duration;

    use super::*;
    use crate::connect::Connector;
    use crate::endpoint::CallGuard;
    use crate::pool::H2Settings;

    fn set(weights: &[u32], lb: LbPolicy) -> EndpointSet {
        zoned(&vec![None; weights.len()], weights, lb)
    }

    /// A set whose endpoint `i` is in `zones[i]` with weight `weights[i]`.
    fn zoned(zones: &[Option<&str>], weights: &[u32], lb: LbPolicy) -> EndpointSet {
        let settings = Arc::new(H2Settings::default());
        let health = ClusterHealth::new(crate::outlier::OutlierSettings::default());
        health.update(Default::default(), weights.len());
        let entries = weights
            .iter()
            .zip(zones)
            .enumerate()
            .map(|(i, (&w, zone))| {
                let mut spec =
                    meshwire_mesh::Endpoint::new(([127, 0, 0, 1], 1000 + i as u16).into());
                spec.zone = zone.map(str::to_owned);
                Entry {
                    endpoint: Endpoint::new(
                        &spec,
                        Connector::default(),
                        Duration::from_secs(1),
                        settings.clone(),
                        health.clone(),
                    ),
                    weight: w,
                    draining: false,
                }
            })
            .collect();
        EndpointSet::new(entries, lb, health)
    }

    /// Returns each endpoint's share of `calls` calls, in percent.
    fn simulate(set: &EndpointSet, latency_us: &[u64], conc: usize, calls: usize) -> Vec<f64> {
        fastrand::seed(7);
        let mut counts = vec![0usize; latency_us.len()];
        let mut events: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        let mut guards: Vec<Option<CallGuard>> = Vec::new();
        let mut start =
            |now: u64, guards: &mut Vec<Option<CallGuard>>, events: &mut BinaryHeap<_>| {
                let i = set.pick(&[], None).expect("an endpoint");
                counts[i] += 1;
                let g = set.entries[i].endpoint.start_call();
                let jitter = 0.9 + fastrand::f64() * 0.2;
                let done = now + (latency_us[i] as f64 * jitter) as u64;
                guards.push(Some(g));
                events.push(Reverse((done, guards.len() - 1)));
            };
        for _ in 0..conc {
            start(0, &mut guards, &mut events);
        }
        for _ in 0..calls {
            let Reverse((now, id)) = events.pop().unwrap();
            guards[id].take();
            start(now, &mut guards, &mut events);
        }
        let total: usize = counts.iter().sum();
        counts
            .iter()
            .map(|&c| 100.0 * c as f64 / total as f64)
            .collect()
    }

    const LR: LbPolicy = LbPolicy::LeastRequest {
        active_request_bias: meshwire_mesh::model::DEFAULT_ACTIVE_REQUEST_BIAS,
    };

    #[test]
    fn weights_hold_at_equal_latency_for_any_concurrency() {
        for conc in [1, 4, 16, 64, 256] {
            let s = simulate(&set(&[3, 1], LR), &[1000, 1000], conc, 40_000);
            let ratio = s[0] / s[1];
            assert!(
                (ratio - 3.0).abs() <= 0.15 || (conc < 16 && (ratio - 3.0).abs() <= 0.5),
                "conc {conc}: split {s:?} ratio {ratio}"
            );
        }
        // 1 initial call + 3999 follow-ups = 4000 picks.
        let s = simulate(&set(&[3, 1], LR), &[1000, 1000], 1, 3_999);
        assert_eq!(
            s,
            vec![75.0, 25.0],
            "concurrency 1 is exact weighted round robin"
        );
        let s = simulate(&set(&[5, 3, 2], LR), &[1000, 1000, 1000], 64, 40_000);
        for (got, want) in s.iter().zip([50.0, 30.0, 20.0]) {
            assert!((got - want).abs() < 1.5, "{s:?}");
        }
    }

    #[test]
    fn weighted_steers_away_from_a_slow_endpoint() {
        // Without load feedback endpoint 0 would get 60 %.
        let s = simulate(&set(&[3, 1, 1], LR), &[10_000, 1000, 1000], 16, 40_000);
        assert!(s[0] < 30.0, "slow endpoint share {s:?}");
        // Bias 0 is weighted round robin: no steering.
        let rr = simulate(
            &set(&[3, 1, 1], LbPolicy::RoundRobin),
            &[10_000, 1000, 1000],
            16,
            40_000,
        );
        assert!((rr[0] - 60.0).abs() < 1.0, "{rr:?}");
    }

    #[test]
    fn equal_weights_p2c_steers_away_from_a_slow_endpoint() {
        for conc in [16, 64] {
            let s = simulate(&set(&[1, 1, 1], LR), &[11_400, 2300, 2300], conc, 40_000);
            // Equal in-flight would be ~9 %; round robin would be 33 %.
            assert!(s[0] < 14.0, "conc {conc}: {s:?}");
            assert!((s[1] - s[2]).abs() < 3.0, "{s:?}");
        }
        let s = simulate(&set(&[1, 1, 1], LR), &[1000, 1000, 1000], 64, 30_000);
        for x in &s {
            assert!((x - 33.3).abs() < 2.0, "{s:?}");
        }
    }

    #[test]
    fn hash_keys_stick_and_skip_draining_excluded_and_loaded_endpoints() {
        let ring = LbPolicy::RingHash(meshwire_mesh::HashLb::default());
        for lb in [ring, LbPolicy::Maglev(meshwire_mesh::HashLb::default())] {
            let mut s = set(&[1, 1, 1, 1], lb);
            let keys: Vec<u64> = (0..200u64)
                .map(|k| hash::hash_key(&k.to_le_bytes()))
                .collect();
            let home: Vec<usize> = keys
                .iter()
                .map(|&k| s.pick(&[], Some(k)).unwrap())
                .collect();
            for (k, h) in keys.iter().zip(&home) {
                assert_eq!(s.pick(&[], Some(*k)), Some(*h), "same key, same endpoint");
                // A failed attempt moves the call on, never back.
                let next = s.pick(&[*h], Some(*k)).unwrap();
                assert_ne!(next, *h);
            }
            s.entries[1].draining = true;
            for (k, h) in keys.iter().zip(&home) {
                let got = s.pick(&[], Some(*k)).unwrap();
                if *h == 1 {
                    assert_ne!(got, 1);
                } else {
                    assert_eq!(got, *h, "keys of other endpoints stay");
                }
            }
            // Without a key: least request over the usable endpoints.
            assert!((0..100).all(|_| s.pick(&[], None) != Some(1)));
            let shares = s.hash_shares().unwrap();
            assert!(
                (shares.iter().sum::<f64>() - 1.0).abs() < 1e-6,
                "{shares:?}"
            );
        }
        // Bounded loads: the hot key's endpoint, once over its bound, is passed over.
        let s = set(
            &[1, 1, 1, 1],
            LbPolicy::RingHash(meshwire_mesh::HashLb {
                balance_factor: Some(1.25),
            }),
        );
        let k = hash::hash_key(b"hot");
        let home = s.pick(&[], Some(k)).unwrap();
        let mut guards = Vec::new();
        let mut at_home = 0;
        for _ in 0..40 {
            let i = s.pick(&[], Some(k)).unwrap();
            at_home += usize::from(i == home);
            guards.push(s.entries[i].endpoint.start_call());
            let total: usize = s.entries.iter().map(|e| e.endpoint.outstanding()).sum();
            let max = s
                .entries
                .iter()
                .map(|e| e.endpoint.outstanding())
                .max()
                .unwrap();
            assert!(
                max as f64 <= (1.25 * total as f64 / 4.0).ceil(),
                "{max} of {total}"
            );
        }
        assert!((10..40).contains(&at_home), "{at_home} of 40 at home");
    }

    /// Ejects endpoint `i` the way calls do: consecutive failures.
    fn eject(s: &EndpointSet, i: usize) {
        let e = &s.entries[i].endpoint;
        for _ in 0..5 {
            e.outlier
                .observe(&e.health, crate::outlier::Outcome::Status(14));
        }
        assert!(e.outlier.is_out());
    }

    /// Each zone's share of `calls` picks without a key (in 0..1).
    fn zone_split(s: &EndpointSet, calls: usize) -> std::collections::BTreeMap<String, f64> {
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..calls {
            let i = s.pick(&[], None).expect("an endpoint");
            let zone = s.entries[i].endpoint.zone.clone().unwrap_or_default();
            *counts.entry(zone).or_insert(0usize) += 1;
        }
        counts
            .into_iter()
            .map(|(z, n)| (z, n as f64 / calls as f64))
            .collect()
    }

    const ABC: [Option<&str>; 6] = [
        Some("a"),
        Some("a"),
        Some("b"),
        Some("b"),
        Some("c"),
        Some("c"),
    ];

    #[test]
    fn local_share_follows_the_healthy_fraction_over_the_threshold() {
        let z = ZoneRouting {
            enabled: true,
            min_healthy: 0.7,
        };
        // At or above the threshold: everything stays.
        assert_eq!(z.local_share(3, 3), 1.0);
        assert_eq!(z.local_share(7, 10), 1.0);
        // Below: healthy fraction / threshold (2/3 / 0.7, 1/3 / 0.7).
        assert!((z.local_share(2, 3) - 0.952_380).abs() < 1e-6);
        assert!((z.local_share(1, 3) - 0.476_190).abs() < 1e-6);
        assert_eq!(z.local_share(0, 3), 0.0, "none healthy: fail over");
        assert_eq!(z.local_share(0, 0), 0.0, "no local endpoints");
        let strict = ZoneRouting {
            enabled: true,
            min_healthy: 1.0,
        };
        assert!((strict.local_share(9, 10) - 0.9).abs() < 1e-9);
        let off = ZoneRouting {
            enabled: false,
            ..z
        };
        assert_eq!(off.local_share(3, 3), 0.0);
        assert!(
            ZoneRouting {
                min_healthy: 0.0,
                ..z
            }
            .validate()
            .is_err()
        );
        assert!(
            ZoneRouting {
                min_healthy: 1.01,
                ..z
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn zones_keep_calls_local_then_spill_in_proportion() {
        for lb in [LR, LbPolicy::RoundRobin] {
            let s = zoned(&ABC, &[1; 6], lb).with_zones("a", ZoneRouting::default(), 0);
            let split = zone_split(&s, 20_000);
            assert_eq!(split.get("a").copied(), Some(1.0), "all healthy: {split:?}");

            // One of two local endpoints out: 0.5 / 0.7 stays, recomputed on
            // the ejection (no new set).
            eject(&s, 0);
            let want = 0.5 / 0.7;
            assert!((s.zone_report().unwrap().local_share - want).abs() < 1e-6);
            let split = zone_split(&s, 20_000);
            assert!((split["a"] - want).abs() < 0.02, "{lb:?} {split:?}");
            // The rest goes to b and c by their healthy weight (equal here).
            for z in ["b", "c"] {
                assert!((split[z] - (1.0 - want) / 2.0).abs() < 0.02, "{split:?}");
            }
            let report = s.zone_report().unwrap();
            assert_eq!((report.healthy_weight, report.total_weight), (1, 2));
            assert!((report.spill[0].1 - (1.0 - want) / 2.0).abs() < 1e-6);

            // None healthy locally: everything fails over.
            eject(&s, 1);
            let split = zone_split(&s, 5_000);
            assert_eq!(split.get("a"), None, "{split:?}");
        }
    }

    #[test]
    fn spill_follows_the_other_zones_healthy_weight() {
        // b has weight 3 (one endpoint), c weight 1; a loses all.
        let zones = [Some("a"), Some("b"), Some("c")];
        let s = zoned(&zones, &[1, 3, 1], LR).with_zones("a", ZoneRouting::default(), 0);
        eject(&s, 0);
        let split = zone_split(&s, 20_000);
        assert!((split["b"] - 0.75).abs() < 0.02, "{split:?}");
    }

    #[test]
    fn unhealthy_endpoints_count_in_their_zones_capacity() {
        // Two healthy local endpoints, one the control plane reports
        // unhealthy (not in the set): 2/3 healthy.
        let s = zoned(&ABC, &[1; 6], LR).with_zones("a", ZoneRouting::default(), 1);
        let r = s.zone_report().unwrap();
        assert_eq!((r.healthy_weight, r.total_weight), (2, 3));
        assert!((r.local_share - (2.0 / 3.0) / 0.7).abs() < 1e-6);
        // All of the zone unhealthy: no local endpoint left in the set.
        let s = zoned(&ABC[2..], &[1; 4], LR).with_zones("a", ZoneRouting::default(), 2);
        assert_eq!(s.zone_report().unwrap().local_share, 0.0);
    }

    #[test]
    fn without_zones_calls_spread_as_before() {
        let cases = [
            // The sidecar's zone has no endpoints in this service.
            zoned(&ABC, &[1; 6], LR).with_zones("x", ZoneRouting::default(), 0),
            // Routing off for the service.
            zoned(&ABC, &[1; 6], LR).with_zones(
                "a",
                ZoneRouting {
                    enabled: false,
                    ..Default::default()
                },
                0,
            ),
            // Endpoints without zones.
            zoned(&[None; 6], &[1; 6], LR).with_zones("a", ZoneRouting::default(), 0),
            // Every endpoint local: nowhere to spill.
            zoned(&[Some("a"); 6], &[1; 6], LR).with_zones("a", ZoneRouting::default(), 0),
        ];
        for s in &cases {
            assert!(s.zone_report().is_none());
            let mut seen = [0usize; 6];
            for _ in 0..6_000 {
                seen[s.pick(&[], None).unwrap()] += 1;
            }
            assert!(seen.iter().all(|&n| n > 700), "{seen:?}");
        }
    }

    #[test]
    fn a_drawn_zone_with_nothing_usable_hands_the_call_over() {
        // Local endpoints excluded (already failed this call): the call goes
        // to another zone instead of failing.
        let s = zoned(&ABC, &[1; 6], LR).with_zones("a", ZoneRouting::default(), 0);
        for _ in 0..200 {
            let i = s.pick(&[0, 1], None).unwrap();
            assert!(i >= 2);
        }
        // Hashed calls ignore zones: a key's endpoint is the same everywhere.
        let ring = LbPolicy::RingHash(meshwire_mesh::HashLb::default());
        let s = zoned(&ABC, &[1; 6], ring).with_zones("a", ZoneRouting::default(), 0);
        let remote_keys = (0..200u64)
            .filter(|k| s.pick(&[], Some(hash::hash_key(&k.to_le_bytes()))).unwrap() >= 2)
            .count();
        assert!(remote_keys > 80, "{remote_keys} of 200 keys outside zone a");
        assert!((0..200).all(|_| s.pick(&[], None).unwrap() < 2));
    }

    #[test]
    fn draining_and_excluded_endpoints_get_nothing() {
        let mut s = set(&[1, 1, 1], LR);
        s.entries[1].draining = true;
        for _ in 0..1000 {
            let i = s.pick(&[2], None).unwrap();
            assert_eq!(i, 0);
        }
        assert_eq!(s.pick(&[0, 2], None), None);

        let mut w = set(&[3, 1, 1], LR);
        w.entries[0].draining = true;
        let picks: Vec<_> = (0..100).map(|_| w.pick(&[], None).unwrap()).collect();
        assert!(picks.iter().all(|&i| i != 0));
        assert!(picks.iter().filter(|&&i| i == 1).count() == 50);
    }
}
