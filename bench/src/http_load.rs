//! The HTTP side: a tenant with an `invoices` schema, then closed-loop
//! clients (each sends its next request when the previous one answered).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bss::auth::{Claims, jwt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::Figures;

#[derive(Clone)]
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

/// The `invoices` schema (a schema PUT's body); with `encrypted`, the
/// customer's name and email are `x-encrypted`.
pub fn invoice_schema(encrypted: bool) -> Value {
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
    schema
}

/// A bearer token for the bench, valid for a day.
pub fn mint(secret: &str, tenant: Option<&str>, role: &str) -> anyhow::Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
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
}

pub async fn prepare(base: &str, secret: &str) -> anyhow::Result<Target> {
    prepare_with(base, secret, false).await
}

/// Like [`prepare`]; with `encrypted`, the customer's name and email (two
/// fields, nested) are `x-encrypted`.
pub async fn prepare_with(base: &str, secret: &str, encrypted: bool) -> anyhow::Result<Target> {
    let mint = |tenant: Option<&str>, role: &str| mint(secret, tenant, role);
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
    // Records to read: 10,000.
    let ids = seed(&client, base, &token, encrypted, 0..10_000).await?;
    Ok(Target {
        base: base.to_owned(),
        token,
        client,
        ids: Arc::new(ids),
    })
}

/// Gives the token's tenant the `invoices` schema and the invoices numbered
/// `numbers` (created in batches of 1,000); the ids of the records created.
pub async fn seed(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    encrypted: bool,
    numbers: std::ops::Range<u64>,
) -> anyhow::Result<Vec<String>> {
    let resp = client
        .put(format!("{base}/v1/schemas/invoices"))
        .bearer_auth(token)
        .json(&invoice_schema(encrypted))
        .send()
        .await?;
    anyhow::ensure!(
        resp.status() == 201,
        "creating the schema: {}",
        resp.status()
    );
    let mut ids = Vec::new();
    let numbers: Vec<u64> = numbers.collect();
    for chunk in numbers.chunks(1000) {
        let items: Vec<Value> = chunk.iter().map(|&n| invoice(n)).collect();
        let resp: Value = client
            .post(format!("{base}/v1/data/invoices/batch"))
            .bearer_auth(token)
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
    Ok(ids)
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

    /// Registers a webhook endpoint for this target's tenant.
    pub async fn register_webhook(&self, spec: &Value) -> anyhow::Result<()> {
        let resp = self
            .client
            .post(format!("{}/v1/webhooks", self.base))
            .bearer_auth(&self.token)
            .json(spec)
            .send()
            .await?;
        anyhow::ensure!(
            resp.status() == 201,
            "registering a webhook: {}",
            resp.text().await?
        );
        Ok(())
    }

    /// Creates one record.
    pub async fn create(&self, doc: &Value) -> anyhow::Result<()> {
        let resp = self
            .client
            .post(format!("{}/v1/data/invoices", self.base))
            .bearer_auth(&self.token)
            .json(doc)
            .send()
            .await?;
        anyhow::ensure!(resp.status() == 201, "create answered {}", resp.status());
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
    let load = Load::new(&t.base, &t.token)?;
    closed_loop(
        &load,
        clients,
        d,
        |n| Req::post("/v1/data/invoices", &invoice(n)),
        201,
    )
    .await
}

pub async fn live(t: &Target, clients: usize, d: Duration) -> anyhow::Result<Figures> {
    let load = Load::new(&t.base, &t.token)?;
    closed_loop(&load, clients, d, |_| Req::get("/health/live".into()), 200).await
}

pub async fn reads(t: &Target, clients: usize, d: Duration) -> anyhow::Result<Figures> {
    let load = Load::new(&t.base, &t.token)?;
    reads_by_id(&load, "/v1/data/invoices", &t.ids, clients, d).await
}

/// `GET <prefix>/<id>` of ids spread over `ids`, expecting 200.
pub(crate) async fn reads_by_id(
    load: &Load,
    prefix: &str,
    ids: &[String],
    clients: usize,
    d: Duration,
) -> anyhow::Result<Figures> {
    let pick = |n: u64| &ids[(n.wrapping_mul(2_654_435_761) % ids.len() as u64) as usize];
    let request = |n| Req::get(format!("{prefix}/{}", pick(n)));
    closed_loop(load, clients, d, request, 200).await
}

/// Where the load goes: a server's address, and the bearer token every
/// request carries.
pub(crate) struct Load {
    addr: String,
    token: String,
}

impl Load {
    /// `base` is `http://host:port`.
    pub(crate) fn new(base: &str, token: &str) -> anyhow::Result<Self> {
        let addr = base
            .strip_prefix("http://")
            .context("the load speaks plain http only")?
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            addr,
            token: token.to_owned(),
        })
    }
}

