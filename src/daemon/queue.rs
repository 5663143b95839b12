//! The scheduler's queue: which job of which tenant starts when, without any
//! I/O. Every method takes the time it acts at, so the rules (slots and
//! jitter, one writer per tenant with readers beside it, the job limit,
//! back-off after a busy lease, re-planning that makes older timers stale)
//! are unit-tested here with a clock that does not move by itself.
//!
//! [`super::scheduler`] owns one queue and does the rest: it launches what
//! [`Queue::choose`] picks, records outcomes and exports metrics.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::plan::{self, Next, When};
use super::registry::ScheduledJob;
use crate::tenant::TenantId;

/// A tenant's scheduled job.
pub type Key = (TenantId, ScheduledJob);

/// How an entry's next slot is found when it is (re)planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replan {
    /// Catch up on a missed slot (at start, for new tenants).
    CatchUp,
    /// A reload changed the schedule: no catch-up.
    Changed,
}

struct Entry {
    when: When,
    /// Bumped on every (re)planning; timers and ready items of an older
    /// generation are stale and ignored.
    generation: u64,
    /// The slot waiting to run, if any.
    pending: Option<DateTime<Utc>>,
    /// When the pending slot's timer fires (slot + jitter, or a retry).
    start_at: Option<DateTime<Utc>>,
    /// Consecutive busy-lease retries of the pending slot.
    contended: u32,
    first_contended: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: DateTime<Utc>,
    generation: u64,
    key: Key,
}

/// Due and waiting for a free tenant and a free job slot; ordered by start
/// time, then job priority.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ready {
    at: DateTime<Utc>,
    job: ScheduledJob,
    tenant: TenantId,
    generation: u64,
}

/// A job taken off the queue to run: the slot it runs for and the
/// generation its outcome is reported back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub slot: DateTime<Utc>,
    pub generation: u64,
}

/// A busy lease met by the pending slot of an entry.
#[derive(Debug, Clone, Copy)]
pub struct Contention {
    /// 1 for the first busy lease of this slot, then 2, 3, …
    pub attempt: u32,
    /// When the first one was met.
    pub since: Instant,
}

pub struct Queue {
    entries: HashMap<Key, Entry>,
    timers: BinaryHeap<Reverse<Timer>>,
    ready: BTreeSet<Ready>,
    /// Tenants whose lease was busy: none of their writers starts before
    /// this time (they would find the same lease busy).
    backoff: HashMap<TenantId, DateTime<Utc>>,
    next_gen: u64,
    seed: u64,
    jitter_max: Duration,
    /// `--once`: due slots are ready at once, later ones are not planned.
    once: bool,
}

impl Queue {
    /// `seed` draws the jitter (see [`plan::jitter`]).
    pub fn new(seed: u64, jitter_max: Duration, once: bool) -> Queue {
        Queue {
            entries: HashMap::new(),
            timers: BinaryHeap::new(),
            ready: BTreeSet::new(),
            backoff: HashMap::new(),
            next_gen: 1,
            seed,
            jitter_max,
            once,
        }
    }

    /// Scheduled entries (a tenant and job kind with a schedule).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Jobs due and waiting to start.
    pub fn waiting(&self) -> usize {
        self.ready.len()
    }

    /// Every entry and its schedule.
    pub fn schedules(&self) -> impl Iterator<Item = (&Key, &When)> {
        self.entries.iter().map(|(k, e)| (k, &e.when))
    }

    pub fn when(&self, key: &Key) -> Option<&When> {
        self.entries.get(key).map(|e| &e.when)
    }

    /// When the entry's pending slot is planned to start; `None` when
    /// nothing is planned (or it is ready now, `--once`).
    pub fn start_at(&self, key: &Key) -> Option<DateTime<Utc>> {
        self.entries.get(key).and_then(|e| e.start_at)
    }

