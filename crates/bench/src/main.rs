//! `changegate-bench`: starts the release gateway as a child process and measures it from the
//! outside — connections held, deliveries per second, publish/commit → receive latency — the way
//! a user's clients would see it. It reports figures; it asserts nothing about time. On a
//! 2-core machine the load generator shares the cores with the gateway: every figure is for both
//! processes on one machine, and is a lower bound for the gateway alone.

mod process;
mod servers;
mod sse;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::sync::watch;

use process::Gateway;
use sse::Seen;

#[derive(Parser)]
#[command(name = "changegate-bench", about = "Benchmark scenarios for changegate")]
struct Cli {
    /// The gateway binary (default: `changegate` next to this binary — build both with --release).
    #[arg(long, global = true)]
    gateway: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle SSE connections; report gateway RSS per connection and idle CPU.
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// How long to watch idle CPU.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Run the gateway on PostgreSQL (a fresh `changegate_bench` database on this server),
        /// the connections subscribed to a captured table; default: the memory engine.
        #[arg(long)]
        database_url: Option<String>,
        #[command(flatten)]
        external: servers::External,
    },
    /// S subscribers on one topic; publish at stepped rates; deliveries/s and latency.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Publishes per second, one step each.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
        rates: Vec<u64>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[command(flatten)]
        external: servers::External,
    },
    /// `idle` and `fanout` against changegate, nginx + nchan (installed with apt-get if missing)
    /// and a naive Node SSE server, each started fresh, back to back: one table with ratios.
    Compare {
        /// Idle connections.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Fan-out subscribers.
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        /// Fan-out publish rates, one step each.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        rates: Vec<u64>,
        /// Seconds per step.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Each server on CPU 0 alone, this bench's clients on the other CPUs (`taskset`).
        #[arg(long)]
        pin: bool,
    },
    /// What capture costs the host database: single-row commits/s from W concurrent writers
    /// into a captured table against the same table without capture, and a quiet tenant's
    /// commit rate alone and beside a hot tenant writing flat out (issue #13's figures).
    Capture {
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Server to create the `changegate_bench` database on.
        #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        database_url: String,
    },
    /// R commits/s into a realtime table with S subscribers; commit → receive latency.
    Postgres {
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        rates: Vec<u64>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rows inserted by each transaction.
        #[arg(long, default_value_t = 1)]
        rows_per_commit: u32,
        /// Server to create the `changegate_bench` database on.
        #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
        database_url: String,
    },
    /// T tenants × S subscribers, every tenant publishing; checks each got exactly its own events.
    Tenants {
        #[arg(long, default_value_t = 10)]
        tenants: usize,
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 200)]
        events: u64,
    },
    /// The per-event path in-process: a PostgreSQL NOTIFY payload decoded to an event and
    /// encoded as realtime SSE bytes (once per event, whatever the subscriber count).
    Decode {
        #[arg(long, default_value_t = 200_000)]
        iterations: u32,
    },
    /// Flag evaluation in-process (the OFREP engine): time per evaluation by kind of flag.
    Eval {
        #[arg(long, default_value_t = 200_000)]
        iterations: u32,
    },
    /// N readers that never read while M messages of B bytes are published: gateway RSS before,
    /// at the peak, and after the readers are gone (is the memory given back?).
    Stalled {
        /// Readers that never read.
        #[arg(long, default_value_t = 1000)]
        readers: usize,
        /// Messages published.
        #[arg(long, default_value_t = 50_000)]
        messages: u64,
        /// Bytes of data per message.
        #[arg(long, default_value_t = 1000)]
        bytes: usize,
    },
    /// K clients drop and reconnect with Last-Event-ID at once while publishing continues.
    Reconnect {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
}

/// A keys file for `tenants` tenants (`t0`, `t1`, …): `(anon, publish)` per tenant.
fn keys(tenants: usize) -> anyhow::Result<(PathBuf, Vec<(String, String)>)> {
    let mut entries = Vec::new();
    let mut pairs = Vec::new();
    for t in 0..tenants {
        let anon = format!("flc_anon_{:040x}", 0xa000_0000_u64 + t as u64);
        let publish = format!("flc_publish_{:040x}", 0xb000_0000_u64 + t as u64);
        entries.push(json!({"tenant": format!("t{t}"), "scope": "anon", "key": anon}));
        entries.push(json!({"tenant": format!("t{t}"), "scope": "publish", "key": publish}));
        pairs.push((anon, publish));
    }
    let path = std::env::temp_dir().join(format!("changegate-bench-keys-{}.json", std::process::id()));
    std::fs::write(&path, Value::Array(entries).to_string())?;
    Ok((path, pairs))
}

