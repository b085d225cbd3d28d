//! `RedisRegistry`: register, heartbeat, expiry, watch, several clients,
//! namespaces, and a Redis restarted empty mid-test.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tower_scale::registry::redis::RedisRegistry;
use tower_scale::registry::{InstanceInfo, InstanceRegistry, Membership, RegistryError};

use crate::support::{eventually, RedisServer, Watched};

const SERVICE: &str = "api";
/// Short enough that expiry tests finish quickly, long enough for a loaded
/// machine: the heartbeats below come every quarter of it.
const TTL: Duration = Duration::from_secs(2);

fn instance(id: &str, port: u16) -> InstanceInfo {
    InstanceInfo::new(SERVICE, id, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn registry(server: &RedisServer, namespace: &str) -> RedisRegistry {
    RedisRegistry::builder(server.url())
        .namespace(namespace)
        .resync_interval(Duration::from_millis(300))
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

async fn ids(registry: &RedisRegistry) -> Vec<String> {
    let healthy = registry.healthy(SERVICE).await.unwrap();
    healthy.into_iter().map(|info| info.id).collect()
}

/// Heartbeats `info` with [`TTL`] every quarter TTL until aborted, ignoring
/// failures (as an instance does while Redis is away).
fn heartbeating(registry: &RedisRegistry, info: InstanceInfo) -> JoinHandle<()> {
    heartbeating_with(registry, info, TTL)
}

fn heartbeating_with(
    registry: &RedisRegistry,
    info: InstanceInfo,
    ttl: Duration,
) -> JoinHandle<()> {
    let registry = registry.clone();
    tokio::spawn(async move {
        loop {
            let _ = registry.heartbeat(&info, ttl).await;
            tokio::time::sleep(ttl / 4).await;
        }
    })
}

#[tokio::test]
async fn registered_instances_are_healthy_and_heartbeats_update_them() {
    let server = RedisServer::start().await;
    let registry = registry(&server, "t");
    let mut a = instance("a", 1);
    registry.register(&a, TTL).await.unwrap();
    registry.register(&instance("b", 2), TTL).await.unwrap();
    assert_eq!(ids(&registry).await, ["a", "b"]);

    a.load.in_flight = 12;
    a.load.utilisation = f64::NAN;
    registry.heartbeat(&a, TTL).await.unwrap();
    let healthy = registry.healthy(SERVICE).await.unwrap();
    assert_eq!(healthy[0].load.in_flight, 12);
    // JSON has no NaN: stored as 0, and still readable.
    assert_eq!(healthy[0].load.utilisation, 0.0);
    assert!(registry.healthy("other").await.unwrap().is_empty());
}

#[tokio::test]
async fn instance_expires_after_its_ttl_and_remove_stale_prunes_the_index() {
    let server = RedisServer::start().await;
    let registry = registry(&server, "t");
    registry
        .register(&instance("short", 1), Duration::from_millis(300))
        .await
        .unwrap();
    registry
        .register(&instance("long", 2), Duration::from_secs(60))
        .await
        .unwrap();
    eventually("`short` to expire", || async {
        ids(&registry).await == ["long"]
    })
    .await;
    assert_eq!(registry.remove_stale(SERVICE).await.unwrap(), 1);
    assert_eq!(registry.remove_stale(SERVICE).await.unwrap(), 0);
    assert_eq!(ids(&registry).await, ["long"]);
}

#[tokio::test]
async fn heartbeats_keep_an_instance_past_its_ttl() {
    let server = RedisServer::start().await;
    let registry = registry(&server, "t");
    let beats = heartbeating(&registry, instance("a", 1));
    let watched = Watched::new(registry.watch(SERVICE));
    watched.wait_for(&["a"]).await;
    // Three TTLs of heartbeats: never gone.
    for _ in 0..12 {
        tokio::time::sleep(TTL / 4).await;
        assert_eq!(ids(&registry).await, ["a"]);
    }
    assert!(watched.left().is_empty(), "{:?}", watched.changes());
    beats.abort();
}

#[tokio::test]
async fn deregister_removes_at_once() {
    let server = RedisServer::start().await;
    let registry = registry(&server, "t");
    registry.register(&instance("a", 1), TTL).await.unwrap();
    registry.register(&instance("b", 2), TTL).await.unwrap();
    registry.deregister(SERVICE, "a").await.unwrap();
    assert_eq!(ids(&registry).await, ["b"]);
    registry.deregister(SERVICE, "unknown").await.unwrap();
}

#[tokio::test]
async fn watch_sees_joins_updates_and_leaves() {
    let server = RedisServer::start().await;
    let registry = registry(&server, "t");
    let early = instance("early", 1);
    registry.register(&early, TTL * 30).await.unwrap();
    let watched = Watched::new(registry.watch(SERVICE));
    watched.wait_for(&["early"]).await;

    let mut a = instance("a", 2);
    registry.register(&a, TTL * 30).await.unwrap();
    watched.wait_for(&["a", "early"]).await;
    a.load.queue_depth = 4;
    registry.heartbeat(&a, TTL * 30).await.unwrap();
    eventually("the update of `a`", || async {
        watched.set()["a"].load.queue_depth == 4
    })
    .await;
    registry.deregister(SERVICE, "a").await.unwrap();
    watched.wait_for(&["early"]).await;

    // One that stops heartbeating leaves after its TTL.
    registry
        .register(&instance("brief", 3), Duration::from_millis(500))
        .await
        .unwrap();
    watched.wait_for(&["brief", "early"]).await;
    watched.wait_for(&["early"]).await;

    let changes = watched.changes();
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Membership::Joined(_)))
            .count(),
        3,
        "{changes:?}"
    );
    assert_eq!(watched.left(), ["a", "brief"]);
    assert!(changes.contains(&Membership::Updated(a)));
}

