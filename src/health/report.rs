//! What the probes answer: the health report, readiness, and their JSON.

use std::fmt;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};
use serde::ser::{Serialize, SerializeMap, SerializeStruct, Serializer};

/// The overall health: the worst of the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every check passes.
    Pass,
    /// Every critical check passes; some non-critical check fails or has no
    /// result yet. The health endpoint still answers 200.
    Warn,
    /// A critical check fails or has no result yet. The health endpoint
    /// answers 503.
    Fail,
}

impl Status {
    /// `"pass"`, `"warn"` or `"fail"`, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }

    /// The status code of the health endpoint: 503 for [`Status::Fail`],
    /// 200 otherwise.
    pub fn status_code(self) -> StatusCode {
        match self {
            Status::Fail => StatusCode::SERVICE_UNAVAILABLE,
            Status::Pass | Status::Warn => StatusCode::OK,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one check stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Its last run passed.
    Pass,
    /// Its last run failed, timed out or panicked.
    Fail,
    /// It has not finished a run yet.
    Pending,
}

impl CheckStatus {
    /// `"pass"`, `"fail"` or `"pending"`, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "pass",
            CheckStatus::Fail => "fail",
            CheckStatus::Pending => "pending",
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last results of every check, as the health endpoint answers them; see
/// the [module docs](super#json) for the JSON.
///
/// Made by [`HealthChecks::report`](super::HealthChecks::report), which reads
/// the stored results and never runs a check. With feature `axum` it is an
/// `IntoResponse`, so a handler can return it.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthReport {
    pub(crate) status: Status,
    pub(crate) draining: bool,
    pub(crate) checks: Vec<CheckReport>,
}

impl HealthReport {
    /// The overall status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Whether the drain given to the builder has started. It does not change
    /// [`status`](Self::status) or the health endpoint's status code; readiness
    /// follows it.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Every check, in the order they were registered.
    pub fn checks(&self) -> &[CheckReport] {
        &self.checks
    }

    /// The check called `name`.
    pub fn check(&self, name: &str) -> Option<&CheckReport> {
        self.checks.iter().find(|check| check.name == name)
    }

    /// 503 when the status is [`Status::Fail`], 200 otherwise.
    pub fn status_code(&self) -> StatusCode {
        self.status.status_code()
    }

    /// The report as JSON.
    pub fn to_json(&self) -> String {
        to_json(self)
    }

    pub(crate) fn to_response(&self) -> Response<String> {
        json_response(self.status_code(), self.to_json())
    }
}

impl Serialize for HealthReport {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Checks<'a>(&'a [CheckReport]);

        impl Serialize for Checks<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for check in self.0 {
                    map.serialize_entry(&check.name, check)?;
                }
                map.end()
            }
        }

        let mut report = serializer.serialize_struct("HealthReport", 3)?;
        report.serialize_field("status", &self.status)?;
        report.serialize_field("draining", &self.draining)?;
        report.serialize_field("checks", &Checks(&self.checks))?;
        report.end()
    }
}

/// The last result of one check, in a [`HealthReport`].
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    pub(crate) name: String,
    pub(crate) status: CheckStatus,
    pub(crate) critical: bool,
    pub(crate) latency: Option<Duration>,
    pub(crate) last_error: Option<String>,
    pub(crate) checked_ago: Option<Duration>,
    pub(crate) consecutive_failures: u32,
}

impl CheckReport {
    /// The name it was registered under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether its last run passed.
    pub fn status(&self) -> CheckStatus {
        self.status
    }

    /// Whether it was registered as critical.
    pub fn is_critical(&self) -> bool {
        self.critical
    }

    /// How long its last run took (its timeout when it timed out); `None`
    /// before the first run ends.
    pub fn latency(&self) -> Option<Duration> {
        self.latency
    }

    /// The error of its last run: `None` when that run passed or none has
    /// ended. A timeout reads `"timed out after 1s"`, a panic
    /// `"panicked: <message>"`.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// How long ago its last run ended; `None` before the first run ends.
    pub fn checked_ago(&self) -> Option<Duration> {
        self.checked_ago
    }

    /// The runs in a row that failed, up to the last one (0 when it passed).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
}

impl Serialize for CheckReport {
    /// Everything but the name, which is the key in the report's `checks`.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut check = serializer.serialize_struct("CheckReport", 6)?;
        check.serialize_field("status", &self.status)?;
        check.serialize_field("critical", &self.critical)?;
        check.serialize_field("latency_ms", &self.latency.map(millis))?;
        check.serialize_field("last_error", &self.last_error)?;
        check.serialize_field("checked_ago_ms", &self.checked_ago.map(millis))?;
        check.serialize_field("consecutive_failures", &self.consecutive_failures)?;
        check.end()
    }
}

/// Whether the instance should receive traffic, as the readiness endpoint
/// answers it; see the [module docs](super#json) for the JSON.
///
/// Made by [`HealthChecks::readiness`](super::HealthChecks::readiness). With
/// feature `axum` it is an `IntoResponse`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub(crate) draining: bool,
    pub(crate) failing: Vec<String>,
    pub(crate) pending: Vec<String>,
}

impl Readiness {
    /// Ready: not draining, and every critical check has passed its last run.
    pub fn is_ready(&self) -> bool {
        !self.draining && self.failing.is_empty() && self.pending.is_empty()
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The critical checks whose last run failed.
    pub fn failing(&self) -> &[String] {
        &self.failing
    }

    /// The critical checks that have no result yet.
    pub fn pending(&self) -> &[String] {
        &self.pending
    }

    /// 200 when ready, 503 otherwise.
    pub fn status_code(&self) -> StatusCode {
        if self.is_ready() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }

    /// The readiness as JSON.
    pub fn to_json(&self) -> String {
        to_json(self)
    }

    pub(crate) fn to_response(&self) -> Response<String> {
        json_response(self.status_code(), self.to_json())
    }
}

impl Serialize for Readiness {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut readiness = serializer.serialize_struct("Readiness", 4)?;
        readiness.serialize_field("ready", &self.is_ready())?;
        readiness.serialize_field("draining", &self.draining)?;
        readiness.serialize_field("failing", &self.failing)?;
        readiness.serialize_field("pending", &self.pending)?;
        readiness.end()
    }
}

/// The liveness body: the process answers, so it is alive.
pub(crate) const LIVE: &str = r#"{"status":"pass"}"#;

/// Milliseconds with microsecond precision (`0.189`, not `0.18915300000000002`).
fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Strings, numbers and booleans with string keys: serde_json cannot fail.
    serde_json::to_string(value).unwrap_or_else(|err| {
        tracing::error!(error = %err, "cannot serialize a health response");
        r#"{"status":"fail"}"#.to_owned()
    })
}

/// A JSON response that no cache keeps.
pub(crate) fn json_response(status: StatusCode, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
