//! The HTTP side: a tenant with an `invoices` schema, then closed-loop
//! clients (each sends its next request when the previous one answered).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bss::auth::{Claims, jwt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::Figures;

pub struct Target {
    base: String,
    token: String,
    client: reqwest::Client,
    /// Ids of records to read.
    ids: Arc<Vec<String>>,
}

pub fn invoice(n: u64) -> Value {
    json!({"number": format!("INV-{n}"), "total": (n % 1000) as f64 + 0.5, "status": "open",
           "customer": {"name": "Acme Corporation", "email": "billing@acme.example"}})
}

pub async fn prepare(base: &str, secret: &str) -> anyhow::Result<Target> {
    prepare_with(base, secret, false).await
}

/// Like [`prepare`]; with `encrypted`, the customer's name and email (two
/// fields, nested) are `x-encrypted`.
pub async fn prepare_with(base: &str, secret: &str, encrypted: bool) -> anyhow::Result<Target> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    let mint = |tenant: Option<&str>, role: &str| {
        jwt::mint(
            secret,
            &Claims {
                sub: "bench".into(),
                tenant_id: tenant.map(str::to_owned),
                roles: vec![role.into()],
                exp,
                iss: None,
                aud: None,
            },
        )
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let tenant = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let resp = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(mint(None, "platform-admin")?)
        .json(&json!({"id": tenant}))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status() == 201,
        "creating the bench tenant: {}",
        resp.status()
    );
    let token = mint(Some(&tenant), "admin")?;
    let mut schema = json!({"schema": {
        "type": "object",
        "required": ["number", "total"],
        "properties": {
            "number": {"type": "string", "maxLength": 40},
            "total": {"type": "number", "minimum": 0},
            "status": {"type": "string", "enum": ["open", "paid", "void"]},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string"}, "email": {"type": "string", "format": "email"}}}
        }
    }});
    if encrypted {
        for field in ["name", "email"] {
            schema["schema"]["properties"]["customer"]["properties"][field]["x-encrypted"] =
                json!(true);
        }
    }
    let resp = client
        .put(format!("{base}/v1/schemas/invoices"))
        .bearer_auth(&token)
        .json(&schema)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status() == 201,
        "creating the schema: {}",
        resp.status()
    );
    // Records to read: 10,000, in batches.
    let mut ids = Vec::new();
    for chunk in 0..10u64 {
        let items: Vec<Value> = (0..1000).map(|i| invoice(chunk * 1000 + i)).collect();
        let resp: Value = client
            .post(format!("{base}/v1/data/invoices/batch"))
            .bearer_auth(&token)
            .json(&json!({"items": items}))
            .send()
            .await?
            .json()
            .await?;
        let created = resp["items"].as_array().context("batch answer")?;
        ids.extend(
            created
                .iter()
                .filter_map(|r| r["id"].as_str().map(str::to_owned)),
        );
    }
    Ok(Target {
        base: base.to_owned(),
        token,
        client,
        ids: Arc::new(ids),
    })
}

impl Target {
    /// Uploads a plugin for this target's tenant.
    pub async fn install_plugin(&self, manifest: &Value, module: Vec<u8>) -> anyhow::Result<()> {
        let form = reqwest::multipart::Form::new()
            .text("manifest", manifest.to_string())
            .part("module", reqwest::multipart::Part::bytes(module));
        let resp = self
            .client
            .post(format!("{}/v1/plugins", self.base))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 201,
            "uploading the plugin: {}",
            resp.text().await?
        );
        Ok(())
    }

    /// Creates `n` records in one batch request.
    pub async fn batch(&self, n: u64) -> anyhow::Result<()> {
        let items: Vec<Value> = (0..n).map(invoice).collect();
        let resp = self
            .client
            .post(format!("{}/v1/data/invoices/batch", self.base))
            .bearer_auth(&self.token)
            .json(&json!({"items": items}))
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 201,
            "batch write answered {}",
            resp.status()
        );
        Ok(())
    }
}

pub async fn creates(t: &Target, clients: usize, d: Duration) -> anyhow::Result<Figures> {
    let url = format!("{}/v1/data/invoices", t.base);
    closed_loop(
        clients,
        d,
        move |n| {
            t.client
                .post(&url)
                .bearer_auth(&t.token)
                .json(&invoice(n))
                .send()
        },
        201,
    )
    .await
}

pub async fn live(t: &Target, clients: usize, d: Duration) -> anyhow::Result<Figures> {
    closed_loop(
        clients,
        d,
        move |_| t.client.get(format!("{}/health/live", t.base)).send(),
        200,
    )
    .await
}

pub async fn reads(t: &Target, clients: usize, d: Duration) -> anyhow::Result<Figures> {
    let ids = t.ids.clone();
    closed_loop(
        clients,
        d,
        move |n| {
            let id = &ids[(n.wrapping_mul(2_654_435_761) % ids.len() as u64) as usize];
            t.client
                .get(format!("{}/v1/data/invoices/{id}", t.base))
                .bearer_auth(&t.token)
                .send()
        },
        200,
    )
    .await
}

async fn closed_loop<F, Fut>(
    clients: usize,
    d: Duration,
    request: F,
    expect: u16,
) -> anyhow::Result<Figures>
where
    F: Fn(u64) -> Fut + Sync,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let start = Instant::now();
    let request = &request;
    let workers = (0..clients).map(|w| async move {
        let mut hist = Histogram::<u64>::new(3)?;
        let mut n = (w as u64) << 40 | (start.elapsed().as_nanos() as u64 & 0xffff_ffff);
        let mut errors = 0u64;
        while start.elapsed() < d {
            n += 1;
            let t0 = Instant::now();
            let resp = request(n).await;
            let ok = match resp {
                Ok(r) => {
                    let ok = r.status().as_u16() == expect;
                    let _ = r.bytes().await;
                    ok
                }
                Err(_) => false,
            };
            if ok {
                hist.record(t0.elapsed().as_micros() as u64)?;
            } else {
                errors += 1;
            }
        }
        anyhow::Ok((hist, errors))
    });
    let results = futures::future::join_all(workers).await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for r in results {
        let (h, e) = r?;
        all.add(&h)?;
        errors += e;
    }
    if errors > 0 {
        eprintln!("warning: {errors} requests failed or answered unexpectedly");
    }
    Ok(Figures {
        rate: all.len() as f64 / elapsed,
        p50_ms: all.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
    })
}
