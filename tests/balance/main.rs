//! Discovery-driven balancing over real axum backends on 127.0.0.1, in real
//! time: round robin spreads evenly; the endpoint factory's not-ready breakers
//! eject a backend answering 500 and take it back; a backend added at run time
//! gets traffic; a backend made 10x slower gets a small share under our P2C;
//! a killed backend leaves rotation through active health checks and no
//! request fails once they have settled.

#[allow(dead_code)]
mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use tower::balance::p2c::Balance;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower_scale::balance::health::{HealthCheckConfig, HealthChecked, HttpProbe};
use tower_scale::balance::load::{FailureAwareEwma, HttpFailures};
use tower_scale::balance::policy::{RoundRobin, WeightedP2c};
use tower_scale::balance::{Balancer, HttpEndpoint};
use tower_scale::breaker::{BreakerConfig, Window};
use tower_scale::discover::{Endpoint, Static};

use support::{backends, bounded, send, send_cloned, tally, Body, Got};

fn endpoints(open: Duration) -> HttpEndpoint<Body> {
    let breaker = BreakerConfig::builder()
        .window(Window::Count(10))
        .minimum_calls(5)
        .failure_rate(0.5)
        .open_duration(open)
        .half_open_calls(1)
        .build()
        .unwrap();
    HttpEndpoint::builder()
        .timeout(Duration::from_secs(5))
        .breaker(breaker)
        .name("test")
        .build()
        .unwrap()
}

/// A backend answering 500 is ejected by its breaker (the balancer sees it
/// not ready and sends it nothing but probes), and takes traffic again once
/// it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_and_returns_after_recovery() {
    let backends = backends(3).await;
    let factory = endpoints(Duration::from_millis(300));
    let (discover, _handle) = Static::new(backends.iter().map(|b| b.addr), move |e: &Endpoint| {
        factory.make(e)
    });
    // Round robin ignores load: only the breaker can keep backend 1 out.
    let mut balance = Balancer::new(discover, RoundRobin::new());

    let mut warmup = Vec::new();
    for _ in 0..60 {
        warmup.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&warmup, 3);
    assert_eq!(failed, 0);
    assert!(counts.iter().all(|&n| n > 5), "all three serve: {counts:?}");

    // Backend 1 fails: once its breaker opens it gets only probes.
    backends[1].behaviour.failing.store(true, SeqCst);
    let mut during = Vec::new();
    for _ in 0..40 {
        during.push(send(&mut balance).await);
    }
    let served_at_ejection = backends[1].served();
    let mut ejected = Vec::new();
    for _ in 0..200 {
        ejected.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&ejected, 3);
    let probes = backends[1].served() - served_at_ejection;
    println!("while ejected: {counts:?}, {failed} failed, {probes} probes reached backend 1");
    assert_eq!(counts[1], 0);
    assert_eq!(failed, probes, "only probes fail");
    assert!(failed <= 10, "{failed} of 200 failed while ejected");

    // It recovers: the next probe closes the breaker and traffic returns.
    backends[1].behaviour.failing.store(false, SeqCst);
    bounded("backend 1 to serve again", async {
        while send(&mut balance).await != Got::Ok(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut recovered = Vec::new();
    for _ in 0..300 {
        recovered.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&recovered, 3);
    println!("after recovery: {counts:?}, {failed} failed");
    assert_eq!(failed, 0);
    assert!(
        counts[1] >= 50,
        "backend 1 takes its share again: {counts:?}"
    );
}

/// A backend added through the `Static` handle starts receiving traffic;
/// one removed stops; the ones that stay keep serving without a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_added_and_removed_at_run_time_follow_the_handle() {
    let backends = backends(3).await;
    let factory = endpoints(Duration::from_secs(5));
    let (discover, handle) =
        Static::new([backends[0].addr, backends[1].addr], move |e: &Endpoint| {
            factory.make(e)
        });
    let mut balance = Balancer::new(discover, RoundRobin::new());
    let mut before = Vec::new();
    for _ in 0..100 {
        before.push(send(&mut balance).await);
    }
    assert_eq!(tally(&before, 3).0[2], 0);

    handle.add(backends[2].addr);
    let mut after = Vec::new();
    for _ in 0..300 {
        after.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&after, 3);
    println!("after adding backend 2: {counts:?}");
    assert_eq!(failed, 0);
    assert!(counts[2] >= 50, "{counts:?}");

    handle.replace([backends[1].addr, backends[2].addr]);
    // The change is applied when the balancer next polls discovery.
    let mut replaced = Vec::new();
    for _ in 0..300 {
        replaced.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&replaced, 3);
    println!("after replacing with 1 and 2: {counts:?}");
    assert_eq!(failed, 0);
    assert_eq!(counts[0], 0, "{counts:?}");
    assert!(counts[1] >= 50 && counts[2] >= 50, "{counts:?}");
}

/// Under concurrent load, our weighted P2C over the failure-aware load sends
/// a backend made 10x slower a small share (tower's P2C over its PeakEwma,
/// run the same way, is printed beside it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_gets_a_small_share_under_p2c() {
    let backends = backends(3).await;
    for backend in &backends {
        backend.behaviour.delay_ms.store(5, SeqCst);
    }
    backends[2].behaviour.delay_ms.store(50, SeqCst);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();

    let factory = endpoints(Duration::from_secs(5));
    let (discover, _handle) = Static::new(addrs.clone(), move |e: &Endpoint| {
        FailureAwareEwma::new(factory.make(e)).classify(HttpFailures::new())
    });
    let ours = tower_scale::balance::buffered(Balancer::new(discover, WeightedP2c::new()), 64);
    let (counts, failed) = run_workers(&ours, 6, 60).await;
    let share = counts[2] as f64 / counts.iter().sum::<usize>() as f64;
    println!(
        "ours: per backend {counts:?}; the slow one got {:.1}%",
        share * 100.0
    );
    assert_eq!(failed, 0);
    assert!(share < 0.15, "{counts:?}");

    let factory = endpoints(Duration::from_secs(5));
    let (discover, _handle) = Static::new(addrs, move |e: &Endpoint| factory.make(e));
    let discover = PeakEwmaDiscover::new(
        discover,
        Duration::from_millis(20),
        Duration::from_secs(2),
        CompleteOnResponse::default(),
    );
    let theirs = tower_scale::balance::buffered(Balance::new(discover), 64);
    let (counts, _) = run_workers(&theirs, 6, 60).await;
    println!("tower P2C + PeakEwma: per backend {counts:?}");
}

