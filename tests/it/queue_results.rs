//! Results of queue groups: the feeder's joblog (`[group.queue] joblog`)
//! and the exit code of `taskherd run` when jobs ended dead
//! (`fail_on_dead`), through the real binary with exec consumers and with
//! the `queue_worker` library consumer.

use crate::support::{queue_add, Herd};
use std::collections::BTreeMap;
use std::path::PathBuf;

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

    fn joblog(&self) -> PathBuf {
        self.dir.path().join("jobs.log")
    }

    /// Writes the job script (run with `sh`): exit 65 for job `"bad"`,
    /// 0 for the others.
    fn script(&self) -> PathBuf {
        let path = self.dir.path().join("job.sh");
        std::fs::write(
            &path,
            "read job\ncase \"$job\" in '\"bad\"') exit 65 ;; esac\necho \"did $job\"\n",
        )
        .expect("write script");
        path
    }

    /// `taskherd queue add` of each job (JSON texts).
    fn add(&self, jobs: &[&str]) {
        queue_add(&self.queue(), jobs);
    }

    /// A herd of one exec queue group on the script, with the joblog,
    /// `consumer` lines in `[group.consumer]` and `queue` lines in
    /// `[group.queue]`; it stops after `max_running_time`.
    fn herd(&self, consumer: &str, queue: &str) -> Herd {
        Herd::new(&format!(
            r#"
[master]
max_running_time = "4s"

[[group]]
name = "jobs"
command = "sh"
args = [{script:?}]
stop_grace = "3s"

[group.feeder]
file = {file:?}

[group.consumer]
run = "exec"
{consumer}

[group.queue]
retry_initial = "100ms"
progress_every = "200ms"
joblog = {joblog:?}
{queue}

[group.local]
instances = 2
concurrency = 2
"#,
            script = self.script().display().to_string(),
            file = self.queue().display().to_string(),
            joblog = self.joblog().display().to_string(),
        ))
    }
}

/// The joblog's lines, parsed.
fn joblog_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("joblog {}: {err}", path.display()));
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{line}: {err}")))
        .collect()
}

/// The last line of each job id.
fn last_by_id(lines: &[serde_json::Value]) -> BTreeMap<u64, serde_json::Value> {
    lines
        .iter()
        .map(|line| (line["id"].as_u64().expect("id"), line.clone()))
        .collect()
}

#[test]
fn exec_jobs_have_joblog_lines_and_a_dead_one_fails_the_run() {
    let setup = Setup::new();
    setup.add(&["1", r#""bad""#, "3"]);
    let mut herd = setup.herd("", "");
    herd.start();
    herd.wait_for("2 done, 1 failed, 0 retried, 1 dead");
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(1), "seen:\n{}", herd.seen.join("\n"));
    let said = herd.wait_for("1 job of group jobs ended dead");
    assert!(
        said.contains(&format!("(see the joblog {})", setup.joblog().display())),
        "{said}"
    );
    herd.assert_no_leftovers();

    let lines = joblog_lines(&setup.joblog());
    assert_eq!(lines.len(), 3, "one line per attempt: {lines:?}");
    let by_id = last_by_id(&lines);
    for (id, outcome, exit) in [(1, "done", 0), (2, "dead", 65), (3, "done", 0)] {
        let line = &by_id[&id];
        assert_eq!(line["outcome"], outcome, "{line}");
        assert_eq!(line["exit"], exit, "{line}");
        assert_eq!(line["attempt"], 1, "{line}");
        assert_eq!(line["host"], "localhost", "{line}");
        // Instance 1 is the feeder; the consumers are 2 and 3.
        let instance = line["instance"].as_u64().expect("instance");
        assert!((2..=3).contains(&instance), "{line}");
        assert!(line["start_ms"].as_u64().expect("start_ms") > 1_600_000_000_000);
        assert!(line["duration_ms"].as_u64().expect("duration_ms") < 10_000);
        assert!(line["signal"].is_null(), "{line}");
    }
    assert!(by_id[&1]["reason"].is_null());
    let reason = by_id[&2]["reason"].as_str().expect("reason");
    assert!(reason.ends_with("job.sh: exit status 65"), "{reason}");
}

#[test]
fn fail_on_dead_false_keeps_exit_0_and_retries_are_logged() {
    let setup = Setup::new();
    setup.add(&[r#""bad""#, "2"]);
    // 65 is a retry here: two attempts, then dead.
    let mut herd = setup.herd(
        "retry_codes = [65]",
        "fail_on_dead = false\nmax_attempts = 2",
    );
    herd.start();
    herd.wait_for("1 done, 2 failed, 1 retried, 1 dead");
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(0), "seen:\n{}", herd.seen.join("\n"));
    herd.wait_for("1 job of group jobs ended dead");
    herd.assert_no_leftovers();

    let lines = joblog_lines(&setup.joblog());
    let bad: Vec<_> = lines.iter().filter(|line| line["id"] == 1).collect();
    assert_eq!(bad.len(), 2, "{lines:?}");
    assert_eq!(
        (bad[0]["outcome"].as_str(), bad[0]["attempt"].as_u64()),
        (Some("retry"), Some(1)),
        "{lines:?}"
    );
    assert_eq!(
        (bad[1]["outcome"].as_str(), bad[1]["attempt"].as_u64()),
        (Some("dead"), Some(2)),
        "{lines:?}"
    );
    for line in bad {
        assert_eq!(line["exit"], 65, "{line}");
        let reason = line["reason"].as_str().expect("reason");
        assert!(reason.ends_with("job.sh: exit status 65"), "{reason}");
    }
    let good = last_by_id(&lines)[&2].clone();
    assert_eq!(
        (good["outcome"].as_str(), good["exit"].as_i64()),
        (Some("done"), Some(0))
    );
}

#[test]
fn library_consumers_get_joblog_lines_and_dead_jobs_fail_the_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let joblog = dir.path().join("results.log");
    let worker = crate::support::worker_bin()
        .with_file_name("queue_worker")
        .display()
        .to_string();
    // The feeder serves jobs 1..=4, then says it is done: the run ends by
    // itself once every job has its outcome.
    let mut herd = Herd::new(&format!(
        r#"
[[group]]
name = "jobs"
command = "{worker}"
params = {{ jobs = 4, always_fail = 3 }}

[group.feeder]
bind = "127.0.0.1:0"

[group.queue]
max_attempts = 2
retry_initial = "10ms"
progress_every = "1s"
joblog = {joblog:?}

[group.local]
instances = 1
concurrency = 2
"#,
        joblog = joblog.display().to_string(),
    ));
    herd.start();
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(1), "seen:\n{}", herd.seen.join("\n"));
    herd.wait_for("1 job of group jobs ended dead (see the joblog");
    herd.assert_no_leftovers();

    assert!(joblog.exists(), "seen:\n{}", herd.seen.join("\n"));
    let lines = joblog_lines(&joblog);
    let by_id = last_by_id(&lines);
    assert_eq!(by_id.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    for (id, line) in &by_id {
        let outcome = if *id == 3 { "dead" } else { "done" };
        assert_eq!(line["outcome"], outcome, "{line}");
        assert_eq!(line["host"], "localhost", "{line}");
        assert_eq!(line["instance"], 2, "{line}");
        assert!(line["exit"].is_null(), "no process of its own: {line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
    }
    let tries: Vec<_> = lines.iter().filter(|line| line["id"] == 3).collect();
    assert_eq!(tries.len(), 2, "{lines:?}");
    assert_eq!(tries[0]["outcome"], "retry");
}
