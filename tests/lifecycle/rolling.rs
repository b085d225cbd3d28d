//! A rolling restart under continuous load: three real backends behind a
//! client that balances over them with tower's P2C and retries with
//! `SafeRetry`; each backend in turn is drained, stopped and started again on
//! the same port. The client sees no failure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Path;
use axum::http::{Request, Response, StatusCode, Uri};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_scale::breaker::{BreakerConfig, CircuitBreakerLayer, HttpStatus};
use tower_scale::drain::{Drain, DrainReport};
use tower_scale::http::{ErrorResponseLayer, SafeRetry};

use crate::support::{bounded, wait_until};

/// One backend process, as a server task with its own drain.
struct Backend {
    addr: SocketAddr,
    drain: Drain,
    server: JoinHandle<()>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    /// Requests that reached this backend's handler, over all its lives.
    served: Arc<AtomicU64>,
}

impl Backend {
    async fn start(addr: SocketAddr, served: Arc<AtomicU64>) -> Backend {
        // The old listener on this port has closed; bind it again.
        let listener = bounded("the port to be free", async {
            loop {
                match TcpListener::bind(addr).await {
                    Ok(listener) => return listener,
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await;
        let addr = listener.local_addr().unwrap();
        let drain = Drain::builder()
            .readiness_delay(Duration::from_millis(100))
            .build();
        let counter = served.clone();
        let app = Router::new()
            .route(
                "/work/{id}",
                get(move |Path(id): Path<u64>| {
                    let counter = counter.clone();
                    async move {
                        counter.fetch_add(1, SeqCst);
                        tokio::time::sleep(Duration::from_millis(id % 7)).await;
                        format!("done {id}")
                    }
                }),
            )
            .layer(
                ServiceBuilder::new()
                    .layer(ErrorResponseLayer::new())
                    .layer(drain.layer().release_on_body_end()),
            );
        // This backend keeps accepting while it refuses, until told to stop,
        // so that clients meet its 503 refusals (with `signaled()` as the
        // shutdown they would mostly meet a closed port; tests/lifecycle/serve.rs
        // covers that way).
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        let server = tokio::spawn(async move {
            serve.await.expect("backend server");
        });
        Backend {
            addr,
            drain,
            server,
            shutdown,
            served,
        }
    }

    /// Drains the backend, keeps refusing for a while, then stops it;
    /// returns its report, refusals included.
    async fn stop(self) -> (DrainReport, SocketAddr, Arc<AtomicU64>) {
        let report = bounded(
            "the backend drain",
            self.drain.drain(Duration::from_secs(5)),
        )
        .await;
        assert!(report.is_complete(), "{report}");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let report = self.drain.drain(Duration::ZERO).await;
        let _ = self.shutdown.send(());
        bounded("the backend to exit", self.server).await.unwrap();
        (report, self.addr, self.served)
    }
}

type Body = Full<Bytes>;

/// The client: `Retry(SafeRetry) -> Buffer -> Balance(P2C)`, and per endpoint
/// a not-ready breaker (so P2C routes around a backend that is down) over a
/// hyper-util client aimed at that backend.
fn client(
    addrs: &[SocketAddr],
) -> impl Service<Request<Body>, Response = Response<Incoming>, Error = BoxError, Future: Send>
       + Clone
       + Send
       + 'static {
    let http: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let endpoints: Vec<_> = addrs
        .iter()
        .map(|&addr| {
            let http = http.clone();
            let connection = service_fn(move |mut request: Request<Body>| {
                let uri = format!("http://{addr}{}", request.uri().path());
                *request.uri_mut() = uri.parse::<Uri>().unwrap();
                http.request(request)
            });
            let config = BreakerConfig::builder()
                .consecutive_failures(2)
                .open_duration(Duration::from_millis(50))
                .build()
                .unwrap();
            let breaker =
                CircuitBreakerLayer::new(config)
                    .not_ready()
                    .classify(HttpStatus::failure_if(|status| {
                        status == StatusCode::SERVICE_UNAVAILABLE
                    }));
            PendingRequests::new(breaker.layer(connection), CompleteOnResponse::default())
        })
        .collect();
    let balance = Balance::new(ServiceList::new(endpoints));
    let retry = SafeRetry::builder()
        .max_retries(20)
        .backoff(Duration::from_millis(5), Duration::from_millis(100))
        .budget(tower::retry::budget::TpsBudget::new(
            Duration::from_secs(10),
            1_000,
            10.0,
        ))
        .build()
        .unwrap();
    ServiceBuilder::new()
        .layer(retry.into_layer())
        .service(Buffer::new(balance, 64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_no_request() {
    let mut backends = Vec::new();
    for _ in 0..3 {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        backends.push(Some(Backend::start(addr, Arc::default()).await));
    }
    let addrs: Vec<SocketAddr> = backends.iter().flatten().map(|b| b.addr).collect();
    let client = client(&addrs);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let (client, stop, ok, failures) =
                (client.clone(), stop.clone(), ok.clone(), failures.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(SeqCst) && n < 20_000 {
                    n += 1;
                    let id = w * 100_000 + n;
                    let request = Request::get(format!("/work/{id}"))
                        .body(Body::new(Bytes::new()))
                        .unwrap();
                    let result = bounded("a response", client.clone().oneshot(request)).await;
                    let outcome = match result {
                        Ok(response) => {
                            let status = response.status();
                            let body = response.into_body().collect().await.map(|b| b.to_bytes());
                            match body {
                                Ok(body)
                                    if status == StatusCode::OK && body == format!("done {id}") =>
                                {
                                    Ok(())
                                }
                                Ok(body) => Err(format!("{id}: {status} {body:?}")),
                                Err(err) => Err(format!("{id}: body {err}")),
                            }
                        }
                        Err(err) => Err(format!("{id}: {err:?}")),
                    };
                    match outcome {
                        Ok(()) => ok.fetch_add(1, SeqCst),
                        Err(failure) => {
                            failures.lock().unwrap().push(failure);
                            0
                        }
                    };
                }
            })
        })
        .collect();

    wait_until("traffic on every backend", || {
        backends
            .iter()
            .flatten()
            .all(|b| b.served.load(SeqCst) > 20)
    })
    .await;
    let mut reports = Vec::new();
    for slot in backends.iter_mut() {
        let backend = slot.take().unwrap();
        let (report, addr, served) = backend.stop().await;
        reports.push(report);
        tokio::time::sleep(Duration::from_millis(50)).await; // down for a while
        let served_before = served.load(SeqCst);
        let backend = Backend::start(addr, served).await;
        let counter = backend.served.clone();
        *slot = Some(backend);
        wait_until("the restarted backend to get traffic back", || {
            counter.load(SeqCst) > served_before + 20
        })
        .await;
    }
    stop.store(true, SeqCst);
    for worker in workers {
        bounded("a worker to stop", worker).await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    println!(
        "{} requests, {} failed; drains: {}",
        ok.load(SeqCst),
        failures.len(),
        reports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(SeqCst) > 100);
    for report in &reports {
        assert!(report.is_complete(), "{report}");
    }
    // Clients met draining refusals (503 with the marker), and retried them.
    assert!(reports.iter().map(DrainReport::refused).sum::<u64>() > 0);
    for backend in backends.into_iter().flatten() {
        backend.server.abort();
    }
}
