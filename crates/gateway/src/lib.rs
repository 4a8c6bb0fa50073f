//! The changegate gateway: the axum server that authenticates a request to exactly one tenant,
//! attaches it to the hub, and encodes the tenant's events into SSE dialects.
//!
//! It never builds SQL or MongoDB pipelines (that is the sources' job), never filters one
//! tenant's events out of another's stream (isolation happens at the source, by feed key), and
//! never logs a credential — not even inside a URL.

pub mod auth;
pub mod direct;
pub mod engine;
pub mod error;
pub mod featureflip;
pub mod flag_routes;
pub mod jwt;
pub mod keys;
pub mod mongo;
pub mod ofrep;
pub mod query;
pub mod routes;
pub mod server;
pub mod sse;
pub mod stall;
pub mod togul;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use engine::Engine;
pub use routes::{AppState, Limits};

/// Runs the server on `listener` until `closing` is cancelled, then ends every stream with a
/// `retry:` hint and waits up to `drain` for connections to finish.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    limits: server::ConnectionLimits,
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
    let server = server::serve(listener, routes::router(state), limits, closing.clone());
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => Ok(()),
        () = async { closing.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!("connections did not drain within {drain:?}; exiting anyway");
            Ok(())
        }
    }
}

/// Builds the state for a memory-engine gateway.
pub fn memory_state(
    keys: changegate_core::MemoryKeys,
    retention: changegate_core::Retention,
    hub: changegate_core::HubConfig,
    jwt: Option<jwt::JwtVerifier>,
    limits: Limits,
) -> AppState {
    let engine = changegate_core::MemoryEngine::new(retention, hub);
    // Environments named by keys exist from the start.
    let flags = changegate_flags::memory::MemoryFlags::default();
    for record in keys.records() {
        if let Some(environment) = &record.environment {
            flags.create_environment(&record.tenant, environment);
        }
    }
    let keys = std::sync::RwLock::new(keys);
    state(Engine::Memory { engine, keys, flags }, jwt, limits, CancellationToken::new())
}

/// Builds the state around any engine; `closing` ends every stream when cancelled.
pub fn state(
    engine: Engine,
    jwt: Option<jwt::JwtVerifier>,
    limits: Limits,
    closing: CancellationToken,
) -> AppState {
    AppState {
        engine: Arc::new(engine),
        jwt,
        limits,
        closing,
        revocations: routes::Revocations::default(),
        metrics: None,
        ofrep_rate: ofrep::RateLimiter::default(),
        mongo: None,
    }
}
