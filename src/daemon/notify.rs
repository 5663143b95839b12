//! sd_notify(3): tells systemd (a `Type=notify` unit) when the daemon is
//! ready, what it is doing (`STATUS=`), that its scheduler loop is alive
//! (`WATCHDOG=1`, so systemd restarts a stuck daemon), and when it reloads or
//! stops. Without `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

pub struct Notifier {
    enabled: bool,
    /// `WatchdogSec=` of the unit, when systemd asked for keep-alives.
    watchdog: Option<Duration>,
    last_status: String,
    failed: bool,
}

/// STATUS= lines are shown by `systemctl status`; keep them short.
const MAX_STATUS: usize = 400;

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            watchdog: sd_notify::watchdog_enabled(),
            last_status: String::new(),
            failed: false,
        }
    }

    /// The watchdog interval systemd expects keep-alives within, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&mut self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            if !self.failed {
                tracing::warn!(event = "daemon.notify_failed", error = %e, "sd_notify failed");
            }
            self.failed = true;
        }
    }

    pub fn ready(&mut self, status: &str) {
        let status = clip(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = status;
    }

    /// Sends STATUS= when it changed.
    pub fn status(&mut self, status: &str) {
        let status = clip(status);
        if status != self.last_status {
            self.send(&[NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }

    pub fn watchdog_ping(&mut self) {
        if self.watchdog.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&mut self, status: &str) {
        let status = clip(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
        self.last_status = status;
    }
}

fn clip(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.len() <= MAX_STATUS {
        return s;
    }
    let mut end = MAX_STATUS;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
