//! [`HandlerQueue`]: the synchronous API of queue groups (the original's
//! `runQueue`).

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::panic::{self, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::error::SlaveError;
use super::handler::Handler;
use super::layer;
use super::link::{self, Outgoing};
use crate::error_text::{error_chain, panic_text};
use crate::protocol::slave::{FromSlave, QueueRole, QueueSettings};
use crate::queue::consumer::{self, ConsumerOptions, JobInfo, JobResult, JobSource, DEFAULT_GRACE};
use crate::queue::Feeder;
use crate::retry::Outcome;

/// Backlog of the feeder's listening socket.
const LISTEN_BACKLOG: u32 = 1024;

/// Blocking threads of the feeder's runtime (feeder calls, DNS).
const FEEDER_BLOCKING_THREADS: usize = 4;

/// Why a [`HandlerQueue`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerQueueError {
    /// The control channel could not be set up (see [`SlaveError`]).
    #[error(transparent)]
    Slave(#[from] SlaveError),
    /// The master gave this instance no queue role.
    #[error(
        "this instance is not in a queue group: group {group:?} has no feeder \
         (give it a [group.feeder] section, or use Handler instead of HandlerQueue)"
    )]
    NotInQueueGroup {
        /// The instance's group.
        group: String,
    },
}

/// The slave side of a queue group instance: a [`Handler`] plus the queue
/// role the master gave it. It derefs to the [`Handler`] (identity,
/// params, logs, stop).
///
/// One program plays both parts of a queue group: the master makes one
/// instance the feeder and the others consumers, and
/// [`HandlerQueue::run_queue`] plays the part this instance got.
///
/// - **Feeder**: binds the address the master gave (`SO_REUSEADDR`, so a
///   restarted feeder gets its port back), tells the master the real
///   address (`Listening`), then serves the jobs of the [`Feeder`] to the
///   consumers until the master stops it, reporting its counts
///   (`Progress`) along the way.
/// - **Consumer**: connects to the feeder and runs the consumer function
///   on each job, up to the group's `concurrency` at once, each on a
///   thread of its own (the function is synchronous). After each job the
///   instance counts it ([`Handler::job_done`]); at the group's `max_jobs`
///   it stops consuming (running jobs finish, held ones go back to the
///   feeder) and is recycled.
///
/// Both end like [`Handler::run`]: the outcome goes to the master and the
/// exit code comes back.
///
/// # Example
///
/// One program, both roles: the feeder serves the numbers 1 to `count`
/// (a group param), the consumers print them.
///
/// ```no_run
/// use std::process::ExitCode;
/// use taskherd::queue::{Feeder, Next};
/// use taskherd::retry::Outcome;
/// use taskherd::slave::HandlerQueue;
///
/// /// The numbers 1..=last.
/// struct Numbers {
///     next: u64,
///     last: u64,
/// }
///
/// impl Feeder for Numbers {
///     type Job = u64;
///     fn next(&mut self) -> Next<u64> {
///         if self.next > self.last {
///             return Next::Done;
///         }
///         self.next += 1;
///         Next::Job(self.next - 1)
///     }
///     fn success(&mut self, _n: u64) {}
///     fn error(&mut self, n: u64, reason: &str) {
///         eprintln!("number {n} failed: {reason}");
///     }
/// }
///
/// fn main() -> ExitCode {
///     let queue = match HandlerQueue::from_env() {
///         Ok(queue) => queue,
///         Err(err) => {
///             eprintln!("numbers: {err}");
///             return ExitCode::from(2);
///         }
///     };
///     let last = queue.params()["count"].as_u64().unwrap_or(100);
///     queue.run_queue(
///         |handler, n: u64| {
///             println!("consumer {} got {n}", handler.group_id());
///             Outcome::Done
///         },
///         Numbers { next: 1, last },
///     )
/// }
/// ```
#[derive(Debug)]
pub struct HandlerQueue {
    /// The control channel; shared with the consumer threads.
    handler: Arc<Handler>,
    /// Feeder or consumer, and what that part needs.
    role: QueueRole,
}

