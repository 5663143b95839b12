//! The controls: each tenant's history (from the audit log) held to the
//! thresholds of `[controls]`, as a verdict, a one-sentence finding and the
//! records it rests on. Pure, like [`super::history`]: the live facts (key
//! states, stored certificates) are looked up before and passed in.
//!
//! | id | passes when |
//! | --- | --- |
//! | `backup.rpo` | no time without a successful backup longer than `backup_max_gap` overlaps the period (up to now) |
//! | `backup.success_rate` | at least `backup_min_success_rate` of the period's backup runs succeeded |
//! | `drill.frequency` | no time without a passed drill longer than `drill_max_interval` overlaps the period |
//! | `drill.passed` | every drill of the period passed, or failed only on its RTO (that is `drill.rto`) |
//! | `drill.rto` | every drill of the period that restored had an RTO and met it (`drill_rto_met`) |
//! | `keys.cmk_age` | the CMK was created, given new material or replaced within `cmk_max_age` |
//! | `keys.epoch_age` | the current key epoch was started within `epoch_max_age` |
//! | `deletion.certified` | every shred of the period was verified, and its stored certificate verifies |
//! | `integrity.read_data` | every pack was read and verified within `read_data_max_age`, and no check found faults since |

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::history::{History, Run, Shred, f64_of, str_of};
use super::model::*;
use super::span;
use crate::config::Controls;

/// What the report checked outside the audit log for one tenant.
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Custody and state of each key, by reference.
    pub keys: BTreeMap<String, KeyCustody>,
    /// Each stored certificate's status and message, by certificate id.
    pub certificates: BTreeMap<String, (&'static str, Option<String>)>,
}

/// The period and the thresholds a tenant is held to.
#[derive(Debug, Clone)]
pub struct Frame<'a> {
    pub controls: &'a Controls,
    pub since: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

impl Frame<'_> {
    fn in_period(&self, t: DateTime<Utc>) -> bool {
        t >= self.since && t <= self.now
    }
}

pub fn evaluate(h: &History, live: &Live, f: &Frame<'_>) -> Assessment {
    // A shredded tenant is held to nothing after its shred.
    let end = h.shredded().map(|(t, _)| t.min(f.now)).unwrap_or(f.now);
    let (backups, mut controls) = backups(h, f, end);
    let (drills, c) = drills(h, f, end);
    controls.extend(c);
    let (keys, c) = keys(h, live, f);
    controls.extend(c);
    let (deletions, c) = deletions(h, live, f);
    controls.extend(c);
    let (integrity, c) = integrity(h, f);
    controls.extend(c);
    Assessment {
        controls,
        backups,
        drills,
        keys,
        deletions,
        integrity,
    }
}

fn control(
    id: &'static str,
    title: String,
    verdict: Verdict,
    finding: String,
    evidence: Vec<u64>,
) -> Control {
    let mut evidence = evidence;
    evidence.sort_unstable();
    evidence.dedup();
    Control {
        id,
        title,
        verdict,
        finding,
        evidence,
    }
}

fn days(d: std::time::Duration) -> String {
    super::limit(d)
}

fn date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// The times between a start, successive events and an end that reach into
/// the period: the start is the tenant's creation (or its first event), the
/// end now (or its shred).
fn intervals(
    start: Option<(DateTime<Utc>, u64)>,
    events: &[(DateTime<Utc>, u64)],
    end: DateTime<Utc>,
    since: DateTime<Utc>,
) -> Vec<Gap> {
    let mut points: Vec<(DateTime<Utc>, Option<u64>)> = Vec::new();
    let mut events: Vec<_> = events.iter().filter(|(t, _)| *t <= end).collect();
    events.sort();
    match start {
        Some((t, seq)) => points.push((t, Some(seq))),
        None if events.is_empty() => return Vec::new(),
        None => {}
    }
    points.extend(events.iter().map(|(t, seq)| (*t, Some(*seq))));
    points.push((end, None));
    points
        .windows(2)
        .filter(|w| w[1].0 > since && w[1].0 >= w[0].0)
        .map(|w| Gap {
            from: w[0].0,
            from_seq: w[0].1,
            until: w[1].0,
            until_seq: w[1].1,
            seconds: (w[1].0 - w[0].0).num_milliseconds() as f64 / 1000.0,
        })
        // A run recorded with its start (the first backup is the tenant's creation).
        .filter(|g| g.seconds > 0.0 || g.until_seq.is_none())
        .collect()
}

fn gap_seqs(gaps: &[&Gap]) -> Vec<u64> {
    gaps.iter()
        .flat_map(|g| [g.from_seq, g.until_seq])
        .flatten()
        .collect()
}

fn describe_gap(g: &Gap) -> String {
    let until = match g.until_seq {
        Some(s) => format!("record {s}"),
        None => "now".into(),
    };
    let from = match g.from_seq {
        Some(s) => format!("record {s}"),
        None => "the start".into(),
    };
    format!("{} ({from} to {until})", span(g.seconds))
}

