//! `custos certificate verify <FILE> [--public-key FILE] [--online]` checks a
//! deletion certificate: offline with nothing but the audit public key
//! (signature, canonical form, inclusion proof, checkpoint signature); with
//! `--online` also the keys' states in their provider now, any of their key
//! material left on this host (temporary files of interrupted writes) and what is left in
//! the store. `custos certificate get <TENANT> [ID]` prints a stored
//! certificate byte for byte (without ID: lists the tenant's certificates).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde::Serialize;

use super::output::{Failure, fail};
use super::setup::{setup, tenant_id};
use crate::audit::AuditKey;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::shred::certificate::{self, Subject, Verified};
use crate::jobs::shred::{self, GuaranteeKind};
use crate::keys::{KeyError, KeyState, Leftover};
use crate::store::{ObjectName, TenantStore};

#[derive(Subcommand)]
pub enum CertificateCommand {
    /// Verify a deletion certificate (exit 0 valid, 1 invalid).
    Verify {
        /// The certificate file.
        file: PathBuf,
        /// The audit verifier key (`custos audit public-key` output); default: this installation's.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Also check the keys' state in their provider and the tenant's prefix in the store now.
        #[arg(long)]
        online: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print a stored certificate exactly (without ID: list the tenant's certificate ids).
    Get {
        tenant: String,
        id: Option<String>,
        /// Write it to FILE instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `--json`'s `result`: what the verification established.
#[derive(Serialize)]
struct VerifyOutput {
    valid: bool,
    certificate_id: Option<String>,
    tenant: Option<String>,
    epoch: Option<u32>,
    guarantee: Option<GuaranteeKind>,
    irreversible_at: Option<chrono::DateTime<chrono::Utc>>,
    audit_seq: Option<u64>,
    checkpoint_size: Option<u64>,
    trusted_key: Option<String>,
    online: Option<Online>,
}

#[derive(Serialize)]
struct Online {
    ok: bool,
    keys: Vec<OnlineKey>,
    /// Objects found where the shred left only the descriptor (and retained objects).
    remaining: Vec<String>,
    problems: Vec<String>,
    /// Keys whose state could not be read (`[residency]` refused the call,
    /// no provider configured, access denied, unreachable): not shown
    /// destroyed, not shown alive. Any makes the check inconclusive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unchecked: Vec<String>,
}

#[derive(Serialize)]
struct OnlineKey {
    key: String,
    state: Option<KeyState>,
    error: Option<String>,
    /// Material of the key found on this host (temporary files of
    /// interrupted writes, a key file beside its tombstone): a problem even
    /// if this run's sweep removed it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    leftover_material: Vec<Leftover>,
    ok: bool,
    /// False when custos could not ask the provider (`error` says why): `ok`
    /// is then false too, but nothing shows the key still exists.
    checked: bool,
    /// The error kind of a check that could not be made.
    #[serde(skip_serializing_if = "Option::is_none")]
    unchecked_kind: Option<&'static str>,
}

pub async fn run(config: Option<&Path>, cmd: CertificateCommand) -> ExitCode {
    match cmd {
        CertificateCommand::Verify {
            file,
            public_key,
            online,
            json,
        } => verify_cmd(config, &file, public_key.as_deref(), online, json).await,
        CertificateCommand::Get { tenant, id, out } => match get(config, &tenant, id, out).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(false, &e),
        },
    }
}

async fn get(
    config: Option<&Path>,
    tenant: &str,
    id: Option<String>,
    out: Option<PathBuf>,
) -> Result<()> {
    let cfg = Config::discover(config)?;
    let store = crate::context::open_store(&cfg)?;
    let tenant = tenant_id(tenant)?;
    let Some(id) = id else {
        for id in shred::list_certificates(&store, &tenant).await? {
            println!("{id}");
        }
        return Ok(());
    };
    let bytes = shred::load_certificate(&store, &tenant, &id)
        .await?
        .ok_or_else(|| Error::NotFound {
            what: format!("certificate {id} of tenant {tenant}"),
        })?;
    match out {
        Some(path) => {
            crate::util::write_file_atomic(&path, &bytes, 0o644).map_err(|e| Error::io(&path, e))
        }
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&bytes)
                .map_err(|e| Error::io("stdout", e))
        }
    }
}

fn trusted_key(config: Option<&Path>, public_key: Option<&Path>) -> Result<(String, &'static str)> {
    match public_key {
        Some(p) => Ok((
            std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
            "the given key file",
        )),
        None => {
            let cfg = Config::discover(config)?;
            let key = AuditKey::load(&cfg.audit.key_file)?;
            Ok((
                key.public_key_text(),
                "this installation's audit key (pass --public-key to check against a key obtained independently)",
            ))
        }
    }
}

async fn verify_cmd(
    config: Option<&Path>,
    file: &Path,
    public_key: Option<&Path>,
    online: bool,
    json: bool,
) -> ExitCode {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => return fail(json, &Error::io(file, e)),
    };
    let (key_text, key_source) = match trusted_key(config, public_key) {
        Ok(k) => k,
        Err(e) => return fail(json, &e),
    };
    let mut out = VerifyOutput {
        valid: false,
        certificate_id: None,
        tenant: None,
        epoch: None,
        guarantee: None,
        irreversible_at: None,
        audit_seq: None,
        checkpoint_size: None,
        trusted_key: Some(key_text.trim().to_owned()),
        online: None,
    };
    let verified = match certificate::verify(&bytes, &key_text) {
        Ok(v) => v,
        Err(e) => {
            if json {
                let error = Error::CertificateInvalid {
                    file: file.display().to_string(),
                    message: e.to_string(),
                };
                print_envelope(&out, Some(&error));
            } else {
                println!("certificate {}: INVALID: {e}", file.display());
            }
            return ExitCode::FAILURE;
        }
    };
    let c = &verified.certificate;
    out.valid = true;
    out.certificate_id = Some(c.id.clone());
    out.tenant = Some(c.tenant.to_string());
    out.epoch = c.epoch;
    out.guarantee = Some(c.guarantee.kind);
    out.irreversible_at = c.guarantee.irreversible_at;
    out.audit_seq = Some(verified.record.seq);
    out.checkpoint_size = Some(verified.checkpoint_size);
    if online {
        match check_online(config, &verified).await {
            Ok(o) => out.online = Some(o),
            Err(e) => return fail(json, &e),
        }
    }
    // A valid certificate whose shred no longer holds (a key usable again,
    // data back in the store) fails verification as a shred that failed it
    // (exit 1). A check custos could not make (a key whose provider it may
    // not or cannot call) shows neither: exit 3, with the reason.
    let failure = out
        .online
        .as_ref()
        .filter(|o| !o.problems.is_empty())
        .map(|o| {
            (
                Failure {
                    kind: ErrorKind::ShredVerificationFailed.as_str(),
                    message: format!("checked online now: {}", o.problems.join("; ")),
                },
                ExitCode::FAILURE,
            )
        });
    let inconclusive = || {
        let o = out.online.as_ref()?;
        let first = o.keys.iter().find(|k| !k.checked)?;
        Some((
            Failure {
                kind: first.unchecked_kind.unwrap_or("key_unavailable"),
                message: format!(
                    "could not check online: {} (the key's state was not read: nothing shows it destroyed or alive)",
                    o.unchecked.join("; ")
                ),
            },
            ExitCode::from(ONLINE_UNCHECKED_EXIT),
        ))
    };
    let failure = failure.or_else(inconclusive);
    if json {
        super::output::print_envelope(
            failure.is_none(),
            Some(&out),
            failure.as_ref().map(|(f, _)| Failure {
                kind: f.kind,
                message: f.message.clone(),
            }),
        );
    } else {
        print_human(&verified, key_source, &out);
        if let Some((f, _)) = &failure {
            eprintln!("error: {}", f.message);
        }
    }
    match failure {
        None => ExitCode::SUCCESS,
        Some((_, code)) => code,
    }
}

