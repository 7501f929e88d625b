//! [`MasterLayer`]: `tracing` events as log records to the master.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
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
    use tracing_subscriber::layer::SubscriberExt as _;

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
    fn levels_map() {
        assert_eq!(level_of(&tracing::Level::ERROR), Level::Error);
        assert_eq!(level_of(&tracing::Level::WARN), Level::Warning);
        assert_eq!(level_of(&tracing::Level::INFO), Level::Info);
        assert_eq!(level_of(&tracing::Level::DEBUG), Level::Debug);
        assert_eq!(level_of(&tracing::Level::TRACE), Level::Trace);
    }
}
