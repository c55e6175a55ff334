//! `bss dev-services`: local stand-ins of the platform's three peer services
//! (Validation, Auth, Task Execution) on one loopback HTTP server, so the
//! service's whole configured path can be tried on one machine: tokens
//! verified with a JWKS, data-encryption keys fetched from the Auth Service,
//! schema checks by the Validation Service, and what plugins `forward`.
//! Point `VALIDATION_SERVICE_URL`, `AUTH_SERVICE_URL` and `TASK_SERVICE_URL`
//! at it (it prints the lines on start).
//!
//! It is a development tool, not a fake for tests to steer: every schema and
//! record is valid, every tenant exists, and it does not check the service
//! credential calls carry. Anyone who reaches it can mint tokens and read
//! every tenant's keys, so it listens on loopback addresses only.
//!
//! What each endpoint answers (the contracts the service relies on):
//! - `POST /api/validation/validateSchema` (the service, before applying a
//!   schema; body `{"resource", "schema"}`) → `{"valid": true}`.
//! - `POST /api/validation/validateRecord` (plugins' `forward`) →
//!   `{"valid": true, "errors": []}`.
//! - `GET /.well-known/jwks.json` (the service's default `BSS_JWKS_PATH`) →
//!   `{"keys": [<the Ed25519 public key, "alg": "EdDSA", "kid">]}`.
//! - `POST /dev/token` `{"tenant"?, "roles"? (default ["admin"]), "sub"?
//!   (default "dev"), "ttlSecs"? (default 3600)}`, or an empty body →
//!   `{"token"}`: an EdDSA JWT with the claims of [`Claims`] (`iss`/`aud` from
//!   `BSS_JWT_ISSUER`/`BSS_JWT_AUDIENCE` when set) and `iat`. No tenant and
//!   `["platform-admin"]` gives a token that creates tenants.
//! - `GET /api/auth/tenants/{id}` (the `auth.tenant.created` consumer, for a
//!   tenant announced without a name) → `{"id", "name": "Tenant <id>"}`.
//! - `GET /api/auth/tenants/{id}/keys/data-encryption-key[?keyId=K]` (the
//!   keyring) → `{"keyId": "dev-<n>", "key": "<base64 of 32 bytes>"}`: the
//!   tenant's current key, or key K (404 when K was never issued). No
//!   `expiresAt`: the service caches keys for `BSS_KEY_CACHE_SECS`.
//! - `POST /dev/tenants/{id}/keys/rotate` → `{"keyId": "dev-<n+1>"}`, the
//!   tenant's current key from now on; older keys still answer by id.
//! - `POST /api/task/schedule` (plugins' `forward`; any JSON body) →
//!   `{"taskId", "status": "scheduled"}`. Requests carrying the same
//!   `Idempotency-Key` get the same `taskId` and schedule nothing new.
//! - `GET /dev/tasks` → `{"items": [{"taskId", "idempotencyKey", "body",
//!   "receivedAt", "times"}]}`, oldest first; `times` counts the requests
//!   that carried the task's key.
//!
//! Keys are HKDF-SHA256 of a master secret, bound to tenant and key id, so
//! they are the same after a restart. What must outlive a restart (the
//! signing key, the master secret, each tenant's current key number) is
//! kept in `<data dir>/dev-services.json`, private (0600) and replaced
//! atomically on every change: losing it makes every value sealed under its
//! keys unreadable, and every token it signed invalid. Scheduled tasks are
//! only in memory (the newest [`MAX_TASKS`], at most [`MAX_TASK_BYTES`] of
//! bodies); a key whose task was dropped schedules anew. Request bodies are
//! bounded ([`MAX_BODY_BYTES`]) and each request is logged in one line.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hkdf::Hkdf;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::auth::Claims;
use crate::config::Settings;
use crate::domain::TenantId;
use crate::secret_file;