/// On real sockets, what the tail-latency simulation shows: a backend that
/// fails fast looks like the fastest to tower's PeakEwma, which sends it a
/// large share, while our failure-aware load sends it almost nothing (the
/// breakers here never open, so the load alone decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_failing_backend_gets_few_calls_under_our_load_and_many_under_peak_ewma() {
    let backends = backends(3).await;
    for backend in &backends {
        backend.behaviour.delay_ms.store(5, SeqCst);
    }
    backends[2].behaviour.delay_ms.store(0, SeqCst);
    backends[2].behaviour.failing.store(true, SeqCst);
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let never_open = || {
        let breaker = BreakerConfig::builder()
            .window(Window::Count(1000))
            .minimum_calls(1000)
            .failure_rate(1.0)
            .build()
            .unwrap();
        HttpEndpoint::<Body>::builder()
            .breaker(breaker)
            .build()
            .unwrap()
    };

    let factory = never_open();
    let (discover, _handle) = Static::new(addrs.clone(), move |e: &Endpoint| {
        FailureAwareEwma::new(factory.make(e)).classify(HttpFailures::new())
    });
    let ours = tower_scale::balance::buffered(Balancer::new(discover, WeightedP2c::new()), 64);
    let (counts, failed) = run_workers(&ours, 6, 60).await;
    let ours_share = failed as f64 / (counts.iter().sum::<usize>() + failed) as f64;

    let factory = never_open();
    let (discover, _handle) = Static::new(addrs, move |e: &Endpoint| factory.make(e));
    let discover = PeakEwmaDiscover::new(
        discover,
        Duration::from_millis(20),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    );
    let theirs = tower_scale::balance::buffered(Balance::new(discover), 64);
    let (their_counts, their_failed) = run_workers(&theirs, 6, 60).await;
    let their_share =
        their_failed as f64 / (their_counts.iter().sum::<usize>() + their_failed) as f64;
    println!(
        "fast-failing backend: ours {:.1}% of calls ({counts:?} ok), tower PeakEwma {:.1}% ({their_counts:?} ok)",
        ours_share * 100.0,
        their_share * 100.0
    );
    assert!(ours_share < 0.05, "ours sent it {:.1}%", ours_share * 100.0);
    assert!(
        their_share > 0.2,
        "tower sent it {:.1}%",
        their_share * 100.0
    );
}

