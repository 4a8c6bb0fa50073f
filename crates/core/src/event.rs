//! The one event model: everything a subscriber can receive, whatever its source.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;

use crate::names::{CollectionName, EnvironmentId, TenantId, Topic};
use crate::position::Position;

/// A JSON document kept as the text it arrived in: checked once when it is read (a NOTIFY
/// payload, a publish body) and written out verbatim into every encoding — never built into a
/// tree and serialised again, which for a 2 KiB row cost more than everything else about the
/// event together.
///
/// Its text never holds a line break, so it always fits one SSE `data:` line: JSON strings
/// cannot contain a raw one, so a break can only be whitespace between tokens, and a document
/// that has one (a pretty-printed publish body) is compacted once, when it is read.
///
/// ```
/// use changegate_core::RawJson;
/// let doc = RawJson::parse(r#"{"id": 1}"#).unwrap();
/// assert_eq!(doc.get(), r#"{"id": 1}"#);
/// assert_eq!(RawJson::parse("{\n  \"id\": 1\n}").unwrap().get(), r#"{"id":1}"#);
/// assert_eq!(serde_json::to_string(&serde_json::json!({"document": doc})).unwrap(), r#"{"document":{"id":1}}"#);
/// ```
#[derive(Clone, Debug, serde::Serialize)]
#[serde(transparent)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// Checks that `text` is one JSON value and keeps it as it is (compacted if it spans lines).
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(text.to_owned()).map(Self::one_line)
    }

    fn one_line(raw: Box<serde_json::value::RawValue>) -> Self {
        if !raw.get().contains(['\n', '\r']) {
            return Self(raw);
        }
        // Valid JSON, so it parses; the tree then serialises compactly, without breaks.
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(value) => Self::from_value(&value),
            Err(_) => Self::null(),
        }
    }

    /// A document built in memory (a MongoDB change, a test's `json!`).
    pub fn from_value(value: &Value) -> Self {
        // A `Value` always serialises, compactly.
        Self(serde_json::value::to_raw_value(value).unwrap_or_else(|_| Self::null().0))
    }

    /// `null`.
    pub fn null() -> Self {
        Self(serde_json::value::RawValue::NULL.to_owned())
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The document as a tree, for code that must look inside it (tests, mostly).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.get()).unwrap_or(Value::Null)
    }
}

impl<'de> serde::Deserialize<'de> for RawJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(deserializer).map(Self::one_line)
    }
}

/// Two documents are equal when their texts are: the same value written differently (spacing,
/// key order) compares unequal, which is what "delivered as it arrived" means.
impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl From<Value> for RawJson {
    fn from(value: Value) -> Self {
        Self::from_value(&value)
    }
}

/// A commit time, in milliseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        Self(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// A timestamp from milliseconds since the Unix epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T21:37:03.123Z`.
    pub fn rfc3339(self) -> String {
        let t = UNIX_EPOCH + Duration::from_millis(self.0);
        humantime::format_rfc3339_millis(t).to_string()
    }
}

/// Where a change was captured.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SourceKind {
    /// A PostgreSQL table, captured by the row trigger.
    Postgres,
    /// A MongoDB collection, read from a change stream.
    Mongo,
}

/// What happened to a document.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Op {
    /// A new row or document.
    Insert,
    /// A changed row or document (partial update).
    Update,
    /// A document replaced as a whole (MongoDB).
    Replace,
    /// A removed row or document; the event carries the prior version.
    Delete,
}

impl Op {
    /// The wire name (`insert`, `update`, `replace`, `delete`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Replace => "replace",
            Self::Delete => "delete",
        }
    }
}

/// Why a stream was reset.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ResetReason {
    /// The client's position is older than retention, or from another log.
    PositionExpired,
    /// The table was truncated.
    Truncated,
}

impl ResetReason {
    /// The wire name (`position-expired`, `truncated`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PositionExpired => "position-expired",
            Self::Truncated => "truncated",
        }
    }
}

