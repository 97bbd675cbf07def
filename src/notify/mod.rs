//! notify adapter.

pub mod feed;
pub mod redis;
