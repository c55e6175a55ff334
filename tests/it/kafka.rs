//! Against a real Kafka-protocol broker (tansu, started by `scripts/test`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bss_tests::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

fn kafka() -> String {
    std::env::var("BSS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn kafka_app(tweak: impl FnOnce(&mut bss::config::Settings)) -> TestApp {
    TestApp::spawn_with(|s| {
        s.kafka_brokers = Some(kafka());
        s.kafka_group = format!("bss-test-{}", uuid::Uuid::new_v4().simple());
        tweak(s);
    })
    .await
}

/// A message as read back from Kafka.
#[derive(Debug)]
struct Received {
    topic: String,
    key: String,
    headers: HashMap<String, String>,
    raw: String,
    /// The CloudEvent: the value of a structured-mode message, or, of a
    /// binary-mode one, its `ce_` headers as attributes and its value as
    /// `data`.
    value: Value,
}

/// The envelope a message carries, in either content mode.
fn envelope_of(headers: &HashMap<String, String>, raw: &[u8]) -> Value {
    let payload: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
    if !headers.keys().any(|k| k.starts_with("ce_")) {
        return payload;
    }
    let mut event: serde_json::Map<String, Value> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("ce_")?.to_owned(), json!(v))))
        .collect();
    if let Some(ct) = headers.get("content-type") {
        event.insert("datacontenttype".into(), json!(ct));
    }
    event.insert("data".into(), payload);
    Value::Object(event)
}

