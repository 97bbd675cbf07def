//! The consumed side of the codec: every consumed topic decodes to its input, and bad records are typed errors.

use std::collections::BTreeMap;

use prost::{Message, Name};

use super::tests::{batch, correlation, essay, event_id, now, text};
use super::*;
use crate::core::ids::{Attempt, BatchId, EssayId, PhaseName, UserId};
use crate::core::input::{Actor, EssayRef, Input, ReportedPhaseStatus};
use crate::core::model::ClassType;
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;

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
