//! `[controls]` and `[report]` of custos.toml: the thresholds the compliance
//! report holds every tenant to, and when the daemon writes that report.
//!
//! ```toml
//! [controls]
//! backup_max_gap = "26h"            # no two successful backups further apart
//! backup_min_success_rate = 0.95    # of the backup runs in the period
//! drill_max_interval = "31d"        # a passed drill at least this often
//! drill_rto_met = true              # every drill restored within its RTO
//! cmk_max_age = "365d"              # CMK: new material or a new key at least this often
//! epoch_max_age = "35d"             # the current data key (epoch) at most this old
//! read_data_max_age = "31d"         # every pack read by `check --read-data` this recently
//! [report]
//! schedule = "0 6 * * 1"            # the daemon writes the report then (none: never)
//! output_dir = "/var/lib/custos/compliance"   # default <state_dir>/compliance
//! formats = ["html", "json"]        # any of html, json, md
//! since = "90d"                     # the period each report covers
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::paths::{check_path_text, resolve};
use super::schedule::Schedule;
use super::units::{serde_duration, truncate};
use super::walk::{Diags, Table};

const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3_600);

/// The thresholds of the compliance report's controls (`[controls]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Controls {
    /// Longest time allowed between two successful backups (and from the last
    /// one to now): the recovery point objective the report checks.
    #[serde(with = "serde_duration")]
    pub backup_max_gap: Duration,
    /// Smallest share of backup runs in the period that must succeed (0 to 1).
    pub backup_min_success_rate: f64,
    /// Longest time allowed between two passed restore drills (and from the
    /// last one to now).
    #[serde(with = "serde_duration")]
    pub drill_max_interval: Duration,
    /// Every drill in the period that restored must have met its RTO (and
    /// have one); false: the RTO control is not evaluated.
    pub drill_rto_met: bool,
    /// Oldest a tenant's CMK may be: time since it was created, given new
    /// material (`rotate --cmk`) or replaced (`rotate --replace-cmk`).
    #[serde(with = "serde_duration")]
    pub cmk_max_age: Duration,
    /// Oldest the current key epoch (data key) may be.
    #[serde(with = "serde_duration")]
    pub epoch_max_age: Duration,
    /// Longest time since every pack was last read and verified
    /// (`check --read-data`, or a full round of `--read-data-subset` slices).
    #[serde(with = "serde_duration")]
    pub read_data_max_age: Duration,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            backup_max_gap: 26 * HOUR,
            backup_min_success_rate: 0.95,
            drill_max_interval: 31 * DAY,
            drill_rto_met: true,
            cmk_max_age: 365 * DAY,
            epoch_max_age: 35 * DAY,
            read_data_max_age: 31 * DAY,
        }
    }
}

/// The formats the report is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportFormat {
    /// One self-contained page (inline CSS and SVG), printable to PDF.
    Html,
    /// The stable document of docs/report.md.
    Json,
    /// Markdown tables.
    Md,
}

impl ReportFormat {
    pub const ALL: [ReportFormat; 3] = [ReportFormat::Html, ReportFormat::Json, ReportFormat::Md];

    pub fn as_str(self) -> &'static str {
        match self {
            ReportFormat::Html => "html",
            ReportFormat::Json => "json",
            ReportFormat::Md => "md",
        }
    }

    pub fn parse(text: &str) -> Option<ReportFormat> {
        ReportFormat::ALL.into_iter().find(|f| f.as_str() == text)
    }

    /// The file name extension.
    pub fn extension(self) -> &'static str {
        self.as_str()
    }
}

/// When and where the daemon writes the compliance report (`[report]`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportSettings {
    /// Cron schedule; none: the daemon writes no report.
    pub schedule: Option<Schedule>,
    /// Where the daemon writes `custos-report-<time>.<format>` (created 0700).
    pub output_dir: PathBuf,
    pub formats: Vec<ReportFormat>,
    /// The period a report covers, ending when it is made.
    #[serde(with = "serde_duration")]
    pub since: Duration,
}

