//! DNS discovery: a source that re-resolves a name and emits the differences
//! (feature `dns`).
//!
//! [`Dns`] resolves a name with [hickory-resolver], the A and AAAA records
//! with a port given to the builder or the SRV records (which carry ports and
//! weights), and turns each address into a service with an endpoint factory,
//! like [`Static`](super::Static). It is a [`tower::discover::Discover`]
//! stream that never fails and never ends, so it can feed tower's `Balance`
//! or the policies in [`crate::balance`].
//!
//! # Example
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! use std::time::Duration;
//! use tower::balance::p2c::Balance;
//! use tower::load::{CompleteOnResponse, PendingRequests};
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_scale::discover::dns::DnsBuilder;
//! use tower_scale::discover::Endpoint;
//!
//! // The factory: an endpoint to a service (here one that names its address).
//! let make = |endpoint: &Endpoint| {
//!     let addr = endpoint.addr();
//!     let svc = service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) });
//!     PendingRequests::new(svc, CompleteOnResponse::default())
//! };
//! let discover = DnsBuilder::new("api.internal.example")
//!     .port(8080)
//!     .min_interval(Duration::from_secs(2))
//!     .max_interval(Duration::from_secs(30))
//!     .name("api")
//!     .build(make)?;
//! let mut balance = Balance::new(discover);
//! let addr = balance.ready().await?.call(()).await?;
//! println!("answered by {addr}");
//! # Ok(())
//! # }
//! ```
//!
//! For SRV records, `DnsBuilder::new("_http._tcp.api.internal.example").srv()`:
//! ports and weights then come from the records.
//!
//! # When it resolves
//!
//! The first resolution starts when the stream is first polled (building the
//! source reads the resolver configuration but spawns nothing and starts no
//! timer). After an answer, the next resolution is due after the smallest TTL
//! of the records in it (address, SRV and CNAME records alike), clamped to
//! [`min_interval`](DnsBuilder::min_interval) ..=
//! [`max_interval`](DnsBuilder::max_interval): a TTL of 0 does not make the
//! source hammer the server, and a long TTL does not hide changes for hours.
//! The resolver's own cache is bypassed, so each resolution asks the name
//! servers (a caching server in between may still answer from its cache).
//! After a failure the next attempt is due after `min_interval`. One
//! resolution that takes longer than [`timeout`](DnsBuilder::timeout) fails.
//!
//! # What it emits
//!
//! The first successful answer inserts every endpoint; later answers emit
//! only the differences, inserts first and then removals (each in address
//! order), so a consumer that applies them one at a time never sees the set
//! empty while one instance replaces another. A weight that changes (SRV) is
//! written to the shared weight of the endpoint's [`Weighted`]
//! service, which stays: no remove and re-insert, no lost connections.
//!
//! With SRV records, only those of the lowest priority are used (RFC 2782:
//! the others are backups, used when the lower ones leave DNS); each address
//! of a target gets the record's port and weight; if every weight is 0
//! ("no preference"), each gets [`DEFAULT_WEIGHT`](super::DEFAULT_WEIGHT); an
//! address named by several records gets the sum. A/AAAA endpoints get
//! `DEFAULT_WEIGHT`.
//!
//! # Failures and empty answers
//!
//! A resolution that fails (timeout, unreachable server, SERVFAIL, REFUSED)
//! changes nothing: the last good set stays, the failure is counted and
//! logged, and the source tries again after `min_interval`. A failure of the
//! A or the AAAA query fails the whole resolution, so a timeout on one
//! family never shrinks the set.
//!
//! **An answer without any address never removes the last endpoints.** That
//! covers NXDOMAIN, NOERROR without records, and SRV records whose targets
//! do not resolve: they are treated as failures. An empty set helps no
//! caller (the balancer could only answer "no endpoints"), while keeping the
//! last endpoints costs little: if they are really gone, connections to them
//! fail and the health checks and outlier ejection take them out of
//! rotation; if the empty answer was a transient mistake (a zone being
//! reloaded, a record briefly deleted, a misbehaving server), nothing was
//! lost. Waiting for two empty answers in a row would only postpone the same
//! outcome by one interval. A service scaled to zero therefore keeps its
//! last addresses in the source until they come back or the source is
//! dropped. Answers that shrink the set without emptying it are applied.
//!
//! # Resolver
//!
//! By default the system configuration (`/etc/resolv.conf` on Unix, and
//! `/etc/hosts`) is read when [`DnsBuilder::build`] is called; with
//! [`DnsBuilder::name_server`] only the given servers are asked (over UDP,
//! and TCP for truncated answers), and the hosts file is not read.
//!
//! # Metrics
//!
//! With the `name` label set by [`DnsBuilder::name`] (`"default"` unless
//! set):
//!
//! - `tower_scale_discovery_updates_total{name, change="insert"|"remove"}`,
//!   a counter of the changes emitted (as for [`Static`](super::Static));
//! - `tower_scale_discovery_errors_total{name}`, a counter of resolutions
//!   that failed or gave no address (the set was kept);
//! - `tower_scale_discovery_endpoints{name}`, a gauge of the endpoints in
//!   the current set.
//!
//! Tracing: `info` when an endpoint is added or removed, `debug` when a
//! weight changes, `warn` at the first failure of a series (later ones of
//! the same series at `debug`, every one counted), and `info` when
//! resolution recovers.
//!
//! [hickory-resolver]: https://docs.rs/hickory-resolver

