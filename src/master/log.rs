//! The master's log stream: every instance's lines and the master's own
//! events, written by one thread in text or JSON lines.
//!
//! Producers (output readers, control links, supervisors) send records
//! through a bounded channel: a child that prints faster than the terminal
//! can take is slowed down, never has lines dropped. The writer thread
//! batches records and flushes when the channel runs dry, so a burst costs
//! one write system call, not one per line.

use crate::config::LogFormat;
use crate::protocol::slave::Level;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::mpsc;

/// Records buffered between producers and the writer thread.
const LOG_CHANNEL_LEN: usize = 8192;

/// Where an instance runs and who it is, as shown in every log prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InstanceLabel {
    /// Group name.
    pub group: String,
    /// Host name as the master knows it.
    pub host: String,
    /// Base name of the command.
    pub command: String,
    /// Global id.
    pub id: u32,
    /// Id within the group.
    pub group_id: u32,
}

impl std::fmt::Display for InstanceLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] [{}] [{}/{}/{}]",
            self.group, self.host, self.command, self.id, self.group_id
        )
    }
}

/// Which channel a line came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The instance's standard output.
    Stdout,
    /// The instance's standard error.
    Stderr,
    /// A structured record sent through the slave library.
    Control,
    /// An event of the master itself.
    Master,
}

/// One line of the log.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// When the master received it.
    pub time: SystemTime,
    /// Severity.
    pub level: Level,
    /// The instance it is about; `None` for the master's own events.
    pub instance: Option<Arc<InstanceLabel>>,
    /// Where it came from.
    pub stream: Stream,
    /// The text, without trailing newline.
    pub message: String,
}

impl LogRecord {
    /// Formats the record as one line (without the newline).
    pub fn format(&self, format: LogFormat) -> String {
        match format {
            LogFormat::Text => {
                let time = humantime::format_rfc3339_millis(self.time);
                match &self.instance {
                    Some(label) => format!("{time} {:<9} {label} {}", self.level, self.message),
                    None => format!("{time} {:<9} [master] {}", self.level, self.message),
                }
            }
            LogFormat::Json => {
                #[derive(Serialize)]
                struct Line<'a> {
                    time: String,
                    level: Level,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    group: Option<&'a str>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    host: Option<&'a str>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    command: Option<&'a str>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    id: Option<u32>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    group_id: Option<u32>,
                    stream: Stream,
                    message: &'a str,
                }
                let label = self.instance.as_deref();
                let line = Line {
                    time: humantime::format_rfc3339_millis(self.time).to_string(),
                    level: self.level,
                    group: label.map(|l| l.group.as_str()),
                    host: label.map(|l| l.host.as_str()),
                    command: label.map(|l| l.command.as_str()),
                    id: label.map(|l| l.id),
                    group_id: label.map(|l| l.group_id),
                    stream: self.stream,
                    message: &self.message,
                };
                // Serializing plain strings and numbers cannot fail.
                serde_json::to_string(&line).unwrap_or_else(|err| {
                    format!(r#"{{"level":"error","message":"unprintable log record: {err}"}}"#)
                })
            }
        }
    }
}

/// A cloneable handle to the log stream.
#[derive(Debug, Clone)]
pub struct LogSink {
    records_tx: mpsc::Sender<LogRecord>,
}

/// The writer thread behind a [`LogSink`]; join it to be sure every record
/// was written.
#[derive(Debug)]
pub struct LogWriter {
    thread: std::thread::JoinHandle<()>,
}

impl LogWriter {
    /// Waits until every sink is dropped and every record written.
    pub fn finish(self) {
        // The thread only ends by its channel closing; a panic in it has
        // already been printed by the panic hook.
        let _ = self.thread.join();
    }
}

impl LogSink {
    /// Starts a writer thread writing to `out` in `format`.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn spawn<W: Write + Send + 'static>(
        format: LogFormat,
        out: W,
    ) -> std::io::Result<(LogSink, LogWriter)> {
        let (sink, mut records_rx) = LogSink::channel();
        let thread = std::thread::Builder::new()
            .name("taskherd-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
                while let Some(record) = records_rx.blocking_recv() {
                    let mut line = record.format(format);
                    line.push('\n');
                    // A closed stdout must not stop supervision; lines are
                    // then lost to nobody.
                    let _ = out.write_all(line.as_bytes());
                    if records_rx.is_empty() {
                        let _ = out.flush();
                    }
                }
                let _ = out.flush();
            })?;
        Ok((sink, LogWriter { thread }))
    }

    /// A sink whose records come out of the returned receiver (the agent
    /// relays them upstream instead of writing them).
    pub fn channel() -> (LogSink, mpsc::Receiver<LogRecord>) {
        let (records_tx, records_rx) = mpsc::channel(LOG_CHANNEL_LEN);
        (LogSink { records_tx }, records_rx)
    }

    /// Sends a record; waits if the writer is behind.
    pub async fn send(&self, record: LogRecord) {
        // Fails only once the writer is gone, at the very end of a run.
        let _ = self.records_tx.send(record).await;
    }

    /// Logs an event of the master about one instance.
    pub async fn instance_event(&self, label: &Arc<InstanceLabel>, level: Level, message: String) {
        self.send(LogRecord {
            time: SystemTime::now(),
            level,
            instance: Some(label.clone()),
            stream: Stream::Master,
            message,
        })
        .await;
    }

    /// Logs an event of the master itself.
    pub async fn master_event(&self, level: Level, message: String) {
        self.send(LogRecord {
            time: SystemTime::now(),
            level,
            instance: None,
            stream: Stream::Master,
            message,
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn record(instance: bool) -> LogRecord {
        LogRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_500),
            level: Level::Emergency,
            instance: instance.then(|| {
                Arc::new(InstanceLabel {
                    group: "g".into(),
                    host: "localhost".into(),
                    command: "worker".into(),
                    id: 2,
                    group_id: 1,
                })
            }),
            stream: Stream::Control,
            message: "hello \"x\"".into(),
        }
    }

    #[test]
    fn text_format() {
        assert_eq!(
            record(true).format(LogFormat::Text),
            "1970-01-01T00:00:01.500Z emergency [g] [localhost] [worker/2/1] hello \"x\""
        );
        assert_eq!(
            record(false).format(LogFormat::Text),
            "1970-01-01T00:00:01.500Z emergency [master] hello \"x\""
        );
    }

    #[test]
    fn json_format() {
        let line: serde_json::Value =
            serde_json::from_str(&record(true).format(LogFormat::Json)).unwrap();
        assert_eq!(line["level"], "emergency");
        assert_eq!(line["group"], "g");
        assert_eq!(line["id"], 2);
        assert_eq!(line["stream"], "control");
        assert_eq!(line["message"], "hello \"x\"");
    }
}
