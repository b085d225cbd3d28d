//! Balancing policies over `tower::ready_cache`.
