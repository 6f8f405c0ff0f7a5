//! Consistent hashing: a call's hash key → an endpoint, the same on every
//! sidecar and across restarts.
//!
//! Both tables are pure functions of the endpoint *set* (addresses and
//! weights), never of the order endpoints arrived in: points and
//! permutations come from `xxh64` of the address (`ip:port`, with `_N`
//! suffixes for ring points as Envoy and gRPC's `ring_hash` do), and the
//! Maglev fill runs over endpoints sorted by address (envoy#20703 is the
//! order-dependent alternative).
//!
//! - **Ring hash**: `weight × points_per_weight` points per endpoint. The
//!   number of points an endpoint gets never depends on the other endpoints
//!   (Envoy scales points by the smallest normalised weight, so adding one
//!   endpoint re-cuts every arc, envoy#22558). Removing an endpoint therefore
//!   moves exactly its own keys, each to the next point clockwise, and adding
//!   one takes only keys from its neighbours. Lookup is a binary search.
//! - **Maglev** (Eisenbud et al., NSDI 2016): a prime-sized lookup table
//!   filled by each endpoint's permutation of slots, turns taken in
//!   proportion to weight. Lookup is O(1) and shares follow weights almost
//!   exactly, but removing an endpoint also re-fills a few slots of others
//!   (the paper's "minimal disruption", not zero disruption): use ring hash
//!   when that matters.
//!
//! Picking walks from the key's position (the next points of the ring, the
//! next slots of the table) until `accept` takes an endpoint, so an unusable
//! endpoint's keys go to its successor and everyone else's stay put.
//! [`BoundedLoad`] turns that walk into consistent hashing with bounded
//! loads (Mirrokni, Thorup, Zadimoghaddam 2018; Envoy's
//! `hash_balance_factor`): an endpoint already carrying its share × factor of
//! the calls in flight is passed over, so a hot key spills to the next
//! endpoints instead of piling onto one.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};
use meshwire_mesh::HashSource;
use xxhash_rust::xxh64::xxh64;

/// Ring points per unit of weight by default: enough that shares follow
/// weights within a few percent (an endpoint's share is a sum of `k` random
/// arcs, off by about `1/√k`).
pub const DEFAULT_POINTS_PER_WEIGHT: u32 = 4096;
/// Most points one ring holds (12 bytes each); above it every endpoint gets
/// proportionally fewer points.
pub const MAX_RING_POINTS: u64 = 1 << 22;
/// Envoy's and gRPC's default Maglev table size (a prime).
pub const DEFAULT_MAGLEV_SIZE: u64 = 65_537;

/// A call's hash key from its header value, cookie or source IP: `xxh64`
/// with seed 0, as Envoy hashes `hash_policy` values.
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

