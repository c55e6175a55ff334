//! The sandbox runtime: one wasmtime engine (Cranelift, pooling allocator,
//! epoch interruption always on, fuel metering available), one linker
//! granting WASI with nothing in it plus the `host` interface, compiled
//! components cached by sha256 in memory and on disk, and one call = one
//! fresh store with the plugin's limits.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
};

use super::bindings::enricher::EventEnricherPre;
use super::bindings::transformer::WebhookTransformerPre;
use super::bindings::validation::{ValidationHook, ValidationHookPre};
use super::bindings::{Context, Violation, WebhookRequest};
use super::manifest::{Kind, Limits};
use super::sandbox::{self, CallState, Caller, HostStop};
use crate::services::PlatformServices;

/// How often the epoch advances: the resolution of deadlines.
const TICK: Duration = Duration::from_millis(1);
/// Bytes of each memory and table kept resident between calls.
const KEEP_RESIDENT: usize = 4 << 20;
/// Calls that may run at once (pool slots).
const POOL_INSTANCES: u32 = 256;

/// Why a call produced no answer. Each names the limit it hit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("ran past its deadline of {deadline_ms} ms")]
    Deadline { deadline_ms: u64 },
    #[error("used up its fuel budget of {fuel} instructions")]
    Fuel { fuel: u64 },
    #[error("hit its memory limit of {memory_mib} MiB")]
    Memory { memory_mib: u64 },
    #[error("returned {size} bytes, more than its output limit of {limit} bytes")]
    Output { size: usize, limit: usize },
    #[error("overflowed its stack (deep recursion)")]
    Stack,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned something the host cannot use: {0}")]
    Invalid(String),
    #[error("is tripped after repeated failures; calls resume in {0} s")]
    Tripped(u64),
    #[error("could not be started: {0}")]
    Unavailable(String),
    /// Every call slot (of the host, or of the tenant) is taken.
    #[error("could not run: too many plugin calls at once")]
    Busy,
}

impl Failure {
    /// A stable label for metrics and the API.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Deadline { .. } => "deadline",
            Self::Fuel { .. } => "fuel",
            Self::Memory { .. } => "memory",
            Self::Output { .. } => "output",
            Self::Stack => "stack",
            Self::Trap(_) => "trap",
            Self::Invalid(_) => "invalid",
            Self::Tripped(_) => "tripped",
            Self::Unavailable(_) => "unavailable",
            Self::Busy => "busy",
        }
    }
}

/// Why an upload cannot become a plugin (shown to the uploader).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    NotAComponent(String),
    #[error("{0}")]
    WrongWorld(String),
}

/// A plugin version ready to call: its world's pre-instantiation.
#[derive(Clone)]
pub struct Loaded {
    pre: Pre,
    pub limits: Limits,
    pub config: String,
    pub caller: Arc<Caller>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("caller", &self.caller)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Pre {
    Validation(ValidationHookPre<CallState>),
    Enricher(EventEnricherPre<CallState>),
    Transformer(WebhookTransformerPre<CallState>),
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    compiled: Mutex<HashMap<String, Component>>,
    disk: DiskCache,
    services: Option<Arc<PlatformServices>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache", &self.disk.dir)
            .finish_non_exhaustive()
    }
}

/// The process's one engine, and the thread that advances its epoch. One
/// engine, one pool of instance slots and one ticker, however many
/// applications run in the process (the tests run dozens).
fn shared_engine() -> anyhow::Result<Engine> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let engine = Engine::new(&engine_config()).map_err(|e| e.to_string())?;
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(engine)
    });
    engine
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot create the plugin engine: {e}"))
}

