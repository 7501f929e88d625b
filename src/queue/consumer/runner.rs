//! Running jobs: one task per job, across connections, and the outcome
//! frame of each run with its counts.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::FutureExt as _;
use serde::de::DeserializeOwned;
use tokio::task::{self, JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{ConsumerOptions, ConsumerReport, JobInfo, JobResult};
use crate::error_text::panic_text;
use crate::protocol::millis;
use crate::protocol::queue::{OutcomeMeta, ToFeeder};
use crate::retry::Outcome;

/// A job received and not started yet.
pub(super) struct Queued<J> {
    /// Its lease, named in the outcome.
    pub(super) lease: u64,
    /// For the user function.
    pub(super) info: JobInfo,
    /// The payload, deserialized.
    pub(super) job: J,
    /// When it arrived, to skip it once its lease is over.
    pub(super) received: Instant,
}

/// How a job's run ended.
pub(super) enum JobEnd {
    /// The function returned.
    Returned(JobResult),
    /// The function panicked, with this text.
    Panicked(String),
}

/// A job running in a task.
#[derive(Debug, Clone, Copy)]
pub(super) struct Running {
    /// The connection it came on: its outcome is sent only on that one.
    pub(super) session: u64,
    /// Its lease.
    pub(super) lease: u64,
    /// When it started (wall clock), for the feeder's joblog.
    pub(super) started: SystemTime,
    /// When it started, for its duration.
    pub(super) began: Instant,
}

impl Running {
    /// What the feeder's joblog gets about this run, ended now.
    pub(super) fn meta(&self, host: &Option<String>, instance: Option<u32>) -> OutcomeMeta {
        let mut meta = OutcomeMeta::default();
        meta.host.clone_from(host);
        meta.instance = instance;
        meta.start_ms = self.started.duration_since(UNIX_EPOCH).ok().map(millis::of);
        meta.duration_ms = Some(millis::of(self.began.elapsed()));
        meta
    }
}

/// The jobs running, across connections, and the counts.
pub(super) struct Runner<J, F> {
    /// The user function.
    pub(super) run: Arc<F>,
    /// One task per running job.
    pub(super) running: JoinSet<JobEnd>,
    /// What each task runs.
    pub(super) in_progress: HashMap<task::Id, Running>,
    /// What happened so far.
    pub(super) report: ConsumerReport,
    /// This consumer's host, for the feeder's joblog.
    pub(super) host: Option<String>,
    /// This consumer instance's id, for the feeder's joblog.
    pub(super) instance: Option<u32>,
    /// The job type, for the methods.
    pub(super) _job: PhantomData<fn() -> J>,
}

impl<J, F> Runner<J, F> {
    /// No job running yet; `run` runs them.
    pub(super) fn new(run: F, options: &ConsumerOptions) -> Self {
        Runner {
            run: Arc::new(run),
            running: JoinSet::new(),
            in_progress: HashMap::new(),
            report: ConsumerReport::default(),
            host: options.host.clone(),
            instance: options.instance,
            _job: PhantomData,
        }
    }
}

impl<J, F, Fut> Runner<J, F>
where
    J: DeserializeOwned + Send + 'static,
    F: Fn(J, JobInfo) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Into<JobResult>,
{
    /// Runs a job in a task.
    pub(super) fn start(&mut self, session: u64, queued: Queued<J>) {
        let run = Arc::clone(&self.run);
        let Queued {
            lease, info, job, ..
        } = queued;
        let abort = self.running.spawn(async move {
            let ran = AssertUnwindSafe(async move { run(job, info).await })
                .catch_unwind()
                .await;
            match ran {
                Ok(result) => JobEnd::Returned(result.into()),
                Err(payload) => JobEnd::Panicked(panic_text(payload.as_ref())),
            }
        });
        self.in_progress.insert(
            abort.id(),
            Running {
                session,
                lease,
                started: SystemTime::now(),
                began: Instant::now(),
            },
        );
    }

    /// A task ended: which job, and how (`None` for a job cancelled or a
    /// task we no longer know).
    pub(super) fn take(
        &mut self,
        joined: Result<(task::Id, JobEnd), JoinError>,
    ) -> Option<(Running, JobEnd)> {
        match joined {
            Ok((id, end)) => self.in_progress.remove(&id).map(|running| (running, end)),
            Err(err) => {
                let running = self.in_progress.remove(&err.id())?;
                if err.is_panic() {
                    let text = panic_text(err.into_panic().as_ref());
                    Some((running, JobEnd::Panicked(text)))
                } else {
                    None
                }
            }
        }
    }

    /// A job ended with no connection to report on.
    pub(super) fn finished_unsent(&mut self, joined: Result<(task::Id, JobEnd), JoinError>) {
        if let Some((running, _)) = self.take(joined) {
            debug!(
                lease = running.lease,
                "job finished after its connection was lost: outcome not sent"
            );
            self.report.lost += 1;
        }
    }

    /// Gives up on every running job (their tasks are aborted; blocking
    /// work inside them runs on unobserved).
    pub(super) fn abandon(&mut self) {
        self.report.lost += self.in_progress.len() as u64;
        self.in_progress.clear();
        self.running.abort_all();
        self.running.detach_all();
    }

    /// What the feeder's joblog gets about `running`, ended now (`None`
    /// when the feeder keeps no joblog).
    pub(super) fn meta(&self, running: &Running, wanted: bool) -> Option<OutcomeMeta> {
        wanted.then(|| running.meta(&self.host, self.instance))
    }

    /// The outcome frame of a job of the current session, counted; with
    /// its [`OutcomeMeta`] when the feeder wants it.
    pub(super) fn outcome_frame(
        &mut self,
        running: &Running,
        end: JobEnd,
        wanted: bool,
    ) -> ToFeeder {
        let lease = running.lease;
        let mut meta = self.meta(running, wanted);
        match end {
            JobEnd::Returned(result) => {
                if let Some(meta) = &mut meta {
                    meta.exit = result.exit;
                    meta.signal = result.signal;
                }
                match result.outcome {
                    Outcome::Done => {
                        self.report.done += 1;
                        ToFeeder::Ack { lease, meta }
                    }
                    Outcome::Retry(delay) => {
                        self.report.retried += 1;
                        ToFeeder::Retry {
                            lease,
                            delay,
                            reason: result
                                .reason
                                .unwrap_or_else(|| "the consumer asked for a retry".into()),
                            meta,
                        }
                    }
                    Outcome::Dead(reason) => {
                        self.report.dead += 1;
                        ToFeeder::Dead {
                            lease,
                            reason,
                            meta,
                        }
                    }
                }
            }
            JobEnd::Panicked(text) => {
                warn!(lease, panic = %text, "job panicked: retry");
                self.report.retried += 1;
                ToFeeder::Retry {
                    lease,
                    delay: None,
                    reason: format!("panicked: {text}"),
                    meta,
                }
            }
        }
    }
}
