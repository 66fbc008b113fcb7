//! Weighted round-robin orders, computed on rebuild so that a pick is one atomic increment and
//! one array read: Envoy's earliest-deadline-first (EDF) order, precomputed for one period, or a
//! Weyl sequence over cumulative weights when the period would be too long.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;

/// Longest EDF period kept as a table (u32 entries: 256 KiB at most).
pub const MAX_CYCLE: usize = 1 << 16;
/// 2^64 / golden ratio: consecutive multiples spread evenly over [0, 2^64).
const WEYL_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// How the i-th pick maps onto a list of weighted entries.
#[derive(Debug, Clone, Default)]
pub enum Wrr {
    /// All weights equal (or fewer than two entries): plain rotation.
    #[default]
    Equal,
    /// One period of Envoy's EDF order, as indices.
    Cycle(Box<[u32]>),
    /// Prefix sums of the weights; the i-th pick is the entry under `i × φ mod total`.
    Weyl(Box<[u64]>),
}

impl Wrr {
    /// For integer host weights: the exact EDF period when it is short enough.
    pub fn from_weights(weights: &[u32]) -> Wrr {
        if weights.len() < 2 || weights.windows(2).all(|w| w[0] == w[1]) {
            return Wrr::Equal;
        }
        let sum: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
        if sum as usize <= MAX_CYCLE {
            let w: Vec<f64> = weights.iter().map(|&w| f64::from(w.max(1))).collect();
            Wrr::Cycle(edf_cycle(&w, sum as usize).into_boxed_slice())
        } else {
            Wrr::Weyl(prefix_sums(weights.iter().map(|&w| u64::from(w.max(1)))))
        }
    }

    /// For real-valued weights (effective locality weights); zero-weight entries never appear.
    /// `None` when no entry has a positive weight.
    pub fn from_real(weights: &[f64]) -> Option<Wrr> {
        let positive = weights.iter().filter(|&&w| w > 0.0).count();
        if positive == 0 {
            return None;
        }
        if positive == weights.len() && weights.windows(2).all(|w| w[0] == w[1]) {
            return Some(Wrr::Equal);
        }
        let len = (weights.len() * 1024).clamp(1024, MAX_CYCLE);
        Some(Wrr::Cycle(edf_cycle(weights, len).into_boxed_slice()))
    }

    /// The entry for pick number `i` among `n` entries (`n` > 0).
    #[inline]
    pub fn index(&self, i: u64, n: usize) -> usize {
        match self {
            Wrr::Equal => (i % n as u64) as usize,
            Wrr::Cycle(c) => c[(i % c.len() as u64) as usize] as usize,
            Wrr::Weyl(cum) => {
                let total = cum.last().copied().unwrap_or(1);
                let x = ((u128::from(i.wrapping_mul(WEYL_STEP)) * u128::from(total)) >> 64) as u64;
                cum.partition_point(|&c| c <= x).min(n - 1)
            }
        }
    }
}

/// Prefix sums, for weighted draws.
pub fn prefix_sums(weights: impl Iterator<Item = u64>) -> Box<[u64]> {
    let mut sum = 0u64;
    weights
        .map(|w| {
            sum += w;
            sum
        })
        .collect()
}

/// Index of a uniformly drawn weight unit in `cum` (prefix sums); `r` is any random u64.
#[inline]
pub fn weighted_draw(cum: &[u64], r: u64) -> usize {
    let total = cum.last().copied().unwrap_or(0);
    if total == 0 {
        return 0;
    }
    let x = ((u128::from(r) * u128::from(total)) >> 64) as u64;
    cum.partition_point(|&c| c <= x).min(cum.len() - 1)
}

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    deadline: f64,
    order: u64,
    index: u32,
}

impl Eq for Entry {}

