//! The orchestrator against an in-memory stand-in for the repository port (the real store has its own tests).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::decide;
use super::effect::Effect;
use super::graph::BuiltinResolver;
use super::ids::{Attempt, BatchId, EventId, PhaseName, UserId};
use super::input::{Actor, Input, ResolvedPipeline};
use super::model::{BatchAggregate, PhaseStatus, RunStatus};
use super::orchestrator::{
    Orchestrator, OrchestratorError, RequestOrigin, SystemClock, UuidV7Generator,
};
use super::ports::{
    Applied, BatchPage, BatchRepository, BoxFuture, Clock, IdGenerator, InboxEntry,
    PipelineResolver, RepositoryError, ResolveError, ResolveRequest, TimedOutPhase, UnitOfWork,
};
use super::registration::{validate, RawRegistration};
use super::rejection::Rejection;
use super::test_support::{commands, outcome_for, owner, refs, stranger, t};
use PhaseName::*;

/// The futures here never wait, so polling once is enough.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("an in-memory future was pending"),
    }
}

#[derive(Default)]
struct MemoryRepo {
    batches: Mutex<HashMap<BatchId, BatchAggregate>>,
    inbox: Mutex<HashSet<EventId>>,
    outbox: Mutex<Vec<Effect>>,
}

impl BatchRepository for MemoryRepo {
    fn apply<'a>(
        &'a self,
        unit: UnitOfWork,
        now: DateTime<Utc>,
    ) -> BoxFuture<'a, Result<Applied, RepositoryError>> {
        let result = (|| {
            if let Some(entry) = &unit.inbox {
                if !self.inbox.lock().unwrap().insert(entry.event_id) {
                    return Ok(Applied::Duplicate);
                }
            }
            let mut batches = self.batches.lock().unwrap();
            let decision = decide(batches.get(&unit.batch_id), &unit.input, now)?;
            let mut aggregate = decision.aggregate;
            aggregate.batch.version += 1;
            batches.insert(unit.batch_id, aggregate.clone());
            self.outbox
                .lock()
                .unwrap()
                .extend(decision.effects.iter().cloned());
            Ok(Applied::Changed {
                aggregate: Box::new(aggregate),
                effects: decision.effects,
            })
        })();
        Box::pin(std::future::ready(result))
    }

    fn load<'a>(
        &'a self,
        batch_id: BatchId,
    ) -> BoxFuture<'a, Result<Option<BatchAggregate>, RepositoryError>> {
        Box::pin(std::future::ready(Ok(self
            .batches
            .lock()
            .unwrap()
            .get(&batch_id)
            .cloned())))
    }

    fn list_batches<'a>(
        &'a self,
        _owner: &'a UserId,
        _page_size: u32,
        _page_token: Option<&'a str>,
    ) -> BoxFuture<'a, Result<BatchPage, RepositoryError>> {
        Box::pin(std::future::ready(Ok(BatchPage {
            batches: Vec::new(),
            next_page_token: None,
        })))
    }

    fn timed_out_phases<'a>(
        &'a self,
        dispatched_before: DateTime<Utc>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<TimedOutPhase>, RepositoryError>> {
        let batches = self.batches.lock().unwrap();
        let mut found = Vec::new();
        for agg in batches.values() {
            for p in agg
                .active_run()
                .map(|r| r.phases.as_slice())
                .unwrap_or_default()
            {
                if p.status.is_dispatched()
                    && p.dispatched_at.is_some_and(|at| at <= dispatched_before)
                {
                    found.push(TimedOutPhase {
                        batch_id: agg.batch.id,
                        phase: p.phase,
                        attempt: p.attempt,
                    });
                }
            }
        }
        found.truncate(limit as usize);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn is_processed<'a>(
        &'a self,
        event_id: EventId,
    ) -> BoxFuture<'a, Result<bool, RepositoryError>> {
        let seen = self.inbox.lock().unwrap().contains(&event_id);
        Box::pin(std::future::ready(Ok(seen)))
    }
}

struct TestClock(Mutex<DateTime<Utc>>);

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

struct CountingIds(AtomicU64);

