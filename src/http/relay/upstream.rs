//! The relay's connection to Kraken's WebSocket (`[kraken] ws_url`): TCP,
//! TLS verified against the system's CA bundle for `wss://`, then the
//! WebSocket handshake, all within [`CONNECT_TIMEOUT`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How long opening the connection to Kraken may take, all steps together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message read from Kraken. Kraken documents no maximum; a
/// `book` snapshot of depth 1000 is the largest message we know of (about
/// 100 KiB), so this leaves room without letting one message grow the pod.
pub const MAX_KRAKEN_MESSAGE: usize = 4 * 1024 * 1024;
/// Each read from Kraken's socket (the buffer grows only for a larger
/// message, and each relay connection has one).
pub const READ_BUFFER: usize = 8 * 1024;

/// Any stream the WebSocket runs over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type KrakenSocket = WebSocketStream<Box<dyn Io>>;

/// Why Kraken's WebSocket could not be opened (no secret in any of it).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("`{0}` is not a ws:// or wss:// URL with a host")]
    Url(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("TCP: {0}")]
    Tcp(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("WebSocket handshake: {0}")]
    Handshake(String),
}

/// The client TLS configuration, built once: the system's CA bundle, the
/// process's crypto provider.
fn client_tls() -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no CA certificates found on this system (is ca-certificates installed?)".to_owned());
            }
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
        .map_err(ConnectError::Tls)
}

/// Opens a WebSocket to `url` (`ws://` or `wss://`).
pub async fn connect(url: &str) -> Result<KrakenSocket, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, open(url))
        .await
        .map_err(|_| ConnectError::Timeout(CONNECT_TIMEOUT))?
}

async fn open(url: &str) -> Result<KrakenSocket, ConnectError> {
    let bad = || ConnectError::Url(url.to_owned());
    let uri: axum::http::Uri = url.parse().map_err(|_| bad())?;
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => return Err(bad()),
    };
    let host = uri.host().ok_or_else(bad)?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    // An IPv6 literal comes bracketed in a URL, not in a socket address.
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let tcp = TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(ConnectError::Tcp)?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if tls {
        let name = rustls_pki_types::ServerName::try_from(bare).map_err(|_| bad())?;
        let connector = tokio_rustls::TlsConnector::from(client_tls()?);
        Box::new(
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Tls(e.to_string()))?,
        )
    } else {
        Box::new(tcp)
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_KRAKEN_MESSAGE))
        .max_frame_size(Some(MAX_KRAKEN_MESSAGE));
    let (socket, _) = tokio_tungstenite::client_async_with_config(url, io, Some(config))
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    Ok(socket)
}
