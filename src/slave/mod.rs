//! The library side of a slave: what a program started by taskherd embeds.
//!
//! The master starts each instance with a control socket (its fd number in
//! `TASKHERD_CONTROL_FD`). [`Handler::from_env`] takes that socket, reads
//! the instance's [`Identity`] (ids, group, host, params, timeouts) and
//! answers with a hello, so the master knows the program uses the library.
//! From then on the program can:
//!
//! - read who it is: [`Handler::id`], [`Handler::group`],
//!   [`Handler::params_as`], ...;
//! - see a stop request: [`Handler::must_stop`], or [`Handler::sleep`],
//!   which returns early on a stop and pings the master while it waits;
//! - prove it is alive: [`Handler::ping`] (logging counts too);
//! - send structured logs: [`Handler::log`] and friends, or `tracing`
//!   through [`Handler::init_tracing`] / [`MasterLayer`];
//! - report how its work ended: [`Handler::run`] sends the outcome (an
//!   error or a panic is a failure) and gives the exit code.
//! - in a queue group, play the feeder or a consumer with
//!   [`HandlerQueue::run_queue`].
//!
//! The API is synchronous: the program needs no async runtime. A small
//! background runtime owns the socket. Stdout and stderr stay the
//! program's own; the master logs them line by line.
//!
//! If the master dies, the control channel closes: the handler requests a
//! stop, and exits the process if it is still running after the stop
//! grace (see [`Handler::from_env`]). A slave never outlives its master.
//!
//! # Example
//!
//! ```no_run
//! use std::process::ExitCode;
//! use std::time::Duration;
//! use taskherd::slave::Handler;
//!
//! fn main() -> ExitCode {
//!     let handler = match Handler::from_env() {
//!         Ok(handler) => handler,
//!         Err(err) => {
//!             eprintln!("worker: {err}");
//!             return ExitCode::from(2);
//!         }
//!     };
//!     handler.run(|h| {
//!         h.info(format!("instance {} of group {} starting", h.group_id(), h.group()));
//!         while !h.must_stop() {
//!             // ... one unit of work ...
//!             h.sleep(Duration::from_secs(1));
//!         }
//!         Ok::<(), String>(())
//!     })
//! }
//! ```

mod error;
mod handler;
mod layer;
mod link;
pub(crate) mod queue;

pub use self::error::SlaveError;
pub use self::handler::{Handler, FLUSH_TIMEOUT, IDENTITY_TIMEOUT, MAX_LOG_LEN};
pub use self::layer::MasterLayer;
pub use self::queue::{HandlerQueue, HandlerQueueError};
pub use crate::protocol::slave::{Identity, Level};
pub use crate::queue::consumer::JobInfo;
