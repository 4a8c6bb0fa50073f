//! The browser path in a real browser: headless Chromium's own `EventSource`, a read-only key in
//! the URL, a page on another origin (CORS), and reconnection with `Last-Event-ID` after the
//! gateway drops the connection.

use changegate_e2e::{Browser, Gateway, TestDb, npm_project, test_key};
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

/// The published OpenFeature web provider (`@openfeature/ofrep-web-provider`) in a page on
/// another origin: once it holds an ETag, each re-evaluation is a conditional bulk POST with
/// `If-None-Match`, which the CORS preflight must allow — or the page never sees a change.
#[tokio::test]
async fn the_openfeature_web_provider_on_another_origin_sees_every_flag_change() {
    let Some(mut browser) = Browser::start().await else { return };
    let (sdk, service) = (test_key("sdk"), test_key("service"));
    let keys = json!([
        {"tenant": "acme", "scope": "sdk", "key": sdk, "environment": "production"},
        {"tenant": "acme", "scope": "service", "key": service},
    ]);
    let gw = Gateway::with_keys(&keys, &[]).await;
    let flags = gw.url("/v1/flags?environment=production");
    let banner = json!({"key": "banner", "enabled": true, "defaultVariant": "summer",
                        "variants": {"summer": "summer", "winter": "winter", "spring": "spring"}});
    let created = gw.http.post(&flags).header("apikey", &service).json(&banner).send().await.unwrap();
    assert_eq!(created.status(), 201);

    let modules = "/node_modules/@openfeature";
    let page = format!(
        r#"<!doctype html>
        <script>
          window.errors = [];
          addEventListener("error", (e) => window.errors.push(String(e.message)));
          addEventListener("unhandledrejection", (e) => window.errors.push(String(e.reason)));
        </script>
        <script type="importmap">{{"imports": {{
          "@openfeature/core": "{modules}/core/dist/esm/index.js",
          "@openfeature/web-sdk": "{modules}/web-sdk/dist/esm/index.js",
          "@openfeature/ofrep-core": "{modules}/ofrep-web-provider/node_modules/@openfeature/ofrep-core/index.esm.js",
          "@openfeature/ofrep-web-provider": "{modules}/ofrep-web-provider/index.esm.js"
        }}}}</script>
        <script type="module">
          import {{ OpenFeature, ProviderEvents }} from "@openfeature/web-sdk";
          import {{ OFREPWebProvider }} from "@openfeature/ofrep-web-provider";
          window.seen = []; window.failures = [];
          await OpenFeature.setContext({{ targetingKey: "user-1" }});
          const provider = new OFREPWebProvider({{ baseUrl: {base:?}, headers: [["X-API-Key", {sdk:?}]], pollInterval: 0 }});
          await OpenFeature.setProviderAndWait(provider);
          const client = OpenFeature.getClient();
          window.seen.push(client.getStringValue("banner", "none"));
          client.addHandler(ProviderEvents.ConfigurationChanged, () => window.seen.push(client.getStringValue("banner", "none")));
          client.addHandler(ProviderEvents.Error, (e) => window.failures.push(String(e.message)));
        </script>"#,
        base = gw.base,
    );
    let origin = browser.serve(&npm_project("ofrep"), &page).await;
    assert_ne!(origin, gw.base, "the page is on another origin");
    browser.goto(&format!("{origin}/page.html")).await;
    let started = browser
        .wait_for("[window.seen && window.seen.length, window.errors]", |v| {
            v[0] == 1 || v[1].as_array().is_some_and(|e| !e.is_empty())
        })
        .await;
    assert_eq!(started, json!([1, []]), "the provider started");

    let flag = gw.url("/v1/flags/banner?environment=production");
    for (round, variant) in ["winter", "spring"].into_iter().enumerate() {
        let patch = json!({"defaultVariant": variant});
        let patched = gw.http.patch(&flag).header("apikey", &service).json(&patch).send().await.unwrap();
        assert_eq!(patched.status(), 200);
        let want = round + 2;
        browser.wait_for("window.seen.length", |v| v.as_u64() == Some(want as u64)).await;
    }
    assert_eq!(browser.eval("window.seen").await, json!(["summer", "winter", "spring"]));
    assert_eq!(browser.eval("window.failures").await, json!([]));
}
