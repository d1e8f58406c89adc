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
use std::time::{Duration, SystemTime};

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
    if client_ca_pem.is_some() {
        // A resumed session is not verified again: a certificate that has
        // expired since, or a CA removed since, would go on proving who the
        // client is. With client certificates, every handshake is a full one.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// A verified client certificate, as each request of its connection
/// carries it: its DNS and URI SANs, kept apart (a DNS SAN never proves a
/// URI identity, nor the other way round), and when it stops being valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub dns: Arc<[String]>,
    pub uris: Arc<[String]>,
    /// The earliest `notAfter` of the chain presented.
    pub not_after: SystemTime,
}

impl ClientCertificate {
    /// The leaf's SANs and the chain's expiry; `None` when the leaf cannot
    /// be read (rustls has verified it: only a bug would get here).
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<Self> {
        let (_, leaf) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
        let (dns, uris) = subject_alt_names(&leaf);
        let mut not_after = not_after(&leaf);
        for other in &chain[1..] {
            if let Ok((_, cert)) = x509_parser::parse_x509_certificate(other.as_ref()) {
                not_after = not_after.min(self::not_after(&cert));
            }
        }
        Some(Self {
            dns: dns.into(),
            uris: uris.into(),
            not_after,
        })
    }

    /// How long the certificate stays valid after `now`; `None` once expired.
    pub fn time_left(&self, now: SystemTime) -> Option<Duration> {
        self.not_after.duration_since(now).ok().filter(|left| !left.is_zero())
    }
}

/// A certificate's `notAfter` (before 1970 reads as 1970).
fn not_after(cert: &x509_parser::certificate::X509Certificate<'_>) -> SystemTime {
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The DNS SANs and URI SANs of a certificate, each in its order.
fn subject_alt_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> (Vec<String>, Vec<String>) {
    use x509_parser::extensions::GeneralName;
    let (mut dns, mut uris) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(name) => dns.push((*name).to_owned()),
                GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                _ => {}
            }
        }
    }
    (dns, uris)
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
    fn dns_and_uri_sans_are_read_apart_with_the_expiry() {
        let mut params = rcgen::CertificateParams::new(vec!["mm-eth.trading.svc".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://trading/ns/trading/sa/mm-eth").unwrap(),
        ));
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let c = ClientCertificate::from_chain(&[cert.der().clone()]).unwrap();
        assert_eq!(&*c.dns, ["mm-eth.trading.svc"]);
        assert_eq!(&*c.uris, ["spiffe://trading/ns/trading/sa/mm-eth"]);
        let expiry = humantime::parse_rfc3339("2031-01-02T00:00:00Z").unwrap();
        assert_eq!(c.not_after, expiry);
        assert!(c.time_left(expiry - Duration::from_secs(5)).is_some());
        assert_eq!(c.time_left(expiry), None);
        assert_eq!(c.time_left(expiry + Duration::from_secs(5)), None);
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
