//! A client certificate as proof of identity: the verified certificate's
//! DNS and URI SANs, kept apart, and its expiry; and the [`San`] a consumer
//! is named by, matched only against SANs of its own type.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;

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

/// A client certificate's subject alternative name, of its type: a DNS SAN
/// never proves a URI identity, nor a URI SAN a DNS one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San {
    Dns(String),
    /// A URI such as a SPIFFE ID.
    Uri(String),
}

impl San {
    /// Whether a verified certificate holds this SAN, in a SAN of its type
    /// (DNS names compared without regard to ASCII case, as DNS does).
    pub fn matches(&self, cert: &ClientCertificate) -> bool {
        match self {
            San::Dns(name) => cert.dns.iter().any(|d| d.eq_ignore_ascii_case(name)),
            San::Uri(uri) => cert.uris.iter().any(|u| u == uri),
        }
    }

    /// A legacy `san = "..."`, typed by its form: a URI has a scheme (`x:`),
    /// which no DNS name can hold, so the reading is never ambiguous.
    pub fn from_legacy(text: String) -> Self {
        if text.contains(':') {
            San::Uri(text)
        } else {
            San::Dns(text)
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => write!(f, "DNS SAN {name}"),
            San::Uri(uri) => write!(f, "URI SAN {uri}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_san_matches_only_its_own_type() {
        let cert = ClientCertificate {
            dns: Arc::from(vec!["spiffe://td/x".to_owned(), "MM.trading.svc".to_owned()]),
            uris: Arc::from(vec!["mm-eth.trading.svc".to_owned()]),
            not_after: SystemTime::UNIX_EPOCH,
        };
        assert!(
            !San::Uri("spiffe://td/x".into()).matches(&cert),
            "a DNS SAN never proves a URI"
        );
        assert!(
            !San::Dns("mm-eth.trading.svc".into()).matches(&cert),
            "a URI SAN never proves a DNS name"
        );
        assert!(
            San::Dns("mm.trading.svc".into()).matches(&cert),
            "DNS names match without regard to case"
        );
        assert_eq!(
            San::from_legacy("spiffe://td/x".into()),
            San::Uri("spiffe://td/x".into())
        );
        assert_eq!(
            San::from_legacy("mm.trading.svc".into()),
            San::Dns("mm.trading.svc".into())
        );
    }
}
