//! The router in-process (`tower::ServiceExt::oneshot`, no socket, no binary): credential
//! precedence, the query-string policy, error shapes, CORS and the OpenAPI/route agreement —
//! fast enough to run on every save. The end-to-end suite in `tests/` covers the same ground
//! over real connections.

// A failed unwrap in a helper is how these tests fail (as in the end-to-end harness).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::response::Response;
use changegate::auth::keys;
use changegate::{Limits, router};
use changegate_core::{ApiKey, HubConfig, Retention, Scope};
use serde_json::{Value, json};
use tower::ServiceExt;

struct App {
    router: axum::Router,
    keys: Vec<ApiKey>,
}

impl App {
    fn new() -> Self {
        let (memory, keys) = keys::dev_keys();
        let limits = Limits {
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            max_body: 1024,
            flags_heartbeat: [Duration::from_secs(30); 3],
            cors_origins: vec!["*".into()],
            metrics_tenants: false,
            replay_max: 100,
            max_json_body: 2048,
            metrics_token: None,
        };
        let state =
            changegate::memory_state(memory, Retention::default(), HubConfig::default(), None, limits);
        Self { router: router(state), keys }
    }

    fn key(&self, scope: Scope) -> String {
        self.keys.iter().find(|k| k.scope() == scope).map(|k| k.expose().to_owned()).unwrap()
    }

    async fn send(&self, request: Request<Body>) -> Response {
        self.router.clone().oneshot(request).await.unwrap()
    }

    async fn get(&self, uri: &str, headers: &[(&str, &str)]) -> Response {
        let mut request = Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }
}

async fn json_body(response: Response) -> Value {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
}

