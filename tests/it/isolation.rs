use bss_tests::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn another_tenants_records_are_invisible_on_every_record_endpoint() {
    let app = TestApp::spawn().await;
    let (_, a) = app.tenant_with_invoices().await;
    let (_, b) = app.tenant_with_invoices().await;
    let created = body(
        app.post(
            "/v1/data/invoices",
            &a,
            &json!({"number": "secret", "total": 1}),
        )
        .await,
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/v1/data/invoices/{id}");

    assert_eq!(app.get(&path, &b).await.status(), 404);
    assert_eq!(
        app.patch(&path, &b, &json!({"total": 2})).await.status(),
        404
    );
    assert_eq!(app.delete(&path, &b).await.status(), 404);
    let guarded = send(
        app.request(Method::PUT, &path, Some(&b))
            .header("if-match", "\"1\"")
            .json(&json!({"number": "x", "total": 1})),
    )
    .await;
    assert_eq!(guarded.status(), 412, "B cannot replace A's record");
    // A PUT without If-Match creates B's own record with that id; A's is untouched.
    assert_eq!(
        app.put(&path, &b, &json!({"number": "mine", "total": 9}))
            .await
            .status(),
        201
    );
    let listed = body(app.get("/v1/data/invoices?count=exact", &b).await).await;
    assert_eq!(listed["total"], 1);
    assert_eq!(listed["items"][0]["data"]["number"], "mine");
    let filtered = body(app.get("/v1/data/invoices?number=eq.secret", &b).await).await;
    assert_eq!(filtered["items"].as_array().unwrap().len(), 0);

    let still = body(app.get(&path, &a).await).await;
    assert_eq!(still["data"]["number"], "secret");
    assert_eq!(still["version"], 1);
}

#[tokio::test]
async fn schemas_are_per_tenant() {
    let app = TestApp::spawn().await;
    let (_, a) = app.tenant_with_invoices().await;
    let (_, b) = app.tenant().await;
    assert_eq!(app.get("/v1/schemas/invoices", &b).await.status(), 404);
    assert_eq!(
        body(app.get("/v1/schemas", &b).await).await["items"],
        json!([])
    );
    assert_eq!(
        app.post("/v1/data/invoices", &b, &json!({"number": "1", "total": 1}))
            .await
            .status(),
        404
    );
    assert_eq!(app.get("/v1/schemas/invoices", &a).await.status(), 200);
}

#[tokio::test]
async fn a_token_for_a_tenant_that_does_not_exist_sees_nothing() {
    let app = TestApp::spawn().await;
    let ghost = token("ghost", &["admin"]);
    assert_eq!(app.get("/v1/schemas", &ghost).await.status(), 404);
    assert_eq!(app.get("/v1/data/invoices", &ghost).await.status(), 404);
    assert_eq!(
        app.put_schema("invoices", &ghost, invoice_schema())
            .await
            .status(),
        404
    );
    let bad = token("Not_Valid", &["admin"]);
    assert_eq!(app.get("/v1/schemas", &bad).await.status(), 401);
}

#[tokio::test]
async fn concurrent_requests_of_two_tenants_never_cross() {
    let app = TestApp::spawn().await;
    let (_, a) = app.tenant_with_invoices().await;
    let (_, b) = app.tenant_with_invoices().await;
    let writes = (0..40).map(|n| {
        let (tok, who) = if n % 2 == 0 { (&a, "a") } else { (&b, "b") };
        let app = &app;
        async move {
            app.post(
                "/v1/data/invoices",
                tok,
                &json!({"number": who, "total": n}),
            )
            .await
            .status()
        }
    });
    for status in futures::future::join_all(writes).await {
        assert_eq!(status, 201);
    }
    for (tok, who) in [(&a, "a"), (&b, "b")] {
        let page = body(app.get("/v1/data/invoices?limit=100", tok).await).await;
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 20);
        assert!(items.iter().all(|r| r["data"]["number"] == who));
    }
}
