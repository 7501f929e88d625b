//! Durable queue throughput on the real disk, next to `beanstalkd -b DIR`
//! measured on the same machine in the same run (a benchmark, not a test).
//!
//! Everything of taskherd runs in one process on one multi-thread tokio
//! runtime (one worker per core, as `benches/queue.rs`): the feeder server
//! ([`serve`]) on 127.0.0.1 and its consumers, the real client users run
//! ([`consume`]). The queue is a [`FileFeeder`] journal in a fresh temp dir
//! (`TMPDIR`, else `/tmp`); the bench prints the file system it is on and
//! warns when that is a tmpfs, where `fsync` costs nothing.
//!
//! Per run (`BENCH_RUNS`, default 3; median, min and max are reported):
//!
//! 1. **taskherd.** `N` no-op jobs (the JSON numbers `0..N`) are added with
//!    one [`FileFeeder::push_all`] (one write, one sync: not timed in the
//!    rate). Then the clock starts: [`FileFeeder::open`], the server starts,
//!    4 consumers with concurrency 8 and 64 credits connect, the feeder
//!    takes the jobs from its inbox into its journal (in `open` or while it
//!    serves, as the feeder does it), and the clock stops at the first of
//!    the server's progress reports (every 5 ms) that counts every job
//!    acked (the server counts an ack as it hands it to the feeder's
//!    `success`; the sync of the feeder's last group commit after it is not
//!    timed). The feeder is given to the server as it is, not wrapped:
//!    a wrapper would have to pass on every method of [`Feeder`], the
//!    durable ones included, or measure another path. Checked: the
//!    consumers ran every job exactly once (by payload) and none was lost,
//!    the server counted `N` acks and nothing unfinished, and once it
//!    stopped, the journal opened again holds nothing pending, in flight or
//!    dead.
//! 2. **beanstalkd.** A fresh `beanstalkd -l 127.0.0.1 -p <free port> -b
//!    <temp dir>` (default fsync policy: at most every 50 ms), driven by a
//!    small text-protocol client here (tokio `TcpStream`, one command at a
//!    time per connection, as the usual client libraries do): 1 producer
//!    connection puts the same `N` jobs (timed on its own: `put` rate), then
//!    4 consumer connections, each `reserve` + `delete` in a loop, drain
//!    them; the clock runs from their spawn to the last `DELETED`. This
//!    drain is the figure compared with taskherd's (the same shape: the
//!    queue is loaded, then 4 consumers empty it). A second fresh server
//!    measures the producer and the 4 consumers running at the same time
//!    (spawn to the last `DELETED`), shown for reference. Checked: every
//!    job deleted exactly once, and the server's `stats` say `N` jobs were
//!    put, `N` deleted, none left ready, reserved or delayed.
//!    `BENCH_BEANSTALKD_F0=1` adds a drain run of `beanstalkd -b DIR -f 0`
//!    (fsync on every write, as taskherd's journal). The beanstalkd server
//!    is killed when its part ends, also on a panic (a guard), and gets
//!    SIGKILL if the bench itself dies (`PR_SET_PDEATHSIG`).
//!
//! Settings: `N` is `--jobs N` or `BENCH_DURABLE_JOBS` (default 200 000);
//! `BENCH_DURABLE_TIMEOUT` bounds each step in seconds (default 600);
//! `BENCH_BEANSTALKD` is the beanstalkd to run (default: `beanstalkd` on
//! the `PATH`; without one, that part is skipped with a note).
//!
//! It prints one `RESULT <key> <median> <min> <max> <runs>` line per
//! measurement for `scripts/bench.sh`: `durable_taskherd` (jobs/s),
//! `durable_taskherd_open_ms`, `durable_beanstalkd` (drain, jobs/s),
//! `durable_beanstalkd_put`, `durable_beanstalkd_concurrent` and
//! `durable_beanstalkd_f0` (jobs/s).
//!
//! ```sh
//! cargo bench --bench durable_queue
//! BENCH_DURABLE_JOBS=20000 BENCH_RUNS=1 cargo bench --bench durable_queue
//! cargo bench --bench durable_queue -- --jobs 1000000
//! ```
//!
//! Without the `--bench` flag that `cargo bench` passes (e.g. `cargo test
//! --all-targets`), it does nothing.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value;
use taskherd::protocol::slave::QueueProgress;
use taskherd::protocol::slave::QueueSettings;
use taskherd::queue::consumer::{consume, ConsumerOptions, ConsumerReport, JobInfo};
use taskherd::queue::feeders::FileFeeder;
use taskherd::queue::{serve, ServeReport, ServerError};
use taskherd::retry::{Outcome, RetryPolicy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Jobs per run unless `--jobs` or `BENCH_DURABLE_JOBS` says otherwise.
const DEFAULT_JOBS: u64 = 200_000;

/// Runs unless `BENCH_RUNS` says otherwise.
const DEFAULT_RUNS: usize = 3;

/// Bound on each step (push, open, drain, stop) unless
/// `BENCH_DURABLE_TIMEOUT` says otherwise, in seconds.
const DEFAULT_STEP_SECS: u64 = 600;

/// Consumers (taskherd) and consumer connections (beanstalkd).
const CONSUMERS: usize = 4;

/// Jobs each taskherd consumer runs at once.
const CONCURRENCY: u32 = 8;

/// Prefetch of each taskherd consumer.
const CREDITS: u32 = 64;

/// The per-run secret of the bench's queue.
const SECRET: &str = "bench-secret";

/// How often the feeder server reports its counts; a taskherd run ends at
/// the first report that counts every job acked.
const PROGRESS_EVERY: Duration = Duration::from_millis(5);

/// Bound on beanstalkd's start (accepting connections).
const BEANSTALKD_START_WITHIN: Duration = Duration::from_secs(10);

/// beanstalkd job priority, delay 0, and time to run (s) of every put.
const BEANSTALKD_PUT: &str = "put 1024 0 60";

/// Seconds a beanstalkd consumer waits in one reserve before it looks
/// whether the run is over.
const RESERVE_TIMEOUT_SECS: u32 = 1;

/// Targets from the issue.
const TARGET_JOBS_PER_SEC: f64 = 50_000.0;
const TARGET_RATIO: f64 = 3.0;

// ---- counting outcomes ------------------------------------------------------

/// The outcomes of one run, per job number: each job must end exactly once.
struct Tally {
    /// Outcomes so far (duplicates included).
    count: AtomicU64,
    /// Jobs of the run; `all` is notified when `count` reaches it.
    target: u64,
    /// Outcomes per job number `0..target`.
    per_job: Vec<AtomicU8>,
    /// Outcomes of a job already ended, or of a number not in the run.
    strays: AtomicU64,
    /// Woken when the last outcome came.
    all: Notify,
}

impl Tally {
    fn new(target: u64) -> Arc<Tally> {
        Arc::new(Tally {
            count: AtomicU64::new(0),
            target,
            per_job: (0..target).map(|_| AtomicU8::new(0)).collect(),
            strays: AtomicU64::new(0),
            all: Notify::new(),
        })
    }

    /// Job `job` (its payload, if it is a number) ended.
    fn record(&self, job: Option<u64>) {
        let slot = job
            .and_then(|job| usize::try_from(job).ok())
            .and_then(|job| self.per_job.get(job));
        match slot {
            Some(slot) if slot.fetch_add(1, Ordering::Relaxed) == 0 => {}
            _ => {
                self.strays.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            // notify_one keeps a permit if the bench is not waiting yet.
            self.all.notify_one();
        }
    }

    fn done(&self) -> bool {
        self.count.load(Ordering::Relaxed) >= self.target
    }

    /// Panics unless every job ended exactly once.
    fn check(&self, what: &str) {
        let missing = self
            .per_job
            .iter()
            .position(|n| n.load(Ordering::Relaxed) == 0);
        assert_eq!(
            self.count.load(Ordering::Relaxed),
            self.target,
            "{what}: outcomes counted"
        );
        assert_eq!(
            self.strays.load(Ordering::Relaxed),
            0,
            "{what}: a job ended twice (or a stray)"
        );
        assert_eq!(missing, None, "{what}: a job never ended");
    }
}

// ---- taskherd ------------------------------------------------------------------

fn settings() -> QueueSettings {
    QueueSettings {
        lease: Duration::from_secs(60),
        max_attempts: 3,
        retry: RetryPolicy::default(),
        rate: None,
        progress_every: PROGRESS_EVERY,
        joblog: None,
    }
}

/// What one taskherd run measured.
struct TaskherdRun {
    /// `FileFeeder::push_all` of every job (one write, one sync).
    push: Duration,
    /// `FileFeeder::open` (taskherd 0.1's takes the inbox into the journal
    /// there).
    open: Duration,
    /// From the open's return to the last ack.
    serve: Duration,
}

impl TaskherdRun {
    /// Open to the last ack.
    fn total(&self) -> Duration {
        self.open + self.serve
    }
}

/// Runs `work` on a thread of its own and waits at most `within` for it
/// (a blocking call cannot be cancelled: on time-out the bench panics, and
/// the process ends with it).
fn bounded<T: Send + 'static>(
    what: &str,
    within: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(work());
    });
    match done_rx.recv_timeout(within) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: not done within {within:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// A consumer whose jobs do nothing but count themselves.
fn spawn_consumer(
    addr: &str,
    n: usize,
    tally: &Arc<Tally>,
    shutdown: &CancellationToken,
) -> JoinHandle<ConsumerReport> {
    let addr = addr.to_string();
    let name = format!("bench/{n}@127.0.0.1");
    let shutdown = shutdown.clone();
    let tally = Arc::clone(tally);
    tokio::spawn(async move {
        consume(
            &addr,
            SECRET,
            &name,
            ConsumerOptions::new(CONCURRENCY, CREDITS),
            move |job: u64, _info: JobInfo| {
                tally.record(Some(job));
                async { Outcome::Done }
            },
            shutdown,
        )
        .await
        .expect("the consumer ends without error")
    })
}

/// Serves `feeder` to the consumers until the server counted every job
/// acked; returns the time that took, then stops the server and the
/// consumers.
async fn serve_all(feeder: FileFeeder, tally: Arc<Tally>, within: Duration) -> Duration {
    let jobs = tally.target;
    let started = Instant::now();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address").to_string();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<QueueProgress>(1024);
    let server_stop = CancellationToken::new();
    let server: JoinHandle<Result<ServeReport, ServerError>> = tokio::spawn(serve(
        listener,
        feeder,
        SECRET.to_string(),
        settings(),
        Some(progress_tx),
        server_stop.clone(),
    ));
    let consumers_stop = CancellationToken::new();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|n| spawn_consumer(&addr, n, &tally, &consumers_stop))
        .collect();
    let mut acked = 0;
    let all_acked = async {
        while let Some(progress) = progress_rx.recv().await {
            acked = progress.done;
            if acked >= jobs {
                return;
            }
        }
        panic!("taskherd: the server ended after {acked} of {jobs} acks");
    };
    if tokio::time::timeout(within, all_acked).await.is_err() {
        panic!(
            "taskherd: {acked} of {jobs} jobs acked ({} run) within {within:?}",
            tally.count.load(Ordering::Relaxed)
        );
    }
    let elapsed = started.elapsed();
    // Reports after this one would wait for room: none are read any more.
    drop(progress_rx);

    // A file feeder never says Done: stop the server, which drains the
    // consumers (they hold nothing any more).
    server_stop.cancel();
    let report = tokio::time::timeout(within, server)
        .await
        .expect("the server stops in time")
        .expect("the server task does not panic")
        .expect("the server runs");
    assert_eq!(report.unfinished, 0, "nothing left unfinished: {report:?}");
    assert_eq!(
        report.progress.done, jobs,
        "the server counted every ack: {report:?}"
    );
    consumers_stop.cancel();
    let mut done = 0;
    for consumer in consumers {
        let report = tokio::time::timeout(within, consumer)
            .await
            .expect("the consumer stops in time")
            .expect("the consumer task does not panic");
        assert_eq!(report.lost, 0, "{report:?}");
        done += report.done;
    }
    assert_eq!(done, jobs, "the consumers ran every job once");
    elapsed
}

