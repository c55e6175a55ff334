//! Webhook endpoints and deliveries (`bss.webhooks`, `bss.webhook_deliveries`,
//! `bss.webhook_attempts`; see `migrations/0008_webhooks.sql`): the
//! dispatcher that turns the event log into deliveries, the lease under
//! which a replica works one, and the delivery log tenants read.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::StorageError;
use crate::events::outbox;

/// Attempts kept per delivery (the oldest go first).
const ATTEMPTS_KEPT: i32 = 50;
/// The resource of the events about webhooks.
pub const RESOURCE: &str = "_webhooks";
pub const FAILED_EVENT: &str = "business_store.webhook.failed";
pub const DISABLED_EVENT: &str = "business_store.webhook.disabled";

/// An endpoint as stored (its secrets sealed).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Endpoint {
    pub id: Uuid,
    pub tenant_id: String,
    pub url: String,
    pub events: Vec<String>,
    pub resources: Option<Vec<String>>,
    pub transformer: Option<String>,
    pub description: String,
    pub fifo: bool,
    pub rate_limit_per_sec: Option<i32>,
    pub enabled: bool,
    pub disabled_reason: Option<String>,
    pub secrets: Value,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const ENDPOINT_COLUMNS: &str = "id, tenant_id, url, events, resources, transformer, description, \
     fifo, rate_limit_per_sec, enabled, disabled_reason, secrets, failing_since, created_at, updated_at";

/// What an endpoint is set to (on creation, and after a change).
#[derive(Debug, Clone)]
pub struct Fields {
    pub url: String,
    pub events: Vec<String>,
    pub resources: Option<Vec<String>>,
    pub transformer: Option<String>,
    pub description: String,
    pub fifo: bool,
    pub rate_limit_per_sec: Option<i32>,
    pub enabled: bool,
}

type EndpointQuery<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, Endpoint, sqlx::postgres::PgArguments>;

/// Binds an endpoint's fields, in their column order, after the id and
/// tenant parameters.
fn bind_fields<'q>(q: EndpointQuery<'q>, f: &'q Fields) -> EndpointQuery<'q> {
    q.bind(&f.url)
        .bind(&f.events)
        .bind(&f.resources)
        .bind(&f.transformer)
        .bind(&f.description)
        .bind(f.fifo)
        .bind(f.rate_limit_per_sec)
        .bind(f.enabled)
}

/// Stores a new endpoint, unless the tenant has `max` already (None).
/// Registrations of one tenant take turns (the cap holds), and none runs
/// while events are being matched: an endpoint gets every event written
/// from its `created_at` on, and none before.
pub async fn insert(
    pool: &PgPool,
    tenant: &str,
    id: Uuid,
    f: &Fields,
    secrets: &Value,
    max: i64,
) -> Result<Option<Endpoint>, StorageError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('bss.webhooks:' || $1, 0))")
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT 1 FROM bss.webhook_state WHERE id = 1 FOR SHARE")
        .execute(&mut *tx)
        .await?;
    let sql = format!(
        "INSERT INTO bss.webhooks (id, tenant_id, url, events, resources, transformer, description,
                                   fifo, rate_limit_per_sec, enabled, secrets, created_at, updated_at)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, clock_timestamp(), clock_timestamp()
          WHERE (SELECT count(*) FROM bss.webhooks WHERE tenant_id = $2) < $12
         RETURNING {ENDPOINT_COLUMNS}"
    );
    let created = bind_fields(sqlx::query_as(&sql).bind(id).bind(tenant), f)
        .bind(secrets)
        .bind(max)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(created)
}

/// The tenant's endpoints, oldest first.
pub async fn list(pool: &PgPool, tenant: &str) -> Result<Vec<Endpoint>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM bss.webhooks WHERE tenant_id = $1 ORDER BY created_at, id"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await?)
}

