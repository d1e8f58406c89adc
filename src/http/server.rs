//! Serving a router on an already-bound listener, with the limits a shared
//! service in a 128 MiB pod needs:
//!
//! - TLS (optional): rustls, a configuration swapped on reload (new
//!   handshakes use the new files; open connections go on), a deadline on
//!   the handshake, the verified client certificate's SANs on every request.
//!   Cleartext sent to a TLS listener gets no HTTP answer. A client
//!   certificate's expiry is checked on every connection (a resumed session
//!   skips verification) and ends the connection when it passes.
//! - Connections: a cap per listener and per client address (an IPv4
//!   address or an IPv6 /64). A connection whose last request proved a
//!   consumer's identity is never evicted; any other may be, for a
//!   newcomer: at the address's own cap, its oldest; at the listener's cap,
//!   the oldest of the address holding the most. So a crowd, however many
//!   requests it sends, never keeps a consumer from another address out,
//!   nor a probe out of the admin listener.
//! - Each connection's slot is held by a guard ([`Slot`]), given back
//!   however its task ends, a panic included.
//! - Request heads: a deadline (which also closes idle keep-alive
//!   connections and slow-header clients) and a size cap that bounds each
//!   connection's read buffer.
//! - hyper's own rejections (bad framing, a head too large) are answered as
//!   problem+json like every other error, and counted.
//! - A bounded graceful drain on shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use super::address::AddressGroup;
use crate::identity::ClientCertificate;
use crate::metrics::{ConnectionRefusal, ListenerName, Metrics, Route};
use crate::tls::HANDSHAKE_TIMEOUT;

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
/// One address's share of the admin listener: a kubelet probes from its
/// node's address and Prometheus scrapes from its own, each with a
/// connection or two, so no one address may take more than a quarter.
pub const ADMIN_MAX_PER_ADDRESS: usize = 16;
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
            max_per_address: self.max_per_address.min(ADMIN_MAX_PER_ADDRESS),
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
    pub name: ListenerName,
    pub socket: TcpListener,
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

/// How a connection stands, carried on each of its requests: whether the
/// last request on it proved a consumer's identity. A proven connection is
/// never evicted for a newcomer; any other is (an unauthenticated request,
/// a 404, a refused credential: what a stranger holding slots sends).
#[derive(Debug, Clone, Default)]
pub struct Standing(Arc<AtomicBool>);

impl Standing {
    /// Records whether the request now answered proved an identity.
    pub fn set_proven(&self, proven: bool) {
        self.0.store(proven, Ordering::Relaxed);
    }

    pub fn proven(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One open connection, as the registry knows it.
struct Entry {
    group: AddressGroup,
    opened: Instant,
    standing: Standing,
    kill: CancellationToken,
}

/// Why a newcomer was turned away at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    /// Every connection of the listener is proven.
    Listener,
    /// Every connection of the newcomer's address is proven.
    Address,
}

impl Full {
    fn refusal(self) -> ConnectionRefusal {
        match self {
            Full::Listener => ConnectionRefusal::ListenerFull,
            Full::Address => ConnectionRefusal::PerAddress,
        }
    }
}

/// The open connections of one listener.
#[derive(Default)]
struct Registry {
    entries: HashMap<u64, Entry>,
    per_group: HashMap<AddressGroup, usize>,
}

impl Registry {
    fn insert(&mut self, id: u64, entry: Entry) {
        *self.per_group.entry(entry.group).or_default() += 1;
        self.entries.insert(id, entry);
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        if let Some(n) = self.per_group.get_mut(&entry.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_group.remove(&entry.group);
            }
        }
        Some(entry)
    }

