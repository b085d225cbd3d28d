//! Per-call cost of the circuit breaker in the Closed state, beside
//! tower-resilience's circuit breaker with the same settings, on an
//! always-ready inner service that never fails, so the breaker stays Closed
//! and what is measured is its fast path: admit, call, record the outcome.
//!
//! Run with `cargo bench --bench breaker`.
//!
//! Stacks (each wraps the same inner service, `Echo`):
//!
//! - `baseline`: the bare inner service; subtract it to get a breaker's
//!   overhead.
//! - `ours/count`: our breaker, fail-fast mode, the defaults spelled out: a
//!   count window of 100 calls, `minimum_calls` 20, failure rate 0.5, the
//!   slow-call rule off.
//! - `ours/count+slow_calls`: the same with `slow_calls(1 s, 1.0)`: every call
//!   reads the clock twice (admission and completion).
//! - `ours/time`: the same as `ours/count` with a time window
//!   (`Window::time(60 s)`, 10 buckets): every completion reads the clock.
//! - `tower_resilience/count`: tower-resilience 0.13's circuit breaker with a
//!   count-based window of 100, `minimum_number_of_calls` 20, failure-rate
//!   threshold 0.5 (no slow-call rule; it times every call anyway).
//!
//! No metrics recorder is installed: our metric handles are no-ops, and
//! tower-resilience is built without its `metrics` and `tracing` features.
//!
//! Groups:
//!
//! - `uncontended`: current-thread runtime; one service value,
//!   `ready().await` then `call(req).await` per iteration.
//! - `two_threads`: a multi-thread runtime with 2 workers; 2 tasks each own a
//!   clone of one shared stack (so they share one breaker) and make half the
//!   calls (ready + call, reusing their clone). The figure is wall time divided
//!   by the total number of calls, so with perfect scaling it is half the
//!   uncontended one. The tasks run `tokio::task::unconstrained`, as in
//!   `per_call.rs` (tower-resilience takes a tokio mutex per call, which spends
//!   cooperative budget).
//!
//! Before the timed runs the bench checks that every breaker stays Closed and
//! records its calls, then counts heap allocations per call for every stack
//! (uncontended, reuse and clone + oneshot) with a counting global allocator,
//! and prints them with the size of each service and its response future.
//!
//! `BREAKER_PROFILE=<stack>` runs one stack's calls and nothing else, for
//! callgrind instruction counts; see [`profile`].

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::Layer;

use tower_scale::breaker::{BreakerConfig, BreakerHandle, CircuitBreakerLayer, State, Window};

/// Count window size, for both breakers.
const WINDOW: u32 = 100;
/// Calls the window must hold before a rate is judged, for both breakers.
const MINIMUM_CALLS: u32 = 20;
const FAILURE_RATE: f64 = 0.5;
/// Slow-call rule of `ours/count+slow_calls`: no call here comes near it.
const SLOW_CALL: Duration = Duration::from_secs(1);
const SLOW_CALL_RATE: f64 = 1.0;
/// Time window of `ours/time`.
const TIME_WINDOW: Duration = Duration::from_secs(60);

mod support;

use support::{
    call_reuse, current_thread, two_workers, CountAllocations, Echo, Stack, Visit, ALLOC_CALLS,
};

// ---------------------------------------------------------------------------
// The stacks.

/// Our three configurations, by stack name.
const OURS: [&str; 3] = ["ours/count", "ours/count+slow_calls", "ours/time"];

fn our_layer(name: &str) -> CircuitBreakerLayer {
    let builder = BreakerConfig::builder()
        .failure_rate(FAILURE_RATE)
        .minimum_calls(MINIMUM_CALLS)
        .window(Window::Count(WINDOW));
    let builder = match name {
        "ours/count" => builder,
        "ours/count+slow_calls" => builder.slow_calls(SLOW_CALL, SLOW_CALL_RATE),
        "ours/time" => builder.window(Window::time(TIME_WINDOW)),
        _ => unreachable!("no breaker configuration called {name:?}"),
    };
    let config = builder.name(name).build().expect("valid breaker settings");
    CircuitBreakerLayer::new(config)
}

