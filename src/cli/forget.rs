//! `custos forget <TENANT>` (retention) and `custos prune <TENANT>` (data).

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use futures::FutureExt;
use serde::Serialize;

use super::output::{finish, human_bytes};
use super::setup::{policy, setup, tenant_id};
use crate::config::KeepRules;
use crate::error::{Error, Result};
use crate::jobs::forget::{self, ForgetReport};
use crate::jobs::prune::{self, PruneReport};
use crate::jobs::runner::{JobSpec, run_job};
use crate::pipeline::packer::PackerConfig;
use crate::report::{JobKind, JobOutput};

#[derive(ClapArgs)]
pub struct ForgetArgs {
    pub tenant: String,
    /// The keep rules; without any `--keep-*` flag, the policy's `[retention]`.
    #[command(flatten)]
    pub keep: Option<KeepRules>,
    /// Prune afterwards: remove data no remaining snapshot needs.
    #[arg(long)]
    pub prune: bool,
    /// Show what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(ClapArgs)]
pub struct PruneArgs {
    pub tenant: String,
    /// Show what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct ForgetPrune {
    forget: ForgetReport,
    prune: Option<PruneReport>,
}

impl JobOutput for ForgetPrune {}

pub async fn run_forget(config: Option<&Path>, args: ForgetArgs) -> ExitCode {
    let json = args.json;
    finish(json, forget(config, args).await, |r| {
        for d in &r.forget.decisions {
            let what = if d.keep {
                format!("keep   ({})", d.reasons.join(", "))
            } else {
                "remove".to_owned()
            };
            println!(
                "{} {}  {}",
                d.snapshot.short(),
                d.time.format("%Y-%m-%d %H:%M:%S"),
                what
            );
        }
        let verb = if r.forget.dry_run {
            "would remove"
        } else {
            "removed"
        };
        println!("{} kept, {} {verb}", r.forget.kept, r.forget.removed);
        if let Some(d) = &r.forget.deferred {
            print_deferred("forget", d);
        }
        if let Some(p) = &r.prune {
            print_prune(p);
        }
    })
}

async fn forget(config: Option<&Path>, args: ForgetArgs) -> Result<ForgetPrune> {
    let s = setup(config).await?;
    let tenant = tenant_id(&args.tenant)?;
    let policy = policy(&s.config, &tenant)?;
    let rules = match (args.keep, &policy) {
        (Some(r), _) => r,
        (None, Some(p)) => p.retention.rules.clone(),
        (None, None) => {
            return Err(Error::InvalidArgument(format!(
                "tenant {tenant} has no policy: give the retention rules as --keep-* flags"
            )));
        }
    };
    let do_prune = args.prune;
    let dry_run = args.dry_run;
    let packer = PackerConfig::for_policy(policy.as_ref());
    let spec = JobSpec {
        tenant: &tenant,
        job: JobKind::Forget,
        policy_key: policy.as_ref().map(|p| &p.key),
        init_with: None,
    };
    let rules_ref = &rules;
    run_job(&s.ctx, spec, |repo, lease, _| {
        async move {
            // A dry run prints the plans; nothing is executed.
            let forget = match dry_run {
                true => forget::plan(repo, rules_ref).await?.preview(),
                false => forget::run(repo, lease, rules_ref).await?,
            };
            let prune = match (do_prune, dry_run) {
                (false, _) => None,
                (true, true) => Some(prune::plan(repo).await?.preview()),
                (true, false) => Some(prune::run(repo, lease, packer).await?),
            };
            Ok(ForgetPrune { forget, prune })
        }
        .boxed()
    })
    .await
    .result
}

pub async fn run_prune(config: Option<&Path>, args: PruneArgs) -> ExitCode {
    let json = args.json;
    let result = async {
        let s = setup(config).await?;
        let tenant = tenant_id(&args.tenant)?;
        let policy = policy(&s.config, &tenant)?;
        let packer = PackerConfig::for_policy(policy.as_ref());
        let spec = JobSpec {
            tenant: &tenant,
            job: JobKind::Prune,
            policy_key: policy.as_ref().map(|p| &p.key),
            init_with: None,
        };
        let dry_run = args.dry_run;
        run_job(&s.ctx, spec, |repo, lease, _| {
            async move {
                match dry_run {
                    true => Ok(prune::plan(repo).await?.preview()),
                    false => prune::run(repo, lease, packer).await,
                }
            }
            .boxed()
        })
        .await
        .result
    }
    .await;
    finish(json, result, print_prune)
}

fn print_prune(p: &PruneReport) {
    let verb = if p.dry_run { "would delete" } else { "deleted" };
    println!(
        "prune: {} snapshots need {} blobs; of {} packs {verb} {} unused, {} unreferenced, repacked {}; {} freed, {} written",
        p.snapshots,
        p.blobs_used,
        p.packs_total,
        p.packs_deleted,
        p.packs_unreferenced_deleted,
        p.packs_repacked,
        human_bytes(p.bytes_freed),
        human_bytes(p.bytes_written)
    );
    if let Some(d) = &p.deferred {
        print_deferred("prune", d);
    }
}

/// A deleter that deferred says so on its summary, not only in a log event:
/// "deleted 0" alone would read as "nothing to delete". A reader record that
/// never goes away (one planted in the store, a reader on a host that died)
/// defers every run; `custos unlock` shows and, with `--force`, removes it.
fn print_deferred(job: &str, d: &crate::jobs::deletion::Deferred) {
    println!(
        "{job} deferred: {} object(s) kept for {} reader(s) still reading after {}s: {}; the next forget or prune deletes them (`custos unlock` lists reader records)",
        d.objects,
        d.readers.len(),
        d.waited_s,
        d.readers.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        forget: ForgetArgs,
    }

    fn keep(args: &[&str]) -> Option<KeepRules> {
        let argv = ["custos", "acme"].iter().chain(args);
        Cli::try_parse_from(argv).unwrap().forget.keep
    }

    /// No `--keep-*` flag means the policy's rules; any flag, even one that
    /// says 0, means the flags alone (so `--keep-last 0` is refused as
    /// keeping nothing rather than quietly falling back to the policy).
    #[test]
    fn keep_flags_replace_the_policy_only_when_given() {
        assert_eq!(keep(&[]), None);
        assert_eq!(keep(&["--prune", "--dry-run"]), None);
        let zero = keep(&["--keep-last", "0"]).unwrap();
        assert!(zero.keeps_nothing());
        let rules = keep(&["--keep-daily", "3", "--keep-within", "2d"]).unwrap();
        assert_eq!(
            rules,
            KeepRules {
                keep_daily: 3,
                keep_within: Some(std::time::Duration::from_secs(2 * 86_400)),
                ..KeepRules::default()
            }
        );
        assert!(Cli::try_parse_from(["custos", "acme", "--keep-last", "-1"]).is_err());
    }
}
