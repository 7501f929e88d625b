//! Config text to [`Config`], collecting every problem on the way.
//!
//! The TOML is parsed into spanned values ([`DeTable`]) and walked by hand
//! rather than deserialized with serde derive: serde stops at the first error
//! and loses the position of most values, while `taskherd check` should list
//! every problem at once, each with its line and key.
//!
//! Every walker method records what is wrong and falls back to a default, so
//! one bad value never hides the next; the [`Config`] is only handed out if
//! nothing was recorded.

use super::{
    Config, ConfigError, ConfigErrors, GroupSpec, LocalPlacement, LogFormat, MasterSpec,
    RestartPolicy, RestartSpec,
};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A TOML value with the byte range it was read from.
type Value<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &["master", "group"];
const MASTER_KEYS: &[&str] = &["timeout", "stop_grace", "max_running_time", "log_format"];
const GROUP_KEYS: &[&str] = &[
    "name",
    "command",
    "args",
    "params",
    "env",
    "cwd",
    "timeout",
    "stop_grace",
    "restart",
    "local",
];
/// Group keys of the design that later issues implement; naming them beats
/// a bare "unknown key" for someone who copied the design's example.
const GROUP_KEYS_NOT_YET: &[(&str, &str)] = &[
    ("remote", "remote placements are not supported yet"),
    ("feeder", "queue groups (feeder) are not supported yet"),
];
const RESTART_KEYS: &[&str] = &["policy", "initial", "max", "reset_after", "jitter", "limit"];
const LOCAL_KEYS: &[&str] = &["instances"];

const NO_GROUPS: &str =
    "no groups: add at least one [[group]] with a name, a command and [group.local]";
const NO_PLACEMENT: &str = "no placement: add [group.local] with instances = N";

pub(super) fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
    let mut walker = Walker {
        file: source.to_path_buf(),
        text,
        errors: Vec::new(),
    };
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        // Recovery leaves holes (a value that failed to parse is missing),
        // so walking the rest would add misleading "missing key" errors.
        for err in &syntax_errors {
            walker.syntax(err);
        }
        return Err(walker.into_errors());
    }
    let root = root.get_ref();
    walker.check_unknown(root, "", TOP_KEYS, &[]);
    let master = walker.master(root.get("master"));
    let groups = walker.groups(root.get("group"));
    if walker.errors.is_empty() {
        Ok(Config {
            source: source.to_path_buf(),
            master,
            groups,
        })
    } else {
        Err(walker.into_errors())
    }
}

/// Walks the parsed document and collects errors with their positions.
struct Walker<'t> {
    /// Named in every error.
    file: PathBuf,
    /// The config text, to turn byte offsets into lines and columns.
    text: &'t str,
    /// Everything found so far.
    errors: Vec<ConfigError>,
}

