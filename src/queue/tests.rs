use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

use super::*;
use crate::error::BoxError;
use crate::limit::{ConcurrencyLimit, ConcurrencyLimitLayer, LimitHandle};
use crate::test_support::{Books, End, Tracked};

const MS: Duration = Duration::from_millis(1);

type Stack = Queue<ConcurrencyLimit<Tracked>>;

/// `Queue(capacity, timeout, order) → ConcurrencyLimit(limit) → Tracked`, with
/// every call spawned as its own task.
struct Harness {
    svc: Stack,
    books: Arc<Books>,
    queue: QueueHandle,
    limit: LimitHandle,
}

impl Harness {
    fn new(queue: QueueLayer, limit: usize) -> Self {
        let limit = ConcurrencyLimitLayer::new(limit).name(queue.handle().name());
        let inner = Tracked::default();
        Harness {
            books: inner.books.clone(),
            queue: queue.handle(),
            limit: limit.handle(),
            svc: queue.layer(limit.layer(inner)),
        }
    }

    async fn call(&self, id: u64) -> JoinHandle<Result<u64, BoxError>> {
        let svc = self.svc.clone();
        let task = tokio::spawn(svc.oneshot(id));
        settle().await;
        task
    }

    async fn finish(&self, id: u64) {
        assert!(self.books.finish(id, End::Ok), "call {id} is not running");
        settle().await;
    }
}

