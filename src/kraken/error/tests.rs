//! The classification table of Kraken's errors, row by row.

use super::*;

#[test]
fn every_reason_is_listed_once_at_its_index() {
    for (i, reason) in Reason::ALL.iter().enumerate() {
        assert_eq!(reason.index(), i, "{reason:?}");
    }
}

/// One row per documented string and its spacing/detail variants.
const TABLE: &[(&str, Reason, Class)] = &[
    ("EAPI:Invalid key", Reason::InvalidKey, Class::Permanent),
    ("EAPI: Invalid key", Reason::InvalidKey, Class::Permanent),
    ("EAPI:Invalid key:revoked", Reason::InvalidKey, Class::Permanent),
    ("EAPI:Invalid signature", Reason::InvalidSignature, Class::Permanent),
    (
        "EAPI:Invalid signature: otp",
        Reason::InvalidSignature,
        Class::Permanent,
    ),
    ("EAPI:Invalid nonce", Reason::InvalidNonce, Class::Transient),
    ("EAPI: Invalid nonce", Reason::InvalidNonce, Class::Transient),
    ("EAPI:Invalid nonce:window", Reason::InvalidNonce, Class::Transient),
    ("EGeneral:Permission denied", Reason::PermissionDenied, Class::Permanent),
    (
        "EGeneral: Permission denied:WebSocket",
        Reason::PermissionDenied,
        Class::Permanent,
    ),
    ("EAPI:Permission denied", Reason::PermissionDenied, Class::Permanent),
    ("EGeneral:Temporary lockout", Reason::Lockout, Class::Transient),
    ("EGeneral: Temporary lockout", Reason::Lockout, Class::Transient),
    ("EAPI:Rate limit exceeded", Reason::RateLimited, Class::Transient),
    ("EAPI: Rate limit exceeded", Reason::RateLimited, Class::Transient),
    ("EGeneral:Too many requests", Reason::RateLimited, Class::Transient),
    (
        "EGeneral:Too many requests: slow down",
        Reason::RateLimited,
        Class::Transient,
    ),
    ("EService:Throttled: 1700000000", Reason::RateLimited, Class::Transient),
    ("EService:Throttled:1700000000", Reason::RateLimited, Class::Transient),
    ("EService:Throttled", Reason::RateLimited, Class::Transient),
    ("EService:Unavailable", Reason::Unavailable, Class::Transient),
    ("EService: Unavailable", Reason::Unavailable, Class::Transient),
    ("EService:Busy", Reason::Unavailable, Class::Transient),
    ("EService:Busy:try later", Reason::Unavailable, Class::Transient),
    ("EService:Deadline elapsed", Reason::Unavailable, Class::Transient),
    ("EGeneral:Internal error", Reason::Unavailable, Class::Transient),
    ("EGeneral:Internal error: 42", Reason::Unavailable, Class::Transient),
    ("EGeneral:Invalid arguments", Reason::Other, Class::Permanent),
    ("EGeneral:Invalid arguments:nonce", Reason::Other, Class::Permanent),
    ("EAPI:Bad request", Reason::Other, Class::Permanent),
    ("EGeneral:Unknown method", Reason::Other, Class::Permanent),
    ("EAuth:Account temporary disabled", Reason::Other, Class::Permanent),
    ("EAuth:Account unconfirmed", Reason::Other, Class::Permanent),
    ("EAuth:Failed", Reason::Other, Class::Permanent),
    ("EAuth: Failed:detail", Reason::Other, Class::Permanent),
    ("EAuth:Something else", Reason::Other, Class::Permanent),
    ("EAuth:Rate limit exceeded", Reason::RateLimited, Class::Transient),
    ("EAuth:Too many requests", Reason::RateLimited, Class::Transient),
    (
        "EAccount:Invalid permissions",
        Reason::PermissionDenied,
        Class::Permanent,
    ),
    ("EFoo:Something new", Reason::Other, Class::Transient),
    ("EAPI:Invalid keys", Reason::Other, Class::Transient),
];

#[test]
fn each_documented_error_string_maps_to_its_reason_and_class() {
    for (code, reason, class) in TABLE {
        let failure = classify_api_error(code).unwrap_or_else(|| panic!("{code} is a failure"));
        assert_eq!(failure.reason, *reason, "{code}");
        assert_eq!(failure.class, *class, "{code}");
    }
}

/// The documented codes as (category, message, reason, class).
const DOCUMENTED: &[(&str, &str, Reason, Class)] = &[
    ("EAPI", "Invalid key", Reason::InvalidKey, Class::Permanent),
    ("EAPI", "Invalid signature", Reason::InvalidSignature, Class::Permanent),
    ("EAPI", "Invalid nonce", Reason::InvalidNonce, Class::Transient),
    (
        "EGeneral",
        "Permission denied",
        Reason::PermissionDenied,
        Class::Permanent,
    ),
    ("EAPI", "Permission denied", Reason::PermissionDenied, Class::Permanent),
    ("EGeneral", "Temporary lockout", Reason::Lockout, Class::Transient),
    ("EAPI", "Rate limit exceeded", Reason::RateLimited, Class::Transient),
    ("EGeneral", "Too many requests", Reason::RateLimited, Class::Transient),
    ("EService", "Throttled", Reason::RateLimited, Class::Transient),
    ("EService", "Unavailable", Reason::Unavailable, Class::Transient),
    ("EService", "Busy", Reason::Unavailable, Class::Transient),
    ("EService", "Deadline elapsed", Reason::Unavailable, Class::Transient),
    ("EGeneral", "Internal error", Reason::Unavailable, Class::Transient),
    ("EGeneral", "Invalid arguments", Reason::Other, Class::Permanent),
    ("EAPI", "Bad request", Reason::Other, Class::Permanent),
    ("EGeneral", "Unknown method", Reason::Other, Class::Permanent),
    ("EAuth", "Account temporary disabled", Reason::Other, Class::Permanent),
    ("EAuth", "Account unconfirmed", Reason::Other, Class::Permanent),
    ("EAuth", "Failed", Reason::Other, Class::Permanent),
    ("EAuth", "Rate limit exceeded", Reason::RateLimited, Class::Transient),
    ("EAuth", "Too many requests", Reason::RateLimited, Class::Transient),
    (
        "EAccount",
        "Invalid permissions",
        Reason::PermissionDenied,
        Class::Permanent,
    ),
];

