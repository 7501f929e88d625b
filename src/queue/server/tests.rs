//! The feeder server through its sockets: a [`Harness`] that runs it
//! with a scripted feeder, a [`Client`] that plays a consumer frame by
//! frame, and the tests of the server as a whole. The connection tests
//! (`conn.rs`) and the core's own (`core.rs`) share these helpers.

use super::*;
use crate::protocol::queue::{proof, verify, ToConsumer, ToFeeder, FEATURE_SETTLED};
use crate::protocol::{self, Connection, PROTOCOL_VERSION};
use crate::queue::Next;
use crate::retry::RetryPolicy;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub(super) const SECRET: &str = "s3cret";
/// Bound on every wait that should succeed.
pub(super) const WAIT: Duration = Duration::from_secs(10);

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What the feeder was told.
#[derive(Debug, Default)]
pub(super) struct Log {
    pub(super) successes: Vec<u32>,
    pub(super) errors: Vec<(u32, String)>,
    pub(super) nexts: u64,
}

/// Jobs from a shared queue; `Done` or `Empty` when it is empty.
pub(super) struct TestFeeder {
    pub(super) queue: Arc<Mutex<VecDeque<u32>>>,
    pub(super) done_when_empty: bool,
    pub(super) recheck: Duration,
    pub(super) log: Arc<Mutex<Log>>,
    /// Every job's own retry policy, if any.
    pub(super) own_retry: Option<RetryPolicy>,
}

impl Feeder for TestFeeder {
    type Job = u32;

    fn next(&mut self) -> Next<u32> {
        self.log.lock().unwrap().nexts += 1;
        match self.queue.lock().unwrap().pop_front() {
            Some(job) => Next::Job(job),
            None if self.done_when_empty => Next::Done,
            None => Next::Empty,
        }
    }

    fn success(&mut self, job: u32) {
        self.log.lock().unwrap().successes.push(job);
    }

    fn error(&mut self, job: u32, reason: &str) {
        self.log
            .lock()
            .unwrap()
            .errors
            .push((job, reason.to_string()));
    }

    fn recheck(&self) -> Duration {
        self.recheck
    }

    fn retry_policy(&self, _job: &u32, _first: SystemTime) -> Option<RetryPolicy> {
        self.own_retry.clone()
    }
}

pub(super) fn settings() -> QueueSettings {
    QueueSettings {
        lease: Duration::from_secs(30),
        max_attempts: 3,
        retry: RetryPolicy::exponential(ms(10), ms(50), 10).with_jitter(0.0),
        rate: None,
        progress_every: Duration::ZERO,
        joblog: None,
    }
}

pub(super) struct Harness {
    pub(super) addr: SocketAddr,
    pub(super) shutdown: CancellationToken,
    pub(super) task: JoinHandle<Result<ServeReport, ServerError>>,
    pub(super) log: Arc<Mutex<Log>>,
    pub(super) queue: Arc<Mutex<VecDeque<u32>>>,
}

impl Harness {
    pub(super) async fn start(
        jobs: impl IntoIterator<Item = u32>,
        done_when_empty: bool,
        settings: QueueSettings,
        configure: impl FnOnce(FeederServer<TestFeeder>) -> FeederServer<TestFeeder>,
    ) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let queue = Arc::new(Mutex::new(jobs.into_iter().collect::<VecDeque<_>>()));
        let feeder = TestFeeder {
            queue: queue.clone(),
            done_when_empty,
            recheck: ms(50),
            log: log.clone(),
            own_retry: None,
        };
        let shutdown = CancellationToken::new();
        let server = configure(FeederServer::new(feeder, SECRET, settings));
        let task = tokio::spawn(server.run(listener, shutdown.clone()));
        Harness {
            addr,
            shutdown,
            task,
            log,
            queue,
        }
    }

    pub(super) async fn simple(jobs: impl IntoIterator<Item = u32>) -> Harness {
        Harness::start(jobs, true, settings(), |s| s).await
    }

    pub(super) async fn report(self) -> (ServeReport, Log) {
        let report = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the server ends in time")
            .expect("the server does not panic")
            .expect("the server runs");
        let log = std::mem::take(&mut *self.log.lock().unwrap());
        (report, log)
    }

    pub(super) async fn stop(self) -> (ServeReport, Log) {
        self.shutdown.cancel();
        self.report().await
    }
}

