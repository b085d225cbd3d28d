use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

use super::*;
use crate::error::BoxError;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// What the inner service does with a request: wait `ms`, then fail or not.
#[derive(Clone, Copy, Debug)]
struct Step {
    fail: bool,
    ms: u64,
}

const OK: Step = Step { fail: false, ms: 0 };
const FAIL: Step = Step { fail: true, ms: 0 };

/// Counts its calls; does what each [`Step`] says.
#[derive(Clone)]
struct Inner {
    calls: Arc<AtomicUsize>,
}

impl Service<Step> for Inner {
    type Response = ();
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, step: Step) -> Self::Future {
        self.calls.fetch_add(1, SeqCst);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(step.ms)).await;
            if step.fail {
                Err("failed".into())
            } else {
                Ok(())
            }
        })
    }
}

fn inner(calls: Arc<AtomicUsize>) -> Inner {
    Inner { calls }
}

struct Harness {
    svc: CircuitBreaker<Inner>,
    handle: BreakerHandle,
    calls: Arc<AtomicUsize>,
}

impl Harness {
    fn new(config: BreakerConfig) -> Self {
        Self::with_layer(CircuitBreakerLayer::new(config))
    }

    fn with_layer(layer: CircuitBreakerLayer) -> Self {
        let calls = Arc::new(AtomicUsize::new(0));
        Harness {
            handle: layer.handle(),
            svc: layer.layer(inner(calls.clone())),
            calls,
        }
    }

    async fn send(&self, step: Step) -> Result<(), BoxError> {
        self.svc.clone().oneshot(step).await
    }

