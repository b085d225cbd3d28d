//! Overload policy simulation: goodput and latency of several protection stacks
//! in front of the same overloaded application.
//!
//! Run with `cargo bench --bench overload`. It writes `docs/overload-results.md`,
//! `docs/overload-goodput.svg` and `docs/overload-latency.svg`.
//!
//! Everything runs on tokio's paused clock (a current-thread runtime built with
//! `start_paused(true)`): time only moves when every task waits, straight to the
//! next timer. The simulation is therefore deterministic and measures queueing
//! policy, not CPU cost. tokio's timer has a resolution of 1 ms, coarse next to
//! a 10 ms service time (it would round arrivals up to the next millisecond and
//! leave a freed worker idle until then), so the scenario runs [`TIME_SCALE`]
//! times slower on the paused clock than the figures it reports: every duration
//! of the scenario (service times, queue timeout, CoDel target and interval,
//! tower's timeout, client deadline, arrival gaps) is multiplied by it before it
//! reaches tokio, and every measured latency divided by it. The effective
//! resolution is 10 µs.
//!
//! # Model
//!
//! - The app has `K` workers (a thread pool with an unbounded FIFO of jobs,
//!   modelled by a tokio `Semaphore`). `call` submits a job at once; the job
//!   waits for a worker, then holds it for its service time (uniform in
//!   `[0.5 S, 1.5 S]`, in 10 µs steps). Work cannot be cancelled: a job runs to
//!   the end even if nobody waits for its answer any more, as in a real thread
//!   pool. The app's `poll_ready` is always ready: it does not know that it is
//!   overloaded.
//! - Open-loop Poisson arrivals at a multiple of the capacity `K / S`. Each
//!   request is a task that calls a clone of the stack with `oneshot` inside
//!   `tokio::time::timeout(deadline, ..)`, and drops the call at the deadline.
//!   The deadline is at least the queue timeout plus the longest service time.
//! - Every stack sees the same arrivals and service times at a given load.
//!
//! # Figures
//!
//! - goodput: successful answers received within the deadline and within the
//!   arrival window, divided by `capacity * window` (so at most about the load
//!   when below 1x, and at most about 1);
//! - p50 / p99: latency of all good answers;
//! - rejected: errors answered before the deadline (`Overloaded`, `QueueFull`,
//!   `QueueTimeout`, tower's `Elapsed`);
//! - unanswered: the client reached its deadline with no answer at all;
//! - late: jobs that finished after their client had gone (deadline reached or
//!   error received); wasted work is their share of all the service time spent;
//! - max pool backlog: the most jobs ever waiting for a worker inside the app.
//!
//! The targets for our stacks are checked and printed, and the same arrivals are
//! run again at other queue bounds (a sensitivity table).
//!
//! Set `OVERLOAD_SEED`, `OVERLOAD_QUEUE` (the queue bound) or
//! `OVERLOAD_DURATION` (simulated seconds per run) to explore; with any of them
//! set, nothing is written to `docs/`.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_scale::error::{Overloaded, QueueFull, QueueTimeout};
use tower_scale::limit::ConcurrencyLimitLayer;
use tower_scale::queue::{Order, QueueLayer};
use tower_scale::shed::LoadShedLayer;

#[path = "overload/svg.rs"]
mod svg;

const MS: Duration = Duration::from_millis(1);
/// How many times slower the scenario runs on tokio's paused clock than the
/// figures it reports (see the module docs).
const TIME_SCALE: u32 = 100;

/// A scenario duration as tokio sees it.
fn sim(d: Duration) -> Duration {
    d * TIME_SCALE
}

/// A duration measured on tokio's clock, in the scenario's time.
fn real(d: Duration) -> Duration {
    d / TIME_SCALE
}
const PAUSED: &str = "paused tokio clock: measures queueing policy, not CPU cost";

// ---------------------------------------------------------------------------
// Parameters

#[derive(Clone, Debug)]
struct Params {
    seed: u64,
    /// K: workers in the app.
    workers: usize,
    /// Service time: uniform over `[min_service, max_service]` in steps of
    /// 10 µs (whole milliseconds of the scaled clock).
    min_service: Duration,
    max_service: Duration,
    /// One queue bound for every stack that queues (tower's `Buffer`, our `Queue`).
    queue_bound: usize,
    /// How long our `Queue` lets a request wait.
    queue_timeout: Duration,
    /// CoDel target and interval of `Order::AdaptiveLifo` (the defaults).
    codel_target: Duration,
    codel_interval: Duration,
    /// tower's outer `Timeout` in the stack that has one.
    outer_timeout: Duration,
    /// The client gives up after this long.
    deadline: Duration,
    /// Load multiples of capacity.
    loads: Vec<f64>,
    /// Simulated arrival window per run.
    duration: Duration,
    /// Load of the run that gives the unloaded median latency.
    unloaded_load: f64,
    /// Smoke mode (`cargo test`): short runs, nothing written.
    smoke: bool,
}

