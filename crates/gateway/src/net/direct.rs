//! SSE streams are written straight to their socket; hyper serves everything else.
//!
//! The failure this exists for: an idle browser tab cost the gateway ~14.5 KiB (it once was
//! ~71 KiB), most of it hyper's per-connection state — an 8 KiB read buffer and a header write
//! buffer kept for the connection's lifetime, its dispatcher and the timers around them — held
//! by a connection that, once its request is read, only ever writes. So the accept loop reads
//! each request head itself ([`read_head`], `httparse`, a buffer released right after). A `GET`
//! of a stream route with no body ([`take`]) is answered by the same router as any request (auth,
//! CORS, access log, errors: one code path), and its response is then written here: the head,
//! then each chunk as the stream yields it, with nothing kept between writes but the socket and
//! the stream's own state. Every other request — and any this path does not take (`HTTP/1.0`, a
//! body, pipelined bytes, an oversized head) — goes to hyper with the bytes already read put
//! back in front ([`Rewind`]).
//!
//! What the stream path keeps from hyper's: a write blocked longer than the write timeout closes
//! the connection (as [`crate::net::stall`] does for hyper's), a peer that closes is noticed at once
//! (a read is pending beside every wait), and responses say `Connection: close` — a stream's end
//! is its connection's end.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, Uri, Version, header};
use axum::response::Response;
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::WriteHalf;

/// Routes whose `GET` is a stream.
pub const STREAM_PATHS: [&str; 6] = [
    "/v1/events/subscribe",
    "/api/v1/stream",
    "/stream",
    "/api/v1/flags/events",
    "/ofrep/v1/events",
    "/v1/sdk/stream",
];

/// Largest request head this path reads; a larger one goes to hyper (which allows 64 KiB).
const MAX_HEAD: usize = 16 * 1024;

/// Most headers a stream request may carry here (more: hyper's path).
const MAX_HEADERS: usize = 48;

/// What reading a request head found.
pub enum Head {
    /// A complete head, and every byte read so far (the head and anything after it).
    Complete(Vec<u8>),
    /// Not a complete head this path can parse (too large, malformed): hyper gets these bytes.
    Other(Vec<u8>),
    /// The peer closed (or failed) before sending a complete head.
    Closed,
}

/// Reads until the end of a request head (`\r\n\r\n`), at most `MAX_HEAD` bytes.
pub async fn read_head(stream: &mut TcpStream) -> Head {
    let mut buffer = Vec::with_capacity(1024);
    loop {
        if buffer.len() == buffer.capacity() {
            buffer.reserve(buffer.len().min(MAX_HEAD - buffer.len()));
        }
        match stream.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return Head::Closed,
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::Request::new(&mut headers).parse(&buffer) {
            Ok(httparse::Status::Complete(_)) => return Head::Complete(buffer),
            Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) | Err(_) => return Head::Other(buffer),
        }
    }
}

/// The request, if it is one this path serves: a `GET` of a stream route, HTTP/1.1, no body,
/// nothing after the head.
pub fn take(bytes: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(length) = parsed.parse(bytes).ok()? else { return None };
    let target = parsed.path?;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let streams = parsed.method == Some("GET") && parsed.version == Some(1) && STREAM_PATHS.contains(&path);
    if !streams || length != bytes.len() {
        return None;
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.version_mut() = Version::HTTP_11;
    *request.uri_mut() = target.parse::<Uri>().ok()?;
    let map = request.headers_mut();
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        if name == header::CONTENT_LENGTH && field.value != b"0" || name == header::TRANSFER_ENCODING {
            return None;
        }
        map.append(name, HeaderValue::from_bytes(field.value).ok()?);
    }
    Some(request)
}

