//! Clients of other services, each behind a core port, with timeouts, retry and a circuit breaker.

pub mod bcs;
