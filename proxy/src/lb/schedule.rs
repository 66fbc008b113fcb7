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

#[derive(Debug, PartialEq)]
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
    fn weighted_draw_covers_all() {
        let cum = prefix_sums([1u64, 0, 3].into_iter());
        assert_eq!(weighted_draw(&cum, 0), 0);
        assert_eq!(weighted_draw(&cum, u64::MAX), 2);
        assert_eq!(weighted_draw(&cum, u64::MAX / 4 + 1), 2);
    }
}
