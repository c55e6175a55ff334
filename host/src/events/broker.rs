//! Where the relay publishes: the built-in broker (in-process subscribers,
//! always available) or Kafka. The event log itself (replay, SSE) is the
//! outbox table, so both brokers serve the same events to HTTP readers.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::OutboxEvent;
use super::kafka::{self, KafkaPublisher};

/// Why a batch was not acknowledged; the relay retries it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PublishError(pub String);

#[derive(Debug)]
pub enum Broker {
    /// In-process fan-out to subscribers of this replica.
    BuiltIn(broadcast::Sender<Arc<OutboxEvent>>),
    Kafka(Arc<KafkaPublisher>),
}

impl Broker {
    pub fn built_in() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self::BuiltIn(tx)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::BuiltIn(_) => "built-in",
            Self::Kafka(_) => "kafka",
        }
    }

    /// How publishing goes (readiness): the built-in broker is always up.
    pub fn state(&self) -> &'static str {
        match self {
            Self::BuiltIn(_) => "up",
            Self::Kafka(k) => k.state(),
        }
    }

    /// Hands a batch to the broker in order; what it returns resolves once
    /// every event of the batch is acknowledged. Several batches may be in
    /// flight at once (their acknowledgements are awaited in order).
    pub async fn send(&self, events: &[OutboxEvent]) -> Result<Acks, PublishError> {
        match self {
            Self::BuiltIn(tx) => {
                for e in events {
                    // No subscriber is not an error: the log keeps the event.
                    let _ = tx.send(Arc::new(e.clone()));
                }
                Ok(Acks::Done)
            }
            Self::Kafka(k) => Ok(Acks::Kafka(k.send(events).await?)),
        }
    }

    /// Follows events published from now on by this replica (built-in only).
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Arc<OutboxEvent>>> {
        match self {
            Self::BuiltIn(tx) => Some(tx.subscribe()),
            Self::Kafka(_) => None,
        }
    }
}

/// The acknowledgements of one batch handed to the broker.
pub enum Acks {
    /// The built-in broker acknowledges on hand-over.
    Done,
    Kafka(kafka::Acks),
}

impl Acks {
    /// Bytes the batch holds in the broker's client until acknowledged.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Done => 0,
            Self::Kafka(acks) => acks.bytes(),
        }
    }

    /// Ok once every event of the batch is acknowledged.
    pub async fn all(self) -> Result<(), PublishError> {
        match self {
            Self::Done => Ok(()),
            Self::Kafka(acks) => acks.all().await,
        }
    }
}
