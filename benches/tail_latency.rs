//! Tail-latency simulation: round robin, tower's power-of-two-choices, and ours
//! (P2C over the failure-aware load, with passive ejection) over four
//! endpoints, one of which turns 10x slower and then fails fast.
//!
//! Run with `cargo bench --bench tail_latency --features balance`. It writes
//! `docs/tail-latency-results.md`.
//!
//! Everything runs on tokio's paused clock (a current-thread runtime built with
//! `start_paused(true)`): time moves only when every task waits, straight to
//! the next timer, so the simulation is deterministic and measures routing
//! policy, not CPU cost. As in `benches/overload.rs`, the scenario runs
//! [`TIME_SCALE`] times slower on the paused clock than the figures it reports
//! (tokio's timer resolution is 1 ms), so the effective resolution is 10 µs;
//! every duration handed to tokio (service times, deadlines, the load's decay
//! and penalty, the breaker's open duration) is scaled, and every measured
//! latency scaled back.
//!
//! # Model
//!
//! - Each endpoint has `K` workers and an unbounded FIFO of jobs (a tokio
//!   `Semaphore`); a job holds a worker for its service time. `poll_ready` is
//!   always ready. A caller that gives up (client deadline) leaves the queue;
//!   a job already running runs to its end.
//! - Service time: the request's size (log-normal, median 1, σ 0.4, drawn once
//!   per request, so every policy sees the same work) times the endpoint's
//!   median (10 ms, or 100 ms while it is slow).
//! - Open-loop Poisson arrivals at 0.6 of the all-healthy capacity
//!   (`4 K / mean service time`); each request is sent at its arrival time and
//!   its latency counts from that time.
//! - Scenario "degraded": endpoint 3 is 10x slower for the first third of the
//!   run, then fails every call in 1 ms. Scenario "healthy": four healthy
//!   endpoints (the baseline).
//! - Percentiles are over successful answers; errors are failed calls plus
//!   calls that reached the client deadline.
//!
//! Set `TAIL_SEED` or `TAIL_DURATION` (simulated seconds per run) to explore;
//! with either set, nothing is written to `docs/`.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwma, PendingRequests};
use tower::util::BoxService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_scale::balance::health::OutlierEjection;
use tower_scale::balance::load::FailureAwareEwmaLayer;
use tower_scale::breaker::{BreakerConfig, Window};

const MS: Duration = Duration::from_millis(1);
/// How many times slower the scenario runs on tokio's paused clock than the
/// figures it reports (see the module docs).
const TIME_SCALE: u32 = 100;
const PAUSED: &str = "paused tokio clock: measures routing policy, not CPU cost";

/// A scenario duration as tokio sees it.
fn sim(d: Duration) -> Duration {
    d * TIME_SCALE
}

/// A duration measured on tokio's clock, in the scenario's time.
fn real(d: Duration) -> Duration {
    d / TIME_SCALE
}

// ---------------------------------------------------------------------------
// Parameters

#[derive(Clone, Debug)]
struct Params {
    seed: u64,
    endpoints: usize,
    /// K: workers per endpoint.
    workers: usize,
    /// Median service time of a healthy endpoint.
    median_service: Duration,
    /// σ of the log-normal request size.
    sigma: f64,
    /// The degraded endpoint's service time multiple while slow.
    slow_factor: u32,
    /// How fast the degraded endpoint fails once it fails.
    fail_after: Duration,
    /// Arrival rate as a share of the all-healthy capacity.
    load: f64,
    /// Simulated arrival window per run; the degraded endpoint is slow for the
    /// first third and fails for the rest.
    duration: Duration,
    /// The client gives up after this long.
    deadline: Duration,
    /// Errors are counted again from this long after the failure started.
    settle: Duration,
    // Settings of the load balancers.
    default_rtt: Duration,
    decay: Duration,
    penalty: Duration,
    consecutive_failures: u32,
    open_duration: Duration,
    max_ejected: f64,
    smoke: bool,
}

