//! `custos drill <TENANT> [...]` runs a restore drill; `custos drill history
//! <TENANT>` lists past drills. A tenant literally named `history` is drilled
//! with `custos drill -- history` (after `--` the word is a tenant, never the
//! subcommand).
//!
//! Exit status: 0 the drill passed, 1 it failed (any reason), 2 invalid usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args as ClapArgs, Subcommand};
use futures::FutureExt;

use super::output::{Failure, TerminalProgress, fail, human_bytes, print_envelope};
use super::setup::{policy, setup, tenant_id};
use crate::config::units::{format_duration, parse_duration};
use crate::config::{Config, DrillPolicy};
use crate::error::Result;
use crate::jobs::drill::{self, DrillOptions, DrillReport, Scope, SnapshotPick};
use crate::jobs::runner::{JobSpec, run_job};
use crate::report::JobKind;
use crate::state::StateDir;

#[derive(ClapArgs)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Exit status: 0 the drill passed, 1 it failed, 2 invalid usage.\n\
                  A tenant named \"history\" is drilled with: custos drill -- history"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<DrillCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand)]
pub enum DrillCommand {
    /// Past drills of a tenant, newest first (from the job reports).
    History(HistoryArgs),
}

#[derive(ClapArgs)]
pub struct RunArgs {
    /// The tenant to drill.
    #[arg(required = true)]
    pub tenant: Option<String>,
    /// `latest`, `random` (within --within), or a snapshot id or unique prefix
    /// (default: the policy's drill.pick).
    #[arg(long, value_name = "latest|random|ID")]
    pub snapshot: Option<String>,
    /// With --snapshot random: pick among snapshots taken this recently
    /// (default: the policy's drill.within, 30d).
    #[arg(long, value_name = "DURATION")]
    pub within: Option<String>,
    /// Restore and verify every file (the default unless the policy says sample).
    #[arg(long, conflicts_with = "sample")]
    pub full: bool,
    /// Restore and verify N random files (plus those the verify command names).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: Option<u32>,
    /// Seed for the random snapshot and sample (repeats a past drill's choice).
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// Directory to create the drill's private scratch directory in
    /// (default: the policy's drill.scratch, else $TMPDIR or /tmp).
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// Keep the restored files (the report names the directory).
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs)]
pub struct HistoryArgs {
    pub tenant: String,
    /// Show only the newest N drills.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    match args.command {
        Some(DrillCommand::History(h)) => history(config, h),
        None => drill_command(config, args.run).await,
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

/// Turns the policy's drill settings and the command line into options.
fn options(args: &RunArgs, p: &DrillPolicy) -> std::result::Result<DrillOptions, String> {
    let mut opts = DrillOptions::from_policy(p);
    let within = match &args.within {
        Some(text) => Some(parse_duration(text).map_err(|e| format!("--within: {e}"))?),
        None => None,
    };
    if let Some(s) = &args.snapshot {
        opts.pick = match s.as_str() {
            "latest" => SnapshotPick::Latest,
            "random" => SnapshotPick::Random {
                within: within.unwrap_or(p.within),
            },
            id if id.len() >= 4
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
            {
                SnapshotPick::Id(id.to_owned())
            }
            other => {
                return Err(format!(
                    "--snapshot {other:?}: expected latest, random, or a snapshot id (at least 4 lowercase hex digits)"
                ));
            }
        };
    }
    if let Some(w) = within {
        match &mut opts.pick {
            SnapshotPick::Random { within } => *within = w,
            _ => return Err("--within applies only to --snapshot random".into()),
        }
    }
    if args.full {
        opts.scope = Scope::Full;
    }
    if let Some(n) = args.sample {
        opts.scope = Scope::Sample { files: n };
    }
    opts.seed = args.seed;
    if let Some(t) = &args.target {
        opts.scratch = Some(std::path::absolute(t).unwrap_or_else(|_| t.clone()));
    }
    opts.keep = args.keep;
    Ok(opts)
}

async fn drill_command(config: Option<&Path>, args: RunArgs) -> ExitCode {
    let json = args.json;
    let tenant_arg = args.tenant.clone().unwrap_or_default();
    let s = match setup(config).await {
        Ok(s) => s,
        Err(e) => return fail(json, &e),
    };
    let tenant = match tenant_id(&tenant_arg) {
        Ok(t) => t,
        Err(e) => return fail(json, &e),
    };
    let policy = match policy(&s.config, &tenant) {
        Ok(p) => p,
        Err(e) => return fail(json, &e),
    };
    let default_policy = DrillPolicy::default();
    let opts = match options(&args, policy.as_ref().map_or(&default_policy, |p| &p.drill)) {
        Ok(o) => o,
        Err(m) => return usage(&m),
    };
    let progress = TerminalProgress::new(json, "drill: restoring");
    let spec = JobSpec {
        tenant: &tenant,
        job: JobKind::Drill,
        policy_key: policy.as_ref().map(|p| &p.key),
        init_with: None,
    };
    let (opts_ref, progress_ref) = (&opts, &progress);
    let run = run_job(&s.ctx, spec, |repo, lease, _| {
        drill::run(repo, lease, opts_ref, progress_ref).boxed()
    })
    .await;
    progress.done();
    let report = match run.result {
        Ok(r) => r,
        // Stopped before the drill began; the runner stored it as a failed drill.
        Err(e) => serde_json::from_value(run.report.result.clone())
            .unwrap_or_else(|_| DrillReport::stopped_by(&tenant, &e)),
    };
    if json {
        // A failed drill's kind is its reason (`error_kind` stays in the result).
        let failure = match (report.reason, &report.message) {
            (Some(reason), Some(message)) => Some(Failure {
                kind: reason.as_str(),
                message: message.clone(),
            }),
            _ => None,
        };
        print_envelope(report.passed_ok(), Some(&report), failure);
    } else {
        print_human(&report);
    }
    if report.passed_ok() {
        ExitCode::SUCCESS
    } else {
        if !json {
            eprintln!(
                "error: drill failed ({}): {}",
                report
                    .reason
                    .unwrap_or(crate::jobs::drill::DrillReason::Internal)
                    .as_str(),
                report.message.as_deref().unwrap_or("")
            );
        }
        ExitCode::FAILURE
    }
}

fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.3}s")
    } else {
        format!("{s:.1}s")
    }
}

