//! The three flag-stream dialects, each encoded once per event and shared by every subscriber.
//! An event a dialect does not show encodes to empty bytes.

use bytes::{Bytes, BytesMut};
use changegate_core::sse::{message, push_message};
use changegate_core::{ConfigReason, Event, EventBody, FlagEventKind, Timestamp};
use serde_json::json;

/// Dialect A (`/api/v1/stream`): `data: {"type","flag_key","environment_id","version","timestamp"}`
/// with `id:` and no `event:` field; flag and rule events only.
pub fn encode_a(event: &Event) -> Bytes {
    let EventBody::Flag { environment, kind, flag_key, version, .. } = &event.body else {
        return Bytes::new();
    };
    if *kind == FlagEventKind::SegmentChanged {
        return Bytes::new();
    }
    let data = json!({
        "type": kind.as_str(),
        "flag_key": flag_key,
        "environment_id": environment,
        "version": version,
        "timestamp": event.at.as_millis() / 1000,
    });
    message(Some(&event.position.to_string()), None, &data.to_string())
}

/// Dialect A's heartbeat: a comment line.
pub const HEARTBEAT_A: &[u8] = b": heartbeat\n\n";

/// Dialect B (`/stream`): `event: flag.updated` with the full FlagDto whenever a flag, one of
/// its rules, or a segment it uses changes; `event: flag.deleted` with
/// `{"key","environment","version"}` when it is deleted.
pub fn encode_b(event: &Event) -> Bytes {
    let EventBody::Flag { environment, kind, flag_key, version, flag } = &event.body else {
        return Bytes::new();
    };
    let id = event.position.to_string();
    if *kind == FlagEventKind::FlagDeleted {
        let data = json!({"key": flag_key, "environment": environment, "version": version});
        return message(Some(&id), Some("flag.deleted"), &data.to_string());
    }
    message(Some(&id), Some("flag.updated"), &flag.to_string())
}

/// Dialect B's keep-alive: `event: ping` with the current time.
pub fn ping_b(now: Timestamp) -> Bytes {
    let seconds = Timestamp::from_millis(now.as_millis() / 1000 * 1000).rfc3339();
    // RFC 3339 without fractional seconds, as the dialect's examples show.
    let timestamp = seconds.replace(".000Z", "Z");
    message(None, Some("ping"), &json!({ "timestamp": timestamp }).to_string())
}

/// Dialect C (`/api/v1/flags/events`), without its `id:` line (which is per connection):
/// `event: flag-updated` `{"flagKey","timestamp"}` for create/update/delete (and rule changes),
/// `event: config-updated` `{"reason","timestamp"}`.
pub fn encode_c(event: &Event) -> Bytes {
    let timestamp = event.at.rfc3339();
    match &event.body {
        EventBody::Flag { kind, flag_key, .. } if *kind != FlagEventKind::SegmentChanged => message(
            None,
            Some("flag-updated"),
            &json!({"flagKey": flag_key, "timestamp": timestamp}).to_string(),
        ),
        EventBody::Config { reason, valid_until, .. } => {
            let mut out = BytesMut::new();
            push_message(
                &mut out,
                None,
                Some("config-updated"),
                &json!({"reason": reason.as_str(), "timestamp": timestamp}).to_string(),
            );
            // Flipswitch's SDK also reads a rotation as its own event, with the old key's end.
            if let (ConfigReason::ApiKeyRotated, Some(until)) = (reason, valid_until) {
                let data = json!({"validUntil": until.rfc3339(), "timestamp": timestamp});
                push_message(&mut out, None, Some("api-key-rotated"), &data.to_string());
            }
            out.freeze()
        }
        _ => Bytes::new(),
    }
}

/// OFREP change notifications (`/ofrep/v1/events`): any flag, rule, segment or configuration
/// change of the environment is `data: {"type":"refetchEvaluation","etag":…,"lastModified":…}`
/// with `id:`; the `etag` names the change, `lastModified` is its Unix time in seconds.
pub fn encode_ofrep(event: &Event) -> Bytes {
    if !matches!(event.body, EventBody::Flag { .. } | EventBody::Config { .. }) {
        return Bytes::new();
    }
    let id = event.position.to_string();
    let data = json!({
        "type": "refetchEvaluation",
        "etag": format!("\"{id}\""),
        "lastModified": event.at.as_millis() / 1000,
    });
    message(Some(&id), None, &data.to_string())
}

