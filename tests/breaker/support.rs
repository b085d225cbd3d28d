//! Shared pieces of the breaker integration tests: a real axum server on
//! `127.0.0.1:0`, a real HTTP/1 client (one TCP connection per request), and
//! bounded waits (adapted from `tests/http/support.rs`).
//!
//! Everything here runs in real time. Waits poll a condition until a generous
//! bound and panic with what they waited for; nothing asserts a duration.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long any single wait may take before the test fails. It is far above
/// what any step needs, so it only fires when something hangs.
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
}

/// Sends `GET path` to `addr` on a new TCP connection and reads the whole
/// response. Every step is bounded.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    let stream = bounded("the TCP connection", TcpStream::connect(addr))
        .await
        .expect("connect");
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .expect("http1 handshake");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::new())
        .unwrap();
    let mut response = bounded("the response head", sender.send_request(request))
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let body = bounded("the response body", response.body_mut().collect())
        .await
        .expect("response body")
        .to_bytes();
    conn.abort();
    Reply {
        status,
        headers,
        body,
    }
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
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
