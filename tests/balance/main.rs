//! Discovery-driven balancing over real axum backends on 127.0.0.1, in real
//! time: the endpoint factory's not-ready breakers eject a failing backend and
//! take it back, a backend added at run time gets traffic, a slow backend gets
//! a small share under P2C.

#[allow(dead_code)]
mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequests};
use tower_scale::balance::HttpEndpoint;
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
        PendingRequests::new(factory.make(e), CompleteOnResponse::default())
    });
    let mut balance = Balance::new(discover);

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
            PendingRequests::new(factory.make(e), CompleteOnResponse::default())
        });
    let mut balance = Balance::new(discover);
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

/// Under concurrent load, P2C over a latency-aware load sends a backend made
/// 10x slower a small share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_gets_a_small_share_under_p2c() {
    let backends = backends(3).await;
    for backend in &backends {
        backend.behaviour.delay_ms.store(5, SeqCst);
    }
    backends[2].behaviour.delay_ms.store(50, SeqCst);
    let factory = endpoints(Duration::from_secs(5));
    let (discover, _handle) = Static::new(backends.iter().map(|b| b.addr), move |e: &Endpoint| {
        factory.make(e)
    });
    let discover = PeakEwmaDiscover::new(
        discover,
        Duration::from_millis(20),
        Duration::from_secs(2),
        CompleteOnResponse::default(),
    );
    let balance = shared(Balance::new(discover));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let client = balance.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..60 {
                    got.push(send_cloned(&client).await);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(bounded("a worker", worker).await.unwrap());
    }
    let (counts, failed) = tally(&all, 3);
    let share = counts[2] as f64 / all.len() as f64;
    println!(
        "per backend {counts:?}; the slow one got {:.1}%",
        share * 100.0
    );
    assert_eq!(failed, 0);
    assert!(share < 0.15, "{counts:?}");
}

/// The balancer behind a `Buffer`, as an opaque `Clone` service for several
/// tasks. (Naming the concrete type in a spawned task trips rustc's
/// higher-ranked `Send` check on the balancer's `fn`-pointer future.)
fn shared<S>(
    balance: S,
) -> impl tower::Service<
    axum::http::Request<Body>,
    Response = axum::http::Response<hyper::body::Incoming>,
    Error = tower::BoxError,
    Future: Send,
> + Clone
       + Send
       + 'static
where
    S: tower::Service<
            axum::http::Request<Body>,
            Response = axum::http::Response<hyper::body::Incoming>,
        > + Send
        + 'static,
    S::Error: Into<tower::BoxError> + Send + Sync,
    S::Future: Send,
{
    Buffer::new(balance, 64)
}
