//! The terminal side of the writer: buffered lines, colors, and the
//! status line kept at the bottom of a TTY.
//!
//! The status line is drawn after the last line of a batch, without a
//! newline. The next batch starts with `\r\x1b[K` (back to the start of
//! the row, erase it), so log lines replace it and it is drawn again
//! below them: lines are never garbled, and the whole batch, erase and
//! redraw included, is one write.

//!
//! With a log file, the terminal only shows the master's events, and has
//! a thread of its own ([`QueuedTerminal`]) fed through a bounded queue:
//! a terminal that does not keep up (a pipe nobody reads) never holds the
//! file back. When the queue is full, lines for the terminal are dropped
//! and counted, and the count is shown once the terminal takes lines
//! again; the status line is never dropped (only its latest text counts).

use super::{LogRecord, Stream};
use crate::config::LogFormat;
use crate::protocol::slave::Level;
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// Erases the current row (the status line) and goes back to its start.
const ERASE_ROW: &[u8] = b"\r\x1b[K";

use super::FLUSH_AT;

/// Where log lines for the terminal go, with what is needed to keep a
/// status line.
pub(super) struct Terminal<W: Write> {
    out: W,
    /// Lines (and erase sequences) of the current batch.
    buf: Vec<u8>,
    /// Text lines get ANSI colors.
    pub(super) color: bool,
    /// Set when `out` is a TTY that keeps a status line.
    status: Option<StatusLine>,
}

/// The status line's state.
struct StatusLine {
    /// What to draw (sanitized, cut to the width); empty for nothing.
    text: String,
    /// Whether it is on screen now (and must be erased before a line).
    drawn: bool,
    /// The terminal whose width bounds the text (`None`: unbounded).
    width_fd: Option<RawFd>,
}

impl<W: Write> Terminal<W> {
    /// A terminal writing to `out`; `status` enables the status line,
    /// whose text is cut to the width of `width_fd` when given.
    pub(super) fn new(out: W, color: bool, status: bool, width_fd: Option<RawFd>) -> Self {
        Terminal {
            out,
            buf: Vec::with_capacity(FLUSH_AT + 4096),
            color,
            status: status.then(|| StatusLine {
                text: String::new(),
                drawn: false,
                width_fd,
            }),
        }
    }

    /// The buffer to append a whole line to; the status line is erased
    /// first if it is on screen.
    #[inline]
    pub(super) fn line_buf(&mut self) -> &mut Vec<u8> {
        if let Some(status) = &mut self.status {
            if status.drawn {
                self.buf.extend_from_slice(ERASE_ROW);
                status.drawn = false;
            }
        }
        &mut self.buf
    }

    /// To call after a line was appended: writes the buffer out once it
    /// is big (without the status line, drawn at the end of the batch).
    #[inline]
    pub(super) fn line_added(&mut self) {
        if self.buf.len() >= FLUSH_AT {
            self.write_buf();
        }
    }

    /// Replaces the status line's text (`None` or empty: no status line);
    /// shown at the end of the batch. Ignored when not a TTY.
    pub(super) fn set_status(&mut self, text: Option<&str>) {
        let Some(status) = &mut self.status else {
            return;
        };
        let width = status.width_fd.and_then(terminal_width);
        let text = sanitize(text.unwrap_or(""), width);
        if text == status.text {
            return;
        }
        if status.drawn {
            self.buf.extend_from_slice(ERASE_ROW);
            status.drawn = false;
        }
        status.text = text;
    }

    /// Ends a batch: draws the status line below the lines, writes all
    /// of it at once and flushes.
    pub(super) fn finish_batch(&mut self) {
        if let Some(status) = &mut self.status {
            if !status.drawn && !status.text.is_empty() {
                self.buf.extend_from_slice(status.text.as_bytes());
                status.drawn = true;
            }
        }
        if !self.buf.is_empty() {
            self.write_buf();
            // A closed stdout must not stop supervision: lines are then
            // lost to nobody.
            let _ = self.out.flush();
        }
    }

