//! The instance registry against a real `redis-server`, started by each test
//! on a free loopback port, in real time: the tests assert membership and
//! counts, and wait for them within generous bounds.

mod balance;
mod redis;
mod support;
