//! Plugins through the real upload and call paths: hooks in the write path,
//! versions and rollback, refused uploads, enrichers in the relay, the
//! disk cache across a restart.

use std::time::Duration;

use bss_tests::fake_services::task_service;
use bss_tests::*;
use serde_json::{Value, json};

fn hook_manifest(config: Value) -> Value {
    json!({"name": "no-negative-totals", "kind": "validation-hook",
           "resources": ["invoices"], "config": config})
}

async fn count(app: &TestApp, token: &str) -> u64 {
    let resp = app.get("/v1/data/invoices?count=exact", token).await;
    body(resp).await["total"].as_u64().unwrap()
}

#[tokio::test]
async fn a_hook_refuses_with_its_message_and_a_rollback_accepts_again() {
    let app = TestApp::spawn().await;
    let (tenant, token) = app.tenant_with_invoices().await;
    let v1 = app
        .install_plugin(
            &token,
            hook_manifest(json!({"max_total": 1000})),
            "no_negative_totals",
        )
        .await;
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["active"], true);
    assert_eq!(v1["kind"], "validation-hook");
    assert_eq!(v1["sha256"].as_str().unwrap().len(), 64);
    let ok = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A", "total": 500}),
        )
        .await;
    assert_eq!(ok.status(), 201);

    let v2 = app
        .install_plugin(
            &token,
            hook_manifest(json!({"max_total": 100})),
            "no_negative_totals",
        )
        .await;
    assert_eq!(v2["version"], 2);
    let refused = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "B", "total": 500}),
        )
        .await;
    assert_eq!(refused.status(), 422);
    let problem = body(refused).await;
    assert_eq!(problem["errors"][0]["source"], "plugin:no-negative-totals");
    assert_eq!(problem["errors"][0]["path"], "/total");
    assert_eq!(
        problem["errors"][0]["message"],
        format!("a total cannot exceed 100 for {tenant}")
    );
    assert_eq!(
        count(&app, &token).await,
        1,
        "nothing stored for the refusal"
    );

    // Every write path asks the hook: replace, patch, batch (per item).
    let id = body(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "C", "total": 5}),
        )
        .await,
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let put = app
        .put(
            &format!("/v1/data/invoices/{id}"),
            &token,
            &json!({"number": "C", "total": 101}),
        )
        .await;
    assert_eq!(put.status(), 422);
    let patch = app
        .patch(
            &format!("/v1/data/invoices/{id}"),
            &token,
            &json!({"total": 150}),
        )
        .await;
    assert_eq!(patch.status(), 422);
    assert_eq!(
        body(patch).await["errors"][0]["source"],
        "plugin:no-negative-totals"
    );
    let batch = app
        .post(
            "/v1/data/invoices/batch",
            &token,
            &json!({"items": [{"number": "D", "total": 1}, {"number": "E", "total": 200}]}),
        )
        .await;
    assert_eq!(batch.status(), 422);
    assert_eq!(body(batch).await["errors"][0]["path"], "/items/1/total");
    assert_eq!(count(&app, &token).await, 2);
    // Deletes are not checked unless the manifest asks.
    assert_eq!(
        app.delete(&format!("/v1/data/invoices/{id}"), &token)
            .await
            .status(),
        204
    );

    // Roll back to version 1: the same record is accepted.
    let back = app
        .put(
            "/v1/plugins/no-negative-totals/active",
            &token,
            &json!({"version": 1}),
        )
        .await;
    assert_eq!(back.status(), 200);
    let detail = body(back).await;
    assert_eq!(detail["activeVersion"], 1);
    assert_eq!(detail["versions"].as_array().unwrap().len(), 2);
    let again = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "B", "total": 500}),
        )
        .await;
    assert_eq!(again.status(), 201);

    let stats =
        body(app.get("/v1/plugins/no-negative-totals", &token).await).await["stats"].clone();
    assert!(stats["calls"].as_u64().unwrap() >= 7, "{stats}");
    assert!(stats["rejections"].as_u64().unwrap() >= 4, "{stats}");
    assert_eq!(stats["failures"], 0);
    assert!(stats["p50Ms"].as_f64().is_some() && stats["p99Ms"].as_f64().is_some());
    assert_eq!(stats["breaker"], "closed");
    let list = body(app.get("/v1/plugins", &token).await).await;
    assert_eq!(list["items"][0]["name"], "no-negative-totals");

    // Unknown version, then delete: writes are unchecked again.
    let missing = app
        .put(
            "/v1/plugins/no-negative-totals/active",
            &token,
            &json!({"version": 9}),
        )
        .await;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        app.delete("/v1/plugins/no-negative-totals", &token)
            .await
            .status(),
        204
    );
    assert_eq!(
        app.get("/v1/plugins/no-negative-totals", &token)
            .await
            .status(),
        404
    );
    let free = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "F", "total": 5000}),
        )
        .await;
    assert_eq!(free.status(), 201);
}

