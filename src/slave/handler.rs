//! [`Handler`]: the synchronous face of the control channel.

use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::runtime::Runtime;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use super::error::SlaveError;
use super::layer::MasterLayer;
use super::link::{self, ControlRx, ControlTx, Orphaned, Outbox};
use crate::error_text::panic_text;
use crate::protocol::slave::{FromSlave, Identity, Level, ToSlave, CONTROL_FD_ENV};
use crate::protocol::{codec, decode, encode, ProtocolError, PROTOCOL_VERSION};

/// How long [`Handler::from_env`] waits for the master's identity frame.
pub const IDENTITY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait of [`Handler::flush`] (and so of [`Handler::run`] and of
/// dropping a handler) for the pending frames to reach the master.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Log messages longer than this many bytes are cut (a frame has a size
/// limit, and a log line that big is a bug anyway).
pub const MAX_LOG_LEN: usize = 1024 * 1024;

/// Set once a handler owns the control fd of this process.
static CONTROL_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// The slave side of the control channel, for programs started by a
/// taskherd master.
///
/// Made once per process by [`Handler::from_env`]. All methods are
/// synchronous and may be called from any thread (`Handler` is
/// `Send + Sync`); a small background runtime owns the socket. See the
/// [module docs](super) for an example.
pub struct Handler {
    /// Who this instance is, as sent by the master.
    identity: Identity,
    /// Cancelled when the master asks us to stop or goes away: the one
    /// stop signal behind `must_stop` and `sleep`.
    stop: CancellationToken,
    /// Queue to the writer task.
    outbox: Outbox,
    /// To block on the runtime from user threads.
    runtime_handle: tokio::runtime::Handle,
    /// The background runtime; taken and shut down on drop.
    runtime: Option<Runtime>,
    /// Jobs reported done through [`Handler::job_done`], for `max_jobs`.
    jobs_done: std::sync::atomic::AtomicU64,
}

/// Internal knobs of [`Handler::connect`], so tests can shorten waits and
/// watch the orphan guard without exiting.
pub(crate) struct ConnectOptions {
    /// Longest wait for the identity frame.
    pub(crate) identity_timeout: Duration,
    /// What the orphan guard does once the grace has passed.
    pub(crate) orphaned: Orphaned,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            identity_timeout: IDENTITY_TIMEOUT,
            orphaned: Box::new(exit_orphaned),
        }
    }
}

/// The orphan guard's verdict: the master is gone and the grace is over.
fn exit_orphaned() {
    // Stderr may be closed too; exiting matters more than the line.
    let _ = writeln!(std::io::stderr(), "taskherd: master gone, exiting");
    std::process::exit(1);
}

impl Handler {
    /// Connects to the master through the control fd named by the
    /// `TASKHERD_CONTROL_FD` environment variable.
    ///
    /// It marks the fd close-on-exec (so the program's own children do not
    /// inherit it), reads the identity frame (waiting at most
    /// [`IDENTITY_TIMEOUT`]), checks the protocol version, answers with a
    /// hello, and then clears the parent-death signal the master set at
    /// spawn time (on Linux): from now on the control channel tells us when
    /// the master is gone.
    ///
    /// # Stop requests
    ///
    /// The master's Stop frame, the master going away, and SIGTERM (from
    /// the master or an operator) all make [`must_stop`](Self::must_stop)
    /// true and [`sleep`](Self::sleep) return early: the program ends its
    /// work and returns.
    ///
    /// # No orphans
    ///
    /// When the control channel closes (the master died), the handler
    /// requests a stop ([`must_stop`](Self::must_stop) turns true and
    /// [`sleep`](Self::sleep) returns early). If the process is still alive
    /// [`Identity::stop_grace`] later, the handler prints
    /// `taskherd: master gone, exiting` to stderr and exits the process
    /// with status 1: a slave never outlives its master by more than the
    /// grace.
    ///
    /// # Errors
    ///
    /// - [`SlaveError::NotStarted`] when the variable is not set: the
    ///   program was not started by a master.
    /// - [`SlaveError::InvalidFdVar`], [`SlaveError::BadFd`],
    ///   [`SlaveError::NotASocket`] when the variable does not name an
    ///   open socket.
    /// - [`SlaveError::AlreadyTaken`] on a second call in one process.
    /// - [`SlaveError::IdentityTimeout`], [`SlaveError::ClosedBeforeIdentity`],
    ///   [`SlaveError::Handshake`], [`SlaveError::UnexpectedFirstFrame`],
    ///   [`SlaveError::VersionMismatch`] when the handshake fails.
    /// - [`SlaveError::Runtime`] when the background runtime cannot start.
    pub fn from_env() -> Result<Handler, SlaveError> {
        let value = std::env::var_os(CONTROL_FD_ENV).ok_or(SlaveError::NotStarted)?;
        let fd = parse_control_fd(&value.to_string_lossy())?;
        // SAFETY: the number is only passed to fstat(2) and fcntl(2), and
        // nothing closes it while the borrow lives (it ends before the
        // ownership is taken). If nothing is open there (which the check
        // is for), fstat(2) answers EBADF: no other file is touched.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        check_control_fd(borrowed)?;
        if CONTROL_FD_TAKEN.swap(true, Ordering::SeqCst) {
            return Err(SlaveError::AlreadyTaken);
        }
        set_cloexec(borrowed)?;
        // SAFETY: `fd` is open and is a socket (checked above); the master
        // handed it to this process for the control channel, and
        // `CONTROL_FD_TAKEN` makes sure only one owner is ever made.
        let control = unsafe { OwnedFd::from_raw_fd(fd) };
        let handler = Handler::from_fd(control)?;
        clear_parent_death_signal();
        handler.stop_on_sigterm()?;
        Ok(handler)
    }

