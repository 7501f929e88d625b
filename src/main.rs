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
        #[command(flatten)]
        log: LogArgs,
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
    /// Show the groups and instances of a running master.
    Status {
        #[command(flatten)]
        target: MasterTarget,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running master cleanly, and wait until it has stopped.
    Stop {
        #[command(flatten)]
        target: MasterTarget,
        /// Kill at once (SIGKILL), without the stop grace.
        #[arg(long)]
        kill: bool,
    },
    /// Stop a group's instances and keep them stopped.
    Suspend {
        #[command(flatten)]
        target: MasterTarget,
        /// The group's name.
        group: String,
    },
    /// Start a suspended group's instances again.
    Resume {
        #[command(flatten)]
        target: MasterTarget,
        /// The group's name.
        group: String,
    },
    /// Restart a group's instances, one at a time.
    Restart {
        #[command(flatten)]
        target: MasterTarget,
        /// The group's name.
        group: String,
    },
    /// Make a running master re-read its config and apply the changes.
    Reload {
        #[command(flatten)]
        target: MasterTarget,
    },
    /// Follow the live log of a running master (until it exits or Ctrl-C).
    Logs {
        #[command(flatten)]
        target: MasterTarget,
        /// Only this group's lines (and the master's own events).
        group: Option<String>,
    },
}

/// Which running master an operator's command talks to.
#[derive(Debug, clap::Args)]
struct MasterTarget {
    /// The config the master runs (default: the only master running).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
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
    /// Count pending, waiting (inbox) and dead jobs, and list the dead
    /// ones with their reasons (also while a feeder serves the queue).
    List {
        /// The queue file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// List the pending jobs too (id, attempts, job), in serving order.
        #[arg(long)]
        jobs: bool,
    },
    /// Put every dead job back in the queue.
    RequeueDead {
        /// The queue file.
        file: PathBuf,
    },
    /// Take the inbox in and rewrite the journal as a snapshot (no feeder
    /// may serve the queue meanwhile); prints its size per pending job.
    Compact {
        /// The queue file.
        file: PathBuf,
    },
}

/// The log flags of `run`: each overrides its key of the config's `[log]`
/// table.
#[derive(Debug, clap::Args)]
struct LogArgs {
    /// Log format, overriding `[log] format`.
    #[arg(long, value_enum)]
    log_format: Option<FormatArg>,
    /// Write the log to this file (rotated per `[log] max_size` and
    /// `keep`), overriding `[log] file`; stdout then shows only the
    /// master's own events.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Which records are written: a default level and levels per group,
    /// such as `info,web=debug`. Overrides TASKHERD_LOG, which overrides
    /// `[log] filter` (default `info`).
    #[arg(long, value_name = "FILTER")]
    log_filter: Option<taskherd::master::log::LogFilter>,
    /// Colors by level on the terminal, overriding `[log] color`.
    #[arg(long, value_enum, value_name = "WHEN")]
    color: Option<ColorArg>,
}

/// The environment variable with a log filter, between `[log] filter`
/// and `--log-filter`.
const LOG_FILTER_ENV: &str = "TASKHERD_LOG";

