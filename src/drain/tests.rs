use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;
use tokio_test::assert_ready_ok;
use tower::{Layer, Service};
use tower_test::mock;

use super::*;
use crate::test_support::{End, Tracked};

const MS: Duration = Duration::from_millis(1);

type Fut = Pin<Box<dyn Future<Output = Result<u64, crate::BoxError>> + Send>>;

/// Calls `svc` with `id` and spawns the response future.
fn spawn_call(
    svc: &mut DrainService<Tracked, OnResponse>,
    id: u64,
) -> tokio::task::JoinHandle<Result<u64, crate::BoxError>> {
    let fut = svc.call(id);
    tokio::spawn(fut)
}

/// Lets spawned tasks run.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

fn service(drain: &Drain) -> (DrainService<Tracked, OnResponse>, Tracked) {
    let inner = Tracked::default();
    (drain.layer().layer(inner.clone()), inner)
}

#[tokio::test(start_paused = true)]
async fn phases_come_in_order_at_the_readiness_delay() {
    let drain = Drain::builder().readiness_delay(500 * MS).build();
    let (mut svc, inner) = service(&drain);
    let started = tokio::spawn(drain.started());
    let signaled = tokio::spawn(drain.signaled());
    settle().await;
    assert!(!drain.is_draining());
    assert!(!started.is_finished() && !signaled.is_finished());

    let t0 = Instant::now();
    assert!(drain.start());
    assert!(!drain.start(), "a second start changes nothing");
    settle().await;
    assert!(drain.is_draining());
    assert!(started.is_finished(), "started resolves at once");
    assert!(!signaled.is_finished());
    assert!(!drain.is_refusing());

    // Still admitted during the readiness delay, up to its last instant.
    tokio::time::advance(499 * MS).await;
    let admitted = spawn_call(&mut svc, 1);
    settle().await;
    assert_eq!(inner.books.seen(), vec![1]);
    assert!(!signaled.is_finished());

    tokio::time::advance(MS).await;
    settle().await;
    assert!(
        signaled.is_finished(),
        "signaled resolves when refusals begin"
    );
    assert_eq!(Instant::now() - t0, 500 * MS);
    assert!(drain.is_refusing());
    let refused = svc.call(2).await.unwrap_err();
    assert!(refused.is::<Draining>(), "{refused}");
    assert_eq!(
        inner.books.seen(),
        vec![1],
        "a refused call never reaches the inner service"
    );

    inner.books.finish(1, End::Ok);
    assert_eq!(admitted.await.unwrap().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn calls_in_flight_complete_and_the_report_counts_exactly() {
    let drain = Drain::builder().readiness_delay(100 * MS).build();
    let (mut svc, inner) = service(&drain);
    let before: Vec<_> = (0..3).map(|id| spawn_call(&mut svc, id)).collect();
    settle().await;
    assert_eq!(drain.in_flight(), 3);

    let report = tokio::spawn(drain.drain(Duration::from_secs(10)));
    settle().await;
    // Admitted during the delay, refused after it.
    let during = spawn_call(&mut svc, 3);
    tokio::time::advance(100 * MS).await;
    settle().await;
    for id in 4..6 {
        assert!(svc.call(id).await.unwrap_err().is::<Draining>());
    }
    assert_eq!(drain.in_flight(), 4);
    assert!(!report.is_finished());

    tokio::time::advance(50 * MS).await;
    for id in 0..4 {
        inner.books.finish(id, End::Ok);
    }
    for call in before.into_iter().chain([during]) {
        call.await.unwrap().unwrap();
    }
    let report = report.await.unwrap();
    assert_eq!(report.completed(), 4);
    assert_eq!(report.in_flight(), 0);
    assert_eq!(report.refused(), 2);
    assert_eq!(report.elapsed(), 150 * MS);
    assert!(report.is_complete());
    assert_eq!(inner.books.seen(), vec![0, 1, 2, 3]);

    // A drain after completion returns at once, with the same figures.
    let t = Instant::now();
    let again = drain.drain(Duration::from_secs(10)).await;
    assert_eq!(Instant::now(), t);
    assert_eq!(
        (again.completed(), again.in_flight(), again.refused()),
        (4, 0, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn the_timeout_is_honoured_and_reports_what_is_left() {
    let drain = Drain::new();
    let (mut svc, inner) = service(&drain);
    let stuck = spawn_call(&mut svc, 0);
    let quick = spawn_call(&mut svc, 1);
    settle().await;
    let report = tokio::spawn(drain.drain(Duration::from_secs(2)));
    settle().await;
    inner.books.finish(1, End::Ok);
    quick.await.unwrap().unwrap();

    tokio::time::advance(Duration::from_secs(2) - MS).await;
    settle().await;
    assert!(!report.is_finished());
    tokio::time::advance(MS).await;
    let report = report.await.unwrap();
    assert_eq!(report.completed(), 1);
    assert_eq!(report.in_flight(), 1);
    assert!(!report.is_complete());
    assert_eq!(report.elapsed(), Duration::from_secs(2));
    assert!(!stuck.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_timeout_shorter_than_the_delay_cuts_the_delay_short() {
    let drain = Drain::builder()
        .readiness_delay(Duration::from_secs(30))
        .build();
    let (mut svc, _inner) = service(&drain);
    let report = drain.drain(Duration::from_secs(1)).await;
    assert_eq!(report.elapsed(), Duration::from_secs(1));
    assert!(report.is_complete());
    assert!(drain.is_refusing());
    assert!(svc.call(0).await.unwrap_err().is::<Draining>());
}

/// When a drain's timeout cuts the readiness delay short, the server is told
/// to stop accepting at the same moment refusals begin.
#[tokio::test(start_paused = true)]
async fn signaled_follows_refusals_that_a_timeout_started_early() {
    let drain = Drain::builder()
        .readiness_delay(Duration::from_secs(10))
        .build();
    let signaled = tokio::spawn(drain.signaled());
    let report = tokio::spawn(drain.drain(Duration::from_secs(1)));
    settle().await;
    assert!(!signaled.is_finished());
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert!(report.is_finished());
    assert!(drain.is_refusing());
    assert!(
        signaled.is_finished(),
        "signaled resolves with the early refusals"
    );
}

/// Durations too long for the clock mean "no deadline" and "no timed end of
/// the delay"; nothing panics, and `refuse` still ends the delay.
#[tokio::test(start_paused = true)]
async fn endless_durations_do_not_overflow() {
    let drain = Drain::builder().readiness_delay(Duration::MAX).build();
    let (mut svc, inner) = service(&drain);
    let signaled = tokio::spawn(drain.signaled());
    let report = tokio::spawn(drain.drain(Duration::MAX));
    settle().await;
    tokio::time::advance(Duration::from_secs(86_400)).await;
    settle().await;
    assert!(drain.is_draining() && !drain.is_refusing());
    let admitted = spawn_call(&mut svc, 1);
    settle().await;
    assert_eq!(
        inner.books.seen(),
        vec![1],
        "admitted during an endless delay"
    );
    assert!(!signaled.is_finished() && !report.is_finished());

    drain.refuse();
    settle().await;
    assert!(signaled.is_finished(), "refuse() ends the delay");
    assert!(svc.call(2).await.unwrap_err().is::<Draining>());
    assert!(!report.is_finished(), "call 1 is still in flight");
    inner.books.finish(1, End::Ok);
    admitted.await.unwrap().unwrap();
    let report = report.await.unwrap();
    assert_eq!(
        (report.completed(), report.in_flight(), report.refused()),
        (1, 0, 1)
    );
}

/// The timeout runs from the call to `drain`, not from the first poll, and
/// the drain starts at the call.
#[tokio::test(start_paused = true)]
async fn the_timeout_runs_from_the_call() {
    let drain = Drain::new();
    let (mut svc, _inner) = service(&drain);
    let _stuck = spawn_call(&mut svc, 0);
    settle().await;
    let report = drain.drain(Duration::from_secs(2));
    assert!(drain.is_draining(), "started by the call");
    tokio::time::advance(Duration::from_secs(1)).await;
    let t = Instant::now();
    let report = report.await;
    assert_eq!(Instant::now() - t, Duration::from_secs(1));
    assert_eq!(report.in_flight(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_failed_and_panicking_calls_do_not_hold_the_drain() {
    let drain = Drain::new();
    let (mut svc, inner) = service(&drain);
    let dropped = svc.call(0);
    let failed = spawn_call(&mut svc, 1);
    let panics = spawn_call(&mut svc, 2);
    settle().await;
    assert_eq!(drain.in_flight(), 3);

    let report = tokio::spawn(drain.drain(Duration::from_secs(60)));
    settle().await;
    drop(dropped);
    inner.books.finish(1, End::Err);
    assert!(failed.await.unwrap().is_err());
    inner.books.finish(2, End::Panic);
    assert!(panics.await.unwrap_err().is_panic());
    let report = report.await.unwrap();
    assert_eq!((report.completed(), report.in_flight()), (3, 0));
    assert_eq!(report.elapsed(), Duration::ZERO);
    assert_eq!(inner.books.active(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_the_inner_call_itself_is_counted_out() {
    #[derive(Clone)]
    struct Explodes;
    impl Service<()> for Explodes {
        type Response = ();
        type Error = crate::BoxError;
        type Future = std::future::Ready<Result<(), crate::BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), crate::BoxError>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: ()) -> Self::Future {
            panic!("call panicked")
        }
    }
    let drain = Drain::new();
    let mut svc = drain.layer().layer(Explodes);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| svc.call(())));
    assert!(panicked.is_err());
    assert_eq!(drain.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn refusing_services_do_not_wait_for_the_inner_readiness() {
    let drain = Drain::new();
    let (mut svc, mut handle) = mock::spawn_layer::<&str, &str, _>(drain.layer());
    handle.allow(0);
    assert!(
        svc.poll_ready().is_pending(),
        "serving: readiness is the inner service's"
    );
    drain.start();
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call("late").await.unwrap_err();
    assert!(err.is::<Draining>());
    assert!(
        handle.poll_request().is_pending(),
        "nothing reached the inner service"
    );
}

#[tokio::test(start_paused = true)]
async fn clones_of_the_handle_and_of_the_layer_share_one_drain() {
    let drain = Drain::new();
    let layer = drain.layer();
    let mut a = layer.clone().layer(Tracked::default());
    let mut b = layer.layer(Tracked::default());
    let _a = a.call(0);
    let _b = b.call(1);
    let other = drain.clone();
    assert_eq!(other.in_flight(), 2);
    other.start();
    assert!(drain.is_draining());
    assert!(b.call(2).await.unwrap_err().is::<Draining>());
}

#[tokio::test(start_paused = true)]
async fn metrics_follow_the_phases_and_refusals() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let value = |series: &str| -> Option<f64> {
        let text = prometheus.render();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    };
    let (drain, mut svc, inner) = metrics::with_local_recorder(&recorder, || {
        let drain = Drain::builder().name("api").build();
        let (svc, inner) = service(&drain);
        (drain, svc, inner)
    });
    assert_eq!(value(r#"tower_scale_draining{name="api"}"#), Some(0.0));
    let call = spawn_call(&mut svc, 0);
    assert_eq!(
        value(r#"tower_scale_drain_in_flight{name="api"}"#),
        Some(1.0)
    );
    drain.start();
    assert_eq!(value(r#"tower_scale_draining{name="api"}"#), Some(1.0));
    assert!(svc.call(1).await.is_err());
    assert!(svc.call(2).await.is_err());
    let refused = r#"tower_scale_rejected_total{name="api",reason="draining"}"#;
    assert_eq!(value(refused), Some(2.0));
    settle().await;
    inner.books.finish(0, End::Ok);
    call.await.unwrap().unwrap();
    assert_eq!(
        value(r#"tower_scale_drain_in_flight{name="api"}"#),
        Some(0.0)
    );
}

#[test]
fn services_futures_and_signals_fit_axum_and_tonic() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    fn assert_send<T: Send + 'static>() {}
    assert_fits::<Drain>();
    assert_fits::<DrainLayer>();
    assert_fits::<DrainService<Tracked, OnResponse>>();
    assert_send::<ResponseFuture<Fut, OnResponse>>();
    assert_send::<Signal>();
    fn drain_future_is_send(drain: &Drain) -> impl Send + 'static {
        drain.drain(Duration::from_secs(1))
    }
    let _ = drain_future_is_send;
    fn signal_is_send() -> impl Send + 'static {
        shutdown_signal()
    }
    let _ = signal_is_send;
}

#[cfg(feature = "http")]
mod http {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    use super::*;

    type Frame = Result<http_body::Frame<Bytes>, std::convert::Infallible>;

    /// With `release_on_body_end`, a streaming response is counted until its
    /// body ends: the drain waits for the last frame, not the head.
    #[tokio::test(start_paused = true)]
    async fn streaming_bodies_hold_the_drain_until_they_end() {
        let drain = Drain::new();
        let (tx, rx) = mpsc::channel::<Frame>(4);
        let rx = std::sync::Mutex::new(Some(rx));
        let app = tower::service_fn(move |_: ::http::Request<()>| {
            let rx = rx.lock().unwrap().take().unwrap();
            let body = StreamBody::new(tokio_stream_shim(rx));
            async move { Ok::<_, std::convert::Infallible>(::http::Response::new(body)) }
        });
        let mut svc = drain.layer().release_on_body_end().layer(app);
        let response = svc.call(::http::Request::new(())).await.unwrap();
        assert_eq!(drain.in_flight(), 1, "the head is out, the body is not");
        let report = tokio::spawn(drain.drain(Duration::from_secs(5)));
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"part"))))
            .await
            .unwrap();
        settle().await;
        assert!(!report.is_finished());
        drop(tx);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"part");
        let report = report.await.unwrap();
        assert_eq!((report.completed(), report.in_flight()), (1, 0));
    }

    /// Once the drain has started, HTTP/1.x responses ask the client to close
    /// the connection; HTTP/2 responses and responses before the drain do not.
    #[tokio::test(start_paused = true)]
    async fn http1_responses_close_the_connection_once_draining() {
        let drain = Drain::builder()
            .readiness_delay(Duration::from_secs(1))
            .build();
        let app = tower::service_fn(|_: ::http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(::http::Response::new(String::from("ok")))
        });
        let mut svc = drain.layer().release_on_body_end().layer(app);
        let mut send = |version| {
            let mut request = ::http::Request::new(());
            *request.version_mut() = version;
            svc.call(request)
        };
        let close = |response: &::http::Response<_>| {
            response.headers().get(::http::header::CONNECTION).cloned()
        };
        let before = send(::http::Version::HTTP_11).await.unwrap();
        assert_eq!(close(&before), None);
        drain.start();
        let h1 = send(::http::Version::HTTP_11).await.unwrap();
        assert_eq!(close(&h1).unwrap(), "close");
        let h10 = send(::http::Version::HTTP_10).await.unwrap();
        assert_eq!(close(&h10).unwrap(), "close");
        let h2 = send(::http::Version::HTTP_2).await.unwrap();
        assert_eq!(close(&h2), None);
    }

    /// The receiver as a `Stream`, without pulling in tokio-stream.
    fn tokio_stream_shim(
        mut rx: mpsc::Receiver<Frame>,
    ) -> impl futures_core::Stream<Item = Frame> + Send {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}

/// A real SIGTERM resolves the signal future. It is sent to a child process
/// (this test binary run again for this test alone), so that the other tests
/// keep the default handler and a stray signal still stops the binary.
#[cfg(unix)]
#[test]
fn shutdown_signal_resolves_on_sigterm() {
    use std::io::BufRead as _;

    const CHILD: &str = "TOWER_SCALE_SIGTERM_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let signal = tokio::spawn(shutdown_signal());
            // Let the task install its handlers before saying so.
            for _ in 0..16 {
                tokio::task::yield_now().await;
            }
            println!("child: handlers installed");
            tokio::time::timeout(Duration::from_secs(10), signal)
                .await
                .expect("SIGTERM within 10 s")
                .unwrap();
            println!("child: shutdown signal received");
        });
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "drain::tests::shutdown_signal_resolves_on_sigterm",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the test binary again");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("handlers installed"));
    assert!(ready, "the child never installed its handlers");
    let kill = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .expect("run kill");
    assert!(kill.success());
    // Read to the end: closing the pipe early would fail the child's output.
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let received = rest.iter().any(|l| l.contains("signal received"));
    let status = child.wait().unwrap();
    assert!(received && status.success(), "child: {status}");
}

mod model {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Call,
        Finish(usize, End),
        Drop(usize),
        Start,
        Refuse,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Call),
            3 => (any::<usize>(), prop_oneof![Just(End::Ok), Just(End::Err), Just(End::Panic)])
                .prop_map(|(i, end)| Op::Finish(i, end)),
            2 => any::<usize>().prop_map(Op::Drop),
            1 => Just(Op::Start),
            1 => Just(Op::Refuse),
            2 => (1u64..40).prop_map(Op::Advance),
        ]
    }

    const DELAY: Duration = Duration::from_millis(50);

    /// Replays `ops` against a drain and a model of it: after every step the
    /// in-flight, completed and refused counts are exact, and refusals start
    /// exactly when the model says.
    fn check(ops: Vec<Op>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let drain = Drain::builder().readiness_delay(DELAY).build();
            let (mut svc, inner) = service(&drain);
            let mut live: Vec<(u64, tokio::task::JoinHandle<Result<u64, crate::BoxError>>)> =
                Vec::new();
            let (mut next, mut completed, mut refused) = (0u64, 0u64, 0u64);
            let mut started_at: Option<Instant> = None;
            let mut forced = false;
            for op in ops {
                let refusing = forced || started_at.is_some_and(|at| Instant::now() >= at + DELAY);
                match op {
                    Op::Call => {
                        next += 1;
                        if refusing {
                            assert!(svc.call(next).await.unwrap_err().is::<Draining>());
                            refused += 1;
                        } else {
                            live.push((next, spawn_call(&mut svc, next)));
                        }
                    }
                    Op::Finish(i, end) if !live.is_empty() => {
                        let (id, task) = live.remove(i % live.len());
                        settle().await;
                        assert!(inner.books.finish(id, end));
                        let _ = task.await;
                        completed += u64::from(started_at.is_some());
                    }
                    Op::Drop(i) if !live.is_empty() => {
                        let (_, task) = live.remove(i % live.len());
                        task.abort();
                        let _ = task.await;
                        completed += u64::from(started_at.is_some());
                    }
                    Op::Finish(..) | Op::Drop(_) => {}
                    Op::Start => {
                        assert_eq!(drain.start(), started_at.is_none());
                        started_at.get_or_insert(Instant::now());
                    }
                    Op::Refuse => {
                        drain.refuse();
                        started_at.get_or_insert(Instant::now());
                        forced = true;
                    }
                    Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                }
                settle().await;
                assert_eq!(drain.in_flight(), live.len());
                assert_eq!(drain.is_draining(), started_at.is_some());
            }
            // Everything left ends; the drain then completes with exact figures.
            for (id, task) in live.drain(..) {
                settle().await;
                inner.books.finish(id, End::Ok);
                let _ = task.await;
                completed += u64::from(started_at.is_some());
            }
            let report = drain.drain(Duration::from_secs(1)).await;
            assert_eq!(report.in_flight(), 0);
            assert_eq!(report.completed(), completed);
            assert_eq!(report.refused(), refused);
            assert_eq!(inner.books.active(), 0);
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn counts_stay_exact_under_random_interleavings(ops in prop::collection::vec(op(), 1..80)) {
            check(ops);
        }
    }
}
