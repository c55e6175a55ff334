use std::time::Duration;

use bss_tests::*;
use reqwest::Method;
use serde_json::{Value, json};

fn types(log: &[Value]) -> Vec<String> {
    log.iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn every_change_writes_one_cloudevent_in_order() {
    let app = TestApp::spawn().await;
    let (tenant, token) = app.tenant_with_invoices().await;
    let created = send(
        app.request(Method::POST, "/v1/data/invoices", Some(&token))
            .header("x-request-id", "req-create-1")
            .json(&json!({"number": "1", "total": 1})),
    )
    .await;
    let id = body(created).await["id"].as_str().unwrap().to_owned();
    app.put(
        "/v1/data/invoices/p-1",
        &token,
        &json!({"number": "p", "total": 2}),
    )
    .await;
    app.put(
        "/v1/data/invoices/p-1",
        &token,
        &json!({"number": "p", "total": 3}),
    )
    .await;
    app.patch(
        &format!("/v1/data/invoices/{id}"),
        &token,
        &json!({"total": 4}),
    )
    .await;
    app.delete(&format!("/v1/data/invoices/{id}"), &token).await;
    app.post(
        "/v1/data/invoices/batch",
        &token,
        &json!({"items": [{"number": "b1", "total": 1}, {"number": "b2", "total": 2}]}),
    )
    .await;
    // Refused writes leave no event.
    app.post(
        "/v1/data/invoices",
        &token,
        &json!({"number": "bad", "total": -1}),
    )
    .await;

    let log = wait_for_events(&app, &token, 8).await;
    assert_eq!(
        types(&log),
        [
            "business_store.schema.updated",
            "business_store.data.created",
            "business_store.data.created",
            "business_store.data.updated",
            "business_store.data.updated",
            "business_store.data.deleted",
            "business_store.data.created",
            "business_store.data.created",
        ]
    );
    let schema_event = &log[0];
    assert_eq!(schema_event["data"]["resource"], "invoices");
    assert_eq!(schema_event["data"]["version"], 1);
    assert_eq!(schema_event["data"]["initiator"], "user:tester");
    assert_eq!(schema_event["subject"], "invoices");

    let create = &log[1];
    assert_eq!(create["specversion"], "1.0");
    assert_eq!(create["tenantid"], tenant.as_str());
    assert_eq!(create["subject"], format!("invoices/{id}"));
    assert_eq!(create["correlationid"], "req-create-1");
    assert_eq!(create["datacontenttype"], "application/json");
    assert!(
        create["source"]
            .as_str()
            .unwrap()
            .starts_with("/business-store/")
    );
    assert!(create["time"].is_string());
    assert_eq!(create["id"].as_str().unwrap().len(), 36);
    assert_eq!(
        create["id"].as_str().unwrap().as_bytes()[14],
        b'7',
        "UUIDv7"
    );
    assert_eq!(
        create["data"],
        json!({"tenantId": tenant, "resource": "invoices", "recordId": id, "version": 1}),
        "keys only by default"
    );
    let update = &log[3];
    assert_eq!(update["data"]["recordId"], "p-1");
    assert_eq!(update["data"]["version"], 2);
    assert_eq!(update["data"]["previousVersion"], 1);
    let deleted = &log[5];
    assert_eq!(
        deleted["data"],
        json!({"tenantId": tenant, "resource": "invoices", "recordId": id, "version": 2})
    );
    let ids: std::collections::HashSet<_> = log
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), log.len(), "unique event ids");
}

#[tokio::test]
async fn full_payload_resources_carry_the_record_without_encrypted_fields() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let mut schema = invoice_schema();
    schema["x-event-payload"] = json!("full");
    app.put_schema("invoices", &token, schema).await;
    app.post(
        "/v1/data/invoices",
        &token,
        &json!({"number": "1", "total": 5, "iban": "DE89370400440532013000", "due": null}),
    )
    .await;
    let log = wait_for_events(&app, &token, 2).await;
    assert_eq!(
        log[1]["data"]["data"],
        json!({"number": "1", "total": 5, "due": null})
    );
}

#[tokio::test]
async fn an_idempotent_replay_does_not_emit_twice() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    for _ in 0..3 {
        send(
            app.request(Method::POST, "/v1/data/invoices", Some(&token))
                .header("idempotency-key", "once")
                .json(&json!({"number": "1", "total": 1})),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(wait_for_events(&app, &token, 2).await.len(), 2);
}

#[tokio::test]
async fn the_replay_api_pages_by_event_id_and_filters_by_type() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    let items: Vec<Value> = (0..25)
        .map(|n| json!({"number": format!("{n}"), "total": n}))
        .collect();
    app.post("/v1/data/invoices/batch", &token, &json!({"items": items}))
        .await;
    wait_for_events(&app, &token, 26).await;

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/events?limit=10&type=business_store.data.created&after={a}"),
            None => "/v1/events?limit=10&type=business_store.data.created".to_owned(),
        };
        let page = body(app.get(&q, &token).await).await;
        for e in page["items"].as_array().unwrap() {
            seen.push(e["data"]["recordId"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(c) => after = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    let unique: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 25);

    assert_eq!(
        app.get("/v1/events?after=not-an-id", &token).await.status(),
        400
    );
    assert_eq!(app.get("/v1/events?limit=0", &token).await.status(), 400);
    let other = app.tenant().await.1;
    let first_id = event_log(&app, &token).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        app.get(&format!("/v1/events?after={first_id}"), &other)
            .await
            .status(),
        400,
        "another tenant's event id is unknown here"
    );
}

