//! Kafka, through rdkafka (the only module that imports it): an idempotent
//! producer (`acks=all`) for the relay, topic creation, and the consumer
//! group that applies `auth.tenant.*` events.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI8, Ordering};
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
    /// CloudEvents structured content mode instead of binary.
    pub structured: bool,
    /// One more topic holding every record event, keyed by record.
    pub record_topic: Option<String>,
    pub partitions: i32,
    pub replication: i32,
    pub group_id: String,
    pub dead_letter_topic: String,
}

pub struct KafkaPublisher {
    /// Whether the last batch was acknowledged (readiness): see [`Health`].
    health: Arc<AtomicI8>,
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
            health: Arc::new(AtomicI8::new(Health::UNKNOWN)),
            producer,
            admin,
            config,
            known_topics: Mutex::new(HashSet::new()),
        })
    }

    /// How publishing goes: `unknown` (nothing published by this replica
    /// yet: only the relay's leader publishes), `up` (the last batch was
    /// acknowledged) or `failing`.
    pub fn state(&self) -> &'static str {
        match self.health.load(Ordering::Relaxed) {
            Health::UP => "up",
            Health::FAILING => "failing",
            _ => "unknown",
        }
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
        // Each event to its type's topic, and record events to the record
        // topic too when there is one.
        let topics: Vec<(String, Option<&String>)> = events
            .iter()
            .map(|e| {
                let record_topic = self
                    .config
                    .record_topic
                    .as_ref()
                    .filter(|_| e.kind.starts_with(super::envelope::DATA_PREFIX));
                (self.topic_of(e), record_topic)
            })
            .collect();
        let mut distinct: Vec<String> = topics
            .iter()
            .flat_map(|(t, r)| std::iter::once(t).chain(*r).cloned())
            .collect();
        distinct.sort();
        distinct.dedup();
        self.ensure_topics(&distinct).await?;
        let mut pending = Vec::with_capacity(events.len());
        let mut bytes = 0;
        for (e, (topic, record_topic)) in events.iter().zip(&topics) {
            // Built once, sent to one topic or two.
            let message = CloudEventMessage::of(&e.envelope, self.config.structured);
            for topic in std::iter::once(topic).chain(*record_topic) {
                let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
                for (key, value) in &message.headers {
                    headers = headers.insert(Header {
                        key: key.as_str(),
                        value: Some(value.as_str()),
                    });
                }
                bytes += message.value.len() + e.kafka_key.len();
                let record = FutureRecord::to(topic)
                    .key(e.kafka_key.as_str())
                    .payload(message.value.as_str())
                    .headers(headers);
                let delivery = self.producer.send_result(record).map_err(|(err, _)| {
                    self.health.store(Health::FAILING, Ordering::Relaxed);
                    PublishError(format!("enqueueing to {topic}: {err}"))
                })?;
                pending.push(delivery);
            }
        }
        Ok(Acks {
            pending,
            bytes,
            health: self.health.clone(),
        })
    }
}

/// An event as a Kafka message, by the CloudEvents Kafka protocol binding.
/// Binary content mode: every attribute a `ce_<name>` header (its string
/// form), `datacontenttype` the `content-type` header, `data` the value.
/// Structured mode: the whole envelope as the value, `content-type:
/// application/cloudevents+json`, and no `ce_` headers (a reader that sees
/// one takes the message for binary mode).
#[derive(Debug, PartialEq)]
struct CloudEventMessage {
    headers: Vec<(String, String)>,
    value: String,
}

impl CloudEventMessage {
    fn of(envelope: &serde_json::Value, structured: bool) -> Self {
        if structured {
            return Self {
                headers: vec![("content-type".into(), "application/cloudevents+json".into())],
                value: envelope.to_string(),
            };
        }
        let mut headers = Vec::new();
        let mut content_type = "application/json".to_owned();
        let mut value = String::new();
        if let Some(attributes) = envelope.as_object() {
            for (name, v) in attributes {
                match (name.as_str(), v) {
                    ("data", data) => value = data.to_string(),
                    ("datacontenttype", serde_json::Value::String(t)) => content_type = t.clone(),
                    (_, serde_json::Value::Null) => {}
                    (_, serde_json::Value::String(text)) => {
                        headers.push((format!("ce_{name}"), text.clone()));
                    }
                    (_, other) => headers.push((format!("ce_{name}"), other.to_string())),
                }
            }
        }
        headers.push(("content-type".into(), content_type));
        Self { headers, value }
    }
}

/// The broker's acknowledgements of an enqueued batch (they arrive whether
/// or not anyone waits for them).
pub struct Acks {
    pending: Vec<DeliveryFuture>,
    /// What the batch holds in the producer's queue until acknowledged.
    bytes: usize,
    health: Arc<AtomicI8>,
}

/// The values of [`KafkaPublisher::health`].
struct Health;

impl Health {
    const UNKNOWN: i8 = 0;
    const UP: i8 = 1;
    const FAILING: i8 = -1;
}

impl Acks {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Ok once every message of the batch is acknowledged.
    pub async fn all(self) -> Result<(), PublishError> {
        for delivery in self.pending {
            let failure = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((err, _))) => format!("not acknowledged: {err}"),
                Err(_) => "the producer went away".to_owned(),
            };
            self.health.store(Health::FAILING, Ordering::Relaxed);
            return Err(PublishError(failure));
        }
        self.health.store(Health::UP, Ordering::Relaxed);
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
            tracing::warn!(topic, partition = msg.partition(), offset = msg.offset(), reason = %reason,
                dead_letter_topic = %config.dead_letter_topic, "consumed message dead-lettered");
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::CloudEventMessage;

    fn envelope() -> serde_json::Value {
        json!({
            "specversion": "1.0", "id": "e-1", "source": "/business-store/a",
            "type": "business_store.data.created", "subject": "invoices/1",
            "time": "2026-12-07T10:00:00Z", "datacontenttype": "application/json",
            "tenantid": "acme", "correlationid": "", "seq": 7, "data": {"n": 1}
        })
    }

    #[test]
    fn binary_mode_puts_attributes_in_headers_and_data_in_the_value() {
        let m = CloudEventMessage::of(&envelope(), false);
        assert_eq!(m.value, r#"{"n":1}"#);
        let header = |k: &str| {
            m.headers
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(header("ce_id"), Some("e-1"));
        assert_eq!(header("ce_specversion"), Some("1.0"));
        assert_eq!(header("ce_time"), Some("2026-12-07T10:00:00Z"));
        assert_eq!(header("ce_seq"), Some("7"));
        assert_eq!(header("content-type"), Some("application/json"));
        assert_eq!(header("ce_data"), None);
        assert_eq!(header("ce_datacontenttype"), None);
    }

    #[test]
    fn structured_mode_sends_the_envelope_without_ce_headers() {
        let m = CloudEventMessage::of(&envelope(), true);
        assert_eq!(
            m.headers,
            vec![(
                "content-type".to_owned(),
                "application/cloudevents+json".to_owned()
            )]
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&m.value).unwrap(),
            envelope()
        );
    }
}
