//! Log output: JSON lines (for journald and log shippers) when the output is
//! not a terminal, readable text on a terminal. `CUSTOS_LOG` sets the filter
//! (default `info`), `CUSTOS_LOG_FORMAT=json|text` forces the format.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Where logs go: the daemon logs to stdout (journald); CLI commands log to
/// stderr so stdout carries only their result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
}

pub fn init(target: LogTarget) {
    let filter = EnvFilter::try_from_env("CUSTOS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let is_tty = match target {
        LogTarget::Stdout => std::io::stdout().is_terminal(),
        LogTarget::Stderr => std::io::stderr().is_terminal(),
    };
    let json = match std::env::var("CUSTOS_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => !is_tty,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = match (json, target) {
        (true, LogTarget::Stdout) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stdout)
            .try_init(),
        (true, LogTarget::Stderr) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .try_init(),
        (false, LogTarget::Stdout) => builder.with_writer(std::io::stdout).try_init(),
        (false, LogTarget::Stderr) => builder.with_writer(std::io::stderr).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
