//! The log stream: every instance's lines and the master's own events,
//! written by one thread in text or JSON lines. (An agent feeds its
//! instances' records to its link to the master through the same
//! [`LogSink`].)
//!
//! Producers (output readers, control links) send records through a
//! bounded channel: a child that prints faster than the output can take
//! is slowed down, never has lines dropped. The master's own events
//! ([`LogSink::master_event`], [`LogSink::instance_event`]) go through a
//! second, unbounded channel and never wait: a stalled output (`taskherd
//! run herd.toml | less`, left on one page) slows the children's output,
//! never the supervision, the control socket or a stop. The writer thread
//! takes records in batches (output first, then the events that came
//! meanwhile) and formats them straight into its buffers, so a burst costs
//! one write system call per output, not one per line.
//!
//! # Where lines go
//!
//! Every record goes first to the backlog of recent records (the last
//! [`BACKLOG_LINES`] lines) and to the live subscribers
//! ([`LogSink::follow`], [`LogSink::subscribe`], for `taskherd logs`),
//! unfiltered. Then the [`LogFilter`] decides whether it is written:
//!
//! - without a log file, to standard output;
//! - with a log file ([`LogFileOptions`], rotated by size), to the file,
//!   and only the master's own events (stream [`Stream::Master`]: starts,
//!   exits, restarts, failures, stops) also to standard output, so that
//!   the terminal (or the journal) shows what the herd does without its
//!   output. A file that cannot be written sends its lines to standard
//!   output until it can be reopened. The terminal then has a thread and
//!   a bounded queue of its own: a terminal that does not keep up never
//!   holds the file back; it misses lines instead, and is told how many
//!   ("N lines not shown on the terminal").
//!
//! On a terminal, text lines can be colored by level, and a status line
//! ([`LogSink::status_line`]) is kept below the last line.
//!
//! - `feed`: the backlog and the live feed of `taskherd logs`.
//! - `filter`: which records the [`LogFilter`] (`info,web=debug`) lets through.
//! - `format`: a record to lines of text or JSON.
//! - `message`: a record's text and its lines ([`Message`]), found once.
//! - `file`: the rotated log file.
//! - `terminal`: colors and the status line.
//! - `writer`: the writer thread.

mod feed;
mod file;
mod filter;
mod format;
mod message;
mod terminal;
mod writer;

pub use feed::{Follow, LogTotals, BACKLOG_BYTES, BACKLOG_LINES};
pub use file::LogFileOptions;
pub(crate) use message::line_content;
pub use message::Message;
// The filter is parsed with the config, which holds it.
pub use crate::config::{FilterError, LogFilter};
pub use terminal::is_dumb_terminal;

// The label and stream of a line travel with it between hosts: wire data.
pub use crate::protocol::instance::{InstanceLabel, Stream};

use crate::config::{LogColor, LogFormat, LogSpec};
use crate::protocol::slave::Level;
use feed::Feed;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use terminal::{QueuedTerminal, TerminalOut};
use tokio::sync::{broadcast, mpsc};
use writer::{StatusSlot, Writer};

/// Records buffered between producers and the writer thread.
const LOG_CHANNEL_LEN: usize = 8192;

/// Records kept for live subscribers: one that falls further behind
/// loses the oldest and is told how many ([`broadcast::error::RecvError::Lagged`]).
pub const LIVE_CHANNEL_LEN: usize = 4096;

/// One line of the log, or several (the lines of one read of an
/// instance's output), with the same time, level and instance.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// When the master received it.
    pub time: SystemTime,
    /// Severity.
    pub level: Level,
    /// The instance it is about; `None` for the master's own events.
    pub instance: Option<Arc<InstanceLabel>>,
    /// Where it came from.
    pub stream: Stream,
    /// The text, without trailing newline (`"text".into()`, or
    /// `String::into`). Output relayed in bulk holds every whole line of
    /// one read: see [`LogRecord::lines`].
    pub message: Message,
}

impl LogRecord {
    /// The lines of the message (one, unless it holds several separated
    /// by `\n`), without a `\r` that ends one; each is logged as a line of
    /// its own with the record's time, level and instance.
    #[inline]
    pub fn lines(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + Clone {
        self.message.lines()
    }
}

/// How the writer writes: the resolved form of a config's `[log]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogOptions {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// Which records are written (subscribers get all of them).
    pub filter: LogFilter,
    /// Color text lines on the terminal output by level.
    pub color: bool,
    /// The terminal output is a TTY that keeps a status line
    /// ([`LogSink::status_line`]); ignored otherwise.
    pub status_line: bool,
    /// Also write to a rotated file; the terminal output then only gets
    /// the master's own events.
    pub file: Option<LogFileOptions>,
}

