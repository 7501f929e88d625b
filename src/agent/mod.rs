//! The agent: the remote side of a host placement.
//!
//! The master starts `taskherd agent` on each remote host over its one SSH
//! connection. The agent is local spawning plus an upstream link: it runs
//! every instance the master hands it with the same supervision code as
//! the master's local instances ([`crate::supervise::instance::supervise`]),
//! and relays their log lines and final reports over its stdout, in the
//! frames of [`crate::protocol::agent`].
//!
//! It never outlives the master: stdin closing (the master or its SSH
//! connection died) or no heartbeat within the orphan timeout (a network
//! partition) stops every instance, with the usual grace, and the agent
//! exits. Its instances have the agent as parent, so if the agent itself is
//! killed, plain programs get their parent-death signal and library
//! instances see their control channel close.

use crate::log::{LogRecord, LogSink};
use crate::pidkiller::{default_state_file, PidKiller};
use crate::protocol::agent::{FromAgent, ToAgent};
use crate::protocol::millis;
use crate::protocol::{Connection, ProtocolError, PROTOCOL_VERSION};
use crate::supervise::instance::{self, InstanceReport};
use crate::supervise::shutdown::Shutdown;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Longest wait for the master's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors that end an agent before it could serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The link to the master failed during the handshake.
    #[error("handshake with the master failed")]
    Handshake(#[source] ProtocolError),
    /// The master did not say hello in time, or closed the link first.
    #[error("no hello from the master")]
    NoHello,
    /// The first frame was not a hello.
    #[error("the master's first frame is not a hello")]
    UnexpectedFirstFrame,
    /// Master and agent are different versions.
    #[error("protocol version mismatch: agent speaks {ours}, master speaks {theirs}")]
    VersionMismatch {
        /// Ours.
        ours: u32,
        /// The master's.
        theirs: u32,
    },
}