#[tokio::test]
async fn two_clients_in_separate_tasks_agree() {
    let server = RedisServer::start().await;
    let (one, two) = (registry(&server, "t"), registry(&server, "t"));
    let mut beats = Vec::new();
    for (n, id) in ["a", "b", "c"].into_iter().enumerate() {
        beats.push(heartbeating(&one, instance(id, n as u16 + 1)));
    }
    beats.push(heartbeating(&two, instance("d", 4)));
    let from_one = Watched::new(one.watch(SERVICE));
    let from_two = tokio::spawn({
        let two = two.clone();
        async move {
            let watched = Watched::new(two.watch(SERVICE));
            watched.wait_for(&["a", "b", "c", "d"]).await;
            watched
        }
    });
    from_one.wait_for(&["a", "b", "c", "d"]).await;
    let from_two = from_two.await.unwrap();
    assert_eq!(ids(&one).await, ids(&two).await);

    two.deregister(SERVICE, "b").await.unwrap();
    beats[1].abort();
    from_one.wait_for(&["a", "c", "d"]).await;
    from_two.wait_for(&["a", "c", "d"]).await;
    assert_eq!(ids(&one).await, ["a", "c", "d"]);
    for beat in beats {
        beat.abort();
    }
}

#[tokio::test]
async fn killed_instance_disappears_after_its_ttl() {
    let server = RedisServer::start().await;
    let registry = registry(&server, "t");
    let alive = heartbeating(&registry, instance("alive", 1));
    let doomed = heartbeating(&registry, instance("killed", 2));
    let watched = Watched::new(registry.watch(SERVICE));
    watched.wait_for(&["alive", "killed"]).await;

    // Killed: no deregistration, its heartbeats just stop.
    doomed.abort();
    watched.wait_for(&["alive"]).await;
    assert_eq!(ids(&registry).await, ["alive"]);
    assert_eq!(watched.left(), ["killed"]);
    assert_eq!(registry.remove_stale(SERVICE).await.unwrap(), 1);
    alive.abort();
}

#[tokio::test]
async fn the_last_instance_leaves_only_when_a_second_read_agrees() {
    let server = RedisServer::start().await;
    let registry = registry(&server, "t");
    let watched = Watched::new(registry.watch(SERVICE));
    let beats = heartbeating(&registry, instance("only", 1));
    watched.wait_for(&["only"]).await;
    beats.abort();
    // Emptied, and confirmed by a second read: it leaves, once.
    watched.wait_for(&[]).await;
    assert_eq!(watched.left(), ["only"]);
}

