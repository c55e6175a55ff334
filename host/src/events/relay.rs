//! The relay: one leader among the replicas (a PostgreSQL advisory lock held
//! on a dedicated connection) sequences committed outbox rows into the event
//! log and publishes them, in log order, to the broker; rows are marked
//! published only after the broker acknowledged them. A failing broker is
//! retried with backoff while writes keep committing. One leader keeps
//! per-record order without coordination; a standby takes over when the
//! leader's connection goes away.
//!
//! Waking the relay: a write on the leader's replica wakes it in-process; a
//! write on another replica sends `NOTIFY bss_outbox` through a nudger task
//! that coalesces many writes into one notification (a NOTIFY in every write
//! transaction would serialize commits: it measured 40% of the write rate).
//! Every replica also follows the log head (`LISTEN bss_events`), so its SSE
//! streams wake when any replica's leader sequenced new events.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{Notify, watch};

use super::broker::{Acks, Broker};
use super::outbox;
use crate::plugins::{Enriched, Plugins};

/// The advisory lock key of relay leadership ("bssrelay").
const LEADER_LOCK: i64 = 0x6273_7372_656c_6179;
const SEQUENCE_BATCH: i64 = 1000;
const PUBLISH_BATCH: i64 = 500;
/// Batches handed to the broker and not yet acknowledged, at most...
const PUBLISH_WINDOW: usize = 8;
/// ...and their payload bytes (full-payload events carry whole records):
/// another batch is handed over only below this (one always may be).
const PUBLISH_WINDOW_BYTES: usize = 16 << 20;
const ENRICH_BATCH: i64 = 20;
/// A tenant's enrichment worker stores what it has done at least this often.
const ENRICH_FLUSH: Duration = Duration::from_millis(100);
/// Tenants enriched at once; more wait for a later pass.
const ENRICH_WORKERS: usize = 64;
const COALESCE: Duration = Duration::from_millis(2);
/// A batch not acknowledged by then is retried (at least once, never lost).
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared handles: the log head readers wait on, and a wake-up for the relay.
#[derive(Debug, Clone)]
pub struct EventLog {
    head: watch::Sender<i64>,
    wake: Arc<Notify>,
    nudge: Arc<Notify>,
    leading: Arc<AtomicBool>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self {
            head: watch::channel(0).0,
            wake: Arc::new(Notify::new()),
            nudge: Arc::new(Notify::new()),
            leading: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl EventLog {
    /// Waits until the log head may have moved.
    pub fn follow(&self) -> watch::Receiver<i64> {
        self.head.subscribe()
    }

    fn advance(&self, seq: i64) {
        self.head.send_if_modified(|h| {
            let moved = seq > *h;
            if moved {
                *h = seq;
            }
            moved
        });
    }

    /// Tells the relay that a write committed `events` events here:
    /// in-process on the leader's replica, else through the coalescing nudger.
    pub fn written(&self, events: u64) {
        metrics::counter!("events_written_total").increment(events);
        if self.leading.load(Ordering::Relaxed) {
            self.wake.notify_one();
        } else {
            self.nudge.notify_one();
        }
    }
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub database_url_options: sqlx::postgres::PgConnectOptions,
    pub retention_secs: u64,
}

/// Aborts its tasks when dropped.
pub(crate) struct AbortOnDrop(pub(crate) Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs forever: follows the log head, and leads the relay when it can.
pub async fn run(
    pool: PgPool,
    broker: Arc<Broker>,
    log: EventLog,
    plugins: Arc<Plugins>,
    config: RelayConfig,
) {
    // Stopped with the relay (aborting `run` drops this guard).
    let _helpers = AbortOnDrop(vec![
        tokio::spawn(follow_head(pool.clone(), log.clone())),
        tokio::spawn(nudge_leader(pool.clone(), log.clone())),
    ]);
    loop {
        match PgConnection::connect_with(&config.database_url_options).await {
            Ok(mut conn) => {
                let got: Result<(bool,), _> = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                    .bind(LEADER_LOCK)
                    .fetch_one(&mut conn)
                    .await;
                if matches!(got, Ok((true,))) {
                    tracing::info!(broker = broker.name(), "leading the outbox relay");
                    log.leading.store(true, Ordering::Relaxed);
                    let led = lead(&pool, &broker, &log, &plugins, &config, &mut conn).await;
                    log.leading.store(false, Ordering::Relaxed);
                    if let Err(e) = led {
                        tracing::warn!(error = %e, "outbox relay stopped leading");
                    }
                }
                let _ = conn.close().await;
            }
            Err(e) => tracing::warn!(error = %e, "outbox relay cannot connect"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Leads until an error (such as losing the lock's connection): the
/// sequencer and the publisher run side by side, so a broker that hangs or
/// fails never holds up the event log that replay and SSE read.
async fn lead(
    pool: &PgPool,
    broker: &Broker,
    log: &EventLog,
    plugins: &Arc<Plugins>,
    config: &RelayConfig,
    lock: &mut PgConnection,
) -> Result<(), sqlx::Error> {
    tokio::try_join!(
        sequence_loop(pool, log, plugins, config, lock),
        publish_loop(pool, broker, log)
    )?;
    Ok(())
}

async fn sequence_loop(
    pool: &PgPool,
    log: &EventLog,
    plugins: &Arc<Plugins>,
    config: &RelayConfig,
    lock: &mut PgConnection,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("bss_outbox").await?;
    let mut last = outbox::last_seq(pool).await?;
    log.advance(last);
    let mut checked = Instant::now();
    let mut expired = Instant::now();
    let mut workers = EnrichWorkers::default();
    loop {
        let waiting = outbox::enricher_tenants(pool).await?;
        if !waiting.is_empty() {
            workers.start(pool, plugins, log, &waiting).await?;
        }
        while let Some(max) = outbox::sequence(pool, last, SEQUENCE_BATCH, &waiting).await? {
            last = max;
            log.advance(last);
            sqlx::query("SELECT pg_notify('bss_events', $1)")
                .bind(last.to_string())
                .execute(pool)
                .await?;
        }
        if checked.elapsed() > Duration::from_secs(5) {
            // Still holding the lock's connection; and report the backlog.
            sqlx::query("SELECT 1").execute(&mut *lock).await?;
            metrics::gauge!("outbox_backlog").set(outbox::backlog(pool).await? as f64);
            checked = Instant::now();
        }
        if expired.elapsed() > Duration::from_secs(60) {
            let n = outbox::expire(pool, config.retention_secs).await?;
            if n > 0 {
                tracing::info!(expired = n, "expired events past retention");
            }
            expired = Instant::now();
        }
        tokio::select! {
            r = listener.recv() => { r?; }
            () = log.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        // Let concurrent commits gather: one sequencing pass then covers many
        // writes instead of one each (a bounded cost in latency).
        tokio::time::sleep(COALESCE).await;
    }
}

/// One enrichment worker per tenant with events waiting for its enrichers,
/// each its own task: a slow enricher holds up only its own tenant's
/// events, never the sequencer or another tenant's. Dropping this (the
/// leader stepping down) stops them all.
#[derive(Default)]
struct EnrichWorkers {
    running: std::collections::HashMap<String, tokio::task::JoinHandle<()>>,
}

impl EnrichWorkers {
    /// Starts a worker for each tenant that has unenriched events and none.
    async fn start(
        &mut self,
        pool: &PgPool,
        plugins: &Arc<Plugins>,
        log: &EventLog,
        tenants: &[String],
    ) -> Result<(), sqlx::Error> {
        self.running.retain(|_, w| !w.is_finished());
        for tenant in outbox::tenants_to_enrich(pool, tenants).await? {
            if self.running.len() >= ENRICH_WORKERS {
                break;
            }
            if self.running.contains_key(&tenant) {
                continue;
            }
            let worker = enrich_tenant(pool.clone(), plugins.clone(), log.clone(), tenant.clone());
            self.running.insert(tenant, tokio::spawn(worker));
        }
        Ok(())
    }
}

impl Drop for EnrichWorkers {
    fn drop(&mut self) {
        for worker in self.running.values() {
            worker.abort();
        }
    }
}

/// Runs a tenant's enrichers over its committed events, in `id` order,
/// until none is left, storing results at least every [`ENRICH_FLUSH`] and
/// waking the sequencer. A failing enricher leaves its event as it was:
/// nothing is lost.
async fn enrich_tenant(pool: PgPool, plugins: Arc<Plugins>, log: EventLog, tenant: String) {
    let result: Result<(), sqlx::Error> = async {
        loop {
            let rows =
                outbox::unenriched(&pool, std::slice::from_ref(&tenant), ENRICH_BATCH).await?;
            if rows.is_empty() {
                return Ok(());
            }
            let mut done = EnrichedBatch::default();
            for row in rows {
                let outcome = plugins
                    .enrich(&row.tenant_id, &row.resource, &row.kind, &row.envelope)
                    .await;
                if matches!(outcome, Enriched::Later) {
                    // No free call slot: store what is done, retry next pass.
                    return done.store(&pool, &log).await;
                }
                done.add(row.id, outcome);
                if done.since.elapsed() >= ENRICH_FLUSH {
                    done.store(&pool, &log).await?;
                }
            }
            done.store(&pool, &log).await?;
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(tenant, error = %e, "enriching events failed; retrying next pass");
    }
}

/// Enrichment results not yet stored.
struct EnrichedBatch {
    since: Instant,
    unchanged: Vec<i64>,
    replaced: Vec<(i64, serde_json::Value)>,
    dropped: Vec<i64>,
}

impl Default for EnrichedBatch {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            unchanged: Vec::new(),
            replaced: Vec::new(),
            dropped: Vec::new(),
        }
    }
}

impl EnrichedBatch {
    fn add(&mut self, id: i64, outcome: Enriched) {
        match outcome {
            Enriched::Unchanged | Enriched::Later => self.unchanged.push(id),
            Enriched::Replaced(envelope) => self.replaced.push((id, envelope)),
            Enriched::Dropped => self.dropped.push(id),
        }
    }

    async fn store(&mut self, pool: &PgPool, log: &EventLog) -> Result<(), sqlx::Error> {
        let done = std::mem::take(self);
        if done.unchanged.is_empty() && done.replaced.is_empty() && done.dropped.is_empty() {
            return Ok(());
        }
        metrics::counter!("events_dropped_by_plugins_total").increment(done.dropped.len() as u64);
        outbox::enriched(pool, &done.unchanged, &done.replaced, &done.dropped).await?;
        log.wake.notify_one();
        Ok(())
    }
}

async fn publish_loop(pool: &PgPool, broker: &Broker, log: &EventLog) -> Result<(), sqlx::Error> {
    let mut head = log.follow();
    let mut backoff = Duration::from_millis(100);
    loop {
        head.borrow_and_update();
        if publish_pending(pool, broker).await? {
            backoff = Duration::from_millis(100);
            let _ = tokio::time::timeout(Duration::from_secs(1), head.changed()).await;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// A batch handed to the broker, not yet acknowledged.
struct InFlight {
    last: i64,
    written: Vec<chrono::DateTime<chrono::Utc>>,
    acks: Acks,
    sent: Instant,
}

/// Publishes sequenced events until none are left; false if the broker
/// failed. Up to [`PUBLISH_WINDOW`] batches and [`PUBLISH_WINDOW_BYTES`]
/// of payload are in flight at once (handed to the broker in log order);
/// the published position moves in log order as their acknowledgements
/// arrive, so after a failure everything from the
/// first unacknowledged batch is sent again (at least once, never lost).
async fn publish_pending(pool: &PgPool, broker: &Broker) -> Result<bool, sqlx::Error> {
    let mut read = outbox::published_seq(pool).await?;
    let mut in_flight = std::collections::VecDeque::<InFlight>::new();
    loop {
        while window_has_room(&in_flight) {
            let batch = outbox::sequenced_after(pool, read, PUBLISH_BATCH).await?;
            let Some(last) = batch.last().map(|e| e.seq) else {
                break;
            };
            read = last;
            // Handing over may create topics first: bounded like the acks.
            match tokio::time::timeout(PUBLISH_TIMEOUT, broker.send(&batch)).await {
                Ok(Ok(acks)) => in_flight.push_back(InFlight {
                    last,
                    written: batch.iter().map(|e| e.created_at).collect(),
                    acks,
                    sent: Instant::now(),
                }),
                Ok(Err(e)) => return Ok(publish_failed(&e.to_string(), batch.len())),
                Err(_) => {
                    let e = format!("not handed to the broker within {PUBLISH_TIMEOUT:?}");
                    return Ok(publish_failed(&e, batch.len()));
                }
            }
            if batch.len() < PUBLISH_BATCH as usize {
                break; // caught up with the sequencer
            }
        }
        let Some(batch) = in_flight.pop_front() else {
            return Ok(true);
        };
        let left = PUBLISH_TIMEOUT.saturating_sub(batch.sent.elapsed());
        let failure = match tokio::time::timeout(left, batch.acks.all()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no acknowledgement within {PUBLISH_TIMEOUT:?}")),
        };
        if let Some(e) = failure {
            let pending =
                batch.written.len() + in_flight.iter().map(|b| b.written.len()).sum::<usize>();
            return Ok(publish_failed(&e, pending));
        }
        outbox::mark_published(pool, batch.last).await?;
        let now = chrono::Utc::now();
        for created in &batch.written {
            let latency = (now - *created).num_microseconds().unwrap_or(0) as f64 / 1e6;
            metrics::histogram!("event_publish_latency_seconds").record(latency.max(0.0));
        }
        metrics::counter!("events_published_total").increment(batch.written.len() as u64);
    }
}

/// Whether another batch may be handed to the broker.
fn window_has_room(in_flight: &std::collections::VecDeque<InFlight>) -> bool {
    let bytes: usize = in_flight.iter().map(|b| b.acks.bytes()).sum();
    in_flight.is_empty() || (in_flight.len() < PUBLISH_WINDOW && bytes < PUBLISH_WINDOW_BYTES)
}

/// Counts and logs a failed publication; the relay retries it (false).
fn publish_failed(error: &str, pending: usize) -> bool {
    metrics::counter!("events_publish_errors_total").increment(1);
    tracing::warn!(error, pending, "publishing events failed; will retry");
    false
}

/// Wakes the leader on another replica: one NOTIFY covers every write that
/// happened here while the previous one was being sent.
async fn nudge_leader(pool: PgPool, log: EventLog) {
    loop {
        log.nudge.notified().await;
        if let Err(e) = sqlx::query("SELECT pg_notify('bss_outbox', '')")
            .execute(&pool)
            .await
        {
            tracing::debug!(error = %e, "nudging the relay leader failed; it polls every second");
        }
    }
}

/// Keeps this replica's log head current from the leader's notifications.
async fn follow_head(pool: PgPool, log: EventLog) {
    loop {
        let result: Result<(), sqlx::Error> = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen("bss_events").await?;
            log.advance(outbox::last_seq(&pool).await?);
            loop {
                let n = listener.recv().await?;
                if let Ok(seq) = n.payload().parse::<i64>() {
                    log.advance(seq);
                }
            }
        }
        .await;
        if pool.is_closed() {
            return; // shutting down
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "following the event log failed; retrying");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
