//! The consumer's job source on JetStream: a task that speaks the feeder
//! protocol's frames to the consumer's session over in-process channels
//! and JetStream to the server, so the session, its runner and the exec
//! and coprocess consumers run on it unchanged.
//!
//! Frames from the session and what they become:
//!
//! | frame | JetStream |
//! | --- | --- |
//! | `Credit { n }` | pull batches of at most the free credits |
//! | `Ack` | Ack |
//! | `Retry { delay }` | Nak with the group's backoff (or the delay asked), or dead at the limit |
//! | `Dead { reason }` | published to the dead stream, then Term |
//! | `Extend` | AckProgress |
//! | `Release` | Nak at once |
//! | `SlowDown`, `Pause` | broadcast to the group on its governor subject |
//!
//! The bridge sends the session a heartbeat every second (the session
//! takes a silent source for a lost one). When the session ends (its
//! channel closes), jobs still held are handed back at once (Nak).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, Message};
use futures::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::decide::{self, Arrival, Retry};
use super::{
    NatsError, ATTEMPTS_HEADER, MSG_ID_HEADER, NOT_BEFORE_HEADER, REASON_HEADER, SEQUENCE_HEADER,
};
use crate::backoff::Backoff;
use crate::protocol::queue::{JobPayload, ToConsumer, ToFeeder};
use crate::protocol::slave::JetStreamQueue;

/// How long a pull request waits on the server for jobs.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How often the session hears from the bridge.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest wait for the dead stream's ack of a dead job.
const DEAD_ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause a consumer may ask of the group.
const MAX_PAUSE: Duration = Duration::from_secs(300);
/// How long the group stops pulling when a consumer asks it to slow down.
const SLOW_DOWN_PAUSE: Duration = Duration::from_secs(1);

/// The queue group's NATS connection, kept across sessions.
pub(crate) struct Connection {
    client: async_nats::Client,
    js: jetstream::Context,
}

/// Connects, once: later sessions reuse the client (which reconnects by
/// itself).
pub(crate) async fn connection(
    queue: &JetStreamQueue,
    name: &str,
    kept: &mut Option<Connection>,
) -> Result<(), NatsError> {
    if kept.is_none() {
        let client = super::connect(queue, name).await?;
        let js = jetstream::new(client.clone());
        *kept = Some(Connection { client, js });
    }
    Ok(())
}

/// Opens a session's source: finds the group's durable consumer and
/// starts the bridge. Returns the frames it sends, the sender of the
/// frames it takes, and its task (which ends once the frames it takes
/// end and it has acted on them all).
pub(crate) async fn open(
    queue: &Arc<JetStreamQueue>,
    connection: &Connection,
) -> Result<
    (
        mpsc::UnboundedReceiver<ToConsumer>,
        mpsc::UnboundedSender<ToFeeder>,
        tokio::task::JoinHandle<()>,
    ),
    NatsError,
> {
    let consumer: PullConsumer = connection
        .js
        .get_consumer_from_stream(&queue.consumer, &queue.stream)
        .await
        .map_err(|err| NatsError::Api {
            what: format!(
                "cannot find the consumer {:?} of the stream {:?} (the master creates both at start)",
                queue.consumer, queue.stream
            ),
            reason: err.to_string(),
        })?;
    let governor = connection
        .client
        .subscribe(queue.governor_subject.clone())
        .await
        .map_err(|err| NatsError::Api {
            what: format!("cannot subscribe to {}", queue.governor_subject),
            reason: err.to_string(),
        })?;
    let advisories = connection
        .client
        .queue_subscribe(
            format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
                queue.stream, queue.consumer
            ),
            "taskherd".to_string(),
        )
        .await
        .map_err(|err| NatsError::Api {
            what: "cannot subscribe to the MAX_DELIVERIES advisories".into(),
            reason: err.to_string(),
        })?;
    let rate = match queue.settings.rate {
        Some(rate) => {
            let consumer: PullConsumer = connection
                .js
                .get_consumer_from_stream(&queue.consumer, super::rate::token_stream(queue))
                .await
                .map_err(|err| NatsError::Api {
                    what: format!(
                        "cannot find the consumer {:?} of the rate stream {:?} (the master creates both at start)",
                        queue.consumer,
                        super::rate::token_stream(queue)
                    ),
                    reason: err.to_string(),
                })?;
            Some(Rate {
                rate,
                tick: super::rate::tick(rate),
                consumer,
                tokens: 0,
                last_slot: 0,
            })
        }
        None => None,
    };
    let (to_session, from_bridge) = mpsc::unbounded_channel();
    let (to_bridge, from_session) = mpsc::unbounded_channel();
    let bridge = Bridge {
        queue: Arc::clone(queue),
        client: connection.client.clone(),
        js: connection.js.clone(),
        consumer,
        to_session,
        credits: 0,
        held: HashMap::new(),
        next_lease: 1,
        pull_failures: 0,
        pull_outage: false,
        dead_letters: JoinSet::new(),
        rate,
    };
    let task = tokio::spawn(bridge.run(from_session, governor, advisories));
    Ok((from_bridge, to_bridge, task))
}