impl Params {
    fn mean_service(&self) -> Duration {
        (self.min_service + self.max_service) / 2
    }

    /// Requests per second the app can serve: K / mean service time.
    fn capacity(&self) -> f64 {
        self.workers as f64 / self.mean_service().as_secs_f64()
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "- {PAUSED}; the scenario runs {TIME_SCALE}x slower on the paused clock, so tokio's 1 ms timer resolution is 10 us of scenario time; all figures are in scenario time"
        );
        let _ = writeln!(
            s,
            "- seed: {} (arrival times and service times at the i-th load come from StdRng seeded with seed + i; the unloaded run uses seed - 1)",
            self.seed
        );
        let _ = writeln!(
            s,
            "- app: K = {} workers, unbounded FIFO job queue (thread pool), work not cancellable once submitted; poll_ready always ready",
            self.workers
        );
        let _ = writeln!(
            s,
            "- service time: uniform in [{}, {}] ms (10 us steps), mean S = {} ms; capacity K / S = {:.0} requests/s",
            ms(self.min_service),
            ms(self.max_service),
            ms(self.mean_service()),
            self.capacity()
        );
        let _ = writeln!(
            s,
            "- arrivals: open-loop Poisson at {} x capacity, {} s window of arrivals per run, then drained (every client done, every job run)",
            self.loads
                .iter()
                .map(|l| format!("{l}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.duration.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "- queue bound Q = {} for every stack that queues (tower Buffer, our Queue)",
            self.queue_bound
        );
        let _ = writeln!(
            s,
            "- our queue timeout T = {} ms; AdaptiveLifo target {} ms, interval {} ms (the defaults of Order::adaptive_lifo())",
            ms(self.queue_timeout),
            ms(self.codel_target),
            ms(self.codel_interval)
        );
        let _ = writeln!(
            s,
            "- tower outer Timeout = {} ms (T + max service)",
            ms(self.outer_timeout)
        );
        let _ = writeln!(
            s,
            "- client deadline D = {} ms (>= T + max service = {} ms); the client drops its call at D",
            ms(self.deadline),
            ms(self.queue_timeout + self.max_service)
        );
        let _ = writeln!(
            s,
            "- unloaded reference: the app alone at {} x capacity",
            self.unloaded_load
        );
        s
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a whole number, got {value:?}")),
    )
}

// ---------------------------------------------------------------------------
// The app: K workers, work that runs to the end once submitted

#[derive(Debug)]
struct Req {
    service: Duration,
    /// True while the client still waits for the answer.
    waiting: Arc<AtomicBool>,
}

#[derive(Default, Debug)]
struct Work {
    jobs: u64,
    busy: Duration,
    /// Jobs that finished after their client had gone, and their service time.
    late: u64,
    wasted: Duration,
    /// Jobs submitted to the pool and not finished, and the most there were.
    in_pool: u64,
    max_in_pool: u64,
}

#[derive(Clone)]
struct App {
    pool: Arc<Semaphore>,
    work: Arc<Mutex<Work>>,
}

impl App {
    fn new(workers: usize) -> Self {
        App {
            pool: Arc::new(Semaphore::new(workers)),
            work: Arc::default(),
        }
    }
}

struct AppFuture {
    rx: oneshot::Receiver<()>,
}

impl Future for AppFuture {
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map_err(|_| BoxError::from("job lost"))
    }
}

impl Service<Req> for App {
    type Response = ();
    type Error = BoxError;
    type Future = AppFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> AppFuture {
        let (tx, rx) = oneshot::channel();
        let pool = self.pool.clone();
        let work = self.work.clone();
        {
            let mut work = work.lock().expect("not poisoned");
            work.in_pool += 1;
            work.max_in_pool = work.max_in_pool.max(work.in_pool);
        }
        // Submitted to the pool now; runs when a worker frees, whoever waits.
        tokio::spawn(async move {
            let worker = pool
                .acquire_owned()
                .await
                .expect("the pool is never closed");
            let started = Instant::now();
            tokio::time::sleep(req.service).await;
            let busy = started.elapsed();
            {
                let mut work = work.lock().expect("not poisoned");
                work.jobs += 1;
                work.in_pool -= 1;
                work.busy += busy;
                if !req.waiting.load(SeqCst) {
                    work.late += 1;
                    work.wasted += busy;
                }
            }
            drop(worker);
            let _ = tx.send(());
        });
        AppFuture { rx }
    }
}

