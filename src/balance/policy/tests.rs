//! Unit tests of the policies: selection shares over many picks, readiness,
//! membership changes through discovery, metrics.

use std::convert::Infallible;
use std::future::{Future, Ready};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::channel::mpsc;
use futures::FutureExt;
use tower::discover::Change;
use tower::load::Load;
use tower::Service;

use super::core::hash_value;
use super::ring::Ring;
use super::*;
use crate::balance::ReadyTimeoutLayer;
use crate::discover::{Endpoint, Static, Weighted};
use crate::error::{BoxError, NoEndpoints};

// ---------------------------------------------------------------------------
// A test endpoint.

/// What a test controls of an endpoint: its readiness, its load, whether
/// `poll_ready` fails.
#[derive(Default)]
struct Gate {
    not_ready: AtomicBool,
    fail: AtomicBool,
    load: AtomicU64,
    calls: AtomicUsize,
    waker: Mutex<Option<Waker>>,
}

impl Gate {
    fn set_ready(&self, ready: bool) {
        self.not_ready.store(!ready, SeqCst);
        if ready {
            if let Some(waker) = self.waker.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    fn set_load(&self, load: u64) {
        self.load.store(load, SeqCst);
    }
}

/// Answers with its id at once; ready while its gate says so.
#[derive(Clone)]
struct Ep {
    id: usize,
    gate: Arc<Gate>,
}

impl<R> Service<R> for Ep {
    type Response = usize;
    type Error = BoxError;
    type Future = Ready<Result<usize, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.gate.fail.load(SeqCst) {
            return Poll::Ready(Err("endpoint broke".into()));
        }
        if self.gate.not_ready.load(SeqCst) {
            *self.gate.waker.lock().unwrap() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: R) -> Self::Future {
        self.gate.calls.fetch_add(1, SeqCst);
        std::future::ready(Ok(self.id))
    }
}

impl Load for Ep {
    type Metric = f64;

    fn load(&self) -> f64 {
        self.gate.load.load(SeqCst) as f64
    }
}

type Svc = Weighted<Ep>;
type Tx = mpsc::UnboundedSender<Result<Change<usize, Svc>, Infallible>>;
type Rx = mpsc::UnboundedReceiver<Result<Change<usize, Svc>, Infallible>>;

/// Endpoints `0..weights.len()` with those weights, announced on a
/// discovery stream the test keeps feeding.
struct Fleet {
    tx: Tx,
    gates: Vec<Arc<Gate>>,
}

impl Fleet {
    fn new(weights: &[u32]) -> (Fleet, Rx) {
        let (tx, rx) = mpsc::unbounded();
        let mut fleet = Fleet {
            tx,
            gates: Vec::new(),
        };
        for &weight in weights {
            fleet.add(weight);
        }
        (fleet, rx)
    }

    /// Inserts a new endpoint; its id (and key) is the next index.
    fn add(&mut self, weight: u32) -> usize {
        let id = self.gates.len();
        self.gates.push(Arc::default());
        self.insert(id, id, weight);
        id
    }

    /// Inserts under `key` a service answering `id` (for replacements).
    fn insert(&self, key: usize, id: usize, weight: u32) {
        let gate = self.gates[id].clone();
        let svc = Weighted::new(Ep { id, gate }, weight);
        self.tx
            .unbounded_send(Ok(Change::Insert(key, svc)))
            .unwrap();
    }

    /// A service answering a new id, not yet announced.
    fn spare(&mut self) -> usize {
        self.gates.push(Arc::default());
        self.gates.len() - 1
    }

    fn remove(&self, key: usize) {
        self.tx.unbounded_send(Ok(Change::Remove(key))).unwrap();
    }

    fn gate(&self, id: usize) -> &Gate {
        &self.gates[id]
    }
}

fn noop_cx() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// One request: `poll_ready` must be Ready, and the answer immediate. The
/// response future is returned unpolled, so the call stays in flight until
/// it is dropped.
fn start<S, R>(svc: &mut S, request: R) -> S::Future
where
    S: Service<R, Error = BoxError>,
{
    match svc.poll_ready(&mut noop_cx()) {
        Poll::Ready(Ok(())) => svc.call(request),
        Poll::Ready(Err(e)) => panic!("poll_ready failed: {e}"),
        Poll::Pending => panic!("poll_ready pending"),
    }
}

/// One request, answered: the id of the endpoint that took it.
fn send<S, R>(svc: &mut S, request: R) -> usize
where
    S: Service<R, Response = usize, Error = BoxError>,
{
    start(svc, request)
        .now_or_never()
        .expect("answered at once")
        .expect("call failed")
}

fn is_pending<S: Service<R>, R>(svc: &mut S) -> bool {
    svc.poll_ready(&mut noop_cx()).is_pending()
}

/// How many of `picks` requests each endpoint took.
fn shares<S>(svc: &mut S, endpoints: usize, picks: usize) -> Vec<usize>
where
    S: Service<u64, Response = usize, Error = BoxError>,
{
    let mut counts = vec![0; endpoints];
    for i in 0..picks {
        counts[send(svc, i as u64)] += 1;
    }
    counts
}

/// Each count is within `tolerance` (a share of `picks`) of its weight's
/// share.
#[track_caller]
fn assert_proportional(counts: &[usize], weights: &[u32], tolerance: f64) {
    let picks: usize = counts.iter().sum();
    let total: u32 = weights.iter().sum();
    for (i, (&count, &weight)) in counts.iter().zip(weights).enumerate() {
        let got = count as f64 / picks as f64;
        let want = f64::from(weight) / f64::from(total);
        assert!(
            (got - want).abs() <= tolerance,
            "endpoint {i}: share {got:.4}, want {want:.4} ± {tolerance} (counts {counts:?})"
        );
    }
}

// ---------------------------------------------------------------------------
// Weighted P2C.

#[test]
fn weighted_p2c_follows_weights_when_loads_are_equal() {
    let weights = [100, 200, 300];
    let (_fleet, rx) = Fleet::new(&weights);
    let mut balancer = Balancer::new(rx, WeightedP2c::with_seed(7));
    let counts = shares(&mut balancer, 3, 60_000);
    assert_proportional(&counts, &weights, 0.01);
}

#[test]
fn weighted_p2c_follows_weights_over_many_endpoints() {
    // 20 endpoints of weight 100 and one of 2000: the heavy one gets half.
    let mut weights = vec![100; 20];
    weights.push(2000);
    let (_fleet, rx) = Fleet::new(&weights);
    let mut balancer = Balancer::new(rx, WeightedP2c::with_seed(11));
    let counts = shares(&mut balancer, 21, 100_000);
    assert_proportional(&counts, &weights, 0.01);
}

#[test]
fn weighted_p2c_picks_the_lower_load_per_weight() {
    let (fleet, rx) = Fleet::new(&[100, 100]);
    let mut balancer = Balancer::new(rx, WeightedP2c::with_seed(1));
    fleet.gate(0).set_load(10);
    assert_eq!(shares(&mut balancer, 2, 1000), [0, 1000]);

    // Load 3 on weight 300 (1 per unit) beats load 2 on weight 100 (2).
    let (fleet, rx) = Fleet::new(&[300, 100]);
    let mut balancer = Balancer::new(rx, WeightedP2c::with_seed(2));
    fleet.gate(0).set_load(3);
    fleet.gate(1).set_load(2);
    assert_eq!(shares(&mut balancer, 2, 1000), [1000, 0]);
    // 3 per unit against 2: the other way.
    fleet.gate(0).set_load(9);
    assert_eq!(shares(&mut balancer, 2, 1000), [0, 1000]);
}

#[test]
fn weighted_p2c_gives_nothing_to_weight_zero_while_another_is_ready() {
    let (fleet, rx) = Fleet::new(&[0, 100, 0]);
    let mut balancer = Balancer::new(rx, WeightedP2c::with_seed(3));
    assert_eq!(shares(&mut balancer, 3, 3000), [0, 3000, 0]);

    // The only weighted endpoint goes: the weight-0 ones share the traffic.
    fleet.gate(1).set_ready(false);
    let counts = shares(&mut balancer, 3, 3000);
    assert_eq!(counts[1], 0);
    assert!(counts[0] > 1000 && counts[2] > 1000, "{counts:?}");

    // It comes back: it takes everything again.
    fleet.gate(1).set_ready(true);
    assert_eq!(shares(&mut balancer, 3, 3000), [0, 3000, 0]);
}

#[test]
fn weighted_p2c_sees_a_changed_weight() {
    let (_a, b) = (
        "10.0.0.1:80".parse::<SocketAddr>().unwrap(),
        "10.0.0.2:80".parse::<SocketAddr>().unwrap(),
    );
    let make = |e: &Endpoint| {
        let id = usize::from(e.addr().ip() == IpAddr::from([10, 0, 0, 2]));
        Ep {
            id,
            gate: Arc::default(),
        }
    };
    let (discover, handle) = Static::new(
        [_a, b].map(|addr| Endpoint::new(addr).with_weight(100)),
        make,
    );
    let mut balancer = Balancer::new(discover, WeightedP2c::with_seed(5));
    let counts = shares(&mut balancer, 2, 10_000);
    assert_proportional(&counts, &[1, 1], 0.02);

    // The same endpoint with another weight keeps its service; the new
    // weight is read within 1024 picks.
    handle.add(Endpoint::new(b).with_weight(300));
    shares(&mut balancer, 2, 1024);
    let counts = shares(&mut balancer, 2, 20_000);
    assert_proportional(&counts, &[1, 3], 0.02);
}

// ---------------------------------------------------------------------------
// Round robin.

#[test]
fn round_robin_is_even() {
    let (_fleet, rx) = Fleet::new(&[100, 300, 100, 0]);
    let mut balancer = Balancer::new(rx, RoundRobin::new());
    let first: Vec<usize> = (0..3).map(|i| send(&mut balancer, i)).collect();
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 1, 2], "each weighted endpoint once per turn");
    // The same order every turn; weights ignored but weight 0 skipped.
    for turn in 0..100 {
        let next: Vec<usize> = (0..3).map(|i| send(&mut balancer, i)).collect();
        assert_eq!(next, first, "turn {turn}");
    }
}

