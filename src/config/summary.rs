//! The config summarised for people and logs: where secrets come from,
//! never the secrets.

use std::fmt::Write as _;

use super::{AuditSink, Config, Identity, SecretSource};
use crate::token::schedule::MAX_REJECTED_RETRY;

fn human(d: std::time::Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// `key from source, ...`: where each secret comes from.
fn sources(of: &[(&'static str, SecretSource)]) -> String {
    let from: Vec<String> = of.iter().map(|(k, src)| format!("{k} from {src}")).collect();
    from.join(", ")
}

impl Config {
    /// A summary for people and logs: no secret, only where secrets come from.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        self.summarise_listeners(&mut s);
        self.summarise_kraken(&mut s);
        self.summarise_accounts(&mut s);
        self.summarise_consumers(&mut s);
        s
    }

    fn summarise_listeners(&self, s: &mut String) {
        let tls = match &self.listen.tls {
            None => "plain HTTP".to_owned(),
            Some(t) => format!(
                "TLS{} ({})",
                if t.mtls { " with client certificates" } else { "" },
                sources(&t.sources)
            ),
        };
        let _ = writeln!(s, "listen: api {} ({tls}) admin {}", self.listen.api, self.listen.admin);
        if let Some(k) = &self.kubernetes {
            let _ = writeln!(
                s,
                "kubernetes: TokenReview at {} for audience {}, token file {}, cache {}",
                k.api_url,
                k.audience,
                k.token_file.display(),
                human(k.cache_ttl)
            );
        }
        if let Some(a) = &self.audit {
            let to = match &a.sink {
                AuditSink::Stdout => "stdout".to_owned(),
                AuditSink::File(p) => p.display().to_string(),
            };
            let _ = writeln!(s, "audit: to {to}");
        }
    }

    fn summarise_kraken(&self, s: &mut String) {
        let (k, r) = (&self.kraken, &self.refresh);
        let _ = writeln!(
            s,
            "kraken: rest {} ws {} timeout {}",
            k.rest_url,
            k.ws_url,
            human(k.timeout)
        );
        let _ = writeln!(
            s,
            "refresh: {} before expiry (jitter {}), min served ttl {}, retry {}..{}, rejected key retried after {} (doubling to {})",
            human(r.refresh_before_expiry),
            human(r.jitter),
            human(r.min_served_ttl),
            human(r.retry_initial),
            human(r.retry_max),
            human(r.retry_rejected),
            human(MAX_REJECTED_RETRY),
        );
        let _ = writeln!(
            s,
            "kraken budget: {} rejected calls per 15 minutes, all accounts",
            k.max_rejected_calls
        );
    }

    fn summarise_accounts(&self, s: &mut String) {
        let _ = writeln!(s, "accounts: {}", self.accounts.len());
        for a in &self.accounts {
            let expiry = a
                .key_expires_at
                .map(|t| format!(", key expires {}", humantime::format_rfc3339_seconds(t)))
                .unwrap_or_default();
            let _ = writeln!(s, "  {}: {}{expiry}", a.name, sources(&a.sources));
        }
    }

    fn summarise_consumers(&self, s: &mut String) {
        let _ = writeln!(s, "consumers: {}", self.consumers.len());
        for c in &self.consumers {
            let who = match &c.identity {
                Identity::Credential { .. } => "credential".to_owned(),
                Identity::ServiceAccount {
                    namespace,
                    service_account,
                } => format!("ServiceAccount {namespace}/{service_account}"),
                Identity::ClientCert { san } => format!("client certificate with {san}"),
            };
            let _ = writeln!(
                s,
                "  {}: accounts {} ({who}, {}/s, burst {})",
                c.name,
                c.accounts.join(", "),
                c.rate_limit.per_second,
                c.rate_limit.burst
            );
        }
    }
}
