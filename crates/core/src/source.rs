//! Sources: where a feed's events come from, behind one interface.
//!
//! The memory engine, PostgreSQL and MongoDB are three very differently shaped upstreams (an
//! in-process log, a LISTEN connection over an outbox table, a change stream per feed). The
//! gateway must not care which one it talks to: each is a [`Source`] that the [`Hub`] opens
//! when a feed gets its first subscriber and closes after the last one leaves, and that reads a
//! resuming client's catch-up as a stream of bounded pages ([`CatchUp`]).
//!
//! Every event of a feed — a `reset` included — is numbered by its source in one monotonic
//! space (its [`Position`]), so the gateway's catch-up/live seam works the same way for all of
//! them; and every event's SSE id ([`crate::Event::sse_id`]) is a durable place in that source
//! that [`Start`] takes back.
//!
//! [`Hub`]: crate::Hub

use std::pin::Pin;
use std::sync::Arc;

use futures_util::stream;

use crate::event::{Event, EventBody, Frame, ResetReason, Timestamp};
use crate::hub::{FeedKey, Filter};
use crate::position::Position;
use crate::replay::{PAGE, Replay};

pub use futures_util::future::BoxFuture;

/// A future returned by [`Source::open`].
pub type OpenFuture = BoxFuture<'static, Result<(), SourceError>>;

/// Where a catch-up starts: the SSE id a client sent back, as its source reads it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Start {
    /// After this position (`Last-Event-ID` of a logged feed).
    After(Position),
    /// At the first event committed at or after this time (dialect C's time-based ids).
    Since(Timestamp),
    /// After this source-specific cursor (a MongoDB resume token, `m.…`).
    Cursor(Arc<str>),
}

/// One step of a catch-up.
#[derive(Debug)]
pub enum Caught {
    /// The next matching events, in order.
    Page(Vec<Arc<Frame>>),
    /// The catch-up cannot continue without a gap (the start is older than the source keeps,
    /// or the catch-up is longer than its cap): the client gets this `reset` event and
    /// continues live after its position. Always the last step.
    Reset(Arc<Frame>),
}

/// A catch-up, read page by page as the subscriber's socket takes them: a client resuming
/// from far back costs one page of memory, not its whole history.
pub type CatchUp = Pin<Box<dyn futures_util::Stream<Item = Result<Caught, SourceError>> + Send>>;

/// What kind of failure a [`SourceError`] is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Foreign,
    Unavailable,
}

/// A source could not do what was asked. Opaque: ask [`SourceError::is_foreign`] or
/// [`SourceError::is_unavailable`]; the cause (database or driver text) is in
/// [`std::error::Error::source`] for the log and never meant for a client.
#[derive(Debug, thiserror::Error)]
#[error("{what} (tenant {tenant})")]
pub struct SourceError {
    kind: Kind,
    tenant: crate::TenantId,
    what: &'static str,
    #[source]
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SourceError {
    /// The start is not an id this feed's source sent (a MongoDB token on a PostgreSQL feed).
    pub fn foreign(tenant: &crate::TenantId) -> Self {
        Self { kind: Kind::Foreign, tenant: tenant.clone(), what: "not an id of this source", cause: None }
    }

    /// The source cannot be reached or failed; `what` says what was being done.
    pub fn unavailable(
        tenant: &crate::TenantId,
        what: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self { kind: Kind::Unavailable, tenant: tenant.clone(), what, cause: Some(cause.into()) }
    }

    /// Whether the client sent an id that this source never sent.
    pub fn is_foreign(&self) -> bool {
        self.kind == Kind::Foreign
    }

    /// Whether the source is down or failed (worth a retry).
    pub fn is_unavailable(&self) -> bool {
        self.kind == Kind::Unavailable
    }
}

/// Where a feed's events come from.
///
/// The hub calls [`open`](Source::open) when a feed gets its first subscriber and
/// [`close`](Source::close) when it has had none for the grace period; in between, the source
/// dispatches every event of the feed to the hub it was built with, in feed order.
pub trait Source: Send + Sync + 'static {
    /// Starts delivering `key`'s events to the hub. Subscribers wait for this future: when it
    /// resolves, every event committed from then on must reach the hub.
    fn open(&self, key: &FeedKey) -> OpenFuture;

