//! Outbox rows (as `realtime.row_json` renders them, in NOTIFY payloads and replay alike) to
//! events of the shared model.

use changegate_core::{
    CollectionName, ConfigReason, EnvironmentId, Epoch, Event, EventBody, FlagEventKind, Op, Position,
    RawJson, ResetReason, SourceKind, TenantId, Timestamp, Topic,
};
use serde::Deserialize;
use serde_json::Value;

use crate::PgError;

/// An outbox row as `realtime.row_json` renders it, or — in a NOTIFY payload too big to carry
/// the row — only its `seq`, `tenant` and `"ref": true`. Read in one pass; the payload stays
/// the JSON text it was ([`RawJson`]).
#[derive(Deserialize)]
struct Row {
    seq: i64,
    tenant: String,
    #[serde(rename = "ref", default)]
    by_reference: bool,
    #[serde(default)]
    kind: String,
    collection: Option<String>,
    topic: Option<String>,
    op: Option<String>,
    document_id: Option<String>,
    #[serde(default)]
    payload: Option<RawJson>,
    #[serde(default)]
    at: i64,
}

/// What a NOTIFY carried.
#[derive(Debug)]
pub(crate) enum Notified {
    /// The whole event.
    Event(Event),
    /// Too big for NOTIFY: read outbox row `seq` (of `tenant`).
    Reference {
        /// Its position.
        seq: i64,
        /// Whose it is.
        tenant: String,
    },
}

/// One NOTIFY payload as the LISTEN task reads it: the event it carries, or `None` when it only
/// names its outbox row (too big for NOTIFY; the task reads the row). Public for the benchmark
/// of this per-event path (`changegate-bench decode`).
pub fn decode_notification(payload: &str, epoch: Epoch) -> Result<Option<Event>, PgError> {
    Ok(match notification(payload, epoch)? {
        Notified::Event(event) => Some(event),
        Notified::Reference { .. } => None,
    })
}

/// Parses a NOTIFY payload.
pub(crate) fn notification(payload: &str, epoch: Epoch) -> Result<Notified, PgError> {
    let row: Row = serde_json::from_str(payload)
        .map_err(|e| PgError::corrupt(format!("a notification is not an outbox row: {e}")))?;
    if row.by_reference {
        return Ok(Notified::Reference { seq: row.seq, tenant: row.tenant });
    }
    event(row, epoch).map(Notified::Event)
}

/// Parses one `realtime.row_json` text.
pub(crate) fn row(text: &str, epoch: Epoch) -> Result<Event, PgError> {
    let row: Row =
        serde_json::from_str(text).map_err(|e| PgError::corrupt(format!("not an outbox row: {e}")))?;
    event(row, epoch)
}

