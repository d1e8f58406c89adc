//! `[[consumer]]`: who may fetch tokens, how each proves it, what each may
//! fetch, and how fast.

use std::collections::{BTreeMap, HashSet};

use toml::Spanned;

use super::super::problems::{Findings, at};
use super::super::raw::{ClientCertSection, ConsumerSection, Entry, ServiceAccountSection};
use super::super::values::{Text, parse_sha256, unique_name};
use super::super::{ConsumerConfig, DEFAULT_RATE_LIMIT, Identity, RateLimit, RelayGrant, RelayPolicy, San};
use crate::kraken::ws::{CHANNELS, METHODS, has_channel};

pub(in crate::config) fn consumers(
    f: &mut Findings<'_>,
    entries: &[Entry<ConsumerSection>],
    present: bool,
    accounts: &HashSet<String>,
    ctx: &IdentityContext,
) -> Vec<ConsumerConfig> {
    let mut consumers = Vec::new();
    let mut names = HashSet::new();
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    if entries.is_empty() && !present {
        f.problem(None, "consumer", "no [[consumer]]: nobody could fetch a token");
    }
    for entry in entries {
        let c = &entry.section;
        let (prefix, name) = unique_name(f, &c.name, &entry.position, entry.at, "consumer", &mut names);
        let identity = consumer_identity(f, c, &prefix, entry.at, &mut hashes, ctx);
        let accounts_key = format!("{prefix}.accounts");
        let granted = match &c.accounts {
            None => {
                f.missing(entry.at, accounts_key);
                None
            }
            Some(list) if list.get_ref().is_empty() => {
                f.problem(at(list), accounts_key, "expected a non-empty list of account names");
                None
            }
            Some(list) => {
                let mut granted: Vec<String> = Vec::new();
                for item in list.get_ref() {
                    let a = item.get_ref();
                    if !accounts.contains(a) {
                        f.problem(at(item), accounts_key.clone(), format!("no [[account]] is named `{a}`"));
                    } else if !granted.contains(a) {
                        granted.push(a.clone());
                    }
                }
                Some(granted)
            }
        };
        let rate_limit = consumer_rate_limit(f, c, &prefix);
        let relay = consumer_relay(f, c, &prefix);
        let relay_only = c.relay_only.as_ref().is_some_and(|v| *v.get_ref());
        if let (Some(name), Some(identity), Some(accounts)) = (name, identity, granted) {
            consumers.push(ConsumerConfig {
                name,
                identity,
                accounts,
                rate_limit,
                relay,
                relay_only,
            });
        }
    }
    consumers
}

/// What the consumers' identities depend on elsewhere in the config.
pub(in crate::config) struct IdentityContext {
    pub kubernetes: bool,
    pub mtls: bool,
}

/// An identity as read, before it is known to be unique.
struct Candidate {
    identity: Identity,
    /// What must be unique across consumers.
    id: String,
    place: Option<usize>,
    key: String,
    what: &'static str,
}

/// The one identity a consumer has: a credential hash, a ServiceAccount, or
/// a client certificate's SAN. Each must be unique across consumers.
fn consumer_identity(
    f: &mut Findings<'_>,
    c: &ConsumerSection,
    prefix: &str,
    table_at: usize,
    seen: &mut BTreeMap<String, String>,
    ctx: &IdentityContext,
) -> Option<Identity> {
    if !one_identity_given(f, c, prefix, table_at) {
        return None;
    }
    let candidate = if let Some(text) = &c.credential_sha256 {
        credential(f, text, prefix)
    } else if let Some(sa) = &c.kubernetes {
        service_account(f, sa, prefix, ctx)
    } else {
        client_certificate(f, c.client_cert.as_ref()?, prefix, ctx)
    }?;
    if let Some(other) = seen.insert(candidate.id, prefix.to_owned()) {
        let message = format!("the same {} as {other}: give each consumer its own", candidate.what);
        f.problem(candidate.place, candidate.key, message);
        return None;
    }
    Some(candidate.identity)
}

