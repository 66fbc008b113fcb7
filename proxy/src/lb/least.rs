//! Envoy's LEAST_REQUEST: with equal host weights, the fewest active requests among
//! `choice_count` hosts drawn at random (P2C); with unequal weights, an EDF schedule over
//! weight / (active + 1)^active_request_bias, each host's weight taken when it is (re)queued.
//! Envoy keeps that schedule per worker; so does Strait (per thread), so a pick takes no lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::cluster::Host;
use crate::lb::schedule::{self, Edf};

/// Envoy's `LeastRequestLoadBalancer::hostWeight` (pending requests are not counted: the
/// `least_request_lb_count_pending_requests` guard is off by default).
#[inline]
pub fn host_weight(host: &Host, bias: f64) -> f64 {
    let w = f64::from(host.weight);
    let active = host.stats.rq_active.get().max(0) as f64 + 1.0;
    if bias == 1.0 {
        w / active
    } else if bias != 0.0 {
        w / active.powf(bias)
    } else {
        w
    }
}

/// Envoy's `unweightedHostPickNChoices`: `choice_count` uniform draws (with replacement); a
/// later draw replaces the candidate only with strictly fewer active requests.
#[inline]
pub fn p2c(hosts: &[Arc<Host>], choice_count: u32) -> Option<&Arc<Host>> {
    let n = hosts.len();
    if n == 0 {
        return None;
    }
    let active = |h: &Host| h.stats.rq_active.get();
    let mut best = &hosts[fastrand::usize(..n)];
    for _ in 1..choice_count.max(1) {
        let c = &hosts[fastrand::usize(..n)];
        if active(c) < active(best) {
            best = c;
        }
    }
    Some(best)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Hashes the sequential scheduler ids with one multiply (SipHash would be a third of a pick).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Schedulers = HashMap<u64, (Weak<()>, Edf), BuildHasherDefault<IdHasher>>;

thread_local! {
    /// This thread's schedulers, by [`Weighted::id`], with a liveness token of their bucket.
    static SCHEDULERS: RefCell<Schedulers> = RefCell::new(Schedulers::default());
}

/// The weighted schedule of one bucket: the starting state is built on rebuild (Envoy's
/// `createWithPicks` with a random seed, weights from the active requests of that moment);
/// each thread copies it on its first pick and then runs its own.
#[derive(Debug)]
pub struct Weighted {
    id: u64,
    alive: Arc<()>,
    start: Edf,
    /// Prefix sums of host weights, for the (never expected) case that the thread's schedule
    /// cannot be reached (thread teardown).
    cum: Box<[u64]>,
}

impl Weighted {
    /// `None` when Envoy would not build an EDF: fewer than two hosts, or equal weights.
    pub fn new(hosts: &[Arc<Host>], bias: f64) -> Option<Weighted> {
        if hosts.len() < 2 || hosts.windows(2).all(|p| p[0].weight == p[1].weight) {
            return None;
        }
        let weights: Vec<f64> = hosts.iter().map(|h| host_weight(h, bias)).collect();
        Some(Weighted {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            start: Edf::with_picks(&weights, fastrand::u32(..)),
            cum: schedule::prefix_sums(hosts.iter().map(|h| u64::from(h.weight.max(1)))),
        })
    }

    /// The next host of this thread's schedule (an index into `hosts`, the bucket's hosts).
    #[inline]
    pub fn pick(&self, hosts: &[Arc<Host>], bias: f64) -> usize {
        let weight = |i: usize| hosts.get(i).map_or(1.0, |h| host_weight(h, bias));
        let picked = SCHEDULERS.try_with(|cell| {
            let Ok(mut map) = cell.try_borrow_mut() else {
                return None;
            };
            if !map.contains_key(&self.id) {
                // Schedules of buckets a rebuild replaced go when a new one comes in.
                map.retain(|_, (alive, _)| alive.strong_count() > 0);
                map.insert(self.id, (Arc::downgrade(&self.alive), self.start.clone()));
            }
            map.get_mut(&self.id)?.1.pick_and_add(weight)
        });
        match picked {
            Ok(Some(i)) if i < hosts.len() => i,
            _ => schedule::weighted_draw(&self.cum, fastrand::u64(..)),
        }
    }
}
