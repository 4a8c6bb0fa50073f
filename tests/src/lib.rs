//! End-to-end test harness: builds and starts the real `changegate` binary on a free port and
//! talks to it as a client would — HTTP requests, and SSE read as bytes off the wire.
//!
//! It never reaches into the gateway's memory: everything a test asserts is something a user
//! can see.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a test waits for something that should happen promptly before failing.
pub const PATIENCE: Duration = Duration::from_secs(10);

fn binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build.args(["build", "--quiet", "-p", "changegate", "--bin", "changegate"]);
            // Cargo sets these for the test process; build scripts that watch them (ring's
            // does) would otherwise see a change on every run and rebuild half the tree.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                let per_package = name.starts_with("CARGO_PKG_")
                    || name.starts_with("CARGO_BIN_")
                    || matches!(
                        &*name,
                        "CARGO_MANIFEST_DIR"
                            | "CARGO_MANIFEST_PATH"
                            | "CARGO_CRATE_NAME"
                            | "CARGO_PRIMARY_PACKAGE"
                            | "CARGO_TARGET_TMPDIR"
                            | "CARGO_MANIFEST_LINKS"
                    );
                if per_package {
                    build.env_remove(&*name);
                }
            }
            let status = build.status().expect("cargo runs");
            assert!(status.success(), "building the changegate binary failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("debug").join("changegate")
        })
        .clone()
}

/// A process's resident memory in bytes, from `/proc/<pid>/status` (the gateway's, in the tests
/// that bound what a connection or a catch-up may cost).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc is readable");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS is reported");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse::<u64>().ok()).expect("VmRSS in kB") * 1024
}

/// The `changegate` binary the tests run (built once per test process).
pub fn changegate_binary() -> PathBuf {
    binary()
}

/// A running gateway process, killed when dropped.
pub struct Gateway {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The dev keys it printed, by scope (empty when started with `--keys`).
    pub dev_keys: HashMap<String, String>,
    /// An HTTP client for requests.
    pub http: reqwest::Client,
    logs: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Gateway {
    /// Starts `changegate serve --listen 127.0.0.1:0 <args>` and waits for its `listening on` line.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[]).await
    }

