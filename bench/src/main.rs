//! `cargo run --release -p bss-bench`: record create and read-by-id over
//! HTTP at several concurrencies, each printed beside pgbench running the
//! same INSERT / prepared SELECT against the same PostgreSQL in the same run.
//!
//! Options: `--seconds N` per measurement (default 10), `--clients 16,32,64`,
//! `--runs N` (median of N runs, default 1), `--database-url URL` (default
//! the local server), `--kafka HOST:PORT`, `--only plugins` (the plugin
//! runtime's figures instead, see `plugins.rs`; `--plugins DIR` names the
//! built components, default `plugins/target/wasm32-wasip2/release`),
//! `--only encryption` (creates with two `x-encrypted` fields beside the
//! same creates without, alternating, in one run), `--only creates` or
//! `--only reads` (one half of the default report), `--profile DIR` (a
//! CPU profile of each HTTP scenario, see `profile.rs`), `--write-workers N`
//! (the service's writers of coalesced creates), `--only tenants` with
//! `--tenants N` (S8: provisioning, and load spread over N tenants beside
//! one, in a database of its own; see `tenants.rs`), `--db-connections N`
//! (the service's pool, default 24), `--only webhooks` (the webhook sender
//! beside a plain HTTP client, see `webhooks.rs`). Every run starts
//! from an empty database (dropped first).
//! Every row also says how much CPU a request cost in this process (the
//! service and the load generator) and in PostgreSQL.
//! It is a benchmark, not a test: it asserts nothing.

mod http_load;
mod pgbench;
mod plugins;
mod pocketbase;
mod profile;
mod relay;
mod tenants;
mod webhooks;

use std::time::Duration;

use anyhow::Context;
use bss::config::Settings;
use bss::startup::Application;
use sqlx::Connection;

#[derive(Debug, Clone)]
struct Options {
    seconds: u64,
    clients: Vec<usize>,
    runs: usize,
    server_url: String,
    /// Publish to this Kafka (else the built-in broker).
    kafka: Option<String>,
    only: Option<String>,
    plugins: std::path::PathBuf,
    profile: Option<std::path::PathBuf>,
    /// The service's `write_workers` (default: its own default).
    write_workers: Option<usize>,
    /// Tenants of `--only tenants`.
    tenants: usize,
    /// The service's `db_max_connections` (default 24: room for pgbench's 64).
    db_connections: u32,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        seconds: 10,
        clients: vec![16, 32, 64],
        runs: 1,
        server_url: "postgres://postgres@127.0.0.1:5432".into(),
        kafka: None,
        only: None,
        plugins: "plugins/target/wasm32-wasip2/release".into(),
        profile: None,
        write_workers: None,
        tenants: 10_000,
        db_connections: 24,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => o.seconds = v.parse()?,
            "--clients" => o.clients = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--runs" => o.runs = v.parse()?,
            "--database-url" => o.server_url = v.trim_end_matches('/').to_owned(),
            "--kafka" => o.kafka = Some(v.clone()),
            "--only" => o.only = Some(v.clone()),
            "--plugins" => o.plugins = v.into(),
            "--profile" => o.profile = Some(v.into()),
            "--write-workers" => o.write_workers = Some(v.parse()?),
            "--tenants" => o.tenants = v.parse()?,
            "--db-connections" => o.db_connections = v.parse()?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

/// One measured line of the report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU µs per request in this process, and in the whole machine.
    pub own_us: f64,
    pub all_us: f64,
}

/// Runs one measurement, profiled when asked, with its CPU per request.
async fn measured<F>(o: &Options, name: &str, run: F) -> anyhow::Result<Figures>
where
    F: std::future::Future<Output = anyhow::Result<Figures>>,
{
    let profile = profile::start(o.profile.as_deref(), name)?;
    let cpu = profile::Cpu::now();
    let started = std::time::Instant::now();
    let mut f = run.await?;
    (f.own_us, f.all_us) = cpu.per_request(f.rate * started.elapsed().as_secs_f64());
    if let Some(p) = profile {
        p.finish()?;
    }
    Ok(f)
}

/// pgbench as a measurement.
async fn pgbench_run(o: &Options, script: pgbench::Script, c: usize) -> anyhow::Result<Figures> {
    let seconds = Duration::from_secs(o.seconds);
    let name = format!("pgbench-{script:?}-{c}");
    measured(o, &name, async {
        pgbench::run(&o.server_url, DATABASE, script, c, seconds)
    })
    .await
}

