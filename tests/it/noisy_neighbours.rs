//! Noisy neighbours: one tenant's schema or plugin must not slow, stall or
//! starve another tenant doing normal work.

use std::time::{Duration, Instant};

use bss_tests::{SseReader, TestApp, body, event_log};
use serde_json::{Value, json};

/// The schema of the regex attack: a backreference pattern on every item
/// of an array of strings (16–25 s per write on a backtracking engine).
fn evil_schema() -> Value {
    json!({"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^(\\w+\\s?)*\\1$"}}
    }})
}

#[tokio::test]
async fn a_backtracking_pattern_is_refused_and_names_where_it_is() {
    let app = TestApp::spawn().await;
    let (_, token) = app.tenant().await;
    let started = Instant::now();
    let resp = app.put_schema("posts", &token, evil_schema()).await;
    assert_eq!(resp.status(), 422);
    let problem = body(resp).await;
    assert_eq!(
        problem["errors"][0]["path"],
        "/schema/properties/tags/items/pattern"
    );
    let message = problem["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("linear-time"), "{problem}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_heavy_pattern_write_is_fast_and_a_second_tenant_reads_meanwhile() {
    let app = TestApp::spawn().await;
    let (_, attacker) = app.tenant().await;
    // The same shape without the backreference is accepted: it runs on the
    // linear-time engine, whatever the input.
    let schema = json!({"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^(\\w+\\s?)*!$"}}
    }});
    assert_eq!(
        app.put_schema("posts", &attacker, schema).await.status(),
        201
    );
    let (_, victim) = app.tenant_with_invoices().await;
    let created = app
        .post(
            "/v1/data/invoices",
            &victim,
            &json!({"number": "V-1", "total": 1}),
        )
        .await;
    let id = body(created).await["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let evil = "a ".repeat(30) + "a";
    let doc = json!({"tags": vec![evil; 400]});
    let writes: Vec<_> = (0..4)
        .map(|_| {
            let (app, attacker, doc) = (&app, attacker.clone(), doc.clone());
            async move {
                let started = Instant::now();
                let status = app.post("/v1/data/posts", &attacker, &doc).await.status();
                (status, started.elapsed())
            }
        })
        .collect();
    let reads = async {
        let mut slowest = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            let resp = app.get(&format!("/v1/data/invoices/{id}"), &victim).await;
            assert_eq!(resp.status(), 200);
            slowest = slowest.max(started.elapsed());
        }
        slowest
    };
    let (writes, slowest_read) = tokio::join!(futures::future::join_all(writes), reads);
    for (status, took) in writes {
        assert_eq!(status, 422, "the pattern does not match");
        assert!(took < Duration::from_secs(1), "a write took {took:?}");
    }
    assert!(
        slowest_read < Duration::from_secs(1),
        "a read took {slowest_read:?}"
    );
}

#[tokio::test]
async fn a_slow_enricher_holds_up_only_its_own_tenants_events() {
    let app = TestApp::spawn().await;
    let (_, slow) = app.tenant_with_invoices().await;
    let manifest = json!({"name": "slow", "kind": "event-enricher", "resources": ["*"],
                          "config": {"sleepMs": 900}, "limits": {"deadlineMs": 1000}});
    app.install_plugin(&slow, manifest, "slow_enricher").await;
    let (_, quiet) = app.tenant_with_invoices().await;
    let mut stream = SseReader::open(&app, &quiet, None).await;
    // A queue of slow events first: 20 × 900 ms of enrichment.
    for i in 0..20 {
        let doc = json!({"number": format!("S-{i}"), "total": i});
        assert_eq!(
            app.post("/v1/data/invoices", &slow, &doc).await.status(),
            201
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let started = Instant::now();
        let doc = json!({"number": format!("Q-{i}"), "total": i});
        let created = body(app.post("/v1/data/invoices", &quiet, &doc).await).await;
        loop {
            let event = stream
                .next_within(Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("no event for the quiet tenant"));
            if event.data["data"]["recordId"] == created["id"] {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the quiet tenant's event took {:?}",
            started.elapsed()
        );
        let log = event_log(&app, &quiet).await;
        assert!(log.iter().any(|e| e["data"]["recordId"] == created["id"]));
    }
    // The slow tenant's own events wait for its enricher (20 × 900 ms),
    // and are enriched meanwhile.
    let log = event_log(&app, &slow).await;
    let created = log
        .iter()
        .filter(|e| e["type"] == "business_store.data.created")
        .count();
    assert!(
        created < 20,
        "the enricher was not slow: {created} events enriched"
    );
    assert!(
        log.iter()
            .all(|e| e["type"] == "business_store.schema.updated" || e["slow"] == true),
        "{log:#?}"
    );
}

#[tokio::test]
async fn a_tenant_cannot_hold_more_event_streams_than_its_share() {
    let app = TestApp::spawn_with(|s| s.sse_max_streams_per_tenant = 5).await;
    let (_, greedy) = app.tenant().await;
    let (_, other) = app.tenant().await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(SseReader::open(&app, &greedy, None).await);
    }
    let refused = app.get("/v1/events/stream", &greedy).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    // Another tenant is not affected, and a closed stream frees its place.
    let _theirs = SseReader::open(&app, &other, None).await;
    held.pop();
    let mut reopened = false;
    for _ in 0..50 {
        let resp = app
            .request(reqwest::Method::GET, "/v1/events/stream", Some(&greedy))
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            reopened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reopened, "the closed stream's place was not freed");
}

/// A burst of one tenant's creates does not queue ahead of another
/// tenant's create: the writers of coalesced creates take the waiting
/// tenants' creates in turns, so tenant B's create goes in the next
/// transaction, not after the hundreds tenant A queued first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creates_does_not_queue_ahead_of_another_tenants_create() {
    use sqlx::Executor;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const BURST: usize = 600;
    // One writer: its first batch of tenant A's creates holds it.
    let app = Arc::new(TestApp::spawn_with(|s| s.write_workers = 1).await);
    let (a_id, a) = app.tenant_with_invoices().await;
    let (_, b) = app.tenant_with_invoices().await;
    // Tenant A's table locked: its first creates hold the writer, the rest
    // of its burst queues behind them.
    let tenant = bss::domain::TenantId::parse(&a_id).unwrap();
    let table = bss::domain::ResourceName::parse("invoices")
        .unwrap()
        .table_in(&tenant);
    let mut lock = app.db().await;
    lock.execute("BEGIN").await.unwrap();
    lock.execute(format!("LOCK TABLE {table} IN EXCLUSIVE MODE").as_str())
        .await
        .unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let create = |token: String, n: usize| {
        let (app, answered) = (app.clone(), answered.clone());
        tokio::spawn(async move {
            let doc = json!({"number": format!("N-{n}"), "total": n});
            let resp = app.post("/v1/data/invoices", &token, &doc).await;
            (answered.fetch_add(1, Ordering::SeqCst), resp.status())
        })
    };
    let burst: Vec<_> = (0..BURST).map(|n| create(a.clone(), n)).collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let quiet = create(b.clone(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !quiet.is_finished(),
        "the writers are held by tenant A's table"
    );
    lock.execute("COMMIT").await.unwrap();
    let (position, status) = quiet.await.unwrap();
    assert_eq!(status, 201);
    for h in burst {
        assert_eq!(h.await.unwrap().1, 201);
    }
    // In arrival order it would be answered last; in turns, it is written
    // by the second transaction (answers arrive a little out of commit
    // order on a busy machine: up to about two transactions' worth).
    assert!(
        position < BURST * 3 / 4,
        "tenant B's create was answered {position}th of {}",
        BURST + 1
    );
}
