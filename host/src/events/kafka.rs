//! Kafka, through rdkafka (the only module that imports it): an idempotent
//! producer (`acks=all`) for the relay, topic creation, and the consumer
//! group that applies `auth.tenant.*` events.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::Mutex;

use super::OutboxEvent;
use super::broker::PublishError;
use super::consumer::{self, CONSUMED_TOPICS, Outcome};
use crate::app_state::SharedState;

/// How the service uses Kafka.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// `business_store.data.<resource>.<action>` instead of the event type.
    pub topic_per_resource: bool,
    pub create_topics: bool,
    pub partitions: i32,
    pub replication: i32,
    pub group_id: String,
    pub dead_letter_topic: String,
}

pub struct KafkaPublisher {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    config: KafkaConfig,
    known_topics: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("brokers", &self.config.brokers)
            .finish()
    }
}

fn client_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

impl KafkaPublisher {
    pub fn new(config: KafkaConfig) -> anyhow::Result<Self> {
        let producer = client_config(&config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "15000")
            .create()?;
        let admin = client_config(&config.brokers).create()?;
        Ok(Self {
            producer,
            admin,
            config,
            known_topics: Mutex::new(HashSet::new()),
        })
    }

    /// The topic of an event: its type, or per resource when configured.
    pub fn topic_of(&self, e: &OutboxEvent) -> String {
        match (
            self.config.topic_per_resource,
            e.kind.strip_prefix("business_store.data."),
        ) {
            (true, Some(action)) => format!("business_store.data.{}.{action}", e.resource),
            _ => e.kind.clone(),
        }
    }

    /// Creates topics that do not exist yet (when configured to).
    pub async fn ensure_topics(&self, topics: &[String]) -> Result<(), PublishError> {
        if !self.config.create_topics {
            return Ok(());
        }
        let mut known = self.known_topics.lock().await;
        let missing: Vec<&String> = topics.iter().filter(|t| !known.contains(*t)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = self
            .admin
            .create_topics(new.iter(), &opts)
            .await
            .map_err(|e| PublishError(format!("creating topics: {e}")))?;
        for r in results {
            match r {
                Ok(t) | Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    known.insert(t);
                }
                Err((t, code)) => return Err(PublishError(format!("creating topic {t}: {code}"))),
            }
        }
        Ok(())
    }

    /// Enqueues a batch, in order, and returns its acknowledgements to
    /// wait for: the relay keeps several batches in flight. The idempotent
    /// producer keeps per-partition order across its retries; keys put all
    /// events of one record on one partition.
    pub async fn send(&self, events: &[OutboxEvent]) -> Result<Acks, PublishError> {
        let topics: Vec<String> = events.iter().map(|e| self.topic_of(e)).collect();
        let mut distinct = topics.clone();
        distinct.sort();
        distinct.dedup();
        self.ensure_topics(&distinct).await?;
        let mut pending = Vec::with_capacity(events.len());
        let mut bytes = 0;
        for (e, topic) in events.iter().zip(&topics) {
            let id = e.event_id.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "ce_id",
                    value: Some(id.as_str()),
                })
                .insert(Header {
                    key: "ce_type",
                    value: Some(e.kind.as_str()),
                })
                .insert(Header {
                    key: "ce_tenantid",
                    value: Some(e.tenant_id.as_str()),
                })
                .insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json"),
                });
            let payload = e.envelope.to_string();
            bytes += payload.len() + e.kafka_key.len();
            let record = FutureRecord::to(topic)
                .key(e.kafka_key.as_str())
                .payload(payload.as_str())
                .headers(headers);
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(err, _)| PublishError(format!("enqueueing to {topic}: {err}")))?;
            pending.push(delivery);
        }
        Ok(Acks { pending, bytes })
    }
}

/// The broker's acknowledgements of an enqueued batch (they arrive whether
/// or not anyone waits for them).
pub struct Acks {
    pending: Vec<DeliveryFuture>,
    /// What the batch holds in the producer's queue until acknowledged.
    bytes: usize,
}

impl Acks {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Ok once every message of the batch is acknowledged.
    pub async fn all(self) -> Result<(), PublishError> {
        for delivery in self.pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => return Err(PublishError(format!("not acknowledged: {err}"))),
                Err(_) => return Err(PublishError("the producer went away".into())),
            }
        }
        Ok(())
    }
}

/// Runs the consumer group on `auth.tenant.*` until the process stops.
/// An offset is committed only after its message's effect (or, for a
/// malformed message, after it reached the dead-letter topic).
pub async fn consume(state: SharedState, config: KafkaConfig, publisher: Arc<KafkaPublisher>) {
    let mut topics: Vec<String> = CONSUMED_TOPICS.iter().map(|t| t.to_string()).collect();
    topics.push(config.dead_letter_topic.clone());
    loop {
        if let Err(e) = publisher.ensure_topics(&topics).await {
            tracing::warn!(error = %e, "cannot create the consumed topics yet");
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        match run_consumer(&state, &config, &publisher).await {
            Ok(()) => return,
            Err(e) => {
                metrics::counter!("consumer_errors_total", "kind" => "client").increment(1);
                tracing::warn!(error = %e, "the tenant-event consumer failed; restarting");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn run_consumer(
    state: &SharedState,
    config: &KafkaConfig,
    publisher: &KafkaPublisher,
) -> anyhow::Result<()> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        client_config(&config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?,
    );
    consumer.subscribe(CONSUMED_TOPICS)?;
    let mut lag_checked = std::time::Instant::now();
    loop {
        let msg = consumer.recv().await?;
        let topic = msg.topic().to_owned();
        let payload = msg.payload().unwrap_or_default().to_vec();
        let outcome = consumer::handle_until_done(state, &topic, &payload).await;
        if let Outcome::Malformed(reason) = &outcome {
            let key = format!("{topic}/{}/{}", msg.partition(), msg.offset());
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "dlq_topic",
                    value: Some(topic.as_str()),
                })
                .insert(Header {
                    key: "dlq_reason",
                    value: Some(reason.as_str()),
                });
            let record = FutureRecord::to(&config.dead_letter_topic)
                .key(key.as_str())
                .payload(payload.as_slice())
                .headers(headers);
            publisher
                .producer
                .send(record, Duration::from_secs(10))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("dead-lettering a message: {e}"))?;
        }
        // Async: never blocks the runtime; a commit lost in a crash only means
        // redelivery, and the handlers are idempotent.
        consumer.commit_message(&msg, CommitMode::Async)?;
        if lag_checked.elapsed() > Duration::from_secs(5) {
            lag_checked = std::time::Instant::now();
            report_lag(consumer.clone(), topic, msg.partition(), msg.offset());
        }
    }
}

/// Sets `consumer_lag` for a partition (a broker round trip, off the loop).
fn report_lag(consumer: Arc<StreamConsumer>, topic: String, partition: i32, offset: i64) {
    tokio::task::spawn_blocking(move || {
        if let Ok((_, high)) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(2))
        {
            let lag = (high - offset - 1).max(0);
            metrics::gauge!("consumer_lag", "topic" => topic, "partition" => partition.to_string())
                .set(lag as f64);
        }
    });
}
