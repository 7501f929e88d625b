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

use super::probe::{Probe, Spot};
use super::{
    BuiltinFeeder, Config, ConfigError, ConfigErrors, ConsumerRun, ExitCodes, GroupSpec,
    HealthProbe, HealthSpec, HooksSpec, HostSpec, HttpSpec, HttpToken, KnownHostsPolicy, Limits,
    LocalPlacement, LogColor, LogFormat, LogSpec, MasterSpec, NatsSpec, QueueBackend, QueueSpec,
    ReadyProbe, ReadySpec, RemotePlacement, RestartPolicy, RestartSpec, SshOptions,
    DEFAULT_HEALTH_FAILURES, DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_HTTP_HEADER_TIMEOUT, DEFAULT_HTTP_MAX_BODY, DEFAULT_HTTP_MAX_CONNECTIONS,
    DEFAULT_HTTP_PORT, DEFAULT_READY_INTERVAL, DEFAULT_READY_TIMEOUT, HTTP_TOKEN_ENV, MAX_LOG_KEEP,
};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A TOML value with the byte range it was read from.
type Value<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &[
    "master",
    "log",
    "ssh",
    "inventory",
    "host_vars",
    "group",
    "include",
    "http",
    "nats",
];
/// Top-level keys of an included file.
const INCLUDED_TOP_KEYS: &[&str] = &["group", "include"];
const MASTER_KEYS: &[&str] = &[
    "timeout",
    "stop_grace",
    "max_running_time",
    "log_format",
    "heartbeat",
    "orphan_timeout",
    "agent_dir",
    "agent_path",
    "state_dir",
    "max_handshakes",
    "max_active_hosts",
];
/// Keys of `[http]`.
const HTTP_KEYS: &[&str] = &[
    "bind",
    "token",
    "token_file",
    "max_body",
    "header_timeout",
    "max_connections",
];
/// Keys of `[log]`.
const LOG_KEYS: &[&str] = &["format", "file", "max_size", "keep", "filter", "color"];
/// Keys of `[ssh]`, and the per-placement overrides of `[[group.remote]]`.
const SSH_KEYS: &[&str] = &[
    "ssh_config",
    "identity_file",
    "known_hosts",
    "jump_host",
    "connect_timeout",
    "give_up_after",
];
const GROUP_KEYS: &[&str] = &[
    "name",
    "command",
    "args",
    "params",
    "env",
    "cwd",
    "timeout",
    "stop_grace",
    "max_lifetime",
    "time_limit",
    "max_jobs",
    "restart",
    "local",
    "remote",
    "feeder",
    "queue",
    "consumer",
    "autostart",
    "hooks",
    "health",
    "user",
    "group",
    "limits",
    "after",
    "ready",
];
/// Keys of `[group.ready]`.
const READY_KEYS: &[&str] = &[
    "notify", "tcp", "http", "command", "log", "timeout", "interval",
];
/// Keys of `[group.limits]`.
const LIMIT_KEYS: &[&str] = &["nofile", "nproc", "core", "memory"];
/// Keys of `[group.health]`.
const HEALTH_KEYS: &[&str] = &["tcp", "http", "command", "interval", "timeout", "failures"];
/// Keys of `[group.hooks]`.
const HOOK_KEYS: &[&str] = &[
    "on_failure",
    "on_restart",
    "on_exhausted",
    "on_stop",
    "timeout",
];
const RESTART_KEYS: &[&str] = &["policy", "initial", "max", "reset_after", "jitter", "limit"];
const LOCAL_KEYS: &[&str] = &["instances", "concurrency"];
/// Keys of `[[group.remote]]` besides the [`SSH_KEYS`] overrides.
const REMOTE_KEYS: &[&str] = &["hosts", "instances", "command", "cwd", "env", "concurrency"];
/// Keys of `[group.feeder]`.
const FEEDER_KEYS: &[&str] = &["host", "bind", "file", "jsonl", "command", "args"];
/// Keys of `[group.consumer]`.
const CONSUMER_KEYS: &[&str] = &["run", "done_codes", "retry_codes", "dead_codes"];
/// Keys of `[group.queue]`.
const QUEUE_KEYS: &[&str] = &[
    "lease",
    "max_attempts",
    "retry_initial",
    "retry_max",
    "credits",
    "rate",
    "progress_every",
    "joblog",
    "fail_on_dead",
    "backend",
    "stream",
    "subject",
];
/// Keys of `[nats]`.
const NATS_KEYS: &[&str] = &[
    "servers", "user", "password", "token", "creds", "nkey", "tls_ca", "replicas", "storage",
];
const NATS_FEEDER: &str = "a queue group with backend = \"nats\" has no feeder serving its \
                           consumers: its [group.feeder] may only fill the JetStream queue, \
                           with jsonl = \"jobs.jsonl\" or command = \"...\", on the master's \
                           host (no host, bind or file); producers also publish with taskherd \
                           queue add or any NATS client";

const NO_GROUPS: &str = "no groups: add at least one [[group]] with a name, a command and \
                         [group.local] or [[group.remote]]";
const NO_PLACEMENT: &str = "no placement: add [group.local] with instances = N, \
                            or [[group.remote]] with hosts and instances";
const NO_CONSUMERS: &str = "a queue group needs consumers: add [group.local] or [[group.remote]]";
const ONE_FEEDER: &str = "a queue group has exactly one feeder: write one [group.feeder] table, \
                          not [[group.feeder]]";
const QUEUE_WITHOUT_FEEDER: &str = "a [group.queue] table needs [group.feeder]";
const CONSUMER_WITHOUT_FEEDER: &str = "a [group.consumer] table needs [group.feeder]: consumers \
                                       are the instances of a queue group";
const EXEC_NEEDS_FILE: &str = "exec consumers need a built-in feeder: add file = \"jobs.queue\", \
                               jsonl = \"jobs.jsonl\" or command = \"...\" to [group.feeder] \
                               (the group's command is what each job runs, so it cannot be the \
                               feeder too)";
const COPROCESS_NEEDS_FILE: &str = "coprocess consumers need a built-in feeder: add file = \
                                    \"jobs.queue\", jsonl = \"jobs.jsonl\" or command = \"...\" \
                                    to [group.feeder] (the group's command is the coprocess, so \
                                    it cannot be the feeder too)";
const ARGS_WITHOUT_COMMAND: &str = "args are the arguments of the feeder's command: add \
                                    command = \"...\" to [group.feeder]";
const CONCURRENCY_NOT_QUEUE: &str = "concurrency is for queue groups ([group.feeder])";
const RATE_EXAMPLE: &str = "jobs per second, minute or hour, such as \"200/s\", \"5/m\", \
                            \"0.5/s\" or \"1000/h\"";

/// What parsing a config found: the config when it is valid, every
/// problem otherwise, and what `taskherd check` may look for on this
/// machine either way.
pub(super) struct Parsed {
    /// The config, if nothing is wrong with it.
    pub(super) config: Option<Config>,
    /// Every problem, with the index of its file (0: the main one) for
    /// ordering.
    pub(super) errors: Vec<(usize, ConfigError)>,
    /// Programs, directories, files and hosts the config names, each with
    /// where it is written.
    pub(super) probes: Vec<Probe>,
}

impl Parsed {
    /// The config, or every problem found in file order.
    pub(super) fn into_result(self) -> Result<Config, ConfigErrors> {
        match self.config {
            Some(config) if self.errors.is_empty() => Ok(config),
            _ => Err(sorted_errors(self.errors)),
        }
    }
}

/// Errors in file order: the main file first, then the included ones in
/// the order they were read; within a file by line and column (tables are
/// walked in key order, not file order). The same error found twice is
/// kept once.
pub(super) fn sorted_errors(mut errors: Vec<(usize, ConfigError)>) -> ConfigErrors {
    errors.sort_by_key(|(source, err)| (*source, err.line, err.column));
    errors.dedup();
    ConfigErrors(errors.into_iter().map(|(_, err)| err).collect())
}

#[cfg(test)]
pub(super) fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
    parse_all(text.to_owned(), source).into_result()
}

/// Parses and validates the main config file's `text` and the files it
/// includes (read from disk, relative to `source`'s directory).
pub(super) fn parse_all(text: String, source: &Path) -> Parsed {
    let mut errors = Vec::new();
    let home = super::probe::home_dir();
    let sources = collect_sources(text, source, home.as_deref(), &mut errors);
    let mut walker = Walker {
        sources: &sources,
        current: 0,
        errors,
        probes: Vec::new(),
        home,
        uninterpolated: Vec::new(),
        inventory: BTreeMap::new(),
    };
    let mut roots = Vec::with_capacity(sources.len());
    let mut syntax = false;
    for (index, file) in sources.iter().enumerate() {
        let (root, syntax_errors) = DeTable::parse_recoverable(&file.text);
        walker.current = index;
        for err in &syntax_errors {
            walker.syntax(err);
        }
        syntax |= !syntax_errors.is_empty();
        roots.push(root);
    }
    if syntax {
        // Recovery leaves holes (a value that failed to parse is missing),
        // so walking the rest would add misleading "missing key" errors.
        return Parsed {
            config: None,
            errors: walker.errors,
            probes: Vec::new(),
        };
    }
    // Groups are numbered across files, in the order they are read.
    let mut first_group = 0;
    for (index, root) in roots.iter_mut().enumerate() {
        walker.current = index;
        let groups = walker.interpolate_root(root.get_mut(), first_group);
        first_group += groups;
    }
    walker.current = 0;
    let root = roots[0].get_ref();
    walker.check_unknown(root, "", TOP_KEYS, &[]);
    let main_name = source.display().to_string();
    for (index, root) in roots.iter().enumerate().skip(1) {
        walker.current = index;
        let hint = format!(
            "an included file holds [[group]] tables (and include); \
             set it in the main config file, {main_name}"
        );
        let hints: Vec<(&str, &str)> = [
            "master",
            "log",
            "ssh",
            "inventory",
            "host_vars",
            "http",
            "nats",
        ]
        .iter()
        .map(|key| (*key, hint.as_str()))
        .collect();
        walker.check_unknown(root.get_ref(), "", INCLUDED_TOP_KEYS, &hints);
    }
    walker.current = 0;
    let master = walker.master(root.get("master"));
    let log = walker.log(root.get("log"), root.get("master"));
    let ssh = walker.ssh(root.get("ssh"));
    let http = walker.http(root.get("http"));
    let nats = root
        .get("nats")
        .and_then(|value| walker.nats(value))
        .map(Box::new);
    walker.inventory(root.get("inventory"));
    let host_vars = walker.host_vars(root.get("host_vars"));
    let group_values: Vec<(usize, &Value<'_>)> = roots
        .iter()
        .enumerate()
        .filter_map(|(index, root)| Some((index, root.get_ref().get("group")?)))
        .collect();
    let mut groups = walker.groups(&group_values, &ssh);
    walker.check_order(&group_values, &groups);
    apply_host_vars(&mut groups, &host_vars);
    walker.current = 0;
    walker.log_filter_groups(root.get("log"), &log, &groups);
    let config = walker.errors.is_empty().then(|| Config {
        source: source.to_path_buf(),
        master,
        log,
        groups,
        http,
        nats,
    });
    Parsed {
        config,
        errors: walker.errors,
        probes: walker.probes,
    }
}

/// One file of a config: the main one, or one it includes.
struct SourceFile {
    /// As errors name it: the main file as given, an included file as the
    /// directory of the file including it joined with the entry.
    file: PathBuf,
    /// Its text.
    text: String,
    /// The directory relative paths written in it start from (absolute
    /// when the current directory is known).
    dir: PathBuf,
}

/// The span of an optional value (the table's, for a key it lacks).
fn value_span(value: Option<&Value<'_>>) -> Range<usize> {
    value.map_or(0..0, |value| value.span())
}

/// `http.bind`: `host:port`, `:port` (loopback) or a port alone.
fn parse_bind(text: &str) -> Result<std::net::SocketAddr, String> {
    let text = text.trim();
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    if let Ok(port) = text.trim_start_matches(':').parse::<u16>() {
        return Ok(std::net::SocketAddr::new(loopback, port));
    }
    if let Ok(address) = text.parse::<std::net::SocketAddr>() {
        return Ok(address);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(std::net::SocketAddr::new(loopback, port));
        }
    }
    Err(format!(
        "{text:?} is not an address: expected IP:PORT such as \"127.0.0.1:{DEFAULT_HTTP_PORT}\" \
         or \"0.0.0.0:{DEFAULT_HTTP_PORT}\" (a port alone listens on 127.0.0.1)"
    ))
}

/// The directory of `file`, absolute when possible.
fn dir_of(file: &Path) -> PathBuf {
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// The main file and every file it includes, depth first in the order of
/// the `include` entries (a glob's matches in name order): the order their
/// groups are numbered in. Problems with `include` entries go to `errors`.
fn collect_sources(
    text: String,
    main: &Path,
    home: Option<&Path>,
    errors: &mut Vec<(usize, ConfigError)>,
) -> Vec<SourceFile> {
    let sources = vec![SourceFile {
        file: main.to_path_buf(),
        text,
        dir: dir_of(main),
    }];
    // A config parsed from text may name a file that does not exist.
    let identity = std::fs::canonicalize(main)
        .or_else(|_| std::path::absolute(main))
        .unwrap_or_else(|_| main.to_path_buf());
    let mut collector = Collector {
        sources,
        errors,
        home,
        chain: vec![identity.clone()],
        seen: vec![(identity, 0)],
    };
    collector.include_from(0);
    collector.sources
}

/// State of [`collect_sources`].
struct Collector<'e, 'h> {
    sources: Vec<SourceFile>,
    errors: &'e mut Vec<(usize, ConfigError)>,
    /// For `~` in entries.
    home: Option<&'h Path>,
    /// Canonical paths of the files being included, outermost first: one
    /// of them again is a cycle.
    chain: Vec<PathBuf>,
    /// Canonical path of every file read so far, with its source index.
    seen: Vec<(PathBuf, usize)>,
}

impl Collector<'_, '_> {
    fn error(&mut self, index: usize, offset: usize, key: &str, message: String) {
        let source = &self.sources[index];
        let (line, column) = position(&source.text, offset);
        self.errors.push((
            index,
            ConfigError {
                file: source.file.clone(),
                line,
                column,
                key: key.to_owned(),
                message,
            },
        ));
    }

    /// Reads the files that source `source` includes, and theirs.
    fn include_from(&mut self, source: usize) {
        for (i, span, entry) in self.entries(source) {
            let key = index("include", i);
            let Some(path) = super::probe::expand_home(&entry, self.home) else {
                let message = format!("cannot expand ~ in {entry:?}: HOME is not set");
                self.error(source, span.start, &key, message);
                continue;
            };
            let path = match self.sources[source].file.parent() {
                Some(dir) if path.is_relative() => dir.join(path),
                _ => path,
            };
            let path = super::probe::clean_path(&path);
            let files = if entry.contains(['*', '?', '[']) {
                match self.glob(&path) {
                    Ok(files) => files,
                    Err(message) => {
                        self.error(source, span.start, &key, message);
                        continue;
                    }
                }
            } else {
                vec![path]
            };
            for file in files {
                if let Err(message) = self.include(file) {
                    self.error(source, span.start, &key, message);
                }
            }
        }
    }

    /// The `include` entries of source `source`, interpolated: (position
    /// in the array, span, text). A file with syntax errors includes
    /// nothing (its errors are reported when it is walked).
    fn entries(&mut self, source: usize) -> Vec<(usize, Range<usize>, String)> {
        let text = &self.sources[source].text;
        let (root, syntax_errors) = DeTable::parse_recoverable(text);
        let Some(value) = root
            .get_ref()
            .get("include")
            .filter(|_| syntax_errors.is_empty())
        else {
            return Vec::new();
        };
        const EXPECTED: &str = "expected an array of file names or glob patterns, \
                                such as include = [\"conf.d/*.toml\"]";
        let mut entries = Vec::new();
        let mut problems = Vec::new();
        match value.get_ref().as_array() {
            None => {
                let found = value.get_ref().type_str();
                problems.push((
                    value.span(),
                    "include".to_owned(),
                    format!("{EXPECTED}, found {found}"),
                ));
            }
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let key = index("include", i);
                    match item.get_ref().as_str() {
                        None => {
                            let found = item.get_ref().type_str();
                            problems.push((item.span(), key, format!("{EXPECTED}, found {found}")));
                        }
                        Some(entry) => match interpolate(entry, &env_var) {
                            Ok(entry) if entry.trim().is_empty() => {
                                problems.push((item.span(), key, "must not be empty".to_owned()));
                            }
                            Ok(entry) => entries.push((i, item.span(), entry)),
                            Err((dollar, message)) => {
                                let offset = raw_offset(text, item.span(), dollar);
                                problems.push((offset..offset, key, message));
                            }
                        },
                    }
                }
            }
        }
        for (span, key, message) in problems {
            self.error(source, span.start, &key, message);
        }
        entries
    }

    /// The files a glob pattern matches, in name order (directories left
    /// out). Matching nothing is fine.
    fn glob(&self, pattern: &Path) -> Result<Vec<PathBuf>, String> {
        let text = pattern.to_string_lossy();
        let paths =
            glob::glob(&text).map_err(|err| format!("invalid glob pattern {text:?}: {err}"))?;
        let mut files = Vec::new();
        for path in paths {
            let path = path
                .map_err(|err| format!("cannot read {}: {}", err.path().display(), err.error()))?;
            if !path.is_dir() {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Reads `file` and what it includes.
    fn include(&mut self, file: PathBuf) -> Result<(), String> {
        let identity = std::fs::canonicalize(&file).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                format!("included file {} does not exist", file.display())
            } else {
                format!("cannot read included file {}: {err}", file.display())
            }
        })?;
        if let Some(at) = self.chain.iter().position(|f| *f == identity) {
            let mut names: Vec<String> = self.chain[at..]
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            names.push(identity.display().to_string());
            return Err(format!(
                "including {} makes a cycle: {}",
                file.display(),
                names.join(" -> ")
            ));
        }
        if let Some((_, first)) = self.seen.iter().find(|(f, _)| *f == identity) {
            let first = &self.sources[*first].file;
            return Err(format!(
                "{} is already part of the config (as {}); include each file once",
                file.display(),
                first.display()
            ));
        }
        let bytes = std::fs::read(&file)
            .map_err(|err| format!("cannot read included file {}: {err}", file.display()))?;
        let dir = dir_of(&file);
        let new = self.sources.len();
        let text = match decode(bytes, &file) {
            Ok(text) => text,
            Err(err) => {
                self.errors.push((new, err));
                String::new()
            }
        };
        self.sources.push(SourceFile { file, text, dir });
        self.seen.push((identity.clone(), new));
        self.chain.push(identity);
        self.include_from(new);
        self.chain.pop();
        Ok(())
    }
}

/// The text of a config file, or where it stops being UTF-8.
///
/// # Errors
/// A [`ConfigError`] naming the file, the line and the byte offset of the
/// first byte that is not UTF-8.
pub(super) fn decode(bytes: Vec<u8>, file: &Path) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|err| {
        let offset = err.utf8_error().valid_up_to();
        let bytes = err.as_bytes();
        // Everything before `offset` is valid.
        let before = std::str::from_utf8(&bytes[..offset]).unwrap_or_default();
        let (line, column) = position(before, offset);
        ConfigError {
            file: file.to_path_buf(),
            line,
            column,
            key: "(encoding)".to_owned(),
            message: format!(
                "not valid UTF-8: byte 0x{:02x} at byte offset {offset}; \
                 save the file as UTF-8",
                bytes[offset]
            ),
        }
    })
}

/// 1-based line and column of a byte offset in `text`; the column counts
/// characters, as editors do.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A variable of the master's environment, for [`interpolate`].
fn env_var(name: &str) -> Result<Option<String>, String> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(format!("environment variable {name} is not valid UTF-8"))
        }
    }
}

