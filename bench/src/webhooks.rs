//! `--only webhooks`: the webhook sender against a local receiver, beside a
//! plain HTTP client posting the same bodies (same headers) to the same
//! receiver in the same run.
//!
//! 1. Throughput: one tenant, four endpoints subscribed to record creations;
//!    5,000 records written in batches, timed until all 20,000 deliveries
//!    arrived. The plain client then posts those 20,000 bodies with 16
//!    concurrent requests (the tenant's in-flight share).
//! 2. Latency at 1,000 deliveries/s: 250 creates per second for the
//!    measurement's seconds (four deliveries each); per delivery, the event's
//!    commit (its outbox row's `created_at`) to the receiver's clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use axum::body::Bytes;
use axum::http::HeaderMap;
use hdrhistogram::Histogram;
use serde_json::json;
use sqlx::Connection;

use crate::Figures;
use crate::http_load::{Target, invoice};

const ENDPOINTS: usize = 4;
const THROUGHPUT_EVENTS: u64 = 5_000;
const PLAIN_CLIENTS: usize = 16;
const PACED_EVENTS_PER_SEC: u64 = 250;

#[derive(Default)]
struct Received {
    /// (webhook-id, when), in arrival order.
    arrivals: Vec<(String, SystemTime)>,
    /// Bodies and headers kept for the plain client to send again.
    requests: Vec<(HeaderMap, Bytes)>,
}

type Shared = Arc<Mutex<Received>>;

async fn receiver() -> anyhow::Result<(String, Shared)> {
    let seen: Shared = Arc::default();
    let state = seen.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
        let state = state.clone();
        async move {
            let at = SystemTime::now();
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.arrivals.push((id, at));
            if s.requests.len() < (THROUGHPUT_EVENTS as usize) * ENDPOINTS {
                s.requests.push((headers, body));
            }
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((base, seen))
}

fn arrived(seen: &Shared) -> usize {
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .arrivals
        .len()
}

async fn wait_for(seen: &Shared, n: usize, within: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    while arrived(seen) < n {
        anyhow::ensure!(
            Instant::now() < until,
            "only {} of {n} deliveries arrived within {within:?}",
            arrived(seen)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

pub async fn run(target: &Target, db: &str, seconds: Duration) -> anyhow::Result<()> {
    let (rx, seen) = receiver().await?;
    for i in 0..ENDPOINTS {
        target
            .register_webhook(
                &json!({"url": format!("{rx}/in/{i}"), "events": ["business_store.data.created"]}),
            )
            .await?;
    }
    println!("webhooks: {ENDPOINTS} endpoints on a local receiver");
    println!(
        "{:<52} {:>10} {:>8} {:>8} {:>7}",
        "scenario", "rate/s", "p50 ms", "p99 ms", "ratio"
    );

    // 1. Throughput.
    let total = THROUGHPUT_EVENTS as usize * ENDPOINTS;
    let started = Instant::now();
    for _ in 0..THROUGHPUT_EVENTS / 1000 {
        target.batch(1000).await.context("writing a batch")?;
    }
    wait_for(&seen, total, Duration::from_secs(600)).await?;
    let sender = total as f64 / started.elapsed().as_secs_f64();
    let requests = std::mem::take(&mut seen.lock().unwrap_or_else(|e| e.into_inner()).requests);
    let plain = plain_client(&format!("{rx}/plain"), requests).await?;
    let line = |name: &str, f: &Figures, ratio: Option<f64>| {
        println!(
            "{name:<52} {:>10.0} {:>8.2} {:>8.2} {:>7}",
            f.rate,
            f.p50_ms,
            f.p99_ms,
            ratio.map(|r| format!("{r:.2}x")).unwrap_or_default()
        );
    };
    line(
        &format!("sender: {total} deliveries (write → all received)"),
        &Figures {
            rate: sender,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
            ..Default::default()
        },
        Some(sender / plain.rate),
    );
    line(
        &format!("plain client, {PLAIN_CLIENTS} concurrent, same bodies"),
        &plain,
        None,
    );

    // 2. Latency at a paced 1,000 deliveries/s.
    let before = arrived(&seen);
    let events = PACED_EVENTS_PER_SEC * seconds.as_secs().max(1);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / PACED_EVENTS_PER_SEC as u32);
    let mut writes = tokio::task::JoinSet::new();
    for n in 0..events {
        tick.tick().await;
        let t = target.clone();
        writes.spawn(async move { t.create(&invoice(n)).await });
    }
    while let Some(done) = writes.join_next().await {
        done??;
    }
    let expected = before + events as usize * ENDPOINTS;
    wait_for(&seen, expected, Duration::from_secs(120)).await?;
    let arrivals: Vec<(String, SystemTime)> =
        seen.lock().unwrap_or_else(|e| e.into_inner()).arrivals[before..].to_vec();
    let mut conn = sqlx::PgConnection::connect(db).await?;
    let ids: Vec<uuid::Uuid> = arrivals
        .iter()
        .filter_map(|(id, _)| id.parse().ok())
        .collect();
    let committed: Vec<(uuid::Uuid, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT event_id, created_at FROM bss.outbox WHERE event_id = ANY ($1)")
            .bind(&ids)
            .fetch_all(&mut conn)
            .await?;
    let committed: std::collections::HashMap<String, chrono::DateTime<chrono::Utc>> = committed
        .into_iter()
        .map(|(id, at)| (id.to_string(), at))
        .collect();
    let mut hist = Histogram::<u64>::new(3)?;
    for (id, at) in &arrivals {
        if let Some(c) = committed.get(id) {
            let at: chrono::DateTime<chrono::Utc> = (*at).into();
            let micros = (at - *c).num_microseconds().unwrap_or(0).max(0) as u64;
            hist.record(micros)?;
        }
    }
    let paced = Figures {
        rate: (events as usize * ENDPOINTS) as f64 / seconds.as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        ..Default::default()
    };
    line(
        &format!(
            "commit → receiver at {} deliveries/s",
            PACED_EVENTS_PER_SEC * ENDPOINTS as u64
        ),
        &paced,
        None,
    );
    Ok(())
}

/// Posts the bodies the sender delivered, with their headers, `clients`
/// at a time: the receiver's and the HTTP stack's own rate.
async fn plain_client(url: &str, requests: Vec<(HeaderMap, Bytes)>) -> anyhow::Result<Figures> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(PLAIN_CLIENTS)
        .build()?;
    let queue = Arc::new(Mutex::new(requests));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..PLAIN_CLIENTS {
        let (client, queue, url) = (client.clone(), queue.clone(), url.to_owned());
        workers.spawn(async move {
            let mut hist = Histogram::<u64>::new(3)?;
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((headers, body)) = next else {
                    return Ok::<_, anyhow::Error>(hist);
                };
                let mut req = client.post(&url).body(body);
                for (k, v) in &headers {
                    if ["host", "content-length"].contains(&k.as_str()) {
                        continue;
                    }
                    req = req.header(k.as_str(), v.as_bytes());
                }
                let t0 = Instant::now();
                let resp = req.send().await?;
                resp.bytes().await?;
                hist.record(t0.elapsed().as_micros() as u64)?;
            }
        });
    }
    let mut all = Histogram::<u64>::new(3)?;
    while let Some(h) = workers.join_next().await {
        all.add(h??)?;
    }
    Ok(Figures {
        rate: all.len() as f64 / started.elapsed().as_secs_f64(),
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        ..Default::default()
    })
}
