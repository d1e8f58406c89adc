//! What Kraken says of a key about itself: `POST /0/private/GetApiKeyInfo`
//! (Kraken's API reference, Account Data, "Get API Key Info"; "API Key
//! Permissions Required: None"), parsed, judged against the account's
//! policy, and checked for use by another signer.
//!
//! The documented example answer:
//!
//! ```json
//! {"error":[],"result":{"apiKeyName":"my-api-key","apiKey":"4/SD…","nonce":"1772627060997",
//!  "nonceWindow":0,"permissions":["query-funds","withdraw-funds","query-open-trades","modify-trades"],
//!  "iban":"AA88 N84G WOAK NMOI","validUntil":"0","queryFrom":"0","queryTo":"0",
//!  "createdTime":"1772542900","modifiedTime":"1772543095","ipAllowlist":[],"lastUsed":"1772627061"}}
//! ```
//!
//! Times are Unix seconds as strings, `"0"` meaning none; the nonce is a
//! string of digits. The answer names the key itself (`apiKey`) and the
//! account (`iban`): neither is kept, so neither can reach a log, a metric
//! or `/readyz`.
//!
//! Not documented, and so assumed here (and in the simulator):
//! - `nonce` is the highest nonce Kraken has accepted for the key, this
//!   call's included; `lastUsed` the time of the last accepted call, this one
//!   included. The example supports it (its `lastUsed` is the second right
//!   after its `nonce`, a millisecond time) but does not say it.
//! - The permission names beyond the four of the example (see
//!   [`PERMISSIONS`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::error::KrakenError;
use super::wire::result_object;

/// The path of the call.
pub const KEY_INFO_PATH: &str = "/0/private/GetApiKeyInfo";

/// The permission `GetWebSocketsToken` needs ("WebSocket interface" in
/// Kraken's key form). Assumed name: not in Kraken's example answer; the
/// name independent Kraken clients check for (e.g. the `create-ws-token` of
/// OctoBot's Kraken adapter of ccxt, `fetchPermissions`).
pub const WS_TOKEN_PERMISSION: &str = "create-ws-token";

/// Kraken's permission names as `GetApiKeyInfo` reports them, with the key
/// form's label. Documented (in Kraken's example answer): `query-funds`,
/// `withdraw-funds`, `query-open-trades`, `modify-trades`. The others are
/// the names independent Kraken clients check for (an assumption until
/// Kraken documents the list).
pub const PERMISSIONS: &[(&str, &str)] = &[
    ("query-funds", "Funds: Query"),
    ("add-funds", "Funds: Deposit"),
    ("withdraw-funds", "Funds: Withdraw"),
    ("add-withdraw-address", "Funds: Add withdrawal address"),
    ("update-withdraw-address", "Funds: Update withdrawal address"),
    ("earn-funds", "Funds: Earn"),
    ("query-open-trades", "Orders and trades: Query open orders & trades"),
    ("query-closed-trades", "Orders and trades: Query closed orders & trades"),
    ("modify-trades", "Orders and trades: Create & modify orders"),
    ("close-trades", "Orders and trades: Cancel & close orders"),
    ("query-ledger", "Data: Query ledger entries"),
    ("export-data", "Data: Export data"),
    (WS_TOKEN_PERMISSION, "WebSocket interface"),
];

/// The default of an account's `forbid_permissions`: the funding ones that
/// move money in or out, which no use of a WebSocket token needs (Kraken's
/// API-key guide lists Query Funds, the order permissions and the WebSocket
/// one for trading, never deposit or withdraw).
pub const DEFAULT_FORBIDDEN: &[&str] = &[
    "withdraw-funds",
    "add-withdraw-address",
    "update-withdraw-address",
    "add-funds",
];

/// The most permissions, allowlist entries and bytes of a name kept from an
/// answer: a key has a dozen permissions at most.
const MAX_ITEMS: usize = 64;
const MAX_TEXT: usize = 128;

/// A key's settings and use, as Kraken reports them. Holds neither the key
/// nor the account's IBAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's description in Kraken's key form.
    pub name: String,
    pub permissions: Vec<String>,
    /// Addresses or CIDR ranges allowed to use the key; empty: any.
    pub ip_allowlist: Vec<String>,
    /// Kraken's Custom Nonce Window, in nonce units.
    pub nonce_window: u64,
    pub valid_until: Option<SystemTime>,
    /// The highest nonce Kraken accepted for the key (assumed meaning).
    pub nonce: Option<u64>,
    pub last_used: Option<SystemTime>,
    pub created: Option<SystemTime>,
    pub modified: Option<SystemTime>,
    pub query_from: Option<SystemTime>,
    pub query_to: Option<SystemTime>,
}

impl KeyInfo {
    pub fn has(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }
}

fn malformed(what: &str) -> KrakenError {
    KrakenError::MalformedResponse(format!("GetApiKeyInfo: {what}"))
}

