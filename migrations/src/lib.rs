//! Schema migrations for BOS, run by `bos migrate` and at start-up of `bos serve`.

pub use sea_orm_migration::prelude::*;

mod m20261204_000001_initial;
mod m20261204_000002_outbox_unpublished;
mod m20261204_000003_hot_updates;

/// The values each enum column accepts (its CHECK constraint), for the test that compares them with the core.
pub mod enum_values {
    pub use super::m20261204_000001_initial::{
        BATCH_STATUSES, COURSE_CODES, ESSAY_STATUSES, PHASE_NAMES, PHASE_STATUSES, RUN_STATUSES,
    };
}

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261204_000001_initial::Migration),
            Box::new(m20261204_000002_outbox_unpublished::Migration),
            Box::new(m20261204_000003_hot_updates::Migration),
        ]
    }
}
