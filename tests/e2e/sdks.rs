//! The seed services' own published SDKs, unmodified, pointed at changegate: they initialise,
//! evaluate, follow a management-API change through their own stream with polling off, and
//! survive a gateway restart on the same port — on the memory engine and on PostgreSQL.

use std::process::Stdio;
use std::time::Duration;

use changegate_e2e::{Gateway, PATIENCE, TestDb, test_key, venv_python};
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
}

impl Sdk {
    fn script(self) -> &'static str {
        match self {
            Self::Togul => "togul_check.py",
            Self::Flipswitch => "flipswitch_check.py",
        }
    }

    fn module(self) -> &'static str {
        match self {
            Self::Togul => "togul",
            Self::Flipswitch => "flipswitch",
        }
    }
}

/// Runs `sdk`'s script against `gw`, restarting the gateway with `restart` when the script asks;
/// returns the script's observations.
async fn run_script(
    sdk_under_test: Sdk,
    gw: Gateway,
    sdk: &str,
    service: &str,
    restart: Restart<'_>,
) -> Vec<Value> {
    let Some(python) = venv_python(sdk_under_test.module()) else { return Vec::new() };
    let script = sdk_under_test.script();
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdks").join(script);
    let mut child = tokio::process::Command::new(python)
        .arg(path)
        .env("BASE", &gw.base)
        .env("SDK_KEY", sdk)
        .env("SERVICE_KEY", service)
        .env("ENVIRONMENT", ENVIRONMENT)
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
    seen
}

fn assert_steps(steps: &[Value]) {
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
    let steps = run_script(sdk_under_test, gw, &sdk, &service, restart).await;
    assert_steps(&steps);
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
    let steps = run_script(sdk_under_test, gw, &sdk, &service, restart).await;
    assert_steps(&steps);
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
