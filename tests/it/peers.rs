//! Peer services under attack, with a second tenant watching: one tenant's
//! failing calls pause only its own (breakers per tenant) and readiness does
//! not name them, plugins reach only the paths a service serves them, a
//! peer's huge or refusing answers are neither read whole nor shown to
//! tenants, and a slow peer costs a request one budget, retries and the
//! local fallback included.

use std::time::{Duration, Instant};

use bss_tests::fake_services::{Behaviour, Fake, PEER_SECRET, validation_service};
use bss_tests::*;
use serde_json::{Value, json};

/// Installs the default validation-forwarder hook (with `config`) for a new
/// tenant with invoices; returns the tenant and its token.
async fn forwarding_tenant(app: &TestApp, config: Value) -> (String, String) {
    let (tenant, token) = app.tenant_with_invoices().await;
    let manifest = json!({"name": "validation-forwarder", "kind": "validation-hook",
                          "resources": ["invoices"], "services": ["validation"],
                          "config": config});
    app.install_plugin(&token, manifest, "validation_forwarder")
        .await;
    (tenant, token)
}

/// Writes an invoice: the status and the problem's text (empty on success).
async fn write(app: &TestApp, token: &str, total: u32) -> (u16, String) {
    let resp = app
        .post(
            "/v1/data/invoices",
            token,
            &json!({"number": "A", "total": total}),
        )
        .await;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, if status == 201 { String::new() } else { text })
}

/// The second tenant's normal work still goes through the service: a record
/// is checked (the credit limit applies) and a schema change is validated.
async fn the_watcher_is_served(app: &TestApp, token: &str, fake: &Fake) {
    assert_eq!(write(app, token, 100).await.0, 201);
    let (status, problem) = write(app, token, 101).await;
    assert_eq!(status, 422);
    assert!(
        problem.contains("over the customer's credit limit"),
        "{problem}"
    );
    let schema_checks = fake.calls();
    let resp = app.put_schema("orders", token, invoice_schema()).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(fake.calls(), schema_checks + 1, "checked by the service");
}

fn service_settings(fake: &Fake) -> impl FnOnce(&mut bss::config::Settings) {
    let url = fake.url.clone();
    move |s| {
        s.validation_service_url = Some(url);
        s.service_attempts = 1;
        s.breaker_failure_threshold = 2;
    }
}

#[tokio::test]
async fn one_tenants_failing_forwards_open_only_its_own_breaker() {
    let fake = validation_service(Behaviour::Valid).await;
    let app = TestApp::spawn_with(service_settings(&fake)).await;
    let (attacker, a) = forwarding_tenant(&app, json!({})).await;
    let (_, b) = forwarding_tenant(&app, json!({})).await;
    fake.records_of(&attacker, Behaviour::Failing);

    for _ in 0..2 {
        let (status, problem) = write(&app, &a, 1).await;
        assert_eq!(status, 422);
        assert!(problem.contains("unavailable"), "{problem}");
    }
    let reached = fake.requests();
    let (status, problem) = write(&app, &a, 1).await;
    assert_eq!(status, 422);
    assert!(problem.contains("paused"), "{problem}");
    assert_eq!(
        fake.requests(),
        reached,
        "the open breaker spares the service"
    );

    the_watcher_is_served(&app, &b, &fake).await;
    assert!(
        write(&app, &a, 1).await.1.contains("paused"),
        "still paused"
    );
    assert_eq!(
        ready(&app).await["validationService"],
        "closed",
        "one tenant's trouble is not the service's"
    );
}

/// The `checks` of `/health/ready`, which anyone may read.
async fn ready(app: &TestApp) -> Value {
    let resp = send(app.request(reqwest::Method::GET, "/health/ready", None)).await;
    body(resp).await["checks"].clone()
}

/// A peer whose listen queue is full, so new connections are never answered
/// (their SYNs are dropped), like a host behind a black-holing firewall. Keep
/// the listener and the queued connection alive while it is used.
async fn unanswered_service() -> (String, tokio::net::TcpListener, tokio::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let queued = tokio::net::TcpStream::connect(addr).await.unwrap();
    (format!("http://{addr}"), listener, queued)
}

#[tokio::test]
async fn a_peer_that_never_answers_a_connection_is_unreachable_for_everyone() {
    let (url, _listener, _queued) = unanswered_service().await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(url);
        s.service_timeout_ms = 2000;
        s.service_attempts = 3;
        s.breaker_failure_threshold = 2;
    })
    .await;
    for _ in 0..2 {
        let (_, token) = app.tenant().await;
        let resp = app.put_schema("invoices", &token, invoice_schema()).await;
        assert_eq!(resp.status(), 503);
        let problem = resp.text().await.unwrap();
        assert!(problem.contains("could not be reached"), "{problem}");
    }
    assert_eq!(ready(&app).await["validationService"], "open");
    let (_, token) = app.tenant().await;
    let started = Instant::now();
    let resp = app.put_schema("invoices", &token, invoice_schema()).await;
    assert_eq!(resp.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "paused without waiting for the peer: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_forward_to_a_path_the_service_does_not_serve_is_refused_without_a_call() {
    let fake = validation_service(Behaviour::Valid).await;
    let app = TestApp::spawn_with(service_settings(&fake)).await;
    for path in ["/api/validation/validateSchema", "/admin/reset", "/"] {
        let (_, a) = forwarding_tenant(&app, json!({"path": path})).await;
        let (status, problem) = write(&app, &a, 1).await;
        assert_eq!(status, 422, "{path}");
        assert!(problem.contains("does not serve"), "{path}: {problem}");
        assert!(problem.contains("validateRecord"), "names what it serves");
    }
    assert_eq!(
        fake.requests(),
        fake.calls(),
        "nothing but the tenants' schema checks reached the service"
    );
    let (_, b) = forwarding_tenant(&app, json!({})).await;
    the_watcher_is_served(&app, &b, &fake).await;
}

