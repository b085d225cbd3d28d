//! tower-scale's admission stack in front of a real axum server.
//!
//! ```text
//! cargo run --example server --all-features                   # serve on 127.0.0.1:3000
//! cargo run --example server --all-features -- --self-test    # overload it, print what happened, exit
//! ```
//!
//! Then, from another terminal:
//!
//! ```text
//! curl -i 'http://127.0.0.1:3000/work?ms=50'   # 200, or 503 with Retry-After when overloaded
//! curl http://127.0.0.1:3000/health            # always answers: it is outside the stack
//! curl -i http://127.0.0.1:3000/ready           # 200, or 503 once a drain has started
//! curl http://127.0.0.1:3000/metrics           # Prometheus text
//! ```
//!
//! Settings, from the environment: `PORT` (3000; or the first argument),
//! `LIMIT` (8 requests at once), `QUEUE` (32 waiting), `QUEUE_TIMEOUT_MS` (250),
//! `SELF_TEST=1` (same as `--self-test`).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_scale::drain::{shutdown_signal, Drain};
use tower_scale::health::HealthChecks;
use tower_scale::http::{ErrorResponseLayer, REJECTED_HEADER};
use tower_scale::limit::{ConcurrencyLimitLayer, LimitHandle};
use tower_scale::queue::{Order, QueueHandle, QueueLayer};
use tower_scale::shed::LoadShedLayer;
use tower_scale::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let config = Config::from_env()?;

    // 1. The metrics recorder comes first: the layers register their metric
    //    handles when they first make a service, with whatever recorder is installed then.
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep(); // keeps the histograms from growing without bound
        }
    });

    // 2. The admission stack, outermost first. Each layer value owns its state,
    //    so every route and every connection shares one limit and one queue.
    //    `try_new` turns a bad setting (LIMIT=0, say) into an error naming it.
    let limit = ConcurrencyLimitLayer::try_new(config.limit)?.name("api");
    let queue = QueueLayer::try_new(config.queue, config.queue_timeout)?
        .order(Order::adaptive_lifo())
        .name("api");
    let probes = Probes {
        limit: limit.handle(),
        queue: queue.handle(),
        metrics,
    };
    // The drain counts every call until its body ends; on SIGTERM or Ctrl-C
    // readiness goes down, then new calls are refused and the rest finish.
    let drain = Drain::builder().name("api").build();
    let readiness = HealthChecks::builder().drain(&drain).build()?;
    let admission = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new()) // every rejection -> 503 + Retry-After
        .layer(drain.layer().release_on_body_end()) // finish what was accepted
        .layer(LoadShedLayer::new().name("api")) // never wait for readiness
        .layer(queue) // at most QUEUE waiting, each for at most QUEUE_TIMEOUT_MS
        .layer(limit); // at most LIMIT running

    // 3. API routes behind the stack. Routes merged after `.layer` are outside
    //    it, so /health and /metrics answer even while the API is overloaded.
    let app = Router::new()
        .route("/", get(|| async { "hello from tower-scale\n" }))
        .route("/work", get(work))
        .layer(admission)
        .merge(
            Router::new()
                .route("/health", get(health))
                .route_service("/ready", readiness.readiness_service())
                .route(
                    "/metrics",
                    get(|State(p): State<Probes>| async move { p.metrics.render() }),
                )
                .with_state(probes),
        );

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.port)).await?;
    let addr = listener.local_addr()?;
    println!(
        "listening on http://{addr} (limit {}, queue {}, queue timeout {:?})",
        config.limit, config.queue, config.queue_timeout
    );

    if config.self_test {
        return self_test(listener, app, drain).await;
    }
    let serve = axum::serve(listener, app).with_graceful_shutdown(drain.signaled());
    let server = tokio::spawn(async move { serve.await });
    shutdown_signal().await;
    println!("shutting down: finishing the requests in flight");
    let timeout = Duration::from_secs(30);
    let report = drain.drain(timeout).await;
    println!("{report}");
    // axum's serve has no deadline of its own: give it what is left of ours.
    let _ = tokio::time::timeout(timeout.saturating_sub(report.elapsed()), server).await;
    Ok(())
}

/// `GET /work?ms=50`: pretends to work for `ms` milliseconds (at most 10 s).
async fn work(Query(params): Query<HashMap<String, String>>) -> String {
    let ms: u64 = params
        .get("ms")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(50);
    tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    format!("worked {ms} ms\n")
}