impl Params {
    fn mean_service(&self) -> Duration {
        self.median_service
            .mul_f64((self.sigma * self.sigma / 2.0).exp())
    }

    /// All-healthy capacity: `endpoints * K / mean service time`.
    fn capacity(&self) -> f64 {
        (self.endpoints * self.workers) as f64 / self.mean_service().as_secs_f64()
    }

    fn rate(&self) -> f64 {
        self.load * self.capacity()
    }

    fn fail_at(&self) -> Duration {
        self.duration / 3
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let _ = writeln!(
            s,
            "- {PAUSED}; the scenario runs {TIME_SCALE}x slower on the paused clock, so tokio's 1 ms timer resolution is 10 us of scenario time; all figures are in scenario time"
        );
        let _ = writeln!(
            s,
            "- seed: {} (arrival times and request sizes come from StdRng seeded with it; P2C's random picks from StdRng seeded with seed + 1)",
            self.seed
        );
        let _ = writeln!(
            s,
            "- {} endpoints, each with K = {} workers and an unbounded FIFO of jobs; a caller that gives up leaves the queue, a running job runs to its end; poll_ready always ready",
            self.endpoints, self.workers
        );
        let _ = writeln!(
            s,
            "- service time: request size (log-normal, median 1, sigma {}) x {} ms; mean {:.2} ms; all-healthy capacity {:.0} requests/s",
            self.sigma,
            ms(self.median_service),
            ms(self.mean_service()),
            self.capacity()
        );
        let _ = writeln!(
            s,
            "- arrivals: open-loop Poisson at {} x capacity = {:.0} requests/s for {} s per run; client deadline {} ms (a call that reaches it is an error)",
            self.load,
            self.rate(),
            self.duration.as_secs_f64(),
            ms(self.deadline)
        );
        let _ = writeln!(
            s,
            "- scenario degraded: endpoint 3 is {}x slower (median {} ms) from 0 to {} s, then fails every call in {} ms; scenario healthy: the baseline, all four healthy",
            self.slow_factor,
            ms(self.median_service * self.slow_factor),
            self.fail_at().as_secs_f64(),
            ms(self.fail_after)
        );
        let _ = writeln!(
            s,
            "- tower PeakEwma: default RTT {} ms, decay {} s; ours: the same, failure penalty {} ms",
            ms(self.default_rtt),
            self.decay.as_secs_f64(),
            ms(self.penalty)
        );
        let _ = writeln!(
            s,
            "- ours, passive ejection: a not-ready breaker per endpoint (opens after {} consecutive failures, or a failure rate of 50 % over the last 20 calls with at least 10; open {} s, then 5 half-open probes), at most {} of the endpoints ejected at once",
            self.consecutive_failures,
            self.open_duration.as_secs_f64(),
            self.max_ejected
        );
        s
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------
// Arrivals

#[derive(Clone, Copy, Debug)]
struct Arrival {
    /// Scenario time since the start.
    at: Duration,
    /// Multiplies the endpoint's median service time.
    size: f64,
}

fn arrivals(p: &Params, seed: u64) -> Vec<Arrival> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        let u: f64 = rng.random();
        t += -(1.0 - u).ln() / p.rate();
        if t >= p.duration.as_secs_f64() {
            return out;
        }
        // Box-Muller.
        let (u1, u2): (f64, f64) = (rng.random(), rng.random());
        let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        out.push(Arrival {
            at: Duration::from_secs_f64(t),
            size: (p.sigma * z).exp(),
        });
    }
}

// ---------------------------------------------------------------------------
// Endpoints

/// A failure of the simulated endpoint.
#[derive(Debug)]
struct Failed;

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("endpoint failed")
    }
}

impl std::error::Error for Failed {}

#[derive(Clone)]
struct Endpoint {
    id: usize,
    workers: Arc<Semaphore>,
    median: Duration,
    /// Slow from the start until `fail_at`, then failing (the degraded one).
    degraded: Option<(u32, Instant)>,
    fail_after: Duration,
    /// Calls received.
    calls: Arc<AtomicU64>,
}