impl Ord for Entry {
    // Reversed: BinaryHeap is a max-heap and EDF wants the earliest deadline, ties to the entry
    // queued first (Envoy's order offset).
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .deadline
            .total_cmp(&self.deadline)
            .then(other.order.cmp(&self.order))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

/// `len` picks of Envoy's `EdfScheduler`: each entry's next deadline is the current time plus
/// 1 / weight; the earliest deadline is picked and re-queued. Non-positive weights are skipped.
pub fn edf_cycle(weights: &[f64], len: usize) -> Vec<u32> {
    let mut heap = BinaryHeap::with_capacity(weights.len());
    let mut order = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            heap.push(Entry {
                deadline: 1.0 / w,
                order,
                index: i as u32,
            });
            order += 1;
        }
    }
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let Some(e) = heap.pop() else { break };
        out.push(e.index);
        let w = weights[e.index as usize];
        heap.push(Entry {
            deadline: e.deadline + 1.0 / w,
            order,
            index: e.index,
        });
        order += 1;
    }
    out
}

// === Edf ===

/// Envoy's `EdfScheduler` itself, for weights that change between picks (weighted least
/// request): the earliest deadline is picked and re-queued at `now + 1 / weight`, the weight
/// computed again at that moment.
#[derive(Debug, Clone, Default)]
pub struct Edf {
    heap: BinaryHeap<Entry>,
    current: f64,
    order: u64,
}

impl Edf {
    /// Envoy's `EdfScheduler::createWithPicks`: the state after `picks` picks at the given
    /// (positive) weights, emulated in O(n log n). Each weight gets 1e-13 added, as in Envoy,
    /// so that weights that are multiples of each other do not tie on floating-point noise.
    pub fn with_picks(weights: &[f64], picks: u32) -> Edf {
        let picks = picks % 429_496_729;
        if weights.is_empty() {
            return Edf::default();
        }
        let aug: Vec<f64> = weights.iter().map(|&w| w + 1e-13).collect();
        let sum: f64 = aug.iter().sum();
        let mut heap = BinaryHeap::with_capacity(weights.len());
        let mut so_far = 0u64;
        let mut max_pick_time = 0.0f64;
        for (i, &w) in aug.iter().enumerate() {
            let mut floor = (w * f64::from(picks) / sum) as u32;
            // Floating point can put floor(A×B) above A×B; Envoy steps back one pick then.
            if floor > 0 && f64::from(floor) / w >= f64::from(picks) / sum {
                floor -= 1;
            }
            max_pick_time = max_pick_time.max(f64::from(floor) / w);
            heap.push(Entry {
                deadline: f64::from(floor + 1) / w,
                order: i as u64,
                index: i as u32,
            });
            so_far += u64::from(floor);
        }
        let mut edf = Edf {
            heap,
            current: max_pick_time,
            order: weights.len() as u64,
        };
        while so_far < u64::from(picks) {
            edf.pick_and_add(|i| weights[i]);
            so_far += 1;
        }
        edf
    }