/// A number Kraken sends as a string of digits (or, tolerated, a JSON number).
fn number(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A Unix time in seconds; `0` (Kraken's "none") gives `None`.
/// The first second of the year 10000: RFC 3339 (and humantime) cannot
/// write a time from then on, so a later one is refused as absurd.
const MAX_UNIX_SECS: u64 = 253_402_300_800;

fn time(value: Option<&Value>) -> Option<SystemTime> {
    let secs = number(value).filter(|s| *s > 0 && *s < MAX_UNIX_SECS)?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn text(value: &str) -> String {
    value.chars().filter(|c| !c.is_control()).take(MAX_TEXT).collect()
}

fn strings(value: Option<&Value>, what: &str) -> Result<Vec<String>, KrakenError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items
            .iter()
            .filter_map(Value::as_str)
            .take(MAX_ITEMS)
            .map(text)
            .collect()),
        Some(_) => Err(malformed(&format!("{what} is not a list"))),
    }
}

/// Parses the body of a `GetApiKeyInfo` answer given with HTTP 200.
pub fn parse_key_info_response(body: &[u8]) -> Result<KeyInfo, KrakenError> {
    let result = result_object(body)?;
    if !matches!(result.get("permissions"), Some(Value::Array(_))) {
        return Err(malformed("no permissions list"));
    }
    let permissions = strings(result.get("permissions"), "permissions")?;
    Ok(KeyInfo {
        name: result
            .get("apiKeyName")
            .and_then(Value::as_str)
            .map(text)
            .unwrap_or_default(),
        permissions,
        ip_allowlist: strings(result.get("ipAllowlist"), "ipAllowlist")?,
        nonce_window: number(result.get("nonceWindow")).unwrap_or(0),
        valid_until: time(result.get("validUntil")),
        nonce: number(result.get("nonce")),
        last_used: time(result.get("lastUsed")),
        created: time(result.get("createdTime")),
        modified: time(result.get("modifiedTime")),
        query_from: time(result.get("queryFrom")),
        query_to: time(result.get("queryTo")),
    })
}

/// Whether an account may use a key, by its permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Usable,
    /// The key cannot make WebSocket tokens: calling would only be refused.
    MissingWsPermission,
    /// The key holds permissions the account forbids.
    TooPowerful(Vec<String>),
}

/// Judges a key by what it holds and what the account forbids. A key
/// lacking the WebSocket permission is the first problem to fix.
pub fn judge(info: &KeyInfo, forbidden: &[String]) -> Verdict {
    if !info.has(WS_TOKEN_PERMISSION) {
        return Verdict::MissingWsPermission;
    }
    let held: Vec<String> = forbidden.iter().filter(|p| info.has(p)).cloned().collect();
    if held.is_empty() {
        Verdict::Usable
    } else {
        Verdict::TooPowerful(held)
    }
}

/// Kraken's nonce for the key moved where the broker's own calls do not
/// explain it: another signer holds the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignUse {
    /// What Kraken reported.
    pub reported: u64,
    /// The nonce of the call that asked.
    pub own: u64,
}

/// Checks the nonce Kraken reports against the broker's own: the nonce of
/// the call that asked (`own`) and the one this process sent before it on
/// the key (`previous`, 0 when none). Read either way (the reported nonce
/// includes the asking call, as assumed, or stops just before it), the
/// broker explains `own` and `previous`; a nonce above `own`, or between
/// the two, is another signer's. A nonce below the first this process ever
/// sent is history from before it started, not evidence.
pub fn foreign_use(reported: Option<u64>, own: u64, previous: u64) -> Option<ForeignUse> {
    let reported = reported?;
    let explained = reported == own || reported == previous || (previous == 0 && reported < own);
    let foreign = !explained && (reported > own || reported > previous);
    foreign.then_some(ForeignUse { reported, own })
}

