//! Per-job options through the real binary: `taskherd queue add` with
//! `--priority`, `--delay`, `--unique` and `--retry`, served by the
//! built-in file feeder to an exec consumer that records what it sees.

use crate::support::{queue_list, queue_ok, Herd};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// A temp dir with the queue, the job script and the record it writes.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn queue(&self) -> PathBuf {
        self.dir.path().join("jobs.queue")
    }

    fn record(&self) -> PathBuf {
        self.dir.path().join("seen.txt")
    }

    /// `taskherd queue add` with `flags`, then the jobs.
    fn add(&self, flags: &[&str], jobs: &[&str]) {
        let queue = self.queue();
        let mut args = vec![OsStr::new("add")];
        args.extend(flags.iter().map(OsStr::new));
        args.push(queue.as_os_str());
        args.extend(jobs.iter().map(OsStr::new));
        queue_ok(&args);
    }

    /// One consumer running one job at a time: the script appends `JOB
    /// ATTEMPT MS` to the record when a job starts, and exits with 75
    /// (retry) while its attempt is below `fail_until`.
    fn herd(&self, fail_until: u32) -> Herd {
        let script = self.dir.path().join("job.sh");
        std::fs::write(
            &script,
            format!(
                r#"read job
now=$(date +%s%N | cut -c1-13)
echo "$job $TASKHERD_JOB_ATTEMPT $now" >> "{record}"
echo "saw $job attempt $TASKHERD_JOB_ATTEMPT"
if [ "$TASKHERD_JOB_ATTEMPT" -lt {fail_until} ]; then exit 75; fi
"#,
                record = self.record().display()
            ),
        )
        .expect("write script");
        Herd::new(&format!(
            r#"
[[group]]
name = "jobs"
command = "sh"
args = [{script:?}]
stop_grace = "3s"

[group.feeder]
file = "{file}"

[group.consumer]
run = "exec"

[group.queue]
retry_initial = "50ms"
retry_max = "100ms"
max_attempts = 5
progress_every = "200ms"

[group.local]
instances = 1
concurrency = 1
"#,
            script = script.display().to_string(),
            file = self.queue().display(),
        ))
    }

    /// The record: (job, attempt, ms) per started attempt.
    fn seen(&self) -> Vec<(String, u32, u64)> {
        std::fs::read_to_string(self.record())
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let mut parts = line.split(' ');
                let job = parts.next().unwrap_or_default().to_owned();
                let attempt = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let ms = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                (job, attempt, ms)
            })
            .collect()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Stops the herd cleanly and checks that nothing it started is left.
fn stop(herd: &mut Herd) {
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit();
    assert!(
        status.success(),
        "{status}; seen:\n{}",
        herd.seen.join("\n")
    );
    herd.assert_no_leftovers();
}

#[test]
fn jobs_come_by_priority_a_delayed_one_after_its_delay_a_duplicate_once() {
    let setup = Setup::new();
    let added_at = now_ms();
    setup.add(&["--delay", "2s", "--priority", "100"], &["\"late\""]);
    setup.add(&[], &["\"p0\""]);
    setup.add(&["--priority", "5"], &["\"p5\""]);
    setup.add(&["--priority", "9"], &["\"p9\""]);
    setup.add(&["--priority", "-1"], &["\"pm1\""]);
    setup.add(&["--unique", "k"], &["\"u1\""]);
    setup.add(&["--unique", "k"], &["\"u2\""]);
    let mut herd = setup.herd(0);
    herd.start();
    herd.wait_for("its unique key is held");
    herd.wait_for("saw \"late\" attempt 1");
    herd.wait_for("6 done, 0 failed");
    stop(&mut herd);
    let seen = setup.seen();
    let order: Vec<&str> = seen.iter().map(|(job, _, _)| job.as_str()).collect();
    assert_eq!(
        order,
        ["\"p9\"", "\"p5\"", "\"p0\"", "\"u1\"", "\"pm1\"", "\"late\""],
        "priority first, then the order added; the delayed one once due"
    );
    let late = seen.last().map_or(0, |(_, _, ms)| *ms);
    assert!(
        late >= added_at + 2000,
        "served {} ms after it was added",
        late - added_at
    );
}

