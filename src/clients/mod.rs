//! clients adapter.