    fn write_buf(&mut self) {
        let _ = self.out.write_all(&self.buf);
        self.buf.clear();
    }

    /// The writer, to inspect what was written (tests).
    #[cfg(test)]
    pub(super) fn out(&self) -> &W {
        &self.out
    }
}

/// Bytes the queue of a [`QueuedTerminal`] holds at most; lines beyond
/// are dropped (a batch bigger than this still goes into an empty queue).
const QUEUE_BYTES: usize = 1 << 20;

/// How long, at the end of a run, the writer waits for the terminal
/// thread to write what is queued (a terminal nobody reads must not keep
/// the master from exiting).
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The terminal side as the writer sees it: written by the writer thread
/// itself (no log file: the terminal's backpressure slows the producers,
/// as intended), or by a thread of its own behind a bounded queue (with a
/// log file, which must not wait for the terminal).
pub(super) enum TerminalOut<W: Write> {
    /// Written by the writer thread.
    Direct(Terminal<W>),
    /// Written by the terminal's own thread.
    Queued(QueuedTerminal),
}

impl<W: Write> TerminalOut<W> {
    /// Whether text lines get ANSI colors.
    #[inline]
    pub(super) fn color(&self) -> bool {
        match self {
            TerminalOut::Direct(terminal) => terminal.color,
            TerminalOut::Queued(queued) => queued.color,
        }
    }

    /// See [`Terminal::line_buf`].
    #[inline]
    pub(super) fn line_buf(&mut self) -> &mut Vec<u8> {
        match self {
            TerminalOut::Direct(terminal) => terminal.line_buf(),
            TerminalOut::Queued(queued) => &mut queued.buf,
        }
    }

    /// See [`Terminal::line_added`].
    #[inline]
    pub(super) fn line_added(&mut self) {
        match self {
            TerminalOut::Direct(terminal) => terminal.line_added(),
            TerminalOut::Queued(queued) => {
                if queued.buf.len() >= FLUSH_AT {
                    queued.push();
                }
            }
        }
    }

    /// See [`Terminal::set_status`].
    pub(super) fn set_status(&mut self, text: Option<&str>) {
        match self {
            TerminalOut::Direct(terminal) => terminal.set_status(text),
            TerminalOut::Queued(queued) => queued.set_status(text),
        }
    }

    /// See [`Terminal::finish_batch`]; queued, this only hands the batch
    /// to the terminal's thread (or drops it, counted, if its queue is
    /// full).
    pub(super) fn finish_batch(&mut self) {
        match self {
            TerminalOut::Direct(terminal) => terminal.finish_batch(),
            TerminalOut::Queued(queued) => queued.push(),
        }
    }

    /// At the end of the run: lets the terminal's thread write what is
    /// queued, waiting [`FINISH_TIMEOUT`] at most.
    pub(super) fn close(&mut self) {
        if let TerminalOut::Queued(queued) = self {
            queued.close();
        }
    }
}

