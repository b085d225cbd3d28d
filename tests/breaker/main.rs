//! The circuit breaker from the outside, through its public API only:
//!
//! - a property test that replays random outcomes, call durations, time
//!   steps and the handle's manual controls against a small reference model of
//!   the window and thresholds, on a paused clock, for both window kinds;
//! - three not-ready breakers inside a real `tower::balance::p2c::Balance`,
//!   one of whose endpoints fails for a while, on a paused clock;
//! - a real axum server behind `ErrorResponseLayer` and a fail-fast breaker,
//!   with a real HTTP client, in real time (counts, never durations).

mod support;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::routing::get;
use axum::Router;
use futures::FutureExt as _;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{Constant, Load};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt as _};
use tower_scale::breaker::{
    Backoff, BreakerConfig, BreakerHandle, CircuitBreakerLayer, ClassifyFn, HttpStatus, Outcome,
    State, Window,
};
use tower_scale::error::{BoxError, CircuitOpen};
use tower_scale::http::ErrorResponseLayer;

use support::{bounded, wait_until, Reply, Server};

/// Lets tasks woken at the current instant (the breaker's open timer) run
/// before the test looks at the state.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

/// The breaker settings a case runs with, in whole units so that the model
/// can use exact integer arithmetic: rates are whole percents, open durations
/// whole seconds, backoff multipliers whole numbers.
#[derive(Clone, Debug)]
struct Settings {
    window: Window,
    minimum_calls: u32,
    failure_pct: u32,
    /// Slow-call duration in milliseconds and slow-call rate in percent.
    slow: Option<(u64, u32)>,
    consecutive_failures: Option<u32>,
    open_secs: u64,
    /// Multiplier and cap (whole seconds); no jitter.
    backoff: Option<(u32, u64)>,
    half_open_calls: u32,
}

impl Settings {
    fn config(&self) -> BreakerConfig {
        let mut builder = BreakerConfig::builder()
            .failure_rate(f64::from(self.failure_pct) / 100.0)
            .window(self.window)
            .minimum_calls(self.minimum_calls)
            .open_duration(Duration::from_secs(self.open_secs))
            .half_open_calls(self.half_open_calls)
            .name("model");
        if let Some((millis, pct)) = self.slow {
            builder = builder.slow_calls(Duration::from_millis(millis), f64::from(pct) / 100.0);
        }
        if let Some(n) = self.consecutive_failures {
            builder = builder.consecutive_failures(n);
        }
        if let Some((multiplier, max_secs)) = self.backoff {
            builder = builder.backoff(Backoff {
                multiplier: f64::from(multiplier),
                max: Duration::from_secs(max_secs),
                jitter: 0.0,
            });
        }
        builder.build().expect("generated settings are valid")
    }

    /// The open duration after `reopenings` failed half-open rounds in a row.
    fn open_for(&self, reopenings: u32) -> u64 {
        match self.backoff {
            None => self.open_secs * SEC,
            Some((multiplier, max_secs)) => {
                let factor = u64::from(multiplier).saturating_pow(reopenings);
                self.open_secs.saturating_mul(factor).min(max_secs) * SEC
            }
        }
    }
}

/// One outcome, as the model keeps it.
#[derive(Clone, Copy, Debug)]
struct Record {
    /// Completion time, nanoseconds after the breaker was made.
    at: u64,
    failed: bool,
    slow: bool,
}

/// What the model expects of a call.
#[derive(Debug, PartialEq)]
enum Expect {
    /// The inner service is called and its result comes back.
    Admitted,
    /// `CircuitOpen` with this `retry_after` (`None` when forced open); the
    /// inner service is not called.
    Rejected(Option<Duration>),
}

