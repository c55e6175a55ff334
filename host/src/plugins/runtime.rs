//! The sandbox runtime: one wasmtime engine (Cranelift, pooling allocator,
//! epoch interruption always on, fuel metering available), one linker
//! granting WASI with nothing in it plus the `host` interface, compiled
//! components cached by sha256 in memory (a bounded LRU) and on disk
//! (pruned, oldest first, past its size), and one call = one fresh store
//! with the plugin's limits.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
use super::refusal::{self, Capped};
use super::sandbox::{self, CallState, Caller, HostStop};
use crate::services::PlatformServices;

/// How often the epoch advances: the resolution of deadlines.
const TICK: Duration = Duration::from_millis(1);
/// Bytes of each memory and table kept resident between calls.
const KEEP_RESIDENT: usize = 4 << 20;
/// Calls that may run at once (pool slots) unless the settings say.
pub const POOL_INSTANCES: u32 = 256;
/// Compiled components kept in memory, and bytes of them on disk, unless
/// the settings say.
const MEMORY_CACHE_ENTRIES: usize = 64;
const DISK_CACHE_BYTES: u64 = 512 << 20;
/// Violations kept from one call when the caller names no cap.
const MAX_VIOLATIONS: usize = 100;
/// Guest stacks (Rust's shadow stack, placed first in linear memory by
/// `wasm-ld --stack-first`) are at most this large: an access this close
/// below the 4 GiB end of the 32-bit address space is a stack pointer that
/// went below address 0.
const GUEST_STACK_MAX: u64 = 8 << 20;
/// Innermost frames that, all calls of one or two functions, make an
/// out-of-bounds access a shadow-stack overflow (see `deep_in_recursion`).
const RECURSION_FRAMES: usize = 16;

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
    /// The guest's stack overflowed: wasmtime's own limit, or (Rust and C
    /// guests) the shadow stack at the bottom of linear memory ran below
    /// address 0.
    #[error(
        "overflowed its stack (too deep a recursion, or too large locals): recurse less deeply, \
         move large values to the heap, or link with a larger stack (`-C link-arg=-zstack-size=…`)"
    )]
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

    /// The limit the call hit, as `name=value` (empty when it hit none).
    pub fn limit(&self) -> String {
        match self {
            Self::Deadline { deadline_ms } => format!("deadline_ms={deadline_ms}"),
            Self::Fuel { fuel } => format!("fuel={fuel}"),
            Self::Memory { memory_mib } => format!("memory_mib={memory_mib}"),
            Self::Output { limit, .. } => format!("output_bytes={limit}"),
            Self::Stack => "stack".into(),
            _ => String::new(),
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

/// A validation hook's refusal: the violations kept (at most the cap, in
/// the order returned) and how many more it returned, left out unread.
#[derive(Debug, Default)]
pub struct Refusal {
    pub violations: Vec<Violation>,
    pub omitted: usize,
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<CallState>,
    compiled: MemoryCache,
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

/// The process's engine for a pool of `instances` slots, and the thread
/// that advances its epoch. One engine, one pool and one ticker per pool
/// size, however many applications run in the process (the tests run
/// dozens; a server runs one).
fn shared_engine(instances: u32) -> anyhow::Result<Engine> {
    static ENGINES: OnceLock<Mutex<HashMap<u32, Engine>>> = OnceLock::new();
    let mut engines = ENGINES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(engine) = engines.get(&instances) {
        return Ok(engine.clone());
    }
    let engine = Engine::new(&engine_config(instances))
        .map_err(|e| anyhow::anyhow!("cannot create the plugin engine: {e}"))?;
    let ticking = engine.clone();
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TICK);
                ticking.increment_epoch();
            }
        })?;
    engines.insert(instances, engine.clone());
    Ok(engine)
}

/// The engine configuration every artifact is compiled for.
fn engine_config(instances: u32) -> Config {
    let instances = instances.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(4))
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

/// How many calls a runtime's engine runs at once and how much compiled
/// code it keeps (`plugin_max_concurrent_calls`,
/// `plugin_memory_cache_entries`, `plugin_disk_cache_mib`).
#[derive(Debug, Clone, Copy)]
pub struct RuntimeBounds {
    pub instances: u32,
    pub memory_cache_entries: usize,
    pub disk_cache_bytes: u64,
}

