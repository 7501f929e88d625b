//! What a user reads on a terminal: `taskherd run` on a real pseudo
//! terminal (colors and the labeled status line, none of them with
//! `TERM=dumb`; the hint of a second Ctrl-C), and a run's log that counts
//! in proper English.

use crate::support::{taskherd_bin, Herd, MARK_VAR, WAIT};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};

/// A pseudo terminal: (the side the test reads, the side the master
/// writes to as its stdout and stderr), 120 columns wide.
fn open_pty() -> (File, File) {
    // SAFETY: plain libc calls on a fd we own; each result is checked.
    unsafe {
        let reader = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            reader >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let reader_file = File::from_raw_fd(reader);
        assert_eq!(libc::grantpt(reader), 0, "grantpt");
        assert_eq!(libc::unlockpt(reader), 0, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(reader, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_str()
            .expect("pty name")
            .to_owned();
        // Not our controlling terminal.
        let writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .expect("open the pty");
        let size = libc::winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let fd = writer.as_raw_fd();
        assert_eq!(libc::ioctl(fd, libc::TIOCSWINSZ, &size), 0, "TIOCSWINSZ");
        (reader_file, writer)
    }
}

/// `taskherd run` with a pty as stdout and stderr, and what the terminal
/// got so far.
struct OnATerminal {
    master: std::process::Child,
    /// What the reader thread read, chunk by chunk; closed at the end.
    chunks_rx: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl OnATerminal {
    /// Starts `taskherd run` on `herd`'s config, with `TERM=term`.
    fn start(herd: &Herd, term: &str) -> OnATerminal {
        let (mut reader, writer) = open_pty();
        let mut command = Command::new(taskherd_bin());
        command
            .arg("run")
            .arg(&herd.config)
            .env(MARK_VAR, &herd.mark)
            .env("XDG_RUNTIME_DIR", herd.runtime_dir())
            .env("XDG_STATE_HOME", herd.runtime_dir().join("state"))
            .env("TERM", term)
            .env_remove("NO_COLOR")
            .env_remove("RUST_LOG")
            .env_remove("TASKHERD_LOG")
            .stdin(Stdio::null())
            .stdout(writer.try_clone().expect("clone the pty"))
            .stderr(writer);
        let master = command.spawn().expect("start taskherd");
        // Our copies of the terminal's side go: the reader sees its end
        // (EIO) once the master and every instance have closed theirs.
        drop(command);
        let (chunks_tx, chunks_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if chunks_tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        OnATerminal {
            master,
            chunks_rx,
            seen: Vec::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Waits until the terminal got `needle`.
    fn wait_for(&mut self, needle: &str) {
        let deadline = std::time::Instant::now() + WAIT;
        while !self.text().contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.chunks_rx.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => panic!("waited for {needle:?}: {:?}", self.text()),
            }
        }
    }

    /// Waits until the master and every instance have closed the
    /// terminal; returns all it got and the master's exit code.
    fn finish(mut self) -> (String, Option<i32>) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.chunks_rx.recv_timeout(left) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.master.kill();
                    let _ = self.master.wait();
                    panic!("the herd did not end in time: {:?}", self.text());
                }
            }
        }
        let status = self.master.wait().expect("wait for taskherd");
        (self.text(), status.code())
    }
}

/// Runs `taskherd run` on a terminal until the herd ends by itself.
fn run_on_a_terminal(herd: &Herd, term: &str) -> (String, Option<i32>) {
    OnATerminal::start(herd, term).finish()
}

/// Long enough for the status line to be drawn before the herd ends.
const SHORT_HERD: &str = r#"
[[group]]
name = "brief"
command = "sh"
args = ["-c", "echo brief up; echo oops >&2; sleep 1; echo brief done"]
restart = { policy = "never" }
[group.local]
instances = 2
"#;

#[test]
fn a_terminal_gets_colors_and_a_labeled_status_line() {
    let herd = Herd::new(SHORT_HERD);
    let (seen, code) = run_on_a_terminal(&herd, "xterm-256color");
    assert_eq!(code, Some(0), "{seen}");
    assert!(seen.contains("\x1b[32minfo\x1b[0m"), "no colors: {seen:?}");
    assert!(
        seen.contains("taskherd: 2 running, 0 failed · brief 2/2"),
        "no labeled status line: {seen:?}"
    );
    assert!(
        seen.contains("\r\x1b[K"),
        "the status line is never erased: {seen:?}"
    );
    herd.assert_no_leftovers();
}

