//! How the simulated downstream services answer BOS: a pure function from one record BOS published to the
//! records the real services would send back. Failures are drawn from a hash of (seed, batch, essay, phase,
//! attempt), so a run is reproducible and a redelivered command gets the same answer.

use std::collections::BTreeSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use prost::{Message, Name};

use crate::events::codec::{decode_payload, DecodeError};
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;

/// How the simulated services behave.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    /// Chance (0–1) that one essay fails in one phase attempt.
    pub failure_rate: f64,
    /// Phases whose commands are never answered (to exercise timeouts).
    pub never_answer: BTreeSet<i32>,
    /// Send essays-ready before the student associations, as a slow Class Management would.
    pub early_essays_ready: bool,
    pub seed: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            failure_rate: 0.0,
            never_answer: BTreeSet::new(),
            early_essays_ready: false,
            seed: 7,
        }
    }
}

/// One answer: a payload message to wrap in an envelope and publish, keyed by batch id.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    ContentProvisioned(pe::BatchContentProvisioningCompleted),
    AssociationsConfirmed(pe::StudentAssociationsConfirmed),
    EssaysReady(pe::BatchEssaysReady),
    PhaseOutcome(pe::BatchPhaseOutcome),
}

impl Answer {
    pub fn batch_id(&self) -> &str {
        match self {
            Answer::ContentProvisioned(m) => &m.batch_id,
            Answer::AssociationsConfirmed(m) => &m.batch_id,
            Answer::EssaysReady(m) => &m.batch_id,
            Answer::PhaseOutcome(m) => &m.batch_id,
        }
    }
}

/// What one record of BOS's asks of the simulated services.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The event id of the record answered, so redeliveries can be answered once.
    pub answers_event: String,
    pub correlation_id: String,
    pub answers: Vec<Answer>,
}

/// Answers one record; `Ok(None)` for a topic the simulated services do not act on (e.g. pipeline completed).
pub fn respond(
    topic: &str,
    payload: &[u8],
    behaviour: &Behaviour,
) -> Result<Option<Reply>, DecodeError> {
    if let Some(reply) = on::<pe::BatchEssaysRegistered>(topic, payload, |m| provision(&m))? {
        return Ok(Some(reply));
    }
    if let Some(reply) =
        on::<pe::StudentMatchingInitiateCommand>(topic, payload, |m| match_students(&m, behaviour))?
    {
        return Ok(Some(reply));
    }
    macro_rules! phase {
        ($ty:ty) => {
            if let Some(reply) = on::<$ty>(topic, payload, |m| {
                run_phase(
                    &m.batch_id,
                    m.phase,
                    m.attempt,
                    &m.essays_to_process,
                    behaviour,
                )
            })? {
                return Ok(Some(reply));
            }
        };
    }
    phase!(pe::SpellcheckInitiateCommand);
    phase!(pe::NlpInitiateCommand);
    phase!(pe::CjAssessmentInitiateCommand);
    phase!(pe::AiFeedbackInitiateCommand);
    Ok(None)
}

fn on<M: Message + Name + Default>(
    topic: &str,
    payload: &[u8],
    answer: impl FnOnce(M) -> Vec<Answer>,
) -> Result<Option<Reply>, DecodeError> {
    if crate::events::codec::topic_for::<M>().as_deref() != Some(topic) {
        return Ok(None);
    }
    let (envelope, message) = decode_payload::<M>(topic, Some(payload))?;
    Ok(Some(Reply {
        answers_event: envelope.event_id,
        correlation_id: envelope.correlation_id,
        answers: answer(message),
    }))
}

/// File Service + Essay Lifecycle: every registered essay gets stored content.
fn provision(m: &pe::BatchEssaysRegistered) -> Vec<Answer> {
    let essays: Vec<pc::EssayRef> = m
        .essay_ids
        .iter()
        .map(|id| pc::EssayRef {
            essay_id: id.clone(),
            text_storage_id: format!("content://{}/{id}", m.batch_id),
        })
        .collect();
    vec![Answer::ContentProvisioned(
        pe::BatchContentProvisioningCompleted {
            batch_id: m.batch_id.clone(),
            provisioned_count: essays.len() as i32,
            expected_count: m.expected_essay_count,
            course_code: m.course_code,
            user_id: m.user_id.clone(),
            essays_for_processing: essays,
        },
    )]
}

