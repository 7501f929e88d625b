//! The terminal side of the writer: buffered lines, colors, and the
//! status line kept at the bottom of a TTY.
//!
//! The status line is drawn after the last line of a batch, without a
//! newline. The next batch starts with `\r\x1b[K` (back to the start of
//! the row, erase it), so log lines replace it and it is drawn again
//! below them: lines are never garbled, and the whole batch, erase and
//! redraw included, is one write.

use std::io::Write;
use std::os::fd::RawFd;

/// Erases the current row (the status line) and goes back to its start.
const ERASE_ROW: &[u8] = b"\r\x1b[K";

/// Bytes buffered before they are written, even within a batch.
const FLUSH_AT: usize = 64 * 1024;

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