#[test]
fn round_robin_skips_endpoints_that_are_not_ready() {
    let (fleet, rx) = Fleet::new(&[100, 100, 100]);
    let mut balancer = Balancer::new(rx, RoundRobin::new());
    assert_eq!(shares(&mut balancer, 3, 300), [100, 100, 100]);
    fleet.gate(1).set_ready(false);
    // (Finding it not ready reorders the ready set once: one extra turn.)
    let counts = shares(&mut balancer, 3, 300);
    assert_eq!(counts[1], 0);
    assert!(counts[0].abs_diff(counts[2]) <= 2, "{counts:?}");
    fleet.gate(1).set_ready(true);
    let counts = shares(&mut balancer, 3, 300);
    assert!(counts.iter().all(|&c| c.abs_diff(100) <= 1), "{counts:?}");
    assert_eq!(shares(&mut balancer, 3, 300), [100, 100, 100]);
}

// ---------------------------------------------------------------------------
// Smooth weighted round robin.

#[test]
fn smooth_weighted_round_robin_follows_nginx_sequence() {
    let (_fleet, rx) = Fleet::new(&[5, 1, 1]);
    let mut balancer = Balancer::new(rx, SmoothWeightedRoundRobin::new());
    // nginx's documented sequence for weights 5, 1, 1: a a b a c a a, and
    // again in every cycle.
    for cycle in 0..20 {
        let sequence: Vec<usize> = (0..7).map(|i| send(&mut balancer, i)).collect();
        assert_eq!(sequence, [0, 0, 1, 0, 2, 0, 0], "cycle {cycle}");
    }
}