    /// Envoy's `pickAndAdd`: the entry with the earliest deadline (ties to the one queued
    /// first), re-queued with `weight(index)` (must be positive and finite).
    pub fn pick_and_add(&mut self, weight: impl Fn(usize) -> f64) -> Option<usize> {
        let e = self.heap.pop()?;
        self.current = e.deadline;
        let i = e.index as usize;
        let w = weight(i);
        // A non-positive weight would put the entry at or before `now` forever; Envoy asserts
        // it cannot happen (host weights are at least 1).
        let step = if w > 0.0 && w.is_finite() {
            1.0 / w
        } else {
            f64::MAX / 4.0
        };
        self.heap.push(Entry {
            deadline: self.current + step,
            order: self.order,
            index: e.index,
        });
        self.order += 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(w: &Wrr, n: usize, picks: u64) -> Vec<u64> {
        let mut c = vec![0; n];
        for i in 0..picks {
            c[w.index(i, n)] += 1;
        }
        c
    }

    #[test]
    fn edf_period_is_exact_and_smooth() {
        let w = Wrr::from_weights(&[1, 3]);
        assert_eq!(shares(&w, 2, 400), [100, 300]);
        // The light entry appears once in every period of four, never twice in a row.
        let seq: Vec<usize> = (0..8).map(|i| w.index(i, 2)).collect();
        assert!(seq.windows(2).all(|p| !(p[0] == 0 && p[1] == 0)), "{seq:?}");
        assert!(matches!(Wrr::from_weights(&[2, 2, 2]), Wrr::Equal));
    }

    #[test]
    fn long_periods_use_weyl_with_proportional_shares() {
        // Weight sum ~122,000: above MAX_CYCLE.
        let weights: Vec<u32> = (0..2000).map(|i| 1 + (i % 7) * 20).collect();
        let w = Wrr::from_weights(&weights);
        assert!(matches!(w, Wrr::Weyl(_)));
        let total: u64 = weights.iter().map(|&x| u64::from(x)).sum();
        let picks = total * 20;
        let c = shares(&w, weights.len(), picks);
        for (i, &wt) in weights.iter().enumerate() {
            let want = u64::from(wt) * 20;
            // Weyl sequences are equidistributed with low discrepancy: within 0.5 %.
            assert!(
                c[i].abs_diff(want) <= want / 200 + 2,
                "host {i}: {} vs {want}",
                c[i]
            );
        }
    }

    #[test]
    fn real_weights_skip_zero() {
        let w = Wrr::from_real(&[1.0, 0.0, 2.0]).unwrap();
        let c = shares(&w, 3, 3072);
        assert_eq!(c[1], 0);
        assert!(
            c[0].abs_diff(1024) <= 1 && c[2].abs_diff(2048) <= 1,
            "{c:?}"
        );
        assert!(Wrr::from_real(&[0.0, 0.0]).is_none());
    }

    #[test]
    fn edf_picks_by_deadline_and_reweighs_on_add() {
        // Weights 2 and 1 at the start: deadlines 1/2 and 1/1 (plus Envoy's 1e-13 nudge).
        let mut e = Edf::with_picks(&[2.0, 1.0], 0);
        let w = std::cell::Cell::new([2.0, 1.0]);
        let pick = |e: &mut Edf| e.pick_and_add(|i| w.get()[i]).unwrap();
        // 0 @0.5 -> 1.0; then 1 (@0.99999..) before 0 (@1.0); 0 @1.0 -> 1.5; 0 @1.5 -> 2.0;
        // 1 @1.99999.. -> 2.99999..; 0 @2.0.
        let seq: Vec<usize> = (0..6).map(|_| pick(&mut e)).collect();
        assert_eq!(seq, [0, 1, 0, 0, 1, 0]);
        // Host 0 becomes busy: the weight it is re-queued with drops to 2 / 4 = 0.5.
        w.set([0.5, 1.0]);
        // 0 was re-queued @2.5 at weight 2; 1 @2.99999..; 0 @2.5 -> 4.5 (weight 0.5 now);
        // 1 @2.99999.. -> 3.99999..; 1 -> 4.99999..; 0 @4.5.
        let seq: Vec<usize> = (0..4).map(|_| pick(&mut e)).collect();
        assert_eq!(seq, [0, 1, 1, 0]);
    }

    #[test]
    fn edf_with_picks_matches_picking_one_by_one() {
        let w = [3.0, 5.0, 1.0, 7.0];
        for picks in [0u32, 1, 7, 16, 33, 100] {
            let mut a = Edf::with_picks(&w, picks);
            let mut b = Edf::with_picks(&w, 0);
            for _ in 0..picks {
                b.pick_and_add(|i| w[i]);
            }
            let sa: Vec<usize> = (0..64).filter_map(|_| a.pick_and_add(|i| w[i])).collect();
            let sb: Vec<usize> = (0..64).filter_map(|_| b.pick_and_add(|i| w[i])).collect();
            let count = |s: &[usize], k| s.iter().filter(|&&x| x == k).count();
            // Same shares over a window (ties among equal deadlines may order differently).
            for k in 0..4 {
                assert!(
                    count(&sa, k).abs_diff(count(&sb, k)) <= 1,
                    "{picks}: {sa:?} {sb:?}"
                );
            }
        }
        assert!(Edf::with_picks(&[], 3).pick_and_add(|_| 1.0).is_none());
    }

    #[test]
    fn weighted_draw_covers_all() {
        let cum = prefix_sums([1u64, 0, 3].into_iter());
        assert_eq!(weighted_draw(&cum, 0), 0);
        assert_eq!(weighted_draw(&cum, u64::MAX), 2);
        assert_eq!(weighted_draw(&cum, u64::MAX / 4 + 1), 2);
    }
}
