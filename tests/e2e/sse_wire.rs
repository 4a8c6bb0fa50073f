//! The bytes of the realtime SSE stream, as a client reads them.

use std::time::Duration;

use changegate_e2e::{Gateway, seq};
use serde_json::json;

#[tokio::test]
async fn a_stream_opens_with_sse_headers_and_a_retry_line() {
    let gw = Gateway::start(&["--retry", "1500ms"]).await;
    let mut sse = gw.sse(&format!("/v1/events/subscribe?topic=a&apikey={}", gw.dev_key("anon")), &[]).await;
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    assert_eq!(sse.headers["cache-control"], "no-cache");
    assert_eq!(sse.headers["x-accel-buffering"], "no");
    assert_eq!(sse.next_block().await.unwrap().raw, "retry: 1500\n\n");
}

#[tokio::test]
async fn a_published_message_arrives_as_one_id_line_and_one_data_line_without_an_event_field() {
    let gw = Gateway::start(&[]).await;
    let mut sse =
        gw.sse(&format!("/v1/events/subscribe?topic=order.created&apikey={}", gw.dev_key("anon")), &[]).await;
    let id =
        gw.publish(gw.dev_key("publish"), "order.created", json!({"id": 7, "text": "line\nbreak"})).await;
    let block = sse.next_event().await;
    let lines: Vec<&str> = block.raw.split('\n').collect();
    assert_eq!(lines.len(), 4, "{:?}", block.raw);
    assert_eq!(lines[0], format!("id: {id}"));
    assert!(lines[1].starts_with("data: {\"type\":\"message\",\"topic\":\"order.created\",\"data\":{"));
    assert_eq!((lines[2], lines[3]), ("", ""));
    let data = block.json();
    assert_eq!(data["data"], json!({"id": 7, "text": "line\nbreak"}));
    let timestamp = data["timestamp"].as_str().unwrap();
    assert!(timestamp.len() == 24 && timestamp.ends_with('Z'), "RFC 3339 with ms: {timestamp}");
    assert_eq!(block.event(), None);
}

#[tokio::test]
async fn heartbeats_are_comment_lines_at_the_configured_interval() {
    let gw = Gateway::start(&["--heartbeat", "200ms"]).await;
    let mut sse = gw.sse(&format!("/v1/events/subscribe?topic=a&apikey={}", gw.dev_key("anon")), &[]).await;
    assert!(sse.next_block().await.unwrap().raw.starts_with("retry: "));
    let started = tokio::time::Instant::now();
    for _ in 0..3 {
        let block =
            sse.next_block_within(Duration::from_secs(2)).await.expect("a heartbeat in time").unwrap();
        assert_eq!(block.raw, ": heartbeat\n\n");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "three heartbeats 200 ms apart took at least 400 ms"
    );
}

#[tokio::test]
async fn events_keep_publish_order_and_prefix_patterns_match_below_the_prefix() {
    let gw = Gateway::start(&[]).await;
    let key = gw.dev_key("anon");
    let mut orders = gw.sse(&format!("/v1/events/subscribe?topic=order.*&apikey={key}"), &[]).await;
    let mut everything = gw.sse(&format!("/v1/events/subscribe?topic=*&apikey={key}"), &[]).await;
    let publisher = gw.dev_key("publish");
    let mut order_ids = Vec::new();
    let mut all_ids = Vec::new();
    for (i, topic) in
        ["order.created", "orders.x", "order", "order.eu.shipped", "user.created"].iter().enumerate()
    {
        let id = gw.publish(publisher, topic, json!(i)).await;
        if topic.starts_with("order.") {
            order_ids.push(id.clone());
        }
        all_ids.push(id);
    }
    for expected in &order_ids {
        assert_eq!(orders.next_event().await.id(), Some(expected.as_str()));
    }
    orders.assert_quiet(Duration::from_millis(300)).await;
    let mut previous = 0;
    for expected in &all_ids {
        let id = everything.next_event().await.id().unwrap().to_owned();
        assert_eq!(&id, expected);
        assert!(seq(&id) > previous);
        previous = seq(&id);
    }
}