#[tokio::test]
async fn plugins_are_admin_only_and_invisible_to_other_tenants() {
    let app = TestApp::spawn().await;
    let (tenant, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, hook_manifest(json!({})), "no_negative_totals")
        .await;
    let writer = bss_tests::token(&tenant, &["writer"]);
    let resp = app
        .upload_plugin(
            &writer,
            hook_manifest(json!({})),
            plugin_bytes("no_negative_totals"),
        )
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(app.get("/v1/plugins", &writer).await.status(), 403);

    let (_, other) = app.tenant_with_invoices().await;
    assert_eq!(
        app.get("/v1/plugins/no-negative-totals", &other)
            .await
            .status(),
        404
    );
    assert_eq!(
        body(app.get("/v1/plugins", &other).await).await["items"],
        json!([])
    );
    assert_eq!(
        app.put(
            "/v1/plugins/no-negative-totals/active",
            &other,
            &json!({"version": 1})
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.delete("/v1/plugins/no-negative-totals", &other)
            .await
            .status(),
        404
    );
    // The other tenant's writes are not checked by this tenant's hook.
    let resp = app
        .post(
            "/v1/data/invoices",
            &other,
            &json!({"number": "X", "total": -5}),
        )
        .await;
    assert_eq!(resp.status(), 422, "the schema's minimum still applies");
    let problem = body(resp).await;
    assert_eq!(problem["errors"][0]["source"], "schema");
}

async fn refused(app: &TestApp, token: &str, manifest: Value, module: Vec<u8>) -> (u16, Value) {
    let resp = app.upload_plugin(token, manifest, module).await;
    let status = resp.status().as_u16();
    (status, body(resp).await)
}

#[tokio::test]
async fn uploads_that_are_not_plugins_are_refused_with_the_reason() {
    let app = TestApp::spawn_with(|s| s.plugin_max_module_bytes = 200_000).await;
    let (_, token) = app.tenant_with_invoices().await;
    let manifest = hook_manifest(json!({}));

    let (status, p) = refused(
        &app,
        &token,
        manifest.clone(),
        b"definitely not wasm".to_vec(),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        p["detail"].as_str().unwrap().contains("not WebAssembly"),
        "{p}"
    );

    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let (status, p) = refused(&app, &token, manifest.clone(), core_module).await;
    assert_eq!(status, 422);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("core WebAssembly module, not a component"),
        "{p}"
    );

    let mut truncated = plugin_bytes("no_negative_totals");
    truncated.truncate(truncated.len() / 2);
    let (status, p) = refused(&app, &token, manifest.clone(), truncated).await;
    assert_eq!(status, 422);
    assert!(
        p["detail"].as_str().unwrap().contains("does not compile"),
        "{p}"
    );

    // An enricher uploaded as a validation hook.
    let (status, p) = refused(
        &app,
        &token,
        manifest.clone(),
        plugin_bytes("task_scheduler"),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("does not implement the validation-hook world"),
        "{p}"
    );

    let (status, p) = refused(&app, &token, manifest.clone(), vec![0; 300_000]).await;
    assert_eq!(status, 422);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("larger than the limit of 200000 bytes"),
        "{p}"
    );

    let greedy = json!({"name": "greedy", "kind": "validation-hook", "resources": ["*"],
                        "limits": {"deadlineMs": 5000, "memoryMib": 512}});
    let (status, p) = refused(&app, &token, greedy, plugin_bytes("no_negative_totals")).await;
    assert_eq!(status, 422);
    let paths: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["/manifest/limits/deadlineMs", "/manifest/limits/memoryMib"]
    );
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("ceiling of 1000 ms")
    );

    let unknown =
        json!({"name": "x", "kind": "validation-hook", "resources": ["*"], "colour": "red"});
    let (status, p) = refused(&app, &token, unknown, plugin_bytes("no_negative_totals")).await;
    assert_eq!(status, 422);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{p}"
    );

    let form = reqwest::multipart::Form::new().text("manifest", manifest.to_string());
    let resp = send(
        app.request(reqwest::Method::POST, "/v1/plugins", Some(&token))
            .multipart(form),
    )
    .await;
    assert_eq!(resp.status(), 422);
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("no `module` part")
    );

    // A name keeps its kind.
    app.install_plugin(&token, manifest, "no_negative_totals")
        .await;
    let enricher =
        json!({"name": "no-negative-totals", "kind": "event-enricher", "resources": ["*"]});
    let (status, _) = refused(&app, &token, enricher, plugin_bytes("task_scheduler")).await;
    assert_eq!(status, 409);
    assert_eq!(
        body(app.get("/v1/plugins", &token).await).await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

fn scheduler_manifest(extra: Value) -> Value {
    let mut m = json!({"name": "task-scheduler", "kind": "event-enricher",
                       "resources": ["invoices"], "services": ["task"],
                       "config": {"task": "regenerate-embeddings"}});
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(extra.clone());
    }
    m
}

