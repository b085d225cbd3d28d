//! Consistent hashing on a key taken from the request.

use std::fmt::{self, Display};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tower::discover::Discover;
use tower::Service;

use super::core::{hash_bytes, hash_value, Core, FastRng};
use super::future::ResponseFuture;
use super::pick::REFRESH_PICKS;
use super::ring::Ring;
use crate::discover::Weight;
use crate::error::{or_panic, BoxError, ConfigError};
use crate::metrics_util::DEFAULT_NAME;

// ---------------------------------------------------------------------------
// Keys.

/// Where [`ConsistentHash`] finds a request's key.
///
/// - [`HashKey::header`]: the value of a header;
/// - [`HashKey::client_ip`]: the client's IP address, from the request's
///   extensions (a [`ClientAddr`], or a `SocketAddr`); see [`ClientAddr`]
///   for how to put it there from axum's `ConnectInfo`;
/// - [`HashKey::forwarded_for`]: the first address of `X-Forwarded-For`,
///   which any client can forge: use it only behind a proxy that sets it;
/// - [`HashKey::from_fn`]: anything a closure reads from the request.
///
/// A request without a key is spread like a key-less request: see the
/// [module docs](super#consistent-hashing). Keys are hashed with a hash that
/// is the same in every process, so every client maps a key to the same
/// endpoint.
pub struct HashKey<Req> {
    describe: String,
    hash: KeyFn<Req>,
}

/// A request's key, hashed.
type KeyFn<Req> = Arc<dyn Fn(&Req) -> Option<u64> + Send + Sync>;

impl<Req> HashKey<Req> {
    /// The key a closure returns (`None`: the request has no key), hashed
    /// through [`Hash`].
    ///
    /// ```
    /// use tower_scale::balance::policy::HashKey;
    ///
    /// struct Query {
    ///     user: u64,
    /// }
    /// let key = HashKey::from_fn(|query: &Query| Some(query.user));
    /// # let _ = key;
    /// ```
    pub fn from_fn<F, T>(f: F) -> Self
    where
        F: Fn(&Req) -> Option<T> + Send + Sync + 'static,
        T: Hash,
    {
        HashKey {
            describe: "closure".to_owned(),
            hash: Arc::new(move |request: &Req| f(request).map(|key| hash_value(&key))),
        }
    }

    #[inline]
    pub(super) fn hash(&self, request: &Req) -> Option<u64> {
        (self.hash)(request)
    }
}

impl<B> HashKey<http::Request<B>> {
    /// The value of header `name` (the first one, as bytes); a request
    /// without it has no key.
    ///
    /// ```
    /// use http::header::HeaderName;
    /// use tower_scale::balance::policy::HashKey;
    ///
    /// let key = HashKey::<http::Request<()>>::header(HeaderName::from_static("x-user-id"));
    /// # let _ = key;
    /// ```
    pub fn header(name: http::HeaderName) -> Self {
        HashKey {
            describe: format!("header {name}"),
            hash: Arc::new(move |request: &http::Request<B>| {
                request
                    .headers()
                    .get(&name)
                    .map(|value| hash_bytes(value.as_bytes()))
            }),
        }
    }

    /// The client's IP address (not its port), from the request's
    /// extensions: a [`ClientAddr`], else a `SocketAddr`. A request with
    /// neither has no key.
    pub fn client_ip() -> Self {
        HashKey {
            describe: "client ip".to_owned(),
            hash: Arc::new(|request: &http::Request<B>| {
                let extensions = request.extensions();
                extensions
                    .get::<ClientAddr>()
                    .map(|client| client.0)
                    .or_else(|| extensions.get::<SocketAddr>().map(SocketAddr::ip))
                    .map(hash_ip)
            }),
        }
    }

    /// The first address of the `X-Forwarded-For` header (the client, as
    /// the first proxy saw it). A request without the header, or whose
    /// first entry is not an IP address, has no key.
    ///
    /// Any client can send this header: use it only behind a proxy that
    /// replaces it. Without one, use [`client_ip`](Self::client_ip).
    pub fn forwarded_for() -> Self {
        HashKey {
            describe: "x-forwarded-for".to_owned(),
            hash: Arc::new(|request: &http::Request<B>| {
                let value = request.headers().get("x-forwarded-for")?.to_str().ok()?;
                let first = value.split(',').next()?.trim();
                first.parse::<IpAddr>().ok().map(hash_ip)
            }),
        }
    }
}

