//! One record to lines of text or JSON, written straight into the
//! writer's buffer (no `String` per line): the prefix (time, level, label)
//! is formatted once per record ([`LinePrefix`]) and copied before each
//! of its lines.

use super::{InstanceLabel, LogRecord, Stream};
use crate::config::LogFormat;
use crate::protocol::slave::Level;
use serde::{Serialize, Serializer};
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// The level column's padding and the space after it.
const SPACES: &[u8; LEVEL_WIDTH + 1] = b"          ";

impl LogRecord {
    /// Formats the record as one line (without the newline), or as
    /// several (separated by `\n`) if its message holds several.
    pub fn format(&self, format: LogFormat) -> String {
        let mut line = Vec::with_capacity(64 + self.message.len());
        let mut prefix = LinePrefix::default();
        prefix.set(self, format, false);
        for (n, text) in self.lines().enumerate() {
            if n > 0 {
                line.push(b'\n');
            }
            prefix.write_line(&mut line, text);
        }
        String::from_utf8(line)
            .unwrap_or_else(|err| String::from_utf8_lossy(err.as_bytes()).into_owned())
    }

    /// Writes the record as one line (without the newline) into `out`, or
    /// as several (separated by `\n`, each with the same prefix) if its
    /// message holds several ([`LogRecord::lines`]); with `color`, a text
    /// line gets ANSI colors (a JSON line never does).
    ///
    /// # Errors
    /// Those of `out`.
    pub fn write_to<W: Write>(
        &self,
        out: &mut W,
        format: LogFormat,
        color: bool,
    ) -> io::Result<()> {
        let mut prefix = LinePrefix::default();
        prefix.set(self, format, color);
        let mut lines = Vec::with_capacity(64 + self.message.len());
        for (n, line) in self.lines().enumerate() {
            if n > 0 {
                lines.push(b'\n');
            }
            prefix.write_line(&mut lines, line);
        }
        out.write_all(&lines)
    }

    /// Writes `line` (one of [`LogRecord::lines`]) with the record's
    /// prefix, as one line without the newline.
    ///
    /// # Errors
    /// Those of `out`.
    pub fn write_line_to<W: Write>(
        &self,
        out: &mut W,
        format: LogFormat,
        color: bool,
        line: &str,
    ) -> io::Result<()> {
        let mut prefix = LinePrefix::default();
        prefix.set(self, format, color);
        let mut bytes = Vec::with_capacity(prefix.bytes.len() + line.len() + 8);
        prefix.write_line(&mut bytes, line);
        out.write_all(&bytes)
    }

    /// The time stamp and the label come from this thread's [`TextCache`]:
    /// no `core::fmt` for every record, only bytes copied.
    fn write_text_prefix(&self, out: &mut Vec<u8>, color: bool) {
        TEXT_CACHE.with_borrow_mut(|cache| {
            let level = self.level.as_str();
            if color {
                out.extend_from_slice(DIM.as_bytes());
                out.extend_from_slice(cache.stamp(self.time));
                out.extend_from_slice(RESET.as_bytes());
                out.push(b' ');
                out.extend_from_slice(level_color(self.level).as_bytes());
                out.extend_from_slice(level.as_bytes());
                out.extend_from_slice(RESET.as_bytes());
            } else {
                out.extend_from_slice(cache.stamp(self.time));
                out.push(b' ');
                out.extend_from_slice(level.as_bytes());
            }
            // The padding stays outside the colors, so that columns line
            // up as in plain text.
            let pad = LEVEL_WIDTH.saturating_sub(level.len());
            out.extend_from_slice(&SPACES[..=pad]);
            match &self.instance {
                Some(label) => {
                    out.extend_from_slice(cache.label(label));
                    out.push(b' ');
                }
                None => out.extend_from_slice(b"[master] "),
            }
        });
    }

    /// The JSON object of a line up to its message: `{"time":...,
    /// "stream":"stdout","message":`.
    fn write_json_prefix(&self, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct Head<'a> {
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
        }
        let label = self.instance.as_deref();
        let head = Head {
            time: Rfc3339Millis(self.time),
            level: self.level,
            group: label.map(|l| l.group.as_str()),
            host: label.map(|l| l.host.as_str()),
            command: label.map(|l| l.command.as_str()),
            id: label.map(|l| l.id),
            group_id: label.map(|l| l.group_id),
            stream: self.stream,
        };
        // Into a Vec, of fields that always serialize: cannot fail.
        let _ = serde_json::to_writer(&mut *out, &head);
        // The object goes on with the message: `{...,"stream":"stdout"`
        // and `,"message":`, then each line's string and `}`.
        if out.last() == Some(&b'}') {
            out.pop();
        }
        out.extend_from_slice(b",\"message\":");
    }
}

/// What every line of one record starts with, in one format: the time,
/// level and label formatted once per record, then copied before each of
/// its lines.
#[derive(Debug, Default)]
pub(super) struct LinePrefix {
    /// Text: `<time> <level>   <label> `; JSON: the object up to the
    /// message's value.
    bytes: Vec<u8>,
    /// A line is a JSON string then `}`, not the text as it is.
    json: bool,
}

impl LinePrefix {
    /// The prefix of `record`'s lines in `format` (with ANSI colors if
    /// `color`, in text).
    pub(super) fn set(&mut self, record: &LogRecord, format: LogFormat, color: bool) {
        self.bytes.clear();
        self.json = format == LogFormat::Json;
        match format {
            LogFormat::Text => record.write_text_prefix(&mut self.bytes, color),
            LogFormat::Json => record.write_json_prefix(&mut self.bytes),
        }
    }

