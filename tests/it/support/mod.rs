//! What the integration tests need: a temp dir with a config, the real
//! `taskherd` binary running it, its log lines as they arrive, and a check
//! that nothing it started is left behind.

pub mod http;
pub mod nats;
pub mod netns;
pub mod sshd;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous bound for anything a test waits for on a busy 2-core machine.
pub const WAIT: Duration = Duration::from_secs(30);

/// The `taskherd` binary under test.
pub fn taskherd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_taskherd"))
}

/// `taskherd queue ARGS...` (the path of the queue among them), checked:
/// it must exit 0; its stdout.
pub fn queue_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = Command::new(taskherd_bin())
        .arg("queue")
        .args(args)
        .output()
        .expect("taskherd queue");
    let shown: Vec<_> = args
        .iter()
        .map(|arg| arg.as_ref().to_string_lossy())
        .collect();
    assert!(
        out.status.success(),
        "taskherd queue {shown:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `taskherd queue ARGS... FILE`, checked; its stdout.
pub fn queue_on(args: &[&str], file: &std::path::Path) -> String {
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    all.push(file.as_os_str());
    queue_ok(&all)
}

/// `taskherd queue add FILE JOBS...` (JSON texts), checked.
pub fn queue_add(file: &std::path::Path, jobs: &[&str]) {
    let mut args = vec![std::ffi::OsStr::new("add"), file.as_os_str()];
    args.extend(jobs.iter().map(std::ffi::OsStr::new));
    queue_ok(&args);
}

/// `taskherd queue list --json --jobs FILE`: the report (read-only, also
/// while a feeder serves the queue).
pub fn queue_list(file: &std::path::Path) -> serde_json::Value {
    let args = [
        std::ffi::OsStr::new("list"),
        std::ffi::OsStr::new("--json"),
        std::ffi::OsStr::new("--jobs"),
        file.as_os_str(),
    ];
    serde_json::from_str(&queue_ok(&args)).expect("queue list --json prints JSON")
}

/// The `worker` example (the test slave), built by `cargo test`.
pub fn worker_bin() -> PathBuf {
    let bin = taskherd_bin();
    let dir = bin.parent().expect("binary has a directory");
    let worker = dir.join("examples").join("worker");
    assert!(
        worker.exists(),
        "{} is missing: run the tests with `cargo test` (it builds the examples)",
        worker.display()
    );
    worker
}

/// A unique marker put into every instance's environment, to find
/// leftovers in /proc.
fn unique_mark() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        Instant::now().elapsed().as_nanos()
    )
}

/// A herd under test: a temp dir, a config and (once started) a master.
pub struct Herd {
    /// Holds the config; removed when the herd is dropped.
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    pub mark: String,
    master: Option<Child>,
    lines_rx: Option<mpsc::Receiver<String>>,
    /// Every line seen so far (stdout and stderr of the master).
    pub seen: Vec<String>,
    /// Variables of the tests' environment the master must not inherit.
    env_removed: Vec<String>,
    /// Variables set in the master's environment.
    env_set: Vec<(String, String)>,
    /// The soft limit of open files the master starts with, if set.
    soft_open_files: Option<u64>,
}

/// Put in the master's environment, inherited by every instance, so
/// leftovers can be found.
pub const MARK_VAR: &str = "TASKHERD_TEST_MARK";

impl Herd {
    /// Writes `config` (TOML) into a fresh temp dir; `{worker}` is replaced
    /// by the worker example's path.
    pub fn new(config: &str) -> Herd {
        let dir = tempfile::tempdir().expect("temp dir");
        let mark = unique_mark();
        let text = config.replace("{worker}", &worker_bin().display().to_string());
        let path = dir.path().join("herd.toml");
        std::fs::write(&path, text).expect("write config");
        Herd {
            _dir: dir,
            config: path,
            mark,
            master: None,
            lines_rx: None,
            seen: Vec::new(),
            env_removed: Vec::new(),
            env_set: Vec::new(),
            soft_open_files: None,
        }
    }

