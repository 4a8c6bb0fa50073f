//! The MongoDB source's pure parts: the change-stream pipeline with the tenant `$match`, the
//! mapping of change events to the shared event model, and resume tokens as SSE ids.
//!
//! Isolation happens inside MongoDB: every change stream starts with a `$match` on the tenant,
//! read from `fullDocument` for inserts, updates and replaces and from
//! `fullDocumentBeforeChange` (the pre-image) for deletes — so a delete whose pre-image is not
//! available matches nothing and is never delivered, rather than leaked. This crate never
//! filters a shared stream by tenant itself, and never opens a change stream without that
//! `$match` (the pipeline needs a parsed [`TenantField`]).
//!
//! # Layout
//!
//! * this file — the pure parts (names, the pipeline, resume tokens, event mapping), unit-tested
//!   without a server;
//! * [`source`] — the [`changegate_core::Source`] that runs them with the official driver: one
//!   change stream per open feed, catch-ups from a client's token, resets numbered after what
//!   was delivered.

pub mod source;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bson::{Bson, Document, doc};
use changegate_core::{CollectionName, EventBody, Op, RawJson, ResetReason, SourceKind, TenantId};
use serde_json::Value;

/// What went wrong with MongoDB: a name, token or event refused, or the driver failing.
///
/// Opaque: ask [`MongoError::is_refused`] (the caller's name or token: the message may be shown)
/// or [`MongoError::is_unavailable`] (the driver or server: its error is the
/// [`std::error::Error::source`], for the log; the URL, which may hold credentials, is never
/// part of it).
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct MongoError {
    kind: Kind,
    what: std::borrow::Cow<'static, str>,
    #[source]
    source: Option<mongodb::error::Error>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A collection or field name MongoDB would not accept, or that could change the query.
    Name,
    /// A `Last-Event-ID` that is not a resume token this service sent.
    Token,
    /// A change event without the fields its operation needs.
    Event,
    /// The driver or the server refused or failed.
    Driver,
}

impl MongoError {
    fn name(kind: &'static str, reason: &'static str) -> Self {
        Self { kind: Kind::Name, what: format!("invalid {kind}: {reason}").into(), source: None }
    }

    fn token() -> Self {
        Self { kind: Kind::Token, what: "not a MongoDB resume token this service sent".into(), source: None }
    }

    fn event(missing: &'static str) -> Self {
        Self { kind: Kind::Event, what: format!("malformed change event: {missing}").into(), source: None }
    }

    pub(crate) fn driver(doing: &'static str, source: mongodb::error::Error) -> Self {
        Self { kind: Kind::Driver, what: doing.into(), source: Some(source) }
    }

    /// Whether a caller's name or token was refused (the message says why and may be shown).
    pub fn is_refused(&self) -> bool {
        matches!(self.kind, Kind::Name | Kind::Token)
    }

    /// Whether the driver or the server failed (worth a retry; the cause is for the log).
    pub fn is_unavailable(&self) -> bool {
        self.kind == Kind::Driver
    }

    /// Whether a change event could not be read.
    pub fn is_malformed_event(&self) -> bool {
        self.kind == Kind::Event
    }
}

/// A collection name usable in a change stream: 1–120 bytes, no `$`, no NUL, not `system.*`.
pub fn collection(name: &CollectionName) -> Result<&str, MongoError> {
    let text = name.as_str();
    let bad = |reason| Err(MongoError::name("collection", reason));
    if text.len() > 120 {
        return bad("must be at most 120 bytes");
    }
    if text.contains('$') || text.contains('\0') {
        return bad("must not contain `$` or NUL");
    }
    if text.starts_with("system.") {
        return bad("system collections cannot be watched");
    }
    Ok(text)
}

/// The document field holding the tenant (default `tenantId`): dotted paths allowed, but no `$`
/// and no empty segment, so it can only ever name a field. Parsed once at start, so a change
/// stream can never be opened without the tenant `$match` (see [`pipeline`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TenantField(String);

impl TenantField {
    /// Parses a field path.
    pub fn parse(field: &str) -> Result<Self, MongoError> {
        tenant_field(field).map(|f| Self(f.to_owned()))
    }

