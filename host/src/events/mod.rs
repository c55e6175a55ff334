//! Events: every change to a schema or record becomes a CloudEvent, written
//! to the outbox in the same transaction as the change (`outbox`), sequenced
//! into the tenant's event log and published by the relay (`relay`) to the
//! broker (`broker`: built-in, or Kafka). Clients replay the log and follow
//! it live (`api::events`).

pub mod broker;
pub mod consumer;
pub mod envelope;
pub mod kafka;
pub mod outbox;
pub mod relay;

pub use envelope::EventContext;
pub use outbox::OutboxEvent;