/// A number of seconds from a report as a duration ("15m"). Reports are read
/// back from the state directory, so a negative, huge or NaN value is shown
/// as it is rather than panicking `Duration::from_secs_f64`.
fn seconds_text(s: f64) -> String {
    std::time::Duration::try_from_secs_f64(s)
        .map(format_duration)
        .unwrap_or_else(|_| format!("{s}s"))
}

fn print_human(r: &DrillReport) {
    let verdict = match (r.passed_ok(), r.reason) {
        (true, _) => "PASSED".to_owned(),
        (false, Some(reason)) => format!("FAILED ({reason})"),
        (false, None) => "FAILED".to_owned(),
    };
    let snapshot = match (r.snapshot, r.snapshot_time) {
        (Some(id), Some(t)) => format!(
            "snapshot {} ({})",
            id.short(),
            t.format("%Y-%m-%d %H:%M:%SZ")
        ),
        _ => "no snapshot".into(),
    };
    if r.mode.is_empty() {
        // Stopped before the drill began (tenant not initialised, lease held…).
        println!("drill of {} {verdict}: {snapshot}", r.tenant);
    } else {
        println!(
            "drill of {} {verdict}: {snapshot}, pick {}, mode {}, seed {}",
            r.tenant, r.pick, r.mode, r.seed
        );
    }
    if let Some(m) = &r.message {
        println!("  {m}");
    }
    if let Some(s) = &r.sample {
        println!(
            "  sample: {} of {} files ({})",
            s.files,
            s.population,
            human_bytes(s.bytes)
        );
    }
    if let Some(t) = r.restore_seconds {
        let rto = match (r.rto_seconds, r.rto_met) {
            (Some(rto), Some(met)) => format!(
                "; RTO {} {}",
                seconds_text(rto),
                if met { "met" } else { "EXCEEDED" }
            ),
            _ => "; no RTO set".into(),
        };
        println!(
            "  restored {} files, {} dirs, {} symlinks, {} in {}{rto}",
            r.files,
            r.dirs,
            r.symlinks,
            human_bytes(r.bytes),
            seconds(t)
        );
        if r.sample.is_some() {
            println!("  (a sample: the RTO was checked against the sample's restore time)");
        }
    }
    if let Some(v) = r.verify_seconds {
        println!(
            "  verified {} files ({}) on disk against the manifest in {}",
            r.files_verified,
            human_bytes(r.bytes_verified),
            seconds(v)
        );
    }
    if let Some(v) = &r.verify_command {
        let status = if v.passed { "passed" } else { "FAILED" };
        let how = match (v.exit_code, v.signal) {
            _ if v.not_run.is_some() => format!("not run: {}", v.not_run.as_deref().unwrap_or("")),
            _ if v.timed_out => "timed out".into(),
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("signal {s}"),
            (None, None) => "no status".into(),
        };
        println!(
            "  verify command {status} ({how}, {}): {}",
            seconds(v.duration_seconds),
            v.argv
                .iter()
                .map(|a| if a.contains(char::is_whitespace) || a.is_empty() {
                    format!("{a:?}")
                } else {
                    a.clone()
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = v.stdout_tail.trim();
        if !out.is_empty() {
            for line in out.lines().take(5) {
                println!("    | {line}");
            }
        }
    }
    if let Some(s) = &r.scratch
        && let Some(dir) = &s.dir
    {
        let fate = if s.kept {
            "kept"
        } else if s.removed {
            "removed"
        } else {
            "NOT removed"
        };
        println!("  scratch {}: {fate}", dir.display());
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
}

fn history(config: Option<&Path>, args: HistoryArgs) -> ExitCode {
    let json = args.json;
    let result = (|| -> Result<Vec<serde_json::Value>> {
        let config = Config::discover(config)?;
        super::setup::print_warnings(&config);
        let tenant = tenant_id(&args.tenant)?;
        let state = StateDir::open(&config.state_dir)?;
        let mut reports = state.read_reports(&tenant, Some(JobKind::Drill))?;
        if let Some(n) = args.last {
            reports.truncate(n);
        }
        Ok(reports)
    })();
    let reports = match result {
        Ok(r) => r,
        Err(e) => return fail(json, &e),
    };
    if json {
        print_envelope(
            true,
            Some(&serde_json::json!({ "tenant": args.tenant, "drills": reports })),
            None,
        );
        return ExitCode::SUCCESS;
    }
    if reports.is_empty() {
        println!("no drills recorded for {}", args.tenant);
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<20}  {:<7}  {:<22}  {:<8}  {:<6}  {:>7}  {:>10}  {:>9}  {:>9}  VERIFY",
        "STARTED (UTC)",
        "OUTCOME",
        "REASON",
        "SNAPSHOT",
        "MODE",
        "FILES",
        "BYTES",
        "RESTORE",
        "RTO"
    );
    for r in &reports {
        println!("{}", history_line(r));
    }
    ExitCode::SUCCESS
}

/// One line of `drill history` from a stored job report.
fn history_line(job: &serde_json::Value) -> String {
    let d = &job["result"];
    let started = job["started_at"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "?".into());
    let outcome = d["outcome"]
        .as_str()
        .unwrap_or(match job["outcome"].as_str() {
            Some("success") => "passed",
            _ => "failed",
        });
    let reason = d["reason"]
        .as_str()
        .or(job["error_kind"].as_str())
        .filter(|_| outcome != "passed")
        .unwrap_or("-");
    let snapshot = d["snapshot"]
        .as_str()
        .map(|s| s.chars().take(8).collect::<String>())
        .unwrap_or_else(|| "-".into());
    let mode = d["mode"].as_str().filter(|m| !m.is_empty()).unwrap_or("-");
    let files = d["files"]
        .as_u64()
        .map(|n| n.to_string())
        .unwrap_or_default();
    let bytes = d["bytes"].as_u64().map(human_bytes).unwrap_or_default();
    let restore = d["restore_seconds"]
        .as_f64()
        .map(seconds)
        .unwrap_or_else(|| "-".into());
    let rto = d["rto_seconds"]
        .as_f64()
        .map(seconds_text)
        .unwrap_or_else(|| "-".into());
    let verify = match &d["verify_command"] {
        serde_json::Value::Null => "-".to_owned(),
        v => {
            let status = if v["passed"].as_bool() == Some(true) {
                "ok"
            } else {
                "FAILED"
            };
            match v["exit_code"].as_i64() {
                Some(c) => format!("{status} (exit {c})"),
                None => status.to_owned(),
            }
        }
    };
    format!(
        "{started:<20}  {outcome:<7}  {reason:<22}  {snapshot:<8}  {mode:<6}  {files:>7}  {bytes:>10}  {restore:>9}  {rto:>9}  {verify}"
    )
}
