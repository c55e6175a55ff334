//! Audit: every record version keeps which hook versions passed the write
//! that made it, who wrote it and in which request, shown on
//! `GET /v1/data/{resource}/{id}?include=audit`.

use bss_tests::*;
use reqwest::Method;
use serde_json::{Value, json};

fn manifest(max_total: u64) -> Value {
    json!({"name": "no-negative-totals", "kind": "validation-hook",
           "resources": ["invoices"], "config": {"max_total": max_total}})
}

/// A write with a chosen request id; returns the status and the body.
async fn write(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    request_id: &str,
    doc: &Value,
) -> (u16, Value) {
    let resp = send(
        app.request(method, path, Some(token))
            .header("x-request-id", request_id)
            .json(doc),
    )
    .await;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The record's audit, checking the read with it answers the same record
/// (and the same ETag) as the read without.
async fn audit_of(app: &TestApp, token: &str, id: &str) -> Value {
    let path = format!("/v1/data/invoices/{id}");
    let plain = app.get(&path, token).await;
    assert_eq!(plain.status(), 200);
    let plain_tag = plain.headers()["etag"].clone();
    let plain = body(plain).await;
    assert!(plain.get("audit").is_none(), "only when asked: {plain:#}");
    let with = app.get(&format!("{path}?include=audit"), token).await;
    assert_eq!(with.status(), 200);
    assert_eq!(with.headers()["etag"], plain_tag);
    let mut with = body(with).await;
    let audit = with
        .as_object_mut()
        .and_then(|o| o.remove("audit"))
        .unwrap_or_else(|| panic!("no audit in {with:#}"));
    assert_eq!(with, plain, "the same record besides its audit");
    audit
}

fn hook(version: i64) -> Value {
    json!([{"plugin": "no-negative-totals", "version": version}])
}

#[tokio::test]
async fn every_record_version_keeps_the_hook_versions_that_passed_it_and_who_wrote_it() {
    let app = TestApp::spawn().await;
    let (tenant_id, token) = app.tenant_with_invoices().await;

    // Before any hook: the audit names the write, and no hook.
    let doc = json!({"number": "A-1", "total": 5});
    let (status, first) = write(
        &app,
        Method::POST,
        "/v1/data/invoices",
        &token,
        "req-a",
        &doc,
    )
    .await;
    assert_eq!(status, 201, "{first:#}");
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(
        audit_of(&app, &token, &id).await,
        json!({"operation": "create", "actor": "user:tester", "requestId": "req-a", "hooks": []})
    );

    // Version 1 of a hook passes a create (the coalesced path) ...
    app.install_plugin(&token, manifest(1000), "no_negative_totals")
        .await;
    let doc = json!({"number": "B-1", "total": 10, "iban": "DE02120300000000202051"});
    let (status, created) = write(
        &app,
        Method::POST,
        "/v1/data/invoices",
        &token,
        "req-b",
        &doc,
    )
    .await;
    assert_eq!(status, 201, "{created:#}");
    let b = created["id"].as_str().unwrap().to_owned();
    let audit = audit_of(&app, &token, &b).await;
    assert_eq!(audit["operation"], "create");
    assert_eq!(audit["requestId"], "req-b");
    assert_eq!(audit["hooks"], hook(1), "{audit:#}");
    // (a record with sealed values is read opened, its audit with it)
    let read = body(
        app.get(&format!("/v1/data/invoices/{b}?include=audit"), &token)
            .await,
    )
    .await;
    assert_eq!(read["data"]["iban"], "DE02120300000000202051");

    // ... and a create with an idempotency key (its own transaction).
    let resp = send(
        app.request(Method::POST, "/v1/data/invoices", Some(&token))
            .header("idempotency-key", "k-1")
            .header("x-request-id", "req-idem")
            .json(&json!({"number": "C-1", "total": 1})),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let c = body(resp).await["id"].as_str().unwrap().to_owned();
    let audit = audit_of(&app, &token, &c).await;
    assert_eq!(
        (&audit["requestId"], &audit["hooks"]),
        (&json!("req-idem"), &hook(1))
    );

    // Version 2 becomes active: the next versions of the record say so,
    // the version before keeps version 1.
    app.install_plugin(&token, manifest(1000), "no_negative_totals")
        .await;
    let path = format!("/v1/data/invoices/{b}");
    let (status, patched) = write(
        &app,
        Method::PATCH,
        &path,
        &token,
        "req-patch",
        &json!({"total": 11}),
    )
    .await;
    assert_eq!(
        (status, patched["version"].as_i64()),
        (200, Some(2)),
        "{patched:#}"
    );
    let audit = audit_of(&app, &token, &b).await;
    assert_eq!(audit["operation"], "patch");
    assert_eq!(audit["requestId"], "req-patch");
    assert_eq!(audit["hooks"], hook(2), "{audit:#}");
    assert_eq!(audit_of(&app, &token, &c).await["hooks"], hook(1));

    let replacement = json!({"number": "B-1", "total": 12});
    let (status, _) = write(&app, Method::PUT, &path, &token, "req-put", &replacement).await;
    assert_eq!(status, 200);
    let audit = audit_of(&app, &token, &b).await;
    assert_eq!(
        (&audit["operation"], &audit["hooks"]),
        (&json!("replace"), &hook(2))
    );

    // A PUT that creates, and a batch: every record written is audited.
    let new_path = "/v1/data/invoices/made-by-put";
    let (status, _) = write(
        &app,
        Method::PUT,
        new_path,
        &token,
        "req-put-new",
        &replacement,
    )
    .await;
    assert_eq!(status, 201);
    let audit = audit_of(&app, &token, "made-by-put").await;
    assert_eq!(
        (&audit["operation"], &audit["requestId"]),
        (&json!("replace"), &json!("req-put-new"))
    );
    let batch = json!({"items": [{"number": "D-1", "total": 1}, {"number": "D-2", "total": 2}]});
    let (status, written) = write(
        &app,
        Method::POST,
        "/v1/data/invoices/batch",
        &token,
        "req-batch",
        &batch,
    )
    .await;
    assert_eq!(status, 201, "{written:#}");
    for item in written["items"].as_array().unwrap() {
        let audit = audit_of(&app, &token, item["id"].as_str().unwrap()).await;
        assert_eq!(
            audit,
            json!({"operation": "batch", "actor": "user:tester", "requestId": "req-batch", "hooks": hook(2)})
        );
    }

    // A refused write leaves the stored version and its audit alone.
    let (status, _) = write(
        &app,
        Method::PATCH,
        &path,
        &token,
        "req-refused",
        &json!({"total": 5000}),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(audit_of(&app, &token, &b).await["requestId"], "req-put");

    // Readers see audits; another tenant sees nothing of them.
    let (_, other) = app.tenant().await;
    let reader = bss_tests::token(&tenant_id, &["reader"]);
    let read = app.get(&format!("{path}?include=audit"), &reader).await;
    assert_eq!(read.status(), 200);
    assert_eq!(body(read).await["audit"]["hooks"], hook(2));
    assert_eq!(
        app.get(&format!("{path}?include=audit"), &other)
            .await
            .status(),
        404
    );

    // Anything else to include is refused, saying what can be.
    let resp = app.get(&format!("{path}?include=history"), &token).await;
    assert_eq!(resp.status(), 400);
    let problem = body(resp).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("audit"),
        "{problem:#}"
    );

    // A version written before audits were kept answers `audit: null`.
    let mut db = app.db().await;
    let table = format!("t_{}.invoices", tenant_id.replace('-', "_"));
    sqlx::query(&format!("UPDATE {table} SET audit = NULL WHERE id = $1"))
        .bind(&id)
        .execute(&mut db)
        .await
        .unwrap();
    assert_eq!(audit_of(&app, &token, &id).await, Value::Null);
}

#[tokio::test]
async fn an_upgrade_gives_tables_made_before_audits_the_column_and_old_versions_say_null() {
    let old = TestApp::spawn().await;
    let (tenant, token) = old.tenant_with_invoices().await;
    let doc = json!({"number": "old", "total": 1});
    let before = body(old.post("/v1/data/invoices", &token, &doc).await).await;
    let before = before["id"].as_str().unwrap().to_owned();
    // The table as an installation from before audits has it.
    let mut db = old.db().await;
    let table = format!("t_{}.invoices", tenant.replace('-', "_"));
    for sql in [
        format!("ALTER TABLE {table} DROP COLUMN audit"),
        "DELETE FROM _sqlx_migrations WHERE version = 12".to_owned(),
    ] {
        sqlx::query(&sql).execute(&mut db).await.unwrap();
    }

    // A replica of the new version starts (and migrates) on that database.
    let service = bss::startup::Application::build(old.settings.clone())
        .await
        .unwrap();
    let new = TestApp {
        base: format!("http://127.0.0.1:{}", service.port()),
        client: reqwest::Client::new(),
        database_url: old.database_url.clone(),
        settings: old.settings.clone(),
        _scratch: None,
    };
    tokio::spawn(service.run_until(std::future::pending()));
    assert_eq!(audit_of(&new, &token, &before).await, Value::Null);
    let (status, after) = write(
        &new,
        Method::POST,
        "/v1/data/invoices",
        &token,
        "req-new",
        &doc,
    )
    .await;
    assert_eq!(status, 201, "{after:#}");
    let audit = audit_of(&new, &token, after["id"].as_str().unwrap()).await;
    assert_eq!(audit["requestId"], "req-new");
}
