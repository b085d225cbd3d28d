//! The Redis-backed registry (feature `redis`).
//!
//! [`RedisRegistry`] shares the instances of every service through a real
//! Redis, so instances on several machines find each other. It is built from
//! a URL as the `redis` crate reads it (`redis://[user][:password@]host[:port][/db]`,
//! and `rediss://` for TLS with feature `redis-tls`, which turns on the
//! `redis` crate's rustls support; as with the `redis` crate, install a rustls
//! `CryptoProvider` at start-up, e.g.
//! `rustls::crypto::ring::default_provider().install_default()`) and
//! connects lazily, on the first operation, through the `redis` crate's
//! `ConnectionManager`, which reconnects with backoff.
//!
//! # Example
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use futures::StreamExt;
//! use tower_scale::registry::redis::RedisRegistry;
//! use tower_scale::registry::{InstanceInfo, InstanceRegistry};
//!
//! let registry = RedisRegistry::builder("redis://127.0.0.1:6379")
//!     .namespace("shop-prod")
//!     .resync_interval(Duration::from_secs(5))
//!     .build()?;
//!
//! // An instance registers, then heartbeats well within its TTL.
//! let me = InstanceInfo::new("api", "api-1", "10.0.0.7:8080".parse()?);
//! registry.register(&me, Duration::from_secs(15)).await?;
//! registry.heartbeat(&me, Duration::from_secs(15)).await?;
//!
//! // A client lists the instances, or follows them.
//! let healthy = registry.healthy("api").await?;
//! let mut changes = registry.watch("api");
//! while let Some(change) = changes.next().await {
//!     println!("{change:?}");
//! }
//! # let _ = healthy;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! For a service `<service>` in the namespace `<ns>` (default
//! `"tower-scale"`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<ns>:<service>:instance:<id>` | string, `PX` the TTL | `{"ttl_ms": .., "info": <InstanceInfo>}` |
//! | `<ns>:<service>:index` | sorted set | the ids, scored by expiry time (Unix ms, the writer's clock; informative only) |
//! | `<ns>:<service>:changes` | pub/sub channel | `{"op":"up","ttl_ms":..,"info":..}` or `{"op":"down","id":..}` |
//!
//! `register` and `heartbeat` are the same upsert (`SET .. PX`, `ZADD`,
//! `PUBLISH` in one `MULTI`), so a Redis that came back empty (restarted
//! without persistence) is repopulated by the next heartbeats. `deregister`
//! deletes the key, removes the id from the index and publishes `down`.
//! `healthy` reads the index and the keys and leaves out the ids whose key
//! has expired; [`remove_stale`](InstanceRegistry::remove_stale) removes them
//! from the index (every [`Heartbeat`](crate::registry::Heartbeat) calls it
//! every 20 heartbeats; call it yourself if your instances register another
//! way). `%` and `:` in the namespace and the service name are
//! percent-encoded, so no two (namespace, service) pairs share a key.
//! Non-finite load figures (NaN) are stored as 0 (`cpu` as `None`): JSON has
//! no NaN.
//!
//! # Watching
//!
//! A [`watch`](InstanceRegistry::watch) stream subscribes to the service's
//! channel on a connection of its own, then reads the whole set, and after
//! that reads it again every `resync_interval` (and when a known instance's
//! TTL runs out), so a lost notice heals. It keeps, for every instance, the
//! time its TTL runs out as far as it has seen, and follows these rules so
//! that a Redis that lost its data, or a connection that dropped, never takes
//! instances away from a balancer that are still alive:
//!
//! - A `down` notice (a deregistration) removes the instance at once.
//! - An instance missing from a read leaves only once its TTL has run out
//!   since the last heartbeat the stream saw. A Redis restarted empty is
//!   repopulated by heartbeats within that time; an instance killed without
//!   deregistering leaves shortly after its TTL. (A deregistration whose
//!   notice was lost is treated the same way: it leaves at its TTL.)
//! - After the stream could not read Redis or lost its subscription, every
//!   known instance gets one more full TTL, counted from the first good read,
//!   to heartbeat again: the instances could not heartbeat either while Redis
//!   was away.
//! - A read that finds no instance at all while the stream knows some is not
//!   trusted alone: the instances leave only if the next read, one
//!   `resync_interval` later, is empty too.
//!
//! While Redis is unreachable the stream emits nothing: its consumer keeps
//! the last known set. It resubscribes with backoff and resyncs when Redis
//! comes back. Set the `resync_interval` no shorter than the heartbeat
//! interval, and the TTL to a few heartbeat intervals.
//!
//! # Errors
//!
//! Operations fail with [`RegistryError::Unavailable`] when Redis cannot be
//! reached within the [timeout](RedisRegistryBuilder::timeout) (the
//! connection is retried with backoff in the background), and with
//! [`RegistryError::Invalid`] when Redis refuses a command or the TTL is
//! zero. An entry that cannot be decoded is left out of the reads, with a
//! warning.
//!
//! # Metrics
//!
//! With `name` = the service:
//! `tower_scale_registry_errors_total{name}` (failed operations, reads and
//! subscriptions, and undecodable entries) and
//! `tower_scale_registry_instances{name}` (the instances the last read or
//! watch found). Tracing events mark connection loss and recovery and every
//! membership change a watch stream sees.