pub async fn get(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Endpoint>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM bss.webhooks WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Sets an endpoint's fields. Enabling it clears why it was disabled and
/// its failure streak.
pub async fn update(
    pool: &PgPool,
    tenant: &str,
    id: Uuid,
    f: &Fields,
) -> Result<Option<Endpoint>, StorageError> {
    let sql = format!(
        "UPDATE bss.webhooks SET url = $3, events = $4, resources = $5, transformer = $6,
                description = $7, fifo = $8, rate_limit_per_sec = $9,
                disabled_reason = CASE WHEN $10 THEN NULL ELSE disabled_reason END,
                failing_since = CASE WHEN $10 AND NOT enabled THEN NULL ELSE failing_since END,
                enabled = $10, updated_at = now()
          WHERE tenant_id = $1 AND id = $2
         RETURNING {ENDPOINT_COLUMNS}"
    );
    Ok(bind_fields(sqlx::query_as(&sql).bind(tenant).bind(id), f)
        .fetch_optional(pool)
        .await?)
}

/// Replaces an endpoint's secrets if they are still `was` (false: the
/// endpoint is gone, or another rotation came first).
pub async fn set_secrets(
    pool: &PgPool,
    tenant: &str,
    id: Uuid,
    was: &Value,
    secrets: &Value,
) -> Result<bool, StorageError> {
    let done = sqlx::query(
        "UPDATE bss.webhooks SET secrets = $4, updated_at = now()
          WHERE tenant_id = $1 AND id = $2 AND secrets = $3",
    )
    .bind(tenant)
    .bind(id)
    .bind(was)
    .bind(secrets)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes an endpoint with its deliveries.
pub async fn delete(pool: &PgPool, tenant: &str, id: Uuid) -> Result<bool, StorageError> {
    let done = sqlx::query("DELETE FROM bss.webhooks WHERE tenant_id = $1 AND id = $2")
        .bind(tenant)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether an event (aliased `ev`: `type`, `resource`, `envelope`) is for
/// the endpoint `w`: its types (exact, `*`, or a `prefix.*`), its resources
/// (all when NULL), and never the endpoint's own failure events (a failing
/// endpoint would otherwise feed itself).
const MATCHES_SQL: &str = "(w.events && ARRAY['*', ev.type]
       OR EXISTS (SELECT 1 FROM unnest(w.events) p
                   WHERE right(p, 2) = '.*' AND starts_with(ev.type, left(p, -1))))
   AND (w.resources IS NULL OR ev.resource = ANY (w.resources))
   AND NOT (ev.resource = '_webhooks' AND ev.envelope -> 'data' ->> 'webhookId' = w.id::text)";

/// Matches up to `limit` events after the dispatched position against the
/// enabled endpoints of their tenants, writing one delivery per match and
/// moving the position, in one statement. Another replica dispatching at
/// the same time makes this one do nothing (`SKIP LOCKED`). Returns the
/// events read and the deliveries written.
pub async fn dispatch(pool: &PgPool, limit: i64) -> Result<(i64, i64), StorageError> {
    let (read, written): (i64, i64) = sqlx::query_as(&format!(
        "WITH st AS (
            SELECT dispatched_seq FROM bss.webhook_state WHERE id = 1 FOR UPDATE SKIP LOCKED
         ), ev AS (
            SELECT o.seq, o.event_id, o.tenant_id, o.type, o.resource, o.envelope, o.created_at,
                   o.imported
              FROM bss.outbox o, st
             WHERE o.seq > st.dispatched_seq ORDER BY o.seq LIMIT $1
         ), ins AS (
            INSERT INTO bss.webhook_deliveries
                   (id, tenant_id, webhook_id, event_seq, event_id, event_type, event_time)
            SELECT gen_random_uuid(), ev.tenant_id, w.id, ev.seq, ev.event_id, ev.type, ev.created_at
              FROM ev JOIN bss.webhooks w ON w.tenant_id = ev.tenant_id AND w.enabled
             -- Events from the endpoint's registration on (older ones, and
             -- those an import brought in: replay).
             WHERE ev.created_at >= w.created_at AND NOT ev.imported AND {MATCHES_SQL}
             ORDER BY ev.seq
            ON CONFLICT (webhook_id, event_seq) DO NOTHING
            RETURNING 1
         ), moved AS (
            UPDATE bss.webhook_state SET dispatched_seq = (SELECT max(seq) FROM ev)
             WHERE id = 1 AND EXISTS (SELECT 1 FROM ev)
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM ev), (SELECT count(*) FROM ins)"
    ))
    .bind(limit)
    .fetch_one(pool)
    .await?;
    Ok((read, written))
}

