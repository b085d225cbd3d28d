use std::convert::Infallible;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use http_body::Body as _;
use tower::{service_fn, Layer, ServiceExt};

use super::*;
use crate::error::{BoxError, Overloaded, QueueFull, QueueTimeout};

/// A body of one chunk, for the tests.
type Full = http_body_util::Full<bytes::Bytes>;

async fn answer(err: BoxError, layer: ErrorResponseLayer) -> Response<ResponseBody<Full>> {
    let mut err = Some(err);
    let svc = layer.layer(service_fn(move |_: Request<()>| {
        let err = err.take().expect("called once");
        async move { Err::<Response<Full>, BoxError>(err) }
    }));
    svc.oneshot(Request::new(())).await.unwrap()
}

#[tokio::test]
async fn rejections_become_503_with_retry_after_and_the_marker() {
    for (err, reason) in [
        (BoxError::from(Overloaded::new()), "overloaded"),
        (QueueFull::new().into(), "queue_full"),
        (QueueTimeout::new().into(), "queue_timeout"),
    ] {
        let response = answer(err, ErrorResponseLayer::new()).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[REJECTED_HEADER], reason);
        assert_eq!(response.headers()[header::CONTENT_LENGTH], "0");
        assert!(response.body().is_end_stream());
    }
}

/// Draining is answered with the marker and no `Retry-After`; HTTP/1.x gets
/// `Connection: close`, HTTP/2 (where the header is illegal) does not.
#[tokio::test]
async fn draining_closes_http1_connections_only() {
    for (version, close) in [
        (http::Version::HTTP_10, true),
        (http::Version::HTTP_11, true),
        (http::Version::HTTP_2, false),
    ] {
        let mut err = Some(BoxError::from(crate::error::Draining::new()));
        let svc = ErrorResponseLayer::new().layer(service_fn(move |_: Request<()>| {
            let err = err.take().expect("called once");
            async move { Err::<Response<Full>, BoxError>(err) }
        }));
        let mut request = Request::new(());
        *request.version_mut() = version;
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[REJECTED_HEADER], "draining");
        assert!(!response.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(
            response
                .headers()
                .get(header::CONNECTION)
                .map(|v| v.to_str().unwrap()),
            close.then_some("close"),
            "{version:?}"
        );
    }
}

#[tokio::test]
async fn timeout_becomes_504_and_unknown_errors_500_without_their_text() {
    let elapsed: BoxError = tower::timeout::error::Elapsed::new().into();
    let response = answer(elapsed, ErrorResponseLayer::new()).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(!response.headers().contains_key(REJECTED_HEADER));

    let response = answer(
        "database password is hunter2".into(),
        ErrorResponseLayer::new(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!response.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(response.body().size_hint().exact(), Some(0));

    let response = answer(
        "visible".into(),
        ErrorResponseLayer::new().expose_errors(true),
    )
    .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "visible");
}

#[derive(Debug)]
struct Wrapped(BoxError);

impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wrapped")
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

#[test]
fn rejections_are_found_through_the_source_chain() {
    let err = Wrapped(QueueTimeout::new().into());
    assert_eq!(Rejection::of(&err), Rejection::Refused("queue_timeout"));
    assert_eq!(Rejection::of(&Wrapped("other".into())), Rejection::Internal);
}

/// A refusal wrapped in an application error keeps its status but loses the
/// marker: the application may have worked before it got the refusal, so a
/// `SafeRetry` client must not send the request again.
#[tokio::test]
async fn wrapped_refusals_are_not_marked_and_not_retried() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    let response = answer(
        Wrapped(crate::error::CircuitOpen::new(None).into()).into(),
        ErrorResponseLayer::new(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!response.headers().contains_key(REJECTED_HEADER));
    let response = answer(QueueFull::new().into(), ErrorResponseLayer::new()).await;
    assert_eq!(response.headers()[REJECTED_HEADER], "queue_full");

    // A handler that does its work, then fails with a wrapped refusal.
    let worked = Arc::new(AtomicUsize::new(0));
    let counter = worked.clone();
    let server = ErrorResponseLayer::new().layer(service_fn(move |_: Request<String>| {
        counter.fetch_add(1, SeqCst);
        async move {
            let downstream: BoxError = crate::error::CircuitOpen::new(None).into();
            Err::<Response<Full>, BoxError>(Wrapped(downstream).into())
        }
    }));
    let client = tower::ServiceBuilder::new()
        .layer(SafeRetry::new().into_layer())
        .map_err(|never: Infallible| -> BoxError { match never {} })
        .service(server);
    let request = Request::post("/orders").body("payload".to_owned()).unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(worked.load(SeqCst), 1, "not sent again");
}

#[test]
fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
    assert_eq!(retry_after_value(Duration::ZERO), "1");
    assert_eq!(retry_after_value(Duration::from_millis(10)), "1");
    assert_eq!(retry_after_value(Duration::from_secs(2)), "2");
    assert_eq!(retry_after_value(Duration::from_millis(2001)), "3");
}

