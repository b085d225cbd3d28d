//! Per-call cost of the tower-scale layers beside tower's own, on an
//! always-ready inner service, so that what is measured is the middleware.
//!
//! Run with `cargo bench --bench per_call`.
//!
//! Stacks (each wraps the same inner service, `Echo`):
//!
//! - `baseline`: the bare inner service; subtract it to get a layer's overhead.
//! - `ours/ConcurrencyLimit`, `ours/LoadShed`, `ours/LoadShed+Queue+ConcurrencyLimit`,
//!   `ours/Drain` (a serving drain: it counts every call) and
//!   `ours/Drain+LoadShed+Queue+ConcurrencyLimit`.
//! - `tower/ConcurrencyLimit`, `tower/GlobalConcurrencyLimit`, `tower/LoadShed`,
//!   `tower/LoadShed+Buffer+ConcurrencyLimit`.
//!
//! The limit is never reached and the queue stays empty: this is the cost of
//! the fast path.
//!
//! Groups, every one run first with no metrics recorder, then with a
//! Prometheus recorder installed (a global recorder can be installed once per
//! process, and the layers register their metric handles when built, so the
//! `prometheus_recorder` stacks are built after installing it):
//!
//! - `uncontended/reuse/{no_recorder,prometheus_recorder}`: current-thread
//!   runtime; one service value, `ready().await` then `call(req).await` per
//!   iteration.
//! - `uncontended/clone_oneshot/{..}`: current-thread runtime; the service is
//!   cloned for every request and driven with `oneshot`, as axum and hyper do.
//! - `two_threads/reuse/{..}`: a multi-thread runtime with 2 workers; 2 tasks
//!   each own a clone of one shared stack and make half the calls (ready +
//!   call, reusing their clone). The figure is wall time divided by the total
//!   number of calls, so with perfect scaling it is half the uncontended one.
//!   The tasks run `tokio::task::unconstrained`: a task making millions of
//!   calls in one poll would otherwise run out of tokio's cooperative budget,
//!   and tower's `Buffer::poll_ready` (its channel reservation spends budget)
//!   would then return `Pending` with room in the channel, which `LoadShed`
//!   turns into a spurious `Overloaded`. (Yielding every 32 calls did not avoid
//!   it: the caller, woken by the buffer worker, can run in the worker's LIFO
//!   slot on what is left of the worker's budget.) Our layers and tower's
//!   `ConcurrencyLimit` spend no budget on this path.
//!
//! Before the timed runs the bench counts heap allocations per call for every
//! stack (uncontended, reuse and clone + oneshot) with a counting global
//! allocator, and prints them with the size of each service and its response
//! future.
//!
//! `PER_CALL_PROFILE=<stack>` runs one stack's calls and nothing else, for
//! callgrind instruction counts; see [`profile`].

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use tokio::runtime::Runtime;
use tokio::time::Instant;
use tower::ServiceBuilder;

use tower_scale::limit::ConcurrencyLimitLayer;
use tower_scale::queue::QueueLayer;
use tower_scale::shed::LoadShedLayer;

/// Never reached: at most 2 calls are in flight at once.
const LIMIT: usize = 1_000;
/// Capacity of our queue and bound of tower's buffer.
const QUEUE: usize = 1_024;
const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

mod support;

use support::{
    call_clone_oneshot, call_reuse, current_thread, two_workers, CountAllocations, Echo, Stack,
    Visit, ALLOC_CALLS,
};

// ---------------------------------------------------------------------------
// The stacks.

/// Called once per stack, with a freshly built stack.
/// Builds every stack anew (so metric handles are registered with whatever
/// recorder is installed now) and hands each to `v`. Tower's buffer worker is
/// spawned on `rt`.
fn for_each_stack(rt: &Runtime, v: &mut impl Visit) {
    let _enter = rt.enter();

    v.visit("baseline", Echo);
    let drain = tower_scale::drain::Drain::new();

    v.visit(
        "ours/ConcurrencyLimit",
        ServiceBuilder::new()
            .layer(ConcurrencyLimitLayer::new(LIMIT))
            .service(Echo),
    );
    v.visit(
        "ours/LoadShed",
        ServiceBuilder::new()
            .layer(LoadShedLayer::new())
            .service(Echo),
    );
    v.visit(
        "ours/LoadShed+Queue+ConcurrencyLimit",
        ServiceBuilder::new()
            .layer(LoadShedLayer::new())
            .layer(QueueLayer::new(QUEUE, QUEUE_TIMEOUT))
            .layer(ConcurrencyLimitLayer::new(LIMIT))
            .service(Echo),
    );
    v.visit(
        "ours/Drain",
        ServiceBuilder::new().layer(drain.layer()).service(Echo),
    );
    v.visit(
        "ours/Drain+LoadShed+Queue+ConcurrencyLimit",
        ServiceBuilder::new()
            .layer(drain.layer())
            .layer(LoadShedLayer::new())
            .layer(QueueLayer::new(QUEUE, QUEUE_TIMEOUT))
            .layer(ConcurrencyLimitLayer::new(LIMIT))
            .service(Echo),
    );

    v.visit(
        "tower/ConcurrencyLimit",
        ServiceBuilder::new().concurrency_limit(LIMIT).service(Echo),
    );
    v.visit(
        "tower/GlobalConcurrencyLimit",
        ServiceBuilder::new()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(LIMIT))
            .service(Echo),
    );
    v.visit(
        "tower/LoadShed",
        ServiceBuilder::new().load_shed().service(Echo),
    );
    v.visit(
        "tower/LoadShed+Buffer+ConcurrencyLimit",
        ServiceBuilder::new()
            .load_shed()
            .buffer(QUEUE)
            .concurrency_limit(LIMIT)
            .service(Echo),
    );
}

