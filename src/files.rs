//! Reading the config file and secret files safely: only regular files, of
//! a bounded size, opened so that a FIFO or a device can never block or
//! flood the reader, and (through [`read_off_runtime`]) never on the async
//! runtime's threads and never without a deadline.
//!
//! Why: a secret file replaced by a FIFO froze the broker's control loop
//! (SIGTERM ignored until the FIFO was fed), and a symlink to `/dev/zero`
//! grew `check-config` past 2 GB. Kubernetes mounts Secrets as symlinks to
//! regular files, which are followed as before.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::time::Duration;

/// The largest secret file read: keys, secrets and seeds are under 200 bytes.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// The largest config file read.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// How long reading the config and its secrets may take before a reload or
/// a start-up gives up (a stalled network filesystem, say).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("it is a {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("it is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("it is not valid UTF-8")]
    NotUtf8,
}

/// A file's text, and whether anyone on the machine may read it.
#[derive(Debug)]
pub struct FileText {
    pub text: String,
    /// The file's mode lets every user read it (`o+r`).
    pub world_readable: bool,
}

/// A file's bytes, and whether anyone on the machine may read it.
#[derive(Debug)]
pub struct FileBytes {
    pub bytes: Vec<u8>,
    /// The file's mode lets every user read it (`o+r`).
    pub world_readable: bool,
}

fn kind(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// Reads a regular file of at most `limit` bytes of UTF-8 text; see
/// [`read_regular_bytes`].
pub fn read_regular(path: &Path, limit: u64) -> Result<FileText, FileError> {
    let read = read_regular_bytes(path, limit)?;
    let text = String::from_utf8(read.bytes).map_err(|_| FileError::NotUtf8)?;
    Ok(FileText {
        text,
        world_readable: read.world_readable,
    })
}

/// Reads a regular file of at most `limit` bytes. Symlinks are followed; a
/// FIFO, socket, device or directory is refused without reading a byte, and
/// opening it never blocks (`O_NONBLOCK`).
pub fn read_regular_bytes(path: &Path, limit: u64) -> Result<FileBytes, FileError> {
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    // The opened file itself, not the path: no swap between check and read.
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular(kind(meta.file_type())));
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { limit });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // `take`: a file that grows while read still stops at the limit.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { limit });
    }
    Ok(FileBytes {
        bytes,
        world_readable: meta.permissions().mode() & 0o004 != 0,
    })
}

/// The blocking read took longer than its deadline.
#[derive(Debug, thiserror::Error)]
#[error("reading took longer than {0:?} (a stalled filesystem?)")]
pub struct TimedOut(pub Duration);

/// Runs `read` on tokio's blocking pool with a deadline, so a slow or stuck
/// filesystem never blocks the runtime or whoever awaits this.
pub async fn read_off_runtime<T: Send + 'static>(
    deadline: Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TimedOut> {
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(read)).await {
        Ok(Ok(value)) => Ok(value),
        // The closure panicked: surface it as the bug it is.
        Ok(Err(join)) => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err(TimedOut(deadline)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_regular_file_is_read_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "value\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let read = read_regular(&path, 100).unwrap();
        assert_eq!(read.text, "value\n");
        assert!(!read.world_readable);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_regular(&path, 100).unwrap().world_readable);
    }

    #[test]
    fn a_symlink_to_a_regular_file_is_followed_as_kubernetes_mounts_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data"), "k").unwrap();
        std::os::unix::fs::symlink(dir.path().join("data"), dir.path().join("link")).unwrap();
        assert_eq!(read_regular(&dir.path().join("link"), 100).unwrap().text, "k");
    }

    #[test]
    fn a_fifo_is_refused_at_once_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success());
        // No writer ever opens it: a blocking open would hang this test.
        let err = read_regular(&fifo, 100).unwrap_err();
        assert_eq!(err.to_string(), "it is a FIFO, not a regular file");
    }

    #[test]
    fn devices_directories_and_big_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero")).unwrap();
        let err = read_regular(&dir.path().join("zero"), 100).unwrap_err();
        assert_eq!(err.to_string(), "it is a character device, not a regular file");
        assert!(matches!(
            read_regular(dir.path(), 100),
            Err(FileError::NotRegular("directory"))
        ));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 101]).unwrap();
        assert_eq!(
            read_regular(&big, 100).unwrap_err().to_string(),
            "it is larger than 100 bytes"
        );
        let binary = dir.path().join("bin");
        std::fs::write(&binary, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_regular(&binary, 100), Err(FileError::NotUtf8)));
        assert!(matches!(
            read_regular(&dir.path().join("missing"), 100),
            Err(FileError::Io(_))
        ));
    }

    #[tokio::test]
    async fn a_read_that_stalls_is_given_up_after_its_deadline() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let stalled = read_off_runtime(Duration::from_millis(50), move || rx.recv().ok()).await;
        assert!(stalled.is_err());
        drop(tx); // lets the blocking thread finish
        let quick = read_off_runtime(Duration::from_secs(5), || 7).await.unwrap();
        assert_eq!(quick, 7);
    }
}
