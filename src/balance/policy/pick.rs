//! The request-independent policies: which ready endpoint takes the next
//! request.

use std::fmt;
use std::hash::Hash;

use tower::load::Load;
use tower::ready_cache::ReadyCache;

use super::core::{FastRng, Node};
use super::{sealed, Policy};
use crate::balance::LoadValue;
use crate::discover::Weight;

/// The weighted policies read the endpoints' weights again after this many
/// picks, to see weights changed without a new service (the ready set
/// changing makes them read at once).
pub(super) const REFRESH_PICKS: u32 = 1024;

/// [`WeightedP2c`] also reads the weights again when this much time has passed
/// since it last did (checked every 16 picks), so that a weight that moves
/// with time (a slow-start ramp) is followed at low request rates too.
const REFRESH_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

// ---------------------------------------------------------------------------

/// Weighted power of two choices: samples two distinct ready endpoints with
/// probability proportional to their weight and picks the one with the lower
/// `load / weight`.
///
/// The load is tower's [`Load`] of the endpoint service, whose metric must be
/// a [`LoadValue`] (the loads of [`crate::balance::load`], or any number). With
/// equal loads the first sample wins, so the traffic follows the weights
/// exactly; under load, an endpoint with twice the weight is expected to
/// carry twice the load. Endpoints of weight 0 get nothing while an endpoint
/// with a weight is ready (with none, the two samples are uniform).
///
/// A pick costs two samples (a binary search each over the cumulative
/// weights of the ready endpoints, rebuilt when the ready set changes) and
/// two loads: O(log n). Weights are read when the ready set changes, every
/// 1024 picks, and at least every 100 ms while picks come. See the
/// [module docs](super) for an example.
#[derive(Clone)]
pub struct WeightedP2c {
    rng: FastRng,
    /// `cumulative[i]`: the sum of the weights of ready endpoints `0..=i`.
    cumulative: Vec<u64>,
    picks: u32,
    rebuilt_at: Option<tokio::time::Instant>,
}

impl WeightedP2c {
    /// The policy, seeded from the operating system's randomness.
    pub fn new() -> Self {
        Self::from_rng(FastRng::new(None))
    }

    /// The policy with a fixed seed, for repeatable tests and simulations.
    pub fn with_seed(seed: u64) -> Self {
        Self::from_rng(FastRng::new(Some(seed)))
    }

    fn from_rng(rng: FastRng) -> Self {
        WeightedP2c {
            rng,
            cumulative: Vec::new(),
            picks: 0,
            rebuilt_at: None,
        }
    }

    fn rebuild<K: Eq + Hash, S: Weight, Req>(&mut self, ready: &ReadyCache<K, Node<S>, Req>) {
        self.picks = 0;
        self.rebuilt_at = Some(tokio::time::Instant::now());
        self.cumulative.clear();
        let mut sum = 0u64;
        for (_, node) in ready.iter_ready() {
            sum += u64::from(node.weight());
            self.cumulative.push(sum);
        }
    }

    /// The ready endpoint whose weight interval holds `point`.
    #[inline]
    fn at(&self, point: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= point)
    }

    /// Where endpoint `i`'s interval starts.
    #[inline]
    fn start(&self, i: usize) -> u64 {
        if i == 0 {
            0
        } else {
            self.cumulative[i - 1]
        }
    }
}

impl Default for WeightedP2c {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for WeightedP2c {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeightedP2c").finish_non_exhaustive()
    }
}

impl sealed::Sealed for WeightedP2c {}