mod builder;
mod resolve;
#[cfg(test)]
mod tests;

pub use self::builder::DnsBuilder;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_core::future::BoxFuture;
use futures_core::Stream;
use tokio::time::{Instant, Sleep};
use tower::discover::Change;

use self::resolve::{Answer, Failure};
use super::{Endpoint, Weighted};

/// Starts one resolution.
type Resolve = Arc<dyn Fn() -> BoxFuture<'static, Result<Answer, Failure>> + Send + Sync>;

/// When the source resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timing {
    min_interval: Duration,
    max_interval: Duration,
    timeout: Duration,
}

impl Timing {
    /// The delay before the next resolution after an answer whose smallest
    /// TTL is `ttl`.
    fn after_answer(&self, ttl: Option<Duration>) -> Duration {
        ttl.map_or(self.max_interval, |ttl| {
            ttl.clamp(self.min_interval, self.max_interval)
        })
    }
}

/// A discovery source that resolves a DNS name every interval and emits the
/// differences; see the [module docs](self) for the example, the schedule
/// and the failure policy.
///
/// Built with [`DnsBuilder`]. It yields
/// `Result<Change<SocketAddr, Weighted<S>>, Infallible>`: it never fails and
/// never ends. It is `Unpin`, and `Send` and `Sync` when the factory and the
/// services are.
pub struct Dns<F, S> {
    make: F,
    resolve: Resolve,
    timing: Timing,
    host: Arc<str>,
    state: State,
    /// Reused from one interval to the next; made on first use.
    sleep: Option<Pin<Box<Sleep>>>,
    changes: VecDeque<Change<SocketAddr, Weighted<S>>>,
    current: BTreeMap<SocketAddr, Arc<AtomicU32>>,
    /// Failures since the last good answer.
    failures: u64,
    metrics: crate::discover::SourceMetrics,
}