/// Where it listens unless `--addr` says otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7070";
/// The state file, in the data directory.
pub const STATE_FILE: &str = "dev-services.json";
/// Largest request body read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Scheduled tasks kept (the newest).
pub const MAX_TASKS: usize = 10_000;
/// Bytes of task bodies kept (the newest).
pub const MAX_TASK_BYTES: usize = 64 * 1024 * 1024;
/// Tenants whose rotated key number is remembered.
const MAX_ROTATED_TENANTS: usize = 100_000;
/// Longest lifetime of a minted token: 30 days.
const MAX_TTL_SECS: u64 = 30 * 24 * 3600;
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
const JWKS_PATH: &str = "/.well-known/jwks.json";
/// What to change when the state file is unusable.
const ENV_HINT: &str = "BSS_DATA_DIR";

const USAGE: &str = "usage:
  bss dev-services [--addr 127.0.0.1:7070]
  bss dev-services token [--tenant ID] [--roles admin,platform-admin] [--sub NAME] [--ttl SECONDS] [--addr 127.0.0.1:7070]";

/// `bss dev-services …`: serves, or with `token` asks a running one for a
/// token and prints it.
pub async fn command(settings: &Settings, args: &[String]) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("token") {
        println!("{}", request_token(&args[1..]).await?);
        return Ok(());
    }
    let addr = match args {
        [] => DEFAULT_ADDR.to_owned(),
        [flag, addr] if flag == "--addr" => addr.clone(),
        _ => bail!("unexpected arguments {args:?}\n{USAGE}"),
    };
    let addr = parse_loopback(&addr)?;
    crate::telemetry::init_logs(&settings.log_format);
    let server = DevServices::bind(settings, addr).await?;
    server.print_environment()?;
    server.run_until(crate::startup::shutdown_signal()).await
}

/// `addr` as a socket address, refused unless it is loopback.
pub fn parse_loopback(addr: &str) -> anyhow::Result<SocketAddr> {
    let parsed: SocketAddr = addr
        .parse()
        .with_context(|| format!("--addr {addr:?} is not IP:port (e.g. {DEFAULT_ADDR})"))?;
    if !parsed.ip().is_loopback() {
        bail!(
            "refusing to listen on {parsed}: dev-services are unauthenticated stand-ins \
             (anyone reaching them can mint tokens and read every tenant's keys); listen on \
             a loopback address such as {DEFAULT_ADDR} or [::1]:7070"
        );
    }
    Ok(parsed)
}

/// The bound server, ready to run.
pub struct DevServices {
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl DevServices {
    /// Loads (or creates) the state in the data directory and binds `addr`,
    /// which must be loopback.
    pub async fn bind(settings: &Settings, addr: SocketAddr) -> anyhow::Result<Self> {
        parse_loopback(&addr.to_string())?;
        if settings.jwks_path != JWKS_PATH {
            tracing::warn!(
                jwks_path = settings.jwks_path,
                "BSS_JWKS_PATH is not {JWKS_PATH}, where dev-services serve the JWKS"
            );
        }
        let path = settings.data_dir.join(STATE_FILE);
        let (stored, keys) = load(&path)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let shared = Arc::new(Shared {
            path,
            keys,
            stored: tokio::sync::Mutex::new(stored),
            tasks: std::sync::Mutex::default(),
            issuer: settings.jwt_issuer.clone(),
            audience: settings.jwt_audience.clone(),
        });
        Ok(Self { listener, shared })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Prints the environment the service needs to use these stand-ins.
    pub fn print_environment(&self) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        let url = format!("http://{addr}");
        let flag = if addr.to_string() == DEFAULT_ADDR {
            String::new()
        } else {
            format!(" --addr {addr}")
        };
        println!(
            "VALIDATION_SERVICE_URL={url}\nAUTH_SERVICE_URL={url}\nTASK_SERVICE_URL={url}\n\
             # tokens: bss dev-services token{flag} --tenant acme --roles admin   (tenants are created with --roles platform-admin)\n\
             #     or: curl -s -X POST {url}/dev/token -H 'content-type: application/json' -d '{{\"tenant\": \"acme\", \"roles\": [\"admin\"]}}'"
        );
        Ok(())
    }

    /// Serves until `shutdown` completes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        let state = self.shared.path.display().to_string();
        tracing::info!(%addr, state, "dev-services listening");
        axum::serve(self.listener, router(self.shared))
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }
}

