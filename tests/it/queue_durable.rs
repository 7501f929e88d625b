//! The durable file queue at volume and under SIGKILL: exactly-once
//! intake, a million pending jobs, a feeder (and a master) killed while
//! consumers run, a job that kills its feeder every time.

use crate::support::{queue_on, taskherd_bin, Herd};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn queue_worker() -> String {
    crate::support::worker_bin()
        .with_file_name("queue_worker")
        .display()
        .to_string()
}

/// The pending jobs' payloads (numbers), and the dead count.
fn pending_numbers(file: &Path) -> (Vec<u64>, usize) {
    let report: serde_json::Value =
        serde_json::from_str(&queue_on(&["list", "--json", "--jobs"], file)).expect("JSON");
    let jobs = report["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|job| job["job"].as_u64().expect("a number"))
        .collect();
    (jobs, report["dead"].as_array().expect("dead").len())
}

/// A small xorshift for kill delays (no dependency, reproducible per seed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Kills `child` after `delay` unless it ended; returns whether it ended
/// by itself with success.
fn kill_after(mut child: std::process::Child, delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill(); // SIGKILL
            let status = child.wait().expect("wait");
            return status.success();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn intake_is_exactly_once_whatever_is_killed_when() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.queue");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut acknowledged = BTreeSet::new();
    let mut maybe = BTreeSet::new();
    let batch = 400u64;
    let rounds = 40u64;
    for round in 0..rounds {
        let jobs: Vec<u64> = (round * batch + 1..=(round + 1) * batch).collect();
        // A producer, killed at a random point in half the rounds.
        let mut add = Command::new(taskherd_bin())
            .args(["queue", "add"])
            .arg(&file)
            .arg("-")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("queue add");
        let mut stdin = add.stdin.take().expect("stdin");
        let text: String = jobs.iter().map(|n| format!("{n}\n")).collect();
        let _ = stdin.write_all(text.as_bytes());
        drop(stdin);
        let add_delay = if round % 2 == 0 {
            Duration::from_millis(rng.below(8))
        } else {
            Duration::from_secs(30)
        };
        if kill_after(add, add_delay) {
            acknowledged.extend(jobs);
        } else {
            maybe.extend(jobs);
        }
        // The intake (and a compaction), killed at a random point.
        let compact = Command::new(taskherd_bin())
            .args(["queue", "compact"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("queue compact");
        let list = Command::new(taskherd_bin())
            .args(["queue", "list"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("queue list");
        kill_after(compact, Duration::from_millis(rng.below(15)));
        kill_after(list, Duration::from_millis(rng.below(5)));
    }
    // Take in what is left, then look.
    queue_on(&["compact"], &file);
    let (pending, dead) = pending_numbers(&file);
    assert_eq!(dead, 0);
    let mut seen = BTreeMap::new();
    for n in &pending {
        *seen.entry(*n).or_insert(0u32) += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(doubled.is_empty(), "jobs taken in twice: {doubled:?}");
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|n| !seen.contains_key(n))
        .collect();
    assert!(missing.is_empty(), "acknowledged jobs lost: {missing:?}");
    let strangers: Vec<_> = seen
        .keys()
        .filter(|n| !acknowledged.contains(n) && !maybe.contains(n))
        .collect();
    assert!(strangers.is_empty(), "{strangers:?}");
    assert!(
        acknowledged.len() >= (rounds / 2 * batch) as usize,
        "{} acknowledged",
        acknowledged.len()
    );
}

/// A queue group of `queue_worker` on the file queue `file`.
fn durable_herd(file: &Path, params: &str, consumers: u32, concurrency: u32, extra: &str) -> Herd {
    Herd::new(&format!(
        r#"
[log]
filter = "info,jobs=debug"

[[group]]
name = "jobs"
command = "{worker}"
params = {{ file = "{file}", {params} }}
env = {{ RUST_LOG = "debug" }}
restart = {{ initial = "100ms", max = "500ms", limit = "unlimited" }}

[group.feeder]
bind = "127.0.0.1:0"

[group.queue]
progress_every = "1s"
{extra}

[group.local]
instances = {consumers}
concurrency = {concurrency}
"#,
        worker = queue_worker(),
        file = file.display(),
    ))
}

/// The runs of each job (`done N #ID attempt A` lines) and the ids whose
/// outcome the feeder confirmed, with the attempt confirmed. (Attempts are
/// durable: a run after a confirmation would have a higher one. Log order
/// says nothing here: a consumer's output and its log records travel on
/// two channels.)
struct Ledger {
    /// Job number -> (job id, attempt) of each run.
    runs: BTreeMap<u64, Vec<(u64, u32)>>,
    /// Job id -> the attempt whose outcome was confirmed.
    settled: HashMap<u64, u32>,
}

fn ledger(herd: &Herd, done_file: &Path) -> Ledger {
    let mut runs: BTreeMap<u64, Vec<(u64, u32)>> = BTreeMap::new();
    let mut settled = HashMap::new();
    let done = std::fs::read_to_string(done_file).unwrap_or_default();
    let done_lines = done.lines().map(|line| format!("] {line}"));
    let log_lines = herd
        .seen
        .iter()
        .filter(|line| !line.contains("] done "))
        .cloned();
    for line in done_lines.chain(log_lines) {
        let line = &line;
        if let Some((_, rest)) = line.split_once("] done ") {
            // `done N #ID attempt A`
            let words: Vec<&str> = rest.split_whitespace().collect();
            let n = words.first().and_then(|w| w.parse::<u64>().ok());
            let id = words
                .get(1)
                .and_then(|w| w.strip_prefix('#'))
                .and_then(|w| w.parse::<u64>().ok());
            let attempt = words.get(3).and_then(|w| w.parse::<u32>().ok());
            if let (Some(n), Some(id), Some(attempt)) = (n, id, attempt) {
                runs.entry(n).or_default().push((id, attempt));
            }
        } else if line.contains("outcome recorded durably by the feeder") {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|w| w.parse::<u64>().ok())
            };
            if let (Some(id), Some(attempt)) = (field("job="), field("attempt=")) {
                let attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
                let entry = settled.entry(id).or_insert(attempt);
                *entry = (*entry).min(attempt);
            }
        }
    }
    Ledger { runs, settled }
}

/// The feeder's pid (group id 1 of the herd).
fn feeder_pid(herd: &Herd) -> Option<i32> {
    herd.marked_processes().into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/environ"))
            .map(|env| env.split(|&b| b == 0).any(|v| v == b"TASKHERD_GROUP_ID=1"))
            .unwrap_or(false)
    })
}

#[test]
fn feeder_and_master_killed_while_consumers_run_lose_nothing_and_rerun_nothing_confirmed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.queue");
    let total = 3000u64;
    let jobs: Vec<String> = (1..=total).map(|n| n.to_string()).collect();
    let mut add = Command::new(taskherd_bin())
        .args(["queue", "add"])
        .arg(&file)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("queue add");
    add.stdin
        .take()
        .expect("stdin")
        .write_all(jobs.join("\n").as_bytes())
        .expect("write jobs");
    assert!(add.wait().expect("queue add").success());

    let done_file = dir.path().join("done.log");
    let mut herd = durable_herd(
        &file,
        &format!("done_file = \"{}\", work_ms = 2", done_file.display()),
        3,
        4,
        "",
    );
    herd.start();
    let mut done_seen = 0;
    for round in 0..5 {
        done_seen += 300;
        herd.wait_for_count("] done ", done_seen);
        if round == 2 {
            // The master itself: its instances see their control channel
            // close; a new master on the same config takes over.
            herd.signal(libc::SIGKILL);
            herd.wait_exit();
            herd.start();
            herd.wait_for_count("feeder listening on", round + 2);
            continue;
        }
        let pid = feeder_pid(&herd).expect("feeder running");
        // SAFETY: plain kill(2) on a process of this herd.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        herd.wait_for_count("feeder listening on", round + 2);
    }
    // Every job done (the file of done lines is written by the consumers
    // themselves: a master killed loses the output it did not relay).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ledger = ledger(&herd, &done_file);
        if ledger.runs.len() as u64 == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {total} jobs done",
            ledger.runs.len()
        );
        herd.wait_for_count("] done ", herd.lines_with("] done ").len() + 1);
    }
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();

    let ledger = ledger(&herd, &done_file);
    assert_eq!(ledger.runs.len() as u64, total, "every job done");
    assert!(!ledger.settled.is_empty(), "confirmations seen");
    // A job whose outcome was confirmed never ran again.
    for (n, runs) in &ledger.runs {
        for (id, _) in runs {
            if let Some(&confirmed) = ledger.settled.get(id) {
                let later: Vec<_> = runs.iter().filter(|(_, a)| *a > confirmed).collect();
                assert!(
                    later.is_empty(),
                    "job {n} (#{id}) ran again after attempt {confirmed} was confirmed: {later:?}"
                );
            }
        }
    }
    let doubles = ledger.runs.values().filter(|runs| runs.len() > 1).count();
    assert!(doubles <= 200, "{doubles} jobs ran more than once");
    let (pending, dead) = pending_numbers(&file);
    assert_eq!((pending.len(), dead), (0, 0));
}

