//! The master: launches groups of instances and supervises them.
//!
//! Each instance on the master's host is supervised by
//! [`crate::supervise`], as on every agent's host; lines and events go to
//! the [`crate::log`] stream. The names of those floors that users of the
//! master need ([`Shutdown`], [`LogSink`], [`InstanceLabel`], ...) are
//! re-exported here.
//!
//! - [`plan`]: config to instances: where each runs, with which id.
//! - [`launcher`]: the run loop and the final report; its `actions`
//!   (private) carry out operators' requests: suspend, resume, rolling
//!   restart, reload.
//! - [`herd`]: the status board, the [`Herd`] handle, the [`Events`]
//!   callbacks and the [`Launcher`].
//! - `request` (private): operators' requests, one type for the [`Herd`]
//!   handle and the control socket, answered with [`HerdError`] on failure.
//! - [`control`]: the control socket (`taskherd status`, `stop`, ...).
//! - [`remote`]: one task per remote host: SSH connection, agent, relay.
//! - [`ssh`]: ControlMaster connections and the agent upload.
//! - [`queue`]: queue groups: roles, per-run secret, feeder port.

mod actions;
pub mod control;
pub mod herd;
pub mod launcher;
pub mod plan;
pub mod queue;
pub mod remote;
mod request;
pub mod ssh;

pub use crate::log::{InstanceLabel, LogRecord, LogSink, LogWriter};
pub use crate::supervise::open_pid_killer;
pub use crate::supervise::shutdown::{stop_on_signals, Shutdown};
pub use herd::{Events, Herd, Launcher};
pub use launcher::{run, run_blocking, DeadJobs, RunReport};
pub use request::HerdError;
