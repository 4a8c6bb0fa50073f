//! The hub: fan-out of a tenant's feeds to their subscribers.
//!
//! A *feed* ([`FeedKey`]) is one upstream — a tenant's messages, or one tenant's collection —
//! and is opened once, when its first subscriber arrives, however many subscribers follow. When
//! the last one leaves, the feed stays open for a grace period (so a reconnecting browser does
//! not cost a new LISTEN or change stream) and is then closed.
//!
//! Inside a feed, each distinct [`Filter`] has one bounded broadcast ring shared by all of its
//! subscribers: an event is matched once per filter and handed out as one `Arc<Frame>`, whose
//! wire encoding is computed once. A subscriber that falls more than the ring's capacity behind
//! gets [`Lagged`] and is expected to disconnect and resume from its last position, so the
//! hub's memory never grows with a slow reader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{OnceCell, broadcast};
use tokio::time::Instant;

use crate::event::{Event, EventBody, Frame, SourceKind};
use crate::names::{CollectionName, EnvironmentId, TenantId, TopicPattern};
use crate::source::{Source, SourceError};

/// What a feed carries.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Feed {
    /// The tenant's published application messages (every topic).
    Messages,
    /// The tenant's flag, rule, segment and key-rotation events (every environment).
    Flags,
    /// Changes of one table or collection of the tenant.
    Collection {
        /// Which database.
        source: SourceKind,
        /// Which table or collection.
        name: CollectionName,
    },
}

/// One upstream: a feed of one tenant. There is no way to name a feed without a tenant.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct FeedKey {
    /// The tenant whose events this feed carries.
    pub tenant: TenantId,
    /// What it carries.
    pub feed: Feed,
}

/// Which events of a feed a subscriber wants.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Filter {
    /// All of them (collection subscriptions).
    Everything,
    /// Messages whose topic matches.
    Topics(TopicPattern),
    /// Flag and configuration events of one environment (`Some`) or of all (`None`).
    Environment(Option<EnvironmentId>),
}

impl Filter {
    /// Whether `event` belongs to this filter.
    pub fn matches(&self, event: &Event) -> bool {
        match (self, &event.body) {
            (Self::Everything, _) => true,
            (Self::Topics(pattern), EventBody::Message { topic, .. }) => pattern.matches(topic),
            (Self::Topics(_), _) => false,
            (Self::Environment(None), EventBody::Flag { .. } | EventBody::Config { .. }) => true,
            (Self::Environment(Some(wanted)), EventBody::Flag { environment, .. }) => environment == wanted,
            (Self::Environment(Some(wanted)), EventBody::Config { environment, .. }) => {
                environment.as_ref().is_none_or(|e| e == wanted)
            }
            (Self::Environment(_), _) => false,
        }
    }
}

/// Hub tuning.
#[derive(Clone, Copy, Debug)]
pub struct HubConfig {
    /// How many events a subscriber may fall behind before it is told it [`Lagged`].
    pub buffer: usize,
    /// How long a feed without subscribers stays open.
    pub grace: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self { buffer: 1024, grace: Duration::from_secs(5) }
    }
}

struct Stream {
    filter: Filter,
    sender: broadcast::Sender<Arc<Frame>>,
}

struct Slot {
    /// The source that opened (or is opening) this feed, and closes it.
    source: Arc<dyn Source>,
    subscribers: usize,
    idle_since: Option<Instant>,
    opened: Arc<OnceCell<()>>,
    streams: Vec<Stream>,
}

struct Inner {
    feeds: Mutex<HashMap<FeedKey, Slot>>,
    config: HubConfig,
}

impl Inner {
    fn feeds(&self) -> MutexGuard<'_, HashMap<FeedKey, Slot>> {
        // No code path panics while holding this lock; recover the map if one ever did.
        self.feeds.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reap(&self, now: Instant) {
        let mut feeds = self.feeds();
        feeds.retain(|key, slot| {
            let expired = slot.subscribers == 0
                && slot.idle_since.is_some_and(|t| now.duration_since(t) >= self.config.grace);
            if expired && slot.opened.initialized() {
                slot.source.close(key);
            }
            !expired
        });
    }
}

