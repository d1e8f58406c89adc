//! Reading a secret from its place: a file (regular, bounded, its mode
//! checked) or an environment variable, wrapped at once in a redacting type.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::SecretSource;
use super::problems::{Findings, at};
use super::raw::SecretRef;
use crate::files::{FileBytes, FileError, FileText, MAX_SECRET_BYTES, read_regular, read_regular_bytes};
use crate::secret::SecretString;

/// Reads secrets; a parameter so tests need not touch the process environment.
pub trait SecretReader {
    fn env(&self, var: &str) -> Option<String>;
    fn file(&self, path: &Path) -> Result<FileText, FileError>;
    /// A file's bytes, for secrets that need not be text.
    fn file_bytes(&self, path: &Path) -> Result<FileBytes, FileError> {
        self.file(path).map(|t| FileBytes {
            bytes: t.text.into_bytes(),
            world_readable: t.world_readable,
        })
    }
    /// Whether secrets are read at all: `check-config --no-secrets` checks
    /// everything else, in a pipeline that has the config but not the
    /// secrets (a placeholder of the right form stands in for each).
    fn reads_secrets(&self) -> bool {
        true
    }
}

/// [`SystemSecrets`] without the secrets: public files (certificates) and
/// the environment are read, secrets never.
pub struct NoSecrets;

impl SecretReader for NoSecrets {
    fn env(&self, var: &str) -> Option<String> {
        SystemSecrets.env(var)
    }

    fn file(&self, path: &Path) -> Result<FileText, FileError> {
        SystemSecrets.file(path)
    }

    fn reads_secrets(&self) -> bool {
        false
    }
}

/// What stands in for a secret not read, in the form its key needs.
fn placeholder(path: &str) -> Vec<u8> {
    if path.ends_with(".api_secret") {
        // A 64-byte secret, as Kraken issues, in standard base64.
        return "A".repeat(86).into_bytes().into_iter().chain(*b"==").collect();
    }
    if path.ends_with(".totp_secret") {
        return b"AAAAAAAAAAAAAAAA".to_vec();
    }
    if path == "audit.fingerprint_key" {
        return vec![b'x'; 32];
    }
    b"not-read".to_vec()
}

/// Reads from the real environment and filesystem: regular files only, of a
/// bounded size ([`read_regular`]).
pub struct SystemSecrets;

impl SecretReader for SystemSecrets {
    fn env(&self, var: &str) -> Option<String> {
        std::env::var(var).ok()
    }

    fn file(&self, path: &Path) -> Result<FileText, FileError> {
        read_regular(path, MAX_SECRET_BYTES)
    }

    fn file_bytes(&self, path: &Path) -> Result<FileBytes, FileError> {
        read_regular_bytes(path, MAX_SECRET_BYTES)
    }
}

/// Replaces each `${NAME}` in `text` with the environment variable NAME, so
/// one config can name a per-replica file (`/keys/${KTB_REPLICA}/api-key`).
/// Errs with the name of the first variable that is unset.
pub fn expand_env<R: SecretReader>(text: &str, reader: &R) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        out.push_str(&reader.env(name).ok_or_else(|| name.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a file read through `{ file = ... }` holds a secret (a key, a
/// secret, a seed: anyone able to read it is worth a warning) or public
/// material (a certificate, a CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Material {
    Secret,
    Public,
}

/// Reads a secret's bytes from its place; the warning for a secret file
/// anyone may read.
pub(super) fn secret_bytes<R: SecretReader>(
    f: &mut Findings<'_>,
    reader: &R,
    value: &Spanned<SecretRef>,
    path: &str,
    material: Material,
) -> Option<(Vec<u8>, SecretSource)> {
    let place = at(value);
    let SecretRef::Place(source) = value.get_ref() else {
        f.problem(
            place,
            path,
            "secrets never live in the config file: use { file = \"/path\" } or { env = \"VAR\" }",
        );
        return None;
    };
    let read = match (&source.file, &source.env) {
        (Some(file), None) if material == Material::Secret && !reader.reads_secrets() => {
            expand_env(file.get_ref(), reader)
                .map(|file| (placeholder(path), SecretSource::File(PathBuf::from(file)), None))
                .map_err(|var| format!("environment variable {var} (in the file path) is not set"))
        }
        (None, Some(var)) if material == Material::Secret && !reader.reads_secrets() => {
            Ok((placeholder(path), SecretSource::Env(var.get_ref().clone()), None))
        }
        (Some(file), None) => from_file(reader, file.get_ref(), material),
        (None, Some(var)) => reader
            .env(var.get_ref())
            .map(|text| (text.into_bytes(), SecretSource::Env(var.get_ref().clone()), None))
            .ok_or_else(|| format!("environment variable {} is not set", var.get_ref())),
        _ => Err("give exactly one of file = \"/path\" or env = \"VAR\"".to_owned()),
    };
    match read {
        Ok((bytes, source, warning)) => {
            if let Some(warning) = warning {
                f.warning(place, path, warning);
            }
            Some((bytes, source))
        }
        Err(problem) => {
            f.problem(place, path, problem);
            None
        }
    }
}

/// A secret's bytes from a file (its path may name environment variables),
/// with a warning if it is a secret anyone may read; or the problem.
fn from_file<R: SecretReader>(
    reader: &R,
    file: &str,
    material: Material,
) -> Result<(Vec<u8>, SecretSource, Option<String>), String> {
    let file = expand_env(file, reader)
        .map(PathBuf::from)
        .map_err(|var| format!("environment variable {var} (in the file path) is not set"))?;
    let read = reader
        .file_bytes(&file)
        .map_err(|e| format!("cannot read secret file {}: {e}", file.display()))?;
    let warning = (read.world_readable && material == Material::Secret).then(|| {
        format!(
            "secret file {} is readable by every user on the machine: make it 0600 or 0640 (in Kubernetes, the Secret volume's defaultMode)",
            file.display()
        )
    });
    Ok((read.bytes, SecretSource::File(file), warning))
}

/// Reads a text secret from its place (trailing newline trimmed), wrapping
/// it at once.
pub(super) fn secret<R: SecretReader>(
    f: &mut Findings<'_>,
    reader: &R,
    value: &Spanned<SecretRef>,
    path: &str,
    material: Material,
) -> Option<(SecretString, SecretSource)> {
    let place = at(value);
    let (bytes, origin) = secret_bytes(f, reader, value, path, material)?;
    let Ok(raw) = String::from_utf8(bytes) else {
        f.problem(place, path, format!("the secret from {origin} is not valid UTF-8 text"));
        return None;
    };
    let value = raw.trim_end_matches(['\n', '\r']).to_owned();
    if value.trim().is_empty() {
        f.problem(place, path, format!("the secret from {origin} is empty"));
        return None;
    }
    Some((SecretString::new(value), origin))
}
