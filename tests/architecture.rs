//! The one direction of imports (the crate map in `src/lib.rs`), held by
//! reading the sources as Rust with `syn`: every `use` tree (groups,
//! renames, globs, `self`/`super`/`crate`), every path in code and types,
//! and paths inside macro bodies, resolved to the crate module they name.
//!
//! - Each top-level module may reach only the modules its row of
//!   [`MAY_REACH`] names: Kraken → `kraken/` → `token/` → `http/` →
//!   consumer, with `broker/` and `cmd/` assembling them.
//! - `token/` knows Kraken only through its own `TokenSource` trait and the
//!   answer and error types a source yields; never the client, the
//!   credentials, nonces or signing (a few more names in its tests).
//! - `kraken/` takes from `token/` only the trait it implements.
//! - Nothing of the product reaches `sim/`: only the `demo` and `simulate`
//!   commands (and `cmd`'s error type naming the simulator's start error).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Which top-level modules each one may reach (besides itself). A module
/// missing here may reach none. `metrics` is the registry every component
/// registers its families into (`Metrics`, `Register`); the families it
/// re-exports are seen through to their owners. Where a row names
/// `kraken` or `token`, [`ITEMS`] narrows it to a few items.
const MAY_REACH: &[(&str, &[&str])] = &[
    ("clock", &[]),
    ("secret", &[]),
    ("signal", &[]),
    ("telemetry", &[]),
    ("backoff", &[]),
    ("bucket", &[]),
    ("sse", &[]),
    ("files", &["secret"]),
    ("tls", &["files", "secret"]),
    ("metrics", &["audit", "http", "identity", "token", "kraken"]),
    ("kraken", &["clock", "secret", "backoff", "bucket", "token"]),
    ("token", &["clock", "secret", "backoff", "bucket", "kraken", "metrics"]),
    (
        "audit",
        &["clock", "secret", "files", "http", "identity", "config", "metrics"],
    ),
    (
        "identity",
        &[
            "clock", "secret", "bucket", "backoff", "files", "tls", "http", "config", "metrics",
        ],
    ),
    (
        "http",
        &[
            "clock", "secret", "bucket", "token", "identity", "audit", "tls", "sse", "config", "metrics", "kraken",
        ],
    ),
    (
        "config",
        &[
            "clock", "secret", "files", "token", "identity", "http", "kraken", "tls", "audit",
        ],
    ),
    (
        "broker",
        &[
            "clock",
            "secret",
            "files",
            "config",
            "token",
            "kraken",
            "http",
            "identity",
            "metrics",
            "audit",
            "tls",
            "signal",
            "telemetry",
        ],
    ),
    ("sim", &["clock", "secret", "kraken", "bucket"]),
];

/// Of the modules named, the only items a module may name (outside its
/// tests, and in its tests), whichever re-export it names them through.
const ITEMS: &[(&str, &str, &[&str], &[&str])] = &[
    (
        "token",
        "kraken",
        // What a token source yields.
        &[
            "KrakenError",
            "WsToken",
            "Reason",
            "Action",
            "MAX_TOKEN_LIFETIME",
            "LOCKOUT_CIRCUIT",
            // What a source says of its key (GetApiKeyInfo), judged.
            "KeyCheck",
            "KeyInfo",
            "Verdict",
            "PERMISSIONS",
            "NONCE_AHEAD_HINT",
        ],
        // To script Kraken's answers.
        &["ApiFailure", "Class", "classify_api_error"],
    ),
    // Kraken's documented maximum lifetime bounds `min_ttl`; `/readyz`
    // names the key's verdict; the relay reads Kraken's WebSocket v2
    // messages (`kraken::ws`, pure: no client, no key).
    (
        "http",
        "kraken",
        &[
            "MAX_TOKEN_LIFETIME",
            "Verdict",
            "Request",
            "Answer",
            "Malformed",
            "error_answer",
            "METHODS",
            "CHANNELS",
        ],
        &[],
    ),
    ("identity", "kraken", &[], &[]),
    // The trait it implements.
    ("kraken", "token", &["FetchFuture", "InspectFuture", "TokenSource"], &[]),
];