    /// Starts the master with `var` set to `value` in its environment.
    pub fn env_set(&mut self, var: &str, value: &str) {
        self.env_set.push((var.to_string(), value.to_string()));
    }

    /// Starts the master without `var` in its environment (so that it is
    /// not what the instances inherit).
    pub fn env_remove(&mut self, var: &str) {
        self.env_removed.push(var.to_string());
    }

    /// Starts the master with a soft limit of `n` open files (its hard
    /// limit unchanged), as `ulimit -Sn n` would.
    pub fn soft_open_files(&mut self, n: u64) {
        self.soft_open_files = Some(n);
    }

    /// Starts `taskherd run` on the config, with extra arguments.
    pub fn start_with(&mut self, extra: &[&str]) {
        let mut args: Vec<std::ffi::OsString> = vec!["run".into(), self.config.clone().into()];
        args.extend(extra.iter().map(Into::into));
        self.spawn(&args);
    }

    /// Starts `taskherd exec` with these arguments (the config is not
    /// used), watched as a master: its lines, its exit, its leftovers.
    pub fn start_exec<S: AsRef<std::ffi::OsStr>>(&mut self, args: &[S]) {
        let mut all: Vec<std::ffi::OsString> = vec!["exec".into()];
        all.extend(args.iter().map(|arg| arg.as_ref().to_os_string()));
        self.spawn(&all);
    }

