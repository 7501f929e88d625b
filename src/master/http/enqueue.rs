//! The webhook: jobs posted over HTTP go to their group's queue, and the
//! answer (202, with an id per job) comes once they are durable.
//!
//! A group takes jobs this way when the master can reach its queue: a
//! queue group fed by the built-in durable file queue on the master's
//! host (`[group.feeder] file`), whose inbox `taskherd queue add` writes
//! too ([`JobTarget::File`]), or one on JetStream (`backend = "nats"`,
//! [`JobTarget::JetStream`]).
//!
//! Each file queue has one intake task: requests hand it their jobs over
//! a bounded channel; it takes every request waiting, appends all their
//! jobs to the inbox in one write and one sync (on the blocking pool),
//! then answers each. Concurrent single-job requests share a sync. The
//! ids are the queue's own, reserved by the write (`<queue>.ids`, see
//! `queue::durable::inbox`): no feeder needs to be running.
//!
//! Jobs for JetStream are published by [`producer::publish`] (what
//! `taskherd queue add` uses), on one client per stream kept by the
//! master, and answered once the stream acknowledged each: their ids are
//! their stream sequences.

use super::super::herd::Board;
use super::ApiError;
use crate::config::{BuiltinFeeder, Config, QueueBackend};
use crate::error_text::error_chain;
use crate::protocol::slave::JetStreamQueue;
use crate::queue::nats::{self, producer};
use crate::queue::options::{envelope_text, split_envelope, JobOptions};
use axum::http::StatusCode;
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Requests waiting for one intake task, at most.
const INTAKE_WAITING: usize = 256;

/// Bytes one intake write takes at most (more wait for the next).
const COMMIT_BYTES: usize = 16 << 20;

/// Longest wait for room in a busy intake before 503.
const INTAKE_WAIT: Duration = Duration::from_secs(10);

/// Where a group's jobs go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JobTarget {
    /// The inbox of the durable file queue at this path, on the master's
    /// host.
    File(PathBuf),
    /// A JetStream work stream (`backend = "nats"`).
    JetStream(Box<JetStreamQueue>),
}

/// Where `group`'s jobs go, or why it takes none this way.
///
/// # Errors
/// 404 for an unknown group; 409 for a group whose jobs the master cannot
/// reach, saying why.
pub(crate) fn target_of(config: &Config, group: &str) -> Result<JobTarget, ApiError> {
    let Some(spec) = config.groups.iter().find(|g| g.name == group) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no group named {group:?}"),
        ));
    };
    let refuse = |why: String| {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("group {group} takes no jobs over HTTP: {why}"),
        ))
    };
    let Some(queue) = &spec.queue else {
        return refuse("it is not a queue group".into());
    };
    if queue.backend == QueueBackend::Nats {
        return match config.jetstream_queue(group) {
            Some(queue) => Ok(JobTarget::JetStream(Box::new(queue))),
            None => refuse("its JetStream queue is not configured".into()),
        };
    }
    match (&queue.builtin_feeder, &queue.feeder_host) {
        (Some(BuiltinFeeder::File(path)), None) => {
            Ok(JobTarget::File(config.base_dir().join(path)))
        }
        (Some(BuiltinFeeder::File(path)), Some(host)) => refuse(format!(
            "its file queue {} is on host {}, out of the master's reach \
             (add jobs there with taskherd queue add)",
            path.display(),
            host.label
        )),
        (Some(BuiltinFeeder::Jsonl(path)), _) => refuse(format!(
            "it is fed by the JSON-lines file {}: append jobs to that file",
            path.display()
        )),
        (Some(BuiltinFeeder::Command { program, .. }), _) => {
            refuse(format!("it is fed by the output of the command {program}"))
        }
        (None, _) => refuse(format!(
            "its feeder is a program ({}) that makes its own jobs; \
             use [group.feeder] file = \"...\" for a queue that takes jobs",
            spec.command
        )),
    }
}