fn median(mut runs: Vec<Figures>) -> Figures {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

const DATABASE: &str = "bss_bench";
/// The database of `--only tenants` (each database is dropped before a run).
const TENANTS_DATABASE: &str = "bss_bench_tenants";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let many = o.only.as_deref() == Some("tenants");
    let database = if many { TENANTS_DATABASE } else { DATABASE };
    // Every run starts from an empty database: the outbox and pgbench's
    // tables of earlier runs (their dead rows too, where autovacuum is off)
    // would otherwise weigh on this one.
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", o.server_url)).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    let settings = Settings {
        http_addr: "127.0.0.1:0".parse()?,
        database_url: Some(format!("{}/{database}", o.server_url)),
        // Leaves room under max_connections for pgbench's 64 clients.
        db_max_connections: o.db_connections,
        kafka_brokers: o.kafka.clone(),
        // Measures the service, not the per-tenant rate limiter.
        rate_limit_rps: 0,
        ..Settings::default()
    };
    let webhooks = o.only.as_deref() == Some("webhooks");
    let settings = Settings {
        write_workers: o.write_workers.unwrap_or(settings.write_workers),
        // The receiver is on loopback, over http.
        webhook_allow: if webhooks {
            "127.0.0.1/32".into()
        } else {
            String::new()
        },
        webhook_allow_http: webhooks,
        ..settings
    };
    let app = Application::build(settings.clone()).await?;
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until(std::future::pending()));

    if many {
        let secret = bss::auth::LocalSecret::resolve(&settings)?;
        return tenants::run(&o, &base, secret.as_str()).await;
    }
    let target =
        http_load::prepare(&base, bss::auth::LocalSecret::resolve(&settings)?.as_str()).await?;
    if o.only.as_deref() == Some("plugins") {
        let hooked =
            http_load::prepare(&base, bss::auth::LocalSecret::resolve(&settings)?.as_str()).await?;
        let seconds = Duration::from_secs(o.seconds);
        return plugins::run(
            &o.plugins,
            o.runs,
            target,
            hooked,
            &o.clients,
            seconds,
            o.profile.as_deref(),
        )
        .await;
    }
    if webhooks {
        let db = format!("{}/{DATABASE}", o.server_url);
        return webhooks::run(&target, &db, Duration::from_secs(o.seconds)).await;
    }
    if o.only.as_deref() == Some("encryption") {
        let secret = bss::auth::LocalSecret::resolve(&settings)?;
        let sealed = http_load::prepare_with(&base, secret.as_str(), true).await?;
        return encryption(&o, &target, &sealed).await;
    }
    pgbench::prepare(&o.server_url, DATABASE).await?;
    // The other peer: PocketBase (SQLite), same record shape, same clients.
    let peer = pocketbase::start().await?;
    let seconds = Duration::from_secs(o.seconds);

    println!(
        "Business Store benchmark: {} s per measurement, median of {} run(s), PostgreSQL at {}, broker {}",
        o.seconds,
        o.runs,
        o.server_url,
        o.kafka
            .as_deref()
            .map(|k| format!("Kafka at {k}"))
            .unwrap_or("built-in".into())
    );
    let db = format!("{}/{DATABASE}", o.server_url);
    println!(
        "{:<46} {:>7} {:>10} {:>8} {:>8} {:>7} {:>8} {:>8}",
        "scenario", "clients", "rate/s", "p50 ms", "p99 ms", "ratio", "own µs", "all µs"
    );
    let (creates, reads) = match o.only.as_deref() {
        None => (true, true),
        Some("creates") => (true, false),
        Some("reads") => (false, true),
        Some(other) => anyhow::bail!("unknown --only {other}"),
    };
    for &c in &o.clients {
        if !creates {
            break;
        }
        let mut http = Vec::new();
        let mut pg = Vec::new();
        let mut pg_plain = Vec::new();
        let mut pg_outbox = Vec::new();
        let mut relay_runs = Vec::new();
        let mut pb = Vec::new();
        for _ in 0..o.runs {
            let window = relay::Window::start(&base, &db).await?;
            let name = format!("creates-{c}");
            http.push(measured(&o, &name, http_load::creates(&target, c, seconds)).await?);
            relay_runs.push(window.finish(&base, &db).await?);
            pg.push(pgbench_run(&o, pgbench::Script::ServiceInsert, c).await?);
            pg_plain.push(pgbench_run(&o, pgbench::Script::Insert, c).await?);
            pg_outbox.push(pgbench_run(&o, pgbench::Script::InsertWithOutbox, c).await?);
            let name = format!("pocketbase-creates-{c}");
            pb.push(measured(&o, &name, peer.creates(c, seconds)).await?);
        }
        let (h, p) = (median(http), median(pg));
        let (pp, po) = (median(pg_plain), median(pg_outbox));
        row(
            "POST /v1/data/invoices (JWT, schema, outbox)",
            c,
            h,
            Some(h.rate / p.rate),
        );
        row("pgbench: the service's statement", c, p, None);
        row(
            "pgbench: plain INSERT (no version lock)",
            c,
            pp,
            Some(h.rate / pp.rate),
        );
        row(
            "pgbench: INSERT + outbox INSERT (S1 peer)",
            c,
            po,
            Some(h.rate / po.rate),
        );
        let pb = median(pb);
        row(
            "PocketBase 0.40.6: POST record (token)",
            c,
            pb,
            Some(h.rate / pb.rate),
        );
        let r = median(relay_runs);
        row(
            "relay meanwhile: commit -> broker ack (<=)",
            c,
            r,
            Some(r.rate / h.rate),
        );
    }
    if creates {
        let drain = relay::drain(&target, &base, &db).await?;
        row("relay: drain 20,000 events of batch writes", 0, drain, None);
        if o.kafka.is_some() {
            let floor = relay::broker_floor(&settings).await?;
            row("Kafka floor: one event, send -> ack", 1, floor, None);
        }
    }
    for &c in &o.clients {
        if !reads {
            break;
        }
        let mut http = Vec::new();
        let mut pg = Vec::new();
        let mut pb = Vec::new();
        for _ in 0..o.runs {
            let name = format!("reads-{c}");
            http.push(measured(&o, &name, http_load::reads(&target, c, seconds)).await?);
            pg.push(pgbench_run(&o, pgbench::Script::SelectById, c).await?);
            let name = format!("pocketbase-reads-{c}");
            pb.push(measured(&o, &name, peer.reads(c, seconds)).await?);
        }
        let (h, p) = (median(http), median(pg));
        row(
            "GET /v1/data/invoices/{id} (JWT)",
            c,
            h,
            Some(h.rate / p.rate),
        );
        row("pgbench: the same SELECT by id (prepared)", c, p, None);
        let pb = median(pb);
        row(
            "PocketBase 0.40.6: GET record by id (token)",
            c,
            pb,
            Some(h.rate / pb.rate),
        );
        // What the HTTP stack and this load generator cost with no work behind them.
        let name = format!("live-{c}");
        let floor = measured(&o, &name, http_load::live(&target, c, seconds)).await?;
        row("HTTP floor: GET /health/live, same client", c, floor, None);
    }
    Ok(())
}

