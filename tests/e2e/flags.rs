//! Feature flags end to end, on both engines: management API, the three stream dialects byte
//! for byte, resume, heartbeats, the auth matrix, isolation, and `If-Match`.

use std::time::Duration;

use changegate_e2e::{Gateway, Sse, TestDb, jwt, now, test_key};
use serde_json::{Value, json};

const SECRET: &str = "flags-test-secret";

struct Setup {
    gw: Gateway,
    service: String,
    sdk_prod: String,
    sdk_staging: String,
    stream_prod: String,
    anon: String,
    other_sdk: String,
    other_service: String,
    revoked_sdk: String,
    db: Option<TestDb>,
}

const FAST: &[&str] = &[
    "--jwt-secret",
    SECRET,
    "--heartbeat-flags-a",
    "300ms",
    "--heartbeat-flags-b",
    "300ms",
    "--heartbeat-flags-c",
    "300ms",
];

async fn memory() -> Setup {
    let [service, sdk_prod, sdk_staging, stream_prod, anon, other_sdk, other_service, revoked_sdk] =
        ["service", "sdk", "sdk", "stream", "anon", "sdk", "service", "sdk"].map(test_key);
    let file = json!([
        {"tenant": "acme", "scope": "service", "key": service},
        {"tenant": "acme", "scope": "sdk", "key": sdk_prod, "environment": "production"},
        {"tenant": "acme", "scope": "sdk", "key": sdk_staging, "environment": "staging"},
        {"tenant": "acme", "scope": "stream", "key": stream_prod, "environment": "production"},
        {"tenant": "acme", "scope": "anon", "key": anon},
        {"tenant": "acme", "scope": "sdk", "key": revoked_sdk, "environment": "production", "revoked": true},
        {"tenant": "other", "scope": "sdk", "key": other_sdk, "environment": "production"},
        {"tenant": "other", "scope": "service", "key": other_service},
    ]);
    let gw = Gateway::with_keys(&file, FAST).await;
    Setup {
        gw,
        service,
        sdk_prod,
        sdk_staging,
        stream_prod,
        anon,
        other_sdk,
        other_service,
        revoked_sdk,
        db: None,
    }
}

async fn postgres() -> Setup {
    let db = TestDb::new().await;
    db.cli(&["migrate"]);
    for tenant in ["acme", "other"] {
        db.cli(&["tenants", "create", tenant]);
        db.cli(&["environments", "create", "--tenant", tenant, "production"]);
    }
    db.cli(&["environments", "create", "--tenant", "acme", "staging"]);
    let key = |tenant: &str, env: Option<&str>, scope: &str| {
        let mut args = vec!["keys", "create", "--tenant", tenant, "--scope", scope];
        if let Some(env) = env {
            args.extend(["--environment", env]);
        }
        db.cli(&args).trim().trim_start_matches("key=").to_owned()
    };
    let revoked_sdk = key("acme", Some("production"), "sdk");
    let revoked_id = db
        .cli(&["keys", "list", "--tenant", "acme"])
        .split_whitespace()
        .find_map(|f| f.strip_prefix("id="))
        .unwrap()
        .to_owned();
    db.cli(&["keys", "revoke", &revoked_id]);
    let setup_keys = (
        key("acme", None, "service"),
        key("acme", Some("production"), "sdk"),
        key("acme", Some("staging"), "sdk"),
        key("acme", Some("production"), "stream"),
        key("acme", None, "anon"),
        key("other", Some("production"), "sdk"),
        key("other", None, "service"),
    );
    let gw = db.gateway(FAST).await;
    let (service, sdk_prod, sdk_staging, stream_prod, anon, other_sdk, other_service) = setup_keys;
    Setup {
        gw,
        service,
        sdk_prod,
        sdk_staging,
        stream_prod,
        anon,
        other_sdk,
        other_service,
        revoked_sdk,
        db: Some(db),
    }
}

impl Setup {
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.gw.http.request(method, self.gw.url(path)).header("apikey", key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(version) = if_match {
            request = request.header("if-match", version);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, body) = self.call(method, path, &self.service, body, None).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {body}");
        body
    }

    async fn stream(&self, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut sse = self.gw.sse(path, headers).await;
        assert!(sse.next_block().await.unwrap().raw.starts_with("retry: "));
        sse
    }