impl Walker<'_> {
    /// The errors in file order (tables are walked in key order, not file order).
    fn into_errors(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|err| (err.line, err.column));
        ConfigErrors(self.errors)
    }

    fn error(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn syntax(&mut self, err: &toml::de::Error) {
        let span = err.span().unwrap_or(0..0);
        self.error(span, "(syntax)", err.message());
    }

    fn wrong_type(&mut self, value: &Value<'_>, key: &str, expected: &str) {
        let found = value.get_ref().type_str();
        self.error(
            value.span(),
            key,
            format!("expected {expected}, found {found}"),
        );
    }

    /// 1-based line and column of a byte offset; the column counts
    /// characters, as editors do.
    fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// Reports keys of `table` that are not in `allowed`, with a hint when
    /// one of them is close or a known future key.
    fn check_unknown(
        &mut self,
        table: &DeTable<'_>,
        path: &str,
        allowed: &[&str],
        not_yet: &[(&str, &str)],
    ) {
        for key in table.keys() {
            let name: &str = key.get_ref();
            if allowed.contains(&name) {
                continue;
            }
            let message = if let Some((_, hint)) = not_yet.iter().find(|(k, _)| *k == name) {
                format!("unknown key {name:?}: {hint}")
            } else if let Some(close) = closest(name, allowed) {
                format!("unknown key {name:?}, did you mean {close:?}?")
            } else {
                format!(
                    "unknown key {name:?}; expected one of: {}",
                    allowed.join(", ")
                )
            };
            self.error(key.span(), &child(path, name), message);
        }
    }

    fn table<'v, 'i>(&mut self, key: &str, value: &'v Value<'i>) -> Option<&'v DeTable<'i>> {
        let table = value.get_ref().as_table();
        if table.is_none() {
            self.wrong_type(value, key, "a table");
        }
        table
    }

    fn string(&mut self, key: &str, value: &Value<'_>) -> Option<String> {
        let string = value.get_ref().as_str().map(str::to_owned);
        if string.is_none() {
            self.wrong_type(value, key, "a string");
        }
        string
    }

    fn non_empty_string(&mut self, key: &str, value: &Value<'_>) -> Option<String> {
        let string = self.string(key, value)?;
        if string.trim().is_empty() {
            self.error(value.span(), key, "must not be empty");
            return None;
        }
        Some(string)
    }

    fn strings(&mut self, key: &str, value: &Value<'_>) -> Vec<String> {
        let Some(items) = value.get_ref().as_array() else {
            self.wrong_type(value, key, "an array of strings");
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.string(&index(key, i), item))
            .collect()
    }

    /// TOML integers are kept as text by the parser; this is where they
    /// get their range check.
    fn integer(&mut self, key: &str, value: &Value<'_>) -> Option<i64> {
        let Some(integer) = value.get_ref().as_integer() else {
            self.wrong_type(value, key, "an integer");
            return None;
        };
        let parsed = i64::from_str_radix(integer.as_str(), integer.radix()).ok();
        if parsed.is_none() {
            self.error(
                value.span(),
                key,
                format!("integer {integer} does not fit in 64 bits"),
            );
        }
        parsed
    }

    fn float(&mut self, key: &str, value: &Value<'_>) -> Option<f64> {
        match value.get_ref() {
            DeValue::Float(float) => {
                let parsed = float.as_str().parse::<f64>().ok();
                if parsed.is_none() {
                    self.error(value.span(), key, format!("invalid float {float}"));
                }
                parsed
            }
            // Precision loss above 2^53 is irrelevant for a fraction.
            DeValue::Integer(_) => self.integer(key, value).map(|i| i as f64),
            _ => {
                self.wrong_type(value, key, "a number");
                None
            }
        }
    }

    fn duration(&mut self, key: &str, value: &Value<'_>) -> Option<Duration> {
        match value.get_ref() {
            DeValue::String(text) => match humantime::parse_duration(text) {
                Ok(duration) => Some(duration),
                Err(err) => {
                    self.error(
                        value.span(),
                        key,
                        format!("invalid duration {text:?}: {err}"),
                    );
                    None
                }
            },
            DeValue::Integer(integer) => {
                self.error(
                    value.span(),
                    key,
                    format!(
                        "durations are strings like \"30s\", found integer {integer} \
                         (write \"{integer}s\" for seconds)"
                    ),
                );
                None
            }
            other => {
                let found = other.type_str();
                self.error(
                    value.span(),
                    key,
                    format!("durations are strings like \"30s\", found {found}"),
                );
                None
            }
        }
    }

    fn master(&mut self, value: Option<&Value<'_>>) -> MasterSpec {
        let mut master = MasterSpec::default();
        let Some(table) = value.and_then(|value| self.table("master", value)) else {
            return master;
        };
        self.check_unknown(table, "master", MASTER_KEYS, &[]);
        if let Some(value) = table.get("timeout") {
            if let Some(timeout) = self.duration("master.timeout", value) {
                master.timeout = timeout;
            }
        }
        if let Some(value) = table.get("stop_grace") {
            if let Some(grace) = self.duration("master.stop_grace", value) {
                master.stop_grace = grace;
            }
        }
        if let Some(value) = table.get("max_running_time") {
            master.max_running_time = self.duration("master.max_running_time", value);
        }
        if let Some(value) = table.get("log_format") {
            let key = "master.log_format";
            master.log_format = match self.string(key, value).as_deref() {
                Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    let message =
                        format!("unknown log format {other:?}: expected \"text\" or \"json\"");
                    self.error(value.span(), key, message);
                    LogFormat::default()
                }
                None => LogFormat::default(),
            };
        }
        master
    }

    fn groups(&mut self, value: Option<&Value<'_>>) -> Vec<GroupSpec> {
        let Some(value) = value else {
            self.error(0..0, "group", NO_GROUPS);
            return Vec::new();
        };
        let Some(items) = value.get_ref().as_array() else {
            self.wrong_type(value, "group", "an array of tables ([[group]])");
            return Vec::new();
        };
        if items.is_empty() {
            self.error(value.span(), "group", NO_GROUPS);
        }
        // Group name -> line of its first use, for the duplicate error.
        let mut first_lines = BTreeMap::new();
        items
            .iter()
            .enumerate()
            .map(|(i, item)| self.group(i + 1, item, &mut first_lines))
            .collect()
    }

    /// `number` counts from 1, as users count groups.
    fn group(
        &mut self,
        number: usize,
        value: &Value<'_>,
        first_lines: &mut BTreeMap<String, usize>,
    ) -> GroupSpec {
        let path = format!("group[{number}]");
        let mut group = GroupSpec {
            name: String::new(),
            command: String::new(),
            args: Vec::new(),
            params: serde_json::Value::Object(serde_json::Map::new()),
            env: BTreeMap::new(),
            cwd: None,
            restart: RestartSpec::default(),
            timeout: None,
            stop_grace: None,
            local: None,
            remote: Vec::new(),
        };
        let Some(table) = self.table(&path, value) else {
            return group;
        };
        self.check_unknown(table, &path, GROUP_KEYS, GROUP_KEYS_NOT_YET);

        let key = child(&path, "name");
        match table.get("name") {
            Some(name) => {
                if let Some(valid) = self.group_name(&key, name, first_lines) {
                    group.name = valid;
                }
            }
            None => self.error(value.span(), &key, "missing required key \"name\""),
        }
        let key = child(&path, "command");
        match table.get("command") {
            Some(command) => {
                group.command = self.non_empty_string(&key, command).unwrap_or_default();
            }
            None => self.error(value.span(), &key, "missing required key \"command\""),
        }
        if let Some(args) = table.get("args") {
            group.args = self.strings(&child(&path, "args"), args);
        }
        if let Some(params) = table.get("params") {
            group.params = self.params(&child(&path, "params"), params);
        }
        if let Some(env) = table.get("env") {
            group.env = self.env(&child(&path, "env"), env);
        }
        if let Some(cwd) = table.get("cwd") {
            group.cwd = self
                .non_empty_string(&child(&path, "cwd"), cwd)
                .map(PathBuf::from);
        }
        if let Some(timeout) = table.get("timeout") {
            group.timeout = self.duration(&child(&path, "timeout"), timeout);
        }
        if let Some(grace) = table.get("stop_grace") {
            group.stop_grace = self.duration(&child(&path, "stop_grace"), grace);
        }
        if let Some(restart) = table.get("restart") {
            group.restart = self.restart(&child(&path, "restart"), restart);
        }
        match table.get("local") {
            Some(local) => group.local = self.local(&child(&path, "local"), local),
            None => self.error(value.span(), &path, NO_PLACEMENT),
        }
        group
    }

    fn group_name(
        &mut self,
        key: &str,
        value: &Value<'_>,
        first_lines: &mut BTreeMap<String, usize>,
    ) -> Option<String> {
        let name = self.non_empty_string(key, value)?;
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if !name.chars().all(allowed) {
            let message =
                format!("invalid group name {name:?}: use only letters, digits, '_', '.' and '-'");
            self.error(value.span(), key, message);
            return None;
        }
        let (line, _) = self.position(value.span().start);
        if let Some(first) = first_lines.get(&name) {
            let message = format!("duplicate group name {name:?} (first used on line {first})");
            self.error(value.span(), key, message);
            return None;
        }
        first_lines.insert(name.clone(), line);
        Some(name)
    }

    /// Params go to instances as JSON, so they must be a JSON object.
    fn params(&mut self, key: &str, value: &Value<'_>) -> serde_json::Value {
        if self.table(key, value).is_none() {
            return serde_json::Value::Object(serde_json::Map::new());
        }
        self.json(key, value)
    }

    fn json(&mut self, key: &str, value: &Value<'_>) -> serde_json::Value {
        use serde_json::Value as Json;
        match value.get_ref() {
            DeValue::String(text) => Json::String(text.to_string()),
            DeValue::Integer(_) => self.integer(key, value).map_or(Json::Null, Json::from),
            DeValue::Float(_) => {
                let number = self.float(key, value);
                match number.and_then(serde_json::Number::from_f64) {
                    Some(number) => Json::Number(number),
                    None => {
                        if number.is_some() {
                            let message = "inf and nan cannot be represented in JSON";
                            self.error(value.span(), key, message);
                        }
                        Json::Null
                    }
                }
            }
            DeValue::Boolean(flag) => Json::Bool(*flag),
            // JSON has no date type; RFC 3339 text is what a reader expects.
            DeValue::Datetime(datetime) => Json::String(datetime.to_string()),
            DeValue::Array(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.json(&index(key, i), item))
                    .collect(),
            ),
            DeValue::Table(table) => Json::Object(
                table
                    .iter()
                    .map(|(name, item)| {
                        let name: &str = name.get_ref();
                        (name.to_owned(), self.json(&child(key, name), item))
                    })
                    .collect(),
            ),
        }
    }

    fn env(&mut self, key: &str, value: &Value<'_>) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some(table) = self.table(key, value) else {
            return env;
        };
        for (spanned_name, value) in table.iter() {
            let name: &str = spanned_name.get_ref();
            let var_key = child(key, name);
            if name.is_empty() || name.contains(['=', '\0']) {
                let message = format!(
                    "invalid environment variable name {name:?}: \
                     it must be non-empty without '=' or NUL"
                );
                self.error(spanned_name.span(), &var_key, message);
                continue;
            }
            match value.get_ref() {
                DeValue::String(text) => {
                    env.insert(name.to_owned(), text.to_string());
                }
                DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_) => {
                    let found = value.get_ref().type_str();
                    let literal = self.text.get(value.span()).unwrap_or_default();
                    let message = format!(
                        "expected a string, found {found}; environment values are strings, \
                         write \"{literal}\""
                    );
                    self.error(value.span(), &var_key, message);
                }
                _ => self.wrong_type(value, &var_key, "a string"),
            }
        }
        env
    }

    fn restart(&mut self, path: &str, value: &Value<'_>) -> RestartSpec {
        let mut restart = RestartSpec::default();
        let Some(table) = self.table(path, value) else {
            return restart;
        };
        self.check_unknown(table, path, RESTART_KEYS, &[]);
        if let Some(policy) = table.get("policy") {
            if let Some(policy) = self.policy(&child(path, "policy"), policy) {
                restart.policy = policy;
            }
        }
        let initial = table.get("initial");
        let initial_ok = match initial.map(|v| self.duration(&child(path, "initial"), v)) {
            Some(Some(duration)) => {
                restart.initial = duration;
                true
            }
            Some(None) => false,
            None => true,
        };
        let max = table.get("max");
        let max_ok = match max.map(|v| self.duration(&child(path, "max"), v)) {
            Some(Some(duration)) => {
                restart.max = duration;
                true
            }
            Some(None) => false,
            None => true,
        };
        if let Some(value) = table.get("reset_after") {
            if let Some(duration) = self.duration(&child(path, "reset_after"), value) {
                restart.reset_after = duration;
            }
        }
        if let Some(value) = table.get("jitter") {
            let key = child(path, "jitter");
            if let Some(jitter) = self.float(&key, value) {
                if (0.0..=1.0).contains(&jitter) {
                    restart.jitter = jitter;
                } else {
                    let message = format!("must be between 0 and 1, found {jitter}");
                    self.error(value.span(), &key, message);
                }
            }
        }
        if let Some(value) = table.get("limit") {
            restart.limit = self.limit(&child(path, "limit"), value);
        }
        // Only compare values the user wrote correctly (or left at their
        // defaults); a bad value already has its own error.
        if initial_ok && max_ok && restart.max < restart.initial {
            let initial_text = humantime::format_duration(restart.initial);
            let max_text = humantime::format_duration(restart.max);
            match (max, initial) {
                (Some(max), _) => self.error(
                    max.span(),
                    &child(path, "max"),
                    format!("must not be less than initial ({initial_text}), found {max_text}"),
                ),
                (None, Some(initial)) => self.error(
                    initial.span(),
                    &child(path, "initial"),
                    format!(
                        "must not be more than max ({max_text}, the default), \
                         found {initial_text}; set max too"
                    ),
                ),
                // The defaults are consistent, so one of them was set.
                (None, None) => {}
            }
        }
        restart
    }

    fn policy(&mut self, key: &str, value: &Value<'_>) -> Option<RestartPolicy> {
        const POLICIES: &[&str] = &["never", "on-failure", "always"];
        match self.string(key, value)?.as_str() {
            "never" => Some(RestartPolicy::Never),
            "on-failure" => Some(RestartPolicy::OnFailure),
            "always" => Some(RestartPolicy::Always),
            other => {
                let message = match closest(other, POLICIES) {
                    Some(close) => format!("unknown policy {other:?}, did you mean {close:?}?"),
                    None => format!(
                        "unknown policy {other:?}: expected \"never\", \"on-failure\" or \"always\""
                    ),
                };
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// `None` means unlimited; on error the default limit stays.
    fn limit(&mut self, key: &str, value: &Value<'_>) -> Option<u32> {
        let default = RestartSpec::default().limit;
        const EXPECTED: &str = "a non-negative integer or \"unlimited\"";
        match value.get_ref() {
            DeValue::String(text) if text == "unlimited" => None,
            DeValue::String(text) => {
                self.error(
                    value.span(),
                    key,
                    format!("expected {EXPECTED}, found string {text:?}"),
                );
                default
            }
            DeValue::Integer(_) => {
                let Some(limit) = self.integer(key, value) else {
                    return default;
                };
                match u32::try_from(limit) {
                    Ok(limit) => Some(limit),
                    Err(_) if limit < 0 => {
                        let message = format!("must be 0 or more, or \"unlimited\", found {limit}");
                        self.error(value.span(), key, message);
                        default
                    }
                    Err(_) => {
                        let message = format!("too large: {limit} (at most {})", u32::MAX);
                        self.error(value.span(), key, message);
                        default
                    }
                }
            }
            _ => {
                self.wrong_type(value, key, EXPECTED);
                default
            }
        }
    }

    fn local(&mut self, path: &str, value: &Value<'_>) -> Option<LocalPlacement> {
        let table = self.table(path, value)?;
        self.check_unknown(table, path, LOCAL_KEYS, &[]);
        let key = child(path, "instances");
        let Some(instances) = table.get("instances") else {
            self.error(value.span(), &key, "missing required key \"instances\"");
            return None;
        };
        let count = self.integer(&key, instances)?;
        match u32::try_from(count) {
            Ok(count) if count >= 1 => Some(LocalPlacement { instances: count }),
            _ if count < 1 => {
                let message = format!("must be at least 1, found {count}");
                self.error(instances.span(), &key, message);
                None
            }
            _ => {
                let message = format!("too many instances: {count} (at most {})", u32::MAX);
                self.error(instances.span(), &key, message);
                None
            }
        }
    }
}

/// `parent.key`, quoting keys that a bare TOML key could not spell.
fn child(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    match (parent.is_empty(), bare) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{key:?}"),
        (false, true) => format!("{parent}.{key}"),
        (false, false) => format!("{parent}.{key:?}"),
    }
}

/// `parent[n]`, counting from 1 like groups.
fn index(parent: &str, zero_based: usize) -> String {
    format!("{parent}[{}]", zero_based + 1)
}

/// The allowed key closest to a misspelled one, if it is close enough to
/// be a likely typo rather than a different word.
fn closest<'a>(key: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= (candidate.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over characters (case-insensitive, since `Name`
/// for `name` is a typo too).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Config {
        parse(text, Path::new("conf/herd.toml")).unwrap_or_else(|errors| panic!("{errors}"))
    }

    fn parse_err(text: &str) -> Vec<ConfigError> {
        match parse(text, Path::new("conf/herd.toml")) {
            Ok(config) => panic!("expected errors, got {config:#?}"),
            Err(ConfigErrors(errors)) => {
                assert!(!errors.is_empty());
                errors
            }
        }
    }

    fn only_error(text: &str) -> ConfigError {
        let errors = parse_err(text);
        assert_eq!(errors.len(), 1, "{}", ConfigErrors(errors.clone()));
        errors.into_iter().next().expect("checked above")
    }

    /// Asserts the place and key of an error and that its message contains `part`.
    #[track_caller]
    fn assert_error(err: &ConfigError, line: usize, key: &str, part: &str) {
        assert_eq!((err.line, err.key.as_str()), (line, key), "{err}");
        assert!(err.message.contains(part), "{err}\nshould contain: {part}");
        assert_eq!(err.file, Path::new("conf/herd.toml"));
    }

    #[test]
    fn full_config_with_every_key() {
        let config = parse_ok(
            r#"[master]
timeout = "45s"
stop_grace = "3s"
max_running_time = "1h 30m"
log_format = "json"

[[group]]
name = "workers.v2_a-b"
command = "./bin/worker"
args = ["--fast", "-n", "3"]
params = { message = "Hello World!" }
env = { RUST_LOG = "info" }
cwd = "data"
timeout = "0s"
stop_grace = "250ms"
restart = { policy = "always", initial = "2s", max = "1m", reset_after = "5m", jitter = 0.25, limit = 3 }

[group.local]
instances = 3

[[group]]
name = "jobs"
command = "queue_worker"

[group.restart]
policy = "never"
jitter = 1
limit = "unlimited"

[group.local]
instances = 1
"#,
        );
        assert_eq!(config.source, Path::new("conf/herd.toml"));
        assert_eq!(
            config.master,
            MasterSpec {
                timeout: Duration::from_secs(45),
                stop_grace: Duration::from_secs(3),
                max_running_time: Some(Duration::from_secs(90 * 60)),
                log_format: LogFormat::Json,
            }
        );
        assert_eq!(config.groups.len(), 2);
        let workers = &config.groups[0];
        assert_eq!(workers.name, "workers.v2_a-b");
        assert_eq!(workers.command, "./bin/worker", "kept as written");
        assert_eq!(workers.args, ["--fast", "-n", "3"]);
        assert_eq!(
            workers.params,
            serde_json::json!({ "message": "Hello World!" })
        );
        assert_eq!(
            workers.env,
            BTreeMap::from([("RUST_LOG".to_owned(), "info".to_owned())])
        );
        assert_eq!(workers.cwd, Some(PathBuf::from("data")), "kept as written");
        assert_eq!(workers.timeout, Some(Duration::ZERO));
        assert_eq!(workers.stop_grace, Some(Duration::from_millis(250)));
        assert_eq!(
            workers.restart,
            RestartSpec {
                policy: RestartPolicy::Always,
                initial: Duration::from_secs(2),
                max: Duration::from_secs(60),
                jitter: 0.25,
                reset_after: Duration::from_secs(300),
                limit: Some(3),
            }
        );
        assert_eq!(workers.local, Some(LocalPlacement { instances: 3 }));
        assert_eq!(workers.instance_count(), 3);

        let jobs = &config.groups[1];
        assert_eq!(jobs.name, "jobs");
        assert_eq!(jobs.restart.policy, RestartPolicy::Never);
        assert_eq!(jobs.restart.jitter, 1.0);
        assert_eq!(jobs.restart.limit, None);
        assert_eq!(jobs.restart.initial, RestartSpec::default().initial);
        assert_eq!(jobs.local, Some(LocalPlacement { instances: 1 }));
    }

    #[test]
    fn defaults_when_keys_are_omitted() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "/bin/true"