impl HandlerQueue {
    /// Connects to the master like [`Handler::from_env`] and checks that
    /// this instance is in a queue group.
    ///
    /// # Errors
    ///
    /// [`HandlerQueueError::Slave`] for every error of
    /// [`Handler::from_env`], and [`HandlerQueueError::NotInQueueGroup`]
    /// when the identity has no queue role (the group is not a queue
    /// group).
    pub fn from_env() -> Result<HandlerQueue, HandlerQueueError> {
        let handler = Handler::from_env()?;
        HandlerQueue::from_handler(handler).map_err(|handler| HandlerQueueError::NotInQueueGroup {
            group: handler.group().to_string(),
        })
    }

    /// Wraps a handler whose identity has a queue role; gives the handler
    /// back when it has none (so a program can serve plain groups too).
    ///
    /// # Errors
    ///
    /// The handler itself when this instance is not in a queue group.
    #[allow(clippy::result_large_err)]
    pub fn from_handler(handler: Handler) -> Result<HandlerQueue, Handler> {
        match handler.identity().queue.clone() {
            Some(role) => Ok(HandlerQueue {
                handler: Arc::new(handler),
                role,
            }),
            None => Err(handler),
        }
    }

    /// The handler: identity, params, logs, stop.
    pub fn handler(&self) -> &Handler {
        &self.handler
    }

    /// The part this instance plays.
    pub fn role(&self) -> &QueueRole {
        &self.role
    }

    /// Whether this instance is the feeder.
    pub fn is_feeder(&self) -> bool {
        matches!(self.role, QueueRole::Feeder { .. })
    }

    /// Plays this instance's part until the queue is over or the master
    /// stops it, reports the outcome to the master, and returns the exit
    /// code for `main`.
    ///
    /// - As the feeder, serves the jobs of `feeder`; `consumer` is not
    ///   used. Success when the server ends cleanly; failure when the
    ///   address cannot be bound or the server fails.
    /// - As a consumer, runs `consumer` on each job (deserialized from the
    ///   feeder's JSON into `J`) and reports its [`Outcome`]; `feeder` is
    ///   not used. A panic in `consumer` is a retry, never an ack; a
    ///   payload that does not fit `J` is dead-lettered. Up to the group's
    ///   `concurrency` jobs run at once, each on a thread of its own.
    ///   [`Handler::job_done`] is called after each job; when it says
    ///   stop (the group's `max_jobs`), or on the master's Stop, jobs
    ///   running finish (within 80 % of the stop grace, at most 10 s),
    ///   jobs held but not started go back to the feeder, and the instance
    ///   ends. Success then; failure when the feeder refuses us or cannot
    ///   prove the secret.
    ///
    /// Call it from `main`'s thread (it starts its own async runtime).
    /// [`run_queue_with_info`](Self::run_queue_with_info) also gives the
    /// consumer each job's id and attempt.
    ///
    /// The queue logs with `tracing` (a refused or closed consumer
    /// connection with the peer's address and why, a lost feeder, ...).
    /// When the calling thread has no `tracing` subscriber (none global,
    /// none scoped), it first does what [`Handler::init_tracing`] does:
    /// from then on every `tracing` event of the process, on any thread,
    /// goes to the master as a log record of the instance, at the level of
    /// `RUST_LOG` when it is a plain level name (`info` otherwise). A
    /// program with its own subscriber gets them there instead.
    pub fn run_queue<F, J, C>(self, consumer: C, feeder: F) -> ExitCode
    where
        F: Feeder,
        J: DeserializeOwned + Send + 'static,
        C: Fn(&Handler, J) -> Outcome + Send + Sync + 'static,
    {
        self.run_queue_with_info(
            move |handler: &Handler, job: J, _info: JobInfo| consumer(handler, job),
            feeder,
        )
    }

