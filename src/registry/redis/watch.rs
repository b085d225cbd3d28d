//! The watch stream: notices from pub/sub, full reads as the fallback, and
//! the rules that keep the last known set through a Redis outage (see the
//! module docs).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSubStream;
use tokio::time::Instant;

use super::keys::Notice;
use super::{Found, Inner, ServiceMetrics};
use crate::registry::{InstanceInfo, Membership, MembershipStream, RegistryError};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long after a known TTL runs out the stream reads again (Redis expires
/// a key when it is read after its TTL, so little is needed).
const SLACK: Duration = Duration::from_millis(20);

pub(super) fn stream(inner: Arc<Inner>, service: &str) -> MembershipStream {
    let watcher = Watcher::new(inner, service);
    Box::pin(futures_util::stream::unfold(
        watcher,
        |mut watcher| async move {
            let change = watcher.next().await;
            Some((change, watcher))
        },
    ))
}

impl Watcher {
    fn new(inner: Arc<Inner>, service: &str) -> Self {
        let now = Instant::now();
        Watcher {
            metrics: inner.metrics(service),
            channel: inner.keys(service).channel(),
            max_backoff: MAX_BACKOFF.min(inner.resync_interval).max(MIN_BACKOFF),
            inner,
            service: service.to_owned(),
            known: HashMap::new(),
            pending: VecDeque::new(),
            subscription: None,
            subscribed_once: false,
            next_subscribe: now,
            backoff: MIN_BACKOFF,
            next_resync: now,
            blind: false,
            empty_read: false,
        }
    }
}

struct Known {
    info: InstanceInfo,
    ttl: Duration,
    /// When its TTL runs out, as far as this stream has seen.
    expires: Instant,
}

struct Watcher {
    inner: Arc<Inner>,
    service: String,
    channel: String,
    metrics: ServiceMetrics,
    known: HashMap<String, Known>,
    pending: VecDeque<Membership>,
    subscription: Option<PubSubStream>,
    subscribed_once: bool,
    next_subscribe: Instant,
    backoff: Duration,
    max_backoff: Duration,
    next_resync: Instant,
    /// Since the last good read the stream may have missed heartbeats (a
    /// failed read, a lost subscription): the next good read gives every
    /// known instance a full TTL.
    blind: bool,
    /// The last read found no instance while some were known: the next one
    /// decides.
    empty_read: bool,
}

impl Watcher {
    async fn next(&mut self) -> Membership {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return change;
            }
            let now = Instant::now();
            if self.subscription.is_none() && now >= self.next_subscribe {
                self.subscribe().await;
                continue;
            }
            if now >= self.next_resync {
                self.resync().await;
                continue;
            }
            let mut wake = self.next_resync;
            if self.subscription.is_none() {
                wake = wake.min(self.next_subscribe);
            }
            match &mut self.subscription {
                Some(subscription) => {
                    match tokio::time::timeout_at(wake, subscription.next()).await {
                        Ok(Some(message)) => self.notice(message.get_payload_bytes()),
                        Ok(None) => self.lost_subscription(),
                        Err(_) => {}
                    }
                }
                None => tokio::time::sleep_until(wake).await,
            }
        }
    }

    async fn subscribe(&mut self) {
        let inner = &self.inner;
        let channel = &self.channel;
        let attempt = async {
            let mut pubsub = inner.client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        let result = match tokio::time::timeout(inner.timeout, attempt).await {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(_) => Err(format!("no answer from Redis within {:?}", inner.timeout)),
        };
        let now = Instant::now();
        match result {
            Ok(subscription) => {
                self.subscription = Some(subscription);
                if self.subscribed_once {
                    tracing::info!(service = %self.service, "registry watch: resubscribed; resyncing");
                }
                self.subscribed_once = true;
                self.backoff = MIN_BACKOFF;
                // Notices sent before the subscription are lost: read now.
                self.next_resync = now;
            }
            Err(error) => {
                self.metrics.errors.increment(1);
                self.blind = true;
                if self.backoff == MIN_BACKOFF {
                    tracing::warn!(service = %self.service, %error, "registry watch: cannot subscribe; keeping the last known set and retrying");
                } else {
                    tracing::debug!(service = %self.service, %error, "registry watch: cannot subscribe yet");
                }
                self.next_subscribe = now + self.backoff;
                self.backoff = (self.backoff * 2).min(self.max_backoff);
            }
        }
    }

    fn lost_subscription(&mut self) {
        tracing::warn!(service = %self.service, "registry watch: subscription lost; keeping the last known set and resubscribing");
        self.metrics.errors.increment(1);
        self.subscription = None;
        self.blind = true;
        self.next_subscribe = Instant::now();
    }

    async fn resync(&mut self) {
        let inner = &self.inner;
        let result = inner
            .run(&self.service, "watch", inner.read(&self.service))
            .await;
        let now = Instant::now();
        self.next_resync = now + inner.resync_interval;
        match result {
            Ok(found) => self.reconcile(found, now),
            Err(err) => {
                tracing::debug!(service = %self.service, error = %err, "registry watch: resync failed; keeping the last known set");
                self.blind = true;
                if matches!(err, RegistryError::Unavailable(_)) && self.subscription.is_some() {
                    // The subscription may be as dead as the read, without
                    // knowing it yet: renew it.
                    self.subscription = None;
                    self.next_subscribe = now;
                }
            }
        }
        // Read again when a known TTL runs out.
        for known in self.known.values() {
            if known.expires > now {
                self.next_resync = self.next_resync.min(known.expires + SLACK);
            }
        }
    }

    fn reconcile(&mut self, found: Vec<Found>, now: Instant) {
        if self.blind {
            self.blind = false;
            for known in self.known.values_mut() {
                known.expires = known.expires.max(now + known.ttl);
            }
        }
        let present: HashSet<String> = found.iter().map(|f| f.info.id.clone()).collect();
        let read_nothing = found.is_empty();
        for found in found {
            self.upsert(found.info, found.ttl, now + found.remaining);
        }
        let mut expired: Vec<String> = self
            .known
            .iter()
            .filter(|(id, known)| !present.contains(*id) && known.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if read_nothing && !expired.is_empty() && expired.len() == self.known.len() {
            if !self.empty_read {
                self.empty_read = true;
                tracing::warn!(service = %self.service, known = self.known.len(), "registry watch: read no instance at all; keeping them until the next read agrees");
                return;
            }
            tracing::warn!(service = %self.service, known = self.known.len(), "registry watch: a second read found no instance; every instance leaves");
        }
        self.empty_read = false;
        expired.sort();
        for id in expired {
            self.known.remove(&id);
            tracing::info!(service = %self.service, %id, "registry watch: instance expired");
            self.pending.push_back(Membership::Left(id));
        }
        self.metrics.instances.set(self.known.len() as f64);
    }

    fn notice(&mut self, payload: &[u8]) {
        let notice: Notice = match serde_json::from_slice(payload) {
            Ok(notice) => notice,
            Err(err) => {
                self.metrics.errors.increment(1);
                tracing::warn!(service = %self.service, error = %err, "registry watch: undecodable notice ignored");
                return;
            }
        };
        match notice {
            Notice::Up { ttl_ms, info } => {
                if info.service != self.service {
                    return;
                }
                let ttl = Duration::from_millis(ttl_ms);
                let expires = Instant::now() + ttl;
                self.upsert(info, ttl, expires);
                self.empty_read = false;
                self.next_resync = self.next_resync.min(expires + SLACK);
            }
            Notice::Down { id } => {
                if self.known.remove(&id).is_some() {
                    tracing::info!(service = %self.service, %id, "registry watch: instance left");
                    self.pending.push_back(Membership::Left(id));
                }
            }
        }
        self.metrics.instances.set(self.known.len() as f64);
    }

    fn upsert(&mut self, info: InstanceInfo, ttl: Duration, expires: Instant) {
        match self.known.get_mut(&info.id) {
            Some(known) => {
                known.ttl = ttl;
                known.expires = known.expires.max(expires);
                if known.info != info {
                    tracing::debug!(service = %self.service, id = %info.id, "registry watch: instance updated");
                    known.info = info.clone();
                    self.pending.push_back(Membership::Updated(info));
                }
            }
            None => {
                tracing::info!(service = %self.service, id = %info.id, addr = %info.addr, "registry watch: instance joined");
                self.known.insert(
                    info.id.clone(),
                    Known {
                        info: info.clone(),
                        ttl,
                        expires,
                    },
                );
                self.pending.push_back(Membership::Joined(info));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::redis::RedisRegistry;

    const TTL: Duration = Duration::from_secs(3);

    fn watcher() -> Watcher {
        // Never connects: the tests feed reads and notices by hand.
        let registry = RedisRegistry::builder("redis://127.0.0.1:1")
            .build()
            .unwrap();
        Watcher::new(registry.inner, "api")
    }

    fn found(id: &str, remaining: Duration) -> Found {
        let mut info = InstanceInfo::new("api", id, "127.0.0.1:1".parse().unwrap());
        info.started_at = std::time::UNIX_EPOCH;
        Found {
            info,
            ttl: TTL,
            remaining,
        }
    }

    fn drain(watcher: &mut Watcher) -> Vec<Membership> {
        watcher.pending.drain(..).collect()
    }

    fn left(id: &str) -> Membership {
        Membership::Left(id.to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_missing_from_a_read_stays_until_its_ttl_runs_out() {
        let mut w = watcher();
        w.reconcile(vec![found("a", TTL), found("b", TTL)], Instant::now());
        assert_eq!(drain(&mut w).len(), 2);
        // Redis lost `b` (a restart): not gone while its TTL runs.
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        w.reconcile(vec![found("a", TTL)], Instant::now());
        assert_eq!(drain(&mut w), []);
        tokio::time::advance(Duration::from_millis(1)).await;
        w.reconcile(vec![found("a", TTL)], Instant::now());
        assert_eq!(drain(&mut w), [left("b")]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_read_needs_a_second_to_remove_everyone() {
        let mut w = watcher();
        w.reconcile(vec![found("a", TTL), found("b", TTL)], Instant::now());
        drain(&mut w);
        tokio::time::advance(TTL).await;
        w.reconcile(vec![], Instant::now());
        assert_eq!(drain(&mut w), []);
        w.reconcile(vec![], Instant::now());
        assert_eq!(drain(&mut w), [left("a"), left("b")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_with_instances_in_between_resets_the_empty_read() {
        let mut w = watcher();
        w.reconcile(vec![found("a", TTL)], Instant::now());
        drain(&mut w);
        tokio::time::advance(TTL).await;
        w.reconcile(vec![], Instant::now());
        w.reconcile(vec![found("a", TTL)], Instant::now());
        tokio::time::advance(TTL).await;
        w.reconcile(vec![], Instant::now());
        assert_eq!(drain(&mut w), []);
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_outage_every_instance_gets_a_full_ttl() {
        let mut w = watcher();
        w.reconcile(vec![found("a", TTL), found("b", TTL)], Instant::now());
        drain(&mut w);
        // Redis away for two TTLs; it comes back with `a` alone.
        w.blind = true;
        tokio::time::advance(TTL * 2).await;
        w.reconcile(vec![found("a", TTL)], Instant::now());
        assert_eq!(drain(&mut w), []);
        tokio::time::advance(TTL).await;
        w.reconcile(vec![found("a", TTL)], Instant::now());
        assert_eq!(drain(&mut w), [left("b")]);
    }

    #[tokio::test(start_paused = true)]
    async fn notices_join_update_and_leave_at_once() {
        let mut w = watcher();
        let mut a = InstanceInfo::new("api", "a", "127.0.0.1:1".parse().unwrap());
        let up = |info: &InstanceInfo| {
            super::super::keys::encode(&super::super::keys::NoticeRef::Up { ttl_ms: 1000, info })
                .unwrap()
        };
        w.notice(up(&a).as_bytes());
        w.notice(up(&a).as_bytes());
        a.load.in_flight = 3;
        w.notice(up(&a).as_bytes());
        w.notice(br#"{"op":"down","id":"a"}"#);
        w.notice(br#"{"op":"down","id":"a"}"#);
        w.notice(b"not json");
        let changes = drain(&mut w);
        assert!(matches!(&changes[0], Membership::Joined(info) if info.id == "a"));
        assert_eq!(changes[1], Membership::Updated(a));
        assert_eq!(changes[2], left("a"));
        assert_eq!(changes.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn notices_of_another_service_are_ignored() {
        let mut w = watcher();
        let other = InstanceInfo::new("db", "x", "127.0.0.1:1".parse().unwrap());
        let notice = super::super::keys::encode(&super::super::keys::NoticeRef::Up {
            ttl_ms: 1000,
            info: &other,
        })
        .unwrap();
        w.notice(notice.as_bytes());
        assert_eq!(drain(&mut w), []);
    }
}
