//! Processing of one consumed record: decode, the Redis fast path, the handler with retries of transient failures,
//! and the dead-letter topic for poison records. The partition worker (`consumer`) decides what runs when.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use super::codec::{decode, with_trace, TraceContext};
use super::consumer::{Backoff, PartitionState};
use super::dedupe::Dedupe;
use super::dlq::{DlqPublisher, RawRecord};
use super::handlers::{EventHandler, HandleResult};

/// Everything a worker needs to process one record.
pub(super) struct Processor {
    pub(super) handler: EventHandler,
    pub(super) dedupe: Dedupe,
    pub(super) dlq: DlqPublisher,
    pub(super) backoff: Backoff,
}

pub(super) enum Finished {
    /// The record is done (applied, duplicate or dead-lettered): its offset may be committed.
    Done,
    /// Shutdown or revocation interrupted it: do not commit it.
    Abandoned,
}

impl Processor {
    pub(super) async fn process(
        &self,
        record: RawRecord,
        state: &PartitionState,
        stop: &watch::Receiver<bool>,
    ) -> Finished {
        let headers = record.text_headers();
        let decoded = match decode(
            &record.topic,
            record.key.as_deref(),
            record.payload.as_deref(),
            &headers,
        ) {
            Ok(decoded) => decoded,
            Err(error) => {
                let span = tracing::info_span!("consume", topic = %record.topic, partition = record.partition,
                    offset = record.offset, error_kind = error.kind());
                return self
                    .dead_letter(&record, &error.to_string(), 1, state, stop)
                    .instrument(span)
                    .await;
            }
        };
        let trace = decoded
            .traceparent
            .map(|t| t.child())
            .unwrap_or_else(TraceContext::new_root);
        let span = tracing::info_span!(
            "consume",
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            event_id = %decoded.event_id,
            batch_id = %decoded.batch_id,
            trace_id = %trace.trace_id_hex(),
            parent_span_id = %decoded.traceparent.map(|t| t.span_id_hex()).unwrap_or_default(),
        );
        let work = async {
            if self.dedupe.seen(decoded.event_id).await {
                count(&record.topic, "duplicate");
                return Finished::Done;
            }
            let mut delay = self.backoff.initial;
            let mut attempt = 1u32;
            loop {
                let result = with_trace(trace, self.handler.handle(&decoded)).await;
                match result {
                    HandleResult::Applied | HandleResult::Duplicate => {
                        // Only now, after the commit: a failed unit of work must run again (defect 15).
                        self.dedupe.remember(decoded.event_id).await;
                        count(&record.topic, result.label());
                        return Finished::Done;
                    }
                    HandleResult::Poison(reason) => {
                        tracing::warn!(%reason, "poison record");
                        return self
                            .dead_letter(&record, &reason, attempt, state, stop)
                            .await;
                    }
                    HandleResult::Transient(reason) => {
                        count(&record.topic, "transient");
                        tracing::warn!(%reason, attempt, retry_in_ms = delay.as_millis() as u64, "transient failure");
                        if !pause(delay, state, stop).await {
                            return Finished::Abandoned;
                        }
                        delay = self.backoff.next(delay);
                        attempt = attempt.saturating_add(1);
                    }
                }
            }
        };
        work.instrument(span).await
    }

    /// Publishes to the dead-letter topic, retrying (without advancing) until the broker acknowledged it.
    async fn dead_letter(
        &self,
        record: &RawRecord,
        error: &str,
        attempt: u32,
        state: &PartitionState,
        stop: &watch::Receiver<bool>,
    ) -> Finished {
        let mut delay = self.backoff.initial;
        loop {
            match self.dlq.publish(record, error, attempt).await {
                Ok(()) => {
                    count(&record.topic, "poison");
                    return Finished::Done;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter publish failed; retrying");
                    if !pause(delay, state, stop).await {
                        return Finished::Abandoned;
                    }
                    delay = self.backoff.next(delay);
                }
            }
        }
    }
}

/// Sleeps `delay` unless shutdown or revocation comes first; false when interrupted.
async fn pause(delay: Duration, state: &PartitionState, stop: &watch::Receiver<bool>) -> bool {
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        if *stop.borrow() || state.revoked.load(Ordering::SeqCst) {
            return false;
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return true;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_millis(50))).await;
    }
}

fn count(topic: &str, result: &'static str) {
    metrics::counter!("consumed_total", "topic" => topic.to_owned(), "result" => result)
        .increment(1);
}
