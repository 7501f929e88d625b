//! A worker: pulls jobs from a local queue, runs their handlers, settles
//! them per a retry policy.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{CallbackError, Job, Registry};
use crate::queue::local::{
    Lease, LeaseId, LocalQueue, LocalQueueError, Message, MessageId, PushOptions,
};
use crate::retry::{Decision, Outcome, RetryPolicy};

/// How long an idle worker waits, at most, before it looks at the queue
/// again when nothing told it to. Pushes made through a [`Pusher`] wake it
/// at once; this only bounds the delay for messages pushed on the queue
/// directly (without [`Pusher::notify`]).
pub const DEFAULT_IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Shortest wait of an idle worker, so that a queue that keeps announcing a
/// message it does not deliver cannot make it spin.
const MIN_IDLE_WAIT: Duration = Duration::from_millis(5);

/// Shortest pause between two lease extensions.
const MIN_EXTEND_PERIOD: Duration = Duration::from_millis(10);

/// Called with a message that is given up for good and the reason.
type DeadHook = Arc<dyn Fn(&Message, &str) + Send + Sync>;

/// Pulls [`Job`]s from a [`LocalQueue`], runs their handlers from a
/// [`Registry`], and settles each lease per a [`RetryPolicy`]:
///
/// - On [`Outcome::Done`]: ack.
/// - On [`Outcome::Retry`], the policy decides, with the message's
///   `receive_count` as the attempt number and its `enqueued_at` as the
///   first attempt time (the queue does not record the first delivery, so
///   an [`Every`](crate::retry::Schedule::Every) window counts from the
///   push). A retry is a nack with the policy's delay; a give-up is handled
///   like a dead outcome.
/// - On [`Outcome::Dead`], a payload that is not a [`Job`], or a give-up:
///   ack, log at error level with the reason, and call the dead hook
///   ([`with_dead_hook`](Self::with_dead_hook)) if there is one, to keep
///   the job somewhere. The queue's own dead-letter list is for messages
///   that hit its `max_receives` (the lower of that and the policy's
///   attempt limit wins).
/// - With an at-most-once policy: ack before running; the outcome is
///   logged, never acted on (a failed job is not retried). If that ack
///   fails (the lease expired) the job is not run.
///
/// While a handler runs, the worker extends its lease whenever half of it
/// is left, so a slow job is not delivered to a second worker.
///
/// One worker runs one job at a time; for more, clone it and run each clone
/// (clones share the queue, registry and wake-ups). The queue is shared
/// behind a `std::sync::Mutex`; every queue call runs in
/// `spawn_blocking` (a [`FileQueue`](crate::queue::local::FileQueue)
/// fsyncs), holding the lock only for that call.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use taskherd::callback::{Job, Registry, Worker};
/// use taskherd::queue::local::{MemoryQueue, QueueOptions};
/// use taskherd::retry::{Outcome, RetryPolicy};
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), taskherd::callback::CallbackError> {
/// let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
/// let mut registry = Registry::new();
/// registry.register("greet", move |name: String| {
///     let _ = done_tx.send(format!("hello {name}"));
///     async { Outcome::Done }
/// })?;
///
/// let queue = Arc::new(Mutex::new(MemoryQueue::new(QueueOptions::default())));
/// let worker = Worker::new(queue, Arc::new(registry), RetryPolicy::default());
/// let pusher = worker.pusher();
/// let cancel = CancellationToken::new();
/// let running = tokio::spawn(worker.run(cancel.clone()));
///
/// pusher.push(Job::new("greet", "world")?).await?;
/// assert_eq!(done_rx.recv().await.as_deref(), Some("hello world"));
/// cancel.cancel();
/// let summary = running.await.expect("worker task")?;
/// assert_eq!(summary.done, 1);
/// # Ok(())
/// # }
/// ```
pub struct Worker<Q: LocalQueue + ?Sized + 'static> {
    /// The queue, shared with producers and other workers.
    queue: Arc<Mutex<Q>>,
    /// Where handlers are found by name.
    registry: Arc<Registry>,
    /// How failed jobs are retried (and the first delay of [`Pusher`]
    /// pushes).
    policy: RetryPolicy,
    /// Wakes idle workers on a push.
    wake: Arc<Notify>,
    /// Longest idle wait without a wake-up.
    idle_recheck: Duration,
    /// Where given-up jobs are reported.
    dead_hook: Option<DeadHook>,
}

impl<Q: LocalQueue + ?Sized + 'static> Clone for Worker<Q> {
    fn clone(&self) -> Self {
        Worker {
            queue: Arc::clone(&self.queue),
            registry: Arc::clone(&self.registry),
            policy: self.policy.clone(),
            wake: Arc::clone(&self.wake),
            idle_recheck: self.idle_recheck,
            dead_hook: self.dead_hook.clone(),
        }
    }
}

