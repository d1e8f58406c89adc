//! Writing audit lines: on a thread of its own (file I/O never runs on the
//! async runtime), whole lines or nothing, every lost line counted.
//!
//! - A batch is appended whole or not at all: a write that fails part-way
//!   (a full disk) is cut back to where the batch began, so a line never
//!   fuses with the next. If even that fails, the next write starts on a
//!   new line. Each lost line counts in `audit_events_dropped_total`, and a
//!   WARN says so (at most every [`WARN_EVERY`]); an INFO says when writing
//!   works again.
//! - A file sink is reopened (created, 0600) when asked (a reload, SIGHUP)
//!   and when its path no longer names the open file (logrotate renamed or
//!   deleted it), checked before every batch.
//! - A `Message::Flush` is answered once everything queued before it is
//!   written: the broker's shutdown waits for it.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::AuditSink;
use crate::metrics::Metrics;

/// Lines written in one append at most.
const BATCH: usize = 256;
/// The fewest seconds between two WARNs about lost lines.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// A file the writer can cut back after a failed append.
pub(super) trait AppendFile: Write {
    fn size(&self) -> io::Result<u64>;
    fn truncate(&self, len: u64) -> io::Result<()>;
}

impl AppendFile for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn truncate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

/// Writes `bytes`, counting what went out even when it fails part-way.
fn write_counted(out: &mut impl Write, bytes: &[u8]) -> Result<(), (io::Error, usize)> {
    let mut written = 0;
    while written < bytes.len() {
        match out.write(&bytes[written..]) {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), written)),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, written)),
        }
    }
    out.flush().map_err(|e| (e, written))
}

/// Where lines go, with what a failed write left behind.
pub(super) struct Output<F> {
    out: F,
    /// A failed write left a partial line that could not be cut back: the
    /// next write starts on a new line.
    fragment: bool,
}

impl<F: Write> Output<F> {
    pub(super) fn new(out: F) -> Self {
        Self { out, fragment: false }
    }

    /// Appends `bytes` (whole lines) to a stream that cannot be cut back.
    fn append_stream(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.fragment {
            write_counted(&mut self.out, b"\n").map_err(|(e, _)| e)?;
            self.fragment = false;
        }
        write_counted(&mut self.out, bytes).map_err(|(e, written)| {
            self.fragment = written > 0;
            e
        })
    }
}

impl<F: AppendFile> Output<F> {
    /// Appends `bytes` (whole lines) whole, or cuts the file back.
    pub(super) fn append_whole(&mut self, bytes: &[u8]) -> io::Result<()> {
        let before = self.out.size()?;
        let start: &[u8] = if self.fragment { b"\n" } else { b"" };
        let mut all = Vec::with_capacity(start.len() + bytes.len());
        all.extend_from_slice(start);
        all.extend_from_slice(bytes);
        match write_counted(&mut self.out, &all) {
            Ok(()) => {
                self.fragment = false;
                Ok(())
            }
            Err((error, written)) => {
                if written > 0 && self.out.truncate(before).is_err() {
                    self.fragment = true;
                }
                Err(error)
            }
        }
    }
}

/// Opens (creating, 0600) an audit file for appending.
pub fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The file a path names now: device and inode.
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// A file sink that follows its path through rotation.
struct FileSink {
    path: PathBuf,
    open: Option<(Output<File>, (u64, u64))>,
}