    /// Like [`Gateway::start`], with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_at("127.0.0.1:0", args, env).await
    }

    /// Like [`Gateway::start_with_env`], listening on `listen`.
    pub async fn start_at(listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(listen, args, env, None).await
    }

    /// Starts a gateway logging at `info` in `format`, collecting its logs (see [`Gateway::logs`]).
    pub async fn start_logging(format: &str, args: &[&str]) -> Self {
        Self::spawn("127.0.0.1:0", args, &[("CHANGEGATE_LOG_FORMAT", format)], Some("info")).await
    }

    /// Everything the gateway logged so far (only for [`Gateway::start_logging`]).
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    async fn spawn(listen: &str, args: &[&str], env: &[(&str, &str)], log_level: Option<&str>) -> Self {
        let mut child = Command::new(binary())
            .args(["serve", "--listen", listen])
            .args(args)
            .env_remove("DATABASE_URL")
            .envs(env.iter().copied())
            .env("CHANGEGATE_LOG", log_level.unwrap_or("warn"))
            .stdout(Stdio::piped())
            .stderr(if log_level.is_some() { Stdio::piped() } else { Stdio::inherit() })
            .kill_on_drop(true)
            .spawn()
            .expect("the changegate binary starts");
        let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut logs) = logs.lock() {
                        logs.push_str(&line);
                        logs.push('\n');
                    }
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut dev_keys = HashMap::new();
        let base = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("stdout is readable") {
                if let Some(address) = line.strip_prefix("listening on ") {
                    return address.to_owned();
                }
                if let Some(rest) = line.strip_prefix("dev key ") {
                    let field = |name: &str| {
                        rest.split(' ')
                            .find_map(|kv| kv.strip_prefix(name))
                            .expect("dev key line has every field")
                            .to_owned()
                    };
                    dev_keys.insert(field("scope="), field("key="));
                }
            }
            panic!("changegate exited before listening");
        })
        .await
        .expect("changegate listens in time");
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, base, dev_keys, http: reqwest::Client::new(), logs }
    }

    /// Starts a gateway whose keys come from `keys` (written to a temporary file).
    pub async fn with_keys(keys: &Value, args: &[&str]) -> Self {
        let path =
            std::env::temp_dir().join(format!("changegate-keys-{}-{}.json", std::process::id(), unique()));
        std::fs::write(&path, keys.to_string()).expect("temp dir is writable");
        let path_text = path.to_string_lossy().into_owned();
        let mut all = vec!["--keys", path_text.as_str()];
        all.extend_from_slice(args);
        let gateway = Self::start(&all).await;
        let _ = std::fs::remove_file(&path);
        gateway
    }

    /// An absolute URL on this gateway.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base, path_and_query)
    }

    /// The dev key of `scope`.
    pub fn dev_key(&self, scope: &str) -> &str {
        &self.dev_keys[scope]
    }

    /// Publishes `data` to `topic` with `key` in the `apikey` header; returns the event id.
    pub async fn publish(&self, key: &str, topic: &str, data: Value) -> String {
        let response = self
            .http
            .post(self.url("/v1/events/publish"))
            .header("apikey", key)
            .json(&serde_json::json!({ "topic": topic, "data": data }))
            .send()
            .await
            .expect("publish request is answered");
        assert_eq!(response.status(), 202, "publish was refused");
        let body: Value = response.json().await.expect("publish answers JSON");
        body["id"].as_str().expect("publish answers an id").to_owned()
    }

    /// Opens an SSE stream; panics unless the answer is 200.
    pub async fn sse(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Sse {
        match self.try_sse(path_and_query, headers).await {
            Ok(sse) => sse,
            Err((status, body)) => panic!("expected a stream, got {status}: {body}"),
        }
    }

    /// Opens an SSE stream, or returns the status and JSON body of the refusal.
    pub async fn try_sse(&self, path_and_query: &str, headers: &[(&str, &str)]) -> Result<Sse, (u16, Value)> {
        let mut request = self.http.get(self.url(path_and_query));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("subscribe request is answered");
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.json().await.expect("errors are JSON");
            return Err((status, body));
        }
        Ok(Sse::from_response(response))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM works");
        tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("exits in time").expect("wait works")
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// One SSE message block as it came off the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// The raw text, including the terminating blank line.
    pub raw: String,
}

impl Block {
    fn field(&self, name: &str) -> Option<&str> {
        self.raw.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
    }

    /// The `id:` field.
    pub fn id(&self) -> Option<&str> {
        self.field("id")
    }

    /// The `event:` field.
    pub fn event(&self) -> Option<&str> {
        self.field("event")
    }

    /// The `data:` lines joined, parsed as JSON.
    pub fn json(&self) -> Value {
        let data: Vec<&str> = self.raw.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        serde_json::from_str(&data.join("\n"))
            .unwrap_or_else(|e| panic!("data is not JSON ({e}): {:?}", self.raw))
    }

    /// Whether this block dispatches an event (it has data) that is not a keep-alive
    /// (`event: heartbeat` of dialect C, `event: ping` of dialect B).
    pub fn is_event(&self) -> bool {
        self.raw.lines().any(|l| l.starts_with("data:"))
            && !matches!(self.event(), Some("heartbeat" | "ping"))
    }
}

/// An open SSE response, read block by block.
pub struct Sse {
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
    ended: bool,
}

impl Sse {
    /// Reads an already-opened SSE response.
    pub fn from_response(response: reqwest::Response) -> Self {
        let headers = response.headers().clone();
        Self { headers, body: Box::pin(response.bytes_stream()), buffer: Vec::new(), ended: false }
    }

    /// The next block (event, comment, or `retry:`), or `None` when the server ended the
    /// stream. Panics if nothing arrives within [`PATIENCE`].
    pub async fn next_block(&mut self) -> Option<Block> {
        self.next_block_within(PATIENCE).await.expect("a block arrives in time")
    }

