//! The driver-backed source: one change stream per (tenant, collection) feed of its hub, opened
//! when the feed's first subscriber arrives and closed with the feed; a dropped connection is
//! resumed from the last token; a client resuming with a token gets a catch-up read first.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bson::{Bson, Document, doc};
use changegate_core::backoff::Backoff;
use changegate_core::source::{BoxFuture, CatchUp as Pages, Caught, OpenFuture, Source, SourceError, Start};
use changegate_core::{
    CollectionName, Epoch, Event, EventBody, Feed, FeedKey, Filter, Frame, Hub, Position, ResetReason,
    TenantId, Timestamp,
};
use futures_util::StreamExt;
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken as DriverToken;
use mongodb::error::ErrorKind;
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use mongodb::{Client, Database};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{MongoError, ResumeToken, collection, map_event, pipeline};

/// The epoch of MongoDB positions. Their sequence numbers only order events inside one gateway
/// process (the SSE id is the resume token, see [`Event::cursor`]).
pub const MONGO_EPOCH: Epoch = Epoch(0x6d6f_6e67);

/// MongoDB's error code for a resume token that fell off the oplog.
const HISTORY_LOST: i32 = 286;

/// How to reach MongoDB.
#[derive(Clone, Debug)]
pub struct MongoConfig {
    /// `mongodb://…` (a replica set: change streams need one).
    pub url: String,
    /// The database holding the collections.
    pub database: String,
    /// The document field holding the tenant.
    pub tenant_field: String,
    /// How long a `getMore` waits for changes.
    pub max_await: Duration,
    /// Connections in the driver's pool: each open change stream holds one while it waits.
    pub pool: u32,
}

/// One step of a resuming subscriber's catch-up.
#[derive(Debug)]
pub enum CatchUp {
    /// The next changes after its token (at most [`changegate_core::PAGE`]), in order.
    Events(Vec<Arc<Frame>>),
    /// The token fell off the oplog, or the catch-up grew past its cap: refetch.
    Lost,
}

/// A catch-up read page by page from its own change stream; ends when caught up.
pub type CatchUpStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<CatchUp, MongoError>> + Send>>;

struct Shared {
    database: Database,
    field: crate::TenantField,
    max_await: Duration,
    cancel: CancellationToken,
    feeds: Mutex<HashMap<FeedKey, CancellationToken>>,
    preimages: Mutex<HashSet<String>>,
    open: AtomicU64,
    /// Where the feeds' events go.
    hub: Hub,
}

/// The MongoDB source: one change stream per open feed.
pub struct MongoSource {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MongoSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoSource").finish_non_exhaustive()
    }
}

impl MongoSource {
    /// Connects (lazily: the driver connects on first use), delivering to `hub`. Feeds stop
    /// when `cancel` fires.
    pub async fn connect(
        config: &MongoConfig,
        hub: Hub,
        cancel: CancellationToken,
    ) -> Result<Self, MongoError> {
        let field = crate::TenantField::parse(&config.tenant_field)?;
        let mut options = mongodb::options::ClientOptions::parse(&config.url)
            .await
            .map_err(|e| MongoError::driver("reading MONGODB_URL", e))?;
        options.max_pool_size = Some(config.pool.max(1));
        options.app_name = Some("changegate".into());
        let client = Client::with_options(options).map_err(|e| MongoError::driver("connecting", e))?;
        let shared = Arc::new(Shared {
            database: client.database(&config.database),
            field,
            max_await: config.max_await,
            cancel,
            feeds: Mutex::new(HashMap::new()),
            preimages: Mutex::new(HashSet::new()),
            open: AtomicU64::new(0),
            hub,
        });
        Ok(Self { shared })
    }