/// The fan-out hub. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Hub {
    /// An empty hub. Must be called inside a Tokio runtime: it starts the task that closes
    /// idle feeds, which ends when the last clone of the hub is dropped.
    pub fn new(config: HubConfig) -> Self {
        let config = HubConfig { buffer: config.buffer.max(1), ..config };
        let inner = Arc::new(Inner { feeds: Mutex::new(HashMap::new()), config });
        tokio::spawn(reaper(Arc::downgrade(&inner), config.grace));
        Self { inner }
    }

    /// Subscribes to the events of `key` that match `filter`, opening the feed at `source` if
    /// this is its first subscriber. Events dispatched after this returns are received.
    ///
    /// A feed is served by one source for its whole life (the gateway picks it by the feed's
    /// kind), so `source` only matters to the subscriber that opens it.
    pub async fn subscribe(
        &self,
        key: FeedKey,
        filter: Filter,
        source: &Arc<dyn Source>,
    ) -> Result<Subscription, SourceError> {
        let (receiver, opened, source) = {
            let mut feeds = self.inner.feeds();
            let slot = feeds.entry(key.clone()).or_insert_with(|| Slot {
                source: source.clone(),
                subscribers: 0,
                idle_since: None,
                opened: Arc::new(OnceCell::new()),
                streams: Vec::new(),
            });
            slot.subscribers += 1;
            slot.idle_since = None;
            let receiver = match slot.streams.iter().find(|s| s.filter == filter) {
                Some(stream) => stream.sender.subscribe(),
                None => {
                    let (sender, receiver) = broadcast::channel(self.inner.config.buffer);
                    slot.streams.push(Stream { filter, sender });
                    receiver
                }
            };
            (receiver, slot.opened.clone(), slot.source.clone())
        };
        let guard = Guard { hub: Arc::downgrade(&self.inner), key };
        opened.get_or_try_init(|| source.open(&guard.key)).await?;
        Ok(Subscription { receiver, lagged: None, _guard: guard })
    }

    /// Hands an event of `key` to every matching subscriber. Events of one feed must be
    /// dispatched in stream order; this never blocks on a subscriber.
    pub fn dispatch(&self, key: &FeedKey, frame: Arc<Frame>) {
        let feed = match key.feed {
            Feed::Messages => "messages",
            Feed::Flags => "flags",
            Feed::Collection { .. } => "collection",
        };
        metrics::counter!("changegate_events_in_total", "feed" => feed).increment(1);
        let age_ms = crate::Timestamp::now().as_millis().saturating_sub(frame.event().at.as_millis());
        metrics::histogram!("changegate_commit_to_dispatch_seconds").record(age_ms as f64 / 1000.0);
        let feeds = self.inner.feeds();
        let Some(slot) = feeds.get(key) else { return };
        for stream in &slot.streams {
            if stream.filter.matches(frame.event()) {
                // An error only means nobody is listening on this filter right now.
                let _ = stream.sender.send(frame.clone());
            }
        }
    }

    /// How many subscribers `key` has right now.
    pub fn subscribers(&self, key: &FeedKey) -> usize {
        self.inner.feeds().get(key).map_or(0, |slot| slot.subscribers)
    }
}

async fn reaper(hub: Weak<Inner>, grace: Duration) {
    let period = (grace / 2).max(Duration::from_millis(20));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = hub.upgrade() else { return };
        inner.reap(Instant::now());
    }
}

struct Guard {
    hub: Weak<Inner>,
    key: FeedKey,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(inner) = self.hub.upgrade() else {
            return;
        };
        let mut feeds = inner.feeds();
        if let Some(slot) = feeds.get_mut(&self.key) {
            slot.subscribers = slot.subscribers.saturating_sub(1);
            // The subscription's receiver was dropped before this guard (field order), so a
            // filter nobody reads any more has no receivers left.
            slot.streams.retain(|s| s.sender.receiver_count() > 0);
            if slot.subscribers == 0 {
                slot.idle_since = Some(Instant::now());
            }
        }
    }
}

/// The subscriber fell more than the hub's buffer behind; the events it missed are still in
/// the engine's log, so it should disconnect and resume from its last position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscriber fell behind by {0} events")]
pub struct Lagged(pub u64);

/// One subscriber's handle: a bounded window on its filter's broadcast ring. Dropping it
/// unsubscribes.
///
/// Once it has lagged it stays lagged: the ring has already skipped the events it missed, so
/// handing out later events would be a silent gap.
pub struct Subscription {
    // Declared before the guard: it must be dropped first (see `Guard::drop`).
    receiver: broadcast::Receiver<Arc<Frame>>,
    lagged: Option<Lagged>,
    _guard: Guard,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("feed", &self._guard.key).finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next event; `Ok(None)` once the hub is gone.
    pub async fn recv(&mut self) -> Result<Option<Arc<Frame>>, Lagged> {
        if let Some(lagged) = self.lagged {
            return Err(lagged);
        }
        match self.receiver.recv().await {
            Ok(frame) => Ok(Some(frame)),
            Err(broadcast::error::RecvError::Closed) => Ok(None),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(*self.lagged.insert(Lagged(n))),
        }
    }

