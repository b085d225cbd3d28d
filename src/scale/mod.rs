//! Scaling signals: per-instance snapshots, aggregates and an HPA-style advisor (feature `registry`).
