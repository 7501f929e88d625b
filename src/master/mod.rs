//! The master: launches groups of instances and supervises them.
//!
//! - [`launcher`]: config to instances, the run loop, the final report.
//! - [`instance`]: one task per instance: start, relay, liveness, stop,
//!   restart.
//! - [`process`]: spawning a child with its control channel (shared with
//!   the agent on remote hosts).
//! - [`output`]: child output to whole lines.
//! - [`log`]: the log stream (text or JSON lines).
//! - [`remote`]: one task per remote host: SSH connection, agent, relay.
//! - [`ssh`]: ControlMaster connections and the agent upload.
//! - [`restart`]: policy and backoff.
//! - [`shutdown`]: the stop and kill tokens, and signal handling.

pub mod instance;
pub mod launcher;
pub mod log;
pub mod output;
pub mod process;
pub mod remote;
pub mod restart;
pub mod shutdown;
pub mod ssh;

pub use launcher::{run, run_blocking, RunReport};
pub use log::{LogRecord, LogSink, LogWriter};
pub use shutdown::{stop_on_signals, Shutdown};

/// Sleeps until `deadline`, or forever without one: a `select!` branch for
/// an optional timer.
pub(crate) async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
