//! A real axum server drained in the middle of a continuous load from real
//! HTTP/1 and HTTP/2 keep-alive connections, with slow and streaming
//! responses.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_scale::drain::Drain;
use tower_scale::health::HealthChecks;
use tower_scale::http::{ErrorResponseLayer, REJECTED_HEADER};

use crate::support::{bounded, wait_until};

/// The body each path answers for request `id`, whole.
fn expected_body(kind: &str, id: &str) -> String {
    match kind {
        "fast" => format!("fast {id}"),
        "slow" => format!("slow {id} ").repeat(200),
        _ => (0..5).map(|i| format!("chunk {i} of {id};")).collect(),
    }
}

/// After refusals begin, a request on an open keep-alive connection gets 503
/// with the draining marker: on HTTP/1.1 with `Connection: close`, and the
/// server closes the connection after it; on HTTP/2 without the header, and
/// the connection stays usable. The server here keeps accepting (no graceful
/// shutdown), so only the drain layer answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_get_503_and_http1_connections_close() {
    let drain = Drain::new();
    let reached = Arc::new(Reached::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app(&drain, reached.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h1, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    let h1_conn = tokio::spawn(conn);
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |path: &str, absolute: bool| {
        let uri = if absolute {
            format!("http://{addr}{path}")
        } else {
            path.to_owned()
        };
        Request::get(uri)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    h1.ready().await.unwrap();
    let response = h1.send_request(get("/fast/a", false)).await.unwrap();
    assert_eq!(read(response, "fast", "a").await, Outcome::Whole);

    drain.start();
    h1.ready().await.unwrap();
    let response = h1.send_request(get("/fast/b", false)).await.unwrap();
    assert_eq!(response.headers()[header::CONNECTION], "close");
    assert_eq!(read(response, "fast", "b").await, Outcome::Draining);
    bounded("the HTTP/1 connection to close", h1_conn)
        .await
        .unwrap()
        .expect("closed cleanly");
    assert!(h1.ready().await.is_err(), "no request can follow on it");

    h2.ready().await.unwrap();
    let response = h2.send_request(get("/fast/c", true)).await.unwrap();
    assert!(!response.headers().contains_key(header::CONNECTION));
    assert_eq!(read(response, "fast", "c").await, Outcome::Draining);
    h2.ready().await.unwrap();
    let response = h2.send_request(get("/fast/d", true)).await.unwrap();
    assert_eq!(read(response, "fast", "d").await, Outcome::Draining);

    assert_eq!(*reached.0.lock().unwrap(), HashSet::from(["a".to_owned()]));
    let report = drain.drain(Duration::from_secs(5)).await;
    assert_eq!((report.refused(), report.in_flight()), (3, 0));
    server.abort();
}

/// What the server saw: the requests that reached a handler.
#[derive(Default)]
struct Reached(Mutex<HashSet<String>>);

fn app(drain: &Drain, reached: Arc<Reached>) -> Router {
    let api = Router::new()
        .route(
            "/{kind}/{id}",
            get(move |Path((kind, id)): Path<(String, String)>| {
                let reached = reached.clone();
                async move {
                    reached.0.lock().unwrap().insert(id.clone());
                    match kind.as_str() {
                        "fast" => Body::from(expected_body("fast", &id)),
                        "slow" => {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            Body::from(expected_body("slow", &id))
                        }
                        _ => {
                            let chunks = (0..5).map(move |i| format!("chunk {i} of {id};"));
                            let stream = futures::stream::iter(chunks).then(|chunk| async move {
                                tokio::time::sleep(Duration::from_millis(40)).await;
                                Ok::<_, Infallible>(Bytes::from(chunk))
                            });
                            Body::from_stream(stream)
                        }
                    }
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(drain.layer().release_on_body_end()),
        );
    // The readiness probe stays outside the drain: it must answer during it.
    let checks = HealthChecks::builder().drain(drain).build().unwrap();
    api.route_service("/ready", checks.readiness_service())
}

/// How one request ended, from the client's side.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// 200 with the whole expected body.
    Whole,
    /// 200 with a body that is not the expected one: a failure.
    Cut(String),
    /// 503 with the draining marker.
    Draining,
    /// Any other status: a failure.
    Status(StatusCode),
    /// The connection was closed before a response came.
    Closed(String),
}

/// Everything the clients saw, with a global order of observations.
#[derive(Default)]
struct Log {
    seq: AtomicU64,
    outcomes: Mutex<HashMap<String, Outcome>>,
    first_ready_503: Mutex<Option<u64>>,
    first_refusal: Mutex<Option<u64>>,
    refused_connections: AtomicU64,
    /// 200 responses that asked the client to close the connection.
    closing_whole: AtomicU64,
}

impl Log {
    fn record(&self, id: String, outcome: Outcome) {
        let seq = self.seq.fetch_add(1, SeqCst);
        if matches!(outcome, Outcome::Draining | Outcome::Closed(_)) {
            self.first_refusal.lock().unwrap().get_or_insert(seq);
        }
        self.outcomes.lock().unwrap().insert(id, outcome);
    }
}

fn kind_of(n: u64) -> &'static str {
    ["fast", "slow", "fast", "stream"][(n % 4) as usize]
}

async fn read(response: hyper::Response<hyper::body::Incoming>, kind: &str, id: &str) -> Outcome {
    let status = response.status();
    let draining = response
        .headers()
        .get(REJECTED_HEADER)
        .is_some_and(|v| v == "draining");
    let body = match bounded("a response body", response.into_body().collect()).await {
        Ok(body) => body.to_bytes(),
        Err(err) => return Outcome::Cut(format!("body error: {err}")),
    };
    if status == StatusCode::SERVICE_UNAVAILABLE && draining {
        return Outcome::Draining;
    }
    if status != StatusCode::OK {
        return Outcome::Status(status);
    }
    if body == expected_body(kind, id).as_bytes() {
        Outcome::Whole
    } else {
        Outcome::Cut(format!("{} bytes", body.len()))
    }
}

/// One HTTP/1 keep-alive connection after another, sending requests in turn
/// until a new connection is refused (the server stopped accepting) or the
/// request budget is spent.
async fn http1_loop(addr: SocketAddr, name: String, log: Arc<Log>, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    'connections: while n < 400 && !stop.load(SeqCst) {
        let stream = match bounded("a TCP connection", TcpStream::connect(addr)).await {
            Ok(stream) => stream,
            Err(_) => {
                let seq = log.seq.fetch_add(1, SeqCst);
                log.first_refusal.lock().unwrap().get_or_insert(seq);
                log.refused_connections.fetch_add(1, SeqCst);
                return;
            }
        };
        let Ok((mut sender, conn)) =
            http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        while n < 400 && !stop.load(SeqCst) {
            n += 1;
            let kind = kind_of(n);
            let id = format!("{name}-{n}");
            if bounded("the connection to be ready", sender.ready())
                .await
                .is_err()
            {
                // Closed while idle, before this request was sent: not a request.
                n -= 1;
                continue 'connections;
            }
            let request = Request::get(format!("/{kind}/{id}"))
                .header(header::HOST, addr.to_string())
                .body(Empty::new())
                .unwrap();
            let outcome = match bounded("a response head", sender.send_request(request)).await {
                Ok(response) => {
                    if response
                        .headers()
                        .get(header::CONNECTION)
                        .is_some_and(|v| v == "close")
                        && response.status() == StatusCode::OK
                    {
                        log.closing_whole.fetch_add(1, SeqCst);
                    }
                    read(response, kind, &id).await
                }
                Err(err) => Outcome::Closed(err.to_string()),
            };
            let closed = matches!(outcome, Outcome::Closed(_) | Outcome::Draining);
            log.record(id, outcome);
            if closed {
                continue 'connections;
            }
        }
    }
}

/// Requests on one HTTP/2 connection, several at a time, until it closes.
async fn http2_loop(addr: SocketAddr, name: String, log: Arc<Log>, stop: Arc<AtomicBool>) {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return;
    };
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let streams = (0..3).map(|lane| {
        let mut sender: http2::SendRequest<Empty<Bytes>> = sender.clone();
        let (log, stop, name) = (log.clone(), stop.clone(), name.clone());
        tokio::spawn(async move {
            for n in 0..150u64 {
                if stop.load(SeqCst) || bounded("h2 ready", sender.ready()).await.is_err() {
                    return;
                }
                let kind = kind_of(n + lane);
                let id = format!("{name}.{lane}-{n}");
                let request = Request::get(format!("http://{addr}/{kind}/{id}"))
                    .body(Empty::new())
                    .unwrap();
                let outcome = match bounded("a response head", sender.send_request(request)).await {
                    Ok(response) => read(response, kind, &id).await,
                    Err(err) => Outcome::Closed(err.to_string()),
                };
                let closed = matches!(outcome, Outcome::Closed(_));
                log.record(id, outcome);
                if closed {
                    return;
                }
            }
        })
    });
    for lane in streams.collect::<Vec<_>>() {
        let _ = lane.await;
    }
}

/// Polls `/ready` on a connection of its own and notes when it first says 503.
async fn probe_loop(addr: SocketAddr, log: Arc<Log>, stop: Arc<AtomicBool>) {
    while !stop.load(SeqCst) {
        let Ok(stream) = TcpStream::connect(addr).await else {
            return;
        };
        let Ok((mut sender, conn)) =
            http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            return;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        while !stop.load(SeqCst) {
            if sender.ready().await.is_err() {
                break;
            }
            let request = Request::get("/ready")
                .header(header::HOST, addr.to_string())
                .body(Empty::new())
                .unwrap();
            let Ok(response) = sender.send_request(request).await else {
                break;
            };
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                let seq = log.seq.fetch_add(1, SeqCst);
                log.first_ready_503.lock().unwrap().get_or_insert(seq);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_finishes_every_started_request_and_refuses_the_rest() {
    let drain = Drain::builder()
        .readiness_delay(Duration::from_secs(3600))
        .build();
    let reached = Arc::new(Reached::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = axum::serve(listener, app(&drain, reached.clone()))
        .with_graceful_shutdown(drain.signaled());
    let server = tokio::spawn(async move { serve.await });

    let log = Arc::new(Log::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..6 {
        clients.push(tokio::spawn(http1_loop(
            addr,
            format!("h1c{c}"),
            log.clone(),
            stop.clone(),
        )));
    }
    for c in 0..2 {
        clients.push(tokio::spawn(http2_loop(
            addr,
            format!("h2c{c}"),
            log.clone(),
            stop.clone(),
        )));
    }
    let probe = tokio::spawn(probe_loop(addr, log.clone(), stop.clone()));

    // Drain in the middle of the load, with slow and streaming calls in flight.
    wait_until("some requests completed", || {
        log.outcomes.lock().unwrap().len() >= 60
    })
    .await;
    wait_until("three calls in flight", || drain.in_flight() >= 3).await;
    let in_flight_at_start = drain.in_flight();
    // The readiness delay is far longer than the steps during it need on a
    // busy machine; `refuse()` ends it once they are done.
    drain.start();
    wait_until("the probe to see 503", || {
        log.first_ready_503.lock().unwrap().is_some()
    })
    .await;
    wait_until("HTTP/1 responses asking to close during the delay", || {
        log.closing_whole.load(SeqCst) >= 3
    })
    .await;
    drain.refuse();
    let timeout = Duration::from_secs(15);
    let report = bounded("the drain", drain.drain(timeout)).await;
    let server_result = bounded("the server to exit", server).await;
    stop.store(true, SeqCst);
    for client in clients {
        bounded("a client to finish", client).await.unwrap();
    }
    let _ = bounded("the probe to finish", probe).await;
    server_result.unwrap().expect("server ran cleanly");

    let outcomes = log.outcomes.lock().unwrap().clone();
    let reached = reached.0.lock().unwrap().clone();
    let count = |f: fn(&Outcome) -> bool| outcomes.values().filter(|o| f(o)).count();
    let whole = count(|o| *o == Outcome::Whole);
    let draining = count(|o| *o == Outcome::Draining);
    let closed: Vec<&String> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Closed(_)))
        .map(|(id, _)| id)
        .collect();
    let failures: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Cut(_) | Outcome::Status(_)))
        .collect();
    println!(
        "{report}; {in_flight_at_start} in flight at the start; clients saw {whole} whole \
         ({} asking to close the connection), {draining} draining, {} closed, {} refused \
         connections",
        log.closing_whole.load(SeqCst),
        closed.len(),
        log.refused_connections.load(SeqCst)
    );

    assert!(failures.is_empty(), "cut or failed responses: {failures:?}");
    // Every request a handler started came back whole.
    for id in &reached {
        assert_eq!(
            outcomes.get(id),
            Some(&Outcome::Whole),
            "request {id} reached a handler"
        );
    }
    assert_eq!(whole, reached.len());
    // Requests whose connection closed under them never reached a handler.
    for id in &closed {
        assert!(
            !reached.contains(*id),
            "{id} failed as closed but reached a handler"
        );
    }
    // The drain saw every started call finish, and refused what the clients saw refused.
    assert!(report.is_complete(), "{report}");
    assert!(report.completed() >= in_flight_at_start as u64, "{report}");
    assert_eq!(report.refused(), draining as u64);
    assert!(report.elapsed() < timeout);
    // Readiness went down before the first refusal of any kind (a 503, a
    // connection closed under a request, a refused connection).
    let ready_503 = log
        .first_ready_503
        .lock()
        .unwrap()
        .expect("readiness said 503");
    let refusal = log.first_refusal.lock().unwrap().expect("refusals began");
    assert!(
        ready_503 < refusal,
        "readiness 503 at {ready_503}, first refusal at {refusal}"
    );
    // During the readiness delay, HTTP/1 responses moved clients off their
    // keep-alive connections.
    assert!(log.closing_whole.load(SeqCst) > 0);
    // The server is gone: new connections are refused.
    assert!(TcpStream::connect(addr).await.is_err());
}
