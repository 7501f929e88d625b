//! The consumer against a feeder scripted by each test ([`FakeFeeder`],
//! also used by the slave library's tests), and against the real server.

use super::*;
use crate::protocol::queue::{proof, random_hex, verify, JobPayload, ToConsumer};
use crate::protocol::{Connection, PROTOCOL_VERSION};
use futures::FutureExt as _;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

pub(crate) const SECRET: &str = "s3cret";
/// Longest wait for anything in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// The feeder's end of a connection.
pub(crate) type FeederConn = Connection<TcpStream>;

/// A feeder on 127.0.0.1 scripted by the test.
pub(crate) struct FakeFeeder {
    listener: TcpListener,
    secret: String,
}

impl FakeFeeder {
    pub(crate) async fn bind(secret: &str) -> (FakeFeeder, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let feeder = FakeFeeder {
            listener,
            secret: secret.to_string(),
        };
        (feeder, addr)
    }

    /// The next connection, before any handshake.
    pub(crate) async fn accept_raw(&self) -> FeederConn {
        let (stream, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("a consumer connects")
            .unwrap();
        Connection::new(stream)
    }

    /// The next connection after an honest handshake (Refused when the
    /// consumer's proof is wrong); returns it and the consumer's hello.
    pub(crate) async fn accept(&self) -> (FeederConn, ToFeeder) {
        let mut conn = self.accept_raw().await;
        let nonce = random_hex(16).unwrap();
        conn.write_frame(&ToConsumer::Challenge {
            version: PROTOCOL_VERSION,
            nonce: nonce.clone(),
        })
        .await
        .unwrap();
        let hello = recv(&mut conn).await.expect("a hello");
        let ToFeeder::Hello {
            proof: their_proof,
            nonce: their_nonce,
            ..
        } = &hello
        else {
            panic!("expected a hello, got {hello:?}");
        };
        let answer = if verify(&self.secret, &nonce, their_proof) {
            ToConsumer::Welcome {
                proof: proof(&self.secret, their_nonce),
                lease: Duration::from_secs(30),
                settles: false,
                extends: false,
                meta: false,
            }
        } else {
            ToConsumer::Refused {
                reason: "bad proof".into(),
            }
        };
        conn.write_frame(&answer).await.unwrap();
        (conn, hello)
    }
}

/// The next frame from the consumer that is not a heartbeat; `None`
/// at the end of the stream.
pub(crate) async fn recv(conn: &mut FeederConn) -> Option<ToFeeder> {
    loop {
        let frame = tokio::time::timeout(WAIT, conn.read_frame::<ToFeeder>())
            .await
            .expect("a frame from the consumer in time");
        match frame {
            Ok(Some(ToFeeder::Heartbeat)) => continue,
            Ok(other) => return other,
            // A reset counts as the end here.
            Err(_) => return None,
        }
    }
}

pub(crate) async fn send_job(conn: &mut FeederConn, lease: u64, payload: serde_json::Value) {
    conn.write_frame(&ToConsumer::Job {
        lease,
        id: lease * 100,
        attempt: 1,
        payload: JobPayload::encode(&payload).unwrap(),
    })
    .await
    .unwrap();
}

type Consumer = JoinHandle<Result<ConsumerReport, ConsumerError>>;

fn spawn_consumer<J, F, Fut>(
    addr: &str,
    secret: &str,
    options: ConsumerOptions,
    run: F,
    shutdown: &CancellationToken,
) -> Consumer
where
    J: DeserializeOwned + Send + 'static,
    F: Fn(J, JobInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let addr = addr.to_string();
    let secret = secret.to_string();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        consume(&addr, &secret, "jobs/3@localhost", options, run, shutdown).await
    })
}

async fn finished(consumer: Consumer) -> Result<ConsumerReport, ConsumerError> {
    tokio::time::timeout(WAIT, consumer)
        .await
        .expect("the consumer ends in time")
        .unwrap()
}

async fn drain_and_bye(conn: &mut FeederConn) {
    conn.write_frame(&ToConsumer::Drain).await.unwrap();
    assert_eq!(recv(conn).await, Some(ToFeeder::Bye));
    assert_eq!(recv(conn).await, None);
}

async fn done(_job: serde_json::Value, _info: JobInfo) -> Outcome {
    Outcome::Done
}

