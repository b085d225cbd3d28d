//! What every policy service shares: the discovery stream, the ready cache of
//! endpoint services, the membership, the metrics, a fast random number
//! generator and a stable hash.

use std::collections::HashMap;
use std::fmt::{self, Display};
use std::hash::{BuildHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::{Counter, Gauge};
use tower::discover::{Change, Discover};
use tower::ready_cache::ReadyCache;
use tower::Service;

use crate::discover::Weight;
use crate::error::BoxError;

/// An endpoint's service as the ready cache holds it: the service, its
/// request counter (registered once, when the endpoint is inserted) and its
/// in-flight count.
///
/// It moves between the ready and the pending set with the service, so what
/// it carries (the in-flight count, the smooth weighted round robin's current
/// weight) survives a change of readiness.
pub struct Node<S> {
    pub(super) inner: S,
    requests: Counter,
    pub(super) in_flight: Arc<AtomicUsize>,
    /// Smooth weighted round robin's current weight.
    pub(super) current: i64,
}

impl<S> Node<S> {
    fn new(inner: S, requests: Counter) -> Self {
        Node {
            inner,
            requests,
            in_flight: Arc::new(AtomicUsize::new(0)),
            current: 0,
        }
    }

    /// Calls the service; `track` takes an in-flight count that the response
    /// future gives back.
    #[inline]
    pub(super) fn dispatch<Req>(
        &mut self,
        request: Req,
        track: bool,
    ) -> (S::Future, Option<InFlight>)
    where
        S: Service<Req>,
    {
        self.requests.increment(1);
        let guard = if track {
            self.in_flight.fetch_add(1, Relaxed);
            Some(InFlight(self.in_flight.clone()))
        } else {
            None
        };
        (self.inner.call(request), guard)
    }

    #[inline]
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

impl<S: Weight> Node<S> {
    #[inline]
    pub(super) fn weight(&self) -> u32 {
        self.inner.weight()
    }
}

impl<S: fmt::Debug> fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("inner", &self.inner)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req> Service<Req> for Node<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Req) -> S::Future {
        // Not reached: the policies dispatch with `Node::dispatch`; the ready
        // cache only polls readiness.
        self.requests.increment(1);
        self.inner.call(request)
    }
}

/// One call in flight on an endpoint, given back when dropped.
#[derive(Debug)]
pub(super) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// The ready cache of a policy service.
pub(super) type Cache<D, Req> =
    ReadyCache<<D as Discover>::Key, Node<<D as Discover>::Service>, Req>;

/// The discovery stream, the endpoints and the metrics of a policy service.
pub(super) struct Core<D: Discover, Req>
where
    D::Key: Hash,
{
    discover: D,
    discover_ended: bool,
    pub(super) cache: Cache<D, Req>,
    /// Every endpoint discovery announced, with its weight when announced
    /// (ready, pending, or dropped by the cache after failing).
    pub(super) members: HashMap<D::Key, u32>,
    /// The ready set changed (order or content) since the policy last looked.
    ready_changed: bool,
    /// The membership changed since the policy last looked.
    members_changed: bool,
    name: String,
    ready_gauge: Gauge,
    pending_gauge: Gauge,
    reported: (usize, usize),
}

