//! Queue groups on NATS JetStream (`[group.queue] backend = "nats"`),
//! against real `nats-server -js` processes on loopback with their own
//! store directories. Each test skips (saying why) when nats-server is
//! not installed (scripts/test installs it).

use std::collections::BTreeMap;
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

/// Each job's `done` lines: job -> attempts that ended done.
fn done(herd: &Herd) -> BTreeMap<u64, Vec<u32>> {
    let mut done: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for line in &herd.seen {
        // "... done <n> #<id> attempt <a>"
        let Some((_, rest)) = line.rsplit_once("] done ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let job = words.next().and_then(|w| w.parse::<u64>().ok());
        let attempt = words.nth(2).and_then(|w| w.parse::<u32>().ok());
        if let (Some(job), Some(attempt)) = (job, attempt) {
            done.entry(job).or_default().push(attempt);
        }
    }
    done
}

/// Waits (bounded) until jobs 1..=n were all done at least once.
fn wait_all_done(herd: &mut Herd, n: u64, within: Duration) {
    let jobs: Vec<u64> = (1..=n).collect();
    wait_done(herd, &jobs, within);
}

/// Waits (bounded) until `jobs` were all done at least once.
fn wait_done(herd: &mut Herd, jobs: &[u64], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let have = done(herd);
        if jobs.iter().all(|job| have.contains_key(job)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {} jobs done; last lines:\n{}",
            have.len(),
            jobs.len(),
            last_lines(herd)
        );
        herd.wait_for_count("] done ", herd.lines_with("] done ").len() + 1);
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
