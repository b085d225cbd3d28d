//! The drain under a real tonic server on 127.0.0.1, with real gRPC clients,
//! in real time.
//!
//! The slow RPC needs no protoc: [`SlowHealth`] implements the generated
//! `tonic_health` `Health` trait, holds every call at a [`Gate`] the test
//! controls, then answers `SERVING`. It is served under its own name,
//! `test.Slow` ([`SlowServer`] rewrites `/test.Slow/Check` to the generated
//! path), next to the real `tonic-health` service, which the drain turns to
//! `NOT_SERVING` through [`Drain::report_to_tonic_health`].
//!
//! Where the drain layer sits: tonic's `Server::layer` wraps the whole router,
//! probes included, and `add_service` wants `Error = Infallible`, so the drain
//! cannot go around one service alone until the `grpc` mapping exists. A
//! health check refused with `Draining` would also read as "unhealthy" to a
//! gRPC load balancer, but a probe should say so itself (and should not count
//! in the drain's report), so [`ExemptHealth`] sends
//! `/grpc.health.v1.Health/*` around the drain (DESIGN.md: probes can be
//! exempted) and the health service keeps answering, `NOT_SERVING`, for as
//! long as its connection lives.
//!
//! What tonic does with the refusal: `Draining` is not a `tonic::Status`, so
//! tonic's `RecoverError` (`Status::try_from_error`, which knows `Status`,
//! `h2::Error`, tower's `Overloaded`, timeouts and connect errors, also in the
//! source chain) passes it on as a service error, and hyper resets the HTTP/2
//! stream with `RST_STREAM(INTERNAL_ERROR)`. The tonic client turns that into
//! `Internal` ("h2 protocol error: http2 error", source `Reset(..,
//! INTERNAL_ERROR, Remote)`), not the `UNAVAILABLE` a refused, retryable call
//! should get. The tests print what each late RPC got and assert only that it
//! failed and never reached a handler, until the `grpc` mapping turns
//! `Draining` into a `Status`.
//!
//! Two tests, because with `serve_with_incoming_shutdown(.., drain.signaled())`
//! tonic also sends GOAWAY on every connection and drops its listener the
//! moment refusals begin. A late RPC on an open channel then races the GOAWAY:
//! it reaches the drain layer (the reset above), or the client fails it
//! without the server's handler ever seeing it (`Internal` from
//! `GoAway(NO_ERROR)`, `Cancelled` "connection closed", then `Unavailable`
//! "connection refused" on reconnect); all of these were seen. So in the first
//! test the late RPCs alone do not always show a missing drain layer (its
//! counts do). The second test keeps the server up after refusals begin, so
//! every late RPC reaches the drain layer on an open connection and is
//! refused there: without the layer, they reach the handler, every time.
//!
//! Every wait is bounded ([`bounded`], [`wait_until`]); the tests assert
//! counts and order, never durations.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::uri::PathAndQuery;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::HealthReporter;
use tower::{Layer, Service, ServiceExt as _};
use tower_scale::drain::{Drain, DrainLayer, DrainService, OnBodyEnd};

use crate::support::{bounded, wait_until, Gate, BOUND};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The name the slow RPC is served under, and reported to health as.
const SLOW: &str = "test.Slow";
/// The path clients call.
const SLOW_CHECK: &str = "/test.Slow/Check";
/// The path `HealthServer` routes to `check`.
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
/// The prefix of every call of the real health service.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

// ---------------------------------------------------------------------------
// The slow RPC
// ---------------------------------------------------------------------------

/// A `Health` implementation whose `check` records the request's `service`
/// field at the gate (started, in order), waits there until the test lets it
/// go, counts itself finished and answers `SERVING`.
struct SlowHealth {
    gate: Gate,
    finished: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Health for SlowHealth {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.gate.pass(request.into_inner().service).await;
        self.finished.fetch_add(1, SeqCst);
        Ok(tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }))
    }

    type WatchStream = futures::stream::Empty<Result<HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("test.Slow has no Watch"))
    }
}

/// `HealthServer<SlowHealth>` under the name `test.Slow`, so it does not
/// collide with the real health service: `/test.Slow/Check` becomes the
/// generated `/grpc.health.v1.Health/Check` before the generated server sees
/// it.
#[derive(Clone)]
struct SlowServer {
    inner: HealthServer<SlowHealth>,
}

impl SlowServer {
    fn new(gate: Gate, finished: Arc<AtomicUsize>) -> Self {
        SlowServer {
            inner: HealthServer::new(SlowHealth { gate, finished }),
        }
    }
}

impl NamedService for SlowServer {
    const NAME: &'static str = SLOW;
}

