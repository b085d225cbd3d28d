//! Active health checks per endpoint.