    /// How many change streams are open.
    pub fn open_streams(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Whether MongoDB answers.
    pub async fn ping(&self) -> Result<(), MongoError> {
        self.shared
            .database
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(|e| MongoError::driver("ping", e))?;
        Ok(())
    }

    /// The changes of `key` after `token` that are already in the oplog, read with a change
    /// stream of its own (`resumeAfter`) until it has nothing more to say — in pages, pulled as
    /// the subscriber's socket takes them. The stream is opened here (so a MongoDB that cannot
    /// be reached is an error before the response); more than `cap` changes end it with
    /// [`CatchUp::Lost`].
    pub async fn catch_up(
        &self,
        key: &FeedKey,
        token: &ResumeToken,
        cap: u64,
    ) -> Result<CatchUpStream, MongoError> {
        let Feed::Collection { name, .. } = &key.feed else {
            return Ok(Box::pin(futures_util::stream::empty()));
        };
        let stream = match self.shared.open_stream(&key.tenant, name, Some(token)).await {
            Ok(stream) => stream,
            Err(error) if history_lost(&error) => {
                return Ok(Box::pin(futures_util::stream::once(async { Ok(CatchUp::Lost) })));
            }
            Err(error) => return Err(MongoError::driver("resuming a change stream", error)),
        };
        let reading = Reading {
            shared: self.shared.clone(),
            tenant: key.tenant.clone(),
            name: name.clone(),
            stream,
            order: OplogOrder::default(),
            left: cap,
            done: false,
        };
        Ok(Box::pin(futures_util::stream::unfold(Some(reading), |reading| async move {
            let mut reading = reading?;
            match reading.page().await {
                Ok(Some(page)) => Some((Ok(page), Some(reading))),
                Ok(None) => None,
                Err(error) => Some((Err(error), None)),
            }
        })))
    }
}

/// A catch-up change stream being read.
struct Reading {
    shared: Arc<Shared>,
    tenant: TenantId,
    name: CollectionName,
    stream: ChangeStream<Document>,
    order: OplogOrder,
    /// How many more changes the cap allows.
    left: u64,
    /// The last page was handed out.
    done: bool,
}

impl Reading {
    /// The next page; `None` once the last one was sent (caught up, or lost).
    async fn page(&mut self) -> Result<Option<CatchUp>, MongoError> {
        if self.done {
            return Ok(None);
        }
        let mut frames = Vec::new();
        loop {
            match self.stream.next_if_any().await {
                Ok(Some(event)) => {
                    let Some(frame) = self.shared.frame(&self.tenant, &self.name, &event, &mut self.order)?
                    else {
                        continue;
                    };
                    if self.left == 0 {
                        return Ok(Some(self.finish(CatchUp::Lost)));
                    }
                    self.left -= 1;
                    frames.push(frame);
                    if frames.len() >= changegate_core::PAGE {
                        return Ok(Some(CatchUp::Events(frames)));
                    }
                }
                Ok(None) => return Ok(Some(self.finish(CatchUp::Events(frames)))),
                Err(error) if history_lost(&error) => return Ok(Some(self.finish(CatchUp::Lost))),
                Err(error) => return Err(MongoError::driver("resuming a change stream", error)),
            }
        }
    }

    fn finish(&mut self, last: CatchUp) -> CatchUp {
        self.done = true;
        last
    }
}

/// Orders events the same way in every change stream of a feed — the shared live stream and a
/// resuming client's catch-up stream — so the seam between them can skip exactly what was
/// already sent: by cluster time, then by place inside one cluster time (the events of one
/// transaction share it). A catch-up ends only at an empty batch, so it never stops inside a
/// committed transaction.
/// (Increments are assumed below 2^24 per second and transactions below 256 events; past that
/// the numbers still strictly increase within a stream, so nothing is skipped there.)
#[derive(Default)]
struct OplogOrder {
    last: Option<(u32, u32)>,
    within: u64,
    previous: u64,
}

impl OplogOrder {
    fn seq(&mut self, time: u32, increment: u32) -> u64 {
        if self.last == Some((time, increment)) {
            self.within = (self.within + 1).min(0xFF);
        } else {
            self.last = Some((time, increment));
            self.within = 0;
        }
        let seq = (u64::from(time) << 32) | (u64::from(increment.min(0x00FF_FFFF)) << 8) | self.within;
        self.previous = seq.max(self.previous + 1);
        self.previous
    }

    /// The next number after everything this order has handed out: for an event that has no
    /// cluster time of its own (a `reset` this gateway makes, an event without `clusterTime`).
    fn next(&mut self) -> u64 {
        self.previous += 1;
        self.previous
    }
}

fn history_lost(error: &mongodb::error::Error) -> bool {
    matches!(&*error.kind, ErrorKind::Command(command) if command.code == HISTORY_LOST)
}

impl Shared {
    async fn open_stream(
        &self,
        tenant: &TenantId,
        name: &CollectionName,
        after: Option<&ResumeToken>,
    ) -> Result<ChangeStream<Document>, mongodb::error::Error> {
        let coll = self.database.collection::<Document>(name.as_str());
        let pipeline = pipeline(&self.field, tenant);
        let resume = after.and_then(|t| {
            bson::deserialize_from_bson::<DriverToken>(Bson::Document(t.document().clone())).ok()
        });
        let stream = coll
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            .full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable)
            .max_await_time(self.max_await)
            .resume_after(resume)
            .await?;
        Ok(stream.with_type::<Document>())
    }