/// Whether exactly one identity is given (else a problem says so, unless
/// the one given was malformed and is reported already).
fn one_identity_given(f: &mut Findings<'_>, c: &ConsumerSection, prefix: &str, table_at: usize) -> bool {
    let given = [
        c.credential_sha256.is_some(),
        c.kubernetes.is_some(),
        c.client_cert.is_some(),
    ];
    match given.iter().filter(|g| **g).count() {
        1 => true,
        0 => {
            let malformed = ["credential_sha256", "kubernetes", "client_cert"]
                .iter()
                .any(|k| f.malformed.contains(&format!("{prefix}.{k}")));
            if !malformed {
                f.problem(
                    Some(table_at),
                    prefix,
                    "give one identity: credential_sha256, kubernetes = { namespace, service_account } or client_cert = { dns = \"...\" } (or { uri = \"...\" })",
                );
            }
            false
        }
        _ => {
            f.problem(Some(table_at), prefix, "give exactly one identity, not several");
            false
        }
    }
}

fn credential(f: &mut Findings<'_>, text: &Text, prefix: &str) -> Option<Candidate> {
    let key = format!("{prefix}.credential_sha256");
    let Some(sha256) = parse_sha256(text.get_ref()) else {
        f.problem(
            at(text),
            key,
            "must be 64 hex characters (`kraken-token-broker credential new NAME` prints one)",
        );
        return None;
    };
    Some(Candidate {
        identity: Identity::Credential { sha256 },
        id: format!("credential:{}", hex::encode(sha256)),
        place: at(text),
        key,
        what: "credential",
    })
}

fn service_account(
    f: &mut Findings<'_>,
    sa: &Spanned<ServiceAccountSection>,
    prefix: &str,
    ctx: &IdentityContext,
) -> Option<Candidate> {
    let key = format!("{prefix}.kubernetes");
    if !ctx.kubernetes {
        f.problem(at(sa), key, "needs a [kubernetes] section (the TokenReview settings)");
        return None;
    }
    let part = |v: &Option<Text>| {
        v.as_ref()
            .map(|t| t.get_ref().trim().to_owned())
            .filter(|t| valid_k8s_name(t))
    };
    let (Some(namespace), Some(service_account)) = (part(&sa.get_ref().namespace), part(&sa.get_ref().service_account))
    else {
        f.problem(
            at(sa),
            key,
            "needs namespace and service_account, each a Kubernetes name ([a-z0-9.-], at most 253)",
        );
        return None;
    };
    Some(Candidate {
        id: format!("sa:{namespace}:{service_account}"),
        identity: Identity::ServiceAccount {
            namespace,
            service_account,
        },
        place: at(sa),
        key,
        what: "ServiceAccount",
    })
}

fn client_certificate(
    f: &mut Findings<'_>,
    cert: &Spanned<ClientCertSection>,
    prefix: &str,
    ctx: &IdentityContext,
) -> Option<Candidate> {
    let key = format!("{prefix}.client_cert");
    if !ctx.mtls {
        f.problem(
            at(cert),
            key,
            "needs listen.tls.client_ca: client certificates are verified against it",
        );
        return None;
    }
    let san = client_cert_san(f, cert, &key)?;
    Some(Candidate {
        id: format!("san:{san}"),
        identity: Identity::ClientCert { san },
        place: at(cert),
        key,
        what: "client certificate SAN",
    })
}

