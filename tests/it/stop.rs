//! Stopping: max running time, signals, grace, and no orphans.

use crate::support::Herd;
use std::os::unix::process::CommandExt as _;
use std::time::{Duration, Instant};

#[test]
fn max_running_time_stops_the_slave_cleanly() {
    let mut herd = Herd::new(
        r#"
[master]
max_running_time = "2s"

[[group]]
name = "sleeper"
command = "{worker}"
params = { sleep = 20 }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("stopping every instance: max running time of 2s reached");
    herd.wait_for("[sleeper] [localhost] [worker/1/1] Child clean exit");
    herd.wait_for("[worker/1/1] stopped: exited with code 0");
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(herd.lines_with("killing").is_empty(), "{:?}", herd.seen);
    herd.assert_no_leftovers();
}

#[test]
fn slave_ignoring_stop_is_killed_after_the_grace() {
    let mut herd = Herd::new(
        r#"
[master]
max_running_time = "1s"
stop_grace = "1s"

[[group]]
name = "stubborn"
command = "{worker}"
params = { neverDie = true }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[stubborn] [localhost] [worker/1/1] still running 1s after stop: killing it");
    herd.wait_for(
        "had to kill 1 instance after the stop grace: [stubborn] [localhost] [worker/1/1]",
    );
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(herd.lines_with("Child clean exit").is_empty());
    herd.assert_no_leftovers();
}

const MIXED_HERD: &str = r#"
[master]
stop_grace = "5s"

[[group]]
name = "lib"
command = "{worker}"
params = { sleep = 1000 }
[group.local]
instances = 2

[[group]]
name = "plain"
command = "sh"
args = ["-c", "echo plain up; exec sleep 1000"]
[group.local]
instances = 2
"#;

fn wait_until_all_up(herd: &mut Herd) {
    herd.wait_for("[lib] [localhost] [worker/1/1] Child 1 1");
    herd.wait_for("[lib] [localhost] [worker/2/2] Child 2 2");
    herd.wait_for_count("plain up", 2);
    assert_eq!(herd.herd_processes().len(), 4, "{:?}", herd.seen);
}

#[test]
fn sigterm_stops_everything_cleanly_and_exits_zero() {
    let mut herd = Herd::new(MIXED_HERD);
    herd.start();
    wait_until_all_up(&mut herd);
    herd.signal(libc::SIGTERM);
    herd.wait_for("stopping every instance: SIGTERM received");
    assert_eq!(herd.wait_exit().code(), Some(0));
    // Library slaves end their work cleanly; plain ones die of SIGTERM.
    assert_eq!(herd.lines_with("Child clean exit").len(), 2);
    assert_eq!(herd.lines_with("stopped: killed by SIGTERM").len(), 2);
    assert!(herd.lines_with("had to kill").is_empty(), "{:?}", herd.seen);
    herd.assert_no_leftovers();
}

#[test]
fn second_sigint_kills_at_once() {
    let mut herd = Herd::new(
        r#"
[master]
stop_grace = "60s"

[[group]]
name = "stubborn"
command = "{worker}"
params = { neverDie = true }
[group.local]
instances = 2
"#,
    );
    herd.start();
    herd.wait_for_count("Child ", 2);
    herd.signal(libc::SIGINT);
    // No terminal here: no hint to press Ctrl-C again.
    let stopping = herd.wait_for("stopping every instance: SIGINT received (grace 1m)");
    assert!(!stopping.contains("again"), "{stopping}");
    let start = Instant::now();
    herd.signal(libc::SIGINT);
    herd.wait_for("killing every instance now");
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the 60 s grace was not cut short"
    );
    // Killed because asked, not because the grace passed.
    herd.wait_for("killed 2 instances at once, as requested");
    assert!(
        herd.lines_with("after the stop grace").is_empty(),
        "{:?}",
        herd.seen
    );
    herd.assert_no_leftovers();
}

#[test]
fn sigkill_of_the_master_leaves_no_instance_behind() {
    let mut herd = Herd::new(MIXED_HERD);
    herd.start();
    wait_until_all_up(&mut herd);
    herd.signal(libc::SIGKILL);
    let status = herd.wait_exit();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // Library slaves see their control channel close, plain ones get the
    // parent-death signal; assert_no_leftovers waits up to 10 s.
    herd.assert_no_leftovers();
}

/// The master's watchdog (`taskherd watchdog --state-file ...`), once it
/// runs.
fn wait_for_watchdog(herd: &Herd) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = herd.marked_processes().into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .contains("watchdog\0--state-file")
        });
        if let Some(pid) = found {
            return pid;
        }
        assert!(Instant::now() < deadline, "no watchdog running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_master_s_instances_and_their_children_are_gone_at_once() {
    // The scenario of the issue: plain `sh` instances that start children
    // in the background, the master SIGKILLed, again and again. Its
    // watchdog stops each instance's process group, grandchildren
    // included, then exits itself; no next run is needed.
    let mut herd = Herd::new(
        r#"
[[group]]
name = "bg"
command = "sh"
args = ["-c", "sleep 1001 & sleep 1002 & echo up; wait"]
[group.local]
instances = 3
"#,
    );
    for round in 1..=5 {
        herd.start();
        herd.wait_for_count("up", 3 * round);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sleeps(&herd) < 6 {
            assert!(
                Instant::now() < deadline,
                "round {round}: 6 sleeps never ran"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_for_watchdog(&herd);
        // (An instance killed with the master before it is registered is
        // beyond the watchdog: registration follows the spawn.)
        herd.wait_registered(3);
        herd.signal(libc::SIGKILL);
        herd.wait_exit();
        // Everything the herd started is gone, the watchdog too.
        herd.assert_no_leftovers();
    }
}

/// The herd's `sleep 100x` processes.
fn sleeps(herd: &Herd) -> usize {
    herd.marked_processes()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .starts_with("sleep\x00100")
        })
        .count()
}

