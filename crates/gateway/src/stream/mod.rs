//! Opening a stream: the one reading of `Last-Event-ID` ([`Resume::from_last_event_id`]),
//! subscribing to the hub through the feed's source, and the catch-up from that source — then
//! [`sse`] writes it all to the client.

pub mod sse;

use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;
use changegate_core::{FeedKey, Filter, Start};

use crate::error::ApiError;
use crate::state::AppState;

/// Where a stream starts.
pub enum Resume {
    /// From `Last-Event-ID`: the stream's source catches the client up from there.
    From(Start),
    /// From now, after a snapshot of the state: the future is awaited only once the stream
    /// is subscribed, so every change is in the snapshot, the live stream, or both.
    Snapshot(futures_util::future::BoxFuture<'static, Result<axum::body::Bytes, ApiError>>),
}

/// The ids a stream sends, so the `Last-Event-ID`s it takes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids {
    /// Positions (`<epoch>-<seq>`).
    Positions,
    /// Positions, or a source's own cursors (MongoDB resume tokens, `m.…`: the source checks
    /// them).
    PositionsOrTokens,
    /// Epoch milliseconds (dialect C).
    EpochMillis,
}

/// A `Last-Event-ID` that is not an id of the stream's kind (or not text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignId(pub Ids);

impl ForeignId {
    /// What the client is told (each dialect puts it in its own error shape).
    pub const fn message(self) -> &'static str {
        match self.0 {
            Ids::EpochMillis => "Last-Event-ID must be the epoch-millisecond id of an event",
            Ids::Positions | Ids::PositionsOrTokens => {
                "Last-Event-ID is not an id this service sent; reconnect without it to start live"
            }
        }
    }
}

impl Resume {
    /// The one reading of `Last-Event-ID`, for every stream: the header, else `query` (the
    /// `lastEventId` parameter, where a route takes one); absent or blank starts live; anything
    /// else must be an id of the stream's kind.
    pub fn from_last_event_id(
        headers: &HeaderMap,
        query: Option<&str>,
        ids: Ids,
    ) -> Result<Option<Self>, ForeignId> {
        let header = match headers.get("last-event-id") {
            Some(value) => Some(value.to_str().map_err(|_| ForeignId(ids))?),
            None => None,
        };
        let text = match header.or(query).map(str::trim) {
            None | Some("") => return Ok(None),
            Some(text) => text,
        };
        let start = match ids {
            Ids::PositionsOrTokens if text.starts_with("m.") => Some(Start::Cursor(text.into())),
            Ids::Positions | Ids::PositionsOrTokens => text.parse().map(Start::After).ok(),
            Ids::EpochMillis => {
                text.parse().map(|ms| Start::Since(changegate_core::Timestamp::from_millis(ms))).ok()
            }
        };
        start.map(|start| Some(Self::From(start))).ok_or(ForeignId(ids))
    }
}

/// Subscribes, replays what the client missed, and streams the rest in `wire`'s dialect.
pub async fn open_stream(
    app: &AppState,
    principal: &changegate_core::Principal,
    key: FeedKey,
    filter: Filter,
    resume: Option<Resume>,
    wire: sse::Wire,
    heartbeat: Duration,
) -> Result<Response, ApiError> {
    let source = app
        .sources
        .serving(&key.feed)
        .ok_or_else(|| ApiError::SourceNotConfigured("MongoDB collections need MONGODB_URL".into()))?;
    if let Some(Resume::From(start)) = &resume
        && !source.accepts(start)
    {
        return Err(invalid_last_event_id());
    }
    // Subscribe before reading the log: every event is then in the catch-up, the live
    // stream, or both (and the duplicates are skipped by position).
    let subscription = app.hub.subscribe(key.clone(), filter.clone(), source).await.map_err(|e| {
        // The cause may hold database or driver text: logged, not sent.
        tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "could not open an upstream");
        ApiError::Unavailable("the event source is unavailable; retry shortly".into())
    })?;
    let mut prelude = vec![sse::hello(app.limits.retry)];
    let mut after = None;
    let mut backlog = None;
    match resume {
        None => {}
        Some(Resume::Snapshot(snapshot)) => prelude.push(snapshot.await?),
        Some(Resume::From(start)) => {
            if let Start::After(position) = start {
                // Live events up to the client's own position are duplicates.
                after = Some(position);
            }
            let catch_up = source.clone().replay(key.clone(), filter, start, app.limits.replay_max);
            backlog = Some(catch_up.await.map_err(|e| {
                if e.is_foreign() {
                    return invalid_last_event_id();
                }
                tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), "a catch-up could not start");
                ApiError::Unavailable("the event source is unavailable; retry shortly".into())
            })?);
        }
    }
    let mut labels = vec![("route", wire.route().to_owned())];
    if app.limits.metrics_tenants {
        labels.push(("tenant", key.tenant.to_string()));
    }
    let tenant = key.tenant;
    Ok(sse::response(sse::Connection {
        prelude,
        backlog,
        subscription,
        after,
        heartbeat,
        retry: app.limits.retry,
        closing: app.revocations.token(principal.key_id.as_deref(), &app.closing),
        wire,
        labels,
        tenant,
    }))
}

pub(crate) fn invalid_last_event_id() -> ApiError {
    ApiError::bad_request("invalid_last_event_id", ForeignId(Ids::PositionsOrTokens).message())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn every_stream_reads_last_event_id_one_way() {
        let with = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert("last-event-id", HeaderValue::from_bytes(value).unwrap());
            headers
        };
        let none = HeaderMap::new();
        let read = |headers: &HeaderMap, query, ids| Resume::from_last_event_id(headers, query, ids);
        // Absent or blank: live.
        assert!(matches!(read(&none, None, Ids::Positions), Ok(None)));
        assert!(matches!(read(&with(b"  "), None, Ids::EpochMillis), Ok(None)));
        // Each kind takes its own ids, the header before the query parameter.
        let position = "0000abcd-42";
        let start = |resume| match resume {
            Ok(Some(Resume::From(start))) => start,
            _ => panic!("expected a start"),
        };
        assert!(matches!(start(read(&with(position.as_bytes()), None, Ids::Positions)), Start::After(_)));
        assert!(matches!(start(read(&none, Some(position), Ids::PositionsOrTokens)), Start::After(_)));
        let since = |ms| Start::Since(changegate_core::Timestamp::from_millis(ms));
        assert_eq!(start(read(&with(b"1705844445123"), None, Ids::EpochMillis)), since(1_705_844_445_123));
        assert_eq!(start(read(&with(b"7"), Some("garbage"), Ids::EpochMillis)), since(7));
        // A source's own cursor is handed to the source, which refuses one it never sent.
        assert_eq!(start(read(&with(b"m.abc"), None, Ids::PositionsOrTokens)), Start::Cursor("m.abc".into()));
        // Anything else — another kind's id, garbage, bytes that are not text — is refused.
        for (headers, ids) in [
            (with(b"1705844445123"), Ids::Positions),
            (with(position.as_bytes()), Ids::EpochMillis),
            (with(b"m.whatever"), Ids::Positions),
            (with(b"\xff\xfe"), Ids::Positions),
        ] {
            assert_eq!(read(&headers, None, ids).err(), Some(ForeignId(ids)));
        }
    }
}
