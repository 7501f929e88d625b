//! Config model, parsing and validation.
//!
//! A config is TOML (see the README's config reference). [`Config::load`]
//! reads and validates it in one go and returns every error it found, each
//! naming the file, the line and the key, so that `taskherd check` can list
//! them all at once.
//!
//! Reading a config also interpolates `${NAME}` and `${NAME:-default}`
//! from the environment in string values (`$$` is a `$`), expands `~` in
//! local paths, and reads the files of a top-level `include` (paths or
//! globs, relative to the including file), whose groups follow the main
//! file's. [`Config::load_and_check`] then looks on this machine for what
//! the config names ([`probe`]), as `taskherd check` does.
//!
//! ```
//! use taskherd::config::Config;
//! let text = r#"
//! [[group]]
//! name = "workers"
//! command = "/bin/echo"
//! [group.local]
//! instances = 2
//! "#;
//! let config = Config::parse(text, "herd.toml".as_ref()).unwrap();
//! assert_eq!(config.groups[0].instance_count(), 2);
//! ```

pub mod hosts;
mod log_filter;
mod model;
mod parse;
pub mod probe;

pub use log_filter::{FilterError, LogFilter};
pub use model::*;
pub use parse::parse_host;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {key}: {message}", file.display())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted path of the key, e.g. `group[2].restart.initial` (groups
    /// counted from 1); `(syntax)` for a TOML syntax error.
    pub key: String,
    /// What is wrong, and what would be right.
    pub message: String,
}

/// Every problem found in a config file (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("invalid config:\n{0}")]
    Invalid(ConfigErrors),
}

/// What [`Config::load_and_check`] looks at on this machine besides the
/// config text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// Whether remote hosts are checked (`ssh -G` and a name lookup,
    /// without connecting).
    pub hosts: bool,
    /// Longest time the host checks take together; a host not checked by
    /// then is skipped with a note.
    pub host_timeout: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            hosts: true,
            host_timeout: Duration::from_secs(5),
        }
    }
}

/// A config that passed [`Config::load_and_check`].
#[derive(Debug, Clone)]
pub struct Checked {
    /// The config.
    pub config: Config,
    /// What could not be checked, and why (one line each, with the file,
    /// line and key).
    pub skipped: Vec<String>,
}

