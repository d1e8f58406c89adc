//! `[listen]` and `[listen.tls]`.

use toml::Spanned;

use super::super::problems::{Findings, at};
use super::super::raw::{ListenSection, SecretRef, TlsSection};
use super::super::secrets::{Material, SecretReader, secret};
use super::super::values::{offset, socket_addr};
use super::super::{DEFAULT_ADMIN_LISTEN, DEFAULT_API_LISTEN, ListenConfig, TlsConfig};

pub(in crate::config) fn listen<R: SecretReader>(f: &mut Findings<'_>, s: &ListenSection, reader: &R) -> ListenConfig {
    let listen = ListenConfig {
        api: socket_addr(f, &s.api, "listen.api", DEFAULT_API_LISTEN),
        admin: socket_addr(f, &s.admin, "listen.admin", DEFAULT_ADMIN_LISTEN),
        tls: s.tls.as_ref().and_then(|section| tls(f, section, reader)),
    };
    if listen.api == listen.admin && listen.api.port() != 0 {
        let place = offset(&s.admin).or(offset(&s.api));
        f.problem(place, "listen", "api and admin must listen on different addresses");
    }
    listen
}

/// `[listen.tls]`: the files are read and the server configuration built
/// now, so a broken certificate or a key that does not fit is a problem
/// with its line, and a reload with one is refused.
fn tls<R: SecretReader>(f: &mut Findings<'_>, tls: &Spanned<TlsSection>, reader: &R) -> Option<TlsConfig> {
    use sha2::{Digest, Sha256};
    let t = tls.get_ref();
    let mut sources = Vec::new();
    let mut digest = Sha256::new();
    let mut read = |f: &mut Findings<'_>, key: &'static str, value: &Option<Spanned<SecretRef>>, required: bool| {
        let path = format!("listen.tls.{key}");
        let Some(value) = value else {
            if required {
                f.missing(tls.span().start, path);
            }
            return None;
        };
        let material = if key == "key" {
            Material::Secret
        } else {
            Material::Public
        };
        let (text, source) = secret(f, reader, value, &path, material)?;
        digest.update((text.expose().len() as u64).to_le_bytes());
        digest.update(text.expose().as_bytes());
        sources.push((key, source));
        Some((text, at(value)))
    };
    let cert = read(f, "cert", &t.cert, true);
    let key = read(f, "key", &t.key, true);
    let client_ca = read(f, "client_ca", &t.client_ca, false);
    let ((cert, cert_at), (key, key_at)) = (cert?, key?);
    let ca_text = client_ca.as_ref().map(|(ca, _)| ca.expose());
    if !reader.reads_secrets() {
        // The key is not read: the certificates are checked alone.
        let parsed = crate::tls::certificates(cert.expose(), "certificate").and_then(|_| match ca_text {
            Some(ca) => crate::tls::certificates(ca, "client CA").map(|_| ()),
            None => Ok(()),
        });
        if let Err(e) = parsed {
            f.problem(cert_at, "listen.tls", e.to_string());
        } else {
            f.warning(
                key_at,
                "listen.tls.key",
                "not read (--no-secrets): whether it fits the certificate is checked only with the secrets".to_owned(),
            );
        }
        return None;
    }
    match crate::tls::server_config(cert.expose(), key.expose(), ca_text) {
        Ok(server) => Some(TlsConfig {
            server: std::sync::Arc::new(server),
            mtls: client_ca.is_some(),
            sources,
            digest: digest.finalize().into(),
        }),
        Err(e) => {
            f.problem(cert_at, "listen.tls", e.to_string());
            None
        }
    }
}