    /// Turns a raw change event into a frame whose SSE id is its resume token.
    fn frame(
        &self,
        tenant: &TenantId,
        name: &CollectionName,
        raw: &Document,
        order: &mut OplogOrder,
    ) -> Result<Option<Arc<Frame>>, MongoError> {
        let Some(body) = map_event(raw, name)? else { return Ok(None) };
        let token = raw.get_document("_id").map_err(|_| MongoError::event("no resume token"))?;
        let cursor: Arc<str> = ResumeToken::new(token.clone()).encode().into();
        let (at, seq) = match raw.get("clusterTime") {
            Some(Bson::Timestamp(ts)) => {
                (Timestamp::from_millis(u64::from(ts.time) * 1000), order.seq(ts.time, ts.increment))
            }
            _ => (Timestamp::now(), order.next()),
        };
        let event = Event {
            tenant: tenant.clone(),
            position: Position::new(MONGO_EPOCH, seq),
            at,
            body,
            cursor: Some(cursor),
        };
        Ok(Some(Arc::new(Frame::new(event))))
    }

    /// Pre-images are what lets a delete be matched to its tenant at all; turn them on once
    /// per collection, best effort (MongoDB 6.0+, and the right privilege).
    async fn enable_preimages(&self, name: &CollectionName) {
        let first = self.preimages.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_string());
        if !first {
            return;
        }
        let command = doc! { "collMod": name.as_str(), "changeStreamPreAndPostImages": { "enabled": true } };
        if let Err(error) = self.database.run_command(command).await {
            metrics::counter!("changegate_mongo_preimages_unavailable_total").increment(1);
            tracing::warn!(collection = %name, %error, "pre-images could not be enabled: deletes will not be delivered");
        }
    }
}

impl Source for MongoSource {
    fn open(&self, key: &FeedKey) -> OpenFuture {
        let (ready, opened) = oneshot::channel();
        let stop = self.shared.cancel.child_token();
        self.shared.feeds.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone(), stop.clone());
        tokio::spawn(watch(self.shared.clone(), key.clone(), stop, ready));
        let tenant = key.tenant.clone();
        Box::pin(async move {
            let failed =
                |reason: String| SourceError::unavailable(&tenant, "opening a change stream", reason);
            opened.await.map_err(|_| failed("the change stream stopped".into()))?.map_err(failed)
        })
    }

    fn close(&self, key: &FeedKey) {
        if let Some(stop) = self.shared.feeds.lock().unwrap_or_else(PoisonError::into_inner).remove(key) {
            stop.cancel();
        }
    }

    /// A resume token this source could have sent, or a position (which gets a `reset`).
    fn accepts(&self, start: &Start) -> bool {
        match start {
            Start::Cursor(text) => ResumeToken::decode(text).is_ok(),
            Start::After(_) | Start::Since(_) => true,
        }
    }

    /// A change stream is its own log: the catch-up reads one of its own from the client's
    /// resume token. A position is no place in it, so a client holding one (from another
    /// source, or a `reset`'s) refetches.
    fn replay(
        self: Arc<Self>,
        key: FeedKey,
        _filter: Filter,
        start: Start,
        cap: u64,
    ) -> BoxFuture<'static, Result<Pages, SourceError>> {
        Box::pin(async move {
            let token = match &start {
                Start::Cursor(text) => {
                    ResumeToken::decode(text).map_err(|_| SourceError::foreign(&key.tenant))?
                }
                Start::After(_) | Start::Since(_) => {
                    let reset = catch_up_reset(&key);
                    return Ok(
                        Box::pin(futures_util::stream::once(async { Ok(Caught::Reset(reset)) })) as Pages
                    );
                }
            };
            let pages = self
                .catch_up(&key, &token, cap)
                .await
                .map_err(|e| SourceError::unavailable(&key.tenant, "resuming a change stream", e))?;
            let tenant = key.tenant.clone();
            Ok(Box::pin(pages.map(move |page| match page {
                Ok(CatchUp::Events(frames)) => Ok(Caught::Page(frames)),
                Ok(CatchUp::Lost) => Ok(Caught::Reset(catch_up_reset(&key))),
                Err(error) => Err(SourceError::unavailable(&tenant, "reading a change stream", error)),
            })) as Pages)
        })
    }
}

