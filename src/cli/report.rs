//! `custos report [--tenant T]... [--since 90d] --format html|json|md
//! [--output FILE]`: the compliance report (docs/report.md), on stdout or
//! into FILE.
//!
//! Exit status: 0 the report was made (whatever its verdicts: they are its
//! content), 1 an error, or a report made from an audit log that did not
//! verify (the report is still written, and says so), 2 invalid usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args as ClapArgs;

use super::output::fail;
use super::setup::print_warnings;
use crate::config::{Config, ReportFormat};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::report::compliance::{self, Request, model::Report};
use crate::tenant::TenantId;

#[derive(ClapArgs)]
#[command(
    after_help = "Exit status: 0 the report was made, 1 an error or an audit log that \
                        did not verify (the report is still written), 2 invalid usage."
)]
pub struct Args {
    /// Only this tenant (repeat for several; default: every tenant the audit log or a policy names).
    #[arg(long, value_name = "TENANT")]
    pub tenant: Vec<String>,
    /// Start of the period: RFC 3339, or a duration before now such as 90d
    /// (default: [report] since, 90d).
    #[arg(long, value_name = "DURATION|TIME")]
    pub since: Option<String>,
    /// html (one self-contained page), json (docs/report.md) or md.
    #[arg(long, value_name = "html|json|md", value_parser = parse_format)]
    pub format: ReportFormat,
    /// Write the report to FILE (replaced atomically) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn parse_format(s: &str) -> std::result::Result<ReportFormat, String> {
    ReportFormat::parse(s).ok_or_else(|| format!("{s:?}: expected html, json or md"))
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    // A JSON report's errors are JSON too (the envelope), as `audit show --json`'s.
    let json = args.format == ReportFormat::Json;
    let cfg = match Config::discover(config) {
        Ok(c) => c,
        Err(e) => return fail(json, &e.into()),
    };
    print_warnings(&cfg);
    let now = crate::hooks::now();
    let since = match &args.since {
        Some(s) => match super::audit::parse_since(s, now) {
            Ok(t) if t > now => return usage(&format!("--since {s:?} is after now")),
            Ok(t) => t,
            Err(e) => return usage(&e.to_string()),
        },
        None => match chrono::Duration::from_std(cfg.report.since)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
        {
            Some(t) => t,
            None => return usage("[report] since reaches before the start of time"),
        },
    };
    let mut tenants = Vec::new();
    for t in &args.tenant {
        match TenantId::new(t) {
            Ok(t) => tenants.push(t),
            Err(e) => return usage(&format!("--tenant: {e}")),
        }
    }
    if let Some(out) = &args.output
        && let Err(e) = check_output(out)
    {
        return fail(json, &e);
    }
    let req = Request {
        tenants,
        since,
        now,
    };
    let report = match make(&cfg, &req).await {
        Ok(r) => r,
        Err(e) => return fail(json, &e),
    };
    let text = compliance::render(&report, args.format);
    match &args.output {
        None => print!("{text}"),
        Some(out) => {
            if let Err(e) = compliance::write_file(out, &text) {
                return fail(json, &e);
            }
            eprintln!("report written to {}: {}", out.display(), report.one_line());
        }
    }
    if report.summary.audit_verified {
        ExitCode::SUCCESS
    } else {
        if args.output.is_none() {
            eprintln!(
                "error: the audit log did not verify ({}); the report says so",
                report.audit.verification.summary
            );
        }
        ExitCode::FAILURE
    }
}

async fn make(cfg: &Config, req: &Request) -> Result<Report> {
    // The report verifies the log itself: one that no longer opens for
    // appends (tampered) is what it must still report on.
    let ctx = Context::from_config_unaudited(cfg).await?;
    compliance::build(cfg, &ctx, req).await
}

/// Refuses an `--output` whose directory does not exist before any work is
/// done (a mistyped path is not created).
fn check_output(out: &Path) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "--output {}: {} is not a directory",
                out.display(),
                dir.display()
            )));
        }
        Err(e) => {
            return Err(Error::InvalidArgument(format!(
                "--output {}: cannot use its directory {}: {e}",
                out.display(),
                dir.display()
            )));
        }
    }
    if out.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--output {}: is a directory; name a file",
            out.display()
        )));
    }
    Ok(())
}
