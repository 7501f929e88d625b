//! Coprocess consumers (`[group.consumer] run = "coprocess"`): the real
//! binary starts a Python program once per consumer instance and speaks
//! JSON lines with it; jobs from the built-in file feeder.

use crate::support::{queue_add, queue_list, taskherd_bin, Herd, WAIT};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// A coprocess in Python (standard library only). Payloads: "pair" jobs
/// are held until two are outstanding, then both answered; "flaky" is
/// retried on its first attempt; "bad" is dead; "slow" runs 3 s, longer
/// than its lease, sending progress; "garbage" prints a line that is not
/// the protocol on its first attempt. Logs on stderr.
const PROGRAM: &str = r#"
import json, sys, threading, time

lock = threading.Lock()

def send(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

def log(text):
    sys.stderr.write(text + "\n")
    sys.stderr.flush()

def slow(job):
    for _ in range(10):
        time.sleep(0.3)
        send({"type": "progress", "id": job["id"]})
    send({"type": "ok", "id": job["id"]})
    log("slow done attempt=%d" % job["attempt"])

hello = json.loads(sys.stdin.readline())
log("hello protocol=%d concurrency=%d" % (hello["protocol"], hello["concurrency"]))
held = []
for line in sys.stdin:
    job = json.loads(line)
    payload, job_id, attempt = job["payload"], job["id"], job["attempt"]
    if payload == "pair":
        held.append(job_id)
        if len(held) == 2:
            log("holding %d jobs at once" % len(held))
            for held_id in held:
                send({"type": "ok", "id": held_id})
            held = []
    elif payload == "flaky":
        if attempt == 1:
            send({"type": "retry", "id": job_id, "delay_ms": 100, "reason": "not yet"})
        else:
            send({"type": "ok", "id": job_id})
            log("flaky done attempt=%d" % attempt)
    elif payload == "bad":
        send({"type": "dead", "id": job_id, "reason": "bad input"})
    elif payload == "slow":
        threading.Thread(target=slow, args=(job,)).start()
    elif payload == "garbage":
        if attempt == 1:
            with lock:
                sys.stdout.write("this is not json\n")
                sys.stdout.flush()
        else:
            send({"type": "log", "level": "info", "message": "garbage done attempt=%d" % attempt})
            send({"type": "ok", "id": job_id})
log("end of input")
"#;

/// `[group.queue]` lines: failed attempts run again soon.
const FAST_RETRIES: &str = "retry_initial = \"100ms\"\nretry_max = \"200ms\"";

/// A temp dir with the program and the queue file.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("co.py"), PROGRAM).expect("write program");
        Setup { dir }
    }

    fn queue(&self) -> PathBuf {
        self.dir.path().join("jobs.queue")
    }

    fn add(&self, jobs: &[&str]) {
        queue_add(&self.queue(), jobs);
    }

    /// A herd with one coprocess consumer of concurrency 2.
    fn herd(&self, queue: &str) -> Herd {
        let program = self.dir.path().join("co.py").display().to_string();
        self.herd_with(
            "python3",
            &format!("[{program:?}]"),
            "stop_grace = \"3s\"",
            1,
            2,
            &format!("{FAST_RETRIES}\n{queue}"),
        )
    }

    /// A herd with one coprocess group running `command` with `args` (a
    /// TOML array): `group` lines in `[[group]]`, `instances` consumers of
    /// `concurrency`, `queue` lines in `[group.queue]`.
    fn herd_with(
        &self,
        command: &str,
        args: &str,
        group: &str,
        instances: u32,
        concurrency: u32,
        queue: &str,
    ) -> Herd {
        Herd::new(&format!(
            r#"
[[group]]
name = "jobs"
command = "{command}"
args = {args}
{group}
restart = {{ policy = "on-failure", initial = "100ms" }}

[group.feeder]
file = "{file}"

[group.consumer]
run = "coprocess"

[group.queue]
progress_every = "200ms"
{queue}

[group.local]
instances = {instances}
concurrency = {concurrency}
"#,
            file = self.queue().display(),
        ))
    }

    /// Writes a program into the temp dir; returns its path.
    fn program(&self, name: &str, text: &str) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("write program");
        path.display().to_string()
    }

    /// A file the programs append a line to per job done.
    fn done_file(&self) -> PathBuf {
        self.dir.path().join("done")
    }
}

