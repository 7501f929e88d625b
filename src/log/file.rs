//! The log file, rotated by size: `herd.log` is renamed `herd.log.1`
//! (`herd.log.1` to `herd.log.2`, and so on up to `keep`, the oldest
//! dropped) and a fresh `herd.log` is opened.
//!
//! Lines are formatted into [`LogFile::buf`] and only written out whole,
//! so a rotation always falls between two lines: a line is never split
//! between two files, and a file only grows past `max_size` when a single
//! line is longer than that.
//!
//! Failures are reported (as messages for the writer to log), once per
//! kind of problem, and never end the run; the end of a problem is
//! reported once, after a line was written again:
//!
//! - a rotation that cannot rename keeps appending to the current file;
//!   rotated files already shifted are not shifted again: the next
//!   attempt ([`RETRY_AFTER`]) only renames the current file;
//! - a new file that cannot be opened after a rotation leaves the lines
//!   in the renamed one (`path.1`), which grows past `max_size`; only the
//!   open is retried;
//! - a file that cannot be written hands its lines back
//!   ([`LogFile::take_spill`]) for the terminal until it can be reopened.

use crate::protocol::slave::Level;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long after a failed rotation or reopen the next attempt is made.
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(5);

use super::FLUSH_AT;

/// Where the log file is and how it rotates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFileOptions {
    /// The file lines are appended to (created with its directory if
    /// needed).
    pub path: PathBuf,
    /// Size in bytes after which the file is rotated (at least 1).
    pub max_size: u64,
    /// How many rotated files (`path.1` ... `path.N`) are kept (at least 1).
    pub keep: u32,
}

/// A problem (or a recovery) of the log file, for the writer to log.
pub(super) type Notice = (Level, String);

/// What is wrong with the log file, so that it is reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    /// A rename of the rotation failed.
    Rotate,
    /// No new file could be opened after a rotation.
    OpenAfterRotation,
    /// A write failed, or the file could not be reopened after that.
    Write,
}

/// The open log file, its size and the lines not written yet.
pub(super) struct LogFile {
    options: LogFileOptions,
    /// `None` after a write error or a failed reopen: lines go to the
    /// terminal until `retry_at`.
    file: Option<File>,
    /// The name of `file`: `options.path`, or `path.1` while no new file
    /// could be opened after a rotation.
    current: PathBuf,
    /// Bytes in the current file (written, not counting `buf`).
    size: u64,
    /// Whole lines formatted but not written yet.
    pub(super) buf: Vec<u8>,
    /// Lines that could not be written, for the terminal.
    spill: Vec<u8>,
    /// No rotation or reopen is tried before this (after a failure).
    retry_at: Option<Instant>,
    /// The rotated files were shifted (`path.1` is free) but `path` could
    /// not be renamed: the next attempt only renames `path`.
    shifted: bool,
    /// `path` was renamed to `path.1` but no new `path` could be opened:
    /// the next attempt only opens it.
    reopen_after_rotation: bool,
    /// The problem reported last, until its end is reported.
    reported: Option<Problem>,
    /// The end of the reported problem, to report after the next
    /// successful write.
    recovered: Option<String>,
    /// Opens of a new file that fail on purpose (tests).
    #[cfg(test)]
    fail_opens: u32,
}

impl LogFile {
    /// Opens (appends to) the file, creating its directory if needed.
    ///
    /// # Errors
    /// If the directory cannot be created or the file not opened.
    pub(super) fn open(options: LogFileOptions) -> io::Result<LogFile> {
        let (file, size) = open_append(&options.path)?;
        Ok(LogFile {
            current: options.path.clone(),
            options,
            file: Some(file),
            size,
            buf: Vec::with_capacity(FLUSH_AT + 4096),
            spill: Vec::new(),
            retry_at: None,
            shifted: false,
            reopen_after_rotation: false,
            reported: None,
            recovered: None,
            #[cfg(test)]
            fail_opens: 0,
        })
    }

