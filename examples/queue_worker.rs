//! One program for both roles of a queue group (see `examples/queue.toml`).
//!
//! As the feeder it serves jobs numbered 1..=`jobs` (param, default 1000),
//! or, with the `file` param, the jobs of a durable file queue (add some
//! with `taskherd queue add FILE 1 2 3`). A dead-lettered job is printed
//! as `dead <n>: <reason>`.
//!
//! As a consumer it prints `done <n>` for each job it completes. Params:
//! - `fail_every = k`: every k-th job fails on its first attempt (and is
//!   retried);
//! - `always_fail = n`: job n fails on every attempt (and ends dead);
//! - `stall = n` with `stall_ms = t`: job n takes t ms on its first
//!   attempt (longer than the lease, to see it redelivered);
//! - `work_ms = t`: each job takes t ms;
//! - `pause_at = n` with `pause_ms = t`: job n asks the feeder to pause
//!   deliveries for t ms (the consumer side of the rate governor).
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/taskherd run examples/queue.toml
//! ```

use std::process::ExitCode;
use std::time::Duration;
use taskherd::queue::feeders::{FileFeeder, FileJob};
use taskherd::queue::{Feeder, Next};
use taskherd::retry::Outcome;
use taskherd::slave::{Handler, HandlerQueue, JobInfo};

#[derive(Debug, Clone, Default, serde::Deserialize)]
struct Params {
    jobs: Option<u64>,
    file: Option<String>,
    fail_every: Option<u64>,
    always_fail: Option<u64>,
    stall: Option<u64>,
    stall_ms: Option<u64>,
    work_ms: Option<u64>,
    pause_at: Option<u64>,
    pause_ms: Option<u64>,
}

/// Jobs 1..=last; dead jobs are printed.
struct Numbers {
    next: u64,
    last: u64,
}

impl Feeder for Numbers {
    type Job = u64;

    fn next(&mut self) -> Next<u64> {
        if self.next > self.last {
            return Next::Done;
        }
        self.next += 1;
        Next::Job(self.next - 1)
    }

    fn success(&mut self, _job: u64) {}

    fn error(&mut self, job: u64, reason: &str) {
        println!("dead {job}: {reason}");
    }
}

/// A durable file queue; dead jobs are printed too.
struct File(FileFeeder);

impl Feeder for File {
    type Job = FileJob;

    fn next(&mut self) -> Next<FileJob> {
        self.0.next()
    }

    fn success(&mut self, job: FileJob) {
        self.0.success(job);
    }

    fn error(&mut self, job: FileJob, reason: &str) {
        println!("dead {}: {reason}", job.payload());
        self.0.error(job, reason);
    }

    fn recheck(&self) -> Duration {
        self.0.recheck()
    }
}

fn consume(params: &Params, h: &Handler, job: u64, info: JobInfo) -> Outcome {
    if let Some(ms) = params.work_ms {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if params.stall == Some(job) && info.attempt == 1 {
        std::thread::sleep(Duration::from_millis(params.stall_ms.unwrap_or(0)));
    }
    if params.pause_at == Some(job) {
        info.feeder
            .pause(Duration::from_millis(params.pause_ms.unwrap_or(1000)));
    }
    if params.always_fail == Some(job) {
        return Outcome::Retry(None);
    }
    if let Some(k) = params.fail_every {
        if k > 0 && job % k == 0 && info.attempt == 1 {
            h.warning(format!("job {job} fails on its first attempt"));
            return Outcome::Retry(None);
        }
    }
    println!("done {job}");
    Outcome::Done
}

fn main() -> ExitCode {
    let queue = match HandlerQueue::from_env() {
        Ok(queue) => queue,
        Err(err) => {
            eprintln!("queue_worker: {err}");
            return ExitCode::from(2);
        }
    };
    let params: Params = match queue.handler().params_as() {
        Ok(params) => params,
        Err(err) => {
            eprintln!("queue_worker: {err}");
            return ExitCode::from(2);
        }
    };
    let consumer_params = params.clone();
    let consumer =
        move |h: &Handler, job: u64, info: JobInfo| consume(&consumer_params, h, job, info);
    match &params.file {
        // Only the feeder opens the file (it locks it); consumers get a
        // feeder they never use.
        Some(path) if queue.is_feeder() => match FileFeeder::open(path) {
            Ok(feeder) => queue.run_queue_with_info(consumer, File(feeder)),
            Err(err) => {
                eprintln!("queue_worker: cannot open the queue {path}: {err}");
                ExitCode::from(2)
            }
        },
        _ => {
            let feeder = Numbers {
                next: 1,
                last: params.jobs.unwrap_or(1000),
            };
            queue.run_queue_with_info(consumer, feeder)
        }
    }
}
