//! Balancing over registry discovery: three real axum instances register
//! themselves in a real Redis and heartbeat; a client balances over what the
//! registry says. One instance drains (it deregisters; no request fails), one
//! is killed (it expires after its TTL; after that no request goes to it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::{ServiceBuilder, ServiceExt};
use tower_scale::balance::policy::RoundRobin;
use tower_scale::balance::{Balancer, HttpEndpoint};
use tower_scale::discover::{Endpoint, Registry};
use tower_scale::drain::Drain;
use tower_scale::http::{ErrorResponseLayer, SafeRetry};
use tower_scale::registry::{
    Heartbeat, HeartbeatHandle, InstanceInfo, InstanceRegistry, RedisRegistry,
};

use crate::support::{RedisServer, BOUND};

type Body = Empty<Bytes>;

const SERVICE: &str = "api";
const TTL: Duration = Duration::from_millis(1500);

fn registry(redis: &RedisServer) -> Arc<dyn InstanceRegistry> {
    Arc::new(
        RedisRegistry::builder(redis.url())
            .namespace("balance-test")
            .resync_interval(Duration::from_millis(300))
            .build()
            .unwrap(),
    )
}

/// Serves `app` on `listener` until `stop` resolves, then lets the open
/// connections finish. Each connection is a task of a `JoinSet` owned by
/// this future, so aborting the task that runs it kills every connection at
/// once, as a process that dies would (aborting `axum::serve` would leave its
/// connection tasks serving).
async fn serve(listener: TcpListener, app: Router, stop: tower_scale::drain::Signal) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let mut connections = tokio::task::JoinSet::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = &mut stop => break,
        }
    }
    drop(listener);
    // The drain has waited for every call; what is left are idle keep-alive
    // connections, closed after a moment (hyper's graceful shutdown would
    // close them at once).
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// One instance: an axum server behind a drain, registered with a heartbeat.
struct Instance {
    addr: SocketAddr,
    drain: Drain,
    server: JoinHandle<()>,
    heartbeat: Option<HeartbeatHandle>,
}