/// The exit status of `certificate verify --online` when a key's state
/// could not be read (distinct from 1: a key shown not destroyed).
pub const ONLINE_UNCHECKED_EXIT: u8 = 3;

/// The `--json` envelope: `{"ok": true, "result": …}`, or `{"ok": false,
/// "error": {"kind", "message"}, "result": …}` when verification failed.
fn print_envelope(out: &VerifyOutput, error: Option<&Error>) {
    super::output::print_envelope(error.is_none(), Some(out), error.map(Into::into));
}

fn print_human(v: &Verified, key_source: &str, out: &VerifyOutput) {
    let c = &v.certificate;
    let what = match (c.subject, c.epoch) {
        (Subject::Epoch, Some(e)) => format!("epoch {e} of tenant {}", c.tenant),
        _ => format!("tenant {}", c.tenant),
    };
    println!("certificate {}: valid", c.id);
    println!("  subject        {what}, {}", c.method);
    println!(
        "  requested      {} by {} ({})",
        c.requested_at.to_rfc3339(),
        c.requested_by,
        c.reason
    );
    println!(
        "  executed       {} by {}",
        c.executed_at.to_rfc3339(),
        c.actor
    );
    println!("  signature      Ed25519, verified with {key_source}");
    println!(
        "  audit record   #{} {} (in the signed checkpoint of {} records)",
        v.record.seq, v.record.event, v.checkpoint_size
    );
    println!(
        "  guarantee      {:?}: {}",
        c.guarantee.kind, c.guarantee.statement
    );
    if let Some(t) = c.guarantee.irreversible_at {
        println!("  irreversible   from {}", t.to_rfc3339());
    }
    if let Some(p) = &c.guarantee.pending {
        println!("  pending        {p}");
    }
    for k in &c.keys {
        println!(
            "  key            {} ({:?}): {:?}{}",
            k.reference,
            k.role,
            k.outcome,
            k.state_after
                .as_ref()
                .map(|s| format!(", {}", s.name()))
                .unwrap_or_default()
        );
    }
    println!(
        "  scope          {} objects, {} bytes, root {}",
        c.scope.objects, c.scope.bytes, c.scope.merkle_root
    );
    println!(
        "  deletion       {} deleted, {} retained",
        c.deletion.objects_deleted,
        c.deletion.retained.len()
    );
    for r in &c.deletion.retained {
        println!(
            "  retained       {} ({} bytes{})",
            r.object,
            r.size,
            r.retain_until
                .map(|t| format!(", until {}", t.to_rfc3339()))
                .unwrap_or_default()
        );
    }
    println!(
        "  verification   passed: {} envelope(s) refused to unwrap",
        c.verification
            .envelopes
            .iter()
            .filter(|e| e.outcome == "refused")
            .count()
    );
    if let Some(o) = &out.online {
        println!("online: {}", if o.ok { "ok" } else { "PROBLEMS" });
        for k in &o.keys {
            let state = match (&k.state, &k.error) {
                (Some(s), _) => s.name(),
                (None, Some(e)) => e.clone(),
                _ => "?".into(),
            };
            let verdict = if k.ok {
                ""
            } else if !k.checked {
                " (COULD NOT CHECK)"
            } else if k.leftover_material.is_empty() {
                " (NOT destroyed)"
            } else {
                " (key material left on this host)"
            };
            println!("  key            {}: {state}{verdict}", k.key);
        }
        println!(
            "  store          {} object(s) left beyond the descriptor and retained ciphertext",
            o.remaining.len()
        );
        for p in &o.problems {
            println!("  problem        {p}");
        }
    }
}

