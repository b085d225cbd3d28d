//! `discover::Dns` against a real DNS server (dnsmasq, started by each test on
//! a free loopback port), in real time: the tests assert what the source
//! emits and in which order, and wait for it within generous bounds.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tower::balance::p2c::Balance;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::{Service, ServiceExt};
use tower_scale::discover::dns::DnsBuilder;
use tower_scale::discover::{Endpoint, Weight};

use self::support::{address_of, Dnsmasq, Seen, Source, Srv, Tracker, BOUND};

const HOST: &str = "api.test";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A source asking only `server`, resolving at least every 200 ms (dnsmasq
/// answers with a TTL of 1 s, so this also proves the bound).
fn builder(host: &str, server: &Dnsmasq) -> DnsBuilder {
    DnsBuilder::new(host)
        .name_server(server.addr())
        .min_interval(Duration::from_millis(50))
        .max_interval(Duration::from_millis(200))
        .timeout(Duration::from_millis(500))
}

/// Builds under a recorder of the test's own: the source registers its
/// metric handles when built and keeps them.
fn with_metrics(builder: DnsBuilder) -> (Source, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let make: fn(&Endpoint) -> SocketAddr = address_of;
    let dns = metrics::with_local_recorder(&recorder, || builder.build(make).unwrap());
    (dns, handle)
}

fn value(prometheus: &PrometheusHandle, series: &str) -> f64 {
    prometheus
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const ERRORS: &str = r#"tower_scale_discovery_errors_total{name="api"}"#;
const ENDPOINTS: &str = r#"tower_scale_discovery_endpoints{name="api"}"#;

#[tokio::test]
async fn records_added_and_removed_are_followed() {
    let server = Dnsmasq::start(&[("127.0.0.2", HOST), ("127.0.0.3", HOST)], &[]).await;
    let dns = builder(HOST, &server)
        .port(8080)
        .build(address_of as fn(&Endpoint) -> SocketAddr);
    let mut source = Tracker::new(dns.unwrap());

    assert_eq!(
        source.changes(2, &server).await,
        [
            Seen::Insert(addr("127.0.0.2:8080"), 100),
            Seen::Insert(addr("127.0.0.3:8080"), 100),
        ]
    );

    // One record replaced by another: the newcomer first, then the removal.
    server
        .set_hosts(&[("127.0.0.3", HOST), ("127.0.0.4", HOST)])
        .await;
    assert_eq!(
        source.changes(2, &server).await,
        [
            Seen::Insert(addr("127.0.0.4:8080"), 100),
            Seen::Remove(addr("127.0.0.2:8080")),
        ]
    );

    // A record added, then one removed.
    server
        .set_hosts(&[
            ("127.0.0.3", HOST),
            ("127.0.0.4", HOST),
            ("127.0.0.5", HOST),
        ])
        .await;
    assert_eq!(
        source.changes(1, &server).await,
        [Seen::Insert(addr("127.0.0.5:8080"), 100)]
    );
    server
        .set_hosts(&[("127.0.0.4", HOST), ("127.0.0.5", HOST)])
        .await;
    assert_eq!(
        source.changes(1, &server).await,
        [Seen::Remove(addr("127.0.0.3:8080"))]
    );

    // Unchanged answers emit nothing: three more resolutions, no change.
    let asked = server.queries(HOST);
    let quiet = source
        .until("three more resolutions", &server, |_| {
            server.queries(HOST) >= asked + 6 // an A and an AAAA query each
        })
        .await;
    assert_eq!(quiet, []);
    assert_eq!(
        source.addrs(),
        [addr("127.0.0.4:8080"), addr("127.0.0.5:8080")]
    );
}

#[tokio::test]
async fn a_and_aaaa_records_by_default_or_one_family_when_asked() {
    let server = Dnsmasq::start(&[("127.0.0.2", HOST), ("fd00::2", HOST)], &[]).await;
    let make = address_of as fn(&Endpoint) -> SocketAddr;
    let (v4, v6) = (addr("127.0.0.2:80"), addr("[fd00::2]:80"));

    let mut both = Tracker::new(builder(HOST, &server).port(80).build(make).unwrap());
    let mut only_v4 = Tracker::new(
        builder(HOST, &server)
            .port(80)
            .ipv4_only()
            .build(make)
            .unwrap(),
    );
    let mut only_v6 = Tracker::new(
        builder(HOST, &server)
            .port(80)
            .ipv6_only()
            .build(make)
            .unwrap(),
    );
    assert_eq!(
        both.changes(2, &server).await,
        [Seen::Insert(v4, 100), Seen::Insert(v6, 100)]
    );
    assert_eq!(only_v4.changes(1, &server).await, [Seen::Insert(v4, 100)]);
    assert_eq!(only_v6.changes(1, &server).await, [Seen::Insert(v6, 100)]);

    // The A record goes: each source follows, the IPv6-only one has nothing
    // to change, the IPv4-only one keeps its last endpoint (an empty answer).
    server.set_hosts(&[("fd00::2", HOST)]).await;
    assert_eq!(both.changes(1, &server).await, [Seen::Remove(v4)]);
    let asked = server.queries(HOST);
    let meanwhile = only_v4
        .until("more resolutions", &server, |_| {
            server.queries(HOST) >= asked + 3
        })
        .await;
    assert_eq!(meanwhile, []);
    assert_eq!(only_v4.addrs(), [v4]);
    assert_eq!(only_v6.addrs(), [v6]);
}

#[tokio::test]
async fn srv_records_give_ports_and_weights() {
    const SERVICE: &str = "_http._tcp.svc.test";
    let srv = |target, port, priority, weight| Srv {
        service: SERVICE,
        target,
        port,
        priority,
        weight,
    };
    let hosts = [("127.0.0.2", "a.svc.test"), ("127.0.0.3", "b.svc.test")];
    let mut server = Dnsmasq::start(
        &hosts,
        &[
            srv("a.svc.test", 8081, 0, 10),
            srv("b.svc.test", 8082, 0, 30),
            // A backup of a higher priority number: not used while the
            // others are there.
            srv("b.svc.test", 9999, 1, 10),
        ],
    )
    .await;
    let dns = builder(SERVICE, &server)
        .srv()
        .build(address_of as fn(&Endpoint) -> SocketAddr);
    let mut source = Tracker::new(dns.unwrap());

    assert_eq!(
        source.changes(2, &server).await,
        [
            Seen::Insert(addr("127.0.0.2:8081"), 10),
            Seen::Insert(addr("127.0.0.3:8082"), 30),
        ]
    );

    // New records (dnsmasq reloads SRV records only on a restart): a's port
    // moves, b's weight changes.
    server
        .restart(&[
            srv("a.svc.test", 8083, 0, 10),
            srv("b.svc.test", 8082, 0, 50),
        ])
        .await;
    assert_eq!(
        source.changes(2, &server).await,
        [
            Seen::Insert(addr("127.0.0.2:8083"), 10),
            Seen::Remove(addr("127.0.0.2:8081")),
        ]
    );
    // b's service stayed (never removed, never inserted again) and sees its
    // new weight.
    let b = addr("127.0.0.3:8082");
    let meanwhile = source
        .until("b's weight to change", &server, |source| {
            source.held[&b].weight() == 50
        })
        .await;
    assert_eq!(meanwhile, []);
    assert_eq!(source.addrs(), [addr("127.0.0.2:8083"), b]);
}

#[tokio::test]
async fn a_server_that_stops_answering_keeps_the_last_set_then_updates_resume() {
    let mut server = Dnsmasq::start(&[("127.0.0.2", HOST), ("127.0.0.3", HOST)], &[]).await;
    let (dns, prometheus) = with_metrics(builder(HOST, &server).port(80).name("api"));
    let mut source = Tracker::new(dns);
    assert_eq!(source.changes(2, &server).await.len(), 2);
    assert_eq!(value(&prometheus, ERRORS), 0.0);
    assert_eq!(value(&prometheus, ENDPOINTS), 2.0);

    // The server goes away: resolutions fail, the set stays.
    server.stop();
    let meanwhile = source
        .until("three failed resolutions", &server, |_| {
            value(&prometheus, ERRORS) >= 3.0
        })
        .await;
    assert_eq!(meanwhile, []);
    assert_eq!(source.addrs(), [addr("127.0.0.2:80"), addr("127.0.0.3:80")]);
    assert_eq!(value(&prometheus, ENDPOINTS), 2.0);

    // It comes back with other records: updates resume.
    server.write_hosts(&[("127.0.0.3", HOST), ("127.0.0.4", HOST)]);
    server.restart(&[]).await;
    assert_eq!(
        source.changes(2, &server).await,
        [
            Seen::Insert(addr("127.0.0.4:80"), 100),
            Seen::Remove(addr("127.0.0.2:80")),
        ]
    );
    assert_eq!(value(&prometheus, ENDPOINTS), 2.0);
}

#[tokio::test]
async fn a_name_that_disappears_keeps_the_last_set() {
    let server = Dnsmasq::start(&[("127.0.0.2", HOST)], &[]).await;
    let (dns, prometheus) = with_metrics(builder(HOST, &server).port(80).name("api"));
    let mut source = Tracker::new(dns);
    assert_eq!(
        source.changes(1, &server).await,
        [Seen::Insert(addr("127.0.0.2:80"), 100)]
    );

    // The record is deleted: dnsmasq answers NXDOMAIN. The last endpoint
    // stays and every such answer counts as an error.
    server.set_hosts(&[("127.0.0.9", "other.test")]).await;
    let meanwhile = source
        .until("two empty answers", &server, |_| {
            value(&prometheus, ERRORS) >= 2.0
        })
        .await;
    assert_eq!(meanwhile, []);
    assert_eq!(source.addrs(), [addr("127.0.0.2:80")]);
    assert!(
        server.log().contains(&format!("{HOST} is NXDOMAIN")),
        "{}",
        server.log()
    );

    // It comes back elsewhere.
    server.set_hosts(&[("127.0.0.3", HOST)]).await;
    assert_eq!(
        source.changes(2, &server).await,
        [
            Seen::Insert(addr("127.0.0.3:80"), 100),
            Seen::Remove(addr("127.0.0.2:80")),
        ]
    );
}

/// A backend on `ip:port` that answers with its own address.
async fn backend(ip: &str, port: u16) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind((ip, port)).await?;
    let me = listener.local_addr()?.to_string();
    let app = Router::new().route("/", get(move || async move { me }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Ok(())
}

/// Starts backends on 127.0.0.2 and 127.0.0.3 on one port (A records give
/// addresses, the port is the source's); returns the port.
async fn backends() -> u16 {
    for _ in 0..20 {
        let probe = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        if backend("127.0.0.2", port).await.is_ok() && backend("127.0.0.3", port).await.is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

#[tokio::test]
async fn a_balancer_fed_by_dns_follows_the_records() {
    let port = backends().await;
    let server = Dnsmasq::start(&[("127.0.0.2", HOST)], &[]).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let make = move |endpoint: &Endpoint| {
        let client = client.clone();
        let uri: hyper::Uri = format!("http://{}/", endpoint.addr()).parse().unwrap();
        let svc = tower::service_fn(move |()| {
            let (client, uri) = (client.clone(), uri.clone());
            async move {
                let response = client.get(uri).await?;
                let body = response.into_body().collect().await?.to_bytes();
                Ok::<_, tower::BoxError>(String::from_utf8(body.to_vec())?)
            }
        });
        PendingRequests::new(svc, CompleteOnResponse::default())
    };
    let dns = builder(HOST, &server).port(port).build(make).unwrap();
    let mut balance = Balance::new(dns);
    let mut ask = async || -> String {
        tokio::time::timeout(BOUND, async {
            balance.ready().await.unwrap().call(()).await.unwrap()
        })
        .await
        .expect("an answer in time")
    };

    let first = format!("127.0.0.2:{port}");
    for _ in 0..10 {
        assert_eq!(ask().await, first);
    }

    // The record moves to the other backend: requests follow.
    server.set_hosts(&[("127.0.0.3", HOST)]).await;
    let second = format!("127.0.0.3:{port}");
    let deadline = tokio::time::Instant::now() + BOUND;
    while ask().await == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never moved"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The insert and the removal came in one update: nothing goes to the
    // old backend any more.
    for _ in 0..20 {
        assert_eq!(ask().await, second);
    }
}
