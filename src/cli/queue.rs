//! `taskherd queue add|list|requeue-dead|compact`: the durable file queue
//! (and a JSON-lines feeder's queue) from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use crate::count_text;

#[derive(Debug, Subcommand)]
pub(crate) enum QueueCommand {
    /// Add jobs to a queue file (also while a feeder serves it), or to a
    /// queue group's JetStream queue.
    Add {
        /// The queue file (created if needed); with --config, a queue
        /// group on JetStream; or nats://SERVER/GROUP.
        file: PathBuf,
        /// The config whose queue group FILE names (`backend = "nats"`).
        #[arg(short, long, value_name = "CONFIG")]
        config: Option<PathBuf>,
        /// The jobs, one JSON value each (quote strings: '"text"'); `-`
        /// reads one JSON value per line from stdin.
        #[arg(required = true, allow_hyphen_values = true)]
        jobs: Vec<String>,
        /// Options for every job of this call (each goes in as an envelope
        /// `{"job": ..., "options": ...}`).
        #[command(flatten)]
        options: JobOptionArgs,
    },
    /// Count pending, waiting (inbox) and dead jobs, and list the dead
    /// ones with their reasons (also while a feeder serves the queue).
    List {
        /// The queue file; with --config, a queue group on JetStream; or
        /// nats://SERVER/GROUP.
        file: PathBuf,
        /// The config whose queue group FILE names (`backend = "nats"`).
        #[arg(short, long, value_name = "CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// List the pending jobs too (id, attempts, job), in serving order.
        #[arg(long)]
        jobs: bool,
    },
    /// Put every dead job back in the queue.
    RequeueDead {
        /// The queue file; with --config, a queue group on JetStream; or
        /// nats://SERVER/GROUP.
        file: PathBuf,
        /// The config whose queue group FILE names (`backend = "nats"`).
        #[arg(short, long, value_name = "CONFIG")]
        config: Option<PathBuf>,
    },
    /// Take the inbox in and rewrite the journal as a snapshot (no feeder
    /// may serve the queue meanwhile); prints its size per pending job.
    Compact {
        /// The queue file.
        file: PathBuf,
    },
}

