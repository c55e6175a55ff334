//! Tenants' WebAssembly plugins: the registry of each tenant's active
//! plugins (loaded on first use, reloaded when any replica changes them),
//! their stats and circuit breakers, and the places they run: the write
//! path (validation hooks), the relay (event enrichers) and the webhook
//! sender (transformers).
//!
//! Calls run on blocking threads: a plugin that spins until its deadline
//! holds one of those, never an async worker. Each call holds one of the
//! replica's call slots, shared fairly by the busy tenants (`slots.rs`), so
//! tenants flooding a slow hook cannot starve a quiet one. A hook's
//! refusal is capped (violations per document and per response, the rest
//! counted as left out), so its size never depends on what a plugin returns.

pub mod bindings;
pub mod calls;
pub mod manifest;
pub mod refusal;
pub mod runtime;
pub mod sandbox;
pub mod slots;
pub mod stats;
pub mod trial;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

pub use bindings::{Context, Violation, WebhookRequest};
pub use calls::Recorder;
pub use manifest::{Ceilings, Kind, Limits, Manifest, TenantCeilings};
pub use runtime::{
    Failure, Loaded, Observed, Refusal, Report, Runtime, RuntimeBounds, UploadError,
};
pub use slots::CallSlots;
pub use stats::{Stats, StatsView};

use crate::domain::TenantId;
use crate::error::{ApiError, ApiResult, FieldError};
use crate::storage::plugins as store;

/// How plugins are run and capped (from the settings).
#[derive(Debug, Clone)]
pub struct PluginSettings {
    pub ceilings: Ceilings,
    pub max_module_bytes: usize,
    pub compile_timeout: Duration,
    pub breaker_threshold: u32,
    pub breaker_open: Duration,
    /// Calls running at once in this replica, shared fairly by busy tenants.
    pub max_concurrent_calls: usize,
    /// How long a hook call waits for a slot before the write is refused.
    pub slot_wait: Duration,
    /// Violations kept per document, and per response.
    pub max_violations: usize,
    pub max_response_violations: usize,
    /// Versions kept per plugin (older inactive ones are pruned).
    pub max_versions: u32,
    /// Plugins (names) one tenant may have.
    pub max_per_tenant: u32,
    /// Compiled components kept in memory, and bytes of them on disk.
    pub memory_cache_entries: usize,
    pub disk_cache_bytes: u64,
}

impl PluginSettings {
    /// What the runtime's engine and caches are sized by.
    pub fn runtime_bounds(&self) -> RuntimeBounds {
        RuntimeBounds {
            instances: u32::try_from(self.max_concurrent_calls).unwrap_or(u32::MAX),
            memory_cache_entries: self.memory_cache_entries,
            disk_cache_bytes: self.disk_cache_bytes,
        }
    }
}

/// One active plugin version of a tenant.
#[derive(Debug)]
pub struct Active {
    pub name: String,
    pub version: i32,
    pub manifest: Manifest,
    /// Err when the stored version cannot be loaded (calls then fail).
    loaded: Result<Loaded, String>,
    pub stats: Arc<Stats>,
    /// A version on trial beside this one.
    pub trial: Option<Arc<trial::Trial>>,
}

impl Active {
    /// The loaded version, or the failure (counted) when it cannot load.
    fn ready(&self, request_id: &str) -> Result<&Loaded, Failure> {
        self.loaded.as_ref().map_err(|e| {
            let failure = Failure::Unavailable(e.clone());
            self.failed(&failure, Duration::ZERO, request_id);
            failure
        })
    }

    /// Counts a failed call (stats, breaker) and logs it for the plugin's
    /// author: tenant, plugin, version, request id, the limit it hit (or
    /// the trap) and what the plugin said on stderr.
    fn failed(&self, failure: &Failure, took: Duration, request_id: &str) {
        self.warn_failed(self.version, failure, took, request_id);
        self.stats.failed(failure, took);
    }

    /// The WARN line of a failed call of `version` (this one or its canary).
    fn warn_failed(&self, version: i32, failure: &Failure, took: Duration, request_id: &str) {
        if !matches!(failure, Failure::Tripped(_) | Failure::Busy) {
            tracing::warn!(
                tenant = %self.stats.tenant(),
                plugin = %self.name,
                version,
                request_id,
                failure = failure.kind(),
                limit = failure.limit(),
                took_ms = took.as_millis() as u64,
                "plugin call failed: {failure}"
            );
        }
    }
}

impl Active {
    /// One call of this plugin outside the write path (enrichers,
    /// transformers): refused while its breaker is open, given its config,
    /// and counted in its stats and breaker whatever the outcome; or, for
    /// its share of calls, answered by a canary (counted apart, outside the
    /// breaker). The call's outcome, and what it cost and logged with the
    /// context and version it ran with (None when it did not run).
    fn call<T>(
        &self,
        mut ctx: Context,
        run: impl FnOnce(&Loaded, &Context) -> Observed<T>,
    ) -> (Result<T, Failure>, Option<Ran>) {
        let canary = self.trial.as_ref().filter(|t| t.takes_this_call());
        // The version that answers: a canary (no breaker), else this one.
        let (loaded, version) = match canary {
            Some(c) => match &c.loaded {
                Ok(l) => (l, c.version),
                Err(e) => {
                    let failure = Failure::Unavailable(e.clone());
                    c.stats.called(true);
                    self.warn_failed(c.version, &failure, Duration::ZERO, &ctx.request_id);
                    return (Err(failure), None);
                }
            },
            None => {
                let loaded = match self.ready(&ctx.request_id) {
                    Ok(l) => l,
                    Err(f) => return (Err(f), None),
                };
                if let Err(retry) = self.stats.breaker.try_acquire() {
                    let failure = Failure::Tripped(retry.as_secs().max(1));
                    self.failed(&failure, Duration::ZERO, &ctx.request_id);
                    return (Err(failure), None);
                }
                (loaded, self.version)
            }
        };
        ctx.config.clone_from(&loaded.config);
        let start = Instant::now();
        let Observed { outcome, report } = run(loaded, &ctx);
        let took = start.elapsed();
        match (canary, &outcome) {
            // Counted in the trial's stats, never in the breaker.
            (Some(c), _) => {
                c.stats.called(outcome.is_err());
                if let Err(failure) = &outcome {
                    self.warn_failed(version, failure, took, &ctx.request_id);
                }
            }
            (None, Ok(_)) => self.stats.succeeded(took, false),
            (None, Err(failure)) => self.failed(failure, took, &ctx.request_id),
        }
        let ran = Ran {
            report,
            ctx,
            version,
        };
        (outcome, Some(ran))
    }