    /// [`run_queue`](Self::run_queue), with the job's [`JobInfo`] (its
    /// id, stable across attempts, and the attempt number) given to the
    /// consumer too. The consumer returns an [`Outcome`], or a
    /// [`JobResult`] that also tells the feeder's joblog what it observed
    /// (an exit status).
    pub fn run_queue_with_info<F, J, C, R>(self, consumer: C, feeder: F) -> ExitCode
    where
        F: Feeder,
        J: DeserializeOwned + Send + 'static,
        C: Fn(&Handler, J, JobInfo) -> R + Send + Sync + 'static,
        R: Into<JobResult> + Send + 'static,
    {
        self.run_queue_then(consumer, feeder, |played| played)
    }

    /// [`run_queue_with_info`](Self::run_queue_with_info), with `then`
    /// turning how the part was played into what is reported to the
    /// master (the coprocess consumer fails a consumer whose program broke
    /// the protocol, though the queue itself ended cleanly).
    pub(crate) fn run_queue_then<F, J, C, R>(
        self,
        consumer: C,
        feeder: F,
        then: impl FnOnce(Result<(), String>) -> Result<(), String>,
    ) -> ExitCode
    where
        F: Feeder,
        J: DeserializeOwned + Send + 'static,
        C: Fn(&Handler, J, JobInfo) -> R + Send + Sync + 'static,
        R: Into<JobResult> + Send + 'static,
    {
        let HandlerQueue { handler, role } = self;
        // The queue's log lines (refused consumers, a lost feeder, the
        // feeder's own) reach the master even from a program that set up
        // no `tracing`. Setting it cannot fail but in a race with another
        // thread setting its own: that one then gets them.
        if let Some(dispatch) = layer::fallback_dispatch(handler.tracing_layer()) {
            let _ = tracing::dispatcher::set_global_default(dispatch);
        }
        let played = panic::catch_unwind(AssertUnwindSafe(|| match role {
            QueueRole::Feeder {
                bind,
                secret,
                settings,
            } => run_feeder(&handler, &bind, secret, settings, feeder),
            QueueRole::Consumer {
                feeder: feeder_addr,
                secret,
                concurrency,
                credits,
                jetstream,
            } => {
                drop(feeder);
                let options = ConsumerOptions::new(concurrency, credits)
                    .with_grace(consumer_grace(handler.identity().stop_grace))
                    .with_origin(handler.host(), handler.id());
                let source = match jetstream {
                    None => Ok(JobSource::Feeder {
                        address: feeder_addr,
                        secret,
                    }),
                    #[cfg(feature = "nats")]
                    Some(queue) => Ok(JobSource::JetStream(Arc::from(queue))),
                    #[cfg(not(feature = "nats"))]
                    Some(_) => Err(error_chain(&consumer::ConsumerError::NoNats)),
                };
                source.and_then(|source| run_consumer(&handler, &source, options, consumer))
            }
        }));
        let result = played.unwrap_or_else(|payload| Err(panic_text(payload.as_ref())));
        handler.report_outcome(then(result))
    }
}

impl Deref for HandlerQueue {
    type Target = Handler;

    fn deref(&self) -> &Handler {
        &self.handler
    }
}

/// How long a consumer's running jobs get at stop: 80 % of the stop grace
/// (the rest is for the goodbyes), at most [`DEFAULT_GRACE`].
pub(crate) fn consumer_grace(stop_grace: Duration) -> Duration {
    stop_grace.mul_f64(0.8).min(DEFAULT_GRACE)
}