/// The product's files that may reach the simulator.
const MAY_REACH_SIM: &[&str] = &["cmd/demo.rs", "cmd/simulate.rs", "cmd/mod.rs"];

/// One path a source file names, resolved within the crate.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reach {
    /// The module path of the naming code (`["token", "refresher", "calls"]`).
    from: Vec<String>,
    /// The crate path named (`["kraken", "client", "KrakenClient"]`).
    to: Vec<String>,
    /// Named in test code (`#[cfg(test)]`, a `tests` module or file).
    test: bool,
}

struct Reader {
    module: Vec<String>,
    test: bool,
    /// Names brought in by `use` (and what they stand for), per file.
    aliases: BTreeMap<String, Vec<String>>,
    /// `pub use` re-exports: the path they make (`metrics::Route`) and the
    /// path they stand for (`http::metrics::Route`).
    reexports: Vec<(Vec<String>, Vec<String>)>,
    /// Inside a `pub use`.
    public: bool,
    reaches: Vec<Reach>,
}

impl Reader {
    /// A path's segments resolved to the crate root, if it starts inside
    /// the crate (`crate`, `self`, `super`, or a name a `use` brought in).
    fn resolve(&self, segments: &[String]) -> Option<Vec<String>> {
        let (first, rest) = segments.split_first()?;
        let mut base = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.module.clone(),
            "super" => {
                let mut m = self.module.clone();
                m.pop()?;
                m
            }
            name => {
                let mut target = self.aliases.get(name)?.clone();
                target.extend(rest.iter().cloned());
                return Some(target);
            }
        };
        let mut rest = rest.iter().peekable();
        while rest.peek().is_some_and(|s| *s == "super") {
            base.pop()?;
            rest.next();
        }
        base.extend(rest.cloned());
        Some(base)
    }

    fn record(&mut self, segments: &[String]) {
        if let Some(to) = self.resolve(segments)
            && !to.is_empty()
        {
            self.reaches.push(Reach {
                from: self.module.clone(),
                to,
                test: self.test,
            });
        }
    }

    fn use_tree(&mut self, prefix: &[String], tree: &syn::UseTree) {
        let with = |name: &str| {
            let mut p = prefix.to_vec();
            p.push(name.to_owned());
            p
        };
        match tree {
            syn::UseTree::Path(p) => self.use_tree(&with(&p.ident.to_string()), &p.tree),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t)),
            syn::UseTree::Glob(_) => self.record(prefix),
            syn::UseTree::Name(n) => {
                let name = n.ident.to_string();
                let full = if name == "self" { prefix.to_vec() } else { with(&name) };
                self.bring(full.last().cloned(), &full);
            }
            syn::UseTree::Rename(r) => {
                let full = with(&r.ident.to_string());
                self.bring(Some(r.rename.to_string()), &full);
            }
        }
    }

    fn bring(&mut self, alias: Option<String>, full: &[String]) {
        if let Some(resolved) = self.resolve(full) {
            self.record(full);
            if let Some(alias) = alias.filter(|a| a != "_") {
                if self.public {
                    let mut made = self.module.clone();
                    made.push(alias.clone());
                    self.reexports.push((made, resolved.clone()));
                }
                self.aliases.insert(alias, resolved);
            }
        }
    }

    /// Paths inside a macro's tokens (`info!(x = ?crate::kraken::X)`).
    fn tokens(&mut self, tokens: TokenStream) {
        let mut run: Vec<String> = Vec::new();
        let mut colons = 0;
        for tree in tokens {
            match tree {
                TokenTree::Ident(i) if run.is_empty() || colons == 2 => {
                    run.push(i.to_string());
                    colons = 0;
                }
                TokenTree::Punct(p) if p.as_char() == ':' && !run.is_empty() && colons < 2 => colons += 1,
                other => {
                    self.flush(&mut run);
                    colons = 0;
                    match other {
                        TokenTree::Group(g) => self.tokens(g.stream()),
                        TokenTree::Ident(i) => run.push(i.to_string()),
                        _ => {}
                    }
                }
            }
        }
        self.flush(&mut run);
    }

    fn flush(&mut self, run: &mut Vec<String>) {
        if run.len() > 1 {
            let segments = std::mem::take(run);
            self.record(&segments);
        }
        run.clear();
    }
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        (a.path().is_ident("cfg") && a.meta.to_token_stream_string().contains("test")) || a.path().is_ident("test")
    })
}

