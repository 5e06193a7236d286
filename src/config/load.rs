//! Reading a config file and turning parse errors into [`Problem`]s located by key and line.

use std::fmt;
use std::path::{Path, PathBuf};

use super::Config;

/// One thing wrong with a configuration, located by key, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path, e.g. `device[1].baud`.
    pub key: String,
    /// 1-based line in the file, where known.
    pub line: Option<usize>,
    pub message: String,
    pub fix: String,
}

/// A configuration that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source} (fix: check the path given to --config and its permissions)", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", render(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

impl ConfigError {
    /// Every problem found (one for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

fn render(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!("{}: {} problem(s) in the configuration", path.display(), problems.len());
    for p in problems {
        out.push('\n');
        out.push_str(&p.to_string_in(path));
    }
    out
}

impl Problem {
    pub(super) fn new(key: impl Into<String>, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { key: key.into(), line: None, message: message.into(), fix: fix.into() }
    }

    /// `FILE:LINE: KEY: MESSAGE (fix: FIX)`.
    pub fn to_string_in(&self, path: &Path) -> String {
        let loc = match self.line {
            Some(l) => format!("{}:{l}", path.display()),
            None => path.display().to_string(),
        };
        format!("{loc}: {}: {} (fix: {})", self.key, self.message, self.fix)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.key, self.message, self.fix)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, [`ConfigError::Invalid`] with every
    /// problem found otherwise.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|problems| ConfigError::Invalid { path: path.to_owned(), problems })
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// Every problem found; a syntax or type error stops parsing, so it comes alone.
    pub fn from_toml(text: &str) -> Result<Self, Vec<Problem>> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = match e.path().to_string() {
                p if p == "." => String::new(),
                p => p.trim_start_matches('.').to_string(),
            };
            let inner = e.into_inner();
            let line = inner.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            // toml's messages may span lines; a problem is one line.
            let message = inner.message().trim().split('\n').map(str::trim).collect::<Vec<_>>().join("; ");
            // toml has no words for some syntax errors (a stray carriage return).
            let message = if message.is_empty() { "invalid TOML syntax".to_string() } else { message };
            // "missing field `id`" under `gateway` is the key `gateway.id`.
            let key = match message.strip_prefix("missing field `").and_then(|m| m.split('`').next()) {
                Some(field) if path.is_empty() => field.to_string(),
                Some(field) => format!("{path}.{field}"),
                None if path.is_empty() => "(top level)".to_string(),
                None => path,
            };
            let fix = fix_for_parse_error(&message);
            vec![Problem { key, line, message, fix }]
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(Config { source: toml::from_str(text).ok(), ..config })
        } else {
            Err(problems)
        }
    }
}

fn fix_for_parse_error(message: &str) -> String {
    if message.starts_with("unknown field") {
        "remove the key or correct its spelling (config/sensorgate.example.toml lists every key)".into()
    } else if message.starts_with("missing field") {
        "add the key (config/sensorgate.example.toml shows it with an example)".into()
    } else if message.starts_with("unknown variant") {
        "use one of the expected values".into()
    } else if message.starts_with("invalid duration") {
        "write durations with a unit, like \"500ms\", \"30s\" or \"2m\"".into()
    } else if message.starts_with("invalid size") {
        "write sizes like \"1KiB\" or \"8MiB\", or a number of bytes".into()
    } else if message.contains("expected a nonzero") {
        "use a number above 0".into()
    } else if message.starts_with("duplicate key") {
        "keep one of the repeated keys".into()
    } else if message.starts_with("invalid type") || message.starts_with("invalid value") {
        "correct the value; config/sensorgate.example.toml shows every key with its type".into()
    } else {
        // Not about a value: the file is not valid TOML here.
        "fix the TOML syntax at this line (quotes, brackets, `key = value`)".into()
    }
}
