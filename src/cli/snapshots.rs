//! `custos snapshots <TENANT>`: lists snapshots, oldest first.

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use futures::FutureExt;
use serde::Serialize;

use super::output::{finish, human_bytes};
use super::setup::{policy, setup, tenant_id};
use crate::error::Result;
use crate::format::snapshot::Snapshot;
use crate::repo::{Fault, Repo};

#[derive(ClapArgs)]
pub struct Args {
    pub tenant: String,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Listing {
    tenant: String,
    snapshots: Vec<Snapshot>,
    faults: Vec<Fault>,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    let result = list(config, &args).await;
    let faulty = matches!(&result, Ok(l) if !l.faults.is_empty());
    let code = finish(args.json, result, |l| {
        println!(
            "{:<10} {:<20} {:>5} {:>9} {:>10}  HOST",
            "ID", "TIME (UTC)", "EPOCH", "FILES", "SIZE"
        );
        for s in &l.snapshots {
            println!(
                "{:<10} {:<20} {:>5} {:>9} {:>10}  {}",
                s.id.short(),
                s.time.format("%Y-%m-%d %H:%M:%S"),
                s.epoch,
                s.summary.files,
                human_bytes(s.summary.bytes_in),
                s.hostname
            );
        }
        println!("{} snapshot(s) of tenant {}", l.snapshots.len(), l.tenant);
        for f in &l.faults {
            eprintln!("fault: {} ({}): {}", f.object, f.kind, f.message);
        }
    });
    if faulty { ExitCode::FAILURE } else { code }
}

async fn list(config: Option<&Path>, args: &Args) -> Result<Listing> {
    let s = setup(config).await?;
    let tenant = tenant_id(&args.tenant)?;
    let policy = policy(&s.config, &tenant)?;
    // A reader: registered before it lists, so no forget deletes under it.
    let (snapshots, faults) = crate::jobs::runner::with_reader(
        &s.ctx,
        &tenant,
        policy.as_ref().map(|p| &p.key),
        "snapshots",
        |repo: &Repo| repo.list_snapshots().boxed(),
    )
    .await?;
    Ok(Listing {
        tenant: tenant.to_string(),
        snapshots,
        faults,
    })
}
