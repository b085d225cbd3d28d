//! Failure-aware load.
