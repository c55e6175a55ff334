//! What one plugin call runs in: the store's data (an empty WASI context, a
//! resource limiter, the host functions' view of the call) and the host
//! functions themselves. A store lives for exactly one call.

use std::time::Instant;

use serde_json::Value;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

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
}

pub struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    caller: Caller,
    services: Option<std::sync::Arc<PlatformServices>>,
    runtime: Option<tokio::runtime::Handle>,
    deadline: Instant,
    output_max: usize,
    logs_left: u32,
}

impl CallState {
    pub fn new(
        caller: Caller,
        limits: &Limits,
        services: Option<std::sync::Arc<PlatformServices>>,
    ) -> Self {
        let mut wasi = WasiCtx::builder();
        // Nothing is granted: no files, no environment, no network.
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        Self {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_max: limits.memory_bytes(),
                memory_hit: false,
            },
            caller,
            services,
            runtime: tokio::runtime::Handle::try_current().ok(),
            deadline: Instant::now() + limits.deadline(),
            output_max: limits.output_bytes,
            logs_left: LOG_BUDGET,
        }
    }

    pub fn memory_hit(&self) -> bool {
        self.limiter.memory_hit
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

/// Caps linear memory per call; tables, instances and memories are capped
/// per component.
struct Limiter {
    memory_max: usize,
    memory_hit: bool,
}

const MAX_TABLE_ELEMENTS: usize = 100_000;
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 16;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_max {
            // A trap rather than a failed grow: the guest would abort
            // anyway, and this way the error names the limit.
            self.memory_hit = true;
            return Err(wasmtime::Error::new(HostStop::Memory));
        }
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
            metrics::counter!("plugin_log_dropped_total", "tenant" => self.caller.tenant.clone(), "plugin" => self.caller.plugin.clone())
                .increment(1);
            return;
        }
        self.logs_left -= 1;
        let message: String = message.chars().take(LOG_MESSAGE_MAX).collect();
        let (tenant, plugin) = (&self.caller.tenant, &self.caller.plugin);
        match level {
            Level::Trace => tracing::trace!(tenant, plugin, message, "plugin log"),
            Level::Debug => tracing::debug!(tenant, plugin, message, "plugin log"),
            Level::Info => tracing::info!(tenant, plugin, message, "plugin log"),
            Level::Warn => tracing::warn!(tenant, plugin, message, "plugin log"),
            Level::Error => tracing::error!(tenant, plugin, message, "plugin log"),
        }
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
        let (Some(services), Some(runtime)) = (self.services.clone(), self.runtime.clone()) else {
            return Ok(Err("no platform services are available here".into()));
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(wasmtime::Error::new(HostStop::HostCallDeadline));
        }
        let tenant = self.caller.tenant.clone();
        // The call runs on the service runtime; this (blocking) thread waits
        // for it at most until the plugin's own deadline.
        let answer = runtime.block_on(async move {
            tokio::time::timeout(left, async {
                services.forward(&service, &path, &tenant, &body).await
            })
            .await
        });
        match answer {
            Err(_) => Err(wasmtime::Error::new(HostStop::HostCallDeadline)),
            Ok(Err(message)) => Ok(Err(message)),
            Ok(Ok(value)) => Ok(Ok(value.to_string())),
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
