//! Exec consumers (`[group.consumer] run = "exec"`): the real binary runs
//! a shell script or `python3` once per job from the built-in file feeder;
//! outcomes from exit statuses, output tagged with the job id, jobs past
//! their lease killed with their whole process group.

use crate::support::{queue_add, queue_list, taskherd_bin, Herd, WAIT};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// A temp dir with the job script and the queue file.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn queue(&self) -> PathBuf {
        self.dir.path().join("jobs.queue")
    }

    /// Writes a job script (run with `sh`).
    fn script(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("job.sh");
        std::fs::write(&path, text).expect("write script");
        path
    }

    /// `taskherd queue add` of each job (JSON texts).
    fn add(&self, jobs: &[&str]) {
        queue_add(&self.queue(), jobs);
    }

    /// `taskherd queue list --json`.
    fn list(&self) -> serde_json::Value {
        queue_list(&self.queue())
    }

    /// A herd with one exec queue group: `command` and `args` (a TOML
    /// array), two consumers of `concurrency` 2, and `queue` lines in
    /// `[group.queue]`.
    fn herd(&self, command: &str, args: &str, queue: &str) -> Herd {
        self.herd_with(command, args, "", queue)
    }

    /// [`herd`](Self::herd) with extra `[group.consumer]` lines.
    fn herd_with(&self, command: &str, args: &str, consumer: &str, queue: &str) -> Herd {
        Herd::new(&format!(
            r#"
[[group]]
name = "jobs"
command = "{command}"
args = {args}
stop_grace = "3s"

[group.feeder]
file = "{file}"

[group.consumer]
run = "exec"
{consumer}

[group.queue]
retry_initial = "100ms"
retry_max = "200ms"
progress_every = "200ms"
{queue}

[group.local]
instances = 2
concurrency = 2
"#,
            file = self.queue().display(),
        ))
    }
}

/// Stops the herd cleanly and checks that nothing it started is left.
fn stop(herd: &mut Herd) {
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit();
    assert!(
        status.success(),
        "{status}; seen:\n{}",
        herd.seen.join("\n")
    );
    herd.assert_no_leftovers();
}

/// Stops a herd in which jobs ended dead: `taskherd run` exits 1 and
/// says so; nothing it started is left.
fn stop_with_dead(herd: &mut Herd) {
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(1), "seen:\n{}", herd.seen.join("\n"));
    herd.wait_for("of group jobs ended dead (see taskherd queue list");
    herd.assert_no_leftovers();
}

/// The number after `key=` in `line`.
fn number_after(line: &str, key: &str) -> u128 {
    let at = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number after {key} in {line}"))
}

