//! Problems found in a config file, with their lines, and reading a section
//! key by key so that every bad key is reported at once.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeValue, ValueDeserializer};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// Dotted path of the key, e.g. `refresh.jitter` or `account[2].api_secret`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (Some(line), false) => write!(f, "line {line}: {}: {}", self.key, self.message),
            (Some(line), true) => write!(f, "line {line}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.key, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

/// Every problem found in a config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  {}: {problem}", self.path.display())?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// A problem with the file as a whole (unreadable, too slow).
    pub fn whole(path: &Path, message: String) -> Self {
        Self {
            path: path.to_owned(),
            problems: vec![Problem {
                line: None,
                key: String::new(),
                message,
            }],
        }
    }
}

/// Collects problems (and warnings) with lines computed from offsets.
pub(super) struct Findings<'s> {
    source: &'s str,
    pub(super) problems: Vec<Problem>,
    pub(super) warnings: Vec<Problem>,
    /// Keys already reported as malformed: not also reported as missing.
    pub(super) malformed: HashSet<String>,
}

pub(super) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

pub(super) fn at<T>(value: &Spanned<T>) -> Option<usize> {
    Some(value.span().start)
}

/// serde's "unknown field `x`, expected one of `a`, `b`" in the broker's words.
pub(super) fn reword(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let expected = rest
        .split_once(", expected ")
        .map(|(_, list)| list.trim_start_matches("one of ").replace('`', ""));
    match expected {
        Some(list) => format!("unknown key (expected one of: {list})"),
        None => "unknown key".to_owned(),
    }
}

impl<'s> Findings<'s> {
    pub(super) fn new(source: &'s str) -> Self {
        Self {
            source,
            problems: Vec::new(),
            warnings: Vec::new(),
            malformed: HashSet::new(),
        }
    }

    pub(super) fn line(&self, offset: usize) -> usize {
        self.source[..offset.min(self.source.len())].matches('\n').count() + 1
    }

    pub(super) fn place(&self, offset: Option<usize>, key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            line: offset.map(|o| self.line(o)),
            key: key.into(),
            message: message.into(),
        }
    }

    pub(super) fn problem(&mut self, offset: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let p = self.place(offset, key, message);
        self.problems.push(p);
    }

    pub(super) fn warning(&mut self, offset: Option<usize>, key: impl Into<String>, message: impl Into<String>) {
        let p = self.place(offset, key, message);
        self.warnings.push(p);
    }

    /// Reports `key` as missing, unless it was there and malformed.
    pub(super) fn missing(&mut self, offset: usize, key: String) {
        if !self.malformed.contains(&key) {
            self.problem(Some(offset), key, "missing");
        }
    }

    /// Reads one table into its section type. A key that does not fit (an
    /// unknown key, a wrong type) is reported and left out, and the rest of
    /// the table is read again, so every such key is reported at once.
    pub(super) fn section<T: DeserializeOwned + Default>(&mut self, value: &Spanned<DeValue<'_>>, prefix: &str) -> T {
        let DeValue::Table(table) = value.get_ref() else {
            let msg = format!("expected a table, found {}", value.get_ref().type_str());
            self.problem(at(value), prefix, msg);
            return T::default();
        };
        let mut table = table.clone();
        // Each round removes one key: it ends.
        for _ in 0..=table.len() {
            let attempt = Spanned::new(value.span(), DeValue::Table(table.clone()));
            let error = match T::deserialize(ValueDeserializer::from(attempt)) {
                Ok(section) => return section,
                Err(error) => error,
            };
            let span = error.span().unwrap_or(value.span());
            let inside = |s: std::ops::Range<usize>| s.start <= span.start && span.start < s.end.max(s.start + 1);
            let culprit = table
                .iter()
                .find(|(k, v)| inside(k.span()) || inside(v.span()))
                .map(|(k, v)| (k.clone(), inside(v.span()) && !inside(k.span())));
            let message = reword(error.message());
            let Some((key, within_value)) = culprit else {
                self.problem(Some(span.start), prefix, message);
                return T::default();
            };
            let path = join(prefix, key.get_ref());
            // A key nested in the culprit's value (`api_key = { bogus = 1 }`):
            // name it in the path.
            let shown = match error.message().strip_prefix("unknown field `") {
                Some(rest) if within_value => join(&path, rest.split('`').next().unwrap_or("")),
                _ => path.clone(),
            };
            self.problem(Some(span.start), shown, message);
            self.malformed.insert(path);
            table.remove(&key);
        }
        T::default()
    }
}
