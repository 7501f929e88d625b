//! Warnings about consumer connections the feeder server refused or
//! closed, rate-limited so that a flood of hostile connections cannot fill
//! the log.
//!
//! Each refused or closed connection (a failed handshake: closed at once,
//! garbage, an oversized frame, no hello in time, a wrong proof or
//! version; or a joined consumer dropped for a bad frame, a heartbeat
//! timeout or a failed write) is one warning naming the peer's address and
//! the reason:
//!
//! ```text
//! consumer refused conn=7 peer=10.0.0.9:51234 reason=authentication failed
//! closing consumer connection conn=3 peer=10.0.0.7:40112 reason=heartbeat timeout (3s)
//! ```
//!
//! At most [`WARNING_LIMIT`] of them are logged per [`WARNING_WINDOW`]; a
//! window opens with the first warning after the previous window ended.
//! The window's other warnings are counted, and summed up in one line when
//! the window is over (or when the server ends):
//!
//! ```text
//! suppressed 190 more refused or closed consumer connections (last from 10.0.0.9:52001: frame too big (limit 16777216 bytes))
//! ```
//!
//! Clean departures (Bye, end of stream after Drain) are not warnings and
//! never count here.
//!
//! [`WarningLimiter`] is the rule, pure and time-injected;
//! [`PeerWarnings`] is the task around it: connection tasks send it their
//! warning, it logs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// Warnings logged one by one per [`WARNING_WINDOW`].
pub(crate) const WARNING_LIMIT: u32 = 10;

/// The window of [`WARNING_LIMIT`].
pub(crate) const WARNING_WINDOW: Duration = Duration::from_secs(10);

/// Warnings waiting for the logging task before connection tasks wait.
const WARNING_QUEUE: usize = 256;

/// Longest reason logged, in bytes (the reason may quote the peer's bytes).
const MAX_REASON_LEN: usize = 300;

/// How a connection ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The handshake failed: the peer never joined.
    Refused,
    /// A joined consumer's connection was closed by the server.
    Closed,
}

/// One refused or closed connection, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerWarning {
    /// The server's number of the connection.
    conn: u64,
    /// Who it was.
    peer: SocketAddr,
    /// Refused or closed.
    ending: Ending,
    /// Why, on one line.
    reason: String,
}

/// What a window of warnings left unsaid: logged once the window is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Warnings of the window not logged one by one.
    pub(crate) suppressed: u64,
    /// The peer of the last of them.
    pub(crate) last_peer: SocketAddr,
    /// The reason of the last of them.
    pub(crate) last_reason: String,
}

/// What to do with one warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The summary of a window that ended before this warning: log it
    /// first.
    pub(crate) summary: Option<Summary>,
    /// Whether to log this warning itself.
    pub(crate) log: bool,
}

/// The rate limit of the warnings, without I/O: every method takes `now`.
///
/// Up to `limit` warnings per window are logged; the others are counted
/// and given back as one [`Summary`] by [`flush`](Self::flush) once the
/// window is over (or by [`note`](Self::note) for the next warning, or by
/// [`finish`](Self::finish) at the end).
#[derive(Debug)]
pub(crate) struct WarningLimiter {
    /// Warnings logged per window.
    limit: u32,
    /// Length of a window.
    window: Duration,
    /// End of the current window; `None` when no window is open.
    window_end: Option<Instant>,
    /// Warnings logged in the current window.
    logged: u32,
    /// Warnings not logged in the current window.
    suppressed: u64,
    /// Peer and reason of the last warning not logged.
    last: Option<(SocketAddr, String)>,
}

