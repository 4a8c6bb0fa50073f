//! A reader that stops reading is cut off with a `retry:` hint instead of holding the gateway's
//! memory hostage, and loses nothing when it resumes.

use std::sync::Arc;
use std::time::Duration;

use changegate_e2e::{Gateway, PATIENCE, rss_bytes, seq};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The body of a chunked HTTP/1.1 response, de-chunked.
fn dechunk(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let (head, mut rest) = text.split_once("\r\n\r\n").expect("a complete response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    body
}

/// A subscriber on a raw socket with a tiny receive buffer: it reads the response head and the
/// `retry:` line (returned), then the test stops reading.
async fn stalled_reader(gw: &Gateway) -> (TcpStream, Vec<u8>) {
    let address = gw.base.trim_start_matches("http://").parse().unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(address).await.unwrap();
    let request = format!(
        "GET /v1/events/subscribe?topic=flood&apikey={} HTTP/1.1\r\nHost: test\r\n\r\n",
        gw.dev_key("anon")
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(PATIENCE, stalled.read(&mut head)).await.unwrap().unwrap();
    head.truncate(n);
    (stalled, head)
}

#[tokio::test]
async fn a_stalled_reader_is_disconnected_with_a_retry_hint_and_resumes_without_loss() {
    let gw = Arc::new(Gateway::start(&["--buffer", "16", "--retention-events", "100000"]).await);
    let (mut stalled, mut raw) = stalled_reader(&gw).await;

    // Far more than the socket buffers and the hub's 16-event window can hold.
    let padding = "x".repeat(8 * 1024);
    let mut publishers = Vec::new();
    for worker in 0..4 {
        let gw = gw.clone();
        let padding = padding.clone();
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..750 {
                ids.push(
                    gw.publish(gw.dev_key("publish"), "flood", json!({"w": worker, "i": i, "pad": padding}))
                        .await,
                );
            }
            ids
        }));
    }
    let mut published = Vec::new();
    for publisher in publishers {
        published.extend(publisher.await.unwrap());
    }
    published.sort_by_key(|id| seq(id));

    // Now read everything the gateway still had for us: it must end the response (the last
    // chunk); the connection itself may stay open for reuse.
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut chunk = vec![0u8; 64 * 1024];
        while !raw.ends_with(b"\r\n0\r\n\r\n") {
            let n = stalled.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the response ended");
            raw.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the gateway ended the stalled stream");
    let body = dechunk(&raw);
    assert!(
        body.ends_with(": too slow: reconnect with Last-Event-ID to catch up\nretry: 2000\n\n"),
        "the stream ends with a retry hint: {:?}",
        &body[body.len().saturating_sub(200)..]
    );
    let mut received: Vec<String> =
        body.lines().filter_map(|l| l.strip_prefix("id: ")).map(str::to_owned).collect();
    assert!(received.len() < published.len(), "the stalled reader was cut off early ({})", received.len());

    // Resume: everything after the last event seen arrives, once, in order.
    let last = received.last().cloned().expect("some events arrived before the cut");
    let mut sse = gw
        .sse(
            &format!("/v1/events/subscribe?topic=flood&apikey={}", gw.dev_key("anon")),
            &[("last-event-id", &last)],
        )
        .await;
    while received.len() < published.len() {
        received.push(sse.next_event().await.id().unwrap().to_owned());
    }
    assert_eq!(received, published);
}

#[tokio::test]
async fn a_reader_that_never_reads_again_is_disconnected_after_the_write_timeout() {
    // A hub buffer so large the reader never lags: only the blocked socket can reveal it.
    let gw = Arc::new(Gateway::start(&["--buffer", "100000", "--write-timeout", "1s"]).await);
    let (mut stalled, _head) = stalled_reader(&gw).await;
    // Fill every buffer between the gateway and this reader, then never read.
    let padding = "x".repeat(8 * 1024);
    for i in 0..1500 {
        gw.publish(gw.dev_key("publish"), "flood", json!({"i": i, "pad": padding})).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The gateway gave up on it: draining what the kernel holds ends in EOF or a reset (either
    // is fine), not in the response's last chunk.
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut rest)).await;
    assert!(outcome.is_ok(), "the connection was closed by the gateway");
    assert!(!rest.ends_with(b"\r\n0\r\n\r\n"), "the response did not end normally");
    let metrics = gw.http.get(gw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("changegate_stalled_connections_closed_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Everyone else is unaffected.
    let mut fresh =
        gw.sse(&format!("/v1/events/subscribe?topic=flood&apikey={}", gw.dev_key("anon")), &[]).await;
    let id = gw.publish(gw.dev_key("publish"), "flood", json!("after")).await;
    assert_eq!(fresh.next_event().await.id(), Some(id.as_str()));
}

/// What a reader that stopped reading may pin in the gateway is bounded per connection: the
/// HTTP layer's queue (hyper's default, ~400 KB a connection, let 1 000 stalled readers hold
/// half a gigabyte), not the whole flood.
#[tokio::test]
async fn a_stalled_reader_pins_a_bounded_amount_of_gateway_memory() {
    const READERS: usize = 200;
    let gw = Gateway::start(&["--retention-events", "10", "--write-timeout", "60s"]).await;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        readers.push(stalled_reader(&gw).await);
    }
    let before = rss_bytes(gw.pid());
    let data = "x".repeat(1000);
    let http = reqwest::Client::new();
    let publisher = gw.dev_key("publish").to_owned();
    let mut inflight = tokio::task::JoinSet::new();
    for _ in 0..5000 {
        let request = http
            .post(gw.url("/v1/events/publish"))
            .header("apikey", &publisher)
            .json(&json!({"topic": "flood", "data": data}));
        inflight.spawn(async move { assert_eq!(request.send().await.unwrap().status(), 202) });
        while inflight.len() > 32 {
            inflight.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(done) = inflight.join_next().await {
        done.unwrap();
    }
    let grown = rss_bytes(gw.pid()).saturating_sub(before);
    println!(
        "{READERS} stalled readers after 5 000 × 1 KB: RSS grew {} KiB per reader",
        grown / 1024 / READERS as u64
    );
    assert!(
        grown / (READERS as u64) < 160 * 1024,
        "{} KiB per stalled reader",
        grown / 1024 / READERS as u64
    );
}
