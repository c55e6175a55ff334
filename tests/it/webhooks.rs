//! Webhooks end to end: real receivers on loopback, every signature checked
//! by the Standard Webhooks reference library, retries, misbehaving
//! receivers, the SSRF guard, transformers, replay, tenant isolation and
//! fairness.

use std::time::{Duration, Instant};

use bss::config::Settings;
use bss_tests::receiver::{Receiver, verify};
use bss_tests::*;
use serde_json::{Value, json};
use sqlx::Connection;

/// Loopback receivers allowed, over http; a short retry schedule.
fn open(s: &mut Settings) {
    s.webhook_allow = "127.0.0.1/32".into();
    s.webhook_allow_http = true;
    s.webhook_retry_schedule = "0,1,1".into();
    s.webhook_timeout_ms = 2_000;
    s.webhook_poll_ms = 50;
}

async fn register(app: &TestApp, token: &str, spec: Value) -> Value {
    let resp = app.post("/v1/webhooks", token, &spec).await;
    let status = resp.status();
    let answer = body(resp).await;
    assert_eq!(status, 201, "{answer:#}");
    answer
}

async fn create_invoice(app: &TestApp, token: &str, n: u32) -> String {
    let resp = app
        .post(
            "/v1/data/invoices",
            token,
            &json!({"number": format!("INV-{n}"), "total": n}),
        )
        .await;
    assert_eq!(resp.status(), 201);
    body(resp).await["id"].as_str().unwrap().to_owned()
}

async fn deliveries(app: &TestApp, token: &str, webhook: &Value, query: &str) -> Vec<Value> {
    let id = webhook["id"].as_str().unwrap();
    let resp = app
        .get(&format!("/v1/webhooks/{id}/deliveries{query}"), token)
        .await;
    assert_eq!(resp.status(), 200);
    body(resp).await["items"].as_array().cloned().unwrap()
}