#[tokio::test]
async fn an_enricher_adds_to_events_in_the_log_and_on_the_stream() {
    let (tasks, seen) = task_service().await;
    let app = TestApp::spawn_with(|s| s.task_service_url = Some(tasks.url.clone())).await;
    let (tenant, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, scheduler_manifest(json!({})), "task_scheduler")
        .await;
    let mut stream = SseReader::open(&app, &token, None).await;
    let created = body(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A", "total": 1}),
        )
        .await,
    )
    .await;
    let event = loop {
        let e = stream.next().await;
        if e.event == "business_store.data.created" {
            break e.data;
        }
    };
    // The task is queued with the event, then sent: the event names the
    // queued task; the task, once sent, the Task Service's id for it.
    let task_id = event["scheduledtask"].as_str().unwrap().to_owned();
    assert_eq!(
        event["data"]["task"],
        json!({"name": "regenerate-embeddings", "id": task_id})
    );
    assert_eq!(event["data"]["recordId"], created["id"]);
    assert_eq!(event["tenantid"], tenant.as_str());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let task = loop {
        let task = body(app.get(&format!("/v1/tasks/{task_id}"), &token).await).await;
        if task["status"] == "scheduled" {
            break task;
        }
        assert!(std::time::Instant::now() < deadline, "{task:#}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(task["remoteId"], "task-0");
    let asked = seen.lock().unwrap()[0].clone();
    assert_eq!(asked["task"], "regenerate-embeddings");
    assert_eq!(asked["tenantId"], tenant.as_str());
    assert_eq!(
        asked["event"]["subject"],
        format!("invoices/{}", created["id"].as_str().unwrap())
    );
    // Replay shows the same enriched event.
    let log = event_log(&app, &token).await;
    let replayed = log
        .iter()
        .find(|e| e["type"] == "business_store.data.created")
        .unwrap();
    assert_eq!(replayed["scheduledtask"], task_id.as_str());
    // Schema events are not bound to the enricher's resources.
    assert_eq!(tasks.calls(), 1);
}

#[tokio::test]
async fn a_failing_enricher_lets_the_original_event_through_and_is_counted() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    // One unit of fuel: every call fails.
    app.install_plugin(
        &token,
        scheduler_manifest(json!({"limits": {"fuel": 1}})),
        "task_scheduler",
    )
    .await;
    for n in 0..3 {
        let resp = app
            .post(
                "/v1/data/invoices",
                &token,
                &json!({"number": n.to_string(), "total": 1}),
            )
            .await;
        assert_eq!(resp.status(), 201);
    }
    let log = wait_for_events(&app, &token, 4).await;
    let created: Vec<&Value> = log
        .iter()
        .filter(|e| e["type"] == "business_store.data.created")
        .collect();
    assert_eq!(created.len(), 3, "no event lost");
    assert!(created.iter().all(|e| e.get("scheduledtask").is_none()));
    let stats = body(app.get("/v1/plugins/task-scheduler", &token).await).await["stats"].clone();
    assert_eq!(stats["failures"], 3, "{stats}");
    assert_eq!(stats["failuresByKind"]["fuel"], 3);
    assert!(
        stats["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("fuel budget of 1")
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("plugin_failures_total{"),
        "per-plugin failure metric"
    );
    assert!(metrics.contains("kind=\"fuel\""));
}

#[tokio::test]
async fn a_restarted_service_loads_plugins_from_its_disk_cache() {
    let first = TestApp::spawn().await;
    let (_, token) = first.tenant_with_invoices().await;
    let uploaded = first
        .install_plugin(
            &token,
            hook_manifest(json!({"max_total": 10})),
            "no_negative_totals",
        )
        .await;
    let sha = uploaded["sha256"].as_str().unwrap().to_owned();
    let cache = first.settings.plugin_cache_dir.clone().unwrap();
    let artifact = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&sha) && name.ends_with(".cwasm")
        })
        .expect("compiled once, cached on disk");
    let modified = std::fs::metadata(&artifact).unwrap().modified().unwrap();

    // A second replica on the same database and cache (a restart).
    let same = first.settings.clone();
    let second = TestApp::spawn_with(move |s| {
        s.database_url = same.database_url.clone();
        s.plugin_cache_dir = same.plugin_cache_dir.clone();
    })
    .await;
    let resp = second
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A", "total": 11}),
        )
        .await;
    assert_eq!(resp.status(), 422, "the hook runs on the restarted replica");
    assert_eq!(
        std::fs::metadata(&artifact).unwrap().modified().unwrap(),
        modified,
        "not recompiled"
    );

    // A tampered artifact is never loaded: the plugin is compiled again.
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();
    let same = first.settings.clone();
    let third = TestApp::spawn_with(move |s| {
        s.database_url = same.database_url.clone();
        s.plugin_cache_dir = same.plugin_cache_dir.clone();
    })
    .await;
    let resp = third
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "B", "total": 11}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    assert_ne!(
        std::fs::read(&artifact).unwrap(),
        bytes,
        "rewritten from a fresh compile"
    );

    // Changes on one replica reach the others.
    assert_eq!(
        first
            .delete("/v1/plugins/no-negative-totals", &token)
            .await
            .status(),
        204
    );
    let mut accepted = false;
    for _ in 0..50 {
        let resp = second
            .post(
                "/v1/data/invoices",
                &token,
                &json!({"number": "C", "total": 11}),
            )
            .await;
        if resp.status() == 201 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the other replica dropped the deleted hook");
}

