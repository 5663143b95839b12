//! When a scheduled job runs next: pure functions of its schedule, the last
//! slot that ran and the clock, so the rules are tested without waiting.
//!
//! A *slot* is a time the schedule fires (`0 2 * * *` → every day 02:00:00
//! UTC). A run belongs to one slot; the slot, not the start time, is what is
//! recorded (locally and in the store), so a daemon restarted or delayed runs
//! each slot at most once, and several daemons agree on what "this run" is.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Schedule;
use crate::jobs::check::ReadData;
use crate::tenant::TenantId;

/// When a job fires.
#[derive(Debug, Clone, PartialEq)]
// One per scheduled job (thousands, not millions): boxing the schedule buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum When {
    /// A cron schedule from the policy.
    Cron(Schedule),
    /// From `start` on, every `every`: a tenant's shred is asked for at its due
    /// date (offboarding request + grace) and again each period until it is
    /// done, so a legal hold is re-checked (and its refusal logged), a failed
    /// or interrupted shred is retried, and lifting a hold takes effect.
    Every {
        start: DateTime<Utc>,
        every: Duration,
    },
}

impl When {
    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Cron(s) => s.next_after(t),
            When::Every { start, every } => {
                if t < *start {
                    return Some(*start);
                }
                // At least a millisecond: the arithmetic below divides by it.
                let step = chrono::Duration::from_std(*every)
                    .ok()
                    .filter(|d| d.num_milliseconds() > 0)?;
                let n = (t - *start).num_milliseconds() / step.num_milliseconds() + 1;
                step_from(*start, step, n)
            }
        }
    }

    /// The last firing at or before `t`.
    pub fn last_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            When::Cron(s) => s.last_at_or_before(t),
            When::Every { start, every } => {
                if t < *start {
                    return None;
                }
                // At least a millisecond: the arithmetic below divides by it.
                let step = chrono::Duration::from_std(*every)
                    .ok()
                    .filter(|d| d.num_milliseconds() > 0)?;
                let n = (t - *start).num_milliseconds() / step.num_milliseconds();
                step_from(*start, step, n)
            }
        }
    }

    /// Time between this slot and the next one, if there is a next one.
    pub fn period_after(&self, slot: DateTime<Utc>) -> Option<Duration> {
        let next = self.next_after(slot)?;
        (next - slot).to_std().ok()
    }
}

/// `start + n × step`, or None past the last time chrono can hold (checked:
/// `n` can exceed an i32 and the product a `TimeDelta`).
fn step_from(start: DateTime<Utc>, step: chrono::Duration, n: i64) -> Option<DateTime<Utc>> {
    let ms = step.num_milliseconds().checked_mul(n)?;
    start.checked_add_signed(chrono::Duration::try_milliseconds(ms)?)
}

impl std::fmt::Display for When {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            When::Cron(s) => write!(f, "cron \"{s}\""),
            When::Every { start, every } => {
                write!(
                    f,
                    "every {} from {}",
                    humantime::format_duration(*every),
                    start.to_rfc3339()
                )
            }
        }
    }
}

/// The slot to run next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    pub slot: DateTime<Utc>,
    /// The slot is already past: a run missed (downtime, or a job that never
    /// ran) that is run once now, however many slots were missed.
    pub catch_up: bool,
}