    /// The field path.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a tenant field path (see [`TenantField`]).
pub fn tenant_field(field: &str) -> Result<&str, MongoError> {
    let bad = |reason| Err(MongoError::name("tenant field", reason));
    if field.is_empty() || field.len() > 200 {
        return bad("must be 1–200 characters");
    }
    if field.contains('$') || field.contains('\0') || field.split('.').any(str::is_empty) {
        return bad("must be a field path without `$` or empty segments");
    }
    Ok(field)
}

/// The change stream's pipeline: one `$match` that admits a data change only for `tenant`,
/// and collection-level events (drop, rename, dropDatabase, invalidate) so subscribers can be
/// told to refetch. Infallible: the field was checked when it was parsed.
///
/// ```
/// use changegate_core::TenantId;
/// use changegate_mongo::{TenantField, pipeline};
/// let field = TenantField::parse("tenantId").unwrap();
/// let pipeline = pipeline(&field, &TenantId::parse("acme").unwrap());
/// assert_eq!(pipeline.len(), 1);
/// ```
pub fn pipeline(field: &TenantField, tenant: &TenantId) -> Vec<Document> {
    let field = field.as_str();
    vec![doc! {
        "$match": {
            "$or": [
                {
                    "operationType": { "$in": ["insert", "update", "replace"] },
                    format!("fullDocument.{field}"): tenant.as_str(),
                },
                {
                    "operationType": "delete",
                    format!("fullDocumentBeforeChange.{field}"): tenant.as_str(),
                },
                { "operationType": { "$in": ["drop", "rename", "dropDatabase", "invalidate"] } },
            ]
        }
    }]
}

/// The `$changeStream` options every stream is opened with (what [`source`] sets through the
/// driver): the current document on updates, the pre-image when available (deletes need it to
/// be matched at all).
pub fn stream_options() -> Document {
    doc! { "fullDocument": "updateLookup", "fullDocumentBeforeChange": "whenAvailable" }
}

/// A change stream resume token, as an SSE id: `m.` + base64url of the token document's BSON.
#[derive(Clone, PartialEq, Debug)]
pub struct ResumeToken(Document);

impl ResumeToken {
    /// Wraps the `_id` of a change event.
    pub fn new(token: Document) -> Self {
        Self(token)
    }

    /// The token document (for `resumeAfter`).
    pub fn document(&self) -> &Document {
        &self.0
    }

