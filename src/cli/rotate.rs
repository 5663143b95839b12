//! `custos rotate <TENANT> --cmk | --replace-cmk KEY | --new-epoch`.

use std::path::Path;
use std::process::ExitCode;

use clap::Args as ClapArgs;
use futures::FutureExt;

use super::output::{finish, human_bytes};
use super::setup::{policy, setup, tenant_id};
use crate::error::{Error, Result};
use crate::jobs::rotate::{self, RotateAction, RotateReport};
use crate::jobs::runner::{JobSpec, run_job};
use crate::keys::KeyRef;
use crate::report::JobKind;

#[derive(ClapArgs)]
#[command(group(
    clap::ArgGroup::new("what").required(true).args(["cmk", "replace_cmk", "new_epoch"])
))]
pub struct Args {
    pub tenant: String,
    /// KMS-native rotation (AWS RotateKeyOnDemand; local: a new key version), then re-wrap every envelope.
    #[arg(long)]
    pub cmk: bool,
    /// Move every envelope under a new customer-supplied key (e.g. aws-kms:alias/acme-2).
    #[arg(long, value_name = "KEY-REF")]
    pub replace_cmk: Option<String>,
    /// A new data key (epoch) for new data; deduplication starts afresh in it.
    #[arg(long)]
    pub new_epoch: bool,
    /// With --replace-cmk: once every envelope is verified under the new key,
    /// schedule the old key's deletion after DAYS (AWS: 7-30; local keys are destroyed at once).
    #[arg(long, value_name = "DAYS", requires = "replace_cmk")]
    pub schedule_old_key_deletion: Option<u32>,
    /// Show what would be done; write nothing, rotate nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    let json = args.json;
    finish(json, rotate(config, args).await, print)
}

fn print(r: &RotateReport) {
    let verb = if r.dry_run {
        "would re-wrap"
    } else {
        "re-wrapped"
    };
    match r.action {
        "new_epoch" => println!(
            "tenant {}: epoch {} -> {}{}",
            r.tenant,
            r.epoch_before,
            r.epoch_after,
            if r.dry_run { " (dry run)" } else { "" }
        ),
        _ => println!(
            "tenant {}: key {}{} -> {}{}",
            r.tenant,
            r.key_before,
            r.key_version_before
                .as_ref()
                .map(|v| format!(" (version {v})"))
                .unwrap_or_default(),
            r.key_after,
            r.key_version_after
                .as_ref()
                .map(|v| format!(" (version {v})"))
                .unwrap_or_default(),
        ),
    }
    for e in &r.envelopes {
        if r.action == "new_epoch" {
            println!(
                "  epoch {}: data key created under {} ({})",
                e.epoch,
                e.key_after,
                human_bytes(e.bytes_written)
            );
        } else if r.dry_run {
            println!(
                "  epoch {}: {verb} {} -> {}",
                e.epoch, e.key_before, e.key_after
            );
        } else {
            println!(
                "  epoch {}: {verb} {} -> {} ({})",
                e.epoch,
                e.key_before,
                e.key_after,
                human_bytes(e.bytes_written)
            );
        }
    }
    if !r.dry_run {
        println!(
            "  {} envelope(s) re-wrapped, {} verified; {} written in {} object(s){} ({} ms)",
            r.envelopes_rewrapped,
            r.envelopes_verified,
            human_bytes(r.bytes_written),
            r.objects_written,
            if r.resumed {
                "; finished an interrupted rotation"
            } else {
                ""
            },
            r.duration_ms
        );
    }
    if let Some(d) = &r.old_key_deletion {
        println!(
            "  old key {}: {:?}, effective {}",
            r.key_before, d.action, d.effective_at
        );
    }
}

async fn rotate(config: Option<&Path>, args: Args) -> Result<RotateReport> {
    let s = setup(config).await?;
    let tenant = tenant_id(&args.tenant)?;
    let policy = policy(&s.config, &tenant)?;
    let action = match (&args.replace_cmk, args.cmk, args.new_epoch) {
        (Some(k), _, _) => RotateAction::ReplaceCmk {
            new_key: KeyRef::parse(k).map_err(|e| Error::InvalidArgument(e.to_string()))?,
            schedule_old_key_deletion: args.schedule_old_key_deletion,
        },
        (None, true, _) => RotateAction::Cmk,
        _ => RotateAction::NewEpoch,
    };
    // A move checks the policy's key itself: the policy may already name the new key.
    let replace_to = match &action {
        RotateAction::ReplaceCmk { new_key, .. } => Some(new_key.clone()),
        _ => None,
    };
    let policy_key = policy.as_ref().map(|p| p.key.clone());
    let spec = JobSpec {
        tenant: &tenant,
        job: JobKind::Rotate,
        policy_key: if replace_to.is_some() {
            None
        } else {
            policy_key.as_ref()
        },
        init_with: None,
    };
    let dry_run = args.dry_run;
    let (action_ref, policy_key_ref, replace_ref) = (&action, &policy_key, &replace_to);
    let run = run_job(&s.ctx, spec, |repo, lease, _| {
        async move {
            if let (Some(pk), Some(new)) = (policy_key_ref, replace_ref) {
                // The shred's refusal first: it says what to do before anything else.
                rotate::refuse_during_epoch_shred(repo.descriptor())?;
                rotate::check_policy_for_replace(repo.descriptor(), pk, new)?;
            }
            if dry_run {
                rotate::preview(repo, action_ref).await
            } else {
                rotate::run(repo, lease, action_ref).await
            }
        }
        .boxed()
    })
    .await;
    run.result
}
