//! `changegate`: the command-line entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use changegate::auth::jwt::JwtVerifier;
use changegate::auth::keys;
use changegate::state::{AppState, Options};
use changegate::{Engine, Limits};
use changegate_core::{EnvironmentId, Hub, HubConfig, Retention, Scope, TenantId};
use changegate_postgres::{PgConfig, PgEngine, Store};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "changegate", version, about = "A multi-tenant realtime database-change gateway")]
struct Cli {
    /// Log format on stderr: `text` or `json` (one JSON object per line).
    #[arg(long, global = true, env = "CHANGEGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// PostgreSQL connection string; without it `serve` runs the memory engine.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(Box<Serve>),
    /// Apply the database migrations (schema `realtime`).
    Migrate,
    /// Manage tenants.
    #[command(subcommand)]
    Tenants(Tenants),
    /// Manage environments of a tenant.
    #[command(subcommand)]
    Environments(Environments),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(Keys),
    /// Turn change capture on or off for a table.
    #[command(subcommand)]
    Realtime(Realtime),
    /// Ask a running gateway whether it is ready (`GET /readyz`); exits 0 only on `200`. For
    /// container health checks, which have no HTTP client in the image.
    Probe {
        /// The gateway's address.
        #[arg(long, env = "CHANGEGATE_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The path to ask.
        #[arg(long, default_value = "/readyz")]
        path: String,
    },
}

#[derive(Subcommand)]
enum Tenants {
    /// Create a tenant.
    Create {
        /// Its id: 1–128 of `[A-Za-z0-9_.-]`.
        name: String,
    },
    /// List tenants.
    List,
}