    /// (Re)places an entry and plans its next slot after `last` (the slot
    /// that last ran).
    pub fn insert(
        &mut self,
        key: Key,
        when: When,
        last: Option<DateTime<Utc>>,
        mode: Replan,
        now: DateTime<Utc>,
    ) {
        let next = match mode {
            Replan::CatchUp => plan::next_slot(&when, last, now),
            Replan::Changed => plan::next_slot_after_change(&when, last, now),
        };
        self.entries.insert(
            key.clone(),
            Entry {
                when,
                generation: 0,
                pending: None,
                start_at: None,
                contended: 0,
                first_contended: None,
            },
        );
        self.plan(&key, next, now);
    }

    pub fn remove(&mut self, key: &Key) -> bool {
        self.entries.remove(key).is_some()
    }

    fn bump(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    /// Sets the entry's next slot and its start (slot + jitter; now + jitter
    /// for a catch-up). `--once` readies due slots at once and plans nothing
    /// later. `now` is shared by the jobs of a tenant planned together, so
    /// those due at once keep their priority order.
    fn plan(&mut self, key: &Key, next: Option<Next>, now: DateTime<Utc>) {
        let generation = self.bump();
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.generation = generation;
        entry.contended = 0;
        entry.first_contended = None;
        entry.start_at = None;
        let Some(next) = next else {
            entry.pending = None;
            return;
        };
        if self.once {
            if next.slot <= now {
                entry.pending = Some(next.slot);
                self.ready.insert(Ready {
                    at: now,
                    job: key.1,
                    tenant: key.0.clone(),
                    generation,
                });
            } else {
                entry.pending = None;
            }
            return;
        }
        let period = entry.when.period_after(next.slot);
        let jitter = plan::jitter(self.seed, &key.0, next.slot, self.jitter_max, period);
        let base = if next.catch_up { now } else { next.slot };
        // Checked: a slot near the end of chrono's range (a far-future shred
        // date) must not panic the scheduler; the jitter is dropped there.
        let at = chrono::Duration::from_std(jitter)
            .ok()
            .and_then(|j| base.checked_add_signed(j))
            .unwrap_or(base);
        entry.pending = Some(next.slot);
        entry.start_at = Some(at);
        self.timers.push(Reverse(Timer {
            at,
            generation,
            key: key.clone(),
        }));
    }

    fn is_current(&self, key: &Key, generation: u64) -> bool {
        self.entries
            .get(key)
            .is_some_and(|e| e.generation == generation && e.pending.is_some())
    }

    /// Moves timers that are due at `now` to the ready set.
    pub fn fire(&mut self, now: DateTime<Utc>) {
        while let Some(Reverse(top)) = self.timers.peek() {
            if top.at > now {
                break;
            }
            let Some(Reverse(t)) = self.timers.pop() else {
                break;
            };
            if self.is_current(&t.key, t.generation) {
                self.ready.insert(Ready {
                    at: t.at,
                    job: t.key.1,
                    tenant: t.key.0,
                    generation: t.generation,
                });
            }
        }
    }

    /// The next live timer (its time and entry), dropping stale ones on the way.
    pub fn next_timer(&mut self) -> Option<(DateTime<Utc>, Key)> {
        while let Some(Reverse(top)) = self.timers.peek() {
            if self.is_current(&top.key, top.generation) {
                return Some((top.at, top.key.clone()));
            }
            self.timers.pop();
        }
        None
    }

    /// Takes off the ready set the jobs that may start now, in order: one
    /// writer per tenant (readers beside it), at most `max` running in all.
    /// `running` are the jobs running now; `backed_up` says whether a tenant
    /// has had a successful backup (a tenant never backed up backs up before
    /// it is checked or drilled: a first start would otherwise check a tenant
    /// that does not exist yet).
    pub fn choose(
        &mut self,
        now: DateTime<Utc>,
        running: &HashSet<Key>,
        max: usize,
        backed_up: impl Fn(&TenantId) -> bool,
    ) -> Vec<Key> {
        if running.len() >= max || self.ready.is_empty() {
            return Vec::new();
        }
        self.backoff.retain(|_, until| *until > now);
        let mut chosen = Vec::new();
        // Tenants with a writer running or chosen: writers exclude writers.
        let mut writing: HashSet<TenantId> = running
            .iter()
            .filter(|(_, job)| !job.is_reader())
            .map(|(t, _)| t.clone())
            .collect();
        // Tenants with a writer running, or ready ahead of the job looked at.
        let mut writer_ahead = writing.clone();
        let mut stale = Vec::new();
        for r in &self.ready {
            if running.len() + chosen.len() >= max {
                break;
            }
            let key = (r.tenant.clone(), r.job);
            if !self.is_current(&key, r.generation) {
                stale.push(r.clone());
                continue;
            }
            if running.contains(&key) {
                continue;
            }
            if r.job.is_reader() {
                if writer_ahead.contains(&r.tenant) && !backed_up(&r.tenant) {
                    continue;
                }
            } else {
                writer_ahead.insert(r.tenant.clone());
                // A writer waits for the tenant's other writer (here, or
                // elsewhere: a busy lease); readers never hold it up.
                if writing.contains(&r.tenant) || self.backoff.contains_key(&r.tenant) {
                    continue;
                }
                writing.insert(r.tenant.clone());
            }
            chosen.push(r.clone());
        }
        for r in stale {
            self.ready.remove(&r);
        }
        chosen
            .into_iter()
            .map(|r| {
                self.ready.remove(&r);
                (r.tenant, r.job)
            })
            .collect()
    }

    /// The slot a chosen job runs for: its pending slot, or the latest slot
    /// at or before `now` if it waited past later ones (a busy lease, a full
    /// job limit), so it runs once for all of them.
    pub fn begin(&mut self, key: &Key, now: DateTime<Utc>) -> Option<Start> {
        let entry = self.entries.get_mut(key)?;
        let pending = entry.pending?;
        let slot = entry
            .when
            .last_at_or_before(now)
            .map_or(pending, |latest| latest.max(pending));
        entry.pending = Some(slot);
        entry.start_at = None;
        Some(Start {
            slot,
            generation: entry.generation,
        })
    }

    /// Plans the slot after `slot`, which ran (unless a reload re-planned the
    /// entry meanwhile). `last_run`: nothing more is planned (stopping, or
    /// `--once`).
    pub fn after_run(
        &mut self,
        key: &Key,
        slot: DateTime<Utc>,
        generation: u64,
        last_run: bool,
        now: DateTime<Utc>,
    ) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        if last_run || self.once {
            entry.pending = None;
            return;
        }
        let next = plan::next_slot(&entry.when, Some(slot), now);
        self.plan(key, next, now);
    }