    /// This plugin's shadow, if it has one.
    fn shadow(&self) -> Option<Arc<trial::Trial>> {
        self.trial.clone().filter(|t| t.is_shadow())
    }

    /// Hands a call's log lines to the recorder, and the call itself when
    /// the manifest's `record` wants it (`what`: its input and verdict,
    /// built only then).
    fn observed(
        &self,
        recorder: Option<&Recorder>,
        ctx: &Context,
        version: i32,
        report: Report,
        failed: bool,
        what: impl FnOnce() -> (Value, calls::Verdict),
    ) {
        let Some(recorder) = recorder else { return };
        let recorded = self.manifest.record.is_some_and(|p| p.wants(failed));
        // The common call logs nothing and is not recorded: nothing to build.
        if !recorded && report.logs.is_empty() {
            return;
        }
        let origin = calls::Origin {
            tenant: self.stats.tenant().to_string(),
            plugin: self.name.clone(),
            version,
        };
        if !recorded {
            recorder.logs(&origin, &ctx.request_id, &report.logs);
            return;
        }
        let (input, verdict) = what();
        recorder.record(calls::CallRecord {
            origin,
            kind: self.manifest.kind,
            context: calls::CallRecord::context_json(ctx),
            input,
            verdict,
            report,
        });
    }
}

/// What a call that ran cost and logged, with the context and the version
/// it ran with.
struct Ran {
    report: Report,
    ctx: Context,
    version: i32,
}

/// A tenant's active plugins, in name order.
#[derive(Debug, Default)]
pub struct TenantSet {
    plugins: Vec<Arc<Active>>,
}

impl TenantSet {
    fn bound(&self, kind: Kind, resource: &str) -> impl Iterator<Item = &Arc<Active>> {
        self.plugins
            .iter()
            .filter(move |p| p.manifest.kind == kind && p.manifest.binds(resource))
    }
}

/// The validation hooks a write must pass (at least one).
#[derive(Debug)]
pub struct Hooks(Vec<Arc<Active>>);

/// A write the validation hooks are asked about.
#[derive(Debug)]
pub struct WriteCall<'a> {
    pub tenant: &'a TenantId,
    pub resource: &'a str,
    /// `create`, `replace`, `patch`, `delete` or `batch`.
    pub operation: &'static str,
    pub actor: String,
    pub request_id: String,
    /// The resource's `x-encrypted` paths: redacted in recorded calls.
    pub hidden: Arc<[Vec<String>]>,
}

/// One document of a write: where it is in the request body (a JSON
/// Pointer prefix), the document and the stored one it replaces.
#[derive(Debug)]
pub struct WriteDoc {
    pub path: String,
    pub record: String,
    pub previous: Option<String>,
}

/// What the enrichers made of an event.
#[derive(Debug, PartialEq)]
pub enum Enriched {
    Unchanged,
    Replaced(Value),
    Dropped,
    /// Not now (no free call slot): the event waits for the next pass.
    Later,
}

#[derive(Debug)]
pub struct Plugins {
    runtime: Arc<Runtime>,
    pool: PgPool,
    settings: PluginSettings,
    tenants: DashMap<String, Arc<TenantSet>>,
    /// Bumped by every invalidation: a load that started before one is not kept.
    generation: AtomicU64,
    stats: DashMap<(String, String), Arc<Stats>>,
    trial_stats: DashMap<(String, String, i32), Arc<trial::TrialStats>>,
    compile_gate: Arc<tokio::sync::Semaphore>,
    /// Recompiles of stored modules (neither cache had them), one at a
    /// time: a tenant with many plugins takes one core at most, and never
    /// waits behind another tenant's upload.
    recompile_gate: Arc<tokio::sync::Semaphore>,
    /// The replica's call slots, shared fairly by the busy tenants.
    slots: Arc<CallSlots>,
    /// Where plugin log lines and recorded calls go (none outside a runtime).
    recorder: Option<Recorder>,
}

/// Largest event an enricher may return.
const ENRICHED_EVENT_MAX: usize = 512 * 1024;

/// Keys of `data` that say whose change an event is: an enricher cannot
/// change them.
const FIXED_DATA: [&str; 5] = [
    "tenantId",
    "resource",
    "recordId",
    "version",
    "previousVersion",
];

/// Puts `keys` back as they were in `original` (removing ones it lacked).
fn restore(map: &mut serde_json::Map<String, Value>, original: &Value, keys: &[&str]) {
    for key in keys {
        match original.get(*key) {
            Some(v) => map.insert((*key).to_owned(), v.clone()),
            None => map.remove(*key),
        };
    }
}

/// The envelope attributes naming the hook versions that passed a write
/// and the enricher versions that made its event.
pub const HOOKS_ATTRIBUTE: &str = "bsshooks";
pub const ENRICHERS_ATTRIBUTE: &str = "bssenrichers";

/// The validation hook versions that passed a write, in the order they
/// ran (a canary's version when the canary answered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passed(Vec<(String, i32)>);

