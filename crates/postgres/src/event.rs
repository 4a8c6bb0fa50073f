//! Outbox rows (as `realtime.row_json` renders them, in NOTIFY payloads and replay alike) to
//! events of the shared model.

use changegate_core::{
    CollectionName, ConfigReason, EnvironmentId, Epoch, Event, EventBody, FlagEventKind, Op, Position,
    RawJson, ResetReason, SourceKind, TenantId, Timestamp, Topic,
};
use serde::Deserialize;
use serde_json::Value;

use crate::PgError;

/// An outbox row as `realtime.row_json` renders it. Read in one pass; the payload stays the
/// JSON text it was ([`RawJson`]).
#[derive(Deserialize)]
struct Row {
    seq: i64,
    tenant: String,
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

/// A NOTIFY payload that names its rows instead of carrying them (too big for NOTIFY):
/// `{"tenant","ref":true,"from","through"}`, or from a sequencer before migration 4 one row,
/// `{"seq","tenant","ref":true}`.
#[derive(Deserialize)]
struct Reference {
    tenant: String,
    seq: Option<i64>,
    from: Option<i64>,
    through: Option<i64>,
}

/// What a NOTIFY carried.
#[derive(Debug)]
pub(crate) enum Notified {
    /// One channel's events of a sequencer pass, in order.
    Events(Vec<Event>),
    /// Too big for NOTIFY: read the channel's rows up to `through` (of `tenant`); the
    /// reader goes on from the last one it has.
    Range {
        /// The last position.
        through: i64,
        /// Whose they are.
        tenant: String,
    },
}

/// One NOTIFY payload as the LISTEN task reads it: the events it carries, or none when it
/// only names its rows (too big for NOTIFY; the task reads them). Public for the benchmark
/// of this per-event path (`changegate-bench decode`).
pub fn decode_notification(payload: &str, epoch: Epoch) -> Result<Vec<Event>, PgError> {
    Ok(match notification(payload, epoch)? {
        Notified::Events(events) => events,
        Notified::Range { .. } => Vec::new(),
    })
}

/// Parses a NOTIFY payload: a JSON array of rows (a sequencer pass, one channel), a
/// reference, or one row (a sequencer before migration 4, during an upgrade).
pub(crate) fn notification(payload: &str, epoch: Epoch) -> Result<Notified, PgError> {
    let unreadable = |e: serde_json::Error| PgError::corrupt(format!("an unreadable notification: {e}"));
    if payload.starts_with('[') {
        let rows: Vec<Row> = serde_json::from_str(payload).map_err(unreadable)?;
        // A row the gateway cannot deliver (say a topic `realtime.publish()` was given from SQL
        // that is not a valid topic) is logged and skipped; the rest of the batch goes on.
        let events = rows
            .into_iter()
            .filter_map(|r| {
                event(r, epoch).inspect_err(|error| tracing::error!(%error, "outbox row skipped")).ok()
            })
            .collect();
        return Ok(Notified::Events(events));
    }
    if payload.contains(r#""ref""#) {
        let reference: Reference = serde_json::from_str(payload).map_err(unreadable)?;
        let through = match (reference.from, reference.through, reference.seq) {
            (Some(from), Some(through), _) if from <= through => through,
            (None, None, Some(seq)) => seq,
            _ => return Err(PgError::corrupt("a notification's reference names no rows")),
        };
        return Ok(Notified::Range { through, tenant: reference.tenant });
    }
    let row: Row = serde_json::from_str(payload).map_err(unreadable)?;
    event(row, epoch).map(|e| Notified::Events(vec![e]))
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
    fn a_reference_notification_names_the_rows_to_read() {
        let parsed = notification(r#"{"tenant":"acme","ref":true,"from":9,"through":12}"#, Epoch(1)).unwrap();
        assert!(matches!(parsed, Notified::Range { through: 12, ref tenant } if tenant == "acme"));
        // A sequencer before the upgrade named one row.
        let parsed = notification(r#"{"seq":9,"tenant":"acme","ref":true}"#, Epoch(1)).unwrap();
        assert!(matches!(parsed, Notified::Range { through: 9, .. }));
        for bad in [r#"{"tenant":"acme","ref":true}"#, r#"{"tenant":"acme","ref":true,"from":9,"through":2}"#]
        {
            assert!(notification(bad, Epoch(1)).is_err_and(|e| e.is_corrupt()), "{bad}");
        }
    }

    #[test]
    fn a_batch_notification_carries_its_rows_in_order() {
        let payload = r#"[{"seq":4,"tenant":"acme","kind":"message","topic":"a","payload":{"n":1},"at":0},
                          {"seq":6,"tenant":"acme","kind":"message","topic":"b","payload":{"n":2},"at":0}]"#;
        let Notified::Events(events) = notification(payload, Epoch(1)).unwrap() else { panic!("events") };
        let seqs: Vec<u64> = events.iter().map(|e| e.position.seq()).collect();
        assert_eq!(seqs, [4, 6]);
        // A malformed row is skipped, not the whole batch.
        let one_bad = r#"[{"seq":4,"tenant":"a b","kind":"message","topic":"a","at":0},{"seq":5,"tenant":"acme","kind":"message","topic":"a","at":0}]"#;
        let Notified::Events(events) = notification(one_bad, Epoch(1)).unwrap() else { panic!("events") };
        assert_eq!(events.iter().map(|e| e.position.seq()).collect::<Vec<_>>(), [5]);
        assert!(notification("[nope]", Epoch(1)).is_err_and(|e| e.is_corrupt()));
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