impl<S> Policy<S> for WeightedP2c
where
    S: Weight + Load,
    S::Metric: LoadValue,
{
    const TRACK_IN_FLIGHT: bool = false;

    #[inline]
    fn pick<K: Eq + Hash, Req>(
        &mut self,
        ready: &mut ReadyCache<K, Node<S>, Req>,
        changed: bool,
    ) -> Option<usize> {
        let n = ready.ready_len();
        match n {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        self.picks += 1;
        let stale = self.picks.is_multiple_of(16)
            && self
                .rebuilt_at
                .is_none_or(|at| at.elapsed() >= REFRESH_AFTER);
        if changed || self.cumulative.len() != n || self.picks >= REFRESH_PICKS || stale {
            self.rebuild(ready);
        }
        let load = |i: usize| {
            let (_, node) = ready.get_ready_index(i).expect("index below ready_len");
            node.inner.load().value()
        };
        let total = self.cumulative[n - 1];
        if total == 0 {
            // Nothing has a weight: plain power of two choices.
            let a = self.rng.below(n as u64) as usize;
            let mut b = self.rng.below(n as u64 - 1) as usize;
            if b >= a {
                b += 1;
            }
            return Some(if load(a) <= load(b) { a } else { b });
        }
        let point = self.rng.below(total);
        let a = self.at(point);
        let start_a = self.start(a);
        let weight_a = self.cumulative[a] - start_a;
        let rest = total - weight_a;
        if rest == 0 {
            return Some(a);
        }
        // The second sample, from every weight but `a`'s.
        let mut point = self.rng.below(rest);
        if point >= start_a {
            point += weight_a;
        }
        let b = self.at(point);
        let weight_b = self.cumulative[b] - self.start(b);
        // load_a / weight_a <= load_b / weight_b, without dividing.
        let chosen = if load(a) * weight_b as f64 <= load(b) * weight_a as f64 {
            a
        } else {
            b
        };
        tracing::trace!(a, b, chosen, "weighted p2c");
        Some(chosen)
    }
}

// ---------------------------------------------------------------------------

/// Round robin: each ready endpoint in turn, weights ignored except that
/// endpoints of weight 0 are skipped while another is ready.
///
/// A pick is O(1). The turn follows the order of the ready set, which stays
/// put while no endpoint changes readiness. See the [module docs](super) for
/// an example.
#[derive(Clone, Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl RoundRobin {
    /// The policy.
    pub fn new() -> Self {
        RoundRobin::default()
    }
}

impl sealed::Sealed for RoundRobin {}

impl<S: Weight> Policy<S> for RoundRobin {
    const TRACK_IN_FLIGHT: bool = false;

    #[inline]
    fn pick<K: Eq + Hash, Req>(
        &mut self,
        ready: &mut ReadyCache<K, Node<S>, Req>,
        _changed: bool,
    ) -> Option<usize> {
        round_robin(&mut self.next, ready)
    }
}

/// The next ready endpoint with a weight after `next`, or the next one if
/// none has a weight.
#[inline]
fn round_robin<K: Eq + Hash, S: Weight, Req>(
    next: &mut usize,
    ready: &ReadyCache<K, Node<S>, Req>,
) -> Option<usize> {
    let n = ready.ready_len();
    if n == 0 {
        return None;
    }
    for _ in 0..n {
        let i = *next % n;
        *next = next.wrapping_add(1);
        let (_, node) = ready.get_ready_index(i).expect("index below ready_len");
        if node.weight() > 0 {
            return Some(i);
        }
    }
    let i = *next % n;
    *next = next.wrapping_add(1);
    Some(i)
}

// ---------------------------------------------------------------------------

/// Smooth weighted round robin, nginx's algorithm: every pick adds each ready
/// endpoint's weight to its current weight, takes the endpoint with the
/// highest current weight (the first in ready order on a tie) and subtracts
/// the sum of the weights from it.
///
/// Over a cycle of `sum of weights` picks each endpoint gets exactly its
/// weight's share, spread out rather than in bursts: weights 5, 1, 1 give
/// `a a b a c a a`. Endpoints of weight 0 get nothing while another is ready
/// (with none, the policy is round robin). A pick is O(n) in the ready
/// endpoints (2 to 2.5 µs for 1000 in `benches/balance_pick.rs`, against
/// 35 ns for round robin), as in nginx. The current weight belongs to the
/// endpoint's service, so it survives changes of readiness.
/// See the [module docs](super) for an example.
#[derive(Clone, Debug, Default)]
pub struct SmoothWeightedRoundRobin {
    /// Round robin for when nothing ready has a weight.
    next: usize,
}

impl SmoothWeightedRoundRobin {
    /// The policy.
    pub fn new() -> Self {
        SmoothWeightedRoundRobin::default()
    }
}