/// `client_cert = { dns = "..." }` or `{ uri = "..." }`; the legacy
/// `{ san = "..." }` is read by its form, with a warning naming the new one.
fn client_cert_san(f: &mut Findings<'_>, cert: &Spanned<ClientCertSection>, key: &str) -> Option<San> {
    let text = |v: &Option<Text>| {
        v.as_ref()
            .map(|t| t.get_ref().trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let c = cert.get_ref();
    let (dns, uri, legacy) = (text(&c.dns), text(&c.uri), text(&c.san));
    match (dns, uri, legacy) {
        // DNS names are matched without regard to case: one form, so two
        // consumers cannot name the same one.
        (Some(dns), None, None) if !dns.contains(':') => Some(San::Dns(dns.to_ascii_lowercase())),
        (Some(_), None, None) => {
            f.problem(
                at(cert),
                key,
                "dns must be a DNS name (no scheme): a URI SAN such as a SPIFFE ID is { uri = \"...\" }",
            );
            None
        }
        (None, Some(uri), None) if uri.contains(':') => Some(San::Uri(uri)),
        (None, Some(_), None) => {
            f.problem(
                at(cert),
                key,
                "uri must be a URI with a scheme, e.g. spiffe://trust-domain/path",
            );
            None
        }
        (None, None, Some(legacy)) => {
            let san = San::from_legacy(legacy);
            let new = match &san {
                San::Dns(name) => format!("{{ dns = \"{name}\" }}"),
                San::Uri(uri) => format!("{{ uri = \"{uri}\" }}"),
            };
            f.warning(
                at(cert),
                key,
                format!("`san` does not say which SAN type to match: read as the {san}; write client_cert = {new}"),
            );
            Some(san)
        }
        _ => {
            f.problem(
                at(cert),
                key,
                "give exactly one of dns = \"a.dns.name\" or uri = \"spiffe://...\" (the SAN type the certificate holds it in)",
            );
            None
        }
    }
}

/// A Kubernetes namespace or ServiceAccount name.
fn valid_k8s_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// `relay = { allow = [...], max_connections = N }`: every entry a method of
/// Kraken's WebSocket v2, or `subscribe:`/`unsubscribe:` and a channel.
fn consumer_relay(f: &mut Findings<'_>, c: &ConsumerSection, prefix: &str) -> RelayPolicy {
    let mut policy = RelayPolicy::default();
    let Some(relay) = &c.relay else {
        return policy;
    };
    let relay = relay.get_ref();
    if let Some(max) = &relay.max_connections {
        match usize::try_from(*max.get_ref()) {
            Ok(n) if (1..=10_000).contains(&n) => policy.max_connections = n,
            _ => f.problem(
                at(max),
                format!("{prefix}.relay.max_connections"),
                "must be between 1 and 10000",
            ),
        }
    }
    if let Some(list) = &relay.allow {
        let key = format!("{prefix}.relay.allow");
        let mut grants = Vec::new();
        for item in list.get_ref() {
            match relay_grant(item.get_ref()) {
                Ok(grant) if !grants.contains(&grant) => grants.push(grant),
                Ok(_) => {}
                Err(why) => f.problem(at(item), key.clone(), why),
            }
        }
        policy.allow = Some(grants);
    }
    policy
}

/// One `relay.allow` entry, or why it is not one.
fn relay_grant(entry: &str) -> Result<RelayGrant, String> {
    let (method, channel) = match entry.split_once(':') {
        Some((method, channel)) => (method, Some(channel)),
        None => (entry, None),
    };
    if !METHODS.contains(&method) {
        return Err(format!(
            "`{method}` is not a method of Kraken's WebSocket v2 (one of: {})",
            METHODS.join(", ")
        ));
    }
    if let Some(channel) = channel {
        if !has_channel(method) {
            return Err(format!("`{entry}`: only subscribe and unsubscribe name a channel"));
        }
        if !CHANNELS.contains(&channel) {
            return Err(format!(
                "`{channel}` is not a channel of Kraken's WebSocket v2 (one of: {})",
                CHANNELS.join(", ")
            ));
        }
    }
    Ok(RelayGrant {
        method: method.to_owned(),
        channel: channel.map(str::to_owned),
    })
}

fn consumer_rate_limit(f: &mut Findings<'_>, c: &ConsumerSection, prefix: &str) -> RateLimit {
    let Some(limit) = &c.rate_limit else {
        return DEFAULT_RATE_LIMIT;
    };
    let l = limit.get_ref();
    let per_second = l
        .per_second
        .as_ref()
        .map_or(DEFAULT_RATE_LIMIT.per_second, |v| *v.get_ref());
    let burst = l.burst.as_ref().map_or(per_second.max(1.0) * 3.0, |v| *v.get_ref());
    // The upper bounds only catch typos; a load generator playing many
    // engines as one consumer (bench/) needs the top of the range.
    let sane = per_second > 0.0 && per_second <= 1e6 && (1.0..=1e6).contains(&burst);
    if !sane {
        f.problem(
            at(limit),
            format!("{prefix}.rate_limit"),
            "per_second must be above 0 and burst at least 1 (each at most 1000000)",
        );
        return DEFAULT_RATE_LIMIT;
    }
    RateLimit { per_second, burst }
}