fn row(name: &str, clients: usize, f: Figures, ratio: Option<f64>) {
    let ratio = ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
    println!(
        "{name:<46} {clients:>7} {:>10.0} {:>8.2} {:>8.2} {ratio:>7} {:>8.0} {:>8.0}",
        f.rate, f.p50_ms, f.p99_ms, f.own_us, f.all_us
    );
}

/// Creates with two encrypted fields beside the same creates without.
async fn encryption(
    o: &Options,
    plain: &http_load::Target,
    sealed: &http_load::Target,
) -> anyhow::Result<()> {
    let seconds = Duration::from_secs(o.seconds);
    println!(
        "creates, two x-encrypted fields (built-in keyring) vs none: {} s each, median of {} run(s)",
        o.seconds, o.runs
    );
    println!(
        "{:<10} {:>12} {:>12} {:>7}",
        "clients", "plain/s", "encrypted/s", "ratio"
    );
    for &c in &o.clients {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..o.runs {
            a.push(http_load::creates(plain, c, seconds).await?);
            b.push(http_load::creates(sealed, c, seconds).await?);
        }
        let (a, b) = (median(a), median(b));
        println!(
            "{c:<10} {:>12.0} {:>12.0} {:>6.2}x",
            a.rate,
            b.rate,
            b.rate / a.rate.max(1.0)
        );
    }
    Ok(())
}
