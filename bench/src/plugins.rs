//! `cargo run --release -p bss-bench -- --only plugins`: the plugin
//! runtime's costs, each beside its reference in the same run.
//! - S3: one validation-hook call (fresh store + instantiate + call) through
//!   the service's runtime (limits, epoch deadline, fuel metering, limiter),
//!   beside a bare wasmtime 48 host doing the same with the same component.
//! - S4: the first call of a plugin after a restart: a new runtime loads the
//!   compiled artifact from the disk cache, pre-instantiates and calls.
//! - Record creates over HTTP with one hook bound vs none (same run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bss::plugins::bindings::validation::bss::plugin::{host, types};
use bss::plugins::bindings::validation::{ValidationHook, ValidationHookPre};
use bss::plugins::runtime::sha256_hex;
use bss::plugins::sandbox::Caller;
use bss::plugins::{Context, Kind, Limits, Loaded, Runtime};
use hdrhistogram::Histogram;
use serde_json::json;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::{Figures, row};

const RECORD: &str =
    r#"{"number":"INV-1","total":120.5,"status":"open","customer":{"name":"Acme Corporation"}}"#;

fn context() -> Context {
    Context {
        tenant_id: "bench".into(),
        resource: "invoices".into(),
        operation: "create".into(),
        actor: "user:bench".into(),
        request_id: "r".into(),
        config: "{}".into(),
    }
}

/// The component as a validation hook with these limits, no config.
fn hook(rt: &Runtime, component: &Component, limits: Limits) -> anyhow::Result<Loaded> {
    rt.load(
        component,
        Kind::ValidationHook,
        limits,
        "{}".into(),
        caller(),
    )
}

fn caller() -> Caller {
    Caller {
        tenant: "bench".into(),
        plugin: "no-negative-totals".into(),
        version: 1,
        services: vec![],
        queues_tasks: false,
    }
}

