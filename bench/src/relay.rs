//! The relay's figures, from the service's own `event_publish_latency_seconds`
//! histogram (commit → broker acknowledgement; quantiles are bucket upper
//! bounds, so read them as "at most"), and how fast it drains a burst.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::Connection;

use crate::Figures;
use crate::http_load::Target;

/// Cumulative bucket counts of the publish latency histogram.
type Buckets = Vec<(f64, u64)>;

async fn buckets(base: &str) -> anyhow::Result<Buckets> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("event_publish_latency_seconds_bucket{le=\"") else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        out.push((le, count.trim().parse()?));
    }
    Ok(out)
}

fn quantile(before: &Buckets, after: &Buckets, q: f64) -> f64 {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            (*le, n - was)
        })
        .collect();
    let total = diff.last().map(|(_, n)| *n).unwrap_or(0);
    let want = (q * total as f64).ceil() as u64;
    diff.iter()
        .find(|(_, n)| *n >= want.max(1))
        .map(|(le, _)| *le)
        .unwrap_or(f64::NAN)
}

async fn backlog(db: &str) -> anyhow::Result<i64> {
    let mut conn = sqlx::PgConnection::connect(db).await?;
    let (n,): (i64,) = sqlx::query_as(bss::events::outbox::BACKLOG_SQL)
        .fetch_one(&mut conn)
        .await?;
    Ok(n)
}

/// Waits until nothing is left to publish.
async fn drained(db: &str) -> anyhow::Result<()> {
    for _ in 0..6000 {
        if backlog(db).await? == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the relay did not drain the outbox within a minute")
}

/// A measurement window over the relay.
pub struct Window {
    before: Buckets,
    started: Instant,
}

impl Window {
    pub async fn start(base: &str, db: &str) -> anyhow::Result<Self> {
        drained(db).await?;
        Ok(Self {
            before: buckets(base).await?,
            started: Instant::now(),
        })
    }

    /// rate = events acknowledged per second of the window; p50/p99 = commit
    /// → acknowledgement of those events.
    pub async fn finish(self, base: &str, db: &str) -> anyhow::Result<Figures> {
        drained(db).await?;
        let secs = self.started.elapsed().as_secs_f64();
        let after = buckets(base).await?;
        let n = after.last().map(|(_, n)| *n).unwrap_or(0)
            - self.before.last().map(|(_, n)| *n).unwrap_or(0);
        Ok(Figures {
            rate: n as f64 / secs,
            p50_ms: quantile(&self.before, &after, 0.5) * 1000.0,
            p99_ms: quantile(&self.before, &after, 0.99) * 1000.0,
            ..Default::default()
        })
    }
}

/// Writes 20 batches of 1,000 records as fast as it can and measures until
/// the relay has published them all.
pub async fn drain(target: &Target, base: &str, db: &str) -> anyhow::Result<Figures> {
    let window = Window::start(base, db).await?;
    for _ in 0..20 {
        target.batch(1000).await.context("writing a batch")?;
    }
    window.finish(base, db).await
}

/// The broker's own floor: one event at a time through the relay's
/// producer (same settings), send → acknowledgement.
pub async fn broker_floor(settings: &bss::config::Settings) -> anyhow::Result<Figures> {
    use bss::events::OutboxEvent;
    use bss::events::kafka::KafkaPublisher;
    let config = bss::startup::kafka_config(settings).context("no Kafka configured")?;
    let publisher = KafkaPublisher::new(config)?;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for seq in 0..300 {
        let event = OutboxEvent {
            seq,
            event_id: uuid::Uuid::new_v4(),
            tenant_id: "bench".into(),
            resource: "invoices".into(),
            kind: "business_store.bench.probe".into(),
            kafka_key: format!("bench/{seq}"),
            envelope: serde_json::json!({"probe": seq}),
            created_at: chrono::Utc::now(),
        };
        let t0 = Instant::now();
        publisher
            .send(std::slice::from_ref(&event))
            .await?
            .all()
            .await?;
        hist.record(t0.elapsed().as_micros() as u64)?;
    }
    Ok(Figures {
        rate: hist.len() as f64 / started.elapsed().as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        ..Default::default()
    })
}
