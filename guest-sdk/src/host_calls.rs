//! The host functions, as plugin code calls them: through the component's
//! imports in a wasm build, through [`crate::testing`] in a native one.

use serde_json::Value;

#[cfg(all(
    target_arch = "wasm32",
    feature = "event-enricher",
    not(feature = "validation-hook")
))]
use crate::event_enricher::bss::plugin::host as wit_host;
/// The host interface of whichever world this plugin is built for.
#[cfg(all(target_arch = "wasm32", feature = "validation-hook"))]
use crate::validation_hook::bss::plugin::host as wit_host;
#[cfg(all(
    target_arch = "wasm32",
    feature = "webhook-transformer",
    not(any(feature = "validation-hook", feature = "event-enricher"))
))]
use crate::webhook_transformer::bss::plugin::host as wit_host;

/// Log levels of [`log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging details.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the plugin handled.
    Warn,
    /// Something failed.
    Error,
}

/// Writes to the host's structured log (tagged with tenant and plugin;
/// rate-limited by the host).
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use wit_host::Level as L;
        let level = match level {
            Level::Trace => L::Trace,
            Level::Debug => L::Debug,
            Level::Info => L::Info,
            Level::Warn => L::Warn,
            Level::Error => L::Error,
        };
        wit_host::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message);
}

/// Calls a platform service the host is configured with (`validation`,
/// `task`): `path` relative to the service, JSON in and out. An error says
/// what failed (not granted, unavailable, refused).
pub fn forward(service: &str, path: &str, body: &Value) -> Result<Value, String> {
    #[cfg(target_arch = "wasm32")]
    {
        let answer = wit_host::forward(service, path, &body.to_string())?;
        serde_json::from_str(&answer)
            .map_err(|e| format!("the {service} service answered non-JSON: {e}"))
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::fake_forward(service, path, body)
}