/// Lets every spawned task run until it waits on something.
async fn settle() {
    for _ in 0..16 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn call_goes_straight_through_when_the_queue_is_empty_and_inner_ready() {
    let h = Harness::new(QueueLayer::new(4, 100 * MS), 2);
    let a = h.call(1).await;
    assert_eq!(h.books.running(), vec![1]);
    assert_eq!(h.queue.depth(), 0);
    h.finish(1).await;
    assert_eq!(a.await.unwrap().unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn queued_request_past_its_timeout_gets_queue_timeout_and_never_reaches_inner() {
    let h = Harness::new(QueueLayer::new(4, 100 * MS), 1);
    let _busy = h.call(0).await;
    let queued = h.call(1).await;
    assert_eq!(h.queue.depth(), 1);

    tokio::time::advance(99 * MS).await;
    settle().await;
    assert!(!queued.is_finished());

    tokio::time::advance(MS).await;
    settle().await;
    let err = queued.await.unwrap().unwrap_err();
    assert!(err.is::<QueueTimeout>(), "{err}");
    assert_eq!(h.queue.depth(), 0);

    // The permit freeing later does not resurrect it.
    h.finish(0).await;
    assert_eq!(h.books.seen(), vec![0]);
    assert_eq!(h.limit.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropped_queued_future_frees_its_slot() {
    let h = Harness::new(QueueLayer::new(1, Duration::from_secs(10)), 1);
    let _busy = h.call(0).await;
    let queued = h.call(1).await;
    assert_eq!(h.queue.depth(), 1);
    let full = h.call(2).await;
    assert!(full.await.unwrap().unwrap_err().is::<QueueFull>());

    queued.abort();
    settle().await;
    assert_eq!(h.queue.depth(), 0);
    let next = h.call(3).await;
    assert_eq!(h.queue.depth(), 1);
    h.finish(0).await;
    assert_eq!(h.books.seen(), vec![0, 3]);
    h.finish(3).await;
    assert_eq!(next.await.unwrap().unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn full_queue_rejects_at_once_with_queue_full() {
    let h = Harness::new(QueueLayer::new(2, Duration::from_secs(10)), 1);
    let _busy = h.call(0).await;
    let _a = h.call(1).await;
    let _b = h.call(2).await;
    let start = Instant::now();
    let mut svc = h.svc.clone();
    let err = svc.ready().await.unwrap().call(3).await.unwrap_err();
    assert!(err.is::<QueueFull>(), "{err}");
    assert_eq!(Instant::now(), start, "no time passed");
    assert_eq!(h.queue.depth(), 2);
}

#[tokio::test(start_paused = true)]
async fn backpressure_mode_is_pending_while_full_and_ready_when_a_slot_frees() {
    let h = Harness::new(
        QueueLayer::new(1, Duration::from_secs(10)).backpressure(),
        1,
    );
    let _busy = h.call(0).await;
    let _queued = h.call(1).await;
    assert_eq!(h.queue.depth(), 1);

    let mut svc = mock::Spawn::new(h.svc.clone());
    assert_pending!(svc.poll_ready());
    assert!(!svc.is_woken());
    h.finish(0).await;
    // Request 1 left the queue for the inner service: there is room again.
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_service_parked_for_room_leaves_no_trace() {
    let h = Harness::new(
        QueueLayer::new(1, Duration::from_secs(10)).backpressure(),
        1,
    );
    let _busy = h.call(0).await;
    let _queued = h.call(1).await;
    let mut first = mock::Spawn::new(h.svc.clone());
    let mut second = mock::Spawn::new(h.svc.clone());
    assert_pending!(first.poll_ready());
    assert_pending!(second.poll_ready());
    drop(first);
    h.finish(0).await;
    assert!(second.is_woken());
    assert_ready_ok!(second.poll_ready());
}

/// Runs `order` with limit 1: call 0 runs, calls 1..=5 queue, then each running
/// call is finished in turn; returns the order in which calls reached the inner
/// service.
async fn dispatch_order(order: Order) -> Vec<u64> {
    let h = Harness::new(QueueLayer::new(8, Duration::from_secs(10)).order(order), 1);
    let mut tasks = vec![h.call(0).await];
    for id in 1..=5 {
        tasks.push(h.call(id).await);
    }
    while let Some(&id) = h.books.running().first() {
        h.finish(id).await;
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    h.books.seen()
}

#[tokio::test(start_paused = true)]
async fn fifo_dispatches_oldest_first() {
    assert_eq!(dispatch_order(Order::Fifo).await, vec![0, 1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn lifo_dispatches_newest_first_once_the_waiting_turn_is_served() {
    // Request 1 found the queue empty and took the turn; the turn is not taken
    // back, then each next turn goes to the newest request.
    assert_eq!(dispatch_order(Order::Lifo).await, vec![0, 1, 5, 4, 3, 2]);
}

#[tokio::test(start_paused = true)]
async fn adaptive_lifo_is_fifo_for_a_burst() {
    // All dispatches happen at one instant: no queue stood for an interval.
    assert_eq!(
        dispatch_order(Order::adaptive_lifo()).await,
        vec![0, 1, 2, 3, 4, 5]
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_lifo_serves_newest_first_while_a_queue_stands_and_fifo_after_it_drains() {
    let order = Order::AdaptiveLifo {
        target: 5 * MS,
        interval: 100 * MS,
    };
    let h = Harness::new(QueueLayer::new(16, Duration::from_secs(10)).order(order), 1);
    let mut tasks = vec![h.call(0).await];
    for id in 1..=3 {
        tasks.push(h.call(id).await);
    }
    // t = 50 ms: 0 ends, 1 goes (oldest waited 50 ms; the interval starts).
    tokio::time::advance(50 * MS).await;
    h.finish(0).await;
    // t = 100 ms: 4 and 5 arrive; 1 ends, 2 goes (oldest waited 100 ms).
    tokio::time::advance(50 * MS).await;
    tasks.push(h.call(4).await);
    tasks.push(h.call(5).await);
    h.finish(1).await;
    assert!(!h.queue.is_standing());
    // t = 160 ms: 6 and 7 arrive; 2 ends, 3 goes; the interval has passed
    // with the oldest request always older than 5 ms: a standing queue.
    tokio::time::advance(60 * MS).await;
    tasks.push(h.call(6).await);
    tasks.push(h.call(7).await);
    h.finish(2).await;
    assert!(h.queue.is_standing());
    while let Some(&id) = h.books.running().first() {
        h.finish(id).await;
    }
    assert_eq!(h.books.seen(), vec![0, 1, 2, 3, 7, 6, 5, 4]);
    // The queue emptied: back to FIFO.
    assert!(!h.queue.is_standing());
    for task in tasks {
        task.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn queued_requests_go_before_newcomers() {
    let h = Harness::new(QueueLayer::new(8, Duration::from_secs(10)), 2);
    let _a = h.call(0).await;
    let _b = h.call(1).await;
    let _c = h.call(2).await;
    assert_eq!(h.queue.depth(), 1);
    h.finish(0).await;
    let _d = h.call(3).await;
    assert_eq!(h.books.running(), vec![1, 2]);
    assert_eq!(h.queue.depth(), 1);
}

#[tokio::test(start_paused = true)]
async fn head_of_queue_timing_out_passes_the_turn_on() {
    let h = Harness::new(QueueLayer::new(8, 100 * MS), 1);
    let _busy = h.call(0).await;
    let first = h.call(1).await;
    tokio::time::advance(50 * MS).await;
    let second = h.call(2).await;
    tokio::time::advance(50 * MS).await;
    settle().await;
    assert!(first.await.unwrap().unwrap_err().is::<QueueTimeout>());
    h.finish(0).await;
    assert_eq!(h.books.running(), vec![2]);
    h.finish(2).await;
    assert_eq!(second.await.unwrap().unwrap(), 2);
}

#[test]
fn bad_configuration_is_refused_naming_the_field() {
    assert_eq!(QueueLayer::try_new(0, MS).unwrap_err().field(), "capacity");
    assert_eq!(
        QueueLayer::try_new(1, Duration::ZERO).unwrap_err().field(),
        "timeout"
    );
    let zero_target = Order::AdaptiveLifo {
        target: Duration::ZERO,
        interval: MS,
    };
    let err = QueueLayer::new(1, MS).try_order(zero_target).unwrap_err();
    assert_eq!(err.field(), "order.target");
    let panic = std::panic::catch_unwind(|| QueueLayer::new(0, MS)).unwrap_err();
    assert!(panic
        .downcast_ref::<String>()
        .unwrap()
        .contains("`capacity`"));
}

#[test]
fn services_and_futures_fit_axum() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    fn assert_send<T: Send + 'static>() {}
    assert_fits::<QueueLayer>();
    assert_fits::<Stack>();
    assert_send::<future::ResponseFuture<Stack, u64>>();
}

#[derive(Clone, Debug)]
enum Op {
    Call,
    Finish(usize, bool),
    Cancel(usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Call),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(i, ok)| Op::Finish(i, ok)),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (1u64..80).prop_map(Op::Advance),
    ]
}

/// Random interleavings of calls, completions, errors, cancellations and time.
fn check_invariants(ops: Vec<Op>, limit: usize, capacity: usize, order: Order) {
    const TIMEOUT: Duration = Duration::from_millis(100);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let queue = QueueLayer::new(capacity, TIMEOUT).order(order);
        let limit_layer = ConcurrencyLimitLayer::new(limit);
        let inner = Tracked::default();
        let books = inner.books.clone();
        let called_at: Arc<Mutex<HashMap<u64, Instant>>> = Default::default();
        let waits = Arc::new(Mutex::new(Vec::new()));
        let svc = {
            let called_at = called_at.clone();
            let waits = waits.clone();
            queue.layer(
                limit_layer.layer(
                    tower::util::MapRequestLayer::new(move |id: u64| {
                        let waited = called_at.lock().unwrap()[&id].elapsed();
                        waits.lock().unwrap().push(waited);
                        id
                    })
                    .layer(inner),
                ),
            )
        };
        let (qh, lh) = (queue.handle(), limit_layer.handle());
        let mut tasks: Vec<(u64, JoinHandle<Result<u64, BoxError>>)> = Vec::new();
        let mut cancelled = 0usize;
        let mut answers = 0usize;
        let mut next = 0u64;

        for op in ops {
            match op {
                Op::Call => {
                    called_at.lock().unwrap().insert(next, Instant::now());
                    tasks.push((next, tokio::spawn(svc.clone().oneshot(next))));
                    next += 1;
                }
                Op::Finish(i, ok) => {
                    let running = books.running();
                    if !running.is_empty() {
                        let end = if ok { End::Ok } else { End::Err };
                        books.finish(running[i % running.len()], end);
                    }
                }
                Op::Cancel(i) if !tasks.is_empty() => {
                    let (_, task) = tasks.swap_remove(i % tasks.len());
                    task.abort();
                    cancelled += 1;
                }
                Op::Cancel(_) => {}
                Op::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            }
            settle().await;
            let mut still = Vec::new();
            for (id, task) in tasks.drain(..) {
                if task.is_finished() {
                    let answer = task.await.unwrap();
                    if let Err(err) = &answer {
                        assert!(
                            err.is::<QueueFull>()
                                || err.is::<QueueTimeout>()
                                || err.to_string() == "inner failed",
                            "unexpected error for {id}: {err}"
                        );
                    }
                    answers += 1;
                } else {
                    still.push((id, task));
                }
            }
            tasks = still;
            assert!(lh.in_flight() <= limit);
            assert!(books.active() <= limit);
            assert!(qh.depth() <= capacity);
            // Work-conserving: nothing waits in the queue while a permit is free.
            assert!(
                qh.depth() == 0 || lh.in_flight() == limit,
                "{} queued with {} of {limit} permits taken",
                qh.depth(),
                lh.in_flight()
            );
            for waited in waits.lock().unwrap().iter() {
                assert!(*waited < TIMEOUT, "dispatched after waiting {waited:?}");
            }
        }

        // Wind down: finish whatever runs, let queued requests go or time out.
        for _ in 0..1_000 {
            if tasks.iter().all(|(_, t)| t.is_finished()) {
                break;
            }
            for id in books.running() {
                books.finish(id, End::Ok);
            }
            tokio::time::advance(10 * MS).await;
            settle().await;
        }
        for (id, task) in tasks {
            assert!(task.is_finished(), "request {id} never answered");
            task.await.unwrap().ok();
            answers += 1;
        }
        assert_eq!(
            answers + cancelled,
            next as usize,
            "every request answered or cancelled once"
        );
        assert_eq!(lh.in_flight(), 0);
        assert_eq!(lh.waiting(), 0);
        assert_eq!(qh.depth(), 0);
        assert_eq!(books.active(), 0);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn invariants_hold_under_random_interleavings(
        ops in prop::collection::vec(op(), 1..160),
        limit in 1usize..4,
        capacity in 1usize..6,
        order in prop_oneof![
            Just(Order::Fifo),
            Just(Order::Lifo),
            Just(Order::AdaptiveLifo { target: Duration::from_millis(5), interval: Duration::from_millis(30) }),
        ],
    ) {
        check_invariants(ops, limit, capacity, order);
    }
}

/// Metric handles are registered when a layer first makes a service or a
/// handle, so doing that under a local recorder is enough for the figures to
/// land in it.
#[tokio::test(start_paused = true)]
async fn metrics_report_depth_in_flight_waits_and_rejections_by_name() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let h = metrics::with_local_recorder(&recorder, || {
        Harness::new(QueueLayer::new(1, 100 * MS).name("api"), 1)
    });
    // The value of the sample that starts with `series`, as rendered.
    let value = |series: &str| -> Option<f64> {
        let text = prometheus.render();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    };

    let _busy = h.call(0).await;
    let queued = h.call(1).await;
    let full = h.call(2).await;
    assert!(full.await.unwrap().unwrap_err().is::<QueueFull>());
    assert_eq!(value(r#"tower_scale_in_flight{name="api"}"#), Some(1.0));
    assert_eq!(value(r#"tower_scale_limit{name="api"}"#), Some(1.0));
    assert_eq!(value(r#"tower_scale_queue_depth{name="api"}"#), Some(1.0));
    let full = r#"tower_scale_rejected_total{name="api",reason="queue_full"}"#;
    assert_eq!(value(full), Some(1.0));

    tokio::time::advance(100 * MS).await;
    settle().await;
    assert!(queued.await.unwrap().unwrap_err().is::<QueueTimeout>());
    let timeout = r#"tower_scale_rejected_total{name="api",reason="queue_timeout"}"#;
    assert_eq!(value(timeout), Some(1.0));
    assert_eq!(value(r#"tower_scale_queue_depth{name="api"}"#), Some(0.0));

    // A request that waits 30 ms and is dispatched records its wait.
    let waiting = h.call(3).await;
    tokio::time::advance(30 * MS).await;
    h.finish(0).await;
    assert_eq!(
        value(r#"tower_scale_queue_wait_seconds_count{name="api"}"#),
        Some(1.0)
    );
    let sum = value(r#"tower_scale_queue_wait_seconds_sum{name="api"}"#).unwrap();
    assert!((sum - 0.03).abs() < 1e-9, "{sum}");
    h.finish(3).await;
    waiting.await.unwrap().unwrap();
    assert_eq!(value(r#"tower_scale_in_flight{name="api"}"#), Some(0.0));
}
