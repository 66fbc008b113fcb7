//! Consistent hashing as Envoy does it: the ketama-style ring (`RING_HASH`) and the Maglev
//! lookup table (`MAGLEV`), both keyed by xxHash64 of the host's `ip:port` so that a request
//! hash lands on the same host as under Envoy, plus bounded loads (`hash_balance_factor`).
//! Tables are built on rebuild; a lookup is a binary search or one array read.

use std::fmt::Write as _;
use std::sync::Arc;

use xxhash_rust::xxh64::xxh64;

use crate::cluster::Host;

/// Envoy's `HashUtil::xxHash64` (seed 0).
#[inline]
pub fn xxhash64(bytes: &[u8]) -> u64 {
    xxh64(bytes, 0)
}

/// Which table to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    Ring { min_size: u64, max_size: u64 },
    Maglev { table_size: u64 },
}

/// A host list with its normalised weights and the lookup structure over it.
#[derive(Debug)]
pub struct HashTable {
    hosts: Box<[Arc<Host>]>,
    /// Normalised weights (sum 1), for bounded loads.
    weights: Box<[f64]>,
    lookup: Lookup,
    /// `hash_balance_factor` (percent, >= 100) when bounded loads are on.
    balance_factor: Option<u32>,
}

#[derive(Debug)]
enum Lookup {
    /// (hash, host index), sorted by hash.
    Ring(Box<[(u64, u32)]>),
    /// Host index per slot.
    Maglev(Box<[u32]>),
}

