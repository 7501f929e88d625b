//! Queue groups: a feeder and consumers over TCP, with the guarantees of
//! DESIGN.md's queue rules, through the real binary and the
//! `queue_worker` example.

use crate::support::Herd;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

fn queue_worker() -> String {
    crate::support::worker_bin()
        .with_file_name("queue_worker")
        .display()
        .to_string()
}

/// A queue group of `queue_worker` with `params`, `consumers` local
/// consumers, and extra `[group.queue]` keys.
fn herd(params: &str, consumers: u32, concurrency: u32, queue: &str, master: &str) -> Herd {
    Herd::new(&format!(
        r#"
[master]
{master}

[[group]]
name = "jobs"
command = "{worker}"
params = {{ {params} }}

[group.feeder]
bind = "127.0.0.1:0"

[group.queue]
progress_every = "1s"
{queue}

[group.local]
instances = {consumers}
concurrency = {concurrency}
"#,
        worker = queue_worker()
    ))
}

/// The job of a `done` line.
fn done_job(line: &str) -> Option<u64> {
    line.rsplit_once("] done ")
        .and_then(|(_, n)| n.trim().parse::<u64>().ok())
}

/// How many times each job was reported done.
fn done_counts(herd: &Herd) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for n in herd.seen.iter().filter_map(|line| done_job(line)) {
        *counts.entry(n).or_insert(0) += 1;
    }
    counts
}

