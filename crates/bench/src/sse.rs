//! A minimal SSE client over a raw TCP socket: thousands of these must cost the load generator
//! little, so it reads lines, not JSON, and keeps only counts, latencies and the last id.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Events received.
    pub events: u64,
    /// Publish/commit → receive, in microseconds, for events that carried `"t":<µs>`.
    pub latencies_us: Vec<u64>,
    /// The last `id:` seen.
    pub last_id: Option<String>,
    /// Events whose data named a tenant other than the expected one.
    pub foreign: u64,
    /// Whether the server ended the stream (e.g. a slow-consumer cut).
    pub ended_by_server: bool,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(0))
}

/// Where and how one client connects.
pub struct Target<'a> {
    /// The gateway.
    pub server: SocketAddr,
    /// The client's source address.
    pub local: IpAddr,
    /// Path and query.
    pub path: &'a str,
    /// Sent in the `apikey` header (empty: none).
    pub key: &'a str,
    /// Sent as `Last-Event-ID`.
    pub last_id: Option<&'a str>,
}

/// What the client checks and when it stops by itself.
#[derive(Default)]
pub struct Expect {
    /// Count events whose data does not name this tenant.
    pub tenant: Option<String>,
    /// Stop after this many events.
    pub until: Option<u64>,
}

/// Connects, sends the request, and waits for the response head; then reads in a task until
/// `stop` turns true, the expected number of events arrived, or the server ends the stream.
pub async fn open(
    target: Target<'_>,
    expect: Expect,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<Seen>> {
    let Target { server, local, path, key, last_id } = target;
    let Expect { tenant: expect_tenant, until } = expect;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    let mut stream: TcpStream = socket.connect(server).await?;
    let resume = last_id.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
    let auth = if key.is_empty() { String::new() } else { format!("apikey: {key}\r\n") };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n{auth}{resume}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buffer = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the response head"));
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buffer.starts_with(b"HTTP/1.1 200") {
                return Err(std::io::Error::other(String::from_utf8_lossy(&buffer[..end]).into_owned()));
            }
            buffer.drain(..end + 4);
            break;
        }
    }
    Ok(tokio::spawn(async move {
        let mut seen = Seen::default();
        let tenant_marker = expect_tenant.map(|t| format!("\"tenant\":\"{t}\""));
        loop {
            consume(&mut buffer, &mut seen, tenant_marker.as_deref());
            if until.is_some_and(|n| seen.events >= n) {
                return seen;
            }
            tokio::select! {
                read = stream.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => {
                        seen.ended_by_server = true;
                        return seen;
                    }
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                },
                _ = stop.changed() => return seen,
            }
        }
    }))
}

/// Processes every complete line in `buffer`. Chunked-encoding size lines are not SSE fields
/// and fall through harmlessly.
fn consume(buffer: &mut Vec<u8>, seen: &mut Seen, tenant_marker: Option<&str>) {
    let mut start = 0;
    while let Some(offset) = buffer[start..].iter().position(|&b| b == b'\n') {
        let line = &buffer[start..start + offset];
        if let Some(id) = line.strip_prefix(b"id: ") {
            seen.last_id = Some(String::from_utf8_lossy(id).into_owned());
        } else if let Some(data) = line.strip_prefix(b"data: ") {
            seen.events += 1;
            if let Some(t) = field_u64(data, b"\"t\":") {
                seen.latencies_us.push(now_us().saturating_sub(t));
            }
            if let Some(marker) = tenant_marker
                && !data.windows(marker.len()).any(|w| w == marker.as_bytes())
            {
                seen.foreign += 1;
            }
        }
        start += offset + 1;
    }
    buffer.drain(..start);
}

fn field_u64(data: &[u8], name: &[u8]) -> Option<u64> {
    let at = data.windows(name.len()).position(|w| w == name)? + name.len();
    // JSON allows whitespace after the colon (PostgreSQL's jsonb text has a space there).
    let digits: Vec<u8> = data[at..]
        .iter()
        .copied()
        .skip_while(u8::is_ascii_whitespace)
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}