    /// Turns SIGTERM into a stop request, like the master's Stop frame: an
    /// operator's `kill`, or the master's SIGTERM to an instance whose
    /// hello it has not read yet, ends the work cleanly instead of killing
    /// the process mid-job.
    fn stop_on_sigterm(&self) -> Result<(), SlaveError> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = {
            let _entered = self.runtime_handle.enter();
            signal(SignalKind::terminate()).map_err(SlaveError::Runtime)?
        };
        let stop = self.stop.clone();
        self.runtime_handle.spawn(async move {
            if term.recv().await.is_some() {
                stop.cancel();
            }
        });
        Ok(())
    }

    /// Connects to the master over an already open control socket.
    pub(crate) fn from_fd(control: OwnedFd) -> Result<Handler, SlaveError> {
        Handler::connect(control, ConnectOptions::default())
    }

    /// Starts the runtime, runs the handshake and spawns the reader and
    /// writer tasks.
    pub(crate) fn connect(
        control: OwnedFd,
        options: ConnectOptions,
    ) -> Result<Handler, SlaveError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .thread_name("taskherd-slave")
            .on_thread_start(link::mark_slave_runtime_thread)
            .enable_io()
            .enable_time()
            .build()
            .map_err(SlaveError::Runtime)?;
        let runtime_handle = runtime.handle().clone();

        let stream = std::os::unix::net::UnixStream::from(control);
        stream
            .set_nonblocking(true)
            .map_err(|err| SlaveError::Handshake(ProtocolError::Io(err)))?;
        let stream = {
            let _entered = runtime.enter();
            tokio::net::UnixStream::from_std(stream)
                .map_err(|err| SlaveError::Handshake(ProtocolError::Io(err)))?
        };
        let (read_half, write_half) = stream.into_split();
        let mut control_rx = FramedRead::new(read_half, codec());
        let mut control_tx = FramedWrite::new(write_half, codec());

        let identity_timeout = options.identity_timeout;
        let handshake = async {
            tokio::time::timeout(
                identity_timeout,
                handshake(&mut control_rx, &mut control_tx),
            )
            .await
            .unwrap_or(Err(SlaveError::IdentityTimeout {
                waited: identity_timeout,
            }))
        };
        let handle = &runtime_handle;
        let identity =
            link::outside_runtime(|| handle.block_on(handshake)).ok_or_else(|| {
                SlaveError::Runtime(std::io::Error::other(
                    "cannot wait for the handshake from this thread",
                ))
            })??;

        let stop = CancellationToken::new();
        let (outbox, frames_rx) = Outbox::new();
        runtime.spawn(link::read_control(
            control_rx,
            stop.clone(),
            identity.stop_grace,
            options.orphaned,
        ));
        runtime.spawn(link::write_control(control_tx, frames_rx));

        Ok(Handler {
            identity,
            stop,
            outbox,
            runtime_handle,
            runtime: Some(runtime),
            jobs_done: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Everything the master said about this instance.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Global instance id, 1..N over all groups in config order.
    pub fn id(&self) -> u32 {
        self.identity.id
    }

    /// Id within the group, 1..[`group_count`](Self::group_count).
    pub fn group_id(&self) -> u32 {
        self.identity.group_id
    }

    /// Number of instances of the group, over all hosts.
    pub fn group_count(&self) -> u32 {
        self.identity.group_count
    }

    /// Name of the group.
    pub fn group(&self) -> &str {
        &self.identity.group
    }

    /// Host name as the master knows it (`localhost` for local instances).
    pub fn host(&self) -> &str {
        &self.identity.host
    }

    /// The values the config's `[host_vars]` gives this instance's host
    /// (also in its environment); empty for local instances.
    pub fn vars(&self) -> &std::collections::BTreeMap<String, String> {
        &self.identity.vars
    }

    /// The group's params, as given in the config.
    pub fn params(&self) -> &serde_json::Value {
        &self.identity.params
    }

    /// The group's params, deserialized into `T`.
    ///
    /// # Errors
    ///
    /// [`SlaveError::Params`] when the params do not fit `T`.
    pub fn params_as<T: DeserializeOwned>(&self) -> Result<T, SlaveError> {
        T::deserialize(&self.identity.params).map_err(|cause| SlaveError::Params {
            group: self.identity.group.clone(),
            cause,
        })
    }

    /// Counts one job done, for recycling; returns `false` when the
    /// instance should stop now because it reached the group's `max_jobs`
    /// (then [`must_stop`](Self::must_stop) is true too, and the master
    /// starts a fresh instance after this one ends).
    ///
    /// Without `max_jobs` it only counts, and returns `!must_stop()`.
    pub fn job_done(&self) -> bool {
        let done = self.jobs_done.fetch_add(1, Ordering::SeqCst) + 1;
        if self.identity.max_jobs == Some(done) {
            self.outbox.send(FromSlave::Recycle {
                reason: format!("did its max of {done} jobs"),
            });
            self.stop.cancel();
        }
        !self.must_stop()
    }

    /// Jobs counted by [`job_done`](Self::job_done) so far.
    pub fn jobs_done(&self) -> u64 {
        self.jobs_done.load(Ordering::SeqCst)
    }

    /// `true` once the master asked us to stop, or went away.
    ///
    /// Long-running work should check it between units of work and return
    /// soon after it turns true: the master SIGKILLs the process
    /// [`Identity::stop_grace`] after asking.
    pub fn must_stop(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// A token cancelled when [`must_stop`](Self::must_stop) turns true,
    /// for async code (`token.cancelled().await`).
    ///
    /// It is a child token: cancelling it does not stop the handler.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// The handler's own stop token (not a child): cancelling it stops
    /// the instance as the master's Stop does. For the built-in roles that
    /// must end on their own (a coprocess that broke the protocol).
    pub(crate) fn stop_root(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Tells the master this instance is alive.
    ///
    /// Needed only when the group has a liveness timeout and the program
    /// neither logs, prints nor calls [`sleep`](Self::sleep) for that long.
    /// Never blocks: when frames are already waiting to be sent (they count
    /// as liveness too) the ping is dropped.
    pub fn ping(&self) {
        self.outbox.try_send(FromSlave::Ping);
    }

    /// Tells the master this instance is ready to serve: the groups that
    /// start `after` its group (with `[group.ready] notify = true`) may
    /// start once every instance of it said so. Call it once the program
    /// can do its work (listens, connected, warmed up); calling it again
    /// is harmless. Without `notify = true` in the group's config the
    /// master ignores it.
    pub fn ready(&self) {
        self.outbox.send(FromSlave::Ready);
    }

    /// Sleeps up to `duration`, waking early when a stop is requested.
    ///
    /// Returns `true` when it slept the whole time, `false` when it
    /// returned early because [`must_stop`](Self::must_stop) is true. While
    /// it sleeps it pings the master every third of the liveness timeout,
    /// so a long sleep never makes the instance look hung.
    ///
    /// Meant for plain threads; called from inside an async runtime it
    /// blocks a helper thread instead of panicking.
    pub fn sleep(&self, duration: Duration) -> bool {
        if self.must_stop() {
            return false;
        }
        let ping_every = self.ping_interval();
        if let Some(every) = ping_every {
            if self.outbox.since_last_sent() >= every {
                self.ping();
            }
        }
        let stop = self.stop.clone();
        let outbox = self.outbox.clone();
        let nap = async move {
            let started = tokio::time::Instant::now();
            loop {
                let left = duration.saturating_sub(started.elapsed());
                if left.is_zero() {
                    return true;
                }
                let step = ping_every.map_or(left, |every| every.min(left));
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return false,
                    () = tokio::time::sleep(step) => {}
                }
                if step < left {
                    outbox.try_send(FromSlave::Ping);
                }
            }
        };
        self.block_on(nap).unwrap_or_else(|| !self.must_stop())
    }

    /// How often to ping while sleeping: a third of the liveness timeout.
    fn ping_interval(&self) -> Option<Duration> {
        self.identity
            .timeout
            .filter(|timeout| !timeout.is_zero())
            .map(|timeout| (timeout / 3).max(Duration::from_millis(1)))
    }

    /// Sends a log record to the master, which logs it for this instance.
    ///
    /// Waits when many records are already queued (backpressure), so a
    /// chatty program cannot eat memory. Once the master is gone it does
    /// nothing. Messages above [`MAX_LOG_LEN`] bytes are cut.
    pub fn log(&self, level: Level, message: impl Into<String>) {
        let message = truncate_message(message.into());
        self.outbox.send(FromSlave::Log { level, message });
    }

    /// Sends a [`Level::Debug`] record; see [`log`](Self::log).
    pub fn debug(&self, message: impl Into<String>) {
        self.log(Level::Debug, message);
    }

    /// Sends a [`Level::Info`] record; see [`log`](Self::log).
    pub fn info(&self, message: impl Into<String>) {
        self.log(Level::Info, message);
    }

    /// Sends a [`Level::Warning`] record; see [`log`](Self::log).
    pub fn warning(&self, message: impl Into<String>) {
        self.log(Level::Warning, message);
    }

    /// Sends a [`Level::Error`] record; see [`log`](Self::log).
    pub fn error(&self, message: impl Into<String>) {
        self.log(Level::Error, message);
    }

    /// Waits until every frame sent so far has been written to the master,
    /// at most [`FLUSH_TIMEOUT`].
    ///
    /// Returns `false` when they may not all have been written (master
    /// gone, or not reading). Useful before `std::process::exit`;
    /// [`run`](Self::run) and dropping the handler flush already.
    pub fn flush(&self) -> bool {
        self.deliver(None)
    }

    /// Queues `last` (if any), then waits for the writer to catch up.
    fn deliver(&self, last: Option<FromSlave>) -> bool {
        let outbox = self.outbox.clone();
        let delivery = async move {
            let all_written = async {
                if let Some(frame) = last {
                    if !outbox.send_async(link::Outgoing::Frame(frame)).await {
                        return false;
                    }
                }
                outbox.flush().await
            };
            tokio::time::timeout(FLUSH_TIMEOUT, all_written)
                .await
                .unwrap_or(false)
        };
        self.block_on(delivery).unwrap_or(false)
    }

    /// A [`tracing_subscriber::Layer`] that forwards `tracing` events to the
    /// master as log records, for programs that build their own
    /// subscriber. [`init_tracing`](Self::init_tracing) is the short way.
    pub fn tracing_layer(&self) -> MasterLayer {
        MasterLayer::new(self.outbox.clone())
    }

    /// Installs a global `tracing` subscriber that sends every event to the
    /// master (see [`tracing_layer`](Self::tracing_layer)).
    ///
    /// The level is taken from `RUST_LOG` when it is a plain level name
    /// (`debug`, `info`, `warn`, `error`, `trace`, `off`), and is `info`
    /// otherwise.
    ///
    /// # Errors
    ///
    /// [`SlaveError::Tracing`] when a global subscriber is already set.
    pub fn init_tracing(&self) -> Result<(), SlaveError> {
        let dispatch = super::layer::master_dispatch(self.tracing_layer());
        tracing::dispatcher::set_global_default(dispatch).map_err(SlaveError::Tracing)
    }

    /// Runs the program's work and reports how it ended, then returns the
    /// exit code for `main`.
    ///
    /// `f` runs on this thread. Its result is sent to the master as the
    /// outcome: `Ok` is a success; an `Err` (its `{:#}` display as the
    /// message) or a panic (its payload text as the message) is a failure,
    /// never a success. Pending frames are then flushed (at most
    /// [`FLUSH_TIMEOUT`]). Returns [`ExitCode::SUCCESS`] or
    /// [`ExitCode::FAILURE`].
    ///
    /// If the master cannot be told (it is gone), a failure message is
    /// printed to stderr instead.
    pub fn run<F, E>(self, f: F) -> ExitCode
    where
        F: FnOnce(&Handler) -> Result<(), E>,
        E: fmt::Display,
    {
        let result = panic::catch_unwind(AssertUnwindSafe(|| f(&self)));
        let result = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("{err:#}")),
            Err(payload) => Err(panic_text(payload.as_ref())),
        };
        self.report_outcome(result)
    }

    /// Sends the outcome frame (`Err` carries the failure message),
    /// flushes, and gives the exit code: the end of [`run`](Self::run),
    /// for callers that share the handler (the queue roles).
    pub(crate) fn report_outcome(&self, result: Result<(), String>) -> ExitCode {
        let (success, message) = match result {
            Ok(()) => (true, None),
            Err(message) => (false, Some(message)),
        };
        let outcome = FromSlave::Outcome {
            success,
            message: message.clone(),
        };
        if !self.deliver(Some(outcome)) {
            if let Some(message) = message {
                let _ = writeln!(std::io::stderr(), "taskherd: {message}");
            }
        }
        if success {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }

    /// The queue to the writer task, for frames the queue roles send
    /// (`Listening`, `Progress`).
    pub(crate) fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// Blocks on the runtime from wherever we are (see
    /// [`link::outside_runtime`]).
    fn block_on<F>(&self, future: F) -> Option<F::Output>
    where
        F: Future + Send,
        F::Output: Send,
    {
        let handle = &self.runtime_handle;
        link::outside_runtime(|| handle.block_on(future))
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("identity", &self.identity)
            .field("must_stop", &self.must_stop())
            .finish_non_exhaustive()
    }
}

impl Drop for Handler {
    /// Flushes pending frames (at most [`FLUSH_TIMEOUT`]) and stops the
    /// background runtime, which closes the control channel.
    fn drop(&mut self) {
        self.flush();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Reads the identity, checks the version and answers with a hello.
async fn handshake(
    control_rx: &mut ControlRx,
    control_tx: &mut ControlTx,
) -> Result<Identity, SlaveError> {
    let body = match control_rx.next().await {
        None => return Err(SlaveError::ClosedBeforeIdentity),
        Some(Err(err)) => return Err(SlaveError::Handshake(ProtocolError::Io(err))),
        Some(Ok(body)) => body,
    };
    let (version, identity) = match decode::<ToSlave>(&body).map_err(SlaveError::Handshake)? {
        ToSlave::Identity { version, identity } => (version, identity),
        other => {
            return Err(SlaveError::UnexpectedFirstFrame {
                got: format!("{other:?}"),
            })
        }
    };
    // Answer even on a version mismatch: the master then knows this is a
    // library slave of another version and can say so.
    let hello = encode(&FromSlave::Hello {
        version: PROTOCOL_VERSION,
    })
    .map_err(SlaveError::Handshake)?;
    let sent = control_tx.send(hello).await;
    if version != PROTOCOL_VERSION {
        return Err(SlaveError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
        });
    }
    sent.map_err(|err| SlaveError::Handshake(ProtocolError::Io(err)))?;
    Ok(identity)
}

/// Parses the value of the control fd variable.
fn parse_control_fd(value: &str) -> Result<RawFd, SlaveError> {
    match value.trim().parse::<RawFd>() {
        Ok(fd) if fd > 2 => Ok(fd),
        _ => Err(SlaveError::InvalidFdVar {
            value: value.to_string(),
        }),
    }
}

/// Checks that `fd` is open and is a socket, without taking it.
fn check_control_fd(fd: BorrowedFd<'_>) -> Result<(), SlaveError> {
    let stat = rustix::fs::fstat(fd).map_err(|errno| SlaveError::BadFd {
        fd: fd.as_raw_fd(),
        source: errno.into(),
    })?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        return Err(SlaveError::NotASocket { fd: fd.as_raw_fd() });
    }
    Ok(())
}

/// Marks `fd` close-on-exec, so the program's own children never inherit
/// the control channel.
fn set_cloexec(fd: BorrowedFd<'_>) -> Result<(), SlaveError> {
    let bad_fd = |errno: rustix::io::Errno| SlaveError::BadFd {
        fd: fd.as_raw_fd(),
        source: errno.into(),
    };
    let flags = rustix::io::fcntl_getfd(fd).map_err(bad_fd)?;
    rustix::io::fcntl_setfd(fd, flags | rustix::io::FdFlags::CLOEXEC).map_err(bad_fd)
}

/// Clears the parent-death signal the master sets for plain programs: a
/// library slave is told by its control channel instead, and gets the
/// stop grace to finish.
fn clear_parent_death_signal() {
    // Failure is harmless (the signal stays), so the result is ignored.
    let _ = rustix::process::set_parent_process_death_signal(None);
}

/// Cuts `message` to [`MAX_LOG_LEN`] bytes on a char boundary.
fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_LOG_LEN {
        let mut end = MAX_LOG_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read as _;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    /// The master's end of a control socket, blocking, for tests.
    pub(crate) struct FakeMaster {
        stream: UnixStream,
    }

    impl FakeMaster {
        pub(crate) fn send(&mut self, message: &ToSlave) {
            let body = encode(message).unwrap();
            let len = u32::try_from(body.len()).unwrap();
            self.stream.write_all(&len.to_be_bytes()).unwrap();
            self.stream.write_all(&body).unwrap();
        }

        /// The next frame, `None` at the end of the stream.
        pub(crate) fn recv(&mut self) -> Option<FromSlave> {
            self.stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut len = [0u8; 4];
            match self.stream.read_exact(&mut len) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return None,
                Err(err) => panic!("reading from the slave: {err}"),
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            self.stream.read_exact(&mut body).unwrap();
            Some(decode(&body).unwrap())
        }

        /// The next frame that is not a ping.
        pub(crate) fn recv_no_ping(&mut self) -> Option<FromSlave> {
            loop {
                match self.recv() {
                    Some(FromSlave::Ping) => continue,
                    other => return other,
                }
            }
        }
    }

    pub(crate) fn identity() -> Identity {
        Identity {
            vars: Default::default(),
            id: 7,
            group_id: 2,
            group_count: 3,
            group: "workers".into(),
            host: "localhost".into(),
            params: serde_json::json!({"message": "hi", "count": 4}),
            timeout: None,
            // Long enough that the orphan guard never fires in a test.
            stop_grace: Duration::from_secs(3600),
            max_jobs: None,
            queue: None,
        }
    }

    fn no_exit() -> ConnectOptions {
        ConnectOptions {
            identity_timeout: Duration::from_secs(10),
            orphaned: Box::new(|| panic!("orphan guard fired in a test")),
        }
    }

    fn socket_pair() -> (FakeMaster, OwnedFd) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (FakeMaster { stream: theirs }, OwnedFd::from(ours))
    }

    /// A connected handler with the given identity, hello already read.
    pub(crate) fn connected_with(
        identity: Identity,
        options: ConnectOptions,
    ) -> (FakeMaster, Handler) {
        let (mut master, fd) = socket_pair();
        master.send(&ToSlave::Identity {
            version: PROTOCOL_VERSION,
            identity,
        });
        let handler = Handler::connect(fd, options).unwrap();
        assert_eq!(
            master.recv(),
            Some(FromSlave::Hello {
                version: PROTOCOL_VERSION
            })
        );
        (master, handler)
    }

    pub(crate) fn connected() -> (FakeMaster, Handler) {
        connected_with(identity(), no_exit())
    }

    #[test]
    fn handler_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Handler>();
    }

    #[test]
    fn identity_received_and_hello_sent() {
        let (_master, handler) = connected();
        assert_eq!(handler.identity(), &identity());
        assert_eq!(handler.id(), 7);
        assert_eq!(handler.group_id(), 2);
        assert_eq!(handler.group_count(), 3);
        assert_eq!(handler.group(), "workers");
        assert_eq!(handler.host(), "localhost");
        assert_eq!(handler.params()["message"], "hi");
        assert!(!handler.must_stop());

        #[derive(serde::Deserialize)]
        struct Params {
            message: String,
            count: u32,
        }
        let params: Params = handler.params_as().unwrap();
        assert_eq!((params.message.as_str(), params.count), ("hi", 4));
        let err = handler.params_as::<Vec<u8>>().unwrap_err();
        assert!(matches!(err, SlaveError::Params { .. }), "{err}");

        // Serde's reason is in the message itself: `{err}` is all most
        // programs print.
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Other {
            message: String,
            missing: u32,
        }
        let err = handler.params_as::<Other>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "params of group \"workers\" do not match the expected type: missing field `missing`"
        );
        let err = handler.params_as::<Vec<u8>>().unwrap_err();
        assert!(
            err.to_string()
                .contains("invalid type: map, expected a sequence"),
            "{err}"
        );
    }

    #[test]
    fn must_stop_after_stop_frame() {
        let (mut master, handler) = connected();
        master.send(&ToSlave::Stop);
        assert!(!handler.sleep(Duration::from_secs(30)));
        assert!(handler.must_stop());
        assert!(handler.stop_token().is_cancelled());
    }

    #[test]
    fn must_stop_when_master_closes() {
        let (master, handler) = connected();
        drop(master);
        assert!(!handler.sleep(Duration::from_secs(30)));
        assert!(handler.must_stop());
    }

    #[test]
    fn orphan_guard_fires_after_grace() {
        let (fired_tx, fired_rx) = std::sync::mpsc::channel();
        let options = ConnectOptions {
            identity_timeout: Duration::from_secs(10),
            orphaned: Box::new(move || {
                let _ = fired_tx.send(Instant::now());
            }),
        };
        let identity = Identity {
            vars: Default::default(),
            stop_grace: Duration::from_millis(200),
            ..identity()
        };
        let (master, handler) = connected_with(identity, options);
        let closed = Instant::now();
        drop(master);
        let fired = fired_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(handler.must_stop());
        assert!(fired - closed >= Duration::from_millis(200));
    }

    #[test]
    fn sleep_returns_early_on_stop() {
        let (mut master, handler) = connected();
        let started = Instant::now();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            master.send(&ToSlave::Stop);
            master
        });
        assert!(!handler.sleep(Duration::from_secs(30)));
        assert!(started.elapsed() < Duration::from_secs(10));
        let _master = stopper.join().unwrap();
    }

    #[test]
    fn ready_reaches_the_master() {
        let (mut master, handler) = connected();
        handler.ready();
        handler.info("after");
        assert_eq!(master.recv(), Some(FromSlave::Ready));
        assert!(matches!(master.recv(), Some(FromSlave::Log { .. })));
    }

    #[test]
    fn sleep_sleeps_the_whole_time() {
        let (_master, handler) = connected();
        let started = Instant::now();
        assert!(handler.sleep(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(handler.sleep(Duration::ZERO));
    }

    #[test]
    fn sleep_pings() {
        let identity = Identity {
            vars: Default::default(),
            timeout: Some(Duration::from_millis(150)),
            ..identity()
        };
        let (mut master, handler) = connected_with(identity, no_exit());
        assert!(handler.sleep(Duration::from_millis(280)));
        handler.info("done");
        let mut pings = 0;
        loop {
            match master.recv() {
                Some(FromSlave::Ping) => pings += 1,
                Some(FromSlave::Log { message, .. }) if message == "done" => break,
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert!(pings >= 3, "{pings} pings");
    }

    #[test]
    fn log_frames_carry_level() {
        let (mut master, handler) = connected();
        handler.log(Level::Emergency, "on fire");
        handler.debug("d");
        handler.info("i");
        handler.warning("w");
        handler.error("e");
        let expected = [
            (Level::Emergency, "on fire"),
            (Level::Debug, "d"),
            (Level::Info, "i"),
            (Level::Warning, "w"),
            (Level::Error, "e"),
        ];
        for (level, message) in expected {
            assert_eq!(
                master.recv(),
                Some(FromSlave::Log {
                    level,
                    message: message.into()
                })
            );
        }
    }

    #[test]
    fn logging_after_master_gone_does_nothing() {
        let (master, handler) = connected();
        drop(master);
        assert!(!handler.sleep(Duration::from_secs(30)));
        for n in 0..(3 * link::OUTBOX_CAPACITY) {
            handler.info(format!("line {n}"));
            handler.ping();
        }
        assert!(!handler.flush());
    }

    #[test]
    fn works_from_inside_an_async_runtime() {
        let (mut master, handler) = connected();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            handler.info("from async");
            assert!(handler.sleep(Duration::from_millis(10)));
            assert!(handler.flush());
        });
        assert_eq!(
            master.recv(),
            Some(FromSlave::Log {
                level: Level::Info,
                message: "from async".into()
            })
        );
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "é".repeat(MAX_LOG_LEN);
        let cut = truncate_message(long);
        assert!(cut.len() <= MAX_LOG_LEN + '…'.len_utf8());
        assert!(cut.ends_with('…'));
    }

    fn outcome(master: &mut FakeMaster) -> FromSlave {
        let frame = master.recv_no_ping().unwrap();
        assert!(matches!(frame, FromSlave::Outcome { .. }), "{frame:?}");
        assert_eq!(master.recv(), None, "channel closed after the outcome");
        frame
    }

    #[test]
    fn run_reports_success() {
        let (mut master, handler) = connected();
        let code = handler.run(|h| {
            h.info("working");
            Ok::<(), String>(())
        });
        assert_eq!(code, ExitCode::SUCCESS);
        assert!(matches!(master.recv(), Some(FromSlave::Log { .. })));
        assert_eq!(
            outcome(&mut master),
            FromSlave::Outcome {
                success: true,
                message: None
            }
        );
    }

    #[test]
    fn run_reports_failure_on_error() {
        let (mut master, handler) = connected();
        let code = handler.run(|_| Err("no database"));
        assert_eq!(code, ExitCode::FAILURE);
        assert_eq!(
            outcome(&mut master),
            FromSlave::Outcome {
                success: false,
                message: Some("no database".into())
            }
        );
    }

    #[test]
    fn run_reports_failure_on_panic() {
        let (mut master, handler) = connected();
        let code = handler.run(|_| -> Result<(), String> { panic!("kaboom {}", 42) });
        assert_eq!(code, ExitCode::FAILURE);
        assert_eq!(
            outcome(&mut master),
            FromSlave::Outcome {
                success: false,
                message: Some("kaboom 42".into())
            }
        );
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let (mut master, fd) = socket_pair();
        master.send(&ToSlave::Identity {
            version: 999,
            identity: identity(),
        });
        let err = Handler::connect(fd, no_exit()).unwrap_err();
        assert!(matches!(
            err,
            SlaveError::VersionMismatch { theirs: 999, .. }
        ));
        let text = err.to_string();
        assert!(
            text.contains("999") && text.contains(&PROTOCOL_VERSION.to_string()),
            "{text}"
        );
        assert!(matches!(master.recv(), Some(FromSlave::Hello { .. })));
    }

    #[test]
    fn first_frame_must_be_identity() {
        let (mut master, fd) = socket_pair();
        master.send(&ToSlave::Stop);
        let err = Handler::connect(fd, no_exit()).unwrap_err();
        assert!(
            matches!(err, SlaveError::UnexpectedFirstFrame { .. }),
            "{err}"
        );
    }

    #[test]
    fn identity_wait_is_bounded() {
        let (_master, fd) = socket_pair();
        let options = ConnectOptions {
            identity_timeout: Duration::from_millis(100),
            ..no_exit()
        };
        let err = Handler::connect(fd, options).unwrap_err();
        assert!(matches!(err, SlaveError::IdentityTimeout { .. }), "{err}");
    }

    #[test]
    fn master_closing_before_identity_is_an_error() {
        let (master, fd) = socket_pair();
        drop(master);
        let err = Handler::connect(fd, no_exit()).unwrap_err();
        assert!(matches!(err, SlaveError::ClosedBeforeIdentity), "{err}");
    }

    #[test]
    fn not_started_error_says_what_to_do() {
        let text = SlaveError::NotStarted.to_string();
        assert!(text.starts_with("not started by taskherd"), "{text}");
        assert!(
            text.contains(CONTROL_FD_ENV) && text.contains("taskherd run"),
            "{text}"
        );
        if std::env::var_os(CONTROL_FD_ENV).is_none() {
            let err = Handler::from_env().unwrap_err();
            assert!(matches!(err, SlaveError::NotStarted), "{err}");
        }
    }

    #[test]
    fn control_fd_is_checked() {
        assert!(matches!(
            parse_control_fd("abc"),
            Err(SlaveError::InvalidFdVar { .. })
        ));
        assert!(matches!(
            parse_control_fd("1"),
            Err(SlaveError::InvalidFdVar { .. })
        ));
        assert!(matches!(
            parse_control_fd("-4"),
            Err(SlaveError::InvalidFdVar { .. })
        ));
        assert_eq!(parse_control_fd(" 3\n").unwrap(), 3);
        // SAFETY: only passed to fstat(2), which answers EBADF: nothing is
        // open at that number.
        let closed = unsafe { BorrowedFd::borrow_raw(1_000_000) };
        assert!(matches!(
            check_control_fd(closed),
            Err(SlaveError::BadFd { fd: 1_000_000, .. })
        ));
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            check_control_fd(std::os::fd::AsFd::as_fd(&file)),
            Err(SlaveError::NotASocket { .. })
        ));
        let (sock, _other) = UnixStream::pair().unwrap();
        check_control_fd(std::os::fd::AsFd::as_fd(&sock)).unwrap();
    }
}
