//! A real DNS server for the tests: dnsmasq on a free loopback port, serving
//! A records from a hosts file (reloaded on SIGHUP) and SRV records from its
//! configuration (changed by a restart: dnsmasq does not reload `srv-host=`).
//! And a tracker that drives a discovery stream and records what it emits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;
use tower::discover::Change;
use tower_scale::discover::dns::Dns;
use tower_scale::discover::{Endpoint, Weight, Weighted};

/// How long any single wait may last before the test fails.
pub const BOUND: Duration = Duration::from_secs(20);

/// An SRV record: `srv-host=<service>,<target>,<port>,<priority>,<weight>`.
#[derive(Clone, Debug)]
pub struct Srv {
    pub service: &'static str,
    pub target: &'static str,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

/// A dnsmasq process, killed (and its files removed) on drop.
pub struct Dnsmasq {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    srv: Vec<Srv>,
}

fn binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("dnsmasq"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "dnsmasq is not installed, and the DNS discovery tests need a real DNS server: \
                 install Debian's `dnsmasq-base` (apt-get install dnsmasq-base; scripts/test.sh \
                 does it when run as root)"
            )
        })
}

/// A port free on 127.0.0.1 for both UDP and TCP (at the time of asking).
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Dnsmasq {
    /// Starts dnsmasq with `hosts` (lines `ip name...`) and `srv` records.
    pub async fn start(hosts: &[(&str, &str)], srv: &[Srv]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-scale-dns-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Dnsmasq {
            dir,
            port: 0,
            child: None,
            srv: srv.to_vec(),
        };
        server.write_hosts(hosts);
        // The port is free when chosen but could be taken before dnsmasq
        // binds it: try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn().await {
                return server;
            }
        }
        panic!("dnsmasq did not start:\n{}", server.log());
    }

    /// The server's address (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Replaces the A records and makes dnsmasq reload them (SIGHUP); returns
    /// once it has.
    pub async fn set_hosts(&self, hosts: &[(&str, &str)]) {
        self.write_hosts(hosts);
        let reads = self.count("read ");
        let pid = self.child.as_ref().expect("dnsmasq is running").id();
        // sh's built-in kill: a fresh Debian may lack procps' /bin/kill.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -HUP {pid}")])
            .status()
            .unwrap();
        assert!(status.success(), "kill -HUP {pid}");
        self.wait_log("dnsmasq to reload the hosts file", |s| {
            s.count("read ") > reads
        })
        .await;
    }

    /// Kills dnsmasq: the port stops answering.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts dnsmasq again on the same port, with `srv` records (the hosts
    /// file stays as last written).
    pub async fn restart(&mut self, srv: &[Srv]) {
        self.stop();
        self.srv = srv.to_vec();
        assert!(
            self.spawn().await,
            "dnsmasq did not restart:\n{}",
            self.log()
        );
    }

    /// Writes the hosts file (dnsmasq reads it at start and on SIGHUP).
    pub fn write_hosts(&self, hosts: &[(&str, &str)]) {
        let mut text = String::new();
        for (ip, names) in hosts {
            writeln!(text, "{ip} {names}").unwrap();
        }
        let tmp = self.dir.join("hosts.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.hosts()).unwrap();
    }

    /// How many queries (of any type) for `name` dnsmasq has received.
    pub fn queries(&self, name: &str) -> usize {
        let suffix = format!("] {name} from");
        self.log()
            .lines()
            .filter(|line| line.contains("query[") && line.contains(&suffix))
            .count()
    }

    /// dnsmasq's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    fn hosts(&self) -> PathBuf {
        self.dir.join("hosts")
    }

    fn write_config(&self) -> PathBuf {
        let mut conf = format!(
            "port={port}\n\
             listen-address=127.0.0.1\n\
             bind-interfaces\n\
             no-resolv\n\
             no-hosts\n\
             addn-hosts={hosts}\n\
             # answer NXDOMAIN for unknown names under .test, never forward\n\
             local=/test/\n\
             # TTL of 1 s on local answers: longer than the sources' max_interval\n\
             local-ttl=1\n\
             log-queries\n",
            port = self.port,
            hosts = self.hosts().display(),
        );
        for srv in &self.srv {
            writeln!(
                conf,
                "srv-host={},{},{},{},{}",
                srv.service, srv.target, srv.port, srv.priority, srv.weight
            )
            .unwrap();
        }
        let path = self.dir.join("dnsmasq.conf");
        std::fs::write(&path, conf).unwrap();
        path
    }

    /// Starts the process and waits until it accepts TCP connections; false
    /// if it exited (the port was taken).
    async fn spawn(&mut self) -> bool {
        let conf = self.write_config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let child = Command::new(binary())
            .arg(format!("--conf-file={}", conf.display()))
            .args(["--no-daemon", "--log-facility=-"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dnsmasq");
        self.child = Some(child);
        let deadline = Instant::now() + BOUND;
        loop {
            let child = self.child.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                self.child = None;
                return false;
            }
            if TcpStream::connect(self.addr()).is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq never listened:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_log(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + BOUND;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "waited too long for {what}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A change, as a value the tests can compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Insert(SocketAddr, u32),
    Remove(SocketAddr),
}

pub type Source = Dns<fn(&Endpoint) -> SocketAddr, SocketAddr>;

/// The factory of the tracked sources: the service is its address.
pub fn address_of(endpoint: &Endpoint) -> SocketAddr {
    endpoint.addr()
}

/// Drives a source and keeps the services it inserted.
pub struct Tracker {
    pub dns: Source,
    pub held: BTreeMap<SocketAddr, Weighted<SocketAddr>>,
}

impl Tracker {
    pub fn new(dns: Source) -> Self {
        Tracker {
            dns,
            held: BTreeMap::new(),
        }
    }

    fn record(&mut self, change: Change<SocketAddr, Weighted<SocketAddr>>) -> Seen {
        match change {
            Change::Insert(addr, service) => {
                assert_eq!(*service.get_ref(), addr, "the service is made for its key");
                let seen = Seen::Insert(addr, service.weight());
                assert!(
                    self.held.insert(addr, service).is_none(),
                    "{addr} inserted twice"
                );
                seen
            }
            Change::Remove(addr) => {
                assert!(
                    self.held.remove(&addr).is_some(),
                    "{addr} removed but unknown"
                );
                Seen::Remove(addr)
            }
        }
    }

    /// The next `n` changes, each within [`BOUND`].
    pub async fn changes(&mut self, n: usize, server: &Dnsmasq) -> Vec<Seen> {
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            match tokio::time::timeout(BOUND, self.dns.next()).await {
                Ok(Some(change)) => seen.push(self.record(change.unwrap())),
                Ok(None) => panic!("the source ended"),
                Err(_) => panic!(
                    "no change within {BOUND:?}; so far {seen:?}\ndnsmasq log:\n{}",
                    server.log()
                ),
            }
        }
        seen
    }

    /// Drives the source until `done` holds (checked between polls), within
    /// [`BOUND`]; returns the changes seen meanwhile.
    pub async fn until(
        &mut self,
        what: &str,
        server: &Dnsmasq,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Vec<Seen> {
        let deadline = Instant::now() + BOUND;
        let mut seen = Vec::new();
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "waited too long for {what}; changes meanwhile {seen:?}\ndnsmasq log:\n{}",
                server.log()
            );
            tokio::select! {
                change = self.dns.next() => {
                    let change = change.expect("the source never ends").unwrap();
                    seen.push(self.record(change));
                }
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
        seen
    }

    /// The addresses in the tracked set.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.held.keys().copied().collect()
    }
}
