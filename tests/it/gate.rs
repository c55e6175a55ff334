//! The tenant gate: an archived tenant's tokens reach nothing (on every
//! route of the OpenAPI document, and its open event streams end), and each
//! tenant's requests and plugin uploads are rate limited, while a second
//! tenant doing normal work notices nothing.

use std::time::{Duration, Instant};

use bss_tests::*;
use reqwest::{Method, Response};
use serde_json::{Value, json};

/// The problem a token for an archived tenant gets, the same for a tenant
/// that never existed.
const NOT_FOUND: &str = "the token's tenant was not found";

/// Archives a tenant as a platform admin.
async fn archive(app: &TestApp, tenant: &str) {
    let resp = app
        .delete(&format!("/v1/tenants/{tenant}"), &platform_token())
        .await;
    assert_eq!(resp.status(), 202);
}

/// A tenant with an `invoices` schema, one record and one plugin; returns
/// (id, admin token, record id).
async fn busy_tenant(app: &TestApp) -> (String, String, String) {
    let (id, token) = app.tenant_with_invoices().await;
    let created = body(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "A-1", "total": 5}),
        )
        .await,
    )
    .await;
    let manifest = json!({"name": "no-negative-totals", "kind": "validation-hook",
                          "resources": ["invoices"]});
    app.install_plugin(&token, manifest, "no_negative_totals")
        .await;
    (id, token, created["id"].as_str().unwrap().to_owned())
}

/// Every authenticated operation of `/openapi.json`: (method, path template).
async fn authenticated_operations(app: &TestApp) -> Vec<(Method, String)> {
    let doc = body(send(app.request(Method::GET, "/openapi.json", None)).await).await;
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if op.get("security").is_none() {
                continue; // liveness, readiness, metrics: not tenant routes
            }
            ops.push((method.to_uppercase().parse().unwrap(), path.clone()));
        }
    }
    assert!(ops.len() >= 15, "the document lists the API: {ops:?}");
    ops
}

/// The path with plausible values for its parameters.
fn fill(template: &str, tenant: &str, record: &str) -> String {
    template
        .replace("/v1/tenants/{id}", &format!("/v1/tenants/{tenant}"))
        .replace("{resource}", "invoices")
        .replace("{id}", record)
        .replace("{name}", "no-negative-totals")
        .replace("{topic}", "auth.tenant.created")
        .replace("{version}", "1")
}

/// Sends the operation with a minimal valid body.
async fn call(app: &TestApp, method: &Method, path: &str, token: &str) -> Response {
    let req = app.request(method.clone(), path, Some(token));
    let req = if *method == Method::POST && path == "/v1/plugins" {
        let form = reqwest::multipart::Form::new()
            .text("manifest", "{}")
            .text("module", "garbage");
        req.multipart(form)
    } else if *method == Method::PATCH {
        req.header("content-type", "application/merge-patch+json")
            .body(json!({"total": 1}).to_string())
    } else if [Method::POST, Method::PUT].contains(method) {
        req.json(
            &json!({"items": [], "schema": {"type": "object"}, "version": 1,
                         "number": "B", "total": 1, "tenantId": "x"}),
        )
    } else {
        req
    };
    send(req.timeout(Duration::from_secs(10))).await
}