mod keys;
mod watch;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisError;

use self::keys::{Keys, NoticeRef, Stored, StoredRef};
use super::{InstanceInfo, InstanceRegistry, MembershipStream, RegistryError, RegistryFuture};
use crate::error::ConfigError;
use crate::metrics_util;

const DEFAULT_NAMESPACE: &str = "tower-scale";
const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Removes the index members whose instance key is gone; returns how many.
/// Atomic, so an instance that registers meanwhile is never dropped.
const REMOVE_STALE: &str = r"
local removed = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    removed = removed + 1
  end
end
return removed
";

/// An [`InstanceRegistry`] in Redis; clones share one connection. See the
/// [module docs](self) for the layout, the watch rules and an example.
#[derive(Clone)]
pub struct RedisRegistry {
    inner: Arc<Inner>,
}

/// Builds a [`RedisRegistry`]; from [`RedisRegistry::builder`].
#[derive(Clone)]
pub struct RedisRegistryBuilder {
    url: String,
    namespace: String,
    resync_interval: Duration,
    timeout: Duration,
}

struct Inner {
    client: redis::Client,
    namespace: String,
    resync_interval: Duration,
    timeout: Duration,
    connection: OnceLock<ConnectionManager>,
    metrics: Mutex<HashMap<String, ServiceMetrics>>,
    /// Whether the last operation reached Redis (to log loss and recovery
    /// once each).
    reachable: AtomicBool,
}

#[derive(Clone)]
struct ServiceMetrics {
    errors: Counter,
    instances: Gauge,
}

/// One instance as a read found it.
struct Found {
    info: InstanceInfo,
    /// The TTL of its last heartbeat.
    ttl: Duration,
    /// The time left until it expires.
    remaining: Duration,
}

impl RedisRegistry {
    /// A builder for a registry in the Redis at `url`.
    pub fn builder(url: impl Into<String>) -> RedisRegistryBuilder {
        RedisRegistryBuilder {
            url: url.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            resync_interval: DEFAULT_RESYNC_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The namespace that prefixes every key.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }
}

impl RedisRegistryBuilder {
    /// The prefix of every key and channel (default `"tower-scale"`), so that
    /// several deployments share one Redis without seeing each other.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How often a [`watch`](InstanceRegistry::watch) stream reads the whole
    /// set, to make up for lost notices (default 5 s). Keep it no shorter
    /// than the heartbeat interval.
    pub fn resync_interval(mut self, interval: Duration) -> Self {
        self.resync_interval = interval;
        self
    }

    /// How long an operation may wait for Redis (connecting included) before
    /// it fails with [`RegistryError::Unavailable`] (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The registry. It does not connect yet (nor spawn anything): the first
    /// operation does.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `url` when the `redis` crate cannot read the
    /// URL, `namespace` when it is empty, `resync_interval` or `timeout`
    /// when zero.
    pub fn build(self) -> Result<RedisRegistry, ConfigError> {
        // The redis crate's messages do not repeat the URL (which may hold a
        // password).
        let client = redis::Client::open(self.url.as_str())
            .map_err(|err| ConfigError::new("url", format!("not a Redis URL: {err}")))?;
        if self.namespace.is_empty() {
            return Err(ConfigError::new("namespace", "must not be empty"));
        }
        if self.resync_interval.is_zero() {
            return Err(ConfigError::new(
                "resync_interval",
                "must be more than zero",
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be more than zero"));
        }
        Ok(RedisRegistry {
            inner: Arc::new(Inner {
                client,
                namespace: self.namespace,
                resync_interval: self.resync_interval,
                timeout: self.timeout,
                connection: OnceLock::new(),
                metrics: Mutex::new(HashMap::new()),
                reachable: AtomicBool::new(true),
            }),
        })
    }
}

impl fmt::Debug for RedisRegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the URL: it may hold a password.
        f.debug_struct("RedisRegistryBuilder")
            .field("namespace", &self.namespace)
            .field("resync_interval", &self.resync_interval)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("namespace", &self.inner.namespace)
            .field("resync_interval", &self.inner.resync_interval)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn keys(&self, service: &str) -> Keys {
        Keys::new(&self.namespace, service)
    }

    fn metrics(&self, service: &str) -> ServiceMetrics {
        let mut metrics = self
            .metrics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        metrics
            .entry(service.to_owned())
            .or_insert_with(|| ServiceMetrics {
                errors: metrics::counter!("tower_scale_registry_errors_total", "name" => service.to_owned()),
                instances: metrics_util::gauge("tower_scale_registry_instances", service),
            })
            .clone()
    }

    /// The shared connection, made on first use (inside the runtime: the
    /// manager spawns its reconnection task).
    fn connection(&self) -> Result<ConnectionManager, RegistryError> {
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(3);
        let manager = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|err| RegistryError::Unavailable(err.to_string()))?;
        Ok(self.connection.get_or_init(|| manager).clone())
    }

