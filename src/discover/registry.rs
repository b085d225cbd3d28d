//! The instance registry as a discovery source (features `balance` and
//! `registry`).
//!
//! [`Registry`] watches the instances of one service in any
//! [`InstanceRegistry`] and turns them into services with an endpoint
//! factory, like [`Static`](super::Static). It is a
//! [`tower::discover::Discover`] stream that never fails and never ends, so
//! it can feed tower's `Balance` or the policies in [`crate::balance`]; each
//! instance that registers (see [`Heartbeat`](crate::registry::heartbeat))
//! becomes an endpoint, and leaves when it deregisters (on drain) or expires.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use tower::balance::p2c::Balance;
//! use tower::load::{CompleteOnResponse, PendingRequests};
//! use tower::{service_fn, Service, ServiceExt};
//! use tower_scale::discover::registry::Registry;
//! use tower_scale::discover::Endpoint;
//! use tower_scale::registry::InstanceRegistry;
//!
//! async fn client(registry: Arc<dyn InstanceRegistry>) -> Result<(), tower::BoxError> {
//!     // The factory: an endpoint to a service (here one that names its address).
//!     let make = |endpoint: &Endpoint| {
//!         let addr = endpoint.addr();
//!         let svc = service_fn(move |_: ()| async move { Ok::<_, tower::BoxError>(addr) });
//!         PendingRequests::new(svc, CompleteOnResponse::default())
//!     };
//!     let discover = Registry::named("api-client", registry, "api", make);
//!     let mut balance = Balance::new(discover);
//!     let addr = balance.ready().await?.call(()).await?;
//!     println!("answered by {addr}");
//!     Ok(())
//! }
//! # use std::time::Duration;
//! # use futures::StreamExt;
//! # use tower_scale::registry::{InstanceInfo, Membership, MembershipStream, RegistryFuture};
//! # struct One;
//! # impl InstanceRegistry for One {
//! #     fn register(&self, _: &InstanceInfo, _: Duration) -> RegistryFuture<'_, ()> { Box::pin(async { Ok(()) }) }
//! #     fn heartbeat(&self, _: &InstanceInfo, _: Duration) -> RegistryFuture<'_, ()> { Box::pin(async { Ok(()) }) }
//! #     fn deregister(&self, _: &str, _: &str) -> RegistryFuture<'_, ()> { Box::pin(async { Ok(()) }) }
//! #     fn healthy(&self, _: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> { Box::pin(async { Ok(Vec::new()) }) }
//! #     fn remove_stale(&self, _: &str) -> RegistryFuture<'_, usize> { Box::pin(async { Ok(0) }) }
//! #     fn watch(&self, service: &str) -> MembershipStream {
//! #         let info = InstanceInfo::new(service, "api-1", "127.0.0.1:3000".parse().unwrap());
//! #         Box::pin(futures::stream::iter([Membership::Joined(info)]).chain(futures::stream::pending()))
//! #     }
//! # }
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() { client(Arc::new(One)).await.unwrap() }
//! ```
//!
//! # What it emits
//!
//! The source calls [`InstanceRegistry::watch`] when it is first polled
//! (building it calls nothing and spawns nothing), and follows the
//! membership changes of the service:
//!
//! - `Joined` inserts the instance's address (the key of the `Change`), with
//!   an [`Endpoint`] of that address and weight given to the factory.
//! - `Updated` writes the new weight to the shared weight of the endpoint's
//!   [`Weighted`] service, which stays: no remove and re-insert, no lost
//!   connections. An update for an instance the source does not know (its
//!   `Joined` was lost) inserts it; one that reports a new address moves the
//!   instance (an insert of the new address, a remove of the old one).
//! - `Left` removes the instance's address.
//!
//! Instances of another service (a registry that does not filter its watch)
//! are ignored.
//!
//! **Two instances at one address** (an instance restarted under a new id
//! before its old entry expired, or two registrations of one process) are one
//! endpoint: it is inserted when the first of them joins and removed when the
//! last of them leaves, and its weight is the one reported last by either.
//! So a restart does not remove the endpoint when the old entry expires.
//!
//! # Weights
//!
//! An instance's weight is its reported capacity: `load.limit` (its
//! concurrency limit, for example from a [`Heartbeat`] with a
//! [`LimitHandle`](crate::limit::LimitHandle)) when it is more than 0,
//! clamped to `u32::MAX`; otherwise [`DEFAULT_WEIGHT`] (100). So an instance
//! with a limit of 64 gets twice the share of one with a limit of 32 under
//! the weighted policies, and an adaptive limit moves its share as it moves.
//! Instances that report no limit weigh as much as one with a limit of 100.
//!
//! # When the watch ends
//!
//! A registry's watch should never end, but if it does the source keeps its
//! endpoints, counts and logs it, and watches again after 1 s (then 2 s, 4 s,
//! up to 30 s while it keeps ending without a change, or the resync below
//! fails). Before following the new watch, it reads the healthy instances
//! ([`InstanceRegistry::healthy`], bounded by 10 s) and makes them the set:
//! inserts the new ones first, then removes those that left while nobody was
//! watching. **An empty read never removes the last endpoints**: it is
//! counted as a failure and the set stays (as with DNS, an empty set helps no
//! caller, and one empty read may be a store that just restarted); `Left`
//! changes still remove endpoints one by one.
//!
//! # Metrics
//!
//! With the `name` label given to [`Registry::named`] (`"default"` for
//! [`Registry::new`]):
//!
//! - `tower_scale_discovery_updates_total{name, change="insert"|"remove"}`,
//!   a counter of the changes emitted (as for [`Static`](super::Static));
//! - `tower_scale_discovery_errors_total{name}`, a counter of watches that
//!   ended and of resyncs that failed or read nothing (the set was kept);
//! - `tower_scale_discovery_endpoints{name}`, a gauge of the endpoints in
//!   the current set.
//!
//! Tracing: `info` when an endpoint is added or removed, `debug` when a
//! weight changes, `warn` when the watch ends and at the first failed resync
//! of a series (later ones at `debug`), and `info` when watching resumes.
//!
//! [`Heartbeat`]: crate::registry::heartbeat::Heartbeat

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::time::{Instant, Sleep};
use tower::discover::Change;

