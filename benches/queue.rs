//! Job queue throughput and light-load latency on loopback (a benchmark,
//! not a test).
//!
//! Everything runs in one process on one multi-thread tokio runtime (one
//! worker per core): the feeder server ([`serve`]) on 127.0.0.1 and its
//! consumers, which are the real client users run ([`consume`]).
//!
//! 1. **Throughput.** A feeder serves `BENCH_JOBS` (default 400 000)
//!    no-op jobs (`u64`) to 4 consumers, each with concurrency 8 and 64
//!    credits, then 256 credits; the run function is `async {
//!    Outcome::Done }`. The time is taken from the spawn of the consumers
//!    (the server is already listening) until the feeder's `success` has
//!    been called for every job, so it includes the connections and
//!    handshakes. `BENCH_RUNS` (default 3) runs per setting: min, median,
//!    max.
//! 2. **Latency at light load.** One consumer, concurrency 1, 1 credit,
//!    so one job is in flight at a time; `BENCH_LATENCY_JOBS` (default
//!    5 000) jobs. Each job's round trip is the time from the feeder's
//!    `next` returning it to the feeder's `success` for it: the server
//!    core leases it and hands it to the connection task, which writes it
//!    on the socket; the consumer reads and deserializes it, spawns the
//!    job's task, joins it, and its writer task sends Ack + Credit; the
//!    server's connection task reads and decodes those and forwards them
//!    to the core, which calls `success`. Two loopback TCP hops and every
//!    task hand-off on both sides; no connection set-up.
//!
//! ```sh
//! cargo bench --bench queue
//! BENCH_JOBS=1000000 BENCH_RUNS=5 cargo bench --bench queue
//! ```
//!
//! Without the `--bench` flag that `cargo bench` passes (e.g. `cargo test
//! --all-targets`), it does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskherd::protocol::slave::QueueSettings;
use taskherd::queue::consumer::{consume, ConsumerOptions, ConsumerReport, JobInfo};
use taskherd::queue::{serve, Feeder, Next, ServeReport};
use taskherd::retry::{Outcome, RetryPolicy};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Jobs per throughput run unless `BENCH_JOBS` says otherwise.
const DEFAULT_JOBS: u64 = 400_000;

/// Throughput runs per setting unless `BENCH_RUNS` says otherwise.
const DEFAULT_RUNS: usize = 3;

/// Jobs of the latency run unless `BENCH_LATENCY_JOBS` says otherwise.
const DEFAULT_LATENCY_JOBS: u64 = 5_000;

/// Consumers of the throughput runs.
const CONSUMERS: usize = 4;

/// Jobs each consumer runs at once in the throughput runs.
const CONCURRENCY: u32 = 8;

/// Credit (prefetch) settings compared in the throughput runs.
const CREDITS: [u32; 2] = [64, 256];

/// Bound on one run (all jobs acked) and on the stop after it.
const RUN_WITHIN: Duration = Duration::from_secs(300);

/// The per-run secret of the bench's queue.
const SECRET: &str = "bench-secret";

/// Targets from the issue.
const TARGET_JOBS_PER_SEC: f64 = 100_000.0;
const TARGET_P50: Duration = Duration::from_micros(200);

/// Counts successes and wakes the bench when the last one comes.
struct Acked {
    count: AtomicU64,
    target: u64,
    all: Notify,
}

/// Jobs `0..total`; counts acks.
struct Counting {
    next: u64,
    total: u64,
    acked: Arc<Acked>,
}

impl Feeder for Counting {
    type Job = u64;

    fn next(&mut self) -> Next<u64> {
        if self.next >= self.total {
            return Next::Done;
        }
        self.next += 1;
        Next::Job(self.next - 1)
    }

    fn success(&mut self, _job: u64) {
        let count = self.acked.count.fetch_add(1, Ordering::Relaxed) + 1;
        if count == self.acked.target {
            // notify_one keeps a permit if the bench is not waiting yet.
            self.acked.all.notify_one();
        }
    }

    fn error(&mut self, job: u64, reason: &str) {
        panic!("job {job} dead-lettered: {reason}");
    }
}

/// Jobs `0..total`; records each one's round trip from `next` to
/// `success`.
struct Timing {
    next: u64,
    total: u64,
    handed: Vec<Option<Instant>>,
    round_trips: Arc<Mutex<Vec<Duration>>>,
}

