//! `custos unlock <TENANT> [--force]` (restic's name): lists the tenant's
//! lease and reader records and removes the ones that protect nothing: stale
//! (expired, or not a record at all) or held by a provably dead process of
//! this host. With `--force` it also removes live-looking ones, after
//! printing who holds them: their job then fails (`lease_contended` before it
//! commits, `reader_lost` at its end) rather than go on unprotected.
//!
//! The lease is never deleted: it is marked released with a conditional
//! update of the version read (a lease renewed or taken over meanwhile is
//! left alone), as the lease module requires. Reader records have random ids
//! written by their reader alone, so they are deleted. Every removal is
//! recorded in the audit log first (`unlock`); one that cannot be recorded is
//! not made.

use std::path::Path;
use std::process::ExitCode;

use chrono::Utc;
use clap::Args as ClapArgs;
use serde::Serialize;

use super::output::finish;
use super::setup::{setup, tenant_id};
use crate::context::Context;
use crate::error::Result;
use crate::store::holder::Liveness;
use crate::store::lease;
use crate::store::readers::{self, ReaderState};
use crate::store::{ObjectName, TenantStore};

#[derive(ClapArgs)]
pub struct Args {
    pub tenant: String,
    /// Also remove locks that look live (another host, or a running process), after printing who holds them.
    #[arg(long)]
    pub force: bool,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Unlocked {
    pub tenant: String,
    pub locks: Vec<Lock>,
    /// Pending deletion plans (`locks/deletions/`): not locks, finished by
    /// the next prune, forget or epoch shred.
    pub pending_deletions: usize,
}

#[derive(Debug, Serialize)]
pub struct Lock {
    /// `lease` or `reader`.
    pub lock: &'static str,
    pub object: String,
    pub holder: Option<String>,
    pub job: Option<String>,
    pub expires_at: Option<chrono::DateTime<Utc>>,
    /// `released`, `expired`, `unreadable`, `dead`, `live`.
    pub state: &'static str,
    /// Why, for `dead` (the evidence) and `live` (alive here, or unknown).
    pub detail: Option<String>,
    /// `removed`, `kept`, `changed` (renewed or taken over meanwhile: left
    /// alone), `none` (nothing to do).
    pub action: &'static str,
}

pub async fn run(config: Option<&Path>, args: Args) -> ExitCode {
    let json = args.json;
    finish(json, unlock(config, &args).await, |u| {
        if u.locks.is_empty() {
            println!("tenant {}: no lease or reader record", u.tenant);
        }
        for l in &u.locks {
            println!(
                "{:<6} {:<8} {:<10} {} ({}){}{}",
                l.lock,
                l.action,
                l.state,
                l.holder.as_deref().unwrap_or("-"),
                l.job.as_deref().unwrap_or("-"),
                l.expires_at
                    .map(|t| format!(" until {}", t.to_rfc3339()))
                    .unwrap_or_default(),
                l.detail
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
        let kept = u.locks.iter().filter(|l| l.action == "kept").count();
        if kept > 0 {
            println!(
                "{kept} live lock(s) kept; `custos unlock {} --force` removes them too",
                u.tenant
            );
        }
        if u.pending_deletions > 0 {
            println!(
                "{} pending deletion plan(s): finished by the next prune",
                u.pending_deletions
            );
        }
    })
}

async fn unlock(config: Option<&Path>, args: &Args) -> Result<Unlocked> {
    let s = setup(config).await?;
    let tenant = tenant_id(&args.tenant)?;
    let store = TenantStore::new(s.ctx.store.clone(), &tenant);
    let now = Utc::now();
    let mut locks = Vec::new();

    if let Some(stored) = lease::read(&store).await? {
        let object = store.display(&ObjectName::Lease);
        let rec = stored.record.clone();
        let (state, detail) = match &rec {
            None => ("unreadable", None),
            Some(r) if r.released => ("released", None),
            Some(r) if r.expires_at <= now => ("expired", None),
            Some(r) => match r.liveness() {
                Liveness::Dead(why) => ("dead", Some(why)),
                Liveness::Alive => ("live", Some("its process runs on this host".into())),
                Liveness::Unknown => ("live", Some(unknown_detail(&r.holder))),
            },
        };
        let action = match state {
            "released" => "none",
            "live" if !args.force => "kept",
            _ => {
                let held = rec.as_ref().map(|r| (&r.holder, &r.job, r.expires_at));
                record_removal(
                    &s.ctx, &tenant, args.json, "lease", &object, held, state, &detail,
                )
                .await?;
                if lease::mark_released(&store, &stored, &s.ctx.actor).await? {
                    "removed"
                } else {
                    "changed"
                }
            }
        };
        locks.push(Lock {
            lock: "lease",
            object,
            holder: rec.as_ref().map(|r| r.holder.clone()),
            job: rec.as_ref().map(|r| r.job.clone()),
            expires_at: rec.as_ref().map(|r| r.expires_at),
            state,
            detail,
            action,
        });
    }

    for entry in readers::list(&store).await? {
        let object = store.display(&ObjectName::Reader(entry.id.clone()));
        let rec = entry.record.clone();
        let (state, detail) = match entry.state(now) {
            ReaderState::Unreadable => ("unreadable", None),
            ReaderState::Expired => ("expired", None),
            ReaderState::Dead(why) => ("dead", Some(why)),
            ReaderState::Live => match rec.as_ref().map(|r| r.liveness()) {
                Some(Liveness::Alive) => ("live", Some("its process runs on this host".into())),
                _ => (
                    "live",
                    Some(unknown_detail(
                        rec.as_ref().map(|r| r.holder.as_str()).unwrap_or(""),
                    )),
                ),
            },
        };
        let action = if state == "live" && !args.force {
            "kept"
        } else {
            let held = rec.as_ref().map(|r| (&r.holder, &r.job, r.expires_at));
            record_removal(
                &s.ctx, &tenant, args.json, "reader", &object, held, state, &detail,
            )
            .await?;
            readers::remove(&store, &entry.id).await?;
            "removed"
        };
        locks.push(Lock {
            lock: "reader",
            object,
            holder: rec.as_ref().map(|r| r.holder.clone()),
            job: rec.as_ref().map(|r| r.job.clone()),
            expires_at: rec.as_ref().map(|r| r.expires_at),
            state,
            detail,
            action,
        });
    }

    Ok(Unlocked {
        tenant: tenant.to_string(),
        locks,
        pending_deletions: crate::store::deletions::list(&store).await?.len(),
    })
}

fn unknown_detail(holder: &str) -> String {
    format!(
        "{holder} is not a process this host can see (another host or container, or an older custos): it expires by TTL"
    )
}

/// Says who is cut off, before it is (on stderr with `--json`).
fn forcing(json: bool, lock: &str, who: Option<(&String, &String)>) {
    let who = who
        .map(|(h, j)| format!("{h} ({j})"))
        .unwrap_or_else(|| "an unknown holder".into());
    let line = format!(
        "--force: removing the live {lock} of {who}; it will fail rather than go on unprotected"
    );
    if json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// Before a lock record is removed: says so if it looks live (`--force`),
/// and writes the `unlock` audit record (no record, no removal).
#[allow(clippy::too_many_arguments)]
async fn record_removal(
    ctx: &Context,
    tenant: &crate::TenantId,
    json: bool,
    lock: &str,
    object: &str,
    held: Option<(&String, &String, chrono::DateTime<chrono::Utc>)>,
    state: &str,
    detail: &Option<String>,
) -> Result<()> {
    if state == "live" {
        forcing(json, lock, held.map(|(h, j, _)| (h, j)));
    }
    let details = serde_json::json!({
        "lock": lock,
        "object": object,
        "holder": held.map(|(h, _, _)| h),
        "job": held.map(|(_, j, _)| j),
        "expires_at": held.map(|(_, _, e)| e),
        "state": state,
        "detail": detail,
        "forced": state == "live",
    });
    ctx.record("unlock", Some(tenant), details)
        .await
        .map(|_| ())
}
