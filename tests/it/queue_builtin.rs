//! Queue groups without a feeder program: `[group.feeder] file` runs
//! taskherd's built-in durable file feeder (`taskherd builtin-feeder`),
//! locally and on a remote host, with `queue_worker` as library
//! consumers; and the config errors of `[group.feeder] file` and
//! `[group.consumer] run`.

use crate::support::{check, queue_add, queue_on, taskherd_bin, Herd};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

fn queue_worker() -> String {
    crate::support::worker_bin()
        .with_file_name("queue_worker")
        .display()
        .to_string()
}

/// Adds the jobs `numbers` to the queue at `file`.
fn add(file: &Path, numbers: std::ops::RangeInclusive<u64>) {
    let numbers: Vec<String> = numbers.map(|n| n.to_string()).collect();
    let numbers: Vec<&str> = numbers.iter().map(String::as_str).collect();
    queue_add(file, &numbers);
}

/// How many times each job was reported done.
fn done_counts(herd: &Herd) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for line in &herd.seen {
        if let Some(n) = line
            .rsplit_once("] done ")
            .and_then(|(_, n)| n.trim().parse::<u64>().ok())
        {
            *counts.entry(n).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits (bounded) until `n` distinct jobs were reported done.
fn wait_done(herd: &mut Herd, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while done_counts(herd).len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} jobs done; last lines:\n{}",
            done_counts(herd).len(),
            herd.seen
                .iter()
                .rev()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        herd.wait_for_count("] done ", herd.lines_with("] done ").len() + 1);
    }
}

/// `queue list --json`: (pending, in the inbox, dead).
fn counts(file: &Path) -> (u64, u64, usize) {
    let report: serde_json::Value =
        serde_json::from_str(&queue_on(&["list", "--json"], file)).expect("JSON");
    (
        report["pending"].as_u64().expect("pending"),
        report["inbox"].as_u64().expect("inbox"),
        report["dead"].as_array().expect("dead").len(),
    )
}

#[test]
fn a_built_in_file_feeder_serves_library_consumers() {
    // No `file` param: queue_worker only consumes; the feeder is taskherd's.
    let mut herd = Herd::new(&format!(
        r#"
[[group]]
name = "jobs"
command = "{worker}"
params = {{ always_fail = 7 }}

[group.feeder]
file = "jobs.queue"

[group.queue]
max_attempts = 2
retry_initial = "10ms"
retry_max = "10ms"
progress_every = "1s"

[group.local]
instances = 2
concurrency = 2
"#,
        worker = queue_worker()
    ));
    // Relative to the config file's directory.
    let file = herd.config.with_file_name("jobs.queue");
    add(&file, 1..=50);
    herd.start();
    herd.wait_for("[jobs] [localhost] [file-feeder/1/1] feeder listening on");
    // Added while the feeder serves.
    add(&file, 51..=100);
    wait_done(&mut herd, 99);
    // Job 7 fails every time: dead after 2 attempts, logged by the feeder
    // through its control channel, with its id and reason.
    let dead = herd.wait_for("[file-feeder/1/1] job dead");
    assert!(dead.contains("warning"), "{dead}");
    assert!(dead.contains(" id="), "{dead}");
    assert!(dead.contains("reason="), "{dead}");
    herd.wait_for("(queue empty)");
    herd.signal(libc::SIGTERM);
    // Job 7 ended dead: the run failed, and says where to look.
    assert_eq!(herd.wait_exit().code(), Some(1));
    herd.wait_for("1 job of group jobs ended dead (see taskherd queue list");
    let done = done_counts(&herd);
    assert_eq!(done.len(), 99, "{done:?}");
    assert!(!done.contains_key(&7));
    assert!(done.values().all(|&c| c == 1), "{done:?}");
    assert_eq!(counts(&file), (0, 0, 1), "the queue is empty, job 7 dead");
    herd.assert_no_leftovers();
}

#[test]
fn a_built_in_file_feeder_on_a_remote_host() {
    // The agent (the built taskherd) runs the feeder there; consumers on
    // both hosts get its address from the master.
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.queue");
    add(&file, 1..=100);
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"

[ssh]
ssh_config = "{config}"

[[group]]
name = "jobs"
command = "{worker}"
params = {{ work_ms = 5 }}

[group.feeder]
host = "{host}"
bind = "127.0.0.1:0"
file = "{file}"

[group.queue]
progress_every = "1s"

[group.local]
instances = 1
concurrency = 2

[[group.remote]]
hosts = ["{host}"]
instances = 1
concurrency = 2
"#,
        agent = taskherd_bin().display(),
        config = world.ssh_config().display(),
        worker = queue_worker(),
        host = host.alias(),
        file = file.display(),
    ));
    herd.start();
    herd.wait_for(&format!(
        "[jobs] [{}] [file-feeder/1/1] feeder listening on",
        host.alias()
    ));
    add(&file, 101..=200);
    wait_done(&mut herd, 200);
    herd.wait_for("(queue empty)");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let done = done_counts(&herd);
    assert_eq!(done.len(), 200);
    assert!(done.values().all(|&c| c == 1), "{done:?}");
    assert_eq!(counts(&file), (0, 0, 0));
    herd.assert_no_leftovers();
    crate::remote::assert_host_clean(&host);
}

#[test]
fn built_in_feeder_and_consumer_config_errors() {
    let (code, text, path, _dir) = check(
        r#"[[group]]
name = "a"
command = "/bin/true"
[group.feeder]
file = ""
[group.consumer]
run = "coprocess"
[group.local]
instances = 1

[[group]]
name = "b"
command = "/bin/true"
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "c"
command = "/bin/true"
[group.feeder]
[group.consumer]
run = "shell"
[group.local]
instances = 1

[[group]]
name = "d"
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
            format!("{file}:5:"),
            "group[1].feeder.file",
            "must not be empty",
        ),
        (
            format!("{file}:7:"),
            "group[1].consumer.run",
            "coprocess consumers need a built-in feeder",
        ),
        (
            format!("{file}:14:"),
            "group[2].consumer",
            "a [group.consumer] table needs [group.feeder]",
        ),
        (
            format!("{file}:24:"),
            "group[3].consumer.run",
            "expected \"library\", \"exec\" or \"coprocess\"",
        ),
        (
            format!("{file}:33:"),
            "group[4].consumer.run",
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

#[test]
fn check_does_not_look_for_the_command_of_a_built_in_feeder() {
    // Consumers only on a remote host: nothing here runs the command.
    let (code, text, _, _dir) = check(
        r#"[[group]]
name = "jobs"
command = "/not/here/worker"
[group.feeder]
file = "jobs.queue"
[[group.remote]]
hosts = ["localhost"]
instances = 1
"#,
    );
    assert_eq!(code, Some(0), "{text}");
}
