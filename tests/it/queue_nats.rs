//! Queue groups on NATS JetStream (`[group.queue] backend = "nats"`),
//! against real `nats-server -js` processes on loopback with their own
//! store directories. Each test skips (saying why) when nats-server is
//! not installed (scripts/test installs it).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::nats::{NatsCluster, NatsServer};
use crate::support::{taskherd_bin, Herd};

fn queue_worker() -> String {
    crate::support::worker_bin()
        .with_file_name("queue_worker")
        .display()
        .to_string()
}

/// A herd with one queue group `jobs` on JetStream at `servers`, of
/// `consumers` local `queue_worker`s running `concurrency` jobs each.
fn herd(
    servers: &[String],
    params: &str,
    consumers: u32,
    concurrency: u32,
    queue: &str,
    nats: &str,
) -> Herd {
    let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    Herd::new(&format!(
        r#"
[master]
stop_grace = "5s"

[nats]
servers = [{servers}]
{nats}

[[group]]
name = "jobs"
command = "{worker}"
params = {{ ids = true, {params} }}
restart = {{ policy = "always", initial = "100ms" }}

[group.queue]
backend = "nats"
{queue}

[group.local]
instances = {consumers}
concurrency = {concurrency}
"#,
        servers = servers.join(", "),
        worker = queue_worker()
    ))
}

/// `taskherd queue SUBCOMMAND -c herd.toml FLAGS... jobs JOBS...` on the
/// herd's group `jobs` (`args`: the subcommand, its flags, then `--` and
/// the jobs if any): its output and whether it succeeded.
fn queue_cmd(herd: &Herd, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let mut command = Command::new(taskherd_bin());
    command
        .arg("queue")
        .arg(args[0])
        .arg("-c")
        .arg(&herd.config)
        .args(&args[1..split])
        .arg("jobs")
        .args(args.get(split + 1..).unwrap_or_default());
    command.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("taskherd queue");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("write jobs");
    }
    let out = child.wait_with_output().expect("taskherd queue");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `taskherd queue add -c herd.toml FLAGS... jobs JOBS...`, checked.
fn add_with(herd: &Herd, flags: &[&str], jobs: &[&str]) -> String {
    let mut all = vec!["add"];
    all.extend_from_slice(flags);
    all.push("--");
    all.extend_from_slice(jobs);
    let args = &all;
    let (ok, text) = queue_cmd(herd, args, None);
    assert!(ok, "queue {args:?}: {text}");
    text
}

/// `taskherd queue add -c herd.toml jobs JOBS...`, checked.
fn add(herd: &Herd, jobs: &[&str]) -> String {
    add_with(herd, &[], jobs)
}

/// Adds jobs 1..=n in one call (stdin).
fn add_numbers(herd: &Herd, n: u64) {
    let jobs: String = (1..=n).map(|i| format!("{i}\n")).collect();
    let (ok, text) = queue_cmd(herd, &["add", "--", "-"], Some(&jobs));
    assert!(ok, "queue add -: {text}");
    assert!(text.contains(&format!("added {n} job")), "{text}");
}

/// The job and attempt of a `done` line ("... done <n> #<id> attempt <a>").
fn done_line(line: &str) -> Option<(u64, u32)> {
    let (_, rest) = line.rsplit_once("] done ")?;
    let mut words = rest.split_whitespace();
    let job = words.next()?.parse::<u64>().ok()?;
    let attempt = words.nth(2)?.parse::<u32>().ok()?;
    Some((job, attempt))
}

/// Each job's `done` lines: job -> attempts that ended done.
fn done(herd: &Herd) -> BTreeMap<u64, Vec<u32>> {
    let mut done: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (job, attempt) in herd.seen.iter().filter_map(|line| done_line(line)) {
        done.entry(job).or_default().push(attempt);
    }
    done
}

/// Waits (bounded) until jobs 1..=n were all done at least once.
fn wait_all_done(herd: &mut Herd, n: u64, within: Duration) {
    let jobs: Vec<u64> = (1..=n).collect();
    wait_done(herd, &jobs, within);
}

/// Waits (bounded) until `jobs` were all done at least once. Each line
/// is parsed once, as it comes: with thousands of jobs and the master's
/// debug log, rescanning every line seen for each new `done` line kept
/// this thread busy for minutes on a loaded machine, so the test fell
/// behind a herd that had long finished.
fn wait_done(herd: &mut Herd, jobs: &[u64], within: Duration) {
    let deadline = Instant::now() + within;
    let mut left: BTreeSet<u64> = jobs.iter().copied().collect();
    let mut parsed = 0;
    loop {
        for line in &herd.seen[parsed..] {
            if let Some((job, _)) = done_line(line) {
                left.remove(&job);
            }
        }
        parsed = herd.seen.len();
        if left.is_empty() {
            return;
        }
        let now = Instant::now();
        assert!(
            now < deadline && herd.wait_line(deadline - now),
            "only {} of {} jobs done; last lines:\n{}",
            jobs.len() - left.len(),
            jobs.len(),
            last_lines(herd)
        );
    }
}

