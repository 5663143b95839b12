//! `custos check <TENANT> [--read-data]`: reports every fault; exit 1 if any.

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use futures::FutureExt;

use super::output::{Failure, finish, human_bytes, print_envelope};
use super::setup::{policy, setup, tenant_id};
use crate::error::{Error, Result};
use crate::jobs::check::{self, CheckReport, ReadData};
use crate::jobs::runner::{JobSpec, run_job};
use crate::report::JobKind;

#[derive(ClapArgs)]
pub struct Args {
    pub tenant: String,
    /// Also read every pack and verify every blob.
    #[arg(long)]
    pub read_data: bool,
    /// Read only the packs in slice N of M (e.g. 3/7), so M runs read everything.
    #[arg(long, value_name = "N/M", conflicts_with = "read_data")]
    pub read_data_subset: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    let json = args.json;
    let result = check(config, args).await;
    // Faults found: the check ran, but failed. The JSON document says so
    // ("ok": false) and keeps the full report beside the error, as a failed
    // drill does.
    if let Ok(report) = &result
        && let Some((kind, message)) = report.failure_summary()
    {
        if json {
            print_envelope(
                false,
                Some(report),
                Some(Failure {
                    kind: kind.as_str(),
                    message: message.clone(),
                }),
            );
        } else {
            print_human(report);
            eprintln!("error: {message}");
        }
        return ExitCode::FAILURE;
    }
    finish(json, result, print_human)
}

fn print_human(r: &CheckReport) {
    for f in &r.faults {
        println!("fault: {} ({}): {}", f.object, f.kind, f.message);
    }
    println!(
        "{} snapshots, {} index files, {} packs, {} blobs; {} packs read ({}); {} unreferenced packs; {}",
        r.snapshots,
        r.index_files,
        r.packs,
        r.blobs,
        r.packs_read,
        human_bytes(r.bytes_read),
        r.unreferenced_packs,
        if r.ok() {
            "no faults".to_owned()
        } else {
            format!("{} FAULT(S)", r.faults.len())
        }
    );
}

fn parse_subset(s: &str) -> Result<ReadData> {
    let bad = || {
        Error::InvalidArgument(format!(
            "--read-data-subset {s:?}: expected N/M with 1 <= N <= M"
        ))
    };
    let (n, m) = s.split_once('/').ok_or_else(bad)?;
    let (n, m): (u32, u32) = (
        n.trim().parse().map_err(|_| bad())?,
        m.trim().parse().map_err(|_| bad())?,
    );
    if n == 0 || m == 0 || n > m {
        return Err(bad());
    }
    Ok(ReadData::Subset { n, of: m })
}

async fn check(config: Option<&Path>, args: Args) -> Result<CheckReport> {
    let read = match (&args.read_data_subset, args.read_data) {
        (Some(s), _) => parse_subset(s)?,
        (None, true) => ReadData::All,
        (None, false) => ReadData::None,
    };
    let s = setup(config).await?;
    let tenant = tenant_id(&args.tenant)?;
    let policy = policy(&s.config, &tenant)?;
    let spec = JobSpec {
        tenant: &tenant,
        job: JobKind::Check,
        policy_key: policy.as_ref().map(|p| &p.key),
        init_with: None,
    };
    run_job(&s.ctx, spec, |repo, _, _| check::run(repo, read).boxed())
        .await
        .result
}
