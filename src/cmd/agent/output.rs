//! The agent's token file: written in a directory held open and checked at
//! start, through an exclusive temporary file of an unpredictable name,
//! renamed over the file, so a reader sees the old token or the new one and
//! no other user can plant a file or link to take it.

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::hooks::Hooks;
use super::{AgentArgs, Format, Owner};
use crate::cmd::Error;
use crate::secret::SecretString;

/// What a write did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Written {
    Yes,
    /// The file already holds that token.
    Unchanged,
    /// The JSON holds no token: nothing written.
    NoToken,
}

/// Where and how the token file is written: its directory held open, so
/// every file operation is relative to the directory checked at start.
pub(super) struct Output {
    path: PathBuf,
    name: String,
    /// The directory as named, checked before each write to be still the
    /// one held open (`dir`).
    dir_path: PathBuf,
    dir: Arc<OwnedFd>,
    mode: u32,
    owner: Option<Owner>,
    format: Format,
    hooks: Arc<Hooks>,
    /// Held from the check of `last` until the write is recorded: the watch
    /// stream and a report never interleave an older token over a newer.
    writing: tokio::sync::Mutex<()>,
    /// Tokens written so far (a report made before the latest write has
    /// nothing left to report).
    generation: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<Option<[u8; 32]>>,
    /// The token the file holds, for a report of its rejection.
    current: std::sync::Mutex<Option<SecretString>>,
}

/// Why a directory is not safe to hold the token file, if it is not.
fn unsafe_directory(stat: &rustix::fs::Stat, euid: u32) -> Option<String> {
    let mode = stat.st_mode & 0o7777;
    let ours = stat.st_uid == euid;
    if mode & 0o002 != 0 && !(mode & 0o1000 != 0 && ours) {
        return Some(format!(
            "can be written by every user (mode {mode:o}) and is not a sticky directory of this user's: a file or link planted there could take the token"
        ));
    }
    if !ours && stat.st_uid != 0 {
        return Some(format!(
            "belongs to another user (uid {}), who could plant a file or link there",
            stat.st_uid
        ));
    }
    None
}

impl Output {
    pub(super) fn new(args: &AgentArgs) -> Result<Self, Error> {
        let path = args.out.clone();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.starts_with('.'))
            .ok_or_else(|| Error::Usage(format!("--out {} names no file", path.display())))?
            .to_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let fix = |why: String| {
            Error::Usage(format!(
                "--out {}: the directory {} {why}; use a directory only this user can write, or let the agent make one (a missing directory is made, private to the agent), e.g. --out {}",
                path.display(),
                dir.display(),
                dir.join("ktb").join(&name).display()
            ))
        };
        // A missing directory is made, ours and private; it is then opened
        // without following a link, so one planted meanwhile is refused.
        let made = match rustix::fs::mkdir(&dir, Mode::from_raw_mode(Self::dir_mode(args.mode))) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(fix(format!("cannot be made: {e}"))),
        };
        let flags = OFlags::DIRECTORY
            | OFlags::RDONLY
            | OFlags::CLOEXEC
            | if made { OFlags::NOFOLLOW } else { OFlags::empty() };
        let fd = rustix::fs::open(&dir, flags, Mode::empty()).map_err(|e| fix(format!("cannot be opened: {e}")))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| fix(format!("cannot be read: {e}")))?;
        if let Some(why) = unsafe_directory(&stat, rustix::process::geteuid().as_raw()) {
            return Err(fix(why));
        }
        if let Ok(existing) = rustix::fs::statat(&fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            && rustix::fs::FileType::from_raw_mode(existing.st_mode) == rustix::fs::FileType::Directory
        {
            return Err(Error::Usage(format!("--out {} is a directory", path.display())));
        }
        Ok(Self {
            path,
            name,
            dir_path: dir,
            dir: Arc::new(fd),
            mode: args.mode,
            owner: args.owner,
            format: args.format,
            hooks: Arc::new(Hooks::new(args)?),
            writing: tokio::sync::Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
            last: std::sync::Mutex::new(None),
            current: std::sync::Mutex::new(None),
        })
    }

    /// The token the file holds now, if any.
    pub(super) fn current(&self) -> Option<SecretString> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A directory the agent makes: private, with group search when the
    /// file is group-readable (an engine in the pod's group reads it).
    fn dir_mode(file_mode: u32) -> u32 {
        if file_mode & 0o040 != 0 { 0o750 } else { 0o700 }
    }

    /// Tokens written so far.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// [`Output::replace_file`], then the hooks (`--exec`, `--signal`),
    /// waited for.
    pub(super) async fn write(&self, json: &str) -> Result<Written, String> {
        let written = self.replace_file(json).await?;
        if written == Written::Yes {
            self.hooks.run(&self.path).await;
        }
        Ok(written)
    }

    /// [`Output::replace_file`], with the hooks run behind (a report's
    /// answer does not wait for a slow `--exec`).
    pub(super) async fn write_hooks_behind(&self, json: &str) -> Result<Written, String> {
        let written = self.replace_file(json).await?;
        if written == Written::Yes {
            let (hooks, path) = (Arc::clone(&self.hooks), self.path.clone());
            tokio::spawn(async move { hooks.run(&path).await });
        }
        Ok(written)
    }

    /// Replaces the file with the token in `json` (the broker's token JSON),
    /// in the agent's format, unless it already holds that token.
    async fn replace_file(&self, json: &str) -> Result<Written, String> {
        let _one_writer = self.writing.lock().await;
        let parsed = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .filter(|v| v["token"].as_str().is_some_and(|t| !t.is_empty()));
        let Some(value) = parsed else {
            warn!("the broker sent a token JSON without a token; ignored");
            return Ok(Written::NoToken);
        };
        let token = SecretString::new(value["token"].as_str().unwrap_or_default());
        let expires_at = value["expires_at"].as_str().map(str::to_owned);
        let sha: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
        if *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) == Some(sha) {
            return Ok(Written::Unchanged);
        }
        self.still_the_directory()?;
        let (dir, name, mode, owner) = (Arc::clone(&self.dir), self.name.clone(), self.mode, self.owner);
        let text = self.format.render(value);
        tokio::task::spawn_blocking(move || replace(&dir, &name, text.as_bytes(), mode, owner))
            .await
            .map_err(|e| format!("writing {} failed: {e}", self.path.display()))?
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sha);
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        info!(
            file = %self.path.display(),
            token = %hex::encode(&sha[..4]),
            expires_at = expires_at.as_deref().unwrap_or(""),
            "token file replaced"
        );
        Ok(Written::Yes)
    }
}

