use std::time::Duration;

use chrono::{TimeZone, Utc};
use prost::Message;
use uuid::Uuid;

use super::*;
use crate::core::effect::{BatchEssaysRegistered, OutboundEvent, PhaseCommand, PipelineCompleted};
use crate::core::ids::{
    Attempt, BatchId, ClassId, CorrelationId, CourseCode, EssayId, EventId, Language, OrgId,
    PhaseName, RunId, TextRef, UserId,
};
use crate::core::input::EssayRef;
use crate::core::model::{ClassType, RunStatus};
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;

pub(super) fn batch() -> BatchId {
    BatchId::from_uuid(Uuid::now_v7())
}
pub(super) fn essay() -> EssayId {
    EssayId::from_uuid(Uuid::now_v7())
}
pub(super) fn event_id() -> EventId {
    EventId::from_uuid(Uuid::now_v7())
}
pub(super) fn correlation() -> CorrelationId {
    CorrelationId::from_uuid(Uuid::now_v7())
}
pub(super) fn text(s: &str) -> TextRef {
    TextRef::parse("t", s).unwrap()
}
pub(super) fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn command(phase: PhaseName) -> PhaseCommand {
    PhaseCommand {
        batch_id: batch(),
        correlation_id: correlation(),
        run_id: phase
            .is_pipeline_phase()
            .then(|| RunId::from_uuid(Uuid::now_v7())),
        phase,
        attempt: Attempt::parse("attempt", 2).unwrap(),
        language: Language::Sv,
        course_code: CourseCode::Sv2,
        essays: vec![EssayRef {
            essay_id: essay(),
            text_ref: text("text-1"),
        }],
        class_id: Some(ClassId::parse("class_id", "class-9").unwrap()),
        class_type: ClassType::Regular,
        student_prompt_ref: Some("prompt-1".into()),
        assignment_id: Some("assign-1".into()),
        cj_default_llm_model: Some("model-x".into()),
        cj_default_temperature: Some(0.5),
        owner: UserId::parse("user", "teacher-1").unwrap(),
    }
}

fn check_common(record: &EncodedRecord, event: &OutboundEvent, id: EventId) -> pe::EventEnvelope {
    assert_eq!(record.key, event.batch_id().to_string());
    assert_eq!(record.headers[header::EVENT_ID], id.to_string());
    assert_eq!(record.headers[header::EVENT_TYPE], record.topic);
    assert_eq!(
        record.headers[header::CORRELATION_ID],
        event.correlation_id().to_string()
    );
    assert_eq!(record.headers[header::CONTENT_TYPE], CONTENT_TYPE);
    assert!(TraceContext::parse(&record.headers[header::TRACEPARENT]).is_some());
    let envelope = pe::EventEnvelope::decode(record.payload.as_slice()).unwrap();
    assert_eq!(envelope.event_id, id.to_string());
    assert_eq!(envelope.event_type, record.topic);
    assert_eq!(envelope.source_service, SOURCE_SERVICE);
    assert_eq!(envelope.schema_version, 1);
    assert_eq!(envelope.correlation_id, event.correlation_id().to_string());
    assert_eq!(
        envelope.event_timestamp.as_ref().map(|t| t.seconds),
        Some(now().timestamp())
    );
    assert!(published_topics().contains(&record.topic));
    envelope
}