impl Service<http::Request<Body>> for SlowServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = <HealthServer<SlowHealth> as Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if request.uri().path() == SLOW_CHECK {
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = Some(PathAndQuery::from_static(HEALTH_CHECK));
            *request.uri_mut() = http::Uri::from_parts(parts).expect("rewritten URI");
        }
        self.inner.call(request)
    }
}

// ---------------------------------------------------------------------------
// The drain layer, with the health service exempt
// ---------------------------------------------------------------------------

/// Puts the drain around tonic's router, except for calls of the real health
/// service (`/grpc.health.v1.Health/*`), which go straight to the router so
/// that probes keep answering (`NOT_SERVING`) while calls are refused.
#[derive(Clone)]
struct ExemptHealth {
    drain: DrainLayer<OnBodyEnd>,
}

impl ExemptHealth {
    fn new(drain: &Drain) -> Self {
        // Counted until the response body ends: gRPC's status travels in the
        // trailers, and a streaming RPC is not over when its head is sent.
        ExemptHealth {
            drain: drain.layer().release_on_body_end(),
        }
    }
}

impl<S: Clone> Layer<S> for ExemptHealth {
    type Service = Exempt<S>;

    fn layer(&self, inner: S) -> Exempt<S> {
        Exempt {
            drained: self.drain.layer(inner.clone()),
            exempt: inner,
        }
    }
}

#[derive(Clone)]
struct Exempt<S> {
    drained: DrainService<S, OnBodyEnd>,
    exempt: S,
}

