//! taskherd starts, supervises and feeds processes.
//!
//! # Layout
//!
//! The master side (feature `master`) is built in floors; each imports
//! only from the floors below it, never from one above:
//!
//! ```text
//! master/     the master: plan, a core without I/O (events in, effects
//!             out) in a run loop that carries them out, herd and events,
//!             control socket, HTTP interface (webhook, events, metrics,
//!             dashboard), remote hosts over SSH, queue groups
//! agent/      the remote side (`taskherd agent`): supervise + an upstream link
//!             (master and agent never import each other)
//! supervise/  one instance's life: spawn, output relay, control channel,
//!             liveness, stop, restart; the shutdown tokens; pid killer setup
//! log/        log records, the sink and its writer thread, files, rotation,
//!             the terminal, the backlog of `taskherd logs`
//! config/     config model, parsing, validation, the log filter
//! protocol/   the codec and the frames of every link, and the instance data
//!             (spec, commands, events, ends) the agent link carries
//! ```
//!
//! The master and every agent supervise their instances with the same
//! `supervise` code. `supervise` writes to `log`, never the reverse.
//!
//! The slave side (feature `slave`, everything a program embedding
//! `taskherd::slave` compiles) sits on `protocol` too: `slave/` (Handler,
//! HandlerQueue), `queue/` (feeder server, consumer client, runners,
//! feeders, durable and local queues), `callback/` (named callbacks,
//! worker, ticker, multiplexer), `pidkiller/` (deadline registry and kill
//! escalation, also used by `supervise`) and `retry` (retry policies).
//! Both sides share one of each helper (private modules): `backoff` (the
//! exponential backoff with jitter), `random` (jitter's randomness),
//! `files` (`flock` locks, atomic replacement of a file) and the
//! millisecond conversions of `protocol::millis`.
//!
//! # How it works
//!
//! (docs/ARCHITECTURE.md follows a log line and a job through these parts
//! in more detail.)
//!
//! **A master.** [`master::run`] takes a validated [`config::Config`],
//! plans its instances ([`master::plan`]: ids, groups, hosts, queue
//! roles), starts them, and loops over their events, operators' requests
//! (the [`master::Herd`] handle and the control socket,
//! [`master::control`]) and the stop. One [`master::Shutdown`] reaches
//! everything it starts: on SIGTERM it asks every instance and agent to
//! stop, waits the grace, then kills.
//!
//! **Its instances.** Each instance is a task of [`supervise::instance`]
//! that owns its state and nothing else does: it spawns the program in a
//! process group of its own with a control channel ([`supervise::process`]),
//! relays its output as log records to the [`log`] sink, watches for signs
//! of life, and stops or restarts it by its policy
//! ([`supervise::restart`]). A program that embeds [`slave::Handler`]
//! speaks over the control channel ([`protocol::slave`]): its identity,
//! pings, logs, recycling.
//!
//! **The agent link.** For a remote host the master keeps one SSH
//! ControlMaster and runs one `taskherd agent` there ([`master::remote`],
//! [`master::ssh`]). The [`agent`] supervises that host's instances with
//! the same [`supervise`] code and sends their events and log lines up the
//! SSH channel as frames of [`protocol::agent`]; master and agent never
//! import each other.
//!
//! **Queue groups.** A queue group has one feeder instance and consumer
//! instances ([`master::queue`] assigns the roles and the per-run secret).
//! The feeder serves jobs over TCP ([`queue::server`]: an HMAC handshake,
//! credits, leases, outcomes, frames of [`protocol::queue`]) from a
//! [`queue::feeders`] source, durably if asked ([`queue::durable`]);
//! consumers ([`queue::consumer`], or [`slave::HandlerQueue`] in a
//! program) run each job and report done, retry or dead, and a retry
//! follows the group's [`retry`] policy.

// The crate's lints are in Cargo.toml's `[lints]` (missing docs, safety
// comments, no dbg! or todo!, ...); this one is for the library's own
// code, not its tests: no `unwrap` on what can fail at run time (an
// invariant is written `.expect("invariant: ...")`).
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

#[cfg(feature = "master")]
pub mod agent;
mod backoff;
#[cfg(feature = "slave")]
pub mod callback;
#[cfg(feature = "master")]
pub mod config;
mod error_text;
#[cfg(feature = "slave")]
mod files;
#[cfg(feature = "master")]
pub mod log;
#[cfg(feature = "master")]
pub mod master;
#[cfg(feature = "slave")]
pub mod pidkiller;
pub mod protocol;
#[cfg(feature = "slave")]
pub mod queue;
#[cfg(feature = "slave")]
mod random;
pub mod retry;
#[cfg(feature = "slave")]
pub mod slave;
#[cfg(feature = "master")]
pub mod supervise;