#[tokio::test]
async fn a_huge_answer_is_not_read_whole_nor_shown() {
    let fake = validation_service(Behaviour::Huge).await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(fake.url.clone());
        s.service_timeout_ms = 2000;
    })
    .await;
    let (_, token) = app.tenant().await;
    let started = Instant::now();
    let resp = app.put_schema("invoices", &token, invoice_schema()).await;
    assert_eq!(resp.status(), 503);
    let problem = resp.text().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!problem.contains(PEER_SECRET), "{problem}");
    assert!(problem.contains("exceeded"), "{problem}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        fake.sent() < 64 << 20,
        "the host stopped reading: {} of 400 MiB produced",
        fake.sent() >> 20
    );
}

#[tokio::test]
async fn a_huge_record_verdict_is_refused_and_other_tenants_are_served() {
    let fake = validation_service(Behaviour::Valid).await;
    let app = TestApp::spawn_with(service_settings(&fake)).await;
    let (attacker, a) = forwarding_tenant(&app, json!({})).await;
    let (_, b) = forwarding_tenant(&app, json!({})).await;
    fake.records_of(&attacker, Behaviour::Huge);
    let (status, problem) = write(&app, &a, 1).await;
    assert_eq!(status, 422);
    assert!(!problem.contains(PEER_SECRET), "{problem}");
    assert!(problem.contains("exceeded"), "{problem}");
    the_watcher_is_served(&app, &b, &fake).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(fake.sent() < 64 << 20, "{} MiB produced", fake.sent() >> 20);
}

#[tokio::test]
async fn a_peers_refusal_body_is_never_echoed() {
    let fake = validation_service(Behaviour::Refusing).await;
    let app = TestApp::spawn_with(service_settings(&fake)).await;
    let (_, token) = app.tenant().await;
    let resp = app.put_schema("invoices", &token, invoice_schema()).await;
    assert!(resp.status().is_server_error(), "{}", resp.status());
    let problem = resp.text().await.unwrap();
    assert!(!problem.contains(PEER_SECRET), "{problem}");
    assert!(problem.contains("HTTP 400"), "{problem}");

    let records = validation_service(Behaviour::Valid).await;
    let app = TestApp::spawn_with(service_settings(&records)).await;
    let (attacker, a) = forwarding_tenant(&app, json!({})).await;
    let (_, b) = forwarding_tenant(&app, json!({})).await;
    records.records_of(&attacker, Behaviour::Refusing);
    for _ in 0..3 {
        let (status, problem) = write(&app, &a, 1).await;
        assert_eq!(status, 422);
        assert!(!problem.contains(PEER_SECRET), "{problem}");
        assert!(
            problem.contains("refused the request (HTTP 400)"),
            "{problem}"
        );
    }
    the_watcher_is_served(&app, &b, &records).await;
}

/// `PUT /v1/schemas/invoices` against a Validation Service that sleeps 10 s,
/// with the default budget (2 s) and attempts (3): its status and time.
async fn slow_schema_change(fallback: bool) -> (u16, Duration) {
    let slow = validation_service(Behaviour::Slow(Duration::from_secs(10))).await;
    let app = TestApp::spawn_with(|s| {
        s.validation_service_url = Some(slow.url.clone());
        s.service_timeout_ms = 2000;
        s.service_attempts = 3;
        s.validation_fallback = fallback;
    })
    .await;
    let (_, token) = app.tenant().await;
    let (_, watcher) = app.tenant().await;
    let started = Instant::now();
    let change = app.put_schema("invoices", &token, invoice_schema());
    let read = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        let resp = app.get("/v1/schemas", &watcher).await;
        (resp.status().as_u16(), t.elapsed())
    };
    let (resp, (read_status, read_time)) = tokio::join!(change, read);
    let elapsed = started.elapsed();
    assert_eq!(read_status, 200);
    assert!(
        read_time < Duration::from_secs(1),
        "the watcher's read took {read_time:?}"
    );
    (resp.status().as_u16(), elapsed)
}

#[tokio::test]
async fn a_slow_validation_service_costs_one_budget_with_or_without_the_fallback() {
    // One budget is 2 s; three attempts of it would be over 6 s. The margin
    // is for a machine busy with the rest of the suite.
    let one_budget = Duration::from_millis(4000);
    let (status, elapsed) = slow_schema_change(false).await;
    assert_eq!(status, 503);
    assert!(elapsed < one_budget, "took {elapsed:?}");
    let (status, elapsed) = slow_schema_change(true).await;
    assert_eq!(status, 201, "the local check decided");
    assert!(elapsed < one_budget, "took {elapsed:?}");
}
