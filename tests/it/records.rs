use bss_tests::*;
use reqwest::Method;
use serde_json::{Value, json};

fn invoice(n: i64) -> Value {
    json!({"number": format!("INV-{n}"), "total": n, "status": "open", "customer": {"name": format!("Customer {n}")}})
}

#[tokio::test]
async fn a_created_record_can_be_read_back_with_its_etag() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let resp = app.post("/v1/data/invoices", &token, &invoice(10)).await;
    assert_eq!(resp.status(), 201);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(resp.headers()["etag"], "\"1\"");
    let created = body(resp).await;
    assert_eq!(created["resource"], "invoices");
    assert_eq!(created["version"], 1);
    assert_eq!(created["data"], invoice(10));
    assert_eq!(
        location,
        format!("/v1/data/invoices/{}", created["id"].as_str().unwrap())
    );

    let resp = app.get(&location, &token).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"], "\"1\"");
    assert_eq!(body(resp).await, created);

    let resp = send(
        app.request(Method::GET, &location, Some(&token))
            .header("if-none-match", "\"1\""),
    )
    .await;
    assert_eq!(resp.status(), 304);
}

/// Reads by id take the tenant's lane when it is free and the shared pool
/// when it is not (or when lanes are off): the answer is the same.
#[tokio::test]
async fn reads_by_id_answer_alike_on_a_busy_lane_and_with_lanes_off() {
    for lanes in [Some(1), Some(0)] {
        let app = TestApp::spawn_with(|s| s.read_lanes = lanes).await;
        let mut written = Vec::new();
        for n in 0..3 {
            let (_, token) = app.tenant_with_invoices().await;
            let resp = app.post("/v1/data/invoices", &token, &invoice(n)).await;
            assert_eq!(resp.status(), 201);
            let location = resp.headers()["location"].to_str().unwrap().to_owned();
            written.push((token, location, body(resp).await));
        }
        // Every tenant on the one lane at once: most reads find it busy.
        let reads = (0..30).map(|i| {
            let (token, location, created) = &written[i % written.len()];
            let app = &app;
            async move {
                let resp = app.get(location, token).await;
                assert_eq!(resp.status(), 200, "lanes {lanes:?}");
                assert_eq!(&body(resp).await, created, "lanes {lanes:?}");
            }
        });
        futures::future::join_all(reads).await;
        // Another tenant's token reads nothing of it.
        assert_eq!(app.get(&written[0].1, &written[1].0).await.status(), 404);
    }
}

