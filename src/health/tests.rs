use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use serde_json::Value;
use tower::{Service, ServiceExt};

use super::*;
use crate::drain::Drain;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// Lets spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

/// A check whose result the test switches, counting its runs.
#[derive(Clone, Default)]
struct Switch {
    failing: Arc<AtomicBool>,
    runs: Arc<AtomicUsize>,
}

impl Switch {
    fn failing() -> Self {
        let switch = Switch::default();
        switch.set_failing(true);
        switch
    }

    fn set_failing(&self, failing: bool) {
        self.failing.store(failing, SeqCst);
    }

    fn runs(&self) -> usize {
        self.runs.load(SeqCst)
    }

    fn check(
        &self,
    ) -> impl Fn() -> std::future::Ready<Result<(), std::io::Error>> + Send + Sync + 'static {
        let switch = self.clone();
        move || {
            switch.runs.fetch_add(1, SeqCst);
            std::future::ready(if switch.failing.load(SeqCst) {
                Err(std::io::Error::other("connection refused"))
            } else {
                Ok(())
            })
        }
    }
}

async fn call<S>(svc: &S) -> (StatusCode, Value, Response<String>)
where
    S: Service<Request<()>, Response = Response<String>, Error = std::convert::Infallible> + Clone,
{
    let response = svc
        .clone()
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();
    let json: Value = serde_json::from_str(response.body()).expect("the body is JSON");
    (response.status(), json, response)
}

#[tokio::test(start_paused = true)]
async fn a_failing_critical_check_turns_health_and_readiness_to_503() {
    let database = Switch::failing();
    let cache = Switch::default();
    let checks = HealthChecks::builder()
        .critical("database", SEC, database.check())
        .optional("cache", SEC, cache.check())
        .build()
        .unwrap();
    checks.spawn();
    settle().await;

    assert_eq!(database.runs(), 1);
    assert_eq!(checks.status(), Status::Fail);
    assert!(!checks.is_ready());
    let report = checks.report();
    assert_eq!(report.status(), Status::Fail);
    let db = report.check("database").unwrap();
    assert_eq!(db.status(), CheckStatus::Fail);
    assert_eq!(db.last_error(), Some("connection refused"));
    assert_eq!(db.consecutive_failures(), 1);
    assert_eq!(report.check("cache").unwrap().status(), CheckStatus::Pass);

    let (status, json, _) = call(&checks.health_service()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["status"], "fail");
    assert_eq!(json["checks"]["database"]["status"], "fail");
    assert_eq!(json["checks"]["database"]["critical"], true);
    assert_eq!(
        json["checks"]["database"]["last_error"],
        "connection refused"
    );

    let (status, json, _) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["ready"], false);
    assert_eq!(json["failing"], serde_json::json!(["database"]));
}

