//! Hostile connections to a queue group's feeder, through the real binary
//! and `queue_worker` (a program that sets up no `tracing` of its own):
//! each refused connection is one warning in the master's log, naming the
//! peer's address and why, at most [`LIMIT`] per window and then one
//! summary line; the jobs are all done meanwhile.

use crate::support::Herd;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Warnings logged one by one per window (the feeder's `WARNING_LIMIT`).
const LIMIT: usize = 10;

/// Jobs of the run: enough to keep it going while we poke the feeder.
const JOBS: usize = 400;

/// What every refused connection's line says.
const REFUSED: &str = "consumer refused";

/// What a summary line says.
const SUMMARY: &str = "more refused or closed consumer connections (last from ";

fn herd() -> Herd {
    let worker = crate::support::worker_bin().with_file_name("queue_worker");
    Herd::new(&format!(
        r#"
[[group]]
name = "jobs"
command = "{worker}"
params = {{ jobs = {JOBS}, work_ms = 20 }}

[group.feeder]
bind = "127.0.0.1:0"

[group.local]
instances = 1
concurrency = 2
"#,
        worker = worker.display()
    ))
}

/// The feeder's address, from the master's "listening" line.
fn feeder_addr(herd: &mut Herd) -> String {
    let line = herd.wait_for("feeder listening on ");
    line.rsplit("feeder listening on ")
        .next()
        .expect("address")
        .trim()
        .to_string()
}

/// A connection to the feeder, and how the feeder's log names it.
fn connect(addr: &str) -> (TcpStream, String) {
    let stream = TcpStream::connect(addr).expect("connect to the feeder");
    stream
        .set_read_timeout(Some(crate::support::WAIT))
        .expect("timeout");
    let local = stream.local_addr().expect("local address");
    // The space after the port: 127.0.0.1:4000 is not 127.0.0.1:40001.
    (stream, format!("peer={local} "))
}

fn write_frame(stream: &mut TcpStream, body: &[u8]) {
    let len = u32::try_from(body.len()).expect("small frame");
    stream.write_all(&len.to_be_bytes()).expect("write length");
    stream.write_all(body).expect("write body");
}

/// One frame as JSON, `None` at the end of the stream (or a reset).
fn read_frame(stream: &mut TcpStream) -> Option<serde_json::Value> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

/// Reads until the feeder closes; it never sends a job.
fn wait_closed(stream: &mut TcpStream) {
    while let Some(frame) = read_frame(stream) {
        assert_ne!(frame["type"], "job", "a job for a stranger: {frame}");
    }
}

/// Jobs reported done, each once at most.
fn jobs_done(herd: &Herd) -> BTreeSet<u64> {
    herd.seen
        .iter()
        .filter_map(|line| line.rsplit_once("] done ")?.1.trim().parse().ok())
        .collect()
}

/// The K of a summary line `suppressed K more ...`.
fn suppressed(line: &str) -> usize {
    line.split("suppressed ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"))
}

#[test]
fn hostile_connections_are_logged_with_their_peer_and_rate_limited() {
    let mut herd = herd();
    herd.start();
    let addr = feeder_addr(&mut herd);
    let mut expected = Vec::new();

    // Garbage in a frame.
    let (mut garbage, peer) = connect(&addr);
    read_frame(&mut garbage).expect("a challenge");
    write_frame(&mut garbage, b"\x00\x01 not json at all");
    wait_closed(&mut garbage);
    expected.push((peer, "reason=corrupt frame: "));
    // A length prefix of 4 GiB.
    let (mut huge, peer) = connect(&addr);
    huge.write_all(&u32::MAX.to_be_bytes()).expect("write");
    wait_closed(&mut huge);
    expected.push((peer, "reason=frame too big"));
    // A Hello with a wrong proof.
    let (mut stranger, peer) = connect(&addr);
    let challenge = read_frame(&mut stranger).expect("a challenge");
    let hello = serde_json::json!({
        "type": "hello", "version": challenge["version"], "name": "stranger",
        "proof": "00".repeat(32), "nonce": "abcd",
    });
    write_frame(&mut stranger, hello.to_string().as_bytes());
    wait_closed(&mut stranger);
    expected.push((peer, "reason=authentication failed"));
    // Gone right after the challenge.
    let (mut gone, peer) = connect(&addr);
    read_frame(&mut gone).expect("a challenge");
    drop(gone);
    expected.push((peer, "reason=connection closed before the hello"));

    for (peer, reason) in &expected {
        let line = herd.wait_for(peer);
        assert!(
            line.contains(" warning ") && line.contains(REFUSED) && line.contains(reason),
            "expected a warning with {reason:?}: {line}"
        );
    }

    // A flood: at most the limit logged per window, then a summary.
    let flood = 200;
    for _ in 0..flood {
        let (mut stream, _) = connect(&addr);
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        wait_closed(&mut stream);
    }
    let summary = herd.wait_for(SUMMARY);
    assert!(summary.contains(" warning "), "{summary}");
    assert!(summary.contains("frame too big"), "{summary}");

    // The real consumer was never disturbed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while jobs_done(&herd).len() < JOBS {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {JOBS} jobs done",
            jobs_done(&herd).len()
        );
        herd.wait_for_count("] done ", herd.lines_with("] done ").len() + 1);
    }
    herd.signal(libc::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0));

    // Each hostile connection is in the log exactly once: on a line of its
    // own or counted by a summary.
    let one_by_one = herd.lines_with(REFUSED).len();
    let summaries: Vec<&String> = herd.lines_with(SUMMARY);
    let summed: usize = summaries.iter().map(|line| suppressed(line)).sum();
    assert_eq!(
        one_by_one + summed,
        expected.len() + flood,
        "{one_by_one} logged, {summed} summed up"
    );
    for (peer, _) in &expected {
        assert_eq!(herd.lines_with(peer).len(), 1, "{peer}");
    }
    // The flood took well under a window: at most two windows of it.
    assert!(
        one_by_one <= LIMIT * (summaries.len() + 1) && summaries.len() <= 2,
        "{one_by_one} lines and {} summaries",
        summaries.len()
    );
    herd.assert_no_leftovers();
}