#[test]
fn term_dumb_gets_no_escape_codes_at_all() {
    let herd = Herd::new(SHORT_HERD);
    let (seen, code) = run_on_a_terminal(&herd, "dumb");
    assert_eq!(code, Some(0), "{seen}");
    assert!(seen.contains("brief done"), "{seen:?}");
    assert!(
        !seen.contains('\x1b'),
        "escape codes on a dumb terminal: {seen:?}"
    );
    assert!(
        !seen.contains("taskherd: 2 running"),
        "a status line: {seen:?}"
    );
    herd.assert_no_leftovers();
}

#[test]
fn ctrl_c_on_a_terminal_says_how_to_kill_at_once() {
    let herd = Herd::new(
        r#"
[[group]]
name = "sleepy"
command = "sh"
args = ["-c", "echo sleepy up; exec sleep 600"]
[group.local]
instances = 1
"#,
    );
    let mut run = OnATerminal::start(&herd, "dumb");
    run.wait_for("sleepy up");
    // SAFETY: plain kill(2) on our own child.
    let sent = unsafe { libc::kill(run.master.id() as i32, libc::SIGINT) };
    assert_eq!(sent, 0);
    run.wait_for("Ctrl-C again to kill at once");
    let (seen, code) = run.finish();
    assert_eq!(code, Some(0), "{seen}");
    assert!(
        seen.contains(
            "stopping every instance: SIGINT received (grace 10s; Ctrl-C again to kill at once)"
        ),
        "{seen}"
    );
    herd.assert_no_leftovers();
}

/// `1 instances`, `1 groups`, ...: a count of one with a plural noun.
fn bad_plurals(line: &str) -> Vec<String> {
    const NOUNS: [&str; 10] = [
        "instances",
        "groups",
        "restarts",
        "hosts",
        "lines",
        "records",
        "consumers",
        "entries",
        "errors",
        "attempts",
    ];
    let words: Vec<&str> = line
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|pair| pair[0] == "1" && NOUNS.contains(&pair[1]))
        .map(|pair| pair.join(" "))
        .collect()
}

#[test]
fn a_run_of_one_counts_in_the_singular() {
    // One group, one instance, one restart before it is marked failed,
    // and a clean stop: every count of the run's log is a 1.
    let mut herd = Herd::new(
        r#"
[[group]]
name = "single"
command = "sh"
args = ["-c", "echo single up; exit 3"]
restart = { policy = "on-failure", initial = "50ms", limit = 1 }
[group.local]
instances = 1
"#,
    );
    herd.start_with(&["--log-filter", "debug"]);
    herd.wait_for("marked failed after 1 restart in a row");
    assert_eq!(herd.wait_exit().code(), Some(1));
    for wanted in [
        "starting 1 instance in 1 group",
        "1 instance marked failed: [single]",
        "all instances ended: 1 instance, exiting",
    ] {
        assert_eq!(
            herd.lines_with(wanted).len(),
            1,
            "{wanted:?}: {:?}",
            herd.seen
        );
    }
    let bad: Vec<String> = herd.seen.iter().flat_map(|l| bad_plurals(l)).collect();
    assert!(bad.is_empty(), "{bad:?} in {:?}", herd.seen);
    herd.assert_no_leftovers();

    // The clean stop of a library instance is no warning either.
    let mut herd = Herd::new(
        r#"
[[group]]
name = "lib"
command = "{worker}"
params = { sleep = 600 }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("] Child 1 1");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let stopped = herd.wait_for("stopped: 1 instance, exiting");
    assert!(stopped.contains(" info "), "{stopped}");
    assert!(herd.lines_with(" warning ").is_empty(), "{:?}", herd.seen);
    let bad: Vec<String> = herd.seen.iter().flat_map(|l| bad_plurals(l)).collect();
    assert!(bad.is_empty(), "{bad:?} in {:?}", herd.seen);
    herd.assert_no_leftovers();
}

#[test]
fn plurals_are_found() {
    assert_eq!(
        bad_plurals("starting 1 instances in 1 groups"),
        ["1 instances", "1 groups"]
    );
    assert!(bad_plurals("exited with code 1 (1 restart, 2 groups)").is_empty());
}
