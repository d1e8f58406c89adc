//! The unverified claims of a bearer that looks like a ServiceAccount
//! token, checked before anything that costs (a signature check, a
//! TokenReview): its shape, `exp`, our audience in `aud`, a `sub`. Only ever
//! used to refuse early and to bound how long a review is trusted; never to
//! accept a token.
//!
//! Every field is read from JSON the client wrote: nothing here may panic on
//! any value (an `exp` of `1e308`, `-1`, `2^64`, a string; `aud` of any
//! type), which the property test holds.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

/// The latest `exp` accepted (about the year 2106): past it, the claim is
/// nonsense, not a long-lived token.
pub const MAX_EXP_SECS: u64 = u32::MAX as u64;

/// What the claims say, once they pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: `system:serviceaccount:NS:SA` in a ServiceAccount token.
    pub subject: String,
    /// `exp`: the token is worth nothing after it.
    pub expires_at: SystemTime,
}

/// Why the claims refuse the token without a signature check or a review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a JWT")]
    NotJwt,
    #[error("no exp claim")]
    NoExpiry,
    #[error("exp is not a time")]
    BadExpiry,
    #[error("expired")]
    Expired,
    #[error("wrong audience")]
    WrongAudience,
    #[error("no sub claim")]
    NoSubject,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    exp: Value,
    #[serde(default)]
    sub: Value,
    #[serde(default)]
    aud: Value,
}

/// The payload (second part) of a JWT, decoded; `None` if it is not one.
fn payload(token: &str) -> Option<Raw> {
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `exp` as whole seconds, if it is a number of seconds in range.
fn expiry(exp: &Value) -> Result<SystemTime, Refusal> {
    let secs = match exp {
        Value::Null => return Err(Refusal::NoExpiry),
        Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0 && *f <= MAX_EXP_SECS as f64)
                    .and_then(|f| Duration::try_from_secs_f64(f).ok())
                    .map(|d| d.as_secs())
            })
            .ok_or(Refusal::BadExpiry)?,
        _ => return Err(Refusal::BadExpiry),
    };
    if secs > MAX_EXP_SECS {
        return Err(Refusal::BadExpiry);
    }
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .ok_or(Refusal::BadExpiry)
}

fn has_audience(aud: &Value, audience: &str) -> bool {
    match aud {
        Value::String(one) => one == audience,
        Value::Array(many) => many.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    }
}

/// Checks `token`'s unverified claims against `audience` at `now`.
pub fn precheck(token: &str, audience: &str, now: SystemTime) -> Result<Claims, Refusal> {
    let raw = payload(token).ok_or(Refusal::NotJwt)?;
    let expires_at = expiry(&raw.exp)?;
    if expires_at <= now {
        return Err(Refusal::Expired);
    }
    if !has_audience(&raw.aud, audience) {
        return Err(Refusal::WrongAudience);
    }
    let Value::String(subject) = raw.sub else {
        return Err(Refusal::NoSubject);
    };
    Ok(Claims { subject, expires_at })
}

