//! Where the relay publishes: the built-in broker (in-process subscribers,
//! always available) or Kafka. The event log itself (replay, SSE) is the
//! outbox table, so both brokers serve the same events to HTTP readers.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::OutboxEvent;
use super::kafka::KafkaPublisher;

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

    /// Publishes a batch in order; `Ok` means every event was acknowledged.
    pub async fn publish(&self, events: &[OutboxEvent]) -> Result<(), PublishError> {
        match self {
            Self::BuiltIn(tx) => {
                for e in events {
                    // No subscriber is not an error: the log keeps the event.
                    let _ = tx.send(Arc::new(e.clone()));
                }
                Ok(())
            }
            Self::Kafka(k) => k.publish(events).await,
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