/// The next slot after `last` (the slot that last ran; `None`: never ran).
///
/// - A job that never ran is due at once, as the latest slot at or before
///   `now` (a schedule with no past slot waits for its first one).
/// - Otherwise the first slot after `last`; if that is already past, the
///   latest past slot instead: missed slots coalesce into one run.
pub fn next_slot(when: &When, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<Next> {
    let first = match last {
        None => match when.last_at_or_before(now) {
            Some(slot) => {
                return Some(Next {
                    slot,
                    catch_up: true,
                });
            }
            None => {
                return when.next_after(now).map(|slot| Next {
                    slot,
                    catch_up: false,
                });
            }
        },
        Some(last) => when.next_after(last)?,
    };
    if first > now {
        return Some(Next {
            slot: first,
            catch_up: false,
        });
    }
    let slot = when.last_at_or_before(now).unwrap_or(first).max(first);
    Some(Next {
        slot,
        catch_up: true,
    })
}

/// The next slot after a schedule was *changed* by a reload: the first one
/// after both the last run and now. A changed schedule never triggers a
/// catch-up (its past slots were never promised), except for a job that has
/// never run, which is due at once as always.
pub fn next_slot_after_change(
    when: &When,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<Next> {
    match last {
        None => next_slot(when, None, now),
        Some(last) => when.next_after(last.max(now)).map(|slot| Next {
            slot,
            catch_up: false,
        }),
    }
}

/// The random delay added to a run's start. It is drawn per tenant and slot
/// (from a per-process random seed), so the jobs of one tenant that share a
/// slot start together, in priority order, while tenants sharing a schedule
/// spread uniformly over `[0, max)`. It is capped at half the schedule's
/// period so jitter never pushes a run past its next slot.
pub fn jitter(
    seed: u64,
    tenant: &TenantId,
    slot: DateTime<Utc>,
    max: Duration,
    period: Option<Duration>,
) -> Duration {
    let cap = match period {
        Some(p) => max.min(p / 2),
        None => max,
    };
    let cap_ms = cap.as_millis() as u64;
    if cap_ms == 0 {
        return Duration::ZERO;
    }
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(tenant.as_str().as_bytes());
    h.update(&slot.timestamp().to_le_bytes());
    let bytes: [u8; 8] = h.finalize().as_bytes()[..8].try_into().expect("8 bytes");
    Duration::from_millis(u64::from_le_bytes(bytes) % cap_ms)
}

/// A slice of a rotating `--read-data` subset: slice `n` of `of` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subset {
    pub n: u32,
    pub of: u32,
}

/// What a scheduled check reads, given the policy's `read_data_fraction` and
/// the slice the previous scheduled check read: `of = ceil(1 / fraction)`
/// slices, taken in turn, so every pack is read once every `of` checks.
/// A fraction of 0 checks structure only; 1 (or more) reads everything.
pub fn check_read_data(fraction: f64, previous: Option<Subset>) -> (ReadData, Option<Subset>) {
    if fraction.is_nan() || fraction <= 0.0 {
        return (ReadData::None, None);
    }
    if fraction >= 1.0 {
        return (ReadData::All, None);
    }
    // The epsilon keeps 1/0.1 (10.000000000000002) at 10 slices, not 11.
    let of = ((1.0 / fraction) - 1e-9).ceil().clamp(1.0, 1_000_000.0) as u32;
    let n = match previous {
        Some(p) if p.of == of && p.n >= 1 && p.n <= of => p.n % of + 1,
        _ => 1,
    };
    let subset = Subset { n, of };
    (ReadData::Subset { n, of }, Some(subset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 5, h, m, s).unwrap()
    }

    fn daily() -> When {
        When::Cron(Schedule::parse("0 2 * * *").unwrap())
    }

    #[test]
    fn a_job_that_never_ran_is_due_now() {
        let n = next_slot(&daily(), None, t(10, 0, 0)).unwrap();
        assert_eq!(
            n,
            Next {
                slot: t(2, 0, 0),
                catch_up: true
            }
        );
        // Mid-second, just before the next firing: still the latest past one.
        let every_2s = When::Cron(Schedule::parse("*/2 * * * * *").unwrap());
        let now = t(10, 0, 49) + chrono::Duration::milliseconds(800);
        assert_eq!(
            next_slot(&every_2s, None, now).unwrap(),
            Next {
                slot: t(10, 0, 48),
                catch_up: true
            }
        );
        // A schedule whose first slot is still ahead waits for it.
        let later = When::Cron(Schedule::parse("0 0 0 1 1 * 2030").unwrap());
        let n = next_slot(&later, None, t(10, 0, 0)).unwrap();
        assert!(!n.catch_up);
        assert_eq!(n.slot.format("%Y").to_string(), "2030");
    }

    #[test]
    fn the_next_slot_follows_the_last_one() {
        let n = next_slot(&daily(), Some(t(2, 0, 0)), t(10, 0, 0)).unwrap();
        assert_eq!(
            n,
            Next {
                slot: t(2, 0, 0) + chrono::Duration::days(1),
                catch_up: false
            }
        );
    }

    #[test]
    fn missed_slots_coalesce_into_one_catch_up_run() {
        // Down for three days: one run, for the latest missed slot.
        let last = t(2, 0, 0) - chrono::Duration::days(3);
        let n = next_slot(&daily(), Some(last), t(10, 0, 0)).unwrap();
        assert_eq!(
            n,
            Next {
                slot: t(2, 0, 0),
                catch_up: true
            }
        );
        // After that run, the next is tomorrow's.
        let n = next_slot(&daily(), Some(n.slot), t(10, 0, 1)).unwrap();
        assert!(!n.catch_up);
        let every_2s = When::Cron(Schedule::parse("*/2 * * * * *").unwrap());
        let n = next_slot(&every_2s, Some(t(10, 0, 0)), t(10, 0, 7)).unwrap();
        assert_eq!(n.slot, t(10, 0, 6));
    }

    #[test]
    fn a_changed_schedule_does_not_catch_up() {
        let hourly = When::Cron(Schedule::parse("0 * * * *").unwrap());
        let n = next_slot_after_change(&hourly, Some(t(2, 0, 0)), t(10, 30, 0)).unwrap();
        assert_eq!(
            n,
            Next {
                slot: t(11, 0, 0),
                catch_up: false
            }
        );
        assert!(
            next_slot_after_change(&hourly, None, t(10, 30, 0))
                .unwrap()
                .catch_up
        );
    }

    #[test]
    fn repeating_from_a_start() {
        let at = When::Every {
            start: t(12, 0, 0),
            every: Duration::from_secs(3600),
        };
        assert_eq!(next_slot(&at, None, t(10, 0, 0)).unwrap().slot, t(12, 0, 0));
        let late = next_slot(&at, None, t(13, 30, 0)).unwrap();
        assert!(late.catch_up);
        assert_eq!(late.slot, t(13, 0, 0));
        assert_eq!(
            next_slot(&at, Some(t(13, 0, 0)), t(13, 30, 0))
                .unwrap()
                .slot,
            t(14, 0, 0)
        );
        assert_eq!(at.last_at_or_before(t(11, 59, 59)), None);
        assert_eq!(at.last_at_or_before(t(12, 0, 0)), Some(t(12, 0, 0)));
    }

    #[test]
    fn jitter_spreads_tenants_and_respects_its_caps() {
        let max = Duration::from_secs(300);
        let day = Some(Duration::from_secs(86_400));
        let mut offsets: Vec<u64> = (0..1000)
            .map(|i| {
                let tenant = TenantId::new(&format!("t{i}")).unwrap();
                jitter(7, &tenant, t(2, 0, 0), max, day).as_millis() as u64
            })
            .collect();
        assert!(offsets.iter().all(|&o| o < 300_000));
        offsets.sort();
        offsets.dedup_by_key(|o| *o / 1000);
        assert!(
            offsets.len() > 200,
            "1000 tenants over 300 s should use more than 200 distinct seconds, used {}",
            offsets.len()
        );
        let a = TenantId::new("a").unwrap();
        // Same tenant and slot: the same offset, so its jobs keep their order.
        assert_eq!(
            jitter(7, &a, t(2, 0, 0), max, day),
            jitter(7, &a, t(2, 0, 0), max, day)
        );
        // Never more than half the period.
        assert!(
            jitter(7, &a, t(2, 0, 0), max, Some(Duration::from_secs(2))) < Duration::from_secs(1)
        );
        assert_eq!(
            jitter(7, &a, t(2, 0, 0), Duration::ZERO, day),
            Duration::ZERO
        );
    }

    #[test]
    fn check_subsets_rotate_through_every_slice() {
        let (r, s) = check_read_data(0.1, None);
        assert_eq!(r, ReadData::Subset { n: 1, of: 10 });
        let mut prev = s;
        let mut seen = vec![1];
        for _ in 0..10 {
            let (_, s) = check_read_data(0.1, prev);
            seen.push(s.unwrap().n);
            prev = s;
        }
        assert_eq!(seen, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1]);
        assert_eq!(check_read_data(0.3, None).1.unwrap().of, 4);
        assert_eq!(check_read_data(1.0, None).0, ReadData::All);
        assert_eq!(check_read_data(0.0, None).0, ReadData::None);
        // A changed fraction starts over.
        let (r, _) = check_read_data(0.5, Some(Subset { n: 7, of: 10 }));
        assert_eq!(r, ReadData::Subset { n: 1, of: 2 });
    }
}