#[tokio::test]
async fn the_stream_delivers_live_and_resumes_without_gap_or_duplicate() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    // A stream without Last-Event-ID starts at the log's head: let the
    // schema event reach the log first.
    wait_for_events(&app, &token, 1).await;
    let mut stream = SseReader::open(&app, &token, None).await;
    for n in 0..3 {
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": format!("{n}"), "total": n}),
        )
        .await;
    }
    let first: Vec<SseEvent> = vec![stream.next().await, stream.next().await];
    assert_eq!(first[0].event, "business_store.data.created");
    assert_eq!(first[0].data["id"].as_str().unwrap(), first[0].id);
    drop(stream);

    // Written while disconnected.
    for n in 3..6 {
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": format!("{n}"), "total": n}),
        )
        .await;
    }
    let mut resumed = SseReader::open(&app, &token, Some(&first[1].id)).await;
    let mut numbers = Vec::new();
    for _ in 0..4 {
        let e = resumed.next().await;
        numbers.push(e.data["data"]["recordId"].as_str().unwrap().to_owned());
    }
    let log = event_log(&app, &token).await;
    let expected: Vec<String> = log[3..7]
        .iter()
        .map(|e| e["data"]["recordId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        numbers, expected,
        "exactly the events after the last one seen"
    );
    assert!(
        resumed
            .next_within(Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn the_stream_resumes_across_a_service_restart() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    wait_for_events(&app, &token, 1).await;
    let mut stream = SseReader::open(&app, &token, None).await;
    app.post(
        "/v1/data/invoices",
        &token,
        &json!({"number": "before", "total": 1}),
    )
    .await;
    let last = stream.next().await;
    drop(stream);

    let restarted = TestApp::spawn_with(|s| s.database_url = Some(app.database_url.clone())).await;
    restarted
        .post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "after", "total": 2}),
        )
        .await;
    let mut resumed = SseReader::open(&restarted, &token, Some(&last.id)).await;
    let next = resumed.next().await;
    assert_eq!(next.event, "business_store.data.created");
    let got = restarted
        .get(
            &format!(
                "/v1/data/invoices/{}",
                next.data["data"]["recordId"].as_str().unwrap()
            ),
            &token,
        )
        .await;
    assert_eq!(body(got).await["data"]["number"], "after");
}

#[tokio::test]
async fn two_tenants_streams_never_mix() {
    let app = TestApp::spawn().await;
    let (a_id, a) = app.tenant_with_invoices().await;
    let (b_id, b) = app.tenant_with_invoices().await;
    wait_for_events(&app, &a, 1).await;
    wait_for_events(&app, &b, 1).await;
    let mut sa = SseReader::open(&app, &a, None).await;
    let mut sb = SseReader::open(&app, &b, None).await;
    for n in 0..5 {
        app.post("/v1/data/invoices", &a, &json!({"number": "a", "total": n}))
            .await;
        app.post("/v1/data/invoices", &b, &json!({"number": "b", "total": n}))
            .await;
    }
    for _ in 0..5 {
        assert_eq!(sa.next().await.data["tenantid"], a_id.as_str());
        assert_eq!(sb.next().await.data["tenantid"], b_id.as_str());
    }
    assert!(sa.next_within(Duration::from_millis(300)).await.is_none());
    assert!(sb.next_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn event_metrics_are_exported() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.post(
        "/v1/data/invoices",
        &token,
        &json!({"number": "1", "total": 1}),
    )
    .await;
    wait_for_events(&app, &token, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = send(app.request(Method::GET, "/metrics", None))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains("events_published_total"), "{text}");
    assert!(text.contains("event_publish_latency_seconds"), "{text}");
}

#[tokio::test]
async fn two_replicas_on_one_database_keep_per_record_order() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn_with(|s| s.database_url = Some(a.database_url.clone())).await;
    let (_, token) = a.tenant_with_invoices().await;
    a.put(
        "/v1/data/invoices/shared",
        &token,
        &json!({"number": "0", "total": 0}),
    )
    .await;
    for n in 1..=20 {
        let replica = if n % 2 == 0 { &a } else { &b };
        let resp = replica
            .put(
                "/v1/data/invoices/shared",
                &token,
                &json!({"number": "x", "total": n}),
            )
            .await;
        assert_eq!(resp.status(), 200);
    }
    let log = wait_for_events(&b, &token, 22).await;
    let versions: Vec<i64> = log[1..]
        .iter()
        .map(|e| e["data"]["version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=21).collect::<Vec<_>>(),
        "one event per write, in order, whichever replica wrote"
    );
}
