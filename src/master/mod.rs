//! The master: launches groups of instances and supervises them.
//!
//! - [`plan`]: config to instances: where each runs, with which id.
//! - [`launcher`]: the run loop and the final report; its `actions`
//!   (private) carry out operators' requests: suspend, resume, rolling
//!   restart, reload.
//! - [`herd`]: the status board, the [`Herd`] handle, the [`Events`]
//!   callbacks and the [`Launcher`].
//! - [`control`]: the control socket (`taskherd status`, `stop`, ...).
//! - [`instance`]: one task per instance: start, relay, liveness, stop,
//!   restart.
//! - [`process`]: spawning a child with its control channel (shared with
//!   the agent on remote hosts).
//! - [`output`]: child output to whole lines.
//! - [`remote`]: one task per remote host: SSH connection, agent, relay.
//! - [`ssh`]: ControlMaster connections and the agent upload.
//! - [`queue`]: queue groups: roles, per-run secret, feeder port.
//! - [`restart`]: policy and backoff.
//! - [`shutdown`]: the stop and kill tokens, and signal handling.

mod actions;
pub mod control;
pub mod herd;
pub mod instance;
pub mod launcher;
pub mod output;
pub mod plan;
pub mod process;
pub mod queue;
pub mod remote;
pub mod restart;
pub mod shutdown;
pub mod ssh;

pub use crate::log::{InstanceLabel, LogRecord, LogSink, LogWriter};
pub use herd::{Events, Herd, Launcher};
pub use launcher::{run, run_blocking, DeadJobs, RunReport};
pub use shutdown::{stop_on_signals, Shutdown};

/// Opens the pid killer's registry at `state_file` and reports (in the log)
/// the processes of an earlier, crashed run it had to stop. Without a
/// usable registry supervision goes on, with a warning.
pub async fn open_pid_killer(
    state_file: std::path::PathBuf,
    sink: &LogSink,
) -> Option<crate::pidkiller::PidKiller> {
    use crate::protocol::slave::Level;
    match crate::pidkiller::PidKiller::open(state_file.clone()).await {
        Ok(pids) => {
            for entry in pids.leftovers() {
                let message = format!(
                    "stopping {} (pid {}), left running by an earlier run that died",
                    entry.label, entry.identity.pid
                );
                sink.master_event(Level::Warning, message).await;
            }
            Some(pids)
        }
        Err(err) => {
            let message = format!(
                "no pid registry ({}): {err}; processes of this run will not be reaped if it dies",
                state_file.display()
            );
            sink.master_event(Level::Warning, message).await;
            None
        }
    }
}

/// Sleeps until `deadline`, or forever without one: a `select!` branch for
/// an optional timer.
pub(crate) async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