    /// Whether lines can go to the file now (else to the terminal).
    #[inline]
    pub(super) fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// To call once per batch: after a failed write, or a failed open
    /// after a rotation, tries to open the file again when it is time.
    pub(super) fn retry(&mut self, notices: &mut Vec<Notice>) {
        if (self.file.is_some() && !self.reopen_after_rotation) || !self.retry_due() {
            return;
        }
        let path = self.options.path.clone();
        let after_rotation = self.file.is_some();
        match self.open_new() {
            Ok(()) if after_rotation => {
                let rotated = numbered(&path, 1);
                self.cleared(format!(
                    "log file {} opened; the lines meanwhile are in {}",
                    path.display(),
                    rotated.display()
                ));
            }
            Ok(()) => self.cleared(format!(
                "log file {} reopened; lines since the error went to stdout",
                path.display()
            )),
            Err(err) => {
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                if !after_rotation {
                    let message = format!(
                        "cannot reopen log file {}: {err}; lines go to stdout meanwhile \
                         (tried every {}s)",
                        path.display(),
                        RETRY_AFTER.as_secs()
                    );
                    self.report(Problem::Write, message, notices);
                }
            }
        }
    }

    /// To call after a line was appended to [`LogFile::buf`] at `start`:
    /// rotates first if the line would take the file past `max_size`,
    /// and writes the buffer out once it is big.
    #[inline]
    pub(super) fn line_added(&mut self, start: usize, notices: &mut Vec<Notice>) {
        let total = self.size + self.buf.len() as u64;
        if total > self.options.max_size
            && self.size + start as u64 > 0
            && !self.reopen_after_rotation
            && self.retry_due()
        {
            self.rotate_before(start, notices);
        }
        if self.buf.len() >= FLUSH_AT {
            self.flush(notices);
        }
    }

    /// Writes what is before `start` to the current file, rotates, and
    /// keeps the line at `start..` for the new file.
    #[cold]
    fn rotate_before(&mut self, start: usize, notices: &mut Vec<Notice>) {
        self.write_out(start, notices);
        if self.file.is_some() {
            match self.rotate() {
                Ok(()) => self.cleared(format!("log file {} rotated", self.current.display())),
                Err((problem, message)) => {
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                    self.report(problem, message, notices);
                }
            }
        }
        self.buf.drain(..start);
    }

    /// Writes every buffered line out (to the terminal if the file is
    /// closed).
    pub(super) fn flush(&mut self, notices: &mut Vec<Notice>) {
        self.write_out(self.buf.len(), notices);
        self.buf.clear();
    }

