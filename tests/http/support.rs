//! Shared pieces of the HTTP integration tests: a real axum server on
//! `127.0.0.1:0`, real HTTP/1 and HTTP/2 clients, a gate that holds handlers
//! until the test lets them go, and bounded waits.
//!
//! Everything runs in real time. Waits poll a condition until a generous bound
//! and panic with what they waited for; nothing asserts a duration.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap, Request, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// How long any single wait in these tests may take before the test fails. It
/// is far above what any step needs, so it only fires when something hangs.
pub const BOUND: Duration = Duration::from_secs(10);

/// An axum server on an ephemeral loopback port; stops accepting when dropped.
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    pub async fn start(app: Router) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("server failed");
        });
        Server { addr, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Holds handlers until the test releases them, and counts them.
///
/// A handler calls [`Gate::pass`]: it is counted as started and running, waits
/// for a permit, and is counted out when it returns or is cancelled.
#[derive(Clone)]
pub struct Gate(Arc<GateInner>);

struct GateInner {
    permits: Semaphore,
    arrived: AtomicUsize,
    started: AtomicUsize,
    running: AtomicUsize,
    max: AtomicUsize,
    order: Mutex<Vec<String>>,
}

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(GateInner {
            permits: Semaphore::new(0),
            arrived: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
            order: Mutex::new(Vec::new()),
        }))
    }

    /// Called by a handler: records `label` in start order, then waits for a
    /// permit (or for [`open`](Self::open)).
    pub async fn pass(&self, label: String) {
        struct Running<'a>(&'a GateInner);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.running.fetch_sub(1, SeqCst);
            }
        }

        let inner = &*self.0;
        let now = inner.running.fetch_add(1, SeqCst) + 1;
        let _running = Running(inner);
        inner.max.fetch_max(now, SeqCst);
        inner.order.lock().unwrap().push(label);
        inner.started.fetch_add(1, SeqCst);
        if let Ok(permit) = inner.permits.acquire().await {
            permit.forget();
        }
    }

    /// Lets `n` blocked (or future) handlers finish.
    pub fn release(&self, n: usize) {
        self.0.permits.add_permits(n);
    }

    /// Lets every handler, now and later, through.
    pub fn open(&self) {
        self.0.permits.close();
    }

    pub fn arrived(&self) -> usize {
        self.0.arrived.load(SeqCst)
    }

    pub fn started(&self) -> usize {
        self.0.started.load(SeqCst)
    }

    pub fn running(&self) -> usize {
        self.0.running.load(SeqCst)
    }

    /// The most handlers ever seen running at once.
    pub fn max(&self) -> usize {
        self.0.max.load(SeqCst)
    }

    /// The labels handlers passed, in the order they started.
    pub fn order(&self) -> Vec<String> {
        self.0.order.lock().unwrap().clone()
    }
}

/// Which HTTP version a [`Client`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// A new TCP connection per request.
    Http1,
    /// Every request a stream on one shared h2c (prior knowledge) connection.
    Http2,
}

/// A complete response: status, headers and the whole body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// The `tower-scale-rejected` marker, if any.
    pub fn rejected(&self) -> Option<&str> {
        self.header(tower_scale::http::REJECTED_HEADER)
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }
}

/// A response whose body is still arriving. Dropping it closes the HTTP/1
/// connection it came on, or resets its HTTP/2 stream.
pub struct Streaming {
    pub response: Response<Incoming>,
    conn: Option<JoinHandle<()>>,
}

impl Streaming {
    /// The next data frame, or `None` once the body has ended.
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            let frame = bounded("the next body frame", self.response.body_mut().frame()).await?;
            if let Ok(data) = frame.expect("body frame").into_data() {
                return Some(data);
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.abort();
        }
    }
}

/// A real HTTP client for the server at `addr`.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    h2: Option<http2::SendRequest<Empty<Bytes>>>,
}

impl Client {
    pub async fn new(addr: SocketAddr, proto: Proto) -> Client {
        let h2 = match proto {
            Proto::Http1 => None,
            Proto::Http2 => {
                let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Some(sender)
            }
        };
        Client { addr, h2 }
    }

    /// Sends `GET path` and reads the whole response. Every step is bounded.
    pub async fn get(&self, path: &str) -> Reply {
        let mut streaming = self.get_streaming(path).await;
        let status = streaming.response.status();
        let headers = streaming.response.headers().clone();
        let body = bounded("the response body", streaming.response.body_mut().collect())
            .await
            .expect("response body")
            .to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// Sends `GET path` and returns as soon as the response head arrives.
    pub async fn get_streaming(&self, path: &str) -> Streaming {
        let uri = format!("http://{}{}", self.addr, path);
        match &self.h2 {
            Some(sender) => {
                let mut sender = sender.clone();
                let request = Request::get(uri).body(Empty::new()).unwrap();
                bounded("the h2 connection to be ready", sender.ready())
                    .await
                    .expect("h2 connection");
                let response = bounded("the response head", sender.send_request(request))
                    .await
                    .expect("h2 request");
                Streaming {
                    response,
                    conn: None,
                }
            }
            None => {
                let stream = bounded("the TCP connection", TcpStream::connect(self.addr))
                    .await
                    .expect("connect");
                let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .expect("http1 handshake");
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                let request = Request::get(path)
                    .header(header::HOST, self.addr.to_string())
                    .body(Empty::new())
                    .unwrap();
                let response = bounded("the response head", sender.send_request(request))
                    .await
                    .unwrap_or_else(|e| panic!("GET {uri}: {e}"));
                Streaming {
                    response,
                    conn: Some(conn),
                }
            }
        }
    }

    /// Sends `GET path` from a task of its own.
    pub fn spawn_get(&self, path: impl Into<String>) -> JoinHandle<Reply> {
        let client = self.clone();
        let path = path.into();
        tokio::spawn(async move { client.get(&path).await })
    }
}

/// Waits for every request; fails the test if one is not answered in time.
pub async fn answers(requests: Vec<JoinHandle<Reply>>) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(requests.len());
    for request in requests {
        let reply = bounded("a response", request).await.expect("request task");
        replies.push(reply);
    }
    replies
}

/// Runs `fut` to completion, failing the test if it takes longer than [`BOUND`].
pub async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what} ({BOUND:?})"))
}

/// Polls `condition` until it holds, failing the test after [`BOUND`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Counts replies by `(status, rejected marker)`.
pub fn count(replies: &[Reply], status: StatusCode, rejected: Option<&str>) -> usize {
    replies
        .iter()
        .filter(|r| r.status == status && r.rejected() == rejected)
        .count()
}

/// A layer that counts requests as they reach it, is always ready, and calls a
/// clone of its inner service, the way axum calls a route. Put in front of a
/// limit, it tells how many requests arrived even while the limit holds them
/// in `poll_ready` (tower's `MapRequest` would wait there with them).
#[derive(Clone)]
pub struct CountArrivals {
    gate: Gate,
}

impl Gate {
    pub fn count_arrivals(&self) -> CountArrivals {
        CountArrivals { gate: self.clone() }
    }
}

impl<S> tower::Layer<S> for CountArrivals {
    type Service = CountArrivalsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountArrivalsService {
            inner,
            gate: self.gate.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CountArrivalsService<S> {
    inner: S,
    gate: Gate,
}

impl<S> tower::Service<axum::extract::Request> for CountArrivalsService<S>
where
    S: tower::Service<axum::extract::Request> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        use tower::ServiceExt as _;
        self.gate.0.arrived.fetch_add(1, SeqCst);
        Box::pin(self.inner.clone().oneshot(request))
    }
}