/// Waits (at most 20 s) until the endpoint has `n` deliveries in `status`.
async fn wait_status(
    app: &TestApp,
    token: &str,
    webhook: &Value,
    status: &str,
    n: usize,
) -> Vec<Value> {
    let query = format!("?status={status}");
    for _ in 0..400 {
        let found = deliveries(app, token, webhook, &query).await;
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = deliveries(app, token, webhook, "").await;
    panic!("expected {n} {status} deliveries: {all:#?}");
}

fn data_events(log: &[Value]) -> Vec<Value> {
    log.iter()
        .filter(|e| {
            e["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("business_store.data."))
        })
        .cloned()
        .collect()
}

#[tokio::test]
async fn deliveries_are_signed_in_order_and_verified_by_the_reference_library() {
    let app = TestApp::spawn_with(open).await;
    let rx = Receiver::start().await;
    let (_, token) = app.tenant_with_invoices().await;
    let hook = register(
        &app,
        &token,
        json!({"url": rx.url("/ok"), "events": ["business_store.data.*"], "description": "books"}),
    )
    .await;
    let secret = hook["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{hook:#}");
    // Shown once: never again, and never stored in clear.
    let id = hook["id"].as_str().unwrap();
    let again = body(app.get(&format!("/v1/webhooks/{id}"), &token).await).await;
    assert!(again.get("secret").is_none(), "{again:#}");
    let listed = body(app.get("/v1/webhooks", &token).await).await;
    assert!(!listed.to_string().contains(&secret));
    let mut db = app.db().await;
    let (stored,): (String,) = sqlx::query_as("SELECT secrets::text FROM bss.webhooks")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(
        !stored.contains(&secret[6..]),
        "the secret is stored in clear"
    );

    for n in 0..5 {
        create_invoice(&app, &token, n).await;
    }
    let hits = rx.wait_for("/ok", 5, Duration::from_secs(20)).await;
    assert_eq!(hits.len(), 5, "{hits:#?}");
    let log = data_events(&wait_for_events(&app, &token, 6).await);
    let ids: Vec<&str> = hits.iter().map(|h| h.id()).collect();
    let logged: Vec<&str> = log.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, logged, "one delivery per event, in log order");
    for h in &hits {
        assert_eq!(h.method, "POST");
        assert_eq!(h.header("content-type"), "application/json");
        assert!(
            h.header("user-agent")
                .starts_with("BusinessStore-Webhooks/")
        );
        assert_eq!(
            h.json()["id"].as_str(),
            Some(h.id()),
            "the body is the CloudEvent"
        );
    }
    assert!(verify(&secret, &hits).iter().all(|r| r == "ok"));
    let wrong = verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &hits[..1]);
    assert_ne!(
        wrong[0], "ok",
        "the reference library refuses a wrong secret"
    );

    // A rotation: both secrets sign for a while.
    let resp = app
        .post(
            &format!("/v1/webhooks/{id}/secret/rotate"),
            &token,
            &json!({}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let rotated = body(resp).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    create_invoice(&app, &token, 6).await;
    let hits = rx.wait_for("/ok", 6, Duration::from_secs(20)).await;
    let last = &hits[5..];
    assert_eq!(last[0].header("webhook-signature").split(' ').count(), 2);
    assert_eq!(verify(&secret, last), ["ok"]);
    assert_eq!(verify(&new_secret, last), ["ok"]);

    let done = wait_status(&app, &token, &hook, "succeeded", 6).await;
    let first = &done[0];
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["attemptLog"][0]["statusCode"], 200);
    assert!(
        first["attemptLog"][0]["response"]
            .as_str()
            .unwrap()
            .contains("received")
    );
}

#[tokio::test]
async fn failures_are_retried_on_the_schedule_then_given_up_loudly() {
    let app = TestApp::spawn_with(open).await;
    let rx = Receiver::start().await;
    let (_, token) = app.tenant_with_invoices().await;
    let flaky = register(
        &app,
        &token,
        json!({"url": rx.url("/fail/2"), "events": ["business_store.data.created"]}),
    )
    .await;
    let broken = register(
        &app,
        &token,
        json!({"url": rx.url("/status/500"), "events": ["*"], "resources": ["invoices"]}),
    )
    .await;
    create_invoice(&app, &token, 1).await;

    // Fails twice, lands on the third attempt, same webhook-id throughout.
    let hits = rx.wait_for("/fail/2", 3, Duration::from_secs(20)).await;
    assert_eq!(hits.len(), 3);
    assert!(hits.iter().all(|h| h.id() == hits[0].id()));
    let gaps: Vec<f64> = hits
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= 0.8),
        "the schedule (1 s ± 10%) is kept: {gaps:?}"
    );
    let ok = wait_status(&app, &token, &flaky, "succeeded", 1).await;
    assert_eq!(ok[0]["attempts"], 3);
    let codes: Vec<&Value> = ok[0]["attemptLog"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["statusCode"])
        .collect();
    assert_eq!(codes, [&json!(500), &json!(500), &json!(200)]);

    // Never lands: failed after the last attempt, and said so in the log.
    let failed = wait_status(&app, &token, &broken, "failed", 1).await;
    assert_eq!(failed[0]["attempts"], 3);
    assert_eq!(failed[0]["lastStatusCode"], 500);
    assert_eq!(failed[0]["attemptLog"][2]["errorKind"], "status");
    let log = wait_for_events(&app, &token, 3).await;
    let notice = log
        .iter()
        .find(|e| e["type"] == "business_store.webhook.failed")
        .unwrap_or_else(|| panic!("no failure event: {log:#?}"));
    assert_eq!(notice["data"]["webhookId"], broken["id"]);
    assert_eq!(notice["data"]["deliveryId"], failed[0]["id"]);
    assert!(!notice.to_string().contains("whsec_"));
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("webhook_deliveries_total{outcome=\"failed\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("webhook_attempt_duration_seconds"));

    // A manual retry sends it again, from the start of the schedule.
    let path = format!(
        "/v1/webhooks/{}/deliveries/{}/retry",
        broken["id"].as_str().unwrap(),
        failed[0]["id"].as_str().unwrap()
    );
    let resp = app.post(&path, &token, &json!({})).await;
    assert_eq!(resp.status(), 202);
    let hits = rx.wait_for("/status/500", 4, Duration::from_secs(20)).await;
    assert_eq!(hits.len(), 4);
    let missing = format!(
        "/v1/webhooks/{}/deliveries/{}/retry",
        broken["id"].as_str().unwrap(),
        uuid::Uuid::new_v4()
    );
    assert_eq!(app.post(&missing, &token, &json!({})).await.status(), 404);
}

