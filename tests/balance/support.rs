//! Real axum backends on 127.0.0.1 whose behaviour the test changes while
//! they run, and a client-side load loop. Everything runs in real time; waits
//! are bounded and tests assert counts and shares, never durations.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::{BoxError, Service, ServiceExt};

pub type Body = Empty<Bytes>;

/// How long any single wait may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(20);

/// Runs `fut`, failing the test if it takes longer than [`BOUND`].
pub async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what} ({BOUND:?})"))
}

/// Polls `condition` until it holds, failing the test after [`BOUND`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    bounded(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// What a backend does with each request.
#[derive(Default)]
pub struct Behaviour {
    /// Extra latency per request, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Answer 500 instead of 200.
    pub failing: AtomicBool,
}

/// One backend: an axum server answering `/` with its index, and `/health`.
pub struct Backend {
    pub index: usize,
    pub addr: SocketAddr,
    pub behaviour: Arc<Behaviour>,
    pub served: Arc<AtomicUsize>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Backend {
    /// Starts a backend on `addr` (port 0 picks one).
    pub async fn start(index: usize, addr: SocketAddr) -> Arc<Backend> {
        let listener = bind(addr).await;
        let backend = Arc::new(Backend {
            index,
            addr: listener.local_addr().unwrap(),
            behaviour: Arc::default(),
            served: Arc::default(),
            server: Mutex::new(None),
        });
        backend.serve(listener);
        backend
    }

    fn serve(&self, listener: TcpListener) {
        let (behaviour, served, index) = (self.behaviour.clone(), self.served.clone(), self.index);
        let app = Router::new()
            .route(
                "/",
                get(move || {
                    let (behaviour, served) = (behaviour.clone(), served.clone());
                    async move {
                        let delay = behaviour.delay_ms.load(SeqCst);
                        if delay > 0 {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                        }
                        served.fetch_add(1, SeqCst);
                        if behaviour.failing.load(SeqCst) {
                            (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                format!("backend {index} failed"),
                            )
                        } else {
                            (StatusCode::OK, format!("backend {index}"))
                        }
                    }
                }),
            )
            .route("/health", get(|| async { "ok" }));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }

    /// Stops the server: its connections are closed, new ones refused.
    pub fn kill(&self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Starts the server again on the same address.
    pub async fn restart(&self) {
        self.serve(bind(self.addr).await);
    }

    pub fn served(&self) -> usize {
        self.served.load(SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Binds `addr`, waiting for a port that was just closed to be free again.
async fn bind(addr: SocketAddr) -> TcpListener {
    bounded("the port to be free", async {
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await
}

/// Starts `n` backends.
pub async fn backends(n: usize) -> Vec<Arc<Backend>> {
    let mut all = Vec::new();
    for index in 0..n {
        all.push(Backend::start(index, "127.0.0.1:0".parse().unwrap()).await);
    }
    all
}

/// What one request got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Got {
    /// 200 from backend `n`.
    Ok(usize),
    /// Another status, or an error.
    Failed(String),
}

/// Sends `GET /` through `client` and reads the answer.
pub async fn send<S>(client: &mut S) -> Got
where
    S: Service<axum::http::Request<Body>, Response = axum::http::Response<hyper::body::Incoming>>,
    S::Error: Into<BoxError>,
{
    let request = axum::http::Request::get("http://backend/")
        .body(Body::new())
        .unwrap();
    let ready = match bounded("the client to be ready", client.ready()).await {
        Ok(ready) => ready,
        Err(err) => return Got::Failed(format!("not ready: {}", err.into())),
    };
    match bounded("a response", ready.call(request)).await {
        Ok(response) => read(response).await,
        Err(err) => Got::Failed(format!("{}", err.into())),
    }
}

/// Like [`send`], on a clone of `client` driven by `oneshot` (a `Buffer`
/// shared by several tasks).
pub async fn send_cloned<S>(client: S) -> Got
where
    S: Service<
            axum::http::Request<Body>,
            Response = axum::http::Response<hyper::body::Incoming>,
            Error = BoxError,
        > + Clone,
{
    let request = axum::http::Request::get("http://backend/")
        .body(Body::new())
        .unwrap();
    match bounded("a response", client.oneshot(request)).await {
        Ok(response) => read(response).await,
        Err(err) => Got::Failed(err.to_string()),
    }
}

async fn read(response: axum::http::Response<hyper::body::Incoming>) -> Got {
    let status = response.status();
    let body = bounded("a body", response.into_body().collect())
        .await
        .map(|b| b.to_bytes());
    match body {
        Ok(body) if status == StatusCode::OK => {
            let text = String::from_utf8_lossy(&body);
            Got::Ok(text.trim_start_matches("backend ").parse().unwrap())
        }
        Ok(body) => Got::Failed(format!("{status}: {}", String::from_utf8_lossy(&body))),
        Err(err) => Got::Failed(format!("body: {err}")),
    }
}

/// Counts per backend index, and failures.
pub fn tally(got: &[Got], backends: usize) -> (Vec<usize>, usize) {
    let mut counts = vec![0; backends];
    let mut failed = 0;
    for g in got {
        match g {
            Got::Ok(i) => counts[*i] += 1,
            Got::Failed(_) => failed += 1,
        }
    }
    (counts, failed)
}
