//! Named callbacks, and what runs them: a queue worker, a ticker and a
//! multiplexer.
//!
//! Jobs never carry code. A [`Job`] is a handler name and a JSON payload; a
//! [`Registry`] maps names to handlers compiled into the program, each with
//! its own serde payload type. Every run ends with a
//! [`retry::Outcome`](crate::retry::Outcome): done, retry, or dead.
//!
//! # Layout
//!
//! - `registry.rs`: [`Registry`] (named handlers, async or blocking) and
//!   [`Job`] (the envelope that goes into queues).
//! - `worker.rs`: [`Worker`], which pulls jobs from a
//!   [`LocalQueue`](crate::queue::local::LocalQueue), runs them and acks,
//!   retries or buries them per a [`RetryPolicy`](crate::retry::RetryPolicy).
//! - `ticker.rs`: [`Ticker`], "run N times every T after D", without
//!   overlap and without catch-up bursts.
//! - `multiplexer.rs`: [`Multiplexer`], several handlers in priority order,
//!   one's failure not stopping the others.
//! - `process.rs`: [`ProcessRunner`], a handler in a child process of its
//!   own, its lifetime enforced by the [pid killer](crate::pidkiller).
//!
//! # How it works
//!
//! Handlers are stored type-erased: a closure that deserializes the JSON
//! payload into the handler's type and runs it. A payload that does not
//! deserialize, or an unknown name, is [`Outcome::Dead`](crate::retry::Outcome::Dead)
//! (running it again cannot help). A panic is caught around the whole run
//! and becomes [`Outcome::Retry`](crate::retry::Outcome::Retry)`(None)`:
//! never a success, and the retry policy decides whether it runs again.
//! Blocking handlers run on tokio's blocking pool.

mod multiplexer;
mod process;
mod registry;
mod ticker;
mod worker;

pub use multiplexer::{MultiplexedOutcome, Multiplexer};
pub use process::{
    serve_child, ProcessOutcome, ProcessRunner, CALLBACK_CHILD_ENV, DEFAULT_CHILD_GRACE,
};
pub use registry::{Job, Registry};
pub use ticker::{Ticker, TickerSummary};
pub use worker::{JobReport, Pusher, Settlement, Worker, WorkerSummary, DEFAULT_IDLE_RECHECK};

use crate::queue::local::LocalQueueError;

/// Errors of the callback API (running a handler never fails: its problems
/// are [`Outcome`](crate::retry::Outcome)s).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallbackError {
    /// A handler is already registered under this name.
    #[error("handler {name:?} is already registered")]
    DuplicateHandler {
        /// The name.
        name: String,
    },
    /// No handler is registered under this name.
    #[error("no handler registered as {name:?}")]
    UnknownHandler {
        /// The name.
        name: String,
    },
    /// A job payload could not be turned into JSON.
    #[error("cannot serialize the payload of a job for handler {handler:?}")]
    Serialize {
        /// The handler the job was for.
        handler: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The worker's queue failed (a file queue that cannot write its
    /// journal); lost leases are not errors.
    #[error("local queue failed")]
    Queue(#[source] LocalQueueError),
    /// A panic while the queue was locked left its mutex poisoned.
    #[error("local queue mutex poisoned by a panic")]
    QueuePoisoned,
    /// The blocking task running a queue call panicked or was cancelled.
    #[error("local queue call did not complete")]
    QueueTask(#[source] tokio::task::JoinError),
    /// A handler child process could not be started or waited for.
    #[error("cannot run a handler child process")]
    Spawn(#[source] std::io::Error),
    /// A handler child could not be registered with the pid killer (its
    /// lifetime could not be enforced, so it was not run).
    #[error("cannot register a handler child with the pid killer")]
    Register(#[source] crate::pidkiller::PidKillerError),
}
