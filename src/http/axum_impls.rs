//! `IntoResponse` for the rejection types (feature `axum`), for handlers and
//! `HandleErrorLayer` functions that return them.

use axum_core::response::{IntoResponse, Response};
use http::{header, HeaderValue};

use super::{Rejection, REJECTED_HEADER};
use crate::error::{QueueFull, QueueTimeout};

fn refused(reason: &'static str) -> Response {
    let rejection = Rejection::Refused(reason);
    (
        rejection.status(),
        [
            (header::RETRY_AFTER, HeaderValue::from_static("1")),
            (REJECTED_HEADER, HeaderValue::from_static(reason)),
        ],
    )
        .into_response()
}

impl IntoResponse for QueueFull {
    fn into_response(self) -> Response {
        refused("queue_full")
    }
}

impl IntoResponse for crate::error::CircuitOpen {
    fn into_response(self) -> Response {
        let mut response = refused("circuit_open");
        if let Some(after) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, super::retry_after_value(after));
        }
        response
    }
}

/// 503 with the `draining` marker and no `Retry-After`. Without the request's
/// version at hand it cannot add `Connection: close`; `ErrorResponseLayer` does
/// (on HTTP/1.x).
impl IntoResponse for crate::error::Draining {
    fn into_response(self) -> Response {
        (
            Rejection::Refused("draining").status(),
            [(REJECTED_HEADER, HeaderValue::from_static("draining"))],
        )
            .into_response()
    }
}

impl IntoResponse for QueueTimeout {
    fn into_response(self) -> Response {
        refused("queue_timeout")
    }
}

/// Maps any error the way [`ErrorResponseLayer`](super::ErrorResponseLayer)
/// does, for use in an axum `HandleErrorLayer` (tower's `Overloaded` is not
/// ours, so it cannot implement `IntoResponse` itself):
///
/// ```
/// use axum::{error_handling::HandleErrorLayer, routing::get, Router};
/// use tower::ServiceBuilder;
/// use tower_scale::{http::into_response, limit::ConcurrencyLimitLayer, shed::LoadShedLayer};
///
/// let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
///     ServiceBuilder::new()
///         .layer(HandleErrorLayer::new(|err: tower::BoxError| async move { into_response(err) }))
///         .layer(LoadShedLayer::new())
///         .layer(ConcurrencyLimitLayer::new(8)),
/// );
/// # let _ = app;
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub fn into_response(err: crate::BoxError) -> Response {
    if let Some(open) = super::find::<crate::error::CircuitOpen>(err.as_ref()) {
        return crate::error::CircuitOpen::new(open.retry_after()).into_response();
    }
    match Rejection::of(err.as_ref()) {
        // Wrapped by an application error: maybe not before any work.
        Rejection::Refused(_) if !Rejection::is_refusal_itself(err.as_ref()) => {
            Rejection::Refused("").status().into_response()
        }
        Rejection::Refused("draining") => crate::error::Draining::new().into_response(),
        Rejection::Refused(reason) => refused(reason),
        rejection => {
            if rejection == Rejection::Internal {
                tracing::error!(error = %err, "service error answered with 500");
            }
            rejection.status().into_response()
        }
    }
}
