//! Producing jobs on a JetStream queue and looking at it: what
//! `taskherd queue add`, `list` and `requeue-dead` do for a queue group
//! with `backend = "nats"`.
//!
//! A job is one message on the queue's subject whose body is the job's
//! JSON. Optional headers: `Taskherd-Not-Before` (Unix ms: not run
//! before then) and `Nats-Msg-Id` (a unique key: a second job with the
//! same key within the stream's duplicate window, 2 minutes by default,
//! is dropped). Any NATS client can publish such messages.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{
    NatsError, ATTEMPTS_HEADER, MSG_ID_HEADER, NOT_BEFORE_HEADER, REASON_HEADER, SEQUENCE_HEADER,
};
use crate::protocol::slave::JetStreamQueue;

/// What [`add`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Added {
    /// Jobs the stream took.
    pub added: u64,
    /// Jobs dropped as duplicates of their unique key.
    pub duplicates: u64,
}

/// Publishes `jobs` (JSON texts) on the queue, each not run before
/// `not_before` and with the unique key `unique` if given, and waits for
/// the stream to take each.
///
/// # Errors
/// The first publication the stream did not take (the ones before it
/// were added).
pub async fn add(
    client: &async_nats::Client,
    queue: &JetStreamQueue,
    jobs: &[Box<RawValue>],
    not_before: Option<SystemTime>,
    unique: Option<&str>,
) -> Result<Added, NatsError> {
    let publications = jobs.iter().map(|job| Publication {
        job,
        not_before,
        unique,
    });
    let mut added = Added::default();
    for published in publish(client, queue, publications).await? {
        if published.duplicate {
            added.duplicates += 1;
        } else {
            added.added += 1;
        }
    }
    Ok(added)
}

/// One job to publish, with its own options.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Publication<'a> {
    /// The job's JSON text.
    pub job: &'a RawValue,
    /// Not run before this time (header `Taskherd-Not-Before`).
    pub not_before: Option<SystemTime>,
    /// Its unique key (header `Nats-Msg-Id`).
    pub unique: Option<&'a str>,
}

impl<'a> Publication<'a> {
    /// A job with its options.
    #[must_use]
    pub fn new(job: &'a RawValue, not_before: Option<SystemTime>, unique: Option<&'a str>) -> Self {
        Publication {
            job,
            not_before,
            unique,
        }
    }
}

/// What the stream did with one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// Its sequence in the work stream: its id, as consumers see it (for
    /// a duplicate, the sequence of the job already there).
    pub sequence: u64,
    /// Dropped as a duplicate of its unique key.
    pub duplicate: bool,
}

/// Publishes `jobs` on the queue, each with its own options, and waits
/// for the stream to take each (a JetStream ack: it is stored); returns
/// what became of each, in order.
///
/// # Errors
/// The first publication the stream did not take (the ones before it
/// were added).
pub async fn publish<'a>(
    client: &async_nats::Client,
    queue: &JetStreamQueue,
    jobs: impl IntoIterator<Item = Publication<'a>>,
) -> Result<Vec<Published>, NatsError> {
    let js = jetstream::new(client.clone());
    let mut published = Vec::new();
    // The client holds a bounded number of publications waiting for their
    // acks (5 000): the acks are awaited in windows below that.
    let mut acks = Vec::with_capacity(ACK_WINDOW);
    for job in jobs {
        if acks.len() >= ACK_WINDOW {
            settle(queue, &mut acks, &mut published).await?;
        }
        let mut headers = async_nats::HeaderMap::new();
        if let Some(at) = job.not_before {
            let ms = at
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_millis();
            headers.insert(NOT_BEFORE_HEADER, ms.to_string().as_str());
        }
        if let Some(key) = job.unique {
            headers.insert(MSG_ID_HEADER, key);
        }
        let body = bytes::Bytes::copy_from_slice(job.job.get().as_bytes());
        let ack = js
            .publish_with_headers(queue.subject.clone(), headers, body)
            .await
            .map_err(|err| NatsError::Api {
                what: format!("cannot publish on {}", queue.subject),
                reason: err.to_string(),
            })?;
        acks.push(ack);
    }
    settle(queue, &mut acks, &mut published).await?;
    Ok(published)
}

/// Publications awaited at a time by [`publish`].
const ACK_WINDOW: usize = 1000;

/// Awaits the acks of `acks`, in order, into `published`.
async fn settle(
    queue: &JetStreamQueue,
    acks: &mut Vec<async_nats::jetstream::context::PublishAckFuture>,
    published: &mut Vec<Published>,
) -> Result<(), NatsError> {
    for ack in acks.drain(..) {
        let ack = ack.await.map_err(|err| NatsError::Api {
            what: format!("the stream {:?} did not take a job", queue.stream),
            reason: err.to_string(),
        })?;
        published.push(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        });
    }
    Ok(())
}