/// The i-th client's source address: 127.0.0.2 and up, 1 000 connections per address, so the
/// ephemeral port range never runs out and binding a port stays cheap.
fn source(i: usize) -> IpAddr {
    let n = u32::try_from(i / 1_000 + 2).unwrap_or(2);
    IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + n))
}

struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut us: Vec<u64>) -> Percentiles {
    us.sort_unstable();
    let at = |q: f64| {
        if us.is_empty() {
            return 0.0;
        }
        let i = ((us.len() as f64 - 1.0) * q).round() as usize;
        us[i] as f64 / 1000.0
    };
    Percentiles { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: at(1.0) }
}

fn report(scenario: &str, record: Value, row: String) {
    println!("{}", json!({"scenario": scenario, "machine": process::machine(), "result": record}));
    println!("| {scenario} | {row} |");
}

async fn subscribe_many(
    server: SocketAddr,
    n: usize,
    path: &dyn Fn(usize) -> (String, String, Option<String>),
    until: Option<u64>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Seen>>> {
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (p, key, tenant) = path(i);
        let target = sse::Target { server, local: source(i), path: &p, key: &key, last_id: None };
        let handle = sse::open(target, sse::Expect { tenant, until }, stop.clone())
            .await
            .with_context(|| format!("opening subscriber {i}"))?;
        handles.push(handle);
    }
    Ok(handles)
}

async fn collect(handles: Vec<tokio::task::JoinHandle<Seen>>) -> Vec<Seen> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(seen) = h.await {
            out.push(seen);
        }
    }
    out
}

/// Publishes `rate` messages per second for `seconds` to `topic`; returns how many it sent.
async fn publish_at(base: String, key: String, topic: &str, tenant: &str, rate: u64, seconds: u64) -> u64 {
    let url = format!("{base}/v1/events/publish");
    let body =
        |n: u64| json!({"topic": topic, "data": {"t": sse::now_us(), "tenant": tenant, "n": n}}).to_string();
    servers::publish_paced(&url, &key, &body, rate, seconds).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let binary = cli.gateway.unwrap_or_else(process::default_binary);
    match cli.scenario {
        Scenario::Idle { connections, seconds, database_url, external } => {
            idle(&binary, connections, seconds, database_url.as_deref(), &external).await
        }
        Scenario::Fanout { subscribers, rates, seconds, external } => {
            fanout(&binary, subscribers, &rates, seconds, &external).await
        }
        Scenario::Compare { connections, subscribers, rates, seconds, pin } => {
            servers::compare(&binary, connections, subscribers, &rates, seconds, pin).await
        }
        Scenario::Capture { writers, seconds, database_url } => {
            capture(&binary, writers, seconds, &database_url).await
        }
        Scenario::Postgres { subscribers, rates, seconds, rows_per_commit, database_url } => {
            postgres(&binary, subscribers, &rates, seconds, rows_per_commit, &database_url).await
        }
        Scenario::Tenants { tenants, subscribers, events } => {
            tenants_scenario(&binary, tenants, subscribers, events).await
        }
        Scenario::Reconnect { clients, rate, seconds } => reconnect(&binary, clients, rate, seconds).await,
        Scenario::Stalled { readers, messages, bytes } => stalled(&binary, readers, messages, bytes).await,
        Scenario::Decode { iterations } => decode(iterations),
        Scenario::Eval { iterations } => {
            eval(iterations);
            Ok(())
        }
    }
}

