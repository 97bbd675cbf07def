//! notify adapter.
pub mod redis;