    async fn ensure_environments(&self) {
        if self.db.is_none() {
            // The memory engine created `production` and `staging` from the key file.
            let environments = self.admin("GET", "/v1/environments", None).await;
            assert_eq!(environments["environments"], json!(["production", "staging"]));
        }
    }
}

macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod memory_engine {
            $(#[tokio::test] async fn $name() { super::$name(super::memory().await).await; })*
        }
        mod postgres_engine {
            $(#[tokio::test] async fn $name() { super::$name(super::postgres().await).await; })*
        }
    };
}

both_engines!(
    dialect_a_sends_flag_and_rule_events_as_data_lines_with_comment_heartbeats,
    dialect_b_sends_the_full_flag_on_every_change_a_ping_and_a_deletion_event,
    dialect_c_sends_flag_and_config_updates_with_strictly_increasing_millisecond_ids,
    every_dialect_resumes_from_last_event_id,
    keys_see_only_their_environment_and_tenants_only_their_flags,
    concurrent_writes_with_the_same_if_match_let_exactly_one_win,
    invalid_flags_and_unknown_things_get_json_errors,
    a_rotated_key_works_during_its_grace_then_its_streams_close,
);

fn data(block: &changegate_e2e::Block) -> String {
    block.raw.lines().find_map(|l| l.strip_prefix("data: ")).unwrap().to_owned()
}

async fn dialect_a_sends_flag_and_rule_events_as_data_lines_with_comment_heartbeats(s: Setup) {
    s.ensure_environments().await;
    let mut sse = s.stream("/api/v1/stream", &[("x-api-key", &s.sdk_prod)]).await;
    s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": "dark-mode", "enabled": true})))
        .await;
    s.admin("PATCH", "/v1/flags/dark-mode?environment=production", Some(json!({"name": "Dark mode"}))).await;
    let rule = json!({"id": "beta-users", "conditions": [{"attribute": "country", "operator": "in", "values": ["NL"]}],
                      "serve": {"variant": "on"}});
    s.admin("POST", "/v1/flags/dark-mode/rules?environment=production", Some(rule.clone())).await;
    s.admin("PUT", "/v1/flags/dark-mode/rules/beta-users?environment=production", Some(rule)).await;
    s.admin("DELETE", "/v1/flags/dark-mode/rules/beta-users?environment=production", None).await;
    s.admin("DELETE", "/v1/flags/dark-mode?environment=production", None).await;
    let expected =
        ["flag.created", "flag.updated", "rule.created", "rule.updated", "rule.deleted", "flag.deleted"];
    for (i, kind) in expected.iter().enumerate() {
        let event = sse.next_event().await;
        assert_eq!(event.event(), None, "no event: field");
        assert!(event.id().is_some());
        let line = data(&event);
        let parsed: Value = serde_json::from_str(&line).unwrap();
        let timestamp = parsed["timestamp"].as_u64().unwrap();
        assert!(timestamp.abs_diff(now()) < 60, "unix seconds");
        assert_eq!(
            line,
            format!(
                r#"{{"type":"{kind}","flag_key":"dark-mode","environment_id":"production","version":{},"timestamp":{timestamp}}}"#,
                i + 1
            )
        );
    }
    assert_eq!(sse.next_block().await.unwrap().raw, ": heartbeat\n\n");
}

