//! A validation hook's next version on trial beside the active one: a
//! shadow runs on real writes and is compared, never applied; a canary
//! answers its share; one call promotes or rolls back.

use std::time::Duration;

use bss_tests::*;
use serde_json::{Value, json};

const PLUGIN: &str = "/v1/plugins/no-negative-totals";

fn manifest(max_total: u64) -> Value {
    json!({"name": "no-negative-totals", "kind": "validation-hook",
           "resources": ["invoices"], "config": {"max_total": max_total}})
}

async fn write(app: &TestApp, token: &str, total: u64) -> u16 {
    let doc = json!({"number": format!("N-{total}"), "total": total});
    app.post("/v1/data/invoices", token, &doc)
        .await
        .status()
        .as_u16()
}

/// The hook versions that passed the write of record `id` (its event's
/// `bsshooks`), once the event is in the log.
async fn passed_by(app: &TestApp, token: &str, id: &str) -> Value {
    let subject = format!("invoices/{id}");
    for _ in 0..100 {
        let log = event_log(app, token).await;
        if let Some(e) = log.iter().find(|e| e["subject"] == subject.as_str()) {
            return e["bsshooks"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no event for {subject}");
}

async fn trial(app: &TestApp, token: &str) -> Value {
    body(app.get(PLUGIN, token).await).await["trial"].clone()
}

#[tokio::test]
async fn a_shadow_is_compared_never_applied_a_canary_answers_and_one_call_promotes() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(&token, manifest(1000), "no_negative_totals")
        .await;

    // Version 2, stricter, as a shadow: writes still get version 1's verdict.
    let resp = app
        .upload_plugin_to(
            "/v1/plugins?trial=shadow",
            &token,
            manifest(100),
            plugin_bytes("no_negative_totals"),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let uploaded = body(resp).await;
    assert_eq!(
        (uploaded["version"].as_i64(), uploaded["active"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(uploaded["trial"], "shadow");
    assert_eq!(
        write(&app, &token, 500).await,
        201,
        "the shadow's refusal is never applied"
    );
    assert_eq!(write(&app, &token, 50).await, 201);
    let mut shown = Value::Null;
    for _ in 0..50 {
        shown = trial(&app, &token).await;
        if shown["stats"]["agreements"] == 1 && shown["stats"]["disagreements"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (shown["version"].as_i64(), shown["mode"].as_str()),
        (Some(2), Some("shadow")),
        "{shown:#}"
    );
    assert_eq!(shown["stats"]["agreements"], 1, "{shown:#}");
    assert_eq!(shown["stats"]["disagreements"], 1, "{shown:#}");
    let example = &shown["stats"]["examples"][0];
    assert_eq!(example["record"]["total"], 500);
    assert_eq!(example["active"]["verdict"], "accepted");
    assert_eq!(example["trial"]["verdict"], "refused");

    // The same version as a canary for every write: its verdict applies.
    let canary = json!({"version": 2, "mode": "canary", "percent": 100});
    assert_eq!(
        app.put(&format!("{PLUGIN}/trial"), &token, &canary)
            .await
            .status(),
        200
    );
    assert_eq!(write(&app, &token, 500).await, 422, "the canary answers");
    assert_eq!(trial(&app, &token).await["stats"]["calls"], 1);

    // Audit: each write's event names the hook version that passed it.
    let doc = json!({"number": "by-canary", "total": 7});
    let by_canary = body(app.post("/v1/data/invoices", &token, &doc).await).await;
    assert_eq!(
        passed_by(&app, &token, by_canary["id"].as_str().unwrap()).await,
        "no-negative-totals@2"
    );

    // Rolled back with one call: version 1 answers again.
    let ended = app.delete(&format!("{PLUGIN}/trial"), &token).await;
    assert_eq!(ended.status(), 200);
    assert_eq!(write(&app, &token, 500).await, 201);
    let doc = json!({"number": "by-active", "total": 8});
    let by_active = body(app.post("/v1/data/invoices", &token, &doc).await).await;
    assert_eq!(
        passed_by(&app, &token, by_active["id"].as_str().unwrap()).await,
        "no-negative-totals@1"
    );
    assert!(trial(&app, &token).await.is_null());
    assert_eq!(
        app.delete(&format!("{PLUGIN}/trial"), &token)
            .await
            .status(),
        404
    );

    // Promoted with one call: version 2 is the active one.
    let half = json!({"version": 2, "mode": "canary", "percent": 50});
    assert_eq!(
        app.put(&format!("{PLUGIN}/trial"), &token, &half)
            .await
            .status(),
        200
    );
    let promoted = app
        .post(&format!("{PLUGIN}/trial/promote"), &token, &json!({}))
        .await;
    assert_eq!(promoted.status(), 200);
    let detail = body(app.get(PLUGIN, &token).await).await;
    assert_eq!(detail["activeVersion"], 2);
    assert!(detail["trial"].is_null());
    assert_eq!(write(&app, &token, 500).await, 422);
}

#[tokio::test]
async fn a_trial_that_cannot_run_is_refused_with_the_reason() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let module = || plugin_bytes("no_negative_totals");
    // Nothing active to run beside.
    let first = app
        .upload_plugin_to("/v1/plugins?trial=shadow", &token, manifest(10), module())
        .await;
    assert_eq!(first.status(), 409);
    assert!(
        body(first).await["detail"]
            .as_str()
            .unwrap()
            .contains("no active version")
    );
    app.install_plugin(&token, manifest(10), "no_negative_totals")
        .await;
    for (query, status) in [
        ("trial=canary", 422),
        ("trial=shadow&percent=5", 422),
        ("trial=canary&percent=0", 422),
        ("percent=5", 422),
        ("trial=blue", 400),
    ] {
        let resp = app
            .upload_plugin_to(
                &format!("/v1/plugins?{query}"),
                &token,
                manifest(10),
                module(),
            )
            .await;
        assert_eq!(resp.status(), status, "{query}");
    }
    // The active version itself, or one that does not exist, cannot go on trial.
    for version in [1, 9] {
        let asked = json!({"version": version, "mode": "shadow"});
        assert_eq!(
            app.put(&format!("{PLUGIN}/trial"), &token, &asked)
                .await
                .status(),
            404
        );
    }
    assert_eq!(
        app.post(&format!("{PLUGIN}/trial/promote"), &token, &json!({}))
            .await
            .status(),
        404
    );
}

/// The events of created invoices in the log, by their `number`.
async fn created_events(app: &TestApp, token: &str, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let created: Vec<Value> = event_log(app, token)
            .await
            .into_iter()
            .filter(|e| e["type"] == "business_store.data.created")
            .collect();
        if created.len() >= n {
            return created;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} created events");
}

#[tokio::test]
async fn an_enricher_on_trial_a_shadow_compared_on_real_events_a_canary_making_them() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let mut schema = invoice_schema();
    schema["x-event-payload"] = json!("full");
    assert_eq!(
        app.put_schema("invoices", &token, schema).await.status(),
        201
    );
    let marks = |threshold: u64| {
        json!({"name": "marks", "kind": "event-enricher", "resources": ["invoices"],
               "config": {"threshold": threshold}})
    };
    app.install_plugin(&token, marks(100), "large_invoices")
        .await;
    // Version 2 marks "large" from 1,000 on, as a shadow.
    let resp = app
        .upload_plugin_to(
            "/v1/plugins?trial=shadow",
            &token,
            marks(1000),
            plugin_bytes("large_invoices"),
        )
        .await;
    assert_eq!(resp.status(), 201);
    for total in [50, 500, 5000] {
        assert_eq!(write(&app, &token, total).await, 201);
    }
    let created = created_events(&app, &token, 3).await;
    let large: Vec<&Value> = created.iter().map(|e| &e["large"]).collect();
    assert_eq!(
        large,
        [false, true, true],
        "the shadow's events are never used"
    );
    assert!(created.iter().all(|e| e["bssenrichers"] == "marks@1"));
    let mut shown = Value::Null;
    for _ in 0..50 {
        shown = body(app.get("/v1/plugins/marks", &token).await).await["trial"].clone();
        if shown["stats"]["calls"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = &shown["stats"];
    assert_eq!(
        (
            stats["agreements"].as_u64(),
            stats["disagreements"].as_u64()
        ),
        (Some(2), Some(1)),
        "{shown:#}"
    );
    let example = &stats["examples"][0];
    assert_eq!(
        example["event"]["data"]["data"]["total"], 500,
        "{example:#}"
    );
    assert_eq!(example["active"]["verdict"], "enriched");
    assert_eq!(example["active"]["detail"]["large"], true);
    assert_eq!(example["trial"]["detail"]["large"], false);

    // As a canary for every event: its events are the ones published.
    let canary = json!({"version": 2, "mode": "canary", "percent": 100});
    assert_eq!(
        app.put("/v1/plugins/marks/trial", &token, &canary)
            .await
            .status(),
        200
    );
    assert_eq!(write(&app, &token, 700).await, 201);
    let created = created_events(&app, &token, 4).await;
    assert_eq!(created[3]["large"], false, "{:#}", created[3]);
    assert_eq!(created[3]["bssenrichers"], "marks@2");

    // Promoted with one call.
    let promoted = app
        .post("/v1/plugins/marks/trial/promote", &token, &json!({}))
        .await;
    assert_eq!(promoted.status(), 200);
    let shown = body(app.get("/v1/plugins/marks", &token).await).await;
    assert_eq!(shown["activeVersion"], 2, "{shown:#}");
    assert!(shown["trial"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_shadow_flooded_by_one_tenant_leaves_another_tenants_writes_alone() {
    let app = TestApp::spawn_with(|s| {
        s.plugin_max_concurrent_calls = 4;
        s.plugin_slot_wait_ms = 1000;
    })
    .await;
    let (_, loud) = app.tenant_with_invoices().await;
    let (_, quiet) = app.tenant_with_invoices().await;
    for token in [&loud, &quiet] {
        app.install_plugin(token, manifest(1000), "no_negative_totals")
            .await;
    }
    // The loud tenant's shadow sleeps to its deadline on every write.
    let mut slow = manifest(1000);
    slow["limits"] = json!({"deadlineMs": 300});
    let resp = app
        .upload_plugin_to(
            "/v1/plugins?trial=shadow",
            &loud,
            slow,
            plugin_bytes("sleeper"),
        )
        .await;
    assert_eq!(resp.status(), 201);

    let flood: Vec<_> = (0..40)
        .map(|i| {
            let (app, token) = (&app, loud.clone());
            async move { write(app, &token, i).await }
        })
        .collect();
    let watched: Vec<_> = (0..10)
        .map(|i| {
            let (app, token) = (&app, quiet.clone());
            async move { write(app, &token, 100 + i).await }
        })
        .collect();
    let (loud_codes, quiet_codes) = tokio::join!(
        futures::future::join_all(flood),
        futures::future::join_all(watched)
    );
    assert!(quiet_codes.iter().all(|c| *c == 201), "{quiet_codes:?}");
    assert!(
        loud_codes.iter().all(|c| *c == 201),
        "the shadow never fails a write: {loud_codes:?}"
    );
    let stats = trial(&app, &loud).await["stats"].clone();
    assert_eq!(stats["agreements"].as_u64().unwrap_or(0), 0, "{stats:#}");
    let ran = stats["calls"].as_u64().unwrap() + stats["skipped"].as_u64().unwrap();
    assert!(ran >= 1, "{stats:#}");
}
