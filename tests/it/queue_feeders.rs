//! The built-in JSON-lines and command feeders (`[group.feeder] jsonl`,
//! `command`) through the real binary, with exec consumers running a
//! shell command per job: a JSONL feeder SIGKILLed mid-way and restarted
//! serves every line, a command feeder's herd ends by itself once the
//! command's jobs are done, and the config errors of `[group.feeder]`.

use crate::support::{check, taskherd_bin, Herd};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The consumer of every test: appends the job's JSON to `done` (one
/// short write: O_APPEND keeps concurrent lines whole).
fn consumer_script(dir: &Path, done: &Path, work: &str) -> String {
    let script = dir.join("job.sh");
    std::fs::write(
        &script,
        format!(
            "read job\nsleep {work}\nprintf '%s\\n' \"$job\" >> {:?}\n",
            done.display().to_string()
        ),
    )
    .expect("write the job script");
    script.display().to_string()
}

/// How many times each job (its JSON text) was done.
fn done_counts(done: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(done).unwrap_or_default().lines() {
        *counts.entry(line.to_string()).or_insert(0) += 1;
    }
    counts
}

/// Waits (bounded) until `n` jobs were done.
fn wait_done(done: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done_counts(done).len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} jobs done",
            done_counts(done).len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of the herd's feeder (instance 1 of its group).
fn feeder_pid(herd: &Herd) -> Option<i32> {
    herd.marked_processes().into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/environ"))
            .map(|env| env.split(|&b| b == 0).any(|v| v == b"TASKHERD_GROUP_ID=1"))
            .unwrap_or(false)
    })
}

#[test]
fn a_jsonl_feeder_killed_and_restarted_serves_every_line_and_finishes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jobs = dir.path().join("jobs.jsonl");
    let done = dir.path().join("done.log");
    let total = 400;
    let lines: String = (1..=total).map(|n| format!("{{\"n\": {n}}}\n")).collect();
    std::fs::write(&jobs, lines).expect("write jobs");
    let script = consumer_script(dir.path(), &done, "0.01");
    let mut herd = Herd::new(&format!(
        r#"
[[group]]
name = "lines"
command = "sh"
args = ["{script}"]
restart = {{ initial = "100ms", max = "500ms", limit = "unlimited" }}

[group.feeder]
jsonl = "{jobs}"

[group.consumer]
run = "exec"

[group.queue]
progress_every = "1s"

[group.local]
instances = 2
concurrency = 2
"#,
        jobs = jobs.display(),
    ));
    herd.start();
    herd.wait_for("[lines] [localhost] [jsonl-feeder/1/1] feeder listening on");
    wait_done(&done, 60);
    let pid = feeder_pid(&herd).expect("the feeder runs");
    // SAFETY: plain kill(2) on a process of this herd.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    herd.wait_for_count("feeder listening on", 2);
    // The whole file done: the herd ends by itself.
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", herd.seen.join("\n"));
    herd.assert_no_leftovers();
    herd.wait_for("feeder has no more jobs");

    let counts = done_counts(&done);
    let expected: Vec<String> = (1..=total).map(|n| format!("{{\"n\":{n}}}")).collect();
    assert_eq!(
        counts
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        expected.into_iter().collect(),
        "every line done"
    );
    // Only jobs out when the feeder died (at most the consumers' credits)
    // can run twice; none whose outcome was confirmed.
    let twice = counts.values().filter(|&&c| c > 1).count();
    assert!(twice <= 8, "{twice} jobs done twice: {counts:?}");
    assert!(counts.values().all(|&c| c <= 2), "{counts:?}");
    // `queue list` works on its journal: nothing pending, nothing dead.
    let state = dir.path().join("jobs.jsonl.state");
    let out = Command::new(taskherd_bin())
        .args(["queue", "list", "--json"])
        .arg(&state)
        .output()
        .expect("queue list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["pending"], 0, "{report}");
    assert_eq!(report["dead"].as_array().map(Vec::len), Some(0), "{report}");
}

#[test]
fn a_command_feeders_jobs_are_done_and_the_herd_ends_by_itself() {
    let dir = tempfile::tempdir().expect("temp dir");
    let done = dir.path().join("done.log");
    let script = consumer_script(dir.path(), &done, "0");
    let mut herd = Herd::new(&format!(
        r#"
[[group]]
name = "numbers"
command = "sh"
args = ["{script}"]

[group.feeder]
command = "sh"
args = ["-c", "seq 1 500; echo 'seq done' >&2"]

[group.consumer]
run = "exec"

[group.local]
instances = 2
concurrency = 4
"#,
    ));
    herd.start();
    herd.wait_for("[numbers] [localhost] [command-feeder/1/1] feeder listening on");
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", herd.seen.join("\n"));
    herd.assert_no_leftovers();
    // The command's stderr is a log line of the feeder instance.
    herd.wait_for("[command-feeder/1/1] seq done");
    herd.wait_for("the feeder's command ended");
    let counts = done_counts(&done);
    assert_eq!(counts.len(), 500, "{counts:?}");
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
    let numbers: std::collections::BTreeSet<u64> = counts
        .keys()
        .map(|n| n.parse().expect("a number"))
        .collect();
    assert_eq!(numbers, (1..=500).collect());
}

