//! One resolution: the queries sent to the name servers and the answer they
//! make, as a set of endpoints and the smallest TTL seen.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::future;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;

use crate::discover::DEFAULT_WEIGHT;

/// A successful answer: every endpoint with its weight, and the smallest TTL
/// of the records that made it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Answer {
    pub(super) endpoints: BTreeMap<SocketAddr, u32>,
    pub(super) ttl: Option<Duration>,
}

impl Answer {
    fn lower_ttl(&mut self, ttl: u32) {
        let ttl = Duration::from_secs(u64::from(ttl));
        self.ttl = Some(self.ttl.map_or(ttl, |old| old.min(ttl)));
    }
}

/// Why a resolution gave no endpoint; the source keeps its last good set.
#[derive(Debug)]
pub(super) enum Failure {
    /// The name does not exist (NXDOMAIN).
    NoSuchName,
    /// The name exists but the answer holds no usable address.
    Empty,
    /// The resolution did not finish within the timeout.
    TimedOut,
    /// The name servers could not be asked or answered with an error.
    Lookup(NetError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoSuchName => f.write_str("the name does not exist (NXDOMAIN)"),
            Failure::Empty => f.write_str("the answer holds no address"),
            Failure::TimedOut => f.write_str("the resolution timed out"),
            Failure::Lookup(err) => write!(f, "lookup failed: {err}"),
        }
    }
}

/// Which address records to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    Both,
    V4,
    V6,
}

/// What to resolve and how.
#[derive(Clone, Debug)]
pub(super) struct Query {
    pub(super) resolver: TokioResolver,
    pub(super) host: Name,
    /// `None` for SRV lookups (the records carry the ports).
    pub(super) port: Option<u16>,
    pub(super) family: Family,
}

/// The addresses of one name.
struct Addresses {
    ips: Vec<IpAddr>,
    /// The smallest TTL of the records seen (CNAMEs included).
    ttl: Option<u32>,
    /// Every query said NXDOMAIN.
    no_such_name: bool,
}

impl Query {
    /// Resolves the name once, fresh from the name servers.
    pub(super) async fn run(&self) -> Result<Answer, Failure> {
        // The source does its own scheduling from the TTLs; an answer cached
        // by the resolver would hide changes when `max_interval` is shorter
        // than the TTL.
        self.resolver.clear_cache();
        let mut answer = Answer::default();
        let no_such_name = match self.port {
            Some(port) => {
                let found = self.addresses(&self.host).await?;
                if let Some(ttl) = found.ttl {
                    answer.lower_ttl(ttl);
                }
                for ip in found.ips {
                    answer
                        .endpoints
                        .insert(SocketAddr::new(ip, port), DEFAULT_WEIGHT);
                }
                found.no_such_name
            }
            None => self.srv(&mut answer).await?,
        };
        if answer.endpoints.is_empty() {
            return Err(if no_such_name {
                Failure::NoSuchName
            } else {
                Failure::Empty
            });
        }
        Ok(answer)
    }

    /// The A and/or AAAA records of `name`. A name without records of one
    /// family is fine; any other failure of either query fails the whole
    /// resolution, so a timeout on one family never shrinks the set.
    async fn addresses(&self, name: &Name) -> Result<Addresses, Failure> {
        let resolver = &self.resolver;
        let lookup = |record_type| resolver.lookup(name.clone(), record_type);
        let (v4, v6) = match self.family {
            Family::Both => {
                let (v4, v6) = future::join(lookup(RecordType::A), lookup(RecordType::AAAA)).await;
                (Some(v4), Some(v6))
            }
            Family::V4 => (Some(lookup(RecordType::A).await), None),
            Family::V6 => (None, Some(lookup(RecordType::AAAA).await)),
        };
        let mut found = Addresses {
            ips: Vec::new(),
            ttl: None,
            no_such_name: true,
        };
        for result in [v4, v6].into_iter().flatten() {
            match result {
                Ok(lookup) => {
                    found.no_such_name = false;
                    for record in lookup.answers() {
                        found.ttl = Some(found.ttl.map_or(record.ttl, |ttl| ttl.min(record.ttl)));
                        if self.wants(record) {
                            found.ips.extend(ip_of(record));
                        }
                    }
                }
                Err(err) if err.is_nx_domain() => {}
                Err(err) if err.is_no_records_found() => found.no_such_name = false,
                Err(err) => return Err(Failure::Lookup(err)),
            }
        }
        Ok(found)
    }