/// Re-reads the keys' state from their providers and lists what the store
/// still holds of the shredded subject.
async fn check_online(config: Option<&Path>, v: &Verified) -> Result<Online> {
    let s = setup(config).await?;
    let c = &v.certificate;
    let mut problems = Vec::new();
    let mut unchecked = Vec::new();
    let mut keys = Vec::new();
    for k in &c.keys {
        // A key the certificate says was left untouched (ownership unproven)
        // is not claimed destroyed: its state now says nothing about the claim.
        if k.outcome == crate::format::shred::DestroyOutcome::NotDestroyed {
            continue;
        }
        let (r, provider) = match s.ctx.keys.key(&k.reference) {
            Ok(p) => (p.describe().await, Some(p)),
            Err(e) => (Err(e), None),
        };
        let mut checked = true;
        let mut unchecked_kind = None;
        let (state, error, mut ok) = match r {
            Ok(info) => {
                let ok = matches!(
                    info.state,
                    KeyState::PendingDeletion { .. }
                        | KeyState::PendingImport
                        | KeyState::Destroyed { .. }
                );
                (Some(info.state), None, ok)
            }
            // A missing local key is not a destroyed one (its tombstone would be here).
            Err(e @ KeyError::NotFound { .. }) => {
                let gone = k.reference.kind().absence_means_gone();
                (None, Some(e.to_string()), gone)
            }
            // The provider's own word that the key is ended, or that it lives.
            Err(
                e @ (KeyError::Destroyed { .. }
                | KeyError::PendingDeletion { .. }
                | KeyError::PendingImport { .. }),
            ) => (None, Some(e.to_string()), true),
            Err(e @ KeyError::Disabled { .. }) => (None, Some(e.to_string()), false),
            // Not asked (refused by [residency], not configured) or no answer.
            Err(e) => {
                checked = false;
                unchecked_kind = Some(e.kind().as_str());
                unchecked.push(format!("key {}: {e}", k.reference));
                (None, Some(e.to_string()), false)
            }
        };
        if !ok && checked {
            problems.push(format!("key {} is not destroyed", k.reference));
        }
        let leftover_material = match provider {
            Some(p) => p.leftover_material().await?,
            None => Vec::new(),
        };
        if !leftover_material.is_empty() {
            ok = false;
            problems.push(format!(
                "key material of {} was on this host after its destruction: {}",
                k.reference,
                leftover_material
                    .iter()
                    .map(|l| format!(
                        "{}{}",
                        l.path.display(),
                        if l.removed {
                            " (removed by this run)"
                        } else {
                            ""
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        keys.push(OnlineKey {
            key: k.reference.to_string(),
            state,
            error,
            leftover_material,
            ok,
            checked,
            unchecked_kind,
        });
    }
    let store = TenantStore::new(s.ctx.store.clone(), &c.tenant);
    let retained: Vec<&str> = c
        .deletion
        .retained
        .iter()
        .map(|r| r.object.as_str())
        .collect();
    let mut remaining = Vec::new();
    match (c.subject, c.epoch) {
        (Subject::Epoch, Some(e)) => {
            if store.head(&ObjectName::Envelope(e)).await?.is_some() {
                let path = store.display(&ObjectName::Envelope(e));
                if !retained.contains(&path.as_str()) {
                    problems.push(format!("{path} is in the store again"));
                    remaining.push(path);
                }
            }
        }
        _ => {
            // A reused tenant id (tenant init --allow-reuse) is a new lineage
            // whose data is not the shredded tenant's.
            let reused = match store.get_if_exists(&ObjectName::Descriptor).await? {
                Some((b, _)) => crate::format::descriptor::Descriptor::parse(&b).is_ok_and(|d| {
                    d.state == crate::format::descriptor::Lifecycle::Active
                        && d.created_at >= c.executed_at
                }),
                None => false,
            };
            for l in store.list_all().await?.into_iter().filter(|_| !reused) {
                let path = format!("tenants/{}/{}", c.tenant, l.path);
                if shred::scope::in_tenant_scope(&l) && !retained.contains(&path.as_str()) {
                    remaining.push(path);
                }
            }
            if !remaining.is_empty() {
                problems.push(format!(
                    "{} object(s) under tenants/{}/ that are neither the descriptor nor retained ciphertext",
                    remaining.len(),
                    c.tenant
                ));
            }
        }
    }
    let ok = problems.is_empty() && unchecked.is_empty();
    Ok(Online {
        ok,
        keys,
        remaining,
        problems,
        unchecked,
    })
}