/// A socket with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    /// `inner`, whose next reads yield `prefix` first.
    pub fn new(prefix: Vec<u8>, inner: T) -> Self {
        Self { prefix: Bytes::from(prefix), inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The response head, HTTP/1.1: its own headers plus `Date`, `Connection: close`, and
/// `Transfer-Encoding: chunked` unless the body's length is known.
fn head(response: &Response, length: Option<u64>) -> Vec<u8> {
    let status = response.status();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        if matches!(*name, header::CONNECTION | header::CONTENT_LENGTH | header::TRANSFER_ENCODING) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !response.headers().contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match length {
        Some(length) => out.extend_from_slice(format!("content-length: {length}\r\n").as_bytes()),
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

/// Writes every slice, failing if one write stays blocked longer than `timeout`. A write the
/// socket takes at once costs no timer: the timeout is armed only when the socket is full.
async fn write_all(writer: &mut WriteHalf<'_>, parts: &mut [&[u8]], timeout: Duration) -> io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        let mut slices = [IoSlice::new(&[]); 3];
        let count = (parts.len() - first).min(slices.len());
        for (slice, part) in slices.iter_mut().zip(&parts[first..first + count]) {
            *slice = IoSlice::new(part);
        }
        let written = match writer.try_write_vectored(&slices[..count]) {
            Ok(written) => written,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(timeout, writer.write_vectored(&slices[..count])).await {
                    Ok(result) => result?,
                    Err(_) => {
                        metrics::counter!("changegate_stalled_connections_closed_total").increment(1);
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"));
                    }
                }
            }
            Err(error) => return Err(error),
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while first < parts.len() && left >= parts[first].len() {
            left -= parts[first].len();
            first += 1;
        }
        if left > 0 {
            parts[first] = &parts[first][left..];
        }
    }
    Ok(())
}

/// A chunk's size line, `<hex>\r\n`, written into `buffer`.
fn chunk_size(mut size: usize, buffer: &mut [u8; 18]) -> &[u8] {
    let mut start = 16;
    loop {
        start -= 1;
        buffer[start] = b"0123456789abcdef"[size % 16];
        size /= 16;
        if size == 0 {
            break;
        }
    }
    buffer[16..].copy_from_slice(b"\r\n");
    &buffer[start..]
}

/// Writes `response` to `stream` and returns when it has ended (or the peer has gone).
pub async fn respond(mut stream: TcpStream, response: Response, write_timeout: Duration) {
    let length = axum::body::HttpBody::size_hint(response.body()).exact();
    let head = head(&response, length);
    let mut body = response.into_body();
    let (mut reader, mut writer) = stream.split();
    if write_all(&mut writer, &mut [&head], write_timeout).await.is_err() {
        return;
    }
    drop(head);
    // Bytes a client sends after its request are read and dropped; a read of 0 is the peer
    // closing, which ends the stream now rather than at the next failed heartbeat.
    let mut scratch = [0u8; 64];
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            read = reader.read(&mut scratch) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
        };
        let Some(Ok(frame)) = frame else { break };
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        let written = if length.is_some() {
            write_all(&mut writer, &mut [&data], write_timeout).await
        } else {
            let mut size = [0u8; 18];
            let size = chunk_size(data.len(), &mut size);
            write_all(&mut writer, &mut [size, &data, b"\r\n"], write_timeout).await
        };
        if written.is_err() {
            return;
        }
    }
    if length.is_none() && write_all(&mut writer, &mut [b"0\r\n\r\n"], write_timeout).await.is_err() {
        return;
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bodiless_http11_get_of_a_stream_route_is_taken() {
        let ok = b"GET /v1/events/subscribe?topic=a&apikey=k HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n\r\n";
        let request = take(ok).unwrap();
        assert_eq!(request.uri(), "/v1/events/subscribe?topic=a&apikey=k");
        assert_eq!(request.headers()["last-event-id"], "7");
        assert!(take(b"GET /stream HTTP/1.1\r\nContent-Length: 0\r\n\r\n").is_some());
        for other in [
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /v1/events/subscribe HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET /stream HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\n\r\n",
            b"GET /stream HTTP/1.1\r\nBad\x01Name: x\r\n\r\n",
            b"GET /stream HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert!(take(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn the_head_is_chunked_unless_the_length_is_known_and_always_closes() {
        let mut response = Response::new(Body::empty());
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let text = String::from_utf8(head(&response, None)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ndate: "), "{text}");
        assert!(text.ends_with("\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"), "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
        let text = String::from_utf8(head(&response, Some(12))).unwrap();
        assert!(text.ends_with("\r\ncontent-length: 12\r\nconnection: close\r\n\r\n"), "{text}");
    }

    #[test]
    fn chunk_sizes_are_hex_lines() {
        let mut buffer = [0u8; 18];
        for (size, line) in
            [(0, "0\r\n"), (10, "a\r\n"), (4096, "1000\r\n"), (usize::MAX, "ffffffffffffffff\r\n")]
        {
            assert_eq!(chunk_size(size, &mut buffer), line.as_bytes());
        }
    }

    #[tokio::test]
    async fn rewind_yields_the_prefix_first() {
        let mut rewound = Rewind::new(b"abc".to_vec(), &b"def"[..]);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "abcdef");
    }
}