/// Waits (bounded) until every job 1..=n was reported done. Each line
/// is parsed once, as it comes (rescanning all lines for each new one
/// is quadratic and falls behind the herd on a loaded machine).
fn wait_all_done(herd: &mut Herd, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut left: BTreeSet<u64> = (1..=n).collect();
    let mut parsed = 0;
    loop {
        for job in herd.seen[parsed..].iter().filter_map(|line| done_job(line)) {
            left.remove(&job);
        }
        parsed = herd.seen.len();
        if left.is_empty() {
            return;
        }
        let now = Instant::now();
        assert!(
            now < deadline && herd.wait_line(deadline - now),
            "only {} of {n} jobs done; last lines:\n{}",
            n - left.len() as u64,
            herd.seen
                .iter()
                .rev()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn three_jobs_one_consumer_then_a_clean_stop() {
    // The original suite's queue scenario.
    let mut herd = herd("jobs = 3", 1, 1, "", "");
    // "started (pid N)" (checked below) is a debug event, hidden by default.
    herd.start_with(&["--log-filter", "debug"]);
    herd.wait_for("[jobs] [localhost] [queue_worker/1/1] feeder listening on 127.0.0.1:");
    for n in 1..=3 {
        herd.wait_for(&format!("[jobs] [localhost] [queue_worker/2/2] done {n}"));
    }
    herd.wait_for("queue: 3 done, 0 failed, 0 retried, 0 dead");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(done_counts(&herd).values().sum::<usize>(), 3);
    // The feeder started first, and nobody complained.
    let listening = herd
        .seen
        .iter()
        .position(|l| l.contains("feeder listening"))
        .unwrap();
    let consumer = herd
        .seen
        .iter()
        .position(|l| l.contains("[queue_worker/2/2] started"))
        .unwrap();
    assert!(
        listening < consumer,
        "consumer started before the feeder listened"
    );
    let complaints: Vec<_> = herd
        .seen
        .iter()
        .filter(|l| l.contains(" warning ") || l.contains(" error ") || l.contains(" critical "))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
    herd.assert_no_leftovers();
}

#[test]
fn many_consumers_do_every_job_exactly_once() {
    let mut herd = herd("jobs = 2000", 4, 4, "", "");
    herd.start();
    wait_all_done(&mut herd, 2000);
    herd.wait_for("queue: 2000 done");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let counts = done_counts(&herd);
    assert_eq!(counts.len(), 2000);
    assert!(
        counts.values().all(|&c| c == 1),
        "a job ran twice without a failure"
    );
    // The work was shared.
    let consumers = (2..=5)
        .filter(|id| {
            !herd
                .lines_with(&format!("[queue_worker/{id}/{id}] done "))
                .is_empty()
        })
        .count();
    assert!(consumers >= 2, "only {consumers} consumers got jobs");
    herd.assert_no_leftovers();
}

#[test]
fn failed_first_attempts_are_retried_and_succeed() {
    let mut herd = herd(
        "jobs = 30, fail_every = 3",
        2,
        2,
        "retry_initial = \"10ms\"",
        "",
    );
    herd.start();
    wait_all_done(&mut herd, 30);
    herd.wait_for("queue: 30 done, 10 failed, 10 retried, 0 dead");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(herd.lines_with("fails on its first attempt").len(), 10);
}

#[test]
fn a_job_failing_every_time_is_dead_lettered_and_the_feeder_told() {
    let mut herd = herd(
        "jobs = 5, always_fail = 4",
        1,
        1,
        "max_attempts = 3\nretry_initial = \"10ms\"",
        "",
    );
    herd.start();
    herd.wait_for("[jobs] [localhost] [queue_worker/1/1] dead 4:");
    herd.wait_for("queue: 4 done, 3 failed, 2 retried, 1 dead");
    herd.signal(libc::SIGTERM);
    // A job ended dead: the run failed (`fail_on_dead` is on by default).
    assert_eq!(herd.wait_exit().code(), Some(1));
    herd.wait_for("1 job of group jobs ended dead (see the feeder's log)");
    let counts = done_counts(&herd);
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 5]);
}

#[test]
fn an_expired_lease_is_redelivered_and_the_late_answer_refused() {
    // Job 2 stalls past the 1 s lease on its first attempt: it goes to the
    // other consumer; the first one's late ack changes nothing.
    let mut herd = herd(
        "jobs = 4, stall = 2, stall_ms = 2500",
        2,
        1,
        "lease = \"1s\"\nretry_initial = \"10ms\"",
        "",
    );
    herd.start();
    wait_all_done(&mut herd, 4);
    // At least once: the stalled first attempt ends late, the second
    // one is the one the feeder counts.
    herd.wait_for_count("] done 2", 2);
    herd.wait_for("queue: 4 done");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
}

#[test]
fn a_consumer_killed_mid_job_has_its_jobs_redelivered() {
    let mut herd = herd("jobs = 200, work_ms = 20", 2, 2, "", "");
    herd.start();
    herd.wait_for_count("[queue_worker/2/2] done ", 5);
    // SIGKILL consumer 2 (group id 2) while it holds jobs.
    let victim = herd
        .marked_processes()
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == b"TASKHERD_GROUP_ID=2"))
                .unwrap_or(false)
        })
        .expect("consumer 2 running");
    // SAFETY: plain kill(2) on a process of this herd.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    wait_all_done(&mut herd, 200);
    herd.wait_for("queue: 200 done");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(
        done_counts(&herd).len(),
        200,
        "every job done despite the kill"
    );
    herd.assert_no_leftovers();
}

#[test]
fn the_rate_limit_holds() {
    // 20 jobs/s for a 3 s run: about 60 jobs, far from the 1000 available.
    let mut herd = herd(
        "jobs = 1000",
        2,
        4,
        "rate = \"20/s\"",
        "max_running_time = \"3s\"",
    );
    herd.start();
    assert_eq!(herd.wait_exit().code(), Some(0));
    let done = done_counts(&herd).len();
    assert!(
        (20..=120).contains(&done),
        "{done} jobs done in 3 s at 20/s"
    );
}