#[test]
fn registered_round_trips() {
    let e = BatchEssaysRegistered {
        batch_id: batch(),
        correlation_id: correlation(),
        expected_essay_count: 2,
        essay_ids: vec![essay(), essay()],
        course_code: CourseCode::Eng6,
        student_prompt_ref: Some("p".into()),
        user_id: UserId::parse("u", "owner").unwrap(),
        org_id: Some(OrgId::parse("o", "org").unwrap()),
        class_id: None,
    };
    let event = OutboundEvent::BatchEssaysRegistered(e.clone());
    let id = event_id();
    let record = ProtobufEffectEncoder
        .encode_event(&event, id, now())
        .unwrap();
    check_common(&record, &event, id);
    assert!(!record.headers.contains_key(header::PHASE));
    let (_, m) =
        decode_payload::<pe::BatchEssaysRegistered>(&record.topic, Some(&record.payload)).unwrap();
    assert_eq!(m.batch_id, e.batch_id.to_string());
    assert_eq!(m.expected_essay_count, 2);
    assert_eq!(
        m.essay_ids,
        e.essay_ids
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
    assert_eq!(m.course_code, pc::CourseCode::Eng6 as i32);
    assert_eq!(
        (m.user_id.as_str(), m.org_id.as_str(), m.class_id.as_str()),
        ("owner", "org", "")
    );
    assert_eq!(m.student_prompt_ref, "p");
}

#[test]
fn every_phase_command_round_trips_with_phase_and_attempt_headers() {
    for phase in PhaseName::ALL {
        let c = command(phase);
        let event = OutboundEvent::PhaseCommand(c.clone());
        let id = event_id();
        let record = ProtobufEffectEncoder
            .encode_event(&event, id, now())
            .unwrap();
        check_common(&record, &event, id);
        assert_eq!(record.headers[header::PHASE], phase.as_str());
        assert_eq!(record.headers[header::ATTEMPT], "2");
        let topic = record.topic.as_str();
        let payload = Some(record.payload.as_slice());
        let essays = vec![pc::EssayRef {
            essay_id: c.essays[0].essay_id.to_string(),
            text_storage_id: "text-1".into(),
        }];
        let run = c.run_id.map(|r| r.to_string()).unwrap_or_default();
        let (b, p, a, l, e, cc, r) = match phase {
            PhaseName::StudentMatching => {
                let (_, m) =
                    decode_payload::<pe::StudentMatchingInitiateCommand>(topic, payload).unwrap();
                assert_eq!(m.class_id, "class-9");
                (
                    m.batch_id,
                    m.phase,
                    m.attempt,
                    m.language,
                    m.essays_to_process,
                    m.course_code,
                    m.run_id,
                )
            }
            PhaseName::Spellcheck => {
                let (_, m) =
                    decode_payload::<pe::SpellcheckInitiateCommand>(topic, payload).unwrap();
                (
                    m.batch_id,
                    m.phase,
                    m.attempt,
                    m.language,
                    m.essays_to_process,
                    m.course_code,
                    m.run_id,
                )
            }
            PhaseName::Nlp => {
                let (_, m) = decode_payload::<pe::NlpInitiateCommand>(topic, payload).unwrap();
                (
                    m.batch_id,
                    m.phase,
                    m.attempt,
                    m.language,
                    m.essays_to_process,
                    m.course_code,
                    m.run_id,
                )
            }
            PhaseName::CjAssessment => {
                let (_, m) =
                    decode_payload::<pe::CjAssessmentInitiateCommand>(topic, payload).unwrap();
                assert_eq!(m.student_prompt_ref, "prompt-1");
                assert_eq!(m.assignment_id, "assign-1");
                assert_eq!(m.cj_default_llm_model, "model-x");
                assert_eq!(m.cj_default_temperature, Some(0.5));
                assert_eq!(m.class_type, pc::ClassType::Regular as i32);
                (
                    m.batch_id,
                    m.phase,
                    m.attempt,
                    m.language,
                    m.essays_to_process,
                    m.course_code,
                    m.run_id,
                )
            }
            PhaseName::AiFeedback => {
                let (_, m) =
                    decode_payload::<pe::AiFeedbackInitiateCommand>(topic, payload).unwrap();
                assert_eq!(m.owner_user_id, "teacher-1");
                assert_eq!(m.student_prompt_ref, "prompt-1");
                (
                    m.batch_id,
                    m.phase,
                    m.attempt,
                    m.language,
                    m.essays_to_process,
                    m.course_code,
                    m.run_id,
                )
            }
        };
        assert_eq!(b, c.batch_id.to_string());
        assert_eq!(p, phase_to_proto(phase) as i32);
        assert_eq!(phase_from_proto(p), Some(phase));
        assert_eq!(a, 2);
        assert_eq!(l, pc::Language::Sv as i32);
        assert_eq!(e, essays);
        assert_eq!(cc, pc::CourseCode::Sv2 as i32);
        assert_eq!(r, run);
    }
}

#[test]
fn pipeline_completed_round_trips() {
    let c = PipelineCompleted {
        batch_id: batch(),
        correlation_id: correlation(),
        run_id: RunId::from_uuid(Uuid::now_v7()),
        completed_phases: vec![PhaseName::Spellcheck, PhaseName::Nlp],
        final_status: RunStatus::CompletedWithFailures,
        processing_duration: Duration::from_millis(1500),
        successful_essay_count: 3,
        failed_essay_count: 1,
    };
    let event = OutboundEvent::PipelineCompleted(c.clone());
    let id = event_id();
    let record = ProtobufEffectEncoder
        .encode_event(&event, id, now())
        .unwrap();
    check_common(&record, &event, id);
    let (_, m) =
        decode_payload::<pe::BatchPipelineCompleted>(&record.topic, Some(&record.payload)).unwrap();
    assert_eq!(m.run_id, c.run_id.to_string());
    assert_eq!(
        m.completed_phases,
        vec![pc::PhaseName::Spellcheck as i32, pc::PhaseName::Nlp as i32]
    );
    assert_eq!(
        m.final_status,
        pc::PipelineRunStatus::CompletedWithFailures as i32
    );
    assert_eq!(
        m.processing_duration.map(|d| (d.seconds, d.nanos)),
        Some((1, 500_000_000))
    );
    assert_eq!((m.successful_essay_count, m.failed_essay_count), (3, 1));
    assert_eq!(m.correlation_id, c.correlation_id.to_string());
}

#[tokio::test]
async fn encoding_inside_a_consumed_trace_continues_it() {
    let parent = TraceContext::new_root();
    let event = OutboundEvent::PhaseCommand(command(PhaseName::Spellcheck));
    let record = with_trace(parent, async {
        ProtobufEffectEncoder.encode_event(&event, event_id(), now())
    })
    .await
    .unwrap();
    let child = TraceContext::parse(&record.headers[header::TRACEPARENT]).unwrap();
    assert_eq!(child.trace_id, parent.trace_id);
    assert_ne!(child.span_id, parent.span_id);
    let outside = ProtobufEffectEncoder
        .encode_event(&event, event_id(), now())
        .unwrap();
    assert_ne!(
        TraceContext::parse(&outside.headers[header::TRACEPARENT])
            .unwrap()
            .trace_id,
        parent.trace_id
    );
}

#[test]
fn traceparent_parses_and_rejects_garbage() {
    let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let t = TraceContext::parse(header).unwrap();
    assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(t.to_header(), header);
    for bad in [
        "",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
    ] {
        assert_eq!(TraceContext::parse(bad), None, "{bad}");
    }
}