/// The breaker's semantics written the plain way: every outcome since the
/// window was last cleared is kept in a list, and the totals are recounted from
/// it each time. Calls come one at a time, so a half-open probe is always
/// recorded before the next one is admitted.
#[derive(Debug)]
struct Model {
    settings: Settings,
    state: State,
    /// Nanoseconds since the breaker was made.
    now: u64,
    /// Closed: every outcome recorded since the window was last cleared.
    records: Vec<Record>,
    consecutive: u32,
    /// Open: when it moves to HalfOpen.
    open_until: u64,
    /// Failed half-open rounds since the breaker last tripped from Closed.
    reopenings: u32,
    /// HalfOpen: the probes recorded in this round.
    probes: Vec<Record>,
}

/// Calls, failures and slow calls.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Totals {
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Totals {
    fn of<'a>(records: impl IntoIterator<Item = &'a Record>) -> Totals {
        records.into_iter().fold(Totals::default(), |mut t, r| {
            t.calls += 1;
            t.failures += u32::from(r.failed);
            t.slow += u32::from(r.slow);
            t
        })
    }

    /// `part / calls >= pct / 100`, exactly.
    fn reaches(part: u32, calls: u32, pct: u32) -> bool {
        u64::from(part) * 100 >= u64::from(pct) * u64::from(calls)
    }
}

impl Model {
    fn new(settings: Settings) -> Model {
        Model {
            settings,
            state: State::Closed,
            now: 0,
            records: Vec::new(),
            consecutive: 0,
            open_until: 0,
            reopenings: 0,
            probes: Vec::new(),
        }
    }

    /// The window's totals now.
    fn totals(&self) -> Totals {
        match self.settings.window {
            Window::Count(n) => {
                let skip = self.records.len().saturating_sub(n as usize);
                Totals::of(&self.records[skip..])
            }
            Window::Time { duration, buckets } => {
                let width = duration.as_nanos() as u64 / u64::from(buckets);
                let current = self.now / width;
                let oldest = current.saturating_sub(u64::from(buckets) - 1);
                Totals::of(
                    self.records
                        .iter()
                        .filter(|r| (oldest..=current).contains(&(r.at / width))),
                )
            }
        }
    }

    fn elapse(&mut self, nanos: u64) {
        self.now += nanos;
        if self.state == State::Open && self.now >= self.open_until {
            self.state = State::HalfOpen;
            self.probes.clear();
        }
    }

    fn open(&mut self) {
        self.state = State::Open;
        self.open_until = self.now + self.settings.open_for(self.reopenings);
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.records.clear();
        self.consecutive = 0;
        self.reopenings = 0;
    }

    /// A call that ends with `outcome` after `millis` of work.
    fn call(&mut self, outcome: Outcome, millis: u64) -> Expect {
        self.elapse(0);
        if self.state == State::Open {
            return Expect::Rejected(Some(Duration::from_nanos(self.open_until - self.now)));
        }
        if self.state == State::ForcedOpen {
            return Expect::Rejected(None);
        }
        // Closed, HalfOpen and Disabled have no timer: nothing changes while
        // the call runs.
        let admitted_in = self.state;
        self.elapse(millis * MS);
        if outcome == Outcome::Ignored || admitted_in == State::Disabled {
            return Expect::Admitted;
        }
        let record = Record {
            at: self.now,
            failed: outcome == Outcome::Failure,
            slow: self.settings.slow.is_some_and(|(limit, _)| millis >= limit),
        };
        match admitted_in {
            State::Closed => {
                self.records.push(record);
                self.consecutive = if record.failed {
                    self.consecutive + 1
                } else {
                    0
                };
                self.judge_closed();
            }
            State::HalfOpen => {
                self.probes.push(record);
                self.judge_half_open();
            }
            other => unreachable!("the model never admits in {other:?}"),
        }
        Expect::Admitted
    }

    /// `force_open`, `disable` or `reset` on the handle: the window starts
    /// afresh.
    fn set(&mut self, to: State) {
        self.close();
        self.state = to;
    }

