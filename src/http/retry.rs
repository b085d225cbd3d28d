//! [`SafeRetry`]: a client retry policy that only retries what was refused
//! before any work started.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use metrics::Counter;
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::{Policy, RetryLayer};

use super::{Rejection, REJECTED_HEADER};
use crate::error::{BoxError, ConfigError};
use crate::metrics_util::{self, DEFAULT_NAME};

/// A retry policy for tower's [`Retry`](tower::retry::Retry) that retries a
/// request only when it was refused before any work started, so retrying is
/// safe for every method, `POST` included.
///
/// # What is retried
///
/// - A 503 response carrying the [`REJECTED_HEADER`] marker
///   (`tower-scale-rejected`), which tower-scale servers put on every refusal
///   made before the request reached the application: draining, a full
///   queue, a queue timeout, shedding, an open breaker.
/// - An error whose `source()` chain holds one of this crate's refusals
///   ([`Draining`](crate::error::Draining),
///   [`QueueFull`](crate::error::QueueFull),
///   [`QueueTimeout`](crate::error::QueueTimeout),
///   [`Overloaded`](crate::error::Overloaded),
///   [`CircuitOpen`](crate::error::CircuitOpen)): a client-side layer refused
///   it. Not [`NoEndpoints`](crate::error::NoEndpoints): the client's own
///   balancer had no ready endpoint, and an immediate retry would meet the
///   same empty set (a 503 marked `no_endpoints` from a proxy is retried like
///   any marked refusal).
/// - An error whose chain holds an `io::Error` of kind `ConnectionRefused`, or
///   (feature `balance`) a hyper-util client error that happened while
///   connecting: the connection was never made, so the server never saw the
///   request.
///
/// Other failures are retried only for idempotent requests (`GET`, `HEAD`,
/// `OPTIONS`, `TRACE`, `PUT`, `DELETE`, RFC 9110 §9.2.2) and requests marked
/// [`RetrySafe`], unless [`retry_idempotent(false)`](SafeRetryBuilder::retry_idempotent):
/// a 502, a 503 without the marker, a 504, and errors (a timeout, a
/// connection reset or closed before the response, which also covers the race
/// every HTTP/1 keep-alive client has with a server closing an idle
/// connection) except those no attempt can fix (hyper's user and parse
/// errors). Sending such a request twice has the effect of sending it once.
/// For any other request nothing else is retried: the server may have
/// started the work. hyper-util's client resends on its own a request that it
/// could not write at all.
///
/// # Why it is safe for any method
///
/// Each of these answers proves the request had no effect. The marker is set
/// by [`ErrorResponseLayer`](super::ErrorResponseLayer) only when the error it
/// answers is itself one of the refusals, which the layers in front of the
/// application return before calling it (a refusal wrapped in another error
/// gets the status without the marker, since the application may have worked
/// before it got it); and a refused connection carries no request at all.
/// Sending the request again is then the same as sending it for the first
/// time, whatever the method. The one thing the server side must not do is
/// return, unwrapped, a refusal its application got from a service it called
/// (see the [module docs](super)).
///
/// # Pacing
///
/// A `Retry-After` (seconds, or an HTTP date) is honoured: the retry waits that long, and a
/// server that asks for longer than [`max_wait`](SafeRetryBuilder::max_wait)
/// (default 2 s) is not retried at all. Without `Retry-After` (a draining
/// instance asks for none: go elsewhere now) the first retry is immediate,
/// since a balancer sends it to another endpoint, and the later ones back off
/// exponentially with full jitter from
/// [`backoff`](SafeRetryBuilder::backoff) (default 5 ms to 250 ms). At most
/// [`max_retries`](SafeRetryBuilder::max_retries) (default 3) per request, and
/// only while the shared [`TpsBudget`] allows (default tower's: 20% of
/// requests plus 10 per second, over 10 s), so retries cannot multiply the load
/// on a struggling service.
///
/// The request body must be `Clone` to be sent again (`Full<Bytes>`,
/// `String`, `()`...): buffer a streaming body first.
///
/// # Metrics
///
/// `tower_scale_retries_total{name, outcome}` with `outcome` = `retried` or
/// `budget_exhausted`.
///
/// # Example
///
/// ```
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_scale::http::SafeRetry;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let retry = SafeRetry::builder().max_retries(2).build()?;
/// let client = ServiceBuilder::new()
///     .layer(retry.into_layer())
///     .service(service_fn(|_: http::Request<Full<Bytes>>| async {
///         Ok::<_, tower::BoxError>(http::Response::new(()))
///     }));
/// let response = client.oneshot(http::Request::new(Full::new(Bytes::from("hi")))).await?;
/// assert_eq!(response.status(), 200);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct SafeRetry {
    shared: Arc<Shared>,
    /// Retries already made for the request this clone follows.
    retries: u32,
}