impl Config {
    /// Reads and validates a config file and the files it includes.
    ///
    /// # Errors
    /// [`LoadError::Read`] if the file cannot be read, [`LoadError::Invalid`]
    /// with every problem found otherwise (a file that is not UTF-8 is one,
    /// placed at its first bad byte).
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = read_config(path)?;
        parse::parse_all(text, path)
            .into_result()
            .map_err(LoadError::Invalid)
    }

    /// Like [`Config::load`], then looks on this machine for what the config
    /// names, as `taskherd check` does: the programs of groups with
    /// instances here exist and are executable (bare names in `PATH`),
    /// their working directories exist, the ssh files exist, and (with
    /// `options.hosts`) remote hosts resolve as ssh would resolve them.
    /// Every problem is placed like a config error.
    ///
    /// # Errors
    /// As [`Config::load`], with the problems found on the machine among
    /// the others.
    pub fn load_and_check(path: &Path, options: &CheckOptions) -> Result<Checked, LoadError> {
        let text = read_config(path)?;
        let parsed = parse::parse_all(text, path);
        let (found, skipped) = probe::run(&parsed.probes, options);
        let mut errors = parsed.errors;
        errors.extend(found);
        match parsed.config {
            Some(config) if errors.is_empty() => Ok(Checked { config, skipped }),
            _ => Err(LoadError::Invalid(parse::sorted_errors(errors))),
        }
    }

    /// Parses and validates config text; `source` is the file name used in
    /// errors and as the base of relative paths (and of included files,
    /// which are read from disk).
    ///
    /// # Errors
    /// Every problem found, each with its file, line and key.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
        parse::parse_all(text.to_owned(), source).into_result()
    }

    /// The stop grace of group `group` (time between the Stop request and
    /// SIGKILL): its own `stop_grace`, else `[master] stop_grace` (also
    /// for a group the config does not have).
    pub fn stop_grace(&self, group: &str) -> Duration {
        self.groups
            .iter()
            .find(|g| g.name == group)
            .and_then(|g| g.stop_grace)
            .unwrap_or(self.master.stop_grace)
    }

    /// The longest stop grace of the config (`[master] stop_grace` or a
    /// group's, with the wait of a group for the groups after it, see
    /// [`Config::stop_wait`]): the longest a clean stop of the whole herd
    /// may take.
    pub fn longest_stop_grace(&self) -> Duration {
        self.groups
            .iter()
            .map(|g| self.stop_grace(&g.name) + self.stop_wait(&g.name).unwrap_or_default())
            .fold(self.master.stop_grace, Duration::max)
    }

    /// The groups that start after `group` (their `after` names it).
    pub fn dependents(&self, group: &str) -> impl Iterator<Item = &GroupSpec> {
        let group = group.to_string();
        self.groups.iter().filter(move |g| g.after.contains(&group))
    }

    /// How long an instance of `group` waits, on the herd's stop, for the
    /// groups after it to end before it stops anyway: the longest chain
    /// of their stop graces, each with [`STOP_ORDER_MARGIN`]. `None` when
    /// no group starts after it (it stops at once).
    pub fn stop_wait(&self, group: &str) -> Option<Duration> {
        self.stop_wait_within(group, self.groups.len(), &mut BTreeMap::new())
    }

    /// [`Config::stop_wait`], at most `depth` groups deep (a validated
    /// config has no cycle; this bounds one that was not validated), each
    /// group's wait worked out once (`known`: shared dependents would
    /// otherwise be walked once per path to them).
    fn stop_wait_within(
        &self,
        group: &str,
        depth: usize,
        known: &mut BTreeMap<String, Option<Duration>>,
    ) -> Option<Duration> {
        if depth == 0 {
            return None;
        }
        if let Some(wait) = known.get(group) {
            return *wait;
        }
        let wait = self
            .dependents(group)
            .map(|after| {
                self.stop_grace(&after.name)
                    + STOP_ORDER_MARGIN
                    + self
                        .stop_wait_within(&after.name, depth - 1, known)
                        .unwrap_or_default()
            })
            .max();
        known.insert(group.to_string(), wait);
        wait
    }

    /// The directory relative paths in the config are resolved against:
    /// the config file's, absolute (so that a relative command does not
    /// depend on the instance's `cwd`) unless the current directory is
    /// gone.
    pub fn base_dir(&self) -> PathBuf {
        let dir = match self.source.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
    }
}

