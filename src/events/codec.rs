//! The Kafka wire format: core effects → protobuf `EventEnvelope` records (key = batch id, standard headers), and
//! consumed records → typed core inputs with typed errors.
//!
//! Topics are never spelled here: each payload message declares its topic in the descriptors, and the generated
//! message type names it (`prost::Name`), so a payload type and its topic cannot drift apart.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::{Message, Name};
use prost_types::{Any, Timestamp};

use crate::core::effect::{BatchEssaysRegistered, OutboundEvent, PhaseCommand, PipelineCompleted};
use crate::core::ids::{CorrelationId, CourseCode, EventId, Language, PhaseName};
use crate::core::input::EssayRef;
use crate::core::model::{ClassType, RunStatus};
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;

/// The one spelling of our service name in every envelope (defect 17).
pub const SOURCE_SERVICE: &str = "batch-orchestrator-service";
/// Schema version of every v1 payload.
pub const SCHEMA_VERSION: i32 = 1;
/// Content type header value of every record.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// Suffix of the dead-letter topic of a consumed topic.
pub const DLQ_SUFFIX: &str = ".DLQ";

/// Record header names.
pub mod header {
    pub const EVENT_ID: &str = "event_id";
    pub const EVENT_TYPE: &str = "event_type";
    pub const CORRELATION_ID: &str = "correlation_id";
    pub const TRACEPARENT: &str = "traceparent";
    pub const CONTENT_TYPE: &str = "content-type";
    /// Phase commands only: the phase (`PhaseName::as_str`), so the relay can confirm delivery without decoding.
    pub const PHASE: &str = "phase";
    /// Phase commands only: the dispatch attempt.
    pub const ATTEMPT: &str = "attempt";
}

/// The dead-letter topic of `topic`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}{DLQ_SUFFIX}")
}

/// The topic a payload message type is published on, from its descriptor's topic option.
pub fn topic_for<M: Name>() -> Option<String> {
    crate::proto::topic_of(&M::full_name())
}

/// The six topics BOS consumes, in a stable order.
pub fn consumed_topics() -> Vec<String> {
    [
        pe::BatchContentProvisioningCompleted::full_name(),
        pe::StudentAssociationsConfirmed::full_name(),
        pe::BatchEssaysReady::full_name(),
        pe::ClientBatchPipelineRequest::full_name(),
        pe::BatchPhaseOutcome::full_name(),
        pe::BatchValidationErrors::full_name(),
    ]
    .iter()
    .filter_map(|name| crate::proto::topic_of(name))
    .collect()
}

/// The topics BOS publishes, in a stable order.
pub fn published_topics() -> Vec<String> {
    [
        pe::BatchEssaysRegistered::full_name(),
        pe::StudentMatchingInitiateCommand::full_name(),
        pe::SpellcheckInitiateCommand::full_name(),
        pe::NlpInitiateCommand::full_name(),
        pe::CjAssessmentInitiateCommand::full_name(),
        pe::AiFeedbackInitiateCommand::full_name(),
        pe::BatchPipelineCompleted::full_name(),
    ]
    .iter()
    .filter_map(|name| crate::proto::topic_of(name))
    .collect()
}

#[path = "trace.rs"]
mod trace;
pub use trace::{current_trace, with_trace, TraceContext};

#[path = "codec_decode.rs"]
mod decode;
pub use decode::{
    decode, decode_payload, ConsumedEvent, DecodeError, DecodedEvent, PipelineRequest,
};

/// Why an effect could not be encoded (a descriptor without a topic is a build defect; say which).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("message {0} declares no topic")]
    NoTopic(String),
    #[error("could not encode {message}: {reason}")]
    Encode { message: String, reason: String },
}

/// One encoded record, ready for the outbox (or, in tests, a producer).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedRecord {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// What an envelope carries besides the payload.
#[derive(Debug, Clone)]
pub struct EnvelopeMeta {
    pub event_id: EventId,
    pub correlation_id: CorrelationId,
    pub timestamp: DateTime<Utc>,
    pub trace: TraceContext,
}

