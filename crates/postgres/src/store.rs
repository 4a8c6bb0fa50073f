//! Queries: tenants and keys, collections, the outbox. Every caller-supplied value travels as a
//! bind parameter; table names are resolved by the catalog, never formatted into SQL here.

use std::time::Duration;

use changegate_core::{
    ApiKey, CollectionName, EnvironmentId, Epoch, Event, EventBody, Feed, FeedKey, KeyHash, KeyRecord,
    RawJson, Scope, TenantId, Timestamp, Topic,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::{PgError, event};

/// The NOTIFY channel on which key revocations are announced to every instance.
pub const KEYS_CHANNEL: &str = "flc_keys";

/// A key as `keys list` shows it: never the key itself.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyListing {
    /// Stable id (for `keys revoke`).
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// Environment, if limited to one.
    pub environment: Option<String>,
    /// Scope.
    pub scope: String,
    /// Non-secret display prefix.
    pub prefix: String,
    /// Whether it was revoked.
    pub revoked: bool,
}

/// A pool of connections and the queries changegate runs over them.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    config: tokio_postgres::Config,
    /// Set when the database is a read replica: where writes go instead (for the refusal), and
    /// whether it has since been promoted (shared by every clone).
    following: Option<std::sync::Arc<Following>>,
}

/// A store's read-replica state.
#[derive(Debug)]
struct Following {
    primary: Box<str>,
    promoted: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the config: it may hold a password.
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn invalid_or(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |e| match e.code() {
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            PgError::refused(format!("{context}: the tenant or environment does not exist"))
        }
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
            PgError::refused(format!("{context}: it already exists"))
        }
        Some(c) if *c == SqlState::CHECK_VIOLATION => PgError::refused(format!("{context}: invalid value")),
        _ => PgError::query(context)(e),
    }
}

/// What a follower's pass reads first: [`Store::replayed_through`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    /// `pg_is_in_recovery()`: false once the replica has been promoted.
    pub in_recovery: bool,
    /// `pg_last_wal_replay_lsn()` (it stays where it was once recovery ends).
    pub through: Option<String>,
}

/// Rows one retention statement deletes at most: short statements, short locks.
pub const PRUNE_BATCH: i64 = 10_000;

