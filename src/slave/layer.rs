//! [`MasterLayer`]: `tracing` events as log records to the master.

use std::fmt::{self, Write as _};

use tracing::dispatcher::Dispatch;
use tracing::field::{Field, Visit};
use tracing::subscriber::NoSubscriber;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::Layer;

use super::link::Outbox;
use crate::protocol::slave::{FromSlave, Level};

/// A [`tracing_subscriber::Layer`] that sends each event to the master as a
/// log record of the instance.
///
/// The record's message is the event's message followed by its other
/// fields as ` key=value`; its level is mapped from the event's (`ERROR`
/// -> error, `WARN` -> warning, `INFO` -> info, `DEBUG` -> debug, `TRACE`
/// -> trace). Made by [`Handler::tracing_layer`](super::Handler::tracing_layer).
/// Like [`Handler::log`](super::Handler::log) it waits when the queue to
/// the master is full, and does nothing once the master is gone.
#[derive(Clone)]
pub struct MasterLayer {
    /// Queue to the handler's writer task.
    outbox: Outbox,
}

impl MasterLayer {
    pub(crate) fn new(outbox: Outbox) -> Self {
        MasterLayer { outbox }
    }
}

impl fmt::Debug for MasterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterLayer").finish_non_exhaustive()
    }
}

impl<S: Subscriber> Layer<S> for MasterLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = LineVisitor::default();
        event.record(&mut line);
        let level = level_of(event.metadata().level());
        self.outbox.send(FromSlave::Log {
            level,
            message: line.finish(),
        });
    }
}

/// The level of `RUST_LOG` when it is a plain level name (`debug`,
/// `info`, `warn`, `error`, `trace`, `off`), `info` otherwise.
pub(crate) fn env_level() -> LevelFilter {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|value| value.trim().parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO)
}

/// A dispatcher that sends events at [`env_level`] or above to the master,
/// as [`Handler::init_tracing`](super::Handler::init_tracing) installs.
pub(crate) fn master_dispatch(layer: MasterLayer) -> Dispatch {
    Dispatch::new(tracing_subscriber::registry().with(layer.with_filter(env_level())))
}

/// [`master_dispatch`] when the calling thread has no subscriber at all
/// (none global, none scoped), `None` when it has one (which then gets the
/// events as usual). For the slave library's own log lines (a refused
/// consumer, a lost feeder), which must reach the master even from a
/// program that never set up `tracing`.
pub(crate) fn fallback_dispatch(layer: MasterLayer) -> Option<Dispatch> {
    let has_subscriber = tracing::dispatcher::get_default(|current| !current.is::<NoSubscriber>());
    (!has_subscriber).then(|| master_dispatch(layer))
}

/// The protocol level of a `tracing` level.
fn level_of(level: &tracing::Level) -> Level {
    match *level {
        tracing::Level::ERROR => Level::Error,
        tracing::Level::WARN => Level::Warning,
        tracing::Level::INFO => Level::Info,
        tracing::Level::DEBUG => Level::Debug,
        _ => Level::Trace,
    }
}

/// Builds `message key=value key=value` from an event's fields.
#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: String,
}

impl LineVisitor {
    fn finish(self) -> String {
        if self.message.is_empty() {
            self.fields.trim_start().to_string()
        } else {
            self.message + &self.fields
        }
    }

    fn push(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        // Writing to a String cannot fail.
        if field.name() == "message" {
            let _ = self.message.write_fmt(value);
        } else if !field.name().starts_with("log.") {
            let _ = write!(self.fields, " {}={}", field.name(), value);
        }
    }
}

impl Visit for LineVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, format_args!("{value}"));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut text = value.to_string();
        let mut cause = value.source();
        while let Some(err) = cause {
            let _ = write!(text, ": {err}");
            cause = err.source();
        }
        self.push(field, format_args!("{text}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slave::handler::tests::connected;

    #[test]
    fn events_become_log_frames() {
        let (mut master, handler) = connected();
        let subscriber = tracing_subscriber::registry().with(handler.tracing_layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(answer = 42, who = "me", "hello {}", "world");
            tracing::error!(cause = %"disk full", "write failed");
            tracing::trace!(n = 1);
        });
        let expected = [
            (Level::Warning, "hello world answer=42 who=me"),
            (Level::Error, "write failed cause=disk full"),
            (Level::Trace, "n=1"),
        ];
        for (level, message) in expected {
            assert_eq!(
                master.recv(),
                Some(FromSlave::Log {
                    level,
                    message: message.into()
                })
            );
        }
    }

    #[test]
    fn the_fallback_forwards_at_the_level_of_init_tracing() {
        let (mut master, handler) = connected();
        let dispatch =
            fallback_dispatch(handler.tracing_layer()).expect("a test thread has no subscriber");
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::warn!(peer = %"10.0.0.1:5", reason = %"garbage", "consumer refused");
        });
        assert_eq!(
            master.recv_no_ping(),
            Some(FromSlave::Log {
                level: Level::Warning,
                message: "consumer refused peer=10.0.0.1:5 reason=garbage".into()
            })
        );
    }

    #[test]
    fn no_fallback_under_the_program_s_own_subscriber() {
        let (_master, handler) = connected();
        tracing::subscriber::with_default(tracing_subscriber::registry(), || {
            assert!(fallback_dispatch(handler.tracing_layer()).is_none());
        });
    }

    #[test]
    fn levels_map() {
        assert_eq!(level_of(&tracing::Level::ERROR), Level::Error);
        assert_eq!(level_of(&tracing::Level::WARN), Level::Warning);
        assert_eq!(level_of(&tracing::Level::INFO), Level::Info);
        assert_eq!(level_of(&tracing::Level::DEBUG), Level::Debug);
        assert_eq!(level_of(&tracing::Level::TRACE), Level::Trace);
    }
}
