//! Client-side balancing over three real backends on loopback, through static
//! or DNS discovery with active health checks, printing each backend's share
//! and latency every second while things go wrong.
//!
//! ```text
//! cargo run --example balance --all-features                        # static discovery
//! cargo run --example balance --all-features -- --discovery dns     # DNS (needs dnsmasq)
//! cargo run --example balance --all-features -- --seconds 20
//! ```
//!
//! What happens (times from the start):
//!
//! - 0 s: three backends answer in about 5 ms; the client sends from 8 tasks
//!   through `SafeRetry → Buffer → Balancer(weighted P2C)`, each endpoint a
//!   failure-aware EWMA over `HttpEndpoint` (not-ready breaker, limit,
//!   timeout), the set behind active health checks (`GET /health` every
//!   200 ms).
//! - 2 s: backend 2 becomes 10x slower: P2C moves most traffic off it.
//! - 4 s: backend 1 is killed: a few requests meet a refused connection and
//!   are retried elsewhere; the health checks take it out of rotation.
//! - 6 s: backend 1 restarts; it rejoins after two good checks, once its
//!   breaker (opened by the refused connections) lets a probe through.
//! - 9 s: backend 2 is fast again and wins its share back as its EWMA decays.
//!
//! With `--discovery dns` the backends listen on 127.0.0.1, 127.0.0.2 and
//! 127.0.0.3 (one port), and the client resolves `backends.example.test`
//! through a dnsmasq started on a free loopback port (Debian's
//! `dnsmasq-base`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Request, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::discover::Discover;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_scale::balance::health::{HealthCheckConfig, HealthChecked, HttpProbe, MaxEjectedShare};
use tower_scale::balance::load::{FailureAwareEwma, HttpFailures};
use tower_scale::balance::policy::WeightedP2c;
use tower_scale::balance::{Balancer, HttpEndpoint, ReadyTimeoutLayer};
use tower_scale::breaker::{BreakerConfig, Window};
use tower_scale::discover::{DnsBuilder, Endpoint, Static};
use tower_scale::http::SafeRetry;

type Body = Empty<Bytes>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let dns = match flag("--discovery").as_deref() {
        None | Some("static") => false,
        Some("dns") => true,
        Some(other) => return Err(format!("--discovery: `{other}` is not static or dns").into()),
    };
    let seconds: u64 = match flag("--seconds") {
        Some(s) => s.parse().map_err(|e| format!("--seconds: {e}"))?,
        None => 12,
    };

    let backends = start_backends(dns).await?;
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    println!("backends: {addrs:?}");

    // Each endpoint: a failure-aware EWMA load over the ready-made HTTP stack.
    let breaker = BreakerConfig::builder()
        .window(Window::Count(20))
        .minimum_calls(5)
        .failure_rate(0.5)
        .open_duration(Duration::from_secs(1))
        .half_open_calls(2)
        .build()?;
    let factory = HttpEndpoint::<Body>::builder()
        .timeout(Duration::from_secs(2))
        .breaker(breaker)
        // At most half the endpoints ejected at once: a cluster-wide
        // incident does not eject everyone.
        .ejection_budget(MaxEjectedShare::new(0.5))
        .name("backend")
        .build()?;
    let make = move |endpoint: &Endpoint| {
        FailureAwareEwma::new(factory.make(endpoint)).classify(HttpFailures::new())
    };
    let _dnsmasq;
    if dns {
        let server = Dnsmasq::start(&addrs).await?;
        println!("discovery: DNS, backends.example.test via {}", server.addr);
        let discover = DnsBuilder::new("backends.example.test")
            .port(addrs[0].port())
            .ipv4_only()
            .interval(Duration::from_secs(1))
            .name_server(server.addr)
            .name("backends")
            .build(make)?;
        _dnsmasq = Some(server);
        run(discover, &backends, seconds).await
    } else {
        println!("discovery: static");
        let (discover, _handle) = Static::named("backends", addrs, make);
        _dnsmasq = None;
        run(discover, &backends, seconds).await
    }
}

