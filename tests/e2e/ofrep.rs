//! OFREP: evaluation shapes and errors as the protocol fixes them, the bulk ETag, rate limits,
//! change notifications — and the published OpenFeature providers end to end.

use std::time::Duration;

use changegate_e2e::{Gateway, npm_project, test_key};
use serde_json::{Value, json};

struct Setup {
    gw: Gateway,
    sdk: String,
    service: String,
    other_sdk: String,
}

async fn setup(args: &[&str]) -> Setup {
    let [sdk, service, other_sdk, other_service] = ["sdk", "service", "sdk", "service"].map(test_key);
    let file = json!([
        {"tenant": "acme", "scope": "sdk", "key": sdk, "environment": "production"},
        {"tenant": "acme", "scope": "service", "key": service},
        {"tenant": "other", "scope": "sdk", "key": other_sdk, "environment": "production"},
        {"tenant": "other", "scope": "service", "key": other_service},
    ]);
    let gw = Gateway::with_keys(&file, args).await;
    let s = Setup { gw, sdk, service, other_sdk };
    for flag in [
        json!({"key": "static", "enabled": true, "defaultVariant": "on"}),
        json!({"key": "disabled", "enabled": false}),
        json!({"key": "targeted", "enabled": true, "variants": {"a": "A", "b": "B"}, "defaultVariant": "a",
               "rules": [{"id": "nl", "conditions": [{"attribute": "country", "operator": "equals", "values": ["NL"]}],
                          "serve": {"variant": "b"}}]}),
        json!({"key": "split", "enabled": true, "variants": {"x": 1, "y": 2}, "defaultVariant": "x",
               "rules": [{"id": "half", "serve": {"rollout": [{"variant": "x", "weight": 50}, {"variant": "y", "weight": 50}]}}]}),
    ] {
        s.create_flag(&flag).await;
    }
    s
}

impl Setup {
    async fn create_flag(&self, flag: &Value) {
        let response = self
            .gw
            .http
            .post(self.gw.url("/v1/flags?environment=production"))
            .header("apikey", &self.service)
            .json(flag)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }

    async fn evaluate(
        &self,
        path: &str,
        key: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut request = self.gw.http.post(self.gw.url(path)).header("x-api-key", key).body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() }, headers)
    }
}

#[tokio::test]
async fn single_evaluations_answer_in_the_protocols_shapes() {
    let s = setup(&[]).await;
    let cases = [
        (
            "static",
            json!({}),
            json!({"key": "static", "value": true, "reason": "STATIC", "variant": "on", "metadata": {}}),
        ),
        (
            "disabled",
            json!({}),
            json!({"key": "disabled", "value": false, "reason": "DISABLED", "variant": "off", "metadata": {}}),
        ),
        (
            "targeted",
            json!({"country": "NL"}),
            json!({"key": "targeted", "value": "B", "reason": "TARGETING_MATCH", "variant": "b", "metadata": {}}),
        ),
        (
            "targeted",
            json!({"country": "DE"}),
            json!({"key": "targeted", "value": "A", "reason": "DEFAULT", "variant": "a", "metadata": {}}),
        ),
    ];
    for (key, context, expected) in cases {
        let body = json!({"context": context}).to_string();
        let (status, got, _) =
            s.evaluate(&format!("/ofrep/v1/evaluate/flags/{key}"), &s.sdk, &body, &[]).await;
        assert_eq!((status, got), (200, expected));
    }
    // A rollout is SPLIT, and the same targeting key always lands in the same share.
    let body = json!({"context": {"targetingKey": "user-42"}}).to_string();
    let (_, first, _) = s.evaluate("/ofrep/v1/evaluate/flags/split", &s.sdk, &body, &[]).await;
    assert_eq!(first["reason"], "SPLIT");
    for _ in 0..5 {
        let (_, again, _) = s.evaluate("/ofrep/v1/evaluate/flags/split", &s.sdk, &body, &[]).await;
        assert_eq!(again["variant"], first["variant"]);
    }
}

