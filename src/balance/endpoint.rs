//! A ready-made endpoint factory: an HTTP client service for one address,
//! inside the per-endpoint stack of DESIGN.md.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::timeout::Timeout;
use tower::{Layer, Service};

use crate::breaker::{
    BreakerConfig, CircuitBreaker, CircuitBreakerLayer, EjectionBudget, HttpStatus, Window,
};
use crate::discover::Endpoint;
use crate::error::{BoxError, ConfigError};
use crate::limit::{ConcurrencyLimit, ConcurrencyLimitLayer};
use crate::metrics_util::DEFAULT_NAME;

/// The service [`HttpEndpoint::make`] builds for one endpoint, outer to inner:
/// a not-ready circuit breaker (5xx and errors are failures), a concurrency
/// limit, a timeout, and the HTTP connection.
pub type HttpEndpointService<B> =
    CircuitBreaker<ConcurrencyLimit<Timeout<Connection<B>>>, HttpStatus>;

/// Builds HTTP client services for endpoints: one shared hyper-util
/// connection pool, and for each endpoint its own breaker, limit and timeout.
///
/// The per-endpoint stack is `CircuitBreaker(not-ready) → ConcurrencyLimit →
/// Timeout → connection`: an endpoint that keeps failing, or that has as many
/// calls in flight as its limit, is not ready, so a balancer routes around it
/// without dropping it. Give every endpoint's breaker one
/// [`EjectionBudget`](crate::breaker::EjectionBudget) with
/// [`ejection_budget`](HttpEndpointBuilder::ejection_budget) so that a
/// cluster-wide incident does not eject everyone.
///
/// The request's path and query are kept; its scheme and authority become the
/// endpoint's (`http://<addr>`), and a request without a `Host` header gets the
/// authority it was sent to (or the endpoint's address).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use http_body_util::Empty;
/// use bytes::Bytes;
/// use tower::balance::p2c::Balance;
/// use tower::load::{CompleteOnResponse, PendingRequests};
/// use tower_scale::balance::HttpEndpoint;
/// use tower_scale::discover::Static;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let endpoints = HttpEndpoint::<Empty<Bytes>>::builder()
///     .timeout(Duration::from_secs(2))
///     .concurrency_limit(64)
///     .name("backend")
///     .build()?;
/// let addrs: [std::net::SocketAddr; 2] = ["127.0.0.1:8081".parse()?, "127.0.0.1:8082".parse()?];
/// let (discover, handle) = Static::new(addrs, move |endpoint| {
///     PendingRequests::new(endpoints.make(endpoint), CompleteOnResponse::default())
/// });
/// let balance = Balance::new(discover);
/// # let _ = (balance, handle);
/// # Ok(())
/// # }
/// ```
pub struct HttpEndpoint<B> {
    client: Client<HttpConnector, B>,
    config: Arc<Config>,
}

struct Config {
    breaker: BreakerConfig,
    limit: usize,
    timeout: Duration,
    budget: Option<Arc<dyn EjectionBudget>>,
    name: String,
}

impl<B> Clone for HttpEndpoint<B> {
    fn clone(&self) -> Self {
        HttpEndpoint {
            client: self.client.clone(),
            config: self.config.clone(),
        }
    }
}

impl<B> fmt::Debug for HttpEndpoint<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpEndpoint")
            .field("name", &self.config.name)
            .field("limit", &self.config.limit)
            .field("timeout", &self.config.timeout)
            .field("breaker", &self.config.breaker)
            .finish_non_exhaustive()
    }
}

/// Builds an [`HttpEndpoint`]; see its docs.
pub struct HttpEndpointBuilder<B> {
    client: Option<Client<HttpConnector, B>>,
    breaker: Option<BreakerConfig>,
    limit: usize,
    timeout: Duration,
    budget: Option<Arc<dyn EjectionBudget>>,
    name: String,
}