    /// The next block, `Err` if none arrives within `wait`.
    pub async fn next_block_within(&mut self, wait: Duration) -> Result<Option<Block>, ()> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                    let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                    return Some(Block { raw: String::from_utf8(raw).expect("SSE is UTF-8") });
                }
                if self.ended {
                    assert!(self.buffer.is_empty(), "stream ended inside a block: {:?}", self.buffer);
                    return None;
                }
                match self.body.next().await {
                    Some(Ok(bytes)) => self.buffer.extend_from_slice(&bytes),
                    Some(Err(_)) | None => self.ended = true,
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    /// The next block that carries data (skipping heartbeats and `retry:` hints).
    pub async fn next_event(&mut self) -> Block {
        loop {
            let block = self.next_block().await.expect("the stream stays open");
            if block.is_event() {
                return block;
            }
        }
    }

    /// Asserts no event arrives within `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_block_within(left).await {
                Err(()) => return,
                Ok(Some(block)) if !block.is_event() => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

/// An HS256 JWT over `claims`, signed with `secret`.
pub fn jwt(claims: &Value, secret: &str) -> String {
    sign_jwt(&serde_json::json!({"alg": "HS256", "typ": "JWT"}), claims, secret)
}

/// A JWT with an arbitrary header (to forge `alg`).
pub fn sign_jwt(header: &Value, claims: &Value, secret: &str) -> String {
    let head = URL_SAFE_NO_PAD.encode(header.to_string());
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length works");
    mac.update(format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// Unix time in seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs()
}

/// A fresh, well-formed key of `scope` (40 hex characters, unique in this test run), to put
/// in a key file — or to present without putting it anywhere, as an unknown key.
pub fn test_key(scope: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_nanos();
    format!("flc_{scope}_{:024x}{:016x}", nanos & ((1 << 96) - 1), unique())
}

/// `/v1/events/subscribe?collection=<collection>&apikey=<key>`.
pub fn collection_path(collection: &str, key: &str) -> String {
    format!("/v1/events/subscribe?collection={collection}&apikey={key}")
}

/// The sequence number inside an event id (`<epoch>-<seq>`), for order assertions.
pub fn seq(id: &str) -> u64 {
    id.rsplit_once('-').and_then(|(_, s)| s.parse().ok()).unwrap_or_else(|| panic!("not an event id: {id}"))
}

/// A PostgreSQL database of its own for one test, dropped afterwards. The server comes from
/// `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// Its connection string, for the gateway.
    pub url: String,
    /// A connection to it, for the test's own SQL.
    pub client: tokio_postgres::Client,
}

fn server_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database name replaced by `name` (query parameters kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be reachable for this test ({e}); see .ci/run"));
    tokio::spawn(connection);
    client
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn new() -> Self {
        let name = format!("changegate_test_{}_{}", std::process::id(), unique());
        let admin = connect(&server_url()).await;
        admin.batch_execute(&format!("create database {name}")).await.expect("create database");
        let url = with_database(&server_url(), &name);
        let client = connect(&url).await;
        Self { name, url, client }
    }

    /// A connection to the server's maintenance database (for `alter database` on this one).
    pub async fn admin(&self) -> tokio_postgres::Client {
        connect(&server_url()).await
    }

    /// A second connection (for concurrent transactions).
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Runs an administration command (`changegate <args>`) against this database; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = std::process::Command::new(binary())
            .args(args)
            .env("DATABASE_URL", &self.url)
            .output()
            .expect("the changegate binary runs");
        assert!(
            output.status.success(),
            "changegate {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Migrates, creates `tenants`, and one key of `scope` for each; returns the keys in order.
    pub fn setup(&self, tenants: &[&str], scope: &str) -> Vec<String> {
        self.cli(&["migrate"]);
        tenants
            .iter()
            .map(|tenant| {
                self.cli(&["tenants", "create", tenant]);
                self.key(tenant, scope)
            })
            .collect()
    }

    /// Creates a key and returns it.
    pub fn key(&self, tenant: &str, scope: &str) -> String {
        let out = self.cli(&["keys", "create", "--tenant", tenant, "--scope", scope]);
        out.trim().strip_prefix("key=").expect("`keys create` prints key=<key>").to_owned()
    }

    /// Creates `public.todos (id serial primary key, tenant_id text, title text, done boolean)` and
    /// enables realtime on it.
    pub async fn todos(&self) {
        self.client
            .batch_execute(
                "create table public.todos (id serial primary key, tenant_id text, title text, done boolean default false);
                 select realtime.enable('public.todos', 'tenant_id');",
            )
            .await
            .expect("create and enable todos");
    }

    /// Terminates the gateway's LISTEN backends (`terminate`) or just counts them.
    pub async fn listen_backends(&self, terminate: bool) -> i64 {
        let select = if terminate { "pg_terminate_backend(pid)" } else { "pid" };
        let sql = format!(
            "select count(*) from (select {select} from pg_stat_activity
             where application_name = 'changegate-listen' and datname = current_database()) k"
        );
        self.client.query_one(&sql, &[]).await.expect("pg_stat_activity is readable").get(0)
    }

    /// Starts a gateway on this database.
    pub async fn gateway(&self, args: &[&str]) -> Gateway {
        Gateway::start_with_env(args, &[("DATABASE_URL", &self.url)]).await
    }

    /// Starts a gateway on this database at a given address (to restart one in place).
    pub async fn gateway_at(&self, listen: &str, args: &[&str]) -> Gateway {
        Gateway::start_at(listen, args, &[("DATABASE_URL", &self.url)]).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop needs its own runtime: the test's may be shutting down.
        let _ = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async {
                let admin = connect(&server_url()).await;
                let _ = admin.batch_execute(&format!("drop database if exists {name} with (force)")).await;
            });
        })
        .join();
    }
}

