//! Slow start for new endpoints.