impl IdGenerator for CountingIds {
    fn new_id(&self) -> Uuid {
        Uuid::from_u128(u128::from(self.0.fetch_add(1, Ordering::SeqCst)) + 1)
    }
}

/// The built-in resolver, remembering what it was asked.
#[derive(Default)]
struct RecordingResolver {
    inner: BuiltinResolver,
    asked: Mutex<Vec<ResolveRequest>>,
}

impl PipelineResolver for RecordingResolver {
    fn resolve<'a>(
        &'a self,
        request: &'a ResolveRequest,
    ) -> BoxFuture<'a, Result<ResolvedPipeline, ResolveError>> {
        self.asked.lock().unwrap().push(request.clone());
        self.inner.resolve(request)
    }
}

struct Fixture {
    orch: Orchestrator,
    repo: Arc<MemoryRepo>,
    resolver: Arc<RecordingResolver>,
    clock: Arc<TestClock>,
}

impl Fixture {
    fn new() -> Self {
        let repo = Arc::new(MemoryRepo::default());
        let resolver = Arc::new(RecordingResolver::default());
        let clock = Arc::new(TestClock(Mutex::new(t(0))));
        let orch = Orchestrator::new(
            repo.clone(),
            resolver.clone(),
            clock.clone(),
            Arc::new(CountingIds(AtomicU64::new(0))),
        );
        Self {
            orch,
            repo,
            resolver,
            clock,
        }
    }

    fn advance(&self, secs: i64) {
        let mut now = self.clock.0.lock().unwrap();
        *now += chrono::Duration::seconds(secs);
    }

    /// A registered guest batch with its content provisioned.
    fn ready_guest(&self) -> BatchId {
        let raw = RawRegistration {
            expected_essay_count: 2,
            course_code: "SV1".to_owned(),
            ..RawRegistration::default()
        };
        let registered = block_on(
            self.orch
                .register_batch(validate(raw, owner(), None).unwrap()),
        )
        .unwrap();
        assert_eq!(registered.essay_ids.len(), 2);
        let agg = self.load(registered.batch_id);
        let provisioned = Input::ContentProvisioned {
            essays: refs(&agg, "original"),
            provisioned_count: 2,
            expected_count: 2,
        };
        block_on(
            self.orch
                .handle(registered.batch_id, provisioned, Some(inbox(1))),
        )
        .unwrap();
        registered.batch_id
    }

    fn load(&self, id: BatchId) -> BatchAggregate {
        block_on(self.orch.batch_for(&Actor::User(owner()), id)).unwrap()
    }

    fn last_command(&self) -> super::effect::PhaseCommand {
        let outbox = self.repo.outbox.lock().unwrap();
        commands(&outbox).last().map(|c| (*c).clone()).unwrap()
    }
}

fn inbox(n: u128) -> InboxEntry {
    InboxEntry {
        event_id: EventId::from_uuid(Uuid::from_u128(0xE0_0000 + n)),
        topic: "test.topic".to_owned(),
    }
}

#[test]
fn registration_through_pipeline_completion() {
    let f = Fixture::new();
    let batch = f.ready_guest();
    let accepted = block_on(f.orch.request_pipeline(
        Actor::User(owner()),
        batch,
        Spellcheck,
        RequestOrigin::default(),
    ))
    .unwrap();
    assert_eq!(
        (accepted.phases.clone(), accepted.status),
        (vec![Spellcheck], RunStatus::Running)
    );
    let cmd = f.last_command();
    assert_eq!(cmd.correlation_id, accepted.correlation_id);
    assert_eq!(cmd.language.code(), "sv");

    let applied = block_on(f.orch.handle(batch, outcome_for(&cmd, &[]), Some(inbox(2)))).unwrap();
    let Applied::Changed { aggregate, .. } = applied else {
        panic!("not applied")
    };
    assert_eq!(aggregate.runs[0].status, RunStatus::CompletedSuccessfully);
    // The same event again is a no-op.
    assert_eq!(
        block_on(f.orch.handle(batch, outcome_for(&cmd, &[]), Some(inbox(2)))),
        Ok(Applied::Duplicate)
    );
}

