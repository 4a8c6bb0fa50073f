//! The seed services' own published SDKs, unmodified, pointed at changegate: they initialise,
//! evaluate, follow a management-API change through their own stream with polling off, and
//! survive a gateway restart on the same port — on the memory engine and on PostgreSQL.

use std::process::Stdio;
use std::time::Duration;

use changegate_e2e::{Gateway, PATIENCE, TestDb, test_key, venv_python};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ENVIRONMENT: &str = "production";

/// The flags the SDK scripts expect: a boolean and a string flag with a rule.
async fn create_flags(gw: &Gateway, service: &str, banner_default: &str) {
    let flags = [
        json!({"key": "beta", "enabled": true, "defaultVariant": "on"}),
        json!({"key": "banner", "enabled": true, "defaultVariant": banner_default,
               "variants": {"summer": "summer", "winter": "winter", "nl": "nl"},
               "rules": [{"id": "nl", "conditions": [{"attribute": "country", "operator": "equals", "values": ["NL"]}],
                          "serve": {"variant": "nl"}}]}),
    ];
    for flag in flags {
        let url = gw.url(&format!("/v1/flags?environment={ENVIRONMENT}"));
        let response = gw.http.post(url).header("apikey", service).json(&flag).send().await.unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
}

/// How a test restarts the gateway between the script's two phases.
type Restart<'a> =
    Box<dyn FnOnce(Gateway) -> std::pin::Pin<Box<dyn std::future::Future<Output = Gateway> + 'a>> + 'a>;

/// The SDKs under test: the script that drives each, and the module it imports.
#[derive(Clone, Copy)]
enum Sdk {
    Togul,
    Flipswitch,
    Featureflip,
}

impl Sdk {
    fn script(self) -> &'static str {
        match self {
            Self::Togul => "togul_check.py",
            Self::Flipswitch => "flipswitch_check.py",
            Self::Featureflip => "featureflip_check.py",
        }
    }

    fn module(self) -> &'static str {
        match self {
            Self::Togul => "togul",
            Self::Flipswitch => "flipswitch",
            Self::Featureflip => "featureflip",
        }
    }
}

/// Runs `sdk`'s script against `gw`, restarting the gateway with `restart` when the script asks;
/// returns the script's observations and the gateway it ended on.
async fn run_script(
    sdk_under_test: Sdk,
    gw: Gateway,
    sdk: &str,
    service: &str,
    extra_env: &[(&str, String)],
    restart: Restart<'_>,
) -> (Vec<Value>, Gateway) {
    let Some(python) = venv_python(sdk_under_test.module()) else { return (Vec::new(), gw) };
    let script = sdk_under_test.script();
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdks").join(script);
    let mut child = tokio::process::Command::new(python)
        .arg(path)
        .env("BASE", &gw.base)
        .env("SDK_KEY", sdk)
        .env("SERVICE_KEY", service)
        .env("ENVIRONMENT", ENVIRONMENT)
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut gw = Some(gw);
    let mut restart = Some(restart);
    loop {
        let line = tokio::time::timeout(PATIENCE * 3, lines.next_line())
            .await
            .expect("the SDK script answers in time");
        let Some(line) = line.unwrap() else { break };
        let step: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if step["step"] == "restart" {
            let (old, restart) = (gw.take().unwrap(), restart.take().unwrap());
            gw = Some(restart(old).await);
            input.write_all(b"go\n").await.unwrap();
        }
        seen.push(step);
    }
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "the SDK failed after {seen:?}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (seen, gw.expect("the gateway outlives the script"))
}

async fn assert_steps(sdk: Sdk, steps: &[Value], gw: &Gateway) {
    if steps.is_empty() {
        return; // skipped (said so)
    }
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["boolean", "string", "missing", "after-change", "restart", "after-restart", "done"],
        "{steps:?}"
    );
    assert_eq!(steps[3]["value"], "winter");
    assert_eq!(steps[5]["value"], "summer");
    if matches!(sdk, Sdk::Featureflip) {
        // The SDK posted its evaluation events to `/v1/sdk/events` (the last one as it closed).
        gw.metrics_when("the SDK's analytics are counted", |text| {
            text.lines().any(|l| l.starts_with("changegate_sdk_events_total{kind=\"evaluation\"}"))
        })
        .await;
    }
}