impl HashTable {
    /// `hosts` with their normalised weights (each > 0). `None` when there are no hosts.
    pub fn build(
        hosts: Vec<(Arc<Host>, f64)>,
        kind: HashKind,
        balance_factor: Option<u32>,
    ) -> Option<HashTable> {
        if hosts.is_empty() {
            return None;
        }
        let (hosts, weights): (Vec<_>, Vec<_>) = hosts.into_iter().unzip();
        let keys: Vec<String> = hosts.iter().map(|h| h.address.to_string()).collect();
        let lookup = match kind {
            HashKind::Ring { min_size, max_size } => {
                Lookup::Ring(ring(&keys, &weights, min_size, max_size))
            }
            HashKind::Maglev { table_size } => Lookup::Maglev(maglev(&keys, &weights, table_size)),
        };
        Some(HashTable {
            hosts: hosts.into_boxed_slice(),
            weights: weights.into_boxed_slice(),
            lookup,
            balance_factor,
        })
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The host index for `hash`; `attempt` > 0 moves to another host as Envoy's host
    /// selection retries do.
    #[inline]
    fn index(&self, hash: u64, attempt: u32) -> usize {
        match &self.lookup {
            Lookup::Ring(ring) => {
                // First entry at or after the hash, wrapping to the start (ketama).
                let i = ring.partition_point(|&(h, _)| h < hash);
                let i = if i == ring.len() { 0 } else { i };
                ring[(i + attempt as usize) % ring.len()].1 as usize
            }
            Lookup::Maglev(table) => {
                let h = if attempt > 0 {
                    hash ^ (!0u64).wrapping_sub(u64::from(attempt)).wrapping_add(1)
                } else {
                    hash
                };
                table[(h % table.len() as u64) as usize] as usize
            }
        }
    }

    /// Chooses a host for `hash`. With bounded loads (Envoy's
    /// `BoundedLoadHashingLoadBalancer`), a host holding more than its share of
    /// `hash_balance_factor` × (the cluster's active requests + 1) passes the request on: the
    /// other hosts are probed in an order shuffled by `std::mt19937` seeded with the hash (the
    /// same key always probes the same order), the first one within its share wins, else the
    /// least overloaded.
    #[inline]
    pub fn choose(&self, hash: u64, attempt: u32, cluster_active: u64) -> &Arc<Host> {
        let first = self.index(hash, attempt);
        let Some(factor) = self.balance_factor else {
            return &self.hosts[first];
        };
        let total_slots = (cluster_active.min(u64::from(u32::MAX)) + 1)
            .saturating_mul(u64::from(factor))
            .div_ceil(100);
        let overload = |i: usize| {
            let slots = ((total_slots as f64 * self.weights[i]).ceil() as u64).max(1);
            self.hosts[i].stats.rq_active.get().max(0) as f64 / slots as f64
        };
        let first_load = overload(first);
        if first_load <= 1.0 {
            return &self.hosts[first];
        }
        let n = self.hosts.len();
        let mut rng = Mt19937::new(hash as u32);
        let mut probe = |order: &mut Vec<u32>| {
            order.clear();
            order.extend(0..n as u32);
            let (mut best, mut best_load) = (first, first_load);
            for i in 0..n {
                let j = rng.below((n - i) as u32) as usize;
                order.swap(i, i + j);
                let k = order[i] as usize;
                if k == first {
                    continue;
                }
                let load = overload(k);
                if load <= 1.0 {
                    return k;
                }
                if load < best_load {
                    (best, best_load) = (k, load);
                }
            }
            best
        };
        // A per-thread scratch list keeps the overloaded path allocation-free too.
        let picked = PROBE_ORDER
            .try_with(|cell| match cell.try_borrow_mut() {
                Ok(mut order) => probe(&mut order),
                Err(_) => probe(&mut Vec::with_capacity(n)),
            })
            .unwrap_or(first);
        &self.hosts[picked]
    }
}

thread_local! {
    static PROBE_ORDER: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `std::mt19937` (32-bit Mersenne Twister), as Envoy's bounded loads use it.
struct Mt19937 {
    mt: [u32; 624],
    next: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Mt19937 {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, next: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            for i in 0..624 {
                let y = (self.mt[i] & 0x8000_0000) | (self.mt[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.mt[i] = v;
            }
            self.next = 0;
        }
        let mut y = self.mt[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Envoy's `uniform_int` in `[0, k)` (`k` > 0): a bucket of the 2^32 range, redrawn
    /// when it falls past `k`.
    fn below(&mut self, k: u32) -> u32 {
        let bucket = (1u64 << 32) / u64::from(k.max(1));
        loop {
            let x = u64::from(self.next_u32()) / bucket;
            if x < u64::from(k) {
                return x as u32;
            }
        }
    }
}

/// Envoy's `RingHashLoadBalancer::Ring`: the least-weighted host gets
/// ceil(min_weight × min_size) / min_weight entries' worth, capped at `max_size`; host entries
/// are `xxHash64("ip:port_i")`.
fn ring(keys: &[String], weights: &[f64], min_size: u64, max_size: u64) -> Box<[(u64, u32)]> {
    let min_w = weights.iter().copied().fold(f64::INFINITY, f64::min);
    let scale = ((min_w * min_size as f64).ceil() / min_w).min(max_size as f64);
    let size = scale.ceil() as usize;
    let mut ring = Vec::with_capacity(size);
    let mut buf = String::with_capacity(64);
    let mut current = 0.0f64;
    let mut target = 0.0f64;
    for (idx, (key, &w)) in keys.iter().zip(weights).enumerate() {
        target += scale * w;
        let mut i = 0u64;
        while current < target {
            buf.clear();
            buf.push_str(key);
            buf.push('_');
            let _ = write!(buf, "{i}");
            ring.push((xxhash64(buf.as_bytes()), idx as u32));
            i += 1;
            current += 1.0;
        }
    }
    ring.sort_by_key(|&(h, _)| h);
    ring.into_boxed_slice()
}

/// Envoy's `OriginalMaglevTable`: each host fills slots along its permutation
/// (offset = xxHash64(key) mod M, skip = xxHash64(key, seed 1) mod (M − 1) + 1), taking turns
/// in proportion to its weight.
fn maglev(keys: &[String], weights: &[f64], table_size: u64) -> Box<[u32]> {
    const EMPTY: u32 = u32::MAX;
    let m = table_size.max(2);
    let max_w = weights.iter().copied().fold(0.0f64, f64::max);
    struct Build {
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    let mut entries: Vec<Build> = keys
        .iter()
        .zip(weights)
        .map(|(k, &w)| Build {
            offset: xxh64(k.as_bytes(), 0) % m,
            skip: xxh64(k.as_bytes(), 1) % (m - 1) + 1,
            weight: w,
            target: 0.0,
            next: 0,
        })
        .collect();
    let mut table = vec![EMPTY; m as usize];
    let mut filled = 0u64;
    let mut iteration = 1u64;
    while filled < m {
        for (i, e) in entries.iter_mut().enumerate() {
            if filled >= m {
                break;
            }
            if (iteration as f64) * e.weight < e.target {
                continue;
            }
            e.target += max_w;
            let mut c = (e.offset + e.skip * e.next) % m;
            while table[c as usize] != EMPTY {
                e.next += 1;
                c = (e.offset + e.skip * e.next) % m;
            }
            table[c as usize] = i as u32;
            e.next += 1;
            filled += 1;
        }
        iteration += 1;
    }
    table.into_boxed_slice()
}

/// Normalised weights as Envoy's hashing LBs compute them: host weight / sum, or with locality
/// weights, locality weight / sum of locality weights × host weight / sum within the locality
/// (zero-weight localities dropped).
pub fn normalize(groups: &[(u32, Vec<Arc<Host>>)], use_locality: bool) -> Vec<(Arc<Host>, f64)> {
    let mut out = Vec::new();
    if use_locality {
        let lsum: u64 = groups.iter().map(|(w, _)| u64::from(*w)).sum();
        if lsum == 0 {
            return out;
        }
        for (lw, hosts) in groups {
            if *lw == 0 {
                continue;
            }
            let hsum: u64 = hosts.iter().map(|h| u64::from(h.weight)).sum();
            for h in hosts {
                let w = f64::from(h.weight) * (f64::from(*lw) / lsum as f64) / hsum as f64;
                out.push((h.clone(), w));
            }
        }
    } else {
        let hsum: u64 = groups
            .iter()
            .flat_map(|(_, hs)| hs.iter())
            .map(|h| u64::from(h.weight))
            .sum();
        for h in groups.iter().flat_map(|(_, hs)| hs.iter()) {
            out.push((h.clone(), f64::from(h.weight) / hsum as f64));
        }
    }
    out
}

/// Envoy's rule for combining route hash policies: rotate the hash so far left by one, XOR the
/// new one (so duplicate policies do not cancel).
#[inline]
pub fn combine(acc: Option<u64>, new: u64) -> u64 {
    match acc {
        Some(h) => h.rotate_left(1) ^ new,
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::Mt19937;

    #[test]
    fn mt19937_matches_the_cpp_standard() {
        // [rand.predef]: the 10000th output of a default-constructed std::mt19937 (seed 5489).
        let mut r = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = r.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
        let mut r = Mt19937::new(1);
        assert!((0..1000).all(|_| r.below(7) < 7));
    }
}
