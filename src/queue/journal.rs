//! What the two durable queues share on disk: checksummed frames, the
//! scan that tells a write torn by a crash from real damage, and the
//! opening of a locked journal (the locks and syncs themselves are the
//! crate's `files` helpers).
//!
//! A journal is a magic of 8 bytes (each format has its own) followed by
//! frames:
//!
//! ```text
//! len: u32 LE | crc32(len bytes ++ payload): u32 LE | payload (len bytes, len > 0)
//! ```
//!
//! The local queue ([`super::local::FileQueue`]) puts a JSON array of
//! records in a payload, the durable feeder queue ([`super::durable`]) a
//! run of binary records. A frame is the unit of atomicity: after a crash,
//! a frame is either whole or (being the last one) torn and dropped.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::Duration;

use crate::files::{self, LockKind};

/// The suffix of a compaction being written beside its journal
/// (`<path>.compact.tmp`).
pub(crate) const COMPACT_SUFFIX: &str = ".compact.tmp";

/// Length and checksum in front of every frame.
pub(crate) const FRAME_HEADER_LEN: usize = 8;

/// Appends one frame holding `payload` to `out`.
///
/// # Errors
/// The payload is empty or larger than a frame can hold (4 GiB): the
/// length is returned.
pub(crate) fn encode_frame(payload: &[u8], out: &mut Vec<u8>) -> Result<(), usize> {
    let len = u32::try_from(payload.len()).map_err(|_| payload.len())?;
    if len == 0 {
        return Err(0);
    }
    let len_bytes = len.to_le_bytes();
    out.reserve(FRAME_HEADER_LEN + payload.len());
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&frame_crc(&len_bytes, payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// The checksum covers the length too, so a zeroed header never passes.
fn frame_crc(len_bytes: &[u8; 4], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len_bytes);
    hasher.update(payload);
    hasher.finalize()
}

/// Why a frame is unreadable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Whether the frame's extent reaches the end of the file.
    pub(crate) runs_to_end: bool,
    /// What is wrong.
    pub(crate) reason: &'static str,
}

/// The payload of the frame at the start of `rest`, if it is sound.
pub(crate) fn check_frame(rest: &[u8]) -> Result<&[u8], Damage> {
    let Some((header, body)) = rest.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return Err(Damage {
            runs_to_end: true,
            reason: "incomplete frame header",
        });
    };
    let mut len_bytes = [0; 4];
    len_bytes.copy_from_slice(&header[..4]);
    let mut crc_bytes = [0; 4];
    crc_bytes.copy_from_slice(&header[4..]);
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > body.len() {
        return Err(Damage {
            runs_to_end: true,
            reason: "frame runs past the end of the file",
        });
    }
    let payload = &body[..len];
    if len == 0 || frame_crc(&len_bytes, payload) != u32::from_le_bytes(crc_bytes) {
        return Err(Damage {
            runs_to_end: len == body.len(),
            reason: "checksum mismatch",
        });
    }
    Ok(payload)
}

