//! notify adapter.