/// What the handlers share.
struct Shared {
    path: PathBuf,
    keys: Keys,
    /// Held while a change is written, so changes are saved in order.
    stored: tokio::sync::Mutex<Stored>,
    tasks: std::sync::Mutex<TaskLog>,
    issuer: Option<String>,
    audience: Option<String>,
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/validation/validateSchema", post(validate_schema))
        .route("/api/validation/validateRecord", post(validate_record))
        .route(JWKS_PATH, get(jwks))
        .route("/dev/token", post(mint_token))
        .route("/api/auth/tenants/{id}", get(tenant))
        .route(
            "/api/auth/tenants/{id}/keys/data-encryption-key",
            get(data_key),
        )
        .route("/dev/tenants/{id}/keys/rotate", post(rotate_key))
        .route("/api/task/schedule", post(schedule_task))
        .route("/dev/tasks", get(list_tasks))
        .fallback(|| async { Refused::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(shared)
}

/// One line per request.
async fn log_request(req: Request, next: Next) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let tenant = req
        .headers()
        .get("x-tenant-id")
        .and_then(|t| t.to_str().ok())
        .map(str::to_owned);
    let started = Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        %method,
        %uri,
        status = resp.status().as_u16(),
        tenant,
        ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "dev-services request"
    );
    resp
}

/// A refusal: its status and a message for the developer.
#[derive(Debug)]
struct Refused(StatusCode, String);

impl Refused {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }

    fn bad_request(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message.to_string())
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "dev-services failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn parse_tenant(id: &str) -> Result<TenantId, Refused> {
    TenantId::parse(id).map_err(Refused::bad_request)
}

// ---- Validation ----

async fn validate_schema(Json(_check): Json<Value>) -> Json<Value> {
    Json(json!({"valid": true}))
}

async fn validate_record(Json(_check): Json<Value>) -> Json<Value> {
    Json(json!({"valid": true, "errors": []}))
}

// ---- Auth: tokens ----

async fn jwks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(shared.keys.jwks.clone())
}

/// `POST /dev/token`'s body; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenRequest {
    tenant: Option<String>,
    roles: Option<Vec<String>>,
    sub: Option<String>,
    ttl_secs: Option<u64>,
}

/// What is signed: the claims and when they were issued.
#[derive(Serialize)]
struct Minted<'a> {
    #[serde(flatten)]
    claims: &'a Claims,
    iat: u64,
}

