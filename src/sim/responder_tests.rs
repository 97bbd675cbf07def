use chrono::Utc;

use super::*;
use crate::core::ids::{CorrelationId, EventId};
use crate::events::codec::{encode_message, EnvelopeMeta, TraceContext};

fn record<M: Message + Name>(message: &M) -> (String, Vec<u8>, String) {
    let event_id = EventId::from_uuid(uuid::Uuid::now_v7());
    let meta = EnvelopeMeta {
        event_id,
        correlation_id: CorrelationId::from_uuid(uuid::Uuid::now_v7()),
        timestamp: Utc::now(),
        trace: TraceContext::new_root(),
    };
    let encoded = encode_message(message, "b1", &meta).unwrap();
    (encoded.topic, encoded.payload, event_id.to_string())
}

fn essays(n: usize) -> Vec<pc::EssayRef> {
    (0..n)
        .map(|i| pc::EssayRef {
            essay_id: format!("e{i}"),
            text_storage_id: format!("t{i}"),
        })
        .collect()
}

fn spellcheck(attempt: i32, n: usize) -> pe::SpellcheckInitiateCommand {
    pe::SpellcheckInitiateCommand {
        batch_id: "b1".into(),
        phase: pc::PhaseName::Spellcheck as i32,
        attempt,
        essays_to_process: essays(n),
        ..Default::default()
    }
}

fn outcome(reply: &Reply) -> &pe::BatchPhaseOutcome {
    match reply.answers.as_slice() {
        [Answer::PhaseOutcome(outcome)] => outcome,
        other => panic!("expected one phase outcome, got {other:?}"),
    }
}

#[test]
fn registration_is_answered_with_provisioned_content_for_every_essay() {
    let registered = pe::BatchEssaysRegistered {
        batch_id: "b1".into(),
        expected_essay_count: 2,
        essay_ids: vec!["e1".into(), "e2".into()],
        ..Default::default()
    };
    let (topic, payload, event_id) = record(&registered);
    let reply = respond(&topic, &payload, &Behaviour::default())
        .unwrap()
        .unwrap();
    assert_eq!(reply.answers_event, event_id);
    let [Answer::ContentProvisioned(provisioned)] = reply.answers.as_slice() else {
        panic!("expected provisioning, got {:?}", reply.answers);
    };
    assert_eq!(provisioned.provisioned_count, 2);
    assert_eq!(provisioned.essays_for_processing[1].essay_id, "e2");
    assert!(!provisioned.essays_for_processing[1]
        .text_storage_id
        .is_empty());
}

#[test]
fn student_matching_confirms_then_reports_ready_unless_early() {
    let command = pe::StudentMatchingInitiateCommand {
        batch_id: "b1".into(),
        class_id: "c1".into(),
        essays_to_process: essays(3),
        ..Default::default()
    };
    let (topic, payload, _) = record(&command);
    let normal = respond(&topic, &payload, &Behaviour::default())
        .unwrap()
        .unwrap();
    assert!(
        matches!(normal.answers.as_slice(), [Answer::AssociationsConfirmed(a), Answer::EssaysReady(r)]
        if a.associations.len() == 3 && r.ready_essays.len() == 3)
    );
    let early = Behaviour {
        early_essays_ready: true,
        ..Behaviour::default()
    };
    let reversed = respond(&topic, &payload, &early).unwrap().unwrap();
    assert!(matches!(
        reversed.answers.as_slice(),
        [Answer::EssaysReady(_), Answer::AssociationsConfirmed(_)]
    ));
}

#[test]
fn phase_outcome_reports_every_essay_once_with_the_failure_rate_applied() {
    let behaviour = Behaviour {
        failure_rate: 0.3,
        ..Behaviour::default()
    };
    let (topic, payload, _) = record(&spellcheck(2, 200));
    let reply = respond(&topic, &payload, &behaviour).unwrap().unwrap();
    let outcome = outcome(&reply);
    assert_eq!(outcome.attempt, 2);
    assert_eq!(
        outcome.processed_essays.len() + outcome.failed_essay_ids.len(),
        200
    );
    assert!(
        (20..=100).contains(&outcome.failed_essay_ids.len()),
        "{}",
        outcome.failed_essay_ids.len()
    );
    assert_eq!(
        outcome.phase_status,
        pc::PhaseOutcomeStatus::CompletedWithFailures as i32
    );
    assert!(outcome
        .processed_essays
        .iter()
        .all(|e| e.output_text_storage_id.ends_with("/a2")));
    // The same command answered again gives the same outcome.
    assert_eq!(
        respond(&topic, &payload, &behaviour)
            .unwrap()
            .unwrap()
            .answers,
        reply.answers
    );
}

#[test]
fn all_failed_is_a_critical_failure_and_never_answer_is_silent() {
    let all_fail = Behaviour {
        failure_rate: 1.0,
        ..Behaviour::default()
    };
    let (topic, payload, _) = record(&spellcheck(1, 4));
    let reply = respond(&topic, &payload, &all_fail).unwrap().unwrap();
    assert_eq!(
        outcome(&reply).phase_status,
        pc::PhaseOutcomeStatus::FailedCritically as i32
    );

    let silent = Behaviour {
        never_answer: [pc::PhaseName::Spellcheck as i32].into_iter().collect(),
        ..Behaviour::default()
    };
    assert!(respond(&topic, &payload, &silent)
        .unwrap()
        .unwrap()
        .answers
        .is_empty());
}

#[test]
fn topics_the_services_ignore_get_no_reply() {
    let completed = pe::BatchPipelineCompleted {
        batch_id: "b1".into(),
        ..Default::default()
    };
    let (topic, payload, _) = record(&completed);
    assert_eq!(
        respond(&topic, &payload, &Behaviour::default()).unwrap(),
        None
    );
}
