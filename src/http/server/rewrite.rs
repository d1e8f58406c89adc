//! What hyper does not do as this service answers: a request HTTP/1.1
//! forbids that hyper lets through, and hyper's own bare error answers,
//! rewritten into problem+json and counted.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{Metrics, Route};

/// What HTTP/1.1 forbids and hyper lets through: no `Host`, or several
/// (RFC 9112 §3.2: a server must answer 400).
pub(super) fn host_refusal<B>(request: &hyper::Request<B>) -> Option<&'static str> {
    let hosts = request.headers().get_all(hyper::header::HOST).iter().count();
    match (request.version(), hosts) {
        (hyper::Version::HTTP_11, 0) => Some("an HTTP/1.1 request needs a Host header"),
        (_, 2..) => Some("send one Host header, not several"),
        _ => None,
    }
}

/// Rewrites hyper's automatic answers to requests it cannot parse (a bare
/// status with an empty body: 400 for bad framing, 431 for a head too large,
/// 414) into problem+json, and counts them as requests of the `unmatched`
/// route. Every response of this project's routers carries a
/// `Content-Type`; hyper's automatic ones never do: that is how they are told.
pub(super) struct AutoResponses<IO> {
    inner: IO,
    metrics: Metrics,
    /// Our replacement and how much of it is written, once hyper starts an
    /// automatic answer; everything hyper writes after is swallowed.
    pending: Option<(Vec<u8>, usize)>,
}

impl<IO> AutoResponses<IO> {
    pub(super) fn new(inner: IO, metrics: Metrics) -> Self {
        Self {
            inner,
            metrics,
            pending: None,
        }
    }
}

/// The status of a response head hyper made by itself, if `buf` starts one.
fn automatic_status(buf: &[u8]) -> Option<u16> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ")?;
    // An interim answer (`100 Continue` to `Expect: 100-continue`) is hyper
    // doing its job, not refusing: it passes as it is.
    if rest.first().is_none_or(|b| !matches!(b, b'4' | b'5')) {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &buf[..end];
    let has_type = head
        .split(|b| *b == b'\n')
        .any(|line| line.len() > 13 && line[..13].eq_ignore_ascii_case(b"content-type:"));
    if has_type {
        return None;
    }
    std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()
}

fn problem_response(status: u16) -> Vec<u8> {
    let code = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::BAD_REQUEST);
    let detail = match status {
        431 => "the request's target and headers are too large",
        414 => "the request target is too long",
        _ => "the request could not be parsed as HTTP/1.1",
    };
    let body = crate::http::problem::problem_json(code, detail);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        code.as_u16(),
        code.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl<IO: AsyncRead + Unpin> AsyncRead for AutoResponses<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AutoResponses<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none()
            && let Some(status) = automatic_status(buf)
        {
            this.metrics.http().request(Route::Unmatched).record(status, 0.0);
            this.pending = Some((problem_response(status), 0));
        }
        if let Some((bytes, written)) = this.pending.as_mut() {
            while *written < bytes.len() {
                match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => *written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // hyper's bytes are replaced by ours, whatever it writes.
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_automatic_answers_are_told_from_ours() {
        assert_eq!(
            automatic_status(b"HTTP/1.1 100 Continue\r\n\r\n"),
            None,
            "an interim answer passes"
        );
        assert_eq!(
            automatic_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n"),
            Some(431)
        );
        assert_eq!(
            automatic_status(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\n\r\n{}"),
            None
        );
        assert_eq!(automatic_status(b"{\"token\":1}"), None);
        let ours = String::from_utf8(problem_response(400)).unwrap();
        assert!(ours.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(ours.contains("application/problem+json"));
        let body = ours.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(
            ours.lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse::<usize>()
                .unwrap(),
            body.len()
        );
    }
}
