//! `changegate`: the command-line entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use changegate::jwt::JwtVerifier;
use changegate::{Limits, keys};
use changegate_core::{HubConfig, Retention};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "changegate",
    version,
    about = "A multi-tenant realtime database-change gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(Serve),
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
    /// Reconnect delay announced to clients with `retry:`.
    #[arg(long, env = "CHANGEGATE_RETRY", default_value = "2s", value_parser = duration)]
    retry: Duration,
    /// Events a subscriber may fall behind before it is disconnected (and resumes).
    #[arg(long, env = "CHANGEGATE_BUFFER", default_value_t = 1024)]
    buffer: usize,
    /// How long a feed without subscribers stays open.
    #[arg(long, env = "CHANGEGATE_GRACE", default_value = "5s", value_parser = duration)]
    grace: Duration,
    /// Memory engine: events kept per tenant for replay.
    #[arg(long, env = "CHANGEGATE_RETENTION_EVENTS", default_value_t = 10_000)]
    retention_events: usize,
    /// Memory engine: how long events are kept for replay.
    #[arg(long, env = "CHANGEGATE_RETENTION_AGE", default_value = "1h", value_parser = duration)]
    retention_age: Duration,
    /// Largest accepted publish body, in bytes.
    #[arg(long, env = "CHANGEGATE_MAX_BODY", default_value_t = 256 * 1024)]
    max_body: usize,
    /// How long shutdown waits for streams to drain.
    #[arg(long, env = "CHANGEGATE_DRAIN", default_value = "5s", value_parser = duration)]
    drain: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHANGEGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: Serve) -> anyhow::Result<()> {
    let keys = match &args.keys {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading key file {}", path.display()))?;
            keys::parse_key_file(&text)
                .with_context(|| format!("loading key file {}", path.display()))?
        }
        None => {
            let (keys, issued) = keys::dev_keys();
            for key in &issued {
                println!(
                    "dev key tenant={} scope={} key={}",
                    keys::dev_tenant(),
                    key.scope(),
                    key.expose()
                );
            }
            keys
        }
    };
    let state = changegate::memory_state(
        keys,
        Retention {
            max_events: args.retention_events,
            max_age: args.retention_age,
        },
        HubConfig {
            buffer: args.buffer,
            grace: args.grace,
        },
        args.jwt_secret
            .as_deref()
            .map(|s| JwtVerifier::new(s.as_bytes())),
        Limits {
            heartbeat: args.heartbeat,
            retry: args.retry,
            max_body: args.max_body,
        },
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    println!("listening on http://{address}");
    if args.keys.is_none() {
        println!(
            "try: curl -N 'http://{address}/v1/events/subscribe?topic=*&apikey=<the anon key above>'"
        );
    }

    let closing = state.closing.clone();
    let server = changegate::run(listener, state, args.drain);
    let signal = async {
        shutdown_signal().await;
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

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
