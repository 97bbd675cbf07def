//! The pure domain of BOS: typed values, the batch and phase state machines, pipeline resolution and the
//! decisions that drive orchestration. No I/O and no adapter crate types live here; adapters implement `ports`.

pub mod effect;
pub mod ids;
pub mod input;
pub mod model;
pub mod ports;
pub mod rejection;
