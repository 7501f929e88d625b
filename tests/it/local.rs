//! The launcher scenarios of the original suite, on local instances.

use crate::support::Herd;

fn exit_code(herd: &mut Herd) -> Option<i32> {
    herd.wait_exit().code()
}

#[test]
fn one_instance_runs_and_ends() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "single"
command = "{worker}"
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("info      [single] [localhost] [worker/1/1] Child 1 1");
    herd.wait_for("[single] [localhost] [worker/1/1] Child clean exit");
    herd.wait_for("[worker/1/1] exited with code 0");
    herd.wait_for("all instances ended");
    assert_eq!(exit_code(&mut herd), Some(0));
    assert!(herd.lines_with("restarting").is_empty());
    herd.assert_no_leftovers();
}

#[test]
fn log_level_of_the_library_is_kept() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "loud"
command = "{worker}"
params = { message = "The end is near", level = "emergency" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("emergency [loud] [localhost] [worker/1/1] The end is near");
    assert_eq!(exit_code(&mut herd), Some(0));
}

#[test]
fn two_instances_get_their_ids() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "pair"
command = "{worker}"
[group.local]
instances = 2
"#,
    );
    herd.start();
    herd.wait_for("[pair] [localhost] [worker/1/1] Child 1 1");
    herd.wait_for("[pair] [localhost] [worker/2/2] Child 2 2");
    assert_eq!(exit_code(&mut herd), Some(0));
    assert_eq!(herd.lines_with("Child clean exit").len(), 2);
}

#[test]
fn two_groups_continue_ids_and_restart_group_ids() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "first"
command = "{worker}"
[group.local]
instances = 1

[[group]]
name = "second"
command = "{worker}"
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[first] [localhost] [worker/1/1] Child 1 1");
    herd.wait_for("[second] [localhost] [worker/2/1] Child 2 1");
    assert_eq!(exit_code(&mut herd), Some(0));
}

#[test]
fn params_reach_the_slave() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "greeter"
command = "{worker}"
params = { message = "Hello World!" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[greeter] [localhost] [worker/1/1] Hello World!");
    assert_eq!(exit_code(&mut herd), Some(0));
}

#[test]
fn plain_program_gets_identity_in_env_and_params_not_on_the_command_line() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "plain"
command = "sh"
args = ["-c", "echo \"id=$TASKHERD_ID gid=$TASKHERD_GROUP_ID count=$TASKHERD_GROUP_COUNT group=$TASKHERD_GROUP host=$TASKHERD_HOST params=$TASKHERD_PARAMS\"; echo \"cmdline=$(tr '\\0' ' ' < /proc/$$$$/cmdline)\""]
params = { secret = "s3cr3t", n = 4 }
[group.local]
instances = 2
"#,
    );
    herd.start();
    let line = herd.wait_for("[plain] [localhost] [sh/2/2] id=");
    assert!(
        line.ends_with(
            r#"id=2 gid=2 count=2 group=plain host=localhost params={"n":4,"secret":"s3cr3t"}"#
        ),
        "{line}"
    );
    let cmdline = herd.wait_for("[sh/1/1] cmdline=");
    assert!(cmdline.contains("sh -c"), "{cmdline}");
    assert!(
        !cmdline.contains("s3cr3t"),
        "params leaked to the command line: {cmdline}"
    );
    assert_eq!(exit_code(&mut herd), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn silent_slave_is_killed_restarted_then_marked_failed() {
    // The original's per-process timeout scenario: a slave that neither
    // prints nor pings is killed at each timeout and restarted, until the
    // restart limit; then the master gives up and exits non-zero.
    let mut herd = Herd::new(
        r#"
[master]
timeout = "1s"

[[group]]
name = "silent"
command = "{worker}"
params = { forceSleep = 90 }
restart = { initial = "100ms", max = "200ms", limit = 3 }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("marked failed after 3 restarts in a row: liveness timeout after 1s");
    assert_eq!(exit_code(&mut herd), Some(1));
    assert_eq!(
        herd.lines_with("liveness timeout: no ping or output for 1s")
            .len(),
        4
    );
    assert_eq!(herd.lines_with("restarting in").len(), 3);
    assert!(herd.lines_with("Child clean exit").is_empty());
    herd.wait_for("1 instance marked failed: [silent] [localhost] [worker/1/1]");
    herd.assert_no_leftovers();
}

#[test]
fn sleeping_slave_that_pings_is_never_killed() {
    // `sleep` pings while it waits: a healthy slave outliving its timeout
    // many times over must not be touched.
    let mut herd = Herd::new(
        r#"
[master]
timeout = "2s"

[[group]]
name = "patient"
command = "{worker}"
params = { sleep = 7 }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[patient] [localhost] [worker/1/1] Child clean exit");
    assert_eq!(exit_code(&mut herd), Some(0));
    assert!(
        herd.lines_with("liveness timeout").is_empty(),
        "{:?}",
        herd.seen
    );
}

#[test]
fn plain_program_with_group_timeout_is_killed_when_silent() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "mute"
command = "sleep"
args = ["60"]
timeout = "1s"
restart = { policy = "never" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[mute] [localhost] [sleep/1/1] liveness timeout");
    herd.wait_for("marked failed: liveness timeout after 1s (restart policy never)");
    assert_eq!(exit_code(&mut herd), Some(1));
    herd.assert_no_leftovers();
}

#[test]
fn crashing_slave_is_restarted_with_backoff_then_marked_failed() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "crashy"
command = "{worker}"
params = { fail = "database unreachable" }
restart = { policy = "on-failure", initial = "200ms", max = "400ms", jitter = 0, limit = 2 }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("marked failed after 2 restarts in a row: failed: database unreachable");
    assert_eq!(exit_code(&mut herd), Some(1));
    assert_eq!(herd.lines_with("Child 1 1").len(), 3);
    // The delay doubles: 200ms then 400ms.
    herd.wait_for("restarting in 200ms (restart 1 of 2)");
    herd.wait_for("restarting in 400ms (restart 2 of 2)");
}

#[test]
fn panic_in_the_slave_is_a_failure_not_a_success() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "panicky"
command = "{worker}"
params = { panic = "index out of bounds" }
restart = { policy = "never" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("marked failed: failed: index out of bounds");
    assert_eq!(exit_code(&mut herd), Some(1));
}

#[test]
fn policy_always_restarts_clean_exits_until_stopped() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "loop"
command = "{worker}"
restart = { policy = "always", initial = "50ms", max = "50ms", limit = "unlimited" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for_count("[loop] [localhost] [worker/1/1] Child clean exit", 3);
    herd.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut herd), Some(0));
    herd.assert_no_leftovers();
}