/// Serves one master over `reader`/`writer` (stdin/stdout under SSH) until
/// it says stop, goes away, or falls silent; returns once every instance
/// has ended and been reported.
///
/// `shutdown` lets the caller stop the agent too (the binary wires it to
/// SIGTERM, SIGINT and SIGHUP); `pids` registers every instance process so
/// that the next agent on the host reaps them if this one dies.
///
/// # Errors
/// Only handshake failures; everything after it is reported upstream.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    shutdown: Shutdown,
    pids: Option<PidKiller>,
) -> Result<(), AgentError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut upstream_rx = Connection::new(tokio::io::join(reader, tokio::io::empty()));
    let hello = tokio::time::timeout(HELLO_TIMEOUT, upstream_rx.read_frame::<ToAgent>())
        .await
        .map_err(|_| AgentError::NoHello)?
        .map_err(AgentError::Handshake)?;
    let (heartbeat, orphan_timeout) = match hello {
        Some(ToAgent::Hello {
            version,
            heartbeat,
            orphan_timeout,
        }) => {
            if version != PROTOCOL_VERSION {
                return Err(AgentError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            (heartbeat, orphan_timeout)
        }
        Some(_) => return Err(AgentError::UnexpectedFirstFrame),
        None => return Err(AgentError::NoHello),
    };

    // Reports and heartbeats go through an unbounded queue so the loop
    // below never blocks on a slow or partitioned link (they are few);
    // log lines go through the sink's bounded queue, with backpressure.
    // An instance's lines are all in that queue before its report exists,
    // and the writer empties it before writing a report: the master never
    // sees a report before the lines that precede it.
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (sink, records_rx) = LogSink::channel();
    let writer_task = tokio::spawn(write_upstream(writer, control_rx, records_rx));
    let _ = control_tx.send(FromAgent::Hello {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
    });

    let mut tasks: JoinSet<InstanceReport> = JoinSet::new();
    let mut commands = std::collections::HashMap::new();
    // Instance events go upstream from this loop, each instance's before
    // its report (the master stops reading a host once all are reported).
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut master_gone = false;
    loop {
        if shutdown.is_stopping() && tasks.is_empty() {
            break;
        }
        tokio::select! {
            frame = upstream_rx.read_frame::<ToAgent>(), if !master_gone => {
                last_heard = Instant::now();
                match frame {
                    Ok(Some(ToAgent::Start { instances })) => {
                        for spec in instances {
                            let context = instance::Supervision {
                                sink: sink.clone(),
                                shutdown: shutdown.clone(),
                                pids: pids.clone(),
                                events: Some(events_tx.clone()),
                            };
                            let listening = is_feeder(&spec)
                                .then(|| relay_listening(spec.label.id, control_tx.clone()));
                            let (command_tx, command_rx) = mpsc::unbounded_channel();
                            commands.insert(spec.label.id, command_tx);
                            // Suspended instances are held by the master, not started.
                            tasks.spawn(instance::supervise(spec, context, listening, command_rx, false));
                        }
                    }
                    Ok(Some(ToAgent::Stop { reason })) => shutdown.request_stop(reason),
                    Ok(Some(ToAgent::Kill)) => shutdown.kill_now("the master asked to kill"),
                    Ok(Some(ToAgent::Command { id, command })) => {
                        if let Some(command_tx) = commands.get(&id) {
                            let _ = command_tx.send(command);
                        }
                    }
                    Ok(Some(ToAgent::Heartbeat | ToAgent::Hello { .. })) => {}
                    Ok(None) => {
                        master_gone = true;
                        shutdown.request_stop("the master is gone (its link closed)");
                    }
                    Err(err) => {
                        tracing::error!(cause = %err, "link to the master broken");
                        master_gone = true;
                        shutdown.request_stop(format!("the link to the master broke: {err}"));
                    }
                }
            }
            _ = tokio::time::sleep_until(last_heard + orphan_timeout), if !master_gone => {
                master_gone = true;
                shutdown.request_stop(format!(
                    "no word from the master for {}",
                    humantime::format_duration(orphan_timeout)
                ));
            }
            _ = ticker.tick() => {
                let _ = control_tx.send(FromAgent::Heartbeat);
            }
            Some(event) = events_rx.recv() => {
                let _ = control_tx.send(FromAgent::Event(event));
            }
            Some(joined) = tasks.join_next() => {
                // The instance's events were all sent before its report.
                while let Ok(event) = events_rx.try_recv() {
                    let _ = control_tx.send(FromAgent::Event(event));
                }
                if let Ok(report) = joined {
                    commands.remove(&report.label.id);
                    let _ = control_tx.send(FromAgent::Ended { id: report.label.id, end: report.end });
                }
            }
            _ = shutdown.stopping() , if tasks.is_empty() => {}
        }
    }
    drop(sink);
    drop(events_tx);
    drop(control_tx);
    // Bounded: a partitioned link must not keep the agent alive.
    let _ = tokio::time::timeout(orphan_timeout, writer_task).await;
    Ok(())
}

fn is_feeder(spec: &crate::supervise::instance::InstanceSpec) -> bool {
    matches!(
        spec.identity.queue,
        Some(crate::protocol::slave::QueueRole::Feeder { .. })
    )
}

/// A feeder's listening watch whose every address goes upstream, so that
/// the master can start the feeder's consumers.
fn relay_listening(
    id: u32,
    control_tx: mpsc::UnboundedSender<FromAgent>,
) -> tokio::sync::watch::Sender<Option<String>> {
    let (listening_tx, mut listening_rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        while listening_rx.changed().await.is_ok() {
            let listened = listening_rx.borrow_and_update().clone();
            if let Some(addr) = listened {
                if control_tx.send(FromAgent::Listening { id, addr }).is_err() {
                    return;
                }
            }
        }
    });
    listening_tx
}

/// Most frames written to the master in one write: what is queued when
/// the link is free goes out together (many lines that came at once cost
/// the master one read and the SSH link one packet), and a long backlog
/// still goes out in pieces.
const MAX_FRAMES_PER_WRITE: usize = 256;