/// A consumer built on [`Connection`], one frame at a time.
pub(super) struct Client {
    pub(super) conn: Connection<TcpStream>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Job {
    pub(super) lease: u64,
    pub(super) id: u64,
    pub(super) attempt: u32,
    pub(super) payload: u32,
}

impl Client {
    pub(super) async fn raw(addr: SocketAddr) -> Connection<TcpStream> {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Connection::new(stream)
    }

    pub(super) async fn challenge(conn: &mut Connection<TcpStream>) -> String {
        match tokio::time::timeout(WAIT, conn.read_frame::<ToConsumer>()).await {
            Ok(Ok(Some(ToConsumer::Challenge { version, nonce }))) => {
                assert_eq!(version, PROTOCOL_VERSION);
                nonce
            }
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    pub(super) fn hello(secret: &str, nonce: &str) -> ToFeeder {
        ToFeeder::Hello {
            version: PROTOCOL_VERSION,
            name: "test/1@here".into(),
            proof: proof(secret, nonce),
            nonce: "c0ffee".into(),
            features: vec![FEATURE_SETTLED.into()],
        }
    }

    pub(super) async fn connect(addr: SocketAddr) -> Client {
        let mut conn = Client::raw(addr).await;
        let nonce = Client::challenge(&mut conn).await;
        conn.write_frame(&Client::hello(SECRET, &nonce))
            .await
            .unwrap();
        let mut client = Client { conn };
        match client.recv().await {
            Some(ToConsumer::Welcome { proof: p, .. }) => {
                assert!(verify(SECRET, "c0ffee", &p), "the server proves itself");
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
        client
    }

    pub(super) async fn send(&mut self, frame: ToFeeder) {
        self.conn.write_frame(&frame).await.unwrap();
    }

    /// The next frame other than a heartbeat (answered), within `wait`;
    /// `Ok(None)` at the end of the link.
    pub(super) async fn recv_within(
        &mut self,
        wait: Duration,
    ) -> Result<Option<ToConsumer>, tokio::time::error::Elapsed> {
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.conn.read_frame::<ToConsumer>()).await? {
                Ok(Some(ToConsumer::Heartbeat)) => {
                    let _ = self.conn.write_frame(&ToFeeder::Heartbeat).await;
                }
                Ok(frame) => return Ok(frame),
                Err(_) => return Ok(None),
            }
        }
    }

    pub(super) async fn recv(&mut self) -> Option<ToConsumer> {
        self.recv_within(WAIT).await.expect("a frame in time")
    }

    pub(super) async fn job(&mut self) -> Job {
        match self.recv().await {
            Some(ToConsumer::Job {
                lease,
                id,
                attempt,
                payload,
            }) => Job {
                lease,
                id,
                attempt,
                payload: payload.decode().unwrap(),
            },
            other => panic!("expected a job, got {other:?}"),
        }
    }

    /// Nothing but heartbeats for `wait`.
    pub(super) async fn quiet_for(&mut self, wait: Duration) {
        if let Ok(frame) = self.recv_within(wait).await {
            panic!("expected nothing, got {frame:?}");
        }
    }

    pub(super) async fn ack(&mut self, lease: u64) {
        self.send(ToFeeder::Ack { lease, meta: None }).await;
        self.send(ToFeeder::Credit { n: 1 }).await;
    }

    /// Reads until the end of the link (the server closed it).
    pub(super) async fn closed(self) {
        let mut stream = self.conn.into_inner();
        let mut buf = [0u8; 4096];
        let end = tokio::time::timeout(WAIT, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the server closes the connection");
    }
}

/// A feeder that says its changes are durable only when the test
/// says so, and counts the deliveries it was told of.
pub(super) struct DurableFeeder {
    pub(super) jobs: VecDeque<u32>,
    /// Attempts each job had before (job -> attempts).
    pub(super) before: HashMap<u32, u32>,
    pub(super) log: Arc<Mutex<Log>>,
    /// Deliveries begun, in order.
    pub(super) attempts: Arc<Mutex<Vec<u32>>>,
    /// The number of the last commit.
    pub(super) committed: Arc<Mutex<u64>>,
    pub(super) synced_rx: watch::Receiver<u64>,
}

impl Feeder for DurableFeeder {
    type Job = u32;

    fn next(&mut self) -> Next<u32> {
        self.jobs.pop_front().map_or(Next::Empty, Next::Job)
    }

    fn success(&mut self, job: u32) {
        self.log.lock().unwrap().successes.push(job);
    }

    fn error(&mut self, job: u32, reason: &str) {
        self.log.lock().unwrap().errors.push((job, reason.into()));
    }

    fn attempts(&self, job: &u32) -> u32 {
        self.before.get(job).copied().unwrap_or(0)
    }

    fn attempt(&mut self, job: &u32) {
        self.attempts.lock().unwrap().push(*job);
    }

    fn commit(&mut self) -> u64 {
        let mut committed = self.committed.lock().unwrap();
        *committed += 1;
        *committed
    }

    fn synced(&self) -> Option<watch::Receiver<u64>> {
        Some(self.synced_rx.clone())
    }
}

#[tokio::test]
async fn a_durable_feeder_s_jobs_and_confirmations_wait_for_its_sync() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (synced_tx, synced_rx) = watch::channel(0);
    let committed = Arc::new(Mutex::new(0));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::new(Mutex::new(Log::default()));
    let feeder = DurableFeeder {
        jobs: [1, 2, 3].into(),
        before: HashMap::from([(3, 3)]),
        log: log.clone(),
        attempts: attempts.clone(),
        committed: committed.clone(),
        synced_rx,
    };
    let shutdown = CancellationToken::new();
    let mut settings = settings();
    settings.lease = ms(1000);
    let task =
        tokio::spawn(FeederServer::new(feeder, SECRET, settings).run(listener, shutdown.clone()));
    let mut client = Client::connect(addr).await;
    client.send(ToFeeder::Credit { n: 2 }).await;
    // Delivered in memory, recorded, but not durable yet: nothing sent;
    // and a lease does not run while its job is held (a slow disk
    // would have the job lost and delivered again).
    client.quiet_for(ms(1500)).await;
    assert_eq!(*attempts.lock().unwrap(), [1, 2]);
    let sync_now = || synced_tx.send_replace(*committed.lock().unwrap());
    sync_now();
    let one = client.job().await;
    let two = client.job().await;
    assert_eq!((one.payload, two.payload), (1, 2));
    assert_eq!((one.attempt, two.attempt), (1, 1));
    // Job 3 already had its 3 attempts (the limit): dead at once,
    // never sent.
    client.ack(one.lease).await;
    client.quiet_for(ms(300)).await;
    sync_now();
    assert_eq!(
        client.recv().await,
        Some(ToConsumer::Settled {
            leases: vec![one.lease]
        })
    );
    shutdown.cancel();
    let task_report = tokio::spawn(async move {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("ends")
            .expect("no panic")
            .expect("runs")
    });
    // The consumer hands job 2 back at the drain.
    assert_eq!(client.recv().await, Some(ToConsumer::Drain));
    client.send(ToFeeder::Release { lease: two.lease }).await;
    client.send(ToFeeder::Bye).await;
    sync_now();
    let report = task_report.await.expect("report");
    assert_eq!(report.progress.done, 1);
    let log = log.lock().unwrap();
    assert_eq!(log.successes, [1]);
    assert_eq!(log.errors.len(), 1);
    assert_eq!(log.errors[0].0, 3);
    assert!(
        log.errors[0].1.contains("3 attempts"),
        "{}",
        log.errors[0].1
    );
}

#[tokio::test]
async fn three_jobs_to_one_consumer_then_finished() {
    let harness = Harness::simple([10, 20, 30]).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 3 }).await;
    let mut jobs = Vec::new();
    for _ in 0..3 {
        jobs.push(client.job().await);
    }
    assert_eq!(
        jobs.iter().map(|j| j.payload).collect::<Vec<_>>(),
        [10, 20, 30]
    );
    assert!(jobs.iter().all(|j| j.attempt == 1));
    let leases: HashSet<_> = jobs.iter().map(|j| j.lease).collect();
    let ids: HashSet<_> = jobs.iter().map(|j| j.id).collect();
    assert_eq!((leases.len(), ids.len()), (3, 3));
    for job in &jobs {
        client.ack(job.lease).await;
    }
    assert_eq!(client.recv().await, Some(ToConsumer::Drain));
    let (report, log) = harness.report().await;
    assert!(report.finished);
    assert_eq!(report.unfinished, 0);
    assert_eq!(report.progress.done, 3);
    assert_eq!(report.progress.in_flight, 0);
    assert_eq!(log.successes, [10, 20, 30]);
    assert!(log.errors.is_empty());
    client.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_consumers_get_disjoint_jobs_each_done_once() {
    const JOBS: u32 = 400;
    let harness = Harness::simple(0..JOBS).await;
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let addr = harness.addr;
        consumers.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            client.send(ToFeeder::Credit { n: 4 }).await;
            let mut got = Vec::new();
            loop {
                match client.recv().await {
                    Some(ToConsumer::Job {
                        lease,
                        id,
                        payload,
                        attempt,
                    }) => {
                        assert_eq!(attempt, 1);
                        got.push((id, payload.decode::<u32>().unwrap()));
                        client.ack(lease).await;
                    }
                    Some(ToConsumer::Drain) => {
                        client.send(ToFeeder::Bye).await;
                        break;
                    }
                    None => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            got
        }));
    }
    let mut ids = HashSet::new();
    let mut payloads = Vec::new();
    for consumer in consumers {
        for (id, payload) in tokio::time::timeout(WAIT, consumer).await.unwrap().unwrap() {
            assert!(ids.insert(id), "job {id} delivered twice");
            payloads.push(payload);
        }
    }
    payloads.sort_unstable();
    assert_eq!(payloads, (0..JOBS).collect::<Vec<_>>());
    let (report, mut log) = harness.report().await;
    assert!(report.finished);
    assert_eq!(report.progress.done, u64::from(JOBS));
    log.successes.sort_unstable();
    assert_eq!(log.successes, (0..JOBS).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_consumer_that_dies_mid_job_has_it_redelivered_at_once() {
    let harness = Harness::simple([7]).await;
    let mut a = Client::connect(harness.addr).await;
    a.send(ToFeeder::Credit { n: 1 }).await;
    let first = a.job().await;
    let mut b = Client::connect(harness.addr).await;
    b.send(ToFeeder::Credit { n: 1 }).await;
    b.quiet_for(ms(100)).await;
    let died = Instant::now();
    drop(a);
    let again = b.job().await;
    assert!(
        died.elapsed() < Duration::from_secs(2),
        "not after the lease"
    );
    assert_eq!((again.id, again.payload, again.attempt), (first.id, 7, 2));
    assert_ne!(again.lease, first.lease);
    b.ack(again.lease).await;
    assert_eq!(b.recv().await, Some(ToConsumer::Drain));
    let (report, log) = harness.report().await;
    assert!(report.finished);
    assert_eq!(report.progress.done, 1);
    assert_eq!(report.progress.failed, 1);
    assert_eq!(report.progress.retried, 1);
    assert_eq!(log.successes, [7]);
}

#[tokio::test]
async fn an_expired_lease_is_redelivered_and_its_late_ack_is_stale() {
    let settings = QueueSettings {
        lease: ms(300),
        ..settings()
    };
    let harness = Harness::start([5], true, settings, |s| s).await;
    let mut a = Client::connect(harness.addr).await;
    a.send(ToFeeder::Credit { n: 1 }).await;
    let first = a.job().await;
    let mut b = Client::connect(harness.addr).await;
    b.send(ToFeeder::Credit { n: 1 }).await;
    let again = b.job().await;
    assert_eq!((again.id, again.attempt), (first.id, 2));
    a.send(ToFeeder::Ack {
        lease: first.lease,
        meta: None,
    })
    .await;
    assert_eq!(
        a.recv().await,
        Some(ToConsumer::Stale { lease: first.lease })
    );
    // A lease that never existed is stale too.
    a.send(ToFeeder::Ack {
        lease: 999,
        meta: None,
    })
    .await;
    assert_eq!(a.recv().await, Some(ToConsumer::Stale { lease: 999 }));
    // Another consumer's lease is not yours.
    a.send(ToFeeder::Ack {
        lease: again.lease,
        meta: None,
    })
    .await;
    assert_eq!(
        a.recv().await,
        Some(ToConsumer::Stale { lease: again.lease })
    );
    b.ack(again.lease).await;
    let (report, log) = harness.report().await;
    assert!(report.finished);
    assert_eq!(report.progress.done, 1, "never counted twice");
    assert_eq!(log.successes, [5]);
}

#[tokio::test]
async fn retry_then_success() {
    let harness = Harness::simple([3]).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    let first = client.job().await;
    client
        .send(ToFeeder::Retry {
            lease: first.lease,
            // Within the policy's cap of 50 ms.
            delay: Some(ms(40)),
            reason: "busy".into(),
            meta: None,
        })
        .await;
    let asked = Instant::now();
    client.send(ToFeeder::Credit { n: 1 }).await;
    let again = client.job().await;
    assert!(asked.elapsed() >= ms(35), "the requested delay is honoured");
    assert_eq!((again.id, again.attempt, again.payload), (first.id, 2, 3));
    client.ack(again.lease).await;
    let (report, log) = harness.report().await;
    assert!(report.finished);
    let p = report.progress;
    assert_eq!((p.done, p.failed, p.retried, p.dead), (1, 1, 1, 0));
    assert_eq!(log.successes, [3]);
    assert!(log.errors.is_empty());
}

#[tokio::test]
async fn a_job_s_own_retry_schedule_replaces_the_group_s() {
    // The group's policy retries within 50 ms, 10 times; the job's own
    // schedule waits 150 ms once, then gives up.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let feeder = TestFeeder {
        queue: Arc::new(Mutex::new([6].into_iter().collect())),
        done_when_empty: true,
        recheck: ms(50),
        log: log.clone(),
        own_retry: Some(RetryPolicy::schedule([ms(150)])),
    };
    let shutdown = CancellationToken::new();
    let task =
        tokio::spawn(FeederServer::new(feeder, SECRET, settings()).run(listener, shutdown.clone()));
    let mut client = Client::connect(addr).await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    let first = client.job().await;
    assert_eq!(first.attempt, 1);
    client
        .send(ToFeeder::Retry {
            lease: first.lease,
            delay: None,
            reason: "fail 1".into(),
            meta: None,
        })
        .await;
    let failed = Instant::now();
    client.send(ToFeeder::Credit { n: 1 }).await;
    let again = client.job().await;
    assert_eq!(again.attempt, 2);
    assert!(
        failed.elapsed() >= ms(140),
        "the job's own 150 ms delay, not the group's 10 ms"
    );
    client
        .send(ToFeeder::Retry {
            lease: again.lease,
            delay: None,
            reason: "fail 2".into(),
            meta: None,
        })
        .await;
    let report = tokio::time::timeout(WAIT, task)
        .await
        .expect("ends in time")
        .expect("no panic")
        .expect("runs");
    assert!(report.finished);
    assert_eq!(
        report.progress.dead, 1,
        "its schedule is used up after 2 attempts"
    );
    assert_eq!(log.lock().unwrap().errors, [(6, "fail 2".to_string())]);
}

#[tokio::test]
async fn max_attempts_then_dead_with_the_reason() {
    let settings = QueueSettings {
        max_attempts: 2,
        ..settings()
    };
    let harness = Harness::start([4], true, settings, |s| s).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    let mut last_attempt = 0;
    for reason in ["first", "boom"] {
        let job = client.job().await;
        last_attempt = job.attempt;
        client
            .send(ToFeeder::Retry {
                lease: job.lease,
                delay: None,
                reason: reason.into(),
                meta: None,
            })
            .await;
        client.send(ToFeeder::Credit { n: 1 }).await;
    }
    assert_eq!(last_attempt, 2);
    let (report, log) = harness.report().await;
    assert!(report.finished);
    let p = report.progress;
    assert_eq!((p.done, p.failed, p.retried, p.dead), (0, 2, 1, 1));
    assert_eq!(log.errors, [(4, "boom".to_string())]);
    assert!(log.successes.is_empty());
}

#[tokio::test]
async fn dead_outcome_calls_the_error_hook_at_once() {
    let harness = Harness::simple([8]).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    let job = client.job().await;
    client
        .send(ToFeeder::Dead {
            lease: job.lease,
            reason: "bad input".into(),
            meta: None,
        })
        .await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    let (report, log) = harness.report().await;
    assert!(report.finished);
    assert_eq!(report.progress.dead, 1);
    assert_eq!(log.errors, [(8, "bad input".to_string())]);
}

#[tokio::test]
async fn a_lost_lease_counts_as_an_attempt() {
    let settings = QueueSettings {
        lease: ms(100),
        max_attempts: 2,
        ..settings()
    };
    let harness = Harness::start([9], true, settings, |s| s).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 5 }).await;
    let first = client.job().await;
    let second = client.job().await;
    assert_eq!((second.id, second.attempt), (first.id, 2));
    // Both leases expire: dead after 2 attempts.
    let (report, log) = harness.report().await;
    assert!(report.finished);
    assert_eq!(report.progress.dead, 1);
    assert_eq!(log.errors.len(), 1);
    assert!(
        log.errors[0].1.contains("lease expired"),
        "{:?}",
        log.errors
    );
}