/// The `reset` ending a catch-up that cannot continue: it comes before any live event of the
/// subscriber, so it is numbered before all of them (nothing live is skipped after it).
fn catch_up_reset(key: &FeedKey) -> Arc<Frame> {
    changegate_core::source::reset(key, Position::new(MONGO_EPOCH, 0), ResetReason::PositionExpired)
}

/// One feed's change stream: dispatches every event to the hub; after an error it re-opens
/// from the last token (so nothing is lost while the connection was down), or — when the token
/// fell off the oplog — tells subscribers to refetch and starts from now.
async fn watch(
    shared: Arc<Shared>,
    key: FeedKey,
    stop: CancellationToken,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let Feed::Collection { name, .. } = &key.feed else { return };
    if let Err(error) = collection(name) {
        let _ = ready.send(Err(error.to_string()));
        return;
    }
    shared.enable_preimages(name).await;
    let mut ready = Some(ready);
    let mut resume: Option<ResumeToken> = None;
    let mut backoff = Backoff::default();
    let hub = shared.hub.clone();
    // One numbering for the feed's whole life, across reopens: a reset after a lost history is
    // numbered after every change already delivered, so no subscriber's seam skips it.
    let mut order = OplogOrder::default();
    loop {
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = shared.open_stream(&key.tenant, name, resume.as_ref()) => opened,
        };
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(error) if history_lost(&error) => {
                lost(&key, &hub, &mut order);
                resume = None;
                continue;
            }
            Err(error) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(format!("opening the change stream: {error}")));
                    return;
                }
                tracing::warn!(%error, "MongoDB change stream failed; retrying");
                tokio::time::sleep(backoff.next_wait()).await;
                continue;
            }
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        backoff.reset();
        shared.open.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("changegate_mongo_change_streams_open").increment(1.0);
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => None,
                next = stream.next() => Some(next),
            };
            match next {
                None => break,
                Some(Some(Ok(raw))) => {
                    // After drop/rename/invalidate a stream cannot be resumed: subscribers get a
                    // reset, and the stream starts again from now.
                    let ends = matches!(
                        raw.get_str("operationType"),
                        Ok("drop" | "rename" | "dropDatabase" | "invalidate")
                    );
                    resume = if ends {
                        None
                    } else {
                        raw.get_document("_id").ok().map(|t| ResumeToken::new(t.clone()))
                    };
                    match shared.frame(&key.tenant, name, &raw, &mut order) {
                        Ok(Some(frame)) => hub.dispatch(&key, frame),
                        Ok(None) => {}
                        Err(error) => tracing::error!(%error, "unreadable change event skipped"),
                    }
                }
                Some(Some(Err(error))) => {
                    if history_lost(&error) {
                        lost(&key, &hub, &mut order);
                        resume = None;
                    } else {
                        tracing::warn!(%error, "MongoDB change stream interrupted; resuming");
                    }
                    break;
                }
                Some(None) => break,
            }
        }
        shared.open.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("changegate_mongo_change_streams_open").decrement(1.0);
        if stop.is_cancelled() {
            return;
        }
    }
}

fn lost(key: &FeedKey, hub: &Hub, order: &mut OplogOrder) {
    let seq = order.next();
    let event = Event {
        tenant: key.tenant.clone(),
        position: Position::new(MONGO_EPOCH, seq),
        at: Timestamp::now(),
        body: EventBody::Reset { reason: ResetReason::PositionExpired },
        cursor: None,
    };
    hub.dispatch(key, Arc::new(Frame::new(event)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oplog_order_is_cluster_time_then_place_within_it() {
        let mut live = OplogOrder::default();
        let a = live.seq(100, 1);
        let b = live.seq(100, 2);
        let (t1, t2) = (live.seq(101, 1), live.seq(101, 1));
        assert!(a < b && b < t1 && t1 < t2, "strictly increasing");
        // A catch-up stream that starts at the same transaction numbers it the same way.
        let mut catch_up = OplogOrder::default();
        assert_eq!((catch_up.seq(101, 1), catch_up.seq(101, 1)), (t1, t2));
        // And a later second is always later, whatever the increments.
        assert!(OplogOrder::default().seq(102, 0) > t2);
    }

    #[test]
    fn a_number_without_a_cluster_time_follows_everything_numbered_before_it() {
        let mut live = OplogOrder::default();
        let change = live.seq(1_800_000_000, 1);
        let reset = live.next();
        assert!(reset > change);
        assert!(live.seq(1_800_000_100, 1) > reset);
    }
}