/// `workers` tasks each sending `each` requests through `client`; the
/// per-backend counts and the failures.
async fn run_workers<S>(client: &S, workers: usize, each: usize) -> (Vec<usize>, usize)
where
    S: tower::Service<
            axum::http::Request<Body>,
            Response = axum::http::Response<hyper::body::Incoming>,
            Error = tower::BoxError,
            Future: Send,
        > + Clone
        + Send
        + 'static,
{
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..each {
                    got.push(send_cloned(client.clone()).await);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(bounded("a worker", task).await.unwrap());
    }
    tally(&all, 3)
}

/// Round robin over three backends: an even spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let backends = backends(3).await;
    let factory = endpoints(Duration::from_secs(5));
    let (discover, _handle) = Static::new(backends.iter().map(|b| b.addr), move |e: &Endpoint| {
        factory.make(e)
    });
    let mut balance = Balancer::new(discover, RoundRobin::new());
    let mut got = Vec::new();
    for _ in 0..300 {
        got.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&got, 3);
    println!("round robin: {counts:?}");
    assert_eq!(failed, 0);
    assert!(
        counts.iter().all(|&n| (99..=101).contains(&n)),
        "{counts:?}"
    );
}

/// A killed backend fails until the active health checks take it out of
/// rotation; from then on no request fails and it gets nothing. Restarted, it
/// rejoins after the healthy threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_leaves_rotation_through_health_checks() {
    let backends = backends(3).await;
    // The failures before the checks settle may open backend 1's breaker too;
    // it probes again after 200 ms.
    let factory = endpoints(Duration::from_millis(200));
    let (discover, _handle) = Static::new(backends.iter().map(|b| b.addr), move |e: &Endpoint| {
        factory.make(e)
    });
    let config = HealthCheckConfig::builder()
        .interval(Duration::from_millis(50))
        .timeout(Duration::from_millis(500))
        .unhealthy_threshold(2)
        .healthy_threshold(2)
        .name("test")
        .build()
        .unwrap();
    let checked = HealthChecked::new(discover, HttpProbe::get("/health"), config);
    let mut balance = Balancer::new(checked, RoundRobin::new());
    let mut warmup = Vec::new();
    for _ in 0..30 {
        warmup.push(send(&mut balance).await);
    }
    assert_eq!(tally(&warmup, 3).1, 0);

    backends[1].kill();
    // Until the checks settle, requests sent to backend 1 fail.
    let mut settling = 0usize;
    bounded("100 successes in a row", async {
        let mut streak = 0;
        while streak < 100 {
            match send(&mut balance).await {
                Got::Ok(_) => streak += 1,
                Got::Failed(_) => {
                    streak = 0;
                    settling += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let mut settled = Vec::new();
    for _ in 0..300 {
        settled.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&settled, 3);
    println!(
        "killed: {settling} failed while the checks settled; then {counts:?}, {failed} failed"
    );
    assert_eq!(failed, 0);
    assert_eq!(counts[1], 0);

    backends[1].restart().await;
    let served = backends[1].served();
    bounded("backend 1 to rejoin", async {
        while backends[1].served() == served {
            send(&mut balance).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let mut back = Vec::new();
    for _ in 0..300 {
        back.push(send(&mut balance).await);
    }
    let (counts, failed) = tally(&back, 3);
    println!("restarted: {counts:?}");
    assert_eq!(failed, 0);
    assert!(counts[1] >= 90, "{counts:?}");
}
