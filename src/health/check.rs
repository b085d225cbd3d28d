//! One registered check: its settings, its last result, and one run of it
//! (cut by its timeout, panics caught).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::BoxError;

/// A check's future, its error already rendered as text.
pub(crate) type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// What the application registered, type-erased.
pub(crate) type CheckFn = Box<dyn Fn() -> CheckFuture + Send + Sync>;

/// Wraps the application's closure: its future's output is mapped to
/// `Result<(), String>` inside the future, so a panicking `Display` is caught
/// with the rest of the run.
pub(crate) fn erase<F, Fut, T, E>(check: F) -> CheckFn
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
    E: Into<BoxError>,
{
    Box::new(move || {
        let fut = check();
        Box::pin(async move {
            match fut.await {
                Ok(_) => Ok(()),
                Err(err) => Err(render(err.into())),
            }
        })
    })
}

/// The error and its `source()` chain, joined with `": "`; a source whose text
/// the message already holds is not repeated.
pub(crate) fn render(err: BoxError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let more = err.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = err.source();
    }
    text
}

pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) critical: bool,
    pub(crate) timeout: Duration,
    run: CheckFn,
    state: Mutex<State>,
}

/// Where a check stands; `Pending` until its first run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Standing {
    Pending,
    Pass,
    Fail,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) last: Option<Outcome>,
    pub(crate) consecutive_failures: u32,
}

impl State {
    pub(crate) fn standing(&self) -> Standing {
        match &self.last {
            None => Standing::Pending,
            Some(Outcome { error: None, .. }) => Standing::Pass,
            Some(_) => Standing::Fail,
        }
    }
}

/// The end of the last run.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    /// `None` when the run passed.
    pub(crate) error: Option<String>,
    pub(crate) latency: Duration,
    pub(crate) finished_at: Instant,
}

impl Check {
    pub(crate) fn new(name: String, critical: bool, timeout: Duration, run: CheckFn) -> Self {
        Check {
            name,
            critical,
            timeout,
            run,
            state: Mutex::new(State::default()),
        }
    }

    /// The state, even if a reader panicked while holding the lock (nothing
    /// here can be left half-written).
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs the check once: its error, `"timed out after .."` when it did not
    /// finish within its timeout (the future is dropped there), or
    /// `"panicked: .."` when the closure or the future panicked.
    pub(crate) async fn run_once(&self) -> Result<(), String> {
        let fut = match catch_unwind(AssertUnwindSafe(|| (self.run)())) {
            Ok(fut) => fut,
            Err(payload) => return Err(panicked(payload)),
        };
        match tokio::time::timeout(self.timeout, CatchUnwind(fut)).await {
            Ok(Ok(result)) => result,
            Ok(Err(payload)) => Err(panicked(payload)),
            Err(_elapsed) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .field("critical", &self.critical)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn panicked(payload: Box<dyn Any + Send>) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    match message {
        Some(message) => format!("panicked: {message}"),
        None => "panicked".to_owned(),
    }
}

/// Polls the check's future inside `catch_unwind`: a panic ends the run with
/// its payload, and the future is never polled again.
struct CatchUnwind(CheckFuture);

impl Future for CatchUnwind {
    type Output = Result<Result<(), String>, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}