impl<B> fmt::Debug for HttpEndpointBuilder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpEndpointBuilder")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<B> HttpEndpoint<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A builder with the defaults: timeout 10 s, at most 256 calls in flight
    /// per endpoint, and a breaker that opens when half of the last 20 calls
    /// (at least 10) failed, for 5 s, then lets 3 probes through.
    pub fn builder() -> HttpEndpointBuilder<B> {
        HttpEndpointBuilder {
            client: None,
            breaker: None,
            limit: 256,
            timeout: Duration::from_secs(10),
            budget: None,
            name: DEFAULT_NAME.to_owned(),
        }
    }

    /// The service for `endpoint`: its own breaker, limit and timeout over the
    /// shared connection pool. The breaker and limit metrics are named
    /// `<name>/<address>`.
    pub fn make(&self, endpoint: &Endpoint) -> HttpEndpointService<B> {
        let config = &self.config;
        let label = format!("{}/{}", config.name, endpoint.addr());
        let connection = Connection::new(self.client.clone(), endpoint);
        let timeout = Timeout::new(connection, config.timeout);
        let limit = ConcurrencyLimitLayer::new(config.limit)
            .name(label.clone())
            .layer(timeout);
        let mut breaker = CircuitBreakerLayer::new(config.breaker.renamed(label))
            .not_ready()
            .classify(HttpStatus::server_errors());
        if let Some(budget) = &config.budget {
            breaker = breaker.budget(budget.clone());
        }
        breaker.layer(limit)
    }
}

impl<B> HttpEndpointBuilder<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The longest a request may take on one endpoint (default 10 s); a timeout
    /// is a failure for the breaker.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// At most this many calls in flight per endpoint (default 256); an
    /// endpoint at its limit is not ready.
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// The breaker settings of every endpoint (its `name` is replaced by
    /// `<name>/<address>`).
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Some(config);
        self
    }

    /// One budget shared by every endpoint's breaker, capping how many are
    /// open (ejected) at once.
    pub fn ejection_budget(mut self, budget: Arc<dyn EjectionBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The hyper-util client to send through (default: HTTP/1 and HTTP/2 over
    /// plain TCP, pooled).
    pub fn client(mut self, client: Client<HttpConnector, B>) -> Self {
        self.client = Some(client);
        self
    }

    /// The prefix of the metric names of each endpoint's breaker and limit
    /// (default `"default"`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// `timeout` when zero, `concurrency_limit` when zero, and the breaker's
    /// own fields.
    pub fn build(self) -> Result<HttpEndpoint<B>, ConfigError> {
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be more than zero"));
        }
        if self.limit == 0 {
            return Err(ConfigError::new("concurrency_limit", "must be at least 1"));
        }
        let breaker = match self.breaker {
            Some(config) => {
                config.validate()?;
                config
            }
            None => BreakerConfig::builder()
                .window(Window::Count(20))
                .minimum_calls(10)
                .failure_rate(0.5)
                .open_duration(Duration::from_secs(5))
                .half_open_calls(3)
                .build()?,
        };
        let client = self
            .client
            .unwrap_or_else(|| Client::builder(TokioExecutor::new()).build_http());
        Ok(HttpEndpoint {
            client,
            config: Arc::new(Config {
                breaker,
                limit: self.limit,
                timeout: self.timeout,
                budget: self.budget,
                name: self.name,
            }),
        })
    }
}

/// The HTTP connection to one endpoint: sends each request to its address
/// through the shared pool.
pub struct Connection<B> {
    client: Client<HttpConnector, B>,
    authority: Authority,
}

impl<B> Connection<B> {
    fn new(client: Client<HttpConnector, B>, endpoint: &Endpoint) -> Self {
        let authority = Authority::try_from(endpoint.addr().to_string())
            .expect("a socket address is a valid authority");
        Connection { client, authority }
    }
}

impl<B> Clone for Connection<B> {
    fn clone(&self) -> Self {
        Connection {
            client: self.client.clone(),
            authority: self.authority.clone(),
        }
    }
}

impl<B> fmt::Debug for Connection<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("authority", &self.authority)
            .finish()
    }
}

impl<B> Service<Request<B>> for Connection<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool connects inside the call; readiness is the limit's job.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let original = request.uri().authority().cloned();
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        *request.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path are set");
        if !request.headers().contains_key(header::HOST) {
            let host = original.as_ref().unwrap_or(&self.authority);
            if let Ok(value) = HeaderValue::from_str(host.as_str()) {
                request.headers_mut().insert(header::HOST, value);
            }
        }
        Box::pin(self.client.request(request))
    }
}