/// The transformer world through the runtime directly (deliveries through
/// a transformer: `webhooks.rs`).
#[test]
fn a_webhook_transformer_rewrites_or_cancels_a_delivery() {
    use bss::plugins::sandbox::Caller;
    use bss::plugins::{Context, Kind, Limits, Runtime, WebhookRequest};
    let scratch = bss_tests::TempDir::new("bss-test-cache");
    let cache = scratch.0.clone();
    let rt = Runtime::new(&cache, None).unwrap();
    let bytes = plugin_bytes("webhook_chat");
    assert!(
        rt.compile_upload(&bytes, Kind::ValidationHook).is_err(),
        "not a hook"
    );
    let sha = rt.compile_upload(&bytes, Kind::WebhookTransformer).unwrap();
    let component = rt.cached(&sha).unwrap();
    let caller = Caller {
        tenant: "t".into(),
        plugin: "webhook-chat".into(),
        version: 1,
        services: vec![],
        queues_tasks: false,
    };
    let load = |config: &str| {
        rt.load(
            &component,
            Kind::WebhookTransformer,
            Limits::default(),
            config.into(),
            caller.clone(),
        )
        .unwrap()
    };
    let ctx = |config: &str| Context {
        tenant_id: "t".into(),
        resource: "invoices".into(),
        operation: "business_store.data.created".into(),
        actor: "user:x".into(),
        request_id: "r".into(),
        config: config.into(),
    };
    let request = WebhookRequest {
        method: "POST".into(),
        path: "/hooks/1".into(),
        headers: vec![("content-type".into(), "application/cloudevents+json".into())],
        body: "{}".into(),
    };
    let event = json!({"type": "business_store.data.created", "subject": "invoices/7"}).to_string();
    let out = rt
        .transform(&load("{}"), &ctx("{}"), &event, &request)
        .unwrap()
        .unwrap();
    assert_eq!(
        out.body,
        r#"{"text":"business_store.data.created invoices/7"}"#
    );
    assert_eq!(out.path, "/hooks/1");
    let skip = r#"{"skip": ["business_store.data.created"]}"#;
    assert!(
        rt.transform(&load(skip), &ctx(skip), &event, &request)
            .unwrap()
            .is_none()
    );
    let _ = std::fs::remove_dir_all(cache);
}

