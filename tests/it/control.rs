//! The operator interface against real masters: status, stop, suspend and
//! resume, rolling restart, reload, live logs over the control socket, the
//! lock against a second master, and the events API of `Launcher`.

use crate::support::{worker_bin, Herd, WAIT};
use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use taskherd::config::{Config, LogFormat};
use taskherd::master::{Events, Herd as HerdHandle, InstanceLabel, Launcher, LogSink, Shutdown};
use taskherd::protocol::control::{HerdStatus, InstanceState};

/// Two groups: library instances that honor Stop, and plain ones.
const TWO_GROUPS: &str = r#"
[master]
stop_grace = "5s"

[[group]]
name = "web"
command = "{worker}"
params = { sleep = 600 }
[group.local]
instances = 3

[[group]]
name = "batch"
command = "sh"
args = ["-c", "echo batch up; exec sleep 600"]
[group.local]
instances = 2
"#;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "command failed: {}", text(&out));
    text(&out)
}

fn status(herd: &Herd) -> HerdStatus {
    let out = herd.ctl(&["status", "--json"]);
    assert!(out.status.success(), "status failed: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("status --json parses")
}

/// (state, pid) of every instance of `group`, in id order.
fn group_states(status: &HerdStatus, group: &str) -> Vec<(InstanceState, Option<u32>)> {
    status
        .groups
        .iter()
        .find(|g| g.name == group)
        .map(|g| g.instances.iter().map(|i| (i.state, i.pid)).collect())
        .unwrap_or_default()
}

/// Greeting lines of worker instances (each start prints one).
fn greetings(herd: &Herd) -> usize {
    herd.seen
        .iter()
        .filter(|line| line.contains("] Child ") && !line.contains("clean exit"))
        .count()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Starts a herd and waits until every instance of TWO_GROUPS greeted.
fn started_two_groups() -> Herd {
    let mut herd = Herd::new(TWO_GROUPS);
    herd.start();
    herd.wait_for_count("] Child ", 3);
    herd.wait_for_count("batch up", 2);
    herd
}

#[test]
fn status_lists_every_instance_and_stop_ends_the_herd() {
    let mut herd = started_two_groups();
    let status = status(&herd);
    assert_eq!(status.config, herd.config.display().to_string());
    let names: Vec<&str> = status.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["web", "batch"]);
    for group in ["web", "batch"] {
        for (state, pid) in group_states(&status, group) {
            assert_eq!(state, InstanceState::Running, "{status:?}");
            assert!(pid.is_some_and(alive), "{status:?}");
        }
    }
    let web = &status.groups[0].instances;
    let ids: Vec<(u32, u32)> = web.iter().map(|i| (i.id, i.group_id)).collect();
    assert_eq!(ids, [(1, 1), (2, 2), (3, 3)]);

    // The human table names every instance too.
    let table = ok(herd.ctl(&["status"]));
    assert_eq!(table.matches(" running ").count(), 5, "{table}");

    // Some groups only, as a table or as JSON; an unknown one is an error.
    let table = ok(herd.ctl(&["status", "batch"]));
    assert_eq!(table.matches(" running ").count(), 2, "{table}");
    assert!(!table.contains("web"), "{table}");
    let out = herd.ctl(&["status", "--json", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let web: HerdStatus = serde_json::from_slice(&out.stdout).expect("status --json parses");
    let names: Vec<&str> = web.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    assert_eq!(web.groups[0].instances.len(), 3);
    let unknown = herd.ctl(&["status", "web", "nope"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown));
    assert!(
        text(&unknown).contains("no group named \"nope\""),
        "{}",
        text(&unknown)
    );

    // A second master on the same config is refused, naming the first.
    let second = Command::new(crate::support::taskherd_bin())
        .arg("run")
        .arg(&herd.config)
        .env("XDG_RUNTIME_DIR", herd.runtime_dir())
        .stdin(Stdio::null())
        .output()
        .expect("run a second master");
    assert_eq!(second.status.code(), Some(2), "{}", text(&second));
    let said = text(&second);
    assert!(
        said.contains(&format!("another master (pid {})", herd.pid())),
        "{said}"
    );

    let stopped = ok(herd.ctl(&["stop"]));
    assert!(stopped.contains("stopped"), "{stopped}");
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
    assert!(
        herd.lines_with("stop requested over the control socket")
            .len()
            == 1,
        "{:?}",
        herd.seen
    );
    // The socket went with the master.
    let after = herd.ctl(&["status"]);
    assert!(!after.status.success());
}

#[test]
fn suspend_keeps_a_group_stopped_until_resume() {
    let mut herd = started_two_groups();
    let before = status(&herd);
    let old_pids: Vec<u32> = group_states(&before, "web")
        .into_iter()
        .filter_map(|(_, pid)| pid)
        .collect();

    let said = ok(herd.ctl(&["suspend", "web"]));
    assert!(said.contains("suspended"), "{said}");
    let suspended = status(&herd);
    assert!(suspended.groups[0].suspended);
    assert_eq!(
        group_states(&suspended, "web"),
        vec![(InstanceState::Suspended, None); 3]
    );
    assert!(
        old_pids.iter().all(|pid| !alive(*pid)),
        "old web processes still run"
    );
    // The other group is untouched.
    assert!(group_states(&suspended, "batch")
        .iter()
        .all(|(state, _)| *state == InstanceState::Running));

    // Nothing restarts a suspended group, not even a restart of it; a
    // whole rolling restart of the other group later, web has still not
    // greeted again.
    ok(herd.ctl(&["restart", "web"]));
    ok(herd.ctl(&["restart", "batch"]));
    herd.wait_for_count("batch up", 4);
    assert_eq!(greetings(&herd), 3, "{:?}", herd.seen);
    assert_eq!(
        group_states(&status(&herd), "web"),
        vec![(InstanceState::Suspended, None); 3]
    );

    ok(herd.ctl(&["resume", "web"]));
    for id in 1..=3 {
        herd.wait_for_count(&format!("] Child {id} {id}"), 2);
    }
    let resumed = status(&herd);
    assert!(!resumed.groups[0].suspended);
    for (state, pid) in group_states(&resumed, "web") {
        assert_eq!(state, InstanceState::Running);
        assert!(pid.is_some_and(|pid| alive(pid) && !old_pids.contains(&pid)));
    }

    // Unknown groups are an error, not a silent no-op.
    let unknown = herd.ctl(&["suspend", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown).contains("no group named \"nope\""),
        "{}",
        text(&unknown)
    );

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn reload_adds_removes_changes_and_refuses_a_broken_config() {
    let mut herd = started_two_groups();
    let batch_pids: Vec<u32> = group_states(&status(&herd), "batch")
        .into_iter()
        .filter_map(|(_, pid)| pid)
        .collect();
    let original = std::fs::read_to_string(&herd.config).expect("read config");

    // A broken config is refused with its errors; the herd is untouched.
    std::fs::write(&herd.config, format!("{original}\nbogus = 1\n")).expect("write");
    let refused = herd.ctl(&["reload"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let said = text(&refused);
    assert!(
        said.contains("herd.toml:") && said.contains("bogus"),
        "{said}"
    );
    assert_eq!(status(&herd).groups.len(), 2);

    // web changes (one more instance, another message), batch goes,
    // extra comes.
    let new = original
        .replace(
            "params = { sleep = 600 }",
            "params = { sleep = 600, message = \"Web v2\" }",
        )
        .replace("instances = 3", "instances = 4")
        .replace("name = \"batch\"", "name = \"extra\"")
        .replace("batch up", "extra up");
    std::fs::write(&herd.config, new).expect("write");
    let said = ok(herd.ctl(&["reload"]));
    assert!(
        said.contains("groups added: extra; removed: batch; changed: web; resized: none"),
        "{said}"
    );
    herd.wait_for_count("Web v2", 4);
    herd.wait_for("extra up");
    let reloaded = status(&herd);
    let names: Vec<&str> = reloaded.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["web", "extra"], "{reloaded:?}");
    let web = group_states(&reloaded, "web");
    assert_eq!(web.len(), 4, "{reloaded:?}");
    assert!(web
        .iter()
        .all(|(state, _)| *state == InstanceState::Running));
    assert!(
        batch_pids.iter().all(|pid| !alive(*pid)),
        "batch still runs"
    );

    // SIGHUP reloads too: back to the original config.
    std::fs::write(&herd.config, &original).expect("write");
    herd.signal(libc::SIGHUP);
    herd.wait_for("groups added: batch; removed: extra; changed: web; resized: none");
    herd.wait_for_count("batch up", 4);

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn logs_follows_the_live_stream_of_one_group() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "ticker"
command = "sh"
args = ["-c", "while true; do echo tick; sleep 0.1; done"]
[group.local]
instances = 1

[[group]]
name = "quiet"
command = "sh"
args = ["-c", "while true; do echo hush; sleep 0.1; done"]
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("tick");
    let mut logs = Command::new(crate::support::taskherd_bin())
        .args(["logs", "ticker", "-c"])
        .arg(&herd.config)
        .env("XDG_RUNTIME_DIR", herd.runtime_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start taskherd logs");
    let stdout = logs.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + WAIT;
    while lines
        .iter()
        .filter(|l: &&String| l.contains("] tick"))
        .count()
        < 5
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("no live lines: {lines:?}"),
        }
    }
    assert!(lines.iter().all(|l| !l.contains("hush")), "{lines:?}");
    assert!(lines
        .iter()
        .any(|l| l.contains("[ticker] [localhost] [sh/1/1] tick")));

    // The stream ends when the master does.
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let deadline = Instant::now() + WAIT;
    while logs.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "taskherd logs outlived the master"
        );
        let _ = rx.recv_timeout(Duration::from_millis(50));
    }
    herd.assert_no_leftovers();
}

/// A group that prints `line 1` to `line 100` and waits, and a quiet one.
const PRINTER: &str = r#"
[[group]]
name = "printer"
command = "sh"
args = ["-c", "i=1; while [ $i -le 100 ]; do echo line $i; i=$((i+1)); done; exec sleep 600"]
[group.local]
instances = 1

[[group]]
name = "other"
command = "sh"
args = ["-c", "echo other up; exec sleep 600"]
[group.local]
instances = 1
"#;

/// The messages of `taskherd logs` lines (what follows the label).
fn messages(out: &str) -> Vec<&str> {
    out.lines()
        .map(|line| line.rsplit_once("] ").map_or(line, |(_, message)| message))
        .collect()
}

#[test]
fn logs_tail_and_no_follow_give_the_last_lines_and_exit_0() {
    let mut herd = Herd::new(PRINTER);
    herd.start();
    herd.wait_for("] line 100");
    herd.wait_for("other up");

    // The last 5 lines of one group, and the end.
    let out = herd.ctl(&["logs", "printer", "--no-follow", "--tail", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        messages(&said),
        ["line 96", "line 97", "line 98", "line 99", "line 100"],
        "{said}"
    );
    assert!(
        said.lines()
            .all(|l| l.contains("[printer] [localhost] [sh/1/1]")),
        "{said}"
    );

    // Without --tail: everything the master kept, the master's own
    // events and every group included.
    let out = herd.ctl(&["logs", "--no-follow"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let messages = messages(&said);
    for wanted in [
        "line 1",
        "line 100",
        "other up",
        "starting 2 instances in 2 groups",
    ] {
        assert!(
            messages.iter().any(|m| m.starts_with(wanted)),
            "{wanted:?} missing: {said}"
        );
    }

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn logs_follows_after_its_tail_and_ctrl_c_exits_0() {
    let mut herd = Herd::new(PRINTER);
    herd.start();
    herd.wait_for("] line 100");
    let mut logs = Command::new(crate::support::taskherd_bin())
        .args(["logs", "printer", "--tail", "3", "-c"])
        .arg(&herd.config)
        .env("XDG_RUNTIME_DIR", herd.runtime_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start taskherd logs");
    let stdout = logs.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    while lines.len() < 3 {
        match rx.recv_timeout(WAIT) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("no backlog lines: {lines:?}"),
        }
    }
    let said = lines.join("\n");
    assert_eq!(
        messages(&said),
        ["line 98", "line 99", "line 100"],
        "{said}"
    );

    // Ctrl-C ends the follow: that is not a failure.
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(logs.id() as i32, libc::SIGINT) }, 0);
    let out = wait_output(logs);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

/// Waits (bounded) for a command to end; kills it if it does not.
fn wait_output(child: std::process::Child) -> Output {
    let pid = child.id() as i32;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(child.wait_with_output()));
    match done_rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            // SAFETY: plain kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("taskherd logs did not end");
        }
    }
}

#[test]
fn stop_exits_0_when_an_instance_had_failed_before() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "broken"
command = "sh"
args = ["-c", "echo broken up; exit 3"]
restart = { policy = "never" }
[group.local]
instances = 1

[[group]]
name = "steady"
command = "sh"
args = ["-c", "echo steady up; exec sleep 600"]
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("marked failed");
    herd.wait_for("steady up");
    let out = herd.ctl(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("stopped: 2 instances ended; 1 had failed before the stop"),
        "{said}"
    );
    // The run itself still says that an instance failed.
    assert_eq!(herd.wait_exit().code(), Some(1));
    assert_eq!(
        herd.lines_with("1 instance marked failed: [broken]").len(),
        1,
        "{:?}",
        herd.seen
    );
    // No stop hint for a stop over the control socket.
    let stopping = herd.wait_for("stopping every instance");
    assert!(!stopping.contains("again"), "{stopping}");
    herd.assert_no_leftovers();
}

#[test]
fn a_kill_on_request_is_not_a_kill_after_the_grace() {
    let mut herd = Herd::new(
        r#"
[master]
stop_grace = "30s"

[[group]]
name = "stubborn"
command = "sh"
args = ["-c", "trap '' TERM; echo stubborn up; while true; do sleep 1; done"]
[group.local]
instances = 2
"#,
    );
    herd.start();
    herd.wait_for_count("stubborn up", 2);
    let out = herd.ctl(&["stop", "--kill"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("2 killed at once, as requested"), "{said}");
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.wait_for("killed 2 instances at once, as requested: [stubborn]");
    assert!(
        herd.lines_with("after the stop grace").is_empty(),
        "{:?}",
        herd.seen
    );
    herd.assert_no_leftovers();
}

/// Records the events API's calls, and plays a script on `check` ticks.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    /// (tick, action) pairs: "suspend g", "resume g", "restart g", "stop".
    script: Mutex<BTreeMap<u32, Vec<String>>>,
    ticks: Mutex<u32>,
    /// Whether to start the script (set once every instance runs).
    armed: Mutex<bool>,
}

impl Recorder {
    fn push(&self, call: String) {
        self.calls.lock().expect("lock").push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
}

/// The events trait, forwarding to a shared recorder.
struct Recording(Arc<Recorder>);

impl Events for Recording {
    fn starting(&self, _: &HerdHandle) {
        self.0.push("starting".into());
    }
    fn started(&self, _: &HerdHandle) {
        self.0.push("started".into());
    }
    fn check(&self, herd: &HerdHandle) {
        let status = herd.status();
        let all_running = status
            .groups
            .iter()
            .flat_map(|g| g.instances.iter())
            .all(|i| i.state == InstanceState::Running);
        let mut armed = self.0.armed.lock().expect("lock");
        if !*armed {
            *armed = all_running;
            return;
        }
        let mut ticks = self.0.ticks.lock().expect("lock");
        *ticks += 1;
        let actions = self.0.script.lock().expect("lock").remove(&ticks);
        for action in actions.unwrap_or_default() {
            self.0.push(format!("action {action}"));
            match action.split_once(' ') {
                Some(("suspend", group)) => herd.suspend(group),
                Some(("resume", group)) => herd.resume(group),
                Some(("restart", group)) => herd.restart(group),
                _ => herd.stop("the script says so"),
            }
        }
    }
    fn stopped(&self, report: &taskherd::master::RunReport) {
        self.0.push(format!("stopped {}", report.instances.len()));
    }
    fn process_created(&self, _: &HerdHandle, instance: &InstanceLabel) {
        self.0.push(format!("created {}", instance.id));
    }
    fn process_started(&self, _: &HerdHandle, instance: &InstanceLabel, _pid: u32) {
        self.0.push(format!("started {}", instance.id));
    }
    fn process_stopped(&self, _: &HerdHandle, instance: &InstanceLabel, how: &str) {
        self.0.push(format!("exited {} {how}", instance.id));
    }
}

/// The calls about instance `id` (created, started, exited).
fn calls_of(calls: &[String], id: u32) -> Vec<String> {
    calls
        .iter()
        .filter(|c| {
            let mut words = c.split(' ');
            let kind = words.next().unwrap_or("");
            ["created", "started", "exited"].contains(&kind)
                && words.next() == Some(id.to_string().as_str())
        })
        .cloned()
        .collect()
}

/// Runs `config` in this process with the recorder; returns the report.
fn run_in_process(config: &str, recorder: Arc<Recorder>) -> taskherd::master::RunReport {
    let text = config.replace("{worker}", &worker_bin().display().to_string());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("herd.toml");
    std::fs::write(&path, &text).expect("write config");
    let mut config = Config::parse(&text, &path).expect("valid config");
    config.master.state_dir = Some(dir.path().join("state"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(async move {
        let (sink, writer) = LogSink::spawn(LogFormat::Text, std::io::sink()).expect("log writer");
        let shutdown = Shutdown::new();
        let limit = shutdown.clone();
        // A bound on the whole test, should the script never stop it.
        let guard = tokio::spawn(async move {
            tokio::time::sleep(WAIT * 2).await;
            limit.kill_now("test took too long");
        });
        let report = Launcher::new(config)
            .events(Recording(recorder))
            .run(sink, shutdown)
            .await;
        guard.abort();
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .expect("log writer ends");
        report
    });
    drop(dir);
    report
}

#[test]
fn suspend_and_resume_driven_by_events() {
    // The original's scenario 17, on check ticks instead of 10 s steps:
    // group 1 suspended, then group 2, then group 1 resumed, then stop.
    // Group 1 runs twice (two clean exits), group 2 once.
    let recorder = Arc::new(Recorder::default());
    *recorder.script.lock().expect("lock") = BTreeMap::from([
        (1, vec!["suspend g1".to_string()]),
        (3, vec!["suspend g2".to_string()]),
        (5, vec!["resume g1".to_string()]),
        (7, vec!["stop".to_string()]),
    ]);
    let config = r#"
[master]
stop_grace = "5s"
[[group]]
name = "g1"
command = "{worker}"
params = { sleep = 600 }
[group.local]
instances = 1
[[group]]
name = "g2"
command = "{worker}"
params = { sleep = 600 }
[group.local]
instances = 1
"#;
    let report = run_in_process(config, recorder.clone());
    assert!(report.success(), "{report:?}");
    let calls = recorder.calls();
    let count = |needle: &str| calls.iter().filter(|c| c.as_str() == needle).count();
    assert_eq!(count("started 1"), 2, "{calls:?}");
    assert_eq!(count("exited 1 exited with code 0"), 2, "{calls:?}");
    assert_eq!(count("started 2"), 1, "{calls:?}");
    assert_eq!(count("exited 2 exited with code 0"), 1, "{calls:?}");
    assert_eq!(calls.first().map(String::as_str), Some("starting"));
    assert_eq!(calls.last().map(String::as_str), Some("stopped 2"));
    // Each instance: created, then started, then exited, in that order.
    for id in [1, 2] {
        let mine: Vec<String> = calls_of(&calls, id)
            .iter()
            .map(|c| c.split(' ').next().unwrap_or("").to_string())
            .collect();
        for pair in mine.chunks(3) {
            assert_eq!(pair, ["created", "started", "exited"], "{calls:?}");
        }
    }
}

#[test]
fn rolling_restart_keeps_all_but_one_running() {
    let recorder = Arc::new(Recorder::default());
    *recorder.script.lock().expect("lock") = BTreeMap::from([
        (1, vec!["restart web".to_string()]),
        (12, vec!["stop".to_string()]),
    ]);
    let config = r#"
[master]
stop_grace = "5s"
[[group]]
name = "web"
command = "{worker}"
params = { sleep = 600 }
[group.local]
instances = 4
"#;
    let report = run_in_process(config, recorder.clone());
    assert!(report.success(), "{report:?}");
    let calls = recorder.calls();
    // Replay the events: how many ran at each moment after the restart
    // began, and in which order the instances were restarted.
    let mut running = 0i32;
    let mut lowest = i32::MAX;
    let mut restarting = false;
    let mut order = Vec::new();
    for call in &calls {
        let words: Vec<&str> = call.split(' ').collect();
        match words.as_slice() {
            ["action", "restart", _] => restarting = true,
            ["action", "stop"] => break,
            ["started", _] => running += 1,
            ["exited", id, ..] => {
                running -= 1;
                if restarting {
                    order.push(id.to_string());
                }
            }
            _ => {}
        }
        if restarting {
            lowest = lowest.min(running);
        }
    }
    assert_eq!(order, ["1", "2", "3", "4"], "{calls:?}");
    assert_eq!(lowest, 3, "{calls:?}");
}

#[test]
fn events_come_in_order_for_remote_instances_too() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let recorder = Arc::new(Recorder::default());
    let config = format!(
        r#"
[master]
agent_path = "{agent}"

[ssh]
ssh_config = "{ssh_config}"

[[group]]
name = "once"
command = "{{worker}}"
restart = {{ policy = "never" }}
[group.local]
instances = 1
[[group.remote]]
hosts = ["{host}"]
instances = 1
command = "{worker}"
"#,
        agent = crate::support::taskherd_bin().display(),
        ssh_config = world.ssh_config().display(),
        host = host.alias(),
        worker = worker_bin().display(),
    );
    let report = run_in_process(&config, recorder.clone());
    assert!(report.success(), "{report:?}");
    let calls = recorder.calls();
    for id in [1, 2] {
        let mine = calls_of(&calls, id);
        assert_eq!(
            mine,
            [
                format!("created {id}"),
                format!("started {id}"),
                format!("exited {id} exited with code 0")
            ],
            "{calls:?}"
        );
    }
    assert_eq!(calls.first().map(String::as_str), Some("starting"));
    assert_eq!(calls.last().map(String::as_str), Some("stopped 2"));
    crate::remote::assert_host_clean(&host);
}

#[test]
fn remote_and_queue_groups_in_status_suspend_and_restart() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let queue_worker = worker_bin()
        .parent()
        .expect("examples dir")
        .join("queue_worker");
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"
stop_grace = "5s"

[ssh]
ssh_config = "{ssh_config}"

[[group]]
name = "far"
command = "{{worker}}"
params = {{ sleep = 600 }}
[[group.remote]]
hosts = ["{host}"]
instances = 2
command = "{worker}"

[[group]]
name = "jobs"
command = "{queue_worker}"
params = {{ jobs = 50 }}
[group.feeder]
[group.queue]
progress_every = "200ms"
[group.local]
instances = 1
"#,
        agent = crate::support::taskherd_bin().display(),
        ssh_config = world.ssh_config().display(),
        host = host.alias(),
        worker = worker_bin().display(),
        queue_worker = queue_worker.display(),
    ));
    herd.start();
    herd.wait_for_count("] Child ", 2);
    herd.wait_for("(queue empty)");
    let before = status(&herd);
    let far = group_states(&before, "far");
    assert_eq!(far.len(), 2);
    assert!(far
        .iter()
        .all(|(state, pid)| *state == InstanceState::Running && pid.is_some()));
    let far_hosts: Vec<&str> = before.groups[0]
        .instances
        .iter()
        .map(|i| i.host.as_str())
        .collect();
    assert_eq!(far_hosts, [host.alias(); 2]);
    let queue = before.groups[1].queue.expect("queue counts in status");
    assert_eq!(queue.done, 50, "{queue:?}");

    ok(herd.ctl(&["suspend", "far"]));
    assert_eq!(
        group_states(&status(&herd), "far"),
        vec![(InstanceState::Suspended, None); 2]
    );
    // The remote processes are gone (the sshd hosts run on loopback).
    assert!(far.iter().all(|(_, pid)| !pid.is_some_and(alive)));

    // A new agent after a lost one does not start suspended instances.
    let connected = herd.wait_for("connected, agent pid");
    crate::remote::kill_agent(&connected);
    let again = herd.wait_for_count("connected, agent pid", 2);
    assert!(again.contains("2 suspended"), "{again}");
    assert_eq!(greetings(&herd), 2, "{:?}", herd.seen);
    assert_eq!(
        group_states(&status(&herd), "far"),
        vec![(InstanceState::Suspended, None); 2]
    );

    ok(herd.ctl(&["resume", "far"]));
    herd.wait_for_count("] Child 1 1", 2);
    herd.wait_for_count("] Child 2 2", 2);
    ok(herd.ctl(&["restart", "far"]));
    herd.wait_for_count("] Child 1 1", 3);
    herd.wait_for_count("] Child 2 2", 3);
    let after = status(&herd);
    for instance in &after.groups[0].instances {
        assert_eq!(instance.state, InstanceState::Running);
        // Three processes each, all started by the operator: no restart.
        assert_eq!(instance.restarts, 0, "{after:?}");
    }

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
    crate::remote::assert_host_clean(&host);
}

