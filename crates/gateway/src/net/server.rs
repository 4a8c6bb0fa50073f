//! The accept loop: every connection is bounded in time and in number.
//!
//! The failure this exists for: connections that send nothing, send their request head one byte
//! a second (slowloris), or sit idle after a response used to stay open forever. Some 20 000 of
//! them exhaust the process's file descriptors, after which every new connection — `/healthz`
//! included — times out, and nothing is logged. So:
//!
//! * a connection must deliver a complete request head within `header_timeout`, counted from
//!   when it is accepted and again from the end of each response on a kept-alive connection
//!   (hyper's header-read timer, which covers the idle keep-alive time too); an SSE stream is
//!   not affected once its request was read;
//! * at most `max_connections` are served normally. Past that, up to `reserved` more are
//!   accepted for the operations routes only (`/healthz`, `/readyz`, `/metrics`), and every
//!   other request on them gets a fast `503` with `Retry-After`; past that, connections are
//!   closed as soon as they are accepted. Established streams are never touched;
//! * each refusal is counted (`changegate_connections_refused_total{reason}`) and logged at most
//!   once per ten seconds, with how many were suppressed.
//!
//! Writes that stay blocked are bounded separately, by [`crate::net::stall`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::net::direct::{self, Head, Rewind};
use crate::net::stall::Guarded;

/// Connection limits.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Time a connection has to send a complete request head (also the keep-alive idle time).
    pub header_timeout: Duration,
    /// Connections served normally.
    pub max_connections: usize,
    /// Connections accepted beyond `max_connections` for the operations routes only.
    pub reserved: usize,
    /// A write blocked this long closes its connection.
    pub write_timeout: Duration,
}

impl ConnectionLimits {
    /// The default cap for a process allowed `open_files` descriptors: room is left for the
    /// database pools, the LISTEN connection, logs and the reserved operations connections.
    pub fn default_cap(open_files: u64, reserved: usize) -> usize {
        let headroom = 256 + reserved as u64;
        usize::try_from(open_files.saturating_sub(headroom).max(64)).unwrap_or(usize::MAX)
    }
}

/// The soft limit on open files of this process (`/proc/self/limits`), if it can be read.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Most bytes hyper buffers per connection, read or write (its minimum is 8 KiB).
const MAX_BUF: usize = 64 * 1024;

/// Paths served on a connection accepted beyond the cap.
const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// A log line at most every ten seconds, saying how many were suppressed in between.
struct RateLimitedLog {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
    started: tokio::time::Instant,
}

impl RateLimitedLog {
    fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            started: tokio::time::Instant::now(),
        }
    }

    fn warn(&self, reason: &'static str, open: usize) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX).max(1);
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= 10_000;
        if due && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(
                reason,
                open,
                suppressed,
                "connection refused: the gateway is at its connection cap"
            );
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a connection as open until dropped.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("changegate_connections_open").decrement(1.0);
    }
}

/// Serves `router` on `listener` until `closing` is cancelled; then stops accepting, lets every
/// connection finish its response (streams end with their `retry:` hint) and returns when the
/// last one has closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(RateLimitedLog::new());
    // Every connection task holds a receiver; `closed()` resolves when the last one ends.
    let (all_closed, alive) = watch::channel(());
    loop {
        let (stream, _peer) = tokio::select! {
            () = closing.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: back off
                    // briefly instead of spinning.
                    log.warn("accept failed", open.load(Ordering::Relaxed));
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let count = open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("changegate_connections_open").increment(1.0);
        let guard = Open(open.clone());
        if count > limits.max_connections.saturating_add(limits.reserved) {
            metrics::counter!("changegate_connections_refused_total", "reason" => "closed_at_accept")
                .increment(1);
            log.warn("closed at accept", count);
            drop((stream, guard));
            continue;
        }
        let over_cap = count > limits.max_connections;
        if over_cap {
            log.warn("operations routes only", count);
        }
        let _ = stream.set_nodelay(true);
        let service = if over_cap {
            router.clone().layer(axum::middleware::from_fn(reserved_only))
        } else {
            router.clone()
        };
        let (closing, alive) = (closing.clone(), alive.clone());
        tokio::spawn(async move {
            connection(stream, service, limits, over_cap, &closing).await;
            drop((guard, alive));
        });
    }
    drop(alive);
    all_closed.closed().await;
}

/// Serves one accepted connection to its end. Streams are served by [`direct`] once their
/// head is read; the rest by hyper, with the bytes read so far put back. Beyond the cap
/// everything goes to hyper.
async fn connection(
    mut stream: TcpStream,
    service: Router,
    limits: ConnectionLimits,
    over_cap: bool,
    closing: &CancellationToken,
) {
    let mut prefix = Vec::new();
    if !over_cap {
        let head = tokio::select! {
            () = closing.cancelled() => return,
            head = tokio::time::timeout(limits.header_timeout, direct::read_head(&mut stream)) => head,
        };
        match head {
            Err(_elapsed) => return head_timed_out(),
            Ok(Head::Closed) => return,
            Ok(Head::Complete(bytes)) => match direct::take(&bytes) {
                Some(request) => {
                    drop(bytes);
                    let Ok(response) = tower::ServiceExt::oneshot(service, request).await;
                    return direct::respond(stream, response, limits.write_timeout).await;
                }
                None => prefix = bytes,
            },
            Ok(Head::Other(bytes)) => prefix = bytes,
        }
    }
    // Boxed: hyper's connection state is large, and an idle stream's task should not carry
    // room for it.
    Box::pin(with_hyper(
        Rewind::new(prefix, Guarded::new(stream, limits.write_timeout)),
        service,
        limits,
        over_cap,
        closing,
    ))
    .await;
}

/// Serves a connection with hyper until it ends (or, on shutdown, its response is done).
async fn with_hyper(
    io: Rewind<Guarded>,
    service: Router,
    limits: ConnectionLimits,
    over_cap: bool,
    closing: &CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper queues response bytes up to `max_buf_size` per connection (default ~400 KB): a
    // thousand readers that stopped reading would pin 400 MB. A stream needs far less — a
    // lagging one is cut off by the hub anyway.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(!over_cap)
        .max_buf_size(MAX_BUF);
    let connection =
        http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)).with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => finished(result),
        () = closing.cancelled() => {
            connection.as_mut().graceful_shutdown();
            finished(connection.await);
        }
    }
}

/// A connection that sent no complete request head in time.
fn head_timed_out() {
    metrics::counter!("changegate_connections_refused_total", "reason" => "header_timeout").increment(1);
    tracing::debug!("closed a connection that sent no complete request head in time");
}

fn finished(result: Result<(), hyper::Error>) {
    if let Err(error) = result {
        if error.is_timeout() {
            metrics::counter!("changegate_connections_refused_total", "reason" => "header_timeout")
                .increment(1);
            tracing::debug!("closed a connection that sent no complete request head in time");
        } else {
            tracing::debug!(%error, "connection ended with an error");
        }
    }
}

/// On a connection beyond the cap: the operations routes, and a fast `503` for everything else.
async fn reserved_only(request: Request, next: axum::middleware::Next) -> Response {
    if RESERVED_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    metrics::counter!("changegate_connections_refused_total", "reason" => "at_cap").increment(1);
    let mut response =
        ApiError::Unavailable("the gateway is at its connection cap; retry shortly".into()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