/// `taskherd queue ARGS...`: (success, stdout and stderr).
fn queue_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(taskherd_bin())
        .arg("queue")
        .args(args)
        .output()
        .expect("taskherd queue");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_queue_commands_on_a_jsonl_feeder_s_queue() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jsonl = dir.path().join("jobs.jsonl");
    let state = dir.path().join("jobs.jsonl.state");
    let done = dir.path().join("done.log");
    let fixed = dir.path().join("fixed");
    std::fs::write(&jsonl, "\"a\"\n\"bad\"\n\"c\"\n").expect("write jobs");
    // "bad" is dead (exit 65) until the file `fixed` exists.
    let script = dir.path().join("job.sh");
    std::fs::write(
        &script,
        format!(
            "read job\nif [ \"$job\" = '\"bad\"' ] && [ ! -e {fixed:?} ]; then exit 65; fi\n\
             printf '%s\\n' \"$job\" >> {done:?}\n",
            fixed = fixed.display().to_string(),
            done = done.display().to_string()
        ),
    )
    .expect("write the job script");
    let config = format!(
        r#"
[[group]]
name = "lines"
command = "sh"
args = [{script:?}]

[group.feeder]
jsonl = {jsonl:?}

[group.consumer]
run = "exec"

[group.local]
instances = 1
concurrency = 2
"#,
        script = script.display().to_string(),
        jsonl = jsonl.display().to_string(),
    );
    let mut herd = Herd::new(&config);
    herd.start();
    let status = herd.wait_exit();
    assert_eq!(
        status.code(),
        Some(1),
        "a dead line fails the run: {}",
        herd.seen.join("\n")
    );
    herd.assert_no_leftovers();
    let jsonl_arg = jsonl.display().to_string();
    let state_arg = state.display().to_string();
    // Jobs go into the file, not into its state: refused, said why.
    for target in [&jsonl_arg, &state_arg] {
        let (ok, text) = queue_cli(&["add", target, "\"x\""]);
        assert!(!ok, "queue add {target} worked: {text}");
        assert!(text.contains("append the jobs to that file"), "{text}");
    }
    assert!(!dir.path().join("jobs.jsonl.state.inbox").exists());
    // The file or its state: the same queue.
    for target in [&jsonl_arg, &state_arg] {
        let (ok, text) = queue_cli(&["list", target]);
        assert!(ok, "{text}");
        assert!(text.contains("0 pending, 0 in the inbox, 1 dead"), "{text}");
        assert!(text.contains("\"bad\""), "{text}");
    }
    std::fs::write(&fixed, "").expect("fix");
    let (ok, text) = queue_cli(&["requeue-dead", &jsonl_arg]);
    assert!(ok && text.contains("1 job put back"), "{text}");
    let (ok, text) = queue_cli(&["compact", &state_arg]);
    assert!(ok && text.contains("1 pending, 0 dead"), "{text}");
    // The next run serves the line put back, and no other line again.
    let mut herd = Herd::new(&config);
    herd.start();
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", herd.seen.join("\n"));
    herd.assert_no_leftovers();
    let counts = done_counts(&done);
    let expected: BTreeMap<String, usize> = [("\"a\"", 1), ("\"bad\"", 1), ("\"c\"", 1)]
        .into_iter()
        .map(|(job, n)| (job.to_string(), n))
        .collect();
    assert_eq!(counts, expected);
}

#[test]
fn feeder_source_config_errors() {
    let (code, text, path, _dir) = check(
        r#"[[group]]
name = "a"
command = "/bin/true"
[group.feeder]
file = "jobs.queue"
jsonl = "jobs.jsonl"
[group.local]
instances = 1

[[group]]
name = "b"
command = "/bin/true"
[group.feeder]
jsonl = "jobs.jsonl"
args = ["-n"]
[group.local]
instances = 1

[[group]]
name = "c"
command = "/bin/true"
[group.feeder]
[group.consumer]
run = "exec"
[group.local]
instances = 1
"#,
    );
    assert_eq!(code, Some(2), "{text}");
    let file = path.display().to_string();
    let expect = [
        (
            format!("{file}:6:"),
            "group[1].feeder.jsonl",
            "a feeder has one source: file or jsonl, not both",
        ),
        (
            format!("{file}:15:"),
            "group[2].feeder.args",
            "args are the arguments of the feeder's command",
        ),
        (
            format!("{file}:24:"),
            "group[3].consumer.run",
            "exec consumers need a built-in feeder",
        ),
    ];
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), expect.len(), "{text}");
    for (line, (at, key, part)) in errors.iter().zip(&expect) {
        assert!(
            line.contains(at.as_str()) && line.contains(key) && line.contains(part),
            "{line}\nexpected {at} {key} {part}"
        );
    }
}
