//! `IntoResponse` for the health report and readiness (feature `axum`), so a
//! handler can return them.

use axum_core::response::{IntoResponse, Response};

use super::{HealthReport, Readiness};

impl IntoResponse for HealthReport {
    fn into_response(self) -> Response {
        self.to_response().into_response()
    }
}

impl IntoResponse for Readiness {
    fn into_response(self) -> Response {
        self.to_response().into_response()
    }
}