/// A call's hash key, and the cookie to set on its response when the key
/// is a new session cookie.
#[derive(Debug, Default)]
pub struct CallKey {
    pub key: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

/// The call's key from the first of `sources` present in it. When none is
/// and the call is plain HTTP, the first cookie source's cookie is made
/// (random value) and returned for the response. No key: least request.
pub fn call_key(
    sources: &[HashSource],
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    grpc: bool,
) -> CallKey {
    let found = |key: u64| CallKey {
        key: Some(key),
        set_cookie: None,
    };
    for s in sources {
        match s {
            HashSource::Header(name) => {
                if let Some(v) = headers.get(name.as_str()) {
                    return found(hash_key(v.as_bytes()));
                }
            }
            HashSource::SourceIp => match peer {
                Some(IpAddr::V4(ip)) => return found(hash_key(&ip.octets())),
                Some(IpAddr::V6(ip)) => return found(hash_key(&ip.octets())),
                None => {}
            },
            HashSource::Cookie { name, .. } => {
                if let Some(v) = cookie(headers, name) {
                    return found(hash_key(v.as_bytes()));
                }
            }
        }
    }
    if grpc {
        return CallKey::default();
    }
    let Some((name, ttl)) = sources.iter().find_map(|s| match s {
        HashSource::Cookie { name, ttl } => Some((name, ttl)),
        _ => None,
    }) else {
        return CallKey::default();
    };
    let value = format!("{:016x}", fastrand::u64(..));
    let mut header = format!("{name}={value}; Path=/; HttpOnly");
    if let Some(t) = ttl {
        use std::fmt::Write;
        let _ = write!(header, "; Max-Age={}", t.as_secs());
    }
    CallKey {
        key: Some(hash_key(value.as_bytes())),
        // Names are validated tokens and the value is hex.
        set_cookie: HeaderValue::from_str(&header).ok(),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// The consistent-hash table of one endpoint set. Indexes are positions in
/// the slice it was built from.
#[derive(Debug, Clone)]
pub struct HashTable {
    table: Table,
    endpoints: usize,
}

#[derive(Debug, Clone)]
enum Table {
    Ring {
        /// Sorted point hashes; `owners[i]` owns the arc ending at `hashes[i]`.
        hashes: Vec<u64>,
        owners: Vec<u32>,
    },
    Maglev {
        slots: Vec<u32>,
    },
}

impl HashTable {
    /// A ring over `endpoints` (address, weight). Ties between equal point
    /// hashes go to the lower address, so even collisions are order-free.
    pub fn ring(endpoints: &[(SocketAddr, u32)], points_per_weight: u32) -> Self {
        let total: u64 = endpoints.iter().map(|&(_, w)| u64::from(w)).sum();
        let mut per_weight = u64::from(points_per_weight.max(1));
        if total * per_weight > MAX_RING_POINTS {
            per_weight = (MAX_RING_POINTS / total.max(1)).max(1);
        }
        let mut points: Vec<(u64, SocketAddr, u32)> =
            Vec::with_capacity((total * per_weight) as usize);
        let mut key = String::with_capacity(64);
        for (i, &(addr, w)) in endpoints.iter().enumerate() {
            for n in 0..u64::from(w) * per_weight {
                key.clear();
                use std::fmt::Write;
                let _ = write!(key, "{addr}_{n}");
                points.push((hash_key(key.as_bytes()), addr, i as u32));
            }
        }
        points.sort_unstable_by_key(|p| (p.0, p.1));
        Self {
            table: Table::Ring {
                hashes: points.iter().map(|p| p.0).collect(),
                owners: points.iter().map(|p| p.2).collect(),
            },
            endpoints: endpoints.len(),
        }
    }

    /// A Maglev table over `endpoints` (address, weight) with `size` slots
    /// (made prime and larger than the endpoint count).
    pub fn maglev(endpoints: &[(SocketAddr, u32)], size: u64) -> Self {
        let n = endpoints.len() as u64;
        if n == 0 {
            return Self {
                table: Table::Maglev { slots: Vec::new() },
                endpoints: 0,
            };
        }
        let m = next_prime(size.max(n * 10));
        // Fill order by address, so arrival order cannot change the table.
        let mut order: Vec<usize> = (0..endpoints.len()).collect();
        order.sort_unstable_by_key(|&i| endpoints[i].0);
        struct Build {
            index: u32,
            offset: u64,
            skip: u64,
            next: u64,
            weight: u64,
            /// Turns taken so far × the largest weight: an endpoint of weight
            /// `w` takes a turn in round `r` while `r × w ≥ target`.
            target: u64,
        }
        let max_weight = endpoints.iter().map(|e| u64::from(e.1)).max().unwrap_or(1);
        let mut build: Vec<Build> = order
            .iter()
            .map(|&i| {
                let a = endpoints[i].0.to_string();
                Build {
                    index: i as u32,
                    offset: xxh64(a.as_bytes(), 0) % m,
                    skip: xxh64(a.as_bytes(), 1) % (m - 1) + 1,
                    next: 0,
                    weight: u64::from(endpoints[i].1),
                    target: 0,
                }
            })
            .collect();
        let mut slots = vec![u32::MAX; m as usize];
        let mut filled = 0u64;
        let mut round = 1u64;
        while filled < m {
            for b in &mut build {
                if filled == m {
                    break;
                }
                if round * b.weight < b.target {
                    continue;
                }
                b.target += max_weight;
                loop {
                    // (offset + next × skip) mod m, without overflow.
                    let c = ((u128::from(b.offset) + u128::from(b.next) * u128::from(b.skip))
                        % u128::from(m)) as usize;
                    b.next += 1;
                    if slots[c] == u32::MAX {
                        slots[c] = b.index;
                        filled += 1;
                        break;
                    }
                }
            }
            round += 1;
        }
        Self {
            table: Table::Maglev { slots },
            endpoints: endpoints.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints == 0
    }

    /// The key's owner when every endpoint is usable.
    pub fn owner(&self, key: u64) -> Option<usize> {
        self.pick(key, |_| true)
    }

    /// Walks from `key`'s position and returns the first endpoint `accept`
    /// takes; `None` when it takes none. Each endpoint is offered at most a
    /// few times in a row, and the walk ends once every endpoint was refused.
    pub fn pick(&self, key: u64, mut accept: impl FnMut(usize) -> bool) -> Option<usize> {
        let (len, start) = match &self.table {
            Table::Ring { hashes, .. } => (hashes.len(), hashes.partition_point(|&h| h < key)),
            Table::Maglev { slots } => (slots.len(), (key % slots.len().max(1) as u64) as usize),
        };
        if len == 0 {
            return None;
        }
        let owner_at = |j: usize| -> usize {
            match &self.table {
                Table::Ring { owners, .. } => owners[j] as usize,
                Table::Maglev { slots } => slots[j] as usize,
            }
        };
        let mut refused = Refused::default();
        let mut last = usize::MAX;
        for step in 0..len {
            let i = owner_at((start + step) % len);
            if i == last {
                continue;
            }
            last = i;
            if refused.contains(i) {
                continue;
            }
            if accept(i) {
                return Some(i);
            }
            refused.insert(i);
            if refused.count == self.endpoints {
                return None;
            }
        }
        None
    }

    /// Each endpoint's share of the key space (0..=1), for `/clusters`.
    pub fn shares(&self, endpoints: usize) -> Vec<f64> {
        let mut share = vec![0.0; endpoints];
        match &self.table {
            Table::Ring { hashes, owners } => {
                let Some(&last) = hashes.last() else {
                    return share;
                };
                // Arc (prev, h] belongs to h's owner; the first arc wraps.
                let mut prev = last;
                for (h, &o) in hashes.iter().zip(owners) {
                    let arc = h.wrapping_sub(prev);
                    share[o as usize] += arc as f64 / 2f64.powi(64);
                    prev = *h;
                }
                if hashes.len() == 1 || hashes.iter().all(|&h| h == last) {
                    share[owners[0] as usize] = 1.0;
                }
            }
            Table::Maglev { slots } => {
                for &s in slots {
                    share[s as usize] += 1.0 / slots.len() as f64;
                }
            }
        }
        share
    }
}

/// Endpoints refused during one walk: a few inline, a bitset only for long
/// walks (so the usual pick allocates nothing).
#[derive(Default)]
struct Refused {
    inline: [usize; 8],
    count: usize,
    bits: Vec<u64>,
}

impl Refused {
    fn contains(&self, i: usize) -> bool {
        if self.count <= self.inline.len() {
            self.inline[..self.count].contains(&i)
        } else {
            self.bits
                .get(i / 64)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        }
    }

    fn insert(&mut self, i: usize) {
        if self.count < self.inline.len() {
            self.inline[self.count] = i;
        } else {
            if self.count == self.inline.len() {
                let inline = self.inline;
                for j in inline {
                    self.set_bit(j);
                }
            }
            self.set_bit(i);
        }
        self.count += 1;
    }

    fn set_bit(&mut self, i: usize) {
        if self.bits.len() <= i / 64 {
            self.bits.resize(i / 64 + 1, 0);
        }
        self.bits[i / 64] |= 1 << (i % 64);
    }
}

/// Bounded loads: an endpoint takes a call only while its calls in flight
/// stay within `factor ×` its weighted share of all calls in flight
/// (counting this one).
#[derive(Debug, Clone, Copy)]
pub struct BoundedLoad {
    pub factor: f64,
    /// Calls in flight on the set, before this one.
    pub total_in_flight: usize,
    /// Sum of the usable endpoints' weights.
    pub total_weight: u64,
}

impl BoundedLoad {
    /// Whether an endpoint of `weight` with `in_flight` calls may take one more.
    pub fn admits(&self, weight: u32, in_flight: usize) -> bool {
        let share =
            (self.total_in_flight + 1) as f64 * f64::from(weight) / self.total_weight.max(1) as f64;
        ((in_flight + 1) as f64) <= (self.factor * share).ceil()
    }
}

fn next_prime(mut n: u64) -> u64 {
    fn is_prime(n: u64) -> bool {
        if n < 2 {
            return false;
        }
        let mut d = 2;
        while d * d <= n {
            if n.is_multiple_of(d) {
                return false;
            }
            d += 1;
        }
        true
    }
    while !is_prime(n) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    //! Properties over 100k keys. Addresses are fixed, keys are `key-<n>`,
    //! so every run checks the same tables; the bounds come from the issue,
    //! not from what these tables happen to do.

    use super::*;

    const KEYS: u64 = 100_000;

    fn eps(n: usize) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| {
                (
                    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 15006)),
                    1,
                )
            })
            .collect()
    }