/// The text of a config file.
fn read_config(path: &Path) -> Result<String, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse::decode(bytes, path).map_err(|err| LoadError::Invalid(ConfigErrors(vec![err])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Writes `files` (path relative to a fresh temp dir, text) and
    /// returns the dir.
    fn files(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    fn load_errors(result: Result<impl fmt::Debug, LoadError>) -> Vec<ConfigError> {
        match result {
            Err(LoadError::Invalid(errors)) => errors.0,
            other => panic!("expected config errors, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_error(err: &ConfigError, file: &Path, line: usize, key: &str, part: &str) {
        assert_eq!(
            (err.file.as_path(), err.line, err.key.as_str()),
            (file, line, key),
            "{err}"
        );
        assert!(err.message.contains(part), "{err}\nshould contain: {part}");
    }

    const GROUP: &str =
        "[[group]]\nname = \"main\"\ncommand = \"sh\"\n[group.local]\ninstances = 1\n";

    #[test]
    fn includes_add_groups_in_order_with_paths_relative_to_their_file() {
        let dir = files(&[
            (
                "herd.toml",
                &format!("include = [\"conf.d/*.toml\", \"extra.toml\", \"none.d/*.toml\"]\n{GROUP}"),
            ),
            (
                "conf.d/b.toml",
                "[[group]]\nname = \"b\"\ncommand = \"./bin/b\"\ncwd = \"data\"\n[group.local]\ninstances = 2\n",
            ),
            (
                "conf.d/a.toml",
                "include = [\"../nested/n.toml\"]\n[[group]]\nname = \"a\"\ncommand = \"a\"\n[group.local]\ninstances = 1\n",
            ),
            ("conf.d/notes.txt", "not toml"),
            (
                "nested/n.toml",
                "[[group]]\nname = \"n\"\ncommand = \"/bin/n\"\n[group.local]\ninstances = 1\n",
            ),
            (
                "extra.toml",
                "[[group]]\nname = \"x\"\ncommand = \"x\"\n[group.local]\ninstances = 1\n",
            ),
        ]);
        let config = Config::load(&dir.path().join("herd.toml")).expect("valid");
        let names: Vec<&str> = config.groups.iter().map(|g| g.name.as_str()).collect();
        // The file's own groups, then each included file's (and what it
        // includes), a glob's matches in name order.
        assert_eq!(names, ["main", "a", "n", "b", "x"]);
        let conf_d = std::fs::canonicalize(dir.path()).unwrap().join("conf.d");
        let b = &config.groups[3];
        let conf_d_text = conf_d.display().to_string();
        assert!(
            b.command == format!("{conf_d_text}/bin/b") || b.command.ends_with("/conf.d/bin/b"),
            "{}",
            b.command
        );
        assert!(b.command.starts_with('/'), "{}", b.command);
        assert!(b
            .cwd
            .as_ref()
            .is_some_and(|cwd| cwd.is_absolute() && cwd.ends_with("conf.d/data")));
        // Bare names stay bare, for PATH.
        assert_eq!(config.groups[1].command, "a");
    }

    #[test]
    fn errors_in_included_files_name_that_file_and_line() {
        let dir = files(&[
            ("herd.toml", &format!("include = [\"conf.d/*.toml\"]\n{GROUP}")),
            (
                "conf.d/web.toml",
                "[master]\ntimeout = \"1s\"\n\n[[group]]\nname = \"main\"\ncommand = \"w\"\n[group.local]\ninstances = 0\n",
            ),
        ]);
        let errors = load_errors(Config::load(&dir.path().join("herd.toml")));
        let web = dir.path().join("conf.d/web.toml");
        assert_eq!(errors.len(), 3, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            &web,
            1,
            "master",
            "set it in the main config file",
        );
        assert_error(
            &errors[1],
            &web,
            5,
            "group[2].name",
            "duplicate group name \"main\"",
        );
        assert!(
            errors[1].message.contains("herd.toml:3)"),
            "names where it was first used: {}",
            errors[1]
        );
        assert_error(
            &errors[2],
            &web,
            8,
            "group[2].local.instances",
            "at least 1",
        );
    }

    #[test]
    fn include_problems() {
        let dir = files(&[
            (
                "herd.toml",
                &format!(
                    "include = [\"missing.toml\", \"loop/a.toml\", \"bad.toml\", \"latin1.toml\"]\n{GROUP}"
                ),
            ),
            ("loop/a.toml", "include = [\"b.toml\"]\n"),
            ("loop/b.toml", "\n\ninclude = [\"a.toml\"]\n"),
            ("bad.toml", "[[group]]\nname = \"b\"\ncommand = \n"),
        ]);
        std::fs::write(
            dir.path().join("latin1.toml"),
            b"# caf\xe9\n[[group]]\nname = \"l\"\n",
        )
        .unwrap();
        let main = dir.path().join("herd.toml");
        let errors = load_errors(Config::load(&main));
        assert_eq!(errors.len(), 4, "{}", ConfigErrors(errors.clone()));
        assert_error(
            &errors[0],
            &main,
            1,
            "include[1]",
            "missing.toml does not exist",
        );
        let b = dir.path().join("loop/b.toml");
        assert_error(&errors[1], &b, 3, "include[1]", "makes a cycle");
        assert!(errors[1].message.contains("a.toml -> "), "{}", errors[1]);
        // Syntax errors stop the walk, but are named with their file too.
        assert_error(&errors[2], &dir.path().join("bad.toml"), 3, "(syntax)", "");
        let latin1 = dir.path().join("latin1.toml");
        assert_error(&errors[3], &latin1, 1, "(encoding)", "byte offset 5");

        // A file including itself, and an include that is not a list.
        let dir = files(&[
            ("herd.toml", &format!("include = [\"*.toml\"]\n{GROUP}")),
            ("other.toml", "include = \"herd.toml\"\n"),
        ]);
        let main = dir.path().join("herd.toml");
        let errors = load_errors(Config::load(&main));
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], &main, 1, "include[1]", "makes a cycle");
        assert_error(
            &errors[1],
            &dir.path().join("other.toml"),
            1,
            "include",
            "expected an array",
        );
    }

    #[test]
    fn reload_sees_what_includes_add() {
        let dir = files(&[
            (
                "herd.toml",
                &format!("include = [\"conf.d/*.toml\"]\n{GROUP}"),
            ),
            ("conf.d/.keep", ""),
        ]);
        let main = dir.path().join("herd.toml");
        assert_eq!(Config::load(&main).expect("valid").groups.len(), 1);
        std::fs::write(
            dir.path().join("conf.d/more.toml"),
            "[[group]]\nname = \"more\"\ncommand = \"sh\"\n[group.local]\ninstances = 1\n",
        )
        .unwrap();
        assert_eq!(Config::load(&main).expect("valid").groups.len(), 2);
    }

    #[test]
    fn a_file_that_is_not_utf8_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("herd.toml");
        std::fs::write(&path, b"[master]\ntimeout = \"1s\" # \xff\n").unwrap();
        let errors = load_errors(Config::load(&path));
        assert_eq!(errors.len(), 1);
        assert_error(
            &errors[0],
            &path,
            2,
            "(encoding)",
            "byte 0xff at byte offset 26",
        );
        assert_eq!(errors[0].column, 18);
    }

    #[test]
    fn check_looks_for_programs_directories_and_files() {
        let dir = files(&[
            (
                "herd.toml",
                r#"[ssh]
identity_file = "keys/none"

[[group]]
name = "missing"
command = "./bin/missing"
[group.local]
instances = 1

[[group]]
name = "plain"
command = "bin/plain.sh"
[group.local]
instances = 1

[[group]]
name = "nocwd"
command = "bin/ok.sh"
cwd = "/nonexistent/taskherd/app"
[group.local]
instances = 1

[[group]]
name = "nopath"
command = "surely-not-a-program-7f3a"
[group.local]
instances = 1

[[group]]
name = "remote-only"
command = "/not/here/either"
[[group.remote]]
hosts = ["web1"]
instances = 1

# The feeder on this machine is taskherd's own: the command is the
# remote consumers' only.
[[group]]
name = "built-in-feeder"
command = "/not/here/either"
[group.feeder]
file = "jobs.queue"
[[group.remote]]
hosts = ["web1"]
instances = 1
"#,
            ),
            ("bin/plain.sh", "#!/bin/sh\n"),
            ("bin/ok.sh", "#!/bin/sh\n"),
        ]);
        let bin = dir.path().join("bin");
        std::fs::set_permissions(bin.join("ok.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let main = dir.path().join("herd.toml");
        // The text alone is fine.
        Config::load(&main).expect("valid");
        let options = CheckOptions {
            hosts: false,
            ..CheckOptions::default()
        };
        let errors = load_errors(Config::load_and_check(&main, &options));
        assert_eq!(errors.len(), 5, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], &main, 2, "ssh.identity_file", "identity file");
        assert_error(&errors[1], &main, 6, "group[1].command", "no such file");
        assert!(
            errors[1].message.contains("relative to the directory of"),
            "{}",
            errors[1]
        );
        assert!(!errors[1].message.contains("/./"), "{}", errors[1]);
        assert_error(&errors[2], &main, 12, "group[2].command", "not executable");
        assert_error(
            &errors[3],
            &main,
            19,
            "group[3].cwd",
            "working directory /nonexistent/taskherd/app does not exist",
        );
        assert_error(
            &errors[4],
            &main,
            25,
            "group[4].command",
            "not found in PATH",
        );

        // A value whose interpolation failed has that one error.
        std::fs::write(
            &main,
            "[[group]]\nname = \"w\"\ncommand = \"${TASKHERD_TEST_SURELY_UNSET_7f3a}/w\"\n\
             cwd = \"${TASKHERD_TEST_SURELY_UNSET_7f3a}\"\n[group.local]\ninstances = 1\n",
        )
        .unwrap();
        let errors = load_errors(Config::load_and_check(&main, &options));
        assert_eq!(errors.len(), 2, "{}", ConfigErrors(errors.clone()));
        assert_error(&errors[0], &main, 3, "group[1].command", "is not set");
        assert_error(&errors[1], &main, 4, "group[1].cwd", "is not set");
    }
}