    /// Lines that could not be written to the file, if any.
    #[inline]
    pub(super) fn take_spill(&mut self) -> Option<Vec<u8>> {
        if self.spill.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.spill))
        }
    }

    /// Writes `buf[..end]` to the file, or to the spill if it is closed or
    /// the write fails (the file is closed then, and reopened later).
    /// The caller removes those bytes from `buf`.
    fn write_out(&mut self, end: usize, notices: &mut Vec<Notice>) {
        let bytes = &self.buf[..end];
        if bytes.is_empty() {
            return;
        }
        let Some(file) = self.file.as_mut() else {
            self.spill.extend_from_slice(bytes);
            return;
        };
        match file.write_all(bytes) {
            Ok(()) => {
                self.size += bytes.len() as u64;
                if let Some(message) = self.recovered.take() {
                    self.reported = None;
                    notices.push((Level::Notice, message));
                }
            }
            Err(err) => {
                // Some of it may be in the file already: better twice
                // than lost.
                self.spill.extend_from_slice(bytes);
                self.file = None;
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                let message = format!(
                    "cannot write log file {}: {err}; lines go to stdout until {} can be \
                     reopened (tried every {}s)",
                    self.current.display(),
                    self.options.path.display(),
                    RETRY_AFTER.as_secs()
                );
                self.report(Problem::Write, message, notices);
            }
        }
    }

    /// Shifts `path.N-1` to `path.N` ... (unless a failed attempt already
    /// did), then `path` to `path.1`, then opens a new `path`.
    ///
    /// # Errors
    /// What failed, as a message to log. The current file stays open
    /// (renamed or not) and takes the lines until the next attempt.
    fn rotate(&mut self) -> Result<(), (Problem, String)> {
        let path = self.options.path.clone();
        let rename = |from: &Path, to: &Path| {
            rename_if_exists(from, to).map_err(|err| {
                let message = format!(
                    "cannot rotate the log: cannot rename {} to {}: {err}; appending to {} \
                     meanwhile (tried every {}s)",
                    from.display(),
                    to.display(),
                    path.display(),
                    RETRY_AFTER.as_secs()
                );
                (Problem::Rotate, message)
            })
        };
        if !self.shifted {
            // From the oldest: a failure leaves a hole, never a file
            // renamed over another that was not meant to go.
            for n in (1..self.options.keep).rev() {
                rename(&numbered(&path, n), &numbered(&path, n + 1))?;
            }
            self.shifted = true;
        }
        rename(&path, &numbered(&path, 1))?;
        self.shifted = false;
        self.current = numbered(&path, 1);
        match self.open_new() {
            Ok(()) => Ok(()),
            Err(err) => {
                self.reopen_after_rotation = true;
                let message = format!(
                    "cannot open a new log file {} after rotation: {err}; lines go on to {} \
                     until it can be (tried every {}s)",
                    path.display(),
                    self.current.display(),
                    RETRY_AFTER.as_secs()
                );
                Err((Problem::OpenAfterRotation, message))
            }
        }
    }

    /// Opens `path` (after a rotation or a failure); lines go there from
    /// now on.
    fn open_new(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_opens > 0 {
            self.fail_opens -= 1;
            return Err(io::Error::other("failing on purpose"));
        }
        let (file, size) = open_append(&self.options.path)?;
        self.file = Some(file);
        self.size = size;
        self.current = self.options.path.clone();
        self.retry_at = None;
        self.reopen_after_rotation = false;
        Ok(())
    }

    /// Reports `problem` unless it was the last one reported.
    fn report(&mut self, problem: Problem, message: String, notices: &mut Vec<Notice>) {
        self.recovered = None;
        if self.reported != Some(problem) {
            self.reported = Some(problem);
            notices.push((Level::Error, message));
        }
    }

    /// The reported problem is over: says so after the next write.
    fn cleared(&mut self, message: String) {
        if self.reported.is_some() {
            self.recovered = Some(message);
        }
    }

    fn retry_due(&self) -> bool {
        self.retry_at.is_none_or(|at| Instant::now() >= at)
    }
}