#[tokio::test]
async fn successful_responses_keep_their_body_and_hints() {
    let svc = ErrorResponseLayer::new().layer(service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::from("hello")))
    }));
    let response = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.body().size_hint().exact(), Some(5));
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "hello");
}

#[tokio::test]
async fn guard_body_holds_its_guard_until_the_body_ends_or_is_dropped() {
    use http_body_util::BodyExt;
    let (tx, rx) =
        futures::channel::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, Infallible>>(2);
    let guard = std::sync::Arc::new(());
    let mut body = GuardBody::new(http_body_util::StreamBody::new(rx), guard.clone());
    assert_eq!(std::sync::Arc::strong_count(&guard), 2);
    let mut tx = tx;
    futures::SinkExt::send(&mut tx, Ok(http_body::Frame::data("a".into())))
        .await
        .unwrap();
    assert!(body.frame().await.is_some());
    assert!(body.is_holding());
    drop(tx);
    assert!(body.frame().await.is_none());
    assert!(!body.is_holding());
    assert_eq!(std::sync::Arc::strong_count(&guard), 1);

    let (_tx, rx) =
        futures::channel::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, Infallible>>(1);
    let body = GuardBody::new(http_body_util::StreamBody::new(rx), guard.clone());
    assert_eq!(std::sync::Arc::strong_count(&guard), 2);
    drop(body);
    assert_eq!(std::sync::Arc::strong_count(&guard), 1);

    // A body that is already over does not hold the guard at all.
    let body = GuardBody::new(Full::default(), guard.clone());
    assert!(!body.is_holding());
}

#[tokio::test]
async fn readiness_error_is_answered_by_the_next_call_without_calling_inner() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<()>, Response<Full>>();
    let mut svc = tower_test::mock::Spawn::new(ErrorResponseLayer::new().layer(svc));
    handle.send_error(QueueFull::new());
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let response = svc.call(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[REJECTED_HEADER], "queue_full");
    assert!(handle.poll_request().is_pending());
}

#[test]
fn services_fit_axum() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    assert_fits::<ErrorResponseLayer>();
    assert_fits::<ErrorResponse<crate::shed::LoadShed<crate::test_support::Tracked>>>();
}

mod retry {
    use std::sync::{Arc, Mutex};

    use tokio::time::Instant;
    use tower::retry::budget::TpsBudget;
    use tower::ServiceBuilder;

    use super::*;
    use crate::error::{Draining, QueueFull};
    use crate::http::RetrySafe;

    /// Answers each attempt with the next of `answers`, recording when it came.
    #[derive(Clone)]
    struct Script {
        answers: Arc<Mutex<Vec<Answer>>>,
        seen: Arc<Mutex<Vec<(http::Method, Instant)>>>,
    }

    #[derive(Clone)]
    enum Answer {
        Status(u16, &'static [(&'static str, &'static str)]),
        Fail(fn() -> BoxError),
    }

    impl Script {
        fn new(answers: Vec<Answer>) -> Self {
            Script {
                answers: Arc::new(Mutex::new(answers.into_iter().rev().collect())),
                seen: Arc::default(),
            }
        }

        fn attempts(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        fn times(&self) -> Vec<Instant> {
            self.seen.lock().unwrap().iter().map(|(_, t)| *t).collect()
        }
    }

    impl tower::Service<Request<String>> for Script {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<()>, BoxError>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<String>) -> Self::Future {
            assert_eq!(request.body(), "payload", "the body is sent again whole");
            self.seen
                .lock()
                .unwrap()
                .push((request.method().clone(), Instant::now()));
            let answer = self
                .answers
                .lock()
                .unwrap()
                .pop()
                .unwrap_or(Answer::Status(200, &[]));
            std::future::ready(match answer {
                Answer::Status(code, headers) => {
                    let mut response = Response::new(());
                    *response.status_mut() = StatusCode::from_u16(code).unwrap();
                    for (name, value) in headers {
                        response.headers_mut().insert(*name, value.parse().unwrap());
                    }
                    Ok(response)
                }
                Answer::Fail(make) => Err(make()),
            })
        }
    }

