//! Server-Sent Events: the realtime dialect's framing and the per-connection stream.
//!
//! An event is encoded once (see [`Frame::encoded`]) and the same bytes go to every subscriber.
//! A connection's stream is: `retry:` → a snapshot, where it has one → the catch-up ([`CatchUp`], read one
//! page at a time and written before the next is read) → live events, with heartbeat comments
//! in between. A live event at or before the last caught-up position is skipped, which makes
//! the catch-up/live seam exact.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use changegate_core::event::Dialect;
use changegate_core::{
    CatchUp, Caught, Event, EventBody, Frame, Position, RawJson, ResetReason, Subscription, Timestamp, Topic,
};
use changegate_flags::dialect;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub use changegate_core::sse::message;

#[derive(Serialize)]
struct MessageData<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    topic: &'a Topic,
    data: &'a RawJson,
    timestamp: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChangeData<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    document_id: &'a str,
    document: &'a RawJson,
}

/// The realtime dialect (`/v1/events/subscribe`): `id:` + one `data:` line, no `event:` field,
/// so `EventSource.onmessage` fires.
pub fn encode_realtime(event: &Event) -> Bytes {
    let data = match &event.body {
        EventBody::Message { topic, data } => serde_json::to_string(&MessageData {
            kind: "message",
            topic,
            data,
            timestamp: event.at.rfc3339(),
        }),
        EventBody::Change { op, document_id, document, .. } => {
            serde_json::to_string(&ChangeData { kind: op.as_str(), document_id, document })
        }
        EventBody::Reset { reason } => return reset_with(&event.sse_id(), *reason),
        // Flag events travel on their own feed and never reach a realtime stream.
        EventBody::Flag { .. } | EventBody::Config { .. } => return Bytes::new(),
    };
    // Serialising a `Value` and plain strings cannot fail.
    let data = data.unwrap_or_default();
    message(Some(&event.sse_id()), None, &data)
}

