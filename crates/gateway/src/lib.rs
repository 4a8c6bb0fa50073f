//! The changegate gateway: the axum server that authenticates a request to exactly one tenant,
//! attaches it to the hub, and encodes the tenant's events into SSE dialects.
//!
//! It never builds SQL or MongoDB pipelines (that is the sources' job), never filters one
//! tenant's events out of another's stream (isolation happens at the source, by feed key), and
//! never logs a credential — not even inside a URL.
//!
//! # Layout
//!
//! * [`state`] — the shared state, built once: engine, the one hub, the sources by feed kind.
//! * [`engine`] — keys, flags and the message log, on memory or PostgreSQL.
//! * [`auth`] — who calls: the [`auth::Authenticated`] extractor, key files, JWTs, rate limits.
//! * [`stream`] — opening a stream (the one `Last-Event-ID` reader, subscribe, catch-up) and
//!   the SSE writer.
//! * `routes` — the HTTP routes by area (events, flags, OFREP, Togul, Featureflip, ops);
//!   nothing imports it but this root.
//! * [`net`] — accept loop, connection limits, the direct SSE path, write deadlines.
//! * [`query`], [`error`], [`mongo`] — the query-string policy, the error shape, the door to
//!   the MongoDB driver.

pub mod auth;
pub mod engine;
pub mod error;
pub mod mongo;
pub mod net;
pub mod query;
mod routes;
pub mod state;
pub mod stream;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use engine::Engine;
pub use routes::{PATHS, router};
pub use state::{AppState, Limits};

/// Runs the server on `listener` until `closing` is cancelled, then ends every stream with a
/// `retry:` hint and waits up to `drain` for connections to finish.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: net::server::ConnectionLimits,
    drain: Duration,
) -> std::io::Result<()> {
    let closing = state.closing.clone();
    if let Some(mut revoked) = state.engine.revocations() {
        let revocations = state.revocations.clone();
        let closing = closing.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = closing.cancelled() => return,
                    id = revoked.recv() => match id {
                        // `<id>@<epoch ms>`: a rotated key, closed when its grace ends.
                        Ok(notice) => match notice.split_once('@') {
                            Some((id, at)) => {
                                let at = at.parse().unwrap_or(0);
                                revocations.revoke_at(id, changegate_core::Timestamp::from_millis(at), &closing);
                            }
                            None => revocations.revoke(&notice),
                        },
                        // Too many at once to know which: fail closed, every keyed stream
                        // reconnects and is authenticated again.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => revocations.revoke_all(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
    }
    let server = net::server::serve(listener, routes::router(state), limits, closing.clone());
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => Ok(()),
        () = async { closing.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!("connections did not drain within {drain:?}; exiting anyway");
            Ok(())
        }
    }
}

/// The state of a memory-engine gateway (tests and the binary's default).
pub fn memory_state(
    keys: changegate_core::MemoryKeys,
    retention: changegate_core::Retention,
    hub: changegate_core::HubConfig,
    jwt: Option<auth::jwt::JwtVerifier>,
    limits: Limits,
) -> AppState {
    let hub = changegate_core::Hub::new(hub);
    let engine = Engine::memory(keys, retention, hub.clone());
    let options = state::Options { jwt, ..state::Options::new(limits) };
    AppState::new(engine, hub, None, CancellationToken::new(), options)
}