impl Default for LogOptions {
    /// Text, filter `info`, no colors, no status line, no file.
    fn default() -> Self {
        LogOptions {
            format: LogFormat::Text,
            filter: LogFilter::default(),
            color: false,
            status_line: false,
            file: None,
        }
    }
}

/// Why the log stream could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The log file (or its directory) could not be opened.
    #[error("cannot open log file {}", path.display())]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not be spawned.
    #[error("cannot start the log writer thread")]
    Thread(#[source] std::io::Error),
}

/// A cloneable handle to the log stream.
#[derive(Debug, Clone)]
pub struct LogSink {
    /// Output lines: bounded, so that a fast child waits for the output.
    records_tx: mpsc::Sender<LogRecord>,
    /// The master's events: unbounded, so that supervision never waits
    /// for the output. `None` for a [`LogSink::channel`] sink, whose
    /// events go through `records_tx` like the rest.
    events_tx: Option<mpsc::UnboundedSender<LogRecord>>,
    /// What every clone shares with the writer.
    shared: Arc<Shared>,
}

/// The parts of a sink that are the same for all its clones.
#[derive(Debug)]
struct Shared {
    /// The backlog and live feed; the writer holds a clone to publish.
    feed: Arc<Feed>,
    /// Set when the writer keeps a status line.
    status: Option<Arc<StatusSlot>>,
    /// The writer's filter, for subscribers that want the same view.
    filter: LogFilter,
}

/// The writer thread behind a [`LogSink`]; join it to be sure every record
/// was written.
#[derive(Debug)]
pub struct LogWriter {
    thread: std::thread::JoinHandle<()>,
    /// Disconnected when the thread ends (or dies): `finish` wakes at
    /// once instead of polling.
    done: std::sync::mpsc::Receiver<()>,
    progress: Arc<std::sync::atomic::AtomicU64>,
}

/// Bytes an output (file or terminal) buffers before writing them, even
/// within a batch.
const FLUSH_AT: usize = 64 * 1024;

/// How long [`LogWriter::finish`] waits for an output that takes nothing
/// (`taskherd run | stuck`) before it gives up on the last records.
const FINISH_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// How often [`LogWriter::finish`] looks whether the output still takes
/// something.
const FINISH_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Told by an output thread ([`LogSink::spawn_output`]) each time it
/// wrote something.
#[derive(Debug, Clone)]
pub struct WriteProgress(Arc<std::sync::atomic::AtomicU64>);

impl WriteProgress {
    /// Something was written.
    pub fn wrote(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl LogWriter {
    /// Runs `body` on a thread named `name`, whose writes `progress`
    /// counts: the writer to wait for.
    fn spawn(
        name: &str,
        progress: Arc<std::sync::atomic::AtomicU64>,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<LogWriter> {
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Dropped as the thread ends, by return or by panic.
                let _done = done_tx;
                body();
            })?;
        Ok(LogWriter {
            thread,
            done,
            progress,
        })
    }

    /// Waits until every sink is dropped and every record written, or
    /// until the output has taken nothing for 10 s (a pipe nobody reads):
    /// then says so on standard error and returns, so that the process can
    /// exit.
    ///
    /// A writer thread that died (a bug) is reported on standard error:
    /// the records sent after its death were lost.
    pub fn finish(self) {
        use std::sync::atomic::Ordering;
        use std::sync::mpsc::RecvTimeoutError;
        let mut seen = self.progress.load(Ordering::Relaxed);
        let mut since = std::time::Instant::now();
        // The thread's end disconnects `done`: no poll interval to wait
        // out after the last record (it used to cost the exit up to 20 ms).
        while let Err(RecvTimeoutError::Timeout) = self.done.recv_timeout(FINISH_CHECK) {
            let now = self.progress.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                since = std::time::Instant::now();
            } else if since.elapsed() >= FINISH_STALL {
                eprintln!(
                    "taskherd: the log output has taken nothing for {}s; exiting without the last log lines",
                    FINISH_STALL.as_secs()
                );
                return;
            }
        }
        // The thread only ends by its channels closing; a panic in it has
        // already been printed by the panic hook, not what it cost.
        if let Err(panic) = self.thread.join() {
            let cause = crate::error_text::panic_text(panic.as_ref());
            eprintln!(
                "taskherd: the log writer thread died ({cause}); log records after that were lost"
            );
        }
    }
}

