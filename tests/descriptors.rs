//! The embedded descriptor set keeps the custom options that the transcoder and the Kafka codec
//! read: the `google.api.http` rule of every unary RPC and the topic of every event payload.

use std::collections::BTreeSet;

use bos::proto::{self, HttpBinding};

fn binding(method: &str, verb: &str, path: &str, body: &str) -> HttpBinding {
    HttpBinding {
        method: method.to_owned(),
        verb: verb.to_owned(),
        path: path.to_owned(),
        body: body.to_owned(),
    }
}

#[test]
fn the_five_http_rules_are_read_back_from_the_embedded_descriptors() {
    let mut expected = vec![
        binding(
            "huleedu.bos.v1.BatchService.RegisterBatch",
            "POST",
            "/v1/batches/register",
            "*",
        ),
        binding(
            "huleedu.bos.v1.BatchService.GetBatchStatus",
            "GET",
            "/v1/batches/{batch_id}/status",
            "",
        ),
        binding(
            "huleedu.bos.v1.BatchService.RetryPhase",
            "POST",
            "/v1/batches/{batch_id}/retry",
            "*",
        ),
        binding(
            "huleedu.bos.v1.BatchService.RequestPipeline",
            "POST",
            "/v1/batches/{batch_id}/pipelines",
            "*",
        ),
        binding(
            "huleedu.bos.v1.BatchInternalService.GetPipelineState",
            "GET",
            "/internal/v1/batches/{batch_id}/pipeline-state",
            "",
        ),
    ];
    expected.sort_by(|a, b| (&a.method, &a.path).cmp(&(&b.method, &b.path)));
    assert_eq!(proto::http_rules(), expected);
}

#[test]
fn watch_batch_is_server_streaming_and_has_no_http_rule() {
    let service = proto::descriptor_pool()
        .get_service_by_name("huleedu.bos.v1.BatchService")
        .unwrap();
    let watch = service
        .methods()
        .find(|m| m.name() == "WatchBatch")
        .unwrap();
    assert!(watch.is_server_streaming());
    assert!(!watch.is_client_streaming());
    assert!(proto::http_rules()
        .iter()
        .all(|rule| !rule.method.ends_with(".WatchBatch")));
}

const CONSUMED: [(&str, &str); 6] = [
    (
        "BatchContentProvisioningCompleted",
        "huleedu.batch.content.provisioning.completed.v1",
    ),
    (
        "StudentAssociationsConfirmed",
        "huleedu.student.associations.confirmed.v1",
    ),
    ("BatchEssaysReady", "huleedu.els.batch.essays.ready.v1"),
    (
        "ClientBatchPipelineRequest",
        "huleedu.bos.client.pipeline.request.v1",
    ),
    ("BatchPhaseOutcome", "huleedu.els.batch.phase.outcome.v1"),
    (
        "BatchValidationErrors",
        "huleedu.els.batch.validation.errors.v1",
    ),
];

const PUBLISHED: [(&str, &str); 7] = [
    (
        "BatchEssaysRegistered",
        "huleedu.batch.essays.registered.v1",
    ),
    (
        "StudentMatchingInitiateCommand",
        "huleedu.batch.service.student.matching.initiate.command.v1",
    ),
    (
        "SpellcheckInitiateCommand",
        "huleedu.els.spellcheck.initiate.command.v1",
    ),
    ("NlpInitiateCommand", "huleedu.els.nlp.initiate.command.v1"),
    (
        "CjAssessmentInitiateCommand",
        "huleedu.els.cj_assessment.initiate.command.v1",
    ),
    (
        "AiFeedbackInitiateCommand",
        "huleedu.els.ai_feedback.initiate.command.v1",
    ),
    (
        "BatchPipelineCompleted",
        "huleedu.batch.pipeline.completed.v1",
    ),
];

#[test]
fn every_event_payload_declares_its_topic() {
    for (message, topic) in CONSUMED.iter().chain(PUBLISHED.iter()) {
        let full_name = format!("huleedu.events.v1.{message}");
        assert_eq!(
            proto::topic_of(&full_name).as_deref(),
            Some(*topic),
            "{full_name}"
        );
        assert_eq!(proto::message_for_topic(topic), Some(full_name));
    }
}

#[test]
fn the_thirteen_topics_of_the_architecture_are_exactly_the_declared_set() {
    let declared: BTreeSet<String> = proto::event_topics().into_iter().map(|(_, t)| t).collect();
    let expected: BTreeSet<String> = CONSUMED
        .iter()
        .chain(PUBLISHED.iter())
        .map(|(_, t)| (*t).to_owned())
        .collect();
    assert_eq!(expected.len(), 13);
    assert_eq!(declared, expected);
}

#[test]
fn messages_without_a_topic_answer_none() {
    assert_eq!(proto::topic_of("huleedu.events.v1.EventEnvelope"), None);
    assert_eq!(proto::topic_of("huleedu.bos.v1.BatchView"), None);
    assert_eq!(proto::topic_of("no.such.Message"), None);
}

#[test]
fn generated_types_round_trip_through_the_envelope() {
    use prost::Message;
    use proto::huleedu::{common::v1 as common, events::v1 as events};

    let payload = events::BatchEssaysReady {
        batch_id: "b-1".into(),
        ready_essays: vec![common::EssayRef {
            essay_id: "e-1".into(),
            text_storage_id: "t-1".into(),
        }],
        course_code: common::CourseCode::Eng5 as i32,
        class_type: common::ClassType::Guest as i32,
    };
    let envelope = events::EventEnvelope {
        event_type: "huleedu.els.batch.essays.ready.v1".into(),
        data: Some(prost_types::Any::from_msg(&payload).unwrap()),
        ..Default::default()
    };
    let decoded = events::EventEnvelope::decode(envelope.encode_to_vec().as_slice()).unwrap();
    let any = decoded.data.unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/huleedu.events.v1.BatchEssaysReady"
    );
    assert_eq!(any.to_msg::<events::BatchEssaysReady>().unwrap(), payload);
}
