//! Load balancing with Envoy's semantics: priority levels with spill-over and panic, degraded
//! and excluded hosts, locality-weighted and zone-aware routing, and the policies (weighted round
//! robin by EDF, least request (P2C, or EDF over active requests), random, ring hash, maglev).
//!
//! [`LbState`] is built off the request path whenever hosts, health or the local cluster change
//! and is published through an `ArcSwap`; [`LbState::pick`] never locks and allocates only once
//! per thread and rebuild, for a weighted least-request bucket's schedule (see [`least`]).

pub mod hash;
pub mod least;
pub mod priority;
pub mod schedule;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use strait_xds::model::{self, LbPolicy, Locality};

use crate::cluster::Host;
use crate::stats::ClusterStats;
use hash::{HashKind, HashTable};
use priority::{Availability, PriorityCounts, PriorityLoad, PriorityPlan};
use schedule::Wrr;

/// How load balancing treats a host at the moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbHealth {
    Healthy,
    Degraded,
    Unhealthy,
    /// Counted nowhere (EDS DRAINING, pending its first active check, or excluded by
    /// `x-envoy-immediate-health-check-fail`): not in the health ratios, only picked in panic.
    Excluded,
}

/// What one pick may carry besides the cluster: the route's hash, a retry's priority-load
/// override (`previous_priorities`), and a host predicate (`previous_hosts`).
#[derive(Clone, Copy, Default)]
pub struct LbContext<'a> {
    /// From the route's `hash_policy`; hashing policies pick at random without one.
    pub hash: Option<u64>,
    /// Replaces the cluster's priority load for this pick.
    pub priority_load: Option<&'a PriorityLoad>,
    /// Returns true for hosts to avoid; the pick is redone up to `selection_attempts` times.
    pub reject: Option<&'a (dyn Fn(&Host) -> bool + Sync)>,
    /// `host_selection_retry_max_attempts` (extra picks when `reject` refuses a host).
    pub selection_attempts: u32,
}

impl std::fmt::Debug for LbContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbContext")
            .field("hash", &self.hash)
            .field("priority_load", &self.priority_load)
            .field("reject", &self.reject.is_some())
            .field("selection_attempts", &self.selection_attempts)
            .finish()
    }
}

/// What a rebuild needs besides the hosts.
#[derive(Debug, Clone, Copy)]
pub struct BuildInput<'a> {
    pub policy: LbPolicy,
    pub lb: &'a model::LbConfig,
    pub assignment: model::AssignmentPolicy,
    /// The local cluster's hosts (zone-aware routing), when the bootstrap names one.
    pub local_hosts: Option<&'a [Arc<Host>]>,
    pub stats: &'a ClusterStats,
}

// === Bucket ===

/// One list of hosts a pick chooses within (Envoy's `HostsSource`), with its round-robin
/// position or its weighted least-request schedule.
#[derive(Debug, Default)]
struct Bucket {
    hosts: Box<[Arc<Host>]>,
    wrr: Wrr,
    /// LEAST_REQUEST with unequal host weights.
    weighted: Option<least::Weighted>,
    next: AtomicU64,
}

impl Bucket {
    /// `least_request_bias`: the policy is LEAST_REQUEST with this `active_request_bias`.
    fn new(hosts: Vec<Arc<Host>>, least_request_bias: Option<f64>) -> Bucket {
        let (wrr, weighted) = match least_request_bias {
            Some(bias) => (Wrr::Equal, least::Weighted::new(&hosts, bias)),
            None => {
                let weights: Vec<u32> = hosts.iter().map(|h| h.weight).collect();
                (Wrr::from_weights(&weights), None)
            }
        };
        Bucket {
            hosts: hosts.into_boxed_slice(),
            wrr,
            weighted,
            // Envoy starts each scheduler at a random point so that proxies do not move in step.
            next: AtomicU64::new(fastrand::u64(..)),
        }
    }
}

// === Localities ===

#[derive(Debug, Default)]
struct LocalityGroup {
    locality: Locality,
    healthy: Bucket,
    degraded: Bucket,
}

/// Locality-weighted choice among a level's localities.
#[derive(Debug)]
struct LocalitySchedule {
    wrr: Wrr,
    /// Locality indices with positive effective weight, in `wrr` index space.
    members: Box<[u32]>,
    next: AtomicU64,
}