    /// Appends `line` with the prefix, without a newline.
    #[inline]
    pub(super) fn write_line(&self, out: &mut Vec<u8>, line: &str) {
        out.extend_from_slice(&self.bytes);
        if self.json {
            // A string into a Vec: cannot fail.
            let _ = serde_json::to_writer(&mut *out, line);
            out.push(b'}');
        } else {
            out.extend_from_slice(line.as_bytes());
        }
    }

    /// Appends every line of `record` (whose prefix this is), each with
    /// the prefix and a newline.
    #[inline]
    pub(super) fn write_lines(&self, out: &mut Vec<u8>, record: &LogRecord) {
        let lines = record.lines();
        out.reserve(record.message.len() + lines.len() * (self.bytes.len() + 2));
        for line in lines {
            self.write_line(out, line);
            out.push(b'\n');
        }
    }
}

/// The last time stamp and instance label formatted by this thread (the
/// writer's): the lines of a batch mostly share both (those of one read
/// of a pipe share their time), so each is formatted once per
/// millisecond or change of instance, not once per line.
#[derive(Default)]
struct TextCache {
    /// The time `stamp` was made for (lines read together share it).
    time: Option<SystemTime>,
    /// Milliseconds since the epoch of `stamp`.
    millis: Option<u128>,
    /// `2024-05-01T12:00:00.123Z`.
    stamp: Vec<u8>,
    /// The label of `label_text`; held so that the pointer stays unique.
    label: Option<Arc<InstanceLabel>>,
    /// `[group] [host] [command/id/group_id]`.
    label_text: Vec<u8>,
}

impl TextCache {
    fn stamp(&mut self, time: SystemTime) -> &[u8] {
        if self.time == Some(time) {
            return &self.stamp;
        }
        self.time = Some(time);
        let time = representable(time);
        let millis = time.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis());
        if millis.is_none() || millis != self.millis {
            self.stamp.clear();
            // Through `fmt::Write`: a formatting error (there should be
            // none, the time is clamped) is a value, never a panic.
            let mut text = String::with_capacity(24);
            let _ = std::fmt::Write::write_fmt(
                &mut text,
                format_args!("{}", humantime::format_rfc3339_millis(time)),
            );
            self.stamp.extend_from_slice(text.as_bytes());
            self.millis = millis;
        }
        &self.stamp
    }

    fn label(&mut self, label: &Arc<InstanceLabel>) -> &[u8] {
        if !self
            .label
            .as_ref()
            .is_some_and(|cached| Arc::ptr_eq(cached, label))
        {
            self.label_text.clear();
            let _ = write!(self.label_text, "{label}");
            self.label = Some(Arc::clone(label));
        }
        &self.label_text
    }
}

thread_local! {
    static TEXT_CACHE: std::cell::RefCell<TextCache> = std::cell::RefCell::default();
}

/// The last instant RFC 3339 can write: 9999-12-31T23:59:59.999Z.
const LAST_REPRESENTABLE: Duration = Duration::new(253_402_300_799, 999_000_000);

/// `time` within what RFC 3339 (and `humantime`) can write: from the
/// epoch to the end of the year 9999. A record's time may come from a
/// remote host's clock, which may be anything; formatting it must never
/// fail (`humantime` returns an error past 9999 and panics before 1970).
fn representable(time: SystemTime) -> SystemTime {
    match time.duration_since(UNIX_EPOCH) {
        Err(_) => UNIX_EPOCH,
        Ok(since) if since > LAST_REPRESENTABLE => UNIX_EPOCH + LAST_REPRESENTABLE,
        Ok(_) => time,
    }
}

/// A time serialized as RFC 3339 with milliseconds, without a `String`.
struct Rfc3339Millis(SystemTime);

impl Serialize for Rfc3339Millis {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(representable(self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::InstanceLabel;
    use std::sync::Arc;

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
    fn each_line_of_a_bulk_record_gets_the_prefix() {
        let mut bulk = record(true);
        bulk.level = Level::Info;
        bulk.message = "one\r\n\ntwo".into();
        assert_eq!(
            bulk.format(LogFormat::Text),
            "1970-01-01T00:00:01.500Z info      [g] [localhost] [worker/2/1] one\n\
             1970-01-01T00:00:01.500Z info      [g] [localhost] [worker/2/1] \n\
             1970-01-01T00:00:01.500Z info      [g] [localhost] [worker/2/1] two"
        );
        let json = bulk.format(LogFormat::Json);
        let messages: Vec<String> = json
            .lines()
            .map(|line| {
                let line: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(line["id"], 2);
                line["message"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(messages, ["one", "", "two"]);
    }

    #[test]
    fn times_out_of_range_are_clamped_not_fatal() {
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        let before = UNIX_EPOCH - Duration::from_secs(10);
        for (time, stamp) in [
            (far, "9999-12-31T23:59:59.999Z"),
            (before, "1970-01-01T00:00:00.000Z"),
        ] {
            let mut bad = record(true);
            bad.time = time;
            let text = bad.format(LogFormat::Text);
            assert!(
                text.starts_with(&format!("{stamp} emergency [g]")),
                "{text}"
            );
            let json: serde_json::Value =
                serde_json::from_str(&bad.format(LogFormat::Json)).unwrap();
            assert_eq!(json["time"], stamp);
            assert_eq!(json["message"], "hello \"x\"");
            // The next record is not affected (the stamp is cached).
            assert!(record(true)
                .format(LogFormat::Text)
                .starts_with("1970-01-01T00:00:01.500Z"));
        }
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