#[tokio::test]
async fn a_platform_admin_lowers_a_tenants_ceilings() {
    let app = TestApp::spawn().await;
    let (tenant, token) = app.tenant_with_invoices().await;
    let path = format!("/v1/tenants/{tenant}/plugin-ceilings");
    let platform = platform_token();
    assert_eq!(
        app.get(&path, &token).await.status(),
        403,
        "not for tenant admins"
    );
    let start = body(app.get(&path, &platform).await).await;
    assert_eq!(start["deadlineMs"], 1000);
    assert_eq!(start["memoryMib"], 64);

    let above = app
        .put(&path, &platform, &json!({"deadlineMs": 5000}))
        .await;
    assert_eq!(above.status(), 422);
    assert_eq!(body(above).await["errors"][0]["path"], "/deadlineMs");

    let set = app
        .put(
            &path,
            &platform,
            &json!({"deadlineMs": 100, "memoryMib": 8}),
        )
        .await;
    assert_eq!(set.status(), 200);
    let set = body(set).await;
    assert_eq!(
        (set["deadlineMs"].clone(), set["memoryMib"].clone()),
        (json!(100), json!(8))
    );
    assert_eq!(set["fuel"], 100_000_000);

    let manifest = json!({"name": "slow", "kind": "validation-hook", "resources": ["*"],
                          "limits": {"deadlineMs": 200}});
    let resp = app
        .upload_plugin(&token, manifest, plugin_bytes("no_negative_totals"))
        .await;
    assert_eq!(resp.status(), 422);
    let problem = body(resp).await;
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("ceiling of 100 ms"),
        "{problem}"
    );
    // Defaults (16 MiB) above the tenant's memory ceiling are refused too:
    // the manifest must ask for what the tenant may have.
    let fits = json!({"name": "fits", "kind": "validation-hook", "resources": ["*"],
                      "limits": {"deadlineMs": 100, "memoryMib": 8}});
    app.install_plugin(&token, fits, "no_negative_totals").await;
}

#[tokio::test]
async fn the_default_forwarder_hook_applies_the_validation_services_verdict() {
    use bss_tests::fake_services::{Behaviour, validation_service};
    let validation = validation_service(Behaviour::Valid).await;
    let app =
        TestApp::spawn_with(|s| s.validation_service_url = Some(validation.url.clone())).await;
    let (_, token) = app.tenant_with_invoices().await;
    let manifest = json!({"name": "validation-forwarder", "kind": "validation-hook",
                          "resources": ["invoices"], "services": ["validation"]});
    app.install_plugin(&token, manifest, "validation_forwarder")
        .await;
    let ok = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A", "total": 100}),
        )
        .await;
    assert_eq!(ok.status(), 201);
    let refused = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "B", "total": 101}),
        )
        .await;
    assert_eq!(refused.status(), 422);
    let problem = body(refused).await;
    assert_eq!(
        problem["errors"][0],
        json!({"path": "/total", "message": "over the customer's credit limit",
               "source": "plugin:validation-forwarder", "code": "credit"})
    );

    // Without the grant, forward answers an error and the hook refuses.
    let (_, other) = app.tenant_with_invoices().await;
    let ungranted = json!({"name": "validation-forwarder", "kind": "validation-hook", "resources": ["invoices"]});
    app.install_plugin(&other, ungranted, "validation_forwarder")
        .await;
    let resp = app
        .post(
            "/v1/data/invoices",
            &other,
            &json!({"number": "A", "total": 1}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    let message = body(resp).await["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("not granted the \"validation\" service"),
        "{message}"
    );
}

