//! The PostgreSQL engine as the gateway uses it: a store, a hub fed by the LISTEN source, and a
//! retention task — all tied to one cancellation token.

use std::sync::Arc;
use std::time::Duration;

use changegate_core::{Epoch, FeedKey, Filter, Frame, Hub, HubConfig, Position, Replay, TenantId, Topic};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::source::{Listener, PgUpstream};
use crate::store::Store;
use crate::{PgError, channel};

/// How to run the engine.
#[derive(Clone, Debug)]
pub struct PgConfig {
    /// Outbox rows older than this are pruned.
    pub retention_age: Duration,
    /// At most this many outbox rows are kept.
    pub retention_events: u64,
    /// How often retention runs.
    pub prune_every: Duration,
}

/// The running engine.
pub struct PgEngine {
    store: Store,
    hub: Hub,
    epoch: Epoch,
    listening: watch::Receiver<bool>,
    revoked: broadcast::Sender<String>,
}

impl std::fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEngine").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl PgEngine {
    /// Starts the engine on a migrated database: the LISTEN source and the retention task run
    /// until `cancel` is cancelled.
    pub async fn start(
        store: Store,
        config: PgConfig,
        hub: HubConfig,
        cancel: CancellationToken,
    ) -> Result<Self, PgError> {
        let epoch = store.epoch().await?;
        let (commands, command_receiver) = mpsc::unbounded_channel();
        let hub = Hub::new(hub, Arc::new(PgUpstream { commands }));
        let (ready, listening) = watch::channel(false);
        let (revoked, _) = broadcast::channel(256);
        let listener = Listener::new(
            store.clone(),
            hub.clone(),
            epoch,
            command_receiver,
            ready,
            revoked.clone(),
            cancel.clone(),
        );
        tokio::spawn(listener.run());
        tokio::spawn(prune(store.clone(), config, cancel));
        Ok(Self { store, hub, epoch, listening, revoked })
    }

    /// The store, for keys and administration.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The hub subscribers attach to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Whether the LISTEN connection is up.
    pub fn listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Ids of keys as they are revoked (on any instance).
    pub fn revocations(&self) -> broadcast::Receiver<String> {
        self.revoked.subscribe()
    }

    /// Publishes a message through the outbox: every instance delivers it.
    pub async fn publish(&self, tenant: &TenantId, topic: &Topic, data: &Value) -> Result<Position, PgError> {
        let seq = self.store.publish(tenant, topic, data).await?;
        Ok(Position::new(self.epoch, seq))
    }

    /// What a subscriber resuming after `after` must receive before live events.
    pub async fn replay(&self, key: &FeedKey, filter: &Filter, after: Position) -> Result<Replay, PgError> {
        if after.epoch() != self.epoch {
            return Ok(Replay::Reset);
        }
        let name = channel(key);
        let (pruned_through, issued) = self.store.replay_bounds(&name).await?;
        if after.seq() < pruned_through || after.seq() > issued {
            return Ok(Replay::Reset);
        }
        let events = self.store.replay(&name, &key.tenant, after.seq(), self.epoch).await?;
        Ok(Replay::Events(
            events.into_iter().filter(|e| filter.matches(e)).map(|e| Arc::new(Frame::new(e))).collect(),
        ))
    }

    /// The retained events of `key` committed at or after `since_ms` (epoch milliseconds).
    pub async fn replay_since(
        &self,
        key: &FeedKey,
        filter: &Filter,
        since_ms: u64,
    ) -> Result<Vec<Arc<Frame>>, PgError> {
        let events = self.store.replay_since(&channel(key), &key.tenant, since_ms, self.epoch).await?;
        Ok(events.into_iter().filter(|e| filter.matches(e)).map(|e| Arc::new(Frame::new(e))).collect())
    }

    /// Where a client continues after a `reset` on `key`.
    pub async fn head(&self, key: &FeedKey) -> Result<Position, PgError> {
        Ok(Position::new(self.epoch, self.store.head(&channel(key)).await?))
    }
}

async fn prune(store: Store, config: PgConfig, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(config.prune_every) => {}
        }
        match store.prune(config.retention_age, config.retention_events).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "pruned the outbox"),
            Err(error) => tracing::warn!(%error, "pruning the outbox failed; will retry"),
        }
    }
}
