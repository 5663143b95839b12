//! A command whose standard output is backed up as one file (`pg_dump -Fc`,
//! `sqlite3 db .dump`). A non-zero exit, a signal or a timeout fails the
//! backup, so a half-written dump never becomes a snapshot.

use std::io::{self, Read};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Keep the last 8 KiB of stderr for the error message.
const STDERR_TAIL: usize = 8 * 1024;

pub struct RunningCommand {
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    started: Instant,
    timeout: Option<Duration>,
    argv: Vec<String>,
}

impl RunningCommand {
    pub fn spawn(argv: &[String], timeout: Option<Duration>) -> Result<Self, String> {
        let (prog, args) = argv.split_first().ok_or("empty command")?;
        let mut cmd = Command::new(prog);
        for var in crate::util::hidden_from_children() {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {prog:?}: {e}"))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pipe = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.extend_from_slice(&buf[..n]);
                if s.len() > 2 * STDERR_TAIL {
                    let cut = s.len() - STDERR_TAIL;
                    s.drain(..cut);
                }
            }
        });
        Ok(RunningCommand {
            stdout: child.stdout.take(),
            child,
            stderr,
            stderr_reader: Some(stderr_reader),
            started: Instant::now(),
            timeout,
            argv: argv.to_vec(),
        })
    }

    /// The command's stdout; reading fails once the timeout has passed.
    pub fn stdout(&mut self) -> TimedReader<'_> {
        TimedReader {
            inner: self.stdout.as_mut().expect("stdout taken once"),
            started: self.started,
            timeout: self.timeout,
        }
    }

    /// Waits for exit. Ok only for exit status 0 within the timeout.
    pub fn finish(mut self) -> Result<(), String> {
        drop(self.stdout.take());
        let status = self.wait_with_timeout();
        if let Some(h) = self.stderr_reader.take() {
            let _ = h.join();
        }
        let tail = {
            let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
            let start = s.len().saturating_sub(STDERR_TAIL);
            String::from_utf8_lossy(&s[start..]).trim().to_owned()
        };
        let cmd = self.argv.join(" ");
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!(
                "command `{cmd}` failed ({s}){}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            )),
            Err(e) => Err(format!("command `{cmd}`: {e}")),
        }
    }

    fn wait_with_timeout(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if let Some(t) = self.timeout
                && self.started.elapsed() > t
            {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {}s and was killed", t.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningCommand {
    fn drop(&mut self) {
        // A backup that fails midway must not leave the command running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct TimedReader<'a> {
    inner: &'a mut ChildStdout,
    started: Instant,
    timeout: Option<Duration>,
}

impl Read for TimedReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(t) = self.timeout
            && self.started.elapsed() > t
        {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "command timed out"));
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str]) -> (Vec<u8>, Result<(), String>) {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let mut c = RunningCommand::spawn(&argv, Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        c.stdout().read_to_end(&mut out).unwrap();
        (out, c.finish())
    }

    #[test]
    fn output_and_exit_status() {
        let (out, r) = run(&["sh", "-c", "printf hello"]);
        assert_eq!(out, b"hello");
        r.unwrap();
        let (_, r) = run(&["sh", "-c", "echo partial; echo broken >&2; exit 3"]);
        let e = r.unwrap_err();
        assert!(e.contains("exit status: 3") && e.contains("broken"), "{e}");
        assert!(RunningCommand::spawn(&["/nonexistent/prog".into()], None).is_err());
    }

    #[test]
    fn a_secret_variable_is_not_inherited() {
        // cargo sets CARGO_MANIFEST_DIR for the tests it runs: a variable
        // this process surely has, standing in for a PIN (`pin_env`).
        let var = "CARGO_MANIFEST_DIR";
        assert!(std::env::var_os(var).is_some(), "the test needs {var} set");
        let script = format!("printf %s \"${{{var}-unset}}\"");
        crate::util::hide_from_children(var);
        let (out, r) = run(&["sh", "-c", &script]);
        r.unwrap();
        assert_eq!(out, b"unset");
    }
}