/// One `GetApiKeyInfo` answer, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCheck {
    pub info: KeyInfo,
    pub verdict: Verdict,
    pub foreign: Option<ForeignUse>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kraken::Reason;

    const DOCUMENTED: &str = r#"{"error":[],"result":{"apiKeyName":"my-api-key","apiKey":"4/SDrDBcOOPnm3nPlNfEMMJDeRcIVqPz+QhRxIodyZbI9po/aVRiHsgX","nonce":"1772627060997","nonceWindow":0,"permissions":["query-funds","withdraw-funds","query-open-trades","modify-trades"],"iban":"AA88 N84G WOAK NMOI","validUntil":"0","queryFrom":"0","queryTo":"0","createdTime":"1772542900","modifiedTime":"1772543095","ipAllowlist":[],"lastUsed":"1772627061"}}"#;

    #[test]
    fn parses_krakens_documented_example_and_keeps_neither_key_nor_iban() {
        let info = parse_key_info_response(DOCUMENTED.as_bytes()).unwrap();
        assert_eq!(info.name, "my-api-key");
        assert_eq!(
            info.permissions,
            ["query-funds", "withdraw-funds", "query-open-trades", "modify-trades"]
        );
        assert_eq!(info.nonce, Some(1_772_627_060_997));
        assert_eq!(info.valid_until, None, "\"0\" is no expiry");
        assert_eq!(info.last_used, Some(UNIX_EPOCH + Duration::from_secs(1_772_627_061)));
        assert_eq!(info.created, Some(UNIX_EPOCH + Duration::from_secs(1_772_542_900)));
        let debug = format!("{info:?}");
        assert!(!debug.contains("4/SDr") && !debug.contains("AA88"), "{debug}");
    }

    #[test]
    fn errors_and_bad_shapes_are_classified() {
        let err = parse_key_info_response(br#"{"error":["EAPI:Invalid key"]}"#).unwrap_err();
        assert_eq!(err.reason(), Reason::InvalidKey);
        for body in [
            &b"nope"[..],
            br#"{"error":[],"result":{}}"#,
            br#"{"error":[],"result":{"permissions":"x"}}"#,
        ] {
            assert_eq!(
                parse_key_info_response(body).unwrap_err().reason(),
                Reason::MalformedResponse
            );
        }
    }

    #[test]
    fn numbers_may_come_as_numbers_and_absurd_ones_are_dropped() {
        let body = br#"{"error":[],"result":{"permissions":[],"nonce":5,"validUntil":18446744073709551615,"nonceWindow":"10"}}"#;
        let info = parse_key_info_response(body).unwrap();
        assert_eq!(info.nonce, Some(5));
        assert_eq!(info.nonce_window, 10);
        assert_eq!(info.valid_until, None, "beyond any time RFC 3339 can write");
        // The year 10000 cannot be printed (humantime refuses it): dropped,
        // so no log line, /readyz or `key info` ever tries.
        let body = br#"{"error":[],"result":{"permissions":[],"validUntil":"253402300800","lastUsed":253402300799}}"#;
        let info = parse_key_info_response(body).unwrap();
        assert_eq!(info.valid_until, None);
        let last = info.last_used.expect("the last second of 9999 is kept");
        assert_eq!(
            humantime::format_rfc3339_seconds(last).to_string(),
            "9999-12-31T23:59:59Z"
        );
    }

    fn info(permissions: &[&str]) -> KeyInfo {
        KeyInfo {
            name: String::new(),
            permissions: permissions.iter().map(|p| (*p).to_owned()).collect(),
            ip_allowlist: Vec::new(),
            nonce_window: 0,
            valid_until: None,
            nonce: None,
            last_used: None,
            created: None,
            modified: None,
            query_from: None,
            query_to: None,
        }
    }

    #[test]
    fn a_key_is_judged_by_the_ws_permission_then_by_what_is_forbidden() {
        let forbid: Vec<String> = DEFAULT_FORBIDDEN.iter().map(|p| (*p).to_owned()).collect();
        assert_eq!(judge(&info(&["query-funds"]), &forbid), Verdict::MissingWsPermission);
        assert_eq!(
            judge(&info(&["withdraw-funds"]), &forbid),
            Verdict::MissingWsPermission,
            "the missing permission is named first"
        );
        assert_eq!(
            judge(&info(&[WS_TOKEN_PERMISSION, "withdraw-funds", "add-funds"]), &forbid),
            Verdict::TooPowerful(vec!["withdraw-funds".into(), "add-funds".into()])
        );
        assert_eq!(
            judge(&info(&[WS_TOKEN_PERMISSION, "withdraw-funds"]), &[]),
            Verdict::Usable
        );
        assert_eq!(
            judge(&info(&[WS_TOKEN_PERMISSION, "query-funds", "modify-trades"]), &forbid),
            Verdict::Usable
        );
    }

    #[test]
    fn only_a_nonce_the_broker_did_not_send_is_foreign() {
        // The asking call's own nonce, or the one before it: explained.
        assert_eq!(foreign_use(Some(100), 100, 90), None);
        assert_eq!(foreign_use(Some(90), 100, 90), None);
        // Before this process's first call: history, not evidence.
        assert_eq!(foreign_use(Some(50), 100, 0), None);
        assert_eq!(foreign_use(None, 100, 90), None);
        // Ahead of the broker, or between its calls: another signer.
        assert_eq!(
            foreign_use(Some(150), 100, 90),
            Some(ForeignUse {
                reported: 150,
                own: 100
            })
        );
        assert_eq!(
            foreign_use(Some(95), 100, 90),
            Some(ForeignUse { reported: 95, own: 100 })
        );
        assert_eq!(
            foreign_use(Some(150), 100, 0),
            Some(ForeignUse {
                reported: 150,
                own: 100
            })
        );
        // Older than the broker's previous call: not evidence either.
        assert_eq!(foreign_use(Some(80), 100, 90), None);
    }
}