#[test]
fn durable_queue_survives_sigkill_of_the_feeder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.queue");
    let add = std::process::Command::new(crate::support::taskherd_bin())
        .args(["queue", "add"])
        .arg(&file)
        .args((1..=300).map(|n| n.to_string()))
        .output()
        .expect("taskherd queue add");
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let mut herd = herd(
        &format!("file = \"{}\", work_ms = 5", file.display()),
        2,
        2,
        "",
        "",
    );
    herd.start();
    herd.wait_for_count("] done ", 50);
    let feeder = herd
        .marked_processes()
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == b"TASKHERD_GROUP_ID=1"))
                .unwrap_or(false)
        })
        .expect("feeder running");
    // SAFETY: plain kill(2) on a process of this herd.
    assert_eq!(unsafe { libc::kill(feeder, libc::SIGKILL) }, 0);
    herd.wait_for("[queue_worker/1/1] killed by SIGKILL");
    herd.wait_for_count("feeder listening on", 2);
    wait_all_done(&mut herd, 300);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    // Nothing lost, and nothing acked ran again: only jobs in flight at the
    // kill (at most 2 consumers x 4 credits) may have run twice.
    let counts = done_counts(&herd);
    assert_eq!(counts.len(), 300);
    let twice = counts.values().filter(|&&c| c > 1).count();
    assert!(twice <= 8, "{twice} jobs ran twice");
    let list = std::process::Command::new(crate::support::taskherd_bin())
        .args(["queue", "list", "--json"])
        .arg(&file)
        .output()
        .expect("taskherd queue list");
    let report: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(report["pending"], 0, "{report}");
    herd.assert_no_leftovers();
}

/// The feeder's address from its "listening" line.
fn feeder_addr(herd: &mut Herd) -> String {
    let line = herd.wait_for("feeder listening on ");
    line.rsplit("feeder listening on ")
        .next()
        .expect("address")
        .trim()
        .to_string()
}

/// Writes one length-delimited frame.
fn write_frame(stream: &mut std::net::TcpStream, body: &[u8]) {
    use std::io::Write;
    let len = u32::try_from(body.len()).expect("small frame");
    stream.write_all(&len.to_be_bytes()).expect("write length");
    stream.write_all(body).expect("write body");
}

/// Reads one length-delimited frame as JSON, `None` at end of stream.
fn read_frame(stream: &mut std::net::TcpStream) -> Option<serde_json::Value> {
    use std::io::Read;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// The feeder may say why (Refused) before closing; it never sends a job.
fn assert_closed_without_a_job(stream: &mut std::net::TcpStream) {
    while let Some(frame) = read_frame(stream) {
        assert_eq!(frame["type"], "refused", "{frame}");
    }
}

#[test]
fn strangers_and_garbage_are_refused_and_the_feeder_keeps_serving() {
    // Consumers work slowly so the feeder is busy while we poke it.
    let mut herd = herd("jobs = 100, work_ms = 20", 1, 2, "", "");
    herd.start();
    let addr = feeder_addr(&mut herd);
    let timeout = Some(Duration::from_secs(10));

    // A consumer that does not know the secret.
    let mut stranger = std::net::TcpStream::connect(&addr).expect("connect");
    stranger.set_read_timeout(timeout).expect("timeout");
    let challenge = read_frame(&mut stranger).expect("a challenge");
    assert_eq!(challenge["type"], "challenge");
    let hello = serde_json::json!({
        "type": "hello", "version": challenge["version"], "name": "stranger",
        "proof": "00".repeat(32), "nonce": "abcd",
    });
    write_frame(&mut stranger, hello.to_string().as_bytes());
    let answer = read_frame(&mut stranger).expect("an answer");
    assert_eq!(answer["type"], "refused", "{answer}");
    assert!(
        read_frame(&mut stranger).is_none(),
        "the connection is closed, no job sent"
    );

    // Garbage, and an oversized length prefix.
    let mut garbage = std::net::TcpStream::connect(&addr).expect("connect");
    garbage.set_read_timeout(timeout).expect("timeout");
    read_frame(&mut garbage).expect("a challenge");
    write_frame(&mut garbage, b"\x00\x01 not json at all");
    assert_closed_without_a_job(&mut garbage);
    let mut huge = std::net::TcpStream::connect(&addr).expect("connect");
    huge.set_read_timeout(timeout).expect("timeout");
    read_frame(&mut huge).expect("a challenge");
    {
        use std::io::Write;
        huge.write_all(&u32::MAX.to_be_bytes()).expect("write");
    }
    assert_closed_without_a_job(&mut huge);

    // The real consumer was never disturbed.
    wait_all_done(&mut herd, 100);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert_eq!(done_counts(&herd).len(), 100);
}

#[test]
fn remote_consumers_pull_from_the_local_feeder() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"

[ssh]
ssh_config = "{config}"

[[group]]
name = "jobs"
command = "{worker}"
params = {{ jobs = 300, work_ms = 30 }}

[group.feeder]
bind = "127.0.0.1:0"

# One slow local slot (9 s for every job alone): the remote consumers,
# however slow their host's connection on a busy machine, get jobs too.
[group.local]
instances = 1
concurrency = 1

[[group.remote]]
hosts = ["{host}"]
instances = 2
concurrency = 4
"#,
        agent = crate::support::taskherd_bin().display(),
        config = world.ssh_config().display(),
        worker = queue_worker(),
        host = host.alias(),
    ));
    herd.start();
    wait_all_done(&mut herd, 300);
    let remote_done = herd.lines_with(&format!("[jobs] [{}] [queue_worker/", host.alias()));
    assert!(!remote_done.is_empty(), "no job done on the remote host");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let counts = done_counts(&herd);
    assert_eq!(counts.len(), 300);
    assert!(counts.values().all(|&c| c == 1));
}