impl Default for RuntimeBounds {
    fn default() -> Self {
        Self {
            instances: POOL_INSTANCES,
            memory_cache_entries: MEMORY_CACHE_ENTRIES,
            disk_cache_bytes: DISK_CACHE_BYTES,
        }
    }
}

impl Runtime {
    /// A runtime on the process's engine with the default bounds.
    /// `cache_dir` keeps compiled artifacts across restarts.
    pub fn new(cache_dir: &Path, services: Option<Arc<PlatformServices>>) -> anyhow::Result<Self> {
        Self::with_bounds(cache_dir, services, RuntimeBounds::default())
    }

    /// A runtime whose engine pool has `bounds.instances` slots.
    pub fn with_bounds(
        cache_dir: &Path,
        services: Option<Arc<PlatformServices>>,
        bounds: RuntimeBounds,
    ) -> anyhow::Result<Self> {
        let engine = shared_engine(bounds.instances)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI: {e}"))?;
        sandbox::bound_blocking_calls(&mut linker)
            .map_err(|e| anyhow::anyhow!("cannot link WASI poll: {e}"))?;
        ValidationHook::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the host interface: {e}"))?;
        let disk = DiskCache::open(cache_dir, &engine)?;
        let runtime = Self {
            engine,
            linker,
            compiled: MemoryCache::default(),
            disk,
            services,
        };
        runtime.bound_caches(bounds.memory_cache_entries, bounds.disk_cache_bytes);
        Ok(runtime)
    }

    /// Caps the compiled-component caches: entries kept in memory (least
    /// recently used go first) and bytes on disk (oldest go first).
    pub fn bound_caches(&self, memory_entries: usize, disk_bytes: u64) {
        self.compiled
            .capacity
            .store(memory_entries.max(1), Ordering::Relaxed);
        self.disk.max_bytes.store(disk_bytes, Ordering::Relaxed);
        self.compiled.trim();
        self.disk.prune();
    }

    /// Drops a module's compiled artifact from both caches (no stored
    /// version uses it any more). A tenant that still has it loaded keeps
    /// its own reference until it reloads.
    pub fn forget(&self, sha: &str) {
        self.compiled.lock().remove(sha);
        let _ = std::fs::remove_file(self.disk.path(sha));
    }

    /// Compiled components held in memory now.
    pub fn cached_in_memory(&self) -> usize {
        self.compiled.len()
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
        self.compiled.insert(sha, component);
    }

