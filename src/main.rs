//! The `taskherd` command: parses arguments and calls the library.

mod cli;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use cli::control::{answer, logs, operate, status};
use std::path::PathBuf;
use std::process::ExitCode;
use taskherd::config::{Config, LoadError, LogFormat};
use taskherd::master;
use taskherd::protocol::control::ToMaster;
use taskherd::protocol::slave::Level;

/// Start, supervise and feed processes.
#[derive(Debug, Parser)]
#[command(name = "taskherd", version, about, after_help = EXAMPLES)]
struct Cli {
    /// Less output: warnings and errors only (the herd's log of `run`,
    /// the lines of `logs`, what the operator's commands print).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More output: debug records too (the herd's log of `run`, and
    /// taskherd's own diagnostics on stderr).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// `taskherd --help`'s examples.
const EXAMPLES: &str = "\
Examples:
  taskherd check herd.toml         validate a config, print every error
  taskherd run herd.toml           run it (Ctrl-C stops cleanly, a second Ctrl-C kills)
  taskherd status                  the instances of the running master
  taskherd logs --tail 50 web      the last 50 lines of group web, then the live log
  taskherd stop                    stop the herd cleanly and wait until it has
  taskherd completions bash > ~/.local/share/bash-completion/completions/taskherd
  taskherd manpage > taskherd.1

With several masters running, choose one with -c FILE (the config it runs).";

/// How much the commands say: `-q`, nothing, or `-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verbosity {
    /// `-q`: warnings and errors only.
    Quiet,
    /// The default.
    Normal,
    /// `-v`: debug too.
    Verbose,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the herd of a config until it ends or is stopped (SIGTERM or
    /// Ctrl-C stop cleanly; a second Ctrl-C kills at once).
    #[command(after_help = "\
Examples:
  taskherd run herd.toml
  taskherd run herd.toml --log-file herd.log --log-filter warning,web=debug
  taskherd -q run herd.toml        warnings and errors only

Exit code: 0 when the herd ended or was stopped cleanly, 1 when instances were
marked failed, 2 for a bad config or a master that could not start.")]
    Run {
        /// The config file (TOML).
        config: PathBuf,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Run a command on hosts without a config file, like pdsh: `taskherd
    /// exec -w 'web[1-4],local' -n 2 -- uptime`. Each line of output is
    /// written as pdsh does, `web2: line` (`web2/3: line` with `-n` over
    /// 1: instance 3, its TASKHERD_ID), standard error on standard error;
    /// the master's warnings go to standard error (its other events with
    /// `-v`); `--log-format` or `--log-file` write the herd's log instead.
    /// At the end, on standard error, how each instance ended.
    ///
    /// Exit code: 0 when every instance exited 0, 1 when any failed (or ran
    /// past `--timeout`, or was lost, or was stopped when standard output
    /// was closed, as by `| head`), 130 or 143 when Ctrl-C or
    /// SIGTERM stopped instances before their end (128 + the signal), 2
    /// for bad arguments.
    Exec(cli::exec::ExecArgs),
    /// Validate a config and print every error found; also look on this
    /// machine for the programs and working directories of local groups,
    /// the ssh files, and whether remote hosts resolve (without
    /// connecting).
    Check {
        /// The config file (TOML).
        config: PathBuf,
        /// Check the config alone: no programs, directories, files or
        /// hosts looked at (for a config meant for another machine).
        #[arg(long)]
        config_only: bool,
        /// Also log in to every remote host over SSH, with the config's
        /// settings, and run `true` there (at most 8 hosts at once).
        #[arg(long, conflicts_with = "config_only")]
        connect: bool,
        /// Also print the hosts of every remote placement, host ranges
        /// (`web[01-16]`) and inventory groups (`@web`) expanded.
        #[arg(long)]
        hosts: bool,
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
    /// Stop what a master or agent left in its pid registry once it ends
    /// (started by them, beside the registry).
    #[command(hide = true)]
    Watchdog {
        /// The pid registry.
        #[arg(long, value_name = "FILE")]
        state_file: PathBuf,
    },
    /// Be a queue group's built-in feeder (`[group.feeder] file`, `jsonl`
    /// or `command`; started by the master or an agent).
    #[command(hide = true)]
    #[command(group(clap::ArgGroup::new("source").required(true).args(["file", "jsonl", "command"])))]
    BuiltinFeeder {
        /// Serve the durable file queue with this journal.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Serve the lines of this JSON-lines file (done ones kept in
        /// PATH.state).
        #[arg(long, value_name = "PATH")]
        jsonl: Option<PathBuf>,
        /// Serve the lines of the stdout of the command given after `--`.
        #[arg(long, requires = "program")]
        command: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, value_name = "COMMAND")]
        program: Vec<std::ffi::OsString>,
        /// Publish the lines to the group's JetStream queue (given in
        /// TASKHERD_JETSTREAM_QUEUE) instead of serving them (with
        /// --jsonl or --command).
        #[arg(long, conflicts_with = "file")]
        jetstream: bool,
        /// With --jetstream: the file that records how far the source is
        /// published (default: the --jsonl file + `.jetstream`).
        #[arg(long, value_name = "PATH", requires = "jetstream")]
        state: Option<PathBuf>,
    },
    /// Be a consumer of a queue group that runs COMMAND once per job
    /// (`[group.consumer] run = "exec"`; started by the master or an
    /// agent): the job's JSON on its stdin, the outcome from its exit
    /// status.
    #[command(hide = true)]
    ExecConsumer {
        /// Exit statuses that mean done (besides 0), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "CODES")]
        done_codes: Vec<u8>,
        /// Exit statuses that mean retry (besides 75 and 71, and any
        /// status not otherwise mapped).
        #[arg(long, value_delimiter = ',', value_name = "CODES")]
        retry_codes: Vec<u8>,
        /// Exit statuses that mean dead (besides 64 to 78, 126 and 127).
        #[arg(long, value_delimiter = ',', value_name = "CODES")]
        dead_codes: Vec<u8>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Be a consumer of a queue group that starts COMMAND once and speaks
    /// JSON lines with it (`[group.consumer] run = "coprocess"`; started by
    /// the master or an agent).
    #[command(hide = true)]
    CoprocessConsumer {
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Fill and inspect the durable job queue of a file feeder.
    Queue {
        #[command(subcommand)]
        command: cli::queue::QueueCommand,
    },
    /// Show the groups and instances of a running master.
    #[command(after_help = "\
Examples:
  taskherd status
  taskherd status web jobs         only these groups
  taskherd status --json -c /etc/taskherd/herd.toml")]
    Status {
        #[command(flatten)]
        target: MasterTarget,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Only these groups (default: every group).
        #[arg(value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Stop a running master cleanly and wait until it has stopped; or,
    /// given GROUP[:ID], stop those instances only and keep them stopped
    /// until `taskherd start`.
    #[command(after_help = "\
Examples:
  taskherd stop                    the whole herd (the master exits)
  taskherd stop web                group web's instances; the herd goes on
  taskherd stop web:2              instance 2 of group web (its id within the group)

Exit code: 0 once done (instances that had failed earlier are counted, not an
error), 1 on an error, 2 when no master runs.")]
    Stop {
        #[command(flatten)]
        target: MasterTarget,
        /// Kill at once (SIGKILL), without the stop grace (the whole herd
        /// only).
        #[arg(long, conflicts_with = "instances")]
        kill: bool,
        /// Only this group, or one of its instances (`web:2`).
        #[arg(value_name = "GROUP[:ID]")]
        instances: Option<master::Target>,
    },
    /// Start the instances of a group (or one: GROUP:ID) that do not run:
    /// failed, stopped, completed, or not started (`autostart = false`).
    #[command(after_help = "\
Examples:
  taskherd start web               every instance of web that does not run
  taskherd start web:2             instance 2 of group web (its id within the group)

Running instances are left alone (the answer says so). A failed instance starts
with a fresh restart budget. Exit code 1 when an instance does not start.")]
    Start {
        #[command(flatten)]
        target: MasterTarget,
        /// The group, or one of its instances (`web:2`).
        #[arg(value_name = "GROUP[:ID]")]
        instances: master::Target,
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
    /// Restart a group's instances one at a time (or one: GROUP:ID); ended
    /// ones (failed, stopped, completed) start again.
    Restart {
        #[command(flatten)]
        target: MasterTarget,
        /// The group, or one of its instances (`web:2`).
        #[arg(value_name = "GROUP[:ID]")]
        instances: master::Target,
    },
    /// Make a running master re-read its config and apply the changes.
    Reload {
        #[command(flatten)]
        target: MasterTarget,
    },
    /// Follow the live log of a running master (until it exits or Ctrl-C).
    #[command(after_help = "\
Examples:
  taskherd logs                    the live log, until the master exits or Ctrl-C
  taskherd logs web --tail 20      the last 20 lines of group web, then the live log
  taskherd logs --no-follow        the lines the master kept, and exit
  taskherd -q logs                 warnings and errors only")]
    Logs {
        #[command(flatten)]
        target: MasterTarget,
        /// Only this group's lines (and the master's own events).
        group: Option<String>,
        /// Start with the last N lines the master kept (it keeps the last
        /// 1000 lines of the herd's log, at most 1 MiB).
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<u32>,
        /// Print the lines the master kept (all of them, or the last N
        /// with --tail) and exit instead of following the live log.
        #[arg(long)]
        no_follow: bool,
    },
    /// Print a shell completion script on stdout.
    #[command(after_help = "\
Examples:
  taskherd completions bash > ~/.local/share/bash-completion/completions/taskherd
  taskherd completions zsh > ~/.zfunc/_taskherd     (with fpath+=~/.zfunc in ~/.zshrc)
  taskherd completions fish > ~/.config/fish/completions/taskherd.fish")]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout.
    #[command(after_help = "\
Examples:
  taskherd manpage > /usr/local/share/man/man1/taskherd.1
  taskherd manpage logs | man -l -")]
    Manpage {
        /// A command's own page (taskherd-COMMAND(1)) instead of taskherd(1).
        command: Option<String>,
    },
}

/// Which running master an operator's command talks to.
#[derive(Debug, clap::Args)]
struct MasterTarget {
    /// The config the master runs (default: the only master running).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
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
    log_filter: Option<taskherd::config::LogFilter>,
    /// Colors by level on the terminal, overriding `[log] color`.
    #[arg(long, value_enum, value_name = "WHEN")]
    color: Option<ColorArg>,
}

/// The environment variable with a log filter, between `[log] filter`
/// and `--log-filter`.
const LOG_FILTER_ENV: &str = "TASKHERD_LOG";

impl LogArgs {
    /// Puts the flags (and TASKHERD_LOG, then `-q` or `-v`) over the
    /// config's `[log]` table; `true` when a filter was given
    /// (`--log-filter` or a TASKHERD_LOG that is not blank).
    fn apply(self, config: &mut Config, verbosity: Verbosity) -> anyhow::Result<bool> {
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
            (None, _) => {
                // `-q` / `-v`: one level for everything, over `[log] filter`.
                let level = match verbosity {
                    Verbosity::Quiet => Level::Warning,
                    Verbosity::Verbose => Level::Debug,
                    Verbosity::Normal => return Ok(false),
                };
                config.log.filter = taskherd::config::LogFilter::at_least(Some(level));
                return Ok(false);
            }
        };
        if let Err(message) = config.check_log_filter(&filter) {
            anyhow::bail!("{origin}: {message}");
        }
        config.log.filter = filter;
        Ok(true)
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

/// `taskherd builtin-feeder`: the role its options name (clap makes sure
/// there is exactly one).
fn builtin_feeder(
    file: Option<PathBuf>,
    jsonl: Option<PathBuf>,
    command: bool,
    program: &[std::ffi::OsString],
) -> ExitCode {
    use taskherd::queue::builtin;
    match (file, jsonl, program.split_first()) {
        (Some(file), _, _) => builtin::run_file_feeder(&file),
        (None, Some(jsonl), _) => builtin::run_jsonl_feeder(&jsonl),
        (None, None, Some((program, args))) if command => {
            builtin::run_command_feeder(program, args)
        }
        _ => {
            eprintln!(
                "taskherd builtin-feeder: give --file PATH, --jsonl PATH or --command -- COMMAND"
            );
            ExitCode::from(2)
        }
    }
}

/// `taskherd builtin-feeder --jetstream`: fill the group's JetStream
/// queue from the file or the command.
fn jetstream_feeder(
    jsonl: Option<PathBuf>,
    command: bool,
    program: &[std::ffi::OsString],
    state: Option<PathBuf>,
) -> ExitCode {
    use taskherd::queue::{builtin, nats::feed::Source};
    let (source, state) = match (jsonl, program.split_first()) {
        (Some(jsonl), _) => {
            let state = state.unwrap_or_else(|| {
                let mut name = jsonl.clone().into_os_string();
                name.push(".jetstream");
                PathBuf::from(name)
            });
            (Source::Jsonl(jsonl), state)
        }
        (None, Some((program, args))) if command => {
            let Some(state) = state else {
                eprintln!("taskherd builtin-feeder --jetstream --command: give --state PATH");
                return ExitCode::from(2);
            };
            let source = Source::Command {
                program: PathBuf::from(program),
                args: args.to_vec(),
            };
            (source, state)
        }
        _ => {
            eprintln!(
                "taskherd builtin-feeder --jetstream: give --jsonl PATH or --command -- COMMAND"
            );
            return ExitCode::from(2);
        }
    };
    builtin::run_jetstream_feeder(source, &state)
}

/// `taskherd exec-consumer`: the exit map from the options, then the
/// library's runner.
fn exec_consumer(
    done: &[u8],
    retry: &[u8],
    dead: &[u8],
    command: &[std::ffi::OsString],
) -> anyhow::Result<ExitCode> {
    use taskherd::queue::exec::{run_exec_consumer, ExitClass, ExitMap};
    let map = ExitMap::default()
        .with(ExitClass::Done, done)
        .and_then(|map| map.with(ExitClass::Retry, retry))
        .and_then(|map| map.with(ExitClass::Dead, dead))
        .context("exec-consumer")?;
    let (program, args) = command
        .split_first()
        .context("exec-consumer: no command given after --")?;
    Ok(run_exec_consumer(program, args, map))
}

/// Exit code when instances were marked failed.
const EXIT_FAILED_INSTANCES: u8 = 1;
/// Exit code for a bad config or a master that could not start.
const EXIT_ERROR: u8 = 2;

/// `taskherd agent` (the command a master starts on every remote host)
/// without building the whole command line's parser: a fraction of a
/// millisecond per host. Any other command line goes through clap.
fn agent_cli() -> Option<Cli> {
    let mut args = std::env::args_os().skip(1);
    (args.next()? == "agent" && args.next().is_none()).then_some(Cli {
        quiet: false,
        verbose: false,
        command: Command::Agent,
    })
}

fn main() -> ExitCode {
    // Masters and agents run this binary as their watchdog.
    if let Ok(program) = std::env::current_exe() {
        taskherd::supervise::watchdog::enable(program);
    }
    let cli = agent_cli().unwrap_or_else(Cli::parse);
    let verbosity = match (cli.quiet, cli.verbose) {
        (true, _) => Verbosity::Quiet,
        (false, true) => Verbosity::Verbose,
        (false, false) => Verbosity::Normal,
    };
    // A built-in role logs to the master through its control channel.
    if !matches!(
        cli.command,
        Command::BuiltinFeeder { .. }
            | Command::ExecConsumer { .. }
            | Command::CoprocessConsumer { .. }
    ) {
        cli::diagnostics::init_diagnostics(
            match cli.command {
                Command::Run { .. } => cli::diagnostics::Diagnostics::BelowStatusLine,
                _ => cli::diagnostics::Diagnostics::Plain,
            },
            verbosity,
        );
    }
    // A master holds about four descriptors per remote host: the soft
    // limit goes up to the hard one (its instances get the old one back).
    if matches!(cli.command, Command::Run { .. } | Command::Exec(_)) {
        if let Err(err) = taskherd::supervise::limits::raise_open_files() {
            tracing::warn!(
                cause = %err,
                "cannot raise the limit of open files: each remote host takes about 4"
            );
        }
    }
    let result = match cli.command {
        Command::Check {
            config,
            config_only,
            connect,
            hosts,
        } => cli::check::check(&config, config_only, connect, hosts),
        Command::Run { config, log } => run(&config, log, verbosity),
        Command::Exec(args) => cli::exec::run(args, verbosity),
        Command::Pids { state_file, json } => pids(state_file, json),
        Command::Watchdog { state_file } => Ok(taskherd::supervise::watchdog::run(&state_file)),
        Command::Agent => taskherd::agent::run_stdio()
            .map(|()| ExitCode::SUCCESS)
            .map_err(|err| anyhow::anyhow!(err).context("agent")),
        Command::BuiltinFeeder {
            file,
            jsonl,
            command,
            program,
            jetstream,
            state,
        } => Ok(if jetstream {
            jetstream_feeder(jsonl, command, &program, state)
        } else {
            builtin_feeder(file, jsonl, command, &program)
        }),
        Command::ExecConsumer {
            done_codes,
            retry_codes,
            dead_codes,
            command,
        } => exec_consumer(&done_codes, &retry_codes, &dead_codes, &command),
        Command::CoprocessConsumer { command } => match command.split_first() {
            Some((program, args)) => Ok(taskherd::queue::coprocess::run_coprocess_consumer(
                program, args,
            )),
            None => Err(anyhow::anyhow!(
                "coprocess-consumer: no command given after --"
            )),
        },
        Command::Queue { command } => cli::queue::run(command),
        Command::Status {
            target,
            json,
            groups,
        } => operate(target, verbosity, |client| status(client, json, groups)),
        Command::Stop {
            target,
            kill,
            instances: None,
        } => operate(target, verbosity, |client| {
            answer(client, ToMaster::Stop { kill }, verbosity)
        }),
        Command::Stop {
            target,
            instances: Some(master::Target { group, id }),
            ..
        } => operate(target, verbosity, |client| {
            answer(client, ToMaster::StopInstances { group, id }, verbosity)
        }),
        Command::Start {
            target,
            instances: master::Target { group, id },
        } => operate(target, verbosity, |client| {
            answer(client, ToMaster::Start { group, id }, verbosity)
        }),
        Command::Suspend { target, group } => operate(target, verbosity, |client| {
            answer(client, ToMaster::Suspend { group }, verbosity)
        }),
        Command::Resume { target, group } => operate(target, verbosity, |client| {
            answer(client, ToMaster::Resume { group }, verbosity)
        }),
        Command::Restart {
            target,
            instances: master::Target { group, id },
        } => operate(target, verbosity, |client| {
            answer(client, ToMaster::Restart { group, id }, verbosity)
        }),
        Command::Reload { target } => operate(target, verbosity, |client| {
            answer(client, ToMaster::Reload, verbosity)
        }),
        Command::Logs {
            target,
            group,
            tail,
            no_follow,
        } => {
            let request = ToMaster::Logs {
                group,
                // Without --tail: the live log only, or all the master kept.
                tail: tail.unwrap_or(if no_follow {
                    u32::try_from(taskherd::log::BACKLOG_LINES).unwrap_or(u32::MAX)
                } else {
                    0
                }),
                follow: !no_follow,
            };
            logs(target, request, verbosity)
        }
        Command::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "taskherd", &mut out);
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage { command } => manpage(command.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("taskherd: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Result<Config, ExitCode>> {
    loaded(Config::load(path), path)
}

/// A loaded config, or its errors printed and the exit code for them.
fn loaded<T>(
    result: Result<T, LoadError>,
    path: &std::path::Path,
) -> anyhow::Result<Result<T, ExitCode>> {
    match result {
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
    println!(
        "{} ({} entr{})",
        path.display(),
        entries.len(),
        if entries.len() == 1 { "y" } else { "ies" }
    );
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

fn run(path: &std::path::Path, log: LogArgs, verbosity: Verbosity) -> anyhow::Result<ExitCode> {
    let mut config = match load(path)? {
        Ok(config) => config,
        Err(code) => return Ok(code),
    };
    log.apply(&mut config, verbosity)?;
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

/// `n` and a noun that agrees with it: `1 group`, `2 groups`.
fn count_text(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Runs `work` on a small runtime of its own.
fn block_on<T>(work: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(work)
}

/// `manpage`: taskherd(1), or taskherd-COMMAND(1), in roff on stdout.
fn manpage(command: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut cli = Cli::command();
    // Global flags (-q, -v) are then listed on each command's page too.
    cli.build();
    let page = match command {
        None => cli,
        Some(name) => {
            let Some(sub) = cli
                .get_subcommands()
                .find(|sub| sub.get_name() == name && !sub.is_hide_set())
            else {
                let names: Vec<&str> = cli
                    .get_subcommands()
                    .filter(|sub| !sub.is_hide_set())
                    .map(|sub| sub.get_name())
                    .collect();
                anyhow::bail!("no command named {name:?} (commands: {})", names.join(", "));
            };
            sub.clone()
                .display_name(format!("taskherd-{name}"))
                .bin_name(format!("taskherd {name}"))
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .context("cannot render the man page")?;
    print_out(&String::from_utf8_lossy(&out));
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout, ignoring a closed pipe (`println!` would panic).
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}
