//! Plugins cannot grow the host or starve other tenants: call slots are
//! shared fairly among busy tenants, a hook's refusal is bounded however
//! many violations it returns, uploads cannot pile up versions or cached
//! artifacts, a guest stack overflow is named as such, and a manifest with
//! a NUL character is a 422. Each attack has a second tenant watching.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bss_tests::*;
use serde_json::{Value, json};

fn hostile(mode: &str, config: Value, limits: Value) -> Value {
    let mut cfg = json!({"mode": mode});
    if let (Some(c), Some(extra)) = (cfg.as_object_mut(), config.as_object()) {
        c.extend(extra.clone());
    }
    json!({"name": "hostile", "kind": "validation-hook", "resources": ["invoices"],
           "config": cfg, "limits": limits})
}

fn trivial_hook() -> Value {
    json!({"name": "no-negative-totals", "kind": "validation-hook",
           "resources": ["invoices"], "config": {}})
}

fn invoice(i: usize) -> Value {
    json!({"number": i.to_string(), "total": 1})
}

/// This process's resident memory (the service runs in it), in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// A second tenant writes while (or after) an attack: every write lands.
async fn second_tenant_writes_fine(app: &TestApp, writes: usize) {
    let (_, token) = app.tenant_with_invoices().await;
    for i in 0..writes {
        let resp = app.post("/v1/data/invoices", &token, &invoice(i)).await;
        assert_eq!(resp.status(), 201, "the other tenant's write {i}");
    }
}