fn last_lines(herd: &Herd) -> String {
    let n = herd.seen.len();
    herd.seen[n.saturating_sub(40)..].join("\n")
}

/// Starts the herd and waits until its master has set the stream up.
fn start(herd: &mut Herd) {
    herd.start_with(&["--log-filter", "debug"]);
    herd.wait_for("JetStream stream TASKHERD_JOBS ready");
}

/// Waits (bounded, polling `queue list`) until `check` holds.
fn wait_list(
    herd: &Herd,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    // A `queue list` that fails is tried again: a cluster that lost a
    // node answers once its streams have a leader again.
    let deadline = Instant::now() + crate::support::WAIT;
    loop {
        let (ok, text) = queue_cmd(herd, &["list", "--json"], None);
        let report = if ok {
            serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text}"))
        } else {
            serde_json::Value::String(text)
        };
        if ok && check(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "{what}: {report}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(herd: &mut Herd) {
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{}", last_lines(herd));
    herd.assert_no_leftovers();
}

#[test]
fn jetstream_three_jobs_then_a_clean_stop() {
    let Some(server) = NatsServer::start("jetstream_three_jobs_then_a_clean_stop") else {
        return;
    };
    let mut herd = herd(&[server.url()], "", 1, 1, "", "");
    start(&mut herd);
    let added = add(&herd, &["1", "2", "3"]);
    assert!(
        added.contains("TASKHERD_JOBS") && added.contains("added 3 jobs"),
        "{added}"
    );
    wait_all_done(&mut herd, 3, Duration::from_secs(30));
    let report = wait_list(&herd, "acked jobs leave the work stream", |r| {
        r["pending"] == 0
    });
    assert_eq!(report["dead_count"], 0, "{report}");
    stop(&mut herd);
    assert_eq!(done(&herd).values().map(Vec::len).sum::<usize>(), 3);
    let complaints: Vec<_> = herd
        .seen
        .iter()
        .filter(|l| l.contains(" warning ") || l.contains(" error ") || l.contains(" critical "))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}

#[test]
fn jetstream_many_consumers_do_every_job_exactly_once() {
    let Some(server) = NatsServer::start("jetstream_many_consumers_do_every_job_exactly_once")
    else {
        return;
    };
    let mut herd = herd(&[server.url()], "", 4, 4, "", "");
    start(&mut herd);
    // More than the client's 5 000 publications awaiting their acks.
    add_numbers(&herd, 6000);
    wait_all_done(&mut herd, 6000, Duration::from_secs(120));
    wait_list(&herd, "every job acked", |r| {
        r["pending"] == 0 && r["in_flight"] == 0
    });
    stop(&mut herd);
    let done = done(&herd);
    let twice: Vec<_> = done.iter().filter(|(_, runs)| runs.len() != 1).collect();
    assert!(twice.is_empty(), "jobs done more than once: {twice:?}");
    assert_eq!(done.len(), 6000);
}

#[test]
fn jetstream_consumer_killed_mid_job_is_redelivered() {
    let Some(server) = NatsServer::start("jetstream_consumer_killed_mid_job_is_redelivered") else {
        return;
    };
    // Job 1 takes a minute on its first attempt: the consumer is killed
    // meanwhile, and the job comes back after the lease (2 s).
    let mut herd = herd(
        &[server.url()],
        "stall = 1, stall_ms = 60000",
        1,
        1,
        "lease = \"2s\"",
        "",
    );
    start(&mut herd);
    let started = herd.wait_for("[queue_worker/1/1] started (pid ");
    let pid: i32 = started
        .rsplit_once("(pid ")
        .and_then(|(_, rest)| rest.trim_end_matches(')').parse().ok())
        .expect("pid in the started line");
    add(&herd, &["1"]);
    wait_list(&herd, "job 1 running", |r| r["in_flight"] == 1);
    // SAFETY: kill(2) on the consumer this test's herd started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    wait_all_done(&mut herd, 1, Duration::from_secs(30));
    assert_eq!(done(&herd)[&1], vec![2], "done on its second attempt");
    stop(&mut herd);
}

#[test]
fn jetstream_retry_then_success() {
    let Some(server) = NatsServer::start("jetstream_retry_then_success") else {
        return;
    };
    let mut herd = herd(
        &[server.url()],
        "fail_every = 1",
        2,
        2,
        "retry_initial = \"100ms\"",
        "",
    );
    start(&mut herd);
    add(&herd, &["1", "2", "3", "4", "5"]);
    wait_all_done(&mut herd, 5, Duration::from_secs(30));
    for (job, attempts) in done(&herd) {
        assert_eq!(attempts, vec![2], "job {job}: failed once, then done");
    }
    herd.wait_for_count("fails on its first attempt", 5);
    wait_list(&herd, "nothing left", |r| {
        r["pending"] == 0 && r["dead_count"] == 0
    });
    stop(&mut herd);
}

#[test]
fn jetstream_max_attempts_then_dead_with_its_reason() {
    let Some(server) = NatsServer::start("jetstream_max_attempts_then_dead_with_its_reason") else {
        return;
    };
    let mut herd = herd(
        &[server.url()],
        "always_fail = 2",
        1,
        2,
        "max_attempts = 3\nretry_initial = \"50ms\"",
        "",
    );
    start(&mut herd);
    add(&herd, &["1", "2", "3"]);
    wait_done(&mut herd, &[1, 3], Duration::from_secs(30));
    let report = wait_list(&herd, "job 2 dead", |r| {
        r["dead_count"] == 1 && r["pending"] == 0
    });
    let dead = &report["dead"][0];
    assert_eq!(dead["job"], "2", "{report}");
    assert_eq!(dead["attempts"], 3, "{report}");
    let reason = dead["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the consumer asked for a retry") && reason.contains("3 attempts"),
        "{reason}"
    );
    // Dead jobs go back with requeue-dead, and fail again.
    let (ok, text) = queue_cmd(&herd, &["requeue-dead"], None);
    assert!(ok && text.contains("1 job put back"), "{text}");
    wait_list(&herd, "job 2 dead again", |r| {
        r["dead_count"] == 1 && r["pending"] == 0
    });
    stop(&mut herd);
}