struct Shared {
    budget: Arc<TpsBudget>,
    max_retries: u32,
    max_wait: Duration,
    backoff_base: Duration,
    backoff_max: Duration,
    idempotent_on_reset: bool,
    hasher: RandomState,
    /// Hashed with `hasher` for the jitter.
    seq: AtomicU64,
    retried: Counter,
    exhausted: Counter,
}

/// Builds a [`SafeRetry`]; see its docs for the defaults.
#[derive(Debug)]
pub struct SafeRetryBuilder {
    budget: Option<Arc<TpsBudget>>,
    max_retries: u32,
    max_wait: Duration,
    backoff: (Duration, Duration),
    idempotent_on_reset: bool,
    name: String,
}

impl SafeRetry {
    /// A policy with the defaults: 3 retries, `Retry-After` up to 2 s, backoff
    /// from 5 ms to 250 ms, tower's default [`TpsBudget`].
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder, to change the defaults.
    pub fn builder() -> SafeRetryBuilder {
        SafeRetryBuilder {
            budget: None,
            max_retries: 3,
            max_wait: Duration::from_secs(2),
            backoff: (Duration::from_millis(5), Duration::from_millis(250)),
            idempotent_on_reset: true,
            name: DEFAULT_NAME.to_owned(),
        }
    }

    /// tower's [`RetryLayer`] with this policy.
    pub fn into_layer(self) -> RetryLayer<Self> {
        RetryLayer::new(self)
    }

    /// The budget the retries draw from (shared by every clone).
    pub fn budget(&self) -> &Arc<TpsBudget> {
        &self.shared.budget
    }

    /// Whether `response` was refused before any work started.
    pub fn is_refused_response<B>(response: &Response<B>) -> bool {
        response.status() == StatusCode::SERVICE_UNAVAILABLE
            && response.headers().contains_key(REJECTED_HEADER)
    }

    /// Whether `err` says the request was refused before any work started.
    pub fn is_refused_error(err: &(dyn StdError + 'static)) -> bool {
        match Rejection::of(err) {
            // This client's own balancer has no ready endpoint: sending again
            // at once meets the same empty set and spends the budget.
            Rejection::Refused("no_endpoints") => return false,
            Rejection::Refused(_) => return true,
            _ => {}
        }
        let mut current = Some(err);
        while let Some(err) = current {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    return true;
                }
            }
            #[cfg(feature = "balance")]
            if let Some(client) = err.downcast_ref::<hyper_util::client::legacy::Error>() {
                // Failed while connecting: no byte of the request was sent.
                if client.is_connect() {
                    return true;
                }
            }
            current = err.source();
        }
        false
    }

    /// The wait before the next retry: `Retry-After` when given (None when it
    /// is longer than `max_wait`), else the backoff.
    fn wait(&self, retry_after: Option<Duration>) -> Option<Duration> {
        if let Some(after) = retry_after {
            return (after <= self.shared.max_wait).then_some(after);
        }
        if self.retries == 0 {
            return Some(Duration::ZERO);
        }
        let shared = &self.shared;
        let exp = shared
            .backoff_base
            .saturating_mul(1u32 << (self.retries - 1).min(20))
            .min(shared.backoff_max);
        // Full jitter: uniform in [0, exp].
        let random = shared.hasher.hash_one(shared.seq.fetch_add(1, Relaxed));
        let nanos = exp.as_nanos() as u64;
        Some(Duration::from_nanos(random % nanos.saturating_add(1)))
    }

    fn decide(&mut self, retryable: bool, retry_after: Option<Duration>) -> Option<Duration> {
        // Every request deposits once, at its first outcome, whatever it is:
        // retries can then add at most the budget's share to the load, even
        // when every attempt fails (Finagle's and tower's accounting).
        if self.retries == 0 {
            self.shared.budget.deposit();
        }
        if !retryable {
            return None;
        }
        if self.retries >= self.shared.max_retries {
            return None;
        }
        let wait = self.wait(retry_after)?;
        if !self.shared.budget.withdraw() {
            self.shared.exhausted.increment(1);
            tracing::debug!("retry budget exhausted");
            return None;
        }
        self.retries += 1;
        self.shared.retried.increment(1);
        Some(wait)
    }
}

