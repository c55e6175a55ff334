use std::time::Duration;

use bss_tests::fake_services::{Behaviour, nothing_listening, validation_service};
use bss_tests::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn every_change_is_a_new_version_and_history_is_kept() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let v1 = app.put_schema("invoices", &token, invoice_schema()).await;
    assert_eq!(v1.status(), 201);
    let v1 = body(v1).await;
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["resource"], "invoices");
    assert_eq!(v1["createdBy"], "user:tester");

    let same = app.put_schema("invoices", &token, invoice_schema()).await;
    assert_eq!(same.status(), 200);
    assert_eq!(body(same).await["version"], 1);

    let mut s2 = invoice_schema();
    s2["properties"]["note"] = json!({"type": "string"});
    let v2 = app.put_schema("invoices", &token, s2).await;
    assert_eq!(v2.status(), 201);
    assert_eq!(body(v2).await["version"], 2);

    let current = body(app.get("/v1/schemas/invoices", &token).await).await;
    assert_eq!(current["version"], 2);
    assert!(current["schema"]["properties"]["note"].is_object());
    let history = body(app.get("/v1/schemas/invoices/versions", &token).await).await;
    let versions: Vec<i64> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, vec![1, 2]);
    let first = body(app.get("/v1/schemas/invoices/versions/1", &token).await).await;
    assert!(first["schema"]["properties"].get("note").is_none());
    assert_eq!(
        app.get("/v1/schemas/invoices/versions/9", &token)
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("/v1/schemas/invoices/versions/x", &token)
            .await
            .status(),
        400
    );

    let list = body(app.get("/v1/schemas", &token).await).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(app.get("/v1/schemas/nothing", &token).await.status(), 404);
}

#[tokio::test]
async fn an_invalid_schema_is_refused_with_what_to_fix() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let resp = app
        .put(
            "/v1/schemas/invoices",
            &token,
            &json!({"schema": {"type": "object", "properties": {"a": {"type": "bogus"}}}}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    let b = body(resp).await;
    assert!(
        b["errors"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/schema"),
        "{b}"
    );
    let resp = app
        .put(
            "/v1/schemas/invoices",
            &token,
            &json!({"schema": {"type": "array"}}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    let resp = app
        .put("/v1/schemas/invoices", &token, &json!({"nope": {}}))
        .await;
    assert_eq!(resp.status(), 422);
    let resp = app
        .put(
            "/v1/schemas/Bad-Name",
            &token,
            &json!({"schema": invoice_schema()}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("resource name")
    );
}

#[tokio::test]
async fn a_change_that_stored_records_would_violate_is_refused_naming_them() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let ok = body(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "1", "total": 5}),
        )
        .await,
    )
    .await;
    let big = body(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "2", "total": 500}),
        )
        .await,
    )
    .await;
    let mut stricter = invoice_schema();
    stricter["properties"]["total"]["maximum"] = json!(100);
    let resp = app.put_schema("invoices", &token, stricter.clone()).await;
    assert_eq!(resp.status(), 409);
    let b = body(resp).await;
    let big_id = big["id"].as_str().unwrap();
    assert!(b["detail"].as_str().unwrap().contains(big_id), "{b}");
    assert_eq!(b["errors"][0]["recordId"], big_id);
    assert_eq!(b["errors"][0]["path"], "/total");
    assert!(
        !b["detail"]
            .as_str()
            .unwrap()
            .contains(ok["id"].as_str().unwrap())
    );
    // Nothing changed.
    assert_eq!(
        body(app.get("/v1/schemas/invoices", &token).await).await["version"],
        1
    );
    // Once the record is fixed the change goes through.
    let fixed = app
        .put(
            &format!("/v1/data/invoices/{big_id}"),
            &token,
            &json!({"number": "2", "total": 50}),
        )
        .await;
    assert_eq!(fixed.status(), 200);
    let resp = app.put_schema("invoices", &token, stricter).await;
    assert_eq!(resp.status(), 201);
}

