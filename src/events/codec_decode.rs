//! Consumed records → typed core inputs. Every way a record can be unusable is a `DecodeError` variant naming what
//! is wrong, so the dead-letter headers say why without anyone reading the bytes.

use std::collections::BTreeMap;

use prost::{Message, Name};
use prost_types::Any;

use super::{header, TraceContext};
use crate::core::ids::{
    Attempt, BatchId, CorrelationId, EssayId, EventId, InvalidValue, PhaseName, TextRef, UserId,
};
use crate::core::input::{
    Actor, EssayRef, FailedEssay, Input, ProcessedEssay, ReportedPhaseStatus, StudentAssociation,
};
use crate::core::model::ClassType;
use crate::proto::huleedu::common::v1 as pc;
use crate::proto::huleedu::events::v1 as pe;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("record has no value")]
    EmptyPayload,
    #[error("value is not an EventEnvelope: {0}")]
    NotAnEnvelope(String),
    #[error("topic {0} is not a topic BOS consumes")]
    UnknownTopic(String),
    #[error("payload type {got} does not match topic {topic} (expects {expected})")]
    TypeMismatch {
        topic: String,
        expected: String,
        got: String,
    },
    #[error("payload {message} does not decode: {reason}")]
    BadPayload { message: String, reason: String },
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("invalid field {0}")]
    InvalidField(#[from] InvalidValue),
}

impl DecodeError {
    /// A stable short name for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::EmptyPayload => "empty_payload",
            DecodeError::NotAnEnvelope(_) => "not_an_envelope",
            DecodeError::UnknownTopic(_) => "unknown_topic",
            DecodeError::TypeMismatch { .. } => "type_mismatch",
            DecodeError::BadPayload { .. } => "bad_payload",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::InvalidField(_) => "invalid_field",
        }
    }
}

/// A client pipeline request: the arguments of `Orchestrator::request_pipeline` (or of a retry).
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineRequest {
    pub actor: Actor,
    pub requested: PhaseName,
    pub is_retry: bool,
    pub reason: Option<String>,
    pub prompt_ref: Option<String>,
}

/// What a consumed record asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumedEvent {
    /// An input for `Orchestrator::handle`.
    Input(Input),
    /// A pipeline request, which needs resolving first.
    PipelineRequest(PipelineRequest),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    pub event_id: EventId,
    pub topic: String,
    pub batch_id: BatchId,
    pub correlation_id: Option<CorrelationId>,
    pub traceparent: Option<TraceContext>,
    pub body: ConsumedEvent,
}

fn consumed_message(topic: &str) -> Result<String, DecodeError> {
    let consumed = super::consumed_topics();
    if !consumed.iter().any(|t| t == topic) {
        return Err(DecodeError::UnknownTopic(topic.to_owned()));
    }
    crate::proto::message_for_topic(topic)
        .ok_or_else(|| DecodeError::UnknownTopic(topic.to_owned()))
}

fn open_envelope(payload: Option<&[u8]>) -> Result<pe::EventEnvelope, DecodeError> {
    let bytes = payload
        .filter(|b| !b.is_empty())
        .ok_or(DecodeError::EmptyPayload)?;
    pe::EventEnvelope::decode(bytes).map_err(|e| DecodeError::NotAnEnvelope(e.to_string()))
}

/// Checked after the payload type, so a record on the wrong topic reports the more telling type mismatch.
fn check_event_type(envelope: &pe::EventEnvelope, topic: &str) -> Result<(), DecodeError> {
    if !envelope.event_type.is_empty() && envelope.event_type != topic {
        return Err(InvalidValue::new(
            "event_type",
            format!("'{}' does not match the topic {topic}", envelope.event_type),
        )
        .into());
    }
    Ok(())
}

fn any_type_name(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or_default()
}

fn unpack<M: Message + Name + Default>(topic: &str, any: &Any) -> Result<M, DecodeError> {
    let got = any_type_name(any);
    if got != M::full_name() {
        return Err(DecodeError::TypeMismatch {
            topic: topic.to_owned(),
            expected: M::full_name(),
            got: got.to_owned(),
        });
    }
    M::decode(any.value.as_slice()).map_err(|e| DecodeError::BadPayload {
        message: M::full_name(),
        reason: e.to_string(),
    })
}

