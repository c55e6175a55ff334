//! The real binary, killed with SIGKILL again and again while a client
//! writes: every acknowledged write keeps exactly one event in the log and
//! reaches Kafka at least once; no event exists for a write that did not
//! commit.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bss_tests::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};
use sqlx::Connection;

fn start(port: u16, database_url: &str, kafka: &str, data: &std::path::Path) -> Child {
    Command::new(bss_tests::bss_binary())
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", kafka)
        .env("BSS_KAFKA_GROUP", format!("crash-{port}"))
        .env("BSS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("BSS_JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .env("BSS_DATA_DIR", data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_with_exactly_one_event_each() {
    let kafka = std::env::var("BSS_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let (settings, _scratch) = test_settings();
    let database_url = settings.database_url.unwrap();
    let data = bss_tests::TempDir::new("bss-crash");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let mut child = start(port, &database_url, &kafka, &data.0);
    wait_ready(&client, &base).await;
    let tenant = format!("crash-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let admin = platform_token();
    let token = token(&tenant, &["admin"]);
    let r = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(&admin)
        .json(&json!({"id": tenant}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = client
        .put(format!("{base}/v1/schemas/invoices"))
        .bearer_auth(&token)
        .json(&json!({"schema": invoice_schema()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // Writers run while the service is killed and restarted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (client, base, token, stop) =
                (client.clone(), base.clone(), token.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut failed) = (Vec::new(), 0u64);
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let doc = json!({"number": format!("w{w}-{n}"), "total": n});
                    match client
                        .post(format!("{base}/v1/data/invoices"))
                        .bearer_auth(&token)
                        .json(&doc)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 201 => {
                            let b: Value = r.json().await.unwrap_or(Value::Null);
                            if let Some(id) = b["id"].as_str() {
                                acked.push(id.to_owned());
                            }
                        }
                        _ => {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (acked, failed)
            })
        })
        .collect();

    let kills = 5;
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        child = start(port, &database_url, &kafka, &data.0);
        wait_ready(&client, &base).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = 0;
    for w in writers {
        let (a, f) = w.await.unwrap();
        acked.extend(a);
        failed += f;
    }

    // Let the relay drain, then compare the data, the log and Kafka.
    let mut db = sqlx::PgConnection::connect(&database_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (left,): (i64,) = sqlx::query_as(bss::events::outbox::BACKLOG_SQL)
            .fetch_one(&mut db)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} events never published");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let stored: HashSet<String> = sqlx::query_scalar(&format!(
        "SELECT id FROM \"t_{}\".invoices",
        tenant.replace('-', "_")
    ))
    .fetch_all(&mut db)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let logged: Vec<String> = sqlx::query_scalar(
        "SELECT envelope->'data'->>'recordId' FROM bss.outbox
          WHERE tenant_id = $1 AND type = 'business_store.data.created'",
    )
    .bind(&tenant)
    .fetch_all(&mut db)
    .await
    .unwrap();
    let logged_set: HashSet<String> = logged.iter().cloned().collect();
    assert_eq!(
        logged.len(),
        logged_set.len(),
        "exactly one event per write"
    );
    assert_eq!(
        logged_set, stored,
        "an event for every committed write, none for any other"
    );
    for id in &acked {
        assert!(stored.contains(id), "acknowledged write {id} was lost");
    }

    // Kafka: every committed write at least once.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka)
        .set("group.id", format!("crash-reader-{port}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer
        .subscribe(&["business_store.data.created"])
        .unwrap();
    let mut on_kafka: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while on_kafka.len() < stored.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {} writes on Kafka",
                    on_kafka.len(),
                    stored.len()
                )
            })
            .unwrap();
        let mine = msg
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == "ce_tenantid")
                    .and_then(|h| h.value)
                    .map(|v| v == tenant.as_bytes())
            })
            .unwrap_or(false);
        if !mine {
            continue;
        }
        // Binary content mode: the value is the event's data.
        let v: Value = serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap();
        *on_kafka
            .entry(v["recordId"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let duplicates: usize = on_kafka.values().map(|n| n - 1).sum();
    eprintln!(
        "crash test: {} acknowledged writes, {} committed, {failed} failed or cut off, {kills} SIGKILLs, \
         {} events in the log, {} distinct on Kafka, {duplicates} Kafka duplicates",
        acked.len(),
        stored.len(),
        logged.len(),
        on_kafka.len()
    );
    assert!(acked.len() > 50, "the writers made progress");
    for id in &stored {
        assert!(on_kafka.contains_key(id), "write {id} never reached Kafka");
    }
}
