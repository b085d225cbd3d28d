//! The snapshot over HTTP: a plain Tower service (feature `http`) and
//! `IntoResponse` for handlers (feature `axum`).

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use http::{header, HeaderValue, Request, Response, StatusCode};
use serde::Serialize;
use tower::Service;

use super::advisor::Recommendation;
use super::snapshot::{Aggregate, ScaleCollector, ScaleMetrics};

/// The scale endpoint: the [`ScaleMetrics`] of the collector (with the
/// advisor's recommendation, if one was attached) as JSON, always 200.
///
/// Made by [`ScaleCollector::service`]; takes any `http::Request<B>`, never
/// fails, and is `Clone`, so axum takes it with `Router::route_service`. See
/// the [module docs](super#serving-the-snapshot).
#[derive(Clone, Debug)]
pub struct ScaleService {
    pub(crate) collector: ScaleCollector,
}

impl<B> Service<Request<B>> for ScaleService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<B>) -> Self::Future {
        ready(Ok(self.collector.collect().to_response()))
    }
}

impl ScaleMetrics {
    /// The snapshot as a 200 JSON response that no cache keeps.
    pub fn to_response(&self) -> Response<String> {
        json_response(self)
    }
}

impl Aggregate {
    /// The aggregate as a 200 JSON response that no cache keeps.
    pub fn to_response(&self) -> Response<String> {
        json_response(self)
    }
}

impl Recommendation {
    /// The recommendation as a 200 JSON response that no cache keeps.
    pub fn to_response(&self) -> Response<String> {
        json_response(self)
    }
}

fn json_response<T: Serialize>(value: &T) -> Response<String> {
    match serde_json::to_string(value) {
        Ok(body) => {
            let mut response = Response::new(body);
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(err) => {
            // Numbers, strings and options: serde_json does not fail on them.
            tracing::error!(error = %err, "cannot serialize the scale metrics");
            let mut response = Response::new(String::new());
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
        }
    }
}

#[cfg(feature = "axum")]
mod axum_impls {
    use axum_core::response::{IntoResponse, Response};

    use super::{Aggregate, Recommendation, ScaleMetrics};

    impl IntoResponse for ScaleMetrics {
        fn into_response(self) -> Response {
            self.to_response().into_response()
        }
    }

    impl IntoResponse for Aggregate {
        fn into_response(self) -> Response {
            self.to_response().into_response()
        }
    }

    impl IntoResponse for Recommendation {
        fn into_response(self) -> Response {
            self.to_response().into_response()
        }
    }
}