#[test]
fn a_job_that_kills_its_feeder_every_time_ends_dead_after_max_attempts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.queue");
    let pid_file = dir.path().join("feeder.pid");
    let args: Vec<String> = (1..=20).map(|n| n.to_string()).collect();
    let mut command = Command::new(taskherd_bin());
    command.args(["queue", "add"]).arg(&file).args(&args);
    assert!(command.status().expect("queue add").success());
    let mut herd = durable_herd(
        &file,
        &format!("poison = 7, pid_file = \"{}\"", pid_file.display()),
        1,
        1,
        // One job out at a time: only the poison job is in flight when
        // its feeder dies (every job in flight then counts an attempt).
        "max_attempts = 3\ncredits = 1\nretry_initial = \"10ms\"\nretry_max = \"10ms\"",
    );
    herd.start();
    herd.wait_for("dead 7:");
    let deadline = Instant::now() + Duration::from_secs(60);
    while (1..=20u64)
        .filter(|n| *n != 7)
        .any(|n| herd.lines_with(&format!("] done {n}")).is_empty())
    {
        assert!(Instant::now() < deadline, "not every other job done");
        herd.wait_for_count("] done ", herd.lines_with("] done ").len() + 1);
    }
    herd.signal(libc::SIGTERM);
    // Job 7 ended dead: the run failed.
    assert_eq!(herd.wait_exit().code(), Some(1));
    herd.assert_no_leftovers();
    let kills = herd.lines_with("poison 7: killing the feeder").len();
    assert_eq!(kills, 3, "the feeder died once per attempt");
    let report: serde_json::Value =
        serde_json::from_str(&queue_on(&["list", "--json"], &file)).expect("JSON");
    assert_eq!(report["pending"], 0, "{report}");
    let dead = report["dead"].as_array().expect("dead");
    assert_eq!(dead.len(), 1, "{report}");
    assert_eq!(dead[0]["job"], 7);
    assert_eq!(dead[0]["attempts"], 3);
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("3 attempts"),
        "{report}"
    );
}