/// Writes heartbeats first, reports after the log lines queued before
/// them, and log lines, to the master; whatever is queued at once in one
/// write.
async fn write_upstream<W: AsyncWrite + Unpin>(
    writer: W,
    mut control_rx: mpsc::UnboundedReceiver<FromAgent>,
    mut records_rx: mpsc::Receiver<LogRecord>,
) {
    let mut link = Connection::new(tokio::io::join(tokio::io::empty(), writer));
    let mut records_open = true;
    loop {
        let first = tokio::select! {
            biased;
            frame = control_rx.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            record = records_rx.recv(), if records_open => match record {
                Some(record) => log_frame(record),
                None => {
                    records_open = false;
                    continue;
                }
            },
        };
        let mut next = Some(first);
        let mut written = 0;
        while let Some(frame) = next.take() {
            if matches!(frame, FromAgent::Ended { .. }) {
                while let Ok(record) = records_rx.try_recv() {
                    if link.feed_frame(&log_frame(record)).await.is_err() {
                        return;
                    }
                }
            }
            if link.feed_frame(&frame).await.is_err() {
                // The master is gone; the main loop finds out by itself.
                return;
            }
            written += 1;
            if written >= MAX_FRAMES_PER_WRITE {
                break;
            }
            // The same order as the select above: control frames first.
            next = match control_rx.try_recv() {
                Ok(frame) => Some(frame),
                Err(_) => records_rx.try_recv().ok().map(log_frame),
            };
        }
        if link.flush().await.is_err() {
            return;
        }
    }
    // The control queue closes last: flush the log lines still queued.
    while let Ok(record) = records_rx.try_recv() {
        if link.feed_frame(&log_frame(record)).await.is_err() {
            return;
        }
    }
    let _ = link.flush().await;
}

fn log_frame(record: LogRecord) -> FromAgent {
    let time_ms = millis::since_epoch(record.time);
    FromAgent::Log {
        id: record.instance.as_ref().map(|label| label.id),
        time_ms,
        level: record.level,
        stream: record.stream,
        message: record.message.into_string(),
    }
}

/// Entry point of `taskherd agent`: serves the master on stdin/stdout.
///
/// # Errors
/// If the runtime cannot start or the handshake fails.
pub fn run_stdio() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // The watchdog by fork, while this process has one thread: no second
    // exec of the executable on the host (if it fails, the first
    // registration starts one the usual way).
    let state_file = default_state_file();
    if let Err(err) = crate::supervise::watchdog::fork_early(&state_file) {
        tracing::warn!("cannot fork the watchdog ({err}): starting it as a program");
    }
    // One thread: the agent relays and supervises, the work is its
    // instances' (no worker thread per core of the host to start).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("taskherd-agent")
        .build()?;
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = runtime.block_on(async {
        let shutdown = Shutdown::new();
        watch_agent_signals(shutdown.clone())?;
        // The agent's own log lines reach the master only once serving;
        // reaped leftovers are reported on stderr, which the master relays.
        let (sink, mut records_rx) = LogSink::channel();
        let pids = crate::supervise::open_pid_killer(state_file, &sink).await;
        drop(sink);
        while let Some(record) = records_rx.recv().await {
            tracing::warn!("{}", record.message);
        }
        let (reader, writer) = stdio_link();
        serve(reader, writer, shutdown, pids).await?;
        Ok(())
    });
    // Stdin that is not a pipe is read on a blocking thread that a pending
    // read keeps busy; do not wait for a master that may never write again.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

/// The agent's end of its link: stdin and stdout.
type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// See [`Reader`].
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// Stdin and stdout as the link to the master. Under SSH they are pipes:
/// read and written on the runtime's own thread (non-blocking), not by
/// tokio's `stdin()`/`stdout()`, which do every read and write on a
/// blocking thread (a thread to start, and a hand-over per frame). Other
/// kinds of stdio (a socket, a terminal, a file) go the blocking way.
fn stdio_link() -> (Reader, Writer) {
    use std::os::fd::AsFd;
    use tokio::net::unix::pipe;
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().ok();
    let reader: Reader = match stdin.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok()) {
        Some(pipe) => Box::new(pipe),
        None => Box::new(tokio::io::stdin()),
    };
    let stdout = std::io::stdout().as_fd().try_clone_to_owned().ok();
    let writer: Writer = match stdout.and_then(|fd| pipe::Sender::from_owned_fd(fd).ok()) {
        Some(pipe) => Box::new(pipe),
        None => Box::new(tokio::io::stdout()),
    };
    (reader, writer)
}