/// The same IP address hashes the same whether written as IPv4 or as
/// IPv4-mapped IPv6.
fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

impl<Req> Clone for HashKey<Req> {
    fn clone(&self) -> Self {
        HashKey {
            describe: self.describe.clone(),
            hash: self.hash.clone(),
        }
    }
}

impl<Req> fmt::Debug for HashKey<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HashKey").field(&self.describe).finish()
    }
}

/// The client's address as a request extension, read by
/// [`HashKey::client_ip`] (which also reads a plain `SocketAddr`).
///
/// axum puts the peer address in the request's extensions as
/// `axum::extract::ConnectInfo<SocketAddr>` (when served with
/// `into_make_service_with_connect_info::<SocketAddr>()`); this crate does
/// not depend on axum, so copy it into the extensions of the request that
/// goes to the balancer with one `map_request`:
///
/// ```
/// use std::net::SocketAddr;
/// use axum::extract::{ConnectInfo, Request};
/// use tower::ServiceBuilder;
/// use tower_scale::balance::policy::ClientAddr;
///
/// let layer = ServiceBuilder::new().map_request(|mut req: Request| { if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() { req.extensions_mut().insert(ClientAddr::from(addr)); } req });
/// # let _ = layer;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

impl From<IpAddr> for ClientAddr {
    fn from(ip: IpAddr) -> Self {
        ClientAddr(ip)
    }
}

impl From<SocketAddr> for ClientAddr {
    fn from(addr: SocketAddr) -> Self {
        ClientAddr(addr.ip())
    }
}

// ---------------------------------------------------------------------------
// The ring's settings.

/// The settings of [`ConsistentHash`]'s ring: how many virtual nodes an
/// endpoint of the default weight has, and the seed of the key-less spread.
#[derive(Clone, Debug)]
pub struct RingHash {
    virtual_nodes: u32,
    seed: Option<u64>,
}

impl RingHash {
    /// Virtual nodes of an endpoint of the default weight unless set
    /// (Ketama's figure).
    pub const DEFAULT_VIRTUAL_NODES: u32 = 160;

    /// The most virtual nodes an endpoint of the default weight may have.
    pub const MAX_VIRTUAL_NODES: u32 = 4096;

    /// A ring where an endpoint of the default weight
    /// ([`DEFAULT_WEIGHT`](crate::discover::DEFAULT_WEIGHT), 100) has
    /// `virtual_nodes` points, and one of weight `w` has
    /// `virtual_nodes * w / 100` (at least one, none for weight 0).
    ///
    /// # Panics
    ///
    /// If `virtual_nodes` is 0 or more than [`MAX_VIRTUAL_NODES`](Self::MAX_VIRTUAL_NODES);
    /// [`try_new`](Self::try_new) returns the error.
    #[track_caller]
    pub fn new(virtual_nodes: u32) -> Self {
        or_panic("RingHash::new", Self::try_new(virtual_nodes))
    }

    /// Like [`new`](Self::new), but returns a [`ConfigError`] naming
    /// `virtual_nodes`.
    pub fn try_new(virtual_nodes: u32) -> Result<Self, ConfigError> {
        if virtual_nodes == 0 {
            return Err(ConfigError::new("virtual_nodes", "must be more than zero"));
        }
        if virtual_nodes > Self::MAX_VIRTUAL_NODES {
            return Err(ConfigError::new(
                "virtual_nodes",
                format!("must be at most {}", Self::MAX_VIRTUAL_NODES),
            ));
        }
        Ok(RingHash {
            virtual_nodes,
            seed: None,
        })
    }

    /// Seeds the random spread of requests without a key, for repeatable
    /// tests and simulations (the ring itself never depends on a seed).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The virtual nodes of an endpoint of the default weight.
    pub fn virtual_nodes(&self) -> u32 {
        self.virtual_nodes
    }
}

