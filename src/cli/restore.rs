//! `custos restore <TENANT> <SNAPSHOT|latest> --target DIR | --target-url URL`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args as ClapArgs;
use futures::FutureExt;
use futures::future::BoxFuture;

use super::output::{TerminalProgress, finish, human_bytes};
use super::setup::{Setup, policy, setup, tenant_id};
use crate::config::PathGlobs;
use crate::error::Result;
use crate::jobs::restore::{self, RestoreOptions, RestoreReport};
use crate::jobs::restore_to_store::{self, RestoreToStoreOptions, RestoreToStoreReport};
use crate::jobs::runner::{JobSpec, run_job};
use crate::repo::Repo;
use crate::report::{JobKind, JobOutput};

#[derive(ClapArgs)]
#[command(group(
    clap::ArgGroup::new("to").required(true).args(["target", "target_url"])
))]
pub struct Args {
    pub tenant: String,
    /// A snapshot id (or unique prefix of at least 4 hex digits), or `latest`.
    pub snapshot: String,
    /// Directory to restore into (created if missing; must be empty unless --overwrite).
    #[arg(long, value_name = "DIR")]
    pub target: Option<PathBuf>,
    /// Restore into objects under an object-store prefix instead
    /// (s3://bucket/prefix/ or file:///dir/; must be empty unless --overwrite).
    #[arg(long, value_name = "URL")]
    pub target_url: Option<String>,
    /// Restore only paths matching this glob (repeatable); a matching directory brings its subtree.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Replace existing files in the target.
    #[arg(long)]
    pub overwrite: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    let json = args.json;
    if let Some(url) = args.target_url.clone() {
        return finish(json, restore_to_store(config, args, url).await, |r| {
            println!(
                "restored snapshot {} into {}: {} files ({} in parts), {} ({:.1}s); every blob verified{}",
                r.snapshot.map(|s| s.short()).unwrap_or_default(),
                r.target_url,
                r.files,
                r.multipart_uploads,
                human_bytes(r.bytes),
                r.duration_ms as f64 / 1000.0,
                if r.skipped_symlinks > 0 {
                    format!("; {} symlinks skipped", r.skipped_symlinks)
                } else {
                    String::new()
                }
            );
        });
    }
    let target = args.target.clone().unwrap_or_default();
    finish(json, restore(config, args).await, |r| {
        println!(
            "restored snapshot {} into {}: {} files{}, {} dirs, {} symlinks, {} ({:.1}s); every blob verified",
            r.snapshot.map(|s| s.short()).unwrap_or_default(),
            target.display(),
            r.files,
            if r.hardlinks > 0 {
                format!(" ({} of them hard links)", r.hardlinks)
            } else {
                String::new()
            },
            r.dirs,
            r.symlinks,
            human_bytes(r.bytes),
            r.duration_ms as f64 / 1000.0
        );
    })
}

async fn restore(config: Option<&Path>, args: Args) -> Result<RestoreReport> {
    let s = setup(config).await?;
    let opts = RestoreOptions {
        target: args.target.clone().unwrap_or_default(),
        include: args.include.clone(),
        overwrite: args.overwrite,
    };
    run_restore(&s, &args, move |repo, wanted, progress| {
        async move {
            let started = Instant::now();
            let (snapshot, index) = repo.find_snapshot_and_load_index(wanted).await?;
            restore::run_with(repo, &index, &snapshot, &opts, None, progress, started).await
        }
        .boxed()
    })
    .await
}

async fn restore_to_store(
    config: Option<&Path>,
    args: Args,
    url: String,
) -> Result<RestoreToStoreReport> {
    let s = setup(config).await?;
    let opts = RestoreToStoreOptions {
        target: crate::source::object_store::open_url(&url, &s.ctx.s3)?,
        target_url: url,
        include: args.include.clone(),
        overwrite: args.overwrite,
    };
    run_restore(&s, &args, move |repo, wanted, progress| {
        async move { restore_to_store::run(repo, wanted, &opts, progress).await }.boxed()
    })
    .await
}

/// Runs a restore job of the snapshot the arguments name, with progress on
/// the terminal; `write` finds it (the name passed on) and restores it to
/// its destination.
async fn run_restore<T, W>(s: &Setup, args: &Args, write: W) -> Result<T>
where
    T: JobOutput,
    W: for<'r> FnOnce(&'r Repo, &'r str, &'r TerminalProgress) -> BoxFuture<'r, Result<T>> + Send,
{
    // A bad glob is refused before anything is read.
    PathGlobs::new(&args.include)
        .map_err(|e| crate::error::Error::InvalidArgument(format!("--include: {e}")))?;
    let tenant = tenant_id(&args.tenant)?;
    let policy = policy(&s.config, &tenant)?;
    let progress = TerminalProgress::new(args.json, "restoring");
    let spec = JobSpec {
        tenant: &tenant,
        job: JobKind::Restore,
        policy_key: policy.as_ref().map(|p| &p.key),
        init_with: None,
    };
    let (progress_ref, wanted) = (&progress, args.snapshot.as_str());
    let run = run_job(&s.ctx, spec, |repo, _lease, _| {
        async move { write(repo, wanted, progress_ref).await }.boxed()
    })
    .await;
    progress.done();
    run.result
}