fn event(row: Row, epoch: Epoch) -> Result<Event, PgError> {
    let seq = row.seq;
    let bad = |reason: &str| PgError::corrupt(format!("outbox row {seq} is malformed: {reason}"));
    let tenant = TenantId::parse(&row.tenant).map_err(|e| bad(&e.to_string()))?;
    let body = match row.kind.as_str() {
        "message" => EventBody::Message {
            topic: Topic::parse(row.topic.as_deref().unwrap_or("")).map_err(|e| bad(&e.to_string()))?,
            data: row.payload.unwrap_or_else(RawJson::null),
        },
        "change" => EventBody::Change {
            source: SourceKind::Postgres,
            collection: CollectionName::parse(row.collection.as_deref().unwrap_or(""))
                .map_err(|e| bad(&e.to_string()))?,
            op: match row.op.as_deref() {
                Some("insert") => Op::Insert,
                Some("update") => Op::Update,
                Some("delete") => Op::Delete,
                _ => return Err(bad("unknown op")),
            },
            // A table without a primary key has no id to give (the trigger writes null).
            document_id: row.document_id.unwrap_or_default(),
            document: row.payload.unwrap_or_else(RawJson::null),
        },
        "reset" => EventBody::Reset { reason: ResetReason::Truncated },
        "flag" => {
            let p = &row.payload.as_ref().map(RawJson::to_value).unwrap_or_default();
            let text = |name: &str| p.get(name).and_then(Value::as_str).unwrap_or_default();
            EventBody::Flag {
                environment: EnvironmentId::parse(text("environment")).map_err(|e| bad(&e.to_string()))?,
                kind: FlagEventKind::parse(text("type")).ok_or_else(|| bad("unknown flag event type"))?,
                // No defaults: a flag event without its key or version is not delivered as
                // flag `""` at version 0, it is a malformed row.
                flag_key: p
                    .get("flag_key")
                    .and_then(Value::as_str)
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| bad("a flag event without flag_key"))?
                    .to_owned(),
                version: p
                    .get("version")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("a flag event without version"))?,
                // `null` is what a deleted flag's event carries.
                flag: p.get("flag").cloned().unwrap_or(Value::Null),
            }
        }
        "config" => {
            let p = &row.payload.as_ref().map(RawJson::to_value).unwrap_or_default();
            let environment = match p.get("environment").and_then(Value::as_str) {
                Some(e) => Some(EnvironmentId::parse(e).map_err(|e| bad(&e.to_string()))?),
                None => None,
            };
            let reason = p.get("reason").and_then(Value::as_str).and_then(ConfigReason::parse);
            let valid_until = p.get("valid_until").and_then(Value::as_u64).map(Timestamp::from_millis);
            EventBody::Config {
                environment,
                reason: reason.ok_or_else(|| bad("unknown config reason"))?,
                valid_until,
            }
        }
        _ => return Err(bad("unknown kind")),
    };
    let seq = u64::try_from(seq).map_err(|_| bad("negative seq"))?;
    let at = Timestamp::from_millis(u64::try_from(row.at).unwrap_or(0));
    Ok(Event { tenant, position: Position::new(epoch, seq), at, body, cursor: None })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_change_row_becomes_a_change_event() {
        let text = json!({"seq": 7, "tenant": "acme", "kind": "change", "collection": "public.todos",
                          "topic": null, "op": "delete", "document_id": "1",
                          "payload": {"id": 1}, "at": 1_795_383_423_123_i64})
        .to_string();
        let event = row(&text, Epoch(3)).unwrap();
        assert_eq!(event.position, Position::new(Epoch(3), 7));
        assert_eq!(event.tenant.as_str(), "acme");
        assert!(matches!(
            event.body,
            EventBody::Change { op: Op::Delete, ref document_id, ref document, .. }
                if document_id == "1" && document.to_value() == json!({"id": 1})
        ));
    }

    #[test]
    fn a_flag_row_becomes_a_flag_event() {
        let text = r#"{"seq":2,"tenant":"acme","kind":"flag","payload":{"environment":"prod","type":"flag.updated","flag_key":"k","version":3,"flag":{"key":"k"}},"at":0}"#;
        let EventBody::Flag { flag_key, version, flag, .. } = row(text, Epoch(1)).unwrap().body else {
            panic!("a flag event")
        };
        assert_eq!((flag_key.as_str(), version, flag), ("k", 3, json!({"key": "k"})));
    }

    #[test]
    fn a_reference_notification_names_the_row_to_fetch() {
        let parsed = notification(r#"{"seq":9,"tenant":"acme","ref":true}"#, Epoch(1)).unwrap();
        assert!(matches!(parsed, Notified::Reference { seq: 9, ref tenant } if tenant == "acme"));
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        for bad in [
            "nope",
            r#"{"seq":1}"#,
            r#"{"seq":1,"tenant":"a b","kind":"message","topic":"t","at":0}"#,
            r#"{"seq":1,"tenant":"a","kind":"change","collection":"t","op":"merge","at":0}"#,
            r#"{"seq":-1,"tenant":"a","kind":"reset","at":0}"#,
            r#"{"seq":1,"tenant":"a","kind":"other","at":0}"#,
            r#"{"seq":1,"tenant":"a","kind":"flag","payload":{"environment":"prod","type":"flag.updated","version":2},"at":0}"#,
            r#"{"seq":1,"tenant":"a","kind":"flag","payload":{"environment":"prod","type":"flag.updated","flag_key":"k"},"at":0}"#,
        ] {
            assert!(row(bad, Epoch(1)).is_err_and(|e| e.is_corrupt()), "{bad}");
        }
    }
}
