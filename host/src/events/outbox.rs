//! The outbox table (`bss.outbox`): the SQL that writers embed in their
//! statements, and the relay's and readers' queries over it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, PgPool};

/// A sequenced event, as the relay publishes it and readers replay it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxEvent {
    pub seq: i64,
    pub event_id: uuid::Uuid,
    pub tenant_id: String,
    pub resource: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub kafka_key: String,
    pub envelope: Value,
    pub created_at: DateTime<Utc>,
}

/// Per-row event data for the records of one write statement.
#[derive(Debug, Clone)]
pub struct RecordEvents {
    /// The envelope template (see `envelope::template`).
    pub template: Value,
    /// Whether events carry the record (`x-event-payload: full`).
    pub full: bool,
    /// Fields never put in events (`x-encrypted`, at any depth), as paths
    /// of object keys; bound as a JSON array of such paths.
    pub hidden: Vec<Vec<String>>,
    /// What the record version written keeps of the write (its `audit`
    /// column): operation, actor, request id, the hook versions that
    /// passed it. Not part of any event.
    pub audit: Value,
}

/// A CTE named `ob` that writes one outbox row per row of the CTE `ins`
/// (columns `id`, `version`, `data`, `kind` = created|updated|deleted).
/// Its parameters, from `$first`: tenant, resource, envelope templates,
/// full, hidden fields (`jsonb`, `hidden` paths), record ids, event ids
/// (templates, ids and event ids as aligned arrays: one template per event).
pub fn record_events_cte(first: usize, hidden_paths: usize) -> String {
    let [t, r, tpl, full, hidden, ids, evs] = std::array::from_fn::<usize, 7, _>(|i| first + i);
    // One `#-` per hidden path: each removes a field at any depth.
    let payload: String = (0..hidden_paths)
        .map(|i| format!(" #- ARRAY(SELECT jsonb_array_elements_text(${hidden}::jsonb -> {i}))"))
        .collect();
    format!(
        "ob AS (
           INSERT INTO bss.outbox (event_id, tenant_id, resource, type, kafka_key, envelope)
           SELECT e.event_id, ${t}, ${r}, 'business_store.data.' || ins.kind,
                  ${t} || '/' || ${r} || '/' || ins.id,
                  e.template || jsonb_build_object(
                    'id', e.event_id,
                    'type', 'business_store.data.' || ins.kind,
                    'subject', ${r} || '/' || ins.id,
                    'data', jsonb_build_object('tenantId', ${t}, 'resource', ${r}, 'recordId', ins.id, 'version', ins.version)
                      || CASE WHEN ins.kind = 'updated' THEN jsonb_build_object('previousVersion', ins.version - 1) ELSE '{{}}'::jsonb END
                      || CASE WHEN ${full} AND ins.kind <> 'deleted' THEN jsonb_build_object('data', ins.data{payload}) ELSE '{{}}'::jsonb END)
             FROM ins JOIN unnest(${ids}::text[], ${evs}::uuid[], ${tpl}::jsonb[]) AS e(id, event_id, template)
                  ON e.id = ins.id)"
    )
}

/// Inserts one complete event (schema changes; record writes that are not a
/// single statement).
pub async fn insert<'e>(
    exec: impl PgExecutor<'e>,
    id: uuid::Uuid,
    tenant: &str,
    resource: &str,
    kind: &str,
    key: &str,
    envelope: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bss.outbox (event_id, tenant_id, resource, type, kafka_key, envelope)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(tenant)
    .bind(resource)
    .bind(kind)
    .bind(key)
    .bind(envelope)
    .execute(exec)
    .await?;
    Ok(())
}

const EVENT_COLUMNS: &str =
    "seq, event_id, tenant_id, resource, type, kafka_key, envelope, created_at";

/// The tenants with an active event enricher (usually none or a few).
pub async fn enricher_tenants(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT tenant_id FROM bss.plugins
          WHERE kind = 'event-enricher' AND active_version IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
}

/// Which of these tenants have committed events waiting for their
/// enrichers (found by the index on unenriched rows), longest waiting first.
pub async fn tenants_to_enrich(
    pool: &PgPool,
    tenants: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT tenant_id FROM bss.outbox
          WHERE seq IS NULL AND NOT enriched AND tenant_id = ANY($1)
          GROUP BY tenant_id ORDER BY min(id)",
    )
    .bind(tenants)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
}

/// A committed event waiting for its tenant's enrichers.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unenriched {
    pub id: i64,
    pub tenant_id: String,
    pub resource: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub envelope: Value,
}

/// Unsequenced events of these tenants, not yet enriched, in `id` order.
pub async fn unenriched(
    pool: &PgPool,
    tenants: &[String],
    limit: i64,
) -> Result<Vec<Unenriched>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, tenant_id, resource, type, envelope FROM bss.outbox
          WHERE seq IS NULL AND NOT enriched AND tenant_id = ANY($1)
          ORDER BY id LIMIT $2",
    )
    .bind(tenants)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Records enrichment results: unchanged rows, replaced envelopes, and
