//! Metric handles shared by the layers, registered once per layer.

use metrics::{Counter, Gauge, Histogram};

pub(crate) const DEFAULT_NAME: &str = "default";

/// Why a call was refused; the `reason` label of `tower_scale_rejected_total`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reason {
    Overloaded,
    QueueFull,
    QueueTimeout,
    CircuitOpen,
    Draining,
    #[cfg(feature = "balance")]
    NoEndpoints,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Overloaded => "overloaded",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::CircuitOpen => "circuit_open",
            Reason::Draining => "draining",
            #[cfg(feature = "balance")]
            Reason::NoEndpoints => "no_endpoints",
        }
    }
}

pub(crate) fn rejected(name: &str, reason: Reason) -> Counter {
    metrics::counter!("tower_scale_rejected_total", "name" => name.to_owned(), "reason" => reason.as_str())
}

pub(crate) fn gauge(metric: &'static str, name: &str) -> Gauge {
    metrics::gauge!(metric, "name" => name.to_owned())
}

pub(crate) fn histogram(metric: &'static str, name: &str) -> Histogram {
    metrics::histogram!(metric, "name" => name.to_owned())
}

pub(crate) fn counter(
    metric: &'static str,
    name: &str,
    label: &'static str,
    value: &'static str,
) -> Counter {
    metrics::counter!(metric, "name" => name.to_owned(), label => value)
}
