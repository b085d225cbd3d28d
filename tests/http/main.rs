//! The admission stack over real HTTP: an axum server on 127.0.0.1 and real
//! hyper clients, one TCP connection per HTTP/1 request, in real time.
//!
//! Handlers block on a [`Gate`] the test controls, so every figure the tests
//! check (handlers running, requests queued, 503s) is a count reached by
//! waiting for it, never a duration.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, StatusCode, Uri};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::channel::mpsc as body_channel;
use tokio::sync::mpsc;
use tower::ServiceBuilder;
use tower_scale::http::ErrorResponseLayer;
use tower_scale::limit::{ConcurrencyLimitLayer, LimitHandle};
use tower_scale::queue::{QueueHandle, QueueLayer};
use tower_scale::shed::LoadShedLayer;

use support::{answers, bounded, count, wait_until, Client, Gate, Proto, Reply, Server};

/// Long enough that no queued request times out while a test looks at it.
const NO_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /a` and `GET /b`: handlers that wait at the gate, labelled with their
/// query string.
///
/// The handlers capture the gate instead of using axum state on purpose:
/// `Router::layer` applies a layer once per route, and `axum::serve` turns the
/// handlers of a router whose state was never applied into routes once per
/// connection, applying the route layers again each time. Those are the traps
/// a layer with state made in its constructor avoids.
fn blocking_routes(gate: &Gate) -> Router {
    let handler = |gate: Gate| {
        move |uri: Uri| async move {
            gate.pass(uri.query().unwrap_or_default().to_owned()).await;
            "done"
        }
    };
    Router::new()
        .route("/a", get(handler(gate.clone())))
        .route("/b", get(handler(gate.clone())))
}

/// Handles on the limit and the queue of an admission stack.
struct Admission {
    limit: LimitHandle,
    queue: QueueHandle,
}

/// `routes` behind the canonical stack, all named "api": ErrorResponse →
/// LoadShed → Queue(`capacity`, `timeout`) → ConcurrencyLimit(`limit`).
fn admission(
    routes: Router,
    limit: usize,
    capacity: usize,
    timeout: Duration,
) -> (Router, Admission) {
    let limit = ConcurrencyLimitLayer::new(limit).name("api");
    let queue = QueueLayer::new(capacity, timeout).name("api");
    let handles = Admission {
        limit: limit.handle(),
        queue: queue.handle(),
    };
    let app = routes.layer(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(LoadShedLayer::new().name("api"))
            .layer(queue)
            .layer(limit),
    );
    (app, handles)
}

fn assert_refused(reply: &Reply, reason: &str) {
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.rejected(), Some(reason), "{reply:?}");
    assert_eq!(reply.header(header::RETRY_AFTER), Some("1"), "{reply:?}");
}

fn assert_all_ok(replies: &[Reply]) {
    for reply in replies {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.text(), "done");
    }
}

// ---------------------------------------------------------------------------
// One limit shared across routes and connections
// ---------------------------------------------------------------------------

const SHARED_LIMIT: usize = 4;
const CONNECTIONS: usize = 32;

/// Sends `CONNECTIONS` requests, half to `/a` and half to `/b`, each on its
/// own TCP connection, to handlers that block. Once every request has reached
/// the layers and `admitted` handlers run, lets them all go; returns the most
/// handlers that ever ran at once. Every request must get a 200.
async fn blocked_burst(
    app: Router,
    gate: &Gate,
    admitted: usize,
    settled: impl Fn() -> bool,
) -> usize {
    let server = Server::start(app).await;
    let client = Client::new(server.addr(), Proto::Http1).await;
    let requests: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let route = if i % 2 == 0 { "a" } else { "b" };
            client.spawn_get(format!("/{route}?{i}"))
        })
        .collect();

    wait_until("every request reached the layers", || {
        gate.arrived() == CONNECTIONS
    })
    .await;
    wait_until(&format!("{admitted} handlers run"), || {
        gate.running() == admitted
    })
    .await;
    wait_until("the rest wait", &settled).await;
    // A leaky limit would let more handlers start: give them a moment to.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let max = gate.max();

    gate.open();
    assert_all_ok(&answers(requests).await);
    assert_eq!(gate.started(), CONNECTIONS);
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_limit_is_shared_by_two_routes_across_connections() {
    let gate = Gate::new();
    let limit = ConcurrencyLimitLayer::new(SHARED_LIMIT);
    let handle = limit.handle();
    let app = blocking_routes(&gate).layer(
        ServiceBuilder::new()
            .layer(gate.count_arrivals())
            .layer(limit),
    );

    let max = blocked_burst(app, &gate, SHARED_LIMIT, || {
        handle.in_flight() == SHARED_LIMIT && handle.waiting() == CONNECTIONS - SHARED_LIMIT
    })
    .await;

    assert_eq!(
        max, SHARED_LIMIT,
        "at most {SHARED_LIMIT} handlers at once, and the limit is reached"
    );
    assert_eq!(
        gate.max(),
        SHARED_LIMIT,
        "the limit also held while the waiters were let through"
    );
    wait_until("in_flight is back to 0", || handle.in_flight() == 0).await;
    assert_eq!(handle.waiting(), 0);
}

/// The trap: tower's `ConcurrencyLimitLayer` makes its semaphore in
/// `Layer::layer`, which axum calls per route and, here, per connection, so
/// with one request per connection nothing is limited. This also shows that
/// the test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_concurrency_limit_is_per_connection_under_axum() {
    let gate = Gate::new();
    let limit = tower::limit::ConcurrencyLimitLayer::new(SHARED_LIMIT);
    let app = blocking_routes(&gate).layer(
        ServiceBuilder::new()
            .layer(gate.count_arrivals())
            .layer(limit),
    );

    let max = blocked_burst(app, &gate, CONNECTIONS, || true).await;

    assert_eq!(max, CONNECTIONS, "every connection had a limit of its own");
}

/// Without the per-connection re-layering (`Router::with_state` before
/// serving turns the handlers into routes once), tower's layer still makes one
/// semaphore per route: `Router::layer` calls `Layer::layer` for each route, so
/// two routes get twice the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_concurrency_limit_is_per_route_when_state_is_applied_before_serving() {
    let gate = Gate::new();
    let limit = tower::limit::ConcurrencyLimitLayer::new(SHARED_LIMIT);
    let app = blocking_routes(&gate)
        .layer(
            ServiceBuilder::new()
                .layer(gate.count_arrivals())
                .layer(limit),
        )
        .with_state(());

    let max = blocked_burst(app, &gate, 2 * SHARED_LIMIT, || true).await;

    assert_eq!(
        max,
        2 * SHARED_LIMIT,
        "each of the two routes had a limit of its own"
    );
}

/// tower's `GlobalConcurrencyLimitLayer` creates its semaphore up front and is
/// shared like ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_global_concurrency_limit_is_shared() {
    let gate = Gate::new();
    let limit = tower::limit::GlobalConcurrencyLimitLayer::new(SHARED_LIMIT);
    let app = blocking_routes(&gate).layer(
        ServiceBuilder::new()
            .layer(gate.count_arrivals())
            .layer(limit),
    );

    let max = blocked_burst(app, &gate, SHARED_LIMIT, || true).await;

    assert_eq!(max, SHARED_LIMIT);
}

// ---------------------------------------------------------------------------
// Queue full and queue timeout answered as 503
// ---------------------------------------------------------------------------

/// With `L` handlers blocked and `Q` requests queued, `EXTRA` more requests
/// each get an immediate 503 `queue_full`; once the handlers are let go the
/// queued requests start in arrival order and everyone else gets a 200.
async fn queue_full_is_answered_at_once(proto: Proto) {
    const L: usize = 2;
    const Q: usize = 3;
    const EXTRA: usize = 5;

    let gate = Gate::new();
    let (app, api) = admission(blocking_routes(&gate), L, Q, NO_TIMEOUT);
    let server = Server::start(app).await;
    let client = Client::new(server.addr(), proto).await;

    // One at a time, so the arrival order is known.
    let mut admitted = Vec::new();
    for i in 0..L {
        admitted.push(client.spawn_get(format!("/a?{i}")));
        wait_until(&format!("{} running", i + 1), || gate.running() == i + 1).await;
    }
    assert_eq!(api.limit.in_flight(), L);
    for i in L..L + Q {
        admitted.push(client.spawn_get(format!("/b?{i}")));
        wait_until(&format!("{} queued", i - L + 1), || {
            api.queue.depth() == i - L + 1
        })
        .await;
    }

    let extras = (0..EXTRA)
        .map(|i| client.spawn_get(format!("/a?extra{i}")))
        .collect();
    let extras = answers(extras).await;
    for reply in &extras {
        assert_refused(reply, "queue_full");
        assert!(reply.body.is_empty());
    }
    assert_eq!(
        count(&extras, StatusCode::SERVICE_UNAVAILABLE, Some("queue_full")),
        EXTRA
    );
    // The extras were answered while everything else still waited.
    assert_eq!(
        (api.limit.in_flight(), api.queue.depth(), gate.started()),
        (L, Q, L)
    );

    // Let one handler finish at a time: each time, the oldest queued request
    // takes its place.
    for started in L + 1..=L + Q {
        gate.release(1);
        wait_until(&format!("{started} handlers started"), || {
            gate.started() == started
        })
        .await;
    }
    gate.open();
    assert_all_ok(&answers(admitted).await);

    let expected: Vec<String> = (0..L + Q).map(|i| i.to_string()).collect();
    assert_eq!(gate.order(), expected, "queued requests start oldest first");
    wait_until("in_flight is back to 0", || api.limit.in_flight() == 0).await;
    assert_eq!(api.queue.depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_gets_503_with_retry_after_over_http1() {
    queue_full_is_answered_at_once(Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_gets_503_with_retry_after_over_http2() {
    queue_full_is_answered_at_once(Proto::Http2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_request_times_out_with_503_and_never_reaches_the_handler() {
    let gate = Gate::new();
    let (app, api) = admission(blocking_routes(&gate), 1, 4, Duration::from_millis(300));
    let server = Server::start(app).await;
    let client = Client::new(server.addr(), Proto::Http1).await;

    let blocker = client.spawn_get("/a?blocker");
    wait_until("the only permit is taken", || gate.running() == 1).await;

    let queued = answers(vec![
        client.spawn_get("/a?late1"),
        client.spawn_get("/b?late2"),
    ])
    .await;
    for reply in &queued {
        assert_refused(reply, "queue_timeout");
    }
    assert_eq!(
        gate.started(),
        1,
        "a timed-out request never reaches the handler"
    );
    assert_eq!((api.limit.in_flight(), api.queue.depth()), (1, 0));

    gate.open();
    assert_all_ok(&answers(vec![blocker]).await);
    // The limit and the queue still work after the timeouts.
    assert_all_ok(&answers(vec![client.spawn_get("/b?after")]).await);
    assert_eq!(gate.order(), ["blocker", "after"]);
    wait_until("in_flight is back to 0", || api.limit.in_flight() == 0).await;
}

// ---------------------------------------------------------------------------
// Streaming bodies and `release_on_body_end`
// ---------------------------------------------------------------------------

type BodySender = body_channel::UnboundedSender<Result<Bytes, Infallible>>;

/// `GET /stream` answers at once with a body that streams whatever the test
/// sends down the channel it receives; `GET /hello` answers "done".
fn streaming_routes() -> (Router, mpsc::UnboundedReceiver<BodySender>) {
    let (bodies_tx, bodies) = mpsc::unbounded_channel();
    let routes = Router::new()
        .route(
            "/stream",
            get(move || {
                let (tx, rx) = body_channel::unbounded();
                bodies_tx.send(tx).expect("test is listening");
                async move { Body::from_stream(rx) }
            }),
        )
        .route("/hello", get(|| async { "done" }));
    (routes, bodies)
}

/// The stack with a limit of 1 that releases on body end, and a queue of 4.
fn body_holding_stack(routes: Router) -> (Router, Admission) {
    let limit = ConcurrencyLimitLayer::new(1).release_on_body_end();
    let queue = QueueLayer::new(4, NO_TIMEOUT);
    let handles = Admission {
        limit: limit.handle(),
        queue: queue.handle(),
    };
    let app = routes.layer(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(LoadShedLayer::new())
            .layer(queue)
            .layer(limit),
    );
    (app, handles)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_on_body_end_counts_a_streaming_body_until_it_ends() {
    let (routes, mut bodies) = streaming_routes();
    let (app, api) = body_holding_stack(routes);
    let server = Server::start(app).await;
    let client = Client::new(server.addr(), Proto::Http1).await;

    let mut stream = client.get_streaming("/stream").await;
    assert_eq!(stream.response.status(), StatusCode::OK);
    let tx = bounded("the body sender", bodies.recv()).await.unwrap();
    assert_eq!(
        api.limit.in_flight(),
        1,
        "the head has arrived but the body is still open"
    );

    tx.unbounded_send(Ok(Bytes::from_static(b"one"))).unwrap();
    assert_eq!(stream.next_chunk().await.as_deref(), Some(&b"one"[..]));
    assert_eq!(api.limit.in_flight(), 1);

    // The body holds the only permit, so the next request has to queue.
    let hello = client.spawn_get("/hello");
    wait_until("the next request is queued", || api.queue.depth() == 1).await;
    assert!(!hello.is_finished());

    tx.unbounded_send(Ok(Bytes::from_static(b"two"))).unwrap();
    drop(tx);
    assert_eq!(stream.next_chunk().await.as_deref(), Some(&b"two"[..]));
    assert_eq!(stream.next_chunk().await, None);

    let hello = answers(vec![hello]).await;
    assert_all_ok(&hello);
    wait_until("in_flight is back to 0", || api.limit.in_flight() == 0).await;
    assert_eq!(api.queue.depth(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_release_on_body_end_the_permit_goes_back_with_the_head() {
    let (routes, mut bodies) = streaming_routes();
    let limit = ConcurrencyLimitLayer::new(1);
    let handle = limit.handle();
    let app = routes.layer(
        ServiceBuilder::new()
            .layer(ErrorResponseLayer::new())
            .layer(LoadShedLayer::new())
            .layer(QueueLayer::new(4, NO_TIMEOUT))
            .layer(limit),
    );
    let server = Server::start(app).await;
    let client = Client::new(server.addr(), Proto::Http1).await;

    let mut stream = client.get_streaming("/stream").await;
    let tx = bounded("the body sender", bodies.recv()).await.unwrap();
    assert_eq!(
        handle.in_flight(),
        0,
        "the permit was released before the head was sent"
    );

    // So another request runs while the body is still streaming.
    assert_all_ok(&answers(vec![client.spawn_get("/hello")]).await);

    tx.unbounded_send(Ok(Bytes::from_static(b"one"))).unwrap();
    drop(tx);
    assert_eq!(stream.next_chunk().await.as_deref(), Some(&b"one"[..]));
    assert_eq!(stream.next_chunk().await, None);
    assert_eq!(handle.in_flight(), 0);
}

/// The client goes away with the body half sent: over HTTP/1 it closes the
/// connection, over HTTP/2 dropping the response resets the stream. The server
/// finds out and drops the body, and with it the permit, without another byte
/// being sent.
async fn client_leaving_mid_body_releases_the_permit(proto: Proto) {
    let (routes, mut bodies) = streaming_routes();
    let (app, api) = body_holding_stack(routes);
    let server = Server::start(app).await;
    let client = Client::new(server.addr(), proto).await;

    let mut stream = client.get_streaming("/stream").await;
    let tx = bounded("the body sender", bodies.recv()).await.unwrap();
    tx.unbounded_send(Ok(Bytes::from_static(b"one"))).unwrap();
    assert_eq!(stream.next_chunk().await.as_deref(), Some(&b"one"[..]));
    assert_eq!(api.limit.in_flight(), 1);

    drop(stream);
    wait_until("in_flight is back to 0", || api.limit.in_flight() == 0).await;
    assert!(tx.is_closed(), "the server dropped the body");

    // The freed permit serves the next request.
    assert_all_ok(&answers(vec![client.spawn_get("/hello")]).await);
    assert_eq!(api.limit.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closing_the_connection_mid_body_releases_the_permit() {
    client_leaving_mid_body_releases_the_permit(Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_resetting_the_h2_stream_mid_body_releases_the_permit() {
    client_leaving_mid_body_releases_the_permit(Proto::Http2).await;
}

// ---------------------------------------------------------------------------
// /metrics and /health outside the admission stack
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_answer_while_the_api_is_saturated() {
    const L: usize = 2;
    const Q: usize = 2;
    const EXTRA: usize = 3;

    // A recorder of the test's own, used only while the router is built: the
    // layers register their metric handles when they first make a service and
    // keep them, so no global recorder is needed (and other tests in this
    // binary are not disturbed).
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let gate = Gate::new();
    let (api_routes, api) = metrics::with_local_recorder(&recorder, || {
        admission(blocking_routes(&gate), L, Q, NO_TIMEOUT)
    });

    let probes = Router::new()
        .route("/metrics", get(move || async move { prometheus.render() }))
        .route(
            "/health",
            get({
                let (limit, queue) = (api.limit.clone(), api.queue.clone());
                move || async move {
                    let body = format!(
                        r#"{{"status":"ok","in_flight":{},"limit":{},"queue_depth":{}}}"#,
                        limit.in_flight(),
                        limit.limit(),
                        queue.depth()
                    );
                    ([(header::CONTENT_TYPE, "application/json")], body)
                }
            }),
        );
    let server = Server::start(api_routes.merge(probes)).await;
    let client = Client::new(server.addr(), Proto::Http1).await;

    // Saturate: L running, Q queued, EXTRA refused.
    let mut admitted: Vec<_> = (0..L + Q)
        .map(|i| client.spawn_get(format!("/a?{i}")))
        .collect();
    wait_until("the limit and the queue are full", || {
        api.limit.in_flight() == L && api.queue.depth() == Q
    })
    .await;
    let extras = answers((0..EXTRA).map(|_| client.spawn_get("/b")).collect()).await;
    assert_eq!(
        count(&extras, StatusCode::SERVICE_UNAVAILABLE, Some("queue_full")),
        EXTRA
    );

    let health = client.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(
        health.header(header::CONTENT_TYPE),
        Some("application/json")
    );
    assert_eq!(
        health.text(),
        r#"{"status":"ok","in_flight":2,"limit":2,"queue_depth":2}"#
    );

    let scrape = client.get("/metrics").await;
    assert_eq!(scrape.status, StatusCode::OK);
    let text = scrape.text();
    for line in [
        r#"tower_scale_in_flight{name="api"} 2"#,
        r#"tower_scale_limit{name="api"} 2"#,
        r#"tower_scale_queue_depth{name="api"} 2"#,
        r#"tower_scale_rejected_total{name="api",reason="queue_full"} 3"#,
        r#"tower_scale_rejected_total{name="api",reason="queue_timeout"} 0"#,
        r#"tower_scale_rejected_total{name="api",reason="overloaded"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no `{line}` in /metrics:\n{text}"
        );
    }

    gate.open();
    admitted.push(client.spawn_get("/b?after"));
    assert_all_ok(&answers(admitted).await);
    wait_until("in_flight is back to 0", || api.limit.in_flight() == 0).await;

    let text = client.get("/metrics").await.text().to_owned();
    for line in [
        r#"tower_scale_in_flight{name="api"} 0"#,
        r#"tower_scale_queue_depth{name="api"} 0"#,
        r#"tower_scale_rejected_total{name="api",reason="queue_full"} 3"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no `{line}` in /metrics:\n{text}"
        );
    }
    assert!(text.contains("tower_scale_queue_wait_seconds"), "{text}");
}
