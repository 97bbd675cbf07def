//! SeaORM entities, one per table of `migrations/` (m20261204_000001_initial). They are row shapes only; the
//! conversion to and from the core's model lives in `mapping`.

pub mod batches {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "batches")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub owner_user_id: String,
        pub org_id: Option<String>,
        pub class_id: Option<String>,
        pub course_code: String,
        pub expected_essay_count: i32,
        pub student_prompt_ref: Option<String>,
        pub assignment_id: Option<String>,
        pub cj_default_llm_model: Option<String>,
        pub cj_default_temperature: Option<f64>,
        pub status: String,
        pub correlation_id: Uuid,
        pub essays_ready_pending: bool,
        pub status_reason: Option<String>,
        pub created_at: DateTimeUtc,
        pub updated_at: DateTimeUtc,
        pub version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod batch_essays {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "batch_essays")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub batch_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub essay_id: Uuid,
        pub position: i32,
        pub text_ref: Option<String>,
        pub student_id: Option<String>,
        pub status: String,
        pub validation_error: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod pipeline_runs {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "pipeline_runs")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub batch_id: Uuid,
        pub seq: i32,
        pub requested_pipeline: String,
        pub is_retry: bool,
        pub status: String,
        pub correlation_id: Uuid,
        pub started_at: DateTimeUtc,
        pub ended_at: Option<DateTimeUtc>,
        pub successful_essay_count: i32,
        pub failed_essay_count: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod phase_executions {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "phase_executions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub run_id: Uuid,
        pub batch_id: Uuid,
        pub phase: String,
        pub position: i32,
        pub status: String,
        pub attempt: i32,
        pub depends_on: String,
        pub essays_total: i32,
        pub essays_succeeded: i32,
        pub essays_failed: i32,
        pub dispatched_at: Option<DateTimeUtc>,
        pub completed_at: Option<DateTimeUtc>,
        pub error: Option<String>,
        pub version: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod essay_phase_results {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "essay_phase_results")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub batch_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub essay_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub phase: String,
        pub run_id: Uuid,
        pub attempt: i32,
        pub succeeded: bool,
        pub output_ref: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod processed_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "processed_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub event_id: Uuid,
        pub topic: String,
        pub processed_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod event_outbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "event_outbox")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub event_id: Uuid,
        pub topic: String,
        pub message_key: String,
        pub payload: Vec<u8>,
        /// A JSON object of string to string: transport metadata, not state.
        pub headers: String,
        pub created_at: DateTimeUtc,
        pub published_at: Option<DateTimeUtc>,
        pub attempts: i32,
        pub next_attempt_at: DateTimeUtc,
        pub last_error: Option<String>,
        pub parked: bool,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