    fn build(kind: &str, e: &[(SocketAddr, u32)]) -> HashTable {
        match kind {
            "ring" => HashTable::ring(e, DEFAULT_POINTS_PER_WEIGHT),
            _ => HashTable::maglev(e, DEFAULT_MAGLEV_SIZE),
        }
    }

    fn key(n: u64) -> u64 {
        hash_key(format!("key-{n}").as_bytes())
    }

    /// Each key's endpoint, by address.
    fn assign(t: &HashTable, e: &[(SocketAddr, u32)]) -> Vec<SocketAddr> {
        (0..KEYS).map(|k| e[t.owner(key(k)).unwrap()].0).collect()
    }

    #[test]
    fn same_key_same_endpoint_while_the_set_is_unchanged() {
        for kind in ["ring", "maglev"] {
            let e = eps(10);
            let t = build(kind, &e);
            let a = assign(&t, &e);
            assert_eq!(a, assign(&t, &e), "{kind}");
            // A rebuild from the same set (a restart, another sidecar).
            assert_eq!(a, assign(&build(kind, &e), &e), "{kind}");
            // Every endpoint gets keys.
            for ep in &e {
                assert!(a.contains(&ep.0), "{kind}: {} got no key", ep.0);
            }
        }
    }

    #[test]
    fn the_table_is_identical_whatever_order_endpoints_arrive_in() {
        for kind in ["ring", "maglev"] {
            let e = eps(12);
            let want = assign(&build(kind, &e), &e);
            let mut shuffled = e.clone();
            let mut rng = fastrand::Rng::with_seed(3);
            for _ in 0..5 {
                rng.shuffle(&mut shuffled);
                assert_eq!(
                    assign(&build(kind, &shuffled), &shuffled),
                    want,
                    "{kind}: order {shuffled:?}"
                );
            }
        }
    }

