//! What one plugin call runs in: the store's data (an empty WASI context, a
//! resource limiter, the host functions' view of the call) and the host
//! functions themselves. A store lives for exactly one call.

use std::time::Instant;

use serde_json::Value;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_io::poll::DynPollable;

use super::bindings::Level;
use super::bindings::validation::bss::plugin::{host, types};
use super::manifest::Limits;
use crate::services::PlatformServices;

/// Messages one call may log; the rest are dropped and counted.
const LOG_BUDGET: u32 = 32;
/// Longest logged message (longer ones are cut).
const LOG_MESSAGE_MAX: usize = 2048;

/// Why the host stopped a call (raised as a trap from inside the host).
#[derive(Debug, thiserror::Error)]
pub enum HostStop {
    #[error("linear memory limit reached")]
    Memory,
    #[error("the call's deadline passed during a host call")]
    HostCallDeadline,
    #[error("a host call argument is larger than the output limit")]
    HostCallTooLarge,
}

/// Who is calling, for logs and `forward`.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    pub plugin: String,
    pub version: i32,
    pub services: Vec<String>,
    /// Its tasks go to the durable queue (an enricher's: its event is
    /// committed, so the task must not be lost), instead of the Task
    /// Execution Service being asked during the call (a hook's: the write
    /// waits for the answer, and fails if it must).
    pub queues_tasks: bool,
}

/// One line a plugin logged during a call.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub level: Level,
    pub message: String,
}

/// A log level's name, as the API and the CLI show it.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Trace => "trace",
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

pub struct CallState {
    wasi: WasiCtx,
    /// The request (or correlation) id the call serves, on every log line.
    request_id: String,
    /// What the plugin logged (at most [`LOG_BUDGET`] lines), and how many
    /// more it tried to.
    logs: Vec<LogLine>,
    logs_dropped: u32,
    /// What the guest wrote to stderr (a Rust panic's message and place),
    /// kept up to [`STDERR_KEPT`] bytes for the failure it explains.
    stderr: wasmtime_wasi::p2::pipe::MemoryOutputPipe,
    table: ResourceTable,
    limiter: Limiter,
    caller: std::sync::Arc<Caller>,
    services: Option<std::sync::Arc<PlatformServices>>,
    runtime: Option<tokio::runtime::Handle>,
    deadline: Instant,
    output_max: usize,
    logs_left: u32,
    /// Tasks an enricher asked for, written by the host after the call.
    queued: Vec<crate::tasks::PluginTask>,
}

/// The part of a call's stderr that is kept (the rest of a write is refused
/// to the guest).
pub const STDERR_KEPT: usize = 4096;

/// Most tasks one call may ask for.
const TASKS_PER_CALL: usize = 16;

thread_local! {
    /// The tasks of the enricher calls that succeeded on this thread, for
    /// the host to write with their event ([`take_queued_tasks`]).
    static QUEUED: std::cell::RefCell<Vec<crate::tasks::PluginTask>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes the tasks the successful calls on this thread asked for.
pub fn take_queued_tasks() -> Vec<crate::tasks::PluginTask> {
    QUEUED.with(|q| std::mem::take(&mut *q.borrow_mut()))
}

impl CallState {
    pub fn new(
        caller: std::sync::Arc<Caller>,
        limits: &Limits,
        services: Option<std::sync::Arc<PlatformServices>>,
        request_id: &str,
    ) -> Self {
        let mut wasi = WasiCtx::builder();
        let stderr = wasmtime_wasi::p2::pipe::MemoryOutputPipe::new(STDERR_KEPT);
        // Nothing is granted: no files, no environment, no network; stderr
        // is kept in memory, bounded, to explain a failure.
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stderr(stderr.clone());
        Self {
            wasi: wasi.build(),
            request_id: request_id.chars().take(128).collect(),
            logs: Vec::new(),
            logs_dropped: 0,
            stderr,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_max: limits.memory_bytes(),
                memory_used: 0,
                memory_hit: false,
            },
            caller,
            services,
            runtime: tokio::runtime::Handle::try_current().ok(),
            deadline: Instant::now() + limits.deadline(),
            output_max: limits.output_bytes,
            logs_left: LOG_BUDGET,
            queued: Vec::new(),
        }
    }

    /// After a successful call: hands its tasks to the host (this thread's
    /// [`take_queued_tasks`]).
    pub fn keep_queued_tasks(&mut self) {
        let tasks = std::mem::take(&mut self.queued);
        if !tasks.is_empty() {
            QUEUED.with(|q| q.borrow_mut().extend(tasks));
        }
    }

    pub fn memory_hit(&self) -> bool {
        self.limiter.memory_hit
    }

    /// Bytes of linear memory the call had at its largest (memories only
    /// grow within a call).
    pub fn memory_peak(&self) -> usize {
        self.limiter.memory_used
    }

    /// The lines the plugin logged, and how many more were dropped.
    pub fn take_logs(&mut self) -> (Vec<LogLine>, u32) {
        (std::mem::take(&mut self.logs), self.logs_dropped)
    }

    /// What the guest wrote to stderr so far, trimmed (lossy UTF-8).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.contents())
            .trim()
            .to_owned()
    }
}