impl<Q: LocalQueue + ?Sized + 'static> std::fmt::Debug for Worker<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("registry", &self.registry)
            .field("policy", &self.policy)
            .field("idle_recheck", &self.idle_recheck)
            .field("dead_hook", &self.dead_hook.is_some())
            .finish_non_exhaustive()
    }
}

/// Pushes jobs on a worker's queue and wakes the worker; made by
/// [`Worker::pusher`], cheap to clone.
pub struct Pusher<Q: LocalQueue + ?Sized + 'static> {
    /// The worker's queue.
    queue: Arc<Mutex<Q>>,
    /// The worker's wake-up.
    wake: Arc<Notify>,
    /// The policy's delay before a first run.
    first_delay: Duration,
}

impl<Q: LocalQueue + ?Sized + 'static> Clone for Pusher<Q> {
    fn clone(&self) -> Self {
        Pusher {
            queue: Arc::clone(&self.queue),
            wake: Arc::clone(&self.wake),
            first_delay: self.first_delay,
        }
    }
}

impl<Q: LocalQueue + ?Sized + 'static> std::fmt::Debug for Pusher<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher")
            .field("first_delay", &self.first_delay)
            .finish_non_exhaustive()
    }
}

/// What a worker did with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobReport {
    /// The message.
    pub message_id: MessageId,
    /// Its delivery count: 1 on the first run.
    pub attempt: u32,
    /// The handler named by the job; `None` if the payload was not a
    /// [`Job`].
    pub handler: Option<String>,
    /// How the run ended; `None` if the handler did not run.
    pub outcome: Option<Outcome>,
    /// What was done with the message.
    pub settlement: Settlement,
}

/// What a worker did with a message after (or, at-most-once, before) its run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Acked after the job was done.
    Acked,
    /// Given back to the queue (nack), visible again after `delay`.
    Retried {
        /// The delay chosen by the retry policy.
        delay: Duration,
    },
    /// Given up: acked, logged and handed to the dead hook.
    Buried {
        /// Why: the handler's dead reason, the retry policy's give-up
        /// reason, or why the payload is not a job.
        reason: String,
    },
    /// At-most-once: acked before the run; the outcome is not acted on.
    AckedBeforeRun,
    /// The lease ended (expired, or settled by someone else) before it
    /// could be settled: the queue will deliver the message again.
    LeaseLost,
}

/// Counts of what [`Worker::run`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// Jobs acked after success.
    pub done: u64,
    /// Jobs given back for a retry.
    pub retried: u64,
    /// Jobs given up.
    pub buried: u64,
    /// At-most-once jobs run (whatever their outcome).
    pub ran_at_most_once: u64,
    /// Leases that ended before they could be settled.
    pub lost_leases: u64,
}

impl WorkerSummary {
    fn count(&mut self, settlement: &Settlement) {
        match settlement {
            Settlement::Acked => self.done += 1,
            Settlement::Retried { .. } => self.retried += 1,
            Settlement::Buried { .. } => self.buried += 1,
            Settlement::AckedBeforeRun => self.ran_at_most_once += 1,
            Settlement::LeaseLost => self.lost_leases += 1,
        }
    }
}