impl LocalitySchedule {
    fn new(effective: &[f64]) -> Option<LocalitySchedule> {
        let members: Vec<u32> = (0..effective.len() as u32)
            .filter(|&i| effective[i as usize] > 0.0)
            .collect();
        let weights: Vec<f64> = members.iter().map(|&i| effective[i as usize]).collect();
        let wrr = Wrr::from_real(&weights)?;
        Some(LocalitySchedule {
            wrr,
            members: members.into_boxed_slice(),
            next: AtomicU64::new(fastrand::u64(..)),
        })
    }

    #[inline]
    fn pick(&self) -> usize {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.members[self.wrr.index(i, self.members.len())] as usize
    }
}

// === Level ===

/// One priority level.
#[derive(Debug, Default)]
struct Level {
    all: Bucket,
    healthy: Bucket,
    degraded: Bucket,
    /// The local locality (if the level has it) first, then in order of appearance.
    localities: Vec<LocalityGroup>,
    has_local: bool,
    healthy_localities: Option<LocalitySchedule>,
    degraded_localities: Option<LocalitySchedule>,
    table: Option<HashTable>,
}

impl Level {
    fn bucket(&self, a: Availability) -> &Bucket {
        match a {
            Availability::Healthy => &self.healthy,
            Availability::Degraded => &self.degraded,
        }
    }
}

/// Zone-aware routing state for P0 (Envoy's `LocalityRoutingState`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ZoneState {
    Off,
    Direct,
    /// Send `local_percent` / 10000 of picks to the local locality, the rest by residual
    /// capacity (cumulative, per locality index).
    Residual {
        local_percent: u64,
        residual: Box<[u64]>,
    },
}

// === LbState ===

/// Hosts and every precomputed picking table of one cluster.
#[derive(Debug)]
pub struct LbState {
    /// Every host, for admin and for carrying hosts over an update.
    pub hosts: Vec<Arc<Host>>,
    plan: PriorityPlan,
    levels: Vec<Level>,
    zone: ZoneState,
    /// The local cluster itself is in panic (zone routing then stands aside).
    local_panic: bool,
    policy: LbPolicy,
    locality_weighted: bool,
    fail_traffic_on_panic: bool,
    routing_enabled: u32,
    active_request_bias: f64,
}

impl Default for LbState {
    fn default() -> Self {
        LbState {
            hosts: Vec::new(),
            plan: priority::plan(&[], 140, false, 50),
            levels: vec![Level::default()],
            zone: ZoneState::Off,
            local_panic: false,
            policy: LbPolicy::RoundRobin,
            locality_weighted: false,
            fail_traffic_on_panic: false,
            routing_enabled: 100,
            active_request_bias: 1.0,
        }
    }
}

/// Hosts of one locality.
type LocalityHosts = (Locality, Vec<Arc<Host>>);

