//! An instance's stdout and stderr to log records: whole lines, batched
//! per read, never lost (see [`super::output`] for the line rules).

use super::activity::Activity;
use super::output::LineDecoder;
use crate::log::{InstanceLabel, LogRecord, LogSink, Stream};
use crate::protocol::slave::Level;
use bytes::{BufMut, BytesMut};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from an instance's stdout or stderr at once (at most).
const READ_CHUNK: usize = 64 * 1024;

/// Looks for the first line matching a pattern (`[group.ready] log`).
#[derive(Debug, Clone)]
pub(super) struct LineWatch {
    /// The pattern.
    pub(super) pattern: Arc<regex::Regex>,
    /// Told once, when a line matches.
    pub(super) found_tx: tokio::sync::mpsc::Sender<Result<(), String>>,
}

impl LineWatch {
    /// Whether a line of `record` matches.
    fn matches(&self, record: &LogRecord) -> bool {
        record.lines().any(|line| self.pattern.is_match(line))
    }
}

/// Turns one output stream into log records; with `watch`, tells it of
/// the first line that matches its pattern.
pub(super) async fn relay_output<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: Stream,
    label: Arc<InstanceLabel>,
    sink: LogSink,
    activity: Arc<Activity>,
    mut watch: Option<LineWatch>,
) {
    let level = match stream {
        Stream::Stderr => Level::Warning,
        _ => Level::Info,
    };
    let mut decoder = LineDecoder::default();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut records = Vec::new();
    loop {
        buf.reserve(READ_CHUNK);
        let end = match pipe.read_buf(&mut (&mut buf).limit(READ_CHUNK)).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) => {
                tracing::warn!(id = label.id, cause = %err, "cannot read instance output");
                true
            }
        };
        // The lines of one read arrived together: one time stamp for all,
        // and one record for all the whole lines (one allocation, one
        // UTF-8 check, one channel slot), their places found once.
        let time = SystemTime::now();
        while let Some(message) = decoder.decode_message(&mut buf, end) {
            records.push(LogRecord {
                time,
                level,
                instance: Some(label.clone()),
                stream,
                message,
            });
        }
        if let Some(found) = watch
            .as_ref()
            .filter(|watch| records.iter().any(|record| watch.matches(record)))
        {
            let _ = found.found_tx.try_send(Ok(()));
            watch = None;
        }
        if !records.is_empty() {
            activity.touch();
            sink.send_all(&mut records).await;
            // Relayed: progress for a drain waiting on this reader.
            activity.touch();
        }
        if end {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `relay_output` makes of `input` written in pieces of the
    /// given sizes (cycled), as the lines the log would show.
    async fn relayed(input: &[u8], sizes: &[usize]) -> Vec<String> {
        use tokio::io::AsyncWriteExt;
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let (sink, mut records) = LogSink::channel();
        let label = Arc::new(InstanceLabel {
            group: "g".into(),
            host: "h".into(),
            command: "c".into(),
            id: 1,
            group_id: 1,
        });
        let relay = tokio::spawn(relay_output(
            reader,
            Stream::Stdout,
            label,
            sink,
            Arc::new(Activity::new()),
            None,
        ));
        let collect = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(record) = records.recv().await {
                lines.extend(record.lines().map(str::to_string));
            }
            lines
        });
        let mut rest = input;
        for size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, after) = rest.split_at((*size).clamp(1, rest.len()));
            writer.write_all(piece).await.unwrap();
            writer.flush().await.unwrap();
            // Let the reader see this piece on its own.
            tokio::task::yield_now().await;
            rest = after;
        }
        drop(writer);
        relay.await.unwrap();
        collect.await.unwrap()
    }

    /// The log lines (text, then JSON) of the records relayed from
    /// `input`, written at once, with a fixed time.
    async fn formatted(input: &[u8]) -> (String, String) {
        use tokio::io::AsyncWriteExt;
        let (mut writer, reader) = tokio::io::duplex(1 << 20);
        let (sink, mut records) = LogSink::channel();
        let label = Arc::new(InstanceLabel {
            group: "g".into(),
            host: "h".into(),
            command: "c".into(),
            id: 1,
            group_id: 1,
        });
        let relay = tokio::spawn(relay_output(
            reader,
            Stream::Stderr,
            label,
            sink,
            Arc::new(Activity::new()),
            None,
        ));
        writer.write_all(input).await.unwrap();
        drop(writer);
        relay.await.unwrap();
        let (mut text, mut json) = (Vec::new(), Vec::new());
        while let Some(mut record) = records.recv().await {
            record.time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_500);
            record
                .write_to(&mut text, crate::config::LogFormat::Text, false)
                .unwrap();
            text.push(b'\n');
            record
                .write_to(&mut json, crate::config::LogFormat::Json, false)
                .unwrap();
            json.push(b'\n');
        }
        (
            String::from_utf8(text).unwrap(),
            String::from_utf8(json).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_read_of_several_lines_is_formatted_line_by_line() {
        let (text, json) =
            formatted(b"first\r\nsecond\n\r\na\rb \xff\r\n\n\"quoted\"\tend\r\npartial\r").await;
        let prefix = "1970-01-01T00:00:01.500Z warning   [g] [h] [c/1/1] ";
        let want: String = [
            "first",
            "second",
            "",
            "a\rb \u{fffd}",
            "",
            "\"quoted\"\tend",
            "partial",
        ]
        .iter()
        .map(|line| format!("{prefix}{line}\n"))
        .collect();
        assert_eq!(text, want);
        let json_prefix = r#"{"time":"1970-01-01T00:00:01.500Z","level":"warning","group":"g","host":"h","command":"c","id":1,"group_id":1,"stream":"stderr","message":"#;
        let want: String = [
            r#""first""#,
            r#""second""#,
            r#""""#,
            "\"a\\rb \u{fffd}\"",
            r#""""#,
            r#""\"quoted\"\tend""#,
            r#""partial""#,
        ]
        .iter()
        .map(|message| format!("{json_prefix}{message}}}\n"))
        .collect();
        assert_eq!(json, want);
    }

    #[tokio::test]
    async fn relayed_lines_do_not_depend_on_how_the_output_is_cut() {
        let mut input = Vec::new();
        input.extend_from_slice(b"first\nsecond\r\n\nbad \xff utf8\n");
        input.extend(std::iter::repeat_n(b'x', 70_000));
        input.extend_from_slice("\u{e9}t\u{e9}\n".as_bytes());
        for n in 0..500 {
            input.extend_from_slice(format!("line {n}\n").as_bytes());
        }
        input.extend(std::iter::repeat_n(b'y', 140_000));
        input.extend_from_slice(b"\nno newline at the end");
        // The reference: the line decoder over the whole input at once.
        let mut expected = Vec::new();
        let mut buf = bytes::BytesMut::from(&input[..]);
        let mut decoder = LineDecoder::default();
        while let Some(line) =
            tokio_util::codec::Decoder::decode_eof(&mut decoder, &mut buf).unwrap()
        {
            expected.push(line);
        }
        assert!(expected.len() > 500, "{}", expected.len());
        for sizes in [
            &[1 << 20][..],
            &[1, 7, 4096],
            &[65_535, 3],
            &[100_000],
            &[13],
        ] {
            assert_eq!(
                relayed(&input, sizes).await,
                expected,
                "pieces of {sizes:?}"
            );
        }
    }
}