/// Builds the client over `discover` and runs the scenario.
async fn run<D>(discover: D, backends: &[Arc<Backend>], seconds: u64) -> Result<(), BoxError>
where
    D: Discover<Key = SocketAddr> + Unpin + Send + 'static,
    D::Error: std::fmt::Display,
    D::Service: Service<Request<Body>, Response = Response<Incoming>>
        + tower_scale::discover::Weight
        + tower::load::Load<Metric: tower_scale::balance::LoadValue>
        + Clone
        + Send
        + 'static,
    <D::Service as Service<Request<Body>>>::Error: Into<BoxError> + Send + Sync,
    <D::Service as Service<Request<Body>>>::Future: Send,
{
    let checks = HealthCheckConfig::builder()
        .interval(Duration::from_millis(200))
        .timeout(Duration::from_millis(500))
        .unhealthy_threshold(2)
        .healthy_threshold(2)
        .name("backends")
        .build()?;
    let checked = HealthChecked::new(discover, HttpProbe::get("/health"), checks);
    let balancer = ServiceBuilder::new()
        .layer(ReadyTimeoutLayer::new(Duration::from_secs(1)))
        .service(Balancer::named("backends", checked, WeightedP2c::new()));
    let client = ServiceBuilder::new()
        .layer(SafeRetry::new().into_layer())
        .service(Buffer::new(balancer, 1024));

    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<JoinHandle<()>> = (0..8)
        .map(|_| {
            let (client, stats, stop) = (client.clone(), stats.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(SeqCst) {
                    let started = Instant::now();
                    let request = Request::get("/work").body(Body::new()).unwrap();
                    let outcome = match client.clone().oneshot(request).await {
                        Ok(response) if response.status() == StatusCode::OK => {
                            match response.into_body().collect().await {
                                Ok(body) => String::from_utf8_lossy(&body.to_bytes())
                                    .parse::<usize>()
                                    .ok(),
                                Err(_) => None,
                            }
                        }
                        _ => None,
                    };
                    stats.lock().unwrap().record(outcome, started.elapsed());
                }
            })
        })
        .collect();

    let start = Instant::now();
    let mut events: BTreeMap<u64, &str> = BTreeMap::new();
    events.insert(2, "backend 2 becomes 10x slower");
    events.insert(4, "backend 1 is killed");
    events.insert(6, "backend 1 restarts");
    events.insert(9, "backend 2 is fast again");
    println!(
        "{:>3}  {:>28}  {:>8}  {:>8}  {:>6}",
        "t", "share per backend", "p50 ms", "p99 ms", "failed"
    );
    for second in 1..=seconds {
        tokio::time::sleep_until(start + Duration::from_secs(second)).await;
        let window = std::mem::take(&mut *stats.lock().unwrap());
        println!("{:>3}  {}", second, window.line(backends.len()));
        if let Some(event) = events.get(&second) {
            println!("     -- {event}");
            match second {
                2 => backends[2].delay_ms.store(50, SeqCst),
                4 => backends[1].kill(),
                6 => backends[1].restart().await?,
                9 => backends[2].delay_ms.store(5, SeqCst),
                _ => {}
            }
        }
    }
    stop.store(true, SeqCst);
    for worker in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
    }
    Ok(())
}

/// Answers, latencies and failures over one second.
#[derive(Default)]
struct Stats {
    per_backend: BTreeMap<usize, u64>,
    latencies: Vec<Duration>,
    failed: u64,
}

impl Stats {
    fn record(&mut self, backend: Option<usize>, latency: Duration) {
        match backend {
            Some(index) => {
                *self.per_backend.entry(index).or_default() += 1;
                self.latencies.push(latency);
            }
            None => self.failed += 1,
        }
    }

