//! One record to one line of text or JSON, written straight into the
//! writer's buffer (no `String` per line).

use super::{LogRecord, Stream};
use crate::config::LogFormat;
use crate::protocol::slave::Level;
use serde::{Serialize, Serializer};
use std::io::{self, Write};
use std::time::SystemTime;

/// Ends a colored span.
const RESET: &str = "\x1b[0m";
/// Color of the time stamp.
const DIM: &str = "\x1b[2m";

/// The ANSI color of a level on a terminal.
fn level_color(level: Level) -> &'static str {
    match level {
        Level::Trace => "\x1b[2m",
        Level::Debug => "\x1b[34m",
        Level::Info => "\x1b[32m",
        Level::Notice => "\x1b[36m",
        Level::Warning => "\x1b[33m",
        Level::Error => "\x1b[31m",
        Level::Critical | Level::Alert | Level::Emergency => "\x1b[1;31m",
    }
}

/// Width of the level column in text lines (`emergency`, the longest).
const LEVEL_WIDTH: usize = 9;

impl LogRecord {
    /// Formats the record as one line (without the newline).
    pub fn format(&self, format: LogFormat) -> String {
        let mut line = Vec::with_capacity(64 + self.message.len());
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut line, format, false);
        String::from_utf8(line)
            .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
    }

    /// Writes the record as one line (without the newline) into `out`;
    /// with `color`, a text line gets ANSI colors (a JSON line never does).
    ///
    /// # Errors
    /// Those of `out`.
    pub fn write_to<W: Write>(
        &self,
        out: &mut W,
        format: LogFormat,
        color: bool,
    ) -> io::Result<()> {
        match format {
            LogFormat::Text => self.write_text(out, color),
            LogFormat::Json => self.write_json(out),
        }
    }

    fn write_text<W: Write>(&self, out: &mut W, color: bool) -> io::Result<()> {
        let time = humantime::format_rfc3339_millis(self.time);
        if color {
            // The padding stays outside the colors, so that columns line
            // up as in plain text.
            let pad = LEVEL_WIDTH.saturating_sub(self.level.as_str().len());
            write!(
                out,
                "{DIM}{time}{RESET} {}{}{RESET}{:pad$} ",
                level_color(self.level),
                self.level.as_str(),
                ""
            )?;
        } else {
            write!(out, "{time} {:<LEVEL_WIDTH$} ", self.level)?;
        }
        match &self.instance {
            Some(label) => write!(out, "{label} ")?,
            None => out.write_all(b"[master] ")?,
        }
        out.write_all(self.message.as_bytes())
    }

    fn write_json<W: Write>(&self, out: &mut W) -> io::Result<()> {
        #[derive(Serialize)]
        struct Line<'a> {
            time: Rfc3339Millis,
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
            time: Rfc3339Millis(self.time),
            level: self.level,
            group: label.map(|l| l.group.as_str()),
            host: label.map(|l| l.host.as_str()),
            command: label.map(|l| l.command.as_str()),
            id: label.map(|l| l.id),
            group_id: label.map(|l| l.group_id),
            stream: self.stream,
            message: &self.message,
        };
        serde_json::to_writer(out, &line).map_err(io::Error::from)
    }
}

/// A time serialized as RFC 3339 with milliseconds, without a `String`.
struct Rfc3339Millis(SystemTime);

impl Serialize for Rfc3339Millis {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::log::InstanceLabel;
    use std::sync::Arc;
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
        let mut info = record(false);
        info.level = Level::Info;
        assert_eq!(
            info.format(LogFormat::Text),
            "1970-01-01T00:00:01.500Z info      [master] hello \"x\""
        );
    }

    #[test]
    fn json_format() {
        let line: serde_json::Value =
            serde_json::from_str(&record(true).format(LogFormat::Json)).unwrap();
        assert_eq!(line["time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(line["level"], "emergency");
        assert_eq!(line["group"], "g");
        assert_eq!(line["host"], "localhost");
        assert_eq!(line["command"], "worker");
        assert_eq!(line["id"], 2);
        assert_eq!(line["group_id"], 1);
        assert_eq!(line["stream"], "control");
        assert_eq!(line["message"], "hello \"x\"");
        let master: serde_json::Value =
            serde_json::from_str(&record(false).format(LogFormat::Json)).unwrap();
        assert!(master.get("group").is_none());
        assert_eq!(master["stream"], "control");
    }

    #[test]
    fn colors_only_on_request_and_never_in_json() {
        let mut warning = record(true);
        warning.level = Level::Warning;
        let mut colored = Vec::new();
        warning
            .write_to(&mut colored, LogFormat::Text, true)
            .unwrap();
        let colored = String::from_utf8(colored).unwrap();
        assert_eq!(
            colored,
            "\x1b[2m1970-01-01T00:00:01.500Z\x1b[0m \x1b[33mwarning\x1b[0m   \
             [g] [localhost] [worker/2/1] hello \"x\""
        );
        // Without the escapes it is the plain line, columns included.
        let stripped = colored
            .replace("\x1b[2m", "")
            .replace("\x1b[33m", "")
            .replace("\x1b[0m", "");
        assert_eq!(stripped, warning.format(LogFormat::Text));

        let mut json = Vec::new();
        warning.write_to(&mut json, LogFormat::Json, true).unwrap();
        assert!(!json.contains(&0x1b));
        let mut plain = Vec::new();
        warning
            .write_to(&mut plain, LogFormat::Text, false)
            .unwrap();
        assert!(!plain.contains(&0x1b));
    }
}