#[tokio::test]
async fn misbehaving_receivers_are_bounded() {
    let app = TestApp::spawn_with(|s| {
        open(s);
        s.webhook_retry_schedule = "0,0.2,0.2".into();
        s.webhook_timeout_ms = 1_000;
    })
    .await;
    let rx = Receiver::start().await;
    let (_, token) = app.tenant_with_invoices().await;
    let mut hooks = Vec::new();
    for path in ["/gone", "/redirect", "/hang", "/big", "/status/429", "/nul"] {
        let h = register(
            &app,
            &token,
            json!({"url": rx.url(path), "events": ["business_store.data.created"]}),
        )
        .await;
        hooks.push(h);
    }
    create_invoice(&app, &token, 1).await;
    let [gone, redirect, hang, big, busy, nul] = &hooks[..] else {
        unreachable!()
    };

    // 410: failed at once, and the endpoint disabled (an event says so).
    let failed = wait_status(&app, &token, gone, "failed", 1).await;
    assert_eq!(failed[0]["attempts"], 1);
    let id = gone["id"].as_str().unwrap();
    let now = body(app.get(&format!("/v1/webhooks/{id}"), &token).await).await;
    assert_eq!(now["enabled"], false);
    assert!(now["disabledReason"].as_str().unwrap().contains("410"));

    // A redirect (to a private address) is not followed: a failure.
    let failed = wait_status(&app, &token, redirect, "failed", 1).await;
    assert_eq!(failed[0]["attemptLog"][0]["errorKind"], "redirect");
    assert_eq!(failed[0]["attemptLog"][0]["statusCode"], 302);

    // Hanging past the timeout.
    let failed = wait_status(&app, &token, hang, "failed", 1).await;
    assert_eq!(failed[0]["attemptLog"][0]["errorKind"], "timeout");

    // 20 MB answered: a success, 20 kB of it kept.
    let ok = wait_status(&app, &token, big, "succeeded", 1).await;
    let kept = ok[0]["attemptLog"][0]["response"].as_str().unwrap();
    assert_eq!(kept.len(), 20_000);

    // A binary answer is kept as text.
    let ok = wait_status(&app, &token, nul, "succeeded", 1).await;
    assert_eq!(ok[0]["attempts"], 1);

    // 429 with Retry-After: 1 waits a second, not the schedule's 0.2 s.
    let failed = wait_status(&app, &token, busy, "failed", 1).await;
    assert_eq!(failed[0]["attempts"], 3);
    let hits = rx.hits("/status/429");
    let gaps: Vec<f64> = hits
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect();
    assert!(
        gaps.iter().all(|g| *g >= 0.9),
        "Retry-After honoured: {gaps:?}"
    );

    let log = wait_for_events(&app, &token, 2).await;
    assert!(
        log.iter()
            .any(|e| e["type"] == "business_store.webhook.disabled"
                && e["data"]["webhookId"] == gone["id"]),
        "{log:#?}"
    );
}

#[tokio::test]
async fn the_ssrf_guard_refuses_private_destinations() {
    // The default guard: https only, nothing opened.
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    for url in [
        "http://example.com/hook",
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "gopher://example.com/",
        "https://127.0.0.1/hook",
        "https://2130706433/hook",
        "https://localhost/hook",
        "https://10.0.0.1/hook",
        "https://172.16.0.1/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://100.64.0.1/hook",
        "https://0.0.0.0/hook",
        "https://224.0.0.1/hook",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[::ffff:169.254.169.254]/hook",
        "https://[64:ff9b::a00:1]/hook",
        "https://[2002:7f00:1::1]/hook",
        "https://[fd00:ec2::254]/hook",
        "https://[fe80::1]/hook",
        "https://user:pw@example.com/hook",
        "not a url",
    ] {
        let resp = app
            .post(
                "/v1/webhooks",
                &token,
                &json!({"url": url, "events": ["*"]}),
            )
            .await;
        let status = resp.status();
        let problem = body(resp).await;
        assert_eq!(status, 422, "{url}: {problem:#}");
        assert_eq!(problem["errors"][0]["path"], "/url", "{url}: {problem:#}");
        assert!(
            !problem["errors"][0]["message"].as_str().unwrap().is_empty(),
            "{problem:#}"
        );
    }
    // Why, in words: the address and its kind.
    let resp = app
        .post(
            "/v1/webhooks",
            &token,
            &json!({"url": "https://localhost:8443/x", "events": ["*"]}),
        )
        .await;
    let problem = body(resp).await;
    let message = problem["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("loopback"), "{message}");

    // Other fields are checked at once too.
    let resp = app
        .post(
            "/v1/webhooks",
            &token,
            &json!({"url": "https://10.0.0.1/", "events": ["Bad Type"], "resources": ["no such!"],
                    "transformer": "missing", "rateLimitPerSec": 0}),
        )
        .await;
    assert_eq!(resp.status(), 422);
    let problem = body(resp).await;
    let paths: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/url",
            "/events/0",
            "/resources/0",
            "/transformer",
            "/rateLimitPerSec"
        ]
    );
}

