//! SSE framing: one message as bytes. Pure text work, shared by every dialect.

use bytes::{Bytes, BytesMut};

/// Appends one SSE message to `out`. `data` is split on every line ending SSE recognises, so no payload
/// can end the message early or inject a field.
pub fn push_message(out: &mut BytesMut, id: Option<&str>, event: Option<&str>, data: &str) {
    if let Some(event) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(b"\n");
    }
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\n");
    }
    for line in data.split("\r\n").flat_map(|l| l.split(['\r', '\n'])) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

/// One SSE message as bytes.
pub fn message(id: Option<&str>, event: Option<&str>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 32);
    push_message(&mut out, id, event, data);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_multiline_data_becomes_several_data_lines() {
        let bytes = message(None, Some("x"), "a\nb\r\nc\rd");
        assert_eq!(&bytes[..], b"event: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
    }
}