impl<Q: LocalQueue + ?Sized + 'static> Worker<Q> {
    /// A worker on `queue`, running handlers from `registry`, retrying per
    /// `policy`. `Q` may be a concrete queue or `dyn LocalQueue`.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use taskherd::callback::{Registry, Worker};
    /// use taskherd::queue::local::{LocalQueue, MemoryQueue, QueueOptions};
    /// use taskherd::retry::RetryPolicy;
    ///
    /// let queue: Arc<Mutex<dyn LocalQueue>> =
    ///     Arc::new(Mutex::new(MemoryQueue::new(QueueOptions::default())));
    /// let worker = Worker::new(queue, Arc::new(Registry::new()), RetryPolicy::none());
    /// # let _ = worker;
    /// ```
    pub fn new(queue: Arc<Mutex<Q>>, registry: Arc<Registry>, policy: RetryPolicy) -> Self {
        Worker {
            queue,
            registry,
            policy,
            wake: Arc::new(Notify::new()),
            idle_recheck: DEFAULT_IDLE_RECHECK,
            dead_hook: None,
        }
    }

    /// The same worker with another idle recheck (default
    /// [`DEFAULT_IDLE_RECHECK`]): the longest an idle worker sleeps without
    /// a wake-up from a [`Pusher`] or a known visibility time.
    ///
    /// ```
    /// # use std::sync::{Arc, Mutex};
    /// # use std::time::Duration;
    /// # use taskherd::callback::{Registry, Worker};
    /// # use taskherd::queue::local::{MemoryQueue, QueueOptions};
    /// # use taskherd::retry::RetryPolicy;
    /// # let queue = Arc::new(Mutex::new(MemoryQueue::new(QueueOptions::default())));
    /// let worker = Worker::new(queue, Arc::new(Registry::new()), RetryPolicy::none())
    ///     .with_idle_recheck(Duration::from_secs(10));
    /// # let _ = worker;
    /// ```
    pub fn with_idle_recheck(mut self, idle_recheck: Duration) -> Self {
        self.idle_recheck = idle_recheck.max(MIN_IDLE_WAIT);
        self
    }

    /// The same worker with a hook called with every message given up for
    /// good (dead outcome, retries exhausted, not a job, a failed
    /// at-most-once run) and the reason, after it was acked. Keep the job there if it must not be lost. The
    /// hook runs on the worker's task: keep it short.
    ///
    /// ```
    /// # use std::sync::{Arc, Mutex};
    /// # use taskherd::callback::{Registry, Worker};
    /// # use taskherd::queue::local::{MemoryQueue, QueueOptions};
    /// # use taskherd::retry::RetryPolicy;
    /// # let queue = Arc::new(Mutex::new(MemoryQueue::new(QueueOptions::default())));
    /// let worker = Worker::new(queue, Arc::new(Registry::new()), RetryPolicy::none())
    ///     .with_dead_hook(|message, reason| eprintln!("job {} buried: {reason}", message.id));
    /// # let _ = worker;
    /// ```
    pub fn with_dead_hook(mut self, hook: impl Fn(&Message, &str) + Send + Sync + 'static) -> Self {
        self.dead_hook = Some(Arc::new(hook));
        self
    }

    /// A handle that pushes jobs on this worker's queue (with the policy's
    /// first delay) and wakes this worker and its clones.
    pub fn pusher(&self) -> Pusher<Q> {
        Pusher {
            queue: Arc::clone(&self.queue),
            wake: Arc::clone(&self.wake),
            first_delay: self.policy.first_delay,
        }
    }

    /// Runs jobs until `cancel` fires. When the queue has nothing ready the
    /// worker sleeps until the queue's next visibility time, a push through a
    /// [`Pusher`], the idle recheck, or cancellation, whichever comes first:
    /// it never polls in a loop.
    ///
    /// # Errors
    ///
    /// A queue failure other than a lost lease (a
    /// [`FileQueue`](crate::queue::local::FileQueue) that cannot write its
    /// journal) ends the run with [`CallbackError::Queue`]; a queue mutex
    /// poisoned by a panic with [`CallbackError::QueuePoisoned`]. Handler
    /// failures never end it.
    ///
    /// # Cancel safety
    ///
    /// Cancellation is seen between jobs: a job in progress runs to its end
    /// and is settled first. Dropping the future instead abandons the job
    /// in progress without settling it; its lease expires and the queue
    /// delivers it again (at-least-once).
    pub async fn run(self, cancel: CancellationToken) -> Result<WorkerSummary, CallbackError> {
        let mut summary = WorkerSummary::default();
        loop {
            if cancel.is_cancelled() {
                return Ok(summary);
            }
            if let Some(report) = self.work_one().await? {
                summary.count(&report.settlement);
                continue;
            }
            let wait = self.idle_wait().await?;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(summary),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Receives one ready message, if any, runs it and settles it.
    /// Returns `None` if nothing was ready.
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run).
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: dropping the future while a job runs leaves its
    /// lease to expire (the job is delivered again).
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use taskherd::callback::{Job, Registry, Settlement, Worker};
    /// use taskherd::queue::local::{MemoryQueue, QueueOptions};
    /// use taskherd::retry::{Outcome, RetryPolicy};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), taskherd::callback::CallbackError> {
    /// let mut registry = Registry::new();
    /// registry.register("bad", |_: ()| async { Outcome::Dead("never works".into()) })?;
    /// let queue = Arc::new(Mutex::new(MemoryQueue::new(QueueOptions::default())));
    /// let worker = Worker::new(queue, Arc::new(registry), RetryPolicy::default());
    /// worker.pusher().push(Job::new("bad", ())?).await?;
    /// let report = worker.work_one().await?.expect("a job was ready");
    /// assert_eq!(report.settlement, Settlement::Buried { reason: "never works".into() });
    /// assert!(worker.work_one().await?.is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn work_one(&self) -> Result<Option<JobReport>, CallbackError> {
        let Some(lease) = self.with_queue(|q| q.receive(SystemTime::now())).await? else {
            return Ok(None);
        };
        let message_id = lease.message.id;
        let attempt = lease.message.receive_count;
        let job = match serde_json::from_value::<Job>(lease.message.payload.clone()) {
            Ok(job) => job,
            Err(err) => {
                let reason = format!("message is not a job: {err}");
                let settlement = self.bury(&lease, None, reason).await?;
                return Ok(Some(JobReport {
                    message_id,
                    attempt,
                    handler: None,
                    outcome: None,
                    settlement,
                }));
            }
        };
        let handler = job.handler.clone();

        if self.policy.at_most_once {
            if !self.settle(&lease, |q, id| q.ack(id)).await? {
                tracing::warn!(
                    handler = %handler, message = %message_id,
                    "lease lost before the at-most-once ack; not running the job"
                );
                return Ok(Some(JobReport {
                    message_id,
                    attempt,
                    handler: Some(handler),
                    outcome: None,
                    settlement: Settlement::LeaseLost,
                }));
            }
            let outcome = self.registry.call(&job.handler, job.payload).await;
            if !outcome.is_done() {
                tracing::error!(
                    handler = %handler, message = %message_id, outcome = ?outcome,
                    "at-most-once job failed; not retried"
                );
                if let Some(hook) = &self.dead_hook {
                    let reason = match &outcome {
                        Outcome::Dead(reason) => reason.clone(),
                        _ => "at-most-once job failed; not retried".to_string(),
                    };
                    hook(&lease.message, &reason);
                }
            }
            return Ok(Some(JobReport {
                message_id,
                attempt,
                handler: Some(handler),
                outcome: Some(outcome),
                settlement: Settlement::AckedBeforeRun,
            }));
        }

        let outcome = self.run_extending(&lease, job).await;
        let settlement = match &outcome {
            Outcome::Done => {
                if self.settle(&lease, |q, id| q.ack(id)).await? {
                    Settlement::Acked
                } else {
                    self.lease_lost(&handler, message_id)
                }
            }
            Outcome::Retry(requested) => {
                let now = SystemTime::now();
                let decision = self.policy.next(
                    attempt,
                    lease.message.enqueued_at,
                    now,
                    *requested,
                    crate::random::unit(),
                );
                match decision {
                    Decision::RetryAt(at) => {
                        let delay = at.duration_since(now).unwrap_or(Duration::ZERO);
                        if self.settle(&lease, move |q, id| q.nack(id, delay)).await? {
                            tracing::warn!(
                                handler = %handler, message = %message_id, attempt,
                                delay = ?delay, "job failed; retrying"
                            );
                            Settlement::Retried { delay }
                        } else {
                            self.lease_lost(&handler, message_id)
                        }
                    }
                    Decision::GiveUp(reason) => self.bury(&lease, Some(&handler), reason).await?,
                }
            }
            Outcome::Dead(reason) => self.bury(&lease, Some(&handler), reason.clone()).await?,
        };
        Ok(Some(JobReport {
            message_id,
            attempt,
            handler: Some(handler),
            outcome: Some(outcome),
            settlement,
        }))
    }

    /// Runs the job's handler, extending the lease whenever half of it is
    /// left.
    async fn run_extending(&self, lease: &Lease, job: Job) -> Outcome {
        let visibility = lease
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let period = (visibility / 2).max(MIN_EXTEND_PERIOD);
        let mut expires_at = lease.expires_at;
        let mut extending = true;
        let run = self.registry.call(&job.handler, job.payload);
        tokio::pin!(run);
        loop {
            let left_half = expires_at
                .checked_sub(period)
                .and_then(|at| at.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::ZERO)
                .max(MIN_EXTEND_PERIOD);
            tokio::select! {
                outcome = &mut run => return outcome,
                _ = tokio::time::sleep(left_half), if extending => {
                    let id = lease.lease_id;
                    match self.with_queue(move |q| q.extend(&id, period)).await {
                        Ok(end) => expires_at = end,
                        Err(err) => {
                            // Keep running: the settle after the run tells
                            // whether the lease survived.
                            tracing::warn!(
                                handler = %job.handler, message = %lease.message.id,
                                cause = %err, "cannot extend the lease of a running job"
                            );
                            extending = false;
                        }
                    }
                }
            }
        }
    }

    /// Acks a given-up message, logs it and calls the dead hook.
    async fn bury(
        &self,
        lease: &Lease,
        handler: Option<&str>,
        reason: String,
    ) -> Result<Settlement, CallbackError> {
        let handler_name = handler.unwrap_or("-");
        if !self.settle(lease, |q, id| q.ack(id)).await? {
            return Ok(self.lease_lost(handler_name, lease.message.id));
        }
        tracing::error!(
            handler = %handler_name, message = %lease.message.id,
            attempt = lease.message.receive_count, reason = %reason, "job given up"
        );
        if let Some(hook) = &self.dead_hook {
            hook(&lease.message, &reason);
        }
        Ok(Settlement::Buried { reason })
    }

    fn lease_lost(&self, handler: &str, message_id: MessageId) -> Settlement {
        tracing::warn!(
            handler = %handler, message = %message_id,
            "lease ended before the job was settled; it will be delivered again"
        );
        Settlement::LeaseLost
    }

    /// Runs a lease operation; `Ok(false)` if the lease is stale.
    async fn settle(
        &self,
        lease: &Lease,
        op: impl FnOnce(&mut Q, &LeaseId) -> Result<(), LocalQueueError> + Send + 'static,
    ) -> Result<bool, CallbackError> {
        let id = lease.lease_id;
        match self.with_queue(move |q| op(q, &id)).await {
            Ok(()) => Ok(true),
            Err(CallbackError::Queue(LocalQueueError::StaleLease { .. })) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// How long to sleep when nothing is ready.
    async fn idle_wait(&self) -> Result<Duration, CallbackError> {
        let next = self.with_queue(|q| Ok(q.next_visible_at())).await?;
        let wait = match next {
            Some(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .min(self.idle_recheck),
            None => self.idle_recheck,
        };
        Ok(wait.max(MIN_IDLE_WAIT))
    }

    async fn with_queue<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Q) -> Result<T, LocalQueueError> + Send + 'static,
    ) -> Result<T, CallbackError> {
        with_queue(&self.queue, op).await
    }
}