/// Groups hosts by locality, the `local` locality first when present.
fn by_locality<'h>(
    hosts: impl Iterator<Item = &'h Arc<Host>>,
    local: &Locality,
) -> (Vec<LocalityHosts>, bool) {
    let mut groups: Vec<LocalityHosts> = Vec::new();
    let mut index: HashMap<&Locality, usize> = HashMap::new();
    for h in hosts {
        let i = *index.entry(&h.locality).or_insert_with(|| {
            groups.push((h.locality.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(h.clone());
    }
    let has_local = match groups.iter().position(|(l, _)| l == local) {
        Some(i) => {
            let g = groups.remove(i);
            groups.insert(0, g);
            true
        }
        None => false,
    };
    (groups, has_local)
}

fn counts(hosts: &[Arc<Host>]) -> PriorityCounts {
    let mut c = PriorityCounts::default();
    for h in hosts {
        let w = u64::from(h.weight);
        c.total += 1;
        match h.lb_health() {
            LbHealth::Excluded => {
                c.excluded += 1;
                continue;
            }
            LbHealth::Healthy => {
                c.healthy += 1;
                c.healthy_weight += w;
            }
            LbHealth::Degraded => {
                c.degraded += 1;
                c.degraded_weight += w;
            }
            LbHealth::Unhealthy => {}
        }
        c.total_weight += w;
    }
    c
}

impl LbState {
    /// Builds every table for `hosts`. Runs off the request path (EDS, DNS, health changes).
    pub fn build(hosts: Vec<Arc<Host>>, input: &BuildInput<'_>) -> LbState {
        let lb = input.lb;
        let n_levels = hosts
            .iter()
            .map(|h| h.priority as usize + 1)
            .max()
            .unwrap_or(1);
        let mut per_level: Vec<Vec<Arc<Host>>> = vec![Vec::new(); n_levels];
        for h in &hosts {
            per_level[h.priority as usize].push(h.clone());
        }
        let level_counts: Vec<PriorityCounts> = per_level.iter().map(|l| counts(l)).collect();
        let factor = input.assignment.overprovisioning_factor;
        let plan = priority::plan(
            &level_counts,
            factor,
            input.assignment.weighted_priority_health,
            lb.healthy_panic_threshold,
        );
        let hash_kind = match input.policy {
            LbPolicy::RingHash {
                min_ring_size,
                max_ring_size,
            } => Some(HashKind::Ring {
                min_size: min_ring_size,
                max_size: max_ring_size,
            }),
            LbPolicy::Maglev { table_size } => Some(HashKind::Maglev { table_size }),
            _ => None,
        };
        let lr_bias = match input.policy {
            LbPolicy::LeastRequest { .. } => Some(lb.active_request_bias),
            _ => None,
        };
        let mut levels = Vec::with_capacity(n_levels);
        for (p, level_hosts) in per_level.iter().enumerate() {
            let of = |want: LbHealth| -> Vec<Arc<Host>> {
                level_hosts
                    .iter()
                    .filter(|h| h.lb_health() == want)
                    .cloned()
                    .collect()
            };
            let (groups, has_local) = by_locality(level_hosts.iter(), &lb.local_locality);
            let mut localities = Vec::with_capacity(groups.len());
            let mut eff_healthy = Vec::with_capacity(groups.len());
            let mut eff_degraded = Vec::with_capacity(groups.len());
            let mut hash_groups = Vec::new();
            for (locality, group) in groups {
                let c = counts(&group);
                let weight = group.first().map_or(0, |h| h.locality_weight);
                let count = c.total - c.excluded;
                // Envoy's effectiveLocalityWeight: weight × min(1, factor × available share).
                let eff = |n: u64| {
                    if count == 0 {
                        0.0
                    } else {
                        f64::from(weight)
                            * (f64::from(factor) / 100.0 * n as f64 / count as f64).min(1.0)
                    }
                };
                eff_healthy.push(eff(c.healthy));
                eff_degraded.push(eff(c.degraded));
                let pick = |want: LbHealth| -> Vec<Arc<Host>> {
                    group
                        .iter()
                        .filter(|h| h.lb_health() == want)
                        .cloned()
                        .collect()
                };
                let healthy = pick(LbHealth::Healthy);
                if hash_kind.is_some() {
                    let members = if plan.panic[p] {
                        group.clone()
                    } else {
                        healthy.clone()
                    };
                    hash_groups.push((weight, members));
                }
                localities.push(LocalityGroup {
                    locality,
                    healthy: Bucket::new(healthy, lr_bias),
                    degraded: Bucket::new(pick(LbHealth::Degraded), lr_bias),
                });
            }
            let table = hash_kind.and_then(|kind| {
                let weighted = if lb.locality_weighted {
                    // Envoy: per-locality lists, the local locality first.
                    hash::normalize(&hash_groups, true)
                } else {
                    // Envoy: the flat host list in assignment order (Maglev's fill order and
                    // the bounded-load probe order depend on it).
                    let members = if plan.panic[p] {
                        level_hosts.clone()
                    } else {
                        of(LbHealth::Healthy)
                    };
                    hash::normalize(&[(1, members)], false)
                };
                HashTable::build(weighted, kind, lb.hash_balance_factor)
            });
            let (healthy_localities, degraded_localities) = if lb.locality_weighted {
                (
                    LocalitySchedule::new(&eff_healthy),
                    LocalitySchedule::new(&eff_degraded),
                )
            } else {
                (None, None)
            };
            levels.push(Level {
                all: Bucket::new(level_hosts.clone(), lr_bias),
                healthy: Bucket::new(of(LbHealth::Healthy), lr_bias),
                degraded: Bucket::new(of(LbHealth::Degraded), lr_bias),
                localities,
                has_local,
                healthy_localities,
                degraded_localities,
                table,
            });
        }
        let (zone, local_panic) = match input.local_hosts {
            Some(local) if lb.local_cluster_name.is_some() && !lb.locality_weighted => {
                zone_state(&levels[0], local, lb, input.stats)
            }
            _ => (ZoneState::Off, false),
        };
        LbState {
            hosts,
            plan,
            levels,
            zone,
            local_panic,
            policy: input.policy,
            locality_weighted: lb.locality_weighted,
            fail_traffic_on_panic: lb.fail_traffic_on_panic,
            routing_enabled: lb.zone_aware.routing_enabled,
            active_request_bias: lb.active_request_bias,
        }
    }

    /// Priority loads, availability and panic per level.
    pub fn plan(&self) -> &PriorityPlan {
        &self.plan
    }

    /// Whether any host can be picked at all.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Chooses a host, or `None` (no host, or traffic failed on panic).
    pub fn pick(&self, ctx: &LbContext<'_>, stats: &ClusterStats) -> Option<Arc<Host>> {
        if self.policy.is_hashing() {
            return self.pick_hashing(ctx, stats);
        }
        let mut last = None;
        for _ in 0..=ctx.selection_attempts {
            let host = self.pick_once(ctx, stats)?;
            match ctx.reject {
                Some(reject) if reject(host) => last = Some(host),
                _ => return Some(host.clone()),
            }
        }
        // Every attempt was refused: Envoy then goes with the last host picked.
        last.cloned()
    }

    /// Envoy's `ThreadAwareLoadBalancerBase::LoadBalancerImpl::chooseHost`: one hash (the
    /// route's, else random) picks the priority by the cluster's own load (a retry's
    /// `previous_priorities` load does not apply to hashing policies in Envoy), then attempt
    /// `i` of the host selection asks the table for `chooseHost(hash, i)`, which moves a
    /// refused pick to another ring entry / Maglev slot.
    fn pick_hashing(&self, ctx: &LbContext<'_>, stats: &ClusterStats) -> Option<Arc<Host>> {
        let h = ctx.hash.unwrap_or_else(|| fastrand::u64(..));
        let (p, _) = priority::choose(&self.plan.load, h);
        if self.plan.panic.get(p).copied().unwrap_or(false) {
            stats.lb_healthy_panic.inc();
        }
        let table = self.levels.get(p)?.table.as_ref()?;
        let active = stats.upstream_rq_active.get().max(0) as u64;
        let mut last = None;
        for attempt in 0..=ctx.selection_attempts {
            let host = table.choose(h, attempt, active);
            match ctx.reject {
                Some(reject) if reject(host) => last = Some(host),
                _ => return Some(host.clone()),
            }
        }
        last.cloned()
    }

    #[inline]
    fn pick_once(&self, ctx: &LbContext<'_>, stats: &ClusterStats) -> Option<&Arc<Host>> {
        let load = ctx.priority_load.unwrap_or(&self.plan.load);
        let (p, avail) = priority::choose(load, fastrand::u64(..));
        let level = self.levels.get(p)?;
        if self.plan.panic.get(p).copied().unwrap_or(false) {
            stats.lb_healthy_panic.inc();
            if self.fail_traffic_on_panic {
                return None;
            }
            return self.pick_in(&level.all);
        }
        if self.locality_weighted {
            let sched = match avail {
                Availability::Healthy => level.healthy_localities.as_ref(),
                Availability::Degraded => level.degraded_localities.as_ref(),
            };
            if let Some(s) = sched {
                let g = &level.localities[s.pick()];
                return self.pick_in(match avail {
                    Availability::Healthy => &g.healthy,
                    Availability::Degraded => &g.degraded,
                });
            }
        }
        if p == 0 && self.zone != ZoneState::Off {
            let enabled =
                self.routing_enabled >= 100 || fastrand::u32(0..100) < self.routing_enabled;
            if enabled {
                if self.local_panic {
                    stats.lb_local_cluster_not_ok.inc();
                    if self.fail_traffic_on_panic {
                        return None;
                    }
                } else {
                    let i = self.zone_locality(level, stats);
                    let g = level.localities.get(i)?;
                    return self.pick_in(match avail {
                        Availability::Healthy => &g.healthy,
                        Availability::Degraded => &g.degraded,
                    });
                }
            }
        }
        self.pick_in(level.bucket(avail))
    }

    /// Envoy's `tryChooseLocalLocalityHosts`.
    #[inline]
    fn zone_locality(&self, level: &Level, stats: &ClusterStats) -> usize {
        match &self.zone {
            ZoneState::Off | ZoneState::Direct => {
                stats.lb_zone_routing_all_directly.inc();
                0
            }
            ZoneState::Residual {
                local_percent,
                residual,
            } => {
                if fastrand::u64(..) % 10000 < *local_percent {
                    stats.lb_zone_routing_sampled.inc();
                    return 0;
                }
                stats.lb_zone_routing_cross_zone.inc();
                let n = level.localities.len();
                let total = residual.last().copied().unwrap_or(0);
                if total == 0 {
                    stats.lb_zone_no_capacity_left.inc();
                    return fastrand::usize(..n.max(1));
                }
                let t = fastrand::u64(..) % total;
                residual.partition_point(|&c| c <= t)
            }
        }
    }

    #[inline]
    fn pick_in<'a>(&self, b: &'a Bucket) -> Option<&'a Arc<Host>> {
        let n = b.hosts.len();
        if n == 0 {
            return None;
        }
        match self.policy {
            LbPolicy::LeastRequest { choice_count } => self.least_request(b, choice_count),
            LbPolicy::Random => Some(&b.hosts[fastrand::usize(..n)]),
            // RoundRobin (and hashing policies never reach here).
            _ => {
                let i = b.next.fetch_add(1, Ordering::Relaxed);
                Some(&b.hosts[b.wrr.index(i, n)])
            }
        }
    }

    /// Envoy's least request: EDF over weight / (active + 1)^bias when the bucket's host
    /// weights differ, else P2C over `choice_count` draws (see [`least`]).
    #[inline]
    fn least_request<'a>(&self, b: &'a Bucket, choice_count: u32) -> Option<&'a Arc<Host>> {
        match &b.weighted {
            Some(w) => b.hosts.get(w.pick(&b.hosts, self.active_request_bias)),
            None => least::p2c(&b.hosts, choice_count),
        }
    }
}

