//! The report as Markdown: the same sections as the HTML page, as tables.

use std::fmt::Write;

use super::model::*;
use super::{cite, span};

/// Makes text safe inside a table cell: no pipe, no line break.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| cell(&v.to_string()))
        .unwrap_or_else(|| "-".into())
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn secs(v: Option<f64>) -> String {
    v.map(span).unwrap_or_else(|| "-".into())
}

pub fn render(r: &Report) -> String {
    let mut m = String::new();
    let s = &r.summary;
    let _ = writeln!(m, "# Compliance report: {}\n", s.verdict.label());
    let _ = writeln!(
        m,
        "Period {} to {}; generated {} by custos {}; store `{}`.\n",
        time(r.period.since),
        time(r.period.until),
        time(r.generated_at),
        r.custos_version,
        r.store
    );
    if s.audit_verified {
        let _ = writeln!(
            m,
            "Every figure comes from the audit log, which verified; records are cited by sequence number (#n).\n"
        );
    } else {
        let _ = writeln!(
            m,
            "**The audit log did not verify: {}.** The figures come from records that cannot be trusted until that is resolved (`custos audit verify`).\n",
            cell(&r.audit.verification.summary)
        );
    }
    let _ = writeln!(m, "{}\n", s.counts());
    m.push_str("| Tenant | Verdict | Failed controls |\n| --- | --- | --- |\n");
    for t in &r.tenants {
        let failed: Vec<&str> = t
            .assessment
            .controls
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.id)
            .collect();
        let _ = writeln!(
            m,
            "| {} | {} | {} |",
            t.tenant,
            t.verdict.label(),
            if failed.is_empty() {
                "-".into()
            } else {
                failed.join(", ")
            }
        );
    }
    for t in &r.tenants {
        tenant(&mut m, t);
    }
    audit(&mut m, r);
    m
}

