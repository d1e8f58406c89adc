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
//! - Each connection's slot is held by a guard (`Slot`), given back
//!   however its task ends, a panic included.
//! - Request heads: a deadline (which also closes idle keep-alive
//!   connections and slow-header clients) and a size cap that bounds each
//!   connection's read buffer.
//! - hyper's own rejections (bad framing, a head too large) are answered as
//!   problem+json like every other error, and counted.
//! - A bounded graceful drain on shutdown.

mod caps;
mod handshakes;
mod registry;
mod rewrite;
mod stall;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

pub use caps::{
    ADMIN_MAX_CONNECTIONS, ADMIN_MAX_PER_ADDRESS, API_MAX_CONNECTIONS, API_MAX_PER_ADDRESS, MAX_HEAD_READ,
    ServerLimits, raise_open_files_limit,
};
pub use registry::{ProvenConnections, Standing};

use super::address::AddressGroup;
use crate::identity::ClientCertificate;
use crate::metrics::{ConnectionRefusal, ListenerName, Metrics, Route};
use crate::tls::HANDSHAKE_TIMEOUT;
use registry::{Entry, Registry, Slot};
use rewrite::{AutoResponses, host_refusal};

/// A listener to serve: its socket, its name for metrics and logs, and with
/// TLS, the server configuration new handshakes use.
pub struct Listener {
    pub name: ListenerName,
    pub socket: TcpListener,
    pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

/// What every connection of a listener shares.
struct Shared {
    handshakes: Arc<handshakes::Handshakes>,
    name: ListenerName,
    registry: Arc<Mutex<Registry>>,
    limits: ServerLimits,
    open: prometheus::IntGauge,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    metrics: Metrics,
}

impl Shared {
    /// A place for a newcomer from `peer` (a connection evicted for it if a
    /// cap was reached); `None` when every connection there has proven an
    /// identity.
    fn admit(&self, peer: SocketAddr, id: u64) -> Option<(Slot, Standing, CancellationToken)> {
        let group = AddressGroup::of(peer.ip());
        let mut reg = Slot::lock(&self.registry);
        match reg.admit(group, &self.limits) {
            Ok(None) => {}
            Ok(Some(evicted)) => {
                evicted.cancel();
                self.metrics
                    .http()
                    .connection_refused(self.name, ConnectionRefusal::Evicted);
            }
            Err(full) => {
                drop(reg);
                self.metrics.http().connection_refused(self.name, full.refusal());
                debug!(%peer, cap = full.refusal().as_str(), "connection refused: at a connection cap, and every connection there has proven an identity");
                return None;
            }
        }
        let standing = Standing::new(self.limits.max_proven_per_consumer);
        let kill = CancellationToken::new();
        let entry = Entry {
            group,
            opened: Instant::now(),
            standing: standing.clone(),
            kill: kill.clone(),
        };
        reg.insert(id, entry);
        self.open.inc();
        let slot = Slot {
            registry: Arc::clone(&self.registry),
            id,
            open: self.open.clone(),
        };
        Some((slot, standing, kill))
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
    let graceful = Drain::default();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let shared = Shared {
        handshakes: handshakes::Handshakes::new(handshakes::MAX_HANDSHAKES, handshakes::HANDSHAKES_PER_ADDRESS),
        name: listener.name,
        registry: Arc::new(Mutex::new(Registry::default())),
        limits,
        open: metrics.http().connections_open(listener.name),
        router,
        http,
        metrics,
    };
    let mut next_id = 0u64;
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
        let Some((slot, standing, kill)) = shared.admit(peer, next_id) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        stall::bound_buffers(&stream);
        let tls = listener.tls.as_ref().map(|t| t.load_full());
        let conn = Connection {
            handshakes: Arc::clone(&shared.handshakes),
            write_stall: shared.limits.write_stall,
            peer,
            standing,
            router: shared.router.clone(),
            http: shared.http.clone(),
            metrics: shared.metrics.clone(),
            listener: shared.name,
        };
        let graceful_watch = graceful.watch();
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
        () = graceful.shutdown() => info!(listener = %local, "drained"),
        _ = tokio::time::sleep(limits.drain_timeout) => {
            warn!(listener = %local, timeout = ?limits.drain_timeout, "drain timed out; closing remaining connections");
        }
    }
    Ok(())
}

/// One accepted connection.
struct Connection {
    handshakes: Arc<handshakes::Handshakes>,
    write_stall: Duration,
    peer: SocketAddr,
    standing: Standing,
    router: Router,
    http: hyper::server::conn::http1::Builder,
    metrics: Metrics,
    listener: ListenerName,
}

impl Connection {
    async fn run(self, stream: TcpStream, tls: Option<Arc<rustls::ServerConfig>>, watcher: DrainWatch) {
        let stream = stall::WriteDeadline::new(stream, self.write_stall);
        let Some(config) = tls else {
            return self.http(stream, None, watcher).await;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let group = AddressGroup::of(self.peer.ip());
        let handshake = async {
            // A turn first (waiting for one counts against the deadline).
            let Some(turn) = self.handshakes.turn(group).await else {
                return Err(std::io::Error::other("too many handshakes under way from this address"));
            };
            let accepted = acceptor.accept(stream).await;
            drop(turn);
            accepted
        };
        let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
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

    async fn http<IO>(self, io: IO, cert: Option<ClientCertificate>, watcher: DrainWatch)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (peer, standing, router, metrics) = (self.peer, self.standing, self.router, self.metrics.clone());
        let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
            // The connection keeps its standing while this request is
            // handled, and takes what the request proved once answered.
            let this_request = standing.for_request();
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request.extensions_mut().insert(this_request.clone());
            if let Some(cert) = &cert {
                request.extensions_mut().insert(cert.clone());
            }
            let refusal = host_refusal(&request);
            let (router, metrics) = (router.clone(), metrics.clone());
            async move {
                let _settle = Settle(this_request);
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
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            // GET /v1/relay takes the connection over as a WebSocket.
            .with_upgrades();
        if let Err(error) = watcher.watch(connection).await {
            debug!(%error, %peer, "connection ended with an error");
        }
    }
}

/// The graceful drain of a listener's connections: on shutdown each is told
/// to finish its request under way and close; the drain ends when all have.
/// (hyper-util's `GracefulShutdown` does this for connections that cannot
/// be upgraded; a relay's must be.)
#[derive(Default)]
struct Drain {
    draining: CancellationToken,
    open: tokio_util::task::TaskTracker,
}

impl Drain {
    fn watch(&self) -> DrainWatch {
        DrainWatch {
            draining: self.draining.clone(),
            _open: self.open.token(),
        }
    }

    /// Tells every connection to finish, and waits for them.
    async fn shutdown(self) {
        self.draining.cancel();
        self.open.close();
        self.open.wait().await;
    }
}

/// One connection's part in the drain (counted until dropped).
struct DrainWatch {
    draining: CancellationToken,
    _open: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl DrainWatch {
    /// Serves `connection`; on shutdown, lets its request under way finish.
    async fn watch<I, S, B>(
        self,
        connection: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    ) -> hyper::Result<()>
    where
        S: hyper::service::HttpService<Incoming, ResBody = B>,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        B: hyper::body::Body + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => result,
            () = self.draining.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        }
    }
}

/// Sleeps for `left`, or forever if that is past what the clock can hold.
/// Settles a connection's standing from what its request proved, when the
/// request is answered (or abandoned).
struct Settle(Standing);

impl Drop for Settle {
    fn drop(&mut self) {
        self.0.settle();
    }
}

async fn sleep_for(left: Duration) {
    match Instant::now().checked_add(left) {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
