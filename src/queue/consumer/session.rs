//! One connection's life: credits, jobs in and outcomes out, heartbeats,
//! the feeder's silence, and the drain.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link::{classify, write_frames, Link, Read};
use super::runner::{Queued, Runner};
use super::{ConsumerOptions, FeederControl, JobInfo, JobResult, Stop, BYE_TIMEOUT};
use crate::protocol::queue::{OutcomeMeta, ToConsumer, ToFeeder};

/// How a session ended.
pub(super) enum SessionEnd {
    /// Drained or shut down: stop consuming.
    Finished,
    /// The connection broke or the feeder went silent: reconnect.
    Lost(String),
}

/// One connection's life: credits, jobs, outcomes, heartbeats, drain.
pub(super) async fn session<J, F, Fut>(
    runner: &mut Runner<J, F>,
    link: Link,
    options: &ConsumerOptions,
    shutdown: &CancellationToken,
    stop: &mut Stop,
) -> SessionEnd
where
    J: DeserializeOwned + Send + 'static,
    F: Fn(J, JobInfo) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Into<JobResult>,
{
    let session = runner.report.connections;
    let Link {
        mut feeder_rx,
        feeder_tx,
        lease,
        settles,
        extends,
        meta,
    } = link;
    let (frames_tx, frames_rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(write_frames(feeder_tx, frames_rx));
    let send = |frame: ToFeeder| {
        // A closed queue means the writer failed: the select sees it.
        let _ = frames_tx.send(frame);
    };

    // Jobs of a lost connection still running keep their slots.
    let held = u32::try_from(runner.running.len()).unwrap_or(u32::MAX);
    let initial = options.prefetch().saturating_sub(held);
    if initial > 0 {
        send(ToFeeder::Credit { n: initial });
    }
    let mut queued: VecDeque<Queued<J>> = VecDeque::new();
    // Job ids and attempts by lease, for the log of outcomes a durable
    // feeder settles.
    let mut job_ids: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut draining = false;
    let mut last_heard = Instant::now();
    // A zero period would make the interval panic.
    let every = options.heartbeat.max(Duration::from_millis(1));
    let mut heartbeat = tokio::time::interval_at(last_heard + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let end = loop {
        // Slots freed by this turn, granted back as one credit frame.
        let mut freed = 0u32;
        // A job may have asked for the stop (max jobs): no new job then.
        if !draining && shutdown.is_cancelled() {
            info!("shutdown: draining");
            draining = true;
            stop.begin(options);
            release_all(&mut queued, runner, &send);
        }
        if !draining {
            while runner.running.len() < options.slots() as usize {
                let Some(job) = queued.pop_front() else { break };
                if !lease.is_zero() && job.received.elapsed() >= lease {
                    debug!(
                        lease = job.lease,
                        "job waited longer than its lease: not started"
                    );
                    runner.report.expired += 1;
                    freed += 1;
                    continue;
                }
                runner.start(session, job);
            }
        } else if runner.running.is_empty() {
            break SessionEnd::Finished;
        }
        if freed > 0 {
            send(ToFeeder::Credit { n: freed });
            freed = 0;
        }
        let silent_at = last_heard + options.silence;
        let grace_over = stop.deadline.filter(|_| draining);

        tokio::select! {
            biased;
            Some(joined) = runner.running.join_next_with_id(), if !runner.running.is_empty() => {
                let mut next = Some(joined);
                while let Some(joined) = next.take() {
                    if let Some((running, end)) = runner.take(joined) {
                        if running.session == session {
                            let frame = runner.outcome_frame(&running, end, meta);
                            if matches!(frame, ToFeeder::Retry { .. }) {
                                // Not final: never settled.
                                job_ids.remove(&running.lease);
                            }
                            send(frame);
                        } else {
                            debug!(
                                lease = running.lease,
                                "job of a lost connection finished: outcome not sent"
                            );
                            runner.report.lost += 1;
                        }
                        freed += 1;
                    }
                    next = runner.running.try_join_next_with_id();
                }
                if !draining && !shutdown.is_cancelled() && freed > 0 {
                    send(ToFeeder::Credit { n: freed });
                }
            }
            item = feeder_rx.read() => {
                last_heard = Instant::now();
                match classify(item) {
                    Read::Frame(ToConsumer::Job { lease: job_lease, id, attempt, payload }) => {
                        if settles {
                            job_ids.insert(job_lease, (id, attempt));
                        }
                        if draining {
                            send(ToFeeder::Release { lease: job_lease });
                            runner.report.released += 1;
                            continue;
                        }
                        match payload.decode::<J>() {
                            Ok(job) => {
                                let received = Instant::now();
                                queued.push_back(Queued {
                                    lease: job_lease,
                                    info: JobInfo {
                                        id,
                                        attempt,
                                        deadline: (!lease.is_zero())
                                            .then(|| (received + lease).into_std()),
                                        feeder: FeederControl { frames_tx: frames_tx.clone() },
                                        lease: job_lease,
                                        lease_time: lease,
                                        extends,
                                    },
                                    job,
                                    received,
                                });
                            }
                            Err(err) => {
                                let err = payload_error(&err);
                                warn!(
                                    job = id,
                                    lease = job_lease,
                                    cause = %err,
                                    "job payload does not fit the job type: dead"
                                );
                                runner.report.dead += 1;
                                let mut origin = OutcomeMeta::default();
                                origin.host.clone_from(&runner.host);
                                origin.instance = runner.instance;
                                send(ToFeeder::Dead {
                                    lease: job_lease,
                                    reason: format!("bad payload: {err}"),
                                    meta: meta.then_some(origin),
                                });
                                send(ToFeeder::Credit { n: 1 });
                            }
                        }
                    }
                    Read::Frame(ToConsumer::Stale { lease }) => {
                        debug!(lease, "the feeder called an outcome stale");
                        runner.report.stale += 1;
                    }
                    Read::Frame(ToConsumer::Settled { leases }) => {
                        for lease in leases {
                            let (job, attempt) = job_ids.remove(&lease).unzip();
                            debug!(lease, job, attempt, "outcome recorded durably by the feeder");
                            runner.report.settled += 1;
                        }
                    }
                    Read::Frame(ToConsumer::Drain) => {
                        if !draining {
                            info!("the feeder drains us: stopping");
                            draining = true;
                            stop.begin(options);
                            release_all(&mut queued, runner, &send);
                        }
                    }
                    Read::Frame(ToConsumer::Heartbeat) => {}
                    Read::Frame(ToConsumer::Refused { reason }) => {
                        break lost_or_finished(draining, format!("the feeder refused us: {reason}"));
                    }
                    Read::Frame(other) => {
                        warn!(frame = ?other, "unexpected frame from the feeder: ignored");
                    }
                    Read::Unknown(err) => {
                        warn!(cause = %err, "unknown frame from the feeder: ignored");
                    }
                    Read::Closed => {
                        break lost_or_finished(draining, "the feeder closed the connection".into());
                    }
                    Read::Broken(err) => {
                        break lost_or_finished(draining, format!("read failed: {err}"));
                    }
                }
            }
            // The drain begins at the top of the loop.
            () = shutdown.cancelled(), if !draining => {}
            _ = heartbeat.tick() => send(ToFeeder::Heartbeat),
            () = tokio::time::sleep_until(silent_at) => {
                let cause = format!("the feeder was silent for {:?}", options.silence);
                break lost_or_finished(draining, cause);
            }
            () = sleep_until_some(grace_over), if grace_over.is_some() => {
                let late: Vec<(u64, Option<OutcomeMeta>)> = runner
                    .in_progress
                    .values()
                    .filter(|running| running.session == session)
                    .map(|running| (running.lease, runner.meta(running, meta)))
                    .collect();
                warn!(
                    jobs = late.len(),
                    grace = ?options.grace,
                    "jobs still running after the stop grace: reported as retries"
                );
                for (lease, meta) in late {
                    send(ToFeeder::Retry {
                        lease,
                        delay: None,
                        reason: format!(
                            "still running after the stop grace of {:?}",
                            options.grace
                        ),
                        meta,
                    });
                    runner.report.retried += 1;
                    runner.report.interrupted += 1;
                }
                runner.in_progress.retain(|_, running| running.session != session);
                runner.abandon();
                break SessionEnd::Finished;
            }
            written = &mut writer => {
                let cause = match written {
                    Ok(Ok(())) => "the writer stopped".to_string(),
                    Ok(Err(err)) => format!("write failed: {err}"),
                    Err(err) => format!("the writer task failed: {err}"),
                };
                // The writer is gone: nothing more can be sent.
                runner.report.lost += queued.len() as u64;
                return lost_or_finished(draining, cause);
            }
        }
    };

    match end {
        SessionEnd::Finished => {
            send(ToFeeder::Bye);
            drop(frames_tx);
            match tokio::time::timeout(BYE_TIMEOUT, &mut writer).await {
                Ok(Ok(Ok(()))) => debug!("said bye to the feeder"),
                Ok(Ok(Err(err))) => debug!(cause = %err, "could not say bye to the feeder"),
                Ok(Err(_)) => {}
                Err(_) => {
                    writer.abort();
                    debug!("the feeder does not read: bye not sent");
                }
            }
        }
        SessionEnd::Lost(_) => {
            writer.abort();
            runner.report.lost += queued.len() as u64;
        }
    }
    end
}

/// A broken link ends the session: lost, or finished when we were
/// draining anyway.
pub(super) fn lost_or_finished(draining: bool, cause: String) -> SessionEnd {
    if draining {
        debug!(cause = %cause, "connection ended while draining");
        SessionEnd::Finished
    } else {
        SessionEnd::Lost(cause)
    }
}

/// serde's complaint about a payload that does not fit the job type, as
/// it reads for a payload decoded from a JSON value: without the position
/// in the payload's text (the same reason whichever way the payload came).
pub(super) fn payload_error(err: &serde_json::Error) -> String {
    let text = err.to_string();
    if err.line() == 0 {
        return text;
    }
    let position = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&position) {
        Some(message) => message.to_string(),
        None => text,
    }
}

/// Hands back every job not started.
pub(super) fn release_all<J, F>(
    queued: &mut VecDeque<Queued<J>>,
    runner: &mut Runner<J, F>,
    send: &impl Fn(ToFeeder),
) {
    for job in queued.drain(..) {
        send(ToFeeder::Release { lease: job.lease });
        runner.report.released += 1;
    }
}

/// Sleeps until `deadline`, forever when there is none.
pub(super) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