    fn judge_closed(&mut self) {
        let s = &self.settings;
        if s.consecutive_failures
            .is_some_and(|n| self.consecutive >= n)
        {
            self.reopenings = 0;
            return self.open();
        }
        let t = self.totals();
        if t.calls < s.minimum_calls {
            return;
        }
        let slow = s
            .slow
            .is_some_and(|(_, pct)| Totals::reaches(t.slow, t.calls, pct));
        if Totals::reaches(t.failures, t.calls, s.failure_pct) || slow {
            self.reopenings = 0;
            self.open();
        }
    }

    fn judge_half_open(&mut self) {
        let n = self.settings.half_open_calls;
        if self.probes.len() < n as usize {
            return;
        }
        let t = Totals::of(&self.probes);
        let slow = self
            .settings
            .slow
            .is_some_and(|(_, pct)| Totals::reaches(t.slow, n, pct));
        if Totals::reaches(t.failures, n, self.settings.failure_pct) || slow {
            self.reopenings += 1;
            self.open();
        } else {
            self.close();
        }
    }
}

// ---------------------------------------------------------------------------
// Replaying a case against the real breaker
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Step {
    /// One call that ends with `outcome` after `millis` on the paused clock.
    Call { outcome: Outcome, millis: u64 },
    /// Time passes with no call.
    Wait { millis: u64 },
    /// `force_open` (ForcedOpen), `disable` (Disabled) or `reset` (Closed) on
    /// the handle.
    Set(State),
}

/// The request the inner service gets: how to end, and after how long.
struct Job {
    outcome: Outcome,
    millis: u64,
}

/// Runs `steps` through a fail-fast breaker with `settings` on a paused-clock
/// current-thread runtime of its own, and checks it against the model after
/// every step.
fn replay(settings: &Settings, steps: &[Step]) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = service_fn({
            let calls = calls.clone();
            move |job: Job| {
                calls.fetch_add(1, SeqCst);
                async move {
                    if job.millis > 0 {
                        tokio::time::sleep(Duration::from_millis(job.millis)).await;
                    }
                    match job.outcome {
                        Outcome::Failure => Err(io::Error::other("inner failure")),
                        outcome => Ok(outcome),
                    }
                }
            }
        });
        // The inner service answers with the outcome it was asked for.
        let layer = CircuitBreakerLayer::new(settings.config()).classify(ClassifyFn::new(
            |result: &Result<Outcome, io::Error>| match result {
                Ok(outcome) => *outcome,
                Err(_) => Outcome::Failure,
            },
        ));
        // The breaker (and its time window) is made here, at the model's 0.
        let handle = layer.handle();
        let transitions = handle.subscribe();
        let mut breaker = layer.layer(inner);
        let mut model = Model::new(settings.clone());

        for (i, step) in steps.iter().enumerate() {
            match *step {
                Step::Wait { millis } => {
                    tokio::time::sleep(Duration::from_millis(millis)).await;
                    model.elapse(millis * MS);
                }
                Step::Set(to) => {
                    match to {
                        State::ForcedOpen => handle.force_open(),
                        State::Disabled => handle.disable(),
                        _ => handle.reset(),
                    }
                    model.set(to);
                }
                Step::Call { outcome, millis } => {
                    let before = calls.load(SeqCst);
                    let expect = model.call(outcome, millis);
                    let result = breaker
                        .ready()
                        .await
                        .expect("a fail-fast breaker is always ready")
                        .call(Job { outcome, millis })
                        .await;
                    let called = calls.load(SeqCst) - before;
                    match expect {
                        Expect::Admitted => {
                            prop_assert_eq!(
                                called,
                                1,
                                "step {}: {:?} not admitted: {:?}",
                                i,
                                step,
                                result.as_ref().err()
                            );
                            match (outcome, &result) {
                                (Outcome::Failure, Err(e)) => prop_assert!(
                                    e.is::<io::Error>(),
                                    "step {}: the inner error should come back, got {:?}",
                                    i,
                                    e
                                ),
                                (Outcome::Failure, Ok(r)) => {
                                    prop_assert!(false, "step {}: failure answered {:?}", i, r)
                                }
                                (_, Ok(answer)) => prop_assert_eq!(*answer, outcome),
                                (_, Err(e)) => {
                                    prop_assert!(false, "step {}: {:?} answered {:?}", i, step, e)
                                }
                            }
                        }
                        Expect::Rejected(retry_after) => {
                            prop_assert_eq!(
                                called,
                                0,
                                "step {}: {:?} reached the inner service while {:?}",
                                i,
                                step,
                                model.state
                            );
                            let err = match result {
                                Err(e) => e,
                                Ok(r) => {
                                    return Err(TestCaseError::fail(format!(
                                        "step {i}: {step:?} should be rejected, got {r:?}"
                                    )))
                                }
                            };
                            let open = err.downcast_ref::<CircuitOpen>();
                            prop_assert!(open.is_some(), "step {}: not CircuitOpen: {:?}", i, err);
                            prop_assert_eq!(
                                open.and_then(CircuitOpen::retry_after),
                                retry_after,
                                "step {}: retry_after",
                                i
                            );
                        }
                    }
                }
            }
            settle().await;
            prop_assert_eq!(
                *transitions.borrow(),
                model.state,
                "step {}: the watch channel",
                i
            );
            prop_assert_eq!(
                handle.state(),
                model.state,
                "after step {} ({:?}) at {}ms; model: {:?}",
                i,
                step,
                model.now / MS,
                model
            );
            if model.state == State::Closed {
                let totals = model.totals();
                prop_assert_eq!(
                    handle.calls_in_window(),
                    totals.calls,
                    "step {}: calls in window",
                    i
                );
                let rate = if totals.calls == 0 {
                    0.0
                } else {
                    f64::from(totals.failures) / f64::from(totals.calls)
                };
                prop_assert_eq!(handle.failure_rate(), rate, "step {}: failure rate", i);
            }
        }
        Ok(())
    })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        2 => Just(Outcome::Success),
        2 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignored),
    ]
}