    fn line(mut self, backends: usize) -> String {
        let total: u64 = self.per_backend.values().sum();
        let shares: Vec<String> = (0..backends)
            .map(|i| {
                let n = self.per_backend.get(&i).copied().unwrap_or(0);
                format!("{:>3.0}%", 100.0 * n as f64 / total.max(1) as f64)
            })
            .collect();
        self.latencies.sort();
        let pct = |p: f64| {
            self.latencies
                .get(
                    ((self.latencies.len() as f64 * p) as usize)
                        .min(self.latencies.len().saturating_sub(1)),
                )
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        format!(
            "{:>28}  {:>8.1}  {:>8.1}  {:>6}",
            format!("{} ({total} ok)", shares.join(" ")),
            pct(0.5),
            pct(0.99),
            self.failed
        )
    }
}

/// One backend: `GET /work` answers its index after about 5 ms (plus any
/// extra delay), `GET /health` answers 200.
struct Backend {
    index: usize,
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl Backend {
    async fn start(index: usize, addr: SocketAddr) -> Result<Arc<Backend>, BoxError> {
        let listener = TcpListener::bind(addr).await?;
        let backend = Arc::new(Backend {
            index,
            addr: listener.local_addr()?,
            delay_ms: Arc::new(AtomicU64::new(5)),
            server: Mutex::new(None),
        });
        backend.serve(listener);
        Ok(backend)
    }

    fn serve(&self, listener: TcpListener) {
        let (delay, index) = (self.delay_ms.clone(), self.index);
        let app = Router::new()
            .route(
                "/work",
                get(move || {
                    let delay = delay.load(SeqCst);
                    async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        index.to_string()
                    }
                }),
            )
            .route("/health", get(|| async { "ok" }));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.server.lock().unwrap() = Some(task);
    }

    fn kill(&self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }

    async fn restart(&self) -> Result<(), BoxError> {
        // The old listener is gone with its task; the port may take a moment.
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                self.serve(listener);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("cannot bind {} again", self.addr).into())
    }
}

/// Three backends: on ephemeral ports of 127.0.0.1, or (for DNS, one port
/// for all) on 127.0.0.1, .2 and .3.
async fn start_backends(dns: bool) -> Result<Vec<Arc<Backend>>, BoxError> {
    if !dns {
        let mut all = Vec::new();
        for index in 0..3 {
            all.push(Backend::start(index, "127.0.0.1:0".parse()?).await?);
        }
        return Ok(all);
    }
    'ports: for _ in 0..20 {
        let first = Backend::start(0, "127.0.0.1:0".parse()?).await?;
        let port = first.addr.port();
        let mut all = vec![first];
        for index in 1..3u8 {
            let addr = SocketAddr::from(([127, 0, 0, 1 + index], port));
            match Backend::start(usize::from(index), addr).await {
                Ok(backend) => all.push(backend),
                Err(_) => {
                    all.iter().for_each(|b| b.kill());
                    continue 'ports;
                }
            }
        }
        return Ok(all);
    }
    Err("no port free on 127.0.0.1, .2 and .3".into())
}

/// A dnsmasq on a free loopback port answering `backends.example.test` with
/// the backends' addresses; stopped on drop.
struct Dnsmasq {
    addr: SocketAddr,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Dnsmasq {
    async fn start(backends: &[SocketAddr]) -> Result<Dnsmasq, BoxError> {
        let binary = ["/usr/sbin/dnsmasq", "/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.is_file())
            .ok_or("dnsmasq is not installed: apt-get install dnsmasq-base")?;
        let dir = std::env::temp_dir().join(format!("tower-scale-balance-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let hosts: String = backends
            .iter()
            .map(|a| format!("{} backends.example.test\n", a.ip()))
            .collect();
        std::fs::write(dir.join("hosts"), hosts)?;
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = format!(
            "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
             addn-hosts={}\nlocal=/test/\nlocal-ttl=1\n",
            dir.join("hosts").display()
        );
        std::fs::write(dir.join("dnsmasq.conf"), conf)?;
        let child = std::process::Command::new(binary)
            .arg("--keep-in-foreground")
            .arg(format!(
                "--conf-file={}",
                dir.join("dnsmasq.conf").display()
            ))
            .arg("--pid-file")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // Give it a moment to bind; the first resolution retries anyway.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Dnsmasq {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            dir,
        })
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
