//! `custos tenant init|list|show`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use serde::Serialize;

use super::output::{finish, human_bytes};
use super::setup::{policy, setup, tenant_id};
use crate::error::{Error, Result};
use crate::format::descriptor::Descriptor;
use crate::keys::{KeyInfo, KeyRef};
use crate::repo::Repo;
use crate::store::{ObjectName, TenantStore};
use crate::tenant::TenantId;

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Create a tenant's descriptor and first data key (done implicitly by its first backup).
    Init {
        tenant: String,
        /// The CMK (default: the policy's key, else local:<tenant>).
        #[arg(long, value_name = "KEY-REF")]
        key: Option<String>,
        /// Reuse the id of a shredded tenant (a new lineage; the old data stays unreadable).
        #[arg(long)]
        allow_reuse: bool,
        /// Create the CMK in its provider if it lacks it (a PKCS#11 object on
        /// the token); without it the key must exist. Local keys are always
        /// created; AWS KMS keys never are.
        #[arg(long)]
        create_key: bool,
        #[arg(long)]
        json: bool,
    },
    /// List tenants: those in the store and those with a policy.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a tenant's state, keys, epochs and snapshots.
    Show {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: Option<&Path>, cmd: TenantCommand) -> ExitCode {
    match cmd {
        TenantCommand::Init {
            tenant,
            key,
            allow_reuse,
            create_key,
            json,
        } => finish(
            json,
            init(config, &tenant, key.as_deref(), allow_reuse, create_key).await,
            |r: &InitResult| {
                if r.created {
                    println!(
                        "tenant {} initialised under key {} (epoch {})",
                        r.tenant, r.key, r.epoch
                    );
                } else {
                    println!(
                        "tenant {} already initialised under key {} (epoch {})",
                        r.tenant, r.key, r.epoch
                    );
                }
            },
        ),
        TenantCommand::List { json } => {
            finish(json, list(config).await, |rows: &Vec<TenantRow>| {
                println!("{:<24} {:<10} {:<8} KEY", "TENANT", "STATE", "POLICY");
                for r in rows {
                    println!(
                        "{:<24} {:<10} {:<8} {}",
                        r.tenant,
                        r.state.as_deref().unwrap_or("-"),
                        if r.policy { "yes" } else { "no" },
                        r.key.as_deref().unwrap_or("-")
                    );
                }
            })
        }
        TenantCommand::Show { tenant, json } => {
            finish(json, show(config, &tenant).await, print_show)
        }
    }
}

#[derive(Serialize)]
struct InitResult {
    tenant: TenantId,
    key: KeyRef,
    epoch: u32,
    created: bool,
}

async fn init(
    config: Option<&Path>,
    tenant: &str,
    key: Option<&str>,
    allow_reuse: bool,
    create_key: bool,
) -> Result<InitResult> {
    let s = setup(config).await?;
    let tenant = tenant_id(tenant)?;
    let policy = policy(&s.config, &tenant)?;
    let key = match (key, &policy) {
        (Some(k), _) => KeyRef::parse(k).map_err(|e| Error::InvalidArgument(e.to_string()))?,
        (None, Some(p)) => p.key.clone(),
        (None, None) => {
            KeyRef::local(tenant.as_str()).map_err(|e| Error::InvalidArgument(e.to_string()))?
        }
    };
    let create_key = create_key || key.kind() == crate::keys::ProviderKind::Local;
    let (repo, created) = Repo::init_with(&s.ctx, &tenant, &key, allow_reuse, create_key).await?;
    if created {
        tracing::info!(event = "tenant.initialised", tenant = %tenant, key = %key, "tenant initialised");
    }
    let d = repo.descriptor();
    Ok(InitResult {
        tenant,
        key: d.key.clone(),
        epoch: d.current_epoch,
        created,
    })
}

#[derive(Serialize)]
struct TenantRow {
    tenant: String,
    state: Option<String>,
    key: Option<String>,
    policy: bool,
}

async fn list(config: Option<&Path>) -> Result<Vec<TenantRow>> {
    let s = setup(config).await?;
    let mut rows: BTreeMap<String, TenantRow> = BTreeMap::new();
    let listing = s
        .ctx
        .store
        .list_with_delimiter(Some(&object_store::path::Path::from("tenants")))
        .await
        .map_err(|e| Error::store("list", "tenants/", e))?;
    for p in listing.common_prefixes {
        let Some(name) = p.filename() else { continue };
        let Ok(t) = TenantId::new(name) else { continue };
        let store = TenantStore::new(s.ctx.store.clone(), &t);
        let d = match store.get_if_exists(&ObjectName::Descriptor).await? {
            Some((b, _)) => Descriptor::parse(&b).ok(),
            None => None,
        };
        rows.insert(
            t.to_string(),
            TenantRow {
                tenant: t.to_string(),
                state: Some(
                    d.as_ref()
                        .map(|d| d.state.as_str().to_owned())
                        .unwrap_or_else(|| "no descriptor".into()),
                ),
                key: d.map(|d| d.key.to_string()),
                policy: false,
            },
        );
    }
    if let Ok(set) = crate::config::load_policies(&s.config.policies_dir) {
        for t in set.policies.keys() {
            rows.entry(t.to_string())
                .or_insert_with(|| TenantRow {
                    tenant: t.to_string(),
                    state: None,
                    key: None,
                    policy: true,
                })
                .policy = true;
        }
    }
    Ok(rows.into_values().collect())
}