/// How a scan of frames ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanEnd {
    /// Every byte was a sound frame.
    Clean,
    /// The frames from `offset` on are a write torn by a crash: a damaged
    /// frame that runs to the end of the data, or zeros. What comes before
    /// is sound.
    Torn {
        /// Where the torn part starts.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A damaged frame followed by more data: real damage, not a crash.
    Corrupt {
        /// Where the damaged frame starts.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Calls `each(offset, payload)` for every sound frame of `data` from
/// `start` on, in order, and says how the data ends. Stops at the first
/// error of `each`.
pub(crate) fn scan_frames<E>(
    data: &[u8],
    start: usize,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let mut pos = start;
    while pos < data.len() {
        let rest = &data[pos..];
        match check_frame(rest) {
            Ok(payload) => {
                each(pos as u64, payload)?;
                pos += FRAME_HEADER_LEN + payload.len();
            }
            Err(damage) => {
                let offset = pos as u64;
                // A torn write leaves a damaged frame that runs to the end
                // of the file, or zeros; anything else is real damage.
                return Ok(if damage.runs_to_end || rest.iter().all(|&b| b == 0) {
                    ScanEnd::Torn {
                        offset,
                        reason: damage.reason,
                    }
                } else {
                    ScanEnd::Corrupt {
                        offset,
                        reason: damage.reason,
                    }
                });
            }
        }
    }
    Ok(ScanEnd::Clean)
}

/// Where the first sound frame after `start` begins, if any: a damaged
/// frame followed by a sound one is damage, not a write torn at the end
/// (a flipped bit in a length can make a frame seem to run past the end).
pub(crate) fn sound_frame_after(data: &[u8], start: u64) -> Option<u64> {
    let start = usize::try_from(start).ok()?;
    (start + 1..data.len().saturating_sub(FRAME_HEADER_LEN))
        .find(|&pos| check_frame(&data[pos..]).is_ok())
        .map(|pos| pos as u64)
}

/// How long [`open_locked`] waits for a lock held by someone else. A
/// descriptor closed by the previous holder can live on for a moment in a
/// child process that another thread is just spawning (between its fork
/// and its exec), and the lock with it.
const LOCK_GRACE: Duration = Duration::from_millis(500);

/// How many times [`open_locked`] tries again when the file it locked was
/// replaced (by a compaction) in between.
const LOCK_ATTEMPTS: usize = 16;

/// Why [`open_locked`] failed.
#[derive(Debug)]
pub(crate) enum OpenLockedError {
    /// Another holder has it (or it kept being replaced).
    Locked,
    /// Opening or locking failed.
    Io(io::Error),
}

/// Opens (creating it if needed) and exclusively locks the journal at
/// `path`, making sure the locked file is still the one at `path` (a
/// compaction by the previous holder may have replaced it between our open
/// and our lock).
pub(crate) fn open_locked(path: &Path) -> Result<File, OpenLockedError> {
    use std::os::unix::fs::MetadataExt;
    for _ in 0..LOCK_ATTEMPTS {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(OpenLockedError::Io)?;
        match files::lock_within(&file, LockKind::Exclusive, LOCK_GRACE) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                return Err(OpenLockedError::Locked)
            }
            Err(err) => return Err(OpenLockedError::Io(err)),
        }
        let ours = file.metadata().map_err(OpenLockedError::Io)?;
        match std::fs::metadata(path) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => return Ok(file),
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(OpenLockedError::Io(err)),
        }
    }
    Err(OpenLockedError::Locked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for payload in payloads {
            encode_frame(payload, &mut out).unwrap();
        }
        out
    }

    fn collect(data: &[u8]) -> (Vec<(u64, Vec<u8>)>, ScanEnd) {
        let mut seen = Vec::new();
        let end = scan_frames::<()>(data, 0, |offset, payload| {
            seen.push((offset, payload.to_vec()));
            Ok(())
        })
        .unwrap();
        (seen, end)
    }

    #[test]
    fn frames_round_trip_with_offsets() {
        let data = frames(&[b"one", b"three"]);
        let (seen, end) = collect(&data);
        assert_eq!(end, ScanEnd::Clean);
        assert_eq!(seen, [(0, b"one".to_vec()), (11, b"three".to_vec())]);
        assert_eq!(encode_frame(b"", &mut Vec::new()), Err(0));
    }

    #[test]
    fn a_torn_tail_is_told_from_damage() {
        let data = frames(&[b"one", b"three"]);
        // Cut inside the second frame: torn.
        let (seen, end) = collect(&data[..data.len() - 2]);
        assert_eq!(seen.len(), 1);
        assert!(matches!(end, ScanEnd::Torn { offset: 11, .. }), "{end:?}");
        // Zeros after the frames (a file extended but never written): torn.
        let mut zeros = data.clone();
        zeros.extend_from_slice(&[0; 100]);
        assert!(matches!(
            collect(&zeros).1,
            ScanEnd::Torn { offset: 24, .. }
        ));
        // A flipped bit in the first frame, a sound one after it: damage.
        let mut flipped = data.clone();
        flipped[FRAME_HEADER_LEN + 1] ^= 1;
        let (seen, end) = collect(&flipped);
        assert!(seen.is_empty());
        assert_eq!(
            end,
            ScanEnd::Corrupt {
                offset: 0,
                reason: "checksum mismatch"
            }
        );
        // A flipped bit in the first length: the frame seems to run past
        // the end, but a sound frame follows.
        let mut long = data.clone();
        long[3] ^= 0x10;
        assert!(matches!(collect(&long).1, ScanEnd::Torn { offset: 0, .. }));
        assert_eq!(sound_frame_after(&long, 0), Some(11));
        assert_eq!(sound_frame_after(&data[..data.len() - 2], 11), None);
    }
}