    /// The oldest unproven connection of `group`.
    fn oldest_unproven(&self, group: AddressGroup) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| e.group == group && !e.standing.proven())
            .min_by_key(|(_, e)| e.opened)
            .map(|(id, _)| *id)
    }

    /// The connection to evict when the listener is full: the oldest
    /// unproven one of the address holding the most unproven connections,
    /// so a crowd pays for a newcomer from elsewhere, never the few
    /// connections of a quiet address.
    fn eviction_candidate(&self) -> Option<u64> {
        let mut unproven: HashMap<AddressGroup, usize> = HashMap::new();
        for entry in self.entries.values().filter(|e| !e.standing.proven()) {
            *unproven.entry(entry.group).or_default() += 1;
        }
        let (group, _) = unproven.into_iter().max_by_key(|(group, n)| (*n, *group))?;
        self.oldest_unproven(group)
    }

    /// Makes room for a newcomer from `group`: evicts an unproven connection
    /// when a cap is reached (the newcomer's address's own, or else the
    /// listener's); refuses the newcomer when none can go.
    fn admit(&mut self, group: AddressGroup, limits: &ServerLimits) -> Result<Option<CancellationToken>, Full> {
        let victim = if self.per_group.get(&group).copied().unwrap_or(0) >= limits.max_per_address {
            Some(self.oldest_unproven(group).ok_or(Full::Address)?)
        } else if self.entries.len() >= limits.max_connections {
            Some(self.eviction_candidate().ok_or(Full::Listener)?)
        } else {
            None
        };
        Ok(victim.and_then(|id| self.remove(id)).map(|entry| entry.kill))
    }
}

/// A connection's place in the registry and the open-connections gauge,
/// given back when the connection task ends however it ends (a panic in it
/// included: tokio drops a panicked task's future, and this with it).
struct Slot {
    registry: Arc<Mutex<Registry>>,
    id: u64,
    open: IntGauge,
}