#[derive(Serialize)]
struct ShowResult {
    descriptor: Descriptor,
    key: Option<KeyInfo>,
    key_error: Option<String>,
    snapshots: usize,
    /// Why the snapshots could not be read (then `snapshots` counts them
    /// by name and `latest_snapshot` is absent).
    snapshots_error: Option<String>,
    latest_snapshot: Option<serde_json::Value>,
    stored_bytes: u64,
    objects: usize,
    policy: Option<crate::config::Policy>,
    /// Why jobs refuse the tenant's policy (its key is not the tenant's key).
    policy_key_error: Option<String>,
    /// Keys, epochs, ages and when each rotation is next due (the policy's
    /// `[rotation]`, else the defaults).
    rotation: crate::jobs::rotate::RotationStatus,
    /// Whether the store honours conditional writes (cached probe).
    store_probe: Option<crate::store::probe::ProbeRecord>,
    /// Who holds each of the tenant's keys, in what state, and whether
    /// `[residency]` allows it: what a DPIA quotes.
    custody: Vec<KeyCustody>,
}

#[derive(Serialize)]
struct KeyCustody {
    key: crate::keys::KeyRef,
    role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    custody: Option<crate::keys::Custody>,
    /// The key's state as its provider reports it now.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// `[residency]`: "allowed", or the rule it breaks.
    residency: String,
}

/// Who holds each key and what its provider says of it, each key asked once.
async fn custody_of(
    s: &super::setup::Setup,
    keys: &[crate::jobs::rotate::KeyStatus],
) -> Vec<(KeyCustody, Option<KeyInfo>)> {
    let mut out: Vec<(KeyCustody, Option<KeyInfo>)> = Vec::new();
    for k in keys {
        let known = out.iter().find(|(c, _)| c.key == k.key);
        let (custody, info, error) = match known {
            Some((c, info)) => (c.custody.clone(), info.clone(), c.error.clone()),
            None => match s.ctx.keys.key(&k.key) {
                Ok(h) => match h.describe().await {
                    Ok(info) => (Some(h.custody()), Some(info), None),
                    Err(e) => (Some(h.custody()), None, Some(e.to_string())),
                },
                Err(e) => (None, None, Some(e.to_string())),
            },
        };
        let custody = KeyCustody {
            key: k.key.clone(),
            role: k.role.to_string(),
            custody,
            state: info.as_ref().map(|i| i.state.name()),
            error,
            residency: match s.ctx.residency.check_key(&k.key) {
                Ok(()) => "allowed".into(),
                Err(v) => v.to_string(),
            },
        };
        out.push((custody, info));
    }
    out
}

async fn show(config: Option<&Path>, tenant: &str) -> Result<ShowResult> {
    let s = setup(config).await?;
    let tenant = tenant_id(tenant)?;
    let policy = policy(&s.config, &tenant)?;
    // Shown even when the policy's key does not match (that is worth showing).
    let repo = Repo::open(&s.ctx, &tenant, None).await?;
    let policy_key_error = policy
        .as_ref()
        .and_then(|p| repo.check_policy_key(&p.key).err())
        .map(|e| e.to_string());
    let d = repo.descriptor().clone();
    let rotation = crate::jobs::rotate::rotation_status(
        &d,
        &policy
            .as_ref()
            .map(|p| p.rotation.clone())
            .unwrap_or_default(),
        chrono::Utc::now(),
    );
    let custody = custody_of(&s, &rotation.keys).await;
    let (key, key_error) = match custody.iter().find(|(c, _)| c.key == d.key) {
        Some((c, info)) => (info.clone(), c.error.clone()),
        None => (
            None,
            Some(format!("key {} is not among the tenant's keys", d.key)),
        ),
    };
    let objects = repo.list_objects().await?;
    // Listing snapshots decrypts them: an access the audit log records first.
    let (snaps, snapshots_error) = match crate::jobs::runner::record_access(
        &s.ctx,
        &tenant,
        "tenant.show",
        repo.list_snapshots(),
    )
    .await
    {
        Ok((snaps, _)) => (snaps, None),
        Err(e @ Error::AuditUnavailable { .. }) => return Err(e),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    // Unreadable, they are still there: counted by name.
    let snapshots = match snapshots_error {
        None => snaps.len(),
        Some(_) => objects
            .iter()
            .filter(|o| matches!(o.name, Some(crate::store::ObjectName::Snapshot(_))))
            .count(),
    };
    let store_probe = match crate::store::probe::probe_cached(&s.ctx, false).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "could not probe the store");
            None
        }
    };
    Ok(ShowResult {
        custody: custody.into_iter().map(|(c, _)| c).collect(),
        policy_key_error,
        rotation,
        store_probe,
        stored_bytes: objects.iter().map(|o| o.meta.size).sum(),
        objects: objects.len(),
        snapshots,
        snapshots_error,
        latest_snapshot: snaps.last().map(|s| {
            serde_json::json!({ "id": s.id, "time": s.time, "files": s.summary.files, "bytes_in": s.summary.bytes_in })
        }),
        descriptor: d,
        key,
        key_error,
        policy,
    })
}

