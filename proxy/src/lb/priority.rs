//! Envoy's priority-level load math (`LoadBalancerBase`): per-priority healthy and degraded
//! availability scaled by the overprovisioning factor, normalised total availability, spill-over
//! to lower priorities, per-priority and total panic. Pure functions, run only on rebuild.

/// Host counts of one priority level, as the load math needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PriorityCounts {
    /// Every host, excluded ones included.
    pub total: u64,
    pub excluded: u64,
    pub healthy: u64,
    pub degraded: u64,
    /// Sum of host weights of the non-excluded hosts (`weighted_priority_health`).
    pub total_weight: u64,
    pub healthy_weight: u64,
    pub degraded_weight: u64,
}

/// Percent of traffic each priority's healthy and degraded hosts receive; the sum of both
/// vectors is 100 whenever any host exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityLoad {
    pub healthy: Vec<u32>,
    pub degraded: Vec<u32>,
}

/// Everything the picker needs from the priority math.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriorityPlan {
    pub load: PriorityLoad,
    /// Healthy availability per priority (0..=100), after the overprovisioning factor.
    pub health: Vec<u32>,
    /// Degraded availability per priority (0..=100).
    pub degraded: Vec<u32>,
    /// Priority levels in panic: picks there ignore health.
    pub panic: Vec<bool>,
}

/// Which hosts of the chosen priority a pick targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Healthy,
    Degraded,
}

/// One priority's (healthy, degraded) availability: min(100, factor × share / 100) in percent,
/// with integer division as Envoy does (so 71 % healthy × 1.4 = 99, not 100).
pub fn availability(c: &PriorityCounts, overprovisioning: u32, weighted: bool) -> (u32, u32) {
    let count = c.total.saturating_sub(c.excluded);
    if count == 0 {
        return (0, 0);
    }
    let (h, d, t) = if weighted {
        (c.healthy_weight, c.degraded_weight, c.total_weight)
    } else {
        (c.healthy, c.degraded, count)
    };
    if t == 0 {
        return (0, 0);
    }
    let f = u64::from(overprovisioning);
    let pct = |x: u64| (f.saturating_mul(x) / t).min(100) as u32;
    (pct(h), pct(d))
}

fn normalized_total(health: &[u32], degraded: &[u32]) -> u32 {
    let sum: u64 = health.iter().chain(degraded).map(|&v| u64::from(v)).sum();
    sum.min(100) as u32
}

/// Envoy's `distributeLoad`: hands `total` out in priority order, each level taking its
/// availability share of the normalised total; returns the first level with availability and
/// what is left.
fn distribute(out: &mut [u32], avail: &[u32], mut total: u32, norm: u32) -> (Option<usize>, u32) {
    let mut first = None;
    for (i, (o, &a)) in out.iter_mut().zip(avail).enumerate() {
        if first.is_none() && a > 0 {
            first = Some(i);
        }
        *o = total.min(a * 100 / norm);
        total -= *o;
    }
    (first, total)
}

/// Priority loads for given availabilities (`recalculatePerPriorityState`), or `None` when
/// nothing is available at all. Also what `previous_priorities` retries use after zeroing the
/// availability of the priorities already tried.
pub fn loads(health: &[u32], degraded: &[u32]) -> Option<PriorityLoad> {
    let n = health.len();
    let norm = normalized_total(health, degraded);
    if norm == 0 {
        return None;
    }
    let mut load = PriorityLoad {
        healthy: vec![0; n],
        degraded: vec![0; n],
    };
    let (first_h, rest) = distribute(&mut load.healthy, health, 100, norm);
    let (first_d, rest) = distribute(&mut load.degraded, degraded, rest, norm);
    // Rounding leftovers go to the first available level, healthy before degraded.
    if rest != 0 {
        if let Some(i) = first_h {
            load.healthy[i] += rest;
        } else if let Some(i) = first_d {
            load.degraded[i] += rest;
        }
    }
    Some(load)
}

