//! The PostgreSQL engine as the gateway uses it: a store, a hub fed by the LISTEN source, and a
//! retention task — all tied to one cancellation token.

use std::sync::Arc;
use std::time::Duration;

use changegate_core::source::{BoxFuture, CatchUp, Log, OpenFuture, Source, SourceError, Start, paged};
use changegate_core::{Epoch, FeedKey, Filter, Frame, Hub, Position, RawJson, Replay, TenantId, Topic};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::follow::Follower;
use crate::source::{Command, Listener, Upstream};
use crate::store::Store;
use crate::{PgError, channel};

/// How to run the engine.
#[derive(Clone, Debug)]
pub struct PgConfig {
    /// Outbox rows older than this are pruned.
    pub retention_age: Duration,
    /// At most this many outbox rows are kept per channel.
    pub rows_per_channel: u64,
    /// How often retention runs.
    pub prune_every: Duration,
    /// On a read replica: where writes go, for the refusal (`--primary-url`). Without it
    /// the refusal names the primary database the replica streams from.
    pub primary: Option<String>,
}

/// How long a replica's gateway waits for an id from the primary to replicate before it
/// answers `reset` (an id that never arrives was never the primary's).
const REPLICA_LAG_WAIT: Duration = Duration::from_secs(5);

/// How long a publish waits for the sequencer to number its message.
const PUBLISH_WAIT: Duration = Duration::from_secs(10);

/// The running engine.
pub struct PgEngine {
    store: Store,
    epoch: Epoch,
    /// Requests to the LISTEN task (open and close feeds).
    commands: mpsc::UnboundedSender<Command>,
    listening: watch::Receiver<bool>,
    revoked: broadcast::Sender<String>,
    /// Starts a sequencer pass at once, if this instance's sequencer leads.
    wake: Arc<Notify>,
}

