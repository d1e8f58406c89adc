//! `[[account]]`: each Kraken account and the secrets that sign for it.

use std::collections::HashSet;

use toml::Spanned;

use super::super::problems::{Findings, at};
use super::super::raw::{AccountSection, Entry, SecretRef};
use super::super::secrets::{Material, SecretReader, secret};
use super::super::values::unique_name;
use super::super::{AccountConfig, SecretSource};
use crate::kraken::key_info::{DEFAULT_FORBIDDEN, PERMISSIONS, WS_TOKEN_PERMISSION};
use crate::kraken::{ApiCredentials, Otp, decode_secret};
use crate::secret::SecretString;

/// Validates the accounts; also returns every well-named account, valid or
/// not, so a consumer naming a broken account is not blamed for it too.
pub(in crate::config) fn accounts<R: SecretReader>(
    f: &mut Findings<'_>,
    entries: &[Entry<AccountSection>],
    present: bool,
    reader: &R,
) -> (Vec<AccountConfig>, HashSet<String>) {
    let mut accounts = Vec::new();
    let mut seen = HashSet::new();
    if entries.is_empty() && !present {
        f.problem(
            None,
            "account",
            "no [[account]]: the broker needs at least one Kraken account",
        );
    }
    for entry in entries {
        let (prefix, name) = unique_name(f, &entry.section.name, &entry.position, entry.at, "account", &mut seen);
        if let Some(account) = account(f, entry, &prefix, name, reader) {
            accounts.push(account);
        }
    }
    (accounts, seen)
}

/// One account's secrets, each read and checked; the account if all are good.
fn account<R: SecretReader>(
    f: &mut Findings<'_>,
    entry: &Entry<AccountSection>,
    prefix: &str,
    name: Option<String>,
    reader: &R,
) -> Option<AccountConfig> {
    let a = &entry.section;
    let mut sources = Vec::new();
    let mut require = |f: &mut Findings<'_>, key: &'static str, value: &Option<Spanned<SecretRef>>| {
        let path = format!("{prefix}.{key}");
        let Some(value) = value else {
            f.missing(entry.at, path);
            return None;
        };
        let (secret, source) = secret(f, reader, value, &path, Material::Secret)?;
        sources.push((key, source));
        Some((secret, at(value)))
    };
    let api_key = require(f, "api_key", &a.api_key);
    let api_secret = require(f, "api_secret", &a.api_secret);
    if let Some((key, place)) = &api_key
        && key.expose().chars().any(|c| c.is_whitespace() || c.is_control())
    {
        f.problem(*place, format!("{prefix}.api_key"), "the API key holds whitespace");
    }
    let api_secret = api_secret.and_then(|(s, place)| match decode_secret(s.expose()) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            f.problem(place, format!("{prefix}.api_secret"), e.to_string());
            None
        }
    });
    let otp = otp(f, a, prefix, reader, &mut sources);
    let key_expires_at = key_expires_at(f, a, prefix);
    let forbid_permissions = forbid_permissions(f, a, prefix);
    let (name, (api_key, _), api_secret) = (name?, api_key?, api_secret?);
    Some(AccountConfig {
        name,
        credentials: ApiCredentials {
            api_key,
            api_secret,
            otp,
        },
        sources,
        key_expires_at,
        forbid_permissions,
    })
}

/// `forbid_permissions`: Kraken's permission names; by default the funding
/// ones. A name this broker does not know is kept (Kraken may add
/// permissions) with a warning, since a misspelt one forbids nothing.
fn forbid_permissions(f: &mut Findings<'_>, a: &AccountSection, prefix: &str) -> Vec<String> {
    let Some(list) = &a.forbid_permissions else {
        return DEFAULT_FORBIDDEN.iter().map(|p| (*p).to_owned()).collect();
    };
    if list.get_ref().is_empty() {
        f.warning(
            at(list),
            format!("{prefix}.forbid_permissions"),
            "is empty: the key is not refused for any permission it holds, funding (withdraw, deposit) included"
                .to_owned(),
        );
    }
    let mut names = Vec::new();
    for name in list.get_ref() {
        let text = name.get_ref().trim();
        if !PERMISSIONS.iter().any(|(known, _)| *known == text) {
            let known: Vec<&str> = PERMISSIONS.iter().map(|(n, _)| *n).collect();
            f.warning(
                at(name),
                format!("{prefix}.forbid_permissions"),
                format!(
                    "`{text}` is not a Kraken permission name this broker knows ({}); kept as given",
                    known.join(", ")
                ),
            );
        }
        if text == WS_TOKEN_PERMISSION {
            f.problem(
                at(name),
                format!("{prefix}.forbid_permissions"),
                format!(
                    "`{WS_TOKEN_PERMISSION}` is the permission every key here needs: forbidding it refuses every key"
                ),
            );
        }
        if !names.iter().any(|n| n == text) {
            names.push(text.to_owned());
        }
    }
    names
}

/// The key's 2FA: a static password or a TOTP seed, not both.
fn otp<R: SecretReader>(
    f: &mut Findings<'_>,
    a: &AccountSection,
    prefix: &str,
    reader: &R,
    sources: &mut Vec<(&'static str, SecretSource)>,
) -> Option<Otp> {
    let (key, value, make): (&'static str, _, fn(&SecretString) -> Result<Otp, _>) = match (&a.otp, &a.totp_secret) {
        (Some(otp), Some(_)) => {
            f.problem(at(otp), prefix, "give otp or totp_secret, not both");
            return None;
        }
        (Some(value), None) => ("otp", value, |v| Otp::static_password(v.clone())),
        (None, Some(value)) => ("totp_secret", value, Otp::totp_from_base32),
        (None, None) => return None,
    };
    let path = format!("{prefix}.{key}");
    let (text, source) = secret(f, reader, value, &path, Material::Secret)?;
    sources.push((key, source));
    make(&text).map_err(|e| f.problem(at(value), path, e.to_string())).ok()
}

/// `key_expires_at`, an RFC 3339 time.
fn key_expires_at(f: &mut Findings<'_>, a: &AccountSection, prefix: &str) -> Option<std::time::SystemTime> {
    let text = a.key_expires_at.as_ref()?;
    humantime::parse_rfc3339(text.get_ref().trim())
        .map_err(|_| {
            let msg = format!(
                "`{}` is not an RFC 3339 UTC time like 2027-03-01T00:00:00Z",
                text.get_ref()
            );
            f.problem(at(text), format!("{prefix}.key_expires_at"), msg);
        })
        .ok()
}