#[tokio::test]
async fn an_enricher_can_mark_events_and_drop_them() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let mut schema = invoice_schema();
    schema["x-event-payload"] = json!("full");
    schema["properties"]["status"]["enum"] = json!(["draft", "open", "paid", "void"]);
    assert_eq!(
        app.put_schema("invoices", &token, schema).await.status(),
        201
    );
    let manifest = json!({"name": "large-invoices", "kind": "event-enricher",
                          "resources": ["invoices"], "config": {"threshold": 100}});
    app.install_plugin(&token, manifest, "large_invoices").await;
    let mut ids = Vec::new();
    for (total, status) in [(150, "open"), (5, "draft"), (50, "open")] {
        let doc = json!({"number": total.to_string(), "total": total, "status": status});
        let created = body(app.post("/v1/data/invoices", &token, &doc).await).await;
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let log = wait_for_events(&app, &token, 3).await;
    let created: Vec<&Value> = log
        .iter()
        .filter(|e| e["type"] == "business_store.data.created")
        .collect();
    let subjects: Vec<String> = created
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        subjects,
        [
            format!("invoices/{}", ids[0]),
            format!("invoices/{}", ids[2])
        ],
        "the draft's event was dropped, the others kept their order"
    );
    assert_eq!(created[0]["large"], true);
    assert_eq!(created[1]["large"], false);
    // Audit: the enricher version that made each event.
    assert_eq!(created[0]["bssenrichers"], "large-invoices@1");
    let stats = body(app.get("/v1/plugins/large-invoices", &token).await).await["stats"].clone();
    assert_eq!(stats["calls"], 3);
}

#[tokio::test]
async fn an_idempotent_replay_answers_the_first_result_whatever_the_hooks_say_now() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(
        &token,
        hook_manifest(json!({"max_total": 1000})),
        "no_negative_totals",
    )
    .await;
    let create = |key: &'static str| {
        app.request(reqwest::Method::POST, "/v1/data/invoices", Some(&token))
            .header("idempotency-key", key)
            .json(&json!({"number": "A", "total": 500}))
    };
    let first = send(create("k-1")).await;
    assert_eq!(first.status(), 201);
    let first = body(first).await;
    // A stricter version now refuses such records, but the replay is the
    // first result, not a new decision.
    app.install_plugin(
        &token,
        hook_manifest(json!({"max_total": 100})),
        "no_negative_totals",
    )
    .await;
    let again = send(create("k-1")).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(body(again).await["id"], first["id"]);
    assert_eq!(
        send(create("k-2")).await.status(),
        422,
        "a new key is checked"
    );
}

#[tokio::test]
async fn a_hook_bound_to_a_resource_without_a_schema_is_refused_naming_the_tenants_resources() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let typo =
        json!({"name": "typo", "kind": "validation-hook", "resources": ["invoices", "invoice"]});
    let resp = app
        .upload_plugin(&token, typo, plugin_bytes("no_negative_totals"))
        .await;
    assert_eq!(resp.status(), 422);
    let problem = body(resp).await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("resources: invoices"), "{detail}");
    assert_eq!(problem["errors"][0]["path"], "/manifest/resources/1");
    assert_eq!(problem["errors"].as_array().unwrap().len(), 1);

    // Said on purpose, for a schema created later: accepted.
    let later = json!({"name": "later", "kind": "validation-hook", "resources": ["orders"],
                       "allowMissingResources": true});
    let resp = app
        .upload_plugin(&token, later, plugin_bytes("no_negative_totals"))
        .await;
    assert_eq!(resp.status(), 201);
}