#[test]
fn a_million_pending_jobs_serve_at_once_and_no_liveness_kill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.queue");
    let total = 1_000_000u64;
    let mut add = Command::new(taskherd_bin())
        .args(["queue", "add"])
        .arg(&file)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("queue add");
    {
        let mut stdin = std::io::BufWriter::new(add.stdin.take().expect("stdin"));
        for n in 1..=total {
            writeln!(stdin, "{n}").expect("write jobs");
        }
    }
    assert!(add.wait().expect("queue add").success());
    // First from the inbox (taken in while serving), then from the journal.
    for round in 0..2 {
        let mut herd = durable_herd(&file, "work_ms = 0", 2, 4, "");
        herd.start();
        herd.wait_for("] done ");
        herd.signal(libc::SIGTERM);
        assert_eq!(herd.wait_exit().code(), Some(0), "round {round}");
        herd.assert_no_leftovers();
        let killed: Vec<_> = herd
            .seen
            .iter()
            .filter(|line| {
                line.contains("liveness") || line.contains("SIGKILL") || line.contains("timed out")
            })
            .collect();
        assert!(killed.is_empty(), "round {round}: {killed:?}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&queue_on(&["list", "--json"], &file)).expect("JSON");
    let left =
        report["pending"].as_u64().expect("pending") + report["inbox"].as_u64().expect("inbox");
    assert!(left > 0 && left < total, "{report}");
}

#[test]
fn a_feeder_killed_during_its_intake_takes_every_job_in_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.queue");
    let done_file = dir.path().join("done.log");
    let total = 50_000u64;
    let mut add = Command::new(taskherd_bin())
        .args(["queue", "add"])
        .arg(&file)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("queue add");
    {
        let mut stdin = std::io::BufWriter::new(add.stdin.take().expect("stdin"));
        for n in 1..=total {
            writeln!(stdin, "{n}").expect("write jobs");
        }
    }
    assert!(add.wait().expect("queue add").success());
    let mut herd = durable_herd(
        &file,
        &format!("done_file = \"{}\", work_ms = 1", done_file.display()),
        1,
        1,
        "",
    );
    herd.start();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id()));
    for round in 0..3 {
        herd.wait_for_count("feeder listening on", round + 1);
        // Somewhere in the intake of the 50,000 lines (or just after).
        std::thread::sleep(Duration::from_millis(20 + rng.below(200)));
        let pid = feeder_pid(&herd).expect("feeder running");
        // SAFETY: plain kill(2) on a process of this herd.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    }
    herd.wait_for_count("feeder listening on", 4);
    herd.wait_for_count("] done ", 100);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();

    queue_on(&["compact"], &file);
    let (pending, dead) = pending_numbers(&file);
    assert_eq!(dead, 0);
    let mut seen = BTreeSet::new();
    let doubled: Vec<_> = pending.iter().filter(|n| !seen.insert(**n)).collect();
    assert!(doubled.is_empty(), "taken in twice: {doubled:?}");
    let done: BTreeSet<u64> = std::fs::read_to_string(&done_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1)?.parse().ok())
        .collect();
    let all: BTreeSet<u64> = seen.union(&done).copied().collect();
    assert_eq!(all, (1..=total).collect::<BTreeSet<u64>>(), "a job lost");
    // Only jobs out when a feeder died or at the stop can be both done and
    // still pending (done, outcome not recorded).
    let both = seen.intersection(&done).count();
    assert!(both <= 16, "{both} jobs both done and pending");
}
