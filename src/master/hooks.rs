//! Hooks: the programs a group runs on its instances' events
//! (`[group.hooks]`: `on_failure`, `on_restart`, `on_exhausted`,
//! `on_stop`), for notifications.
//!
//! The core decides which event calls which hook ([`hook_for`]); the
//! shell hands each call to [`Hooks`], which runs it beside supervision:
//! `sh -c COMMAND` on the master's host, in the config file's
//! directory, in a process group of its own
//! with the parent-death signal (a hook does not outlive a master that
//! is killed), the event as one JSON object on its stdin, its output in
//! the log. A hook never holds anything up: it runs on a task of its
//! own; one that outlives its `timeout` is killed with its process group;
//! one that fails is logged; and at most [`MAX_RUNNING`] run at once (a
//! call beyond is dropped, and that is logged). At the end of the run the
//! master waits for the hooks still running (each bounded by its
//! timeout), so that the stop's own `on_stop` hooks are run.

use crate::config::HooksSpec;
use crate::log::{InstanceLabel, LogSink};
use crate::protocol::instance::{EventKind, InstanceEnd, InstanceEvent};
use crate::protocol::slave::Level;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;

/// Hooks running at once at most; calls beyond are dropped (and logged).
pub(crate) const MAX_RUNNING: usize = 32;

/// Output of a hook kept for the log, at most (the last bytes).
const OUTPUT_KEPT: usize = 4096;

/// One run of a hook, as the core decides it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HookCall {
    /// Which hook (`on_failure`, ...).
    pub(crate) hook: &'static str,
    /// The shell command.
    pub(crate) command: String,
    /// Longest run.
    pub(crate) timeout: Duration,
    /// Where it runs: the config file's directory.
    pub(crate) dir: PathBuf,
    /// The instance it is about.
    pub(crate) label: Arc<InstanceLabel>,
    /// The event, as the JSON object its stdin gets.
    pub(crate) payload: String,
}

/// The hook an instance's event calls, if its group has one: `event`
/// has just been applied to the instance, which has now started
/// `starts` processes, `restarts` of them not asked by an operator
/// (the payload's `restarts`, as `status` counts them); the hook runs in
/// `dir`.
pub(crate) fn hook_for(
    hooks: &HooksSpec,
    dir: &Path,
    label: &Arc<InstanceLabel>,
    event: &InstanceEvent,
    starts: u32,
    restarts: u32,
) -> Option<HookCall> {
    let (hook, command) = match &event.kind {
        EventKind::Exited { failed: true, .. } => ("on_failure", &hooks.on_failure),
        EventKind::Started { .. } if starts > 1 => ("on_restart", &hooks.on_restart),
        EventKind::Ended {
            end: InstanceEnd::Failed { .. },
        } => ("on_exhausted", &hooks.on_exhausted),
        EventKind::Ended {
            end: InstanceEnd::Stopped { .. },
        } => ("on_stop", &hooks.on_stop),
        _ => return None,
    };
    let command = command.clone()?;
    let payload = serde_json::json!({
        "hook": hook,
        "group": label.group,
        "host": label.host,
        "command": label.command,
        "id": label.id,
        "group_id": label.group_id,
        "name": format!("{}:{}", label.group, label.group_id),
        "time_ms": event.time_ms,
        "restarts": restarts,
        "event": event.kind,
    });
    Some(HookCall {
        hook,
        command,
        timeout: hooks.timeout,
        dir: dir.to_path_buf(),
        label: label.clone(),
        payload: payload.to_string(),
    })
}

/// The hooks running, and where they log.
#[derive(Debug)]
pub(crate) struct Hooks {
    /// Where their outcome goes.
    sink: LogSink,
    /// One task per hook running.
    running: JoinSet<()>,
}

impl Hooks {
    /// No hook running yet; outcomes go to `sink`.
    pub(crate) fn new(sink: LogSink) -> Self {
        Hooks {
            sink,
            running: JoinSet::new(),
        }
    }

