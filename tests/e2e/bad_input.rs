//! Malformed input gets a JSON error with the right status, and never disturbs another
//! client's stream.

use changegate_e2e::Gateway;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

async fn post(gw: &Gateway, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = gw
        .http
        .post(gw.url("/v1/events/publish"))
        .header("apikey", gw.dev_key("publish"))
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.expect("errors are JSON"))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[tokio::test]
async fn publish_answers_202_with_the_event_id() {
    let gw = Gateway::start(&[]).await;
    let (status, body) = post(&gw, json!({"topic": "order.created", "data": {"n": 1}}).to_string()).await;
    assert_eq!(status, 202);
    let id = body["id"].as_str().unwrap();
    assert!(id.contains('-'), "{id}");
}

#[tokio::test]
async fn malformed_publish_bodies_are_refused_with_the_problem_named() {
    let gw = Gateway::start(&["--max-body", "1024"]).await;
    let cases: Vec<(Vec<u8>, u16, &str, &str)> = vec![
        (b"{\"topic\":\"a\",\"data\":".to_vec(), 400, "invalid_json", "EOF"),
        (b"not json".to_vec(), 400, "invalid_json", "expected"),
        (b"".to_vec(), 400, "invalid_json", "EOF"),
        (b"[1,2]".to_vec(), 400, "invalid_json", "invalid type"),
        (br#"{"topic":1,"data":1}"#.to_vec(), 400, "invalid_json", "invalid type"),
        (br#"{"data":1}"#.to_vec(), 400, "invalid_json", "missing field `topic`"),
        (br#"{"topic":"a"}"#.to_vec(), 400, "invalid_json", "missing field `data`"),
        (br#"{"topic":"a","data":1,"extra":2}"#.to_vec(), 400, "invalid_json", "unknown field `extra`"),
        (br#"{"topic":"a b","data":1}"#.to_vec(), 400, "invalid_topic", "not allowed"),
        (br#"{"topic":"","data":1}"#.to_vec(), 400, "invalid_topic", "empty"),
        (format!(r#"{{"topic":"{}","data":1}}"#, "a".repeat(256)).into_bytes(), 400, "invalid_topic", "255"),
        (b"{\"topic\":\"\xff\xfe\",\"data\":1}".to_vec(), 400, "invalid_json", ""),
        (
            format!(r#"{{"topic":"a","data":"{}"}}"#, "x".repeat(2000)).into_bytes(),
            413,
            "payload_too_large",
            "1024",
        ),
    ];
    for (body, status, expected_code, hint) in cases {
        let shown = String::from_utf8_lossy(&body).chars().take(40).collect::<String>();
        let (got, json) = post(&gw, body).await;
        assert_eq!((got, code(&json)), (status, expected_code), "{shown}: {json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(hint), "{shown}: {message} should mention {hint:?}");
    }
}

#[tokio::test]
async fn subscribe_refuses_bad_queries_with_400_and_collections_need_a_database() {
    let gw = Gateway::start(&[]).await;
    let key = gw.dev_key("anon");
    let cases = [
        ("", 400, "invalid_query"),
        ("topic=a&collection=todos", 400, "invalid_query"),
        ("topic=a&topic=b", 400, "invalid_query"),
        ("topic=a%20b", 400, "invalid_topic"),
        ("topic=order.**", 400, "invalid_topic"),
        ("topic=", 400, "invalid_topic"),
        ("collection=", 400, "invalid_collection"),
        ("collection=todos&source=oracle", 400, "invalid_source"),
        ("collection=todos", 501, "collections_need_database"),
        ("collection=public.todos&source=postgres", 501, "collections_need_database"),
    ];
    for (query, status, expected) in cases {
        let (got, body) = gw
            .try_sse(&format!("/v1/events/subscribe?{query}&apikey={key}"), &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{query} was accepted"));
        assert_eq!((got, code(&body)), (status, expected), "{query}: {body}");
    }
    // Unknown parameters are ignored, as cache busters are.
    gw.sse(&format!("/v1/events/subscribe?topic=a&_=12345&apikey={key}"), &[]).await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let gw = Gateway::start(&[]).await;
    let missing = gw.http.get(gw.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(code(&missing.json().await.unwrap()), "not_found");
    let wrong = gw.http.delete(gw.url("/v1/events/publish")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(code(&wrong.json().await.unwrap()), "method_not_allowed");
}

#[tokio::test]
async fn health_and_readiness_answer_json() {
    let gw = Gateway::start(&[]).await;
    for (path, expected) in [("/healthz", json!({"status": "ok"})), ("/readyz", json!({"status": "ready"}))] {
        let response = gw.http.get(gw.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<Value>().await.unwrap(), expected);
    }
}

#[tokio::test]
async fn a_bad_request_never_disturbs_another_clients_stream() {
    let gw = Gateway::start(&[]).await;
    let mut sse = gw.sse(&format!("/v1/events/subscribe?topic=t&apikey={}", gw.dev_key("anon")), &[]).await;
    for body in ["{", "[]", "\u{0}", r#"{"topic":"t","data":1,"x":1}"#] {
        let (status, _) = post(&gw, body.to_owned()).await;
        assert_eq!(status, 400);
    }
    let _ = gw.try_sse("/v1/events/subscribe?topic=t", &[("last-event-id", "garbage")]).await;
    let id = gw.publish(gw.dev_key("publish"), "t", json!("still here")).await;
    assert_eq!(sse.next_event().await.id(), Some(id.as_str()));
}

/// Every route in the OpenAPI document, every method it has, with hostile input — a path
/// parameter that is not UTF-8, a body over the route family's limit, a body that is not JSON,
/// a wrong query string, a method it does not have: the answer is always a 4xx whose body is
/// our JSON error shape (OFREP evaluations and Togul's evaluate API: theirs), never a 5xx, never
/// plain text.
#[tokio::test]
async fn hostile_input_on_every_route_gets_a_json_error() {
    let gw = Gateway::start(&["--max-body", "1024", "--max-json-body", "2048"]).await;
    let doc: Value = gw.http.get(gw.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let service = gw.dev_key("service").to_owned();
    let publish = gw.dev_key("publish").to_owned();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let methods: Vec<String> = item
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| ["get", "post", "put", "patch", "delete"].contains(&m.as_str()))
            .cloned()
            .collect();
        let key = if path == "/v1/events/publish" { &publish } else { &service };
        let with_bad_params = path.replace("{key}", "%FF%FE").replace("{id}", "%C3%28");
        for method in &methods {
            let verb = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let mut cases: Vec<(String, Option<Vec<u8>>)> = Vec::new();
            if with_bad_params != *path {
                cases.push((format!("{with_bad_params}?environment=production"), None));
            }
            if method != "get" && method != "delete" {
                let concrete = path.replace("{key}", "k").replace("{id}", "i");
                cases.push((format!("{concrete}?environment=production"), Some(vec![b'x'; 4096])));
                cases.push((
                    format!("{concrete}?environment=production"),
                    Some(b"{\"unterminated\": ".to_vec()),
                ));
                cases.push((format!("{concrete}?environment=%FF"), Some(b"{}".to_vec())));
            }
            for (target, body) in cases {
                let mut request = gw.http.request(verb.clone(), gw.url(&target)).header("apikey", key);
                if let Some(body) = body {
                    request = request.header(CONTENT_TYPE, "application/json").body(body);
                }
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let text = response.text().await.unwrap();
                assert!((400..500).contains(&status), "{method} {target}: {status} {text}");
                let body: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{method} {target}: {status} is not JSON: {text}"));
                let ours = body["error"]["code"].is_string() && body["error"]["message"].is_string();
                // OFREP evaluations answer in the protocol's own error shape, which its providers parse.
                let ofrep = path.starts_with("/ofrep/v1/evaluate")
                    && body["errorCode"].is_string()
                    && body["errorDetails"].is_string();
                // Togul's evaluate API answers in the shape its SDK parses.
                let togul =
                    path == "/api/v1/evaluate" && body["code"].is_string() && body["message"].is_string();
                assert!(ours || ofrep || togul, "{method} {target}: {body}");
                checked += 1;
            }
        }
        let absent = ["put", "patch", "delete"].into_iter().find(|m| !methods.iter().any(|x| x == m));
        if let Some(absent) = absent {
            let verb = reqwest::Method::from_bytes(absent.to_ascii_uppercase().as_bytes()).unwrap();
            let concrete = path.replace("{key}", "k").replace("{id}", "i");
            let response =
                gw.http.request(verb, gw.url(&concrete)).header("apikey", key).send().await.unwrap();
            assert_eq!(response.status(), 405, "{absent} {concrete}");
            let body: Value = response.json().await.expect("a 405 is JSON");
            assert_eq!(code(&body), "method_not_allowed");
        }
    }
    assert!(checked > 40, "only {checked} cases ran");
}

/// An oversized body is refused the same way on publish and on the JSON API, each against its
/// own documented limit.
#[tokio::test]
async fn each_route_family_has_its_own_body_limit() {
    let gw = Gateway::start(&["--max-body", "1024", "--max-json-body", "2048"]).await;
    let flags = gw.url("/v1/flags?environment=production");
    let name = "n".repeat(1500);
    let fits = json!({"key": "fits", "enabled": true, "name": name});
    let response =
        gw.http.post(&flags).header("apikey", gw.dev_key("service")).json(&fits).send().await.unwrap();
    assert_ne!(response.status(), 413, "1.5 KB is within --max-json-body");
    let name = "n".repeat(3000);
    let big = json!({"key": "big", "enabled": true, "name": name});
    let response =
        gw.http.post(&flags).header("apikey", gw.dev_key("service")).json(&big).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "payload_too_large");
    assert!(body["error"]["message"].as_str().unwrap().contains("2048"), "{body}");
    let (status, body) = post(&gw, json!({"topic": "t", "data": "x".repeat(1500)}).to_string()).await;
    assert_eq!((status, code(&body)), (413, "payload_too_large"));
}