#[test]
fn jetstream_delay_and_unique_key() {
    let Some(server) = NatsServer::start("jetstream_delay_and_unique_key") else {
        return;
    };
    let mut herd = herd(&[server.url()], "", 1, 2, "", "");
    start(&mut herd);
    let added_at = Instant::now();
    add_with(&herd, &["--delay", "3s"], &["1"]);
    add(&herd, &["2"]);
    let first = add_with(&herd, &["--unique", "five"], &["5"]);
    assert!(first.contains("added 1 job"), "{first}");
    let second = add_with(&herd, &["--unique", "five"], &["5"]);
    assert!(second.contains("1 job already there"), "{second}");
    wait_done(&mut herd, &[1, 2, 5], Duration::from_secs(30));
    assert!(
        added_at.elapsed() >= Duration::from_secs(3),
        "the delayed job ran before its delay"
    );
    let done = done(&herd);
    assert_eq!(
        done[&1],
        vec![1],
        "a delayed job's early delivery is no attempt"
    );
    assert_eq!(done[&5].len(), 1, "the unique key kept one job 5");
    let position = |needle: &str| herd.seen.iter().position(|l| l.contains(needle)).unwrap();
    assert!(position("] done 2 ") < position("] done 1 "));
    stop(&mut herd);
}

#[test]
fn jetstream_server_killed_and_restarted_mid_run_loses_nothing() {
    let Some(mut server) =
        NatsServer::start("jetstream_server_killed_and_restarted_mid_run_loses_nothing")
    else {
        return;
    };
    let mut herd = herd(&[server.url()], "work_ms = 5", 2, 4, "lease = \"5s\"", "");
    start(&mut herd);
    add_numbers(&herd, 400);
    herd.wait_for_count("] done ", 50);
    server.kill();
    herd.wait_for("lost the NATS server, reconnecting");
    server.restart();
    wait_all_done(&mut herd, 400, Duration::from_secs(90));
    wait_list(&herd, "every job acked", |r| r["pending"] == 0);
    stop(&mut herd);
    // One warning per consumer for the outage, not one per attempt.
    let outages = herd.lines_with("lost the NATS server").len();
    assert!(outages <= 2, "{outages} outage warnings");
}

#[test]
fn jetstream_wrong_credentials_are_a_clear_error() {
    let Some(server) = NatsServer::start_with(
        "jetstream_wrong_credentials_are_a_clear_error",
        "authorization { user: herd, password: right }",
    ) else {
        return;
    };
    let mut herd = herd(
        &[server.url()],
        "",
        1,
        1,
        "",
        "user = \"herd\"\npassword = \"wrong\"",
    );
    herd.start();
    let line = herd.wait_for("cannot start");
    assert!(
        line.contains(&server.url())
            && line.contains("user \"herd\"")
            && line.contains("uthorization"),
        "{line}"
    );
    assert_ne!(herd.wait_exit().code(), Some(0));
    assert!(
        !herd.seen.iter().any(|l| l.contains("wrong")),
        "the password is never shown"
    );
    // The right password works.
    let mut herd = self::herd(
        &[server.url()],
        "",
        1,
        1,
        "",
        "user = \"herd\"\npassword = \"right\"",
    );
    start(&mut herd);
    add(&herd, &["7"]);
    herd.wait_for("] done 7 ");
    stop(&mut herd);
}

