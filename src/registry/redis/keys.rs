//! The key layout and the stored encodings.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::registry::{InstanceInfo, RegistryError};

/// The keys and the channel of one service in one namespace:
///
/// - `<ns>:<service>:instance:<id>`: one string per instance, its JSON, with
///   a TTL (`SET .. PX`);
/// - `<ns>:<service>:index`: a sorted set of the instance ids, scored by
///   their expiry time (Unix milliseconds, the writer's clock);
/// - `<ns>:<service>:changes`: the pub/sub channel of change notices.
///
/// `%` and `:` in the namespace and the service are percent-encoded, so no
/// two (namespace, service) pairs share a key; ids may hold anything.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(namespace: &str, service: &str) -> Self {
        Keys {
            prefix: format!("{}:{}:", escape(namespace), escape(service)),
        }
    }

    pub(super) fn instance(&self, id: &str) -> String {
        format!("{}instance:{id}", self.prefix)
    }

    pub(super) fn instance_prefix(&self) -> String {
        format!("{}instance:", self.prefix)
    }

    pub(super) fn index(&self) -> String {
        format!("{}index", self.prefix)
    }

    pub(super) fn channel(&self) -> String {
        format!("{}changes", self.prefix)
    }
}

fn escape(part: &str) -> Cow<'_, str> {
    if part.contains([':', '%']) {
        Cow::Owned(part.replace('%', "%25").replace(':', "%3A"))
    } else {
        Cow::Borrowed(part)
    }
}

/// The value of an instance key: its TTL (so a reader knows how long it
/// may wait for the next heartbeat) and the instance.
#[derive(Serialize)]
pub(super) struct StoredRef<'a> {
    pub(super) ttl_ms: u64,
    pub(super) info: &'a InstanceInfo,
}

#[derive(Deserialize)]
pub(super) struct Stored {
    pub(super) ttl_ms: u64,
    pub(super) info: InstanceInfo,
}

/// A message on the change channel.
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum NoticeRef<'a> {
    /// Registered or heartbeated.
    Up { ttl_ms: u64, info: &'a InstanceInfo },
    /// Deregistered.
    Down { id: &'a str },
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum Notice {
    Up { ttl_ms: u64, info: InstanceInfo },
    Down { id: String },
}

/// A TTL in whole milliseconds, at least 1 (Redis refuses `PX 0`).
pub(super) fn ttl_ms(ttl: Duration) -> Result<u64, RegistryError> {
    match u64::try_from(ttl.as_millis()) {
        Ok(0) => Err(RegistryError::Invalid(
            "ttl must be at least 1 ms".to_owned(),
        )),
        Ok(ms) => Ok(ms),
        Err(_) => Err(RegistryError::Invalid("ttl is too long".to_owned())),
    }
}

/// `info` with every non-finite figure replaced (JSON has no NaN: serde_json
/// writes `null`, which then fails to read back as a number).
pub(super) fn finite(info: &InstanceInfo) -> Cow<'_, InstanceInfo> {
    let load = &info.load;
    let bad = |x: f64| !x.is_finite();
    if !bad(load.utilisation) && !bad(load.p95_latency_ms) && !load.cpu.is_some_and(bad) {
        return Cow::Borrowed(info);
    }
    let mut info = info.clone();
    let load = &mut info.load;
    if bad(load.utilisation) {
        load.utilisation = 0.0;
    }
    if bad(load.p95_latency_ms) {
        load.p95_latency_ms = 0.0;
    }
    if load.cpu.is_some_and(bad) {
        load.cpu = None;
    }
    Cow::Owned(info)
}

pub(super) fn encode<T: Serialize>(value: &T) -> Result<String, RegistryError> {
    serde_json::to_string(value).map_err(|err| RegistryError::Invalid(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        let keys = Keys::new("ts", "api");
        assert_eq!(keys.instance("host:8080"), "ts:api:instance:host:8080");
        assert_eq!(keys.index(), "ts:api:index");
        assert_eq!(keys.channel(), "ts:api:changes");
        assert_eq!(keys.instance_prefix(), "ts:api:instance:");
    }

    #[test]
    fn colons_in_names_cannot_collide() {
        let a = Keys::new("a:b", "instance");
        let b = Keys::new("a", "b:instance");
        assert_ne!(a.instance("x"), b.instance("x"));
        assert_eq!(a.index(), "a%3Ab:instance:index");
        assert_eq!(Keys::new("50%", "x").index(), "50%25:x:index");
    }

    #[test]
    fn non_finite_figures_are_stored_as_readable_json() {
        let mut info = InstanceInfo::new("api", "a", "127.0.0.1:1".parse().unwrap());
        info.load.utilisation = f64::NAN;
        info.load.cpu = Some(f64::INFINITY);
        let json = encode(&StoredRef {
            ttl_ms: 5,
            info: &finite(&info),
        })
        .unwrap();
        let back: Stored = serde_json::from_str(&json).unwrap();
        assert_eq!(back.info.load.utilisation, 0.0);
        assert_eq!(back.info.load.cpu, None);
        assert_eq!(back.ttl_ms, 5);
    }

    #[test]
    fn notices_round_trip() {
        let info = InstanceInfo::new("api", "a", "127.0.0.1:1".parse().unwrap());
        let up = encode(&NoticeRef::Up {
            ttl_ms: 7,
            info: &info,
        })
        .unwrap();
        assert!(matches!(
            serde_json::from_str(&up).unwrap(),
            Notice::Up { ttl_ms: 7, info: back } if back == info
        ));
        let down = encode(&NoticeRef::Down { id: "a" }).unwrap();
        assert!(matches!(
            serde_json::from_str(&down).unwrap(),
            Notice::Down { id } if id == "a"
        ));
    }
}
