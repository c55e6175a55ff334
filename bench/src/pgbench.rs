//! The peer: pgbench running the same statements as the service, against
//! a table of the same shape, in the same database and PostgreSQL server.
//! Latency percentiles come from pgbench's per-transaction log.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use sqlx::Connection;

use crate::Figures;

#[derive(Debug, Clone, Copy)]
pub enum Script {
    /// The service's own statement: the INSERT guarded by the schema-version
    /// row lock (`FOR KEY SHARE` on `_resources`).
    ServiceInsert,
    Insert,
    InsertWithOutbox,
    SelectById,
}

const TEMPLATE: &str = r#"{"specversion": "1.0", "source": "/business-store/bench", "time": "2026-01-01T00:00:00Z", "datacontenttype": "application/json", "tenantid": "bench", "correlationid": "bench"}"#;
const DOC: &str = r#"{"number": "INV-1", "total": 12.5, "status": "open", "customer": {"name": "Acme Corporation", "email": "billing@acme.example"}}"#;

impl Script {
    fn text(self) -> String {
        match self {
            Self::ServiceInsert => format!(
                "WITH cur AS (SELECT current_version FROM pgbench_bss._resources WHERE resource = 'invoices' FOR KEY SHARE), \
                 ins AS (INSERT INTO pgbench_bss.invoices (id, data) SELECT gen_random_uuid()::text, '{DOC}' FROM cur \
                   WHERE cur.current_version = 1 RETURNING id, version, created_at, updated_at, data, 'created'::text AS kind), \
                 ob AS (INSERT INTO pgbench_bss.outbox (event_id, tenant_id, resource, type, kafka_key, envelope) \
                   SELECT gen_random_uuid(), 'bench', 'invoices', 'business_store.data.' || ins.kind, 'bench/invoices/' || ins.id, \
                     '{TEMPLATE}'::jsonb || jsonb_build_object('type', 'business_store.data.' || ins.kind, 'subject', 'invoices/' || ins.id, \
                       'data', jsonb_build_object('tenantId', 'bench', 'resource', 'invoices', 'recordId', ins.id, 'version', ins.version)) \
                   FROM ins) \
                 SELECT id, version, created_at, updated_at, data FROM ins;\n"
            ),
            Self::Insert => format!(
                "INSERT INTO pgbench_bss.invoices (id, data) VALUES (gen_random_uuid()::text, '{DOC}');\n"
            ),
            Self::InsertWithOutbox => format!(
                "BEGIN;\n\
                 INSERT INTO pgbench_bss.invoices (id, data) VALUES (gen_random_uuid()::text, '{DOC}');\n\
                 INSERT INTO pgbench_bss.outbox (event_id, tenant_id, resource, type, kafka_key, envelope) \
                   VALUES (gen_random_uuid(), 'bench', 'invoices', 'business_store.data.created', 'bench/invoices/x', '{TEMPLATE}');\n\
                 END;\n"
            ),
            Self::SelectById => "\\set n random(1, 10000)\n\
                 SELECT id, version, created_at, updated_at, data FROM pgbench_bss.invoices WHERE id = 'r' || :n;\n"
                .to_owned(),
        }
    }
}

/// The pgbench tables: the same shape as a resource table (and an outbox).
pub async fn prepare(server: &str, database: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&format!("{server}/{database}")).await?;
    for sql in [
        "DROP SCHEMA IF EXISTS pgbench_bss CASCADE",
        "CREATE SCHEMA pgbench_bss",
        "CREATE TABLE pgbench_bss.invoices (id text PRIMARY KEY, data jsonb NOT NULL,
            version bigint NOT NULL DEFAULT 1, created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now())",
        "CREATE INDEX ON pgbench_bss.invoices (created_at, id)",
        "CREATE TABLE pgbench_bss._resources (resource text PRIMARY KEY, current_version integer NOT NULL)",
        "INSERT INTO pgbench_bss._resources VALUES ('invoices', 1)",
        // The service's outbox: same shape and indexes.
        "CREATE TABLE pgbench_bss.outbox (LIKE bss.outbox INCLUDING ALL)",
    ] {
        sqlx::query(sql).execute(&mut conn).await?;
    }
    sqlx::query(&format!(
        "INSERT INTO pgbench_bss.invoices (id, data) SELECT 'r' || n, '{DOC}' FROM generate_series(1, 10000) n"
    ))
    .execute(&mut conn)
    .await?;
    Ok(())
}

pub fn run(
    server: &str,
    database: &str,
    script: Script,
    clients: usize,
    d: Duration,
) -> anyhow::Result<Figures> {
    let dir = std::env::temp_dir().join(format!("bss-pgbench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("script.sql");
    std::fs::write(&file, script.text())?;
    let url = format!("{server}/{database}");
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-l", "--log-prefix"])
        .arg(dir.join("log"))
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &d.as_secs().to_string(),
            "-f",
        ])
        .arg(&file)
        .arg(&url)
        .output()
        .context("running pgbench (install PostgreSQL's client tools)")?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok())
        .context("no tps in pgbench's output")?;
    let mut hist = Histogram::<u64>::new(3)?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("log"))
        {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            // client_id transaction_no time_us script_no epoch epoch_us
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
            {
                hist.record(us)?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Figures {
        rate: tps,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        ..Default::default()
    })
}
