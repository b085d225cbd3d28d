use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::sleep;
use tower::{service_fn, Layer, Service, ServiceExt};

use super::window::{bucket_bounds, bucket_of, BUCKETS};
use super::*;
use crate::registry::{
    InstanceInfo, InstanceRegistry, LoadFigures, MembershipStream, RegistryError, RegistryFuture,
};

// ---------------------------------------------------------------------------
// A fake registry: a fixed list of instances, or an error.

#[derive(Default)]
struct FakeRegistry {
    instances: Mutex<Vec<InstanceInfo>>,
    fail: AtomicBool,
    reads: AtomicU64,
}

impl FakeRegistry {
    fn set(&self, instances: Vec<InstanceInfo>) {
        *self.instances.lock().unwrap() = instances;
    }
}

impl InstanceRegistry for FakeRegistry {
    fn register(&self, _info: &InstanceInfo, _ttl: Duration) -> RegistryFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn heartbeat(&self, _info: &InstanceInfo, _ttl: Duration) -> RegistryFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn deregister(&self, _service: &str, _id: &str) -> RegistryFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn healthy(&self, service: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> {
        self.reads.fetch_add(1, SeqCst);
        let result = if self.fail.load(SeqCst) {
            Err(RegistryError::Unavailable("connection refused".to_owned()))
        } else {
            Ok(self
                .instances
                .lock()
                .unwrap()
                .iter()
                .filter(|i| i.service == service)
                .cloned()
                .collect())
        };
        Box::pin(async move { result })
    }

    fn remove_stale(&self, _service: &str) -> RegistryFuture<'_, usize> {
        Box::pin(async { Ok(0) })
    }

    fn watch(&self, _service: &str) -> MembershipStream {
        Box::pin(futures_util::stream::pending())
    }
}

fn instance(id: u16, load: LoadFigures) -> InstanceInfo {
    let addr = SocketAddr::from(([127, 0, 0, 1], 8000 + id));
    InstanceInfo {
        load,
        ..InstanceInfo::new("api", format!("api-{id}"), addr)
    }
}

fn load(in_flight: u64, limit: u64, queue_depth: u64, p95: f64) -> LoadFigures {
    LoadFigures {
        in_flight,
        limit,
        utilisation: if limit > 0 {
            (in_flight + queue_depth) as f64 / limit as f64
        } else {
            0.0
        },
        queue_depth,
        p95_latency_ms: p95,
        cpu: None,
        memory_bytes: None,
    }
}

fn assert_close(actual: f64, expected: f64, relative: f64) {
    assert!(
        (actual - expected).abs() <= expected.abs() * relative,
        "{actual} is not within {relative} of {expected}"
    );
}

// ---------------------------------------------------------------------------
// The latency window.

#[test]
fn every_bucket_holds_its_values_within_a_sixteenth() {
    let mut values: Vec<u64> = (0..5000).collect();
    let mut v = 5000u64;
    while v < (1 << 36) {
        values.extend([v - 1, v, v + 1, v + v / 3]);
        v = v * 3 / 2;
    }
    for v in values.into_iter().filter(|&v| v < 1 << 36) {
        let index = bucket_of(v);
        assert!(index < BUCKETS, "{v} -> {index}");
        let (lower, width) = bucket_bounds(index);
        assert!(
            lower <= v && v < lower + width,
            "{v} not in [{lower}, +{width})"
        );
        if v >= 16 {
            assert!(
                width * 16 <= lower,
                "bucket of {v} too wide: {width} at {lower}"
            );
        }
    }
    // Buckets are contiguous and ordered.
    for index in 1..BUCKETS {
        let (prev_lower, prev_width) = bucket_bounds(index - 1);
        assert_eq!(bucket_bounds(index).0, prev_lower + prev_width);
    }
    // Values past the last bucket land in it.
    assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
}

#[tokio::test(start_paused = true)]
async fn percentiles_of_a_uniform_series_are_within_three_percent() {
    let latency = LatencyHandle::new();
    assert_eq!(latency.p50(), None);
    assert_eq!(latency.summary().count, 0);
    for ms in 1..=1000 {
        latency.record(Duration::from_millis(ms));
    }
    let ms = |d: Option<Duration>| d.unwrap().as_secs_f64() * 1000.0;
    assert_close(ms(latency.p50()), 500.0, 0.032);
    assert_close(ms(latency.p95()), 950.0, 0.032);
    assert_close(ms(latency.p99()), 990.0, 0.032);
    assert_close(ms(latency.quantile(0.0)), 1.0, 0.032);
    assert_close(ms(latency.quantile(1.0)), 1000.0, 0.032);
    let summary = latency.summary();
    assert_eq!(summary.count, 1000);
    assert_eq!(summary.mean_ms, Some(500.5)); // the sum is exact
    assert_eq!(summary.p95_ms.unwrap(), latency.p95_ms());
}

#[tokio::test(start_paused = true)]
async fn the_window_drops_its_oldest_slice_whole() {
    // 30 s in 6 slices of 5 s.
    let latency = LatencyHandle::new();
    latency.record(Duration::from_millis(100)); // in slice 0, [0, 5 s)
    sleep(Duration::from_secs(12)).await;
    latency.record(Duration::from_millis(300)); // in slice 2, [10, 15 s)
    assert_eq!(latency.count(), 2);

    sleep(Duration::from_secs(17)).await; // 29 s: slice 5 is current, slice 0 still counts
    assert_eq!(latency.count(), 2);
    sleep(Duration::from_secs(1)).await; // 30 s: slice 6 reuses slice 0's place
    assert_eq!(latency.count(), 1);
    assert_close(latency.p50().unwrap().as_secs_f64(), 0.3, 0.032);

    // Recording into the reused place clears the old figures first.
    latency.record(Duration::from_millis(50));
    assert_eq!(latency.count(), 2);
    sleep(Duration::from_secs(15)).await; // 45 s: slice 9; slice 2 has gone
    assert_eq!(latency.count(), 1);
    sleep(Duration::from_secs(60)).await;
    assert_eq!(latency.count(), 0);
    assert_eq!(latency.p95_ms(), 0.0);
}