async fn dialect_b_sends_the_full_flag_on_every_change_a_ping_and_a_deletion_event(s: Setup) {
    let bearer = format!("Bearer {}", s.sdk_prod);
    let mut sse = s.stream("/stream", &[("authorization", &bearer), ("accept", "text/event-stream")]).await;
    s.admin("POST", "/v1/segments?environment=production", Some(json!({"key": "beta"}))).await;
    let created = s
        .admin(
            "POST",
            "/v1/flags?environment=production",
            Some(json!({"key": "checkout", "variants": {"a": "x", "b": "y"}})),
        )
        .await;
    let event = sse.next_event().await;
    assert_eq!(event.event(), Some("flag.updated"));
    assert_eq!(event.json(), created, "the data is the FlagDto GET /v1/flags/{{key}} returns");
    let rule = json!({"id": "r", "segments": ["beta"], "serve": {"rollout": [{"variant": "a", "weight": 50}, {"variant": "b", "weight": 50}]}});
    s.admin("POST", "/v1/flags/checkout/rules?environment=production", Some(rule)).await;
    let with_rule = sse.next_event().await.json();
    assert_eq!(with_rule["rules"][0]["id"], "r");
    assert_eq!(with_rule["version"], 2);
    // A change to a segment the flag uses streams the flag again.
    s.admin("PUT", "/v1/segments/beta?environment=production", Some(json!({"name": "Beta testers"}))).await;
    let touched = sse.next_event().await;
    assert_eq!((touched.event(), touched.json()["key"].as_str()), (Some("flag.updated"), Some("checkout")));
    let current = s.admin("GET", "/v1/flags/checkout?environment=production", None).await;
    assert_eq!(touched.json(), current);
    s.admin("DELETE", "/v1/flags/checkout?environment=production", None).await;
    let deleted = sse.next_event().await;
    assert_eq!(deleted.event(), Some("flag.deleted"));
    assert_eq!(deleted.json(), json!({"key": "checkout", "environment": "production", "version": 3}));
    let ping = sse.next_block().await.unwrap();
    assert_eq!(ping.event(), Some("ping"));
    let timestamp = ping.json()["timestamp"].as_str().unwrap().to_owned();
    assert!(timestamp.len() == 20 && timestamp.ends_with('Z'), "RFC 3339 seconds: {timestamp}");
}

async fn dialect_c_sends_flag_and_config_updates_with_strictly_increasing_millisecond_ids(s: Setup) {
    let mut sse = s.stream("/api/v1/flags/events", &[("x-api-key", &s.sdk_prod)]).await;
    // Several changes inside one millisecond must still get distinct, increasing ids.
    for i in 0..5 {
        s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": format!("f{i}")}))).await;
    }
    s.admin("POST", "/v1/segments?environment=production", Some(json!({"key": "vip"}))).await;
    let mut previous = 0u64;
    for i in 0..6 {
        let event = sse.next_event().await;
        let id: u64 = event.id().unwrap().parse().unwrap();
        assert!(id > previous, "ids strictly increase");
        assert!(id.abs_diff(now() * 1000) < 60_000, "epoch milliseconds");
        previous = id;
        let lines: Vec<&str> = event.raw.lines().collect();
        if i < 5 {
            assert_eq!(lines[0], "event: flag-updated");
            let body = event.json();
            assert_eq!(body["flagKey"], format!("f{i}"));
            let ts = body["timestamp"].as_str().unwrap();
            assert!(ts.len() == 24 && ts.ends_with('Z'), "ISO 8601 with ms: {ts}");
        } else {
            assert_eq!(lines[0], "event: config-updated");
            assert_eq!(event.json()["reason"], "segment-modified");
        }
    }
    let heartbeat = sse.next_block().await.unwrap();
    assert_eq!(heartbeat.raw, "event: heartbeat\ndata: {}\n\n");
}

async fn every_dialect_resumes_from_last_event_id(s: Setup) {
    let bearer = format!("Bearer {}", s.sdk_prod);
    let mut a = s.stream("/api/v1/stream", &[("x-api-key", &s.sdk_prod)]).await;
    let mut b = s.stream("/stream", &[("authorization", &bearer)]).await;
    let mut c = s.stream("/api/v1/flags/events", &[("x-api-key", &s.sdk_prod)]).await;
    s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": "one"}))).await;
    let (a_id, b_id) =
        (a.next_event().await.id().unwrap().to_owned(), b.next_event().await.id().unwrap().to_owned());
    let c_id = c.next_event().await.id().unwrap().to_owned();
    drop((a, b, c));
    tokio::time::sleep(Duration::from_millis(5)).await;
    s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": "two"}))).await;
    let mut a = s.stream("/api/v1/stream", &[("x-api-key", &s.sdk_prod), ("last-event-id", &a_id)]).await;
    assert_eq!(serde_json::from_str::<Value>(&data(&a.next_event().await)).unwrap()["flag_key"], "two");
    let mut b = s.stream("/stream", &[("authorization", &bearer), ("last-event-id", &b_id)]).await;
    assert_eq!(b.next_event().await.json()["key"], "two");
    let mut c =
        s.stream("/api/v1/flags/events", &[("x-api-key", &s.sdk_prod), ("last-event-id", &c_id)]).await;
    // Dialect C resumes by time: the event it saw last may come again; "two" must come.
    let mut keys = Vec::new();
    loop {
        let event = c.next_event().await;
        let id: u64 = event.id().unwrap().parse().unwrap();
        assert!(id > c_id.parse::<u64>().unwrap(), "new ids continue after the one resumed from");
        keys.push(event.json()["flagKey"].as_str().unwrap().to_owned());
        if keys.last().is_some_and(|k| k == "two") {
            break;
        }
    }
    assert!(keys.len() <= 2, "{keys:?}");
}