type EndpointFuture = Pin<Box<dyn Future<Output = Result<usize, BoxError>> + Send>>;

impl Service<f64> for Endpoint {
    type Response = usize;
    type Error = BoxError;
    type Future = EndpointFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, size: f64) -> EndpointFuture {
        self.calls.fetch_add(1, Relaxed);
        let mut median = self.median;
        if let Some((slow_factor, fail_at)) = self.degraded {
            if Instant::now() >= fail_at {
                let fail_after = self.fail_after;
                return Box::pin(async move {
                    tokio::time::sleep(sim(fail_after)).await;
                    Err(Failed.into())
                });
            }
            median *= slow_factor;
        }
        let workers = self.workers.clone();
        let id = self.id;
        Box::pin(async move {
            let _worker = workers.acquire_owned().await.expect("never closed");
            tokio::time::sleep(sim(median.mul_f64(size))).await;
            Ok(id)
        })
    }
}

// ---------------------------------------------------------------------------
// Policies

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    RoundRobin,
    TowerPeakEwma,
    TowerPending,
    OursLoadOnly,
    Ours,
}

const POLICIES: [Policy; 5] = [
    Policy::RoundRobin,
    Policy::TowerPeakEwma,
    Policy::TowerPending,
    Policy::OursLoadOnly,
    Policy::Ours,
];

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round robin",
            Policy::TowerPeakEwma => "tower P2C PeakEwma",
            Policy::TowerPending => "tower P2C PendingRequests",
            Policy::OursLoadOnly => "ours: P2C FailureAwareEwma alone",
            Policy::Ours => "ours: P2C FailureAwareEwma + ejection",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Policy::RoundRobin => "each call to the next endpoint in turn (a bench-local round robin)",
            Policy::TowerPeakEwma => "tower's Balance over PeakEwma(endpoint)",
            Policy::TowerPending => "tower's Balance over PendingRequests(endpoint)",
            Policy::OursLoadOnly => "tower's Balance over FailureAwareEwma(endpoint), without ejection",
            Policy::Ours => "tower's Balance over OutlierEjection (not-ready CircuitBreaker, MaxEjectedShare) -> FailureAwareEwma(endpoint)",
        }
    }
}

/// tower's P2C picks with `tower::util::rng::Rng`: seeded here for
/// reproducible runs.
struct SeededRng(StdRng);

impl tower::util::rng::Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.0.random()
    }
}

/// The bench-local round robin: every endpoint is always ready here.
struct RoundRobin {
    endpoints: Vec<Endpoint>,
    next: usize,
}

impl Service<f64> for RoundRobin {
    type Response = usize;
    type Error = BoxError;
    type Future = EndpointFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.endpoints[self.next].poll_ready(cx)
    }

    fn call(&mut self, size: f64) -> EndpointFuture {
        let i = self.next;
        self.next = (i + 1) % self.endpoints.len();
        self.endpoints[i].call(size)
    }
}