fn print_show(r: &ShowResult) {
    let d = &r.descriptor;
    println!(
        "tenant   {} ({}, descriptor generation {})",
        d.tenant,
        d.state.as_str(),
        d.generation
    );
    println!("created  {}", d.created_at.format("%Y-%m-%d %H:%M:%S UTC"));
    match (&r.key, &r.key_error) {
        (Some(k), _) => println!(
            "key      {} ({}, version {}, key id {})",
            d.key,
            k.state.name(),
            k.current_version.as_deref().unwrap_or("n/a"),
            k.key_id
        ),
        (None, Some(e)) => println!("key      {} (unavailable: {e})", d.key),
        _ => println!("key      {}", d.key),
    }
    let rs = &r.rotation;
    for k in rs.keys.iter().skip(1) {
        println!("key      {} ({})", k.key, k.role);
    }
    for c in &r.custody {
        let held = c
            .custody
            .as_ref()
            .map(|c| c.holder.clone())
            .unwrap_or_else(|| "provider not configured".into());
        let state = c
            .state
            .as_deref()
            .or(c.error.as_deref())
            .unwrap_or("unknown");
        println!(
            "custody  {}: {held}; {state}; residency: {}",
            c.key, c.residency
        );
    }
    let due =
        |next: Option<chrono::DateTime<chrono::Utc>>, due: bool, every: &Option<String>| match (
            next, every,
        ) {
            (Some(_), Some(e)) if due => format!("every {e}, due now"),
            (Some(t), Some(e)) => format!("every {e}, next due {}", t.format("%Y-%m-%d")),
            _ => "not scheduled".to_owned(),
        };
    println!(
        "cmk      since {} ({} days); rotation {}",
        rs.cmk_since.format("%Y-%m-%d"),
        rs.cmk_age_days,
        due(rs.cmk_next_due, rs.cmk_due, &rs.cmk_every)
    );
    if let Some(p) = &rs.move_pending {
        let t = &d.tenant;
        match &d.epoch_shred {
            // The shred's own re-wrap: only the shred finishes it.
            Some(es) if es.rewrap_to.as_ref() == Some(p) => println!(
                "moving   to {p} (the re-wrap of an interrupted shred of epoch {}; finish it with \
                 `custos shred {t} --epoch {} --confirm {t}` and the same --rewrap or --rewrap-to)",
                es.epoch, es.epoch
            ),
            _ => println!(
                "moving   to {p} (interrupted; finish with `custos rotate {t} --replace-cmk {p}`)"
            ),
        }
    }
    for e in &rs.epochs {
        let current = if e.current { ", current" } else { "" };
        println!(
            "epoch    {} ({:?}{current}, created {}, {} days old)",
            e.epoch,
            e.state,
            e.created_at.format("%Y-%m-%d"),
            e.age_days
        );
    }
    println!(
        "epochs   new epoch {}",
        due(rs.epoch_next_due, rs.epoch_due, &rs.epoch_every)
    );
    match &r.store_probe {
        Some(p) if p.supported() => println!("store    {} (conditional writes: ok)", p.url),
        Some(p) => println!(
            "store    {} (conditional writes NOT honoured: {}; jobs refuse to run)",
            p.url,
            p.result.detail.as_deref().unwrap_or("")
        ),
        None => println!("store    (probe failed)"),
    }
    println!(
        "data     {} objects, {}; {} snapshots",
        r.objects,
        human_bytes(r.stored_bytes),
        r.snapshots
    );
    if let Some(l) = &r.latest_snapshot {
        println!("latest   {}", l);
    }
    if let Some(e) = &r.snapshots_error {
        println!("warning  the snapshots could not be read: {e}");
    }
    match &r.policy {
        Some(p) => println!("policy   {}", p.file.display()),
        None => println!("policy   none"),
    }
    if let Some(e) = &r.policy_key_error {
        println!("warning  {e}");
    }
}
