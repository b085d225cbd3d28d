//! The in-memory registry, for tests and a single process.
//!
//! [`MemoryRegistry`] keeps the instances in a map shared by every clone, with
//! TTLs on tokio's clock, so tests run it on a paused clock. Its
//! [`watch`](InstanceRegistry::watch) streams are fed by a broadcast channel
//! per service and sweep the expired entries themselves, at the next expiry,
//! so an instance that stops heartbeating produces a [`Membership::Left`]
//! exactly when its TTL passes.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use futures::StreamExt;
//! use tower_scale::registry::memory::MemoryRegistry;
//! use tower_scale::registry::{InstanceInfo, InstanceRegistry, Membership};
//!
//! let registry = MemoryRegistry::new();
//! let mut changes = registry.watch("api");
//!
//! let a = InstanceInfo::new("api", "a", "127.0.0.1:8081".parse().unwrap());
//! registry.register(&a, Duration::from_secs(3)).await.unwrap();
//! assert_eq!(changes.next().await, Some(Membership::Joined(a.clone())));
//! assert_eq!(registry.healthy("api").await.unwrap(), vec![a]);
//!
//! // No heartbeat within the TTL: the instance leaves.
//! assert_eq!(changes.next().await, Some(Membership::Left("a".to_owned())));
//! assert!(registry.healthy("api").await.unwrap().is_empty());
//! # }
//! ```
//!
//! # Membership streams
//!
//! A stream emits `Joined` only for an instance it does not know, `Updated`
//! only for one it knows whose figures changed, and `Left` only for one it
//! knows; a stream that falls behind the broadcast channel compares its set
//! with the registry's and emits the difference.
//!
//! # Metrics
//!
//! `tower_scale_registry_instances{name}` (name = the service): the number of
//! fresh instances, set on every change.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metrics::Gauge;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};
use tokio::time::Instant;

use super::{InstanceInfo, InstanceRegistry, Membership, MembershipStream, RegistryFuture};
use crate::metrics_util;

/// How many changes a slow watcher may fall behind before it resyncs.
const CHANNEL_CAPACITY: usize = 1024;

/// An [`InstanceRegistry`] in memory: clones share one map. See the
/// [module docs](self) for an example.
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    services: Mutex<HashMap<String, Service>>,
}

struct Service {
    name: String,
    entries: HashMap<String, Entry>,
    changes: broadcast::Sender<Membership>,
    instances: Gauge,
}

struct Entry {
    info: InstanceInfo,
    expires: Instant,
}

impl Service {
    fn new(name: &str) -> Self {
        Service {
            name: name.to_owned(),
            entries: HashMap::new(),
            changes: broadcast::channel(CHANNEL_CAPACITY).0,
            instances: metrics_util::gauge("tower_scale_registry_instances", name),
        }
    }

    fn fresh(&self, now: Instant) -> impl Iterator<Item = &InstanceInfo> {
        self.entries
            .values()
            .filter(move |entry| entry.expires > now)
            .map(|entry| &entry.info)
    }

    fn publish(&self, change: Membership) {
        // No receiver is not an error: nobody watches.
        let _ = self.changes.send(change);
    }

    fn count(&self, now: Instant) {
        self.instances.set(self.fresh(now).count() as f64);
    }