impl WarningLimiter {
    /// A limiter of `limit` warnings per `window`.
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        WarningLimiter {
            limit,
            window,
            window_end: None,
            logged: 0,
            suppressed: 0,
            last: None,
        }
    }

    /// One more warning, from `peer` for `reason`, at `now`.
    pub(crate) fn note(&mut self, peer: SocketAddr, reason: &str, now: Instant) -> Verdict {
        let summary = self.flush(now);
        if self.window_end.is_none() {
            self.window_end = Some(now.checked_add(self.window).unwrap_or(now));
        }
        let log = self.logged < self.limit;
        if log {
            self.logged += 1;
        } else {
            self.suppressed += 1;
            self.last = Some((peer, reason.to_string()));
        }
        Verdict { summary, log }
    }

    /// When [`flush`](Self::flush) will have a summary to give: the end of
    /// the window, if it suppressed anything.
    pub(crate) fn flush_at(&self) -> Option<Instant> {
        self.window_end.filter(|_| self.suppressed > 0)
    }

    /// Closes the window if it is over at `now`, with its summary if it
    /// suppressed anything.
    pub(crate) fn flush(&mut self, now: Instant) -> Option<Summary> {
        match self.window_end {
            Some(end) if now >= end => self.finish(),
            _ => None,
        }
    }

    /// Closes the window now (the server ends), with its summary if it
    /// suppressed anything.
    pub(crate) fn finish(&mut self) -> Option<Summary> {
        self.window_end = None;
        self.logged = 0;
        let suppressed = std::mem::take(&mut self.suppressed);
        let (last_peer, last_reason) = self.last.take()?;
        (suppressed > 0).then_some(Summary {
            suppressed,
            last_peer,
            last_reason,
        })
    }
}

/// The sending side of the task that logs the warnings; each connection
/// task has a clone.
#[derive(Debug, Clone)]
pub(crate) struct PeerWarnings {
    /// To the logging task.
    warnings_tx: mpsc::Sender<PeerWarning>,
}

impl PeerWarnings {
    /// Starts the logging task on `tracker`, with [`WARNING_LIMIT`] per
    /// [`WARNING_WINDOW`]. The task ends once every clone of the returned
    /// handle is dropped, after logging what its window left unsaid.
    pub(crate) fn spawn(tracker: &TaskTracker) -> Self {
        Self::spawn_with(tracker, WarningLimiter::new(WARNING_LIMIT, WARNING_WINDOW))
    }

    fn spawn_with(tracker: &TaskTracker, limiter: WarningLimiter) -> Self {
        let (warnings_tx, warnings_rx) = mpsc::channel(WARNING_QUEUE);
        tracker.spawn(log_warnings(warnings_rx, limiter));
        PeerWarnings { warnings_tx }
    }

    /// The handshake with `peer` failed, for `reason`.
    pub(crate) async fn refused(&self, conn: u64, peer: SocketAddr, reason: &str) {
        self.send(PeerWarning::new(conn, peer, Ending::Refused, reason))
            .await;
    }

    /// The server closed the connection of the joined consumer at `peer`,
    /// for `reason`.
    pub(crate) async fn closed(&self, conn: u64, peer: SocketAddr, reason: &str) {
        self.send(PeerWarning::new(conn, peer, Ending::Closed, reason))
            .await;
    }

    async fn send(&self, warning: PeerWarning) {
        if let Err(mpsc::error::SendError(warning)) = self.warnings_tx.send(warning).await {
            // The task is gone (the runtime is shutting down): one line
            // more cannot flood anything.
            log_warning(&warning);
        }
    }
}

impl PeerWarning {
    fn new(conn: u64, peer: SocketAddr, ending: Ending, reason: &str) -> Self {
        PeerWarning {
            conn,
            peer,
            ending,
            reason: one_line(reason, MAX_REASON_LEN),
        }
    }
}

/// `text` with control characters escaped (a line break from the peer
/// must not start a line of its own in the log), cut at `max` bytes.
fn one_line(text: &str, max: usize) -> String {
    let mut line = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let escaped: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if line.len() + escaped.len() > max {
            line.push('…');
            break;
        }
        line.push_str(&escaped);
    }
    line
}