#[tokio::test]
async fn creating_a_record_with_a_negative_total_is_rejected_with_the_field() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let resp = app
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "1", "total": -5}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let b = body(resp).await;
    assert_eq!(b["status"], 422);
    assert_eq!(b["errors"][0]["path"], "/total");
    assert_eq!(b["errors"][0]["source"], "schema");
    let resp = app
        .post("/v1/data/invoices", &token, &json!({"total": 1}))
        .await;
    assert_eq!(resp.status(), 422);
    let listed = body(app.get("/v1/data/invoices", &token).await).await;
    assert_eq!(
        listed["items"].as_array().unwrap().len(),
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn bad_bodies_get_400_413_and_415() {
    let app = TestApp::spawn_with(|s| s.max_body_bytes = 4096).await;
    let (_, token) = app.tenant_with_invoices().await;
    let resp = send(
        app.request(Method::POST, "/v1/data/invoices", Some(&token))
            .header("content-type", "application/json")
            .body("{\"number\": "),
    )
    .await;
    assert_eq!(resp.status(), 400);
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let resp = send(
        app.request(Method::POST, "/v1/data/invoices", Some(&token))
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await;
    assert_eq!(resp.status(), 415);

    let big = json!({"number": "x".repeat(5000), "total": 1});
    let resp = app.post("/v1/data/invoices", &token, &big).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn unknown_resources_and_records_are_404() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let resp = app.post("/v1/data/orders", &token, &json!({})).await;
    assert_eq!(resp.status(), 404);
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("PUT /v1/schemas/orders")
    );
    assert_eq!(
        app.get("/v1/data/invoices/nope", &token).await.status(),
        404
    );
    assert_eq!(
        app.get("/v1/data/invoices/%22;drop", &token).await.status(),
        404
    );
    assert_eq!(
        app.delete("/v1/data/invoices/nope", &token).await.status(),
        404
    );
    assert_eq!(
        app.patch("/v1/data/invoices/nope", &token, &json!({}))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn put_creates_with_an_id_then_replaces_and_if_match_guards_it() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let resp = app
        .put("/v1/data/invoices/inv-1", &token, &invoice(1))
        .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["location"], "/v1/data/invoices/inv-1");
    let resp = app
        .put("/v1/data/invoices/inv-1", &token, &invoice(2))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"], "\"2\"");
    assert_eq!(body(resp).await["data"]["total"], 2);

    let stale = send(
        app.request(Method::PUT, "/v1/data/invoices/inv-1", Some(&token))
            .header("if-match", "\"1\"")
            .json(&invoice(3)),
    )
    .await;
    assert_eq!(stale.status(), 412);
    let fresh = send(
        app.request(Method::PUT, "/v1/data/invoices/inv-1", Some(&token))
            .header("if-match", "\"2\"")
            .json(&invoice(3)),
    )
    .await;
    assert_eq!(fresh.status(), 200);
    assert_eq!(body(fresh).await["version"], 3);
    let missing = send(
        app.request(Method::PUT, "/v1/data/invoices/inv-9", Some(&token))
            .header("if-match", "\"1\"")
            .json(&invoice(3)),
    )
    .await;
    assert_eq!(missing.status(), 412);
    let bad_tag = send(
        app.request(Method::PUT, "/v1/data/invoices/inv-1", Some(&token))
            .header("if-match", "three")
            .json(&invoice(3)),
    )
    .await;
    assert_eq!(bad_tag.status(), 400);
    let invalid = app
        .put("/v1/data/invoices/inv-1", &token, &json!({"number": 1}))
        .await;
    assert_eq!(invalid.status(), 422);
    let bad_id = app
        .put("/v1/data/invoices/bad%20id", &token, &invoice(1))
        .await;
    assert_eq!(bad_id.status(), 400);
}

#[tokio::test]
async fn merge_patch_changes_only_the_given_fields_and_is_validated() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.put("/v1/data/invoices/p1", &token, &invoice(7)).await;
    let resp = app
        .patch(
            "/v1/data/invoices/p1",
            &token,
            &json!({"status": "paid", "customer": {"name": null}}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["etag"], "\"2\"");
    let b = body(resp).await;
    assert_eq!(b["data"]["status"], "paid");
    assert_eq!(b["data"]["total"], 7);
    assert_eq!(b["data"]["customer"], json!({}));

    let resp = app
        .patch("/v1/data/invoices/p1", &token, &json!({"total": -1}))
        .await;
    assert_eq!(resp.status(), 422);
    assert_eq!(body(resp).await["errors"][0]["path"], "/total");
    let stale = send(
        app.request(Method::PATCH, "/v1/data/invoices/p1", Some(&token))
            .header("content-type", "application/merge-patch+json")
            .header("if-match", "\"1\"")
            .body("{\"status\": \"void\"}"),
    )
    .await;
    assert_eq!(stale.status(), 412);
    let current = body(app.get("/v1/data/invoices/p1", &token).await).await;
    assert_eq!(current["version"], 2);
    assert_eq!(current["data"]["status"], "paid");
}

#[tokio::test]
async fn deleting_a_record_makes_it_404() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.put("/v1/data/invoices/d1", &token, &invoice(1)).await;
    let stale = send(
        app.request(Method::DELETE, "/v1/data/invoices/d1", Some(&token))
            .header("if-match", "\"5\""),
    )
    .await;
    assert_eq!(stale.status(), 412);
    assert_eq!(
        app.delete("/v1/data/invoices/d1", &token).await.status(),
        204
    );
    assert_eq!(app.get("/v1/data/invoices/d1", &token).await.status(), 404);
    assert_eq!(
        app.delete("/v1/data/invoices/d1", &token).await.status(),
        404
    );
}