use super::{Endpoint, Weighted, DEFAULT_WEIGHT};
use crate::metrics_util::DEFAULT_NAME;
use crate::registry::{
    InstanceInfo, InstanceRegistry, LoadFigures, Membership, MembershipStream, RegistryError,
};

/// The first delay before watching again after the watch ended.
const REWATCH_MIN: Duration = Duration::from_secs(1);
/// The longest delay before watching again.
const REWATCH_MAX: Duration = Duration::from_secs(30);
/// The bound on reading the healthy instances before watching again.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(10);

type Snapshot = Pin<Box<dyn Future<Output = Result<Vec<InstanceInfo>, RegistryError>> + Send>>;

/// A discovery source over the instances of one service in an
/// [`InstanceRegistry`], weighted by their reported capacity.
///
/// See the [module docs](self) for an example and what it emits.
pub struct Registry<F, S> {
    registry: Arc<dyn InstanceRegistry>,
    service: Arc<str>,
    make: F,
    state: State,
    /// Reused from one wait to the next; made on first use.
    sleep: Option<Pin<Box<Sleep>>>,
    changes: VecDeque<Change<SocketAddr, Weighted<S>>>,
    /// The address of each known instance, by id.
    instances: HashMap<String, SocketAddr>,
    endpoints: BTreeMap<SocketAddr, Slot>,
    /// Watches that ended without a change, and failed resyncs, in a row.
    failures: u32,
    metrics: crate::discover::SourceMetrics,
}

/// One endpoint: its shared weight and how many instances are at its address.
struct Slot {
    weight: Arc<AtomicU32>,
    instances: usize,
}

enum State {
    /// Never polled: watch at once.
    Start,
    /// Following the watch. The mutexes are only reached through `&mut self`
    /// (`Mutex::get_mut`, no locking): they make the source `Sync` although
    /// the streams and futures are not.
    Watching(Mutex<MembershipStream>),
    /// The watch ended (or a resync failed): waiting for `sleep`.
    Waiting,
    /// Reading the healthy instances before following a new watch.
    Resyncing {
        watch: Mutex<MembershipStream>,
        snapshot: Mutex<Snapshot>,
    },
}