#[derive(Subcommand)]
enum Environments {
    /// Create an environment.
    Create {
        /// The tenant it belongs to.
        #[arg(long)]
        tenant: String,
        /// Its name.
        name: String,
    },
    /// List a tenant's environments.
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum Keys {
    /// Create a key; prints `key=<key>`, the only time it is shown.
    Create {
        /// The tenant it belongs to.
        #[arg(long)]
        tenant: String,
        /// Limit it to one environment.
        #[arg(long)]
        environment: Option<String>,
        /// anon, sdk, stream, publish or service.
        #[arg(long)]
        scope: String,
    },
    /// List keys (ids, prefixes, scopes; never the keys).
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Rotate a key: prints `key=<new key>`; the old one keeps working for `--grace`, then its
    /// streams close on every instance.
    Rotate {
        /// The key's id (from `keys list`).
        id: String,
        /// How long the old key keeps working.
        #[arg(long, default_value = "0s", value_parser = duration)]
        grace: Duration,
    },
    /// Revoke a key; its open streams close on every instance.
    Revoke {
        /// The key's id (from `keys list`).
        id: String,
    },
}

#[derive(Subcommand)]
enum Realtime {
    /// Capture a table's changes (`select realtime.enable(table, column)`).
    Enable {
        /// `table` or `schema.table`.
        table: String,
        /// The column holding the tenant id.
        #[arg(long, default_value = "tenant_id")]
        tenant_column: String,
    },
    /// Stop capturing a table.
    Disable {
        /// `table` or `schema.table`.
        table: String,
    },
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[derive(clap::Args)]
struct Serve {
    /// Address to listen on.
    #[arg(long, env = "CHANGEGATE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// JSON key file for the memory engine; without it a `dev` tenant with fresh keys is created.
    #[arg(long, env = "CHANGEGATE_KEYS")]
    keys: Option<PathBuf>,
    /// HS256 secret for JWTs (claims: `tenant`, `exp`, optional `nbf`).
    #[arg(long, env = "CHANGEGATE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Heartbeat comment interval on realtime streams.
    #[arg(long, env = "CHANGEGATE_HEARTBEAT", default_value = "15s", value_parser = duration)]
    heartbeat: Duration,
    /// Heartbeat interval of `/api/v1/stream` (comment lines).
    #[arg(long, env = "CHANGEGATE_HEARTBEAT_FLAGS_A", default_value = "30s", value_parser = duration)]
    heartbeat_flags_a: Duration,
    /// Ping interval of `/stream` and `/v1/sdk/stream` (`event: ping`).
    #[arg(long, env = "CHANGEGATE_HEARTBEAT_FLAGS_B", default_value = "30s", value_parser = duration)]
    heartbeat_flags_b: Duration,
    /// Heartbeat interval of `/api/v1/flags/events` (`event: heartbeat`).
    #[arg(long, env = "CHANGEGATE_HEARTBEAT_FLAGS_C", default_value = "15s", value_parser = duration)]
    heartbeat_flags_c: Duration,
    /// Origins browsers may call from, comma-separated; `*` allows any.
    #[arg(long, env = "CHANGEGATE_CORS_ORIGINS", value_delimiter = ',', default_value = "*")]
    cors_origins: Vec<String>,
    /// MongoDB (a replica set) for `?collection=…&source=mongo`.
    #[arg(long, env = "MONGODB_URL", hide_env_values = true)]
    mongodb_url: Option<String>,
    /// The MongoDB database holding the collections.
    #[arg(long, env = "CHANGEGATE_MONGODB_DATABASE", default_value = "app")]
    mongodb_database: String,
    /// The document field holding the tenant id.
    #[arg(long, env = "CHANGEGATE_MONGODB_TENANT_FIELD", default_value = "tenantId")]
    mongodb_tenant_field: String,
    /// MongoDB connections: each open change stream holds one while its getMore waits.
    #[arg(long, env = "CHANGEGATE_MONGODB_POOL", default_value_t = 100)]
    mongodb_pool: u32,
    /// How long a change stream's getMore waits for changes.
    #[arg(long, env = "CHANGEGATE_MONGODB_MAX_AWAIT", default_value = "1s", value_parser = duration)]
    mongodb_max_await: Duration,
    /// OFREP evaluations allowed per second per key, on average (0: unlimited); over it, `429`
    /// + `Retry-After`. Server-side OFREP providers do not cache: every flag read is a request.
    #[arg(long, env = "CHANGEGATE_OFREP_RATE_LIMIT", default_value_t = 5000)]
    ofrep_rate_limit: u32,
    /// OFREP evaluations a key may make at once before the rate applies.
    #[arg(long, env = "CHANGEGATE_OFREP_BURST", default_value_t = 10_000)]
    ofrep_burst: u32,
    /// Label stream metrics with the tenant (one series per tenant: mind the cardinality).
    /// Tenant names are then visible to whoever reads `/metrics`: set `--metrics-token` too.
    #[arg(long, env = "CHANGEGATE_METRICS_TENANTS")]
    metrics_tenants: bool,
    /// Require `Authorization: Bearer <token>` on `/metrics`.
    #[arg(long, env = "CHANGEGATE_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Reconnect delay announced to clients with `retry:`.
    #[arg(long, env = "CHANGEGATE_RETRY", default_value = "2s", value_parser = duration)]
    retry: Duration,
    /// Events a subscriber may fall behind before it is disconnected (and resumes).
    #[arg(long, env = "CHANGEGATE_BUFFER", default_value_t = 1024)]
    buffer: usize,
    /// How long a feed without subscribers stays open.
    #[arg(long, env = "CHANGEGATE_GRACE", default_value = "5s", value_parser = duration)]
    grace: Duration,
    /// Apply migrations before serving (PostgreSQL engine).
    #[arg(long, env = "CHANGEGATE_MIGRATE")]
    migrate: bool,
    /// PostgreSQL engine on a read replica: the URL of the primary's gateway, named in the 503
    /// that refuses writes here (without it, the primary database's address is named).
    #[arg(long, env = "CHANGEGATE_PRIMARY_URL")]
    primary_url: Option<String>,
    /// PostgreSQL engine: connections in the query pool.
    #[arg(long, env = "CHANGEGATE_PG_POOL", default_value_t = 8)]
    pg_pool: usize,
    /// PostgreSQL engine: at most this many outbox rows are kept for replay per channel (one
    /// tenant's table, or its messages or flags), so no tenant can evict another's history.
    #[arg(long, env = "CHANGEGATE_OUTBOX_MAX_ROWS_PER_CHANNEL", default_value_t = 100_000)]
    outbox_max_rows_per_channel: u64,
    /// PostgreSQL engine: how often the outbox is pruned.
    #[arg(long, env = "CHANGEGATE_PRUNE_EVERY", default_value = "30s", value_parser = duration)]
    prune_every: Duration,
    /// Memory engine: events kept per tenant for replay.
    #[arg(long, env = "CHANGEGATE_RETENTION_EVENTS", default_value_t = 10_000)]
    retention_events: usize,
    /// How long events are kept for replay (both engines).
    #[arg(long, env = "CHANGEGATE_RETENTION_AGE", default_value = "1h", value_parser = duration)]
    retention_age: Duration,
    /// Longest catch-up served to a resuming client, in events; one further behind gets `reset`
    /// (it refetches its state) instead of a long replay.
    #[arg(long, env = "CHANGEGATE_REPLAY_MAX", default_value_t = 100_000)]
    replay_max: u64,
    /// Largest accepted publish body, in bytes.
    #[arg(long, env = "CHANGEGATE_MAX_BODY", default_value_t = 256 * 1024)]
    max_body: usize,
    /// Largest accepted JSON body of the flag, segment, key and OFREP routes, in bytes.
    #[arg(long, env = "CHANGEGATE_MAX_JSON_BODY", default_value_t = 1024 * 1024)]
    max_json_body: usize,
    /// A write blocked this long closes its connection (a peer that stopped reading, or vanished).
    #[arg(long, env = "CHANGEGATE_WRITE_TIMEOUT", default_value = "30s", value_parser = duration)]
    write_timeout: Duration,
    /// Time a connection has to send a complete request head, from when it is accepted and again
    /// after each response on a kept-alive connection (so also the keep-alive idle timeout).
    #[arg(long, env = "CHANGEGATE_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    header_timeout: Duration,
    /// Connections served at once (default: the open-file limit minus headroom); past it, new
    /// connections get `503` + `Retry-After`, except for `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "CHANGEGATE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections accepted beyond `--max-connections` for `/healthz`, `/readyz`, `/metrics`.
    #[arg(long, env = "CHANGEGATE_RESERVED_CONNECTIONS", default_value_t = 64)]
    reserved_connections: usize,
    /// How long shutdown waits for streams to drain.
    #[arg(long, env = "CHANGEGATE_DRAIN", default_value = "5s", value_parser = duration)]
    drain: Duration,
    /// Runtime worker threads (default: one per core). Fewer leaves cores to what shares the
    /// machine (the database, a sidecar).
    #[arg(long, env = "CHANGEGATE_WORKERS")]
    workers: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(args) = &cli.command
        && let Some(workers) = args.workers
    {
        runtime.worker_threads(workers.max(1));
    }
    runtime.enable_all().build().context("starting the runtime")?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHANGEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
    match cli.command {
        Command::Serve(args) => serve(*args, cli.database_url).await,
        Command::Probe { listen, path } => probe(listen, &path).await,
        command => admin(command, cli.database_url.as_deref()).await,
    }
}

async fn admin(command: Command, url: Option<&str>) -> anyhow::Result<()> {
    let url = url.context("this command needs a database: set DATABASE_URL or pass --database-url")?;
    let store = Store::connect(url, 2)?;
    match command {
        Command::Serve(_) | Command::Probe { .. } => anyhow::bail!("not an administration command"),
        Command::Migrate => {
            let applied = store.migrate().await?;
            println!("migrations applied: {applied:?}");
        }
        Command::Tenants(Tenants::Create { name }) => {
            store.create_tenant(&TenantId::parse(&name)?).await?;
            println!("tenant={name}");
        }
        Command::Tenants(Tenants::List) => {
            for tenant in store.tenants().await? {
                println!("tenant={tenant}");
            }
        }
        Command::Environments(Environments::List { tenant }) => {
            for environment in store.environments(&TenantId::parse(&tenant)?).await? {
                println!("environment={environment} tenant={tenant}");
            }
        }
        Command::Environments(Environments::Create { tenant, name }) => {
            store.create_environment(&TenantId::parse(&tenant)?, &EnvironmentId::parse(&name)?).await?;
            println!("environment={name} tenant={tenant}");
        }
        Command::Keys(Keys::Create { tenant, environment, scope }) => {
            let scope: Scope = scope.parse()?;
            let environment = environment.as_deref().map(EnvironmentId::parse).transpose()?;
            let (_id, key) =
                store.create_key(&TenantId::parse(&tenant)?, environment.as_ref(), scope).await?;
            println!("key={}", key.expose());
        }
        Command::Keys(Keys::List { tenant }) => {
            let tenant = tenant.as_deref().map(TenantId::parse).transpose()?;
            for key in store.list_keys(tenant.as_ref()).await? {
                println!(
                    "id={} tenant={} environment={} scope={} prefix={} revoked={}",
                    key.id,
                    key.tenant,
                    key.environment.as_deref().unwrap_or("-"),
                    key.scope,
                    key.prefix,
                    key.revoked
                );
            }
        }
        Command::Keys(Keys::Rotate { id, grace }) => {
            let (_id, key, expires) = store
                .rotate_key(None, &id, grace)
                .await?
                .with_context(|| format!("no live key with id {id}"))?;
            println!("key={}", key.expose());
            eprintln!("the previous key stops working at {}", expires.rfc3339());
        }
        Command::Keys(Keys::Revoke { id }) => {
            anyhow::ensure!(store.revoke_key(&id).await?, "no key with id {id}");
            println!("revoked={id}");
        }
        Command::Realtime(Realtime::Enable { table, tenant_column }) => {
            store.enable_table(&table, &tenant_column).await?;
            println!("realtime enabled on {table} (tenant column {tenant_column})");
        }
        Command::Realtime(Realtime::Disable { table }) => {
            store.disable_table(&table).await?;
            println!("realtime disabled on {table}");
        }
    }
    Ok(())
}

async fn serve(args: Serve, database_url: Option<String>) -> anyhow::Result<()> {
    let stop = shutdown_signal().context("installing the SIGTERM/SIGINT handlers")?;
    let limits = Limits {
        heartbeat: args.heartbeat,
        retry: args.retry,
        max_body: args.max_body,
        flags_heartbeat: [args.heartbeat_flags_a, args.heartbeat_flags_b, args.heartbeat_flags_c],
        cors_origins: args.cors_origins.clone(),
        metrics_tenants: args.metrics_tenants,
        replay_max: args.replay_max,
        max_json_body: args.max_json_body,
        metrics_token: args.metrics_token.clone(),
    };
    if args.metrics_tenants && args.metrics_token.is_none() {
        tracing::warn!("--metrics-tenants without --metrics-token: /metrics lists tenant names to anyone");
    }
    let jwt = args.jwt_secret.as_deref().map(|s| JwtVerifier::new(s.as_bytes()));
    let closing = CancellationToken::new();
    // One hub: every source below delivers into it.
    let hub = Hub::new(HubConfig { buffer: args.buffer, grace: args.grace });
    let engine = match database_url.as_deref() {
        Some(url) => {
            anyhow::ensure!(
                args.keys.is_none(),
                "--keys is for the memory engine; with a database, keys live in it"
            );
            let store = Store::connect(url, args.pg_pool)?;
            if args.migrate {
                // A replica takes its schema from the primary, by replication.
                if store.is_replica().await.context("connecting to PostgreSQL")? {
                    tracing::warn!("--migrate ignored: the database is a read replica (migrate the primary)");
                } else {
                    store.migrate().await.context("applying migrations")?;
                }
            }
            let config = PgConfig {
                retention_age: args.retention_age,
                rows_per_channel: args.outbox_max_rows_per_channel,
                prune_every: args.prune_every,
                primary: args.primary_url.clone(),
            };
            let engine = PgEngine::start(store, config, hub.clone(), closing.clone())
                .await
                .context("starting the PostgreSQL engine")?;
            Engine::Postgres(std::sync::Arc::new(engine))
        }
        None => memory(&args, hub.clone())?,
    };
    #[cfg(not(feature = "mongo"))]
    let mongo = {
        anyhow::ensure!(
            args.mongodb_url.is_none(),
            "--mongodb-url: this build of changegate has no MongoDB support (built without the `mongo` feature)"
        );
        None
    };
    #[cfg(feature = "mongo")]
    let mongo = match &args.mongodb_url {
        Some(url) => {
            let config = changegate::mongo::MongoConfig {
                url: url.clone(),
                database: args.mongodb_database.clone(),
                tenant_field: args.mongodb_tenant_field.clone(),
                max_await: args.mongodb_max_await,
                pool: args.mongodb_pool,
            };
            let source = changegate::mongo::MongoSource::connect(&config, hub.clone(), closing.clone())
                .await
                .context("configuring MongoDB")?;
            Some(std::sync::Arc::new(source))
        }
        None => None,
    };
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])?
        .install_recorder()?;
    let options = Options {
        jwt,
        limits,
        ofrep_rate: changegate::auth::rate::RateLimiter::new(args.ofrep_rate_limit, args.ofrep_burst),
        metrics: Some(metrics),
    };
    let state = AppState::new(engine, hub, mongo, closing, options);
    let listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    println!("listening on http://{address}");
    if args.keys.is_none() && database_url.is_none() {
        println!("try: curl -N 'http://{address}/v1/events/subscribe?topic=*&apikey=<the anon key above>'");
    }