async fn mint_token(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Value>, Refused> {
    let request: TokenRequest = if body.trim_ascii().is_empty() {
        TokenRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(Refused::bad_request)?
    };
    let token = shared.mint(request)?;
    Ok(Json(json!({"token": token})))
}

impl Shared {
    fn mint(&self, request: TokenRequest) -> Result<String, Refused> {
        let tenant = request.tenant.as_deref().map(parse_tenant).transpose()?;
        let roles = request.roles.unwrap_or_else(|| vec!["admin".into()]);
        let sub = request.sub.unwrap_or_else(|| "dev".into());
        let ttl = request.ttl_secs.unwrap_or(3600);
        if ttl == 0 || ttl > MAX_TTL_SECS {
            return Err(Refused::bad_request(format!(
                "ttlSecs must be 1 to {MAX_TTL_SECS}"
            )));
        }
        let fits = |s: &String| !s.is_empty() && s.len() <= 200 && !s.contains('\0');
        if !fits(&sub) || roles.len() > 20 || !roles.iter().all(fits) {
            return Err(Refused::bad_request(
                "sub and each role must be 1-200 characters without NUL; at most 20 roles",
            ));
        }
        let now = unix_now();
        let claims = Claims {
            sub,
            tenant_id: tenant.map(|t| t.as_str().to_owned()),
            roles,
            exp: now + ttl,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.keys.kid.clone());
        let minted = Minted {
            claims: &claims,
            iat: now,
        };
        jsonwebtoken::encode(&header, &minted, &self.keys.signing).map_err(Refused::internal)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

// ---- Auth: tenants and their keys ----

async fn tenant(UrlPath(id): UrlPath<String>) -> Result<Json<Value>, Refused> {
    let tenant = parse_tenant(&id)?;
    Ok(Json(
        json!({"id": tenant, "name": format!("Tenant {tenant}")}),
    ))
}

#[derive(Debug, Deserialize)]
struct KeyQuery {
    #[serde(rename = "keyId")]
    key_id: Option<String>,
}

async fn data_key(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<KeyQuery>,
) -> Result<Json<Value>, Refused> {
    let tenant = parse_tenant(&id)?;
    let current = shared.stored.lock().await.current_key(&tenant);
    let number = match query.key_id.as_deref() {
        None => current,
        Some(asked) => key_number(asked).filter(|n| *n <= current).ok_or_else(|| {
            Refused::new(
                StatusCode::NOT_FOUND,
                format!("tenant {tenant} has no key {asked:?}"),
            )
        })?,
    };
    let key = derive_key(&shared.keys.master, &tenant, number).map_err(Refused::internal)?;
    Ok(Json(
        json!({"keyId": key_id(number), "key": STANDARD.encode(key)}),
    ))
}

async fn rotate_key(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, Refused> {
    let tenant = parse_tenant(&id)?;
    let mut stored = shared.stored.lock().await;
    let rotated = stored.current_keys.len();
    if rotated >= MAX_ROTATED_TENANTS && !stored.current_keys.contains_key(tenant.as_str()) {
        return Err(Refused::new(
            StatusCode::CONFLICT,
            format!("dev-services remember rotations of at most {MAX_ROTATED_TENANTS} tenants"),
        ));
    }
    let next = stored
        .current_key(&tenant)
        .checked_add(1)
        .ok_or_else(|| Refused::new(StatusCode::CONFLICT, "no key number left"))?;
    let mut changed = stored.clone();
    changed
        .current_keys
        .insert(tenant.as_str().to_owned(), next);
    let path = shared.path.clone();
    let saving = changed.clone();
    tokio::task::spawn_blocking(move || save(&path, &saving))
        .await
        .map_err(Refused::internal)?
        .map_err(|e| Refused::internal(format!("{e:#}")))?;
    *stored = changed;
    Ok(Json(json!({"keyId": key_id(next)})))
}

fn key_id(number: u32) -> String {
    format!("dev-{number}")
}

/// The number of a key id `dev-<n>` (n ≥ 1, written without leading zeros).
fn key_number(id: &str) -> Option<u32> {
    let n: u32 = id.strip_prefix("dev-")?.parse().ok()?;
    (n >= 1 && key_id(n) == id).then_some(n)
}

/// Key `dev-<number>` of `tenant`: HKDF-SHA256 of the master secret.
fn derive_key(master: &[u8; 32], tenant: &TenantId, number: u32) -> anyhow::Result<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(b"bss dev-services data-encryption key v1"), master);
    let info = format!("tenant={tenant}\0kid={}", key_id(number));
    let mut key = [0u8; 32];
    hk.expand(info.as_bytes(), &mut key)
        .map_err(|e| anyhow!("deriving a key: {e}"))?;
    Ok(key)
}

// ---- Task Execution ----

async fn schedule_task(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, Refused> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => match value.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_BYTES => Some(k.to_owned()),
            _ => {
                return Err(Refused::bad_request(format!(
                    "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_BYTES} visible ASCII characters"
                )));
            }
        },
    };
    let task: Value = serde_json::from_slice(&body).map_err(Refused::bad_request)?;
    let mut tasks = shared.tasks.lock().unwrap_or_else(|p| p.into_inner());
    let task_id = tasks.schedule(key, task, body.len());
    Ok(Json(json!({"taskId": task_id, "status": "scheduled"})))
}

async fn list_tasks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let tasks = shared.tasks.lock().unwrap_or_else(|p| p.into_inner());
    Json(json!({"items": tasks.tasks}))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Task {
    #[serde(skip)]
    seq: u64,
    #[serde(skip)]
    bytes: usize,
    task_id: String,
    idempotency_key: Option<String>,
    body: Value,
    received_at: String,
    times: u64,
}

/// The newest scheduled tasks, oldest first, and their idempotency keys.
#[derive(Debug, Default)]
struct TaskLog {
    tasks: VecDeque<Task>,
    /// Idempotency key → the `seq` of its task (still in `tasks`).
    by_key: HashMap<String, u64>,
    next_seq: u64,
    bytes: usize,
}

