//! The writer thread: takes records in batches, filters them, writes them
//! to the file and the terminal, one write per output and batch, and
//! hands each batch to the backlog and the live subscribers.
//!
//! A batch takes the output lines first (bounded channel), then the
//! master's events that came meanwhile (unbounded channel): an
//! instance's last lines mostly come before its "exited".

use super::feed::Feed;
use super::file::{LogFile, Notice};
use super::format::LinePrefix;
use super::terminal::TerminalOut;
use super::{LogRecord, Stream};
use crate::config::{LogFilter, LogFormat};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;
use tokio::sync::{mpsc, Notify};

/// Records taken in one batch at most, so that a producer that never lets
/// the channel run dry still sees its lines flushed and the status line
/// redrawn.
const MAX_BATCH: usize = 4096;

/// The status line text handed from [`super::LogSink::status_line`] to
/// the writer.
#[derive(Debug, Default)]
pub(super) struct StatusSlot {
    /// The latest text, and whether it changed since the writer took it.
    text: Mutex<(Option<String>, bool)>,
    /// Wakes the writer when the text changed.
    changed: Notify,
}

impl StatusSlot {
    /// Sets the text; wakes the writer if it changed.
    pub(super) fn set(&self, text: Option<String>) {
        let mut slot = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.0 != text {
            *slot = (text, true);
            drop(slot);
            self.changed.notify_one();
        }
    }

    /// The text, if it changed since the last call.
    fn take_change(&self) -> Option<Option<String>> {
        let mut slot = self.text.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = std::mem::replace(&mut slot.1, false);
        changed.then(|| slot.0.clone())
    }
}

/// Everything the writer thread owns.
pub(super) struct Writer<W: Write> {
    /// Text or JSON lines, in the file and on the terminal.
    pub(super) format: LogFormat,
    /// Which records are written (subscribers get all of them).
    pub(super) filter: LogFilter,
    /// Standard output: every record without a file, the master's own
    /// events with one (then through a queue and a thread of its own).
    pub(super) terminal: TerminalOut<W>,
    /// The rotated log file, if any.
    pub(super) file: Option<LogFile>,
    /// The backlog and live subscribers ([`super::LogSink::follow`]).
    pub(super) feed: Arc<Feed>,
    /// The records of the current batch, published at its end.
    pub(super) published: Vec<Arc<LogRecord>>,
    /// Batches written so far, for [`super::LogWriter::finish`] to tell a
    /// slow output from a stuck one.
    pub(super) progress: Arc<std::sync::atomic::AtomicU64>,
    /// Set when the terminal keeps a status line.
    pub(super) status: Option<Arc<StatusSlot>>,
    /// Problems of the log file, to be logged.
    pub(super) notices: Vec<Notice>,
    /// The prefix of the current record's lines (kept for its buffer).
    pub(super) prefix: LinePrefix,
}

/// What woke the writer.
enum Wake {
    /// An output line.
    Record(LogRecord),
    /// An event of the master.
    Event(LogRecord),
    /// Only the status line changed.
    Status,
}

impl<W: Write> Writer<W> {
    /// Writes until every sink is gone and every record written.
    pub(super) fn run(
        mut self,
        mut records_rx: mpsc::Receiver<LogRecord>,
        mut events_rx: mpsc::UnboundedReceiver<LogRecord>,
    ) {
        let mut events = Vec::new();
        let mut records = Vec::new();
        let mut open = (true, true);
        while let Some(wake) = self.wait(&mut records_rx, &mut events_rx, &mut open) {
            self.begin_batch();
            match wake {
                Wake::Record(record) => records.push(record),
                Wake::Event(event) => events.push(event),
                Wake::Status => {}
            }
            while records.len() < MAX_BATCH {
                let Ok(record) = records_rx.try_recv() else {
                    break;
                };
                records.push(record);
            }
            while events.len() < MAX_BATCH {
                let Ok(event) = events_rx.try_recv() else {
                    break;
                };
                events.push(event);
            }
            // Each channel is in order; the two are merged by time, so an
            // instance's "started" comes before the lines it printed at
            // once, and its "exited" after its last ones (a tie: the line
            // first).
            let mut events_in = events.drain(..).peekable();
            for record in records.drain(..) {
                while let Some(event) = events_in.next_if(|event| event.time < record.time) {
                    self.take(event);
                }
                self.take(record);
            }
            for event in events_in {
                self.take(event);
            }
            self.end_batch();
        }
        self.terminal.set_status(None);
        self.end_batch();
        self.terminal.close();
    }

