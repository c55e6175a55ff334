//! What plugin authors read back about their plugins' calls: every line a
//! plugin logs, and the calls its manifest asks to record (`record`:
//! `"failures"`, `"all"` or a sample rate) with their inputs, outcome and
//! cost, for `bss plugin logs` and `bss plugin replay`.
//!
//! Calls hand what they saw to a bounded queue (never waiting: when it, or
//! the tenant's eighth of it, is full the entry is dropped and counted);
//! one writer task stores batches
//! and prunes: at most [`LOGS_KEPT`] lines and [`CALLS_KEPT`] calls per
//! plugin, none older than [`LOGS_FOR`] / [`CALLS_FOR`]. `x-encrypted`
//! values are redacted before anything is queued.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc;
use utoipa::ToSchema;

use super::runtime::{Failure, Refusal, Report};
use super::sandbox::{LogLine, level_name};
use super::{Context, Kind, WebhookRequest};

/// Lines kept per plugin, and for how long.
pub const LOGS_KEPT: i64 = 1000;
pub const LOGS_FOR: Duration = Duration::from_secs(3 * 24 * 3600);
/// Recorded calls kept per plugin, and for how long.
pub const CALLS_KEPT: i64 = 200;
pub const CALLS_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Entries waiting to be written, at most.
const QUEUE: usize = 4096;
/// Entries one tenant may have waiting: a tenant whose plugins log on
/// every call fills its own share, never the others'.
const QUEUE_PER_TENANT: usize = QUEUE / 8;
/// What a redacted value reads.
pub const REDACTED: &str = "[redacted: x-encrypted]";

/// Which calls a plugin's manifest asks to record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RecordPolicy {
    /// `"failures"` (calls that failed: a trap or a limit) or `"all"`.
    Mode(RecordMode),
    /// A share of all calls, 0 < rate ≤ 1; failures are always recorded.
    Rate(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecordMode {
    Failures,
    All,
}

impl RecordPolicy {
    /// Whether a call with this outcome is recorded.
    pub fn wants(&self, failed: bool) -> bool {
        match self {
            Self::Mode(RecordMode::Failures) => failed,
            Self::Mode(RecordMode::All) => true,
            Self::Rate(r) => failed || rand::random::<f64>() < *r,
        }
    }

    pub fn valid(&self) -> bool {
        match self {
            Self::Rate(r) => *r > 0.0 && *r <= 1.0,
            Self::Mode(_) => true,
        }
    }
}

/// A call's outcome as authors read it: `accepted`, `refused`, `enriched`,
/// `dropped`, `transformed`, `cancelled` or `failed`, and what goes with it
/// (violations, the new event, the request to send, the failure).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub verdict: &'static str,
    pub detail: Value,
}

impl Verdict {
    pub fn failed(f: &Failure) -> Self {
        Self {
            verdict: "failed",
            detail: json!({"kind": f.kind(), "message": format!("the plugin {f}")}),
        }
    }

    pub fn is_failure(&self) -> bool {
        self.verdict == "failed"
    }

    pub fn of_validation(outcome: &Result<Result<(), Refusal>, Failure>) -> Self {
        match outcome {
            Ok(Ok(())) => Self {
                verdict: "accepted",
                detail: Value::Null,
            },
            Ok(Err(refusal)) => Self {
                verdict: "refused",
                detail: json!({
                    "violations": refusal.violations.iter().map(|v| json!({
                        "path": v.path, "message": v.message, "code": v.code,
                    })).collect::<Vec<_>>(),
                    "omitted": refusal.omitted,
                }),
            },
            Err(f) => Self::failed(f),
        }
    }

    /// An enricher's outcome as it answered (its event as text).
    pub fn of_enrichment(outcome: &Result<Option<String>, Failure>) -> Self {
        let event = |text: &String| {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
        };
        Self::enrichment(outcome.as_ref().map(|o| o.as_ref().map(event)))
    }

    /// An enricher's outcome as the host took it (its event checked and
    /// its fixed attributes restored).
    pub fn of_enriched(outcome: &Result<Option<Value>, Failure>) -> Self {
        Self::enrichment(outcome.as_ref().map(|o| o.as_ref().cloned()))
    }

