//! Typed settings, layered: built-in defaults, then an optional TOML file
//! (`BSS_CONFIG_FILE`, or `bss.toml` in the working directory if present),
//! then environment variables. Zero configuration must give a working local
//! service, so every field has a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where the HTTP API listens (`BSS_HTTP_ADDR`).
    pub http_addr: SocketAddr,
    /// PostgreSQL to use (`DATABASE_URL`); unset means local discovery.
    pub database_url: Option<String>,
    /// Database created and used when `DATABASE_URL` is unset (`BSS_DATABASE_NAME`).
    pub database_name: String,
    /// `auto` (local server on 127.0.0.1:5432, else a private cluster) or
    /// `private` (always a private cluster) when `DATABASE_URL` is unset
    /// (`BSS_LOCAL_POSTGRES`).
    pub local_postgres: String,
    /// Where a private PostgreSQL cluster keeps its files (`BSS_DATA_DIR`).
    pub data_dir: PathBuf,
    pub db_max_connections: u32,
    /// Writers of coalesced creates (`BSS_WRITE_WORKERS`): each writes the
    /// creates of its part of the tenants in one transaction, on a
    /// connection of its own.
    pub write_workers: usize,
    /// Tenant-affine connections for reads by id (`BSS_READ_LANES`; unset:
    /// half of `db_max_connections`, at most 16; `0`: none, every read on
    /// the shared pool). See `storage::lanes`.
    pub read_lanes: Option<usize>,
    /// Most bytes of a tenant archive uploaded to `POST /v1/tenants/import`
    /// (`BSS_IMPORT_MAX_BYTES`).
    pub import_max_bytes: u64,
    /// HS256 secret for tokens when no Auth Service is configured
    /// (`BSS_JWT_SECRET`). Unset: a secret generated into
    /// `<data_dir>/jwt-secret` on first start, for loopback addresses only
    /// (see `auth::local_secret`).
    pub jwt_secret: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    /// Auth Service base URL (`AUTH_SERVICE_URL`): tokens are then verified
    /// with its JWKS at `jwks_path`.
    pub auth_service_url: Option<String>,
    pub jwks_path: String,
    /// Validation Service base URL (`VALIDATION_SERVICE_URL`); unset means the
    /// built-in meta-schema check.
    pub validation_service_url: Option<String>,
    /// Task Execution Service base URL (`TASK_SERVICE_URL`); unset means the
    /// built-in stand-in, which accepts schedules and logs them.
    pub task_service_url: Option<String>,
    /// Fall back to the local meta-schema check when the Validation Service is
    /// unavailable (`BSS_VALIDATION_FALLBACK=true`) instead of answering 503.
    pub validation_fallback: bool,
    /// Timeout of one outbound service call, in ms (`BSS_SERVICE_TIMEOUT_MS`).
    pub service_timeout_ms: u64,
    /// Attempts per outbound call, including the first (`BSS_SERVICE_ATTEMPTS`).
    pub service_attempts: u32,
    /// Consecutive failures that open a service's circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker refuses calls before a trial call, in seconds.
    pub breaker_open_secs: u64,
    /// Largest request body accepted, in bytes (`BSS_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
    /// Read-only role granted SELECT on every tenant schema (`BSS_ANALYTICS_ROLE`).
    pub analytics_role: String,
    /// Time between archiving a tenant and dropping its data, in seconds
    /// (`BSS_TENANT_GRACE_SECS`).
    pub tenant_grace_secs: u64,
    /// How often archived tenants past their grace period are dropped.
    pub reaper_interval_secs: u64,
    /// `json` (default) or `pretty` (`BSS_LOG_FORMAT`).
    pub log_format: String,
    /// This replica's name in event `source` (`BSS_INSTANCE_ID`; default the host name).
    pub instance_id: String,
    /// How long published events stay replayable, in seconds (`BSS_EVENT_RETENTION_SECS`).
    pub event_retention_secs: u64,
    /// Kafka bootstrap servers (`KAFKA_BROKERS`); unset means the built-in broker.
    pub kafka_brokers: Option<String>,
    /// Per-resource topics `business_store.data.<resource>.<action>` (`BSS_KAFKA_TOPIC_PER_RESOURCE`).
    pub kafka_topic_per_resource: bool,
    /// Create missing topics (`BSS_KAFKA_CREATE_TOPICS`, default true).
    pub kafka_create_topics: bool,
    /// Publish events in CloudEvents structured content mode (the whole
    /// envelope as the value, `application/cloudevents+json`) instead of
    /// binary mode (attributes as `ce_` headers, `data` as the value)
    /// (`BSS_KAFKA_STRUCTURED`, default false).
    pub kafka_structured: bool,
    /// Remote `$ref`s a schema may use, each URL prefix read from a local
    /// directory: `<prefix>=<dir>[;…]` (`BSS_SCHEMA_REMOTES`; for
    /// conformance testing; unset: none, and nothing is ever fetched).
    pub schema_remotes: Option<String>,
    /// Also publish every record event to this one topic, keyed by record,
    /// so that one partition holds a record's whole history in order
    /// (`BSS_KAFKA_RECORD_TOPIC`; unset: no such topic).
    pub kafka_record_topic: Option<String>,
    pub kafka_partitions: i32,
    pub kafka_replication: i32,
    /// Consumer group of the `auth.tenant.*` consumer (`BSS_KAFKA_GROUP`).
    pub kafka_group: String,
    /// Where malformed consumed messages go (`BSS_KAFKA_DEAD_LETTER_TOPIC`).
    pub kafka_dead_letter_topic: String,
    /// Where compiled plugins are cached (`BSS_PLUGIN_CACHE_DIR`; default
    /// `<data dir>/plugin-cache`).
    pub plugin_cache_dir: Option<PathBuf>,
    /// Largest plugin module accepted, in bytes (`BSS_PLUGIN_MAX_MODULE_BYTES`).
    pub plugin_max_module_bytes: usize,
    /// Longest compilation of an upload, in seconds (`BSS_PLUGIN_COMPILE_TIMEOUT_SECS`).
    pub plugin_compile_timeout_secs: u64,
    /// Ceilings on what a manifest may ask for: deadline per call in ms
    /// (`BSS_PLUGIN_MAX_DEADLINE_MS`), fuel (`BSS_PLUGIN_MAX_FUEL`) and
    /// linear memory in MiB (`BSS_PLUGIN_MAX_MEMORY_MIB`).
    pub plugin_max_deadline_ms: u64,
    pub plugin_max_fuel: u64,
    pub plugin_max_memory_mib: u64,
    /// Consecutive failures that trip a plugin, and for how long (seconds).
    pub plugin_breaker_threshold: u32,
    pub plugin_breaker_open_secs: u64,
    /// Clock skew allowed on a token's `exp`, `nbf` and `iat`, in seconds
    /// (`BSS_JWT_LEEWAY_SECS`).
    pub jwt_leeway_secs: u64,
    /// Longest time a client may take to send a request's headers, in ms
    /// (`BSS_HTTP_HEADER_TIMEOUT_MS`).
    pub http_header_timeout_ms: u64,
    /// Longest time a client may take to send a request's body, in ms
    /// (`BSS_HTTP_BODY_TIMEOUT_MS`).
    pub http_body_timeout_ms: u64,
    /// How long an idle keep-alive connection stays open, in seconds
    /// (`BSS_HTTP_IDLE_TIMEOUT_SECS`).
    pub http_idle_timeout_secs: u64,
    /// Most connections served at once; more wait in the accept queue
    /// (`BSS_HTTP_MAX_CONNECTIONS`).
    pub http_max_connections: usize,
    /// Where operational endpoints (`/metrics`, health) are served when set
    /// (`BSS_OPS_ADDR`); unset: on the main listener.
    pub ops_addr: Option<SocketAddr>,
    /// Longest wait for requests and streams to finish on shutdown, in
    /// seconds (`BSS_SHUTDOWN_DRAIN_SECS`).
    pub shutdown_drain_secs: u64,
    /// Requests per second per tenant, steady rate and burst (0 = no limit)
    /// (`BSS_RATE_LIMIT_RPS`, `BSS_RATE_LIMIT_BURST`).
    pub rate_limit_rps: u32,
    pub rate_limit_burst: u32,
    /// Plugin uploads per minute per tenant, and burst
    /// (`BSS_PLUGIN_UPLOADS_PER_MINUTE`, `BSS_PLUGIN_UPLOAD_BURST`).
    pub plugin_uploads_per_minute: u32,
    pub plugin_upload_burst: u32,
    /// Largest response body read from a peer service, in bytes
    /// (`BSS_SERVICE_MAX_RESPONSE_BYTES`).
    pub service_max_response_bytes: usize,
    /// Plugin calls running at once in this replica (`BSS_PLUGIN_MAX_CONCURRENT_CALLS`).
    pub plugin_max_concurrent_calls: u32,
    /// How long a call waits for its share of the call slots before it is
    /// refused, in ms (`BSS_PLUGIN_SLOT_WAIT_MS`).
    pub plugin_slot_wait_ms: u64,
    /// Violations kept per document from a hook (`BSS_PLUGIN_MAX_VIOLATIONS`)
    /// and per response (`BSS_PLUGIN_MAX_RESPONSE_VIOLATIONS`).
    pub plugin_max_violations: usize,
    pub plugin_max_response_violations: usize,
    /// Versions kept per plugin; older inactive ones are pruned (`BSS_PLUGIN_MAX_VERSIONS`).
    pub plugin_max_versions: u32,
    /// Plugins one tenant may have (`BSS_PLUGIN_MAX_PER_TENANT`).
    pub plugin_max_per_tenant: u32,
    /// Compiled components kept in memory (`BSS_PLUGIN_MEMORY_CACHE_ENTRIES`)
    /// and on disk, in MiB (`BSS_PLUGIN_DISK_CACHE_MIB`).
    pub plugin_memory_cache_entries: usize,
    pub plugin_disk_cache_mib: u64,
    /// Event streams (SSE) one tenant may hold open at once, per replica
    /// (`BSS_SSE_MAX_STREAMS_PER_TENANT`).
    pub sse_max_streams_per_tenant: usize,
    /// Bearer token the host presents to peer services (`BSS_SERVICE_TOKEN`).
    pub service_token: Option<String>,
    /// Else, HS256 key of the one-minute JWTs it presents (`BSS_SERVICE_KEY`).
    pub service_key: Option<String>,
    /// Master key of the built-in keyring, base64 of 32 bytes
    /// (`BSS_MASTER_KEY`); unset: generated into `<data_dir>/master-key`.
    pub master_key: Option<String>,
    /// How long a tenant's data-encryption key from the Auth Service is
    /// cached (`BSS_KEY_CACHE_SECS`).
    pub key_cache_secs: u64,
    /// Attempts to hand a task to the Task Execution Service before it is
    /// parked as failed (`BSS_TASK_MAX_ATTEMPTS`).
    pub task_max_attempts: i32,
    /// Longest pause between two attempts of a task, in seconds (backoff
    /// doubles from 1 s up to it; `BSS_TASK_RETRY_MAX_SECS`).
    pub task_retry_max_secs: u64,
    /// How long a replica holds a task it runs before another may take it
    /// over (renewed as it works; `BSS_TASK_LEASE_SECS`).
    pub task_lease_secs: u64,
    /// How often the task dispatcher looks for due tasks, in ms
    /// (`BSS_TASK_POLL_MS`); new tasks also wake it at once.
    pub task_poll_ms: u64,
    /// How long scheduled and done tasks are kept, in seconds
    /// (`BSS_TASK_RETENTION_SECS`); within it, asking again for a task with
    /// the same idempotency key returns it instead of queuing another.
    pub task_retention_secs: u64,
    /// Tasks one tenant may have waiting (`BSS_TASK_MAX_PENDING_PER_TENANT`).
    pub task_max_pending_per_tenant: i64,
    /// Records the re-encryption job moves per transaction
    /// (`BSS_RESEAL_BATCH`).
    pub reseal_batch: i64,
    /// Pause between two batches of the re-encryption job, in ms
    /// (`BSS_RESEAL_PAUSE_MS`): it yields the database to live traffic.
    pub reseal_pause_ms: u64,
    /// How long one webhook attempt may take, in ms (`BSS_WEBHOOK_TIMEOUT_MS`).
    pub webhook_timeout_ms: u64,
    /// Seconds before each attempt of a delivery, the first 0
    /// (`BSS_WEBHOOK_RETRY_SCHEDULE`; jittered by ±10%).
    pub webhook_retry_schedule: String,
    /// The longest `Retry-After` honoured, in seconds
    /// (`BSS_WEBHOOK_RETRY_AFTER_MAX_SECS`).
    pub webhook_retry_after_max_secs: u64,
    /// Address ranges webhooks may go to despite the SSRF guard
    /// (`BSS_WEBHOOK_ALLOW`, comma-separated CIDRs).
    pub webhook_allow: String,
    /// Whether http (not only https) endpoints are allowed
    /// (`BSS_WEBHOOK_ALLOW_HTTP`).
    pub webhook_allow_http: bool,
    /// Attempts in flight at once in this replica (`BSS_WEBHOOK_MAX_IN_FLIGHT`).
    pub webhook_max_in_flight: usize,
    /// Attempts in flight at once per tenant and per endpoint, in each
    /// replica (`BSS_WEBHOOK_PER_TENANT`, `BSS_WEBHOOK_PER_ENDPOINT`).
    pub webhook_per_tenant: i64,
    pub webhook_per_endpoint: i64,
    /// How often a replica looks for due deliveries, in ms
    /// (`BSS_WEBHOOK_POLL_MS`); new ones wake its own sender at once.
    pub webhook_poll_ms: u64,
    /// How long finished deliveries are kept, in seconds
    /// (`BSS_WEBHOOK_RETENTION_SECS`).
    pub webhook_retention_secs: u64,
    /// An endpoint failing this long without a success is disabled, in
    /// seconds (`BSS_WEBHOOK_DISABLE_AFTER_SECS`).
    pub webhook_disable_after_secs: u64,
    /// Endpoints one tenant may have (`BSS_WEBHOOK_MAX_PER_TENANT`).
    pub webhook_max_per_tenant: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: None,
            database_name: "bss".into(),
            local_postgres: "auto".into(),
            data_dir: PathBuf::from(".bss"),
            db_max_connections: 32,
            write_workers: 2,
            read_lanes: None,
            import_max_bytes: 1 << 30,
            jwt_secret: None,
            jwt_issuer: None,
            jwt_audience: None,
            auth_service_url: None,
            jwks_path: "/.well-known/jwks.json".into(),
            validation_service_url: None,
            validation_fallback: false,
            service_timeout_ms: 2000,
            service_attempts: 3,
            breaker_failure_threshold: 5,
            breaker_open_secs: 30,
            max_body_bytes: 1024 * 1024,
            analytics_role: "bss_analytics".into(),
            tenant_grace_secs: 7 * 24 * 3600,
            reaper_interval_secs: 60,
            log_format: "json".into(),
            instance_id: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "local".into()),
            event_retention_secs: 7 * 24 * 3600,
            kafka_brokers: None,
            kafka_topic_per_resource: false,
            kafka_create_topics: true,
            kafka_structured: false,
            kafka_record_topic: None,
            schema_remotes: None,
            kafka_partitions: 3,
            kafka_replication: 1,
            kafka_group: "business-store".into(),
            kafka_dead_letter_topic: "business_store.dead_letter".into(),
            task_service_url: None,
            plugin_cache_dir: None,
            plugin_max_module_bytes: 5 * 1024 * 1024,
            plugin_compile_timeout_secs: 60,
            plugin_max_deadline_ms: 1000,
            plugin_max_fuel: 100_000_000,
            plugin_max_memory_mib: 64,
            plugin_breaker_threshold: 5,
            plugin_breaker_open_secs: 30,
            jwt_leeway_secs: 30,
            http_header_timeout_ms: 10_000,
            http_body_timeout_ms: 15_000,
            http_idle_timeout_secs: 60,
            http_max_connections: 4096,
            ops_addr: None,
            shutdown_drain_secs: 10,
            rate_limit_rps: 1000,
            rate_limit_burst: 2000,
            plugin_uploads_per_minute: 10,
            plugin_upload_burst: 10,
            service_max_response_bytes: 1024 * 1024,
            plugin_max_concurrent_calls: 256,
            plugin_slot_wait_ms: 200,
            plugin_max_violations: 100,
            plugin_max_response_violations: 1000,
            plugin_max_versions: 10,
            plugin_max_per_tenant: 50,
            plugin_memory_cache_entries: 64,
            plugin_disk_cache_mib: 512,
            sse_max_streams_per_tenant: 64,
            service_token: None,
            service_key: None,
            master_key: None,
            key_cache_secs: 300,
            task_max_attempts: 60,
            task_retry_max_secs: 300,
            task_lease_secs: 30,
            task_poll_ms: 1000,
            task_retention_secs: 7 * 24 * 3600,
            task_max_pending_per_tenant: 10_000,
            reseal_batch: 200,
            reseal_pause_ms: 10,
            webhook_timeout_ms: 15_000,
            webhook_retry_schedule: "0,5,300,1800,7200,18000,36000,36000".into(),
            webhook_retry_after_max_secs: 3600,
            webhook_allow: String::new(),
            webhook_allow_http: false,
            webhook_max_in_flight: 64,
            webhook_per_tenant: 16,
            webhook_per_endpoint: 4,
            webhook_poll_ms: 250,
            webhook_retention_secs: 30 * 24 * 3600,
            webhook_disable_after_secs: 5 * 24 * 3600,
            webhook_max_per_tenant: 100,
        }
    }
}