#[test]
fn json_log_format() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "js"
command = "{worker}"
[group.local]
instances = 1
"#,
    );
    herd.start_with(&["--log-format", "json"]);
    let line = herd.wait_for("Child 1 1");
    let record: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(record["group"], "js");
    assert_eq!(record["host"], "localhost");
    assert_eq!(record["id"], 1);
    assert_eq!(record["group_id"], 1);
    assert_eq!(record["level"], "info");
    assert_eq!(record["stream"], "stdout");
    assert_eq!(record["message"], "Child 1 1");
    assert_eq!(exit_code(&mut herd), Some(0));
}

#[test]
fn command_that_cannot_start_is_reported() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "ghost"
command = "./does-not-exist"
restart = { initial = "10ms", limit = 1 }
[group.local]
instances = 1
"#,
    );
    herd.start();
    let line = herd.wait_for("cannot start");
    assert!(
        line.contains("cannot start") && line.contains("/does-not-exist: no such file"),
        "{line}"
    );
    assert!(!line.contains("/./"), "{line}");
    herd.wait_for("marked failed after 1 restart in a row");
    assert_eq!(exit_code(&mut herd), Some(1));
}

#[test]
fn slave_run_by_hand_says_how_to_run_it() {
    let out = std::process::Command::new(crate::support::worker_bin())
        .env_remove("TASKHERD_CONTROL_FD")
        .output()
        .expect("run the worker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("TASKHERD_CONTROL_FD") && stderr.contains("taskherd run"),
        "{stderr}"
    );
}

#[test]
fn max_jobs_recycles_the_instance() {
    let mut herd = Herd::new(
        r#"
[master]
max_running_time = "20s"

[[group]]
name = "recycled"
command = "{worker}"
params = { jobs = 1000 }
max_jobs = 3
restart = { policy = "never" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    // Three jobs, recycling, and a fresh instance (even under policy never).
    herd.wait_for("[recycled] [localhost] [worker/1/1] did its max of 3 jobs: recycling it");
    herd.wait_for_count("[recycled] [localhost] [worker/1/1] Child 1 1", 2);
    herd.wait_for_count("[worker/1/1] job 3", 2);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(herd.lines_with("] job 4").is_empty(), "{:?}", herd.seen);
    herd.assert_no_leftovers();
}

#[test]
fn max_lifetime_recycles_the_instance() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "aging"
command = "{worker}"
params = { sleep = 1000 }
max_lifetime = "1s"
restart = { policy = "never" }
[group.local]
instances = 1

[[group]]
name = "plain"
command = "sh"
args = ["-c", "echo plain $$$$; exec sleep 1000"]
max_lifetime = "1s"
[group.local]
instances = 1
"#,
    );
    herd.start();
    herd.wait_for("[aging] [localhost] [worker/1/1] reached its max lifetime of 1s: recycling it");
    herd.wait_for_count("[aging] [localhost] [worker/1/1] Child clean exit", 1);
    herd.wait_for_count("[aging] [localhost] [worker/1/1] Child 1 1", 2);
    herd.wait_for_count(
        "[plain] [localhost] [sh/2/1] reached its max lifetime of 1s",
        1,
    );
    herd.wait_for_count("[plain] [localhost] [sh/2/1] plain ", 2);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(
        herd.lines_with("marked failed").is_empty(),
        "{:?}",
        herd.seen
    );
    herd.assert_no_leftovers();
}