#[tokio::test(start_paused = true)]
async fn the_rate_is_over_the_time_the_window_covers() {
    let latency = LatencyHandle::try_with_window(Duration::from_secs(10), 10).unwrap();
    assert_eq!(latency.summary().rate_per_sec, 0.0);
    // One call at the start is one a second, not one over no time.
    latency.record(Duration::from_millis(5));
    assert_eq!(latency.summary().rate_per_sec, 1.0);
    sleep(Duration::from_millis(100)).await;
    // 10 calls a second for 4 s: the window covers 4 s.
    for _ in 0..39 {
        latency.record(Duration::from_millis(5));
        sleep(Duration::from_millis(100)).await;
    }
    assert_close(latency.summary().rate_per_sec, 10.0, 0.01);
    // 10 calls a second for 20 s more: the window covers 9 to 10 s of them.
    for _ in 0..200 {
        latency.record(Duration::from_millis(5));
        sleep(Duration::from_millis(100)).await;
    }
    assert_close(latency.summary().rate_per_sec, 10.0, 0.05);
}

#[test]
fn bad_window_shapes_name_their_field() {
    let field = |window, slices| {
        LatencyHandle::try_with_window(window, slices)
            .unwrap_err()
            .field()
    };
    assert_eq!(field(Duration::from_secs(10), 0), "slices");
    assert_eq!(field(Duration::from_secs(10), 2000), "slices");
    assert_eq!(field(Duration::from_micros(500), 1), "window");
    assert!(LatencyLayer::try_with_window(Duration::from_secs(60), 12).is_ok());
}

#[test]
#[should_panic(expected = "slices")]
fn with_window_panics_naming_the_field() {
    let _ = LatencyLayer::with_window(Duration::from_secs(10), 0);
}

#[test]
fn recorders_on_many_threads_lose_nothing() {
    // Outside a runtime the clock is the system's; the calls fall in one or
    // two slices of 5 s.
    let latency = LatencyHandle::new();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let latency = latency.clone();
            scope.spawn(move || {
                for i in 0..25_000u64 {
                    latency.record(Duration::from_micros(100 + (i + t) % 1000));
                }
            });
        }
    });
    assert_eq!(latency.count(), 100_000);
}

#[tokio::test(start_paused = true)]
async fn the_layer_records_completed_calls_and_not_dropped_ones() {
    let layer = LatencyLayer::new().name("api");
    let handle = layer.handle();
    let mut svc = layer.layer(service_fn(|ms: u64| async move {
        sleep(Duration::from_millis(ms)).await;
        if ms == 0 {
            Err("failed at once")
        } else {
            Ok(ms)
        }
    }));

    assert_eq!(svc.ready().await.unwrap().call(20).await, Ok(20));
    assert_eq!(
        svc.ready().await.unwrap().call(0).await,
        Err("failed at once")
    );
    let dropped = svc.ready().await.unwrap().call(1000);
    sleep(Duration::from_millis(10)).await;
    drop(dropped);

    assert_eq!(handle.count(), 2);
    assert_close(handle.quantile(1.0).unwrap().as_secs_f64(), 0.020, 0.032);
    assert!(handle.quantile(0.0).unwrap() < Duration::from_micros(1));
}

#[tokio::test(start_paused = true)]
async fn services_and_clones_of_one_layer_share_one_window() {
    let layer = LatencyLayer::with_window(Duration::from_secs(10), 5);
    let echo = || service_fn(|x: u32| async move { Ok::<_, Infallible>(x) });
    let a = layer.layer(echo());
    let b = layer.clone().layer(echo());
    let c = LatencyService::new(echo(), &layer.handle());
    for svc in [a.clone(), b, c, a] {
        svc.oneshot(1).await.unwrap();
    }
    assert_eq!(layer.handle().count(), 4);
    assert_eq!(layer.handle().window(), Duration::from_secs(10));
}

#[test]
fn services_fit_axum() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    type Echo = tower::util::ServiceFn<fn(u32) -> std::future::Ready<Result<u32, Infallible>>>;
    assert_fits::<LatencyLayer>();
    assert_fits::<LatencyService<Echo>>();
    assert_fits::<LatencyHandle>();
    assert_fits::<ScaleCollector>();
    assert_fits::<ScaleAdvisor>();
    #[cfg(feature = "http")]
    assert_fits::<ScaleService>();
}

// ---------------------------------------------------------------------------
// The snapshot.

