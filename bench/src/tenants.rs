//! S8, many tenants (`--only tenants`, `--tenants N`, default 10,000):
//! provisions N tenants one after another (the provisioning latency), gives
//! each the `invoices` schema and a few records, then measures creates and
//! reads spread over all of them beside the same on one of them, in the
//! same run; and reports the memory of this process (service and load
//! generator) and of PostgreSQL's processes at each step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::http_load::{Load, Req, closed_loop, invoice, mint, seed};
use crate::{Figures, Options, measured, median, row};

/// Records each tenant starts with (what the reads read).
const RECORDS: u64 = 4;

struct Tenant {
    token: Arc<str>,
    ids: Vec<String>,
}

pub async fn run(o: &Options, base: &str, secret: &str) -> anyhow::Result<()> {
    let (count, runs) = (o.tenants, o.runs);
    let seconds = Duration::from_secs(o.seconds);
    anyhow::ensure!(count > 0, "--tenants must be at least 1");
    let client = reqwest::Client::new();
    memory("before provisioning");
    let admin = mint(secret, None, "platform-admin")?;
    let prefix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let ids: Vec<String> = (0..count).map(|i| format!("s8-{prefix}-{i:05}")).collect();
    let mut took = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let t0 = Instant::now();
        let resp = client
            .post(format!("{base}/v1/tenants"))
            .bearer_auth(&admin)
            .json(&json!({ "id": id }))
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 201, "provisioning {id}: {}", resp.status());
        took.record(t0.elapsed().as_micros() as u64)?;
        if (i + 1) % 1000 == 0 {
            eprintln!("provisioned {} tenants", i + 1);
        }
    }
    let ms = |q: f64| took.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "provisioning {count} tenants one after another: {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        count as f64 / started.elapsed().as_secs_f64(),
        ms(0.5),
        ms(0.99),
        took.max() as f64 / 1000.0
    );
    memory("after provisioning");

    let tenants: Vec<Tenant> = futures::stream::iter(&ids)
        .map(|id| set_up(&client, base, secret, id))
        .buffered(16)
        .try_collect()
        .await?;
    memory("after a schema and 4 records each");

    let load = Load::new(base, &tenants[0].token)?;
    let all = &tenants;
    let one = std::slice::from_ref(&tenants[0]);
    println!(
        "{:<46} {:>7} {:>10} {:>8} {:>8} {:>7} {:>8} {:>8}",
        "scenario", "clients", "rate/s", "p50 ms", "p99 ms", "ratio", "own µs", "all µs"
    );
    for kind in ["creates", "reads"] {
        for &c in &o.clients {
            let (mut spread, mut single) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let name = format!("{kind}-spread-{c}");
                spread.push(measured(o, &name, one_load(kind, &load, all, c, seconds)).await?);
                let name = format!("{kind}-one-{c}");
                single.push(measured(o, &name, one_load(kind, &load, one, c, seconds)).await?);
            }
            let (spread, single) = (median(spread), median(single));
            let name = format!("{kind} over {count} tenants");
            row(&name, c, spread, Some(spread.rate / single.rate));
            row(&format!("{kind}, one tenant"), c, single, None);
        }
    }
    memory("after the load");
    Ok(())
}

/// The tenant's `invoices` schema and its first records.
async fn set_up(
    client: &reqwest::Client,
    base: &str,
    secret: &str,
    id: &str,
) -> anyhow::Result<Tenant> {
    let token = mint(secret, Some(id), "admin")?;
    let ids = seed(client, base, &token, false, 0..RECORDS)
        .await
        .with_context(|| format!("tenant {id}"))?;
    Ok(Tenant {
        token: token.into(),
        ids,
    })
}

/// Spreads request `n` over the tenants (the same spread for every load).
fn pick(tenants: &[Tenant], n: u64) -> &Tenant {
    &tenants[(n.wrapping_mul(2_654_435_761) % tenants.len() as u64) as usize]
}

/// Creates or reads, spread over `tenants`.
async fn one_load(
    kind: &str,
    load: &Load,
    tenants: &[Tenant],
    clients: usize,
    d: Duration,
) -> anyhow::Result<Figures> {
    if kind == "creates" {
        creates(load, tenants, clients, d).await
    } else {
        reads(load, tenants, clients, d).await
    }
}

async fn creates(
    load: &Load,
    tenants: &[Tenant],
    clients: usize,
    d: Duration,
) -> anyhow::Result<Figures> {
    let request = |n| {
        let t = pick(tenants, n);
        Req::post("/v1/data/invoices", &invoice(n)).with_token(t.token.clone())
    };
    closed_loop(load, clients, d, request, 201).await
}

async fn reads(
    load: &Load,
    tenants: &[Tenant],
    clients: usize,
    d: Duration,
) -> anyhow::Result<Figures> {
    let request = |n: u64| {
        let t = pick(tenants, n);
        let id = &t.ids[(n >> 20) as usize % t.ids.len()];
        Req::get(format!("/v1/data/invoices/{id}")).with_token(t.token.clone())
    };
    closed_loop(load, clients, d, request, 200).await
}

/// Prints this process's resident memory (now and at its peak) and
/// PostgreSQL's: the proportional share (PSS, so shared buffers count once)
/// summed over its processes.
fn memory(when: &str) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let (rss, peak) = (field(&status, "VmRSS:"), field(&status, "VmHWM:"));
    let (mut pss, mut processes) = (0u64, 0usize);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let path = entry.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim() != "postgres" {
                continue;
            }
            let rollup = std::fs::read_to_string(path.join("smaps_rollup")).unwrap_or_default();
            pss += field(&rollup, "Pss:");
            processes += 1;
        }
    }
    println!(
        "memory {when}: this process {} MiB (peak {} MiB); PostgreSQL {} MiB PSS over {processes} processes",
        rss / 1024,
        peak / 1024,
        pss / 1024
    );
}