impl<D, Req> Core<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    pub(super) fn new(discover: D, name: &str) -> Self
    where
        D::Service: Service<Req>,
    {
        let gauge = |state: &'static str| metrics::gauge!("tower_scale_endpoints", "name" => name.to_owned(), "state" => state);
        Core {
            discover,
            discover_ended: false,
            cache: ReadyCache::default(),
            members: HashMap::new(),
            ready_changed: false,
            members_changed: false,
            name: name.to_owned(),
            ready_gauge: gauge("ready"),
            pending_gauge: gauge("pending"),
            reported: (0, 0),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Endpoints known to the cache, ready or pending.
    pub(super) fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether the ready set changed since the last call.
    #[inline]
    pub(super) fn take_ready_changed(&mut self) -> bool {
        std::mem::take(&mut self.ready_changed)
    }

    /// Whether the ready set changed since the last `take_ready_changed`.
    #[inline]
    pub(super) fn ready_changed(&self) -> bool {
        self.ready_changed
    }

    /// Whether the membership changed since the last call.
    #[inline]
    pub(super) fn take_members_changed(&mut self) -> bool {
        std::mem::take(&mut self.members_changed)
    }

    /// Records that the ready set changed (an endpoint checked not ready or
    /// failed).
    #[inline]
    pub(super) fn mark_ready_changed(&mut self) {
        self.ready_changed = true;
    }
}

impl<D, Req> Core<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + Display,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Weight,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    /// Applies what discovery announced and drives pending endpoints; never
    /// fails.
    pub(super) fn update(&mut self, cx: &mut Context<'_>) {
        self.poll_discover(cx);
        self.promote_pending(cx);
        self.report();
    }

    fn poll_discover(&mut self, cx: &mut Context<'_>) {
        while !self.discover_ended {
            match Pin::new(&mut self.discover).poll_discover(cx) {
                Poll::Pending => return,
                Poll::Ready(None) => {
                    // A stream may not be polled after its end: keep the
                    // current endpoints for good.
                    self.discover_ended = true;
                    tracing::warn!(
                        name = %self.name,
                        endpoints = self.members.len(),
                        "discovery ended; keeping the current endpoints"
                    );
                }
                Poll::Ready(Some(Err(error))) => {
                    let error: BoxError = error.into();
                    tracing::warn!(
                        name = %self.name,
                        %error,
                        "discovery error; keeping the current endpoints"
                    );
                    // Poll it again on the next turn of the task, not in a
                    // loop that a stream erring for good would never leave.
                    cx.waker().wake_by_ref();
                    return;
                }
                Poll::Ready(Some(Ok(Change::Insert(key, service)))) => self.insert(key, service),
                Poll::Ready(Some(Ok(Change::Remove(key)))) => self.remove(&key),
            }
        }
    }

    fn insert(&mut self, key: D::Key, service: D::Service) {
        let weight = service.weight();
        let requests = metrics::counter!(
            "tower_scale_endpoint_requests_total",
            "name" => self.name.clone(),
            "endpoint" => key.to_string()
        );
        match self.members.insert(key.clone(), weight) {
            Some(old) => tracing::debug!(
                name = %self.name, endpoint = %key, weight, old_weight = old,
                "endpoint replaced in balancer"
            ),
            None => tracing::debug!(
                name = %self.name, endpoint = %key, weight,
                "endpoint added to balancer"
            ),
        }
        // A service already known under this key stays in use until the new
        // one is ready, and is dropped then.
        self.cache.push(key, Node::new(service, requests));
        self.members_changed = true;
    }

    fn remove(&mut self, key: &D::Key) {
        if self.members.remove(key).is_some() {
            tracing::debug!(name = %self.name, endpoint = %key, "endpoint removed from balancer");
            self.members_changed = true;
        }
        if self.cache.evict(key) {
            self.ready_changed = true;
        }
    }

    fn promote_pending(&mut self, cx: &mut Context<'_>) {
        let before = (self.cache.ready_len(), self.cache.pending_len());
        loop {
            match self.cache.poll_pending(cx) {
                Poll::Ready(Ok(())) | Poll::Pending => break,
                Poll::Ready(Err(failed)) => {
                    tracing::warn!(
                        name = %self.name,
                        endpoint = %failed.0,
                        error = %failed.1,
                        "endpoint failed; dropped until discovery inserts it again"
                    );
                }
            }
        }
        if (self.cache.ready_len(), self.cache.pending_len()) != before {
            self.ready_changed = true;
        }
    }

    /// Sets the endpoint gauges when the figures changed.
    #[inline]
    pub(super) fn report(&mut self) {
        let now = (self.cache.ready_len(), self.cache.pending_len());
        if now != self.reported {
            self.reported = now;
            self.ready_gauge.set(now.0 as f64);
            self.pending_gauge.set(now.1 as f64);
        }
    }
}

impl<D, Req> fmt::Debug for Core<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("name", &self.name)
            .field("endpoints", &self.members.len())
            .field("ready", &self.cache.ready_len())
            .field("pending", &self.cache.pending_len())
            .field("discover_ended", &self.discover_ended)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Random numbers.

/// wyrand: a fast, small, non-cryptographic generator; good enough to spread
/// requests.
#[derive(Clone, Debug)]
pub(super) struct FastRng(u64);

impl FastRng {
    pub(super) fn new(seed: Option<u64>) -> Self {
        FastRng(
            seed.unwrap_or_else(|| std::collections::hash_map::RandomState::new().hash_one(0u8)),
        )
    }

    #[inline]
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// A number in `0..n` (`n > 0`), by multiplication (the bias is below
    /// 2^-32 for the ranges used here).
    #[inline]
    pub(super) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

// ---------------------------------------------------------------------------
// A hash that is the same in every process.

/// FNV-1a over the bytes, finished with MurmurHash3's 64-bit mixer: stable
/// across processes and versions (unlike std's `DefaultHasher`), so every
/// client of a fleet maps a key to the same endpoint.
#[derive(Clone, Copy, Debug)]
pub(super) struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for StableHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        fmix64(self.0)
    }
}

/// MurmurHash3's finalizer: every input bit affects every output bit.
#[inline]
pub(super) fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The stable hash of some bytes.
#[inline]
pub(super) fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = StableHasher::default();
    h.write(bytes);
    h.finish()
}

/// The stable hash of a value.
#[inline]
pub(super) fn hash_value<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = StableHasher::default();
    value.hash(&mut h);
    h.finish()
}