    /// Runs `op` within the timeout, keeping the books: the error counter of
    /// `service`, and one event when Redis becomes unreachable and one when
    /// it is back.
    async fn run<T, F>(&self, service: &str, what: &'static str, op: F) -> Result<T, RegistryError>
    where
        F: Future<Output = Result<T, RegistryError>>,
    {
        let result = match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(RegistryError::Unavailable(format!(
                "no answer from Redis within {:?}",
                self.timeout
            ))),
        };
        match &result {
            Ok(_) => {
                if !self.reachable.swap(true, Ordering::Relaxed) {
                    tracing::info!(namespace = %self.namespace, "redis registry: connection recovered");
                }
            }
            Err(err) => {
                self.metrics(service).errors.increment(1);
                if matches!(err, RegistryError::Unavailable(_)) {
                    if self.reachable.swap(false, Ordering::Relaxed) {
                        tracing::warn!(namespace = %self.namespace, %service, op = what, error = %err, "redis registry: connection lost");
                    } else {
                        tracing::debug!(%service, op = what, error = %err, "redis registry: still unreachable");
                    }
                } else {
                    tracing::warn!(%service, op = what, error = %err, "redis registry: operation failed");
                }
            }
        }
        result
    }

    async fn upsert(&self, info: &InstanceInfo, ttl: Duration) -> Result<(), RegistryError> {
        let ttl_ms = keys::ttl_ms(ttl)?;
        let info = keys::finite(info);
        let value = keys::encode(&StoredRef {
            ttl_ms,
            info: &info,
        })?;
        let notice = keys::encode(&NoticeRef::Up {
            ttl_ms,
            info: &info,
        })?;
        let keys = self.keys(&info.service);
        let expires_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .saturating_add(ttl)
            .as_millis() as f64;
        let mut connection = self.connection()?;
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(keys.instance(&info.id))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("ZADD")
            .arg(keys.index())
            .arg(expires_ms)
            .arg(&info.id)
            .ignore()
            .cmd("PUBLISH")
            .arg(keys.channel())
            .arg(notice)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .map_err(classify)
    }

    /// Every instance of `service` whose key is present.
    async fn read(&self, service: &str) -> Result<Vec<Found>, RegistryError> {
        let keys = self.keys(service);
        let mut connection = self.connection()?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.index())
            .arg(0)
            .arg(-1)
            .query_async(&mut connection)
            .await
            .map_err(classify)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for id in &ids {
            let key = keys.instance(id);
            pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        }
        let values: Vec<redis::Value> =
            pipe.query_async(&mut connection).await.map_err(classify)?;
        if values.len() != ids.len() * 2 {
            return Err(RegistryError::Invalid(format!(
                "expected {} replies from Redis, got {}",
                ids.len() * 2,
                values.len()
            )));
        }
        let mut found = Vec::with_capacity(ids.len());
        for (id, pair) in ids.iter().zip(values.chunks_exact(2)) {
            let raw: Option<String> = redis::from_redis_value_ref(&pair[0])
                .map_err(|err| RegistryError::Invalid(err.to_string()))?;
            let pttl: i64 = redis::from_redis_value_ref(&pair[1])
                .map_err(|err| RegistryError::Invalid(err.to_string()))?;
            // Expired (or deleted) since it was indexed.
            let Some(raw) = raw else { continue };
            let stored: Stored = match serde_json::from_str(&raw) {
                Ok(stored) => stored,
                Err(err) => {
                    self.metrics(service).errors.increment(1);
                    tracing::warn!(%service, %id, error = %err, "redis registry: undecodable entry left out");
                    continue;
                }
            };
            let ttl = Duration::from_millis(stored.ttl_ms);
            // -1: no TTL (set by hand); count it as a fresh heartbeat.
            let remaining = match u64::try_from(pttl) {
                Ok(ms) => Duration::from_millis(ms),
                Err(_) if pttl == -1 => ttl,
                Err(_) => continue,
            };
            found.push(Found {
                info: stored.info,
                ttl,
                remaining,
            });
        }
        found.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        Ok(found)
    }
}