/// The engine configuration every artifact is compiled for.
fn engine_config() -> Config {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(POOL_INSTANCES)
        .total_core_instances(POOL_INSTANCES * 8)
        .total_memories(POOL_INSTANCES * 2)
        .total_tables(POOL_INSTANCES * 4)
        .max_memory_size(64 << 20)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .max_core_instances_per_component(32)
        // Reset a slot's memory and tables by rewriting the pages a call
        // dirtied (found with PAGEMAP_SCAN where the kernel has it) instead
        // of unmapping them: the next call does not fault them in again.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(Enabled::Auto);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .consume_fuel(true)
        .max_wasm_stack(512 * 1024)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

impl Runtime {
    /// A runtime on the process's engine. `cache_dir` keeps compiled
    /// artifacts across restarts.
    pub fn new(cache_dir: &Path, services: Option<Arc<PlatformServices>>) -> anyhow::Result<Self> {
        let engine = shared_engine()?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI: {e}"))?;
        sandbox::bound_blocking_calls(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI poll: {e}"))?;
        ValidationHook::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the host interface: {e}"))?;
        let disk = DiskCache::open(cache_dir, &engine)?;
        Ok(Self {
            engine,
            linker,
            compiled: Mutex::new(HashMap::new()),
            disk,
            services,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles an upload and checks that it is a component of `kind`'s
    /// world whose imports the host provides. Never deserializes it.
    /// Returns its sha256 (hex).
    pub fn compile_upload(&self, bytes: &[u8], kind: Kind) -> Result<String, UploadError> {
        if Engine::detect_precompiled(bytes).is_some() {
            return Err(UploadError::NotAComponent(
                "this is a precompiled artifact; upload the component (.wasm) itself".into(),
            ));
        }
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {
                return Err(UploadError::NotAComponent(
                    "this is a core WebAssembly module, not a component; build the plugin with \
                     `cargo build --target wasm32-wasip2 --release` (or wrap it with \
                     `wasm-tools component new`)"
                        .into(),
                ));
            }
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => {
                return Err(UploadError::NotAComponent(
                    "this is not WebAssembly (no \\0asm header); upload the .wasm component the build produced"
                        .into(),
                ));
            }
        }
        let sha = sha256_hex(bytes);
        let component = Component::new(&self.engine, bytes).map_err(|e| {
            UploadError::NotAComponent(format!("the component does not compile: {e}"))
        })?;
        self.pre(&component, kind)?;
        self.disk.store(&sha, &component);
        self.remember(&sha, component);
        Ok(sha)
    }

    fn remember(&self, sha: &str, component: Component) {
        self.compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.to_owned(), component);
    }

    /// The compiled component with this sha256, from memory or from the
    /// disk cache (a restart does not recompile).
    pub fn cached(&self, sha: &str) -> Option<Component> {
        if let Some(c) = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha)
        {
            return Some(c.clone());
        }
        let c = self.disk.load(sha, &self.engine)?;
        self.remember(sha, c.clone());
        Some(c)
    }

    /// Compiles a stored module that is in neither cache, and caches it.
    pub fn compile_stored(&self, sha: &str, bytes: &[u8]) -> anyhow::Result<Component> {
        anyhow::ensure!(
            sha256_hex(bytes) == sha,
            "the stored module does not match its sha256"
        );
        let c = Component::new(&self.engine, bytes)
            .map_err(|e| anyhow::anyhow!("the stored plugin does not compile: {e}"))?;
        self.disk.store(sha, &c);
        self.remember(sha, c.clone());
        Ok(c)
    }

    fn pre(&self, component: &Component, kind: Kind) -> Result<Pre, UploadError> {
        let pre = self.linker.instantiate_pre(component).map_err(|e| {
            UploadError::WrongWorld(format!(
                "the component imports something the host does not provide (only WASI and \
                 bss:plugin/host@0.1.0 are available): {e}"
            ))
        })?;
        let wrong = |e: wasmtime::Error| {
            UploadError::WrongWorld(format!(
                "the component does not implement the {} world of bss:plugin@0.1.0: {e}",
                kind.as_str()
            ))
        };
        Ok(match kind {
            Kind::ValidationHook => Pre::Validation(ValidationHookPre::new(pre).map_err(wrong)?),
            Kind::EventEnricher => Pre::Enricher(EventEnricherPre::new(pre).map_err(wrong)?),
            Kind::WebhookTransformer => {
                Pre::Transformer(WebhookTransformerPre::new(pre).map_err(wrong)?)
            }
        })
    }

    /// A plugin version ready to call.
    pub fn load(
        &self,
        component: &Component,
        kind: Kind,
        limits: Limits,
        config: String,
        caller: Caller,
    ) -> anyhow::Result<Loaded> {
        let pre = self
            .pre(component, kind)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Loaded {
            pre,
            limits,
            config,
            caller: Arc::new(caller),
        })
    }

    /// Runs `f` in a fresh store with the plugin's limits.
    fn run<R>(
        &self,
        plugin: &Loaded,
        f: impl FnOnce(&mut Store<CallState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let limits = &plugin.limits;
        let state = CallState::new(plugin.caller.clone(), limits, self.services.clone());
        let mut store = Store::new(&self.engine, state);
        sandbox::limit(&mut store);
        store.set_epoch_deadline(limits.deadline_ms.div_ceil(TICK.as_millis() as u64) + 1);
        store.epoch_deadline_trap();
        store
            .set_fuel(limits.fuel.unwrap_or(u64::MAX))
            .map_err(|e| Failure::Unavailable(e.to_string()))?;
        f(&mut store).map_err(|e| classify(&e, store.data(), limits))
    }

    /// Calls a validation hook.
    pub fn validate(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        record: &str,
        previous: Option<&str>,
    ) -> Result<Result<(), Vec<Violation>>, Failure> {
        let Pre::Validation(pre) = &plugin.pre else {
            return Err(Failure::Unavailable("not a validation hook".into()));
        };
        let out = self.run(plugin, |store| {
            pre.instantiate(&mut *store)?
                .call_validate(&mut *store, ctx, record, previous)
        })?;
        if let Err(violations) = &out {
            let size: usize = violations
                .iter()
                .map(|v| v.path.len() + v.message.len() + v.code.as_ref().map_or(0, String::len))
                .sum();
            check_output(size, &plugin.limits)?;
        }
        Ok(out)
    }

    /// Calls an event enricher: the new event, or None to drop it.
    pub fn enrich(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        event: &str,
    ) -> Result<Option<String>, Failure> {
        let Pre::Enricher(pre) = &plugin.pre else {
            return Err(Failure::Unavailable("not an event enricher".into()));
        };
        let out = self.run(plugin, |store| {
            pre.instantiate(&mut *store)?
                .call_enrich(&mut *store, ctx, event)
        })?;
        if let Some(e) = &out {
            check_output(e.len(), &plugin.limits)?;
        }
        Ok(out)
    }

    /// Calls a webhook transformer: the request to send, or None to cancel.
    pub fn transform(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        event: &str,
        request: &WebhookRequest,
    ) -> Result<Option<WebhookRequest>, Failure> {
        let Pre::Transformer(pre) = &plugin.pre else {
            return Err(Failure::Unavailable("not a webhook transformer".into()));
        };
        let out = self.run(plugin, |store| {
            pre.instantiate(&mut *store)?
                .call_transform(&mut *store, ctx, event, request)
        })?;
        if let Some(r) = &out {
            let size = r.body.len()
                + r.path.len()
                + r.method.len()
                + r.headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            check_output(size, &plugin.limits)?;
        }
        Ok(out)
    }
}

fn check_output(size: usize, limits: &Limits) -> Result<(), Failure> {
    if size > limits.output_bytes {
        return Err(Failure::Output {
            size,
            limit: limits.output_bytes,
        });
    }
    Ok(())
}

/// Names the limit a failed call hit.
fn classify(e: &wasmtime::Error, state: &CallState, limits: &Limits) -> Failure {
    if state.memory_hit() {
        return Failure::Memory {
            memory_mib: limits.memory_mib,
        };
    }
    if let Some(stop) = e.downcast_ref::<HostStop>() {
        return match stop {
            HostStop::Memory => Failure::Memory {
                memory_mib: limits.memory_mib,
            },
            HostStop::HostCallDeadline => Failure::Deadline {
                deadline_ms: limits.deadline_ms,
            },
            HostStop::HostCallTooLarge => Failure::Output {
                size: limits.output_bytes + 1,
                limit: limits.output_bytes,
            },
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::Deadline {
            deadline_ms: limits.deadline_ms,
        },
        Some(Trap::OutOfFuel) => Failure::Fuel {
            fuel: limits.fuel.unwrap_or(u64::MAX),
        },
        Some(Trap::StackOverflow) => Failure::Stack,
        Some(trap) => Failure::Trap(trap.to_string()),
        None => {
            let text = format!("{e}");
            if text.contains("concurrent") && text.contains("limit") {
                Failure::Busy
            } else {
                Failure::Trap(text)
            }
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compiled artifacts on disk, `<sha256>.cwasm`, each sealed with an HMAC
/// under a key only this installation has (`.key`, created 0600) over the
/// engine's compatibility hash, the sha256 and the artifact. A file that
/// does not verify is never deserialized: the plugin is compiled again.
struct DiskCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_id: u64,
}

type Seal = Hmac<Sha256>;

impl DiskCache {
    fn open(dir: &Path, engine: &Engine) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let key_path = dir.join(".key");
        let key = match std::fs::read(&key_path) {
            Ok(k) if k.len() == 32 => k,
            _ => {
                // Written aside and renamed: a reader never sees half a key.
                let k: [u8; 32] = rand::random();
                let tmp = dir.join(format!(".key.{}.tmp", std::process::id()));
                write_private(&tmp, &k)?;
                std::fs::rename(&tmp, &key_path)?;
                std::fs::read(&key_path)?
            }
        };
        anyhow::ensure!(key.len() == 32, "the plugin cache key is damaged");
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let mut fixed = [0u8; 32];
        fixed.copy_from_slice(&key);
        Ok(Self {
            dir: dir.to_owned(),
            key: fixed,
            engine_id: hasher.finish(),
        })
    }

    fn seal(&self, sha: &str, artifact: &[u8]) -> Seal {
        let mut mac = Seal::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(&self.engine_id.to_le_bytes());
        mac.update(sha.as_bytes());
        mac.update(artifact);
        mac
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.cwasm"))
    }

    fn store(&self, sha: &str, component: &Component) {
        let Ok(artifact) = component.serialize() else {
            return;
        };
        let tag = self.seal(sha, &artifact).finalize().into_bytes();
        let mut file = Vec::with_capacity(tag.len() + artifact.len());
        file.extend_from_slice(&tag);
        file.extend_from_slice(&artifact);
        let tmp = self.dir.join(format!(".{sha}.{}.tmp", std::process::id()));
        let written =
            write_private(&tmp, &file).and_then(|()| std::fs::rename(&tmp, self.path(sha)));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write the plugin cache; plugins will be recompiled after a restart");
            let _ = std::fs::remove_file(&tmp);
        }
    }

    fn load(&self, sha: &str, engine: &Engine) -> Option<Component> {
        let file = std::fs::read(self.path(sha)).ok()?;
        if file.len() < 32 {
            return None;
        }
        let (tag, artifact) = file.split_at(32);
        if self.seal(sha, artifact).verify_slice(tag).is_err() {
            tracing::warn!(
                sha,
                "a cached plugin artifact does not verify; compiling again"
            );
            return None;
        }
        // SAFETY: the artifact verified under this installation's key, so
        // this host serialized it with an engine of the same configuration
        // (wasmtime checks that too); bytes a tenant sent never get here.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, artifact) };
        component.ok()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}