fn backups(h: &History, f: &Frame<'_>, end: DateTime<Utc>) -> (Backups, Vec<Control>) {
    let c = f.controls;
    let period: Vec<&Run> = h.backups.iter().filter(|r| f.in_period(r.time)).collect();
    let succeeded = period.iter().filter(|r| r.success).count();
    let successes: Vec<(DateTime<Utc>, u64)> = h
        .backups
        .iter()
        .filter(|r| r.success)
        .map(|r| (r.time, r.seq))
        .collect();
    let start = h.init.as_ref().map(|i| (i.time, i.seq));
    let all = intervals(start, &successes, end, f.since);
    // Without a single success there is no recovery point at all.
    let achieved =
        (!successes.is_empty()).then(|| all.iter().map(|g| g.seconds).fold(0.0, f64::max));
    let max = c.backup_max_gap.as_secs_f64();
    let gaps: Vec<&Gap> = all.iter().filter(|g| g.seconds > max).collect();
    let last = h.backups.iter().rev().find(|r| r.success);
    let section = Backups {
        runs: period.len(),
        succeeded,
        failed: period.len() - succeeded,
        success_rate: (!period.is_empty()).then(|| succeeded as f64 / period.len() as f64),
        last_success: last.map(|r| LastBackup {
            time: r.time,
            seq: r.seq,
            snapshot: r.snapshot.clone(),
        }),
        achieved_rpo_seconds: achieved,
        gaps: gaps.iter().map(|g| (*g).clone()).collect(),
        failures: period
            .iter()
            .filter(|r| !r.success)
            .map(|r| Failure {
                time: r.time,
                seq: r.seq,
                error_kind: r.error_kind.clone(),
                error: r.error.clone(),
            })
            .collect(),
        evidence: period.iter().map(|r| r.seq).collect(),
    };

    let title = format!(
        "A successful backup at least every {}",
        days(c.backup_max_gap)
    );
    let rpo = match (last, gaps.as_slice()) {
        (None, _) => control(
            "backup.rpo",
            title,
            Verdict::Fail,
            "no successful backup is recorded".into(),
            section.evidence.clone(),
        ),
        (Some(_), []) => {
            let last = last.expect("matched");
            let mut evidence: Vec<u64> = all
                .iter()
                .flat_map(|g| [g.from_seq, g.until_seq])
                .flatten()
                .collect();
            evidence.push(last.seq);
            control(
                "backup.rpo",
                title,
                Verdict::Pass,
                format!(
                    "longest time without a successful backup: {}; last success {} (record {})",
                    span(achieved.unwrap_or_default()),
                    date(last.time),
                    last.seq
                ),
                evidence,
            )
        }
        (Some(_), gaps) => {
            let longest = gaps
                .iter()
                .max_by(|a, b| a.seconds.total_cmp(&b.seconds))
                .expect("not empty");
            control(
                "backup.rpo",
                title,
                Verdict::Fail,
                format!(
                    "{} time(s) without a successful backup longer than {}; the longest {}",
                    gaps.len(),
                    days(c.backup_max_gap),
                    describe_gap(longest)
                ),
                gap_seqs(gaps),
            )
        }
    };
    let title = format!(
        "At least {:.0}% of backup runs succeed",
        c.backup_min_success_rate * 100.0
    );
    let rate = match section.success_rate {
        None => control(
            "backup.success_rate",
            title,
            Verdict::NotApplicable,
            "no backup ran in the period".into(),
            Vec::new(),
        ),
        Some(rate) => control(
            "backup.success_rate",
            title,
            if rate + 1e-9 >= c.backup_min_success_rate {
                Verdict::Pass
            } else {
                Verdict::Fail
            },
            format!(
                "{} of {} backup runs succeeded ({:.1}%)",
                section.succeeded,
                section.runs,
                rate * 100.0
            ),
            section.evidence.clone(),
        ),
    };
    (section, vec![rpo, rate])
}

fn drill_row(r: &Run) -> Drill {
    let res = r.result.as_ref();
    let verify = res
        .and_then(|v| v.get("verify_command"))
        .filter(|v| v.is_object());
    Drill {
        time: r.time,
        seq: r.seq,
        begin_seq: r.begin_seq,
        outcome: if r.success { "passed" } else { "failed" }.into(),
        // A drill's end record names its reason as its error kind.
        reason: res
            .and_then(|v| str_of(v, "reason"))
            .or_else(|| (!r.success).then(|| r.error_kind.clone()).flatten()),
        snapshot: r.snapshot.clone(),
        mode: res.and_then(|v| str_of(v, "mode")),
        restore_seconds: res.and_then(|v| f64_of(v, "restore_seconds")),
        rto_seconds: res.and_then(|v| f64_of(v, "rto_seconds")),
        rto_met: res.and_then(|v| v.get("rto_met")).and_then(|v| v.as_bool()),
        verify_command: verify.map(|v| VerifyCommand {
            program: str_of(v, "program"),
            passed: v.get("passed").and_then(|p| p.as_bool()).unwrap_or(false),
            exit_code: v.get("exit_code").and_then(|c| c.as_i64()),
            timed_out: v
                .get("timed_out")
                .and_then(|t| t.as_bool())
                .unwrap_or(false),
            not_run: v.get("not_run").and_then(|t| t.as_bool()).unwrap_or(false),
        }),
        figures_recorded: res.is_some(),
    }
}

