//! The durable file queue against faults a user meets: a full disk (under
//! `taskherd queue add`, and under a feeder that serves), damaged journals
//! and garbage in the inbox. What is checked is what a user sees: exit
//! codes, error messages, `taskherd queue list`, the master's log and the
//! jobs done.
//!
//! The full-disk tests mount a small tmpfs and so need root; without it
//! (or when the mount fails, in a container without the capability) they
//! say why on stderr and pass without checking anything.

use crate::support::{queue_list, queue_ok, taskherd_bin, Herd};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A tmpfs mounted on a temp dir, unmounted when dropped (a panic
/// included), then the dir removed.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it); `None`,
    /// with the reason on stderr, when this test cannot.
    fn mount(size: &str, test: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid(2) takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("{test}: skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Tmpfs { dir }),
            Ok(out) => {
                eprintln!(
                    "{test}: skipped: mount -t tmpfs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(err) => {
                eprintln!("{test}: skipped: cannot run mount: {err}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A process of a failed test may still be closing its files: try
        // for a while, then detach it (it goes once nobody uses it).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("umount").arg(self.dir.path()).output();
            match out {
                Ok(out) if out.status.success() => return,
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => break,
            }
        }
        let lazy = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
        if !lazy.is_ok_and(|out| out.status.success()) {
            eprintln!("cannot unmount the tmpfs on {}", self.dir.path().display());
        }
    }
}

/// Fills the file system holding `dir` with a file: every block is taken
/// once this returns. Returns the file.
fn fill_disk(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("create the filler");
    let mut chunk = vec![0xa5u8; 64 << 10];
    // A block another writer let go of meanwhile is taken too (tmpfs has
    // no blocks reserved for root: nothing is left for anyone).
    for _ in 0..100 {
        // Until the disk is full (the tmpfs is small: this ends).
        loop {
            match file.write(&chunk) {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(err) => panic!("cannot write the filler: {err}"),
            }
        }
        if free_blocks(dir) == 0 {
            return path;
        }
        chunk.truncate(4096);
    }
    panic!(
        "the disk is not full after the filler: {} blocks free",
        free_blocks(dir)
    );
}

/// Blocks free for anyone on the file system holding `dir` (statvfs).
fn free_blocks(dir: &Path) -> libc::fsblkcnt_t {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("no NUL in a path");
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs we own, for this call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    assert_eq!(rc, 0, "statvfs {}", dir.display());
    stat.f_bavail
}

/// `taskherd queue ARGS`, with `stdin` fed to it, not checked.
fn taskherd_queue<S: AsRef<OsStr>>(args: &[S], stdin: Option<Vec<u8>>) -> Output {
    let mut child = Command::new(taskherd_bin())
        .arg("queue")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start taskherd queue");
    let feeder = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().expect("piped");
        // A thread: the batch is larger than a pipe holds.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        })
    });
    let out = child.wait_with_output().expect("wait for taskherd queue");
    if let Some(feeder) = feeder {
        feeder.join().expect("stdin writer");
    }
    out
}

/// `taskherd queue ARGS`, which must fail; its stderr.
fn queue_err<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = taskherd_queue(args, None);
    assert!(
        !out.status.success(),
        "queue {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The payloads of the pending jobs of a `list` report, in serving order.
fn pending_jobs(report: &serde_json::Value) -> Vec<serde_json::Value> {
    report["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs in {report}"))
        .iter()
        .map(|job| job["job"].clone())
        .collect()
}

/// `{"n": n, "pad": "..."}`: a job of about 100 bytes.
fn padded_job(n: u64) -> String {
    format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(80))
}