#[test]
fn smooth_weighted_round_robin_shares_are_exact_over_every_cycle() {
    let weights = [100, 200, 300, 0];
    let (_fleet, rx) = Fleet::new(&weights);
    let mut balancer = Balancer::new(rx, SmoothWeightedRoundRobin::new());
    // A cycle is 600 picks (the sum of the weights).
    for cycle in 0..10 {
        assert_eq!(
            shares(&mut balancer, 4, 600),
            [100, 200, 300, 0],
            "cycle {cycle}"
        );
    }
    // Spread out: in any 6 picks, the heaviest appears 3 times.
    let sequence: Vec<usize> = (0..600).map(|i| send(&mut balancer, i)).collect();
    for window in sequence.windows(6) {
        let heavy = window.iter().filter(|&&id| id == 2).count();
        assert!((2..=4).contains(&heavy), "{window:?}");
    }
}

#[test]
fn smooth_weighted_round_robin_skips_endpoints_that_are_not_ready() {
    let (fleet, rx) = Fleet::new(&[100, 200, 300]);
    let mut balancer = Balancer::new(rx, SmoothWeightedRoundRobin::new());
    fleet.gate(2).set_ready(false);
    // Endpoint 2 is found not ready when first picked, then skipped; the
    // others share by weight.
    let counts = shares(&mut balancer, 3, 3000);
    assert_eq!(counts[2], 0);
    assert_proportional(&counts[..2], &[100, 200], 0.001);
}

// ---------------------------------------------------------------------------
// Least requests.

