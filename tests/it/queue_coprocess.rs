//! Coprocess consumers (`[group.consumer] run = "coprocess"`): the real
//! binary starts a Python program once per consumer instance and speaks
//! JSON lines with it; jobs from the built-in file feeder.

use crate::support::{taskherd_bin, Herd, WAIT};
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
        Herd::new(&format!(
            r#"
[[group]]
name = "jobs"
command = "python3"
args = [{program:?}]
stop_grace = "3s"
restart = {{ policy = "on-failure", initial = "100ms" }}

[group.feeder]
file = "{file}"

[group.consumer]
run = "coprocess"

[group.queue]
retry_initial = "100ms"
retry_max = "200ms"
progress_every = "200ms"
{queue}

[group.local]
instances = 1
concurrency = 2
"#,
            program = self.dir.path().join("co.py").display().to_string(),
            file = self.queue().display(),
        ))
    }
}

/// `taskherd queue add` of each job (JSON texts).
fn queue_add(queue: &Path, jobs: &[&str]) {
    let out = Command::new(taskherd_bin())
        .args(["queue", "add"])
        .arg(queue)
        .args(jobs)
        .output()
        .expect("taskherd queue add");
    assert!(
        out.status.success(),
        "queue add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `taskherd queue list --json` (once the herd has stopped).
fn queue_list(queue: &Path) -> serde_json::Value {
    let out = Command::new(taskherd_bin())
        .args(["queue", "list", "--json"])
        .arg(queue)
        .output()
        .expect("taskherd queue list");
    assert!(
        out.status.success(),
        "queue list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
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
