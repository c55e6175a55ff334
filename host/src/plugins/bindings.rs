//! Host-side bindings of the WIT package (`guest-sdk/wit/plugin.wit`), one module per
//! world. The shared interfaces (`types`, `host`) are generated once, with
//! the validation-hook world, and reused by the other two.

pub mod validation {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "validation-hook",
        imports: { "bss:plugin/host.forward": trappable },
    });
}

pub mod enricher {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "event-enricher",
        with: {
            "bss:plugin/types": super::validation::bss::plugin::types,
            "bss:plugin/host": super::validation::bss::plugin::host,
        },
    });
}

pub mod transformer {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "webhook-transformer",
        with: {
            "bss:plugin/types": super::validation::bss::plugin::types,
            "bss:plugin/host": super::validation::bss::plugin::host,
        },
    });
}

pub use validation::bss::plugin::host::Level;
pub use validation::bss::plugin::types::{Context, Violation, WebhookRequest};
