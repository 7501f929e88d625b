//! exec's output the pdsh way: each line of a command's output as
//! `HOST: line` (`HOST/ID: line` with `-n` over 1; the line alone with
//! `-N`), its standard output
//! on standard output and its standard error on standard error, nothing
//! else on standard output; the master's warnings on standard error as
//! `taskherd exec: ...`, its other events with `-v`.
//!
//! The herd's records go to a [`Printer`] on a thread of its own
//! ([`LogSink::spawn_output`]), which the end of the run waits for as it
//! waits for the log's writer. When standard output is closed
//! (`taskherd exec ... | head`), the run is stopped, as pdsh ends on its
//! SIGPIPE, and the rest of the output is dropped.

use std::io::Write;

use anyhow::Context as _;
use taskherd::config::{Config, LogFilter};
use taskherd::log::{InstanceLabel, LogRecord, LogSink, Stream, WriteProgress};
use taskherd::master::{Launcher, RunReport};
use taskherd::protocol::slave::Level;
use taskherd::supervise::shutdown::Shutdown;
use tokio::sync::mpsc;

/// Bytes buffered for one stream before they are written, within a batch.
const FLUSH_AT: usize = 64 * 1024;

/// Which of the master's events are written (on standard error).
#[derive(Debug, Clone)]
pub(super) enum Events {
    /// The master's own events at or above this level; none of the
    /// instances' (their ends are in the summary).
    Master(Level),
    /// Every event this filter lets through (`-v`, `--log-filter`,
    /// `TASKHERD_LOG`).
    Filter(LogFilter),
}

impl Events {
    fn shows(&self, record: &LogRecord) -> bool {
        match self {
            Events::Master(lowest) => record.instance.is_none() && record.level >= *lowest,
            Events::Filter(filter) => filter.enabled(record),
        }
    }
}

/// How lines are tagged: with the host, and the instance's id when a host
/// runs several.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tags {
    /// Tag with `HOST/ID` instead of `HOST`.
    pub(super) with_id: bool,
    /// Output lines carry their tag (not with `-N`); events and the
    /// summary always do.
    pub(super) on_output: bool,
}

impl Tags {
    /// `web2`, or `web2/5` (instance 5, as `TASKHERD_ID` says).
    pub(super) fn of(self, label: &InstanceLabel) -> String {
        if self.with_id {
            format!("{}/{}", label.host, label.id)
        } else {
            label.host.clone()
        }
    }
}

/// Runs the herd of `config` with the output written by [`Printer`];
/// `library_records` filters the records a command sends through the slave
/// library (its output lines are all written).
///
/// # Errors
/// If the runtime, the output thread or the signal handlers cannot be
/// set up; nothing was started then.
pub(super) fn run(
    config: Config,
    tags: Tags,
    events: Events,
    library_records: LogFilter,
) -> anyhow::Result<RunReport> {
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let (sink, writer) = LogSink::spawn_output("taskherd-out", move |records, progress| {
        let printer = Printer {
            tags,
            events,
            library_records,
            shutdown: stop,
            out: Output::new(Target::Stdout),
            err: Output::new(Target::Stderr),
            progress,
        };
        printer.run(records);
    })
    .context("cannot start the output thread")?;
    Launcher::new(config)
        .end_summary(false)
        .run_blocking_to(sink, writer, shutdown)
        .context("cannot start the master")
}

/// Standard output or standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Stdout,
    Stderr,
}

/// One of the two outputs: its pending bytes, and whether it still takes
/// any.
struct Output {
    target: Target,
    buf: Vec<u8>,
    closed: bool,
}

impl Output {
    fn new(target: Target) -> Self {
        Output {
            target,
            buf: Vec::with_capacity(FLUSH_AT),
            closed: false,
        }
    }

    /// Writes what is pending; `false` when the output is closed (or
    /// failed), which drops what it held.
    fn flush(&mut self) -> bool {
        if self.buf.is_empty() || self.closed {
            self.buf.clear();
            return !self.closed;
        }
        let written = match self.target {
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&self.buf).and_then(|()| out.flush())
            }
            Target::Stderr => {
                let mut err = std::io::stderr().lock();
                err.write_all(&self.buf).and_then(|()| err.flush())
            }
        };
        self.buf.clear();
        if written.is_err() {
            self.closed = true;
        }
        !self.closed
    }
}

/// Writes the records of the run as they come.
struct Printer {
    tags: Tags,
    events: Events,
    /// Which records sent through the slave library are written.
    library_records: LogFilter,
    shutdown: Shutdown,
    out: Output,
    err: Output,
    /// Told of each write, for the end's wait.
    progress: WriteProgress,
}

impl Printer {
    fn run(mut self, mut records: mpsc::Receiver<LogRecord>) {
        while let Some(record) = records.blocking_recv() {
            self.take(&record);
            while let Ok(record) = records.try_recv() {
                self.take(&record);
            }
            self.flush_both();
        }
        self.flush_both();
    }

    fn take(&mut self, record: &LogRecord) {
        match (&record.instance, record.stream) {
            (Some(label), Stream::Stdout) => {
                let tag = self.tags.on_output.then(|| self.tags.of(label));
                self.lines(Target::Stdout, tag.as_deref(), record);
            }
            (Some(label), Stream::Stderr) => {
                let tag = self.tags.on_output.then(|| self.tags.of(label));
                self.lines(Target::Stderr, tag.as_deref(), record);
            }
            (Some(label), Stream::Control) => {
                if self.library_records.enabled(record) {
                    let tag = self.tags.on_output.then(|| self.tags.of(label));
                    self.lines(Target::Stderr, tag.as_deref(), record);
                }
            }
            (label, _) => {
                if self.events.shows(record) {
                    let tag = match label {
                        Some(label) => format!("taskherd exec: {}", self.tags.of(label)),
                        None => "taskherd exec".to_string(),
                    };
                    self.lines(Target::Stderr, Some(&tag), record);
                }
            }
        }
    }

    /// Appends the record's lines to `target` as `TAG: line` (as they are
    /// without a tag); what the other output holds is written first, so
    /// that a terminal shows the two in order.
    fn lines(&mut self, target: Target, tag: Option<&str>, record: &LogRecord) {
        let (this, other) = match target {
            Target::Stdout => (&mut self.out, &mut self.err),
            Target::Stderr => (&mut self.err, &mut self.out),
        };
        if this.closed {
            return;
        }
        if !other.buf.is_empty() {
            flush(other, &self.shutdown, &self.progress);
        }
        for line in record.lines() {
            if let Some(tag) = tag {
                this.buf.extend_from_slice(tag.as_bytes());
                this.buf.extend_from_slice(b": ");
            }
            this.buf.extend_from_slice(line.as_bytes());
            this.buf.push(b'\n');
        }
        if this.buf.len() >= FLUSH_AT {
            flush(this, &self.shutdown, &self.progress);
        }
    }

    fn flush_both(&mut self) {
        flush(&mut self.out, &self.shutdown, &self.progress);
        flush(&mut self.err, &self.shutdown, &self.progress);
    }
}

/// Writes what `output` holds, counted in `progress`; standard output
/// closed stops the run (once), as pdsh ends when its reader has gone.
fn flush(output: &mut Output, shutdown: &Shutdown, progress: &WriteProgress) {
    let was_closed = output.closed;
    if !output.flush() && !was_closed && output.target == Target::Stdout {
        shutdown.request_stop("standard output was closed");
    }
    progress.wrote();
}