impl<Q: LocalQueue + ?Sized + 'static> Pusher<Q> {
    /// Pushes `job`, visible after the policy's
    /// [`first_delay`](RetryPolicy::first_delay), and wakes a worker.
    ///
    /// # Errors
    ///
    /// [`CallbackError::Queue`] if the queue refuses it (a
    /// [`FileQueue`](crate::queue::local::FileQueue) that cannot write),
    /// [`CallbackError::QueuePoisoned`] if its mutex is poisoned.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may or may not have pushed the job.
    pub async fn push(&self, job: Job) -> Result<MessageId, CallbackError> {
        let options = PushOptions {
            delay: self.first_delay,
            ..PushOptions::default()
        };
        self.push_with(job, options).await
    }

    /// Pushes `job` with explicit options (delay, priority), ignoring the
    /// policy's first delay, and wakes a worker.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push).
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use taskherd::callback::{Job, Registry, Worker};
    /// use taskherd::queue::local::{LocalQueue, MemoryQueue, PushOptions, QueueOptions};
    /// use taskherd::retry::RetryPolicy;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), taskherd::callback::CallbackError> {
    /// let queue = Arc::new(Mutex::new(MemoryQueue::new(QueueOptions::default())));
    /// let registry = Arc::new(Registry::new());
    /// let worker = Worker::new(Arc::clone(&queue), registry, RetryPolicy::none());
    /// let urgent = PushOptions { priority: 10, ..PushOptions::default() };
    /// worker.pusher().push_with(Job::new("page_oncall", ())?, urgent).await?;
    /// assert_eq!(queue.lock().unwrap().stats().ready, 1);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn push_with(
        &self,
        job: Job,
        options: PushOptions,
    ) -> Result<MessageId, CallbackError> {
        let payload = match serde_json::to_value(&job) {
            Ok(payload) => payload,
            Err(source) => {
                return Err(CallbackError::Serialize {
                    handler: job.handler,
                    source,
                })
            }
        };
        let id = with_queue(&self.queue, move |q| q.push(payload, options)).await?;
        self.wake.notify_one();
        Ok(id)
    }

    /// Wakes a worker after a message was pushed on the queue directly.
    pub fn notify(&self) {
        self.wake.notify_one();
    }
}

