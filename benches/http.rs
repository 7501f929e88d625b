//! The master's HTTP interface with the release binary (a benchmark, not
//! a test): enqueue throughput through the webhook into the durable file
//! queue, next to `taskherd queue add` run once per job (what a script
//! would do instead), and the cost of `/metrics` at 1 000 instances.
//!
//! Per run (`BENCH_RUNS`, default 3; median, min and max are reported):
//!
//! 1. **Enqueue.** `taskherd run` on a config with `[http]` (127.0.0.1, a
//!    free port, a token) and a queue group fed by the built-in file
//!    queue in a fresh temp dir (`TMPDIR`); the group is suspended first
//!    (`POST /v1/groups/jobs/suspend`), so that only the HTTP side and the
//!    inbox are measured, not the consumers. Then, timed:
//!    - batched: 4 keep-alive connections each post `BATCHES` bodies of
//!      1 000 jobs (`[{"n": 0}, ...]`), each answered 202 once durable;
//!    - single: 32 keep-alive connections each post one job per request
//!      (`SINGLES` requests each; concurrent requests share a sync);
//!    - `taskherd queue add FILE JOB` run `CLI_JOBS` times in a row.
//!
//!    Checked: every answer is 202 with its ids, and `taskherd queue list
//!    --json` counts every job (inbox and pending) once the herd stopped.
//! 2. **/metrics at 1 000 instances.** `taskherd run` with 1 000 local
//!    instances of `sleep`; once all run, `/metrics` is scraped 50 times
//!    in a row on one connection: the median time per scrape, its size,
//!    and the master's CPU time per scrape (from `/proc/<pid>/stat`).
//!
//! It prints `RESULT <key> <median> <min> <max> <runs>` lines for
//! `scripts/bench.sh`: `http_batched` and `http_single` (jobs/s),
//! `http_cli` (jobs/s of `queue add`), `http_metrics_ms`,
//! `http_metrics_cpu_ms`, `http_metrics_kb`.
//!
//! ```sh
//! cargo build --release --bins && cargo bench --bench http
//! BENCH_RUNS=1 cargo bench --bench http
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token";
/// Bodies of 1 000 jobs per connection, 4 connections.
const BATCHES: usize = 50;
const BATCH_JOBS: usize = 1000;
const BATCH_CONNECTIONS: usize = 4;
/// One-job requests per connection, 32 connections.
const SINGLES: usize = 250;
const SINGLE_CONNECTIONS: usize = 32;
/// `taskherd queue add` runs.
const CLI_JOBS: usize = 200;
/// Instances of the `/metrics` measurement.
const METRICS_INSTANCES: usize = 1000;
const SCRAPES: usize = 50;
/// Longest wait for any one step.
const STEP_WAIT: Duration = Duration::from_secs(300);

fn taskherd() -> PathBuf {
    if let Some(path) = std::env::var_os("BENCH_TASKHERD") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/release/deps/http-xxxx -> target/release/taskherd
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("taskherd"))
        .expect("target dir")
}

/// A running master, killed when dropped.
struct Master {
    child: Child,
    address: SocketAddr,
}

impl Master {
    fn start(config: &Path, dir: &Path) -> Master {
        let mut child = Command::new(taskherd())
            .arg("run")
            .arg(config)
            .env("XDG_RUNTIME_DIR", dir)
            .env("XDG_STATE_HOME", dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start taskherd (cargo build --release --bins first)");
        let stdout = child.stdout.take().expect("piped");
        let (address_tx, address_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end, so that the master never blocks on its log.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("http: listening on http://").nth(1) {
                    let address: Option<SocketAddr> =
                        rest.split('/').next().and_then(|a| a.parse().ok());
                    let _ = address_tx.send(address);
                }
            }
        });
        let address = address_rx
            .recv_timeout(STEP_WAIT)
            .ok()
            .flatten()
            .expect("the master's HTTP address");
        Master { child, address }
    }

    fn stop(mut self) {
        // SAFETY: plain kill(2) of our child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }

    /// The master's CPU time so far.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("stat");
        let rest = &stat[stat.rfind(')').expect("stat") + 2..];
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().expect("ticks"))
            .collect();
        Duration::from_millis((fields[0] + fields[1]) * 10)
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A keep-alive HTTP/1.1 connection.
struct Connection {
    reader: BufReader<TcpStream>,
    address: SocketAddr,
}

impl Connection {
    fn open(address: SocketAddr) -> Connection {
        let stream = TcpStream::connect(address).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream.set_read_timeout(Some(STEP_WAIT)).expect("timeout");
        Connection {
            reader: BufReader::new(stream),
            address,
        }
    }

    /// Sends a request; returns the status and body.
    fn call(&mut self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
            self.address,
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).expect("write");
        stream.write_all(body).expect("write");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header");
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((key, value)) = header.split_once(':') {
                if key.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("length");
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("body");
        (status, body)
    }
}

fn enqueue_config(dir: &Path) -> PathBuf {
    let config = dir.join("herd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[http]
bind = "127.0.0.1:0"
token = "{TOKEN}"
max_body = "64MiB"

[[group]]
name = "jobs"
command = "true"
[group.feeder]
file = "jobs.queue"
[group.consumer]
run = "exec"
[group.local]
instances = 1
"#
        ),
    )
    .expect("config");
    config
}

