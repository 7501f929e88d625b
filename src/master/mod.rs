//! The master: launches groups of instances and supervises them.
//!
//! Each instance on the master's host is supervised by
//! [`crate::supervise`], as on every agent's host; lines and events go to
//! the [`crate::log`] stream. The names of those floors that users of the
//! master need ([`Shutdown`], [`LogSink`], [`InstanceLabel`], ...) are
//! re-exported here.
//!
//! - [`plan`]: config to instances: where each runs, with which id.
//! - `core` (private): the master's state and decisions, without I/O:
//!   events in (instance events, feeders listening, hosts lost,
//!   operators' requests, deadlines, the stop), effects out (start these
//!   instances here, command that one, answer, log); it holds consumers
//!   until their feeder listens, and runs rolling restarts and reloads
//!   one instance, one change at a time.
//! - `shell` (private): the run loop around the core: it feeds the core
//!   and carries out its effects (hands instances to their host's
//!   supervisor, commands them, answers operators).
//! - [`launcher`]: starts a run (plan, log, control socket, core and
//!   shell) and makes its final report.
//! - [`herd`]: the [`Herd`] handle (the core's status, operators'
//!   requests), the [`Events`] callbacks and the [`Launcher`].
//! - `request` (private): operators' requests, one type for the [`Herd`]
//!   handle and the control socket, answered with [`HerdError`] on failure.
//! - [`control`]: the control socket (`taskherd status`, `stop`, ...).
//! - `hooks` (private): the programs groups run on their instances'
//!   events (`[group.hooks]`), bounded and beside supervision.
//! - [`http`]: the HTTP interface (`[http]`): webhook, status, events,
//!   group actions, Prometheus metrics, the dashboard.
//! - `host` (private): the one interface of every host's supervisor
//!   (instances and commands in, reports out) and the run loop's handle
//!   on it; `local` (private): the master's own host behind it.
//! - [`remote`]: one task per remote host: SSH connection, agent, relay;
//!   it reports instance events, feeders listening and its losses.
//! - [`ssh`]: ControlMaster connections and the agent upload.
//! - [`queue`]: queue groups: roles, per-run secret, feeder port.

pub mod control;
mod core;
mod exe_hash;
pub mod herd;
mod hooks;
mod host;
pub mod http;
pub mod launcher;
pub mod links;
mod local;
pub mod plan;
pub mod queue;
pub mod remote;
mod request;
mod shell;
pub mod ssh;

pub use crate::log::{InstanceLabel, LogRecord, LogSink, LogWriter};
pub use crate::protocol::control::Target;
pub use crate::supervise::open_pid_killer;
pub use crate::supervise::shutdown::{stop_on_signals, Shutdown};
pub use herd::{Events, Herd, Launcher};
pub use http::HttpError;
pub use launcher::{run, run_blocking, DeadJobs, RunReport};
pub use request::HerdError;