impl std::fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEngine").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl PgEngine {
    /// Starts the engine on a migrated database, delivering to `hub`, until `cancel` is
    /// cancelled. On a primary: the LISTEN source, the sequencer (leader or standby) and the
    /// retention task. On a read replica (`pg_is_in_recovery()`): the follower alone — the
    /// primary numbers and prunes, and every write is refused naming the primary.
    pub async fn start(
        mut store: Store,
        config: PgConfig,
        hub: Hub,
        cancel: CancellationToken,
    ) -> Result<Self, PgError> {
        let epoch = store.epoch().await?;
        let following = store.is_replica().await?;
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let (ready, listening) = watch::channel(false);
        let (revoked, _) = broadcast::channel(256);
        let wake = Arc::new(Notify::new());
        // This code speaks to the schema of every migration it knows (a publish on migration 3
        // would answer a sequence number where this expects a row id): refuse an older one.
        let recorded = store.migrations().await?;
        if let Some((version, name, _)) =
            crate::migrate::MIGRATIONS.iter().find(|(v, _, _)| !recorded.contains(v))
        {
            let remedy =
                if following { "`changegate migrate` on the primary" } else { "`changegate migrate`" };
            return Err(PgError::unavailable(
                "the database's schema is behind this gateway",
                format!("migration {version} ({name}) has not run: run {remedy} (or `serve --migrate`)"),
            ));
        }
        // Built once the store knows whether it follows (a follower's refuses writes).
        let upstream = |store: &Store| Upstream {
            store: store.clone(),
            hub,
            epoch,
            commands: command_receiver,
            ready,
            revoked: revoked.clone(),
            cancel: cancel.clone(),
        };
        if following {
            let primary = match config.primary.clone() {
                Some(primary) => primary,
                None => match store.upstream().await? {
                    Some(address) => format!("the primary database at {address}"),
                    None => "the primary database".to_owned(),
                },
            };
            tracing::info!(%primary, "the database is a read replica: following its outbox");
            store = store.following(&primary);
            let follower = Follower::new(upstream(&store));
            let (store, wake) = (store.clone(), wake.clone());
            tokio::spawn(async move {
                let Some(follower) = follower.run().await else { return };
                tracing::warn!(
                    "the replica was promoted: this gateway now sequences and delivers as the primary"
                );
                store.promoted();
                metrics::gauge!("changegate_upstream_up", "upstream" => "postgres_follow").set(0.0);
                tokio::spawn(crate::sequencer::run(store.clone(), cancel.clone(), wake));
                tokio::spawn(prune(store, config, cancel));
                follower.into_listener().take_over(tokio::time::Instant::now()).await;
            });
        } else {
            let listener = Listener::new(upstream(&store));
            tokio::spawn(listener.run());
            tokio::spawn(crate::sequencer::run(store.clone(), cancel.clone(), wake.clone()));
            tokio::spawn(prune(store.clone(), config, cancel));
        }
        Ok(Self { store, epoch, commands, listening, revoked, wake })
    }

    /// Whether this engine follows a read replica (and refuses writes); false again once the
    /// replica has been promoted.
    pub fn is_following(&self) -> bool {
        self.store.is_following()
    }

    /// The store, for keys and administration.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the source is up: the LISTEN connection, or on a replica the follower's reads.
    pub fn listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Ids of keys as they are revoked (on any instance).
    pub fn revocations(&self) -> broadcast::Receiver<String> {
        self.revoked.subscribe()
    }

    /// Publishes a message through the outbox — queued and committed, then numbered and
    /// NOTIFYed by the sequencer like any change — and returns its position once numbered
    /// (within a pass or two: this instance's sequencer, if it leads, is woken for it).
    pub async fn publish(
        &self,
        tenant: &TenantId,
        topic: &Topic,
        data: &RawJson,
    ) -> Result<Position, PgError> {
        let id = self.store.publish(tenant, topic, data).await?;
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + PUBLISH_WAIT;
        let mut wait = Duration::from_micros(500);
        loop {
            if let Some(seq) = self.store.numbered(id).await? {
                return Ok(Position::new(self.epoch, seq));
            }
            if tokio::time::Instant::now() >= deadline {
                // Committed, so it will be delivered; only its id could not be told.
                return Err(PgError::unavailable(
                    format!("publishing for tenant {tenant}"),
                    "the message was queued but not numbered in time (is a sequencer running?)",
                ));
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(8));
        }
    }

    /// One page of `key`'s committed events from `start` that match `filter`, reading at
    /// most `limit` rows; [`Replay::Reset`] when the start is from another database, in the
    /// future, or behind the channel's retention horizon (checked again for every page, so a
    /// prune during a slow catch-up is a reset, never a gap).
    pub async fn replay(
        &self,
        key: &FeedKey,
        filter: &Filter,
        start: &Start,
        limit: usize,
    ) -> Result<Replay, PgError> {
        let name = channel(key);
        let limit = limit.max(1);
        let events = match start {
            Start::After(after) => {
                if after.epoch() != self.epoch {
                    return Ok(Replay::Reset);
                }
                let (pruned_through, issued) = self.replay_bounds(&name, after.seq()).await?;
                if after.seq() < pruned_through || after.seq() > issued {
                    return Ok(Replay::Reset);
                }
                self.store.replay(&name, &key.tenant, after.seq(), limit, self.epoch).await?
            }
            Start::Since(at) => {
                self.store.replay_since(&name, &key.tenant, at.as_millis(), limit, self.epoch).await?
            }
            // Not an id this engine sends.
            Start::Cursor(_) => return Ok(Replay::Reset),
        };
        let next = (events.len() == limit).then(|| events.last().map(|e| e.position)).flatten();
        let frames =
            events.into_iter().filter(|e| filter.matches(e)).map(|e| Arc::new(Frame::new(e))).collect();
        Ok(Replay::Page { frames, next })
    }

    /// The channel's replay bounds (see [`Store::replay_bounds`]). On a replica an id from the
    /// primary may be ahead of what has replicated so far: wait, briefly, for the replica to
    /// reach it rather than `reset` a client that only moved to a lagging replica.
    async fn replay_bounds(&self, name: &str, after: u64) -> Result<(u64, u64), PgError> {
        let deadline = tokio::time::Instant::now() + REPLICA_LAG_WAIT;
        loop {
            let bounds = self.store.replay_bounds(name).await?;
            if !self.is_following() || after <= bounds.1 || tokio::time::Instant::now() >= deadline {
                return Ok(bounds);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether more than `cap` events of `key` follow `after`.
    pub async fn backlog_exceeds(&self, key: &FeedKey, after: Position, cap: u64) -> Result<bool, PgError> {
        // Sequence numbers are shared by every channel, so the distance to the last one issued
        // bounds the channel's backlog: only count rows when that bound is over the cap.
        let (_, issued) = self.store.replay_bounds(&channel(key)).await?;
        if issued.saturating_sub(after.seq()) <= cap {
            return Ok(false);
        }
        self.store.backlog_exceeds(&channel(key), after.seq(), cap).await
    }

    /// Where a client continues after a `reset` on `key`.
    pub async fn head(&self, key: &FeedKey) -> Result<Position, PgError> {
        Ok(Position::new(self.epoch, self.store.head(&channel(key)).await?))
    }
}

fn unavailable<'a>(tenant: &'a TenantId, what: &'static str) -> impl FnOnce(PgError) -> SourceError + 'a {
    move |error| SourceError::unavailable(tenant, what, error)
}

impl Log for PgEngine {
    fn page(
        &self,
        key: &FeedKey,
        filter: &Filter,
        start: &Start,
        limit: usize,
    ) -> BoxFuture<'_, Result<Replay, SourceError>> {
        let (key, filter, start) = (key.clone(), filter.clone(), start.clone());
        Box::pin(async move {
            self.replay(&key, &filter, &start, limit)
                .await
                .map_err(unavailable(&key.tenant, "reading the outbox"))
        })
    }

    fn exceeds(&self, key: &FeedKey, after: Position, cap: u64) -> BoxFuture<'_, Result<bool, SourceError>> {
        let key = key.clone();
        Box::pin(async move {
            self.backlog_exceeds(&key, after, cap)
                .await
                .map_err(unavailable(&key.tenant, "counting the outbox"))
        })
    }

    fn head(&self, key: &FeedKey) -> BoxFuture<'_, Result<Position, SourceError>> {
        let key = key.clone();
        Box::pin(async move {
            PgEngine::head(self, &key).await.map_err(unavailable(&key.tenant, "reading the outbox head"))
        })
    }
}

