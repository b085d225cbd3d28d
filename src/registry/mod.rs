//! Instance coordination across processes and machines (feature `registry`).
//!
//! An instance registers itself under a service name with a TTL, heartbeats
//! with its load figures, and deregisters when it drains; clients list the
//! healthy (fresh) instances or watch the membership change, and feed it to a
//! balancer through [`discover::Registry`](crate::discover) (feature
//! `balance`); [`Heartbeat`] registers an instance, heartbeats with its
//! layers' figures and deregisters when it drains. [`MemoryRegistry`] serves
//! tests and a single process; `RedisRegistry` (feature `redis`) shares the
//! set through a real Redis.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use futures_core::Stream;
use serde::{Deserialize, Serialize};

/// One instance of a service, as it registers itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Unique among the instances of the service (a hostname plus port, a
    /// pod name, a UUID).
    pub id: String,
    /// The service the instance belongs to.
    pub service: String,
    /// Where clients reach it.
    pub addr: SocketAddr,
    /// The version it runs.
    pub version: String,
    /// When it started (milliseconds since the Unix epoch when serialized).
    #[serde(with = "unix_millis")]
    pub started_at: SystemTime,
    /// Free-form labels (zone, instance size...).
    pub metadata: BTreeMap<String, String>,
    /// The load figures of its last heartbeat.
    pub load: LoadFigures,
}

impl InstanceInfo {
    /// An instance `id` of `service` at `addr`, started now (in whole
    /// milliseconds, as it is serialized, so that it reads back equal),
    /// version `"unknown"`, no metadata, no load figures yet.
    pub fn new(service: impl Into<String>, id: impl Into<String>, addr: SocketAddr) -> Self {
        let now = SystemTime::now();
        let started_at = match now.duration_since(std::time::UNIX_EPOCH) {
            Ok(since) => now - Duration::from_nanos(u64::from(since.subsec_nanos() % 1_000_000)),
            Err(_) => now,
        };
        InstanceInfo {
            id: id.into(),
            service: service.into(),
            addr,
            version: "unknown".to_owned(),
            started_at,
            metadata: BTreeMap::new(),
            load: LoadFigures::default(),
        }
    }
}

/// The load figures an instance reports in its heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LoadFigures {
    /// Calls in flight.
    pub in_flight: u64,
    /// The concurrency limit (its capacity); 0 when unknown.
    pub limit: u64,
    /// `in_flight / limit`, 0 to 1 (more while a queue stands).
    pub utilisation: f64,
    /// Requests waiting in the admission queue.
    pub queue_depth: u64,
    /// The 95th percentile latency over the recent window, in milliseconds.
    pub p95_latency_ms: f64,
    /// CPU use of the process, 0 to 1 per core, where available.
    pub cpu: Option<f64>,
    /// Resident memory of the process in bytes, where available.
    pub memory_bytes: Option<u64>,
}

/// A change in the membership of a service, as [`InstanceRegistry::watch`]
/// reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum Membership {
    /// An instance joined, or came back after it had left or expired.
    Joined(InstanceInfo),
    /// A known instance heartbeated with new figures.
    Updated(InstanceInfo),
    /// An instance deregistered or expired (its id).
    Left(String),
}

/// Why a registry operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum RegistryError {
    /// The shared store could not be reached (it is retried with backoff).
    Unavailable(String),
    /// A stored entry could not be read or written.
    Invalid(String),
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::Unavailable(reason) => write!(f, "registry unavailable: {reason}"),
            RegistryError::Invalid(reason) => write!(f, "invalid registry entry: {reason}"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// A boxed future, for the registry's methods.
pub type RegistryFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, RegistryError>> + Send + 'a>>;

/// A stream of membership changes: it never ends while the registry lives,
/// and a change lost by the store (a dropped notification, a reconnect) is
/// made up by a periodic full resync.
pub type MembershipStream = Pin<Box<dyn Stream<Item = Membership> + Send>>;

/// Where instances register and clients find them.
///
/// Object safe (`Arc<dyn InstanceRegistry>`), so the heartbeat task, the
/// discovery source and the scale aggregate take any registry.
pub trait InstanceRegistry: Send + Sync + 'static {
    /// Registers (or re-registers) `info` for `ttl`: it is healthy until the
    /// TTL passes without a heartbeat.
    fn register(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()>;

    /// Refreshes the TTL and the load figures; an upsert, so a store that lost
    /// its data (a Redis restarted without persistence) is repopulated.
    fn heartbeat(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()>;

    /// Removes the instance at once (a clean shutdown, a drain).
    fn deregister(&self, service: &str, id: &str) -> RegistryFuture<'_, ()>;

    /// The instances of `service` whose TTL has not passed.
    fn healthy(&self, service: &str) -> RegistryFuture<'_, Vec<InstanceInfo>>;

    /// Removes the entries of `service` whose TTL has passed; returns how many.
    fn remove_stale(&self, service: &str) -> RegistryFuture<'_, usize>;

    /// The membership changes of `service`, starting with a `Joined` for
    /// every healthy instance.
    fn watch(&self, service: &str) -> MembershipStream;
}

mod unix_millis {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let millis = time
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis();
        s.serialize_u64(u64::try_from(millis).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let millis = u64::deserialize(d)?;
        Ok(UNIX_EPOCH + Duration::from_millis(millis))
    }
}

pub mod heartbeat;
pub use self::heartbeat::{Heartbeat, HeartbeatBuilder, HeartbeatHandle};
pub mod memory;
pub use self::memory::MemoryRegistry;

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisRegistry, RedisRegistryBuilder};