    let open_files = changegate::net::server::open_file_limit();
    let max_connections = args.max_connections.unwrap_or_else(|| {
        changegate::net::server::ConnectionLimits::default_cap(
            open_files.unwrap_or(1024),
            args.reserved_connections,
        )
    });
    tracing::info!(
        open_files = open_files.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
        max_connections,
        reserved = args.reserved_connections,
        header_timeout = ?args.header_timeout,
        "connection limits"
    );
    let limits = changegate::net::server::ConnectionLimits {
        header_timeout: args.header_timeout,
        max_connections,
        reserved: args.reserved_connections,
        write_timeout: args.write_timeout,
    };
    let closing = state.closing.clone();
    let server = changegate::run(listener, state, limits, args.drain);
    let signal = async {
        stop.await;
        tracing::info!("shutting down: ending streams");
        closing.cancel();
        std::future::pending::<()>().await;
    };
    tokio::select! {
        result = server => result?,
        () = signal => {}
    }
    tracing::info!("stopped");
    Ok(())
}

/// `GET <path>` on `listen` (a wildcard address means this host), within two seconds.
async fn probe(listen: SocketAddr, path: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut address = listen;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        anyhow::Ok(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    let head = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .with_context(|| format!("{address} did not answer within 2 s"))??;
    let status = head.split_whitespace().nth(1).unwrap_or("none");
    anyhow::ensure!(status == "200", "GET {path} on {address} answered {status}");
    println!("ready");
    Ok(())
}

fn memory(args: &Serve, hub: Hub) -> anyhow::Result<Engine> {
    let keys = match &args.keys {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            keys::parse_key_file(&text).with_context(|| format!("loading key file {}", path.display()))?
        }
        None => {
            let (keys, issued) = keys::dev_keys();
            for key in &issued {
                println!("dev key tenant={} scope={} key={}", keys::dev_tenant(), key.scope(), key.expose());
            }
            keys
        }
    };
    let retention = Retention { max_events: args.retention_events, max_age: args.retention_age };
    Ok(Engine::memory(keys, retention, hub))
}

/// Registers the SIGTERM and SIGINT handlers now — so a signal that arrives while the gateway
/// is still starting is not lost to the default action — and resolves on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
