//! CORS: browsers on other origins may open streams and publish; a configured allow-list holds.

use changegate_e2e::Gateway;

async fn preflight(gw: &Gateway, origin: &str) -> reqwest::Response {
    gw.http
        .request(reqwest::Method::OPTIONS, gw.url("/v1/events/publish"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "apikey, content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn any_origin_is_allowed_by_default_and_preflight_names_the_credential_headers() {
    let gw = Gateway::start(&[]).await;
    let response = preflight(&gw, "https://app.example").await;
    assert!(response.status().is_success());
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let headers = response.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    // What the OpenFeature web provider and EventSource polyfills send.
    for wanted in ["if-none-match", "last-event-id", "x-api-key", "apikey", "authorization", "content-type"] {
        assert!(headers.split(',').any(|h| h.trim() == wanted), "{wanted} in {headers}");
    }
    let stream = gw
        .http
        .get(gw.url(&format!("/v1/events/subscribe?topic=t&apikey={}", gw.dev_key("anon"))))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["access-control-allow-origin"], "*");
    // Actual responses expose the ETag the OpenFeature web provider sends back.
    let exposed = stream.headers()["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(exposed.contains("etag"), "{exposed}");
}

#[tokio::test]
async fn a_configured_allow_list_admits_only_its_origins() {
    let gw = Gateway::start(&["--cors-origins", "https://good.example,https://also.example"]).await;
    let good = preflight(&gw, "https://good.example").await;
    assert_eq!(good.headers()["access-control-allow-origin"], "https://good.example");
    let bad = preflight(&gw, "https://evil.example").await;
    assert!(bad.headers().get("access-control-allow-origin").is_none());
}