/// A job given to the session, by lease.
struct Held {
    /// The message, to ack.
    message: Message,
    /// Its attempt.
    attempt: u32,
    /// When it was published (the first attempt's time, for a retry
    /// window).
    published: SystemTime,
}

/// What goes over the governor subject.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum GovernorMessage {
    /// Pull nothing for a moment.
    SlowDown,
    /// Pull nothing for `ms` milliseconds.
    Pause {
        /// How long.
        ms: u64,
    },
}

/// The MAX_DELIVERIES advisory's fields we use.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// The group's rate on this consumer ([`super::rate`]).
struct Rate {
    /// Jobs per second, for the whole group.
    rate: f64,
    /// The slot length.
    tick: Duration,
    /// The durable consumer of the rate stream.
    consumer: PullConsumer,
    /// Tokens taken and not used yet: jobs this consumer may still pull.
    tokens: u64,
    /// The last slot this consumer published.
    last_slot: u64,
}

type Batch = Pin<Box<dyn Stream<Item = Result<Message, async_nats::Error>> + Send>>;

struct Bridge {
    queue: Arc<JetStreamQueue>,
    client: async_nats::Client,
    js: jetstream::Context,
    consumer: PullConsumer,
    to_session: mpsc::UnboundedSender<ToConsumer>,
    /// Jobs the session may still be sent.
    credits: usize,
    held: HashMap<u64, Held>,
    next_lease: u64,
    /// Failed pulls in a row, for the backoff.
    pull_failures: u32,
    /// A pull failure was logged (once per outage).
    pull_outage: bool,
    /// Dead jobs being published.
    dead_letters: JoinSet<()>,
    /// The group's rate, if it has one.
    rate: Option<Rate>,
}