    /// What comes next; `None` once every sink is gone and both channels
    /// are empty. `open` tells which channels may still give something.
    fn wait(
        &self,
        records_rx: &mut mpsc::Receiver<LogRecord>,
        events_rx: &mut mpsc::UnboundedReceiver<LogRecord>,
        open: &mut (bool, bool),
    ) -> Option<Wake> {
        let status_changed = async {
            match &self.status {
                Some(status) => status.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(status_changed);
        futures::executor::block_on(async {
            loop {
                tokio::select! {
                    biased;
                    record = records_rx.recv(), if open.0 => match record {
                        Some(record) => return Some(Wake::Record(record)),
                        None => open.0 = false,
                    },
                    event = events_rx.recv(), if open.1 => match event {
                        Some(event) => return Some(Wake::Event(event)),
                        None => open.1 = false,
                    },
                    () = &mut status_changed, if open.0 || open.1 => return Some(Wake::Status),
                    else => return None,
                }
            }
        })
    }

    fn begin_batch(&mut self) {
        if let Some(file) = &mut self.file {
            file.retry(&mut self.notices);
        }
        if let Some(text) = self.status.as_ref().and_then(|status| status.take_change()) {
            self.terminal.set_status(text.as_deref());
        }
        if !self.notices.is_empty() {
            self.report_notices();
        }
    }

    #[inline]
    fn take(&mut self, record: LogRecord) {
        let record = Arc::new(record);
        self.write(&record);
        self.published.push(record);
    }

    #[inline]
    fn write(&mut self, record: &LogRecord) {
        if !self.filter.enabled(record) {
            return;
        }
        let mut to_terminal = true;
        if let Some(file) = self.file.as_mut().filter(|file| file.is_open()) {
            self.prefix.set(record, self.format, false);
            // Line by line: the file may rotate between two lines of a
            // record that holds several.
            for line in record.lines() {
                let start = file.buf.len();
                self.prefix.write_line(&mut file.buf, line);
                file.buf.push(b'\n');
                file.line_added(start, &mut self.notices);
                if let Some(spilled) = file.take_spill() {
                    self.terminal.line_buf().extend_from_slice(&spilled);
                }
            }
            to_terminal = record.stream == Stream::Master;
        }
        if to_terminal {
            self.prefix.set(record, self.format, self.terminal.color());
            self.prefix.write_lines(self.terminal.line_buf(), record);
            self.terminal.line_added();
        }
        if !self.notices.is_empty() {
            self.report_notices();
        }
    }

    fn end_batch(&mut self) {
        self.progress
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Twice at most: the notices of a failed flush are flushed too.
        for _ in 0..2 {
            if let Some(file) = &mut self.file {
                file.flush(&mut self.notices);
                if let Some(spilled) = file.take_spill() {
                    self.terminal.line_buf().extend_from_slice(&spilled);
                }
            }
            if self.notices.is_empty() {
                break;
            }
            self.report_notices();
        }
        self.terminal.finish_batch();
        self.feed.publish(&mut self.published);
    }

    /// Logs the log file's problems as events of the master: on the
    /// terminal whatever the filter (the operator must hear of them), in
    /// the file when it is open, and to subscribers.
    #[cold]
    fn report_notices(&mut self) {
        for (level, message) in std::mem::take(&mut self.notices) {
            let record = LogRecord {
                time: SystemTime::now(),
                level,
                instance: None,
                stream: Stream::Master,
                message: message.into(),
            };
            if let Some(file) = self.file.as_mut().filter(|file| file.is_open()) {
                self.prefix.set(&record, self.format, false);
                self.prefix.write_lines(&mut file.buf, &record);
            }
            self.prefix.set(&record, self.format, self.terminal.color());
            self.prefix.write_lines(self.terminal.line_buf(), &record);
            self.published.push(Arc::new(record));
        }
    }
}