/// Whether a bearer value looks like a JWT (three base64url parts).
pub fn looks_like_jwt(bearer: &[u8]) -> bool {
    let mut parts = 0;
    for part in bearer.split(|b| *b == b'.') {
        parts += 1;
        let base64url = part
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_' || *b == b'=');
        if !base64url || (part.is_empty() && parts < 3) {
            return false;
        }
    }
    parts == 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const AUD: &str = "kraken-token-broker";

    fn jwt_of(payload: &str) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256"}"#),
            b64(payload.as_bytes()),
            b64(b"sig")
        )
    }

    fn jwt(claims: Value) -> String {
        jwt_of(&claims.to_string())
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn a_good_token_passes_with_its_subject_and_expiry() {
        let claims = precheck(
            &jwt(json!({"aud": [AUD, "api"], "exp": 1_800_000_600, "sub": "system:serviceaccount:t:mm"})),
            AUD,
            now(),
        )
        .unwrap();
        assert_eq!(claims.subject, "system:serviceaccount:t:mm");
        assert_eq!(
            claims.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_600)
        );
        let one_audience = jwt(json!({"aud": AUD, "exp": 1.8000006e9, "sub": "s"}));
        assert!(precheck(&one_audience, AUD, now()).is_ok());
    }

    #[test]
    fn absurd_expiries_are_refused_and_never_panic() {
        for exp in [
            json!(1e20),
            json!(1.7e308),
            json!(-1e20),
            json!(-1),
            json!(18446744073709551615u64),
            json!(18446744073709551616.0),
            json!(4294967296u64),
            json!("1800000600"),
            json!([1]),
            json!({"a": 1}),
            json!(true),
        ] {
            let token = jwt(json!({"aud": AUD, "exp": exp, "sub": "s"}));
            assert_eq!(precheck(&token, AUD, now()), Err(Refusal::BadExpiry), "exp {exp}");
        }
        // Written as text: 1.8e308 is past f64 (serde_json refuses it whole).
        for raw in ["1.8e308", "1e400", "-1.8e308", "18446744073709551616"] {
            let token = jwt_of(&format!(r#"{{"aud":"{AUD}","exp":{raw},"sub":"s"}}"#));
            assert!(precheck(&token, AUD, now()).is_err(), "exp {raw}");
        }
        let past = jwt(json!({"aud": AUD, "exp": 1_700_000_000, "sub": "s"}));
        assert_eq!(precheck(&past, AUD, now()), Err(Refusal::Expired));
        let none = jwt(json!({"aud": AUD, "sub": "s"}));
        assert_eq!(precheck(&none, AUD, now()), Err(Refusal::NoExpiry));
    }

    #[test]
    fn audience_subject_and_shape_are_checked() {
        let exp = 1_800_000_600u64;
        let cases = [
            (json!({"aud": "api", "exp": exp, "sub": "s"}), Refusal::WrongAudience),
            (json!({"aud": [1, 2], "exp": exp, "sub": "s"}), Refusal::WrongAudience),
            (json!({"exp": exp, "sub": "s"}), Refusal::WrongAudience),
            (json!({"aud": AUD, "exp": exp}), Refusal::NoSubject),
            (json!({"aud": AUD, "exp": exp, "sub": 7}), Refusal::NoSubject),
        ];
        for (claims, refusal) in cases {
            assert_eq!(precheck(&jwt(claims.clone()), AUD, now()), Err(refusal), "{claims}");
        }
        for not_jwt in [
            "",
            "a.b",
            "a.b.c.d",
            "x.!!!.y",
            &jwt_of("not json"),
            &jwt_of("\"a string\""),
        ] {
            assert_eq!(precheck(not_jwt, AUD, now()), Err(Refusal::NotJwt), "{not_jwt}");
        }
    }

    #[test]
    fn jwts_are_told_from_credentials() {
        assert!(looks_like_jwt(jwt(json!({"aud": "x"})).as_bytes()));
        assert!(looks_like_jwt(b"a.b."), "an unsigned JWT has an empty third part");
        assert!(!looks_like_jwt(b"ktb_abcdefghijklmnop"));
        assert!(!looks_like_jwt(b"a.b"));
        assert!(!looks_like_jwt(b".b.c"));
        assert!(!looks_like_jwt(b"a.b.c d"));
        assert!(!looks_like_jwt(b"a.b.c.d"));
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,20}".prop_map(Value::from),
            Just(Value::from(AUD)),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::hash_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the claims, the pre-check answers without a panic, and
        /// passes only a token that is unexpired, of our audience, with a
        /// subject.
        #[test]
        fn arbitrary_claims_never_panic(exp in any_json(), aud in any_json(), sub in any_json(), extra in any_json()) {
            let token = jwt(json!({"exp": exp, "aud": aud, "sub": sub, "x": extra}));
            if let Ok(claims) = precheck(&token, AUD, now()) {
                prop_assert!(claims.expires_at > now());
                prop_assert!(has_audience(&aud, AUD));
                prop_assert_eq!(Value::String(claims.subject), sub);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(payload in ".{0,64}", raw in "[A-Za-z0-9._=-]{0,64}") {
            let _ = precheck(&jwt_of(&payload), AUD, now());
            let _ = precheck(&raw, AUD, now());
            let _ = looks_like_jwt(raw.as_bytes());
        }
    }
}
