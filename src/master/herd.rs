//! A running herd as operators and embedding programs see it: the board
//! (the master's core, shared for its status), the [`Herd`] handle
//! (status, suspend, resume, restart, reload, stop), the [`Events`]
//! callbacks, and the [`Launcher`] that runs a config with them.

use super::core::{Core, Effect, Event, Now};
use super::http::EventTally;
use super::launcher::RunReport;
use super::request::Answer;
use super::request::{HerdError, Reply, Request};
use crate::config::Config;
use crate::log::{InstanceLabel, LogSink};
use crate::protocol::control::{HerdStatus, Target};
use crate::supervise::instance::{EventKind, InstanceEvent};
use crate::supervise::shutdown::Shutdown;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// How often [`Events::check`] is called while the herd runs.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Callbacks of a running herd, for programs that embed the master (the
/// original's EventsInterface). Every method has an empty default.
///
/// They are called in order from one task, for local and remote
/// instances alike; keep them short (hand long work to a thread). The
/// [`Herd`] they get can suspend, resume, restart and stop: those calls
/// only ask, and return at once.
///
/// ```no_run
/// use taskherd::master::{Events, Herd, InstanceLabel, Launcher};
///
/// struct SuspendWebOnStart;
///
/// impl Events for SuspendWebOnStart {
///     fn process_started(&self, herd: &Herd, instance: &InstanceLabel, pid: u32) {
///         println!("{instance} runs as pid {pid}");
///         if instance.group == "web" {
///             herd.suspend("web");
///         }
///     }
/// }
///
/// let config = taskherd::config::Config::load("herd.toml".as_ref()).expect("valid config");
/// let report = Launcher::new(config)
///     .events(SuspendWebOnStart)
///     .run_blocking()
///     .expect("master started");
/// assert!(report.success());
/// ```
#[allow(unused_variables)]
pub trait Events: Send + Sync + 'static {
    /// The herd is about to start its instances.
    fn starting(&self, herd: &Herd) {}
    /// Every instance of the config was handed to its supervisor.
    fn started(&self, herd: &Herd) {}
    /// Called every second while the herd runs.
    fn check(&self, herd: &Herd) {}
    /// The herd has ended: every instance is done.
    fn stopped(&self, report: &RunReport) {}
    /// An instance's process is about to be spawned.
    fn process_created(&self, herd: &Herd, instance: &InstanceLabel) {}
    /// An instance's process runs.
    fn process_started(&self, herd: &Herd, instance: &InstanceLabel, pid: u32) {}
    /// An instance gave no sign of life within its timeout.
    fn process_timed_out(&self, herd: &Herd, instance: &InstanceLabel) {}
    /// An instance's process ended (`how`: "exited with code 0", ...).
    fn process_stopped(&self, herd: &Herd, instance: &InstanceLabel, how: &str) {}
    /// An instance gave a sign of life (at most every few seconds).
    fn process_seen(&self, herd: &Herd, instance: &InstanceLabel) {}
    /// Every event, including those above, for programs that want all.
    fn event(&self, herd: &Herd, instance: &InstanceLabel, event: &EventKind) {}
}

/// An operator's request from a [`Herd`] handle, with where the answer
/// goes when the asker waits for it.
pub(crate) type Ask = (Request, Option<Reply>);

/// A handle on a running herd: its status, and the operator's actions.
///
/// Cheap to clone. Methods that act (suspend, ...) ask the run loop and
/// return at once; the `_and_wait` forms wait until it is done.
#[derive(Debug, Clone)]
pub struct Herd {
    board: Board,
    asks: mpsc::UnboundedSender<Ask>,
}

impl Herd {
    pub(crate) fn new(board: Board, asks: mpsc::UnboundedSender<Ask>) -> Self {
        Herd { board, asks }
    }

    /// Every group and instance, with their state.
    pub fn status(&self) -> HerdStatus {
        self.board.status()
    }

    /// Stops a group's instances and keeps them stopped (the original's
    /// suspendGroup).
    pub fn suspend(&self, group: &str) {
        self.tell(Request::Suspend {
            group: group.to_string(),
        });
    }

    /// Starts a suspended group's instances again (resumeGroup).
    pub fn resume(&self, group: &str) {
        self.tell(Request::Resume {
            group: group.to_string(),
        });
    }

    /// Restarts a group's instances one at a time.
    pub fn restart(&self, group: &str) {
        self.tell(Request::Restart {
            target: Target::group(group),
        });
    }

    /// Re-reads the config file and applies the differences.
    pub fn reload(&self) {
        self.tell(Request::Reload);
    }