fn taskherd_run(runtime: &Runtime, jobs: u64, within: Duration) -> TaskherdRun {
    let dir = tempfile::Builder::new()
        .prefix("durable-queue.")
        .tempdir()
        .expect("a temp dir for the journal");
    let path = dir.path().join("jobs.queue");

    let path_push = path.clone();
    let started = Instant::now();
    let pushed = bounded("FileFeeder::push_all", within, move || {
        FileFeeder::push_all(&path_push, (0..jobs).map(Value::from)).expect("push the jobs")
    });
    let push = started.elapsed();
    assert_eq!(pushed as u64, jobs, "push_all took every job");

    let path_open = path.clone();
    let started = Instant::now();
    let feeder = bounded("FileFeeder::open", within, move || {
        FileFeeder::open(&path_open).expect("open the queue")
    });
    let open = started.elapsed();

    let tally = Tally::new(jobs);
    let serve = runtime.block_on(serve_all(feeder, Arc::clone(&tally), within));
    tally.check("taskherd");

    // Durable: the journal, opened again, holds nothing.
    let report = bounded("FileFeeder::open again", within, move || {
        FileFeeder::open(&path)
            .expect("open the queue again")
            .report()
            .expect("the queue's report")
    });
    assert_eq!(
        (report.pending, report.in_flight, report.dead.len()),
        (0, 0, 0),
        "the journal holds nothing after every ack"
    );
    TaskherdRun { push, open, serve }
}