    fn enrichment(outcome: Result<Option<Value>, &Failure>) -> Self {
        match outcome {
            Ok(Some(event)) => Self {
                verdict: "enriched",
                detail: event,
            },
            Ok(None) => Self {
                verdict: "dropped",
                detail: Value::Null,
            },
            Err(f) => Self::failed(f),
        }
    }

    pub fn of_transform(outcome: &Result<Option<WebhookRequest>, Failure>) -> Self {
        match outcome {
            Ok(Some(r)) => Self {
                verdict: "transformed",
                detail: request_json(r),
            },
            Ok(None) => Self {
                verdict: "cancelled",
                detail: Value::Null,
            },
            Err(f) => Self::failed(f),
        }
    }
}

pub fn request_json(r: &WebhookRequest) -> Value {
    json!({"method": r.method, "path": r.path, "headers": r.headers, "body": r.body})
}

/// Replaces, in place, the value at each path (object keys from the root).
pub fn redact(doc: &mut Value, paths: &[Vec<String>]) {
    for path in paths {
        if let Some(slot) = path.iter().try_fold(&mut *doc, |v, k| v.get_mut(k)) {
            *slot = Value::String(REDACTED.into());
        }
    }
}

/// Who made a call, for the rows about it.
#[derive(Debug, Clone)]
pub struct Origin {
    pub tenant: String,
    pub plugin: String,
    pub version: i32,
}

/// One call to record.
#[derive(Debug)]
pub struct CallRecord {
    pub origin: Origin,
    pub kind: Kind,
    pub context: Value,
    pub input: Value,
    pub verdict: Verdict,
    pub report: Report,
}

impl CallRecord {
    /// The call's context as recorded (its config included: manifests
    /// hold no secrets; `x-encrypted` values live only in records).
    pub fn context_json(ctx: &Context) -> Value {
        json!({
            "resource": ctx.resource,
            "operation": ctx.operation,
            "actor": ctx.actor,
            "requestId": ctx.request_id,
            "config": serde_json::from_str::<Value>(&ctx.config).unwrap_or(Value::Null),
        })
    }
}

enum Entry {
    Logs {
        origin: Origin,
        request_id: String,
        at: DateTime<Utc>,
        lines: Vec<LogLine>,
    },
    Call(Box<CallRecord>),
}

/// The queue to the writer.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Entry>,
    /// Entries waiting, per tenant.
    waiting: Arc<DashMap<String, usize>>,
}

impl Entry {
    fn tenant(&self) -> &str {
        match self {
            Entry::Logs { origin, .. } => &origin.tenant,
            Entry::Call(c) => &c.origin.tenant,
        }
    }
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entry")
    }
}

impl Recorder {
    /// The queue, and its writer on the current runtime.
    pub fn start(pool: PgPool) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let waiting = Arc::new(DashMap::new());
        tokio::spawn(write_entries(pool, rx, waiting.clone()));
        Self { tx, waiting }
    }

    /// Queues an entry unless the queue, or the tenant's share of it, is
    /// full (then it is dropped and counted).
    fn send(&self, entry: Entry) {
        let tenant = entry.tenant().to_owned();
        let mut held = self.waiting.entry(tenant).or_default();
        if *held >= QUEUE_PER_TENANT || self.tx.try_send(entry).is_err() {
            metrics::counter!("plugin_recordings_dropped_total").increment(1);
            return;
        }
        *held += 1;
    }

    /// The lines a call logged.
    pub fn logs(&self, origin: &Origin, request_id: &str, lines: &[LogLine]) {
        if lines.is_empty() {
            return;
        }
        self.send(Entry::Logs {
            origin: origin.clone(),
            request_id: request_id.to_owned(),
            at: Utc::now(),
            lines: lines.to_vec(),
        });
    }

    /// A recorded call (its log lines too).
    pub fn record(&self, record: CallRecord) {
        self.logs(
            &record.origin,
            record.context["requestId"].as_str().unwrap_or_default(),
            &record.report.logs,
        );
        self.send(Entry::Call(Box::new(record)));
    }
}