/// Steps for `settings`. Call durations and waits often fall exactly on the
/// boundaries that matter (the slow-call duration, a bucket, the window, the
/// open duration) or one millisecond either side.
fn steps(settings: &Settings) -> impl Strategy<Value = Vec<Step>> {
    let slow = settings.slow.map_or(100, |(millis, _)| millis);
    let call_millis = prop_oneof![
        2 => Just(0u64),
        2 => (Just(slow), -1i64..=1).prop_map(|(m, d)| m.saturating_add_signed(d)),
        3 => 0u64..=400,
    ];
    let mut marks = vec![settings.open_secs * 1_000];
    if let Window::Time { duration, buckets } = settings.window {
        let millis = duration.as_millis() as u64;
        marks.extend([millis, millis / u64::from(buckets)]);
    }
    let wait_millis = prop_oneof![
        2 => (prop::sample::select(marks), -1i64..=1).prop_map(|(m, d)| m.saturating_add_signed(d)),
        3 => 0u64..=4_000,
    ];
    let set = prop_oneof![
        Just(State::ForcedOpen),
        Just(State::Disabled),
        Just(State::Closed),
    ];
    let step = prop_oneof![
        30 => (outcome(), call_millis).prop_map(|(outcome, millis)| Step::Call { outcome, millis }),
        10 => wait_millis.prop_map(|millis| Step::Wait { millis }),
        1 => set.prop_map(Step::Set),
    ];
    prop::collection::vec(step, 1..=80)
}

/// Settings, and steps to replay against them.
fn case(window: impl Strategy<Value = Window>) -> impl Strategy<Value = (Settings, Vec<Step>)> {
    settings(window).prop_flat_map(|settings| {
        let steps = steps(&settings);
        (Just(settings), steps)
    })
}