/// Featureflip's SDK stream (`/v1/sdk/stream`): `event: flag.created|flag.updated|flag.deleted`
/// with `{"key"}` and `id:`. The SDK refetches the flag it names; rule changes and changes of a
/// segment the flag uses are `flag.updated` (rules carry their segments' conditions inlined,
/// see [`crate::featureflip`]).
pub fn encode_featureflip(event: &Event) -> Bytes {
    let EventBody::Flag { kind, flag_key, .. } = &event.body else {
        return Bytes::new();
    };
    let name = match kind {
        FlagEventKind::FlagCreated => "flag.created",
        FlagEventKind::FlagDeleted => "flag.deleted",
        FlagEventKind::FlagUpdated
        | FlagEventKind::RuleCreated
        | FlagEventKind::RuleUpdated
        | FlagEventKind::RuleDeleted
        | FlagEventKind::SegmentChanged => "flag.updated",
    };
    let id = event.position.to_string();
    message(Some(&id), Some(name), &json!({ "key": flag_key }).to_string())
}

/// Dialect C's heartbeat event.
pub const HEARTBEAT_C: &[u8] = b"event: heartbeat\ndata: {}\n\n";

/// Inserts `id: <id>` after the `event:` line of a dialect C block.
pub fn with_id_c(block: &[u8], id: u64) -> Bytes {
    let split = block.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut out = Vec::with_capacity(block.len() + 24);
    out.extend_from_slice(&block[..split]);
    out.extend_from_slice(format!("id: {id}\n").as_bytes());
    out.extend_from_slice(&block[split..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use changegate_core::{ConfigReason, EnvironmentId, Epoch, Position, TenantId};
    use serde_json::Value;

    use super::*;

    fn event(body: EventBody) -> Event {
        Event {
            tenant: TenantId::parse("acme").unwrap(),
            position: Position::new(Epoch(0xab), 9),
            at: Timestamp::from_millis(1_705_844_445_123),
            body,
            cursor: None,
        }
    }

    fn flag(kind: FlagEventKind) -> EventBody {
        EventBody::Flag {
            environment: EnvironmentId::parse("production").unwrap(),
            kind,
            flag_key: "dark-mode".into(),
            version: 4,
            flag: json!({"key": "dark-mode", "version": 4}),
        }
    }

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn dialect_a_bytes() {
        assert_eq!(
            text(&encode_a(&event(flag(FlagEventKind::FlagUpdated)))),
            "id: 000000ab-9\ndata: {\"type\":\"flag.updated\",\"flag_key\":\"dark-mode\",\"environment_id\":\"production\",\"version\":4,\"timestamp\":1705844445}\n\n"
        );
        assert!(encode_a(&event(flag(FlagEventKind::SegmentChanged))).is_empty());
    }

    #[test]
    fn dialect_b_bytes() {
        assert_eq!(
            text(&encode_b(&event(flag(FlagEventKind::RuleCreated)))),
            "event: flag.updated\nid: 000000ab-9\ndata: {\"key\":\"dark-mode\",\"version\":4}\n\n"
        );
        let deleted = EventBody::Flag {
            environment: EnvironmentId::parse("production").unwrap(),
            kind: FlagEventKind::FlagDeleted,
            flag_key: "dark-mode".into(),
            version: 5,
            flag: Value::Null,
        };
        assert_eq!(
            text(&encode_b(&event(deleted))),
            "event: flag.deleted\nid: 000000ab-9\ndata: {\"key\":\"dark-mode\",\"environment\":\"production\",\"version\":5}\n\n"
        );
        assert_eq!(
            text(&ping_b(Timestamp::from_millis(1_771_255_800_456))),
            "event: ping\ndata: {\"timestamp\":\"2026-02-16T15:30:00Z\"}\n\n"
        );
    }

    #[test]
    fn featureflip_bytes_name_the_flag_to_refetch() {
        let names: Vec<String> = FlagEventKind::ALL
            .iter()
            .map(|kind| text(&encode_featureflip(&event(flag(*kind)))).to_owned())
            .collect();
        let expect =
            |name: &str| format!("event: {name}\nid: 000000ab-9\ndata: {{\"key\":\"dark-mode\"}}\n\n");
        assert_eq!(
            names,
            [
                expect("flag.created"),
                expect("flag.updated"),
                expect("flag.deleted"),
                expect("flag.updated"),
                expect("flag.updated"),
                expect("flag.updated"),
                expect("flag.updated"),
            ]
        );
    }

    #[test]
    fn dialect_c_bytes() {
        let block = encode_c(&event(flag(FlagEventKind::FlagCreated)));
        assert_eq!(
            text(&with_id_c(&block, 1_705_844_445_123)),
            "event: flag-updated\nid: 1705844445123\ndata: {\"flagKey\":\"dark-mode\",\"timestamp\":\"2024-01-21T13:40:45.123Z\"}\n\n"
        );
        let config =
            EventBody::Config { environment: None, reason: ConfigReason::SegmentModified, valid_until: None };
        assert_eq!(
            text(&encode_c(&event(config))),
            "event: config-updated\ndata: {\"reason\":\"segment-modified\",\"timestamp\":\"2024-01-21T13:40:45.123Z\"}\n\n"
        );
    }
}