async fn on_the_memory_engine(sdk_under_test: Sdk) {
    let (sdk, service) = (test_key("sdk"), test_key("service"));
    let keys = json!([
        {"tenant": "acme", "scope": "sdk", "key": sdk, "environment": ENVIRONMENT},
        {"tenant": "acme", "scope": "service", "key": service},
    ]);
    let gw = Gateway::with_keys(&keys, &["--retry", "300ms"]).await;
    create_flags(&gw, &service, "summer").await;
    let keys_for_restart = keys.clone();
    let service_for_restart = service.clone();
    let restart: Restart<'_> = Box::new(move |old: Gateway| {
        Box::pin(async move {
            let listen = old.base.trim_start_matches("http://").to_owned();
            drop(old);
            let file = std::env::temp_dir().join(format!("changegate-sdk-keys-{}.json", std::process::id()));
            std::fs::write(&file, keys_for_restart.to_string()).unwrap();
            let path = file.to_string_lossy().into_owned();
            let gw = Gateway::start_at(&listen, &["--keys", &path, "--retry", "300ms"], &[]).await;
            // The memory engine starts empty: the flags come back as an operator would restore them.
            create_flags(&gw, &service_for_restart, "winter").await;
            gw
        })
    });
    let (steps, gw) = run_script(sdk_under_test, gw, &sdk, &service, &[], restart).await;
    assert_steps(sdk_under_test, &steps, &gw).await;
}

async fn on_postgresql(sdk_under_test: Sdk) {
    let db = TestDb::new().await;
    db.setup(&["acme"], "service");
    db.cli(&["environments", "create", "--tenant", "acme", ENVIRONMENT]);
    let out = db.cli(&["keys", "create", "--tenant", "acme", "--environment", ENVIRONMENT, "--scope", "sdk"]);
    let sdk = out.trim().strip_prefix("key=").unwrap().to_owned();
    let service = db.key("acme", "service");
    let gw = db.gateway(&["--retry", "300ms"]).await;
    create_flags(&gw, &service, "summer").await;
    let db_ref = &db;
    let restart: Restart<'_> = Box::new(move |old: Gateway| {
        Box::pin(async move {
            let listen = old.base.trim_start_matches("http://").to_owned();
            drop(old);
            tokio::time::sleep(Duration::from_millis(100)).await;
            db_ref.gateway_at(&listen, &["--retry", "300ms"]).await
        })
    });
    let (steps, gw) = run_script(sdk_under_test, gw, &sdk, &service, &[], restart).await;
    assert_steps(sdk_under_test, &steps, &gw).await;
}

#[tokio::test]
async fn togul_sdk_evaluates_and_follows_changes_on_the_memory_engine() {
    on_the_memory_engine(Sdk::Togul).await;
}

#[tokio::test]
async fn togul_sdk_evaluates_and_follows_changes_on_postgresql() {
    on_postgresql(Sdk::Togul).await;
}

#[tokio::test]
async fn flipswitch_sdk_evaluates_and_follows_changes_on_the_memory_engine() {
    on_the_memory_engine(Sdk::Flipswitch).await;
}

#[tokio::test]
async fn flipswitch_sdk_evaluates_and_follows_changes_on_postgresql() {
    on_postgresql(Sdk::Flipswitch).await;
}

#[tokio::test]
async fn featureflip_sdk_evaluates_and_follows_changes_on_the_memory_engine() {
    on_the_memory_engine(Sdk::Featureflip).await;
}

#[tokio::test]
async fn featureflip_sdk_evaluates_and_follows_changes_on_postgresql() {
    on_postgresql(Sdk::Featureflip).await;
}

/// The users the rollout test evaluates: `targetingKey` / `user_id` `user-<i>`, a third of them
/// in NL, a fifth on the beta plan (the same contexts as `featureflip_check.py`'s).
fn rollout_context(i: usize, key_name: &str) -> Value {
    let mut context = json!({ key_name: format!("user-{i}") });
    if i.is_multiple_of(3) {
        context["country"] = json!("NL");
    }
    if i.is_multiple_of(5) {
        context["plan"] = json!("beta");
    }
    context
}