impl Default for RingHash {
    fn default() -> Self {
        RingHash {
            virtual_nodes: Self::DEFAULT_VIRTUAL_NODES,
            seed: None,
        }
    }
}

// ---------------------------------------------------------------------------
// The service.

/// Sends each request to the endpoint its key hashes to on a ring, so that
/// requests with one key keep going to one endpoint while the set changes
/// little.
///
/// `poll_ready` is Ready when at least one endpoint is (it picks one for a
/// request without a key, and as a last resort); `call` reads the key and
/// walks the ring from its hash to the first ready endpoint. See the
/// [module docs](super#consistent-hashing) for how the ring is built, what
/// happens when the endpoint of a key is not ready, and an example.
///
/// Like [`Balancer`](super::Balancer), it never fails on its own account
/// and is not `Clone` (share it behind tower's `Buffer`).
pub struct ConsistentHash<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    core: Core<D, Req>,
    key: HashKey<Req>,
    virtual_nodes: u32,
    ring: Ring<D::Key>,
    rng: FastRng,
    /// The endpoint `poll_ready` picked: for a request without a key, and
    /// for one whose walk finds nothing ready.
    picked: Option<D::Key>,
    /// `poll_ready` returned Ready and no `call` came since.
    armed: bool,
    picks: u32,
}

impl<D, Req> ConsistentHash<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    /// Hashes requests on `key` over the endpoints of `discover`, with a
    /// ring set up by `ring` (`RingHash::default()`: 160 virtual nodes per
    /// endpoint of the default weight); the `name` label of its metrics is
    /// `"default"`.
    pub fn new(discover: D, key: HashKey<Req>, ring: RingHash) -> Self
    where
        D::Service: Service<Req>,
    {
        Self::named(DEFAULT_NAME, discover, key, ring)
    }

    /// Like [`new`](Self::new), with the `name` label of the metrics.
    pub fn named(name: &str, discover: D, key: HashKey<Req>, ring: RingHash) -> Self
    where
        D::Service: Service<Req>,
    {
        ConsistentHash {
            core: Core::new(discover, name),
            key,
            virtual_nodes: ring.virtual_nodes,
            ring: Ring::default(),
            rng: FastRng::new(ring.seed),
            picked: None,
            armed: false,
            picks: 0,
        }
    }

    /// The number of endpoints, ready or not (as of the last `poll_ready`).
    pub fn len(&self) -> usize {
        self.core.len()
    }

    /// Whether there is no endpoint (as of the last `poll_ready`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<D, Req> ConsistentHash<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + Display,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Weight,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    /// Rebuilds the ring when the membership changed, or when weights did
    /// (read every `REFRESH_PICKS` picks from the ready endpoints).
    fn refresh(&mut self) {
        let mut rebuild = self.core.take_members_changed();
        if self.picks >= REFRESH_PICKS {
            self.picks = 0;
            let core = &mut self.core;
            for (key, node) in core.cache.iter_ready() {
                let weight = node.weight();
                if let Some(known) = core.members.get_mut(key) {
                    if *known != weight {
                        *known = weight;
                        rebuild = true;
                    }
                }
            }
        }
        if rebuild {
            self.ring = Ring::build(
                self.core.members.iter().map(|(key, weight)| (key, *weight)),
                self.virtual_nodes,
            );
            tracing::debug!(
                name = %self.core.name(),
                endpoints = self.ring.members(),
                points = self.ring.len(),
                "hash ring rebuilt"
            );
        }
    }

    /// The first ready endpoint on the ring from `hash` (its index in the
    /// ready set); endpoints found not ready leave the ready set.
    fn walk(&mut self, hash: u64, cx: &mut Context<'_>) -> Option<usize> {
        let ring = &self.ring;
        let core = &mut self.core;
        if ring.is_empty() {
            return None;
        }
        let len = ring.len();
        let mut position = ring.position(hash);
        let mut last = u32::MAX;
        for _ in 0..len {
            if core.cache.ready_len() == 0 {
                return None;
            }
            let (owner, key) = ring.owner(position);
            if owner != last {
                last = owner;
                if let Some((index, _, _)) = core.cache.get_ready(key) {
                    match core.cache.check_ready_index(cx, index) {
                        Ok(true) => return Some(index),
                        Ok(false) => core.mark_ready_changed(),
                        Err(failed) => {
                            core.mark_ready_changed();
                            tracing::warn!(
                                name = %core.name(),
                                endpoint = %failed.0,
                                error = %failed.1,
                                "endpoint failed; dropped until discovery inserts it again"
                            );
                        }
                    }
                }
            }
            position += 1;
            if position == len {
                position = 0;
            }
        }
        None
    }

    /// Whether `picked` is (still) ready.
    fn check_picked(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(key) = &self.picked else {
            return false;
        };
        if let Some((index, _, _)) = self.core.cache.get_ready(key) {
            match self.core.cache.check_ready_index(cx, index) {
                Ok(true) => return true,
                Ok(false) | Err(_) => self.core.mark_ready_changed(),
            }
        }
        self.picked = None;
        false
    }
}

