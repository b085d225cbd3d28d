//! HTTP and gRPC classifiers (feature `http`).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::{Call, Classify, Outcome};

/// Classifies HTTP responses by status, without touching the body: by default
/// 5xx and errors are failures, everything else a success.
#[derive(Clone, Copy, Debug)]
pub struct HttpStatus {
    failure: fn(StatusCode) -> bool,
}

impl HttpStatus {
    /// 5xx responses and errors are failures (4xx are the client's fault and
    /// count as successes).
    pub fn server_errors() -> Self {
        HttpStatus {
            failure: |status| status.is_server_error(),
        }
    }

    /// Responses whose status `failure` picks, and errors, are failures.
    pub fn failure_if(failure: fn(StatusCode) -> bool) -> Self {
        HttpStatus { failure }
    }
}

impl Default for HttpStatus {
    fn default() -> Self {
        Self::server_errors()
    }
}

impl<B, E> Classify<Response<B>, E> for HttpStatus {
    type Output = Response<B>;

    fn classify(&self, result: Result<Response<B>, E>, call: Call) -> Result<Response<B>, E> {
        call.record(match &result {
            Ok(response) if (self.failure)(response.status()) => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(_) => Outcome::Failure,
        });
        result
    }
}

/// Classifies gRPC responses by `grpc-status`: from the headers of a
/// Trailers-Only response, else at the end of the body, where the status
/// travels in trailers. A body that ends without a status is a failure
/// (UNKNOWN); a body dropped before its end records nothing.
///
/// By default UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, UNKNOWN and
/// RESOURCE_EXHAUSTED are failures, and so are transport errors.
#[derive(Clone, Copy, Debug)]
pub struct GrpcStatus {
    /// Bit `n` set: code `n` is a failure.
    failures: u32,
}

/// gRPC status codes, as numbers (tonic's `Code` without the dependency).
const UNKNOWN: u32 = 2;
const DEADLINE_EXCEEDED: u32 = 4;
const RESOURCE_EXHAUSTED: u32 = 8;
const INTERNAL: u32 = 13;
const UNAVAILABLE: u32 = 14;

impl GrpcStatus {
    /// The default failure codes: UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED,
    /// UNKNOWN, RESOURCE_EXHAUSTED.
    pub fn new() -> Self {
        Self::with_failure_codes(&[
            UNAVAILABLE,
            INTERNAL,
            DEADLINE_EXCEEDED,
            UNKNOWN,
            RESOURCE_EXHAUSTED,
        ])
    }

    /// Exactly these codes (0 to 16, as in `tonic::Code as u32`) are failures.
    pub fn with_failure_codes(codes: &[u32]) -> Self {
        GrpcStatus {
            failures: codes
                .iter()
                .filter(|c| **c < 32)
                .fold(0, |bits, c| bits | 1 << c),
        }
    }

    /// Exactly these codes are failures (feature `tonic`).
    ///
    /// ```
    /// use tonic::Code;
    /// use tower_scale::breaker::GrpcStatus;
    ///
    /// let classify = GrpcStatus::with_codes([Code::Unavailable, Code::Internal]);
    /// # let _ = classify;
    /// ```
    #[cfg(feature = "tonic")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
    pub fn with_codes(codes: impl IntoIterator<Item = tonic::Code>) -> Self {
        let codes: Vec<u32> = codes.into_iter().map(|c| c as u32).collect();
        Self::with_failure_codes(&codes)
    }

    fn outcome_of(&self, headers: &HeaderMap) -> Option<Outcome> {
        let code = headers.get("grpc-status")?;
        let code: u32 = code.to_str().ok()?.trim().parse().unwrap_or(UNKNOWN);
        Some(if code < 32 && self.failures & (1 << code) != 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        })
    }
}

impl Default for GrpcStatus {
    fn default() -> Self {
        Self::new()
    }
}

impl<B, E> Classify<Response<B>, E> for GrpcStatus {
    type Output = Response<GrpcBody<B>>;

    fn classify(&self, result: Result<Response<B>, E>, call: Call) -> Result<Self::Output, E> {
        match result {
            Ok(response) => {
                let call = match self.outcome_of(response.headers()) {
                    // Trailers-Only: the status is in the headers.
                    Some(outcome) => {
                        call.record(outcome);
                        None
                    }
                    None => Some(call),
                };
                let classifier = *self;
                Ok(response.map(|inner| GrpcBody {
                    inner,
                    call,
                    classifier,
                }))
            }
            Err(err) => {
                call.record(Outcome::Failure);
                Err(err)
            }
        }
    }
}

pin_project! {
    /// A gRPC response body that records the call's outcome when the trailers
    /// (or the end of the body) arrive.
    #[derive(Debug)]
    pub struct GrpcBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
        classifier: GrpcStatus,
    }
}

impl<B: Body> Body for GrpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(call) = this.call.take() {
            let outcome = match &frame {
                Some(Ok(frame)) => match frame.trailers_ref() {
                    Some(trailers) => Some(
                        this.classifier
                            .outcome_of(trailers)
                            .unwrap_or(Outcome::Failure),
                    ),
                    None => None,
                },
                Some(Err(_)) => Some(Outcome::Failure),
                None => Some(Outcome::Failure),
            };
            match outcome {
                Some(outcome) => call.record(outcome),
                None => *this.call = Some(call),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