#[test]
fn least_requests_prefers_the_idle_endpoint() {
    let (fleet, rx) = Fleet::new(&[100, 100, 100]);
    let mut balancer = Balancer::new(rx, LeastRequests::with_seed(1));
    let calls = |fleet: &Fleet| -> Vec<usize> {
        (0..3).map(|id| fleet.gate(id).calls.load(SeqCst)).collect()
    };
    // Two calls held in flight, on two endpoints: every other call goes to
    // the third, which stays idle (its calls end at once).
    let first = start(&mut balancer, 0);
    let after_first = calls(&fleet);
    let second = start(&mut balancer, 1);
    let held = calls(&fleet);
    let idle = held
        .iter()
        .position(|&c| c == 0)
        .expect("two distinct endpoints");
    let busy = (0..3).find(|&id| held[id] > after_first[id]).unwrap();
    for i in 0..100 {
        assert_eq!(send(&mut balancer, i), idle);
    }
    // One of them ends: two idle endpoints share the traffic, the busy one
    // gets nothing.
    drop(first);
    let before = calls(&fleet);
    shares(&mut balancer, 3, 200);
    let after = calls(&fleet);
    assert_eq!(after[busy], before[busy]);
    assert!((0..3)
        .filter(|&id| id != busy)
        .all(|id| after[id] > before[id] + 50));
    drop(second);

    // Calls held one after another: the in-flight counts never differ by
    // more than one.
    let mut held = Vec::new();
    let base = calls(&fleet);
    for i in 0..30 {
        held.push(start(&mut balancer, i));
        let in_flight: Vec<usize> = calls(&fleet)
            .iter()
            .zip(&base)
            .map(|(c, b)| c - b)
            .collect();
        let spread = in_flight.iter().max().unwrap() - in_flight.iter().min().unwrap();
        assert!(spread <= 1, "{in_flight:?}");
    }
}

#[test]
fn least_requests_spreads_held_calls_by_weight() {
    let weights = [100, 200, 300];
    let (_fleet, rx) = Fleet::new(&weights);
    let mut balancer = Balancer::new(rx, LeastRequests::with_seed(2));
    // 600 calls held: the in-flight counts follow the weights exactly.
    let held: Vec<_> = (0..600).map(|i| start(&mut balancer, i)).collect();
    let mut counts = [0usize; 3];
    for call in held {
        counts[call.now_or_never().unwrap().unwrap()] += 1;
    }
    assert_eq!(counts, [100, 200, 300]);
}

#[test]
fn least_requests_breaks_ties_by_weight() {
    let weights = [100, 200, 300];
    let (_fleet, rx) = Fleet::new(&weights);
    let mut balancer = Balancer::new(rx, LeastRequests::with_seed(3));
    // Calls end at once, so every pick is a tie between idle endpoints.
    let counts = shares(&mut balancer, 3, 60_000);
    assert_proportional(&counts, &weights, 0.01);
}

// ---------------------------------------------------------------------------
// Consistent hashing: the ring.

fn ring_of(ids: &[usize], weight: u32) -> Ring<usize> {
    Ring::build(
        ids.iter().map(|id| (id, weight)),
        RingHash::DEFAULT_VIRTUAL_NODES,
    )
}

fn owners(ring: &Ring<usize>, keys: u64) -> Vec<usize> {
    (0..keys)
        .map(|k| *ring.lookup(hash_value(&k)).unwrap())
        .collect()
}

#[test]
fn ring_adding_one_endpoint_moves_at_most_its_share_of_keys() {
    const KEYS: u64 = 10_000;
    for n in [2, 5, 10, 20, 50] {
        let before: Vec<usize> = (0..n - 1).collect();
        let after: Vec<usize> = (0..n).collect();
        let old = owners(&ring_of(&before, 100), KEYS);
        let new = owners(&ring_of(&after, 100), KEYS);
        let mut moved = 0;
        for (o, n2) in old.iter().zip(&new) {
            if o != n2 {
                moved += 1;
                assert_eq!(*n2, n - 1, "a key moved between endpoints that stayed");
            }
        }
        let bound = 1.5 / n as f64 * KEYS as f64;
        assert!(
            (moved as f64) <= bound,
            "adding the {n}th endpoint moved {moved} of {KEYS} keys (bound {bound})"
        );
        assert!(moved > 0);
    }
}

#[test]
fn ring_removing_one_endpoint_moves_only_its_keys() {
    const KEYS: u64 = 10_000;
    let all: Vec<usize> = (0..10).collect();
    let old = owners(&ring_of(&all, 100), KEYS);
    let without: Vec<usize> = all.iter().copied().filter(|&id| id != 4).collect();
    let new = owners(&ring_of(&without, 100), KEYS);
    for (k, (o, n)) in old.iter().zip(&new).enumerate() {
        if *o == 4 {
            assert_ne!(*n, 4);
        } else {
            assert_eq!(o, n, "key {k} moved though its endpoint stayed");
        }
    }
}

#[test]
fn ring_points_follow_weights() {
    const KEYS: u64 = 30_000;
    let weights = [100u32, 200, 300];
    let ring = Ring::build(
        [0usize, 1, 2].iter().zip(weights),
        RingHash::DEFAULT_VIRTUAL_NODES,
    );
    assert_eq!(ring.len(), 160 + 320 + 480);
    let mut counts = [0usize; 3];
    for owner in owners(&ring, KEYS) {
        counts[owner] += 1;
    }
    assert_proportional(&counts, &weights, 0.05);
}