    /// Starts taskherd with `args` and reads its stdout and stderr.
    fn spawn(&mut self, args: &[std::ffi::OsString]) {
        let mut command = Command::new(taskherd_bin());
        for var in &self.env_removed {
            command.env_remove(var);
        }
        for (var, value) in &self.env_set {
            command.env(var, value);
        }
        if let Some(soft) = self.soft_open_files {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: getrlimit and setrlimit only, which are
            // async-signal-safe; nothing is allocated.
            unsafe {
                command.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit.rlim_cur = soft as libc::rlim_t;
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .args(args)
            // Instances inherit it: that is how leftovers are found.
            .env(MARK_VAR, &self.mark)
            // A pid registry of its own: herds of parallel tests must not
            // reap each other's processes.
            .env("XDG_STATE_HOME", self._dir.path().join("state"))
            // A control socket of its own, found by `ctl`.
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start taskherd");
        let (tx, rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(pipe);
                let mut buf = Vec::new();
                while reader
                    .read_until(b'\n', &mut buf)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches('\n')
                        .to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                    buf.clear();
                }
            });
        }
        self.master = Some(child);
        self.lines_rx = Some(rx);
    }

    /// The runtime dir (`$XDG_RUNTIME_DIR`) of this herd's master: its
    /// control socket is there.
    pub fn runtime_dir(&self) -> PathBuf {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self._dir.path().join("run");
        let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        dir
    }

    /// Runs an operator's command (`status`, `stop`, ...) against this
    /// herd's master: `taskherd <args> -c <config>`.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(taskherd_bin())
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .stdin(Stdio::null())
            .output()
            .expect("run taskherd")
    }

    /// The pid registry file of this herd's master.
    pub fn state_file(&self) -> PathBuf {
        self._dir
            .path()
            .join("state")
            .join("taskherd")
            .join("pids.json")
    }

    /// Starts `taskherd run` on the config.
    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    /// The master's pid.
    pub fn pid(&self) -> i32 {
        self.master.as_ref().expect("started").id() as i32
    }

    fn pump(&mut self, timeout: Duration) -> bool {
        let rx = self.lines_rx.as_ref().expect("started");
        match rx.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line);
                true
            }
            Err(_) => false,
        }
    }

    /// Waits (at most `within`) for the next line of the master's output
    /// and adds it to [`seen`](Self::seen); false when none came. For
    /// tests that parse lines as they come: a loop of
    /// [`wait_for_count`](Self::wait_for_count) rescans every line seen
    /// for each new one, quadratic in a run of thousands of jobs.
    pub fn wait_line(&mut self, within: Duration) -> bool {
        self.pump(within)
    }

    /// Waits until a line containing `needle` arrives; returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.wait_for_count(needle, 1)
    }

    /// Waits until `count` lines containing `needle` were seen in all.
    pub fn wait_for_count(&mut self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + WAIT;
        let mut found = 0;
        let mut checked = 0;
        loop {
            // Only lines not checked yet: tests may see many thousands.
            for line in &self.seen[checked..] {
                if line.contains(needle) {
                    found += 1;
                    if found == count {
                        return line.clone();
                    }
                }
            }
            checked = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.pump(left) {
                panic!(
                    "timed out waiting for {count} line(s) containing {needle:?}; seen:\n{}",
                    self.seen.join("\n")
                );
            }
        }
    }

    /// Waits for the master to exit, collecting all its output.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        let child = self.master.as_mut().expect("started");
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "taskherd did not exit in time; seen:\n{}",
                    self.seen.join("\n")
                );
            }
            // Pumping lines doubles as the wait between checks.
            let rx = self.lines_rx.as_ref().expect("started");
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(line);
            }
        };
        // The pipes close once the master is gone: drain what is left.
        while self.pump(Duration::from_secs(5)) {}
        status
    }

    /// Sends a signal to the master.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Lines containing `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<&String> {
        self.seen.iter().filter(|l| l.contains(needle)).collect()
    }

    /// [`marked_processes`](Self::marked_processes) but the master's
    /// watchdog (`taskherd watchdog`): what the herd runs.
    pub fn herd_processes(&self) -> Vec<i32> {
        self.marked_processes()
            .into_iter()
            .filter(|pid| {
                !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .contains("watchdog\0--state-file")
            })
            .collect()
    }

    /// Waits (bounded) until the master's pid registry holds `count`
    /// entries: its instances are known to its watchdog.
    pub fn wait_registered(&self, count: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(self.state_file()).unwrap_or_default();
            let entries = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|state| state["entries"].as_array().map(Vec::len))
                .unwrap_or(0);
            if entries == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the pid registry holds {entries} entries, not {count}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of live processes carrying this herd's marker (the master
    /// aside).
    pub fn marked_processes(&self) -> Vec<i32> {
        let master = self.master.as_ref().map(|m| m.id() as i32);
        marked_processes(&self.mark)
            .into_iter()
            .filter(|pid| Some(*pid) != master)
            .collect()
    }

    /// Waits (bounded) until no process with this herd's marker is left.
    pub fn assert_no_leftovers(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.marked_processes();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let described: Vec<String> = left.iter().map(|pid| describe(*pid)).collect();
                panic!("processes left behind: {described:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        if let Some(child) = self.master.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Never leave anything behind, even when a test failed.
        for pid in self.marked_processes() {
            // SAFETY: plain kill(2).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// `PID: its command line`, for messages about processes left behind.
pub fn describe(pid: i32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    format!(
        "{pid}: {}",
        String::from_utf8_lossy(&cmdline).replace('\0', " ")
    )
}

/// Pids of live (non-zombie) processes whose environment holds `mark`.
pub fn marked_processes(mark: &str) -> Vec<i32> {
    let needle = format!("{MARK_VAR}={mark}");
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let has_mark = environ
            .split(|&b| b == 0)
            .any(|var| var == needle.as_bytes());
        if has_mark && !is_zombie(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn is_zombie(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name in parentheses.
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        .unwrap_or(true)
}

/// Runs `taskherd check` on a config text; returns (exit code, stderr).
pub fn check(config: &str) -> (Option<i32>, String, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(taskherd_bin())
        .arg("check")
        .arg(&path)
        .output()
        .expect("run taskherd check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text, path, dir)
}