#[tokio::test]
async fn x_index_fields_get_an_index_and_lose_it_when_unmarked() {
    let app = TestApp::spawn().await;
    let (tenant, token) = app.tenant_with_invoices().await;
    let schema = format!("t_{}", tenant.replace('-', "_"));
    let count = |app: &TestApp| {
        let schema = schema.clone();
        let url = app.database_url.clone();
        async move {
            let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = 'invoices' AND indexname LIKE '\\_ix\\_invoices\\_%\\_x%'",
            )
            .bind(schema)
            .fetch_one(&mut db)
            .await
            .unwrap();
            n
        }
    };
    assert_eq!(count(&app).await, 1);
    let mut s = invoice_schema();
    s["properties"]["status"]["x-index"] = json!(true);
    app.put_schema("invoices", &token, s).await;
    assert_eq!(count(&app).await, 2);
    let mut s = invoice_schema();
    s["properties"]["total"]
        .as_object_mut()
        .unwrap()
        .remove("x-index");
    app.put_schema("invoices", &token, s).await;
    assert_eq!(count(&app).await, 0);
}

use sqlx::Connection;

#[tokio::test]
async fn the_validation_service_checks_schemas_when_configured() {
    let valid = validation_service(Behaviour::Valid).await;
    let app = TestApp::spawn_with(|s| s.validation_service_url = Some(valid.url.clone())).await;
    let (_, token) = app.tenant().await;
    let resp = app.put_schema("invoices", &token, invoice_schema()).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(valid.calls(), 1);

    let invalid = validation_service(Behaviour::Invalid).await;
    let app = TestApp::spawn_with(|s| s.validation_service_url = Some(invalid.url.clone())).await;
    let (_, token) = app.tenant().await;
    let resp = app.put_schema("invoices", &token, invoice_schema()).await;
    assert_eq!(resp.status(), 422);
    let b = body(resp).await;
    assert_eq!(b["errors"][0]["message"], "totals must declare a currency");
    assert_eq!(b["errors"][0]["path"], "/schema/properties/total");
}

async fn assert_unavailable(app: &TestApp, token: &str) {
    let resp = app.put_schema("invoices", token, invoice_schema()).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let b = body(resp).await;
    assert!(b["detail"].as_str().unwrap().contains("try again"), "{b}");
    assert_eq!(app.get("/v1/schemas/invoices", token).await.status(), 404);
}

#[tokio::test]
async fn a_down_validation_service_refuses_schema_changes_with_503_and_counts_errors() {
    let failing = validation_service(Behaviour::Failing).await;
    let app = TestApp::spawn_with(|s| s.validation_service_url = Some(failing.url.clone())).await;
    let (_, token) = app.tenant().await;
    assert_unavailable(&app, &token).await;
    assert_eq!(failing.calls(), 2, "retried once (2 attempts configured)");
    let metrics = send(app.request(Method::GET, "/metrics", None))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("validation_service_errors_total"),
        "{metrics}"
    );

    let url = nothing_listening().await;
    let app = TestApp::spawn_with(|s| s.validation_service_url = Some(url.clone())).await;
    let (_, token) = app.tenant().await;
    assert_unavailable(&app, &token).await;
}

#[tokio::test]
async fn a_slow_validation_service_times_out_into_503() {
    let slow = validation_service(Behaviour::Slow(Duration::from_secs(5))).await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(slow.url.clone());
        s.service_attempts = 1;
    })
    .await;
    let (_, token) = app.tenant().await;
    let started = std::time::Instant::now();
    assert_unavailable(&app, &token).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the 500 ms timeout applied"
    );
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_failures_and_readiness_counts_it_without_naming_it() {
    let failing = validation_service(Behaviour::Failing).await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(failing.url.clone());
        s.service_attempts = 1;
        s.breaker_failure_threshold = 2;
    })
    .await;
    let (_, token) = app.tenant().await;
    for _ in 0..3 {
        assert_unavailable(&app, &token).await;
    }
    assert_eq!(
        failing.calls(),
        2,
        "the open breaker spares the failing service"
    );
    let ready = body(send(app.request(Method::GET, "/health/ready", None)).await).await;
    assert_eq!(
        ready["checks"]["validationService"], "closed",
        "one tenant's breaker is not the service's"
    );
    assert_eq!(ready["checks"]["validationServicePausedTenants"], 1);
}

#[tokio::test]
async fn with_the_fallback_enabled_a_down_service_falls_back_to_the_local_check() {
    let url = nothing_listening().await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(url.clone());
        s.validation_fallback = true;
    })
    .await;
    let (_, token) = app.tenant().await;
    let resp = app.put_schema("invoices", &token, invoice_schema()).await;
    assert_eq!(resp.status(), 201);
    let resp = app
        .put(
            "/v1/schemas/other",
            &token,
            &json!({"schema": {"type": "object", "minProperties": "x"}}),
        )
        .await;
    assert_eq!(resp.status(), 422);
}