fn build(p: &Params, policy: Policy, endpoints: Vec<Endpoint>) -> BoxService<f64, usize, BoxError> {
    let rng = SeededRng(StdRng::seed_from_u64(p.seed.wrapping_add(1)));
    let decay_ns = sim(p.decay).as_nanos() as f64;
    match policy {
        Policy::RoundRobin => BoxService::new(RoundRobin { endpoints, next: 0 }),
        Policy::TowerPeakEwma => {
            let list = endpoints
                .into_iter()
                .map(|e| {
                    PeakEwma::new(
                        e,
                        sim(p.default_rtt),
                        decay_ns,
                        CompleteOnResponse::default(),
                    )
                })
                .collect::<Vec<_>>();
            BoxService::new(Balance::from_rng(ServiceList::new(list), rng))
        }
        Policy::TowerPending => {
            let list = endpoints
                .into_iter()
                .map(|e| PendingRequests::new(e, CompleteOnResponse::default()))
                .collect::<Vec<_>>();
            BoxService::new(Balance::from_rng(ServiceList::new(list), rng))
        }
        Policy::OursLoadOnly | Policy::Ours => {
            let load = FailureAwareEwmaLayer::builder()
                .default_rtt(sim(p.default_rtt))
                .decay(sim(p.decay))
                .failure_penalty(sim(p.penalty))
                .build()
                .expect("valid load settings");
            let list = endpoints
                .into_iter()
                .map(|e| load.layer(e))
                .collect::<Vec<_>>();
            if policy == Policy::OursLoadOnly {
                return BoxService::new(Balance::from_rng(ServiceList::new(list), rng));
            }
            let breaker = BreakerConfig::builder()
                .consecutive_failures(p.consecutive_failures)
                .failure_rate(0.5)
                .window(Window::Count(20))
                .minimum_calls(10)
                .open_duration(sim(p.open_duration))
                .half_open_calls(5)
                .name("bench")
                .build()
                .expect("valid breaker settings");
            let discover =
                OutlierEjection::new(breaker, p.max_ejected).discover(ServiceList::new(list));
            BoxService::new(Balance::from_rng(discover, rng))
        }
    }
}

// ---------------------------------------------------------------------------
// Runs

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Healthy,
    Degraded,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    Failed,
    TimedOut,
}

struct Record {
    at: Duration,
    latency: Duration,
    outcome: Outcome,
}

struct Run {
    records: Vec<Record>,
    /// Calls each endpoint had received at each checkpoint (the failure's
    /// start, the end of the settling time, the end of the run).
    calls: Vec<[u64; 3]>,
}

impl Run {
    /// The share of the calls between checkpoints `from` and `to` (indexes;
    /// `None` is the start) that went to endpoint `e`.
    fn share(&self, e: usize, from: Option<usize>, to: usize) -> f64 {
        let count = |c: &[u64; 3]| c[to] - from.map_or(0, |f| c[f]);
        let total: u64 = self.calls.iter().map(count).sum();
        count(&self.calls[e]) as f64 / total.max(1) as f64
    }
}

fn run(p: &Params, scenario: Scenario, policy: Policy, arrivals: &[Arrival]) -> Run {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let start = Instant::now();
        let fail_at = start + sim(p.fail_at());
        let endpoints: Vec<Endpoint> = (0..p.endpoints)
            .map(|id| Endpoint {
                id,
                workers: Arc::new(Semaphore::new(p.workers)),
                median: p.median_service,
                degraded: (scenario == Scenario::Degraded && id == p.endpoints - 1)
                    .then_some((p.slow_factor, fail_at)),
                fail_after: p.fail_after,
                calls: Arc::new(AtomicU64::new(0)),
            })
            .collect();
        let counters: Vec<_> = endpoints.iter().map(|e| e.calls.clone()).collect();
        let mut svc = build(p, policy, endpoints);
        let records = Arc::new(Mutex::new(Vec::with_capacity(arrivals.len())));
        let mut calls = vec![[0u64; 3]; p.endpoints];
        let checkpoints = [fail_at, fail_at + sim(p.settle)];
        let mut reached = 0;
        let mut tasks = Vec::with_capacity(arrivals.len());
        for arrival in arrivals {
            let at = start + sim(arrival.at);
            tokio::time::sleep_until(at).await;
            while reached < checkpoints.len() && Instant::now() >= checkpoints[reached] {
                for (c, counter) in calls.iter_mut().zip(&counters) {
                    c[reached] = counter.load(Relaxed);
                }
                reached += 1;
            }
            let fut = svc
                .ready()
                .await
                .expect("balancers never fail")
                .call(arrival.size);
            let records = records.clone();
            let deadline = sim(p.deadline);
            let arrived = arrival.at;
            tasks.push(tokio::spawn(async move {
                let result = tokio::time::timeout_at(at + deadline, fut).await;
                let latency = real(Instant::now() - at);
                let outcome = match result {
                    Ok(Ok(_)) => Outcome::Ok,
                    Ok(Err(_)) => Outcome::Failed,
                    Err(_) => Outcome::TimedOut,
                };
                records.lock().unwrap().push(Record {
                    at: arrived,
                    latency,
                    outcome,
                });
            }));
        }
        for task in tasks {
            task.await.expect("client task");
        }
        for (c, counter) in calls.iter_mut().zip(&counters) {
            for slot in &mut c[reached..] {
                *slot = counter.load(Relaxed);
            }
        }
        let records = std::mem::take(&mut *records.lock().unwrap());
        Run { records, calls }
    })
}

