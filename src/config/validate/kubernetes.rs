//! `[kubernetes]`: where the API server is and how the broker proves
//! itself to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::super::KubernetesConfig;
use super::super::problems::{Findings, at};
use super::super::raw::{KubernetesSection, SecretPlace, SecretRef};
use super::super::secrets::{SecretReader, expand_env};
use super::super::values::{duration, offset, url_of};

/// The default places of a pod's own ServiceAccount token and cluster CA.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long a successful TokenReview is reused by default.
pub const DEFAULT_REVIEW_CACHE_TTL: Duration = Duration::from_secs(30);
/// The longest accepted: a revoked ServiceAccount must stop working soon.
const MAX_REVIEW_CACHE_TTL: Duration = Duration::from_secs(600);

pub(in crate::config) fn kubernetes<R: SecretReader>(
    f: &mut Findings<'_>,
    section: Option<&(usize, KubernetesSection)>,
    reader: &R,
) -> Option<KubernetesConfig> {
    let (table_at, k) = section?;
    let audience = audience(f, k, *table_at);
    let api_url = api_url(f, k, *table_at, reader);
    let ca = pod_file(f, reader, "ca", &k.ca, *table_at);
    if let Some((path, pem)) = &ca
        && reader.reads_secrets()
        && let Err(e) = crate::tls::certificates(pem, "ca")
    {
        f.problem(
            k.ca.as_ref().and_then(at).or(Some(*table_at)),
            "kubernetes.ca",
            format!("{}: {e}", path.display()),
        );
    }
    let token = pod_file(f, reader, "token", &k.token, *table_at);
    let cache_ttl = duration(f, &k.cache_ttl, "kubernetes.cache_ttl", DEFAULT_REVIEW_CACHE_TTL);
    if cache_ttl > MAX_REVIEW_CACHE_TTL {
        let msg = format!("must be at most {}s", MAX_REVIEW_CACHE_TTL.as_secs());
        f.problem(offset(&k.cache_ttl), "kubernetes.cache_ttl", msg);
    }
    Some(KubernetesConfig {
        audience: audience?,
        api_url: api_url?,
        ca_pem: ca?.1.into_bytes(),
        token_file: token?.0,
        cache_ttl,
    })
}

fn audience(f: &mut Findings<'_>, k: &KubernetesSection, table_at: usize) -> Option<String> {
    match &k.audience {
        Some(a) if !a.get_ref().trim().is_empty() => Some(a.get_ref().trim().to_owned()),
        Some(a) => {
            f.problem(at(a), "kubernetes.audience", "must not be empty");
            None
        }
        None => {
            f.missing(table_at, "kubernetes.audience".into());
            None
        }
    }
}

/// `api_url`, or in a pod the API server Kubernetes names in the environment.
fn api_url<R: SecretReader>(
    f: &mut Findings<'_>,
    k: &KubernetesSection,
    table_at: usize,
    reader: &R,
) -> Option<String> {
    if let Some(text) = &k.api_url {
        return url_of(f, text, "kubernetes.api_url", &["https"]);
    }
    let host = reader.env("KUBERNETES_SERVICE_HOST");
    if host.is_none() && !reader.reads_secrets() {
        // Outside the pod (--no-secrets): the pod's environment gives it.
        return Some("https://kubernetes.default.svc".to_owned());
    }
    let Some(host) = host else {
        f.problem(
            Some(table_at),
            "kubernetes.api_url",
            "not set, and KUBERNETES_SERVICE_HOST is not set either (outside a pod, give the API server's URL)",
        );
        return None;
    };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let port = reader.env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
    Some(format!("https://{host}:{port}"))
}

/// A file of the pod's ServiceAccount (`name` in its standard directory
/// unless given), read now; only `{ file }` is accepted, since it is re-read
/// as the kubelet rotates it.
fn pod_file<R: SecretReader>(
    f: &mut Findings<'_>,
    reader: &R,
    key: &str,
    value: &Option<Spanned<SecretRef>>,
    table_at: usize,
) -> Option<(PathBuf, String)> {
    let place = value.as_ref().and_then(at).or(Some(table_at));
    let name = if key == "ca" { "ca.crt" } else { "token" };
    let path = match value.as_ref().map(|v| v.get_ref()) {
        None => Some(Path::new(SERVICE_ACCOUNT_DIR).join(name)),
        Some(SecretRef::Place(SecretPlace {
            file: Some(path),
            env: None,
        })) => expand_env(path.get_ref(), reader).ok().map(PathBuf::from),
        _ => None,
    };
    let Some(path) = path else {
        let msg = "give { file = \"/path\" }: the file is re-read as the kubelet rotates it";
        f.problem(place, format!("kubernetes.{key}"), msg);
        return None;
    };
    if !reader.reads_secrets() {
        // The pod's own files (--no-secrets): read only in the pod.
        return Some((path, String::new()));
    }
    match reader.file(&path) {
        Ok(read) => Some((path, read.text)),
        Err(e) => {
            let msg = format!("cannot read {}: {e}", path.display());
            f.problem(place, format!("kubernetes.{key}"), msg);
            None
        }
    }
}
