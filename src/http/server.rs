//! Serving a router on an already-bound listener, with the limits a shared
//! service in a 128 MiB pod needs:
//!
//! - TLS (optional): rustls, a configuration swapped on reload (new
//!   handshakes use the new files; open connections go on), a deadline on
//!   the handshake, the verified client certificate's SANs on every request.
//!   Cleartext sent to a TLS listener gets no HTTP answer.
//! - Connections: a cap per listener and per client address; when the
//!   listener is full, the oldest connection that never sent a complete
//!   request is evicted for the newcomer, so a crowd of idle or trickling
//!   connections can never keep a valid consumer out for long.
//! - Request heads: a deadline (which also closes idle keep-alive
//!   connections and slow-header clients) and a size cap that bounds each
//!   connection's read buffer.
//! - hyper's own rejections (bad framing, a head too large) are answered as
//!   problem+json like every other error, and counted.
//! - A bounded graceful drain on shutdown.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::tls::{ClientCertificate, HANDSHAKE_TIMEOUT, subject_alt_names};

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one client address at most.
    pub max_per_address: usize,
    /// A request head must arrive within this, and an idle keep-alive
    /// connection is closed after it.
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers) read; each
    /// connection's read buffer grows to this at most.
    pub max_header_bytes: usize,
    /// The longest in-flight requests get to finish after shutdown begins.
    pub drain_timeout: Duration,
}

/// The consumer API's caps, sized for the chart's 128 MiB: a connection
/// costs about 30 KiB at most (16 KiB head buffer, hyper's and rustls's
/// buffers), so 1024 of them stay near 30 MiB.
pub const API_MAX_CONNECTIONS: usize = 1024;
/// Engines behind one address (a node, a mesh sidecar) share this.
pub const API_MAX_PER_ADDRESS: usize = 512;
/// The admin listener serves a few scrapers and probes.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// hyper's smallest read buffer, and the largest head read: twice the API's
/// own limit ([`super::MAX_HEAD_BYTES`]), so that one answers 431 in
/// problem+json before this cuts off.
pub const MAX_HEAD_READ: usize = 16 * 1024;
/// File descriptors kept free of connections (files, sockets to Kraken and
/// the API server, the listeners themselves).
const RESERVED_FDS: u64 = 64;

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: API_MAX_CONNECTIONS,
            max_per_address: API_MAX_PER_ADDRESS,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: MAX_HEAD_READ,
            drain_timeout: Duration::from_secs(25),
        }
    }
}

impl ServerLimits {
    /// The same limits, sized for the admin listener.
    pub fn for_admin(self) -> Self {
        Self {
            max_connections: self.max_connections.min(ADMIN_MAX_CONNECTIONS),
            max_per_address: self.max_per_address.min(ADMIN_MAX_CONNECTIONS),
            ..self
        }
    }

    /// Caps that fit `open_files` descriptors, with the admin listener's
    /// share and a reserve left over.
    pub fn fitting(self, open_files: u64) -> Self {
        let room = open_files
            .saturating_sub(RESERVED_FDS + ADMIN_MAX_CONNECTIONS as u64)
            .max(16);
        let max_connections = self.max_connections.min(usize::try_from(room).unwrap_or(usize::MAX));
        Self {
            max_connections,
            max_per_address: self.max_per_address.min(max_connections),
            ..self
        }
    }
}

/// Raises the soft limit of open files to the hard one and returns it, so
/// the connection caps can be sized to what the process may really open.
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (current, hard) = (limit.current.unwrap_or(u64::MAX), limit.maximum);
    let wanted = hard.unwrap_or(1 << 20).min(1 << 20);
    if current < wanted {
        let raised = rustix::process::Rlimit {
            current: Some(wanted),
            maximum: hard,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return wanted;
        }
    }
    current
}

