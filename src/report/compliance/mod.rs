//! The compliance report (`custos report`, and the daemon's `[report]`):
//! for each tenant, controls with a verdict and the evidence behind each,
//! computed from the verified audit log and ending with the signed
//! checkpoint it was computed against (docs/report.md).
//!
//! - [`evidence`]: the audit log, verified and bound to a checkpoint;
//! - [`history`]: one tenant's runs, rotations and shreds from its records;
//! - [`controls`]: the verdicts, under `[controls]`;
//! - [`model`]: the document (the JSON format);
//! - [`html`], [`md`]: the renderings ([`chart`]: the inline SVG).
//!
//! Besides the audit log the report asks two things of the present, and
//! says so: each key's state from its provider, and each deletion
//! certificate from the store (verified offline as `certificate verify` does).

pub mod chart;
pub mod controls;
pub mod evidence;
pub mod history;
pub mod html;
pub mod md;
pub mod model;
mod words;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use self::controls::{Frame, Live};
use self::history::History;
use self::model::*;
use crate::config::{Config, ReportFormat};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::tenant::TenantId;

/// What to report on.
#[derive(Debug, Clone)]
pub struct Request {
    /// Only these tenants (empty: every tenant the audit log or the policies name).
    pub tenants: Vec<TenantId>,
    pub since: DateTime<Utc>,
    /// The end of the period, and the time ages are computed at.
    pub now: DateTime<Utc>,
}

/// Builds the report: verifies the audit log, reads every tenant's history
/// from it, looks up key states and certificates, evaluates the controls.
pub async fn build(cfg: &Config, ctx: &Context, req: &Request) -> Result<Report> {
    let ev = evidence::load(cfg, &ctx.store).await?;
    let policies = policies(&cfg.policies_dir);
    let known: BTreeSet<TenantId> = ev
        .tenants
        .iter()
        .cloned()
        .chain(policies.keys().cloned())
        .collect();
    let tenants: Vec<TenantId> = if req.tenants.is_empty() {
        known.into_iter().collect()
    } else {
        for t in &req.tenants {
            if !known.contains(t) {
                return Err(Error::InvalidArgument(format!(
                    "--tenant {t}: no audit record names tenant {t} and {} has no policy for it",
                    cfg.policies_dir.display()
                )));
            }
        }
        let mut v = req.tenants.clone();
        v.sort();
        v.dedup();
        v
    };
    let frame = Frame {
        controls: &cfg.controls,
        since: req.since,
        now: req.now,
    };
    let verifier = ev.audit.checkpoint.as_ref().map(|c| c.verifier.clone());
    // Each tenant's records once, not the whole log per tenant.
    let mut by_tenant: BTreeMap<TenantId, Vec<crate::audit::AuditRecord>> = BTreeMap::new();
    for r in ev.records {
        if let Some(t) = r.tenant.clone() {
            by_tenant.entry(t).or_default().push(r);
        }
    }
    let mut reports = Vec::new();
    for tenant in &tenants {
        let h = History::of(by_tenant.get(tenant).map_or(&[][..], Vec::as_slice), tenant);
        let live = live(ctx, tenant, &h, verifier.as_deref()).await;
        let assessment = controls::evaluate(&h, &live, &frame);
        let (policy, policy_error) = match policies.get(tenant) {
            Some(Ok(p)) => (Some(policy_facts(p)), None),
            Some(Err(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        reports.push(TenantReport {
            tenant: tenant.clone(),
            verdict: worst(assessment.controls.iter().map(|c| c.verdict)),
            state: match (ev.tenants.contains(tenant), h.shredded()) {
                (false, _) => "unknown",
                (true, Some(_)) => "shredded",
                (true, None) => "active",
            },
            policy,
            policy_error,
            assessment,
        });
    }
    Ok(assemble(cfg, ctx, req, reports, ev.audit))
}

fn assemble(
    cfg: &Config,
    ctx: &Context,
    req: &Request,
    tenants: Vec<TenantReport>,
    audit: AuditSection,
) -> Report {
    let all: Vec<Verdict> = tenants
        .iter()
        .flat_map(|t| t.assessment.controls.iter().map(|c| c.verdict))
        .collect();
    let count = |v: Verdict| all.iter().filter(|&&x| x == v).count();
    let audit_verified = audit.verification.ok;
    let verdict = match worst(all.iter().copied()) {
        _ if !audit_verified => Verdict::Fail,
        v => v,
    };
    Report {
        format: FORMAT,
        generated_at: req.now,
        period: Period {
            since: req.since,
            until: req.now,
        },
        custos_version: env!("CARGO_PKG_VERSION"),
        store: ctx.store_url.clone(),
        controls: Thresholds::from(&cfg.controls),
        summary: Summary {
            verdict,
            tenants: tenants.len(),
            controls: all.len(),
            passed: count(Verdict::Pass),
            failed: count(Verdict::Fail),
            not_applicable: count(Verdict::NotApplicable),
            audit_verified,
        },
        tenants,
        audit,
    }
}

/// `fail` if any is, else `pass` if any is, else `not_applicable`.
fn worst(verdicts: impl Iterator<Item = Verdict>) -> Verdict {
    let mut out = Verdict::NotApplicable;
    for v in verdicts {
        match v {
            Verdict::Fail => return Verdict::Fail,
            Verdict::Pass => out = Verdict::Pass,
            Verdict::NotApplicable => {}
        }
    }
    out
}

/// Every tenant policy in the directory, each loaded on its own so that one
/// broken file costs only its tenant's context (the error is reported).
fn policies(dir: &Path) -> BTreeMap<TenantId, std::result::Result<crate::config::Policy, String>> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".toml")) else {
            continue;
        };
        let Ok(tenant) = TenantId::new(stem) else {
            continue; // defaults.toml, or not a tenant's file
        };
        let loaded = crate::config::load_policy_file(dir, Path::new(&name))
            .map_err(|e| Error::from(e).to_string());
        out.insert(tenant, loaded);
    }
    out
}