#[tokio::test(start_paused = true)]
async fn the_collector_reads_every_handle_it_is_given() {
    use crate::breaker::{BreakerConfig, CircuitBreakerLayer};
    use crate::limit::ConcurrencyLimitLayer;
    use crate::queue::QueueLayer;

    let limit = ConcurrencyLimitLayer::new(4);
    let queue = QueueLayer::new(10, Duration::from_secs(5));
    let breaker = CircuitBreakerLayer::new(BreakerConfig::default());
    let latency = LatencyLayer::new();
    latency.handle().record(Duration::from_millis(30));
    let shed = Arc::new(AtomicU64::new(3));
    let collector = {
        let shed = shed.clone();
        ScaleMetrics::collector()
            .limit(limit.handle())
            .queue(queue.handle())
            .breaker(breaker.handle())
            .latency(latency.handle())
            .shed_count(move || shed.load(SeqCst))
            .breaker_rejections(|| 7)
    };

    // Two calls in flight in a limit of 4.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let svc = limit.layer(service_fn({
        let gate = gate.clone();
        move |_: ()| {
            let gate = gate.clone();
            async move {
                let _ = gate.acquire().await;
                Ok::<_, Infallible>(())
            }
        }
    }));
    let first = tokio::spawn(svc.clone().oneshot(()));
    let second = tokio::spawn(svc.clone().oneshot(()));
    tokio::task::yield_now().await;

    let metrics = collector.collect();
    assert_eq!(metrics.in_flight, Some(2));
    assert_eq!(metrics.limit, Some(4));
    assert_eq!(metrics.utilisation, Some(0.5));
    assert_eq!(metrics.queue_depth, Some(0));
    assert_eq!(metrics.queue_capacity, Some(10));
    assert_eq!(metrics.shed_total, Some(3));
    assert_eq!(metrics.queue_rejected_total, None);
    assert_eq!(metrics.breaker_rejected_total, Some(7));
    assert_eq!(metrics.breaker_state.as_deref(), Some("closed"));
    assert_eq!(metrics.breaker_failure_rate, Some(0.0));
    assert_eq!(metrics.breaker_denials, Some(0));
    assert_eq!(metrics.latency.unwrap().count, 1);
    assert_eq!(metrics.recommendation, None);

    let figures = metrics.load_figures();
    assert_eq!(
        (figures.in_flight, figures.limit, figures.queue_depth),
        (2, 4, 0)
    );
    assert_eq!(figures.utilisation, 0.5);
    assert_close(figures.p95_latency_ms, 30.0, 0.032);

    shed.store(5, SeqCst);
    gate.add_permits(2);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    let metrics = collector.collect();
    assert_eq!((metrics.in_flight, metrics.shed_total), (Some(0), Some(5)));
}

#[test]
fn a_collector_without_sources_gives_nulls() {
    let json = serde_json::to_value(ScaleMetrics::collector().collect()).unwrap();
    let object = json.as_object().unwrap();
    assert_eq!(object.len(), 14);
    assert!(object.values().all(serde_json::Value::is_null), "{json}");
    let figures = ScaleMetrics::default().load_figures();
    assert_eq!(figures, LoadFigures::default());
}

#[test]
fn the_snapshot_round_trips_through_json() {
    let latency = LatencySummary {
        count: 40,
        rate_per_sec: 2.5,
        mean_ms: Some(12.5),
        p50_ms: Some(12.032),
        p95_ms: Some(20.48),
        p99_ms: None,
    };
    let metrics = ScaleMetrics {
        in_flight: Some(3),
        limit: Some(8),
        utilisation: Some(0.375),
        breaker_state: Some("half_open".to_owned()),
        latency: Some(latency),
        ..ScaleMetrics::default()
    };
    let json = serde_json::to_string(&metrics).unwrap();
    let back: ScaleMetrics = serde_json::from_str(&json).unwrap();
    assert_eq!(back, metrics);
}

#[tokio::test]
async fn the_aggregate_sums_and_averages_the_healthy_instances() {
    let registry = FakeRegistry::default();
    let mut with_host = load(2, 0, 0, 10.0); // no limit reported
    with_host.cpu = Some(0.5);
    with_host.memory_bytes = Some(1000);
    let mut other = instance(9, load(100, 100, 0, 0.0));
    other.service = "other".to_owned();
    registry.set(vec![
        instance(1, load(8, 10, 2, 50.0)),  // utilisation 1.0
        instance(2, load(4, 20, 0, 150.0)), // utilisation 0.2
        instance(3, with_host),
        other,
    ]);

    let aggregate = ScaleMetrics::aggregate(&registry, "api").await.unwrap();
    assert_eq!(aggregate.service, "api");
    assert_eq!(aggregate.instances, 3);
    assert_eq!(aggregate.in_flight_total, 14);
    assert_close(aggregate.in_flight_mean.unwrap(), 14.0 / 3.0, 1e-12);
    assert_eq!(aggregate.capacity, 30);
    assert_eq!(aggregate.instances_with_limit, 2);
    assert_close(aggregate.utilisation_mean.unwrap(), 0.6, 1e-12);
    assert_eq!(aggregate.utilisation_max, Some(1.0));
    assert_eq!(aggregate.queue_depth_total, 2);
    assert_close(
        aggregate.queue_depth_per_instance.unwrap(),
        2.0 / 3.0,
        1e-12,
    );
    assert_close(aggregate.p95_latency_ms_mean.unwrap(), 70.0, 1e-12);
    assert_eq!(aggregate.p95_latency_ms_max, Some(150.0));
    assert_eq!(aggregate.cpu_mean, Some(0.5));
    assert_eq!(aggregate.memory_bytes_total, Some(1000));

    let observation = Observation::from(&aggregate);
    assert_eq!(observation.replicas, 3);
    assert_eq!(observation.utilisation, aggregate.utilisation_mean);

    // No instance: nothing to average.
    let empty = ScaleMetrics::aggregate(&registry, "nobody").await.unwrap();
    assert_eq!(empty.instances, 0);
    assert_eq!(empty.utilisation_mean, None);
    assert_eq!(empty.p95_latency_ms_max, None);
    assert_eq!(empty.memory_bytes_total, None);

    // The registry's error comes back, through a trait object.
    registry.fail.store(true, SeqCst);
    let shared: Arc<dyn InstanceRegistry> = Arc::new(registry);
    let err = ScaleMetrics::aggregate(&*shared, "api").await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)));
}