/// `path.n`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Opens `path` for appending (directory created if needed); returns it
/// with its current size.
fn open_append(path: &Path) -> io::Result<(File, u64)> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, max_size: u64, keep: u32) -> LogFileOptions {
        LogFileOptions {
            path: dir.join("herd.log"),
            max_size,
            keep,
        }
    }

    fn add(file: &mut LogFile, line: &str, notices: &mut Vec<Notice>) {
        let start = file.buf.len();
        file.buf.extend_from_slice(line.as_bytes());
        file.buf.push(b'\n');
        file.line_added(start, notices);
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn rotates_between_lines_and_keeps_the_last_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = LogFile::open(options(dir.path(), 100, 3)).unwrap();
        let mut notices = Vec::new();
        // 10-byte lines ("line 0000\n"): 10 per file, 60 lines = 6 files.
        for n in 0..60 {
            add(&mut file, &format!("line {n:04}"), &mut notices);
            if n % 7 == 0 {
                file.flush(&mut notices);
            }
        }
        file.flush(&mut notices);
        assert!(notices.is_empty(), "{notices:?}");
        assert!(file.take_spill().is_none());

        let base = dir.path().join("herd.log");
        let expect = |path: &Path, first: usize| {
            let want: String = (first..first + 10)
                .map(|n| format!("line {n:04}\n"))
                .collect();
            assert_eq!(read(path), want, "{}", path.display());
        };
        expect(&base, 50);
        expect(&numbered(&base, 1), 40);
        expect(&numbered(&base, 2), 30);
        expect(&numbered(&base, 3), 20);
        assert!(!numbered(&base, 4).exists(), "keep = 3 is respected");
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["herd.log", "herd.log.1", "herd.log.2", "herd.log.3"]
        );
    }

    #[test]
    fn lines_are_never_split_and_a_long_line_gets_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = LogFile::open(options(dir.path(), 25, 10)).unwrap();
        let mut notices = Vec::new();
        let lines = [
            "short 1",
            "a line longer than the maximum size",
            "short 2",
            "short 3",
            "x",
        ];
        for line in lines {
            add(&mut file, line, &mut notices);
        }
        file.flush(&mut notices);
        let base = dir.path().join("herd.log");
        let mut files = vec![read(&base)];
        for n in 1..=10 {
            files.push(read(&numbered(&base, n)));
        }
        files.retain(|text| !text.is_empty());
        files.reverse();
        for text in &files {
            assert!(text.ends_with('\n'), "whole lines only: {text:?}");
            assert!(
                text.len() <= 25 || text.lines().count() == 1,
                "only a single long line may exceed max_size: {text:?}"
            );
        }
        let all: Vec<&str> = files.iter().flat_map(|text| text.lines()).collect();
        assert_eq!(all, lines, "every line once, in order");
    }

    #[test]
    fn appends_to_an_existing_file_and_rotates_it_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("logs").join("herd.log");
        let options = LogFileOptions {
            path: base.clone(),
            max_size: 14,
            keep: 1,
        };
        let mut notices = Vec::new();
        let mut file = LogFile::open(options.clone()).unwrap();
        add(&mut file, "earlier", &mut notices);
        file.flush(&mut notices);
        drop(file);
        let mut file = LogFile::open(options).unwrap();
        add(&mut file, "later", &mut notices);
        file.flush(&mut notices);
        assert_eq!(read(&base), "earlier\nlater\n");
        add(&mut file, "next", &mut notices);
        add(&mut file, "then", &mut notices);
        add(&mut file, "last one", &mut notices);
        file.flush(&mut notices);
        assert_eq!(read(&numbered(&base, 1)), "next\nthen\n");
        assert_eq!(read(&base), "last one\n");
        assert!(!numbered(&base, 2).exists());
        assert!(notices.is_empty(), "{notices:?}");
    }

    #[test]
    fn a_failed_rotation_is_reported_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = LogFile::open(options(dir.path(), 10, 1)).unwrap();
        let base = dir.path().join("herd.log");
        // A directory where herd.log.1 should go: the rename fails.
        std::fs::create_dir(numbered(&base, 1)).unwrap();
        std::fs::write(numbered(&base, 1).join("x"), "x").unwrap();
        let mut notices = Vec::new();
        for n in 0..5 {
            add(&mut file, &format!("line {n}"), &mut notices);
        }
        file.flush(&mut notices);
        assert_eq!(
            notices.len(),
            1,
            "reported once, retried later: {notices:?}"
        );
        assert_eq!(notices[0].0, Level::Error);
        assert!(notices[0].1.contains("cannot rename"), "{}", notices[0].1);
        let text = read(&base);
        let want: String = (0..5).map(|n| format!("line {n}\n")).collect();
        assert_eq!(text, want, "kept appending");
        assert!(file.take_spill().is_none());
    }

    #[test]
    fn a_lost_file_spills_to_the_terminal_and_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = LogFile::open(options(dir.path(), 1 << 20, 2)).unwrap();
        let mut notices = Vec::new();
        // What a write error does.
        file.file = None;
        file.reported = Some(Problem::Write);
        file.retry_at = Some(Instant::now());
        add(&mut file, "while closed", &mut notices);
        file.flush(&mut notices);
        assert_eq!(file.take_spill().as_deref(), Some(&b"while closed\n"[..]));
        file.retry(&mut notices);
        assert!(file.is_open());
        assert!(
            notices.is_empty(),
            "told once a line is written: {notices:?}"
        );
        add(&mut file, "after", &mut notices);
        file.flush(&mut notices);
        assert_eq!(notices.len(), 1);
        assert!(notices[0].1.contains("reopened"), "{}", notices[0].1);
        assert_eq!(read(&dir.path().join("herd.log")), "after\n");
    }

    /// Writes `text` to `path`.
    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_failed_rename_is_retried_without_losing_rotated_files() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("herd.log");
        write(&numbered(&base, 1), "one\n");
        // A directory where herd.log.2 should become herd.log.3: the
        // rename fails.
        std::fs::create_dir(numbered(&base, 2)).unwrap();
        write(&numbered(&base, 2).join("x"), "x");
        write(&numbered(&base, 3), "three\n");
        let mut file = LogFile::open(options(dir.path(), 10, 3)).unwrap();
        let mut notices = Vec::new();
        for n in 0..20 {
            // Every attempt is due, as if 5 s had passed each time.
            file.retry_at = Some(Instant::now());
            add(&mut file, &format!("line {n}"), &mut notices);
            file.flush(&mut notices);
        }
        assert_eq!(notices.len(), 1, "reported once: {notices:?}");
        assert!(notices[0].1.contains("cannot rename"), "{}", notices[0].1);
        assert!(
            notices[0]
                .1
                .contains(&format!("appending to {} ", base.display())),
            "{}",
            notices[0].1
        );
        assert_eq!(read(&numbered(&base, 1)), "one\n");
        assert_eq!(read(&numbered(&base, 3)), "three\n");
        let want: String = (0..20).map(|n| format!("line {n}\n")).collect();
        assert_eq!(read(&base), want, "kept appending");

        // Fixed: the next rotation works, and says so after a write.
        std::fs::remove_dir_all(numbered(&base, 2)).unwrap();
        notices.clear();
        file.retry_at = Some(Instant::now());
        add(&mut file, "after", &mut notices);
        file.flush(&mut notices);
        assert_eq!(read(&base), "after\n");
        assert_eq!(read(&numbered(&base, 1)), want);
        assert_eq!(read(&numbered(&base, 2)), "one\n");
        assert!(!numbered(&base, 4).exists());
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0].0, Level::Notice);
        assert!(notices[0].1.contains("rotated"), "{}", notices[0].1);
    }

    #[test]
    fn a_failed_open_after_rotation_only_retries_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("herd.log");
        write(&numbered(&base, 1), "one\n");
        write(&numbered(&base, 2), "two\n");
        let mut file = LogFile::open(options(dir.path(), 10, 3)).unwrap();
        file.fail_opens = u32::MAX;
        let mut notices = Vec::new();
        add(&mut file, "first 0", &mut notices);
        for n in 0..20 {
            file.retry_at = Some(Instant::now());
            file.retry(&mut notices);
            add(&mut file, &format!("line {n}"), &mut notices);
            file.flush(&mut notices);
        }
        assert_eq!(notices.len(), 1, "reported once: {notices:?}");
        assert!(
            notices[0]
                .1
                .contains(&format!("lines go on to {} ", numbered(&base, 1).display())),
            "{}",
            notices[0].1
        );
        // One rotation, not one per attempt.
        let lines: String = (0..20).map(|n| format!("line {n}\n")).collect();
        assert_eq!(read(&numbered(&base, 1)), format!("first 0\n{lines}"));
        assert_eq!(read(&numbered(&base, 2)), "one\n");
        assert_eq!(read(&numbered(&base, 3)), "two\n");
        assert!(!base.exists());

        file.fail_opens = 0;
        notices.clear();
        file.retry_at = Some(Instant::now());
        file.retry(&mut notices);
        assert!(notices.is_empty(), "{notices:?}");
        add(&mut file, "after", &mut notices);
        file.flush(&mut notices);
        assert_eq!(read(&base), "after\n");
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].1.contains("opened"), "{}", notices[0].1);
        assert_eq!(read(&numbered(&base, 3)), "two\n");
    }
}
