//! The breaker's integration tests use the HTTP tests' real server, client and
//! bounded waits.

#[allow(dead_code)]
#[path = "../http/support.rs"]
mod http_support;

use std::net::SocketAddr;

pub use http_support::{bounded, wait_until, Reply, Server};
use http_support::{Client, Proto};

/// Sends `GET path` to `addr` on a new HTTP/1 connection and reads the whole
/// response. Every step is bounded.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    Client::new(addr, Proto::Http1).await.get(path).await
}
