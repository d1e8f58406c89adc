//! Bounds on what one connection may make the kernel hold for it: small
//! socket buffers, and a deadline on a write that makes no progress. A
//! client that pipelines requests and never reads the answers would
//! otherwise park up to the kernel's maximum (4 MiB here) of unsent answers
//! per connection, for as long as it likes, in socket memory the pod pays.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Each accepted socket's send buffer (the kernel doubles it for its own
/// accounting): an answer is under 1 KiB, a scrape of `/metrics` a few
/// writes of this.
pub const SEND_BUFFER: usize = 16 * 1024;
/// Each accepted socket's receive buffer: a request head is at most 16 KiB,
/// read in as many pieces as it takes.
pub const RECEIVE_BUFFER: usize = 16 * 1024;
/// How long a write may make no progress (the client reads nothing) before
/// the connection is closed.
pub const WRITE_STALL: Duration = Duration::from_secs(10);

/// Sets the socket's buffers to the sizes above (best effort: a kernel that
/// refuses keeps its own).
pub fn bound_buffers(stream: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(stream, SEND_BUFFER);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(stream, RECEIVE_BUFFER);
}

/// A stream whose writes fail once they have made no progress for `limit`.
pub struct WriteDeadline<IO> {
    inner: IO,
    limit: Duration,
    /// Armed while a write waits; disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(inner: IO, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes `poll` through; a `Pending` arms the deadline, a `Ready`
    /// disarms it, and a deadline passed is an error.
    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let deadline = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future as _;

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn a_peer_that_reads_nothing_fails_the_write_after_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        bound_buffers(&server);
        let mut guarded = WriteDeadline::new(server, Duration::from_millis(300));
        let chunk = vec![0u8; 64 * 1024];
        let started = std::time::Instant::now();
        let mut written = 0usize;
        let error = loop {
            match guarded.write(&chunk).await {
                Ok(n) => written += n,
                Err(e) => break e,
            }
            assert!(started.elapsed() < Duration::from_secs(10), "never stalled");
        };
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(written < 8 * 1024 * 1024, "the kernel held {written} bytes at most");
        drop(peer);
    }
}
