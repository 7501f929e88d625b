//! The one shutdown mechanism: a stop token, a kill token, and the reason.
//!
//! Stopping is two steps, as an operator expects: the first request stops
//! everything cleanly (Stop frame or SIGTERM, then SIGKILL after the
//! grace); a second one kills at once. Both are cancellation tokens, so
//! every task waits on them instead of polling a flag.

use std::sync::{Arc, OnceLock};
use std::time::Instant;
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
    /// When the stop was requested, for the stop report: an instance
    /// killed before its grace had passed was killed on request.
    stop_at: Arc<OnceLock<Instant>>,
    /// When the immediate kill was requested.
    kill_at: Arc<OnceLock<Instant>>,
    /// How the operator can kill at once, when they can (a second Ctrl-C
    /// on the master's terminal), for the stop message.
    kill_hint: Arc<OnceLock<String>>,
    /// The signal whose receipt asked for the first stop, if a signal did
    /// (see [`stop_on_signals`]).
    signal: Arc<OnceLock<i32>>,
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
        let _ = self.stop_at.set(Instant::now());
        self.stop.cancel();
    }

    /// [`Shutdown::request_stop`], telling the operator how to kill at
    /// once (`hint`, such as "Ctrl-C again to kill at once"), if this is
    /// the first stop request.
    pub fn request_stop_with_hint(&self, reason: impl Into<String>, hint: impl Into<String>) {
        if !self.is_stopping() {
            let _ = self.kill_hint.set(hint.into());
        }
        self.request_stop(reason);
    }

    /// Asks to kill everything now (and to stop, if not asked yet).
    pub fn kill_now(&self, reason: impl Into<String>) {
        self.request_stop(reason);
        let _ = self.kill_at.set(Instant::now());
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

    /// The signal (`SIGINT`, `SIGTERM`) whose receipt asked for the first
    /// stop, when [`stop_on_signals`] did; `None` when the stop came
    /// another way (an operator's command, the end of the work) or not at
    /// all. `taskherd exec` exits with 128 + this number when the signal
    /// stopped instances before their end, as a shell reports a command a
    /// signal ended.
    pub fn stop_signal(&self) -> Option<i32> {
        self.signal.get().copied()
    }

    /// Why the stop was requested, once it was.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// How the operator can kill at once, if the stop request said
    /// ([`Shutdown::request_stop_with_hint`]).
    pub fn kill_hint(&self) -> Option<&str> {
        self.kill_hint.get().map(String::as_str)
    }

    /// When the stop was requested, once it was.
    pub fn stop_requested_at(&self) -> Option<Instant> {
        self.stop_at.get().copied()
    }

    /// When the immediate kill was requested, once it was.
    pub fn kill_requested_at(&self) -> Option<Instant> {
        self.kill_at.get().copied()
    }

    /// The stop token, for tasks that only need to know about the clean stop.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }
}

/// Turns SIGTERM and SIGINT into stop requests: the first one stops
/// cleanly, the second kills at once. A SIGINT while the master has a
/// terminal (a Ctrl-C) comes with the hint that a second Ctrl-C kills at
/// once.
///
/// # Errors
/// If the signal handlers cannot be installed.
pub fn stop_on_signals(shutdown: Shutdown) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let (first, number) = tokio::select! {
            _ = term.recv() => ("SIGTERM", libc::SIGTERM),
            _ = int.recv() => ("SIGINT", libc::SIGINT),
        };
        let reason = format!("{first} received");
        // Only when the signal is what stops the run (as its reason is).
        if !shutdown.is_stopping() {
            let _ = shutdown.signal.set(number);
        }
        let terminal = std::io::stdin().is_terminal()
            || std::io::stdout().is_terminal()
            || std::io::stderr().is_terminal();
        if first == "SIGINT" && terminal {
            shutdown.request_stop_with_hint(reason, "Ctrl-C again to kill at once");
        } else {
            shutdown.request_stop(reason);
        }
        let second = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        shutdown.kill_now(format!("second signal ({second}) received"));
    }))
}
