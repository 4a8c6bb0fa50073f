//! The browser path in a real browser: headless Chromium's own `EventSource`, a read-only key in
//! the URL, a page on another origin (CORS), and reconnection with `Last-Event-ID` after the
//! gateway drops the connection.

use changegate_e2e::{Browser, Gateway, TestDb};
use serde_json::{Value, json};

fn page(stream_url: &str) -> String {
    format!(
        r#"<!doctype html><script>
        window.got = []; window.opens = 0;
        const source = new EventSource({stream_url:?});
        source.onopen = () => {{ window.opens += 1; }};
        source.onmessage = (e) => window.got.push({{ id: e.lastEventId, data: JSON.parse(e.data) }});
        </script>"#
    )
}

#[tokio::test]
async fn a_browser_on_another_origin_receives_changes_in_order_and_catches_up_after_a_server_side_drop() {
    let Some(mut browser) = Browser::start().await else { return };
    let db = TestDb::new().await;
    let keys = db.setup(&["acme"], "anon");
    db.todos().await;
    let gw = db.gateway(&["--retry", "300ms"]).await;
    let url = gw.url(&format!("/v1/events/subscribe?collection=todos&apikey={}", keys[0]));
    browser.set_content(&page(&url)).await;
    browser.wait_for("window.opens", |v| v == 1).await;

    db.client
        .batch_execute(
            "insert into todos (tenant_id, title) values ('acme', 'first');
             update todos set done = true where id = 1;
             delete from todos where id = 1;",
        )
        .await
        .unwrap();
    let got = browser.wait_for("window.got", |v| v.as_array().is_some_and(|a| a.len() == 3)).await;
    let kinds: Vec<&str> =
        got.as_array().unwrap().iter().map(|e| e["data"]["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["insert", "update", "delete"]);
    assert_eq!(
        got[2]["data"]["document"],
        json!({"id": 1, "tenant_id": "acme", "title": "first", "done": true})
    );

    // The server drops the stream (a restart); rows written meanwhile arrive after the browser
    // reconnects by itself with Last-Event-ID.
    let listen = gw.base.trim_start_matches("http://").to_owned();
    assert!(gw.terminate().await.success());
    db.client
        .batch_execute(
            "insert into todos (tenant_id, title) values ('acme', 'while down 1'), ('acme', 'while down 2')",
        )
        .await
        .unwrap();
    let _again = db.gateway_at(&listen, &["--retry", "300ms"]).await;
    let got = browser.wait_for("window.got", |v| v.as_array().is_some_and(|a| a.len() >= 5)).await;
    let events = got.as_array().unwrap();
    assert_eq!(events.len(), 5, "nothing twice: {got}");
    let titles: Vec<&str> =
        events[3..].iter().map(|e| e["data"]["document"]["title"].as_str().unwrap()).collect();
    assert_eq!(titles, ["while down 1", "while down 2"]);
    assert!(browser.eval("window.opens").await.as_u64().unwrap() >= 2, "the browser reconnected");
}

#[tokio::test]
async fn the_console_renders_an_arriving_event_and_refuses_a_privileged_key() {
    let Some(mut browser) = Browser::start().await else { return };
    let gw = Gateway::start(&[]).await;
    browser.goto(&gw.url(&format!("/console#apikey={}&topic=order.*", gw.dev_key("anon")))).await;
    browser.wait_for("document.getElementById('state').textContent", |v| v == "open").await;
    gw.publish(gw.dev_key("publish"), "order.created", json!({"order": 42})).await;
    browser.wait_for("document.getElementById('count').textContent", |v| v == "1").await;
    let shown = browser.eval("document.querySelector('#events .event pre').textContent").await;
    let shown: Value = serde_json::from_str(shown.as_str().unwrap()).unwrap();
    assert_eq!((shown["topic"].as_str(), &shown["data"]), (Some("order.created"), &json!({"order": 42})));
    assert!(browser.eval("document.getElementById('spark') !== null").await.as_bool().unwrap());

    // A service key never leaves the page.
    browser.goto(&gw.url(&format!("/console#apikey={}&topic=x", gw.dev_key("service")))).await;
    let error = browser.wait_for("document.getElementById('error').textContent", |v| v != "").await;
    assert!(error.as_str().unwrap().contains("read-only key"), "{error}");
    assert_eq!(browser.eval("document.getElementById('state').textContent").await, "closed");
}