#[tokio::test]
async fn tenants_see_and_receive_only_their_own() {
    let app = TestApp::spawn_with(open).await;
    let rx = Receiver::start().await;
    let (_, alice) = app.tenant_with_invoices().await;
    let (bob_id, bob) = app.tenant_with_invoices().await;
    let hook = register(
        &app,
        &alice,
        json!({"url": rx.url("/ok/alice"), "events": ["*"]}),
    )
    .await;
    let id = hook["id"].as_str().unwrap();
    let path = format!("/v1/webhooks/{id}");
    assert_eq!(app.get(&path, &bob).await.status(), 404);
    assert_eq!(
        app.patch(&path, &bob, &json!({"enabled": false}))
            .await
            .status(),
        404
    );
    assert_eq!(app.delete(&path, &bob).await.status(), 404);
    assert_eq!(
        app.get(&format!("{path}/deliveries"), &bob).await.status(),
        404
    );
    let bob_list = body(app.get("/v1/webhooks", &bob).await).await;
    assert_eq!(bob_list["items"], json!([]));
    let reader = token(&bob_id, &["reader"]);
    assert_eq!(app.get("/v1/webhooks", &reader).await.status(), 403);

    create_invoice(&app, &bob, 1).await;
    create_invoice(&app, &alice, 1).await;
    let hits = rx.wait_for("/ok/alice", 1, Duration::from_secs(20)).await;
    assert_eq!(hits.len(), 1);
    assert_ne!(hits[0].json()["tenantid"], json!(bob_id));

    // Paused: nothing; resumed: what comes after.
    let resp = app.patch(&path, &alice, &json!({"enabled": false})).await;
    assert_eq!(resp.status(), 200);
    create_invoice(&app, &alice, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx.hits("/ok/alice").len(), 1);
    let resp = app
        .patch(
            &path,
            &alice,
            &json!({"enabled": true, "description": "again"}),
        )
        .await;
    assert_eq!(body(resp).await["description"], "again");
    create_invoice(&app, &alice, 3).await;
    let hits = rx.wait_for("/ok/alice", 2, Duration::from_secs(20)).await;
    assert_eq!(hits.len(), 2);
    assert_eq!(hits[1].json()["type"], "business_store.data.created");

    assert_eq!(app.delete(&path, &alice).await.status(), 204);
    assert_eq!(app.get(&path, &alice).await.status(), 404);
}