    /// The compiled component with this sha256, from memory or from the
    /// disk cache (a restart does not recompile).
    pub fn cached(&self, sha: &str) -> Option<Component> {
        if let Some(c) = self.compiled.get(sha) {
            return Some(c);
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

    /// Runs `f` in a fresh store with the plugin's limits: its outcome,
    /// and what the call cost and logged.
    fn run<R>(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        f: impl FnOnce(&mut Store<CallState>) -> wasmtime::Result<R>,
    ) -> Observed<R> {
        let start = Instant::now();
        let limits = &plugin.limits;
        let state = CallState::new(
            plugin.caller.clone(),
            limits,
            self.services.clone(),
            &ctx.request_id,
        );
        let mut store = Store::new(&self.engine, state);
        sandbox::limit(&mut store);
        store.set_epoch_deadline(limits.deadline_ms.div_ceil(TICK.as_millis() as u64) + 1);
        store.epoch_deadline_trap();
        let fuel = limits.fuel.unwrap_or(u64::MAX);
        if let Err(e) = store.set_fuel(fuel) {
            return Observed {
                outcome: Err(Failure::Unavailable(e.to_string())),
                report: Report::default(),
            };
        }
        let outcome = match f(&mut store) {
            Ok(out) => {
                store.data_mut().keep_queued_tasks();
                Ok(out)
            }
            Err(e) => Err(explained(classify(&e, store.data(), limits), store.data())),
        };
        let fuel_used = fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let mut state = store.into_data();
        let (logs, logs_dropped) = state.take_logs();
        let report = Report {
            took: start.elapsed(),
            fuel_used,
            memory_peak: state.memory_peak(),
            logs,
            logs_dropped,
            stderr: state.stderr(),
        };
        Observed { outcome, report }
    }

    /// The platform services plugins reach (and the task queue).
    pub fn services(&self) -> Option<&Arc<PlatformServices>> {
        self.services.as_ref()
    }

    /// Calls a validation hook (keeping at most 100 violations).
    pub fn validate(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        record: &str,
        previous: Option<&str>,
    ) -> Result<Result<(), Vec<Violation>>, Failure> {
        let out = self.validate_capped(plugin, ctx, record, previous, MAX_VIOLATIONS)?;
        Ok(out.map_err(|r| r.violations))
    }

    /// Calls a validation hook. Only the first `keep` violations are read
    /// out of the guest (the rest are counted, never copied into the host),
    /// and those, strings and structure, count against the output limit.
    pub fn validate_capped(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        record: &str,
        previous: Option<&str>,
        keep: usize,
    ) -> Result<Result<(), Refusal>, Failure> {
        self.validate_observed(plugin, ctx, record, previous, keep)
            .outcome
    }

    /// [`Runtime::validate_capped`], with what the call cost and logged.
    pub fn validate_observed(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        record: &str,
        previous: Option<&str>,
        keep: usize,
    ) -> Observed<Result<(), Refusal>> {
        let Pre::Validation(pre) = &plugin.pre else {
            return Observed::failed(Failure::Unavailable("not a validation hook".into()));
        };
        type Params<'a> = (&'a Context, &'a str, Option<&'a str>);
        type Answer = (Result<(), Capped>,);
        let limit = plugin.limits.output_bytes;
        self.run(plugin, ctx, |store| {
            let instance = pre.instance_pre().instantiate(&mut *store)?;
            let validate =
                instance.get_typed_func::<Params<'_>, Answer>(&mut *store, "validate")?;
            // The refusal is lifted inside the call, with these caps.
            refusal::set_caps(keep, limit);
            Ok(validate.call(&mut *store, (ctx, record, previous))?.0)
        })
        .and_then(|out| match out {
            Ok(()) => Ok(Ok(())),
            Err(Capped {
                oversize: Some(size),
                ..
            }) => Err(Failure::Output { size, limit }),
            Err(capped) => Ok(Err(Refusal {
                violations: capped.violations,
                omitted: capped.omitted,
            })),
        })
    }

    /// Calls an event enricher: the new event, or None to drop it.
    pub fn enrich(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        event: &str,
    ) -> Result<Option<String>, Failure> {
        self.enrich_observed(plugin, ctx, event).outcome
    }

    /// [`Runtime::enrich`], with what the call cost and logged.
    pub fn enrich_observed(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        event: &str,
    ) -> Observed<Option<String>> {
        let Pre::Enricher(pre) = &plugin.pre else {
            return Observed::failed(Failure::Unavailable("not an event enricher".into()));
        };
        self.run(plugin, ctx, |store| {
            pre.instantiate(&mut *store)?
                .call_enrich(&mut *store, ctx, event)
        })
        .and_then(|out| {
            if let Some(e) = &out {
                check_output(e.len(), &plugin.limits)?;
            }
            Ok(out)
        })
    }

    /// Calls a webhook transformer: the request to send, or None to cancel.
    pub fn transform(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        event: &str,
        request: &WebhookRequest,
    ) -> Result<Option<WebhookRequest>, Failure> {
        self.transform_observed(plugin, ctx, event, request).outcome
    }

    /// [`Runtime::transform`], with what the call cost and logged.
    pub fn transform_observed(
        &self,
        plugin: &Loaded,
        ctx: &Context,
        event: &str,
        request: &WebhookRequest,
    ) -> Observed<Option<WebhookRequest>> {
        let Pre::Transformer(pre) = &plugin.pre else {
            return Observed::failed(Failure::Unavailable("not a webhook transformer".into()));
        };
        self.run(plugin, ctx, |store| {
            pre.instantiate(&mut *store)?
                .call_transform(&mut *store, ctx, event, request)
        })
        .and_then(|out| {
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
        })
    }
}

/// What one call cost and said: for `bss plugin run` and recorded calls.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub took: Duration,
    /// Instructions (fuel units) the call used.
    pub fuel_used: u64,
    /// Bytes of linear memory at the call's largest.
    pub memory_peak: usize,
    pub logs: Vec<sandbox::LogLine>,
    /// Log lines past the call's budget, dropped.
    pub logs_dropped: u32,
    /// What the guest wrote to stderr (bounded).
    pub stderr: String,
}