/// What happened to a flag, in the names the flag streams use.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FlagEventKind {
    /// A flag was created.
    FlagCreated,
    /// A flag's name, state, variants or default changed.
    FlagUpdated,
    /// A flag was deleted.
    FlagDeleted,
    /// A rule was added to a flag.
    RuleCreated,
    /// A rule was changed.
    RuleUpdated,
    /// A rule was removed.
    RuleDeleted,
    /// A segment the flag uses changed (the flag itself did not).
    SegmentChanged,
}

impl FlagEventKind {
    /// Every kind.
    pub const ALL: [Self; 7] = [
        Self::FlagCreated,
        Self::FlagUpdated,
        Self::FlagDeleted,
        Self::RuleCreated,
        Self::RuleUpdated,
        Self::RuleDeleted,
        Self::SegmentChanged,
    ];

    /// The wire name (`flag.created`, …, `segment.changed`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FlagCreated => "flag.created",
            Self::FlagUpdated => "flag.updated",
            Self::FlagDeleted => "flag.deleted",
            Self::RuleCreated => "rule.created",
            Self::RuleUpdated => "rule.updated",
            Self::RuleDeleted => "rule.deleted",
            Self::SegmentChanged => "segment.changed",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Why configuration that may affect many flags changed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ConfigReason {
    /// A segment was created, changed or deleted.
    SegmentModified,
    /// An API key of the environment was rotated.
    ApiKeyRotated,
}

impl ConfigReason {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SegmentModified => "segment-modified",
            Self::ApiKeyRotated => "api-key-rotated",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::SegmentModified, Self::ApiKeyRotated].into_iter().find(|r| r.as_str() == s)
    }
}

/// What an event says.
#[derive(Clone, PartialEq, Debug)]
pub enum EventBody {
    /// A row or document changed.
    Change {
        /// The database it came from.
        source: SourceKind,
        /// The table or collection.
        collection: CollectionName,
        /// What happened.
        op: Op,
        /// The primary key / `_id` in its documented text form.
        document_id: String,
        /// The row after the change, or before it for a delete.
        document: RawJson,
    },
    /// The stream is no longer continuous (a table was truncated, a position expired): the
    /// subscriber must refetch its state, then continue from this event's position.
    Reset {
        /// Why.
        reason: ResetReason,
    },
    /// A flag of an environment changed.
    Flag {
        /// The flag's environment.
        environment: EnvironmentId,
        /// What happened.
        kind: FlagEventKind,
        /// The flag's key.
        flag_key: String,
        /// The flag's version after the change.
        version: u64,
        /// The flag's full configuration (FlagDto) after the change; `null` once deleted.
        flag: Value,
    },
    /// Configuration that may affect many flags changed.
    Config {
        /// The environment, or every environment of the tenant.
        environment: Option<EnvironmentId>,
        /// Why.
        reason: ConfigReason,
        /// For a rotated key: when the previous key stops working (its grace period's end).
        valid_until: Option<Timestamp>,
    },
    /// An application message published through `POST /v1/events/publish`.
    Message {
        /// The topic it was published to.
        topic: Topic,
        /// The publisher's JSON, untouched.
        data: RawJson,
    },
}

/// One thing that happened in one tenant.
#[derive(Clone, PartialEq, Debug)]
pub struct Event {
    /// Whose event this is. Every path that delivers it is keyed by this tenant.
    pub tenant: TenantId,
    /// Where it sits in its stream.
    pub position: Position,
    /// Commit time.
    pub at: Timestamp,
    /// What happened.
    pub body: EventBody,
    /// The SSE id when the source's durable place is not a log position (a MongoDB resume
    /// token); `None` for logged events, whose id is `position`.
    pub cursor: Option<std::sync::Arc<str>>,
}

