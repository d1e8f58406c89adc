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

/// Certificates from PEM text (at least one).
pub fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} is not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} holds no PEM certificate"));
    }
    Ok(certs)
}

/// A server configuration from a PEM certificate chain, its PEM private key
/// and, for mTLS, the PEM CA client certificates are verified against.
pub fn server_config(cert_pem: &str, key_pem: &str, client_ca_pem: Option<&str>) -> Result<ServerConfig, String> {
    let provider = provider();
    let chain = certificates(cert_pem, "cert")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| "key is not a PEM private key (PKCS#8, PKCS#1 or SEC1)".to_owned())?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(ca_pem, "client_ca")? {
                roots
                    .add(ca)
                    .map_err(|e| format!("client_ca holds a certificate rustls refuses: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("client_ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("the key does not fit the certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The DNS and URI SANs of a (verified) certificate, in its order.
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

/// A verified client certificate's SANs, carried on each request of the
/// connection it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub sans: Arc<[String]>,
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
        let err = server_config(&other_cert, &key, None).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
        assert!(
            server_config("not pem", &key, None)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(
            server_config(&cert, "not a key", None)
                .unwrap_err()
                .contains("private key")
        );
        let (ca, _) = pair(&["ca"]);
        assert!(server_config(&cert, &key, Some(&ca)).is_ok());
    }

    #[test]
    fn dns_and_uri_sans_are_read() {
        let params = rcgen::CertificateParams::new(vec!["mm-eth.trading.svc".to_owned()]).unwrap();
        let mut params = params;
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://trading/ns/trading/sa/mm-eth").unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let sans = subject_alt_names(cert.der());
        assert_eq!(sans, ["mm-eth.trading.svc", "spiffe://trading/ns/trading/sa/mm-eth"]);
    }
}
