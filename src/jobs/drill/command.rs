//! The drill's verify command: an application-level check of the restored
//! data (`sqlite3 … "PRAGMA integrity_check"`, `pg_restore --list …`).
//!
//! It runs without a shell, in the restore directory, in a process group of
//! its own so a timeout kills it and everything it started. How it is
//! judged: exit status 0, and, when `verify_expect_stdout` is set, standard
//! output equal to that text (both trimmed): some checks (SQLite's
//! integrity_check) exit 0 even when they find corruption and only say so on
//! stdout. The tails of stdout and stderr go into the report.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::VerifySpec;
use crate::format::ids::SnapshotId;
use crate::tenant::TenantId;

/// Bytes of stdout/stderr kept for the report (the end of each).
const TAIL: usize = 4096;
/// Bytes of stdout kept to compare with `verify_expect_stdout`.
const HEAD: usize = 64 << 10;
/// How long pipes may stay open after the command ended (a descendant that
/// escaped the process group could hold them forever).
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// What the verify command did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyCommandResult {
    /// The argv as run, placeholders expanded.
    pub argv: Vec<String>,
    pub passed: bool,
    /// Exit status, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did (SIGKILL after a timeout).
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub timeout_seconds: f64,
    /// Why the command was not run: it could not be started (not installed,
    /// not executable) or a `{file:NAME}` it names is not in the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_stdout: Option<String>,
    /// Whether stdout matched `expect_stdout` (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_matched: Option<bool>,
    pub stdout_tail: String,
    pub stderr_tail: String,
    pub duration_seconds: f64,
}

impl VerifyCommandResult {
    /// One line saying why the command failed.
    pub fn failure_message(&self) -> String {
        let program = self.argv.first().map(String::as_str).unwrap_or("");
        let last_line = |s: &str| {
            s.trim_end()
                .lines()
                .last()
                .map(|l| format!(": {}", l.trim()))
                .unwrap_or_default()
        };
        if let Some(e) = &self.not_run {
            return format!("verify command {program:?} was not run: {e}");
        }
        if self.timed_out {
            return format!(
                "verify command {program:?} did not finish within {}s and was killed",
                self.timeout_seconds
            );
        }
        if let Some(sig) = self.signal {
            return format!(
                "verify command {program:?} was killed by signal {sig}{}",
                last_line(&self.stderr_tail)
            );
        }
        if self.exit_code != Some(0) {
            return format!(
                "verify command {program:?} exited with status {}{}",
                self.exit_code.unwrap_or(-1),
                last_line(&self.stderr_tail)
            );
        }
        if self.stdout_matched == Some(false) {
            let first = self.stdout_tail.trim().lines().next().unwrap_or("");
            return format!(
                "verify command {program:?} printed {:?}, expected {:?}",
                crate::config::units::truncate(first, 200),
                self.expect_stdout.as_deref().unwrap_or("").trim()
            );
        }
        format!("verify command {program:?} failed")
    }
}

/// Runs the verify command on a restore in `dir`.
pub async fn run(
    spec: &VerifySpec,
    dir: &Path,
    tenant: &TenantId,
    snapshot: &SnapshotId,
) -> VerifyCommandResult {
    let argv = spec.command.expand(dir);
    let started = Instant::now();
    let mut result = VerifyCommandResult {
        argv: argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        passed: false,
        exit_code: None,
        signal: None,
        timed_out: false,
        timeout_seconds: spec.timeout.as_secs_f64(),
        not_run: None,
        expect_stdout: spec.expect_stdout.clone(),
        stdout_matched: None,
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        duration_seconds: 0.0,
    };
    // A {file:NAME} that is not in the restore: say so rather than letting the
    // command fail (or, worse, create the file and pass).
    for name in spec.command.files() {
        if std::fs::symlink_metadata(dir.join(name)).is_err() {
            result.not_run = Some(format!(
                "{{file:{name}}}: {name} is not in the restored snapshot"
            ));
            return result;
        }
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(dir)
        .env("CUSTOS_DRILL_DIR", dir)
        .env("CUSTOS_TENANT", tenant.as_str())
        .env("CUSTOS_SNAPSHOT", snapshot.to_hex())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for var in crate::util::hidden_from_children() {
        cmd.env_remove(var);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            result.not_run = Some(e.to_string());
            result.duration_seconds = started.elapsed().as_secs_f64();
            return result;
        }
    };
    let pgid = child.id();
    let stdout = tokio::spawn(capture(child.stdout.take().expect("piped")));
    let stderr = tokio::spawn(capture(child.stderr.take().expect("piped")));
    let status = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            result.timed_out = true;
            if let Some(pid) = pgid {
                kill_group(pid);
            }
            let _ = child.start_kill();
            child.wait().await.ok()
        }
    };
    result.duration_seconds = started.elapsed().as_secs_f64();
    if let Some(status) = status {
        result.exit_code = status.code();
        result.signal = status.signal();
    }
    let out = finish_capture(stdout).await;
    let err = finish_capture(stderr).await;
    result.stdout_tail = out.tail();
    result.stderr_tail = err.tail();
    if let Some(expect) = &spec.expect_stdout {
        let matched = !out.head_truncated
            && String::from_utf8_lossy(&out.head).trim() == expect.as_str().trim();
        result.stdout_matched = Some(matched);
    }
    result.passed =
        !result.timed_out && result.exit_code == Some(0) && result.stdout_matched != Some(false);
    result
}

fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid)
        && pgid > 0
    {
        // SAFETY: kill(2) with a negative pid signals that process group; no
        // memory is involved. The group is the command's own (process_group(0)).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

#[derive(Default)]
struct Captured {
    head: Vec<u8>,
    head_truncated: bool,
    tail: Vec<u8>,
}

impl Captured {
    fn tail(&self) -> String {
        String::from_utf8_lossy(&self.tail).into_owned()
    }
}

async fn capture(mut pipe: impl AsyncRead + Unpin) -> Captured {
    let mut c = Captured::default();
    let mut buf = [0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        let room = HEAD - c.head.len();
        c.head.extend_from_slice(&chunk[..n.min(room)]);
        c.head_truncated |= n > room;
        c.tail.extend_from_slice(chunk);
        if c.tail.len() > 2 * TAIL {
            let cut = c.tail.len() - TAIL;
            c.tail.drain(..cut);
        }
    }
    if c.tail.len() > TAIL {
        let cut = c.tail.len() - TAIL;
        c.tail.drain(..cut);
    }
    c
}

async fn finish_capture(task: tokio::task::JoinHandle<Captured>) -> Captured {
    let abort = task.abort_handle();
    match tokio::time::timeout(PIPE_GRACE, task).await {
        Ok(Ok(c)) => c,
        _ => {
            abort.abort();
            Captured::default()
        }
    }
}