/// `text` with `${NAME}` and `${NAME:-default}` replaced by the variable
/// (the default when it is unset or empty) and `$$` by `$`; any other `$`
/// stays as it is (`$HOME` in a shell command is the shell's).
///
/// # Errors
/// The index of the offending `$` among the `$` of `text`, and what is
/// wrong.
fn interpolate(
    text: &str,
    var: &dyn Fn(&str) -> Result<Option<String>, String>,
) -> Result<String, (usize, String)> {
    const ESCAPE: &str = "write $$ for a literal $";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut dollars = 0;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
            dollars += 2;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            dollars += 1;
            continue;
        };
        let Some(close) = body.find('}') else {
            return Err((
                dollars,
                format!("unclosed ${{ (expected ${{NAME}}; {ESCAPE})"),
            ));
        };
        let inner = &body[..close];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err((
                dollars,
                format!(
                    "invalid ${{{inner}}}: expected ${{NAME}} or ${{NAME:-default}}, NAME made \
                     of letters, digits and '_'; {ESCAPE}"
                ),
            ));
        }
        let value = var(name).map_err(|message| (dollars, message))?;
        match (value, default) {
            (Some(value), Some(default)) if value.is_empty() => out.push_str(default),
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err((
                    dollars,
                    format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} \
                         for a default; {ESCAPE})"
                    ),
                ))
            }
        }
        // A `$` in the default is its own.
        dollars += 1 + default.map_or(0, |default| default.matches('$').count());
        rest = &body[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The byte offset in the file of the `dollar`-th `$` of the string
/// written at `span` (escapes aside, a `$` is written as itself); the start
/// of the value if it cannot be found.
fn raw_offset(text: &str, span: Range<usize>, dollar: usize) -> usize {
    text.get(span.clone())
        .and_then(|raw| raw.match_indices('$').nth(dollar))
        .map_or(span.start, |(at, _)| span.start + at)
}

/// Walks the parsed documents and collects errors with their positions.
struct Walker<'t> {
    /// The main file (index 0) and the files it includes.
    sources: &'t [SourceFile],
    /// The source being walked: errors name it, positions are in its text.
    current: usize,
    /// Everything found so far, with the index of its source.
    errors: Vec<(usize, ConfigError)>,
    /// What `check` may look for on this machine.
    probes: Vec<Probe>,
    /// The home directory, for `~` in paths.
    home: Option<PathBuf>,
    /// (source, start) of the strings whose interpolation failed: no
    /// probe for them (their error says enough).
    uninterpolated: Vec<(usize, usize)>,
    /// `[inventory]`: the host entries (ranges expanded) of each group of
    /// hosts, named `@name` in placements.
    inventory: BTreeMap<String, Vec<String>>,
}

