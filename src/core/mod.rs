//! The pure domain of BOS: typed values, the batch and phase state machines, pipeline resolution and the
//! decisions that drive orchestration. No I/O and no adapter crate types live here; adapters implement `ports`.

pub mod effect;
pub mod graph;
pub mod ids;
pub mod initiators;
pub mod input;
pub mod machine;
pub mod model;
pub mod orchestrator;
pub mod ports;
pub mod progress;
pub mod registration;
pub mod rejection;
pub mod run;

pub use machine::{decide, Decision};
pub use run::settled;

#[cfg(test)]
mod machine_table_tests;
#[cfg(test)]
mod orchestrator_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod scenario_tests;
#[cfg(test)]
mod test_support;
