//! The memory engine: one process, an in-memory log per tenant, keys loaded at start.
//!
//! It is the default when no database is configured, so a developer can run changegate with
//! nothing else installed. It gives the same guarantees as the database engines within one
//! process: per-tenant order, replay by position with no gap and no duplicate at the seam, and
//! a `reset` (never a silent gap) for a position it no longer holds — including every position
//! from before a restart, which carries another [`Epoch`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::auth::{ApiKey, KeyHash, KeyRecord};
use crate::event::{Event, EventBody, Frame, RawJson, Timestamp};
use crate::hub::{Feed, FeedKey, Filter, Hub};
use crate::names::{TenantId, Topic};
use crate::position::{Epoch, Position};
use crate::replay::Replay;
use crate::source::{BoxFuture, CatchUp, Log, OpenFuture, Source, SourceError, Start, paged};

/// How much of each tenant's log is kept for replay.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// At most this many events per tenant.
    pub max_events: usize,
    /// Events older than this are dropped.
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self { max_events: 10_000, max_age: Duration::from_secs(3600) }
    }
}

#[derive(Default)]
struct TenantLog {
    events: VecDeque<Arc<Frame>>,
    /// The highest sequence number dropped by retention.
    pruned_through: u64,
}

impl TenantLog {
    fn prune(&mut self, retention: Retention, now: Timestamp) {
        let max_age = u64::try_from(retention.max_age.as_millis()).unwrap_or(u64::MAX);
        let oldest = now.as_millis().saturating_sub(max_age);
        while let Some(front) = self.events.front() {
            let too_many = self.events.len() > retention.max_events;
            if !too_many && front.event().at.as_millis() >= oldest {
                break;
            }
            self.pruned_through = front.position().seq();
            self.events.pop_front();
        }
    }
}

/// The in-process engine: per-tenant logs and the hub they publish into.
pub struct MemoryEngine {
    epoch: Epoch,
    /// The last sequence number handed out (shared by all tenants so positions are unique).
    last_seq: Mutex<u64>,
    logs: Mutex<HashMap<TenantId, Arc<Mutex<TenantLog>>>>,
    retention: Retention,
    hub: Hub,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEngine").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl MemoryEngine {
    /// A new, empty engine with a fresh epoch that delivers to `hub`.
    pub fn new(retention: Retention, hub: Hub) -> Self {
        Self {
            epoch: Epoch::random(),
            last_seq: Mutex::new(0),
            logs: Mutex::new(HashMap::new()),
            retention,
            hub,
        }
    }

    /// This engine's log epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The newest position issued: replaying after it yields only future events.
    pub fn head(&self) -> Position {
        Position::new(self.epoch, *self.last_seq.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn log(&self, tenant: &TenantId) -> Arc<Mutex<TenantLog>> {
        let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        logs.entry(tenant.clone()).or_default().clone()
    }

    /// Appends a message to `tenant`'s log and delivers it to the tenant's subscribers.
    pub fn publish(&self, tenant: &TenantId, topic: Topic, data: RawJson) -> Position {
        self.append(tenant, Feed::Messages, EventBody::Message { topic, data })
    }

    /// Appends an event of `feed` to `tenant`'s log and delivers it to the feed's subscribers.
    /// Callers that must order several appends (a flag store) hold their own lock around them.
    pub fn append(&self, tenant: &TenantId, feed: Feed, body: EventBody) -> Position {
        let log = self.log(tenant);
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        let position = {
            let mut last = self.last_seq.lock().unwrap_or_else(PoisonError::into_inner);
            *last += 1;
            Position::new(self.epoch, *last)
        };
        let at = Timestamp::now();
        let frame = Arc::new(Frame::new(Event { tenant: tenant.clone(), position, at, body, cursor: None }));
        log.events.push_back(frame.clone());
        log.prune(self.retention, at);
        // Dispatch while holding the tenant's log lock: the hub then sees this tenant's events
        // in log order, which is what makes the replay/live seam exact.
        let key = FeedKey { tenant: tenant.clone(), feed };
        self.hub.dispatch(&key, frame);
        position
    }

    /// One page of `key`'s retained events from `start` that match `filter`, reading at most
    /// `limit` events of the log; [`Replay::Reset`] when events after `start` may have been
    /// dropped (also between two pages of one catch-up) or its position was never issued here.
    pub fn replay(&self, key: &FeedKey, filter: &Filter, start: &Start, limit: usize) -> Replay {
        let issued = *self.last_seq.lock().unwrap_or_else(PoisonError::into_inner);
        let logged_here = matches!(key.feed, Feed::Messages | Feed::Flags);
        if let Start::After(after) = start
            && (after.epoch() != self.epoch || after.seq() > issued)
        {
            return Replay::Reset;
        }
        if !logged_here {
            return Replay::Reset;
        }
        let log = self.log(&key.tenant);
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        log.prune(self.retention, Timestamp::now());
        let first = match start {
            Start::After(after) if after.seq() < log.pruned_through => return Replay::Reset,
            Start::After(after) => log.events.partition_point(|f| f.position().seq() <= after.seq()),
            Start::Since(at) => {
                log.events.iter().position(|f| f.event().at >= *at).unwrap_or(log.events.len())
            }
            // Not an id this engine sends.
            Start::Cursor(_) => return Replay::Reset,
        };
        let end = first.saturating_add(limit.max(1)).min(log.events.len());
        let read = log.events.range(first..end);
        let next = (end < log.events.len()).then(|| log.events[end - 1].position());
        let frames = read
            .filter(|f| feed_of(f.event()) == Some(&key.feed) && filter.matches(f.event()))
            .cloned()
            .collect();
        Replay::Page { frames, next }
    }

    /// Whether more than `cap` events of `key`'s tenant follow `after` (a catch-up that long
    /// gets a `reset` instead).
    pub fn backlog_exceeds(&self, key: &FeedKey, after: Position, cap: u64) -> bool {
        let log = self.log(&key.tenant);
        let log = log.lock().unwrap_or_else(PoisonError::into_inner);
        let first = log.events.partition_point(|f| f.position().seq() <= after.seq());
        u64::try_from(log.events.len() - first).unwrap_or(u64::MAX) > cap
    }
}

impl Log for MemoryEngine {
    fn page(
        &self,
        key: &FeedKey,
        filter: &Filter,
        start: &Start,
        limit: usize,
    ) -> BoxFuture<'_, Result<Replay, SourceError>> {
        let page = self.replay(key, filter, start, limit);
        Box::pin(async move { Ok(page) })
    }

    fn exceeds(&self, key: &FeedKey, after: Position, cap: u64) -> BoxFuture<'_, Result<bool, SourceError>> {
        let exceeds = self.backlog_exceeds(key, after, cap);
        Box::pin(async move { Ok(exceeds) })
    }

