//! How consumers prove who they are, and nothing of HTTP: a bearer
//! credential ([`credential`]), a client certificate ([`client_cert`]), or a
//! projected Kubernetes ServiceAccount token ([`service_account`]). The
//! extractor in `http/auth.rs` tries them in turn.

pub mod client_cert;
pub mod credential;
pub mod service_account;

pub use client_cert::{ClientCertificate, San};

/// How a consumer proves who it is: exactly one per consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A bearer credential; only its SHA-256 is stored.
    Credential { sha256: [u8; 32] },
    /// A projected ServiceAccount token, checked with a TokenReview.
    ServiceAccount { namespace: String, service_account: String },
    /// A client certificate verified against `listen.tls.client_ca`, with
    /// this SAN.
    ClientCert { san: San },
}

impl Identity {
    /// The kind, as logs and audit lines name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Credential { .. } => "credential",
            Identity::ServiceAccount { .. } => "service_account",
            Identity::ClientCert { .. } => "client_cert",
        }
    }
}