#[test]
fn other_users_batches_do_not_exist_for_them() {
    let f = Fixture::new();
    let batch = f.ready_guest();
    let them = Actor::User(stranger());
    assert_eq!(
        block_on(f.orch.batch_for(&them, batch)),
        Err(OrchestratorError::Rejected(Rejection::NotFound))
    );
    assert_eq!(
        block_on(f.orch.request_pipeline(
            them.clone(),
            batch,
            Spellcheck,
            RequestOrigin::default()
        )),
        Err(OrchestratorError::Rejected(Rejection::NotFound))
    );
    assert_eq!(
        block_on(
            f.orch
                .retry_phase(them, batch, Spellcheck, None, RequestOrigin::default())
        ),
        Err(OrchestratorError::Rejected(Rejection::NotFound))
    );
    assert!(f.resolver.asked.lock().unwrap().is_empty());
}

#[test]
fn a_request_while_running_is_refused_before_resolution() {
    let f = Fixture::new();
    let batch = f.ready_guest();
    let first = block_on(f.orch.request_pipeline(
        Actor::User(owner()),
        batch,
        Nlp,
        RequestOrigin::default(),
    ))
    .unwrap();
    let second = block_on(f.orch.request_pipeline(
        Actor::Internal,
        batch,
        AiFeedback,
        RequestOrigin::default(),
    ));
    assert_eq!(
        second,
        Err(OrchestratorError::Rejected(Rejection::RunActive {
            run_id: first.run_id
        }))
    );
    assert_eq!(f.resolver.asked.lock().unwrap().len(), 1);
    let sm = block_on(f.orch.request_pipeline(
        Actor::Internal,
        batch,
        StudentMatching,
        RequestOrigin::default(),
    ));
    assert!(matches!(
        sm,
        Err(OrchestratorError::Rejected(Rejection::Invalid(_)))
    ));
}

#[test]
fn retry_resolves_without_the_retried_phase_and_uses_one_correlation_id() {
    let f = Fixture::new();
    let batch = f.ready_guest();
    block_on(f.orch.request_pipeline(
        Actor::User(owner()),
        batch,
        Spellcheck,
        RequestOrigin::default(),
    ))
    .unwrap();
    let cmd = f.last_command();
    block_on(
        f.orch
            .handle(batch, outcome_for(&cmd, &[cmd.essays[0].essay_id]), None),
    )
    .unwrap();

    let retry = block_on(f.orch.retry_phase(
        Actor::User(owner()),
        batch,
        Spellcheck,
        Some("flaky".to_owned()),
        RequestOrigin::default(),
    ))
    .unwrap();
    let asked = f.resolver.asked.lock().unwrap().last().cloned().unwrap();
    assert!(
        asked.done.is_empty(),
        "the retried phase must not be pruned: {asked:?}"
    );
    assert_eq!(asked.correlation_id, retry.correlation_id);
    let cmd2 = f.last_command();
    assert_eq!(cmd2.attempt, Attempt::FIRST.next());
    assert_eq!(cmd2.correlation_id, retry.correlation_id);
    assert_eq!(cmd2.essays.len(), 1);
    let agg = f.load(batch);
    assert!(agg.runs[1].is_retry);
    assert_eq!(agg.runs[1].correlation_id, retry.correlation_id);
}

#[test]
fn a_redelivered_retry_event_is_a_duplicate_before_any_state_check() {
    let f = Fixture::new();
    let batch = f.ready_guest();
    block_on(f.orch.request_pipeline(
        Actor::User(owner()),
        batch,
        Spellcheck,
        RequestOrigin::default(),
    ))
    .unwrap();
    let cmd = f.last_command();
    let all_failed: Vec<_> = cmd.essays.iter().map(|e| e.essay_id).collect();
    block_on(f.orch.handle(batch, outcome_for(&cmd, &all_failed), None)).unwrap();
    let asked_before = f.resolver.asked.lock().unwrap().len();

    let retry = || {
        block_on(f.orch.retry_phase(
            Actor::User(owner()),
            batch,
            Spellcheck,
            None,
            RequestOrigin::event(inbox(7), None),
        ))
    };
    let first = retry().unwrap();
    // While the retry runs (a refusal by state would say RunActive) ...
    assert_eq!(retry(), Err(OrchestratorError::Duplicate));
    let cmd2 = f.last_command();
    block_on(f.orch.handle(batch, outcome_for(&cmd2, &[]), None)).unwrap();
    assert_eq!(
        f.load(batch).runs[1].status,
        RunStatus::CompletedSuccessfully
    );
    // ... and after it ended (the phase is no longer retryable).
    assert_eq!(retry(), Err(OrchestratorError::Duplicate));

    let agg = f.load(batch);
    assert_eq!(agg.runs.len(), 2);
    assert_eq!(agg.runs[1].id, first.run_id);
    assert_eq!(f.resolver.asked.lock().unwrap().len(), asked_before + 1);
    // The same holds for a plain request event.
    assert_eq!(
        block_on(f.orch.request_pipeline(
            Actor::User(owner()),
            batch,
            Nlp,
            RequestOrigin::event(inbox(7), None),
        )),
        Err(OrchestratorError::Duplicate)
    );
}