impl LogSink {
    /// Starts a writer thread writing every record to `out` in `format`:
    /// no filter, no colors, no status line, no file.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn spawn<W: Write + Send + 'static>(
        format: LogFormat,
        out: W,
    ) -> std::io::Result<(LogSink, LogWriter)> {
        let options = LogOptions {
            format,
            filter: LogFilter::all(),
            ..LogOptions::default()
        };
        LogSink::spawn_with(out, options).map_err(|err| match err {
            LogError::Thread(err) => err,
            other => std::io::Error::other(other),
        })
    }

    /// Starts the log of a config's `[log]` table, on standard output
    /// and in the log file if one is set (relative to `base_dir`, the
    /// config's directory). Colors with `color = "auto"` and the status
    /// line are on when standard output is a terminal that is not
    /// `TERM=dumb` ([`is_dumb_terminal`]; colors not if `NO_COLOR` is
    /// set either).
    ///
    /// # Errors
    /// If the log file cannot be opened or the thread spawned.
    pub fn start(spec: &LogSpec, base_dir: &Path) -> Result<(LogSink, LogWriter), LogError> {
        let stdout = std::io::stdout();
        // A dumb terminal is a terminal for the rest (its width, for
        // one), not for escape sequences.
        let tty = stdout.is_terminal();
        let ansi = tty && !is_dumb_terminal();
        let color = match spec.color {
            LogColor::Always => true,
            LogColor::Never => false,
            LogColor::Auto => ansi && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        };
        let options = LogOptions {
            format: spec.format,
            filter: spec.filter.clone(),
            color,
            status_line: ansi,
            file: spec.file.as_ref().map(|file| LogFileOptions {
                path: base_dir.join(file),
                max_size: spec.max_size,
                keep: spec.keep,
            }),
        };
        // Straight to (a duplicate of) fd 1, so that a batch is one
        // write(2): Rust's line-buffered stdout would hold back a status
        // line, which has no newline.
        let out: Box<dyn Write + Send> = match stdout.as_fd().try_clone_to_owned() {
            Ok(fd) => Box::new(std::fs::File::from(fd)),
            Err(_) => Box::new(stdout),
        };
        LogSink::spawn_inner(out, options, tty.then_some(libc::STDOUT_FILENO))
    }

    /// Starts a writer thread writing to `out` (the terminal output) and
    /// to the file of `options`, if any.
    ///
    /// # Errors
    /// If the log file cannot be opened or the thread spawned.
    pub fn spawn_with<W: Write + Send + 'static>(
        out: W,
        options: LogOptions,
    ) -> Result<(LogSink, LogWriter), LogError> {
        LogSink::spawn_inner(out, options, None)
    }

    /// `width_fd`: the terminal whose width bounds the status line.
    fn spawn_inner<W: Write + Send + 'static>(
        out: W,
        options: LogOptions,
        width_fd: Option<RawFd>,
    ) -> Result<(LogSink, LogWriter), LogError> {
        let file = match options.file {
            Some(file) => {
                let path = file.path.clone();
                let opened = file::LogFile::open(file);
                Some(opened.map_err(|source| LogError::OpenFile { path, source })?)
            }
            None => None,
        };
        let (records_tx, records_rx) = mpsc::channel(LOG_CHANNEL_LEN);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let feed = Arc::new(Feed::new(LIVE_CHANNEL_LEN, true));
        let status = options.status_line.then(|| Arc::new(StatusSlot::default()));
        let screen = terminal::Terminal::new(out, options.color, options.status_line, width_fd);
        let terminal = if file.is_some() {
            // The file must never wait for the terminal.
            TerminalOut::Queued(
                QueuedTerminal::spawn(screen, options.format).map_err(LogError::Thread)?,
            )
        } else {
            TerminalOut::Direct(screen)
        };
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer = Writer {
            progress: Arc::clone(&progress),
            format: options.format,
            filter: options.filter.clone(),
            terminal,
            file,
            feed: Arc::clone(&feed),
            published: Vec::new(),
            status: status.clone(),
            notices: Vec::new(),
            prefix: format::LinePrefix::default(),
        };
        let thread = LogWriter::spawn("taskherd-log", progress, move || {
            writer.run(records_rx, events_rx);
        })
        .map_err(LogError::Thread)?;
        let shared = Arc::new(Shared {
            feed,
            status,
            filter: options.filter,
        });
        let sink = LogSink {
            records_tx,
            events_tx: Some(events_tx),
            shared,
        };
        Ok((sink, thread))
    }

    /// A sink whose records (the master's events among them, in order,
    /// as with [`LogSink::channel`]) go to `output`, run on a thread of
    /// its own named `name`: an output of the caller's, which the
    /// returned writer's [`LogWriter::finish`] waits for as it waits for
    /// the log's. `output` calls [`WriteProgress::wrote`] each time it
    /// has written something, so that an output that is slow is told
    /// from one that is stuck.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn spawn_output<F>(name: &str, output: F) -> std::io::Result<(LogSink, LogWriter)>
    where
        F: FnOnce(mpsc::Receiver<LogRecord>, WriteProgress) + Send + 'static,
    {
        let (sink, records) = LogSink::channel();
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let wrote = WriteProgress(Arc::clone(&progress));
        let writer = LogWriter::spawn(name, progress, move || output(records, wrote))?;
        Ok((sink, writer))
    }

    /// A sink whose records come out of the returned receiver (the agent
    /// relays them upstream instead of writing them). Nothing is published
    /// to its subscribers and its status line is ignored. Its events go
    /// through the same (bounded) channel as the rest, in order: they wait
    /// when the receiver is behind.
    pub fn channel() -> (LogSink, mpsc::Receiver<LogRecord>) {
        let (records_tx, records_rx) = mpsc::channel(LOG_CHANNEL_LEN);
        let shared = Arc::new(Shared {
            feed: Arc::new(Feed::new(1, false)),
            status: None,
            filter: LogFilter::all(),
        });
        let sink = LogSink {
            records_tx,
            events_tx: None,
            shared,
        };
        (sink, records_rx)
    }

    /// Sends a record; waits if the writer is behind.
    ///
    /// # Cancel safety
    /// Cancelling drops the record (it was not sent).
    pub async fn send(&self, record: LogRecord) {
        // Fails only once the writer is gone, at the very end of a run.
        let _ = self.records_tx.send(record).await;
    }

    /// Sends every record of `records` (leaving it empty), in order;
    /// waits once for room for all of them rather than once per record.
    ///
    /// # Cancel safety
    /// Cancelling may drop some records (not sent).
    pub async fn send_all(&self, records: &mut Vec<LogRecord>) {
        let mut rest = records.drain(..);
        while rest.len() > 0 {
            let n = rest.len().min(LOG_CHANNEL_LEN);
            // Fails only once the writer is gone, at the very end of a run.
            let Ok(permits) = self.records_tx.reserve_many(n).await else {
                return;
            };
            for (permit, record) in permits.zip(rest.by_ref()) {
                permit.send(record);
            }
        }
    }

    /// Logs an event of the master about one instance. Never waits for
    /// the output (except on a [`LogSink::channel`] sink).
    ///
    /// # Cancel safety
    /// Cancel safe: the event is queued at once.
    pub async fn instance_event(&self, label: &Arc<InstanceLabel>, level: Level, message: String) {
        self.send_event(LogRecord {
            time: SystemTime::now(),
            level,
            instance: Some(label.clone()),
            stream: Stream::Master,
            message: message.into(),
        })
        .await;
    }

    /// Logs an event of the master itself. Never waits for the output
    /// (except on a [`LogSink::channel`] sink).
    ///
    /// # Cancel safety
    /// Cancel safe: the event is queued at once.
    pub async fn master_event(&self, level: Level, message: String) {
        self.send_event(LogRecord {
            time: SystemTime::now(),
            level,
            instance: None,
            stream: Stream::Master,
            message: message.into(),
        })
        .await;
    }

    /// An event goes through the unbounded channel: the writer may be
    /// stuck on a full pipe, the master must go on.
    async fn send_event(&self, record: LogRecord) {
        match &self.events_tx {
            // Fails only once the writer is gone, at the very end of a run.
            Some(events_tx) => {
                let _ = events_tx.send(record);
            }
            None => self.send(record).await,
        }
    }

    /// A live feed of every record from the writer's next batch on, before
    /// the filter (apply [`LogSink::filter`] for the log's own view).
    ///
    /// A subscriber that falls more than [`LIVE_CHANNEL_LEN`] records behind never slows
    /// the herd down: it loses the oldest, and its next `recv` returns
    /// [`broadcast::error::RecvError::Lagged`] with how many. `recv`
    /// returns [`broadcast::error::RecvError::Closed`] once the writer has
    /// ended. A sink made by [`LogSink::channel`] publishes nothing.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LogRecord>> {
        self.shared.feed.subscribe()
    }

    /// The last `lines` lines of the backlog (the recent records the
    /// writer keeps, at most [`BACKLOG_LINES`] lines and
    /// [`BACKLOG_BYTES`]) among the records `wanted` keeps, and with
    /// `follow` a live feed of every record after them, as
    /// [`LogSink::subscribe`] gives: none is missed or repeated between
    /// the two. Unfiltered, as for subscribers.
    ///
    /// A [`LogSink::channel`] sink keeps no backlog.
    pub fn follow(
        &self,
        lines: usize,
        wanted: impl Fn(&LogRecord) -> bool,
        follow: bool,
    ) -> Follow {
        self.shared.feed.follow(lines, wanted, follow)
    }

    /// How much instances' output the writer has taken so far (lines and
    /// bytes; the master's own events not counted). A
    /// [`LogSink::channel`] sink counts nothing.
    pub fn totals(&self) -> LogTotals {
        self.shared.feed.totals()
    }

    /// The filter the writer applies.
    pub fn filter(&self) -> &LogFilter {
        &self.shared.filter
    }

    /// Sets (or, with `None`, removes) the status line: one line kept at
    /// the bottom of the terminal below the log lines, such as
    /// `web 4/4 running · jobs 1200 done 350/s`. Cheap; meant to be
    /// called every second or so. Control characters become spaces and
    /// the text is cut to the terminal's width.
    ///
    /// Ignored when standard output is not a terminal
    /// ([`LogSink::has_status_line`] is false then).
    pub fn status_line(&self, text: Option<String>) {
        if let Some(status) = &self.shared.status {
            status.set(text);
        }
    }

    /// Whether [`LogSink::status_line`] shows anything (so that callers
    /// can skip making the text).
    pub fn has_status_line(&self) -> bool {
        self.shared.status.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use tokio::sync::broadcast::error::RecvError;

    /// A writer whose bytes the test can read while the thread writes.
    #[derive(Clone, Default)]
    struct Screen(Arc<Mutex<Vec<u8>>>);

    impl Write for Screen {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Screen {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }

        /// Waits (bounded) until the text ends with `end`.
        fn wait_end(&self, end: &str) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.text().ends_with(end) {
                assert!(
                    Instant::now() < deadline,
                    "waited for {end:?}: {:?}",
                    self.text()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// A terminal nobody reads: every write parks until the gate opens.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        screen: Screen,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut is_open = open.lock().unwrap();
            while !*is_open {
                is_open = opened.wait(is_open).unwrap();
            }
            drop(is_open);
            self.screen.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Gate {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
    }

    /// Runs `f` on a thread of its own; panics if it takes more than 5 s.
    fn promptly<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || done_tx.send(f()));
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{what} waited for the terminal"))
    }

    fn label(group: &str) -> Arc<InstanceLabel> {
        Arc::new(InstanceLabel {
            group: group.into(),
            host: "localhost".into(),
            command: "w".into(),
            id: 1,
            group_id: 1,
        })
    }

    fn line(label: &Arc<InstanceLabel>, level: Level, message: &str) -> LogRecord {
        LogRecord {
            time: SystemTime::now(),
            level,
            instance: Some(label.clone()),
            stream: Stream::Stdout,
            message: message.into(),
        }
    }

    /// The messages of `text`'s lines (text format).
    fn messages(text: &str) -> Vec<String> {
        text.lines()
            .map(|line| line.rsplit("] ").next().unwrap_or("").to_owned())
            .collect()
    }

    #[test]
    fn spawn_writes_everything_plainly() {
        let out = Screen::default();
        let (sink, writer) = LogSink::spawn(LogFormat::Text, out.clone()).unwrap();
        let web = label("web");
        block_on(async {
            sink.send(line(&web, Level::Trace, "trace")).await;
            sink.master_event(Level::Debug, "debug".into()).await;
        });
        assert!(!sink.has_status_line());
        sink.status_line(Some("ignored".into()));
        drop(sink);
        writer.finish();
        assert_eq!(messages(&out.text()), ["trace", "debug"]);
        assert!(!out.text().contains('\x1b'));
    }

    #[test]
    fn the_filter_hides_records_but_subscribers_get_them_all() {
        let out = Screen::default();
        let options = LogOptions {
            filter: "warning,web=debug".parse().unwrap(),
            ..LogOptions::default()
        };
        let (sink, writer) = LogSink::spawn_with(out.clone(), options).unwrap();
        assert_eq!(sink.filter().to_string(), "warning,web=debug");
        let mut live_rx = sink.subscribe();
        let (web, db) = (label("web"), label("db"));
        block_on(async {
            sink.send(line(&web, Level::Debug, "web debug")).await;
            sink.send(line(&web, Level::Trace, "web trace")).await;
            sink.send(line(&db, Level::Info, "db info")).await;
            sink.send(line(&db, Level::Error, "db error")).await;
            sink.master_event(Level::Notice, "master notice".into())
                .await;
            sink.master_event(Level::Warning, "master warning".into())
                .await;
        });
        drop(sink);
        writer.finish();
        assert_eq!(
            messages(&out.text()),
            ["web debug", "db error", "master warning"]
        );
        let mut live = Vec::new();
        loop {
            match block_on(live_rx.recv()) {
                Ok(record) => live.push(record.message.clone()),
                Err(RecvError::Closed) => break,
                Err(RecvError::Lagged(n)) => panic!("lagged {n}"),
            }
        }
        assert_eq!(
            live,
            [
                "web debug",
                "web trace",
                "db info",
                "db error",
                "master notice",
                "master warning"
            ]
        );
    }

    #[test]
    fn a_slow_subscriber_lags_and_is_told_how_much() {
        let (sink, writer) = LogSink::spawn(LogFormat::Text, std::io::sink()).unwrap();
        let mut live_rx = sink.subscribe();
        let web = label("web");
        let total = LIVE_CHANNEL_LEN + 100;
        block_on(async {
            for n in 0..total {
                sink.send(line(&web, Level::Info, &n.to_string())).await;
            }
        });
        // The herd went on: every record was written without a reader.
        drop(sink);
        writer.finish();
        assert_eq!(
            block_on(live_rx.recv()).unwrap_err(),
            RecvError::Lagged(100)
        );
        let first = block_on(live_rx.recv()).unwrap();
        assert_eq!(first.message, "100", "the oldest were dropped");
        let mut left = 1;
        while block_on(live_rx.recv()).is_ok() {
            left += 1;
        }
        assert_eq!(left, LIVE_CHANNEL_LEN);
    }

    #[test]
    fn with_a_file_the_terminal_gets_only_the_masters_events() {
        let dir = tempfile::tempdir().unwrap();
        let out = Screen::default();
        let path = dir.path().join("logs/herd.log");
        let options = LogOptions {
            format: LogFormat::Json,
            file: Some(LogFileOptions {
                path: path.clone(),
                max_size: 1 << 20,
                keep: 2,
            }),
            ..LogOptions::default()
        };
        let (sink, writer) = LogSink::spawn_with(out.clone(), options).unwrap();
        let web = label("web");
        block_on(async {
            sink.send(line(&web, Level::Info, "a line")).await;
            sink.instance_event(&web, Level::Warning, "restarting".into())
                .await;
            sink.master_event(Level::Info, "stopping".into()).await;
        });
        drop(sink);
        writer.finish();
        let json = |text: &str| -> Vec<String> {
            text.lines()
                .map(|line| {
                    let value: serde_json::Value = serde_json::from_str(line).unwrap();
                    value["message"].as_str().unwrap().to_owned()
                })
                .collect()
        };
        let file = std::fs::read_to_string(&path).unwrap();
        assert_eq!(json(&file), ["a line", "restarting", "stopping"]);
        assert_eq!(json(&out.text()), ["restarting", "stopping"]);
    }

    #[test]
    fn events_and_lines_queued_together_are_written_in_the_order_of_their_times() {
        let gate = Gate::default();
        let (sink, writer) = LogSink::spawn(LogFormat::Text, gate.clone()).unwrap();
        let (web, db) = (label("web"), label("db"));
        // The writer takes this one and parks writing it: what follows
        // queues up, lines and events together.
        block_on(sink.send(line(&db, Level::Info, "db first")));
        gate.screen.wait_end("");
        std::thread::sleep(Duration::from_millis(50));
        // Each record is stamped when made; the pauses only keep the
        // stamps apart.
        let pause = || std::thread::sleep(Duration::from_millis(2));
        block_on(sink.instance_event(&web, Level::Info, "started".into()));
        pause();
        block_on(sink.send(line(&web, Level::Info, "line 1")));
        block_on(sink.send(line(&web, Level::Info, "line 2")));
        pause();
        block_on(sink.instance_event(&web, Level::Info, "exited".into()));
        gate.open();
        drop(sink);
        writer.finish();
        assert_eq!(
            messages(&gate.screen.text()),
            ["db first", "started", "line 1", "line 2", "exited"]
        );
    }

    #[test]
    fn events_never_wait_for_a_terminal_nobody_reads() {
        let gate = Gate::default();
        let (sink, writer) = LogSink::spawn(LogFormat::Text, gate.clone()).unwrap();
        let web = label("web");
        // The writer takes the first lines and parks writing them; the
        // lines after them fill the channel and their producer waits, as
        // meant.
        let producer = std::thread::spawn({
            let (sink, web) = (sink.clone(), web.clone());
            move || {
                block_on(async {
                    for n in 0..3 * LOG_CHANNEL_LEN {
                        sink.send(line(&web, Level::Info, &format!("line {n}")))
                            .await;
                    }
                })
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!producer.is_finished(), "the output lines wait");
        promptly("master_event", {
            let (sink, web) = (sink.clone(), web.clone());
            move || {
                block_on(async {
                    for n in 0..2 * LOG_CHANNEL_LEN {
                        sink.master_event(Level::Info, format!("event {n}")).await;
                    }
                    sink.instance_event(&web, Level::Info, "exited".into())
                        .await;
                })
            }
        });
        gate.open();
        producer.join().unwrap();
        drop(sink);
        writer.finish();
        let text = gate.screen.text();
        let messages = messages(&text);
        assert_eq!(
            messages.len(),
            3 * LOG_CHANNEL_LEN + 2 * LOG_CHANNEL_LEN + 1
        );
        let lines: Vec<&String> = messages.iter().filter(|m| m.starts_with("line ")).collect();
        let want: Vec<String> = (0..3 * LOG_CHANNEL_LEN)
            .map(|n| format!("line {n}"))
            .collect();
        assert!(
            lines.iter().copied().eq(want.iter()),
            "every line, in order"
        );
        let events: Vec<&String> = messages
            .iter()
            .filter(|m| m.starts_with("event "))
            .collect();
        let want: Vec<String> = (0..2 * LOG_CHANNEL_LEN)
            .map(|n| format!("event {n}"))
            .collect();
        assert!(
            events.iter().copied().eq(want.iter()),
            "every event, in order"
        );
        let at = |message: &str| messages.iter().position(|m| m == message).unwrap();
        assert!(at("exited") > at(&format!("event {}", 2 * LOG_CHANNEL_LEN - 1)));
    }

    #[test]
    fn a_terminal_nobody_reads_never_holds_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("herd.log");
        let gate = Gate::default();
        let options = LogOptions {
            file: Some(LogFileOptions {
                path: path.clone(),
                max_size: 1 << 30,
                keep: 1,
            }),
            ..LogOptions::default()
        };
        let (sink, writer) = LogSink::spawn_with(gate.clone(), options).unwrap();
        let web = label("web");
        // 3 MiB of events for the terminal: more than its queue holds.
        let events = 3 * 1024;
        let padding = "x".repeat(1024);
        promptly("logging", {
            let sink = sink.clone();
            move || {
                block_on(async {
                    for n in 0..events {
                        sink.send(line(&web, Level::Info, &format!("line {n}")))
                            .await;
                        sink.instance_event(&web, Level::Info, format!("event {n} {padding}"))
                            .await;
                    }
                })
            }
        });
        // The file gets everything while the terminal is stuck.
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = format!("event {} ", events - 1);
        while !std::fs::read_to_string(&path).unwrap().contains(&want) {
            assert!(Instant::now() < deadline, "the file was held back");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().lines().count(),
            2 * events
        );
        gate.open();
        drop(sink);
        writer.finish();
        let text = gate.screen.text();
        let shown = text.lines().filter(|l| l.contains("] event ")).count();
        assert!(shown < events, "some were dropped: {shown}");
        // Told (maybe in several notices) how many it missed.
        let dropped: usize = text
            .lines()
            .filter(|l| l.contains("lines not shown on the terminal"))
            .map(|notice| {
                let count = notice.rsplit("] ").next().unwrap().split(' ').next();
                count.unwrap().parse::<usize>().unwrap()
            })
            .sum();
        assert!(dropped > 0, "the terminal is told");
        assert_eq!(shown + dropped, events);
    }

    #[test]
    fn a_record_from_a_bad_clock_does_not_stop_the_log() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = Screen::default();
            let (sink, writer) = LogSink::spawn(format, out.clone()).unwrap();
            let web = label("web");
            let mut bad = line(&web, Level::Info, "from the year 12000");
            bad.time = SystemTime::UNIX_EPOCH + Duration::from_secs(316_000_000_000);
            block_on(async {
                sink.send(bad).await;
                sink.send(line(&web, Level::Info, "after")).await;
            });
            drop(sink);
            writer.finish();
            let text = out.text();
            assert_eq!(text.lines().count(), 2, "{text}");
            assert!(text.contains("9999-12-31T23:59:59.999Z"), "{text}");
            assert!(text.contains("after"), "{text}");
        }
    }

    #[test]
    fn a_log_file_that_cannot_be_opened_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let options = LogOptions {
            file: Some(LogFileOptions {
                path: blocker.join("herd.log"),
                max_size: 100,
                keep: 1,
            }),
            ..LogOptions::default()
        };
        let err = LogSink::spawn_with(std::io::sink(), options).unwrap_err();
        assert!(matches!(err, LogError::OpenFile { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "cannot open log file {}",
                blocker.join("herd.log").display()
            )
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn colors_on_request() {
        for color in [false, true] {
            let out = Screen::default();
            let options = LogOptions {
                color,
                ..LogOptions::default()
            };
            let (sink, writer) = LogSink::spawn_with(out.clone(), options).unwrap();
            block_on(sink.master_event(Level::Error, "boom".into()));
            drop(sink);
            writer.finish();
            let text = out.text();
            assert_eq!(text.contains("\x1b[31merror\x1b[0m"), color, "{text:?}");
            assert_eq!(text.contains('\x1b'), color, "{text:?}");
        }
    }

    #[test]
    fn status_line_is_kept_below_the_lines_of_a_tty() {
        let tty = Screen::default();
        let options = LogOptions {
            status_line: true,
            ..LogOptions::default()
        };
        let (sink, writer) = LogSink::spawn_with(tty.clone(), options).unwrap();
        assert!(sink.has_status_line());
        let web = label("web");

        // Drawn without any log line.
        sink.status_line(Some("web 4/4 running".into()));
        tty.wait_end("web 4/4 running");
        assert_eq!(tty.text(), "web 4/4 running");

        // Erased before lines, drawn again after them.
        block_on(sink.send(line(&web, Level::Info, "hello")));
        tty.wait_end("] hello\nweb 4/4 running");
        let text = tty.text();
        assert!(text.starts_with("web 4/4 running\r\x1b[K"), "{text:?}");
        assert_eq!(text.matches("web 4/4 running").count(), 2, "{text:?}");

        sink.status_line(Some("web 3/4 running".into()));
        tty.wait_end("web 4/4 running\r\x1b[Kweb 3/4 running");

        // Erased at the end, so the shell prompt starts on a clean row.
        drop(sink);
        writer.finish();
        assert!(
            tty.text().ends_with("web 3/4 running\r\x1b[K"),
            "{:?}",
            tty.text()
        );
        // Every log line is whole, on its own row.
        let text = tty.text();
        let rows: Vec<&str> = text
            .split(['\n', '\r'])
            .map(|row| row.trim_start_matches("\x1b[K"))
            .filter(|row| !row.is_empty() && !row.starts_with("web "))
            .collect();
        assert_eq!(rows.len(), 1);
        assert!(
            rows[0].ends_with("[web] [localhost] [w/1/1] hello"),
            "{rows:?}"
        );
    }

    #[test]
    fn a_channel_sink_only_relays() {
        let (sink, mut records_rx) = LogSink::channel();
        let mut live_rx = sink.subscribe();
        sink.status_line(Some("ignored".into()));
        assert!(!sink.has_status_line());
        block_on(sink.master_event(Level::Trace, "relayed".into()));
        let record = records_rx.try_recv().unwrap();
        assert_eq!(record.message, "relayed");
        drop(sink);
        assert_eq!(block_on(live_rx.recv()).unwrap_err(), RecvError::Closed);
    }
}