#[tokio::test]
async fn evaluation_errors_use_the_protocols_codes_and_statuses() {
    let s = setup(&[]).await;
    let cases = [
        ("split", "{\"context\": {}}", 400, json!({"key": "split", "errorCode": "TARGETING_KEY_MISSING"})),
        ("static", "{not json", 400, json!({"key": "static", "errorCode": "PARSE_ERROR"})),
        ("static", "{\"context\": 5}", 400, json!({"key": "static", "errorCode": "INVALID_CONTEXT"})),
        ("static", "{\"context\": null}", 400, json!({"key": "static", "errorCode": "INVALID_CONTEXT"})),
        ("static", "[1]", 400, json!({"key": "static", "errorCode": "PARSE_ERROR"})),
        ("ghost", "{}", 404, json!({"key": "ghost", "errorCode": "FLAG_NOT_FOUND"})),
    ];
    for (key, body, status, expected) in cases {
        let (got_status, got, _) =
            s.evaluate(&format!("/ofrep/v1/evaluate/flags/{key}"), &s.sdk, body, &[]).await;
        assert_eq!(got_status, status, "{key} {body}: {got}");
        assert_eq!((&got["key"], &got["errorCode"]), (&expected["key"], &expected["errorCode"]));
        assert!(got["errorDetails"].is_string());
    }
    // Another tenant's key does not see these flags.
    let (status, got, _) = s.evaluate("/ofrep/v1/evaluate/flags/static", &s.other_sdk, "{}", &[]).await;
    assert_eq!((status, got["errorCode"].as_str()), (404, Some("FLAG_NOT_FOUND")));
    let (status, _, _) = s.evaluate("/ofrep/v1/evaluate/flags/static", &test_key("sdk"), "{}", &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn bulk_evaluation_has_an_etag_answers_304_and_advertises_the_change_stream() {
    let s = setup(&[]).await;
    let body = json!({"context": {"targetingKey": "u1", "country": "NL"}}).to_string();
    let (status, bulk, headers) = s.evaluate("/ofrep/v1/evaluate/flags", &s.sdk, &body, &[]).await;
    assert_eq!(status, 200);
    let keys: Vec<&str> =
        bulk["flags"].as_array().unwrap().iter().map(|f| f["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["disabled", "split", "static", "targeted"]);
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let (status, empty, again) =
        s.evaluate("/ofrep/v1/evaluate/flags", &s.sdk, &body, &[("if-none-match", &etag)]).await;
    assert_eq!((status, empty), (304, Value::Null));
    assert_eq!(again["etag"].to_str().unwrap(), etag);
    let stream = &bulk["eventStreams"][0];
    assert_eq!((stream["type"].as_str(), stream["inactivityDelaySec"].as_u64()), (Some("sse"), Some(120)));

    // The advertised stream says when to refetch.
    let url = stream["url"].as_str().unwrap();
    let path = &url[url.find("/ofrep/").unwrap()..];
    let mut sse = s.gw.sse(path, &[]).await;
    let patch =
        s.gw.http
            .patch(s.gw.url("/v1/flags/static?environment=production"))
            .header("apikey", &s.service)
            .json(&json!({"enabled": false}))
            .send()
            .await
            .unwrap();
    assert_eq!(patch.status(), 200);
    let notice = sse.next_event().await;
    assert!(notice.id().is_some());
    let data = notice.json();
    assert_eq!(data["type"], "refetchEvaluation");
    assert!(data["etag"].is_string() && data["lastModified"].is_u64());
    // After the change the ETag differs, so the refetch gets the new values.
    let (status, changed, _) =
        s.evaluate("/ofrep/v1/evaluate/flags", &s.sdk, &body, &[("if-none-match", &etag)]).await;
    assert_eq!(status, 200);
    assert_eq!(changed["flags"][2]["reason"], "DISABLED");
}

#[tokio::test]
async fn evaluations_over_the_rate_limit_get_429_with_retry_after() {
    let s = setup(&["--ofrep-rate-limit", "3", "--ofrep-burst", "3"]).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let (status, _, headers) = s.evaluate("/ofrep/v1/evaluate/flags/static", &s.sdk, "{}", &[]).await;
        statuses.push(status);
        if status == 429 {
            retry_after = headers.get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        }
    }
    assert_eq!(&statuses[..3], [200, 200, 200]);
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    assert!(retry_after.is_some_and(|s| s >= 1));
    // Another key has its own budget.
    let (status, _, _) = s.evaluate("/ofrep/v1/evaluate/flags/static", &s.other_sdk, "{}", &[]).await;
    assert_eq!(status, 404);
}

/// `@openfeature/server-sdk` + `@openfeature/ofrep-provider` and `@openfeature/web-sdk` +
/// `@openfeature/ofrep-web-provider`, unmodified, evaluate through changegate and observe a
/// change made through the management API — the web provider through the SSE notification
/// alone (polling is off).
#[tokio::test]
async fn the_published_openfeature_providers_evaluate_and_follow_changes() {
    let s = setup(&[]).await;
    for flag in [
        json!({"key": "new-checkout", "enabled": true, "defaultVariant": "off",
               "rules": [{"id": "nl", "conditions": [{"attribute": "country", "operator": "in", "values": ["NL", "BE"]}],
                          "serve": {"variant": "on"}}]}),
        json!({"key": "banner", "enabled": true, "variants": {"summer": "summer", "winter": "winter"}, "defaultVariant": "summer"}),
    ] {
        s.create_flag(&flag).await;
    }
    let dir = npm_project("ofrep");
    let run = tokio::process::Command::new("node")
        .arg(dir.join("providers.mjs"))
        .env("BASE", &s.gw.base)
        .env("SDK_KEY", &s.sdk)
        .env("SERVICE_KEY", &s.service)
        .env("ENVIRONMENT", "production")
        .kill_on_drop(true)
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(60), run).await.expect("the providers finish").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "providers failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let steps: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 5, "{stdout}");
    assert_eq!(steps[4], json!({"provider": "web", "step": "after", "value": "winter"}));
}
