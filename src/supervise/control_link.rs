//! The parent side of an instance's control channel: the identity frame
//! first, then the slave's log frames, hello, outcome, feeder address and
//! counts, and the Stop frame from the supervisor.

use super::activity::Activity;
use crate::error_text::error_chain;
use crate::log::{InstanceLabel, LogRecord, LogSink, Stream};
use crate::protocol::slave::{FromSlave, Identity, Level, ToSlave};
use crate::protocol::{Connection, ProtocolError, PROTOCOL_VERSION};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Events of an instance's control link waiting for its supervisor.
pub(super) const SLAVE_EVENTS: usize = 64;

/// What the control link tells the supervisor while the process runs.
#[derive(Debug)]
pub(super) enum SlaveEvent {
    /// The slave uses the library.
    Hello,
    /// A feeder listens at this address.
    Listening(String),
    /// The program said it is ready (the slave library's ready call).
    Ready,
    /// A feeder's counts.
    Progress(crate::protocol::slave::QueueProgress),
}

/// What the control link learned, returned when it closes.
#[derive(Debug, Default)]
pub(super) struct ControlSummary {
    /// The outcome the library reported, if any: (success, message).
    pub(super) outcome: Option<(bool, Option<String>)>,
    /// Why the slave asked to be recycled, if it did (`max_jobs`).
    pub(super) recycle: Option<String>,
}

/// Runs the parent side of the control channel: sends the identity,
/// relays log frames, reports the hello, forwards Stop.
pub(super) async fn control_link(
    socket: UnixStream,
    identity: Identity,
    label: Arc<InstanceLabel>,
    sink: LogSink,
    activity: Arc<Activity>,
    events_tx: mpsc::Sender<SlaveEvent>,
    mut command_rx: mpsc::Receiver<ToSlave>,
) -> ControlSummary {
    let mut summary = ControlSummary::default();
    let mut link = Connection::new(socket);
    let first = ToSlave::Identity {
        version: PROTOCOL_VERSION,
        identity,
    };
    if link.write_frame(&first).await.is_err() {
        // A plain program may close the fd or exit at once: not an error.
        return summary;
    }
    loop {
        let frame = tokio::select! {
            frame = link.read_frame::<FromSlave>() => frame,
            command = command_rx.recv() => match command {
                Some(command) => {
                    if let Err(err) = link.write_frame(&command).await {
                        tracing::debug!(id = label.id, cause = %err, "cannot send to instance");
                    }
                    continue;
                }
                // The run is over; keep reading what the slave still sends.
                None => link.read_frame::<FromSlave>().await,
            },
        };
        match frame {
            Ok(None) => break,
            Ok(Some(frame)) => {
                activity.touch();
                match frame {
                    FromSlave::Hello { version } if version == PROTOCOL_VERSION => {
                        let _ = events_tx.send(SlaveEvent::Hello).await;
                    }
                    FromSlave::Hello { version } => {
                        let message = format!(
                            "control channel: slave speaks protocol {version}, master {PROTOCOL_VERSION}; closing the channel"
                        );
                        sink.instance_event(&label, Level::Error, message).await;
                        break;
                    }
                    FromSlave::Ping => {}
                    FromSlave::Log { level, message } => {
                        sink.send(LogRecord {
                            time: SystemTime::now(),
                            level,
                            instance: Some(label.clone()),
                            stream: Stream::Control,
                            message: message.into(),
                        })
                        .await;
                    }
                    FromSlave::Outcome { success, message } => {
                        summary.outcome = Some((success, message));
                    }
                    FromSlave::Listening { addr } => {
                        sink.instance_event(
                            &label,
                            Level::Info,
                            format!("feeder listening on {addr}"),
                        )
                        .await;
                        let _ = events_tx.send(SlaveEvent::Listening(addr)).await;
                    }
                    FromSlave::Ready => {
                        let _ = events_tx.send(SlaveEvent::Ready).await;
                    }
                    FromSlave::Progress { progress } => {
                        let message = format!(
                            "queue: {} done, {} failed, {} retried, {} dead, {} in flight, {} pending, {}, {:.1} jobs/s{}",
                            progress.done, progress.failed, progress.retried, progress.dead,
                            progress.in_flight, progress.pending,
                            crate::error_text::count(progress.consumers, "consumer"), progress.rate,
                            if progress.empty { " (queue empty)" } else { "" }
                        );
                        sink.instance_event(&label, Level::Info, message).await;
                        let _ = events_tx.send(SlaveEvent::Progress(progress)).await;
                    }
                    FromSlave::Recycle { reason } => {
                        sink.instance_event(&label, Level::Info, format!("{reason}: recycling it"))
                            .await;
                        summary.recycle = Some(reason);
                    }
                }
            }
            // A plain program that exits without reading its identity
            // resets the socket: that is its way of ending, not an error.
            Err(ProtocolError::Io(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                break
            }
            Err(err) => {
                let message = format!(
                    "control channel: {}; closing the channel",
                    error_chain(&err)
                );
                sink.instance_event(&label, Level::Error, message).await;
                break;
            }
        }
    }
    summary
}