// ---------------------------------------------------------------------------
// The advisor: the HPA arithmetic.

fn advisor(configure: impl FnOnce(ScaleAdvisorBuilder) -> ScaleAdvisorBuilder) -> ScaleAdvisor {
    configure(ScaleAdvisor::builder()).build().unwrap()
}

/// An advisor with no stabilisation, to test the arithmetic alone.
fn bare(configure: impl FnOnce(ScaleAdvisorBuilder) -> ScaleAdvisorBuilder) -> ScaleAdvisor {
    advisor(|b| configure(b.scale_down_stabilisation(Duration::ZERO)))
}

fn util(replicas: u32, value: f64) -> Observation {
    Observation::new(replicas).utilisation(value)
}

#[tokio::test(start_paused = true)]
async fn metric_twice_the_target_doubles_and_half_halves() {
    // Kubernetes docs: 200m against 100m doubles; 50m against 100m halves.
    let advisor = bare(|b| b.queue_depth_per_instance(100.0));
    let queue = |replicas, value| Observation::new(replicas).queue_depth_per_instance(value);
    let up = advisor.observe(queue(4, 200.0));
    assert_eq!(
        (up.desired, up.proposed, up.reason),
        (8, 8, Reason::Metrics)
    );
    assert_eq!(
        (up.driver, up.ratio),
        (Some(Metric::QueueDepthPerInstance), Some(2.0))
    );
    let down = advisor.observe(queue(8, 50.0));
    assert_eq!((down.desired, down.reason), (4, Reason::Metrics));
}

#[tokio::test(start_paused = true)]
async fn the_hpa_walkthrough_goes_from_one_to_seven() {
    // Kubernetes HPA walkthrough: 305% CPU against 50% on 1 replica: ceil(6.1).
    let advisor = bare(|b| b.utilisation(0.5));
    assert_eq!(advisor.observe(util(1, 3.05)).desired, 7);
    // And rounding is up: 10 replicas at 0.9 against 0.7 is 12.86, so 13.
    let advisor = bare(|b| b.utilisation(0.7));
    assert_eq!(advisor.observe(util(10, 0.9)).desired, 13);
    // A ratio landing on a whole number is not pushed up by float noise:
    // 0.77 / 0.7 × 10 is 11.000000000000002 in floats.
    assert_eq!(advisor.observe(util(10, 0.77)).desired, 11);
}

#[tokio::test(start_paused = true)]
async fn ratios_within_the_tolerance_change_nothing() {
    let advisor = bare(|b| b.utilisation(0.7));
    for value in [0.64, 0.65, 0.7, 0.75, 0.76] {
        let advice = advisor.observe(util(10, value));
        assert_eq!(
            (advice.desired, advice.reason),
            (10, Reason::Tolerance),
            "{value}"
        );
    }
    // Just past 10% either way, it acts.
    assert_eq!(advisor.observe(util(10, 0.78)).desired, 12);
    assert_eq!(advisor.observe(util(10, 0.62)).desired, 9);

    // A tolerance of 0 acts on any difference; a wider one on fewer.
    let exact = bare(|b| b.utilisation(0.7).tolerance(0.0));
    assert_eq!(exact.observe(util(10, 0.72)).desired, 11);
    let wide = bare(|b| b.utilisation(0.7).tolerance(0.25));
    assert_eq!(wide.observe(util(10, 0.85)).desired, 10);
    assert_eq!(wide.observe(util(10, 0.9)).desired, 13);
}