// ---- beanstalkd ---------------------------------------------------------------

/// A beanstalkd server of the bench, killed when dropped.
struct Beanstalkd {
    /// The server process.
    child: Child,
    /// Where it listens.
    addr: SocketAddr,
    /// Its binlog directory, removed after the server.
    _binlog: tempfile::TempDir,
}

impl Beanstalkd {
    /// Starts `exe` on a free loopback port with a fresh binlog directory
    /// (`-f 0`, fsync on every write, if `fsync_always`) and waits until it
    /// accepts connections. Call it from the main thread: the server gets
    /// SIGKILL when the thread that started it ends.
    fn start(exe: &Path, fsync_always: bool) -> Beanstalkd {
        let binlog = tempfile::Builder::new()
            .prefix("beanstalkd-binlog.")
            .tempdir()
            .expect("a temp dir for beanstalkd's binlog");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port")
            .port();
        let mut command = Command::new(exe);
        command
            .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-b"])
            .arg(binlog.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if fsync_always {
            command.args(["-f", "0"]);
        }
        let parent = std::process::id();
        // SAFETY: the closure only calls async-signal-safe functions (prctl,
        // getppid) and allocates nothing.
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
                // The bench may have died between fork and prctl.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::other("the bench exited during spawn"));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", exe.display()));
        let mut server = Beanstalkd {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _binlog: binlog,
        };
        let deadline = Instant::now() + BEANSTALKD_START_WITHIN;
        loop {
            if StdTcpStream::connect_timeout(&server.addr, Duration::from_millis(200)).is_ok() {
                return server;
            }
            if let Some(status) = server.child.try_wait().expect("beanstalkd's status") {
                panic!("beanstalkd exited at start: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "beanstalkd not listening on {} within {BEANSTALKD_START_WITHIN:?}",
                server.addr
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Beanstalkd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A beanstalkd text-protocol client: one command at a time.
struct BeanstalkClient {
    /// The connection; writes go through the buffer untouched.
    stream: BufReader<TcpStream>,
    /// The last reply line.
    line: String,
    /// The command being written.
    out: Vec<u8>,
}

fn protocol_error(command: &str, reply: &str) -> std::io::Error {
    std::io::Error::other(format!("beanstalkd: {command}: unexpected reply {reply:?}"))
}

impl BeanstalkClient {
    async fn connect(addr: SocketAddr) -> std::io::Result<BeanstalkClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(BeanstalkClient {
            stream: BufReader::new(stream),
            line: String::new(),
            out: Vec::new(),
        })
    }

    /// Sends `self.out` and reads the reply line (without its CRLF).
    async fn command(&mut self) -> std::io::Result<&str> {
        self.stream.write_all(&self.out).await?;
        self.line.clear();
        if self.stream.read_line(&mut self.line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(self.line.trim_end_matches("\r\n"))
    }

    /// Reads a body of `len` bytes and its CRLF.
    async fn body(&mut self, len: usize) -> std::io::Result<Vec<u8>> {
        let mut body = vec![0; len + 2];
        self.stream.read_exact(&mut body).await?;
        if !body.ends_with(b"\r\n") {
            return Err(std::io::Error::other("beanstalkd: a body without CRLF"));
        }
        body.truncate(len);
        Ok(body)
    }

    /// `put`; returns the job's id.
    async fn put(&mut self, body: &[u8]) -> std::io::Result<u64> {
        self.out.clear();
        write!(self.out, "{BEANSTALKD_PUT} {}\r\n", body.len())?;
        self.out.extend_from_slice(body);
        self.out.extend_from_slice(b"\r\n");
        let reply = self.command().await?;
        reply
            .strip_prefix("INSERTED ")
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| protocol_error("put", reply))
    }

    /// `reserve-with-timeout`; `None` when it timed out.
    async fn reserve(&mut self, timeout_secs: u32) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        self.out.clear();
        write!(self.out, "reserve-with-timeout {timeout_secs}\r\n")?;
        let reply = self.command().await?;
        if reply == "TIMED_OUT" {
            return Ok(None);
        }
        let parsed = reply.strip_prefix("RESERVED ").and_then(|rest| {
            let (id, len) = rest.split_once(' ')?;
            Some((id.parse::<u64>().ok()?, len.parse::<usize>().ok()?))
        });
        let (id, len) = parsed.ok_or_else(|| protocol_error("reserve", reply))?;
        Ok(Some((id, self.body(len).await?)))
    }

    async fn delete(&mut self, id: u64) -> std::io::Result<()> {
        self.out.clear();
        write!(self.out, "delete {id}\r\n")?;
        let reply = self.command().await?;
        if reply == "DELETED" {
            Ok(())
        } else {
            Err(protocol_error("delete", reply))
        }
    }

    /// `stats`: the server's counters.
    async fn stats(&mut self) -> std::io::Result<Vec<(String, String)>> {
        self.out.clear();
        self.out.extend_from_slice(b"stats\r\n");
        let reply = self.command().await?;
        let len = reply
            .strip_prefix("OK ")
            .and_then(|len| len.parse().ok())
            .ok_or_else(|| protocol_error("stats", reply))?;
        let body = self.body(len).await?;
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|line| line.split_once(": "))
            .map(|(key, value)| (key.to_string(), value.trim().to_string()))
            .collect())
    }
}

/// Puts the jobs `0..jobs` (their decimal numbers) on one connection.
async fn put_all(addr: SocketAddr, jobs: u64) {
    let mut client = BeanstalkClient::connect(addr)
        .await
        .expect("connect to beanstalkd");
    for job in 0..jobs {
        client
            .put(job.to_string().as_bytes())
            .await
            .expect("put a job");
    }
}

/// One consumer connection: reserve, delete, count; until every job of
/// the run ended.
async fn drain(addr: SocketAddr, tally: Arc<Tally>) {
    let mut client = BeanstalkClient::connect(addr)
        .await
        .expect("connect to beanstalkd");
    while !tally.done() {
        let Some((id, body)) = client
            .reserve(RESERVE_TIMEOUT_SECS)
            .await
            .expect("reserve a job")
        else {
            continue;
        };
        client.delete(id).await.expect("delete a job");
        let number = std::str::from_utf8(&body).ok().and_then(|s| s.parse().ok());
        tally.record(number);
    }
}

/// How the beanstalkd producer and consumers run.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// The producer puts every job, then the consumers drain them.
    PutThenDrain,
    /// The producer and the consumers at the same time.
    Concurrent,
}

/// What one beanstalkd run measured.
struct BeanstalkdRun {
    /// The puts alone ([`Shape::PutThenDrain`] only).
    put: Option<Duration>,
    /// The consumers' drain, or everything for [`Shape::Concurrent`].
    drain: Duration,
}

async fn beanstalkd_jobs(
    addr: SocketAddr,
    jobs: u64,
    shape: Shape,
    within: Duration,
) -> BeanstalkdRun {
    let tally = Tally::new(jobs);
    let mut put = None;
    let started = Instant::now();
    let producer = tokio::spawn(put_all(addr, jobs));
    if shape == Shape::PutThenDrain {
        tokio::time::timeout(within, producer)
            .await
            .expect("every job put in time")
            .expect("the producer does not panic");
        put = Some(started.elapsed());
    }
    let started_drain = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| tokio::spawn(drain(addr, Arc::clone(&tally))))
        .collect();
    tokio::time::timeout(within, tally.all.notified())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "beanstalkd: {} of {jobs} jobs deleted within {within:?}",
                tally.count.load(Ordering::Relaxed)
            )
        });
    let drain = match shape {
        Shape::PutThenDrain => started_drain.elapsed(),
        Shape::Concurrent => started.elapsed(),
    };
    for consumer in consumers {
        tokio::time::timeout(within, consumer)
            .await
            .expect("the consumer stops in time")
            .expect("the consumer does not panic");
    }
    tally.check("beanstalkd");

    // The server's own count: N put, N deleted, nothing left.
    let mut client = BeanstalkClient::connect(addr)
        .await
        .expect("connect to beanstalkd");
    assert!(
        client.reserve(0).await.expect("reserve").is_none(),
        "beanstalkd: a job left after the run"
    );
    let stats = client.stats().await.expect("beanstalkd's stats");
    let stat = |key: &str| -> u64 {
        stats
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("beanstalkd's stats have no {key}: {stats:?}"))
    };
    assert_eq!(stat("total-jobs"), jobs, "beanstalkd: jobs put");
    assert_eq!(stat("cmd-delete"), jobs, "beanstalkd: jobs deleted");
    for key in [
        "current-jobs-ready",
        "current-jobs-reserved",
        "current-jobs-delayed",
    ] {
        assert_eq!(stat(key), 0, "beanstalkd: {key}");
    }
    BeanstalkdRun { put, drain }
}