fn tenant(m: &mut String, t: &TenantReport) {
    let _ = writeln!(
        m,
        "\n## Tenant {}: {} ({})\n",
        t.tenant,
        t.verdict.label(),
        t.state
    );
    m.push_str("| Control | Verdict | Finding | Records |\n| --- | --- | --- | --- |\n");
    for c in &t.assessment.controls {
        let _ = writeln!(
            m,
            "| {} (`{}`) | {} | {} | {} |",
            cell(&c.title),
            c.id,
            c.verdict.label(),
            cell(&c.finding),
            cite(&c.evidence)
        );
    }
    let b = &t.assessment.backups;
    let _ = writeln!(
        m,
        "\n### Backups\n\n| Runs | Succeeded | Failed | Success rate | Last success | Achieved RPO |\n| --- | --- | --- | --- | --- | --- |\n| {} | {} | {} | {} | {} | {} |",
        b.runs,
        b.succeeded,
        b.failed,
        b.success_rate_text(),
        b.last_success
            .as_ref()
            .map(|l| format!("{} (#{})", time(l.time), l.seq))
            .unwrap_or_else(|| "never".into()),
        secs(b.achieved_rpo_seconds)
    );
    if !b.gaps.is_empty() {
        m.push_str("\n| Without a successful backup from | to | for | Records |\n| --- | --- | --- | --- |\n");
        for g in &b.gaps {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} → {} |",
                time(g.from),
                time(g.until),
                span(g.seconds),
                g.from_seq.map_or("-".into(), |s| format!("#{s}")),
                g.until_seq.map_or("now".into(), |s| format!("#{s}"))
            );
        }
    }
    m.push_str("\n### Restore drills\n\n");
    if t.assessment.drills.drills.is_empty() {
        m.push_str("No drill ran in the period.\n");
    } else {
        m.push_str("| Drill | Outcome | Reason | Restore | RTO | RTO met | Verify command | Record |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for d in &t.assessment.drills.drills {
            let verify = cell(&d.verify_outcome());
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | #{} |",
                time(d.time),
                d.outcome,
                opt(&d.reason),
                secs(d.restore_seconds),
                secs(d.rto_seconds),
                opt(&d.rto_met),
                verify,
                d.seq
            );
        }
    }
    let k = &t.assessment.keys;
    m.push_str("\n### Keys\n\n");
    if let Some(c) = &k.cmk {
        let _ = writeln!(
            m,
            "CMK `{}`: {} {} (#{}), {:.0} days old.\n",
            c.key,
            c.by,
            time(c.since),
            c.since_seq,
            c.age_days.floor()
        );
    }
    if !k.keys.is_empty() {
        m.push_str("| Key | Role | Provider | Held by | State now | Residency |\n| --- | --- | --- | --- | --- | --- |\n");
        for c in &k.keys {
            let _ = writeln!(
                m,
                "| `{}` | {} | {} | {} | {} | {} |",
                c.key,
                c.role,
                opt(&c.provider),
                opt(&c.holder),
                cell(&c.state_text()),
                cell(&c.residency)
            );
        }
    }
    if !k.epochs.is_empty() {
        m.push_str(
            "\n| Epoch | Started | Age | State | Records |\n| --- | --- | --- | --- | --- |\n",
        );
        for e in &k.epochs {
            let _ = writeln!(
                m,
                "| {} | {} | {:.0} days | {} | {} |",
                e.epoch,
                time(e.created_at),
                e.age_days.floor(),
                e.state,
                e.records()
            );
        }
    }
    if !k.rotations.is_empty() {
        m.push_str(
            "\n| Rotation | Action | Key | Epoch | Record |\n| --- | --- | --- | --- | --- |\n",
        );
        for r in &k.rotations {
            let _ = writeln!(
                m,
                "| {} | {} | {} → {} | {} → {} | #{} |",
                time(r.time),
                r.action,
                opt(&r.key_before),
                opt(&r.key_after),
                opt(&r.epoch_before),
                opt(&r.epoch_after),
                r.seq
            );
        }
    }
    m.push_str("\n### Deletions\n\n");
    if t.assessment.deletions.is_empty() {
        m.push_str("No shred in the period.\n");
    } else {
        m.push_str("| Certificate | Subject | Requested | Guarantee | Verified | Certificate now | Records |\n| --- | --- | --- | --- | --- | --- | --- |\n");
        for d in &t.assessment.deletions {
            let _ = writeln!(
                m,
                "| `{}` | {} | {} | {} | {} | {}{} | {} |",
                d.certificate_id,
                d.subject_label(),
                time(d.requested_at),
                opt(&d.guarantee),
                opt(&d.verified),
                d.certificate_status,
                d.certificate_message
                    .as_deref()
                    .map(|m| format!(": {}", cell(m)))
                    .unwrap_or_default(),
                cite(&d.evidence)
            );
        }
    }
    m.push_str("\n### Integrity\n\n");
    match &t.assessment.integrity.read_data_complete {
        Some(c) => {
            let _ = writeln!(
                m,
                "Every pack read and verified since {} ({}; {}).\n",
                time(c.since),
                c.reads.join(", "),
                cite(&c.evidence)
            );
        }
        None => m.push_str("No check has read every pack.\n\n"),
    }
    if !t.assessment.integrity.checks.is_empty() {
        m.push_str("| Check | Outcome | Read data | Packs read | Faults | Record |\n| --- | --- | --- | --- | --- | --- |\n");
        for c in &t.assessment.integrity.checks {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} / {} | {} | #{} |",
                time(c.time),
                c.outcome,
                opt(&c.read_data),
                opt(&c.packs_read),
                opt(&c.packs),
                opt(&c.faults),
                c.seq
            );
        }
    }
}

fn audit(m: &mut String, r: &Report) {
    let a = &r.audit;
    let _ = writeln!(
        m,
        "\n## Audit log\n\nLog `{}`: {} records used. Verification: {}: {}.\n",
        a.log,
        a.records,
        if a.verification.ok { "PASS" } else { "FAIL" },
        cell(&a.verification.summary)
    );
    for f in &a.verification.faults {
        let _ = writeln!(m, "- fault: {}", cell(&f.message));
    }
    match &a.checkpoint {
        Some(cp) => {
            let _ = writeln!(
                m,
                "Computed against the signed checkpoint of {} records (root `{}`), verifier key `{}`:\n\n```text\n{}```",
                cp.size, cp.root, cp.verifier, cp.text
            );
        }
        None => m.push_str("**No signed checkpoint covers these records.**\n"),
    }
}