#[tokio::test]
async fn credits_are_respected_and_outcomes_do_not_return_them() {
    let harness = Harness::simple(0..10).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 2 }).await;
    let a = client.job().await;
    let b = client.job().await;
    client.quiet_for(ms(300)).await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    let c = client.job().await;
    client.quiet_for(ms(200)).await;
    for job in [a, b, c] {
        client
            .send(ToFeeder::Ack {
                lease: job.lease,
                meta: None,
            })
            .await;
    }
    client.quiet_for(ms(300)).await;
    let (report, log) = harness.stop().await;
    assert_eq!(report.progress.done, 3);
    assert!(
        log.nexts <= 4,
        "at most one job beyond the credits pulled: {}",
        log.nexts
    );
    assert_eq!(report.unfinished, 0);
}

/// Jobs received during `window` after granting plenty of credit.
pub(super) async fn count_jobs(client: &mut Client, window: Duration) -> u32 {
    let end = Instant::now() + window;
    let mut count = 0;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match client.recv_within(left).await {
            Ok(Some(ToConsumer::Job { .. })) => count += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => return count,
        }
    }
}

#[tokio::test]
async fn the_governor_limits_the_rate() {
    let settings = QueueSettings {
        rate: Some(50.0),
        ..settings()
    };
    let harness = Harness::start(0..10_000, true, settings, |s| s).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 10_000 }).await;
    // 5 of burst, then 50/s: about 105 in 2 s.
    let count = count_jobs(&mut client, Duration::from_secs(2)).await;
    assert!((70..=140).contains(&count), "{count} jobs in 2 s at 50/s");
    drop(client);
    harness.stop().await;
}

