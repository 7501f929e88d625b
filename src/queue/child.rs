//! What the exec and coprocess consumers share about their children:
//! process groups that die with the consumer, waiting for a child's end
//! without reaping it, and relaying its output as lines of the instance.

use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::os::fd::OwnedFd;
#[cfg(target_os = "linux")]
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt as _;
use tokio::net::unix::pipe;

use crate::pidkiller::proc;
use crate::protocol::millis;

/// Longest output line relayed as one; longer ones are cut.
pub const MAX_LINE: usize = 64 * 1024;

/// How often the end of a job's process is checked where the kernel has no
/// pidfd (before Linux 5.3).
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Sets the command's parent-death signal to SIGKILL: a job does not
/// outlive a consumer instance that is killed. (It is the spawning
/// thread's death that counts: that thread waits for the job.)
pub(crate) fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure only calls async-signal-safe functions
        // (prctl, getppid) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The consumer may have died between fork and prctl.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::other("the consumer exited during spawn"));
                }
                Ok(())
            });
        }
    }
}

/// Waits until our child `pid` has ended (without reaping it: until then
/// its pid, and its process group id, are still ours).
pub(crate) async fn wait_exited(pid: u32) {
    // An unreaped child's pid cannot be anybody else's: no identity check.
    if let Some(raw) = rustix_pid(pid) {
        if let Ok(fd) = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            if proc::wait_exit(fd).await.is_ok() {
                return;
            }
        }
    }
    // No pidfd (before Linux 5.3): poll.
    while !has_exited(pid) {
        tokio::time::sleep(EXIT_POLL).await;
    }
}

/// Whether our child `pid` has ended (not reaped: `WNOWAIT`). An error
/// counts as ended: there is nothing left to wait for.
pub(crate) fn has_exited(pid: u32) -> bool {
    let Some(raw) = rustix_pid(pid) else {
        return true;
    };
    use rustix::process::{WaitId, WaitIdOptions};
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    // `None`: nothing has ended yet.
    !matches!(rustix::process::waitid(WaitId::Pid(raw), options), Ok(None))
}

/// `pid` as rustix takes it.
fn rustix_pid(pid: u32) -> Option<rustix::process::Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
}

/// `deadline` in milliseconds since the Unix epoch.
pub(crate) fn unix_millis(deadline: Instant) -> u64 {
    let now = SystemTime::now();
    let at = match deadline.checked_duration_since(Instant::now()) {
        Some(left) => now + left,
        None => now,
    };
    millis::since_epoch(at)
}

/// `command` as a line of the log: the program and its arguments, quoted
/// when they would not read as one word.
pub(crate) fn command_text(program: &OsStr, args: &[OsString]) -> String {
    let word = |text: &OsStr| {
        let text = text.to_string_lossy();
        if text.is_empty()
            || text
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "\"'\\$`".contains(c))
        {
            format!("{text:?}")
        } else {
            text.into_owned()
        }
    };
    std::iter::once(word(program))
        .chain(args.iter().map(|arg| word(arg)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where a relayed line goes: the instance's own stdout or stderr.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    /// The instance's stdout.
    Stdout,
    /// The instance's stderr.
    Stderr,
}

impl Stream {
    /// Writes `prefix`, `line` and a newline as one write (lines of
    /// concurrent jobs never mix). A lost stdout is not the job's failure.
    pub(crate) fn write_line(self, prefix: &[u8], line: &[u8]) {
        let mut text = Vec::with_capacity(prefix.len() + line.len() + 1);
        text.extend_from_slice(prefix);
        text.extend_from_slice(line);
        text.push(b'\n');
        let _ = match self {
            Stream::Stdout => std::io::stdout().lock().write_all(&text),
            Stream::Stderr => std::io::stderr().lock().write_all(&text),
        };
    }
}

/// Relays the lines read from `fd` to `stream`, each after `prefix`,
/// until the end of the pipe.
pub(crate) async fn relay(fd: Option<OwnedFd>, prefix: &[u8], stream: Stream) {
    let Some(fd) = fd else { return };
    let Ok(mut pipe) = pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut lines = Lines::default();
    let mut buf = vec![0u8; 8192];
    let mut emit = |line: &[u8]| stream.write_line(prefix, line);
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => lines.push(&buf[..n], &mut emit),
        }
    }
    lines.finish(&mut emit);
}