async fn error_code(response: Response) -> String {
    let body = json_body(response).await;
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"]["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn credentials_are_taken_in_the_documented_order() {
    let app = App::new();
    let (anon, publish) = (app.key(Scope::Anon), app.key(Scope::Publish));
    let subscribe = "/v1/events/subscribe?topic=t";
    // Authorization wins over apikey, which wins over X-API-Key: a bad value in the winner fails.
    let bearer = format!("Bearer {anon}");
    let cases: [(&[(&str, &str)], StatusCode); 5] = [
        (&[("authorization", bearer.as_str()), ("apikey", "flc_anon_nope")], StatusCode::OK),
        (&[("authorization", "Bearer flc_anon_nope"), ("apikey", anon.as_str())], StatusCode::UNAUTHORIZED),
        (&[("apikey", anon.as_str()), ("x-api-key", "flc_anon_nope")], StatusCode::OK),
        (&[("apikey", "flc_anon_nope"), ("x-api-key", anon.as_str())], StatusCode::UNAUTHORIZED),
        (&[("x-api-key", anon.as_str())], StatusCode::OK),
    ];
    for (headers, status) in cases {
        assert_eq!(app.get(subscribe, headers).await.status(), status, "{headers:?}");
    }
    // `Authorization: <key>` with no scheme (Featureflip's SDK) is a key when it looks like one;
    // anything else without `Bearer` is refused — also when another header carries a good key.
    let bare: [(&[(&str, &str)], StatusCode); 3] = [
        (&[("authorization", anon.as_str())], StatusCode::OK),
        (&[("authorization", anon.as_str()), ("x-api-key", "flc_anon_nope")], StatusCode::OK),
        (&[("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", anon.as_str())], StatusCode::UNAUTHORIZED),
    ];
    for (headers, status) in bare {
        assert_eq!(app.get(subscribe, headers).await.status(), status, "{headers:?}");
    }
    // A read-only key may travel in the query string; a header wins over it.
    assert_eq!(app.get(&format!("{subscribe}&apikey={anon}"), &[]).await.status(), StatusCode::OK);
    let garbage = app.get(&format!("{subscribe}&apikey=garbage"), &[("apikey", anon.as_str())]).await;
    assert_eq!(garbage.status(), StatusCode::OK);
    // A privileged one never, whatever else the request carries.
    for headers in [&[][..], &[("apikey", anon.as_str())][..]] {
        let response = app.get(&format!("{subscribe}&apikey={publish}"), headers).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(error_code(response).await, "credential_in_query");
    }
    let missing = app.get(subscribe, &[]).await;
    assert!(missing.headers().contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(error_code(missing).await, "missing_credentials");
}

#[tokio::test]
async fn the_query_string_policy_ignores_unknown_and_refuses_repeated_parameters() {
    let app = App::new();
    let anon = app.key(Scope::Anon);
    let ok = app.get(&format!("/v1/events/subscribe?topic=t&apikey={anon}&_=1700000000"), &[]).await;
    assert_eq!(ok.status(), StatusCode::OK, "cache busters are ignored");
    let twice = app.get(&format!("/v1/events/subscribe?topic=t&topic=u&apikey={anon}"), &[]).await;
    assert_eq!(twice.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(twice).await, "invalid_query");
    let undecodable = app.get(&format!("/v1/events/subscribe?topic=%FF&apikey={anon}"), &[]).await;
    assert_eq!(undecodable.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn every_rejection_is_our_json_error_shape() {
    let app = App::new();
    let service = app.key(Scope::Service);
    let cases = [
        (Request::get("/no/such/route").body(Body::empty()).unwrap(), StatusCode::NOT_FOUND, "not_found"),
        (
            Request::delete("/healthz").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Request::get("/v1/flags/%FF?environment=development")
                .header("apikey", &service)
                .body(Body::empty())
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Request::post("/v1/flags?environment=development")
                .header("apikey", &service)
                .header("content-type", "application/json")
                .body(Body::from(vec![b' '; 4096]))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Request::post("/v1/events/publish")
                .header("apikey", app.key(Scope::Publish))
                .body(Body::from(json!({"topic": "t", "data": "x".repeat(2000)}).to_string()))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let response = app.send(request).await;
        assert_eq!(response.status(), status, "{what}");
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body was never read: the connection cannot carry another request.
            assert_eq!(response.headers()[header::CONNECTION], "close", "{what}");
        }
        assert_eq!(error_code(response).await, code, "{what}");
    }
}

#[tokio::test]
async fn cors_preflight_allows_what_browser_clients_send_and_responses_expose_the_etag() {
    let app = App::new();
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/ofrep/v1/evaluate/flags")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "if-none-match, x-api-key, content-type")
        .body(Body::empty())
        .unwrap();
    let response = app.send(preflight).await;
    assert!(response.status().is_success());
    let allowed = response.headers()["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
    for wanted in ["if-none-match", "last-event-id", "x-api-key", "apikey", "authorization", "content-type"] {
        assert!(allowed.split(',').any(|h| h.trim() == wanted), "{wanted} in {allowed}");
    }
    let health = app.get("/healthz", &[("origin", "https://app.example")]).await;
    assert_eq!(health.headers()["access-control-allow-origin"], "*");
    let exposed = health.headers()["access-control-expose-headers"].to_str().unwrap().to_ascii_lowercase();
    assert!(exposed.contains("etag"), "{exposed}");
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_every_route_documented() {
    let app = App::new();
    let doc: Value = json_body(app.get("/openapi.json", &[]).await).await;
    let mut documented: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    let mut routed = changegate::PATHS.to_vec();
    documented.sort_unstable();
    routed.sort_unstable();
    assert_eq!(documented, routed);
    let service = app.key(Scope::Service);
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "patch", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let uri = path.replace("{key}", "x").replace("{id}", "x");
            let request = Request::builder()
                .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
                .uri(&uri)
                .header("apikey", &service)
                .body(Body::empty())
                .unwrap();
            let response = app.send(request).await;
            assert_ne!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            if response.status() == StatusCode::NOT_FOUND {
                let body = json_body(response).await;
                let message = body["error"]["message"].as_str().unwrap_or_default();
                // (In-process there is no Prometheus recorder: /metrics says so, and is routed.)
                let routed = !message.starts_with("no route for") || message.contains("no metrics recorder");
                assert!(routed, "{method} {path} is documented but not routed");
            }
        }
    }
}
