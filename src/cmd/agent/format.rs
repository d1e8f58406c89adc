//! The token file's formats: the broker's JSON (with `expires_at`, never a
//! frozen `expires_in`), the bare token, or `KEY='value'` lines a shell or
//! a systemd `EnvironmentFile` reads.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The broker's token JSON without `expires_in` (which would be stale
    /// the moment it is written): `token`, `account`, `issued_at`,
    /// `expires_at`, `ws_url`.
    Json,
    /// The token alone, and a newline.
    Token,
    /// `KTB_TOKEN`, `KTB_EXPIRES_AT`, `KTB_WS_URL` and `KTB_ACCOUNT` as
    /// single-quoted `KEY='value'` lines.
    Env,
}

impl Format {
    /// The file's text for the broker's token JSON `value` (known to hold a
    /// token).
    pub(super) fn render(self, mut value: serde_json::Value) -> String {
        let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
        match self {
            Format::Json => {
                if let Some(object) = value.as_object_mut() {
                    object.remove("expires_in");
                }
                format!("{value}\n")
            }
            Format::Token => format!("{}\n", field(&value, "token")),
            Format::Env => [
                ("KTB_TOKEN", "token"),
                ("KTB_EXPIRES_AT", "expires_at"),
                ("KTB_WS_URL", "ws_url"),
                ("KTB_ACCOUNT", "account"),
            ]
            .iter()
            .map(|(name, key)| format!("{name}={}\n", quoted(&field(&value, key))))
            .collect(),
        }
    }
}

/// `text` in single quotes for a POSIX shell: a quote inside becomes `'\''`.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> serde_json::Value {
        serde_json::json!({
            "token": "tok/+=",
            "account": "main",
            "issued_at": "2026-12-05T10:00:00Z",
            "expires_at": "2026-12-05T10:15:00Z",
            "expires_in": 899,
            "ws_url": "wss://ws-auth.kraken.com/v2"
        })
    }

    #[test]
    fn json_keeps_the_use_by_and_drops_the_countdown() {
        let text = Format::Json.render(answer());
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["expires_at"], "2026-12-05T10:15:00Z");
        assert!(v.get("expires_in").is_none(), "{text}");
        assert_eq!(v["token"], "tok/+=");
        assert!(text.ends_with("}\n"));
    }

    #[test]
    fn token_is_the_token_alone() {
        assert_eq!(Format::Token.render(answer()), "tok/+=\n");
    }

    #[test]
    fn env_lines_are_quoted_for_a_shell() {
        let text = Format::Env.render(answer());
        assert_eq!(
            text,
            "KTB_TOKEN='tok/+='\nKTB_EXPIRES_AT='2026-12-05T10:15:00Z'\nKTB_WS_URL='wss://ws-auth.kraken.com/v2'\nKTB_ACCOUNT='main'\n"
        );
        assert_eq!(quoted("it's"), r"'it'\''s'");
    }
}