#[test]
fn jetstream_server_down_at_start_consumers_wait_for_it() {
    let Some(mut server) =
        NatsServer::start("jetstream_server_down_at_start_consumers_wait_for_it")
    else {
        return;
    };
    server.kill();
    let mut herd = herd(&[server.url()], "", 1, 1, "", "");
    herd.start_with(&["--log-filter", "debug"]);
    let warning = herd.wait_for("cannot reach the NATS server");
    assert!(warning.contains(&server.url()), "{warning}");
    herd.wait_for("[queue_worker/1/1] started");
    server.restart();
    herd.wait_for("JetStream stream TASKHERD_JOBS ready");
    add(&herd, &["1", "2"]);
    wait_all_done(&mut herd, 2, Duration::from_secs(30));
    stop(&mut herd);
}

#[test]
fn jetstream_cluster_r3_survives_a_node_killed_mid_run() {
    let Some(mut cluster) =
        NatsCluster::start("jetstream_cluster_r3_survives_a_node_killed_mid_run")
    else {
        return;
    };
    let mut herd = herd(
        &cluster.urls(),
        "work_ms = 5",
        2,
        4,
        "lease = \"5s\"",
        "replicas = 3",
    );
    start(&mut herd);
    add_numbers(&herd, 300);
    herd.wait_for_count("] done ", 30);
    cluster.nodes[0].kill();
    wait_all_done(&mut herd, 300, Duration::from_secs(90));
    wait_list(&herd, "every job acked", |r| r["pending"] == 0);
    stop(&mut herd);
}

#[test]
fn jetstream_two_masters_share_one_queue() {
    let Some(server) = NatsServer::start("jetstream_two_masters_share_one_queue") else {
        return;
    };
    // A long lease: jobs that a stopped master held come back at once
    // (Nak), not after the lease.
    let queue = "lease = \"120s\"";
    let mut first = herd(&[server.url()], "work_ms = 20", 1, 2, queue, "");
    let mut second = herd(&[server.url()], "work_ms = 20", 1, 2, queue, "");
    start(&mut first);
    start(&mut second);
    add_numbers(&first, 300);
    first.wait_for_count("] done ", 20);
    second.wait_for_count("] done ", 20);
    stop(&mut first);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = done(&first);
        for (job, runs) in done(&second) {
            all.entry(job).or_default().extend(runs);
        }
        if (1..=300).all(|job| all.contains_key(&job)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 300 jobs done; second master:\n{}",
            all.len(),
            last_lines(&second)
        );
        second.wait_for_count("] done ", second.lines_with("] done ").len() + 1);
    }
    wait_list(&second, "every job acked", |r| r["pending"] == 0);
    stop(&mut second);
}

/// `taskherd queue SUBCOMMAND -c CONFIG ARGS...` (the group among the
/// args), checked.
fn queue_in(herd: &Herd, args: &[&str]) -> String {
    let out = Command::new(taskherd_bin())
        .arg("queue")
        .arg(args[0])
        .arg("-c")
        .arg(&herd.config)
        .args(&args[1..])
        .output()
        .expect("taskherd queue");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "queue {args:?}: {text}");
    text
}