/// The jobs of a request body, one compact JSON line each: a JSON value is
/// one job, an array is a list of jobs; a job written
/// `{"job": ..., "options": {...}}` has options (as with `taskherd queue
/// add`), a delay counted from now.
///
/// # Errors
/// 400 for a body that is not JSON, an empty array, or wrong options
/// (naming the job).
pub(crate) fn parse_jobs(body: &[u8]) -> Result<(Vec<u8>, usize), ApiError> {
    let jobs = split_jobs(body)?;
    let mut lines = Vec::with_capacity(body.len() + jobs.len());
    for (index, (job, options)) in jobs.iter().enumerate() {
        let named = |why: String| bad_job(index, why);
        match options {
            Some(options) => {
                let text = envelope_text(job, &options.clone().resolved_now())
                    .map_err(|err| named(err.to_string()))?;
                push_line(&mut lines, &text).map_err(named)?;
            }
            None => push_line(&mut lines, job.get()).map_err(named)?,
        }
    }
    Ok((lines, jobs.len()))
}

/// A job of a request with its options, if it has some.
type JobWithOptions = (Box<RawValue>, Option<JobOptions>);

/// A job for JetStream: its start time and unique key.
type StreamJob = (Box<RawValue>, Option<SystemTime>, Option<String>);

/// 400 naming job `index` (counted from 0).
fn bad_job(index: usize, why: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, format!("job {}: {why}", index + 1))
}

/// The jobs of a request body with their options (see [`parse_jobs`]).
///
/// # Errors
/// As [`parse_jobs`].
fn split_jobs(body: &[u8]) -> Result<Vec<JobWithOptions>, ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, message);
    let text =
        std::str::from_utf8(body).map_err(|err| bad(format!("the body is not UTF-8: {err}")))?;
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(bad(
            "the body is empty: send a job as JSON, or a JSON array of jobs".into(),
        ));
    }
    let jobs: Vec<Box<RawValue>> = if trimmed.starts_with('[') {
        serde_json::from_str(text).map_err(|err| bad(format!("the body is not JSON: {err}")))?
    } else {
        vec![serde_json::from_str(text)
            .map_err(|err| bad(format!("the body is not JSON: {err}")))?]
    };
    if jobs.is_empty() {
        return Err(bad("the array holds no job".into()));
    }
    jobs.into_iter()
        .enumerate()
        .map(|(index, job)| match split_envelope(job.get()) {
            Ok(Some((payload, options))) => Ok((payload, Some(options))),
            Ok(None) => Ok((job, None)),
            Err(why) => Err(bad_job(index, why)),
        })
        .collect()
}

/// The jobs of a request body for a JetStream queue: each with its start
/// time (a delay counted from now) and unique key.
///
/// # Errors
/// As [`parse_jobs`]; 400 for an option JetStream does not take, naming
/// the job.
fn jetstream_jobs(body: &[u8]) -> Result<Vec<StreamJob>, ApiError> {
    let now = crate::protocol::millis::now();
    split_jobs(body)?
        .into_iter()
        .enumerate()
        .map(|(index, (job, options))| {
            let Some(options) = options else {
                return Ok((job, None, None));
            };
            let (at_ms, unique) = options.jetstream(now).map_err(|name| {
                bad_job(
                    index,
                    format!(
                        "option {name:?} is not taken by a JetStream queue \
                         (the group's retry settings apply; jobs run in order)"
                    ),
                )
            })?;
            let not_before = at_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
            Ok((job, not_before, unique.map(str::to_owned)))
        })
        .collect()
}

/// Appends one JSON text as one line (pretty JSON made compact).
fn push_line(lines: &mut Vec<u8>, text: &str) -> Result<(), String> {
    if text.contains('\n') {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|err| err.to_string())?;
        serde_json::to_writer(&mut *lines, &value).map_err(|err| err.to_string())?;
    } else {
        lines.extend_from_slice(text.as_bytes());
    }
    lines.push(b'\n');
    Ok(())
}

