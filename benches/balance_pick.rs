//! Per-pick cost of the balancing policies beside tower's `p2c::Balance`.
//!
//! Run with `cargo bench --bench balance_pick --features balance`.
//!
//! Every balancer holds 10, 100 or 1000 endpoints of equal weight, each an
//! always-ready service that answers at once, so what is measured is the
//! balancer: one `ready().await` (the pick) and one `call(..).await` per
//! iteration, on a current-thread runtime, with no metrics recorder
//! installed.
//!
//! - `weighted_p2c`, `round_robin`, `smooth_wrr`, `least_requests`: our
//!   [`Balancer`] with each policy. The endpoints are
//!   `Weighted<InFlight<Echo>>`, where `InFlight` counts calls in flight the
//!   way tower's `PendingRequests` does (an `Arc` whose count is the load),
//!   with the number readable as a `usize` (weighted P2C reads it).
//! - `consistent_hash`: our [`ConsistentHash`] keyed by the request (a
//!   `u64`, hashed by the closure key).
//! - `tower_p2c`: tower's `p2c::Balance` over `PendingRequests<Echo>`.
//!
//! Before the timed runs it counts heap allocations per pick for each, with
//! a counting global allocator; after them it prints a table of the times
//! criterion measured.

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, Load, PendingRequests};
use tower::{BoxError, Service, ServiceExt};

use tower_scale::balance::policy::{
    Balancer, ConsistentHash, HashKey, LeastRequests, RingHash, RoundRobin,
    SmoothWeightedRoundRobin, WeightedP2c,
};
use tower_scale::discover::Weighted;

mod support;
use support::{current_thread, Echo, ALLOCATIONS, COUNTING};

const SIZES: [usize; 3] = [10, 100, 1000];
const POLICIES: [&str; 6] = [
    "weighted_p2c",
    "round_robin",
    "smooth_wrr",
    "least_requests",
    "consistent_hash",
    "tower_p2c",
];

// ---------------------------------------------------------------------------
// An in-flight load like tower's `PendingRequests`, readable as a number.

#[derive(Clone, Debug, Default)]
struct InFlight<S> {
    inner: S,
    count: Arc<()>,
}

impl<S: Service<u64>> Service<u64> for InFlight<S>
where
    S::Future: Unpin,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: u64) -> Self::Future {
        Tracked {
            inner: self.inner.call(request),
            _handle: self.count.clone(),
        }
    }
}

impl<S> Load for InFlight<S> {
    type Metric = usize;

    #[inline]
    fn load(&self) -> usize {
        Arc::strong_count(&self.count) - 1
    }
}

struct Tracked<F> {
    inner: F,
    _handle: Arc<()>,
}

impl<F: Future + Unpin> Future for Tracked<F> {
    type Output = F::Output;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

// ---------------------------------------------------------------------------
// The balancers.

type Ours = Weighted<InFlight<Echo>>;
type List = ServiceList<Vec<Ours>>;

fn endpoints(n: usize) -> List {
    ServiceList::new(
        (0..n)
            .map(|_| Weighted::new(InFlight::default(), 100))
            .collect::<Vec<_>>(),
    )
}

/// A balancer of `policy` over `n` endpoints, as a boxed pick.
fn balancer(policy: &str, n: usize) -> Box<dyn Pick> {
    match policy {
        "weighted_p2c" => Box::new(Balancer::new(endpoints(n), WeightedP2c::new())),
        "round_robin" => Box::new(Balancer::new(endpoints(n), RoundRobin::new())),
        "smooth_wrr" => Box::new(Balancer::new(endpoints(n), SmoothWeightedRoundRobin::new())),
        "least_requests" => Box::new(Balancer::new(endpoints(n), LeastRequests::new())),
        "consistent_hash" => {
            let key = HashKey::from_fn(|request: &u64| Some(*request));
            Box::new(ConsistentHash::new(endpoints(n), key, RingHash::default()))
        }
        "tower_p2c" => {
            let list = (0..n)
                .map(|_| PendingRequests::new(Echo, CompleteOnResponse::default()))
                .collect::<Vec<_>>();
            Box::new(Balance::new(ServiceList::new(list)))
        }
        other => unreachable!("{other}"),
    }
}

/// `iters` picks, each a `ready().await` and a `call(..).await`, timed.
/// (A trait object so that every balancer type runs the same loop; the
/// loop itself is generic, monomorphised per balancer.)
trait Pick {
    fn run(&mut self, rt: &Runtime, iters: u64) -> Duration;
}

impl<S> Pick for S
where
    S: Service<u64, Response = u64>,
    S::Error: Into<BoxError>,
{
    fn run(&mut self, rt: &Runtime, iters: u64) -> Duration {
        rt.block_on(async {
            let start = Instant::now();
            for i in 0..iters {
                let svc = match self.ready().await {
                    Ok(svc) => svc,
                    Err(_) => panic!("ready failed"),
                };
                // Spread the keys of the consistent hash over the ring.
                let request = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                match svc.call(black_box(request)).await {
                    Ok(response) => {
                        black_box(response);
                    }
                    Err(_) => panic!("call failed"),
                }
            }
            start.elapsed()
        })
    }
}

// ---------------------------------------------------------------------------

const ALLOC_PICKS: u64 = 10_000;

fn count_allocations(rt: &Runtime) {
    println!("heap allocations per pick ({ALLOC_PICKS} picks, after 1000 to warm up):");
    println!("{:<16} {:>8} {:>8} {:>8}", "policy", 10, 100, 1000);
    for policy in POLICIES {
        let mut row = format!("{policy:<16}");
        for n in SIZES {
            let mut b = balancer(policy, n);
            b.run(rt, 1000);
            ALLOCATIONS.store(0, Relaxed);
            COUNTING.store(true, Relaxed);
            b.run(rt, ALLOC_PICKS);
            COUNTING.store(false, Relaxed);
            let per_pick = ALLOCATIONS.load(Relaxed) as f64 / ALLOC_PICKS as f64;
            row.push_str(&format!(" {per_pick:>8.2}"));
        }
        println!("{row}");
    }
    println!();
}

fn bench(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("pick");
    for n in SIZES {
        for policy in POLICIES {
            let mut b = balancer(policy, n);
            b.run(rt, 1000);
            group.bench_function(BenchmarkId::new(policy, n), |bencher| {
                bencher.iter_custom(|iters| b.run(rt, iters))
            });
        }
    }
    group.finish();
}

/// The time per pick criterion measured for `policy` at `n` endpoints, in
/// ns (the slope of its linear regression, the middle figure it prints; the
/// mean if there is none).
fn estimate_ns(policy: &str, n: usize) -> Option<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "target".into());
    let path = dir.join(format!("criterion/pick/{policy}/{n}/new/estimates.json"));
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| json["mean"]["point_estimate"].as_f64())
}

fn print_table() {
    println!();
    println!("ns per pick (ready + call), always-ready endpoints of equal weight:");
    println!("{:<16} {:>8} {:>8} {:>8}", "policy", 10, 100, 1000);
    for policy in POLICIES {
        let mut row = format!("{policy:<16}");
        for n in SIZES {
            match estimate_ns(policy, n) {
                Some(ns) => row.push_str(&format!(" {ns:>8.1}")),
                None => row.push_str(&format!(" {:>8}", "-")),
            }
        }
        println!("{row}");
    }
}

fn main() {
    let rt = current_thread();
    count_allocations(&rt);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(800))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    bench(&mut c, &rt);
    c.final_summary();
    print_table();
}