#[test]
fn queue_add_on_a_full_disk_fails_and_adds_nothing() {
    let Some(fs) = Tmpfs::mount("1m", "queue_add_on_a_full_disk_fails_and_adds_nothing") else {
        return;
    };
    let file = fs.path().join("jobs.queue");
    let inbox = fs.path().join("jobs.queue.inbox");
    // Five jobs in the journal, three in the inbox.
    queue_ok(&[
        OsStr::new("add"),
        file.as_os_str(),
        "1".as_ref(),
        "2".as_ref(),
    ]);
    queue_ok(&[
        OsStr::new("add"),
        file.as_os_str(),
        "3".as_ref(),
        "4".as_ref(),
        "5".as_ref(),
    ]);
    queue_ok(&[OsStr::new("compact"), file.as_os_str()]);
    queue_ok(&[
        OsStr::new("add"),
        file.as_os_str(),
        r#"{"n":6}"#.as_ref(),
        r#""seven""#.as_ref(),
        "[8]".as_ref(),
    ]);
    let inbox_before = std::fs::read(&inbox).expect("the inbox");
    let journal_before = std::fs::read(&file).expect("the journal");

    let filler = fill_disk(fs.path());
    // 300 kB: it would fit without the filler.
    let batch: String = (1..=50_000).map(|n| format!("{n}\n")).collect();
    let args = [OsStr::new("add"), file.as_os_str(), OsStr::new("-")];
    let out = taskherd_queue(&args, Some(batch.into_bytes()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "added on a full disk: {stderr}");
    assert!(
        stderr.contains(&inbox.display().to_string()) && stderr.contains("No space left on device"),
        "the error names the inbox and the full disk: {stderr}"
    );
    assert!(stderr.contains("none was added"), "{stderr}");

    // Nothing half-added: the files are as they were.
    assert_eq!(
        std::fs::read(&inbox).expect("the inbox"),
        inbox_before,
        "the inbox was cut back"
    );
    assert_eq!(std::fs::read(&file).expect("the journal"), journal_before);
    let report = queue_list(&file);
    assert_eq!(report["pending"], 5, "{report}");
    assert_eq!(report["inbox"], 3, "{report}");
    assert_eq!(report["dead"].as_array().map(Vec::len), Some(0), "{report}");

    // With room again, taking the inbox in gives exactly the jobs added
    // before, in order.
    std::fs::remove_file(&filler).expect("remove the filler");
    let compacted = queue_ok(&[OsStr::new("compact"), file.as_os_str()]);
    assert!(compacted.contains("took 3 jobs in"), "{compacted}");
    let report = queue_list(&file);
    assert_eq!(report["inbox"], 0, "{report}");
    assert_eq!(report["dead"].as_array().map(Vec::len), Some(0), "{report}");
    assert_eq!(
        pending_jobs(&report),
        [
            serde_json::json!(1),
            serde_json::json!(2),
            serde_json::json!(3),
            serde_json::json!(4),
            serde_json::json!(5),
            serde_json::json!({"n": 6}),
            serde_json::json!("seven"),
            serde_json::json!([8]),
        ],
        "{report}"
    );
}

/// How many times each job (a number) was reported done.
fn done_counts(herd: &Herd) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for line in &herd.seen {
        if let Some(n) = line
            .rsplit_once("] done ")
            .and_then(|(_, n)| n.trim().parse::<u64>().ok())
        {
            *counts.entry(n).or_insert(0) += 1;
        }
    }
    counts
}

/// The N of the feeder's progress line `queue: N done, ...`.
fn progress_done(line: &str) -> u64 {
    line.split("] queue: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no done count in {line:?}"))
}

/// What the feeder's progress line says.
const PROGRESS: &str = "] queue: ";

/// What the feeder logs when its journal writes start failing.
const WRITES_FAIL: &str = "queue journal writes fail";

/// What it logs when they work again.
const WRITABLE_AGAIN: &str = "writable again";