    /// The header-safe text form.
    pub fn encode(&self) -> String {
        let bytes = self.0.to_vec().unwrap_or_default();
        format!("m.{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses the text form back; anything else is refused.
    pub fn decode(text: &str) -> Result<Self, MongoError> {
        let encoded = text.strip_prefix("m.").ok_or_else(MongoError::token)?;
        if encoded.len() > 4096 {
            return Err(MongoError::token());
        }
        let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| MongoError::token())?;
        let document = Document::from_reader(bytes.as_slice()).map_err(|_| MongoError::token())?;
        if !document.contains_key("_data") {
            return Err(MongoError::token());
        }
        Ok(Self(document))
    }
}

/// The `documentId` of an `_id`: a string as itself, an ObjectId as its 24 hex digits, an
/// integer in decimal, anything else as relaxed Extended JSON text.
pub fn document_id(id: &Bson) -> String {
    match id {
        Bson::String(text) => text.clone(),
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::Int32(n) => n.to_string(),
        Bson::Int64(n) => n.to_string(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// Maps one change event to the shared model (`None` for operation types the stream does not
/// publish). Documents become relaxed Extended JSON: ObjectId → `{"$oid": …}`, dates →
/// `{"$date": "<ISO 8601>"}`, decimals → `{"$numberDecimal": "…"}`, plain numbers stay numbers.
pub fn map_event(
    event: &Document,
    collection_name: &CollectionName,
) -> Result<Option<EventBody>, MongoError> {
    let kind = event.get_str("operationType").map_err(|_| MongoError::event("no operationType"))?;
    let op = match kind {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "replace" => Op::Replace,
        "delete" => Op::Delete,
        "drop" | "rename" | "dropDatabase" | "invalidate" => {
            return Ok(Some(EventBody::Reset { reason: ResetReason::Truncated }));
        }
        _ => return Ok(None),
    };
    let key = event.get_document("documentKey").map_err(|_| MongoError::event("no documentKey"))?;
    let id = key.get("_id").ok_or_else(|| MongoError::event("no documentKey._id"))?;
    let image = if op == Op::Delete { "fullDocumentBeforeChange" } else { "fullDocument" };
    let document = match event.get(image) {
        Some(Bson::Document(document)) => Bson::Document(document.clone()).into_relaxed_extjson(),
        // An update whose document was deleted before the lookup: nothing to show but the id.
        _ if op == Op::Update => Value::Null,
        _ => return Err(MongoError::event("no document image")),
    };
    Ok(Some(EventBody::Change {
        source: SourceKind::Mongo,
        collection: collection_name.clone(),
        op,
        document_id: document_id(id),
        document: RawJson::from_value(&document),
    }))
}

#[cfg(test)]
mod tests {
    use bson::oid::ObjectId;
    use bson::{DateTime, Decimal128};
    use serde_json::json;

    use super::*;

    fn tenant() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    fn todos() -> CollectionName {
        CollectionName::parse("todos").unwrap()
    }

    #[test]
    fn the_pipeline_matches_the_tenant_in_the_image_each_operation_has() {
        let pipeline = pipeline(&TenantField::parse("tenantId").unwrap(), &tenant());
        let expected = doc! {
            "$match": {
                "$or": [
                    { "operationType": { "$in": ["insert", "update", "replace"] }, "fullDocument.tenantId": "acme" },
                    { "operationType": "delete", "fullDocumentBeforeChange.tenantId": "acme" },
                    { "operationType": { "$in": ["drop", "rename", "dropDatabase", "invalidate"] } },
                ]
            }
        };
        assert_eq!(pipeline, vec![expected]);
        assert_eq!(
            stream_options(),
            doc! { "fullDocument": "updateLookup", "fullDocumentBeforeChange": "whenAvailable" }
        );
        let nested = pipeline_field("org.tenant");
        assert!(nested.contains("fullDocument.org.tenant"));
    }

    fn pipeline_field(field: &str) -> String {
        format!("{:?}", pipeline(&TenantField::parse(field).unwrap(), &tenant()))
    }

    #[test]
    fn tenant_fields_and_collections_that_could_change_the_query_are_refused() {
        for bad in ["", "$where", "a..b", ".a", "a.", "a$b", "a\0b"] {
            assert!(tenant_field(bad).is_err_and(|e| e.is_refused()), "{bad:?}");
        }
        for bad in ["a$b", "system.users", &"x".repeat(121)] {
            assert!(
                collection(&CollectionName::parse(bad).unwrap()).is_err_and(|e| e.is_refused()),
                "{bad:?}"
            );
        }
        assert_eq!(collection(&todos()).unwrap(), "todos");
    }

    #[test]
    fn resume_tokens_round_trip_and_garbage_is_refused() {
        let token = ResumeToken::new(doc! { "_data": "8263F0A1B2000000012B022C0100296E5A1004" });
        let text = token.encode();
        assert!(
            text.starts_with("m.")
                && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        );
        assert_eq!(ResumeToken::decode(&text).unwrap(), token);
        for bad in [
            "",
            "m.",
            "m.!!!",
            "00000001-5",
            "m.AAAA",
            &format!("m.{}", URL_SAFE_NO_PAD.encode(doc! {"x": 1}.to_vec().unwrap())),
        ] {
            assert!(ResumeToken::decode(bad).is_err_and(|e| e.is_refused()), "{bad:?}");
        }
    }

    #[test]
    fn every_operation_maps_to_the_shared_model() {
        let oid = ObjectId::parse_str("64b7f0a1b2c3d4e5f6a7b8c9").unwrap();
        let full = doc! { "_id": oid, "tenantId": "acme", "title": "x" };
        let change = |kind: &str, image: &str| {
            let mut event = doc! { "operationType": kind, "documentKey": { "_id": oid } };
            event.insert(image, full.clone());
            map_event(&event, &todos()).unwrap().unwrap()
        };
        for (kind, op) in [("insert", Op::Insert), ("update", Op::Update), ("replace", Op::Replace)] {
            let EventBody::Change { op: got, document_id, document, source, .. } =
                change(kind, "fullDocument")
            else {
                panic!("{kind} is a change")
            };
            assert_eq!((got, source), (op, SourceKind::Mongo));
            assert_eq!(document_id, "64b7f0a1b2c3d4e5f6a7b8c9");
            assert_eq!(
                document.to_value(),
                json!({"_id": {"$oid": "64b7f0a1b2c3d4e5f6a7b8c9"}, "tenantId": "acme", "title": "x"})
            );
        }
        let EventBody::Change { op, document, .. } = change("delete", "fullDocumentBeforeChange") else {
            panic!("delete is a change")
        };
        assert_eq!(
            (op, &document.to_value()["title"]),
            (Op::Delete, &json!("x")),
            "a delete carries the prior document"
        );
        // A delete without its pre-image is malformed — it cannot have passed the tenant $match.
        let bare = doc! { "operationType": "delete", "documentKey": { "_id": oid } };
        assert!(map_event(&bare, &todos()).is_err());
        for kind in ["drop", "rename", "dropDatabase", "invalidate"] {
            let event = doc! { "operationType": kind };
            assert!(matches!(map_event(&event, &todos()).unwrap(), Some(EventBody::Reset { .. })), "{kind}");
        }
        assert_eq!(map_event(&doc! { "operationType": "createIndexes" }, &todos()).unwrap(), None);
    }

    #[test]
    fn bson_types_become_relaxed_extended_json_and_ids_have_a_string_form() {
        let at = DateTime::from_millis(1_795_383_423_123);
        let decimal: Decimal128 = "12.50".parse().unwrap();
        let document = doc! { "n": 42_i32, "big": 9_007_199_254_740_993_i64, "f": 1.5, "at": at, "price": decimal, "ok": true };
        let event =
            doc! { "operationType": "insert", "documentKey": { "_id": 7_i64 }, "fullDocument": document };
        let Some(EventBody::Change { document_id, document, .. }) = map_event(&event, &todos()).unwrap()
        else {
            panic!("an insert")
        };
        let document = document.to_value();
        assert_eq!(document_id, "7");
        assert_eq!(document["n"], json!(42));
        assert_eq!(document["big"], json!(9_007_199_254_740_993_i64));
        assert_eq!(document["f"], json!(1.5));
        assert_eq!(document["at"], json!({"$date": "2026-11-22T21:37:03.123Z"}));
        assert_eq!(document["price"], json!({"$numberDecimal": "12.50"}));
        assert_eq!(document_id_of(Bson::String("abc".into())), "abc");
        assert_eq!(document_id_of(Bson::Document(doc! {"a": 1})), r#"{"a":1}"#);
    }

    fn document_id_of(id: Bson) -> String {
        document_id(&id)
    }
}