#[tokio::test]
async fn redis_restarted_empty_keeps_the_last_known_set_and_resyncs() {
    crate::support::trace();
    let ttl = Duration::from_secs(3);
    let mut server = RedisServer::start().await;
    let instances = registry(&server, "t");
    let client = registry(&server, "t");
    let (a, b) = (instance("a", 1), instance("b", 2));
    let beats = [
        heartbeating_with(&instances, a.clone(), ttl),
        heartbeating_with(&instances, b.clone(), ttl),
    ];
    let watched = Watched::new(client.watch(SERVICE));
    watched.wait_for(&["a", "b"]).await;

    server.stop();
    // From here the test heartbeats by hand, to order the comebacks.
    for beat in beats {
        beat.abort();
    }
    let err = client.healthy(SERVICE).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err}");
    // Down for longer than the TTL: every key would have expired.
    tokio::time::sleep(ttl + ttl / 2).await;
    assert_eq!(watched.ids(), ["a", "b"]);

    server.restart().await;
    eventually(
        "a heartbeat of `a` to reach the restarted Redis",
        || async { instances.heartbeat(&a, ttl).await.is_ok() },
    )
    .await;
    // The watch resubscribes and reads a Redis that holds `a` alone, for a
    // few resyncs: `b` gets a full TTL to come back, counted from there.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(watched.ids(), ["a", "b"]);
    let beats = [
        heartbeating_with(&instances, a, ttl),
        heartbeating_with(&instances, b, ttl),
    ];
    // The heartbeats repopulate the empty Redis: keys and index.
    eventually("the heartbeats to repopulate Redis", || async {
        client.healthy(SERVICE).await.ok().map(|h| h.len()) == Some(2)
    })
    .await;
    // The watch is subscribed again: it sees a newcomer.
    instances
        .register(&instance("c", 3), ttl * 30)
        .await
        .unwrap();
    watched.wait_for(&["a", "b", "c"]).await;
    // And nobody ever left.
    assert!(watched.left().is_empty(), "{:?}", watched.changes());
    for beat in beats {
        beat.abort();
    }
}

#[tokio::test]
async fn namespaces_and_services_do_not_see_each_other() {
    let server = RedisServer::start().await;
    let (one, two) = (registry(&server, "one"), registry(&server, "two"));
    let watched_one = Watched::new(one.watch(SERVICE));
    let watched_two = Watched::new(two.watch(SERVICE));
    one.register(&instance("in-one", 1), TTL * 30)
        .await
        .unwrap();
    two.register(&instance("in-two", 2), TTL * 30)
        .await
        .unwrap();
    let other = InstanceInfo::new("db", "a-db", SocketAddr::from(([127, 0, 0, 1], 3)));
    one.register(&other, TTL * 30).await.unwrap();
    // A namespace that is a prefix of the other's keys.
    let tricky = registry(&server, "one:api");
    tricky
        .register(&instance("tricky", 4), TTL * 30)
        .await
        .unwrap();

    watched_one.wait_for(&["in-one"]).await;
    watched_two.wait_for(&["in-two"]).await;
    assert_eq!(ids(&one).await, ["in-one"]);
    assert_eq!(ids(&two).await, ["in-two"]);
    assert_eq!(ids(&tricky).await, ["tricky"]);
    assert_eq!(one.healthy("db").await.unwrap(), vec![other]);
    assert!(two.healthy("db").await.unwrap().is_empty());
    // After a few resyncs, still only their own.
    let watched_db = Watched::new(one.watch("db"));
    watched_db.wait_for(&["a-db"]).await;
    assert_eq!(watched_one.ids(), ["in-one"]);
    assert_eq!(watched_two.ids(), ["in-two"]);
}

#[tokio::test]
async fn auth_in_the_url_is_used() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]).await;
    let url = server.url().replace("redis://", "redis://:s3cret@");
    let registry = RedisRegistry::builder(url).build().unwrap();
    registry.register(&instance("a", 1), TTL).await.unwrap();
    assert_eq!(ids(&registry).await, ["a"]);

    let anonymous = RedisRegistry::builder(server.url()).build().unwrap();
    assert!(anonymous.healthy(SERVICE).await.is_err());
    // The Debug output does not show the password.
    assert!(!format!("{registry:?}").contains("s3cret"));
}

fn value(prometheus: &PrometheusHandle, series: &str) -> f64 {
    prometheus
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn errors_and_instances_are_measured() {
    // Current-thread runtime: a recorder local to this thread sees it all.
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let mut server = RedisServer::start().await;
    let registry = registry(&server, "t");
    registry.register(&instance("a", 1), TTL).await.unwrap();
    registry.register(&instance("b", 2), TTL).await.unwrap();
    assert_eq!(ids(&registry).await.len(), 2);
    assert_eq!(
        value(&prometheus, r#"tower_scale_registry_instances{name="api"}"#),
        2.0
    );
    server.stop();
    assert!(registry.register(&instance("c", 3), TTL).await.is_err());
    assert!(registry.healthy(SERVICE).await.is_err());
    assert!(
        value(
            &prometheus,
            r#"tower_scale_registry_errors_total{name="api"}"#
        ) >= 2.0
    );
}