/// How much a claim may take.
#[derive(Debug, Clone)]
pub struct ClaimLimits {
    pub take: i64,
    /// In flight at once per endpoint (a `fifo` endpoint: one over all
    /// replicas) and per tenant, in this replica.
    pub per_endpoint: i64,
    pub per_tenant: i64,
    pub lease_secs: f64,
    /// What this replica has in flight: per endpoint, and per tenant.
    pub busy_endpoints: (Vec<Uuid>, Vec<i64>),
    pub busy_tenants: (Vec<String>, Vec<i64>),
}

/// A delivery leased to this replica, with what sending it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: Uuid,
    pub lease: Uuid,
    pub tenant_id: String,
    pub webhook_id: Uuid,
    pub event_seq: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub attempts: i32,
    pub step: i32,
    pub url: String,
    pub secrets: Value,
    pub transformer: Option<String>,
    pub rate_limit_per_sec: Option<i32>,
    /// None when the event left the log (retention) before it was sent.
    pub envelope: Option<Value>,
    pub resource: Option<String>,
}

/// Leases due deliveries: with what this replica has in flight, at most
/// `per_endpoint` per endpoint (a `fifo` endpoint: only its oldest pending
/// delivery, one at a time) and `per_tenant` per tenant, so a tenant's slow
/// endpoints take only its own share; the longest-due first. (In-flight
/// counts are the replica's own: counting leases in the database would
/// cost every claim a scan, and every lease an index entry.)
pub async fn claim(pool: &PgPool, l: &ClaimLimits) -> Result<Vec<Claimed>, StorageError> {
    Ok(sqlx::query_as(
        "WITH busy_ep AS (
            SELECT * FROM unnest($5::uuid[], $6::int8[]) AS b(webhook_id, n)
         ), busy_t AS (
            SELECT * FROM unnest($7::text[], $8::int8[]) AS b(tenant_id, n)
         ), cand AS (
            SELECT c.id, c.next_attempt_at,
                   row_number() OVER (PARTITION BY w.tenant_id ORDER BY c.next_attempt_at, c.event_seq)
                     + coalesce((SELECT b.n FROM busy_t b WHERE b.tenant_id = w.tenant_id), 0)
                     AS tenant_rank
              FROM bss.webhooks w
              CROSS JOIN LATERAL (
                 -- Any due deliveries, the longest-due first…
                 (SELECT d.id, d.next_attempt_at, d.event_seq FROM bss.webhook_deliveries d
                   WHERE NOT w.fifo AND d.webhook_id = w.id AND d.status = 'pending'
                     AND d.next_attempt_at <= now()
                     AND (d.leased_until IS NULL OR d.leased_until <= now())
                   ORDER BY d.next_attempt_at, d.event_seq
                   LIMIT greatest(0, $2 - coalesce((SELECT b.n FROM busy_ep b WHERE b.webhook_id = w.id), 0)))
                 UNION ALL
                 -- …or, for a fifo endpoint, its oldest pending one when due.
                 (SELECT h.id, h.next_attempt_at, h.event_seq
                    FROM (SELECT d.id, d.next_attempt_at, d.event_seq, d.leased_until
                            FROM bss.webhook_deliveries d
                           WHERE w.fifo AND d.webhook_id = w.id AND d.status = 'pending'
                           ORDER BY d.event_seq LIMIT 1) h
                   WHERE h.next_attempt_at <= now()
                     AND (h.leased_until IS NULL OR h.leased_until <= now()))
              ) c
             WHERE w.enabled
               -- An archived tenant's deliveries wait (its data is unreachable).
               AND w.tenant_id IN (SELECT id FROM bss.tenants WHERE status = 'active')
         ), pick AS (
            SELECT id FROM cand WHERE tenant_rank <= $3 ORDER BY next_attempt_at LIMIT $1
         ), locked AS (
            SELECT d.id FROM bss.webhook_deliveries d
             WHERE d.id IN (SELECT id FROM pick) AND d.status = 'pending'
               AND (d.leased_until IS NULL OR d.leased_until <= now())
             FOR UPDATE SKIP LOCKED
         ), leased AS (
            UPDATE bss.webhook_deliveries d
               SET leased_until = now() + make_interval(secs => $4), lease = gen_random_uuid()
              FROM locked WHERE d.id = locked.id
            RETURNING d.id, d.lease, d.tenant_id, d.webhook_id, d.event_seq, d.event_id,
                      d.event_type, d.attempts, d.step
         )
         SELECT l.id, l.lease, l.tenant_id, l.webhook_id, l.event_seq, l.event_id, l.event_type,
                l.attempts, l.step, w.url, w.secrets, w.transformer, w.rate_limit_per_sec,
                o.envelope, o.resource
           FROM leased l JOIN bss.webhooks w ON w.id = l.webhook_id
           LEFT JOIN bss.outbox o ON o.seq = l.event_seq
          ORDER BY l.event_seq",
    )
    .bind(l.take)
    .bind(l.per_endpoint)
    .bind(l.per_tenant)
    .bind(l.lease_secs)
    .bind(&l.busy_endpoints.0)
    .bind(&l.busy_endpoints.1)
    .bind(&l.busy_tenants.0)
    .bind(&l.busy_tenants.1)
    .fetch_all(pool)
    .await?)
}