fn drills(h: &History, f: &Frame<'_>, end: DateTime<Utc>) -> (Drills, Vec<Control>) {
    let c = f.controls;
    let rows: Vec<Drill> = h
        .drills
        .iter()
        .filter(|r| f.in_period(r.time))
        .map(drill_row)
        .collect();
    let passed: Vec<(DateTime<Utc>, u64)> = h
        .drills
        .iter()
        .filter(|r| r.success)
        .map(|r| (r.time, r.seq))
        .collect();
    let start = h.init.as_ref().map(|i| (i.time, i.seq));
    let all = intervals(start, &passed, end, f.since);
    let max = c.drill_max_interval.as_secs_f64();
    let gaps: Vec<&Gap> = all.iter().filter(|g| g.seconds > max).collect();
    let last_passed = passed.last().map(|&(time, seq)| Cited { time, seq });
    let section = Drills {
        passed: rows.iter().filter(|d| d.outcome == "passed").count(),
        failed: rows.iter().filter(|d| d.outcome != "passed").count(),
        drills: rows,
        last_passed: last_passed.clone(),
        gaps: gaps.iter().map(|g| (*g).clone()).collect(),
    };
    let seqs = |d: &[&Drill]| d.iter().map(|d| d.seq).collect::<Vec<_>>();

    let title = format!(
        "A passed restore drill at least every {}",
        days(c.drill_max_interval)
    );
    let frequency = if start.is_none() && passed.is_empty() {
        control(
            "drill.frequency",
            title,
            Verdict::Fail,
            "no passed drill is recorded".into(),
            section.drills.iter().map(|d| d.seq).collect(),
        )
    } else if !gaps.is_empty() {
        let longest = gaps
            .iter()
            .max_by(|a, b| a.seconds.total_cmp(&b.seconds))
            .expect("not empty");
        control(
            "drill.frequency",
            title,
            Verdict::Fail,
            format!(
                "{} time(s) without a passed drill longer than {}; the longest {}",
                gaps.len(),
                days(c.drill_max_interval),
                describe_gap(longest)
            ),
            gap_seqs(&gaps),
        )
    } else {
        let finding = match &last_passed {
            Some(l) => format!("last passed drill {} (record {})", date(l.time), l.seq),
            None => format!(
                "no drill yet; the tenant is younger than {}",
                days(c.drill_max_interval)
            ),
        };
        let mut evidence = gap_seqs(&all.iter().collect::<Vec<_>>());
        evidence.extend(last_passed.as_ref().map(|l| l.seq));
        control("drill.frequency", title, Verdict::Pass, finding, evidence)
    };

    let failed: Vec<&Drill> = section
        .drills
        .iter()
        .filter(|d| d.outcome != "passed" && d.reason.as_deref() != Some("rto_exceeded"))
        .collect();
    let title = "Every restore drill verifies (restore, hashes, verify command)".to_owned();
    let passed_control = if section.drills.is_empty() {
        control(
            "drill.passed",
            title,
            Verdict::NotApplicable,
            "no drill ran in the period".into(),
            Vec::new(),
        )
    } else if failed.is_empty() {
        control(
            "drill.passed",
            title,
            Verdict::Pass,
            format!("all {} drill(s) verified", section.drills.len()),
            section.drills.iter().map(|d| d.seq).collect(),
        )
    } else {
        let reasons: Vec<String> = failed
            .iter()
            .map(|d| {
                format!(
                    "{} (record {})",
                    d.reason.as_deref().unwrap_or("unknown reason"),
                    d.seq
                )
            })
            .collect();
        control(
            "drill.passed",
            title,
            Verdict::Fail,
            format!(
                "{} of {} drill(s) failed: {}",
                failed.len(),
                section.drills.len(),
                reasons.join(", ")
            ),
            seqs(&failed),
        )
    };

    let title = "Every restore drill restores within its RTO".to_owned();
    // Drills that got as far as restoring (or say they exceeded the RTO).
    let restored: Vec<&Drill> = section
        .drills
        .iter()
        .filter(|d| {
            d.restore_seconds.is_some()
                || d.reason.as_deref() == Some("rto_exceeded")
                || (d.outcome == "passed" && !d.figures_recorded)
        })
        .collect();
    let rto = if !c.drill_rto_met {
        control(
            "drill.rto",
            title,
            Verdict::NotApplicable,
            "not required ([controls] drill_rto_met = false)".into(),
            Vec::new(),
        )
    } else if restored.is_empty() {
        control(
            "drill.rto",
            title,
            Verdict::NotApplicable,
            "no drill restored in the period".into(),
            Vec::new(),
        )
    } else {
        let mut problems = Vec::new();
        for d in &restored {
            match (d.restore_seconds, d.rto_seconds, d.rto_met) {
                (Some(r), Some(rto), Some(false)) => problems.push(format!(
                    "restore took {} against an RTO of {} (record {})",
                    span(r),
                    span(rto),
                    d.seq
                )),
                (_, None, _) if d.figures_recorded => {
                    problems.push(format!("no RTO set (record {})", d.seq))
                }
                (_, _, Some(true)) => {}
                _ if d.reason.as_deref() == Some("rto_exceeded") => {
                    problems.push(format!("RTO exceeded (record {})", d.seq))
                }
                _ => problems.push(format!("restore time not recorded (record {})", d.seq)),
            }
        }
        let evidence = seqs(&restored);
        if problems.is_empty() {
            let slowest = restored
                .iter()
                .filter_map(|d| d.restore_seconds)
                .fold(0.0, f64::max);
            control(
                "drill.rto",
                title,
                Verdict::Pass,
                format!(
                    "{} drill(s) restored within their RTO; the slowest in {}",
                    restored.len(),
                    span(slowest)
                ),
                evidence,
            )
        } else {
            control(
                "drill.rto",
                title,
                Verdict::Fail,
                format!(
                    "{} of {} drill(s) missed: {}",
                    problems.len(),
                    restored.len(),
                    problems.join("; ")
                ),
                evidence,
            )
        }
    };
    (section, vec![frequency, passed_control, rto])
}