impl<S, B> Service<http::Request<Body>> for Exempt<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<http::Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each call drives the readiness of a clone of the service it picks.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            let exempt = self.exempt.clone();
            Box::pin(async move {
                let response = exempt.oneshot(request).await.map_err(Into::into)?;
                Ok(response.map(Body::new))
            })
        } else {
            let drained = self.drained.clone();
            Box::pin(async move {
                let response = drained.oneshot(request).await?;
                Ok(response.map(Body::new))
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Server and clients
// ---------------------------------------------------------------------------

/// A tonic server on `127.0.0.1:0` with the real health service and
/// `test.Slow` behind the drain, stopping when `shutdown` resolves.
struct Grpc {
    url: String,
    gate: Gate,
    finished: Arc<AtomicUsize>,
    reporter: HealthReporter,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Grpc {
    async fn start(
        drain: &Drain,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Grpc {
        let gate = Gate::new();
        let finished = Arc::new(AtomicUsize::new(0));
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(SLOW, tonic_health::ServingStatus::Serving)
            .await;

        let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).expect("bind 127.0.0.1:0");
        let addr = incoming.local_addr().expect("local address");
        let router = Server::builder()
            .layer(ExemptHealth::new(drain))
            .add_service(health)
            .add_service(SlowServer::new(gate.clone(), finished.clone()));
        let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown));
        Grpc {
            url: format!("http://{addr}"),
            gate,
            finished,
            reporter,
            server,
        }
    }

    /// A new channel with its connection open.
    async fn connect(&self) -> Channel {
        let endpoint = Endpoint::from_shared(self.url.clone()).expect("endpoint URL");
        bounded("a gRPC connection", endpoint.connect())
            .await
            .expect("connect")
    }

    fn finished(&self) -> usize {
        self.finished.load(SeqCst)
    }

    /// Waits for the server task to end, failing the test past [`BOUND`].
    async fn stopped(self) {
        bounded("the tonic server to stop", self.server)
            .await
            .expect("server task")
            .expect("serve");
    }
}

/// How one `test.Slow/Check` call ended.
#[derive(Debug)]
enum Outcome {
    /// The handler's answer.
    Answered(ServingStatus),
    /// The channel failed before the call went out.
    NotReady(String),
    /// The call failed with a gRPC status (from the server, or made by the
    /// client from a reset stream or a connection error).
    Failed(tonic::Code, String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Answered(status) => write!(f, "answered {}", status.as_str_name()),
            Outcome::NotReady(err) => write!(f, "channel not ready: {err}"),
            Outcome::Failed(code, message) => write!(f, "status {code:?}: {message}"),
        }
    }
}

/// Calls `test.Slow/Check` with `id` in the `service` field.
async fn slow_check(channel: Channel, id: String) -> Outcome {
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(err) = grpc.ready().await {
        return Outcome::NotReady(err.to_string());
    }
    let response = grpc
        .unary::<_, HealthCheckResponse, _>(
            tonic::Request::new(HealthCheckRequest { service: id }),
            PathAndQuery::from_static(SLOW_CHECK),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    match response {
        Ok(response) => Outcome::Answered(response.into_inner().status()),
        Err(status) => {
            // The source tells a reset stream (`Reset(.., INTERNAL_ERROR,
            // Remote)`: refused by the drain layer) from a GOAWAY or a
            // connection error.
            let source = std::error::Error::source(&status)
                .map(|source| format!(" ({source:?})"))
                .unwrap_or_default();
            Outcome::Failed(status.code(), format!("{}{source}", status.message()))
        }
    }
}

fn spawn_slow(channel: &Channel, id: impl Into<String>) -> JoinHandle<Outcome> {
    tokio::spawn(slow_check(channel.clone(), id.into()))
}

/// Asks the real health service for `service`.
async fn health_status(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    bounded("a health check", client.check(request))
        .await
        .unwrap_or_else(|status| panic!("health check of {service:?} failed: {status:?}"))
        .into_inner()
        .status()
}

/// Polls the real health service until `service` reports `NOT_SERVING`.
async fn until_not_serving(client: &mut HealthClient<Channel>, service: &str) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let status = health_status(client, service).await;
        if status == ServingStatus::NotServing {
            return;
        }
        assert_eq!(
            status,
            ServingStatus::Serving,
            "health of {service:?} before NOT_SERVING"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for health of {service:?} to turn NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sends a late RPC per channel in `channels` (ids `late-0`, `late-1`, ...),
/// and returns their outcomes once all have ended, or as soon as the gate
/// sees more than `started` handlers (a late RPC reached a handler: the test
/// fails there instead of timing out on the closed gate).
async fn late_rpcs(gate: &Gate, started: usize, channels: &[&Channel]) -> Vec<Outcome> {
    let late: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(i, channel)| spawn_slow(channel, format!("late-{i}")))
        .collect();
    wait_until("every late RPC has ended", || {
        gate.started() > started || late.iter().all(|rpc| rpc.is_finished())
    })
    .await;
    assert_eq!(
        gate.started(),
        started,
        "an RPC sent after refusals began reached a handler: {:?}",
        gate.order()
    );
    let mut outcomes = Vec::with_capacity(late.len());
    for rpc in late {
        outcomes.push(rpc.await.expect("late RPC task"));
    }
    for outcome in &outcomes {
        eprintln!("late RPC after refusals began: {outcome}");
        assert!(
            !matches!(outcome, Outcome::Answered(_)),
            "a late RPC was answered: {outcome:?}"
        );
    }
    assert!(
        gate.order().iter().all(|id| !id.starts_with("late")),
        "a late RPC reached a handler: {:?}",
        gate.order()
    );
    outcomes
}

/// Waits for every admitted RPC and checks it got the handler's answer.
async fn all_answered(rpcs: Vec<JoinHandle<Outcome>>) {
    for rpc in rpcs {
        let outcome = bounded("an admitted RPC to complete", rpc)
            .await
            .expect("RPC task");
        assert!(
            matches!(outcome, Outcome::Answered(ServingStatus::Serving)),
            "an admitted RPC did not get its handler's answer: {outcome:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The whole life of a drain under `serve_with_incoming_shutdown(..,
/// drain.signaled())`: health turns NOT_SERVING, a call arriving during the
/// readiness delay is still admitted, calls arriving after refusals begin
/// never reach a handler, every admitted call completes with its real answer,
/// the report counts them, and the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_drain_finishes_admitted_rpcs_and_reaches_no_handler_after_refusals() {
    const SLOW_RPCS: usize = 6;
    // Far longer than the steps during the delay need on a busy machine; the
    // test ends it with `refuse()` once they are done.
    let drain = Drain::builder()
        .readiness_delay(Duration::from_secs(3600))
        .build();
    let grpc = Grpc::start(&drain, drain.signaled()).await;
    let reporter_task = drain.report_to_tonic_health(grpc.reporter.clone(), [SLOW]);

    // Two channels (one HTTP/2 connection each) for the slow RPCs, and one
    // for the health checks, all connected before the drain.
    let channels = [grpc.connect().await, grpc.connect().await];
    let mut health = HealthClient::new(grpc.connect().await);
    assert_eq!(health_status(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(
        health_status(&mut health, SLOW).await,
        ServingStatus::Serving
    );

    // N slow RPCs held in their handlers.
    let mut admitted: Vec<_> = (0..SLOW_RPCS)
        .map(|i| spawn_slow(&channels[i % 2], format!("before-{i}")))
        .collect();
    wait_until("every slow RPC has reached its handler", || {
        grpc.gate.started() == SLOW_RPCS
    })
    .await;
    // Health calls are exempt: only the slow RPCs are counted.
    assert_eq!(drain.in_flight(), SLOW_RPCS);

    // Readiness goes down; calls are still admitted during the delay.
    assert!(drain.start(), "this call starts the drain");
    assert!(drain.is_draining());
    let during = spawn_slow(&channels[0], "during-delay");
    wait_until(
        "the RPC sent during the readiness delay has ended or started",
        || grpc.gate.started() == SLOW_RPCS + 1 || during.is_finished(),
    )
    .await;
    assert_eq!(
        grpc.gate.started(),
        SLOW_RPCS + 1,
        "the RPC sent during the readiness delay did not reach its handler \
         (refusing already: {})",
        drain.is_refusing()
    );
    admitted.push(during);

    // gRPC health turns NOT_SERVING, for the server and for test.Slow, and
    // the health service answers (it is not behind the drain).
    until_not_serving(&mut health, "").await;
    until_not_serving(&mut health, SLOW).await;
    assert!(
        !drain.is_refusing(),
        "refusals began before the health checks were seen NOT_SERVING"
    );
    bounded("the health reporter task", reporter_task)
        .await
        .expect("health reporter task");

    // Refusals begin, and the server stops accepting at the same moment
    // (GOAWAY on open connections, listener closed). A late RPC on an open
    // channel either reaches the drain layer before the GOAWAY (refused:
    // tonic resets the stream) or fails in the client (transport error);
    // neither may reach a handler. So may not a call on a new channel.
    drain.refuse();
    bounded("refusals to begin", drain.signaled()).await;
    assert!(drain.is_refusing());
    let started = grpc.gate.started();
    let new_channel = Endpoint::from_shared(grpc.url.clone())
        .expect("endpoint URL")
        .connect_lazy();
    let late = late_rpcs(
        &grpc.gate,
        started,
        &[&channels[0], &channels[1], &channels[0], &new_channel],
    )
    .await;

    // Every admitted RPC completes with its handler's answer (SERVING: the
    // real health service says NOT_SERVING for test.Slow by now).
    assert_eq!(grpc.finished(), 0, "the gate held every handler");
    grpc.gate.open();
    all_answered(admitted).await;
    assert_eq!(grpc.finished(), SLOW_RPCS + 1);
    let mut order = grpc.gate.order();
    assert_eq!(order.pop().as_deref(), Some("during-delay"));
    order.sort();
    let before: Vec<_> = (0..SLOW_RPCS).map(|i| format!("before-{i}")).collect();
    assert_eq!(order, before);

    let report = bounded("the drain", drain.drain(BOUND)).await;
    eprintln!("{report}");
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.in_flight(), 0);
    assert_eq!(report.completed(), (SLOW_RPCS + 1) as u64, "{report}");
    // How many late RPCs reached the drain layer (rather than failing in the
    // client after the GOAWAY) depends on the race; none was admitted.
    assert!(report.refused() <= late.len() as u64, "{report}");
    assert_eq!(drain.in_flight(), 0);

    // The server closes its connections and its future ends.
    grpc.stopped().await;
}

/// Refusals on a connection that stays open: the server's own shutdown comes
/// later, so every late RPC reaches the drain layer and must be refused
/// there. Without the drain layer they would reach the handler. The health
/// service still answers NOT_SERVING while calls are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rpcs_after_refusals_begin_never_reach_the_handler() {
    const SLOW_RPCS: usize = 2;
    const LATE_RPCS: usize = 4;
    let drain = Drain::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let grpc = Grpc::start(&drain, async move {
        let _ = stopped.await;
    })
    .await;
    let reporter_task = drain.report_to_tonic_health(grpc.reporter.clone(), [SLOW]);
    let channel = grpc.connect().await;
    let mut health = HealthClient::new(grpc.connect().await);

    let admitted: Vec<_> = (0..SLOW_RPCS)
        .map(|i| spawn_slow(&channel, format!("before-{i}")))
        .collect();
    wait_until("every slow RPC has reached its handler", || {
        grpc.gate.started() == SLOW_RPCS
    })
    .await;

    // No readiness delay: refusals begin at once.
    assert!(drain.start());
    bounded("refusals to begin", drain.signaled()).await;
    assert!(drain.is_refusing());

    let late = late_rpcs(&grpc.gate, SLOW_RPCS, &[&channel; LATE_RPCS]).await;
    assert!(
        late.iter()
            .all(|outcome| matches!(outcome, Outcome::Failed(..))),
        "every late RPC went out on the open connection and failed there: {late:?}"
    );
    assert_eq!(drain.in_flight(), SLOW_RPCS);

    // The health service is exempt from the drain: it keeps answering.
    bounded("the health reporter task", reporter_task)
        .await
        .expect("health reporter task");
    assert_eq!(
        health_status(&mut health, "").await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health_status(&mut health, SLOW).await,
        ServingStatus::NotServing
    );

    grpc.gate.open();
    all_answered(admitted).await;
    assert_eq!(grpc.finished(), SLOW_RPCS);
    let mut order = grpc.gate.order();
    order.sort();
    assert_eq!(order, ["before-0", "before-1"]);

    let report = bounded("the drain", drain.drain(BOUND)).await;
    eprintln!("{report}");
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.completed(), SLOW_RPCS as u64, "{report}");
    assert_eq!(report.refused(), LATE_RPCS as u64, "{report}");

    stop.send(()).expect("server still running");
    grpc.stopped().await;
}