    /// Stops delivering `key`. Called with the hub's lock held, so that it is ordered before
    /// any later `open` of the same key: it must not block (enqueue the work instead).
    fn close(&self, key: &FeedKey);

    /// Whether `start` can be an id this source sent. Checked before the feed is opened, so
    /// that a forged or foreign id costs nothing but its refusal.
    fn accepts(&self, start: &Start) -> bool;

    /// The catch-up of `key` from `start`: the events of `filter` the client missed, in pages,
    /// ending in a [`Caught::Reset`] when the start is no longer held or more than `cap` events
    /// follow it. Resolves once the catch-up is known to be possible (so a source that is down,
    /// or an id it never sent, is an error before the response starts).
    fn replay(
        self: Arc<Self>,
        key: FeedKey,
        filter: Filter,
        start: Start,
        cap: u64,
    ) -> BoxFuture<'static, Result<CatchUp, SourceError>>;
}

/// The part of a [`Source`] that keeps a log addressed by [`Position`] (the memory engine and
/// PostgreSQL): [`paged`] turns it into a catch-up.
///
/// A log's ids are positions (and dialect C's times), never cursors: [`log_accepts`].
pub trait Log: Send + Sync + 'static {
    /// One page of `key`'s logged events from `start` that match `filter`, reading at most
    /// `limit` entries; [`Replay::Reset`] when events after `start` are no longer held.
    fn page(
        &self,
        key: &FeedKey,
        filter: &Filter,
        start: &Start,
        limit: usize,
    ) -> BoxFuture<'_, Result<Replay, SourceError>>;

    /// Whether more than `cap` events of `key` follow `after`.
    fn exceeds(&self, key: &FeedKey, after: Position, cap: u64) -> BoxFuture<'_, Result<bool, SourceError>>;

    /// The newest position of `key`: where a client continues after a `reset`.
    fn head(&self, key: &FeedKey) -> BoxFuture<'_, Result<Position, SourceError>>;
}

/// What a [`Log`] accepts as a catch-up start: positions and times, no cursor.
pub fn log_accepts(start: &Start) -> bool {
    !matches!(start, Start::Cursor(_))
}

/// A `reset` event of `key` at `position`: the client refetches, then continues after it.
pub fn reset(key: &FeedKey, position: Position, reason: ResetReason) -> Arc<Frame> {
    Arc::new(Frame::new(Event {
        tenant: key.tenant.clone(),
        position,
        at: Timestamp::now(),
        body: EventBody::Reset { reason },
        cursor: None,
    }))
}

/// The catch-up of a [`Log`]: keyset pages of [`PAGE`] entries, each read only when the
/// previous one was taken; a start more than `cap` events back is a `reset` at the head
/// straight away, and so is retention passing the client between two pages.
pub fn paged<L: Log>(
    log: Arc<L>,
    key: FeedKey,
    filter: Filter,
    start: Start,
    cap: u64,
) -> BoxFuture<'static, Result<CatchUp, SourceError>> {
    Box::pin(async move {
        match &start {
            Start::Cursor(_) => return Err(SourceError::foreign(&key.tenant)),
            Start::After(after) if log.exceeds(&key, *after, cap).await? => {
                let head = log.head(&key).await?;
                let reset = reset(&key, head, ResetReason::PositionExpired);
                return Ok(Box::pin(stream::once(async { Ok(Caught::Reset(reset)) })) as CatchUp);
            }
            Start::After(_) | Start::Since(_) => {}
        }
        let pages = Pages { log, key, filter, next: Some(start) };
        Ok(Box::pin(pages.into_stream()) as CatchUp)
    })
}

struct Pages<L> {
    log: Arc<L>,
    key: FeedKey,
    filter: Filter,
    next: Option<Start>,
}