#[tokio::test(start_paused = true)]
async fn the_highest_proposal_over_the_targets_wins() {
    let advisor = bare(|b| {
        b.utilisation(0.7)
            .queue_depth_per_instance(4.0)
            .p95_latency(Duration::from_millis(200))
    });
    let observation = Observation::new(6)
        .utilisation(0.84) // ceil(7.2) = 8
        .queue_depth_per_instance(6.0) // ceil(9) = 9
        .p95_latency_ms(180.0); // within tolerance: 6
    let advice = advisor.observe(observation);
    assert_eq!(advice.desired, 9);
    assert_eq!(advice.driver, Some(Metric::QueueDepthPerInstance));
    assert_eq!(advice.observation, observation);

    let advice = advisor.observe(
        Observation::new(6)
            .utilisation(0.35) // 3
            .queue_depth_per_instance(0.0) // 0
            .p95_latency_ms(400.0), // 12
    );
    assert_eq!(
        (advice.desired, advice.driver),
        (12, Some(Metric::P95LatencyMs))
    );

    // All below target: the least reduction wins.
    let advice = advisor.observe(
        Observation::new(6)
            .utilisation(0.35)
            .queue_depth_per_instance(1.0)
            .p95_latency_ms(50.0),
    );
    assert_eq!(
        (advice.desired, advice.driver),
        (3, Some(Metric::Utilisation))
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_metrics_sit_out_and_none_at_all_holds_the_last_recommendation() {
    let advisor = bare(|b| b.utilisation(0.5).p95_latency(Duration::from_millis(100)));
    // Latency unknown: utilisation alone decides.
    assert_eq!(advisor.observe(util(2, 1.0)).desired, 4);
    // Nothing known (or only nonsense): the last recommendation stands.
    let held = advisor.observe(Observation::new(4).utilisation(f64::NAN));
    assert_eq!((held.desired, held.reason), (4, Reason::NoMetrics));
    let held = advisor.observe(Observation::new(3));
    assert_eq!((held.desired, held.reason), (4, Reason::NoMetrics));
    assert_eq!(advisor.latest(), Some(held));
}

#[tokio::test(start_paused = true)]
async fn recommendations_stay_within_min_and_max() {
    let advisor = bare(|b| b.utilisation(0.5).min_replicas(3).max_replicas(8));
    let advice = advisor.observe(util(4, 2.0)); // 16
    assert_eq!(
        (advice.desired, advice.proposed, advice.reason),
        (8, 8, Reason::MaxReplicas)
    );
    let advice = advisor.observe(util(8, 0.05)); // 1
    assert_eq!((advice.desired, advice.reason), (3, Reason::MinReplicas));
    // Running outside the bounds is corrected even within tolerance.
    let advice = advisor.observe(util(12, 0.5));
    assert_eq!(advice.desired, 8);
    let advice = advisor.observe(util(1, 0.5));
    assert_eq!(advice.desired, 3);
}

#[tokio::test(start_paused = true)]
async fn with_no_instance_it_asks_for_the_minimum_and_at_least_one() {
    let advisor = bare(|b| b.utilisation(0.5).min_replicas(2));
    let advice = advisor.observe(util(0, 0.0));
    assert_eq!((advice.desired, advice.reason), (2, Reason::NoInstances));
    let to_zero = bare(|b| b.utilisation(0.5).min_replicas(0));
    assert_eq!(to_zero.observe(Observation::new(0)).desired, 1);
    assert_eq!(to_zero.observe(util(1, 0.0)).desired, 0);
}

/// A registry read that finds nobody (a Redis restarted empty) or only some
/// of the instances (they have not heartbeated again yet) does not drop the
/// recommendation: the scale-down window still holds it.
#[tokio::test(start_paused = true)]
async fn empty_and_partial_reads_do_not_skip_the_scale_down_window() {
    let advisor = advisor(|b| b.utilisation(0.7).max_replicas(20));
    assert_eq!(advisor.observe(util(5, 1.4)).desired, 10);
    tokio::time::advance(Duration::from_secs(15)).await;
    let empty = advisor.observe(Observation::new(0));
    assert_eq!((empty.desired, empty.reason), (10, Reason::NoInstances));
    tokio::time::advance(Duration::from_secs(15)).await;
    assert_eq!(
        advisor.observe(util(3, 0.7)).desired,
        10,
        "3 of 10 seen: held"
    );
    // Once the window has passed with lower proposals, it comes down.
    for _ in 0..25 {
        tokio::time::advance(Duration::from_secs(15)).await;
        advisor.observe(util(3, 0.7));
    }
    assert_eq!(advisor.observe(util(3, 0.7)).desired, 3);
    // At zero replicas (min 0), an empty read keeps it at zero.
    let to_zero = bare(|b| b.utilisation(0.5).min_replicas(0));
    assert_eq!(to_zero.observe(util(1, 0.0)).desired, 0);
    assert_eq!(
        to_zero.observe(Observation::new(0)).desired,
        0,
        "no flapping 0 -> 1 -> 0"
    );
}

// ---------------------------------------------------------------------------
// The advisor: stabilisation and cooldowns.

#[tokio::test(start_paused = true)]
async fn a_fresh_advisor_does_not_scale_down_at_its_first_reading() {
    let advisor = advisor(|b| b.utilisation(0.7));
    let advice = advisor.observe(util(10, 0.35));
    assert_eq!(
        (advice.desired, advice.proposed, advice.reason),
        (10, 5, Reason::ScaleDownStabilisation)
    );

    // Nor at its first reading with figures, after rounds without any.
    let advisor = self::advisor(|b| b.utilisation(0.7));
    assert_eq!(
        advisor.observe(Observation::new(10)).reason,
        Reason::NoMetrics
    );
    sleep(Duration::from_secs(15)).await;
    assert_eq!(advisor.observe(util(10, 0.35)).desired, 10);
}

#[tokio::test(start_paused = true)]
async fn scale_down_takes_the_highest_proposal_of_its_window() {
    let advisor = advisor(|b| {
        b.utilisation(0.5)
            .scale_down_stabilisation(Duration::from_secs(300))
    });
    // t = 0: 10 replicas, seeded; load says 8.
    assert_eq!(advisor.observe(util(10, 0.4)).desired, 10);
    sleep(Duration::from_secs(100)).await;
    // t = 100: load says 6; the window still holds 10 and 8.
    assert_eq!(advisor.observe(util(10, 0.3)).desired, 10);
    sleep(Duration::from_secs(100)).await;
    // t = 200: load says 9.
    assert_eq!(advisor.observe(util(10, 0.42)).desired, 10);
    sleep(Duration::from_secs(100)).await;
    // t = 300: the seed (10) and the proposal of t = 0 (8) leave the window;
    // the highest left is 9 (t = 200) over 6 (t = 100) and 5 now.
    let advice = advisor.observe(util(10, 0.25));
    assert_eq!((advice.desired, advice.proposed), (9, 5));
    assert_eq!(advice.reason, Reason::ScaleDownStabilisation);
    sleep(Duration::from_secs(200)).await;
    // t = 500: only 5 (t = 300) and now remain.
    let advice = advisor.observe(util(9, 0.25)); // ceil(4.5) = 5
    assert_eq!((advice.desired, advice.reason), (5, Reason::Metrics));
    // A rise is never held by the scale-down window.
    let advice = advisor.observe(util(5, 1.0));
    assert_eq!((advice.desired, advice.reason), (10, Reason::Metrics));
}

#[tokio::test(start_paused = true)]
async fn scale_up_takes_the_lowest_proposal_of_its_window() {
    let advisor = advisor(|b| {
        b.utilisation(0.5)
            .scale_up_stabilisation(Duration::from_secs(60))
            .scale_down_stabilisation(Duration::ZERO)
    });
    // t = 0: the seed (4) holds a rise to 8.
    let advice = advisor.observe(util(4, 1.0));
    assert_eq!(
        (advice.desired, advice.proposed, advice.reason),
        (4, 8, Reason::ScaleUpStabilisation)
    );
    sleep(Duration::from_secs(30)).await;
    // t = 30: 12 proposed; the lowest of the window is the seed, still 4.
    assert_eq!(advisor.observe(util(4, 1.5)).desired, 4);
    sleep(Duration::from_secs(30)).await;
    // t = 60: everything of t = 0 has left the window (the seed and 8); the
    // lowest left is 12 (t = 30), under 16 now.
    let advice = advisor.observe(util(4, 2.0));
    assert_eq!((advice.desired, advice.proposed), (12, 16));
    sleep(Duration::from_secs(60)).await;
    // t = 120: a sustained demand goes through whole.
    let advice = advisor.observe(util(12, 2.0 / 3.0 * 2.0)); // 12 × 1.333 / 0.5 = 32
    assert_eq!(advice.desired, 32);
    // A fall is never held by the scale-up window.
    assert_eq!(advisor.observe(util(32, 0.25)).desired, 16);
}

#[tokio::test(start_paused = true)]
async fn cooldowns_hold_a_change_after_the_last_one() {
    let advisor = advisor(|b| {
        b.utilisation(0.5)
            .scale_down_stabilisation(Duration::ZERO)
            .scale_up_cooldown(Duration::from_secs(60))
            .scale_down_cooldown(Duration::from_secs(180))
    });
    // t = 0: the first change is free.
    assert_eq!(advisor.observe(util(4, 1.0)).desired, 8);
    sleep(Duration::from_secs(30)).await;
    // t = 30: another rise waits for the scale-up cooldown.
    let advice = advisor.observe(util(8, 0.75));
    assert_eq!(
        (advice.desired, advice.proposed, advice.reason),
        (8, 12, Reason::ScaleUpCooldown)
    );
    sleep(Duration::from_secs(30)).await;
    // t = 60: it has passed.
    assert_eq!(advisor.observe(util(8, 0.75)).desired, 12);
    sleep(Duration::from_secs(100)).await;
    // t = 160: a fall waits for the scale-down cooldown, counted from t = 60.
    let advice = advisor.observe(util(12, 0.25));
    assert_eq!(
        (advice.desired, advice.reason),
        (12, Reason::ScaleDownCooldown)
    );
    sleep(Duration::from_secs(80)).await;
    // t = 240: it has passed.
    assert_eq!(advisor.observe(util(12, 0.25)).desired, 6);
    // Holding is not a change: the cooldown still counts from t = 240.
    sleep(Duration::from_secs(59)).await;
    assert_eq!(advisor.observe(util(6, 1.0)).desired, 6);
    sleep(Duration::from_secs(1)).await;
    assert_eq!(advisor.observe(util(6, 1.0)).desired, 12);
}

// ---------------------------------------------------------------------------
// The advisor: no flapping.

/// Feeds `demand` (in instance-loads at full utilisation) every 15 s to an
/// advisor whose recommendation the platform applies at once, and returns
/// the replicas over time.
async fn follow(advisor: &ScaleAdvisor, start: u32, demand: impl Iterator<Item = f64>) -> Vec<u32> {
    let mut replicas = start;
    let mut seen = vec![replicas];
    for demand in demand {
        replicas = advisor
            .observe(util(replicas, demand / f64::from(replicas)))
            .desired;
        seen.push(replicas);
        sleep(Duration::from_secs(15)).await;
    }
    seen
}

fn reversals(series: &[u32]) -> usize {
    let steps: Vec<i64> = series
        .windows(2)
        .map(|w| i64::from(w[1]) - i64::from(w[0]))
        .filter(|&step| step != 0)
        .collect();
    steps
        .windows(2)
        .filter(|w| w[0].signum() != w[1].signum())
        .count()
}

#[tokio::test(start_paused = true)]
async fn utilisation_alternating_within_tolerance_never_moves_replicas() {
    let advisor = advisor(|b| b.utilisation(0.7));
    for step in 0..200 {
        let value = if step % 2 == 0 { 0.65 } else { 0.75 };
        let advice = advisor.observe(util(10, value));
        assert_eq!(
            (advice.desired, advice.reason),
            (10, Reason::Tolerance),
            "step {step}"
        );
        sleep(Duration::from_secs(15)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn noise_beyond_tolerance_moves_replicas_once_and_not_back_and_forth() {
    // Demand swings ±20% around 7 instance-loads every 15 s, for an hour; the
    // target is 0.7, so 10 replicas is the mean's answer.
    let demand = || (0..240).map(|step| if step % 2 == 0 { 5.6 } else { 8.4 });

    let stable = advisor(|b| b.utilisation(0.7));
    let series = follow(&stable, 10, demand()).await;
    assert_eq!(reversals(&series), 0, "{series:?}");
    let changes = series.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(changes, 1, "{series:?}");
    assert_eq!(*series.last().unwrap(), 12); // enough for the peaks

    // The same series without a scale-down window flaps on every sample.
    let jumpy = bare(|b| b.utilisation(0.7));
    let series = follow(&jumpy, 10, demand()).await;
    assert!(reversals(&series) > 100, "{series:?}");
}

#[tokio::test(start_paused = true)]
async fn a_slow_swing_is_followed_without_oscillating() {
    // Demand rises from 2 to 20 and back over 2 hours, with noise.
    let demand = (0..480).map(|step: i32| {
        let phase = f64::from(step) / 480.0 * std::f64::consts::PI;
        let noise = if step % 3 == 0 { 0.9 } else { 1.05 };
        (2.0 + 18.0 * phase.sin()) * noise
    });
    let advisor = advisor(|b| b.utilisation(0.7).max_replicas(40));
    let series = follow(&advisor, 3, demand).await;
    // Up, then down: one turn.
    assert!(reversals(&series) <= 1, "{series:?}");
    assert!(series.iter().max().unwrap() >= &26, "{series:?}");
}

// ---------------------------------------------------------------------------
// The advisor: configuration, gauge, task.

#[test]
fn bad_config_names_the_field() {
    let field = |b: ScaleAdvisorBuilder| b.build().unwrap_err().field();
    let base = || ScaleAdvisor::builder().utilisation(0.7);
    assert_eq!(
        field(base().min_replicas(5).max_replicas(4)),
        "min_replicas"
    );
    assert_eq!(
        field(base().min_replicas(0).max_replicas(0)),
        "max_replicas"
    );
    assert_eq!(field(base().tolerance(-0.1)), "tolerance");
    assert_eq!(field(base().tolerance(f64::NAN)), "tolerance");
    assert_eq!(field(ScaleAdvisor::builder()), "targets");
    assert_eq!(field(base().utilisation(0.0)), "target.utilisation");
    assert_eq!(
        field(base().utilisation(f64::INFINITY)),
        "target.utilisation"
    );
    assert_eq!(
        field(base().queue_depth_per_instance(-1.0)),
        "target.queue_depth_per_instance"
    );
    assert_eq!(
        field(base().p95_latency(Duration::ZERO)),
        "target.p95_latency"
    );

    let err = base().min_replicas(5).max_replicas(4).build().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid `min_replicas`: must not exceed max_replicas (5 > 4)"
    );
    let ok = base()
        .min_replicas(4)
        .max_replicas(4)
        .tolerance(0.0)
        .build()
        .unwrap();
    assert_eq!(
        (ok.min_replicas(), ok.max_replicas(), ok.tolerance()),
        (4, 4, 0.0)
    );
    assert_eq!(ok.targets(), &[Target::Utilisation(0.7)]);
}

#[tokio::test(start_paused = true)]
async fn the_recommendation_is_the_desired_replicas_gauge() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let advisor = metrics::with_local_recorder(&recorder, || {
        ScaleAdvisor::builder()
            .name("api")
            .utilisation(0.5)
            .build()
            .unwrap()
    });
    advisor.observe(util(3, 1.0));
    let rendered = prometheus.render();
    assert!(
        rendered.contains(r#"tower_scale_desired_replicas{name="api"} 6"#),
        "{rendered}"
    );

    let mut changes = advisor.subscribe();
    advisor.observe(util(6, 1.0));
    assert!(changes.has_changed().unwrap());
    assert_eq!(changes.borrow_and_update().unwrap().desired, 12);
    assert!(prometheus
        .render()
        .contains(r#"tower_scale_desired_replicas{name="api"} 12"#));
}

#[tokio::test(start_paused = true)]
async fn the_task_polls_the_registry_and_ends_with_the_advisor() {
    let registry = Arc::new(FakeRegistry::default());
    registry.set(vec![
        instance(1, load(9, 10, 0, 80.0)),
        instance(2, load(7, 10, 0, 60.0)),
    ]);
    let advisor = advisor(|b| b.utilisation(0.5).max_replicas(10));
    let task = advisor.spawn(registry.clone(), "api", Duration::from_secs(15));
    assert!(advisor.latest().is_none()); // nothing runs before the task is polled

    tokio::task::yield_now().await; // the first round is at once
    let advice = advisor.latest().unwrap();
    assert_eq!((advice.current, advice.desired), (2, 4)); // ceil(2 × 0.8 / 0.5)

    // A registry error skips a round; the last recommendation stands.
    registry.fail.store(true, SeqCst);
    sleep(Duration::from_secs(15)).await;
    tokio::task::yield_now().await; // the task's tick is due at the same instant
    assert_eq!(registry.reads.load(SeqCst), 2);
    assert_eq!(advisor.latest(), Some(advice));

    registry.fail.store(false, SeqCst);
    registry.set(vec![
        instance(1, load(10, 10, 5, 80.0)),
        instance(2, load(10, 10, 5, 60.0)),
        instance(3, load(10, 10, 5, 60.0)),
        instance(4, load(10, 10, 5, 60.0)),
    ]);
    sleep(Duration::from_secs(15)).await;
    tokio::task::yield_now().await;
    let advice = advisor.latest().unwrap();
    assert_eq!((advice.current, advice.desired), (4, 10)); // 12, at most 10

    drop(advisor);
    sleep(Duration::from_secs(15)).await;
    tokio::task::yield_now().await;
    assert!(task.is_finished());
    assert_eq!(registry.reads.load(SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn an_aborted_task_keeps_the_last_recommendation() {
    let registry = Arc::new(FakeRegistry::default());
    registry.set(vec![instance(1, load(5, 10, 0, 10.0))]);
    let advisor = advisor(|b| b.utilisation(0.5));
    let task = advisor.spawn(registry.clone(), "api", Duration::from_secs(1));
    sleep(Duration::from_millis(1)).await;
    task.abort();
    sleep(Duration::from_secs(5)).await;
    assert!(task.is_finished());
    assert_eq!(registry.reads.load(SeqCst), 1);
    assert_eq!(advisor.latest().unwrap().reason, Reason::Tolerance);
}

// ---------------------------------------------------------------------------
// Capacity planning.

#[test]
fn the_plan_is_littles_law() {
    let plan = CapacityPlan::new(1000.0, Duration::from_millis(80), 10, 0.8);
    assert_eq!(plan.mean_in_flight, 80.0);
    assert_eq!(plan.instances, 10); // 80 / 8, exactly, not 11
    assert_eq!(plan.utilisation, 0.8);
    let plan = CapacityPlan::new(1001.0, Duration::from_millis(80), 10, 0.8);
    assert_eq!(plan.instances, 11);
    let idle = CapacityPlan::new(0.0, Duration::from_millis(80), 10, 0.8);
    assert_eq!((idle.instances, idle.utilisation), (0, 0.0));

    let field = |rate, c, u| {
        CapacityPlan::try_new(rate, Duration::from_millis(10), c, u)
            .unwrap_err()
            .field()
    };
    assert_eq!(field(-1.0, 1, 0.5), "rate_per_sec");
    assert_eq!(field(f64::NAN, 1, 0.5), "rate_per_sec");
    assert_eq!(field(1.0, 0, 0.5), "concurrency_per_instance");
    assert_eq!(field(1.0, 1, 0.0), "target_utilisation");
    assert_eq!(field(1.0, 1, 1.5), "target_utilisation");
}

/// The utilisation of each of `replicas` instances of concurrency `c` under
/// `rate` calls per second of `service_time` each: `λS / (N c)`.
fn simulated(rate: f64, service_time: Duration, c: u32, replicas: u32) -> f64 {
    rate * service_time.as_secs_f64() / (f64::from(replicas) * f64::from(c))
}

#[tokio::test(start_paused = true)]
async fn the_advisors_steady_state_is_the_capacity_plan() {
    let loads = [
        (50.0, 20u64, 4u32),
        (2000.0, 50, 16),
        (1234.5, 73, 8),
        (10_000.0, 5, 32),
        (333.0, 250, 64),
        (80.0, 1000, 10),
    ];
    for (rate, service_ms, c) in loads {
        for target in [0.5, 0.6, 0.7, 0.8, 0.9] {
            let service_time = Duration::from_millis(service_ms);
            let plan = CapacityPlan::new(rate, service_time, c, target);
            for start in [1u32, 3, 200] {
                let advisor = advisor(|b| {
                    b.utilisation(target)
                        .scale_down_stabilisation(Duration::from_secs(300))
                        .max_replicas(1000)
                });
                let mut replicas = start;
                // An hour of 15 s rounds, the platform applying each at once.
                for _ in 0..240 {
                    let u = simulated(rate, service_time, c, replicas);
                    replicas = advisor.observe(util(replicas, u)).desired;
                    sleep(Duration::from_secs(15)).await;
                }
                // From far away it lands on the plan exactly; from near, it
                // stays where the utilisation is within tolerance of the target.
                let settled = simulated(rate, service_time, c, replicas) / target;
                let case = format!(
                    "λ={rate} S={service_ms}ms c={c} U={target} from {start}: plan {}, advisor {replicas}",
                    plan.instances
                );
                if (simulated(rate, service_time, c, start) / target - 1.0).abs() > 0.1 {
                    assert_eq!(replicas, plan.instances.max(1), "{case}");
                } else {
                    assert!((settled - 1.0).abs() <= 0.1, "{case}");
                }
                // Either way it is steady: another round changes nothing.
                let u = simulated(rate, service_time, c, replicas);
                assert_eq!(
                    advisor.observe(util(replicas, u)).desired,
                    replicas,
                    "{case}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Serving the snapshot.

#[cfg(feature = "http")]
#[tokio::test(start_paused = true)]
async fn the_service_answers_the_snapshot_as_json() {
    let limit = crate::limit::ConcurrencyLimitLayer::new(8);
    let advisor = advisor(|b| b.utilisation(0.5));
    advisor.observe(util(2, 1.0));
    let svc = ScaleMetrics::collector()
        .limit(limit.handle())
        .advisor(advisor)
        .service();
    let response = svc.oneshot(::http::Request::new(())).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let json: serde_json::Value = serde_json::from_str(response.body()).unwrap();
    assert_eq!(json["in_flight"], 0);
    assert_eq!(json["limit"], 8);
    assert_eq!(json["utilisation"], 0.0);
    assert_eq!(json["queue_depth"], serde_json::Value::Null);
    assert_eq!(json["recommendation"]["desired"], 4);
    assert_eq!(json["recommendation"]["reason"], "metrics");
    assert_eq!(json["recommendation"]["driver"], "utilisation");
    assert_eq!(json["recommendation"]["observation"]["replicas"], 2);
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_handlers_return_the_snapshot_the_aggregate_and_the_recommendation() {
    use axum::{body::Body, routing::get, Router};
    use http_body_util::BodyExt;

    let latency = LatencyHandle::new();
    latency.record(Duration::from_millis(10));
    let collector = ScaleMetrics::collector().latency(latency);
    let registry: Arc<dyn InstanceRegistry> = Arc::new(FakeRegistry::default());
    let advisor = advisor(|b| b.utilisation(0.5));
    let recommendation = advisor.observe(util(1, 0.5));

    let app: Router = Router::new()
        .route("/scale", get(move || async move { collector.collect() }))
        .route(
            "/scale/cluster",
            get(move || async move {
                ScaleMetrics::aggregate(&*registry, "api")
                    .await
                    .map_err(|err| (::http::StatusCode::SERVICE_UNAVAILABLE, err.to_string()))
            }),
        )
        .route("/scale/advice", get(move || async move { recommendation }));

    async fn fetch(app: &Router, uri: &str) -> serde_json::Value {
        let response = app
            .clone()
            .oneshot(::http::Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }
    assert_eq!(fetch(&app, "/scale").await["latency"]["count"], 1);
    assert_eq!(fetch(&app, "/scale/cluster").await["instances"], 0);
    assert_eq!(fetch(&app, "/scale/advice").await["reason"], "tolerance");
}
