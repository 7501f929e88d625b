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
//!   deliveries for t ms (the consumer side of the rate governor);
//! - `ids = true`: print `done <n> #<id> attempt <a>` (the job's id and
//!   attempt too);
//! - `done_file = "F"`: also append that line to F (it survives a master
//!   that dies before it relays the output);
//! - `pid_file = "F"`: the feeder writes its pid to F; with `poison = n`,
//!   a consumer running job n SIGKILLs that feeder (a job that crashes
//!   its feeder every time: it ends dead after `max_attempts`);
//! - `crash_on = n`: a consumer running job n SIGKILLs itself (a job
//!   that crashes its consumers every time), after printing `crash <n>`.
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/taskherd run examples/queue.toml
//! ```

use std::process::ExitCode;
use std::time::Duration;
use taskherd::queue::feeders::FileFeeder;
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
    ids: Option<bool>,
    pid_file: Option<String>,
    poison: Option<u64>,
    crash_on: Option<u64>,
    done_file: Option<String>,
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
    if params.crash_on == Some(job) {
        println!("crash {job}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        // Lets the line reach the master before the process dies.
        h.flush();
        // SAFETY: kill(2) of this very process; no memory involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    if params.poison == Some(job) {
        if let Some(pid) = params
            .pid_file
            .as_ref()
            .and_then(|file| std::fs::read_to_string(file).ok())
            .and_then(|text| text.trim().parse::<i32>().ok())
        {
            println!("poison {job}: killing the feeder {pid}");
            // SAFETY: kill(2) with a pid and a signal number; no memory involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        return Outcome::Retry(None);
    }
    if params.ids == Some(true) || params.done_file.is_some() {
        let line = format!("done {job} #{} attempt {}", info.id, info.attempt);
        if let Some(file) = &params.done_file {
            use std::io::Write as _;
            // One short write in append mode: lines of concurrent
            // consumers do not mix.
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
            if let Err(err) = appended {
                eprintln!("queue_worker: cannot append to {file}: {err}");
            }
        }
        println!("{line}");
    } else {
        println!("done {job}");
    }
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
            Ok(feeder) => {
                if let Some(file) = &params.pid_file {
                    if let Err(err) = std::fs::write(file, std::process::id().to_string()) {
                        eprintln!("queue_worker: cannot write {file}: {err}");
                    }
                }
                let feeder = feeder.with_dead_hook(|job, reason| {
                    println!("dead {}: {reason}", job.payload());
                });
                queue.run_queue_with_info(consumer, feeder)
            }
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