/// Most writers (`BSS_WRITE_WORKERS`) or read lanes (`BSS_READ_LANES`).
pub const MAX_LANES: usize = 64;

impl Settings {
    /// Defaults, then the config file, then the process environment.
    pub fn load() -> anyhow::Result<Self> {
        let file = std::env::var("BSS_CONFIG_FILE").ok().map(PathBuf::from);
        let mut settings = match file {
            Some(path) => Self::from_file(&path)?,
            None if PathBuf::from("bss.toml").exists() => Self::from_file("bss.toml".as_ref())?,
            None => Self::default(),
        };
        settings.apply_env(|k| std::env::var(k).ok())?;
        settings.check()?;
        Ok(settings)
    }

    fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// Overrides fields from environment variables read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        fn parse<T: std::str::FromStr>(key: &str, v: String) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            v.parse()
                .map_err(|e| anyhow::anyhow!("environment variable {key}={v:?}: {e}"))
        }
        let non_empty = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        // `text`: taken as is; `some`: an optional setting; `parsed`: FromStr.
        macro_rules! from_env {
            ($($key:literal => $field:ident: $how:ident),* $(,)?) => {
                $(if let Some(v) = non_empty($key) {
                    self.$field = from_env!(@$how $key, v);
                })*
            };
            (@text $key:literal, $v:ident) => { $v.into() };
            (@some $key:literal, $v:ident) => { Some($v) };
            (@some_path $key:literal, $v:ident) => { Some(PathBuf::from($v)) };
            (@parsed $key:literal, $v:ident) => { parse($key, $v)? };
            (@some_parsed $key:literal, $v:ident) => { Some(parse($key, $v)?) };
        }
        from_env! {
            "BSS_HTTP_ADDR" => http_addr: parsed,
            "DATABASE_URL" => database_url: some,
            "BSS_DATABASE_NAME" => database_name: text,
            "BSS_LOCAL_POSTGRES" => local_postgres: text,
            "BSS_DATA_DIR" => data_dir: text,
            "BSS_DB_MAX_CONNECTIONS" => db_max_connections: parsed,
            "BSS_WRITE_WORKERS" => write_workers: parsed,
            "BSS_READ_LANES" => read_lanes: some_parsed,
            "BSS_IMPORT_MAX_BYTES" => import_max_bytes: parsed,
            "BSS_JWT_SECRET" => jwt_secret: some,
            "BSS_JWT_ISSUER" => jwt_issuer: some,
            "BSS_JWT_AUDIENCE" => jwt_audience: some,
            "AUTH_SERVICE_URL" => auth_service_url: some,
            "BSS_JWKS_PATH" => jwks_path: text,
            "VALIDATION_SERVICE_URL" => validation_service_url: some,
            "BSS_VALIDATION_FALLBACK" => validation_fallback: parsed,
            "BSS_SERVICE_TIMEOUT_MS" => service_timeout_ms: parsed,
            "BSS_SERVICE_ATTEMPTS" => service_attempts: parsed,
            "BSS_MAX_BODY_BYTES" => max_body_bytes: parsed,
            "BSS_ANALYTICS_ROLE" => analytics_role: text,
            "BSS_TENANT_GRACE_SECS" => tenant_grace_secs: parsed,
            "BSS_REAPER_INTERVAL_SECS" => reaper_interval_secs: parsed,
            "BSS_LOG_FORMAT" => log_format: text,
            "BSS_INSTANCE_ID" => instance_id: text,
            "BSS_EVENT_RETENTION_SECS" => event_retention_secs: parsed,
            "KAFKA_BROKERS" => kafka_brokers: some,
            "BSS_KAFKA_TOPIC_PER_RESOURCE" => kafka_topic_per_resource: parsed,
            "BSS_KAFKA_CREATE_TOPICS" => kafka_create_topics: parsed,
            "BSS_KAFKA_STRUCTURED" => kafka_structured: parsed,
            "BSS_KAFKA_RECORD_TOPIC" => kafka_record_topic: some,
            "BSS_SCHEMA_REMOTES" => schema_remotes: some,
            "BSS_KAFKA_PARTITIONS" => kafka_partitions: parsed,
            "BSS_KAFKA_REPLICATION" => kafka_replication: parsed,
            "BSS_KAFKA_GROUP" => kafka_group: text,
            "BSS_KAFKA_DEAD_LETTER_TOPIC" => kafka_dead_letter_topic: text,
            "TASK_SERVICE_URL" => task_service_url: some,
            "BSS_PLUGIN_CACHE_DIR" => plugin_cache_dir: some_path,
            "BSS_PLUGIN_MAX_MODULE_BYTES" => plugin_max_module_bytes: parsed,
            "BSS_PLUGIN_COMPILE_TIMEOUT_SECS" => plugin_compile_timeout_secs: parsed,
            "BSS_PLUGIN_MAX_DEADLINE_MS" => plugin_max_deadline_ms: parsed,
            "BSS_PLUGIN_MAX_FUEL" => plugin_max_fuel: parsed,
            "BSS_PLUGIN_MAX_MEMORY_MIB" => plugin_max_memory_mib: parsed,
            "BSS_PLUGIN_BREAKER_THRESHOLD" => plugin_breaker_threshold: parsed,
            "BSS_PLUGIN_BREAKER_OPEN_SECS" => plugin_breaker_open_secs: parsed,
            "BSS_JWT_LEEWAY_SECS" => jwt_leeway_secs: parsed,
            "BSS_HTTP_HEADER_TIMEOUT_MS" => http_header_timeout_ms: parsed,
            "BSS_HTTP_BODY_TIMEOUT_MS" => http_body_timeout_ms: parsed,
            "BSS_HTTP_IDLE_TIMEOUT_SECS" => http_idle_timeout_secs: parsed,
            "BSS_HTTP_MAX_CONNECTIONS" => http_max_connections: parsed,
            "BSS_OPS_ADDR" => ops_addr: some_parsed,
            "BSS_SHUTDOWN_DRAIN_SECS" => shutdown_drain_secs: parsed,
            "BSS_RATE_LIMIT_RPS" => rate_limit_rps: parsed,
            "BSS_RATE_LIMIT_BURST" => rate_limit_burst: parsed,
            "BSS_PLUGIN_UPLOADS_PER_MINUTE" => plugin_uploads_per_minute: parsed,
            "BSS_PLUGIN_UPLOAD_BURST" => plugin_upload_burst: parsed,
            "BSS_SERVICE_MAX_RESPONSE_BYTES" => service_max_response_bytes: parsed,
            "BSS_PLUGIN_MAX_CONCURRENT_CALLS" => plugin_max_concurrent_calls: parsed,
            "BSS_PLUGIN_SLOT_WAIT_MS" => plugin_slot_wait_ms: parsed,
            "BSS_PLUGIN_MAX_VIOLATIONS" => plugin_max_violations: parsed,
            "BSS_PLUGIN_MAX_RESPONSE_VIOLATIONS" => plugin_max_response_violations: parsed,
            "BSS_PLUGIN_MAX_VERSIONS" => plugin_max_versions: parsed,
            "BSS_PLUGIN_MAX_PER_TENANT" => plugin_max_per_tenant: parsed,
            "BSS_PLUGIN_MEMORY_CACHE_ENTRIES" => plugin_memory_cache_entries: parsed,
            "BSS_PLUGIN_DISK_CACHE_MIB" => plugin_disk_cache_mib: parsed,
            "BSS_SSE_MAX_STREAMS_PER_TENANT" => sse_max_streams_per_tenant: parsed,
            "BSS_SERVICE_TOKEN" => service_token: some,
            "BSS_SERVICE_KEY" => service_key: some,
            "BSS_MASTER_KEY" => master_key: some,
            "BSS_KEY_CACHE_SECS" => key_cache_secs: parsed,
            "BSS_TASK_MAX_ATTEMPTS" => task_max_attempts: parsed,
            "BSS_TASK_RETRY_MAX_SECS" => task_retry_max_secs: parsed,
            "BSS_TASK_LEASE_SECS" => task_lease_secs: parsed,
            "BSS_TASK_POLL_MS" => task_poll_ms: parsed,
            "BSS_TASK_RETENTION_SECS" => task_retention_secs: parsed,
            "BSS_TASK_MAX_PENDING_PER_TENANT" => task_max_pending_per_tenant: parsed,
            "BSS_RESEAL_BATCH" => reseal_batch: parsed,
            "BSS_RESEAL_PAUSE_MS" => reseal_pause_ms: parsed,
            "BSS_WEBHOOK_TIMEOUT_MS" => webhook_timeout_ms: parsed,
            "BSS_WEBHOOK_RETRY_SCHEDULE" => webhook_retry_schedule: text,
            "BSS_WEBHOOK_RETRY_AFTER_MAX_SECS" => webhook_retry_after_max_secs: parsed,
            "BSS_WEBHOOK_ALLOW" => webhook_allow: text,
            "BSS_WEBHOOK_ALLOW_HTTP" => webhook_allow_http: parsed,
            "BSS_WEBHOOK_MAX_IN_FLIGHT" => webhook_max_in_flight: parsed,
            "BSS_WEBHOOK_PER_TENANT" => webhook_per_tenant: parsed,
            "BSS_WEBHOOK_PER_ENDPOINT" => webhook_per_endpoint: parsed,
            "BSS_WEBHOOK_POLL_MS" => webhook_poll_ms: parsed,
            "BSS_WEBHOOK_RETENTION_SECS" => webhook_retention_secs: parsed,
            "BSS_WEBHOOK_DISABLE_AFTER_SECS" => webhook_disable_after_secs: parsed,
            "BSS_WEBHOOK_MAX_PER_TENANT" => webhook_max_per_tenant: parsed,
        }
        Ok(())
    }

    /// Refuses settings that would stop the service from serving anyone.
    pub fn check(&self) -> anyhow::Result<()> {
        let zero = [
            (
                "BSS_HTTP_HEADER_TIMEOUT_MS",
                self.http_header_timeout_ms == 0,
            ),
            ("BSS_HTTP_BODY_TIMEOUT_MS", self.http_body_timeout_ms == 0),
            ("BSS_IMPORT_MAX_BYTES", self.import_max_bytes == 0),
            ("BSS_HTTP_MAX_CONNECTIONS", self.http_max_connections == 0),
            ("BSS_SERVICE_TIMEOUT_MS", self.service_timeout_ms == 0),
            (
                "BSS_RATE_LIMIT_BURST (while BSS_RATE_LIMIT_RPS is set)",
                self.rate_limit_rps > 0 && self.rate_limit_burst == 0,
            ),
            (
                "BSS_PLUGIN_UPLOAD_BURST (while BSS_PLUGIN_UPLOADS_PER_MINUTE is set)",
                self.plugin_uploads_per_minute > 0 && self.plugin_upload_burst == 0,
            ),
            ("BSS_TASK_MAX_ATTEMPTS", self.task_max_attempts <= 0),
            ("BSS_TASK_LEASE_SECS", self.task_lease_secs == 0),
            ("BSS_TASK_POLL_MS", self.task_poll_ms == 0),
            ("BSS_RESEAL_BATCH", self.reseal_batch <= 0),
            ("BSS_WEBHOOK_TIMEOUT_MS", self.webhook_timeout_ms == 0),
            ("BSS_WEBHOOK_MAX_IN_FLIGHT", self.webhook_max_in_flight == 0),
            ("BSS_WEBHOOK_PER_TENANT", self.webhook_per_tenant <= 0),
            ("BSS_WEBHOOK_PER_ENDPOINT", self.webhook_per_endpoint <= 0),
            ("BSS_WEBHOOK_POLL_MS", self.webhook_poll_ms == 0),
            (
                "BSS_WEBHOOK_MAX_PER_TENANT",
                self.webhook_max_per_tenant <= 0,
            ),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            anyhow::bail!("{key} must be more than 0");
        }
        // Writers and lanes are PostgreSQL connections each, beside the pool.
        let connections = [
            ("BSS_WRITE_WORKERS", self.write_workers),
            ("BSS_READ_LANES", self.read_lanes.unwrap_or(0)),
        ];
        if let Some((key, n)) = connections.iter().find(|(_, n)| *n > MAX_LANES) {
            anyhow::bail!(
                "{key} must be at most {MAX_LANES} (each is a PostgreSQL connection), not {n}"
            );
        }
        self.webhook_guard()?;
        crate::webhooks::parse_schedule(&self.webhook_retry_schedule)?;
        Ok(())
    }

    pub fn webhook_guard(&self) -> anyhow::Result<crate::webhooks::Guard> {
        crate::webhooks::Guard::new(&self.webhook_allow, self.webhook_allow_http)
    }

    pub fn webhook_settings(&self) -> anyhow::Result<crate::webhooks::WebhookSettings> {
        Ok(crate::webhooks::WebhookSettings {
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            schedule: crate::webhooks::parse_schedule(&self.webhook_retry_schedule)?,
            retry_after_max_secs: self.webhook_retry_after_max_secs as f64,
            max_in_flight: self.webhook_max_in_flight,
            per_tenant: self.webhook_per_tenant,
            per_endpoint: self.webhook_per_endpoint,
            poll: Duration::from_millis(self.webhook_poll_ms),
            retention_secs: self.webhook_retention_secs,
            disable_after_secs: self.webhook_disable_after_secs,
            max_per_tenant: self.webhook_max_per_tenant,
            transformer_deadline: Duration::from_millis(self.plugin_max_deadline_ms),
        })
    }

    pub fn service_timeout(&self) -> Duration {
        Duration::from_millis(self.service_timeout_ms)
    }

    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugin_cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugin-cache"))
    }

    pub fn plugin_settings(&self) -> crate::plugins::PluginSettings {
        crate::plugins::PluginSettings {
            ceilings: crate::plugins::Ceilings {
                deadline_ms: self.plugin_max_deadline_ms,
                fuel: self.plugin_max_fuel,
                memory_mib: self.plugin_max_memory_mib,
                output_bytes: 1024 * 1024,
            },
            max_module_bytes: self.plugin_max_module_bytes,
            compile_timeout: Duration::from_secs(self.plugin_compile_timeout_secs),
            breaker_threshold: self.plugin_breaker_threshold,
            breaker_open: Duration::from_secs(self.plugin_breaker_open_secs),
            max_concurrent_calls: self.plugin_max_concurrent_calls as usize,
            slot_wait: Duration::from_millis(self.plugin_slot_wait_ms),
            max_violations: self.plugin_max_violations,
            max_response_violations: self.plugin_max_response_violations,
            max_versions: self.plugin_max_versions,
            max_per_tenant: self.plugin_max_per_tenant,
            memory_cache_entries: self.plugin_memory_cache_entries,
            disk_cache_bytes: self.plugin_disk_cache_mib << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_defaults() {
        let mut s = Settings::default();
        s.apply_env(|k| match k {
            "BSS_HTTP_ADDR" => Some("0.0.0.0:9000".into()),
            "VALIDATION_SERVICE_URL" => Some("http://v:1".into()),
            "BSS_VALIDATION_FALLBACK" => Some("true".into()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.http_addr.port(), 9000);
        assert_eq!(s.validation_service_url.as_deref(), Some("http://v:1"));
        assert!(s.validation_fallback);
    }

    #[test]
    fn writers_and_lanes_are_bounded() {
        let mut s = Settings {
            read_lanes: Some(MAX_LANES + 1),
            ..Settings::default()
        };
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("BSS_READ_LANES must be at most 64"), "{err}");
        s.read_lanes = Some(0);
        s.write_workers = 1000;
        let err = s.check().unwrap_err().to_string();
        assert!(err.contains("BSS_WRITE_WORKERS"), "{err}");
        s.write_workers = MAX_LANES;
        s.check().unwrap();
    }

    #[test]
    fn a_bad_value_names_the_variable() {
        let mut s = Settings::default();
        let err = s
            .apply_env(|k| (k == "BSS_SERVICE_TIMEOUT_MS").then(|| "soon".into()))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("BSS_SERVICE_TIMEOUT_MS"), "{err}");
    }

    #[test]
    fn a_config_file_is_toml_with_field_names() {
        let s: Settings = toml::from_str("http_addr = \"127.0.0.1:1234\"\nmax_body_bytes = 10")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.http_addr.port(), 1234);
        assert_eq!(s.max_body_bytes, 10);
    }
}
