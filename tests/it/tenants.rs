use std::time::Duration;

use bss_tests::*;
use serde_json::json;

#[tokio::test]
async fn creating_a_tenant_makes_its_schema_and_grants_analytics_read_access() {
    let app = TestApp::spawn().await;
    let admin = platform_token();
    let resp = app
        .post(
            "/v1/tenants",
            &admin,
            &json!({"id": "acme-1", "name": "Acme"}),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let t = body(resp).await;
    assert_eq!(t["id"], "acme-1");
    assert_eq!(t["status"], "active");
    assert!(t["createdAt"].is_string());

    let got = body(app.get("/v1/tenants/acme-1", &admin).await).await;
    assert_eq!(got["name"], "Acme");

    let token = token("acme-1", &["admin"]);
    app.put_schema("invoices", &token, invoice_schema()).await;
    let mut db = app.db().await;
    let (schema_ok, table_ok): (bool, bool) = sqlx::query_as(
        "SELECT has_schema_privilege('bss_analytics', 't_acme_1', 'USAGE'),
                has_table_privilege('bss_analytics', 't_acme_1.invoices', 'SELECT')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert!(schema_ok && table_ok);
    let (can_write,): (bool,) = sqlx::query_as(
        "SELECT has_table_privilege('bss_analytics', 't_acme_1.invoices', 'INSERT')",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert!(!can_write);
}

#[tokio::test]
async fn the_same_tenant_id_twice_is_a_conflict() {
    let app = TestApp::spawn().await;
    let admin = platform_token();
    assert_eq!(
        app.post("/v1/tenants", &admin, &json!({"id": "dup"}))
            .await
            .status(),
        201
    );
    let resp = app.post("/v1/tenants", &admin, &json!({"id": "dup"})).await;
    assert_eq!(resp.status(), 409);
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
}

#[tokio::test]
async fn invalid_tenant_ids_are_refused_with_the_rule() {
    let app = TestApp::spawn().await;
    let admin = platform_token();
    for bad in ["Acme", "-a", "a_b", "a;drop schema public", &"a".repeat(64)] {
        let resp = app.post("/v1/tenants", &admin, &json!({"id": bad})).await;
        assert_eq!(resp.status(), 400, "{bad}");
        assert!(
            body(resp).await["detail"]
                .as_str()
                .unwrap()
                .contains("lowercase")
        );
    }
    let resp = app
        .post("/v1/tenants", &admin, &json!({"name": "no id"}))
        .await;
    assert_eq!(resp.status(), 422);
    // `/v1/tenants/import` is the import: no tenant may live there.
    let resp = app
        .post("/v1/tenants", &admin, &json!({"id": "import"}))
        .await;
    assert_eq!(resp.status(), 400);
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("reserved")
    );
}

#[tokio::test]
async fn long_tenant_ids_get_a_schema_of_their_own() {
    let app = TestApp::spawn().await;
    let admin = platform_token();
    let a = format!("{}-a", "x".repeat(60));
    let b = format!("{}-b", "x".repeat(60));
    for id in [&a, &b] {
        assert_eq!(
            app.post("/v1/tenants", &admin, &json!({"id": id}))
                .await
                .status(),
            201
        );
        let t = token(id, &["admin"]);
        assert_eq!(
            app.put_schema("invoices", &t, invoice_schema())
                .await
                .status(),
            201
        );
    }
    let ta = token(&a, &["admin"]);
    app.post(
        "/v1/data/invoices",
        &ta,
        &json!({"number": "a", "total": 1}),
    )
    .await;
    let listed = body(app.get("/v1/data/invoices", &token(&b, &["reader"])).await).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_deleted_tenant_answers_404_at_once_and_is_dropped_after_the_grace_period() {
    let app = TestApp::spawn_with(|s| {
        s.tenant_grace_secs = 1;
        s.reaper_interval_secs = 1;
    })
    .await;
    let admin = platform_token();
    let (tenant, token) = app.tenant_with_invoices().await;
    let created = body(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "1", "total": 3}),
        )
        .await,
    )
    .await;
    let id = created["id"].as_str().unwrap();

    let resp = app.delete(&format!("/v1/tenants/{tenant}"), &admin).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(body(resp).await["status"], "archived");
    assert_eq!(
        app.get(&format!("/v1/data/invoices/{id}"), &token)
            .await
            .status(),
        404
    );
    assert_eq!(app.get("/v1/data/invoices", &token).await.status(), 404);
    assert_eq!(app.get("/v1/schemas", &token).await.status(), 404);
    assert_eq!(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "2", "total": 1})
        )
        .await
        .status(),
        404
    );
    assert_eq!(
        app.delete(&format!("/v1/tenants/{tenant}"), &admin)
            .await
            .status(),
        404
    );
    // While archived the id stays taken.
    assert_eq!(
        app.post("/v1/tenants", &admin, &json!({"id": tenant}))
            .await
            .status(),
        409
    );

    let mut dropped = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if app
            .get(&format!("/v1/tenants/{tenant}"), &admin)
            .await
            .status()
            == 404
        {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped,
        "the archived tenant was not dropped after its grace period"
    );
    let mut db = app.db().await;
    let (left,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'a\\_%' OR nspname = $1",
    )
    .bind(format!("t_{}", tenant.replace('-', "_")))
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(left, 0, "the tenant's schema is gone");
    // And the id can be used again, empty.
    assert_eq!(
        app.post("/v1/tenants", &admin, &json!({"id": tenant}))
            .await
            .status(),
        201
    );
    assert_eq!(app.get("/v1/data/invoices", &token).await.status(), 404);
}

