//! BOS, the Batch Orchestrator Service.
//!
//! `core` is the pure domain; every other module is an adapter that depends on it, never the other way round.

pub mod api;
pub mod app;
pub mod bench;
pub mod clients;
pub mod config;
pub mod core;
pub mod events;
pub mod notify;
pub mod proto;
pub mod sim;
pub mod store;