#[test]
fn consume_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let future = consume(
        "127.0.0.1:1",
        SECRET,
        "n",
        ConsumerOptions::default(),
        done,
        CancellationToken::new(),
    );
    assert_send(&future);
}

#[test]
fn backoff_doubles_to_the_cap_with_jitter() {
    let mut backoff = Reconnects::default();
    let first = backoff.next_delay();
    assert!(
        first >= Duration::from_millis(75) && first <= Duration::from_millis(125),
        "{first:?}"
    );
    let second = backoff.next_delay();
    assert!(second >= Duration::from_millis(150), "{second:?}");
    for _ in 0..20 {
        assert!(backoff.next_delay() <= RECONNECT_MAX);
    }
    assert!(backoff.next_delay() >= RECONNECT_MAX.mul_f64(0.75));
    backoff.reset();
    assert!(backoff.next_delay() <= Duration::from_millis(125));
}

#[tokio::test]
async fn handshake_grants_the_credits_and_drain_says_bye() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(2, 5), done, &shutdown);
    let (mut conn, hello) = feeder.accept().await;
    let ToFeeder::Hello { version, name, .. } = hello else {
        unreachable!()
    };
    assert_eq!(
        (version, name.as_str()),
        (PROTOCOL_VERSION, "jobs/3@localhost")
    );
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 5 }));
    drain_and_bye(&mut conn).await;
    let report = finished(consumer).await.unwrap();
    assert_eq!(report.connections, 1);
    assert_eq!(report.done, 0);
}

#[tokio::test]
async fn credits_are_at_least_the_concurrency() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(3, 1), done, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 3 }));
    shutdown.cancel();
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Bye));
    finished(consumer).await.unwrap();
}