/// Posts `bodies` on `connections` connections at once; returns the jobs
/// accepted per second.
fn post_all(
    address: SocketAddr,
    connections: usize,
    bodies: usize,
    body: &[u8],
    jobs_per_body: usize,
) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let body = body.to_vec();
            std::thread::spawn(move || {
                let mut connection = Connection::open(address);
                for _ in 0..bodies {
                    let (status, answer) = connection.call("POST", "/v1/queues/jobs/jobs", &body);
                    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&answer));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("poster");
    }
    (connections * bodies * jobs_per_body) as f64 / started.elapsed().as_secs_f64()
}

struct Enqueue {
    batched: f64,
    single: f64,
    cli: f64,
}

fn enqueue_run() -> Enqueue {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = enqueue_config(dir.path());
    let master = Master::start(&config, dir.path());
    let mut control = Connection::open(master.address);
    let (status, body) = control.call("POST", "/v1/groups/jobs/suspend", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let jobs: Vec<String> = (0..BATCH_JOBS).map(|n| format!("{{\"n\": {n}}}")).collect();
    let batch = format!("[{}]", jobs.join(","));
    let batched = post_all(
        master.address,
        BATCH_CONNECTIONS,
        BATCHES,
        batch.as_bytes(),
        BATCH_JOBS,
    );
    let single = post_all(
        master.address,
        SINGLE_CONNECTIONS,
        SINGLES,
        b"{\"n\": 1}",
        1,
    );
    let queue = dir.path().join("jobs.queue");
    let started = Instant::now();
    for n in 0..CLI_JOBS {
        let status = Command::new(taskherd())
            .args(["queue", "add"])
            .arg(&queue)
            .arg(format!("{{\"n\": {n}}}"))
            .stdout(Stdio::null())
            .status()
            .expect("queue add");
        assert!(status.success());
    }
    let cli = CLI_JOBS as f64 / started.elapsed().as_secs_f64();
    master.stop();

    // Every job is there.
    let out = Command::new(taskherd())
        .args(["queue", "list", "--json"])
        .arg(&queue)
        .output()
        .expect("queue list");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("queue list --json");
    let held = report["pending"].as_u64().unwrap_or(0) + report["inbox"].as_u64().unwrap_or(0);
    let expected =
        BATCH_CONNECTIONS * BATCHES * BATCH_JOBS + SINGLE_CONNECTIONS * SINGLES + CLI_JOBS;
    assert_eq!(held, expected as u64, "jobs in the queue: {report}");
    Enqueue {
        batched,
        single,
        cli,
    }
}

struct Scrape {
    ms: f64,
    cpu_ms: f64,
    kb: f64,
}

fn metrics_run() -> Scrape {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("herd.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nbind = \"127.0.0.1:0\"\n\n[[group]]\nname = \"sleepers\"\ncommand = \"sleep\"\nargs = [\"3600\"]\n[group.local]\ninstances = {METRICS_INSTANCES}\n"
        ),
    )
    .expect("config");
    let master = Master::start(&config, dir.path());
    let mut connection = Connection::open(master.address);
    let deadline = Instant::now() + STEP_WAIT;
    let needle =
        format!("taskherd_instances{{group=\"sleepers\",state=\"running\"}} {METRICS_INSTANCES}\n");
    loop {
        let (status, body) = connection.call("GET", "/metrics", b"");
        assert_eq!(status, 200);
        if String::from_utf8_lossy(&body).contains(&needle) {
            break;
        }
        assert!(Instant::now() < deadline, "not every instance runs");
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = master.cpu();
    let mut times = Vec::with_capacity(SCRAPES);
    let mut bytes = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let (status, body) = connection.call("GET", "/metrics", b"");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200);
        bytes = body.len();
    }
    let cpu_ms = (master.cpu() - cpu).as_secs_f64() * 1000.0 / SCRAPES as f64;
    master.stop();
    Scrape {
        ms: median(&mut times),
        cpu_ms,
        kb: bytes as f64 / 1024.0,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn result(key: &str, values: &mut [f64]) {
    let runs = values.len();
    let med = median(values);
    println!(
        "RESULT {key} {med:.2} {:.2} {:.2} {runs}",
        values[0],
        values[runs - 1]
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs it without --bench: nothing to do.
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let tmp = std::env::temp_dir();
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&tmp)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "queues in {} ({fs}; a tmpfs makes fsync free)",
        tmp.display()
    );
    let (mut batched, mut single, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ms, mut cpu, mut kb) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let enqueue = enqueue_run();
        println!(
            "run {run}: enqueue {:.0} jobs/s batched ({BATCH_JOBS} a request), {:.0} jobs/s single \
             ({SINGLE_CONNECTIONS} connections), queue add {:.0} jobs/s",
            enqueue.batched, enqueue.single, enqueue.cli
        );
        batched.push(enqueue.batched);
        single.push(enqueue.single);
        cli.push(enqueue.cli);
        let scrape = metrics_run();
        println!(
            "run {run}: /metrics at {METRICS_INSTANCES} instances: {:.2} ms, {:.2} ms CPU, {:.0} KiB",
            scrape.ms, scrape.cpu_ms, scrape.kb
        );
        ms.push(scrape.ms);
        cpu.push(scrape.cpu_ms);
        kb.push(scrape.kb);
    }
    result("http_batched", &mut batched);
    result("http_single", &mut single);
    result("http_cli", &mut cli);
    result("http_metrics_ms", &mut ms);
    result("http_metrics_cpu_ms", &mut cpu);
    result("http_metrics_kb", &mut kb);
}