/// A listener to serve: its socket, its name for metrics and logs, and with
/// TLS, the server configuration new handshakes use.
pub struct Listener {
    pub name: &'static str,
    pub socket: TcpListener,
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

/// One open connection, as the registry knows it.
struct Entry {
    ip: IpAddr,
    opened: Instant,
    /// A complete request head arrived on it at least once.
    served: Arc<AtomicBool>,
    kill: CancellationToken,
}

/// The open connections of one listener.
#[derive(Default)]
struct Registry {
    entries: HashMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Registry {
    fn remove(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id)
            && let Some(n) = self.per_ip.get_mut(&entry.ip)
        {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&entry.ip);
            }
        }
    }

    /// The oldest connection (from `ip`, if given) that never sent a
    /// complete request: a valid consumer sends its head at once, an idle
    /// or trickling crowd never does.
    fn eviction_candidate(&self, ip: Option<IpAddr>) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.served.load(Ordering::Relaxed) && ip.is_none_or(|ip| e.ip == ip))
            .min_by_key(|(_, e)| e.opened)
            .map(|(id, _)| *id)
    }

    /// Makes room for a newcomer from `ip`: evicts a connection that never
    /// sent a request when a cap is reached; `Err` names the cap if none can go.
    fn admit(&mut self, ip: IpAddr, limits: &ServerLimits) -> Result<Option<CancellationToken>, &'static str> {
        let mut victim = None;
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= limits.max_per_address {
            victim = Some(self.eviction_candidate(Some(ip)).ok_or("per_address")?);
        } else if self.entries.len() >= limits.max_connections {
            victim = Some(self.eviction_candidate(None).ok_or("listener_full")?);
        }
        Ok(victim.and_then(|id| {
            let kill = self.entries.get(&id).map(|e| e.kill.clone());
            self.remove(id);
            kill
        }))
    }
}

/// Serves `router` until `shutdown` is cancelled, then stops accepting and
/// lets in-flight requests finish within `drain_timeout`.
pub async fn serve(
    listener: Listener,
    router: Router,
    shutdown: CancellationToken,
    limits: ServerLimits,
    metrics: Metrics,
) -> io::Result<()> {
    let local = listener.socket.local_addr()?;
    let name = listener.name;
    let graceful = GracefulShutdown::new();
    let registry = Arc::new(Mutex::new(Registry::default()));
    let open = metrics.connections_open(name);
    let next_id = AtomicU64::new(0);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));

    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.socket.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Out of file descriptors and the like: back off a moment.
                warn!(%error, listener = %local, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let served = Arc::new(AtomicBool::new(false));
        let kill = CancellationToken::new();
        {
            let mut reg = registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match reg.admit(peer.ip(), &limits) {
                Ok(None) => {}
                Ok(Some(evicted)) => {
                    evicted.cancel();
                    metrics.connection_refused(name, "evicted");
                }
                Err(cap) => {
                    drop(reg);
                    metrics.connection_refused(name, cap);
                    debug!(%peer, cap, "connection refused: at a connection cap, and every connection there is serving");
                    continue;
                }
            }
            *reg.per_ip.entry(peer.ip()).or_default() += 1;
            reg.entries.insert(
                id,
                Entry {
                    ip: peer.ip(),
                    opened: Instant::now(),
                    served: Arc::clone(&served),
                    kill: kill.clone(),
                },
            );
        }
        open.inc();
        let _ = stream.set_nodelay(true);
        let tls = listener.tls.as_ref().map(|t| t.load_full());
        let (router, http, graceful_watch) = (router.clone(), http.clone(), graceful.watcher());
        let (registry, metrics, open) = (Arc::clone(&registry), metrics.clone(), open.clone());
        tokio::spawn(async move {
            let conn = Connection {
                peer,
                served,
                router,
                http,
                metrics: metrics.clone(),
                listener: name,
            };
            tokio::select! {
                _ = conn.run(stream, tls, graceful_watch) => {}
                _ = kill.cancelled() => debug!(%peer, "connection evicted for a newcomer"),
            }
            registry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(id);
            open.dec();
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => info!(listener = %local, "drained"),
        _ = tokio::time::sleep(limits.drain_timeout) => {
            warn!(listener = %local, timeout = ?limits.drain_timeout, "drain timed out; closing remaining connections");
        }
    }
    Ok(())
}

/// One accepted connection.
struct Connection {
    peer: SocketAddr,
    served: Arc<AtomicBool>,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    metrics: Metrics,
    listener: &'static str,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        tls: Option<Arc<rustls::ServerConfig>>,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        match tls {
            None => self.http(stream, None, watcher).await,
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let cert = tls_stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|leaf| ClientCertificate {
                                sans: subject_alt_names(leaf).into(),
                            });
                        self.http(tls_stream, cert, watcher).await;
                    }
                    Ok(Err(error)) => {
                        debug!(%error, peer = %self.peer, "TLS handshake failed (cleartext sent to the TLS port, or a refused client certificate)");
                        self.metrics.connection_refused(self.listener, "tls_handshake");
                    }
                    Err(_) => {
                        debug!(peer = %self.peer, "TLS handshake stalled: cut off");
                        self.metrics.connection_refused(self.listener, "tls_handshake");
                    }
                }
            }
        }
    }

    async fn http<IO>(self, io: IO, cert: Option<ClientCertificate>, watcher: hyper_util::server::graceful::Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (peer, served, router, metrics) = (self.peer, self.served, self.router, self.metrics.clone());
        let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
            served.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            if let Some(cert) = &cert {
                request.extensions_mut().insert(cert.clone());
            }
            let refusal = host_refusal(&request);
            let (router, metrics) = (router.clone(), metrics.clone());
            async move {
                if let Some(detail) = refusal {
                    metrics
                        .request(super::route_label(request.uri().path()))
                        .record(400, 0.0);
                    let body = super::problem::problem_json(axum::http::StatusCode::BAD_REQUEST, detail);
                    let response = axum::http::Response::builder()
                        .status(400)
                        .header("content-type", super::problem::PROBLEM_JSON)
                        .header("cache-control", "no-store")
                        .body(axum::body::Body::from(body))
                        .expect("a static response is valid");
                    return Ok::<_, std::convert::Infallible>(response);
                }
                router.oneshot(request).await
            }
        });
        let io = AutoResponses::new(io, self.metrics.clone());
        let connection = self
            .http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
        if let Err(error) = watcher.watch(connection).await {
            debug!(%error, %peer, "connection ended with an error");
        }
    }
}