#[tokio::test]
async fn a_batch_is_stored_all_or_nothing() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let items: Vec<Value> = (1..=5).map(invoice).collect();
    let resp = app
        .post("/v1/data/invoices/batch", &token, &json!({"items": items}))
        .await;
    assert_eq!(resp.status(), 201);
    let created = body(resp).await;
    let totals: Vec<i64> = created["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["data"]["total"].as_i64().unwrap())
        .collect();
    assert_eq!(totals, vec![1, 2, 3, 4, 5], "in request order");

    let mut bad = (10..15).map(invoice).collect::<Vec<_>>();
    bad[3]["total"] = json!(-1);
    let resp = app
        .post("/v1/data/invoices/batch", &token, &json!({"items": bad}))
        .await;
    assert_eq!(resp.status(), 422);
    assert_eq!(body(resp).await["errors"][0]["path"], "/items/3/total");
    let listed = body(app.get("/v1/data/invoices?count=exact", &token).await).await;
    assert_eq!(
        listed["total"], 5,
        "nothing of the refused batch was stored"
    );
}

#[tokio::test]
async fn a_batch_over_1000_items_is_refused() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let items: Vec<Value> = (0..1001)
        .map(|n| json!({"number": "n", "total": n}))
        .collect();
    let resp = app
        .post("/v1/data/invoices/batch", &token, &json!({"items": items}))
        .await;
    assert_eq!(resp.status(), 422);
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("1000")
    );
    let resp = app
        .post("/v1/data/invoices/batch", &token, &json!({"items": []}))
        .await;
    assert_eq!(resp.status(), 422);
}

