//! `custos forget`: applies a retention policy and removes the snapshots it
//! does not keep. Data goes only with `prune` (or `--prune`).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::ids::SnapshotId;
use crate::format::snapshot::Snapshot;
use crate::jobs::deletion::{self, Deferred};
use crate::repo::Repo;
use crate::store::ObjectName;
use crate::store::deletions::DeletionPlan;
use crate::store::lease::LeaseGuard;

use crate::config::KeepRules;

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub snapshot: SnapshotId,
    pub time: DateTime<Utc>,
    pub keep: bool,
    /// Rules that keep it ("last", "daily", …).
    pub reasons: Vec<&'static str>,
}

/// Decides which snapshots to keep, newest first.
pub fn apply(rules: &KeepRules, snapshots: &[Snapshot], now: DateTime<Utc>) -> Vec<Decision> {
    let mut sorted: Vec<&Snapshot> = snapshots.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
    let mut reasons: BTreeMap<SnapshotId, Vec<&'static str>> = BTreeMap::new();
    for s in sorted.iter().take(rules.keep_last as usize) {
        reasons.entry(s.id).or_default().push("last");
    }
    type Bucket = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);
    let buckets: [(&'static str, u32, Bucket); 5] = [
        ("hourly", rules.keep_hourly, |t| {
            (t.year(), t.ordinal(), t.hour(), 0)
        }),
        ("daily", rules.keep_daily, |t| (t.year(), t.ordinal(), 0, 0)),
        ("weekly", rules.keep_weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }),
        ("monthly", rules.keep_monthly, |t| {
            (t.year(), t.month(), 0, 0)
        }),
        ("yearly", rules.keep_yearly, |t| (t.year(), 0, 0, 0)),
    ];
    for (name, count, bucket) in buckets {
        let mut seen = BTreeSet::new();
        for s in &sorted {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(bucket(&s.time)) {
                reasons.entry(s.id).or_default().push(name);
            }
        }
    }
    if let Some(within) = rules.keep_within {
        // Checked: a window reaching before the earliest time chrono can hold
        // keeps every snapshot rather than overflowing (validation caps
        // durations, but the planner must not panic whatever it is given).
        let since = chrono::Duration::from_std(within)
            .ok()
            .and_then(|w| now.checked_sub_signed(w))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        for s in sorted.iter().filter(|s| s.time >= since) {
            reasons.entry(s.id).or_default().push("within");
        }
    }
    sorted
        .iter()
        .map(|s| {
            let r = reasons.remove(&s.id).unwrap_or_default();
            Decision {
                snapshot: s.id,
                time: s.time,
                keep: !r.is_empty(),
                reasons: r,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub decisions: Vec<Decision>,
    pub kept: usize,
    pub removed: usize,
    /// Readers still reading at the end of the wait: the snapshots are
    /// forgotten (hidden from every listing) but their manifests stay until
    /// the next forget or prune.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<Deferred>,
    pub dry_run: bool,
}

/// What a forget would do: the retention decision for every snapshot.
/// `--dry-run` prints its [`ForgetPlan::preview`] report, [`execute`]
/// carries it out.
#[derive(Debug, Clone)]
pub struct ForgetPlan {
    decisions: Vec<Decision>,
    /// The snapshots the rules do not keep.
    remove: Vec<SnapshotId>,
}

impl ForgetPlan {
    fn report(self, deferred: Option<Deferred>, preview: bool) -> ForgetReport {
        ForgetReport {
            removed: self.remove.len(),
            kept: self.decisions.len() - self.remove.len(),
            decisions: self.decisions,
            deferred,
            dry_run: preview,
        }
    }

    /// The report of a dry run: what a forget would remove now.
    pub fn preview(self) -> ForgetReport {
        self.report(None, true)
    }
}

/// Applies `rules` to the tenant's snapshots now. Deletes nothing.
pub async fn plan(repo: &Repo, rules: &KeepRules) -> Result<ForgetPlan> {
    if rules.keeps_nothing() {
        return Err(Error::InvalidArgument(
            "the retention rules keep nothing; give at least one --keep-* rule (or set [retention] in the policy)".into(),
        ));
    }
    let (snapshots, _faults) = repo.list_snapshots().await?;
    let decisions = apply(rules, &snapshots, Utc::now());
    let remove = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.snapshot)
        .collect();
    Ok(ForgetPlan { decisions, remove })
}

/// Forgets what `rules` do not keep: [`plan`], then [`execute`].
pub async fn run(repo: &Repo, lease: &LeaseGuard, rules: &KeepRules) -> Result<ForgetReport> {
    let plan = plan(repo, rules).await?;
    execute(repo, lease, plan).await
}

/// Deletes the snapshots a plan removes, then finishes what interrupted
/// forgets left (unless readers deferred this one).
async fn execute(repo: &Repo, lease: &LeaseGuard, plan: ForgetPlan) -> Result<ForgetReport> {
    let mut deferred = None;
    if !plan.remove.is_empty() {
        lease.ensure_held()?;
        // Two phases: recorded as being forgotten, deleted, then recorded as
        // forgotten. One left by an interrupted run is excluded and finished by
        // the next run; one that comes back after the second phase is a replay.
        repo.context()
            .state
            .update_tenant_memory(repo.tenant(), |m| {
                m.forgetting_snapshots.extend(plan.remove.iter().copied())
            })?;
        deferred = delete_snapshots(repo, lease, &plan.remove).await?;
    }
    if deferred.is_none() {
        finish_interrupted(repo, lease).await?;
    }
    Ok(plan.report(deferred, false))
}

/// Deletes snapshot manifests once no reader that may read them is left
/// (see `jobs::deletion`); returns the deferral if readers still read.
async fn delete_snapshots(
    repo: &Repo,
    lease: &LeaseGuard,
    ids: &[SnapshotId],
) -> Result<Option<Deferred>> {
    let mut plan = DeletionPlan::new(&repo.context().holder, "forget");
    plan.snapshots = ids.to_vec();
    let announced = deletion::announce(repo, lease, plan).await?;
    if let Some(d) = announced.deferred() {
        return Ok(Some(d));
    }
    for id in ids {
        lease.ensure_held()?;
        repo.store().delete(&ObjectName::Snapshot(*id)).await?;
    }
    deletion::finish(repo, announced).await?;
    Ok(None)
}

/// Deletes snapshots recorded as forgotten (or being forgotten) that are
/// still in the store (an interrupted or deferred forget), then records every
/// snapshot being forgotten as forgotten. Returns how many were deleted
/// (none if readers are still reading: the next run tries again). Callers
/// hold the tenant lease (forget, prune).
pub async fn finish_interrupted(repo: &Repo, lease: &LeaseGuard) -> Result<usize> {
    let memory = repo.context().state.tenant_memory(repo.tenant())?;
    let mut left = Vec::new();
    for l in repo
        .store()
        .list(crate::store::layout::Dir::Snapshots)
        .await?
    {
        if let Some(ObjectName::Snapshot(id)) = l.name
            && (memory.forgotten_snapshots.contains(&id)
                || memory.forgetting_snapshots.contains(&id))
        {
            left.push(id);
        }
    }
    if !left.is_empty() && delete_snapshots(repo, lease, &left).await?.is_some() {
        return Ok(0);
    }
    if !memory.forgetting_snapshots.is_empty() {
        repo.context()
            .state
            .update_tenant_memory(repo.tenant(), |m| {
                let done = std::mem::take(&mut m.forgetting_snapshots);
                m.forgotten_snapshots.extend(done);
            })?;
    }
    Ok(left.len())
}

impl crate::report::JobOutput for ForgetReport {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::snapshot::{ChunkerParams, SNAPSHOT_FORMAT, Summary};

    fn snap(t: &str) -> Snapshot {
        snap_at(t.parse().unwrap())
    }

    fn snap_at(time: DateTime<Utc>) -> Snapshot {
        Snapshot {
            format: SNAPSHOT_FORMAT,
            id: SnapshotId::random(),
            tenant: crate::TenantId::new("a").unwrap(),
            epoch: 1,
            time,
            hostname: "h".into(),
            parent: None,
            tags: vec![],
            sources: vec![],
            tree: vec![],
            summary: Summary::default(),
            chunker: ChunkerParams {
                min: 1,
                avg: 2,
                max: 3,
            },
            custos_version: "t".into(),
        }
    }

    #[test]
    fn daily_and_last_rules() {
        let snaps = vec![
            snap("2026-11-20T01:00:00Z"),
            snap("2026-11-20T13:00:00Z"),
            snap("2026-11-21T02:00:00Z"),
            snap("2026-11-22T02:00:00Z"),
            snap("2026-11-22T03:00:00Z"),
        ];
        let rules = KeepRules {
            keep_last: 1,
            keep_daily: 2,
            ..KeepRules::default()
        };
        let d = apply(&rules, &snaps, "2026-11-23T00:00:00Z".parse().unwrap());
        let kept: Vec<_> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.time.to_rfc3339())
            .collect();
        assert_eq!(
            kept,
            ["2026-11-22T03:00:00+00:00", "2026-11-21T02:00:00+00:00"]
        );
        assert_eq!(d[0].reasons, ["last", "daily"]);
    }

    #[test]
    fn within_is_measured_from_now_not_from_forged_future_snapshots() {
        let mut snaps = vec![snap("2026-11-22T00:00:00Z")];
        snaps.push(snap("2030-01-01T00:00:00Z")); // forged far in the future
        let rules = KeepRules {
            keep_within: Some(std::time::Duration::from_secs(3 * 86400)),
            ..KeepRules::default()
        };
        let d = apply(&rules, &snaps, "2026-11-23T00:00:00Z".parse().unwrap());
        assert!(d.iter().all(|d| d.keep), "{d:?}");
    }

    #[test]
    fn weekly_monthly_yearly() {
        let snaps: Vec<Snapshot> = (0..400)
            .map(|i| {
                let t = DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc)
                    + chrono::Duration::days(i);
                snap(&t.to_rfc3339())
            })
            .collect();
        let rules = KeepRules {
            keep_weekly: 4,
            keep_monthly: 3,
            keep_yearly: 2,
            ..KeepRules::default()
        };
        let d = apply(&rules, &snaps, Utc::now());
        assert_eq!(
            d.iter().filter(|d| d.reasons.contains(&"weekly")).count(),
            4
        );
        assert_eq!(
            d.iter().filter(|d| d.reasons.contains(&"monthly")).count(),
            3
        );
        assert_eq!(
            d.iter().filter(|d| d.reasons.contains(&"yearly")).count(),
            2
        );
    }

    #[test]
    fn keep_within_beyond_the_start_of_time_keeps_everything() {
        let snaps = vec![
            snap_at(DateTime::<Utc>::MIN_UTC),
            snap("2026-11-22T00:00:00Z"),
            snap_at(DateTime::<Utc>::MAX_UTC),
        ];
        // 300000 years: from_std succeeds, the subtraction would overflow.
        let rules = KeepRules {
            keep_within: Some(std::time::Duration::from_secs(300_000 * 31_557_600)),
            ..KeepRules::default()
        };
        let d = apply(&rules, &snaps, "2026-11-23T00:00:00Z".parse().unwrap());
        assert!(d.iter().all(|d| d.keep && d.reasons == ["within"]), "{d:?}");
        // And past what a TimeDelta holds at all.
        let rules = KeepRules {
            keep_within: Some(std::time::Duration::MAX),
            ..KeepRules::default()
        };
        assert!(apply(&rules, &snaps, Utc::now()).iter().all(|d| d.keep));
    }

    mod extreme {
        use proptest::prelude::*;

        use super::*;
        use crate::config::units::{MAX_DURATION, parse_duration};

        /// Duration text as an operator (or an attacker) might write it: one
        /// to three parts, numbers from small to far past u64, every unit
        /// humantime knows.
        fn duration_text() -> impl Strategy<Value = String> {
            let unit = prop::sample::select(vec![
                "ns", "us", "ms", "s", "sec", "m", "min", "h", "hr", "d", "days", "w", "weeks",
                "M", "months", "y", "years",
            ]);
            let number = prop_oneof![
                (0u64..2_000).prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                "[1-9][0-9]{15,30}",
            ];
            prop::collection::vec((number, unit), 1..4).prop_map(|parts| {
                parts
                    .iter()
                    .map(|(n, u)| format!("{n}{u}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        }

        /// Any instant chrono can hold (snapshot times come from the store).
        fn instant() -> impl Strategy<Value = DateTime<Utc>> {
            let (min, max) = (
                DateTime::<Utc>::MIN_UTC.timestamp(),
                DateTime::<Utc>::MAX_UTC.timestamp(),
            );
            prop_oneof![
                Just(DateTime::<Utc>::MIN_UTC),
                Just(DateTime::<Utc>::MAX_UTC),
                (min..=max).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
            ]
        }

        /// What the clock may say: years 1970 to 9999.
        fn clock() -> impl Strategy<Value = DateTime<Utc>> {
            (0i64..253_402_300_799).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Validation caps every duration, a policy that validates goes
            /// through every time computation of the jobs and the daemon
            /// without a panic, and the planner survives any duration at all.
            #[test]
            fn extreme_durations_never_panic(
                text in duration_text(),
                raw_secs in any::<u64>(),
                raw_nanos in 0u32..1_000_000_000,
                year in 0u32..=9999,
                now in clock(),
                times in prop::collection::vec(instant(), 0..6),
            ) {
                let parsed = parse_duration(&text);
                if let Ok(d) = parsed {
                    prop_assert!(d <= MAX_DURATION, "{text} parsed as {d:?}");
                }
                let snaps: Vec<Snapshot> = times.iter().map(|t| snap_at(*t)).collect();

                let dir = tempfile::tempdir().unwrap();
                let policy = format!(
                    "tenant = \"acme\"\nkey = \"local:acme\"\n\
                     [[sources]]\ntype = \"path\"\npath = \"/srv/acme\"\n\
                     [retention]\nkeep_within = \"{text}\"\n\
                     [drill]\npick = \"random\"\nwithin = \"{text}\"\nrto = \"{text}\"\n\
                     verify_timeout = \"{text}\"\n\
                     [rotation]\ncmk_every = \"{text}\"\nepoch_every = \"{text}\"\n\
                     [deletion]\nstate = \"offboarding\"\n\
                     requested_at = \"{year:04}-01-01T00:00:00Z\"\ngrace = \"{text}\"\n"
                );
                std::fs::write(dir.path().join("acme.toml"), policy).unwrap();
                let loaded = crate::config::load_policy_file(
                    dir.path(),
                    std::path::Path::new("acme.toml"),
                );
                match (&parsed, loaded) {
                    (Ok(_), Ok(p)) => crate::fuzzing::policy_times(&p, now, &snaps),
                    (Ok(_), Err(_)) => {} // zero or below a minimum: refused, fine
                    (Err(_), Ok(p)) => prop_assert!(false, "{text} refused alone but accepted in {p:?}"),
                    (Err(_), Err(e)) => {
                        let shown = e.to_string();
                        prop_assert!(shown.contains("retention.keep_within"), "{shown}");
                    }
                }

                // The planner alone, with any duration whatever.
                let rules = KeepRules {
                    keep_within: Some(std::time::Duration::new(raw_secs, raw_nanos)),
                    ..KeepRules::default()
                };
                let decisions = apply(&rules, &snaps, now);
                prop_assert_eq!(decisions.len(), snaps.len());
                // Keep-within never forgets a snapshot at or after `now`.
                for d in &decisions {
                    prop_assert!(d.keep || d.time < now);
                }
            }
        }
    }
}
