//! Deciding which completions count as failures for the load.

use std::time::Duration;

use http::{Response, StatusCode};

use crate::breaker::ErrorsAreFailures;

/// How a call ended, as far as the endpoint's load is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// It worked: its round-trip time is an observation like any other.
    Success,
    /// It failed: the round trip counts as at least the failure penalty, so
    /// that an endpoint failing fast does not look cheap.
    Failure,
    /// The endpoint asked for no more calls for this long (a 503 or 429 with
    /// `Retry-After`): a failure, and the endpoint costs at least the penalty
    /// until then.
    Unavailable(Duration),
    /// It tells nothing about the endpoint (a cancellation the application
    /// chose, say): only the in-flight count changes.
    Ignored,
}

/// Decides how a call's result weighs on the endpoint's load.
///
/// It sees the result by reference (the result itself passes on untouched).
/// Provided: [`ErrorsAreFailures`] (the default), [`HttpFailures`], and any
/// closure `Fn(Result<&T, &E>) -> LoadOutcome + Clone`:
///
/// ```
/// use tower_scale::balance::load::{ClassifyLoad, LoadOutcome};
///
/// // Timeouts are failures, other errors tell nothing.
/// let classify = |result: Result<&u32, &tower_scale::BoxError>| match result {
///     Ok(_) => LoadOutcome::Success,
///     Err(e) if e.is::<tower::timeout::error::Elapsed>() => LoadOutcome::Failure,
///     Err(_) => LoadOutcome::Ignored,
/// };
/// assert_eq!(classify.classify(Ok(&1)), LoadOutcome::Success);
/// ```
///
/// The breaker's [`Classify`](crate::breaker::Classify) is not reused here:
/// it records into a breaker's admission token, which only a breaker can make,
/// and its outcome has no room for a `Retry-After`.
pub trait ClassifyLoad<T, E>: Clone {
    /// The outcome of `result`.
    fn classify(&self, result: Result<&T, &E>) -> LoadOutcome;
}

impl<T, E> ClassifyLoad<T, E> for ErrorsAreFailures {
    #[inline]
    fn classify(&self, result: Result<&T, &E>) -> LoadOutcome {
        match result {
            Ok(_) => LoadOutcome::Success,
            Err(_) => LoadOutcome::Failure,
        }
    }
}

impl<T, E, F> ClassifyLoad<T, E> for F
where
    F: Fn(Result<&T, &E>) -> LoadOutcome + Clone,
{
    #[inline]
    fn classify(&self, result: Result<&T, &E>) -> LoadOutcome {
        self(result)
    }
}

/// Classifies HTTP responses by status, without touching the body.
///
/// Errors are failures; so are the statuses the predicate picks (by default
/// 5xx and 429 Too Many Requests, both answers of an endpoint that cannot do
/// the work). A 503 or 429 with a `Retry-After` (delay-seconds or an HTTP date)
/// is [`LoadOutcome::Unavailable`] for that long. Everything else, 4xx
/// included, is a success.
#[derive(Clone, Copy, Debug)]
pub struct HttpFailures {
    failure: fn(StatusCode) -> bool,
}

impl HttpFailures {
    /// 5xx, 429 and errors are failures.
    pub fn new() -> Self {
        HttpFailures {
            failure: |status| status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The statuses `failure` picks, and errors, are failures (a 503 or 429
    /// with `Retry-After` is still [`LoadOutcome::Unavailable`]).
    pub fn failure_if(failure: fn(StatusCode) -> bool) -> Self {
        HttpFailures { failure }
    }
}

impl Default for HttpFailures {
    fn default() -> Self {
        Self::new()
    }
}

impl<B, E> ClassifyLoad<Response<B>, E> for HttpFailures {
    fn classify(&self, result: Result<&Response<B>, &E>) -> LoadOutcome {
        let Ok(response) = result else {
            return LoadOutcome::Failure;
        };
        let status = response.status();
        if matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
        ) {
            if let Some(after) = crate::http::retry_after(response) {
                return LoadOutcome::Unavailable(after);
            }
        }
        if (self.failure)(status) {
            LoadOutcome::Failure
        } else {
            LoadOutcome::Success
        }
    }
}