// ---------------------------------------------------------------------------
// Stacks

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stack {
    Bare,
    TowerShedLimit,
    TowerShedBufferLimit,
    TowerTimeoutShedBufferLimit,
    OursFifo,
    OursAdaptiveLifo,
}

const STACKS: [Stack; 6] = [
    Stack::Bare,
    Stack::TowerShedLimit,
    Stack::TowerShedBufferLimit,
    Stack::TowerTimeoutShedBufferLimit,
    Stack::OursFifo,
    Stack::OursAdaptiveLifo,
];

impl Stack {
    fn name(self) -> &'static str {
        match self {
            Stack::Bare => "no protection",
            Stack::TowerShedLimit => "tower Shed+Limit",
            Stack::TowerShedBufferLimit => "tower Shed+Buffer+Limit",
            Stack::TowerTimeoutShedBufferLimit => "tower Timeout+Shed+Buffer+Limit",
            Stack::OursFifo => "ours Queue(Fifo)",
            Stack::OursAdaptiveLifo => "ours Queue(AdaptiveLifo)",
        }
    }

    fn layers(self, p: &Params) -> String {
        let (k, q) = (p.workers, p.queue_bound);
        let t = ms(p.queue_timeout);
        match self {
            Stack::Bare => "app alone".into(),
            Stack::TowerShedLimit => format!("tower LoadShed -> tower ConcurrencyLimit({k}) -> app"),
            Stack::TowerShedBufferLimit => {
                format!("tower LoadShed -> tower Buffer({q}) -> tower ConcurrencyLimit({k}) -> app")
            }
            Stack::TowerTimeoutShedBufferLimit => format!(
                "tower Timeout({} ms) -> tower LoadShed -> tower Buffer({q}) -> tower ConcurrencyLimit({k}) -> app",
                ms(p.outer_timeout)
            ),
            Stack::OursFifo => format!(
                "tower_scale LoadShed -> Queue({q}, {t} ms, Fifo) -> ConcurrencyLimit({k}) -> app"
            ),
            Stack::OursAdaptiveLifo => format!(
                "tower_scale LoadShed -> Queue({q}, {t} ms, AdaptiveLifo) -> ConcurrencyLimit({k}) -> app"
            ),
        }
    }

    fn ours(self) -> bool {
        matches!(self, Stack::OursFifo | Stack::OursAdaptiveLifo)
    }

    fn color(self) -> &'static str {
        match self {
            Stack::Bare => "#7f7f7f",
            Stack::TowerShedLimit => "#1f77b4",
            Stack::TowerShedBufferLimit => "#ff7f0e",
            Stack::TowerTimeoutShedBufferLimit => "#9467bd",
            Stack::OursFifo => "#2ca02c",
            Stack::OursAdaptiveLifo => "#d62728",
        }
    }

    fn dash(self) -> &'static str {
        match self {
            Stack::TowerShedBufferLimit | Stack::TowerTimeoutShedBufferLimit => "3 3",
            _ => "none",
        }
    }

    /// Builds the stack once (inside the runtime: tower's `Buffer` spawns its
    /// worker); every client calls a clone.
    fn build(self, p: &Params, app: App) -> BoxCloneService<Req, (), BoxError> {
        let (k, q) = (p.workers, p.queue_bound);
        match self {
            Stack::Bare => BoxCloneService::new(app),
            Stack::TowerShedLimit => BoxCloneService::new(
                ServiceBuilder::new()
                    .load_shed()
                    .concurrency_limit(k)
                    .service(app),
            ),
            Stack::TowerShedBufferLimit => BoxCloneService::new(
                ServiceBuilder::new()
                    .load_shed()
                    .buffer(q)
                    .concurrency_limit(k)
                    .service(app),
            ),
            Stack::TowerTimeoutShedBufferLimit => BoxCloneService::new(
                ServiceBuilder::new()
                    .timeout(sim(p.outer_timeout))
                    .load_shed()
                    .buffer(q)
                    .concurrency_limit(k)
                    .service(app),
            ),
            Stack::OursFifo | Stack::OursAdaptiveLifo => {
                let order = if self == Stack::OursFifo {
                    Order::Fifo
                } else {
                    Order::AdaptiveLifo {
                        target: sim(p.codel_target),
                        interval: sim(p.codel_interval),
                    }
                };
                BoxCloneService::new(
                    ServiceBuilder::new()
                        .layer(LoadShedLayer::new())
                        .layer(QueueLayer::new(q, sim(p.queue_timeout)).order(order))
                        .layer(ConcurrencyLimitLayer::new(k))
                        .service(app),
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One run: one stack at one load

/// One request, in tokio's (scaled) time.
#[derive(Clone, Copy, Debug)]
struct Arrival {
    at: Duration,
    service: Duration,
}

/// The same arrivals and service times for every stack at a load.
fn arrivals(p: &Params, load: f64, seed: u64) -> Vec<Arrival> {
    let mut rng = StdRng::seed_from_u64(seed);
    let rate = load * p.capacity();
    let end = p.duration.as_secs_f64();
    // Whole milliseconds of the scaled clock: tokio's timer would round a
    // fraction up, stretching every job.
    let (lo, hi) = (
        sim(p.min_service).as_millis() as u64,
        sim(p.max_service).as_millis() as u64,
    );
    let mut t = 0.0;
    let mut out = Vec::with_capacity((rate * end * 1.05) as usize + 16);
    loop {
        // Exponential inter-arrival time; 1 - U lies in (0, 1].
        let u: f64 = rng.random();
        t += -(1.0 - u).ln() / rate;
        if t >= end {
            return out;
        }
        out.push(Arrival {
            at: sim(Duration::from_secs_f64(t)),
            service: Duration::from_millis(rng.random_range(lo..=hi)),
        });
    }
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// Latency and answer time since the start, both in tokio's time.
    Good(Duration, Duration),
    Overloaded,
    QueueFull,
    QueueTimeout,
    Elapsed,
    OtherError,
    Unanswered,
}

#[derive(Clone, Debug, Default)]
struct Report {
    requests: u64,
    good: u64,
    goodput: f64,
    p50: Option<Duration>,
    p99: Option<Duration>,
    overloaded: u64,
    queue_full: u64,
    queue_timeout: u64,
    elapsed: u64,
    other: u64,
    unanswered: u64,
    jobs: u64,
    late: u64,
    wasted: f64,
    max_backlog: u64,
}

impl Report {
    fn rejected(&self) -> u64 {
        self.overloaded + self.queue_full + self.queue_timeout + self.elapsed + self.other
    }

    fn pct(&self, n: u64) -> f64 {
        100.0 * n as f64 / self.requests.max(1) as f64
    }
}

fn classify(err: &BoxError) -> Outcome {
    if err.is::<Overloaded>() {
        Outcome::Overloaded
    } else if err.is::<QueueFull>() {
        Outcome::QueueFull
    } else if err.is::<QueueTimeout>() {
        Outcome::QueueTimeout
    } else if err.is::<tower::timeout::error::Elapsed>() {
        Outcome::Elapsed
    } else {
        Outcome::OtherError
    }
}

async fn client(
    svc: BoxCloneService<Req, (), BoxError>,
    req: Req,
    deadline: Duration,
    origin: Instant,
) -> Outcome {
    let start = Instant::now();
    let waiting = req.waiting.clone();
    let result = tokio::time::timeout(deadline, svc.oneshot(req)).await;
    // From here on nobody waits for this request's answer.
    waiting.store(false, SeqCst);
    match result {
        Ok(Ok(())) => Outcome::Good(start.elapsed(), origin.elapsed()),
        Ok(Err(err)) => classify(&err),
        Err(_) => Outcome::Unanswered,
    }
}

fn run(p: &Params, stack: Stack, arrivals: &[Arrival]) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let app = App::new(p.workers);
        let (pool, work) = (app.pool.clone(), app.work.clone());
        let svc = stack.build(p, app);

        let start = Instant::now();
        let mut clients = Vec::with_capacity(arrivals.len());
        for arrival in arrivals {
            let when = start + arrival.at;
            if when > Instant::now() {
                tokio::time::sleep_until(when).await;
            }
            let req = Req {
                service: arrival.service,
                waiting: Arc::new(AtomicBool::new(true)),
            };
            clients.push(tokio::spawn(client(
                svc.clone(),
                req,
                sim(p.deadline),
                start,
            )));
        }
        drop(svc);

        let mut report = Report {
            requests: arrivals.len() as u64,
            ..Report::default()
        };
        let window = sim(p.duration);
        let mut good = Vec::new();
        let mut good_in_window = 0u64;
        for handle in clients {
            match handle.await.expect("client task") {
                Outcome::Good(latency, at) => {
                    good.push(real(latency));
                    good_in_window += u64::from(at <= window);
                }
                Outcome::Overloaded => report.overloaded += 1,
                Outcome::QueueFull => report.queue_full += 1,
                Outcome::QueueTimeout => report.queue_timeout += 1,
                Outcome::Elapsed => report.elapsed += 1,
                Outcome::OtherError => report.other += 1,
                Outcome::Unanswered => report.unanswered += 1,
            }
        }
        // Every client has gone; let the pool finish the jobs it was given (the
        // semaphore is fair, so this waits behind every queued job).
        tokio::time::sleep(sim(p.deadline)).await;
        let _all = pool
            .acquire_many(p.workers as u32)
            .await
            .expect("the pool is never closed");

        good.sort_unstable();
        let percentile = |q: f64| -> Option<Duration> {
            if good.is_empty() {
                return None;
            }
            let rank = ((q * good.len() as f64).ceil() as usize).clamp(1, good.len());
            Some(good[rank - 1])
        };
        report.good = good.len() as u64;
        report.goodput = good_in_window as f64 / (p.capacity() * p.duration.as_secs_f64());
        report.p50 = percentile(0.50);
        report.p99 = percentile(0.99);
        let work = work.lock().expect("not poisoned");
        report.jobs = work.jobs;
        report.late = work.late;
        // Jobs beyond the workers had to wait inside the app.
        report.max_backlog = work.max_in_pool.saturating_sub(p.workers as u64);
        report.wasted = if work.busy.is_zero() {
            0.0
        } else {
            work.wasted.as_secs_f64() / work.busy.as_secs_f64()
        };
        report
    })
}

// ---------------------------------------------------------------------------
// Output

fn fmt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.1}", ms(d)))
}