/// The weight of an instance: its limit when reported, else the default.
fn weight_of(load: &LoadFigures) -> u32 {
    if load.limit > 0 {
        u32::try_from(load.limit).unwrap_or(u32::MAX)
    } else {
        DEFAULT_WEIGHT
    }
}

impl<F, S> Registry<F, S>
where
    F: FnMut(&Endpoint) -> S,
{
    /// A source over the instances of `service` in `registry`, turned into
    /// services by `make`. The metrics name is `"default"`.
    pub fn new(registry: Arc<dyn InstanceRegistry>, service: &str, make: F) -> Self {
        Self::named(DEFAULT_NAME, registry, service, make)
    }

    /// Like [`new`](Self::new), with the `name` label of the source's metrics
    /// (see the [module docs](self#metrics)).
    pub fn named(name: &str, registry: Arc<dyn InstanceRegistry>, service: &str, make: F) -> Self {
        let metrics = super::SourceMetrics::new(name);
        metrics.endpoints.set(0.0);
        Registry {
            registry,
            service: service.into(),
            make,
            state: State::Start,
            sleep: None,
            changes: VecDeque::new(),
            instances: HashMap::new(),
            endpoints: BTreeMap::new(),
            failures: 0,
            metrics,
        }
    }

    /// The service whose instances the source follows.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The endpoints the source has announced (after the changes it has
    /// emitted so far, and those it is about to).
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the source has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    fn apply(&mut self, change: Membership) {
        match change {
            Membership::Joined(info) | Membership::Updated(info) => {
                if *info.service == *self.service {
                    self.upsert(&info);
                } else {
                    tracing::debug!(name = &*self.metrics.name, service = &*self.service, other = %info.service, id = %info.id, "ignoring an instance of another service");
                }
            }
            Membership::Left(id) => {
                if let Some(addr) = self.instances.remove(&id) {
                    self.release(addr);
                }
            }
        }
        self.metrics.endpoints.set(self.endpoints.len() as f64);
    }

    /// Adds the instance, or updates its weight or address.
    fn upsert(&mut self, info: &InstanceInfo) {
        let weight = weight_of(&info.load);
        match self.instances.get_mut(&info.id) {
            Some(addr) if *addr == info.addr => {
                let slot = self
                    .endpoints
                    .get(addr)
                    .expect("a known instance has an endpoint");
                let old = slot.weight.swap(weight, Relaxed);
                if old != weight {
                    tracing::debug!(name = &*self.metrics.name, addr = %info.addr, old, weight, "endpoint weight changed");
                }
            }
            Some(addr) => {
                let old = std::mem::replace(addr, info.addr);
                tracing::info!(name = &*self.metrics.name, id = %info.id, from = %old, to = %info.addr, "instance moved");
                self.claim(info.addr, weight);
                self.release(old);
            }
            None => {
                self.instances.insert(info.id.clone(), info.addr);
                self.claim(info.addr, weight);
            }
        }
    }

    /// One more instance at `addr`: inserts the endpoint if it is the first.
    fn claim(&mut self, addr: SocketAddr, weight: u32) {
        if let Some(slot) = self.endpoints.get_mut(&addr) {
            slot.instances += 1;
            slot.weight.store(weight, Relaxed);
            return;
        }
        let endpoint = Endpoint::new(addr).with_weight(weight);
        let shared = Arc::new(AtomicU32::new(weight));
        let service = Weighted::shared((self.make)(&endpoint), shared.clone());
        self.endpoints.insert(
            addr,
            Slot {
                weight: shared,
                instances: 1,
            },
        );
        self.changes.push_back(Change::Insert(addr, service));
        self.metrics.inserted.increment(1);
        tracing::info!(name = &*self.metrics.name, %endpoint, "endpoint added");
    }

    /// One instance fewer at `addr`: removes the endpoint if it was the last.
    fn release(&mut self, addr: SocketAddr) {
        let Some(slot) = self.endpoints.get_mut(&addr) else {
            return;
        };
        slot.instances -= 1;
        if slot.instances == 0 {
            self.endpoints.remove(&addr);
            self.changes.push_back(Change::Remove(addr));
            self.metrics.removed.increment(1);
            tracing::info!(name = &*self.metrics.name, %addr, "endpoint removed");
        }
    }

    /// Makes the healthy instances read before a new watch the set: adds
    /// and updates them, then removes the others; an empty read is a failure.
    fn resync(
        &mut self,
        snapshot: Result<Vec<InstanceInfo>, RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut healthy = snapshot?;
        healthy.retain(|info| *info.service == *self.service);
        if healthy.is_empty() && !self.instances.is_empty() {
            return Err(RegistryError::Invalid(
                "no healthy instance; keeping the last set".into(),
            ));
        }
        for info in &healthy {
            self.upsert(info);
        }
        let ids: HashSet<&str> = healthy.iter().map(|info| info.id.as_str()).collect();
        let gone: Vec<String> = self
            .instances
            .keys()
            .filter(|id| !ids.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.apply(Membership::Left(id));
        }
        self.metrics.endpoints.set(self.endpoints.len() as f64);
        Ok(())
    }

    fn watch(&self) -> Mutex<MembershipStream> {
        Mutex::new(self.registry.watch(&self.service))
    }

    fn snapshot(&self) -> Mutex<Snapshot> {
        let (registry, service) = (self.registry.clone(), self.service.clone());
        Mutex::new(Box::pin(async move {
            match tokio::time::timeout(RESYNC_TIMEOUT, registry.healthy(&service)).await {
                Ok(result) => result,
                Err(_) => Err(RegistryError::Unavailable(format!(
                    "no answer within {RESYNC_TIMEOUT:?}"
                ))),
            }
        }))
    }

    /// Waits before watching again, longer after each failure in a row.
    fn wait(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.metrics.errors.increment(1);
        let delay = REWATCH_MIN
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(REWATCH_MAX);
        super::rearm(&mut self.sleep, Instant::now() + delay);
        self.state = State::Waiting;
    }
}