/// Applies the call's limits to its store.
pub fn limit(store: &mut Store<CallState>) {
    store.limiter(|s| &mut s.limiter);
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory per call, all memories of the component together;
/// tables, instances and memories are capped per component.
struct Limiter {
    memory_max: usize,
    memory_used: usize,
    memory_hit: bool,
}

const MAX_TABLE_ELEMENTS: usize = 100_000;
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 16;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .memory_used
            .saturating_add(desired.saturating_sub(current));
        if total > self.memory_max {
            // A trap rather than a failed grow: the guest would abort
            // anyway, and this way the error names the limit.
            self.memory_hit = true;
            return Err(wasmtime::Error::new(HostStop::Memory));
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

impl types::Host for CallState {}

impl host::Host for CallState {
    fn log(&mut self, level: Level, message: String) {
        if self.logs_left == 0 {
            // No tenant or plugin label: bounded cardinality (see stats.rs).
            metrics::counter!("plugin_log_dropped_total").increment(1);
            self.logs_dropped += 1;
            return;
        }
        self.logs_left -= 1;
        let message: String = message.chars().take(LOG_MESSAGE_MAX).collect();
        let (tenant, plugin) = (&self.caller.tenant, &self.caller.plugin);
        let (version, request_id) = (self.caller.version, &self.request_id);
        // One key per field: the plugin's text is `plugin_message`, the
        // line's own message says what kind of line it is.
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    tenant,
                    plugin,
                    version,
                    request_id,
                    plugin_message = message,
                    "plugin log"
                )
            };
        }
        match level {
            Level::Trace => line!(trace),
            Level::Debug => line!(debug),
            Level::Info => line!(info),
            Level::Warn => line!(warn),
            Level::Error => line!(error),
        }
        self.logs.push(LogLine { level, message });
    }

    fn forward(
        &mut self,
        service: String,
        path: String,
        body: String,
    ) -> wasmtime::Result<Result<String, String>> {
        if body.len() > self.output_max {
            return Err(wasmtime::Error::new(HostStop::HostCallTooLarge));
        }
        if !self.caller.services.contains(&service) {
            return Ok(Err(format!(
                "this plugin was not granted the {service:?} service; list it in the manifest's \"services\""
            )));
        }
        if !valid_path(&path) {
            return Ok(Err(format!(
                "{path:?} is not a service path (it must start with / and hold only letters, digits, -, _, . and /)"
            )));
        }
        let body: Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => return Ok(Err(format!("the body is not JSON: {e}"))),
        };
        if self.caller.queues_tasks
            && (service.as_str(), path.as_str()) == ("task", crate::tasks::SCHEDULE_PATH)
        {
            if self.queued.len() >= TASKS_PER_CALL {
                return Ok(Err(format!(
                    "a call may schedule at most {TASKS_PER_CALL} tasks"
                )));
            }
            let caller = &self.caller;
            let task = crate::tasks::PluginTask::new(&caller.tenant, &caller.plugin, &body);
            return Ok(task.map(|t| {
                let answer = t.answer().to_string();
                self.queued.push(t);
                answer
            }));
        }
        let (Some(services), Some(runtime)) = (self.services.clone(), self.runtime.clone()) else {
            return Ok(Err("no platform services are available here".into()));
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(wasmtime::Error::new(HostStop::HostCallDeadline));
        }
        let tenant = self.caller.tenant.clone();
        // The call runs as its own task on the service runtime, so it always
        // completes (the client's timeout bounds it, and its breaker sees the
        // outcome); this (blocking) thread waits for it at most until the
        // plugin's own deadline.
        let call =
            runtime.spawn(async move { services.forward(&service, &path, &tenant, &body).await });
        match runtime.block_on(tokio::time::timeout(left, call)) {
            Err(_) => Err(wasmtime::Error::new(HostStop::HostCallDeadline)),
            Ok(Err(e)) => Ok(Err(format!("the call failed: {e}"))),
            Ok(Ok(Err(message))) => Ok(Err(message)),
            Ok(Ok(Ok(value))) => Ok(Ok(value.to_string())),
        }
    }
}

fn valid_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= 512
        && !path.contains("..")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// The one WASI interface that blocks (`wasi:io/poll`: sleeping, waiting
/// on streams), replaced by versions that wait at most until the call's
/// deadline and then stop the call. WASI's own waits inside a host call
/// would otherwise outlast the epoch deadline.
pub fn bound_blocking_calls(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime_wasi_io::bindings::wasi::io::poll::{Host, HostPollable};
    linker.allow_shadowing(true);
    let mut poll = linker.instance("wasi:io/poll@0.2.12")?;
    poll.func_wrap(
        "poll",
        |mut store: StoreContextMut<'_, CallState>, (list,): (Vec<Resource<DynPollable>>,)| {
            let state = store.data_mut();
            let (runtime, left) = state.waiting()?;
            let ready = runtime.block_on(tokio::time::timeout(
                left,
                Host::poll(&mut state.table, list),
            ));
            match ready {
                Ok(r) => r.map(|v| (v,)),
                Err(_) => Err(wasmtime::Error::new(HostStop::HostCallDeadline)),
            }
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, CallState>, (p,): (Resource<DynPollable>,)| {
            let state = store.data_mut();
            let (runtime, left) = state.waiting()?;
            let done = runtime.block_on(tokio::time::timeout(
                left,
                HostPollable::block(&mut state.table, p),
            ));
            match done {
                Ok(r) => r,
                Err(_) => Err(wasmtime::Error::new(HostStop::HostCallDeadline)),
            }
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

impl CallState {
    /// What a blocking host call may wait on, and for how long.
    fn waiting(&self) -> wasmtime::Result<(tokio::runtime::Handle, std::time::Duration)> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match &self.runtime {
            Some(r) if !left.is_zero() => Ok((r.clone(), left)),
            _ => Err(wasmtime::Error::new(HostStop::HostCallDeadline)),
        }
    }
}
