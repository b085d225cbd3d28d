//! The instance registry as a discovery source (features `balance` and `registry`).
