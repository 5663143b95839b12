//! What a backup reads. Each source becomes a top-level name in the snapshot:
//! a directory tree (`path`), or the standard output of a command stored as one
//! file (`command`, e.g. `pg_dump -Fc db`).

pub mod command;
pub mod walk;

use std::path::PathBuf;
use std::time::Duration;

/// A source, resolved from a tenant policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Path {
        name: String,
        path: PathBuf,
        exclude: Vec<String>,
        one_file_system: bool,
    },
    Command {
        name: String,
        argv: Vec<String>,
        timeout: Option<Duration>,
    },
}

impl Source {
    pub fn name(&self) -> &str {
        match self {
            Source::Path { name, .. } | Source::Command { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Source::Path { .. } => "path",
            Source::Command { .. } => "command",
        }
    }

    /// Where it comes from, for reports.
    pub fn origin(&self) -> String {
        match self {
            Source::Path { path, .. } => path.display().to_string(),
            Source::Command { argv, .. } => argv.join(" "),
        }
    }
}
