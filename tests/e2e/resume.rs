//! Resuming with `Last-Event-ID`: nothing lost, nothing twice, and `reset` instead of a gap.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use changegate_e2e::{Gateway, seq};
use serde_json::json;

fn subscribe_path(gw: &Gateway, topic: &str) -> String {
    format!("/v1/events/subscribe?topic={topic}&apikey={}", gw.dev_key("anon"))
}

#[tokio::test]
async fn a_client_that_reconnects_with_last_event_id_gets_exactly_what_it_missed() {
    let gw = Gateway::start(&[]).await;
    let publisher = gw.dev_key("publish");
    let mut first = gw.sse(&subscribe_path(&gw, "t"), &[]).await;
    let seen = gw.publish(publisher, "t", json!(1)).await;
    assert_eq!(first.next_event().await.id(), Some(seen.as_str()));
    drop(first);
    let missed = [
        gw.publish(publisher, "t", json!(2)).await,
        gw.publish(publisher, "other", json!("not for this stream")).await,
        gw.publish(publisher, "t", json!(3)).await,
    ];
    let mut again = gw.sse(&subscribe_path(&gw, "t"), &[("last-event-id", &seen)]).await;
    assert_eq!(again.next_event().await.id(), Some(missed[0].as_str()));
    assert_eq!(again.next_event().await.id(), Some(missed[2].as_str()));
    let live = gw.publish(publisher, "t", json!(4)).await;
    assert_eq!(again.next_event().await.id(), Some(live.as_str()));
}

#[tokio::test]
async fn the_last_event_id_query_parameter_resumes_and_the_header_wins_over_it() {
    let gw = Gateway::start(&[]).await;
    let publisher = gw.dev_key("publish");
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(gw.publish(publisher, "t", json!(i)).await);
    }
    let path = format!("{}&lastEventId={}", subscribe_path(&gw, "t"), ids[0]);
    let mut by_query = gw.sse(&path, &[]).await;
    assert_eq!(by_query.next_event().await.id(), Some(ids[1].as_str()));
    let mut by_header = gw.sse(&path, &[("last-event-id", &ids[1])]).await;
    assert_eq!(by_header.next_event().await.id(), Some(ids[2].as_str()));
}

#[tokio::test]
async fn a_position_older_than_retention_yields_reset_then_live_events() {
    let gw = Gateway::start(&["--retention-events", "3"]).await;
    let publisher = gw.dev_key("publish");
    let oldest = gw.publish(publisher, "t", json!(0)).await;
    for i in 1..6 {
        gw.publish(publisher, "t", json!(i)).await;
    }
    let mut sse = gw.sse(&subscribe_path(&gw, "t"), &[("last-event-id", &oldest)]).await;
    let reset = sse.next_event().await;
    assert_eq!(reset.event(), Some("reset"));
    assert_eq!(reset.json(), json!({"reason": "position-expired"}));
    let continue_from = reset.id().expect("a reset carries the id to continue from").to_owned();
    let live = gw.publish(publisher, "t", json!("after")).await;
    let event = sse.next_event().await;
    assert_eq!((event.id(), event.event()), (Some(live.as_str()), None));
    // The reset's id is a valid resume point: it yields no reset and nothing stale.
    let mut resumed = gw.sse(&subscribe_path(&gw, "t"), &[("last-event-id", &continue_from)]).await;
    assert_eq!(resumed.next_event().await.id(), Some(live.as_str()));
}

/// A catch-up longer than `--replay-max` is a `reset`, not a long replay; one within it replays
/// in pages (here 1 200 events: three pages) with every event once, in order.
#[tokio::test]
async fn a_catch_up_longer_than_the_cap_is_a_reset_and_one_within_it_replays_across_pages() {
    let gw = Gateway::start(&["--replay-max", "1200"]).await;
    let publisher = gw.dev_key("publish");
    let far = gw.publish(publisher, "t", json!(0)).await;
    let near = gw.publish(publisher, "t", json!(1)).await;
    let mut published = Vec::new();
    for i in 0..1200 {
        published.push(gw.publish(publisher, "t", json!(i)).await);
    }
    let mut capped = gw.sse(&subscribe_path(&gw, "t"), &[("last-event-id", &far)]).await;
    let reset = capped.next_event().await;
    assert_eq!((reset.event(), reset.id()), (Some("reset"), published.last().map(String::as_str)));
    capped.assert_quiet(Duration::from_millis(200)).await;

    let mut within = gw.sse(&subscribe_path(&gw, "t"), &[("last-event-id", &near)]).await;
    for id in &published {
        assert_eq!(within.next_event().await.id(), Some(id.as_str()));
    }
    let live = gw.publish(publisher, "t", json!("live")).await;
    assert_eq!(within.next_event().await.id(), Some(live.as_str()));
}

#[tokio::test]
async fn an_id_from_another_gateway_process_yields_reset_not_a_wrong_replay() {
    let old = Gateway::start(&[]).await;
    let old_id = old.publish(old.dev_key("publish"), "t", json!(0)).await;
    drop(old);
    let gw = Gateway::start(&[]).await;
    gw.publish(gw.dev_key("publish"), "t", json!(1)).await;
    let mut sse = gw.sse(&subscribe_path(&gw, "t"), &[("last-event-id", &old_id)]).await;
    assert_eq!(sse.next_event().await.event(), Some("reset"));
    sse.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn garbage_last_event_ids_get_400_json() {
    let gw = Gateway::start(&[]).await;
    for garbage in ["42", "hello", "0badcafe-x", "0badcafe-1-2"] {
        let (status, body) = gw
            .try_sse(&subscribe_path(&gw, "t"), &[("last-event-id", garbage)])
            .await
            .err()
            .expect("refused");
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_last_event_id")));
    }
}

/// The seam between replay and live: a publisher never stops while one client keeps dropping
/// its connection and resuming. Every published event must arrive exactly once, in order.
#[tokio::test]
async fn resuming_while_publishing_continuously_loses_and_repeats_nothing() {
    let gw = Arc::new(Gateway::start(&[]).await);
    let total = 600;
    // Connected before the first publish, so every event is owed to this client.
    let mut sse = gw.sse(&subscribe_path(&gw, "seam"), &[]).await;
    let publisher = {
        let gw = gw.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..total {
                ids.push(gw.publish(gw.dev_key("publish"), "seam", json!(i)).await);
            }
            ids
        })
    };
    let mut received: Vec<String> = Vec::new();
    let mut reconnects = 0;
    loop {
        // Read a few events, then hang up mid-stream and resume from the last one seen.
        for _ in 0..(3 + reconnects % 11) {
            if received.len() == total {
                break;
            }
            received.push(sse.next_event().await.id().expect("every event has an id").to_owned());
        }
        if received.len() == total {
            break;
        }
        reconnects += 1;
        let last = received.last().cloned().unwrap_or_default();
        let headers: Vec<(&str, &str)> =
            if last.is_empty() { vec![] } else { vec![("last-event-id", &last)] };
        sse = gw.sse(&subscribe_path(&gw, "seam"), &headers).await;
    }
    let published = publisher.await.unwrap();
    assert!(reconnects > 20, "the seam was crossed many times ({reconnects})");
    assert_eq!(received, published, "every event once, in publish order");
    assert!(received.windows(2).all(|w| seq(&w[0]) < seq(&w[1])), "ids strictly increase");
    let unique: BTreeSet<&String> = received.iter().collect();
    assert_eq!(unique.len(), total);
}