#[test]
fn a_feeder_on_a_full_disk_pauses_and_loses_nothing() {
    const JOBS: u64 = 2000;
    let Some(fs) = Tmpfs::mount("4m", "a_feeder_on_a_full_disk_pauses_and_loses_nothing") else {
        return;
    };
    let file = fs.path().join("jobs.queue");
    let numbers: String = (1..=JOBS).map(|n| format!("{n}\n")).collect();
    let args = [OsStr::new("add"), file.as_os_str(), OsStr::new("-")];
    let added = taskherd_queue(&args, Some(numbers.into_bytes()));
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );

    // Declared after the tmpfs: dropped (every process gone) before the
    // unmount.
    let worker = crate::support::worker_bin().with_file_name("queue_worker");
    let mut herd = Herd::new(&format!(
        r#"
[[group]]
name = "jobs"
command = "{worker}"
params = {{ file = "{file}", work_ms = 20 }}

[group.feeder]
bind = "127.0.0.1:0"

[group.queue]
progress_every = "1s"

[group.local]
instances = 2
concurrency = 4
"#,
        worker = worker.display(),
        file = file.display(),
    ));
    herd.start();
    herd.wait_for_count("] done ", 100);

    let filler = fill_disk(fs.path());
    let filled_at = herd.seen.len();
    // Nothing is served any more: once the last block of the journal is
    // full too and the jobs out by then end, no job is done across three
    // progress lines (two seconds) in a row, while most are still to do.
    let mut progress = herd.lines_with(PROGRESS).len();
    let mut window: Vec<(usize, u64)> = Vec::new();
    let stalled_at = loop {
        let line = herd.wait_for_count(PROGRESS, progress + 1);
        progress += 1;
        let done = herd.lines_with("] done ").len();
        window.push((done, progress_done(&line)));
        if window.len() >= 3
            && window[window.len() - 3..]
                .iter()
                .all(|w| *w == window[window.len() - 1])
        {
            break herd.seen.len();
        }
        assert!(
            window.len() < 20,
            "the feeder went on serving on a full disk: {window:?}"
        );
    };
    let done_in_outage = done_counts(&herd).len() as u64;
    assert!(
        done_in_outage < JOBS - 100,
        "the queue was nearly done before the disk filled: {done_in_outage}"
    );

    // Room again: serving resumes, every job is done.
    std::fs::remove_file(&filler).expect("remove the filler");
    let deadline = Instant::now() + Duration::from_secs(60);
    while (done_counts(&herd).len() as u64) < JOBS {
        assert!(
            Instant::now() < deadline,
            "only {} of {JOBS} jobs done after the disk had room again",
            done_counts(&herd).len()
        );
        herd.wait_for_count("] done ", herd.lines_with("] done ").len() + 1);
    }
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));
    herd.assert_no_leftovers();

    let counts = done_counts(&herd);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        (1..=JOBS).collect::<Vec<_>>(),
        "jobs missing"
    );
    // Only jobs out at the fill (2 consumers x 4, with their credits) may
    // have been done twice.
    let doubles: Vec<u64> = counts
        .iter()
        .filter(|(_, &c)| c > 1)
        .map(|(&n, _)| n)
        .collect();
    assert!(doubles.len() <= 16, "done more than once: {doubles:?}");
    let report = queue_list(&file);
    assert_eq!(report["pending"], 0, "{report}");
    assert_eq!(report["inbox"], 0, "{report}");
    assert_eq!(report["dead"].as_array().map(Vec::len), Some(0), "{report}");

    // The operator was told, in the master's log: why serving stopped
    // (before it was seen stalled), and that it resumed.
    let failed = herd
        .seen
        .iter()
        .position(|line| line.contains(WRITES_FAIL))
        .unwrap_or_else(|| {
            panic!(
                "the feeder's {WRITES_FAIL:?} error is not in the master's log; after the fill:\n{}",
                herd.seen[filled_at..stalled_at]
                    .iter()
                    .filter(|line| !line.contains("] done "))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    let line = &herd.seen[failed];
    assert!(
        line.contains(" error ") && line.contains("[queue_worker/1/1]"),
        "an error of the feeder: {line}"
    );
    assert!(
        line.contains(&file.display().to_string()) && line.contains("No space left on device"),
        "names the journal and the cause: {line}"
    );
    assert!(
        (filled_at..stalled_at).contains(&failed),
        "logged after the fill, before the stall was seen: {line}"
    );
    let again = herd
        .seen
        .iter()
        .position(|line| line.contains(WRITABLE_AGAIN))
        .unwrap_or_else(|| panic!("no {WRITABLE_AGAIN:?} line in the master's log"));
    assert!(again >= stalled_at, "{}", herd.seen[again]);
    assert_eq!(
        herd.lines_with(WRITES_FAIL).len(),
        1,
        "logged once per outage"
    );
}

/// The frames of a durable queue journal: (offset, length with header).
fn frames(data: &[u8]) -> Vec<(usize, usize)> {
    const MAGIC: usize = 8;
    const HEADER: usize = 8;
    let mut out = Vec::new();
    let mut pos = MAGIC;
    while pos + HEADER <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        out.push((pos, HEADER + len));
        pos += HEADER + len;
    }
    assert_eq!(pos, data.len(), "frames end with the file");
    out
}

/// `queue list` and `queue compact` on `file` fail with `message` naming
/// the file, and leave it as it was.
fn assert_refused(file: &Path, message: &str) {
    let before = std::fs::read(file).expect("the file");
    for command in ["list", "compact"] {
        let stderr = queue_err(&[OsStr::new(command), file.as_os_str()]);
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains(message),
            "queue {command}: expected {message:?} naming the file: {stderr}"
        );
        assert_eq!(
            std::fs::read(file).expect("the file"),
            before,
            "queue {command} changed the file"
        );
    }
}