#[test]
fn a_feeder_on_a_remote_host_feeds_consumers_there_and_here() {
    // The original's scenario 19, with a local consumer too: the master
    // learns the remote feeder's port from its agent and only then starts
    // the consumers, on both hosts.
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"

[ssh]
ssh_config = "{config}"

[[group]]
name = "jobs"
command = "{worker}"
params = {{ jobs = 200, work_ms = 5 }}

[group.feeder]
host = "{host}"
bind = "127.0.0.1:0"

[group.local]
instances = 1
concurrency = 2

[[group.remote]]
hosts = ["{host}"]
instances = 1
concurrency = 2
"#,
        agent = crate::support::taskherd_bin().display(),
        config = world.ssh_config().display(),
        worker = queue_worker(),
        host = host.alias(),
    ));
    herd.start();
    wait_all_done(&mut herd, 200);
    let feeder = format!(
        "[jobs] [{}] [queue_worker/1/1] feeder listening on",
        host.alias()
    );
    assert_eq!(herd.lines_with(&feeder).len(), 1, "{:?}", herd.seen);
    let remote = format!("[jobs] [{}] [queue_worker/", host.alias());
    let done_remote = herd
        .lines_with(&remote)
        .iter()
        .filter(|line| line.contains("] done "))
        .count();
    let done_local = herd
        .lines_with("[jobs] [localhost] [queue_worker/")
        .iter()
        .filter(|line| line.contains("] done "))
        .count();
    assert!(
        done_remote > 0 && done_local > 0,
        "remote {done_remote}, local {done_local}"
    );
    herd.wait_for("(queue empty)");
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    let counts = done_counts(&herd);
    assert_eq!(counts.len(), 200);
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
    crate::remote::assert_host_clean(&host);
}

#[test]
fn busy_and_idle_queue_instances_are_not_taken_for_hung() {
    // Each job takes longer than the liveness timeout, and the feeder waits
    // idle meanwhile: the queue machinery pings for both.
    let mut herd = herd("jobs = 3, work_ms = 1500", 1, 1, "", "timeout = \"1s\"");
    herd.start();
    wait_all_done(&mut herd, 3);
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    assert!(
        herd.lines_with("liveness timeout").is_empty(),
        "{:?}",
        herd.seen
    );
}

#[test]
fn a_consumer_can_pause_the_feeder() {
    // Job 3 asks for a long pause: within the run, the feeder sends only
    // what the consumer already had credit for.
    let mut herd = herd(
        "jobs = 1000, pause_at = 3, pause_ms = 60000",
        1,
        1,
        "credits = 1",
        "max_running_time = \"3s\"",
    );
    herd.start();
    assert_eq!(herd.wait_exit().code(), Some(0));
    let done = done_counts(&herd).len();
    assert!((3..=5).contains(&done), "{done} jobs done during a pause");
}