// Nothing in a `Registry` is ever pinned: the watch, the read and the timer
// are boxed, the services wait in a heap queue.
impl<F, S> Unpin for Registry<F, S> {}

impl<F, S> Stream for Registry<F, S>
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
                State::Start => this.state = State::Watching(this.watch()),
                State::Watching(watch) => {
                    let watch = watch.get_mut().unwrap_or_else(PoisonError::into_inner);
                    match ready!(watch.as_mut().poll_next(cx)) {
                        Some(change) => {
                            this.failures = 0;
                            this.apply(change);
                        }
                        None => {
                            tracing::warn!(
                                name = &*this.metrics.name,
                                service = &*this.service,
                                endpoints = this.endpoints.len(),
                                "registry watch ended; keeping the endpoints and watching again"
                            );
                            this.wait();
                        }
                    }
                }
                State::Waiting => {
                    let sleep = this.sleep.as_mut().expect("a timer is set while waiting");
                    ready!(sleep.as_mut().poll(cx));
                    this.state = State::Resyncing {
                        watch: this.watch(),
                        snapshot: this.snapshot(),
                    };
                }
                State::Resyncing { snapshot, .. } => {
                    let snapshot = snapshot.get_mut().unwrap_or_else(PoisonError::into_inner);
                    let result = ready!(snapshot.as_mut().poll(cx));
                    match this.resync(result) {
                        Ok(()) => {
                            tracing::info!(
                                name = &*this.metrics.name,
                                service = &*this.service,
                                endpoints = this.endpoints.len(),
                                "watching the registry again"
                            );
                            let State::Resyncing { watch, .. } =
                                std::mem::replace(&mut this.state, State::Start)
                            else {
                                unreachable!("in the resyncing state");
                            };
                            this.state = State::Watching(watch);
                        }
                        Err(error) => {
                            if this.failures <= 1 {
                                tracing::warn!(name = &*this.metrics.name, service = &*this.service, %error, endpoints = this.endpoints.len(), "registry resync failed; keeping the endpoints");
                            } else {
                                tracing::debug!(name = &*this.metrics.name, service = &*this.service, %error, failures = this.failures, "registry resync failed again");
                            }
                            this.wait();
                        }
                    }
                }
            }
        }
    }
}