impl<'t> Walker<'t> {
    /// The file being walked.
    fn file(&self) -> &'t Path {
        &self.sources[self.current].file
    }

    /// The text being walked, to turn byte offsets into lines and columns.
    fn text(&self) -> &'t str {
        &self.sources[self.current].text
    }

    /// Where `span` starts in the current file, for `key`.
    fn spot(&self, span: Range<usize>, key: &str) -> Spot {
        let (line, column) = self.position(span.start);
        Spot {
            source: self.current,
            file: self.file().to_path_buf(),
            line,
            column,
            key: key.to_owned(),
        }
    }

    fn error(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let error = self.spot(span, key).error(message);
        self.errors.push(error);
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

    /// 1-based line and column of a byte offset in the current file.
    fn position(&self, offset: usize) -> (usize, usize) {
        position(self.text(), offset)
    }

    /// `line N`, or `FILE:N` when `source` is not the current file.
    fn line_name(&self, (source, line): (usize, usize)) -> String {
        if source == self.current {
            format!("line {line}")
        } else {
            format!("{}:{line}", self.sources[source].file.display())
        }
    }

    /// Interpolates every string value of a document (its `include`
    /// entries aside: they were read before); `first_group` is the number
    /// of groups in the files before it. Returns its number of groups.
    fn interpolate_root(&mut self, root: &mut DeTable<'_>, first_group: usize) -> usize {
        let mut groups = 0;
        for (key, value) in root.iter_mut() {
            let name: &str = key.get_ref();
            match (name, value.get_mut()) {
                ("include", _) => {}
                ("group", DeValue::Array(items)) => {
                    groups = items.len();
                    for (i, item) in items.iter_mut().enumerate() {
                        self.interpolate(&index("group", first_group + i), item);
                    }
                }
                _ => self.interpolate(&child("", name), value),
            }
        }
        groups
    }

    /// Replaces `${NAME}`, `${NAME:-default}` and `$$` in the strings of
    /// `value` (`key`, for errors).
    fn interpolate(&mut self, key: &str, value: &mut Value<'_>) {
        let span = value.span();
        match value.get_mut() {
            DeValue::String(text) if text.contains('$') => match interpolate(text, &env_var) {
                Ok(new) => *text = new.into(),
                Err((dollar, message)) => {
                    self.uninterpolated.push((self.current, span.start));
                    let offset = raw_offset(self.text(), span, dollar);
                    self.error(offset..offset, key, message);
                }
            },
            DeValue::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.interpolate(&index(key, i), item);
                }
            }
            DeValue::Table(table) => {
                for (name, item) in table.iter_mut() {
                    let name: &str = name.get_ref();
                    self.interpolate(&child(key, name), item);
                }
            }
            _ => {}
        }
    }

    /// A local path key: `~` expanded; in an included file, a relative
    /// path made absolute against that file's directory (in the main file
    /// it is kept as written, and resolved against
    /// [`Config::base_dir`] when used).
    fn local_path(&mut self, key: &str, value: &Value<'_>, text: String) -> Option<PathBuf> {
        let Some(path) = super::probe::expand_home(&text, self.home.as_deref()) else {
            let message = format!("cannot expand ~ in {text:?}: HOME is not set");
            self.error(value.span(), key, message);
            return None;
        };
        if self.current == 0 || path.is_absolute() {
            return Some(path);
        }
        Some(super::probe::clean_path(
            &self.sources[self.current].dir.join(path),
        ))
    }

    /// Where a local path of the current file leads, for probes.
    fn resolved(&self, path: &Path) -> PathBuf {
        super::probe::clean_path(&self.sources[self.current].dir.join(path))
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

    /// Like [`Walker::duration`], and zero is an error too.
    fn positive_duration(&mut self, key: &str, value: &Value<'_>) -> Option<Duration> {
        let duration = self.duration(key, value)?;
        if duration.is_zero() {
            let found = humantime::format_duration(duration);
            self.error(
                value.span(),
                key,
                format!("must be greater than 0, found {found}"),
            );
            return None;
        }
        Some(duration)
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
        // `log_format` is read with the `[log]` table.
        let heartbeat = table.get("heartbeat");
        let heartbeat_ok = match heartbeat.map(|v| self.positive_duration("master.heartbeat", v)) {
            Some(Some(duration)) => {
                master.heartbeat = duration;
                true
            }
            Some(None) => false,
            None => true,
        };
        let orphan = table.get("orphan_timeout");
        let orphan_ok = match orphan.map(|v| self.duration("master.orphan_timeout", v)) {
            Some(Some(duration)) => {
                master.orphan_timeout = duration;
                true
            }
            Some(None) => false,
            None => true,
        };
        // As in `restart`: only compare values that are right on their own.
        if heartbeat_ok && orphan_ok && master.orphan_timeout <= master.heartbeat {
            let heartbeat_text = humantime::format_duration(master.heartbeat);
            let orphan_text = humantime::format_duration(master.orphan_timeout);
            match (orphan, heartbeat) {
                (Some(orphan), Some(_)) => self.error(
                    orphan.span(),
                    "master.orphan_timeout",
                    format!(
                        "must be greater than heartbeat ({heartbeat_text}), found {orphan_text}"
                    ),
                ),
                (Some(orphan), None) => self.error(
                    orphan.span(),
                    "master.orphan_timeout",
                    format!(
                        "must be greater than heartbeat ({heartbeat_text}, the default), \
                         found {orphan_text}"
                    ),
                ),
                (None, Some(heartbeat)) => self.error(
                    heartbeat.span(),
                    "master.heartbeat",
                    format!(
                        "must be less than orphan_timeout ({orphan_text}, the default), \
                         found {heartbeat_text}; set orphan_timeout too"
                    ),
                ),
                // The defaults are consistent, so one of them was set.
                (None, None) => {}
            }
        }
        if let Some(value) = table.get("agent_dir") {
            if let Some(dir) = self.non_empty_string("master.agent_dir", value) {
                master.agent_dir = dir;
            }
        }
        if let Some(value) = table.get("agent_path") {
            master.agent_path = self.non_empty_string("master.agent_path", value);
        }
        if let Some(value) = table.get("state_dir") {
            master.state_dir = self
                .non_empty_string("master.state_dir", value)
                .and_then(|dir| self.local_path("master.state_dir", value, dir));
        }
        if let Some(value) = table.get("max_handshakes") {
            if let Some(count) = self.count("master.max_handshakes", value) {
                master.max_handshakes = count;
            }
        }
        if let Some(value) = table.get("max_active_hosts") {
            master.max_active_hosts = self.count("master.max_active_hosts", value);
        }
        master
    }

    /// The `[log]` table, and `[master] log_format`, the older name of
    /// its `format`.
    fn log(&mut self, value: Option<&Value<'_>>, master: Option<&Value<'_>>) -> LogSpec {
        let mut log = LogSpec::default();
        let old_format = master
            .and_then(|master| master.get_ref().as_table())
            .and_then(|master| master.get("log_format"));
        if let Some(value) = old_format {
            if let Some(format) = self.log_format("master.log_format", value) {
                log.format = format;
            }
        }
        let Some(table) = value.and_then(|value| self.table("log", value)) else {
            return log;
        };
        let hint = [("log_format", "in [log] it is called \"format\"")];
        self.check_unknown(table, "log", LOG_KEYS, &hint);
        if let Some(value) = table.get("format") {
            if let Some(old) = old_format {
                self.error(
                    old.span(),
                    "master.log_format",
                    "the log format is set twice: keep [log] format (master.log_format \
                     is its older name)",
                );
            }
            if let Some(format) = self.log_format("log.format", value) {
                log.format = format;
            }
        }
        if let Some(value) = table.get("file") {
            log.file = self
                .non_empty_string("log.file", value)
                .and_then(|file| self.local_path("log.file", value, file));
        }
        if let Some(value) = table.get("max_size") {
            if let Some(size) = self.size("log.max_size", value) {
                log.max_size = size;
            }
        }
        if let Some(value) = table.get("keep") {
            if let Some(keep) = self.integer("log.keep", value) {
                match u32::try_from(keep) {
                    Ok(keep) if (1..=MAX_LOG_KEEP).contains(&keep) => log.keep = keep,
                    _ => self.error(
                        value.span(),
                        "log.keep",
                        format!("must be from 1 to {MAX_LOG_KEEP}, found {keep}"),
                    ),
                }
            }
        }
        if let Some(value) = table.get("filter") {
            if let Some(text) = self.string("log.filter", value) {
                match text.parse() {
                    Ok(filter) => log.filter = filter,
                    Err(err) => self.error(value.span(), "log.filter", format!("{err}")),
                }
            }
        }
        if let Some(value) = table.get("color") {
            const CHOICES: &[&str] = &["auto", "always", "never"];
            log.color = match self.string("log.color", value).as_deref() {
                Some("auto") => LogColor::Auto,
                Some("always") => LogColor::Always,
                Some("never") => LogColor::Never,
                Some(other) => {
                    let message = match closest(other, CHOICES) {
                        Some(close) => format!("unknown color {other:?}, did you mean {close:?}?"),
                        None => format!(
                            "unknown color {other:?}: expected \"auto\", \"always\" or \"never\""
                        ),
                    };
                    self.error(value.span(), "log.color", message);
                    LogColor::default()
                }
                None => LogColor::default(),
            };
        }
        log
    }

    /// The `[http]` table: `None` when absent (no HTTP server).
    fn http(&mut self, value: Option<&Value<'_>>) -> Option<Box<HttpSpec>> {
        let table = self.table("http", value?)?;
        self.check_unknown(table, "http", HTTP_KEYS, &[]);
        let mut http = HttpSpec {
            bind: std::net::SocketAddr::from(([127, 0, 0, 1], DEFAULT_HTTP_PORT)),
            token: HttpToken::Environment,
            max_body: DEFAULT_HTTP_MAX_BODY,
            header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
        };
        if let Some(value) = table.get("bind") {
            if let Some(text) = self.string("http.bind", value) {
                match parse_bind(&text) {
                    Ok(bind) => http.bind = bind,
                    Err(message) => self.error(value.span(), "http.bind", message),
                }
            }
        }
        match (table.get("token"), table.get("token_file")) {
            (Some(_), Some(file)) => self.error(
                file.span(),
                "http.token_file",
                "the token is set twice: keep token or token_file",
            ),
            (Some(value), None) => {
                if let Some(token) = self.non_empty_string("http.token", value) {
                    http.token = HttpToken::Text(token.trim().to_string());
                }
            }
            (None, Some(value)) => {
                if let Some(path) = self
                    .non_empty_string("http.token_file", value)
                    .and_then(|text| self.local_path("http.token_file", value, text))
                {
                    http.token = HttpToken::File(path);
                }
            }
            (None, None) => {}
        }
        if let Some(value) = table.get("max_body") {
            if let Some(size) = self.size("http.max_body", value) {
                http.max_body = size;
            }
        }
        self.http_connection_limits(table, &mut http);
        let env_token = std::env::var(HTTP_TOKEN_ENV).is_ok_and(|token| !token.trim().is_empty());
        if !http.bind.ip().is_loopback() && http.token == HttpToken::Environment && !env_token {
            let span = table
                .get("bind")
                .map_or_else(|| value_span(value), |bind| bind.span());
            self.error(
                span,
                "http.bind",
                format!(
                    "{} is reachable beyond this machine: set http.token, http.token_file \
                     or {HTTP_TOKEN_ENV}, or bind to 127.0.0.1",
                    http.bind
                ),
            );
        }
        Some(Box::new(http))
    }

    /// `http.header_timeout` and `http.max_connections`.
    fn http_connection_limits(&mut self, table: &DeTable<'_>, http: &mut HttpSpec) {
        if let Some(value) = table.get("header_timeout") {
            if let Some(timeout) = self.positive_duration("http.header_timeout", value) {
                http.header_timeout = timeout;
            }
        }
        if let Some(value) = table.get("max_connections") {
            if let Some(count) = self.count("http.max_connections", value) {
                http.max_connections = count;
            }
        }
    }

    fn log_format(&mut self, key: &str, value: &Value<'_>) -> Option<LogFormat> {
        match self.string(key, value)?.as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            other => {
                let message =
                    format!("unknown log format {other:?}: expected \"text\" or \"json\"");
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// A size in bytes: a string with a unit (`"100MiB"`) or an integer.
    fn size(&mut self, key: &str, value: &Value<'_>) -> Option<u64> {
        let size = match value.get_ref() {
            DeValue::String(text) => match parse_size(text) {
                Ok(size) => size,
                Err(message) => {
                    self.error(value.span(), key, message);
                    return None;
                }
            },
            DeValue::Integer(_) => {
                let bytes = self.integer(key, value)?;
                match u64::try_from(bytes) {
                    Ok(bytes) => bytes,
                    Err(_) => {
                        let message = format!("must be greater than 0, found {bytes}");
                        self.error(value.span(), key, message);
                        return None;
                    }
                }
            }
            _ => {
                self.wrong_type(value, key, "a size such as \"100MiB\"");
                return None;
            }
        };
        if size == 0 {
            self.error(value.span(), key, "must be greater than 0");
            return None;
        }
        Some(size)
    }

    /// Groups named in `log.filter` must exist (a typo would silently
    /// apply the default level instead).
    fn log_filter_groups(
        &mut self,
        value: Option<&Value<'_>>,
        log: &LogSpec,
        groups: &[GroupSpec],
    ) {
        let Some(filter) = value
            .and_then(|value| value.get_ref().as_table())
            .and_then(|table| table.get("filter"))
        else {
            return;
        };
        // A group whose name is wrong has its own error already.
        if groups.iter().any(|group| group.name.is_empty()) {
            return;
        }
        let names: Vec<&str> = groups.iter().map(|group| group.name.as_str()).collect();
        for unknown in log.filter.groups().filter(|name| !names.contains(name)) {
            let message = unknown_filter_group(unknown, &names);
            self.error(filter.span(), "log.filter", message);
        }
    }

    /// The top-level `[ssh]` table: defaults of every remote placement.
    fn ssh(&mut self, value: Option<&Value<'_>>) -> SshOptions {
        let mut ssh = SshOptions::default();
        if let Some(table) = value.and_then(|value| self.table("ssh", value)) {
            self.check_unknown(table, "ssh", SSH_KEYS, &[]);
            self.ssh_keys("ssh", table, &mut ssh);
        }
        ssh
    }

    /// Reads the [`SSH_KEYS`] of `table` into `ssh`: each key that is set
    /// (and valid) replaces what `ssh` had, the others keep it.
    ///
    /// Paths have `~` expanded; relative ones are kept as written in the
    /// main file (the launcher resolves them against the config file's
    /// directory) and made absolute in included files.
    /// `[nats]`: the servers and credentials of JetStream queue groups.
    fn nats(&mut self, value: &Value<'_>) -> Option<NatsSpec> {
        use crate::protocol::slave::NatsAuth;
        let table = self.table("nats", value)?;
        self.check_unknown(table, "nats", NATS_KEYS, &[]);
        let mut spec = NatsSpec {
            replicas: 1,
            ..NatsSpec::default()
        };
        if let Some(servers) = table.get("servers") {
            let key = "nats.servers";
            spec.servers = match servers.get_ref().as_str() {
                Some(one) => vec![one.to_string()],
                None => self.strings(key, servers),
            };
            for server in &spec.servers {
                let rest = server
                    .split_once("://")
                    .map_or(server.as_str(), |(_, rest)| rest);
                if rest.is_empty() || server.contains(char::is_whitespace) {
                    let message = format!(
                        "invalid NATS server {server:?}: expected a URL such as \
                         \"nats://127.0.0.1:4222\""
                    );
                    self.error(servers.span(), key, message);
                }
            }
        }
        let text = |walker: &mut Self, name: &str| {
            table
                .get(name)
                .and_then(|value| walker.non_empty_string(&child("nats", name), value))
        };
        let user = text(self, "user");
        let password = text(self, "password");
        let token = text(self, "token");
        let file = |walker: &mut Self, name: &str, what: &'static str| {
            let value = table.get(name)?;
            walker.ssh_file(&child("nats", name), value, what)
        };
        let creds = file(self, "creds", "NATS credentials file");
        let nkey = file(self, "nkey", "NATS nkey seed file");
        spec.tls_ca = file(self, "tls_ca", "TLS CA file");
        let chosen = [
            user.is_some(),
            token.is_some(),
            creds.is_some(),
            nkey.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if chosen > 1 {
            self.error(
                value.span(),
                "nats",
                "give one way to log in: user (with password), token, creds or nkey",
            );
        }
        if password.is_some() && user.is_none() {
            if let Some(value) = table.get("password") {
                self.error(value.span(), "nats.password", "a password needs a user");
            }
        }
        spec.auth = match (user, token, creds, nkey) {
            (Some(user), _, _, _) => NatsAuth::User {
                user,
                password: password.unwrap_or_default(),
            },
            (_, Some(token), _, _) => NatsAuth::Token(token),
            (_, _, Some(creds), _) => NatsAuth::Creds(self.resolved(&creds)),
            (_, _, _, Some(nkey)) => NatsAuth::Nkey(self.resolved(&nkey)),
            _ => NatsAuth::None,
        };
        spec.tls_ca = spec.tls_ca.map(|ca| self.resolved(&ca));
        if let Some(value) = table.get("replicas") {
            if let Some(n) = self.integer("nats.replicas", value) {
                match n {
                    1..=5 => spec.replicas = n as usize,
                    _ => self.error(
                        value.span(),
                        "nats.replicas",
                        format!("must be 1 to 5 (JetStream's limit), found {n}"),
                    ),
                }
            }
        }
        if let Some(value) = table.get("storage") {
            match self.string("nats.storage", value).as_deref() {
                Some("file") => spec.memory = false,
                Some("memory") => spec.memory = true,
                Some(other) => self.error(
                    value.span(),
                    "nats.storage",
                    format!("unknown storage {other:?}: expected \"file\" or \"memory\""),
                ),
                None => {}
            }
        }
        Some(spec)
    }

    fn ssh_keys(&mut self, path: &str, table: &DeTable<'_>, ssh: &mut SshOptions) {
        if let Some(value) = table.get("ssh_config") {
            let key = child(path, "ssh_config");
            if let Some(file) = self.ssh_file(&key, value, "ssh_config file") {
                ssh.config_file = Some(file);
            }
        }
        if let Some(value) = table.get("identity_file") {
            let key = child(path, "identity_file");
            if let Some(file) = self.ssh_file(&key, value, "identity file") {
                ssh.identity_file = Some(file);
            }
        }
        if let Some(value) = table.get("known_hosts") {
            if let Some(policy) = self.known_hosts(&child(path, "known_hosts"), value) {
                ssh.known_hosts = policy;
            }
        }
        if let Some(value) = table.get("jump_host") {
            if let Some(jump) = self.non_empty_string(&child(path, "jump_host"), value) {
                ssh.jump_host = Some(jump);
            }
        }
        if let Some(value) = table.get("connect_timeout") {
            if let Some(timeout) = self.positive_duration(&child(path, "connect_timeout"), value) {
                ssh.connect_timeout = Some(timeout);
            }
        }
        if let Some(value) = table.get("give_up_after") {
            if let Some(limit) = self.count(&child(path, "give_up_after"), value) {
                ssh.give_up_after = Some(limit);
            }
        }
    }

    /// A local file of the ssh settings, which `check` looks for.
    fn ssh_file(&mut self, key: &str, value: &Value<'_>, what: &'static str) -> Option<PathBuf> {
        let text = self.non_empty_string(key, value)?;
        let file = self.local_path(key, value, text)?;
        self.probes.push(Probe::File {
            at: self.spot(value.span(), key),
            path: self.resolved(&file),
            what,
        });
        Some(file)
    }

    fn known_hosts(&mut self, key: &str, value: &Value<'_>) -> Option<KnownHostsPolicy> {
        const POLICIES: &[&str] = &["strict", "accept-new"];
        match self.string(key, value)?.as_str() {
            "strict" => Some(KnownHostsPolicy::Strict),
            "accept-new" => Some(KnownHostsPolicy::AcceptNew),
            other => {
                let message = match closest(other, POLICIES) {
                    Some(close) => {
                        format!("unknown known_hosts policy {other:?}, did you mean {close:?}?")
                    }
                    None => format!(
                        "unknown known_hosts policy {other:?}: expected \"strict\" or \"accept-new\""
                    ),
                };
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// The `group` arrays of every file (with the index of their file), as
    /// one list; `ssh` holds the `[ssh]` defaults for remote placements.
    fn groups(&mut self, values: &[(usize, &Value<'_>)], ssh: &SshOptions) -> Vec<GroupSpec> {
        let mut items = Vec::new();
        for (source, value) in values {
            self.current = *source;
            match value.get_ref().as_array() {
                Some(array) => items.extend(array.iter().map(|item| (*source, item))),
                None => self.wrong_type(value, "group", "an array of tables ([[group]])"),
            }
        }
        self.current = 0;
        if items.is_empty() {
            match values.first() {
                // `group = []`, or groups of the wrong type (reported).
                Some((source, value)) => {
                    if value.get_ref().as_array().is_some() {
                        self.current = *source;
                        self.error(value.span(), "group", NO_GROUPS);
                        self.current = 0;
                    }
                }
                None => self.error(0..0, "group", NO_GROUPS),
            }
        }
        // Group name -> file and line of its first use, for the duplicate
        // error.
        let mut first_lines = BTreeMap::new();
        let groups = items
            .into_iter()
            .enumerate()
            .map(|(i, (source, item))| {
                self.current = source;
                self.group(i + 1, item, &mut first_lines, ssh)
            })
            .collect();
        self.current = 0;
        groups
    }

    /// `number` counts from 1, as users count groups.
    fn group(
        &mut self,
        number: usize,
        value: &Value<'_>,
        first_lines: &mut BTreeMap<String, (usize, usize)>,
        ssh: &SshOptions,
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
            queue: None,
            timeout: None,
            stop_grace: None,
            max_lifetime: None,
            time_limit: None,
            max_jobs: None,
            local: None,
            remote: Vec::new(),
            autostart: true,
            hooks: HooksSpec::none(),
            health: None,
            limits: Limits::default(),
            after: Vec::new(),
            ready: None,
        };
        let Some(table) = self.table(&path, value) else {
            return group;
        };
        self.check_unknown(table, &path, GROUP_KEYS, &[]);

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
                group.command = self
                    .non_empty_string(&key, command)
                    .and_then(|text| self.command(&key, command, text))
                    .unwrap_or_default();
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
            let key = child(&path, "cwd");
            group.cwd = self
                .non_empty_string(&key, cwd)
                .and_then(|text| self.local_path(&key, cwd, text));
        }
        if let Some(timeout) = table.get("timeout") {
            group.timeout = self.duration(&child(&path, "timeout"), timeout);
        }
        if let Some(grace) = table.get("stop_grace") {
            group.stop_grace = self.duration(&child(&path, "stop_grace"), grace);
        }
        if let Some(lifetime) = table.get("max_lifetime") {
            let key = child(&path, "max_lifetime");
            group.max_lifetime = self.duration(&key, lifetime);
            if group.max_lifetime.is_some_and(|d| d.is_zero()) {
                self.error(
                    lifetime.span(),
                    &key,
                    "must be greater than 0 (leave it out for no limit)",
                );
            }
        }
        if let Some(limit) = table.get("time_limit") {
            let key = child(&path, "time_limit");
            group.time_limit = self.positive_duration(&key, limit);
            if let (Some(time_limit), Some(lifetime)) = (group.time_limit, group.max_lifetime) {
                if lifetime <= time_limit {
                    let message = format!(
                        "never reached: max_lifetime ({}) recycles the instance first",
                        humantime::format_duration(lifetime)
                    );
                    self.error(limit.span(), &key, message);
                }
            }
        }
        if let Some(jobs) = table.get("max_jobs") {
            let key = child(&path, "max_jobs");
            if let Some(count) = self.integer(&key, jobs) {
                match u64::try_from(count) {
                    Ok(count) if count >= 1 => group.max_jobs = Some(count),
                    _ => self.error(
                        jobs.span(),
                        &key,
                        format!("must be at least 1, found {count}"),
                    ),
                }
            }
        }
        if let Some(restart) = table.get("restart") {
            group.restart = self.restart(&child(&path, "restart"), restart);
        }
        if let Some(hooks) = table.get("hooks") {
            group.hooks = self.hooks(&child(&path, "hooks"), hooks);
        }
        if let Some(health) = table.get("health") {
            group.health = self.health(&child(&path, "health"), health);
        }
        self.order_keys(&path, table, &mut group);
        for (name, slot) in [
            ("user", &mut group.limits.user),
            ("group", &mut group.limits.group),
        ] {
            if let Some(value) = table.get(name) {
                *slot = self.non_empty_string(&child(&path, name), value);
            }
        }
        if let Some(limits) = table.get("limits") {
            self.limits(&child(&path, "limits"), limits, &mut group.limits);
        }
        let feeder = table.get("feeder");
        let queue = table.get("queue");
        if let Some(value) = table.get("autostart") {
            let key = child(&path, "autostart");
            match value.get_ref().as_bool() {
                Some(false) if feeder.is_some() || queue.is_some() => self.error(
                    value.span(),
                    &key,
                    "a queue group starts with the herd (its consumers need their feeder); \
                     leave autostart out, or suspend the group once it runs",
                ),
                Some(flag) => group.autostart = flag,
                None => self.wrong_type(value, &key, "true or false"),
            }
        }
        group.queue = self.queue_spec(&path, feeder, queue);
        if let Some(spec) = &mut group.queue {
            spec.feeder_ssh = ssh.clone();
        }
        if let Some(consumer) = table.get("consumer") {
            self.consumer(
                &child(&path, "consumer"),
                consumer,
                feeder,
                &mut group.queue,
            );
        }
        // What the user meant, even when the feeder is missing or written
        // wrong (which has its own error): placements hold consumers then.
        let queue_group = feeder.is_some() || queue.is_some() || table.get("consumer").is_some();
        if let Some(local) = table.get("local") {
            group.local = self.local(&child(&path, "local"), local, queue_group);
        }
        if let Some(remote) = table.get("remote") {
            // Named in the duplicate host error.
            let group_name = match group.name.as_str() {
                "" => path.clone(),
                name => format!("{name:?}"),
            };
            group.remote = self.remotes(
                &child(&path, "remote"),
                remote,
                &group_name,
                ssh,
                queue_group,
            );
        }
        let credits = queue
            .and_then(|queue| queue.get_ref().as_table())
            .and_then(|queue| queue.get("credits"));
        if let (Some(spec), Some(credits)) = (&group.queue, credits) {
            let remotes_written = table
                .get("remote")
                .and_then(|remote| remote.get_ref().as_array())
                .map_or(0, |items| items.len());
            self.credits_cover_concurrency(&path, spec, credits, &group, remotes_written);
        }
        // A placement that is there but wrong has its own error already;
        // only `remote = []` counts as none.
        let remote_written = table.get("remote").is_some_and(|remote| {
            remote
                .get_ref()
                .as_array()
                .is_none_or(|items| !items.is_empty())
        });
        if table.get("local").is_none() && !remote_written {
            let message = if queue_group {
                NO_CONSUMERS
            } else {
                NO_PLACEMENT
            };
            self.error(value.span(), &path, message);
        }
        // A built-in feeder runs taskherd itself, not the group's command.
        let local_feeder = feeder.is_some()
            && group
                .queue
                .as_ref()
                .is_none_or(|q| q.feeder_host.is_none() && q.builtin_feeder.is_none());
        if table.get("local").is_some() || local_feeder {
            self.probe_local(&path, table, &group);
        }
        if let Some(host) = feeder
            .and_then(|feeder| feeder.get_ref().as_table())
            .and_then(|feeder| feeder.get("host"))
        {
            if let Some(spec) = group.queue.as_ref().and_then(|q| q.feeder_host.as_ref()) {
                let key = child(&child(&path, "feeder"), "host");
                self.probe_host(host.span(), &key, spec, ssh);
            }
        }
        group
    }

    /// What `check` looks for when the group runs on this machine: its
    /// program and its working directory.
    fn probe_local(&mut self, path: &str, table: &DeTable<'_>, group: &GroupSpec) {
        let usable = |value: &&Value<'_>| {
            !self
                .uninterpolated
                .contains(&(self.current, value.span().start))
        };
        let command = table.get("command").filter(usable);
        let cwd = table.get("cwd").filter(usable);
        if let Some(command) = command.filter(|_| !group.command.is_empty()) {
            let key = child(path, "command");
            let written = Path::new(&group.command);
            let program = if group.command.contains('/') {
                self.resolved(written)
            } else {
                written.to_path_buf()
            };
            let relative_to = (group.command.contains('/') && written.is_relative())
                .then(|| self.sources[self.current].dir.clone());
            self.probes.push(Probe::Program {
                at: self.spot(command.span(), &key),
                program,
                relative_to,
                path_var: group.env.get("PATH").cloned(),
            });
        }
        if let (Some(value), Some(cwd)) = (cwd, &group.cwd) {
            let key = child(path, "cwd");
            self.probes.push(Probe::Dir {
                at: self.spot(value.span(), &key),
                dir: self.resolved(cwd),
            });
        }
    }

    /// A remote host `check` resolves, as ssh would with `ssh`.
    fn probe_host(&mut self, span: Range<usize>, key: &str, host: &HostSpec, ssh: &SshOptions) {
        // Relative files are the main file's (included ones are absolute).
        let base = &self.sources[0].dir;
        let resolve = |file: &Option<PathBuf>| {
            file.as_ref()
                .map(|f| super::probe::clean_path(&base.join(f)))
        };
        let ssh = SshOptions {
            config_file: resolve(&ssh.config_file),
            identity_file: resolve(&ssh.identity_file),
            ..ssh.clone()
        };
        self.probes.push(Probe::Host {
            at: self.spot(span, key),
            host: host.clone(),
            ssh,
        });
    }

    /// A group's `command`: a path (with a `/`, or `~`) is a local path
    /// key; a bare name stays as it is, for `PATH`.
    fn command(&mut self, key: &str, value: &Value<'_>, text: String) -> Option<String> {
        if !text.contains('/') && text != "~" {
            return Some(text);
        }
        let path = self.local_path(key, value, text)?;
        match path.into_os_string().into_string() {
            Ok(text) => Some(text),
            Err(_) => {
                let message = "the expanded path is not valid UTF-8";
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// `[group.feeder]` and `[group.queue]` of the group at `path`: a
    /// [`QueueSpec`] if there is a feeder table, `None` otherwise (a queue
    /// table alone is an error).
    fn queue_spec(
        &mut self,
        path: &str,
        feeder: Option<&Value<'_>>,
        queue: Option<&Value<'_>>,
    ) -> Option<QueueSpec> {
        let mut spec = QueueSpec::default();
        if let Some(feeder) = feeder {
            self.feeder(&child(path, "feeder"), feeder, &mut spec);
        }
        if let Some(queue) = queue {
            let key = child(path, "queue");
            // Walked anyway, so its own mistakes show up in the same run.
            self.queue_settings(&key, queue, &mut spec);
            let nats = spec.backend == QueueBackend::Nats;
            if let (true, Some(feeder)) = (nats, feeder) {
                if !jetstream_feeder_ok(&spec) {
                    self.error(feeder.span(), &child(path, "feeder"), NATS_FEEDER);
                }
            }
            if feeder.is_none() && !nats {
                self.error(queue.span(), &key, QUEUE_WITHOUT_FEEDER);
            }
            if nats {
                return Some(spec);
            }
        }
        feeder.map(|_| spec)
    }

    /// `[group.feeder]`: where the feeder runs and listens.
    fn feeder(&mut self, path: &str, value: &Value<'_>, spec: &mut QueueSpec) {
        if value.get_ref().as_array().is_some() {
            // `[[group.feeder]]`: two `[group.feeder]` tables would already
            // be a TOML syntax error (a table defined twice).
            self.error(value.span(), path, ONE_FEEDER);
            return;
        }
        let Some(table) = self.table(path, value) else {
            return;
        };
        self.check_unknown(table, path, FEEDER_KEYS, &[]);
        if let Some(host) = table.get("host") {
            let key = child(path, "host");
            match self.non_empty_string(&key, host).as_deref() {
                None | Some("local") => {}
                Some(entry) => match parse_host(entry) {
                    Ok(host) => spec.feeder_host = Some(host),
                    Err(message) => self.error(host.span(), &key, message),
                },
            }
        }
        self.builtin_feeder(path, table, spec);
        if let Some(bind) = table.get("bind") {
            let key = child(path, "bind");
            if let Some(text) = self.string(&key, bind) {
                match text.parse::<std::net::SocketAddr>() {
                    Ok(addr) => spec.bind = addr.to_string(),
                    Err(_) => {
                        let message = format!(
                            "invalid bind address {text:?}: expected ip:port, such as \
                             \"127.0.0.1:0\" (any free port) or \"[::1]:7000\""
                        );
                        self.error(bind.span(), &key, message);
                    }
                }
            }
        }
    }

    /// The built-in feeder of `[group.feeder]` (`table`), if it names
    /// one: `file`, `jsonl` or `command` (with `args`), one at most.
    fn builtin_feeder(&mut self, path: &str, table: &DeTable<'_>, spec: &mut QueueSpec) {
        let mut chosen: Option<&str> = None;
        for name in ["file", "jsonl", "command"] {
            let Some(value) = table.get(name) else {
                continue;
            };
            let key = child(path, name);
            if let Some(first) = chosen {
                let message = format!(
                    "a feeder has one source: {first} or {name}, not both \
                     (file = a durable queue, jsonl = a JSON-lines file, command = a program's \
                     output)"
                );
                self.error(value.span(), &key, message);
                continue;
            }
            chosen = Some(name);
            let Some(text) = self.non_empty_string(&key, value) else {
                continue;
            };
            spec.builtin_feeder = match name {
                "command" => Some(BuiltinFeeder::Command {
                    program: text,
                    args: Vec::new(),
                }),
                _ => {
                    // A remote feeder's file is a path on its host, as
                    // written (`~` is that host's home there); a local one
                    // is a local path key.
                    let file = match spec.feeder_host {
                        Some(_) => Some(PathBuf::from(text)),
                        None => self.local_path(&key, value, text),
                    };
                    match name {
                        "file" => file.map(BuiltinFeeder::File),
                        _ => file.map(BuiltinFeeder::Jsonl),
                    }
                }
            };
        }
        if let Some(args_value) = table.get("args") {
            let key = child(path, "args");
            let args = self.strings(&key, args_value);
            match &mut spec.builtin_feeder {
                Some(BuiltinFeeder::Command { args: own, .. }) => *own = args,
                _ if chosen == Some("command") => {}
                _ => self.error(args_value.span(), &key, ARGS_WITHOUT_COMMAND),
            }
        }
    }

    /// `[group.consumer]` of a group whose `[group.feeder]` is `feeder`:
    /// how its consumers run the command, into `queue`.
    fn consumer(
        &mut self,
        path: &str,
        value: &Value<'_>,
        feeder: Option<&Value<'_>>,
        queue: &mut Option<QueueSpec>,
    ) {
        let Some(table) = self.table(path, value) else {
            return;
        };
        self.check_unknown(table, path, CONSUMER_KEYS, &[]);
        let nats = queue.as_ref().is_some_and(|queue| !queue.has_feeder());
        if feeder.is_none() && !nats {
            self.error(value.span(), path, CONSUMER_WITHOUT_FEEDER);
        }
        let mut codes = ExitCodes::default();
        let mut seen: BTreeMap<u8, &'static str> = BTreeMap::new();
        for (name, list) in [
            ("done_codes", &mut codes.done),
            ("retry_codes", &mut codes.retry),
            ("dead_codes", &mut codes.dead),
        ] {
            let Some(value) = table.get(name) else {
                continue;
            };
            let key = child(path, name);
            let Some(items) = value.get_ref().as_array() else {
                self.wrong_type(value, &key, "an array of exit statuses (0 to 255)");
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let item_key = index(&key, i);
                let Some(n) = self.integer(&item_key, item) else {
                    continue;
                };
                let Ok(code) = u8::try_from(n) else {
                    self.error(
                        item.span(),
                        &item_key,
                        format!("exit status {n} out of range: 0 to 255"),
                    );
                    continue;
                };
                if let Some(other) = seen.insert(code, name) {
                    self.error(
                        item.span(),
                        &item_key,
                        format!("exit status {code} is in {other} already"),
                    );
                    continue;
                }
                list.push(code);
            }
        }
        let run = match table.get("run") {
            Some(run_value) => {
                let key = child(path, "run");
                let Some(run) = self.consumer_run(&key, run_value) else {
                    return;
                };
                if let Some(queue) = queue.as_ref() {
                    let needs_feeder = queue.builtin_feeder.is_none() && queue.has_feeder();
                    if run == ConsumerRun::Exec && needs_feeder {
                        self.error(run_value.span(), &key, EXEC_NEEDS_FILE);
                    }
                    if run == ConsumerRun::Coprocess && needs_feeder {
                        self.error(run_value.span(), &key, COPROCESS_NEEDS_FILE);
                    }
                }
                run
            }
            None => ConsumerRun::Library,
        };
        if codes != ExitCodes::default() && run != ConsumerRun::Exec {
            self.error(
                value.span(),
                path,
                "done_codes, retry_codes and dead_codes are for exec consumers (run = \"exec\")",
            );
        }
        if let Some(queue) = queue {
            queue.consumer_run = run;
            queue.exit_codes = codes;
        }
    }

    fn consumer_run(&mut self, key: &str, value: &Value<'_>) -> Option<ConsumerRun> {
        const KINDS: &[&str] = &["library", "exec", "coprocess"];
        match self.string(key, value)?.as_str() {
            "library" => Some(ConsumerRun::Library),
            "exec" => Some(ConsumerRun::Exec),
            "coprocess" => Some(ConsumerRun::Coprocess),
            other => {
                let message = match closest(other, KINDS) {
                    Some(close) => {
                        format!("unknown consumer kind {other:?}, did you mean {close:?}?")
                    }
                    None => {
                        format!(
                            "unknown consumer kind {other:?}: expected \"library\", \"exec\" \
                             or \"coprocess\""
                        )
                    }
                };
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// `[group.queue]`: leases, retries, flow control.
    fn queue_settings(&mut self, path: &str, value: &Value<'_>, spec: &mut QueueSpec) {
        let Some(table) = self.table(path, value) else {
            return;
        };
        self.check_unknown(table, path, QUEUE_KEYS, &[]);
        if let Some(value) = table.get("lease") {
            if let Some(lease) = self.positive_duration(&child(path, "lease"), value) {
                spec.lease = lease;
            }
        }
        if let Some(value) = table.get("max_attempts") {
            if let Some(attempts) = self.count(&child(path, "max_attempts"), value) {
                spec.max_attempts = attempts;
            }
        }
        self.backoff_bounds(
            table,
            path,
            ("retry_initial", "retry_max"),
            (&mut spec.retry_initial, &mut spec.retry_max),
        );
        if let Some(value) = table.get("credits") {
            spec.credits = self.count(&child(path, "credits"), value);
        }
        if let Some(value) = table.get("rate") {
            let key = child(path, "rate");
            match value.get_ref().as_str() {
                Some(text) => match parse_rate(text) {
                    Ok(rate) => spec.rate = Some(rate),
                    Err(message) => self.error(value.span(), &key, message),
                },
                None => {
                    let found = value.get_ref().type_str();
                    let message = format!("expected a string of {RATE_EXAMPLE}, found {found}");
                    self.error(value.span(), &key, message);
                }
            }
        }
        if let Some(value) = table.get("progress_every") {
            if let Some(every) = self.positive_duration(&child(path, "progress_every"), value) {
                spec.progress_every = every;
            }
        }
        if let Some(value) = table.get("joblog") {
            let key = child(path, "joblog");
            if let Some(text) = self.non_empty_string(&key, value) {
                // Like `[group.feeder] file`: a remote feeder's joblog is a
                // path on its host, as written; a local one is a local
                // path key.
                spec.joblog = match spec.feeder_host {
                    Some(_) => Some(PathBuf::from(text)),
                    None => self.local_path(&key, value, text),
                };
            }
        }
        if let Some(value) = table.get("fail_on_dead") {
            let key = child(path, "fail_on_dead");
            match value.get_ref().as_bool() {
                Some(flag) => spec.fail_on_dead = flag,
                None => self.wrong_type(value, &key, "true or false"),
            }
        }
        if let Some(value) = table.get("backend") {
            let key = child(path, "backend");
            match self.string(&key, value).as_deref() {
                Some("feeder") => spec.backend = QueueBackend::Feeder,
                Some("nats") => spec.backend = QueueBackend::Nats,
                Some(other) => self.error(
                    value.span(),
                    &key,
                    format!("unknown queue backend {other:?}: expected \"feeder\" or \"nats\""),
                ),
                None => {}
            }
        }
        for (name, field) in [("stream", &mut spec.stream), ("subject", &mut spec.subject)] {
            if let Some(value) = table.get(name) {
                let key = child(path, name);
                if let Some(text) = self.non_empty_string(&key, value) {
                    let bad = if name == "stream" {
                        text.contains(['.', '*', '>', '/', '\\'])
                            || text.contains(char::is_whitespace)
                    } else {
                        text.contains(char::is_whitespace)
                            || text
                                .split('.')
                                .any(|token| token.is_empty() || token == "*" || token == ">")
                    };
                    if bad {
                        let message = format!("invalid JetStream {name} name {text:?}");
                        self.error(value.span(), &key, message);
                    } else {
                        *field = Some(text);
                    }
                }
            }
        }
    }

    /// `credits` is what a consumer may hold; fewer than it runs at once
    /// would leave slots idle forever. One error per placement that asks
    /// for more, at the `credits` value.
    fn credits_cover_concurrency(
        &mut self,
        path: &str,
        spec: &QueueSpec,
        credits_value: &Value<'_>,
        group: &GroupSpec,
        remotes_written: usize,
    ) {
        let Some(credits) = spec.credits else {
            return;
        };
        let local = group
            .local
            .iter()
            .map(|local| (child(path, "local"), local.concurrency));
        // A placement with errors of its own is left out of `group.remote`,
        // and the indexes of the others would be wrong: skip them then (the
        // config is rejected anyway).
        let remote = group
            .remote
            .iter()
            .enumerate()
            .filter(|_| group.remote.len() == remotes_written)
            .map(|(i, remote)| (index(&child(path, "remote"), i), remote.concurrency));
        let placements: Vec<(String, Option<u32>)> = local.chain(remote).collect();
        for (placement, concurrency) in placements {
            let concurrency = concurrency.unwrap_or(1);
            if credits < concurrency {
                let message = format!(
                    "credits ({credits}) must not be less than the concurrency of {placement} \
                     ({concurrency}): its consumers could never run that many jobs at once"
                );
                let key = child(&child(path, "queue"), "credits");
                self.error(credits_value.span(), &key, message);
            }
        }
    }

    /// A count of at least 1 that fits in a `u32`.
    fn count(&mut self, key: &str, value: &Value<'_>) -> Option<u32> {
        let count = self.integer(key, value)?;
        match u32::try_from(count) {
            Ok(count) if count >= 1 => Some(count),
            _ if count < 1 => {
                self.error(
                    value.span(),
                    key,
                    format!("must be at least 1, found {count}"),
                );
                None
            }
            _ => {
                let message = format!("too large: {count} (at most {})", u32::MAX);
                self.error(value.span(), key, message);
                None
            }
        }
    }

    /// `concurrency` of a placement table: only in queue groups.
    fn concurrency(&mut self, path: &str, table: &DeTable<'_>, queue_group: bool) -> Option<u32> {
        let value = table.get("concurrency")?;
        let key = child(path, "concurrency");
        if !queue_group {
            self.error(value.span(), &key, CONCURRENCY_NOT_QUEUE);
            return None;
        }
        self.count(&key, value)
    }

    fn group_name(
        &mut self,
        key: &str,
        value: &Value<'_>,
        first_lines: &mut BTreeMap<String, (usize, usize)>,
    ) -> Option<String> {
        let name = self.non_empty_string(key, value)?;
        if !super::is_valid_group_name(&name) {
            let message =
                format!("invalid group name {name:?}: use only letters, digits, '_', '.' and '-'");
            self.error(value.span(), key, message);
            return None;
        }
        let (line, _) = self.position(value.span().start);
        if let Some(first) = first_lines.get(&name) {
            let first = self.line_name(*first);
            let message = format!("duplicate group name {name:?} (first used on {first})");
            self.error(value.span(), key, message);
            return None;
        }
        first_lines.insert(name.clone(), (self.current, line));
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
                    let literal = self.text().get(value.span()).unwrap_or_default();
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

    /// `[group.health]`: exactly one probe (`tcp = "host:port"`, `http =
    /// "http://..."`, `command = "..."`), an interval and a timeout above
    /// zero, at least 1 failure.
    fn health(&mut self, path: &str, value: &Value<'_>) -> Option<HealthSpec> {
        let table = self.table(path, value)?;
        let errors_before = self.errors.len();
        self.check_unknown(table, path, HEALTH_KEYS, &[]);
        let probes = self.probes(path, table);
        let interval = self.positive_duration_or(path, table, "interval", DEFAULT_HEALTH_INTERVAL);
        let timeout = self.positive_duration_or(path, table, "timeout", DEFAULT_HEALTH_TIMEOUT);
        let mut failures = DEFAULT_HEALTH_FAILURES;
        if let Some(value) = table.get("failures") {
            let key = child(path, "failures");
            if let Some(count) = self.integer(&key, value) {
                match u32::try_from(count) {
                    Ok(count) if count >= 1 => failures = count,
                    _ => self.error(
                        value.span(),
                        &key,
                        format!("must be at least 1, found {count}"),
                    ),
                }
            }
        }
        let probe = self.exactly_one(
            path,
            value,
            probes,
            errors_before,
            "one probe per health check: tcp, http or command, not several",
            "a health check needs a probe: tcp = \"host:port\", http = \"http://...\" or command = \"...\"",
        )?;
        Some(HealthSpec {
            probe,
            interval,
            timeout,
            failures,
        })
    }

    /// [`Walker::positive_duration`] at `path.name` in `table`; `default`
    /// when the key is not there or is wrong (then an error is recorded).
    fn positive_duration_or(
        &mut self,
        path: &str,
        table: &DeTable<'_>,
        name: &str,
        default: Duration,
    ) -> Duration {
        table
            .get(name)
            .and_then(|value| self.positive_duration(&child(path, name), value))
            .unwrap_or(default)
    }

    /// The one way of a table that needs exactly one (a health check's
    /// probe, a readiness check): an error saying `several` when there
    /// are more, `none` when there is none and nothing else was wrong in
    /// the table since `errors_before`.
    fn exactly_one<T>(
        &mut self,
        path: &str,
        value: &Value<'_>,
        mut ways: Vec<T>,
        errors_before: usize,
        several: &str,
        none: &str,
    ) -> Option<T> {
        if ways.len() > 1 {
            self.error(value.span(), path, several);
            return None;
        }
        let way = ways.pop();
        if way.is_none() && self.errors.len() == errors_before {
            self.error(value.span(), path, none);
        }
        way
    }

    /// The probes of `[group.health]` or `[group.ready]` written in
    /// `table`: `tcp = "host:port"`, `http = "http://..."`, `command =
    /// "..."`.
    fn probes(&mut self, path: &str, table: &DeTable<'_>) -> Vec<HealthProbe> {
        let mut probes = Vec::new();
        if let Some(value) = table.get("tcp") {
            let key = child(path, "tcp");
            if let Some(addr) = self.non_empty_string(&key, value) {
                match addr
                    .rsplit_once(':')
                    .map(|(host, port)| (host, port.parse::<u16>()))
                {
                    Some((host, Ok(port))) if !host.is_empty() && port > 0 => {
                        probes.push(HealthProbe::Tcp(addr))
                    }
                    _ => self.error(
                        value.span(),
                        &key,
                        format!("expected host:port (as 127.0.0.1:8080), found {addr:?}"),
                    ),
                }
            }
        }
        if let Some(value) = table.get("http") {
            let key = child(path, "http");
            if let Some(url) = self.non_empty_string(&key, value) {
                match url.strip_prefix("http://") {
                    Some(rest) if !rest.is_empty() && !rest.starts_with('/') => {
                        probes.push(HealthProbe::Http(url))
                    }
                    _ => self.error(
                        value.span(),
                        &key,
                        format!(
                            "expected an http:// URL (as http://127.0.0.1:8080/health; \
                             no https: use a command probe with curl), found {url:?}"
                        ),
                    ),
                }
            }
        }
        if let Some(value) = table.get("command") {
            if let Some(command) = self.non_empty_string(&child(path, "command"), value) {
                probes.push(HealthProbe::Command(command));
            }
        }
        probes
    }

    /// `[group.limits]`: counts (`nofile`, `nproc`, `core`: integers, 0
    /// allowed) and the memory cap (`memory`: a size, as `\"512M\"`).
    fn limits(&mut self, path: &str, value: &Value<'_>, limits: &mut Limits) {
        let Some(table) = self.table(path, value) else {
            return;
        };
        self.check_unknown(table, path, LIMIT_KEYS, &[]);
        for (name, slot) in [
            ("nofile", &mut limits.nofile),
            ("nproc", &mut limits.nproc),
            ("core", &mut limits.core),
        ] {
            if let Some(value) = table.get(name) {
                let key = child(path, name);
                if let Some(count) = self.integer(&key, value) {
                    match u64::try_from(count) {
                        Ok(count) => *slot = Some(count),
                        Err(_) => self.error(
                            value.span(),
                            &key,
                            format!("must be 0 or more, found {count}"),
                        ),
                    }
                }
            }
        }
        if let Some(value) = table.get("memory") {
            limits.memory = self.size(&child(path, "memory"), value);
        }
    }

    /// `[group.hooks]`: each hook a non-empty shell command, a timeout
    /// above zero.
    fn hooks(&mut self, path: &str, value: &Value<'_>) -> HooksSpec {
        let mut hooks = HooksSpec::none();
        let Some(table) = self.table(path, value) else {
            return hooks;
        };
        self.check_unknown(table, path, HOOK_KEYS, &[]);
        for (name, slot) in [
            ("on_failure", &mut hooks.on_failure),
            ("on_restart", &mut hooks.on_restart),
            ("on_exhausted", &mut hooks.on_exhausted),
            ("on_stop", &mut hooks.on_stop),
        ] {
            if let Some(value) = table.get(name) {
                *slot = self.non_empty_string(&child(path, name), value);
            }
        }
        if let Some(value) = table.get("timeout") {
            let key = child(path, "timeout");
            match self.duration(&key, value) {
                Some(timeout) if timeout.is_zero() => {
                    self.error(value.span(), &key, "must be greater than 0")
                }
                Some(timeout) => hooks.timeout = timeout,
                None => {}
            }
        }
        hooks
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
        self.backoff_bounds(
            table,
            path,
            ("initial", "max"),
            (&mut restart.initial, &mut restart.max),
        );
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
        restart
    }

    /// A backoff's first delay and cap (keys `names`), into `bounds`:
    /// each parsed on its own, then the cap checked against the first
    /// delay. Only values written correctly (or left at their defaults) are
    /// compared: a bad value already has its own error.
    fn backoff_bounds(
        &mut self,
        table: &DeTable<'_>,
        path: &str,
        names: (&str, &str),
        bounds: (&mut Duration, &mut Duration),
    ) {
        let (initial_name, max_name) = names;
        let (initial_value, max_value) = bounds;
        let initial = table.get(initial_name);
        let max = table.get(max_name);
        let parse =
            |walker: &mut Self, name: &str, value: Option<&Value<'_>>, into: &mut Duration| {
                match value.map(|v| walker.duration(&child(path, name), v)) {
                    Some(Some(duration)) => {
                        *into = duration;
                        true
                    }
                    Some(None) => false,
                    None => true,
                }
            };
        let initial_ok = parse(self, initial_name, initial, initial_value);
        let max_ok = parse(self, max_name, max, max_value);
        if !(initial_ok && max_ok) || *max_value >= *initial_value {
            return;
        }
        let initial_text = humantime::format_duration(*initial_value);
        let max_text = humantime::format_duration(*max_value);
        match (max, initial) {
            (Some(max), _) => self.error(
                max.span(),
                &child(path, max_name),
                format!("must not be less than {initial_name} ({initial_text}), found {max_text}"),
            ),
            (None, Some(initial)) => self.error(
                initial.span(),
                &child(path, initial_name),
                format!(
                    "must not be more than {max_name} ({max_text}, the default), \
                     found {initial_text}; set {max_name} too"
                ),
            ),
            // The defaults are consistent, so one of them was set.
            (None, None) => {}
        }
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

    fn local(
        &mut self,
        path: &str,
        value: &Value<'_>,
        queue_group: bool,
    ) -> Option<LocalPlacement> {
        let table = self.table(path, value)?;
        self.check_unknown(table, path, LOCAL_KEYS, &[]);
        let instances = self.instances(path, value, table);
        let concurrency = self.concurrency(path, table, queue_group);
        Some(LocalPlacement {
            instances: instances?,
            concurrency,
        })
    }

    /// The required `instances` key of a placement table (`value`, whose
    /// header a missing key is reported at).
    fn instances(&mut self, path: &str, value: &Value<'_>, table: &DeTable<'_>) -> Option<u32> {
        let key = child(path, "instances");
        let Some(instances) = table.get("instances") else {
            self.error(value.span(), &key, "missing required key \"instances\"");
            return None;
        };
        let count = self.integer(&key, instances)?;
        match u32::try_from(count) {
            Ok(count) if count >= 1 => Some(count),
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

    /// `[[group.remote]]` (or `remote = [{ .. }, ..]`), each placement
    /// with its ssh settings merged over the `[ssh]` defaults.
    fn remotes(
        &mut self,
        path: &str,
        value: &Value<'_>,
        group_name: &str,
        ssh: &SshOptions,
        queue_group: bool,
    ) -> Vec<RemotePlacement> {
        let Some(items) = value.get_ref().as_array() else {
            self.wrong_type(value, path, "an array of tables ([[group.remote]])");
            return Vec::new();
        };
        // Host label -> line of its first entry in this group.
        let mut first_lines = BTreeMap::new();
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let path = index(path, i);
                self.remote(&path, item, group_name, &mut first_lines, ssh, queue_group)
            })
            .collect()
    }

    fn remote(
        &mut self,
        path: &str,
        value: &Value<'_>,
        group_name: &str,
        first_lines: &mut BTreeMap<String, usize>,
        ssh: &SshOptions,
        queue_group: bool,
    ) -> Option<RemotePlacement> {
        let table = self.table(path, value)?;
        let allowed: Vec<&str> = REMOTE_KEYS.iter().chain(SSH_KEYS).copied().collect();
        self.check_unknown(table, path, &allowed, &[]);
        let key = child(path, "hosts");
        let hosts = match table.get("hosts") {
            Some(hosts) => self.hosts(&key, hosts, group_name, first_lines),
            None => {
                self.error(value.span(), &key, "missing required key \"hosts\"");
                None
            }
        };
        let instances = self.instances(path, value, table);
        let command = table
            .get("command")
            .and_then(|command| self.non_empty_string(&child(path, "command"), command));
        let cwd = table
            .get("cwd")
            .and_then(|cwd| self.non_empty_string(&child(path, "cwd"), cwd))
            .map(PathBuf::from);
        let env = table
            .get("env")
            .map(|env| self.env(&child(path, "env"), env))
            .unwrap_or_default();
        let concurrency = self.concurrency(path, table, queue_group);
        let mut ssh = ssh.clone();
        self.ssh_keys(path, table, &mut ssh);
        let hosts = hosts?;
        for (host, span, key) in &hosts {
            self.probe_host(span.clone(), key, host, &ssh);
        }
        Some(RemotePlacement {
            hosts: hosts.into_iter().map(|(host, _, _)| host).collect(),
            instances: instances?,
            command,
            cwd,
            env,
            concurrency,
            ssh,
        })
    }

    /// `None` if the key is unusable as a whole; bad entries are left out
    /// (with their errors) and the rest kept, each with its span and key.
    fn hosts(
        &mut self,
        key: &str,
        value: &Value<'_>,
        group_name: &str,
        first_lines: &mut BTreeMap<String, usize>,
    ) -> Option<Vec<(HostSpec, Range<usize>, String)>> {
        let Some(items) = value.get_ref().as_array() else {
            self.wrong_type(value, key, "an array of host names");
            return None;
        };
        if items.is_empty() {
            let message = "must not be empty: list at least one host, as \"[user@]name[:port]\"";
            self.error(value.span(), key, message);
            return None;
        }
        let mut hosts = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let key = index(key, i);
            let Some(entry) = self.string(&key, item) else {
                continue;
            };
            let Some(entries) = self.host_entries(&entry, item.span(), &key) else {
                continue;
            };
            for entry in entries {
                let host = match parse_host(&entry) {
                    Ok(host) => host,
                    Err(message) => {
                        self.error(item.span(), &key, message);
                        continue;
                    }
                };
                let (line, _) = self.position(item.span().start);
                if let Some(first) = first_lines.get(&host.label) {
                    let message = format!(
                        "host {} listed twice in group {group_name} (first on line {first})",
                        host.label
                    );
                    self.error(item.span(), &key, message);
                    continue;
                }
                first_lines.insert(host.label.clone(), line);
                hosts.push((host, item.span(), key.clone()));
            }
        }
        Some(hosts)
    }

    /// The host entries one `hosts` item stands for: a group of the
    /// inventory (`@web`), a range (`web[01-16]`), or itself.
    fn host_entries(&mut self, entry: &str, span: Range<usize>, key: &str) -> Option<Vec<String>> {
        if let Some(name) = entry.strip_prefix('@') {
            if let Some(entries) = self.inventory.get(name) {
                return Some(entries.clone());
            }
            let names: Vec<&str> = self.inventory.keys().map(String::as_str).collect();
            let message = match (closest(name, &names), names.is_empty()) {
                (_, true) => format!(
                    "unknown host group @{name}: there is no [inventory] table \
                     (add [inventory] with {name} = [\"host1\", \"host2\"])"
                ),
                (Some(close), _) => {
                    format!("unknown host group @{name}, did you mean @{close}?")
                }
                (None, _) => format!(
                    "unknown host group @{name}; the [inventory] has: {}",
                    names.join(", ")
                ),
            };
            self.error(span, key, message);
            return None;
        }
        match super::hosts::expand(entry) {
            Ok(entries) => Some(entries),
            Err(message) => {
                self.error(span, key, message);
                None
            }
        }
    }

    /// `[host_vars]`: per-host values, each key a host entry, a range or
    /// an inventory group, each value a table of variables; in order.
    fn host_vars(
        &mut self,
        value: Option<&Value<'_>>,
    ) -> Vec<(Vec<String>, BTreeMap<String, String>)> {
        let mut all = Vec::new();
        let Some(table) = value.and_then(|value| self.table("host_vars", value)) else {
            return all;
        };
        for (entry, vars) in table {
            let entry_text: &str = entry.get_ref();
            let key = child("host_vars", entry_text);
            let Some(entries) = self.host_entries(entry_text, entry.span(), &key) else {
                continue;
            };
            let mut labels = Vec::new();
            for host in entries {
                match parse_host(&host) {
                    Ok(host) => labels.push(host.label),
                    Err(message) => self.error(entry.span(), &key, message),
                }
            }
            let Some(vars_table) = self.table(&key, vars) else {
                continue;
            };
            let mut values = BTreeMap::new();
            for (name, value) in vars_table {
                let name_text: &str = name.get_ref();
                let var_key = child(&key, name_text);
                if !is_env_name(name_text) {
                    self.error(
                        name.span(),
                        &var_key,
                        format!(
                            "invalid variable name {name_text:?}: it goes into the environment, \
                             so letters, digits and '_', not starting with a digit"
                        ),
                    );
                    continue;
                }
                let text = match value.get_ref() {
                    toml::de::DeValue::String(text) => text.to_string(),
                    toml::de::DeValue::Integer(number) => number.to_string(),
                    toml::de::DeValue::Boolean(flag) => flag.to_string(),
                    _ => {
                        self.wrong_type(value, &var_key, "a string, an integer or a boolean");
                        continue;
                    }
                };
                values.insert(name_text.to_string(), text);
            }
            all.push((labels, values));
        }
        all
    }

    /// `[inventory]`: groups of hosts, each an array of host entries
    /// (ranges allowed), named `@group` in placements.
    fn inventory(&mut self, value: Option<&Value<'_>>) {
        let Some(table) = value.and_then(|value| self.table("inventory", value)) else {
            return;
        };
        for (name, items) in table {
            let group: &str = name.get_ref();
            let key = child("inventory", group);
            if group.is_empty() || !super::is_valid_group_name(group) {
                self.error(
                    name.span(),
                    &key,
                    format!(
                        "invalid host group name {group:?}: use letters, digits, '_', '-' and '.'"
                    ),
                );
                continue;
            }
            let Some(list) = items.get_ref().as_array() else {
                self.wrong_type(items, &key, "an array of host names");
                continue;
            };
            if list.is_empty() {
                self.error(
                    items.span(),
                    &key,
                    "must not be empty: list at least one host",
                );
                continue;
            }
            let mut entries = Vec::new();
            for (i, item) in list.iter().enumerate() {
                let key = index(&key, i);
                let Some(entry) = self.string(&key, item) else {
                    continue;
                };
                if entry.starts_with('@') {
                    let message = format!(
                        "an inventory group lists hosts, not other groups ({entry}): \
                         list its hosts, or name both groups in the placement"
                    );
                    self.error(item.span(), &key, message);
                    continue;
                }
                let expanded = match super::hosts::expand(&entry) {
                    Ok(expanded) => expanded,
                    Err(message) => {
                        self.error(item.span(), &key, message);
                        continue;
                    }
                };
                for host in expanded {
                    match parse_host(&host) {
                        Ok(_) => entries.push(host),
                        Err(message) => self.error(item.span(), &key, message),
                    }
                }
            }
            self.inventory.insert(group.to_string(), entries);
        }
    }
}

/// Gives every remote host (of placements and of remote feeders) the
/// values of the `[host_vars]` entries that name it, later entries over
/// earlier ones.
fn apply_host_vars(
    groups: &mut [GroupSpec],
    host_vars: &[(Vec<String>, BTreeMap<String, String>)],
) {
    if host_vars.is_empty() {
        return;
    }
    let apply = |host: &mut HostSpec| {
        for (labels, vars) in host_vars {
            if labels.contains(&host.label) {
                host.vars
                    .extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
    };
    for group in groups {
        for placement in &mut group.remote {
            placement.hosts.iter_mut().for_each(apply);
        }
        if let Some(host) = group
            .queue
            .as_mut()
            .and_then(|queue| queue.feeder_host.as_mut())
        {
            apply(host);
        }
    }
}

/// Whether `name` can be an environment variable's name.
fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One `hosts` entry, `[user@]name[:port]`, an IPv6 name in brackets
/// (`[::1]:2222`). The error is the whole message, for the caller to place.
///
/// # Errors
/// The entry is not a host: empty, whitespace, an unbracketed IPv6
/// address, an unmatched bracket, a leading `-`, a bad port.
pub fn parse_host(entry: &str) -> Result<HostSpec, String> {
    if entry.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let invalid = |reason: &str| format!("invalid host {entry:?}: {reason}");
    if entry.chars().any(char::is_whitespace) {
        return Err(invalid("whitespace is not allowed"));
    }
    // ssh splits at the last '@' too.
    let (user, label) = match entry.rsplit_once('@') {
        Some((user, label)) => (Some(user), label),
        None => (None, entry),
    };
    if user == Some("") {
        return Err(invalid("empty user before '@'"));
    }
    let (name, port) = if let Some(bracketed) = label.strip_prefix('[') {
        let Some((name, after)) = bracketed.split_once(']') else {
            return Err(invalid("missing ']' after the IPv6 address"));
        };
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(invalid("expected \":port\" after ']'")),
            },
        };
        (name, port)
    } else if label.matches(':').count() > 1 {
        let user = user.map_or(String::new(), |user| format!("{user}@"));
        return Err(invalid(&format!(
            "write an IPv6 address in brackets: \"{user}[{label}]\", \
             or \"{user}[{label}]:port\" with a port"
        )));
    } else {
        match label.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (label, None),
        }
    };
    if name.is_empty() {
        return Err(invalid("empty host name"));
    }
    if name.contains(['[', ']']) {
        return Err(invalid("unmatched bracket"));
    }
    // The destination is an argument of ssh, which must not read it as an
    // option.
    if entry.starts_with('-') || name.starts_with('-') {
        return Err(invalid("must not start with '-'"));
    }
    let port = match port {
        None => None,
        Some(port) => {
            let number = Some(port)
                .filter(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|port| port.parse::<u16>().ok())
                .filter(|port| *port != 0);
            match number {
                Some(number) => Some(number),
                None => {
                    return Err(invalid(&format!(
                        "port must be a number from 1 to 65535, found {port:?}"
                    )))
                }
            }
        }
    };
    Ok(HostSpec {
        label: label.to_owned(),
        user: user.map(str::to_owned),
        name: name.to_owned(),
        port,
        vars: BTreeMap::new(),
    })
}

/// A `rate`, `"N/s"`, `"N/m"` or `"N/h"`, in jobs per second. The error is
/// the whole message, for the caller to place.
fn parse_rate(text: &str) -> Result<f64, String> {
    let invalid = || format!("invalid rate {text:?}: expected {RATE_EXAMPLE}");
    let (number, unit) = text.split_once('/').ok_or_else(invalid)?;
    let (number, unit) = (number.trim(), unit.trim());
    let per_second = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(invalid()),
    };
    // Plain decimals only: `f64::from_str` would also take "inf", "NaN"
    // and "1e3", which nobody means here.
    let digits = number.strip_prefix('-').unwrap_or(number);
    let decimal = digits.chars().any(|c| c.is_ascii_digit())
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1;
    if !decimal {
        return Err(invalid());
    }
    let count: f64 = number.parse().map_err(|_| invalid())?;
    if !count.is_finite() {
        return Err(invalid());
    }
    if count <= 0.0 {
        return Err(format!(
            "rate must be greater than 0, found {text:?} (leave rate out for no limit)"
        ));
    }
    Ok(count / per_second)
}

/// `parent.key`, quoting keys that a bare TOML key could not spell.
/// `"100MiB"`: a number (decimals allowed) and an optional unit, `B`,
/// `KB`/`MB`/`GB` (powers of 1000), `KiB`/`MiB`/`GiB` or `K`/`M`/`G`
/// (powers of 1024), case-insensitive.
fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "invalid size {text:?}: expected a number of bytes with an optional unit (B, KB, MB, \
             GB for powers of 1000; KiB, MiB, GiB or K, M, G for powers of 1024), such as \"100MiB\""
        )
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => return Err(invalid()),
    };
    let bytes = (number * multiplier as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?} is too large"));
    }
    Ok(bytes as u64)
}

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
/// Why a log filter naming `unknown` does not fit groups `names`.
pub(super) fn unknown_filter_group(unknown: &str, names: &[&str]) -> String {
    match closest(unknown, names) {
        Some(close) => {
            format!("unknown group {unknown:?} in the log filter, did you mean {close:?}?")
        }
        None => format!(
            "unknown group {unknown:?} in the log filter; the groups are: {}",
            names.join(", ")
        ),
    }
}

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

/// Whether the `[group.feeder]` of a JetStream queue group (`spec`) is one
/// it may have: a built-in feeder that fills the queue (`jsonl` or
/// `command`), on the master's host, binding nothing.
fn jetstream_feeder_ok(spec: &QueueSpec) -> bool {
    spec.fills_jetstream() && spec.feeder_host.is_none() && spec.bind == QueueSpec::default().bind
}

/// Ordering and readiness: `after` and `[group.ready]` of a group, and the
/// check of every `after` against the groups (names known, no cycle).
impl Walker<'_> {
    /// `after` and `[group.ready]` of the group at `path`.
    fn order_keys(&mut self, path: &str, table: &DeTable<'_>, group: &mut GroupSpec) {
        if let Some(after) = table.get("after") {
            let key = child(path, "after");
            group.after = self.strings(&key, after);
        }
        if let Some(ready) = table.get("ready") {
            group.ready = self.ready(&child(path, "ready"), ready);
        }
    }

    /// `[group.ready]`: exactly one way (`notify = true`, `tcp`, `http`,
    /// `command`, `log = "PATTERN"`), a timeout and an interval above 0.
    fn ready(&mut self, path: &str, value: &Value<'_>) -> Option<ReadySpec> {
        let table = self.table(path, value)?;
        let errors_before = self.errors.len();
        self.check_unknown(table, path, READY_KEYS, &[]);
        let mut ways: Vec<ReadyProbe> = self
            .probes(path, table)
            .into_iter()
            .map(ReadyProbe::Probe)
            .collect();
        if let Some(value) = table.get("notify") {
            let key = child(path, "notify");
            match value.get_ref().as_bool() {
                Some(true) => ways.push(ReadyProbe::Notify),
                Some(false) => {}
                None => self.wrong_type(value, &key, "true or false"),
            }
        }
        if let Some(value) = table.get("log") {
            let key = child(path, "log");
            if let Some(pattern) = self.non_empty_string(&key, value) {
                match regex::Regex::new(&pattern) {
                    Ok(_) => ways.push(ReadyProbe::Log(pattern)),
                    Err(err) => self.error(
                        value.span(),
                        &key,
                        format!("invalid regular expression: {err}"),
                    ),
                }
            }
        }
        let timeout = self.positive_duration_or(path, table, "timeout", DEFAULT_READY_TIMEOUT);
        let interval = self.positive_duration_or(path, table, "interval", DEFAULT_READY_INTERVAL);
        let probe = self.exactly_one(
            path,
            value,
            ways,
            errors_before,
            "one way to be ready: notify, tcp, http, command or log, not several",
            "[group.ready] needs one way to be ready: notify = true, tcp = \"host:port\", \
             http = \"http://...\", command = \"...\" or log = \"PATTERN\"",
        )?;
        Some(ReadySpec {
            probe,
            timeout,
            interval,
        })
    }

    /// Every `after` names a group, not its own, and the groups' `after`
    /// make no cycle. `values` are the `group` arrays of each file, as
    /// [`Walker::groups`] read them into `groups` (one for one).
    fn check_order(&mut self, values: &[(usize, &Value<'_>)], groups: &[GroupSpec]) {
        // Each group's `after` entries with where they are written.
        let mut written: Vec<(usize, usize, Vec<Range<usize>>)> = Vec::new();
        let items = values.iter().flat_map(|(source, value)| {
            value
                .get_ref()
                .as_array()
                .into_iter()
                .flat_map(move |array| array.iter().map(move |item| (*source, item)))
        });
        for (number, (source, item)) in items.enumerate() {
            let spans = item
                .get_ref()
                .as_table()
                .and_then(|table| table.get("after"))
                .and_then(|after| after.get_ref().as_array())
                .map(|array| array.iter().map(|entry| entry.span()).collect())
                .unwrap_or_default();
            written.push((number, source, spans));
        }
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        let known: Vec<&str> = names.iter().copied().filter(|n| !n.is_empty()).collect();
        for (group, (number, source, spans)) in groups.iter().zip(&written) {
            self.current = *source;
            for (i, name) in group.after.iter().enumerate() {
                let span = spans.get(i).cloned().unwrap_or(0..0);
                let key = index(&child(&index("group", *number), "after"), i);
                if *name == group.name {
                    self.error(
                        span,
                        &key,
                        format!("group {name:?} cannot start after itself"),
                    );
                } else if !known.contains(&name.as_str()) {
                    let message = match closest(name, &known) {
                        Some(close) => {
                            format!("unknown group {name:?} in after, did you mean {close:?}?")
                        }
                        None => format!(
                            "unknown group {name:?} in after; the groups are: {}",
                            known.join(", ")
                        ),
                    };
                    self.error(span, &key, message);
                }
            }
        }
        // A cycle is told once, where its last `after` closes it.
        let after = |group: usize| -> Vec<(usize, usize)> {
            groups[group]
                .after
                .iter()
                .enumerate()
                .filter(|(_, name)| **name != groups[group].name)
                .filter_map(|(i, name)| Some((i, names.iter().position(|n| n == name)?)))
                .collect()
        };
        let mut told: Vec<Vec<usize>> = Vec::new();
        // Groups whose every path was walked: no cycle left through them.
        let mut finished = vec![false; groups.len()];
        for start in 0..groups.len() {
            if finished[start] {
                continue;
            }
            // Depth first, the path from `start` on a stack.
            let mut path = vec![start];
            let mut next = vec![after(start)];
            while let Some(edges) = next.last_mut() {
                let Some((entry, to)) = edges.pop() else {
                    next.pop();
                    if let Some(done) = path.pop() {
                        finished[done] = true;
                    }
                    continue;
                };
                let Some(position) = path.iter().position(|g| *g == to) else {
                    if !finished[to] {
                        path.push(to);
                        next.push(after(to));
                    }
                    continue;
                };
                let mut cycle: Vec<usize> = path[position..].to_vec();
                let from = *path.last().expect("invariant: the path holds start");
                let mut set = cycle.clone();
                set.sort_unstable();
                if told.contains(&set) {
                    continue;
                }
                told.push(set);
                cycle.push(to);
                let chain: Vec<&str> = cycle.iter().map(|g| names[*g]).collect();
                let (number, source, spans) = &written[from];
                self.current = *source;
                let span = spans.get(entry).cloned().unwrap_or(0..0);
                let key = index(&child(&index("group", *number), "after"), entry);
                self.error(
                    span,
                    &key,
                    format!(
                        "cycle in after: {} (a group cannot wait for itself)",
                        chain.join(" starts after ")
                    ),
                );
            }
        }
        self.current = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home() -> PathBuf {
        crate::config::probe::home_dir().expect("HOME is set for the tests")
    }

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
heartbeat = "500ms"
orphan_timeout = "1m"
agent_dir = "/opt/taskherd/agents"
agent_path = "/usr/local/bin/taskherd"
max_handshakes = 8
max_active_hosts = 4

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
                heartbeat: Duration::from_millis(500),
                orphan_timeout: Duration::from_secs(60),
                agent_dir: "/opt/taskherd/agents".to_owned(),
                agent_path: Some("/usr/local/bin/taskherd".to_owned()),
                state_dir: None,
                max_handshakes: 8,
                max_active_hosts: Some(4),
            }
        );
        assert_eq!(config.log.format, LogFormat::Json, "from master.log_format");
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
        assert_eq!(
            workers.local,
            Some(LocalPlacement {
                instances: 3,
                concurrency: None
            })
        );
        assert_eq!(workers.instance_count(), 3);

        let jobs = &config.groups[1];
        assert_eq!(jobs.name, "jobs");
        assert_eq!(jobs.restart.policy, RestartPolicy::Never);
        assert_eq!(jobs.restart.jitter, 1.0);
        assert_eq!(jobs.restart.limit, None);
        assert_eq!(jobs.restart.initial, RestartSpec::default().initial);
        assert_eq!(
            jobs.local,
            Some(LocalPlacement {
                instances: 1,
                concurrency: None
            })
        );
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
        assert_eq!(config.log, LogSpec::default());
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.log.filter.to_string(), "info");
        assert_eq!(config.log.max_size, 100 * 1024 * 1024);
        assert_eq!(config.log.keep, 5);
        assert_eq!(config.log.color, LogColor::Auto);
        assert_eq!(config.master.heartbeat, Duration::from_secs(1));
        assert_eq!(config.master.orphan_timeout, Duration::from_secs(10));
        assert_eq!(config.master.agent_dir, ".cache/taskherd");
        assert_eq!(config.master.agent_path, None);
        let group = &config.groups[0];
        assert!(group.args.is_empty());
        assert_eq!(group.params, serde_json::json!({}));
        assert!(group.env.is_empty());
        assert_eq!(group.cwd, None);
        assert_eq!(group.timeout, None);
        assert_eq!(group.stop_grace, None);
        assert_eq!(group.restart, RestartSpec::default());
        assert_eq!(
            group.local,
            Some(LocalPlacement {
                instances: 2,
                concurrency: None
            })
        );
        assert!(group.remote.is_empty());
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
    fn queue_group_with_every_key() {
        let config = parse_ok(
            r#"[[group]]
name = "jobs"
command = "./queue_worker"

[group.feeder]
host = "local"
bind = "0.0.0.0:7000"

[group.queue]
lease = "2m"
max_attempts = 3
retry_initial = "500ms"
retry_max = "1m"
credits = 16
rate = "200/s"
progress_every = "30s"

[group.local]
instances = 4
concurrency = 8

[[group.remote]]
hosts = ["web1", "web2"]
instances = 2
concurrency = 16

[[group.remote]]
hosts = ["web3"]
instances = 1
"#,
        );
        let jobs = &config.groups[0];
        assert_eq!(
            jobs.queue,
            Some(QueueSpec {
                feeder_host: None,
                feeder_ssh: SshOptions::default(),
                bind: "0.0.0.0:7000".to_owned(),
                lease: Duration::from_secs(120),
                max_attempts: 3,
                retry_initial: Duration::from_millis(500),
                retry_max: Duration::from_secs(60),
                credits: Some(16),
                rate: Some(200.0),
                progress_every: Duration::from_secs(30),
                builtin_feeder: None,
                consumer_run: ConsumerRun::Library,
                exit_codes: ExitCodes::default(),
                joblog: None,
                fail_on_dead: true,
                backend: QueueBackend::Feeder,
                stream: None,
                subject: None,
            })
        );
        assert_eq!(
            jobs.local,
            Some(LocalPlacement {
                instances: 4,
                concurrency: Some(8),
            })
        );
        assert_eq!(jobs.remote[0].concurrency, Some(16));
        assert_eq!(
            jobs.remote[1].concurrency, None,
            "default 1, left to the runtime"
        );
        assert_eq!(
            jobs.instance_count(),
            1 + 4 + 2 * 2 + 1,
            "the feeder counts"
        );
    }

    #[test]
    fn queue_group_defaults() {
        let config = parse_ok(
            r#"[[group]]
name = "jobs"
command = "w"
[group.feeder]
[group.local]
instances = 2
[[group]]
name = "plain"
command = "w"
[group.local]
instances = 1
"#,
        );
        let jobs = &config.groups[0];
        assert_eq!(jobs.queue, Some(QueueSpec::default()));
        let queue = jobs.queue.as_ref().expect("checked above");
        assert_eq!(queue.feeder_host, None);
        assert_eq!(queue.bind, "127.0.0.1:0");
        assert_eq!(queue.lease, Duration::from_secs(30));
        assert_eq!(queue.max_attempts, 5);
        assert_eq!(queue.retry_initial, Duration::from_secs(1));
        assert_eq!(queue.retry_max, Duration::from_secs(300));
        assert_eq!(queue.credits, None);
        assert_eq!(queue.rate, None);
        assert_eq!(queue.progress_every, Duration::from_secs(10));
        assert_eq!(queue.builtin_feeder, None);
        assert_eq!(queue.consumer_run, ConsumerRun::Library);
        assert_eq!(
            jobs.local,
            Some(LocalPlacement {
                instances: 2,
                concurrency: None,
            })
        );
        assert_eq!(jobs.instance_count(), 3);
        assert_eq!(config.groups[1].queue, None);
        assert_eq!(config.groups[1].instance_count(), 1);

        // The design's example, with an IPv6 bind and port 0.
        let config = parse_ok(
            r#"[[group]]
name = "jobs"
command = "w"
[group.feeder]
host = "local"
bind = "[::1]:0"
[group.local]
instances = 4
concurrency = 8
"#,
        );
        let queue = config.groups[0].queue.as_ref().expect("a queue group");
        assert_eq!(queue.bind, "[::1]:0");
        assert_eq!(queue.credits, None, "twice the concurrency, at run time");
    }

    #[test]
    fn a_queue_group_on_jetstream() {
        let config = parse_ok(
            r#"[nats]
servers = ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
user = "herd"
password = "secret"
replicas = 3
storage = "memory"

[[group]]
name = "img.resize"
command = "/bin/resize"
[group.queue]
backend = "nats"
lease = "10s"
max_attempts = 4
[group.consumer]
run = "exec"
[group.local]
instances = 2
concurrency = 8
"#,
        );
        let group = &config.groups[0];
        assert_eq!(group.instance_count(), 2, "no feeder instance");
        let queue = config
            .jetstream_queue("img.resize")
            .expect("a JetStream queue");
        assert_eq!(
            queue.servers,
            ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]
        );
        assert_eq!(
            queue.auth,
            crate::protocol::slave::NatsAuth::User {
                user: "herd".into(),
                password: "secret".into()
            }
        );
        assert_eq!(queue.stream, "TASKHERD_IMG_RESIZE");
        assert_eq!(queue.subject, "taskherd.img_resize.jobs");
        assert_eq!(queue.dead_stream, "TASKHERD_IMG_RESIZE_DEAD");
        assert_eq!(queue.settings.lease, Duration::from_secs(10));
        assert_eq!(queue.settings.max_attempts, 4);
        assert_eq!((queue.replicas, queue.memory), (3, true));
        assert!(config.jetstream_queue("other").is_none());
    }

    #[test]
    fn jetstream_errors() {
        let group =
            "[[group]]\nname = \"jobs\"\ncommand = \"/bin/w\"\n[group.local]\ninstances = 1\n";
        let errors = parse_err(&format!("{group}[group.queue]\nbackend = \"kafka\"\n"));
        let err = errors
            .iter()
            .find(|err| err.key == "group[1].queue.backend")
            .expect("an error at the backend");
        assert_error(
            err,
            7,
            "group[1].queue.backend",
            "expected \"feeder\" or \"nats\"",
        );
        let err = only_error(&format!(
            "{group}[group.queue]\nbackend = \"nats\"\n[group.feeder]\nbind = \"127.0.0.1:0\"\n"
        ));
        assert_error(
            &err,
            8,
            "group[1].feeder",
            "no feeder serving its consumers",
        );
        // Only a built-in feeder that fills the queue, on this host.
        for feeder in ["file = \"jobs.queue\"", "host = \"web1\"\njsonl = \"j\""] {
            let err = only_error(&format!(
                "{group}[group.queue]\nbackend = \"nats\"\n[group.feeder]\n{feeder}\n"
            ));
            assert_error(
                &err,
                8,
                "group[1].feeder",
                "may only fill the JetStream queue",
            );
        }
        for feeder in [
            "jsonl = \"jobs.jsonl\"",
            "command = \"seq\"\nargs = [\"1\", \"5\"]",
        ] {
            let config = parse_ok(&format!(
                "{group}[group.queue]\nbackend = \"nats\"\n[group.feeder]\n{feeder}\n"
            ));
            let queue = config.groups[0].queue.as_ref().expect("queue");
            assert!(queue.fills_jetstream() && !queue.has_feeder(), "{feeder}");
            assert_eq!(
                config.groups[0].instance_count(),
                2,
                "{feeder}: the feeder and 1 consumer"
            );
        }
        let err = only_error(&format!(
            "{group}[group.queue]\nbackend = \"nats\"\nsubject = \"jobs.*\"\n"
        ));
        assert_error(
            &err,
            8,
            "group[1].queue.subject",
            "invalid JetStream subject",
        );
        let err = only_error(&format!("[nats]\nuser = \"a\"\ntoken = \"t\"\n{group}"));
        assert_error(&err, 1, "nats", "one way to log in");
        let err = only_error(&format!("[nats]\nreplicas = 7\n{group}"));
        assert_error(&err, 2, "nats.replicas", "1 to 5");
        let err = only_error(&format!("[nats]\nserver = \"x\"\n{group}"));
        assert_error(&err, 2, "nats.server", "servers");
    }

    #[test]
    fn feeder_errors() {
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
[group.feeder]
host = "web 1"
bind = "localhost:7000"
colour = "red"
[group.local]
instances = 1
[[group]]
name = "b"
command = "w"
[group.feeder]
host = "deploy@"
bind = "127.0.0.1"
[group.local]
instances = 1
[[group]]
name = "c"
command = "w"
feeder = "local"
[group.local]
instances = 1
[[group]]
name = "d"
command = "w"
[group.feeder]
bind = 7000
[group.local]
instances = 1
"#,
        );
        let keys: Vec<_> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (5, "group[1].feeder.host"),
                (6, "group[1].feeder.bind"),
                (7, "group[1].feeder.colour"),
                (14, "group[2].feeder.host"),
                (15, "group[2].feeder.bind"),
                (21, "group[3].feeder"),
                (28, "group[4].feeder.bind"),
            ],
            "{}",
            ConfigErrors(errors.clone())
        );
        assert_error(
            &errors[0],
            5,
            "group[1].feeder.host",
            r#"invalid host "web 1""#,
        );
        assert_eq!(errors[0].column, 8, "points at the value");
        assert_error(
            &errors[1],
            6,
            "group[1].feeder.bind",
            r#"invalid bind address "localhost:7000": expected ip:port"#,
        );
        assert_error(
            &errors[2],
            7,
            "group[1].feeder.colour",
            "expected one of: host, bind",
        );
        assert_error(&errors[3], 14, "group[2].feeder.host", "empty host name");
        assert_error(
            &errors[4],
            15,
            "group[2].feeder.bind",
            "invalid bind address",
        );
        assert_error(
            &errors[5],
            21,
            "group[3].feeder",
            "expected a table, found string",
        );
        assert_error(
            &errors[6],
            28,
            "group[4].feeder.bind",
            "expected a string, found integer",
        );
    }

    #[test]
    fn built_in_feeder_and_exec_consumers() {
        let config = parse_ok(
            r#"[[group]]
name = "local"
command = "./handle.sh"
[group.feeder]
file = "queues/jobs.queue"
[group.consumer]
run = "exec"
[group.local]
instances = 2

[[group]]
name = "home"
command = "./queue_worker"
[group.feeder]
file = "~/jobs.queue"
[group.consumer]
run = "library"
[group.local]
instances = 1

[[group]]
name = "remote"
command = "handle"
[group.feeder]
host = "web1"
file = "~/jobs.queue"
[[group.remote]]
hosts = ["web1"]
instances = 1

[[group]]
name = "default"
command = "./queue_worker"
[group.feeder]
file = "/var/lib/jobs.queue"
[group.consumer]
[group.local]
instances = 1
"#,
        );
        let queue = |i: usize| config.groups[i].queue.clone().expect("a queue group");
        // A local path key, kept relative (resolved against the config's
        // directory when planned).
        let file = |path: PathBuf| Some(BuiltinFeeder::File(path));
        assert_eq!(
            queue(0).builtin_feeder,
            file(PathBuf::from("queues/jobs.queue"))
        );
        assert_eq!(queue(0).consumer_run, ConsumerRun::Exec);
        assert_eq!(queue(1).builtin_feeder, file(home().join("jobs.queue")));
        assert_eq!(queue(1).consumer_run, ConsumerRun::Library);
        // A remote feeder's file is a path on its host: `~` is its home.
        assert_eq!(queue(2).builtin_feeder, file(PathBuf::from("~/jobs.queue")));
        assert_eq!(queue(2).consumer_run, ConsumerRun::Library);
        assert_eq!(
            queue(3).builtin_feeder,
            file(PathBuf::from("/var/lib/jobs.queue"))
        );
        assert_eq!(queue(3).consumer_run, ConsumerRun::Library);
    }

    #[test]
    fn jsonl_and_command_feeders() {
        let config = parse_ok(
            r#"[[group]]
name = "lines"
command = "./handle.sh"
[group.feeder]
jsonl = "jobs.jsonl"
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "generated"
command = "./handle.sh"
[group.feeder]
command = "./list-images.sh"
args = ["--all", "/srv"]
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "remote"
command = "handle"
[group.feeder]
host = "web1"
jsonl = "~/jobs.jsonl"
[[group.remote]]
hosts = ["web1"]
instances = 1
"#,
        );
        let queue = |i: usize| config.groups[i].queue.clone().expect("a queue group");
        assert_eq!(
            queue(0).builtin_feeder,
            Some(BuiltinFeeder::Jsonl(PathBuf::from("jobs.jsonl")))
        );
        assert_eq!(
            queue(1).builtin_feeder,
            Some(BuiltinFeeder::Command {
                program: "./list-images.sh".to_owned(),
                args: vec!["--all".to_owned(), "/srv".to_owned()],
            })
        );
        assert_eq!(queue(1).consumer_run, ConsumerRun::Exec);
        assert_eq!(
            queue(2).builtin_feeder,
            Some(BuiltinFeeder::Jsonl(PathBuf::from("~/jobs.jsonl")))
        );
    }

    #[test]
    fn a_feeder_has_one_source() {
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
[group.feeder]
file = "jobs.queue"
jsonl = "jobs.jsonl"
command = "seq"
[group.local]
instances = 1

[[group]]
name = "b"
command = "w"
[group.feeder]
jsonl = "jobs.jsonl"
args = ["1"]
[group.local]
instances = 1

[[group]]
name = "c"
command = "w"
[group.feeder]
command = ""
args = "10"
[group.local]
instances = 1
"#,
        );
        let places: Vec<(usize, &str)> = errors
            .iter()
            .map(|err| (err.line, err.key.as_str()))
            .collect();
        assert_eq!(
            places,
            [
                (6, "group[1].feeder.jsonl"),
                (7, "group[1].feeder.command"),
                (16, "group[2].feeder.args"),
                (24, "group[3].feeder.command"),
                (25, "group[3].feeder.args"),
            ],
            "{}",
            ConfigErrors(errors.clone())
        );
        assert!(
            errors[0]
                .message
                .starts_with("a feeder has one source: file or jsonl, not both"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[1]
                .message
                .starts_with("a feeder has one source: file or command"),
            "{}",
            errors[1].message
        );
        assert_eq!(errors[2].message, ARGS_WITHOUT_COMMAND);
        assert_eq!(errors[3].message, "must not be empty");
        assert!(
            errors[4].message.contains("array of strings"),
            "{}",
            errors[4].message
        );
    }

    #[test]
    fn exit_code_maps_of_exec_consumers() {
        let config = parse_ok(
            r#"[[group]]
name = "a"
command = "w"
[group.feeder]
file = "q"
[group.consumer]
run = "exec"
retry_codes = [65, 3]
dead_codes = [1]
[group.local]
instances = 1
"#,
        );
        let queue = config.groups[0].queue.clone().expect("a queue group");
        assert_eq!(
            queue.exit_codes,
            ExitCodes {
                done: Vec::new(),
                retry: vec![65, 3],
                dead: vec![1],
            }
        );
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
[group.feeder]
file = "q"
[group.consumer]
run = "exec"
retry_codes = [256, 3]
dead_codes = [3, "x"]
[group.local]
instances = 1

[[group]]
name = "b"
command = "w"
[group.feeder]
[group.consumer]
done_codes = [0]
[group.local]
instances = 1
"#,
        );
        let found: Vec<(usize, &str, bool)> = errors
            .iter()
            .map(|err| {
                let said = err.message.contains("out of range")
                    || err.message.contains("in retry_codes already")
                    || err.message.contains("integer")
                    || err.message.contains("for exec consumers");
                (err.line, err.key.as_str(), said)
            })
            .collect();
        assert_eq!(
            found,
            [
                (8, "group[1].consumer.retry_codes[1]", true),
                (9, "group[1].consumer.dead_codes[1]", true),
                (9, "group[1].consumer.dead_codes[2]", true),
                (17, "group[2].consumer", true),
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn built_in_feeder_and_consumer_errors() {
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
[group.feeder]
file = ""
[group.consumer]
run = "coproces"
[group.local]
instances = 1

[[group]]
name = "b"
command = "w"
[group.feeder]
file = 7
[group.consumer]
run = "exex"
mode = "x"
[group.local]
instances = 1

[[group]]
name = "c"
command = "w"
[group.consumer]
run = "exec"
[group.local]
instances = 1
concurrency = 2

[[group]]
name = "d"
command = "w"
[group.feeder]
[group.consumer]
run = "exec"
[group.local]
instances = 1

[[group]]
name = "e"
command = "w"
consumer = { run = "shell" }
[group.feeder]
file = "q"
[group.local]
instances = 1

[[group]]
name = "f"
command = "w"
[group.feeder]
[group.consumer]
run = "coprocess"
[group.local]
instances = 1
"#,
        );
        let places: Vec<(usize, &str)> = errors
            .iter()
            .map(|err| (err.line, err.key.as_str()))
            .collect();
        assert_eq!(
            places,
            [
                (5, "group[1].feeder.file"),
                (7, "group[1].consumer.run"),
                (15, "group[2].feeder.file"),
                (17, "group[2].consumer.run"),
                (18, "group[2].consumer.mode"),
                (25, "group[3].consumer"),
                (36, "group[4].consumer.run"),
                (43, "group[5].consumer.run"),
                (54, "group[6].consumer.run"),
            ],
            "{}",
            ConfigErrors(errors.clone())
        );
        assert_error(&errors[0], 5, "group[1].feeder.file", "must not be empty");
        assert_eq!(
            errors[1].message,
            "unknown consumer kind \"coproces\", did you mean \"coprocess\"?"
        );
        assert_error(&errors[2], 15, "group[2].feeder.file", "expected a string");
        assert_eq!(
            errors[3].message,
            "unknown consumer kind \"exex\", did you mean \"exec\"?"
        );
        assert_error(
            &errors[4],
            18,
            "group[2].consumer.mode",
            "expected one of: run",
        );
        assert_eq!(errors[5].message, CONSUMER_WITHOUT_FEEDER);
        assert_eq!(
            errors[5].to_string(),
            "conf/herd.toml:25:1: group[3].consumer: a [group.consumer] table needs \
             [group.feeder]: consumers are the instances of a queue group"
        );
        assert_eq!(errors[6].message, EXEC_NEEDS_FILE);
        assert_eq!(
            errors[7].message,
            "unknown consumer kind \"shell\": expected \"library\", \"exec\" or \"coprocess\""
        );
        assert_eq!(errors[8].message, COPROCESS_NEEDS_FILE);
    }

    #[test]
    fn a_queue_group_has_exactly_one_feeder() {
        let err = only_error(
            r#"[[group]]
name = "jobs"
command = "w"
[[group.feeder]]
host = "local"
[[group.feeder]]
host = "local"
[group.local]
instances = 1
concurrency = 2
"#,
        );
        assert_error(&err, 4, "group[1].feeder", ONE_FEEDER);
        assert_eq!(
            err.message,
            "a queue group has exactly one feeder: write one [group.feeder] table, \
             not [[group.feeder]]"
        );
        // Two [group.feeder] tables are a TOML error of their own.
        let err = only_error(
            r#"[[group]]
name = "jobs"
command = "w"
[group.feeder]
[group.feeder]
[group.local]
instances = 1
"#,
        );
        assert_eq!((err.line, err.key.as_str()), (5, "(syntax)"), "{err}");
    }

    #[test]
    fn queue_table_needs_a_feeder() {
        let err = only_error(
            r#"[[group]]
name = "jobs"
command = "w"

[group.queue]
lease = "10s"

[group.local]
instances = 1
concurrency = 4
"#,
        );
        assert_error(&err, 5, "group[1].queue", QUEUE_WITHOUT_FEEDER);
        assert_eq!(err.message, "a [group.queue] table needs [group.feeder]");
        // Its own mistakes are reported in the same run.
        let errors = parse_err(
            r#"[[group]]
name = "jobs"
command = "w"
queue = { lease = "0s" }
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 4, "group[1].queue", QUEUE_WITHOUT_FEEDER);
        assert_error(
            &errors[1],
            4,
            "group[1].queue.lease",
            "must be greater than 0",
        );
    }

    #[test]
    fn queue_setting_errors() {
        let errors = parse_err(
            r#"[[group]]
name = "jobs"
command = "w"
[group.feeder]
[group.queue]
lease = "0s"
max_attempts = 0
retry_initial = "1m"
retry_max = "10s"
credits = 0
rate = "fast"
progress_every = "0ms"
leese = "1s"
[group.local]
instances = 1
[[group]]
name = "more"
command = "w"
[group.feeder]
[group.queue]
lease = 30
max_attempts = 5000000000
credits = -3
rate = 200
progress_every = "soon"
retry_initial = "10m"
[group.local]
instances = 1
"#,
        );
        let keys: Vec<_> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (6, "group[1].queue.lease"),
                (7, "group[1].queue.max_attempts"),
                (9, "group[1].queue.retry_max"),
                (10, "group[1].queue.credits"),
                (11, "group[1].queue.rate"),
                (12, "group[1].queue.progress_every"),
                (13, "group[1].queue.leese"),
                (21, "group[2].queue.lease"),
                (22, "group[2].queue.max_attempts"),
                (23, "group[2].queue.credits"),
                (24, "group[2].queue.rate"),
                (25, "group[2].queue.progress_every"),
                (26, "group[2].queue.retry_initial"),
            ],
            "{}",
            ConfigErrors(errors.clone())
        );
        let messages: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
        assert!(messages[0].contains("must be greater than 0"));
        assert!(messages[1].contains("must be at least 1, found 0"));
        assert!(messages[2].contains("must not be less than retry_initial (1m), found 10s"));
        assert!(messages[3].contains("must be at least 1, found 0"));
        assert!(messages[4].contains(r#"invalid rate "fast""#));
        assert!(messages[4].contains(r#"such as "200/s""#), "an example");
        assert!(messages[5].contains("must be greater than 0"));
        assert!(messages[6].contains(r#"did you mean "lease"?"#));
        assert!(messages[7].contains(r#"durations are strings like "30s""#));
        assert!(messages[8].contains("too large"));
        assert!(messages[9].contains("must be at least 1, found -3"));
        assert!(messages[10].contains(r#"expected a string of jobs per second"#));
        assert!(messages[10].contains("found integer"));
        assert!(messages[11].contains(r#"invalid duration "soon""#));
        assert!(messages[12].contains("set retry_max too"));
    }

    #[test]
    fn rates_are_jobs_per_second() {
        let cases: &[(&str, f64)] = &[
            ("200/s", 200.0),
            ("5/m", 5.0 / 60.0),
            ("0.5/s", 0.5),
            ("1000/h", 1000.0 / 3600.0),
            ("1.5/m", 1.5 / 60.0),
            (" 10 / s ", 10.0),
        ];
        for (text, expected) in cases {
            let rate = parse_rate(text).unwrap_or_else(|err| panic!("{text}: {err}"));
            assert!(
                (rate - expected).abs() < 1e-12,
                "{text}: {rate} != {expected}"
            );
        }
        for text in [
            "fast", "10", "10/d", "/s", "inf/s", "1e3/s", "1.2.3/s", "x/s", "",
        ] {
            let err = parse_rate(text).expect_err(text);
            assert!(err.contains("invalid rate"), "{text}: {err}");
            assert!(err.contains(r#""200/s", "5/m""#), "{text}: {err}");
        }
        for text in ["0/s", "-1/s", "0.0/h"] {
            let err = parse_rate(text).expect_err(text);
            assert!(err.contains("rate must be greater than 0"), "{text}: {err}");
        }

        let with_rate = |rate: &str| {
            format!(
                "[[group]]\nname = \"q\"\ncommand = \"w\"\n[group.feeder]\n\
                 [group.queue]\nrate = {rate:?}\n[group.local]\ninstances = 1\n"
            )
        };
        let config = parse_ok(&with_rate("5/m"));
        let queue = config.groups[0].queue.as_ref().expect("a queue group");
        assert_eq!(queue.rate, Some(5.0 / 60.0));
        let err = only_error(&with_rate("fast"));
        assert_error(&err, 6, "group[1].queue.rate", r#"invalid rate "fast""#);
        assert_eq!(err.column, 8, "points at the value");
        let err = only_error(&with_rate("0/s"));
        assert_error(&err, 6, "group[1].queue.rate", "must be greater than 0");
        let err = only_error(&with_rate("-1/s"));
        assert_error(&err, 6, "group[1].queue.rate", "must be greater than 0");
    }

    #[test]
    fn concurrency_is_for_queue_groups() {
        let errors = parse_err(
            r#"[[group]]
name = "plain"
command = "w"
[group.local]
instances = 2
concurrency = 4
[[group.remote]]
hosts = ["web1"]
instances = 1
concurrency = 2
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            6,
            "group[1].local.concurrency",
            CONCURRENCY_NOT_QUEUE,
        );
        assert_eq!(
            errors[0].message,
            "concurrency is for queue groups ([group.feeder])"
        );
        assert_error(
            &errors[1],
            10,
            "group[1].remote[1].concurrency",
            CONCURRENCY_NOT_QUEUE,
        );

        let errors = parse_err(
            r#"[[group]]
name = "q"
command = "w"
[group.feeder]
[group.local]
instances = 2
concurrency = 0
[[group.remote]]
hosts = ["web1"]
instances = 1
concurrency = "8"
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            7,
            "group[1].local.concurrency",
            "must be at least 1, found 0",
        );
        assert_error(
            &errors[1],
            11,
            "group[1].remote[1].concurrency",
            "expected an integer, found string",
        );
    }

    #[test]
    fn credits_must_cover_every_placements_concurrency() {
        let errors = parse_err(
            r#"[[group]]
name = "q"
command = "w"
[group.feeder]
[group.queue]
credits = 4
[group.local]
instances = 1
concurrency = 8
[[group.remote]]
hosts = ["web1"]
instances = 1
concurrency = 4
[[group.remote]]
hosts = ["web2"]
instances = 1
concurrency = 5
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            6,
            "group[1].queue.credits",
            "credits (4) must not be less than the concurrency of group[1].local (8)",
        );
        assert_error(
            &errors[1],
            6,
            "group[1].queue.credits",
            "credits (4) must not be less than the concurrency of group[1].remote[2] (5)",
        );
        // A placement with its own error leaves the indexes of the others
        // unknown: no credits error rather than a wrong one.
        let err = only_error(
            r#"[[group]]
name = "q"
command = "w"
[group.feeder]
[group.queue]
credits = 4
[[group.remote]]
instances = 1
[[group.remote]]
hosts = ["web2"]
instances = 1
concurrency = 5
"#,
        );
        assert_error(&err, 7, "group[1].remote[1].hosts", "missing required key");
        // Equal is enough; the default concurrency is 1.
        let config = parse_ok(
            r#"[[group]]
name = "q"
command = "w"
[group.feeder]
[group.queue]
credits = 1
[[group.remote]]
hosts = ["web1"]
instances = 1
"#,
        );
        assert_eq!(
            config.groups[0].queue.as_ref().and_then(|q| q.credits),
            Some(1)
        );
    }

    #[test]
    fn a_queue_group_needs_consumers() {
        let err = only_error(
            r#"
[[group]]
name = "q"
command = "w"
[group.feeder]
host = "local"
"#,
        );
        assert_error(&err, 2, "group[1]", NO_CONSUMERS);
        assert_eq!(
            err.message,
            "a queue group needs consumers: add [group.local] or [[group.remote]]"
        );
        let err = only_error(
            r#"[[group]]
name = "q"
command = "w"
remote = []
[group.feeder]
"#,
        );
        assert_error(&err, 1, "group[1]", NO_CONSUMERS);
    }

    #[test]
    fn a_plain_group_and_a_queue_group_cannot_share_a_name() {
        let text = r#"[[group]]
name = "jobs"
command = "w"
[group.local]
instances = 1

[[group]]
name = "jobs"
command = "w"
[group.feeder]
[group.local]
instances = 1
"#;
        let err = only_error(text);
        assert_error(
            &err,
            8,
            "group[2].name",
            r#"duplicate group name "jobs" (first used on line 2)"#,
        );
        // And the other way round.
        let swapped = r#"[[group]]
name = "jobs"
command = "w"
[group.feeder]
[group.local]
instances = 1

[[group]]
name = "jobs"
command = "w"
[group.local]
instances = 1
"#;
        let err = only_error(swapped);
        assert_error(
            &err,
            9,
            "group[2].name",
            r#"duplicate group name "jobs" (first used on line 2)"#,
        );
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
            "conf/herd.toml:2:1: group[1]: no placement: add [group.local] with instances = N, \
             or [[group.remote]] with hosts and instances"
        );
        let err = only_error(
            r#"[[group]]
name = "w"
command = "w"
remote = []
"#,
        );
        assert_error(&err, 1, "group[1]", NO_PLACEMENT);
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
    fn log_table() {
        let config = parse_ok(
            r#"[log]
format = "json"
file = "logs/herd.log"
max_size = "10MiB"
keep = 3
filter = "warning, w=debug"
color = "never"
[[group]]
name = "w"
command = "w"
local = { instances = 1 }
"#,
        );
        assert_eq!(
            config.log,
            LogSpec {
                format: LogFormat::Json,
                file: Some(PathBuf::from("logs/herd.log")),
                max_size: 10 * 1024 * 1024,
                keep: 3,
                filter: "warning,w=debug".parse().unwrap(),
                color: LogColor::Never,
            }
        );
        let config = parse_ok(
            "[log]\nmax_size = 4096\ncolor = \"always\"\n\
             [[group]]\nname = \"w\"\ncommand = \"w\"\nlocal = { instances = 1 }\n",
        );
        assert_eq!(config.log.max_size, 4096);
        assert_eq!(config.log.color, LogColor::Always);
    }

    #[test]
    fn log_errors_point_at_the_key() {
        let errors = parse_err(
            r#"[master]
log_format = "json"
[log]
format = "xml"
file = ""
max_size = "10 parsecs"
keep = 0
filter = "info,web=loud"
color = "allways"
log_format = "text"
[[group]]
name = "w"
command = "w"
local = { instances = 1 }
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 8, "{text}");
        assert_error(
            &errors[0],
            2,
            "master.log_format",
            "set twice: keep [log] format",
        );
        assert_error(&errors[1], 4, "log.format", r#"unknown log format "xml""#);
        assert_error(&errors[2], 5, "log.file", "must not be empty");
        assert_error(
            &errors[3],
            6,
            "log.max_size",
            r#"invalid size "10 parsecs""#,
        );
        assert_error(&errors[4], 7, "log.keep", "must be from 1 to 1000, found 0");
        assert_error(
            &errors[5],
            8,
            "log.filter",
            r#"unknown level "loud" in "web=loud""#,
        );
        assert_error(
            &errors[6],
            9,
            "log.color",
            r#"unknown color "allways", did you mean "always"?"#,
        );
        assert_error(
            &errors[7],
            10,
            "log.log_format",
            r#"in [log] it is called "format""#,
        );
    }

    #[test]
    fn log_filter_groups_must_exist() {
        let group = "[[group]]\nname = \"web\"\ncommand = \"w\"\nlocal = { instances = 1 }\n\
                     [[group]]\nname = \"db\"\ncommand = \"w\"\nlocal = { instances = 1 }\n";
        let err = only_error(&format!("[log]\nfilter = \"info,webb=debug\"\n{group}"));
        assert_error(
            &err,
            2,
            "log.filter",
            r#"unknown group "webb" in the log filter, did you mean "web"?"#,
        );
        let err = only_error(&format!("[log]\nfilter = \"info,cache=debug\"\n{group}"));
        assert_error(&err, 2, "log.filter", "the groups are: web, db");
        let config = parse_ok(&format!("[log]\nfilter = \"warning,db=off\"\n{group}"));
        assert_eq!(config.log.filter.level_for(Some("db")), None);

        let errors = parse_err("[log]\nmax_size = 0\nkeep = 1001\nformat = 1\n[[group]]\nname = \"w\"\ncommand = \"w\"\nlocal = { instances = 1 }\n");
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 2, "log.max_size", "must be greater than 0");
        assert_error(
            &errors[1],
            3,
            "log.keep",
            "must be from 1 to 1000, found 1001",
        );
        assert_error(
            &errors[2],
            4,
            "log.format",
            "expected a string, found integer",
        );
    }

    #[test]
    fn size_syntax() {
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("100 MiB"), Ok(100 << 20));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("100mb"), Ok(100_000_000));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2KB"), Ok(2000));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("0"), Ok(0), "zero is refused by the caller");
        for bad in ["", "MiB", "10 parsecs", "-1MiB", "1.2.3KB", "1e3"] {
            let err = parse_size(bad).expect_err(bad);
            assert!(err.contains("expected a number of bytes"), "{bad}: {err}");
        }
        assert!(parse_size("99999999999999999999GiB")
            .unwrap_err()
            .contains("too large"));
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

    fn host(label: &str, user: Option<&str>, name: &str, port: Option<u16>) -> HostSpec {
        HostSpec {
            label: label.to_owned(),
            user: user.map(str::to_owned),
            name: name.to_owned(),
            port,
            vars: BTreeMap::new(),
        }
    }

    #[test]
    fn remote_placements_with_ssh_defaults_and_overrides() {
        let config = parse_ok(
            r#"[ssh]
ssh_config = "ssh/config"
identity_file = "~/.ssh/id_herd"
known_hosts = "accept-new"
jump_host = "bastion.example.com"
connect_timeout = "5s"
give_up_after = 3

[[group]]
name = "workers"
command = "./bin/worker"
env = { RUST_LOG = "info" }

[group.local]
instances = 2

[[group.remote]]
hosts = ["web1", "deploy@web2:2222", "[::1]:2200"]
instances = 2

[[group.remote]]
hosts = ["ops@[fe80::1]", "db.internal"]
instances = 1
command = "/opt/app/worker"
cwd = "/srv/app"
env = { RUST_LOG = "debug", ROLE = "db" }
identity_file = "/etc/herd/key"
known_hosts = "strict"
connect_timeout = "30s"
give_up_after = 1

[[group]]
name = "inline"
command = "w"
remote = [{ hosts = ["a", "b"], instances = 3, jump_host = "other" }]
"#,
        );
        let defaults = SshOptions {
            config_file: Some(PathBuf::from("ssh/config")),
            // `~` is expanded when the config is read.
            identity_file: Some(home().join(".ssh/id_herd")),
            known_hosts: KnownHostsPolicy::AcceptNew,
            jump_host: Some("bastion.example.com".to_owned()),
            connect_timeout: Some(Duration::from_secs(5)),
            give_up_after: Some(3),
        };
        let workers = &config.groups[0];
        assert_eq!(
            workers.local,
            Some(LocalPlacement {
                instances: 2,
                concurrency: None
            })
        );
        assert_eq!(workers.remote.len(), 2);
        assert_eq!(
            workers.remote[0],
            RemotePlacement {
                hosts: vec![
                    host("web1", None, "web1", None),
                    host("web2:2222", Some("deploy"), "web2", Some(2222)),
                    host("[::1]:2200", None, "::1", Some(2200)),
                ],
                instances: 2,
                command: None,
                cwd: None,
                env: BTreeMap::new(),
                concurrency: None,
                ssh: defaults.clone(),
            }
        );
        assert_eq!(
            workers.remote[1],
            RemotePlacement {
                hosts: vec![
                    host("[fe80::1]", Some("ops"), "fe80::1", None),
                    host("db.internal", None, "db.internal", None),
                ],
                instances: 1,
                command: Some("/opt/app/worker".to_owned()),
                cwd: Some(PathBuf::from("/srv/app")),
                env: BTreeMap::from([
                    ("ROLE".to_owned(), "db".to_owned()),
                    ("RUST_LOG".to_owned(), "debug".to_owned()),
                ]),
                concurrency: None,
                ssh: SshOptions {
                    identity_file: Some(PathBuf::from("/etc/herd/key")),
                    known_hosts: KnownHostsPolicy::Strict,
                    connect_timeout: Some(Duration::from_secs(30)),
                    give_up_after: Some(1),
                    ..defaults.clone()
                },
            }
        );
        assert_eq!(
            workers.env,
            BTreeMap::from([("RUST_LOG".to_owned(), "info".to_owned())]),
            "the group env stays separate"
        );
        // local 2, then 3 hosts × 2 and 2 hosts × 1.
        assert_eq!(workers.instance_count(), 2 + 6 + 2);

        let inline = &config.groups[1];
        assert_eq!(inline.local, None, "a remote placement is enough");
        assert_eq!(inline.remote.len(), 1);
        assert_eq!(
            inline.remote[0].hosts,
            [host("a", None, "a", None), host("b", None, "b", None)]
        );
        assert_eq!(
            inline.remote[0].ssh,
            SshOptions {
                jump_host: Some("other".to_owned()),
                ..defaults
            }
        );
        assert_eq!(inline.instance_count(), 6);
    }

    #[test]
    fn ssh_options_default_to_unset_without_an_ssh_table() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "w"
[[group.remote]]
hosts = ["web1"]
instances = 1
"#,
        );
        let remote = &config.groups[0].remote[0];
        assert_eq!(remote.ssh, SshOptions::default());
        assert_eq!(remote.ssh.known_hosts, KnownHostsPolicy::Strict);
        assert_eq!(remote.ssh.connect_timeout, None);
        assert_eq!(remote.ssh.give_up_after, None, "never given up");
        assert!(remote.env.is_empty());
    }

    #[test]
    fn host_syntax() {
        assert_eq!(
            parse_host("deploy@web2:2222"),
            Ok(host("web2:2222", Some("deploy"), "web2", Some(2222)))
        );
        assert_eq!(parse_host("[::1]"), Ok(host("[::1]", None, "::1", None)));
        assert_eq!(
            parse_host("a@b@c:22"),
            Ok(host("c:22", Some("a@b"), "c", Some(22))),
            "split at the last '@', as ssh does"
        );
        assert_eq!(
            parse_host("10.0.0.1:65535"),
            Ok(host("10.0.0.1:65535", None, "10.0.0.1", Some(65535)))
        );
        let reason = |entry: &str| parse_host(entry).expect_err(entry);
        assert_eq!(reason(""), "must not be empty");
        assert!(reason("web 1").contains("whitespace"));
        assert!(reason(" web1").contains("whitespace"));
        assert!(reason("@web1").contains("empty user"));
        assert!(reason("deploy@").contains("empty host name"));
        assert!(reason(":22").contains("empty host name"));
        assert!(reason("[]:22").contains("empty host name"));
        for bad_port in ["web:0", "web:x", "web:70000", "web:", "web:+22", "[::1]:0"] {
            assert!(
                reason(bad_port).contains("port must be a number from 1 to 65535"),
                "{bad_port}: {}",
                reason(bad_port)
            );
        }
        assert_eq!(
            reason("deploy@::1"),
            r#"invalid host "deploy@::1": write an IPv6 address in brackets: "deploy@[::1]", or "deploy@[::1]:port" with a port"#
        );
        assert!(reason("[::1").contains("missing ']'"));
        assert!(reason("[::1]2222").contains(r#"expected ":port" after ']'"#));
        assert!(reason("web]").contains("unmatched bracket"));
        assert!(reason("-oProxyCommand=x").contains("must not start with '-'"));
        assert!(reason("-l@web").contains("must not start with '-'"));
    }

    #[test]
    fn host_errors_point_at_the_entry() {
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
[[group.remote]]
hosts = ["ok"]
instances = 1
[[group.remote]]
hosts = [
  "",
  "@web:22",
  "web:0",
  "web:x",
  "web:70000",
  "my host",
  "::1",
  3,
]
instances = 1
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 8, "{text}");
        let expected = [
            (9, "must not be empty"),
            (10, "unknown host group @web:22"),
            (11, r#"found "0""#),
            (12, r#"found "x""#),
            (13, r#"found "70000""#),
            (14, "whitespace"),
            (15, r#"in brackets: "[::1]""#),
            (16, "expected a string, found integer"),
        ];
        for (i, (err, (line, part))) in errors.iter().zip(expected).enumerate() {
            assert_error(
                err,
                line,
                &format!("group[1].remote[2].hosts[{}]", i + 1),
                part,
            );
            assert_eq!(err.column, 3, "points at the entry: {err}");
        }
    }

    #[test]
    fn a_host_listed_twice_in_a_group_points_at_the_second() {
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
[[group.remote]]
hosts = ["web1", "web2:2222"]
instances = 1
[[group.remote]]
hosts = ["other", "deploy@web1"]
instances = 2
[[group.remote]]
hosts = ["web2:2222"]
instances = 1

[[group]]
name = "v"
command = "v"
remote = [{ hosts = ["web1", "web2"], instances = 1 }]
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            8,
            "group[1].remote[2].hosts[2]",
            r#"host web1 listed twice in group "w" (first on line 5)"#,
        );
        assert_eq!(errors[0].column, 19);
        assert_error(
            &errors[1],
            11,
            "group[1].remote[3].hosts[1]",
            r#"host web2:2222 listed twice in group "w" (first on line 5)"#,
        );
    }

    #[test]
    fn remote_placement_errors() {
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
[[group.remote]]
instances = 0
[[group.remote]]
hosts = []
host = "x"
[[group.remote]]
hosts = "web1"
instances = 1
command = ""
cwd = 3
env = { A = 1 }
[[group]]
name = "v"
command = "v"
[group.remote]
hosts = ["web1"]
instances = 1
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 10, "{text}");
        assert_error(
            &errors[0],
            4,
            "group[1].remote[1].hosts",
            r#"missing required key "hosts""#,
        );
        assert_error(
            &errors[1],
            5,
            "group[1].remote[1].instances",
            "must be at least 1, found 0",
        );
        assert_error(
            &errors[2],
            6,
            "group[1].remote[2].instances",
            r#"missing required key "instances""#,
        );
        assert_error(
            &errors[3],
            7,
            "group[1].remote[2].hosts",
            "must not be empty: list at least one host",
        );
        assert_error(
            &errors[4],
            8,
            "group[1].remote[2].host",
            r#"did you mean "hosts"?"#,
        );
        assert_error(
            &errors[5],
            10,
            "group[1].remote[3].hosts",
            "expected an array of host names, found string",
        );
        assert_error(
            &errors[6],
            12,
            "group[1].remote[3].command",
            "must not be empty",
        );
        assert_error(
            &errors[7],
            13,
            "group[1].remote[3].cwd",
            "expected a string, found integer",
        );
        assert_error(
            &errors[8],
            14,
            "group[1].remote[3].env.A",
            "environment values are strings",
        );
        assert_error(
            &errors[9],
            18,
            "group[2].remote",
            "expected an array of tables ([[group.remote]]), found table",
        );
    }

    #[test]
    fn ssh_errors_in_the_table_and_in_placements() {
        let errors = parse_err(
            r#"[ssh]
known_hosts = "accept_new"
jump_host = ""
connect_timeout = "0s"
IdentityFile = "~/.ssh/id"
ssh_config = ""

[[group]]
name = "w"
command = "w"
[[group.remote]]
hosts = ["web1"]
instances = 1
known_hosts = "yes"
connect_timeout = 10
identity_file = 5
give_up_after = 0
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 9, "{text}");
        assert_error(
            &errors[0],
            2,
            "ssh.known_hosts",
            r#"unknown known_hosts policy "accept_new", did you mean "accept-new"?"#,
        );
        assert_error(&errors[1], 3, "ssh.jump_host", "must not be empty");
        assert_error(
            &errors[2],
            4,
            "ssh.connect_timeout",
            "must be greater than 0, found 0s",
        );
        assert_error(
            &errors[3],
            5,
            "ssh.IdentityFile",
            r#"did you mean "identity_file"?"#,
        );
        assert_error(&errors[4], 6, "ssh.ssh_config", "must not be empty");
        assert_error(
            &errors[5],
            14,
            "group[1].remote[1].known_hosts",
            r#"expected "strict" or "accept-new""#,
        );
        assert_error(
            &errors[6],
            15,
            "group[1].remote[1].connect_timeout",
            "durations are strings",
        );
        assert_error(
            &errors[7],
            16,
            "group[1].remote[1].identity_file",
            "expected a string, found integer",
        );
        assert_error(
            &errors[8],
            17,
            "group[1].remote[1].give_up_after",
            "must be at least 1, found 0",
        );

        let err = only_error(
            r#"ssh = "strict"
[[group]]
name = "w"
command = "w"
local = { instances = 1 }
"#,
        );
        assert_error(&err, 1, "ssh", "expected a table, found string");
    }

    #[test]
    fn master_agent_and_heartbeat_errors() {
        let errors = parse_err(
            r#"[master]
heartbeat = "0s"
agent_dir = ""
agent_path = " "
hearbeat = "1s"
max_active_hosts = 0
[[group]]
name = "w"
command = "w"
local = { instances = 1 }
"#,
        );
        let text = ConfigErrors(errors.clone()).to_string();
        assert_eq!(errors.len(), 5, "{text}");
        assert_error(
            &errors[0],
            2,
            "master.heartbeat",
            "must be greater than 0, found 0s",
        );
        assert_error(&errors[1], 3, "master.agent_dir", "must not be empty");
        assert_error(&errors[2], 4, "master.agent_path", "must not be empty");
        assert_error(
            &errors[3],
            5,
            "master.hearbeat",
            r#"did you mean "heartbeat"?"#,
        );
        assert_error(
            &errors[4],
            6,
            "master.max_active_hosts",
            "must be at least 1, found 0",
        );
    }

    #[test]
    fn orphan_timeout_must_exceed_heartbeat() {
        let group = "[[group]]\nname = \"w\"\ncommand = \"w\"\nlocal = { instances = 1 }\n";
        let with = |master: &str| format!("[master]\n{master}{group}");

        let err = only_error(&with("heartbeat = \"5s\"\norphan_timeout = \"5s\"\n"));
        assert_error(
            &err,
            3,
            "master.orphan_timeout",
            "must be greater than heartbeat (5s), found 5s",
        );
        let err = only_error(&with("orphan_timeout = \"500ms\"\n"));
        assert_error(
            &err,
            2,
            "master.orphan_timeout",
            "must be greater than heartbeat (1s, the default), found 500ms",
        );
        let err = only_error(&with("heartbeat = \"20s\"\n"));
        assert_error(
            &err,
            2,
            "master.heartbeat",
            "must be less than orphan_timeout (10s, the default), found 20s; \
             set orphan_timeout too",
        );
        // A bad value is not compared as well.
        let err = only_error(&with("heartbeat = \"0s\"\norphan_timeout = \"0s\"\n"));
        assert_error(&err, 2, "master.heartbeat", "must be greater than 0");
        let err = only_error(&with("heartbeat = \"20s\"\norphan_timeout = \"soon\"\n"));
        assert_error(&err, 3, "master.orphan_timeout", "invalid duration");

        let config = parse_ok(&with("heartbeat = \"20s\"\norphan_timeout = \"21s\"\n"));
        assert_eq!(config.master.heartbeat, Duration::from_secs(20));
        assert_eq!(config.master.orphan_timeout, Duration::from_secs(21));
    }

    #[test]
    fn remote_problems_are_reported_with_the_others_in_file_order() {
        let errors = parse_err(
            r#"[master]
orphan_timeout = "1s"
[ssh]
known_hosts = "never"
[[group]]
name = "w"
command = ""
[group.local]
instances = 0
[[group.remote]]
hosts = ["web1", "web1:0", "web1"]
instances = -1
colour = "red"
[[group]]
name = "v"
command = "v"
"#,
        );
        let keys: Vec<_> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (2, "master.orphan_timeout"),
                (4, "ssh.known_hosts"),
                (7, "group[1].command"),
                (9, "group[1].local.instances"),
                (11, "group[1].remote[1].hosts[2]"),
                (11, "group[1].remote[1].hosts[3]"),
                (12, "group[1].remote[1].instances"),
                (13, "group[1].remote[1].colour"),
                (14, "group[2]"),
            ],
            "{}",
            ConfigErrors(errors.clone())
        );
        assert!(errors[5].message.contains("listed twice"));
        assert!(errors[7]
            .message
            .contains("expected one of: hosts, instances"));
        assert_eq!(errors[8].message, NO_PLACEMENT);
    }

    #[test]
    fn recycling_keys() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "w"
max_lifetime = "1h"
max_jobs = 500
time_limit = "5m"
[group.local]
instances = 1
"#,
        );
        assert_eq!(
            config.groups[0].max_lifetime,
            Some(Duration::from_secs(3600))
        );
        assert_eq!(config.groups[0].max_jobs, Some(500));
        assert_eq!(config.groups[0].time_limit, Some(Duration::from_secs(300)));
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
max_lifetime = "0s"
max_jobs = 0
time_limit = "0s"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            4,
            "group[1].max_lifetime",
            "must be greater than 0",
        );
        assert_error(
            &errors[1],
            5,
            "group[1].max_jobs",
            "must be at least 1, found 0",
        );
        assert_error(
            &errors[2],
            6,
            "group[1].time_limit",
            "must be greater than 0",
        );
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
max_lifetime = "1m"
time_limit = "1m"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 1, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            5,
            "group[1].time_limit",
            "never reached: max_lifetime (1m) recycles the instance first",
        );
    }

    #[test]
    fn autostart_is_a_flag_and_not_for_queue_groups() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "w"
autostart = false
[group.local]
instances = 1

[[group]]
name = "v"
command = "v"
[group.local]
instances = 1
"#,
        );
        assert!(!config.groups[0].autostart);
        assert!(config.groups[1].autostart);
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
autostart = "no"
[group.local]
instances = 1

[[group]]
name = "q"
command = "q"
autostart = false
[group.feeder]
file = "jobs.queue"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 4, "group[1].autostart", "true or false");
        assert_error(
            &errors[1],
            11,
            "group[2].autostart",
            "a queue group starts with the herd",
        );
    }

    #[test]
    fn hooks_are_commands_with_a_timeout() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "w"
[group.hooks]
on_failure = "notify failure"
on_exhausted = "notify given up"
timeout = "3s"
[group.local]
instances = 1
"#,
        );
        let hooks = &config.groups[0].hooks;
        assert_eq!(hooks.on_failure.as_deref(), Some("notify failure"));
        assert_eq!(hooks.on_exhausted.as_deref(), Some("notify given up"));
        assert_eq!(
            (hooks.on_restart.as_deref(), hooks.on_stop.as_deref()),
            (None, None)
        );
        assert_eq!(hooks.timeout, Duration::from_secs(3));
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
[group.hooks]
on_failure = ""
on_crash = "x"
timeout = "0s"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            5,
            "group[1].hooks.on_failure",
            "must not be empty",
        );
        assert_error(&errors[1], 6, "group[1].hooks.on_crash", "unknown key");
        assert_error(
            &errors[2],
            7,
            "group[1].hooks.timeout",
            "must be greater than 0",
        );
    }

    #[test]
    fn groups_start_after_others_and_say_when_they_are_ready() {
        let config = parse_ok(
            r#"[[group]]
name = "db"
command = "db"
[group.ready]
log = "listening on port \\d+"
timeout = "20s"
[group.local]
instances = 1

[[group]]
name = "web"
command = "web"
after = ["db"]
[group.ready]
notify = true
[group.local]
instances = 1
"#,
        );
        assert_eq!(config.groups[1].after, ["db"]);
        assert_eq!(
            config.groups[0].ready,
            Some(ReadySpec {
                probe: ReadyProbe::Log(r"listening on port \d+".into()),
                timeout: Duration::from_secs(20),
                interval: DEFAULT_READY_INTERVAL,
            })
        );
        assert_eq!(
            config.groups[1].ready.as_ref().map(|r| &r.probe),
            Some(&ReadyProbe::Notify)
        );
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
after = ["b"]
[group.local]
instances = 1

[[group]]
name = "b"
command = "w"
after = ["c", "dbb"]
[group.ready]
tcp = "127.0.0.1:1"
log = "x"
[group.local]
instances = 1

[[group]]
name = "c"
command = "w"
after = ["a", "c"]
[group.ready]
log = "(unclosed"
[group.local]
instances = 1

[[group]]
name = "db"
command = "w"
[group.ready]
timeout = "0s"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 6, "{errors:#?}");
        assert_error(
            &errors[0],
            11,
            "group[2].after[2]",
            r#"unknown group "dbb" in after, did you mean "db"?"#,
        );
        assert_error(&errors[1], 12, "group[2].ready", "one way to be ready");
        assert_error(
            &errors[2],
            21,
            "group[3].after[1]",
            "cycle in after: a starts after b starts after c starts after a",
        );
        assert_error(
            &errors[3],
            21,
            "group[3].after[2]",
            r#"group "c" cannot start after itself"#,
        );
        assert_error(
            &errors[4],
            23,
            "group[3].ready.log",
            "invalid regular expression",
        );
        assert_error(
            &errors[5],
            31,
            "group[4].ready.timeout",
            "must be greater than 0",
        );
    }

    #[test]
    fn a_health_check_has_one_probe_and_bounds() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "w"
[group.health]
http = "http://127.0.0.1:8080/health"
interval = "2s"
failures = 2
[group.local]
instances = 1
"#,
        );
        assert_eq!(
            config.groups[0].health,
            Some(HealthSpec {
                probe: HealthProbe::Http("http://127.0.0.1:8080/health".into()),
                interval: Duration::from_secs(2),
                timeout: DEFAULT_HEALTH_TIMEOUT,
                failures: 2,
            })
        );
        let errors = parse_err(
            r#"[[group]]
name = "a"
command = "w"
[group.health]
tcp = "no-port"
interval = "0s"
failures = 0
[group.local]
instances = 1

[[group]]
name = "b"
command = "w"
[group.health]
http = "https://example.com/"
[group.local]
instances = 1

[[group]]
name = "c"
command = "w"
[group.health]
tcp = "db:5432"
command = "true"
[group.local]
instances = 1

[[group]]
name = "d"
command = "w"
[group.health]
interval = "5s"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 6, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 5, "group[1].health.tcp", "expected host:port");
        assert_error(
            &errors[1],
            6,
            "group[1].health.interval",
            "must be greater than 0",
        );
        assert_error(
            &errors[2],
            7,
            "group[1].health.failures",
            "must be at least 1",
        );
        assert_error(&errors[3], 15, "group[2].health.http", "no https");
        assert_error(
            &errors[4],
            22,
            "group[3].health",
            "one probe per health check",
        );
        assert_error(&errors[5], 31, "group[4].health", "needs a probe");
    }

    #[test]
    fn user_group_and_limits() {
        let config = parse_ok(
            r#"[[group]]
name = "w"
command = "w"
user = "www-data"
group = "adm"
[group.limits]
nofile = 4096
core = 0
memory = "512MiB"
[group.local]
instances = 1
"#,
        );
        assert_eq!(
            config.groups[0].limits,
            Limits {
                user: Some("www-data".into()),
                group: Some("adm".into()),
                nofile: Some(4096),
                nproc: None,
                core: Some(0),
                memory: Some(512 * 1024 * 1024),
            }
        );
        let errors = parse_err(
            r#"[[group]]
name = "w"
command = "w"
user = ""
[group.limits]
nofile = -1
stack = 1
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 4, "group[1].user", "must not be empty");
        assert_error(&errors[1], 6, "group[1].limits.nofile", "must be 0 or more");
        assert_error(&errors[2], 7, "group[1].limits.stack", "unknown key");
    }

    /// A variable no test environment sets.
    const UNSET: &str = "TASKHERD_TEST_SURELY_UNSET_7f3a";

    fn vars(name: &str) -> Result<Option<String>, String> {
        Ok(match name {
            "APP" => Some("/srv/app".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        })
    }

    #[test]
    fn interpolation_syntax() {
        let ok = |text: &str| interpolate(text, &vars).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(ok("${APP}/bin"), "/srv/app/bin");
        assert_eq!(ok("${NOPE:-/opt}/bin"), "/opt/bin");
        assert_eq!(ok("${APP:-/opt}"), "/srv/app");
        assert_eq!(
            ok("${EMPTY:-fallback}"),
            "fallback",
            "empty counts as unset"
        );
        assert_eq!(ok("${EMPTY}"), "");
        assert_eq!(ok("${NOPE:-}"), "");
        assert_eq!(ok("cost: $$5, pid $$$$"), "cost: $5, pid $$");
        assert_eq!(
            ok("echo $HOME $1 $"),
            "echo $HOME $1 $",
            "a lone $ is the shell's"
        );
        assert_eq!(ok("$$${APP}"), "$/srv/app");
        let err = |text: &str| interpolate(text, &vars).expect_err(text);
        let (dollar, message) = err("a ${NOPE} b");
        assert_eq!(dollar, 0);
        assert!(
            message.contains("environment variable NOPE is not set"),
            "{message}"
        );
        assert!(message.contains("${NOPE:-default}"), "{message}");
        // The index counts every `$` before it, escapes and defaults too.
        assert_eq!(err("$$ ${NOPE:-$x} ${GONE}").0, 4);
        assert!(err("${APP").1.contains("unclosed ${"));
        assert!(err("${1X}").1.contains("invalid ${1X}"));
        assert!(err("${A B}").1.contains("invalid ${A B}"));
        assert!(err("${}").1.contains("write $$ for a literal $"));
    }

    #[test]
    fn string_values_are_interpolated_from_the_environment() {
        let home = home();
        let home_text = home.display().to_string();
        let config = parse_ok(&format!(
            r#"[master]
agent_path = "${{HOME}}/bin/taskherd"
[[group]]
name = "w"
command = "${{{UNSET}:-/opt/w}}"
args = ["$$HOME is ${{HOME}}", "sh: $HOME", "${{{UNSET}:-}}"]
env = {{ DIR = "${{HOME}}" }}
params = {{ dirs = ["${{HOME}}/a"] }}
[group.local]
instances = 1
"#
        ));
        assert_eq!(
            config.master.agent_path,
            Some(format!("{home_text}/bin/taskherd"))
        );
        let group = &config.groups[0];
        assert_eq!(group.command, "/opt/w");
        assert_eq!(
            group.args,
            [
                format!("$HOME is {home_text}"),
                "sh: $HOME".to_owned(),
                String::new()
            ]
        );
        assert_eq!(group.env["DIR"], home_text);
        assert_eq!(group.params["dirs"][0], format!("{home_text}/a"));
    }

    #[test]
    fn an_unset_variable_is_an_error_at_its_dollar() {
        let errors = parse_err(&format!(
            r#"[[group]]
name = "w"
command = "w"
args = ["ok", "x ${{{UNSET}}}"]
cwd = '''
  $$ ${{{UNSET}}}'''
[group.local]
instances = 1
"#
        ));
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            4,
            "group[1].args[2]",
            &format!("environment variable {UNSET} is not set"),
        );
        assert_eq!(errors[0].column, 18, "at the `$`: {}", errors[0]);
        assert_error(&errors[1], 6, "group[1].cwd", UNSET);
        assert_eq!(errors[1].column, 6, "{}", errors[1]);
    }

    #[test]
    fn tilde_is_expanded_in_local_paths_only() {
        let home = home();
        let config = parse_ok(
            r#"[master]
state_dir = "~/state"
[log]
file = "~/logs/herd.log"
[ssh]
ssh_config = "~"
[[group]]
name = "w"
command = "~/bin/worker"
cwd = "~"
args = ["~/not/a/path"]
[group.local]
instances = 1
[[group.remote]]
hosts = ["web1"]
instances = 1
command = "~/bin/worker"
cwd = "~/app"
[[group]]
name = "sh"
command = "~sh"
cwd = "~other/dir"
[group.local]
instances = 1
"#,
        );
        assert_eq!(config.master.state_dir, Some(home.join("state")));
        assert_eq!(config.log.file, Some(home.join("logs/herd.log")));
        let group = &config.groups[0];
        assert_eq!(group.command, home.join("bin/worker").display().to_string());
        assert_eq!(group.cwd, Some(home.clone()));
        assert_eq!(group.args, ["~/not/a/path"]);
        assert_eq!(group.remote[0].ssh.config_file, Some(home.clone()));
        // Remote paths are the host's: its agent expands `~` there.
        assert_eq!(group.remote[0].command.as_deref(), Some("~/bin/worker"));
        assert_eq!(group.remote[0].cwd, Some(PathBuf::from("~/app")));
        // Only `~` and `~/`: `~user` is left alone.
        assert_eq!(config.groups[1].command, "~sh");
        assert_eq!(config.groups[1].cwd, Some(PathBuf::from("~other/dir")));
    }

    #[test]
    fn non_utf8_text_names_the_line_and_byte_offset() {
        let mut bytes = b"[[group]]\nname = \"w\"\ncommand = \"caf".to_vec();
        bytes.extend_from_slice(&[0xe9, b'"', b'\n']);
        let err = decode(bytes, Path::new("conf/herd.toml")).expect_err("not UTF-8");
        assert_eq!(
            (err.file.as_path(), err.line, err.column, err.key.as_str()),
            (Path::new("conf/herd.toml"), 3, 15, "(encoding)")
        );
        assert!(err.message.contains("byte 0xe9 at byte offset 35"), "{err}");
        assert_eq!(
            decode(b"ok = \"\xc3\xa9\"".to_vec(), Path::new("x")),
            Ok("ok = \"\u{e9}\"".to_owned())
        );
    }

    /// The labels of the hosts of a group's placements, in order.
    fn host_labels(config: &Config, group: usize) -> Vec<Vec<String>> {
        config.groups[group]
            .remote
            .iter()
            .map(|placement| placement.hosts.iter().map(|h| h.label.clone()).collect())
            .collect()
    }

    #[test]
    fn host_ranges_and_inventory_groups_expand() {
        let config = parse_ok(
            r#"[inventory]
web = ["web[01-03]"]
db = ["db[1,3]", "deploy@backup:2222"]

[[group]]
name = "app"
command = "w"
[[group.remote]]
hosts = ["@web", "cache[8-9]"]
instances = 1
[[group.remote]]
hosts = ["@db"]
instances = 2
"#,
        );
        assert_eq!(
            host_labels(&config, 0),
            [
                vec!["web01", "web02", "web03", "cache8", "cache9"],
                vec!["db1", "db3", "backup:2222"],
            ]
        );
        assert_eq!(
            config.groups[0].remote[1].hosts[2].user.as_deref(),
            Some("deploy")
        );
    }

    #[test]
    fn bad_ranges_and_groups_name_the_line_and_key() {
        let errors = parse_err(
            r#"[inventory]
web = ["web[3-1]"]
"with space" = ["a"]
nested = ["@web"]

[[group]]
name = "app"
command = "w"
[[group.remote]]
hosts = ["db[a-b]", "@webb", "@nope", "n[1-2]", "n2"]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 7, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            2,
            "inventory.web[1]",
            "invalid host range [3-1] in \"web[3-1]\": \"3-1\" runs backwards",
        );
        assert_error(
            &errors[1],
            3,
            "inventory.\"with space\"",
            "invalid host group name",
        );
        assert_error(
            &errors[2],
            4,
            "inventory.nested[1]",
            "lists hosts, not other groups",
        );
        assert_error(
            &errors[3],
            10,
            "group[1].remote[1].hosts[1]",
            "is not a number or a range",
        );
        assert_error(
            &errors[4],
            10,
            "group[1].remote[1].hosts[2]",
            "unknown host group @webb, did you mean @web?",
        );
        assert_error(
            &errors[5],
            10,
            "group[1].remote[1].hosts[3]",
            "unknown host group @nope; the [inventory] has: nested, web",
        );
        assert_error(
            &errors[6],
            10,
            "group[1].remote[1].hosts[5]",
            "host n2 listed twice in group \"app\" (first on line 10)",
        );
        // Without an inventory, @name says how to make one.
        let err = only_error(
            r#"[[group]]
name = "app"
command = "w"
[[group.remote]]
hosts = ["@web"]
instances = 1
"#,
        );
        assert_error(
            &err,
            5,
            "group[1].remote[1].hosts[1]",
            "there is no [inventory] table",
        );
    }

    #[test]
    fn an_included_file_cannot_hold_the_inventory() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("more.toml"), "[inventory]\nweb = [\"a\"]\n")
            .expect("write");
        let main = dir.path().join("herd.toml");
        std::fs::write(
            &main,
            "include = [\"more.toml\"]\n[[group]]\nname = \"g\"\ncommand = \"w\"\n[group.local]\ninstances = 1\n",
        )
        .expect("write");
        let text = std::fs::read_to_string(&main).expect("read");
        let err = parse(&text, &main).expect_err("inventory in an included file");
        let text = err.to_string();
        assert!(
            text.contains("unknown key \"inventory\": an included file holds [[group]] tables"),
            "{text}"
        );
    }

    #[test]
    fn host_vars_apply_by_range_group_and_name_later_over_earlier() {
        let config = parse_ok(
            r#"[inventory]
web = ["web[1-3]"]

[host_vars]
"@web" = { ROLE = "front", REGION = "eu" }
"web[3-4]" = { REGION = "us", SHARD = 3 }
"deploy@web2" = { DEBUG = true }

[[group]]
name = "app"
command = "w"
[[group.remote]]
hosts = ["@web", "web4", "db1"]
instances = 1
"#,
        );
        let vars = |i: usize| -> Vec<(String, String)> {
            config.groups[0].remote[0].hosts[i]
                .vars
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(vars(0), pairs(&[("REGION", "eu"), ("ROLE", "front")]));
        assert_eq!(
            vars(1),
            pairs(&[("DEBUG", "true"), ("REGION", "eu"), ("ROLE", "front")])
        );
        assert_eq!(
            vars(2),
            pairs(&[("REGION", "us"), ("ROLE", "front"), ("SHARD", "3")])
        );
        assert_eq!(vars(3), pairs(&[("REGION", "us"), ("SHARD", "3")]));
        assert!(vars(4).is_empty());
    }

    #[test]
    fn bad_host_vars_say_where() {
        let errors = parse_err(
            r#"[host_vars]
"web[2-1]" = { A = "1" }
"@nope" = { A = "1" }
web1 = { "1A" = "x", B = [1] }
web2 = "x"

[[group]]
name = "app"
command = "w"
[group.local]
instances = 1
"#,
        );
        assert_eq!(errors.len(), 5, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 2, "host_vars.\"web[2-1]\"", "runs backwards");
        assert_error(
            &errors[1],
            3,
            "host_vars.\"@nope\"",
            "unknown host group @nope",
        );
        assert_error(
            &errors[2],
            4,
            "host_vars.web1.1A",
            "invalid variable name \"1A\"",
        );
        assert_error(
            &errors[3],
            4,
            "host_vars.web1.B",
            "expected a string, an integer or a boolean",
        );
        assert_error(&errors[4], 5, "host_vars.web2", "expected a table");
    }

    #[test]
    fn the_http_table() {
        const GROUP: &str =
            "[[group]]\nname = \"w\"\ncommand = \"w\"\n[group.local]\ninstances = 1\n";
        // Absent: no server.
        assert_eq!(parse_ok(GROUP).http, None);
        // Present but empty: the defaults.
        let http = parse_ok(&format!("[http]\n{GROUP}")).http.expect("[http]");
        assert_eq!(
            http.bind.to_string(),
            format!("127.0.0.1:{DEFAULT_HTTP_PORT}")
        );
        assert_eq!(http.token, HttpToken::Environment);
        assert_eq!(http.max_body, DEFAULT_HTTP_MAX_BODY);
        let http = parse_ok(&format!(
            "[http]\nbind = \"0.0.0.0:9000\"\ntoken = \" s3cret \"\nmax_body = \"64KiB\"\n{GROUP}"
        ))
        .http
        .expect("[http]");
        assert_eq!(http.bind.to_string(), "0.0.0.0:9000");
        assert_eq!(http.token, HttpToken::Text("s3cret".into()));
        assert_eq!(format!("{:?}", http.token), "Text(..)", "never in a log");
        assert_eq!(http.max_body, 64 << 10);
        let http = parse_ok(&format!(
            "[http]\nbind = \"9001\"\ntoken_file = \"t\"\n{GROUP}"
        ))
        .http
        .expect("[http]");
        assert_eq!(http.bind.to_string(), "127.0.0.1:9001");
        assert_eq!(http.token, HttpToken::File("t".into()));

        // Beyond loopback without a token (the tests never set the
        // variable): refused, saying why and how.
        if std::env::var_os(HTTP_TOKEN_ENV).is_none() {
            let err = only_error(&format!("[http]\nbind = \"0.0.0.0:9000\"\n{GROUP}"));
            assert_error(
                &err,
                2,
                "http.bind",
                "reachable beyond this machine: set http.token",
            );
        }
        let errors = parse_err(&format!(
            "[http]\nbind = \"nowhere\"\ntoken = \"a\"\ntoken_file = \"b\"\nmax_body = 0\nport = 1\n{GROUP}"
        ));
        assert_eq!(errors.len(), 4, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 2, "http.bind", "is not an address");
        assert_error(&errors[1], 4, "http.token_file", "set twice");
        assert_error(&errors[2], 5, "http.max_body", "greater than 0");
        assert_error(&errors[3], 6, "http.port", "unknown key");
    }

    #[test]
    fn http_connection_limits() {
        const GROUP: &str =
            "[[group]]\nname = \"w\"\ncommand = \"w\"\n[group.local]\ninstances = 1\n";
        let http = parse_ok(&format!("[http]\n{GROUP}")).http.expect("[http]");
        assert_eq!(
            (http.header_timeout, http.max_connections),
            (DEFAULT_HTTP_HEADER_TIMEOUT, DEFAULT_HTTP_MAX_CONNECTIONS)
        );
        let http = parse_ok(&format!(
            "[http]\nheader_timeout = \"1500ms\"\nmax_connections = 8\n{GROUP}"
        ))
        .http
        .expect("[http]");
        assert_eq!(http.header_timeout, Duration::from_millis(1500));
        assert_eq!(http.max_connections, 8);
        let errors = parse_err(&format!(
            "[http]\nheader_timeout = \"0s\"\nmax_connections = 0\n{GROUP}"
        ));
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], 2, "http.header_timeout", "");
        assert_error(&errors[1], 3, "http.max_connections", "at least 1");
    }
}