#[test]
fn jetstream_exec_and_coprocess_consumers_run_unchanged() {
    let Some(server) = NatsServer::start("jetstream_exec_and_coprocess_consumers_run_unchanged")
    else {
        return;
    };
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join("coprocess")
        .join("thumbnail.sh");
    let mut herd = Herd::new(&format!(
        r#"
[master]
stop_grace = "5s"

[nats]
servers = ["{url}"]

[[group]]
name = "ex"
command = "sh"
args = ["-c", "printf 'exec did '; cat; echo"]
[group.queue]
backend = "nats"
[group.consumer]
run = "exec"
[group.local]
instances = 1
concurrency = 2

[[group]]
name = "co"
command = "sh"
args = ["{script}"]
[group.queue]
backend = "nats"
[group.consumer]
run = "coprocess"
[group.local]
instances = 1
concurrency = 2
"#,
        url = server.url(),
        script = script.display()
    ));
    herd.start();
    herd.wait_for("JetStream stream TASKHERD_EX ready");
    herd.wait_for("JetStream stream TASKHERD_CO ready");
    queue_in(&herd, &["add", "ex", r#"{"n":1}"#, r#"{"n":2}"#]);
    queue_in(
        &herd,
        &["add", "co", r#"{"image":"a.png"}"#, r#"{"fail":1}"#],
    );
    herd.wait_for(r#"exec did {"n":1}"#);
    herd.wait_for(r#"exec did {"n":2}"#);
    herd.wait_for(r#"handled {"image":"a.png"}"#);
    let deadline = Instant::now() + crate::support::WAIT;
    loop {
        let text = queue_in(&herd, &["list", "--json", "co"]);
        let report: serde_json::Value = serde_json::from_str(&text).expect("json");
        if report["dead_count"] == 1 && report["pending"] == 0 {
            assert_eq!(report["dead"][0]["job"], r#"{"fail":1}"#, "{report}");
            assert_eq!(
                report["dead"][0]["reason"], "cannot handle fail",
                "{report}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{report}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(&mut herd);
}

#[test]
fn jetstream_a_pause_holds_the_whole_group() {
    let Some(server) = NatsServer::start("jetstream_a_pause_holds_the_whole_group") else {
        return;
    };
    // Job 1 asks the group to pause for 5 s (the rate governor's pause),
    // broadcast to both consumers.
    let mut herd = herd(
        &[server.url()],
        "pause_at = 1, pause_ms = 5000",
        2,
        1,
        "",
        "",
    );
    start(&mut herd);
    add(&herd, &["1"]);
    herd.wait_for("] done 1 ");
    let after_pause = Instant::now();
    add(&herd, &["2", "3"]);
    wait_all_done(&mut herd, 3, Duration::from_secs(30));
    assert!(
        after_pause.elapsed() >= Duration::from_secs(3),
        "jobs ran during the group's pause"
    );
    stop(&mut herd);
}

// ---------------------------------------------------------------------
// Built-in feeders that fill a JetStream queue, the group's rate across
// masters, jobs that crash their consumers, authentication and TLS.
// ---------------------------------------------------------------------

/// The `done <n> #<id> attempt <a>` lines of a `done_file`: job -> the
/// ids (work stream sequences) it was done under.
fn done_ids(done_file: &std::path::Path) -> BTreeMap<u64, Vec<u64>> {
    let mut done: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for line in std::fs::read_to_string(done_file)
        .unwrap_or_default()
        .lines()
    {
        let mut words = line.split_whitespace().skip(1);
        let job = words.next().and_then(|w| w.parse::<u64>().ok());
        let id = words
            .next()
            .and_then(|w| w.trim_start_matches('#').parse::<u64>().ok());
        if let (Some(job), Some(id)) = (job, id) {
            done.entry(job).or_default().push(id);
        }
    }
    done
}

/// Waits (bounded) until jobs 1..=n are all in `done_file`.
fn wait_done_file(
    done_file: &std::path::Path,
    n: u64,
    within: Duration,
) -> BTreeMap<u64, Vec<u64>> {
    let deadline = Instant::now() + within;
    loop {
        let done = done_ids(done_file);
        if (1..=n).all(|job| done.contains_key(&job)) {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} jobs done",
            done.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every job 1..=n was published once: done under one id each (a line
/// published twice would be a second message, with its own sequence),
/// and the work stream's sequences end at n.
fn assert_published_once(done: &BTreeMap<u64, Vec<u64>>, n: u64) {
    let mut twice = Vec::new();
    let mut max_id = 0;
    for (job, ids) in done {
        let mut distinct = ids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != 1 {
            twice.push((*job, distinct.clone()));
        }
        max_id = max_id.max(*distinct.last().unwrap_or(&0));
    }
    assert!(twice.is_empty(), "lines published twice: {twice:?}");
    assert_eq!(
        max_id, n,
        "the work stream took {max_id} messages for {n} lines"
    );
}

#[test]
fn jetstream_jsonl_feeder_resumes_after_a_master_sigkill_without_duplicates() {
    let Some(server) = NatsServer::start(
        "jetstream_jsonl_feeder_resumes_after_a_master_sigkill_without_duplicates",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("jobs.jsonl");
    let done_file = dir.path().join("done.log");
    let total = 30_000u64;
    let text: String = (1..=total).map(|n| format!("{n}\n")).collect();
    std::fs::write(&file, &text).expect("write jobs");
    let params = format!("done_file = {:?}", done_file.display().to_string());
    let feeder = format!("\n[group.feeder]\njsonl = {:?}", file.display().to_string());
    let mut first = herd(&[server.url()], &params, 1, 8, &feeder, "");
    start(&mut first);
    let started = first.wait_for("[jsonl-feeder/1/1] started (pid ");
    let feeder_pid: i32 = started
        .rsplit_once("(pid ")
        .and_then(|(_, rest)| rest.trim_end_matches(')').parse().ok())
        .expect("pid in the started line");
    first.wait_for("publishing the file from byte 0");
    // The first batch is acked and recorded: the feeder and its master
    // are SIGKILLed mid-feed (the feeder most likely between publishing
    // a batch and recording it).
    let state_file = dir.path().join("jobs.jsonl.jetstream");
    let deadline = Instant::now() + crate::support::WAIT;
    // A few batches in (each record replaces the file).
    let recorded = || {
        std::fs::read_to_string(&state_file)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|state| state["offset"].as_u64())
            .unwrap_or(0)
    };
    let mut early: Option<String> = None;
    while recorded() < 10_000 {
        if early.is_none() && recorded() > 0 {
            early = std::fs::read_to_string(&state_file).ok();
        }
        assert!(Instant::now() < deadline, "no progress recorded");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Somewhere in a batch.
    std::thread::sleep(Duration::from_millis(10));
    // SAFETY: kill(2) on the feeder this test's herd started.
    unsafe {
        libc::kill(feeder_pid, libc::SIGKILL);
    }
    first.signal(libc::SIGKILL);
    first.wait_exit();
    first.assert_no_leftovers();
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).expect("state file"))
            .expect("state JSON");
    let offset = state["offset"].as_u64().expect("offset");
    assert!(
        offset > 0 && offset < text.len() as u64,
        "the feeder was killed mid-feed: {offset} of {} bytes recorded",
        text.len()
    );
    // As if the kill had come before the last records too (a crash
    // between publishing lines and recording them): the record goes back
    // to an early one, and what is published again is dropped as
    // duplicates (within the stream's 2-minute duplicate window).
    let early = early.expect("an early record");
    let early_offset = serde_json::from_str::<serde_json::Value>(&early).expect("state")["offset"]
        .as_u64()
        .expect("offset");
    assert!(early_offset < offset, "{early} then {offset}");
    std::fs::write(&state_file, &early).expect("roll the record back");
    // A new master on the same config: the feeder resumes where the
    // record says.
    let mut second = herd(&[server.url()], &params, 1, 8, &feeder, "");
    start(&mut second);
    second.wait_for(&format!("publishing the file from byte {early_offset}"));
    second.wait_for("lines published before a restart were dropped as duplicates");
    let done = wait_done_file(&done_file, total, Duration::from_secs(300));
    assert_published_once(&done, total);
    second.wait_for("all of the file is published");
    wait_list(&second, "every job acked", |r| r["pending"] == 0);
    stop(&mut second);
}

#[test]
fn jetstream_command_feeder_publishes_its_lines_once_and_bad_ones_dead() {
    let Some(server) =
        NatsServer::start("jetstream_command_feeder_publishes_its_lines_once_and_bad_ones_dead")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let done_file = dir.path().join("done.log");
    let params = format!("done_file = {:?}", done_file.display().to_string());
    // Line 500 comes in two writes half a second apart (a program whose
    // output is flushed by blocks, mid-line): the feeder's flush of the
    // lines before it must not cut it in two.
    let feeder = "\n[group.feeder]\ncommand = \"sh\"\n\
                  args = [\"-c\", \"seq 1 499; printf 5; sleep 0.5; echo 00; echo oops; echo '{\\\"job\\\": 501, \\\"options\\\": {\\\"delay\\\": \\\"1s\\\"}}'\"]";
    let mut herd = herd(&[server.url()], &params, 2, 4, feeder, "");
    start(&mut herd);
    herd.wait_for("all its lines are published");
    let done = wait_done_file(&done_file, 501, Duration::from_secs(120));
    assert_published_once(&done, 501);
    let report = wait_list(&herd, "the bad line dead", |r| {
        r["dead_count"] == 1 && r["pending"] == 0
    });
    let reason = report["dead"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("line 501 of the output of sh is not JSON"),
        "{report}"
    );
    // A finished feed leaves no state: the next run starts over.
    let state = herd.config.with_file_name(".jobs.command-feed");
    assert!(!state.exists(), "{} left", state.display());
    stop(&mut herd);
}

#[test]
fn jetstream_command_feeder_resumes_after_a_master_sigkill_without_duplicates() {
    let Some(server) = NatsServer::start(
        "jetstream_command_feeder_resumes_after_a_master_sigkill_without_duplicates",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let done_file = dir.path().join("done.log");
    let total = 30_000u64;
    let params = format!("done_file = {:?}", done_file.display().to_string());
    let feeder = format!("\n[group.feeder]\ncommand = \"seq\"\nargs = [\"1\", \"{total}\"]");
    let mut herd = herd(&[server.url()], &params, 1, 8, &feeder, "");
    start(&mut herd);
    let started = herd.wait_for("[command-feeder/1/1] started (pid ");
    let feeder_pid: i32 = started
        .rsplit_once("(pid ")
        .and_then(|(_, rest)| rest.trim_end_matches(')').parse().ok())
        .expect("pid in the started line");
    // Its record: the lines published, beside the config.
    let state_file = herd.config.with_file_name(".jobs.command-feed");
    let recorded = || {
        std::fs::read_to_string(&state_file)
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|state| state["lines"].as_u64())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + crate::support::WAIT;
    let mut early = None;
    while recorded() < 2000 {
        if early.is_none() && recorded() > 0 {
            early = std::fs::read_to_string(&state_file).ok();
        }
        assert!(Instant::now() < deadline, "no progress recorded");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill(2) on the feeder this test's herd started.
    unsafe {
        libc::kill(feeder_pid, libc::SIGKILL);
    }
    herd.signal(libc::SIGKILL);
    herd.wait_exit();
    herd.assert_no_leftovers();
    let lines = recorded();
    assert!(lines < total, "killed mid-feed: {lines} lines recorded");
    // As if the kill had come before the last records: the lines
    // published since the early record are published again, and dropped.
    let early = early.expect("an early record");
    std::fs::write(&state_file, &early).expect("roll the record back");
    let early_lines = recorded();
    assert!(early_lines < lines, "{early_lines} then {lines}");
    herd.start_with(&["--log-filter", "debug"]);
    herd.wait_for_count("JetStream stream TASKHERD_JOBS ready", 2);
    herd.wait_for("its lines published before are skipped");
    herd.wait_for("lines published before a restart were dropped as duplicates");
    let done = wait_done_file(&done_file, total, Duration::from_secs(300));
    assert_published_once(&done, total);
    herd.wait_for("all its lines are published");
    assert!(!state_file.exists(), "a finished feed leaves no record");
    stop(&mut herd);
}

#[test]
fn jetstream_a_job_that_crashes_its_consumers_ends_dead() {
    let Some(server) = NatsServer::start("jetstream_a_job_that_crashes_its_consumers_ends_dead")
    else {
        return;
    };
    // Job 2 SIGKILLs the consumer that runs it, every time: after its 2
    // attempts, the consumer that gets it next buries it unrun. One job
    // at a time (credits = 1): no other job is held when it crashes.
    let mut herd = herd(
        &[server.url()],
        "crash_on = 2",
        1,
        1,
        "lease = \"1s\"\nmax_attempts = 2\ncredits = 1",
        "",
    );
    start(&mut herd);
    add(&herd, &["1", "2", "3"]);
    wait_done(&mut herd, &[1, 3], Duration::from_secs(60));
    let report = wait_list(&herd, "job 2 dead", |r| {
        r["dead_count"] == 1 && r["pending"] == 0
    });
    let dead = &report["dead"][0];
    assert_eq!(dead["job"], "2", "{report}");
    let reason = dead["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("lost 2 times") && reason.contains("crashed"),
        "{report}"
    );
    stop(&mut herd);
    assert_eq!(
        herd.lines_with("] crash 2").len(),
        2,
        "job 2 ran on its 2 attempts only"
    );
}

#[test]
fn jetstream_rate_holds_across_the_consumers_of_two_masters() {
    let Some(server) =
        NatsServer::start("jetstream_rate_holds_across_the_consumers_of_two_masters")
    else {
        return;
    };
    // 20 jobs/s for the group, 2 consumers under each master. Slots of
    // 100 ms, 2 tokens each: at most 20 × t + (4 consumers + 2) × 2 jobs
    // pulled t seconds after the jobs were added (see queue/nats/rate.rs).
    let rate = 20.0;
    let slack = 12.0;
    let total = 200u64;
    let queue = "rate = \"20/s\"";
    let mut first = herd(&[server.url()], "", 2, 4, queue, "");
    let mut second = herd(&[server.url()], "", 2, 4, queue, "");
    start(&mut first);
    start(&mut second);
    // No job can be done before it is added.
    let added_at = Instant::now();
    add_numbers(&first, total);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (ok, text) = queue_cmd(&first, &["list", "--json"], None);
        // The time after the answer: the count is the server's before it.
        let elapsed = added_at.elapsed().as_secs_f64();
        assert!(ok, "{text}");
        let report: serde_json::Value = serde_json::from_str(&text).expect("json");
        let pending = report["pending"].as_u64().expect("pending");
        let done = total - pending.min(total);
        assert!(
            done as f64 <= rate * elapsed + slack,
            "{done} jobs done {elapsed:.1} s after they were added: more than {rate}/s"
        );
        if pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{report}");
        std::thread::sleep(Duration::from_millis(250));
    }
    stop(&mut first);
    stop(&mut second);
    let (a, b) = (
        first.lines_with("] done ").len(),
        second.lines_with("] done ").len(),
    );
    assert_eq!(a + b, total as usize);
    assert!(
        a > 0 && b > 0,
        "both masters' consumers ran jobs: {a} and {b}"
    );
}

/// With the server `server` (its config has `extra`): a herd whose
/// `[nats]` has `bad` refuses to start at once (no retry loop), naming
/// the server and `who`; one with `good` runs a job.
fn wrong_then_right(server: &NatsServer, url: &str, bad: &str, good: &str, who: &str) {
    let mut herd = herd(&[url.to_string()], "", 1, 1, "", bad);
    herd.start();
    let line = herd.wait_for("cannot start");
    assert!(
        line.contains(&server.url()[7..]) && line.contains(who),
        "{line}"
    );
    assert_ne!(herd.wait_exit().code(), Some(0), "{}", last_lines(&herd));
    let mut herd = self::herd(&[url.to_string()], "", 1, 1, "", good);
    start(&mut herd);
    add(&herd, &["7"]);
    herd.wait_for("] done 7 ");
    stop(&mut herd);
}

#[test]
fn jetstream_token_auth() {
    let Some(server) = NatsServer::start_with(
        "jetstream_token_auth",
        "authorization { token: \"s3cret\" }",
    ) else {
        return;
    };
    let url = server.url();
    wrong_then_right(
        &server,
        &url,
        "token = \"wrong\"",
        "token = \"s3cret\"",
        "a token",
    );
}

#[test]
fn jetstream_nkey_auth() {
    let dir = tempfile::tempdir().expect("temp dir");
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let good_seed = dir.path().join("herd.nk");
    let bad_seed = dir.path().join("other.nk");
    std::fs::write(&good_seed, user.seed().expect("seed")).expect("write seed");
    std::fs::write(&bad_seed, other.seed().expect("seed")).expect("write seed");
    let Some(server) = NatsServer::start_with(
        "jetstream_nkey_auth",
        &format!(
            "authorization {{ users: [ {{ nkey: {:?} }} ] }}",
            user.public_key()
        ),
    ) else {
        return;
    };
    let url = server.url();
    wrong_then_right(
        &server,
        &url,
        &format!("nkey = {:?}", bad_seed.display().to_string()),
        &format!("nkey = {:?}", good_seed.display().to_string()),
        &format!("nkey seed file {}", bad_seed.display()),
    );
}

/// A JWT (NATS v2 claims) of `nats` for `subject`, signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use data_encoding::BASE64URL_NOPAD;
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("TASKHERD{}{}", iat, subject.len()),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let claims = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{claims}");
    let signature = BASE64URL_NOPAD.encode(&issuer.sign(signed.as_bytes()).expect("sign"));
    format!("{signed}.{signature}")
}

/// A creds file of a user of `account`.
fn creds(account: &nkeys::KeyPair, user: &nkeys::KeyPair) -> String {
    let user_jwt = jwt(
        account,
        &user.public_key(),
        "herd",
        serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                           "type": "user", "version": 2}),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().expect("seed")
    )
}

#[test]
fn jetstream_creds_file_auth() {
    // Operator mode, as `nsc` would set it up: an operator, an account
    // with JetStream (its JWT preloaded in the server's memory resolver)
    // and a user of it in a creds file. The wrong creds file's user
    // belongs to an account the server does not know.
    let dir = tempfile::tempdir().expect("temp dir");
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let stranger = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "herd",
        serde_json::json!({
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                       "wildcards": true, "conn": -1, "leaf": -1,
                       "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1},
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account", "version": 2}),
    );
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                                      "exports": -1, "wildcards": true, "conn": -1, "leaf": -1},
                           "type": "account", "version": 2}),
    );
    let operator_file = dir.path().join("op.jwt");
    std::fs::write(&operator_file, &operator_jwt).expect("write operator JWT");
    let good = dir.path().join("herd.creds");
    let bad = dir.path().join("stranger.creds");
    std::fs::write(&good, creds(&account, &nkeys::KeyPair::new_user())).expect("write creds");
    std::fs::write(&bad, creds(&stranger, &nkeys::KeyPair::new_user())).expect("write creds");
    let Some(server) = NatsServer::start_with(
        "jetstream_creds_file_auth",
        &format!(
            "operator: {:?}\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{ {}: {:?}, {}: {:?} }}",
            operator_file.display().to_string(),
            system.public_key(),
            account.public_key(),
            account_jwt,
            system.public_key(),
            system_jwt
        ),
    ) else {
        return;
    };
    let url = server.url();
    wrong_then_right(
        &server,
        &url,
        &format!("creds = {:?}", bad.display().to_string()),
        &format!("creds = {:?}", good.display().to_string()),
        &format!("credentials file {}", bad.display()),
    );
}

/// `openssl ARGS...` in `dir`, checked; `None` (the test skips) when
/// there is no openssl command.
fn openssl(test: &str, dir: &std::path::Path, args: &[&str]) -> Option<()> {
    match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(())
        }
        Err(err) => {
            eprintln!("{test}: skipped: no openssl command ({err}; scripts/test installs it)");
            None
        }
    }
}

/// A CA (`NAME.pem`, `NAME.key`) in `dir`.
fn make_ca(test: &str, dir: &std::path::Path, name: &str) -> Option<()> {
    openssl(
        test,
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    )
}

#[test]
fn jetstream_tls_with_a_ca() {
    let test = "jetstream_tls_with_a_ca";
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path();
    if make_ca(test, path, "ca").is_none() || make_ca(test, path, "other").is_none() {
        return;
    }
    std::fs::write(
        path.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n\
         basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
    )
    .expect("write ext.cnf");
    openssl(
        test,
        path,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        test,
        path,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );
    let Some(server) = NatsServer::start_with(
        test,
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?} }}",
            path.join("server.pem").display().to_string(),
            path.join("server.key").display().to_string()
        ),
    ) else {
        return;
    };
    let url = server.url();
    // A CA that did not sign the server's certificate: refused at once.
    let mut herd = herd(
        std::slice::from_ref(&url),
        "",
        1,
        1,
        "",
        &format!(
            "tls_ca = {:?}",
            path.join("other.pem").display().to_string()
        ),
    );
    herd.start();
    let line = herd.wait_for("cannot start");
    assert!(line.contains(&url) && line.contains("TLS"), "{line}");
    assert_ne!(herd.wait_exit().code(), Some(0));
    // The right CA: jobs run over TLS.
    let mut herd = self::herd(
        std::slice::from_ref(&url),
        "",
        1,
        1,
        "",
        &format!("tls_ca = {:?}", path.join("ca.pem").display().to_string()),
    );
    start(&mut herd);
    add(&herd, &["7"]);
    herd.wait_for("] done 7 ");
    stop(&mut herd);
}
