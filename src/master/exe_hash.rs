//! The SHA-256 of an executable, remembered between runs.
//!
//! The master names the agent it uploads after its own SHA-256 (and checks
//! the upload with it). Reading and hashing its 15–25 MB is 15–25 ms of CPU,
//! paid by every master that starts remote hosts without
//! `master.agent_path`, before its first ssh starts (the probe names the
//! file); when it was computed alongside the handshakes, it took a second
//! (64 hosts on 2 cores) and no host could start its agent meanwhile.
//! So the hash is kept in a
//! small file of the user's state directory, keyed as git's index keys a
//! file: device, inode, size, modification and change times. Any write to
//! the executable changes its change time, which no user can set back, so
//! a key that matches means the same content. As git does with its "racy"
//! entries, a file changed within the last [`SETTLED`] is not noted: on a
//! file system whose times are coarse, a write in the same tick would
//! leave the key as it was.
//!
//! The file holds one line per executable (the [`KEPT`] most recent):
//! `<dev> <ino> <size> <mtime>.<ns> <ctime>.<ns> <sha256>`. A line that
//! does not read so is ignored; a file that cannot be read or written
//! costs a hash, never an error.

use sha2::{Digest as _, Sha256};
use std::io;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Lines kept in the file: a user switching between a few builds keeps
/// each one's hash.
const KEPT: usize = 8;

/// How long ago a file must have last changed for its hash to be noted.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(2);

/// The SHA-256 (lowercase hex) of the file at `path`, from the cache file
/// `cache` when it knows this very file, else computed (and noted in
/// `cache` when the file did not change meanwhile).
///
/// # Errors
/// If `path` cannot be read.
pub(crate) fn sha256(path: &Path, cache: &Path) -> io::Result<String> {
    sha256_settled(path, cache, SETTLED)
}

/// Drops every line of `cache` that gives `hash`: a host found that the
/// executable's content does not have it (the upload's check), so the
/// line was wrong (a file system whose change times do not move, or a
/// hand edit), and the next master hashes the file again. Best effort.
pub(crate) fn forget(cache: &Path, hash: &str) {
    if crate::files::private_dir_of(cache).is_err() {
        return;
    }
    let Ok(known) = std::fs::read_to_string(cache) else {
        return;
    };
    let kept = known.lines().filter_map(parse).filter(|(_, h)| *h != hash);
    if let Err(err) = write_lines(cache, kept) {
        tracing::debug!("cannot rewrite {}: {err}", cache.display());
    }
}

/// [`sha256`], noting only files last changed `settle` ago or more.
fn sha256_settled(path: &Path, cache: &Path, settle: std::time::Duration) -> io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let key = key_of(&meta);
    // Only a directory of this user's, closed to others, is trusted (the
    // fallback state directory is under /tmp, where anybody could have
    // made it first).
    let trusted = crate::files::private_dir_of(cache).is_ok();
    let known = if trusted {
        std::fs::read_to_string(cache).unwrap_or_default()
    } else {
        String::new()
    };
    if let Some(hash) = lookup(&known, &key) {
        return Ok(hash.to_string());
    }
    let hash = crate::error_text::hex(&Sha256::digest(std::fs::read(path)?));
    // A file replaced while it was read must not be noted under the key of
    // the one before, nor one that may change again within its key.
    let settled = std::time::SystemTime::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(meta.ctime()).unwrap_or(0),
            u32::try_from(meta.ctime_nsec()).unwrap_or(0),
        )
        + settle
        <= std::time::SystemTime::now();
    if trusted && settled && std::fs::metadata(path).is_ok_and(|meta| key_of(&meta) == key) {
        if let Err(err) = note(cache, &known, &key, &hash) {
            tracing::debug!("cannot note the hash in {}: {err}", cache.display());
        }
    }
    Ok(hash)
}

