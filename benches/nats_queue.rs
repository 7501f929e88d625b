//! Queue groups on NATS JetStream: no-op jobs with acks through a real
//! `nats-server -js` on loopback (a benchmark, not a test).
//!
//! Per run (`BENCH_RUNS`, default 3; median, min and max are reported),
//! for one node (file storage, R1) and for a 3-node cluster on loopback
//! (file storage, R3):
//!
//! 1. A fresh server (or cluster) with its own store dir under `TMPDIR`;
//!    the group's streams and durable consumer are created as the master
//!    does ([`taskherd::queue::nats::setup::ensure`]); `N` jobs (the JSON
//!    numbers `0..N`) are published with [`producer::add`] (not timed).
//! 2. The clock starts; 4 consumers with concurrency 8 and 64 credits
//!    (the real client, [`consume_from`] with a JetStream source, in this
//!    process) run them (no-op, done) until every job is acked; the clock
//!    stops when the last job's outcome is handed to the bridge, then
//!    the stream is checked empty (acks reached the server) before the
//!    next run.
//!
//! Checked: every job ran exactly once (by payload), the work stream holds
//! nothing afterwards, the dead stream nothing.
//!
//! Settings: `BENCH_NATS_JOBS` (default 100 000), `BENCH_RUNS`,
//! `BENCH_NATS_CLUSTER=0` skips the cluster. It prints `RESULT
//! <key> <median> <min> <max> <runs>` lines: `nats_r1`, `nats_r3`
//! (jobs/s). Without `nats-server` it says so and prints nothing else.
//!
//! ```sh
//! cargo bench --bench nats_queue
//! BENCH_NATS_JOBS=20000 BENCH_RUNS=1 cargo bench --bench nats_queue
//! ```

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taskherd::protocol::slave::{JetStreamQueue, NatsAuth, QueueSettings};
use taskherd::queue::consumer::{consume_from, ConsumerOptions, JobInfo, JobSource};
use taskherd::queue::nats::{self, producer, setup};
use taskherd::retry::{Outcome, RetryPolicy};
use tokio_util::sync::CancellationToken;

