//! Which records are written: a [`LogFilter`] (parsed with the config, in
//! [`crate::config`]) applied to log records.

use super::LogRecord;
use crate::config::LogFilter;

impl LogFilter {
    /// Whether `record` passes.
    #[inline]
    pub fn enabled(&self, record: &LogRecord) -> bool {
        let group = record.instance.as_ref().map(|label| label.group.as_str());
        self.level_for(group)
            .is_some_and(|lowest| record.level >= lowest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{InstanceLabel, Stream};
    use crate::protocol::slave::Level;
    use std::sync::Arc;
    use std::time::SystemTime;

    fn record(group: Option<&str>, level: Level) -> LogRecord {
        LogRecord {
            time: SystemTime::now(),
            level,
            instance: group.map(|group| {
                Arc::new(InstanceLabel {
                    group: group.into(),
                    host: "localhost".into(),
                    command: "w".into(),
                    id: 1,
                    group_id: 1,
                })
            }),
            stream: Stream::Stdout,
            message: Default::default(),
        }
    }

    fn parse(text: &str) -> LogFilter {
        LogFilter::parse(text).unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    #[test]
    fn matches_by_level_then_group() {
        let filter = parse("warning,web=debug,quiet=off");
        assert!(!filter.enabled(&record(None, Level::Info)));
        assert!(filter.enabled(&record(None, Level::Warning)));
        assert!(filter.enabled(&record(None, Level::Emergency)));
        assert!(!filter.enabled(&record(Some("db"), Level::Notice)));
        assert!(filter.enabled(&record(Some("db"), Level::Error)));
        assert!(filter.enabled(&record(Some("web"), Level::Debug)));
        assert!(!filter.enabled(&record(Some("web"), Level::Trace)));
        assert!(!filter.enabled(&record(Some("quiet"), Level::Emergency)));
        assert_eq!(filter.level_for(Some("web")), Some(Level::Debug));
        assert_eq!(filter.level_for(Some("quiet")), None);
        assert_eq!(filter.level_for(None), Some(Level::Warning));

        let default = LogFilter::default();
        assert!(!default.enabled(&record(Some("web"), Level::Debug)));
        assert!(default.enabled(&record(Some("web"), Level::Info)));
        assert!(LogFilter::all().enabled(&record(None, Level::Trace)));
        assert!(!parse("off").enabled(&record(None, Level::Emergency)));
    }
}
