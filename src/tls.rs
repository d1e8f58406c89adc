//! TLS for the consumer API (rustls, TLS 1.2 and 1.3): building a server
//! configuration from PEM files (which checks that the key matches the
//! certificate), optional client-certificate verification against a CA
//! (mTLS), and reading a verified client certificate's DNS and URI SANs.
//!
//! Client certificates are optional on an mTLS listener: one that is
//! presented must verify, and a consumer declared with `client_cert`
//! authenticates with it alone; bearer consumers (credential or
//! ServiceAccount token) need no certificate there.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// How long a client may take to finish the TLS handshake; a stalled one is
/// cut off, so it cannot hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The process's one crypto provider (aws-lc-rs, as reqwest uses).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} is not PEM certificates: {source}")]
    NotPem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} holds no PEM certificate")]
    NoCertificate { what: &'static str },
    #[error("key is not a PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NotAKey,
    #[error("TLS versions: {0}")]
    Versions(#[source] rustls::Error),
    #[error("client_ca holds a certificate rustls refuses: {0}")]
    RefusedCa(#[source] rustls::Error),
    #[error("client_ca: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("the key does not fit the certificate: {0}")]
    KeyMismatch(#[source] rustls::Error),
}

/// Certificates from PEM text (at least one).
pub fn certificates(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::NotPem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// A server configuration from a PEM certificate chain, its PEM private key
/// and, for mTLS, the PEM CA client certificates are verified against.
pub fn server_config(cert_pem: &str, key_pem: &str, client_ca_pem: Option<&str>) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let chain = certificates(cert_pem, "cert")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TlsError::NotAKey)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Versions)?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(ca_pem, "client_ca")? {
                roots.add(ca).map_err(TlsError::RefusedCa)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(TlsError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(TlsError::KeyMismatch)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if client_ca_pem.is_some() {
        // A resumed session is not verified again: a certificate that has
        // expired since, or a CA removed since, would go on proving who the
        // client is. With client certificates, every handshake is a full one.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(sans: &[&str]) -> (String, String) {
        let cert =
            rcgen::generate_simple_self_signed(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    #[test]
    fn a_certificate_and_its_key_make_a_server_config() {
        let (cert, key) = pair(&["broker.trading.svc"]);
        let config = server_config(&cert, &key, None).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let (other_cert, _) = pair(&["other"]);
        let err = server_config(&other_cert, &key, None).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        assert!(
            server_config("not pem", &key, None)
                .unwrap_err()
                .to_string()
                .contains("no PEM certificate")
        );
        assert!(
            server_config(&cert, "not a key", None)
                .unwrap_err()
                .to_string()
                .contains("private key")
        );
        let (ca, _) = pair(&["ca"]);
        assert!(server_config(&cert, &key, Some(&ca)).is_ok());
    }

    #[test]
    fn client_certificate_listeners_never_resume_a_session() {
        let (cert, key) = pair(&["broker"]);
        let (ca, _) = pair(&["ca"]);
        let plain = server_config(&cert, &key, None).unwrap();
        assert!(
            plain.send_tls13_tickets > 0,
            "resumption stays on without client certificates"
        );
        let mtls = server_config(&cert, &key, Some(&ca)).unwrap();
        assert_eq!(mtls.send_tls13_tickets, 0);
        assert!(!mtls.session_storage.can_cache());
    }
}