/// Writes queued entries in batches, and prunes what is past its bounds.
async fn write_entries(
    pool: PgPool,
    mut rx: mpsc::Receiver<Entry>,
    waiting: Arc<DashMap<String, usize>>,
) {
    let mut batch = Vec::new();
    let mut pruned = tokio::time::Instant::now();
    while rx.recv_many(&mut batch, 256).await > 0 {
        for e in &batch {
            if let Some(mut held) = waiting.get_mut(e.tenant()) {
                *held = held.saturating_sub(1);
            }
        }
        waiting.retain(|_, held| *held > 0);
        let touched: BTreeSet<(String, String)> = batch
            .iter()
            .map(|e| match e {
                Entry::Logs { origin, .. } => (origin.tenant.clone(), origin.plugin.clone()),
                Entry::Call(c) => (c.origin.tenant.clone(), c.origin.plugin.clone()),
            })
            .collect();
        if let Err(e) = store(&pool, std::mem::take(&mut batch)).await {
            tracing::warn!(error = %e, "storing plugin logs and recorded calls failed; these are lost");
        }
        for (tenant, plugin) in &touched {
            if let Err(e) = prune_plugin(&pool, tenant, plugin).await {
                tracing::warn!(error = %e, "pruning plugin logs failed");
            }
        }
        if pruned.elapsed() > Duration::from_secs(60) {
            pruned = tokio::time::Instant::now();
            if let Err(e) = prune_old(&pool).await {
                tracing::warn!(error = %e, "pruning old plugin logs failed");
            }
        }
    }
}

async fn store(pool: &PgPool, batch: Vec<Entry>) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for entry in batch {
        match entry {
            Entry::Logs {
                origin,
                request_id,
                at,
                lines,
            } => {
                let levels: Vec<&str> = lines.iter().map(|l| level_name(l.level)).collect();
                let messages: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
                // A tenant deleted meanwhile keeps nothing.
                sqlx::query(
                    "INSERT INTO bss.plugin_logs (tenant_id, plugin, version, at, level, message, request_id)
                     SELECT $1, $2, $3, $4, l.level, l.message, $5
                       FROM unnest($6::text[], $7::text[]) AS l(level, message)
                      WHERE EXISTS (SELECT 1 FROM bss.tenants WHERE id = $1)",
                )
                .bind(&origin.tenant)
                .bind(&origin.plugin)
                .bind(origin.version)
                .bind(at)
                .bind(&request_id)
                .bind(&levels)
                .bind(&messages)
                .execute(&mut *tx)
                .await?;
            }
            Entry::Call(c) => {
                let logs: Vec<Value> = c
                    .report
                    .logs
                    .iter()
                    .map(|l| json!({"level": level_name(l.level), "message": l.message}))
                    .collect();
                sqlx::query(
                    "INSERT INTO bss.plugin_calls (id, tenant_id, plugin, version, kind, at, request_id,
                            context, input, verdict, outcome, took_us, fuel_used, memory_peak, logs, stderr)
                     SELECT $1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10, $11, $12, $13, $14, $15
                      WHERE EXISTS (SELECT 1 FROM bss.tenants WHERE id = $2)",
                )
                .bind(uuid::Uuid::now_v7())
                .bind(&c.origin.tenant)
                .bind(&c.origin.plugin)
                .bind(c.origin.version)
                .bind(c.kind.as_str())
                .bind(c.context["requestId"].as_str().unwrap_or_default())
                .bind(&c.context)
                .bind(&c.input)
                .bind(c.verdict.verdict)
                .bind(&c.verdict.detail)
                .bind(i64::try_from(c.report.took.as_micros()).unwrap_or(i64::MAX))
                .bind(i64::try_from(c.report.fuel_used).unwrap_or(i64::MAX))
                .bind(i64::try_from(c.report.memory_peak).unwrap_or(i64::MAX))
                .bind(Value::Array(logs))
                .bind(&c.report.stderr)
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await
}

/// Keeps a plugin's newest lines and calls.
async fn prune_plugin(pool: &PgPool, tenant: &str, plugin: &str) -> Result<(), sqlx::Error> {
    for (table, kept) in [
        ("bss.plugin_logs", LOGS_KEPT),
        ("bss.plugin_calls", CALLS_KEPT),
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE tenant_id = $1 AND plugin = $2 AND id <= (
                 SELECT id FROM {table} WHERE tenant_id = $1 AND plugin = $2
                  ORDER BY id DESC OFFSET $3 LIMIT 1)"
        ))
        .bind(tenant)
        .bind(plugin)
        .bind(kept)
        .execute(pool)
        .await?;
    }
    Ok(())
}