/// What the probe routes read: the handles of the layers and the recorder.
#[derive(Clone)]
struct Probes {
    limit: LimitHandle,
    queue: QueueHandle,
    metrics: PrometheusHandle,
}

/// `GET /health`: the figures an operator or an autoscaler wants, as JSON.
async fn health(State(p): State<Probes>) -> impl axum::response::IntoResponse {
    let body = format!(
        r#"{{"status":"ok","in_flight":{},"limit":{},"queue_depth":{},"queue_capacity":{},"queue_standing":{}}}"#,
        p.limit.in_flight(),
        p.limit.limit(),
        p.queue.depth(),
        p.queue.capacity(),
        p.queue.is_standing(),
    );
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// Serves on `listener` while one burst of requests hits `/work`, each on a
/// connection of its own, then prints how they were answered and the metrics.
async fn self_test(listener: TcpListener, app: Router, drain: Drain) -> Result<(), BoxError> {
    const BURST: usize = 200;
    let addr = listener.local_addr()?;
    let serve = axum::serve(listener, app).with_graceful_shutdown(drain.signaled());
    let server = tokio::spawn(async move { serve.await });

    println!("self-test: {BURST} concurrent GET /work?ms=50, one connection each");
    let burst: Vec<_> = (0..BURST)
        .map(|_| tokio::spawn(fetch(addr, "/work?ms=50")))
        .collect();
    let mut tally: HashMap<String, usize> = HashMap::new();
    let mut failed = 0;
    for request in burst {
        match request.await? {
            Ok((status, rejected, _)) => {
                let outcome = match rejected {
                    Some(reason) => format!("{} {reason}", status.as_u16()),
                    None => status.to_string(),
                };
                *tally.entry(outcome).or_default() += 1;
            }
            Err(err) => {
                eprintln!("request failed: {err}");
                failed += 1;
            }
        }
    }
    let mut outcomes: Vec<_> = tally.into_iter().collect();
    outcomes.sort();
    for (outcome, n) in outcomes {
        println!("  {n:>4} x {outcome}");
    }

    let (_, _, health) = fetch(addr, "/health").await?;
    println!("GET /health: {health}");
    let (_, _, metrics) = fetch(addr, "/metrics").await?;
    println!("GET /metrics (excerpt):");
    let mut lines: Vec<_> = metrics
        .lines()
        .filter(|line| line.contains(r#"name="api""#) && !line.contains("quantile"))
        .collect();
    lines.sort();
    lines.iter().for_each(|line| println!("  {line}"));

    // Shut down the way SIGTERM does: drain, then let the server close.
    let report = drain.drain(Duration::from_secs(10)).await;
    println!("{report}");
    server.await??;
    match failed {
        0 => Ok(()),
        n => Err(format!("{n} requests got no HTTP response").into()),
    }
}

/// One `GET` on a new connection: the status, the `tower-scale-rejected`
/// reason if any, and the body. Gives up after 10 s.
async fn fetch(
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, Option<String>, String), BoxError> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let rejected = response
            .headers()
            .get(REJECTED_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        Ok((
            status,
            rejected,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await?
}

struct Config {
    port: u16,
    limit: usize,
    queue: usize,
    queue_timeout: Duration,
    self_test: bool,
}

impl Config {
    fn from_env() -> Result<Config, BoxError> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let self_test = args.iter().any(|a| a == "--self-test")
            || std::env::var("SELF_TEST").is_ok_and(|v| v == "1" || v == "true");
        let port = match args.iter().find(|a| !a.starts_with("--")) {
            Some(port) => port.parse().map_err(|e| format!("port {port:?}: {e}"))?,
            // The self-test takes any free port, so it runs beside a server.
            None => var("PORT", if self_test { 0 } else { 3000 })?,
        };
        Ok(Config {
            port,
            limit: var("LIMIT", 8)?,
            queue: var("QUEUE", 32)?,
            queue_timeout: Duration::from_millis(var("QUEUE_TIMEOUT_MS", 250)?),
            self_test,
        })
    }
}

/// The environment variable `name` parsed, or `default` when it is unset.
fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|e| format!("{name}={value:?}: {e}").into()),
        Err(_) => Ok(default),
    }
}
