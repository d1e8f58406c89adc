//! Certificates made in the test (rcgen): a CA, and server or client
//! certificates it signs, as PEM.

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

/// A certificate authority.
pub struct Ca {
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for these SANs (DNS names or IPs; `spiffe://` and other
    /// `scheme://` values become URI SANs).
    pub fn leaf(&self, sans: &[&str]) -> Leaf {
        let plain: Vec<String> = sans
            .iter()
            .filter(|s| !s.contains("://"))
            .map(|s| (*s).to_owned())
            .collect();
        let mut params = CertificateParams::new(plain).unwrap();
        for uri in sans.iter().filter(|s| s.contains("://")) {
            params
                .subject_alt_names
                .push(SanType::URI(rcgen::string::Ia5String::try_from(*uri).unwrap()));
        }
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// What goes in a certificate made by [`Ca::issue`].
#[derive(Default)]
pub struct LeafSpec<'a> {
    pub dns: &'a [&'a str],
    pub uris: &'a [&'a str],
    /// When it stops being valid (default: rcgen's, years ahead).
    pub not_after: Option<std::time::SystemTime>,
}

impl Ca {
    /// A certificate with exactly these DNS and URI SANs (a DNS SAN may
    /// hold any text, `spiffe://...` too) and expiry.
    pub fn issue(&self, spec: LeafSpec<'_>) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for dns in spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(rcgen::string::Ia5String::try_from(*dns).unwrap()));
        }
        for uri in spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(rcgen::string::Ia5String::try_from(*uri).unwrap()));
        }
        if let Some(at) = spec.not_after {
            let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            params.not_after = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
            params.not_before = time::OffsetDateTime::from_unix_timestamp(secs - 3600).unwrap();
        }
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A reqwest client trusting `cas`, presenting `identity` if given.
pub fn client(cas: &[&str], identity: Option<&Leaf>) -> reqwest::Client {
    let roots = cas
        .iter()
        .map(|pem| reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    let mut builder = reqwest::Client::builder()
        .tls_certs_only(roots)
        .timeout(std::time::Duration::from_secs(20));
    if let Some(leaf) = identity {
        let pem = format!("{}{}", leaf.cert, leaf.key);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}