fn table(results: &[(f64, Stack, Report)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| load | stack | requests | goodput | p50 good (ms) | p99 good (ms) | rejected | shed / full / queue timeout / elapsed | unanswered | late jobs | wasted work | max pool backlog |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    );
    let mut last_load = None;
    for (load, stack, r) in results {
        let load_cell = if last_load == Some(*load) {
            String::new()
        } else {
            format!("{load}x")
        };
        last_load = Some(*load);
        let _ = writeln!(
            s,
            "| {load_cell} | {} | {} | {:.3} | {} | {} | {} ({:.1}%) | {} / {} / {} / {} | {} ({:.1}%) | {} | {:.1}% | {} |",
            stack.name(),
            r.requests,
            r.goodput,
            fmt_ms(r.p50),
            fmt_ms(r.p99),
            r.rejected(),
            r.pct(r.rejected()),
            r.overloaded,
            r.queue_full,
            r.queue_timeout,
            r.elapsed,
            r.unanswered,
            r.pct(r.unanswered),
            r.late,
            100.0 * r.wasted,
            r.max_backlog,
        );
    }
    s
}

/// Erlang's loss formula B(k, a): the share of arrivals an M/G/k/k system
/// (k servers, no queue: tower's LoadShed + ConcurrencyLimit) turns away.
fn erlang_b(k: usize, a: f64) -> f64 {
    (1..=k).fold(1.0, |b, i| a * b / (i as f64 + a * b))
}

