//! Config model, parsing and validation.
//!
//! A config is TOML (see the README's config reference). [`Config::load`]
//! reads and validates it in one go and returns every error it found, each
//! naming the file, the line and the key, so that `taskherd check` can list
//! them all at once.
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

mod model;
mod parse;

pub use model::*;

use std::fmt;
use std::path::{Path, PathBuf};

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

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// [`LoadError::Read`] if the file cannot be read, [`LoadError::Invalid`]
    /// with every problem found otherwise.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path).map_err(LoadError::Invalid)
    }

    /// Parses and validates config text; `source` is the file name used in
    /// errors and as the base of relative paths.
    ///
    /// # Errors
    /// Every problem found, each with its line and key.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
        parse::parse(text, source)
    }

    /// The directory relative paths in the config are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        match self.source.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}
