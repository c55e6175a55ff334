//! `bss plugin new`: a standalone plugin crate (it builds anywhere, not only
//! in this repository) with its manifest, a native test, sample inputs and
//! a README; and the SDK it depends on, which this binary carries.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::plugins::Kind;
use crate::plugins::manifest::valid_name;

/// The SDK's files, as packaged (`cargo package -p bss-plugin-sdk` holds
/// exactly these): written out for plugin crates to depend on by path.
const SDK_FILES: [(&str, &str); 7] = [
    ("Cargo.toml", include_str!("../../../guest-sdk/Cargo.toml")),
    ("README.md", include_str!("../../../guest-sdk/README.md")),
    ("src/lib.rs", include_str!("../../../guest-sdk/src/lib.rs")),
    (
        "src/event.rs",
        include_str!("../../../guest-sdk/src/event.rs"),
    ),
    (
        "src/host_calls.rs",
        include_str!("../../../guest-sdk/src/host_calls.rs"),
    ),
    (
        "src/testing.rs",
        include_str!("../../../guest-sdk/src/testing.rs"),
    ),
    (
        "wit/plugin.wit",
        include_str!("../../../guest-sdk/wit/plugin.wit"),
    ),
];

/// The SDK version this binary carries (its manifest's).
pub fn sdk_version() -> &'static str {
    SDK_FILES[0]
        .1
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or("0.1.0")
}

/// Where the carried SDK is written: `BSS_SDK_HOME`, else
/// `$XDG_DATA_HOME/bss`, else `~/.local/share/bss`; one folder per version.
fn sdk_dir() -> anyhow::Result<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let home = env("BSS_SDK_HOME")
        .or_else(|| env("XDG_DATA_HOME").map(|d| d.join("bss")))
        .or_else(|| env("HOME").map(|h| h.join(".local/share/bss")))
        .context("set BSS_SDK_HOME (or HOME) to say where the plugin SDK goes")?;
    Ok(home.join(format!("bss-plugin-sdk-{}", sdk_version())))
}

