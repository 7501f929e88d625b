//! The `taskherd` command: parses arguments and calls the library.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use taskherd::config::{Config, LoadError, LogFormat};
use taskherd::master;

/// Start, supervise and feed processes.
#[derive(Debug, Parser)]
#[command(name = "taskherd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the herd of a config until it ends or is stopped (SIGTERM or
    /// Ctrl-C stop cleanly; a second Ctrl-C kills at once).
    Run {
        /// The config file (TOML).
        config: PathBuf,
        /// Log format, overriding `master.log_format`.
        #[arg(long, value_enum)]
        log_format: Option<FormatArg>,
    },
    /// Validate a config and print every error found.
    Check {
        /// The config file (TOML).
        config: PathBuf,
    },
    /// List the processes the pid killer watches (pid, group, deadline).
    Pids {
        /// The registry file (default: the one masters use).
        #[arg(long)]
        state_file: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve a master on stdin/stdout (started by the master over SSH).
    #[command(hide = true)]
    Agent,
    /// Fill and inspect the durable job queue of a file feeder.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Add jobs to a queue file (also while a feeder serves it).
    Add {
        /// The queue file (created if needed).
        file: PathBuf,
        /// The jobs, one JSON value each (quote strings: '"text"'); `-`
        /// reads one JSON value per line from stdin.
        #[arg(required = true, allow_hyphen_values = true)]
        jobs: Vec<String>,
    },
    /// Count pending, in-flight and dead jobs, and list the dead ones with
    /// their reasons.
    List {
        /// The queue file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put every dead job back in the queue.
    RequeueDead {
        /// The queue file.
        file: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// `time level [group] [host] [command/id/group_id] message`
    Text,
    /// One JSON object per line.
    Json,
}

/// Exit code when instances were marked failed.
const EXIT_FAILED_INSTANCES: u8 = 1;
/// Exit code for a bad config or a master that could not start.
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_diagnostics();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, log_format } => run(&config, log_format),
        Command::Pids { state_file, json } => pids(state_file, json),
        Command::Agent => taskherd::agent::run_stdio()
            .map(|()| ExitCode::SUCCESS)
            .map_err(|err| anyhow::anyhow!(err).context("agent")),
        Command::Queue { command } => queue(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("taskherd: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Diagnostics of taskherd itself (not the herd's log) go to stderr,
/// filtered by `RUST_LOG` (warnings by default).
fn init_diagnostics() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn load(path: &std::path::Path) -> anyhow::Result<Result<Config, ExitCode>> {
    match Config::load(path) {
        Ok(config) => Ok(Ok(config)),
        Err(LoadError::Invalid(errors)) => {
            for err in &errors.0 {
                eprintln!("error: {err}");
            }
            eprintln!(
                "taskherd: {}: {} error{} found",
                path.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            Ok(Err(ExitCode::from(EXIT_ERROR)))
        }
        Err(err) => Err(err.into()),
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = match load(path)? {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    let instances: u32 = config.groups.iter().map(|g| g.instance_count()).sum();
    println!(
        "{}: ok ({} groups, {} instances)",
        path.display(),
        config.groups.len(),
        instances
    );
    Ok(ExitCode::SUCCESS)
}

fn pids(state_file: Option<PathBuf>, json: bool) -> anyhow::Result<ExitCode> {
    use taskherd::pidkiller;
    let path = state_file.unwrap_or_else(pidkiller::default_state_file);
    let entries = if path.exists() {
        pidkiller::read_state(&path)?
    } else {
        Vec::new()
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} ({} entries)", path.display(), entries.len());
    if entries.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8} {:>8} {:<8} {:<28} {:>10}  LABEL",
        "PID", "PGID", "STATE", "DEADLINE", "OWNER"
    );
    for entry in &entries {
        let deadline = entry
            .deadline
            .map(|at| humantime::format_rfc3339_seconds(at).to_string())
            .unwrap_or_else(|| "-".into());
        let state = if entry.is_running() {
            "running"
        } else {
            "gone"
        };
        println!(
            "{:>8} {:>8} {:<8} {:<28} {:>10}  {}",
            entry.identity.pid, entry.pgid, state, deadline, entry.owner.pid, entry.label
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run(path: &std::path::Path, log_format: Option<FormatArg>) -> anyhow::Result<ExitCode> {
    let mut config = match load(path)? {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    if let Some(format) = log_format {
        config.master.log_format = match format {
            FormatArg::Text => LogFormat::Text,
            FormatArg::Json => LogFormat::Json,
        };
    }
    let report = master::run_blocking(config).context("cannot start the master")?;
    Ok(if report.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED_INSTANCES)
    })
}

fn queue(command: QueueCommand) -> anyhow::Result<ExitCode> {
    use taskherd::queue::feeders::FileFeeder;
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
    match command {
        QueueCommand::Add { file, jobs } => {
            let jobs = queue_jobs(&jobs)?;
            let added = FileFeeder::push_all(&file, jobs)
                .with_context(|| format!("cannot add jobs to {}", file.display()))?;
            println!("{}: added {added} jobs", file.display());
        }
        QueueCommand::List { file, json } => {
            let report = open(&file)?.report()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{}: {} pending, {} in flight, {} dead",
                file.display(),
                report.pending,
                report.in_flight,
                report.dead.len()
            );
            for dead in &report.dead {
                println!("  dead #{}: {}: {}", dead.id, dead.reason, dead.job);
            }
        }
        QueueCommand::RequeueDead { file } => {
            let requeued = open(&file)?.requeue_dead()?;
            println!("{}: {requeued} dead jobs put back", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON values of `queue add`: each argument, or the lines of stdin for `-`.
fn queue_jobs(args: &[String]) -> anyhow::Result<Vec<serde_json::Value>> {
    use std::io::BufRead;

    let mut jobs = Vec::new();
    let mut stdin_read = false;
    for (i, arg) in args.iter().enumerate() {
        if arg == "-" {
            anyhow::ensure!(!stdin_read, "\"-\" (stdin) given twice");
            stdin_read = true;
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.context("cannot read stdin")?;
                if line.trim().is_empty() {
                    continue;
                }
                let job = serde_json::from_str(&line)
                    .with_context(|| format!("stdin line {} is not valid JSON", n + 1))?;
                jobs.push(job);
            }
            continue;
        }
        let job = serde_json::from_str(arg).with_context(|| {
            format!(
                "job {} ({arg}) is not valid JSON (quote strings: '\"text\"')",
                i + 1
            )
        })?;
        jobs.push(job);
    }
    Ok(jobs)
}