impl Feeder for Timing {
    type Job = u64;

    fn next(&mut self) -> Next<u64> {
        if self.next >= self.total {
            return Next::Done;
        }
        let job = self.next;
        self.next += 1;
        self.handed[slot(job)] = Some(Instant::now());
        Next::Job(job)
    }

    fn success(&mut self, job: u64) {
        let now = Instant::now();
        if let Some(handed) = self.handed[slot(job)].take() {
            self.round_trips
                .lock()
                .expect("round trips lock")
                .push(now - handed);
        }
    }

    fn error(&mut self, job: u64, reason: &str) {
        panic!("job {job} dead-lettered: {reason}");
    }
}

fn slot(job: u64) -> usize {
    usize::try_from(job).expect("job number fits in usize")
}

fn settings() -> QueueSettings {
    QueueSettings {
        lease: Duration::from_secs(60),
        max_attempts: 3,
        retry: RetryPolicy::default(),
        rate: None,
        progress_every: Duration::ZERO,
        joblog: None,
    }
}

/// A feeder server for `feeder` on a fresh loopback port.
async fn start_server<F: Feeder>(
    feeder: F,
) -> (
    String,
    JoinHandle<Result<ServeReport, taskherd::queue::ServerError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address").to_string();
    let server = tokio::spawn(serve(
        listener,
        feeder,
        SECRET.to_string(),
        settings(),
        None,
        CancellationToken::new(),
    ));
    (addr, server)
}

/// A consumer whose jobs do nothing.
fn spawn_consumer(
    addr: &str,
    n: usize,
    options: ConsumerOptions,
    shutdown: &CancellationToken,
) -> JoinHandle<ConsumerReport> {
    let addr = addr.to_string();
    let name = format!("bench/{n}@127.0.0.1");
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        consume(
            &addr,
            SECRET,
            &name,
            options,
            |_job: u64, _info: JobInfo| async { Outcome::Done },
            shutdown,
        )
        .await
        .expect("the consumer ends without error")
    })
}

/// Waits for the server to finish (it drains the consumers once every job
/// is acked) and the consumers to stop; returns the jobs they acked.
async fn finish(
    server: JoinHandle<Result<ServeReport, taskherd::queue::ServerError>>,
    consumers: Vec<JoinHandle<ConsumerReport>>,
    shutdown: &CancellationToken,
) -> u64 {
    let report = tokio::time::timeout(RUN_WITHIN, server)
        .await
        .expect("the server finishes in time")
        .expect("the server task does not panic")
        .expect("the server runs");
    assert!(report.finished, "the queue is finished: {report:?}");
    // The server drained them; this is only a safety net.
    shutdown.cancel();
    let mut done = 0;
    for consumer in consumers {
        let report = tokio::time::timeout(RUN_WITHIN, consumer)
            .await
            .expect("the consumer stops in time")
            .expect("the consumer task does not panic");
        assert_eq!(report.lost, 0, "{report:?}");
        done += report.done;
    }
    done
}

/// One throughput run: the time until every job was acked.
async fn throughput_run(jobs: u64, credits: u32) -> Duration {
    let acked = Arc::new(Acked {
        count: AtomicU64::new(0),
        target: jobs,
        all: Notify::new(),
    });
    let feeder = Counting {
        next: 0,
        total: jobs,
        acked: Arc::clone(&acked),
    };
    let (addr, server) = start_server(feeder).await;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|n| {
            spawn_consumer(
                &addr,
                n,
                ConsumerOptions::new(CONCURRENCY, credits),
                &shutdown,
            )
        })
        .collect();
    tokio::time::timeout(RUN_WITHIN, acked.all.notified())
        .await
        .expect("every job acked in time");
    let elapsed = started.elapsed();
    let done = finish(server, consumers, &shutdown).await;
    assert_eq!(done, jobs, "consumers acked every job once");
    assert_eq!(acked.count.load(Ordering::Relaxed), jobs);
    elapsed
}