/// Everything but the window; `minimum` is folded into the window's range.
fn settings(window: impl Strategy<Value = Window>) -> impl Strategy<Value = Settings> {
    (
        window,
        1u32..=8,
        prop_oneof![Just(50u32), Just(100), 1u32..=100],
        prop::option::of((1u64..=300, 1u32..=100)),
        prop::option::of(1u32..=5),
        1u64..=3,
        prop::option::of((1u32..=3, 0u64..=8)),
        1u32..=4,
    )
        .prop_map(
            |(window, minimum, failure_pct, slow, consecutive, open_secs, backoff, half_open)| {
                let minimum_calls = match window {
                    Window::Count(n) => 1 + (minimum - 1) % n,
                    Window::Time { .. } => minimum.min(6),
                };
                Settings {
                    window,
                    minimum_calls,
                    failure_pct,
                    slow,
                    consecutive_failures: consecutive,
                    open_secs,
                    backoff: backoff.map(|(multiplier, extra)| (multiplier, open_secs + extra)),
                    half_open_calls: half_open,
                }
            },
        )
}

proptest! {
    // Failing seeds go to `tests/breaker/main.proptest-regressions`.
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    /// Count windows: the breaker (and its watch channel) is in the model's
    /// state after every step, rejects exactly while the model is Open or
    /// ForcedOpen (with the model's `retry_after`) without calling the inner
    /// service, and while Closed its window holds the model's calls.
    #[test]
    fn count_window_breaker_follows_the_reference_model(
        (settings, steps) in case((1u32..=8).prop_map(Window::Count)),
    ) {
        replay(&settings, &steps)?;
    }

    /// The same for time windows, whose buckets slide with the paused clock
    /// (call durations and waits both move it).
    #[test]
    fn time_window_breaker_follows_the_reference_model(
        (settings, steps) in case(
            (100u64..=3_000, 1u32..=6).prop_map(|(millis, buckets)| Window::Time {
                duration: Duration::from_millis(millis),
                buckets,
            })
        ),
    ) {
        replay(&settings, &steps)?;
    }
}

/// A hand-picked case through the same replay, so a regression in the driver
/// itself shows without proptest: trip on rate, reject while Open, a failed
/// half-open round backs off, a good one closes.
#[test]
fn replay_walks_through_every_transition() {
    let settings = Settings {
        window: Window::Count(4),
        minimum_calls: 4,
        failure_pct: 50,
        slow: None,
        consecutive_failures: None,
        open_secs: 1,
        backoff: Some((2, 3)),
        half_open_calls: 2,
    };
    let call = |outcome| Step::Call {
        outcome,
        millis: 10,
    };
    let steps = [
        call(Outcome::Success),
        call(Outcome::Failure),
        call(Outcome::Ignored),
        call(Outcome::Success),
        call(Outcome::Failure), // 2 of 4 failed: Open for 1 s
        call(Outcome::Success), // rejected
        Step::Wait { millis: 1_000 },
        call(Outcome::Failure),
        call(Outcome::Success), // 1 of 2 probes failed: Open for 2 s
        Step::Wait { millis: 1_999 },
        call(Outcome::Success), // rejected, 1 ms before the probes
        Step::Wait { millis: 1 },
        call(Outcome::Ignored), // gives its place back
        call(Outcome::Success),
        call(Outcome::Success), // Closed
        Step::Set(State::ForcedOpen),
        call(Outcome::Success), // rejected with no retry_after
        Step::Wait { millis: 5_000 },
        Step::Set(State::Disabled),
        call(Outcome::Failure), // admitted, not judged
        call(Outcome::Failure),
        call(Outcome::Failure),
        call(Outcome::Failure),
        Step::Set(State::Closed),
        call(Outcome::Failure), // a fresh window: 1 of 1 call
    ];
    let mut model = Model::new(settings.clone());
    let states: Vec<_> = steps
        .iter()
        .map(|step| {
            match *step {
                Step::Call { outcome, millis } => {
                    model.call(outcome, millis);
                }
                Step::Wait { millis } => model.elapse(millis * MS),
                Step::Set(to) => model.set(to),
            }
            model.state
        })
        .collect();
    use State::{Closed, Disabled, ForcedOpen, HalfOpen, Open};
    assert_eq!(
        states,
        [
            Closed, Closed, Closed, Closed, Open, Open, HalfOpen, HalfOpen, Open, Open, Open,
            HalfOpen, HalfOpen, HalfOpen, Closed, ForcedOpen, ForcedOpen, ForcedOpen, Disabled,
            Disabled, Disabled, Disabled, Disabled, Closed, Closed
        ]
    );
    replay(&settings, &steps).unwrap();
}

