//! DNS discovery (feature `dns`).