impl TaskLog {
    /// The id of the task `key` already scheduled (counted once more), or
    /// of a new one.
    fn schedule(&mut self, key: Option<String>, body: Value, bytes: usize) -> String {
        let seen = key.as_ref().and_then(|k| self.by_key.get(k).copied());
        if let Some(task) = seen.and_then(|seq| self.get_mut(seq)) {
            task.times += 1;
            return task.task_id.clone();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(k) = &key {
            self.by_key.insert(k.clone(), seq);
        }
        let task_id = uuid::Uuid::now_v7().to_string();
        self.tasks.push_back(Task {
            seq,
            bytes,
            task_id: task_id.clone(),
            idempotency_key: key,
            body,
            received_at: chrono::Utc::now().to_rfc3339(),
            times: 1,
        });
        self.bytes += bytes;
        while self.tasks.len() > MAX_TASKS || (self.bytes > MAX_TASK_BYTES && self.tasks.len() > 1)
        {
            let Some(old) = self.tasks.pop_front() else {
                break;
            };
            self.bytes -= old.bytes;
            if let Some(k) = &old.idempotency_key {
                self.by_key.remove(k);
            }
        }
        task_id
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut Task> {
        let first = self.tasks.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.tasks.get_mut(index)
    }
}

// ---- State kept across restarts ----

/// The state file's content.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Stored {
    /// The Ed25519 signing key, PKCS#8, base64.
    signing_key: String,
    /// Its `kid`.
    signing_key_id: String,
    /// 32 bytes, base64: every data-encryption key is derived from it.
    master_secret: String,
    /// Tenants that rotated, and their current key number (others: 1).
    #[serde(default)]
    current_keys: BTreeMap<String, u32>,
}

/// The keys of the loaded state.
struct Keys {
    signing: EncodingKey,
    kid: String,
    jwks: Value,
    master: [u8; 32],
}

impl Stored {
    fn generate() -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::generate().map_err(|e| anyhow!("generating a key: {e}"))?;
        let pkcs8 = pair
            .to_pkcs8()
            .map_err(|e| anyhow!("encoding a key: {e}"))?;
        let digest = Sha256::digest(pair.public_key().as_ref());
        let mut master = [0u8; 32];
        aws_lc_rs::rand::fill(&mut master).map_err(|e| anyhow!("random bytes: {e}"))?;
        Ok(Self {
            signing_key: STANDARD.encode(pkcs8.as_ref()),
            signing_key_id: format!("dev-ed25519-{}", URL_SAFE_NO_PAD.encode(&digest[..9])),
            master_secret: STANDARD.encode(master),
            current_keys: BTreeMap::new(),
        })
    }

    fn keys(&self) -> anyhow::Result<Keys> {
        let pkcs8 = STANDARD.decode(&self.signing_key)?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| anyhow!("signingKey: {e}"))?;
        let master = STANDARD.decode(&self.master_secret)?;
        let master = <[u8; 32]>::try_from(master.as_slice())
            .map_err(|_| anyhow!("masterSecret is not 32 bytes"))?;
        let kid = self.signing_key_id.clone();
        let jwks = json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
            "kid": kid,
            "alg": "EdDSA",
            "use": "sig",
        }]});
        Ok(Keys {
            signing: EncodingKey::from_ed_der(&pkcs8),
            kid,
            jwks,
            master,
        })
    }

    fn current_key(&self, tenant: &TenantId) -> u32 {
        self.current_keys.get(tenant.as_str()).copied().unwrap_or(1)
    }
}

/// The state in `path`, created on first use.
fn load(path: &Path) -> anyhow::Result<(Stored, Keys)> {
    let fresh = serde_json::to_string_pretty(&Stored::generate()?)?;
    let text = secret_file::read_or_create(path, "dev-services state", ENV_HINT, || fresh)?;
    let stored: Stored = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a dev-services state file", path.display()))?;
    let keys = stored
        .keys()
        .with_context(|| format!("reading the keys in {}", path.display()))?;
    Ok((stored, keys))
}