fn watch_agent_signals(shutdown: Shutdown) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup())?;
    let shutdown_on_hup = shutdown.clone();
    tokio::spawn(async move {
        hangup.recv().await;
        shutdown_on_hup.request_stop("SIGHUP received");
    });
    crate::supervise::shutdown::stop_on_signals(shutdown).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::supervise::instance::{InstanceEnd, InstanceSpec};

    fn spec(id: u32, script: &str) -> InstanceSpec {
        InstanceSpec::shell("g", "h", id, 2, script)
    }

    /// Plays the master over in-memory pipes.
    struct FakeMaster {
        to_agent: Connection<tokio::io::DuplexStream>,
        agent: tokio::task::JoinHandle<Result<(), AgentError>>,
    }

    async fn start(orphan_timeout: Duration) -> FakeMaster {
        let (master_end, agent_end) = tokio::io::duplex(1 << 16);
        let (agent_rx, agent_tx) = tokio::io::split(agent_end);
        let agent = tokio::spawn(serve(agent_rx, agent_tx, Shutdown::new(), None));
        let mut to_agent = Connection::new(master_end);
        to_agent
            .write_frame(&ToAgent::Hello {
                version: PROTOCOL_VERSION,
                heartbeat: Duration::from_millis(100),
                orphan_timeout,
            })
            .await
            .unwrap();
        match to_agent.read_frame::<FromAgent>().await.unwrap() {
            Some(FromAgent::Hello { version, .. }) => assert_eq!(version, PROTOCOL_VERSION),
            other => panic!("{other:?}"),
        }
        FakeMaster { to_agent, agent }
    }

    impl FakeMaster {
        /// Reads until `count` instances ended; returns log lines and ends.
        async fn collect(&mut self, count: usize) -> (Vec<String>, Vec<(u32, InstanceEnd)>) {
            let (mut logs, mut ends) = (Vec::new(), Vec::new());
            while ends.len() < count {
                match self.to_agent.read_frame::<FromAgent>().await.unwrap() {
                    Some(FromAgent::Log {
                        id: Some(id),
                        message,
                        ..
                    }) => logs.push(format!("{id}: {message}")),
                    Some(FromAgent::Ended { id, end }) => ends.push((id, end)),
                    Some(_) => {}
                    None => panic!("agent closed early; logs {logs:?}"),
                }
            }
            (logs, ends)
        }
    }

    #[tokio::test]
    async fn runs_instances_and_relays_lines_and_ends() {
        let mut master = start(Duration::from_secs(30)).await;
        master
            .to_agent
            .write_frame(&ToAgent::Start {
                instances: vec![spec(1, "echo one"), spec(2, "echo two; exit 3")],
            })
            .await
            .unwrap();
        let (logs, mut ends) = tokio::time::timeout(Duration::from_secs(20), master.collect(2))
            .await
            .unwrap();
        assert!(logs.contains(&"1: one".to_string()), "{logs:?}");
        assert!(logs.contains(&"2: two".to_string()), "{logs:?}");
        ends.sort_by_key(|(id, _)| *id);
        assert_eq!(ends[0], (1, InstanceEnd::Completed));
        assert!(
            matches!(&ends[1], (2, InstanceEnd::Failed { reason }) if reason.contains("code 3"))
        );
        master
            .to_agent
            .write_frame(&ToAgent::Stop {
                reason: "done".into(),
            })
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), master.agent)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn silent_master_makes_the_agent_stop_its_instances() {
        let mut master = start(Duration::from_millis(500)).await;
        master
            .to_agent
            .write_frame(&ToAgent::Start {
                instances: vec![spec(1, "echo up; exec sleep 60")],
            })
            .await
            .unwrap();
        // No heartbeat from us: within the orphan timeout the agent stops
        // the instance (SIGTERM for a plain program) and reports it.
        let (_, ends) = tokio::time::timeout(Duration::from_secs(20), master.collect(1))
            .await
            .unwrap();
        assert_eq!(ends, [(1, InstanceEnd::Stopped { killed: false })]);
        tokio::time::timeout(Duration::from_secs(20), master.agent)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn wrong_version_is_refused() {
        let (master_end, agent_end) = tokio::io::duplex(1 << 16);
        let (agent_rx, agent_tx) = tokio::io::split(agent_end);
        let agent = tokio::spawn(serve(agent_rx, agent_tx, Shutdown::new(), None));
        let mut to_agent = Connection::new(master_end);
        to_agent
            .write_frame(&ToAgent::Hello {
                version: PROTOCOL_VERSION + 1,
                heartbeat: Duration::from_secs(1),
                orphan_timeout: Duration::from_secs(10),
            })
            .await
            .unwrap();
        let err = agent.await.unwrap().unwrap_err();
        assert!(matches!(err, AgentError::VersionMismatch { .. }), "{err}");
    }
}