#[test]
fn a_job_s_own_retry_schedule_is_followed() {
    let setup = Setup::new();
    setup.add(&["--retry", "400ms,1200ms"], &["\"r\""]);
    let mut herd = setup.herd(3);
    herd.start();
    herd.wait_for("saw \"r\" attempt 3");
    herd.wait_for("1 done, 2 failed");
    stop(&mut herd);
    let seen = setup.seen();
    let times: Vec<u64> = seen.iter().map(|(_, _, ms)| *ms).collect();
    assert_eq!(
        seen.iter()
            .map(|(_, attempt, _)| *attempt)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // The group's backoff is 50 to 100 ms; the job's own is 400 ms, then
    // 1.2 s (counted from the end of the failed attempt).
    assert!(times[1] - times[0] >= 400, "{times:?}");
    assert!(times[2] - times[1] >= 1200, "{times:?}");
}

#[test]
fn a_job_retried_every_interval_until_a_time_then_dead() {
    let setup = Setup::new();
    // Always fails (exit 75): retried every 500 ms while a retry starts
    // before `until`, then dead (max_attempts, 5, is not reached first).
    let mut herd = setup.herd(u32::MAX);
    herd.start();
    herd.wait_for("consumer joined");
    let until = now_ms() + 1_300;
    let until_text =
        humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(until))
            .to_string();
    setup.add(
        &["--retry-every", "500ms", "--retry-until", &until_text],
        &["\"poll\""],
    );
    herd.wait_for("job dead");
    herd.signal(libc::SIGTERM);
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(1), "dead jobs fail the run");
    herd.assert_no_leftovers();
    let seen = setup.seen();
    let times: Vec<u64> = seen.iter().map(|(_, _, ms)| *ms).collect();
    let attempts: Vec<u32> = seen.iter().map(|(_, attempt, _)| *attempt).collect();
    assert!(
        (2..5).contains(&attempts.len()),
        "attempts {attempts:?} at {times:?}, until {until}"
    );
    assert_eq!(attempts, (1..=attempts.len() as u32).collect::<Vec<_>>());
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= 500, "{times:?}");
    }
    // Every retry began before `until` (the script notes its start a
    // little after), and the next one would have begun after it.
    let last = *times.last().expect("an attempt");
    assert!(last <= until + 300, "a retry at {last}, until {until}");
    assert!(
        last + 500 + 300 > until,
        "gave up early: last {last}, until {until}"
    );
    let list = queue_list(&setup.queue());
    assert_eq!(list["dead"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["pending"], 0, "{list}");
}

#[test]
fn queue_list_shows_each_pending_job_s_options() {
    let setup = Setup::new();
    let added_at = now_ms();
    setup.add(
        &["--delay", "1h", "--priority", "7", "--unique", "k"],
        &["\"a\""],
    );
    setup.add(&[], &["\"b\""]);
    // `compact` takes the inbox in (a feeder would too).
    let queue = |command: &str| queue_ok(&[OsStr::new(command), setup.queue().as_os_str()]);
    queue("compact");
    let list = queue_list(&setup.queue());
    let jobs = list["jobs"].as_array().expect("jobs");
    // Due first: "b"; then "a", an hour away.
    assert_eq!(jobs.len(), 2, "{list}");
    assert_eq!(jobs[0]["job"], "b", "{list}");
    assert!(jobs[0].get("options").is_none(), "{list}");
    assert_eq!(jobs[1]["job"], "a", "{list}");
    let options = &jobs[1]["options"];
    assert_eq!(options["priority"], 7, "{list}");
    assert_eq!(options["unique"], "k", "{list}");
    let at = options["at"].as_u64().expect("at");
    assert!(
        at >= added_at + 3_600_000 && at < now_ms() + 3_600_000 + 1,
        "{list}"
    );
    let text = queue_ok(&[
        OsStr::new("list"),
        OsStr::new("--jobs"),
        setup.queue().as_os_str(),
    ]);
    assert!(text.contains("options {"), "{text}");
}
