use bss_tests::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn liveness_and_readiness_answer_without_a_token() {
    let app = TestApp::spawn().await;
    let live = send(app.request(Method::GET, "/health/live", None)).await;
    assert_eq!(live.status(), 200);
    let ready = send(app.request(Method::GET, "/health/ready", None)).await;
    assert_eq!(ready.status(), 200);
    let body = body(ready).await;
    assert_eq!(body["checks"]["database"], "up");
    assert_eq!(body["checks"]["validationService"], "local");
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_keeps_the_callers() {
    let app = TestApp::spawn().await;
    let resp = send(app.request(Method::GET, "/health/live", None)).await;
    assert!(resp.headers().get("x-request-id").is_some());
    let resp = send(
        app.request(Method::GET, "/v1/schemas", None)
            .header("x-request-id", "trace-me-42"),
    )
    .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-request-id"], "trace-me-42");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.post(
        "/v1/data/invoices",
        &token,
        &json!({"number": "1", "total": 5}),
    )
    .await;
    let text = send(app.request(Method::GET, "/metrics", None))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#"http_requests_total{method="POST",route="/v1/data/{resource}",status="201"}"#
        ),
        "{text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_the_server_answers() {
    let app = TestApp::spawn().await;
    let doc = body(send(app.request(Method::GET, "/openapi.json", None)).await).await;
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/v1/tenants", "post"),
        ("/v1/tenants/{id}", "get"),
        ("/v1/tenants/{id}", "delete"),
        ("/v1/schemas", "get"),
        ("/v1/schemas/{resource}", "put"),
        ("/v1/schemas/{resource}", "get"),
        ("/v1/schemas/{resource}/versions", "get"),
        ("/v1/schemas/{resource}/versions/{version}", "get"),
        ("/v1/data/{resource}", "post"),
        ("/v1/data/{resource}", "get"),
        ("/v1/data/{resource}/{id}", "get"),
        ("/v1/data/{resource}/{id}", "put"),
        ("/v1/data/{resource}/{id}", "patch"),
        ("/v1/data/{resource}/{id}", "delete"),
        ("/v1/data/{resource}/batch", "post"),
        ("/v1/events", "get"),
        ("/v1/events/stream", "get"),
        ("/v1/broker/topics/{topic}/messages", "post"),
        ("/health/live", "get"),
        ("/health/ready", "get"),
        ("/metrics", "get"),
    ];
    for (path, method) in expected {
        assert!(paths[path].get(method).is_some(), "{method} {path} missing");
    }
    // And every documented operation is served (answers something other than
    // the router's 404/405).
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path
                .replace("{resource}", "invoices")
                .replace("{id}", "x")
                .replace("{version}", "1")
                .replace("{topic}", "auth.tenant.created");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = send(app.request(m, &concrete, Some("bad"))).await;
            assert_ne!(resp.status(), 405, "{method} {path}");
            if resp.status() == 404 {
                let b = body(resp).await;
                assert_ne!(b["detail"], "no such endpoint", "{method} {path}");
            }
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test]
async fn unknown_endpoints_answer_a_problem_document() {
    let app = TestApp::spawn().await;
    let resp = send(app.request(Method::GET, "/v2/nothing", None)).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn readiness_reports_the_broker_and_the_breakers() {
    let app = TestApp::spawn().await;
    let resp = send(app.request(Method::GET, "/health/ready", None)).await;
    assert_eq!(resp.status(), 200);
    let ready = body(resp).await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["checks"]["database"], "up");
    assert_eq!(ready["checks"]["broker"]["kind"], "built-in");
    assert_eq!(ready["checks"]["broker"]["state"], "up");
    assert_eq!(
        ready["checks"]["breakers"]["plugins"]["open"], 0,
        "{ready:#}"
    );
}