// ---------------------------------------------------------------------------
// Inside tower's power-of-two-choices balancer
// ---------------------------------------------------------------------------

/// What an endpoint's backend saw, and a switch to make it fail.
#[derive(Default)]
struct Backend {
    calls: AtomicUsize,
    failing: AtomicBool,
}

impl Backend {
    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
}

const OPEN: Duration = Duration::from_secs(10);
const HALF_OPEN_CALLS: usize = 2;

/// A not-ready breaker over a backend that answers at once (its error is an
/// `io::Error` while it fails), with a constant load for P2C.
fn endpoint(
    backend: Arc<Backend>,
) -> (
    BreakerHandle,
    impl Service<u32, Response = u32, Error = BoxError> + Load<Metric = u32>,
) {
    let config = BreakerConfig::builder()
        .window(Window::Count(10))
        .minimum_calls(5)
        .failure_rate(0.5)
        .open_duration(OPEN)
        .half_open_calls(HALF_OPEN_CALLS as u32)
        .build()
        .unwrap();
    let layer = CircuitBreakerLayer::new(config).not_ready();
    let handle = layer.handle();
    let service = layer.layer(service_fn(move |request: u32| {
        backend.calls.fetch_add(1, SeqCst);
        let failing = backend.failing.load(SeqCst);
        async move {
            if failing {
                Err(io::Error::other("backend down"))
            } else {
                Ok(request)
            }
        }
    }));
    (handle, Constant::new(service, 0))
}