// ---------------------------------------------------------------------------
// Allocation count.

fn print_allocations(recorder: &str) {
    let rt = current_thread();
    let mut count = CountAllocations {
        rt: &rt,
        rows: Vec::new(),
    };
    for_each_stack(&rt, &mut count);
    println!(
        "allocations per call ({recorder}, uncontended, {ALLOC_CALLS} calls), \
         reuse / clone+oneshot; size of the service and of its response future in bytes:"
    );
    for row in &count.rows {
        println!(
            "  {:<42} {:>5.2} / {:>5.2}   service {:>4} B, future {:>4} B",
            row.name, row.reuse, row.clone, row.service_size, row.future_size
        );
    }
    let line: Vec<String> = count
        .rows
        .iter()
        .map(|row| format!("{} {:.2}", row.name, row.reuse))
        .collect();
    println!(
        "allocations per call ({recorder}, reuse): {}",
        line.join(", ")
    );
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

/// With `PER_CALL_PROFILE=<stack>` (a stack name as in the bench ids, e.g.
/// `ours/ConcurrencyLimit`) the bench runs only `PER_CALL_CALLS` (default
/// 100000) uncontended reuse calls on that stack, after installing the
/// Prometheus recorder if `PER_CALL_RECORDER` is set. Instructions per call:
///
/// ```text
/// PER_CALL_PROFILE=ours/ConcurrencyLimit PER_CALL_CALLS=200000 \
///   valgrind --tool=callgrind --collect-atstart=no \
///   '--toggle-collect=tokio::runtime::runtime::Runtime::block_on*' \
///   target/release/deps/per_call-<hash>
/// ```
///
/// then divide the instructions collected by the number of calls.
fn profile(name: &str) {
    let calls = std::env::var("PER_CALL_CALLS")
        .ok()
        .map_or(100_000, |n| n.parse().expect("PER_CALL_CALLS is a number"));
    if std::env::var_os("PER_CALL_RECORDER").is_some() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(recorder).expect("no recorder installed before");
    }
    let rt = current_thread();
    let mut run = Profile {
        rt: &rt,
        name,
        calls,
        found: false,
    };
    for_each_stack(&rt, &mut run);
    assert!(run.found, "no stack called {name:?}");
}

// ---------------------------------------------------------------------------
// Timed runs.

struct UncontendedReuse<'g, 'c> {
    group: &'g mut BenchmarkGroup<'c, WallTime>,
    rt: &'g Runtime,
}

impl Visit for UncontendedReuse<'_, '_> {
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

struct UncontendedClone<'g, 'c> {
    group: &'g mut BenchmarkGroup<'c, WallTime>,
    rt: &'g Runtime,
}

impl Visit for UncontendedClone<'_, '_> {
    fn visit<S: Stack>(&mut self, name: &str, svc: S) {
        self.group.bench_function(name, |b| {
            b.to_async(self.rt).iter_custom(|iters| {
                let svc = svc.clone();
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        black_box(call_clone_oneshot(&svc, black_box(i)).await);
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

fn run_groups(c: &mut Criterion, recorder: &str) {
    let rt = current_thread();
    {
        let mut group = c.benchmark_group(format!("uncontended/reuse/{recorder}"));
        configure(&mut group);
        for_each_stack(
            &rt,
            &mut UncontendedReuse {
                group: &mut group,
                rt: &rt,
            },
        );
        group.finish();
    }
    {
        let mut group = c.benchmark_group(format!("uncontended/clone_oneshot/{recorder}"));
        configure(&mut group);
        for_each_stack(
            &rt,
            &mut UncontendedClone {
                group: &mut group,
                rt: &rt,
            },
        );
        group.finish();
    }
    let rt = two_workers();
    {
        let mut group = c.benchmark_group(format!("two_threads/reuse/{recorder}"));
        configure(&mut group);
        for_each_stack(
            &rt,
            &mut TwoThreads {
                group: &mut group,
                rt: &rt,
            },
        );
        group.finish();
    }
}

fn main() {
    if let Ok(name) = std::env::var("PER_CALL_PROFILE") {
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

    // No recorder: metric handles are no-ops.
    if !listing {
        print_allocations("no_recorder");
    }
    run_groups(&mut c, "no_recorder");

    // Install the recorder once, then build every stack anew so that the
    // layers' handles are the recorder's.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("no recorder installed before");
    if !listing {
        print_allocations("prometheus_recorder");
    }
    run_groups(&mut c, "prometheus_recorder");

    // The recorder did record: the in-flight gauges are there.
    if !listing {
        let rendered = handle.render();
        assert!(
            rendered.contains("tower_scale_in_flight"),
            "the recorder saw no tower_scale metric"
        );
    }

    c.final_summary();
}
