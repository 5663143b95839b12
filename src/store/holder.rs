//! Who holds a lease or a reader record, and whether that holder is provably
//! dead. A record names its process by host name, boot id, machine id, pid
//! namespace, pid and the process's start time (field 22 of
//! `/proc/<pid>/stat`). On the same host, kernel boot and pid namespace, a
//! holder whose pid no longer exists, has exited (zombie), or now belongs to a
//! process with another start time (the pid was reused) is dead: its record is
//! taken over at once instead of waiting for its TTL. A record written before
//! this machine's last boot (same host name and machine id, another boot id) is
//! dead too. Anything else (another host, another container, a record without
//! a process identity, a `/proc` that hides the pid) is unknown and expires by
//! TTL, as before.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What identifies one process across hosts, reboots, containers and pid reuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    /// `/proc/sys/kernel/hostname`.
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`: changes at every boot.
    pub boot_id: String,
    /// `/etc/machine-id`, when there is one: tells a rebooted host from
    /// another machine that happens to share its host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// `readlink /proc/self/ns/pid`: containers on one kernel share the boot
    /// id but not their pids.
    pub pid_ns: String,
    pub pid: u32,
    /// Clock ticks after boot at which the process started (`/proc/<pid>/stat`
    /// field 22): a reused pid has another one.
    pub start_time: u64,
}

/// What can be said about a record's holder from this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The holder's process runs on this host (same start time).
    Alive,
    /// Provably dead; the reason names the evidence.
    Dead(String),
    /// Another host or container, an old-format record, or no evidence: the
    /// record's TTL decides.
    Unknown,
}

impl Liveness {
    pub fn is_dead(&self) -> bool {
        matches!(self, Liveness::Dead(_))
    }
}

/// The state of a pid on this host, as far as it can be seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    Gone,
    Zombie,
    Running {
        start_time: u64,
    },
    /// Exists, but its start time cannot be read (e.g. `/proc` mounted with
    /// `hidepid`), or the probe failed.
    Unknown,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A process-unique holder name: host, pid and a random suffix (the format
/// of every version; what proves death is in [`ProcessIdentity`]).
pub fn holder_id() -> String {
    format!(
        "{}:{}:{}",
        hostname(),
        std::process::id(),
        hex::encode(crate::util::random_bytes::<4>())
    )
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// This process's identity, or `None` where it cannot be established (no
/// `/proc`, or a `/proc` of another pid namespace): records then carry no
/// identity and expire by TTL, and this process judges every holder unknown.
pub fn current() -> Option<&'static ProcessIdentity> {
    static CURRENT: OnceLock<Option<ProcessIdentity>> = OnceLock::new();
    CURRENT
        .get_or_init(|| {
            let pid = std::process::id();
            let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
            // `/proc/self` must be this process: a `/proc` mounted for another
            // pid namespace would give start times of other processes.
            let (own_pid, _, start_time) = parse_stat(&stat)?;
            if own_pid != pid {
                return None;
            }
            Some(ProcessIdentity {
                host: hostname(),
                boot_id: read_trimmed("/proc/sys/kernel/random/boot_id")?,
                machine_id: read_trimmed("/etc/machine-id"),
                pid_ns: std::fs::read_link("/proc/self/ns/pid")
                    .ok()?
                    .to_string_lossy()
                    .into_owned(),
                pid,
                start_time,
            })
        })
        .as_ref()
}

/// When this machine booted (`btime` of `/proc/stat`).
fn boot_time() -> Option<DateTime<Utc>> {
    static BOOT: OnceLock<Option<DateTime<Utc>>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let secs: i64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        DateTime::from_timestamp(secs, 0)
    })
}

/// `(pid, state, start time)` from a `/proc/<pid>/stat` line. The command
/// name (field 2) may hold spaces and parentheses: fields are counted after
/// its last `)`.
pub fn parse_stat(stat: &str) -> Option<(u32, char, u64)> {
    let open = stat.find(" (")?;
    let pid = stat[..open].trim().parse().ok()?;
    let close = stat.rfind(')')?;
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state); field 22 (starttime) is rest[19].
    let state = rest.first()?.chars().next()?;
    let start = rest.get(19)?.parse().ok()?;
    Some((pid, state, start))
}

/// Looks at a pid of this host's (and this process's) pid namespace.
pub fn probe(pid: u32) -> ProcState {
    let Ok(raw) = i32::try_from(pid) else {
        return ProcState::Unknown;
    };
    if raw <= 0 {
        return ProcState::Unknown;
    }
    // kill(pid, 0) sees every process of the namespace, whatever `/proc`'s
    // hidepid setting: ESRCH is proof that the pid is unused.
    // SAFETY: signal 0 performs only the existence and permission checks.
    if unsafe { libc::kill(raw, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    {
        return ProcState::Gone;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => match parse_stat(&s) {
            Some((p, 'Z' | 'X', _)) if p == pid => ProcState::Zombie,
            Some((p, _, start_time)) if p == pid => ProcState::Running { start_time },
            _ => ProcState::Unknown,
        },
        Err(_) => ProcState::Unknown,
    }
}

/// Judges the holder of a record last written at `written` (by the holder's
/// own clock), from this process.
pub fn judge(holder: Option<&ProcessIdentity>, written: Option<DateTime<Utc>>) -> Liveness {
    match current() {
        Some(me) => judge_with(holder, written, me, boot_time(), probe),
        None => Liveness::Unknown,
    }
}

/// [`judge`] with this host's facts passed in (unit tests).
pub fn judge_with(
    holder: Option<&ProcessIdentity>,
    written: Option<DateTime<Utc>>,
    me: &ProcessIdentity,
    booted: Option<DateTime<Utc>>,
    probe: impl Fn(u32) -> ProcState,
) -> Liveness {
    let Some(h) = holder else {
        return Liveness::Unknown;
    };
    if h.host != me.host {
        return Liveness::Unknown;
    }
    if h.boot_id != me.boot_id {
        // Another boot of this very machine, provided the record was last
        // written before it booted: a machine that merely shares the host
        // name renews its records after our boot.
        let same_machine = h.machine_id.is_some() && h.machine_id == me.machine_id;
        return match (written, booted) {
            (Some(w), Some(b)) if same_machine && w < b => Liveness::Dead(format!(
                "host {} rebooted at {} (boot id {} then, {} now)",
                h.host,
                b.to_rfc3339(),
                h.boot_id,
                me.boot_id
            )),
            _ => Liveness::Unknown,
        };
    }
    if h.pid_ns != me.pid_ns {
        return Liveness::Unknown;
    }
    match probe(h.pid) {
        ProcState::Gone => {
            Liveness::Dead(format!("process {} on {} no longer exists", h.pid, h.host))
        }
        ProcState::Zombie => Liveness::Dead(format!("process {} on {} has exited", h.pid, h.host)),
        ProcState::Running { start_time } if start_time != h.start_time => Liveness::Dead(format!(
            "pid {} on {} now belongs to another process (started at tick {start_time}, the holder at tick {})",
            h.pid, h.host, h.start_time
        )),
        ProcState::Running { .. } => Liveness::Alive,
        ProcState::Unknown => Liveness::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> ProcessIdentity {
        ProcessIdentity {
            host: "h1".into(),
            boot_id: "boot-b".into(),
            machine_id: Some("m1".into()),
            pid_ns: "pid:[1]".into(),
            pid: 100,
            start_time: 5000,
        }
    }

    fn holder(pid: u32, start_time: u64) -> ProcessIdentity {
        ProcessIdentity {
            pid,
            start_time,
            ..me()
        }
    }

    fn t(s: &str) -> Option<DateTime<Utc>> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = "4242 (we ird) (name)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19 20";
        assert_eq!(parse_stat(line), Some((4242, 'S', 777)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("12 (x) R 1 2"), None, "too short");
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert_eq!(parse_stat(&own).unwrap().0, std::process::id());
    }

    #[test]
    fn a_pid_that_is_gone_reused_or_a_zombie_is_dead_a_live_one_is_not() {
        let me = me();
        let boot = t("2026-01-01T00:00:00Z");
        let written = t("2026-01-02T00:00:00Z");
        let judge = |h: &ProcessIdentity, state: ProcState| {
            judge_with(Some(h), written, &me, boot, |_| state)
        };
        let h = holder(200, 900);
        assert!(judge(&h, ProcState::Gone).is_dead());
        assert!(judge(&h, ProcState::Zombie).is_dead());
        let reused = judge(&h, ProcState::Running { start_time: 901 });
        assert!(
            matches!(&reused, Liveness::Dead(r) if r.contains("another process")),
            "{reused:?}"
        );
        assert_eq!(
            judge(&h, ProcState::Running { start_time: 900 }),
            Liveness::Alive
        );
        assert_eq!(judge(&h, ProcState::Unknown), Liveness::Unknown);
    }

    #[test]
    fn other_hosts_containers_and_old_records_are_left_to_their_ttl() {
        let me = me();
        let boot = t("2026-01-01T00:00:00Z");
        let gone = |_| ProcState::Gone;
        let old = t("2025-12-31T00:00:00Z");
        assert_eq!(judge_with(None, old, &me, boot, gone), Liveness::Unknown);
        let other_host = ProcessIdentity {
            host: "h2".into(),
            ..holder(200, 1)
        };
        assert_eq!(
            judge_with(Some(&other_host), old, &me, boot, gone),
            Liveness::Unknown
        );
        let container = ProcessIdentity {
            pid_ns: "pid:[2]".into(),
            ..holder(200, 1)
        };
        assert_eq!(
            judge_with(Some(&container), old, &me, boot, gone),
            Liveness::Unknown
        );
    }

    #[test]
    fn a_record_from_before_this_boot_is_dead_a_namesake_machine_is_not() {
        let me = me();
        let boot = t("2026-01-01T00:00:00Z");
        let gone = |_| ProcState::Gone;
        let previous_boot = ProcessIdentity {
            boot_id: "boot-a".into(),
            ..holder(200, 1)
        };
        let before = t("2025-12-31T23:59:00Z");
        assert!(judge_with(Some(&previous_boot), before, &me, boot, gone).is_dead());
        // Written after this boot: another machine with the same host name.
        let after = t("2026-01-01T00:01:00Z");
        assert_eq!(
            judge_with(Some(&previous_boot), after, &me, boot, gone),
            Liveness::Unknown
        );
        // Another machine id, or none known: no proof.
        let namesake = ProcessIdentity {
            machine_id: Some("m2".into()),
            ..previous_boot.clone()
        };
        assert_eq!(
            judge_with(Some(&namesake), before, &me, boot, gone),
            Liveness::Unknown
        );
        let no_id = ProcessIdentity {
            machine_id: None,
            ..previous_boot
        };
        assert_eq!(
            judge_with(Some(&no_id), before, &me, boot, gone),
            Liveness::Unknown
        );
    }

    #[test]
    fn this_process_and_a_child_are_alive_a_reaped_child_is_dead() {
        let me = current().expect("a Linux /proc");
        assert_eq!(judge(Some(me), Some(Utc::now())), Liveness::Alive);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let ProcState::Running { start_time } = probe(pid) else {
            panic!("the child runs")
        };
        let h = ProcessIdentity {
            pid,
            start_time,
            ..me.clone()
        };
        assert_eq!(judge(Some(&h), Some(Utc::now())), Liveness::Alive);
        let reused = ProcessIdentity {
            start_time: start_time + 1,
            ..h.clone()
        };
        assert!(judge(Some(&reused), Some(Utc::now())).is_dead());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(judge(Some(&h), Some(Utc::now())).is_dead());
    }
}