fn age_days(since: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - since).num_seconds().max(0) as f64 / 86_400.0
}

fn keys(h: &History, live: &Live, f: &Frame<'_>) -> (Keys, Vec<Control>) {
    let c = f.controls;
    let shredded = h.shredded();
    let mut cmk: Option<Cmk> = None;
    let mut previous: Vec<(String, Option<u64>)> = Vec::new();
    let mut current_seq = None;
    let mut epochs: Vec<Epoch> = Vec::new();
    let mut unrecorded = Vec::new();
    if let Some(init) = &h.init {
        cmk = init.key.clone().map(|key| Cmk {
            key,
            since: init.time,
            since_seq: init.seq,
            by: "created",
            age_days: 0.0,
        });
        current_seq = Some(init.seq);
        epochs.push(Epoch {
            epoch: init.epoch,
            created_at: init.time,
            created_seq: init.seq,
            age_days: 0.0,
            state: "current",
            shredded_seq: None,
        });
    }
    for r in &h.rotations {
        match r.action.as_deref() {
            Some("cmk") => {
                if let Some(k) = &mut cmk {
                    (k.since, k.since_seq, k.by) = (r.time, r.seq, "rotated");
                }
            }
            Some("replace_cmk") => {
                if let Some(new) = &r.key_after {
                    if let Some(old) = cmk.take() {
                        previous.push((old.key, current_seq));
                    }
                    cmk = Some(Cmk {
                        key: new.clone(),
                        since: r.time,
                        since_seq: r.seq,
                        by: "replaced",
                        age_days: 0.0,
                    });
                    current_seq = Some(r.seq);
                }
            }
            Some("new_epoch") => {
                if let Some(e) = r.epoch_after {
                    for old in epochs.iter_mut().filter(|x| x.state == "current") {
                        old.state = "retired";
                    }
                    epochs.push(Epoch {
                        epoch: e,
                        created_at: r.time,
                        created_seq: r.seq,
                        age_days: 0.0,
                        state: "current",
                        shredded_seq: None,
                    });
                }
            }
            _ => unrecorded.push(r.seq),
        }
    }
    for s in h.shreds.iter().filter(|s| s.certified_at.is_some()) {
        let seq = s.seqs.last().copied();
        for e in epochs
            .iter_mut()
            .filter(|e| s.epoch.is_none_or(|x| x == e.epoch))
        {
            // Only shreds after the epoch began (a reused id's old lineage is not this one).
            if seq.is_some_and(|q| q > e.created_seq) {
                e.state = "shredded";
                e.shredded_seq = seq;
            }
        }
    }
    for e in &mut epochs {
        e.age_days = age_days(e.created_at, f.now);
    }
    if let Some(k) = &mut cmk {
        k.age_days = age_days(k.since, f.now);
    }
    let lookup = |key: &str, role: &'static str, seq: Option<u64>| {
        let mut k = live.keys.get(key).cloned().unwrap_or(KeyCustody {
            key: key.to_owned(),
            role,
            provider: None,
            holder: None,
            network: None,
            state: None,
            error: Some("not looked up".into()),
            residency: "unknown".into(),
            seq,
        });
        k.role = role;
        k.seq = seq;
        k
    };
    let mut custody: Vec<KeyCustody> = cmk
        .iter()
        .map(|k| lookup(&k.key, "current", current_seq))
        .collect();
    custody.extend(
        previous
            .iter()
            .rev()
            .map(|(k, seq)| lookup(k, "previous", *seq)),
    );
    let rotations: Vec<Rotation> = h
        .rotations
        .iter()
        .filter(|r| f.in_period(r.time))
        .map(|r| Rotation {
            time: r.time,
            seq: r.seq,
            action: r.action.clone().unwrap_or_else(|| "unrecorded".into()),
            key_before: r.key_before.clone(),
            key_after: r.key_after.clone(),
            epoch_before: r.epoch_before,
            epoch_after: r.epoch_after,
            envelopes_rewrapped: r.envelopes_rewrapped,
        })
        .collect();

    let unrecorded_note = if unrecorded.is_empty() {
        String::new()
    } else {
        format!(
            " ({} rotation(s) whose action is not recorded, {}, are not counted)",
            unrecorded.len(),
            super::cite(&unrecorded)
        )
    };
    let title = format!("CMK no older than {}", days(c.cmk_max_age));
    let cmk_control = match (&shredded, &cmk) {
        (Some((_, seq)), _) => control(
            "keys.cmk_age",
            title,
            Verdict::NotApplicable,
            format!("the tenant was shredded (record {seq})"),
            vec![*seq],
        ),
        (None, None) => control(
            "keys.cmk_age",
            title,
            Verdict::Fail,
            "no record names the tenant's CMK".into(),
            Vec::new(),
        ),
        (None, Some(k)) => {
            let over = (f.now - k.since).to_std().unwrap_or_default() > c.cmk_max_age;
            control(
                "keys.cmk_age",
                title,
                if over { Verdict::Fail } else { Verdict::Pass },
                format!(
                    "{} is {:.0} days old ({} {}, record {}){}{unrecorded_note}",
                    k.key,
                    k.age_days.floor(),
                    k.by,
                    date(k.since),
                    k.since_seq,
                    if over { ": rotation overdue" } else { "" }
                ),
                std::iter::once(k.since_seq)
                    .chain(unrecorded.clone())
                    .collect(),
            )
        }
    };
    let current = epochs.iter().rev().find(|e| e.state == "current");
    let title = format!("Key epoch no older than {}", days(c.epoch_max_age));
    let epoch_control = match (&shredded, current) {
        (Some((_, seq)), _) => control(
            "keys.epoch_age",
            title,
            Verdict::NotApplicable,
            format!("the tenant was shredded (record {seq})"),
            vec![*seq],
        ),
        (None, None) => control(
            "keys.epoch_age",
            title,
            Verdict::Fail,
            "no record names the tenant's current key epoch".into(),
            Vec::new(),
        ),
        (None, Some(e)) => {
            let over = (f.now - e.created_at).to_std().unwrap_or_default() > c.epoch_max_age;
            control(
                "keys.epoch_age",
                title,
                if over { Verdict::Fail } else { Verdict::Pass },
                format!(
                    "epoch {} is {:.0} days old (started {}, record {}){}{unrecorded_note}",
                    e.epoch,
                    e.age_days.floor(),
                    date(e.created_at),
                    e.created_seq,
                    if over { ": new epoch overdue" } else { "" }
                ),
                std::iter::once(e.created_seq)
                    .chain(unrecorded.clone())
                    .collect(),
            )
        }
    };
    (
        Keys {
            cmk,
            keys: custody,
            epochs,
            rotations,
        },
        vec![cmk_control, epoch_control],
    )
}