/// Opens a record of any topic whose payload type is `M` (e.g. a command BOS published): the envelope and the
/// payload, after checking that the topic is `M`'s and the `Any` holds an `M`.
pub fn decode_payload<M: Message + Name + Default>(
    topic: &str,
    payload: Option<&[u8]>,
) -> Result<(pe::EventEnvelope, M), DecodeError> {
    let expected =
        super::topic_for::<M>().ok_or_else(|| DecodeError::UnknownTopic(topic.to_owned()))?;
    if expected != topic {
        return Err(DecodeError::TypeMismatch {
            topic: topic.to_owned(),
            expected: crate::proto::message_for_topic(topic).unwrap_or_default(),
            got: M::full_name(),
        });
    }
    let envelope = open_envelope(payload)?;
    let any = envelope
        .data
        .as_ref()
        .ok_or(DecodeError::MissingField("data"))?;
    let message = unpack::<M>(topic, any)?;
    check_event_type(&envelope, topic)?;
    Ok((envelope, message))
}

/// Decodes one consumed record (its topic, key, value and headers) into what BOS should do with it.
pub fn decode(
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &BTreeMap<String, String>,
) -> Result<DecodedEvent, DecodeError> {
    let expected = consumed_message(topic)?;
    let envelope = open_envelope(payload)?;
    let any = envelope
        .data
        .as_ref()
        .ok_or(DecodeError::MissingField("data"))?;
    if any_type_name(any) != expected {
        return Err(DecodeError::TypeMismatch {
            topic: topic.to_owned(),
            expected,
            got: any_type_name(any).to_owned(),
        });
    }
    check_event_type(&envelope, topic)?;
    if envelope.event_id.is_empty() {
        return Err(DecodeError::MissingField("event_id"));
    }
    let event_id = EventId::parse("event_id", &envelope.event_id)?;
    let correlation_id = match envelope.correlation_id.as_str() {
        "" => None,
        raw => Some(CorrelationId::parse("correlation_id", raw)?),
    };
    let traceparent = headers
        .get(header::TRACEPARENT)
        .or_else(|| envelope.metadata.get(header::TRACEPARENT))
        .and_then(|h| TraceContext::parse(h));
    let (raw_batch_id, body) = body(topic, &expected, any)?;
    if raw_batch_id.is_empty() {
        return Err(DecodeError::MissingField("batch_id"));
    }
    let batch_id = BatchId::parse("batch_id", &raw_batch_id)?;
    if let Some(key) = key.filter(|k| !k.is_empty()) {
        if key != raw_batch_id.trim().as_bytes() && key != batch_id.to_string().as_bytes() {
            return Err(
                InvalidValue::new("key", "record key is not the payload's batch_id").into(),
            );
        }
    }
    Ok(DecodedEvent {
        event_id,
        topic: topic.to_owned(),
        batch_id,
        correlation_id,
        traceparent,
        body,
    })
}