const CONSUMERS: usize = 4;
const CONCURRENCY: u32 = 8;
const CREDITS: u32 = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// nats-server processes, killed when dropped (and if the bench dies).
struct Servers {
    children: Vec<Child>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn answers(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO")
}

fn start_servers(bin: &Path, nodes: usize) -> Servers {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    let routes: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
    let mut children = Vec::new();
    for i in 0..nodes {
        let store = dir.path().join(format!("n{i}"));
        let mut config = format!(
            "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\n",
            ports[i],
            store.display().to_string()
        );
        if nodes > 1 {
            let all: Vec<String> = routes
                .iter()
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            config.push_str(&format!(
                "cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                routes[i],
                all.join(", ")
            ));
        }
        let file = dir.path().join(format!("n{i}.conf"));
        std::fs::write(&file, config).expect("write config");
        let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).expect("log");
        let parent = std::process::id();
        let mut command = Command::new(bin);
        command
            .arg("-c")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl and getppid are async-signal-safe; nothing else
        // runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::other("the bench is gone"));
                }
                Ok(())
            });
        }
        children.push(command.spawn().expect("start nats-server"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, port) in ports.iter().enumerate() {
        while !answers(*port) {
            assert!(Instant::now() < deadline, "nats-server n{i} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if nodes > 1 {
        // Wait for JetStream's meta leader.
        let logs: Vec<PathBuf> = (0..nodes)
            .map(|i| dir.path().join(format!("n{i}.log")))
            .collect();
        while !logs.iter().any(|log| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("new metadata leader")
        }) {
            assert!(Instant::now() < deadline, "no JetStream meta leader");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Servers {
        children,
        urls: ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect(),
        _dir: dir,
    }
}

fn queue(urls: &[String], replicas: usize, run: usize) -> JetStreamQueue {
    JetStreamQueue {
        servers: urls.to_vec(),
        auth: NatsAuth::None,
        tls_ca: None,
        stream: format!("BENCH{run}"),
        subject: format!("bench{run}.jobs"),
        consumer: "taskherd".into(),
        dead_stream: format!("BENCH{run}_DEAD"),
        dead_subject: format!("bench{run}.dead"),
        governor_subject: format!("bench{run}.governor"),
        settings: QueueSettings {
            lease: Duration::from_secs(30),
            max_attempts: 5,
            retry: RetryPolicy::exponential(Duration::from_secs(1), Duration::from_secs(60), 5),
            rate: None,
            progress_every: Duration::from_secs(10),
            joblog: None,
        },
        replicas,
        memory: false,
    }
}

/// One run: returns jobs/s.
async fn run_once(urls: &[String], replicas: usize, run: usize, jobs: u64) -> f64 {
    let queue = queue(urls, replicas, run);
    let client = nats::connect(&queue, "bench").await.expect("connect");
    // Retried: a fresh cluster may not take a stream at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match setup::ensure(&client, &queue).await {
            Ok(()) => break,
            Err(err) if Instant::now() < deadline => {
                eprintln!("setup: {err}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => panic!("setup: {err}"),
        }
    }
    let all: Vec<Box<serde_json::value::RawValue>> = (0..jobs)
        .map(|n| serde_json::value::RawValue::from_string(n.to_string()).expect("json"))
        .collect();
    for chunk in all.chunks(10_000) {
        producer::add(&client, &queue, chunk, None, None)
            .await
            .expect("publish");
    }
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..jobs).map(|_| AtomicU8::new(0)).collect());
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());
    let shutdown = CancellationToken::new();
    let source = JobSource::JetStream(Arc::new(queue.clone()));
    let started = Instant::now();
    let mut consumers = Vec::new();
    for i in 0..CONSUMERS {
        let (seen, done, finished) = (seen.clone(), done.clone(), finished.clone());
        let source = source.clone();
        let shutdown = shutdown.clone();
        consumers.push(tokio::spawn(async move {
            let run = move |job: u64, _info: JobInfo| {
                let (seen, done, finished) = (seen.clone(), done.clone(), finished.clone());
                async move {
                    if let Some(slot) = seen.get(job as usize) {
                        slot.fetch_add(1, Ordering::Relaxed);
                    }
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == jobs {
                        finished.notify_one();
                    }
                    Outcome::Done
                }
            };
            consume_from(
                &source,
                &format!("bench/{i}"),
                ConsumerOptions::new(CONCURRENCY, CREDITS),
                run,
                shutdown,
            )
            .await
        }));
    }
    tokio::time::timeout(Duration::from_secs(600), finished.notified())
        .await
        .expect("every job done within 600 s");
    let elapsed = started.elapsed();
    // Acks reach the server: the work stream empties.
    let js = async_nats::jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut stream = js.get_stream(&queue.stream).await.expect("stream");
        let left = stream.info().await.expect("info").state.messages;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} jobs left in the stream");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    for consumer in consumers {
        let report = consumer.await.expect("consumer task").expect("consumer");
        assert_eq!(report.dead, 0);
    }
    let twice = seen
        .iter()
        .filter(|n| n.load(Ordering::Relaxed) != 1)
        .count();
    assert_eq!(twice, 0, "jobs not run exactly once");
    jobs as f64 / elapsed.as_secs_f64()
}

fn report(key: &str, mut rates: Vec<f64>) {
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "RESULT {key} {median:.0} {:.0} {:.0} {}",
        rates[0],
        rates[rates.len() - 1],
        rates.len()
    );
}

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("nats_queue: a benchmark; run it with `cargo bench --bench nats_queue`");
        return;
    }
    let Some(bin) = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        println!("nats_queue: no nats-server installed: skipped");
        return;
    };
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let jobs: u64 = env_or("BENCH_NATS_JOBS", 100_000);
    let runs: usize = env_or("BENCH_RUNS", 3);
    let cluster = env_or("BENCH_NATS_CLUSTER", 1u8) != 0;
    println!(
        "nats queue bench: {version}, {jobs} no-op jobs, {CONSUMERS} consumers x {CONCURRENCY}, \
         {runs} runs, file storage under {}",
        std::env::temp_dir().display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut configs = vec![(1usize, "nats_r1")];
    if cluster {
        configs.push((3, "nats_r3"));
    }
    for (nodes, key) in configs {
        let mut rates = Vec::new();
        for run in 0..runs {
            let servers = start_servers(&bin, nodes);
            let rate = runtime.block_on(run_once(&servers.urls, nodes, run, jobs));
            println!("{key} run {}: {rate:.0} jobs/s", run + 1);
            rates.push(rate);
        }
        report(key, rates);
    }
}