proptest::proptest! {
    #[test]
    fn documented_codes_classify_whatever_spacing_and_detail_follow(
        row in 0..DOCUMENTED.len(),
        space in proptest::sample::select(vec!["", " ", "  "]),
        detail in proptest::sample::select(vec!["", ":", ":field", ": 1700000000", " 1700000000", ":a b c"]),
    ) {
        let (cat, msg, reason, class) = DOCUMENTED[row];
        let code = format!("{cat}:{space}{msg}{detail}");
        let failure = classify_api_error(&code).expect("an E code is a failure");
        proptest::prop_assert_eq!(failure.reason, reason, "{}", code);
        proptest::prop_assert_eq!(failure.class, class, "{}", code);
    }
}

#[test]
fn actions_follow_the_protocol_notes() {
    let action = |c| classify_api_error(c).unwrap().action;
    assert_eq!(action("EAPI:Invalid nonce"), Action::RetryOnceNow);
    assert_eq!(
        action("EGeneral:Temporary lockout"),
        Action::OpenCircuit(LOCKOUT_CIRCUIT)
    );
    assert!(LOCKOUT_CIRCUIT >= Duration::from_secs(15 * 60));
    assert_eq!(
        action("EService:Throttled: 1700000000"),
        Action::WaitUntil(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    );
    assert_eq!(
        action("EService:Throttled:1700000001"),
        Action::WaitUntil(UNIX_EPOCH + Duration::from_secs(1_700_000_001))
    );
    assert!(matches!(action("EAPI:Invalid key"), Action::Alert { .. }));
    let Action::Alert { hint } = action("EGeneral:Permission denied") else {
        panic!("permission denied alerts");
    };
    assert!(hint.contains("WebSocket interface"), "{hint}");
    assert!(hint.contains("IP Address Restriction"), "{hint}");
    let Action::Alert { hint } = action("EAPI:Invalid key") else {
        panic!("an invalid key alerts");
    };
    assert!(hint.contains("IP allowlist"), "{hint}");
    assert_eq!(
        action("EAuth:Rate limit exceeded"),
        Action::Backoff {
            at_least: RATE_LIMIT_MIN_BACKOFF
        }
    );
    assert_eq!(
        action("EAPI:Rate limit exceeded"),
        Action::Backoff {
            at_least: RATE_LIMIT_MIN_BACKOFF
        }
    );
    assert_eq!(
        action("EService:Unavailable"),
        Action::Backoff {
            at_least: Duration::ZERO
        }
    );
}

#[test]
fn warnings_alone_are_not_failures() {
    assert_eq!(classify_api_error("WGeneral:Deprecated"), None);
    assert_eq!(classify_api_errors::<&str>(&[]), None);
    assert_eq!(classify_api_errors(&["WAPI:Something", "WGeneral:Other"]), None);
    let mixed = classify_api_errors(&["WGeneral:Deprecated", "EAPI:Invalid nonce"]).unwrap();
    assert_eq!(mixed.reason, Reason::InvalidNonce);
}

#[test]
fn codes_kept_for_logs_are_sanitised_and_bounded() {
    let long = format!("EFoo:{}\n\u{7}", "x".repeat(500));
    let failure = classify_api_error(&long).unwrap();
    assert_eq!(failure.code.chars().count(), MAX_CODE_LEN);
    assert!(!failure.code.chars().any(char::is_control));
}

#[test]
fn transport_failures_are_transient_with_their_reason() {
    let cases = [
        (KrakenError::Transport("refused".into()), Reason::Transport),
        (KrakenError::Timeout(Duration::from_secs(1)), Reason::Timeout),
        (
            KrakenError::HttpStatus {
                status: 502,
                retry_after: None,
            },
            Reason::HttpStatus,
        ),
        (KrakenError::MalformedResponse("x".into()), Reason::MalformedResponse),
    ];
    for (error, reason) in cases {
        assert_eq!(error.reason(), reason);
        assert_eq!(error.class(), Class::Transient);
        assert!(matches!(error.action(), Action::Backoff { .. }));
    }
    let edge = KrakenError::HttpStatus {
        status: 429,
        retry_after: Some(Duration::from_secs(30)),
    };
    assert_eq!(edge.action(), Action::WaitFor(Duration::from_secs(30)));
}

#[test]
fn reason_labels_are_the_contracts() {
    let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        [
            "transport",
            "timeout",
            "http_status",
            "malformed_response",
            "invalid_key",
            "invalid_signature",
            "invalid_nonce",
            "permission_denied",
            "rate_limited",
            "lockout",
            "unavailable",
            "other",
            "key_too_powerful"
        ]
    );
}