    fn head(&self, _key: &FeedKey) -> BoxFuture<'_, Result<Position, SourceError>> {
        let head = MemoryEngine::head(self);
        Box::pin(async move { Ok(head) })
    }
}

impl Source for MemoryEngine {
    /// Nothing to open: [`MemoryEngine::append`] dispatches every event itself.
    fn open(&self, _key: &FeedKey) -> OpenFuture {
        Box::pin(async { Ok(()) })
    }

    fn close(&self, _key: &FeedKey) {}

    fn accepts(&self, start: &Start) -> bool {
        crate::source::log_accepts(start)
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

/// The in-memory feed an event belongs to.
fn feed_of(event: &Event) -> Option<&'static Feed> {
    match event.body {
        EventBody::Message { .. } => Some(&Feed::Messages),
        EventBody::Flag { .. } | EventBody::Config { .. } => Some(&Feed::Flags),
        EventBody::Change { .. } | EventBody::Reset { .. } => None,
    }
}

/// Keys held in memory (loaded from a file, or generated for the dev tenant).
#[derive(Debug, Default, Clone)]
pub struct MemoryKeys {
    by_hash: HashMap<KeyHash, KeyRecord>,
    /// Keys that stop working at a time (rotated with a grace period).
    expiring: HashMap<String, Timestamp>,
}

impl MemoryKeys {
    /// Adds a key record.
    pub fn insert(&mut self, record: KeyRecord) {
        self.by_hash.insert(record.hash, record);
    }

    /// Every record.
    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.by_hash.values()
    }

    /// The record of `key`, if it exists (revoked or not; a rotated key counts as revoked
    /// once its grace period is over).
    pub fn find(&self, key: &ApiKey) -> Option<KeyRecord> {
        let mut record = self.by_hash.get(&key.hash())?.clone();
        if self.expiring.get(&record.id).is_some_and(|at| *at <= Timestamp::now()) {
            record.revoked = true;
        }
        Some(record)
    }

