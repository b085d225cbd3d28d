//! Graceful drain on SIGTERM: readiness goes down, the server keeps serving for
//! a readiness delay, then refuses new work, finishes what it accepted and
//! exits within a deadline, printing the drain report.
//!
//! ```text
//! cargo run --example graceful --all-features -- --readiness-delay 5s --timeout 30s
//! cargo run --example graceful --all-features -- --self-test   # SIGTERM itself mid-request, check, exit
//! ```
//!
//! Then, from another terminal:
//!
//! ```text
//! curl -i 'http://127.0.0.1:3000/work?ms=3000' &   # a slow request
//! kill -TERM <pid>                                 # or Ctrl-C
//! curl -i http://127.0.0.1:3000/ready              # 503 during the readiness delay
//! curl http://127.0.0.1:3000/health                # the two checks, as JSON
//! ```
//!
//! The slow request completes; the process prints the report and exits.
//!
//! Flags: `--port N` (3000; 0 picks a free one), `--readiness-delay D` (5s),
//! `--timeout D` (30s), `--self-test`; durations as `250ms`, `5s`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::extract::Query;
use axum::routing::get;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_scale::drain::{shutdown_signal, Drain};
use tower_scale::health::HealthChecks;
use tower_scale::http::ErrorResponseLayer;
use tower_scale::limit::ConcurrencyLimitLayer;
use tower_scale::queue::QueueLayer;
use tower_scale::shed::LoadShedLayer;
use tower_scale::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let flags = Flags::parse(std::env::args().skip(1))?;
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, flags.port))).await?;
    let addr = listener.local_addr()?;

    // 1. The drain: readiness down at SIGTERM, refusals after the delay.
    let drain = Drain::builder()
        .readiness_delay(flags.readiness_delay)
        .name("api")
        .build();

    // 2. Two application checks, run in the background every 2 s. The
    //    listener check is critical (no point taking traffic if we cannot
    //    accept it); the scratch directory is not (we can serve without it).
    let checks = HealthChecks::builder()
        .interval(Duration::from_secs(2))
        .critical("listener", Duration::from_secs(1), move || async move {
            TcpStream::connect(addr).await.map(drop)
        })
        .optional("scratch_dir", Duration::from_secs(1), || async {
            let path = std::env::temp_dir().join(format!("graceful-{}", std::process::id()));
            tokio::task::spawn_blocking(move || {
                std::fs::write(&path, b"ok")?;
                std::fs::remove_file(&path)
            })
            .await?
        })
        .drain(&drain)
        .build()?;
    checks.spawn();

    // 3. The stack, outermost first: the drain sits just inside the error
    //    mapping, so a refused call is a 503 with `Connection: close`, and it
    //    counts each call until its response body ends.
    let app = Router::new()
        .route("/work", get(work))
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(drain.layer().release_on_body_end())
                .layer(LoadShedLayer::new().name("api"))
                .layer(QueueLayer::new(64, Duration::from_millis(500)).name("api"))
                .layer(ConcurrencyLimitLayer::new(16).name("api")),
        )
        // Probes stay outside the stack: they answer during overload and drain.
        .route_service("/ready", checks.readiness_service())
        .route_service("/health", checks.health_service())
        .route_service("/live", checks.liveness_service());

    // 4. Serve until refusals begin: `signaled()` stops the accept loop then.
    let serve = axum::serve(listener, app).with_graceful_shutdown(drain.signaled());
    let server = tokio::spawn(async move { serve.await });
    println!("listening on http://{addr} (pid {})", std::process::id());

    // 5. Start the drain on SIGTERM or Ctrl-C.
    let self_test = flags
        .self_test
        .then(|| tokio::spawn(self_test(addr, drain.clone())));
    shutdown_signal().await;
    let deadline = Instant::now() + flags.timeout;
    drain.start();
    println!(
        "draining: readiness is down, refusals in {:?}",
        flags.readiness_delay
    );

    // 6. Wait for the calls in flight, then for the server to close its
    //    connections. axum's serve has no deadline of its own, so it races the
    //    same deadline: past it, the process exits with connections open.
    let report = drain.drain(flags.timeout).await;
    println!("{report}");
    match tokio::time::timeout_at(deadline, server).await {
        Ok(served) => served??,
        Err(_) => println!("deadline passed with connections still open: exiting anyway"),
    }
    if let Some(test) = self_test {
        test.await??;
        println!("self-test passed");
    }
    Ok(())
}

/// Sleeps `ms` milliseconds (default 10), then answers.
async fn work(Query(params): Query<HashMap<String, String>>) -> String {
    let ms = params
        .get("ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10u64);
    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    format!("worked {ms} ms\n")
}

/// Sends a slow request, SIGTERMs this process while it runs, and checks that
/// readiness went down and the slow request still came back whole.
async fn self_test(addr: SocketAddr, drain: Drain) -> Result<(), BoxError> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let get = |path: &str| client.get(format!("http://{addr}{path}").parse().unwrap());
    let status = |path: &'static str| {
        let fut = get(path);
        async move { Ok::<_, BoxError>(fut.await?.status().as_u16()) }
    };
    let bounded = Instant::now() + Duration::from_secs(10);
    while status("/ready").await? != 200 {
        if Instant::now() > bounded {
            return Err("never became ready".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slow = tokio::spawn(get("/work?ms=600"));
    while drain.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("self-test: a 600 ms request is in flight; sending SIGTERM");
    #[cfg(unix)]
    std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", std::process::id())])
        .status()?;
    #[cfg(not(unix))]
    drain.start();
    while !drain.is_draining() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = status("/ready").await?;
    println!("self-test: /ready answers {ready} while draining");
    if ready != 503 {
        return Err(format!("/ready answered {ready} during the drain").into());
    }
    let response = slow.await??;
    let code = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await?
        .to_bytes();
    println!(
        "self-test: the slow request got {code}: {:?}",
        String::from_utf8_lossy(&body)
    );
    if code != 200 || &body[..] != b"worked 600 ms\n" {
        return Err("the slow request was cut".into());
    }
    Ok(())
}

struct Flags {
    port: u16,
    readiness_delay: Duration,
    timeout: Duration,
    self_test: bool,
}

impl Flags {
    fn parse(args: impl Iterator<Item = String>) -> Result<Flags, BoxError> {
        let mut flags = Flags {
            port: 3000,
            readiness_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            self_test: false,
        };
        let mut args = args.peekable();
        while let Some(flag) = args.next() {
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--port" => flags.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
                "--readiness-delay" => flags.readiness_delay = duration(&flag, &value()?)?,
                "--timeout" => flags.timeout = duration(&flag, &value()?)?,
                "--self-test" => flags.self_test = true,
                other => return Err(format!("unknown flag {other}").into()),
            }
        }
        if flags.self_test {
            flags.port = 0;
            flags.readiness_delay = flags.readiness_delay.min(Duration::from_millis(300));
            flags.timeout = flags.timeout.min(Duration::from_secs(10));
        }
        Ok(flags)
    }
}

/// `250ms` or `5s`.
fn duration(flag: &str, text: &str) -> Result<Duration, BoxError> {
    let parsed = if let Some(ms) = text.strip_suffix("ms") {
        ms.parse().map(Duration::from_millis)
    } else if let Some(s) = text.strip_suffix('s') {
        s.parse().map(Duration::from_secs)
    } else {
        return Err(format!("{flag}: `{text}` is not a duration like 250ms or 5s").into());
    };
    parsed.map_err(|e| format!("{flag}: `{text}`: {e}").into())
}