/// `tests/<name>`, with its npm packages installed (`npm ci`, once).
pub fn npm_project(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name);
    if !dir.join("node_modules").exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&dir)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci in tests/{name} failed");
    }
    dir
}

/// Headless Chromium (Debian's `/usr/bin/chromium`), driven through `tests/browser/driver.mjs`
/// (playwright-core): the tests send it JSON commands and read JSON answers.
pub struct Browser {
    child: Child,
    input: tokio::process::ChildStdin,
    output: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Browser {
    /// Starts the browser, or returns `None` (after saying so loudly) on a machine without
    /// Chromium — `.ci/run` installs it, so CI always runs these tests.
    pub async fn start() -> Option<Self> {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        if !std::path::Path::new(&chromium).exists() {
            skipped(&format!("no Chromium at {chromium}; `.ci/run` installs it (apt-get install chromium)"));
            return None;
        }
        let dir = npm_project("browser");
        let mut child = Command::new("node")
            .arg(dir.join("driver.mjs"))
            .env("CHROMIUM", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let input = child.stdin.take().expect("stdin is piped");
        let output = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut browser = Self { child, input, output };
        let ready = browser.answer().await;
        assert_eq!(ready["ready"], true, "the browser driver started: {ready}");
        Some(browser)
    }

    async fn answer(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), self.output.next_line())
            .await
            .expect("the browser answers in time")
            .expect("the driver's stdout is readable")
            .expect("the driver is running");
        serde_json::from_str(&line).expect("the driver answers JSON")
    }

    async fn command(&mut self, command: Value) -> Value {
        use tokio::io::AsyncWriteExt;
        let line = format!("{command}\n");
        self.input.write_all(line.as_bytes()).await.expect("the driver reads commands");
        let answer = self.answer().await;
        assert_eq!(answer["ok"], true, "browser command {command} failed: {answer}");
        answer["result"].clone()
    }

    /// Navigates to `url`.
    pub async fn goto(&mut self, url: &str) {
        self.command(serde_json::json!({ "goto": url })).await;
    }

    /// Replaces the page with `html` (an `about:blank` origin: every request to the gateway
    /// is cross-origin).
    pub async fn set_content(&mut self, html: &str) {
        self.command(serde_json::json!({ "html": html })).await;
    }

    /// Serves `directory` and `page` (as `/page.html`) from a new origin; returns its base URL.
    pub async fn serve(&mut self, directory: &std::path::Path, page: &str) -> String {
        let base = self.command(serde_json::json!({ "serve": directory, "page": page })).await;
        base.as_str().expect("the driver answers the base URL").to_owned()
    }