impl sealed::Sealed for SmoothWeightedRoundRobin {}

impl<S: Weight> Policy<S> for SmoothWeightedRoundRobin {
    const TRACK_IN_FLIGHT: bool = false;

    fn pick<K: Eq + Hash, Req>(
        &mut self,
        ready: &mut ReadyCache<K, Node<S>, Req>,
        _changed: bool,
    ) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, (_, node)) in ready.iter_ready_mut().enumerate() {
            let weight = i64::from(node.weight());
            if weight == 0 {
                continue;
            }
            node.current += weight;
            total += weight;
            if best.is_none_or(|(_, current)| node.current > current) {
                best = Some((i, node.current));
            }
        }
        match best {
            Some((i, _)) => {
                let (_, node) = ready.get_ready_index_mut(i).expect("index below ready_len");
                node.current -= total;
                Some(i)
            }
            None => round_robin(&mut self.next, ready),
        }
    }
}

// ---------------------------------------------------------------------------

/// Least requests: the ready endpoint with the fewest requests in flight per
/// unit of weight (`in_flight / weight`); ties are broken at random in
/// proportion to weight, so idle endpoints share the traffic by weight.
///
/// The balancer counts the requests in flight itself (from `call` until the
/// response future completes or is dropped), so the endpoint services need
/// no [`Load`]. Endpoints of weight 0 get nothing while another is ready
/// (with none, the fewest in flight wins). A pick scans every ready endpoint:
/// O(n), 4 to 5 µs for 1000 in `benches/balance_pick.rs`; for large sets,
/// [`WeightedP2c`] over an in-flight load is O(log n). See the
/// [module docs](super) for an example.
#[derive(Clone)]
pub struct LeastRequests {
    rng: FastRng,
}

impl LeastRequests {
    /// The policy, seeded from the operating system's randomness.
    pub fn new() -> Self {
        LeastRequests {
            rng: FastRng::new(None),
        }
    }

    /// The policy with a fixed seed (ties are broken at random), for
    /// repeatable tests and simulations.
    pub fn with_seed(seed: u64) -> Self {
        LeastRequests {
            rng: FastRng::new(Some(seed)),
        }
    }

    fn scan<K: Eq + Hash, S, Req>(
        &mut self,
        ready: &ReadyCache<K, Node<S>, Req>,
        weight: impl Fn(&Node<S>) -> u64,
    ) -> Option<usize> {
        // (index, in flight, weight) of the best so far, and the weight of
        // every endpoint tied with it.
        let mut best: Option<(usize, u64, u64)> = None;
        let mut tied = 0u64;
        for (i, (_, node)) in ready.iter_ready().enumerate() {
            let w = weight(node);
            if w == 0 {
                continue;
            }
            let f = node.in_flight() as u64;
            match best {
                None => {
                    best = Some((i, f, w));
                    tied = w;
                }
                Some((_, best_f, best_w)) => {
                    // f / w against best_f / best_w, without dividing.
                    let ours = u128::from(f) * u128::from(best_w);
                    let theirs = u128::from(best_f) * u128::from(w);
                    if ours < theirs {
                        best = Some((i, f, w));
                        tied = w;
                    } else if ours == theirs {
                        // Weighted reservoir sampling over the ties.
                        tied += w;
                        if self.rng.below(tied) < w {
                            best = Some((i, f, w));
                        }
                    }
                }
            }
        }
        best.map(|(i, _, _)| i)
    }
}

impl Default for LeastRequests {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LeastRequests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeastRequests").finish_non_exhaustive()
    }
}

impl sealed::Sealed for LeastRequests {}

impl<S: Weight> Policy<S> for LeastRequests {
    const TRACK_IN_FLIGHT: bool = true;

    fn pick<K: Eq + Hash, Req>(
        &mut self,
        ready: &mut ReadyCache<K, Node<S>, Req>,
        _changed: bool,
    ) -> Option<usize> {
        if ready.ready_len() == 0 {
            return None;
        }
        self.scan(ready, |node| u64::from(node.weight()))
            .or_else(|| self.scan(ready, |_| 1))
    }
}