/// One request of the load.
pub(crate) struct Req {
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
    /// Another bearer token than the load's.
    token: Option<Arc<str>>,
}

impl Req {
    pub(crate) fn get(path: String) -> Self {
        Self {
            method: "GET",
            path,
            body: None,
            token: None,
        }
    }

    pub(crate) fn post(path: &str, body: &Value) -> Self {
        Self {
            method: "POST",
            path: path.to_owned(),
            body: Some(body.to_string().into_bytes()),
            token: None,
        }
    }

    /// The same request with another bearer token.
    pub(crate) fn with_token(self, token: Arc<str>) -> Self {
        Self {
            token: Some(token),
            ..self
        }
    }

    fn encode(&self, load: &Load, out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.clear();
        let _ = write!(
            out,
            "{} {} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n",
            self.method,
            self.path,
            load.addr,
            self.token.as_deref().unwrap_or(&load.token)
        );
        if let Some(body) = &self.body {
            let _ = write!(
                out,
                "content-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            out.extend_from_slice(body);
        } else {
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// One client's keep-alive connection: a minimal HTTP/1.1 exchange (a
/// request written whole, the answer read by `content-length`, or to the
/// last chunk), so the load costs the machine little next to the servers
/// it measures — the same for every server measured.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(load: &Load) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(&load.addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends one request, reads its whole answer; the status.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(request).await?;
        self.buf.clear();
        let mut head_end = None;
        loop {
            if head_end.is_none() {
                head_end = self.buf.windows(4).position(|w| w == b"\r\n\r\n");
            }
            if let Some(end) = head_end
                && let Some(status) = complete(&self.buf, end)?
            {
                return Ok(status);
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The status, once the answer whose head ends at `end` is all in `buf`.
fn complete(buf: &[u8], end: usize) -> std::io::Result<Option<u16>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad answer");
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad())?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let mut length = None;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| bad())?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let body = &buf[end + 4..];
    let done = match (length, chunked) {
        (Some(n), _) => body.len() >= n,
        (None, true) => body.ends_with(b"0\r\n\r\n"),
        (None, false) => true,
    };
    Ok(done.then_some(status))
}

/// Closed-loop clients: each sends its next request when the previous one
/// answered, on its own keep-alive connection (opened again after an error).
pub(crate) async fn closed_loop<F>(
    load: &Load,
    clients: usize,
    d: Duration,
    request: F,
    expect: u16,
) -> anyhow::Result<Figures>
where
    F: Fn(u64) -> Req + Sync,
{
    let start = Instant::now();
    let request = &request;
    let workers = (0..clients).map(|w| async move {
        let mut hist = Histogram::<u64>::new(3)?;
        let mut n = (w as u64) << 40 | (start.elapsed().as_nanos() as u64 & 0xffff_ffff);
        let mut errors = 0u64;
        let mut conn: Option<Conn> = None;
        let mut bytes = Vec::with_capacity(1024);
        while start.elapsed() < d {
            n += 1;
            request(n).encode(load, &mut bytes);
            let t0 = Instant::now();
            let answered = match conn.as_mut() {
                Some(c) => c.exchange(&bytes).await,
                None => match Conn::open(load).await {
                    Ok(c) => conn.insert(c).exchange(&bytes).await,
                    Err(e) => Err(e),
                },
            };
            match answered {
                Ok(status) if status == expect => hist.record(t0.elapsed().as_micros() as u64)?,
                Ok(_) => errors += 1,
                Err(_) => {
                    errors += 1;
                    conn = None;
                }
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
        ..Default::default()
    })
}
