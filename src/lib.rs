// The crate's lints are in Cargo.toml's `[lints]` (missing docs, unsafe
// operations, safety comments, ...); this one is for the library's own
// code, not its tests: no `unwrap` on what can fail at run time (an
// invariant is written `.expect("invariant: ...")`).
#![cfg_attr(not(test), warn(clippy::unwrap_used))]
//! taskherd starts, supervises and feeds processes.
//!
//! # Layout
//!
//! The master side (feature `master`) is built in floors; each imports
//! only from the floors below it, never from one above:
//!
//! ```text
//! master/     the master: plan, run loop, herd and events, control socket,
//!             remote hosts over SSH, queue groups
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
