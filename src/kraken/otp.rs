//! The `otp` field of a 2FA-protected key: a static password, or a TOTP code
//! made fresh for each call from a base32 seed (RFC 6238: SHA-1, 6 digits,
//! 30 s steps, as authenticator apps and Kraken use).

use std::fmt;

use totp_rs::{Builder, Secret, Totp};

use crate::secret::{REDACTED, SecretString};

/// The TOTP time step: totp-rs's default, RFC 6238's and authenticator apps'.
pub const TOTP_STEP_SECS: u64 = 30;

/// The OTP material could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OtpError {
    #[error("the TOTP seed is not valid base32")]
    NotBase32,
    #[error("the TOTP seed is empty")]
    EmptySeed,
    #[error("the OTP password is empty")]
    EmptyPassword,
}

/// The 2FA material of one API key.
#[derive(Clone)]
pub enum Otp {
    /// A static password, sent as is.
    Static(SecretString),
    /// An authenticator seed; a code is made per call.
    Totp(Box<Totp>),
}

impl fmt::Debug for Otp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Otp::Static(_) => write!(f, "Otp::Static({REDACTED})"),
            Otp::Totp(_) => write!(f, "Otp::Totp({REDACTED})"),
        }
    }
}

impl Otp {
    pub fn static_password(password: SecretString) -> Result<Self, OtpError> {
        if password.expose().trim().is_empty() {
            return Err(OtpError::EmptyPassword);
        }
        Ok(Otp::Static(password))
    }

