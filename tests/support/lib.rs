//! Test support: a real service on a random port against a fresh database
//! on the local PostgreSQL, tokens, and small fake peer services.

pub mod fake_services;
pub mod receiver;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bss::auth::{Claims, jwt};
use bss::config::Settings;
use bss::startup::Application;
use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

pub const SECRET: &str = "test-secret-0123456789";
const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

static CLEANUP: OnceCell<()> = OnceCell::const_new();

/// Drops test databases and plugin caches left behind by earlier runs
/// (older than an hour).
async fn drop_stale_databases() {
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(3600));
            if stale
                && entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("bss-test-plugin-cache-")
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let Ok(mut conn) = sqlx::PgConnection::connect(&format!("{SERVER}/postgres")).await else {
        return;
    };
    let stale: Vec<(String,)> = sqlx::query_as(
        "SELECT datname FROM pg_database
          WHERE datname LIKE 'bss\\_test\\_%'
            AND (pg_stat_file('base/' || oid || '/PG_VERSION')).modification < now() - interval '1 hour'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default();
    for (name,) in stale {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}

use sqlx::Connection;

/// A running service and a client for it.
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub database_url: String,
    pub settings: Settings,
    /// The database and plugin cache generated for this service, dropped
    /// with it (one put on another's database never created its own).
    pub _scratch: Option<Scratch>,
}

/// What one test service creates outside itself: its database and its
/// plugin cache directory. Dropped (the database with its connections) when
/// the guard goes, at the end of the test that made it.
#[derive(Debug)]
pub struct Scratch {
    database: String,
    plugin_cache: std::path::PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.plugin_cache);
        let name = self.database.clone();
        // Drop runs inside the test's runtime: a thread of its own may block.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut conn) =
                    sqlx::PgConnection::connect(&format!("{SERVER}/postgres")).await
                {
                    let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(&drop).execute(&mut conn).await;
                }
            });
        })
        .join();
    }
}