impl Bridge {
    async fn run(
        mut self,
        mut from_session: mpsc::UnboundedReceiver<ToFeeder>,
        mut governor: async_nats::Subscriber,
        mut advisories: async_nats::Subscriber,
    ) {
        let mut batch: Option<Batch> = None;
        // A pull of rate tokens under way (a group with a rate).
        let mut token_batch: Option<Batch> = None;
        let mut ticker = tokio::time::interval(
            self.rate
                .as_ref()
                .map_or(Duration::from_secs(3600), |rate| rate.tick),
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // No pull before this (a failed pull's backoff, the group's pause).
        let mut hold_until: Option<Instant> = None;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if hold_until.is_some_and(|until| until <= Instant::now()) {
                hold_until = None;
            }
            let pullable = match &self.rate {
                Some(rate) => self
                    .credits
                    .min(usize::try_from(rate.tokens).unwrap_or(usize::MAX)),
                None => self.credits,
            };
            if let Some(rate) = &self.rate {
                if token_batch.is_none()
                    && self.credits > 0
                    && rate.tokens == 0
                    && hold_until.is_none()
                {
                    match rate
                        .consumer
                        .batch()
                        .max_messages(1)
                        .expires(PULL_EXPIRES)
                        .messages()
                        .await
                    {
                        Ok(pulled) => token_batch = Some(Box::pin(pulled)),
                        Err(err) => hold_until = Some(self.pull_failed(&err.to_string())),
                    }
                }
            }
            if batch.is_none() && pullable > 0 && hold_until.is_none() {
                match self
                    .consumer
                    .batch()
                    .max_messages(pullable)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                {
                    Ok(pulled) => batch = Some(Box::pin(pulled)),
                    Err(err) => hold_until = Some(self.pull_failed(&err.to_string())),
                }
            }
            tokio::select! {
                frame = from_session.recv() => match frame {
                    Some(frame) => self.frame(frame).await,
                    None => break,
                },
                // A paused group takes nothing more, not even from a
                // pull under way (its jobs wait here for the pause).
                item = next_of(&mut batch), if batch.is_some() && hold_until.is_none() => match item {
                    Some(Ok(message)) => {
                        self.pull_succeeded();
                        self.arrived(message).await;
                    }
                    Some(Err(err)) => {
                        batch = None;
                        hold_until = Some(self.pull_failed(&err.to_string()));
                    }
                    None => batch = None,
                },
                item = next_of(&mut token_batch), if token_batch.is_some() => match item {
                    Some(Ok(message)) => {
                        self.pull_succeeded();
                        let tokens = super::rate::tokens_of_message(&message.payload);
                        if let Some(rate) = &mut self.rate {
                            rate.tokens = rate.tokens.saturating_add(tokens);
                        }
                        if let Err(err) = message.ack().await {
                            debug!(cause = %err, "rate token ack not sent: it comes back");
                        }
                    }
                    Some(Err(err)) => {
                        token_batch = None;
                        hold_until = Some(self.pull_failed(&err.to_string()));
                    }
                    None => token_batch = None,
                },
                _ = ticker.tick(), if self.rate.is_some() => self.issue_tokens().await,
                Some(message) = governor.next() => {
                    match serde_json::from_slice::<GovernorMessage>(&message.payload) {
                        Ok(GovernorMessage::SlowDown) => {
                            debug!("the group slows down");
                            hold_until = Some(Instant::now() + SLOW_DOWN_PAUSE);
                        }
                        Ok(GovernorMessage::Pause { ms }) => {
                            let pause = Duration::from_millis(ms).min(MAX_PAUSE);
                            debug!(?pause, "the group pauses");
                            hold_until = Some(Instant::now() + pause);
                        }
                        Err(err) => debug!(cause = %err, "unknown governor message: ignored"),
                    }
                }
                Some(message) = advisories.next() => {
                    match serde_json::from_slice::<MaxDeliveries>(&message.payload) {
                        Ok(advisory) => self.exhausted(advisory),
                        Err(err) => debug!(cause = %err, "unreadable MAX_DELIVERIES advisory"),
                    }
                }
                Some(_) = self.dead_letters.join_next(), if !self.dead_letters.is_empty() => {}
                () = sleep_until_some(hold_until), if hold_until.is_some() => {}
                _ = heartbeat.tick() => {
                    if self.to_session.send(ToConsumer::Heartbeat).is_err() {
                        break;
                    }
                }
            }
        }
        // The session is over: what it still held goes back at once.
        for (_, held) in self.held.drain() {
            let _ = held.message.ack_with(AckKind::Nak(None)).await;
        }
        // Dead jobs being published finish (each is bounded).
        while self.dead_letters.join_next().await.is_some() {}
        let _ = tokio::time::timeout(Duration::from_secs(5), self.client.flush()).await;
    }

    /// Publishes the current slot's rate tokens (deduplicated with the
    /// other consumers' by its message id).
    async fn issue_tokens(&mut self) {
        let Some(rate) = &mut self.rate else {
            return;
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let slot = super::rate::slot_of(now_ms, rate.tick);
        if slot <= rate.last_slot {
            return;
        }
        rate.last_slot = slot;
        let tokens = super::rate::tokens_of_slot(rate.rate, rate.tick, slot);
        if tokens == 0 {
            return;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID_HEADER, super::rate::slot_id(slot).as_str());
        // The ack is not awaited: a slot refused (the bucket is full) or
        // a duplicate (another consumer issued it) is as it should be.
        if let Err(err) = self
            .js
            .publish_with_headers(
                super::rate::token_subject(&self.queue),
                headers,
                tokens.to_string().into(),
            )
            .await
        {
            debug!(cause = %err, "rate tokens not published");
        }
    }

    fn pull_failed(&mut self, cause: &str) -> Instant {
        if !self.pull_outage {
            warn!(stream = %self.queue.stream, cause, "cannot pull jobs from JetStream, retrying");
            self.pull_outage = true;
        } else {
            debug!(cause, "pull failed again");
        }
        let step = self.pull_failures;
        self.pull_failures = self.pull_failures.saturating_add(1);
        let delay = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(2), 0.25)
            .delay(step, crate::random::unit());
        Instant::now() + delay
    }

