//! `custos shred <TENANT> --confirm <TENANT>`: crypto-shreds a tenant (or,
//! with `--epoch`, one key epoch) and prints its signed deletion certificate.
//! Re-running an interrupted shred finishes it; re-running a finished one
//! prints its certificate again.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args as ClapArgs;

use super::output::{fail, finish};
use super::setup::{policy, setup, tenant_id};
use crate::config::DeletionState;
use crate::error::{Error, Result};
use crate::format::shred::DestroyOutcome;
use crate::jobs::shred::{
    self, KeyFate, PreviewState, Rewrap, ShredPreview, ShredReport, ShredRequest, ShredTarget,
};
use crate::keys::KeyRef;
use crate::keys::aws_kms::PENDING_WINDOW_DAYS;
use crate::tenant::TenantId;

#[derive(ClapArgs)]
pub struct Args {
    /// The tenant to shred.
    pub tenant: String,
    /// The tenant id again: shredding is irreversible (not needed with --dry-run).
    #[arg(long, value_name = "TENANT", required_unless_present = "dry_run")]
    pub confirm: Option<String>,
    /// Why (recorded in the audit log and the certificate).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Who asked for the erasure (default: the operator running the command).
    #[arg(long, value_name = "WHO")]
    pub requested_by: Option<String>,
    /// Shred one key epoch instead of the tenant (a retired epoch with no snapshot left).
    #[arg(long, value_name = "E")]
    pub epoch: Option<u32>,
    /// With --epoch: move the other epochs to a fresh key (local: <tenant>-<n>) and
    /// destroy the old keys, so no stale copy of the epoch's envelope can be unwrapped.
    #[arg(long, requires = "epoch")]
    pub rewrap: bool,
    /// With --epoch: re-wrap to this key (required under AWS KMS: custos cannot create one).
    #[arg(long, value_name = "KEY-REF", requires = "epoch")]
    pub rewrap_to: Option<String>,
    /// Leave KEY-REF untouched if nothing proves it the tenant's (no key claim
    /// or envelope of the tenant unwraps under it, the key registry has no
    /// entry), instead of refusing the shred. Repeatable. The certificate says
    /// the key was not destroyed.
    #[arg(long = "skip-unproven-key", value_name = "KEY-REF")]
    pub skip_unproven_key: Vec<String>,
    /// AWS KMS ScheduleKeyDeletion waiting period in days, 7 to 30
    /// (default: the policy's deletion.kms_pending_window_days, else 30).
    #[arg(long, value_name = "DAYS")]
    pub pending_window_days: Option<u32>,
    /// Also write the certificate file, byte for byte, to FILE.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Show what the shred would do (keys and their fate, objects in scope);
    /// fence, destroy and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    if !args.dry_run && args.confirm.as_deref() != Some(args.tenant.as_str()) {
        eprintln!(
            "error: --confirm {:?} does not match the tenant {:?}: give the tenant id again to confirm the shred",
            args.confirm.as_deref().unwrap_or_default(),
            args.tenant
        );
        return ExitCode::from(2);
    }
    if let Some(d) = args.pending_window_days
        && !PENDING_WINDOW_DAYS.contains(&d)
    {
        eprintln!("error: --pending-window-days must be from 7 to 30 (AWS KMS limits)");
        return ExitCode::from(2);
    }
    let json = args.json;
    if args.dry_run {
        return finish(json, preview_cmd(config, args).await, print_preview);
    }
    let out = args.out.clone();
    let result = shred_cmd(config, args).await;
    if let (Ok(r), Some(path)) = (&result, &out)
        && let Err(e) = crate::util::write_file_atomic(path, &r.certificate_bytes, 0o644)
    {
        return fail(json, &Error::io(path, e));
    }
    finish(json, result, print)
}

async fn shred_cmd(config: Option<&Path>, args: Args) -> Result<ShredReport> {
    let (s, tenant, policy_key, req) = request(config, args).await?;
    let run = shred::run_job(&s.ctx, &tenant, policy_key.as_ref(), &req).await;
    run.result
}

async fn preview_cmd(config: Option<&Path>, args: Args) -> Result<ShredPreview> {
    let (s, tenant, policy_key, req) = request(config, args).await?;
    shred::preview(&s.ctx, &tenant, policy_key.as_ref(), &req).await
}

