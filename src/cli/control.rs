//! The operator's commands that talk to a running master over its control
//! socket: `status`, `stop`, `start`, `suspend`, `resume`, `restart`,
//! `reload` and `logs`.

use crate::{block_on, print_out, MasterTarget, Verbosity};
use anyhow::Context;
use std::process::ExitCode;
use taskherd::master::control::{self as control_socket, ControlClient};
use taskherd::protocol::control::{FromMaster, ToMaster};
use taskherd::protocol::slave::Level;

/// Exit code when the master answered with an error.
const EXIT_MASTER_ERROR: u8 = 1;
/// Exit code when no master runs (or none can be reached).
const EXIT_NO_MASTER: u8 = 2;

/// Connects to the master of `target`; `Err(code)` when none runs (said
/// on stderr).
pub(crate) async fn connect(
    target: MasterTarget,
    verbosity: Verbosity,
) -> anyhow::Result<Result<ControlClient, ExitCode>> {
    match control_socket::connect(target.config.as_deref()).await {
        Ok(client) => {
            if verbosity == Verbosity::Verbose {
                eprintln!(
                    "taskherd: connected to the master (pid {}) of {} at {}",
                    client.master_pid(),
                    client.config(),
                    client.socket().display()
                );
            }
            Ok(Ok(client))
        }
        Err(err) if err.is_no_master() => {
            eprintln!("taskherd: {err}");
            Ok(Err(ExitCode::from(EXIT_NO_MASTER)))
        }
        Err(err) => Err(err.into()),
    }
}

/// Connects to the master of `target` on a small runtime of its own and
/// runs `command` with the connection.
pub(crate) fn operate<F, Fut>(
    target: MasterTarget,
    verbosity: Verbosity,
    command: F,
) -> anyhow::Result<ExitCode>
where
    F: FnOnce(ControlClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    block_on(async {
        match connect(target, verbosity).await? {
            Ok(client) => command(client).await,
            Err(code) => Ok(code),
        }
    })
}

/// How long `status` waits for the master's answer: a status is quick to
/// make, so a master that takes longer is stuck.
const STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `status`: the table, or the JSON with `--json`; only `groups` if any
/// are named (a group the master does not have is an error, exit 1).
pub(crate) async fn status(
    mut client: ControlClient,
    json: bool,
    groups: Vec<String>,
) -> anyhow::Result<ExitCode> {
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
            FromMaster::Status(mut status) => {
                let unknown: Vec<&String> = groups
                    .iter()
                    .filter(|name| !status.groups.iter().any(|g| &g.name == *name))
                    .collect();
                if !unknown.is_empty() {
                    let known: Vec<&str> = status.groups.iter().map(|g| g.name.as_str()).collect();
                    for name in unknown {
                        eprintln!(
                            "taskherd: no group named {name:?} (the master has: {})",
                            known.join(", ")
                        );
                    }
                    return Ok(ExitCode::from(EXIT_MASTER_ERROR));
                }
                if !groups.is_empty() {
                    status.groups.retain(|g| groups.contains(&g.name));
                }
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
/// come meanwhile (with `-q`, only warnings and errors, and not the
/// `Done` message).
pub(crate) async fn answer(
    mut client: ControlClient,
    request: ToMaster,
    verbosity: Verbosity,
) -> anyhow::Result<ExitCode> {
    client.request(request).await?;
    while let Some(frame) = client.next_reply().await? {
        match frame {
            FromMaster::Done { message } => {
                if verbosity != Verbosity::Quiet {
                    print_out(&format!("{message}\n"));
                }
                return Ok(ExitCode::SUCCESS);
            }
            FromMaster::Error { message } => {
                eprintln!("taskherd: {message}");
                return Ok(ExitCode::from(EXIT_MASTER_ERROR));
            }
            FromMaster::Log { line, level } if shown(level, verbosity) => {
                print_out(&format!("{line}\n"))
            }
            _ => {}
        }
    }
    closed_without_answer(&client)
}

/// Whether a log line is printed: with `-q`, warnings and up only.
fn shown(level: Level, verbosity: Verbosity) -> bool {
    verbosity != Verbosity::Quiet || level >= Level::Warning
}

/// `logs`: the backlog asked for, then every line until the master exits
/// (or Ctrl-C, or stdout closes), all ending with exit code 0; without
/// follow, only the backlog.
pub(crate) fn logs(
    target: MasterTarget,
    request: ToMaster,
    verbosity: Verbosity,
) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};
    block_on(async {
        // Ctrl-C is how one stops following: the end, not a failure.
        // Watched from the start, so that it never kills the command.
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let work = async {
            let mut client = match connect(target, verbosity).await? {
                Ok(client) => client,
                Err(code) => return Ok(code),
            };
            client.request(request).await?;
            let mut stdout = std::io::stdout();
            while let Some(frame) = client.next_reply().await? {
                match frame {
                    // `taskherd logs | head`: the reader is gone.
                    FromMaster::Log { line, level }
                        if shown(level, verbosity) && writeln!(stdout, "{line}").is_err() =>
                    {
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
        };
        tokio::select! {
            ended = work => ended,
            _ = interrupt.recv() => Ok(ExitCode::SUCCESS),
        }
    })
}

fn closed_without_answer(client: &ControlClient) -> anyhow::Result<ExitCode> {
    eprintln!(
        "taskherd: the master (pid {}) closed the connection without answering",
        client.master_pid()
    );
    Ok(ExitCode::from(EXIT_MASTER_ERROR))
}