#[test]
fn ring_does_not_depend_on_the_order_of_its_members() {
    let forward: Vec<usize> = (0..20).collect();
    let backward: Vec<usize> = (0..20).rev().collect();
    assert_eq!(
        owners(&ring_of(&forward, 100), 5000),
        owners(&ring_of(&backward, 100), 5000)
    );
}

#[test]
fn ring_hash_rejects_bad_virtual_nodes() {
    let err = RingHash::try_new(0).unwrap_err();
    assert_eq!(err.field(), "virtual_nodes");
    let err = RingHash::try_new(RingHash::MAX_VIRTUAL_NODES + 1).unwrap_err();
    assert_eq!(err.field(), "virtual_nodes");
    assert_eq!(RingHash::try_new(1).unwrap().virtual_nodes(), 1);
    let panic = std::panic::catch_unwind(|| RingHash::new(0)).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("virtual_nodes"), "{message}");
}

// ---------------------------------------------------------------------------
// Consistent hashing: the service.

fn by_request() -> HashKey<u64> {
    HashKey::from_fn(|request: &u64| Some(*request))
}

/// The endpoint of each key `0..keys`.
fn route<S>(svc: &mut S, keys: u64) -> Vec<usize>
where
    S: Service<u64, Response = usize, Error = BoxError>,
{
    (0..keys).map(|k| send(svc, k)).collect()
}

#[test]
fn consistent_hash_sends_a_key_to_one_endpoint() {
    let (_fleet, rx) = Fleet::new(&[100; 5]);
    let mut balancer = ConsistentHash::new(rx, by_request(), RingHash::default());
    let first = route(&mut balancer, 2000);
    for _ in 0..3 {
        assert_eq!(route(&mut balancer, 2000), first);
    }
    // Every endpoint gets keys.
    let mut counts = [0usize; 5];
    for id in &first {
        counts[*id] += 1;
    }
    assert!(counts.iter().all(|&c| c > 200), "{counts:?}");
}

#[test]
fn consistent_hash_moves_keys_only_while_their_endpoint_is_not_ready() {
    let (fleet, rx) = Fleet::new(&[100; 5]);
    let mut balancer = ConsistentHash::new(rx, by_request(), RingHash::default());
    let all_ready = route(&mut balancer, 2000);

    fleet.gate(3).set_ready(false);
    let without_3 = route(&mut balancer, 2000);
    for (k, (before, now)) in all_ready.iter().zip(&without_3).enumerate() {
        if *before == 3 {
            assert_ne!(*now, 3, "key {k}");
        } else {
            assert_eq!(before, now, "key {k} moved though its endpoint is ready");
        }
    }
    // The moved keys went where the ring without endpoint 3 sends them.
    let ring = ring_of(&[0, 1, 2, 4], 100);
    for (k, now) in without_3.iter().enumerate() {
        assert_eq!(now, ring.lookup(hash_value(&(k as u64))).unwrap());
    }

    fleet.gate(3).set_ready(true);
    assert_eq!(route(&mut balancer, 2000), all_ready, "keys come back");
}

#[test]
fn consistent_hash_follows_discovery() {
    const KEYS: u64 = 10_000;
    let (mut fleet, rx) = Fleet::new(&[100; 9]);
    let mut balancer = ConsistentHash::new(rx, by_request(), RingHash::default());
    let nine = route(&mut balancer, KEYS);

    let tenth = fleet.add(100);
    let ten = route(&mut balancer, KEYS);
    let moved = nine.iter().zip(&ten).filter(|(a, b)| a != b).count();
    assert!(
        moved > 0 && moved as f64 <= 1.5 / 10.0 * KEYS as f64,
        "{moved}"
    );
    for (a, b) in nine.iter().zip(&ten) {
        assert!(
            a == b || *b == tenth,
            "a key moved between endpoints that stayed"
        );
    }

    fleet.remove(tenth);
    assert_eq!(route(&mut balancer, KEYS), nine);
    assert_eq!(balancer.len(), 9);
}

#[test]
fn consistent_hash_spreads_keyless_requests_by_weight() {
    let weights = [100, 300];
    let (_fleet, rx) = Fleet::new(&weights);
    let key = HashKey::from_fn(|_: &u64| None::<u64>);
    let mut balancer = ConsistentHash::new(rx, key, RingHash::default().with_seed(9));
    let counts = shares(&mut balancer, 2, 20_000);
    assert_proportional(&counts, &weights, 0.06);
    assert!(counts[0] > 0);
}

