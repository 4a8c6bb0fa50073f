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