/// One beanstalkd run on a fresh server.
fn beanstalkd_run(
    runtime: &Runtime,
    exe: &Path,
    jobs: u64,
    shape: Shape,
    fsync_always: bool,
    within: Duration,
) -> BeanstalkdRun {
    let server = Beanstalkd::start(exe, fsync_always);
    let run = runtime.block_on(beanstalkd_jobs(server.addr, jobs, shape, within));
    drop(server);
    run
}

/// The beanstalkd to run: `BENCH_BEANSTALKD`, else `beanstalkd` on the
/// `PATH`.
fn find_beanstalkd() -> Option<PathBuf> {
    if let Some(exe) = std::env::var_os("BENCH_BEANSTALKD") {
        let exe = PathBuf::from(exe);
        assert!(
            exe.is_file(),
            "BENCH_BEANSTALKD={}: no such file",
            exe.display()
        );
        return Some(exe);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("beanstalkd"))
        .find(|exe| exe.is_file())
}

// ---- report ---------------------------------------------------------------------

/// The file system of `dir`, as `df -PT` tells it: (device, type, mount).
fn file_system(dir: &Path) -> Option<(String, String, String)> {
    let output = Command::new("df").arg("-PT").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<&str> = text.lines().nth(1)?.split_whitespace().collect();
    Some((
        fields.first()?.to_string(),
        fields.get(1)?.to_string(),
        fields.last()?.to_string(),
    ))
}