fn body(topic: &str, message: &str, any: &Any) -> Result<(String, ConsumedEvent), DecodeError> {
    if message == pe::BatchContentProvisioningCompleted::full_name() {
        let m: pe::BatchContentProvisioningCompleted = unpack(topic, any)?;
        let input = Input::ContentProvisioned {
            essays: essay_refs(&m.essays_for_processing, "essays_for_processing")?,
            provisioned_count: non_negative("provisioned_count", m.provisioned_count)?,
            expected_count: non_negative("expected_count", m.expected_count)?,
        };
        Ok((m.batch_id, ConsumedEvent::Input(input)))
    } else if message == pe::StudentAssociationsConfirmed::full_name() {
        let m: pe::StudentAssociationsConfirmed = unpack(topic, any)?;
        let associations = m
            .associations
            .iter()
            .map(|a| {
                let student_id = a.student_id.trim();
                if student_id.is_empty() {
                    return Err(InvalidValue::new(
                        "associations.student_id",
                        "must not be empty",
                    ));
                }
                Ok(StudentAssociation {
                    essay_id: EssayId::parse("associations.essay_id", &a.essay_id)?,
                    student_id: student_id.to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let input = Input::StudentAssociationsConfirmed {
            associations,
            timeout_triggered: m.timeout_triggered,
        };
        Ok((m.batch_id, ConsumedEvent::Input(input)))
    } else if message == pe::BatchEssaysReady::full_name() {
        let m: pe::BatchEssaysReady = unpack(topic, any)?;
        let class_type = match pc::ClassType::try_from(m.class_type) {
            Ok(pc::ClassType::Guest) => Some(ClassType::Guest),
            Ok(pc::ClassType::Regular) => Some(ClassType::Regular),
            Ok(pc::ClassType::Unspecified) => None,
            Err(_) => {
                return Err(InvalidValue::new(
                    "class_type",
                    format!("unknown value {}", m.class_type),
                )
                .into())
            }
        };
        let input = Input::EssaysReady {
            essays: essay_refs(&m.ready_essays, "ready_essays")?,
            class_type,
        };
        Ok((m.batch_id, ConsumedEvent::Input(input)))
    } else if message == pe::ClientBatchPipelineRequest::full_name() {
        let m: pe::ClientBatchPipelineRequest = unpack(topic, any)?;
        let requested = required_phase("requested_pipeline", m.requested_pipeline)?;
        let request = PipelineRequest {
            actor: Actor::User(UserId::parse("user_id", &m.user_id)?),
            requested,
            is_retry: m.is_retry,
            reason: non_empty(&m.retry_reason),
            prompt_ref: non_empty(&m.prompt_ref),
        };
        Ok((m.batch_id, ConsumedEvent::PipelineRequest(request)))
    } else if message == pe::BatchPhaseOutcome::full_name() {
        let m: pe::BatchPhaseOutcome = unpack(topic, any)?;
        Ok((m.batch_id.clone(), ConsumedEvent::Input(phase_outcome(&m)?)))
    } else if message == pe::BatchValidationErrors::full_name() {
        let m: pe::BatchValidationErrors = unpack(topic, any)?;
        let failed = m
            .failed_essays
            .iter()
            .map(|f| {
                Ok(FailedEssay {
                    essay_id: EssayId::parse("failed_essays.essay_id", &f.essay_id)?,
                    error: validation_error(&f.file_name, &f.error_detail),
                })
            })
            .collect::<Result<Vec<_>, InvalidValue>>()?;
        let input = Input::ValidationErrors {
            failed,
            critical: m.critical_failure,
        };
        Ok((m.batch_id, ConsumedEvent::Input(input)))
    } else {
        Err(DecodeError::UnknownTopic(topic.to_owned()))
    }
}

fn phase_outcome(m: &pe::BatchPhaseOutcome) -> Result<Input, DecodeError> {
    let phase = required_phase("phase", m.phase)?;
    let status = match pc::PhaseOutcomeStatus::try_from(m.phase_status) {
        Ok(pc::PhaseOutcomeStatus::CompletedSuccessfully) => {
            ReportedPhaseStatus::CompletedSuccessfully
        }
        Ok(pc::PhaseOutcomeStatus::CompletedWithFailures) => {
            ReportedPhaseStatus::CompletedWithFailures
        }
        Ok(pc::PhaseOutcomeStatus::FailedCritically) => ReportedPhaseStatus::FailedCritically,
        Ok(pc::PhaseOutcomeStatus::Unspecified) => {
            return Err(DecodeError::MissingField("phase_status"))
        }
        Err(_) => {
            return Err(InvalidValue::new(
                "phase_status",
                format!("unknown value {}", m.phase_status),
            )
            .into())
        }
    };
    let processed = m
        .processed_essays
        .iter()
        .map(|p| {
            Ok(ProcessedEssay {
                essay_id: EssayId::parse("processed_essays.essay_id", &p.essay_id)?,
                output_ref: match p.output_text_storage_id.trim() {
                    "" => None,
                    raw => Some(TextRef::parse(
                        "processed_essays.output_text_storage_id",
                        raw,
                    )?),
                },
            })
        })
        .collect::<Result<Vec<_>, InvalidValue>>()?;
    let failed = m
        .failed_essay_ids
        .iter()
        .map(|id| EssayId::parse("failed_essay_ids", id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Input::PhaseOutcome {
        phase,
        attempt: Attempt::parse("attempt", i64::from(m.attempt))?,
        status,
        processed,
        failed,
    })
}

fn essay_refs(refs: &[pc::EssayRef], field: &'static str) -> Result<Vec<EssayRef>, InvalidValue> {
    refs.iter()
        .map(|r| {
            Ok(EssayRef {
                essay_id: EssayId::parse(field, &r.essay_id)?,
                text_ref: TextRef::parse(field, &r.text_storage_id)?,
            })
        })
        .collect()
}

fn required_phase(field: &'static str, raw: i32) -> Result<PhaseName, DecodeError> {
    if raw == pc::PhaseName::Unspecified as i32 {
        return Err(DecodeError::MissingField(field));
    }
    super::phase_from_proto(raw)
        .ok_or_else(|| InvalidValue::new(field, format!("unknown phase {raw}")).into())
}

fn non_negative(field: &'static str, raw: i32) -> Result<u32, InvalidValue> {
    u32::try_from(raw)
        .map_err(|_| InvalidValue::new(field, format!("must not be negative, got {raw}")))
}

fn non_empty(raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

fn validation_error(file_name: &str, detail: &str) -> String {
    let detail = if detail.trim().is_empty() {
        "validation failed"
    } else {
        detail.trim()
    };
    match file_name.trim() {
        "" => detail.to_owned(),
        name => format!("{name}: {detail}"),
    }
}