#[test]
fn a_shell_command_does_jobs_with_its_output_tagged() {
    let setup = Setup::new();
    let script = setup.script(
        r#"read job
echo "got $job id=$TASKHERD_JOB_ID attempt=$TASKHERD_JOB_ATTEMPT deadline=$TASKHERD_JOB_DEADLINE instance=$TASKHERD_GROUP/$TASKHERD_ID"
echo "complaint about $job" >&2
printf 'no newline %s' "$job"
"#,
    );
    setup.add(&["1", "2", r#"{"n":3}"#, r#""four""#]);
    let mut herd = setup.herd("sh", &format!("[{:?}]", script.display().to_string()), "");
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    herd.start();
    herd.wait_for_count("no newline", 4);
    herd.wait_for_count("complaint about", 4);
    for (id, payload) in [(1, "1"), (2, "2"), (3, r#"{"n":3}"#), (4, r#""four""#)] {
        let got = herd.wait_for(&format!("job {id}: got {payload} id={id} attempt=1 "));
        assert!(got.contains("instance=jobs/"), "{got}");
        let deadline = number_after(&got, "deadline=");
        // The default lease is 30 s.
        assert!(
            (started + 20_000..started + 40_000).contains(&deadline),
            "{deadline} vs {started}: {got}"
        );
        herd.wait_for(&format!("job {id}: complaint about {payload}"));
        herd.wait_for(&format!("job {id}: no newline {payload}"));
    }
    herd.wait_for("4 done, 0 failed");
    stop(&mut herd);
    let list = setup.list();
    assert_eq!(list["pending"], 0, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn a_python_command_does_jobs() {
    let setup = Setup::new();
    setup.add(&["3", "4", "5"]);
    let program = "import json, os, sys\n\
                   n = json.load(sys.stdin)\n\
                   print('square of', n, 'is', n * n, 'job', os.environ['TASKHERD_JOB_ID'])\n";
    let mut herd = setup.herd("python3", &format!("[\"-c\", {program:?}]"), "");
    herd.start();
    for (id, n) in [(1, 3), (2, 4), (3, 5)] {
        herd.wait_for(&format!("job {id}: square of {n} is {} job {id}", n * n));
    }
    herd.wait_for("3 done, 0 failed");
    stop(&mut herd);
}

#[test]
fn exit_75_is_retried_and_65_is_dead() {
    let setup = Setup::new();
    let script = setup.script(
        r#"read job
case "$job" in
  '"flaky"') [ "$TASKHERD_JOB_ATTEMPT" -ge 2 ] || exit 75 ;;
  '"bad"') echo "cannot use $job" >&2; exit 65 ;;
esac
echo "done $job attempt $TASKHERD_JOB_ATTEMPT"
"#,
    );
    setup.add(&[r#""flaky""#, r#""bad""#, r#""fine""#]);
    let mut herd = setup.herd(
        "sh",
        &format!("[{:?}]", script.display().to_string()),
        "max_attempts = 3",
    );
    herd.start();
    herd.wait_for(r#"job 1: done "flaky" attempt 2"#);
    herd.wait_for(r#"job 3: done "fine" attempt 1"#);
    herd.wait_for("job 1: exit status 75: retry");
    let dead = herd.wait_for("job dead");
    assert!(dead.contains("exit status 65"), "{dead}");
    herd.wait_for("2 done, 2 failed, 1 retried, 1 dead");
    stop_with_dead(&mut herd);
    let list = setup.list();
    let dead = list["dead"].as_array().expect("dead");
    assert_eq!(dead.len(), 1, "{list}");
    assert_eq!(dead[0]["job"], "bad", "{list}");
    assert_eq!(dead[0]["attempts"], 1, "dead at once: {list}");
    let reason = dead[0]["reason"].as_str().expect("reason");
    assert!(
        reason.ends_with("job.sh: exit status 65") && reason.starts_with("sh "),
        "{reason}"
    );
    assert_eq!(list["pending"], 0, "{list}");
}

#[test]
fn a_command_that_cannot_run_is_dead_and_said_once_per_consumer() {
    let setup = Setup::new();
    setup.add(&["1", "2", "3", "4", "5", "6"]);
    // `sh` runs; the command it runs is missing: exit status 127.
    let mut herd = setup.herd("sh", r#"["-c", "no-such-command-anywhere"]"#, "");
    herd.start();
    herd.wait_for_count("job dead", 6);
    let said = herd.wait_for("cannot run (exit status 127: not found)");
    assert!(said.contains("check the group's command"), "{said}");
    assert!(said.contains("error"), "said loudly: {said}");
    stop_with_dead(&mut herd);
    let said = herd.lines_with("cannot run (exit status 127");
    // Once per consumer (two consumers), not once per job.
    assert!(
        (1..=2).contains(&said.len()),
        "said {} times: {said:#?}",
        said.len()
    );
    let list = setup.list();
    let dead = list["dead"].as_array().expect("dead");
    assert_eq!(dead.len(), 6, "{list}");
    for job in dead {
        let reason = job["reason"].as_str().expect("reason");
        assert!(reason.contains("exit status 127: not found"), "{reason}");
        assert_eq!(job["attempts"], 1, "never retried: {list}");
    }
}

#[test]
fn a_missing_program_is_dead_and_said_once_per_consumer() {
    let setup = Setup::new();
    setup.add(&["1", "2", "3"]);
    let missing = setup.dir.path().join("no-such-program");
    let mut herd = setup.herd(&missing.display().to_string(), "[]", "");
    herd.start();
    herd.wait_for_count("job dead", 3);
    let said = herd.wait_for("cannot run (exit 127: not found): check the group's command");
    assert!(said.contains("no-such-program"), "{said}");
    stop_with_dead(&mut herd);
    let said = herd.lines_with("cannot run (exit 127: not found)");
    assert!((1..=2).contains(&said.len()), "{said:#?}");
    let list = setup.list();
    let dead = list["dead"].as_array().expect("dead");
    assert_eq!(dead.len(), 3, "{list}");
    for job in dead {
        let reason = job["reason"].as_str().expect("reason");
        assert!(
            reason.ends_with("no-such-program: cannot run: exit 127: not found"),
            "{reason}"
        );
    }
}

/// Pids of live processes of the herd whose command line holds `needle`.
fn marked_with(herd: &Herd, needle: &str) -> Vec<i32> {
    herd.marked_processes()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
                .is_ok_and(|cmdline| cmdline.contains(needle))
        })
        .collect()
}

/// Waits (bounded) until `check` holds.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_job_past_its_lease_is_killed_with_its_children() {
    let setup = Setup::new();
    // A background grandchild, then a foreground one, both far longer
    // than the lease; the job ignores SIGTERM, so SIGKILL ends it.
    let script = setup.script(
        r#"trap '' TERM
read job
sleep 3001 &
echo "started $job attempt $TASKHERD_JOB_ATTEMPT"
sleep 3002
echo "never"
"#,
    );
    setup.add(&[r#""slow""#]);
    let mut herd = setup.herd(
        "sh",
        &format!("[{:?}]", script.display().to_string()),
        "lease = \"1s\"\nmax_attempts = 2",
    );
    herd.start();
    herd.wait_for(r#"job 1: started "slow" attempt 1"#);
    wait_until("the job's processes run", || {
        marked_with(&herd, "sleep 300").len() == 2
    });
    herd.wait_for("job 1: killed past its lease: retry");
    herd.wait_for(r#"job 1: started "slow" attempt 2"#);
    let dead = herd.wait_for("job dead");
    // The feeder's reason: too many attempts.
    assert!(dead.contains("id=1"), "{dead}");
    // Every process of the job is gone, the herd still running.
    let mut left = Vec::new();
    wait_until("the job's processes are gone", || {
        left = marked_with(&herd, "sleep 300");
        left.is_empty()
    });
    assert!(herd.lines_with("never").is_empty());
    stop_with_dead(&mut herd);
    let list = setup.list();
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(1), "{list}");
}

#[test]
fn a_stopped_consumer_kills_its_running_job() {
    let setup = Setup::new();
    let script = setup.script(
        r#"read job
sleep 3003 &
echo "started $job"
sleep 3004
"#,
    );
    setup.add(&["1"]);
    let mut herd = setup.herd("sh", &format!("[{:?}]", script.display().to_string()), "");
    herd.start();
    herd.wait_for("job 1: started 1");
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit();
    assert!(
        status.success(),
        "{status}; seen:\n{}",
        herd.seen.join("\n")
    );
    herd.assert_no_leftovers();
    assert!(
        !herd
            .lines_with("job 1: killed when the consumer stopped: retry")
            .is_empty(),
        "seen:\n{}",
        herd.seen.join("\n")
    );
    // The job is not lost: it waits for the next run.
    let list = setup.list();
    assert_eq!(list["pending"], 1, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_killed_consumer_takes_its_running_job_with_it() {
    let setup = Setup::new();
    let script = setup.script(
        r#"read job
echo "started $job attempt $TASKHERD_JOB_ATTEMPT"
exec sleep 3005
"#,
    );
    setup.add(&["1"]);
    let mut herd = setup.herd("sh", &format!("[{:?}]", script.display().to_string()), "");
    herd.start();
    herd.wait_for("job 1: started 1 attempt 1");
    let mut jobs = Vec::new();
    wait_until("the job runs", || {
        jobs = marked_with(&herd, "sleep 3005");
        jobs.len() == 1
    });
    let job = jobs[0];
    let consumer = parent_of(job).expect("the job's parent");
    assert!(
        marked_with(&herd, "exec-consumer").contains(&consumer),
        "the job's parent {consumer} is not a consumer"
    );
    // SAFETY: kill(2) of a process of this test's herd.
    assert_eq!(unsafe { libc::kill(consumer, libc::SIGKILL) }, 0);
    // The job dies with its consumer (its parent-death signal) ...
    wait_until("the job is gone", || {
        !marked_with(&herd, "sleep 3005").contains(&job)
    });
    // ... and is done again by the consumer the master starts anew.
    herd.wait_for("job 1: started 1 attempt 2");
    stop(&mut herd);
}

#[test]
fn exec_consumer_outside_a_herd_says_why_and_is_hidden() {
    let out = Command::new(taskherd_bin())
        .args(["exec-consumer", "--retry-codes", "3", "--", "true"])
        .env_remove("TASKHERD_CONTROL_FD")
        .output()
        .expect("taskherd exec-consumer");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("taskherd exec-consumer: "), "{stderr}");

    let out = Command::new(taskherd_bin())
        .args(["exec-consumer", "--done-codes", "3", "--dead-codes", "4,3"])
        .args(["--", "true"])
        .output()
        .expect("taskherd exec-consumer");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exit status 3 is given two outcomes: done and dead"),
        "{stderr}"
    );

    let help = Command::new(taskherd_bin())
        .arg("--help")
        .output()
        .expect("taskherd --help");
    assert!(!String::from_utf8_lossy(&help.stdout).contains("exec-consumer"));
}

#[test]
fn exit_statuses_can_be_mapped_otherwise() {
    let setup = Setup::new();
    // 65 is dead by default, 1 a retry: the config swaps them.
    let script = setup.script(
        r#"read job
case "$job" in
  '"again"') [ "$TASKHERD_JOB_ATTEMPT" -ge 2 ] || exit 65 ;;
  '"never"') exit 1 ;;
esac
echo "done $job attempt $TASKHERD_JOB_ATTEMPT"
"#,
    );
    setup.add(&[r#""again""#, r#""never""#]);
    let mut herd = setup.herd_with(
        "sh",
        &format!("[{:?}]", script.display().to_string()),
        "retry_codes = [65]\ndead_codes = [1]",
        "max_attempts = 3",
    );
    herd.start();
    herd.wait_for(r#"job 1: done "again" attempt 2"#);
    let dead = herd.wait_for("job dead");
    assert!(dead.contains("exit status 1"), "{dead}");
    stop_with_dead(&mut herd);
    let list = setup.list();
    let dead = list["dead"].as_array().expect("dead");
    assert_eq!(dead.len(), 1, "{list}");
    assert_eq!(
        (dead[0]["job"].as_str(), dead[0]["attempts"].as_u64()),
        (Some("never"), Some(1))
    );
}

/// Runs `total` jobs (the numbers 1 to `total`) through `command` with
/// `args`, two consumers of concurrency 2, and checks that every job was
/// done exactly once: from the command's own lines (`did <job>
/// attempt=<n>`) and from the file it appends `<job>` to (`done` in the
/// setup's dir).
fn every_job_done_exactly_once(setup: &Setup, command: &str, args: &str, total: usize) {
    let jobs: Vec<String> = (1..=total).map(|n| n.to_string()).collect();
    setup.add(&jobs.iter().map(String::as_str).collect::<Vec<_>>());
    let mut herd = setup.herd(command, args, "");
    herd.start();
    // A process per job, slow on a busy machine.
    crate::queue_coprocess::wait_for_each(&mut herd, ": did ", total);
    herd.wait_for(&format!(
        "queue: {total} done, 0 failed, 0 retried, 0 dead, 0 in flight, 0 pending"
    ));
    stop(&mut herd);
    // `job <id>: did <job> attempt=1`: the job id is the job's number.
    let did: Vec<String> = herd
        .lines_with(": did ")
        .iter()
        .map(|line| {
            let (_, rest) = line.split_once("] job ").expect("a job's line");
            let (id, rest) = rest.split_once(": did ").expect("a job's line");
            assert_eq!(rest, format!("{id} attempt=1"), "{line}");
            id.to_string()
        })
        .collect();
    crate::queue_coprocess::assert_each_once("log", &did, &jobs);
    let done: Vec<String> = std::fs::read_to_string(setup.dir.path().join("done"))
        .expect("done file")
        .lines()
        .map(str::to_string)
        .collect();
    crate::queue_coprocess::assert_each_once("done file", &done, &jobs);
    let list = setup.list();
    assert_eq!(list["pending"], 0, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn a_shell_command_does_every_job_exactly_once() {
    let setup = Setup::new();
    let done = setup.dir.path().join("done");
    let script = setup.script(&format!(
        "read job\necho \"$job\" >> {done:?}\necho \"did $job attempt=$TASKHERD_JOB_ATTEMPT\"\n",
        done = done.display().to_string()
    ));
    every_job_done_exactly_once(
        &setup,
        "sh",
        &format!("[{:?}]", script.display().to_string()),
        200,
    );
}

#[test]
fn a_python_command_does_every_job_exactly_once() {
    let setup = Setup::new();
    let done = setup.dir.path().join("done").display().to_string();
    let program = format!(
        "import json, os, sys\n\
         n = json.load(sys.stdin)\n\
         fd = os.open({done:?}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n\
         os.write(fd, ('%d\\n' % n).encode())\n\
         print('did', n, 'attempt=' + os.environ['TASKHERD_JOB_ATTEMPT'])\n"
    );
    every_job_done_exactly_once(&setup, "python3", &format!("[\"-c\", {program:?}]"), 100);
}

#[test]
fn exec_consumers_run_on_a_remote_host_too() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let setup = Setup::new();
    let script = setup.script("read job\necho \"done $job on $TASKHERD_HOST\"\n");
    let jobs: Vec<String> = (1..=40).map(|n| n.to_string()).collect();
    let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    setup.add(&jobs);
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"

[ssh]
ssh_config = "{config}"

[[group]]
name = "jobs"
command = "sh"
args = [{script:?}]

[group.feeder]
file = "{file}"

[group.consumer]
run = "exec"

[[group.remote]]
hosts = ["{host}"]
instances = 2
concurrency = 2
"#,
        agent = taskherd_bin().display(),
        config = world.ssh_config().display(),
        script = script.display().to_string(),
        file = setup.queue().display(),
        host = host.alias(),
    ));
    herd.start();
    let remote = format!("[jobs] [{}] [", host.alias());
    let deadline = Instant::now() + WAIT;
    while herd
        .seen
        .iter()
        .filter(|line| line.starts_with(&remote) || line.contains(&remote))
        .filter(|line| line.contains(": done "))
        .count()
        < 40
    {
        assert!(Instant::now() < deadline, "not every job done remotely");
        herd.wait_for_count(": done ", herd.lines_with(": done ").len() + 1);
    }
    stop(&mut herd);
    crate::remote::assert_host_clean(&host);
    // Each job exactly once, on the host: `job <id>: done <job> on <host>`.
    let on_host = format!(" on {}", host.alias());
    let done: Vec<String> = herd
        .lines_with(": done ")
        .iter()
        .filter(|line| line.contains(&remote))
        .map(|line| {
            let (_, rest) = line.split_once(": done ").expect("a done line");
            rest.strip_suffix(&on_host)
                .unwrap_or_else(|| panic!("done on the host: {line}"))
                .to_string()
        })
        .collect();
    let expected: Vec<String> = jobs.iter().map(|job| job.to_string()).collect();
    crate::queue_coprocess::assert_each_once("remote jobs", &done, &expected);
    let list = setup.list();
    assert_eq!(
        (
            list["pending"].as_u64(),
            list["dead"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0)),
        "{list}"
    );
}

#[test]
fn the_exec_examples_run_as_documented() {
    // examples/exec.toml (shell) and examples/exec-python.toml, copied
    // with their scripts so that their queues are not written in the repo.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for (config, queue) in [
        ("exec.toml", "exec/jobs.queue"),
        ("exec-python.toml", "exec/py-jobs.queue"),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("exec")).expect("mkdir");
        for script in ["thumbnail.sh", "thumbnail.py"] {
            let to = dir.path().join("exec").join(script);
            std::fs::copy(examples.join("exec").join(script), &to).expect("copy script");
        }
        let text = std::fs::read_to_string(examples.join(config)).expect("read example");
        let queue = dir.path().join(queue);
        let out = Command::new(taskherd_bin())
            .args(["queue", "add"])
            .arg(&queue)
            .args([
                r#"{"image": "a.png"}"#,
                r#"{"image": "busy"}"#,
                r#"{"image": "fail"}"#,
            ])
            .output()
            .expect("queue add");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut herd = Herd::new(&text);
        // The config's paths are relative to its own file: run it there.
        let path = dir.path().join(config);
        std::fs::write(&path, &text).expect("config");
        herd.config = path;
        herd.start();
        herd.wait_for("handled");
        herd.wait_for("busy");
        herd.wait_for("job dead");
        let deadline = Instant::now() + WAIT;
        while herd.lines_with("handled").len() < 2 {
            assert!(Instant::now() < deadline, "{config:?}: two jobs handled");
            herd.wait_for_count("handled", herd.lines_with("handled").len() + 1);
        }
        // The "fail" job ended dead: the run says so and exits 1.
        herd.signal(libc::SIGTERM);
        assert_eq!(herd.wait_exit().code(), Some(1), "{}", herd.seen.join("\n"));
        herd.wait_for("of group thumbs ended dead");
        herd.assert_no_leftovers();
        let out = Command::new(taskherd_bin())
            .args(["queue", "list", "--json"])
            .arg(&queue)
            .output()
            .expect("queue list");
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(list["pending"], 0, "{config:?}: {list}");
        let dead = list["dead"].as_array().expect("dead");
        assert_eq!(dead.len(), 1, "{config:?}: {list}");
        assert_eq!(dead[0]["job"]["image"], "fail", "{list}");
    }
}
