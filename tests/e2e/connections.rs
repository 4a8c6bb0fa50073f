//! Connections are a bounded resource: silent, slow (slowloris) and idle connections are cut
//! after the header timeout, and at the connection cap established streams keep flowing, the
//! operations routes still answer, everything else gets a fast `503` — and it recovers at once.

use std::time::Duration;

use changegate_e2e::{Gateway, PATIENCE, rss_bytes};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

async fn connect(gw: &Gateway) -> TcpStream {
    TcpStream::connect(gw.base.trim_start_matches("http://")).await.unwrap()
}

/// Reads until the server closes the connection; returns everything read and when it closed.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match timeout(within.saturating_sub(started.elapsed()), stream.read(&mut buffer)).await {
            Err(_) => panic!("still open after {within:?}; read {:?}", String::from_utf8_lossy(&read)),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&read).into_owned(), started.elapsed()),
            Ok(Ok(n)) => read.extend_from_slice(&buffer[..n]),
        }
    }
}

#[tokio::test]
async fn silent_slow_and_idle_connections_are_closed_after_the_header_timeout() {
    let gw = Gateway::start(&["--header-timeout", "1s", "--heartbeat", "300ms"]).await;

    let mut silent = connect(&gw).await;
    let (_, after) = until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(after >= Duration::from_millis(900), "not before the timeout: {after:?}");

    // Slowloris: a request head that never ends, one byte at a time.
    let mut slow = connect(&gw).await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let dribble = async {
        for _ in 0..50 {
            if slow.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let started = Instant::now();
    dribble.await;
    let (_, rest) = until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(started.elapsed() + rest < Duration::from_secs(5), "slowloris cut within the timeout");

    // Idle after a response on a kept-alive connection.
    let mut idle = connect(&gw).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (answered, after) = until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert!(after >= Duration::from_millis(900), "kept alive until the timeout: {after:?}");

    // A stream whose request was read is not cut: it outlives the timeout several times.
    let path = format!("/v1/events/subscribe?topic=t&apikey={}", gw.dev_key("anon"));
    let mut stream = gw.sse(&path, &[]).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let id = gw.publish(gw.dev_key("publish"), "t", json!(1)).await;
    assert_eq!(stream.next_event().await.id(), Some(id.as_str()));
}

async fn status_of(gw: &Gateway, path: &str) -> (u16, Option<String>, Value) {
    // A fresh connection per request: pooled idle connections would count against the cap.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    // At the cap, until the server has seen the previous request's socket close, a new
    // connection may be past the reserve and closed at accept: that refusal is retried.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let response = loop {
        match client.get(gw.url(path)).send().await {
            Ok(response) => break response,
            Err(error) => assert!(tokio::time::Instant::now() < deadline, "still refused: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let status = response.status().as_u16();
    let retry_after =
        response.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = if path == "/metrics" { json!(null) } else { response.json().await.unwrap_or(json!(null)) };
    (status, retry_after, body)
}

#[tokio::test]
async fn at_the_cap_streams_keep_flowing_operations_answer_others_get_503_and_it_recovers() {
    let gw = Gateway::start(&[
        "--max-connections",
        "3",
        "--reserved-connections",
        "1",
        "--header-timeout",
        "30s",
        "--heartbeat",
        "200ms",
    ])
    .await;
    let anon = gw.dev_key("anon").to_owned();
    let path = format!("/v1/events/subscribe?topic=t&apikey={anon}");
    let streaming = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let response = streaming.get(gw.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        streams.push(changegate_e2e::Sse::from_response(response));
    }

    // At the cap: a new stream gets a fast, clear answer …
    let (status, retry_after, body) = status_of(&gw, &path).await;
    assert_eq!((status, retry_after.as_deref()), (503, Some("1")), "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    // … the operations routes still answer …
    for ops in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(status_of(&gw, ops).await.0, 200, "{ops}");
    }
    // … and established streams keep receiving (heartbeats).
    for stream in &mut streams {
        let block = stream.next_block_within(PATIENCE).await.unwrap().unwrap();
        assert!(!block.raw.is_empty());
    }
    // Past the reserve, connections are closed as soon as they are accepted. (The connections of
    // the requests above may still be closing on the server: keep opening until the reserve is
    // full — with one reserved slot, the second connection at the latest.)
    let mut held = Vec::new();
    let closed_at_accept = loop {
        assert!(held.len() < 3, "a connection past the reserve was kept open");
        let mut next = connect(&gw).await;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), next.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(_)) => panic!("the server spoke first"),
            Err(_) => held.push(next),
        }
    };
    assert!(closed_at_accept);

    // Recovery is immediate: one stream leaves, a publish gets through and reaches the others.
    drop(held);
    drop(streams.pop());
    let deadline = Instant::now() + PATIENCE;
    // Until the server has seen the dropped sockets close, a new connection may still be past
    // the reserve (closed at accept: a reset) or at the cap (503): both are refusals, retried.
    let published = loop {
        let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let sent = client
            .post(gw.url("/v1/events/publish"))
            .header("apikey", gw.dev_key("publish"))
            .json(&json!({"topic": "t", "data": "after"}))
            .send()
            .await;
        let refusal = match sent {
            Ok(response) if response.status() == 202 => {
                break response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
            }
            Ok(response) => response.status().to_string(),
            Err(error) => error.to_string(),
        };
        assert!(Instant::now() < deadline, "publish still refused: {refusal}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for stream in &mut streams {
        assert_eq!(stream.next_event().await.id(), Some(published.as_str()));
    }
    let metrics = gw.http.get(gw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let refused = |reason: &str| {
        metrics.lines().any(|l| {
            l.starts_with("changegate_connections_refused_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
    };
    assert!(refused("at_cap") && refused("closed_at_accept"), "{metrics}");
}

/// Opens an SSE stream on a raw socket and reads until its first bytes (the `retry:` line).
async fn idle_stream(gw: &Gateway, key: &str) -> TcpStream {
    let mut stream = connect(gw).await;
    let request = format!("GET /v1/events/subscribe?topic=idle&apikey={key} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !seen.windows(6).any(|w| w == b"retry:") {
        let mut buffer = [0u8; 512];
        let n = timeout(PATIENCE, stream.read(&mut buffer)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    stream
}

/// What an idle subscriber costs is guarded, so that it can never triple silently again (it
/// went from 24.8 to ~71 KiB once, and nothing noticed). Memory is deterministic enough for a
/// test. The bound is the goal, 8 KiB, about 2.4× the measured 3.3 KiB of this debug build (the
/// release build's figures are in BENCHMARKS.md): a change that doubles the cost fails here.
#[tokio::test]
async fn an_idle_subscriber_costs_a_bounded_amount_of_gateway_memory() {
    const STREAMS: u64 = 2000;
    const BOUND_KIB: u64 = 8;
    let gw = Gateway::start(&[]).await;
    let key = gw.dev_key("anon").to_owned();
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(idle_stream(&gw, &key).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(gw.pid());
    for _ in 0..STREAMS {
        streams.push(idle_stream(&gw, &key).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_stream = rss_bytes(gw.pid()).saturating_sub(before) / STREAMS;
    println!("an idle SSE subscriber costs {per_stream} B of gateway RSS (debug build)");
    assert!(per_stream <= BOUND_KIB * 1024, "{per_stream} B per idle subscriber (bound {BOUND_KIB} KiB)");
    drop(streams);
}