fn policy_facts(p: &crate::config::Policy) -> PolicyFacts {
    PolicyFacts {
        file: p.file.display().to_string(),
        backup_schedule: p.backup.schedule.as_ref().map(|s| s.as_str().to_owned()),
        drill_schedule: p.drill.schedule.as_ref().map(|s| s.as_str().to_owned()),
        rto_seconds: p.drill.rto.map(|d| d.as_secs_f64()),
        cmk_every: p.rotation.cmk_every.map(limit),
        epoch_every: p.rotation.epoch_every.map(limit),
    }
}

/// The present state of what the audit log names: each key's custody and
/// state (one `describe` per key), each certificate checked in the store.
async fn live(ctx: &Context, tenant: &TenantId, h: &History, verifier: Option<&str>) -> Live {
    let mut out = Live::default();
    let mut keys: BTreeSet<String> = h.init.iter().filter_map(|i| i.key.clone()).collect();
    for r in &h.rotations {
        keys.extend(r.key_after.iter().chain(&r.key_before).cloned());
    }
    for key in keys {
        out.keys.insert(key.clone(), custody(ctx, &key).await);
    }
    for s in &h.shreds {
        if s.certified_at.is_none() {
            continue;
        }
        let status = certificate_status(ctx, tenant, s, verifier).await;
        out.certificates.insert(s.certificate_id.clone(), status);
    }
    out
}

async fn custody(ctx: &Context, key: &str) -> KeyCustody {
    let mut k = KeyCustody {
        key: key.to_owned(),
        role: "current",
        provider: None,
        holder: None,
        network: None,
        state: None,
        error: None,
        residency: "unknown".into(),
        seq: None,
    };
    let parsed = match crate::keys::KeyRef::parse(key) {
        Ok(p) => p,
        Err(e) => {
            k.error = Some(e.to_string());
            return k;
        }
    };
    k.provider = Some(parsed.kind().scheme().to_owned());
    k.residency = match ctx.residency.check_key(&parsed) {
        Ok(()) => "allowed".into(),
        Err(v) => v.to_string(),
    };
    match ctx.keys.key(&parsed) {
        Ok(h) => {
            let c = h.custody();
            k.holder = Some(c.holder);
            k.network = Some(c.network);
            match h.describe().await {
                Ok(info) => k.state = Some(info.state.name()),
                Err(e) => k.error = Some(e.to_string()),
            }
        }
        Err(e) => k.error = Some(e.to_string()),
    }
    k
}

/// A stored certificate: present, the bytes the shred recorded, and valid
/// offline under the audit key.
async fn certificate_status(
    ctx: &Context,
    tenant: &TenantId,
    s: &history::Shred,
    verifier: Option<&str>,
) -> (&'static str, Option<String>) {
    let bytes =
        match crate::jobs::shred::load_certificate(&ctx.store, tenant, &s.certificate_id).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                return (
                    "missing",
                    Some(format!(
                        "{} is not in the store",
                        crate::jobs::shred::certificate_path(tenant, &s.certificate_id)
                    )),
                );
            }
            Err(e) => return ("unavailable", Some(e.to_string())),
        };
    if let Some(want) = &s.file_sha256 {
        let got = hex::encode(Sha256::digest(&bytes));
        if &got != want {
            return (
                "invalid",
                Some(format!(
                    "the stored certificate's SHA-256 is {got}, the audit log recorded {want}"
                )),
            );
        }
    }
    let Some(verifier) = verifier else {
        return (
            "unavailable",
            Some("no verifier key: the audit log has no signed checkpoint".into()),
        );
    };
    match crate::jobs::shred::certificate::verify(&bytes, verifier) {
        Ok(_) => ("valid", None),
        Err(e) => ("invalid", Some(e.to_string())),
    }
}

/// Writes a rendered report to `path` atomically (a reader never sees half
/// of it), mode 0644: a report is meant to be handed to an auditor.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    crate::util::write_file_atomic(path, text.as_bytes(), 0o644).map_err(|e| Error::io(path, e))
}