fn tower_resilience_layer() -> tower_resilience::circuitbreaker::CircuitBreakerLayer<
    tower_resilience::circuitbreaker::classifier::DefaultClassifier,
> {
    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .sliding_window_type(tower_resilience::circuitbreaker::SlidingWindowType::CountBased)
        .sliding_window_size(WINDOW as usize)
        .minimum_number_of_calls(MINIMUM_CALLS as usize)
        .failure_rate_threshold(FAILURE_RATE)
        .build()
        .expect("valid tower-resilience settings")
}

/// Called once per stack, with a freshly built stack.
/// Builds every stack anew and hands each to `v`.
fn for_each_stack(v: &mut impl Visit) {
    v.visit("baseline", Echo);
    for name in OURS {
        v.visit(name, our_layer(name).layer(Echo));
    }
    v.visit(
        "tower_resilience/count",
        tower_resilience_layer().layer(Echo),
    );
}

// ---------------------------------------------------------------------------
// Sanity check: the breakers stay Closed and record every call.

/// Makes more calls than the count window holds on each of our stacks and on
/// tower-resilience's, and checks that each breaker is Closed and has recorded
/// them; a breaker that recorded nothing would make a flattering figure.
fn check_closed(rt: &Runtime) {
    const CALLS: u64 = 1_000;
    for name in OURS {
        let layer = our_layer(name);
        let handle: BreakerHandle = layer.handle();
        let mut svc = layer.layer(Echo);
        rt.block_on(async {
            for i in 0..CALLS {
                black_box(call_reuse(&mut svc, i).await);
            }
        });
        assert_eq!(handle.state(), State::Closed, "{name}");
        let expected = if name == "ours/time" {
            CALLS as u32
        } else {
            WINDOW
        };
        assert_eq!(handle.calls_in_window(), expected, "{name}");
        assert_eq!(handle.failure_rate(), 0.0, "{name}");
    }

    let (layer, handle) = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .sliding_window_type(tower_resilience::circuitbreaker::SlidingWindowType::CountBased)
        .sliding_window_size(WINDOW as usize)
        .minimum_number_of_calls(MINIMUM_CALLS as usize)
        .failure_rate_threshold(FAILURE_RATE)
        .build_with_handle()
        .expect("valid tower-resilience settings");
    let mut svc = layer.layer(Echo);
    let metrics = rt.block_on(async {
        for i in 0..CALLS {
            black_box(call_reuse(&mut svc, i).await);
        }
        handle.metrics().await
    });
    assert_eq!(
        metrics.state,
        tower_resilience::circuitbreaker::CircuitState::Closed,
        "tower_resilience/count"
    );
    assert!(
        metrics.total_calls > 0,
        "tower_resilience/count records calls"
    );
    assert_eq!(metrics.failure_count, 0, "tower_resilience/count");
}

// ---------------------------------------------------------------------------
// Allocation count.

fn print_allocations(rt: &Runtime) {
    let mut count = CountAllocations {
        rt,
        rows: Vec::new(),
    };
    for_each_stack(&mut count);
    println!(
        "allocations per call (no recorder, uncontended, {ALLOC_CALLS} calls), \
         reuse / clone+oneshot; size of the service and of its response future in bytes:"
    );
    for row in &count.rows {
        println!(
            "  {:<26} {:>5.2} / {:>5.2}   service {:>4} B, future {:>4} B",
            row.name, row.reuse, row.clone, row.service_size, row.future_size
        );
    }
    let line: Vec<String> = count
        .rows
        .iter()
        .map(|row| format!("{} {:.2}", row.name, row.reuse))
        .collect();
    println!("allocations per call (reuse): {}", line.join(", "));
    println!();
}

// ---------------------------------------------------------------------------
// Profiling mode.

/// Makes `calls` uncontended reuse calls on the stack called `name` and
/// nothing else, for `valgrind --tool=callgrind`; see `profile`.
struct Profile<'a> {
    rt: &'a Runtime,
    name: &'a str,
    calls: u64,
    found: bool,
}