/// Envoy's `previous_priorities` retry load: the availability of the priorities in `excluded`
/// (bit per priority) is zeroed and the rest rebalanced, leftovers going round again from the
/// first level. `None` when nothing would be left (the caller then uses the normal load).
pub fn loads_excluding(health: &[u32], degraded: &[u32], excluded: u64) -> Option<PriorityLoad> {
    let kept = |i: usize, v: u32| {
        if i < 64 && excluded & (1 << i) != 0 {
            0
        } else {
            v
        }
    };
    let h: Vec<u32> = health
        .iter()
        .enumerate()
        .map(|(i, &v)| kept(i, v))
        .collect();
    let d: Vec<u32> = degraded
        .iter()
        .enumerate()
        .map(|(i, &v)| kept(i, v))
        .collect();
    let total = normalized_total(&h, &d);
    if total == 0 {
        return None;
    }
    let mut load = PriorityLoad {
        healthy: vec![0; h.len()],
        degraded: vec![0; d.len()],
    };
    let mut left = 100u32;
    while left != 0 {
        for (o, &a) in load.healthy.iter_mut().zip(&h) {
            let delta = left.min(a * 100 / total);
            *o += delta;
            left -= delta;
        }
        for (o, &a) in load.degraded.iter_mut().zip(&d) {
            let delta = left.min(a * 100 / total);
            *o += delta;
            left -= delta;
        }
    }
    Some(load)
}

/// Envoy's `isHostSetInPanic`: healthy + degraded share below the threshold (percent).
pub fn in_panic(c: &PriorityCounts, threshold: u32) -> bool {
    let count = c.total.saturating_sub(c.excluded);
    let (h, d) = if count == 0 {
        (0.0, 0.0)
    } else {
        (
            100.0 * c.healthy as f64 / count as f64,
            100.0 * c.degraded as f64 / count as f64,
        )
    };
    h + d < f64::from(threshold.min(100))
}

/// The whole plan for a cluster's priority levels (at least one level is always present).
pub fn plan(
    counts: &[PriorityCounts],
    overprovisioning: u32,
    weighted: bool,
    panic_threshold: u32,
) -> PriorityPlan {
    let default = [PriorityCounts::default()];
    let counts = if counts.is_empty() {
        &default[..]
    } else {
        counts
    };
    let n = counts.len();
    let (health, degraded): (Vec<u32>, Vec<u32>) = counts
        .iter()
        .map(|c| availability(c, overprovisioning, weighted))
        .unzip();
    let norm = normalized_total(&health, &degraded);
    let mut load = loads(&health, &degraded).unwrap_or(PriorityLoad {
        healthy: vec![0; n],
        degraded: vec![0; n],
    });
    let mut panic = vec![false; n];
    if panic_threshold == 0 && norm == 0 {
        // Loads must add up to 100 even though nothing can be picked: P0 gets it all.
        load.healthy[0] = 100;
    } else {
        for (p, c) in panic.iter_mut().zip(counts) {
            *p = norm != 100 && in_panic(c, panic_threshold);
        }
        if panic.iter().all(|&p| p) {
            load = total_panic(counts);
        }
    }
    PriorityPlan {
        load,
        health,
        degraded,
        panic,
    }
}

/// Every level in panic: load follows the number of hosts per level, whatever their health.
fn total_panic(counts: &[PriorityCounts]) -> PriorityLoad {
    let n = counts.len();
    let mut load = PriorityLoad {
        healthy: vec![0; n],
        degraded: vec![0; n],
    };
    let total: u64 = counts.iter().map(|c| c.total).sum();
    if total == 0 {
        load.healthy[0] = 100;
        return load;
    }
    let mut left = 100u32;
    let mut first = None;
    for (i, c) in counts.iter().enumerate() {
        if first.is_none() && c.total > 0 {
            first = Some(i);
        }
        let l = (100 * c.total / total) as u32;
        load.healthy[i] = l;
        left -= l;
    }
    load.healthy[first.unwrap_or(0)] += left;
    load
}

