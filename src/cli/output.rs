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
                print_envelope(true, Some(&value), None);
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
        print_envelope::<()>(false, None, Some(e.into()));
    }
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// Why a command failed, as its `--json` envelope says: a kind (an
/// [`crate::error::ErrorKind`], or a drill's reason) and a message.
pub struct Failure<'a> {
    pub kind: &'a str,
    pub message: String,
}

impl From<&Error> for Failure<'static> {
    fn from(e: &Error) -> Self {
        Failure {
            kind: e.kind().as_str(),
            message: e.to_string(),
        }
    }
}

/// The one `--json` document of every command:
/// `{"ok": …, "result": …, "error": {"kind": …, "message": …}}`, where a
/// failed command has `error` and keeps `result` when it made one (a check
/// that found faults, a failed drill), and `ok` may be false without an
/// error (a daemon run with failed jobs, policies that do not validate).
pub fn print_envelope<T: Serialize + ?Sized>(
    ok: bool,
    result: Option<&T>,
    error: Option<Failure<'_>>,
) {
    print_json(&envelope(ok, result, error));
}

fn envelope<T: Serialize + ?Sized>(
    ok: bool,
    result: Option<&T>,
    error: Option<Failure<'_>>,
) -> serde_json::Value {
    // Built as a `Value` (keys sorted), as every command printed it before.
    let mut doc = serde_json::json!({ "ok": ok });
    if let Some(result) = result {
        doc["result"] = serde_json::to_value(result).unwrap_or_default();
    }
    if let Some(f) = error {
        doc["error"] = serde_json::json!({ "kind": f.kind, "message": f.message });
    }
    doc
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_has_one_shape() {
        let ok = envelope(true, Some(&serde_json::json!({"b": 1, "a": 2})), None);
        assert_eq!(ok.to_string(), r#"{"ok":true,"result":{"a":2,"b":1}}"#);
        let e = Error::NotFound {
            what: "snapshot x".into(),
        };
        let failed = envelope::<()>(false, None, Some((&e).into()));
        assert_eq!(
            failed.to_string(),
            r#"{"error":{"kind":"not_found","message":"snapshot x not found"},"ok":false}"#
        );
        // A failure that made a report keeps it beside the error.
        let both = envelope(
            false,
            Some(&7),
            Some(Failure {
                kind: "rto_exceeded",
                message: "slow".into(),
            }),
        );
        assert_eq!(both["result"], 7);
        assert_eq!(both["error"]["kind"], "rto_exceeded");
        assert_eq!(both["ok"], false);
    }
}