    #[test]
    fn ring_removing_one_endpoint_moves_only_its_keys() {
        let e = eps(10);
        let before = assign(&build("ring", &e), &e);
        for gone in [0, 4, 9] {
            let mut rest = e.clone();
            let removed = rest.remove(gone).0;
            let after = assign(&build("ring", &rest), &rest);
            let mut moved_own = 0;
            for (b, a) in before.iter().zip(&after) {
                if *b == removed {
                    moved_own += 1;
                } else {
                    assert_eq!(b, a, "a key of {b} moved when {removed} left");
                }
            }
            assert!(moved_own > 0);
        }
    }

    #[test]
    fn ring_adding_one_endpoint_moves_at_most_its_fair_share() {
        for n in [3, 10, 50] {
            let e = eps(n + 1);
            let old = &e[..n];
            let before = assign(&build("ring", old), old);
            let after = assign(&build("ring", &e), &e);
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
            let bound = KEYS as f64 / (n + 1) as f64 * 1.1;
            assert!(
                (moved as f64) <= bound,
                "n={n}: {moved} moved, bound {bound:.0}"
            );
            // Every moved key went to the new endpoint.
            for (b, a) in before.iter().zip(&after) {
                assert!(b == a || *a == e[n].0);
            }
        }
    }

    /// Keys that changed endpoint between two sets: (to or from the endpoint
    /// that came or went, between endpoints in both sets).
    fn maglev_moves(from: &[(SocketAddr, u32)], to: &[(SocketAddr, u32)]) -> (usize, usize) {
        let before = assign(&build("maglev", from), from);
        let after = assign(&build("maglev", to), to);
        let in_both =
            |a: &SocketAddr| from.iter().any(|x| x.0 == *a) && to.iter().any(|x| x.0 == *a);
        let (mut own, mut others) = (0, 0);
        for (b, a) in before.iter().zip(&after) {
            if b == a {
                continue;
            }
            if in_both(b) && in_both(a) {
                others += 1;
            } else {
                own += 1;
            }
        }
        (own, others)
    }

