//! One tenant's history, read from the audit records: its lineage, backups,
//! drills, checks, rotations and shreds, each with the sequence numbers of
//! the records it comes from. Pure: no I/O, no thresholds (those are
//! [`super::controls`]'), so it is tested on hand-made records.
//!
//! Only what the records say is used. A record's `details` that lack a
//! field (written by an older custos) leave the figure unknown, never
//! guessed.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::audit::AuditRecord;
use crate::tenant::TenantId;

/// The start of the tenant's current lineage: its `tenant.init` record.
#[derive(Debug, Clone)]
pub struct Init {
    pub seq: u64,
    pub time: DateTime<Utc>,
    pub key: Option<String>,
    pub epoch: u32,
}

/// One job run: its `<job>.end` record.
#[derive(Debug, Clone)]
pub struct Run {
    pub seq: u64,
    pub begin_seq: Option<u64>,
    pub time: DateTime<Utc>,
    pub success: bool,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub snapshot: Option<String>,
    /// The job's own figures (`details.result`), when recorded.
    pub result: Option<Value>,
}

/// One rotation (a `rotate.end` may hold several: a scheduled run).
#[derive(Debug, Clone)]
pub struct RotationEvent {
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// `cmk`, `replace_cmk`, `new_epoch`; `None`: not recorded.
    pub action: Option<String>,
    pub key_before: Option<String>,
    pub key_after: Option<String>,
    pub epoch_before: Option<u32>,
    pub epoch_after: Option<u32>,
    pub envelopes_rewrapped: Option<u64>,
}

/// One shred, gathered from its step records by certificate id.
#[derive(Debug, Clone, Default)]
pub struct Shred {
    pub certificate_id: String,
    pub epoch: Option<u32>,
    pub requested_at: Option<DateTime<Utc>>,
    pub requested_by: Option<String>,
    pub reason: Option<String>,
    pub guarantee: Option<String>,
    pub verified: Option<bool>,
    /// `shred.certificate.end`: the certificate is stored, with this digest.
    pub certified_at: Option<DateTime<Utc>>,
    pub file_sha256: Option<String>,
    /// Keys the shred destroyed (`shred.keys.end` outcome `destroyed`).
    pub keys_destroyed: Vec<String>,
    pub seqs: Vec<u64>,
}