impl Passed {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As the events' [`HOOKS_ATTRIBUTE`]: `name@version`, comma-separated.
    pub fn attribute(&self) -> String {
        let names: Vec<String> = self.0.iter().map(|(n, v)| format!("{n}@{v}")).collect();
        names.join(",")
    }

    /// As a record version's audit: `[{"plugin": name, "version": v}]`.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|(plugin, version)| serde_json::json!({"plugin": plugin, "version": version}))
                .collect(),
        )
    }
}

/// Envelope attributes an enricher cannot change.
const FIXED_ATTRIBUTES: [&str; 9] = [
    "id",
    "type",
    "source",
    "specversion",
    "subject",
    "tenantid",
    "time",
    HOOKS_ATTRIBUTE,
    ENRICHERS_ATTRIBUTE,
];

impl Plugins {
    pub fn new(runtime: Arc<Runtime>, pool: PgPool, settings: PluginSettings) -> Self {
        // The runtime's caches are bounded where it is built (`with_bounds`).
        Self {
            runtime,
            tenants: DashMap::new(),
            generation: AtomicU64::new(0),
            stats: DashMap::new(),
            trial_stats: DashMap::new(),
            compile_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            recompile_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            slots: CallSlots::new(settings.max_concurrent_calls),
            recorder: tokio::runtime::Handle::try_current()
                .is_ok()
                .then(|| Recorder::start(pool.clone())),
            pool,
            settings,
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// A call slot within the tenant's fair share, waiting at most `wait`.
    async fn slot(&self, tenant: &str, wait: Duration) -> Option<slots::Slot> {
        self.slots.acquire(tenant, wait).await
    }

    /// Forgets the tenant's loaded plugins (after a change).
    pub fn invalidate(&self, tenant: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.tenants.remove(tenant);
    }

    fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.tenants.clear();
    }

    /// Another version became active: a tripped breaker gives it a chance.
    pub fn changed(&self, tenant: &str, name: &str) {
        self.stats_of(tenant, name).breaker.on_success();
        self.invalidate(tenant);
    }

    /// Forgets a deleted plugin's stats, and the compiled artifacts of
    /// modules no stored version uses any more.
    pub async fn forget(&self, tenant: &str, name: &str, unused: Vec<String>) {
        self.stats.remove(&(tenant.to_owned(), name.to_owned()));
        // A plugin uploaded later under this name numbers its versions
        // from 1 again: none of this one's trial counts may show there.
        self.forget_trials(tenant, name);
        self.invalidate(tenant);
        self.drop_artifacts(unused).await;
    }

    /// Drops compiled artifacts (memory and disk) of modules no stored
    /// version uses any more.
    async fn drop_artifacts(&self, unused: Vec<String>) {
        if unused.is_empty() {
            return;
        }
        let rt = self.runtime.clone();
        let dropped = tokio::task::spawn_blocking(move || {
            for sha in &unused {
                rt.forget(sha);
            }
        });
        if let Err(e) = dropped.await {
            tracing::warn!(error = %e, "cannot drop unused plugin artifacts");
        }
    }

    /// How many plugins' breakers are open now, of every tenant (readiness
    /// reports the number, never which).
    pub fn tripped(&self) -> usize {
        self.stats
            .iter()
            .filter(|s| s.breaker.state() == crate::services::BreakerState::Open)
            .count()
    }

    pub fn stats_of(&self, tenant: &str, name: &str) -> Arc<Stats> {
        self.stats
            .entry((tenant.to_owned(), name.to_owned()))
            .or_insert_with(|| {
                Arc::new(
                    Stats::new(self.settings.breaker_threshold, self.settings.breaker_open)
                        .named(tenant, name),
                )
            })
            .clone()
    }

    /// What a plugin's version on trial did so far (this replica).
    pub fn trial_stats_of(&self, tenant: &str, name: &str, version: i32) -> Arc<trial::TrialStats> {
        self.trial_stats
            .entry((tenant.to_owned(), name.to_owned(), version))
            .or_default()
            .clone()
    }

    /// Forgets what ended trials did.
    pub fn forget_trials(&self, tenant: &str, name: &str) {
        self.trial_stats
            .retain(|(t, n, _), _| !(t == tenant && n == name));
    }

    /// The ceilings a tenant's manifests are held to: the installation's,
    /// lowered to the tenant's own.
    pub async fn ceilings_for(&self, tenant: &str) -> ApiResult<Ceilings> {
        let own = store::ceilings(&self.pool, tenant)
            .await?
            .ok_or_else(|| ApiError::not_found("tenant not found"))?;
        let own: TenantCeilings = serde_json::from_value(own).unwrap_or_default();
        Ok(self.settings.ceilings.for_tenant(&own))
    }

    /// The tenant's active plugins, loading them on first use.
    pub async fn set(&self, tenant: &str) -> anyhow::Result<Arc<TenantSet>> {
        if let Some(s) = self.tenants.get(tenant) {
            return Ok(s.clone());
        }
        let generation = self.generation.load(Ordering::SeqCst);
        let set = Arc::new(self.load_set(tenant).await?);
        if self.generation.load(Ordering::SeqCst) == generation {
            self.tenants.insert(tenant.to_owned(), set.clone());
        }
        Ok(set)
    }

    async fn load_set(&self, tenant: &str) -> anyhow::Result<TenantSet> {
        let rows = store::active(&self.pool, tenant).await?;
        if rows.is_empty() {
            return Ok(TenantSet::default());
        }
        let ceilings = self
            .ceilings_for(tenant)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut trials = store::trials(&self.pool, tenant).await?;
        let mut plugins = Vec::with_capacity(rows.len());
        for row in rows {
            let trial = match trials.iter().position(|t| t.name == row.name) {
                Some(i) => Some(Arc::new(
                    self.load_trial(tenant, trials.swap_remove(i), &ceilings)
                        .await?,
                )),
                None => None,
            };
            let (manifest, loaded) = self
                .load_version(
                    tenant,
                    &row.name,
                    row.version,
                    row.manifest,
                    &row.sha256,
                    &ceilings,
                )
                .await?;
            plugins.push(Arc::new(Active {
                stats: self.stats_of(tenant, &row.name),
                name: row.name,
                version: row.version,
                manifest,
                loaded,
                trial,
            }));
        }
        Ok(TenantSet { plugins })
    }

    async fn load_trial(
        &self,
        tenant: &str,
        row: store::TrialRow,
        ceilings: &Ceilings,
    ) -> anyhow::Result<trial::Trial> {
        let (_, loaded) = self
            .load_version(
                tenant,
                &row.name,
                row.version,
                row.manifest,
                &row.sha256,
                ceilings,
            )
            .await?;
        let mode = match row.trial_percent {
            Some(p) if row.trial_mode == "canary" => store::Trial::Canary(p),
            _ => store::Trial::Shadow,
        };
        Ok(trial::Trial {
            version: row.version,
            mode,
            loaded,
            stats: self.trial_stats_of(tenant, &row.name, row.version),
        })
    }

    /// A stored version's manifest and the version loaded (or why it
    /// cannot be: logged, and its calls then fail).
    async fn load_version(
        &self,
        tenant: &str,
        name: &str,
        version: i32,
        manifest: Value,
        sha: &str,
        ceilings: &Ceilings,
    ) -> anyhow::Result<(Manifest, Result<Loaded, String>)> {
        let manifest: Manifest = serde_json::from_value(manifest)?;
        let loaded = self
            .load_one(tenant, name, version, sha, &manifest, ceilings)
            .await;
        if let Err(e) = &loaded {
            tracing::error!(tenant, plugin = %name, version, error = %e, "cannot load a plugin version; its calls fail");
        }
        Ok((manifest, loaded))
    }

    async fn load_one(
        &self,
        tenant: &str,
        name: &str,
        version: i32,
        sha: &str,
        manifest: &Manifest,
        ceilings: &Ceilings,
    ) -> Result<Loaded, String> {
        let checked = manifest
            .clone()
            .check(&Ceilings::NONE)
            .map_err(|_| "the stored manifest is no longer valid".to_owned())?;
        // Ceilings lowered since the upload apply at once.
        let limits = ceilings.cap(checked.limits);
        let rt = self.runtime.clone();
        let key = sha.to_owned();
        let cached = tokio::task::spawn_blocking(move || rt.cached(&key))
            .await
            .map_err(|e| e.to_string())?;
        let component = match cached {
            Some(c) => c,
            None => {
                let bytes = store::module(&self.pool, tenant, name, version)
                    .await
                    .map_err(|e| e.to_string())?;
                let rt = self.runtime.clone();
                let key = sha.to_owned();
                let permit = self
                    .recompile_gate
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    rt.compile_stored(&key, &bytes)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
            }
        };
        let caller = sandbox::Caller {
            tenant: tenant.to_owned(),
            plugin: name.to_owned(),
            version,
            services: manifest.services.clone(),
            queues_tasks: manifest.kind == Kind::EventEnricher,
        };
        self.runtime
            .load(&component, manifest.kind, limits, checked.config, caller)
            .map_err(|e| e.to_string())
    }

    /// Compiles and stores an upload as the plugin's next, active version.
    pub async fn upload(
        &self,
        tenant: &TenantId,
        actor: &str,
        manifest: Manifest,
        module: Vec<u8>,
        trial: Option<store::Trial>,
    ) -> ApiResult<(String, i32, String)> {
        let ceilings = self.ceilings_for(tenant.as_str()).await?;
        let checked = manifest
            .check(&ceilings)
            .map_err(|errors| ApiError::unprocessable("the manifest is not valid", errors))?;
        let max = self.settings.max_module_bytes;
        if module.len() > max {
            return Err(ApiError::unprocessable(
                format!(
                    "the module is {} bytes; the limit is {max} bytes ({} MiB)",
                    module.len(),
                    max >> 20
                ),
                vec![FieldError::request("/module", "module too large")],
            ));
        }
        let permit = tokio::time::timeout(
            self.settings.compile_timeout,
            self.compile_gate.clone().acquire_owned(),
        )
        .await
        .map_err(|_| ApiError::Unavailable {
            detail: "other uploads are being compiled; try again shortly".into(),
            retry_after_secs: 5,
        })?
        .map_err(|e| ApiError::Internal(e.into()))?;
        let kind = checked.manifest.kind;
        let rt = self.runtime.clone();
        let module = Arc::new(module);
        let bytes = module.clone();
        // The permit goes with the compilation: a compile that outlives the
        // timeout still holds it, so uploads cannot pile up compilations.
        let compile = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            rt.compile_upload(&bytes, kind)
        });
        let sha = match tokio::time::timeout(self.settings.compile_timeout, compile).await {
            Err(_) => {
                return Err(ApiError::unprocessable(
                    format!(
                        "compiling the module took longer than {} s",
                        self.settings.compile_timeout.as_secs()
                    ),
                    vec![FieldError::request("/module", "compilation too slow")],
                ));
            }
            Ok(joined) => joined
                .map_err(|e| ApiError::Internal(e.into()))?
                .map_err(|e| {
                    ApiError::unprocessable(
                        e.to_string(),
                        vec![FieldError::request("/module", e.to_string())],
                    )
                })?,
        };
        let manifest_json = serde_json::to_value(&checked.manifest).map_err(anyhow::Error::from)?;
        let created = store::create_version(
            &self.pool,
            store::NewVersion {
                tenant: tenant.as_str(),
                name: &checked.manifest.name,
                kind: kind.as_str(),
                manifest: &manifest_json,
                sha256: &sha,
                module: &module,
                actor,
                keep: self.settings.max_versions,
                max_plugins: self.settings.max_per_tenant,
                trial,
            },
        )
        .await?;
        self.changed(tenant.as_str(), &checked.manifest.name);
        self.drop_artifacts(created.unused).await;
        Ok((checked.manifest.name, created.version, sha))
    }

    /// The validation hooks bound to writes of this resource (for a delete,
    /// those that ask to run before deletes); None when there are none, so
    /// a write without hooks prepares nothing for them.
    pub async fn hooks(
        &self,
        tenant: &TenantId,
        resource: &str,
        delete: bool,
    ) -> ApiResult<Option<Hooks>> {
        let set = self.set(tenant.as_str()).await?;
        let hooks: Vec<Arc<Active>> = set
            .bound(Kind::ValidationHook, resource)
            .filter(|h| !delete || h.manifest.on_delete)
            .cloned()
            .collect();
        Ok((!hooks.is_empty()).then_some(Hooks(hooks)))
    }

    /// Runs `hooks` over the documents of a write, in name order. Ok when
    /// every hook accepted every document: then which versions passed it.
    pub async fn check_write(
        &self,
        hooks: Hooks,
        call: WriteCall<'_>,
        docs: Vec<WriteDoc>,
    ) -> ApiResult<Passed> {
        let tenant = call.tenant.as_str();
        let docs = Arc::new(docs);
        let mut passed = Vec::with_capacity(hooks.0.len());
        for hook in hooks.0 {
            let refused = |failure: Failure, retry_after_secs: u64| ApiError::Unavailable {
                detail: format!(
                    "plugin {} {failure}; the write was refused and nothing was stored",
                    hook.name
                ),
                retry_after_secs,
            };
            // The slot first: a half-open breaker's trial, once granted, is
            // always reported (the call runs to its end on its own thread).
            let Some(slot) = self.slot(tenant, self.settings.slot_wait).await else {
                return Err(refused(Failure::Busy, 1));
            };
            // A canary answers its share of writes, outside the active
            // version's breaker.
            let canary = hook.trial.clone().filter(|t| t.takes_this_call());
            let version = canary.as_ref().map_or(hook.version, |t| t.version);
            let breaker = match &canary {
                Some(_) => Ok(()),
                None => hook.stats.breaker.try_acquire(),
            };
            if let Err(retry) = breaker {
                let failure = Failure::Tripped(retry.as_secs().max(1));
                hook.failed(&failure, Duration::ZERO, &call.request_id);
                // What tripped it, and how to get writes through now.
                let last = hook
                    .stats
                    .last_failure()
                    .map(|f| format!(" (its last failure: it {f})"))
                    .unwrap_or_default();
                let rollback = if hook.version > 1 {
                    format!(
                        "; to roll back, PUT /v1/plugins/{}/active {{\"version\": {}}}",
                        hook.name,
                        hook.version - 1
                    )
                } else {
                    String::new()
                };
                return Err(ApiError::Unavailable {
                    detail: format!(
                        "plugin {} version {} {failure}{last}; the write was refused and nothing was stored{rollback}",
                        hook.name, hook.version
                    ),
                    retry_after_secs: retry.as_secs().max(1),
                });
            }
            let ctx = Context {
                tenant_id: tenant.to_owned(),
                resource: call.resource.to_owned(),
                operation: call.operation.to_owned(),
                actor: call.actor.clone(),
                request_id: call.request_id.clone(),
                config: String::new(),
            };
            let (rt, h, all) = (self.runtime.clone(), hook.clone(), docs.clone());
            let (recorder, hidden) = (self.recorder.clone(), call.hidden.clone());
            let shadow = hook.shadow();
            // The shadow runs after the write's own call, in the same context.
            let shadow_ctx = shadow.as_ref().map(|_| ctx.clone());
            let caps = Caps {
                per_doc: self.settings.max_violations,
                per_response: self.settings.max_response_violations,
                bytes: RESPONSE_VIOLATION_BYTES,
            };
            let run = HookRun {
                ctx,
                caps,
                recorder,
                hidden: hidden.clone(),
                canary,
                verdicts: shadow.is_some(),
            };
            let outcome = tokio::task::spawn_blocking(move || {
                let _held = slot;
                run_hook(&rt, &h, &all, run)
            })
            .await
            .map_err(|e| ApiError::Internal(e.into()))?;
            if let (Some(shadow), Some(ctx), Ok(found)) = (shadow, shadow_ctx, &outcome) {
                self.shadow_write(shadow, ctx, docs.clone(), found.verdicts.clone(), hidden);
            }
            let source = format!("plugin:{}", hook.name);
            match outcome {
                Ok(found) if found.is_empty() => passed.push((hook.name.clone(), version)),
                Ok(found) => return Err(found.into_error(&hook.name, &source)),
                Err((_, Failure::Busy)) => return Err(refused(Failure::Busy, 1)),
                Err((prefix, failure)) => {
                    return Err(ApiError::PluginFailed {
                        detail: format!(
                            "plugin {} (version {version}) {failure}; the write was refused and nothing was stored",
                            hook.name
                        ),
                        errors: vec![FieldError {
                            path: prefix,
                            message: failure.to_string(),
                            source,
                            record_id: None,
                            code: Some(failure.kind().to_owned()),
                        }],
                    });
                }
            }
        }
        Ok(Passed(passed))
    }

    /// Runs a shadow version after the active one (on a free call slot,
    /// never waiting for one: when none is free the run is skipped and
    /// counted): `run` gets the runtime, the shadow's loaded version and the
    /// call's context with the shadow's config, and compares what it did
    /// with the active version (`shadow.stats`). Never delays or changes
    /// the call.
    fn run_shadow(
        &self,
        shadow: Arc<trial::Trial>,
        mut ctx: Context,
        run: impl FnOnce(&Runtime, &Loaded, &Context, &trial::TrialStats) + Send + 'static,
    ) {
        let (slots, rt) = (self.slots.clone(), self.runtime.clone());
        tokio::spawn(async move {
            let Some(slot) = slots.acquire(&ctx.tenant_id, Duration::ZERO).await else {
                shadow.stats.skipped();
                return;
            };
            let _ = tokio::task::spawn_blocking(move || {
                let _held = slot;
                let Ok(loaded) = &shadow.loaded else {
                    shadow.stats.called(true);
                    return;
                };
                ctx.config.clone_from(&loaded.config);
                run(&rt, loaded, &ctx, &shadow.stats);
            })
            .await;
        });
    }

    /// A validation hook's shadow on a write's documents, its verdicts
    /// compared with the active version's (`active`, one per document).
    fn shadow_write(
        &self,
        shadow: Arc<trial::Trial>,
        ctx: Context,
        docs: Arc<Vec<WriteDoc>>,
        active: Vec<calls::Verdict>,
        hidden: Arc<[Vec<String>]>,
    ) {
        self.run_shadow(shadow, ctx, move |rt, loaded, ctx, stats| {
            for (doc, active) in docs.iter().zip(&active) {
                let outcome = rt.validate_capped(
                    loaded,
                    ctx,
                    &doc.record,
                    doc.previous.as_deref(),
                    MAX_VIOLATIONS_COMPARED,
                );
                stats.called(outcome.is_err());
                let verdict = calls::Verdict::of_validation(&outcome);
                stats.compare(active, &verdict, || {
                    let mut record = serde_json::from_str(&doc.record).unwrap_or(Value::Null);
                    calls::redact(&mut record, &hidden);
                    serde_json::json!({
                        "at": chrono::Utc::now(),
                        "requestId": ctx.request_id,
                        "path": doc.path,
                        "record": record,
                    })
                });
            }
        });
    }

    /// An enricher's shadow on the event its active version got (`input`;
    /// `original` as committed), what it makes of it compared with what
    /// the active version made (`active`). Tasks it asks for are dropped.
    fn shadow_enricher(
        &self,
        shadow: Arc<trial::Trial>,
        ctx: Context,
        input: Value,
        original: Value,
        active: calls::Verdict,
    ) {
        self.run_shadow(shadow, ctx, move |rt, loaded, ctx, stats| {
            let outcome = enrich_once(rt, loaded, ctx, &input, &original).outcome;
            sandbox::take_queued_tasks();
            stats.called(outcome.is_err());
            stats.compare(&active, &calls::Verdict::of_enriched(&outcome), || {
                serde_json::json!({"at": chrono::Utc::now(), "requestId": ctx.request_id, "event": input})
            });
        });
    }

    /// Runs the enrichers bound to the event's resource, in name order. A
    /// failing enricher is skipped (counted): the event goes on as it was.
    pub async fn enrich(
        &self,
        tenant: &str,
        resource: &str,
        kind: &str,
        event: &Value,
    ) -> Enriched {
        let set = match self.set(tenant).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(tenant, error = %e, "cannot load enrichers; events go unenriched");
                return Enriched::Unchanged;
            }
        };
        let enrichers: Vec<Arc<Active>> =
            set.bound(Kind::EventEnricher, resource).cloned().collect();
        if enrichers.is_empty() {
            return Enriched::Unchanged;
        }
        let ctx = Context {
            tenant_id: tenant.to_owned(),
            resource: resource.to_owned(),
            operation: kind.to_owned(),
            actor: event["actor"].as_str().unwrap_or_default().to_owned(),
            request_id: event["correlationid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            config: String::new(),
        };
        let rt = self.runtime.clone();
        let recorder = self.recorder.clone();
        let original = event.clone();
        // Waiting (bounded) counts the tenant as busy, so it gets its share
        // even while others flood the pool; it holds up only this tenant's
        // own enrichment task.
        let Some(slot) = self.slot(tenant, self.settings.slot_wait).await else {
            // No slot within the tenant's share in time: the event waits
            // for the next pass.
            return Enriched::Later;
        };
        // Cloned only when a shadow will run on this event.
        let shadow_ctx = enrichers
            .iter()
            .any(|e| e.shadow().is_some())
            .then(|| ctx.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let _held = slot;
            sandbox::take_queued_tasks();
            let mut current = original.clone();
            let mut touched = Vec::new();
            // Shadows to run after: each on the event its enricher got,
            // beside what the enricher made of it.
            let mut shadows = Vec::new();
            for e in &enrichers {
                let (result, version) =
                    run_enricher(&rt, e, ctx.clone(), &current, &original, recorder.as_ref());
                if let Some(shadow) = e.shadow() {
                    let active = calls::Verdict::of_enriched(&result);
                    shadows.push((shadow, current.clone(), active));
                }
                match result {
                    Ok(Some(next)) => {
                        current = next;
                        touched.push(format!("{}@{version}", e.name));
                    }
                    Ok(None) => {
                        return (Enriched::Dropped, sandbox::take_queued_tasks(), shadows);
                    }
                    Err(_) => {}
                }
            }
            let outcome = if !touched.is_empty() {
                // Which enricher versions made the event (never theirs to say).
                current[ENRICHERS_ATTRIBUTE] = Value::String(touched.join(","));
                Enriched::Replaced(current)
            } else {
                Enriched::Unchanged
            };
            (outcome, sandbox::take_queued_tasks(), shadows)
        })
        .await;
        let Ok((outcome, tasks, shadows)) = outcome else {
            return Enriched::Unchanged;
        };
        if let Some(ctx) = shadow_ctx {
            for (shadow, input, active) in shadows {
                self.shadow_enricher(shadow, ctx.clone(), input, event.clone(), active);
            }
        }
        if tasks.is_empty() {
            return outcome;
        }
        let queue = self.runtime.services().and_then(|s| s.task_queue());
        match queue.map(|q| q.enqueue_plugin_tasks(&tasks)) {
            Some(queued) => match queued.await {
                Ok(()) => outcome,
                Err(e) => {
                    // The event waits: enriched again on the next pass, it
                    // asks for the same tasks (same ids).
                    tracing::warn!(tenant, error = %e, "queuing an enricher's tasks failed; the event waits");
                    Enriched::Later
                }
            },
            None => outcome,
        }
    }

    /// Runs the tenant's webhook transformer `name` on a delivery: the
    /// request to send, None to cancel it, or why it failed (counted, and
    /// its breaker trips on repeated failures like any plugin's).
    pub async fn transform(
        &self,
        tenant: &str,
        name: &str,
        resource: &str,
        event: &Value,
        request: WebhookRequest,
    ) -> Result<Option<WebhookRequest>, String> {
        let set = self
            .set(tenant)
            .await
            .map_err(|e| format!("could not be loaded: {e}"))?;
        let active = set
            .plugins
            .iter()
            .find(|p| p.name == name && p.manifest.kind == Kind::WebhookTransformer)
            .cloned()
            .ok_or_else(|| "is not an active webhook transformer of the tenant".to_owned())?;
        let ctx = Context {
            tenant_id: tenant.to_owned(),
            resource: resource.to_owned(),
            operation: event["type"].as_str().unwrap_or_default().to_owned(),
            actor: event["actor"].as_str().unwrap_or_default().to_owned(),
            request_id: event["id"].as_str().unwrap_or_default().to_owned(),
            config: String::new(),
        };
        let slot = self
            .slot(tenant, self.settings.slot_wait)
            .await
            .ok_or_else(|| Failure::Busy.to_string())?;
        let rt = self.runtime.clone();
        let recorder = self.recorder.clone();
        let text = event.to_string();
        let shadow = active.shadow();
        let shadow_ctx = shadow.as_ref().map(|_| ctx.clone());
        let (outcome, compared) = tokio::task::spawn_blocking(move || {
            let _held = slot;
            let (outcome, ran) = active.call(ctx, |loaded, ctx| {
                rt.transform_observed(loaded, ctx, &text, &request)
            });
            if let Some(Ran {
                report,
                ctx,
                version,
            }) = ran
            {
                active.observed(recorder.as_ref(), &ctx, version, report, outcome.is_err(), || {
                    let event = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let input = serde_json::json!({"event": event, "request": calls::request_json(&request)});
                    (input, calls::Verdict::of_transform(&outcome))
                });
            }
            // What the shadow is compared with, on the same input.
            let compared = shadow_ctx.map(|ctx| {
                (ctx, calls::Verdict::of_transform(&outcome), text, request)
            });
            (outcome, compared)
        })
        .await
        .map_err(|e| e.to_string())?;
        if let (Some(shadow), Some((ctx, active, text, request))) = (shadow, compared) {
            self.run_shadow(shadow, ctx, move |rt, loaded, ctx, stats| {
                let outcome = rt.transform_observed(loaded, ctx, &text, &request).outcome;
                stats.called(outcome.is_err());
                stats.compare(&active, &calls::Verdict::of_transform(&outcome), || {
                    serde_json::json!({"at": chrono::Utc::now(), "eventId": ctx.request_id, "request": calls::request_json(&request)})
                });
            });
        }
        outcome.map_err(|f| f.to_string())
    }

    /// Follows other replicas' plugin changes (`NOTIFY bss_plugins`).
    pub async fn follow_changes(self: Arc<Self>) {
        loop {
            let result: Result<(), sqlx::Error> = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen("bss_plugins").await?;
                // Changes missed while not listening.
                self.invalidate_all();
                loop {
                    match listener.try_recv().await? {
                        Some(n) => self.invalidate(n.payload()),
                        // The connection dropped (sqlx reconnects on the next
                        // call): changes may have been missed meanwhile.
                        None => self.invalidate_all(),
                    }
                }
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "following plugin changes failed; retrying");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Violations a shadow's verdict keeps for the comparison.
const MAX_VIOLATIONS_COMPARED: usize = 100;

/// Bytes of violation text (paths, messages, codes) one response lists.
const RESPONSE_VIOLATION_BYTES: usize = 128 * 1024;

/// How many violations a write's refusal lists: per document, per
/// response, and bytes of their text per response.
#[derive(Debug, Clone, Copy)]
struct Caps {
    per_doc: usize,
    per_response: usize,
    bytes: usize,
}

/// The violations one hook found over a write's documents (with their
/// document's path), and how many more it returned that are left out.
#[derive(Debug, Default)]
struct Found {
    listed: Vec<(String, Violation)>,
    omitted: usize,
    bytes: usize,
    /// Each document's verdict, when a shadow compares them.
    verdicts: Vec<calls::Verdict>,
}

impl Found {
    fn is_empty(&self) -> bool {
        self.listed.is_empty() && self.omitted == 0
    }

    /// Keeps a document's violations while the response caps allow.
    fn add(&mut self, path: &str, refusal: Refusal, caps: Caps) {
        self.omitted += refusal.omitted;
        for v in refusal.violations {
            let size = v.path.len() + v.message.len() + v.code.as_ref().map_or(0, String::len);
            if self.listed.len() < caps.per_response && self.bytes + size <= caps.bytes {
                self.bytes += size;
                self.listed.push((path.to_owned(), v));
            } else {
                self.omitted += 1;
            }
        }
    }

    /// The 422 that lists them, saying how many were left out.
    fn into_error(self, plugin: &str, source: &str) -> ApiError {
        let mut detail = format!("plugin {plugin} refused the record; nothing was stored");
        if self.omitted > 0 {
            let total = self.listed.len() + self.omitted;
            detail.push_str(&format!(
                " ({total} violations: {} listed, {} more left out)",
                self.listed.len(),
                self.omitted
            ));
        }
        let errors = self
            .listed
            .into_iter()
            .map(|(prefix, v)| FieldError {
                path: format!("{prefix}{}", v.path),
                message: v.message,
                source: source.to_owned(),
                record_id: None,
                code: v.code,
            })
            .collect();
        ApiError::unprocessable(detail, errors)
    }
}

/// How one write runs a hook: the call's context and caps, where its log
/// lines and recorded calls go, and which version answers (the active one,
/// or a canary).
struct HookRun {
    ctx: Context,
    caps: Caps,
    recorder: Option<Recorder>,
    hidden: Arc<[Vec<String>]>,
    canary: Option<Arc<trial::Trial>>,
    /// Keep each document's verdict (a shadow compares them).
    verdicts: bool,
}

/// Calls one hook over every document; the violations with their document's
/// path (capped), or the failure that stopped it.
fn run_hook(
    rt: &Runtime,
    hook: &Active,
    docs: &[WriteDoc],
    run: HookRun,
) -> Result<Found, (String, Failure)> {
    let HookRun {
        mut ctx,
        caps,
        recorder,
        hidden,
        canary,
        verdicts,
    } = run;
    let (loaded, version) = match &canary {
        Some(t) => {
            let loaded = t.loaded.as_ref().map_err(|e| {
                t.stats.called(true);
                (String::new(), Failure::Unavailable(e.clone()))
            })?;
            (loaded, t.version)
        }
        None => {
            let loaded = hook
                .ready(&ctx.request_id)
                .map_err(|f| (String::new(), f))?;
            (loaded, hook.version)
        }
    };
    ctx.config.clone_from(&loaded.config);
    let mut found = Found::default();
    for doc in docs {
        let start = Instant::now();
        // Every document is still checked once the response is full: its
        // violations are then only counted.
        let keep = caps
            .per_doc
            .min(caps.per_response.saturating_sub(found.listed.len()));
        let record = &doc.record;
        let Observed { outcome, report } =
            rt.validate_observed(loaded, &ctx, record, doc.previous.as_deref(), keep);
        let took = start.elapsed();
        if verdicts {
            found.verdicts.push(calls::Verdict::of_validation(&outcome));
        }
        hook.observed(
            recorder.as_ref(),
            &ctx,
            version,
            report,
            outcome.is_err(),
            || {
                let redacted = |text: &str| {
                    let mut doc = serde_json::from_str(text).unwrap_or(Value::Null);
                    calls::redact(&mut doc, &hidden);
                    doc
                };
                let input = serde_json::json!({
                    "record": redacted(record),
                    "previous": doc.previous.as_deref().map(redacted),
                });
                (input, calls::Verdict::of_validation(&outcome))
            },
        );
        if let Some(t) = &canary {
            t.stats.called(outcome.is_err());
        }
        match (outcome, &canary) {
            (Ok(Ok(())), None) => hook.stats.succeeded(took, false),
            (Ok(Err(refusal)), c) => {
                if c.is_none() {
                    hook.stats.succeeded(took, true);
                }
                found.add(&doc.path, refusal, caps);
            }
            (Ok(Ok(())), Some(_)) => {}
            (Err(failure), None) => {
                hook.failed(&failure, took, &ctx.request_id);
                return Err((doc.path.clone(), failure));
            }
            (Err(failure), Some(t)) => {
                // Counted in the trial's stats above, never in the breaker.
                hook.warn_failed(t.version, &failure, took, &ctx.request_id);
                return Err((doc.path.clone(), failure));
            }
        }
    }
    Ok(found)
}

/// One enricher over one event: the new event (None: dropped) or why it
/// failed (counted and logged: the event then goes on unchanged), and the
/// version that answered (a canary's, for its share).
fn run_enricher(
    rt: &Runtime,
    enricher: &Active,
    ctx: Context,
    event: &Value,
    original: &Value,
    recorder: Option<&Recorder>,
) -> (Result<Option<Value>, Failure>, i32) {
    let (result, ran) = enricher.call(ctx, |loaded, ctx| {
        enrich_once(rt, loaded, ctx, event, original)
    });
    let Some(Ran {
        report,
        ctx,
        version,
    }) = ran
    else {
        return (result, enricher.version);
    };
    enricher.observed(recorder, &ctx, version, report, result.is_err(), || {
        let verdict = calls::Verdict::of_enriched(&result);
        (serde_json::json!({ "event": event }), verdict)
    });
    (result, version)
}

/// One call of an enricher version: the event it made, checked and with
/// what it may not change (`original`'s fixed attributes) put back.
fn enrich_once(
    rt: &Runtime,
    loaded: &Loaded,
    ctx: &Context,
    event: &Value,
    original: &Value,
) -> Observed<Option<Value>> {
    rt.enrich_observed(loaded, ctx, &event.to_string())
        .and_then(|out| match out {
            None => Ok(None),
            // Kept well under a broker's message size limit.
            Some(text) if text.len() > ENRICHED_EVENT_MAX => Err(Failure::Output {
                size: text.len(),
                limit: ENRICHED_EVENT_MAX,
            }),
            Some(text) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(mut map)) => {
                    restore(&mut map, original, &FIXED_ATTRIBUTES);
                    match (map.get_mut("data"), original.get("data")) {
                        (Some(Value::Object(data)), Some(was)) => restore(data, was, &FIXED_DATA),
                        (_, Some(was)) => {
                            map.insert("data".into(), was.clone());
                        }
                        _ => {}
                    }
                    Ok(Some(Value::Object(map)))
                }
                Ok(_) => Err(Failure::Invalid("the event must be a JSON object".into())),
                Err(e) => Err(Failure::Invalid(format!("the event is not JSON: {e}"))),
            },
        })
}