#[test]
fn consistent_hash_gives_nothing_to_weight_zero_while_another_is_ready() {
    let (fleet, rx) = Fleet::new(&[0, 100]);
    let mut balancer = ConsistentHash::new(rx, by_request(), RingHash::default());
    assert!(route(&mut balancer, 1000).iter().all(|&id| id == 1));
    fleet.gate(1).set_ready(false);
    assert!(route(&mut balancer, 1000).iter().all(|&id| id == 0));
    fleet.gate(1).set_ready(true);
    assert!(route(&mut balancer, 1000).iter().all(|&id| id == 1));
}

fn http_request(f: impl FnOnce(&mut http::Request<()>)) -> http::Request<()> {
    let mut request = http::Request::new(());
    f(&mut request);
    request
}

#[test]
fn consistent_hash_keys_on_a_header() {
    let (_fleet, rx) = Fleet::new(&[100; 8]);
    let key = HashKey::header(http::HeaderName::from_static("x-user"));
    let mut balancer = ConsistentHash::new(rx, key, RingHash::default());
    let user = |name: &str| {
        let value = http::HeaderValue::from_str(name).unwrap();
        http_request(move |r| {
            r.headers_mut().insert("x-user", value);
        })
    };
    let mut seen = std::collections::HashSet::new();
    for i in 0..200 {
        let name = format!("user-{i}");
        let id = send(&mut balancer, user(&name));
        for _ in 0..5 {
            assert_eq!(send(&mut balancer, user(&name)), id);
        }
        seen.insert(id);
    }
    assert_eq!(seen.len(), 8, "users spread over every endpoint");
}

#[test]
fn consistent_hash_keys_on_the_client_ip() {
    let (_fleet, rx) = Fleet::new(&[100; 8]);
    let mut balancer = ConsistentHash::new(rx, HashKey::client_ip(), RingHash::default());
    let from = |addr: SocketAddr| {
        http_request(|r| {
            r.extensions_mut().insert(addr);
        })
    };
    let mut seen = std::collections::HashSet::new();
    for i in 0..100u8 {
        let ip = IpAddr::from([192, 0, 2, i]);
        let id = send(&mut balancer, from(SocketAddr::new(ip, 40_000)));
        seen.insert(id);
        // Another connection (port) from that address, and the address as a
        // `ClientAddr`, and as IPv4-mapped IPv6: the same endpoint.
        assert_eq!(send(&mut balancer, from(SocketAddr::new(ip, 50_000))), id);
        let client = http_request(|r| {
            r.extensions_mut().insert(ClientAddr(ip));
        });
        assert_eq!(send(&mut balancer, client), id);
        let IpAddr::V4(v4) = ip else { unreachable!() };
        let mapped = ClientAddr(IpAddr::V6(v4.to_ipv6_mapped()));
        let client = http_request(|r| {
            r.extensions_mut().insert(mapped);
        });
        assert_eq!(send(&mut balancer, client), id);
    }
    assert!(seen.len() >= 6, "{seen:?}");
}

#[test]
fn consistent_hash_forwarded_for_takes_the_first_address_only_when_configured() {
    let (_fleet, rx) = Fleet::new(&[100; 8]);
    let mut by_forwarded = ConsistentHash::new(rx, HashKey::forwarded_for(), RingHash::default());
    let forwarded = |value: &'static str| {
        http_request(|r| {
            r.headers_mut()
                .insert("x-forwarded-for", http::HeaderValue::from_static(value));
        })
    };
    let mut seen = std::collections::HashSet::new();
    for i in 0..50u8 {
        let client = format!("198.51.100.{i}");
        let value: &'static str = Box::leak(format!("{client}, 10.0.0.1").into_boxed_str());
        let other_proxy: &'static str = Box::leak(format!("{client},10.9.9.9").into_boxed_str());
        let id = send(&mut by_forwarded, forwarded(value));
        assert_eq!(send(&mut by_forwarded, forwarded(other_proxy)), id);
        seen.insert(id);
    }
    assert!(seen.len() >= 5, "{seen:?}");

    // The client IP key ignores the header: with no address in the
    // extensions, requests are key-less and spread.
    let (_fleet, rx) = Fleet::new(&[100; 8]);
    let mut by_ip = ConsistentHash::new(rx, HashKey::client_ip(), RingHash::default());
    let spread: std::collections::HashSet<usize> = (0..200)
        .map(|_| send(&mut by_ip, forwarded("198.51.100.7")))
        .collect();
    assert!(spread.len() >= 6, "{spread:?}");
}

// ---------------------------------------------------------------------------
// Every policy: readiness and membership.

/// Each policy's balancer over the same kind of stream, as a boxed service.
type Boxed = Box<dyn Service<u64, Response = usize, Error = BoxError, Future = BoxFut>>;
type BoxFut = std::pin::Pin<Box<dyn Future<Output = Result<usize, BoxError>>>>;

struct BoxedSvc<S>(S);