/// Figures over the requests that arrived in `[from, to)`.
#[derive(Clone, Debug)]
struct Figures {
    requests: usize,
    p50: Option<Duration>,
    p99: Option<Duration>,
    p999: Option<Duration>,
    failed: usize,
    timed_out: usize,
}

impl Figures {
    fn errors(&self) -> usize {
        self.failed + self.timed_out
    }

    fn error_rate(&self) -> f64 {
        self.errors() as f64 / self.requests.max(1) as f64
    }
}

fn figures(run: &Run, from: Duration, to: Duration) -> Figures {
    let mut latencies = Vec::new();
    let (mut requests, mut failed, mut timed_out) = (0, 0, 0);
    for r in run.records.iter().filter(|r| r.at >= from && r.at < to) {
        requests += 1;
        match r.outcome {
            Outcome::Ok => latencies.push(r.latency),
            Outcome::Failed => failed += 1,
            Outcome::TimedOut => timed_out += 1,
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| -> Option<Duration> {
        if latencies.is_empty() {
            return None;
        }
        let i = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        Some(latencies[i])
    };
    Figures {
        requests,
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        failed,
        timed_out,
    }
}

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
}

struct Row {
    policy: Policy,
    phase: &'static str,
    figures: Figures,
    /// Share of all calls sent to endpoint 3 in the phase.
    share: f64,
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then
    // run a short smoke version and write nothing.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let seed = env_u64("TAIL_SEED");
    let duration = env_u64("TAIL_DURATION");
    let overridden = seed.is_some() || duration.is_some();
    let p = Params {
        seed: seed.unwrap_or(0x7a11_2025),
        endpoints: 4,
        workers: 8,
        median_service: 10 * MS,
        sigma: 0.4,
        slow_factor: 10,
        fail_after: MS,
        load: 0.6,
        duration: Duration::from_secs(duration.unwrap_or(if smoke { 3 } else { 30 })),
        deadline: Duration::from_secs(1),
        settle: Duration::from_secs(1),
        default_rtt: 30 * MS,
        decay: Duration::from_secs(10),
        penalty: Duration::from_secs(1),
        consecutive_failures: 5,
        open_duration: Duration::from_secs(10),
        max_ejected: 0.25,
        smoke,
    };

    // Real time on purpose: how long the whole simulation took to compute.
    #[allow(clippy::disallowed_types)]
    let wall = std::time::Instant::now();
    let mut header = String::new();
    let _ = writeln!(header, "# Tail-latency simulation\n");
    let _ = writeln!(header, "{}", p.describe());
    let _ = writeln!(header, "Policies:\n");
    for policy in POLICIES {
        let _ = writeln!(header, "- {}: {}", policy.name(), policy.describe());
    }
    if p.smoke {
        println!("(smoke run: `cargo bench --bench tail_latency --features balance` for the full simulation)");
    }
    println!("{header}");

    let arrivals = arrivals(&p, p.seed);
    let last = p.endpoints - 1;
    let fail_at = p.fail_at();
    let end = p.duration;
    let mut rows = Vec::new();
    for policy in POLICIES {
        let healthy = run(&p, Scenario::Healthy, policy, &arrivals);
        rows.push(Row {
            policy,
            phase: "all healthy (baseline)",
            figures: figures(&healthy, Duration::ZERO, end),
            share: healthy.share(last, None, 2),
        });
        let degraded = run(&p, Scenario::Degraded, policy, &arrivals);
        for (phase, from, to, checkpoints) in [
            ("endpoint 3 slow (10x)", Duration::ZERO, fail_at, (None, 0)),
            ("endpoint 3 failing fast", fail_at, end, (Some(0), 2)),
            (
                "failing, after the first 1 s",
                fail_at + p.settle,
                end,
                (Some(1), 2),
            ),
        ] {
            let share = degraded.share(last, checkpoints.0, checkpoints.1);
            let figures = figures(&degraded, from, to);
            println!(
                "{:<40} {:<30} p50 {:>6} ms  p99 {:>6} ms  p99.9 {:>6} ms  errors {:>6.2}%  to endpoint 3 {:>5.1}%",
                policy.name(),
                phase,
                fmt_ms(figures.p50),
                fmt_ms(figures.p99),
                fmt_ms(figures.p999),
                100.0 * figures.error_rate(),
                100.0 * share
            );
            rows.push(Row {
                policy,
                phase,
                figures,
                share,
            });
        }
    }

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| policy | phase | requests | p50 (ms) | p99 (ms) | p99.9 (ms) | errors | failed / timed out | calls to endpoint 3 |"
    );
    let _ = writeln!(table, "|---|---|---:|---:|---:|---:|---:|---|---:|");
    for (i, row) in rows.iter().enumerate() {
        let f = &row.figures;
        let first = i == 0 || rows[i - 1].policy != row.policy;
        let name = if first { row.policy.name() } else { "" };
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {} | {} | {} | {:.2}% | {} / {} | {:.1}% |",
            row.phase,
            f.requests,
            fmt_ms(f.p50),
            fmt_ms(f.p99),
            fmt_ms(f.p999),
            100.0 * f.error_rate(),
            f.failed,
            f.timed_out,
            100.0 * row.share
        );
    }

    // Targets.
    let find = |policy: Policy, phase: &str| {
        rows.iter()
            .find(|r| r.policy == policy && r.phase.starts_with(phase))
            .expect("row")
    };
    let ours_base = find(Policy::Ours, "all healthy").figures.p99.expect("p99");
    let ours_fail = find(Policy::Ours, "failing, after");
    let ours_slow = find(Policy::Ours, "endpoint 3 slow");
    let rr_slow = find(Policy::RoundRobin, "endpoint 3 slow");
    let rr_fail = find(Policy::RoundRobin, "endpoint 3 failing");
    let tower_fail = find(Policy::TowerPeakEwma, "endpoint 3 failing");
    let pending_fail = find(Policy::TowerPending, "endpoint 3 failing");
    let mut checks = String::new();
    let mut all = true;
    let mut check = |ok: bool, text: String| {
        all &= ok;
        let _ = writeln!(checks, "- [{}] {text}", if ok { "x" } else { " " });
    };
    let within = |f: &Figures| {
        f.p99
            .is_some_and(|p| p.as_secs_f64() <= 1.5 * ours_base.as_secs_f64())
    };
    check(
        within(&ours_slow.figures),
        format!(
            "ours, endpoint 3 slow: p99 {} ms within 1.5x of our all-healthy p99 ({} ms)",
            fmt_ms(ours_slow.figures.p99),
            fmt_ms(Some(ours_base))
        ),
    );
    check(
        within(&ours_fail.figures),
        format!(
            "ours, endpoint 3 failing (after the first {} s): p99 {} ms within 1.5x of our all-healthy p99 ({} ms)",
            p.settle.as_secs_f64(),
            fmt_ms(ours_fail.figures.p99),
            fmt_ms(Some(ours_base))
        ),
    );
    check(
        ours_fail.figures.error_rate() <= 0.01,
        format!(
            "ours, endpoint 3 failing (after the first {} s): errors {:.2}% <= 1% ({} failed, {} timed out)",
            p.settle.as_secs_f64(),
            100.0 * ours_fail.figures.error_rate(),
            ours_fail.figures.failed,
            ours_fail.figures.timed_out
        ),
    );
    check(
        rr_slow.figures.error_rate() > 0.2 && rr_fail.figures.error_rate() > 0.2,
        format!(
            "round robin far worse: {:.1}% of calls reach the deadline while endpoint 3 is slow (p99.9 of the rest {} ms), {:.1}% fail while it fails",
            100.0 * rr_slow.figures.error_rate(),
            fmt_ms(rr_slow.figures.p999),
            100.0 * rr_fail.figures.error_rate()
        ),
    );
    check(
        pending_fail.share > 0.4 && tower_fail.share > 0.25,
        format!(
            "tower's P2C sends the failing endpoint {:.1}% of the calls with PendingRequests (about half expected: every pair it is drawn into) and {:.1}% with PeakEwma (whose estimate still remembers the slow phase: it decays over {} s)",
            100.0 * pending_fail.share,
            100.0 * tower_fail.share,
            p.decay.as_secs_f64()
        ),
    );
    let mut notes = String::new();
    let same = |a: &Row, b: &Row| {
        a.figures.requests == b.figures.requests
            && a.figures.errors() == b.figures.errors()
            && a.figures.p999 == b.figures.p999
    };
    let alone: Vec<&Row> = rows
        .iter()
        .filter(|r| r.policy == Policy::OursLoadOnly)
        .collect();
    let with: Vec<&Row> = rows.iter().filter(|r| r.policy == Policy::Ours).collect();
    if alone.iter().zip(&with).all(|(a, b)| same(a, b)) {
        let _ = writeln!(
            notes,
            "- The breakers never opened in this run: after its first failures the failing endpoint's load stays above the others' for longer than the run (a {} s penalty decaying with a {} s time constant), so it never got the {} failures in a row that open its breaker. Ejection, not exercised here, is the second line: it would take an endpoint out when the load alone would still pick it (every other endpoint busier than the penalty, or a penalty set low).",
            p.penalty.as_secs_f64(),
            p.decay.as_secs_f64(),
            p.consecutive_failures
        );
    } else {
        let _ = writeln!(
            notes,
            "- Ejection changed the outcome: compare the rows of ours with and without it."
        );
    }
    let _ = writeln!(
        notes,
        "- While endpoint 3 is only slow, ours and tower's PeakEwma make the same choices (no call fails, and both use PeakEwma's arithmetic and the same random picks): the p99.9 comes from the calls sent to endpoint 3 before its estimate rose."
    );
    let _ = writeln!(
        notes,
        "- Round robin's p50 and p99 look fine because they are over successes only: the calls it sends to the slow endpoint reach the deadline (errors) while its queue grows, and then every fourth call fails."
    );
    println!("\n{table}");
    println!("Targets:\n{checks}");
    println!("Notes:\n{notes}");
    println!(
        "all targets met: {all}; wall time {:.1} s",
        wall.elapsed().as_secs_f64()
    );

    if p.smoke || overridden {
        println!("(not writing docs/: smoke run or parameters overridden)");
        return;
    }
    let mut md = header;
    let _ = writeln!(
        md,
        "\nReproduce with `cargo bench --bench tail_latency --features balance`.\n"
    );
    let _ = writeln!(md, "## Results\n\n{table}");
    let _ = writeln!(
        md,
        "Percentiles are over successful answers, from the scheduled arrival to the answer. errors = failed calls + calls that reached the {} ms client deadline, over all requests that arrived in the phase. calls to endpoint 3 = the share of the calls the policy sent to the degraded endpoint in the phase (all four endpoints are alike in the baseline).\n",
        p.deadline.as_millis()
    );
    let _ = writeln!(md, "## Targets\n\n{checks}");
    let _ = writeln!(md, "## Notes\n\n{notes}");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/tail-latency-results.md");
    std::fs::write(&path, md).expect("write docs/tail-latency-results.md");
    println!("wrote {}", path.display());
}
