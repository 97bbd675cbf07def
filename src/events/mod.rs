//! events adapter.
