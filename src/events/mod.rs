//! events adapter.
pub mod broker;