/// (id, group id, pid) of every instance of `group` still supervised, in
/// id order.
fn ids_and_pids(status: &HerdStatus, group: &str) -> Vec<(u32, u32, Option<u32>)> {
    status
        .groups
        .iter()
        .find(|g| g.name == group)
        .map(|g| {
            g.instances
                .iter()
                .filter(|i| {
                    !matches!(
                        i.state,
                        InstanceState::Stopped | InstanceState::Completed | InstanceState::Failed
                    )
                })
                .map(|i| (i.id, i.group_id, i.pid))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_reload_that_only_changes_a_count_keeps_the_instances_and_their_ids() {
    let config = |web: u32, added: bool| {
        let mut text = format!(
            r#"
[master]
stop_grace = "5s"

[[group]]
name = "first"
command = "sh"
args = ["-c", "echo first up; exec sleep 600"]
[group.local]
instances = 1

[[group]]
name = "web"
command = "sh"
args = ["-c", "echo web up $TASKHERD_ID/$TASKHERD_GROUP_ID/$TASKHERD_GROUP_COUNT; exec sleep 600"]
[group.local]
instances = {web}
"#
        );
        if added {
            // A group whose name is a word of the old message.
            text.push_str(
                r#"
[[group]]
name = "added"
command = "sh"
args = ["-c", "echo added up; exec sleep 600"]
[group.local]
instances = 1
"#,
            );
        }
        text
    };
    let mut herd = Herd::new(&config(4, false));
    herd.start();
    herd.wait_for_count("web up", 4);
    let before = ids_and_pids(&status(&herd), "web");
    let ids: Vec<(u32, u32)> = before.iter().map(|(id, gid, _)| (*id, *gid)).collect();
    assert_eq!(ids, [(2, 1), (3, 2), (4, 3), (5, 4)], "{before:?}");
    assert!(before.iter().all(|(_, _, pid)| pid.is_some_and(alive)));

    // 4 -> 6, and a new group: the 4 go on, 2 more come with new ids.
    std::fs::write(&herd.config, config(6, true)).expect("write");
    let said = ok(herd.ctl(&["reload"]));
    assert!(
        said.contains(
            "groups added: added; removed: none; changed: none; resized: web (4 -> 6 instances)"
        ),
        "{said}"
    );
    herd.wait_for("added up");
    herd.wait_for("web up 7/5/6");
    herd.wait_for("web up 8/6/6");
    let grown = ids_and_pids(&status(&herd), "web");
    assert_eq!(&grown[..4], &before[..], "the instances kept, same pids");
    let new: Vec<(u32, u32)> = grown[4..].iter().map(|(id, gid, _)| (*id, *gid)).collect();
    assert_eq!(new, [(7, 5), (8, 6)], "{grown:?}");
    assert_eq!(herd.lines_with("web up").len(), 6, "nothing restarted");

    // 6 -> 3: the highest group ids stop, the others go on.
    std::fs::write(&herd.config, config(3, true)).expect("write");
    let said = ok(herd.ctl(&["reload"]));
    assert!(
        said.contains(
            "groups added: none; removed: none; changed: none; resized: web (6 -> 3 instances)"
        ),
        "{said}"
    );
    let shrunk = ids_and_pids(&status(&herd), "web");
    assert_eq!(&shrunk[..], &before[..3], "{shrunk:?}");
    for (id, _, pid) in grown.iter().filter(|(id, _, _)| ![2, 3, 4].contains(id)) {
        let pid = pid.expect("ran");
        assert!(!alive(pid), "instance {id} (pid {pid}) still runs");
    }

    // And back to 5: the group ids free again, new ids.
    std::fs::write(&herd.config, config(5, true)).expect("write");
    let said = ok(herd.ctl(&["reload"]));
    assert!(said.contains("resized: web (3 -> 5 instances)"), "{said}");
    herd.wait_for("web up 9/4/5");
    herd.wait_for("web up 10/5/5");
    let again = ids_and_pids(&status(&herd), "web");
    assert_eq!(&again[..3], &before[..3], "{again:?}");
    assert_eq!(herd.lines_with("web up").len(), 8, "nothing restarted");

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    herd.assert_no_leftovers();
}

#[test]
fn a_reload_that_only_changes_a_remote_count_keeps_the_instances_there() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let config = |remote: u32| {
        format!(
            r#"
[master]
agent_path = "{agent}"
stop_grace = "5s"

[ssh]
ssh_config = "{ssh_config}"

[[group]]
name = "far"
command = "sh"
args = ["-c", "echo far up $TASKHERD_ID/$TASKHERD_GROUP_ID; exec sleep 600"]
[group.local]
instances = 1
[[group.remote]]
hosts = ["{host}"]
instances = {remote}
"#,
            agent = crate::support::taskherd_bin().display(),
            ssh_config = world.ssh_config().display(),
            host = host.alias(),
        )
    };
    let mut herd = Herd::new(&config(2));
    herd.start();
    herd.wait_for_count("far up", 3);
    let before = ids_and_pids(&status(&herd), "far");
    let ids: Vec<(u32, u32)> = before.iter().map(|(id, gid, _)| (*id, *gid)).collect();
    assert_eq!(ids, [(1, 1), (2, 2), (3, 3)], "{before:?}");

    // 2 -> 3 on the host: one more there, through the same agent.
    std::fs::write(&herd.config, config(3)).expect("write");
    let said = ok(herd.ctl(&["reload"]));
    assert!(said.contains("resized: far (3 -> 4 instances)"), "{said}");
    let line = herd.wait_for("far up 4/4");
    assert!(
        line.contains(&format!("[far] [{}] [sh/4/4]", host.alias())),
        "{line}"
    );
    let grown = ids_and_pids(&status(&herd), "far");
    assert_eq!(&grown[..3], &before[..], "{grown:?}");
    assert_eq!(herd.lines_with("connected, agent pid").len(), 1);

    // 3 -> 1 on the host: its highest group ids stop, the local one stays.
    std::fs::write(&herd.config, config(1)).expect("write");
    let said = ok(herd.ctl(&["reload"]));
    assert!(said.contains("resized: far (4 -> 2 instances)"), "{said}");
    let shrunk = ids_and_pids(&status(&herd), "far");
    assert_eq!(&shrunk[..], &before[..2], "{shrunk:?}");
    for (id, _, pid) in &grown[2..] {
        let pid = pid.expect("ran");
        assert!(!alive(pid), "instance {id} (pid {pid}) still runs");
    }
    assert_eq!(herd.lines_with("far up").len(), 4, "nothing restarted");

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    herd.assert_no_leftovers();
    crate::remote::assert_host_clean(&host);
}

#[test]
fn a_reload_whose_new_instances_do_not_run_keeps_the_old_ones() {
    let mut herd = started_two_groups();
    let batch_pids: Vec<u32> = group_states(&status(&herd), "batch")
        .into_iter()
        .filter_map(|(_, pid)| pid)
        .collect();
    let original = std::fs::read_to_string(&herd.config).expect("read config");
    // A typo in the new command: its first instance never runs.
    std::fs::write(
        &herd.config,
        original.replace("command = \"sh\"", "command = \"sh-typo-nowhere\""),
    )
    .expect("write");
    let refused = herd.ctl(&["reload"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    let said = text(&refused);
    assert!(
        said.contains("group batch: a new instance did not run")
            && said.contains("2 old instances kept"),
        "{said}"
    );
    // The old instances still run, and the failed one is gone.
    let after = status(&herd);
    let batch = group_states(&after, "batch");
    assert_eq!(batch.len(), 2, "{after:?}");
    assert!(batch
        .iter()
        .all(|(state, pid)| *state == InstanceState::Running
            && pid.is_some_and(|pid| batch_pids.contains(&pid))));

    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{:?}", herd.seen);
    herd.assert_no_leftovers();
}

#[test]
fn status_and_stop_are_served_during_a_rolling_reload() {
    // Old instances that ignore SIGTERM take their whole grace to go: the
    // reload takes a while, and the master answers meanwhile.
    let mut herd = Herd::new(
        r#"
[master]
stop_grace = "2s"

[[group]]
name = "stubborn"
command = "sh"
args = ["-c", "trap '' TERM; echo stubborn up; while true; do sleep 1; done"]
[group.local]
instances = 2
"#,
    );
    herd.start();
    herd.wait_for_count("stubborn up", 2);
    let original = std::fs::read_to_string(&herd.config).expect("read config");
    std::fs::write(
        &herd.config,
        original.replace("stubborn up", "stubborn v2 up"),
    )
    .expect("write");
    let reload = Command::new(crate::support::taskherd_bin())
        .args(["reload", "-c"])
        .arg(&herd.config)
        .env("XDG_RUNTIME_DIR", herd.runtime_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start taskherd reload");
    // While the first old instance takes its grace, status shows it
    // stopping next to its running successor.
    let deadline = Instant::now() + WAIT;
    loop {
        let states: Vec<InstanceState> = group_states(&status(&herd), "stubborn")
            .into_iter()
            .map(|(state, _)| state)
            .collect();
        if states.contains(&InstanceState::Stopping) {
            assert!(states.contains(&InstanceState::Running), "{states:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never saw the reload under way: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let said = ok(reload.wait_with_output().expect("reload ends"));
    assert!(said.contains("changed: stubborn;"), "{said}");
    herd.wait_for_count("stubborn v2 up", 2);
    assert_eq!(
        group_states(&status(&herd), "stubborn")
            .iter()
            .filter(|(state, _)| *state == InstanceState::Running)
            .count(),
        2
    );
    ok(herd.ctl(&["stop"]));
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn stop_works_while_nobody_reads_the_masters_stdout() {
    // `taskherd run herd.toml | something-stuck`: the log waits for the
    // terminal, but the master's own events and its control socket don't.
    let herd = Herd::new(
        r#"
[[group]]
name = "spam"
command = "sh"
args = ["-c", "while :; do echo spam spam spam spam spam spam spam; done"]
[group.local]
instances = 2
"#,
    );
    let mut master = Command::new(crate::support::taskherd_bin())
        .arg("run")
        .arg(&herd.config)
        .env(crate::support::MARK_VAR, &herd.mark)
        .env("XDG_RUNTIME_DIR", herd.runtime_dir())
        .env("XDG_STATE_HOME", herd.runtime_dir().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped()) // never read
        .stderr(Stdio::null())
        .spawn()
        .expect("start taskherd");
    let deadline = Instant::now() + WAIT;
    // Up once its socket answers; by then the pipe is filling up.
    while !herd.ctl(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "the master never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopped = herd.ctl(&["stop"]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = master.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the master did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(master.stdout.take());
    herd.assert_no_leftovers();
}

#[test]
fn start_stop_and_restart_of_one_instance_revive_failed_ones_and_say_what_was_done() {
    // web runs; flaky fails for good until a file exists; manual starts
    // only on request.
    let mut herd = Herd::new(
        r#"
[master]
stop_grace = "5s"

[[group]]
name = "web"
command = "sh"
args = ["-c", "echo web $TASKHERD_GROUP_ID up; exec sleep 600"]
[group.local]
instances = 2

[[group]]
name = "flaky"
command = "sh"
cwd = "."
args = ["-c", "if [ -e fixed ]; then echo flaky up; exec sleep 600; fi; echo flaky broken; exit 3"]
restart = { policy = "never" }
[group.local]
instances = 1

[[group]]
name = "manual"
command = "sh"
args = ["-c", "echo manual up; exec sleep 600"]
autostart = false
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("web 1 up");
    herd.wait_for("web 2 up");
    herd.wait_for("[flaky] [localhost] [sh/3/1] marked failed");
    herd.wait_for("group manual not started (autostart = false)");
    let states = |herd: &Herd, group: &str| -> Vec<InstanceState> {
        group_states(&status(herd), group)
            .into_iter()
            .map(|(state, _)| state)
            .collect()
    };
    assert_eq!(states(&herd, "flaky"), [InstanceState::Failed]);
    assert_eq!(states(&herd, "manual"), [InstanceState::Stopped]);

    // One instance stops and stays stopped; the other runs on.
    let web2 = group_states(&status(&herd), "web")[1]
        .1
        .expect("web:2 runs");
    assert_eq!(ok(herd.ctl(&["stop", "web:2"])).trim(), "web:2 stopped");
    assert!(!alive(web2));
    assert_eq!(
        states(&herd, "web"),
        [InstanceState::Running, InstanceState::Stopped]
    );
    assert_eq!(
        ok(herd.ctl(&["stop", "web:2"])).trim(),
        "web:2 was not running (stopped)"
    );
    assert_eq!(ok(herd.ctl(&["start", "web:2"])).trim(), "web:2 started");
    herd.wait_for_count("web 2 up", 2);
    assert_eq!(
        ok(herd.ctl(&["start", "web"])).trim(),
        "group web: nothing to start, 2 were running already"
    );

    // A failed instance: start says how it failed again, then, fixed, it
    // runs; the run no longer counts it failed.
    let out = herd.ctl(&["start", "flaky:1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("flaky:1 did not start: exited with code 3"),
        "{}",
        text(&out)
    );
    std::fs::write(herd.config.with_file_name("fixed"), "").expect("fix flaky");
    assert_eq!(
        ok(herd.ctl(&["restart", "flaky"])).trim(),
        "group flaky restarted (1 instance; 1 of them had ended and started again)"
    );
    herd.wait_for("flaky up");
    assert_eq!(states(&herd, "flaky"), [InstanceState::Running]);

    // autostart = false: started on request.
    assert_eq!(
        ok(herd.ctl(&["start", "manual"])).trim(),
        "group manual: 1 instance started"
    );
    herd.wait_for("manual up");
    assert_eq!(
        ok(herd.ctl(&["resume", "manual"])).trim(),
        "group manual was not suspended: nothing to resume (1 instance running)"
    );
    let unknown = herd.ctl(&["restart", "web:7"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown).contains("group web has no instance 7"));

    // Every instance stopped on request: the herd waits for an operator.
    ok(herd.ctl(&["stop", "web"]));
    ok(herd.ctl(&["stop", "flaky"]));
    ok(herd.ctl(&["stop", "manual"]));
    assert!(herd.marked_processes().iter().all(|pid| {
        // Only the watchdog is left.
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .contains("watchdog")
    }));
    assert_eq!(
        states(&herd, "web"),
        [InstanceState::Stopped, InstanceState::Stopped]
    );
    let out = herd.ctl(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}