impl Slot {
    fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
        registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        Self::lock(&self.registry).remove(self.id);
        self.open.dec();
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
    let open = metrics.http().connections_open(name);
    let mut next_id = 0u64;
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
        next_id = next_id.wrapping_add(1);
        let id = next_id;
        let standing = Standing::default();
        let kill = CancellationToken::new();
        let group = AddressGroup::of(peer.ip());
        {
            let mut reg = Slot::lock(&registry);
            match reg.admit(group, &limits) {
                Ok(None) => {}
                Ok(Some(evicted)) => {
                    evicted.cancel();
                    metrics.http().connection_refused(name, ConnectionRefusal::Evicted);
                }
                Err(full) => {
                    drop(reg);
                    metrics.http().connection_refused(name, full.refusal());
                    debug!(%peer, cap = full.refusal().as_str(), "connection refused: at a connection cap, and every connection there has proven an identity");
                    continue;
                }
            }
            reg.insert(
                id,
                Entry {
                    group,
                    opened: Instant::now(),
                    standing: standing.clone(),
                    kill: kill.clone(),
                },
            );
        }
        open.inc();
        let slot = Slot {
            registry: Arc::clone(&registry),
            id,
            open: open.clone(),
        };
        let _ = stream.set_nodelay(true);
        let tls = listener.tls.as_ref().map(|t| t.load_full());
        let conn = Connection {
            peer,
            standing,
            router: router.clone(),
            http: http.clone(),
            metrics: metrics.clone(),
            listener: name,
        };
        let graceful_watch = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = conn.run(stream, tls, graceful_watch) => {}
                _ = kill.cancelled() => debug!(%peer, "connection evicted for a newcomer"),
            }
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
    standing: Standing,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    metrics: Metrics,
    listener: ListenerName,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        tls: Option<Arc<rustls::ServerConfig>>,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let Some(config) = tls else {
            return self.http(stream, None, watcher).await;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => tls_stream,
            Ok(Err(error)) => {
                debug!(%error, peer = %self.peer, "TLS handshake failed (cleartext sent to the TLS port, or a refused client certificate)");
                return self.refuse(ConnectionRefusal::TlsHandshake);
            }
            Err(_) => {
                debug!(peer = %self.peer, "TLS handshake stalled: cut off");
                return self.refuse(ConnectionRefusal::TlsHandshake);
            }
        };
        let cert = tls_stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(ClientCertificate::from_chain);
        let Some(cert) = cert else {
            return self.http(tls_stream, None, watcher).await;
        };
        // A resumed session skips certificate verification: its expiry is
        // checked here for every connection, and the connection ends when
        // the certificate does (expiry is the only revocation there is).
        let Some(left) = cert.time_left(SystemTime::now()) else {
            debug!(peer = %self.peer, "client certificate expired (a resumed session?): connection refused");
            return self.refuse(ConnectionRefusal::CertificateExpired);
        };
        let (peer, metrics, listener) = (self.peer, self.metrics.clone(), self.listener);
        tokio::select! {
            () = self.http(tls_stream, Some(cert), watcher) => {}
            () = sleep_for(left) => {
                debug!(%peer, "client certificate expired: connection ended");
                metrics.http().connection_refused(listener, ConnectionRefusal::CertificateExpired);
            }
        }
    }

    fn refuse(&self, why: ConnectionRefusal) {
        self.metrics.http().connection_refused(self.listener, why);
    }

    async fn http<IO>(self, io: IO, cert: Option<ClientCertificate>, watcher: hyper_util::server::graceful::Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (peer, standing, router, metrics) = (self.peer, self.standing, self.router, self.metrics.clone());
        let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
            // Unproven until this request proves an identity.
            standing.set_proven(false);
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request.extensions_mut().insert(standing.clone());
            if let Some(cert) = &cert {
                request.extensions_mut().insert(cert.clone());
            }
            let refusal = host_refusal(&request);
            let (router, metrics) = (router.clone(), metrics.clone());
            async move {
                if let Some(detail) = refusal {
                    metrics
                        .http()
                        .request(Route::of_path(request.uri().path()))
                        .record(400, 0.0);
                    let body = super::problem::problem_json(axum::http::StatusCode::BAD_REQUEST, detail);
                    let response = axum::http::Response::builder()
                        .status(400)
                        .header("content-type", super::problem::PROBLEM_JSON)
                        .header("cache-control", "no-store")
                        .body(axum::body::Body::from(body))
                        .unwrap_or_default();
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

/// Sleeps for `left`, or forever if that is past what the clock can hold.
async fn sleep_for(left: Duration) {
    match Instant::now().checked_add(left) {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
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

    fn entry(id: u64, group: AddressGroup, proven: bool) -> (Entry, CancellationToken) {
        let kill = CancellationToken::new();
        let standing = Standing::default();
        standing.set_proven(proven);
        let entry = Entry {
            group,
            opened: Instant::now() + Duration::from_millis(id),
            standing,
            kill: kill.clone(),
        };
        (entry, kill)
    }

    fn add(reg: &mut Registry, id: u64, group: AddressGroup, proven: bool) -> CancellationToken {
        let (entry, kill) = entry(id, group, proven);
        reg.insert(id, entry);
        kill
    }

    fn group(ip: &str) -> AddressGroup {
        AddressGroup::of(ip.parse().unwrap())
    }

    #[test]
    fn a_newcomer_evicts_an_unproven_connection_and_never_a_proven_one() {
        let limits = ServerLimits {
            max_connections: 3,
            max_per_address: 2,
            ..ServerLimits::default()
        };
        let mut reg = Registry::default();
        let (a, b) = (group("10.0.0.1"), group("10.0.0.2"));
        let unproven_a = add(&mut reg, 1, a, false);
        add(&mut reg, 2, a, true);
        // A third from `a`: its unproven one goes.
        let evicted = reg.admit(a, &limits).unwrap().expect("one evicted");
        evicted.cancel();
        assert!(unproven_a.is_cancelled());
        assert!(!reg.entries.contains_key(&1));
        add(&mut reg, 3, a, true);
        add(&mut reg, 4, b, true);
        // Full, and every connection proven: refused.
        assert_eq!(reg.admit(b, &limits).unwrap_err(), Full::Listener);
        assert_eq!(reg.admit(a, &limits).unwrap_err(), Full::Address);
        assert_eq!(reg.per_group[&a], 2);
    }

    #[test]
    fn at_the_listeners_cap_the_address_holding_the_most_pays() {
        let limits = ServerLimits {
            max_connections: 10,
            max_per_address: 10,
            ..ServerLimits::default()
        };
        let mut reg = Registry::default();
        let (crowd, quiet, newcomer) = (group("10.0.0.9"), group("10.0.0.1"), group("10.0.0.2"));
        // The quiet address's connection is the oldest of all, and unproven.
        let quiet_kill = add(&mut reg, 0, quiet, false);
        let crowd_kills: Vec<_> = (1..10).map(|id| add(&mut reg, id, crowd, false)).collect();
        let evicted = reg.admit(newcomer, &limits).unwrap().expect("one evicted");
        evicted.cancel();
        assert!(!quiet_kill.is_cancelled(), "the quiet address keeps its connection");
        assert!(crowd_kills[0].is_cancelled(), "the crowd's oldest goes");
        assert_eq!(reg.per_group[&crowd], 8);
    }

    #[test]
    fn every_slot_is_given_back_however_the_task_ends() {
        let registry = Arc::new(Mutex::new(Registry::default()));
        let open = IntGauge::new("open", "open").unwrap();
        let limits = ServerLimits {
            max_connections: 1,
            max_per_address: 1,
            ..ServerLimits::default()
        };
        for id in 0..3u64 {
            {
                let mut reg = Slot::lock(&registry);
                assert!(
                    matches!(reg.admit(group("10.0.0.1"), &limits), Ok(None)),
                    "the slot is free again"
                );
                let (e, _) = entry(id, group("10.0.0.1"), true);
                reg.insert(id, e);
            }
            open.inc();
            let slot = Slot {
                registry: Arc::clone(&registry),
                id,
                open: open.clone(),
            };
            // A task that panics while holding its slot.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                let _slot = slot;
                panic!("a bug in a connection task");
            }));
            assert!(outcome.is_err());
            assert_eq!(open.get(), 0);
            assert!(Slot::lock(&registry).entries.is_empty());
        }
    }

    async fn forced_panic() -> &'static str {
        panic!("forced, by the test")
    }

    #[tokio::test]
    async fn a_handler_that_panics_never_keeps_a_connection_slot() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let router = Router::new()
            .route("/panic", axum::routing::get(forced_panic))
            .route("/ok", axum::routing::get(|| async { "ok" }));
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let metrics = Metrics::new();
        let limits = ServerLimits {
            max_connections: 2,
            max_per_address: 2,
            ..ServerLimits::default()
        };
        let shutdown = CancellationToken::new();
        let listener = Listener {
            name: ListenerName::Api,
            socket,
            tls: None,
        };
        let server = tokio::spawn(serve(listener, router, shutdown.clone(), limits, metrics.clone()));
        let open = metrics.http().connections_open(ListenerName::Api);
        async fn ask(addr: SocketAddr, path: &str) -> String {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        }
        // Ten times the cap in panicking requests: each kills its task.
        for _ in 0..20 {
            let answer = ask(addr, "/panic").await;
            assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while open.get() != 0 {
            assert!(Instant::now() < deadline, "{} slots still held", open.get());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            ask(addr, "/ok").await.starts_with("HTTP/1.1 200"),
            "served after the panics"
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn caps_fit_the_open_file_limit() {
        let limits = ServerLimits::default();
        assert_eq!(limits.fitting(1 << 20).max_connections, API_MAX_CONNECTIONS);
        let tight = limits.fitting(1024);
        assert_eq!(tight.max_connections, 1024 - 64 - ADMIN_MAX_CONNECTIONS);
        assert!(tight.max_per_address <= tight.max_connections);
        assert_eq!(limits.for_admin().max_connections, ADMIN_MAX_CONNECTIONS);
        assert_eq!(limits.for_admin().max_per_address, ADMIN_MAX_PER_ADDRESS);
    }
}