/// A call's outcome with its [`Report`].
#[derive(Debug)]
pub struct Observed<T> {
    pub outcome: Result<T, Failure>,
    pub report: Report,
}

impl<T> Observed<T> {
    pub fn failed(failure: Failure) -> Self {
        Self {
            outcome: Err(failure),
            report: Report::default(),
        }
    }

    /// Checks or converts a successful outcome; the report stays.
    pub fn and_then<U>(self, f: impl FnOnce(T) -> Result<U, Failure>) -> Observed<U> {
        Observed {
            outcome: self.outcome.and_then(f),
            report: self.report,
        }
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

/// A trap with what the guest said on stderr before it (a Rust panic's
/// message and location: `panicked at src/lib.rs:12:5: …`).
fn explained(failure: Failure, state: &CallState) -> Failure {
    match failure {
        Failure::Trap(trap) => {
            let said = state.stderr();
            if said.is_empty() {
                Failure::Trap(trap)
            } else {
                Failure::Trap(format!("{trap}; the plugin wrote to stderr: {said}"))
            }
        }
        other => other,
    }
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
        Some(Trap::MemoryOutOfBounds) if below_address_zero(e) || deep_in_recursion(e) => {
            Failure::Stack
        }
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

/// Whether an out-of-bounds access was just below the end of the 32-bit
/// address space: a stack pointer that ran below address 0. Rust (and C)
/// guests keep their own stack at the bottom of linear memory
/// (`--stack-first`) and grow it downwards, so deep recursion ends in such
/// an access, never in wasmtime's own stack limit. Wasmtime names the
/// faulting address in the error's context ("memory fault at wasm address
/// 0x…"); ordinary stray pointers land just above the memory's size, or
/// anywhere, not within a stack's size of 4 GiB.
fn below_address_zero(e: &wasmtime::Error) -> bool {
    const MARK: &str = "memory fault at wasm address 0x";
    e.chain().any(|cause| {
        let text = cause.to_string();
        let Some(at) = text.find(MARK) else {
            return false;
        };
        let hex: String = text[at + MARK.len()..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        u64::from_str_radix(&hex, 16).is_ok_and(|addr| {
            (1u64 << 32).saturating_sub(GUEST_STACK_MAX) <= addr && addr < (1u64 << 32) + (1 << 16)
        })
    })
}

/// Whether an out-of-bounds access happened deep inside a recursion: the
/// innermost `RECURSION_FRAMES` frames of the trap's backtrace are calls of
/// one function (or two, calling each other). When the access is made by
/// the host on the guest's behalf (`memory.fill` zeroing a large local, a
/// `memory.copy`) there is no faulting address to look at, but the guest's
/// own stack pointer ran below address 0 all the same; an ordinary stray
/// pointer is not found at the bottom of a 16-deep self-recursion.
fn deep_in_recursion(e: &wasmtime::Error) -> bool {
    let Some(trace) = e.downcast_ref::<wasmtime::WasmBacktrace>() else {
        return false;
    };
    let frames = trace.frames();
    if frames.len() < RECURSION_FRAMES {
        return false;
    }
    let mut funcs: Vec<u32> = frames[..RECURSION_FRAMES]
        .iter()
        .map(|f| f.func_index())
        .collect();
    funcs.sort_unstable();
    funcs.dedup();
    funcs.len() <= 2
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compiled components by sha256, at most `capacity`, the least recently
/// used dropped first. A component still loaded by a tenant stays alive
/// through that tenant's `Loaded`; the cache only stops holding it.
#[derive(Default)]
struct MemoryCache {
    capacity: AtomicUsize,
    entries: Mutex<HashMap<String, (Component, u64)>>,
    clock: AtomicU64,
}

impl MemoryCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Component, u64)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn get(&self, sha: &str) -> Option<Component> {
        let now = self.tick();
        let mut entries = self.lock();
        let (component, used) = entries.get_mut(sha)?;
        *used = now;
        Some(component.clone())
    }

    fn insert(&self, sha: &str, component: Component) {
        let now = self.tick();
        self.lock().insert(sha.to_owned(), (component, now));
        self.trim();
    }

    fn trim(&self) {
        let capacity = self.capacity.load(Ordering::Relaxed).max(1);
        let mut entries = self.lock();
        while entries.len() > capacity {
            let oldest = entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(sha, _)| sha.clone());
            match oldest {
                Some(sha) => entries.remove(&sha),
                None => break,
            };
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Compiled artifacts on disk, `<sha256>.cwasm`, each sealed with an HMAC
/// under a key only this installation has (`.key`, created 0600) over the
/// engine's compatibility hash, the sha256 and the artifact. A file that
/// does not verify is never deserialized: the plugin is compiled again.
/// Past `max_bytes` of artifacts, the oldest files are deleted (an
/// artifact whose version is pruned or deleted goes at once).
struct DiskCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_id: u64,
    max_bytes: AtomicU64,
}

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
            max_bytes: AtomicU64::new(DISK_CACHE_BYTES),
        })
    }

