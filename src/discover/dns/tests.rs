//! The diffing, scheduling and failure policy of [`Dns`], on a paused clock
//! with a scripted resolver; the real resolver is tested against dnsmasq in
//! `tests/dns`.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tower::discover::Change;

use super::resolve::{Answer, Failure};
use super::{Dns, DnsBuilder, Resolve, Timing};
use crate::discover::{Endpoint, Weight, Weighted};

const SEC: Duration = Duration::from_secs(1);

const TIMING: Timing = Timing {
    min_interval: Duration::from_secs(2),
    max_interval: Duration::from_secs(30),
    timeout: Duration::from_secs(5),
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One scripted resolution.
enum Step {
    Answer(Result<Answer, Failure>),
    /// Never finishes (the source's timeout must end it).
    Hang,
}

fn answer(ttl_secs: Option<u64>, endpoints: &[(&str, u32)]) -> Step {
    Step::Answer(Ok(Answer {
        endpoints: endpoints
            .iter()
            .map(|&(a, weight)| (addr(a), weight))
            .collect::<BTreeMap<_, _>>(),
        ttl: ttl_secs.map(Duration::from_secs),
    }))
}

/// A resolver that plays a script and records when each resolution started.
#[derive(Clone, Default)]
struct Script {
    steps: Arc<Mutex<VecDeque<Step>>>,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl Script {
    fn push(&self, step: Step) {
        self.steps.lock().unwrap().push_back(step);
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }

    fn resolve(&self) -> Resolve {
        let script = self.clone();
        Arc::new(move || {
            script.calls.lock().unwrap().push(Instant::now());
            let step = script.steps.lock().unwrap().pop_front();
            Box::pin(async move {
                match step {
                    Some(Step::Answer(result)) => result,
                    Some(Step::Hang) | None => std::future::pending().await,
                }
            })
        })
    }
}

type Source = Dns<fn(&Endpoint) -> SocketAddr, SocketAddr>;

fn source(script: &Script, timing: Timing) -> Source {
    let make: fn(&Endpoint) -> SocketAddr = |endpoint| endpoint.addr();
    Dns::with_resolve(script.resolve(), timing, "api.test", "api", make)
}

/// A change, as a value the tests can compare.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Insert(SocketAddr, u32),
    Remove(SocketAddr),
}

fn seen(change: Change<SocketAddr, Weighted<SocketAddr>>) -> Seen {
    match change {
        Change::Insert(key, service) => {
            assert_eq!(key, *service.get_ref(), "the service is made for its key");
            Seen::Insert(key, service.weight())
        }
        Change::Remove(key) => Seen::Remove(key),
    }
}

/// The next change; the paused clock runs through the intervals.
async fn next(dns: &mut Source) -> Seen {
    let change = tokio::time::timeout(Duration::from_secs(3600), dns.next())
        .await
        .expect("a change within an hour")
        .expect("the stream never ends");
    seen(change.unwrap())
}

/// Drives the source until `script` has been asked `n` times in all (then
/// lets that resolution finish); no change may come meanwhile.
async fn quiet_until_calls(dns: &mut Source, script: &Script, n: usize) {
    while script.calls().len() < n {
        tokio::select! {
            change = dns.next() => panic!("unexpected change: {:?}", change.map(|c| seen(c.unwrap()))),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    tokio::select! {
        change = dns.next() => panic!("unexpected change: {:?}", change.map(|c| seen(c.unwrap()))),
        () = tokio::time::sleep(Duration::from_millis(1)) => {}
    }
}

#[test]
fn next_resolution_is_the_ttl_clamped_to_the_interval_bounds() {
    assert_eq!(TIMING.after_answer(Some(10 * SEC)), 10 * SEC);
    assert_eq!(TIMING.after_answer(Some(Duration::ZERO)), 2 * SEC);
    assert_eq!(TIMING.after_answer(Some(SEC)), 2 * SEC);
    assert_eq!(TIMING.after_answer(Some(86_400 * SEC)), 30 * SEC);
    assert_eq!(TIMING.after_answer(None), 30 * SEC);
}

#[tokio::test(start_paused = true)]
async fn first_poll_resolves_and_inserts_every_endpoint_in_address_order() {
    let script = Script::default();
    script.push(answer(
        Some(60),
        &[
            ("10.0.0.2:80", 100),
            ("10.0.0.1:80", 100),
            ("[::1]:80", 100),
        ],
    ));
    let start = Instant::now();
    let mut dns = source(&script, TIMING);
    assert!(script.calls().is_empty(), "building resolves nothing");

    assert_eq!(next(&mut dns).await, Seen::Insert(addr("10.0.0.1:80"), 100));
    assert_eq!(next(&mut dns).await, Seen::Insert(addr("10.0.0.2:80"), 100));
    assert_eq!(next(&mut dns).await, Seen::Insert(addr("[::1]:80"), 100));
    assert_eq!(
        script.calls(),
        vec![start],
        "resolved at once on first poll"
    );
    assert_eq!(dns.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn later_answers_emit_only_differences_inserts_before_removals() {
    let script = Script::default();
    script.push(answer(
        Some(0),
        &[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)],
    ));
    script.push(answer(
        Some(0),
        &[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)],
    ));
    script.push(answer(
        Some(0),
        &[("10.0.0.2:80", 100), ("10.0.0.3:80", 100)],
    ));
    script.push(answer(Some(0), &[("10.0.0.4:80", 100)]));
    let mut dns = source(&script, TIMING);

    assert_eq!(next(&mut dns).await, Seen::Insert(addr("10.0.0.1:80"), 100));
    assert_eq!(next(&mut dns).await, Seen::Insert(addr("10.0.0.2:80"), 100));
    // The same answer again changes nothing; then one in, one out.
    assert_eq!(next(&mut dns).await, Seen::Insert(addr("10.0.0.3:80"), 100));
    assert_eq!(
        script.calls().len(),
        3,
        "the unchanged answer emitted nothing"
    );
    assert_eq!(next(&mut dns).await, Seen::Remove(addr("10.0.0.1:80")));
    // A whole new set: the newcomer first, so the set is never empty.
    assert_eq!(next(&mut dns).await, Seen::Insert(addr("10.0.0.4:80"), 100));
    assert_eq!(next(&mut dns).await, Seen::Remove(addr("10.0.0.2:80")));
    assert_eq!(next(&mut dns).await, Seen::Remove(addr("10.0.0.3:80")));
    assert_eq!(dns.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn weight_change_updates_the_shared_weight_without_reinserting() {
    let script = Script::default();
    script.push(answer(Some(0), &[("10.0.0.1:80", 10), ("10.0.0.2:80", 30)]));
    script.push(answer(Some(0), &[("10.0.0.1:80", 10), ("10.0.0.2:80", 50)]));
    let mut dns = source(&script, TIMING);

    let mut services = Vec::new();
    for _ in 0..2 {
        match dns.next().await.unwrap().unwrap() {
            Change::Insert(_, service) => services.push(service),
            Change::Remove(key) => panic!("unexpected removal of {key}"),
        }
    }
    assert_eq!(services[1].weight(), 30);
    quiet_until_calls(&mut dns, &script, 2).await;
    assert_eq!(services[0].weight(), 10);
    assert_eq!(
        services[1].weight(),
        50,
        "the held service sees the new weight"
    );
}

#[tokio::test(start_paused = true)]
async fn resolutions_follow_the_ttl_within_bounds() {
    let script = Script::default();
    script.push(answer(Some(10), &[("10.0.0.1:80", 100)]));
    script.push(answer(Some(0), &[("10.0.0.1:80", 100)]));
    script.push(answer(Some(3600), &[("10.0.0.1:80", 100)]));
    script.push(answer(Some(7), &[("10.0.0.1:80", 100)]));
    let start = Instant::now();
    let mut dns = source(&script, TIMING);

    next(&mut dns).await;
    quiet_until_calls(&mut dns, &script, 5).await;
    let at: Vec<Duration> = script.calls().iter().map(|t| *t - start).collect();
    // TTL 10 s -> 10 s; TTL 0 -> min 2 s; TTL 1 h -> max 30 s; TTL 7 s -> 7 s.
    let expected = [0, 10, 12, 42, 49].map(Duration::from_secs);
    assert_eq!(at, expected);
}

#[tokio::test(start_paused = true)]
async fn failures_keep_the_set_count_errors_and_retry_after_min_interval() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let script = Script::default();
    let mut dns = metrics::with_local_recorder(&recorder, || source(&script, TIMING));
    let value = |series: &str| -> Option<f64> {
        prometheus
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    };
    let errors = r#"tower_scale_discovery_errors_total{name="api"}"#;
    let endpoints = r#"tower_scale_discovery_endpoints{name="api"}"#;

    script.push(answer(
        Some(60),
        &[("10.0.0.1:80", 100), ("10.0.0.2:80", 100)],
    ));
    script.push(Step::Answer(Err(Failure::TimedOut)));
    script.push(Step::Answer(Err(Failure::NoSuchName)));
    script.push(Step::Answer(Err(Failure::Empty)));
    script.push(answer(Some(60), &[("10.0.0.2:80", 100)]));
    let start = Instant::now();
    next(&mut dns).await;
    next(&mut dns).await;
    assert_eq!(value(endpoints), Some(2.0));

    // TTL 60 s is clamped to 30 s; three failures in a row change nothing,
    // each retried after 2 s.
    assert_eq!(next(&mut dns).await, Seen::Remove(addr("10.0.0.1:80")));
    let at: Vec<Duration> = script.calls().iter().map(|t| *t - start).collect();
    assert_eq!(at, [0, 30, 32, 34, 36].map(Duration::from_secs));
    assert_eq!(value(errors), Some(3.0));
    assert_eq!(value(endpoints), Some(1.0));
    let inserts = r#"tower_scale_discovery_updates_total{name="api",change="insert"}"#;
    let removes = r#"tower_scale_discovery_updates_total{name="api",change="remove"}"#;
    assert_eq!(value(inserts), Some(2.0));
    assert_eq!(value(removes), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn empty_answers_never_remove_the_last_endpoints() {
    let script = Script::default();
    script.push(answer(Some(0), &[("10.0.0.1:80", 100)]));
    for _ in 0..5 {
        script.push(Step::Answer(Err(Failure::Empty)));
    }
    script.push(Step::Answer(Err(Failure::NoSuchName)));
    let mut dns = source(&script, TIMING);

    next(&mut dns).await;
    quiet_until_calls(&mut dns, &script, 7).await;
    assert_eq!(dns.len(), 1, "the last endpoint stays");
    assert_eq!(dns.failures, 6);
}

#[tokio::test(start_paused = true)]
async fn a_resolution_that_hangs_times_out_and_is_retried() {
    let script = Script::default();
    script.push(answer(Some(0), &[("10.0.0.1:80", 100)]));
    script.push(Step::Hang);
    script.push(answer(Some(0), &[("10.0.0.9:80", 100)]));
    let start = Instant::now();
    let mut dns = source(&script, TIMING);

    next(&mut dns).await;
    assert_eq!(next(&mut dns).await, Seen::Insert(addr("10.0.0.9:80"), 100));
    assert_eq!(next(&mut dns).await, Seen::Remove(addr("10.0.0.1:80")));
    let at: Vec<Duration> = script.calls().iter().map(|t| *t - start).collect();
    // Resolved at 0, hung at 2 until the 5 s timeout, retried 2 s later.
    assert_eq!(at, [0, 2, 9].map(Duration::from_secs));
    assert_eq!(dns.failures, 0, "the good answer ended the series");
}

#[test]
fn building_spawns_nothing_and_needs_no_runtime() {
    // No tokio runtime here: building must not touch one.
    let dns = DnsBuilder::new("api.test")
        .port(80)
        .name_server(addr("127.0.0.1:53"))
        .build(|endpoint: &Endpoint| endpoint.addr())
        .unwrap();
    assert!(dns.is_empty());
    drop(dns);
}

#[test]
fn builder_rejects_bad_config_naming_the_field() {
    let make = |endpoint: &Endpoint| endpoint.addr();
    let ok = || {
        DnsBuilder::new("api.test")
            .port(80)
            .name_server(addr("127.0.0.1:53"))
    };
    let field = |builder: DnsBuilder| builder.build(make).unwrap_err().field();

    assert_eq!(field(DnsBuilder::new("").port(80)), "host");
    assert_eq!(field(DnsBuilder::new("a..b").port(80)), "host");
    assert_eq!(field(ok().name("")), "name");
    assert_eq!(
        field(DnsBuilder::new("api.test").name_server(addr("127.0.0.1:53"))),
        "port"
    );
    assert_eq!(field(ok().min_interval(Duration::ZERO)), "min_interval");
    assert_eq!(field(ok().interval(Duration::ZERO)), "min_interval");
    assert_eq!(
        field(ok().min_interval(10 * SEC).max_interval(5 * SEC)),
        "max_interval"
    );
    assert_eq!(field(ok().timeout(Duration::ZERO)), "timeout");

    // SRV needs no port; an interval alone sets both bounds.
    assert!(ok().srv().build(make).is_ok());
    let dns = ok().interval(3 * SEC).build(make).unwrap();
    assert_eq!(dns.timing.min_interval, 3 * SEC);
    assert_eq!(dns.timing.max_interval, 3 * SEC);
}

/// `Balance::new` takes the source: a `Discover` that is `Unpin`, with
/// services that have a `Load`; and the source can be moved across threads
/// and shared.
#[test]
fn source_is_unpin_send_sync_and_fits_tower_balance() {
    fn assert_send_sync_unpin<T: Send + Sync + Unpin>(_: &T) {}
    use tower::load::{CompleteOnResponse, PendingRequests};

    let make = |endpoint: &Endpoint| {
        let addr = endpoint.addr();
        let svc = tower::service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) });
        PendingRequests::new(svc, CompleteOnResponse::default())
    };
    let dns = DnsBuilder::new("api.test")
        .port(80)
        .name_server(addr("127.0.0.1:53"))
        .build(make)
        .unwrap();
    assert_send_sync_unpin(&dns);
    let balance = tower::balance::p2c::Balance::<_, ()>::new(dns);
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&balance);
}