async fn keys_see_only_their_environment_and_tenants_only_their_flags(s: Setup) {
    let token = format!("Bearer {}", jwt(&json!({"tenant": "acme", "exp": now() + 60}), SECRET));
    let mut all = s.stream("/api/v1/stream", &[("authorization", &token)]).await;
    let mut prod = s.stream("/api/v1/stream", &[("x-api-key", &s.stream_prod)]).await;
    let mut staging = s.stream("/api/v1/stream", &[("x-api-key", &s.sdk_staging)]).await;
    let mut other = s.stream("/api/v1/stream", &[("x-api-key", &s.other_sdk)]).await;
    s.admin("POST", "/v1/flags?environment=staging", Some(json!({"key": "in-staging"}))).await;
    s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": "in-prod"}))).await;
    // The other tenant writes a flag with the same key in an environment with the same name.
    let (status, _) = s
        .call(
            "POST",
            "/v1/flags?environment=production",
            &s.other_service,
            Some(json!({"key": "in-prod"})),
            None,
        )
        .await;
    assert_eq!(status, 201);
    let key_of =
        |e: changegate_e2e::Block| serde_json::from_str::<Value>(&data(&e)).unwrap()["flag_key"].clone();
    assert_eq!(key_of(all.next_event().await), "in-staging");
    assert_eq!(key_of(all.next_event().await), "in-prod");
    assert_eq!(key_of(prod.next_event().await), "in-prod");
    assert_eq!(key_of(staging.next_event().await), "in-staging");
    assert_eq!(key_of(other.next_event().await), "in-prod");
    for sse in [&mut all, &mut prod, &mut staging, &mut other] {
        sse.assert_quiet(Duration::from_millis(200)).await;
    }
    // The auth matrix.
    let refused = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let gw = &s.gw;
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            gw.try_sse(path, &headers).await.err().expect("refused")
        }
    };
    let (status, body) = refused("/stream", vec![]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("missing_credentials")));
    let (status, body) =
        refused("/stream", vec![("authorization", format!("Bearer {}", s.revoked_sdk))]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("revoked_api_key")));
    let (status, body) = refused("/api/v1/flags/events", vec![("x-api-key", test_key("sdk"))]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    let (status, _) = refused("/api/v1/stream", vec![("x-api-key", s.anon.clone())]).await;
    assert_eq!(status, 403, "an anon key reads no flags");
    // Management: an sdk key cannot write; a key cannot reach another environment.
    let (status, _) = s
        .call("POST", "/v1/flags?environment=production", &s.sdk_prod, Some(json!({"key": "x"})), None)
        .await;
    assert_eq!(status, 403);
    let (status, body) =
        s.call("GET", "/v1/flags?environment=production", &s.other_service, None, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["flags"].as_array().unwrap().len(), 1, "the other tenant sees only its own flag");
}

async fn concurrent_writes_with_the_same_if_match_let_exactly_one_win(s: Setup) {
    s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": "race"}))).await;
    let patch = |name: &'static str| {
        s.call(
            "PATCH",
            "/v1/flags/race?environment=production",
            &s.service,
            Some(json!({"name": name})),
            Some("\"1\""),
        )
    };
    let (first, second) = tokio::join!(patch("first"), patch("second"));
    let mut statuses = [first.0, second.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 412]);
    let loser = if first.0 == 412 { &first.1 } else { &second.1 };
    assert_eq!(loser["error"]["code"], "version_mismatch");
    let current = s.admin("GET", "/v1/flags/race?environment=production", None).await;
    assert_eq!(current["version"], 2);
    let winner = if first.0 == 200 { "first" } else { "second" };
    assert_eq!(current["name"], winner);
}

