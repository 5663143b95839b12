//! How commands print: one JSON document on stdout with `--json`, readable
//! text otherwise; errors on stderr; progress bars only on a terminal.

use std::io::IsTerminal;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::error::Error;
use crate::jobs::Progress;

/// Prints a command's outcome and returns its exit code. `human` prints the
/// success case as text; failures print `error: …` to stderr.
pub fn finish<T: Serialize>(
    json: bool,
    result: Result<T, Error>,
    human: impl FnOnce(&T),
) -> ExitCode {
    match result {
        Ok(value) => {
            if json {
                print_json(&serde_json::json!({ "ok": true, "result": value }));
            } else {
                human(&value);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(json, &e),
    }
}

/// Prints an error (and, with `--json`, the failure document) and returns 1.
pub fn fail(json: bool, e: &Error) -> ExitCode {
    if json {
        print_json(
            &serde_json::json!({ "ok": false, "error": { "kind": e.kind(), "message": e.to_string() } }),
        );
    }
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

pub fn print_json(v: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

/// A progress bar on stderr when it is a terminal and output is not JSON.
pub struct TerminalProgress {
    bar: Option<ProgressBar>,
}

impl TerminalProgress {
    pub fn new(json: bool, verb: &str) -> Self {
        if json || !std::io::stderr().is_terminal() {
            return TerminalProgress { bar: None };
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix} {bytes} ({bytes_per_sec}), {msg} [{elapsed}]",
            )
            .expect("valid template"),
        );
        bar.set_prefix(verb.to_owned());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        TerminalProgress { bar: Some(bar) }
    }

    pub fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for TerminalProgress {
    fn bytes_read(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    fn file_done(&self, _size: u64) {
        if let Some(b) = &self.bar {
            let files = b
                .message()
                .split(' ')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            b.set_message(format!("{files} files"));
        }
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.done();
    }
}

pub fn human_bytes(n: u64) -> String {
    crate::util::human_bytes(n)
}
