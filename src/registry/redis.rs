//! The Redis-backed registry (feature `redis`).