impl Store {
    /// A pool of at most `size` connections to `url` (no connection is made yet).
    pub fn connect(url: &str, size: usize) -> Result<Self, PgError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| PgError::unavailable("invalid DATABASE_URL", e))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| PgError::unavailable("invalid DATABASE_URL", e))?;
        Ok(Self { pool, config, following: None })
    }

    /// Whether the database is a hot standby (a read replica): `pg_is_in_recovery()`.
    pub async fn is_replica(&self) -> Result<bool, PgError> {
        let row = self
            .client()
            .await?
            .query_one("select pg_is_in_recovery()", &[])
            .await
            .map_err(PgError::query("asking whether the database is a replica"))?;
        Ok(row.get(0))
    }

    /// On a replica: the primary it streams from, as `host:port` (when the role may see it).
    pub async fn upstream(&self) -> Result<Option<String>, PgError> {
        let row = self
            .client()
            .await?
            .query_opt("select sender_host || ':' || sender_port from pg_stat_wal_receiver", &[])
            .await
            .map_err(PgError::query("reading the replica's upstream"))?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The migrations recorded in the database (a replica cannot apply its own).
    pub async fn migrations(&self) -> Result<Vec<i32>, PgError> {
        let rows = self
            .client()
            .await?
            .query("select version from realtime.migrations order by version", &[])
            .await
            .map_err(PgError::query("reading realtime.migrations (has `changegate migrate` run?)"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// This store on a read replica: every write is refused up front, naming `primary`, until
    /// [`Store::promoted`].
    pub fn following(mut self, primary: &str) -> Self {
        let promoted = std::sync::atomic::AtomicBool::new(false);
        self.following = Some(std::sync::Arc::new(Following { primary: primary.into(), promoted }));
        self
    }

    /// The replica this store follows was promoted to primary: writes are accepted from now on,
    /// by this store and every clone of it.
    pub fn promoted(&self) {
        if let Some(following) = &self.following {
            following.promoted.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether this store follows a read replica (and refuses writes).
    pub fn is_following(&self) -> bool {
        self.following.as_ref().is_some_and(|f| !f.promoted.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Refuses a write on a replica (before it reaches the database, to name the primary).
    fn writable(&self) -> Result<(), PgError> {
        match &self.following {
            Some(following) if self.is_following() => Err(PgError::read_only(Some(&following.primary))),
            _ => Ok(()),
        }
    }

    /// The connection settings (for the LISTEN connection).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        self.pool.get().await.map_err(|e| PgError::unavailable("no database connection", e))
    }

    /// Applies pending migrations; returns the versions applied.
    pub async fn migrate(&self) -> Result<Vec<i32>, PgError> {
        let mut client = self.client().await?;
        crate::migrate::run(&mut client).await
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), PgError> {
        self.client().await?.simple_query("").await.map_err(PgError::query("pinging the database"))?;
        Ok(())
    }

    /// This database's log epoch.
    pub async fn epoch(&self) -> Result<Epoch, PgError> {
        let row = self
            .client()
            .await?
            .query_one("select epoch from realtime.meta", &[])
            .await
            .map_err(PgError::query("reading realtime.meta (has `changegate migrate` run?)"))?;
        let epoch: i64 = row.get(0);
        Ok(Epoch(u32::try_from(epoch).unwrap_or(0)))
    }

    /// The stored record of a key hash, revoked or not.
    pub async fn find_key(&self, hash: &KeyHash) -> Result<Option<KeyRecord>, PgError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "select id, tenant, environment, scope, coalesce(revoked_at <= now(), false)
                 from realtime.api_keys where hash = $1",
                &[&&hash.0[..]],
            )
            .await
            .map_err(PgError::query("looking up an API key"))?;
        let Some(row) = row else { return Ok(None) };
        let tenant: String = row.get(1);
        let environment: Option<String> = row.get(2);
        let scope: String = row.get(3);
        let malformed = |what: &str| PgError::corrupt(format!("stored key has an invalid {what}"));
        Ok(Some(KeyRecord {
            id: row.get(0),
            hash: *hash,
            tenant: TenantId::parse(&tenant).map_err(|_| malformed("tenant"))?,
            environment: environment
                .as_deref()
                .map(EnvironmentId::parse)
                .transpose()
                .map_err(|_| malformed("environment"))?,
            scope: scope.parse().map_err(|_| malformed("scope"))?,
            revoked: row.get(4),
        }))
    }

    /// Creates a tenant.
    pub async fn create_tenant(&self, tenant: &TenantId) -> Result<(), PgError> {
        self.writable()?;
        self.client()
            .await?
            .execute("insert into realtime.tenants (id) values ($1)", &[&tenant.as_str()])
            .await
            .map_err(invalid_or("creating the tenant"))?;
        Ok(())
    }

    /// Creates an environment of a tenant.
    pub async fn create_environment(&self, tenant: &TenantId, name: &EnvironmentId) -> Result<(), PgError> {
        self.writable()?;
        self.client()
            .await?
            .execute(
                "insert into realtime.environments (tenant, name) values ($1, $2)",
                &[&tenant.as_str(), &name.as_str()],
            )
            .await
            .map_err(invalid_or("creating the environment"))?;
        Ok(())
    }

    /// Creates a key; the only time the key itself exists outside its owner's hands.
    pub async fn create_key(
        &self,
        tenant: &TenantId,
        environment: Option<&EnvironmentId>,
        scope: Scope,
    ) -> Result<(String, ApiKey), PgError> {
        self.writable()?;
        let key = ApiKey::generate(scope);
        let hash = key.hash();
        let id = hash.id();
        self.client()
            .await?
            .execute(
                "insert into realtime.api_keys (id, tenant, environment, scope, hash, prefix)
                 values ($1, $2, $3, $4, $5, $6)",
                &[
                    &id,
                    &tenant.as_str(),
                    &environment.map(EnvironmentId::as_str),
                    &scope.as_str(),
                    &&hash.0[..],
                    &key.display_prefix(),
                ],
            )
            .await
            .map_err(invalid_or("creating the key"))?;
        Ok((id, key))
    }

    /// Every key (of one tenant, if given), without secrets.
    pub async fn list_keys(&self, tenant: Option<&TenantId>) -> Result<Vec<KeyListing>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "select id, tenant, environment, scope, prefix, coalesce(revoked_at <= now(), false)
                 from realtime.api_keys where $1::text is null or tenant = $1 order by created_at, id",
                &[&tenant.map(TenantId::as_str)],
            )
            .await
            .map_err(PgError::query("listing keys"))?;
        Ok(rows
            .iter()
            .map(|r| KeyListing {
                id: r.get(0),
                tenant: r.get(1),
                environment: r.get(2),
                scope: r.get(3),
                prefix: r.get(4),
                revoked: r.get(5),
            })
            .collect())
    }

    /// Revokes a key and tells every instance, so its open streams close. `false` if no such key.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, PgError> {
        self.writable()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(PgError::query("revoking a key"))?;
        let changed = tx
            .execute(
                "update realtime.api_keys set revoked_at = least(coalesce(revoked_at, 'infinity'), now()) where id = $1",
                &[&id],
            )
            .await
            .map_err(PgError::query("revoking a key"))?;
        tx.execute("select pg_notify($1, $2)", &[&KEYS_CHANNEL, &id])
            .await
            .map_err(PgError::query("announcing a revocation"))?;
        tx.commit().await.map_err(PgError::query("revoking a key"))?;
        Ok(changed == 1)
    }

    /// Revocation notices (`<id>` or `<id>@<epoch ms>`) for keys revoked within the last
    /// `window` or scheduled to expire, to catch announcements missed while a LISTEN
    /// connection was down.
    pub async fn revoked_within(&self, window: Duration) -> Result<Vec<String>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "select id || '@' || floor(extract(epoch from revoked_at) * 1000)::bigint
                 from realtime.api_keys where revoked_at > now() - make_interval(secs => $1)",
                &[&window.as_secs_f64()],
            )
            .await
            .map_err(PgError::query("reading recent revocations"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Rotates key `id` (of `tenant`, when given): a new key like it, the old one expiring
    /// after `grace`, a `config-updated` (`api-key-rotated`) event for its environment, and a
    /// notice to every instance. `None` if `id` is not a live key (of `tenant`).
    pub async fn rotate_key(
        &self,
        tenant: Option<&TenantId>,
        id: &str,
        grace: Duration,
    ) -> Result<Option<(String, ApiKey, Timestamp)>, PgError> {
        self.writable()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(PgError::query("rotating a key"))?;
        let Some(old) = tx
            .query_opt(
                "select environment, scope, tenant from realtime.api_keys
                 where id = $1 and ($2::text is null or tenant = $2) and (revoked_at is null or revoked_at > now())
                 for update",
                &[&id, &tenant.map(TenantId::as_str)],
            )
            .await
            .map_err(PgError::query("rotating a key"))?
        else {
            return Ok(None);
        };
        let environment: Option<String> = old.get(0);
        let tenant: String = old.get(2);
        let scope: Scope =
            old.get::<_, &str>(1).parse().map_err(|_| PgError::corrupt("stored key has an invalid scope"))?;
        let key = ApiKey::generate(scope);
        let hash = key.hash();
        let new_id = hash.id();
        tx.execute(
            "insert into realtime.api_keys (id, tenant, environment, scope, hash, prefix) values ($1, $2, $3, $4, $5, $6)",
            &[&new_id, &tenant, &environment, &scope.as_str(), &&hash.0[..], &key.display_prefix()],
        )
        .await
        .map_err(PgError::query("rotating a key"))?;
        let row = tx
            .query_one(
                "update realtime.api_keys
                 set revoked_at = least(coalesce(revoked_at, 'infinity'), now() + make_interval(secs => $2))
                 where id = $1
                 returning floor(extract(epoch from revoked_at) * 1000)::bigint",
                &[&id, &grace.as_secs_f64()],
            )
            .await
            .map_err(PgError::query("rotating a key"))?;
        let expires = Timestamp::from_millis(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0));
        tx.execute("select pg_notify($1, $2)", &[&KEYS_CHANNEL, &format!("{id}@{}", expires.as_millis())])
            .await
            .map_err(PgError::query("announcing a rotation"))?;
        let tenant_id =
            TenantId::parse(&tenant).map_err(|_| PgError::corrupt("stored key has an invalid tenant"))?;
        let channel = crate::channel(&FeedKey { tenant: tenant_id, feed: Feed::Flags });
        let payload = serde_json::json!({"environment": environment, "reason": "api-key-rotated",
                                         "valid_until": expires.as_millis()});
        tx.execute(
            "select realtime.enqueue($1, $2, 'config', null, null, null, null, $3::text::jsonb)",
            &[&channel, &tenant, &payload.to_string()],
        )
        .await
        .map_err(PgError::query("announcing a rotation"))?;
        tx.commit().await.map_err(PgError::query("rotating a key"))?;
        Ok(Some((new_id, key, expires)))
    }

    /// Every tenant.
    pub async fn tenants(&self) -> Result<Vec<String>, PgError> {
        let rows = self
            .client()
            .await?
            .query("select id from realtime.tenants order by id", &[])
            .await
            .map_err(PgError::query("listing tenants"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The tenant's environments.
    pub async fn environments(&self, tenant: &TenantId) -> Result<Vec<String>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "select name from realtime.environments where tenant = $1 order by name",
                &[&tenant.as_str()],
            )
            .await
            .map_err(PgError::query("listing environments"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Creates an environment if it does not exist; `true` if it was created.
    pub async fn ensure_environment(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
    ) -> Result<bool, PgError> {
        self.writable()?;
        let created = self
            .client()
            .await?
            .execute(
                "insert into realtime.environments (tenant, name) values ($1, $2) on conflict do nothing",
                &[&tenant.as_str(), &environment.as_str()],
            )
            .await
            .map_err(invalid_or("creating the environment"))?;
        Ok(created == 1)
    }

    /// One environment's flag document (`{}` when it has none yet).
    pub async fn flag_state(&self, tenant: &TenantId, environment: &EnvironmentId) -> Result<Value, PgError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "select coalesce((select state::text from realtime.flag_state where tenant = $1 and environment = $2), '{}')
                 from realtime.environments where tenant = $1 and name = $2",
                &[&tenant.as_str(), &environment.as_str()],
            )
            .await
            .map_err(PgError::query("reading flags"))?
            .ok_or_else(|| PgError::missing(format!("environment `{environment}` does not exist")))?;
        serde_json::from_str(row.get(0)).map_err(|e| PgError::corrupt(format!("stored flags: {e}")))
    }

    /// Reads one environment's flag document under a row lock, lets `apply` compute the new
    /// document and its events, and writes both in one transaction (the events are numbered
    /// at commit like every change). `apply` returning `None` changes nothing; so does a
    /// missing environment (`apply` is then not called).
    pub async fn write_flag_state(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        apply: impl FnOnce(&Value, &str) -> Option<(Value, Vec<EventBody>)>,
    ) -> Result<(), PgError> {
        self.writable()?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(PgError::query("writing flags"))?;
        let (t, e) = (tenant.as_str(), environment.as_str());
        tx.batch_execute("set local realtime.flag_api = 'on'")
            .await
            .map_err(PgError::query("writing flags"))?;
        tx.execute(
            "insert into realtime.flag_state (tenant, environment)
             select tenant, name from realtime.environments where tenant = $1 and name = $2
             on conflict do nothing",
            &[&t, &e],
        )
        .await
        .map_err(PgError::query("writing flags"))?;
        let Some(row) = tx
            .query_opt(
                "select state::text from realtime.flag_state where tenant = $1 and environment = $2 for update",
                &[&t, &e],
            )
            .await
            .map_err(PgError::query("locking flags"))?
        else {
            return Ok(());
        };
        let state: Value =
            serde_json::from_str(row.get(0)).map_err(|e| PgError::corrupt(format!("stored flags: {e}")))?;
        let Some((state, events)) = apply(&state, &Timestamp::now().rfc3339()) else { return Ok(()) };
        tx.execute(
            "update realtime.flag_state set state = $3::text::jsonb where tenant = $1 and environment = $2",
            &[&t, &e, &state.to_string()],
        )
        .await
        .map_err(PgError::query("writing flags"))?;
        let channel = crate::channel(&FeedKey { tenant: tenant.clone(), feed: Feed::Flags });
        for event in events {
            let (kind, payload) = match event {
                EventBody::Flag { environment, kind, flag_key, version, flag } => (
                    "flag",
                    serde_json::json!({"environment": environment, "type": kind.as_str(), "flag_key": flag_key,
                                       "version": version, "flag": flag}),
                ),
                EventBody::Config { environment, reason, valid_until } => (
                    "config",
                    serde_json::json!({"environment": environment, "reason": reason.as_str(),
                                       "valid_until": valid_until.map(Timestamp::as_millis)}),
                ),
                _ => continue,
            };
            tx.execute(
                "select realtime.enqueue($1, $2, $3, null, null, null, null, $4::text::jsonb)",
                &[&channel, &t, &kind, &payload.to_string()],
            )
            .await
            .map_err(PgError::query("logging flag events"))?;
        }
        tx.commit().await.map_err(PgError::query("committing flags"))?;
        Ok(())
    }

    /// `select realtime.enable(table, tenant_column)`.
    pub async fn enable_table(&self, table: &str, tenant_column: &str) -> Result<(), PgError> {
        self.writable()?;
        self.client()
            .await?
            .execute("select realtime.enable($1::text::regclass, $2)", &[&table, &tenant_column])
            .await
            .map_err(PgError::query(format!("enabling realtime on {table}")))?;
        Ok(())
    }

    /// `select realtime.disable(table)`.
    pub async fn disable_table(&self, table: &str) -> Result<(), PgError> {
        self.writable()?;
        self.client()
            .await?
            .execute("select realtime.disable($1::text::regclass)", &[&table])
            .await
            .map_err(PgError::query(format!("disabling realtime on {table}")))?;
        Ok(())
    }

    /// The canonical `schema.table` of a realtime-enabled table the name resolves to (through
    /// the search path, like any SQL name), or `None`.
    pub async fn resolve_collection(&self, name: &CollectionName) -> Result<Option<CollectionName>, PgError> {
        let client = self.client().await?;
        let result = client
            .query_opt(
                "select name from realtime.enabled_tables where relid = to_regclass($1)::oid",
                &[&name.as_str()],
            )
            .await;
        match result {
            Ok(row) => Ok(row.and_then(|r| CollectionName::parse(r.get::<_, &str>(0)).ok())),
            // A name that is not even valid SQL name syntax names no table.
            Err(e) if e.code() == Some(&SqlState::INVALID_NAME) => Ok(None),
            Err(e) => Err(PgError::query(format!("resolving collection {name}"))(e)),
        }
    }

    /// Queues a message in the outbox (committed at once); returns its row id. The sequencer
    /// numbers it like any change: see [`Store::numbered`].
    pub async fn publish(&self, tenant: &TenantId, topic: &Topic, data: &RawJson) -> Result<i64, PgError> {
        self.writable()?;
        let row = self
            .client()
            .await?
            .query_one(
                "select realtime.publish($1, $2, $3::text::jsonb)",
                &[&tenant.as_str(), &topic.as_str(), &data.get()],
            )
            .await
            .map_err(PgError::query(format!("publishing for tenant {tenant}")))?;
        Ok(row.get(0))
    }

    /// The sequence number of outbox row `id`, once the sequencer has given it one.
    pub async fn numbered(&self, id: i64) -> Result<Option<u64>, PgError> {
        let row = self
            .client()
            .await?
            .query_opt("select seq from realtime.outbox where id = $1", &[&id])
            .await
            .map_err(PgError::query("reading a message's position"))?;
        Ok(row.map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
    }

    /// `(pruned_through of the channel, last sequence number issued)`: whether a position can
    /// still be replayed.
    pub async fn replay_bounds(&self, channel: &str) -> Result<(u64, u64), PgError> {
        let row = self
            .client()
            .await?
            .query_one(
                "select (select coalesce(max(pruned_through), 0) from realtime.horizon where channel = $1),
                        (select case when is_called then last_value else 0 end from realtime.outbox_seq)",
                &[&channel],
            )
            .await
            .map_err(PgError::query("reading replay bounds"))?;
        let get = |i| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        Ok((get(0), get(1)))
    }

    /// At most `limit` committed events of `channel` (and `tenant`) after sequence `after`,
    /// in order: one keyset page of a catch-up.
    pub async fn replay(
        &self,
        channel: &str,
        tenant: &TenantId,
        after: u64,
        limit: usize,
        epoch: Epoch,
    ) -> Result<Vec<Event>, PgError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                // The JSON is built for the page's rows only, whatever plan finds them.
                "select realtime.row_json(o) from (
                     select * from realtime.outbox
                     where channel = $1 and tenant = $2 and seq > $3 order by seq limit $4
                 ) o order by o.seq",
                &[&channel, &tenant.as_str(), &after, &limit],
            )
            .await
            .map_err(PgError::query(format!("replaying for tenant {tenant}")))?;
        rows.iter().map(|r| event::row(r.get(0), epoch)).collect()
    }

    /// At most `limit` committed events of `channel` (and `tenant`) committed at or after
    /// `since_ms`, in order: the first page of a time-based catch-up (later pages go by
    /// sequence, see [`Store::replay`]).
    pub async fn replay_since(
        &self,
        channel: &str,
        tenant: &TenantId,
        since_ms: u64,
        limit: usize,
        epoch: Epoch,
    ) -> Result<Vec<Event>, PgError> {
        let since = since_ms as f64 / 1000.0;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "select realtime.row_json(o) from (
                     select * from realtime.outbox
                     where channel = $1 and tenant = $2 and seq is not null
                       and committed_at >= to_timestamp($3) order by seq limit $4
                 ) o order by o.seq",
                &[&channel, &tenant.as_str(), &since, &limit],
            )
            .await
            .map_err(PgError::query(format!("replaying for tenant {tenant}")))?;
        rows.iter().map(|r| event::row(r.get(0), epoch)).collect()
    }

    /// Whether more than `cap` committed events of `channel` follow sequence `after` (counts
    /// at most `cap + 1` index entries).
    pub async fn backlog_exceeds(&self, channel: &str, after: u64, cap: u64) -> Result<bool, PgError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let probe = i64::try_from(cap.saturating_add(1)).unwrap_or(i64::MAX);
        let row = self
            .client()
            .await?
            .query_one(
                "select count(*) from (select 1 from realtime.outbox
                                       where channel = $1 and seq > $2 limit $3) backlog",
                &[&channel, &after, &probe],
            )
            .await
            .map_err(PgError::query("measuring a catch-up"))?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(u64::MAX) > cap)
    }

    /// For a follower: the WAL position this replica has replayed through (it moves whenever
    /// anything committed on the primary has become visible here), and whether it still is a
    /// replica.
    pub async fn replayed_through(&self) -> Result<Replayed, PgError> {
        let row = self
            .client()
            .await?
            .query_one("select pg_is_in_recovery(), pg_last_wal_replay_lsn()::text", &[])
            .await
            .map_err(PgError::query("reading the replica's replay position"))?;
        Ok(Replayed { in_recovery: row.get(0), through: row.get(1) })
    }

    /// For a follower: up to `limit` events of each channel after its position, in one
    /// query — `(channel, tenant, after)` triples in, `(channel, event)` in channel then
    /// sequence order out. Per channel, not one global `seq > last`: a published message is
    /// numbered in its own transaction and may become visible after a higher number.
    pub async fn follow(
        &self,
        channels: &[&str],
        tenants: &[&str],
        after: &[i64],
        limit: i64,
        epoch: Epoch,
    ) -> Result<Vec<(String, Event)>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "select c.channel, realtime.row_json(o)
                 from unnest($1::text[], $2::text[], $3::bigint[]) as c(channel, tenant, last)
                 cross join lateral (
                     select * from realtime.outbox o
                     where o.channel = c.channel and o.tenant = c.tenant and o.seq > c.last
                     order by o.seq limit $4
                 ) o
                 order by c.channel, o.seq",
                &[&channels, &tenants, &after, &limit],
            )
            .await
            .map_err(PgError::query("following the outbox"))?;
        rows.iter().map(|r| Ok((r.get::<_, String>(0), event::row(r.get(1), epoch)?))).collect()
    }

    /// The newest committed position of `channel`: where a client continues after a reset.
    /// (Any row numbered later gets a higher number: see `realtime.sequence_batch()`.)
    pub async fn head(&self, channel: &str) -> Result<u64, PgError> {
        let row = self
            .client()
            .await?
            .query_one("select coalesce(max(seq), 0) from realtime.outbox where channel = $1", &[&channel])
            .await
            .map_err(PgError::query("reading the head of a channel"))?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// Applies retention: rows older than `max_age`, then the oldest rows of every channel
    /// holding more than `max_per_channel`, in batches of [`PRUNE_BATCH`] (keyset deletes on the
    /// channel and commit-time indexes, no `OFFSET`), recording per channel the highest position
    /// removed (a client resuming from before it gets `reset`). Returns how many rows went.
    pub async fn prune(&self, max_age: Duration, max_per_channel: u64) -> Result<u64, PgError> {
        let client = self.client().await?;
        let mut removed = 0;
        loop {
            let n = prune_batch(
                &client,
                "seq is not null and committed_at < now() - make_interval(secs => $1) order by committed_at",
                &max_age.as_secs_f64(),
                PRUNE_BATCH,
            )
            .await?;
            removed += n;
            if n < PRUNE_BATCH {
                break;
            }
        }
        let cap = i64::try_from(max_per_channel).unwrap_or(i64::MAX);
        let over = client
            .query("select channel, rows - $1 from realtime.channel_rows where rows > $1", &[&cap])
            .await
            .map_err(PgError::query("finding channels over their row cap"))?;
        for row in over {
            let (channel, mut excess): (String, i64) = (row.get(0), row.get(1));
            while excess > 0 {
                let batch = excess.min(PRUNE_BATCH);
                let n =
                    prune_batch(&client, "channel = $1 and seq is not null order by seq", &channel, batch)
                        .await?;
                removed += n;
                if n == 0 {
                    break;
                }
                excess -= n;
            }
        }
        Ok(u64::try_from(removed).unwrap_or(0))
    }
}

/// Deletes at most `limit` outbox rows chosen by `victims` (a `where … order by …` with one
/// parameter, `$1`), recording per channel the highest position removed and lowering the
/// channel's row count; returns how many went.
async fn prune_batch(
    client: &deadpool_postgres::Object,
    victims: &str,
    parameter: &(dyn tokio_postgres::types::ToSql + Sync),
    limit: i64,
) -> Result<i64, PgError> {
    let sql = format!(
        "with gone as (
             delete from realtime.outbox where id in (select id from realtime.outbox where {victims} limit $2)
             returning channel, seq
         ), marked as (
             insert into realtime.horizon (channel, pruned_through)
             select channel, max(seq) from gone group by channel
             on conflict (channel) do update
                 set pruned_through = greatest(realtime.horizon.pruned_through, excluded.pruned_through)
         ), counted as (
             update realtime.channel_rows c set rows = greatest(c.rows - g.n, 0)
             from (select channel, count(*) as n from gone group by channel) g
             where c.channel = g.channel
         )
         select count(*) from gone"
    );
    let row =
        client.query_one(&sql, &[parameter, &limit]).await.map_err(PgError::query("pruning the outbox"))?;
    Ok(row.get(0))
}
