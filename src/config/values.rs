//! One check for each kind of value: durations, addresses, URLs, names.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::problems::{Findings, at};

/// A string value with its place in the file.
pub(super) type Text = Spanned<String>;

/// Parses a duration such as `30s`, `5m`, `1h`, `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("`{text}` is not a duration like 30s, 5m or 1h ({e})"))
}

/// Whether `name` fits `[a-z0-9_-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// 64 hex characters (either case) into 32 bytes.
pub fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

pub(super) fn duration(f: &mut Findings<'_>, value: &Option<Text>, key: &str, default: Duration) -> Duration {
    let Some(text) = value else { return default };
    parse_duration(text.get_ref()).unwrap_or_else(|e| {
        f.problem(at(text), key, e);
        default
    })
}

pub(super) fn socket_addr(f: &mut Findings<'_>, value: &Option<Text>, key: &str, default: &str) -> SocketAddr {
    let fallback = || default.parse().expect("default addresses parse");
    let Some(text) = value else { return fallback() };
    text.get_ref().parse().unwrap_or_else(|_| {
        let msg = format!("`{}` is not an address like 0.0.0.0:8080", text.get_ref());
        f.problem(at(text), key, msg);
        fallback()
    })
}

/// A URL of one of `schemes` if given (see [`url_of`]), else `default`.
pub(super) fn url(f: &mut Findings<'_>, value: &Option<Text>, key: &str, default: &str, schemes: &[&str]) -> String {
    value
        .as_ref()
        .and_then(|text| url_of(f, text, key, schemes))
        .unwrap_or_else(|| default.to_owned())
}

pub(super) fn offset(value: &Option<Text>) -> Option<usize> {
    value.as_ref().and_then(at)
}

/// A URL of one of `schemes`, without a trailing slash.
pub(super) fn url_of(f: &mut Findings<'_>, text: &Text, key: &str, schemes: &[&str]) -> Option<String> {
    match reqwest::Url::parse(text.get_ref()) {
        Ok(url) if schemes.contains(&url.scheme()) && url.host_str().is_some() => {
            Some(text.get_ref().trim_end_matches('/').to_owned())
        }
        _ => {
            let msg = format!("`{}` is not a {} URL", text.get_ref(), schemes.join(" or "));
            f.problem(at(text), key, msg);
            None
        }
    }
}

/// A `[[kind]]` table's `name`: present, `[a-z0-9_-]{1,64}`, and not seen
/// before among the `kind`s. Returns the prefix messages use, and the name.
pub(super) fn unique_name(
    f: &mut Findings<'_>,
    name: &Option<Text>,
    position: &str,
    table_at: usize,
    kind: &str,
    seen: &mut HashSet<String>,
) -> (String, Option<String>) {
    let key = format!("{position}.name");
    let Some(name) = name else {
        f.missing(table_at, key);
        return (position.to_owned(), None);
    };
    let text = name.get_ref();
    if !valid_name(text) {
        f.problem(at(name), key, format!("`{text}` must match [a-z0-9_-]{{1,64}}"));
        return (position.to_owned(), None);
    }
    let prefix = format!("{kind} `{text}`");
    if !seen.insert(text.clone()) {
        f.problem(
            at(name),
            format!("{prefix}.name"),
            format!("{kind} `{text}` is defined twice"),
        );
        return (prefix, None);
    }
    (prefix, Some(text.clone()))
}