    /// Maglev re-fills a few slots of untouched endpoints when the set
    /// changes (the paper's minimal disruption, not zero as on the ring).
    #[test]
    fn maglev_set_changes_move_few_keys_of_untouched_endpoints() {
        for n in [3, 10, 50] {
            let e = eps(n + 1);
            let (lost, removed_others) = maglev_moves(&e, &e[..n]);
            assert!(lost > 0);
            let (gained, added_others) = maglev_moves(&e[..n], &e);
            let bound = KEYS as f64 / (n + 1) as f64 * 1.1;
            assert!(
                (gained as f64) <= bound,
                "n={n}: the new endpoint took {gained}, bound {bound:.0}"
            );
            for (what, moved) in [("remove", removed_others), ("add", added_others)] {
                assert!(
                    (moved as f64) < 0.01 * KEYS as f64,
                    "n={n} {what}: {moved} keys moved between untouched endpoints"
                );
            }
        }
    }

    #[test]
    fn weights_scale_shares_within_five_percent() {
        for kind in ["ring", "maglev"] {
            let mut e = eps(4);
            for (i, w) in [1, 2, 3, 4].into_iter().enumerate() {
                e[i].1 = w;
            }
            let a = assign(&build(kind, &e), &e);
            for (addr, w) in &e {
                let got = a.iter().filter(|x| *x == addr).count() as f64 / KEYS as f64;
                let want = f64::from(*w) / 10.0;
                assert!(
                    (got / want - 1.0).abs() <= 0.05,
                    "{kind}: weight {w} got {got:.4}, want {want:.4}"
                );
            }
            let shares = build(kind, &e).shares(e.len());
            for (s, (_, w)) in shares.iter().zip(&e) {
                assert!(
                    (s / (f64::from(*w) / 10.0) - 1.0).abs() <= 0.05,
                    "{shares:?}"
                );
            }
        }
    }