#[tokio::test]
async fn a_rollout_serves_each_user_the_same_variant_in_the_featureflip_sdk_ofrep_and_togul() {
    const USERS: usize = 10_000;
    let (sdk, service) = (test_key("sdk"), test_key("service"));
    let keys = json!([
        {"tenant": "acme", "scope": "sdk", "key": sdk, "environment": ENVIRONMENT},
        {"tenant": "acme", "scope": "service", "key": service},
    ]);
    let gw = Gateway::with_keys(&keys, &[]).await;
    let segment =
        json!({"key": "beta", "conditions": [{"attribute": "plan", "operator": "in", "values": ["beta"]}]});
    let response =
        gw.http.post(gw.url("/v1/segments?environment=production")).header("apikey", &service).json(&segment);
    assert_eq!(response.send().await.unwrap().status(), 201);
    // Two rollouts: one behind a condition and a segment, one for everyone else.
    let flag = json!({"key": "rollout", "enabled": true, "defaultVariant": "c",
    "variants": {"a": "A", "b": "B", "c": "C"},
    "rules": [
        {"id": "beta-nl", "priority": 1, "segments": ["beta"],
         "conditions": [{"attribute": "country", "operator": "equals", "values": ["NL"]}],
         "serve": {"rollout": [{"variant": "a", "weight": 10}, {"variant": "b", "weight": 90}]}},
        {"id": "everyone", "priority": 2,
         "serve": {"rollout": [{"variant": "a", "weight": 50}, {"variant": "b", "weight": 30}, {"variant": "c", "weight": 20}]}},
    ]});
    let response =
        gw.http.post(gw.url("/v1/flags?environment=production")).header("apikey", &service).json(&flag);
    assert_eq!(response.send().await.unwrap().status(), 201);

    let restart: Restart<'_> = Box::new(|gw| Box::pin(async move { gw }));
    let users = [("ROLLOUT_USERS", USERS.to_string())];
    let (steps, gw) = run_script(Sdk::Featureflip, gw, &sdk, &service, &users, restart).await;
    let Some(local) = steps.first() else { return }; // skipped (said so)
    let local: Vec<String> = serde_json::from_value(local["variants"].clone()).unwrap();
    assert_eq!(local.len(), USERS);

    // The server's answers for the same users, through OFREP and through Togul's evaluate API.
    let (gw, sdk) = (&gw, sdk.as_str());
    let server: Vec<(String, String)> = futures_util::stream::iter(0..USERS)
        .map(|i| async move {
            let evaluate = |path: &'static str, body: Value| async move {
                let response =
                    gw.http.post(gw.url(path)).header("x-api-key", sdk).json(&body).send().await.unwrap();
                assert_eq!(response.status(), 200, "{path}");
                response.json::<Value>().await.unwrap()
            };
            let ofrep = evaluate(
                "/ofrep/v1/evaluate/flags/rollout",
                json!({"context": rollout_context(i, "targetingKey")}),
            )
            .await;
            let togul = evaluate(
                "/api/v1/evaluate",
                json!({"flag_key": "rollout", "context": rollout_context(i, "user_id")}),
            )
            .await;
            // Togul answers the value; the variants are named after their values' lower case.
            (ofrep["variant"].as_str().unwrap().to_owned(), togul["value"].as_str().unwrap().to_lowercase())
        })
        .buffered(16)
        .collect()
        .await;
    let differ: Vec<_> = (0..USERS)
        .filter(|&i| local[i] != server[i].0 || local[i] != server[i].1)
        .map(|i| (i, &local[i], &server[i]))
        .take(10)
        .collect();
    assert!(differ.is_empty(), "users served differently (user, SDK, (OFREP, Togul)): {differ:?}");
    // Not a vacuous match: every variant is served, in about its share (beta-NL users, 1 in
    // 15, take a/b 10/90; everyone else a/b/c 50/30/20).
    let count = |v: &str| local.iter().filter(|l| *l == v).count();
    let (a, b, c) = (count("a"), count("b"), count("c"));
    assert!(
        (4_400..5_000).contains(&a) && (3_100..3_700).contains(&b) && (1_650..2_050).contains(&c),
        "{a} {b} {c}"
    );
}

