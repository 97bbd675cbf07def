//! The schema and the code cannot drift (defect 19): every enum column's CHECK lists exactly the core's names,
//! which are the protobuf enum value names without their prefix; and the database enforces the CHECKs.

mod support;

use bos::core::ids::{CourseCode, PhaseName};
use bos::core::model::{BatchStatus, EssayStatus, PhaseStatus, RunStatus};
use migration::enum_values;
use sea_orm::{ConnectionTrait, Statement};
use support::{Backend, TestDb};

/// The value names of a protobuf enum, without the `<ENUM>_` prefix and without UNSPECIFIED.
fn proto_names(full_name: &str, prefix: &str) -> Vec<String> {
    let pool = bos::proto::descriptor_pool();
    let descriptor = pool
        .get_enum_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is in the descriptors"));
    descriptor
        .values()
        .map(|v| {
            v.name()
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{} has prefix {prefix}", v.name()))
                .to_owned()
        })
        .filter(|n| n != "UNSPECIFIED")
        .collect()
}

fn owned(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

#[test]
fn enum_checks_equal_the_core_and_protobuf_names() {
    let core_batch: Vec<_> = BatchStatus::ALL
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert_eq!(owned(enum_values::BATCH_STATUSES), core_batch);
    assert_eq!(
        proto_names("huleedu.common.v1.BatchStatus", "BATCH_STATUS_"),
        core_batch
    );

    let core_phase_status: Vec<_> = PhaseStatus::ALL
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert_eq!(owned(enum_values::PHASE_STATUSES), core_phase_status);
    assert_eq!(
        proto_names(
            "huleedu.common.v1.PipelineExecutionStatus",
            "PIPELINE_EXECUTION_STATUS_"
        ),
        core_phase_status
    );

    let core_run: Vec<_> = RunStatus::ALL
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert_eq!(owned(enum_values::RUN_STATUSES), core_run);
    assert_eq!(
        proto_names(
            "huleedu.common.v1.PipelineRunStatus",
            "PIPELINE_RUN_STATUS_"
        ),
        core_run
    );

    let core_courses: Vec<_> = CourseCode::ALL
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    assert_eq!(owned(enum_values::COURSE_CODES), core_courses);
    assert_eq!(
        proto_names("huleedu.common.v1.CourseCode", "COURSE_CODE_"),
        core_courses
    );

    // Phase names are stored lower-case (the core's stable names); protobuf spells them upper-case.
    let core_phases: Vec<_> = PhaseName::ALL
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    assert_eq!(owned(enum_values::PHASE_NAMES), core_phases);
    let proto_phases: Vec<_> = proto_names("huleedu.common.v1.PhaseName", "PHASE_NAME_")
        .into_iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    assert_eq!(proto_phases, core_phases);

    // Essay status is internal: no protobuf enum, the core is the reference.
    let core_essays: Vec<_> = EssayStatus::ALL
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert_eq!(owned(enum_values::ESSAY_STATUSES), core_essays);
}

fn insert_batch(backend: Backend, status: &str, course: &str) -> String {
    let id = match backend {
        Backend::Postgres => format!("'{}'::uuid", uuid::Uuid::now_v7()),
        // SQLite stores UUIDs as 16-byte blobs.
        Backend::Sqlite => format!("x'{}'", uuid::Uuid::now_v7().simple()),
    };
    format!(
        "INSERT INTO batches (id, owner_user_id, course_code, expected_essay_count, status, correlation_id, \
         essays_ready_pending, created_at, updated_at, version) VALUES ({id}, 'u', '{course}', 1, '{status}', {id}, \
         false, '2026-12-04T10:00:00+00:00', '2026-12-04T10:00:00+00:00', 0)"
    )
}

async fn the_database_enforces_the_checks(db: &TestDb) {
    let store = db.store().await;
    // Migrating twice is a no-op.
    store.migrate().await.unwrap();
    let conn = store.connection();
    let run = |sql: String| {
        let stmt = Statement::from_string(store.backend(), sql);
        async move { conn.execute_raw(stmt).await }
    };
    for status in BatchStatus::ALL {
        run(insert_batch(db.backend, status.as_str(), "ENG5"))
            .await
            .unwrap();
    }
    let err = run(insert_batch(db.backend, "READY", "ENG5"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ck_batches_status"), "{err}");
    let err = run(insert_batch(db.backend, "CANCELLED", "ENG8"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ck_batches_course_code"), "{err}");
}
on_both_backends!(checks_are_enforced, the_database_enforces_the_checks);

#[tokio::test]
async fn an_in_memory_sqlite_store_migrates_and_round_trips() {
    use bos::core::ports::BatchRepository;
    use std::sync::Arc;
    let store = bos::store::Store::connect("sqlite::memory:")
        .await
        .unwrap()
        .with_encoder(Arc::new(support::TestEncoder));
    store.migrate().await.unwrap();
    let new = support::fixtures::new_batch("teacher-1", 3, false);
    store
        .apply(support::fixtures::register(&new), chrono::Utc::now())
        .await
        .unwrap();
    let stored = store.load(new.batch_id).await.unwrap().unwrap();
    assert_eq!(stored.essays.len(), 3);
    assert!(bos::store::Store::connect("mysql://nope").await.is_err());
}