/// Gives a leased delivery back, untried, due again in `after_secs` (its
/// endpoint's rate limit).
pub async fn release(pool: &PgPool, c: &Claimed, after_secs: f64) -> Result<(), StorageError> {
    sqlx::query(
        "UPDATE bss.webhook_deliveries
            SET leased_until = NULL, lease = NULL,
                next_attempt_at = now() + make_interval(secs => $3)
          WHERE id = $1 AND lease = $2",
    )
    .bind(c.id)
    .bind(c.lease)
    .bind(after_secs)
    .execute(pool)
    .await?;
    Ok(())
}

/// One attempt, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub response: Option<String>,
    pub error_kind: Option<&'static str>,
    pub error: Option<String>,
}

/// What an attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    Succeeded,
    /// The transformer cancelled it.
    Cancelled,
    /// Tried again in this many seconds.
    Retry(f64),
    /// The last attempt failed.
    Failed,
    /// The endpoint answered 410 Gone: failed, and the endpoint disabled.
    Gone,
}

/// What recording an attempt did.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// The delivery's status after it.
    pub status: String,
    /// Why the endpoint was disabled by it, if it was.
    pub disabled: Option<String>,
    /// The events written to the tenant's log.
    pub events: u64,
}

/// Who writes the events of an attempt (this replica, as `source`).
#[derive(Debug, Clone, Copy)]
pub struct Recorder<'a> {
    pub source: &'a str,
    /// An endpoint failing this long without a success is disabled.
    pub disable_after_secs: f64,
}

