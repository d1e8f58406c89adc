//! `[audit]`: where audit lines go and the fingerprint key.

use std::path::PathBuf;

use super::super::problems::{Findings, at};
use super::super::raw::AuditSection;
use super::super::secrets::{Material, SecretReader, secret_bytes};
use super::super::{AuditConfig, AuditSink};

pub(in crate::config) fn audit<R: SecretReader>(
    f: &mut Findings<'_>,
    section: Option<&(usize, AuditSection)>,
    reader: &R,
) -> Option<AuditConfig> {
    let (table_at, a) = section?;
    let sink = match &a.to {
        None => AuditSink::Stdout,
        Some(to) if to.get_ref() == "stdout" => AuditSink::Stdout,
        Some(to) if to.get_ref().starts_with('/') => AuditSink::File(PathBuf::from(to.get_ref())),
        Some(to) => {
            f.problem(at(to), "audit.to", "\"stdout\", or an absolute file path to append to");
            AuditSink::Stdout
        }
    };
    let Some(key) = &a.fingerprint_key else {
        f.missing(*table_at, "audit.fingerprint_key".into());
        return None;
    };
    let (bytes, _) = secret_bytes(f, reader, key, "audit.fingerprint_key", Material::Secret)?;
    // Random bytes as they are; text (`openssl rand -hex 32`) without its
    // trailing newline, so a key's fingerprints stay the same either way.
    let key_bytes = match std::str::from_utf8(&bytes) {
        Ok(text) => text.trim_end_matches(['\n', '\r']).as_bytes().to_vec(),
        Err(_) => bytes,
    };
    if key_bytes.len() < MIN_AUDIT_KEY_BYTES {
        let msg = format!(
            "must be at least {MIN_AUDIT_KEY_BYTES} bytes (random bytes, or text such as `openssl rand -hex 32`)"
        );
        f.problem(at(key), "audit.fingerprint_key", msg);
        return None;
    }
    Some(AuditConfig {
        sink,
        key: crate::secret::SecretBytes::new(key_bytes),
    })
}

/// The shortest HMAC key the audit fingerprints accept.
const MIN_AUDIT_KEY_BYTES: usize = 16;
