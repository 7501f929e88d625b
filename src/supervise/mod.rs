//! Supervision: one instance's life, from spawn to its last report.
//!
//! This is the floor below both the master and the agent: the master runs
//! it for the instances placed on its own host, every agent for the
//! instances placed on its remote host, with the same code.
//!
//! - [`instance`]: one task per instance: start, liveness, stop, restart;
//!   its runs' output goes through `relay` (stdout and stderr to log
//!   records) and their control channel through `control_link`, both
//!   marking signs of life on an `activity` clock.
//! - [`process`]: spawning a child with its control channel, and
//!   signalling its process group.
//! - [`output`]: child output to whole lines.
//! - [`restart`]: policy and backoff.
//! - `health` (private): health checks (tcp, http, command probes) and
//!   the count of their failures in a row.
//! - [`limits`]: the open-file limit of a process holding many hosts.
//! - `cgroup` (private): the memory cap of an instance as a cgroup (v2,
//!   else v1), else `RLIMIT_AS`.
//! - [`shutdown`]: the stop and kill tokens, and signal handling.

mod activity;
mod cgroup;
mod control_link;
mod health;
pub mod instance;
pub mod limits;
pub mod output;
pub mod process;
mod relay;
pub mod restart;
pub mod shutdown;
pub mod watchdog;

use crate::log::LogSink;

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

/// Makes sure this process's watchdog (if [`watchdog::enable`]d) runs
/// beside the registry of `pids`: called before each entry is registered,
/// it starts one before the first. A process that registers nothing (a
/// master of remote hosts only) starts none, and the start costs nothing
/// before a run's first SSH handshakes. Warns in the log, once, when the
/// watchdog cannot start.
pub(crate) async fn guard_registry(pids: &crate::pidkiller::PidKiller, sink: &LogSink) {
    use crate::protocol::slave::Level;
    if let Err(err) = watchdog::start(pids.state_file()) {
        let message = format!(
            "cannot start the watchdog ({err}): if this process is killed, \
             its instances run on until the next run stops them"
        );
        sink.master_event(Level::Warning, message).await;
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
