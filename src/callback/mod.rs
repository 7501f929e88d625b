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
//!
//! # Example
//!
//! A registry shared by a worker on a local queue and by a ticker (the
//! README shows much the same with a
//! [`FileQueue`](crate::queue::local::FileQueue)):
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use taskherd::callback::{Job, Registry, Ticker, Worker};
//! use taskherd::queue::local::{MemoryQueue, QueueOptions};
//! use taskherd::retry::{Outcome, RetryPolicy};
//! use tokio_util::sync::CancellationToken;
//!
//! #[derive(serde::Deserialize)]
//! struct Resize {
//!     path: String,
//!     width: u32,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::new();
//! registry.register("resize", |job: Resize| async move {
//!     if job.width == 0 {
//!         return Outcome::Dead(format!("{}: width 0", job.path)); // never retried
//!     }
//!     // ... resize job.path; on a passing error: Outcome::Retry(None) ...
//!     Outcome::Done
//! })?;
//! let registry = Arc::new(registry);
//!
//! let (buried_tx, mut buried_rx) = tokio::sync::mpsc::unbounded_channel();
//! let queue = Arc::new(Mutex::new(MemoryQueue::new(QueueOptions::default())));
//! let policy = RetryPolicy::exponential(Duration::from_secs(1), Duration::from_secs(60), 5);
//! let worker = Worker::new(queue, Arc::clone(&registry), policy)
//!     .with_dead_hook(move |message, reason| {
//!         let _ = buried_tx.send(format!("job {} given up: {reason}", message.id));
//!     });
//! let pusher = worker.pusher();
//! let cancel = CancellationToken::new();
//! let running = tokio::spawn(worker.run(cancel.clone()));
//!
//! pusher.push(Job::new("resize", serde_json::json!({"path": "a.png", "width": 100}))?).await?;
//! pusher.push(Job::new("resize", serde_json::json!({"path": "b.png", "width": 0}))?).await?;
//!
//! // 3 runs, 1 ms apart, the first at once.
//! let ticker = Ticker::new(Duration::ZERO, Duration::from_millis(1), Some(3));
//! let payload = serde_json::json!({"path": "thumbs/", "width": 64});
//! let ticks = ticker.run_handler(cancel.clone(), Arc::clone(&registry), "resize", payload).await;
//! assert_eq!(ticks.done, 3);
//!
//! // Jobs of equal priority run oldest first: a.png is done when b.png is buried.
//! let buried = buried_rx.recv().await.expect("the worker runs");
//! assert!(buried.ends_with("b.png: width 0"), "{buried}");
//! cancel.cancel(); // seen between jobs: the job in progress is settled first
//! let summary = running.await??;
//! assert_eq!((summary.done, summary.buried), (1, 1));
//! # Ok(())
//! # }
//! ```

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