#[tokio::test]
async fn a_replay_sends_a_time_range_again_with_the_same_ids() {
    let app = TestApp::spawn_with(open).await;
    let rx = Receiver::start().await;
    let (_, token) = app.tenant_with_invoices().await;
    let since = chrono::Utc::now();
    let hook = register(
        &app,
        &token,
        json!({"url": rx.url("/ok"), "events": ["business_store.data.created"], "fifo": true}),
    )
    .await;
    for n in 0..3 {
        create_invoice(&app, &token, n).await;
    }
    let first = rx.wait_for("/ok", 3, Duration::from_secs(20)).await;
    wait_status(&app, &token, &hook, "succeeded", 3).await;
    let id = hook["id"].as_str().unwrap();
    let resp = app
        .post(
            &format!("/v1/webhooks/{id}/replay"),
            &token,
            &json!({"since": since}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    let answer = body(resp).await;
    assert_eq!(answer["queued"], 3, "{answer:#}");
    assert_eq!(answer["more"], false);
    let all = rx.wait_for("/ok", 6, Duration::from_secs(20)).await;
    assert_eq!(all.len(), 6);
    let ids = |hits: &[bss_tests::receiver::Hit]| {
        hits.iter().map(|h| h.id().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&all[3..]), ids(&first), "same ids, in log order (fifo)");
    let done = wait_status(&app, &token, &hook, "succeeded", 3).await;
    assert!(done.iter().all(|d| d["attempts"] == 2), "{done:#?}");
}

#[tokio::test]
async fn a_tenant_with_hanging_endpoints_does_not_delay_another() {
    let app = TestApp::spawn_with(|s| {
        open(s);
        s.webhook_timeout_ms = 30_000;
    })
    .await;
    let rx = Receiver::start().await;
    let (_, noisy) = app.tenant_with_invoices().await;
    let (_, quiet) = app.tenant_with_invoices().await;
    for i in 0..50 {
        register(
            &app,
            &noisy,
            json!({"url": rx.url(&format!("/hang/{i}")), "events": ["*"]}),
        )
        .await;
    }
    for n in 0..4 {
        create_invoice(&app, &noisy, n).await;
    }
    // The noisy tenant's deliveries are under way (and hang).
    rx.wait_for("/hang", 16, Duration::from_secs(20)).await;
    register(
        &app,
        &quiet,
        json!({"url": rx.url("/ok/quiet"), "events": ["*"]}),
    )
    .await;
    let mut waits = Vec::new();
    for n in 0..3 {
        let start = Instant::now();
        create_invoice(&app, &quiet, n).await;
        let hits = rx
            .wait_for("/ok/quiet", n as usize + 1, Duration::from_secs(20))
            .await;
        assert_eq!(hits.len(), n as usize + 1);
        waits.push(start.elapsed());
    }
    eprintln!("the quiet tenant's deliveries arrived after {waits:?}");
    // Measured in hundreds of ms; the bound leaves room for a loaded
    // CI machine, far below the noisy tenant's 30 s hangs.
    assert!(
        waits.iter().all(|w| *w < Duration::from_secs(3)),
        "{waits:?}"
    );
    // The noisy tenant never has more than its share in flight.
    let in_flight = rx.hits("/hang").len();
    assert!(in_flight <= 16, "{in_flight} hanging at once");
}

#[tokio::test]
async fn transformers_rewrite_cancel_and_fail_by_name() {
    let app = TestApp::spawn_with(open).await;
    let rx = Receiver::start().await;
    let (_, token) = app.tenant_with_invoices().await;
    app.install_plugin(
        &token,
        json!({"name": "webhook-chat", "kind": "webhook-transformer",
               "config": {"skip": ["business_store.data.deleted"],
                          "trapOn": ["business_store.data.updated"],
                          "path": "/ok/chat?room=1"}}),
        "webhook_chat",
    )
    .await;
    let hook = register(
        &app,
        &token,
        json!({"url": rx.url("/ok/raw"), "events": ["business_store.data.*"],
               "transformer": "webhook-chat"}),
    )
    .await;
    let secret = hook["secret"].as_str().unwrap();
    let id = create_invoice(&app, &token, 1).await;
    let hits = rx.wait_for("/ok/chat", 1, Duration::from_secs(20)).await;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].path, "/ok/chat?room=1");
    assert_eq!(
        hits[0].json(),
        json!({"text": format!("business_store.data.created invoices/{id}")})
    );
    assert_eq!(
        verify(secret, &hits),
        ["ok"],
        "the rewritten body is what is signed"
    );

    // Cancelled: nothing sent.
    let resp = app.delete(&format!("/v1/data/invoices/{id}"), &token).await;
    assert_eq!(resp.status(), 204);
    let cancelled = wait_status(&app, &token, &hook, "cancelled", 1).await;
    assert_eq!(cancelled[0]["eventType"], "business_store.data.deleted");

    // A trapping transformer fails the attempt, naming it; retried, then failed.
    let id = create_invoice(&app, &token, 2).await;
    let resp = app
        .patch(
            &format!("/v1/data/invoices/{id}"),
            &token,
            &json!({"total": 3}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let failed = wait_status(&app, &token, &hook, "failed", 1).await;
    let attempt = &failed[0]["attemptLog"][0];
    assert_eq!(attempt["errorKind"], "transformer");
    assert!(
        attempt["error"].as_str().unwrap().contains("webhook-chat"),
        "{attempt:#}"
    );
    assert!(rx.hits("/ok/raw").is_empty(), "never sent untransformed");
    assert_eq!(rx.hits("/ok/chat").len(), 2);
}

#[tokio::test]
async fn a_transformer_on_trial_a_shadow_never_sends_a_canary_does() {
    let app = TestApp::spawn_with(open).await;
    let rx = Receiver::start().await;
    let (_, token) = app.tenant_with_invoices().await;
    let chat = |path: &str| json!({"name": "webhook-chat", "kind": "webhook-transformer", "config": {"path": path}});
    app.install_plugin(&token, chat("/ok/v1"), "webhook_chat")
        .await;
    let resp = app
        .upload_plugin_to(
            "/v1/plugins?trial=shadow",
            &token,
            chat("/ok/v2"),
            plugin_bytes("webhook_chat"),
        )
        .await;
    assert_eq!(resp.status(), 201);
    register(
        &app,
        &token,
        json!({"url": rx.url("/ok/raw"), "events": ["business_store.data.created"],
               "transformer": "webhook-chat"}),
    )
    .await;
    create_invoice(&app, &token, 1).await;
    assert_eq!(
        rx.wait_for("/ok/v1", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    // The shadow ran on the same delivery, and disagreed (another path).
    let mut trial = Value::Null;
    for _ in 0..50 {
        trial = body(app.get("/v1/plugins/webhook-chat", &token).await).await["trial"].clone();
        if trial["stats"]["calls"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(trial["stats"]["disagreements"], 1, "{trial:#}");
    let example = &trial["stats"]["examples"][0];
    assert_eq!(example["active"]["detail"]["path"], "/ok/v1");
    assert_eq!(example["trial"]["detail"]["path"], "/ok/v2");
    assert!(rx.hits("/ok/v2").is_empty(), "a shadow never sends");

    // As a canary for every delivery, its request is the one sent.
    let canary = json!({"version": 2, "mode": "canary", "percent": 100});
    assert_eq!(
        app.put("/v1/plugins/webhook-chat/trial", &token, &canary)
            .await
            .status(),
        200
    );
    create_invoice(&app, &token, 2).await;
    assert_eq!(
        rx.wait_for("/ok/v2", 1, Duration::from_secs(20))
            .await
            .len(),
        1
    );
    assert_eq!(rx.hits("/ok/v1").len(), 1);
}

/// A replica process, killed (SIGKILL) when dropped: a failing test
/// leaves none behind.
struct Replica(std::process::Child);

impl Replica {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn replica(port: u16, database_url: &str, data: &std::path::Path) -> Replica {
    let child = std::process::Command::new(bss_binary())
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("BSS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("BSS_JWT_SECRET", SECRET)
        .env("BSS_DATA_DIR", data)
        .env("RUST_LOG", "warn")
        .env("BSS_WEBHOOK_ALLOW", "127.0.0.1/32")
        .env("BSS_WEBHOOK_ALLOW_HTTP", "true")
        .env("BSS_WEBHOOK_TIMEOUT_MS", "3000")
        .env("BSS_PLUGIN_MAX_DEADLINE_MS", "100")
        .env("BSS_WEBHOOK_POLL_MS", "50")
        .env("BSS_WEBHOOK_RETRY_SCHEDULE", "0,1,1,1,1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Replica(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_delivery_loses_nothing() {
    let rx = Receiver::start().await;
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    let data = TempDir::new("bss-webhook-crash");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let (base_a, base_b) = (
        format!("http://127.0.0.1:{port_a}"),
        format!("http://127.0.0.1:{port_b}"),
    );
    let mut a = replica(port_a, &database_url, &data.0);
    wait_ready(&client, &base_a).await;
    let tenant = format!("wh-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let admin = token(&tenant, &["admin"]);
    let post = |base: &str, path: &str, bearer: &str, doc: Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(bearer)
            .json(&doc)
            .send()
    };
    let r = post(
        &base_a,
        "/v1/tenants",
        &platform_token(),
        json!({"id": tenant}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let r = client
        .put(format!("{base_a}/v1/schemas/invoices"))
        .bearer_auth(&admin)
        .json(&json!({"schema": invoice_schema()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let spec = json!({"url": rx.url("/slow/1500"), "events": ["business_store.data.created"]});
    let r = post(&base_a, "/v1/webhooks", &admin, spec).await.unwrap();
    assert_eq!(r.status(), 201);
    for n in 0..12 {
        let r = post(
            &base_a,
            "/v1/data/invoices",
            &admin,
            json!({"number": format!("K-{n}"), "total": n}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 201);
    }
    // Deliveries are in flight on A (each takes 1.5 s): kill it.
    rx.wait_for("/slow", 2, Duration::from_secs(20)).await;
    a.kill();
    let in_flight = rx.hits("/slow").len();
    let mut b = replica(port_b, &database_url, &data.0);
    wait_ready(&client, &base_b).await;

    // B takes over once A's leases end: every event arrives at least once.
    let mut db = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let expected: Vec<(uuid::Uuid,)> = sqlx::query_as(
        "SELECT event_id FROM bss.outbox WHERE type = 'business_store.data.created' ORDER BY seq",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(expected.len(), 12);
    let until = Instant::now() + Duration::from_secs(90);
    let received = loop {
        let ids: std::collections::HashSet<String> =
            rx.hits("/slow").iter().map(|h| h.id().to_owned()).collect();
        if ids.len() == 12 || Instant::now() > until {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (id,) in &expected {
        assert!(
            received.contains(&id.to_string()),
            "event {id} never delivered"
        );
    }
    // The deliveries all end succeeded: B sends A's again once their leases
    // end (the attempt budget, about 23 s here, and 10 s more) and records them.
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let (pending,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM bss.webhook_deliveries WHERE status <> 'succeeded'",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "{pending} deliveries not recorded as succeeded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hits = rx.hits("/slow").len();
    eprintln!(
        "{in_flight} requests had arrived when A was killed; {hits} requests for 12 events ({} duplicates)",
        hits - 12
    );
    // What A had in flight (each answer takes 1.5 s: none was recorded)
    // was sent again, with the same webhook-id.
    assert!(
        hits >= 12 + in_flight,
        "{hits} requests, {in_flight} in flight at the kill"
    );
    b.kill();
}

#[tokio::test]
async fn the_endpoint_cap_is_per_tenant() {
    let app = TestApp::spawn_with(|s| {
        open(s);
        s.webhook_max_per_tenant = 2;
    })
    .await;
    let rx = Receiver::start().await;
    let (_, full) = app.tenant().await;
    let (_, other) = app.tenant().await;
    let spec = json!({"url": rx.url("/ok"), "events": ["*"]});
    for _ in 0..2 {
        register(&app, &full, spec.clone()).await;
    }
    let resp = app.post("/v1/webhooks", &full, &spec).await;
    assert_eq!(resp.status(), 409);
    // Another tenant is not held to the first one's endpoints.
    register(&app, &other, spec).await;
}

#[tokio::test]
async fn a_requests_trace_continues_into_its_event_and_the_webhook_delivery() {
    let app = TestApp::spawn_with(open).await;
    let rx = Receiver::start().await;
    let (_, token) = app.tenant_with_invoices().await;
    register(
        &app,
        &token,
        json!({"url": rx.url("/traced"), "events": ["business_store.data.created"]}),
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = send(
        app.request(reqwest::Method::POST, "/v1/data/invoices", Some(&token))
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
            .json(&json!({"number": "T-1", "total": 1})),
    )
    .await;
    assert_eq!(resp.status(), 201);

    let log = wait_for_events(&app, &token, 2).await;
    let created = log
        .iter()
        .find(|e| e["type"] == "business_store.data.created")
        .unwrap();
    let traceparent = created["traceparent"].as_str().unwrap_or_default();
    assert!(
        traceparent.starts_with(&format!("00-{trace}-")) && traceparent.len() == 55,
        "{created:#}"
    );
    let hits = rx.wait_for("/traced", 1, Duration::from_secs(10)).await;
    assert_eq!(hits[0].header("traceparent"), traceparent);

    // A request without a trace starts none.
    create_invoice(&app, &token, 2).await;
    let log = wait_for_events(&app, &token, 3).await;
    assert!(log[2].get("traceparent").is_none(), "{:#}", log[2]);
}
