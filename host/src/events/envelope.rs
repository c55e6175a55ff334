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
    json!({
        "specversion": "1.0",
        "source": ctx.source,
        "time": Utc::now(),
        "datacontenttype": "application/json",
        "tenantid": tenant.as_str(),
        "correlationid": ctx.correlation_id,
    })
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