    /// Stops the whole herd cleanly.
    pub fn stop(&self, reason: &str) {
        self.tell(Request::Stop {
            kill: false,
            reason: reason.to_string(),
        });
    }

    /// Suspends a group and waits until its instances are stopped.
    ///
    /// # Errors
    /// An unknown group, or a herd that is ending.
    pub async fn suspend_and_wait(&self, group: &str) -> Result<String, HerdError> {
        self.ask(Request::Suspend {
            group: group.to_string(),
        })
        .await
    }

    /// Resumes a group and waits until its instances run again.
    ///
    /// # Errors
    /// An unknown group, or a herd that is ending.
    pub async fn resume_and_wait(&self, group: &str) -> Result<String, HerdError> {
        self.ask(Request::Resume {
            group: group.to_string(),
        })
        .await
    }

    /// Restarts a group, one instance at a time, each once the previous one
    /// runs again; returns when the last one runs.
    ///
    /// # Errors
    /// An unknown group, an instance that did not come back, or a herd
    /// that is ending.
    pub async fn restart_and_wait(&self, group: &str) -> Result<String, HerdError> {
        self.restart_target_and_wait(&Target::group(group)).await
    }

    /// Restarts a group or one instance (`web:2`): running instances one
    /// at a time, each once the previous one runs again, ended ones
    /// (failed, stopped, completed) started again; returns when the last
    /// one runs.
    ///
    /// # Errors
    /// An unknown group or instance, an instance that did not come back,
    /// or a herd that is ending.
    pub async fn restart_target_and_wait(&self, target: &Target) -> Result<String, HerdError> {
        self.ask(Request::Restart {
            target: target.clone(),
        })
        .await
    }

    /// Starts the instances of a group, or one instance, that do not run
    /// (failed ones with a fresh restart budget, stopped ones, completed
    /// ones, those of an `autostart = false` group); returns once they
    /// run, saying what was done.
    ///
    /// # Errors
    /// An unknown group or instance, a queue group, an instance that did
    /// not start, or a herd that is ending.
    pub async fn start_and_wait(&self, target: &Target) -> Result<String, HerdError> {
        self.ask(Request::Start {
            target: target.clone(),
        })
        .await
    }

    /// Stops the instances of a group, or one instance, and keeps them
    /// stopped until started; returns once they have ended. The herd goes
    /// on (until stopped, while an instance is stopped so).
    ///
    /// # Errors
    /// An unknown group or instance, a queue group, instances that did
    /// not end in time, or a herd that is ending.
    pub async fn stop_and_wait(&self, target: &Target) -> Result<String, HerdError> {
        self.ask(Request::StopInstances {
            target: target.clone(),
        })
        .await
    }

    /// Reloads the config and waits until the changes are applied.
    ///
    /// # Errors
    /// An invalid config (with every error; the herd is untouched), or a
    /// herd that is ending.
    pub async fn reload_and_wait(&self) -> Result<String, HerdError> {
        self.ask(Request::Reload).await
    }

    /// Asks without waiting for the answer.
    fn tell(&self, request: Request) {
        let _ = self.asks.send((request, None));
    }

    async fn ask(&self, request: Request) -> Result<String, HerdError> {
        Ok(self.answer(request).await?.into_message())
    }

    /// Asks the run loop and waits for its answer (the HTTP interface's
    /// way in: the same requests as the handle's and the control socket's).
    pub(crate) async fn answer(&self, request: Request) -> Result<Answer, HerdError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.asks
            .send((request, Some(Reply::Handle(reply_tx))))
            .map_err(|_| HerdError::Ending)?;
        reply_rx.await.map_err(|_| HerdError::Ending)?
    }

    /// The board behind the handle (the HTTP interface reads its events
    /// and counts).
    pub(crate) fn board(&self) -> &Board {
        &self.board
    }
}

/// The master's core, shared: the run loop feeds it events, handles read
/// its status.
///
/// Only the run loop changes the core (through [`Board::handle`]);
/// [`Herd`] handles and the progress line lock it for the moment it takes
/// to copy a status.
#[derive(Debug, Clone)]
pub(crate) struct Board {
    core: Arc<Mutex<Core>>,
    changed: Arc<watch::Sender<u64>>,
    /// Every instance event the core publishes, for the HTTP event
    /// stream: bounded, a subscriber that falls behind loses the oldest
    /// (the run loop never waits for it).
    published: broadcast::Sender<Published>,
    /// Counts of instance events (liveness kills, exits by cause), for
    /// the metrics.
    tally: Arc<Mutex<EventTally>>,
}

/// An instance event as the board publishes it.
pub(crate) type Published = Arc<(Arc<InstanceLabel>, InstanceEvent)>;