impl<F, S> fmt::Debug for Registry<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("service", &self.service)
            .field("name", &self.metrics.name)
            .field("endpoints", &self.endpoints.len())
            .field("instances", &self.instances.len())
            .field("pending_changes", &self.changes.len())
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use futures_util::StreamExt as _;
    use tokio::sync::mpsc;

    use super::*;
    use crate::discover::Weight;
    use crate::registry::RegistryFuture;

    /// A registry whose watches the test feeds by hand, and whose healthy
    /// list it sets (an error when `None`).
    #[derive(Default)]
    struct Fake {
        watches: Mutex<Vec<mpsc::UnboundedSender<Membership>>>,
        healthy: Mutex<Option<Vec<InstanceInfo>>>,
        watched: AtomicUsize,
        read: AtomicUsize,
    }

    impl Fake {
        /// Sends `change` to the latest watch.
        fn send(&self, change: Membership) {
            let watches = self.watches.lock().unwrap();
            watches.last().expect("watched").send(change).unwrap();
        }

        /// Ends every watch.
        fn end_watches(&self) {
            self.watches.lock().unwrap().clear();
        }

        fn set_healthy(&self, healthy: Option<Vec<InstanceInfo>>) {
            *self.healthy.lock().unwrap() = healthy;
        }
    }

    impl InstanceRegistry for Fake {
        fn register(&self, _: &InstanceInfo, _: Duration) -> RegistryFuture<'_, ()> {
            unreachable!()
        }
        fn heartbeat(&self, _: &InstanceInfo, _: Duration) -> RegistryFuture<'_, ()> {
            unreachable!()
        }
        fn deregister(&self, _: &str, _: &str) -> RegistryFuture<'_, ()> {
            unreachable!()
        }
        fn healthy(&self, service: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> {
            assert_eq!(service, "api");
            self.read.fetch_add(1, SeqCst);
            let healthy = self.healthy.lock().unwrap().clone();
            Box::pin(async move { healthy.ok_or(RegistryError::Unavailable("injected".into())) })
        }
        fn remove_stale(&self, _: &str) -> RegistryFuture<'_, usize> {
            unreachable!()
        }
        fn watch(&self, service: &str) -> MembershipStream {
            assert_eq!(service, "api");
            self.watched.fetch_add(1, SeqCst);
            let (tx, mut rx) = mpsc::unbounded_channel();
            self.watches.lock().unwrap().push(tx);
            Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    /// Instance `id` of `service` at `10.0.0.n:80` reporting `limit`.
    fn instance(service: &str, id: &str, n: u8, limit: u64) -> InstanceInfo {
        let mut info = InstanceInfo::new(service, id, addr(n));
        info.load.limit = limit;
        info
    }

    fn joined(id: &str, n: u8, limit: u64) -> Membership {
        Membership::Joined(instance("api", id, n, limit))
    }

    fn updated(id: &str, n: u8, limit: u64) -> Membership {
        Membership::Updated(instance("api", id, n, limit))
    }

    fn left(id: &str) -> Membership {
        Membership::Left(id.to_owned())
    }

    type Source = Registry<fn(&Endpoint) -> Endpoint, Endpoint>;

    /// A source whose services are the endpoints they were made from.
    fn source(fake: &Arc<Fake>) -> Source {
        Registry::named("api", fake.clone(), "api", |endpoint: &Endpoint| *endpoint)
    }

    /// The changes ready now, as `+n:weight` / `-n`; the inserted services
    /// go to `services`.
    fn changes(source: &mut Source, services: &mut Vec<Weighted<Endpoint>>) -> Vec<String> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut out = Vec::new();
        while let Poll::Ready(item) = source.poll_next_unpin(&mut cx) {
            match item.expect("never ends").unwrap() {
                Change::Insert(addr, service) => {
                    assert_eq!(service.get_ref().addr(), addr);
                    out.push(format!("+{}:{}", last(addr), service.weight()));
                    services.push(service);
                }
                Change::Remove(addr) => out.push(format!("-{}", last(addr))),
            }
        }
        out
    }

    /// The current weight of the service made for `10.0.0.n:80`.
    fn weight(services: &[Weighted<Endpoint>], n: u8) -> u32 {
        services
            .iter()
            .rfind(|s| s.get_ref().addr() == addr(n))
            .expect("inserted")
            .weight()
    }

    fn last(addr: SocketAddr) -> u8 {
        match addr.ip() {
            std::net::IpAddr::V4(ip) => ip.octets()[3],
            std::net::IpAddr::V6(_) => unreachable!(),
        }
    }

    async fn advance(secs: u64) {
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }

    /// Joins insert, updates change the shared weight in place, leaves
    /// remove; the source watches only when first polled.
    #[tokio::test(start_paused = true)]
    async fn joins_updates_and_leaves_become_changes() {
        let fake = Arc::new(Fake::default());
        let mut source = source(&fake);
        assert_eq!(fake.watched.load(SeqCst), 0, "building watches nothing");
        let mut services = Vec::new();
        assert!(changes(&mut source, &mut services).is_empty());
        assert_eq!(fake.watched.load(SeqCst), 1);

        fake.send(joined("a", 1, 0));
        fake.send(joined("b", 2, 32));
        assert_eq!(changes(&mut source, &mut services), ["+1:100", "+2:32"]);
        assert_eq!(
            services[0].get_ref().weight(),
            100,
            "the factory sees the weight"
        );

        fake.send(updated("a", 1, 8));
        fake.send(updated("b", 2, 0));
        assert!(
            changes(&mut source, &mut services).is_empty(),
            "no remove and re-insert"
        );
        assert_eq!(weight(&services, 1), 8);
        assert_eq!(weight(&services, 2), DEFAULT_WEIGHT);

        fake.send(left("a"));
        fake.send(left("nobody"));
        assert_eq!(changes(&mut source, &mut services), ["-1"]);
        assert_eq!(source.len(), 1);

        fake.send(joined("a", 1, 4));
        assert_eq!(
            changes(&mut source, &mut services),
            ["+1:4"],
            "a comeback is a join"
        );
    }

    /// The weight is the reported limit when more than 0 (clamped), else the
    /// default; a join of a known instance only updates its weight.
    #[tokio::test(start_paused = true)]
    async fn weights_follow_reported_capacity() {
        let fake = Arc::new(Fake::default());
        let mut source = source(&fake);
        let mut services = Vec::new();
        changes(&mut source, &mut services);
        fake.send(joined("a", 1, u64::MAX));
        fake.send(joined("b", 2, 1));
        assert_eq!(
            changes(&mut source, &mut services),
            [format!("+1:{}", u32::MAX), "+2:1".to_owned()]
        );
        fake.send(joined("b", 2, 64));
        assert!(changes(&mut source, &mut services).is_empty());
        assert_eq!(weight(&services, 2), 64);
    }

    /// Changes about another service are ignored.
    #[tokio::test(start_paused = true)]
    async fn another_service_is_ignored() {
        let fake = Arc::new(Fake::default());
        let mut source = source(&fake);
        let mut services = Vec::new();
        changes(&mut source, &mut services);
        fake.send(Membership::Joined(instance("billing", "a", 1, 0)));
        fake.send(joined("b", 2, 0));
        fake.send(Membership::Updated(instance("billing", "b", 2, 7)));
        assert_eq!(changes(&mut source, &mut services), ["+2:100"]);
        assert_eq!(weight(&services, 2), DEFAULT_WEIGHT);
        assert_eq!(source.service(), "api");
    }

    /// Two instances at one address are one endpoint, removed when the last
    /// of them leaves: a restart under a new id survives the old entry's
    /// expiry.
    #[tokio::test(start_paused = true)]
    async fn instances_sharing_an_address_are_one_endpoint() {
        let fake = Arc::new(Fake::default());
        let mut source = source(&fake);
        let mut services = Vec::new();
        changes(&mut source, &mut services);
        fake.send(joined("old", 1, 10));
        fake.send(joined("new", 1, 20));
        assert_eq!(changes(&mut source, &mut services), ["+1:10"]);
        assert_eq!(weight(&services, 1), 20, "the last reported weight");
        fake.send(left("old"));
        assert!(changes(&mut source, &mut services).is_empty());
        fake.send(left("new"));
        assert_eq!(changes(&mut source, &mut services), ["-1"]);
    }

    /// An update for an unknown instance inserts it (its join was lost); one
    /// with a new address moves it.
    #[tokio::test(start_paused = true)]
    async fn updates_heal_lost_joins_and_follow_moves() {
        let fake = Arc::new(Fake::default());
        let mut source = source(&fake);
        let mut services = Vec::new();
        changes(&mut source, &mut services);
        fake.send(updated("a", 1, 0));
        assert_eq!(changes(&mut source, &mut services), ["+1:100"]);
        fake.send(updated("a", 2, 0));
        assert_eq!(changes(&mut source, &mut services), ["+2:100", "-1"]);
        fake.send(left("a"));
        assert_eq!(changes(&mut source, &mut services), ["-2"]);
        assert!(source.is_empty());
    }

    /// When the watch ends the endpoints stay; after 1 s the source reads the
    /// healthy set (inserting what is new, then removing what left) and
    /// follows a new watch. An empty read or a failure keeps the set and
    /// retries, backing off; the stream never ends.
    #[tokio::test(start_paused = true)]
    async fn the_stream_never_ends_and_resyncs_after_the_watch_ends() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let prometheus = recorder.handle();
        let value = |series: &str| -> Option<f64> {
            prometheus
                .render()
                .lines()
                .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        };
        let errors = r#"tower_scale_discovery_errors_total{name="api"}"#;
        let endpoints = r#"tower_scale_discovery_endpoints{name="api"}"#;
        let inserts = r#"tower_scale_discovery_updates_total{name="api",change="insert"}"#;
        let removes = r#"tower_scale_discovery_updates_total{name="api",change="remove"}"#;
        let fake = Arc::new(Fake::default());
        let mut source = metrics::with_local_recorder(&recorder, || source(&fake));
        let mut services = Vec::new();
        changes(&mut source, &mut services);
        fake.send(joined("a", 1, 0));
        fake.send(joined("b", 2, 0));
        assert_eq!(changes(&mut source, &mut services), ["+1:100", "+2:100"]);
        assert_eq!(value(endpoints), Some(2.0));

        // The watch ends, and the first read fails, the second is empty:
        // nothing changes, retries after 1 s, 2 s, then 4 s.
        fake.set_healthy(None);
        fake.end_watches();
        assert!(changes(&mut source, &mut services).is_empty());
        assert_eq!(value(errors), Some(1.0));
        advance(1).await;
        assert!(changes(&mut source, &mut services).is_empty());
        assert_eq!((fake.watched.load(SeqCst), fake.read.load(SeqCst)), (2, 1));
        fake.set_healthy(Some(Vec::new()));
        advance(2).await;
        assert!(changes(&mut source, &mut services).is_empty());
        assert_eq!((fake.watched.load(SeqCst), fake.read.load(SeqCst)), (3, 2));
        assert_eq!(value(errors), Some(3.0));
        assert_eq!(source.len(), 2, "an empty read keeps the set");

        // Then b and c are healthy: c is inserted, a removed, b's weight
        // follows, and the new watch is followed.
        fake.set_healthy(Some(vec![
            instance("api", "b", 2, 50),
            instance("api", "c", 3, 0),
        ]));
        advance(3).await;
        assert!(
            changes(&mut source, &mut services).is_empty(),
            "not before 4 s"
        );
        advance(1).await;
        assert_eq!(changes(&mut source, &mut services), ["+3:100", "-1"]);
        assert_eq!(weight(&services, 2), 50);
        assert_eq!(fake.watched.load(SeqCst), 4);
        fake.send(left("b"));
        assert_eq!(changes(&mut source, &mut services), ["-2"]);
        assert_eq!(value(endpoints), Some(1.0));
        assert_eq!(value(inserts), Some(3.0));
        assert_eq!(value(removes), Some(2.0));
        assert_eq!(value(errors), Some(3.0));

        // Watches that keep ending: the delay grows to 30 s, and the stream
        // stays pending.
        fake.set_healthy(Some(vec![instance("api", "c", 3, 0)]));
        fake.end_watches();
        let before = fake.watched.load(SeqCst);
        let until = Instant::now() + Duration::from_secs(600);
        let next = tokio::time::timeout_at(until, async {
            loop {
                tokio::task::yield_now().await;
                fake.end_watches();
                if let Poll::Ready(item) = futures_util::poll!(source.next()) {
                    return item.map(|_| ());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(next.is_err(), "nothing, and never the end: {next:?}");
        let watched = fake.watched.load(SeqCst) - before;
        // After 1 + 2 + 4 + 8 + 16 = 31 s, every 30 s: 5 + 18 in 600 s.
        assert_eq!(watched, 23, "backed off");
    }

    /// The source fits tower's balancer behind a `Buffer` (`Send`), and is
    /// `Sync` like the other sources.
    #[test]
    fn it_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Source>();
    }
}