    fn pull_succeeded(&mut self) {
        self.pull_failures = 0;
        if self.pull_outage {
            self.pull_outage = false;
            tracing::info!(stream = %self.queue.stream, "pulling jobs from JetStream again");
        }
    }

    /// A message of the pull: run it, hand it back until due, or bury it.
    async fn arrived(&mut self, message: Message) {
        // Every delivery takes a token of the group's rate.
        if let Some(rate) = &mut self.rate {
            rate.tokens = rate.tokens.saturating_sub(1);
        }
        let Ok(info) = message.info() else {
            debug!("a message without JetStream metadata: ignored");
            return;
        };
        let (delivered, sequence) = (info.delivered, info.stream_sequence);
        let published = SystemTime::from(info.published);
        let not_before = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(NOT_BEFORE_HEADER))
            .and_then(|value| value.as_str().trim().parse::<u64>().ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
        let attempt = decide::attempt_of(delivered, not_before.is_some());
        match decide::arrival(
            delivered,
            not_before,
            self.queue.settings.max_attempts,
            SystemTime::now(),
        ) {
            Arrival::NotYet(left) => {
                let _ = message.ack_with(AckKind::Nak(Some(left))).await;
            }
            Arrival::Exhausted(reason) => self.bury(message, reason, attempt),
            Arrival::Run { attempt } => {
                let text = String::from_utf8(message.payload.to_vec())
                    .map_err(|err| err.to_string())
                    .and_then(|text| RawValue::from_string(text).map_err(|err| err.to_string()));
                let payload = match text {
                    Ok(raw) => JobPayload::from(raw),
                    Err(err) => {
                        warn!(job = sequence, cause = %err, "a job that is not JSON: dead");
                        self.bury(message, format!("not a JSON value: {err}"), attempt);
                        return;
                    }
                };
                self.credits = self.credits.saturating_sub(1);
                let lease = self.next_lease;
                self.next_lease += 1;
                self.held.insert(
                    lease,
                    Held {
                        message,
                        attempt,
                        published,
                    },
                );
                let _ = self.to_session.send(ToConsumer::Job {
                    lease,
                    id: sequence,
                    attempt,
                    payload,
                });
            }
        }
    }

    async fn frame(&mut self, frame: ToFeeder) {
        match frame {
            ToFeeder::Credit { n } => {
                self.credits = self.credits.saturating_add(n as usize);
            }
            ToFeeder::Ack { lease, .. } => {
                if let Some(held) = self.held.remove(&lease) {
                    if let Err(err) = held.message.ack().await {
                        debug!(lease, cause = %err, "ack not sent: the job runs again");
                    }
                }
            }
            ToFeeder::Retry {
                lease,
                delay,
                reason,
                ..
            } => {
                let Some(held) = self.held.remove(&lease) else {
                    return;
                };
                let now = SystemTime::now();
                match decide::retry(
                    &self.queue.settings,
                    held.attempt,
                    held.published.min(now),
                    now,
                    delay,
                    &reason,
                    crate::random::unit(),
                ) {
                    Retry::After(delay) => {
                        let nak = AckKind::Nak((!delay.is_zero()).then_some(delay));
                        if let Err(err) = held.message.ack_with(nak).await {
                            debug!(lease, cause = %err, "nak not sent: the job runs again later");
                        }
                    }
                    Retry::Dead(reason) => self.bury(held.message, reason, held.attempt),
                }
            }
            ToFeeder::Dead { lease, reason, .. } => {
                if let Some(held) = self.held.remove(&lease) {
                    self.bury(held.message, reason, held.attempt);
                }
            }
            ToFeeder::Extend { lease } => {
                if let Some(held) = self.held.get(&lease) {
                    let _ = held.message.ack_with(AckKind::Progress).await;
                }
            }
            ToFeeder::Release { lease } => {
                if let Some(held) = self.held.remove(&lease) {
                    let _ = held.message.ack_with(AckKind::Nak(None)).await;
                }
            }
            ToFeeder::SlowDown => self.broadcast(&GovernorMessage::SlowDown).await,
            ToFeeder::Pause { duration } => {
                let ms = u64::try_from(duration.min(MAX_PAUSE).as_millis()).unwrap_or(u64::MAX);
                self.broadcast(&GovernorMessage::Pause { ms }).await;
            }
            ToFeeder::Heartbeat | ToFeeder::Bye | ToFeeder::Hello { .. } => {}
        }
    }