impl Shred {
    pub fn subject(&self) -> &'static str {
        if self.epoch.is_some() {
            "epoch"
        } else {
            "tenant"
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct History {
    pub init: Option<Init>,
    pub backups: Vec<Run>,
    pub drills: Vec<Run>,
    pub checks: Vec<Run>,
    pub rotations: Vec<RotationEvent>,
    pub shreds: Vec<Shred>,
    /// Seq of any record of the tenant (false: the log never names it).
    pub seen: bool,
}

impl History {
    /// Every record of `tenant` in `records` (in log order). Backups,
    /// drills, checks and rotations count from the latest `tenant.init`
    /// (a reused id starts a new lineage); shreds are kept from every
    /// lineage (a shred is what ended the previous one).
    pub fn of(records: &[AuditRecord], tenant: &TenantId) -> History {
        let mut h = History::default();
        let mut shreds: BTreeMap<String, Shred> = BTreeMap::new();
        for r in records.iter().filter(|r| r.tenant.as_ref() == Some(tenant)) {
            h.seen = true;
            let d = &r.details;
            match r.event.as_str() {
                "tenant.init" => {
                    h.init = Some(Init {
                        seq: r.seq,
                        time: r.time,
                        key: str_of(d, "key"),
                        epoch: u32_of(d, "epoch").unwrap_or(1),
                    });
                    h.backups.clear();
                    h.drills.clear();
                    h.checks.clear();
                    h.rotations.clear();
                }
                "backup.end" => h.backups.push(run(r)),
                "drill.end" => h.drills.push(run(r)),
                "check.end" => h.checks.push(run(r)),
                "rotate.end" => {
                    let run = run(r);
                    if run.success {
                        h.rotations.extend(rotations(&run));
                    }
                }
                e if e.starts_with("shred.") => {
                    let Some(id) = str_of(d, "certificate_id") else {
                        continue;
                    };
                    let s = shreds.entry(id.clone()).or_insert_with(|| Shred {
                        certificate_id: id,
                        ..Default::default()
                    });
                    s.seqs.push(r.seq);
                    shred_step(s, r);
                }
                _ => {}
            }
        }
        let mut shreds: Vec<Shred> = shreds.into_values().collect();
        shreds.sort_by_key(|s| s.seqs.first().copied());
        h.shreds = shreds;
        h
    }

    /// The completed tenant shred of the current lineage, if any: its
    /// certificate record's time and seq.
    pub fn shredded(&self) -> Option<(DateTime<Utc>, u64)> {
        let since = self.init.as_ref().map_or(0, |i| i.seq);
        self.shreds
            .iter()
            .filter(|s| s.epoch.is_none() && s.seqs.first().is_some_and(|&q| q > since))
            .find_map(|s| Some((s.certified_at?, *s.seqs.last()?)))
    }
}

/// The events a history is made of; a report keeps no other record.
pub fn relevant(event: &str) -> bool {
    matches!(
        event,
        "tenant.init" | "backup.end" | "drill.end" | "check.end" | "rotate.end"
    ) || (event.starts_with("shred.") && event != "shred.begin")
}

fn run(r: &AuditRecord) -> Run {
    let d = &r.details;
    Run {
        seq: r.seq,
        begin_seq: d.get("begin_seq").and_then(Value::as_u64),
        time: r.time,
        success: d.get("outcome").and_then(Value::as_str) == Some("success"),
        error_kind: str_of(d, "error_kind"),
        error: str_of(d, "error"),
        snapshot: str_of(d, "snapshot"),
        result: d.get("result").filter(|v| v.is_object()).cloned(),
    }
}

/// The rotations a successful `rotate.end` records; one of unknown action
/// when it records none (an older custos), none for a dry run.
fn rotations(run: &Run) -> Vec<RotationEvent> {
    let Some(list) = run
        .result
        .as_ref()
        .and_then(|r| r.get("rotations"))
        .and_then(Value::as_array)
    else {
        return vec![RotationEvent {
            seq: run.seq,
            time: run.time,
            action: None,
            key_before: None,
            key_after: None,
            epoch_before: None,
            epoch_after: None,
            envelopes_rewrapped: None,
        }];
    };
    list.iter()
        .filter(|e| e.get("dry_run").and_then(Value::as_bool) != Some(true))
        .map(|e| RotationEvent {
            seq: run.seq,
            time: run.time,
            action: str_of(e, "action"),
            key_before: str_of(e, "key_before"),
            key_after: str_of(e, "key_after"),
            epoch_before: u32_of(e, "epoch_before"),
            epoch_after: u32_of(e, "epoch_after"),
            envelopes_rewrapped: e.get("envelopes_rewrapped").and_then(Value::as_u64),
        })
        .collect()
}

/// What one step record of a shred adds (docs/shredding.md lists the steps).
fn shred_step(s: &mut Shred, r: &AuditRecord) {
    let d = &r.details;
    match r.event.as_str() {
        "shred.fence.begin" => {
            s.requested_at = d
                .get("requested_at")
                .and_then(Value::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
                .or(Some(r.time));
            s.requested_by = str_of(d, "requested_by");
            s.reason = str_of(d, "reason");
            s.epoch = u32_of(d, "epoch");
        }
        "shred.keys.end" => {
            for k in d
                .get("keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if k.get("outcome").and_then(Value::as_str) == Some("destroyed")
                    && let Some(key) = str_of(k, "reference")
                {
                    s.keys_destroyed.push(key);
                }
            }
        }
        "shred.verify.end" => s.verified = d.get("passed").and_then(Value::as_bool),
        "shred.certificate.begin" => {
            s.guarantee = str_of(d, "guarantee");
            s.epoch = s.epoch.or(u32_of(d, "epoch"));
        }
        "shred.certificate.end" => {
            s.certified_at = Some(r.time);
            s.file_sha256 = str_of(d, "file_sha256");
        }
        _ => {}
    }
}

pub fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

pub fn u32_of(v: &Value, key: &str) -> Option<u32> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
}

pub fn f64_of(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(seq: u64, day: i64, event: &str, tenant: &str, details: Value) -> AuditRecord {
        AuditRecord {
            seq,
            time: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc)
                + chrono::Duration::days(day),
            event: event.into(),
            tenant: Some(TenantId::new(tenant).unwrap()),
            actor: "test".into(),
            details,
            prev: "0".repeat(64),
        }
    }

    #[test]
    fn runs_rotations_and_shreds_come_from_their_records() {
        let acme = TenantId::new("acme").unwrap();
        let records = vec![
            rec(
                0,
                0,
                "tenant.init",
                "acme",
                json!({"key": "local:acme", "epoch": 1}),
            ),
            rec(
                1,
                0,
                "backup.end",
                "acme",
                json!({"outcome": "success", "snapshot": "ab", "begin_seq": 0}),
            ),
            rec(2, 1, "backup.end", "other", json!({"outcome": "success"})),
            rec(
                3,
                1,
                "backup.end",
                "acme",
                json!({"outcome": "failure", "error_kind": "source_error", "error": "gone"}),
            ),
            rec(
                4,
                2,
                "rotate.end",
                "acme",
                json!({"outcome": "success", "result": {"rotations": [
                    {"action": "new_epoch", "dry_run": false, "epoch_before": 1, "epoch_after": 2},
                    {"action": "cmk", "dry_run": true}
                ]}}),
            ),
            rec(5, 3, "rotate.end", "acme", json!({"outcome": "success"})),
            rec(
                6,
                4,
                "shred.fence.begin",
                "acme",
                json!({"certificate_id": "c1", "epoch": 1, "reason": "expired"}),
            ),
            rec(
                7,
                4,
                "shred.verify.end",
                "acme",
                json!({"certificate_id": "c1", "passed": true}),
            ),
            rec(
                8,
                4,
                "shred.certificate.begin",
                "acme",
                json!({"certificate_id": "c1", "guarantee": "envelope_deleted"}),
            ),
            rec(
                9,
                4,
                "shred.certificate.end",
                "acme",
                json!({"certificate_id": "c1", "file_sha256": "ff"}),
            ),
        ];
        let h = History::of(&records, &acme);
        assert!(h.seen);
        assert_eq!(h.init.as_ref().unwrap().key.as_deref(), Some("local:acme"));
        assert_eq!(h.backups.len(), 2);
        assert!(h.backups[0].success && !h.backups[1].success);
        assert_eq!(h.backups[1].error_kind.as_deref(), Some("source_error"));
        // The dry run is no rotation; an end without figures is one of unknown action.
        assert_eq!(h.rotations.len(), 2);
        assert_eq!(h.rotations[0].action.as_deref(), Some("new_epoch"));
        assert_eq!(h.rotations[0].epoch_after, Some(2));
        assert_eq!(h.rotations[1].action, None);
        assert_eq!(h.shreds.len(), 1);
        let s = &h.shreds[0];
        assert_eq!(
            (s.subject(), s.epoch, s.verified),
            ("epoch", Some(1), Some(true))
        );
        assert_eq!(s.seqs, vec![6, 7, 8, 9]);
        assert!(s.certified_at.is_some());
        assert_eq!(h.shredded(), None, "an epoch shred leaves the tenant");
        assert!(!History::of(&records, &TenantId::new("nobody").unwrap()).seen);
    }

    #[test]
    fn a_reused_id_starts_a_new_lineage() {
        let acme = TenantId::new("acme").unwrap();
        let records = vec![
            rec(
                0,
                0,
                "tenant.init",
                "acme",
                json!({"key": "local:a", "epoch": 1}),
            ),
            rec(1, 0, "backup.end", "acme", json!({"outcome": "success"})),
            rec(
                2,
                1,
                "shred.fence.begin",
                "acme",
                json!({"certificate_id": "c1"}),
            ),
            rec(
                3,
                1,
                "shred.certificate.end",
                "acme",
                json!({"certificate_id": "c1"}),
            ),
            rec(
                4,
                2,
                "tenant.init",
                "acme",
                json!({"key": "local:b", "epoch": 1}),
            ),
        ];
        let h = History::of(&records, &acme);
        assert!(h.backups.is_empty());
        assert_eq!(h.init.as_ref().unwrap().seq, 4);
        assert_eq!(
            h.shreds.len(),
            1,
            "the shred that ended the old lineage stays"
        );
        assert_eq!(h.shredded(), None, "the new lineage is not shredded");
        let before = History::of(&records[..4], &acme);
        assert_eq!(before.shredded().map(|(_, seq)| seq), Some(3));
    }
}