    /// Issues a new key like key `id` (same tenant, environment and scope) and lets the old
    /// one work until `expires`. `None` if `id` is not a live key of `tenant`.
    pub fn rotate(&mut self, tenant: &TenantId, id: &str, expires: Timestamp) -> Option<(ApiKey, KeyRecord)> {
        let now = Timestamp::now();
        let old = self.by_hash.values().find(|r| {
            r.id == id
                && r.tenant == *tenant
                && !r.revoked
                && self.expiring.get(id).is_none_or(|at| *at > now)
        })?;
        let key = ApiKey::generate(old.scope);
        let record = KeyRecord {
            id: key.hash().id(),
            hash: key.hash(),
            tenant: old.tenant.clone(),
            environment: old.environment.clone(),
            scope: old.scope,
            revoked: false,
        };
        let previous = old.id.clone();
        let at = self.expiring.get(&previous).map_or(expires, |current| (*current).min(expires));
        self.expiring.insert(previous, at);
        self.insert(record.clone());
        Some((key, record))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::names::TopicPattern;

    fn tenant(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn messages(t: &str) -> FeedKey {
        FeedKey { tenant: tenant(t), feed: Feed::Messages }
    }

    fn all() -> Filter {
        Filter::Topics(TopicPattern::All)
    }

    fn seqs(replay: Replay) -> Vec<u64> {
        match replay {
            Replay::Page { frames, next: None } => frames.iter().map(|f| f.position().seq()).collect(),
            other => panic!("expected the last page, got {other:?}"),
        }
    }

    const ALL: usize = usize::MAX;

    fn engine(max_events: usize) -> MemoryEngine {
        let retention = Retention { max_events, max_age: Duration::from_secs(60) };
        MemoryEngine::new(retention, Hub::new(crate::HubConfig::default()))
    }

    fn topic(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[tokio::test]
    async fn replay_returns_exactly_the_events_after_the_position_of_that_tenant() {
        let engine = engine(100);
        let p1 = engine.publish(&tenant("a"), topic("x"), json!(1).into());
        engine.publish(&tenant("b"), topic("x"), json!(2).into());
        let p3 = engine.publish(&tenant("a"), topic("y"), json!(3).into());
        let p4 = engine.publish(&tenant("a"), topic("x"), json!(4).into());
        assert_eq!(seqs(engine.replay(&messages("a"), &all(), &Start::After(p1), ALL)), [p3.seq(), p4.seq()]);
        let only_x = Filter::Topics(TopicPattern::parse("x").unwrap());
        assert_eq!(seqs(engine.replay(&messages("a"), &only_x, &Start::After(p1), ALL)), [p4.seq()]);
        assert_eq!(seqs(engine.replay(&messages("a"), &all(), &Start::After(p4), ALL)), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn a_position_older_than_retention_yields_a_reset() {
        let engine = engine(3);
        let first = engine.publish(&tenant("a"), topic("x"), json!(0).into());
        let second = engine.publish(&tenant("a"), topic("x"), json!(0).into());
        for _ in 0..3 {
            engine.publish(&tenant("a"), topic("x"), json!(0).into());
        }
        assert!(matches!(engine.replay(&messages("a"), &all(), &Start::After(first), ALL), Replay::Reset));
        // The oldest retained event follows `second` directly: nothing was lost after it.
        assert_eq!(seqs(engine.replay(&messages("a"), &all(), &Start::After(second), ALL)).len(), 3);
    }

    #[tokio::test]
    async fn positions_of_another_epoch_or_the_future_yield_a_reset() {
        let engine = engine(3);
        let p = engine.publish(&tenant("a"), topic("x"), json!(0).into());
        let other_log = Position::new(Epoch(engine.epoch().0.wrapping_add(1)), p.seq());
        let future = Position::new(engine.epoch(), p.seq() + 1);
        assert!(matches!(
            engine.replay(&messages("a"), &all(), &Start::After(other_log), ALL),
            Replay::Reset
        ));
        assert!(matches!(engine.replay(&messages("a"), &all(), &Start::After(future), ALL), Replay::Reset));
    }

    #[tokio::test]
    async fn a_catch_up_reads_in_pages_that_join_without_gap_or_repeat() {
        let engine = engine(100);
        let first = engine.publish(&tenant("a"), topic("x"), json!(0).into());
        let published: Vec<u64> =
            (1..=10).map(|i| engine.publish(&tenant("a"), topic("x"), json!(i).into()).seq()).collect();
        let mut from = first;
        let mut read = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            match engine.replay(&messages("a"), &all(), &Start::After(from), 3) {
                Replay::Page { frames, next } => {
                    assert!(frames.len() <= 3);
                    read.extend(frames.iter().map(|f| f.position().seq()));
                    match next {
                        Some(next) => from = next,
                        None => break,
                    }
                }
                Replay::Reset => panic!("nothing was pruned"),
            }
        }
        assert_eq!((read, pages), (published, 4));
        assert!(engine.backlog_exceeds(&messages("a"), first, 9));
        assert!(!engine.backlog_exceeds(&messages("a"), first, 10));
    }

    #[tokio::test]
    async fn a_page_after_events_pruned_between_pages_is_a_reset() {
        let engine = engine(3);
        let first = engine.publish(&tenant("a"), topic("x"), json!(0).into());
        engine.publish(&tenant("a"), topic("x"), json!(1).into());
        let Replay::Page { next: None, .. } = engine.replay(&messages("a"), &all(), &Start::After(first), 1)
        else {
            panic!("one event after the first, read in one page");
        };
        for i in 0..3 {
            engine.publish(&tenant("a"), topic("x"), json!(i).into());
        }
        assert!(matches!(engine.replay(&messages("a"), &all(), &Start::After(first), 1), Replay::Reset));
    }

    #[tokio::test]
    async fn live_subscribers_receive_published_events_in_order() {
        let hub = Hub::new(crate::HubConfig::default());
        let engine = Arc::new(MemoryEngine::new(Retention::default(), hub.clone()));
        let source: Arc<dyn Source> = engine.clone();
        let mut sub = hub.subscribe(messages("a"), all(), &source).await.unwrap();
        let published: Vec<_> =
            (0..5).map(|i| engine.publish(&tenant("a"), topic("x"), json!(i).into())).collect();
        let mut received = Vec::new();
        while let Some(frame) = sub.try_recv().unwrap() {
            received.push(frame.position());
        }
        assert_eq!(received, published);
    }
}
