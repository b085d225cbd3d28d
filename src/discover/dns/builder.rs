use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::{Resolver, TokioResolver};

use super::resolve::{Family, Query};
use super::{Dns, Resolve, Timing};
use crate::discover::Endpoint;
use crate::error::ConfigError;
use crate::metrics_util::DEFAULT_NAME;

/// Configures and builds a [`Dns`] source; see the [module docs](super) for
/// an example.
///
/// Defaults: A and AAAA records (a port is required), `min_interval` 5 s,
/// `max_interval` 60 s, `timeout` 10 s, the system resolver configuration,
/// the metrics name `"default"`.
#[derive(Clone, Debug)]
pub struct DnsBuilder {
    host: String,
    name: String,
    port: Option<u16>,
    srv: bool,
    family: Family,
    min_interval: Duration,
    max_interval: Duration,
    timeout: Duration,
    name_servers: Vec<SocketAddr>,
}

impl DnsBuilder {
    /// A builder for a source that resolves `host`, such as
    /// `"api.internal.example"` (or `"_http._tcp.api.internal.example"` with
    /// [`srv`](Self::srv)). A name without a final dot may be completed with
    /// the search domains of the system configuration.
    pub fn new(host: impl Into<String>) -> Self {
        DnsBuilder {
            host: host.into(),
            name: DEFAULT_NAME.to_owned(),
            port: None,
            srv: false,
            family: Family::Both,
            min_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            name_servers: Vec::new(),
        }
    }

    /// The port of every address found in A/AAAA records (required unless
    /// [`srv`](Self::srv)).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Resolves SRV records instead of A/AAAA: ports and weights come from
    /// the records, the targets' addresses from their A/AAAA records.
    pub fn srv(mut self) -> Self {
        self.srv = true;
        self
    }

    /// Asks for A records only (the default is A and AAAA).
    pub fn ipv4_only(mut self) -> Self {
        self.family = Family::V4;
        self
    }

    /// Asks for AAAA records only (the default is A and AAAA).
    pub fn ipv6_only(mut self) -> Self {
        self.family = Family::V6;
        self
    }

    /// The shortest wait between two resolutions, also the wait after a
    /// failure (default 5 s).
    pub fn min_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval;
        self
    }

    /// The longest wait between two resolutions, whatever the TTL (default
    /// 60 s).
    pub fn max_interval(mut self, interval: Duration) -> Self {
        self.max_interval = interval;
        self
    }

    /// Resolves every `interval`, whatever the TTLs: sets both
    /// [`min_interval`](Self::min_interval) and
    /// [`max_interval`](Self::max_interval).
    pub fn interval(self, interval: Duration) -> Self {
        self.min_interval(interval).max_interval(interval)
    }

    /// How long one resolution may take before it counts as failed (default
    /// 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Asks this name server (UDP, and TCP for truncated answers) instead of
    /// the system configuration; call again to add more. The hosts file is
    /// then not read.
    pub fn name_server(mut self, addr: SocketAddr) -> Self {
        self.name_servers.push(addr);
        self
    }

    /// The `name` label of the source's metrics (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Builds the source, with `make` turning each endpoint into a service.
    ///
    /// Reads the system resolver configuration unless name servers were
    /// given; spawns nothing and needs no runtime (the first resolution
    /// starts when the stream is first polled).
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field: `host` (empty or not a DNS name),
    /// `name` (empty), `port` (missing for A/AAAA), `min_interval` (zero),
    /// `max_interval` (below `min_interval`), `timeout` (zero),
    /// `name_server` (the system configuration cannot be read).
    pub fn build<F, S>(self, make: F) -> Result<Dns<F, S>, ConfigError>
    where
        F: FnMut(&Endpoint) -> S,
    {
        if self.host.trim().is_empty() {
            return Err(ConfigError::new("host", "must not be empty"));
        }
        let host = Name::from_str(&self.host)
            .map_err(|err| ConfigError::new("host", format!("not a DNS name: {err}")))?;
        if self.name.is_empty() {
            return Err(ConfigError::new("name", "must not be empty"));
        }
        let port = match (self.srv, self.port) {
            (true, _) => None,
            (false, Some(port)) => Some(port),
            (false, None) => {
                return Err(ConfigError::new(
                    "port",
                    "required for A/AAAA records (or use SRV records)",
                ))
            }
        };
        if self.min_interval.is_zero() {
            return Err(ConfigError::new(
                "min_interval",
                "must be greater than zero",
            ));
        }
        if self.max_interval < self.min_interval {
            return Err(ConfigError::new(
                "max_interval",
                format!(
                    "{:?} is below min_interval ({:?})",
                    self.max_interval, self.min_interval
                ),
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be greater than zero"));
        }
        let query = Query {
            resolver: self.resolver()?,
            host,
            port,
            family: self.family,
        };
        let query = Arc::new(query);
        let resolve: Resolve = Arc::new(move || {
            let query = query.clone();
            Box::pin(async move { query.run().await })
        });
        let timing = Timing {
            min_interval: self.min_interval,
            max_interval: self.max_interval,
            timeout: self.timeout,
        };
        Ok(Dns::with_resolve(
            resolve, timing, &self.host, &self.name, make,
        ))
    }

    fn resolver(&self) -> Result<TokioResolver, ConfigError> {
        let mut builder = if self.name_servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|err| {
                ConfigError::new(
                    "name_server",
                    format!("none given and the system configuration cannot be read: {err}"),
                )
            })?
        } else {
            let servers = self
                .name_servers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            let mut builder = Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            );
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        // Every resolution asks the servers (the source clears the cache
        // anyway): keep no answers around.
        builder.options_mut().cache_size = 0;
        builder.build().map_err(|err| {
            ConfigError::new("name_server", format!("cannot build the resolver: {err}"))
        })
    }
}
