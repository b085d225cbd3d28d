//! Balancing policies over `tower::ready_cache`: weighted power of two
//! choices, round robin, smooth weighted round robin, least requests and
//! consistent hashing.
//!
//! tower's `p2c::Balance` samples endpoints uniformly, and an idle endpoint's
//! load ignores its weight, so it cannot honour weights (tower#696); nor can
//! it pick by something in the request. The services here can: a
//! [`Balancer`] with a request-independent [`Policy`], and [`ConsistentHash`],
//! which picks by a key read from the request. Both follow a
//! [`Discover`](tower::discover::Discover) stream (such as
//! [`discover::Static`](crate::discover::Static)) and keep their endpoints'
//! services in a [`ReadyCache`].
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::net::SocketAddr;
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_scale::balance::policy::{Balancer, SmoothWeightedRoundRobin};
//! use tower_scale::discover::{Endpoint, Static};
//!
//! let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
//! let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
//! let c: SocketAddr = "10.0.0.3:80".parse().unwrap();
//! // The endpoint factory: here a service that answers with its address.
//! let make = |endpoint: &Endpoint| {
//!     let addr = endpoint.addr();
//!     service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) })
//! };
//! let endpoints = [
//!     Endpoint::new(a).with_weight(500),
//!     Endpoint::new(b).with_weight(100),
//!     Endpoint::new(c).with_weight(100),
//! ];
//! let (discover, _handle) = Static::new(endpoints, make);
//! let mut balancer = Balancer::named("backend", discover, SmoothWeightedRoundRobin::new());
//!
//! let mut sequence = Vec::new();
//! for _ in 0..7 {
//!     sequence.push(balancer.ready().await.unwrap().call(()).await.unwrap());
//! }
//! // nginx's smooth sequence for weights 5, 1, 1.
//! assert_eq!(sequence, [a, a, b, a, c, a, a]);
//! # }
//! ```
//!
//! Consistent hashing on a header:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::net::SocketAddr;
//! use http::header::HeaderName;
//! use http::Request;
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_scale::balance::policy::{ConsistentHash, HashKey, RingHash};
//! use tower_scale::discover::{Endpoint, Static};
//!
//! let make = |endpoint: &Endpoint| {
//!     let addr = endpoint.addr();
//!     service_fn(move |_: Request<()>| async move { Ok::<_, tower::BoxError>(addr) })
//! };
//! let addrs: [SocketAddr; 3] = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].map(|a| a.parse().unwrap());
//! let (discover, _handle) = Static::new(addrs, make);
//! let key = HashKey::header(HeaderName::from_static("x-user-id"));
//! let mut balancer = ConsistentHash::new(discover, key, RingHash::default());
//!
//! let request = || Request::builder().header("x-user-id", "42").body(()).unwrap();
//! let first = balancer.ready().await.unwrap().call(request()).await.unwrap();
//! for _ in 0..10 {
//!     // The same key, the same endpoint.
//!     assert_eq!(balancer.ready().await.unwrap().call(request()).await.unwrap(), first);
//! }
//! # }
//! ```
//!
//! # Policies
//!
//! | policy | picks | cost of a pick (n ready) |
//! |---|---|---|
//! | [`WeightedP2c`] | two endpoints sampled by weight, the lower `load / weight` | O(log n) |
//! | [`RoundRobin`] | each endpoint in turn | O(1) |
//! | [`SmoothWeightedRoundRobin`] | nginx's smooth weighted round robin: exact shares over a cycle, spread out | O(n) |
//! | [`LeastRequests`] | the fewest requests in flight per unit of weight; ties at random by weight | O(n) |
//! | [`ConsistentHash`] | the endpoint a key hashes to on a ring | O(log(points)) |
//!
//! Weights come from the endpoint services' [`Weight`](crate::discover::Weight)
//! (the [`Weighted`](crate::discover::Weighted) wrapper the discovery sources
//! put on every service), are relative, and may change at run time: the
//! policies read them at every pick ([`SmoothWeightedRoundRobin`],
//! [`LeastRequests`], [`RoundRobin`]'s weight-0 test) or when the ready set
//! changes and at least every 1024 picks ([`WeightedP2c`]'s sampling table,
//! the hash ring). Every policy gives nothing to an endpoint of weight 0
//! while an endpoint with a weight is ready, and spreads over the weight-0
//! ones when nothing else is.
//!
//! # Readiness
//!
//! [`Balancer`] picks in `poll_ready`, as tower's `Balance` does: it is Ready
//! once the picked endpoint's `poll_ready` is, and the next `call` goes to
//! that endpoint. An endpoint that is not ready is not picked: its service
//! waits in the ready cache's pending set, driven by every `poll_ready` of
//! the balancer, and rejoins when ready (a circuit breaker in not-ready mode
//! takes an endpoint out this way). With no ready endpoint, `poll_ready` is
//! Pending: wrap the balancer in [`ReadyTimeout`](crate::balance::ReadyTimeout)
//! to bound the wait with [`NoEndpoints`](crate::error::NoEndpoints).
//!
//! Unlike tower's `Balance`, an endpoint that was called stays in the ready
//! set: it is polled again when next picked, immediately before it is used,
//! instead of going back to the pending set after every call. That keeps
//! the order of the ready set (round robin follows it) and costs no
//! allocation per pick (the pending set allocates a task for every service
//! pushed into it).
//!
//! Nothing here fails on its own account: a discovery error is logged and
//! skipped, the end of a discovery stream keeps the last set, and an
//! endpoint whose `poll_ready` fails is dropped, with a warning, until
//! discovery inserts it again. An `Insert` for a key already known replaces
//! its service once the new one is ready (the old one serves until then); a
//! `Remove` drops it at once.
//!
//! # Consistent hashing
//!
//! [`ConsistentHash`] reads a key from each request ([`HashKey`]: a header,
//! the client's IP address, `X-Forwarded-For` when configured, or a
//! closure) and sends it to the endpoint that owns the key's hash on a ring.
//!
//! **The ring** is Ketama's: each endpoint has virtual nodes (points) in
//! proportion to its weight, 160 for the default weight unless
//! [`RingHash`] says otherwise, at positions that depend only on the
//! endpoint's key (its `Display` form, such as `10.0.0.1:80`) hashed with a
//! hash that is the same in every process; a key belongs to the first
//! point at or after its hash, found by binary search. Why a ring and not
//! Maglev or rendezvous hashing:
//!
//! - **Reshuffling.** Adding an endpoint adds only its points: the keys that
//!   move are those that now land on it, about `1/(n+1)` of them, and no
//!   key moves between endpoints that stay. Removing one moves only its own
//!   keys. Maglev rebuilds a lookup table whose entries shift between
//!   endpoints that stay (a few percent beyond the minimum, by the Maglev
//!   paper); rendezvous hashing is as stable as a ring.
//! - **Cost of a pick.** A binary search over the points: 17 steps for 1000
//!   endpoints of 160 points. Maglev's table lookup is O(1), rendezvous
//!   hashing O(n): too slow for large sets.
//! - **Memory.** 12 bytes a point: 1.9 MB for 1000 endpoints of 160 points.
//!   A Maglev table is fixed (65 537 entries, 256 KB) but its rebuild costs
//!   O(table size) on every change, as a ring's does O(points log points).
//! - **Not-ready endpoints.** A ring has a natural next choice, the next
//!   point; Maglev needs a second table.
//!
//! The spread over endpoints is within about 10% of the weights with 160
//! points each (more points, less spread, more memory). The ring is rebuilt
//! when the membership changes and when a weight changes (seen within 1024
//! picks).
//!
//! **Readiness.** The key is only known in `call`, so the pick cannot happen
//! in `poll_ready`. Like tower's `Steer`, `poll_ready` is Ready when at least
//! one endpoint is ready: it picks one (for requests without a key, and as a
//! last resort). `call` then walks the ring from the key's hash to the first
//! endpoint that is ready, polling it again (without a waker: one found not
//! ready goes back to the pending set, polled with the caller's waker by the
//! next `poll_ready`). So **a key moves only while its endpoint is not
//! ready**, to the next endpoint on the ring, and comes back when it is.
//!
//! **Requests without a key** (no such header, no client address) go to the
//! endpoint `poll_ready` picked: the first ready endpoint after a random
//! point of the ring, so they are spread in proportion to the points, that
//! is to weight.
//!
//! # Metrics
//!
//! With a `name` label per balancer ([`Balancer::named`],
//! [`ConsistentHash::named`]; `"default"` otherwise):
//!
//! - `tower_scale_endpoint_requests_total{name, endpoint}`: requests sent to
//!   each endpoint (`endpoint` is the key's `Display` form); the counter is
//!   registered once, when the endpoint is inserted.
//! - `tower_scale_endpoints{name, state="ready"|"pending"}`: endpoints by
//!   state; `ready` counts those that were ready when last polled.
//!
//! Tracing events (debug) mark each insert, replacement and removal, a
//! warning each failed endpoint, discovery error and end of discovery.

