//! Connections whose peer stopped reading are closed after a write timeout.
//!
//! A subscriber that never reads cannot be told anything — its socket buffer is full, so not
//! even the slow-consumer `retry:` hint gets through — and hyper has no write timeout of its
//! own. Every accepted socket is therefore wrapped: a write that stays blocked longer than the
//! timeout fails the connection, which frees it (the client reconnects with `Last-Event-ID` if
//! it is still there). This is also how dead peers are noticed: heartbeats fill the socket
//! buffer of a peer that vanished without a FIN, and the next blocked write times out.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// A socket that fails a write blocked for longer than its timeout.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    timeout: Duration,
    /// Set while a write is blocked: when it must have made progress.
    blocked: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    /// Wraps an accepted socket.
    pub fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self { stream, timeout, blocked: None }
    }

    fn guard<T>(&mut self, cx: &mut Context<'_>, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.blocked = None;
            return result;
        }
        let timeout = self.timeout;
        let deadline =
            self.blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                metrics::counter!("changegate_stalled_connections_closed_total").increment(1);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.guard(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.guard(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.stream).poll_flush(cx);
        self.guard(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