    /// Starts a hook on a task of its own (or drops it, logged, when
    /// [`MAX_RUNNING`] run already).
    pub(crate) async fn call(&mut self, call: HookCall) {
        while self.running.try_join_next().is_some() {}
        if self.running.len() >= MAX_RUNNING {
            let message = format!(
                "hook {} not run: {MAX_RUNNING} hooks are running already",
                call.hook
            );
            self.sink
                .instance_event(&call.label, Level::Error, message)
                .await;
            return;
        }
        self.running.spawn(run(call, self.sink.clone()));
    }

    /// Waits until every hook running has ended (each is bounded by its
    /// timeout).
    pub(crate) async fn finish(&mut self) {
        while self.running.join_next().await.is_some() {}
    }
}

/// Runs one hook to its end, or kills it at its timeout; logs how it
/// went.
async fn run(call: HookCall, sink: LogSink) {
    let (level, message) = match run_bounded(&call).await {
        Ok((status, output)) if status.success() => (
            Level::Info,
            format!("hook {} ran{}", call.hook, said(&output)),
        ),
        Ok((status, output)) => (
            Level::Warning,
            format!(
                "hook {} failed: {}{}",
                call.hook,
                crate::supervise::instance::describe_status(&Ok(status)),
                said(&output)
            ),
        ),
        Err(problem) => (Level::Warning, format!("hook {}: {problem}", call.hook)),
    };
    sink.instance_event(&call.label, level, message).await;
}

/// What a hook printed, for its log line.
fn said(output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

/// Runs the hook's command with the event on its stdin; its exit status
/// and what it printed (stdout and stderr, the last [`OUTPUT_KEPT`]
/// bytes).
///
/// # Errors
/// It could not start, or it ran past its timeout (it was killed then,
/// with its process group).
async fn run_bounded(call: &HookCall) -> Result<(std::process::ExitStatus, String), String> {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(&call.command)
        .current_dir(&call.dir)
        .env("TASKHERD_HOOK", call.hook)
        .env(crate::protocol::slave::GROUP_ENV, &call.label.group)
        .env(crate::protocol::slave::ID_ENV, call.label.id.to_string())
        .env(
            crate::protocol::slave::GROUP_ID_ENV,
            call.label.group_id.to_string(),
        )
        .env(crate::protocol::slave::HOST_ENV, &call.label.host)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::queue::child::die_with_parent(command.as_std_mut());
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot start `sh -c {}`: {err}", call.command))?;
    let pid = child.id();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let payload = format!("{}\n", call.payload);
    let work = async {
        // A hook that does not read its stdin is fine.
        let feed = async {
            if let Some(mut stdin) = stdin {
                let _ = stdin.write_all(payload.as_bytes()).await;
            }
        };
        let (_, out, err, status) =
            tokio::join!(feed, read_tail(stdout), read_tail(stderr), child.wait());
        (out, err, status)
    };
    match tokio::time::timeout(call.timeout, work).await {
        Ok((out, err, status)) => {
            let status = status.map_err(|err| format!("cannot wait for it: {err}"))?;
            let mut output = out;
            if !err.is_empty() {
                if !output.is_empty() {
                    output.push('\n');
                }
                output.push_str(&err);
            }
            Ok((status, output))
        }
        Err(_) => {
            // Not reaped yet (the wait was cut short): its process group
            // is still ours.
            if let Some(pid) = pid {
                let _ = crate::supervise::process::signal_group(pid, libc::SIGKILL);
            }
            let _ = child.wait().await;
            Err(format!(
                "did not end within {}: killed",
                humantime::format_duration(call.timeout)
            ))
        }
    }
}

/// Reads a pipe to its end; keeps its last [`OUTPUT_KEPT`] bytes.
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > OUTPUT_KEPT {
                    kept.drain(..kept.len() - OUTPUT_KEPT);
                }
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}