/// Records an attempt of a delivery this replica still holds the lease of
/// (None when it lost it: another replica took the delivery over), in one
/// transaction with what it causes: the endpoint's failure streak, its
/// disabling, and the events saying so.
pub async fn record(
    pool: &PgPool,
    c: &Claimed,
    attempt: &Attempt,
    next: Next,
    by: Recorder<'_>,
) -> Result<Option<Recorded>, StorageError> {
    let (status, retry_in) = match next {
        Next::Succeeded => ("succeeded", 0.0),
        Next::Cancelled => ("cancelled", 0.0),
        Next::Retry(secs) => ("pending", secs),
        Next::Failed | Next::Gone => ("failed", 0.0),
    };
    let mut tx = pool.begin().await?;
    let row: Option<(i32,)> = sqlx::query_as(
        "UPDATE bss.webhook_deliveries
            SET status = $3, attempts = attempts + 1, step = step + 1,
                next_attempt_at = now() + make_interval(secs => $4),
                leased_until = NULL, lease = NULL,
                last_status_code = $5, last_error = $6, updated_at = now()
          WHERE id = $1 AND lease = $2
         RETURNING attempts",
    )
    .bind(c.id)
    .bind(c.lease)
    .bind(status)
    .bind(retry_in)
    .bind(attempt.status_code)
    .bind(&attempt.error)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((n,)) = row else {
        return Ok(None);
    };
    sqlx::query(
        "INSERT INTO bss.webhook_attempts
                (delivery_id, n, at, duration_ms, status_code, response, error_kind, error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(c.id)
    .bind(n)
    .bind(attempt.at)
    .bind(attempt.duration_ms)
    .bind(attempt.status_code)
    .bind(&attempt.response)
    .bind(attempt.error_kind)
    .bind(&attempt.error)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM bss.webhook_attempts WHERE delivery_id = $1 AND n <= $2")
        .bind(c.id)
        .bind(n - ATTEMPTS_KEPT)
        .execute(&mut *tx)
        .await?;
    let mut out = Recorded {
        status: status.to_owned(),
        ..Default::default()
    };
    let failed_attempt = !matches!(next, Next::Succeeded | Next::Cancelled);
    // The endpoint's row is written only when its failure streak starts or
    // ends (not on every attempt).
    let streak: Option<(Option<f64>,)> = sqlx::query_as(
        "SELECT extract(epoch FROM now() - failing_since)::float8 FROM bss.webhooks WHERE id = $1",
    )
    .bind(c.webhook_id)
    .fetch_optional(&mut *tx)
    .await?;
    let streak = streak.map(|(s,)| s);
    if matches!(streak, Some(Some(_))) != failed_attempt && streak.is_some() {
        sqlx::query(
            "UPDATE bss.webhooks
                SET failing_since = CASE WHEN $2 THEN now() ELSE NULL END
              WHERE id = $1",
        )
        .bind(c.webhook_id)
        .bind(failed_attempt)
        .execute(&mut *tx)
        .await?;
    }
    let failing_for = streak.flatten().unwrap_or(0.0);
    let disable = match next {
        Next::Gone => Some(format!(
            "the endpoint answered 410 Gone on {}",
            attempt.at.to_rfc3339()
        )),
        _ if failed_attempt && failing_for >= by.disable_after_secs => Some(format!(
            "every attempt failed for {} hours",
            (failing_for / 3600.0).floor()
        )),
        _ => None,
    };
    let tenant = &c.tenant_id;
    let subject = format!("webhooks/{}", c.webhook_id);
    let key = format!("{tenant}/{RESOURCE}/{}", c.webhook_id);
    let tenant_id =
        crate::domain::TenantId::parse(tenant).map_err(|e| StorageError::BadRequest(e.0))?;
    // Correlated with the event whose delivery it is about.
    let ctx = crate::events::EventContext {
        source: by.source.to_owned(),
        correlation_id: c.event_id.to_string(),
        traceparent: c
            .envelope
            .as_ref()
            .and_then(|e| e["traceparent"].as_str())
            .map(str::to_owned),
    };
    let mut event = |kind: &str, data: Value| {
        let id = crate::events::envelope::new_event_id();
        let envelope =
            crate::events::envelope::complete(&ctx, &tenant_id, id, kind, &subject, data);
        out.events += 1;
        (id, kind.to_owned(), envelope)
    };
    let mut events = Vec::new();
    if status == "failed" {
        events.push(event(
            FAILED_EVENT,
            json!({
                "tenantId": tenant,
                "webhookId": c.webhook_id,
                "deliveryId": c.id,
                "eventId": c.event_id,
                "eventType": c.event_type,
                "attempts": n,
                "lastStatusCode": attempt.status_code,
                "lastError": attempt.error,
            }),
        ));
    }
    if let Some(reason) = disable {
        let done = sqlx::query(
            "UPDATE bss.webhooks SET enabled = false, disabled_reason = $2, updated_at = now()
              WHERE id = $1 AND enabled",
        )
        .bind(c.webhook_id)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            events.push(event(
                DISABLED_EVENT,
                json!({"tenantId": tenant, "webhookId": c.webhook_id, "reason": reason}),
            ));
            out.disabled = Some(reason);
        }
    }
    for (id, kind, envelope) in &events {
        outbox::insert(&mut *tx, *id, tenant, RESOURCE, kind, &key, envelope).await?;
    }
    tx.commit().await?;
    Ok(Some(out))
}

/// Records successful attempts of deliveries this replica still holds the
/// leases of, in one statement (those whose lease it lost are left out):
/// the fast path, since a success causes no event and ends a failure
/// streak. Returns how many were recorded.
pub async fn record_successes(
    pool: &PgPool,
    done: &[(&Claimed, &Attempt)],
) -> Result<u64, StorageError> {
    let ids: Vec<Uuid> = done.iter().map(|(c, _)| c.id).collect();
    let leases: Vec<Uuid> = done.iter().map(|(c, _)| c.lease).collect();
    let at: Vec<DateTime<Utc>> = done.iter().map(|(_, a)| a.at).collect();
    let took: Vec<i32> = done.iter().map(|(_, a)| a.duration_ms).collect();
    let codes: Vec<Option<i32>> = done.iter().map(|(_, a)| a.status_code).collect();
    let answers: Vec<Option<String>> = done.iter().map(|(_, a)| a.response.clone()).collect();
    let (n,): (i64,) = sqlx::query_as(
        "WITH i AS (
            SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::int[], $5::int[],
                                 $6::text[]) AS i(id, lease, at, duration_ms, code, response)
         ), upd AS (
            UPDATE bss.webhook_deliveries d
               SET status = 'succeeded', attempts = d.attempts + 1, step = d.step + 1,
                   leased_until = NULL, lease = NULL, last_status_code = i.code,
                   last_error = NULL, updated_at = now()
              FROM i WHERE d.id = i.id AND d.lease = i.lease
            RETURNING d.id, d.webhook_id, d.attempts
         ), added AS (
            INSERT INTO bss.webhook_attempts (delivery_id, n, at, duration_ms, status_code, response)
            SELECT upd.id, upd.attempts, i.at, i.duration_ms, i.code, i.response
              FROM upd JOIN i ON i.id = upd.id
         ), trimmed AS (
            DELETE FROM bss.webhook_attempts a USING upd
             WHERE a.delivery_id = upd.id AND upd.attempts > $7 AND a.n <= upd.attempts - $7
         ), healed AS (
            UPDATE bss.webhooks w SET failing_since = NULL
             WHERE w.id IN (SELECT webhook_id FROM upd) AND w.failing_since IS NOT NULL
         )
         SELECT count(*) FROM upd",
    )
    .bind(&ids)
    .bind(&leases)
    .bind(&at)
    .bind(&took)
    .bind(&codes)
    .bind(&answers)
    .bind(ATTEMPTS_KEPT)
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// A delivery as its tenant sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Delivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub event_seq: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub event_time: DateTime<Utc>,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const DELIVERY_COLUMNS: &str = "id, webhook_id, event_seq, event_id, event_type, event_time, \
     status, attempts, next_attempt_at, last_status_code, last_error, created_at, updated_at";

