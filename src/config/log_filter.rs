//! Which records are written: a default level plus a level per group,
//! written like `RUST_LOG`: `info,web=debug,batch=warning`.
//!
//! The syntax is a comma-separated list of directives:
//!
//! - `LEVEL`: the lowest level written for records of groups not named in
//!   the filter, and for the master's own events (at most once);
//! - `GROUP=LEVEL`: the lowest level written for records of that group
//!   (its instances' lines and the master's events about them).
//!
//! A level is one of `trace`, `debug`, `info`, `notice`, `warning`,
//! `error`, `critical`, `alert`, `emergency` (also `warn`, `err`, `crit`,
//! `emerg`), or `off` for nothing. Spaces around directives are ignored.
//! Without a default level, `info` applies.

use crate::protocol::slave::Level;
use std::fmt;
use std::str::FromStr;

/// The default level of a filter that does not name one.
const DEFAULT_LEVEL: Level = Level::Info;

/// Which log records are written: a default lowest level, and a lowest
/// level per group.
///
/// Written as a comma-separated list of directives: `LEVEL` for the
/// master's own events and the groups not named (at most once; `info` if
/// missing), `GROUP=LEVEL` for one group (its instances' lines and the
/// master's events about them). A level is `trace`, `debug`, `info`,
/// `notice`, `warning`, `error`, `critical`, `alert`, `emergency` (also
/// `warn`, `err`, `crit`, `emerg`), or `off` for nothing.
///
/// The config holds it (`[log] filter`); the log stream applies it to
/// its records (`LogFilter::enabled`, in the `log` module).
///
/// ```
/// use taskherd::config::LogFilter;
/// let filter: LogFilter = "warning,web=debug".parse().unwrap();
/// assert_eq!(filter.to_string(), "warning,web=debug");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter {
    /// Lowest level of records not covered by `groups`; `None` is `off`.
    default: Option<Level>,
    /// Per-group lowest levels, in the order written (few, so a scan is
    /// cheaper than a map).
    groups: Vec<(String, Option<Level>)>,
}

/// Why a log filter could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    /// Nothing but spaces and commas.
    #[error(
        "empty log filter: write a level such as \"info\", optionally followed by \
         group=level pairs (\"info,web=debug\")"
    )]
    Empty,
    /// `info,,web=debug`.
    #[error("empty directive in log filter {filter:?} (two commas in a row?)")]
    EmptyDirective {
        /// The whole filter.
        filter: String,
    },
    /// A word that is not a level.
    #[error(
        "unknown level {level:?} in {directive:?}: expected trace, debug, info, notice, \
         warning, error, critical, alert, emergency or off{}",
        if directive.contains('=') { "" } else { ", or group=level" }
    )]
    UnknownLevel {
        /// The word.
        level: String,
        /// The directive it is in.
        directive: String,
    },
    /// A group name with characters group names cannot have.
    #[error(
        "invalid group name {group:?} in log filter: use only letters, digits, '_', '.' and '-'"
    )]
    InvalidGroup {
        /// The name as written.
        group: String,
    },
    /// Two directives without a group.
    #[error("two default levels in log filter ({first:?} and {second:?}): write one")]
    DefaultTwice {
        /// The first.
        first: String,
        /// The second.
        second: String,
    },
    /// Two directives for one group.
    #[error("group {group:?} given twice in log filter")]
    GroupTwice {
        /// The group.
        group: String,
    },
}

impl LogFilter {
    /// Every record, `trace` and up.
    pub fn all() -> LogFilter {
        LogFilter::at_least(Some(Level::Trace))
    }

    /// Records of `level` and up (`None`: no record at all), whatever
    /// their group.
    pub fn at_least(level: Option<Level>) -> LogFilter {
        LogFilter {
            default: level,
            groups: Vec::new(),
        }
    }

    /// Parses `info,web=debug` (see [`LogFilter`] for the syntax).
    ///
    /// # Errors
    /// What is wrong, naming the offending directive.
    pub fn parse(text: &str) -> Result<LogFilter, FilterError> {
        if text.split(',').all(|part| part.trim().is_empty()) {
            return Err(FilterError::Empty);
        }
        let mut default: Option<(&str, Option<Level>)> = None;
        let mut groups: Vec<(String, Option<Level>)> = Vec::new();
        for directive in text.split(',').map(str::trim) {
            if directive.is_empty() {
                return Err(FilterError::EmptyDirective {
                    filter: text.to_owned(),
                });
            }
            let level_of = |word: &str| {
                parse_level(word).ok_or_else(|| FilterError::UnknownLevel {
                    level: word.to_owned(),
                    directive: directive.to_owned(),
                })
            };
            match directive.split_once('=') {
                None => {
                    let level = level_of(directive)?;
                    if let Some((first, _)) = default {
                        return Err(FilterError::DefaultTwice {
                            first: first.to_owned(),
                            second: directive.to_owned(),
                        });
                    }
                    default = Some((directive, level));
                }
                Some((group, level)) => {
                    let (group, level) = (group.trim(), level.trim());
                    if !super::is_valid_group_name(group) {
                        return Err(FilterError::InvalidGroup {
                            group: group.to_owned(),
                        });
                    }
                    let level = level_of(level)?;
                    if groups.iter().any(|(known, _)| known == group) {
                        return Err(FilterError::GroupTwice {
                            group: group.to_owned(),
                        });
                    }
                    groups.push((group.to_owned(), level));
                }
            }
        }
        Ok(LogFilter {
            default: default.map_or(Some(DEFAULT_LEVEL), |(_, level)| level),
            groups,
        })
    }