async fn prune_old(pool: &PgPool) -> Result<(), sqlx::Error> {
    for (table, age) in [
        ("bss.plugin_logs", LOGS_FOR),
        ("bss.plugin_calls", CALLS_FOR),
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE at < now() - make_interval(secs => $1)"
        ))
        .bind(age.as_secs_f64())
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// A stored log line.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub version: i32,
    pub level: String,
    pub message: String,
    pub request_id: String,
}

/// A plugin's lines after `after` (oldest first), at most `limit`.
pub async fn read_logs(
    pool: &PgPool,
    tenant: &str,
    plugin: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<LogRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, at, version, level, message, request_id FROM bss.plugin_logs
          WHERE tenant_id = $1 AND plugin = $2 AND id > $3 ORDER BY id LIMIT $4",
    )
    .bind(tenant)
    .bind(plugin)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A recorded call.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallRow {
    #[schema(value_type = String)]
    pub id: uuid::Uuid,
    pub at: DateTime<Utc>,
    pub version: i32,
    pub kind: String,
    pub request_id: String,
    #[schema(value_type = Object)]
    pub context: Value,
    #[schema(value_type = Object)]
    pub input: Value,
    pub verdict: String,
    #[schema(value_type = Object)]
    pub outcome: Value,
    pub took_us: i64,
    pub fuel_used: i64,
    pub memory_peak: i64,
    #[schema(value_type = Vec<Object>)]
    pub logs: Value,
    pub stderr: String,
}

const CALL_COLUMNS: &str = "id, at, version, kind, request_id, context, input, verdict, outcome, \
                            took_us, fuel_used, memory_peak, logs, stderr";

/// A plugin's recorded calls, newest first, before `before` when given.
pub async fn read_calls(
    pool: &PgPool,
    tenant: &str,
    plugin: &str,
    before: Option<uuid::Uuid>,
    limit: i64,
) -> Result<Vec<CallRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {CALL_COLUMNS} FROM bss.plugin_calls
          WHERE tenant_id = $1 AND plugin = $2 AND ($3::uuid IS NULL OR id < $3)
          ORDER BY id DESC LIMIT $4"
    ))
    .bind(tenant)
    .bind(plugin)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One recorded call.
pub async fn read_call(
    pool: &PgPool,
    tenant: &str,
    plugin: &str,
    id: uuid::Uuid,
) -> Result<Option<CallRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {CALL_COLUMNS} FROM bss.plugin_calls
          WHERE tenant_id = $1 AND plugin = $2 AND id = $3"
    ))
    .bind(tenant)
    .bind(plugin)
    .bind(id)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(tenant: &str) -> Origin {
        Origin {
            tenant: tenant.into(),
            plugin: "p".into(),
            version: 1,
        }
    }

    fn line() -> Vec<LogLine> {
        vec![LogLine {
            level: crate::plugins::bindings::Level::Info,
            message: "m".into(),
        }]
    }

    #[test]
    fn a_tenant_flooding_the_queue_fills_only_its_own_share() {
        // No writer: nothing drains.
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let recorder = Recorder {
            tx,
            waiting: Arc::new(DashMap::new()),
        };
        for _ in 0..QUEUE {
            recorder.logs(&origin("loud"), "r", &line());
        }
        recorder.logs(&origin("quiet"), "r", &line());
        let mut queued = Vec::new();
        while let Ok(e) = rx.try_recv() {
            queued.push(e.tenant().to_owned());
        }
        let loud = queued.iter().filter(|t| *t == "loud").count();
        assert_eq!(loud, QUEUE_PER_TENANT);
        assert_eq!(queued.last().map(String::as_str), Some("quiet"));
    }

    #[test]
    fn encrypted_values_are_redacted_wherever_they_are() {
        let mut doc = serde_json::json!({"iban": "DE89", "customer": {"card": "4111"}, "total": 5});
        let paths = vec![
            vec!["iban".to_owned()],
            vec!["customer".to_owned(), "card".to_owned()],
            vec!["absent".to_owned()],
        ];
        redact(&mut doc, &paths);
        assert_eq!(
            doc,
            serde_json::json!({"iban": REDACTED, "customer": {"card": REDACTED}, "total": 5})
        );
    }
}