impl<S> Service<u64> for BoxedSvc<S>
where
    S: Service<u64, Response = usize, Error = BoxError>,
    S::Future: 'static,
{
    type Response = usize;
    type Error = BoxError;
    type Future = BoxFut;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: u64) -> BoxFut {
        Box::pin(self.0.call(request))
    }
}

fn every_policy(weights: &[u32]) -> Vec<(&'static str, Fleet, Boxed)> {
    let mut all: Vec<(&'static str, Fleet, Boxed)> = Vec::new();
    let (f, rx) = Fleet::new(weights);
    all.push((
        "weighted p2c",
        f,
        Box::new(BoxedSvc(Balancer::new(rx, WeightedP2c::with_seed(1)))),
    ));
    let (f, rx) = Fleet::new(weights);
    all.push((
        "round robin",
        f,
        Box::new(BoxedSvc(Balancer::new(rx, RoundRobin::new()))),
    ));
    let (f, rx) = Fleet::new(weights);
    all.push((
        "swrr",
        f,
        Box::new(BoxedSvc(Balancer::new(rx, SmoothWeightedRoundRobin::new()))),
    ));
    let (f, rx) = Fleet::new(weights);
    all.push((
        "least requests",
        f,
        Box::new(BoxedSvc(Balancer::new(rx, LeastRequests::with_seed(1)))),
    ));
    let (f, rx) = Fleet::new(weights);
    let ring = RingHash::default().with_seed(1);
    all.push((
        "consistent hash",
        f,
        Box::new(BoxedSvc(ConsistentHash::new(rx, by_request(), ring))),
    ));
    all
}

#[test]
fn every_policy_skips_endpoints_that_are_not_ready_and_waits_when_none_is() {
    for (policy, fleet, mut balancer) in every_policy(&[100, 100, 100]) {
        fleet.gate(0).set_ready(false);
        let counts = shares(&mut balancer, 3, 900);
        assert_eq!(counts[0], 0, "{policy}: {counts:?}");
        assert!(counts[1] > 0 && counts[2] > 0, "{policy}: {counts:?}");

        fleet.gate(1).set_ready(false);
        fleet.gate(2).set_ready(false);
        // Nothing ready: Pending, and woken when an endpoint is ready.
        let mut task = tokio_test::task::spawn(());
        assert!(
            task.enter(|cx, _| balancer.poll_ready(cx).is_pending()),
            "{policy}"
        );
        assert!(!task.is_woken());
        fleet.gate(2).set_ready(true);
        assert!(task.is_woken(), "{policy}: woken by the endpoint");
        assert_eq!(send(&mut balancer, 0), 2, "{policy}");
    }
}

#[test]
fn every_policy_follows_insert_replace_and_remove() {
    for (policy, mut fleet, mut balancer) in every_policy(&[100, 100]) {
        assert_eq!(shares(&mut balancer, 4, 600)[2..], [0, 0], "{policy}");

        // A new endpoint takes traffic.
        let added = fleet.add(100);
        let counts = shares(&mut balancer, 4, 600);
        assert!(counts[added] > 0, "{policy}: {counts:?}");

        // Endpoint 0 replaced by a service answering `spare`, not ready yet:
        // the old service keeps serving.
        let spare = fleet.spare();
        fleet.gate(spare).set_ready(false);
        fleet.insert(0, spare, 100);
        let counts = shares(&mut balancer, 4, 600);
        assert!(counts[0] > 0 && counts[spare] == 0, "{policy}: {counts:?}");
        // Ready: the new one serves, the old one no more.
        fleet.gate(spare).set_ready(true);
        let counts = shares(&mut balancer, 4, 600);
        assert!(counts[0] == 0 && counts[spare] > 0, "{policy}: {counts:?}");

        // Removed: nothing more, even when its service is ready.
        fleet.remove(added);
        let counts = shares(&mut balancer, 4, 600);
        assert_eq!(counts[added], 0, "{policy}: {counts:?}");
        fleet.remove(0);
        let counts = shares(&mut balancer, 4, 600);
        assert_eq!(counts, [0, 600, 0, 0], "{policy}");

        // Removing the last one leaves nothing to wait for.
        fleet.remove(1);
        assert!(is_pending(&mut balancer), "{policy}");
    }
}

#[test]
fn every_policy_drops_a_failed_endpoint_and_never_fails() {
    for (policy, fleet, mut balancer) in every_policy(&[100, 100]) {
        assert!(shares(&mut balancer, 2, 100).iter().all(|&c| c > 0));
        fleet.gate(0).fail.store(true, SeqCst);
        // poll_ready never fails: the broken endpoint is dropped.
        let counts = shares(&mut balancer, 2, 200);
        assert_eq!(counts, [0, 200], "{policy}");
        // It stays dropped when it would work again: discovery must insert it.
        fleet.gate(0).fail.store(false, SeqCst);
        assert_eq!(shares(&mut balancer, 2, 200), [0, 200], "{policy}");
        fleet.insert(0, 0, 100);
        assert!(shares(&mut balancer, 2, 400)[0] > 0, "{policy}");
    }
}

#[test]
fn every_policy_survives_discovery_errors_and_the_end_of_discovery() {
    let (tx, rx) = mpsc::unbounded::<Result<Change<usize, Svc>, &'static str>>();
    let mut balancer = Balancer::new(rx, RoundRobin::new());
    let svc = |id| {
        Weighted::new(
            Ep {
                id,
                gate: Arc::default(),
            },
            100,
        )
    };
    tx.unbounded_send(Ok(Change::Insert(0, svc(0)))).unwrap();
    tx.unbounded_send(Err("resolver down")).unwrap();
    tx.unbounded_send(Ok(Change::Insert(1, svc(1)))).unwrap();
    // The error is skipped (the task is woken to read on); both endpoints
    // arrive.
    let mut task = tokio_test::task::spawn(());
    let ready = task.enter(|cx, _| Service::<u64>::poll_ready(&mut balancer, cx));
    assert!(matches!(ready, Poll::Ready(Ok(()))));
    assert!(task.is_woken());
    assert_eq!(shares(&mut balancer, 2, 100), [50, 50]);
    // The stream ends: the endpoints stay.
    drop(tx);
    assert_eq!(shares(&mut balancer, 2, 100), [50, 50]);
    assert_eq!(balancer.len(), 2);
}

#[test]
fn static_source_endpoints_come_and_go() {
    let addr = |i: u8| SocketAddr::from(([10, 0, 0, i], 80));
    let make = |e: &Endpoint| Ep {
        id: usize::from(e.addr().ip().to_canonical().to_string().ends_with('2')),
        gate: Arc::default(),
    };
    let (discover, handle) = Static::new([addr(1)], make);
    let mut balancer = Balancer::new(discover, SmoothWeightedRoundRobin::new());
    assert_eq!(shares(&mut balancer, 2, 10), [10, 0]);
    handle.add(Endpoint::new(addr(2)).with_weight(300));
    assert_eq!(shares(&mut balancer, 2, 400), [100, 300]);
    handle.replace([addr(2)]);
    assert_eq!(shares(&mut balancer, 2, 10), [0, 10]);
}

#[tokio::test(start_paused = true)]
async fn no_ready_endpoint_fails_with_no_endpoints_after_the_timeout() {
    use tower::{Layer, ServiceExt};

    let (fleet, rx) = Fleet::new(&[100]);
    fleet.gate(0).set_ready(false);
    let balancer = Balancer::new(rx, WeightedP2c::new());
    let mut svc = ReadyTimeoutLayer::new(Duration::from_secs(1)).layer(balancer);
    let started = tokio::time::Instant::now();
    let err = svc.ready().await.unwrap().call(0u64).await.unwrap_err();
    assert!(err.is::<NoEndpoints>(), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(1));

    // An endpoint ready again ends the outage.
    fleet.gate(0).set_ready(true);
    assert_eq!(svc.ready().await.unwrap().call(0u64).await.unwrap(), 0);
}

#[test]
fn metrics_count_requests_per_endpoint_and_endpoints_by_state() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let value = |series: &str| -> Option<f64> {
        prometheus
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    };
    metrics::with_local_recorder(&recorder, || {
        let (fleet, rx) = Fleet::new(&[100, 100, 100]);
        fleet.gate(2).set_ready(false);
        let mut balancer = Balancer::named("api", rx, RoundRobin::new());
        let counts = shares(&mut balancer, 3, 10);
        assert_eq!(counts, [5, 5, 0]);
        for (id, count) in counts.iter().enumerate() {
            let series =
                format!(r#"tower_scale_endpoint_requests_total{{name="api",endpoint="{id}"}}"#);
            assert_eq!(value(&series).unwrap_or(0.0), *count as f64, "{series}");
        }
        let ready = r#"tower_scale_endpoints{name="api",state="ready"}"#;
        let pending = r#"tower_scale_endpoints{name="api",state="pending"}"#;
        assert_eq!(value(ready), Some(2.0));
        assert_eq!(value(pending), Some(1.0));

        fleet.gate(2).set_ready(true);
        shares(&mut balancer, 3, 3);
        assert_eq!(value(ready), Some(3.0));
        assert_eq!(value(pending), Some(0.0));
    });
}

#[test]
fn policies_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Balancer<Rx, WeightedP2c, u64>>();
    send_sync::<Balancer<Rx, LeastRequests, u64>>();
    send_sync::<ConsistentHash<Rx, u64>>();
    send_sync::<HashKey<http::Request<()>>>();
}
