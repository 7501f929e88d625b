//! The text of a log record and where its lines are, found once.
//!
//! A record holds one line (an event, a control-channel message) or every
//! whole line of one read of an instance's output. The lines are found
//! when the message is made, by [`Message::new`] or, for a read, by
//! [`Message::whole_lines`] (the line decoder's), and kept as spans of the
//! text: the writer formats each line straight from them, the backlog
//! counts them, nothing splits the text again. This is also the one place
//! that knows what ends a line ([`line_content`]).

use std::fmt;
use std::ops::Range;

/// The text of a log record: one line, or several separated by `\n`.
///
/// A `\r` that ends a line (the `\r` of `\r\n`, or one at the very end)
/// is not part of the line; any other `\r` is. Made from a `String` or a
/// `&str` with [`Message::new`] or `.into()`.
#[derive(Clone, Default)]
pub struct Message {
    /// The text as it came (without the newline after the last line),
    /// `\r`s included: what [`Message::as_str`] gives and what an agent
    /// sends upstream.
    text: String,
    /// Where the lines are in `text`.
    lines: Spans,
}

/// The lines of a message, as ranges of its text.
#[derive(Clone, Debug)]
enum Spans {
    /// A message of one line (no `\n`), without an allocation.
    One(Range<usize>),
    /// Several lines, in order.
    Many(Vec<Range<usize>>),
}

impl Spans {
    /// `spans` (at least one), kept without a `Vec` if there is one.
    fn of(mut spans: Vec<Range<usize>>) -> Spans {
        match spans.len() {
            1 => Spans::One(spans.swap_remove(0)),
            _ => Spans::Many(spans),
        }
    }
}

impl Default for Spans {
    fn default() -> Self {
        Spans::One(0..0)
    }
}