#[tokio::test]
async fn featureflip_routes_refuse_bad_input_and_never_show_another_environment_or_tenant() {
    let (prod, staging, other, service) =
        (test_key("sdk"), test_key("sdk"), test_key("sdk"), test_key("service"));
    let keys = json!([
        {"tenant": "acme", "scope": "sdk", "key": prod, "environment": "production"},
        {"tenant": "acme", "scope": "sdk", "key": staging, "environment": "staging"},
        {"tenant": "globex", "scope": "sdk", "key": other, "environment": "production"},
        {"tenant": "acme", "scope": "service", "key": service},
    ]);
    let gw = Gateway::with_keys(&keys, &[]).await;
    for environment in ["production", "staging"] {
        let flag = json!({"key": format!("only-{environment}"), "enabled": true, "defaultVariant": "on"});
        let url = gw.url(&format!("/v1/flags?environment={environment}"));
        let response = gw.http.post(url).header("apikey", &service).json(&flag).send().await.unwrap();
        assert_eq!(response.status(), 201);
    }
    let get = |path: &str, key: &str| {
        let request = gw.http.get(gw.url(path));
        let request = if key.is_empty() { request } else { request.header("authorization", key) };
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let keys_of = |body: &Value| -> Vec<String> {
        body["flags"].as_array().unwrap().iter().map(|f| f["key"].as_str().unwrap().to_owned()).collect()
    };
    // Each key sees its own environment's flags only; another tenant's key sees none of them.
    let (status, body) = get("/v1/sdk/flags", &prod).await;
    assert_eq!((status, keys_of(&body)), (200, vec!["only-production".to_owned()]));
    let (status, body) = get("/v1/sdk/flags", &staging).await;
    assert_eq!((status, keys_of(&body)), (200, vec!["only-staging".to_owned()]));
    let (status, body) = get("/v1/sdk/flags", &other).await;
    assert!(status == 404 || keys_of(&body).is_empty(), "{status} {body}");
    // Asking for another environment, a flag of another environment, or no key at all.
    let (status, body) = get("/v1/sdk/flags?environment=production", &staging).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
    let (status, body) = get("/v1/sdk/flags/only-production", &staging).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");
    let (status, body) = get("/v1/sdk/flags/only-production", &other).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get("/v1/sdk/flags", "").await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("missing_credentials")), "{body}");
    let (status, body) = get("/v1/sdk/flags", "flc_sdk_revoked0000000000000000000000").await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = get("/v1/sdk/flags/only-production", &prod).await;
    assert_eq!(
        (status, body["key"].as_str(), body["type"].as_str()),
        (200, Some("only-production"), Some("boolean"))
    );

    // Analytics: the SDK's batch shape only, within the JSON body limit.
    let post = |body: reqwest::Body| {
        let request = gw.http.post(gw.url("/v1/sdk/events")).header("authorization", &prod).body(body);
        async move {
            let response = request.header("content-type", "application/json").send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    assert_eq!(
        post(r#"{"events":[{"type":"Evaluation","flagKey":"x"}]}"#.into()).await,
        (204, String::new())
    );
    for bad in ["not json", r#"{"events": 3}"#, r#"{"events": [1]}"#, r#"[]"#] {
        let (status, text) = post(bad.into()).await;
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status, 400, "{bad}: {text}");
        assert!(body["error"]["code"].is_string(), "{bad}: {text}");
    }
    let huge = format!(r#"{{"events":[{{"type":"Custom","data":"{}"}}]}}"#, "x".repeat(2 << 20));
    let (status, text) = post(huge.into()).await;
    assert_eq!(status, 413, "{text}");

    // The stream: a snapshot of its own environment, then only its own environment's changes.
    let mut stream = gw.sse("/v1/sdk/stream", &[("authorization", &staging)]).await;
    let sync = stream.next_event().await;
    assert_eq!(sync.event(), Some("sync"));
    assert_eq!(keys_of(&sync.json()), ["only-staging"]);
    for environment in ["production", "staging"] {
        let url = gw.url(&format!("/v1/flags/only-{environment}?environment={environment}"));
        let response =
            gw.http.patch(url).header("apikey", &service).json(&json!({"enabled": false})).send().await;
        assert_eq!(response.unwrap().status(), 200);
    }
    let change = stream.next_event().await;
    assert_eq!((change.event(), change.json()), (Some("flag.updated"), json!({"key": "only-staging"})));
    stream.assert_quiet(Duration::from_millis(300)).await;
}