/// The daemon's report (`[report]`): the period `since` before `now`, every
/// tenant, in each configured format, written to
/// `<output_dir>/custos-report-<time>.<format>`. Returns the files written.
pub async fn write_scheduled(
    cfg: &Config,
    ctx: &Context,
    now: DateTime<Utc>,
) -> Result<(Report, Vec<std::path::PathBuf>)> {
    let since = chrono::Duration::from_std(cfg.report.since)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| Error::InvalidArgument("[report] since is too long".into()))?;
    let req = Request {
        tenants: Vec::new(),
        since,
        now,
    };
    let report = build(cfg, ctx, &req).await?;
    let dir = &cfg.report.output_dir;
    crate::secure_fs::create_private_dir(dir).map_err(|e| Error::io(dir, e))?;
    // What an auditor is handed: no other user may plant or replace a report.
    crate::secure_fs::check_dir(dir, "report output directory", crate::secure_fs::Kind::Dir)?;
    let mut written = Vec::new();
    for format in &cfg.report.formats {
        let path = dir.join(format!(
            "custos-report-{}.{}",
            now.format("%Y%m%dT%H%M%SZ"),
            format.extension()
        ));
        write_file(&path, &render(&report, *format))?;
        written.push(path);
    }
    Ok((report, written))
}

/// Renders the report in `format`.
pub fn render(report: &Report, format: ReportFormat) -> String {
    match format {
        ReportFormat::Html => html::render(report),
        ReportFormat::Md => md::render(report),
        ReportFormat::Json => {
            let mut s = serde_json::to_string_pretty(report).expect("a report serialises");
            s.push('\n');
            s
        }
    }
}

/// A duration as a person reads it: "3d 2h", "26h 5m", "4m 10s", "12s",
/// "4.2ms".
pub fn span(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds < 1.0 {
        return format!("{}ms", trim_float(seconds * 1000.0, 1));
    }
    if seconds < 60.0 {
        return format!(
            "{}s",
            trim_float(seconds, if seconds < 10.0 { 1 } else { 0 })
        );
    }
    let s = seconds.round() as u64;
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3_600, s % 3_600 / 60, s % 60);
    let pair = |a: u64, ua: &str, b: u64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua} {b}{ub}")
        }
    };
    if d > 0 {
        pair(d, "d", h, "h")
    } else if h > 0 {
        pair(h, "h", m, "m")
    } else {
        pair(m, "m", sec, "s")
    }
}

/// A threshold as it is written in custos.toml: "26h", "31d", "90m".
pub fn limit(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() == 0 && s > 0 {
        for (unit, suffix) in [(86_400, "d"), (3_600, "h"), (60, "m")] {
            if s.is_multiple_of(unit) {
                return format!("{}{suffix}", s / unit);
            }
        }
    }
    crate::config::units::format_duration(d)
}

/// `x` with at most `places` decimals, trailing zeros removed.
fn trim_float(x: f64, places: usize) -> String {
    let s = format!("{x:.places$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s.is_empty() {
        "0".into()
    } else {
        s.to_owned()
    }
}

/// Sequence numbers as a short citation: "#4, #7, #9" or "#4, #7, … (31 records)".
pub fn cite(seqs: &[u64]) -> String {
    const SHOWN: usize = 8;
    if seqs.is_empty() {
        return "-".into();
    }
    let shown: Vec<String> = seqs.iter().take(SHOWN).map(|s| format!("#{s}")).collect();
    if seqs.len() > SHOWN {
        format!("{}, … ({} records)", shown.join(", "), seqs.len())
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_as_people_write_them() {
        assert_eq!(span(0.0421), "42.1ms");
        assert_eq!(span(0.001), "1ms");
        assert_eq!(span(4.26), "4.3s");
        assert_eq!(span(12.4), "12s");
        assert_eq!(span(250.0), "4m 10s");
        assert_eq!(span(600.0), "10m");
        assert_eq!(span(26.0 * 3600.0 + 300.0), "1d 2h");
        assert_eq!(span(3.0 * 3600.0 + 60.0), "3h 1m");
        assert_eq!(span(72.0 * 3600.0), "3d");
        assert_eq!(span(f64::NAN), "-");
        assert_eq!(limit(std::time::Duration::from_secs(26 * 3600)), "26h");
        assert_eq!(limit(std::time::Duration::from_secs(31 * 86_400)), "31d");
        assert_eq!(limit(std::time::Duration::from_secs(90)), "1m 30s");
    }

    #[test]
    fn citations_stay_short() {
        assert_eq!(cite(&[]), "-");
        assert_eq!(cite(&[3, 9]), "#3, #9");
        let many: Vec<u64> = (0..20).collect();
        assert!(cite(&many).ends_with("… (20 records)"), "{}", cite(&many));
    }

    #[test]
    fn the_worst_verdict_wins() {
        use Verdict::*;
        assert_eq!(worst([Pass, NotApplicable].into_iter()), Pass);
        assert_eq!(worst([Pass, Fail, NotApplicable].into_iter()), Fail);
        assert_eq!(worst([NotApplicable].into_iter()), NotApplicable);
        assert_eq!(worst(std::iter::empty()), NotApplicable);
    }
}
