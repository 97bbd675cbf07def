//! What the consuming-side tests check of what was published and stored: every record against its outbox row,
//! and a batch's state without ids and timestamps (its shape), so batches driven differently can be compared.

use std::collections::{BTreeMap, HashMap, HashSet};

use bos::core::ids::{BatchId, EssayId, PhaseName};
use bos::core::model::{BatchAggregate, BatchStatus};
use bos::events::codec::{decode_payload, header, topic_for};
use bos::proto::huleedu::common::v1 as pc;
use bos::proto::huleedu::events::v1 as pe;
use bos::store::entities::event_outbox;
use prost::Message;
use uuid::Uuid;

use crate::support::kafka::ReadRecord;

/// (phase, attempt, essays) of a phase command record.
pub fn command_of(record: &ReadRecord) -> Option<(i32, i32, Vec<pc::EssayRef>)> {
    let (topic, payload) = (record.topic.as_str(), Some(record.payload.as_slice()));
    macro_rules! try_command {
        ($($ty:ty),*) => {$(
            if Some(topic.to_owned()) == topic_for::<$ty>() {
                let (_, m) = decode_payload::<$ty>(topic, payload).ok()?;
                return Some((m.phase, m.attempt, m.essays_to_process));
            }
        )*};
    }
    try_command!(
        pe::StudentMatchingInitiateCommand,
        pe::SpellcheckInitiateCommand,
        pe::NlpInitiateCommand,
        pe::CjAssessmentInitiateCommand,
        pe::AiFeedbackInitiateCommand
    );
    None
}

/// Every record is keyed by the batch, carries the event id of its outbox row (published, same topic and key)
/// in its headers and envelope, no event id or (phase, attempt) command appears twice, and each topic's records
/// are in outbox order.
pub fn check_published(
    batch_id: BatchId,
    records: &[ReadRecord],
    outbox: &HashMap<Uuid, event_outbox::Model>,
) {
    let mut ids = HashSet::new();
    let mut commands = HashSet::new();
    let mut last_row_per_topic: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for record in records {
        assert_eq!(
            record.key.as_deref(),
            Some(batch_id.to_string().as_str()),
            "keyed by batch id"
        );
        let event_id = record.header(header::EVENT_ID).expect("event_id header");
        assert!(
            ids.insert(event_id.to_owned()),
            "event {event_id} published twice"
        );
        let envelope = pe::EventEnvelope::decode(record.payload.as_slice()).expect("an envelope");
        assert_eq!(envelope.event_id, event_id);
        assert_eq!(
            record.header(header::EVENT_TYPE),
            Some(record.topic.as_str())
        );
        let row = outbox
            .get(&Uuid::parse_str(event_id).expect("uuid"))
            .unwrap_or_else(|| panic!("no outbox row for {event_id}"));
        assert_eq!(
            (row.topic.as_str(), row.message_key.as_str()),
            (
                record.topic.as_str(),
                record.key.as_deref().unwrap_or_default()
            )
        );
        assert!(row.published_at.is_some());
        if let Some((phase, attempt, _)) = command_of(record) {
            assert!(
                commands.insert((phase, attempt)),
                "two commands for phase {phase} attempt {attempt}"
            );
            assert_eq!(
                record.header(header::ATTEMPT),
                Some(attempt.to_string().as_str())
            );
        }
        if let Some((row_id, offset)) =
            last_row_per_topic.insert(&record.topic, (row.id, record.offset))
        {
            assert!(
                row_id < row.id && offset < record.offset,
                "out of order on {}",
                record.topic
            );
        }
    }
}

/// A batch's state without ids and timestamps, so batches driven differently can be compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub status: BatchStatus,
    pub essays_ready_pending: bool,
    pub essays: Vec<(usize, String, Option<String>, Option<String>)>,
    pub results: Vec<(usize, PhaseName, u32, bool, Option<String>)>,
    pub runs: Vec<RunShape>,
}

/// (phase, status, attempt, (total, succeeded, failed), error).
pub type PhaseShape = (PhaseName, String, u32, (u32, u32, u32), Option<String>);

#[derive(Debug, Clone, PartialEq)]
pub struct RunShape {
    pub requested: PhaseName,
    pub is_retry: bool,
    pub status: String,
    pub counts: (u32, u32),
    pub phases: Vec<PhaseShape>,
}

pub fn shape(agg: &BatchAggregate, essays: &[EssayId]) -> Shape {
    let index = |id: &EssayId| {
        essays
            .iter()
            .position(|e| e == id)
            .expect("essay of the batch")
    };
    let mut essay_rows: Vec<_> = agg
        .essays
        .iter()
        .map(|e| {
            (
                index(&e.id),
                e.status.as_str().to_owned(),
                e.text_ref.as_ref().map(ToString::to_string),
                e.student_id.clone(),
            )
        })
        .collect();
    essay_rows.sort_by_key(|row| row.0);
    let mut results: Vec<_> = agg
        .results
        .iter()
        .map(|r| {
            (
                index(&r.essay_id),
                r.phase,
                r.attempt.get(),
                r.succeeded,
                r.output_ref.as_ref().map(ToString::to_string),
            )
        })
        .collect();
    results.sort_by_key(|r| (r.0, r.1, r.2));
    Shape {
        status: agg.batch.status,
        essays_ready_pending: agg.batch.essays_ready_pending,
        essays: essay_rows,
        results,
        runs: agg
            .runs
            .iter()
            .map(|run| RunShape {
                requested: run.requested_pipeline,
                is_retry: run.is_retry,
                status: run.status.as_str().to_owned(),
                counts: (run.successful_essay_count, run.failed_essay_count),
                phases: run
                    .phases
                    .iter()
                    .map(|p| {
                        (
                            p.phase,
                            p.status.as_str().to_owned(),
                            p.attempt.get(),
                            (p.essays_total, p.essays_succeeded, p.essays_failed),
                            p.error.clone(),
                        )
                    })
                    .collect(),
            })
            .collect(),
    }
}
