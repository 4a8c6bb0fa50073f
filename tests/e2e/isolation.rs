//! Tenants never see each other's events, whatever they subscribe to or resume from.

use std::time::Duration;

use changegate_e2e::{Gateway, test_key};
use serde_json::json;

struct Tenant {
    anon: String,
    publish: String,
}

async fn two_tenants() -> (Gateway, Tenant, Tenant) {
    let a = Tenant { anon: test_key("anon"), publish: test_key("publish") };
    let b = Tenant { anon: test_key("anon"), publish: test_key("publish") };
    let file = json!([
        {"tenant": "a", "scope": "anon", "key": a.anon},
        {"tenant": "a", "scope": "publish", "key": a.publish},
        {"tenant": "b", "scope": "anon", "key": b.anon},
        {"tenant": "b", "scope": "publish", "key": b.publish},
    ]);
    (Gateway::with_keys(&file, &[]).await, a, b)
}

#[tokio::test]
async fn two_tenants_publishing_to_the_same_topic_never_see_each_other() {
    let (gw, a, b) = two_tenants().await;
    let mut a_exact = gw.sse("/v1/events/subscribe?topic=orders", &[("apikey", &a.anon)]).await;
    let mut a_all = gw.sse("/v1/events/subscribe?topic=*", &[("apikey", &a.anon)]).await;
    let mut b_exact = gw.sse("/v1/events/subscribe?topic=orders", &[("apikey", &b.anon)]).await;
    let mut b_all = gw.sse("/v1/events/subscribe?topic=*", &[("apikey", &b.anon)]).await;
    let mut a_ids = Vec::new();
    let mut b_ids = Vec::new();
    for i in 0..5 {
        a_ids.push(gw.publish(&a.publish, "orders", json!({"tenant": "a", "i": i})).await);
        b_ids.push(gw.publish(&b.publish, "orders", json!({"tenant": "b", "i": i})).await);
    }
    for (sse, ids, tenant) in [
        (&mut a_exact, &a_ids, "a"),
        (&mut a_all, &a_ids, "a"),
        (&mut b_exact, &b_ids, "b"),
        (&mut b_all, &b_ids, "b"),
    ] {
        for id in ids {
            let event = sse.next_event().await;
            assert_eq!(event.id(), Some(id.as_str()));
            assert_eq!(event.json()["data"]["tenant"], tenant);
        }
        sse.assert_quiet(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn resuming_from_another_tenants_event_id_replays_nothing_of_theirs() {
    let (gw, a, b) = two_tenants().await;
    let b_first = gw.publish(&b.publish, "orders", json!({"tenant": "b"})).await;
    let a_id = gw.publish(&a.publish, "orders", json!({"tenant": "a", "secret": true})).await;
    gw.publish(&b.publish, "orders", json!({"tenant": "b"})).await;
    // Tenant b resumes from an id it saw, from a's id, and from just before a's id.
    let (epoch, a_seq) = a_id.rsplit_once('-').unwrap();
    let guessed = format!("{epoch}-{}", a_seq.parse::<u64>().unwrap() - 1);
    for resume in [&b_first, &a_id, &guessed] {
        let mut sse =
            gw.sse("/v1/events/subscribe?topic=*", &[("apikey", &b.anon), ("last-event-id", resume)]).await;
        let event = sse.next_event().await;
        assert_eq!(event.json()["data"]["tenant"], "b", "resumed from {resume}");
        sse.assert_quiet(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_publisher_tenant_comes_from_the_key_never_from_the_body() {
    let (gw, a, b) = two_tenants().await;
    let mut a_all = gw.sse("/v1/events/subscribe?topic=*", &[("apikey", &a.anon)]).await;
    // A body that tries to name a tenant is refused outright (unknown field), not obeyed.
    let response = gw
        .http
        .post(gw.url("/v1/events/publish"))
        .header("apikey", &b.publish)
        .json(&json!({"topic": "orders", "data": 1, "tenant": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    a_all.assert_quiet(Duration::from_millis(300)).await;
}