#[test]
fn damaged_files_get_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");

    // A journal of several frames: 25,000 jobs of 100 bytes, compacted
    // (a snapshot is cut in frames of about a megabyte).
    let file = dir.path().join("jobs.queue");
    let jobs: String = (1..=25_000).map(|n| padded_job(n) + "\n").collect();
    let args = [OsStr::new("add"), file.as_os_str(), OsStr::new("-")];
    let added = taskherd_queue(&args, Some(jobs.into_bytes()));
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    queue_ok(&[OsStr::new("compact"), file.as_os_str()]);
    let sound = std::fs::read(&file).expect("the journal");
    let layout = frames(&sound);
    assert!(
        layout.len() >= 3,
        "too few frames to damage one inside: {layout:?}"
    );
    // A flipped byte in the middle of the first frame, then of the second
    // (neither is the last: that is damage, not a torn write).
    for &(offset, len) in &layout[..2] {
        let mut damaged = sound.clone();
        damaged[offset + len / 2] ^= 0x10;
        std::fs::write(&file, &damaged).expect("write the damaged journal");
        assert_refused(&file, &format!("corrupt at byte {offset}"));
    }
    // Sound again, it opens.
    std::fs::write(&file, &sound).expect("restore the journal");
    assert_eq!(queue_list(&file)["pending"], 25_000);

    // A file that is not a journal at all.
    let hello = dir.path().join("hello");
    std::fs::write(&hello, "hello\n").expect("write");
    assert_refused(&hello, "is not a taskherd queue journal");

    // A line of the inbox that is not JSON: kept as a dead job saying
    // where it was; the jobs around it are taken in.
    let file = dir.path().join("mixed.queue");
    let inbox = dir.path().join("mixed.queue.inbox");
    queue_ok(&[
        OsStr::new("add"),
        file.as_os_str(),
        "1".as_ref(),
        "2".as_ref(),
    ]);
    let garbage_at = std::fs::metadata(&inbox).expect("the inbox").len();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&inbox)
        .and_then(|mut inbox| inbox.write_all(b"not json\n"))
        .expect("append to the inbox");
    queue_ok(&[OsStr::new("add"), file.as_os_str(), "3".as_ref()]);
    let compacted = queue_ok(&[OsStr::new("compact"), file.as_os_str()]);
    assert!(compacted.contains("took 3 jobs in"), "{compacted}");
    let report = queue_list(&file);
    assert_eq!(
        pending_jobs(&report),
        [
            serde_json::json!(1),
            serde_json::json!(2),
            serde_json::json!(3)
        ],
        "{report}"
    );
    assert_eq!(report["inbox"], 0, "{report}");
    let dead = report["dead"].as_array().expect("dead jobs");
    assert_eq!(dead.len(), 1, "{report}");
    assert_eq!(dead[0]["job"], "not json", "{report}");
    let reason = dead[0]["reason"].as_str().expect("a reason");
    assert!(
        reason.contains(&inbox.display().to_string())
            && reason.contains(&format!("byte {garbage_at} "))
            && reason.contains("not JSON"),
        "the reason names the inbox and the offset {garbage_at}: {reason}"
    );
}
