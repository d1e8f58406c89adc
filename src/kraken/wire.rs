//! Kraken's JSON answer to `GetWebSocketsToken`, parsed defensively.
//!
//! `{"error":[],"result":{"token":"...","expires":900}}` on success; a
//! non-empty `error` array (still HTTP 200) on failure. Anything else is a
//! malformed response: it is reported, never cached.

use std::time::Duration;

use serde_json::Value;

use super::error::{KrakenError, classify_api_errors};
use crate::secret::SecretString;

/// The lifetime Kraken documents for a WebSocket token, and the most the
/// broker believes: a larger `expires` is clamped to it, so a bogus answer can
/// never make the broker hold a token past Kraken's documented use-by.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// Tokens are short base64-like strings; anything longer is not a token.
const MAX_TOKEN_LEN: usize = 1024;

/// A WebSocket token as Kraken granted it.
#[derive(Debug, Clone)]
pub struct WsToken {
    pub token: SecretString,
    /// How long the token may still be used to open a connection, from the
    /// moment the answer arrived (Kraken's `expires`, clamped).
    pub lifetime: Duration,
    /// Kraken's `expires` exceeded [`MAX_TOKEN_LIFETIME`] and was clamped.
    pub lifetime_clamped: bool,
}

/// Whether `b` is in Kraken's token alphabet (base64 and base64url).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
}

fn malformed(what: &str) -> KrakenError {
    KrakenError::MalformedResponse(what.to_owned())
}

/// The `result` object of a private call's answer given with HTTP 200
/// (`{"error": [...], "result": {...}}`), or Kraken's error in it.
pub(super) fn result_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, KrakenError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| malformed("the body is not JSON"))?;
    let Value::Object(mut object) = value else {
        return Err(malformed("the body is not a JSON object"));
    };
    match object.get("error") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let codes: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            if codes.len() != items.len() {
                return Err(malformed("the error array holds a non-string"));
            }
            if let Some(failure) = classify_api_errors(&codes) {
                return Err(KrakenError::Api(failure));
            }
        }
        Some(_) => return Err(malformed("the error field is not an array")),
    }
    match object.remove("result") {
        Some(Value::Object(result)) => Ok(result),
        _ => Err(malformed("no result object")),
    }
}