    /// The SRV records of the name, with their targets' addresses; returns
    /// whether the name does not exist.
    ///
    /// Only the records of the lowest priority are used (RFC 2782: the others
    /// are backups). Each address of a target gets the record's port and
    /// weight; when every weight is 0 ("no preference"), each gets the
    /// default weight; an address named by several records gets the sum.
    async fn srv(&self, answer: &mut Answer) -> Result<bool, Failure> {
        let lookup = match self
            .resolver
            .lookup(self.host.clone(), RecordType::SRV)
            .await
        {
            Ok(lookup) => lookup,
            Err(err) if err.is_nx_domain() => return Ok(true),
            Err(err) if err.is_no_records_found() => return Ok(false),
            Err(err) => return Err(Failure::Lookup(err)),
        };
        let mut records = Vec::new();
        for record in lookup.answers() {
            answer.lower_ttl(record.ttl);
            if let RData::SRV(srv) = &record.data {
                // A target of "." says the service is not offered here.
                if !srv.target.is_root() {
                    records.push(srv.clone());
                }
            }
        }
        let Some(priority) = records.iter().map(|srv| srv.priority).min() else {
            return Ok(false);
        };
        records.retain(|srv| srv.priority == priority);
        let all_zero = records.iter().all(|srv| srv.weight == 0);

        // Targets' addresses: from the additional section when the server
        // sent them, else looked up (concurrently).
        let mut targets: Vec<Name> = Vec::new();
        for srv in &records {
            if !targets.contains(&srv.target) {
                targets.push(srv.target.clone());
            }
        }
        let mut addresses: Vec<Vec<IpAddr>> = Vec::with_capacity(targets.len());
        let mut missing = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let glue: Vec<&Record> = lookup
                .additionals()
                .iter()
                .filter(|record| record.name == *target && self.wants(record))
                .collect();
            for record in &glue {
                answer.lower_ttl(record.ttl);
            }
            addresses.push(glue.into_iter().filter_map(ip_of).collect());
            if addresses[i].is_empty() {
                missing.push(i);
            }
        }
        let looked_up =
            future::join_all(missing.iter().map(|&i| self.addresses(&targets[i]))).await;
        for (&i, found) in missing.iter().zip(looked_up) {
            // A target that does not resolve adds nothing; a failed query
            // fails the whole resolution.
            let found = found?;
            if let Some(ttl) = found.ttl {
                answer.lower_ttl(ttl);
            }
            addresses[i] = found.ips;
        }

        for srv in &records {
            let weight = if all_zero {
                DEFAULT_WEIGHT
            } else {
                u32::from(srv.weight)
            };
            let i = targets
                .iter()
                .position(|target| *target == srv.target)
                .expect("every target was collected");
            for &ip in &addresses[i] {
                let sum = answer
                    .endpoints
                    .entry(SocketAddr::new(ip, srv.port))
                    .or_insert(0);
                *sum = sum.saturating_add(weight);
            }
        }
        Ok(false)
    }

    /// Whether `record` is an address of a family this query asks for.
    fn wants(&self, record: &Record) -> bool {
        matches!(
            (&record.data, self.family),
            (RData::A(_), Family::Both | Family::V4) | (RData::AAAA(_), Family::Both | Family::V6)
        )
    }
}

fn ip_of(record: &Record) -> Option<IpAddr> {
    match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    }
}