    /// The lowest level written for records of `group` (`None` for the
    /// master's own events); `None` when nothing is.
    pub fn level_for(&self, group: Option<&str>) -> Option<Level> {
        group
            .and_then(|group| self.groups.iter().find(|(name, _)| name == group))
            .map_or(self.default, |(_, level)| *level)
    }

    /// The groups the filter names, in the order written (to check them
    /// against a config).
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().map(|(name, _)| name.as_str())
    }
}

impl Default for LogFilter {
    /// `info`: every record of level `info` and up.
    fn default() -> Self {
        LogFilter::at_least(Some(DEFAULT_LEVEL))
    }
}

impl FromStr for LogFilter {
    type Err = FilterError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        LogFilter::parse(text)
    }
}

impl fmt::Display for LogFilter {
    /// The canonical form, which parses back to the same filter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |level: Option<Level>| level.map_or("off", Level::as_str);
        f.write_str(name(self.default))?;
        for (group, level) in &self.groups {
            write!(f, ",{group}={}", name(*level))?;
        }
        Ok(())
    }
}

/// A level name, or `off` (`Some(None)`); `None` if neither.
fn parse_level(word: &str) -> Option<Option<Level>> {
    if word.eq_ignore_ascii_case("off") {
        return Some(None);
    }
    word.parse::<Level>().ok().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> LogFilter {
        LogFilter::parse(text).unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    #[test]
    fn levels_by_group() {
        let filter = parse("warning,web=debug,quiet=off");
        assert_eq!(filter.level_for(Some("web")), Some(Level::Debug));
        assert_eq!(filter.level_for(Some("quiet")), None);
        assert_eq!(filter.level_for(Some("db")), Some(Level::Warning));
        assert_eq!(filter.level_for(None), Some(Level::Warning));
        assert_eq!(LogFilter::default().level_for(None), Some(Level::Info));
        assert_eq!(parse("off").level_for(Some("web")), None);
    }

    #[test]
    fn parses_and_prints_the_canonical_form() {
        for (text, canonical) in [
            ("info", "info"),
            ("debug", "debug"),
            ("WARN", "warning"),
            ("off", "off"),
            ("web=debug", "info,web=debug"),
            (
                " warning , web = trace,db.main=off ",
                "warning,web=trace,db.main=off",
            ),
            ("web=err,info", "info,web=error"),
            ("info=debug", "info,info=debug"),
        ] {
            let filter = parse(text);
            assert_eq!(filter.to_string(), canonical, "{text}");
            assert_eq!(parse(canonical), filter, "{canonical} round-trips");
        }
        assert_eq!(LogFilter::default(), parse("info"));
        assert_eq!(LogFilter::all(), parse("trace"));
        assert_eq!(
            parse("info,b=debug,a=error").groups().collect::<Vec<_>>(),
            ["b", "a"]
        );
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let err = |text: &str| LogFilter::parse(text).expect_err(text);
        assert_eq!(err(""), FilterError::Empty);
        assert_eq!(err(" , "), FilterError::Empty);
        assert!(err("info,,web=debug").to_string().contains("two commas"));
        assert_eq!(
            err("verbose").to_string(),
            "unknown level \"verbose\" in \"verbose\": expected trace, debug, info, notice, \
             warning, error, critical, alert, emergency or off, or group=level"
        );
        assert_eq!(
            err("info,web=loud").to_string(),
            "unknown level \"loud\" in \"web=loud\": expected trace, debug, info, notice, \
             warning, error, critical, alert, emergency or off"
        );
        assert_eq!(
            err("web:debug"),
            FilterError::UnknownLevel {
                level: "web:debug".into(),
                directive: "web:debug".into()
            }
        );
        assert!(err("we b=debug")
            .to_string()
            .contains("invalid group name \"we b\""));
        assert!(err("=debug")
            .to_string()
            .contains("invalid group name \"\""));
        assert_eq!(
            err("info,debug").to_string(),
            "two default levels in log filter (\"info\" and \"debug\"): write one"
        );
        assert_eq!(
            err("web=info,web=debug").to_string(),
            "group \"web\" given twice in log filter"
        );
        assert!(matches!(err("web="), FilterError::UnknownLevel { .. }));
    }
}
