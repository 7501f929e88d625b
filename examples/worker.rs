//! The test slave: a library slave whose behaviour is driven by its params.
//!
//! It mirrors the test slave of the PHP originals; the integration tests and
//! the README example rely on exactly this behaviour. Every param is
//! optional, and they are applied in this order:
//!
//! 1. prints `Child {id} {group_id}` (or the `message` param) to stdout; with
//!    a `level` param (e.g. `"emergency"`) the line is sent as a log record
//!    of that level instead;
//!    then, with `gate: "path"`, reads that file to its end (a FIFO:
//!    until the test closes it), and with `ready: true` appends `ready`
//!    to the file `readyFile` (if given) and tells the master it is
//!    ready (`Handler::ready`);
//! 2. `sleep: n` sleeps n seconds, waking early on a stop and pinging;
//! 3. `forceSleep: n` sleeps n seconds, silent and deaf to stops;
//! 4. `neverDie: true` ignores stops forever (pings every 200 ms);
//! 5. `lines: n` prints `line 1` .. `line n`;
//! 6. `jobs: n` does n jobs (prints `job k`, counts it with
//!    `Handler::job_done`), stopping early at the group's `max_jobs`;
//! 7. `fail: "reason"` ends with an error (failure outcome, exit code 1);
//! 8. `panic: "text"` panics with that text;
//! 9. `exitCode: n` prints `Child clean exit` and exits with status n;
//! 10. prints `Child clean exit` and ends cleanly.
//!
//! Run it from a config (see `tests/it/` for many).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use taskherd::slave::{Handler, Level};

fn main() -> ExitCode {
    let handler = match Handler::from_env() {
        Ok(handler) => handler,
        Err(err) => {
            eprintln!("worker: {err}");
            return ExitCode::from(2);
        }
    };
    handler.run(work)
}

fn work(h: &Handler) -> Result<(), String> {
    let params = h.params();

    let line = match params.get("message").and_then(|v| v.as_str()) {
        Some(message) => message.to_string(),
        None => format!("Child {} {}", h.id(), h.group_id()),
    };
    match params.get("level") {
        Some(level) => {
            let level: Level = level
                .as_str()
                .ok_or_else(|| format!("param level must be a string, got {level}"))?
                .parse()
                .map_err(|err| format!("param level: {err}"))?;
            h.log(level, line);
        }
        None => say(&line),
    }

    if let Some(gate) = params.get("gate").and_then(|v| v.as_str()) {
        std::fs::read(gate).map_err(|err| format!("gate {gate}: {err}"))?;
    }
    if params.get("ready").and_then(|v| v.as_bool()) == Some(true) {
        if let Some(file) = params.get("readyFile").and_then(|v| v.as_str()) {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .map_err(|err| format!("readyFile {file}: {err}"))?;
            writeln!(file, "{} ready", h.group()).map_err(|err| format!("readyFile: {err}"))?;
        }
        h.ready();
    }

    if let Some(duration) = seconds(params, "sleep")? {
        h.sleep(duration);
    }

    if let Some(duration) = seconds(params, "forceSleep")? {
        std::thread::sleep(duration);
    }

    if params.get("neverDie").and_then(|v| v.as_bool()) == Some(true) {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            h.ping();
        }
    }

    if let Some(lines) = params.get("lines") {
        let lines = lines
            .as_u64()
            .ok_or_else(|| format!("param lines must be a whole number, got {lines}"))?;
        let mut out = std::io::stdout().lock();
        for k in 1..=lines {
            // A closed stdout is not this program's failure to report.
            let _ = writeln!(out, "line {k}");
        }
        let _ = out.flush();
    }

    if let Some(jobs) = params.get("jobs") {
        let jobs = jobs
            .as_u64()
            .ok_or_else(|| format!("param jobs must be a whole number, got {jobs}"))?;
        for k in 1..=jobs {
            say(&format!("job {k}"));
            // Counted for the group's max_jobs: false once it is reached.
            if !h.job_done() {
                break;
            }
        }
    }

    if let Some(reason) = params.get("fail") {
        return Err(match reason.as_str() {
            Some(reason) => reason.to_string(),
            None => reason.to_string(),
        });
    }

    if let Some(text) = params.get("panic") {
        match text.as_str() {
            Some(text) => panic!("{text}"),
            None => panic!("{text}"),
        }
    }

    if let Some(code) = params.get("exitCode") {
        let code = code
            .as_i64()
            .and_then(|code| i32::try_from(code).ok())
            .ok_or_else(|| format!("param exitCode must be a whole number, got {code}"))?;
        say("Child clean exit");
        h.flush();
        std::process::exit(code);
    }

    say("Child clean exit");
    Ok(())
}

/// Prints one line to stdout and flushes it at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout is not this program's failure to report.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reads an optional param given in seconds (integer or fraction).
fn seconds(params: &serde_json::Value, name: &str) -> Result<Option<Duration>, String> {
    let Some(value) = params.get(name) else {
        return Ok(None);
    };
    value
        .as_f64()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .map(Some)
        .ok_or_else(|| format!("param {name} must be a number of seconds, got {value}"))
}
