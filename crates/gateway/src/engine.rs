//! The engine the gateway runs on, behind one interface: where keys and flags live and where
//! messages are logged. The memory engine by default; PostgreSQL with `DATABASE_URL`. How a
//! subscriber receives and replays events is not here: that is each engine's
//! [`changegate_core::Source`], reached through [`Sources`].

use std::sync::Arc;

use changegate_core::{
    ApiKey, CollectionName, Feed, FeedKey, Hub, KeyRecord, MemoryEngine, MemoryKeys, Position, RawJson,
    Retention, SourceKind, TenantId, Topic,
};
use changegate_core::{ConfigReason, EnvironmentId, EventBody, Timestamp};
use changegate_flags::memory::MemoryFlags;
use changegate_flags::{Emit, Environment as FlagEnvironment, FlagError};
use changegate_postgres::{PgEngine, PgError};

use crate::error::ApiError;
use crate::state::Sources;

/// The storage and fan-out behind the routes.
#[derive(Debug)]
pub enum Engine {
    /// One process, everything in memory.
    Memory {
        /// The log.
        engine: Arc<MemoryEngine>,
        /// Keys loaded at start (and rotated since).
        keys: std::sync::RwLock<MemoryKeys>,
        /// Environments, flags and segments.
        flags: MemoryFlags,
    },
    /// PostgreSQL: keys, outbox, capture, cross-instance fan-out.
    Postgres(Arc<PgEngine>),
}

/// The result of a key rotation.
#[derive(Debug)]
pub struct Rotation {
    /// The new key's id.
    pub id: String,
    /// The new key (shown once).
    pub key: ApiKey,
    /// When the old key stops working.
    pub expires: Timestamp,
}

impl From<FlagError> for ApiError {
    fn from(error: FlagError) -> Self {
        let message = error.to_string();
        match error {
            FlagError::NotFound(_) => ApiError::Missing(message),
            FlagError::Exists(_) | FlagError::InUse(_) => ApiError::Conflict(message),
            FlagError::Invalid(_) => ApiError::bad_request("invalid_flag", message),
            FlagError::VersionMismatch { .. } => ApiError::VersionMismatch(message),
        }
    }
}

impl From<PgError> for ApiError {
    /// Only a refused or missing request's message reaches the client; database text, and
    /// stored data we cannot read (our failure: a 500, not the caller's 400), go to the log.
    fn from(error: PgError) -> Self {
        if let Some(message) = error.client_message() {
            let message = message.to_owned();
            return if error.is_read_only() {
                ApiError::ReadOnly(message)
            } else if error.is_missing() {
                ApiError::Missing(message)
            } else {
                ApiError::bad_request("invalid_request", message)
            };
        }
        if error.is_corrupt() {
            return ApiError::internal("unreadable stored data", &error);
        }
        tracing::error!(%error, "database error");
        ApiError::Unavailable("the database is unavailable; try again".into())
    }
}

impl Engine {
    /// The memory engine, delivering to `hub`, with `keys` (the environments they name exist
    /// from the start).
    pub fn memory(keys: MemoryKeys, retention: Retention, hub: Hub) -> Self {
        let flags = MemoryFlags::default();
        for record in keys.records() {
            if let Some(environment) = &record.environment {
                flags.create_environment(&record.tenant, environment);
            }
        }
        let engine = Arc::new(MemoryEngine::new(retention, hub));
        Self::Memory { engine, keys: std::sync::RwLock::new(keys), flags }
    }

    /// The sources this engine brings: its log, and PostgreSQL's tables.
    pub fn sources(&self) -> Sources {
        match self {
            Self::Memory { engine, .. } => Sources::new(engine.clone()),
            Self::Postgres(engine) => {
                let mut sources = Sources::new(engine.clone());
                sources.collections.insert(SourceKind::Postgres, engine.clone());
                sources
            }
        }
    }

    /// The stored record of `key`, revoked or not.
    pub async fn find_key(&self, key: &ApiKey) -> Result<Option<KeyRecord>, ApiError> {
        match self {
            Self::Memory { keys, .. } => {
                Ok(keys.read().unwrap_or_else(std::sync::PoisonError::into_inner).find(key))
            }
            Self::Postgres(engine) => Ok(engine.store().find_key(&key.hash()).await?),
        }
    }

    /// Logs a message and fans it out (on every instance); returns its position.
    pub async fn publish(
        &self,
        tenant: &TenantId,
        topic: Topic,
        data: RawJson,
    ) -> Result<Position, ApiError> {
        match self {
            Self::Memory { engine, .. } => Ok(engine.publish(tenant, topic, data)),
            Self::Postgres(engine) => Ok(engine.publish(tenant, &topic, &data).await?),
        }
    }