fn deletion_row(s: &Shred, live: &Live) -> Deletion {
    let (status, message) = match live.certificates.get(&s.certificate_id) {
        Some((status, message)) => (*status, message.clone()),
        None if s.certified_at.is_none() => ("not_issued", None),
        None => ("unavailable", Some("not checked".into())),
    };
    Deletion {
        certificate_id: s.certificate_id.clone(),
        subject: s.subject(),
        epoch: s.epoch,
        requested_at: s
            .requested_at
            .unwrap_or_else(|| s.certified_at.unwrap_or_default()),
        requested_by: s.requested_by.clone(),
        reason: s.reason.clone(),
        guarantee: s.guarantee.clone(),
        verified: s.verified,
        certified: s.certified_at.is_some(),
        certificate_status: status,
        certificate_message: message,
        evidence: s.seqs.clone(),
    }
}

fn deletions(h: &History, live: &Live, f: &Frame<'_>) -> (Vec<Deletion>, Vec<Control>) {
    let rows: Vec<Deletion> = h
        .shreds
        .iter()
        .map(|s| deletion_row(s, live))
        .filter(|d| f.in_period(d.requested_at))
        .collect();
    let title = "Every shred verified, with a valid signed certificate".to_owned();
    let evidence: Vec<u64> = rows.iter().flat_map(|d| d.evidence.clone()).collect();
    let problems: Vec<String> = rows
        .iter()
        .filter_map(|d| {
            let what = match d.epoch {
                Some(e) => format!("shred of epoch {e} ({})", d.certificate_id),
                None => format!("tenant shred ({})", d.certificate_id),
            };
            if d.verified != Some(true) {
                Some(format!("{what}: not verified"))
            } else if !d.certified {
                Some(format!("{what}: no certificate issued"))
            } else if d.certificate_status != "valid" {
                Some(format!(
                    "{what}: certificate {}{}",
                    d.certificate_status,
                    d.certificate_message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ))
            } else {
                None
            }
        })
        .collect();
    let c = if rows.is_empty() {
        control(
            "deletion.certified",
            title,
            Verdict::NotApplicable,
            "no shred in the period".into(),
            Vec::new(),
        )
    } else if problems.is_empty() {
        control(
            "deletion.certified",
            title,
            Verdict::Pass,
            format!(
                "{} shred(s), each verified; every certificate verifies offline",
                rows.len()
            ),
            evidence,
        )
    } else {
        control(
            "deletion.certified",
            title,
            Verdict::Fail,
            problems.join("; "),
            evidence,
        )
    };
    (rows, vec![c])
}