/// 60 writers for one tenant, each writing until `stop` (or 40 writes).
fn flood(app: &TestApp, token: &str, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..60)
        .map(|w| {
            let (app_base, client, token, stop) = (
                app.base.clone(),
                app.client.clone(),
                token.to_owned(),
                stop.clone(),
            );
            tokio::spawn(async move {
                for i in 0..40 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = client
                        .post(format!("{app_base}/v1/data/invoices"))
                        .bearer_auth(&token)
                        .json(&invoice(w * 100 + i))
                        .send()
                        .await;
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn a_quiet_tenant_keeps_its_writes_while_five_tenants_flood_a_slow_hook() {
    let app = TestApp::spawn_with(|s| {
        s.plugin_max_concurrent_calls = 32;
        s.plugin_slot_wait_ms = 1000;
        s.db_max_connections = 16;
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut floods = Vec::new();
    for _ in 0..5 {
        let (_, token) = app.tenant_with_invoices().await;
        let slow = hostile("sleep", json!({"ms": 200}), json!({"deadlineMs": 1000}));
        app.install_plugin(&token, slow, "hostile").await;
        floods.extend(flood(&app, &token, &stop));
    }
    let (_, quiet) = app.tenant_with_invoices().await;
    app.install_plugin(&quiet, trivial_hook(), "no_negative_totals")
        .await;
    // Let the flood fill every slot first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let quiet_writers: Vec<_> = (0..4)
        .map(|w| {
            let (req_app, quiet, ok, refused) = (
                (app.base.clone(), app.client.clone()),
                quiet.clone(),
                ok.clone(),
                refused.clone(),
            );
            tokio::spawn(async move {
                for i in 0..10 {
                    let resp = req_app
                        .1
                        .post(format!("{}/v1/data/invoices", req_app.0))
                        .bearer_auth(&quiet)
                        .json(&invoice(w * 10 + i))
                        .send()
                        .await
                        .unwrap();
                    let counter = if resp.status() == 201 { &ok } else { &refused };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in quiet_writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.await.unwrap();
    }
    let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    eprintln!("quiet tenant: {ok} of 40 writes stored, {refused} refused");
    assert!(ok * 100 >= 40 * 99, "{ok} of 40 stored, {refused} refused");
}

#[tokio::test]
async fn a_hook_returning_400000_violations_gets_a_bounded_answer() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let flood = hostile(
        "violations",
        json!({"count": 400_000}),
        json!({"deadlineMs": 1000, "memoryMib": 64}),
    );
    app.install_plugin(&token, flood, "hostile").await;
    let before = rss_mib();
    let items: Vec<Value> = (0..10).map(invoice).collect();
    let started = Instant::now();
    let resp = app
        .post("/v1/data/invoices/batch", &token, &json!({"items": items}))
        .await;
    assert_eq!(resp.status(), 422);
    let text = resp.text().await.unwrap();
    eprintln!(
        "400,000 violations x 10 items: {} bytes answered in {:?}; RSS {before} -> {} MiB",
        text.len(),
        started.elapsed(),
        rss_mib()
    );
    assert!(text.len() < 1 << 20, "{} bytes", text.len());
    let problem: Value = serde_json::from_str(&text).unwrap();
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("left out"), "{detail}");
    assert!(detail.contains("4000000 violations"), "{detail}");
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1000, "the response cap");
    assert_eq!(errors[0]["source"], "plugin:hostile");
    assert!(
        errors
            .iter()
            .all(|e| e["path"].as_str().is_some_and(|p| p.starts_with("/items/"))),
        "each listed violation names its item"
    );
    second_tenant_writes_fine(&app, 5).await;
}

/// `bytes` with a custom section appended: a distinct, valid component.
fn distinct(bytes: &[u8], n: usize) -> Vec<u8> {
    let name = b"bss-test";
    let payload = n.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut out = bytes.to_vec();
    out.extend_from_slice(&[0, size as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

fn cache_files(dir: &std::path::Path) -> (usize, u64) {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
        .collect();
    let bytes = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    (files.len(), bytes)
}

#[tokio::test]
async fn uploads_beyond_the_caps_prune_old_versions_and_cached_artifacts() {
    let app = TestApp::spawn_with(|s| {
        s.plugin_max_versions = 3;
        s.plugin_disk_cache_mib = 2;
        s.plugin_memory_cache_entries = 2;
        s.plugin_uploads_per_minute = 10_000;
        s.plugin_upload_burst = 10_000;
    })
    .await;
    let (_, token) = app.tenant_with_invoices().await;
    let module = plugin_bytes("no_negative_totals");
    let before = rss_mib();
    let uploads = 12;
    for n in 0..uploads {
        let resp = app
            .upload_plugin(&token, trivial_hook(), distinct(&module, n))
            .await;
        assert_eq!(resp.status(), 201, "upload {n}");
    }
    let dir = app.settings.plugin_cache_dir.clone().unwrap();
    let (files, bytes) = cache_files(&dir);
    eprintln!(
        "{uploads} uploads: RSS {before} -> {} MiB; disk cache {files} files, {bytes} bytes",
        rss_mib()
    );
    assert!(bytes <= 2 << 20, "{files} files, {bytes} bytes on disk");
    assert!(
        files <= 3,
        "{files} artifacts: only the kept versions' remain"
    );
    let plugin = body(app.get("/v1/plugins/no-negative-totals", &token).await).await;
    let versions: Vec<i64> = plugin["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [10, 11, 12], "only the newest 3 are kept");
    assert_eq!(plugin["activeVersion"], 12);
    // Rolling back to a kept version works; the next upload becomes the
    // active one, and the oldest inactive version goes.
    let back = app
        .put(
            "/v1/plugins/no-negative-totals/active",
            &token,
            &json!({"version": 10}),
        )
        .await;
    assert_eq!(back.status(), 200);
    let resp = app
        .upload_plugin(&token, trivial_hook(), distinct(&module, 99))
        .await;
    assert_eq!(resp.status(), 201);
    let plugin = body(app.get("/v1/plugins/no-negative-totals", &token).await).await;
    let kept: Vec<i64> = plugin["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(kept, [11, 12, 13]);
    // The active version still runs (from a cache or compiled again).
    let resp = app.post("/v1/data/invoices", &token, &invoice(1)).await;
    assert_eq!(resp.status(), 201);
    second_tenant_writes_fine(&app, 3).await;
}

#[test]
fn the_in_memory_component_cache_is_bounded() {
    use bss::plugins::sandbox::Caller;
    use bss::plugins::{Context, Kind, Limits, Runtime, RuntimeBounds};
    let scratch = bss_tests::TempDir::new("bss-test-cache");
    let cache = scratch.0.clone();
    // A pool of 7 instance slots, two components in memory. Engines are
    // shared per pool size within a process: no other test uses 7, so no
    // other test's calls (a flood of 8 at once, say) take these slots.
    let bounds = RuntimeBounds {
        instances: 7,
        memory_cache_entries: 2,
        ..RuntimeBounds::default()
    };
    let rt = Runtime::with_bounds(&cache, None, bounds).unwrap();
    let module = plugin_bytes("no_negative_totals");
    let shas: Vec<String> = (0..5)
        .map(|n| {
            rt.compile_upload(&distinct(&module, n), Kind::ValidationHook)
                .unwrap()
        })
        .collect();
    assert_eq!(rt.cached_in_memory(), 2);
    // An evicted one comes back from disk, and runs.
    let component = rt.cached(&shas[0]).unwrap();
    assert_eq!(rt.cached_in_memory(), 2);
    let caller = Caller {
        tenant: "t".into(),
        plugin: "no-negative-totals".into(),
        version: 1,
        services: vec![],
        queues_tasks: false,
    };
    let hook = rt
        .load(
            &component,
            Kind::ValidationHook,
            Limits::default(),
            "{}".into(),
            caller,
        )
        .unwrap();
    let ctx = Context {
        tenant_id: "t".into(),
        resource: "invoices".into(),
        operation: "create".into(),
        actor: "user:x".into(),
        request_id: "r".into(),
        config: "{}".into(),
    };
    let refused = rt
        .validate(&hook, &ctx, r#"{"number": "A", "total": -1}"#, None)
        .unwrap();
    let violations = refused.expect_err("a negative total is refused");
    assert_eq!(violations[0].path, "/total", "read intact out of the guest");
}

#[tokio::test]
async fn deep_recursion_is_reported_as_a_stack_overflow() {
    let app = TestApp::spawn().await;
    // Plain recursion exhausts wasmtime's call stack; recursion with large
    // locals runs the guest's own stack (in linear memory) below address 0
    // first, which the guest sees as an out-of-bounds access.
    for mode in ["recursion", "big-frames", "big-frames-raw"] {
        let (_, token) = app.tenant_with_invoices().await;
        app.install_plugin(&token, hostile(mode, json!({}), json!({})), "hostile")
            .await;
        let resp = app.post("/v1/data/invoices", &token, &invoice(1)).await;
        assert_eq!(resp.status(), 422, "{mode}");
        let problem = body(resp).await;
        assert_eq!(problem["errors"][0]["code"], "stack", "{mode}: {problem:#}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains("overflowed its stack"), "{detail}");
        assert!(detail.contains("recurse less deeply"), "{detail}");
    }
    second_tenant_writes_fine(&app, 3).await;
}

#[tokio::test]
async fn a_manifest_with_a_nul_character_is_refused_naming_the_path() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let mut manifest = trivial_hook();
    manifest["config"] = json!({"greeting": "hi\u{0}there", "list": ["ok"]});
    let resp = app
        .upload_plugin(&token, manifest, plugin_bytes("no_negative_totals"))
        .await;
    assert_eq!(resp.status(), 422);
    let problem = body(resp).await;
    assert_eq!(
        problem["errors"][0]["path"], "/manifest/config/greeting",
        "{problem:#}"
    );
    second_tenant_writes_fine(&app, 1).await;
}

#[tokio::test]
async fn plugin_metrics_name_no_tenant_or_plugin() {
    let app = TestApp::spawn().await;
    let (tenant, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, trivial_hook(), "no_negative_totals")
        .await;
    let resp = app.post("/v1/data/invoices", &token, &invoice(1)).await;
    assert_eq!(resp.status(), 201);
    let metrics = app
        .client
        .get(format!("{}/metrics", app.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let plugin_lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("plugin_"))
        .collect();
    assert!(
        plugin_lines
            .iter()
            .any(|l| l.starts_with("plugin_calls_total{outcome=\"ok\"}")),
        "{plugin_lines:#?}"
    );
    for line in plugin_lines {
        assert!(!line.contains("tenant="), "{line}");
        assert!(!line.contains("plugin="), "{line}");
        assert!(!line.contains(&tenant), "{line}");
    }
}

/// The tenant's `business_store.data.created` events marked by the slow
/// enricher.
async fn enriched_creations(app: &TestApp, token: &str) -> usize {
    event_log(app, token)
        .await
        .iter()
        .filter(|e| e["type"] == "business_store.data.created" && e["slow"] == true)
        .count()
}

#[tokio::test]
async fn an_enricher_gets_its_share_while_another_tenant_floods_a_slow_hook() {
    let app = TestApp::spawn_with(|s| {
        s.plugin_max_concurrent_calls = 8;
        s.plugin_slot_wait_ms = 1000;
        s.db_max_connections = 16;
    })
    .await;
    let (_, flooder) = app.tenant_with_invoices().await;
    let slow = hostile("sleep", json!({"ms": 200}), json!({"deadlineMs": 1000}));
    app.install_plugin(&flooder, slow, "hostile").await;
    let (_, enriching) = app.tenant_with_invoices().await;
    let manifest = json!({"name": "marker", "kind": "event-enricher", "resources": ["invoices"],
                          "config": {"sleepMs": 5}});
    app.install_plugin(&enriching, manifest, "slow_enricher")
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    // 60 writers on 8 slots: every slot is taken for the whole test.
    let floods = flood(&app, &flooder, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for i in 0..3 {
        let resp = app.post("/v1/data/invoices", &enriching, &invoice(i)).await;
        assert_eq!(resp.status(), 201);
    }
    let mut enriched = 0;
    while enriched < 3 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        enriched = enriched_creations(&app, &enriching).await;
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for f in floods {
        f.await.unwrap();
    }
    eprintln!("enriched {enriched} of 3 events in {took:?} during the flood");
    assert_eq!(enriched, 3, "events left unenriched during the flood");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

fn named_hook(name: &str) -> Value {
    json!({"name": name, "kind": "validation-hook", "resources": ["invoices"], "config": {}})
}

#[tokio::test]
async fn a_tenant_cannot_have_more_plugins_than_the_cap() {
    let app = TestApp::spawn_with(|s| s.plugin_max_per_tenant = 2).await;
    let (_, token) = app.tenant_with_invoices().await;
    let module = plugin_bytes("no_negative_totals");
    for name in ["first", "second"] {
        let resp = app
            .upload_plugin(&token, named_hook(name), module.clone())
            .await;
        assert_eq!(resp.status(), 201, "{name}");
    }
    let resp = app
        .upload_plugin(&token, named_hook("third"), module.clone())
        .await;
    assert_eq!(resp.status(), 409);
    let problem = body(resp).await;
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("(2)"), "the cap is named: {detail}");
    // A new version of an existing plugin is still fine.
    let resp = app
        .upload_plugin(&token, named_hook("second"), module.clone())
        .await;
    assert_eq!(resp.status(), 201);
    let plugin = body(app.get("/v1/plugins/second", &token).await).await;
    assert_eq!(plugin["activeVersion"], 2);
    let listed = body(app.get("/v1/plugins", &token).await).await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(2));
    // Deleting one makes room; another tenant has its own cap.
    assert_eq!(app.delete("/v1/plugins/first", &token).await.status(), 204);
    let resp = app
        .upload_plugin(&token, named_hook("third"), module.clone())
        .await;
    assert_eq!(resp.status(), 201);
    let (_, other) = app.tenant_with_invoices().await;
    let resp = app
        .upload_plugin(&other, named_hook("fourth"), module)
        .await;
    assert_eq!(resp.status(), 201);
}