/// Events kept for each subscriber of [`Board::subscribe`].
const PUBLISHED_LEN: usize = 1024;

impl Board {
    pub(crate) fn new(core: Core) -> Self {
        Board {
            core: Arc::new(Mutex::new(core)),
            changed: Arc::new(watch::channel(0).0),
            published: broadcast::channel(PUBLISHED_LEN).0,
            tally: Arc::new(Mutex::new(EventTally::default())),
        }
    }

    /// Every instance event from now on (a bounded channel: a receiver
    /// that falls behind loses the oldest).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.published.subscribe()
    }

    /// The counts of instance events so far.
    pub(crate) fn tally(&self) -> EventTally {
        self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts and publishes the instance events among `effects`.
    fn observe(&self, effects: &[Effect]) {
        let live = self.published.receiver_count() > 0;
        let mut tally = None;
        for effect in effects {
            if let Effect::Publish { label, event } = effect {
                tally
                    .get_or_insert_with(|| self.tally.lock().unwrap_or_else(|e| e.into_inner()))
                    .count(label, &event.kind);
                if live {
                    // Fails only if the last subscriber just left.
                    let _ = self
                        .published
                        .send(Arc::new((label.clone(), event.clone())));
                }
            }
        }
    }

    /// The core, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves plain data behind: keep
        // serving it.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `event` to the core; returns the effects.
    pub(crate) fn handle(&self, event: Event) -> Vec<Effect> {
        let now = Now {
            at: tokio::time::Instant::now().into_std(),
            wall: SystemTime::now(),
        };
        let effects = self.lock().handle(event, now);
        self.observe(&effects);
        self.changed.send_modify(|generation| *generation += 1);
        effects
    }

    /// Changes each time the core handles an event (the status line
    /// redraws then).
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn status(&self) -> HerdStatus {
        self.lock().status(SystemTime::now())
    }
}

/// Calls the user's callbacks for every instance event, in order, until
/// every sender is gone.
///
/// [`Events::started`] is called from here too when `started` fires, so
/// that every callback runs on this one task ([`Events::starting`] is
/// called before this task exists).
pub(crate) async fn pump_events(
    mut events_rx: mpsc::UnboundedReceiver<(Arc<InstanceLabel>, InstanceEvent)>,
    herd: Herd,
    callbacks: Option<Arc<dyn Events>>,
    mut started: oneshot::Receiver<()>,
) {
    let mut check =
        tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut started_called = false;
    loop {
        tokio::select! {
            fired = &mut started, if !started_called => {
                started_called = true;
                if let (Ok(()), Some(callbacks)) = (fired, &callbacks) {
                    callbacks.started(&herd);
                }
            }
            event = events_rx.recv() => {
                let Some((label, event)) = event else { return };
                if let Some(callbacks) = &callbacks {
                    call(callbacks.as_ref(), &herd, &label, &event.kind);
                }
            }
            _ = check.tick(), if callbacks.is_some() => {
                if let Some(callbacks) = &callbacks {
                    callbacks.check(&herd);
                }
            }
        }
    }
}

fn call(callbacks: &dyn Events, herd: &Herd, label: &InstanceLabel, kind: &EventKind) {
    match kind {
        EventKind::Created => callbacks.process_created(herd, label),
        EventKind::Started { pid } => callbacks.process_started(herd, label, *pid),
        EventKind::TimedOut => callbacks.process_timed_out(herd, label),
        EventKind::Exited { how, .. } => callbacks.process_stopped(herd, label, how),
        EventKind::Seen => callbacks.process_seen(herd, label),
        _ => {}
    }
    callbacks.event(herd, label, kind);
}

/// Runs a config with events callbacks and a control socket: the master
/// as a library.
///
/// ```no_run
/// use taskherd::master::Launcher;
/// let config = taskherd::config::Config::load("herd.toml".as_ref()).expect("valid config");
/// let report = Launcher::new(config).run_blocking().expect("master started");
/// std::process::exit(if report.success() { 0 } else { 1 });
/// ```
pub struct Launcher {
    pub(crate) config: Config,
    pub(crate) events: Option<Arc<dyn Events>>,
    pub(crate) control: Option<super::control::ControlSocket>,
    pub(crate) reload_on_sighup: bool,
    pub(crate) end_summary: bool,
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher")
            .field("config", &self.config.source)
            .field("events", &self.events.is_some())
            .field(
                "control",
                &self.control.as_ref().map(|c| c.path().to_path_buf()),
            )
            .finish()
    }
}

impl Launcher {
    /// A launcher for `config`, without callbacks or control socket.
    pub fn new(config: Config) -> Self {
        Launcher {
            config,
            events: None,
            control: None,
            reload_on_sighup: false,
            end_summary: true,
        }
    }

