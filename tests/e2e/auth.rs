//! Who may do what, where a credential may travel, and which one wins — all failing closed.

use changegate_e2e::{Gateway, jwt, now, sign_jwt, test_key};
use serde_json::{Value, json};

const SECRET: &str = "test-secret-with-enough-entropy";

struct Keys {
    a_anon: String,
    a_publish: String,
    a_service: String,
    a_sdk: String,
    a_revoked: String,
    b_anon: String,
    b_publish: String,
}

async fn gateway() -> (Gateway, Keys) {
    let keys = Keys {
        a_anon: test_key("anon"),
        a_publish: test_key("publish"),
        a_service: test_key("service"),
        a_sdk: test_key("sdk"),
        a_revoked: test_key("anon"),
        b_anon: test_key("anon"),
        b_publish: test_key("publish"),
    };
    let file = json!([
        {"tenant": "a", "scope": "anon", "key": keys.a_anon},
        {"tenant": "a", "scope": "publish", "key": keys.a_publish},
        {"tenant": "a", "scope": "service", "key": keys.a_service},
        {"tenant": "a", "scope": "sdk", "key": keys.a_sdk, "environment": "production"},
        {"tenant": "a", "scope": "anon", "key": keys.a_revoked, "revoked": true},
        {"tenant": "b", "scope": "anon", "key": keys.b_anon},
        {"tenant": "b", "scope": "publish", "key": keys.b_publish},
    ]);
    (Gateway::with_keys(&file, &["--jwt-secret", SECRET]).await, keys)
}