    async fn send_all(&self, step: Step, n: usize) {
        for _ in 0..n {
            let _ = self.send(step).await;
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }
}

fn config() -> BreakerConfigBuilder {
    BreakerConfig::builder()
        .window(Window::Count(10))
        .minimum_calls(4)
        .failure_rate(0.5)
        .open_duration(10 * SEC)
        .half_open_calls(2)
}

async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn opens_exactly_when_the_failure_rate_over_minimum_calls_reaches_the_threshold() {
    let h = Harness::new(config().build().unwrap());
    // Two failures, one success: 3 calls, below minimum_calls, whatever the rate.
    h.send(FAIL).await.unwrap_err();
    h.send(FAIL).await.unwrap_err();
    h.send(OK).await.unwrap();
    assert_eq!(h.handle.state(), State::Closed);
    // The 4th call: 3 of 4 failed, 0.75 >= 0.5.
    h.send(OK).await.unwrap();
    assert_eq!(h.handle.state(), State::Open);

    let h = Harness::new(config().build().unwrap());
    for step in [OK, OK, FAIL] {
        h.send(step).await.unwrap_or(());
    }
    assert_eq!(h.handle.state(), State::Closed);
    // 2 of 4 = 0.5: reaches the threshold.
    h.send(FAIL).await.unwrap_err();
    assert_eq!(h.handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_fails_fast_without_calling_inner() {
    let h = Harness::new(config().build().unwrap());
    h.send_all(FAIL, 4).await;
    assert_eq!(h.handle.state(), State::Open);
    let before = h.calls();
    tokio::time::advance(3 * SEC).await;
    let err = h.send(OK).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
    assert_eq!(open.retry_after(), Some(7 * SEC));
    assert_eq!(h.calls(), before);
}

#[tokio::test(start_paused = true)]
async fn slow_successes_open_the_breaker_under_the_slow_call_rule() {
    let h = Harness::new(config().slow_calls(100 * MS, 0.75).build().unwrap());
    let slow = Step {
        fail: false,
        ms: 100,
    };
    let quick = Step {
        fail: false,
        ms: 99,
    };
    h.send(slow).await.unwrap();
    h.send(slow).await.unwrap();
    h.send(quick).await.unwrap();
    h.send(slow).await.unwrap();
    // 3 of 4 slow = 0.75.
    assert_eq!(h.handle.state(), State::Open);
    assert_eq!(h.handle.failure_rate(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_open_before_the_window_judges() {
    let h = Harness::new(
        config()
            .minimum_calls(10)
            .consecutive_failures(3)
            .build()
            .unwrap(),
    );
    h.send_all(OK, 5).await;
    h.send(FAIL).await.unwrap_err();
    h.send(FAIL).await.unwrap_err();
    assert_eq!(h.handle.state(), State::Closed);
    h.send(FAIL).await.unwrap_err();
    assert_eq!(h.handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn open_moves_to_half_open_after_the_duration_with_no_request() {
    let h = Harness::new(config().build().unwrap());
    let mut states = h.handle.subscribe();
    h.send_all(FAIL, 4).await;
    assert_eq!(*states.borrow_and_update(), State::Open);
    tokio::time::sleep(10 * SEC - MS).await;
    assert_eq!(h.handle.state(), State::Open);
    tokio::time::sleep(MS).await;
    settle().await;
    assert_eq!(h.handle.state(), State::HalfOpen);
    assert!(states.has_changed().unwrap());
    assert_eq!(*states.borrow_and_update(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_its_probes_at_once_then_closes_when_they_succeed() {
    let h = Harness::new(config().half_open_calls(3).build().unwrap());
    h.send_all(FAIL, 4).await;
    tokio::time::sleep(10 * SEC).await;
    settle().await;
    assert_eq!(h.handle.state(), State::HalfOpen);
    let before = h.calls();

    let slow = Step {
        fail: false,
        ms: 50,
    };
    let probes: Vec<_> = (0..3)
        .map(|_| tokio::spawn(h.svc.clone().oneshot(slow)))
        .collect();
    settle().await;
    // A fourth concurrent caller is refused: every probe is taken.
    let err = h.send(OK).await.unwrap_err();
    assert!(err
        .downcast_ref::<CircuitOpen>()
        .unwrap()
        .retry_after()
        .is_none());
    assert_eq!(h.calls(), before + 3);
    for probe in probes {
        probe.await.unwrap().unwrap();
    }
    assert_eq!(h.handle.state(), State::Closed);
    assert_eq!(h.handle.calls_in_window(), 0, "the window starts afresh");
}

#[tokio::test(start_paused = true)]
async fn failed_probes_reopen_with_a_backed_off_duration() {
    let backoff = Backoff {
        multiplier: 2.0,
        max: 30 * SEC,
        jitter: 0.0,
    };
    let h = Harness::new(config().backoff(backoff).build().unwrap());
    h.send_all(FAIL, 4).await;
    // Open 10 s, then the probes fail: open 20 s, then 30 s (capped), ...
    for open_for in [10, 20, 30, 30] {
        assert_eq!(h.handle.state(), State::Open);
        tokio::time::sleep(Duration::from_secs(open_for) - MS).await;
        settle().await;
        assert_eq!(
            h.handle.state(),
            State::Open,
            "still open after {open_for} s - 1 ms"
        );
        tokio::time::sleep(MS).await;
        settle().await;
        assert_eq!(h.handle.state(), State::HalfOpen);
        h.send_all(FAIL, 2).await;
    }
    // Probes that succeed close it, and the next trip starts from 10 s again.
    tokio::time::sleep(30 * SEC).await;
    settle().await;
    h.send_all(OK, 2).await;
    assert_eq!(h.handle.state(), State::Closed);
    h.send_all(FAIL, 4).await;
    tokio::time::sleep(10 * SEC).await;
    settle().await;
    assert_eq!(h.handle.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn one_failed_probe_of_two_reaches_the_threshold_and_reopens() {
    let h = Harness::new(config().build().unwrap());
    h.send_all(FAIL, 4).await;
    tokio::time::sleep(10 * SEC).await;
    settle().await;
    h.send(OK).await.unwrap();
    assert_eq!(h.handle.state(), State::HalfOpen);
    h.send(FAIL).await.unwrap_err();
    assert_eq!(h.handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_place_back() {
    let h = Harness::new(config().half_open_calls(1).build().unwrap());
    h.send_all(FAIL, 4).await;
    tokio::time::sleep(10 * SEC).await;
    settle().await;
    let probe = tokio::spawn(h.svc.clone().oneshot(Step {
        fail: false,
        ms: 1_000,
    }));
    settle().await;
    assert!(h.send(OK).await.is_err(), "the only probe is taken");
    probe.abort();
    settle().await;
    h.send(OK).await.unwrap();
    assert_eq!(h.handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn forced_states_ignore_outcomes() {
    let h = Harness::new(config().build().unwrap());
    h.handle.force_open();
    assert!(h.send(OK).await.unwrap_err().is::<CircuitOpen>());
    tokio::time::sleep(60 * SEC).await;
    settle().await;
    assert_eq!(h.handle.state(), State::ForcedOpen);
    assert_eq!(h.calls(), 0);

    h.handle.disable();
    h.send_all(FAIL, 20).await;
    assert_eq!(h.handle.state(), State::Disabled);
    assert_eq!(h.calls(), 20);
    assert_eq!(h.handle.calls_in_window(), 0);

    h.handle.reset();
    assert_eq!(h.handle.state(), State::Closed);
    h.send_all(FAIL, 4).await;
    assert_eq!(h.handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_started_before_a_transition_is_not_counted_after_it() {
    let h = Harness::new(config().minimum_calls(1).failure_rate(1.0).build().unwrap());
    let slow_failure = tokio::spawn(h.svc.clone().oneshot(Step {
        fail: true,
        ms: 100,
    }));
    settle().await;
    h.handle.reset();
    slow_failure.await.unwrap().unwrap_err();
    assert_eq!(h.handle.state(), State::Closed);
    assert_eq!(h.handle.calls_in_window(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_time_window_forgets_old_outcomes() {
    let window = Window::Time {
        duration: 10 * SEC,
        buckets: 10,
    };
    let h = Harness::new(config().window(window).build().unwrap());
    h.send_all(FAIL, 3).await;
    assert_eq!(h.handle.calls_in_window(), 3);
    tokio::time::sleep(10 * SEC).await;
    assert_eq!(h.handle.calls_in_window(), 0);
    // The three old failures are gone: one new failure and three successes
    // make 0.25, not enough.
    h.send(FAIL).await.unwrap_err();
    h.send_all(OK, 3).await;
    assert_eq!(h.handle.state(), State::Closed);
    assert_eq!(h.handle.calls_in_window(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_ejection_budget_can_deny_a_trip() {
    let budget = MaxOpen::new(1);
    let a = Harness::with_layer(
        CircuitBreakerLayer::new(config().build().unwrap()).budget(budget.clone()),
    );
    let b = Harness::with_layer(
        CircuitBreakerLayer::new(config().build().unwrap()).budget(budget.clone()),
    );
    a.send_all(FAIL, 4).await;
    assert_eq!(a.handle.state(), State::Open);
    b.send_all(FAIL, 4).await;
    assert_eq!(
        b.handle.state(),
        State::Closed,
        "denied: one is open already"
    );
    assert_eq!(b.handle.denials(), 1);
    assert_eq!(budget.open(), 1);
    // a recovers and gives its share back; b may open now.
    tokio::time::sleep(10 * SEC).await;
    settle().await;
    a.send_all(OK, 2).await;
    assert_eq!(a.handle.state(), State::Closed);
    assert_eq!(budget.open(), 0);
    b.send(FAIL).await.unwrap_err();
    assert_eq!(b.handle.state(), State::Open);
}

/// A breaker dropped while open (its endpoint left the balancer) gives its
/// place in the ejection budget back.
#[tokio::test(start_paused = true)]
async fn a_breaker_dropped_while_open_gives_its_budget_place_back() {
    let budget = MaxOpen::new(1);
    let a = Harness::with_layer(
        CircuitBreakerLayer::new(config().build().unwrap()).budget(budget.clone()),
    );
    a.send_all(FAIL, 4).await;
    assert_eq!(a.handle.state(), State::Open);
    assert_eq!(budget.open(), 1);
    drop(a);
    assert_eq!(budget.open(), 0);
    let b = Harness::with_layer(
        CircuitBreakerLayer::new(config().build().unwrap()).budget(budget.clone()),
    );
    b.send_all(FAIL, 4).await;
    assert_eq!(b.handle.state(), State::Open, "the freed place lets b open");
}

#[tokio::test(start_paused = true)]
async fn not_ready_mode_is_pending_while_open_never_errors_and_wakes_at_half_open() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CircuitBreakerLayer::new(config().half_open_calls(1).build().unwrap()).not_ready();
    let handle = layer.handle();
    let svc = layer.layer(inner(calls.clone()));
    for _ in 0..4 {
        let _ = svc.clone().oneshot(FAIL).await;
    }
    assert_eq!(handle.state(), State::Open);

    let mut waiting = mock::Spawn::new(svc.clone());
    assert_pending!(waiting.poll_ready());
    let mut second = mock::Spawn::new(svc.clone());
    assert_pending!(second.poll_ready());
    tokio::time::sleep(10 * SEC).await;
    settle().await;
    assert!(waiting.is_woken());
    // One probe: the first takes it, the second stays pending.
    assert_ready_ok!(waiting.poll_ready());
    assert_pending!(second.poll_ready());
    // The first leaves without calling: its probe goes to the second.
    drop(waiting);
    assert!(second.is_woken());
    assert_ready_ok!(second.poll_ready());
    second.call(OK).await.unwrap();
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn not_ready_mode_takes_back_an_admission_made_before_a_trip() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CircuitBreakerLayer::new(config().build().unwrap()).not_ready();
    let handle = layer.handle();
    let mut ready = mock::Spawn::new(layer.layer(inner(calls.clone())));
    assert_ready_ok!(ready.poll_ready());
    handle.force_open();
    // Ready before, but the breaker admits nothing now: poll_ready says so
    // again just before dispatch (as tower's ReadyCache does).
    assert_pending!(ready.poll_ready());
    handle.reset();
    assert!(ready.is_woken());
    assert_ready_ok!(ready.poll_ready());
    ready.call(OK).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1);
}

/// The breaker's own timer runs on the runtime that saw the trip; a service
/// parked on another runtime wakes by its own timer when the open duration
/// ends, even if the first runtime is gone.
#[test]
fn not_ready_service_wakes_after_the_open_duration_on_its_own_runtime() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = CircuitBreakerLayer::new(
        config()
            .open_duration(Duration::from_millis(200))
            .build()
            .unwrap(),
    )
    .not_ready();
    let handle = layer.handle();
    let svc = layer.layer(inner(calls));
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    first.block_on(async {
        for _ in 0..4 {
            let _ = svc.clone().oneshot(FAIL).await;
        }
    });
    assert_eq!(handle.state(), State::Open);
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let waited = second.block_on(async {
        let start = tokio::time::Instant::now();
        let mut svc = svc.clone();
        tokio::time::timeout(Duration::from_secs(30), svc.ready())
            .await
            .expect("woken")
            .unwrap();
        start.elapsed()
    });
    assert!(
        waited < Duration::from_secs(20),
        "woken only after {waited:?}"
    );
    assert_eq!(handle.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn open_durations_too_long_for_the_clock_do_not_panic() {
    let backoff = Backoff {
        multiplier: 10.0,
        max: Duration::MAX,
        jitter: 1.0,
    };
    let h = Harness::new(
        config()
            .open_duration(Duration::MAX)
            .backoff(backoff)
            .build()
            .unwrap(),
    );
    h.send_all(FAIL, 4).await;
    assert_eq!(h.handle.state(), State::Open);
    assert!(h.send(OK).await.unwrap_err().is::<CircuitOpen>());
}

#[test]
fn bad_configuration_is_refused_naming_the_field() {
    let field = |b: BreakerConfigBuilder| b.build().unwrap_err().field();
    assert_eq!(
        field(BreakerConfig::builder().failure_rate(1.5)),
        "failure_rate"
    );
    assert_eq!(
        field(BreakerConfig::builder().failure_rate(0.0)),
        "failure_rate"
    );
    assert_eq!(
        field(BreakerConfig::builder().slow_calls(SEC, -0.1)),
        "slow_call_rate"
    );
    assert_eq!(
        field(BreakerConfig::builder().slow_calls(Duration::ZERO, 0.5)),
        "slow_call_duration"
    );
    assert_eq!(
        field(BreakerConfig::builder().window(Window::Count(0))),
        "window"
    );
    assert_eq!(
        field(
            BreakerConfig::builder()
                .window(Window::Count(10))
                .minimum_calls(11)
        ),
        "minimum_calls"
    );
    assert_eq!(
        field(BreakerConfig::builder().window(Window::time(Duration::ZERO))),
        "window"
    );
    assert_eq!(
        field(BreakerConfig::builder().open_duration(Duration::ZERO)),
        "open_duration"
    );
    assert_eq!(
        field(BreakerConfig::builder().half_open_calls(0)),
        "half_open_calls"
    );
    assert_eq!(
        field(BreakerConfig::builder().consecutive_failures(0)),
        "consecutive_failures"
    );
    let backoff = Backoff {
        multiplier: 0.5,
        max: 60 * SEC,
        jitter: 0.0,
    };
    assert_eq!(
        field(BreakerConfig::builder().backoff(backoff)),
        "backoff.multiplier"
    );
    assert_eq!(
        field(BreakerConfig::builder().window(Window::Count(2_000_000))),
        "window"
    );
    assert!(BreakerConfig::builder().build().is_ok());
}

#[test]
fn services_and_futures_fit_axum() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    fn assert_send<T: Send + 'static>() {}
    assert_fits::<CircuitBreakerLayer>();
    assert_fits::<CircuitBreaker<Inner>>();
    assert_send::<
        future::ResponseFuture<
            futures::future::BoxFuture<'static, Result<(), BoxError>>,
            ErrorsAreFailures,
        >,
    >();
}

#[cfg(feature = "http")]
mod http {
    use std::convert::Infallible;

    use ::http::{HeaderMap, Request, Response, StatusCode};
    use bytes::Bytes;
    use http_body_util::BodyExt;

    use tower::service_fn;

    use super::*;

    type Body = http_body_util::Full<Bytes>;

    fn layer() -> CircuitBreakerLayer {
        CircuitBreakerLayer::new(config().minimum_calls(2).failure_rate(1.0).build().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn http_5xx_are_failures_and_4xx_successes() {
        let layer = layer().classify(HttpStatus::server_errors());
        let handle = layer.handle();
        let svc = layer.layer(service_fn(|status: u16| async move {
            let mut response = Response::new(Body::default());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, Infallible>(response)
        }));
        svc.clone().oneshot(404).await.unwrap();
        svc.clone().oneshot(404).await.unwrap();
        assert_eq!(handle.state(), State::Closed);
        svc.clone().oneshot(500).await.unwrap();
        svc.clone().oneshot(503).await.unwrap();
        assert_eq!(handle.state(), State::Closed, "2 failures of 4");
        handle.reset();
        svc.clone().oneshot(500).await.unwrap();
        svc.clone().oneshot(502).await.unwrap();
        assert_eq!(handle.state(), State::Open);
    }

    type GrpcTestBody = http_body_util::StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>,
    >;

    fn grpc_response(trailers_only: Option<u32>, trailer: Option<u32>) -> Response<GrpcTestBody> {
        let mut frames = vec![Ok(http_body::Frame::data(Bytes::from_static(b"msg")))];
        if let Some(code) = trailer {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", code.into());
            frames.push(Ok(http_body::Frame::trailers(trailers)));
        }
        let mut response = Response::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        if let Some(code) = trailers_only {
            response.headers_mut().insert("grpc-status", code.into());
        }
        response
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_status_is_read_from_trailers_at_the_end_of_the_body() {
        let layer = layer().classify(GrpcStatus::new());
        let handle = layer.handle();
        let svc = layer.layer(service_fn(
            |(only, trailer): (Option<u32>, Option<u32>)| async move {
                Ok::<_, Infallible>(grpc_response(only, trailer))
            },
        ));
        // UNAVAILABLE in trailers: nothing is recorded until the body ends.
        let response = svc.clone().oneshot((None, Some(14))).await.unwrap();
        assert_eq!(handle.calls_in_window(), 0);
        response.into_body().collect().await.unwrap();
        assert_eq!(handle.calls_in_window(), 1);
        assert_eq!(handle.failure_rate(), 1.0);
        // NOT_FOUND (5) is not a failure; read from a Trailers-Only response.
        let response = svc.clone().oneshot((Some(5), None)).await.unwrap();
        assert_eq!(handle.calls_in_window(), 2);
        drop(response);
        assert_eq!(handle.failure_rate(), 0.5);
        // A body dropped before its end records nothing.
        drop(svc.clone().oneshot((None, Some(14))).await.unwrap());
        assert_eq!(handle.calls_in_window(), 2);
        // A body that ends without a status is UNKNOWN: a failure.
        let response = svc.clone().oneshot((None, None)).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(handle.calls_in_window(), 3);
        assert_eq!(handle.state(), State::Closed, "2 of 3 < 1.0");
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_open_becomes_503_with_retry_after_from_the_breaker() {
        let layer = layer();
        let handle = layer.handle();
        let svc = crate::http::ErrorResponseLayer::new().layer(layer.layer(service_fn(
            |_: Request<()>| async { Err::<Response<Body>, BoxError>("down".into()) },
        )));
        for _ in 0..2 {
            let response = svc.clone().oneshot(Request::new(())).await.unwrap();
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
        assert_eq!(handle.state(), State::Open);
        tokio::time::advance(Duration::from_millis(2_500)).await;
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers()[crate::http::REJECTED_HEADER],
            "circuit_open"
        );
        // 7.5 s to go, rounded up.
        assert_eq!(response.headers()[::http::header::RETRY_AFTER], "8");
    }

    #[cfg(feature = "tonic")]
    #[tokio::test(start_paused = true)]
    async fn grpc_failure_codes_can_be_named_with_tonic() {
        let layer = layer().classify(GrpcStatus::with_codes([tonic::Code::NotFound]));
        let handle = layer.handle();
        let svc = layer.layer(service_fn(|code: u32| async move {
            Ok::<_, Infallible>(grpc_response(Some(code), None))
        }));
        svc.clone().oneshot(14).await.unwrap();
        assert_eq!(handle.failure_rate(), 0.0, "UNAVAILABLE is not named");
        svc.clone().oneshot(5).await.unwrap();
        assert_eq!(handle.failure_rate(), 0.5, "NOT_FOUND is");
    }
}