impl LogArgs {
    /// Puts the flags (and TASKHERD_LOG) over the config's `[log]` table.
    fn apply(self, config: &mut Config) -> anyhow::Result<()> {
        use taskherd::config::LogColor;
        if let Some(format) = self.log_format {
            config.log.format = match format {
                FormatArg::Text => LogFormat::Text,
                FormatArg::Json => LogFormat::Json,
            };
        }
        if let Some(file) = self.log_file {
            // Relative to where the command runs, not to the config.
            let absolute = std::path::absolute(&file)
                .with_context(|| format!("--log-file {}", file.display()))?;
            config.log.file = Some(absolute);
        }
        if let Some(color) = self.color {
            config.log.color = match color {
                ColorArg::Auto => LogColor::Auto,
                ColorArg::Always => LogColor::Always,
                ColorArg::Never => LogColor::Never,
            };
        }
        let (filter, origin) = match (self.log_filter, std::env::var_os(LOG_FILTER_ENV)) {
            (Some(filter), _) => (filter, "--log-filter".to_owned()),
            (None, Some(text)) if !text.to_string_lossy().trim().is_empty() => {
                let text = text.to_string_lossy();
                let origin = format!("{LOG_FILTER_ENV}={text:?}");
                let filter = text.parse().with_context(|| origin.clone())?;
                (filter, origin)
            }
            (None, _) => return Ok(()),
        };
        if let Err(message) = config.check_log_filter(&filter) {
            anyhow::bail!("{origin}: {message}");
        }
        config.log.filter = filter;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// `time level [group] [host] [command/id/group_id] message`
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ColorArg {
    /// When stdout is a terminal (and NO_COLOR is not set).
    Auto,
    /// Always, even into a pipe or a file.
    Always,
    /// Never.
    Never,
}

/// Exit code when instances were marked failed.
const EXIT_FAILED_INSTANCES: u8 = 1;
/// Exit code for a bad config or a master that could not start.
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_diagnostics(match cli.command {
        Command::Run { .. } => Diagnostics::BelowStatusLine,
        _ => Diagnostics::Plain,
    });
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, log } => run(&config, log),
        Command::Pids { state_file, json } => pids(state_file, json),
        Command::Agent => taskherd::agent::run_stdio()
            .map(|()| ExitCode::SUCCESS)
            .map_err(|err| anyhow::anyhow!(err).context("agent")),
        Command::Queue { command } => queue(command),
        Command::Status { target, json } => operate(target, |client| status(client, json)),
        Command::Stop { target, kill } => {
            operate(target, |client| answer(client, ToMaster::Stop { kill }))
        }
        Command::Suspend { target, group } => {
            operate(target, |client| answer(client, ToMaster::Suspend { group }))
        }
        Command::Resume { target, group } => {
            operate(target, |client| answer(client, ToMaster::Resume { group }))
        }
        Command::Restart { target, group } => {
            operate(target, |client| answer(client, ToMaster::Restart { group }))
        }
        Command::Reload { target } => operate(target, |client| answer(client, ToMaster::Reload)),
        Command::Logs { target, group } => operate(target, |client| logs(client, group)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("taskherd: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Where diagnostics are printed.
#[derive(Debug, Clone, Copy)]
enum Diagnostics {
    /// No status line on the terminal.
    Plain,
    /// `run`: the herd's log may keep a status line at the bottom of the
    /// terminal (stdout is a TTY).
    BelowStatusLine,
}

/// Diagnostics of taskherd itself (not the herd's log) go to stderr,
/// filtered by `RUST_LOG` (warnings by default), colored only on a
/// terminal.
///
/// When stderr is the terminal of stdout and `run` may keep its status
/// line there, each diagnostic first erases the row it starts on (the
/// status line, which has no newline), in the same write: the diagnostic
/// gets a row of its own, and the status line comes back below with the
/// next log lines or status change.
fn init_diagnostics(diagnostics: Diagnostics) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::stderr().is_terminal();
    let erase_row = matches!(diagnostics, Diagnostics::BelowStatusLine)
        && ansi
        && std::io::stdout().is_terminal()
        && same_file(libc::STDOUT_FILENO, libc::STDERR_FILENO);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(move || DiagnosticWriter {
            erase_row,
            buf: Vec::new(),
        })
        .init();
}

/// Whether two fds are the same file (or terminal).
fn same_file(a: libc::c_int, b: libc::c_int) -> bool {
    let stat = |fd| {
        // SAFETY: fstat(2) only fills the stat we pass; a bad fd is an
        // error return.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        (unsafe { libc::fstat(fd, &mut stat) } == 0).then_some((
            stat.st_dev,
            stat.st_ino,
            stat.st_rdev,
        ))
    };
    matches!((stat(a), stat(b)), (Some(a), Some(b)) if a == b)
}

/// One diagnostic on stderr, written at once when it is complete (on
/// drop), after `\r\x1b[K` (erase the status line's row) if asked.
struct DiagnosticWriter {
    erase_row: bool,
    buf: Vec<u8>,
}

impl std::io::Write for DiagnosticWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() && self.erase_row {
            self.buf.extend_from_slice(b"\r\x1b[K");
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for DiagnosticWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            // Nowhere to report a failure to write a diagnostic.
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), &self.buf);
        }
    }
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