/// Logs the warnings it receives, as [`WarningLimiter`] says, until every
/// sender is gone.
async fn log_warnings(mut warnings_rx: mpsc::Receiver<PeerWarning>, mut limiter: WarningLimiter) {
    loop {
        let flush_at = limiter.flush_at();
        let window_over = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            warning = warnings_rx.recv() => {
                let Some(warning) = warning else { break };
                let now = tokio::time::Instant::now().into_std();
                let verdict = limiter.note(warning.peer, &warning.reason, now);
                if let Some(summary) = verdict.summary {
                    log_summary(&summary);
                }
                if verdict.log {
                    log_warning(&warning);
                }
            }
            () = window_over => {
                if let Some(summary) = limiter.flush(tokio::time::Instant::now().into_std()) {
                    log_summary(&summary);
                }
            }
        }
    }
    if let Some(summary) = limiter.finish() {
        log_summary(&summary);
    }
}

fn log_warning(warning: &PeerWarning) {
    let PeerWarning {
        conn,
        peer,
        ending,
        reason,
    } = warning;
    match ending {
        Ending::Refused => warn!(conn, %peer, %reason, "consumer refused"),
        Ending::Closed => warn!(conn, %peer, %reason, "closing consumer connection"),
    }
}

fn log_summary(summary: &Summary) {
    warn!(
        "suppressed {} more refused or closed consumer connections (last from {}: {})",
        summary.suppressed, summary.last_peer, summary.last_reason
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::queue::{proof, ToConsumer, ToFeeder};
    use crate::protocol::slave::QueueSettings;
    use crate::protocol::{Connection, PROTOCOL_VERSION};
    use crate::queue::server::FeederServer;
    use crate::queue::{Feeder, Next};
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;
    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, SubscriberExt as _};

    /// Bound on every wait that should succeed.
    const WAIT: Duration = Duration::from_secs(10);

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn the_limit_then_one_summary_when_the_window_is_over() {
        let t0 = Instant::now();
        let mut limiter = WarningLimiter::new(3, s(10));
        assert_eq!(limiter.flush_at(), None);
        for port in 1..=3 {
            let verdict = limiter.note(peer(port), "garbage", t0 + s(1));
            assert_eq!(
                verdict,
                Verdict {
                    summary: None,
                    log: true
                }
            );
        }
        assert_eq!(limiter.flush_at(), None, "nothing suppressed yet");
        for port in 4..=9 {
            assert!(
                !limiter
                    .note(peer(port), &format!("reason {port}"), t0 + s(2))
                    .log
            );
        }
        // The window opened with the first warning, at t0 + 1 s.
        assert_eq!(limiter.flush_at(), Some(t0 + s(11)));
        assert_eq!(limiter.flush(t0 + s(10)), None, "not over yet");
        assert_eq!(
            limiter.flush(t0 + s(11)),
            Some(Summary {
                suppressed: 6,
                last_peer: peer(9),
                last_reason: "reason 9".into()
            })
        );
        assert_eq!(limiter.flush_at(), None);
        assert_eq!(limiter.flush(t0 + s(30)), None, "said once");
        // A new window: logged again.
        assert!(limiter.note(peer(10), "late", t0 + s(40)).log);
        assert_eq!(limiter.finish(), None, "nothing suppressed");
    }

    #[test]
    fn a_window_not_flushed_is_summed_up_before_the_next_warning() {
        let t0 = Instant::now();
        let mut limiter = WarningLimiter::new(1, s(10));
        assert!(limiter.note(peer(1), "a", t0).log);
        assert!(!limiter.note(peer(2), "b", t0 + s(9)).log);
        let verdict = limiter.note(peer(3), "c", t0 + s(10));
        assert_eq!(
            verdict,
            Verdict {
                summary: Some(Summary {
                    suppressed: 1,
                    last_peer: peer(2),
                    last_reason: "b".into()
                }),
                log: true
            }
        );
        // The new window opened at t0 + 10 s.
        assert!(!limiter.note(peer(4), "d", t0 + s(19)).log);
        assert_eq!(limiter.flush_at(), Some(t0 + s(20)));
    }

    #[test]
    fn a_flood_logs_the_limit_per_window_and_counts_every_one() {
        let t0 = Instant::now();
        let mut limiter = WarningLimiter::new(10, s(10));
        let mut logged = 0;
        let mut summed = 0;
        // 1000 warnings over 25 s, 40 per second.
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(i * 25);
            if let Some(summary) = limiter.flush(now) {
                summed += summary.suppressed;
            }
            let verdict = limiter.note(peer(1), "x", now);
            summed += verdict.summary.map_or(0, |summary| summary.suppressed);
            logged += u64::from(verdict.log);
        }
        summed += limiter.finish().map_or(0, |summary| summary.suppressed);
        assert_eq!(logged, 30, "three windows of ten");
        assert_eq!(logged + summed, 1000, "every warning accounted once");
    }

    #[test]
    fn finish_sums_up_the_open_window() {
        let t0 = Instant::now();
        let mut limiter = WarningLimiter::new(0, s(10));
        assert!(!limiter.note(peer(1), "a", t0).log);
        assert_eq!(limiter.finish().map(|summary| summary.suppressed), Some(1));
        assert_eq!(limiter.finish(), None);
    }

    #[test]
    fn reasons_stay_on_one_line_and_short() {
        assert_eq!(one_line("corrupt\nframe\x00", 100), "corrupt\\nframe\\u{0}");
        assert_eq!(one_line("abcdef", 4), "abcd…");
        assert_eq!(one_line("ééé", 5), "éé…");
    }

    // -- The task and the server, with the events captured ------------------

    /// Every event as `LEVEL message key=value ...`.
    struct Capture {
        lines_tx: mpsc::UnboundedSender<String>,
    }

    #[derive(Default)]
    struct Line(String);

    impl Visit for Line {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            use std::fmt::Write as _;
            if field.name() == "message" {
                let _ = write!(self.0, " {value:?}");
            } else {
                let _ = write!(self.0, " {}={value:?}", field.name());
            }
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
            let mut line = Line(event.metadata().level().to_string());
            event.record(&mut line);
            let _ = self.lines_tx.send(line.0);
        }
    }

    /// The captured lines, and those seen so far.
    struct Lines {
        lines_rx: mpsc::UnboundedReceiver<String>,
        seen: Vec<String>,
    }

    impl Lines {
        /// Waits (bounded) for a line with every one of `needles`.
        async fn wait_for(&mut self, needles: &[&str]) -> String {
            let matches = |line: &String| needles.iter().all(|needle| line.contains(needle));
            if let Some(line) = self.seen.iter().find(|line| matches(line)) {
                return line.clone();
            }
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                match tokio::time::timeout_at(deadline, self.lines_rx.recv()).await {
                    Ok(Some(line)) => {
                        self.seen.push(line.clone());
                        if matches(&line) {
                            return line;
                        }
                    }
                    Ok(None) => panic!("the events ended"),
                    Err(_) => panic!("no line with {needles:?}; seen: {:#?}", self.seen),
                }
            }
        }

        /// Every line so far, once nothing more comes.
        fn all(&mut self) -> &[String] {
            while let Ok(line) = self.lines_rx.try_recv() {
                self.seen.push(line);
            }
            &self.seen
        }

        /// The warnings so far.
        fn warnings(&mut self) -> Vec<String> {
            let all = self.all();
            all.iter()
                .filter(|l| l.starts_with("WARN"))
                .cloned()
                .collect()
        }
    }

    /// Captures the events of this thread (the tests run on a
    /// current-thread runtime, so of every task) until the guard drops.
    fn capture() -> (tracing::subscriber::DefaultGuard, Lines) {
        let (lines_tx, lines_rx) = mpsc::unbounded_channel();
        let subscriber = tracing_subscriber::registry().with(Capture { lines_tx });
        let lines = Lines {
            lines_rx,
            seen: Vec::new(),
        };
        (tracing::subscriber::set_default(subscriber), lines)
    }

    #[tokio::test]
    async fn the_task_sums_up_a_window_once_it_is_over() {
        let (_guard, mut lines) = capture();
        let tracker = TaskTracker::new();
        let warnings =
            PeerWarnings::spawn_with(&tracker, WarningLimiter::new(2, Duration::from_millis(200)));
        for port in 1..=5 {
            warnings.refused(port.into(), peer(port), "garbage").await;
        }
        // Without any other warning nor the end of the server.
        let summary = lines.wait_for(&["suppressed"]).await;
        assert!(
            summary.contains(&format!(
                "suppressed 3 more refused or closed consumer connections (last from {}: garbage)",
                peer(5)
            )),
            "{summary}"
        );
        drop(warnings);
        tracker.close();
        tokio::time::timeout(WAIT, tracker.wait())
            .await
            .expect("the task ends with its senders");
        let warnings = lines.warnings();
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        for port in 1..=2 {
            let about = format!("consumer refused conn={port} peer={}", peer(port));
            assert!(
                warnings[usize::from(port) - 1].contains(&about),
                "{warnings:#?}"
            );
        }
    }

    /// The numbers 1..=n.
    struct Numbers(u32);

    impl Feeder for Numbers {
        type Job = u32;
        fn next(&mut self) -> Next<u32> {
            if self.0 == 0 {
                return Next::Done;
            }
            self.0 -= 1;
            Next::Job(self.0)
        }
        fn success(&mut self, _job: u32) {}
        fn error(&mut self, _job: u32, _reason: &str) {}
    }

    const SECRET: &str = "s3cret";

    /// A server that never finishes by itself (its consumers take no job).
    async fn server(
        hello_timeout: Duration,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = QueueSettings {
            lease: s(30),
            max_attempts: 3,
            retry: Default::default(),
            rate: None,
            progress_every: Duration::ZERO,
            joblog: None,
        };
        let shutdown = CancellationToken::new();
        let server = FeederServer::new(Numbers(10), SECRET, settings).hello_timeout(hello_timeout);
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            server.run(listener, stop).await.unwrap();
        });
        (addr, shutdown, task)
    }

    async fn challenge(conn: &mut Connection<TcpStream>) -> String {
        match tokio::time::timeout(WAIT, conn.read_frame::<ToConsumer>()).await {
            Ok(Ok(Some(ToConsumer::Challenge { nonce, .. }))) => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    async fn connect(addr: SocketAddr) -> (Connection<TcpStream>, SocketAddr) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let local = stream.local_addr().unwrap();
        (Connection::new(stream), local)
    }

    /// Reads until the server closes; never a job.
    async fn wait_closed(mut conn: Connection<TcpStream>) {
        tokio::time::timeout(WAIT, async {
            while let Ok(Some(frame)) = conn.read_frame::<ToConsumer>().await {
                assert!(
                    !matches!(frame, ToConsumer::Job { .. }),
                    "{frame:?} for a stranger"
                );
            }
        })
        .await
        .expect("closed in time");
    }

    fn hello(version: u32, secret: &str, nonce: &str) -> ToFeeder {
        ToFeeder::Hello {
            version,
            name: "test".into(),
            proof: proof(secret, nonce),
            nonce: "abcd".into(),
            features: Vec::new(),
        }
    }

    #[tokio::test]
    async fn every_hostile_connection_is_one_warning_with_its_peer_and_reason() {
        let (_guard, mut lines) = capture();
        let (addr, shutdown, task) = server(Duration::from_millis(300)).await;
        let mut expected: Vec<(SocketAddr, &str, &str)> = Vec::new();

        // Closed at once: refused, how depends on timing.
        let (conn, at_once) = connect(addr).await;
        drop(conn);
        // Closed right after the challenge.
        let (mut conn, closed) = connect(addr).await;
        challenge(&mut conn).await;
        drop(conn);
        expected.push((
            closed,
            "consumer refused",
            "reason=connection closed before the hello",
        ));
        // Garbage in a frame (with a line break).
        let (mut conn, garbage) = connect(addr).await;
        challenge(&mut conn).await;
        let mut stream = conn.into_inner();
        stream
            .write_all(b"\x00\x00\x00\x05\x00\x01ab\n")
            .await
            .unwrap();
        wait_closed(Connection::new(stream)).await;
        expected.push((
            garbage,
            "consumer refused",
            "reason=corrupt frame: \\u{0}\\u{1}ab\\n",
        ));
        // An oversized length prefix.
        let (conn, huge) = connect(addr).await;
        let mut stream = conn.into_inner();
        stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        wait_closed(Connection::new(stream)).await;
        expected.push((huge, "consumer refused", "reason=frame too big"));
        // Idle past the hello timeout.
        let (conn, idle) = connect(addr).await;
        wait_closed(conn).await;
        expected.push((idle, "consumer refused", "reason=no hello within 300ms"));
        // A wrong proof.
        let (mut conn, wrong) = connect(addr).await;
        let nonce = challenge(&mut conn).await;
        conn.write_frame(&hello(PROTOCOL_VERSION, "guess", &nonce))
            .await
            .unwrap();
        wait_closed(conn).await;
        expected.push((wrong, "consumer refused", "reason=authentication failed"));
        // Another version.
        let (mut conn, version) = connect(addr).await;
        let nonce = challenge(&mut conn).await;
        conn.write_frame(&hello(PROTOCOL_VERSION + 1, SECRET, &nonce))
            .await
            .unwrap();
        wait_closed(conn).await;
        expected.push((
            version,
            "consumer refused",
            "reason=protocol version mismatch",
        ));
        // A consumer that joins, then sends garbage.
        let (mut conn, joined) = connect(addr).await;
        let nonce = challenge(&mut conn).await;
        conn.write_frame(&hello(PROTOCOL_VERSION, SECRET, &nonce))
            .await
            .unwrap();
        let mut stream = conn.into_inner();
        stream.write_all(b"\x00\x00\x00\x01x").await.unwrap();
        wait_closed(Connection::new(stream)).await;
        expected.push((
            joined,
            "closing consumer connection",
            "reason=bad frame or read error: corrupt frame: x",
        ));
        // A consumer that joins and says Bye: no warning.
        let (mut conn, polite) = connect(addr).await;
        let nonce = challenge(&mut conn).await;
        conn.write_frame(&hello(PROTOCOL_VERSION, SECRET, &nonce))
            .await
            .unwrap();
        conn.write_frame(&ToFeeder::Bye).await.unwrap();
        let left = lines
            .wait_for(&["consumer left", &format!("peer={polite}")])
            .await;
        assert!(left.starts_with("INFO"), "{left}");

        for (peer, message, reason) in &expected {
            let line = lines
                .wait_for(&[message, &format!("peer={peer}"), reason])
                .await;
            assert!(line.starts_with("WARN"), "{line}");
        }
        lines
            .wait_for(&["consumer refused", &format!("peer={at_once}")])
            .await;
        shutdown.cancel();
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        let warnings = lines.warnings();
        let peers = expected.iter().map(|(peer, _, _)| *peer);
        for peer in peers.chain([at_once]) {
            let about = format!("peer={peer}");
            let count = warnings.iter().filter(|l| l.contains(&about)).count();
            assert_eq!(count, 1, "{peer}: {warnings:#?}");
        }
        assert_eq!(warnings.len(), expected.len() + 1, "{warnings:#?}");
    }

    #[tokio::test]
    async fn a_flood_logs_the_limit_then_a_summary() {
        let (_guard, mut lines) = capture();
        let (addr, shutdown, task) = server(WAIT).await;
        let flood = 3 * WARNING_LIMIT;
        let mut last = None;
        for _ in 0..flood {
            let (conn, local) = connect(addr).await;
            let mut stream = conn.into_inner();
            stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            wait_closed(Connection::new(stream)).await;
            last = Some(local);
        }
        let last = last.expect("a flood");
        // The window (10 s) is not over: the end of the server sums it up.
        shutdown.cancel();
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        let warnings = lines.warnings();
        let limit = usize::try_from(WARNING_LIMIT).unwrap();
        assert_eq!(warnings.len(), limit + 1, "{warnings:#?}");
        assert!(warnings[..limit]
            .iter()
            .all(|l| l.contains("consumer refused") && l.contains("reason=frame too big")));
        let expected = format!(
            "suppressed {} more refused or closed consumer connections (last from {last}: frame too big",
            flood - WARNING_LIMIT
        );
        assert!(warnings[limit].contains(&expected), "{warnings:#?}");
    }
}