/// Per-call figures: calls/s on one thread, p50 and p99 in microseconds
/// (printed in the ms columns as µs / 1000).
fn measure(calls: usize, mut call: impl FnMut()) -> anyhow::Result<Figures> {
    for _ in 0..calls / 10 {
        call();
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let start = Instant::now();
    for _ in 0..calls {
        let t0 = Instant::now();
        call();
        hist.record(t0.elapsed().as_nanos() as u64)?;
    }
    Ok(Figures {
        rate: calls as f64 / start.elapsed().as_secs_f64(),
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1e6,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1e6,
        ..Default::default()
    })
}

/// A plain wasmtime host: default configuration with the pooling
/// allocator, WASI with nothing granted, no-op host functions, no limits.
struct Bare {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for Bare {}

impl host::Host for Bare {
    fn log(&mut self, _level: host::Level, _message: String) {}
    fn forward(
        &mut self,
        _: String,
        _: String,
        _: String,
    ) -> wasmtime::Result<Result<String, String>> {
        Ok(Err("not here".into()))
    }
}

fn bare_pre(bytes: &[u8]) -> anyhow::Result<(Engine, ValidationHookPre<Bare>)> {
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::pooling());
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let component = Component::new(&engine, bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("{e}"))?;
    ValidationHook::add_to_linker::<Bare, HasSelf<Bare>>(&mut linker, |s| s)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((
        engine,
        ValidationHookPre::new(pre).map_err(|e| anyhow::anyhow!("{e}"))?,
    ))
}

fn us_row(name: &str, f: Figures, ratio: Option<f64>) {
    let ratio = ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
    println!(
        "{name:<46} {:>7} {:>10.0} {:>8.1}us {:>6.1}us {ratio:>7}",
        1,
        f.rate,
        f.p50_ms * 1000.0,
        f.p99_ms * 1000.0
    );
}

pub async fn run(
    plugins_dir: &Path,
    runs: usize,
    target: crate::http_load::Target,
    hooked: crate::http_load::Target,
    clients: &[usize],
    seconds: Duration,
    profile: Option<&Path>,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(plugins_dir.join("no_negative_totals.wasm"))?;
    let cache: PathBuf =
        std::env::temp_dir().join(format!("bss-bench-cache-{}", uuid::Uuid::new_v4().simple()));
    let ctx = context();

    // S3: warm hook calls.
    let rt = Runtime::new(&cache, None)?;
    let sha = rt
        .compile_upload(&bytes, Kind::ValidationHook)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let component = rt
        .cached(&sha)
        .ok_or_else(|| anyhow::anyhow!("not cached"))?;
    let plugin = hook(&rt, &component, Limits::default())?;
    let fueled = hook(
        &rt,
        &component,
        Limits {
            fuel: Some(10_000_000),
            ..Limits::default()
        },
    )?;
    let (bare_engine, bare) = bare_pre(&bytes)?;
    let calls = 20_000;
    let (mut ours, mut ours_fuel, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        plain.push(measure(calls, || {
            let mut store = Store::new(
                &bare_engine,
                Bare {
                    wasi: WasiCtx::builder().build(),
                    table: ResourceTable::new(),
                },
            );
            let hook = bare
                .instantiate(&mut store)
                .unwrap_or_else(|e| panic!("{e}"));
            let out = hook
                .call_validate(&mut store, &ctx, RECORD, None)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(out.is_ok());
        })?);
        ours.push(measure(calls, || {
            let out = rt
                .validate(&plugin, &ctx, RECORD, None)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(out.is_ok());
        })?);
        ours_fuel.push(measure(calls, || {
            let out = rt
                .validate(&fueled, &ctx, RECORD, None)
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(out.is_ok());
        })?);
    }
    let (o, of, b) = (
        crate::median(ours),
        crate::median(ours_fuel),
        crate::median(plain),
    );
    println!(
        "{:<46} {:>7} {:>10} {:>10} {:>8} {:>7}",
        "plugin scenario", "threads", "calls/s", "p50", "p99", "ratio"
    );
    us_row("S3 bare wasmtime 48: store+instantiate+call", b, None);
    us_row(
        "S3 service runtime: same, with all limits",
        o,
        Some(o.p50_ms / b.p50_ms),
    );
    us_row(
        "S3 service runtime, fuel metering on",
        of,
        Some(of.p50_ms / b.p50_ms),
    );
    drop(rt);

    // S4: first call after a restart (artifact from the disk cache).
    let mut hist = Histogram::<u64>::new(3)?;
    let mut compile = Histogram::<u64>::new(3)?;
    for _ in 0..30 {
        let rt = Runtime::new(&cache, None)?;
        let t0 = Instant::now();
        let component = rt
            .cached(&sha)
            .ok_or_else(|| anyhow::anyhow!("cache miss"))?;
        let plugin = hook(&rt, &component, Limits::default())?;
        let out = rt
            .validate(&plugin, &ctx, RECORD, None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        hist.record(t0.elapsed().as_micros() as u64)?;
        assert!(out.is_ok());
        let fresh =
            std::env::temp_dir().join(format!("bss-bench-cold-{}", uuid::Uuid::new_v4().simple()));
        let cold = Runtime::new(&fresh, None)?;
        let t0 = Instant::now();
        cold.compile_stored(&sha256_hex(&bytes), &bytes)?;
        compile.record(t0.elapsed().as_micros() as u64)?;
        let _ = std::fs::remove_dir_all(&fresh);
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "S4 first call after restart (disk cache)       p50 {:.2} ms  p99 {:.2} ms   (compiling instead: p50 {:.1} ms, p99 {:.1} ms)",
        ms(&hist, 0.5),
        ms(&hist, 0.99),
        ms(&compile, 0.5),
        ms(&compile, 0.99)
    );
    let _ = std::fs::remove_dir_all(&cache);

    // Hostile calls: how long until each ends in its error.
    hostile(plugins_dir, &cache).await?;

    // Record creates with one hook vs none.
    hooked
        .install_plugin(
            &json!({"name": "no-negative-totals", "kind": "validation-hook", "resources": ["invoices"]}),
            bytes,
        )
        .await?;
    println!(
        "{:<46} {:>7} {:>10} {:>8} {:>8} {:>7}",
        "scenario", "clients", "rate/s", "p50 ms", "p99 ms", "ratio"
    );
    for &c in clients {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let p = crate::profile::start(profile, &format!("creates-no-hook-{c}"))?;
            without.push(crate::http_load::creates(&target, c, seconds).await?);
            if let Some(p) = p {
                p.finish()?;
            }
            let p = crate::profile::start(profile, &format!("creates-hook-{c}"))?;
            with.push(crate::http_load::creates(&hooked, c, seconds).await?);
            if let Some(p) = p {
                p.finish()?;
            }
        }
        let (w, wo) = (crate::median(with), crate::median(without));
        row("POST /v1/data/invoices, no plugin", c, wo, None);
        row(
            "POST /v1/data/invoices, one validation hook",
            c,
            w,
            Some(w.rate / wo.rate),
        );
    }
    Ok(())
}

/// Time from call to error for each hostile mode (deadline 50 ms).
async fn hostile(plugins_dir: &Path, cache: &Path) -> anyhow::Result<()> {
    use std::sync::Arc;
    let bytes = std::fs::read(plugins_dir.join("hostile.wasm"))?;
    // A Task service that accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", hang.local_addr()?);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hang.accept().await {
            held.push(socket);
        }
    });
    let settings = bss::config::Settings::default();
    let task = bss::services::ServiceClient::new("task", &url, &settings)?;
    let services = bss::services::PlatformServices::new(None, Some(task));
    let rt = Arc::new(Runtime::new(cache, Some(Arc::new(services)))?);
    let sha = rt
        .compile_upload(&bytes, Kind::ValidationHook)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let component = rt
        .cached(&sha)
        .ok_or_else(|| anyhow::anyhow!("not cached"))?;
    println!(
        "{:<46} {:>10} {:>10} {:>10}",
        "hostile call (deadline 50 ms)", "error", "p50 ms", "max ms"
    );
    for mode in [
        "loop",
        "memory",
        "recursion",
        "huge",
        "trap",
        "hang-forward",
    ] {
        let config = json!({"mode": mode}).to_string();
        let mut c = caller();
        c.services = vec!["task".into()];
        let plugin = Arc::new(rt.load(
            &component,
            Kind::ValidationHook,
            Limits::default(),
            config.clone(),
            c,
        )?);
        let mut hist = Histogram::<u64>::new(3)?;
        let mut kind = String::new();
        for _ in 0..20 {
            let (rt, plugin, mut ctx) = (rt.clone(), plugin.clone(), context());
            ctx.config = config.clone();
            let (took, out) = tokio::task::spawn_blocking(move || {
                let t0 = Instant::now();
                let out = rt.validate(&plugin, &ctx, RECORD, None);
                (t0.elapsed(), out)
            })
            .await?;
            kind = match out {
                Err(f) => f.kind().to_owned(),
                Ok(_) => "none!".into(),
            };
            hist.record(took.as_micros() as u64)?;
        }
        println!(
            "{:<46} {kind:>10} {:>10.2} {:>10.2}",
            format!("  {mode}"),
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.max() as f64 / 1000.0
        );
    }
    Ok(())
}