/// Kinds a check reports for damaged or missing data (not for a busy lease
/// or an unreachable store).
const FAULT_KINDS: &[&str] = &[
    "corrupt_object",
    "missing_object",
    "foreign_object",
    "rollback_detected",
];

fn check_row(r: &Run) -> Check {
    let res = r.result.as_ref();
    let n = |k: &str| res.and_then(|v| v.get(k)).and_then(|v| v.as_u64());
    Check {
        time: r.time,
        seq: r.seq,
        outcome: if r.success { "success" } else { "failure" }.into(),
        read_data: res.and_then(|v| str_of(v, "read_data")),
        packs: n("packs"),
        packs_read: n("packs_read"),
        faults: n("faults"),
        error_kind: r.error_kind.clone(),
    }
}

/// The newest checks that together read every pack without a fault: a
/// full read, or every slice of one subset round.
fn coverage(checks: &[Check]) -> Option<(Coverage, DateTime<Utc>)> {
    let mut slices: BTreeMap<u32, &Check> = BTreeMap::new();
    let mut of: Option<u32> = None;
    for c in checks.iter().rev() {
        if c.outcome != "success" || c.faults.unwrap_or(0) > 0 {
            continue;
        }
        let Some(read) = c.read_data.as_deref() else {
            continue;
        };
        let set = |list: Vec<&Check>| {
            let newest = list.iter().map(|c| c.time).max().expect("not empty");
            Some((
                Coverage {
                    since: list.iter().map(|c| c.time).min().expect("not empty"),
                    reads: list.iter().filter_map(|c| c.read_data.clone()).collect(),
                    evidence: list.iter().map(|c| c.seq).collect(),
                },
                newest,
            ))
        };
        if read == "all" {
            if slices.is_empty() {
                return set(vec![c]);
            }
            // A full read completes any round begun after it.
            let mut list: Vec<&Check> = slices.values().copied().collect();
            list.push(c);
            return set(list);
        }
        let Some((n, m)) = read.split_once('/') else {
            continue;
        };
        let (Ok(n), Ok(m)) = (n.parse::<u32>(), m.parse::<u32>()) else {
            continue;
        };
        if of.is_some_and(|o| o != m) {
            continue; // another round's size: not part of the newest round
        }
        of = Some(m);
        slices.entry(n).or_insert(c);
        if slices.len() as u32 == m {
            let mut list: Vec<&Check> = slices.values().copied().collect();
            list.sort_by_key(|c| c.seq);
            return set(list);
        }
    }
    None
}

