//! The one direction of imports (the crate map in `src/lib.rs`), held by
//! reading the sources: Kraken → `kraken/` → `token/` → `http/` → consumer.
//!
//! - `token/` knows Kraken only through its own `TokenSource` trait and the
//!   answer and error types a source yields; never the client, the
//!   credentials, nonces or signing.
//! - `http/` and `identity/` never import `kraken/`.
//! - `kraken/` imports from `token/` only the trait it implements.
//! - Nothing of the product imports `sim/`: only the `demo` and `simulate`
//!   commands (and `cmd`'s error type naming the simulator's start error).

use std::path::{Path, PathBuf};

/// What `token/` may name of `kraken/`: what a token source yields.
const TOKEN_MAY_USE_OF_KRAKEN: &[&str] = &[
    "KrakenError",
    "WsToken",
    "Reason",
    "Action",
    "MAX_TOKEN_LIFETIME",
    "LOCKOUT_CIRCUIT",
    // In unit tests only, to script Kraken's answers.
    "ApiFailure",
    "Class",
    "classify_api_error",
];

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// What a file imports or names through `crate::<module>::`: the first
/// segment of each path (an item re-exported at the module's root, or a
/// submodule), comments left out.
fn named(text: &str, module: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let text = code.as_str();
    let prefix = format!("crate::{module}::");
    let mut names = Vec::new();
    for (i, _) in text.match_indices(&prefix) {
        let rest = &text[i + prefix.len()..];
        let items = if let Some(group) = rest.strip_prefix('{') {
            group.split('}').next().unwrap_or("").to_owned()
        } else {
            rest.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect()
        };
        for item in items.split(',') {
            let first = item.trim().split("::").next().unwrap_or("").trim().to_owned();
            if !first.is_empty() {
                names.push(first);
            }
        }
    }
    names
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn under(dir: &str) -> Vec<(PathBuf, String)> {
    sources(&src().join(dir))
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

#[test]
fn token_knows_kraken_only_through_what_a_source_yields() {
    for (path, text) in under("token") {
        for name in named(&text, "kraken") {
            assert!(
                TOKEN_MAY_USE_OF_KRAKEN.contains(&name.as_str()),
                "{} names kraken::{name}: token/ knows Kraken only through TokenSource",
                path.display()
            );
        }
    }
}

#[test]
fn http_and_identity_never_call_kraken() {
    for dir in ["http", "identity"] {
        for (path, text) in under(dir) {
            let names = named(&text, "kraken");
            assert!(names.is_empty(), "{} names kraken::{names:?}", path.display());
        }
    }
}

#[test]
fn kraken_takes_from_token_only_the_trait_it_implements() {
    for (path, text) in under("kraken") {
        for name in named(&text, "token") {
            assert!(
                ["source", "FetchFuture", "TokenSource"].contains(&name.as_str()),
                "{} names token::{name}",
                path.display()
            );
        }
        for module in ["http", "broker", "identity"] {
            assert!(named(&text, module).is_empty(), "{} names {module}/", path.display());
        }
    }
}

#[test]
fn nothing_of_the_product_imports_the_simulator() {
    let allowed = ["cmd/demo.rs", "cmd/simulate.rs", "cmd/mod.rs"];
    for path in sources(&src()) {
        let relative = path.strip_prefix(src()).unwrap().to_string_lossy().into_owned();
        if relative.starts_with("sim/") || allowed.contains(&relative.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            named(&text, "sim").is_empty(),
            "{relative} imports the simulator: only demo and simulate may"
        );
    }
}

#[test]
fn the_reader_sees_what_it_checks() {
    // The scanner itself: a use group, a path, a nested path.
    let text = "use crate::kraken::{KrakenError, sign::verify};\nlet x = crate::kraken::client::KrakenClient::new();";
    assert_eq!(named(text, "kraken"), ["KrakenError", "sign", "client"]);
    assert!(
        named("/// See [`crate::kraken::client`].", "kraken").is_empty(),
        "comments are not imports"
    );
}