/// Notes that explain the figures, with the numbers they rest on.
fn notes(p: &Params, results: &[(f64, Stack, Report)]) -> String {
    let mut s = String::new();
    let k = p.workers;
    let _ = writeln!(
        s,
        "- tower Shed+Limit has no queue: it is an M/G/{k}/{k} loss system, whose goodput Erlang's formula predicts as load x (1 - B({k}, {k} x load)). Predicted vs measured (a check of the simulation):"
    );
    for (load, _, r) in results
        .iter()
        .filter(|(_, s, _)| *s == Stack::TowerShedLimit)
    {
        let predicted = load * (1.0 - erlang_b(k, k as f64 * load));
        let _ = writeln!(
            s,
            "  - {load}x: predicted {predicted:.3}, measured {:.3}",
            r.goodput
        );
    }
    let room = (p.deadline - p.max_service).as_secs_f64() * p.capacity();
    let _ = write!(
        s,
        "- tower Buffer has no timeout and holds up to Q / capacity = {:.0} ms of work. A request that waits more than D - max service = {} ms (about {room:.0} requests deep) may see its client leave while its job runs. tower's ConcurrencyLimit then releases the permit (the response future is dropped), but the job cannot be cancelled and keeps its worker, so the limit admits a new job while every worker is busy: the jobs pile up in the app's own queue (max pool backlog), every answer comes too late, and goodput collapses. An outer Timeout only turns the client's deadline into an earlier Elapsed error. ",
        1e3 * p.queue_bound as f64 / p.capacity(),
        ms(p.deadline - p.max_service),
    );
    let _ = writeln!(
        s,
        "{}",
        if p.queue_bound as f64 > room {
            format!("Here Q = {} is deeper than that; with Q below about {room:.0} the Buffer stacks do well (see the sensitivity table).", p.queue_bound)
        } else {
            format!(
                "Here Q = {} is shallower than that, so the Buffer stacks do not collapse.",
                p.queue_bound
            )
        }
    );
    let _ = writeln!(
        s,
        "- Our Queue never lets a request wait more than T = {} ms, so a dispatched request is answered by T + max service = {} ms < D: no client leaves while its job runs, no job ever waits inside the app (max pool backlog 0), and no work is wasted, whatever Q.",
        ms(p.queue_timeout),
        ms(p.queue_timeout + p.max_service)
    );
    let _ = writeln!(
        s,
        "- With Fifo under overload every admitted request waits about T. AdaptiveLifo serves newest-first once its CoDel detector has seen the oldest waiting request older than the target for an interval; before that (the first interval of a run) and after the arrival window closes (the queue drains oldest-last), it serves requests that waited longer, which is where its p99 comes from."
    );
    s
}