/// Runs `future` on a fresh multi-thread runtime with `blocking_threads`
/// blocking threads, then drops the runtime without waiting for blocking
/// work still running (abandoned jobs).
///
/// Meanwhile it pings the master: a feeder or consumer waiting for work is
/// healthy, and must not be killed by the liveness timeout. (A job that
/// hangs is the feeder's business: its lease expires and it goes to
/// another consumer.)
fn block_on_queue<Fut>(
    handler: &Handler,
    blocking_threads: usize,
    future: Fut,
) -> Result<Fut::Output, String>
where
    Fut: Future + Send,
    Fut::Output: Send,
{
    let ping_every = handler
        .identity()
        .timeout
        .filter(|timeout| !timeout.is_zero())
        .map(|timeout| timeout / 3);
    let future = async move {
        let pinger = async {
            match ping_every {
                Some(every) => loop {
                    tokio::time::sleep(every).await;
                    handler.ping();
                },
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            output = future => output,
            never = pinger => never,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(blocking_threads.max(1))
        .thread_name("taskherd-queue")
        .enable_io()
        .enable_time()
        .build()
        .map_err(|err| format!("cannot start the queue runtime: {err}"))?;
    let output = link::outside_runtime(|| runtime.block_on(future))
        .ok_or_else(|| "run_queue cannot run on the handler's own runtime".to_string())?;
    runtime.shutdown_background();
    Ok(output)
}

/// The consumer role: [`consumer::consume`] with the user function on the
/// blocking pool.
fn run_consumer<J, C, R>(
    handler: &Arc<Handler>,
    source: &JobSource,
    options: ConsumerOptions,
    consumer: C,
) -> Result<(), String>
where
    J: DeserializeOwned + Send + 'static,
    C: Fn(&Handler, J, JobInfo) -> R + Send + Sync + 'static,
    R: Into<JobResult> + Send + 'static,
{
    let name = format!("{}/{}@{}", handler.group(), handler.id(), handler.host());
    // Cancelled by the master's Stop, the master going away, or max_jobs.
    let shutdown = handler.stop_token();
    let consumer = Arc::new(consumer);
    let run = {
        let handler = Arc::clone(handler);
        let shutdown = shutdown.clone();
        move |job: J, info: JobInfo| {
            let handler = Arc::clone(&handler);
            let consumer = Arc::clone(&consumer);
            let shutdown = shutdown.clone();
            async move {
                let ran = tokio::task::spawn_blocking(move || {
                    let ran =
                        panic::catch_unwind(AssertUnwindSafe(|| consumer(&handler, job, info)));
                    if !handler.job_done() {
                        shutdown.cancel();
                    }
                    ran
                })
                .await;
                // A panic goes on to `consume`, which reports it as a retry
                // with its text.
                match ran {
                    Ok(Ok(result)) => result.into(),
                    Ok(Err(payload)) => panic::resume_unwind(payload),
                    Err(err) => match err.try_into_panic() {
                        Ok(payload) => panic::resume_unwind(payload),
                        Err(_) => JobResult::new(Outcome::Retry(None)),
                    },
                }
            }
        }
    };
    let blocking_threads = options.concurrency.max(1) as usize + 2;
    let consumed = block_on_queue(
        handler,
        blocking_threads,
        consumer::consume_from(source, &name, options, run, shutdown),
    )?;
    match consumed {
        Ok(report) => {
            info!(%report, "consumer finished");
            Ok(())
        }
        Err(err) => Err(error_chain(&err)),
    }
}

/// The feeder role: bind, say where, serve.
fn run_feeder<F: Feeder>(
    handler: &Arc<Handler>,
    bind: &str,
    secret: String,
    settings: QueueSettings,
    feeder: F,
) -> Result<(), String> {
    let shutdown = handler.stop_token();
    let outbox = handler.outbox();
    let serve = async move {
        let listener = bind_listener(bind)
            .await
            .map_err(|err| format!("cannot bind the feeder on {bind}: {err}"))?;
        let addr = listener
            .local_addr()
            .map_err(|err| format!("cannot read the feeder's address: {err}"))?;
        // The master logs it ("feeder listening on ...") from this frame.
        debug!(%addr, "feeder listening");
        outbox
            .send_async(Outgoing::Frame(FromSlave::Listening {
                addr: addr.to_string(),
            }))
            .await;

        let (progress_tx, mut progress_rx) = mpsc::channel(16);
        let forward = tokio::spawn(async move {
            while let Some(progress) = progress_rx.recv().await {
                outbox
                    .send_async(Outgoing::Frame(FromSlave::Progress { progress }))
                    .await;
            }
        });
        let served = crate::queue::server::serve(
            listener,
            feeder,
            secret,
            settings,
            Some(progress_tx),
            shutdown,
        )
        .await;
        // The server is gone, and its progress sender with it: the last
        // counts reach the outbox before the outcome.
        let _ = forward.await;
        match served {
            Ok(report) => {
                // The server logged its end ("feeder server stopped").
                debug!(
                    finished = report.finished,
                    unfinished = report.unfinished,
                    "feeder stopped"
                );
                Ok(())
            }
            Err(err) => Err(error_chain(&err)),
        }
    };
    block_on_queue(handler, FEEDER_BLOCKING_THREADS, serve)?
}

/// Binds a listener on the first address `bind` resolves to that works,
/// with `SO_REUSEADDR` so a restarted feeder can take its port back while
/// old connections linger in TIME_WAIT.
pub(crate) async fn bind_listener(bind: &str) -> std::io::Result<TcpListener> {
    let mut last_err = None;
    for addr in tokio::net::lookup_host(bind).await? {
        match bind_one(addr) {
            Ok(listener) => return Ok(listener),
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{bind} resolves to no address"),
        )
    }))
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::queue::ToFeeder;
    use crate::protocol::slave::Identity;
    use crate::queue::consumer::tests::{recv, send_job, FakeFeeder, SECRET};
    use crate::queue::Next;
    use crate::slave::handler::tests::{connected, connected_with, identity};
    use crate::slave::handler::ConnectOptions;
    use std::sync::Mutex;

    fn no_exit() -> ConnectOptions {
        ConnectOptions {
            identity_timeout: Duration::from_secs(10),
            orphaned: Box::new(|| panic!("orphan guard fired in a test")),
        }
    }

    /// Runs `run` (a `run_queue`) under a subscriber of its own: without
    /// one, `run_queue` would send every event of the test process to this
    /// test's master, for good.
    fn own_subscriber<R>(run: impl FnOnce() -> R) -> R {
        tracing::subscriber::with_default(tracing_subscriber::registry(), run)
    }

    /// A feeder for the role dispatch: never used by a consumer.
    struct Numbers(u64);

    impl Feeder for Numbers {
        type Job = u64;
        fn next(&mut self) -> Next<u64> {
            Next::Job(self.0)
        }
        fn success(&mut self, _job: u64) {}
        fn error(&mut self, _job: u64, _reason: &str) {}
    }

    #[test]
    fn an_instance_without_a_queue_role_is_refused() {
        let (_master, handler) = connected();
        let handler = HandlerQueue::from_handler(handler).unwrap_err();
        assert_eq!(handler.group(), "workers", "the handler comes back");
        let text = HandlerQueueError::NotInQueueGroup {
            group: "workers".into(),
        }
        .to_string();
        assert!(
            text.starts_with("this instance is not in a queue group"),
            "{text}"
        );
        assert!(text.contains("\"workers\""), "{text}");
    }

    #[test]
    fn roles_are_told_apart() {
        let consumer = Identity {
            vars: Default::default(),
            queue: Some(QueueRole::Consumer {
                feeder: "127.0.0.1:1".into(),
                secret: SECRET.into(),
                concurrency: 2,
                credits: 4,
                jetstream: None,
            }),
            ..identity()
        };
        let (_master, handler) = connected_with(consumer, no_exit());
        let queue = HandlerQueue::from_handler(handler).unwrap();
        assert!(!queue.is_feeder());
        assert!(matches!(
            queue.role(),
            QueueRole::Consumer { concurrency: 2, .. }
        ));
        assert_eq!(queue.id(), 7, "derefs to the handler");
        assert_eq!(queue.handler().group(), "workers");
    }

    #[test]
    fn consumer_grace_leaves_room_for_goodbyes() {
        assert_eq!(
            consumer_grace(Duration::from_secs(5)),
            Duration::from_secs(4)
        );
        assert_eq!(consumer_grace(Duration::from_secs(60)), DEFAULT_GRACE);
    }

    #[test]
    fn a_restarted_feeder_gets_its_port_back() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = bind_listener("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (served, _) = listener.accept().await.unwrap();
            // The server side closes first: its end lingers in TIME_WAIT.
            drop(served);
            drop(listener);
            drop(client);
            let again = bind_listener(&addr.to_string()).await.unwrap();
            assert_eq!(again.local_addr().unwrap(), addr);
        });
    }

    #[test]
    fn consumer_role_runs_jobs_and_recycles_at_max_jobs() {
        // The fake feeder runs on a runtime of its own thread.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (feeder, addr) = runtime.block_on(FakeFeeder::bind(SECRET));
        let script = runtime.spawn(async move {
            let (mut conn, _) = feeder.accept().await;
            assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 3 }));
            for lease in 1..=3 {
                send_job(&mut conn, lease, serde_json::json!(lease * 10)).await;
            }
            let mut frames = Vec::new();
            while let Some(frame) = recv(&mut conn).await {
                frames.push(frame);
            }
            frames
        });

        let identity = Identity {
            vars: Default::default(),
            max_jobs: Some(2),
            queue: Some(QueueRole::Consumer {
                feeder: addr,
                secret: SECRET.into(),
                concurrency: 1,
                credits: 3,
                jetstream: None,
            }),
            ..identity()
        };
        let (mut master, handler) = connected_with(identity, no_exit());
        let queue = HandlerQueue::from_handler(handler).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_in = Arc::clone(&seen);
        let code = own_subscriber(|| {
            queue.run_queue_with_info(
                move |handler: &Handler, n: u64, info: JobInfo| {
                    assert_eq!(handler.group(), "workers");
                    std::thread::sleep(Duration::from_millis(50));
                    seen_in.lock().unwrap().push((n, info.id, info.attempt));
                    Outcome::Done
                },
                Numbers(0),
            )
        });
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(*seen.lock().unwrap(), vec![(10, 100, 1), (20, 200, 1)]);

        let frames = runtime.block_on(script).unwrap();
        // The stop (asked from job 2's thread) and job 2's end race: the
        // release of job 3 may come first.
        assert_eq!(frames.len(), 5, "{frames:?}");
        assert_eq!(
            frames[..2],
            [
                ToFeeder::Ack {
                    lease: 1,
                    meta: None
                },
                ToFeeder::Credit { n: 1 }
            ],
            "{frames:?}"
        );
        assert!(
            frames[2..4].contains(&ToFeeder::Ack {
                lease: 2,
                meta: None
            }),
            "{frames:?}"
        );
        assert!(
            frames[2..4].contains(&ToFeeder::Release { lease: 3 }),
            "{frames:?}"
        );
        assert_eq!(frames[4], ToFeeder::Bye);
        assert!(matches!(
            master.recv_no_ping(),
            Some(FromSlave::Recycle { .. })
        ));
        assert_eq!(
            master.recv_no_ping(),
            Some(FromSlave::Outcome {
                success: true,
                message: None
            })
        );
    }

    #[test]
    fn a_refused_consumer_fails() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (feeder, addr) = runtime.block_on(FakeFeeder::bind("another secret"));
        let script = runtime.spawn(async move {
            let (_conn, _) = feeder.accept().await;
        });
        let identity = Identity {
            vars: Default::default(),
            queue: Some(QueueRole::Consumer {
                feeder: addr,
                secret: SECRET.into(),
                concurrency: 1,
                credits: 1,
                jetstream: None,
            }),
            ..identity()
        };
        let (mut master, handler) = connected_with(identity, no_exit());
        let queue = HandlerQueue::from_handler(handler).unwrap();
        let code =
            own_subscriber(|| queue.run_queue(|_: &Handler, _: u64| Outcome::Done, Numbers(0)));
        assert_eq!(code, ExitCode::FAILURE);
        runtime.block_on(script).unwrap();
        let frame = master.recv_no_ping();
        assert!(
            matches!(&frame, Some(FromSlave::Outcome { success: false, message: Some(m) }) if m.contains("refused")),
            "{frame:?}"
        );
    }

    /// The numbers 1..=last; what succeeded is kept.
    struct Counting {
        next: u64,
        last: u64,
        succeeded: Arc<Mutex<Vec<u64>>>,
    }

    impl Feeder for Counting {
        type Job = u64;
        fn next(&mut self) -> Next<u64> {
            if self.next > self.last {
                return Next::Done;
            }
            self.next += 1;
            Next::Job(self.next - 1)
        }
        fn success(&mut self, job: u64) {
            self.succeeded.lock().unwrap().push(job);
        }
        fn error(&mut self, job: u64, reason: &str) {
            panic!("job {job} failed: {reason}");
        }
    }

    #[test]
    fn feeder_role_says_where_it_listens_and_serves() {
        let identity = Identity {
            vars: Default::default(),
            queue: Some(QueueRole::Feeder {
                bind: "127.0.0.1:0".into(),
                secret: SECRET.into(),
                settings: QueueSettings {
                    lease: Duration::from_secs(30),
                    max_attempts: 3,
                    retry: Default::default(),
                    rate: None,
                    progress_every: Duration::from_millis(100),
                    joblog: None,
                },
            }),
            ..identity()
        };
        let (mut master, handler) = connected_with(identity, no_exit());
        let queue = HandlerQueue::from_handler(handler).unwrap();
        assert!(queue.is_feeder());

        // The master's side: wait for the address, start a consumer there.
        // The consumer ends on the feeder's Drain, or when stopped (as the
        // master would) once the feeder is gone.
        let stop_consumer = tokio_util::sync::CancellationToken::new();
        let stop_in = stop_consumer.clone();
        let consumer = std::thread::spawn(move || {
            let Some(FromSlave::Listening { addr }) = master.recv_no_ping() else {
                panic!("the feeder says where it listens first");
            };
            assert!(!addr.ends_with(":0"), "{addr}");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let report = runtime
                .block_on(consumer::consume(
                    &addr,
                    SECRET,
                    "jobs/2@localhost",
                    ConsumerOptions::new(2, 4),
                    |_n: u64, _| async { Outcome::Done },
                    stop_in,
                ))
                .unwrap();
            let mut frames = Vec::new();
            while let Some(frame) = master.recv_no_ping() {
                frames.push(frame);
            }
            (report, frames)
        });

        let succeeded = Arc::new(Mutex::new(Vec::new()));
        let feeder = Counting {
            next: 1,
            last: 3,
            succeeded: Arc::clone(&succeeded),
        };
        let code = own_subscriber(|| queue.run_queue(|_: &Handler, _: u64| Outcome::Done, feeder));
        assert_eq!(code, ExitCode::SUCCESS);
        stop_consumer.cancel();
        let (report, frames) = consumer.join().unwrap();
        assert_eq!(report.done, 3);
        let mut succeeded = succeeded.lock().unwrap().clone();
        succeeded.sort_unstable();
        assert_eq!(succeeded, vec![1, 2, 3]);

        let (last, before) = frames.split_last().expect("frames");
        assert_eq!(
            last,
            &FromSlave::Outcome {
                success: true,
                message: None
            }
        );
        let progress: Vec<_> = before
            .iter()
            .filter_map(|frame| match frame {
                FromSlave::Progress { progress } => Some(*progress),
                _ => None,
            })
            .collect();
        assert_eq!(progress.last().map(|p| p.done), Some(3), "{frames:?}");
    }
}