/// Envoy's `choosePriority`: `hash % 100` walks the healthy loads, then the degraded ones.
#[inline]
pub fn choose(load: &PriorityLoad, hash: u64) -> (usize, Availability) {
    let h = (hash % 100) as u32;
    let mut acc = 0;
    for (i, &l) in load.healthy.iter().enumerate() {
        acc += l;
        if h < acc {
            return (i, Availability::Healthy);
        }
    }
    for (i, &l) in load.degraded.iter().enumerate() {
        acc += l;
        if h < acc {
            return (i, Availability::Degraded);
        }
    }
    (0, Availability::Healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(total: u64, healthy: u64, degraded: u64) -> PriorityCounts {
        PriorityCounts {
            total,
            excluded: 0,
            healthy,
            degraded,
            total_weight: total,
            healthy_weight: healthy,
            degraded_weight: degraded,
        }
    }

    fn healthy_load(levels: &[(u64, u64)]) -> Vec<u32> {
        let c: Vec<_> = levels.iter().map(|&(t, h)| level(t, h, 0)).collect();
        plan(&c, 140, false, 50).load.healthy
    }

    /// The tables of Envoy's arch_overview/upstream/load_balancing/priority docs.
    #[test]
    fn two_priorities_table() {
        for (p0, want) in [
            (100, [100, 0]),
            (72, [100, 0]),
            (71, [99, 1]),
            (50, [70, 30]),
            (25, [35, 65]),
            (0, [0, 100]),
        ] {
            assert_eq!(healthy_load(&[(100, p0), (100, 100)]), want, "P0 {p0}%");
        }
    }

    #[test]
    fn three_priorities_spill_over() {
        assert_eq!(
            healthy_load(&[(100, 100), (100, 100), (100, 100)]),
            [100, 0, 0]
        );
        assert_eq!(
            healthy_load(&[(100, 71), (100, 71), (100, 100)]),
            [99, 1, 0]
        );
        assert_eq!(
            healthy_load(&[(100, 25), (100, 25), (100, 100)]),
            [35, 35, 30]
        );
        // 25 / 25 / 20 %: normalised total 98 < 100 and every level under the panic threshold,
        // so all three are in panic and load follows host counts.
        assert_eq!(
            healthy_load(&[(100, 25), (100, 25), (100, 20)]),
            [34, 33, 33]
        );
        // Without panic the same availabilities scale up, the rounding rest going to P0.
        let l = loads(&[35, 35, 28], &[0, 0, 0]).expect("available");
        assert_eq!(l.healthy, [37, 35, 28]);
    }

    #[test]
    fn degraded_takes_what_healthy_leaves() {
        // P0: 50 % healthy, 50 % degraded: 70 % healthy availability, 30 % of traffic degraded.
        let p = plan(&[level(10, 5, 5)], 140, false, 50);
        assert_eq!(p.load.healthy, [70]);
        assert_eq!(p.load.degraded, [30]);
        // P0 all degraded, P1 healthy: P1 first, degraded P0 only with what is left.
        let p = plan(&[level(10, 0, 10), level(10, 10, 0)], 140, false, 50);
        assert_eq!(p.load.healthy, [0, 100]);
        assert_eq!(p.load.degraded, [0, 0]);
    }

    #[test]
    fn panic_per_priority_and_total() {
        // P0 at 25 %, P1 healthy: P0 spills, and is not in panic since P1 covers everything.
        let p = plan(&[level(4, 1, 0), level(4, 4, 0)], 140, false, 50);
        assert_eq!(p.panic, [false, false]);
        // Both at 25 %: normalised total 70 < 100, both levels panic, load by host count.
        let p = plan(&[level(4, 1, 0), level(12, 3, 0)], 140, false, 50);
        assert_eq!(p.panic, [true, true]);
        assert_eq!(p.load.healthy, [25, 75]);
        // Threshold 0 disables panic.
        let p = plan(&[level(4, 0, 0)], 140, false, 0);
        assert_eq!(p.panic, [false]);
        assert_eq!(p.load.healthy, [100]);
    }

    #[test]
    fn overprovisioning_and_weighted_health() {
        // Factor 100: 80 % healthy gives 80 %, the rest spills.
        let c = [level(10, 8, 0), level(10, 10, 0)];
        assert_eq!(plan(&c, 100, false, 50).load.healthy, [80, 20]);
        // Weighted: the one healthy host carries weight 3 of 4 -> 75 × 1.4 = 100.
        let w = PriorityCounts {
            total: 2,
            healthy: 1,
            total_weight: 4,
            healthy_weight: 3,
            ..Default::default()
        };
        assert_eq!(
            plan(&[w, level(2, 2, 0)], 140, true, 50).load.healthy,
            [100, 0]
        );
        assert_eq!(
            plan(&[w, level(2, 2, 0)], 140, false, 50).load.healthy,
            [70, 30]
        );
    }

    #[test]
    fn choose_walks_loads() {
        let load = PriorityLoad {
            healthy: vec![70, 0],
            degraded: vec![0, 30],
        };
        assert_eq!(choose(&load, 69), (0, Availability::Healthy));
        assert_eq!(choose(&load, 70), (1, Availability::Degraded));
        assert_eq!(choose(&load, 199), (1, Availability::Degraded));
    }
}