enum State {
    /// Never polled: resolve at once.
    Start,
    /// Waiting for `sleep`.
    Waiting,
    /// A resolution in flight. Only reached through `&mut self`
    /// (`Mutex::get_mut`, no locking): the mutex makes the source `Sync`
    /// although the resolver's future is not.
    Resolving(Mutex<BoxFuture<'static, Result<Answer, Failure>>>),
}

impl<F, S> Dns<F, S>
where
    F: FnMut(&Endpoint) -> S,
{
    fn with_resolve(resolve: Resolve, timing: Timing, host: &str, name: &str, make: F) -> Self {
        let metrics = crate::discover::SourceMetrics::new(name);
        metrics.endpoints.set(0.0);
        Dns {
            make,
            resolve,
            timing,
            host: host.into(),
            state: State::Start,
            sleep: None,
            changes: VecDeque::new(),
            current: BTreeMap::new(),
            failures: 0,
            metrics,
        }
    }

    /// The endpoints the source has announced (after the changes it has
    /// emitted so far, and those it is about to).
    pub fn len(&self) -> usize {
        self.current.len()
    }

    /// Whether the source has no endpoint (before the first good answer).
    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    fn start(&self) -> State {
        let resolution = (self.resolve)();
        let timeout = self.timing.timeout;
        State::Resolving(Mutex::new(Box::pin(async move {
            tokio::time::timeout(timeout, resolution)
                .await
                .unwrap_or(Err(Failure::TimedOut))
        })))
    }

    /// Applies the result of a resolution; returns the delay before the next.
    fn apply(&mut self, result: Result<Answer, Failure>) -> Duration {
        let (name, host) = (self.metrics.name.clone(), self.host.clone());
        let (name, host) = (&*name, &*host);
        match result {
            Ok(answer) => {
                if self.failures > 0 {
                    tracing::info!(
                        name,
                        host,
                        failures = self.failures,
                        "DNS resolution recovered"
                    );
                    self.failures = 0;
                }
                self.update(&answer.endpoints);
                let delay = self.timing.after_answer(answer.ttl);
                tracing::trace!(name, host, endpoints = self.current.len(), ?answer.ttl, ?delay, "DNS answer");
                delay
            }
            Err(failure) => {
                self.failures += 1;
                self.metrics.errors.increment(1);
                let endpoints = self.current.len();
                if self.failures == 1 {
                    tracing::warn!(name, host, error = %failure, endpoints, "DNS resolution failed; keeping the last good endpoints");
                } else {
                    tracing::debug!(name, host, error = %failure, endpoints, failures = self.failures, "DNS resolution failed again");
                }
                self.timing.min_interval
            }
        }
    }

    /// Makes `set` (never empty) the current set: queues the inserts, then
    /// the removals, and updates the weights of the endpoints that stay.
    fn update(&mut self, set: &BTreeMap<SocketAddr, u32>) {
        debug_assert!(!set.is_empty(), "an empty answer is a failure");
        let name = &*self.metrics.name;
        for (&addr, &weight) in set {
            if let Some(shared) = self.current.get(&addr) {
                let old = shared.swap(weight, Relaxed);
                if old != weight {
                    tracing::debug!(name, %addr, old, weight, "endpoint weight changed");
                }
                continue;
            }
            let endpoint = Endpoint::new(addr).with_weight(weight);
            let shared = Arc::new(AtomicU32::new(weight));
            let service = Weighted::shared((self.make)(&endpoint), shared.clone());
            self.current.insert(addr, shared);
            self.changes.push_back(Change::Insert(addr, service));
            self.metrics.inserted.increment(1);
            tracing::info!(name, %endpoint, "endpoint added");
        }
        let gone: Vec<SocketAddr> = self
            .current
            .keys()
            .filter(|addr| !set.contains_key(addr))
            .copied()
            .collect();
        for addr in gone {
            self.current.remove(&addr);
            self.changes.push_back(Change::Remove(addr));
            self.metrics.removed.increment(1);
            tracing::info!(name, %addr, "endpoint removed");
        }
        self.metrics.endpoints.set(self.current.len() as f64);
    }

    fn wait(&mut self, delay: Duration) {
        crate::discover::rearm(&mut self.sleep, Instant::now() + delay);
        self.state = State::Waiting;
    }
}

// Nothing in a `Dns` is ever pinned: the resolution and the timer are boxed,
// the services wait in a heap queue.
impl<F, S> Unpin for Dns<F, S> {}

impl<F, S> Stream for Dns<F, S>
where
    F: FnMut(&Endpoint) -> S,
{
    type Item = Result<Change<SocketAddr, Weighted<S>>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(change) = this.changes.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match &mut this.state {
                State::Start => this.state = this.start(),
                State::Waiting => {
                    let sleep = this.sleep.as_mut().expect("a timer is set while waiting");
                    ready!(sleep.as_mut().poll(cx));
                    this.state = this.start();
                }
                State::Resolving(resolution) => {
                    let resolution = resolution.get_mut().unwrap_or_else(PoisonError::into_inner);
                    let result = ready!(resolution.as_mut().poll(cx));
                    let delay = this.apply(result);
                    this.wait(delay);
                }
            }
        }
    }
}

impl<F, S> fmt::Debug for Dns<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dns")
            .field("host", &self.host)
            .field("name", &self.metrics.name)
            .field("endpoints", &self.current.len())
            .field("pending_changes", &self.changes.len())
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}