async fn invalid_flags_and_unknown_things_get_json_errors(s: Setup) {
    let cases = [
        ("POST", "/v1/flags?environment=production", Some(json!({"key": "bad key"})), 400, "invalid_flag"),
        (
            "POST",
            "/v1/flags?environment=production",
            Some(json!({"key": "k", "variants": {"a": 1, "b": "x"}})),
            400,
            "invalid_flag",
        ),
        (
            "POST",
            "/v1/flags?environment=production",
            Some(json!({"key": "k", "extra": 1})),
            400,
            "invalid_json",
        ),
        ("POST", "/v1/flags", Some(json!({"key": "k"})), 400, "invalid_query"),
        ("POST", "/v1/flags?environment=nowhere", Some(json!({"key": "k"})), 404, "not_found"),
        ("GET", "/v1/flags/ghost?environment=production", None, 404, "not_found"),
        ("DELETE", "/v1/segments/ghost?environment=production", None, 404, "not_found"),
        (
            "POST",
            "/v1/flags/ghost/rules?environment=production",
            Some(json!({"id": "r", "serve": {"variant": "on"}})),
            404,
            "not_found",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, json) = s.call(method, path, &s.service, body, None).await;
        assert_eq!((got, json["error"]["code"].as_str()), (status, Some(code)), "{method} {path}: {json}");
    }
    s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": "k"}))).await;
    let (status, body) =
        s.call("POST", "/v1/flags?environment=production", &s.service, Some(json!({"key": "k"})), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")));
    let (status, body) = s
        .call(
            "PATCH",
            "/v1/flags/k?environment=production",
            &s.service,
            Some(json!({"enabled": true})),
            Some("nope"),
        )
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_if_match")));
}

#[tokio::test]
async fn a_flag_changed_with_sql_streams_too() {
    let s = postgres().await;
    let db = s.db.as_ref().unwrap();
    let mut sse = s.stream("/api/v1/stream", &[("x-api-key", &s.sdk_prod)]).await;
    s.admin("POST", "/v1/flags?environment=production", Some(json!({"key": "by-sql"}))).await;
    assert_eq!(
        serde_json::from_str::<Value>(&data(&sse.next_event().await)).unwrap()["type"],
        "flag.created"
    );
    db.client
        .batch_execute(
            "update realtime.flag_state
             set state = jsonb_set(jsonb_set(state, '{flags,by-sql,enabled}', 'true'), '{flags,by-sql,version}', '2')
             where tenant = 'acme' and environment = 'production'",
        )
        .await
        .unwrap();
    let event: Value = serde_json::from_str(&data(&sse.next_event().await)).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["flag_key"].as_str(), event["version"].as_u64()),
        (Some("flag.updated"), Some("by-sql"), Some(2))
    );
    let flag = s.admin("GET", "/v1/flags/by-sql?environment=production", None).await;
    assert_eq!(flag["enabled"], true);
}