    /// The feed of a collection subscription, checked against what this engine serves.
    pub async fn collection_feed(
        &self,
        tenant: TenantId,
        name: &CollectionName,
        source: Option<&str>,
    ) -> Result<FeedKey, ApiError> {
        match source {
            None | Some("postgres" | "mongo") => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "invalid_source",
                    "`source` must be `postgres` or `mongo`",
                ));
            }
        }
        if source == Some("mongo") {
            return Err(ApiError::SourceNotConfigured("MongoDB collections need MONGODB_URL".into()));
        }
        let engine = match self {
            Self::Memory { .. } => return Err(ApiError::CollectionsNeedDatabase(name.to_string())),
            Self::Postgres(engine) => engine,
        };
        let canonical = engine
            .store()
            .resolve_collection(name)
            .await?
            .ok_or_else(|| ApiError::CollectionNotEnabled(name.to_string()))?;
        Ok(FeedKey { tenant, feed: Feed::Collection { source: SourceKind::Postgres, name: canonical } })
    }

    /// Whether every dependency is reachable; the reason otherwise.
    pub async fn readiness(&self) -> Result<(), String> {
        match self {
            Self::Memory { .. } => Ok(()),
            Self::Postgres(engine) => {
                if !engine.listening() {
                    return Err(if engine.is_following() {
                        "following the PostgreSQL replica is failing".into()
                    } else {
                        "the PostgreSQL LISTEN connection is down".into()
                    });
                }
                engine.store().ping().await.map_err(|_| "PostgreSQL is unreachable".to_owned())
            }
        }
    }

    /// Rotates key `id` of `tenant`: a new key with the same scope and environment; the old one
    /// keeps working for `grace`. Streams of the environment get `config-updated`
    /// (`api-key-rotated`); streams opened with the old key close when the grace ends.
    pub async fn rotate_key(
        &self,
        tenant: &TenantId,
        id: &str,
        grace: std::time::Duration,
    ) -> Result<Rotation, ApiError> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let expires = Timestamp::from_millis(Timestamp::now().as_millis().saturating_add(grace_ms));
        match self {
            Self::Memory { engine, keys, .. } => {
                let (key, record) = keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .rotate(tenant, id, expires)
                    .ok_or_else(|| ApiError::Missing(format!("key `{id}` not found")))?;
                let body = EventBody::Config {
                    environment: record.environment.clone(),
                    reason: ConfigReason::ApiKeyRotated,
                    valid_until: Some(expires),
                };
                engine.append(tenant, Feed::Flags, body);
                Ok(Rotation { id: record.id, key, expires })
            }
            Self::Postgres(engine) => {
                let (new_id, key, expires) = engine
                    .store()
                    .rotate_key(Some(tenant), id, grace)
                    .await?
                    .ok_or_else(|| ApiError::Missing(format!("key `{id}` not found")))?;
                Ok(Rotation { id: new_id, key, expires })
            }
        }
    }

    /// The tenant's flag environments.
    pub async fn environments(&self, tenant: &TenantId) -> Result<Vec<String>, ApiError> {
        match self {
            Self::Memory { flags, .. } => Ok(flags.environments(tenant)),
            Self::Postgres(engine) => Ok(engine.store().environments(tenant).await?),
        }
    }

    /// Creates an environment; `false` if it existed.
    pub async fn create_environment(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
    ) -> Result<bool, ApiError> {
        match self {
            Self::Memory { flags, .. } => Ok(flags.create_environment(tenant, environment)),
            Self::Postgres(engine) => Ok(engine.store().ensure_environment(tenant, environment).await?),
        }
    }

    /// One environment's flags and segments.
    pub async fn flags(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
    ) -> Result<FlagEnvironment, ApiError> {
        match self {
            Self::Memory { flags, .. } => Ok(flags.read(tenant, environment)?),
            Self::Postgres(engine) => {
                let state = engine.store().flag_state(tenant, environment).await?;
                // Corrupt stored data is our failure, not the caller's: a 500 and a log line.
                serde_json::from_value(state).map_err(|e| {
                    ApiError::internal(&format!("unreadable stored flags of {tenant}/{environment}"), &e)
                })
            }
        }
    }

    /// Applies a flag write and logs the events it causes, atomically.
    pub async fn write_flags<R: Send>(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        op: impl FnOnce(&mut FlagEnvironment, &str) -> Result<(R, Vec<Emit>), FlagError> + Send,
    ) -> Result<R, ApiError> {
        match self {
            Self::Memory { engine, flags, .. } => Ok(flags.write(engine, tenant, environment, op)?),
            Self::Postgres(engine) => {
                let mut result = None;
                let mut failure = None;
                let mut corrupt = None;
                engine
                    .store()
                    .write_flag_state(tenant, environment, |state, now| {
                        let mut env: FlagEnvironment = match serde_json::from_value(state.clone()) {
                            Ok(env) => env,
                            Err(e) => {
                                corrupt = Some(ApiError::internal(
                                    &format!("unreadable stored flags of {tenant}/{environment}"),
                                    &e,
                                ));
                                return None;
                            }
                        };
                        match op(&mut env, now) {
                            Ok((r, events)) => {
                                // Never write `null` over an environment's flags: a state that
                                // cannot be serialised fails the write instead.
                                let state = match serde_json::to_value(&env) {
                                    Ok(state) => state,
                                    Err(e) => {
                                        corrupt = Some(ApiError::internal("serialising flags", &e));
                                        return None;
                                    }
                                };
                                result = Some(r);
                                let bodies = events.into_iter().map(|e| e.into_body(environment)).collect();
                                Some((state, bodies))
                            }
                            Err(e) => {
                                failure = Some(e);
                                None
                            }
                        }
                    })
                    .await?;
                if let Some(corrupt) = corrupt {
                    return Err(corrupt);
                }
                match (result, failure) {
                    (Some(r), _) => Ok(r),
                    (None, Some(e)) => Err(e.into()),
                    (None, None) => Err(ApiError::Missing(format!("environment `{environment}` not found"))),
                }
            }
        }
    }

    /// Ids of revoked keys as revocations happen, where the engine announces them.
    pub fn revocations(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        match self {
            Self::Memory { .. } => None,
            Self::Postgres(engine) => Some(engine.revocations()),
        }
    }
}