/// Class Management confirms a student for every essay; the Essay Lifecycle Service then reports them ready.
fn match_students(m: &pe::StudentMatchingInitiateCommand, behaviour: &Behaviour) -> Vec<Answer> {
    let associations = m
        .essays_to_process
        .iter()
        .enumerate()
        .map(
            |(i, essay)| pe::student_associations_confirmed::StudentAssociation {
                essay_id: essay.essay_id.clone(),
                student_id: format!("student-{}", i + 1),
                confidence: 0.93,
                validation_method: pc::ValidationMethod::Auto as i32,
                validated_by: "bos-simulator".to_owned(),
                validated_at: None,
            },
        )
        .collect();
    let confirmed = Answer::AssociationsConfirmed(pe::StudentAssociationsConfirmed {
        batch_id: m.batch_id.clone(),
        class_id: m.class_id.clone(),
        course_code: m.course_code,
        associations,
        timeout_triggered: false,
    });
    let ready = Answer::EssaysReady(pe::BatchEssaysReady {
        batch_id: m.batch_id.clone(),
        ready_essays: m.essays_to_process.clone(),
        course_code: m.course_code,
        class_type: pc::ClassType::Regular as i32,
    });
    if behaviour.early_essays_ready {
        vec![ready, confirmed]
    } else {
        vec![confirmed, ready]
    }
}

/// The Essay Lifecycle Service runs a phase: each essay succeeds or fails by the drawn chance.
fn run_phase(
    batch_id: &str,
    phase: i32,
    attempt: i32,
    essays: &[pc::EssayRef],
    behaviour: &Behaviour,
) -> Vec<Answer> {
    if behaviour.never_answer.contains(&phase) {
        return Vec::new();
    }
    let (processed, failed): (Vec<_>, Vec<_>) = essays
        .iter()
        .partition(|essay| !fails(behaviour, batch_id, &essay.essay_id, phase, attempt));
    let produces_text = phase == pc::PhaseName::Spellcheck as i32;
    let status = if failed.is_empty() {
        pc::PhaseOutcomeStatus::CompletedSuccessfully
    } else if processed.is_empty() {
        pc::PhaseOutcomeStatus::FailedCritically
    } else {
        pc::PhaseOutcomeStatus::CompletedWithFailures
    };
    let phase_label = pc::PhaseName::try_from(phase)
        .map(|p| {
            p.as_str_name()
                .trim_start_matches("PHASE_NAME_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| phase.to_string());
    vec![Answer::PhaseOutcome(pe::BatchPhaseOutcome {
        batch_id: batch_id.to_owned(),
        phase,
        phase_status: status as i32,
        processed_essays: processed
            .into_iter()
            .map(|essay| pe::batch_phase_outcome::ProcessedEssay {
                essay_id: essay.essay_id.clone(),
                output_text_storage_id: if produces_text {
                    format!("{phase_label}://{}/a{attempt}", essay.essay_id)
                } else {
                    String::new()
                },
            })
            .collect(),
        failed_essay_ids: failed
            .into_iter()
            .map(|essay| essay.essay_id.clone())
            .collect(),
        attempt,
    })]
}

fn fails(behaviour: &Behaviour, batch_id: &str, essay_id: &str, phase: i32, attempt: i32) -> bool {
    if behaviour.failure_rate <= 0.0 {
        return false;
    }
    let mut hasher = DefaultHasher::new();
    (behaviour.seed, batch_id, essay_id, phase, attempt).hash(&mut hasher);
    let draw = (hasher.finish() % 1_000_000) as f64 / 1_000_000.0;
    draw < behaviour.failure_rate
}

#[cfg(test)]
#[path = "responder_tests.rs"]
mod tests;
