//! The consuming side assembled the way `bos serve` assembles it (store with the protobuf encoder, orchestrator
//! with the built-in resolver, outbox relay, consumer with dedupe and dead letters) on a mock cluster, a fresh
//! PostgreSQL database and optionally Redis; plus a driver that plays the other services for one batch.

#![allow(dead_code)] // shared by several test crates, each using a part

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bos::core::graph::{BuiltinResolver, DependencyGraph};
use bos::core::ids::{BatchId, EssayId, PhaseName, UserId};
use bos::core::input::Actor;
use bos::core::model::{BatchAggregate, BatchStatus};
use bos::core::orchestrator::{Orchestrator, Registered, SystemClock, UuidV7Generator};
use bos::core::registration::{validate, RawRegistration};
use bos::events::broker::EmbeddedBroker;
use bos::events::codec::{
    decode_payload, encode_message, published_topics, topic_for, EncodedRecord, EnvelopeMeta,
    ProtobufEffectEncoder, TraceContext,
};
use bos::events::consumer::{ConsumerSettings, EventConsumer};
use bos::events::dedupe::{Dedupe, DedupeConfig};
use bos::events::dlq::DlqPublisher;
use bos::events::handlers::EventHandler;
use bos::events::relay::{DeliveryListener, Relay, RelayConfig};
use bos::proto::huleedu::common::v1 as pc;
use bos::proto::huleedu::events::v1 as pe;
use bos::store::entities::event_outbox;
use bos::store::Store;
use prost::{Message, Name};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use sea_orm::{EntityTrait, QueryOrder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::kafka::{
    group_overrides, start_cluster, ReadRecord, TestProducer, TopicReader,
};
use crate::support::TestDb;

#[path = "checks.rs"]
mod checks;
#[allow(unused_imports)] // each test crate uses a part
pub use checks::{check_published, command_of, shape, PhaseShape, RunShape, Shape};

pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Harness {
    pub broker: EmbeddedBroker,
    /// Held so the database lives exactly as long as the harness.
    _db: TestDb,
    pub store: Store,
    pub orchestrator: Arc<Orchestrator>,
    pub producer: TestProducer,
    pub dedupe: Dedupe,
    group: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    pub consumers: Vec<ConsumerHandle>,
}

/// One running consumer group member.
pub struct ConsumerHandle {
    pub stop: Arc<watch::Sender<bool>>,
    pub task: JoinHandle<()>,
}

impl Harness {
    /// Everything running; `redis_url` enables the fast path (with a key prefix of its own).
    pub async fn start(redis_url: Option<&str>) -> Harness {
        let broker = start_cluster();
        let bootstrap = broker.bootstrap_servers().to_owned();
        let db = TestDb::postgres().await;
        let store = Store::connect(&db.url)
            .await
            .expect("connect")
            .with_encoder(Arc::new(ProtobufEffectEncoder));
        store.migrate().await.expect("migrate");
        let orchestrator = Arc::new(Orchestrator::new(
            Arc::new(store.clone()),
            Arc::new(BuiltinResolver::new(DependencyGraph::builtin())),
            Arc::new(SystemClock),
            Arc::new(UuidV7Generator),
        ));
        let (stop, _) = watch::channel(false);
        let mut tasks = Vec::new();

        let relay_config = RelayConfig {
            poll_interval: Duration::from_millis(50),
            ..RelayConfig::default()
        };
        let listener: Arc<dyn DeliveryListener> = orchestrator.clone();
        let relay =
            Relay::new(store.clone(), &bootstrap, Some(listener), relay_config).expect("relay");
        tasks.push(tokio::spawn(relay.run(stopped(&stop))));

        let dedupe = match redis_url {
            Some(url) => Dedupe::redis(DedupeConfig {
                key_prefix: format!("bos:test:{}:seen:", Uuid::now_v7()),
                ..DedupeConfig::new(url)
            })
            .expect("redis url"),
            None => Dedupe::disabled(),
        };
        let mut harness = Harness {
            producer: TestProducer::new(&bootstrap),
            broker,
            _db: db,
            store,
            orchestrator,
            dedupe,
            group: format!("bos-test-{}", Uuid::now_v7()),
            stop,
            tasks,
            consumers: Vec::new(),
        };
        let first = harness.start_consumer();
        harness.consumers.push(first);
        harness
    }

    /// Another member of the BOS consumer group (a second replica), sharing store, orchestrator and dedupe.
    pub fn start_consumer(&self) -> ConsumerHandle {
        let bootstrap = self.bootstrap().to_owned();
        let handler = EventHandler::new(self.orchestrator.clone());
        let dlq = DlqPublisher::new(&bootstrap, &[]).expect("dlq producer");
        let mut settings = ConsumerSettings::new(&bootstrap, &self.group);
        settings.overrides = group_overrides();
        let consumer =
            EventConsumer::new(&settings, handler, self.dedupe.clone(), dlq).expect("consumer");
        let (stop, _) = watch::channel(false);
        let task = tokio::spawn(consumer.run(stopped(&stop)));
        ConsumerHandle {
            stop: Arc::new(stop),
            task,
        }
    }

    /// Stops the consumer the harness started with (the others keep running).
    pub fn first_consumer_stopper(&self) -> Arc<watch::Sender<bool>> {
        self.consumers[0].stop.clone()
    }

    pub fn bootstrap(&self) -> &str {
        self.broker.bootstrap_servers()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let consumers = self.consumers.into_iter().map(|c| {
            let _ = c.stop.send(true);
            c.task
        });
        for task in self.tasks.into_iter().chain(consumers) {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("tasks stop in time")
                .expect("task did not panic");
        }
    }

    pub async fn register(&self, owner: &str, essays: i64, regular: bool) -> Registered {
        let raw = RawRegistration {
            expected_essay_count: essays,
            course_code: "ENG5".into(),
            class_id: regular.then(|| "class-1".to_owned()),
            student_prompt_ref: Some("prompt-1".into()),
            assignment_id: None,
            cj_default_llm_model: None,
            cj_default_temperature: None,
        };
        let valid = validate(raw, UserId::parse("owner", owner).unwrap(), None)
            .expect("valid registration");
        self.orchestrator
            .register_batch(valid)
            .await
            .expect("register")
    }

    pub async fn load(&self, batch_id: BatchId) -> BatchAggregate {
        self.orchestrator
            .batch_for(&Actor::Internal, batch_id)
            .await
            .expect("batch exists")
    }

    pub async fn wait_status(&self, batch_id: BatchId, status: BatchStatus) -> BatchAggregate {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let agg = self.load(batch_id).await;
            if agg.batch.status == status {
                return agg;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "batch stuck in {:?}, wanted {status:?}",
                agg.batch.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Outbox rows by event id.
    pub async fn outbox(&self) -> HashMap<Uuid, event_outbox::Model> {
        event_outbox::Entity::find()
            .order_by_asc(event_outbox::Column::Id)
            .all(self.store.connection())
            .await
            .expect("read the outbox")
            .into_iter()
            .map(|row| (row.event_id, row))
            .collect()
    }
}

fn stopped(stop: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = stop.subscribe();
    async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

/// Wraps a payload as the service that owns its topic would send it (new event id, a trace of its own).
pub fn envelope<M: Message + Name>(message: &M, batch_id: BatchId) -> EncodedRecord {
    let meta = EnvelopeMeta {
        event_id: bos::core::ids::EventId::from_uuid(Uuid::now_v7()),
        correlation_id: bos::core::ids::CorrelationId::from_uuid(Uuid::now_v7()),
        timestamp: chrono::Utc::now(),
        trace: TraceContext::new_root(),
    };
    encode_message(message, &batch_id.to_string(), &meta).expect("encode")
}

/// How the test services deliver what they send.
#[derive(Debug, Clone, Copy)]
pub enum Delivery {
    Once,
    /// Every record `times` times, shuffled within the step together with redeliveries of earlier records.
    Repeated {
        times: usize,
        seed: u64,
    },
}

/// Plays the file service, class management, the API gateway and the essay lifecycle service for one batch.
pub struct Driver<'a> {
    h: &'a Harness,
    pub batch_id: BatchId,
    owner: String,
    essays: Vec<EssayId>,
    reader: TopicReader,
    delivery: Delivery,
    rng: StdRng,
    sent: Vec<EncodedRecord>,
    /// Every record BOS published for this batch, in the order read.
    pub seen: Vec<ReadRecord>,
}

impl<'a> Driver<'a> {
    pub fn new(
        h: &'a Harness,
        registered: &Registered,
        owner: &str,
        delivery: Delivery,
    ) -> Driver<'a> {
        let seed = match delivery {
            Delivery::Once => 0,
            Delivery::Repeated { seed, .. } => seed,
        };
        Driver {
            h,
            batch_id: registered.batch_id,
            owner: owner.to_owned(),
            essays: registered.essay_ids.clone(),
            reader: TopicReader::new(h.bootstrap(), &published_topics()),
            delivery,
            rng: StdRng::seed_from_u64(seed),
            sent: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn index(&self, essay_id: &str) -> usize {
        self.essays
            .iter()
            .position(|e| e.to_string() == essay_id)
            .expect("an essay of this batch")
    }

    fn original_refs(&self) -> Vec<pc::EssayRef> {
        self.essays
            .iter()
            .enumerate()
            .map(|(i, e)| pc::EssayRef {
                essay_id: e.to_string(),
                text_storage_id: format!("orig-{i}"),
            })
            .collect()
    }

    pub async fn deliver(&mut self, new: Vec<EncodedRecord>) {
        let mut out = Vec::new();
        match self.delivery {
            Delivery::Once => out.extend(new.iter().cloned()),
            Delivery::Repeated { times, .. } => {
                for record in &new {
                    out.extend(std::iter::repeat_n(record.clone(), times));
                }
                out.extend(self.sent.choose_multiple(&mut self.rng, 2).cloned());
                out.shuffle(&mut self.rng);
            }
        }
        for record in &out {
            self.h.producer.send(record).await;
        }
        self.sent.extend(new);
    }

    /// The next record BOS published for this batch.
    pub async fn next(&mut self) -> ReadRecord {
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let record = self.reader.next(left).await.unwrap_or_else(|| {
                panic!(
                    "no record for batch {} within {DEADLINE:?}; seen {:#?}",
                    self.batch_id,
                    self.topics_seen()
                )
            });
            if record.key.as_deref() == Some(self.batch_id.to_string().as_str()) {
                self.seen.push(record.clone());
                return record;
            }
        }
    }

    /// Whatever else BOS publishes for this batch until nothing more comes for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<ReadRecord> {
        let key = self.batch_id.to_string();
        let records: Vec<ReadRecord> = self
            .reader
            .drain(quiet)
            .await
            .into_iter()
            .filter(|r| r.key.as_deref() == Some(key.as_str()))
            .collect();
        self.seen.extend(records.iter().cloned());
        records
    }

    pub fn topics_seen(&self) -> Vec<String> {
        self.seen.iter().map(|r| r.topic.clone()).collect()
    }

    async fn expect<M: Message + Name + Default>(&mut self) -> M {
        let record = self.next().await;
        assert_eq!(
            Some(record.topic.clone()),
            topic_for::<M>(),
            "unexpected record {record:?}"
        );
        decode_payload::<M>(&record.topic, Some(&record.payload))
            .expect("decodes")
            .1
    }

    /// Registration event → content provisioning → (REGULAR: student matching, associations, essays ready) →
    /// READY_FOR_PIPELINE_EXECUTION.
    pub async fn prepare(&mut self, regular: bool) {
        let registered: pe::BatchEssaysRegistered = self.expect().await;
        assert_eq!(registered.essay_ids.len(), self.essays.len());
        let provisioning = pe::BatchContentProvisioningCompleted {
            batch_id: self.batch_id.to_string(),
            provisioned_count: self.essays.len() as i32,
            expected_count: self.essays.len() as i32,
            course_code: pc::CourseCode::Eng5 as i32,
            user_id: self.owner.clone(),
            essays_for_processing: self.original_refs(),
        };
        let record = envelope(&provisioning, self.batch_id);
        self.deliver(vec![record]).await;
        if regular {
            let command: pe::StudentMatchingInitiateCommand = self.expect().await;
            assert_eq!(command.attempt, 1);
            let associations = pe::StudentAssociationsConfirmed {
                batch_id: self.batch_id.to_string(),
                class_id: command.class_id.clone(),
                course_code: command.course_code,
                associations: command
                    .essays_to_process
                    .iter()
                    .map(|e| pe::student_associations_confirmed::StudentAssociation {
                        essay_id: e.essay_id.clone(),
                        student_id: format!("student-{}", self.index(&e.essay_id)),
                        confidence: 0.9,
                        validation_method: pc::ValidationMethod::Human as i32,
                        ..Default::default()
                    })
                    .collect(),
                timeout_triggered: false,
            };
            let ready = pe::BatchEssaysReady {
                batch_id: self.batch_id.to_string(),
                ready_essays: self.original_refs(),
                course_code: pc::CourseCode::Eng5 as i32,
                class_type: pc::ClassType::Regular as i32,
            };
            let records = vec![
                envelope(&associations, self.batch_id),
                envelope(&ready, self.batch_id),
            ];
            self.deliver(records).await;
        }
        self.h
            .wait_status(self.batch_id, BatchStatus::ReadyForPipelineExecution)
            .await;
    }

    pub async fn request(&mut self, requested: PhaseName) {
        let request = pe::ClientBatchPipelineRequest {
            batch_id: self.batch_id.to_string(),
            requested_pipeline: bos::events::codec::phase_to_proto(requested) as i32,
            user_id: self.owner.clone(),
            ..Default::default()
        };
        let record = envelope(&request, self.batch_id);
        self.deliver(vec![record]).await;
    }

    /// Answers every phase command with a successful outcome until the pipeline-completed event arrives;
    /// `after_first_outcome` runs once, right after the first answer was sent.
    pub async fn answer_until_complete(
        &mut self,
        mut after_first_outcome: Option<Box<dyn FnOnce() + Send + '_>>,
    ) -> pe::BatchPipelineCompleted {
        let completed_topic = topic_for::<pe::BatchPipelineCompleted>();
        loop {
            let record = self.next().await;
            if Some(record.topic.clone()) == completed_topic {
                return decode_payload::<pe::BatchPipelineCompleted>(
                    &record.topic,
                    Some(&record.payload),
                )
                .expect("decodes")
                .1;
            }
            let (phase, attempt, essays) =
                command_of(&record).unwrap_or_else(|| panic!("not a command: {record:?}"));
            let outcome = pe::BatchPhaseOutcome {
                batch_id: self.batch_id.to_string(),
                phase,
                phase_status: pc::PhaseOutcomeStatus::CompletedSuccessfully as i32,
                processed_essays: essays
                    .iter()
                    .map(|e| pe::batch_phase_outcome::ProcessedEssay {
                        essay_id: e.essay_id.clone(),
                        output_text_storage_id: format!("out-{phase}-{}", self.index(&e.essay_id)),
                    })
                    .collect(),
                failed_essay_ids: vec![],
                attempt,
            };
            let record = envelope(&outcome, self.batch_id);
            self.deliver(vec![record]).await;
            if let Some(hook) = after_first_outcome.take() {
                hook();
            }
        }
    }
}
