//! What a health check does: a closure, or an HTTP GET.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::error::{or_panic, BoxError, ConfigError};

/// The future a [`Probe`] returns.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'static>>;

/// Checks one endpoint once: `Ok` means healthy.
///
/// Implemented by [`HttpProbe`] and by any closure
/// `Fn(SocketAddr) -> impl Future<Output = Result<(), E>>` (`E: Into<BoxError>`),
/// `Send + Sync + 'static`. The checker bounds each probe with its timeout, so
/// a probe need not time itself out.
pub trait Probe: Send + Sync + 'static {
    /// Probes the endpoint at `addr`.
    fn probe(&self, addr: SocketAddr) -> ProbeFuture;
}

impl<F, Fut, E> Probe for F
where
    F: Fn(SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn probe(&self, addr: SocketAddr) -> ProbeFuture {
        let fut = self(addr);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// A probe that sends `GET http://<addr><path>` over a hyper-util client
/// (HTTP/1.1, connections kept alive between probes) and expects a 2xx.
///
/// ```
/// use tower_scale::balance::health::HttpProbe;
///
/// let probe = HttpProbe::get("/healthz");
/// # let _ = probe;
/// ```
#[derive(Clone)]
pub struct HttpProbe {
    client: Client<HttpConnector, EmptyBody>,
    path: PathAndQuery,
    healthy: fn(StatusCode) -> bool,
}

impl HttpProbe {
    /// Probes `path` (with its query, if any), expecting a 2xx.
    ///
    /// # Panics
    ///
    /// If `path` is not a valid path; [`try_get`](Self::try_get) returns the
    /// error instead.
    #[track_caller]
    pub fn get(path: &str) -> Self {
        or_panic("HttpProbe::get", Self::try_get(path))
    }

    /// Like [`get`](Self::get), but returns a [`ConfigError`] naming `path`.
    pub fn try_get(path: &str) -> Result<Self, ConfigError> {
        let path: PathAndQuery = path
            .parse()
            .ok()
            .filter(|p: &PathAndQuery| p.as_str().starts_with('/'))
            .ok_or_else(|| {
                ConfigError::new("path", format!("{path:?} is not a path starting with '/'"))
            })?;
        Ok(HttpProbe {
            client: Client::builder(TokioExecutor::new()).build_http(),
            path,
            healthy: |status| status.is_success(),
        })
    }

    /// Which statuses mean healthy (default: 2xx).
    pub fn healthy_if(mut self, healthy: fn(StatusCode) -> bool) -> Self {
        self.healthy = healthy;
        self
    }
}

/// The most of a probe's response body that is read (so the connection can be
/// kept); a longer body is dropped unread.
const MAX_BODY: usize = 64 * 1024;

impl Probe for HttpProbe {
    fn probe(&self, addr: SocketAddr) -> ProbeFuture {
        let client = self.client.clone();
        let healthy = self.healthy;
        let uri = Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(self.path.clone())
            .build();
        Box::pin(async move {
            let request = Request::get(uri?)
                .header(http::header::USER_AGENT, "tower-scale-health-check")
                .body(EmptyBody)?;
            let response = client.request(request).await?;
            let status = response.status();
            let mut body = response.into_body();
            let mut read = 0;
            while read <= MAX_BODY {
                match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                    Some(Err(err)) => return Err(err.into()),
                    None => break,
                }
            }
            if healthy(status) {
                Ok(())
            } else {
                Err(format!("health check answered {status}").into())
            }
        })
    }
}

impl fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpProbe")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The empty body of a probe request.
#[derive(Clone, Copy, Debug, Default)]
struct EmptyBody;

impl Body for EmptyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(0)
    }
}