/// Writes the carried SDK where plugin crates find it (files that differ
/// are rewritten, so the SDK always matches this binary), and returns its
/// folder.
pub fn install_sdk() -> anyhow::Result<PathBuf> {
    let dir = sdk_dir()?;
    for (path, text) in SDK_FILES {
        let file = dir.join(path);
        if std::fs::read_to_string(&file).is_ok_and(|t| t == text) {
            continue;
        }
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(dir)
}

/// Scaffolds plugin `name` of `kind` in `parent/name`. `sdk` is a path to
/// an SDK checkout to depend on instead of the carried one.
pub fn new_plugin(
    parent: &Path,
    name: &str,
    kind: Kind,
    sdk: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    if !valid_name(name) {
        bail!(
            "{name:?} cannot be a plugin name: 1-63 lowercase letters, digits and dashes, starting with a letter"
        );
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; choose another name or folder",
            dir.display()
        );
    }
    let sdk = match sdk {
        Some(p) => std::path::absolute(p)?,
        None => install_sdk()?,
    };
    let sdk_path = sdk.display().to_string().replace('\\', "/");
    let template = Template::of(kind);
    let fill = |text: &str| {
        text.replace("__NAME__", name)
            .replace("__KIND__", kind.as_str())
            .replace("__SDK_VERSION__", sdk_version())
            .replace("__SDK_PATH__", &sdk_path)
            .replace("__SAMPLE__", template.sample_file)
            .replace("__RUN_FLAG__", template.run_flag)
    };
    let files = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("plugin.toml", fill(template.manifest)),
        ("src/lib.rs", fill(template.source)),
        (template.sample_file, template.sample.to_owned()),
        ("README.md", fill(README)),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (path, text) in files {
        let file = dir.join(path);
        if let Some(p) = file.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(dir)
}

struct Template {
    manifest: &'static str,
    source: &'static str,
    sample_file: &'static str,
    sample: &'static str,
    run_flag: &'static str,
}

impl Template {
    fn of(kind: Kind) -> Self {
        match kind {
            Kind::ValidationHook => Self {
                manifest: HOOK_MANIFEST,
                source: HOOK_SOURCE,
                sample_file: "samples/record.json",
                sample: "{\"total\": -5, \"customer\": \"acme\"}\n",
                run_flag: "--record",
            },
            Kind::EventEnricher => Self {
                manifest: ENRICHER_MANIFEST,
                source: ENRICHER_SOURCE,
                sample_file: "samples/event.json",
                sample: SAMPLE_EVENT,
                run_flag: "--event",
            },
            Kind::WebhookTransformer => Self {
                manifest: TRANSFORMER_MANIFEST,
                source: TRANSFORMER_SOURCE,
                sample_file: "samples/event.json",
                sample: SAMPLE_EVENT,
                run_flag: "--event",
            },
        }
    }
}

const CARGO_TOML: &str = r#"[package]
name = "__NAME__"
version = "0.1.0"
edition = "2024"
publish = false

# A component for wasm32-wasip2 (`bss plugin build`), and a library for the
# native tests (`bss plugin test`).
[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
# The SDK this `bss` carries, written out by `bss plugin new`; the version is
# what crates.io would give once it is published there.
bss-plugin-sdk = { version = "__SDK_VERSION__", path = "__SDK_PATH__", features = ["__KIND__"] }

# Small, fast components: a hook is a few tens of KB.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"

# A crate of its own, even inside another workspace.
[workspace]
"#;

const HOOK_MANIFEST: &str = r#"# What `bss plugin push` uploads with the component: the API's plugin
# manifest, in TOML. `bss plugin run` runs under these limits too.
name = "__NAME__"
kind = "validation-hook"
# The resources it runs for: each needs a schema (or add
# `allowMissingResources = true`); ["*"] for all.
resources = ["invoices"]
# Platform services `forward` may call ("validation", "task").
services = []
# Also run before deletes.
onDelete = false

[limits]
deadlineMs = 50
memoryMib = 16
fuel = 10000000

# Given to every call as `ctx.config`.
[config]
"#;

const ENRICHER_MANIFEST: &str = r#"# What `bss plugin push` uploads with the component: the API's plugin
# manifest, in TOML. `bss plugin run` runs under these limits too.
name = "__NAME__"
kind = "event-enricher"
# The resources whose events it sees: each needs a schema (or add
# `allowMissingResources = true`); ["*"] for all. The record is in the event
# only when the resource's schema says "x-event-payload": "full".
resources = ["invoices"]
services = []

[limits]
deadlineMs = 50
memoryMib = 16
fuel = 10000000

# Given to every call as `ctx.config`.
[config]
threshold = 1000
"#;

const TRANSFORMER_MANIFEST: &str = r#"# What `bss plugin push` uploads with the component: the API's plugin
# manifest, in TOML. Name it in a webhook endpoint's "transformer".
name = "__NAME__"
kind = "webhook-transformer"
services = []

[limits]
deadlineMs = 50
memoryMib = 16
fuel = 10000000

# Given to every call as `ctx.config`.
[config]
"#;

const HOOK_SOURCE: &str = r#"//! __NAME__: a validation hook. It runs in the write path after JSON Schema
//! validation, for the resources `plugin.toml` binds; refusing a record
//! answers the client 422 with the violations (`source: "plugin:__NAME__"`).

use bss_plugin::serde_json::Value;
use bss_plugin::{Context, ValidationHook, Violation};

/// The hook.
pub struct Hook;

impl ValidationHook for Hook {
    fn validate(_ctx: &Context, record: &Value, _previous: Option<&Value>) -> Result<(), Vec<Violation>> {
        match record["total"].as_f64() {
            Some(total) if total < 0.0 => Err(vec![
                Violation::new("/total", "a total cannot be negative").with_code("negative-total"),
            ]),
            _ => Ok(()),
        }
    }
}

bss_plugin::export_validation_hook!(Hook);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::serde_json::json;

    #[test]
    fn refuses_negative_totals_only() {
        let ctx = Context::for_test(json!({}));
        assert!(Hook::validate(&ctx, &json!({"total": 10}), None).is_ok());
        let refused = Hook::validate(&ctx, &json!({"total": -1}), None).unwrap_err();
        assert_eq!(refused[0].path, "/total");
    }
}
"#;

const ENRICHER_SOURCE: &str = r#"//! __NAME__: an event enricher. It runs before each event of the resources
//! `plugin.toml` binds is published: it may add to `data`, add extension
//! attributes, or drop the event (`None`). If it fails, the event goes on
//! unchanged.

use bss_plugin::{Context, Event, EventEnricher, Level, log};

/// The enricher.
pub struct Enricher;

impl EventEnricher for Enricher {
    fn enrich(ctx: &Context, mut event: Event) -> Option<Event> {
        let threshold = ctx.config["threshold"].as_f64().unwrap_or(1000.0);
        // The record is there only with "x-event-payload": "full".
        let total = event.record().and_then(|r| r["total"].as_f64());
        let large = total.is_some_and(|t| t >= threshold);
        if large {
            log(Level::Info, &format!("large: {}", event.subject.as_deref().unwrap_or_default()));
        }
        event.set_extension("large", large);
        Some(event)
    }
}

bss_plugin::export_event_enricher!(Enricher);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::ChangeKind;
    use bss_plugin::serde_json::json;

    #[test]
    fn marks_large_records() {
        let ctx = Context::for_test(json!({"threshold": 100}));
        let event = Event::for_test(ChangeKind::Created, "invoices", "1", Some(json!({"total": 150})));
        let out = Enricher::enrich(&ctx, event).unwrap();
        assert_eq!(out.extension("large"), Some(&json!(true)));
    }
}
"#;

