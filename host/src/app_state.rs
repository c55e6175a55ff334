//! What every request handler shares: the pool, the compiled-schema cache,
//! the token verifier and the peer-service clients. Built once at start.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::auth::Authenticator;
use crate::catalog::SchemaCache;
use crate::config::Settings;
use crate::events::broker::Broker;
use crate::events::relay::EventLog;
use crate::plugins::Plugins;
use crate::services::ValidationService;

#[derive(Debug)]
pub struct AppState {
    pub settings: Settings,
    pub pool: PgPool,
    /// Creates, written together (group commit).
    pub writes: crate::storage::coalesce::Coalescer,
    /// Reads by id, on tenant-affine connections.
    pub reads: crate::storage::lanes::Lanes,
    pub schemas: SchemaCache,
    pub auth: Authenticator,
    /// Tokens verified lately (until expiry, at most a minute).
    pub tokens: crate::auth::TokenCache,
    pub validation: ValidationService,
    /// Tenants' data-encryption keys (`x-encrypted` fields).
    pub keyring: crate::crypto::Keyring,
    /// The durable task queue (`bss.tasks`).
    pub tasks: Arc<crate::tasks::TaskQueue>,
    pub metrics: PrometheusHandle,
    pub broker: Arc<Broker>,
    pub event_log: EventLog,
    pub plugins: Arc<Plugins>,
    /// The webhook sender's guard, client and settings.
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// Per-tenant admission: archived tenants and rate limits.
    pub gate: crate::api::tenant_gate::TenantGate,
    /// Turns `true` when the service begins to shut down: long-lived
    /// responses (SSE streams) end on it.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Event streams open per tenant, against `sse_max_streams_per_tenant`.
    pub streams: crate::api::events::OpenStreams,
}

pub type SharedState = Arc<AppState>;