impl Instance {
    async fn start(index: usize, registry: Arc<dyn InstanceRegistry>) -> Instance {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::builder()
            .readiness_delay(Duration::from_millis(300))
            .build();
        let app = Router::new()
            .route("/", get(move || async move { format!("{index}") }))
            .layer(
                ServiceBuilder::new()
                    .layer(ErrorResponseLayer::new())
                    .layer(drain.layer().release_on_body_end()),
            );
        let server = tokio::spawn(serve(listener, app, drain.signaled()));
        let info = InstanceInfo::new(SERVICE, format!("instance-{index}"), addr);
        let heartbeat = Heartbeat::builder(registry, info)
            .ttl(TTL)
            .interval(Duration::from_millis(300))
            .drain(&drain)
            .name("test")
            .build()
            .unwrap()
            .spawn();
        Instance {
            addr,
            drain,
            server,
            heartbeat: Some(heartbeat),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_follows_registry_drains_and_expiries() {
    let redis = RedisServer::start().await;
    let mut instances = Vec::new();
    for index in 0..3 {
        instances.push(Instance::start(index, registry(&redis)).await);
    }
    let addrs: Vec<SocketAddr> = instances.iter().map(|i| i.addr).collect();

    // A breaker that probes again after 200 ms: were the killed instance
    // still in the set, its probes would reach the counting listener below.
    let breaker = tower_scale::breaker::BreakerConfig::builder()
        .window(tower_scale::breaker::Window::Count(10))
        .minimum_calls(3)
        .open_duration(Duration::from_millis(200))
        .half_open_calls(1)
        .build()
        .unwrap();
    let factory = HttpEndpoint::<Body>::builder()
        .timeout(Duration::from_secs(2))
        .breaker(breaker)
        .build()
        .unwrap();
    let discover = Registry::named("test", registry(&redis), SERVICE, move |e: &Endpoint| {
        factory.make(e)
    });
    let client = ServiceBuilder::new()
        .layer(
            SafeRetry::builder()
                .max_retries(10)
                .budget(tower::retry::budget::TpsBudget::new(
                    Duration::from_secs(10),
                    1_000,
                    10.0,
                ))
                .build()
                .unwrap()
                .into_layer(),
        )
        .service(tower_scale::balance::buffered(
            Balancer::new(discover, RoundRobin::new()),
            64,
        ));

    // Continuous load from four tasks; every answer is counted per instance.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(Mutex::new([0usize; 3]));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop, ok, failures) =
                (client.clone(), stop.clone(), ok.clone(), failures.clone());
            tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    let request = Request::get("http://api/").body(Body::new()).unwrap();
                    match tokio::time::timeout(BOUND, client.clone().oneshot(request)).await {
                        Ok(Ok(response)) if response.status() == StatusCode::OK => {
                            let body = response.into_body().collect().await.unwrap().to_bytes();
                            let index: usize = String::from_utf8_lossy(&body).parse().unwrap();
                            ok.lock().unwrap()[index] += 1;
                        }
                        Ok(Ok(response)) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{}", response.status())),
                        Ok(Err(err)) => failures.lock().unwrap().push(format!("{err}")),
                        Err(_) => failures.lock().unwrap().push("timed out".to_owned()),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    let counts = || *ok.lock().unwrap();
    let wait = |what: &'static str, f: Box<dyn Fn() -> bool + Send>| async move {
        tokio::time::timeout(BOUND, async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
    };
    let ok2 = ok.clone();
    wait(
        "traffic on all three",
        Box::new(move || ok2.lock().unwrap().iter().all(|&n| n >= 20)),
    )
    .await;

    // Instance 0 drains: it deregisters, clients follow, nothing fails.
    let report = tokio::time::timeout(BOUND, instances[0].drain.drain(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(report.is_complete(), "{report}");
    let _ = tokio::time::timeout(BOUND, &mut instances[0].server).await;
    let at_drain = counts()[0];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_drain = counts();
    assert_eq!(
        after_drain[0], at_drain,
        "the drained instance gets nothing more"
    );
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        failures.lock().unwrap()
    );

    // Instance 1 is killed: no deregistration. Its port is taken over by a
    // listener that counts the connections clients still open to it.
    let killed = addrs[1];
    instances[1].server.abort();
    if let Some(heartbeat) = instances[1].heartbeat.take() {
        heartbeat.abort();
    }
    let _ = (&mut instances[1].server).await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let counting = {
        let listener = loop {
            match TcpListener::bind(killed).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let attempts = attempts.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                attempts.fetch_add(1, SeqCst);
                drop(socket);
            }
        })
    };
    // After the TTL (and a resync) the registry has let it go.
    let reader = registry(&redis);
    tokio::time::timeout(BOUND, async {
        loop {
            let healthy = reader.healthy(SERVICE).await.unwrap();
            if healthy.iter().all(|i| i.addr != killed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the killed instance expires");
    tokio::time::sleep(Duration::from_secs(1)).await; // the watch resyncs
    let before = attempts.load(SeqCst);
    let served_before = counts()[2];
    let ok3 = ok.clone();
    wait(
        "more traffic on instance 2",
        Box::new(move || ok3.lock().unwrap()[2] >= served_before + 100),
    )
    .await;
    assert_eq!(
        attempts.load(SeqCst),
        before,
        "no connection to the expired instance"
    );

    stop.store(true, SeqCst);
    for worker in workers {
        let _ = tokio::time::timeout(BOUND, worker).await;
    }
    counting.abort();
    let failures = failures.lock().unwrap().clone();
    println!(
        "answers per instance {:?}; {} failed; connections to the killed instance before expiry {}",
        counts(),
        failures.len(),
        attempts.load(SeqCst)
    );
    assert!(failures.is_empty(), "{failures:?}");
    drop(instances);
}