fn reset_with(id: &str, reason: ResetReason) -> Bytes {
    let data = format!(r#"{{"reason":"{}"}}"#, reason.as_str());
    message(Some(id), Some("reset"), &data)
}

fn retry(after: Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", after.as_millis()))
}

const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// Most events written in one chunk when several are waiting: fewer, larger writes.
const COALESCE: usize = 64;

/// Everything a live SSE connection needs.
pub struct Connection {
    /// Sent first, in order: `retry:`, a `reset` if any.
    pub prelude: Vec<Bytes>,
    /// The catch-up, sent after the prelude and before live events.
    pub backlog: Option<CatchUp>,
    /// The live events.
    pub subscription: Subscription,
    /// Where the client already is: live events up to it are duplicates.
    pub after: Option<Position>,
    /// Comment interval.
    pub heartbeat: Duration,
    /// The reconnect delay announced to the client.
    pub retry: Duration,
    /// Cancelled on shutdown (and, per connection, when its key is revoked).
    pub closing: CancellationToken,
    /// The dialect.
    pub wire: Wire,
    /// Metric labels of this stream (`route`, and `tenant` when tenant labels are enabled).
    pub labels: Vec<(&'static str, String)>,
    /// Whose stream it is (for the access log line when it closes).
    pub tenant: changegate_core::TenantId,
}

/// The dialect a connection speaks ([`Dialect`]: how events are encoded, what its heartbeat
/// is), with the little per-connection state a dialect needs.
#[derive(Clone, Copy, Debug)]
pub struct Wire {
    dialect: Dialect,
    /// Dialect C: the last `id:` (epoch milliseconds) sent on this connection.
    last_id: u64,
}

impl Wire {
    /// A connection in `dialect`.
    pub const fn new(dialect: Dialect) -> Self {
        Self { dialect, last_id: 0 }
    }

    /// A dialect C connection whose client last saw id `last_id`: ids are epoch milliseconds,
    /// strictly increasing per connection.
    pub const fn flags_c(last_id: u64) -> Self {
        Self { dialect: Dialect::FlagsC, last_id }
    }

    /// The dialect.
    pub const fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The event's bytes in this dialect (shared between connections except for dialect C's
    /// per-connection `id:` line); empty when the dialect does not show the event.
    pub fn encode(&mut self, frame: &Frame) -> Bytes {
        let encode = match self.dialect {
            Dialect::Realtime => encode_realtime,
            Dialect::FlagsA => dialect::encode_a,
            Dialect::FlagsB => dialect::encode_b,
            Dialect::FlagsC => dialect::encode_c,
            Dialect::Ofrep => dialect::encode_ofrep,
            Dialect::Featureflip => dialect::encode_featureflip,
        };
        let block = frame.encoded(self.dialect, encode);
        if self.dialect != Dialect::FlagsC || block.is_empty() {
            return block;
        }
        // Epoch milliseconds of the change, bumped past the previous id on a collision.
        let id = frame.event().at.as_millis().max(self.last_id + 1);
        self.last_id = id;
        dialect::with_id_c(&block, id)
    }

    /// The route label of this dialect in metrics.
    pub const fn route(&self) -> &'static str {
        match self.dialect {
            Dialect::Realtime => "/v1/events/subscribe",
            Dialect::FlagsA => "/api/v1/stream",
            Dialect::FlagsB => "/stream",
            Dialect::FlagsC => "/api/v1/flags/events",
            Dialect::Ofrep => "/ofrep/v1/events",
            Dialect::Featureflip => "/v1/sdk/stream",
        }
    }

    fn heartbeat(&self) -> Bytes {
        match self.dialect {
            Dialect::Realtime | Dialect::FlagsA | Dialect::Ofrep => Bytes::from_static(HEARTBEAT),
            Dialect::FlagsB | Dialect::Featureflip => dialect::ping_b(Timestamp::now()),
            Dialect::FlagsC => Bytes::from_static(dialect::HEARTBEAT_C),
        }
    }
}

enum Step {
    Send(Bytes),
    Finish(Bytes),
    End,
}

struct State {
    prelude: std::vec::IntoIter<Bytes>,
    backlog: Option<CatchUp>,
    subscription: Subscription,
    after: Option<u64>,
    heartbeat: tokio::time::Interval,
    retry: Duration,
    // Created once: polling a fresh `cancelled()` future on every wake-up takes the token's
    // lock each time, which showed up in the fan-out profile.
    closing: Pin<Box<WaitForCancellationFutureOwned>>,
    wire: Wire,
    done: bool,
    metrics: Metrics,
    tenant: changegate_core::TenantId,
    opened: Instant,
}

/// This stream's metric handles, resolved once when it opens: looking a labelled metric up on
/// every write cost more than the write's own bookkeeping.
struct Metrics {
    open: metrics::Gauge,
    out: metrics::Counter,
    replayed: metrics::Counter,
    resets: metrics::Counter,
    slow: metrics::Counter,
}

impl Metrics {
    fn new(labels: &[(&'static str, String)]) -> Self {
        Self {
            open: metrics::gauge!("changegate_streams_open", labels),
            out: metrics::counter!("changegate_events_out_total", labels),
            replayed: metrics::counter!("changegate_replayed_events_total", labels),
            resets: metrics::counter!("changegate_resets_total", labels),
            slow: metrics::counter!("changegate_slow_consumer_disconnects_total", labels),
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        self.metrics.open.decrement(1.0);
        tracing::info!(
            target: "changegate::access",
            route = self.wire.route(),
            tenant = %self.tenant,
            ms = self.opened.elapsed().as_millis() as u64,
            "stream closed"
        );
    }
}

impl State {
    fn fresh(&mut self, frame: &Arc<Frame>) -> bool {
        let seq = frame.position().seq();
        if self.after.is_some_and(|after| seq <= after) {
            return false;
        }
        self.after = Some(seq);
        true
    }

    async fn next(&mut self) -> Step {
        if let Some(bytes) = self.prelude.next() {
            return Step::Send(bytes);
        }
        while let Some(backlog) = &mut self.backlog {
            let caught = tokio::select! {
                biased;
                () = &mut self.closing => return Step::Finish(retry(self.retry)),
                caught = futures_util::StreamExt::next(backlog) => caught,
            };
            match caught {
                Some(Ok(Caught::Page(frames))) => {
                    self.metrics.replayed.increment(frames.len() as u64);
                    let mut out = BytesMut::new();
                    for frame in &frames {
                        if self.fresh(frame) {
                            let bytes = self.wire.encode(frame);
                            if self.wire.dialect() == Dialect::Ofrep && !bytes.is_empty() {
                                // A refetch notice covers everything before it.
                                out.clear();
                            }
                            out.extend_from_slice(&bytes);
                        }
                    }
                    if !out.is_empty() {
                        return Step::Send(out.freeze());
                    }
                }
                Some(Ok(Caught::Reset(reset))) => {
                    self.metrics.resets.increment(1);
                    self.backlog = None;
                    // Live events up to the reset are covered by the client's refetch.
                    self.after = Some(reset.position().seq());
                    // The same `reset` event on every dialect's stream.
                    return Step::Send(reset.encoded(Dialect::Realtime, encode_realtime));
                }
                Some(Err(error)) => {
                    // The client resumes from the last id it received.
                    tracing::warn!(tenant = %self.tenant, %error, "a catch-up failed mid-way; the client resumes");
                    return Step::Finish(retry(self.retry));
                }
                None => self.backlog = None,
            }
        }
        loop {
            tokio::select! {
                biased;
                () = &mut self.closing => return Step::Finish(retry(self.retry)),
                received = self.subscription.recv() => match received {
                    Ok(Some(frame)) if self.fresh(&frame) => {
                        if let Some(step) = self.batch(&frame) {
                            return step;
                        }
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Step::End,
                    Err(_lagged) => {
                        self.metrics.slow.increment(1);
                        return Step::Finish(lagged(self.retry));
                    }
                },
                _ = self.heartbeat.tick() => return Step::Send(self.wire.heartbeat()),
            }
        }
    }

    /// The frame plus any others already waiting, in one write; `None` if the dialect shows
    /// none of them.
    fn batch(&mut self, first: &Arc<Frame>) -> Option<Step> {
        let first = self.wire.encode(first);
        let mut out: Option<BytesMut> = None;
        let mut sent = u64::from(!first.is_empty());
        for _ in 0..COALESCE {
            match self.subscription.try_recv() {
                Ok(Some(frame)) if self.fresh(&frame) => {
                    let next = self.wire.encode(&frame);
                    if self.wire.dialect() == Dialect::Ofrep && !next.is_empty() {
                        // A refetch notice covers everything before it: send only the last.
                        out = Some(BytesMut::from(&next[..]));
                        sent = 1;
                        continue;
                    }
                    sent += u64::from(!next.is_empty());
                    let out = out.get_or_insert_with(|| BytesMut::from(&first[..]));
                    out.extend_from_slice(&next);
                }
                Ok(Some(_)) => continue,
                Ok(None) => break,
                // What was gathered is still valid; the lag surfaces on the next `recv`.
                Err(_lagged) => break,
            }
        }
        let bytes = out.map_or(first, BytesMut::freeze);
        self.metrics.out.increment(sent);
        (!bytes.is_empty()).then_some(Step::Send(bytes))
    }
}

fn lagged(after: Duration) -> Bytes {
    Bytes::from(format!(
        ": too slow: reconnect with Last-Event-ID to catch up\nretry: {}\n\n",
        after.as_millis()
    ))
}

/// The streaming response for a connection.
pub fn response(connection: Connection) -> Response {
    let Connection { prelude, backlog, subscription, after, heartbeat, retry, closing, wire, labels, tenant } =
        connection;
    let metrics = Metrics::new(&labels);
    metrics.open.increment(1.0);
    let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = State {
        prelude: prelude.into_iter(),
        backlog,
        subscription,
        after: after.map(Position::seq),
        heartbeat: ticker,
        retry,
        closing: Box::pin(closing.cancelled_owned()),
        wire,
        done: false,
        metrics,
        tenant,
        opened: Instant::now(),
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        match state.next().await {
            Step::Send(bytes) => Some((Ok::<_, Infallible>(bytes), state)),
            Step::Finish(bytes) => {
                state.done = true;
                Some((Ok(bytes), state))
            }
            Step::End => None,
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The first bytes of every stream: the reconnect delay.
pub fn hello(retry_after: Duration) -> Bytes {
    retry(retry_after)
}

#[cfg(test)]
mod tests {
    use changegate_core::{Epoch, TenantId, Timestamp};
    use serde_json::{Value, json};

    use super::*;

    fn event(data: Value) -> Event {
        Event {
            tenant: TenantId::parse("t").unwrap(),
            position: Position::new(Epoch(0xabc), 7),
            at: Timestamp::from_millis(1_795_383_423_123),
            body: EventBody::Message { topic: Topic::parse("order.created").unwrap(), data: data.into() },
            cursor: None,
        }
    }

    #[test]
    fn a_message_is_one_id_line_and_one_data_line_without_an_event_field() {
        let bytes = encode_realtime(&event(json!({"n": 1})));
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "id: 00000abc-7\ndata: {\"type\":\"message\",\"topic\":\"order.created\",\"data\":{\"n\":1},\"timestamp\":\"2026-11-22T21:37:03.123Z\"}\n\n"
        );
    }

    #[test]
    fn line_breaks_inside_json_strings_never_break_the_framing() {
        for nasty in ["a\nb", "a\r\nb", "a\rb", "\n\ndata: forged\n\n", "id: 1\r", "\u{2028}\u{2029}\u{85}"] {
            let bytes = encode_realtime(&event(json!({ "s": nasty })));
            let text = std::str::from_utf8(&bytes).unwrap();
            let lines: Vec<&str> = text.split(['\n', '\r']).collect();
            assert_eq!(lines.len(), 4, "{text:?}");
            assert!(lines[0].starts_with("id: ") && lines[1].starts_with("data: {"));
            assert_eq!((lines[2], lines[3]), ("", ""));
            let json: Value = serde_json::from_str(&lines[1]["data: ".len()..]).unwrap();
            assert_eq!(json["data"]["s"], nasty);
        }
    }

    #[test]
    fn a_reset_names_the_reason_and_where_to_continue() {
        let key = changegate_core::FeedKey {
            tenant: TenantId::parse("acme").unwrap(),
            feed: changegate_core::Feed::Messages,
        };
        let reset =
            changegate_core::source::reset(&key, Position::new(Epoch(1), 9), ResetReason::PositionExpired);
        let bytes = encode_realtime(reset.event());
        assert_eq!(&bytes[..], b"event: reset\nid: 00000001-9\ndata: {\"reason\":\"position-expired\"}\n\n");
    }
}

#[cfg(test)]
mod properties {
    use changegate_core::{Epoch, TenantId, Timestamp};
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    proptest! {
        #[test]
        fn any_published_string_stays_inside_one_data_line_and_round_trips(s in "\\PC*|[\r\n\u{2028}:]*") {
            let event = Event {
                tenant: TenantId::parse("t").unwrap(),
                position: Position::new(Epoch(1), 2),
                at: Timestamp::from_millis(0),
                body: EventBody::Message { topic: Topic::parse("t").unwrap(), data: json!({ "s": s, "k": [s] }).into() },
                cursor: None,
            };
            let bytes = encode_realtime(&event);
            let text = std::str::from_utf8(&bytes).unwrap();
            let lines: Vec<&str> = text.split(['\n', '\r']).collect();
            prop_assert_eq!(lines.len(), 4);
            prop_assert_eq!(lines[0], "id: 00000001-2");
            let data: Value = serde_json::from_str(lines[1].strip_prefix("data: ").unwrap()).unwrap();
            prop_assert_eq!(&data["data"]["s"], &json!(s));
        }

        #[test]
        fn raw_data_is_split_so_no_line_ending_survives_inside_a_field(s in "\\PC*|[\r\n]*") {
            let bytes = message(Some("1"), None, &s);
            let text = std::str::from_utf8(&bytes).unwrap();
            prop_assert!(text.ends_with("\n\n"));
            let body = &text[..text.len() - 2];
            for line in body.split('\n') {
                prop_assert!(!line.contains('\r'));
                prop_assert!(line.starts_with("id: ") || line.starts_with("data: "));
            }
        }
    }
}