#[tokio::test(start_paused = true)]
async fn a_failing_optional_check_warns_and_stays_ready() {
    let database = Switch::default();
    let cache = Switch::failing();
    let checks = HealthChecks::builder()
        .critical("database", SEC, database.check())
        .optional("cache", SEC, cache.check())
        .build()
        .unwrap();
    checks.spawn();
    settle().await;

    assert_eq!(cache.runs(), 1);
    assert_eq!(checks.status(), Status::Warn);
    assert!(checks.is_ready());
    let (status, json, _) = call(&checks.health_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["status"], "warn");
    assert_eq!(json["checks"]["cache"]["status"], "fail");
    assert_eq!(json["checks"]["cache"]["critical"], false);
    assert_eq!(json["checks"]["database"]["status"], "pass");
    let (status, json, _) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["ready"], true);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_check_is_cut_at_its_timeout_and_never_blocks_the_report() {
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    struct CountDrop(Arc<AtomicUsize>);
    impl Drop for CountDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, SeqCst);
        }
    }
    let checks = HealthChecks::builder()
        .interval(10 * SEC)
        .critical("hangs", SEC, {
            let (started, dropped) = (started.clone(), dropped.clone());
            move || {
                started.fetch_add(1, SeqCst);
                let guard = CountDrop(dropped.clone());
                async move {
                    let _guard = guard;
                    std::future::pending::<Result<(), std::io::Error>>().await
                }
            }
        })
        .optional("fine", SEC, || async { Ok::<_, std::io::Error>(()) })
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    checks.spawn();
    settle().await;

    // The run hangs: the probes answer at once from what is stored.
    assert_eq!(started.load(SeqCst), 1);
    let (status, json, _) = call(&checks.health_service()).await;
    assert_eq!(tokio::time::Instant::now(), t0, "the probe did not wait");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["checks"]["hangs"]["status"], "pending");
    assert_eq!(json["checks"]["hangs"]["latency_ms"], Value::Null);
    assert_eq!(json["checks"]["fine"]["status"], "pass", "other checks run");

    tokio::time::advance(999 * MS).await;
    settle().await;
    assert_eq!(
        checks.report().check("hangs").unwrap().status(),
        CheckStatus::Pending
    );
    tokio::time::advance(MS).await;
    settle().await;

    let report = checks.report();
    let hangs = report.check("hangs").unwrap();
    assert_eq!(hangs.status(), CheckStatus::Fail);
    assert_eq!(hangs.last_error(), Some("timed out after 1s"));
    assert_eq!(hangs.latency(), Some(SEC));
    assert_eq!(dropped.load(SeqCst), 1, "the hanging future was dropped");
    let (status, json, _) = call(&checks.health_service()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["checks"]["hangs"]["last_error"], "timed out after 1s");
    assert_eq!(json["checks"]["hangs"]["latency_ms"], 1000.0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_check_is_reported_failed_and_runs_again() {
    let runs = Arc::new(AtomicUsize::new(0));
    let checks = HealthChecks::builder()
        .interval(SEC)
        .critical("panics", SEC, {
            let runs = runs.clone();
            move || {
                let run = runs.fetch_add(1, SeqCst);
                async move {
                    match run {
                        0 => panic!("boom"),
                        _ => Ok::<_, std::io::Error>(()),
                    }
                }
            }
        })
        .optional(
            "closure_panics",
            SEC,
            || -> std::future::Ready<Result<(), std::io::Error>> { panic!("closure boom") },
        )
        .build()
        .unwrap();
    let task = checks.spawn();
    settle().await;

    let report = checks.report();
    let panics = report.check("panics").unwrap();
    assert_eq!(panics.status(), CheckStatus::Fail);
    assert_eq!(panics.last_error(), Some("panicked: boom"));
    assert_eq!(
        report.check("closure_panics").unwrap().last_error(),
        Some("panicked: closure boom")
    );
    assert!(!task.is_finished());

    tokio::time::advance(SEC).await;
    settle().await;
    assert_eq!(runs.load(SeqCst), 2, "the loop kept running");
    assert_eq!(
        checks.report().check("panics").unwrap().status(),
        CheckStatus::Pass
    );
    assert!(checks.is_ready());
    let closure = checks.report();
    let closure = closure.check("closure_panics").unwrap();
    assert_eq!(closure.consecutive_failures(), 2);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_503_once_the_drain_starts_while_health_follows_the_checks() {
    let drain = Drain::new();
    let checks = HealthChecks::builder()
        .critical("database", SEC, || async { Ok::<_, std::io::Error>(()) })
        .drain(&drain)
        .build()
        .unwrap();
    checks.spawn();
    settle().await;
    assert!(checks.is_ready());
    let (status, json, _) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["draining"], false);

    drain.start();
    assert!(checks.is_draining());
    assert!(!checks.is_ready());
    let (status, json, _) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["ready"], false);
    assert_eq!(json["draining"], true);
    assert_eq!(json["failing"], serde_json::json!([]));

    let (status, json, _) = call(&checks.health_service()).await;
    assert_eq!(status, StatusCode::OK, "draining is not unhealthy");
    assert_eq!(json["status"], "pass");
    assert_eq!(json["draining"], true);
    let (status, _, _) = call(&checks.liveness_service()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_failing_check_recovers_when_it_passes_again() {
    let database = Switch::failing();
    let checks = HealthChecks::builder()
        .interval(5 * SEC)
        .critical("database", SEC, database.check())
        .build()
        .unwrap();
    checks.spawn();
    settle().await;
    tokio::time::advance(5 * SEC).await;
    settle().await;
    assert_eq!(database.runs(), 2);
    let report = checks.report();
    assert_eq!(report.check("database").unwrap().consecutive_failures(), 2);
    assert!(!checks.is_ready());

    database.set_failing(false);
    tokio::time::advance(5 * SEC).await;
    settle().await;
    assert_eq!(database.runs(), 3);
    assert!(checks.is_ready());
    assert_eq!(checks.status(), Status::Pass);
    let report = checks.report();
    let db = report.check("database").unwrap();
    assert_eq!(db.status(), CheckStatus::Pass);
    assert_eq!(db.last_error(), None);
    assert_eq!(db.consecutive_failures(), 0);
    let (status, json, _) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["ready"], true);

    // And down again: the counts follow every transition.
    database.set_failing(true);
    tokio::time::advance(5 * SEC).await;
    settle().await;
    assert!(!checks.is_ready());
    assert_eq!(checks.status(), Status::Fail);
}

#[tokio::test(start_paused = true)]
async fn checks_run_at_once_then_every_interval() {
    let fast = Switch::default();
    let slow = Switch::default();
    let checks = HealthChecks::builder()
        .interval(5 * SEC)
        .critical("fast", SEC, fast.check())
        .optional("slow", SEC, slow.check())
        .build()
        .unwrap();
    assert_eq!(checks.interval(), 5 * SEC);
    settle().await;
    assert_eq!(fast.runs(), 0, "nothing runs before spawn");

    checks.spawn();
    settle().await;
    assert_eq!(fast.runs(), 1);
    tokio::time::advance(4999 * MS).await;
    settle().await;
    assert_eq!(fast.runs(), 1);
    tokio::time::advance(MS).await;
    settle().await;
    assert_eq!(fast.runs(), 2);

    // 60 s of simulated time: one run every 5 s.
    tokio::time::sleep(60 * SEC).await;
    settle().await;
    assert_eq!(fast.runs(), 14);
    assert_eq!(slow.runs(), 14);
    let checked_ago = checks.report().check("fast").unwrap().checked_ago();
    assert_eq!(checked_ago, Some(Duration::ZERO));
    tokio::time::advance(2 * SEC).await;
    let checked_ago = checks.report().check("fast").unwrap().checked_ago();
    assert_eq!(checked_ago, Some(2 * SEC));
}

#[tokio::test(start_paused = true)]
async fn a_slow_run_delays_its_own_next_run_and_no_other() {
    let runs = Arc::new(AtomicUsize::new(0));
    let other = Switch::default();
    let checks = HealthChecks::builder()
        .interval(SEC)
        .critical("slow", 10 * SEC, {
            let runs = runs.clone();
            move || {
                runs.fetch_add(1, SeqCst);
                async {
                    tokio::time::sleep(2500 * MS).await;
                    Ok::<_, std::io::Error>(())
                }
            }
        })
        .critical("other", SEC, other.check())
        .build()
        .unwrap();
    checks.spawn();
    settle().await;
    // Runs of `slow` start at 0, 3 and 6 s (skipping the ticks they span);
    // `other` runs every second.
    tokio::time::sleep(6 * SEC + 100 * MS).await;
    settle().await;
    assert_eq!(runs.load(SeqCst), 3);
    assert_eq!(other.runs(), 7);
    let report = checks.report();
    assert_eq!(report.check("slow").unwrap().latency(), Some(2500 * MS));
}

#[tokio::test(start_paused = true)]
async fn not_ready_until_every_critical_check_has_a_result() {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let checks = HealthChecks::builder()
        .critical("slow_start", 10 * SEC, move || {
            let mut rx = rx.clone();
            async move { rx.wait_for(|go| *go).await.map(|_| ()) }
        })
        .build()
        .unwrap();
    assert!(!checks.is_ready(), "not ready before spawn");
    let readiness = checks.readiness();
    assert_eq!(readiness.pending(), ["slow_start".to_owned()]);
    assert!(!readiness.is_ready());
    assert_eq!(checks.report().status(), Status::Fail);

    checks.spawn();
    settle().await;
    let (status, json, _) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json["pending"], serde_json::json!(["slow_start"]));

    tx.send(true).unwrap();
    settle().await;
    assert!(checks.is_ready());
    assert_eq!(checks.readiness().pending(), [] as [String; 0]);
    let (status, _, _) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn no_checks_means_ready_and_passing_until_the_drain() {
    let drain = Drain::new();
    let checks = HealthChecks::builder().drain(&drain).build().unwrap();
    assert!(checks.is_ready());
    assert_eq!(checks.status(), Status::Pass);
    let (status, json, _) = call(&checks.health_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json["checks"], serde_json::json!({}));
    drain.start();
    assert!(!checks.is_ready());
}

#[tokio::test(start_paused = true)]
async fn spawning_twice_starts_one_loop() {
    let database = Switch::default();
    let checks = HealthChecks::builder()
        .interval(SEC)
        .critical("database", SEC, database.check())
        .build()
        .unwrap();
    let first = checks.spawn();
    let second = checks.clone().spawn();
    settle().await;
    assert_eq!(database.runs(), 1);
    tokio::time::advance(SEC).await;
    settle().await;
    assert_eq!(database.runs(), 2);

    // Aborting either handle stops the one loop; a later spawn starts again.
    second.abort();
    settle().await;
    assert!(first.is_finished());
    tokio::time::advance(3 * SEC).await;
    settle().await;
    assert_eq!(database.runs(), 2, "aborted");
    assert!(checks.is_ready(), "the last results stay");
    let third = checks.spawn();
    settle().await;
    assert!(!third.is_finished());
    assert_eq!(database.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_loop_ends_when_every_handle_is_dropped() {
    let database = Switch::default();
    let checks = HealthChecks::builder()
        .interval(SEC)
        .critical("database", SEC, database.check())
        .build()
        .unwrap();
    let service = checks.health_service();
    let task = checks.spawn();
    settle().await;
    drop(checks);
    tokio::time::advance(SEC).await;
    settle().await;
    assert_eq!(database.runs(), 2, "a service keeps the checks alive");
    assert!(!task.is_finished());

    drop(service);
    tokio::time::advance(SEC).await;
    settle().await;
    assert!(task.is_finished());
    assert_eq!(database.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn services_answer_json_with_the_right_headers() {
    let checks = HealthChecks::builder()
        .critical("database", SEC, || async { Ok::<_, std::io::Error>(()) })
        .optional("cache", SEC, || async { Err::<(), _>("cache down") })
        .build()
        .unwrap();
    checks.spawn();
    settle().await;

    let (status, json, response) = call(&checks.health_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(json["status"], "warn");
    assert_eq!(json["draining"], false);
    let database = &json["checks"]["database"];
    assert_eq!(database["status"], "pass");
    assert_eq!(database["latency_ms"], 0.0);
    assert_eq!(database["last_error"], Value::Null);
    assert_eq!(database["checked_ago_ms"], 0.0);
    assert_eq!(database["consecutive_failures"], 0);
    assert_eq!(json["checks"]["cache"]["last_error"], "cache down");
    assert_eq!(json["checks"]["cache"]["consecutive_failures"], 1);
    // Registration order.
    let body = response.body();
    assert!(body.find("\"database\"").unwrap() < body.find("\"cache\"").unwrap());
    assert_eq!(json["checks"].as_object().unwrap().len(), 2);
    assert_eq!(response.body(), &checks.report().to_json());

    let (status, json, response) = call(&checks.readiness_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(
        json,
        serde_json::json!({"ready": true, "draining": false, "failing": [], "pending": []})
    );

    let (status, json, response) = call(&checks.liveness_service()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(json, serde_json::json!({"status": "pass"}));
}

#[test]
fn errors_keep_their_source_chain() {
    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("ping failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let err = Outer(std::io::Error::other("connection refused"));
    assert_eq!(check::render(err.into()), "ping failed: connection refused");
    // A source already in the message is not repeated.
    #[derive(Debug)]
    struct Repeats(std::io::Error);
    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "ping failed: {}", self.0)
        }
    }
    impl std::error::Error for Repeats {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    let err = Repeats(std::io::Error::other("connection refused"));
    assert_eq!(check::render(err.into()), "ping failed: connection refused");
}

#[test]
fn bad_settings_fail_at_build_naming_the_field() {
    let ok = || async { Ok::<_, std::io::Error>(()) };
    let err = HealthChecks::builder()
        .interval(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "interval");

    let err = HealthChecks::builder()
        .critical("database", SEC, ok)
        .optional("database", SEC, ok)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "checks");
    assert!(err.reason().contains("database"), "{err}");

    let err = HealthChecks::builder()
        .critical("", SEC, ok)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "checks");

    let err = HealthChecks::builder()
        .critical("database", SEC, ok)
        .optional("cache", Duration::ZERO, ok)
        .build()
        .unwrap_err();
    assert_eq!(err.field(), "checks.timeout");
    assert!(err.reason().contains("\"cache\""), "{err}");

    assert!(HealthChecks::builder()
        .critical("database", SEC, ok)
        .optional("cache", MS, ok)
        .build()
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_gauge_follows_each_check() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let value = |series: &str| -> Option<f64> {
        prometheus
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    };
    let database = Switch::default();
    let cache = Switch::failing();
    let checks = HealthChecks::builder()
        .interval(SEC)
        .critical("database", SEC, database.check())
        .optional("cache", SEC, cache.check())
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || checks.spawn());
    settle().await;
    let database_gauge = r#"tower_scale_health_check{name="database"}"#;
    let cache_gauge = r#"tower_scale_health_check{name="cache"}"#;
    assert_eq!(value(database_gauge), Some(1.0));
    assert_eq!(value(cache_gauge), Some(0.0));

    cache.set_failing(false);
    database.set_failing(true);
    tokio::time::advance(SEC).await;
    settle().await;
    assert_eq!(value(database_gauge), Some(0.0));
    assert_eq!(value(cache_gauge), Some(1.0));
}

#[test]
fn everything_fits_axum() {
    fn assert_fits<T: Clone + Send + Sync + 'static>() {}
    fn assert_send<T: Send + Sync + 'static>() {}
    assert_fits::<HealthChecks>();
    assert_fits::<HealthService>();
    assert_fits::<ReadinessService>();
    assert_fits::<LivenessService>();
    assert_fits::<HealthTask>();
    assert_fits::<HealthReport>();
    assert_fits::<Readiness>();
    assert_send::<HealthChecksBuilder>();
}

#[cfg(feature = "axum")]
mod router {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use http_body_util::BodyExt;

    use super::*;

    async fn get_json(app: &Router, uri: &str) -> (StatusCode, Value) {
        let response = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE].clone();
        assert_eq!(content_type, "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn handlers_and_services_answer_in_a_router() {
        let drain = Drain::new();
        let database = Switch::default();
        let checks = HealthChecks::builder()
            .interval(SEC)
            .critical("database", SEC, database.check())
            .drain(&drain)
            .build()
            .unwrap();
        checks.spawn();
        let report = checks.clone();
        let ready = checks.clone();
        let app: Router = Router::new()
            .route("/health", get(move || async move { report.report() }))
            .route("/ready", get(move || async move { ready.readiness() }))
            .route_service("/health2", checks.health_service())
            .route_service("/ready2", checks.readiness_service())
            .route_service("/live", checks.liveness_service());
        settle().await;

        for uri in ["/health", "/health2"] {
            let (status, json) = get_json(&app, uri).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert_eq!(json["checks"]["database"]["status"], "pass", "{uri}");
        }
        database.set_failing(true);
        tokio::time::advance(SEC).await;
        settle().await;
        for uri in ["/health", "/health2", "/ready", "/ready2"] {
            let (status, _) = get_json(&app, uri).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        }
        database.set_failing(false);
        tokio::time::advance(SEC).await;
        settle().await;
        drain.start();
        for uri in ["/ready", "/ready2"] {
            let (status, json) = get_json(&app, uri).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
            assert_eq!(json["draining"], true, "{uri}");
        }
        let (status, _) = get_json(&app, "/live").await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = get_json(&app, "/health").await;
        assert_eq!(status, StatusCode::OK);
    }
}
