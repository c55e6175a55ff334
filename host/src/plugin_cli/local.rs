//! `bss plugin run`: a built component in the service's own sandbox (same
//! engine configuration, same limits, same host functions), on inputs from
//! files; what it answered, what it cost and what it logged.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::plugins::calls::Verdict;
use crate::plugins::manifest::Checked;
use crate::plugins::runtime::{Observed, Report};
use crate::plugins::sandbox::{Caller, level_name};
use crate::plugins::{Ceilings, Context, Kind, Manifest, Runtime, RuntimeBounds, WebhookRequest};

/// What to run a component on.
#[derive(Debug, Clone, Default)]
pub struct RunInput {
    pub record: Option<Value>,
    pub previous: Option<Value>,
    pub event: Option<Value>,
    pub request: Option<Value>,
    pub config: Option<Value>,
    pub resource: Option<String>,
    pub operation: Option<String>,
}

/// A component loaded for local runs.
pub struct LocalPlugin {
    runtime: Runtime,
    loaded: crate::plugins::Loaded,
    pub kind: Kind,
    pub checked: Checked,
    /// Compiling (or loading the cached artifact) and pre-instantiating.
    pub load_ms: f64,
}

/// The manifest `run` uses: `path`, else `plugin.toml` beside the
/// component's crate (the current folder), else one made from `kind`.
pub fn read_manifest(path: Option<&Path>, kind: Option<Kind>) -> anyhow::Result<Option<Manifest>> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None if Path::new("plugin.toml").exists() => PathBuf::from("plugin.toml"),
        None => {
            return Ok(kind.map(|kind| Manifest {
                name: "local".into(),
                kind,
                resources: vec!["*".into()],
                config: None,
                limits: Default::default(),
                services: Vec::new(),
                on_delete: false,
                allow_missing_resources: true,
                record: None,
            }));
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let manifest: Manifest = toml::from_str(&text)
        .with_context(|| format!("{} is not a plugin manifest", path.display()))?;
    Ok(Some(manifest))
}

/// The manifest checked against the installation's default ceilings, with
/// every problem listed.
pub fn check(manifest: Manifest) -> anyhow::Result<Checked> {
    manifest.check(&Ceilings::default()).map_err(|errors| {
        let listed: Vec<String> = errors
            .iter()
            .map(|e| format!("  {}: {}", e.path, e.message))
            .collect();
        anyhow::anyhow!("the manifest is refused:\n{}", listed.join("\n"))
    })
}

