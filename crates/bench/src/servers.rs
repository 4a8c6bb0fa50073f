//! The servers the bench measures — changegate, or any SSE server it is told how to subscribe
//! to and publish on (`--subscribe-url`, `--publish-url`, `--publish-body`, `--pid`) — and the
//! `compare` command, which runs the same `idle` and `fanout` scenarios against changegate,
//! nginx + nchan and a naive Node server, each started fresh, back to back, and prints one table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio::process::Child;
use tokio::sync::watch;

use crate::process::{self, Gateway};
use crate::{collect, keys, percentiles, subscribe_many};

/// How to reach a server the bench did not start.
#[derive(Args, Clone, Debug, Default)]
pub struct External {
    /// Measure this SSE URL instead of starting changegate (e.g. `http://127.0.0.1:8080/sub/fan`).
    #[arg(long, requires_all = ["publish_url", "pid"])]
    pub subscribe_url: Option<String>,
    /// Where to `POST` each message.
    #[arg(long)]
    pub publish_url: Option<String>,
    /// The body of each message: `{t}` becomes the send time in µs, `{n}` its number.
    #[arg(long, default_value = r#"{"t":{t},"n":{n}}"#)]
    pub publish_body: String,
    /// The server's process, for RSS and CPU.
    #[arg(long)]
    pub pid: Option<u32>,
}