/// events an enricher dropped (deleted before they enter the log).
pub async fn enriched(
    pool: &PgPool,
    unchanged: &[i64],
    replaced: &[(i64, Value)],
    dropped: &[i64],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE bss.outbox SET enriched = true WHERE id = ANY($1) AND seq IS NULL")
        .bind(unchanged)
        .execute(&mut *tx)
        .await?;
    for (id, envelope) in replaced {
        sqlx::query(
            "UPDATE bss.outbox SET enriched = true, envelope = $2 WHERE id = $1 AND seq IS NULL",
        )
        .bind(id)
        .bind(envelope)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("DELETE FROM bss.outbox WHERE id = ANY($1) AND seq IS NULL")
        .bind(dropped)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Gives committed, unsequenced rows the next log positions, in `id` order.
/// Rows of `waiting` tenants (those with enrichers) wait until enriched.
/// Returns the highest position assigned, if any.
pub async fn sequence(
    pool: &PgPool,
    after: i64,
    limit: i64,
    waiting: &[String],
) -> Result<Option<i64>, sqlx::Error> {
    let (max,): (Option<i64>,) = sqlx::query_as(
        "WITH next AS (
            SELECT id, $1 + row_number() OVER (ORDER BY id) AS seq
              FROM (SELECT id FROM bss.outbox
                     WHERE seq IS NULL AND (enriched OR NOT tenant_id = ANY($3))
                     ORDER BY id LIMIT $2 FOR UPDATE) n
         ), done AS (
            UPDATE bss.outbox o SET seq = next.seq, sequenced_at = clock_timestamp()
              FROM next WHERE o.id = next.id RETURNING o.seq
         )
         SELECT max(seq) FROM done",
    )
    .bind(after)
    .bind(limit)
    .bind(waiting)
    .fetch_one(pool)
    .await?;
    Ok(max)
}

/// The highest log position so far.
pub async fn last_seq(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let (max,): (Option<i64>,) = sqlx::query_as("SELECT max(seq) FROM bss.outbox")
        .fetch_one(pool)
        .await?;
    Ok(max.unwrap_or(0))
}

/// Everything up to this log position has been acknowledged by the broker.
pub async fn published_seq(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let (seq,): (i64,) = sqlx::query_as("SELECT published_seq FROM bss.relay_state WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(seq)
}

/// Sequenced events after log position `after`, oldest first (not those an
/// import brought in: they were published where they were written).
pub async fn sequenced_after(
    pool: &PgPool,
    after: i64,
    limit: i64,
) -> Result<Vec<OutboxEvent>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM bss.outbox WHERE seq > $1 AND NOT imported
          ORDER BY seq LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Records that the broker acknowledged everything up to `seq`.
pub async fn mark_published(pool: &PgPool, seq: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE bss.relay_state SET published_seq = GREATEST(published_seq, $1), published_at = clock_timestamp()
          WHERE id = 1",
    )
    .bind(seq)
    .execute(pool)
    .await?;
    Ok(())
}

/// Events written but not yet acknowledged by the broker (sequenced or not).
pub async fn backlog(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as(BACKLOG_SQL).fetch_one(pool).await?;
    Ok(n)
}

/// The backlog query (also used by the tests and the benchmark).
pub const BACKLOG_SQL: &str = "SELECT (SELECT count(*) FROM bss.outbox WHERE seq IS NULL)
      + (SELECT count(*) FROM bss.outbox
          WHERE seq > (SELECT published_seq FROM bss.relay_state WHERE id = 1) AND NOT imported)";

/// The log position of an event of this tenant.
pub async fn position_of(
    pool: &PgPool,
    tenant: &str,
    event_id: uuid::Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    let row: Option<(Option<i64>,)> =
        sqlx::query_as("SELECT seq FROM bss.outbox WHERE tenant_id = $1 AND event_id = $2")
            .bind(tenant)
            .bind(event_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.and_then(|(s,)| s))
}

/// The tenant's log after position `after`, oldest first, optionally of one type.
pub async fn log(
    pool: &PgPool,
    tenant: &str,
    after: i64,
    kind: Option<&str>,
    limit: i64,
) -> Result<Vec<OutboxEvent>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM bss.outbox
          WHERE tenant_id = $1 AND seq > $2 AND ($3::text IS NULL OR type = $3)
          ORDER BY seq LIMIT $4"
    ))
    .bind(tenant)
    .bind(after)
    .bind(kind)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Deletes published events older than the retention period, but not
/// those still to be matched against webhooks, nor any from the oldest
/// pending delivery to an enabled endpoint on (a disabled endpoint's
/// deliveries wait for it to be enabled again; events gone by then fail as
/// `event-gone`).
pub async fn expire(pool: &PgPool, retention_secs: u64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM bss.outbox
          WHERE seq <= (SELECT published_seq FROM bss.relay_state WHERE id = 1)
            AND seq <= (SELECT dispatched_seq FROM bss.webhook_state WHERE id = 1)
            AND created_at < now() - make_interval(secs => $1)
            AND seq < coalesce((SELECT min(h.seq) FROM bss.webhooks w, LATERAL (
                                   SELECT d.event_seq AS seq FROM bss.webhook_deliveries d
                                    WHERE d.webhook_id = w.id AND d.status = 'pending'
                                    ORDER BY d.event_seq LIMIT 1) h
                                 WHERE w.enabled), 9223372036854775807)",
    )
    .bind(retention_secs as f64)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Deletes a dropped tenant's events.
pub async fn forget_tenant<'e>(exec: impl PgExecutor<'e>, tenant: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM bss.outbox WHERE tenant_id = $1")
        .bind(tenant)
        .execute(exec)
        .await?;
    Ok(())
}