impl<L: Log> Pages<L> {
    fn into_stream(self) -> impl futures_util::Stream<Item = Result<Caught, SourceError>> + Send {
        stream::unfold(self, |mut pages| async move {
            let start = pages.next.take()?;
            let step = match pages.log.page(&pages.key, &pages.filter, &start, PAGE).await {
                Ok(Replay::Page { frames, next }) => {
                    pages.next = next.map(Start::After);
                    Ok(Caught::Page(frames))
                }
                // Retention passed the client (before or during its catch-up).
                Ok(Replay::Reset) => match pages.log.head(&pages.key).await {
                    Ok(head) => Ok(Caught::Reset(reset(&pages.key, head, ResetReason::PositionExpired))),
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            Some((step, pages))
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use serde_json::json;

    use super::*;
    use crate::hub::{Feed, Hub, HubConfig};
    use crate::memory::{MemoryEngine, Retention};
    use crate::names::{TenantId, Topic};

    fn engine(max_events: usize) -> Arc<MemoryEngine> {
        let retention = Retention { max_events, max_age: std::time::Duration::from_secs(60) };
        Arc::new(MemoryEngine::new(retention, Hub::new(HubConfig::default())))
    }

    fn messages() -> FeedKey {
        FeedKey { tenant: TenantId::parse("acme").unwrap(), feed: Feed::Messages }
    }

    fn publish(engine: &MemoryEngine, n: usize) -> Vec<Position> {
        let (tenant, topic) = (TenantId::parse("acme").unwrap(), Topic::parse("t").unwrap());
        (0..n).map(|i| engine.publish(&tenant, topic.clone(), json!(i).into())).collect()
    }

    async fn steps(catch_up: CatchUp) -> Vec<Caught> {
        catch_up.map(Result::unwrap).collect().await
    }

    #[tokio::test]
    async fn a_catch_up_comes_in_pages_of_at_most_page_events_in_order() {
        let engine = engine(10_000);
        let positions = publish(&engine, PAGE * 2 + 7);
        let catch_up = engine
            .clone()
            .replay(messages(), Filter::Everything, Start::After(positions[0]), 10_000)
            .await
            .unwrap();
        let pages: Vec<Vec<Position>> = steps(catch_up)
            .await
            .into_iter()
            .map(|step| match step {
                Caught::Page(frames) => frames.iter().map(|f| f.position()).collect(),
                Caught::Reset(_) => panic!("no reset expected"),
            })
            .collect();
        assert!(
            pages.iter().all(|page| page.len() <= PAGE),
            "{:?}",
            pages.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(pages.concat(), positions[1..]);
    }

    #[tokio::test]
    async fn a_catch_up_longer_than_its_cap_is_one_reset_at_the_head() {
        let engine = engine(10_000);
        let positions = publish(&engine, 20);
        let catch_up = engine
            .clone()
            .replay(messages(), Filter::Everything, Start::After(positions[0]), 5)
            .await
            .unwrap();
        let steps = steps(catch_up).await;
        assert_eq!(steps.len(), 1);
        let Caught::Reset(reset) = &steps[0] else { panic!("expected a reset, got {steps:?}") };
        assert_eq!(reset.position(), positions[19]);
        assert!(matches!(reset.event().body, EventBody::Reset { reason: ResetReason::PositionExpired }));
    }

    #[tokio::test]
    async fn a_start_older_than_retention_ends_in_a_reset_and_a_cursor_is_foreign() {
        let engine = engine(5);
        let positions = publish(&engine, 20);
        let catch_up = engine
            .clone()
            .replay(messages(), Filter::Everything, Start::After(positions[0]), 100)
            .await
            .unwrap();
        assert!(
            matches!(steps(catch_up).await.as_slice(), [Caught::Reset(r)] if r.position() == positions[19])
        );
        let cursor = Start::Cursor("m.abc".into());
        let refused = engine.replay(messages(), Filter::Everything, cursor, 100).await.err().unwrap();
        assert!(refused.is_foreign() && !refused.is_unavailable());
    }
}
