//! The background side of a handler: the tasks that own the control socket,
//! and the outbox through which user threads queue frames for the writer.
//!
//! The socket is split in two halves. The reader task turns a Stop frame or
//! the end of the channel into a cancelled stop token (and, for the latter,
//! arms the orphan guard). The writer task drains a bounded channel of
//! [`Outgoing`] items in order, so a [`Outgoing::Flush`] is answered once
//! every frame queued before it is on the wire.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::protocol::slave::{FromSlave, ToSlave};
use crate::protocol::{decode, encode};

/// How many frames may wait for the writer before senders block.
pub(crate) const OUTBOX_CAPACITY: usize = 1024;

/// Frames read from the master.
pub(crate) type ControlRx = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;
/// Frames written to the master.
pub(crate) type ControlTx = FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>;

/// What runs when the master is gone and the grace has passed.
pub(crate) type Orphaned = Box<dyn FnOnce() + Send + 'static>;

thread_local! {
    /// Set on the handler runtime's own threads, where waiting for the
    /// writer would wait for ourselves.
    static ON_SLAVE_RUNTIME: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as a thread of a handler runtime.
pub(crate) fn mark_slave_runtime_thread() {
    ON_SLAVE_RUNTIME.with(|flag| flag.set(true));
}

/// Runs `f`, which blocks on the handler runtime, from a place where that
/// is allowed.
///
/// From a plain thread `f` runs right here. Inside some other tokio
/// runtime (where blocking calls panic) it runs on a scoped helper thread.
/// On the handler runtime's own threads it does not run at all (`None`):
/// the single worker would wait for itself.
pub(crate) fn outside_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> Option<R> {
    if ON_SLAVE_RUNTIME.with(Cell::get) {
        return None;
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Some(f());
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("taskherd-slave-wait".into())
            .spawn_scoped(scope, f)
            .ok()
            .and_then(|thread| thread.join().ok())
    })
}

/// One item for the writer task.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A frame to send.
    Frame(FromSlave),
    /// Answered once everything queued before it is written and flushed.
    Flush(oneshot::Sender<()>),
}

/// The sending side of the writer channel, shared by the handler and its
/// tracing layer.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    inner: Arc<OutboxInner>,
}

#[derive(Debug)]
struct OutboxInner {
    /// Frames for the writer task; closed once the writer is gone.
    frames_tx: mpsc::Sender<Outgoing>,
    /// Origin of `last_sent_ms`.
    epoch: Instant,
    /// When a frame was last queued, in ms since `epoch`: lets `sleep`
    /// skip a ping when something was sent recently.
    last_sent_ms: AtomicU64,
}

impl Outbox {
    /// Makes an outbox and the receiver the writer task drains.
    pub(crate) fn new() -> (Outbox, mpsc::Receiver<Outgoing>) {
        let (frames_tx, frames_rx) = mpsc::channel(OUTBOX_CAPACITY);
        let inner = OutboxInner {
            frames_tx,
            epoch: Instant::now(),
            last_sent_ms: AtomicU64::new(0),
        };
        (
            Outbox {
                inner: Arc::new(inner),
            },
            frames_rx,
        )
    }

    fn mark_sent(&self) {
        let ms = crate::protocol::millis::of(self.inner.epoch.elapsed());
        self.inner.last_sent_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since a frame was last queued (or since the outbox was made).
    pub(crate) fn since_last_sent(&self) -> Duration {
        let last = Duration::from_millis(self.inner.last_sent_ms.load(Ordering::Relaxed));
        self.inner.epoch.elapsed().saturating_sub(last)
    }

    /// Queues a frame, waiting for room when the writer is behind
    /// (backpressure). Returns `false` when the frame was dropped: the
    /// writer is gone (master gone), or we are on the handler runtime
    /// itself and the queue is full.
    pub(crate) fn send(&self, frame: FromSlave) -> bool {
        use mpsc::error::TrySendError;
        let sent = match self.inner.frames_tx.try_send(Outgoing::Frame(frame)) {
            Ok(()) => true,
            Err(TrySendError::Closed(_)) => false,
            Err(TrySendError::Full(item)) => {
                let frames_tx = &self.inner.frames_tx;
                outside_runtime(|| frames_tx.blocking_send(item).is_ok()).unwrap_or(false)
            }
        };
        if sent {
            self.mark_sent();
        }
        sent
    }

    /// Queues a frame if there is room right now; never waits.
    pub(crate) fn try_send(&self, frame: FromSlave) -> bool {
        let sent = self
            .inner
            .frames_tx
            .try_send(Outgoing::Frame(frame))
            .is_ok();
        if sent {
            self.mark_sent();
        }
        sent
    }

    /// Queues an item from async code, waiting for room.
    pub(crate) async fn send_async(&self, item: Outgoing) -> bool {
        let is_frame = matches!(item, Outgoing::Frame(_));
        let sent = self.inner.frames_tx.send(item).await.is_ok();
        if sent && is_frame {
            self.mark_sent();
        }
        sent
    }

    /// Waits until every item queued so far is written. Returns `false`
    /// when the writer is gone.
    pub(crate) async fn flush(&self) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        self.send_async(Outgoing::Flush(done_tx)).await && done_rx.await.is_ok()
    }
}

/// Reads the master's frames until the channel ends.
///
/// A Stop frame cancels `stop`. The end of the channel (or a broken one)
/// means the master is gone: `stop` is cancelled, and if the process is
/// still alive after `grace`, `orphaned` runs (in production it exits the
/// process). Dropping the runtime cancels this task, so a handler that is
/// dropped never fires the guard.
pub(crate) async fn read_control(
    mut control_rx: ControlRx,
    stop: CancellationToken,
    grace: Duration,
    orphaned: Orphaned,
) {
    while let Some(item) = control_rx.next().await {
        let Ok(body) = item else { break };
        // Anything else (a repeated identity, a message of a newer master)
        // needs nothing from us. A frame we cannot decode is skipped: the
        // framing is intact, so the next one may be fine.
        if let Ok(ToSlave::Stop) = decode::<ToSlave>(&body) {
            stop.cancel();
        }
    }
    stop.cancel();
    tokio::time::sleep(grace).await;
    orphaned();
}

/// Flushes the frames fed so far to the socket.
async fn flush_control(control_tx: &mut ControlTx) -> std::io::Result<()> {
    SinkExt::<bytes::Bytes>::flush(control_tx).await
}

/// Writes queued items in order until the queue closes or the socket
/// breaks. Frames that are ready together are written with one flush.
pub(crate) async fn write_control(
    mut control_tx: ControlTx,
    mut frames_rx: mpsc::Receiver<Outgoing>,
) {
    while let Some(first) = frames_rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Frame(frame) => {
                    // A frame that cannot be encoded (too big) is dropped.
                    if let Ok(body) = encode(&frame) {
                        if control_tx.feed(body).await.is_err() {
                            return;
                        }
                    }
                }
                Outgoing::Flush(done_tx) => {
                    if flush_control(&mut control_tx).await.is_err() {
                        return;
                    }
                    // The waiter may have given up; nothing to do then.
                    let _ = done_tx.send(());
                }
            }
            next = frames_rx.try_recv().ok();
        }
        if flush_control(&mut control_tx).await.is_err() {
            return;
        }
    }
}