#[tokio::test]
async fn a_feeder_refusing_our_proof_is_a_permanent_error() {
    let (feeder, addr) = FakeFeeder::bind("another secret").await;
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ran);
    let run = move |_: serde_json::Value, _| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Outcome::Done }
    };
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), run, &shutdown);
    let (_conn, _) = feeder.accept().await;
    let err = finished(consumer).await.unwrap_err();
    assert!(
        matches!(&err, ConsumerError::Refused { reason, .. } if reason == "bad proof"),
        "{err}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_feeder_without_the_secret_is_refused() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ran);
    let run = move |_: serde_json::Value, _| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Outcome::Done }
    };
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), run, &shutdown);

    // An impostor: welcomes anyone, proves with the wrong secret, and
    // sends a job right away.
    let mut conn = feeder.accept_raw().await;
    conn.write_frame(&ToConsumer::Challenge {
        version: PROTOCOL_VERSION,
        nonce: "abcd".into(),
    })
    .await
    .unwrap();
    let Some(ToFeeder::Hello { nonce, .. }) = recv(&mut conn).await else {
        panic!("expected a hello")
    };
    conn.write_frame(&ToConsumer::Welcome {
        proof: proof("not the secret", &nonce),
        lease: Duration::from_secs(30),
        settles: false,
        extends: false,
        meta: false,
    })
    .await
    .unwrap();
    send_job(&mut conn, 1, serde_json::json!("payload")).await;

    let err = finished(consumer).await.unwrap_err();
    assert!(matches!(err, ConsumerError::Impostor { .. }), "{err}");
    assert_eq!(recv(&mut conn).await, None, "no credit, the link is closed");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn concurrency_is_respected_and_credits_come_back_per_job() {
    const JOBS: u64 = 12;
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (now_in, max_in) = (Arc::clone(&now), Arc::clone(&max));
    let run = move |_: u64, _| {
        let (now, max) = (Arc::clone(&now_in), Arc::clone(&max_in));
        async move {
            let running = now.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(running, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Outcome::Done
        }
    };
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(2, 4), run, &shutdown);
    let (mut conn, _) = feeder.accept().await;

    let (mut credit, mut granted, mut sent, mut acked) = (0u32, 0u32, 0u64, 0u64);
    while acked < JOBS {
        while credit > 0 && sent < JOBS {
            sent += 1;
            send_job(&mut conn, sent, serde_json::json!(sent)).await;
            credit -= 1;
        }
        match recv(&mut conn).await {
            Some(ToFeeder::Credit { n }) => {
                credit += n;
                granted += n;
            }
            Some(ToFeeder::Ack { .. }) => acked += 1,
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            u64::from(granted) <= 4 + acked,
            "credits only come back for jobs done"
        );
    }
    conn.write_frame(&ToConsumer::Drain).await.unwrap();
    loop {
        match recv(&mut conn).await {
            Some(ToFeeder::Credit { n }) => granted += n,
            Some(ToFeeder::Bye) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(granted, 4 + 12);
    assert_eq!(max.load(Ordering::SeqCst), 2);
    let report = finished(consumer).await.unwrap();
    assert_eq!(report.done, JOBS);
}

#[tokio::test]
async fn outcomes_are_mapped() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let run = |job: String, _info: JobInfo| async move {
        match job.as_str() {
            "ack" => Outcome::Done,
            "retry" => Outcome::Retry(Some(Duration::from_millis(250))),
            "dead" => Outcome::Dead("nope".into()),
            _ => panic!("boom {}", 7),
        }
    };
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 5), run, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 5 }));
    for (lease, payload) in [
        (1, serde_json::json!("ack")),
        (2, serde_json::json!("retry")),
        (3, serde_json::json!("dead")),
        (4, serde_json::json!("panic")),
        (5, serde_json::json!(42)),
    ] {
        send_job(&mut conn, lease, payload).await;
    }
    let mut outcomes = HashMap::new();
    let mut credits = 0;
    while outcomes.len() < 5 || credits < 5 {
        let frame = recv(&mut conn).await.expect("a frame");
        match &frame {
            ToFeeder::Credit { n } => credits += n,
            ToFeeder::Ack { lease, .. }
            | ToFeeder::Retry { lease, .. }
            | ToFeeder::Dead { lease, .. } => {
                outcomes.insert(*lease, frame.clone());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(credits, 5, "one credit back per job");
    assert_eq!(
        outcomes[&1],
        ToFeeder::Ack {
            lease: 1,
            meta: None
        }
    );
    assert!(
        matches!(&outcomes[&2], ToFeeder::Retry { delay: Some(d), .. } if *d == Duration::from_millis(250)),
        "{:?}",
        outcomes[&2]
    );
    assert_eq!(
        outcomes[&3],
        ToFeeder::Dead {
            lease: 3,
            reason: "nope".into(),
            meta: None
        }
    );
    assert!(
        matches!(&outcomes[&4], ToFeeder::Retry { delay: None, reason, .. } if reason.contains("boom 7")),
        "a panic is a retry with its text: {:?}",
        outcomes[&4]
    );
    assert!(
        matches!(&outcomes[&5], ToFeeder::Dead { reason, .. } if reason == "bad payload: invalid type: integer `42`, expected a string"),
        "a bad payload is dead with serde's error: {:?}",
        outcomes[&5]
    );
    drain_and_bye(&mut conn).await;
    let report = finished(consumer).await.unwrap();
    assert_eq!((report.done, report.retried, report.dead), (1, 2, 2));
}

/// A run function for jobs named by their payload: `"slow"` sleeps
/// `slow`, and each start is told on `started_tx`.
fn scripted(
    slow: Duration,
) -> (
    impl Fn(String, JobInfo) -> futures::future::BoxFuture<'static, Outcome> + Send + Sync + 'static,
    mpsc::UnboundedReceiver<u64>,
) {
    let (started_tx, started_rx) = mpsc::unbounded_channel();
    let run = move |job: String, info: JobInfo| {
        let _ = started_tx.send(info.id);
        async move {
            if job == "slow" {
                tokio::time::sleep(slow).await;
            }
            Outcome::Done
        }
        .boxed()
    };
    (run, started_rx)
}

async fn started(started_rx: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
    tokio::time::timeout(WAIT, started_rx.recv())
        .await
        .expect("a job starts in time")
        .expect("the consumer is alive")
}

#[tokio::test]
async fn reconnects_after_the_feeder_closes() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), done, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    send_job(&mut conn, 1, serde_json::json!("x")).await;
    assert_eq!(
        recv(&mut conn).await,
        Some(ToFeeder::Ack {
            lease: 1,
            meta: None
        })
    );
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    drop(conn);

    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    send_job(&mut conn, 7, serde_json::json!("y")).await;
    assert_eq!(
        recv(&mut conn).await,
        Some(ToFeeder::Ack {
            lease: 7,
            meta: None
        })
    );
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    drain_and_bye(&mut conn).await;
    let report = finished(consumer).await.unwrap();
    assert_eq!((report.connections, report.done, report.lost), (2, 2, 0));
}