/// Stops the herd cleanly and checks that nothing it started is left.
fn stop(herd: &mut Herd) {
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit();
    // A run whose jobs ended dead may end with a failure.
    assert!(
        status.success() || !herd.lines_with("ended dead").is_empty(),
        "{status}; seen:\n{}",
        herd.seen.join("\n")
    );
    herd.assert_no_leftovers();
}

#[test]
fn a_python_coprocess_does_jobs_two_at_once() {
    let setup = Setup::new();
    setup.add(&[
        r#""pair""#,
        r#""pair""#,
        r#""flaky""#,
        r#""bad""#,
        r#""slow""#,
    ]);
    // The slow job runs 3 s with a lease of 1 s: progress keeps it.
    let mut herd = setup.herd("lease = \"1s\"\nmax_attempts = 3");
    herd.start();
    herd.wait_for("hello protocol=1 concurrency=2");
    herd.wait_for("holding 2 jobs at once");
    herd.wait_for("flaky done attempt=2");
    herd.wait_for("job 3: retry: not yet");
    herd.wait_for("slow done attempt=1");
    herd.wait_for("4 done, 2 failed, 1 retried, 1 dead");
    stop(&mut herd);
    herd.wait_for_count("end of input", 1);
    assert!(
        herd.lines_with("lease expired").is_empty(),
        "{}",
        herd.seen.join("\n")
    );
    let list = queue_list(&setup.queue());
    assert_eq!(list["pending"], 0, "{list}");
    let dead = list["dead"].as_array().expect("dead");
    assert_eq!(dead.len(), 1, "{list}");
    assert_eq!(dead[0]["job"], "bad", "{list}");
    assert_eq!(dead[0]["reason"], "bad input", "{list}");
    assert_eq!(dead[0]["attempts"], 1, "{list}");
}