    /// Evaluates a JavaScript expression in the page.
    pub async fn eval(&mut self, expression: &str) -> Value {
        self.command(serde_json::json!({ "eval": expression })).await
    }

    /// Evaluates `expression` until `done` holds for its value; returns that value.
    pub async fn wait_for(&mut self, expression: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let value = self.eval(expression).await;
            if done(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for `{expression}`; last value {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A scripted MongoDB server (`tests/mongo/mock.py`, mockupdb): the real driver talks to it,
/// the test sees every command and writes every reply.
pub struct MockMongo {
    child: Child,
    input: tokio::process::ChildStdin,
    output: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Where it listens.
    pub port: u16,
}

impl MockMongo {
    /// Starts it, or returns `None` (saying so loudly) without Python's `mockupdb`.
    pub async fn start() -> Option<Self> {
        let probe = std::process::Command::new("python3").args(["-c", "import mockupdb, bson"]).output();
        if !probe.is_ok_and(|o| o.status.success()) {
            skipped("python3 with mockupdb is missing; `.ci/run` installs it (pip install mockupdb pymongo)");
            return None;
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mongo/mock.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let input = child.stdin.take().expect("stdin is piped");
        let mut output = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let first = tokio::time::timeout(PATIENCE, output.next_line())
            .await
            .expect("the mock starts")
            .unwrap()
            .unwrap();
        let port = serde_json::from_str::<Value>(&first).unwrap()["port"].as_u64().unwrap() as u16;
        Some(Self { child, input, output, port })
    }

    /// `mongodb://127.0.0.1:<port>/?directConnection=true`.
    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=5000", self.port)
    }

    async fn command(&mut self, command: Value) -> Value {
        use tokio::io::AsyncWriteExt;
        self.input.write_all(format!("{command}\n").as_bytes()).await.expect("the mock reads commands");
        let line = tokio::time::timeout(Duration::from_secs(30), self.output.next_line())
            .await
            .expect("the mock answers in time")
            .unwrap()
            .expect("the mock is running");
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert!(answer.get("error").is_none(), "mock failed on {command}: {answer}");
        answer
    }

    /// The next command the gateway sends (`(name, document)`).
    pub async fn receive(&mut self) -> (String, Value) {
        let (_, name, doc) = self.receive_numbered().await;
        (name, doc)
    }

    /// The next command with its number, to answer it later with [`MockMongo::reply_to`].
    pub async fn receive_numbered(&mut self) -> (u64, String, Value) {
        let answer = self.command(serde_json::json!({ "receive": 20 })).await;
        let number = answer["id"].as_u64().unwrap_or(0);
        (number, answer["command"].as_str().unwrap_or_default().to_owned(), answer["doc"].clone())
    }

    /// Answers command `number` (not necessarily the last one received).
    pub async fn reply_to(&mut self, number: u64, reply: Value) {
        self.command(serde_json::json!({ "reply": reply, "to": number })).await;
    }

    /// Receives the next command, asserting its name.
    pub async fn expect(&mut self, name: &str) -> Value {
        let (got, doc) = self.receive().await;
        assert_eq!(got, name, "expected `{name}`, got {doc}");
        doc
    }

    /// Answers the last command with `reply` (Extended JSON).
    pub async fn reply(&mut self, reply: Value) {
        self.command(serde_json::json!({ "reply": reply })).await;
    }

    /// Closes the last command's connection instead of answering.
    pub async fn hang_up(&mut self) {
        self.command(serde_json::json!({ "hangup": true })).await;
    }
}

impl Drop for MockMongo {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The next `n` events of a stream of `todos` changes: `(id, document title)` each.
pub async fn titles(sse: &mut Sse, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let event = sse.next_event().await;
        let title = event.json()["document"]["title"].as_str().unwrap_or_default().to_owned();
        out.push((event.id().expect("an event has an id").to_owned(), title));
    }
    out
}

/// A plain PostgreSQL client LISTENing on `channel` of database `url`, as any user could, and
/// the payloads of the NOTIFYs it receives, in order (for as long as the client is kept).
pub async fn notifications(
    url: &str,
    channel: &str,
) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (listener, mut connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("PostgreSQL is reachable");
    let (sender, received) = tokio::sync::mpsc::unbounded_channel();
    let quoted = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    // LISTEN is answered on the connection, so drive it first.
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = sender.send(n.payload().to_owned());
            }
        }
    });
    listener.batch_execute(&quoted).await.expect("LISTEN");
    (listener, received)
}

