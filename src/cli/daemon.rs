//! `custos daemon [--once]`: the scheduler (see `crate::daemon`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;

use super::output::{fail, print_envelope};
use crate::config::Config;
use crate::daemon::{self, Options, Summary};

#[derive(ClapArgs)]
pub struct Args {
    /// Run every job that is due now (a job that never ran is due), wait for
    /// them, print the run report and exit: 0 if all succeeded, 1 otherwise.
    #[arg(long)]
    pub once: bool,
    /// Start even if the store fails the conditional-write probe. Only one
    /// daemon may then use the store: leases cannot keep a second one out.
    #[arg(long)]
    pub single_node: bool,
    /// Serve Prometheus metrics (/metrics) and health (/healthz) on ADDR,
    /// e.g. 127.0.0.1:9464 (overrides daemon.metrics_listen; off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// With --once: print the run report as one JSON document.
    #[arg(long, requires = "once")]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    let cfg = match Config::discover(config) {
        Ok(c) => c,
        Err(e) => return fail(args.json, &e.into()),
    };
    for w in &cfg.warnings {
        tracing::warn!(event = "config.warning", "{w}");
    }
    let reports = cfg.state_dir.join("reports");
    let opts = Options {
        once: args.once,
        single_node: args.single_node,
        metrics_listen: args.metrics_listen,
    };
    let summary = match daemon::run(cfg, opts).await {
        Ok(s) => s,
        Err(e) => return fail(args.json, &e),
    };
    if args.once {
        if args.json {
            print_envelope(!summary.failed(), Some(&summary), None);
        } else {
            print_report(&summary, &reports);
        }
    }
    let code = if args.once && summary.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    if summary.abandoned > 0 {
        // Abandoned jobs may sit in blocking code (a backup's reader thread)
        // that dropping the runtime would wait for: leave now. Everything the
        // daemon keeps is written; the store is consistent by its write order.
        std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
    code
}

fn print_report(s: &Summary, reports: &Path) {
    use crate::daemon::state::RunOutcome::*;
    if s.runs.is_empty() && s.report.is_some() {
        println!("custos daemon --once: no job due ({} tenants)", s.tenants);
    } else if s.runs.is_empty() {
        print!("custos daemon --once: nothing due ({} tenants", s.tenants);
        match &s.next {
            Some(next) => println!("; next: {next})"),
            None => println!(")"),
        }
    } else {
        let failed = s.runs.iter().filter(|r| r.outcome.is_failure()).count();
        println!(
            "custos daemon --once: {} job(s) of {} tenant(s): {} succeeded, {} skipped (ran elsewhere), {} failed",
            s.runs.len(),
            s.tenants,
            s.count(Success),
            s.count(Skipped),
            failed
        );
        let width = s
            .runs
            .iter()
            .map(|r| r.tenant.as_str().len())
            .max()
            .unwrap_or(6)
            .max(6);
        for r in &s.runs {
            let duration = r
                .duration_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into());
            println!(
                "  {:width$}  {:7} {:11} {:>7}  {}",
                r.tenant.as_str(),
                r.job.as_str(),
                r.outcome.as_str(),
                duration,
                r.detail
            );
        }
        println!("job reports: {}/<tenant>/", reports.display());
    }
    if let Some(r) = &s.report {
        println!(
            "compliance report ({}): {}{}",
            r.outcome.as_str(),
            r.detail,
            if r.files.is_empty() {
                String::new()
            } else {
                let files: Vec<String> = r.files.iter().map(|f| f.display().to_string()).collect();
                format!("\n  {}", files.join("\n  "))
            }
        );
    }
    if s.policies_rejected > 0 {
        println!(
            "{} policy problem(s) refused (see the policy.rejected events; `custos policy validate`)",
            s.policies_rejected
        );
    }
}
