//! The engine the gateway runs on, behind one interface: where keys live, where events are
//! logged, and how a subscriber replays. Today: the memory engine.

use changegate_core::memory::Replay;
use changegate_core::{
    ApiKey, FeedKey, Filter, Hub, KeyRecord, MemoryEngine, MemoryKeys, Position, TenantId, Topic,
};
use serde_json::Value;

use crate::error::ApiError;

/// The storage and fan-out behind the routes.
#[derive(Debug)]
pub enum Engine {
    /// One process, everything in memory.
    Memory {
        /// Logs and hub.
        engine: MemoryEngine,
        /// Keys loaded at start.
        keys: MemoryKeys,
    },
}

impl Engine {
    /// The hub subscribers attach to.
    pub fn hub(&self) -> &Hub {
        match self {
            Self::Memory { engine, .. } => engine.hub(),
        }
    }

    /// The stored record of `key`, revoked or not.
    pub async fn find_key(&self, key: &ApiKey) -> Result<Option<KeyRecord>, ApiError> {
        match self {
            Self::Memory { keys, .. } => Ok(keys.find(key).cloned()),
        }
    }

    /// Logs a message and fans it out; returns its position.
    pub async fn publish(
        &self,
        tenant: &TenantId,
        topic: Topic,
        data: Value,
    ) -> Result<Position, ApiError> {
        match self {
            Self::Memory { engine, .. } => Ok(engine.publish(tenant, topic, data)),
        }
    }

    /// What a subscriber resuming after `after` must receive before live events.
    pub async fn replay(
        &self,
        key: &FeedKey,
        filter: &Filter,
        after: Position,
    ) -> Result<Replay, ApiError> {
        match self {
            Self::Memory { engine, .. } => Ok(engine.replay(key, filter, after)),
        }
    }

    /// The newest position of `key`'s log: where a client continues after a `reset`.
    pub async fn head(&self, _key: &FeedKey) -> Result<Position, ApiError> {
        match self {
            Self::Memory { engine, .. } => Ok(engine.head()),
        }
    }

    /// Whether every dependency is reachable; the reason otherwise.
    pub async fn readiness(&self) -> Result<(), String> {
        match self {
            Self::Memory { .. } => Ok(()),
        }
    }
}