/// The shred the arguments ask for, with the tenant's policy key. A tenant
/// under legal hold is refused here, for a dry run too.
async fn request(
    config: Option<&Path>,
    args: Args,
) -> Result<(super::setup::Setup, TenantId, Option<KeyRef>, ShredRequest)> {
    let s = setup(config).await?;
    let tenant = tenant_id(&args.tenant)?;
    let policy = policy(&s.config, &tenant)?;
    let deletion = policy
        .as_ref()
        .map(|p| p.deletion.clone())
        .unwrap_or_default();
    if deletion.legal_hold {
        tracing::warn!(
            event = crate::audit::event::SHRED_REFUSED,
            tenant = %tenant,
            reason = "legal_hold",
            "shred of {tenant} refused: the tenant is under legal hold"
        );
        return Err(Error::LegalHold {
            tenant: tenant.to_string(),
            message: "lift deletion.legal_hold in the tenant's policy first".into(),
        });
    }
    let offboarding = deletion.state == DeletionState::Offboarding;
    let target = match args.epoch {
        None => ShredTarget::Tenant,
        Some(epoch) => ShredTarget::Epoch {
            epoch,
            rewrap: match (&args.rewrap_to, args.rewrap) {
                (Some(k), _) => Some(Rewrap::To(
                    KeyRef::parse(k).map_err(|e| Error::InvalidArgument(e.to_string()))?,
                )),
                (None, true) => Some(Rewrap::FreshLocalKey),
                (None, false) => None,
            },
        },
    };
    let reason = args.reason.unwrap_or_else(|| match (&target, offboarding) {
        (ShredTarget::Tenant, true) => format!(
            "offboarding requested {}",
            deletion
                .requested_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "(no date)".into())
        ),
        (ShredTarget::Tenant, false) => "operator request".into(),
        (ShredTarget::Epoch { epoch, .. }, _) => format!("expired key epoch {epoch}"),
    });
    let req = ShredRequest {
        target,
        reason,
        requested_by: args.requested_by.unwrap_or_else(|| s.ctx.actor.clone()),
        requested_at: if offboarding {
            deletion.requested_at
        } else {
            None
        },
        pending_window_days: args
            .pending_window_days
            .unwrap_or(deletion.kms_pending_window_days),
        legal_hold: false,
        skip_unproven: args
            .skip_unproven_key
            .iter()
            .map(|k| KeyRef::parse(k).map_err(|e| Error::InvalidArgument(e.to_string())))
            .collect::<Result<_>>()?,
    };
    let policy_key = policy.map(|p| p.key);
    Ok((s, tenant, policy_key, req))
}

fn print_preview(p: &ShredPreview) {
    let what = match p.epoch {
        Some(e) => format!("epoch {e} of tenant {}", p.tenant),
        None => format!("tenant {}", p.tenant),
    };
    match p.state {
        PreviewState::Done => println!(
            "{what} is already shredded (certificate {}); nothing to do",
            p.certificate_id.as_deref().unwrap_or("unknown")
        ),
        PreviewState::Resume => println!(
            "{what}: an interrupted shred would be resumed after step {}",
            p.resumes_after.map(|s| s.as_str()).unwrap_or("fence")
        ),
        PreviewState::Start => {
            println!("{what} would be shredded (dry run: nothing changed)");
            for k in &p.keys {
                let fate = match k.action {
                    KeyFate::Destroy => "destroyed",
                    KeyFate::AlreadyGone => "already gone (nothing to do)",
                    KeyFate::LeaveUntouched => "left untouched (--skip-unproven-key)",
                };
                println!("  key {} ({:?}): {fate}", k.key, k.role);
            }
            if let Some(to) = &p.rewrap_to {
                println!("  the other epochs would move to {to}");
            }
            println!(
                "  {} object(s), {} in scope now (Merkle root {})",
                p.objects,
                super::output::human_bytes(p.bytes),
                p.scope_root
            );
        }
    }
}

fn print(r: &ShredReport) {
    let what = match r.epoch {
        Some(e) => format!("epoch {e} of tenant {}", r.tenant),
        None => format!("tenant {}", r.tenant),
    };
    if r.already_done {
        println!(
            "{what} was already shredded (certificate {})",
            r.certificate_id
        );
    } else {
        println!("{what} shredded (certificate {})", r.certificate_id);
    }
    println!(
        "  guarantee: {}",
        match r.guarantee {
            shred::GuaranteeKind::KeysDestroyed =>
                "keys destroyed: every copy of the data is unrecoverable",
            shred::GuaranteeKind::EnvelopeDeleted => {
                "envelope deleted: the key that wrapped it lives on (see the certificate's pending note)"
            }
            shred::GuaranteeKind::KeysPartlyDestroyed => {
                "keys partly destroyed: keys whose ownership was not proven were left untouched (see the pending note)"
            }
        }
    );
    for k in &r.keys {
        let how = match (k.outcome, k.action) {
            (DestroyOutcome::NotFound, _) => "not found (already gone)".to_owned(),
            (DestroyOutcome::AlreadyDestroyed, _) => {
                "already destroyed before this shred (ownership unproven: not touched)".to_owned()
            }
            (DestroyOutcome::NotDestroyed, _) => {
                "NOT destroyed: ownership unproven, left untouched (--skip-unproven-key)".to_owned()
            }
            (_, Some(a)) => serde_json::to_value(a)
                .ok()
                .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
                .unwrap_or_default(),
            _ => "destroyed".to_owned(),
        };
        let when = k
            .irreversible_at
            .map(|t| format!(", irreversible from {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
            .unwrap_or_default();
        println!("  key {} ({:?}): {how}{when}", k.reference, k.role);
    }
    if let Some(t) = r.irreversible_at {
        println!("  irreversible from {}", t.format("%Y-%m-%d %H:%M:%S UTC"));
    }
    println!(
        "  objects: {} deleted, {} retained (ciphertext under destroyed keys)",
        r.objects_deleted, r.objects_retained
    );
    if let Some(to) = &r.rewrapped_to {
        println!(
            "  the tenant's key is now {to}: set key = \"{to}\" in the policy of {}",
            r.tenant
        );
    }
    println!("  certificate stored at {}", r.certificate_path);
    println!();
    print!("{}", String::from_utf8_lossy(&r.certificate_bytes));
}