/// A dead job, as [`inspect`] lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DeadJob {
    /// Its sequence in the dead stream.
    pub dead_sequence: u64,
    /// Its sequence in the work stream (its id while it lived).
    pub id: u64,
    /// Why it died.
    pub reason: String,
    /// Its attempts.
    pub attempts: u32,
    /// The job (its JSON, or the body as text if it was not JSON).
    pub job: String,
}

/// What a JetStream queue holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// The work stream.
    pub stream: String,
    /// Jobs in the work stream (waiting or running).
    pub pending: u64,
    /// Of those, delivered and not answered yet (running).
    pub in_flight: u64,
    /// Jobs in the dead stream.
    pub dead_count: u64,
    /// The dead jobs (the first `limit`).
    pub dead: Vec<DeadJob>,
}

/// Counts the queue's jobs and lists its dead ones (at most `limit`).
///
/// # Errors
/// A stream that is not there, a server that does not answer.
pub async fn inspect(
    client: &async_nats::Client,
    queue: &JetStreamQueue,
    limit: usize,
) -> Result<Report, NatsError> {
    let js = jetstream::new(client.clone());
    let api = |what: String| move |err: String| NatsError::Api { what, reason: err };
    let mut work = js
        .get_stream(&queue.stream)
        .await
        .map_err(|err| api(format!("no stream {:?}", queue.stream))(err.to_string()))?;
    let pending = work
        .info()
        .await
        .map_err(|err| api(format!("cannot read {:?}", queue.stream))(err.to_string()))?
        .state
        .messages;
    let in_flight = match work.consumer_info(&queue.consumer).await {
        Ok(info) => info.num_ack_pending as u64,
        Err(_) => 0,
    };
    let (dead_count, dead) = dead_jobs(&js, queue, limit).await?;
    Ok(Report {
        stream: queue.stream.clone(),
        pending,
        in_flight,
        dead_count,
        dead,
    })
}

async fn dead_jobs(
    js: &jetstream::Context,
    queue: &JetStreamQueue,
    limit: usize,
) -> Result<(u64, Vec<DeadJob>), NatsError> {
    let api = |err: String| NatsError::Api {
        what: format!("cannot read the dead stream {:?}", queue.dead_stream),
        reason: err,
    };
    let mut dead_stream = js
        .get_stream(&queue.dead_stream)
        .await
        .map_err(|err| api(err.to_string()))?;
    let state = dead_stream
        .info()
        .await
        .map_err(|err| api(err.to_string()))?
        .state
        .clone();
    let mut dead = Vec::new();
    if state.messages > 0 {
        for sequence in state.first_sequence..=state.last_sequence {
            if dead.len() >= limit {
                break;
            }
            // Deleted (requeued) ones leave holes.
            let Ok(message) = dead_stream.get_raw_message(sequence).await else {
                continue;
            };
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|value| value.as_str().to_string())
                    .unwrap_or_default()
            };
            dead.push(DeadJob {
                dead_sequence: sequence,
                id: header(SEQUENCE_HEADER).parse().unwrap_or(0),
                reason: header(REASON_HEADER),
                attempts: header(ATTEMPTS_HEADER).parse().unwrap_or(0),
                job: String::from_utf8_lossy(&message.payload).into_owned(),
            });
        }
    }
    Ok((state.messages, dead))
}

/// Puts every dead job back in the work stream (as a new job, with
/// fresh attempts) and deletes it from the dead stream; returns how many.
///
/// # Errors
/// The first job that could not be moved (those before it were).
pub async fn requeue_dead(
    client: &async_nats::Client,
    queue: &JetStreamQueue,
) -> Result<u64, NatsError> {
    let js = jetstream::new(client.clone());
    let api = |what: &str, err: String| NatsError::Api {
        what: format!("{what} ({:?})", queue.dead_stream),
        reason: err,
    };
    let mut dead_stream = js
        .get_stream(&queue.dead_stream)
        .await
        .map_err(|err| api("no dead stream", err.to_string()))?;
    let state = dead_stream
        .info()
        .await
        .map_err(|err| api("cannot read the dead stream", err.to_string()))?
        .state
        .clone();
    let mut moved = 0;
    if state.messages == 0 {
        return Ok(0);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let Ok(message) = dead_stream.get_raw_message(sequence).await else {
            continue;
        };
        let ack = js
            .publish(queue.subject.clone(), message.payload.clone())
            .await
            .map_err(|err| api("cannot publish a dead job again", err.to_string()))?;
        ack.await
            .map_err(|err| api("the work stream did not take a dead job", err.to_string()))?;
        dead_stream
            .delete_message(sequence)
            .await
            .map_err(|err| api("cannot delete a requeued job", err.to_string()))?;
        moved += 1;
    }
    Ok(moved)
}