impl Visit for Profile<'_> {
    fn visit<S: Stack>(&mut self, name: &str, mut svc: S) {
        if name != self.name {
            return;
        }
        self.found = true;
        let calls = self.calls;
        self.rt.block_on(async {
            for i in 0..calls {
                black_box(call_reuse(&mut svc, black_box(i)).await);
            }
        });
    }
}

/// With `BREAKER_PROFILE=<stack>` (a stack name as in the bench ids, e.g.
/// `ours/count`) the bench runs only `BREAKER_CALLS` (default 100000)
/// uncontended reuse calls on that stack. Instructions per call:
///
/// ```text
/// BREAKER_PROFILE=ours/count BREAKER_CALLS=200000 \
///   valgrind --tool=callgrind --collect-atstart=no \
///   '--toggle-collect=tokio::runtime::runtime::Runtime::block_on*' \
///   target/release/deps/breaker-<hash>
/// ```
///
/// then divide the instructions collected by the number of calls (and
/// subtract `baseline`'s to get the breaker's own).
fn profile(name: &str) {
    let calls = std::env::var("BREAKER_CALLS")
        .ok()
        .map_or(100_000, |n| n.parse().expect("BREAKER_CALLS is a number"));
    let rt = current_thread();
    let mut run = Profile {
        rt: &rt,
        name,
        calls,
        found: false,
    };
    for_each_stack(&mut run);
    assert!(run.found, "no stack called {name:?}");
}

// ---------------------------------------------------------------------------
// Timed runs.

struct Uncontended<'g, 'c> {
    group: &'g mut BenchmarkGroup<'c, WallTime>,
    rt: &'g Runtime,
}

impl Visit for Uncontended<'_, '_> {
    fn visit<S: Stack>(&mut self, name: &str, svc: S) {
        self.group.bench_function(name, |b| {
            b.to_async(self.rt).iter_custom(|iters| {
                let mut svc = svc.clone();
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        black_box(call_reuse(&mut svc, black_box(i)).await);
                    }
                    start.elapsed()
                }
            })
        });
    }
}

struct TwoThreads<'g, 'c> {
    group: &'g mut BenchmarkGroup<'c, WallTime>,
    rt: &'g Runtime,
}

impl Visit for TwoThreads<'_, '_> {
    fn visit<S: Stack>(&mut self, name: &str, svc: S) {
        let rt = self.rt;
        self.group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let tasks = [iters / 2 + iters % 2, iters / 2].map(|calls| {
                    let mut svc = svc.clone();
                    rt.spawn(tokio::task::unconstrained(async move {
                        for i in 0..calls {
                            black_box(call_reuse(&mut svc, black_box(i)).await);
                        }
                    }))
                });
                rt.block_on(async {
                    for task in tasks {
                        task.await.expect("bench task panicked");
                    }
                });
                start.elapsed()
            })
        });
    }
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
}

fn main() {
    if let Ok(name) = std::env::var("BREAKER_PROFILE") {
        profile(&name);
        return;
    }
    // No plots and fewer bootstrap resamples than the default 100000: the
    // analysis otherwise takes longer than the measurement on a small machine.
    let mut c = Criterion::default()
        .without_plots()
        .nresamples(20_000)
        .configure_from_args();
    let listing = std::env::args().any(|a| a == "--list");

    let rt = current_thread();
    if !listing {
        check_closed(&rt);
        print_allocations(&rt);
    }
    {
        let mut group = c.benchmark_group("uncontended");
        configure(&mut group);
        for_each_stack(&mut Uncontended {
            group: &mut group,
            rt: &rt,
        });
        group.finish();
    }
    let rt = two_workers();
    {
        let mut group = c.benchmark_group("two_threads");
        configure(&mut group);
        for_each_stack(&mut TwoThreads {
            group: &mut group,
            rt: &rt,
        });
        group.finish();
    }

    c.final_summary();
}