    /// Whether the master logs its summary at the end of the run (the
    /// instances marked failed or killed after their grace, dead jobs,
    /// the closing line); on by default. A caller that sums up the
    /// [`RunReport`] itself (as `taskherd exec` does) turns it off.
    pub fn end_summary(mut self, on: bool) -> Self {
        self.end_summary = on;
        self
    }

    /// Reloads the config file on SIGHUP (as `taskherd run` does).
    pub fn reload_on_sighup(mut self) -> Self {
        self.reload_on_sighup = true;
        self
    }

    /// Calls `events` as the herd runs.
    pub fn events(mut self, events: impl Events) -> Self {
        self.events = Some(Arc::new(events));
        self
    }

    /// Serves operators' commands (`taskherd status`, ...) on `socket`.
    pub fn control_socket(mut self, socket: super::control::ControlSocket) -> Self {
        self.control = Some(socket);
        self
    }

    /// Runs the herd until every instance has ended or `shutdown` stops it.
    pub async fn run(self, sink: LogSink, shutdown: Shutdown) -> RunReport {
        super::launcher::run_launcher(self, sink, shutdown).await
    }

    /// Runs the herd from a plain program: see [`super::run_blocking`].
    ///
    /// # Errors
    /// If the runtime, the log writer or the signal handlers cannot be set
    /// up; nothing was started then.
    pub fn run_blocking(self) -> std::io::Result<RunReport> {
        super::launcher::run_blocking_with(self)
    }

    /// Runs the herd from a plain program as [`Launcher::run_blocking`]
    /// does (its own runtime, stopped on SIGINT and SIGTERM), its log
    /// going to `sink` instead of the config's `[log]`: `writer` is
    /// finished at the end ([`LogSink::spawn_output`] makes a pair for an
    /// output of the caller's); `shutdown` stops it too.
    ///
    /// # Errors
    /// If the runtime or the signal handlers cannot be set up; nothing
    /// was started then.
    pub fn run_blocking_to(
        self,
        sink: LogSink,
        writer: crate::log::LogWriter,
        shutdown: Shutdown,
    ) -> std::io::Result<RunReport> {
        super::launcher::run_blocking_to(self, sink, writer, shutdown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board() -> Board {
        let config = Config::parse(
            "[[group]]\nname = \"web\"\ncommand = \"w\"\n[group.local]\ninstances = 1\n",
            "/etc/herd/herd.toml".as_ref(),
        )
        .expect("valid config");
        let now = Now {
            at: std::time::Instant::now(),
            wall: SystemTime::now(),
        };
        Board::new(Core::new(config, now))
    }

    #[tokio::test]
    async fn a_handle_asks_the_run_loop_and_reads_the_status_of_the_core() {
        let (asks_tx, mut asks_rx) = mpsc::unbounded_channel();
        let herd = Herd::new(board(), asks_tx);
        let status = herd.status();
        assert_eq!(status.config, "/etc/herd/herd.toml");
        assert_eq!(status.groups[0].name, "web");

        // What the run loop answers is what the waiting caller gets.
        let run_loop = tokio::spawn(async move {
            let mut asked = Vec::new();
            while let Some((request, reply)) = asks_rx.recv().await {
                let answer = match &request {
                    Request::Suspend { group } if group == "web" => {
                        Ok(Answer::Done("group web suspended (1 instance)".into()))
                    }
                    Request::Suspend { group } => Err(HerdError::UnknownGroup {
                        group: group.clone(),
                    }),
                    _ => Ok(Answer::Done(String::new())),
                };
                if let Some(reply) = reply {
                    reply.send(answer);
                }
                asked.push(request);
                if asked.len() == 4 {
                    return asked;
                }
            }
            asked
        });
        assert_eq!(
            herd.suspend_and_wait("web").await.expect("suspended"),
            "group web suspended (1 instance)"
        );
        let err = herd.suspend_and_wait("nope").await.expect_err("unknown");
        assert_eq!(err.to_string(), "no group named \"nope\"");
        // Asking without waiting: the run loop is told all the same.
        herd.restart("web");
        herd.stop("the script says so");
        let asked = run_loop.await.expect("run loop");
        assert_eq!(
            asked[2..],
            [
                Request::Restart {
                    target: Target::group("web")
                },
                Request::Stop {
                    kill: false,
                    reason: "the script says so".into()
                }
            ]
        );
        // Once the run loop is gone, the herd is ending.
        let err = herd.reload_and_wait().await.expect_err("ended");
        assert!(matches!(err, HerdError::Ending), "{err}");
    }
}
