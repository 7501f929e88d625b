//! Where taskherd's own diagnostics go: stderr, unless stderr is stdout
//! (then through the log's writer so lines do not interleave).

use crate::Verbosity;
use std::os::fd::{AsFd, BorrowedFd};

/// Where diagnostics are printed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Diagnostics {
    /// No status line on the terminal.
    Plain,
    /// `run`: the herd's log may keep a status line at the bottom of the
    /// terminal (stdout is a TTY).
    BelowStatusLine,
}

/// Diagnostics of taskherd itself (not the herd's log) go to stderr,
/// filtered by `RUST_LOG` (warnings by default, taskherd's debug records
/// too with `-v`), colored only on a terminal that is not `TERM=dumb`
/// (and without `NO_COLOR`).
///
/// When stderr is the terminal of stdout and `run` may keep its status
/// line there, each diagnostic first erases the row it starts on (the
/// status line, which has no newline), in the same write: the diagnostic
/// gets a row of its own, and the status line comes back below with the
/// next log lines or status change.
pub(crate) fn init_diagnostics(diagnostics: Diagnostics, verbosity: Verbosity) {
    use std::io::IsTerminal;
    let default = match verbosity {
        Verbosity::Verbose => "warn,taskherd=debug",
        Verbosity::Quiet | Verbosity::Normal => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let terminal = std::io::stderr().is_terminal() && !taskherd::log::is_dumb_terminal();
    let ansi = terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let erase_row = matches!(diagnostics, Diagnostics::BelowStatusLine)
        && terminal
        && std::io::stdout().is_terminal()
        && same_file(std::io::stdout(), std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(move || DiagnosticWriter {
            erase_row,
            buf: Vec::new(),
        })
        .init();
}

/// Whether two fds are the same file (or terminal).
fn same_file(a: impl AsFd, b: impl AsFd) -> bool {
    let stat = |fd: BorrowedFd<'_>| {
        rustix::fs::fstat(fd)
            .ok()
            .map(|stat| (stat.st_dev, stat.st_ino, stat.st_rdev))
    };
    matches!((stat(a.as_fd()), stat(b.as_fd())), (Some(a), Some(b)) if a == b)
}

/// One diagnostic on stderr, written at once when it is complete (on
/// drop), after `\r\x1b[K` (erase the status line's row) if asked.
struct DiagnosticWriter {
    erase_row: bool,
    buf: Vec<u8>,
}

impl std::io::Write for DiagnosticWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() && self.erase_row {
            self.buf.extend_from_slice(b"\r\x1b[K");
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for DiagnosticWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            // Nowhere to report a failure to write a diagnostic.
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &self.buf);
        }
    }
}