    /// Removes the expired entries, telling the watchers; returns how many.
    fn sweep(&mut self, now: Instant) -> usize {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.entries.remove(id);
            tracing::info!(service = %self.name, %id, "instance expired");
            self.publish(Membership::Left(id.clone()));
        }
        if !expired.is_empty() {
            self.count(now);
        }
        expired.len()
    }

    fn upsert(&mut self, info: &InstanceInfo, ttl: Duration) {
        let now = Instant::now();
        let expires = now + ttl;
        match self.entries.get_mut(&info.id) {
            Some(entry) if entry.expires > now => {
                let changed = entry.info != *info;
                entry.info = info.clone();
                entry.expires = expires;
                if changed {
                    self.publish(Membership::Updated(info.clone()));
                }
            }
            stale => {
                if stale.is_some() {
                    // Expired and not swept yet: it left before it came back.
                    self.publish(Membership::Left(info.id.clone()));
                }
                self.entries.insert(
                    info.id.clone(),
                    Entry {
                        info: info.clone(),
                        expires,
                    },
                );
                tracing::info!(service = %info.service, id = %info.id, addr = %info.addr, "instance registered");
                self.publish(Membership::Joined(info.clone()));
            }
        }
        self.count(now);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Service>> {
        // A panic while holding the lock cannot leave the map half-changed in
        // a way that matters more than losing the registry.
        self.services
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with_service<T>(&self, service: &str, f: impl FnOnce(&mut Service) -> T) -> T {
        let mut services = self.lock();
        let entry = services
            .entry(service.to_owned())
            .or_insert_with(|| Service::new(service));
        f(entry)
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn upsert(&self, info: &InstanceInfo, ttl: Duration) {
        self.shared
            .with_service(&info.service, |service| service.upsert(info, ttl));
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let services = self.shared.lock();
        let mut map = f.debug_map();
        for (name, service) in services.iter() {
            map.entry(name, &service.entries.len());
        }
        map.finish()
    }
}

impl InstanceRegistry for MemoryRegistry {
    fn register(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()> {
        self.upsert(info, ttl);
        Box::pin(std::future::ready(Ok(())))
    }

    fn heartbeat(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()> {
        self.upsert(info, ttl);
        Box::pin(std::future::ready(Ok(())))
    }

    fn deregister(&self, service: &str, id: &str) -> RegistryFuture<'_, ()> {
        self.shared.with_service(service, |svc| {
            if svc.entries.remove(id).is_some() {
                tracing::info!(%service, %id, "instance deregistered");
                svc.publish(Membership::Left(id.to_owned()));
                svc.count(Instant::now());
            }
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn healthy(&self, service: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> {
        let now = Instant::now();
        let mut healthy = self
            .shared
            .with_service(service, |svc| svc.fresh(now).cloned().collect::<Vec<_>>());
        healthy.sort_by(|a, b| a.id.cmp(&b.id));
        Box::pin(std::future::ready(Ok(healthy)))
    }

    fn remove_stale(&self, service: &str) -> RegistryFuture<'_, usize> {
        let removed = self
            .shared
            .with_service(service, |svc| svc.sweep(Instant::now()));
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn watch(&self, service: &str) -> MembershipStream {
        let now = Instant::now();
        let (changes, snapshot) = self.shared.with_service(service, |svc| {
            // Subscribe and read under one lock: no change falls in between.
            (
                svc.changes.subscribe(),
                svc.fresh(now).cloned().collect::<Vec<_>>(),
            )
        });
        let mut watcher = Watcher {
            shared: self.shared.clone(),
            service: service.to_owned(),
            changes,
            known: HashMap::new(),
            pending: VecDeque::new(),
        };
        watcher.reconcile(snapshot);
        Box::pin(futures_util::stream::unfold(watcher, |mut watcher| async {
            let change = watcher.next().await;
            Some((change, watcher))
        }))
    }
}

/// The state behind one [`MemoryRegistry::watch`] stream.
struct Watcher {
    shared: Arc<Shared>,
    service: String,
    changes: broadcast::Receiver<Membership>,
    known: HashMap<String, InstanceInfo>,
    pending: VecDeque<Membership>,
}

impl Watcher {
    async fn next(&mut self) -> Membership {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return change;
            }
            let next_expiry = self.shared.with_service(&self.service, |svc| {
                svc.entries.values().map(|entry| entry.expires).min()
            });
            let received = match next_expiry {
                Some(at) => tokio::time::timeout_at(at, self.changes.recv()).await.ok(),
                None => Some(self.changes.recv().await),
            };
            match received {
                // Sweep: the `Left`s come back through the channel.
                None => {
                    self.shared
                        .with_service(&self.service, |svc| svc.sweep(Instant::now()));
                }
                Some(Ok(change)) => self.apply(change),
                Some(Err(RecvError::Lagged(missed))) => {
                    tracing::debug!(service = %self.service, missed, "registry watcher lagged; resyncing");
                    let now = Instant::now();
                    let changes = &mut self.changes;
                    let snapshot = self.shared.with_service(&self.service, |svc| {
                        // What is still queued is older than the snapshot:
                        // drop it (no change is sent while the lock is held).
                        while !matches!(
                            changes.try_recv(),
                            Err(TryRecvError::Empty | TryRecvError::Closed)
                        ) {}
                        svc.fresh(now).cloned().collect::<Vec<_>>()
                    });
                    self.reconcile(snapshot);
                }
                // The sender lives in the map, which this watcher keeps alive.
                Some(Err(RecvError::Closed)) => std::future::pending::<()>().await,
            }
        }
    }

    /// Queues a change, keeping the stream well formed.
    fn apply(&mut self, change: Membership) {
        match change {
            Membership::Joined(info) | Membership::Updated(info) => {
                match self.known.get(&info.id) {
                    Some(known) if *known == info => {}
                    Some(_) => {
                        self.known.insert(info.id.clone(), info.clone());
                        self.pending.push_back(Membership::Updated(info));
                    }
                    None => {
                        self.known.insert(info.id.clone(), info.clone());
                        self.pending.push_back(Membership::Joined(info));
                    }
                }
            }
            Membership::Left(id) => {
                if self.known.remove(&id).is_some() {
                    self.pending.push_back(Membership::Left(id));
                }
            }
        }
    }

    /// Queues the difference between the known set and `snapshot`.
    fn reconcile(&mut self, snapshot: Vec<InstanceInfo>) {
        let mut gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !snapshot.iter().any(|info| &info.id == *id))
            .cloned()
            .collect();
        gone.sort();
        for id in gone {
            self.apply(Membership::Left(id));
        }
        let mut snapshot = snapshot;
        snapshot.sort_by(|a, b| a.id.cmp(&b.id));
        for info in snapshot {
            self.apply(Membership::Joined(info));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use futures_util::StreamExt;

    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn instance(id: &str, port: u16) -> InstanceInfo {
        InstanceInfo::new("api", id, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    async fn ids(registry: &MemoryRegistry, service: &str) -> Vec<String> {
        let healthy = registry.healthy(service).await.unwrap();
        healthy.into_iter().map(|info| info.id).collect()
    }

    /// The next change, or `None` if none comes within `within` (paused clock).
    async fn next_within(changes: &mut MembershipStream, within: Duration) -> Option<Membership> {
        tokio::time::timeout(within, changes.next())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test(start_paused = true)]
    async fn registered_instance_is_healthy() {
        let registry = MemoryRegistry::new();
        registry.register(&instance("a", 1), TTL).await.unwrap();
        registry.register(&instance("b", 2), TTL).await.unwrap();
        assert_eq!(ids(&registry, "api").await, ["a", "b"]);
        assert!(registry.healthy("other").await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn clones_share_the_map() {
        let registry = MemoryRegistry::new();
        let clone = registry.clone();
        clone.register(&instance("a", 1), TTL).await.unwrap();
        assert_eq!(ids(&registry, "api").await, ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn instance_expires_after_its_ttl() {
        let registry = MemoryRegistry::new();
        registry.register(&instance("a", 1), TTL).await.unwrap();
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert_eq!(ids(&registry, "api").await, ["a"]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(ids(&registry, "api").await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_extends_the_ttl_and_updates_figures() {
        let registry = MemoryRegistry::new();
        let mut a = instance("a", 1);
        registry.register(&a, TTL).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        a.load.in_flight = 7;
        registry.heartbeat(&a, TTL).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let healthy = registry.healthy("api").await.unwrap();
        assert_eq!(healthy, vec![a]);
        assert_eq!(healthy[0].load.in_flight, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_after_expiry_registers_again() {
        let registry = MemoryRegistry::new();
        let a = instance("a", 1);
        registry.register(&a, TTL).await.unwrap();
        tokio::time::advance(TTL * 2).await;
        registry.heartbeat(&a, TTL).await.unwrap();
        assert_eq!(ids(&registry, "api").await, ["a"]);
    }

    #[tokio::test(start_paused = true)]
    async fn deregister_removes_at_once() {
        let registry = MemoryRegistry::new();
        registry.register(&instance("a", 1), TTL).await.unwrap();
        registry.register(&instance("b", 2), TTL).await.unwrap();
        registry.deregister("api", "a").await.unwrap();
        assert_eq!(ids(&registry, "api").await, ["b"]);
        // Deregistering an unknown instance is not an error.
        registry.deregister("api", "zz").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn remove_stale_counts_expired_entries() {
        let registry = MemoryRegistry::new();
        registry.register(&instance("a", 1), TTL).await.unwrap();
        registry.register(&instance("b", 2), TTL * 3).await.unwrap();
        assert_eq!(registry.remove_stale("api").await.unwrap(), 0);
        tokio::time::advance(TTL).await;
        assert_eq!(registry.remove_stale("api").await.unwrap(), 1);
        assert_eq!(registry.remove_stale("api").await.unwrap(), 0);
        assert_eq!(ids(&registry, "api").await, ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_starts_with_the_healthy_set() {
        let registry = MemoryRegistry::new();
        let (a, b) = (instance("a", 1), instance("b", 2));
        registry.register(&a, TTL).await.unwrap();
        registry.register(&b, TTL).await.unwrap();
        let mut changes = registry.watch("api");
        assert_eq!(changes.next().await, Some(Membership::Joined(a)));
        assert_eq!(changes.next().await, Some(Membership::Joined(b)));
    }

    #[tokio::test(start_paused = true)]
    async fn watch_sees_joins_updates_and_leaves() {
        let registry = MemoryRegistry::new();
        let mut changes = registry.watch("api");
        let mut a = instance("a", 1);
        registry.register(&a, TTL).await.unwrap();
        assert_eq!(changes.next().await, Some(Membership::Joined(a.clone())));

        // A heartbeat with the same figures is no change.
        registry.heartbeat(&a, TTL).await.unwrap();
        a.load.queue_depth = 3;
        registry.heartbeat(&a, TTL).await.unwrap();
        assert_eq!(changes.next().await, Some(Membership::Updated(a.clone())));

        registry.deregister("api", "a").await.unwrap();
        assert_eq!(changes.next().await, Some(Membership::Left("a".into())));
        assert_eq!(next_within(&mut changes, TTL * 2).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_reports_expiry_exactly_at_the_ttl() {
        let registry = MemoryRegistry::new();
        let mut changes = registry.watch("api");
        let start = Instant::now();
        registry.register(&instance("a", 1), TTL).await.unwrap();
        assert!(matches!(changes.next().await, Some(Membership::Joined(_))));
        assert_eq!(changes.next().await, Some(Membership::Left("a".into())));
        assert_eq!(start.elapsed(), TTL);
        assert!(ids(&registry, "api").await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn watch_keeps_an_instance_that_heartbeats() {
        let registry = MemoryRegistry::new();
        let mut changes = registry.watch("api");
        let a = instance("a", 1);
        registry.register(&a, TTL).await.unwrap();
        assert!(matches!(changes.next().await, Some(Membership::Joined(_))));
        let beats = {
            let registry = registry.clone();
            let a = a.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(TTL / 3).await;
                    registry.heartbeat(&a, TTL).await.unwrap();
                }
            })
        };
        // Ten heartbeats span more than three TTLs: no change at all.
        assert_eq!(next_within(&mut changes, TTL * 3).await, None);
        beats.await.unwrap();
        assert_eq!(changes.next().await, Some(Membership::Left("a".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn watch_reports_a_comeback_after_expiry() {
        let registry = MemoryRegistry::new();
        let mut changes = registry.watch("api");
        let a = instance("a", 1);
        registry.register(&a, TTL).await.unwrap();
        assert!(matches!(changes.next().await, Some(Membership::Joined(_))));
        assert_eq!(changes.next().await, Some(Membership::Left("a".into())));
        registry.heartbeat(&a, TTL).await.unwrap();
        assert_eq!(changes.next().await, Some(Membership::Joined(a)));
    }

    #[tokio::test(start_paused = true)]
    async fn watch_is_per_service() {
        let registry = MemoryRegistry::new();
        let mut changes = registry.watch("api");
        let other = InstanceInfo::new("db", "x", SocketAddr::from(([127, 0, 0, 1], 9)));
        registry.register(&other, TTL).await.unwrap();
        registry.register(&instance("a", 1), TTL).await.unwrap();
        match changes.next().await {
            Some(Membership::Joined(info)) => assert_eq!(info.id, "a"),
            other => panic!("expected a join of `a`, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lagging_watcher_resyncs_to_the_current_set() {
        let registry = MemoryRegistry::new();
        let mut changes = registry.watch("api");
        registry.register(&instance("gone", 1), TTL).await.unwrap();
        assert!(matches!(changes.next().await, Some(Membership::Joined(_))));
        registry.deregister("api", "gone").await.unwrap();
        let mut a = instance("a", 2);
        for n in 0..(CHANNEL_CAPACITY as u64 + 10) {
            a.load.in_flight = n;
            registry.heartbeat(&a, TTL).await.unwrap();
        }
        // The watcher missed the leave in the flood: it resyncs.
        let mut seen = Vec::new();
        while let Some(change) = next_within(&mut changes, Duration::from_millis(1)).await {
            seen.push(change);
        }
        assert_eq!(
            seen,
            vec![Membership::Left("gone".into()), Membership::Joined(a)]
        );
    }
}