/// The writer's end of a terminal written by a thread of its own.
pub(super) struct QueuedTerminal {
    /// Lines of the current batch.
    buf: Vec<u8>,
    /// Text lines get ANSI colors.
    color: bool,
    /// For the "lines not shown" notice.
    format: LogFormat,
    /// Lines dropped since the terminal last took some.
    dropped: u64,
    /// Shared with the terminal's thread.
    queue: Arc<TerminalQueue>,
    /// Joined at the end, unless the terminal is stuck.
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The queue between the writer and the terminal's thread.
#[derive(Default)]
struct TerminalQueue {
    state: Mutex<QueueState>,
    /// Wakes the terminal's thread (something queued) or the writer (the
    /// thread is done).
    wake: Condvar,
}

#[derive(Default)]
struct QueueState {
    /// Whole lines, in order.
    chunks: VecDeque<Vec<u8>>,
    /// Bytes in `chunks`.
    bytes: usize,
    /// The latest status line text not drawn yet.
    status: Option<Option<String>>,
    /// No more chunks will come.
    closed: bool,
    /// The thread has written everything and ended.
    done: bool,
}

impl TerminalQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl QueuedTerminal {
    /// Starts the thread that writes to `screen`.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub(super) fn spawn<W: Write + Send + 'static>(
        screen: Terminal<W>,
        format: LogFormat,
    ) -> std::io::Result<QueuedTerminal> {
        let queue = Arc::new(TerminalQueue::default());
        let color = screen.color;
        let thread = std::thread::Builder::new()
            .name("taskherd-tty".into())
            .spawn({
                let queue = Arc::clone(&queue);
                move || write_queued(screen, &queue)
            })?;
        Ok(QueuedTerminal {
            buf: Vec::new(),
            color,
            format,
            dropped: 0,
            queue,
            thread: Some(thread),
        })
    }

    fn set_status(&mut self, text: Option<&str>) {
        self.queue.lock().status = Some(text.map(str::to_owned));
        self.queue.wake.notify_all();
    }

    /// Queues the lines of `buf`, after the count of those dropped
    /// before; drops them (counted) if the queue is full.
    fn push(&mut self) {
        if self.buf.is_empty() && self.dropped == 0 {
            return;
        }
        let mut state = self.queue.lock();
        let fits = |state: &QueueState, len: usize| {
            state.chunks.is_empty() || state.bytes + len <= QUEUE_BYTES
        };
        let had_notice = self.dropped > 0;
        if had_notice {
            let mut notice = self.dropped_notice();
            notice.append(&mut self.buf);
            self.buf = notice;
        }
        if fits(&state, self.buf.len()) {
            self.dropped = 0;
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(4096));
            state.bytes += chunk.len();
            state.chunks.push_back(chunk);
            drop(state);
            self.queue.wake.notify_all();
        } else {
            let lines = self.buf.iter().filter(|&&b| b == b'\n').count() as u64;
            // The notice in front is not a line of the log.
            self.dropped += lines - u64::from(had_notice);
            self.buf.clear();
        }
    }

    /// "N lines not shown on the terminal", as a line of the master.
    fn dropped_notice(&self) -> Vec<u8> {
        let record = LogRecord {
            time: SystemTime::now(),
            level: Level::Warning,
            instance: None,
            stream: Stream::Master,
            message: format!(
                "{} not shown on the terminal (it did not keep up; the log file has them)",
                crate::error_text::count(self.dropped, "line")
            )
            .into(),
        };
        let mut line = Vec::with_capacity(160);
        // Writing into a Vec cannot fail.
        let _ = record.write_to(&mut line, self.format, self.color);
        line.push(b'\n');
        line
    }

    fn close(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.push();
        let deadline = Instant::now() + FINISH_TIMEOUT;
        let mut state = self.queue.lock();
        state.closed = true;
        self.queue.wake.notify_all();
        while !state.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Stuck on a terminal nobody reads: leave it behind.
                return;
            }
            state = self
                .queue
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(state);
        let _ = thread.join();
    }
}

impl Drop for QueuedTerminal {
    fn drop(&mut self) {
        self.close();
    }
}

