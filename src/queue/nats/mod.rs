//! Queue groups on NATS JetStream (feature `nats`): the consumers pull
//! jobs from a JetStream work stream instead of a feeder.
//!
//! # The mapping
//!
//! | taskherd | JetStream (2.9) |
//! | --- | --- |
//! | the queue | a work-queue stream (`retention = workqueue`), subject `taskherd.<group>.jobs` |
//! | the group's consumers | one durable pull consumer (`taskherd`) they all share |
//! | lease | ack wait; extended by AckProgress ([`JobInfo::extend_lease`](crate::queue::consumer::JobInfo::extend_lease)) |
//! | done | Ack |
//! | retry after | Nak with the delay of the group's backoff (from the delivery count) |
//! | max attempts | counted from the delivery count; MaxDeliver = max attempts + 2 as a backstop |
//! | dead | published to the dead stream (`taskherd.<group>.dead`) with the reason in `Taskherd-Reason`, then Term |
//! | credits | pull batches of at most the consumer's free credits |
//! | delay | header `Taskherd-Not-Before` (Unix ms): delivered early once, handed back with the time left |
//! | unique key | header `Nats-Msg-Id` (the stream's duplicate window) |
//! | rate governor's slow down / pause | broadcast on `taskherd.<group>.governor` |
//! | the group's `rate` | tokens in the stream `<stream>_RATE`, issued by every consumer, deduplicated per time slot ([`rate`]) |
//!
//! A message's body is the job itself: one JSON value. Any NATS client
//! can publish jobs (`nats pub taskherd.jobs.jobs '{"n": 1}'`).
//!
//! The consumer side is `bridge.rs`: it speaks the feeder protocol's frames
//! to the consumer's session over in-process channels, so the Rust
//! `HandlerQueue`, the exec and the coprocess consumers run unchanged on
//! it. [`setup`] creates or checks the streams and the consumer (the
//! master at start, `taskherd queue` on demand); [`producer`] adds, lists
//! and requeues jobs.

use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};
use tracing::{info, warn};

use crate::protocol::slave::{JetStreamQueue, NatsAuth};

pub(crate) mod bridge;
pub(crate) mod decide;
#[cfg(feature = "master")]
pub mod feed;
pub mod producer;
pub mod rate;
pub mod setup;

/// Header of a delayed job: not run before this time (Unix ms).
pub const NOT_BEFORE_HEADER: &str = "Taskherd-Not-Before";
/// Header of a dead job: why it died.
pub const REASON_HEADER: &str = "Taskherd-Reason";
/// Header of a dead job: its sequence number in the work stream.
pub const SEQUENCE_HEADER: &str = "Taskherd-Sequence";
/// Header of a dead job: the attempts it had.
pub const ATTEMPTS_HEADER: &str = "Taskherd-Attempts";
/// The JetStream header that deduplicates publications (a job's unique
/// key).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Longest wait for a connection to a NATS server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why talking to NATS failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// No server could be reached.
    #[error("cannot reach the NATS server {servers}: {reason}")]
    Unreachable {
        /// The servers tried.
        servers: String,
        /// Why.
        reason: String,
    },
    /// The server refused our credentials: retrying cannot help.
    #[error("the NATS server {servers} refused {who}: {reason}")]
    Refused {
        /// The servers tried.
        servers: String,
        /// Who we said we are ([`NatsAuth::who`]).
        who: String,
        /// The server's reason.
        reason: String,
    },
    /// The credentials (or the TLS CA) could not be read or used.
    #[error("NATS credentials for {servers}: {reason}")]
    Credentials {
        /// The servers.
        servers: String,
        /// What went wrong.
        reason: String,
    },
    /// An existing stream or consumer says otherwise than the config.
    #[error("{what}: it is not changed; delete it or change the config")]
    Mismatch {
        /// What differs.
        what: String,
    },
    /// A JetStream request failed.
    #[error("{what}: {reason}")]
    Api {
        /// What was asked.
        what: String,
        /// The answer.
        reason: String,
    },
}

impl NatsError {
    /// Whether retrying later may help (a server that is down, or an
    /// answer that did not come).
    pub fn is_transient(&self) -> bool {
        matches!(self, NatsError::Unreachable { .. } | NatsError::Api { .. })
    }
}

/// The servers, as one string for messages.
pub(crate) fn servers_text(servers: &[String]) -> String {
    servers.join(",")
}

/// Connects to the queue's servers with its credentials; `name` is the
/// connection's name in the server's monitoring.
///
/// Once connected, the client reconnects by itself for ever: an outage is
/// logged once (warn) with the server's address, and the reconnection
/// (info).
///
/// # Errors
/// [`NatsError::Refused`] for credentials the server refuses,
/// [`NatsError::Credentials`] for a file that cannot be read,
/// [`NatsError::Unreachable`] otherwise.
pub async fn connect(queue: &JetStreamQueue, name: &str) -> Result<async_nats::Client, NatsError> {
    let servers = servers_text(&queue.servers);
    let credentials = |reason: String| NatsError::Credentials {
        servers: servers.clone(),
        reason,
    };
    let options = ConnectOptions::new();
    let mut options = match &queue.auth {
        NatsAuth::None => options,
        NatsAuth::User { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::Creds(path) => options
            .credentials_file(path)
            .await
            .map_err(|err| credentials(format!("cannot read {}: {err}", path.display())))?,
        NatsAuth::Nkey(path) => {
            let seed = std::fs::read_to_string(path)
                .map_err(|err| credentials(format!("cannot read {}: {err}", path.display())))?;
            options.nkey(seed.trim().to_string())
        }
    };
    if let Some(ca) = &queue.tls_ca {
        if !ca.is_file() {
            return Err(credentials(format!("no TLS CA file {}", ca.display())));
        }
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = queue
        .servers
        .iter()
        .map(|server| server.parse())
        .collect::<Result<_, _>>()
        .map_err(|err| NatsError::Unreachable {
            servers: servers.clone(),
            reason: format!("bad server address: {err}"),
        })?;
    let outage_servers = servers.clone();
    let outage = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options = options
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None)
        .event_callback(move |event| {
            let outage = std::sync::Arc::clone(&outage);
            let servers = outage_servers.clone();
            async move {
                use std::sync::atomic::Ordering;
                match event {
                    async_nats::Event::Disconnected if !outage.swap(true, Ordering::SeqCst) => {
                        warn!(nats = %servers, "lost the NATS server, reconnecting");
                    }
                    async_nats::Event::Connected if outage.swap(false, Ordering::SeqCst) => {
                        info!(nats = %servers, "connected to the NATS server again");
                    }
                    _ => {}
                }
            }
        });
    options
        .connect(addrs)
        .await
        .map_err(|err| match err.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                NatsError::Refused {
                    servers: servers.clone(),
                    who: queue.auth.who(),
                    reason: err.to_string(),
                }
            }
            ConnectErrorKind::Tls => credentials(format!("TLS: {err}")),
            // A certificate the CA does not vouch for comes as an I/O
            // error of the handshake: retrying cannot help either.
            ConnectErrorKind::Io if is_certificate_error(&err) => {
                credentials(format!("TLS: {err}"))
            }
            _ => NatsError::Unreachable {
                servers: servers.clone(),
                reason: err.to_string(),
            },
        })
}

/// Whether a connection error is the TLS handshake refusing the server's
/// certificate (rustls reports it inside an I/O error).
fn is_certificate_error(err: &async_nats::ConnectError) -> bool {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    let text = text.to_ascii_lowercase();
    text.contains("certificate") || text.contains("tls handshake")
}