/// A line without its ending: the bytes before the `\n` (which `line`
/// does not hold), less a `\r` right before it. The one rule for line
/// endings, for the log and for the line decoder.
#[inline]
pub(crate) fn line_content(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The span of the line `start..end` of `text` (`end`: its `\n`, or the
/// end of the text), without its ending.
#[inline]
fn span(text: &[u8], start: usize, end: usize) -> Range<usize> {
    start..start + line_content(&text[start..end]).len()
}

impl Message {
    /// The lines of `text`: split at every `\n` (a text that ends with
    /// one has an empty last line; an empty text is one empty line).
    pub fn new(text: impl Into<String>) -> Message {
        let text = text.into();
        let bytes = text.as_bytes();
        let mut newlines = memchr::memchr_iter(b'\n', bytes);
        let lines = match newlines.next() {
            None => Spans::One(span(bytes, 0, bytes.len())),
            Some(first) => {
                let mut spans = vec![span(bytes, 0, first)];
                let mut start = first + 1;
                for newline in newlines {
                    spans.push(span(bytes, start, newline));
                    start = newline + 1;
                }
                spans.push(span(bytes, start, bytes.len()));
                Spans::Many(spans)
            }
        };
        Message { text, lines }
    }

    /// The whole lines at the start of `bytes` (each ended by a `\n`, at
    /// most `max_len` bytes before it), as one message, and how many
    /// bytes they take (their newlines included); `None` if the first
    /// line is not whole or longer than `max_len`. `from` bytes are known
    /// to hold no `\n` (searched by an earlier call).
    ///
    /// Invalid UTF-8 is replaced by U+FFFD (line by line: a `\n` never
    /// belongs to a multi-byte character, so no line gains or loses one).
    pub(crate) fn whole_lines(
        bytes: &[u8],
        from: usize,
        max_len: usize,
    ) -> Option<(Message, usize)> {
        let search_end = bytes.len().min(max_len.saturating_add(1));
        let first =
            from.min(search_end) + memchr::memchr(b'\n', &bytes[from.min(search_end)..search_end])?;
        // As many as lines like the first would make (bounded: a short
        // first line says little).
        let mut spans = Vec::with_capacity(bytes.len() / (first + 1).max(16) + 1);
        spans.push(span(bytes, 0, first));
        let mut start = first + 1;
        let base = start;
        for newline in memchr::memchr_iter(b'\n', &bytes[base..]) {
            let newline = base + newline;
            if newline - start > max_len {
                break;
            }
            spans.push(span(bytes, start, newline));
            start = newline + 1;
        }
        // The text goes up to the last newline taken, without it.
        let text = &bytes[..start - 1];
        let message = match std::str::from_utf8(text) {
            Ok(text) => Message {
                text: text.to_owned(),
                lines: Spans::of(spans),
            },
            Err(_) => Message::lossy_lines(text, &spans),
        };
        Some((message, start))
    }

    /// `text`'s lines at `spans`, made valid UTF-8 one by one (their
    /// spans change where a replacement is longer than what it replaces).
    #[cold]
    fn lossy_lines(text: &[u8], spans: &[Range<usize>]) -> Message {
        let mut lossy = String::with_capacity(text.len() + 16);
        let mut lossy_spans = Vec::with_capacity(spans.len());
        let mut start = 0;
        for span in spans {
            // The separator before the line, as it was (`\r\n` or `\n`).
            lossy.push_str(&String::from_utf8_lossy(&text[start..span.start]));
            let at = lossy.len();
            lossy.push_str(&String::from_utf8_lossy(&text[span.clone()]));
            lossy_spans.push(at..lossy.len());
            start = span.end;
        }
        lossy.push_str(&String::from_utf8_lossy(&text[start..]));
        Message {
            text: lossy,
            lines: Spans::of(lossy_spans),
        }
    }

    /// The text: the lines separated by `\n`, with the `\r`s that ended
    /// some of them.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The text, as [`Message::as_str`].
    pub fn into_string(self) -> String {
        self.text
    }

    /// The length of the text in bytes.
    pub fn len(&self) -> usize {
        self.text.len()
    }

    /// Whether the text is empty (one empty line).
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// How many lines it holds (at least one).
    #[inline]
    pub fn line_count(&self) -> usize {
        match &self.lines {
            Spans::One(_) => 1,
            Spans::Many(spans) => spans.len(),
        }
    }

    /// The lines, without their endings.
    #[inline]
    pub fn lines(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + Clone {
        let spans = match &self.lines {
            Spans::One(span) => std::slice::from_ref(span),
            Spans::Many(spans) => spans.as_slice(),
        };
        // Spans start and end next to an ASCII byte or an end of the
        // text: always on a character boundary.
        spans.iter().map(|span| &self.text[span.clone()])
    }
}

impl From<String> for Message {
    fn from(text: String) -> Self {
        Message::new(text)
    }
}

impl From<&str> for Message {
    fn from(text: &str) -> Self {
        Message::new(text)
    }
}

impl From<Message> for String {
    fn from(message: Message) -> Self {
        message.text
    }
}

impl fmt::Display for Message {
    /// The text, as [`Message::as_str`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

/// Two messages are equal when their texts are (the lines follow).
impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Message {}

impl PartialEq<str> for Message {
    fn eq(&self, other: &str) -> bool {
        self.text == other
    }
}

impl PartialEq<&str> for Message {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl PartialEq<String> for Message {
    fn eq(&self, other: &String) -> bool {
        &self.text == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(message: &Message) -> Vec<&str> {
        message.lines().collect()
    }

    #[test]
    fn new_splits_at_every_newline_and_drops_line_ending_cr() {
        let message = Message::new("one\r\n\ntwo\rthree\r\n\r");
        assert_eq!(lines(&message), ["one", "", "two\rthree", ""]);
        assert_eq!(message.line_count(), 4);
        assert_eq!(message, "one\r\n\ntwo\rthree\r\n\r", "the text as it came");
        assert_eq!(lines(&Message::new("")), [""]);
        assert_eq!(lines(&Message::default()), [""]);
        assert_eq!(lines(&Message::new("a\n")), ["a", ""]);
        assert_eq!(lines(&Message::new("\r")), [""]);
        assert_eq!(
            lines(&Message::new("x\r\r")),
            ["x\r"],
            "one \\r ends a line"
        );
        assert_eq!(Message::new("é\r\n").lines().next_back(), Some(""));
    }

    #[test]
    fn whole_lines_takes_up_to_the_last_newline() {
        let bytes = b"one\r\ntwo\n\nthree\rpartial";
        let (message, taken) = Message::whole_lines(bytes, 0, 100).unwrap();
        assert_eq!(lines(&message), ["one", "two", ""]);
        assert_eq!(taken, b"one\r\ntwo\n\n".len());
        assert_eq!(message, "one\r\ntwo\n", "without the last newline");
        // The same lines as the message of that text.
        assert_eq!(lines(&message), lines(&Message::new(message.as_str())));
        assert!(Message::whole_lines(b"no newline", 0, 100).is_none());
        assert!(Message::whole_lines(b"", 0, 100).is_none());
        let (message, taken) = Message::whole_lines(b"\n", 0, 100).unwrap();
        assert_eq!((lines(&message), taken), (vec![""], 1));
    }

    #[test]
    fn whole_lines_stops_before_a_line_too_long() {
        // The first line: exactly the limit is whole, one more is not.
        let (message, taken) = Message::whole_lines(b"0123456789\nab\n", 0, 10).unwrap();
        assert_eq!((lines(&message), taken), (vec!["0123456789", "ab"], 14));
        assert!(Message::whole_lines(b"0123456789a\nab\n", 0, 10).is_none());
        // A later one: the lines before it are taken.
        let (message, taken) = Message::whole_lines(b"ab\n0123456789a\ncd\n", 0, 10).unwrap();
        assert_eq!((lines(&message), taken), (vec!["ab"], 3));
    }

    #[test]
    fn whole_lines_searches_from_where_it_was_told() {
        let bytes = b"abcdef\ngh\n";
        let (message, taken) = Message::whole_lines(bytes, 4, 100).unwrap();
        assert_eq!((lines(&message), taken), (vec!["abcdef", "gh"], 10));
        assert!(Message::whole_lines(b"abc", 3, 100).is_none());
        assert!(Message::whole_lines(b"abc", 10, 100).is_none());
    }

    #[test]
    fn invalid_utf8_is_replaced_line_by_line() {
        let bytes = b"ok \xff\r\n\xe9t\xc3\xa9\n\xc3\n";
        let (message, taken) = Message::whole_lines(bytes, 0, 100).unwrap();
        assert_eq!(taken, bytes.len());
        assert_eq!(
            lines(&message),
            ["ok \u{fffd}", "\u{fffd}t\u{e9}", "\u{fffd}"]
        );
        assert_eq!(message, "ok \u{fffd}\r\n\u{fffd}t\u{e9}\n\u{fffd}");
        assert_eq!(lines(&message), lines(&Message::new(message.as_str())));
    }
}
