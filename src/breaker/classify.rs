//! Deciding what counts as a failure.

use super::{Call, Outcome};

/// Decides whether a call succeeded, failed or tells nothing, and records it.
///
/// `classify` gets the result and the admitted [`Call`]; it records the
/// outcome now, or hands the `Call` on (in the response body, say) to record it
/// later. Dropping the `Call` unrecorded records nothing.
pub trait Classify<T, E>: Clone {
    /// The response type after classification (the body may be wrapped).
    type Output;

    /// Classifies `result` and records it on `call`.
    fn classify(&self, result: Result<T, E>, call: Call) -> Result<Self::Output, E>;
}

/// Every `Err` is a failure, every `Ok` a success (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorsAreFailures {
    _p: (),
}

impl<T, E> Classify<T, E> for ErrorsAreFailures {
    type Output = T;

    #[inline]
    fn classify(&self, result: Result<T, E>, call: Call) -> Result<T, E> {
        call.record(if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        });
        result
    }
}

/// A closure as a classifier: it sees the result and returns the outcome.
///
/// ```
/// use tower_scale::breaker::{ClassifyFn, Outcome};
///
/// // Timeouts tell nothing about the endpoint; other errors are failures.
/// let classify = ClassifyFn::new(|result: &Result<u32, tower_scale::BoxError>| match result {
///     Ok(_) => Outcome::Success,
///     Err(e) if e.is::<tower::timeout::error::Elapsed>() => Outcome::Ignored,
///     Err(_) => Outcome::Failure,
/// });
/// # let _ = classify;
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ClassifyFn<F> {
    f: F,
}

impl<F> ClassifyFn<F> {
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        ClassifyFn { f }
    }
}

impl<T, E, F> Classify<T, E> for ClassifyFn<F>
where
    F: Fn(&Result<T, E>) -> Outcome + Clone,
{
    type Output = T;

    fn classify(&self, result: Result<T, E>, call: Call) -> Result<T, E> {
        call.record((self.f)(&result));
        result
    }
}