const TRANSFORMER_SOURCE: &str = r##"//! __NAME__: a webhook transformer. It runs before each delivery to the
//! endpoints that name it: it may rewrite method, path, headers and body,
//! or cancel the delivery (`None`). It never changes the host or the
//! signature headers.

use bss_plugin::serde_json::json;
use bss_plugin::{Context, Event, WebhookRequest, WebhookTransformer};

/// The transformer.
pub struct Transformer;

impl WebhookTransformer for Transformer {
    fn transform(_ctx: &Context, event: &Event, mut request: WebhookRequest) -> Option<WebhookRequest> {
        let subject = event.subject.as_deref().unwrap_or_default();
        request.body = json!({"text": format!("{} {subject}", event.event_type)}).to_string();
        Some(request)
    }
}

bss_plugin::export_webhook_transformer!(Transformer);

#[cfg(test)]
mod tests {
    use super::*;
    use bss_plugin::ChangeKind;

    #[test]
    fn sends_a_line_of_text() {
        let event = Event::for_test(ChangeKind::Created, "invoices", "7", None);
        let request = WebhookRequest { method: "POST".into(), path: "/".into(), headers: vec![], body: String::new() };
        let out = Transformer::transform(&Context::for_test(json!({})), &event, request).unwrap();
        assert_eq!(out.body, r#"{"text":"business_store.data.created invoices/7"}"#);
    }
}
"##;

const SAMPLE_EVENT: &str = r#"{
  "specversion": "1.0",
  "id": "01936f0e-0000-7000-8000-000000000001",
  "source": "/business-store/local",
  "type": "business_store.data.created",
  "subject": "invoices/inv-1",
  "time": "2026-01-01T00:00:00Z",
  "datacontenttype": "application/json",
  "tenantid": "local",
  "correlationid": "local-run",
  "data": {
    "tenantId": "local",
    "resource": "invoices",
    "recordId": "inv-1",
    "version": 1,
    "data": {"total": 1500, "customer": "acme"}
  }
}
"#;

const README: &str = r#"# __NAME__

A Business Store plugin (__KIND__), made by `bss plugin new`.

```sh
bss plugin test                                    # the native tests (cargo test)
bss plugin build                                   # the component, for wasm32-wasip2
bss plugin run __RUN_FLAG__ __SAMPLE__   # the component, in the real sandbox, under plugin.toml's limits
export BSS_URL=http://127.0.0.1:8080 BSS_TOKEN=$(bss token --tenant <tenant>)
bss plugin push                                    # builds, uploads with plugin.toml, prints the version
bss plugin logs __NAME__ --follow                  # what it logs in the service
bss plugin push --trial shadow                     # the next version beside the active one, compared, never applied
```

`plugin.toml` is the manifest the service receives (name, kind, the
resources it runs for, limits, config). `src/lib.rs` is the plugin: the SDK's
documentation (`cargo doc --open`) has a complete example of each world.
"#;