    const REFUSED: Answer = Answer::Status(503, &[("tower-scale-rejected", "draining")]);

    async fn send(policy: SafeRetry, script: &Script) -> Result<Response<()>, BoxError> {
        let client = ServiceBuilder::new()
            .layer(policy.into_layer())
            .service(script.clone());
        let request = Request::post("http://backend/orders")
            .body("payload".to_owned())
            .unwrap();
        client.oneshot(request).await
    }

    #[tokio::test(start_paused = true)]
    async fn refused_posts_are_retried_and_other_failures_are_not() {
        let script = Script::new(vec![REFUSED, REFUSED]);
        let response = send(SafeRetry::new(), &script).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(script.attempts(), 3);
        assert!(script
            .seen
            .lock()
            .unwrap()
            .iter()
            .all(|(m, _)| m == http::Method::POST));

        for answer in [
            Answer::Status(503, &[]),
            Answer::Status(500, &[]),
            Answer::Status(429, &[("retry-after", "1")]),
            Answer::Fail(|| tower::timeout::error::Elapsed::new().into()),
            Answer::Fail(|| std::io::Error::from(std::io::ErrorKind::ConnectionReset).into()),
            Answer::Fail(|| std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        ] {
            let script = Script::new(vec![answer]);
            let _ = send(SafeRetry::new(), &script).await;
            assert_eq!(script.attempts(), 1, "work may have started: not retried");
        }
    }

    #[derive(Debug)]
    struct Connect(std::io::Error);

    impl std::fmt::Display for Connect {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Connect {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// A connection closed before the response: retried for idempotent
    /// methods only, and not at all when turned off.
    #[tokio::test(start_paused = true)]
    async fn resets_are_retried_for_idempotent_methods_only() {
        let reset =
            || Answer::Fail(|| std::io::Error::from(std::io::ErrorKind::ConnectionReset).into());
        for (method, retry, attempts) in [
            (http::Method::GET, true, 2),
            (http::Method::PUT, true, 2),
            (http::Method::DELETE, true, 2),
            (http::Method::POST, true, 1),
            (http::Method::PATCH, true, 1),
            (http::Method::GET, false, 1),
        ] {
            let script = Script::new(vec![reset()]);
            let policy = SafeRetry::builder()
                .retry_idempotent(retry)
                .build()
                .unwrap();
            let client = ServiceBuilder::new()
                .layer(policy.into_layer())
                .service(script.clone());
            let request = Request::builder()
                .method(method.clone())
                .uri("http://backend/orders")
                .body("payload".to_owned())
                .unwrap();
            let _ = client.oneshot(request).await;
            assert_eq!(script.attempts(), attempts, "{method} with retry {retry}");
        }
    }

    /// Gateway failures are retried for idempotent requests and requests
    /// marked `RetrySafe`; a 500 never is.
    #[tokio::test(start_paused = true)]
    async fn gateway_failures_are_retried_for_idempotent_or_marked_requests() {
        for (method, safe, status, attempts) in [
            (http::Method::GET, false, 502, 2),
            (http::Method::GET, false, 503, 2),
            (http::Method::GET, false, 504, 2),
            (http::Method::GET, false, 500, 1),
            (http::Method::POST, false, 503, 1),
            (http::Method::POST, true, 503, 2),
            (http::Method::POST, true, 500, 1),
        ] {
            let script = Script::new(vec![Answer::Status(status, &[])]);
            let client = ServiceBuilder::new()
                .layer(SafeRetry::new().into_layer())
                .service(script.clone());
            let mut request = Request::builder()
                .method(method.clone())
                .uri("http://backend/orders")
                .body("payload".to_owned())
                .unwrap();
            if safe {
                request.extensions_mut().insert(RetrySafe);
            }
            let _ = client.oneshot(request).await;
            assert_eq!(script.attempts(), attempts, "{method} safe={safe} {status}");
        }
    }

    /// With every attempt failing, the budget holds the load offered to the
    /// backends at the request rate plus its retry share: 1 000 requests,
    /// `TpsBudget::new(1 s, 0 per second, 0.2)`, at most 1 200 attempts.
    #[tokio::test(start_paused = true)]
    async fn an_all_failing_backend_sees_at_most_the_budget_share_more() {
        const REQUESTS: usize = 1_000;
        let script = Script::new(vec![Answer::Status(503, &[]); REQUESTS * 5]);
        let policy = SafeRetry::builder()
            .budget(TpsBudget::new(Duration::from_secs(1), 0, 0.2))
            .max_retries(4)
            .build()
            .unwrap();
        let client = ServiceBuilder::new()
            .layer(policy.into_layer())
            .service(script.clone());
        for _ in 0..REQUESTS {
            let request = Request::get("http://backend/")
                .body("payload".to_owned())
                .unwrap();
            let response = client.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), 503);
        }
        let ratio = script.attempts() as f64 / REQUESTS as f64;
        println!(
            "{REQUESTS} requests, {} attempts: {ratio:.3}x",
            script.attempts()
        );
        assert!(ratio <= 1.2, "offered {ratio:.3}x the request rate");
        assert!(ratio >= 1.15, "the budget's share was used: {ratio:.3}x");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_before_work_found_in_errors_are_retried() {
        let script = Script::new(vec![
            Answer::Fail(|| Draining::new().into()),
            Answer::Fail(|| QueueFull::new().into()),
            Answer::Fail(|| {
                Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)).into()
            }),
        ]);
        let response = send(SafeRetry::new(), &script).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(script.attempts(), 4);
    }