/// Jobs of one request for an intake task.
struct Batch {
    /// One JSON line per job.
    lines: Vec<u8>,
    /// How many jobs (lines).
    count: u64,
    /// Told the first job's id once the jobs are durable (or why not).
    done: oneshot::Sender<Result<u64, String>>,
}

/// Every queue's intake, started on first use.
pub(crate) struct Intakes {
    /// The core: the current config says where a group's jobs go.
    board: Board,
    /// The intake task of each file queue.
    files: Mutex<BTreeMap<PathBuf, mpsc::Sender<Batch>>>,
    /// A NATS client per JetStream stream, with the queue settings it was
    /// made for, connected on first use (it reconnects by itself
    /// afterwards; settings changed by a reload make a new one).
    streams: tokio::sync::Mutex<BTreeMap<String, (JetStreamQueue, async_nats::Client)>>,
    /// Jobs accepted per group, for the metrics.
    accepted: Mutex<BTreeMap<String, u64>>,
}

impl Intakes {
    pub(crate) fn new(board: Board) -> Self {
        Intakes {
            board,
            files: Mutex::new(BTreeMap::new()),
            streams: tokio::sync::Mutex::new(BTreeMap::new()),
            accepted: Mutex::new(BTreeMap::new()),
        }
    }

    /// Jobs accepted per group so far.
    pub(crate) fn accepted(&self) -> BTreeMap<String, u64> {
        self.accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds the jobs of `body` to `group`'s queue; returns their ids (the
    /// ones the queue, its consumers and `taskherd queue list` know them
    /// by) once they are durable. All or nothing.
    ///
    /// # Errors
    /// As [`target_of`] and [`parse_jobs`]; 503 when the queue's intake is
    /// busy, 500 when the jobs cannot be written (none was added).
    pub(crate) async fn enqueue(&self, group: &str, body: &[u8]) -> Result<Vec<u64>, ApiError> {
        let target = target_of(self.board.lock().config(), group)?;
        let ids: Vec<u64> = match target {
            JobTarget::File(path) => {
                let (lines, count) = parse_jobs(body)?;
                let first = self.add_to_file(path, lines, count as u64).await?;
                (first..first + count as u64).collect()
            }
            JobTarget::JetStream(queue) => {
                let jobs = jetstream_jobs(body)?;
                self.publish(&queue, &jobs).await?
            }
        };
        let count = ids.len();
        *self
            .accepted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(group.to_string())
            .or_default() += count as u64;
        Ok(ids)
    }

    /// Publishes `jobs` on the JetStream `queue`; returns their stream
    /// sequences once the stream acknowledged each (a duplicate of a
    /// unique key gets the sequence of the job already there).
    ///
    /// # Errors
    /// 503 when the server cannot be reached or the stream does not take
    /// a job (the jobs before it were added: the message says how many).
    async fn publish(
        &self,
        queue: &JetStreamQueue,
        jobs: &[StreamJob],
    ) -> Result<Vec<u64>, ApiError> {
        let unavailable = |why: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why);
        // A client per stream, made again when a reload changed the
        // queue's settings (servers, credentials, TLS); connected without
        // the lock, so that a server slow to answer holds no other stream.
        let known = self
            .streams
            .lock()
            .await
            .get(&queue.stream)
            .filter(|(settings, _)| settings == queue)
            .map(|(_, client)| client.clone());
        let client = match known {
            Some(client) => client,
            None => {
                let client = nats::connect(queue, "taskherd http").await.map_err(|err| {
                    unavailable(format!("no job was added: {}", error_chain(&err)))
                })?;
                self.streams
                    .lock()
                    .await
                    .insert(queue.stream.clone(), (queue.clone(), client.clone()));
                client
            }
        };
        let publications: Vec<producer::Publication<'_>> = jobs
            .iter()
            .map(|(job, not_before, unique)| {
                producer::Publication::new(job, *not_before, unique.as_deref())
            })
            .collect();
        let published = producer::publish(&client, queue, publications)
            .await
            .map_err(|err| {
                tracing::error!(stream = %queue.stream, cause = %error_chain(&err), "cannot publish jobs posted over HTTP");
                unavailable(format!(
                    "{} (the jobs before the one refused may have been added)",
                    error_chain(&err)
                ))
            })?;
        Ok(published.iter().map(|job| job.sequence).collect())
    }

