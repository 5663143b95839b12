//! The report as one self-contained HTML page: inline CSS (with print rules:
//! A4, a page per tenant, colours kept) and inline SVG charts; no script,
//! no font, image or style sheet from anywhere else, so it opens offline
//! and prints to PDF as it shows.

use std::fmt::Write;

use super::model::*;
use super::{chart, cite, span};

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
:root { --pass: #1e8449; --fail: #c0392b; --na: #7f8c8d; --line: #d5d8dc; }
* { box-sizing: border-box; }
body { font: 13px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1b1f23; margin: 0 auto; max-width: 1100px; padding: 24px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 2px solid #1b1f23; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 18px 0 6px; }
p.meta, p.note { color: #555; margin: 2px 0; }
table { border-collapse: collapse; width: 100%; margin: 4px 0 10px; }
th, td { border: 1px solid var(--line); padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f2f3f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
.badge { display: inline-block; min-width: 44px; text-align: center; border-radius: 3px; padding: 0 6px; color: #fff; font-weight: 700; font-size: 12px; }
.pass { background: var(--pass); } .fail { background: var(--fail); } .not_applicable { background: var(--na); }
.banner { border: 2px solid var(--fail); background: #fdecea; padding: 8px 12px; margin: 10px 0; }
.ok { border-color: var(--pass); background: #eafaf1; }
.cite { color: #555; font-size: 12px; }
.chart { width: 100%; max-width: 960px; height: auto; }
.chart .tick { font-size: 10px; fill: #555; } .chart .rto { font-size: 11px; fill: #c0392b; font-weight: 700; }
pre { background: #f6f8fa; border: 1px solid var(--line); padding: 8px; white-space: pre-wrap; word-break: break-all; }
section.tenant { break-before: page; }
@page { size: A4; margin: 14mm; }
@media print {
  body { padding: 0; max-width: none; font-size: 11px; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  table, .chart, pre, .banner { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
}
"#;

fn badge(v: Verdict) -> String {
    format!(r#"<span class="badge {}">{}</span>"#, v.as_str(), v.label())
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|v| esc(&v.to_string()))
        .unwrap_or_else(|| "-".into())
}

fn secs(v: Option<f64>) -> String {
    v.map(span).unwrap_or_else(|| "-".into())
}

fn rec(seq: Option<u64>) -> String {
    seq.map(|s| format!("#{s}")).unwrap_or_else(|| "now".into())
}

/// The whole page.
pub fn render(r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>custos compliance report {}</title><style>{CSS}</style></head><body>",
        esc(&r.generated_at.format("%Y-%m-%d").to_string())
    );
    header(&mut h, r);
    for t in &r.tenants {
        tenant(&mut h, t, &r.period);
    }
    audit(&mut h, r);
    h.push_str("</body></html>\n");
    h
}

fn header(h: &mut String, r: &Report) {
    let s = &r.summary;
    let _ = write!(
        h,
        "<h1>Compliance report {}</h1><p class=\"meta\">Period {} to {} · generated {} by custos {} · store <code>{}</code></p>",
        badge(s.verdict),
        time(r.period.since),
        time(r.period.until),
        time(r.generated_at),
        esc(r.custos_version),
        esc(&r.store)
    );
    if s.audit_verified {
        let _ = write!(
            h,
            "<div class=\"banner ok\">Every figure below comes from the audit log, which verified (chain, Merkle tree, signatures, cross-checks); records are cited by sequence number (#n). Computed against the signed checkpoint of {} records at the end of this report.</div>",
            r.audit.checkpoint.as_ref().map_or(0, |c| c.size)
        );
    } else {
        let _ = write!(
            h,
            "<div class=\"banner\"><strong>The audit log did not verify: {}.</strong> The figures below come from records that cannot be trusted until that is resolved (run <code>custos audit verify</code>).</div>",
            esc(&r.audit.verification.summary)
        );
    }
    let _ = write!(h, "<p>{}</p>", esc(&s.counts()));
    // The overview: one row per tenant, one column per control.
    let ids: Vec<&'static str> = {
        let mut ids = Vec::new();
        for t in &r.tenants {
            for c in &t.assessment.controls {
                if !ids.contains(&c.id) {
                    ids.push(c.id);
                }
            }
        }
        ids
    };
    if !r.tenants.is_empty() {
        h.push_str("<table><tr><th>Tenant</th><th>Verdict</th>");
        for id in &ids {
            // "backup.rpo" as "backup" over "rpo": the matrix fits the page.
            let (area, name) = id.split_once('.').unwrap_or((id, ""));
            let _ = write!(h, "<th class=\"mono\">{}<br>{}</th>", esc(area), esc(name));
        }
        h.push_str("</tr>");
        for t in &r.tenants {
            let _ = write!(
                h,
                "<tr><td><strong>{}</strong></td><td>{}</td>",
                esc(t.tenant.as_str()),
                badge(t.verdict)
            );
            for id in &ids {
                match t.assessment.controls.iter().find(|c| c.id == *id) {
                    Some(c) => {
                        let _ = write!(h, "<td>{}</td>", badge(c.verdict));
                    }
                    None => h.push_str("<td>-</td>"),
                }
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
    }
    let c = &r.controls;
    let d = |s: f64| super::limit(std::time::Duration::from_secs_f64(s));
    let _ = write!(
        h,
        "<p class=\"note\">Thresholds (<code>[controls]</code>): backup_max_gap {}, backup_min_success_rate {}, drill_max_interval {}, drill_rto_met {}, cmk_max_age {}, epoch_max_age {}, read_data_max_age {}.</p>",
        d(c.backup_max_gap_seconds),
        c.backup_min_success_rate,
        d(c.drill_max_interval_seconds),
        c.drill_rto_met,
        d(c.cmk_max_age_seconds),
        d(c.epoch_max_age_seconds),
        d(c.read_data_max_age_seconds)
    );
}

fn tenant(h: &mut String, t: &TenantReport, period: &Period) {
    let _ = write!(
        h,
        "<section class=\"tenant\"><h2>Tenant {} {}</h2><p class=\"meta\">State: {}",
        esc(t.tenant.as_str()),
        badge(t.verdict),
        esc(t.state)
    );
    if let Some(p) = &t.policy {
        let _ = write!(
            h,
            " · policy <code>{}</code>: backup {}, drill {}, RTO {}, CMK rotation {}, new epoch {}",
            esc(&p.file),
            opt(&p.backup_schedule),
            opt(&p.drill_schedule),
            secs(p.rto_seconds),
            opt(&p.cmk_every),
            opt(&p.epoch_every)
        );
    }
    if let Some(e) = &t.policy_error {
        let _ = write!(h, " · policy does not load: {}", esc(e));
    }
    h.push_str(
        "</p><table><tr><th>Control</th><th>Verdict</th><th>Finding</th><th>Records</th></tr>",
    );
    for c in &t.assessment.controls {
        let _ = write!(
            h,
            "<tr><td><strong>{}</strong><br><span class=\"cite mono\">{}</span></td><td>{}</td><td>{}</td><td class=\"cite\">{}</td></tr>",
            esc(&c.title),
            esc(c.id),
            badge(c.verdict),
            esc(&c.finding),
            esc(&cite(&c.evidence))
        );
    }
    h.push_str("</table>");
    backups(h, &t.assessment.backups);
    drills(h, &t.assessment.drills, period);
    keys(h, &t.assessment.keys);
    deletions(h, &t.assessment.deletions);
    integrity(h, &t.assessment.integrity);
    h.push_str("</section>");
}

fn backups(h: &mut String, b: &Backups) {
    let _ = write!(
        h,
        "<h3>Backups</h3><table><tr><th>Runs in the period</th><th>Succeeded</th><th>Failed</th><th>Success rate</th><th>Last success</th><th>Achieved RPO</th></tr><tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td></tr></table><p class=\"cite\">Runs: {}</p>",
        b.runs,
        b.succeeded,
        b.failed,
        b.success_rate_text(),
        b.last_success
            .as_ref()
            .map(|l| format!(
                "{} <span class=\"cite\">#{}{}</span>",
                time(l.time),
                l.seq,
                l.snapshot
                    .as_deref()
                    .map(|s| format!(", snapshot {}", esc(&s[..s.len().min(12)])))
                    .unwrap_or_default()
            ))
            .unwrap_or_else(|| "never".into()),
        secs(b.achieved_rpo_seconds),
        esc(&cite(&b.evidence))
    );
    if !b.gaps.is_empty() {
        h.push_str("<table><tr><th>Without a successful backup from</th><th>to</th><th>for</th><th>Records</th></tr>");
        for g in &b.gaps {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"cite\">{} → {}</td></tr>",
                time(g.from),
                time(g.until),
                span(g.seconds),
                rec(g.from_seq),
                rec(g.until_seq)
            );
        }
        h.push_str("</table>");
    }
    if !b.failures.is_empty() {
        h.push_str("<table><tr><th>Failed run</th><th>Kind</th><th>Error</th><th>Record</th></tr>");
        for f in &b.failures {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"cite\">#{}</td></tr>",
                time(f.time),
                opt(&f.error_kind),
                opt(&f.error),
                f.seq
            );
        }
        h.push_str("</table>");
    }
}

fn drills(h: &mut String, d: &Drills, period: &Period) {
    h.push_str("<h3>Restore drills</h3>");
    if let Some(svg) = chart::restore_times(&d.drills, period) {
        h.push_str(&svg);
        h.push_str("<p class=\"note\">Dots: restore time of each drill (green passed, red failed); dashed: its RTO; triangles: drills that failed before restoring.</p>");
    }
    if d.drills.is_empty() {
        h.push_str("<p>No drill ran in the period.</p>");
    } else {
        h.push_str("<table><tr><th>Drill</th><th>Outcome</th><th>Reason</th><th>Mode</th><th>Restore</th><th>RTO</th><th>RTO met</th><th>Verify command</th><th>Records</th></tr>");
        for x in &d.drills {
            let verify = esc(&x.verify_outcome());
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{verify}</td><td class=\"cite\">{}#{}</td></tr>",
                time(x.time),
                badge(if x.outcome == "passed" {
                    Verdict::Pass
                } else {
                    Verdict::Fail
                }),
                opt(&x.reason),
                opt(&x.mode),
                secs(x.restore_seconds),
                secs(x.rto_seconds),
                match x.rto_met {
                    Some(true) => "yes",
                    Some(false) => "<strong>no</strong>",
                    None => "-",
                },
                x.begin_seq.map(|b| format!("#{b} → ")).unwrap_or_default(),
                x.seq
            );
        }
        h.push_str("</table>");
    }
    if let Some(l) = &d.last_passed {
        let _ = write!(
            h,
            "<p class=\"note\">Last passed drill: {} <span class=\"cite\">#{}</span></p>",
            time(l.time),
            l.seq
        );
    }
}

fn keys(h: &mut String, k: &Keys) {
    h.push_str("<h3>Keys</h3>");
    match &k.cmk {
        Some(c) => {
            let _ = write!(
                h,
                "<p>CMK <code>{}</code>: {} {} <span class=\"cite\">#{}</span>, {:.0} days old.</p>",
                esc(&c.key),
                esc(c.by),
                time(c.since),
                c.since_seq,
                c.age_days.floor()
            );
        }
        None => h.push_str("<p>No record names the tenant's CMK.</p>"),
    }
    if !k.keys.is_empty() {
        h.push_str("<table><tr><th>Key</th><th>Role</th><th>Provider</th><th>Held by</th><th>State now</th><th>Residency</th><th>Bound</th></tr>");
        for c in &k.keys {
            let state = esc(&c.state_text());
            let _ = write!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}{}</td><td>{state}</td><td>{}</td><td class=\"cite\">{}</td></tr>",
                esc(&c.key),
                esc(c.role),
                opt(&c.provider),
                opt(&c.holder),
                match c.network {
                    Some(true) => " (over the network)",
                    _ => "",
                },
                esc(&c.residency),
                rec(c.seq).replace("now", "-")
            );
        }
        h.push_str("</table>");
    }
    if !k.epochs.is_empty() {
        h.push_str("<table><tr><th>Epoch</th><th>Started</th><th>Age</th><th>State</th><th>Records</th></tr>");
        for e in &k.epochs {
            let _ = write!(
                h,
                "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{:.0} days</td><td>{}</td><td class=\"cite\">{}</td></tr>",
                e.epoch,
                time(e.created_at),
                e.age_days.floor(),
                esc(e.state),
                e.records()
            );
        }
        h.push_str("</table>");
    }
    if k.rotations.is_empty() {
        h.push_str("<p class=\"note\">No rotation in the period.</p>");
    } else {
        h.push_str("<table><tr><th>Rotation</th><th>Action</th><th>Key</th><th>Epoch</th><th>Envelopes re-wrapped</th><th>Record</th></tr>");
        for x in &k.rotations {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"mono\">{}</td><td>{} → {}</td><td>{} → {}</td><td class=\"num\">{}</td><td class=\"cite\">#{}</td></tr>",
                time(x.time),
                esc(&x.action),
                opt(&x.key_before),
                opt(&x.key_after),
                opt(&x.epoch_before),
                opt(&x.epoch_after),
                opt(&x.envelopes_rewrapped),
                x.seq
            );
        }
        h.push_str("</table>");
    }
}

fn deletions(h: &mut String, d: &[Deletion]) {
    h.push_str("<h3>Deletions</h3>");
    if d.is_empty() {
        h.push_str("<p class=\"note\">No shred in the period.</p>");
        return;
    }
    h.push_str("<table><tr><th>Certificate</th><th>Subject</th><th>Requested</th><th>Reason</th><th>Guarantee</th><th>Verified</th><th>Certificate now</th><th>Records</th></tr>");
    for x in d {
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td>{}{}</td><td class=\"cite\">{}</td></tr>",
            esc(&x.certificate_id),
            x.subject_label(),
            time(x.requested_at),
            x.requested_by
                .as_deref()
                .map(|b| format!(" by {}", esc(b)))
                .unwrap_or_default(),
            opt(&x.reason),
            opt(&x.guarantee),
            match x.verified {
                Some(true) => "yes",
                Some(false) => "<strong>no</strong>",
                None => "-",
            },
            badge(if x.certificate_status == "valid" {
                Verdict::Pass
            } else {
                Verdict::Fail
            }),
            x.certificate_message
                .as_deref()
                .map(|m| format!(" {}", esc(m)))
                .unwrap_or_else(|| format!(" {}", esc(x.certificate_status))),
            esc(&cite(&x.evidence))
        );
    }
    h.push_str("</table>");
}

fn integrity(h: &mut String, i: &Integrity) {
    h.push_str("<h3>Integrity</h3>");
    match &i.read_data_complete {
        Some(c) => {
            let _ = write!(
                h,
                "<p>Every pack read and verified since {} ({}) <span class=\"cite\">{}</span>.</p>",
                time(c.since),
                esc(&c.reads.join(", ")),
                esc(&cite(&c.evidence))
            );
        }
        None => h.push_str("<p>No check has read every pack.</p>"),
    }
    if i.checks.is_empty() {
        h.push_str("<p class=\"note\">No check in the period.</p>");
        return;
    }
    h.push_str("<table><tr><th>Check</th><th>Outcome</th><th>Read data</th><th>Packs read</th><th>Faults</th><th>Record</th></tr>");
    for c in &i.checks {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}{}</td><td>{}</td><td class=\"num\">{} / {}</td><td class=\"num\">{}</td><td class=\"cite\">#{}</td></tr>",
            time(c.time),
            badge(if c.outcome == "success" {
                Verdict::Pass
            } else {
                Verdict::Fail
            }),
            c.error_kind
                .as_deref()
                .map(|k| format!(" <span class=\"mono\">{}</span>", esc(k)))
                .unwrap_or_default(),
            opt(&c.read_data),
            opt(&c.packs_read),
            opt(&c.packs),
            opt(&c.faults),
            c.seq
        );
    }
    h.push_str("</table>");
}

fn audit(h: &mut String, r: &Report) {
    let a = &r.audit;
    let _ = write!(
        h,
        "<section class=\"audit\"><h2>Audit log</h2><p>Log <code>{}</code>: {} records used. Verification: {} {}.</p>",
        esc(&a.log),
        a.records,
        badge(if a.verification.ok {
            Verdict::Pass
        } else {
            Verdict::Fail
        }),
        esc(&a.verification.summary)
    );
    if !a.verification.faults.is_empty() {
        h.push_str("<table><tr><th>Fault</th><th>Record</th><th>Message</th></tr>");
        for f in &a.verification.faults {
            let kind = serde_json::to_value(f.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&kind),
                opt(&f.seq),
                esc(&f.message)
            );
        }
        h.push_str("</table>");
    }
    if !a.verification.cross_checks.is_empty() {
        h.push_str("<table><tr><th>Copy</th><th>Held to</th><th>Outcome</th></tr>");
        for c in &a.verification.cross_checks {
            let outcome = serde_json::to_value(c.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&c.copy),
                esc(&c.against),
                esc(&outcome)
            );
        }
        h.push_str("</table>");
    }
    match &a.checkpoint {
        Some(cp) => {
            let _ = write!(
                h,
                "<h3>Computed against this signed checkpoint</h3><p>Records #0 to #{} (tree size {}), Merkle root <code>{}</code>.</p><pre>{}</pre><p>Verifier key: <code>{}</code></p><p class=\"note\">To check: save the checkpoint above to a file and run <code>custos audit verify --witness FILE</code> (with <code>--public-key</code> holding the verifier key, on a copy of the log); every record cited here is <code>custos audit show --json</code> line n+1.</p>",
                cp.size.saturating_sub(1),
                cp.size,
                esc(&cp.root),
                esc(&cp.text),
                esc(&cp.verifier)
            );
        }
        None => h.push_str("<p><strong>No signed checkpoint covers these records.</strong></p>"),
    }
    h.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<script>"a" & 'b'</script>"#),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }
}