impl LocalPlugin {
    /// Compiles `wasm` (cached on disk between runs) as `checked`'s kind.
    pub fn load(wasm: &Path, checked: Checked) -> anyhow::Result<Self> {
        let bytes = std::fs::read(wasm).with_context(|| {
            format!(
                "cannot read {} (build it with `bss plugin build`)",
                wasm.display()
            )
        })?;
        let start = Instant::now();
        let cache = std::env::temp_dir().join("bss-plugin-run-cache");
        let bounds = RuntimeBounds {
            instances: 4,
            memory_cache_entries: 4,
            disk_cache_bytes: 256 << 20,
        };
        let runtime = Runtime::with_bounds(&cache, None, bounds)?;
        let kind = checked.manifest.kind;
        // Compiled once per module: later runs load the artifact from the
        // disk cache, as a restarted service does (`load` checks the world).
        let component = match runtime.cached(&crate::plugins::runtime::sha256_hex(&bytes)) {
            Some(c) => c,
            None => {
                let sha = runtime
                    .compile_upload(&bytes, kind)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", wasm.display()))?;
                runtime
                    .cached(&sha)
                    .context("the compiled component went missing")?
            }
        };
        let caller = Caller {
            tenant: "local".into(),
            plugin: checked.manifest.name.clone(),
            version: 0,
            services: checked.manifest.services.clone(),
            queues_tasks: false,
        };
        let loaded = runtime.load(
            &component,
            kind,
            checked.limits,
            checked.config.clone(),
            caller,
        )?;
        Ok(Self {
            runtime,
            loaded,
            kind,
            checked,
            load_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Runs the component once on `input`, on a blocking thread as the
    /// service does (WASI's blocking calls wait on the runtime).
    pub async fn call(
        self: &std::sync::Arc<Self>,
        input: RunInput,
    ) -> anyhow::Result<(Verdict, Report)> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.run(&input)).await?
    }

    fn run(&self, input: &RunInput) -> anyhow::Result<(Verdict, Report)> {
        let config = match &input.config {
            Some(c) => c.to_string(),
            None => self.checked.config.clone(),
        };
        let resource = input.resource.clone().unwrap_or_else(|| {
            let from_event = input
                .event
                .as_ref()
                .and_then(|e| e["data"]["resource"].as_str())
                .map(str::to_owned);
            let bound = self
                .checked
                .manifest
                .resources
                .first()
                .filter(|r| *r != "*")
                .cloned();
            from_event.or(bound).unwrap_or_else(|| "records".into())
        });
        let event_type = input
            .event
            .as_ref()
            .and_then(|e| e["type"].as_str())
            .unwrap_or_default();
        let operation = input.operation.clone().unwrap_or_else(|| match self.kind {
            Kind::ValidationHook if input.previous.is_some() => "replace".into(),
            Kind::ValidationHook => "create".into(),
            _ => event_type.to_owned(),
        });
        let ctx = Context {
            tenant_id: "local".into(),
            resource,
            operation,
            actor: "user:local".into(),
            request_id: "local-run".into(),
            config,
        };
        let rt = &self.runtime;
        let plugin = &self.loaded;
        Ok(match self.kind {
            Kind::ValidationHook => {
                let record = input
                    .record
                    .as_ref()
                    .context("a validation hook runs on --record FILE")?;
                let previous = input.previous.as_ref().map(Value::to_string);
                let Observed { outcome, report } = rt.validate_observed(
                    plugin,
                    &ctx,
                    &record.to_string(),
                    previous.as_deref(),
                    100,
                );
                (Verdict::of_validation(&outcome), report)
            }
            Kind::EventEnricher => {
                let event = input
                    .event
                    .as_ref()
                    .context("an event enricher runs on --event FILE")?;
                let Observed { outcome, report } =
                    rt.enrich_observed(plugin, &ctx, &event.to_string());
                (Verdict::of_enrichment(&outcome), report)
            }
            Kind::WebhookTransformer => {
                let event = input
                    .event
                    .as_ref()
                    .context("a webhook transformer runs on --event FILE")?;
                let request = request_from(input.request.as_ref(), event)?;
                let Observed { outcome, report } =
                    rt.transform_observed(plugin, &ctx, &event.to_string(), &request);
                (Verdict::of_transform(&outcome), report)
            }
        })
    }
}

/// The delivery a transformer sees: `--request FILE` (method, path,
/// headers, body), else a POST of the event to `/`.
fn request_from(request: Option<&Value>, event: &Value) -> anyhow::Result<WebhookRequest> {
    let Some(r) = request else {
        return Ok(WebhookRequest {
            method: "POST".into(),
            path: "/".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: event.to_string(),
        });
    };
    let text = |k: &str, d: &str| r[k].as_str().unwrap_or(d).to_owned();
    let headers = match &r["headers"] {
        Value::Null => Vec::new(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        Value::Array(pairs) => pairs
            .iter()
            .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
            .collect(),
        _ => bail!("the request's headers are an object or a list of [name, value] pairs"),
    };
    Ok(WebhookRequest {
        method: text("method", "POST"),
        path: text("path", "/"),
        headers,
        body: match &r["body"] {
            Value::String(s) => s.clone(),
            Value::Null => event.to_string(),
            other => other.to_string(),
        },
    })
}

/// The run as JSON (`--json`).
pub fn outcome_json(outcome: &Verdict, report: &Report, checked: &Checked) -> Value {
    json!({
        "verdict": outcome.verdict,
        "detail": outcome.detail,
        "tookUs": report.took.as_micros() as u64,
        "fuelUsed": report.fuel_used,
        "memoryPeakBytes": report.memory_peak,
        "logs": report.logs.iter().map(|l| json!({"level": level_name(l.level), "message": l.message})).collect::<Vec<_>>(),
        "logsDropped": report.logs_dropped,
        "stderr": report.stderr,
        "limits": checked.limits,
    })
}

/// The run for a person to read.
pub fn outcome_text(outcome: &Verdict, report: &Report, checked: &Checked) -> String {
    let limits = &checked.limits;
    let mut out = format!("verdict   {}\n", outcome.verdict);
    match outcome.verdict {
        "refused" => {
            for v in outcome.detail["violations"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let code = v["code"]
                    .as_str()
                    .map(|c| format!("  [{c}]"))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "          {}  {}{code}\n",
                    v["path"]
                        .as_str()
                        .filter(|p| !p.is_empty())
                        .unwrap_or("(record)"),
                    v["message"].as_str().unwrap_or_default()
                ));
            }
        }
        "failed" => out.push_str(&format!(
            "          {}\n",
            outcome.detail["message"].as_str().unwrap_or_default()
        )),
        "enriched" | "transformed" => {
            let pretty = serde_json::to_string_pretty(&outcome.detail).unwrap_or_default();
            for line in pretty.lines() {
                out.push_str(&format!("          {line}\n"));
            }
        }
        _ => {}
    }
    out.push_str(&format!(
        "took      {:.3} ms (deadline {} ms)\n",
        report.took.as_secs_f64() * 1e3,
        limits.deadline_ms
    ));
    let fuel_limit = limits
        .fuel
        .map_or("no fuel limit".to_owned(), |f| format!("limit {f}"));
    out.push_str(&format!(
        "fuel      {} instructions ({fuel_limit})\n",
        report.fuel_used
    ));
    out.push_str(&format!(
        "memory    {:.2} MiB at its largest (limit {} MiB)\n",
        report.memory_peak as f64 / (1 << 20) as f64,
        limits.memory_mib
    ));
    if report.logs.is_empty() {
        out.push_str("logs      (none)\n");
    }
    for l in &report.logs {
        out.push_str(&format!(
            "log       {:<5} {}\n",
            level_name(l.level),
            l.message
        ));
    }
    if report.logs_dropped > 0 {
        out.push_str(&format!(
            "log       ({} more dropped: over the per-call budget)\n",
            report.logs_dropped
        ));
    }
    if !report.stderr.is_empty() {
        out.push_str(&format!(
            "stderr    {}\n",
            report.stderr.replace('\n', "\n          ")
        ));
    }
    out
}

/// Reads a JSON input file.
pub fn json_file(path: &str) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    serde_json::from_str(&text).with_context(|| format!("{path} is not JSON"))
}