/// The stacks that queue, at other queue bounds: goodput and p50 per load.
fn sensitivity(p: &Params, per_load: &[Vec<Arrival>]) -> String {
    let bounds = [32, 64, 128, 256];
    let mut s = String::new();
    let _ = write!(s, "| stack | Q (ms of work) |");
    for load in &p.loads {
        let _ = write!(s, " {load}x |");
    }
    let _ = write!(s, "\n|---|---|");
    for _ in &p.loads {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    let queueing = [
        Stack::TowerShedBufferLimit,
        Stack::TowerTimeoutShedBufferLimit,
        Stack::OursFifo,
        Stack::OursAdaptiveLifo,
    ];
    for stack in queueing {
        for bound in bounds {
            let p = Params {
                queue_bound: bound,
                ..p.clone()
            };
            let _ = write!(
                s,
                "| {} | {bound} ({:.0}) |",
                stack.name(),
                1e3 * bound as f64 / p.capacity()
            );
            for arrivals in per_load {
                let r = run(&p, stack, arrivals);
                let _ = write!(s, " {:.3}, {} |", r.goodput, fmt_ms(r.p50));
            }
            s.push('\n');
        }
    }
    s
}

/// Checks the targets for our stacks; returns the lines and whether all pass.
fn targets(p: &Params, unloaded_p50: Duration, results: &[(f64, Stack, Report)]) -> (String, bool) {
    let mut s = String::new();
    let mut all = true;
    let p99_bound = p.queue_timeout + p.max_service;
    let mut check = |s: &mut String, ok: bool, line: String| {
        all &= ok;
        let _ = writeln!(s, "- [{}] {line}", if ok { "x" } else { " " });
    };
    for stack in STACKS.iter().copied().filter(|s| s.ours()) {
        for (load, _, r) in results.iter().filter(|(_, s, _)| *s == stack) {
            let load = *load;
            let at = format!("{} at {load}x", stack.name());
            if load >= 1.0 {
                check(
                    &mut s,
                    r.goodput >= 0.95,
                    format!("{at}: goodput {:.3} >= 0.95", r.goodput),
                );
            }
            check(
                &mut s,
                r.wasted <= 0.02,
                format!("{at}: wasted work {:.2}% <= 2%", 100.0 * r.wasted),
            );
            check(
                &mut s,
                r.p99.is_some_and(|d| d <= p99_bound),
                format!(
                    "{at}: p99 of good answers {} ms <= T + max service = {} ms",
                    fmt_ms(r.p99),
                    ms(p99_bound)
                ),
            );
            check(
                &mut s,
                r.unanswered == 0,
                format!("{at}: unanswered {} == 0", r.unanswered),
            );
            if stack == Stack::OursAdaptiveLifo && load >= 2.0 {
                check(
                    &mut s,
                    r.p50.is_some_and(|d| d <= 2 * unloaded_p50),
                    format!(
                        "{at}: p50 of good answers {} ms <= 2 x unloaded p50 = {} ms",
                        fmt_ms(r.p50),
                        fmt_ms(Some(2 * unloaded_p50))
                    ),
                );
            }
        }
    }
    (s, all)
}

fn charts(
    p: &Params,
    unloaded_p50: Duration,
    results: &[(f64, Stack, Report)],
) -> (String, String) {
    let x_labels: Vec<String> = p.loads.iter().map(|l| format!("{l}x")).collect();
    let report = |load: f64, stack: Stack| {
        results
            .iter()
            .find(|(l, s, _)| *l == load && *s == stack)
            .map(|(_, _, r)| r)
    };
    // A median of the few good answers of a collapsed stack is drawn hollow.
    const FEW: f64 = 0.1;
    let series = |value: &dyn Fn(&Report) -> Option<f64>, mark_few: bool| -> Vec<svg::Series> {
        STACKS
            .iter()
            .map(|&stack| svg::Series {
                name: stack.name().into(),
                color: stack.color(),
                dash: stack.dash(),
                width: if stack == Stack::Bare { 7.0 } else { 2.2 },
                opacity: if stack == Stack::Bare { 0.35 } else { 1.0 },
                values: p
                    .loads
                    .iter()
                    .map(|&load| report(load, stack).and_then(value))
                    .collect(),
                hollow: p
                    .loads
                    .iter()
                    .map(|&load| mark_few && report(load, stack).is_some_and(|r| r.goodput < FEW))
                    .collect(),
            })
            .collect()
    };
    let subtitle = [
        format!(
            "K = {} workers, service {}-{} ms (mean {} ms), capacity {:.0}/s, Q = {}, queue timeout T = {} ms, client deadline {} ms, seed {}",
            p.workers,
            ms(p.min_service),
            ms(p.max_service),
            ms(p.mean_service()),
            p.capacity(),
            p.queue_bound,
            ms(p.queue_timeout),
            ms(p.deadline),
            p.seed
        ),
        format!("open-loop Poisson arrivals, {} s per run; {PAUSED}", p.duration.as_secs_f64()),
    ];
    let overlap = [
        "no protection is the wide pale line,".to_string(),
        "visible under the curves it meets".to_string(),
    ];

    let goodput_series = series(&|r: &Report| Some(r.goodput), false);
    let goodput = svg::Chart {
        title: "Goodput vs offered load",
        subtitle: &subtitle,
        note: &overlap,
        x_title: "offered load (multiple of capacity)",
        y_title: "goodput (good answers / capacity)",
        x_labels: &x_labels,
        y_max: 1.1,
        y_step: 0.1,
        y_decimals: 1,
        series: &goodput_series,
        guides: &[svg::Guide {
            value: 0.95,
            label: "target 0.95".into(),
        }],
    }
    .render();

    let latency_series = series(&|r: &Report| r.p50.map(ms), true);
    let top = latency_series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(ms(p.deadline), |a, &b| a.max(b));
    let y_max = (top / 20.0).ceil() * 20.0;
    let mut note = overlap.to_vec();
    note.push(String::new());
    note.push(format!("hollow: goodput < {FEW}, the median of"));
    note.push("the few answers that made it".into());
    let latency = svg::Chart {
        title: "Median latency of good answers vs offered load",
        subtitle: &subtitle,
        note: &note,
        x_title: "offered load (multiple of capacity)",
        y_title: "p50 latency of good answers (ms)",
        x_labels: &x_labels,
        y_max,
        y_step: 20.0,
        y_decimals: 0,
        series: &latency_series,
        guides: &[
            svg::Guide {
                value: ms(p.deadline),
                label: format!("client deadline {} ms", ms(p.deadline)),
            },
            svg::Guide {
                value: ms(2 * unloaded_p50),
                label: format!("2 x unloaded p50 = {} ms", fmt_ms(Some(2 * unloaded_p50))),
            },
        ],
    }
    .render();
    (goodput, latency)
}

// ---------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then run a
    // short smoke version and write nothing.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let seed = env_u64("OVERLOAD_SEED");
    let queue = env_u64("OVERLOAD_QUEUE");
    let duration = env_u64("OVERLOAD_DURATION");
    let overridden = seed.is_some() || queue.is_some() || duration.is_some();

    let queue_timeout = 100 * MS;
    let max_service = 15 * MS;
    let p = Params {
        seed: seed.unwrap_or(0x5eed_2024),
        workers: 8,
        min_service: 5 * MS,
        max_service,
        queue_bound: queue.map_or(128, |q| q as usize),
        queue_timeout,
        codel_target: 5 * MS,
        codel_interval: 100 * MS,
        outer_timeout: queue_timeout + max_service,
        deadline: 120 * MS,
        loads: vec![0.8, 1.0, 2.0, 5.0, 10.0],
        duration: Duration::from_secs(duration.unwrap_or(if smoke { 1 } else { 20 })),
        unloaded_load: 0.05,
        smoke,
    };
    assert!(p.deadline >= p.queue_timeout + p.max_service);

    // Real time on purpose: how long the whole simulation took to compute.
    #[allow(clippy::disallowed_types)]
    let wall = std::time::Instant::now();
    let mut header = String::new();
    let _ = writeln!(header, "# Overload policy simulation\n");
    let _ = writeln!(header, "{}", p.describe());
    let _ = writeln!(header, "Stacks (outer -> inner):\n");
    for stack in STACKS {
        let _ = writeln!(header, "- {}: {}", stack.name(), stack.layers(&p));
    }
    if p.smoke {
        println!("(smoke run: `cargo bench --bench overload` for the full simulation)");
    }
    println!("{header}");

    let unloaded = arrivals(&p, p.unloaded_load, p.seed.wrapping_sub(1));
    let unloaded_p50 = run(&p, Stack::Bare, &unloaded)
        .p50
        .expect("the unloaded run answers");
    println!(
        "unloaded p50 latency (app alone at {}x): {} ms\n",
        p.unloaded_load,
        fmt_ms(Some(unloaded_p50))
    );

    let per_load: Vec<Vec<Arrival>> = p
        .loads
        .iter()
        .enumerate()
        .map(|(i, &load)| arrivals(&p, load, p.seed.wrapping_add(i as u64)))
        .collect();
    let mut results = Vec::new();
    for (&load, arrivals) in p.loads.iter().zip(&per_load) {
        for stack in STACKS {
            let report = run(&p, stack, arrivals);
            println!(
                "{load:>4}x {:<32} goodput {:.3}  p50 {:>4} ms  p99 {:>4} ms  rejected {:>6}  unanswered {:>6}  wasted {:>5.1}%",
                stack.name(),
                report.goodput,
                fmt_ms(report.p50),
                fmt_ms(report.p99),
                report.rejected(),
                report.unanswered,
                100.0 * report.wasted
            );
            results.push((load, stack, report));
        }
    }

    let table = table(&results);
    let (checks, all) = targets(&p, unloaded_p50, &results);
    let notes = notes(&p, &results);
    println!("\n{table}");
    println!("Notes:\n\n{notes}");
    let sensitivity = if p.smoke {
        String::new()
    } else {
        sensitivity(&p, &per_load)
    };
    println!("Sensitivity to the queue bound (goodput, p50 ms):\n\n{sensitivity}");
    println!(
        "Targets for ours (unloaded p50 = {} ms):\n{checks}",
        fmt_ms(Some(unloaded_p50))
    );
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
        "\nUnloaded p50 latency (app alone at {}x capacity): {} ms.\n",
        p.unloaded_load,
        fmt_ms(Some(unloaded_p50))
    );
    let _ = writeln!(md, "Reproduce with `cargo bench --bench overload`.\n");
    let _ = writeln!(md, "## Results\n\n{table}");
    let _ = writeln!(
        md,
        "goodput = good answers (success within the client deadline) received within the {} s window / (capacity x {} s); p50 and p99 are over all good answers; rejected = errors before the deadline (shed = Overloaded, full = QueueFull, queue timeout = QueueTimeout, elapsed = tower's Timeout); unanswered = the client reached its deadline with no answer; late jobs = jobs that finished after their client had gone (deadline reached or error received); wasted work = their share of all service time spent; max pool backlog = the most jobs ever waiting for a worker inside the app (jobs in the app beyond its K workers).\n",
        p.duration.as_secs_f64(),
        p.duration.as_secs_f64()
    );
    let _ = writeln!(md, "## Notes\n\n{notes}");
    let _ = writeln!(md, "## Targets for our stacks\n\n{checks}");
    let _ = writeln!(
        md,
        "## Sensitivity to the queue bound\n\nThe same arrivals, with other queue bounds Q (the main table uses Q = {}); each cell is goodput, p50 of good answers in ms. Q in ms of work = Q / capacity.\n\n{sensitivity}",
        p.queue_bound
    );
    let _ = writeln!(
        md,
        "![goodput vs load](overload-goodput.svg)\n\n![median latency vs load](overload-latency.svg)"
    );
    let (goodput_svg, latency_svg) = charts(&p, unloaded_p50, &results);
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs).expect("create docs/");
    for (name, text) in [
        ("overload-results.md", md),
        ("overload-goodput.svg", goodput_svg),
        ("overload-latency.svg", latency_svg),
    ] {
        let path = docs.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}