#[tokio::test]
async fn slow_down_lowers_the_rate() {
    let settings = QueueSettings {
        rate: Some(100.0),
        ..settings()
    };
    let harness = Harness::start(0..10_000, true, settings, |s| s).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 10_000 }).await;
    let before = count_jobs(&mut client, Duration::from_secs(1)).await;
    client.send(ToFeeder::SlowDown).await;
    let after = count_jobs(&mut client, Duration::from_secs(1)).await;
    // About 110 then about 55.
    assert!(before >= 80, "{before}");
    assert!(
        f64::from(after) < 0.8 * f64::from(before),
        "{before} then {after}"
    );
    drop(client);
    harness.stop().await;
}

#[tokio::test]
async fn pause_stops_deliveries_for_a_while() {
    let harness = Harness::simple(0..100).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    let job = client.job().await;
    client.send(ToFeeder::Pause { duration: ms(400) }).await;
    let paused = Instant::now();
    client.ack(job.lease).await;
    let _ = client.job().await;
    assert!(paused.elapsed() >= ms(350), "{:?}", paused.elapsed());
    drop(client);
    harness.stop().await;
}

#[tokio::test]
async fn shutdown_drains_and_records_outcomes() {
    let harness = Harness::start(0..10, true, settings(), |s| s).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 3 }).await;
    let (a, b, c) = (client.job().await, client.job().await, client.job().await);
    harness.shutdown.cancel();
    assert_eq!(client.recv().await, Some(ToConsumer::Drain));
    client
        .send(ToFeeder::Ack {
            lease: a.lease,
            meta: None,
        })
        .await;
    client
        .send(ToFeeder::Dead {
            lease: b.lease,
            reason: "nope".into(),
            meta: None,
        })
        .await;
    client.send(ToFeeder::Release { lease: c.lease }).await;
    client.send(ToFeeder::Bye).await;
    let (report, log) = harness.report().await;
    assert!(!report.finished);
    assert_eq!(report.progress.done, 1);
    assert_eq!(report.progress.dead, 1);
    assert_eq!(report.progress.in_flight, 0);
    assert_eq!(report.unfinished, 1, "the released job");
    assert_eq!(log.successes, [a.payload]);
    assert_eq!(log.errors, [(b.payload, "nope".to_string())]);
}