/// What identifies a file's content: device, inode, size, modification
/// and change times, as the five first fields of a line.
fn key_of(meta: &std::fs::Metadata) -> String {
    format!(
        "{} {} {} {}.{} {}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// The hash of the line of `text` with key `key`.
fn lookup<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    text.lines()
        .filter_map(parse)
        .find(|(k, _)| *k == key)
        .map(|(_, hash)| hash)
}

/// A well-formed line: (key, hash).
fn parse(line: &str) -> Option<(&str, &str)> {
    let (key, hash) = line.rsplit_once(' ')?;
    let well_formed = key.split(' ').count() == 5
        && hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then_some((key, hash))
}

/// Writes `cache` anew: `key`'s line first, then the other well-formed
/// lines of `known`, [`KEPT`] in all.
fn note(cache: &Path, known: &str, key: &str, hash: &str) -> io::Result<()> {
    let others = known.lines().filter_map(parse).filter(|(k, _)| *k != key);
    write_lines(
        cache,
        std::iter::once((key, hash)).chain(others.take(KEPT - 1)),
    )
}

/// Puts `lines` (key, hash) in place of `cache`'s content, through a
/// sibling of our own (two masters writing at once each write theirs)
/// that is new: never a file or link that was there.
fn write_lines<'l>(
    cache: &Path,
    lines: impl Iterator<Item = (&'l str, &'l str)>,
) -> io::Result<()> {
    let text: String = lines.map(|(key, hash)| format!("{key} {hash}\n")).collect();
    let tmp = crate::files::sibling(cache, &format!(".{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut file| io::Write::write_all(&mut file, text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, cache));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(bytes: &[u8]) -> String {
        crate::error_text::hex(&Sha256::digest(bytes))
    }

    /// The files of these tests were all written just now.
    fn hash(exe: &Path, cache: &Path) -> io::Result<String> {
        sha256_settled(exe, cache, std::time::Duration::ZERO)
    }

    #[test]
    fn a_file_changed_just_now_is_hashed_but_not_noted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, cache) = (dir.path().join("exe"), dir.path().join("exe-sha256"));
        std::fs::write(&exe, b"fresh build").expect("write");
        assert_eq!(sha256(&exe, &cache).expect("hash"), hex_of(b"fresh build"));
        assert!(!cache.exists(), "noted a file changed within {SETTLED:?}");
    }

    #[test]
    fn a_file_is_hashed_once_then_its_hash_is_read_from_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, cache) = (dir.path().join("exe"), dir.path().join("state/exe-sha256"));
        std::fs::write(&exe, b"program one").expect("write");
        assert_eq!(hash(&exe, &cache).expect("hash"), hex_of(b"program one"));
        let noted = std::fs::read_to_string(&cache).expect("noted");
        assert_eq!(noted.lines().count(), 1, "{noted}");
        // The cache is what answers now: a hash planted under the file's
        // key comes back as it is.
        let planted = "f".repeat(64);
        let key = key_of(&std::fs::metadata(&exe).expect("meta"));
        std::fs::write(&cache, format!("{key} {planted}\n")).expect("plant");
        assert_eq!(hash(&exe, &cache).expect("hash"), planted);
    }

    #[test]
    fn a_rewritten_file_is_hashed_again_and_both_builds_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, cache) = (dir.path().join("exe"), dir.path().join("exe-sha256"));
        std::fs::write(&exe, b"build one").expect("write");
        hash(&exe, &cache).expect("hash");
        // Same size, and the modification time set back: the change time
        // still tells.
        let before = std::fs::metadata(&exe).expect("meta");
        let mtime = before.modified().expect("mtime");
        // File times may be coarse (a clock tick of a few ms): rewrite
        // until the change time has moved, as it has for any build made
        // SETTLED before its first run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            std::fs::write(&exe, b"build two").expect("rewrite");
            std::fs::File::options()
                .write(true)
                .open(&exe)
                .and_then(|file| file.set_modified(mtime))
                .expect("set mtime back");
            let now = std::fs::metadata(&exe).expect("meta");
            if (now.ctime(), now.ctime_nsec()) != (before.ctime(), before.ctime_nsec()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the change time never moved"
            );
            std::thread::yield_now();
        }
        assert_eq!(hash(&exe, &cache).expect("hash"), hex_of(b"build two"));
        let noted = std::fs::read_to_string(&cache).expect("noted");
        let hashes: Vec<&str> = noted.lines().filter_map(parse).map(|(_, h)| h).collect();
        assert_eq!(
            hashes,
            [hex_of(b"build two"), hex_of(b"build one")],
            "{noted}"
        );
    }

    #[test]
    fn a_damaged_cache_costs_a_hash_and_is_written_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, cache) = (dir.path().join("exe"), dir.path().join("exe-sha256"));
        std::fs::write(&exe, b"program").expect("write");
        let key = key_of(&std::fs::metadata(&exe).expect("meta"));
        // The right key with a short hash, binary noise, a line of 4 fields.
        let damaged = format!("{key} abc\n\u{0}\u{1}garbage\n1 2 3 4 {}\n", "0".repeat(64));
        std::fs::write(&cache, damaged).expect("damage");
        assert_eq!(hash(&exe, &cache).expect("hash"), hex_of(b"program"));
        let noted = std::fs::read_to_string(&cache).expect("noted");
        assert_eq!(noted, format!("{key} {}\n", hex_of(b"program")));
    }

    #[test]
    fn an_unwritable_cache_is_no_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("exe");
        std::fs::write(&exe, b"program").expect("write");
        // Its directory would have to be a regular file.
        let cache = exe.join("exe-sha256");
        assert_eq!(hash(&exe, &cache).expect("hash"), hex_of(b"program"));
    }

    #[test]
    fn only_the_most_recent_builds_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("exe-sha256");
        for n in 0..KEPT + 3 {
            let exe = dir.path().join(format!("exe{n}"));
            std::fs::write(&exe, format!("build {n}")).expect("write");
            hash(&exe, &cache).expect("hash");
        }
        let noted = std::fs::read_to_string(&cache).expect("noted");
        assert_eq!(noted.lines().count(), KEPT, "{noted}");
        assert!(noted.starts_with(&format!(
            "{} ",
            key_of(&std::fs::metadata(dir.path().join(format!("exe{}", KEPT + 2))).expect("meta"))
        )));
    }

    #[test]
    fn a_cache_in_a_directory_others_can_write_is_neither_read_nor_written() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("exe");
        std::fs::write(&exe, b"program").expect("write");
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let cache = shared.join("exe-sha256");
        // Somebody else's entry for this very file.
        let key = key_of(&std::fs::metadata(&exe).expect("meta"));
        let planted = format!("{key} {}\n", "f".repeat(64));
        std::fs::write(&cache, &planted).expect("plant");
        assert_eq!(hash(&exe, &cache).expect("hash"), hex_of(b"program"));
        assert_eq!(std::fs::read_to_string(&cache).expect("left"), planted);
    }

    #[test]
    fn a_link_planted_where_the_new_cache_is_written_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, cache) = (dir.path().join("exe"), dir.path().join("exe-sha256"));
        std::fs::write(&exe, b"program").expect("write");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let tmp = crate::files::sibling(&cache, &format!(".{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("plant link");
        assert_eq!(hash(&exe, &cache).expect("hash"), hex_of(b"program"));
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        assert!(std::fs::read_to_string(&cache)
            .expect("noted")
            .ends_with(&format!("{}\n", hex_of(b"program"))));
    }

    #[test]
    fn a_hash_a_host_found_wrong_is_forgotten_and_the_file_hashed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exe, cache) = (dir.path().join("exe"), dir.path().join("exe-sha256"));
        std::fs::write(&exe, b"program").expect("write");
        let key = key_of(&std::fs::metadata(&exe).expect("meta"));
        let (wrong, other) = ("a".repeat(64), format!("1 2 3 4.0 5.0 {}", "b".repeat(64)));
        std::fs::write(&cache, format!("{key} {wrong}\n{other}\n")).expect("plant");
        assert_eq!(hash(&exe, &cache).expect("hash"), wrong);
        forget(&cache, &wrong);
        assert_eq!(
            std::fs::read_to_string(&cache).expect("left"),
            format!("{other}\n")
        );
        assert_eq!(hash(&exe, &cache).expect("hash"), hex_of(b"program"));
    }
}
