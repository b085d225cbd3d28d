//! The automatic heartbeat: an instance reports its figures on an interval.