pub(crate) fn run(command: QueueCommand) -> anyhow::Result<ExitCode> {
    use taskherd::queue::feeders::{FileFeeder, JsonlFeeder};
    if let Some(queue) = jetstream_target(&command)? {
        return jetstream::run(command, &queue);
    }
    use taskherd::queue::local::LocalQueueError;

    let open = |path: &std::path::Path| {
        if !FileFeeder::exists(path) {
            anyhow::bail!("{}: no such queue", path.display());
        }
        FileFeeder::open(path).map_err(|err| match err {
            LocalQueueError::Locked { .. } => {
                anyhow::anyhow!("{} is in use by a running feeder", path.display())
            }
            err => anyhow::Error::new(err).context(format!("cannot open {}", path.display())),
        })
    };
    // A JSON-lines feeder's queue: its state journal (`jobs.jsonl.state`),
    // or the file itself once it has one.
    let jsonl_of = |path: &std::path::Path| {
        JsonlFeeder::file_of_state(path).or_else(|| {
            (path.is_file() && FileFeeder::exists(JsonlFeeder::state_path(path)))
                .then(|| path.to_path_buf())
        })
    };
    let open_jsonl = |file: &std::path::Path| {
        JsonlFeeder::open(file).map_err(|err| match err {
            LocalQueueError::Locked { .. } => anyhow::anyhow!(
                "{} is in use by a running feeder",
                JsonlFeeder::state_path(file).display()
            ),
            err => anyhow::Error::new(err).context(format!("cannot open {}", file.display())),
        })
    };
    match command {
        QueueCommand::Add {
            file,
            jobs,
            options,
            ..
        } => {
            if let Some(jsonl) = jsonl_of(&file) {
                anyhow::bail!(
                    "{} is the queue of the JSON-lines file {}: append the jobs to that file, \
                     one per line (none was added)",
                    file.display(),
                    jsonl.display()
                );
            }
            let mut jobs = queue_jobs(&jobs)?;
            if let Some(options) = options.to_options()? {
                let options = options.resolved_now();
                for job in &mut jobs {
                    let text = taskherd::queue::options::envelope_text(job, &options)?;
                    *job = serde_json::value::RawValue::from_string(text)?;
                }
            }
            let ids = FileFeeder::add_raw(&file, jobs.iter().map(|job| job.as_ref()))
                .with_context(|| {
                    format!("cannot add jobs to {} (none was added)", file.display())
                })?;
            let shown = match ids.end - ids.start {
                0 => String::new(),
                1 => format!(" (id {})", ids.start),
                _ => format!(" (ids {} to {})", ids.start, ids.end - 1),
            };
            println!(
                "{}: added {}{shown}",
                file.display(),
                jobs_text(ids.end - ids.start)
            );
        }
        QueueCommand::List {
            file, json, jobs, ..
        } => {
            let file = match jsonl_of(&file) {
                Some(jsonl) => JsonlFeeder::state_path(jsonl),
                None => file,
            };
            if !FileFeeder::exists(&file) {
                anyhow::bail!("{}: no such queue", file.display());
            }
            let report = FileFeeder::inspect(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let pending = if jobs {
                FileFeeder::inspect_jobs(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            } else {
                Vec::new()
            };
            if json {
                let mut value = serde_json::to_value(&report)?;
                if jobs {
                    value["jobs"] = serde_json::to_value(&pending)?;
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{}: {} pending, {} in the inbox, {} dead ({} bytes)",
                file.display(),
                report.pending,
                report.inbox,
                report.dead.len(),
                report.journal_bytes
            );
            for dead in &report.dead {
                println!("  dead #{}: {}: {}", dead.id, dead.reason, dead.job);
            }
            for job in &pending {
                match &job.options {
                    Some(options) => println!(
                        "  #{} (attempts {}, options {options}): {}",
                        job.id, job.attempts, job.job
                    ),
                    None => println!("  #{} (attempts {}): {}", job.id, job.attempts, job.job),
                }
            }
        }
        QueueCommand::RequeueDead { file, .. } => {
            let requeued = match jsonl_of(&file) {
                Some(jsonl) => open_jsonl(&jsonl)?.requeue_dead()?,
                None => open(&file)?.requeue_dead()?,
            };
            println!(
                "{}: {} put back (were dead)",
                file.display(),
                jobs_text(requeued as u64)
            );
        }
        QueueCommand::Compact { file } => {
            let (taken, report) = match jsonl_of(&file) {
                // Its lines are taken in by its feeder only.
                Some(jsonl) => {
                    let mut feeder = open_jsonl(&jsonl)?;
                    feeder.compact()?;
                    (0, feeder.report()?)
                }
                None => {
                    let mut feeder = open(&file)?;
                    let taken = feeder.take_inbox()?;
                    feeder.compact()?;
                    (taken, feeder.report()?)
                }
            };
            let per_job = if report.pending > 0 {
                format!(
                    ", {:.1} bytes per pending job",
                    report.journal_bytes as f64 / report.pending as f64
                )
            } else {
                String::new()
            };
            println!(
                "{}: took {} in; {} pending, {} dead; journal {} bytes{per_job}",
                file.display(),
                jobs_text(taken),
                report.pending,
                report.dead.len(),
                report.journal_bytes
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `1 job`, `2 jobs`.
fn jobs_text(n: u64) -> String {
    count_text(n, "job")
}

/// `taskherd queue add`'s per-job options.
#[derive(Debug, clap::Args)]
pub(crate) struct JobOptionArgs {
    /// Not served before this long from now (`10s`, `1m 30s`).
    #[arg(long, value_name = "DURATION")]
    delay: Option<String>,
    /// Not served before this time (RFC 3339, `2026-12-24T18:00:00Z`).
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// The jobs' own retry schedule: delays after each failed attempt,
    /// then dead (`1s,10s,1m`).
    #[arg(long, value_name = "DELAYS", conflicts_with = "retry_every")]
    retry: Option<String>,
    /// The jobs' own retry interval (`30s`).
    #[arg(long, value_name = "DURATION")]
    retry_every: Option<String>,
    /// With `--retry-every`: no retry starts after this time (RFC 3339).
    #[arg(long, value_name = "TIME", requires = "retry_every")]
    retry_until: Option<String>,
    /// Higher first, among the jobs due (default 0).
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i64>,
    /// A unique key: not added while a job with this key is pending or
    /// running.
    #[arg(long, value_name = "KEY")]
    unique: Option<String>,
}

impl JobOptionArgs {
    /// The options, `None` when no flag was given.
    fn to_options(&self) -> anyhow::Result<Option<taskherd::queue::options::JobOptions>> {
        use taskherd::queue::options::{parse_duration, parse_time, JobOptions};
        let mut options = JobOptions::new();
        let mut any = false;
        fn flag<T>(name: &str, result: Result<T, String>) -> anyhow::Result<T> {
            result.map_err(|why| anyhow::anyhow!("--{name}: {why}"))
        }
        if let Some(text) = &self.delay {
            options = options.delay(flag("delay", parse_duration(text))?);
            any = true;
        }
        if let Some(text) = &self.at {
            options = options.at(flag("at", parse_time(text))?);
            any = true;
        }
        if let Some(text) = &self.retry {
            let delays = text
                .split(',')
                .map(parse_duration)
                .collect::<Result<Vec<_>, _>>();
            options = options.retry(flag("retry", delays)?);
            any = true;
        }
        if let Some(text) = &self.retry_every {
            options = options.retry_every(flag("retry-every", parse_duration(text))?);
            any = true;
        }
        if let Some(text) = &self.retry_until {
            options = options.retry_until(flag("retry-until", parse_time(text))?);
            any = true;
        }
        if let Some(priority) = self.priority {
            options = options.priority(priority);
            any = true;
        }
        if let Some(key) = &self.unique {
            options = options.unique(key.clone());
            any = true;
        }
        Ok(any.then_some(options))
    }
}

/// The JSON texts of `queue add`: each argument, or the lines of stdin for
/// `-`, checked.
fn queue_jobs(args: &[String]) -> anyhow::Result<Vec<Box<serde_json::value::RawValue>>> {
    use std::io::BufRead;

    let mut jobs = Vec::new();
    let mut stdin_read = false;
    for (i, arg) in args.iter().enumerate() {
        if arg == "-" {
            anyhow::ensure!(!stdin_read, "\"-\" (stdin) given twice");
            stdin_read = true;
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.context("cannot read stdin")?;
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let job = serde_json::value::RawValue::from_string(line.to_owned())
                    .with_context(|| format!("stdin line {} is not valid JSON", n + 1))?;
                jobs.push(job);
            }
            continue;
        }
        let job =
            serde_json::value::RawValue::from_string(arg.trim().to_owned()).with_context(|| {
                format!(
                    "job {} ({arg}) is not valid JSON (quote strings: '\"text\"')",
                    i + 1
                )
            })?;
        jobs.push(job);
    }
    Ok(jobs)
}

/// The JetStream queue a command names: a group of `--config`, or a
/// `nats://server/GROUP` URL (the group's default names, no credentials
/// but those in the URL); `None` for a queue file.
fn jetstream_target(
    command: &QueueCommand,
) -> anyhow::Result<Option<taskherd::protocol::slave::JetStreamQueue>> {
    let (file, config) = match command {
        QueueCommand::Add { file, config, .. }
        | QueueCommand::List { file, config, .. }
        | QueueCommand::RequeueDead { file, config } => (file, config.as_ref()),
        QueueCommand::Compact { .. } => return Ok(None),
    };
    let text = file.to_string_lossy();
    if let Some(config_path) = config {
        let config =
            taskherd::config::Config::load(config_path).map_err(|err| anyhow::anyhow!("{err}"))?;
        let group = text.as_ref();
        return match config.jetstream_queue(group) {
            Some(queue) => Ok(Some(queue)),
            None if config.groups.iter().any(|g| g.name == group) => anyhow::bail!(
                "group {group} of {} is not a queue group on JetStream ([group.queue] backend = \"nats\")",
                config_path.display()
            ),
            None => anyhow::bail!("{} has no group {group}", config_path.display()),
        };
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Ok(None);
    };
    if !matches!(scheme, "nats" | "tls") {
        return Ok(None);
    }
    let Some((server, group)) = rest.split_once('/') else {
        anyhow::bail!("{text}: name the queue group after the server: nats://127.0.0.1:4222/GROUP");
    };
    anyhow::ensure!(
        !group.is_empty() && !group.contains('/'),
        "{text}: no queue group after the server"
    );
    let text = format!(
        "[nats]\nservers = [{server:?}]\n[[group]]\nname = {group:?}\ncommand = \"true\"\n\
         [group.queue]\nbackend = \"nats\"\n[group.local]\ninstances = 1\n",
        server = format!("{scheme}://{server}"),
    );
    let config = taskherd::config::Config::parse(&text, "nats-url.toml".as_ref())
        .map_err(|err| anyhow::anyhow!("{file:?}: {err}", file = file.display()))?;
    Ok(config.jetstream_queue(group))
}

/// `taskherd queue` on a JetStream queue.
mod jetstream {
    use std::process::ExitCode;
    use std::time::{Duration, SystemTime};

    use anyhow::Context as _;
    use taskherd::protocol::slave::JetStreamQueue;
    use taskherd::queue::nats;

    use super::{jobs_text, queue_jobs, QueueCommand};

    /// Longest list of dead jobs printed.
    const DEAD_LISTED: usize = 1000;

    pub(super) fn run(command: QueueCommand, queue: &JetStreamQueue) -> anyhow::Result<ExitCode> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a runtime")?;
        runtime.block_on(run_async(command, queue))
    }

    async fn run_async(command: QueueCommand, queue: &JetStreamQueue) -> anyhow::Result<ExitCode> {
        let where_ = format!("{} on {}", queue.stream, queue.servers.join(","));
        let client = nats::connect(queue, "taskherd queue").await?;
        match command {
            QueueCommand::Add { jobs, options, .. } => {
                let jobs = queue_jobs(&jobs)?;
                let (not_before, unique) = options.jetstream()?;
                let added =
                    nats::producer::add(&client, queue, &jobs, not_before, unique.as_deref())
                        .await
                        .context("jobs before this one were added")?;
                if added.duplicates > 0 {
                    println!(
                        "{where_}: added {}, {} already there (same unique key)",
                        jobs_text(added.added),
                        jobs_text(added.duplicates)
                    );
                } else {
                    println!("{where_}: added {}", jobs_text(added.added));
                }
            }
            QueueCommand::List { json, .. } => {
                let report = nats::producer::inspect(&client, queue, DEAD_LISTED).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    return Ok(ExitCode::SUCCESS);
                }
                println!(
                    "{where_}: {} pending ({} running), {} dead",
                    report.pending, report.in_flight, report.dead_count
                );
                for dead in &report.dead {
                    println!(
                        "  dead #{} ({} attempts): {}: {}",
                        dead.id, dead.attempts, dead.reason, dead.job
                    );
                }
            }
            QueueCommand::RequeueDead { .. } => {
                let moved = nats::producer::requeue_dead(&client, queue).await?;
                println!("{where_}: {} put back (were dead)", jobs_text(moved));
            }
            QueueCommand::Compact { .. } => {
                anyhow::bail!("a JetStream queue has no journal to compact")
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
        Ok(ExitCode::SUCCESS)
    }

    impl super::JobOptionArgs {
        /// The options a JetStream queue takes: a time not to run before,
        /// and a unique key (`Nats-Msg-Id`).
        fn jetstream(&self) -> anyhow::Result<(Option<SystemTime>, Option<String>)> {
            use taskherd::queue::options::{parse_duration, parse_time};
            let unsupported = [
                ("--retry", self.retry.is_some()),
                ("--retry-every", self.retry_every.is_some()),
                ("--priority", self.priority.is_some()),
            ];
            if let Some((flag, _)) = unsupported.iter().find(|(_, given)| *given) {
                anyhow::bail!(
                    "{flag} is not supported on a JetStream queue (the group's retry settings \
                     apply; jobs run in order)"
                );
            }
            let mut not_before = None;
            if let Some(text) = &self.delay {
                let delay =
                    parse_duration(text).map_err(|why| anyhow::anyhow!("--delay: {why}"))?;
                not_before = Some(SystemTime::now() + delay);
            }
            if let Some(text) = &self.at {
                not_before = Some(parse_time(text).map_err(|why| anyhow::anyhow!("--at: {why}"))?);
            }
            Ok((not_before, self.unique.clone()))
        }
    }
}