    /// Counts a busy lease met by the entry's pending slot; `None` when the
    /// entry was re-planned meanwhile (the outcome is stale).
    pub fn contended(&mut self, key: &Key, generation: u64, now: Instant) -> Option<Contention> {
        let entry = self.entries.get_mut(key)?;
        if entry.generation != generation {
            return None;
        }
        entry.contended += 1;
        let since = *entry.first_contended.get_or_insert(now);
        Some(Contention {
            attempt: entry.contended,
            since,
        })
    }

    /// Tries the pending slot again at `now + delay`; until then no writer of
    /// the tenant starts.
    pub fn retry(&mut self, key: &Key, delay: Duration, now: DateTime<Utc>) {
        let generation = self.bump();
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.generation = generation;
        let at = now + chrono::Duration::from_std(delay).unwrap_or_default();
        entry.start_at = Some(at);
        self.backoff.insert(key.0.clone(), at);
        self.timers.push(Reverse(Timer {
            at,
            generation,
            key: key.clone(),
        }));
    }

    /// Drops the entry's pending slot (it is given up, or runs after the
    /// next start).
    pub fn drop_pending(&mut self, key: &Key) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.pending = None;
            entry.start_at = None;
        }
    }

    /// Shutting down: nothing more starts.
    pub fn stop(&mut self) {
        self.ready.clear();
        self.timers.clear();
    }

    /// Nothing ready and nothing pending.
    pub fn idle(&self) -> bool {
        self.ready.is_empty() && self.entries.values().all(|e| e.pending.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, h, m, s).unwrap()
    }

    fn hourly() -> When {
        When::Every {
            start: t(0, 0, 0),
            every: Duration::from_secs(3600),
        }
    }

    fn key(tenant: &str, job: ScheduledJob) -> Key {
        (TenantId::new(tenant).unwrap(), job)
    }

    fn queue() -> Queue {
        Queue::new(7, Duration::ZERO, false)
    }

    const ALWAYS: fn(&TenantId) -> bool = |_| true;

    /// An hourly entry planned as at start (catching up).
    fn add(q: &mut Queue, k: &Key, last: Option<DateTime<Utc>>, now: DateTime<Utc>) {
        q.insert(k.clone(), hourly(), last, Replan::CatchUp, now);
    }

    #[test]
    fn a_job_that_ran_waits_for_its_next_slot_and_starts_then() {
        let mut q = queue();
        let k = key("acme", ScheduledJob::Backup);
        add(&mut q, &k, Some(t(10, 0, 0)), t(10, 20, 0));
        assert_eq!(q.start_at(&k), Some(t(11, 0, 0)));
        assert_eq!(q.next_timer(), Some((t(11, 0, 0), k.clone())));
        q.fire(t(10, 59, 59));
        assert!(
            q.choose(t(10, 59, 59), &HashSet::new(), 4, ALWAYS)
                .is_empty()
        );
        q.fire(t(11, 0, 0));
        assert_eq!(
            q.choose(t(11, 0, 0), &HashSet::new(), 4, ALWAYS),
            vec![k.clone()]
        );
        let start = q.begin(&k, t(11, 0, 1)).unwrap();
        assert_eq!(start.slot, t(11, 0, 0));
        q.after_run(&k, start.slot, start.generation, false, t(11, 5, 0));
        assert_eq!(q.start_at(&k), Some(t(12, 0, 0)));
        assert!(!q.idle());
    }

    #[test]
    fn missed_slots_run_once_now_and_a_late_start_takes_the_latest_slot() {
        let mut q = queue();
        let k = key("acme", ScheduledJob::Backup);
        // Last ran at 03:00; the daemon was down until 10:20.
        add(&mut q, &k, Some(t(3, 0, 0)), t(10, 20, 0));
        assert_eq!(q.start_at(&k), Some(t(10, 20, 0)));
        q.fire(t(10, 20, 0));
        assert_eq!(q.choose(t(10, 20, 0), &HashSet::new(), 1, ALWAYS).len(), 1);
        // It waited for a job slot past 12:00: it runs once, for 12:00.
        assert_eq!(q.begin(&k, t(12, 30, 0)).unwrap().slot, t(12, 0, 0));
    }

    #[test]
    fn a_changed_schedule_does_not_catch_up() {
        let mut q = queue();
        let k = key("acme", ScheduledJob::Check);
        q.insert(
            k.clone(),
            hourly(),
            Some(t(3, 0, 0)),
            Replan::Changed,
            t(10, 20, 0),
        );
        assert_eq!(q.start_at(&k), Some(t(11, 0, 0)));
    }

    #[test]
    fn jitter_delays_the_start_within_its_bound_and_never_past_half_the_period() {
        let mut q = Queue::new(42, Duration::from_secs(24 * 3600), false);
        for tenant in ["a", "b", "c", "d", "e"] {
            let k = key(tenant, ScheduledJob::Backup);
            add(&mut q, &k, Some(t(10, 0, 0)), t(10, 1, 0));
            let at = q.start_at(&k).unwrap();
            assert!(at >= t(11, 0, 0) && at < t(11, 30, 0), "{tenant}: {at}");
        }
    }

    /// One writer per tenant; readers run beside it once the tenant has been
    /// backed up; the job limit counts everything running.
    #[test]
    fn writers_exclude_writers_and_readers_run_beside_them() {
        let mut q = queue();
        let now = t(10, 0, 0);
        let backup = key("acme", ScheduledJob::Backup);
        let forget = key("acme", ScheduledJob::Forget);
        let check = key("acme", ScheduledJob::Check);
        let drill = key("acme", ScheduledJob::Drill);
        let other = key("beta", ScheduledJob::Backup);
        for k in [&backup, &forget, &check, &drill, &other] {
            add(&mut q, k, None, now);
        }
        q.fire(now);
        let first = q.choose(now, &HashSet::new(), 8, ALWAYS);
        assert!(
            first.contains(&backup) && first.contains(&other),
            "{first:?}"
        );
        assert!(
            first.contains(&check) && first.contains(&drill),
            "{first:?}"
        );
        assert!(!first.contains(&forget), "two writers of acme: {first:?}");
        // Forget stays ready until the backup is no longer running.
        let running: HashSet<Key> = first.iter().cloned().collect();
        assert!(q.choose(now, &running, 8, ALWAYS).is_empty());
        let running: HashSet<Key> = [check.clone()].into();
        assert_eq!(q.choose(now, &running, 8, ALWAYS), vec![forget]);
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn a_tenant_never_backed_up_is_backed_up_before_it_is_read() {
        let mut q = queue();
        let now = t(10, 0, 0);
        let backup = key("acme", ScheduledJob::Backup);
        let check = key("acme", ScheduledJob::Check);
        add(&mut q, &backup, None, now);
        add(&mut q, &check, None, now);
        q.fire(now);
        let never = |_: &TenantId| false;
        assert_eq!(
            q.choose(now, &HashSet::new(), 8, never),
            vec![backup.clone()]
        );
        let running: HashSet<Key> = [backup].into();
        assert!(q.choose(now, &running, 8, never).is_empty());
        assert_eq!(q.choose(now, &HashSet::new(), 8, never), vec![check]);
    }

    #[test]
    fn the_job_limit_holds_and_priority_orders_a_tenants_jobs() {
        let mut q = queue();
        let now = t(10, 0, 0);
        let jobs = [
            ScheduledJob::Drill,
            ScheduledJob::Check,
            ScheduledJob::Backup,
        ];
        for job in jobs {
            q.insert(key("acme", job), hourly(), None, Replan::CatchUp, now);
        }
        q.fire(now);
        let running = HashSet::new();
        assert_eq!(
            q.choose(now, &running, 1, ALWAYS),
            vec![key("acme", ScheduledJob::Backup)]
        );
        let full: HashSet<Key> = [key("beta", ScheduledJob::Backup)].into();
        assert!(q.choose(now, &full, 1, ALWAYS).is_empty());
        assert_eq!(q.waiting(), 2);
    }

    /// A busy lease backs off the tenant's writers, not its readers, and the
    /// retry fires at its time with the attempt counted.
    #[test]
    fn a_busy_lease_backs_off_writers_only() {
        let mut q = queue();
        let now = t(10, 0, 0);
        let backup = key("acme", ScheduledJob::Backup);
        let forget = key("acme", ScheduledJob::Forget);
        let check = key("acme", ScheduledJob::Check);
        add(&mut q, &backup, None, now);
        q.fire(now);
        let start = q.choose(now, &HashSet::new(), 8, ALWAYS);
        assert_eq!(start, vec![backup.clone()]);
        let s = q.begin(&backup, now).unwrap();
        let mono = Instant::now();
        let c = q.contended(&backup, s.generation, mono).unwrap();
        assert_eq!(c.attempt, 1);
        q.retry(&backup, Duration::from_secs(4), now);
        add(&mut q, &forget, None, now);
        add(&mut q, &check, None, now);
        q.fire(now);
        assert_eq!(q.choose(now, &HashSet::new(), 8, ALWAYS), vec![check]);
        let later = t(10, 0, 4);
        q.fire(later);
        // After the back-off one writer starts: the one ready first; the
        // retried backup waits for it.
        assert_eq!(
            q.choose(later, &HashSet::new(), 8, ALWAYS),
            vec![forget.clone()]
        );
        let running: HashSet<Key> = [forget].into();
        assert!(q.choose(later, &running, 8, ALWAYS).is_empty());
        assert_eq!(
            q.choose(later, &HashSet::new(), 8, ALWAYS),
            vec![backup.clone()]
        );
        let s2 = q.begin(&backup, later).unwrap();
        assert_eq!(s2.slot, s.slot, "the retry runs the same slot");
        let c2 = q.contended(&backup, s2.generation, Instant::now()).unwrap();
        assert_eq!((c2.attempt, c2.since), (2, mono));
    }

    #[test]
    fn replanning_makes_older_timers_and_outcomes_stale() {
        let mut q = queue();
        let k = key("acme", ScheduledJob::Backup);
        add(&mut q, &k, Some(t(10, 0, 0)), t(10, 30, 0));
        q.fire(t(11, 0, 0));
        let start = q.begin(&k, t(11, 0, 0)).unwrap();
        // A reload re-plans the entry while that run is going on.
        let daily = When::Every {
            start: t(0, 0, 0),
            every: Duration::from_secs(24 * 3600),
        };
        q.insert(
            k.clone(),
            daily,
            Some(t(10, 0, 0)),
            Replan::Changed,
            t(11, 0, 1),
        );
        assert_eq!(q.choose(t(11, 0, 1), &HashSet::new(), 8, ALWAYS), vec![]);
        assert!(q.contended(&k, start.generation, Instant::now()).is_none());
        q.after_run(&k, start.slot, start.generation, false, t(11, 5, 0));
        let next_day = Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap();
        assert_eq!(q.start_at(&k), Some(next_day), "the reload's plan stands");
        assert_eq!(q.next_timer(), Some((next_day, k.clone())));
        assert!(q.remove(&k));
        assert_eq!(q.next_timer(), None, "a removed entry's timer is stale");
    }

    #[test]
    fn once_readies_due_slots_and_plans_nothing_later() {
        let mut q = Queue::new(7, Duration::from_secs(600), true);
        let due = key("acme", ScheduledJob::Backup);
        let later = key("beta", ScheduledJob::Backup);
        add(&mut q, &due, Some(t(9, 0, 0)), t(10, 0, 0));
        add(&mut q, &later, Some(t(10, 0, 0)), t(10, 30, 0));
        assert_eq!(q.next_timer(), None);
        assert_eq!(
            q.choose(t(10, 30, 0), &HashSet::new(), 8, ALWAYS),
            vec![due.clone()]
        );
        let s = q.begin(&due, t(10, 30, 0)).unwrap();
        assert_eq!(s.slot, t(10, 0, 0));
        q.after_run(&due, s.slot, s.generation, false, t(10, 31, 0));
        assert!(q.idle(), "--once is done after the due slot ran");
    }

    #[test]
    fn stopping_starts_nothing_more() {
        let mut q = queue();
        let k = key("acme", ScheduledJob::Backup);
        add(&mut q, &k, None, t(10, 0, 0));
        q.stop();
        q.fire(t(12, 0, 0));
        assert!(q.choose(t(12, 0, 0), &HashSet::new(), 8, ALWAYS).is_empty());
        q.drop_pending(&k);
        assert!(q.idle());
    }
}