/// The terminal's thread: writes what is queued until the queue closes.
fn write_queued<W: Write>(mut screen: Terminal<W>, queue: &TerminalQueue) {
    loop {
        let (chunks, status, closed) = {
            let mut state = queue.lock();
            while state.chunks.is_empty() && state.status.is_none() && !state.closed {
                state = queue
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.bytes = 0;
            (
                std::mem::take(&mut state.chunks),
                state.status.take(),
                state.closed,
            )
        };
        for chunk in chunks {
            screen.line_buf().extend_from_slice(&chunk);
            screen.line_added();
        }
        if let Some(text) = status {
            screen.set_status(text.as_deref());
        }
        screen.finish_batch();
        if closed {
            break;
        }
    }
    queue.lock().done = true;
    queue.wake.notify_all();
}

/// The text as one row: control characters (newlines, escapes) become
/// spaces, and it is cut to `width - 1` characters so that it never wraps
/// (a wrapped row would not be erased whole).
fn sanitize(text: &str, width: Option<usize>) -> String {
    let max = width.map_or(usize::MAX, |width| width.saturating_sub(1));
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect::<String>()
        .trim_end()
        .to_owned()
}

/// Whether `TERM` says the terminal takes no escape sequences
/// (`TERM=dumb`, as in Emacs' shell or some CI logs): then no colors
/// (unless `always`) and no status line, which is redrawn with them.
pub fn is_dumb_terminal() -> bool {
    std::env::var_os("TERM").is_some_and(|term| term == "dumb")
}

/// Columns of the terminal on `fd`, if it is one.
fn terminal_width(fd: RawFd) -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ only fills the winsize we pass; a bad fd is an
    // error return, not undefined behaviour.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(terminal: &mut Terminal<Vec<u8>>, text: &str) {
        let buf = terminal.line_buf();
        buf.extend_from_slice(text.as_bytes());
        buf.push(b'\n');
        terminal.line_added();
    }

    fn written(terminal: &Terminal<Vec<u8>>) -> String {
        String::from_utf8(terminal.out().clone()).unwrap()
    }

    #[test]
    fn status_line_is_erased_before_lines_and_drawn_after_them() {
        let mut terminal = Terminal::new(Vec::new(), false, true, None);
        line(&mut terminal, "one");
        terminal.finish_batch();
        assert_eq!(written(&terminal), "one\n", "no status yet");

        terminal.set_status(Some("web 4/4 running"));
        terminal.finish_batch();
        assert_eq!(written(&terminal), "one\nweb 4/4 running");

        line(&mut terminal, "two");
        line(&mut terminal, "three");
        terminal.finish_batch();
        assert_eq!(
            written(&terminal),
            "one\nweb 4/4 running\r\x1b[Ktwo\nthree\nweb 4/4 running"
        );

        // The same text again: nothing to do.
        terminal.set_status(Some("web 4/4 running"));
        terminal.finish_batch();
        assert_eq!(
            written(&terminal),
            "one\nweb 4/4 running\r\x1b[Ktwo\nthree\nweb 4/4 running"
        );

        terminal.set_status(Some("web 3/4\nrunning\x1b[31m"));
        terminal.finish_batch();
        assert!(
            written(&terminal).ends_with("web 4/4 running\r\x1b[Kweb 3/4 running [31m"),
            "{:?}",
            written(&terminal)
        );

        terminal.set_status(None);
        line(&mut terminal, "four");
        terminal.finish_batch();
        assert!(
            written(&terminal).ends_with("running [31m\r\x1b[Kfour\n"),
            "erased once, not drawn again: {:?}",
            written(&terminal)
        );
    }

    #[test]
    fn without_a_tty_the_status_line_is_ignored() {
        let mut terminal = Terminal::new(Vec::new(), false, false, None);
        terminal.set_status(Some("web 4/4 running"));
        line(&mut terminal, "one");
        terminal.finish_batch();
        terminal.set_status(None);
        line(&mut terminal, "two");
        terminal.finish_batch();
        assert_eq!(written(&terminal), "one\ntwo\n");
    }

    #[test]
    fn status_text_is_one_row_that_fits() {
        assert_eq!(sanitize("a\tb\nc\r", None), "a b c");
        assert_eq!(sanitize("web 4/4 · jobs 12", Some(10)), "web 4/4 ·");
        assert_eq!(sanitize("abc", Some(0)), "");
        assert_eq!(terminal_width(-1), None);
    }
}
