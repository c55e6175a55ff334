//! Bad input gets a 4xx that says what to fix, never a 500 or a stuck loop.

use std::time::Duration;

use bss_tests::{TestApp, body, platform_token};
use serde_json::json;

#[tokio::test]
async fn nul_characters_in_bodies_are_refused_with_their_path() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let cases = [
        (
            "/v1/data/invoices",
            json!({"number": "A\u{0}", "total": 1}),
            "/number",
        ),
        (
            "/v1/data/invoices",
            json!({"number": "A", "total": 1, "customer": {"na\u{0}me": "x"}}),
            "/customer/na\\u0000me",
        ),
        (
            "/v1/data/invoices/batch",
            json!({"items": [{"number": "A", "total": 1}, {"number": "\u{0}", "total": 1}]}),
            "/items/1/number",
        ),
    ];
    for (path, doc, at) in cases {
        let resp = app.post(path, &token, &doc).await;
        assert_eq!(resp.status(), 422, "{path} {doc}");
        let problem = body(resp).await;
        assert_eq!(problem["errors"][0]["path"], at, "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("U+0000")
        );
    }
    let put = app
        .put(
            "/v1/data/invoices/r-1",
            &token,
            &json!({"number": "\u{0}", "total": 1}),
        )
        .await;
    assert_eq!(put.status(), 422);
    let schema = json!({"type": "object", "properties": {"a\u{0}": {"type": "string"}}});
    let resp = app.put_schema("notes", &token, schema).await;
    assert_eq!(resp.status(), 422);
    assert_eq!(
        body(resp).await["errors"][0]["path"],
        "/schema/properties/a\\u0000"
    );
    let resp = app
        .post(
            "/v1/tenants",
            &platform_token(),
            &json!({"id": "nul-name", "name": "Acme\u{0}"}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    assert_eq!(body(resp).await["errors"][0]["path"], "/name");
    // Nothing was stored.
    let list = body(app.get("/v1/data/invoices", &token).await).await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn nul_characters_in_filters_are_a_400() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    for query in ["number=eq.A%00B", "number%00=eq.A", "order=number%00.asc"] {
        let resp = app.get(&format!("/v1/data/invoices?{query}"), &token).await;
        assert_eq!(resp.status(), 400, "{query}");
        let problem = body(resp).await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("U+0000"),
            "{problem}"
        );
    }
}

#[tokio::test]
async fn an_unappliable_tenant_message_is_refused_at_once() {
    let app = TestApp::spawn().await;
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        app.post(
            "/v1/broker/topics/auth.tenant.created/messages",
            &platform_token(),
            &json!({"tenantId": "nul-msg", "name": "a\u{0}b"}),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("the message was retried forever"));
    assert_eq!(resp.status(), 422);
}

#[tokio::test]
async fn generated_index_names_never_collide_with_tables_or_each_other() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let indexed =
        json!({"type": "object", "properties": {"n": {"type": "string", "x-index": true}}});
    assert_eq!(
        app.put_schema("invoices", &token, indexed.clone())
            .await
            .status(),
        201
    );
    assert_eq!(
        app.put_schema("invoices_created", &token, indexed.clone())
            .await
            .status(),
        201,
        "the index of invoices must not take this table's name"
    );
    let long = "a".repeat(50);
    for suffix in ["x", "y"] {
        let resp = app
            .put_schema(&format!("{long}{suffix}"), &token, indexed.clone())
            .await;
        assert_eq!(resp.status(), 201, "{long}{suffix}");
    }
    for resource in [
        "invoices",
        "invoices_created",
        &format!("{long}x"),
        &format!("{long}y"),
    ] {
        let doc = json!({"n": resource});
        let resp = app
            .post(&format!("/v1/data/{resource}"), &token, &doc)
            .await;
        assert_eq!(resp.status(), 201, "{resource}");
        let list = app
            .get(&format!("/v1/data/{resource}?n=eq.{resource}"), &token)
            .await;
        assert_eq!(body(list).await["items"].as_array().map(Vec::len), Some(1));
    }
    // Unmarking the field drops only that resource's index.
    let plain = json!({"type": "object", "properties": {"n": {"type": "string"}}});
    assert_eq!(
        app.put_schema(&format!("{long}x"), &token, plain)
            .await
            .status(),
        201
    );
    let doc = json!({"n": "again"});
    let resp = app.post(&format!("/v1/data/{long}y"), &token, &doc).await;
    assert_eq!(resp.status(), 201);
}

#[tokio::test]
async fn nul_characters_in_event_queries_are_a_400() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    for path in ["/v1/events?type=a%00b", "/v1/events/stream?type=%00"] {
        let resp = app.get(path, &token).await;
        assert_eq!(resp.status(), 400, "{path}");
    }
}