async fn stalled(
    binary: &std::path::Path,
    readers: usize,
    messages: u64,
    bytes: usize,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (keys_file, keys) = keys(1)?;
    let gw = Gateway::start(binary, &["--keys".into(), keys_file.display().to_string()], &[]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = gw.rss_kib();
    let (anon, publish) = keys[0].clone();
    let mut sockets = Vec::with_capacity(readers);
    for i in 0..readers {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(source(i), 0))?;
        let mut stream = socket.connect(gw.address).await?;
        let request = format!(
            "GET /v1/events/subscribe?topic=s&apikey={anon} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        // Never read: the kernel's buffers fill, then the gateway's.
        sockets.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/events/publish", gw.address);
    let data = "x".repeat(bytes);
    let mut peak = gw.rss_kib();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..messages {
        let request = http.post(&url).header("apikey", &publish).json(&json!({"topic": "s", "data": data}));
        inflight.spawn(async move { request.send().await.is_ok() });
        while inflight.len() > 64 {
            let _ = inflight.join_next().await;
        }
        if i % 1000 == 0 {
            peak = peak.max(gw.rss_kib());
        }
    }
    while inflight.join_next().await.is_some() {}
    peak = peak.max(gw.rss_kib());
    drop(sockets);
    // Past the write timeout (30 s), so every stalled connection is certainly gone.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let after = gw.rss_kib();
    let metrics = http.get(format!("http://{}/metrics", gw.address)).send().await?.text().await?;
    let streams_left = metrics
        .lines()
        .find(|l| l.starts_with("changegate_streams_open{"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    report(
        "stalled",
        json!({"readers": readers, "messages": messages, "bytes": bytes,
               "rss_before_kib": before, "rss_peak_kib": peak, "rss_after_close_kib": after,
               "streams_left": streams_left}),
        format!(
            "{readers} stalled readers, {messages} × {bytes} B | RSS {} MiB → peak {} MiB → {} MiB 35 s after they left",
            before / 1024,
            peak / 1024,
            after / 1024
        ),
    );
    Ok(())
}

async fn idle(
    binary: &std::path::Path,
    connections: usize,
    seconds: u64,
    database_url: Option<&str>,
    external: &servers::External,
) -> anyhow::Result<()> {
    let server = match (servers::external(external)?, database_url) {
        (Some(server), _) => server,
        (None, Some(url)) => {
            let (url, key) = bench_database(binary, url).await?;
            let gw = Gateway::start(binary, &[], &[("DATABASE_URL".into(), url)]).await?;
            servers::Server::subscribe_only(gw, "/v1/events/subscribe?collection=bench", &key)
        }
        (None, None) => servers::changegate(binary, "idle").await?,
    };
    let idle = servers::idle_on(&server, connections, seconds).await?;
    report(
        "idle",
        idle.record,
        format!(
            "{connections} conns | {:.0} B RSS/conn | {:.2} % idle CPU | connected in {:.1} s",
            idle.bytes_per_connection, idle.cpu_percent, idle.connect_seconds
        ),
    );
    Ok(())
}

async fn fanout(
    binary: &std::path::Path,
    subscribers: usize,
    rates: &[u64],
    seconds: u64,
    external: &servers::External,
) -> anyhow::Result<()> {
    let server = match servers::external(external)? {
        Some(server) => server,
        None => servers::changegate(binary, "fan").await?,
    };
    for &rate in rates {
        let step = servers::fanout_on(&server, subscribers, rate, seconds).await?;
        report("fanout", step.record, step.row);
    }
    Ok(())
}

/// A fresh `changegate_bench` database on `server`: migrated, tenant `t0` with an anon key, and
/// a captured table `bench`. Returns its URL and the key.
async fn bench_database(binary: &std::path::Path, server: &str) -> anyhow::Result<(String, String)> {
    let (admin, connection) = tokio_postgres::connect(server, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    admin.batch_execute("drop database if exists changegate_bench with (force)").await?;
    admin.batch_execute("create database changegate_bench").await?;
    let url = format!("{}/changegate_bench", server.rsplit_once('/').map_or(server, |(b, _)| b));
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(binary).args(args).env("DATABASE_URL", &url).output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    cli(&["migrate"])?;
    cli(&["tenants", "create", "t0"])?;
    let key = cli(&["keys", "create", "--tenant", "t0", "--scope", "anon"])?
        .trim()
        .trim_start_matches("key=")
        .to_owned();
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    db.batch_execute(
        "create table bench (id bigserial primary key, tenant_id text not null, t bigint not null);
         select realtime.enable('bench', 'tenant_id');",
    )
    .await?;
    Ok((url, key))
}

/// `writers` connections each committing single-row inserts of `tenant` into `table` back to
/// back for `seconds`: commits per second, all writers together.
async fn commit_rate(url: &str, table: &str, tenants: &[&str], seconds: u64) -> anyhow::Result<f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut writers = tokio::task::JoinSet::new();
    for tenant in tenants {
        let (db, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let sql = format!("insert into {table} (tenant_id, t) values ($1, $2)");
        let tenant = (*tenant).to_owned();
        writers.spawn(async move {
            let statement = db.prepare(&sql).await?;
            let mut commits = 0u64;
            while tokio::time::Instant::now() < deadline {
                db.execute(&statement, &[&tenant, &0_i64]).await?;
                commits += 1;
            }
            anyhow::Ok(commits)
        });
    }
    let mut commits = 0;
    while let Some(done) = writers.join_next().await {
        commits += done??;
    }
    Ok(commits as f64 / seconds as f64)
}

async fn capture(binary: &std::path::Path, writers: usize, seconds: u64, server: &str) -> anyhow::Result<()> {
    let (url, key) = bench_database(binary, server).await?;
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    db.batch_execute(
        "create table plain (id bigserial primary key, tenant_id text not null, t bigint not null);
         -- The naive reference a user would write instead: NOTIFY the row from a trigger, in the
         -- user's transaction (no outbox, so no resume, no order across reconnects).
         create table naive (id bigserial primary key, tenant_id text not null, t bigint not null);
         create function naive_notify() returns trigger language plpgsql as $$
         begin
             perform pg_notify('naive_' || md5(NEW.tenant_id), row_to_json(NEW)::text);
             return null;
         end $$;
         create trigger naive after insert on naive for each row execute function naive_notify();",
    )
    .await?;
    // A gateway LISTENing with a subscriber on each tenant, as in production.
    let gw = Gateway::start(binary, &[], &[("DATABASE_URL".into(), url.clone())]).await?;
    let (stop_tx, stop) = watch::channel(false);
    let handles = subscribe_many(
        gw.address,
        1,
        &|_| ("/v1/events/subscribe?collection=bench".into(), key.clone(), None),
        None,
        &stop,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spread: Vec<String> = (0..writers).map(|i| format!("t{}", i % 2)).collect();
    let spread: Vec<&str> = spread.iter().map(String::as_str).collect();
    let plain = commit_rate(&url, "plain", &spread, seconds).await?;
    let captured = commit_rate(&url, "bench", &spread, seconds).await?;
    let naive = commit_rate(&url, "naive", &spread, seconds).await?;
    let hot = vec!["t0"; writers];
    let captured_one_tenant = commit_rate(&url, "bench", &hot, seconds).await?;
    report(
        "capture",
        json!({"writers": writers, "plain_commits_per_second": plain, "captured_commits_per_second": captured,
               "naive_notify_commits_per_second": naive,
               "captured_one_tenant_commits_per_second": captured_one_tenant}),
        format!(
            "{writers} writers, single-row commits \\| plain {plain:.0}/s, captured {captured:.0}/s ({:.0} % of plain), naive NOTIFY trigger {naive:.0}/s ({:.0} %), captured with every writer on one tenant {captured_one_tenant:.0}/s ({:.0} %)",
            100.0 * captured / plain,
            100.0 * naive / plain,
            100.0 * captured_one_tenant / plain
        ),
    );
    // A quiet tenant (one writer) alone, then beside a hot tenant writing flat out — on the
    // captured table, and on the plain one for what sharing the machine costs anyway.
    for table in ["bench", "plain"] {
        let alone = commit_rate(&url, table, &["t1"], seconds).await?;
        let quiet = {
            let url = url.clone();
            tokio::spawn(async move { commit_rate(&url, table, &["t1"], seconds).await })
        };
        let hot_tenant = vec!["t0"; writers.saturating_sub(1).max(1)];
        let hot_rate = commit_rate(&url, table, &hot_tenant, seconds).await?;
        let beside = quiet.await??;
        let what = if table == "bench" { "captured" } else { "plain table" };
        report(
            "capture",
            json!({"writers": writers, "table": table, "quiet_alone": alone, "quiet_beside_hot": beside, "hot": hot_rate}),
            format!(
                "{what}: a quiet tenant (1 writer) beside a hot one ({} writers, {hot_rate:.0}/s) \\| alone {alone:.0}/s, beside it {beside:.0}/s ({:+.0} %)",
                hot_tenant.len(),
                100.0 * (beside - alone) / alone
            ),
        );
    }
    let _ = stop_tx.send(true);
    collect(handles).await;
    Ok(())
}

async fn postgres(
    binary: &std::path::Path,
    subscribers: usize,
    rates: &[u64],
    seconds: u64,
    rows: u32,
    server: &str,
) -> anyhow::Result<()> {
    let (url, key) = bench_database(binary, server).await?;
    let mut writers_pool = Vec::new();
    for _ in 0..8 {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        writers_pool.push(Arc::new(client));
    }
    let gw = Gateway::start(binary, &[], &[("DATABASE_URL".into(), url.clone())]).await?;
    for &rate in rates {
        let (stop_tx, stop) = watch::channel(false);
        let handles = subscribe_many(
            gw.address,
            subscribers,
            &|_| ("/v1/events/subscribe?collection=bench".into(), key.clone(), None),
            None,
            &stop,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let total = rate * seconds;
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let started = tokio::time::Instant::now();
        let mut writers = tokio::task::JoinSet::new();
        let mut committed = 0u64;
        for i in 0..total {
            tokio::time::sleep_until(started + period.mul_f64(i as f64)).await;
            let db = writers_pool[usize::try_from(i).unwrap_or(0) % writers_pool.len()].clone();
            writers.spawn(async move {
                let t = i64::try_from(sse::now_us()).unwrap_or(0);
                let rows = i64::from(rows);
                db.execute("insert into bench (tenant_id, t) select 't0', $1::bigint from generate_series(1::bigint, $2::bigint)", &[&t, &rows])
                    .await
                    .is_ok()
            });
            while writers.len() > 32 {
                if let Some(ok) = writers.join_next().await {
                    committed += u64::from(ok.unwrap_or(false));
                }
            }
        }
        while let Some(ok) = writers.join_next().await {
            committed += u64::from(ok.unwrap_or(false));
        }
        let write_s = started.elapsed().as_secs_f64();
        // Past saturation the queue grows: let the sequencer drain it (at most 30 s), so
        // `delivered` counts what arrives, late or not, and the latencies show how late.
        let drain = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < drain {
            let queued: i64 =
                writers_pool[0].query_one("select count(*) from realtime.queue", &[]).await?.get(0);
            if queued == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = stop_tx.send(true);
        let seen = collect(handles).await;
        let delivered: u64 = seen.iter().map(|s| s.events).sum();
        let expected = committed * u64::from(rows) * subscribers as u64;
        let p = percentiles(seen.into_iter().flat_map(|s| s.latencies_us).collect());
        let commits_s = committed as f64 / write_s;
        let changes_s = commits_s * f64::from(rows);
        report(
            "postgres",
            json!({"subscribers": subscribers, "rate": rate, "rows_per_commit": rows, "committed": committed,
                   "commits_per_second": commits_s, "changes_per_second": changes_s,
                   "delivered": delivered, "expected": expected, "p50_ms": p.p50, "p90_ms": p.p90, "p99_ms": p.p99, "max_ms": p.max}),
            format!(
                "{subscribers} subs × {rate} commits/s × {rows} rows target ({commits_s:.0} commits/s, {changes_s:.0} changes/s achieved) | {delivered}/{expected} delivered | p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                p.p50, p.p90, p.p99, p.max
            ),
        );
    }
    Ok(())
}

async fn tenants_scenario(
    binary: &std::path::Path,
    tenants: usize,
    subscribers: usize,
    events: u64,
) -> anyhow::Result<()> {
    let (keys_file, keys) = keys(tenants)?;
    let gw = Gateway::start(binary, &["--keys".into(), keys_file.display().to_string()], &[]).await?;
    let (_stop_tx, stop) = watch::channel(false);
    let keys = Arc::new(keys);
    let per_tenant = subscribers;
    let k = keys.clone();
    let handles = subscribe_many(
        gw.address,
        tenants * per_tenant,
        &|i| {
            (
                "/v1/events/subscribe?topic=orders".into(),
                k[i / per_tenant].0.clone(),
                Some(format!("t{}", i / per_tenant)),
            )
        },
        Some(events),
        &stop,
    )
    .await?;
    let started = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    for (t, (_, publish)) in keys.iter().enumerate() {
        let base = format!("http://{}", gw.address);
        let publish = publish.clone();
        publishers
            .spawn(async move { publish_at(base, publish, "orders", &format!("t{t}"), events, 1).await });
    }
    while publishers.join_next().await.is_some() {}
    let seen = tokio::time::timeout(Duration::from_secs(30), collect(handles)).await.unwrap_or_default();
    let elapsed = started.elapsed().as_secs_f64();
    let exact = seen.iter().filter(|s| s.events == events && s.foreign == 0).count();
    let foreign: u64 = seen.iter().map(|s| s.foreign).sum();
    let delivered: u64 = seen.iter().map(|s| s.events).sum();
    report(
        "tenants",
        json!({"tenants": tenants, "subscribers_per_tenant": subscribers, "events_per_tenant": events,
               "subscribers_exact": exact, "subscribers": tenants * subscribers, "foreign_events": foreign,
               "deliveries_per_second": delivered as f64 / elapsed}),
        format!(
            "{tenants} tenants × {subscribers} subs × {events} events | {exact}/{} subscribers got exactly their own events, {foreign} foreign | {:.0} deliveries/s",
            tenants * subscribers,
            delivered as f64 / elapsed
        ),
    );
    Ok(())
}

async fn reconnect(binary: &std::path::Path, clients: usize, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let (keys_file, keys) = keys(1)?;
    let gw = Gateway::start(binary, &["--keys".into(), keys_file.display().to_string()], &[]).await?;
    let anon = keys[0].0.clone();
    let path = "/v1/events/subscribe?topic=re";
    let (stop_tx, stop) = watch::channel(false);
    let first =
        subscribe_many(gw.address, clients, &|_| (path.into(), anon.clone(), None), None, &stop).await?;
    let base = format!("http://{}", gw.address);
    let total = rate * seconds * 2;
    let publisher = tokio::spawn(publish_at(base, keys[0].1.clone(), "re", "t0", rate, seconds * 2));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    // Everyone drops at once…
    let _ = stop_tx.send(true);
    let before = collect(first).await;
    let (_stop_tx, stop) = watch::channel(false);
    let started = Instant::now();
    // …and comes back with its Last-Event-ID while publishing goes on, expecting every event
    // it has not seen.
    let mut handles = Vec::new();
    for (i, seen) in before.iter().enumerate() {
        let remaining = total.saturating_sub(seen.events);
        let target = sse::Target {
            server: gw.address,
            local: source(i),
            path,
            key: &anon,
            last_id: seen.last_id.as_deref(),
        };
        handles.push(
            sse::open(target, sse::Expect { tenant: None, until: Some(remaining) }, stop.clone()).await?,
        );
    }
    let reconnect_s = started.elapsed().as_secs_f64();
    let published = publisher.await.unwrap_or(0);
    let last_publish = Instant::now();
    let after = tokio::time::timeout(Duration::from_secs(60), collect(handles)).await.unwrap_or_default();
    let tail_ms = last_publish.elapsed().as_secs_f64() * 1000.0;
    let complete = before.iter().zip(&after).filter(|(b, a)| b.events + a.events == published).count();
    report(
        "reconnect",
        json!({"clients": clients, "published": published, "clients_complete": complete,
               "reconnect_seconds": reconnect_s, "caught_up_ms_after_last_publish": tail_ms}),
        format!(
            "{clients} clients reconnect at once | {complete}/{clients} received all {published} events exactly | all reconnected in {reconnect_s:.2} s; caught up {tail_ms:.0} ms after the last publish"
        ),
    );
    Ok(())
}

fn decode(iterations: u32) -> anyhow::Result<()> {
    use changegate::stream::sse::encode_realtime;
    let epoch = changegate_core::Epoch(7);
    for (name, document) in [
        ("small row (4 columns)", json!({"id": 42, "title": "buy milk", "done": false, "tenant_id": "acme"})),
        (
            "2 KiB row (nested JSON, 20 columns)",
            json!({
                "id": 42, "tenant_id": "acme", "title": "x".repeat(300), "notes": "y".repeat(900),
                "tags": ["a", "b", "c", "d", "e"], "done": false, "priority": 3, "estimate": 2.5,
                "owner": {"id": 7, "name": "Ada Lovelace", "email": "ada@example.com"},
                "created_at": "2026-11-25T10:00:00.000Z", "updated_at": "2026-11-25T10:05:00.000Z",
                "checklist": (0..10).map(|i| json!({"step": i, "text": format!("step {i}"), "ok": i % 2 == 0})).collect::<Vec<_>>(),
                "meta": {"source": "web", "version": 3, "flags": {"beta": true, "pinned": false}},
                "a": 1, "b": 2, "c": 3, "d": 4, "e": 5
            }),
        ),
    ] {
        // As the sequencer's NOTIFY carries one captured change (a batch of one row).
        let payload = json!([{
            "seq": 123_456, "tenant": "acme", "kind": "change", "collection": "public.todos", "topic": null,
            "op": "update", "document_id": "42", "payload": document, "at": 1_795_383_423_123_i64
        }])
        .to_string();
        let mut bytes = 0;
        let started = std::time::Instant::now();
        for _ in 0..iterations {
            let event = changegate_postgres::decode_notification(&payload, epoch)?
                .pop()
                .ok_or_else(|| anyhow::anyhow!("the payload carries its event"))?;
            bytes += encode_realtime(&event).len();
        }
        let per_event = started.elapsed().as_secs_f64() * 1e9 / f64::from(iterations);
        println!(
            "| decode | {name}, {} B payload \\| NOTIFY payload → event → SSE bytes: {per_event:.0} ns/event ({} B out) |",
            payload.len(),
            bytes / iterations as usize
        );
    }
    Ok(())
}

fn eval(iterations: u32) {
    use changegate_flags::eval::evaluate;
    let flag = |rules: Value| -> changegate_flags::Flag {
        serde_json::from_value(json!({
            "key": "checkout", "environment": "prod", "name": "checkout", "description": "", "enabled": true,
            "variants": {"a": "A", "b": "B"}, "defaultVariant": "a", "tags": [], "rules": rules, "version": 1,
            "createdAt": "", "updatedAt": ""
        }))
        .unwrap_or_else(|e| panic!("bench flag: {e}"))
    };
    let context: serde_json::Map<String, Value> = serde_json::from_value(
        json!({"targetingKey": "user-42", "country": "NL", "plan": "pro", "age": 42, "email": "ada@example.com", "version": "2.3.4"}),
    )
    .unwrap_or_default();
    let kinds = [
        ("static", flag(json!([]))),
        (
            "3 conditions",
            flag(json!([{"id": "r", "conditions": [
            {"attribute": "country", "operator": "in", "values": ["BE", "NL"]},
            {"attribute": "age", "operator": "gte", "values": [18]},
            {"attribute": "version", "operator": "semver_gt", "values": ["2.0.0"]}], "serve": {"variant": "b"}}])),
        ),
        (
            "rollout",
            flag(
                json!([{"id": "r", "serve": {"rollout": [{"variant": "a", "weight": 50}, {"variant": "b", "weight": 50}]}}]),
            ),
        ),
        (
            "regex",
            flag(json!([{"id": "r", "conditions": [
            {"attribute": "email", "operator": "matches", "values": ["^[a-z]+@example\\.com$"]}], "serve": {"variant": "b"}}])),
        ),
    ];
    let segments = std::collections::BTreeMap::new();
    for (kind, flag) in &kinds {
        let started = Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(evaluate(std::hint::black_box(flag), &segments, &context).is_ok());
        }
        let ns = started.elapsed().as_nanos() as f64 / f64::from(iterations);
        report(
            "eval",
            json!({"flag": kind, "iterations": iterations, "ns_per_evaluation": ns}),
            format!("{kind} | {ns:.0} ns/evaluation"),
        );
    }
}