#[tokio::test]
async fn every_route_answers_404_to_an_archived_tenants_token() {
    let app = TestApp::spawn().await;
    let (gone, gone_token, gone_record) = busy_tenant(&app).await;
    let (other, other_token, other_record) = busy_tenant(&app).await;
    archive(&app, &gone).await;

    let ghost = token("never-existed", &["admin"]);
    let mut answers = Vec::new();
    for (method, template) in authenticated_operations(&app).await {
        let path = fill(&template, &gone, &gone_record);
        for token in [&gone_token, &ghost] {
            let resp = call(&app, &method, &path, token).await;
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            answers.push(format!("{method} {path}: {status} {text}"));
            assert_eq!(status, 404, "{method} {path}: {text}");
            let problem: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(problem["detail"], NOT_FOUND, "{method} {path}");
        }
    }

    // The other tenant still has all of its things.
    let own = format!("/v1/data/invoices/{other_record}");
    assert_eq!(app.get(&own, &other_token).await.status(), 200);
    assert_eq!(app.get("/v1/events", &other_token).await.status(), 200);
    assert_eq!(app.get("/v1/plugins", &other_token).await.status(), 200);
    let still = body(
        app.get(&format!("/v1/tenants/{other}"), &platform_token())
            .await,
    )
    .await;
    assert_eq!(still["status"], "active");
    // Platform admins still see the archived tenant itself.
    let archived = body(
        app.get(&format!("/v1/tenants/{gone}"), &platform_token())
            .await,
    )
    .await;
    assert_eq!(archived["status"], "archived", "{answers:#?}");
}

/// A raw event stream, read chunk by chunk.
async fn open_stream(app: &TestApp, token: &str) -> Response {
    let resp = send(
        app.request(Method::GET, "/v1/events/stream", Some(token))
            .timeout(Duration::from_secs(120)),
    )
    .await;
    assert_eq!(resp.status(), 200);
    resp
}

/// Reads until `needle` arrives; false if the stream ends or `wait` passes.
async fn read_until(stream: &mut Response, needle: &str, wait: Duration) -> bool {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + wait;
    while !seen.contains(needle) {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Ok(Ok(Some(bytes))) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            _ => return false,
        }
    }
    true
}

/// How long until the stream ends (None: still open after `wait`).
async fn time_to_end(stream: &mut Response, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(_) => return Some(start.elapsed()),
            Err(_) => return None,
        }
    }
}

