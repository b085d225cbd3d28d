use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::time::advance;
use tower::discover::Change;
use tower::{service_fn, BoxError, Service, ServiceExt};

use super::*;
use crate::breaker::{BreakerConfig, State};
use crate::discover::{Endpoint, Static, StaticHandle, Weight};

const SEC: Duration = Duration::from_secs(1);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Probe outcomes set by the test, and how many probes each endpoint got.
#[derive(Clone, Default)]
struct Probes {
    down: Arc<Mutex<HashMap<SocketAddr, bool>>>,
    counts: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

impl Probes {
    fn set_down(&self, addr: SocketAddr, down: bool) {
        self.down.lock().unwrap().insert(addr, down);
    }

    fn count(&self, addr: SocketAddr) -> usize {
        self.counts.lock().unwrap().get(&addr).copied().unwrap_or(0)
    }

    fn probe(&self) -> impl Probe {
        let this = self.clone();
        move |addr: SocketAddr| {
            *this.counts.lock().unwrap().entry(addr).or_default() += 1;
            let down = this
                .down
                .lock()
                .unwrap()
                .get(&addr)
                .copied()
                .unwrap_or(false);
            async move {
                if down {
                    Err("down")
                } else {
                    Ok(())
                }
            }
        }
    }
}

type Source = Static<fn(&Endpoint) -> SocketAddr, SocketAddr>;
type Checked = HealthChecked<Source, Box<dyn Probe>>;

fn config() -> HealthCheckConfigBuilder {
    HealthCheckConfig::builder()
        .interval(SEC)
        .timeout(Duration::from_millis(100))
        .unhealthy_threshold(3)
        .healthy_threshold(2)
}

impl Probe for Box<dyn Probe> {
    fn probe(&self, addr: SocketAddr) -> ProbeFuture {
        (**self).probe(addr)
    }
}

fn checked(
    ports: &[u16],
    probes: &Probes,
    config: HealthCheckConfigBuilder,
) -> (Checked, StaticHandle) {
    let make: fn(&Endpoint) -> SocketAddr = |e| e.addr();
    let (source, handle) = Static::new(ports.iter().map(|p| addr(*p)), make);
    let probe: Box<dyn Probe> = Box::new(probes.probe());
    (
        HealthChecked::new(source, probe, config.build().unwrap()),
        handle,
    )
}

/// Lets the probe tasks run, then takes every change the stream has ready, as
/// `+port` (insert) and `-port` (remove).
async fn changes(stream: &mut Checked) -> Vec<String> {
    let mut out = Vec::new();
    let mut idle = 0;
    while idle < 2 {
        let mut got = false;
        while let Some(Some(Ok(change))) = stream.next().now_or_never() {
            got = true;
            out.push(match change {
                Change::Insert(addr, svc) => {
                    assert_eq!(*svc.get_ref(), addr);
                    format!("+{}", addr.port())
                }
                Change::Remove(addr) => format!("-{}", addr.port()),
            });
        }
        settle().await;
        idle = if got { 0 } else { idle + 1 };
    }
    out
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// Advances the clock by one interval and collects the changes.
async fn tick(stream: &mut Checked) -> Vec<String> {
    advance(SEC).await;
    changes(stream).await
}

#[tokio::test(start_paused = true)]
async fn thresholds_are_exact() {
    let probes = Probes::default();
    let (mut stream, _handle) = checked(&[1, 2, 3], &probes, config());
    let mut first = changes(&mut stream).await;
    first.sort();
    assert_eq!(first, ["+1", "+2", "+3"]);
    assert_eq!(probes.count(addr(1)), 1, "probed at once");

    probes.set_down(addr(1), true);
    assert!(tick(&mut stream).await.is_empty(), "1 failure");
    assert!(tick(&mut stream).await.is_empty(), "2 failures");
    assert_eq!(tick(&mut stream).await, ["-1"], "3 failures");
    assert_eq!(stream.is_healthy(addr(1)), Some(false));

    probes.set_down(addr(1), false);
    assert!(tick(&mut stream).await.is_empty(), "1 success");
    assert_eq!(tick(&mut stream).await, ["+1"], "2 successes");
    assert_eq!(stream.is_healthy(addr(1)), Some(true));
}

#[tokio::test(start_paused = true)]
async fn a_result_that_agrees_with_the_state_resets_the_streak() {
    let probes = Probes::default();
    let (mut stream, _handle) = checked(&[1, 2, 3], &probes, config());
    changes(&mut stream).await;
    for down in [true, true, false, true, true, false, true, true] {
        probes.set_down(addr(1), down);
        assert!(tick(&mut stream).await.is_empty());
    }
    assert_eq!(stream.is_healthy(addr(1)), Some(true));
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_times_out_fails() {
    let (source, _handle) = Static::new([addr(1), addr(2)], |e: &Endpoint| e.addr());
    let probe = |_: SocketAddr| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<(), BoxError>(())
    };
    let config = config()
        .unhealthy_threshold(1)
        .panic_threshold(1.0)
        .build()
        .unwrap();
    let mut stream = HealthChecked::new(source, probe, config);
    let mut seen = Vec::new();
    let mut drain = |stream: &mut HealthChecked<_, _>| {
        while let Some(Some(Ok(change))) = stream.next().now_or_never() {
            seen.push(matches!(change, Change::Insert(..)));
        }
        seen.clone()
    };
    assert_eq!(drain(&mut stream), [true, true]);
    settle().await;
    advance(Duration::from_millis(99)).await;
    settle().await;
    assert_eq!(drain(&mut stream).len(), 2, "not yet timed out");
    advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(drain(&mut stream), [true, true, false, false]);
    assert_eq!(stream.is_healthy(addr(1)), Some(false));
}

#[tokio::test(start_paused = true)]
async fn the_panic_threshold_keeps_routing_to_every_endpoint() {
    let probes = Probes::default();
    let config = config()
        .unhealthy_threshold(1)
        .healthy_threshold(1)
        .panic_threshold(0.5);
    let (mut stream, _handle) = checked(&[1, 2, 3, 4], &probes, config);
    assert_eq!(changes(&mut stream).await.len(), 4);

    probes.set_down(addr(1), true);
    assert_eq!(tick(&mut stream).await, ["-1"]);
    probes.set_down(addr(2), true);
    assert_eq!(
        tick(&mut stream).await,
        ["-2"],
        "2 of 4 is not more than half"
    );
    assert!(!stream.in_panic());

    probes.set_down(addr(3), true);
    let mut back = tick(&mut stream).await;
    back.sort();
    assert_eq!(back, ["+1", "+2"], "3 of 4: route to all");
    assert!(stream.in_panic());

    probes.set_down(addr(3), false);
    let mut out = tick(&mut stream).await;
    out.sort();
    assert_eq!(out, ["-1", "-2"], "2 of 4 again: the unhealthy leave");
    assert!(!stream.in_panic());
}

#[tokio::test(start_paused = true)]
async fn a_removed_endpoint_is_no_longer_probed_and_a_dropped_stream_stops_all() {
    let probes = Probes::default();
    let (mut stream, handle) = checked(&[1, 2, 3], &probes, config());
    changes(&mut stream).await;
    tick(&mut stream).await;
    assert_eq!(probes.count(addr(1)), 2);

    handle.remove(addr(1));
    assert_eq!(changes(&mut stream).await, ["-1"]);
    for _ in 0..3 {
        tick(&mut stream).await;
    }
    assert_eq!(probes.count(addr(1)), 2);
    assert_eq!(probes.count(addr(2)), 5);

    drop(stream);
    for _ in 0..3 {
        advance(SEC).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(probes.count(addr(2)), 5);
}

#[tokio::test(start_paused = true)]
async fn a_re_added_endpoint_starts_over() {
    let probes = Probes::default();
    let (mut stream, handle) = checked(&[1, 2, 3], &probes, config().unhealthy_threshold(1));
    changes(&mut stream).await;
    probes.set_down(addr(1), true);
    assert_eq!(tick(&mut stream).await, ["-1"]);

    // Removed while unhealthy: nothing to remove downstream.
    handle.remove(addr(1));
    assert!(changes(&mut stream).await.is_empty());
    assert_eq!(stream.is_healthy(addr(1)), None);

    probes.set_down(addr(1), false);
    handle.add(addr(1));
    assert_eq!(
        changes(&mut stream).await,
        ["+1"],
        "healthy until proven otherwise"
    );
    assert_eq!(stream.is_healthy(addr(1)), Some(true));
    let before = probes.count(addr(1));
    tick(&mut stream).await;
    assert_eq!(probes.count(addr(1)), before + 1);
}

#[tokio::test(start_paused = true)]
async fn initially_unhealthy_endpoints_join_after_the_healthy_threshold() {
    let probes = Probes::default();
    let config = config().initially_healthy(false).panic_threshold(1.0);
    let (mut stream, _handle) = checked(&[1, 2], &probes, config);
    assert!(changes(&mut stream).await.is_empty(), "1 good probe of 2");
    let mut joined = tick(&mut stream).await;
    joined.sort();
    assert_eq!(joined, ["+1", "+2"]);
}

/// With the default panic threshold too: a new set that starts unhealthy is
/// not a reason to panic, so nothing joins before its healthy threshold; a set
/// whose probes all fail once checked does panic.
#[tokio::test(start_paused = true)]
async fn initially_unhealthy_endpoints_do_not_trip_the_panic_threshold() {
    let probes = Probes::default();
    let (mut stream, _handle) = checked(&[1, 2, 3], &probes, config().initially_healthy(false));
    assert!(changes(&mut stream).await.is_empty(), "1 good probe of 2");
    assert!(!stream.in_panic());
    let mut joined = tick(&mut stream).await;
    joined.sort();
    assert_eq!(joined, ["+1", "+2", "+3"]);

    let probes = Probes::default();
    for port in [1, 2, 3] {
        probes.set_down(addr(port), true);
    }
    let (mut stream, _handle) = checked(&[1, 2, 3], &probes, config().initially_healthy(false));
    assert!(changes(&mut stream).await.is_empty());
    assert!(
        tick(&mut stream).await.is_empty(),
        "two failures of three: not checked yet"
    );
    let mut all = tick(&mut stream).await;
    all.sort();
    assert_eq!(
        all,
        ["+1", "+2", "+3"],
        "checked and all down: panic routes to all"
    );
    assert!(stream.in_panic());
}

/// While nobody polls the stream (an idle client), probes keep running but
/// only changes of state are kept: after an hour in which an endpoint went
/// down and came back, the stream reports its current state, not an hour of
/// results.
#[tokio::test(start_paused = true)]
async fn an_idle_client_finds_the_current_state_not_a_backlog() {
    let probes = Probes::default();
    let (mut stream, _handle) = checked(&[1, 2, 3], &probes, config());
    let mut first = changes(&mut stream).await;
    first.sort();
    assert_eq!(first, ["+1", "+2", "+3"]);
    probes.set_down(addr(1), true);
    for _ in 0..5 {
        advance(SEC).await;
        settle().await;
    }
    probes.set_down(addr(1), false);
    for _ in 0..3600 {
        advance(SEC).await;
        settle().await;
    }
    let later = changes(&mut stream).await;
    assert_eq!(later, ["-1", "+1"], "one change each way, in order");
    assert_eq!(stream.is_healthy(addr(1)), Some(true));
}

#[test]
fn the_config_builder_names_the_bad_field() {
    let field = |b: HealthCheckConfigBuilder| b.build().unwrap_err().field();
    assert_eq!(field(config().interval(Duration::ZERO)), "interval");
    assert_eq!(field(config().timeout(Duration::ZERO)), "timeout");
    assert_eq!(field(config().healthy_threshold(0)), "healthy_threshold");
    assert_eq!(
        field(config().unhealthy_threshold(0)),
        "unhealthy_threshold"
    );
    assert_eq!(field(config().panic_threshold(1.5)), "panic_threshold");
    assert!(HttpProbe::try_get("healthz").is_err());
    assert!(HttpProbe::try_get("/healthz?full=1").is_ok());
}

#[test]
fn the_share_budget_allows_at_least_one_of_two_or_more() {
    let budget = MaxEjectedShare::new(0.2);
    let allowed = |n| {
        budget.set_endpoints(n);
        budget.allowed()
    };
    assert_eq!(allowed(0), 0);
    assert_eq!(allowed(1), 0);
    assert_eq!(allowed(2), 1);
    assert_eq!(allowed(5), 1);
    assert_eq!(allowed(10), 2);
    let budget = MaxEjectedShare::new(0.29);
    budget.set_endpoints(100);
    assert_eq!(budget.allowed(), 29);
    let budget = MaxEjectedShare::new(0.0);
    budget.set_endpoints(100);
    assert_eq!(budget.allowed(), 0);
    assert!(MaxEjectedShare::try_new(1.1).is_err());
}

#[tokio::test(start_paused = true)]
async fn with_five_endpoints_and_a_fifth_ejected_two_failing_endpoints_are_ejected_one_at_a_time() {
    let failing = [addr(1), addr(2)];
    let make = move |e: &Endpoint| {
        let addr = e.addr();
        service_fn(move |()| async move {
            if failing.contains(&addr) {
                Err::<SocketAddr, BoxError>("failed".into())
            } else {
                Ok(addr)
            }
        })
    };
    let (source, handle) = Static::new((1..=5).map(addr), make);
    let config = BreakerConfig::builder()
        .consecutive_failures(2)
        .open_duration(Duration::from_secs(30))
        .name("ejection-test")
        .build()
        .unwrap();
    let mut ejecting = OutlierEjection::new(config, 0.2).discover(source);
    let mut services = HashMap::new();
    for _ in 0..5 {
        match ejecting.next().await.unwrap().unwrap() {
            Change::Insert(addr, svc) => services.insert(addr, svc),
            Change::Remove(_) => unreachable!(),
        };
    }
    let budget = ejecting.budget().clone();
    assert_eq!(budget.endpoints(), 5);
    assert_eq!(budget.allowed(), 1);
    // The breakers forward the endpoint's weight.
    assert_eq!(services[&addr(3)].weight(), crate::discover::DEFAULT_WEIGHT);

    for port in [1, 2, 1, 2, 1, 2] {
        let svc = services.get_mut(&addr(port)).unwrap();
        if let Some(Ok(svc)) = svc.ready().now_or_never() {
            assert!(svc.call(()).await.is_err());
        }
    }
    let one = ejecting.breaker(&addr(1)).unwrap().clone();
    let two = ejecting.breaker(&addr(2)).unwrap().clone();
    assert_eq!(one.state(), State::Open);
    assert_eq!(two.state(), State::Closed, "the budget is spent");
    assert!(two.denials() >= 1);
    assert_eq!(budget.ejected(), 1);
    assert!(
        services
            .get_mut(&addr(1))
            .unwrap()
            .ready()
            .now_or_never()
            .is_none(),
        "an ejected endpoint is not ready"
    );
    assert_eq!(
        services
            .get_mut(&addr(3))
            .unwrap()
            .ready()
            .await
            .unwrap()
            .call(())
            .await
            .unwrap(),
        addr(3)
    );

    // The ejected endpoint goes away: its place is given back, and the other
    // failing one can be ejected (one of four is still allowed).
    handle.remove(addr(1));
    assert!(matches!(ejecting.next().await.unwrap().unwrap(), Change::Remove(a) if a == addr(1)));
    assert_eq!(budget.ejected(), 0);
    // The count is of live breakers: it drops when the balancer lets go of
    // the removed endpoint (and the test of its handle).
    drop(services.remove(&addr(1)));
    drop(one);
    assert_eq!(budget.endpoints(), 4);
    let svc = services.get_mut(&addr(2)).unwrap();
    assert!(svc.ready().await.unwrap().call(()).await.is_err());
    assert_eq!(two.state(), State::Open, "tripped at its next failure");
    assert_eq!(budget.ejected(), 1);
}

/// The gauges are registered when the checker is made, so making it under a
/// local recorder is enough for the figures to land in it.
#[tokio::test(start_paused = true)]
async fn metrics_count_endpoints_by_state() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let probes = Probes::default();
    let (mut stream, _handle) = metrics::with_local_recorder(&recorder, || {
        checked(
            &[1, 2, 3],
            &probes,
            config().unhealthy_threshold(1).name("api"),
        )
    });
    let value = |series: &str| -> Option<f64> {
        prometheus
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    };
    changes(&mut stream).await;
    let healthy = r#"tower_scale_endpoints{name="api",state="healthy"}"#;
    let unhealthy = r#"tower_scale_endpoints{name="api",state="unhealthy"}"#;
    assert_eq!(value(healthy), Some(3.0));
    assert_eq!(value(unhealthy), Some(0.0));
    probes.set_down(addr(2), true);
    assert_eq!(tick(&mut stream).await, ["-2"]);
    assert_eq!(value(healthy), Some(2.0));
    assert_eq!(value(unhealthy), Some(1.0));
    assert_eq!(value(r#"tower_scale_health_panic{name="api"}"#), Some(0.0));
}

/// Real time and a real socket: the HTTP probe passes on 2xx and fails on any
/// other status and on a refused connection.
#[tokio::test]
async fn the_http_probe_expects_a_2xx() {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/bad", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    HttpProbe::get("/healthz").probe(server).await.unwrap();
    let err = HttpProbe::get("/bad").probe(server).await.unwrap_err();
    assert!(err.to_string().contains("500"), "{err}");
    assert!(HttpProbe::get("/bad")
        .healthy_if(|s| s.is_server_error())
        .probe(server)
        .await
        .is_ok());
    // Nothing listens on the port a dropped listener had.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    assert!(HttpProbe::get("/healthz").probe(closed).await.is_err());
}

/// The ejection budget counts ejected endpoints in
/// `tower_scale_endpoints{state="ejected"}`.
#[test]
fn the_ejection_budget_reports_ejected_endpoints() {
    use crate::breaker::EjectionBudget;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let budget = metrics::with_local_recorder(&recorder, || {
        MaxEjectedShare::try_named(0.4, "api").unwrap()
    });
    let ejected = || {
        prometheus.render().lines().find_map(|line| {
            line.strip_prefix(r#"tower_scale_endpoints{name="api",state="ejected"}"#)?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    budget.set_endpoints(5);
    assert!(budget.try_open() && budget.try_open());
    assert!(!budget.try_open(), "two of five at most");
    assert_eq!(ejected(), Some(2.0));
    budget.release();
    assert_eq!(ejected(), Some(1.0));
}

/// A share budget counts every live breaker that shares it, however it was
/// made (here plain breaker layers, as `HttpEndpoint` makes them).
#[test]
fn a_share_budget_counts_the_breakers_that_share_it() {
    use crate::breaker::{BreakerConfig, CircuitBreakerLayer};
    let budget = MaxEjectedShare::new(0.5);
    let mut handles: Vec<_> = (0..4)
        .map(|_| {
            CircuitBreakerLayer::new(BreakerConfig::default())
                .budget(budget.clone())
                .handle()
        })
        .collect();
    assert_eq!(budget.endpoints(), 4);
    assert_eq!(budget.allowed(), 2);
    handles.truncate(2);
    assert_eq!(budget.endpoints(), 2);
    assert_eq!(budget.allowed(), 1);
}
