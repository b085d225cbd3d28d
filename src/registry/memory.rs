//! The in-memory registry, for tests and a single process.
