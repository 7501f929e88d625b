//! Turns a child's stdout/stderr bytes into whole lines.
//!
//! The PHP originals read output with polling and lost partial lines and
//! non-UTF-8 lines. Here a partial line stays buffered until its newline
//! (or the end of the stream), invalid UTF-8 is shown lossily rather than
//! dropped, and a line longer than the limit is cut into pieces of at most
//! the limit, each ending on a character boundary, so nothing is lost and
//! memory stays bounded. A `\r` before a newline is not part of the line
//! (the rule of [`Message`], the only place that applies it).
//!
//! The relay takes the lines of a read at once, as one log [`Message`]
//! ([`LineDecoder::decode_message`]); the [`Decoder`] gives them one
//! `String` at a time.

use crate::log::{line_content, Message};
use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Longest piece of a line emitted at once, in bytes.
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// A [`Decoder`] yielding lines (without the newline) as lossy UTF-8.
#[derive(Debug)]
pub struct LineDecoder {
    max_len: usize,
    /// How far the buffer was already searched for a newline, so a long
    /// partial line is not rescanned on every read.
    scanned: usize,
}

impl LineDecoder {
    /// A decoder cutting lines at `max_len` bytes (at least 4, so one
    /// character always fits).
    pub fn new(max_len: usize) -> Self {
        LineDecoder {
            max_len: max_len.max(4),
            scanned: 0,
        }
    }

    /// The first `len` bytes of `buf` (and `skip` more dropped).
    fn take(&mut self, buf: &mut BytesMut, len: usize, skip: usize) -> BytesMut {
        let line = buf.split_to(len);
        buf.advance(skip);
        self.scanned = 0;
        line
    }

    /// The next lines of `buf` as one message: every whole line at its
    /// start; else a piece of a line longer than the limit; else, at the
    /// end of the stream (`eof`), what is left. `None`: more bytes are
    /// needed (or, at the end, `buf` is empty).
    pub fn decode_message(&mut self, buf: &mut BytesMut, eof: bool) -> Option<Message> {
        if let Some((message, taken)) = Message::whole_lines(buf, self.scanned, self.max_len) {
            buf.advance(taken);
            self.scanned = 0;
            return Some(message);
        }
        let len = if buf.len() > self.max_len {
            char_boundary(buf, self.max_len)
        } else if eof && !buf.is_empty() {
            buf.len()
        } else {
            self.scanned = buf.len();
            return None;
        };
        let piece = self.take(buf, len, 0);
        Some(Message::new(text(&piece)))
    }
}

/// `bytes` as text, invalid UTF-8 replaced.
fn text(bytes: &[u8]) -> String {
    // `from_utf8` validates a word at a time; `from_utf8_lossy` walks
    // byte by byte even when every byte is fine.
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

impl Default for LineDecoder {
    fn default() -> Self {
        LineDecoder::new(MAX_LINE_LEN)
    }
}

/// Largest cut at or below `limit` that does not split a UTF-8 sequence.
fn char_boundary(bytes: &[u8], limit: usize) -> usize {
    // A continuation byte is 0b10xx_xxxx; back off over at most 3 of them.
    let mut cut = limit;
    while cut > limit.saturating_sub(3) && cut > 0 && cut < bytes.len() && bytes[cut] & 0xC0 == 0x80
    {
        cut -= 1;
    }
    if cut == 0 {
        limit
    } else {
        cut
    }
}

impl Decoder for LineDecoder {
    type Item = String;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<String>, std::io::Error> {
        let search_end = buf.len().min(self.max_len + 1);
        if let Some(pos) = memchr::memchr(b'\n', &buf[self.scanned.min(search_end)..search_end]) {
            let len = self.scanned + pos;
            let line = self.take(buf, len, 1);
            return Ok(Some(text(line_content(&line))));
        }
        if buf.len() > self.max_len {
            let cut = char_boundary(buf, self.max_len);
            let piece = self.take(buf, cut, 0);
            return Ok(Some(text(line_content(&piece))));
        }
        self.scanned = buf.len();
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<String>, std::io::Error> {
        match self.decode(buf)? {
            Some(line) => Ok(Some(line)),
            None if buf.is_empty() => Ok(None),
            None => {
                let len = buf.len();
                let rest = self.take(buf, len, 0);
                Ok(Some(text(line_content(&rest))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]], max_len: usize) -> Vec<String> {
        let mut decoder = LineDecoder::new(max_len);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(line) = decoder.decode(&mut buf).unwrap() {
                out.push(line);
            }
        }
        while let Some(line) = decoder.decode_eof(&mut buf).unwrap() {
            out.push(line);
        }
        out
    }

    /// The lines of the messages `decode_message` makes of `chunks`.
    fn message_lines(chunks: &[&[u8]], max_len: usize) -> Vec<String> {
        let mut decoder = LineDecoder::new(max_len);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for (n, chunk) in chunks.iter().enumerate() {
            buf.extend_from_slice(chunk);
            let eof = n + 1 == chunks.len();
            while let Some(message) = decoder.decode_message(&mut buf, eof) {
                out.extend(message.lines().map(str::to_owned));
            }
        }
        assert!(buf.is_empty());
        out
    }

    #[test]
    fn messages_hold_the_lines_the_decoder_gives_one_by_one() {
        let chunks: &[&[u8]] = &[
            b"ab",
            b"c\r\nde\n\nf\rg\r\n",
            "0123456789012345678901234é\n".as_bytes(),
            b"x\xffy\r\n\r",
            b"tail\r",
        ];
        for max_len in [4, 10, 100] {
            let one_by_one = lines(chunks, max_len);
            assert_eq!(message_lines(chunks, max_len), one_by_one, "{max_len}");
        }
        assert_eq!(
            lines(chunks, 100),
            [
                "abc",
                "de",
                "",
                "f\rg",
                "0123456789012345678901234é",
                "x\u{fffd}y",
                "\rtail"
            ]
        );
    }

    #[test]
    fn partial_lines_are_joined() {
        assert_eq!(lines(&[b"ab", b"c\nde", b"f\n"], 100), ["abc", "def"]);
    }

    #[test]
    fn last_line_without_newline_is_kept() {
        assert_eq!(lines(&[b"one\ntwo"], 100), ["one", "two"]);
    }

    #[test]
    fn crlf_and_empty_lines() {
        assert_eq!(lines(&[b"a\r\n\nb\n"], 100), ["a", "", "b"]);
    }

    #[test]
    fn invalid_utf8_is_lossy_not_dropped() {
        assert_eq!(
            lines(&[b"ok \xff\xfe end\n"], 100),
            ["ok \u{FFFD}\u{FFFD} end"]
        );
    }

    #[test]
    fn long_lines_are_split_without_loss() {
        let long = "x".repeat(25);
        let out = lines(&[long.as_bytes(), b"\n"], 10);
        assert_eq!(out, ["x".repeat(10), "x".repeat(10), "x".repeat(5)]);
    }

    #[test]
    fn split_respects_char_boundaries() {
        // 'é' is two bytes; a cut at 5 bytes would split the third one.
        let text = "ééééé";
        let out = lines(&[text.as_bytes(), b"\n"], 5);
        assert_eq!(out.concat(), text);
        assert!(
            out.iter().all(|piece| !piece.contains('\u{FFFD}')),
            "{out:?}"
        );
    }

    #[test]
    fn newline_exactly_at_limit() {
        assert_eq!(lines(&[b"0123456789\nab\n"], 10), ["0123456789", "ab"]);
    }
}