impl Default for SafeRetry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for SafeRetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafeRetry")
            .field("max_retries", &self.shared.max_retries)
            .field("max_wait", &self.shared.max_wait)
            .field(
                "backoff",
                &(self.shared.backoff_base, self.shared.backoff_max),
            )
            .field("budget", &self.shared.budget)
            .field("retries", &self.retries)
            .finish()
    }
}

impl SafeRetryBuilder {
    /// The budget retries draw from (default tower's `TpsBudget::default()`).
    /// Pass an `Arc` to share one budget between several clients.
    pub fn budget(mut self, budget: impl Into<Arc<TpsBudget>>) -> Self {
        self.budget = Some(budget.into());
        self
    }

    /// At most this many retries per request (default 3; 0 turns retrying off).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// The longest `Retry-After` honoured (default 2 s); a server asking for
    /// longer is not retried.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// The backoff between retries without `Retry-After` after the first,
    /// immediate one: from `base`, doubling, capped at `max`, with full jitter
    /// (default 5 ms to 250 ms).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = (base, max);
        self
    }

    /// Whether idempotent requests (and those marked [`RetrySafe`]) are also
    /// retried after failures that may have followed some work: 502, 503
    /// without the marker, 504, timeouts, resets (default true); see
    /// [`SafeRetry`].
    pub fn retry_idempotent(mut self, retry: bool) -> Self {
        self.idempotent_on_reset = retry;
        self
    }

    /// The `name` label of the policy's metrics (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Checks the settings and builds the policy.
    ///
    /// # Errors
    ///
    /// `backoff.base` when it is zero, `backoff.max` when it is below the base.
    pub fn build(self) -> Result<SafeRetry, ConfigError> {
        let (base, max) = self.backoff;
        if base.is_zero() {
            return Err(ConfigError::new("backoff.base", "must be more than zero"));
        }
        if max < base {
            return Err(ConfigError::new(
                "backoff.max",
                format!("must be at least the base ({base:?}), got {max:?}"),
            ));
        }
        let counter = |outcome| {
            metrics_util::counter("tower_scale_retries_total", &self.name, "outcome", outcome)
        };
        Ok(SafeRetry {
            shared: Arc::new(Shared {
                budget: self.budget.unwrap_or_default(),
                max_retries: self.max_retries,
                max_wait: self.max_wait,
                backoff_base: base,
                backoff_max: max,
                idempotent_on_reset: self.idempotent_on_reset,
                hasher: RandomState::new(),
                seq: AtomicU64::new(0),
                retried: counter("retried"),
                exhausted: counter("budget_exhausted"),
            }),
            retries: 0,
        })
    }
}

/// 502, 503 (without the marker) and 504: the request may have been worked
/// on, but another attempt, perhaps on another endpoint, may succeed.
fn is_gateway_failure(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// Errors another attempt cannot fix: a request the client itself cannot
/// build or send (hyper's user errors, such as an invalid URI).
fn is_permanent(err: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            if hyper.is_user() || hyper.is_parse() {
                return true;
            }
        }
        current = err.source();
    }
    false
}

/// A request extension that makes [`SafeRetry`] treat a request as
/// idempotent whatever its method: insert it on a `POST` the server handles
/// idempotently (with an idempotency key, say).
///
/// ```
/// let mut request = http::Request::post("/payments").body(()).unwrap();
/// request.extensions_mut().insert(tower_scale::http::RetrySafe);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetrySafe;

fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// The wait a `Retry-After` header asks for: delay-seconds, or an HTTP date
/// (a date in the past asks for no wait); garbage counts as absent.
pub(crate) fn retry_after<B>(response: &Response<B>) -> Option<Duration> {
    let value = response
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl<B, R> Policy<Request<B>, Response<R>, BoxError> for SafeRetry
where
    B: Clone,
{
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<R>, BoxError>,
    ) -> Option<Self::Future> {
        let repeatable = self.shared.idempotent_on_reset
            && (is_idempotent(request.method())
                || request.extensions().get::<RetrySafe>().is_some());
        let wait = match result {
            Ok(response) => {
                let retryable = Self::is_refused_response(response)
                    || (repeatable && is_gateway_failure(response.status()));
                let after = retryable.then(|| retry_after(response)).flatten();
                self.decide(retryable, after)?
            }
            Err(err) => {
                let err = err.as_ref();
                let retryable = Self::is_refused_error(err) || (repeatable && !is_permanent(err));
                self.decide(retryable, None)?
            }
        };
        Some(Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let mut clone = Request::new(request.body().clone());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}