#[tokio::test]
async fn outcomes_of_a_lost_connection_are_not_sent_on_the_next() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let (run, mut started_rx) = scripted(Duration::from_millis(600));
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 2), run, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 2 }));
    send_job(&mut conn, 1, serde_json::json!("slow")).await;
    send_job(&mut conn, 2, serde_json::json!("fast")).await;
    assert_eq!(started(&mut started_rx).await, 100);
    drop(conn);

    // The slow job still runs and holds its slot: one credit now, one
    // more when it ends, and never its outcome.
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    send_job(&mut conn, 3, serde_json::json!("fast")).await;
    assert_eq!(started(&mut started_rx).await, 300);
    assert_eq!(
        recv(&mut conn).await,
        Some(ToFeeder::Ack {
            lease: 3,
            meta: None
        })
    );
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    drain_and_bye(&mut conn).await;
    let report = finished(consumer).await.unwrap();
    // Job 1 finished unreported, job 2 was dropped unstarted.
    assert_eq!((report.done, report.lost, report.connections), (1, 2, 2));
    assert!(started_rx.try_recv().is_err(), "job 2 never ran");
}

#[tokio::test]
async fn drain_finishes_running_jobs_and_releases_the_rest() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let (run, mut started_rx) = scripted(Duration::from_millis(200));
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 3), run, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 3 }));
    send_job(&mut conn, 1, serde_json::json!("slow")).await;
    send_job(&mut conn, 2, serde_json::json!("fast")).await;
    send_job(&mut conn, 3, serde_json::json!("fast")).await;
    assert_eq!(started(&mut started_rx).await, 100);
    conn.write_frame(&ToConsumer::Drain).await.unwrap();
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Release { lease: 2 }));
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Release { lease: 3 }));
    assert_eq!(
        recv(&mut conn).await,
        Some(ToFeeder::Ack {
            lease: 1,
            meta: None
        })
    );
    assert_eq!(
        recv(&mut conn).await,
        Some(ToFeeder::Bye),
        "no credit while draining"
    );
    assert_eq!(recv(&mut conn).await, None);
    let report = finished(consumer).await.unwrap();
    assert_eq!((report.done, report.released, report.lost), (1, 2, 0));
    assert!(started_rx.try_recv().is_err(), "released jobs never ran");
}

#[tokio::test]
async fn shutdown_drains_too() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let (run, mut started_rx) = scripted(Duration::from_millis(200));
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 2), run, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 2 }));
    send_job(&mut conn, 1, serde_json::json!("slow")).await;
    send_job(&mut conn, 2, serde_json::json!("fast")).await;
    assert_eq!(started(&mut started_rx).await, 100);
    shutdown.cancel();
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Release { lease: 2 }));
    assert_eq!(
        recv(&mut conn).await,
        Some(ToFeeder::Ack {
            lease: 1,
            meta: None
        })
    );
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Bye));
    let report = finished(consumer).await.unwrap();
    assert_eq!((report.done, report.released), (1, 1));
}

#[tokio::test]
async fn jobs_past_the_grace_are_reported_as_retries() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let (run, mut started_rx) = scripted(Duration::from_secs(3600));
    let shutdown = CancellationToken::new();
    let options = ConsumerOptions::new(1, 1).with_grace(Duration::from_millis(100));
    let consumer = spawn_consumer(&addr, SECRET, options, run, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    send_job(&mut conn, 1, serde_json::json!("slow")).await;
    assert_eq!(started(&mut started_rx).await, 100);
    conn.write_frame(&ToConsumer::Drain).await.unwrap();
    let frame = recv(&mut conn).await;
    assert!(
        matches!(&frame, Some(ToFeeder::Retry { lease: 1, reason, .. }) if reason.contains("grace")),
        "{frame:?}"
    );
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Bye));
    let report = finished(consumer).await.unwrap();
    assert_eq!((report.retried, report.interrupted, report.done), (1, 1, 0));
}