#[test]
fn a_coprocess_breaking_the_protocol_is_restarted_and_its_job_redelivered() {
    let setup = Setup::new();
    setup.add(&[r#""garbage""#]);
    let mut herd = setup.herd("");
    herd.start();
    let said = herd.wait_for("broke the protocol");
    assert!(
        said.contains("line 1 of its stdout is not JSON") && said.contains("\"this is not json\""),
        "{said}"
    );
    // Restarted: a second hello, and the job done on its next attempt.
    herd.wait_for_count("hello protocol=1", 2);
    herd.wait_for("garbage done attempt=2");
    herd.wait_for("1 done, 1 failed, 1 retried, 0 dead");
    stop(&mut herd);
    let list = queue_list(&setup.queue());
    assert_eq!(list["pending"], 0, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn coprocess_consumer_outside_a_herd_says_why() {
    let out = Command::new(taskherd_bin())
        .args(["coprocess-consumer", "--", "true"])
        .env_remove("TASKHERD_CONTROL_FD")
        .output()
        .expect("run taskherd");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("taskherd coprocess-consumer: "),
        "{stderr}"
    );
    let help = Command::new(taskherd_bin())
        .arg("--help")
        .output()
        .expect("taskherd --help");
    assert!(!String::from_utf8_lossy(&help.stdout).contains("coprocess-consumer"));
}

#[test]
fn the_coprocess_examples_run_as_documented() {
    // examples/coprocess.toml (shell) and examples/coprocess-python.toml,
    // copied with their scripts so that their queues are not written in
    // the repo.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for (config, queue) in [
        ("coprocess.toml", "coprocess/jobs.queue"),
        ("coprocess-python.toml", "coprocess/py-jobs.queue"),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("coprocess")).expect("mkdir");
        for script in ["thumbnail.sh", "thumbnail.py"] {
            let to = dir.path().join("coprocess").join(script);
            std::fs::copy(examples.join("coprocess").join(script), &to).expect("copy script");
        }
        let text = std::fs::read_to_string(examples.join(config)).expect("read example");
        let queue = dir.path().join(queue);
        queue_add(
            &queue,
            &[
                r#"{"image": "a.png"}"#,
                r#"{"image": "busy"}"#,
                r#"{"image": "fail"}"#,
            ],
        );
        let mut herd = Herd::new(&text);
        let path = dir.path().join(config);
        std::fs::write(&path, &text).expect("config");
        herd.config = path;
        herd.start();
        herd.wait_for("handled");
        herd.wait_for("2 done, 2 failed, 1 retried, 1 dead");
        let deadline = Instant::now() + WAIT;
        while herd.lines_with("handled").len() < 2 {
            assert!(Instant::now() < deadline, "{config:?}: two jobs handled");
            herd.wait_for_count("handled", herd.lines_with("handled").len() + 1);
        }
        stop(&mut herd);
        let list = queue_list(&queue);
        assert_eq!(list["pending"], 0, "{config:?}: {list}");
        let dead = list["dead"].as_array().expect("dead");
        assert_eq!(dead.len(), 1, "{config:?}: {list}");
        assert_eq!(dead[0]["job"]["image"], "fail", "{list}");
        assert_eq!(dead[0]["reason"], "cannot handle fail", "{list}");
    }
}

/// A coprocess in Python that does every job it gets (a thread per job,
/// a few ms each, so that answers come out of order): a line
/// `did <payload> attempt=<n> host=<host>` on stderr and, when given a
/// file as its argument, `<payload> attempt=<n>` appended to it.
const COUNTING: &str = r#"
import json, os, random, sys, threading, time

lock = threading.Lock()
done = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if len(sys.argv) > 1 else None
host = os.environ.get("TASKHERD_HOST", "?")

def send(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

def work(job):
    time.sleep(random.random() * 0.01)
    payload, attempt = json.dumps(job["payload"]), job["attempt"]
    if done is not None:
        os.write(done, ("%s attempt=%d\n" % (payload, attempt)).encode())
    with lock:
        sys.stderr.write("did %s attempt=%d host=%s\n" % (payload, attempt, host))
        sys.stderr.flush()
    send({"type": "ok", "id": job["id"]})

hello = json.loads(sys.stdin.readline())
sys.stderr.write("hello id=%d concurrency=%d\n" % (hello["id"], hello["concurrency"]))
sys.stderr.flush()
workers = []
for line in sys.stdin:
    job = json.loads(line)
    if job.get("type") == "job":
        worker = threading.Thread(target=work, args=(job,))
        worker.start()
        workers.append(worker)
for worker in workers:
    worker.join()
"#;

/// A coprocess in Python that does its jobs one by one (appending
/// `<payload> attempt=<n>` to the file given as its argument, then
/// answering), except on the first attempt of two payloads: "exit" makes
/// it exit 3 without answering; "hang" leaves the job to a thread that
/// sleeps forever, holding it, and makes the program ignore SIGTERM.
const FAULTY: &str = r#"
import json, os, signal, sys, threading, time

lock = threading.Lock()
done = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def send(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

def log(text):
    with lock:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

def hang(job):
    log("hanging on job %d deadline_ms %d" % (job["id"], job["deadline_ms"]))
    while True:
        time.sleep(3600)

hello = json.loads(sys.stdin.readline())
log("hello id=%d" % hello["id"])
for line in sys.stdin:
    job = json.loads(line)
    payload, attempt = job["payload"], job["attempt"]
    if payload == "exit" and attempt == 1:
        log("exiting on job %d" % job["id"])
        os._exit(3)
    elif payload == "hang" and attempt == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=hang, args=(job,)).start()
    else:
        os.write(done, ("%s attempt=%d\n" % (json.dumps(payload), attempt)).encode())
        send({"type": "ok", "id": job["id"]})
log("end of input")
"#;

/// The time of day of a log line (it starts with an RFC 3339 UTC
/// timestamp), in ms.
fn log_millis(line: &str) -> i64 {
    let time = line
        .get(11..23)
        .unwrap_or_else(|| panic!("a timestamp: {line}"));
    let parts: Vec<i64> = time
        .split([':', '.'])
        .map(|part| {
            part.parse()
                .unwrap_or_else(|_| panic!("a timestamp: {line}"))
        })
        .collect();
    ((parts[0] * 60 + parts[1]) * 60 + parts[2]) * 1000 + parts[3]
}

/// `n` jobs: the JSON numbers 1 to `n`.
fn numbers(n: u32) -> Vec<String> {
    (1..=n).map(|n| n.to_string()).collect()
}

/// Checks that `found` (one payload per job done) holds each of
/// `expected` exactly once: none lost, none done twice.
pub(crate) fn assert_each_once(what: &str, found: &[String], expected: &[String]) {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for payload in found {
        *counts.entry(payload.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|job| !counts.contains_key(job.as_str()))
        .collect();
    let twice: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<&&str> = counts
        .keys()
        .filter(|job| !expected.iter().any(|e| e == **job))
        .collect();
    assert!(
        missing.is_empty() && twice.is_empty() && unexpected.is_empty(),
        "{what}: {} done for {} jobs; never done: {missing:?}; done more than once: {twice:?}; \
         not a job: {unexpected:?}",
        found.len(),
        expected.len()
    );
    assert_eq!(found.len(), expected.len(), "{what}");
}

/// The payloads in a done file (`<payload> attempt=<n>` lines).
fn done_payloads(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            line.split_once(" attempt=")
                .unwrap_or_else(|| panic!("a done line: {line:?}"))
                .0
                .to_string()
        })
        .collect()
}

/// The payloads of the `did <payload> attempt=...` lines among `lines`.
fn did_payloads<'a>(lines: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    lines
        .into_iter()
        .filter_map(|line| {
            let (_, rest) = line.split_once("] did ")?;
            Some(rest.split_once(" attempt=")?.0.to_string())
        })
        .collect()
}