/// Wraps `message` in an envelope keyed by `key`, with the standard headers. Used for our effects and by tests
/// that play the other services.
pub fn encode_message<M: Message + Name>(
    message: &M,
    key: &str,
    meta: &EnvelopeMeta,
) -> Result<EncodedRecord, EncodeError> {
    let name = M::full_name();
    let topic = crate::proto::topic_of(&name).ok_or_else(|| EncodeError::NoTopic(name.clone()))?;
    let data = Any::from_msg(message).map_err(|e| EncodeError::Encode {
        message: name.clone(),
        reason: e.to_string(),
    })?;
    let traceparent = meta.trace.to_header();
    let envelope = pe::EventEnvelope {
        event_id: meta.event_id.to_string(),
        event_type: topic.clone(),
        event_timestamp: Some(timestamp(meta.timestamp)),
        source_service: SOURCE_SERVICE.to_owned(),
        correlation_id: meta.correlation_id.to_string(),
        schema_version: SCHEMA_VERSION,
        data: Some(data),
        metadata: [(header::TRACEPARENT.to_owned(), traceparent.clone())]
            .into_iter()
            .collect(),
    };
    let headers = [
        (header::EVENT_ID, meta.event_id.to_string()),
        (header::EVENT_TYPE, topic.clone()),
        (header::CORRELATION_ID, meta.correlation_id.to_string()),
        (header::TRACEPARENT, traceparent),
        (header::CONTENT_TYPE, CONTENT_TYPE.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Ok(EncodedRecord {
        topic,
        key: key.to_owned(),
        payload: envelope.encode_to_vec(),
        headers,
    })
}

/// Encodes the core's outbound events as protobuf envelopes; the store calls it inside the unit of work so the
/// outbox row holds exactly the bytes the relay publishes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtobufEffectEncoder;

impl ProtobufEffectEncoder {
    /// Encodes one event. The trace continues the consumed record being handled (if any), else starts a trace.
    pub fn encode_event(
        &self,
        event: &OutboundEvent,
        event_id: EventId,
        now: DateTime<Utc>,
    ) -> Result<EncodedRecord, EncodeError> {
        let meta = EnvelopeMeta {
            event_id,
            correlation_id: event.correlation_id(),
            timestamp: now,
            trace: current_trace()
                .map(|t| t.child())
                .unwrap_or_else(TraceContext::new_root),
        };
        let key = event.batch_id().to_string();
        match event {
            OutboundEvent::BatchEssaysRegistered(e) => encode_message(&registered(e), &key, &meta),
            OutboundEvent::PipelineCompleted(c) => {
                encode_message(&pipeline_completed(c), &key, &meta)
            }
            OutboundEvent::PhaseCommand(c) => {
                let mut record = encode_command(c, &key, &meta)?;
                record
                    .headers
                    .insert(header::PHASE.to_owned(), c.phase.as_str().to_owned());
                record
                    .headers
                    .insert(header::ATTEMPT.to_owned(), c.attempt.get().to_string());
                Ok(record)
            }
        }
    }
}

impl crate::store::EffectEncoder for ProtobufEffectEncoder {
    fn encode(
        &self,
        event: &OutboundEvent,
        event_id: EventId,
        now: DateTime<Utc>,
    ) -> Result<crate::store::OutboxMessage, crate::store::EncodeError> {
        let record = self
            .encode_event(event, event_id, now)
            .map_err(|e| crate::store::EncodeError(e.to_string()))?;
        Ok(crate::store::OutboxMessage {
            topic: record.topic,
            key: record.key,
            payload: record.payload,
            headers: record.headers,
        })
    }
}

fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn text(value: Option<&impl ToString>) -> String {
    value.map(ToString::to_string).unwrap_or_default()
}

fn registered(e: &BatchEssaysRegistered) -> pe::BatchEssaysRegistered {
    pe::BatchEssaysRegistered {
        batch_id: e.batch_id.to_string(),
        expected_essay_count: count(e.expected_essay_count),
        essay_ids: e.essay_ids.iter().map(ToString::to_string).collect(),
        course_code: course_code_to_proto(e.course_code) as i32,
        student_prompt_ref: e.student_prompt_ref.clone().unwrap_or_default(),
        user_id: e.user_id.to_string(),
        org_id: text(e.org_id.as_ref()),
        class_id: text(e.class_id.as_ref()),
    }
}

fn pipeline_completed(c: &PipelineCompleted) -> pe::BatchPipelineCompleted {
    pe::BatchPipelineCompleted {
        batch_id: c.batch_id.to_string(),
        run_id: c.run_id.to_string(),
        completed_phases: c
            .completed_phases
            .iter()
            .map(|p| phase_to_proto(*p) as i32)
            .collect(),
        final_status: run_status_to_proto(c.final_status) as i32,
        processing_duration: Some(duration(c.processing_duration)),
        successful_essay_count: count(c.successful_essay_count),
        failed_essay_count: count(c.failed_essay_count),
        correlation_id: c.correlation_id.to_string(),
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn essay_refs(essays: &[EssayRef]) -> Vec<pc::EssayRef> {
    essays
        .iter()
        .map(|e| pc::EssayRef {
            essay_id: e.essay_id.to_string(),
            text_storage_id: e.text_ref.to_string(),
        })
        .collect()
}

fn encode_command(
    c: &PhaseCommand,
    key: &str,
    meta: &EnvelopeMeta,
) -> Result<EncodedRecord, EncodeError> {
    let batch_id = c.batch_id.to_string();
    let phase = phase_to_proto(c.phase) as i32;
    let attempt = i32::try_from(c.attempt.get()).unwrap_or(i32::MAX);
    let language = language_to_proto(c.language) as i32;
    let essays_to_process = essay_refs(&c.essays);
    let course_code = course_code_to_proto(c.course_code) as i32;
    let run_id = text(c.run_id.as_ref());
    let class_type = class_type_to_proto(c.class_type) as i32;
    let prompt = c.student_prompt_ref.clone().unwrap_or_default();
    match c.phase {
        PhaseName::StudentMatching => encode_message(
            &pe::StudentMatchingInitiateCommand {
                batch_id,
                phase,
                attempt,
                language,
                essays_to_process,
                class_id: text(c.class_id.as_ref()),
                course_code,
                run_id,
            },
            key,
            meta,
        ),
        PhaseName::Spellcheck => encode_message(
            &pe::SpellcheckInitiateCommand {
                batch_id,
                phase,
                attempt,
                language,
                essays_to_process,
                course_code,
                run_id,
            },
            key,
            meta,
        ),
        PhaseName::Nlp => encode_message(
            &pe::NlpInitiateCommand {
                batch_id,
                phase,
                attempt,
                language,
                essays_to_process,
                course_code,
                run_id,
            },
            key,
            meta,
        ),
        PhaseName::CjAssessment => encode_message(
            &pe::CjAssessmentInitiateCommand {
                batch_id,
                phase,
                attempt,
                language,
                essays_to_process,
                course_code,
                student_prompt_ref: prompt,
                class_type,
                assignment_id: c.assignment_id.clone().unwrap_or_default(),
                cj_default_llm_model: c.cj_default_llm_model.clone().unwrap_or_default(),
                cj_default_temperature: c.cj_default_temperature,
                run_id,
            },
            key,
            meta,
        ),
        PhaseName::AiFeedback => encode_message(
            &pe::AiFeedbackInitiateCommand {
                batch_id,
                phase,
                attempt,
                language,
                essays_to_process,
                course_code,
                student_prompt_ref: prompt,
                class_type,
                owner_user_id: c.owner.to_string(),
                run_id,
            },
            key,
            meta,
        ),
    }
}

/// Core phase → protobuf phase.
pub fn phase_to_proto(phase: PhaseName) -> pc::PhaseName {
    match phase {
        PhaseName::StudentMatching => pc::PhaseName::StudentMatching,
        PhaseName::Spellcheck => pc::PhaseName::Spellcheck,
        PhaseName::Nlp => pc::PhaseName::Nlp,
        PhaseName::CjAssessment => pc::PhaseName::CjAssessment,
        PhaseName::AiFeedback => pc::PhaseName::AiFeedback,
    }
}

/// Protobuf phase → core phase; `None` for UNSPECIFIED or an unknown number.
pub fn phase_from_proto(raw: i32) -> Option<PhaseName> {
    match pc::PhaseName::try_from(raw).ok()? {
        pc::PhaseName::Unspecified => None,
        pc::PhaseName::StudentMatching => Some(PhaseName::StudentMatching),
        pc::PhaseName::Spellcheck => Some(PhaseName::Spellcheck),
        pc::PhaseName::Nlp => Some(PhaseName::Nlp),
        pc::PhaseName::CjAssessment => Some(PhaseName::CjAssessment),
        pc::PhaseName::AiFeedback => Some(PhaseName::AiFeedback),
    }
}

fn course_code_to_proto(code: CourseCode) -> pc::CourseCode {
    match code {
        CourseCode::Eng5 => pc::CourseCode::Eng5,
        CourseCode::Eng6 => pc::CourseCode::Eng6,
        CourseCode::Eng7 => pc::CourseCode::Eng7,
        CourseCode::Sv1 => pc::CourseCode::Sv1,
        CourseCode::Sv2 => pc::CourseCode::Sv2,
        CourseCode::Sv3 => pc::CourseCode::Sv3,
    }
}

fn language_to_proto(language: Language) -> pc::Language {
    match language {
        Language::En => pc::Language::En,
        Language::Sv => pc::Language::Sv,
    }
}

fn class_type_to_proto(class_type: ClassType) -> pc::ClassType {
    match class_type {
        ClassType::Guest => pc::ClassType::Guest,
        ClassType::Regular => pc::ClassType::Regular,
    }
}

fn run_status_to_proto(status: RunStatus) -> pc::PipelineRunStatus {
    match status {
        RunStatus::Running => pc::PipelineRunStatus::Running,
        RunStatus::CompletedSuccessfully => pc::PipelineRunStatus::CompletedSuccessfully,
        RunStatus::CompletedWithFailures => pc::PipelineRunStatus::CompletedWithFailures,
        RunStatus::Failed => pc::PipelineRunStatus::Failed,
        RunStatus::Cancelled => pc::PipelineRunStatus::Cancelled,
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "codec_decode_tests.rs"]
mod decode_tests;
