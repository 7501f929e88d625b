//! Creating or checking a queue group's streams and durable consumer.
//!
//! The master does it at start ([`ensure`]); an existing stream whose
//! settings contradict the config (its subjects, retention, storage or
//! replicas) is never changed: the master refuses to start and says what
//! differs. The group's own durable consumer follows the config (its ack
//! wait and max deliver are updated when the lease or the attempts
//! changed).

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, stream};

use super::NatsError;
use crate::protocol::slave::JetStreamQueue;

/// The work stream as the config wants it.
pub fn work_stream(queue: &JetStreamQueue) -> Config {
    Config {
        name: queue.stream.clone(),
        subjects: vec![queue.subject.clone()],
        retention: RetentionPolicy::WorkQueue,
        storage: storage(queue),
        num_replicas: queue.replicas.max(1),
        description: Some("taskherd queue group: jobs".into()),
        ..Config::default()
    }
}

/// The dead-letter stream as the config wants it.
pub fn dead_stream(queue: &JetStreamQueue) -> Config {
    Config {
        name: queue.dead_stream.clone(),
        subjects: vec![queue.dead_subject.clone()],
        retention: RetentionPolicy::Limits,
        storage: storage(queue),
        num_replicas: queue.replicas.max(1),
        description: Some("taskherd queue group: dead jobs".into()),
        ..Config::default()
    }
}

/// The group's durable pull consumer as the config wants it.
pub fn consumer(queue: &JetStreamQueue) -> pull::Config {
    pull::Config {
        durable_name: Some(queue.consumer.clone()),
        description: Some("taskherd queue group consumers".into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: queue.settings.lease,
        max_deliver: i64::from(queue.settings.max_attempts) + 2,
        ..pull::Config::default()
    }
}

/// The stream of the group's rate tokens (only for a group with a
/// `rate`): work-queue retention, in memory, at most one message (the
/// bucket: a token message published while one waits is refused), its
/// name the work stream's + `_RATE`, its subject
/// [`super::rate::token_subject`].
pub fn rate_stream(queue: &JetStreamQueue) -> Config {
    Config {
        name: super::rate::token_stream(queue),
        subjects: vec![super::rate::token_subject(queue)],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::Memory,
        num_replicas: queue.replicas.max(1),
        max_messages: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        description: Some("taskherd queue group: rate tokens".into()),
        ..Config::default()
    }
}

/// The durable pull consumer of the rate tokens every consumer of the
/// group shares.
pub fn rate_consumer(queue: &JetStreamQueue) -> pull::Config {
    pull::Config {
        durable_name: Some(queue.consumer.clone()),
        description: Some("taskherd queue group rate tokens".into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: std::time::Duration::from_secs(5),
        ..pull::Config::default()
    }
}

fn storage(queue: &JetStreamQueue) -> StorageType {
    if queue.memory {
        StorageType::Memory
    } else {
        StorageType::File
    }
}

/// Creates the work stream, the dead stream and the durable consumer, or
/// checks those that exist.
///
/// # Errors
/// [`NatsError::Mismatch`] for an existing stream that says otherwise than
/// the config; [`NatsError::Api`] for a server that refuses (JetStream
/// not enabled, subjects taken by another stream, ...).
pub async fn ensure(client: &async_nats::Client, queue: &JetStreamQueue) -> Result<(), NatsError> {
    let js = jetstream::new(client.clone());
    let work = ensure_stream(&js, work_stream(queue), "work stream").await?;
    ensure_stream(&js, dead_stream(queue), "dead stream").await?;
    if queue.settings.rate.is_some() {
        let rate = ensure_stream(&js, rate_stream(queue), "rate stream").await?;
        if rate.consumer_info(&queue.consumer).await.is_err() {
            rate.create_consumer(rate_consumer(queue))
                .await
                .map_err(|err| NatsError::Api {
                    what: format!(
                        "cannot create the consumer {:?} of the rate stream {:?}",
                        queue.consumer,
                        super::rate::token_stream(queue)
                    ),
                    reason: err.to_string(),
                })?;
        }
    }
    let wanted = consumer(queue);
    let what = format!(
        "consumer {:?} of the stream {:?}",
        queue.consumer, queue.stream
    );
    match work.consumer_info(&queue.consumer).await {
        Ok(info) => {
            let have = &info.config;
            let same = have.ack_policy == AckPolicy::Explicit
                && have.ack_wait == wanted.ack_wait
                && have.max_deliver == wanted.max_deliver
                && have.filter_subject.is_empty()
                && have.deliver_subject.is_none();
            if have.deliver_subject.is_some() || have.ack_policy != AckPolicy::Explicit {
                return Err(NatsError::Mismatch {
                    what: format!(
                        "the {what} exists and is not a pull consumer with explicit acks"
                    ),
                });
            }
            if !same {
                // A durable's create with other settings is an update (of
                // the fields the server lets change).
                work.create_consumer(wanted)
                    .await
                    .map_err(|err| NatsError::Mismatch {
                        what: format!(
                            "the {what} has other settings (ack wait {:?}, max deliver {}) and \
                             the server refused to update them ({err})",
                            have.ack_wait, have.max_deliver
                        ),
                    })?;
            }
            Ok(())
        }
        Err(_) => {
            work.create_consumer(wanted)
                .await
                .map_err(|err| NatsError::Api {
                    what: format!("cannot create the {what}"),
                    reason: err.to_string(),
                })?;
            Ok(())
        }
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    wanted: Config,
    kind: &str,
) -> Result<stream::Stream, NatsError> {
    let name = wanted.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|err| NatsError::Api {
                what: format!("cannot read the {kind} {name:?}"),
                reason: err.to_string(),
            })?;
            let have = &info.config;
            let mut differences = Vec::new();
            if have.subjects != wanted.subjects {
                differences.push(format!(
                    "subjects {:?} (the config wants {:?})",
                    have.subjects, wanted.subjects
                ));
            }
            if have.retention != wanted.retention {
                differences.push(format!(
                    "retention {:?} (the config wants {:?})",
                    have.retention, wanted.retention
                ));
            }
            if have.storage != wanted.storage {
                differences.push(format!(
                    "storage {:?} (the config wants {:?})",
                    have.storage, wanted.storage
                ));
            }
            if have.num_replicas != wanted.num_replicas {
                differences.push(format!(
                    "{} replicas (the config wants {})",
                    have.num_replicas, wanted.num_replicas
                ));
            }
            if !differences.is_empty() {
                return Err(NatsError::Mismatch {
                    what: format!(
                        "the existing {kind} {name:?} has {}",
                        differences.join(", ")
                    ),
                });
            }
            Ok(existing)
        }
        Err(err) => {
            let not_found = matches!(
                err.kind(),
                GetStreamErrorKind::JetStream(ref js_err) if js_err.kind() == ErrorCode::STREAM_NOT_FOUND
            );
            if !not_found {
                return Err(NatsError::Api {
                    what: format!("cannot look up the {kind} {name:?} (is JetStream enabled on the server, -js?)"),
                    reason: err.to_string(),
                });
            }
            js.create_stream(wanted).await.map_err(|err| {
                let reason = match err.kind() {
                    CreateStreamErrorKind::JetStream(js_err) => js_err.to_string(),
                    _ => err.to_string(),
                };
                NatsError::Api {
                    what: format!("cannot create the {kind} {name:?}"),
                    reason,
                }
            })
        }
    }
}