impl Output {
    /// Whether `--out`'s directory still names the directory held open: in
    /// a parent others may write (an `emptyDir`), another user can rename
    /// the agent's directory aside and put one of their own in its place,
    /// and an engine would read their file. The agent stops rather than
    /// write where no engine reads.
    fn still_the_directory(&self) -> Result<(), String> {
        let held = rustix::fs::fstat(&*self.dir).map_err(|e| format!("cannot read the held directory: {e}"))?;
        let named = rustix::fs::stat(&self.dir_path).ok();
        match named {
            Some(named) if (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino) => Ok(()),
            _ => Err(format!(
                "{} is no longer the directory the agent checked at start: another user replaced it, so an engine reading {} would not read the agent's token; give the agent a directory whose parent only the pod's own user can write",
                self.dir_path.display(),
                self.path.display()
            )),
        }
    }
}

/// In `dir`: a temporary file of an unpredictable name, created exclusively
/// and never through a link, written, fsynced, given its mode and owner,
/// renamed over `name`; then the directory fsynced.
fn replace(dir: &OwnedFd, name: &str, bytes: &[u8], mode: u32, owner: Option<Owner>) -> std::io::Result<()> {
    let tmp = format!(".{name}.tmp-{:016x}", rand::random::<u64>());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, tmp.as_str(), flags, Mode::from_raw_mode(mode))?;
    let result = (|| {
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)?;
        // The umask may have narrowed the mode at creation; set it exactly.
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
        if let Some(owner) = owner {
            rustix::fs::fchown(
                &file,
                Some(rustix::fs::Uid::from_raw(owner.uid)),
                owner.gid.map(rustix::fs::Gid::from_raw),
            )?;
        }
        file.sync_all()?;
        rustix::fs::renameat(dir, tmp.as_str(), dir, name)?;
        rustix::fs::fsync(dir)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::super::IDLE_LIMIT;
    use super::*;
    use crate::cmd::client::ConsumerArgs;
    use std::os::unix::fs::PermissionsExt as _;

    fn args(out: PathBuf, mode: u32) -> AgentArgs {
        AgentArgs {
            consumer: ConsumerArgs {
                url: "http://127.0.0.1:1".into(),
                account: None,
                token_file: None,
                ca_file: None,
                cert_file: None,
                key_file: None,
            },
            out,
            mode,
            owner: None,
            once: false,
            idle_limit: IDLE_LIMIT,
            format: Format::Json,
            exec: None,
            signal: None,
            signal_pid_file: None,
            report_listen: None,
        }
    }

    fn listing(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn the_file_is_replaced_whole_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.json");
        let out = Output::new(&args(path.clone(), 0o640)).unwrap();
        assert_eq!(out.write(r#"{"token":"one"}"#).await.unwrap(), Written::Yes);
        assert_eq!(out.write(r#"{"token":"one"}"#).await.unwrap(), Written::Unchanged);
        assert_eq!(out.write(r#"{"token":"two"}"#).await.unwrap(), Written::Yes);
        assert_eq!(out.write(r#"{"token":""}"#).await.unwrap(), Written::NoToken);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"token\":\"two\"}\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(listing(dir.path()), ["token.json"], "no temporary file left behind");
    }

    #[tokio::test]
    async fn a_planted_link_or_file_never_receives_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = dir.path().join("token.json");
        // What an attacker would plant under the old predictable names.
        for pid in [std::process::id(), 1, 2] {
            std::os::unix::fs::symlink(&victim, dir.path().join(format!(".token.json.tmp-{pid}"))).unwrap();
        }
        let out = Output::new(&args(path.clone(), 0o600)).unwrap();
        out.write(r#"{"token":"secret-token"}"#).await.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(std::fs::read_to_string(&path).unwrap().contains("secret-token"));
        assert!(!std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
    }

    #[test]
    fn a_directory_others_may_write_is_refused_unless_sticky_and_ours() {
        let euid = rustix::process::geteuid().as_raw();
        let stat_of = |mode: u32, uid: u32| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let mut stat = rustix::fs::stat(dir.path()).unwrap();
            stat.st_uid = uid;
            stat
        };
        let emptydir = stat_of(0o777, 0);
        assert!(unsafe_directory(&emptydir, 1000).unwrap().contains("every user"));
        assert!(
            unsafe_directory(&stat_of(0o1777, 0), 1000).is_some(),
            "sticky but not ours (/tmp)"
        );
        assert!(
            unsafe_directory(&stat_of(0o1777, euid), euid).is_none(),
            "sticky and ours"
        );
        assert!(unsafe_directory(&stat_of(0o700, euid), euid).is_none());
        assert!(
            unsafe_directory(&stat_of(0o770, euid), euid).is_none(),
            "the pod's group may write"
        );
        assert!(unsafe_directory(&stat_of(0o755, 0), euid).is_none(), "root's own");
        assert!(
            unsafe_directory(&stat_of(0o755, 4242), 1000)
                .unwrap()
                .contains("another user")
        );
    }

    #[tokio::test]
    async fn a_directory_swapped_under_the_agent_stops_it() {
        let base = tempfile::tempdir().unwrap();
        let out = Output::new(&args(base.path().join("ktb/token.json"), 0o600)).unwrap();
        out.write(r#"{"token":"one"}"#).await.unwrap();
        // Another user renames the agent's directory aside and puts theirs.
        std::fs::rename(base.path().join("ktb"), base.path().join("aside")).unwrap();
        std::fs::create_dir(base.path().join("ktb")).unwrap();
        std::fs::write(base.path().join("ktb/token.json"), r#"{"token":"ATTACKER"}"#).unwrap();
        let refused = out.write(r#"{"token":"two"}"#).await.unwrap_err();
        assert!(refused.contains("no longer the directory"), "{refused}");
        assert!(
            std::fs::read_to_string(base.path().join("aside/token.json"))
                .unwrap()
                .contains("one"),
            "nothing more is written where no engine reads"
        );
    }

    #[tokio::test]
    async fn a_missing_directory_is_made_private_and_a_shared_one_refused() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let refused = Output::new(&args(base.path().join("token.json"), 0o600))
            .err()
            .unwrap()
            .to_string();
        assert!(refused.contains("every user"), "{refused}");
        assert!(
            refused.contains("ktb/token.json"),
            "the error names the way out: {refused}"
        );
        let out = Output::new(&args(base.path().join("ktb/token.json"), 0o640)).unwrap();
        out.write(r#"{"token":"t"}"#).await.unwrap();
        let made = std::fs::metadata(base.path().join("ktb")).unwrap();
        assert_eq!(made.permissions().mode() & 0o777, 0o750);
        // Made once, reused after (the sidecar after the init container).
        assert!(Output::new(&args(base.path().join("ktb/token.json"), 0o640)).is_ok());
    }
}