/// Replaces the state file atomically: [`secret_file`] writes the new text
/// as a file of its own (complete, 0600, synced), which is then renamed over
/// the old one.
fn save(path: &Path, stored: &Stored) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(stored)?;
    let next = path.with_file_name(format!(
        ".{STATE_FILE}.{}.next",
        uuid::Uuid::new_v4().simple()
    ));
    let saved = secret_file::read_or_create(&next, "new dev-services state", ENV_HINT, || text)
        .and_then(|_| {
            std::fs::rename(&next, path).with_context(|| format!("replacing {}", path.display()))
        });
    if saved.is_err() {
        let _ = std::fs::remove_file(&next);
    }
    saved
}

// ---- The `token` subcommand ----

/// Asks the dev-services at `--addr` for a token.
async fn request_token(args: &[String]) -> anyhow::Result<String> {
    let mut addr = DEFAULT_ADDR.to_owned();
    let mut request = serde_json::Map::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let (name, value) = match flag.as_str() {
            "--addr" => {
                addr = value.clone();
                continue;
            }
            "--tenant" => ("tenant", json!(value)),
            "--roles" => ("roles", json!(value.split(',').collect::<Vec<_>>())),
            "--sub" => ("sub", json!(value)),
            "--ttl" => (
                "ttlSecs",
                json!(value.parse::<u64>().context("--ttl takes seconds")?),
            ),
            other => bail!("unknown option {other}\n{USAGE}"),
        };
        request.insert(name.to_owned(), value);
    }
    let url = format!("http://{}/dev/token", parse_loopback(&addr)?);
    let resp = reqwest::Client::new()
        .post(&url)
        .timeout(std::time::Duration::from_secs(10))
        .json(&request)
        .send()
        .await
        .with_context(|| format!("asking {url} (is `bss dev-services` running?)"))?;
    let status = resp.status();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    match answer["token"].as_str() {
        Some(token) if status.is_success() => Ok(token.to_owned()),
        _ => bail!(
            "{url} answered {status}: {}",
            answer["error"].as_str().unwrap_or("no token")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_dev_and_a_number_from_one() {
        assert_eq!(key_number("dev-1"), Some(1));
        assert_eq!(key_number("dev-12"), Some(12));
        for refused in ["dev-0", "dev-01", "dev-", "local-1", "dev-+1", "dev-1 "] {
            assert_eq!(key_number(refused), None, "{refused}");
        }
    }

    #[test]
    fn one_idempotency_key_schedules_one_task() {
        let mut log = TaskLog::default();
        let a = log.schedule(Some("k".into()), json!({"n": 1}), 7);
        let again = log.schedule(Some("k".into()), json!({"n": 1}), 7);
        let other = log.schedule(None, json!({}), 2);
        assert_eq!(a, again);
        assert_ne!(a, other);
        assert_eq!(log.tasks.len(), 2);
        assert_eq!(log.tasks[0].times, 2);
    }

    #[test]
    fn the_task_log_keeps_the_newest_tasks() {
        let mut log = TaskLog::default();
        let first = log.schedule(Some("first".into()), json!(0), 1);
        for n in 0..MAX_TASKS {
            log.schedule(None, json!(n), 1);
        }
        assert_eq!(log.tasks.len(), MAX_TASKS);
        assert!(log.by_key.is_empty(), "the dropped task's key is forgotten");
        assert_ne!(log.schedule(Some("first".into()), json!(0), 1), first);
        log.schedule(None, json!("big"), MAX_TASK_BYTES);
        assert_eq!(log.tasks.len(), 1, "bodies are bounded in bytes too");
    }

    #[test]
    fn keys_are_stable_and_distinct_per_tenant_and_id() {
        let master = [7u8; 32];
        let acme = TenantId::parse("acme").unwrap_or_else(|e| panic!("{e}"));
        let globex = TenantId::parse("globex").unwrap_or_else(|e| panic!("{e}"));
        let key = |t: &TenantId, n| derive_key(&master, t, n).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key(&acme, 1), key(&acme, 1));
        assert_ne!(key(&acme, 1), key(&acme, 2));
        assert_ne!(key(&acme, 1), key(&globex, 1));
    }
}