#[test]
fn the_next_run_reaps_what_a_killed_master_left_behind() {
    // `sh` gets the parent-death signal, but the `sleep` it started does
    // not: it survives the master's SIGKILL in the instance's process
    // group. The pid registry remembers the group, and the next master
    // on the same state stops it (identity-checked).
    let mut herd = Herd::new(
        r#"
[[group]]
name = "leaky"
command = "sh"
args = ["-c", "echo up; sleep 1000; echo never"]
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[leaky] [localhost] [sh/1/1] up");
    // Without its watchdog (killed first, as anything can be), the
    // master's SIGKILL leaves the grandchild running.
    let watchdog = wait_for_watchdog(&herd);
    // SAFETY: kill(2) of this test's own watchdog process.
    assert_eq!(unsafe { libc::kill(watchdog, libc::SIGKILL) }, 0);
    herd.signal(libc::SIGKILL);
    herd.wait_exit();
    // Only the grandchild is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = herd.marked_processes();
        let only_sleep = left.len() == 1
            && std::fs::read_to_string(format!("/proc/{}/cmdline", left[0]))
                .unwrap_or_default()
                .starts_with("sleep");
        if only_sleep {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected one orphaned sleep, found {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    herd.start();
    herd.wait_for("left running by an earlier run that died");
    herd.wait_for_count("[leaky] [localhost] [sh/1/1] up", 2);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn pids_lists_the_running_instances() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "listed"
command = "{worker}"
params = { sleep = 1000 }
[group.local]
instances = 2
"#,
    );
    herd.start();
    herd.wait_for_count("] Child ", 2);
    let out = std::process::Command::new(crate::support::taskherd_bin())
        .args(["pids", "--state-file"])
        .arg(herd.state_file())
        .output()
        .expect("run taskherd pids");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(2 entries)"), "{text}");
    for label in [
        "[listed] [localhost] [worker/1/1]",
        "[listed] [localhost] [worker/2/2]",
    ] {
        assert!(
            text.lines()
                .any(|l| l.contains(label) && l.contains("running")),
            "{label} missing in:\n{text}"
        );
    }
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    // Every instance unregistered itself when it ended.
    let after = std::process::Command::new(crate::support::taskherd_bin())
        .args(["pids", "--json", "--state-file"])
        .arg(herd.state_file())
        .output()
        .expect("run taskherd pids");
    let entries: serde_json::Value = serde_json::from_slice(&after.stdout).expect("json");
    assert_eq!(entries.as_array().map(Vec::len), Some(0), "{entries}");
}

#[test]
fn sigterm_to_a_library_instance_is_a_clean_stop() {
    // An operator's `kill` (or the master's SIGTERM to an instance whose
    // hello it has not read yet) ends the work cleanly; the instance is
    // restarted by its policy like any clean end.
    let mut herd = Herd::new(
        r#"
[[group]]
name = "lib"
command = "{worker}"
params = { sleep = 600 }
restart = { policy = "always", initial = "100ms" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("] Child 1 1");
    let out = herd.ctl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let pid = status["groups"][0]["instances"][0]["pid"]
        .as_i64()
        .expect("a running pid") as i32;
    // SAFETY: plain kill(2) on the instance.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    herd.wait_for("[lib] [localhost] [worker/1/1] Child clean exit");
    herd.wait_for("[worker/1/1] exited with code 0");
    herd.wait_for_count("] Child 1 1", 2);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn the_watchdog_never_signals_a_pid_that_is_someone_else_s_now() {
    // The registry names the instance by pid and start time. Here its
    // record is made to name a pid that another process has now (the
    // record's start time is not that process's): a killed master's
    // watchdog must leave that process, and its group, alone.
    let mut herd = Herd::new(
        r#"
[[group]]
name = "one"
command = "sh"
args = ["-c", "echo up; exec sleep 1000"]
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[one] [localhost] [sh/1/1] up");
    herd.wait_registered(1);
    let watchdog = wait_for_watchdog(&herd);
    let state = herd.state_file();
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("read registry"))
            .expect("registry JSON");
    let entry = &mut doc["entries"][0];
    let recorded_start = entry["identity"]["start_time"]
        .as_u64()
        .expect("a start time");
    // Not the herd's: a process of this test, in a group of its own,
    // started in a later clock tick than the instance (started in the same
    // tick, it would be the instance as far as anyone can tell).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut other = loop {
        let mut other = std::process::Command::new("sleep")
            .arg("1000")
            .process_group(0)
            .spawn()
            .expect("start sleep");
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", other.id())).expect("stat");
        let start: u64 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .and_then(|field| field.parse().ok())
            .expect("start time of sleep");
        if start != recorded_start {
            break other;
        }
        other.kill().expect("kill sleep");
        other.wait().expect("reap sleep");
        assert!(Instant::now() < deadline, "the clock does not tick");
    };
    let other_pid = other.id();
    entry["identity"]["pid"] = other_pid.into();
    entry["pgid"] = other_pid.into();
    std::fs::write(&state, doc.to_string()).expect("write registry");

    herd.signal(libc::SIGKILL);
    herd.wait_exit();
    // The watchdog did its work and ended...
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{watchdog}")).exists() {
        assert!(Instant::now() < deadline, "the watchdog did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...and the other process still runs.
    assert!(
        other.try_wait().expect("try_wait").is_none(),
        "the watchdog killed a process that was not the herd's"
    );
    other.kill().expect("kill sleep");
    other.wait().expect("reap sleep");
    // The instance itself died with the master (its parent-death signal).
    herd.assert_no_leftovers();
}