#[tokio::test]
async fn an_idempotent_create_returns_the_first_result_without_a_second_write() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let post = |key: &str, doc: Value| {
        send(
            app.request(Method::POST, "/v1/data/invoices", Some(&token))
                .header("idempotency-key", key)
                .json(&doc),
        )
    };
    let first = post("key-1", invoice(1)).await;
    assert_eq!(first.status(), 201);
    let first = body(first).await;
    let again = post("key-1", invoice(1)).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(body(again).await, first);
    let listed = body(app.get("/v1/data/invoices?count=exact", &token).await).await;
    assert_eq!(listed["total"], 1);

    let different = post("key-1", invoice(2)).await;
    assert_eq!(different.status(), 409);
    let other_key = post("key-2", invoice(1)).await;
    assert_eq!(other_key.status(), 201);

    // Concurrent duplicates: exactly one record.
    let results = futures::future::join_all((0..8).map(|_| post("key-3", invoice(3)))).await;
    let mut ids = std::collections::HashSet::new();
    for r in results {
        assert_eq!(r.status(), 201);
        ids.insert(body(r).await["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1);
}

#[tokio::test]
async fn records_written_under_an_old_schema_version_are_revalidated() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    // Warm the cache with v1, then tighten the schema directly behind the
    // service's back (as another replica would).
    app.post("/v1/data/invoices", &token, &invoice(1)).await;
    let mut stricter = invoice_schema();
    stricter["properties"]["total"]["maximum"] = json!(100);
    let other = TestApp::spawn_with(|s| s.database_url = Some(app.database_url.clone())).await;
    assert_eq!(
        other
            .put_schema("invoices", &token, stricter)
            .await
            .status(),
        201
    );
    let resp = app.post("/v1/data/invoices", &token, &invoice(500)).await;
    assert_eq!(
        resp.status(),
        422,
        "validated against v2 although this replica cached v1"
    );
    assert!(
        body(resp).await["detail"]
            .as_str()
            .unwrap()
            .contains("version 2")
    );
}

/// Concurrent creates are written together (one statement per resource, one
/// commit); a document the database refuses fails alone, and every other
/// create, of this tenant and of another, lands exactly once, with its event.
#[tokio::test]
async fn concurrent_creates_land_even_when_one_of_them_is_refused() {
    use sqlx::Executor;
    // One writer: the concurrent creates queue for it and share statements.
    let app = TestApp::spawn_with(|s| s.write_workers = 1).await;
    let (a_id, a) = app.tenant_with_invoices().await;
    let (_, b) = app.tenant_with_invoices().await;
    // A rule the database enforces and the schema does not know: tenant
    // A's table refuses invoice number "REFUSED".
    let table = bss::domain::ResourceName::parse("invoices")
        .unwrap()
        .table_in(&bss::domain::TenantId::parse(&a_id).unwrap());
    app.db()
        .await
        .execute(
            format!(
                "ALTER TABLE {table} ADD CONSTRAINT refused CHECK (data->>'number' <> 'REFUSED')"
            )
            .as_str(),
        )
        .await
        .unwrap();
    let refused = |i: i64| i % 10 == 4;
    let creates = (0..60i64).map(|i| {
        let token = if i % 2 == 0 { a.clone() } else { b.clone() };
        let doc = if refused(i) {
            json!({"number": "REFUSED", "total": 1})
        } else {
            invoice(i)
        };
        let app = &app;
        async move { (i, app.post("/v1/data/invoices", &token, &doc).await) }
    });
    for (i, resp) in futures::future::join_all(creates).await {
        if refused(i) {
            assert!(resp.status().is_server_error(), "create {i}");
        } else {
            assert_eq!(resp.status(), 201, "create {i}");
            let created = body(resp).await;
            assert_eq!(created["data"], invoice(i));
        }
    }
    for token in [&a, &b] {
        let expected = if token == &a { 24 } else { 30 };
        let page = body(app.get("/v1/data/invoices?count=exact", token).await).await;
        assert_eq!(page["total"], expected);
        // The schema's event, then the creates'.
        let log = wait_for_events(&app, token, expected + 1).await;
        let created = log
            .iter()
            .filter(|e| e["type"] == "business_store.data.created")
            .count();
        assert_eq!(created, expected);
    }
}

/// A schema change holds its resource while it checks the stored records:
/// creates to that resource wait for it, and no other tenant's creates do,
/// even with one writer of coalesced creates.
#[tokio::test]
async fn a_schema_change_in_progress_holds_up_only_its_own_resource() {
    use sqlx::Executor;
    use std::time::Duration;
    let app = TestApp::spawn_with(|s| s.write_workers = 1).await;
    let (a_id, a) = app.tenant_with_invoices().await;
    let (_, b) = app.tenant_with_invoices().await;
    // Tenant A's resource row, held as a schema change holds it.
    let schema = bss::domain::TenantId::parse(&a_id).unwrap().schema_ident();
    let mut change = app.db().await;
    change.execute("BEGIN").await.unwrap();
    change
        .execute(
            format!("SELECT 1 FROM {schema}._resources WHERE resource = 'invoices' FOR UPDATE")
                .as_str(),
        )
        .await
        .unwrap();
    let held: Vec<_> = (0..4)
        .map(|i| {
            let req = app.request(Method::POST, "/v1/data/invoices", Some(&a));
            tokio::spawn(req.json(&invoice(i)).send())
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let others = (0..20).map(|i| {
        let (app, b) = (&app, &b);
        async move { app.post("/v1/data/invoices", b, &invoice(i)).await }
    });
    let answered = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(others))
        .await
        .expect("tenant B's creates waited for tenant A's schema change");
    for resp in answered {
        let status = resp.status();
        assert_eq!(status, 201, "{}", resp.text().await.unwrap());
    }
    assert!(held.iter().all(|h| !h.is_finished()));
    change.execute("COMMIT").await.unwrap();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status(), 201);
    }
}