/// The id changegate gives a key: `key_` + the first 6 bytes of its SHA-256, in hex.
fn key_id(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    format!("key_{}", digest[..6].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

async fn a_rotated_key_works_during_its_grace_then_its_streams_close(s: Setup) {
    let mut old_stream = s.stream("/api/v1/flags/events", &[("x-api-key", &s.sdk_prod)]).await;
    let mut observer = s.stream("/api/v1/flags/events", &[("x-api-key", &s.stream_prod)]).await;
    let mut staging = s.stream("/api/v1/flags/events", &[("x-api-key", &s.sdk_staging)]).await;
    let (status, rotated) = s
        .call(
            "POST",
            &format!("/v1/keys/{}/rotate", key_id(&s.sdk_prod)),
            &s.service,
            Some(json!({"grace": "1500ms"})),
            None,
        )
        .await;
    assert_eq!(status, 201, "{rotated}");
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert!(new_key.starts_with("flc_sdk_") && new_key != s.sdk_prod);
    // Streams of the environment hear of it — as `config-updated`, and as the `api-key-rotated`
    // event Flipswitch's SDK reads, naming when the old key stops — another environment's do not.
    let expires = rotated["previousKeyExpiresAt"].as_str().map(str::to_owned);
    for sse in [&mut old_stream, &mut observer] {
        let event = sse.next_event().await;
        assert_eq!(event.event(), Some("config-updated"));
        assert_eq!(event.json()["reason"], "api-key-rotated");
        let rotation = sse.next_event().await;
        assert_eq!(rotation.event(), Some("api-key-rotated"));
        let valid_until = rotation.json()["validUntil"].as_str().unwrap().to_owned();
        assert!(valid_until.ends_with('Z') && valid_until.len() == 24, "{valid_until}");
        assert_eq!(Some(&valid_until), expires.as_ref(), "the old key's end, as the rotation answered it");
    }
    staging.assert_quiet(Duration::from_millis(200)).await;
    // In the grace period both keys work.
    s.gw.sse("/api/v1/flags/events", &[("x-api-key", &s.sdk_prod)]).await;
    s.gw.sse("/api/v1/flags/events", &[("x-api-key", &new_key)]).await;
    // When it ends, the old key's streams close and the old key is refused.
    let closed = async { while old_stream.next_block().await.is_some() {} };
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the old key's stream closed after the grace");
    let (status, body) =
        s.gw.try_sse("/api/v1/flags/events", &[("x-api-key", &s.sdk_prod)]).await.err().expect("refused");
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("revoked_api_key")));
    s.gw.sse("/api/v1/flags/events", &[("x-api-key", &new_key)]).await;
    observer.assert_quiet(Duration::from_millis(100)).await;
}

/// Corrupt stored data is the server's failure, not the caller's: a 500 whose body names only a
/// log id — the decoder's text, which could show stored data, goes to the log alone — and writes
/// are refused rather than overwriting what cannot be read.
#[tokio::test]
async fn corrupt_stored_flags_are_a_500_with_a_log_id_and_no_internals() {
    let s = postgres().await;
    let db = s.db.as_ref().unwrap();
    db.client
        .batch_execute(
            "insert into realtime.flag_state (tenant, environment, state)
             values ('acme', 'production', '{\"flags\": \"secret-garbage\"}')
             on conflict (tenant, environment) do update set state = excluded.state",
        )
        .await
        .unwrap();
    for (method, body) in [("GET", None), ("POST", Some(json!({"key": "new-flag"})))] {
        let (status, answer) =
            s.call(method, "/v1/flags?environment=production", &s.service, body, None).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (500, Some("internal")), "{method}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("err-")
                && !message.contains("secret-garbage")
                && !message.contains("invalid type"),
            "{message}"
        );
    }
    let stored: String = db
        .client
        .query_one("select state::text from realtime.flag_state where tenant = 'acme' and environment = 'production'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(stored.contains("secret-garbage"), "the unreadable state was left alone: {stored}");
}

/// The same for a stored key that cannot be read (a tenant id the gateway would never accept,
/// written past it): the caller did nothing wrong, so it is a 500 with a log id, not a 400.
#[tokio::test]
async fn a_corrupt_stored_key_is_a_500_with_a_log_id_not_a_400() {
    use sha2::Digest;
    let s = postgres().await;
    let db = s.db.as_ref().unwrap();
    let key = test_key("anon");
    let hash = sha2::Sha256::digest(key.as_bytes()).to_vec();
    // Written past the gateway and the schema's own check (an operator's hand edit, say).
    db.client
        .batch_execute(
            "alter table realtime.tenants drop constraint tenants_id_check;
             insert into realtime.tenants (id) values ('not a tenant!')",
        )
        .await
        .unwrap();
    db.client
        .execute(
            "insert into realtime.api_keys (id, tenant, scope, hash, prefix)
             values ('corrupt', 'not a tenant!', 'anon', $1, 'flc_anon_x')",
            &[&hash],
        )
        .await
        .unwrap();
    let (status, body) =
        s.gw.try_sse(&format!("/v1/events/subscribe?topic=*&apikey={key}"), &[])
            .await
            .err()
            .expect("refused");
    assert_eq!((status, body["error"]["code"].as_str()), (500, Some("internal")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("err-") && !message.contains("not a tenant"), "{message}");
}