/// A directory of its own under the system's temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("changegate-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What keeps a started server alive (dropped: stopped, its files removed).
enum Owned {
    Gateway(#[allow(dead_code)] Gateway),
    Child(#[allow(dead_code)] Child, #[allow(dead_code)] Scratch),
    Nginx(#[allow(dead_code)] Nginx),
}

/// nginx's master process. Killing it would orphan its worker, which goes on using the CPU the
/// next server is measured with: it is asked to stop (SIGTERM stops the workers too) and waited for.
struct Nginx {
    master: Child,
    _dir: Scratch,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let workers = self.master.id().map(process::children).unwrap_or_default();
        if let Some(pid) = self.master.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        let gone = |pid: u32| !Path::new(&format!("/proc/{pid}")).exists() || process::is_zombie(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && !(matches!(self.master.try_wait(), Ok(Some(_))) && workers.iter().all(|&w| gone(w)))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A server under test.
pub struct Server {
    /// Its name in tables.
    pub name: &'static str,
    /// Where it listens.
    pub address: SocketAddr,
    subscribe_path: String,
    subscribe_key: String,
    publish_url: String,
    publish_key: String,
    publish_body: String,
    pid: u32,
    _owned: Option<Owned>,
}

impl Server {
    /// A started changegate measured by subscribing only (no publishing).
    pub fn subscribe_only(gw: Gateway, path: &str, key: &str) -> Self {
        Self {
            name: "changegate",
            address: gw.address,
            subscribe_path: path.to_owned(),
            subscribe_key: key.to_owned(),
            publish_url: String::new(),
            publish_key: String::new(),
            publish_body: String::new(),
            pid: gw.pid(),
            _owned: Some(Owned::Gateway(gw)),
        }
    }

    /// Resident memory of the measured process, KiB.
    pub fn rss_kib(&self) -> u64 {
        process::rss_kib(self.pid)
    }

    /// CPU time of the measured process, clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        process::cpu_ticks(self.pid)
    }

    /// Publishes `rate` messages per second for `seconds`; returns how many were accepted (2xx).
    pub async fn publish_at(&self, rate: u64, seconds: u64) -> u64 {
        let body = |n: u64| {
            self.publish_body.replace("{t}", &crate::sse::now_us().to_string()).replace("{n}", &n.to_string())
        };
        publish_paced(&self.publish_url, &self.publish_key, &body, rate, seconds).await
    }
}

/// `POST`s `body(n)` to `url` `rate` times a second for `seconds` (at most 64 in flight), with
/// `key` in the `apikey` header unless empty; returns how many were accepted (2xx).
pub async fn publish_paced(
    url: &str,
    key: &str,
    body: &(dyn Fn(u64) -> String + Sync),
    rate: u64,
    seconds: u64,
) -> u64 {
    let http = reqwest::Client::new();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = tokio::time::Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    let mut sent = 0;
    for n in 0..rate * seconds {
        tokio::time::sleep_until(started + period.mul_f64(n as f64)).await;
        let mut request = http.post(url).header("content-type", "application/json").body(body(n));
        if !key.is_empty() {
            request = request.header("apikey", key);
        }
        inflight.spawn(async move { request.send().await.is_ok_and(|r| r.status().is_success()) });
        while inflight.len() > 64 {
            if let Some(ok) = inflight.join_next().await {
                sent += u64::from(ok.unwrap_or(false));
            }
        }
    }
    while let Some(ok) = inflight.join_next().await {
        sent += u64::from(ok.unwrap_or(false));
    }
    sent
}

/// changegate's own release binary, memory engine, one tenant.
pub async fn changegate(binary: &Path, topic: &str) -> anyhow::Result<Server> {
    changegate_on(binary, topic, None).await
}

/// [`changegate`], confined to CPU `cpu` when given one.
async fn changegate_on(binary: &Path, topic: &str, cpu: Option<&str>) -> anyhow::Result<Server> {
    let (keys_file, keys) = keys(1)?;
    let args = ["--keys".into(), keys_file.display().to_string()];
    let gw = Gateway::start_on(binary, &args, &[], cpu).await?;
    let (anon, publish) = keys[0].clone();
    Ok(Server {
        name: "changegate",
        address: gw.address,
        subscribe_path: format!("/v1/events/subscribe?topic={topic}"),
        subscribe_key: anon,
        publish_url: format!("http://{}/v1/events/publish", gw.address),
        publish_key: publish,
        publish_body: format!(r#"{{"topic":"{topic}","data":{{"t":{{t}},"tenant":"t0","n":{{n}}}}}}"#),
        pid: gw.pid(),
        _owned: Some(Owned::Gateway(gw)),
    })
}

/// A server the caller started.
pub fn external(external: &External) -> anyhow::Result<Option<Server>> {
    let Some(url) = &external.subscribe_url else { return Ok(None) };
    let rest = url.strip_prefix("http://").context("--subscribe-url must be http://host:port/path")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    Ok(Some(Server {
        name: "external",
        address: host.parse().context("--subscribe-url must name an IP address and port")?,
        subscribe_path: path,
        subscribe_key: String::new(),
        publish_url: external.publish_url.clone().unwrap_or_default(),
        publish_key: String::new(),
        publish_body: external.publish_body.clone(),
        pid: external.pid.unwrap_or(0),
        _owned: None,
    }))
}

/// A free local port (bound, then released for the child to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `address` accepts connections.
async fn wait_listening(address: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(address).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {address}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The naive Node SSE server shipped in `crates/bench/peers/naive-sse.js`.
pub async fn node(topic: &str, cpu: Option<&str>) -> anyhow::Result<Server> {
    let dir = Scratch::new("node")?;
    let script = dir.path().join("naive-sse.js");
    std::fs::write(&script, include_str!("../peers/naive-sse.js"))?;
    let port = free_port()?;
    let child = process::command("node", cpu)
        .arg(&script)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting node (Debian: apt-get install nodejs)")?;
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(address).await?;
    let pid = child.id().unwrap_or(0);
    Ok(peer("naive Node", address, topic, pid, Owned::Child(child, dir)))
}

/// A peer with the bench's shared convention: no keys, `GET /sub/<topic>`, `POST /pub/<topic>`
/// with the message as the body.
fn peer(name: &'static str, address: SocketAddr, topic: &str, pid: u32, owned: Owned) -> Server {
    Server {
        name,
        address,
        subscribe_path: format!("/sub/{topic}"),
        subscribe_key: String::new(),
        publish_url: format!("http://{address}/pub/{topic}"),
        publish_key: String::new(),
        publish_body: r#"{"t":{t},"n":{n}}"#.into(),
        pid,
        _owned: Some(owned),
    }
}

const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// nginx with the nchan module (Debian `nginx-light` + `libnginx-mod-nchan`, installed if
/// missing), one worker, a message buffer so `Last-Event-ID` resumes work; RSS and CPU are the
/// worker's.
pub async fn nchan(topic: &str, cpu: Option<&str>) -> anyhow::Result<Server> {
    if !Path::new(NCHAN_MODULE).exists() || which("nginx").is_none() {
        let status = std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "nginx-light", "libnginx-mod-nchan"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("installing nginx and nchan with apt-get")?;
        anyhow::ensure!(status.success(), "apt-get install nginx-light libnginx-mod-nchan failed");
    }
    let dir = Scratch::new("nchan")?;
    let port = free_port()?;
    let root = dir.path().display().to_string();
    let config = format!(
        r"load_module {NCHAN_MODULE};
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {root}/body;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location ~ ^/sub/(\w+)$ {{ nchan_subscriber eventsource; nchan_channel_id $1; nchan_subscriber_first_message newest; }}
    location ~ ^/pub/(\w+)$ {{
      nchan_publisher; nchan_channel_id $1;
      nchan_message_buffer_length 1000; nchan_message_timeout 5m;
    }}
  }}
}}
"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config)?;
    let child = process::command("nginx", cpu)
        .args(["-p", &root, "-e", &format!("{root}/error.log"), "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting nginx")?;
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(address).await?;
    let master = child.id().unwrap_or(0);
    let nginx = Nginx { master: child, _dir: dir };
    // The master listens before it forks its worker.
    let deadline = Instant::now() + Duration::from_secs(5);
    let worker = loop {
        if let Some(&worker) = process::children(master).first() {
            break worker;
        }
        anyhow::ensure!(Instant::now() < deadline, "nginx started no worker process");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(peer("nchan", address, topic, worker, Owned::Nginx(nginx)))
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.exists())
}

/// What `idle` measured.
pub struct Idle {
    /// RSS growth per connection, bytes.
    pub bytes_per_connection: f64,
    /// CPU while idle, percent of one core.
    pub cpu_percent: f64,
    /// Time to open every connection.
    pub connect_seconds: f64,
    /// The JSON record.
    pub record: Value,
}

/// Holds `connections` idle SSE connections on `server`.
pub async fn idle_on(server: &Server, connections: usize, seconds: u64) -> anyhow::Result<Idle> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    let (path, key) = (server.subscribe_path.clone(), server.subscribe_key.clone());
    let handles =
        subscribe_many(server.address, connections, &|_| (path.clone(), key.clone(), None), None, &stop)
            .await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.rss_kib();
    let ticks = server.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu_percent = (server.cpu_ticks() - ticks) as f64 / 100.0 / seconds as f64 * 100.0;
    let bytes_per_connection = after.saturating_sub(before) as f64 * 1024.0 / connections as f64;
    let _ = stop_tx.send(true);
    collect(handles).await;
    let record = json!({"server": server.name, "connections": connections, "rss_before_kib": before,
        "rss_after_kib": after, "bytes_per_connection": bytes_per_connection,
        "idle_cpu_percent": cpu_percent, "connect_seconds": connect_seconds});
    Ok(Idle { bytes_per_connection, cpu_percent, connect_seconds, record })
}

/// What one `fanout` step measured.
pub struct Fanout {
    /// Deliveries per second while publishing.
    pub per_second: f64,
    /// Server CPU per delivery, µs.
    pub cpu_us_per_delivery: f64,
    /// Latency percentiles, ms.
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Delivered / expected.
    pub delivered: u64,
    /// Published × subscribers.
    pub expected: u64,
    /// The JSON record.
    pub record: Value,
    /// The Markdown row's figures.
    pub row: String,
}

/// `subscribers` on one channel of `server` while it is sent `rate` messages per second.
pub async fn fanout_on(
    server: &Server,
    subscribers: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Fanout> {
    let (stop_tx, stop) = watch::channel(false);
    let (path, key) = (server.subscribe_path.clone(), server.subscribe_key.clone());
    let handles =
        subscribe_many(server.address, subscribers, &|_| (path.clone(), key.clone(), None), None, &stop)
            .await?;
    // Let the connection storm settle before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let ticks = server.cpu_ticks();
    let sent = server.publish_at(rate, seconds).await;
    let publish_s = started.elapsed().as_secs_f64();
    // Let the tail arrive, then stop everyone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu_s = (server.cpu_ticks() - ticks) as f64 / 100.0;
    let _ = stop_tx.send(true);
    let seen = collect(handles).await;
    let delivered: u64 = seen.iter().map(|s| s.events).sum();
    let cut = seen.iter().filter(|s| s.ended_by_server).count();
    let expected = sent * subscribers as u64;
    let p = percentiles(seen.into_iter().flat_map(|s| s.latencies_us).collect());
    let per_second = delivered as f64 / publish_s;
    let cpu_us_per_delivery = cpu_s * 1e6 / delivered.max(1) as f64;
    let record = json!({"server": server.name, "subscribers": subscribers, "rate": rate, "seconds": seconds,
        "published": sent, "delivered": delivered, "expected": expected, "slow_consumer_cuts": cut,
        "deliveries_per_second": per_second, "gateway_cpu_seconds": cpu_s,
        "gateway_cpu_us_per_delivery": cpu_us_per_delivery,
        "p50_ms": p.p50, "p90_ms": p.p90, "p99_ms": p.p99, "max_ms": p.max});
    let row = format!(
        "{subscribers} subs × {rate} msg/s | {per_second:.0} deliveries/s ({delivered}/{expected}, {cut} cut) | gateway {cpu_us_per_delivery:.2} µs CPU/delivery | p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        p.p50, p.p90, p.p99, p.max
    );
    Ok(Fanout { per_second, cpu_us_per_delivery, p50: p.p50, p99: p.p99, delivered, expected, record, row })
}

/// One server kind `compare` starts.
#[derive(Clone, Copy)]
enum Kind {
    Changegate,
    Nchan,
    Node,
}

async fn start(kind: Kind, binary: &Path, topic: &str, cpu: Option<&str>) -> anyhow::Result<Server> {
    match kind {
        Kind::Changegate => changegate_on(binary, topic, cpu).await,
        Kind::Nchan => nchan(topic, cpu).await,
        Kind::Node => node(topic, cpu).await,
    }
}

/// With `compare --pin`, the servers' CPU: one core of their own. nginx runs one worker and
/// Node one thread, so unpinned they use one core while changegate's runtime (one worker per
/// core) competes with the clients for both: pinned, every server gets the same single core
/// and the clients the rest.
const SERVER_CPU: &str = "0";

/// `compare`: idle and fan-out against changegate, nchan and naive Node, one table with ratios.
pub async fn compare(
    binary: &Path,
    connections: usize,
    subscribers: usize,
    rates: &[u64],
    seconds: u64,
    pin: bool,
) -> anyhow::Result<()> {
    let kinds = [Kind::Changegate, Kind::Nchan, Kind::Node];
    let cpu = if pin {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        anyhow::ensure!(cores >= 2, "--pin needs two CPUs: one for the servers, one for the clients");
        process::pin_self(&format!("1-{}", cores - 1))?;
        Some(SERVER_CPU)
    } else {
        None
    };
    // rows[metric][server]
    let mut rows: Vec<(String, bool, Vec<f64>)> = Vec::new();
    let mut push = |label: String, lower_is_better: bool, server: usize, value: f64| {
        if let Some(row) = rows.iter_mut().find(|(l, _, _)| *l == label) {
            row.2[server] = value;
        } else {
            let mut values = vec![f64::NAN; kinds.len()];
            values[server] = value;
            rows.push((label, lower_is_better, values));
        }
    };
    let mut names = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let server = start(*kind, binary, "idle", cpu).await?;
        names.push(server.name);
        let idle = idle_on(&server, connections, seconds).await?;
        println!(
            "{}",
            json!({"scenario": "compare/idle", "machine": process::machine(), "result": idle.record})
        );
        push(
            format!("idle: RSS per connection ({connections} idle), KiB"),
            true,
            i,
            idle.bytes_per_connection / 1024.0,
        );
        push(format!("idle: CPU with {connections} idle, % of a core"), true, i, idle.cpu_percent);
        push(format!("idle: time to open {connections}, s"), true, i, idle.connect_seconds);
        drop(server);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let server = start(*kind, binary, "fan", cpu).await?;
        for &rate in rates {
            let f = fanout_on(&server, subscribers, rate, seconds).await?;
            println!(
                "{}",
                json!({"scenario": "compare/fanout", "machine": process::machine(), "result": f.record})
            );
            let step = format!("{subscribers} subs × {rate} msg/s");
            push(format!("{step}: deliveries/s"), false, i, f.per_second);
            push(
                format!("{step}: delivered, %"),
                false,
                i,
                f.delivered as f64 * 100.0 / f.expected.max(1) as f64,
            );
            push(format!("{step}: server CPU per delivery, µs"), true, i, f.cpu_us_per_delivery);
            push(format!("{step}: p50 latency, ms"), true, i, f.p50);
            push(format!("{step}: p99 latency, ms"), true, i, f.p99);
        }
        drop(server);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!();
    println!(
        "Machine: {}. Same clients, same machine, servers started fresh and run back to back{}.",
        process::machine(),
        if pin { "; each server on CPU 0 alone, the clients on the others" } else { "" }
    );
    println!();
    println!(
        "| | {} | {} | {} | changegate vs {} | changegate vs {} |",
        names[0], names[1], names[2], names[1], names[2]
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, lower_is_better, values) in &rows {
        // "2.5× better" reads the same way for every metric, whichever direction is good.
        let versus = |other: f64| {
            let (ours, theirs) = (values[0], other);
            if !(ours > 0.0 && theirs > 0.0) {
                return "–".to_owned();
            }
            let ratio = if *lower_is_better { theirs / ours } else { ours / theirs };
            if ratio >= 1.0 { format!("{ratio:.2}× better") } else { format!("{:.2}× worse", 1.0 / ratio) }
        };
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            figure(values[0]),
            figure(values[1]),
            figure(values[2]),
            versus(values[1]),
            versus(values[2])
        );
    }
    Ok(())
}

fn figure(value: f64) -> String {
    if value.is_nan() {
        "–".into()
    } else if value >= 1000.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}