trait MetaText {
    fn to_token_stream_string(&self) -> String;
}
impl MetaText for syn::Meta {
    fn to_token_stream_string(&self) -> String {
        quote_free(self)
    }
}
fn quote_free(meta: &syn::Meta) -> String {
    match meta {
        syn::Meta::List(l) => l.tokens.to_string(),
        _ => String::new(),
    }
}

impl<'ast> Visit<'ast> for Reader {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        let was = self.test;
        self.test |= is_test(&item.attrs);
        self.public = matches!(item.vis, syn::Visibility::Public(_));
        self.use_tree(&[], &item.tree);
        self.public = false;
        self.test = was;
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if let Some((_, items)) = &item.content {
            let was = (self.test, std::mem::take(&mut self.aliases));
            self.test |= is_test(&item.attrs) || item.ident == "tests";
            self.module.push(item.ident.to_string());
            for i in items {
                self.visit_item(i);
            }
            self.module.pop();
            self.test = was.0;
            self.aliases = was.1;
        }
    }

    fn visit_item_fn(&mut self, item: &'ast syn::ItemFn) {
        let was = self.test;
        self.test |= is_test(&item.attrs);
        syn::visit::visit_item_fn(self, item);
        self.test = was;
    }

    fn visit_item_impl(&mut self, item: &'ast syn::ItemImpl) {
        let was = self.test;
        self.test |= is_test(&item.attrs);
        syn::visit::visit_item_impl(self, item);
        self.test = was;
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.record(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

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
    out.sort();
    out
}

/// The module path of a file under `src/`.
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// Every path each file names, with the file's path under `src/`.
fn reaches_of(relative: &Path, text: &str) -> Vec<Reach> {
    read(relative, text).reaches
}

fn read(relative: &Path, text: &str) -> Reader {
    let file = syn::parse_file(text).unwrap_or_else(|e| panic!("{} does not parse: {e}", relative.display()));
    let module = module_of(relative);
    let mut reader = Reader {
        test: module.iter().any(|m| m == "tests"),
        module,
        aliases: BTreeMap::new(),
        reexports: Vec::new(),
        public: false,
        reaches: Vec::new(),
    };
    // `use` first, wherever it stands, so later paths see its names.
    for item in &file.items {
        if let syn::Item::Use(u) = item {
            reader.visit_item_use(u);
        }
    }
    reader.reaches.clear();
    reader.reexports.clear();
    reader.visit_file(&file);
    reader
}

/// A path with every re-export replaced by what it stands for
/// (`metrics::Route::Api` → `http::metrics::Route::Api`), so a module is
/// charged with what it really reaches.
fn canonical(mut path: Vec<String>, reexports: &[(Vec<String>, Vec<String>)]) -> Vec<String> {
    for _ in 0..8 {
        let Some((made, target)) = reexports
            .iter()
            .filter(|(made, _)| path.starts_with(made))
            .max_by_key(|(made, _)| made.len())
        else {
            break;
        };
        let mut next = target.clone();
        next.extend(path[made.len()..].iter().cloned());
        if next == path {
            break;
        }
        path = next;
    }
    path
}

/// Every path the crate's files name, re-exports seen through.
fn all_reaches() -> Vec<(String, Reach)> {
    let mut out = Vec::new();
    let mut reexports = Vec::new();
    for path in sources(&src()) {
        let relative = path.strip_prefix(src()).unwrap().to_owned();
        if relative == Path::new("main.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let reader = read(&relative, &text);
        reexports.extend(reader.reexports);
        for reach in reader.reaches {
            out.push((relative.to_string_lossy().into_owned(), reach));
        }
    }
    for (_, reach) in &mut out {
        reach.to = canonical(std::mem::take(&mut reach.to), &reexports);
    }
    out
}

/// The item a path names inside `module`: its first segment that is not a
/// submodule (`kraken::error::Reason::Auth` → `Reason`).
fn item_in(module: &str, to: &[String]) -> Option<String> {
    let dir = src().join(module);
    let mut here = dir.clone();
    for segment in to.iter().skip(1) {
        let sub = here.join(segment);
        if sub.is_dir() || sub.with_extension("rs").is_file() {
            here = sub;
            continue;
        }
        return Some(segment.clone());
    }
    None
}

#[test]
fn every_module_reaches_only_the_modules_of_its_row() {
    let rows: BTreeMap<&str, BTreeSet<&str>> = MAY_REACH
        .iter()
        .map(|(m, may)| (*m, may.iter().copied().collect()))
        .collect();
    let mut wrong = BTreeSet::new();
    for (file, reach) in all_reaches() {
        let (Some(from), Some(to)) = (reach.from.first(), reach.to.first()) else {
            continue;
        };
        if from == to || from == "cmd" || reach.test {
            continue;
        }
        let allowed = rows.get(from.as_str()).is_some_and(|may| may.contains(to.as_str()));
        if !allowed {
            wrong.insert(format!("{file} reaches {}", reach.to.join("::")));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the direction (tests/architecture.rs MAY_REACH):\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn token_http_and_identity_know_kraken_only_by_a_few_items_and_kraken_token_by_its_trait() {
    let mut wrong = BTreeSet::new();
    for (file, reach) in all_reaches() {
        let Some(from) = reach.from.first() else { continue };
        for (who, what, items, test_items) in ITEMS {
            if from != who || reach.to[0] != *what {
                continue;
            }
            let item = item_in(what, &reach.to).unwrap_or_else(|| reach.to.join("::"));
            let allowed = items.contains(&item.as_str()) || (reach.test && test_items.contains(&item.as_str()));
            if !allowed {
                wrong.insert(format!("{file} names {}", reach.to.join("::")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "items outside tests/architecture.rs ITEMS:\n{}",
        wrong.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn nothing_of_the_product_reaches_the_simulator() {
    for (file, reach) in all_reaches() {
        if reach.to[0] == "sim" && !file.starts_with("sim/") && !MAY_REACH_SIM.contains(&file.as_str()) {
            panic!("{file} reaches {}: only demo and simulate may", reach.to.join("::"));
        }
    }
}

#[test]
fn the_reader_sees_every_form_of_naming() {
    let text = r#"
        use crate::kraken;
        use crate::{kraken::client::ApiCredentials};
        use crate::kraken::{Reason as R, sign::verify};
        use super::super::super::kraken::nonce::NonceSource;
        fn f(_: kraken::client::KrakenClient) {
            tracing::info!(x = ?crate::kraken::otp::Otp::None);
            let y = crate::kraken::wire::MAX_TOKEN_LIFETIME;
        }
        /// See [`crate::kraken::sign`]: a comment names nothing.
        fn g() {}
    "#;
    let reaches = reaches_of(Path::new("token/refresher/calls.rs"), text);
    let named: BTreeSet<String> = reaches.iter().map(|r| r.to.join("::")).collect();
    for expected in [
        "kraken",
        "kraken::client::ApiCredentials",
        "kraken::Reason",
        "kraken::sign::verify",
        "kraken::nonce::NonceSource",
        "kraken::client::KrakenClient",
        "kraken::otp::Otp::None",
        "kraken::wire::MAX_TOKEN_LIFETIME",
    ] {
        assert!(named.contains(expected), "{expected} not seen in {named:?}");
    }
    assert!(
        !named
            .iter()
            .any(|n| n.starts_with("kraken::sign") && !n.ends_with("verify"))
    );
    assert_eq!(
        item_in(
            "kraken",
            &["kraken".into(), "error".into(), "Reason".into(), "Auth".into()]
        )
        .as_deref(),
        Some("Reason")
    );
    let tests = reaches_of(Path::new("token/refresher/tests/mod.rs"), "use crate::kraken::Class;");
    assert!(tests.iter().all(|r| r.test));
    let cfg = reaches_of(
        Path::new("token/gate.rs"),
        "#[cfg(test)]\nmod t { use crate::kraken::Class; }\nuse crate::kraken::Reason;",
    );
    assert_eq!(cfg.iter().map(|r| r.test).collect::<Vec<_>>(), [true, false]);
}