/// Cuts a byte stream into lines (without their `\n`), at most
/// [`MAX_LINE`] bytes each.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    /// The start of a line whose end has not come yet.
    partial: Vec<u8>,
}

impl Lines {
    /// Takes the next bytes; gives every line they complete to `emit`.
    pub(crate) fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&[u8])) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = bytes.split_at(end);
            if self.partial.is_empty() {
                emit_cut(line, emit);
            } else {
                self.partial.extend_from_slice(line);
                emit_cut(&self.partial, emit);
                self.partial.clear();
            }
            bytes = &rest[1..];
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() >= MAX_LINE {
            let whole = self.partial.len() / MAX_LINE * MAX_LINE;
            emit_cut(&self.partial[..whole], emit);
            self.partial.drain(..whole);
        }
    }

    /// The end of the stream: the last line, if it had no newline.
    pub(crate) fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit_cut(&self.partial, emit);
            self.partial.clear();
        }
    }
}

/// Gives `line` to `emit` in pieces of at most [`MAX_LINE`] bytes.
fn emit_cut(line: &[u8], emit: &mut impl FnMut(&[u8])) {
    if line.is_empty() {
        emit(line);
    }
    for piece in line.chunks(MAX_LINE) {
        emit(piece);
    }
}

/// The feeder `HandlerQueue` wants of a program that only consumes (the
/// exec and coprocess runners); never used, a consumer does not feed.
pub(crate) struct NoFeeder;

impl crate::queue::Feeder for NoFeeder {
    type Job = ();

    fn next(&mut self) -> crate::queue::Next<()> {
        crate::queue::Next::Done
    }

    fn success(&mut self, _job: ()) {}

    fn error(&mut self, _job: (), _reason: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        let mut emit = |line: &[u8]| out.push(line.to_vec());
        for chunk in chunks {
            lines.push(chunk, &mut emit);
        }
        lines.finish(&mut emit);
        out
    }

    #[test]
    fn lines_across_chunks_partial_and_not_utf8() {
        assert_eq!(
            lines_of(&[b"a\nb", b"c\n\nd\xff", b"e"]),
            vec![
                b"a".to_vec(),
                b"bc".to_vec(),
                b"".to_vec(),
                b"d\xffe".to_vec()
            ]
        );
        assert_eq!(lines_of(&[b"x\n"]), vec![b"x".to_vec()]);
        assert!(lines_of(&[b""]).is_empty());
    }

    #[test]
    fn long_lines_are_cut() {
        let long = vec![b'y'; MAX_LINE * 2 + 10];
        let mut chunked: Vec<&[u8]> = long.chunks(1000).collect();
        chunked.push(b"\nz");
        let lines = lines_of(&chunked);
        let lens: Vec<usize> = lines.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 10, 1]);
        let one = lines_of(&[&long, b"\n"]);
        assert_eq!(
            one.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![MAX_LINE, MAX_LINE, 10]
        );
    }

    #[test]
    fn commands_read_as_typed() {
        let args = [OsString::from("-c"), OsString::from("echo $X")];
        assert_eq!(command_text(OsStr::new("sh"), &args), "sh -c \"echo $X\"");
        assert_eq!(command_text(OsStr::new("/bin/true"), &[]), "/bin/true");
    }

    #[test]
    fn deadlines_in_unix_millis() {
        let now = millis::now();
        let at = unix_millis(Instant::now() + Duration::from_secs(60));
        assert!((now + 59_000..=now + 61_000).contains(&at), "{now} {at}");
        let past = unix_millis(Instant::now() - Duration::from_secs(1));
        assert!(past >= now, "a past deadline is now");
    }
}
