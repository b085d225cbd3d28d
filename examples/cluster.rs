//! Three instances on loopback register in Redis and heartbeat their load; a
//! client balances over what the registry says; every second the example
//! prints the cluster's aggregate scale figures and the advisor's
//! recommendation while the offered load rises and falls.
//!
//! ```text
//! redis-server --port 6379 --save ''                          # or any Redis you have
//! cargo run --example cluster --all-features
//! cargo run --example cluster --all-features -- --redis redis://10.0.0.5:6379
//! cargo run --example cluster --all-features -- --start-redis # runs a redis-server on a free port
//! ```
//!
//! Flags: `--redis URL` (default `redis://127.0.0.1:6379`), `--start-redis`,
//! `--seconds N` (default 15). Each instance runs at most 8 calls at once
//! (20 ms each); the client sends from 2 tasks, then 40 (from 5 s), then 2
//! again (from 10 s). The advisor targets 60% utilisation between 1 and 10
//! replicas, scaling down only after 3 s of lower readings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Request;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::Empty;
use tokio::net::TcpListener;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_scale::balance::load::Pending;
use tower_scale::balance::policy::WeightedP2c;
use tower_scale::balance::{Balancer, HttpEndpoint};
use tower_scale::discover::{Endpoint, Registry};
use tower_scale::drain::Drain;
use tower_scale::http::ErrorResponseLayer;
use tower_scale::limit::ConcurrencyLimitLayer;
use tower_scale::queue::QueueLayer;
use tower_scale::registry::{Heartbeat, InstanceInfo, InstanceRegistry, RedisRegistry};
use tower_scale::scale::{LatencyLayer, ScaleAdvisor, ScaleMetrics};

const SERVICE: &str = "api";
type Body = Empty<Bytes>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let seconds: u64 = match flag("--seconds") {
        Some(s) => s.parse().map_err(|e| format!("--seconds: {e}"))?,
        None => 15,
    };
    let _redis_server;
    let url = if args.iter().any(|a| a == "--start-redis") {
        let server = LocalRedis::start().await?;
        let url = server.url.clone();
        _redis_server = Some(server);
        url
    } else {
        _redis_server = None;
        flag("--redis").unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
    };
    let registry: Arc<dyn InstanceRegistry> = Arc::new(
        RedisRegistry::builder(url.as_str())
            .namespace("tower-scale-example")
            .resync_interval(Duration::from_secs(1))
            .build()?,
    );
    if let Err(err) = registry.healthy(SERVICE).await {
        return Err(format!(
            "cannot reach Redis at {url}: {err}\n\
             start one (redis-server --port 6379 --save '') or pass --start-redis"
        )
        .into());
    }
    println!("registry: Redis at {url}");

    // Three instances, each registering itself and heartbeating its figures.
    let mut instances = Vec::new();
    for index in 0..3 {
        instances.push(start_instance(index, registry.clone()).await?);
    }

    // The client: the registry as discovery, weighted P2C over pending counts
    // (weights from each instance's reported limit).
    let endpoints = HttpEndpoint::<Body>::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let discover = Registry::named("cluster", registry.clone(), SERVICE, move |e: &Endpoint| {
        Pending::new(endpoints.make(e))
    });
    let client = tower_scale::balance::buffered(Balancer::new(discover, WeightedP2c::new()), 1024);

    let advisor = ScaleAdvisor::builder()
        .utilisation(0.6)
        .min_replicas(1)
        .max_replicas(10)
        .scale_down_stabilisation(Duration::from_secs(3))
        .name(SERVICE)
        .build()?;

    let workers = Arc::new(AtomicUsize::new(2));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for worker in 0..40 {
        let (client, workers, stop, ok, failed) = (
            client.clone(),
            workers.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                if worker >= workers.load(SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let request = Request::get("/").body(Body::new()).unwrap();
                match client.clone().oneshot(request).await {
                    Ok(response) if response.status().is_success() => ok.fetch_add(1, SeqCst),
                    _ => failed.fetch_add(1, SeqCst),
                };
            }
        }));
    }

    println!(
        "{:>3} {:>7} {:>9} {:>11} {:>9} {:>9} {:>8}  advice",
        "t", "clients", "instances", "utilisation", "queue", "p95 ms", "ok/s"
    );
    let mut last_ok = 0;
    for second in 1..=seconds {
        match second {
            5 => workers.store(40, SeqCst),
            10 => workers.store(2, SeqCst),
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let aggregate = ScaleMetrics::aggregate(registry.as_ref(), SERVICE).await?;
        let advice = advisor.observe_aggregate(&aggregate);
        let done = ok.load(SeqCst);
        println!(
            "{:>3} {:>7} {:>9} {:>10.0}% {:>9} {:>9.1} {:>8}  {} -> {} replicas ({:?})",
            second,
            workers.load(SeqCst),
            aggregate.instances,
            aggregate.utilisation_mean.unwrap_or(0.0) * 100.0,
            aggregate.queue_depth_total,
            aggregate.p95_latency_ms_mean.unwrap_or(0.0),
            done - last_ok,
            advice.current,
            advice.desired,
            advice.reason,
        );
        last_ok = done;
    }
    stop.store(true, SeqCst);
    for task in tasks {
        let _ = task.await;
    }
    // Each instance drains: its heartbeat deregisters it.
    for instance in &instances {
        instance.start();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = registry.healthy(SERVICE).await?.len();
    println!(
        "{} requests, {} failed; after the drains {left} instances remain registered",
        ok.load(SeqCst),
        failed.load(SeqCst)
    );
    Ok(())
}

/// One instance: an axum server with a latency window, a queue and a limit
/// of 8, behind a drain, registered with a heartbeat of its figures.
async fn start_instance(
    index: usize,
    registry: Arc<dyn InstanceRegistry>,
) -> Result<Drain, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let drain = Drain::new();
    let latency = LatencyLayer::new();
    let limit = ConcurrencyLimitLayer::new(8).name(format!("instance-{index}"));
    let queue = QueueLayer::new(256, Duration::from_secs(2)).name(format!("instance-{index}"));
    let heartbeat = Heartbeat::builder(
        registry,
        InstanceInfo::new(SERVICE, format!("instance-{index}"), addr),
    )
    .ttl(Duration::from_secs(3))
    .interval(Duration::from_millis(500))
    .limit(limit.handle())
    .queue(queue.handle())
    .latency({
        let handle = latency.handle();
        move || Duration::from_secs_f64(handle.p95_ms() / 1000.0)
    })
    .drain(&drain)
    .build()?;
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                "done"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(drain.layer().release_on_body_end())
                .layer(latency)
                .layer(queue)
                .layer(limit),
        );
    let serve = axum::serve(listener, app).with_graceful_shutdown(drain.signaled());
    tokio::spawn(async move {
        let _ = serve.await;
    });
    heartbeat.spawn();
    println!("instance-{index} on {addr}");
    Ok(drain)
}

/// A `redis-server` on a free loopback port, for `--start-redis`.
struct LocalRedis {
    url: String,
    child: std::process::Child,
}

impl LocalRedis {
    async fn start() -> Result<LocalRedis, BoxError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}): apt-get install redis-server")
            })?;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(LocalRedis {
                    url: format!("redis://127.0.0.1:{port}"),
                    child,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("redis-server did not start".into())
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