/// A directory of the test's own under the temporary directory, removed
/// with the guard.
#[derive(Debug)]
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        Self(std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple())))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Settings for a test service: a fresh database, a random port; the
/// guard drops the database and the plugin cache when it goes.
pub fn test_settings() -> (Settings, Scratch) {
    // `BSS_TEST_RUN` (set by `scripts/test`) tells this run's databases
    // from another run's on the same server.
    let run = std::env::var("BSS_TEST_RUN")
        .ok()
        .filter(|r| !r.is_empty() && r.len() <= 10 && r.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(|r| format!("{r}_"))
        .unwrap_or_default();
    let database = format!("bss_test_{run}{}", uuid::Uuid::new_v4().simple());
    let plugin_cache = std::env::temp_dir().join(format!(
        "bss-test-plugin-cache-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut s = Settings::default();
    s.http_addr = "127.0.0.1:0".parse().unwrap_or(s.http_addr);
    s.database_url = Some(format!("{SERVER}/{database}"));
    s.db_max_connections = 8;
    s.jwt_secret = Some(SECRET.into());
    s.service_timeout_ms = 500;
    s.service_attempts = 2;
    s.plugin_cache_dir = Some(plugin_cache.clone());
    (
        s,
        Scratch {
            database,
            plugin_cache,
        },
    )
}

/// A plugin component built by `scripts/test` (`no_negative_totals`, …).
pub fn plugin_bytes(name: &str) -> Vec<u8> {
    let dir = std::env::var("BSS_TEST_PLUGINS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../plugins/target/wasm32-wasip2/release"
        )
        .to_owned()
    });
    let path = std::path::Path::new(&dir).join(format!("{name}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test builds the plugins)", path.display()))
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        CLEANUP.get_or_init(drop_stale_databases).await;
        let (mut settings, scratch) = test_settings();
        tweak(&mut settings);
        let app = Application::build(settings.clone())
            .await
            .unwrap_or_else(|e| panic!("the service failed to start: {e:#}"));
        let base = format!("http://127.0.0.1:{}", app.port());
        tokio::spawn(app.run_until(std::future::pending()));
        Self {
            base,
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
            database_url: settings.database_url.clone().unwrap_or_default(),
            settings,
            _scratch: Some(scratch),
        }
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        send(self.request(Method::GET, "/metrics", None))
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("reading /metrics: {e}"))
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        send(self.request(Method::GET, path, Some(token))).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Response {
        send(self.request(Method::DELETE, path, Some(token))).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Response {
        send(self.request(Method::POST, path, Some(token)).json(body)).await
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Response {
        send(self.request(Method::PUT, path, Some(token)).json(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: &Value) -> Response {
        send(
            self.request(Method::PATCH, path, Some(token))
                .header("content-type", "application/merge-patch+json")
                .body(body.to_string()),
        )
        .await
    }

    /// `PUT /v1/schemas/{resource}` with `{"schema": schema}`.
    pub async fn put_schema(&self, resource: &str, token: &str, schema: Value) -> Response {
        self.put(
            &format!("/v1/schemas/{resource}"),
            token,
            &json!({ "schema": schema }),
        )
        .await
    }

    /// Creates a tenant with a unique id; returns the id and an admin token.
    pub async fn tenant(&self) -> (String, String) {
        let id = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let resp = self
            .post(
                "/v1/tenants",
                &platform_token(),
                &json!({"id": id, "name": "Test"}),
            )
            .await;
        assert_eq!(resp.status(), 201, "creating tenant {id}");
        let token = token(&id, &["admin"]);
        (id, token)
    }

    /// A tenant with an `invoices` resource.
    pub async fn tenant_with_invoices(&self) -> (String, String) {
        let (id, token) = self.tenant().await;
        let resp = self.put_schema("invoices", &token, invoice_schema()).await;
        assert_eq!(resp.status(), 201);
        (id, token)
    }

    /// `POST /v1/plugins` with a manifest and a module.
    pub async fn upload_plugin(&self, token: &str, manifest: Value, module: Vec<u8>) -> Response {
        self.upload_plugin_to("/v1/plugins", token, manifest, module)
            .await
    }

    /// An upload to `path` (`/v1/plugins?trial=shadow`, …).
    pub async fn upload_plugin_to(
        &self,
        path: &str,
        token: &str,
        manifest: Value,
        module: Vec<u8>,
    ) -> Response {
        let form = reqwest::multipart::Form::new()
            .part(
                "manifest",
                reqwest::multipart::Part::text(manifest.to_string())
                    .mime_str("application/json")
                    .unwrap_or_else(|e| panic!("{e}")),
            )
            .part(
                "module",
                reqwest::multipart::Part::bytes(module)
                    .mime_str("application/wasm")
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        send(
            self.request(Method::POST, path, Some(token))
                .multipart(form),
        )
        .await
    }

    /// Uploads a plugin and expects it to be accepted; returns the answer.
    pub async fn install_plugin(&self, token: &str, manifest: Value, file: &str) -> Value {
        let resp = self
            .upload_plugin(token, manifest, plugin_bytes(file))
            .await;
        let status = resp.status();
        let answer = body(resp).await;
        assert_eq!(status, 201, "{answer:#}");
        answer
    }

    pub async fn db(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.database_url)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

pub async fn send(req: RequestBuilder) -> Response {
    req.send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"))
}

/// The body as JSON (panics with the text if it is not).
pub async fn body(resp: Response) -> Value {
    let text = resp.text().await.unwrap_or_default();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

pub fn invoice_schema() -> Value {
    json!({
        "type": "object",
        "required": ["number", "total"],
        "properties": {
            "number": {"type": "string"},
            "total": {"type": "number", "minimum": 0, "x-index": true},
            "status": {"type": "string", "enum": ["open", "paid", "void"]},
            "due": {"type": ["string", "null"]},
            "paid": {"type": "boolean"},
            "customer": {"type": "object", "properties": {"name": {"type": "string"}}},
            "iban": {"type": "string", "x-encrypted": true}
        }
    })
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

pub fn claims(tenant: Option<&str>, roles: &[&str]) -> Claims {
    Claims {
        sub: "tester".into(),
        tenant_id: tenant.map(str::to_owned),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        exp: now() + 600,
        iss: None,
        aud: None,
    }
}

pub fn token(tenant: &str, roles: &[&str]) -> String {
    mint(&claims(Some(tenant), roles))
}

pub fn platform_token() -> String {
    mint(&claims(None, &["platform-admin"]))
}

pub fn mint(claims: &Claims) -> String {
    jwt::mint(SECRET, claims).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `program` with `args`, `input` on its stdin; whether it succeeded,
/// and what it wrote to stdout and to stderr.
pub fn run_with_stdin(program: &str, args: &[&str], input: &[u8]) -> (bool, String, String) {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program}: {e} (scripts/test installs it)"));
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
        stdin
            .write_all(input)
            .unwrap_or_else(|e| panic!("writing to {program}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs one of `tests/support`'s Python scripts in the tools' virtual
/// environment (`BSS_TEST_PYTHON`, which `scripts/test` prepares) on `input`
/// (JSON on its stdin); what it printed, as JSON.
pub fn python_tool(script: &str, input: &Value) -> Value {
    let python = std::env::var("BSS_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("BSS_TEST_PYTHON is not set: run the tests with scripts/test (it installs the Python tools)")
    });
    let script = format!("{}/support/{script}", env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = run_with_stdin(&python, &[&script], input.to_string().as_bytes());
    assert!(ok, "{script} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{script}'s answer ({e}): {out}"))
}

/// A port nothing listens on now, for a process the test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("finding a free port: {e}"))
}

/// The `bss` binary: `BSS_TEST_BIN` (set by `scripts/test`, which builds
/// it), else next to the test executable's directory.
pub fn bss_binary() -> std::path::PathBuf {
    let bin = match std::env::var_os("BSS_TEST_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent()?.parent().map(|d| d.join("bss")))
            .unwrap_or_default(),
    };
    assert!(
        bin.exists(),
        "{} not found: run the tests with scripts/test (it builds the binary)",
        bin.display()
    );
    bin
}

/// A minimal Server-Sent Events reader over a streaming response.
pub struct SseReader {
    resp: Response,
    buf: String,
}

/// One received SSE event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: Value,
}

impl SseReader {
    pub async fn open(app: &TestApp, token: &str, last_event_id: Option<&str>) -> Self {
        let mut req = app
            .request(Method::GET, "/v1/events/stream", Some(token))
            .timeout(Duration::from_secs(600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = send(req).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event, or None if none arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::Null);
                return Some(SseEvent { id, event, data });
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?;
            match chunk {
                Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    pub async fn next(&mut self) -> SseEvent {
        self.next_within(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("no event within 10 s"))
    }
}

/// The tenant's whole event log (replay API).
pub async fn event_log(app: &TestApp, token: &str) -> Vec<Value> {
    let resp = app.get("/v1/events?limit=1000", token).await;
    assert_eq!(resp.status(), 200);
    body(resp).await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the tenant's log holds at least `n` events.
pub async fn wait_for_events(app: &TestApp, token: &str, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let log = event_log(app, token).await;
        if log.len() >= n {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = event_log(app, token).await;
    panic!("expected {n} events, the log has {}: {log:#?}", log.len());
}

/// Waits (up to 15 s) for a service started by a test to answer
/// `/health/ready`.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/health/ready")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the service did not come up");
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &std::process::Child) {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(sent, "kill -TERM {} failed", child.id());
}