impl FileSink {
    /// Reopens the file if asked, if it is not open, or if its path names
    /// another file now (a `stat` per batch: lines are never written to a
    /// file that was renamed or deleted before the batch).
    fn follow(&mut self, asked: bool) {
        let named = std::fs::metadata(&self.path).ok().map(|m| identity(&m));
        let held = self.open.as_ref().map(|(_, id)| *id);
        if !asked && held.is_some() && held == named {
            return;
        }
        match open(&self.path).and_then(|f| Ok((identity(&f.metadata()?), f))) {
            Ok((id, file)) => {
                if held != Some(id) {
                    info!(path = %self.path.display(), "audit file opened");
                }
                self.open = Some((Output::new(file), id));
            }
            Err(error) => {
                if self.open.is_some() {
                    warn!(%error, path = %self.path.display(), "cannot open the audit file");
                }
                self.open = None;
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.open {
            Some((out, _)) => out.append_whole(bytes),
            None => Err(io::Error::other("the audit file is not open")),
        }
    }
}

/// What the writer shares with the auditor.
pub(super) struct Shared {
    pub metrics: Metrics,
    /// Set to ask the writer to reopen its file.
    pub reopen: AtomicBool,
}

/// The sink's writing, one state per sink kind.
enum Sink {
    Stdout(Output<io::Stdout>),
    File(FileSink),
}

/// What the writer is handed.
pub(super) enum Message {
    Line(String),
    /// Answered once every line queued before it is written (or lost).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Starts the writer thread for `sink`; lines come through `rx`, and the
/// thread ends when every sender is gone.
pub(super) fn start(sink: &AuditSink, rx: mpsc::Receiver<Message>, shared: Arc<Shared>) {
    let sink = match sink {
        AuditSink::Stdout => Sink::Stdout(Output::new(io::stdout())),
        AuditSink::File(path) => Sink::File(FileSink {
            path: path.clone(),
            open: None,
        }),
    };
    let spawned = std::thread::Builder::new()
        .name("ktb-audit".into())
        .spawn(move || run(sink, rx, &shared));
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the audit writer: audit lines are counted as dropped");
    }
}

/// What the writer remembers between batches: lost lines not warned of yet.
#[derive(Default)]
struct Losses {
    since_warning: u64,
    last_warning: Option<Instant>,
    failing: bool,
}

fn run(mut sink: Sink, mut rx: mpsc::Receiver<Message>, shared: &Shared) {
    let mut losses = Losses::default();
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.blocking_recv() {
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => batch.push(line),
                Message::Flush(ack) => flushes.push(ack),
            }
            if batch.len() < BATCH && flushes.is_empty() {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            write_batch(&mut sink, &mut batch, shared, &mut losses);
        }
        for ack in flushes {
            let _ = ack.send(());
        }
    }
}

/// Writes `batch` (emptying it) whole, or counts and warns of its loss.
fn write_batch(sink: &mut Sink, batch: &mut Vec<String>, shared: &Shared, losses: &mut Losses) {
    let mut bytes = Vec::with_capacity(batch.iter().map(|l| l.len() + 1).sum());
    for line in batch.drain(..) {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    let lines = bytes.iter().filter(|b| **b == b'\n').count() as u64;
    let asked = shared.reopen.swap(false, Ordering::Relaxed);
    let written = match sink {
        Sink::Stdout(out) => out.append_stream(&bytes),
        Sink::File(file) => {
            file.follow(asked);
            file.append(&bytes)
        }
    };
    match written {
        Ok(()) => {
            if losses.failing {
                info!("audit lines are written again");
            }
            losses.failing = false;
        }
        Err(error) => {
            losses.failing = true;
            shared.metrics.audit().dropped(lines);
            losses.since_warning += lines;
            if losses.last_warning.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                warn!(
                    %error,
                    lost = losses.since_warning,
                    "cannot write audit lines: they are lost (counted in audit_events_dropped_total)"
                );
                losses.last_warning = Some(Instant::now());
                losses.since_warning = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    /// A file with `room` bytes left on its disk.
    struct FullDisk {
        file: File,
        room: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.file.write(&buf[..n])
        }

        fn flush(&mut self) -> io::Result<()> {
            self.file.flush()
        }
    }

    impl AppendFile for FullDisk {
        fn size(&self) -> io::Result<u64> {
            self.file.size()
        }

        fn truncate(&self, len: u64) -> io::Result<()> {
            self.file.truncate(len)
        }
    }

    fn contents(path: &Path) -> String {
        let mut text = String::new();
        File::open(path).unwrap().read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn a_full_disk_loses_whole_batches_and_never_fuses_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let disk = FullDisk {
            file: open(&path).unwrap(),
            room: 30,
        };
        let mut out = Output::new(disk);
        out.append_whole(b"{\"n\":1}\n").unwrap();
        // 22 bytes left: this batch fits only in part, and is cut back.
        assert!(out.append_whole(b"{\"n\":2}\n{\"n\":3}\n{\"n\":4}\n").is_err());
        assert_eq!(contents(&path), "{\"n\":1}\n");
        // Space comes back.
        out.out.room = 1000;
        out.append_whole(b"{\"n\":5}\n").unwrap();
        assert_eq!(contents(&path), "{\"n\":1}\n{\"n\":5}\n");
    }

    #[test]
    fn a_stream_cut_mid_line_starts_the_next_write_on_a_new_line() {
        struct Pipe {
            taken: Vec<u8>,
            room: usize,
        }
        impl Write for Pipe {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.room == 0 {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                let n = buf.len().min(self.room);
                self.room -= n;
                self.taken.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = Output::new(Pipe {
            taken: Vec::new(),
            room: 12,
        });
        out.append_stream(b"{\"n\":1}\n").unwrap();
        assert!(out.append_stream(b"{\"n\":2}\n").is_err());
        out.out.room = 100;
        out.append_stream(b"{\"n\":3}\n").unwrap();
        let text = String::from_utf8(out.out.taken).unwrap();
        assert_eq!(
            text, "{\"n\":1}\n{\"n\"\n{\"n\":3}\n",
            "the fragment stands alone; line 3 is whole"
        );
    }
}