impl<D, Req> fmt::Debug for ConsistentHash<D, Req>
where
    D: Discover,
    D::Key: Hash,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistentHash")
            .field("core", &self.core)
            .field("key", &self.key)
            .field("ring", &self.ring)
            .finish_non_exhaustive()
    }
}

impl<D, Req> Service<Req> for ConsistentHash<D, Req>
where
    D: Discover + Unpin,
    D::Key: Hash + Clone + Display,
    D::Error: Into<BoxError>,
    D::Service: Service<Req> + Weight,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    type Response = <D::Service as Service<Req>>::Response;
    type Error = BoxError;
    type Future = ResponseFuture<<D::Service as Service<Req>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.core.update(cx);
        self.refresh();
        if !self.check_picked(cx) {
            // A random point of the ring: in proportion to weight.
            let index = loop {
                let ready = self.core.cache.ready_len();
                if ready == 0 {
                    self.core.report();
                    return Poll::Pending;
                }
                let point = self.rng.next_u64();
                if let Some(index) = self.walk(point, cx) {
                    break index;
                }
                // Nothing on the ring is ready: the ready endpoints have
                // weight 0 (or were dropped from the ring).
                let ready = self.core.cache.ready_len();
                if ready == 0 {
                    continue;
                }
                let index = self.rng.below(ready as u64) as usize;
                match self.core.cache.check_ready_index(cx, index) {
                    Ok(true) => break index,
                    Ok(false) | Err(_) => self.core.mark_ready_changed(),
                }
            };
            let (key, _) = self
                .core
                .cache
                .get_ready_index(index)
                .expect("a ready index");
            self.picked = Some(key.clone());
        }
        self.core.report();
        self.armed = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Req) -> Self::Future {
        assert!(
            std::mem::take(&mut self.armed),
            "poll_ready must be called before call"
        );
        self.picks += 1;
        // Readiness is checked again without a waker: an endpoint found not
        // ready moves to the pending set, whose endpoints the next
        // `poll_ready` polls with the caller's waker.
        let mut cx = Context::from_waker(Waker::noop());
        let hashed = match self.key.hash(&request) {
            Some(hash) => self.walk(hash, &mut cx),
            None => None,
        };
        let index = match hashed {
            Some(index) => {
                let (key, _) = self
                    .core
                    .cache
                    .get_ready_index(index)
                    .expect("a ready index");
                if self.picked.as_ref() == Some(key) {
                    self.picked = None;
                }
                Some(index)
            }
            None => self
                .picked
                .take()
                .and_then(|key| self.core.cache.get_ready(&key).map(|(index, _, _)| index)),
        };
        let Some(index) = index else {
            // Rare: every ready endpoint turned not ready between `poll_ready`
            // and `call` (a not-ready breaker that tripped meanwhile).
            tracing::warn!(name = %self.core.name(), "no ready endpoint at call");
            return ResponseFuture::no_endpoints();
        };
        let (_, node) = self
            .core
            .cache
            .get_ready_index_mut(index)
            .expect("a ready index");
        let (future, _) = node.dispatch(request, false);
        ResponseFuture::new(future, None)
    }
}