impl Event {
    /// The SSE `id:` of this event: its cursor if it has one, else its position.
    pub fn sse_id(&self) -> String {
        self.cursor.as_deref().map_or_else(|| self.position.to_string(), str::to_owned)
    }
}

/// The wire dialects an event can be encoded into. Each encoding is computed at most once per
/// event and shared by every subscriber of that dialect.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
pub enum Dialect {
    /// `/v1/events/subscribe`: `id:` + one `data:` line, no `event:` field.
    Realtime = 0,
    /// `/api/v1/stream`: flag and rule events as `data:` lines.
    FlagsA = 1,
    /// `/stream`: `event: flag.updated` with the full flag configuration.
    FlagsB = 2,
    /// `/api/v1/flags/events`: the event and data lines (the `id:` is per connection).
    FlagsC = 3,
    /// `/ofrep/v1/events`: `refetchEvaluation` notices.
    Ofrep = 4,
    /// `/v1/sdk/stream`: Featureflip's `flag.created|updated|deleted` with `{"key"}`.
    Featureflip = 5,
}

const DIALECTS: usize = 6;

/// An event as the hub fans it out: the event plus its per-dialect encodings, computed lazily
/// once and then shared (as cheap `Bytes` clones) by every subscriber.
#[derive(Debug)]
pub struct Frame {
    event: Event,
    encoded: [OnceLock<Bytes>; DIALECTS],
}

impl Frame {
    /// Wraps an event for fan-out.
    pub fn new(event: Event) -> Self {
        Self { event, encoded: std::array::from_fn(|_| OnceLock::new()) }
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The event's position.
    pub fn position(&self) -> Position {
        self.event.position
    }

    /// The encoding of this event in `dialect`, computing it with `encode` only the first time.
    pub fn encoded(&self, dialect: Dialect, encode: impl FnOnce(&Event) -> Bytes) -> Bytes {
        self.encoded[dialect as usize].get_or_init(|| encode(&self.event)).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Epoch;

    #[test]
    fn a_raw_document_keeps_its_text_and_never_spans_lines() {
        let kept = r#"{"b": 1, "a": [1, 2], "s": "line\nbreak"}"#;
        assert_eq!(RawJson::parse(kept).unwrap().get(), kept);
        let pretty = "{\r\n  \"b\": 1,\n  \"a\": [\n    1\n  ]\n}";
        let read: RawJson = serde_json::from_str(&format!(r#"{{"data": {pretty}}}"#))
            .map(|v: std::collections::HashMap<String, RawJson>| v["data"].clone())
            .unwrap();
        assert_eq!(read.get(), r#"{"b":1,"a":[1]}"#);
        assert_eq!(RawJson::parse(pretty).unwrap(), read);
        assert!(RawJson::parse("{").is_err() && RawJson::parse("1 2").is_err());
    }

    #[test]
    fn timestamps_format_as_rfc3339_with_milliseconds() {
        assert_eq!(Timestamp::from_millis(0).rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Timestamp::from_millis(1_795_383_423_123).rfc3339(), "2026-11-22T21:37:03.123Z");
    }

    #[test]
    fn a_frame_encodes_once_per_dialect() {
        let event = Event {
            tenant: TenantId::parse("t").unwrap(),
            position: Position::new(Epoch(1), 1),
            at: Timestamp::from_millis(0),
            body: EventBody::Message { topic: Topic::parse("a").unwrap(), data: RawJson::null() },
            cursor: None,
        };
        let frame = Frame::new(event);
        let mut calls = 0;
        let a = frame.encoded(Dialect::Realtime, |_| {
            calls += 1;
            Bytes::from_static(b"x")
        });
        let b = frame.encoded(Dialect::Realtime, |_| {
            calls += 1;
            Bytes::from_static(b"y")
        });
        assert_eq!((a, b, calls), (Bytes::from_static(b"x"), Bytes::from_static(b"x"), 1));
    }
}