    /// The next event if one is already waiting.
    pub fn try_recv(&mut self) -> Result<Option<Arc<Frame>>, Lagged> {
        if let Some(lagged) = self.lagged {
            return Err(lagged);
        }
        match self.receiver.try_recv() {
            Ok(frame) => Ok(Some(frame)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(*self.lagged.insert(Lagged(n))),
            Err(_) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;
    use crate::event::Timestamp;
    use crate::names::Topic;
    use crate::position::{Epoch, Position};

    #[derive(Default)]
    struct Counting {
        opened: AtomicUsize,
        closed: AtomicUsize,
    }

    impl Source for Counting {
        fn open(&self, _key: &FeedKey) -> crate::source::OpenFuture {
            self.opened.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn close(&self, _key: &FeedKey) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
        fn replay(
            self: Arc<Self>,
            key: FeedKey,
            _filter: Filter,
            _start: crate::source::Start,
            _cap: u64,
        ) -> crate::source::BoxFuture<'static, Result<crate::source::CatchUp, SourceError>> {
            Box::pin(async move { Err(SourceError::foreign(&key.tenant)) })
        }
        fn accepts(&self, _start: &crate::source::Start) -> bool {
            false
        }
    }

    fn counting() -> (Arc<Counting>, Arc<dyn Source>) {
        let counting = Arc::new(Counting::default());
        (counting.clone(), counting)
    }

    fn key(tenant: &str) -> FeedKey {
        FeedKey { tenant: TenantId::parse(tenant).unwrap(), feed: Feed::Messages }
    }

    fn message(tenant: &str, seq: u64, topic: &str) -> Arc<Frame> {
        Arc::new(Frame::new(Event {
            tenant: TenantId::parse(tenant).unwrap(),
            position: Position::new(Epoch(7), seq),
            at: Timestamp::from_millis(0),
            body: EventBody::Message { topic: Topic::parse(topic).unwrap(), data: json!(seq).into() },
            cursor: None,
        }))
    }

    fn topics(p: &str) -> Filter {
        Filter::Topics(TopicPattern::parse(p).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn many_subscribers_share_one_upstream_that_closes_after_the_grace_period() {
        let (upstream, source) = counting();
        let grace = Duration::from_secs(5);
        let hub = Hub::new(HubConfig { buffer: 8, grace });
        let subs: Vec<_> = futures_join(&hub, &source, 100).await;
        assert_eq!(upstream.opened.load(Ordering::SeqCst), 1);
        drop(subs);
        tokio::time::sleep(grace / 2).await;
        // A reconnect inside the grace period reuses the open upstream.
        let again = hub.subscribe(key("a"), topics("*"), &source).await.unwrap();
        tokio::time::sleep(grace * 2).await;
        assert_eq!(upstream.opened.load(Ordering::SeqCst), 1);
        assert_eq!(upstream.closed.load(Ordering::SeqCst), 0);
        drop(again);
        tokio::time::sleep(grace * 2).await;
        assert_eq!(upstream.closed.load(Ordering::SeqCst), 1);
        assert_eq!(hub.subscribers(&key("a")), 0);
    }

    async fn futures_join(hub: &Hub, source: &Arc<dyn Source>, n: usize) -> Vec<Subscription> {
        let mut subs = Vec::new();
        for _ in 0..n {
            subs.push(hub.subscribe(key("a"), topics("*"), source).await.unwrap());
        }
        subs
    }

    #[tokio::test]
    async fn events_reach_only_their_tenant_and_matching_topics() {
        let hub = Hub::new(HubConfig::default());
        let source = counting().1;
        let mut a_orders = hub.subscribe(key("a"), topics("order.*"), &source).await.unwrap();
        let mut a_exact = hub.subscribe(key("a"), topics("order.created"), &source).await.unwrap();
        let mut b_all = hub.subscribe(key("b"), topics("*"), &source).await.unwrap();
        hub.dispatch(&key("a"), message("a", 1, "order.created"));
        hub.dispatch(&key("a"), message("a", 2, "order.shipped"));
        hub.dispatch(&key("a"), message("a", 3, "user.created"));
        let seqs = |sub: &mut Subscription| {
            std::iter::from_fn(|| sub.try_recv().unwrap()).map(|f| f.position().seq()).collect::<Vec<_>>()
        };
        assert_eq!(seqs(&mut a_orders), [1, 2]);
        assert_eq!(seqs(&mut a_exact), [1]);
        assert_eq!(seqs(&mut b_all), Vec::<u64>::new());
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_the_buffer_is_told_it_lagged() {
        let hub = Hub::new(HubConfig { buffer: 4, grace: Duration::from_secs(1) });
        let source = counting().1;
        let mut slow = hub.subscribe(key("a"), topics("*"), &source).await.unwrap();
        for seq in 1..=10 {
            hub.dispatch(&key("a"), message("a", seq, "t"));
        }
        assert!(matches!(slow.try_recv(), Err(Lagged(6))));
        // The ring skipped six events: nothing after them may be handed out as if contiguous.
        assert!(matches!(slow.try_recv(), Err(Lagged(6))));
        assert!(matches!(slow.recv().await, Err(Lagged(6))));
    }

    #[tokio::test]
    async fn dispatch_shares_one_frame_between_subscribers() {
        let hub = Hub::new(HubConfig::default());
        let source = counting().1;
        let mut one = hub.subscribe(key("a"), topics("*"), &source).await.unwrap();
        let mut two = hub.subscribe(key("a"), topics("*"), &source).await.unwrap();
        hub.dispatch(&key("a"), message("a", 1, "t"));
        let (x, y) = (one.try_recv().unwrap().unwrap(), two.try_recv().unwrap().unwrap());
        assert!(Arc::ptr_eq(&x, &y));
    }
}