/// Runs `op` on the locked queue on the blocking pool.
async fn with_queue<Q, T>(
    queue: &Arc<Mutex<Q>>,
    op: impl FnOnce(&mut Q) -> Result<T, LocalQueueError> + Send + 'static,
) -> Result<T, CallbackError>
where
    Q: LocalQueue + ?Sized + 'static,
    T: Send + 'static,
{
    let queue = Arc::clone(queue);
    let task = tokio::task::spawn_blocking(move || {
        let mut guard = queue.lock().map_err(|_| CallbackError::QueuePoisoned)?;
        op(&mut guard).map_err(CallbackError::Queue)
    });
    match task.await {
        Ok(result) => result,
        Err(err) => Err(CallbackError::QueueTask(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::local::{MemoryQueue, QueueOptions};
    use serde_json::json;
    use std::sync::atomic::{AtomicU32, Ordering};

    type Shared = Arc<Mutex<MemoryQueue>>;

    fn memory_queue(visibility: Duration) -> Shared {
        Arc::new(Mutex::new(MemoryQueue::new(QueueOptions {
            visibility_timeout: visibility,
            max_receives: 10,
        })))
    }

    /// A registry whose "job" handler answers with the outcome in its
    /// payload and counts its calls.
    fn registry(calls: &Arc<AtomicU32>) -> Arc<Registry> {
        let mut registry = Registry::new();
        let counter = Arc::clone(calls);
        registry
            .register("job", move |outcome: Outcome| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move { outcome }
            })
            .expect("register");
        Arc::new(registry)
    }

    fn job(outcome: Outcome) -> Job {
        Job::new("job", outcome).expect("job")
    }

    fn stats(queue: &Shared) -> crate::queue::local::QueueStats {
        queue.lock().expect("queue").stats()
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn success_acks() {
        let calls = Arc::new(AtomicU32::new(0));
        let queue = memory_queue(Duration::from_secs(30));
        let worker = Worker::new(Arc::clone(&queue), registry(&calls), RetryPolicy::default());
        let id = worker
            .pusher()
            .push(job(Outcome::Done))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(
            report,
            JobReport {
                message_id: id,
                attempt: 1,
                handler: Some("job".into()),
                outcome: Some(Outcome::Done),
                settlement: Settlement::Acked,
            }
        );
        assert_eq!(stats(&queue), Default::default());
        assert!(worker.work_one().await.expect("work").is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retry_nacks_with_the_policy_delay_and_comes_back() {
        let calls = Arc::new(AtomicU32::new(0));
        let queue = memory_queue(Duration::from_secs(30));
        let policy = RetryPolicy::schedule([Duration::from_secs(60), Duration::from_secs(120)]);
        let worker = Worker::new(Arc::clone(&queue), registry(&calls), policy);
        worker
            .pusher()
            .push(job(Outcome::Retry(None)))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(
            report.settlement,
            Settlement::Retried {
                delay: Duration::from_secs(60)
            }
        );
        assert_eq!(report.outcome, Some(Outcome::Retry(None)));
        // Not visible before the delay.
        assert!(worker.work_one().await.expect("work").is_none());
        let s = stats(&queue);
        assert_eq!((s.ready, s.delayed, s.in_flight), (0, 1, 0));
        // After it, it comes back as the second delivery.
        let later = SystemTime::now() + Duration::from_secs(61);
        let lease = queue
            .lock()
            .expect("queue")
            .receive(later)
            .expect("receive")
            .expect("visible again");
        assert_eq!(lease.message.receive_count, 2);
        assert_eq!(lease.message.id, report.message_id);
    }

    #[tokio::test]
    async fn requested_retry_delay_is_used() {
        let calls = Arc::new(AtomicU32::new(0));
        let queue = memory_queue(Duration::from_secs(30));
        let worker = Worker::new(
            Arc::clone(&queue),
            registry(&calls),
            RetryPolicy::schedule([Duration::from_secs(60)]),
        );
        let pusher = worker.pusher();
        pusher
            .push(job(Outcome::Retry(Some(Duration::from_secs(5)))))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(
            report.settlement,
            Settlement::Retried {
                delay: Duration::from_secs(5)
            }
        );
    }

    #[tokio::test]
    async fn second_failure_runs_again_then_gives_up() {
        let calls = Arc::new(AtomicU32::new(0));
        let queue = memory_queue(Duration::from_secs(30));
        let dead = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&dead);
        // One retry, right away.
        let worker = Worker::new(
            Arc::clone(&queue),
            registry(&calls),
            RetryPolicy::schedule([Duration::ZERO]),
        )
        .with_dead_hook(move |message, reason| {
            seen.lock()
                .expect("dead")
                .push((message.receive_count, reason.to_string()))
        });
        worker
            .pusher()
            .push(job(Outcome::Retry(None)))
            .await
            .expect("push");
        let first = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(
            first.settlement,
            Settlement::Retried {
                delay: Duration::ZERO
            }
        );
        let second = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(second.attempt, 2);
        assert_eq!(
            second.settlement,
            Settlement::Buried {
                reason: "retry schedule used up after 2 attempts".into()
            }
        );
        assert_eq!(stats(&queue), Default::default());
        assert_eq!(
            *dead.lock().expect("dead"),
            [(2, "retry schedule used up after 2 attempts".to_string())]
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn dead_is_buried_and_reported() {
        let calls = Arc::new(AtomicU32::new(0));
        let queue = memory_queue(Duration::from_secs(30));
        let dead = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&dead);
        let worker = Worker::new(Arc::clone(&queue), registry(&calls), RetryPolicy::default())
            .with_dead_hook(move |message, reason| {
                seen.lock()
                    .expect("dead")
                    .push((message.payload.clone(), reason.to_string()))
            });
        let pusher = worker.pusher();
        pusher
            .push(job(Outcome::Dead("bad input".into())))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(
            report.settlement,
            Settlement::Buried {
                reason: "bad input".into()
            }
        );
        assert_eq!(stats(&queue), Default::default());

        // Unknown handler, bad payload, and something that is not a job.
        pusher
            .push(Job::new("missing", ()).expect("job"))
            .await
            .expect("push");
        pusher
            .push(Job::new("job", "not an outcome").expect("job"))
            .await
            .expect("push");
        queue
            .lock()
            .expect("queue")
            .push(json!({"no": "envelope"}), PushOptions::default())
            .expect("push");
        let mut reasons = Vec::new();
        while let Some(report) = worker.work_one().await.expect("work") {
            match report.settlement {
                Settlement::Buried { reason } => reasons.push(reason),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert_eq!(reasons[0], "unknown handler \"missing\"");
        assert!(
            reasons[1].starts_with("bad payload for handler \"job\""),
            "{reasons:?}"
        );
        assert!(
            reasons[2].starts_with("message is not a job"),
            "{reasons:?}"
        );
        assert_eq!(dead.lock().expect("dead").len(), 4);
        assert_eq!(stats(&queue), Default::default());
    }

    #[tokio::test]
    async fn at_most_once_acks_before_running_and_never_retries() {
        let queue = memory_queue(Duration::from_secs(30));
        let calls = Arc::new(AtomicU32::new(0));
        let mut registry = Registry::new();
        let seen_queue = Arc::clone(&queue);
        let counter = Arc::clone(&calls);
        registry
            .register("fails", move |_: ()| {
                // When the handler runs, the message is already gone.
                let s = seen_queue.lock().expect("queue").stats();
                assert_eq!((s.ready, s.delayed, s.in_flight), (0, 0, 0));
                counter.fetch_add(1, Ordering::SeqCst);
                async { Outcome::Retry(None) }
            })
            .expect("register");
        let dead = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&dead);
        let worker = Worker::new(
            Arc::clone(&queue),
            Arc::new(registry),
            RetryPolicy::default().at_most_once(),
        )
        .with_dead_hook(move |_, reason| seen.lock().expect("dead").push(reason.to_string()));
        worker
            .pusher()
            .push(Job::new("fails", ()).expect("job"))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(report.settlement, Settlement::AckedBeforeRun);
        assert_eq!(report.outcome, Some(Outcome::Retry(None)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Nothing comes back, even much later.
        let later = SystemTime::now() + Duration::from_secs(3600);
        assert!(queue
            .lock()
            .expect("queue")
            .receive(later)
            .expect("receive")
            .is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            *dead.lock().expect("dead"),
            ["at-most-once job failed; not retried"]
        );
    }

    #[tokio::test]
    async fn first_delay_is_applied_by_the_pusher() {
        let calls = Arc::new(AtomicU32::new(0));
        let queue = memory_queue(Duration::from_secs(30));
        let worker = Worker::new(
            Arc::clone(&queue),
            registry(&calls),
            RetryPolicy::none().with_first_delay(Duration::from_secs(60)),
        );
        worker
            .pusher()
            .push(job(Outcome::Done))
            .await
            .expect("push");
        assert!(worker.work_one().await.expect("work").is_none());
        assert_eq!(stats(&queue).delayed, 1);
    }

    #[tokio::test]
    async fn panicking_handler_is_retried_not_acked() {
        let queue = memory_queue(Duration::from_secs(30));
        let mut registry = Registry::new();
        registry
            .register("boom", |_: ()| async { panic!("handler bug") })
            .expect("register");
        let worker = Worker::new(
            Arc::clone(&queue),
            Arc::new(registry),
            RetryPolicy::schedule([Duration::from_secs(10)]),
        );
        worker
            .pusher()
            .push(Job::new("boom", ()).expect("job"))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(report.outcome, Some(Outcome::Retry(None)));
        assert_eq!(
            report.settlement,
            Settlement::Retried {
                delay: Duration::from_secs(10)
            }
        );
        assert_eq!(stats(&queue).delayed, 1);
    }

    #[tokio::test]
    async fn lease_is_extended_while_a_slow_job_runs() {
        // The job outlives its lease four times over. The lease is wall
        // clock time and is extended when half of it is left: half of it
        // must exceed the scheduling delays of a loaded machine (a 60 ms
        // lease, 30 ms of slack, was lost once at a load of 9 on 2 cores).
        let queue = memory_queue(Duration::from_millis(300));
        let mut registry = Registry::new();
        registry
            .register("slow", |_: ()| async {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                Outcome::Done
            })
            .expect("register");
        let worker = Worker::new(Arc::clone(&queue), Arc::new(registry), RetryPolicy::none());
        worker
            .pusher()
            .push(Job::new("slow", ()).expect("job"))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(report.settlement, Settlement::Acked);
        assert_eq!(stats(&queue), Default::default());
    }

    #[tokio::test]
    async fn lost_lease_is_reported_not_acked() {
        let queue = memory_queue(Duration::from_secs(30));
        let mut registry = Registry::new();
        let thief = Arc::clone(&queue);
        registry
            .register("lose", move |_: ()| {
                let thief = Arc::clone(&thief);
                async move {
                    // Someone makes the lease stale: a receive far in the
                    // future expires it and leases the message anew.
                    let later = SystemTime::now() + Duration::from_secs(3600);
                    let mut q = thief.lock().expect("queue");
                    assert!(q.receive(later).expect("receive").is_some());
                    Outcome::Done
                }
            })
            .expect("register");
        let worker = Worker::new(Arc::clone(&queue), Arc::new(registry), RetryPolicy::none());
        worker
            .pusher()
            .push(Job::new("lose", ()).expect("job"))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(report.settlement, Settlement::LeaseLost);
    }

    #[tokio::test]
    async fn run_sleeps_until_a_push_then_stops_on_cancel() {
        let queue = memory_queue(Duration::from_secs(30));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut registry = Registry::new();
        registry
            .register("note", move |n: u32| {
                let _ = tx.send(n);
                async { Outcome::Done }
            })
            .expect("register");
        // With an hour-long recheck, only the push can wake it in time.
        let worker = Worker::new(Arc::clone(&queue), Arc::new(registry), RetryPolicy::none())
            .with_idle_recheck(Duration::from_secs(3600));
        let pusher = worker.pusher();
        let cancel = CancellationToken::new();
        let running = tokio::spawn(worker.clone().run(cancel.clone()));
        let second = tokio::spawn(worker.run(cancel.clone()));
        tokio::time::sleep(20 * MS).await;
        for n in 1..=3 {
            pusher
                .push(Job::new("note", n).expect("job"))
                .await
                .expect("push");
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("woken by the push")
                .expect("handler ran");
            got.push(n);
        }
        got.sort_unstable();
        assert_eq!(got, [1, 2, 3]);
        cancel.cancel();
        let a = running.await.expect("task").expect("run");
        let b = second.await.expect("task").expect("run");
        assert_eq!(a.done + b.done, 3);
        assert_eq!(stats(&queue), Default::default());
    }

    #[tokio::test]
    async fn run_retries_when_the_delay_runs_out() {
        let queue = memory_queue(Duration::from_secs(30));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let attempts = Arc::new(AtomicU32::new(0));
        let mut registry = Registry::new();
        let counter = Arc::clone(&attempts);
        registry
            .register("flaky", move |_: ()| {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let tx = tx.clone();
                async move {
                    let _ = tx.send(n);
                    if n == 1 {
                        Outcome::Retry(None)
                    } else {
                        Outcome::Done
                    }
                }
            })
            .expect("register");
        let worker = Worker::new(
            Arc::clone(&queue),
            Arc::new(registry),
            RetryPolicy::schedule([30 * MS]),
        )
        .with_idle_recheck(Duration::from_secs(3600));
        let pusher = worker.pusher();
        let cancel = CancellationToken::new();
        let running = tokio::spawn(worker.run(cancel.clone()));
        pusher
            .push(Job::new("flaky", ()).expect("job"))
            .await
            .expect("push");
        for expected in 1..=2 {
            let n = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("ran in time")
                .expect("handler ran");
            assert_eq!(n, expected);
        }
        cancel.cancel();
        let summary = running.await.expect("task").expect("run");
        assert_eq!(summary.retried, 1);
        assert_eq!(summary.done, 1);
    }

    #[tokio::test]
    async fn works_on_a_dyn_queue() {
        let calls = Arc::new(AtomicU32::new(0));
        let queue: Arc<Mutex<dyn LocalQueue>> = memory_queue(Duration::from_secs(30));
        let worker = Worker::new(queue, registry(&calls), RetryPolicy::default());
        worker
            .pusher()
            .push(job(Outcome::Done))
            .await
            .expect("push");
        let report = worker.work_one().await.expect("work").expect("ready");
        assert_eq!(report.settlement, Settlement::Acked);
    }

    #[tokio::test]
    async fn file_queue_settlements_survive_a_reopen() {
        use crate::queue::local::FileQueue;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jobs.journal");
        let calls = Arc::new(AtomicU32::new(0));
        {
            let queue = FileQueue::open(&path, QueueOptions::default()).expect("open");
            let queue = Arc::new(Mutex::new(queue));
            let worker = Worker::new(
                Arc::clone(&queue),
                registry(&calls),
                RetryPolicy::schedule([Duration::from_secs(60)]),
            );
            let pusher = worker.pusher();
            pusher.push(job(Outcome::Done)).await.expect("push");
            pusher.push(job(Outcome::Retry(None))).await.expect("push");
            let first = worker.work_one().await.expect("work").expect("ready");
            assert_eq!(first.settlement, Settlement::Acked);
            let second = worker.work_one().await.expect("work").expect("ready");
            assert!(matches!(second.settlement, Settlement::Retried { .. }));
        }
        let mut reopened = FileQueue::open(&path, QueueOptions::default()).expect("reopen");
        let later = SystemTime::now() + Duration::from_secs(61);
        let lease = reopened
            .receive(later)
            .expect("receive")
            .expect("the retried job is back");
        assert_eq!(lease.message.receive_count, 2);
        assert_eq!(
            serde_json::from_value::<Job>(lease.message.payload).expect("job"),
            job(Outcome::Retry(None))
        );
        assert!(reopened.receive(later).expect("receive").is_none());
    }
}