/// Sorted values with their summary.
struct Summary {
    values: Vec<f64>,
}

impl Summary {
    fn new(mut values: Vec<f64>) -> Summary {
        values.sort_by(f64::total_cmp);
        Summary { values }
    }

    fn median(&self) -> f64 {
        let n = self.values.len();
        if n % 2 == 1 {
            self.values[n / 2]
        } else {
            (self.values[n / 2 - 1] + self.values[n / 2]) / 2.0
        }
    }

    fn min(&self) -> f64 {
        self.values[0]
    }

    fn max(&self) -> f64 {
        self.values[self.values.len() - 1]
    }

    fn row(&self, label: &str) {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} |",
            self.min(),
            self.median(),
            self.max()
        );
    }

    fn result(&self, key: &str) {
        println!(
            "RESULT {key} {:.1} {:.1} {:.1} {}",
            self.median(),
            self.min(),
            self.max(),
            self.values.len()
        );
    }
}

fn rate(jobs: u64, elapsed: Duration) -> f64 {
    jobs as f64 / elapsed.as_secs_f64()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "NOT met"
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|arg| arg == "--bench") {
        println!("durable_queue: a benchmark; run it with `cargo bench --bench durable_queue`");
        return;
    }
    let jobs: u64 = match args.iter().position(|arg| arg == "--jobs") {
        Some(i) => args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .expect("--jobs N: a number of jobs"),
        None => env_or("BENCH_DURABLE_JOBS", DEFAULT_JOBS),
    };
    let runs: usize = env_or("BENCH_RUNS", DEFAULT_RUNS);
    let within = Duration::from_secs(env_or("BENCH_DURABLE_TIMEOUT", DEFAULT_STEP_SECS));
    let f0 = std::env::var_os("BENCH_BEANSTALKD_F0").is_some_and(|v| !v.is_empty() && v != "0");
    assert!(jobs > 0 && runs > 0, "counts must be positive");
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let beanstalkd = find_beanstalkd();

    let tmp = std::env::temp_dir();
    println!(
        "durable queue bench: {jobs} no-op jobs, {CONSUMERS} consumers, {runs} runs; \
         {workers} runtime workers, taskherd's feeder and consumers in one process on 127.0.0.1"
    );
    match file_system(&tmp) {
        Some((device, kind, mount)) => {
            println!(
                "journals and binlogs under {}: {device} ({kind}) mounted on {mount}{}",
                tmp.display(),
                if kind == "tmpfs" { "" } else { ", not a tmpfs" }
            );
            if kind == "tmpfs" {
                println!("WARNING: a tmpfs: fsync costs nothing there; these are not disk figures");
            }
        }
        None => println!(
            "journals and binlogs under {}: file system unknown (df failed)",
            tmp.display()
        ),
    }
    match &beanstalkd {
        Some(exe) => {
            let version = Command::new(exe)
                .arg("-v")
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
                .unwrap_or_default();
            println!("beanstalkd: {} ({version})", exe.display());
        }
        None => println!(
            "beanstalkd: not found (apt-get install beanstalkd, or BENCH_BEANSTALKD=/path); \
             its part is skipped"
        ),
    }

    let mut th_rates = Vec::new();
    let mut th_open_ms = Vec::new();
    let mut bs_drain = Vec::new();
    let mut bs_put = Vec::new();
    let mut bs_concurrent = Vec::new();
    let mut bs_f0 = Vec::new();
    for run in 1..=runs {
        println!();
        let th = taskherd_run(&runtime, jobs, within);
        let th_rate = rate(jobs, th.total());
        println!(
            "run {run}: taskherd: push_all {:.3?} (not counted); open {:.3?} + serve to the last ack {:.3?} \
             = {:.3?} = {th_rate:.0} jobs/s",
            th.push,
            th.open,
            th.serve,
            th.total()
        );
        th_rates.push(th_rate);
        th_open_ms.push(th.open.as_secs_f64() * 1000.0);
        let Some(exe) = &beanstalkd else { continue };

        let bs = beanstalkd_run(&runtime, exe, jobs, Shape::PutThenDrain, false, within);
        let put = bs.put.expect("measured in this shape");
        println!(
            "run {run}: beanstalkd -b: 1 producer put {:.3?} ({:.0} jobs/s), then {CONSUMERS} consumers \
             reserve+delete {:.3?} = {:.0} jobs/s",
            put,
            rate(jobs, put),
            bs.drain,
            rate(jobs, bs.drain)
        );
        bs_put.push(rate(jobs, put));
        bs_drain.push(rate(jobs, bs.drain));

        let bs = beanstalkd_run(&runtime, exe, jobs, Shape::Concurrent, false, within);
        println!(
            "run {run}: beanstalkd -b: 1 producer and {CONSUMERS} consumers at once, to the last delete {:.3?} \
             = {:.0} jobs/s",
            bs.drain,
            rate(jobs, bs.drain)
        );
        bs_concurrent.push(rate(jobs, bs.drain));

        if f0 {
            let bs = beanstalkd_run(&runtime, exe, jobs, Shape::PutThenDrain, true, within);
            println!(
                "run {run}: beanstalkd -b -f 0: {CONSUMERS} consumers reserve+delete {:.3?} = {:.0} jobs/s",
                bs.drain,
                rate(jobs, bs.drain)
            );
            bs_f0.push(rate(jobs, bs.drain));
        }
    }

    let th_rates = Summary::new(th_rates);
    let th_open_ms = Summary::new(th_open_ms);
    println!();
    println!("| jobs/s ({jobs} jobs, {runs} runs) | min | median | max |");
    println!("| --- | ---: | ---: | ---: |");
    th_rates.row("taskherd FileFeeder: open -> 4 consumers x 8 -> last ack");
    let bs_summaries = (!bs_drain.is_empty()).then(|| {
        (
            Summary::new(bs_drain),
            Summary::new(bs_put),
            Summary::new(bs_concurrent),
        )
    });
    if let Some((drain, put, concurrent)) = &bs_summaries {
        drain.row("beanstalkd -b: 4 consumers reserve+delete (jobs put before)");
        put.row("beanstalkd -b: 1 producer put");
        concurrent.row("beanstalkd -b: 1 producer + 4 consumers at once");
    }
    let bs_f0 = (!bs_f0.is_empty()).then(|| Summary::new(bs_f0));
    if let Some(f0) = &bs_f0 {
        f0.row("beanstalkd -b -f 0: 4 consumers reserve+delete");
    }
    println!();
    println!(
        "taskherd's FileFeeder::open of the {jobs}-job queue (included above): median {:.0} ms",
        th_open_ms.median()
    );
    println!();
    println!(
        "target >= {TARGET_JOBS_PER_SEC:.0} jobs/s: {} (median {:.0} jobs/s)",
        met(th_rates.median() >= TARGET_JOBS_PER_SEC),
        th_rates.median()
    );
    if let Some((drain, _, _)) = &bs_summaries {
        let ratio = th_rates.median() / drain.median();
        println!(
            "target >= {TARGET_RATIO:.0}x beanstalkd -b: {} ({ratio:.2}x)",
            met(ratio >= TARGET_RATIO)
        );
    }
    println!();
    th_rates.result("durable_taskherd");
    th_open_ms.result("durable_taskherd_open_ms");
    if let Some((drain, put, concurrent)) = &bs_summaries {
        drain.result("durable_beanstalkd");
        put.result("durable_beanstalkd_put");
        concurrent.result("durable_beanstalkd_concurrent");
    }
    if let Some(f0) = &bs_f0 {
        f0.result("durable_beanstalkd_f0");
    }
}