async fn refusal(gw: &Gateway, query: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    match gw.try_sse(&format!("/v1/events/subscribe?topic=t{query}"), headers).await {
        Ok(_) => panic!("expected a refusal for {query} {headers:?}"),
        Err(refusal) => refusal,
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[tokio::test]
async fn missing_unknown_malformed_and_revoked_credentials_get_401_json() {
    let (gw, keys) = gateway().await;
    let unknown = test_key("anon");
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (String::new(), vec![], "missing_credentials"),
        (format!("&apikey={unknown}"), vec![], "invalid_api_key"),
        (String::new(), vec![("apikey", unknown.as_str())], "invalid_api_key"),
        (String::new(), vec![("apikey", "flc_anon_tooshort")], "invalid_api_key"),
        (String::new(), vec![("x-api-key", "not-a-key")], "invalid_token"),
        (String::new(), vec![("apikey", keys.a_revoked.as_str())], "revoked_api_key"),
        (format!("&apikey={}", keys.a_revoked), vec![], "revoked_api_key"),
        (String::new(), vec![("authorization", "Basic dXNlcjpwYXNz")], "invalid_token"),
    ];
    for (query, headers, expected) in cases {
        let (status, body) = refusal(&gw, &query, &headers).await;
        assert_eq!((status, code(&body)), (401, expected), "{query} {headers:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(!message.contains(&unknown) && !message.contains(&keys.a_revoked), "{message}");
    }
}

#[tokio::test]
async fn every_accepted_header_and_the_query_parameter_authenticate() {
    let (gw, keys) = gateway().await;
    let bearer = format!("Bearer {}", keys.a_anon);
    for headers in [
        vec![("apikey", keys.a_anon.as_str())],
        vec![("x-api-key", keys.a_anon.as_str())],
        vec![("authorization", bearer.as_str())],
    ] {
        gw.sse("/v1/events/subscribe?topic=t", &headers).await;
    }
    gw.sse(&format!("/v1/events/subscribe?topic=t&apikey={}", keys.a_anon), &[]).await;
}

#[tokio::test]
async fn a_header_wins_over_the_query_parameter() {
    let (gw, keys) = gateway().await;
    // Header: tenant a. Query: tenant b. The stream must be tenant a's.
    let mut sse = gw
        .sse(&format!("/v1/events/subscribe?topic=t&apikey={}", keys.b_anon), &[("apikey", &keys.a_anon)])
        .await;
    gw.publish(&keys.b_publish, "t", json!("from b")).await;
    let a_id = gw.publish(&keys.a_publish, "t", json!("from a")).await;
    let event = sse.next_event().await;
    assert_eq!((event.id(), &event.json()["data"]), (Some(a_id.as_str()), &json!("from a")));
    // A valid header also overrides garbage in the query.
    gw.sse("/v1/events/subscribe?topic=t&apikey=garbage", &[("x-api-key", &keys.a_anon)]).await;
}

#[tokio::test]
async fn privileged_credentials_are_refused_in_the_query_string_even_when_unknown() {
    let (gw, keys) = gateway().await;
    let token = jwt(&json!({"tenant": "a", "exp": now() + 60}), SECRET);
    let unknown_service = test_key("service");
    for credential in [&keys.a_service, &keys.a_publish, &unknown_service, &token] {
        let (status, body) = refusal(&gw, &format!("&apikey={credential}"), &[]).await;
        assert_eq!((status, code(&body)), (401, "credential_in_query"), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("header"), "the message names the header to use: {message}");
        assert!(!message.contains(credential.as_str()));
    }
}

/// URLs end up in proxy logs: a privileged key or a JWT in one is refused even when a header
/// carries a valid read-only key (the header would otherwise win).
#[tokio::test]
async fn a_privileged_query_credential_is_refused_even_beside_a_valid_header() {
    let (gw, keys) = gateway().await;
    let token = jwt(&json!({"tenant": "a", "exp": now() + 60}), SECRET);
    for credential in [&keys.a_service, &keys.a_publish, &token] {
        for header in ["apikey", "x-api-key", "authorization"] {
            let value = if header == "authorization" {
                format!("Bearer {}", keys.a_anon)
            } else {
                keys.a_anon.clone()
            };
            let (status, body) = refusal(&gw, &format!("&apikey={credential}"), &[(header, &value)]).await;
            assert_eq!((status, code(&body)), (401, "credential_in_query"), "{header}: {body}");
        }
    }
}

#[tokio::test]
async fn publish_refuses_a_key_in_the_query_string() {
    let (gw, keys) = gateway().await;
    let response = gw
        .http
        .post(gw.url(&format!("/v1/events/publish?apikey={}", keys.a_publish)))
        .json(&json!({"topic": "t", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "credential_in_query");
}

#[tokio::test]
async fn scopes_outside_the_route_get_403() {
    let (gw, keys) = gateway().await;
    for key in [&keys.a_publish, &keys.a_sdk] {
        let (status, body) = refusal(&gw, "", &[("apikey", key)]).await;
        assert_eq!((status, code(&body)), (403, "forbidden"), "{body}");
    }
    for key in [&keys.a_anon, &keys.a_sdk] {
        let response = gw
            .http
            .post(gw.url("/v1/events/publish"))
            .header("apikey", key.as_str())
            .json(&json!({"topic": "t", "data": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403);
        let body: Value = response.json().await.unwrap();
        assert_eq!(code(&body), "forbidden");
    }
    // The service key may do both.
    gw.sse("/v1/events/subscribe?topic=t", &[("apikey", &keys.a_service)]).await;
    gw.publish(&keys.a_service, "t", json!(1)).await;
}

#[tokio::test]
async fn a_valid_jwt_acts_for_its_tenant_only() {
    let (gw, keys) = gateway().await;
    let token = jwt(&json!({"tenant": "b", "exp": now() + 60, "nbf": now() - 5}), SECRET);
    let bearer = format!("Bearer {token}");
    let mut sse = gw.sse("/v1/events/subscribe?topic=t", &[("authorization", &bearer)]).await;
    gw.publish(&keys.a_publish, "t", json!("a")).await;
    let b_id = gw.publish(&bearer.replace("Bearer ", ""), "t", json!("b")).await;
    assert_eq!(sse.next_event().await.id(), Some(b_id.as_str()));
}

#[tokio::test]
async fn expired_forged_and_unsigned_jwts_are_refused() {
    let (gw, _keys) = gateway().await;
    let claims = json!({"tenant": "a", "exp": now() + 60});
    let cases = [
        jwt(&json!({"tenant": "a", "exp": now() - 1}), SECRET),
        jwt(&json!({"tenant": "a", "exp": now() + 60, "nbf": now() + 60}), SECRET),
        jwt(&claims, "another-secret"),
        sign_jwt(&json!({"alg": "none"}), &claims, SECRET),
        jwt(&json!({"tenant": "a"}), SECRET),
        jwt(&json!({"exp": now() + 60}), SECRET),
        "a.b.c".to_owned(),
    ];
    for token in cases {
        let bearer = format!("Bearer {token}");
        let (status, body) = refusal(&gw, "", &[("authorization", &bearer)]).await;
        assert_eq!((status, code(&body)), (401, "invalid_token"), "{token}: {body}");
    }
}

#[tokio::test]
async fn a_jwt_is_refused_when_no_secret_is_configured() {
    let gw = Gateway::start(&[]).await;
    let token = jwt(&json!({"tenant": "dev", "exp": now() + 60}), SECRET);
    let bearer = format!("Bearer {token}");
    let (status, body) = refusal(&gw, "", &[("authorization", &bearer)]).await;
    assert_eq!((status, code(&body)), (401, "invalid_token"));
    assert!(body["error"]["message"].as_str().unwrap().contains("not configured"));
}