/// An attempt as its tenant sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub delivery_id: Uuid,
    pub n: i32,
    pub at: DateTime<Utc>,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub response: Option<String>,
    pub error_kind: Option<String>,
    pub error: Option<String>,
}

/// Which deliveries a page lists.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<String>,
    pub event_type: Option<String>,
    /// Event times from `since` (inclusive) to `until` (exclusive).
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// The log position of the last delivery of the previous page.
    pub before_seq: Option<i64>,
    pub limit: i64,
}

/// An endpoint's deliveries, newest event first, with their attempts.
pub async fn deliveries(
    pool: &PgPool,
    tenant: &str,
    webhook: Uuid,
    f: &DeliveryFilter,
) -> Result<Vec<(Delivery, Vec<AttemptRow>)>, StorageError> {
    let rows: Vec<Delivery> = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM bss.webhook_deliveries
          WHERE tenant_id = $1 AND webhook_id = $2
            AND ($3::text IS NULL OR status = $3) AND ($4::text IS NULL OR event_type = $4)
            AND ($5::timestamptz IS NULL OR event_time >= $5)
            AND ($6::timestamptz IS NULL OR event_time < $6)
            AND ($7::bigint IS NULL OR event_seq < $7)
          ORDER BY event_seq DESC LIMIT $8"
    ))
    .bind(tenant)
    .bind(webhook)
    .bind(&f.status)
    .bind(&f.event_type)
    .bind(f.since)
    .bind(f.until)
    .bind(f.before_seq)
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    with_attempts(pool, rows).await
}