#[test]
fn a_requests_prompt_ref_reaches_the_commands_that_carry_a_prompt() {
    let f = Fixture::new();
    let batch = f.ready_guest();
    let origin = RequestOrigin::default().with_prompt_ref(Some(" prompt://v2 ".to_owned()));
    block_on(
        f.orch
            .request_pipeline(Actor::User(owner()), batch, CjAssessment, origin),
    )
    .unwrap();
    assert_eq!(
        f.load(batch).batch.student_prompt_ref.as_deref(),
        Some("prompt://v2")
    );
    let spellcheck = f.last_command();
    block_on(f.orch.handle(batch, outcome_for(&spellcheck, &[]), None)).unwrap();
    let cj = f.last_command();
    assert_eq!(cj.phase, CjAssessment);
    assert_eq!(cj.student_prompt_ref.as_deref(), Some("prompt://v2"));

    // A bad one is refused naming the field, before the resolver is asked.
    block_on(f.orch.handle(batch, outcome_for(&cj, &[]), None)).unwrap();
    let asked = f.resolver.asked.lock().unwrap().len();
    let origin = RequestOrigin::default().with_prompt_ref(Some("p".repeat(513)));
    let refused =
        block_on(
            f.orch
                .request_pipeline(Actor::User(owner()), batch, AiFeedback, origin),
        );
    let Err(OrchestratorError::Rejected(Rejection::Invalid(invalid))) = refused else {
        panic!("not refused: {refused:?}")
    };
    assert_eq!(invalid.field, "prompt_ref");
    assert_eq!(f.resolver.asked.lock().unwrap().len(), asked);
}

#[test]
fn overdue_phases_time_out_once() {
    let f = Fixture::new();
    let batch = f.ready_guest();
    block_on(f.orch.request_pipeline(
        Actor::User(owner()),
        batch,
        Spellcheck,
        RequestOrigin::default(),
    ))
    .unwrap();
    let timeout = Duration::from_secs(900);
    f.advance(899);
    assert_eq!(block_on(f.orch.time_out_overdue(timeout, 10)), Ok(0));
    f.advance(1);
    assert_eq!(block_on(f.orch.time_out_overdue(timeout, 10)), Ok(1));
    let phase = f.load(batch).runs[0].phases[0].clone();
    assert_eq!(
        (phase.status, phase.error.as_deref()),
        (PhaseStatus::Failed, Some("timeout"))
    );
    assert_eq!(block_on(f.orch.time_out_overdue(timeout, 10)), Ok(0));
}

#[test]
fn missing_batches_are_not_found() {
    let f = Fixture::new();
    let nowhere = BatchId::from_uuid(Uuid::from_u128(404));
    assert_eq!(
        block_on(f.orch.handle(
            nowhere,
            Input::Cancel {
                actor: Actor::Internal,
                reason: None
            },
            None
        )),
        Err(OrchestratorError::Rejected(Rejection::NotFound))
    );
}

#[test]
fn system_clock_and_ids() {
    let id = UuidV7Generator.new_id();
    assert_eq!(id.get_version_num(), 7);
    assert_ne!(id, UuidV7Generator.new_id());
    assert!(SystemClock.now() > t(0));
}
