//! The config file as written: one serde type per section, every leaf
//! [`Spanned`] so it keeps its place; secrets as places (`{ file }` or
//! `{ env }`), never as values.

use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::problems::{Findings, at};
use super::values::valid_name;

pub(super) type Text = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenSection {
    pub(super) api: Option<Text>,
    pub(super) admin: Option<Text>,
    pub(super) tls: Option<Spanned<TlsSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsSection {
    pub(super) cert: Option<Spanned<SecretRef>>,
    pub(super) key: Option<Spanned<SecretRef>>,
    pub(super) client_ca: Option<Spanned<SecretRef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KubernetesSection {
    pub(super) audience: Option<Text>,
    pub(super) api_url: Option<Text>,
    pub(super) ca: Option<Spanned<SecretRef>>,
    pub(super) token: Option<Spanned<SecretRef>>,
    pub(super) cache_ttl: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditSection {
    pub(super) to: Option<Text>,
    pub(super) fingerprint_key: Option<Spanned<SecretRef>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceAccountSection {
    pub(super) namespace: Option<Text>,
    pub(super) service_account: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClientCertSection {
    pub(super) dns: Option<Text>,
    pub(super) uri: Option<Text>,
    /// The form before SAN types were told apart; read by its form, with a
    /// warning.
    pub(super) san: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitSection {
    pub(super) per_second: Option<Spanned<f64>>,
    pub(super) burst: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KrakenSection {
    pub(super) rest_url: Option<Text>,
    pub(super) ws_url: Option<Text>,
    pub(super) timeout: Option<Text>,
    pub(super) max_rejected_calls: Option<Spanned<i64>>,
    pub(super) key_info_interval: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RefreshSection {
    pub(super) refresh_before_expiry: Option<Text>,
    pub(super) min_served_ttl: Option<Text>,
    pub(super) jitter: Option<Text>,
    pub(super) retry_initial: Option<Text>,
    pub(super) retry_max: Option<Text>,
    pub(super) retry_rejected: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountSection {
    pub(super) name: Option<Text>,
    pub(super) api_key: Option<Spanned<SecretRef>>,
    pub(super) api_secret: Option<Spanned<SecretRef>>,
    pub(super) otp: Option<Spanned<SecretRef>>,
    pub(super) totp_secret: Option<Spanned<SecretRef>>,
    pub(super) key_expires_at: Option<Text>,
    pub(super) forbid_permissions: Option<Spanned<Vec<Text>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConsumerSection {
    pub(super) name: Option<Text>,
    pub(super) credential_sha256: Option<Text>,
    pub(super) kubernetes: Option<Spanned<ServiceAccountSection>>,
    pub(super) client_cert: Option<Spanned<ClientCertSection>>,
    pub(super) accounts: Option<Spanned<Vec<Text>>>,
    pub(super) rate_limit: Option<Spanned<RateLimitSection>>,
    pub(super) relay: Option<Spanned<RelaySection>>,
    pub(super) relay_only: Option<Spanned<bool>>,
}

/// `relay = { allow = [...], max_connections = N }` of a consumer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RelaySection {
    pub(super) allow: Option<Spanned<Vec<Text>>>,
    pub(super) max_connections: Option<Spanned<i64>>,
}

/// Where a secret is, as written: `{ file = "..." }` or `{ env = "..." }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretPlace {
    pub(super) file: Option<Text>,
    pub(super) env: Option<Text>,
}

/// A secret field as written: a place, or (refused, and never echoed) a
/// value written into the config file itself.
#[derive(Debug)]
pub(super) enum SecretRef {
    Inline,
    Place(SecretPlace),
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Refs;
        impl<'de> Visitor<'de> for Refs {
            type Value = SecretRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("{ file = \"/path\" } or { env = \"VAR\" }")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SecretRef, A::Error> {
                SecretPlace::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(SecretRef::Place)
            }
            // Anything else is a value written inline: accepted here so that
            // no error message can ever quote it; validation refuses it.
            fn visit_str<E>(self, _: &str) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_i64<E>(self, _: i64) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_u64<E>(self, _: u64) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_f64<E>(self, _: f64) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_bool<E>(self, _: bool) -> Result<SecretRef, E> {
                Ok(SecretRef::Inline)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SecretRef, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(SecretRef::Inline)
            }
        }
        deserializer.deserialize_any(Refs)
    }
}

/// The whole file as written, section by section. Entries keep the offset
/// of their table and the name they go by in messages.
#[derive(Default)]
pub(super) struct Sections {
    pub(super) listen: ListenSection,
    pub(super) kraken: KrakenSection,
    pub(super) refresh: RefreshSection,
    pub(super) kubernetes: Option<(usize, KubernetesSection)>,
    pub(super) audit: Option<(usize, AuditSection)>,
    pub(super) accounts: Vec<Entry<AccountSection>>,
    pub(super) consumers: Vec<Entry<ConsumerSection>>,
    pub(super) has_accounts_key: bool,
    pub(super) has_consumers_key: bool,
}

pub(super) struct Entry<T> {
    pub(super) at: usize,
    /// `account[2]` (by position) until the name is known to be good.
    pub(super) position: String,
    pub(super) section: T,
}

/// Splits the root table into its sections.
pub(super) fn read_sections(f: &mut Findings<'_>, root: &DeTable<'_>) -> Sections {
    let mut sections = Sections::default();
    for (key, value) in root.iter() {
        match key.get_ref().as_ref() {
            "listen" => sections.listen = f.section(value, "listen"),
            "kraken" => sections.kraken = f.section(value, "kraken"),
            "refresh" => sections.refresh = f.section(value, "refresh"),
            "kubernetes" => sections.kubernetes = Some((value.span().start, f.section(value, "kubernetes"))),
            "audit" => sections.audit = Some((value.span().start, f.section(value, "audit"))),
            "account" => {
                sections.has_accounts_key = true;
                sections.accounts = entries(f, value, "account");
            }
            "consumer" => {
                sections.has_consumers_key = true;
                sections.consumers = entries(f, value, "consumer");
            }
            other => f.problem(
                Some(key.span().start),
                other,
                "unknown key (expected one of: listen, kraken, refresh, kubernetes, audit, account, consumer)",
            ),
        }
    }
    sections
}

/// The `[[kind]]` tables, each read into its section type.
pub(super) fn entries<T: DeserializeOwned + Default>(
    f: &mut Findings<'_>,
    value: &Spanned<DeValue<'_>>,
    kind: &str,
) -> Vec<Entry<T>> {
    let DeValue::Array(items) = value.get_ref() else {
        f.problem(at(value), kind, format!("expected [[{kind}]] tables"));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let position = format!("{kind}[{}]", i + 1);
        // Messages name a table by its name once it is a good one.
        let named = match item.get_ref() {
            DeValue::Table(t) => t
                .get("name")
                .and_then(|n| n.get_ref().as_str())
                .filter(|n| valid_name(n))
                .map(|n| format!("{kind} `{n}`")),
            _ => None,
        };
        let section = f.section(item, named.as_deref().unwrap_or(&position));
        out.push(Entry {
            at: item.span().start,
            position,
            section,
        });
    }
    out
}