/// Writes a record; its id (which its event names).
async fn write(app: &TestApp, token: &str) -> String {
    let resp = app
        .post(
            "/v1/data/invoices",
            token,
            &json!({"number": "1", "total": 1}),
        )
        .await;
    assert_eq!(resp.status(), 201);
    body(resp).await["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_open_event_stream_ends_when_its_tenant_is_archived() {
    let app = TestApp::spawn().await;
    let (gone, gone_token) = app.tenant_with_invoices().await;
    let (_, other_token) = app.tenant_with_invoices().await;
    let mut gone_stream = open_stream(&app, &gone_token).await;
    let mut other_stream = open_stream(&app, &other_token).await;
    let before = write(&app, &gone_token).await;
    assert!(read_until(&mut gone_stream, &before, Duration::from_secs(10)).await);

    archive(&app, &gone).await;
    let ended = time_to_end(&mut gone_stream, Duration::from_secs(10)).await;
    assert!(
        ended.is_some_and(|t| t < Duration::from_secs(3)),
        "the archived tenant's stream ended after {ended:?}"
    );

    let after = write(&app, &other_token).await;
    assert!(
        read_until(&mut other_stream, &after, Duration::from_secs(10)).await,
        "the other tenant's stream goes on"
    );
}

#[tokio::test]
async fn another_replica_refuses_an_archived_tenant_within_seconds() {
    let first = TestApp::spawn().await;
    let same = first.settings.clone();
    let second = TestApp::spawn_with(move |s| s.database_url = same.database_url.clone()).await;
    let (gone, gone_token) = first.tenant_with_invoices().await;
    let (_, other_token) = first.tenant_with_invoices().await;
    let mut stream = open_stream(&second, &gone_token).await;
    assert_eq!(second.get("/v1/events", &gone_token).await.status(), 200);

    archive(&first, &gone).await;
    let ended = time_to_end(&mut stream, Duration::from_secs(15)).await;
    assert!(
        ended.is_some_and(|t| t < Duration::from_secs(5)),
        "the stream on the other replica ended after {ended:?}"
    );
    assert_eq!(second.get("/v1/events", &gone_token).await.status(), 404);
    assert_eq!(second.get("/v1/events", &other_token).await.status(), 200);
}

/// Sends `n` cheap requests at once; the responses' statuses and headers.
async fn burst_of(app: &TestApp, token: &str, n: usize) -> Vec<Response> {
    let reqs = (0..n).map(|_| app.get("/v1/schemas", token));
    futures::future::join_all(reqs).await
}

fn header<'a>(resp: &'a Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_tenant_over_its_burst_gets_429_while_another_does_not() {
    let app = TestApp::spawn_with(|s| {
        s.rate_limit_rps = 5;
        s.rate_limit_burst = 10;
    })
    .await;
    let (_, noisy) = app.tenant().await;
    let (_, quiet) = app.tenant().await;

    let answers = burst_of(&app, &noisy, 40).await;
    let refused: Vec<&Response> = answers.iter().filter(|r| r.status() == 429).collect();
    let served = answers.iter().filter(|r| r.status() == 200).count();
    assert!(refused.len() >= 20, "{} of 40 refused", refused.len());
    assert!((10..=20).contains(&served), "{served} served");
    let first = refused[0];
    let retry: u64 = header(first, "retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After: {retry}");
    assert_eq!(header(first, "ratelimit-policy"), "\"requests\";q=10;w=2");
    assert!(header(first, "ratelimit").starts_with("\"requests\";r=0;t="));
    assert_eq!(
        header(first, "content-type"),
        "application/problem+json",
        "a problem document"
    );

    // The quiet tenant, meanwhile, is served every time.
    for resp in burst_of(&app, &quiet, 8).await {
        assert_eq!(resp.status(), 200);
    }

    // After Retry-After, the noisy tenant is served again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(app.get("/v1/schemas", &noisy).await.status(), 200);
}

#[tokio::test]
async fn a_platform_admin_raises_one_tenants_limit_and_lowers_anothers() {
    let app = TestApp::spawn_with(|s| {
        s.rate_limit_rps = 2;
        s.rate_limit_burst = 5;
    })
    .await;
    let (big, big_token) = app.tenant().await;
    let (small, small_token) = app.tenant().await;
    let admin = platform_token();

    let raised = app
        .put(
            &format!("/v1/tenants/{big}/rate-limits"),
            &admin,
            &json!({"requestsPerSecond": 100, "requestBurst": 100}),
        )
        .await;
    assert_eq!(raised.status(), 200);
    let raised = body(raised).await;
    assert_eq!(
        raised["own"],
        json!({"requestsPerSecond": 100, "requestBurst": 100})
    );
    assert_eq!(raised["requestBurst"], 100);
    assert_eq!(raised["pluginUploadsPerMinute"], 10, "the installation's");
    let lowered = app
        .put(
            &format!("/v1/tenants/{small}/rate-limits"),
            &admin,
            &json!({"requestsPerSecond": 1, "requestBurst": 2}),
        )
        .await;
    assert_eq!(lowered.status(), 200);

    for resp in burst_of(&app, &big_token, 40).await {
        assert_eq!(resp.status(), 200, "the raised limit applies");
    }
    let small_answers = burst_of(&app, &small_token, 5).await;
    let refused = small_answers.iter().filter(|r| r.status() == 429).count();
    assert!(
        refused >= 2,
        "the lowered limit applies: {refused} of 5 refused"
    );

    let got = body(
        app.get(&format!("/v1/tenants/{small}/rate-limits"), &admin)
            .await,
    )
    .await;
    assert_eq!(got["requestsPerSecond"], 1);
    assert_eq!(got["requestBurst"], 2);

    // Nonsense is refused, and tenants cannot set their own.
    let bad = app
        .put(
            &format!("/v1/tenants/{small}/rate-limits"),
            &admin,
            &json!({"requestsPerSecond": 5, "requestBurst": 0}),
        )
        .await;
    assert_eq!(bad.status(), 422);
    assert_eq!(body(bad).await["errors"][0]["path"], "/requestBurst");
    let own = app
        .put(
            &format!("/v1/tenants/{big}/rate-limits"),
            &big_token,
            &json!({}),
        )
        .await;
    assert_eq!(own.status(), 403);
    let unknown = app
        .get("/v1/tenants/no-such-tenant/rate-limits", &admin)
        .await;
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn plugin_uploads_are_limited_separately_from_requests() {
    let app = TestApp::spawn_with(|s| {
        s.plugin_uploads_per_minute = 6;
        s.plugin_upload_burst = 3;
    })
    .await;
    let (_, uploader) = app.tenant().await;
    let (_, other) = app.tenant().await;

    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..6 {
        let resp = app
            .upload_plugin(&uploader, json!({}), b"garbage".to_vec())
            .await;
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 && refusal.is_none() {
            refusal = Some(resp);
        }
    }
    assert_eq!(statuses[..3], [422, 422, 422], "{statuses:?}");
    assert_eq!(statuses[3..], [429, 429, 429], "{statuses:?}");
    let refusal = refusal.unwrap();
    let retry: u64 = header(&refusal, "retry-after").parse().unwrap();
    assert!((1..=10).contains(&retry), "Retry-After: {retry}");
    assert_eq!(header(&refusal, "ratelimit-policy"), "\"uploads\";q=3;w=30");
    let problem = body(refusal).await;
    assert_eq!(
        problem["type"],
        "https://business-store.dev/problems/rate-limited"
    );

    // Other requests of the same tenant, and another tenant's uploads, go on.
    assert_eq!(app.get("/v1/plugins", &uploader).await.status(), 200);
    let resp = app
        .upload_plugin(&other, json!({}), b"garbage".to_vec())
        .await;
    assert_eq!(resp.status(), 422);
}

#[tokio::test]
async fn a_platform_admin_without_a_tenant_is_not_limited() {
    let app = TestApp::spawn_with(|s| {
        s.rate_limit_rps = 1;
        s.rate_limit_burst = 1;
    })
    .await;
    let (id, _) = app.tenant().await;
    let admin = platform_token();
    let path = format!("/v1/tenants/{id}");
    let reqs = (0..20).map(|_| app.get(&path, &admin));
    for resp in futures::future::join_all(reqs).await {
        assert_eq!(resp.status(), 200);
    }
}

#[tokio::test]
async fn successful_responses_show_the_quota_left() {
    let app = TestApp::spawn_with(|s| {
        s.rate_limit_rps = 10;
        s.rate_limit_burst = 20;
    })
    .await;
    let (_, token) = app.tenant().await;
    let resp = app.get("/v1/schemas", &token).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "ratelimit-policy"), "\"requests\";q=20;w=2");
    assert_eq!(header(&resp, "ratelimit"), "\"requests\";r=19;t=1");
}