use std::hash::Hash;

use tower::ready_cache::ReadyCache;

use self::core::Node;

mod balancer;
mod core;
pub mod future;
mod hash;
mod pick;
mod ring;

#[cfg(test)]
mod tests;

pub use self::balancer::Balancer;
pub use self::hash::{ClientAddr, ConsistentHash, HashKey, RingHash};
pub use self::pick::{LeastRequests, RoundRobin, SmoothWeightedRoundRobin, WeightedP2c};

/// How a [`Balancer`] picks among its ready endpoints: [`WeightedP2c`],
/// [`RoundRobin`], [`SmoothWeightedRoundRobin`] or [`LeastRequests`].
///
/// `S` is the endpoint service. Sealed: the policies are the ones here.
pub trait Policy<S>: sealed::Sealed {
    /// Whether the balancer counts each endpoint's requests in flight.
    #[doc(hidden)]
    const TRACK_IN_FLIGHT: bool;

    /// The index of the picked endpoint in the ready set, or `None` if it is
    /// empty. `changed`: the ready set changed since the last pick.
    #[doc(hidden)]
    fn pick<K: Eq + Hash, Req>(
        &mut self,
        ready: &mut ReadyCache<K, Node<S>, Req>,
        changed: bool,
    ) -> Option<usize>;
}

pub(crate) mod sealed {
    pub trait Sealed {}
}