/// Waits for `total` lines containing `needle`, one by one: each may take
/// up to WAIT, all of them four times that (slow on a busy machine).
pub(crate) fn wait_for_each(herd: &mut Herd, needle: &str, total: usize) {
    let deadline = Instant::now() + 4 * WAIT;
    for seen in 1..=total {
        herd.wait_for_count(needle, seen);
        assert!(
            Instant::now() < deadline,
            "only {seen} of {total} lines with {needle:?} in time"
        );
    }
}

/// Waits for the feeder's count to say `total` jobs done and nothing
/// else: no failed attempt, no retry, nothing dead.
fn wait_all_done_cleanly(herd: &mut Herd, total: usize) {
    herd.wait_for(&format!(
        "queue: {total} done, 0 failed, 0 retried, 0 dead, 0 in flight, 0 pending"
    ));
}

/// Waits for a line containing both `first` and `second`.
fn wait_for_both(herd: &mut Herd, first: &str, second: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut count = 1;
    loop {
        let line = herd.wait_for_count(second, count);
        if line.contains(first) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a line with {first:?} and {second:?}; seen:\n{}",
            herd.seen.join("\n")
        );
        count += 1;
    }
}

#[test]
fn a_python_coprocess_does_every_job_exactly_once() {
    let setup = Setup::new();
    let program = setup.program("count.py", COUNTING);
    let jobs = numbers(200);
    let job_refs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    setup.add(&job_refs);
    let done = setup.done_file().display().to_string();
    let mut herd = setup.herd_with(
        "python3",
        &format!("[{program:?}, {done:?}]"),
        "stop_grace = \"3s\"",
        2,
        4,
        "",
    );
    herd.start();
    herd.wait_for_count("hello id=", 2);
    wait_for_each(&mut herd, "] did ", 200);
    wait_all_done_cleanly(&mut herd, 200);
    stop(&mut herd);
    assert_each_once("done file", &done_payloads(&setup.done_file()), &jobs);
    assert_each_once("log", &did_payloads(&herd.seen), &jobs);
    assert!(
        herd.lines_with("attempt=")
            .iter()
            .all(|line| line.contains("attempt=1 ")),
        "every job done on its first attempt"
    );
    let list = queue_list(&setup.queue());
    assert_eq!(list["pending"], 0, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

/// `n` jobs for the thumbnail examples: `{"image":"<i>.png"}`.
fn images(n: u32) -> Vec<String> {
    (1..=n)
        .map(|n| format!(r#"{{"image":"{n}.png"}}"#))
        .collect()
}

/// The payloads of the example's `handled <payload> (job ...` lines
/// among `lines`.
fn handled_payloads<'a>(lines: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    lines
        .into_iter()
        .filter_map(|line| {
            let (_, rest) = line.split_once("] handled ")?;
            Some(rest.split_once(" (job ")?.0.to_string())
        })
        .collect()
}

#[test]
fn the_shell_coprocess_example_does_every_job_exactly_once() {
    let setup = Setup::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coprocess/thumbnail.sh");
    let jobs = images(100);
    let job_refs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    setup.add(&job_refs);
    let mut herd = setup.herd_with(
        &script.display().to_string(),
        "[]",
        "stop_grace = \"3s\"",
        2,
        4,
        "",
    );
    herd.start();
    wait_for_each(&mut herd, "] handled ", 100);
    wait_all_done_cleanly(&mut herd, 100);
    stop(&mut herd);
    assert_each_once("log", &handled_payloads(&herd.seen), &jobs);
    assert!(
        herd.lines_with("] handled ")
            .iter()
            .all(|line| line.ends_with(", attempt 1)")),
        "every job done on its first attempt"
    );
    let list = queue_list(&setup.queue());
    assert_eq!(list["pending"], 0, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn coprocess_consumers_run_on_a_remote_host_too() {
    use crate::support::sshd::SshWorld;
    let mut world = SshWorld::new();
    let host = world.add_host();
    let setup = Setup::new();
    let program = setup.program("count.py", COUNTING);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coprocess/thumbnail.sh");
    // Two groups on the host: the Python program and the shell example.
    let py_queue = setup.dir.path().join("py.queue");
    let sh_queue = setup.dir.path().join("sh.queue");
    let py_jobs = numbers(40);
    let sh_jobs = images(40);
    queue_add(
        &py_queue,
        &py_jobs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    queue_add(
        &sh_queue,
        &sh_jobs.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let group = |name: &str, command: &str, args: &str, queue: &Path| {
        format!(
            r#"
[[group]]
name = "{name}"
command = "{command}"
args = {args}

[group.feeder]
file = "{file}"

[group.consumer]
run = "coprocess"

[group.queue]
progress_every = "200ms"

[[group.remote]]
hosts = ["{host}"]
instances = 2
concurrency = 2
"#,
            file = queue.display(),
            host = host.alias(),
        )
    };
    let mut herd = Herd::new(&format!(
        r#"
[master]
agent_path = "{agent}"

[ssh]
ssh_config = "{config}"
{py}
{sh}
"#,
        agent = taskherd_bin().display(),
        config = world.ssh_config().display(),
        py = group("py", "python3", &format!("[{program:?}]"), &py_queue),
        sh = group("sh", &script.display().to_string(), "[]", &sh_queue),
    ));
    herd.start();
    wait_for_each(&mut herd, "] did ", 40);
    wait_for_each(&mut herd, "] handled ", 40);
    for name in ["py", "sh"] {
        wait_for_both(
            &mut herd,
            &format!("[{name}] [localhost] [file-feeder/"),
            "queue: 40 done, 0 failed, 0 retried, 0 dead, 0 in flight, 0 pending",
        );
    }
    stop(&mut herd);
    crate::remote::assert_host_clean(&host);
    let on_host = |group: &str| {
        let tag = format!("[{group}] [{}] [", host.alias());
        herd.seen
            .iter()
            .filter(|line| line.contains(&tag))
            .cloned()
            .collect::<Vec<String>>()
    };
    let py_lines = on_host("py");
    assert_each_once("python on the host", &did_payloads(&py_lines), &py_jobs);
    assert!(
        py_lines
            .iter()
            .filter(|line| line.contains("] did "))
            .all(|line| line.ends_with(&format!("attempt=1 host={}", host.alias()))),
        "{py_lines:#?}"
    );
    let sh_lines = on_host("sh");
    assert_each_once("shell on the host", &handled_payloads(&sh_lines), &sh_jobs);
    for queue in [&py_queue, &sh_queue] {
        let list = queue_list(queue);
        assert_eq!(list["pending"], 0, "{list}");
        assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
    }
}

#[test]
fn a_coprocess_exiting_mid_job_is_restarted_and_no_job_is_lost() {
    let setup = Setup::new();
    let program = setup.program("faulty.py", FAULTY);
    let mut jobs = numbers(10);
    jobs.insert(4, r#""exit""#.to_string());
    setup.add(&jobs.iter().map(String::as_str).collect::<Vec<_>>());
    let done = setup.done_file().display().to_string();
    let mut herd = setup.herd_with(
        "python3",
        &format!("[{program:?}, {done:?}]"),
        "stop_grace = \"3s\"",
        1,
        2,
        &format!("{FAST_RETRIES}\nmax_attempts = 3"),
    );
    herd.start();
    let exiting = herd.wait_for("exiting on job ");
    // One clear error: the program, and how it ended.
    let said = herd.wait_for("ended (exit status: 3)");
    assert!(
        said.contains("error") && said.contains(&format!("coprocess python3 {program}")),
        "{said}"
    );
    herd.wait_for("restarting in");
    herd.wait_for_count("hello id=", 2);
    herd.wait_for(&format!("queue: {} done,", jobs.len()));
    let progress = herd.wait_for("0 in flight, 0 pending");
    assert!(progress.contains(" 0 dead,"), "{progress}");
    stop(&mut herd);
    // Said once at error by the consumer; the master adds why the
    // instance failed (and restarts it).
    let errors: Vec<&String> = herd
        .lines_with("ended (exit status: 3)")
        .into_iter()
        .filter(|line| line.contains(" error "))
        .collect();
    assert_eq!(errors.len(), 1, "{exiting}: {errors:#?}");
    herd.wait_for("failed: coprocess python3");
    let done_lines = std::fs::read_to_string(setup.done_file()).expect("done file");
    assert!(
        done_lines.lines().any(|line| line == r#""exit" attempt=2"#),
        "{done_lines}"
    );
    assert_each_once("done file", &done_payloads(&setup.done_file()), &jobs);
    let list = queue_list(&setup.queue());
    assert_eq!(list["pending"], 0, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

#[test]
fn a_hung_coprocess_job_is_retried_at_its_lease_and_the_program_killed_at_stop() {
    let setup = Setup::new();
    let program = setup.program("faulty.py", FAULTY);
    let mut jobs = numbers(6);
    jobs.insert(0, r#""hang""#.to_string());
    setup.add(&jobs.iter().map(String::as_str).collect::<Vec<_>>());
    let done = setup.done_file().display().to_string();
    // A stop grace long enough for the coprocess consumer's own end of
    // the program: end of input, SIGTERM (ignored), SIGKILL.
    let mut herd = setup.herd_with(
        "python3",
        &format!("[{program:?}, {done:?}]"),
        "stop_grace = \"10s\"",
        1,
        2,
        // The retry waits 1 s: the consumer gives the job up at its lease
        // before the feeder serves it again.
        "lease = \"2s\"\nmax_attempts = 3\nretry_initial = \"1s\"\nretry_max = \"1s\"",
    );
    herd.start();
    let hanging = herd.wait_for("hanging on job ");
    let (id, deadline_ms) = hanging
        .rsplit_once("hanging on job ")
        .and_then(|(_, rest)| rest.trim().split_once(" deadline_ms "))
        .map(|(id, deadline)| (id.to_string(), deadline.parse::<i64>().expect("a deadline")))
        .expect("an id and a deadline");
    // Given up at the end of its lease (2 s), not before: one failed
    // attempt, a retry, every job done. (Measured against the deadline
    // the program was given, not against when its line was logged, which
    // a busy machine delays. The feeder's own lease may end a little
    // before that deadline.)
    let retried = herd.wait_for(", 1 failed, 1 retried, 0 dead");
    let early = (deadline_ms.rem_euclid(86_400_000) - log_millis(&retried)).rem_euclid(86_400_000);
    assert!(
        early <= 500 || early > 43_200_000,
        "retried {early} ms before the lease's end"
    );
    herd.wait_for(&format!(
        "queue: {} done, 1 failed, 1 retried, 0 dead, 0 in flight, 0 pending",
        jobs.len()
    ));
    // The consumer says so, unless the feeder's own lease (which ends a
    // little earlier) served the job again first.
    for line in herd.lines_with("no answer from the coprocess within its lease") {
        assert!(
            line.contains(&format!("job {id}: ")) && line.contains("warn"),
            "{line}"
        );
    }
    // The same program did the job again: it still runs, hung thread and
    // all (one hello: never restarted).
    assert_eq!(herd.lines_with("hello id=").len(), 1);
    let running: Vec<i32> = herd
        .marked_processes()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                let cmdline = String::from_utf8_lossy(&cmdline);
                let mut args = cmdline.split('\0');
                args.next().is_some_and(|arg0| arg0.ends_with("python3"))
                    && args.next().is_some_and(|arg1| arg1.ends_with("faulty.py"))
            })
        })
        .collect();
    assert_eq!(running.len(), 1, "the program runs: {running:?}");
    stop(&mut herd);
    // It did not exit at the end of its input, ignored SIGTERM, and was
    // killed.
    herd.wait_for("after the end of its input: SIGTERM");
    herd.wait_for("ignored SIGTERM: SIGKILL");
    let done_lines = std::fs::read_to_string(setup.done_file()).expect("done file");
    assert!(
        done_lines.lines().any(|line| line == r#""hang" attempt=2"#),
        "{done_lines}"
    );
    assert_each_once("done file", &done_payloads(&setup.done_file()), &jobs);
    let list = queue_list(&setup.queue());
    assert_eq!(list["pending"], 0, "{list}");
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(0), "{list}");
}

/// A coprocess in Python that answers each job from a thread of its own
/// after a while: 3.5 s on the first attempt (past a lease of 2 s), 0.5 s
/// on later ones. Well-behaved: one answer per job it got.
const SLOW: &str = r#"
import json, sys, threading, time

lock = threading.Lock()

def send(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
        sys.stderr.write("answered job %d attempt %d\n" % (message["id"], message["attempt"]))
        sys.stderr.flush()

def work(job):
    time.sleep(3.5 if job["attempt"] == 1 else 0.5)
    send({"type": "ok", "id": job["id"], "attempt": job["attempt"]})

sys.stdin.readline()
for line in sys.stdin:
    threading.Thread(target=work, args=(json.loads(line),)).start()
"#;

#[test]
fn a_late_answer_after_the_job_came_back_does_not_kill_the_program() {
    let setup = Setup::new();
    let program = setup.program("slow.py", SLOW);
    setup.add(&[r#""slow""#]);
    let mut herd = setup.herd_with(
        "python3",
        &format!("[{program:?}]"),
        "stop_grace = \"3s\"",
        1,
        2,
        "lease = \"2s\"\nmax_attempts = 3",
    );
    herd.start();
    // Attempt 1 overruns its lease and is served again, to the same
    // program; both attempts answer.
    herd.wait_for("answered job 1 attempt 1");
    herd.wait_for("answered job 1 attempt 2");
    herd.wait_for("queue: 1 done, 1 failed, 1 retried, 0 dead, 0 in flight, 0 pending");
    stop(&mut herd);
    assert!(
        herd.lines_with("broke the protocol").is_empty(),
        "a well-behaved program was killed:\n{}",
        herd.seen.join("\n")
    );
}

/// A shell coprocess that answers each job, and at the end of its input
/// writes a last `log` line, then notes whether that write worked.
const LAST_WORDS: &str = r#"
n=0
read -r hello
while read -r line; do
    id=${line#*\"id\":}; id=${id%%,*}
    attempt=${line#*\"attempt\":}; attempt=${attempt%%,*}
    n=$((n + 1))
    printf '{"type":"ok","id":%s,"attempt":%s}\n' "$id" "$attempt"
done
if printf '{"type":"log","message":"bye after %s jobs"}\n' "$n"; then
    echo "last words written" >&2
else
    echo "last words lost" >&2
fi
"#;

#[test]
fn a_coprocess_can_still_log_after_the_end_of_its_input() {
    let setup = Setup::new();
    let program = setup.program("last.sh", LAST_WORDS);
    setup.add(&["1", "2", "3"]);
    let mut herd = setup.herd_with(
        "sh",
        &format!("[{program:?}]"),
        "stop_grace = \"3s\"",
        1,
        1,
        "",
    );
    herd.start();
    herd.wait_for("3 done, 0 failed");
    stop(&mut herd);
    herd.wait_for("bye after 3 jobs");
    herd.wait_for("last words written");
    assert!(herd.lines_with("last words lost").is_empty());
    assert!(
        herd.lines_with("after the end of its input: SIGTERM")
            .is_empty(),
        "{}",
        herd.seen.join("\n")
    );
}