#[tokio::test]
async fn tenant_lifecycle_needs_platform_admin() {
    let app = TestApp::spawn().await;
    let (tenant, admin) = app.tenant().await;
    assert_eq!(
        app.get(&format!("/v1/tenants/{tenant}"), &admin)
            .await
            .status(),
        403
    );
    assert_eq!(
        app.delete(&format!("/v1/tenants/{tenant}"), &admin)
            .await
            .status(),
        403
    );
    assert_eq!(
        app.get("/v1/tenants/nobody", &platform_token())
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn without_kafka_auth_tenant_events_reach_the_same_handlers() {
    let app = TestApp::spawn().await;
    let admin = platform_token();
    let created = "/v1/broker/topics/auth.tenant.created/messages";
    let deleted = "/v1/broker/topics/auth.tenant.deleted/messages";
    let resp = app
        .post(
            created,
            &admin,
            &json!({"tenantId": "via-broker", "name": "B"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body(resp).await["outcome"], "provisioned");
    let again = body(
        app.post(created, &admin, &json!({"tenantId": "via-broker"}))
            .await,
    )
    .await;
    assert_eq!(again["outcome"], "already_existed");
    assert_eq!(
        body(app.get("/v1/tenants/via-broker", &admin).await).await["name"],
        "B"
    );

    let gone = body(
        app.post(
            deleted,
            &admin,
            &json!({"data": {"tenantId": "via-broker"}}),
        )
        .await,
    )
    .await;
    assert_eq!(gone["outcome"], "archived");
    assert_eq!(
        body(app.get("/v1/tenants/via-broker", &admin).await).await["status"],
        "archived"
    );

    let bad = app.post(created, &admin, &json!({"tenant": "x"})).await;
    assert_eq!(bad.status(), 422);
    assert!(
        body(bad).await["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("tenantId")
    );
    assert_eq!(
        app.post("/v1/broker/topics/other/messages", &admin, &json!({}))
            .await
            .status(),
        404
    );
    let (_, tenant_admin) = app.tenant().await;
    assert_eq!(
        app.post(created, &tenant_admin, &json!({"tenantId": "x"}))
            .await
            .status(),
        403
    );
}
