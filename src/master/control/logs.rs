//! The master's answer to `taskherd logs`: the last lines of the backlog,
//! then the live log.

use crate::config::LogFormat;
use crate::log::{LogRecord, LogSink};
use crate::protocol::control::FromMaster;
use crate::protocol::slave::Level;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

/// What a `logs` request asks for.
#[derive(Debug, Clone)]
pub(crate) struct LogsRequest {
    /// Only this group's records (and the master's own events).
    pub(crate) group: Option<String>,
    /// Lines of the backlog to send first.
    pub(crate) tail: u32,
    /// Go on with the live log after the backlog (else `Done`).
    pub(crate) follow: bool,
}

impl LogsRequest {
    /// Every record, whatever the log's filter; of one group (and the
    /// master's own events) if asked.
    fn wants(&self, record: &LogRecord) -> bool {
        match (&self.group, &record.instance) {
            (Some(group), Some(label)) => &label.group == group,
            _ => true,
        }
    }
}

/// Takes the backlog and subscribes at once (so that no record is missed
/// or repeated between the two), and returns the task that streams them
/// to `reply` until the client hangs up, the log ends, or (without
/// `follow`) the backlog is sent.
pub(crate) fn stream_logs(
    sink: &LogSink,
    request: LogsRequest,
    reply: mpsc::Sender<FromMaster>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let follow = sink.follow(
        usize::try_from(request.tail).unwrap_or(usize::MAX),
        |record| request.wants(record),
        request.follow,
    );
    async move {
        let mut skip = follow.skip;
        for record in &follow.backlog {
            let frame = if skip == 0 {
                log_frame(record)
            } else {
                let lines: Vec<String> = record
                    .lines()
                    .skip(std::mem::take(&mut skip))
                    .map(|line| line_text(record, line))
                    .collect();
                FromMaster::Log {
                    line: lines.join("\n"),
                    level: record.level,
                }
            };
            if reply.send(frame).await.is_err() {
                return;
            }
        }
        let Some(mut live) = follow.live else {
            let done = FromMaster::Done {
                message: "end of the backlog".into(),
            };
            let _ = reply.send(done).await;
            return;
        };
        loop {
            let record = tokio::select! {
                record = live.recv() => record,
                _ = reply.closed() => return,
            };
            let frame = match record {
                Ok(record) if request.wants(&record) => log_frame(&record),
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => FromMaster::Log {
                    line: format!(
                        "[taskherd logs] {missed} record{} skipped: this client reads too slowly",
                        if missed == 1 { "" } else { "s" }
                    ),
                    level: Level::Warning,
                },
                Err(RecvError::Closed) => return,
            };
            if reply.send(frame).await.is_err() {
                return;
            }
        }
    }
}

/// A record as one frame (several lines if it holds several).
fn log_frame(record: &Arc<LogRecord>) -> FromMaster {
    FromMaster::Log {
        line: record.format(LogFormat::Text),
        level: record.level,
    }
}

/// One line of a record, as the log writes it in text.
fn line_text(record: &LogRecord, line: &str) -> String {
    let mut text = Vec::with_capacity(64 + line.len());
    // Writing into a Vec cannot fail.
    let _ = record.write_line_to(&mut text, LogFormat::Text, false, line);
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{InstanceLabel, Stream};
    use std::time::{Duration, SystemTime};

    fn line(group: &str, message: &str) -> LogRecord {
        LogRecord {
            time: SystemTime::now(),
            level: Level::Info,
            instance: Some(Arc::new(InstanceLabel {
                group: group.into(),
                host: "localhost".into(),
                command: "w".into(),
                id: 1,
                group_id: 1,
            })),
            stream: Stream::Stdout,
            message: message.into(),
        }
    }

    /// The messages (after the label) of the frames until `Done`.
    async fn messages(reply_rx: &mut mpsc::Receiver<FromMaster>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(frame) = reply_rx.recv().await {
            match frame {
                FromMaster::Log { line, .. } => {
                    for line in line.lines() {
                        let message = line.rsplit_once("] ").map_or(line, |(_, m)| m);
                        out.push(message.to_owned());
                    }
                }
                FromMaster::Done { .. } => break,
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn tail_of_one_group_without_follow_ends_with_done() {
        let (sink, writer) = LogSink::spawn(LogFormat::Text, std::io::sink()).unwrap();
        sink.send(line("web", "w1\nw2\nw3")).await;
        sink.send(line("db", "d1")).await;
        sink.send(line("web", "w4")).await;
        // The records are kept once the writer has taken them: follow the
        // live log until the last one went by.
        let mut live = sink.subscribe();
        sink.send(line("web", "w5")).await;
        loop {
            let seen = tokio::time::timeout(Duration::from_secs(10), live.recv())
                .await
                .unwrap()
                .unwrap();
            if seen.message == "w5" {
                break;
            }
        }

        let (reply_tx, mut reply_rx) = mpsc::channel(64);
        let request = LogsRequest {
            group: Some("web".into()),
            tail: 3,
            follow: false,
        };
        tokio::spawn(stream_logs(&sink, request, reply_tx));
        assert_eq!(messages(&mut reply_rx).await, ["w3", "w4", "w5"]);
        assert!(reply_rx.recv().await.is_none(), "the stream ends");

        let (reply_tx, mut reply_rx) = mpsc::channel(64);
        let request = LogsRequest {
            group: None,
            tail: 100,
            follow: false,
        };
        tokio::spawn(stream_logs(&sink, request, reply_tx));
        assert_eq!(
            messages(&mut reply_rx).await,
            ["w1", "w2", "w3", "d1", "w4", "w5"]
        );
        drop((sink, live));
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .unwrap();
    }
}