#[test]
fn short_lived_commands_print_no_internal_warning() {
    // `true` and `echo` are often done before the master registers them
    // with the pid killer: nothing to warn about. Many runs of many, since
    // it is a race.
    for run in 1..=5 {
        let mut herd = Herd::new(
            r#"
[[group]]
name = "truth"
command = "true"
[group.local]
instances = 20

[[group]]
name = "echo"
command = "echo"
args = ["hello"]
[group.local]
instances = 20
"#,
        );
        herd.start();
        herd.wait_for("all instances ended");
        assert_eq!(exit_code(&mut herd), Some(0), "run {run}: {:?}", herd.seen);
        assert_eq!(herd.lines_with("] hello").len(), 20, "run {run}");
        let warnings: Vec<&String> = herd
            .seen
            .iter()
            .filter(|line| line.contains("pid killer") || line.contains("WARN"))
            .collect();
        assert!(warnings.is_empty(), "run {run}: {warnings:#?}");
        herd.assert_no_leftovers();
    }
}

#[test]
fn python_prints_reach_the_log_before_the_stop() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no python3 in PATH");
        return;
    }
    // Python block-buffers stdout into a pipe and loses the buffer at
    // SIGTERM: PYTHONUNBUFFERED=1 by default makes each print a line of
    // the log at once; a group's env can set it back.
    let mut herd = Herd::new(
        r#"
[master]
stop_grace = "5s"

[[group]]
name = "py"
command = "python3"
args = ["-c", "import time; print('hello from python'); time.sleep(600)"]
[group.local]
instances = 1

[[group]]
name = "buffered"
command = "python3"
args = ["-c", "import sys, time; print('buffered hello'); print('buffered up', file=sys.stderr); time.sleep(600)"]
env = { PYTHONUNBUFFERED = "" }
[group.local]
instances = 1
"#,
    );
    // Whatever the tests' own environment says (pyenv's sets it).
    herd.env_remove("PYTHONUNBUFFERED");
    herd.start();
    herd.wait_for("[py] [localhost] [python3/1/1] hello from python");
    // Its stderr is line-buffered (Python >= 3.9): it runs, its print waits.
    herd.wait_for("[buffered] [localhost] [python3/2/1] buffered up");
    herd.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut herd), Some(0), "{:?}", herd.seen);
    assert!(
        herd.lines_with("buffered hello").is_empty(),
        "a buffered print was lost at SIGTERM, as the group asked: {:?}",
        herd.seen
    );
    herd.assert_no_leftovers();
}

/// The soft and hard "Max open files" of a process, from /proc.
fn open_files_limits(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().expect("soft").to_string(),
        fields.next().expect("hard").to_string(),
    )
}

#[test]
fn the_master_raises_its_open_files_limit_and_its_instances_keep_the_old_one() {
    let (_, hard) = open_files_limits(std::process::id() as i32);
    if hard.parse::<u64>().is_ok_and(|hard| hard <= 256) {
        eprintln!("skipped: the hard limit of open files is {hard}, nothing to raise to");
        return;
    }
    let mut herd = Herd::new(
        r#"
[[group]]
name = "fds"
command = "sh"
args = ["-c", "echo \"open files: $(ulimit -n)\"; exec sleep 600"]
[group.local]
instances = 1
"#,
    );
    // A login's usual soft limit is 1 024, with a higher hard one; less
    // here, so that the raise shows whatever this machine's limits are.
    herd.soft_open_files(200);
    herd.start();
    herd.wait_for("open files: 200");
    // The master itself may open as many as its hard limit allows: about 4
    // per remote host.
    assert_eq!(open_files_limits(herd.pid()), (hard.clone(), hard));
    herd.signal(libc::SIGTERM);
    herd.wait_exit();
    herd.assert_no_leftovers();
}

#[test]
fn a_run_past_its_time_limit_is_stopped_as_a_failure_and_restarted() {
    let mut herd = Herd::new(
        r#"
[[group]]
name = "hang"
command = "sh"
args = ["-c", "echo \"run $TASKHERD_ID\"; exec sleep 60"]
time_limit = "300ms"
restart = { policy = "on-failure", initial = "10ms", limit = 1, reset_after = "100ms" }
[group.local]
instances = 1
"#,
    );
    herd.start();
    // Stopped at its limit, restarted once (the policy sees a failure),
    // stopped again, then marked failed: a run that hung is never one
    // that lasted `reset_after` well, which would start the count again.
    herd.wait_for_count("ran longer than its time limit of 300ms: stopping it", 2);
    herd.wait_for("marked failed after 1 restart in a row");
    assert_eq!(exit_code(&mut herd), Some(1));
    assert_eq!(herd.lines_with("run 1").len(), 2, "{:?}", herd.seen);
    herd.assert_no_leftovers();
}