#[tokio::test]
async fn shutdown_waits_at_most_the_lease() {
    let settings = QueueSettings {
        lease: ms(500),
        ..settings()
    };
    let harness = Harness::start(0..10, true, settings, |s| s).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 2 }).await;
    let _ = (client.job().await, client.job().await);
    let stopped = Instant::now();
    harness.shutdown.cancel();
    assert_eq!(client.recv().await, Some(ToConsumer::Drain));
    // No answer at all.
    let (report, log) = harness.report().await;
    assert!(stopped.elapsed() < Duration::from_secs(3));
    assert_eq!(report.unfinished, 2);
    assert_eq!(report.progress.done, 0);
    assert!(log.successes.is_empty() && log.errors.is_empty());
}

#[tokio::test]
async fn empty_feeder_is_asked_again_after_recheck() {
    let settings = QueueSettings {
        progress_every: ms(50),
        ..settings()
    };
    let (progress_tx, mut progress_rx) = mpsc::channel(100);
    let harness = Harness::start([], false, settings, |s| s.progress(progress_tx)).await;
    let mut client = Client::connect(harness.addr).await;
    client.send(ToFeeder::Credit { n: 1 }).await;
    client.quiet_for(ms(300)).await;
    let asked = harness.log.lock().unwrap().nexts;
    assert!(
        (2..=20).contains(&asked),
        "asked {asked} times in 300 ms (recheck 50 ms)"
    );
    harness.queue.lock().unwrap().push_back(42);
    let job = client.job().await;
    assert_eq!(job.payload, 42);
    client.ack(job.lease).await;
    client.quiet_for(ms(150)).await;
    let (report, log) = harness.stop().await;
    assert!(!report.finished, "empty is not done");
    assert!(report.progress.empty);
    assert_eq!(log.successes, [42]);
    let mut reports = Vec::new();
    while let Ok(progress) = progress_rx.try_recv() {
        reports.push(progress);
    }
    assert!(reports.len() >= 3, "{reports:?}");
    assert!(reports.iter().any(|p| p.empty && p.done == 0));
    assert_eq!(reports.last(), Some(&report.progress));
    assert_eq!(report.progress.consumers, 1);
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let feeder = TestFeeder {
        queue: Default::default(),
        done_when_empty: true,
        recheck: ms(50),
        log: Default::default(),
        own_retry: None,
    };
    let err = serve(
        listener,
        feeder,
        String::new(),
        settings(),
        None,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ServerError::EmptySecret));
    for (lease, rate) in [
        (Duration::ZERO, None),
        (ms(10), Some(0.0)),
        (ms(10), Some(f64::NAN)),
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let feeder = TestFeeder {
            queue: Default::default(),
            done_when_empty: true,
            recheck: ms(50),
            log: Default::default(),
            own_retry: None,
        };
        let settings = QueueSettings {
            lease,
            rate,
            ..settings()
        };
        let err = FeederServer::new(feeder, SECRET, settings)
            .run(listener, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ServerError::InvalidSettings { .. }), "{err}");
    }
}