#[tokio::test(start_paused = true)]
async fn balancer_routes_around_an_open_endpoint_and_takes_it_back() {
    let backends: Vec<Arc<Backend>> = (0..3).map(|_| Arc::default()).collect();
    let (handles, services): (Vec<_>, Vec<_>) =
        backends.iter().map(|b| endpoint(b.clone())).unzip();
    let mut balance: Balance<_, u32> = Balance::new(ServiceList::new(services));
    let sick = &backends[0];
    let breaker = &handles[0];

    // Everything the endpoints do is synchronous, so the balancer is ready and
    // each response complete at once, and no time passes while requests flow.
    let mut next = 0u32;
    let mut send = |balance: &mut Balance<_, u32>| -> Result<u32, BoxError> {
        next += 1;
        let ready = balance
            .ready()
            .now_or_never()
            .expect("the balancer is ready at once while an endpoint is healthy");
        let result = match ready {
            Ok(balance) => balance
                .call(next)
                .now_or_never()
                .expect("the response is ready at once"),
            Err(e) => panic!("balancer error: {e}"),
        };
        assert_eq!(balance.len(), 3, "the balancer dropped an endpoint");
        if let Ok(answer) = &result {
            assert_eq!(*answer, next);
        }
        result
    };
    let total = |backends: &[Arc<Backend>]| backends.iter().map(|b| b.calls()).sum::<usize>();

    // All healthy: every request succeeds and each endpoint gets some.
    for _ in 0..60 {
        send(&mut balance).expect("healthy endpoints answer");
    }
    assert_eq!(total(&backends), 60);
    assert!(backends.iter().all(|b| b.calls() > 0));
    assert!(handles.iter().all(|h| h.state() == State::Closed));

    // One endpoint fails. Only requests it gets fail, with its own error,
    // until its breaker opens.
    sick.failing.store(true, SeqCst);
    let sick_before = sick.calls();
    let mut failed = 0;
    for _ in 0..300 {
        if breaker.state() == State::Open {
            break;
        }
        if let Err(e) = send(&mut balance) {
            assert!(e.is::<io::Error>(), "only the backend's error: {e}");
            failed += 1;
        }
    }
    assert_eq!(
        breaker.state(),
        State::Open,
        "the failing endpoint's breaker opens"
    );
    assert_eq!(failed, sick.calls() - sick_before);
    assert!(
        (5..=10).contains(&failed),
        "{failed} failures to trip a window of 10"
    );
    assert_eq!(handles[1].state(), State::Closed);
    assert_eq!(handles[2].state(), State::Closed);

    // Open: P2C sends it nothing, and every request succeeds elsewhere.
    let (sick_at_trip, total_at_trip) = (sick.calls(), total(&backends));
    for _ in 0..150 {
        send(&mut balance).expect("the healthy endpoints answer");
    }
    assert_eq!(
        sick.calls(),
        sick_at_trip,
        "no call reaches an open endpoint"
    );
    assert_eq!(total(&backends), total_at_trip + 150);
    assert_eq!(breaker.state(), State::Open);

    // After the open duration it is HalfOpen with no request sent. It is still
    // down: exactly its probes reach it, they fail, and it opens again.
    tokio::time::sleep(OPEN + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(
        breaker.state(),
        State::HalfOpen,
        "moves to HalfOpen by itself"
    );
    let mut failed = 0;
    for _ in 0..300 {
        if breaker.state() == State::Open {
            break;
        }
        if send(&mut balance).is_err() {
            failed += 1;
        }
    }
    assert_eq!(breaker.state(), State::Open, "failed probes reopen it");
    assert_eq!(sick.calls(), sick_at_trip + HALF_OPEN_CALLS);
    assert_eq!(failed, HALF_OPEN_CALLS);
    let sick_at_reopen = sick.calls();
    for _ in 0..100 {
        send(&mut balance).expect("the healthy endpoints answer");
    }
    assert_eq!(
        sick.calls(),
        sick_at_reopen,
        "no call reaches it while Open again"
    );

    // It recovers: after the next open duration its probes succeed, it closes,
    // and P2C sends it traffic again. Every request succeeds.
    sick.failing.store(false, SeqCst);
    tokio::time::sleep(OPEN + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(breaker.state(), State::HalfOpen);
    for _ in 0..300 {
        if breaker.state() == State::Closed {
            break;
        }
        send(&mut balance).expect("every request succeeds");
    }
    assert_eq!(breaker.state(), State::Closed, "good probes close it");
    assert_eq!(sick.calls(), sick_at_reopen + HALF_OPEN_CALLS);
    let sick_at_close = sick.calls();
    for _ in 0..150 {
        send(&mut balance).expect("every request succeeds");
    }
    assert!(
        sick.calls() > sick_at_close,
        "its calls resume once it rejoins"
    );
    assert!(handles.iter().all(|h| h.state() == State::Closed));
    assert_eq!(balance.len(), 3);
}

// ---------------------------------------------------------------------------
// A real axum server behind a fail-fast breaker, in real time
// ---------------------------------------------------------------------------

fn assert_circuit_open(reply: &Reply, open: Duration) {
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.rejected(), Some("circuit_open"), "{reply:?}");
    let retry_after: u64 = reply
        .header(header::RETRY_AFTER)
        .expect("Retry-After")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(
        (1..=open.as_secs()).contains(&retry_after),
        "Retry-After {retry_after} for an open duration of {open:?}"
    );
    assert!(reply.body.is_empty(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_answers_503_while_open_and_its_handler_rests() {
    const OPEN: Duration = Duration::from_secs(2);
    let backend = Arc::new(Backend::default());
    let config = BreakerConfig::builder()
        .window(Window::Count(10))
        .minimum_calls(4)
        .failure_rate(0.5)
        .open_duration(OPEN)
        .half_open_calls(1)
        .name("api")
        .build()
        .unwrap();
    let layer = CircuitBreakerLayer::new(config).classify(HttpStatus::server_errors());
    let breaker = layer.handle();
    let app = Router::new()
        .route(
            "/",
            get({
                let backend = backend.clone();
                move || async move {
                    backend.calls.fetch_add(1, SeqCst);
                    if backend.failing.load(SeqCst) {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(layer),
        );
    let server = Server::start(app).await;
    let get = || support::get(server.addr(), "/");

    for _ in 0..4 {
        assert_eq!(get().await.status, StatusCode::OK);
    }
    assert_eq!(backend.calls(), 4);

    // The handler fails: with 4 successes in a window of 10, the 4th 500
    // makes the failure rate 0.5 and opens the breaker.
    backend.failing.store(true, SeqCst);
    let mut errors = 0;
    while breaker.state() == State::Closed && errors < 20 {
        assert_eq!(get().await.status, StatusCode::INTERNAL_SERVER_ERROR);
        errors += 1;
    }
    assert_eq!(errors, 4, "500s before the breaker opened");
    assert_eq!(backend.calls(), 8);

    // Open: 503 with Retry-After, and the handler sees nothing. Requests go one
    // by one, then in a concurrent burst. Open lasts 2 s of real time; should
    // it end meanwhile (a transition shows on the subscription), the later
    // replies are not judged.
    let transitions = breaker.subscribe();
    assert_eq!(breaker.state(), State::Open);
    let mut judged = 0;
    for _ in 0..10 {
        let reply = get().await;
        if transitions.has_changed().unwrap() {
            break;
        }
        assert_circuit_open(&reply, OPEN);
        assert_eq!(backend.calls(), 8, "the handler is not called while Open");
        judged += 1;
    }
    assert!(
        judged > 0,
        "the first request after the trip comes while Open"
    );
    if judged == 10 {
        let burst: Vec<_> = (0..16)
            .map(|_| tokio::spawn(support::get(server.addr(), "/")))
            .collect();
        let mut replies = Vec::new();
        for request in burst {
            replies.push(bounded("a burst reply", request).await.unwrap());
        }
        if !transitions.has_changed().unwrap() {
            for reply in &replies {
                assert_circuit_open(reply, OPEN);
            }
            assert_eq!(backend.calls(), 8, "the handler is not called while Open");
        }
    }

    // HalfOpen after the open duration, with no request needed. The one probe
    // still fails: Open again, and the handler rests again.
    wait_until("the breaker lets a probe through", || {
        breaker.state() == State::HalfOpen
    })
    .await;
    let calls = backend.calls();
    assert_eq!(get().await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(backend.calls(), calls + 1);
    assert_eq!(breaker.state(), State::Open);
    let transitions = breaker.subscribe();
    let reply = get().await;
    if !transitions.has_changed().unwrap() {
        assert_circuit_open(&reply, OPEN);
        assert_eq!(backend.calls(), calls + 1);
    }

    // The handler recovers: the next probe succeeds and closes the breaker.
    backend.failing.store(false, SeqCst);
    wait_until("the breaker lets a probe through again", || {
        breaker.state() == State::HalfOpen
    })
    .await;
    assert_eq!(get().await.status, StatusCode::OK);
    assert_eq!(breaker.state(), State::Closed);
    let calls = backend.calls();
    for _ in 0..5 {
        assert_eq!(get().await.status, StatusCode::OK);
    }
    assert_eq!(backend.calls(), calls + 5);
}
