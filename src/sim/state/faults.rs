//! Faults a user sets to test an engine's failure handling, and the
//! exchange's status.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Inner;
use super::calls::Reply;

/// A fault to inject into the REST endpoint. Fields combine: `delay_ms`
/// first, then the first of `hang`, `http_status`, `error`, `malformed`; the
/// rest (`truncated`, `token`, `expires`) reshape an otherwise real answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// A Kraken error string answered with HTTP 200, e.g. `EAPI:Invalid key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An HTTP status answered with an HTML body, as Cloudflare does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Milliseconds to wait before answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Up to this many more milliseconds, at random per call: calls then
    /// overtake each other, as on a real network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_jitter_ms: Option<u64>,
    /// Answer HTTP 200 with a body that is not JSON.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub malformed: bool,
    /// Answer the real JSON cut off halfway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Never answer (the connection stays open until the client gives up).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hang: bool,
    /// With `http_status`: send this `Retry-After` (seconds), as an edge may
    /// on 429 and 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    /// Answer this token (registered as valid) instead of a fresh one; an
    /// empty string answers an empty token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Put this JSON value in `expires` (e.g. 0, -5, 1e12, "900"), or the
    /// string `"omit"` to leave the field out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Value>,
    /// Apply to the next `count` calls only; absent: until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The private method it applies to: `GetWebSocketsToken` (absent: the
    /// default), `GetApiKeyInfo`, or `*` for every private call (an edge
    /// outage). Calls to other methods neither see it nor count it down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl FaultSpec {
    /// Whether a call to `path` (`/0/private/<Method>`) is subject to it.
    pub fn applies_to(&self, path: &str) -> bool {
        let method = path.rsplit('/').next().unwrap_or("");
        match self.method.as_deref() {
            None => method == "GetWebSocketsToken",
            Some("*") => true,
            Some(wanted) => wanted == method,
        }
    }
}

pub(super) struct ActiveFault {
    pub(super) spec: FaultSpec,
    pub(super) remaining: Option<u32>,
}

/// Kraken's exchange status, as `/0/public/SystemStatus` and the WebSocket
/// status channel report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SystemStatus {
    #[default]
    Online,
    /// Private REST calls answer `EService:Unavailable`.
    Maintenance,
    /// Orders can only be cancelled.
    CancelOnly,
    /// Only post-only limit orders are accepted.
    PostOnly,
}

impl SystemStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SystemStatus::Online => "online",
            SystemStatus::Maintenance => "maintenance",
            SystemStatus::CancelOnly => "cancel_only",
            SystemStatus::PostOnly => "post_only",
        }
    }
}

/// Cloudflare-style HTML for an edge status.
pub fn edge_html(status: u16) -> String {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    format!(
        "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n<center><h1>{status} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
    )
}

/// Applies the answer-shaping parts of a fault to a success reply.
pub(super) fn reshape(reply: Reply, fault: &FaultSpec) -> Reply {
    let Reply::Json(mut value) = reply else {
        return reply;
    };
    match &fault.expires {
        Some(Value::String(s)) if s == "omit" => {
            if let Some(result) = value["result"].as_object_mut() {
                result.remove("expires");
            }
        }
        Some(other) => value["result"]["expires"] = other.clone(),
        None => {}
    }
    if fault.truncated {
        let full = value.to_string().into_bytes();
        return Reply::Raw(full[..full.len() / 2].to_vec());
    }
    Reply::Json(value)
}

impl Inner {
    pub(super) fn take_fault(&mut self, path: &str) -> Option<FaultSpec> {
        let active = self.fault.as_mut().filter(|a| a.spec.applies_to(path))?;
        let spec = active.spec.clone();
        if let Some(remaining) = active.remaining.as_mut() {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                self.fault = None;
            }
        }
        Some(spec)
    }
}
