//! `custos backup <TENANT>`: backs up the sources of the tenant's policy,
//! initialising the tenant on its first backup.

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use futures::FutureExt;

use super::output::{TerminalProgress, finish, human_bytes};
use super::setup::{require_policy, setup, tenant_id};
use crate::error::Result;
use crate::jobs::backup::{self, BackupOptions, BackupReport};
use crate::jobs::runner::{JobSpec, run_job};
use crate::report::JobKind;

#[derive(ClapArgs)]
pub struct Args {
    /// The tenant whose sources to back up.
    pub tenant: String,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Read every file, even those unchanged since the last snapshot.
    #[arg(long)]
    pub force_read: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    let json = args.json;
    finish(json, backup(config, args).await, |r| {
        let s = &r.summary;
        println!(
            "snapshot {} saved (tenant epoch {})",
            r.snapshot.short(),
            r.epoch
        );
        println!(
            "  {} files, {} dirs, {} symlinks, {} in; {} read, {} new, {} stored in {} packs ({:.1}s)",
            s.files,
            s.dirs,
            s.symlinks,
            human_bytes(s.bytes_in),
            s.files_read,
            human_bytes(s.bytes_new),
            human_bytes(s.bytes_stored),
            s.packs_new,
            s.duration_ms as f64 / 1000.0
        );
        if s.skipped_special + s.unreadable > 0 {
            println!(
                "  skipped: {} special files, {} unreadable",
                s.skipped_special, s.unreadable
            );
        }
        for w in &r.warnings {
            println!("  warning: {w}");
        }
    })
}

async fn backup(config: Option<&Path>, args: Args) -> Result<BackupReport> {
    let s = setup(config).await?;
    let tenant = tenant_id(&args.tenant)?;
    let policy = require_policy(&s.config, &tenant)?;
    // This command reads only its tenant's policy file; another file naming
    // the same key is refused as `policy validate` (and the daemon) would.
    crate::repo::ownership::check_policies(&s.config.policies_dir, &tenant, &policy.key)?;
    // Before the tenant is initialised: a bad source must leave nothing behind.
    backup::checked_sources(&policy.sources)?;
    let progress = TerminalProgress::new(args.json, "backing up");
    let opts = BackupOptions {
        tags: args.tags,
        force_read: args.force_read,
        ..BackupOptions::from_policy(&policy)
    };
    let spec = JobSpec {
        tenant: &tenant,
        job: JobKind::Backup,
        policy_key: Some(&policy.key),
        init_with: Some(&policy.key),
    };
    let progress_ref = &progress;
    let run = run_job(&s.ctx, spec, |repo, lease, _| {
        backup::run(repo, lease, opts, progress_ref).boxed()
    })
    .await;
    progress.done();
    run.result
}