/// No-op jobs through 4 consumers on loopback:
/// `cargo test --release --lib -- --ignored throughput --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark"]
async fn throughput() {
    use futures::FutureExt;
    const JOBS: u32 = 400_000;
    let harness = Harness::simple(0..JOBS).await;
    let started = std::time::Instant::now();
    let mut consumers = Vec::new();
    for _ in 0..4 {
        let addr = harness.addr;
        consumers.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            client.send(ToFeeder::Credit { n: 256 }).await;
            let mut framed =
                tokio_util::codec::Framed::new(client.conn.into_inner(), protocol::codec());
            let mut done = 0u64;
            loop {
                let Some(Ok(body)) = framed.next().await else {
                    return done;
                };
                let mut next = Some(body);
                let mut freed = 0;
                while let Some(body) = next.take() {
                    match protocol::decode::<ToConsumer>(&body).unwrap() {
                        ToConsumer::Job { lease, .. } => {
                            let ack =
                                protocol::encode(&ToFeeder::Ack { lease, meta: None }).unwrap();
                            framed.feed(ack).await.unwrap();
                            freed += 1;
                            done += 1;
                        }
                        ToConsumer::Drain => return done,
                        _ => {}
                    }
                    if let Some(Some(Ok(body))) = framed.next().now_or_never() {
                        next = Some(body);
                    }
                }
                if freed > 0 {
                    let credit = protocol::encode(&ToFeeder::Credit { n: freed }).unwrap();
                    framed.feed(credit).await.unwrap();
                }
                SinkExt::<Bytes>::flush(&mut framed).await.unwrap();
            }
        }));
    }
    let mut total = 0;
    for consumer in consumers {
        total += consumer.await.unwrap();
    }
    let (report, _) = harness.report().await;
    let elapsed = started.elapsed();
    assert!(report.finished);
    assert_eq!(total, u64::from(JOBS));
    println!(
        "{JOBS} jobs in {elapsed:?}: {:.0} jobs/s",
        f64::from(JOBS) / elapsed.as_secs_f64()
    );
}
