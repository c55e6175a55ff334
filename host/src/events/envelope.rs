//! The CloudEvents 1.0 envelope (structured mode) of the events contract.
//! The parts known before the write are built here; the record's id and
//! version are filled in by the SQL that writes the outbox row.

use chrono::Utc;
use serde_json::{Value, json};

use crate::domain::TenantId;

/// What every event of one request shares.
#[derive(Debug, Clone)]
pub struct EventContext {
    /// `/business-store/<instance>`.
    pub source: String,
    /// The request's `x-request-id`.
    pub correlation_id: String,
    /// A W3C `traceparent` in the request's trace (CloudEvents distributed
    /// tracing extension), when the request came with one.
    pub traceparent: Option<String>,
}

/// An event as the API serves it: a CloudEvents 1.0 envelope in structured
/// JSON (for the OpenAPI document; events are built as JSON values).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// The event id (a UUIDv7, time-ordered), unique per tenant log.
    pub id: String,
    /// `/business-store/<instance>`.
    pub source: String,
    /// e.g. `business_store.data.invoices.created`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What the event is about, e.g. `invoices/<record id>`.
    pub subject: Option<String>,
    pub time: chrono::DateTime<Utc>,
    /// `application/json`.
    pub datacontenttype: String,
    pub tenantid: String,
    /// The `x-request-id` of the request that caused the event.
    pub correlationid: Option<String>,
    /// The event's payload.
    #[schema(value_type = Object)]
    pub data: Value,
}

pub const SCHEMA_UPDATED: &str = "business_store.schema.updated";
pub const DATA_PREFIX: &str = "business_store.data.";

/// A new time-ordered event id.
pub fn new_event_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}

/// The envelope without `id`, `type`, `subject` and `data`, which the
/// outbox SQL adds per row.
pub fn template(ctx: &EventContext, tenant: &TenantId) -> Value {
    let mut envelope = json!({
        "specversion": "1.0",
        "source": ctx.source,
        "time": Utc::now(),
        "datacontenttype": "application/json",
        "tenantid": tenant.as_str(),
        "correlationid": ctx.correlation_id,
    });
    if let Some(traceparent) = &ctx.traceparent {
        envelope["traceparent"] = json!(traceparent);
    }
    envelope
}

/// A complete envelope (schema events are built entirely in Rust).
pub fn complete(
    ctx: &EventContext,
    tenant: &TenantId,
    id: uuid::Uuid,
    kind: &str,
    subject: &str,
    data: Value,
) -> Value {
    let mut env = template(ctx, tenant);
    env["id"] = json!(id);
    env["type"] = json!(kind);
    env["subject"] = json!(subject);
    env["data"] = data;
    env
}
