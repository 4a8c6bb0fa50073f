//! The gateway's shared state, built once at start ([`AppState::new`]) and never changed
//! afterwards: the engine, the one hub, the registry of sources, and the tunables.
//!
//! # Sources
//!
//! Every feed is served by exactly one [`Source`], picked by what the feed is: a tenant's
//! messages and flags by the engine's log (memory or PostgreSQL), a collection by the database
//! it names. The routes ask [`Sources::serving`] and never look at which engine runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use changegate_core::{Feed, Hub, Source, SourceKind};
use tokio_util::sync::CancellationToken;

use crate::auth::jwt::JwtVerifier;
use crate::engine::Engine;
use crate::mongo::MongoSource;

/// Tunables the routes read.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Heartbeat comment interval on realtime streams.
    pub heartbeat: Duration,
    /// Reconnect delay announced with `retry:`.
    pub retry: Duration,
    /// Largest accepted publish body, in bytes.
    pub max_body: usize,
    /// Heartbeat intervals of the flag dialects A, B and C.
    pub flags_heartbeat: [Duration; 3],
    /// Origins browsers may call from (`*`: any).
    pub cors_origins: Vec<String>,
    /// Label stream metrics with the tenant (opt-in: one series per tenant).
    pub metrics_tenants: bool,
    /// Longest catch-up served: a client further behind gets `reset` instead.
    pub replay_max: u64,
    /// Largest accepted JSON body on every route but publish (flags, segments, OFREP), in bytes.
    pub max_json_body: usize,
    /// When set, `/metrics` answers only `Authorization: Bearer <this token>`.
    pub metrics_token: Option<String>,
}

/// Shared state of every route.
#[derive(Clone)]
pub struct AppState {
    /// Keys, flags, the message log.
    pub engine: Arc<Engine>,
    /// The one fan-out of every source's feeds.
    pub hub: Hub,
    /// The sources, by the feeds they serve.
    pub sources: Sources,
    /// JWT verification, if a secret is configured.
    pub jwt: Option<JwtVerifier>,
    /// Route tunables.
    pub limits: Limits,
    /// Cancelled when the gateway shuts down: every stream then ends with a `retry:` hint.
    pub closing: CancellationToken,
    /// Streams by key, to close them when their key is revoked.
    pub revocations: Revocations,
    /// Per-key request budget of the OFREP evaluation routes.
    pub ofrep_rate: crate::auth::rate::RateLimiter,
    /// The MongoDB source, when `MONGODB_URL` is configured (for readiness: its feeds are
    /// reached through `sources`).
    pub mongo: Option<Arc<MongoSource>>,
    /// The Prometheus recorder's handle, when one is installed (the binary installs one).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// One cancellation token per key with open streams: revoking the key cancels them all.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    tokens: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl Revocations {
    /// The token a new stream of `key_id` is closed with (a child of `closing`).
    pub fn token(&self, key_id: Option<&str>, closing: &CancellationToken) -> CancellationToken {
        let Some(key_id) = key_id else { return closing.child_token() };
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        tokens.retain(|_, token| !token.is_cancelled());
        tokens.entry(key_id.to_owned()).or_insert_with(|| closing.child_token()).child_token()
    }

    /// Closes every stream opened with a key (they reconnect and authenticate again).
    pub fn revoke_all(&self) {
        let tokens = std::mem::take(&mut *self.tokens.lock().unwrap_or_else(PoisonError::into_inner));
        tokens.values().for_each(CancellationToken::cancel);
    }

    /// Closes every open stream of `key_id` at `at` (now, if that has passed), unless the
    /// gateway shuts down first.
    pub fn revoke_at(&self, key_id: &str, at: changegate_core::Timestamp, closing: &CancellationToken) {
        let wait = at.as_millis().saturating_sub(changegate_core::Timestamp::now().as_millis());
        let (revocations, key_id, closing) = (self.clone(), key_id.to_owned(), closing.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = closing.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(wait)) => revocations.revoke(&key_id),
            }
        });
    }

    /// Closes every open stream of `key_id`.
    pub fn revoke(&self, key_id: &str) {
        let token = self.tokens.lock().unwrap_or_else(PoisonError::into_inner).remove(key_id);
        if let Some(token) = token {
            tracing::info!(key_id, "key revoked: closing its streams");
            token.cancel();
        }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("engine", &self.engine)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What a gateway is configured with besides its sources.
#[derive(Debug)]
pub struct Options {
    /// JWT verification, if a secret is configured.
    pub jwt: Option<JwtVerifier>,
    /// Route tunables.
    pub limits: Limits,
    /// Per-key request budget of the OFREP evaluation routes.
    pub ofrep_rate: crate::auth::rate::RateLimiter,
    /// The Prometheus recorder's handle, when one is installed (the binary installs one).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Options {
    /// No JWT, the default OFREP budget, no metrics recorder.
    pub fn new(limits: Limits) -> Self {
        Self { jwt: None, limits, ofrep_rate: crate::auth::rate::RateLimiter::default(), metrics: None }
    }
}

impl AppState {
    /// The state of a gateway whose `engine` (and `mongo`, when configured) deliver to `hub`;
    /// `closing` ends every stream when cancelled.
    pub fn new(
        engine: Engine,
        hub: Hub,
        mongo: Option<Arc<MongoSource>>,
        closing: CancellationToken,
        options: Options,
    ) -> Self {
        let mut sources = engine.sources();
        if let Some(mongo) = &mongo {
            sources.collections.insert(SourceKind::Mongo, crate::mongo::source(mongo));
        }
        let Options { jwt, limits, ofrep_rate, metrics } = options;
        Self {
            engine: Arc::new(engine),
            hub,
            sources,
            jwt,
            limits,
            closing,
            revocations: Revocations::default(),
            ofrep_rate,
            mongo,
            metrics,
        }
    }
}

/// The sources of one gateway, by the feeds they serve.
#[derive(Clone)]
pub struct Sources {
    /// The tenant's messages and flags.
    pub(crate) log: Arc<dyn Source>,
    /// Collections, by the database they live in.
    pub(crate) collections: HashMap<SourceKind, Arc<dyn Source>>,
}

impl Sources {
    /// Sources with `log` for messages and flags and no collections yet.
    pub fn new(log: Arc<dyn Source>) -> Self {
        Self { log, collections: HashMap::new() }
    }

    /// The source of `feed`, if this gateway has one.
    pub fn serving(&self, feed: &Feed) -> Option<&Arc<dyn Source>> {
        match feed {
            Feed::Messages | Feed::Flags => Some(&self.log),
            Feed::Collection { source, .. } => self.collections.get(source),
        }
    }

    /// Whether collections of `kind` can be subscribed to.
    pub fn serves(&self, kind: SourceKind) -> bool {
        self.collections.contains_key(&kind)
    }
}