    async fn broadcast(&self, message: &GovernorMessage) {
        let Ok(body) = serde_json::to_vec(message) else {
            return;
        };
        if let Err(err) = self
            .client
            .publish(self.queue.governor_subject.clone(), body.into())
            .await
        {
            debug!(cause = %err, "governor message not sent");
        }
    }

    /// Dead: published to the dead stream with its reason, then Term; a
    /// job the dead stream did not take is handed back (Nak) instead, so
    /// it is never lost.
    fn bury(&mut self, message: Message, reason: String, attempt: u32) {
        let queue = Arc::clone(&self.queue);
        let js = self.js.clone();
        self.dead_letters.spawn(async move {
            let sequence = message.info().map(|info| info.stream_sequence).unwrap_or(0);
            let buried = dead_letter(
                &js,
                &queue,
                sequence,
                &reason,
                attempt,
                message.payload.clone(),
            )
            .await;
            match buried {
                Ok(()) => {
                    debug!(job = sequence, reason = %reason, "job dead");
                    if let Err(err) = message.ack_with(AckKind::Term).await {
                        debug!(job = sequence, cause = %err, "term not sent");
                    }
                }
                Err(err) => {
                    warn!(job = sequence, cause = %err, "the dead stream did not take a dead job: handed back");
                    let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        });
    }

    /// A job that reached MaxDeliver without an outcome (the backstop of
    /// `decide.rs`): moved from the work stream to the dead stream.
    fn exhausted(&mut self, advisory: MaxDeliveries) {
        let queue = Arc::clone(&self.queue);
        let js = self.js.clone();
        self.dead_letters.spawn(async move {
            let sequence = advisory.stream_seq;
            let stream = match js.get_stream(&queue.stream).await {
                Ok(stream) => stream,
                Err(err) => {
                    warn!(job = sequence, cause = %err, "cannot move a job past its deliveries to the dead stream");
                    return;
                }
            };
            let Ok(message) = stream.get_raw_message(sequence).await else {
                // Already moved (by another consumer) or gone.
                return;
            };
            let reason = format!(
                "delivered {} times without an outcome (its consumers crashed or hung)",
                advisory.deliveries
            );
            let attempts = u32::try_from(advisory.deliveries).unwrap_or(u32::MAX);
            match dead_letter(&js, &queue, sequence, &reason, attempts, message.payload).await {
                Ok(()) => {
                    let _ = stream.delete_message(sequence).await;
                }
                Err(err) => warn!(job = sequence, cause = %err, "the dead stream did not take a job past its deliveries"),
            }
        });
    }
}

/// `text` on one line, as a header value must be.
pub(crate) fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

/// The headers of a dead job in the dead stream: why (on one line), its
/// sequence in the work stream (0: it never was there), its attempts,
/// and its message id (a second publication of it is a duplicate).
pub(crate) fn dead_headers(
    reason: &str,
    sequence: u64,
    attempts: u32,
    msg_id: &str,
) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(REASON_HEADER, one_line(reason).as_str());
    headers.insert(SEQUENCE_HEADER, sequence.to_string().as_str());
    headers.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
    headers.insert(MSG_ID_HEADER, msg_id);
    headers
}

/// Publishes a dead job to the dead stream and waits for its ack. Its
/// message id makes a second publication of the same death (a retried
/// publish, the advisory's backstop) a duplicate.
pub(crate) async fn dead_letter(
    js: &jetstream::Context,
    queue: &JetStreamQueue,
    sequence: u64,
    reason: &str,
    attempts: u32,
    payload: bytes::Bytes,
) -> Result<(), String> {
    let msg_id = format!("dead-{}-{sequence}", queue.stream);
    let headers = dead_headers(reason, sequence, attempts, &msg_id);
    let ack = js
        .publish_with_headers(queue.dead_subject.clone(), headers, payload)
        .await
        .map_err(|err| err.to_string())?;
    match tokio::time::timeout(DEAD_ACK_TIMEOUT, async move { ack.await }).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no ack within {DEAD_ACK_TIMEOUT:?}")),
    }
}

async fn next_of(batch: &mut Option<Batch>) -> Option<Result<Message, async_nats::Error>> {
    match batch {
        Some(batch) => batch.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