/// Polls `probe` until it answers `Ok`, for at most [`PATIENCE`]; then fails the test with its
/// last `Err`. For conditions that become true asynchronously (a counter, a log line): a
/// sleep-then-assert would be flaky on a loaded machine, and slow on an idle one.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: still not so after {PATIENCE:?}: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

impl Gateway {
    /// The `/metrics` text once `ready` holds for it (see [`eventually`]).
    pub async fn metrics_when(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        eventually(what, || async {
            let text = self.http.get(self.url("/metrics")).send().await.map_err(|e| e.to_string())?;
            let text = text.text().await.map_err(|e| e.to_string())?;
            if ready(&text) { Ok(text) } else { Err(text) }
        })
        .await
    }

    /// The collected logs once `ready` holds for them (only for [`Gateway::start_logging`]).
    pub async fn logs_when(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        eventually(what, || async {
            let logs = self.logs();
            if ready(&logs) { Ok(logs) } else { Err(logs) }
        })
        .await
    }
}

/// Says a test was skipped, on the real stderr: the test harness captures `eprintln!` of passing
/// tests, and a skip must be visible in CI's log. Under `CHANGEGATE_REQUIRE_ALL=1` (`.ci/run`
/// sets it, after installing everything the suite needs) a skip is a failure: CI can never be
/// green with a whole capability untested.
pub fn skipped(why: &str) {
    use std::io::Write as _;
    if std::env::var_os("CHANGEGATE_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("a test would be skipped, and CHANGEGATE_REQUIRE_ALL=1 forbids it: {why}");
    }
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {why}");
}

/// The Python of the repository's `.venv` (which `.ci/run` creates with the seed services' SDKs
/// pinned) if it can import `module`, or `None` after saying so.
pub fn venv_python(module: &str) -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let imports = std::process::Command::new(&python).args(["-c", &format!("import {module}")]).output();
    if imports.is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    skipped(&format!("{} cannot import `{module}`; `.ci/run` installs it in .venv", python.display()));
    None
}

/// The schemathesis command (`$SCHEMATHESIS`, else the repository's `.venv`, which `.ci/run`
/// creates), or `None` after saying so.
pub fn schemathesis() -> Option<PathBuf> {
    let path = std::env::var_os("SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/schemathesis"));
    if path.exists() {
        return Some(path);
    }
    skipped(&format!("no schemathesis at {}; `.ci/run` installs it in .venv", path.display()));
    None
}