#[tokio::test]
async fn open_event_streams_end_when_the_service_shuts_down() {
    let (mut settings, _scratch) = test_settings();
    // Longer than the test waits: only the streams ending lets it stop sooner.
    settings.shutdown_drain_secs = 60;
    let service = bss::startup::Application::build(settings.clone())
        .await
        .unwrap();
    let base = format!("http://127.0.0.1:{}", service.port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(service.run_until(async move {
        let _ = stopped.await;
    }));
    let app = TestApp {
        base,
        client: reqwest::Client::new(),
        database_url: settings.database_url.clone().unwrap_or_default(),
        settings,
        _scratch: None,
    };
    let (_, token) = app.tenant_with_invoices().await;
    let mut streams = vec![
        open_stream(&app, &token).await,
        open_stream(&app, &token).await,
    ];
    let id = write(&app, &token).await;
    for s in &mut streams {
        assert!(read_until(s, &id, Duration::from_secs(10)).await);
    }

    stop.send(()).unwrap();
    for s in &mut streams {
        let ended = time_to_end(s, Duration::from_secs(20)).await;
        assert!(
            ended.is_some_and(|t| t < Duration::from_secs(5)),
            "a stream ended after {ended:?}"
        );
    }
    let stopped = tokio::time::timeout(Duration::from_secs(20), running).await;
    assert!(
        stopped.is_ok(),
        "the service stopped without waiting out the drain"
    );
}
