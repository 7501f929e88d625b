//! The one shutdown mechanism: a stop token, a kill token, and the reason.
//!
//! Stopping is two steps, as an operator expects: the first request stops
//! everything cleanly (Stop frame or SIGTERM, then SIGKILL after the
//! grace); a second one kills at once. Both are cancellation tokens, so
//! every task waits on them instead of polling a flag.

use std::sync::{Arc, OnceLock};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// A cloneable handle to stop a run cleanly or at once.
///
/// ```
/// use taskherd::master::Shutdown;
/// let shutdown = Shutdown::new();
/// assert!(!shutdown.is_stopping());
/// shutdown.request_stop("operator asked");
/// assert_eq!(shutdown.reason(), Some("operator asked"));
/// assert!(shutdown.is_stopping() && !shutdown.is_killing());
/// ```
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    kill: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

impl Shutdown {
    /// A shutdown nobody has requested yet.
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// Asks for a clean stop; the first reason given is kept for the log.
    pub fn request_stop(&self, reason: impl Into<String>) {
        // Only the first reason counts: later ones lose the race on purpose.
        let _ = self.reason.set(reason.into());
        self.stop.cancel();
    }

    /// Asks to kill everything now (and to stop, if not asked yet).
    pub fn kill_now(&self, reason: impl Into<String>) {
        self.request_stop(reason);
        self.kill.cancel();
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Whether an immediate kill was requested.
    pub fn is_killing(&self) -> bool {
        self.kill.is_cancelled()
    }

    /// Completes once a stop is requested.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub fn stopping(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Completes once an immediate kill is requested.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub fn killing(&self) -> WaitForCancellationFuture<'_> {
        self.kill.cancelled()
    }

    /// Why the stop was requested, once it was.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// The stop token, for tasks that only need to know about the clean stop.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }
}

/// Turns SIGTERM and SIGINT into stop requests: the first one stops
/// cleanly, the second kills at once.
///
/// # Errors
/// If the signal handlers cannot be installed.
pub fn stop_on_signals(shutdown: Shutdown) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        shutdown.request_stop(format!("{first} received"));
        let second = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        shutdown.kill_now(format!("second signal ({second}) received"));
    }))
}