impl Source for PgEngine {
    fn open(&self, key: &FeedKey) -> OpenFuture {
        let (done, answer) = oneshot::channel();
        let sent = self.commands.send(Command::Listen { key: key.clone(), done });
        let tenant = key.tenant.clone();
        Box::pin(async move {
            let stopped = || SourceError::unavailable(&tenant, "listening", "the listener has stopped");
            sent.map_err(|_| stopped())?;
            answer
                .await
                .map_err(|_| stopped())?
                .map_err(|reason| SourceError::unavailable(&tenant, "listening", reason))
        })
    }

    fn close(&self, key: &FeedKey) {
        // If the listener is gone there is nothing left to close.
        let _ = self.commands.send(Command::Unlisten { key: key.clone() });
    }

    fn accepts(&self, start: &Start) -> bool {
        changegate_core::source::log_accepts(start)
    }

    fn replay(
        self: Arc<Self>,
        key: FeedKey,
        filter: Filter,
        start: Start,
        cap: u64,
    ) -> BoxFuture<'static, Result<CatchUp, SourceError>> {
        paged(self, key, filter, start, cap)
    }
}

async fn prune(store: Store, config: PgConfig, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(config.prune_every) => {}
        }
        match store.prune(config.retention_age, config.rows_per_channel).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "pruned the outbox"),
            Err(error) => tracing::warn!(%error, "pruning the outbox failed; will retry"),
        }
    }
}