    /// The client's own balancer having no endpoint is not retried.
    #[tokio::test(start_paused = true)]
    async fn no_endpoints_is_not_retried() {
        let script = Script::new(vec![Answer::Fail(|| {
            crate::error::NoEndpoints::new().into()
        })]);
        assert!(send(SafeRetry::new(), &script).await.is_err());
        assert_eq!(script.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_up_to_max_wait() {
        const WAIT_2S: Answer = Answer::Status(
            503,
            &[("tower-scale-rejected", "queue_full"), ("retry-after", "2")],
        );
        let script = Script::new(vec![WAIT_2S]);
        send(SafeRetry::new(), &script).await.unwrap();
        let times = script.times();
        assert_eq!(times[1] - times[0], Duration::from_secs(2));

        // An HTTP date in the past asks for no wait.
        const DATE: Answer = Answer::Status(
            503,
            &[
                ("tower-scale-rejected", "queue_full"),
                ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
            ],
        );
        let script = Script::new(vec![DATE]);
        send(SafeRetry::new(), &script).await.unwrap();
        let times = script.times();
        assert_eq!(times.len(), 2);
        assert_eq!(times[1] - times[0], Duration::ZERO);

        let script = Script::new(vec![WAIT_2S]);
        let policy = SafeRetry::builder()
            .max_wait(Duration::from_secs(1))
            .build()
            .unwrap();
        let response = send(policy, &script).await.unwrap();
        assert_eq!(
            response.status(),
            503,
            "asked to wait too long: not retried"
        );
        assert_eq!(script.attempts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_max_retries_and_back_off_after_the_first() {
        let script = Script::new(vec![REFUSED; 10]);
        let policy = SafeRetry::builder()
            .max_retries(4)
            .backoff(Duration::from_millis(10), Duration::from_millis(15))
            .build()
            .unwrap();
        let response = send(policy, &script).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(script.attempts(), 5);
        let times = script.times();
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[0], Duration::ZERO, "the first retry goes at once");
        for (gap, cap) in gaps[1..].iter().zip([10, 15, 15]) {
            assert!(*gap <= Duration::from_millis(cap), "{gaps:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_retries() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let prometheus = recorder.handle();
        let policy = metrics::with_local_recorder(&recorder, || {
            SafeRetry::builder()
                .budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0))
                .name("client")
                .build()
                .unwrap()
        });
        let script = Script::new(vec![REFUSED]);
        let response = send(policy, &script).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(script.attempts(), 1);
        let text = prometheus.render();
        assert!(
            text.contains(
                r#"tower_scale_retries_total{name="client",outcome="budget_exhausted"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn bad_backoff_is_refused_naming_the_field() {
        let zero = SafeRetry::builder().backoff(Duration::ZERO, Duration::from_secs(1));
        assert_eq!(zero.build().unwrap_err().field(), "backoff.base");
        let inverted = SafeRetry::builder().backoff(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(inverted.build().unwrap_err().field(), "backoff.max");
    }
}
