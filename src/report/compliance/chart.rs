//! The restore-time chart: each drill's restore seconds over the period
//! against its RTO, as inline SVG (no script, no external reference). The
//! y axis is logarithmic: restores of a fraction of a second and RTOs of
//! hours share one chart.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use super::html::esc;
use super::model::{Drill, Period};
use super::span;

const W: f64 = 720.0;
const H: f64 = 230.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 36.0;

/// The chart of `drills` over `period`; `None` when no drill has a restore
/// time or an RTO to draw.
pub fn restore_times(drills: &[Drill], period: &Period) -> Option<String> {
    let values: Vec<f64> = drills
        .iter()
        .flat_map(|d| [d.restore_seconds, d.rto_seconds])
        .flatten()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if values.is_empty() {
        return None;
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    let lo = min.log10().floor() as i32;
    let hi = (max.log10().ceil() as i32).max(lo + 1);
    let t0 = period.since.timestamp_millis() as f64;
    let t1 = (period.until.timestamp_millis() as f64).max(t0 + 1.0);
    let x = |t: DateTime<Utc>| {
        LEFT + (t.timestamp_millis() as f64 - t0) / (t1 - t0) * (W - LEFT - RIGHT)
    };
    let y = |v: f64| {
        let v = v.max(10f64.powi(lo));
        TOP + (hi as f64 - v.log10()) / (hi - lo) as f64 * (H - TOP - BOTTOM)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="Restore time of each drill against its RTO">"#
    );
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="#fafafa" stroke="#bbb"/>"##,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    for k in lo..=hi {
        let yy = y(10f64.powi(k));
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e3e3e3"/><text x="{}" y="{:.1}" class="tick" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            decade(k)
        );
    }
    for i in 0..=4 {
        let t =
            period.since + chrono::Duration::milliseconds(((t1 - t0) * f64::from(i) / 4.0) as i64);
        let xx = x(t);
        // The outer labels keep inside the picture.
        let anchor = match i {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = write!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{}" y2="{}" stroke="#bbb"/><text x="{xx:.1}" y="{}" class="tick" text-anchor="{anchor}">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 4.0,
            H - BOTTOM + 18.0,
            t.format("%Y-%m-%d")
        );
    }
    // The RTO, as a step line: each drill's RTO holds until the next drill.
    let rtos: Vec<(DateTime<Utc>, f64)> = drills
        .iter()
        .filter_map(|d| d.rto_seconds.filter(|r| *r > 0.0).map(|r| (d.time, r)))
        .collect();
    if let Some(&(_, first)) = rtos.first() {
        let mut path = format!("M{LEFT:.1},{:.1}", y(first));
        for (t, r) in &rtos {
            let _ = write!(path, " H{:.1} V{:.1}", x(*t), y(*r));
        }
        let _ = write!(path, " H{:.1}", W - RIGHT);
        let _ = write!(
            s,
            r##"<path d="{path}" fill="none" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" class="rto">RTO</text>"##,
            LEFT + 4.0,
            (y(first) - 5.0).max(TOP + 11.0)
        );
    }
    for d in drills {
        let label = format!(
            "record {}: {} {}{}",
            d.seq,
            d.time.format("%Y-%m-%d %H:%M"),
            d.outcome,
            d.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        let colour = if d.outcome == "passed" {
            "#1e8449"
        } else {
            "#c0392b"
        };
        match d.restore_seconds {
            Some(r) => {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="4.5" fill="{colour}"><title>{} — restore {}</title></circle>"#,
                    x(d.time),
                    y(r),
                    esc(&label),
                    span(r)
                );
            }
            // A drill that failed before restoring: a mark on the time axis.
            None => {
                let (xx, yy) = (x(d.time), H - BOTTOM);
                let _ = write!(
                    s,
                    r#"<path d="M{:.1},{:.1} l5,-9 l5,9 z" fill="{colour}"><title>{} — no restore</title></path>"#,
                    xx - 5.0,
                    yy - 1.0,
                    esc(&label)
                );
            }
        }
    }
    let _ = write!(
        s,
        r#"<text x="14" y="{:.1}" class="tick" transform="rotate(-90 14 {:.1})" text-anchor="middle">restore time (log scale)</text></svg>"#,
        (H - BOTTOM + TOP) / 2.0,
        (H - BOTTOM + TOP) / 2.0
    );
    Some(s)
}

/// The label of 10^k seconds.
fn decade(k: i32) -> String {
    match k {
        ..=-4 => format!("1e{k}s"),
        -3 => "1ms".into(),
        -2 => "10ms".into(),
        -1 => "100ms".into(),
        0 => "1s".into(),
        1 => "10s".into(),
        2 => "100s".into(),
        3 => "1000s".into(),
        _ => format!("1e{k}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drill(day: i64, restore: Option<f64>, rto: Option<f64>, passed: bool) -> Drill {
        Drill {
            time: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc)
                + chrono::Duration::days(day),
            seq: day as u64,
            begin_seq: None,
            outcome: if passed { "passed" } else { "failed" }.into(),
            reason: (!passed).then(|| "rto_exceeded".into()),
            snapshot: None,
            mode: None,
            restore_seconds: restore,
            rto_seconds: rto,
            rto_met: None,
            verify_command: None,
            figures_recorded: true,
        }
    }

    #[test]
    fn draws_points_and_the_rto_without_scripts_or_links() {
        let period = Period {
            since: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            until: DateTime::parse_from_rfc3339("2026-01-15T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
        };
        let svg = restore_times(
            &[
                drill(2, Some(0.05), Some(600.0), true),
                drill(9, Some(0.07), Some(0.001), false),
                drill(10, None, None, false),
            ],
            &period,
        )
        .unwrap();
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains(">RTO<"), "{svg}");
        assert!(svg.contains("1ms") && svg.contains("1000s"), "{svg}");
        assert!(!svg.contains("<script") && !svg.contains("http"), "{svg}");
        assert!(restore_times(&[drill(3, None, None, false)], &period).is_none());
    }
}
