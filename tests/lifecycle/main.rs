//! Drain, readiness and retries end to end with real servers and clients on
//! 127.0.0.1, in real time.

#[path = "../http/support.rs"]
#[allow(dead_code)]
mod support;

mod grpc;
mod rolling;
mod serve;