/// A hot-standby replica of the test server, made for one test: `pg_basebackup -R` of the
/// primary into a directory of its own, started on a free port (as the `postgres` user when
/// the tests run as root), stopped and removed on drop. Needs a `host replication` line in
/// the primary's `pg_hba.conf` (`.ci/run` adds it).
pub struct Replica {
    directory: PathBuf,
    bin: PathBuf,
    port: u16,
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (the server refuses to run
/// as root, and its files must be that user's).
fn as_postgres(program: &std::path::Path, args: &[&str]) -> std::process::Output {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let mut command = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    };
    command.args(args).stdin(Stdio::null()).output().expect("the PostgreSQL tools run")
}

/// The server binaries' directory (`PG_BINDIR`, or the newest under `/usr/lib/postgresql`).
fn postgres_bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

impl Replica {
    /// Makes and starts the replica, or returns `None` (after saying why) where it cannot be
    /// made: no server binaries, or the primary refuses replication connections.
    pub async fn start() -> Option<Self> {
        let Some(bin) = postgres_bindir() else {
            skipped("no PostgreSQL server binaries (pg_ctl) to run a replica with");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let directory =
            std::env::temp_dir().join(format!("changegate-replica-{}-{port}", std::process::id()));
        let primary =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let dir = directory.to_str().expect("a UTF-8 temp dir").to_owned();
        let backup = tokio::task::spawn_blocking({
            let (bin, dir) = (bin.clone(), dir.clone());
            move || {
                as_postgres(
                    &bin.join("pg_basebackup"),
                    &["-d", &primary, "-D", &dir, "-R", "-X", "stream", "--checkpoint=fast"],
                )
            }
        })
        .await
        .expect("pg_basebackup ran");
        if !backup.status.success() {
            let _ = std::fs::remove_dir_all(&directory);
            skipped(&format!(
                "pg_basebackup failed (the primary's pg_hba.conf needs `host replication all 127.0.0.1/32 trust`; .ci/run adds it): {}",
                String::from_utf8_lossy(&backup.stderr).trim()
            ));
            return None;
        }
        // Debian keeps the configuration outside the data directory: give the replica its own.
        let config = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\nhot_standby = on\nmax_connections = 100\nfsync = off\n"
        );
        for (file, text) in [
            ("postgresql.conf", config.as_str()),
            ("pg_hba.conf", "local all all trust\nhost all all 127.0.0.1/32 trust\n"),
            ("pg_ident.conf", ""),
        ] {
            let path = directory.join(file);
            std::fs::write(&path, text).expect("write the replica's configuration");
            // Owned by whoever owns the data directory (the server reads them as that user).
            let _ =
                std::process::Command::new("chown").arg("--reference").arg(&directory).arg(&path).status();
        }
        let replica = Self { directory, bin, port };
        let log = replica.directory.join("server.log");
        let started = as_postgres(
            &replica.bin.join("pg_ctl"),
            &["-D", &dir, "-l", log.to_str().expect("UTF-8"), "-w", "-t", "60", "start"],
        );
        assert!(
            started.status.success(),
            "the replica started: {} {}",
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Some(replica)
    }

    /// The replica's URL for database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Waits until the replica has replayed everything the test server had written when called
    /// (not after a promotion: a promoted replica replays no more).
    /// Replication lag is the environment, not the behaviour under test: at the suite's start
    /// every test creates a database (~4 MB of WAL each) and a replica replays all of it, so
    /// this allows a minute, and the assertions that follow keep their usual patience.
    pub async fn caught_up(&self, primary: &tokio_postgres::Client) {
        let target: String = primary
            .query_one("select pg_current_wal_lsn()::text", &[])
            .await
            .expect("the test server's WAL position")
            .get(0);
        let (replica, connection) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
            .await
            .expect("the replica accepts connections");
        tokio::spawn(connection);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let replayed: bool = replica
                .query_one("select coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true)", &[&target])
                .await
                .expect("the replica's replay position")
                .get(0);
            if replayed {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replica replayed up to {target} within a minute"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until database `db` has replicated with its changegate schema, and connects to it.
    pub async fn database(&self, db: &TestDb) -> tokio_postgres::Client {
        self.caught_up(&db.client).await;
        let url = self.url(&db.name);
        eventually("the test database replicated to the replica", || {
            let url = url.clone();
            async move {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .query_one("select count(*) from realtime.migrations", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(client)
            }
        })
        .await
    }

    /// Promotes the replica to a primary of its own (`pg_ctl promote`, waiting until it is).
    pub fn promote(&self) {
        let dir = self.directory.to_str().expect("UTF-8");
        let promoted = as_postgres(&self.bin.join("pg_ctl"), &["-D", dir, "-w", "-t", "60", "promote"]);
        assert!(
            promoted.status.success(),
            "the replica was promoted: {}",
            String::from_utf8_lossy(&promoted.stderr)
        );
    }

    /// Starts a gateway on the replica's copy of `db`.
    pub async fn gateway(&self, db: &TestDb, args: &[&str]) -> Gateway {
        Gateway::start_with_env(args, &[("DATABASE_URL", &self.url(&db.name))]).await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let dir = self.directory.to_str().unwrap_or_default().to_owned();
        let _ = as_postgres(&self.bin.join("pg_ctl"), &["-D", &dir, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
