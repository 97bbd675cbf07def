use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use prost::{Message, Name};
use uuid::Uuid;

use super::*;
use crate::core::effect::{BatchEssaysRegistered, OutboundEvent, PhaseCommand, PipelineCompleted};
use crate::core::ids::{
    Attempt, BatchId, ClassId, CorrelationId, CourseCode, EssayId, EventId, Language, OrgId,
    PhaseName, RunId, TextRef, UserId,
};
use crate::core::input::{Actor, EssayRef, Input, ReportedPhaseStatus};
use crate::core::model::{ClassType, RunStatus};
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;

fn batch() -> BatchId {
    BatchId::from_uuid(Uuid::now_v7())
}
fn essay() -> EssayId {
    EssayId::from_uuid(Uuid::now_v7())
}
fn event_id() -> EventId {
    EventId::from_uuid(Uuid::now_v7())
}
fn correlation() -> CorrelationId {
    CorrelationId::from_uuid(Uuid::now_v7())
}
fn text(s: &str) -> TextRef {
    TextRef::parse("t", s).unwrap()
}
fn now() -> chrono::DateTime<Utc> {
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

// ---- consumed side ----

fn meta() -> EnvelopeMeta {
    EnvelopeMeta {
        event_id: event_id(),
        correlation_id: correlation(),
        timestamp: now(),
        trace: TraceContext::new_root(),
    }
}

fn decode_record(record: &EncodedRecord) -> Result<DecodedEvent, DecodeError> {
    decode(
        &record.topic,
        Some(record.key.as_bytes()),
        Some(&record.payload),
        &record.headers,
    )
}

fn consumed<M: Message + Name>(m: &M, batch_id: BatchId) -> (EncodedRecord, EnvelopeMeta) {
    let meta = meta();
    (
        encode_message(m, &batch_id.to_string(), &meta).unwrap(),
        meta,
    )
}

fn refs(essays: &[(EssayId, &str)]) -> Vec<pc::EssayRef> {
    essays
        .iter()
        .map(|(id, t)| pc::EssayRef {
            essay_id: id.to_string(),
            text_storage_id: (*t).into(),
        })
        .collect()
}

#[test]
fn every_consumed_topic_decodes_to_its_input() {
    let b = batch();
    let (e1, e2) = (essay(), essay());
    let essay_pairs = [(e1, "t1"), (e2, "t2")];
    let core_refs = vec![
        EssayRef {
            essay_id: e1,
            text_ref: text("t1"),
        },
        EssayRef {
            essay_id: e2,
            text_ref: text("t2"),
        },
    ];
    let cases: Vec<(EncodedRecord, EnvelopeMeta, ConsumedEvent)> = vec![
        {
            let m = pe::BatchContentProvisioningCompleted {
                batch_id: b.to_string(),
                provisioned_count: 2,
                expected_count: 2,
                course_code: pc::CourseCode::Eng5 as i32,
                user_id: "u".into(),
                essays_for_processing: refs(&essay_pairs),
            };
            let (r, meta) = consumed(&m, b);
            let want = Input::ContentProvisioned {
                essays: core_refs.clone(),
                provisioned_count: 2,
                expected_count: 2,
            };
            (r, meta, ConsumedEvent::Input(want))
        },
        {
            let m = pe::StudentAssociationsConfirmed {
                batch_id: b.to_string(),
                class_id: "c".into(),
                course_code: pc::CourseCode::Eng5 as i32,
                associations: vec![pe::student_associations_confirmed::StudentAssociation {
                    essay_id: e1.to_string(),
                    student_id: "s1".into(),
                    ..Default::default()
                }],
                timeout_triggered: true,
            };
            let (r, meta) = consumed(&m, b);
            let want = Input::StudentAssociationsConfirmed {
                associations: vec![crate::core::input::StudentAssociation {
                    essay_id: e1,
                    student_id: "s1".into(),
                }],
                timeout_triggered: true,
            };
            (r, meta, ConsumedEvent::Input(want))
        },
        {
            let m = pe::BatchEssaysReady {
                batch_id: b.to_string(),
                ready_essays: refs(&essay_pairs),
                course_code: pc::CourseCode::Eng5 as i32,
                class_type: pc::ClassType::Guest as i32,
            };
            let (r, meta) = consumed(&m, b);
            let want = Input::EssaysReady {
                essays: core_refs.clone(),
                class_type: Some(ClassType::Guest),
            };
            (r, meta, ConsumedEvent::Input(want))
        },
        {
            let m = pe::ClientBatchPipelineRequest {
                batch_id: b.to_string(),
                requested_pipeline: pc::PhaseName::CjAssessment as i32,
                user_id: "teacher".into(),
                is_retry: false,
                retry_reason: String::new(),
                prompt_ref: "prompt".into(),
            };
            let (r, meta) = consumed(&m, b);
            let want = PipelineRequest {
                actor: Actor::User(UserId::parse("u", "teacher").unwrap()),
                requested: PhaseName::CjAssessment,
                is_retry: false,
                reason: None,
                prompt_ref: Some("prompt".into()),
            };
            (r, meta, ConsumedEvent::PipelineRequest(want))
        },
        {
            let m = pe::BatchPhaseOutcome {
                batch_id: b.to_string(),
                phase: pc::PhaseName::Spellcheck as i32,
                phase_status: pc::PhaseOutcomeStatus::CompletedWithFailures as i32,
                processed_essays: vec![pe::batch_phase_outcome::ProcessedEssay {
                    essay_id: e1.to_string(),
                    output_text_storage_id: "out-1".into(),
                }],
                failed_essay_ids: vec![e2.to_string()],
                attempt: 3,
            };
            let (r, meta) = consumed(&m, b);
            let want = Input::PhaseOutcome {
                phase: PhaseName::Spellcheck,
                attempt: Attempt::parse("a", 3).unwrap(),
                status: ReportedPhaseStatus::CompletedWithFailures,
                processed: vec![crate::core::input::ProcessedEssay {
                    essay_id: e1,
                    output_ref: Some(text("out-1")),
                }],
                failed: vec![e2],
            };
            (r, meta, ConsumedEvent::Input(want))
        },
        {
            let m = pe::BatchValidationErrors {
                batch_id: b.to_string(),
                failed_essays: vec![pe::batch_validation_errors::FailedEssay {
                    essay_id: e2.to_string(),
                    file_name: "a.docx".into(),
                    error_detail: "empty".into(),
                }],
                critical_failure: true,
            };
            let (r, meta) = consumed(&m, b);
            let want = Input::ValidationErrors {
                failed: vec![crate::core::input::FailedEssay {
                    essay_id: e2,
                    error: "a.docx: empty".into(),
                }],
                critical: true,
            };
            (r, meta, ConsumedEvent::Input(want))
        },
    ];
    let mut topics: Vec<String> = cases.iter().map(|(r, _, _)| r.topic.clone()).collect();
    topics.sort();
    let mut expected = consumed_topics();
    expected.sort();
    assert_eq!(topics, expected, "one case per consumed topic");
    for (record, meta, want) in cases {
        let got = decode_record(&record).unwrap();
        assert_eq!(got.event_id, meta.event_id);
        assert_eq!(got.topic, record.topic);
        assert_eq!(got.batch_id, b);
        assert_eq!(got.correlation_id, Some(meta.correlation_id));
        assert_eq!(
            got.traceparent.map(|t| t.trace_id),
            Some(meta.trace.trace_id)
        );
        assert_eq!(got.body, want);
    }
}

fn outcome(b: BatchId) -> pe::BatchPhaseOutcome {
    pe::BatchPhaseOutcome {
        batch_id: b.to_string(),
        phase: pc::PhaseName::Spellcheck as i32,
        phase_status: pc::PhaseOutcomeStatus::CompletedSuccessfully as i32,
        processed_essays: vec![],
        failed_essay_ids: vec![],
        attempt: 1,
    }
}

fn outcome_with(
    edit: impl FnOnce(&mut pe::BatchPhaseOutcome),
) -> Result<DecodedEvent, DecodeError> {
    let b = batch();
    let mut m = outcome(b);
    edit(&mut m);
    decode_record(&consumed(&m, b).0)
}

#[test]
fn undecodable_and_misrouted_records_are_typed_errors() {
    let b = batch();
    let (good, _) = consumed(&outcome(b), b);
    let empty = BTreeMap::new();
    assert_eq!(
        decode(&good.topic, None, None, &empty),
        Err(DecodeError::EmptyPayload)
    );
    assert!(matches!(
        decode(
            &good.topic,
            None,
            Some(b"\xff\xff\xff not protobuf"),
            &empty
        ),
        Err(DecodeError::NotAnEnvelope(_))
    ));
    assert_eq!(
        decode("no.such.topic", None, Some(&good.payload), &empty),
        Err(DecodeError::UnknownTopic("no.such.topic".into()))
    );
    // A topic BOS publishes is not one it consumes.
    let registered = topic_for::<pe::BatchEssaysRegistered>().unwrap();
    assert!(matches!(
        decode(&registered, None, Some(&good.payload), &empty),
        Err(DecodeError::UnknownTopic(_))
    ));
    // The right envelope on the wrong topic: the Any type does not match, and the error names both.
    let ready = topic_for::<pe::BatchEssaysReady>().unwrap();
    let mut misrouted = good.clone();
    misrouted.topic = ready.clone();
    match decode_record(&misrouted) {
        Err(DecodeError::TypeMismatch {
            topic,
            expected,
            got,
        }) => {
            assert_eq!(topic, ready);
            assert_eq!(expected, pe::BatchEssaysReady::full_name());
            assert_eq!(got, pe::BatchPhaseOutcome::full_name());
        }
        other => panic!("expected a type mismatch, got {other:?}"),
    }
    // event_type disagreeing with the topic.
    let mut envelope = pe::EventEnvelope::decode(good.payload.as_slice()).unwrap();
    envelope.event_type = ready;
    let mut wrong_type = good.clone();
    wrong_type.payload = envelope.encode_to_vec();
    assert!(
        matches!(decode_record(&wrong_type), Err(DecodeError::InvalidField(v)) if v.field == "event_type")
    );
    // No data, no event id, a bad event id.
    for (edit, want) in [
        (
            Box::new(|e: &mut pe::EventEnvelope| e.data = None)
                as Box<dyn Fn(&mut pe::EventEnvelope)>,
            "data",
        ),
        (
            Box::new(|e: &mut pe::EventEnvelope| e.event_id.clear()),
            "event_id",
        ),
        (
            Box::new(|e: &mut pe::EventEnvelope| e.event_id = "x".into()),
            "event_id",
        ),
        (
            Box::new(|e: &mut pe::EventEnvelope| e.correlation_id = "x".into()),
            "correlation_id",
        ),
    ] {
        let mut envelope = pe::EventEnvelope::decode(good.payload.as_slice()).unwrap();
        edit(&mut envelope);
        let mut r = good.clone();
        r.payload = envelope.encode_to_vec();
        match decode_record(&r) {
            Err(DecodeError::MissingField(f)) => assert_eq!(f, want),
            Err(DecodeError::InvalidField(v)) => assert_eq!(v.field, want),
            other => panic!("{want}: {other:?}"),
        }
    }
    // The payload bytes inside a matching Any are garbage.
    let mut envelope = pe::EventEnvelope::decode(good.payload.as_slice()).unwrap();
    if let Some(any) = envelope.data.as_mut() {
        any.value = vec![0xff, 0xff, 0xff];
    }
    let mut r = good.clone();
    r.payload = envelope.encode_to_vec();
    assert!(matches!(
        decode_record(&r),
        Err(DecodeError::BadPayload { .. })
    ));
    // A key that is not the batch id.
    assert!(matches!(
        decode(&good.topic, Some(b"someone-else"), Some(&good.payload), &empty),
        Err(DecodeError::InvalidField(v)) if v.field == "key"
    ));
}

#[test]
fn invalid_payload_fields_are_named() {
    let field_of = |r: Result<DecodedEvent, DecodeError>| match r {
        Err(DecodeError::MissingField(f)) => f.to_owned(),
        Err(DecodeError::InvalidField(v)) => v.field.to_owned(),
        other => panic!("expected a field error, got {other:?}"),
    };
    assert_eq!(field_of(outcome_with(|m| m.batch_id.clear())), "batch_id");
    assert_eq!(
        field_of(outcome_with(|m| m.batch_id = "nope".into())),
        "batch_id"
    );
    assert_eq!(field_of(outcome_with(|m| m.phase = 0)), "phase");
    assert_eq!(field_of(outcome_with(|m| m.phase = 99)), "phase");
    assert_eq!(
        field_of(outcome_with(|m| m.phase_status = 0)),
        "phase_status"
    );
    assert_eq!(field_of(outcome_with(|m| m.attempt = 0)), "attempt");
    assert_eq!(
        field_of(outcome_with(|m| m.failed_essay_ids = vec!["bad".into()])),
        "failed_essay_ids"
    );
    assert_eq!(
        field_of(outcome_with(|m| m.processed_essays =
            vec![pe::batch_phase_outcome::ProcessedEssay {
                essay_id: "bad".into(),
                output_text_storage_id: String::new()
            }])),
        "processed_essays.essay_id"
    );
    let b = batch();
    let provisioning = pe::BatchContentProvisioningCompleted {
        batch_id: b.to_string(),
        provisioned_count: -1,
        expected_count: 1,
        essays_for_processing: vec![],
        ..Default::default()
    };
    assert_eq!(
        field_of(decode_record(&consumed(&provisioning, b).0)),
        "provisioned_count"
    );
    let request = pe::ClientBatchPipelineRequest {
        batch_id: b.to_string(),
        requested_pipeline: pc::PhaseName::Nlp as i32,
        user_id: "  ".into(),
        ..Default::default()
    };
    assert_eq!(field_of(decode_record(&consumed(&request, b).0)), "user_id");
    let ready = pe::BatchEssaysReady {
        batch_id: b.to_string(),
        ready_essays: vec![pc::EssayRef {
            essay_id: essay().to_string(),
            text_storage_id: String::new(),
        }],
        ..Default::default()
    };
    assert_eq!(
        field_of(decode_record(&consumed(&ready, b).0)),
        "ready_essays"
    );
}

#[test]
fn topics_come_from_the_descriptors() {
    assert_eq!(consumed_topics().len(), 6);
    assert_eq!(published_topics().len(), 7);
    assert!(consumed_topics()
        .iter()
        .all(|t| !published_topics().contains(t)));
    assert_eq!(dlq_topic("a.b"), "a.b.DLQ");
}