[group.local]
instances = 2
"#,
        );
        assert_eq!(config.master, MasterSpec::default());
        assert_eq!(config.master.timeout, Duration::from_secs(30));
        assert_eq!(config.master.stop_grace, Duration::from_secs(10));
        assert_eq!(config.master.max_running_time, None);
        assert_eq!(config.master.log_format, LogFormat::Text);
        let group = &config.groups[0];
        assert!(group.args.is_empty());
        assert_eq!(group.params, serde_json::json!({}));
        assert!(group.env.is_empty());
        assert_eq!(group.cwd, None);
        assert_eq!(group.timeout, None);
        assert_eq!(group.stop_grace, None);
        assert_eq!(group.restart, RestartSpec::default());
        assert_eq!(group.local, Some(LocalPlacement { instances: 2 }));
    }

    #[test]
    fn params_convert_nested_tables_and_arrays_to_json() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "w"
[group.params]
name = "x"
count = 0x10
ratio = 1.5
on = true
when = 1979-05-27T07:32:00Z
list = [1, "two", [3.0], { four = 4 }]
[group.params.nested.deeper]
empty = []
[group.local]
instances = 1
"#,
        );
        assert_eq!(
            config.groups[0].params,
            serde_json::json!({
                "name": "x",
                "count": 16,
                "ratio": 1.5,
                "on": true,
                "when": "1979-05-27T07:32:00Z",
                "list": [1, "two", [3.0], { "four": 4 }],
                "nested": { "deeper": { "empty": [] } },
            })
        );
    }

    #[test]
    fn params_errors() {
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
params = { big = 99999999999999999999, list = [1, nan] }
[group.local]
instances = 1
[[group]]
name = "v"
command = "v"
params = [1]
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            4,
            "group[1].params.big",
            "does not fit in 64 bits",
        );
        assert_error(
            &errors[1],
            4,
            "group[1].params.list[2]",
            "cannot be represented in JSON",
        );
        assert_error(
            &errors[2],
            10,
            "group[2].params",
            "expected a table, found array",
        );
    }

    #[test]
    fn unknown_keys_suggest_the_closest_known_key() {
        let errors = parse_err(
            r#"[master]
timout = "1s"
[[group]]
name = "w"
command = "w"
stop_gace = "1s"
restart = { policy = "on-failure", intial = "1s" }
[group.local]
instance = 2
color = "red"
"#,
        );
        assert_eq!(errors.len(), 6, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 2, "master.timout", r#"did you mean "timeout"?"#);
        assert_eq!(errors[0].column, 1);
        assert_error(
            &errors[1],
            6,
            "group[1].stop_gace",
            r#"did you mean "stop_grace"?"#,
        );
        assert_error(
            &errors[2],
            7,
            "group[1].restart.intial",
            r#"did you mean "initial"?"#,
        );
        assert_eq!(errors[2].column, 36, "points at the key");
        // The misspelled key leaves the table without the real one, which
        // is reported at the table header.
        assert_error(
            &errors[3],
            8,
            "group[1].local.instances",
            "missing required key",
        );
        assert_error(
            &errors[4],
            9,
            "group[1].local.instance",
            r#"did you mean "instances"?"#,
        );
        assert_error(
            &errors[5],
            10,
            "group[1].local.color",
            "expected one of: instances",
        );
    }

    #[test]
    fn remote_and_feeder_are_not_supported_yet() {
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
[group.local]
instances = 1
[[group.remote]]
hosts = ["web1"]
[group.feeder]
host = "local"
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            6,
            "group[1].remote",
            "remote placements are not supported yet",
        );
        assert_error(&errors[1], 8, "group[1].feeder", "not supported yet");
    }

    #[test]
    fn wrong_types_name_what_was_expected_and_found() {
        let errors = parse_err(
            r#"[master]
log_format = true
[[group]]
name = 5
command = "w"
args = ["a", 2]
env = { A = 1, B = ["x"] }
cwd = 3
[group.local]
instances = "3"
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 7, "{text}");
        assert_error(
            &errors[0],
            2,
            "master.log_format",
            "expected a string, found boolean",
        );
        assert_error(
            &errors[1],
            4,
            "group[1].name",
            "expected a string, found integer",
        );
        assert_error(
            &errors[2],
            6,
            "group[1].args[2]",
            "expected a string, found integer",
        );
        assert_error(
            &errors[3],
            7,
            "group[1].env.A",
            r#"found integer; environment values are strings, write "1""#,
        );
        assert_error(
            &errors[4],
            7,
            "group[1].env.B",
            "expected a string, found array",
        );
        assert_error(
            &errors[5],
            8,
            "group[1].cwd",
            "expected a string, found integer",
        );
        assert_error(
            &errors[6],
            10,
            "group[1].local.instances",
            "expected an integer, found string",
        );
    }

    #[test]
    fn duplicate_group_names_point_at_the_second() {
        let err = only_error(
            r#"[[group]]
name = "w"
command = "w"
[group.local]
instances = 1

[[group]]
name = "w"
command = "w"
[group.local]
instances = 1
"#,
        );
        assert_error(
            &err,
            8,
            "group[2].name",
            r#"duplicate group name "w" (first used on line 2)"#,
        );
        assert_eq!(err.column, 8, "points at the value");
    }

    #[test]
    fn invalid_and_empty_names() {
        let errors = parse_err(
            r#"[[group]]
name = "a b"
command = "w"
[group.local]
instances = 1
[[group]]
name = ""
command = "w"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            2,
            "group[1].name",
            r#"invalid group name "a b""#,
        );
        assert_error(&errors[1], 7, "group[2].name", "must not be empty");
    }

    #[test]
    fn instances_must_be_at_least_one() {
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
[group.local]
instances = 0
[[group]]
name = "b"
command = "w"
local = { instances = -2 }
[[group]]
name = "c"
command = "w"
local = { instances = 5000000000 }
"#,
        );
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            5,
            "group[1].local.instances",
            "must be at least 1, found 0",
        );
        assert_error(
            &errors[1],
            9,
            "group[2].local.instances",
            "must be at least 1, found -2",
        );
        assert_error(
            &errors[2],
            13,
            "group[3].local.instances",
            "too many instances",
        );
    }

    #[test]
    fn empty_command() {
        let err = only_error(
            r#"[[group]]
name = "w"
command = " "
[group.local]
instances = 1
"#,
        );
        assert_error(&err, 3, "group[1].command", "must not be empty");
    }

    #[test]
    fn group_without_placement() {
        let err = only_error(
            r#"
[[group]]
name = "w"
command = "w"
"#,
        );
        assert_error(&err, 2, "group[1]", NO_PLACEMENT);
        assert_eq!(
            err.to_string(),
            "conf/herd.toml:2:1: group[1]: no placement: add [group.local] with instances = N"
        );
    }

    #[test]
    fn missing_required_keys_point_at_the_group_header() {
        let errors = parse_err(
            r#"[[group]]
name = "ok"
command = "w"
local = { instances = 1 }

  [[group]]
args = []
[group.local]
"#,
        );
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            6,
            "group[2].name",
            r#"missing required key "name""#,
        );
        assert_eq!(errors[0].column, 3);
        assert_error(
            &errors[1],
            6,
            "group[2].command",
            r#"missing required key "command""#,
        );
        assert_error(
            &errors[2],
            8,
            "group[2].local.instances",
            r#"missing required key "instances""#,
        );
    }

    #[test]
    fn bad_durations_name_the_value_and_the_reason() {
        let errors = parse_err(
            r#"[master]
timeout = "5 parsecs"
stop_grace = 30
max_running_time = ""
[[group]]
name = "w"
command = "w"
timeout = 1.5
restart = { reset_after = "1x" }
[group.local]
instances = 1
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 5, "{text}");
        assert_error(
            &errors[0],
            2,
            "master.timeout",
            r#"invalid duration "5 parsecs": unknown time unit "parsecs""#,
        );
        assert_eq!(errors[0].column, 11, "points at the value");
        assert_error(
            &errors[1],
            3,
            "master.stop_grace",
            r#"durations are strings like "30s", found integer 30"#,
        );
        assert_error(
            &errors[2],
            4,
            "master.max_running_time",
            r#"invalid duration "": value was empty"#,
        );
        assert_error(
            &errors[3],
            8,
            "group[1].timeout",
            "durations are strings like \"30s\", found float",
        );
        assert_error(
            &errors[4],
            9,
            "group[1].restart.reset_after",
            r#"invalid duration "1x""#,
        );
    }

    #[test]
    fn restart_checks() {
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
restart = { initial = "5s", max = "1s", jitter = 1.5, limit = -1, policy = "on_failure" }
local = { instances = 1 }
[[group]]
name = "b"
command = "w"
local = { instances = 1 }
[group.restart]
initial = "2m"
jitter = -0.1
limit = "forever"
policy = "sometimes"
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 8, "{text}");
        let find = |key: &str| {
            errors
                .iter()
                .find(|e| e.key == key)
                .unwrap_or_else(|| panic!("no error for {key} in\n{text}"))
        };
        assert_error(
            find("group[1].restart.max"),
            4,
            "group[1].restart.max",
            "must not be less than initial (5s), found 1s",
        );
        assert_error(
            find("group[1].restart.jitter"),
            4,
            "group[1].restart.jitter",
            "must be between 0 and 1, found 1.5",
        );
        assert_error(
            find("group[1].restart.limit"),
            4,
            "group[1].restart.limit",
            "must be 0 or more",
        );
        assert_error(
            find("group[1].restart.policy"),
            4,
            "group[1].restart.policy",
            r#"did you mean "on-failure"?"#,
        );
        assert_error(
            find("group[2].restart.initial"),
            11,
            "group[2].restart.initial",
            "must not be more than max (30s, the default)",
        );
        assert_error(
            find("group[2].restart.jitter"),
            12,
            "group[2].restart.jitter",
            "must be between 0 and 1",
        );
        assert_error(
            find("group[2].restart.limit"),
            13,
            "group[2].restart.limit",
            r#"found string "forever""#,
        );
        assert_error(
            find("group[2].restart.policy"),
            14,
            "group[2].restart.policy",
            r#"expected "never", "on-failure" or "always""#,
        );
    }

    #[test]
    fn a_bad_duration_does_not_also_report_max_below_initial() {
        let err = only_error(
            r#"[[group]]
name = "a"
command = "w"
restart = { initial = "2m", max = "oops" }
local = { instances = 1 }
"#,
        );
        assert_error(&err, 4, "group[1].restart.max", "invalid duration");
    }

    #[test]
    fn no_groups() {
        let err = only_error("[master]\ntimeout = \"1s\"\n");
        assert_error(&err, 1, "group", "no groups");
        let err = only_error("group = []\n");
        assert_error(&err, 1, "group", "no groups");
        let err = only_error("[group]\nname = \"w\"\n");
        assert_error(
            &err,
            1,
            "group",
            "expected an array of tables ([[group]]), found table",
        );
    }

    #[test]
    fn several_problems_are_reported_at_once_in_file_order() {
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = ""
timeout = "soon"
[group.local]
instances = 0
"#,
        );
        let keys: Vec<_> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (3, "group[1].command"),
                (4, "group[1].timeout"),
                (6, "group[1].local.instances"),
            ]
        );
        let all = ConfigErrors(errors).to_string();
        assert_eq!(all.lines().count(), 3, "one line per error:\n{all}");
    }

    #[test]
    fn syntax_errors_have_a_line_and_nothing_else_is_reported() {
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w
[group.local]
instances = 1
"#,
        );
        assert!(
            errors.iter().all(|e| e.key == "(syntax)"),
            "{}",
            ConfigErrors(errors.clone())
        );
        assert_eq!(errors[0].line, 3);

        let err = only_error("[master]\ntimeout = \"1s\"\ntimeout = \"2s\"\n");
        assert_error(&err, 3, "(syntax)", "duplicate key");
    }

    #[test]
    fn columns_count_characters() {
        let err = only_error(
            r#"[[group]]
name = "w"
command = "w"
env = { "ÄÖ=" = "x" }
[group.local]
instances = 1
"#,
        );
        assert_error(
            &err,
            4,
            r#"group[1].env."ÄÖ=""#,
            "invalid environment variable name",
        );
        assert_eq!(err.column, 9);
    }

    #[test]
    fn closest_only_suggests_near_misses() {
        assert_eq!(closest("stop_gace", GROUP_KEYS), Some("stop_grace"));
        assert_eq!(closest("Name", GROUP_KEYS), Some("name"));
        assert_eq!(closest("groups", TOP_KEYS), Some("group"));
        assert_eq!(closest("color", GROUP_KEYS), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