/// Reads `topics` from the start until `want` messages pass `keep`.
async fn read_back(
    topics: &[&str],
    want: usize,
    keep: impl Fn(&Received) -> bool,
) -> Vec<Received> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Topics appear when the relay first publishes to them.
    loop {
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .unwrap();
        let present: Vec<&str> = md.topics().iter().map(|t| t.name()).collect();
        if topics.iter().all(|t| present.contains(t)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "topics {topics:?} never appeared ({present:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.subscribe(topics).unwrap();
    let mut out = Vec::new();
    while out.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} messages arrived: {out:#?}", out.len()))
            .unwrap();
        let mut headers = HashMap::new();
        if let Some(h) = msg.headers() {
            for i in 0..h.count() {
                let header = h.get(i);
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let received = Received {
            topic: msg.topic().to_owned(),
            key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
            raw: String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned(),
            value: envelope_of(&headers, msg.payload().unwrap_or_default()),
            headers,
        };
        if keep(&received) {
            out.push(received);
        }
    }
    out
}

#[tokio::test]
async fn every_event_type_reaches_kafka_with_key_headers_and_per_record_order() {
    let app = kafka_app(|_| {}).await;
    let (tenant, token) = app.tenant_with_invoices().await;
    app.put(
        "/v1/data/invoices/k-1",
        &token,
        &json!({"number": "1", "total": 1}),
    )
    .await;
    for total in 2..=6 {
        app.put(
            "/v1/data/invoices/k-1",
            &token,
            &json!({"number": "1", "total": total}),
        )
        .await;
    }
    app.delete("/v1/data/invoices/k-1", &token).await;

    let topics = [
        "business_store.schema.updated",
        "business_store.data.created",
        "business_store.data.updated",
        "business_store.data.deleted",
    ];
    let got = read_back(&topics, 8, |m| {
        m.headers.get("ce_tenantid") == Some(&tenant)
    })
    .await;
    let schema = got.iter().find(|m| m.topic == topics[0]).unwrap();
    assert_eq!(schema.key, format!("{tenant}/invoices"));
    assert_eq!(schema.value["data"]["version"], 1);

    let record: Vec<&Received> = got.iter().filter(|m| m.topic != topics[0]).collect();
    assert_eq!(record.len(), 7);
    for m in &record {
        assert_eq!(m.key, format!("{tenant}/invoices/k-1"));
        assert_eq!(m.headers["ce_type"], m.topic);
        assert_eq!(m.headers["ce_id"], m.value["id"].as_str().unwrap());
        assert_eq!(m.value["type"], m.topic.as_str());
        assert_eq!(m.value["specversion"], "1.0");
    }
    // One key → one partition, so order holds across the three topics' records
    // when sorted by the relay's log order; per topic it is the arrival order.
    let updates: Vec<i64> = record
        .iter()
        .filter(|m| m.topic == "business_store.data.updated")
        .map(|m| m.value["data"]["version"].as_i64().unwrap())
        .collect();
    assert_eq!(
        updates,
        vec![2, 3, 4, 5, 6],
        "updates of one record arrive in order"
    );
    let deleted = record
        .iter()
        .find(|m| m.topic == "business_store.data.deleted")
        .unwrap();
    assert_eq!(deleted.value["data"]["version"], 6);
}

#[tokio::test]
async fn per_resource_topics_are_an_option() {
    let app = kafka_app(|s| s.kafka_topic_per_resource = true).await;
    let (tenant, token) = app.tenant().await;
    app.put(
        "/v1/schemas/orders",
        &token,
        &json!({"schema": {"type": "object"}}),
    )
    .await;
    app.post("/v1/data/orders", &token, &json!({"n": 1})).await;
    let got = read_back(&["business_store.data.orders.created"], 1, |m| {
        m.headers.get("ce_tenantid") == Some(&tenant)
    })
    .await;
    assert_eq!(got[0].value["type"], "business_store.data.created");
}

async fn produce(topic: &str, key: &str, payload: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

async fn tenant_status(app: &TestApp, id: &str) -> Option<String> {
    let resp = app
        .get(&format!("/v1/tenants/{id}"), &platform_token())
        .await;
    if resp.status() == 404 {
        return None;
    }
    body(resp).await["status"].as_str().map(str::to_owned)
}

async fn wait_status(app: &TestApp, id: &str, want: Option<&str>) {
    for _ in 0..150 {
        if tenant_status(app, id).await.as_deref() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("tenant {id} never reached {want:?}");
}

#[tokio::test]
async fn auth_tenant_events_provision_and_archive_and_malformed_ones_are_dead_lettered() {
    let app = kafka_app(|_| {}).await;
    // The consumer creates the topics it reads; wait for them before producing.
    read_topics_exist(&[
        "auth.tenant.created",
        "auth.tenant.deleted",
        "business_store.dead_letter",
    ])
    .await;
    let id = format!("k-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let bad = format!("not json {id}");
    produce("auth.tenant.created", &id, &bad).await;
    produce(
        "auth.tenant.created",
        &id,
        &json!({"tenantId": id, "name": "From Auth"}).to_string(),
    )
    .await;
    produce(
        "auth.tenant.created",
        &id,
        &json!({"tenantId": id}).to_string(),
    )
    .await;
    wait_status(&app, &id, Some("active")).await;
    let got = body(
        app.get(&format!("/v1/tenants/{id}"), &platform_token())
            .await,
    )
    .await;
    assert_eq!(got["name"], "From Auth", "the duplicate changed nothing");

    produce(
        "auth.tenant.deleted",
        &id,
        &json!({"data": {"tenantId": id}}).to_string(),
    )
    .await;
    wait_status(&app, &id, Some("archived")).await;

    let dead = read_back(&["business_store.dead_letter"], 1, |m| {
        m.headers.get("dlq_topic").map(String::as_str) == Some("auth.tenant.created")
            && m.key.starts_with("auth.tenant.created/")
            && m.raw == bad
    })
    .await;
    assert!(dead[0].headers["dlq_reason"].contains("not JSON"));
}

async fn read_topics_exist(topics: &[&str]) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", "probe")
        .create()
        .unwrap();
    for _ in 0..100 {
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(5))
            .unwrap();
        let present: Vec<&str> = md.topics().iter().map(|t| t.name()).collect();
        if topics.iter().all(|t| present.contains(t)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("topics {topics:?} were not created");
}

#[tokio::test]
async fn writes_keep_committing_while_kafka_is_down_and_events_follow_when_it_returns() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let app = TestApp::spawn_with(|s| {
        s.kafka_brokers = Some(addr.clone());
        s.kafka_group = format!("bss-test-{}", uuid::Uuid::new_v4().simple());
    })
    .await;
    let (tenant, token) = app.tenant_with_invoices().await;
    for n in 0..5 {
        let resp = app
            .post(
                "/v1/data/invoices",
                &token,
                &json!({"number": "down", "total": n}),
            )
            .await;
        assert_eq!(resp.status(), 201, "writes do not wait for the broker");
    }
    // The log (replay, SSE) has them; the broker does not.
    wait_for_events(&app, &token, 6).await;
    let mut db = app.db().await;
    assert_eq!(unpublished(&mut db, &tenant).await, 6);

    // Now the broker comes up on that address.
    let mut broker = std::process::Command::new("tansu")
        .args(["broker", "--storage-engine", "memory://tansu/"])
        .args([
            "--listener-url",
            &format!("tcp://{addr}"),
            "--advertised-listener-url",
            &format!("tcp://{addr}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tansu is installed (scripts/test installs it)");
    let mut published = false;
    for _ in 0..300 {
        if unpublished(&mut db, &tenant).await == 0 {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = broker.kill();
    let _ = broker.wait();
    assert!(
        published,
        "the backlog was published once the broker answered"
    );
}

/// The tenant's events not yet acknowledged by the broker.
async fn unpublished(db: &mut sqlx::PgConnection, tenant: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM bss.outbox WHERE tenant_id = $1
            AND (seq IS NULL OR seq > (SELECT published_seq FROM bss.relay_state))",
    )
    .bind(tenant)
    .fetch_one(db)
    .await
    .unwrap();
    n
}

#[tokio::test]
async fn events_reach_kafka_as_the_tenants_enricher_made_them() {
    // No TASK_SERVICE_URL: the built-in Task Execution stand-in answers.
    let app = kafka_app(|_| {}).await;
    let (tenant, token) = app.tenant_with_invoices().await;
    app.install_plugin(
        &token,
        json!({"name": "task-scheduler", "kind": "event-enricher", "resources": ["invoices"],
               "services": ["task"], "config": {"task": "send-reminder"}}),
        "task_scheduler",
    )
    .await;
    let created = body(
        app.post(
            "/v1/data/invoices",
            &token,
            &json!({"number": "1", "total": 1}),
        )
        .await,
    )
    .await;
    let subject = format!("invoices/{}", created["id"].as_str().unwrap());
    let got = read_back(&["business_store.data.created"], 1, |m| {
        m.headers.get("ce_tenantid") == Some(&tenant) && m.value["subject"] == subject.as_str()
    })
    .await;
    let event = &got[0].value;
    assert!(
        event["scheduledtask"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{event:#}"
    );
    assert_eq!(event["data"]["task"]["name"], "send-reminder");
    assert_eq!(got[0].key, format!("{tenant}/{subject}"));
}

#[tokio::test]
async fn a_message_the_database_cannot_store_is_dead_lettered_and_the_next_one_applied() {
    let app = kafka_app(|_| {}).await;
    read_topics_exist(&["auth.tenant.created", "business_store.dead_letter"]).await;
    let id = format!("n-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let poisoned = json!({"tenantId": id, "name": "Nul\u{0}Corp"}).to_string();
    produce("auth.tenant.created", &id, &poisoned).await;
    produce(
        "auth.tenant.created",
        &id,
        &json!({"tenantId": id, "name": "Clean Corp"}).to_string(),
    )
    .await;
    // Not stuck behind the poisoned message: the next one is applied.
    wait_status(&app, &id, Some("active")).await;
    let dead = read_back(&["business_store.dead_letter"], 1, |m| m.raw == poisoned).await;
    assert!(dead[0].headers["dlq_reason"].contains("U+0000"), "{dead:?}");
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("consumer_messages_total"), "counted");
}

/// What the official CloudEvents Python SDK's `from_kafka_event` makes of
/// each message: `{"attributes", "data"}` or `{"error"}`.
fn read_with_sdk(messages: &[&Received]) -> Vec<Value> {
    let input: Vec<Value> = messages
        .iter()
        .map(|m| json!({"headers": m.headers, "key": m.key, "value": m.raw}))
        .collect();
    let read = python_tool("read_cloudevents.py", &Value::Array(input));
    read.as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_cloudevents_sdk_reads_every_message_and_the_record_topic_keeps_a_records_history() {
    let record_topic = format!("bss-test-records-{}", uuid::Uuid::new_v4().simple());
    let topic = record_topic.clone();
    let app = kafka_app(move |s| s.kafka_record_topic = Some(topic)).await;
    let (tenant, token) = app.tenant_with_invoices().await;
    let path = "/v1/data/invoices/ce-1";
    app.put(path, &token, &json!({"number": "1", "total": 1}))
        .await;
    for total in 2..=3 {
        app.put(path, &token, &json!({"number": "1", "total": total}))
            .await;
    }
    app.delete(path, &token).await;

    let mine = |m: &Received| m.headers.get("ce_tenantid") == Some(&tenant);
    let history = read_back(&[record_topic.as_str()], 4, mine).await;
    let types: Vec<&str> = history
        .iter()
        .map(|m| m.headers["ce_type"].as_str())
        .collect();
    assert_eq!(
        types,
        [
            "business_store.data.created",
            "business_store.data.updated",
            "business_store.data.updated",
            "business_store.data.deleted"
        ],
        "one topic, one key: the record's whole history in order"
    );
    let by_type = read_back(
        &[
            "business_store.data.created",
            "business_store.data.updated",
            "business_store.data.deleted",
        ],
        4,
        mine,
    )
    .await;

    // Binary content mode: attributes in headers, data alone as the value.
    let log = event_log(&app, &token).await;
    let all: Vec<&Received> = history.iter().chain(&by_type).collect();
    let read = read_with_sdk(&all);
    for (m, event) in all.iter().zip(&read) {
        assert!(event.get("error").is_none(), "{event:#} from {m:#?}");
        assert_eq!(m.headers["content-type"], "application/json");
        let id = &event["attributes"]["id"];
        let logged = log
            .iter()
            .find(|e| &e["id"] == id)
            .unwrap_or_else(|| panic!("{id} is not in the log"));
        for attribute in ["type", "source", "subject", "tenantid", "specversion"] {
            assert_eq!(
                event["attributes"][attribute], logged[attribute],
                "{attribute}"
            );
        }
        assert_eq!(event["attributes"]["datacontenttype"], "application/json");
        assert_eq!(event["data"], logged["data"]);
        assert_eq!(m.value, *logged, "the message carries the logged event");
    }
}

#[tokio::test]
async fn structured_content_mode_is_a_setting() {
    let app = kafka_app(|s| s.kafka_structured = true).await;
    let (tenant, token) = app.tenant_with_invoices().await;
    app.put(
        "/v1/data/invoices/st-1",
        &token,
        &json!({"number": "1", "total": 1}),
    )
    .await;
    let got = read_back(&["business_store.data.created"], 1, |m| {
        m.value["tenantid"] == tenant.as_str()
    })
    .await;
    let m = &got[0];
    assert_eq!(m.headers["content-type"], "application/cloudevents+json");
    assert!(
        !m.headers.keys().any(|k| k.starts_with("ce_")),
        "{:?}",
        m.headers
    );
    let read = read_with_sdk(&[m]);
    assert_eq!(read[0]["attributes"]["id"], m.value["id"], "{read:#?}");
    assert_eq!(read[0]["data"], m.value["data"]);
}
