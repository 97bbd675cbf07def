//! api adapter.
