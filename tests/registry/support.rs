//! A real Redis for the tests: `redis-server` on a free loopback port, without
//! persistence (`--save ''`), so a restart comes back empty; and helpers that
//! wait within a bound and follow a membership stream.

#![allow(dead_code)] // Each test file uses its own part of the harness.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower_scale::registry::{InstanceInfo, Membership, MembershipStream};

/// How long any single wait may last before the test fails.
pub const BOUND: Duration = Duration::from_secs(20);

/// A `redis-server` process, killed (and its directory removed) on drop.
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not installed, and the registry tests need a real Redis: \
                 install Debian's `redis-server` (apt-get install redis-server; \
                 scripts/test.sh does it when run as root)"
            )
        })
}

/// A port free on 127.0.0.1 (at the time of asking).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts `redis-server` on a free port.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts `redis-server` on a free port with extra arguments (such as
    /// `["--requirepass", "secret"]`).
    pub async fn start_with(args: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-scale-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            dir,
            port: 0,
            args: args.iter().map(|arg| arg.to_string()).collect(),
            child: None,
        };
        // The port is free when chosen but could be taken before Redis binds
        // it: try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server did not start:\n{}", server.log());
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (SIGKILL, as a crash): the port stops answering and
    /// every connection drops. Nothing is saved.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port; it comes back empty.
    pub async fn restart(&mut self) {
        self.stop();
        // The old socket may linger a moment: retry within the bound.
        let deadline = Instant::now() + BOUND;
        while !self.spawn().await {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Starts the process and waits until it answers PING; false if it
    /// exited (the port was taken).
    async fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + BOUND;
        loop {
            let child = self.child.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            if self.answers() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server never answered:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the server answers PING (`-NOAUTH` counts: it is up).
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = [0u8; 64];
        match stream.read(&mut reply) {
            Ok(n) => reply[..n].starts_with(b"+PONG") || reply[..n].starts_with(b"-NOAUTH"),
            Err(_) => false,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `check` holds, polling; fails the test with `what` after
/// [`BOUND`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + BOUND;
    while !check().await {
        assert!(Instant::now() < deadline, "waited too long for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drives a membership stream in a task of its own and records what it
/// emits: every change in order, and the set it adds up to.
pub struct Watched {
    changes: Arc<Mutex<Vec<Membership>>>,
    task: JoinHandle<()>,
}

impl Watched {
    pub fn new(mut stream: MembershipStream) -> Self {
        let changes = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let changes = changes.clone();
            async move {
                while let Some(change) = stream.next().await {
                    changes.lock().unwrap().push(change);
                }
                panic!("a membership stream ended");
            }
        });
        Watched { changes, task }
    }

    /// Every change so far.
    pub fn changes(&self) -> Vec<Membership> {
        assert!(!self.task.is_finished(), "the watch task stopped");
        self.changes.lock().unwrap().clone()
    }

    /// The set the changes add up to, by id.
    pub fn set(&self) -> BTreeMap<String, InstanceInfo> {
        let mut set = BTreeMap::new();
        for change in self.changes() {
            match change {
                Membership::Joined(info) => {
                    assert!(
                        set.insert(info.id.clone(), info).is_none(),
                        "joined twice without leaving"
                    );
                }
                Membership::Updated(info) => {
                    assert!(
                        set.insert(info.id.clone(), info).is_some(),
                        "an update of an unknown instance"
                    );
                }
                Membership::Left(id) => {
                    assert!(set.remove(&id).is_some(), "an unknown instance left");
                }
            }
        }
        set
    }

    /// The ids of the set.
    pub fn ids(&self) -> Vec<String> {
        self.set().into_keys().collect()
    }

    /// The ids that left, in order.
    pub fn left(&self) -> Vec<String> {
        self.changes()
            .into_iter()
            .filter_map(|change| match change {
                Membership::Left(id) => Some(id),
                _ => None,
            })
            .collect()
    }

    /// Waits until the set's ids are `ids` (sorted).
    pub async fn wait_for(&self, ids: &[&str]) {
        eventually(&format!("the watched set to be {ids:?}"), || {
            let now = self.ids();
            async move { now == ids }
        })
        .await;
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Prints the crate's tracing events when `RUST_LOG` is set (run with
/// `--nocapture`); several calls are fine.
pub fn trace() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