fn integrity(h: &History, f: &Frame<'_>) -> (Integrity, Vec<Control>) {
    let c = f.controls;
    let all: Vec<Check> = h.checks.iter().map(check_row).collect();
    let covered = coverage(&all);
    let fault = all.iter().rev().find(|ch| {
        ch.faults.unwrap_or(0) > 0
            || (ch.outcome != "success"
                && ch
                    .error_kind
                    .as_deref()
                    .is_some_and(|k| FAULT_KINDS.contains(&k)))
    });
    let title = format!(
        "Every pack read and verified (check --read-data) within {}",
        days(c.read_data_max_age)
    );
    let control = match (h.shredded(), &covered, fault) {
        (Some((_, seq)), _, _) => control(
            "integrity.read_data",
            title,
            Verdict::NotApplicable,
            format!("the tenant was shredded (record {seq})"),
            vec![seq],
        ),
        (None, cov, Some(bad)) if cov.as_ref().is_none_or(|(_, newest)| bad.time > *newest) => {
            control(
                "integrity.read_data",
                title,
                Verdict::Fail,
                format!(
                    "the check of {} (record {}) found {}",
                    date(bad.time),
                    bad.seq,
                    match bad.faults {
                        Some(n) if n > 0 => format!("{n} fault(s)"),
                        _ => format!(
                            "damaged data ({})",
                            bad.error_kind.as_deref().unwrap_or("failed")
                        ),
                    }
                ),
                vec![bad.seq],
            )
        }
        (None, None, _) => control(
            "integrity.read_data",
            title,
            Verdict::Fail,
            "no check --read-data (or full round of --read-data-subset) is recorded".into(),
            Vec::new(),
        ),
        (None, Some((cov, _)), _) => {
            let old = (f.now - cov.since).to_std().unwrap_or_default() > c.read_data_max_age;
            control(
                "integrity.read_data",
                title,
                if old { Verdict::Fail } else { Verdict::Pass },
                format!(
                    "every pack read and verified since {} ({}; {}){}",
                    date(cov.since),
                    cov.reads.join(", "),
                    super::cite(&cov.evidence),
                    if old { ": too long ago" } else { "" }
                ),
                cov.evidence.clone(),
            )
        }
    };
    (
        Integrity {
            checks: all.into_iter().filter(|ch| f.in_period(ch.time)).collect(),
            read_data_complete: covered.map(|(c, _)| c),
        },
        vec![control],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditRecord;
    use crate::tenant::TenantId;
    use serde_json::{Value, json};

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn rec(seq: u64, hours: i64, event: &str, details: Value) -> AuditRecord {
        AuditRecord {
            seq,
            time: t0() + chrono::Duration::hours(hours),
            event: event.into(),
            tenant: Some(TenantId::new("acme").unwrap()),
            actor: "test".into(),
            details,
            prev: "0".repeat(64),
        }
    }

    fn check(seq: u64, hours: i64, read: &str, faults: u64) -> AuditRecord {
        rec(
            seq,
            hours,
            "check.end",
            json!({"outcome": if faults == 0 { "success" } else { "failure" },
                   "error_kind": if faults == 0 { Value::Null } else { "corrupt_object".into() },
                   "result": {"read_data": read, "packs": 8, "packs_read": 2, "faults": faults}}),
        )
    }

    fn evaluate_at(records: &[AuditRecord], hours: i64) -> Assessment {
        let h = History::of(records, &TenantId::new("acme").unwrap());
        let controls = Controls::default();
        let f = Frame {
            controls: &controls,
            since: t0(),
            now: t0() + chrono::Duration::hours(hours),
        };
        evaluate(&h, &Live::default(), &f)
    }

    fn verdict(e: &Assessment, id: &str) -> Verdict {
        e.controls.iter().find(|c| c.id == id).unwrap().verdict
    }

    fn init() -> AuditRecord {
        rec(
            0,
            0,
            "tenant.init",
            json!({"key": "local:acme", "epoch": 1}),
        )
    }

    #[test]
    fn a_round_of_subsets_covers_every_pack_and_a_later_fault_undoes_it() {
        let mut records = vec![
            init(),
            check(1, 1, "1/3", 0),
            check(2, 2, "2/3", 0),
            check(3, 3, "none", 0),
            check(4, 4, "3/3", 0),
        ];
        let e = evaluate_at(&records, 5);
        assert_eq!(verdict(&e, "integrity.read_data"), Verdict::Pass);
        let cov = e.integrity.read_data_complete.unwrap();
        assert_eq!(cov.evidence, vec![1, 2, 4]);
        assert_eq!(cov.since, t0() + chrono::Duration::hours(1));
        // Two slices are not a round.
        assert_eq!(
            verdict(&evaluate_at(&records[..3], 5), "integrity.read_data"),
            Verdict::Fail
        );
        // A check that found faults after the round fails the control until
        // a full read is clean again.
        records.push(check(5, 5, "1/3", 2));
        let e = evaluate_at(&records, 6);
        assert_eq!(verdict(&e, "integrity.read_data"), Verdict::Fail);
        assert_eq!(
            e.controls
                .iter()
                .find(|c| c.id == "integrity.read_data")
                .unwrap()
                .evidence,
            vec![5]
        );
        records.push(check(6, 6, "all", 0));
        assert_eq!(
            verdict(&evaluate_at(&records, 7), "integrity.read_data"),
            Verdict::Pass
        );
        // Too long ago.
        assert_eq!(
            verdict(&evaluate_at(&records, 6 + 32 * 24), "integrity.read_data"),
            Verdict::Fail
        );
    }

    fn backup(seq: u64, hours: i64, ok: bool) -> AuditRecord {
        rec(
            seq,
            hours,
            "backup.end",
            json!({"outcome": if ok { "success" } else { "failure" }, "error_kind": if ok { Value::Null } else { "source_error".into() }}),
        )
    }

    #[test]
    fn gaps_count_up_to_now_and_failures_do_not_close_them() {
        let records = vec![
            init(),
            backup(1, 0, true),
            backup(2, 24, true),
            backup(3, 48, false),
            backup(4, 72, true),
        ];
        // 24 h, 48 h (the failed run does not count), then 2 h to now.
        let e = evaluate_at(&records, 74);
        assert_eq!(verdict(&e, "backup.rpo"), Verdict::Fail);
        assert_eq!(e.backups.gaps.len(), 1);
        assert_eq!(
            (e.backups.gaps[0].from_seq, e.backups.gaps[0].until_seq),
            (Some(2), Some(4))
        );
        assert_eq!(e.backups.achieved_rpo_seconds, Some(48.0 * 3600.0));
        // 3 of 4 runs: under the default 95%.
        assert_eq!(verdict(&e, "backup.success_rate"), Verdict::Fail);
        assert_eq!(e.backups.failures[0].seq, 3);
        // The time since the last backup is a gap too.
        let e = evaluate_at(&records[..3], 24 + 30);
        assert_eq!(e.backups.gaps[0].until_seq, None);
        assert_eq!(verdict(&e, "backup.rpo"), Verdict::Fail);
        // No backup at all: nothing to recover.
        let e = evaluate_at(&records[..1], 2);
        assert_eq!(verdict(&e, "backup.rpo"), Verdict::Fail);
        assert_eq!(e.backups.achieved_rpo_seconds, None);
        assert_eq!(verdict(&e, "backup.success_rate"), Verdict::NotApplicable);
    }

    fn drill(
        seq: u64,
        hours: i64,
        reason: Option<&str>,
        restore: f64,
        rto: Option<f64>,
    ) -> AuditRecord {
        rec(
            seq,
            hours,
            "drill.end",
            json!({"outcome": if reason.is_none() { "success" } else { "failure" },
                   "error_kind": reason,
                   "result": {"reason": reason, "restore_seconds": restore, "rto_seconds": rto,
                              "rto_met": rto.map(|r| restore <= r), "mode": "full"}}),
        )
    }

    #[test]
    fn drills_fail_on_their_reason_and_on_a_missing_or_missed_rto() {
        let records = vec![
            init(),
            drill(1, 1, None, 2.0, Some(60.0)),
            drill(2, 2, Some("verify_command_failed"), 2.0, Some(60.0)),
        ];
        let e = evaluate_at(&records, 3);
        assert_eq!(verdict(&e, "drill.frequency"), Verdict::Pass);
        assert_eq!(verdict(&e, "drill.passed"), Verdict::Fail);
        assert_eq!(verdict(&e, "drill.rto"), Verdict::Pass);
        let mut records = records[..2].to_vec();
        records.push(drill(2, 2, Some("rto_exceeded"), 90.0, Some(60.0)));
        let e = evaluate_at(&records, 3);
        // An RTO miss is the RTO control's, not a failed verification.
        assert_eq!(verdict(&e, "drill.passed"), Verdict::Pass);
        assert_eq!(verdict(&e, "drill.rto"), Verdict::Fail);
        records.push(drill(3, 3, None, 1.0, None));
        let rto = evaluate_at(&records, 4);
        let c = rto.controls.iter().find(|c| c.id == "drill.rto").unwrap();
        assert!(c.finding.contains("no RTO set (record 3)"), "{}", c.finding);
        // The last passed drill is older than drill_max_interval.
        let e = evaluate_at(&records[..2], 32 * 24);
        assert_eq!(verdict(&e, "drill.frequency"), Verdict::Fail);
        assert_eq!(e.drills.gaps[0].from_seq, Some(1));
    }

    #[test]
    fn key_ages_follow_rotations_and_stop_at_a_shred() {
        let records = vec![
            init(),
            rec(
                1,
                10 * 24,
                "rotate.end",
                json!({"outcome": "success", "result": {"rotations": [
                {"action": "replace_cmk", "dry_run": false, "key_before": "local:acme", "key_after": "local:acme-2"}]}}),
            ),
            rec(
                2,
                20 * 24,
                "rotate.end",
                json!({"outcome": "success", "result": {"rotations": [
                {"action": "new_epoch", "dry_run": false, "epoch_before": 1, "epoch_after": 2}]}}),
            ),
        ];
        let e = evaluate_at(&records, 50 * 24);
        let cmk = e.keys.cmk.as_ref().unwrap();
        assert_eq!(
            (cmk.key.as_str(), cmk.by, cmk.since_seq),
            ("local:acme-2", "replaced", 1)
        );
        assert_eq!(cmk.age_days, 40.0);
        assert_eq!(verdict(&e, "keys.cmk_age"), Verdict::Pass);
        // 30 days since the new epoch, within 35d.
        assert_eq!(verdict(&e, "keys.epoch_age"), Verdict::Pass);
        assert_eq!(
            verdict(&evaluate_at(&records, 56 * 24), "keys.epoch_age"),
            Verdict::Fail
        );
        assert_eq!(
            e.keys
                .keys
                .iter()
                .map(|k| (k.key.as_str(), k.role))
                .collect::<Vec<_>>(),
            [("local:acme-2", "current"), ("local:acme", "previous")]
        );
        let mut shredded = records.clone();
        shredded.push(rec(
            3,
            51 * 24,
            "shred.fence.begin",
            json!({"certificate_id": "c"}),
        ));
        shredded.push(rec(
            4,
            51 * 24,
            "shred.certificate.end",
            json!({"certificate_id": "c"}),
        ));
        let e = evaluate_at(&shredded, 400 * 24);
        assert_eq!(verdict(&e, "keys.cmk_age"), Verdict::NotApplicable);
        assert_eq!(verdict(&e, "integrity.read_data"), Verdict::NotApplicable);
        assert!(e.keys.epochs.iter().all(|x| x.state == "shredded"));
        // The shred was not verified: its control fails (not issued, unchecked).
        assert_eq!(verdict(&e, "deletion.certified"), Verdict::Fail);
    }
}