    /// A TOTP source from a base32 seed (spaces and case ignored, padding optional).
    pub fn totp_from_base32(seed: &SecretString) -> Result<Self, OtpError> {
        let cleaned: String = seed
            .expose()
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '=')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if cleaned.is_empty() {
            return Err(OtpError::EmptySeed);
        }
        let secret = Secret::try_from_base32(&cleaned).map_err(|_| OtpError::NotBase32)?;
        if secret.as_bytes().is_empty() {
            return Err(OtpError::EmptySeed);
        }
        // `build_noncompliant`: real seeds are often 80 bits, below the
        // 128-bit minimum totp-rs enforces for seeds it generates itself.
        Ok(Otp::Totp(Box::new(
            Builder::new().with_secret(secret).build_noncompliant(),
        )))
    }

    /// The secret material itself, to tell on reload whether it changed.
    pub fn material(&self) -> &[u8] {
        match self {
            Otp::Static(password) => password.expose().as_bytes(),
            Otp::Totp(totp) => totp.secret().as_bytes(),
        }
    }

    /// The code to send at `unix_secs`.
    pub fn code_at(&self, unix_secs: u64) -> SecretString {
        match self {
            Otp::Static(password) => password.clone(),
            Otp::Totp(totp) => SecretString::new(totp.generate(unix_secs).to_string()),
        }
    }

    /// Whether the code changes with time (TOTP) rather than being fixed.
    pub fn is_time_based(&self) -> bool {
        matches!(self, Otp::Totp(_))
    }

    /// The TOTP time step at `unix_secs` (0 for a static password).
    pub fn step_at(&self, unix_secs: u64) -> u64 {
        match self {
            Otp::Static(_) => 0,
            Otp::Totp(_) => unix_secs / TOTP_STEP_SECS,
        }
    }

    /// When TOTP step `step` begins (unix seconds).
    pub fn step_start(&self, step: u64) -> u64 {
        match self {
            Otp::Static(_) => 0,
            Otp::Totp(_) => step.saturating_mul(TOTP_STEP_SECS),
        }
    }

    /// When a TOTP source next yields a different code (unix seconds).
    pub fn next_code_at(&self, unix_secs: u64) -> Option<u64> {
        match self {
            Otp::Static(_) => None,
            Otp::Totp(totp) => Some(totp.next_step(unix_secs)),
        }
    }

    /// The TOTP step whose code `code` is, within one step of skew either way
    /// of `unix_secs` (a static password: step 0); `None` if not acceptable.
    /// The simulator's side.
    pub fn accepted_step(&self, code: &str, unix_secs: u64) -> Option<u64> {
        match self {
            Otp::Static(_) => self.accepts(code, unix_secs).then_some(0),
            Otp::Totp(totp) => {
                let step = unix_secs / TOTP_STEP_SECS;
                [step.saturating_sub(1), step, step + 1]
                    .into_iter()
                    .find(|s| totp.generate(s * TOTP_STEP_SECS).to_string() == code)
            }
        }
    }

    /// Whether `code` is acceptable at `unix_secs` (one step of skew either
    /// way for TOTP); the simulator's side.
    pub fn accepts(&self, code: &str, unix_secs: u64) -> bool {
        use subtle::ConstantTimeEq;
        match self {
            Otp::Static(password) => {
                let expected = password.expose().as_bytes();
                expected.len() == code.len() && bool::from(expected.ct_eq(code.as_bytes()))
            }
            Otp::Totp(totp) => totp.check(code, unix_secs).is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B seed ("12345678901234567890"), SHA-1.
    const RFC_SEED_B32: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

    #[test]
    fn totp_matches_rfc_6238_vectors() {
        let otp = Otp::totp_from_base32(&SecretString::new(RFC_SEED_B32)).unwrap();
        // RFC 6238 gives 8-digit codes; the 6-digit code is their last six digits.
        assert_eq!(otp.code_at(59).expose(), "287082");
        assert_eq!(otp.code_at(1_111_111_109).expose(), "081804");
        assert_eq!(otp.code_at(2_000_000_000).expose(), "279037");
        assert_eq!(otp.next_code_at(59), Some(60));
    }

    #[test]
    fn totp_steps_are_30_seconds() {
        let otp = Otp::totp_from_base32(&SecretString::new(RFC_SEED_B32)).unwrap();
        assert!(otp.is_time_based());
        assert_eq!(otp.step_at(59), 1);
        assert_eq!(otp.step_at(60), 2);
        assert_eq!(otp.step_start(2), 60);
        let fixed = Otp::static_password(SecretString::new("p")).unwrap();
        assert!(!fixed.is_time_based());
    }

    #[test]
    fn totp_seed_tolerates_spacing_case_and_padding() {
        let spaced = "gezd gnbv gy3t qojq gezd gnbv gy3t qojq==";
        let otp = Otp::totp_from_base32(&SecretString::new(spaced)).unwrap();
        assert_eq!(otp.code_at(59).expose(), "287082");
        assert!(otp.accepts("287082", 59));
        assert!(otp.accepts("287082", 80), "one step of skew");
        assert!(!otp.accepts("287082", 200));
    }

    #[test]
    fn bad_seeds_and_passwords_are_refused() {
        assert_eq!(
            Otp::totp_from_base32(&SecretString::new("not base32!")).unwrap_err(),
            OtpError::NotBase32
        );
        assert_eq!(
            Otp::totp_from_base32(&SecretString::new("  ")).unwrap_err(),
            OtpError::EmptySeed
        );
        assert_eq!(
            Otp::static_password(SecretString::new(" ")).unwrap_err(),
            OtpError::EmptyPassword
        );
    }

    #[test]
    fn static_password_is_sent_as_is_and_debug_is_redacted() {
        let otp = Otp::static_password(SecretString::new("s3cret-pass")).unwrap();
        assert_eq!(otp.code_at(0).expose(), "s3cret-pass");
        assert!(otp.accepts("s3cret-pass", 0));
        assert!(!otp.accepts("s3cret-pas", 0));
        assert_eq!(otp.next_code_at(0), None);
        assert!(!format!("{otp:?}").contains("s3cret"));
        let totp = Otp::totp_from_base32(&SecretString::new(RFC_SEED_B32)).unwrap();
        assert!(!format!("{totp:?}").contains("GEZD"));
    }
}