    #[test]
    fn unusable_endpoints_are_skipped_and_their_keys_go_to_the_successor() {
        for kind in ["ring", "maglev"] {
            let e = eps(8);
            let t = build(kind, &e);
            let owners: Vec<usize> = (0..KEYS).map(|k| t.owner(key(k)).unwrap()).collect();
            let down = [2usize, 5];
            let mut moved_to: std::collections::HashMap<usize, usize> = Default::default();
            for (k, &o) in owners.iter().enumerate() {
                let got = t.pick(key(k as u64), |i| !down.contains(&i)).unwrap();
                if down.contains(&o) {
                    assert!(!down.contains(&got));
                    // The successor: the first usable endpoint of the walk.
                    let mut walk = Vec::new();
                    t.pick(key(k as u64), |i| {
                        walk.push(i);
                        false
                    });
                    let want = *walk.iter().find(|i| !down.contains(i)).unwrap();
                    assert_eq!(got, want, "{kind} key {k}");
                    *moved_to.entry(got).or_default() += 1;
                } else {
                    assert_eq!(got, o, "{kind}: key {k} of a usable endpoint moved");
                }
            }
            // The keys spread over several successors, not one.
            assert!(moved_to.len() >= 3, "{kind}: {moved_to:?}");
            if kind == "ring" {
                // On the ring, skipping is exactly removing.
                let rest: Vec<_> = e
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !down.contains(i))
                    .map(|(_, x)| *x)
                    .collect();
                let removed = assign(&build(kind, &rest), &rest);
                for (k, want) in removed.iter().enumerate() {
                    let got = t.pick(key(k as u64), |i| !down.contains(&i)).unwrap();
                    assert_eq!(e[got].0, *want);
                }
            }
            assert_eq!(t.pick(key(1), |_| false), None, "nothing usable");
        }
    }

    /// Keys drawn from a Zipf(1.1) distribution over 10k keys: key 0 alone
    /// is about 15 % of all calls, more than any endpoint's bounded share.
    struct Zipf {
        cdf: Vec<f64>,
    }

    impl Zipf {
        fn new(n: usize, s: f64) -> Self {
            let mut acc = 0.0;
            let mut cdf: Vec<f64> = (1..=n)
                .map(|k| {
                    acc += 1.0 / (k as f64).powf(s);
                    acc
                })
                .collect();
            for c in &mut cdf {
                *c /= acc;
            }
            Self { cdf }
        }

        fn sample(&self, rng: &mut fastrand::Rng) -> u64 {
            let u = rng.f64();
            self.cdf.partition_point(|&c| c < u) as u64
        }
    }

    #[test]
    fn bounded_load_caps_every_endpoint_even_with_a_zipf_hot_key() {
        let factor = 1.25;
        for kind in ["ring", "maglev"] {
            let e = eps(10);
            let t = build(kind, &e);
            let zipf = Zipf::new(10_000, 1.1);
            let mut rng = fastrand::Rng::with_seed(11);
            let mut in_flight = vec![0usize; e.len()];
            // Closed loop: 200 calls in flight; each step one finishes (a
            // random one) and a new one starts.
            let mut calls: Vec<(usize, u64)> = Vec::new();
            let mut diverted = 0usize;
            let mut worst = 0.0f64;
            let total_w: u64 = e.iter().map(|x| u64::from(x.1)).sum();
            for step in 0..KEYS as usize {
                if calls.len() == 200 {
                    let (i, _) = calls.swap_remove(rng.usize(..calls.len()));
                    in_flight[i] -= 1;
                }
                let k = key(zipf.sample(&mut rng));
                let bound = BoundedLoad {
                    factor,
                    total_in_flight: calls.len(),
                    total_weight: total_w,
                };
                let i = t
                    .pick(k, |i| bound.admits(e[i].1, in_flight[i]))
                    .expect("some endpoint is always under the bound");
                if Some(i) != t.owner(k) {
                    diverted += 1;
                }
                in_flight[i] += 1;
                calls.push((i, k));
                // The bound holds when a call is placed, counting it.
                let avg = calls.len() as f64 / e.len() as f64;
                let load = in_flight[i] as f64;
                assert!(
                    load <= (factor * avg).ceil(),
                    "{kind} step {step}: {in_flight:?} over {factor} × {avg}"
                );
                if calls.len() == 200 {
                    worst = worst.max(*in_flight.iter().max().unwrap() as f64 / avg);
                }
            }
            // Keys move as little as possible: most calls still reach the owner.
            assert!(
                diverted < KEYS as usize / 2,
                "{kind}: {diverted} of {KEYS} calls diverted"
            );
            // Without the bound the hot key's owner carries far more.
            let mut plain = vec![0usize; e.len()];
            let mut rng = fastrand::Rng::with_seed(11);
            for _ in 0..10_000 {
                plain[t.owner(key(zipf.sample(&mut rng))).unwrap()] += 1;
            }
            let max = *plain.iter().max().unwrap() as f64;
            assert!(
                max / 1000.0 > 1.5,
                "{kind}: the workload is not skewed: {plain:?}"
            );
            assert!(worst <= factor + 0.1, "{kind}: worst ratio {worst}");
        }
    }

    #[test]
    fn bounded_load_with_no_load_keeps_every_key_home() {
        let e = eps(5);
        let t = build("ring", &e);
        let bound = BoundedLoad {
            factor: 1.25,
            total_in_flight: 0,
            total_weight: 5,
        };
        for k in 0..10_000 {
            assert_eq!(t.pick(key(k), |i| bound.admits(e[i].1, 0)), t.owner(key(k)));
        }
    }

    #[test]
    fn call_keys_come_from_the_first_source_present() {
        let sources = vec![
            HashSource::Header("x-user".into()),
            HashSource::Cookie {
                name: "sticky".into(),
                ttl: Some(std::time::Duration::from_secs(60)),
            },
            HashSource::SourceIp,
        ];
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.insert("cookie", HeaderValue::from_static("a=1; sticky=abc"));
        let k = call_key(&sources, &h, Some(ip), true);
        assert_eq!(k.key, Some(hash_key(b"alice")));
        h.remove("x-user");
        assert_eq!(
            call_key(&sources, &h, Some(ip), true).key,
            Some(hash_key(b"abc"))
        );
        h.remove("cookie");
        assert_eq!(
            call_key(&sources, &h, Some(ip), true).key,
            Some(hash_key(&[10, 1, 2, 3]))
        );
        // Nothing present: gRPC callers get least request...
        let cookie_only = &sources[1..2];
        let k = call_key(cookie_only, &h, Some(ip), true);
        assert!(k.key.is_none() && k.set_cookie.is_none());
        // ...HTTP callers a new cookie, whose value is the key from then on.
        let k = call_key(cookie_only, &h, None, false);
        let set = k.set_cookie.unwrap();
        let set = set.to_str().unwrap();
        assert!(
            set.starts_with("sticky=") && set.ends_with("; Max-Age=60"),
            "{set}"
        );
        let value = set["sticky=".len()..].split(';').next().unwrap();
        h.insert(
            "cookie",
            HeaderValue::from_str(&format!("sticky={value}")).unwrap(),
        );
        let again = call_key(cookie_only, &h, None, false);
        assert_eq!(again.key, k.key);
        assert!(again.set_cookie.is_none());
        assert!(call_key(&[], &h, Some(ip), false).key.is_none());
    }

    #[test]
    fn tables_of_ten_thousand_endpoints_build() {
        let e = eps(10_000);
        for kind in ["ring", "maglev"] {
            let t = build(kind, &e);
            let shares = t.shares(e.len());
            assert!(
                shares.iter().all(|&s| s > 0.0),
                "{kind}: an endpoint has no share"
            );
            assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }
}