/// What HTTP/1.1 forbids and hyper lets through: no `Host`, or several
/// (RFC 9112 §3.2: a server must answer 400).
fn host_refusal<B>(request: &hyper::Request<B>) -> Option<&'static str> {
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
struct AutoResponses<IO> {
    inner: IO,
    metrics: Metrics,
    /// Our replacement and how much of it is written, once hyper starts an
    /// automatic answer; everything hyper writes after is swallowed.
    pending: Option<(Vec<u8>, usize)>,
}

impl<IO> AutoResponses<IO> {
    fn new(inner: IO, metrics: Metrics) -> Self {
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
    let body = super::problem::problem_json(code, detail);
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
            this.metrics.request("unmatched").record(status, 0.0);
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

    #[test]
    fn a_newcomer_evicts_the_oldest_connection_that_never_sent_a_request() {
        let limits = ServerLimits {
            max_connections: 3,
            max_per_address: 2,
            ..ServerLimits::default()
        };
        let mut reg = Registry::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let add = |reg: &mut Registry, id: u64, ip: IpAddr, served: bool| {
            let kill = CancellationToken::new();
            *reg.per_ip.entry(ip).or_default() += 1;
            reg.entries.insert(
                id,
                Entry {
                    ip,
                    opened: Instant::now() + Duration::from_millis(id),
                    served: Arc::new(AtomicBool::new(served)),
                    kill: kill.clone(),
                },
            );
            kill
        };
        let idle_a = add(&mut reg, 1, a, false);
        add(&mut reg, 2, a, true);
        // A third from `a`: its idle one goes.
        let evicted = reg.admit(a, &limits).unwrap().expect("one evicted");
        evicted.cancel();
        assert!(idle_a.is_cancelled());
        assert!(!reg.entries.contains_key(&1));
        add(&mut reg, 3, a, true);
        add(&mut reg, 4, b, true);
        // Full, and every connection serving: refused.
        assert_eq!(reg.admit(b, &limits).unwrap_err(), "listener_full");
        assert_eq!(reg.admit(a, &limits).unwrap_err(), "per_address");
    }

    #[test]
    fn caps_fit_the_open_file_limit() {
        let limits = ServerLimits::default();
        assert_eq!(limits.fitting(1 << 20).max_connections, API_MAX_CONNECTIONS);
        let tight = limits.fitting(1024);
        assert_eq!(tight.max_connections, 1024 - 64 - ADMIN_MAX_CONNECTIONS);
        assert!(tight.max_per_address <= tight.max_connections);
        assert_eq!(limits.for_admin().max_connections, ADMIN_MAX_CONNECTIONS);
    }
}