#[tokio::test]
async fn a_silent_feeder_is_lost_and_reconnected() {
    let (feeder, addr) = FakeFeeder::bind(SECRET).await;
    let shutdown = CancellationToken::new();
    let mut options = ConsumerOptions::new(1, 1);
    options.heartbeat = Duration::from_millis(50);
    options.silence = Duration::from_millis(300);
    let consumer = spawn_consumer(&addr, SECRET, options, done, &shutdown);
    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    // Heartbeats come, and we answer none: the consumer hangs up.
    let mut heartbeats = 0;
    loop {
        match tokio::time::timeout(WAIT, conn.read_frame::<ToFeeder>()).await {
            Ok(Ok(Some(ToFeeder::Heartbeat))) => heartbeats += 1,
            Ok(Ok(None)) | Ok(Err(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(heartbeats >= 2, "{heartbeats} heartbeats");

    let (mut conn, _) = feeder.accept().await;
    assert_eq!(recv(&mut conn).await, Some(ToFeeder::Credit { n: 1 }));
    drain_and_bye(&mut conn).await;
    assert_eq!(finished(consumer).await.unwrap().connections, 2);
}

#[tokio::test]
async fn an_unreachable_feeder_is_retried_until_shutdown() {
    // A port nobody listens on.
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(&addr, SECRET, ConsumerOptions::new(1, 1), done, &shutdown);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!consumer.is_finished());
    shutdown.cancel();
    let report = finished(consumer).await.unwrap();
    assert_eq!(report.connections, 0);
}

#[tokio::test]
async fn a_malformed_address_is_an_error() {
    let shutdown = CancellationToken::new();
    let consumer = spawn_consumer(
        "no port here",
        SECRET,
        ConsumerOptions::new(1, 1),
        done,
        &shutdown,
    );
    let err = finished(consumer).await.unwrap_err();
    assert!(matches!(err, ConsumerError::Address { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_with_the_real_server() {
    use crate::protocol::slave::QueueSettings;
    use crate::queue::{Feeder, Next};
    use std::sync::Mutex;

    struct Numbers {
        next: u64,
        succeeded: Arc<Mutex<Vec<u64>>>,
    }
    impl Feeder for Numbers {
        type Job = u64;
        fn next(&mut self) -> Next<u64> {
            if self.next > 60 {
                return Next::Done;
            }
            self.next += 1;
            Next::Job(self.next - 1)
        }
        fn success(&mut self, job: u64) {
            self.succeeded.lock().unwrap().push(job);
        }
        fn error(&mut self, job: u64, reason: &str) {
            panic!("job {job} dead: {reason}");
        }
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let succeeded = Arc::new(Mutex::new(Vec::new()));
    let settings = QueueSettings {
        lease: Duration::from_secs(30),
        max_attempts: 3,
        retry: crate::retry::RetryPolicy::schedule([Duration::ZERO, Duration::ZERO]),
        rate: None,
        progress_every: Duration::ZERO,
        joblog: None,
    };
    let server = tokio::spawn(crate::queue::server::serve(
        listener,
        Numbers {
            next: 1,
            succeeded: Arc::clone(&succeeded),
        },
        SECRET.to_string(),
        settings,
        None,
        CancellationToken::new(),
    ));
    // Every 7th job fails its first attempt; every 10th panics on it.
    let run = |n: u64, info: JobInfo| async move {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if info.attempt == 1 && n % 10 == 0 {
            panic!("job {n} panics");
        }
        if info.attempt == 1 && n % 7 == 0 {
            return Outcome::Retry(Some(Duration::ZERO));
        }
        Outcome::Done
    };
    let shutdown = CancellationToken::new();
    let consumers: Vec<_> = (0..3)
        .map(|_| spawn_consumer(&addr, SECRET, ConsumerOptions::new(4, 8), run, &shutdown))
        .collect();
    let report = tokio::time::timeout(WAIT, server)
        .await
        .expect("the server finishes")
        .unwrap()
        .unwrap();
    assert!(report.finished, "{report:?}");
    let mut done = 0;
    for consumer in consumers {
        let report = finished(consumer).await.unwrap();
        done += report.done;
        assert_eq!(report.lost, 0, "{report:?}");
    }
    assert_eq!(done, 60);
    let mut succeeded = succeeded.lock().unwrap().clone();
    succeeded.sort_unstable();
    assert_eq!(succeeded, (1..=60).collect::<Vec<_>>());
}