/// Envoy's `regenerateLocalityRoutingStructures` for P0, and whether the local cluster is in
/// panic.
fn zone_state(
    level: &Level,
    local: &[Arc<Host>],
    lb: &model::LbConfig,
    stats: &ClusterStats,
) -> (ZoneState, bool) {
    stats.lb_recalculate_zone_structures.inc();
    let local_p0: Vec<Arc<Host>> = local.iter().filter(|h| h.priority == 0).cloned().collect();
    let local_panic = priority::in_panic(&counts(&local_p0), lb.healthy_panic_threshold);
    if level.localities.len() < 2 {
        return (ZoneState::Off, local_panic);
    }
    let force = lb.zone_aware.force_locality_direct_routing;
    let (local_groups, local_has_local) = by_locality(local_p0.iter(), &lb.local_locality);
    if local_groups.len() < 2 && !force {
        return (ZoneState::Off, local_panic);
    }
    if !local_has_local || local_groups[0].1.is_empty() {
        stats.lb_local_cluster_not_ok.inc();
        return (ZoneState::Off, local_panic);
    }
    let upstream_healthy: usize = level.localities.iter().map(|g| g.healthy.hosts.len()).sum();
    if (upstream_healthy as u64) < lb.zone_aware.min_cluster_size {
        stats.lb_zone_cluster_too_small.inc();
        return (ZoneState::Off, local_panic);
    }
    // Percentages in 1/10000, from healthy hosts on both sides.
    let mut local_counts: HashMap<&Locality, u64> = HashMap::new();
    let mut local_total = 0u64;
    for (loc, hs) in &local_groups {
        let healthy = hs
            .iter()
            .filter(|h| h.lb_health() == LbHealth::Healthy)
            .count() as u64;
        local_total += healthy;
        if healthy > 0 {
            local_counts.insert(loc, healthy);
        }
    }
    let pct: Vec<(u64, u64)> = level
        .localities
        .iter()
        .map(|g| {
            let up = g.healthy.hosts.len() as u64;
            if up == 0 {
                return (0, 0);
            }
            let lc = local_counts.get(&g.locality).copied().unwrap_or(0);
            let lp = (10000 * lc).checked_div(local_total).unwrap_or(0);
            (lp, 10000 * up / upstream_healthy as u64)
        })
        .collect();
    if level.has_local && ((pct[0].1 > 0 && pct[0].1 >= pct[0].0) || force) {
        return (ZoneState::Direct, local_panic);
    }
    let local_percent = if level.has_local && pct[0].0 > 0 {
        pct[0].1 * 10000 / pct[0].0
    } else {
        0
    };
    let mut residual = Vec::with_capacity(pct.len());
    let mut acc = 0u64;
    for (i, &(lp, up)) in pct.iter().enumerate() {
        if !(i == 0 && level.has_local) && up > lp {
            acc += up - lp;
        }
        residual.push(acc);
    }
    (
        ZoneState::Residual {
            local_percent,
            residual: residual.into_boxed_slice(),
        },
        local_panic,
    )
}

#[cfg(test)]
mod tests;