/// Parses the body of a `GetWebSocketsToken` answer given with HTTP 200.
pub fn parse_ws_token_response(body: &[u8]) -> Result<WsToken, KrakenError> {
    let result = result_object(body)?;
    let token = match result.get("token") {
        Some(Value::String(t)) if t.is_empty() => return Err(malformed("the token is empty")),
        Some(Value::String(t)) if t.len() > MAX_TOKEN_LEN => return Err(malformed("the token is too long")),
        // Kraken's tokens are base64 (`A-Za-z0-9+/=`, or its URL-safe `-_`):
        // anything else (whitespace, control, invisible or bidirectional
        // Unicode that could hide in an engine's logs) is not a token.
        Some(Value::String(t)) if !t.bytes().all(is_token_byte) => {
            return Err(malformed(
                "the token holds characters outside Kraken's token alphabet (whitespace, control or other Unicode)",
            ));
        }
        Some(Value::String(t)) => SecretString::new(t.clone()),
        Some(_) => return Err(malformed("the token is not a string")),
        None => return Err(malformed("no token in the result")),
    };
    let expires = match result.get("expires") {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(_) => return Err(malformed("expires is not a number")),
        None => return Err(malformed("no expires in the result")),
    };
    if !expires.is_finite() || expires < 1.0 {
        return Err(malformed("expires is not a positive number of seconds"));
    }
    let max = MAX_TOKEN_LIFETIME.as_secs_f64();
    let lifetime_clamped = expires > max;
    let lifetime = Duration::try_from_secs_f64(expires.min(max))
        .map_err(|_| malformed("expires is not a positive number of seconds"))?;
    Ok(WsToken {
        token,
        lifetime,
        lifetime_clamped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kraken::error::Reason;

    fn parse(body: &str) -> Result<WsToken, KrakenError> {
        parse_ws_token_response(body.as_bytes())
    }

    fn malformed_reason(body: &str) -> String {
        match parse(body) {
            Err(KrakenError::MalformedResponse(why)) => why,
            other => panic!("{body}: expected malformed, got {other:?}"),
        }
    }

    #[test]
    fn parses_krakens_success_shape() {
        let t = parse(r#"{"error":[],"result":{"token":"1Dwc4lzSwNWOAwkMdqhssNNFhs1ed606d1WcF3XfEMw","expires":900}}"#)
            .unwrap();
        assert_eq!(t.token.expose(), "1Dwc4lzSwNWOAwkMdqhssNNFhs1ed606d1WcF3XfEMw");
        assert_eq!(t.lifetime, Duration::from_secs(900));
        assert!(!t.lifetime_clamped);
        assert!(!format!("{t:?}").contains("1Dwc4"), "Debug never shows the token");
    }

    #[test]
    fn a_warning_beside_a_result_is_still_success() {
        let t = parse(r#"{"error":["WGeneral:Deprecated"],"result":{"token":"abc","expires":60}}"#).unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(60));
    }

    #[test]
    fn an_error_array_is_classified() {
        let e = parse(r#"{"error":["EAPI:Invalid nonce"]}"#).unwrap_err();
        assert_eq!(e.reason(), Reason::InvalidNonce);
        let e = parse(r#"{"error":["EGeneral:Permission denied"],"result":{}}"#).unwrap_err();
        assert_eq!(e.reason(), Reason::PermissionDenied);
    }

    #[test]
    fn empty_missing_or_odd_tokens_are_malformed_not_cached() {
        assert!(malformed_reason(r#"{"error":[],"result":{"token":"","expires":900}}"#).contains("empty"));
        assert!(malformed_reason(r#"{"error":[],"result":{"expires":900}}"#).contains("no token"));
        assert!(malformed_reason(r#"{"error":[],"result":{"token":5,"expires":900}}"#).contains("not a string"));
        assert!(malformed_reason(r#"{"error":[],"result":{"token":"a b","expires":900}}"#).contains("whitespace"));
        for hidden in ["ab\u{200b}cd", "ab\u{202e}cd", "t\u{00a0}k", "tök"] {
            let body = serde_json::json!({"error": [], "result": {"token": hidden, "expires": 900}}).to_string();
            assert!(malformed_reason(&body).contains("alphabet"), "{hidden:?}");
        }
        assert!(parse(r#"{"error":[],"result":{"token":"aB3+/=-_","expires":900}}"#).is_ok());
        let long = format!(
            r#"{{"error":[],"result":{{"token":"{}","expires":900}}}}"#,
            "a".repeat(2000)
        );
        assert!(malformed_reason(&long).contains("too long"));
    }

    #[test]
    fn missing_zero_negative_or_odd_expires_is_malformed() {
        for body in [
            r#"{"error":[],"result":{"token":"abc"}}"#,
            r#"{"error":[],"result":{"token":"abc","expires":0}}"#,
            r#"{"error":[],"result":{"token":"abc","expires":-5}}"#,
            r#"{"error":[],"result":{"token":"abc","expires":"900"}}"#,
            r#"{"error":[],"result":{"token":"abc","expires":null}}"#,
        ] {
            assert!(malformed_reason(body).contains("expires"), "{body}");
        }
    }

    #[test]
    fn a_huge_expires_is_clamped_to_krakens_documented_lifetime() {
        let t = parse(r#"{"error":[],"result":{"token":"abc","expires":1e300}}"#).unwrap();
        assert_eq!(t.lifetime, MAX_TOKEN_LIFETIME);
        assert!(t.lifetime_clamped);
        let t = parse(r#"{"error":[],"result":{"token":"abc","expires":18446744073709551615}}"#).unwrap();
        assert_eq!(t.lifetime, MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn bodies_that_are_not_krakens_shape_are_malformed() {
        for body in [
            "",
            "<html>502</html>",
            r#"{"error":[],"result":{"token":"abc","exp"#,
            "[]",
            r#"{"error":"EAPI:Invalid key"}"#,
            r#"{"error":[1]}"#,
            r#"{"error":[]}"#,
            r#"{"error":[],"result":"token"}"#,
        ] {
            assert!(matches!(parse(body), Err(KrakenError::MalformedResponse(_))), "{body}");
        }
    }
}