fn run(path: &std::path::Path, log: LogArgs) -> anyhow::Result<ExitCode> {
    let mut config = match load(path)? {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    log.apply(&mut config)?;
    // Before anything starts: a second master of the same config is
    // refused here, with the first one's pid.
    let socket = match master::control::ControlSocket::bind(&config.source) {
        Ok(socket) => socket,
        Err(err @ master::control::ControlError::AlreadyRunning { .. }) => {
            eprintln!("taskherd: {err}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
        Err(err) => return Err(anyhow::Error::new(err).context("cannot open the control socket")),
    };
    let report = master::Launcher::new(config)
        .control_socket(socket)
        .reload_on_sighup()
        .run_blocking()
        .context("cannot start the master")?;
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
            let added = FileFeeder::push_raw(&file, jobs.iter().map(|job| job.as_ref()))
                .with_context(|| {
                    format!("cannot add jobs to {} (none was added)", file.display())
                })?;
            println!("{}: added {added} jobs", file.display());
        }
        QueueCommand::List { file, json, jobs } => {
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
                println!("  #{} (attempts {}): {}", job.id, job.attempts, job.job);
            }
        }
        QueueCommand::RequeueDead { file } => {
            let requeued = open(&file)?.requeue_dead()?;
            println!("{}: {requeued} dead jobs put back", file.display());
        }
        QueueCommand::Compact { file } => {
            let mut feeder = open(&file)?;
            let taken = feeder.take_inbox()?;
            feeder.compact()?;
            let report = feeder.report()?;
            let per_job = if report.pending > 0 {
                format!(
                    ", {:.1} bytes per pending job",
                    report.journal_bytes as f64 / report.pending as f64
                )
            } else {
                String::new()
            };
            println!(
                "{}: took {taken} jobs in; {} pending, {} dead; journal {} bytes{per_job}",
                file.display(),
                report.pending,
                report.dead.len(),
                report.journal_bytes
            );
        }
    }
    Ok(ExitCode::SUCCESS)
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

// The operator's commands: talk to a running master over its control socket.

use taskherd::master::control::{self as control_socket, ControlClient};
use taskherd::protocol::control::{FromMaster, ToMaster};

/// Exit code when the master answered with an error.
const EXIT_MASTER_ERROR: u8 = 1;
/// Exit code when no master runs (or none can be reached).
const EXIT_NO_MASTER: u8 = 2;

/// Connects to the master of `target` on a small runtime of its own and
/// runs `command` with the connection.
fn operate<F, Fut>(target: MasterTarget, command: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(ControlClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match control_socket::connect(target.config.as_deref()).await {
            Ok(client) => command(client).await,
            Err(err) if err.is_no_master() => {
                eprintln!("taskherd: {err}");
                Ok(ExitCode::from(EXIT_NO_MASTER))
            }
            Err(err) => Err(err.into()),
        }
    })
}

/// How long `status` waits for the master's answer: a status is quick to
/// make, so a master that takes longer is stuck.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `status`: the table, or the JSON with `--json`.
async fn status(mut client: ControlClient, json: bool) -> anyhow::Result<ExitCode> {
    client.request(ToMaster::Status).await?;
    let deadline = tokio::time::Instant::now() + STATUS_TIMEOUT;
    loop {
        let Ok(reply) = tokio::time::timeout_at(deadline, client.next_reply()).await else {
            eprintln!(
                "taskherd: the master (pid {}) did not answer the status request within {}s \
                 (is it stuck?)",
                client.master_pid(),
                STATUS_TIMEOUT.as_secs()
            );
            return Ok(ExitCode::from(EXIT_MASTER_ERROR));
        };
        let Some(frame) = reply? else {
            break;
        };
        match frame {
            FromMaster::Status(status) => {
                let text = if json {
                    serde_json::to_string_pretty(&status)? + "\n"
                } else {
                    control_socket::format_status(&status)
                };
                print_out(&text);
                return Ok(ExitCode::SUCCESS);
            }
            FromMaster::Error { message } => {
                eprintln!("taskherd: {message}");
                return Ok(ExitCode::from(EXIT_MASTER_ERROR));
            }
            _ => {}
        }
    }
    closed_without_answer(&client)
}

/// `stop`, `suspend`, `resume`, `restart`, `reload`: sends the request and
/// waits for `Done` (exit 0) or `Error` (exit 1), printing log lines that
/// come meanwhile.
async fn answer(mut client: ControlClient, request: ToMaster) -> anyhow::Result<ExitCode> {
    client.request(request).await?;
    while let Some(frame) = client.next_reply().await? {
        match frame {
            FromMaster::Done { message } => {
                print_out(&format!("{message}\n"));
                return Ok(ExitCode::SUCCESS);
            }
            FromMaster::Error { message } => {
                eprintln!("taskherd: {message}");
                return Ok(ExitCode::from(EXIT_MASTER_ERROR));
            }
            FromMaster::Log { line, .. } => print_out(&format!("{line}\n")),
            _ => {}
        }
    }
    closed_without_answer(&client)
}

/// `logs`: every line until the master exits (or Ctrl-C, or stdout closes).
async fn logs(mut client: ControlClient, group: Option<String>) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    client.request(ToMaster::Logs { group }).await?;
    let mut stdout = std::io::stdout();
    while let Some(frame) = client.next_reply().await? {
        match frame {
            // `taskherd logs | head`: the reader is gone.
            FromMaster::Log { line, .. } if writeln!(stdout, "{line}").is_err() => {
                return Ok(ExitCode::SUCCESS);
            }
            FromMaster::Log { .. } => {}
            FromMaster::Error { message } => {
                eprintln!("taskherd: {message}");
                return Ok(ExitCode::from(EXIT_MASTER_ERROR));
            }
            FromMaster::Done { .. } => break,
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout, ignoring a closed pipe (`println!` would panic).
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn closed_without_answer(client: &ControlClient) -> anyhow::Result<ExitCode> {
    eprintln!(
        "taskherd: the master (pid {}) closed the connection without answering",
        client.master_pid()
    );
    Ok(ExitCode::from(EXIT_MASTER_ERROR))
}