    /// Adds `count` jobs (`lines`) to the file queue at `path`; returns
    /// the first one's id once they are synced.
    async fn add_to_file(
        &self,
        path: PathBuf,
        lines: Vec<u8>,
        count: u64,
    ) -> Result<u64, ApiError> {
        let intake = {
            let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
            files
                .entry(path.clone())
                .or_insert_with(|| {
                    let (batches_tx, batches_rx) = mpsc::channel(INTAKE_WAITING);
                    tokio::spawn(file_intake(path.clone(), batches_rx));
                    batches_tx
                })
                .clone()
        };
        let (done_tx, done_rx) = oneshot::channel();
        let batch = Batch {
            lines,
            count,
            done: done_tx,
        };
        let busy = || {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the intake of {} is busy: try again later", path.display()),
            )
        };
        match tokio::time::timeout(INTAKE_WAIT, intake.send(batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Err(busy()),
        }
        match done_rx.await {
            Ok(Ok(first)) => Ok(first),
            Ok(Err(why)) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("no job was added: {why}"),
            )),
            Err(_) => Err(busy()),
        }
    }
}

/// The intake of the file queue at `path`: appends the jobs of every
/// waiting request in one write and one sync, then answers them.
async fn file_intake(path: PathBuf, mut batches_rx: mpsc::Receiver<Batch>) {
    while let Some(first) = batches_rx.recv().await {
        let mut bytes = first.lines.len();
        let mut batches = vec![first];
        while bytes < COMMIT_BYTES {
            match batches_rx.try_recv() {
                Ok(batch) => {
                    bytes += batch.lines.len();
                    batches.push(batch);
                }
                Err(_) => break,
            }
        }
        let mut lines = Vec::with_capacity(bytes);
        for batch in &batches {
            lines.extend_from_slice(&batch.lines);
        }
        let file = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::queue::durable::inbox::append(&file, &lines)
        })
        .await;
        let result = match written {
            Ok(Ok(ids)) => Ok(ids.start),
            Ok(Err(err)) => Err(error_chain(&err)),
            Err(err) => Err(format!("the writer failed: {err}")),
        };
        if let Err(why) = &result {
            tracing::error!(path = %path.display(), cause = %why, "cannot add jobs posted over HTTP");
        }
        // The requests' jobs were written in their order: each gets its
        // slice of the ids.
        let mut next = result.clone();
        for batch in batches {
            let _ = batch.done.send(next.clone());
            if let Ok(first) = &mut next {
                *first += batch.count;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(body: &str) -> Result<Vec<String>, (u16, String)> {
        parse_jobs(body.as_bytes())
            .map(|(lines, count)| {
                let lines: Vec<String> = String::from_utf8(lines)
                    .expect("utf-8")
                    .lines()
                    .map(str::to_string)
                    .collect();
                assert_eq!(lines.len(), count);
                lines
            })
            .map_err(|err| (err.status.as_u16(), err.message))
    }

    #[test]
    fn a_body_is_one_job_or_an_array_of_jobs() {
        assert_eq!(
            lines(r#"{"file": "a.png"}"#),
            Ok(vec![r#"{"file": "a.png"}"#.into()])
        );
        assert_eq!(lines("\"text\""), Ok(vec!["\"text\"".into()]));
        assert_eq!(
            lines("[1, {\n  \"b\": 2\n}, [3]]"),
            Ok(vec!["1".into(), r#"{"b":2}"#.into(), "[3]".into()])
        );
        // Options as `taskherd queue add` takes them; a delay becomes a time.
        let job = lines(r#"{"job": {"n": 1}, "options": {"priority": 5, "unique": "k"}}"#)
            .expect("envelope");
        assert_eq!(
            job,
            vec![r#"{"job":{"n": 1},"options":{"priority":5,"unique":"k"}}"#]
        );
        let delayed = lines(r#"[{"job": 1, "options": {"delay": "1h"}}]"#).expect("delay");
        assert!(delayed[0].contains("\"at\":"), "{delayed:?}");

        let (status, message) = lines("{\"a\": ").expect_err("truncated");
        assert_eq!(status, 400);
        assert!(message.starts_with("the body is not JSON"), "{message}");
        assert_eq!(lines("  ").expect_err("empty").0, 400);
        assert_eq!(lines("[]").expect_err("no job").1, "the array holds no job");
        let (status, message) =
            lines(r#"[1, {"job": 2, "options": {"priority": "high"}}]"#).expect_err("options");
        assert_eq!(status, 400);
        assert!(
            message.starts_with("job 2: option \"priority\""),
            "{message}"
        );
    }

    #[test]
    fn jetstream_jobs_keep_a_start_time_and_a_unique_key_only() {
        let jobs =
            jetstream_jobs(br#"[1, {"job": {"n": 2}, "options": {"delay": "1h", "unique": "k"}}]"#)
                .expect("jobs");
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (jobs[0].0.get(), jobs[0].1, jobs[0].2.as_deref()),
            ("1", None, None)
        );
        assert_eq!(jobs[1].0.get(), r#"{"n": 2}"#);
        let later = jobs[1].1.expect("a start time");
        assert!(
            later > SystemTime::now() + Duration::from_secs(3500),
            "{later:?}"
        );
        assert_eq!(jobs[1].2.as_deref(), Some("k"));
        let err =
            jetstream_jobs(br#"[{"job": 1, "options": {"retry": ["1s"]}}]"#).expect_err("refused");
        assert_eq!(err.status.as_u16(), 400);
        assert!(
            err.message.starts_with("job 1: option \"retry\""),
            "{}",
            err.message
        );
    }

    #[test]
    fn only_groups_whose_queue_the_master_reaches_take_jobs() {
        let config = Config::parse(
            r#"
[[group]]
name = "plain"
command = "sleep"
[group.local]
instances = 1

[[group]]
name = "files"
command = "cat"
[group.feeder]
file = "q/jobs.queue"
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "lines"
command = "cat"
[group.feeder]
jsonl = "jobs.jsonl"
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "program"
command = "./my-feeder"
[group.feeder]
[group.local]
instances = 1

[[group]]
name = "stream"
command = "cat"
[group.queue]
backend = "nats"
[group.local]
instances = 1
"#,
            "/etc/herd/herd.toml".as_ref(),
        )
        .expect("valid config");
        assert_eq!(
            target_of(&config, "files").expect("file queue"),
            JobTarget::File("/etc/herd/q/jobs.queue".into())
        );
        match target_of(&config, "stream").expect("JetStream") {
            JobTarget::JetStream(queue) => {
                assert_eq!(
                    (queue.stream.as_str(), queue.subject.as_str()),
                    ("TASKHERD_STREAM", "taskherd.stream.jobs")
                );
            }
            other => panic!("{other:?}"),
        }
        let refused = |group| {
            let err = target_of(&config, group).expect_err("refused");
            (err.status.as_u16(), err.message)
        };
        assert_eq!(refused("nope"), (404, "no group named \"nope\"".into()));
        assert_eq!(
            refused("plain"),
            (
                409,
                "group plain takes no jobs over HTTP: it is not a queue group".into()
            )
        );
        assert!(refused("lines").1.contains("JSON-lines file jobs.jsonl"));
        assert!(refused("program")
            .1
            .contains("its feeder is a program (./my-feeder)"));
    }
}
