//! What running the master's own instances through an in-process agent
//! would cost (a benchmark, not a test): the same instances supervised
//! directly, as the master does, and through `taskherd::agent::serve`
//! over an in-memory duplex, the master's side decoding every frame and
//! handing log lines to the log sink as it does for a remote host.
//!
//! Two loads, each measured from the start of the instances until every
//! one has ended and every line reached the sink:
//!
//! - **start**: N instances of `true` (default 200);
//! - **lines**: 8 instances printing 100 000 lines each (`seq`).
//!
//! ```sh
//! cargo bench --bench local_hop             # 5 runs of each
//! BENCH_RUNS=9 cargo bench --bench local_hop -- 400
//! ```
//!
//! It prints one `RESULT <key> <median ms> <min ms> <max ms> <runs>` line
//! per measurement.

use std::sync::Arc;
use std::time::{Duration, Instant};
use taskherd::log::{InstanceLabel, LogRecord, LogSink, Stream};
use taskherd::protocol::agent::{time_of, FromAgent, ToAgent};
use taskherd::protocol::{Connection, PROTOCOL_VERSION};
use taskherd::supervise::instance::{self, InstanceSpec, Supervision};
use taskherd::supervise::shutdown::Shutdown;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

fn spec(id: u32, script: &str) -> InstanceSpec {
    InstanceSpec::shell("bench", "localhost", id, 1, script)
}

/// Counts the output lines that reach the sink until it closes.
fn count_lines(mut records: mpsc::Receiver<LogRecord>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut lines = 0;
        while let Some(record) = records.recv().await {
            if record.stream == Stream::Stdout {
                lines += record.lines().count();
            }
        }
        lines
    })
}

/// Supervises `specs` as the master does its own instances.
async fn direct(specs: Vec<InstanceSpec>) -> (Duration, usize) {
    let started = Instant::now();
    let (sink, records) = LogSink::channel();
    let counter = count_lines(records);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
    let mut tasks = JoinSet::new();
    for spec in specs {
        let context = Supervision {
            sink: sink.clone(),
            shutdown: Shutdown::new(),
            pids: None,
            events: Some(events_tx.clone()),
        };
        let (_commands_tx, commands_rx) = mpsc::unbounded_channel();
        tasks.spawn(async move {
            let _commands_tx = _commands_tx;
            instance::supervise(spec, context, None, commands_rx, false).await
        });
    }
    drop((sink, events_tx));
    while tasks.join_next().await.is_some() {}
    let lines = counter.await.expect("counter");
    let _ = drain.await;
    (started.elapsed(), lines)
}

/// Supervises `specs` through an agent in this process, relayed as a
/// remote host's are.
async fn through_agent(specs: Vec<InstanceSpec>) -> (Duration, usize) {
    let started = Instant::now();
    let count = specs.len();
    let labels: Vec<Arc<InstanceLabel>> = specs.iter().map(|s| s.label.clone()).collect();
    let (master_end, agent_end) = tokio::io::duplex(1 << 16);
    let (agent_rx, agent_tx) = tokio::io::split(agent_end);
    let agent = tokio::spawn(taskherd::agent::serve(
        agent_rx,
        agent_tx,
        Shutdown::new(),
        None,
    ));
    let mut link = Connection::new(master_end);
    link.write_frame(&ToAgent::Hello {
        version: PROTOCOL_VERSION,
        heartbeat: Duration::from_secs(5),
        orphan_timeout: Duration::from_secs(30),
    })
    .await
    .expect("hello");
    link.write_frame(&ToAgent::Start { instances: specs })
        .await
        .expect("start");
    let (sink, records) = LogSink::channel();
    let counter = count_lines(records);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while events_rx.recv().await.is_some() {} });
    let mut ended = 0;
    while ended < count {
        match link.read_frame::<FromAgent>().await.expect("frame") {
            Some(FromAgent::Log {
                id,
                time_ms,
                level,
                stream,
                message,
            }) => {
                let instance = id.and_then(|id| labels.get(id as usize - 1).cloned());
                sink.send(LogRecord {
                    time: time_of(time_ms),
                    level,
                    instance,
                    stream,
                    message: message.into(),
                })
                .await;
            }
            Some(FromAgent::Event(event)) => {
                let _ = events_tx.send(event);
            }
            Some(FromAgent::Ended { .. }) => ended += 1,
            Some(_) => {}
            None => panic!("the agent closed early"),
        }
    }
    drop(link);
    let _ = agent.await;
    drop((sink, events_tx));
    let lines = counter.await.expect("counter");
    let _ = drain.await;
    (started.elapsed(), lines)
}

fn report(key: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!(
        "RESULT {key} {:.1} {:.1} {:.1} {}",
        ms(&times[times.len() / 2]),
        ms(&times[0]),
        ms(&times[times.len() - 1]),
        times.len()
    );
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let starts: u32 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    const LINES: usize = 100_000;
    const PRINTERS: u32 = 8;
    let start: Vec<InstanceSpec> = (1..=starts).map(|id| spec(id, "true")).collect();
    let print: Vec<InstanceSpec> = (1..=PRINTERS)
        .map(|id| spec(id, &format!("seq 1 {LINES}")))
        .collect();
    let loads = [
        ("start", start, 0),
        ("lines", print, LINES * PRINTERS as usize),
    ];
    for (load, specs, lines) in &loads {
        for (how, agent) in [("direct", false), ("agent", true)] {
            let mut times = Vec::new();
            for _ in 0..runs {
                let (took, seen) = runtime.block_on(async {
                    if agent {
                        through_agent(specs.clone()).await
                    } else {
                        direct(specs.clone()).await
                    }
                });
                assert_eq!(seen, *lines, "{load} {how}: every line");
                times.push(took);
            }
            report(&format!("{load}_{how}"), times);
        }
    }
}