/// Unreachable, or refused by Redis.
fn classify(err: RedisError) -> RegistryError {
    if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
    {
        RegistryError::Unavailable(err.to_string())
    } else {
        RegistryError::Invalid(err.to_string())
    }
}

impl InstanceRegistry for RedisRegistry {
    fn register(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()> {
        let info = info.clone();
        Box::pin(async move {
            let inner = &*self.inner;
            inner
                .run(&info.service, "register", inner.upsert(&info, ttl))
                .await?;
            tracing::info!(service = %info.service, id = %info.id, addr = %info.addr, "instance registered");
            Ok(())
        })
    }

    fn heartbeat(&self, info: &InstanceInfo, ttl: Duration) -> RegistryFuture<'_, ()> {
        let info = info.clone();
        Box::pin(async move {
            let inner = &*self.inner;
            inner
                .run(&info.service, "heartbeat", inner.upsert(&info, ttl))
                .await
        })
    }

    fn deregister(&self, service: &str, id: &str) -> RegistryFuture<'_, ()> {
        let (service, id) = (service.to_owned(), id.to_owned());
        Box::pin(async move {
            let inner = &*self.inner;
            let op = async {
                let keys = inner.keys(&service);
                let notice = keys::encode(&NoticeRef::Down { id: &id })?;
                let mut connection = inner.connection()?;
                redis::pipe()
                    .atomic()
                    .cmd("DEL")
                    .arg(keys.instance(&id))
                    .ignore()
                    .cmd("ZREM")
                    .arg(keys.index())
                    .arg(&id)
                    .ignore()
                    .cmd("PUBLISH")
                    .arg(keys.channel())
                    .arg(notice)
                    .ignore()
                    .query_async::<()>(&mut connection)
                    .await
                    .map_err(classify)
            };
            inner.run(&service, "deregister", op).await?;
            tracing::info!(%service, %id, "instance deregistered");
            Ok(())
        })
    }

    fn healthy(&self, service: &str) -> RegistryFuture<'_, Vec<InstanceInfo>> {
        let service = service.to_owned();
        Box::pin(async move {
            let inner = &*self.inner;
            let found = inner.run(&service, "healthy", inner.read(&service)).await?;
            inner.metrics(&service).instances.set(found.len() as f64);
            Ok(found.into_iter().map(|found| found.info).collect())
        })
    }

    fn remove_stale(&self, service: &str) -> RegistryFuture<'_, usize> {
        let service = service.to_owned();
        Box::pin(async move {
            let inner = &*self.inner;
            let op = async {
                let keys = inner.keys(&service);
                let mut connection = inner.connection()?;
                redis::cmd("EVAL")
                    .arg(REMOVE_STALE)
                    .arg(1)
                    .arg(keys.index())
                    .arg(keys.instance_prefix())
                    .query_async::<usize>(&mut connection)
                    .await
                    .map_err(classify)
            };
            let removed = inner.run(&service, "remove_stale", op).await?;
            if removed > 0 {
                tracing::info!(%service, removed, "stale instances removed from the index");
            }
            Ok(removed)
        })
    }

    fn watch(&self, service: &str) -> MembershipStream {
        watch::stream(self.inner.clone(), service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_needs_no_runtime_and_no_server() {
        let registry = RedisRegistry::builder("redis://:pw@127.0.0.1:1/2")
            .namespace("ns")
            .build()
            .unwrap();
        assert_eq!(registry.namespace(), "ns");
        assert!(!format!("{registry:?}").contains("pw"));
    }

    #[test]
    fn invalid_settings_name_their_field() {
        let field = |builder: RedisRegistryBuilder| builder.build().unwrap_err().field();
        assert_eq!(field(RedisRegistry::builder("http://127.0.0.1")), "url");
        assert_eq!(field(RedisRegistry::builder("not a url")), "url");
        let ok = || RedisRegistry::builder("redis://127.0.0.1");
        assert_eq!(field(ok().namespace("")), "namespace");
        assert_eq!(
            field(ok().resync_interval(Duration::ZERO)),
            "resync_interval"
        );
        assert_eq!(field(ok().timeout(Duration::ZERO)), "timeout");
    }

    #[tokio::test]
    async fn a_zero_ttl_is_invalid() {
        let registry = RedisRegistry::builder("redis://127.0.0.1:1")
            .build()
            .unwrap();
        let info = InstanceInfo::new("api", "a", "127.0.0.1:1".parse().unwrap());
        let err = registry.register(&info, Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_unavailable() {
        // Port 1 on loopback: nothing listens.
        let registry = RedisRegistry::builder("redis://127.0.0.1:1")
            .build()
            .unwrap();
        let err = registry.healthy("api").await.unwrap_err();
        assert!(matches!(err, RegistryError::Unavailable(_)), "{err}");
    }
}
