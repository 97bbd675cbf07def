//! The API adapter: gRPC services, HTTP/JSON, health, metrics, all on one port.

pub mod auth;
pub mod auth_cache;
pub mod batch_service;
pub mod errors;
pub mod health;
pub mod internal_service;
pub mod metrics;
pub mod openapi;
pub mod probes;
pub mod server;
pub mod stack;
pub mod telemetry;
pub mod transcode;
pub mod views;