async fn with_attempts(
    pool: &PgPool,
    rows: Vec<Delivery>,
) -> Result<Vec<(Delivery, Vec<AttemptRow>)>, StorageError> {
    let ids: Vec<Uuid> = rows.iter().map(|d| d.id).collect();
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT delivery_id, n, at, duration_ms, status_code, response, error_kind, error
           FROM bss.webhook_attempts WHERE delivery_id = ANY ($1) ORDER BY delivery_id, n",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|d| {
            let mine = attempts
                .iter()
                .filter(|a| a.delivery_id == d.id)
                .cloned()
                .collect();
            (d, mine)
        })
        .collect())
}

/// One delivery of the tenant's endpoint, with its attempts.
pub async fn delivery(
    pool: &PgPool,
    tenant: &str,
    webhook: Uuid,
    id: Uuid,
) -> Result<Option<(Delivery, Vec<AttemptRow>)>, StorageError> {
    let rows: Vec<Delivery> = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM bss.webhook_deliveries
          WHERE tenant_id = $1 AND webhook_id = $2 AND id = $3"
    ))
    .bind(tenant)
    .bind(webhook)
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(with_attempts(pool, rows).await?.pop())
}

/// Queues a finished delivery again, now, at the start of the schedule
/// (None when it is still pending or does not exist).
pub async fn retry(
    pool: &PgPool,
    tenant: &str,
    webhook: Uuid,
    id: Uuid,
) -> Result<Option<Delivery>, StorageError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE bss.webhook_deliveries
            SET status = 'pending', step = 0, next_attempt_at = now(), updated_at = now()
          WHERE tenant_id = $1 AND webhook_id = $2 AND id = $3 AND status <> 'pending'
         RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(tenant)
    .bind(webhook)
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// What a replay queued.
#[derive(Debug, Clone, Copy)]
pub struct Replayed {
    /// Deliveries queued: events of the range the endpoint matches (those
    /// still pending keep their place).
    pub queued: i64,
    /// Whether the range holds more than `limit` events: replay again from
    /// `continue_from` (the time of the first event left out).
    pub more: bool,
    pub continue_from: Option<DateTime<Utc>>,
}

