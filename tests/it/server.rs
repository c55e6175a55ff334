//! The HTTP server under attack: slowloris (headers and bodies sent a byte
//! at a time, or never finished), idle connections, more connections than
//! the cap; and the operations listener.

use std::time::{Duration, Instant};

use bss::startup::Application;
use bss_tests::{TestApp, body, platform_token, test_settings};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Reads what the server sends until it closes the connection, or
/// `wait` passes (None then).
async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(wait, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// A connection that sends the start of a request head, then a byte every
/// 300 ms, never ending it.
async fn dribble_headers(addr: String) -> TcpStream {
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (mut read, mut write) = s.into_split();
    let dribble = tokio::spawn(async move {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if write.write_all(b"X").await.is_err() {
                break;
            }
        }
        write
    });
    let mut probe = [0u8; 1];
    // Wait until the server closes the connection (or the test's bound).
    let _ = tokio::time::timeout(Duration::from_secs(20), read.read(&mut probe)).await;
    let write = dribble.await.unwrap();
    read.reunite(write).unwrap()
}

/// A write whose body is announced as 1,000 bytes; 10 are sent.
async fn half_sent_body(addr: &str, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/data/invoices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"number\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn a_real_client_is_served_normally_during_a_slowloris() {
    let app = TestApp::spawn_with(|s| {
        s.http_header_timeout_ms = 1500;
        s.http_body_timeout_ms = 1500;
    })
    .await;
    let (_, token) = app.tenant_with_invoices().await;
    let started = Instant::now();
    let dribblers: Vec<_> = (0..100)
        .map(|_| tokio::spawn(dribble_headers(addr(&app))))
        .collect();
    let mut half_sent = Vec::new();
    for _ in 0..100 {
        half_sent.push(half_sent_body(&addr(&app), &token).await);
    }

    // Meanwhile a real client reads and writes as usual, promptly.
    for i in 0..20 {
        let t = Instant::now();
        let resp = app
            .post(
                "/v1/data/invoices",
                &token,
                &json!({"number": format!("n-{i}"), "total": i}),
            )
            .await;
        assert_eq!(resp.status(), 201);
        let resp = app.get("/v1/data/invoices?limit=5", &token).await;
        assert_eq!(resp.status(), 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    // The half-sent bodies are answered 408 and closed after the body timeout.
    for mut s in half_sent {
        let answer = read_until_closed(&mut s, Duration::from_secs(10))
            .await
            .expect("the connection was closed");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request-timeout"), "{answer}");
    }
    // The never-ending heads are closed after the header timeout.
    for d in dribblers {
        let mut s = d.await.unwrap();
        let answer = read_until_closed(&mut s, Duration::from_secs(1)).await;
        assert!(answer.is_some(), "a dribbling connection was still open");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn connections_with_unfinished_headers_are_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(|s| s.http_header_timeout_ms = 500).await;
    let started = Instant::now();
    let mut open = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(addr(&app)).await.unwrap();
        s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Never: ")
            .await
            .unwrap();
        open.push(s);
    }
    // A connection that sends nothing at all is closed too.
    open.push(TcpStream::connect(addr(&app)).await.unwrap());
    for mut s in open {
        let closed = read_until_closed(&mut s, Duration::from_secs(5)).await;
        assert!(closed.is_some_and(|text| text.is_empty()));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = TestApp::spawn_with(|s| s.http_idle_timeout_secs = 1).await;
    let mut s = TcpStream::connect(addr(&app)).await.unwrap();
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Kept alive for another request within the idle time...
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // ...and closed once idle for longer.
    let started = Instant::now();
    let rest = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert_eq!(rest.as_deref(), Some(""));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn connections_over_the_cap_wait_and_are_served_once_others_leave() {
    let app = TestApp::spawn_with(|s| s.http_max_connections = 4).await;
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(TcpStream::connect(addr(&app)).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = app.client.clone();
    let url = format!("{}/health/live", app.base);
    let waiting = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "served beyond the cap");
    drop(holders);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once the others left")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn with_an_operations_listener_metrics_are_served_there_and_not_on_the_api() {
    let (mut settings, _scratch) = test_settings();
    settings.ops_addr = Some("127.0.0.1:0".parse().unwrap());
    let app = Application::build(settings).await.unwrap();
    let api = format!("http://127.0.0.1:{}", app.port());
    let ops = format!("http://127.0.0.1:{}", app.ops_port().unwrap());
    tokio::spawn(app.run_until(std::future::pending()));
    let client = reqwest::Client::new();
    let get = |url: String| {
        let client = client.clone();
        async move { client.get(url).send().await.unwrap() }
    };

    let id = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let resp = client
        .post(format!("{api}/v1/tenants"))
        .bearer_auth(platform_token())
        .json(&json!({ "id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let resp = client
        .get(format!("{api}/v1/tenants/{id}"))
        .bearer_auth(platform_token())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(get(format!("{api}/metrics")).await.status(), 404);
    let metrics = get(format!("{ops}/metrics")).await;
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    // Labels name route templates, never a tenant.
    assert!(text.contains("route=\"/v1/tenants/{id}\""), "{text}");
    assert!(!text.contains(&id), "a tenant id in the metrics: {text}");
    // Health answers on both; the API is not on the operations listener.
    assert_eq!(get(format!("{api}/health/live")).await.status(), 200);
    assert_eq!(get(format!("{ops}/health/ready")).await.status(), 200);
    assert_eq!(get(format!("{ops}/v1/tenants")).await.status(), 404);
    let doc = body(get(format!("{api}/openapi.json")).await).await;
    assert!(doc["paths"].get("/metrics").is_none());
    assert!(doc["paths"].get("/health/live").is_some());
}

#[tokio::test]
async fn while_draining_readiness_answers_503_and_new_connections_are_refused() {
    let (mut settings, _scratch) = test_settings();
    settings.ops_addr = Some("127.0.0.1:0".parse().unwrap());
    settings.shutdown_drain_secs = 30;
    let app = Application::build(settings).await.unwrap();
    let api = format!("127.0.0.1:{}", app.port());
    let ops = format!("http://127.0.0.1:{}", app.ops_port().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    // A request whose body never comes keeps the drain going.
    let mut stuck = TcpStream::connect(&api).await.unwrap();
    let head = format!(
        "POST /v1/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{{",
        platform_token()
    );
    stuck.write_all(head.as_bytes()).await.unwrap();
    let ready = reqwest::get(format!("{ops}/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);

    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = reqwest::get(format!("{ops}/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(body(ready).await["status"], "draining");
    assert!(TcpStream::connect(&api).await.is_err(), "still accepting");
    assert!(!running.is_finished());
    drop(stuck);
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("stopped once the last request left")
        .unwrap()
        .unwrap();
}