impl ReportSettings {
    /// The defaults for a state directory: no schedule, `<state_dir>/compliance`,
    /// HTML and JSON, 90 days.
    pub fn defaults(state_dir: &Path) -> Self {
        ReportSettings {
            schedule: None,
            output_dir: state_dir.join("compliance"),
            formats: vec![ReportFormat::Html, ReportFormat::Json],
            since: 90 * DAY,
        }
    }
}

pub(super) const CONTROL_KEYS: &[&str] = &[
    "backup_max_gap",
    "backup_min_success_rate",
    "drill_max_interval",
    "drill_rto_met",
    "cmk_max_age",
    "epoch_max_age",
    "read_data_max_age",
];

pub(super) const REPORT_KEYS: &[&str] = &["schedule", "output_dir", "formats", "since"];

/// `[controls]`: every key optional; durations from 1m to 1000 years.
pub(super) fn parse_controls(d: &mut Diags<'_>, t: &Table<'_>) -> Controls {
    t.check_keys(d, CONTROL_KEYS);
    let mut c = Controls::default();
    for (key, slot) in [
        ("backup_max_gap", &mut c.backup_max_gap),
        ("drill_max_interval", &mut c.drill_max_interval),
        ("cmk_max_age", &mut c.cmk_max_age),
        ("epoch_max_age", &mut c.epoch_max_age),
        ("read_data_max_age", &mut c.read_data_max_age),
    ] {
        let Some(item) = t.get(key) else { continue };
        let Some(v) = d.duration(&item) else { continue };
        // Shorter than a minute is a typo ("26" for "26h"), not a control.
        if v < Duration::from_secs(60) {
            d.err(&item, "must be at least 1m");
        } else {
            *slot = v;
        }
    }
    if let Some(item) = t.get("backup_min_success_rate")
        && let Some(v) = d.float(&item)
    {
        if (0.0..=1.0).contains(&v) {
            c.backup_min_success_rate = v;
        } else {
            d.err(
                &item,
                format!("must be from 0 to 1 (a share of runs, e.g. 0.95), found {v}"),
            );
        }
    }
    if let Some(item) = t.get("drill_rto_met")
        && let Some(v) = d.bool(&item)
    {
        c.drill_rto_met = v;
    }
    c
}

/// `[report]`: `output_dir` relative to the file; `formats` a non-empty
/// list without repeats; `since` from 1 day to 10 years.
pub(super) fn parse_report(
    d: &mut Diags<'_>,
    t: &Table<'_>,
    base: &Path,
    state_dir: &Path,
) -> ReportSettings {
    t.check_keys(d, REPORT_KEYS);
    let mut r = ReportSettings::defaults(state_dir);
    if let Some(item) = t.get("schedule") {
        r.schedule = d.schedule(&item);
    }
    if let Some(item) = t.get("output_dir")
        && let Some(text) = d.str(&item)
    {
        match check_path_text(text) {
            Ok(()) => r.output_dir = resolve(base, text),
            Err(e) => d.err(&item, e),
        }
    }
    if let Some(item) = t.get("formats")
        && let Some(items) = d.str_array(&item)
    {
        let mut formats = Vec::new();
        for (item, text) in items {
            match ReportFormat::parse(text) {
                Some(f) if formats.contains(&f) => {
                    d.err(&item, format!("{text:?} is listed twice"))
                }
                Some(f) => formats.push(f),
                None => d.err(
                    &item,
                    format!(
                        "unknown format {:?} (expected html, json or md)",
                        truncate(text, 20)
                    ),
                ),
            }
        }
        if formats.is_empty() {
            d.err(&item, "lists no format (expected some of html, json, md)");
        } else {
            r.formats = formats;
        }
    }
    if let Some(item) = t.get("since")
        && let Some(v) = d.duration(&item)
    {
        if v < DAY || v > 3_653 * DAY {
            d.err(&item, "must be from 1d to 3653d (ten years)");
        } else {
            r.since = v;
        }
    }
    r
}