    /// The artifact's tag: BLAKE3 in keyed mode (a MAC) under the cache's
    /// key, over the engine, the module's sha256 and the artifact. Checked
    /// on every load from disk, so it is on the first call after a
    /// restart: measured on a 466 KB artifact, HMAC-SHA256 (SHA-NI) took
    /// about 330 µs of a 700 µs load; BLAKE3 (AVX-512/AVX2) a fraction.
    fn seal(&self, sha: &str, artifact: &[u8]) -> blake3::Hash {
        let mut mac = blake3::Hasher::new_keyed(&self.key);
        mac.update(&self.engine_id.to_le_bytes());
        mac.update(sha.as_bytes());
        mac.update(artifact);
        mac.finalize()
    }

    /// Named for the tag's kind: artifacts tagged another way (by an
    /// earlier version) are never read, only pruned.
    fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.b3.cwasm"))
    }

    fn store(&self, sha: &str, component: &Component) {
        let Ok(artifact) = component.serialize() else {
            return;
        };
        let tag = self.seal(sha, &artifact);
        let tag = tag.as_bytes();
        let mut file = Vec::with_capacity(tag.len() + artifact.len());
        file.extend_from_slice(tag);
        file.extend_from_slice(&artifact);
        let tmp = self.dir.join(format!(".{sha}.{}.tmp", std::process::id()));
        let written =
            write_private(&tmp, &file).and_then(|()| std::fs::rename(&tmp, self.path(sha)));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write the plugin cache; plugins will be recompiled after a restart");
            let _ = std::fs::remove_file(&tmp);
        }
        self.prune();
    }

    /// The cached artifacts, oldest first, with their sizes.
    fn artifacts(&self) -> Vec<(PathBuf, u64)> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut files: Vec<(PathBuf, u64, std::time::SystemTime)> = dir
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((e.path(), meta.len(), meta.modified().ok()?))
            })
            .collect();
        files.sort_by_key(|(_, _, modified)| *modified);
        files.into_iter().map(|(p, len, _)| (p, len)).collect()
    }

    /// Deletes the oldest artifacts until the rest fit in `max_bytes`.
    fn prune(&self) {
        let max = self.max_bytes.load(Ordering::Relaxed);
        let files = self.artifacts();
        let mut total: u64 = files.iter().map(|(_, len)| len).sum();
        for (path, len) in files {
            if total <= max {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
            }
        }
    }

    fn load(&self, sha: &str, engine: &Engine) -> Option<Component> {
        let file = std::fs::read(self.path(sha)).ok()?;
        if file.len() < 32 {
            return None;
        }
        let (tag, artifact) = file.split_at(32);
        // `blake3::Hash` compares in constant time.
        if self.seal(sha, artifact) != blake3::Hash::from_slice(tag).ok()? {
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