/// Queues, for one endpoint, the tenant's events of a time range that it
/// matches (at most `limit` events read): new deliveries for events it never
/// had, finished ones back to pending (same delivery, same `webhook-id`).
pub async fn replay(
    pool: &PgPool,
    endpoint: &Endpoint,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Replayed, StorageError> {
    let (read, queued, last): (i64, i64, Option<DateTime<Utc>>) = sqlx::query_as(&format!(
        "WITH ev AS (
            SELECT o.seq, o.event_id, o.tenant_id, o.type, o.resource, o.envelope, o.created_at
              FROM bss.outbox o
             WHERE o.tenant_id = $1 AND o.seq IS NOT NULL
               AND o.created_at >= $3 AND ($4::timestamptz IS NULL OR o.created_at < $4)
               AND o.seq <= (SELECT dispatched_seq FROM bss.webhook_state WHERE id = 1)
             ORDER BY o.seq LIMIT $5
         ), after_ev AS (
            SELECT o.created_at FROM bss.outbox o
             WHERE o.tenant_id = $1 AND o.seq > (SELECT coalesce(max(seq), 0) FROM ev)
               AND o.created_at >= $3 AND ($4::timestamptz IS NULL OR o.created_at < $4)
               AND o.seq <= (SELECT dispatched_seq FROM bss.webhook_state WHERE id = 1)
             ORDER BY o.seq LIMIT 1
         ), up AS (
            INSERT INTO bss.webhook_deliveries
                   (id, tenant_id, webhook_id, event_seq, event_id, event_type, event_time)
            SELECT gen_random_uuid(), ev.tenant_id, w.id, ev.seq, ev.event_id, ev.type, ev.created_at
              FROM ev JOIN bss.webhooks w ON w.id = $2
             WHERE {MATCHES_SQL}
             ORDER BY ev.seq
            ON CONFLICT (webhook_id, event_seq) DO UPDATE
               SET status = 'pending', step = 0, next_attempt_at = now(), updated_at = now()
             -- One still pending keeps its place in its schedule.
             WHERE bss.webhook_deliveries.status <> 'pending'
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM ev) + (SELECT count(*) FROM after_ev),
                (SELECT count(*) FROM up),
                (SELECT created_at FROM after_ev)"
    ))
    .bind(&endpoint.tenant_id)
    .bind(endpoint.id)
    .bind(since)
    .bind(until)
    .bind(limit)
    .fetch_one(pool)
    .await?;
    Ok(Replayed {
        queued,
        more: read > limit,
        continue_from: last,
    })
}

/// Deletes finished deliveries (with their attempts) older than the
/// retention, at most `limit` a pass.
pub async fn prune(pool: &PgPool, retention_secs: f64, limit: i64) -> Result<u64, StorageError> {
    let done = sqlx::query(
        "DELETE FROM bss.webhook_deliveries WHERE id IN (
            SELECT id FROM bss.webhook_deliveries
             WHERE status <> 'pending' AND updated_at < now() - make_interval(secs => $1)
             LIMIT $2)",
    )
    .bind(retention_secs)
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Pending deliveries per tenant, and the age in seconds of each tenant's
/// oldest (by event time).
pub async fn backlog(pool: &PgPool) -> Result<Vec<(String, i64, f64)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, count(*),
                coalesce(extract(epoch FROM now() - min(event_time)), 0)::float8
           FROM bss.webhook_deliveries WHERE status = 'pending'
          GROUP BY tenant_id",
    )
    .fetch_all(pool)
    .await?)
}

/// Endpoints enabled and disabled.
pub async fn endpoint_counts(pool: &PgPool) -> Result<(i64, i64), StorageError> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE enabled), count(*) FILTER (WHERE NOT enabled)
           FROM bss.webhooks",
    )
    .fetch_one(pool)
    .await?)
}

/// Whether the tenant has a webhook transformer of this name.
pub async fn transformer_exists(
    pool: &PgPool,
    tenant: &str,
    name: &str,
) -> Result<bool, StorageError> {
    let (exists,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM bss.plugins
                         WHERE tenant_id = $1 AND name = $2 AND kind = 'webhook-transformer')",
    )
    .bind(tenant)
    .bind(name)
    .fetch_one(pool)
    .await?;
    Ok(exists)
}