/// The latency run: every job's round trip, sorted.
async fn latency_run(jobs: u64) -> Vec<Duration> {
    let round_trips = Arc::new(Mutex::new(Vec::with_capacity(slot(jobs))));
    let feeder = Timing {
        next: 0,
        total: jobs,
        handed: vec![None; slot(jobs)],
        round_trips: Arc::clone(&round_trips),
    };
    let (addr, server) = start_server(feeder).await;
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, 0, ConsumerOptions::new(1, 1), &shutdown);
    let done = finish(server, vec![consumer], &shutdown).await;
    assert_eq!(done, jobs, "the consumer acked every job once");
    let mut round_trips = std::mem::take(&mut *round_trips.lock().expect("round trips lock"));
    assert_eq!(round_trips.len(), slot(jobs));
    round_trips.sort_unstable();
    round_trips
}

/// The `p`-th percentile (nearest rank) of sorted `values`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
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
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("queue: a benchmark; run it with `cargo bench --bench queue`");
        return;
    }
    let jobs: u64 = env_or("BENCH_JOBS", DEFAULT_JOBS);
    let runs: usize = env_or("BENCH_RUNS", DEFAULT_RUNS);
    let latency_jobs: u64 = env_or("BENCH_LATENCY_JOBS", DEFAULT_LATENCY_JOBS);
    assert!(
        jobs > 0 && runs > 0 && latency_jobs > 0,
        "counts must be positive"
    );
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a tokio runtime");

    println!(
        "queue bench: {workers} runtime workers, feeder and consumers in one process on 127.0.0.1"
    );
    println!();
    println!(
        "throughput: {jobs} no-op jobs, {CONSUMERS} consumers x concurrency {CONCURRENCY}, {runs} runs"
    );
    // Per credit setting: sorted jobs/s.
    let mut rates: Vec<(u32, Vec<f64>)> = Vec::new();
    for credits in CREDITS {
        let mut per_run = Vec::new();
        for run in 1..=runs {
            let elapsed = runtime.block_on(throughput_run(jobs, credits));
            let rate = jobs as f64 / elapsed.as_secs_f64();
            println!("  credits {credits:>3}, run {run}: {elapsed:>10.3?}  {rate:>9.0} jobs/s");
            per_run.push(rate);
        }
        per_run.sort_by(f64::total_cmp);
        rates.push((credits, per_run));
    }

    println!();
    println!(
        "latency: {latency_jobs} jobs, 1 consumer, concurrency 1, 1 credit (one job in flight)"
    );
    let round_trips = runtime.block_on(latency_run(latency_jobs));
    let (p50, p90, p99) = (
        percentile(&round_trips, 50.0),
        percentile(&round_trips, 90.0),
        percentile(&round_trips, 99.0),
    );
    let (min, max) = (round_trips[0], round_trips[round_trips.len() - 1]);

    println!();
    println!("| measure | min | median | max |");
    println!("| --- | ---: | ---: | ---: |");
    for (credits, per_run) in &rates {
        println!(
            "| jobs/s, 4 consumers x 8, {credits} credits | {:.0} | {:.0} | {:.0} |",
            per_run[0],
            per_run[per_run.len() / 2],
            per_run[per_run.len() - 1]
        );
    }
    println!();
    println!("| round trip (us) | min | p50 | p90 | p99 | max |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| feeder next -> feeder success | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
        micros(min),
        micros(p50),
        micros(p90),
        micros(p99),
        micros(max)
    );
    println!();
    println!(
        "round trip: from the feeder's next() handing the job to the server until the server \
         recorded the consumer's ack (feeder's success()): server core -> connection task -> \
         loopback TCP -> consumer read/decode -> job task -> writer task -> loopback TCP -> \
         connection task -> server core."
    );

    let (best_credits, best) = rates
        .iter()
        .max_by(|a, b| a.1[a.1.len() / 2].total_cmp(&b.1[b.1.len() / 2]))
        .expect("at least one credit setting");
    let best_median = best[best.len() / 2];
    println!();
    println!(
        "target >= {TARGET_JOBS_PER_SEC:.0} jobs/s: {} (best median {best_median:.0} jobs/s, {best_credits} credits)",
        met(best_median >= TARGET_JOBS_PER_SEC)
    );
    println!(
        "target p50 < {} us: {} (p50 {:.0} us)",
        TARGET_P50.as_micros(),
        met(p50 < TARGET_P50),
        micros(p50)
    );
}
