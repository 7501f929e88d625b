//! The last sign of life of a running instance: what its liveness
//! timeout is measured from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Last sign of life of a running process, shared by its output readers
/// and control link (writers) and its supervisor (reader at deadlines
/// only), so that a line costs one atomic store and no message.
#[derive(Debug)]
pub(super) struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    /// No sign of life yet: its clock starts now.
    pub(super) fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// A sign of life, now.
    pub(super) fn touch(&self) {
        let ms = crate::protocol::millis::of(self.epoch.elapsed());
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the last sign of life was (the start, before any).
    pub(super) fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}
