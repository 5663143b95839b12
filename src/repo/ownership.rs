//! Which keys a tenant provably owns, and which other tenants use a key: the
//! one implementation behind every decision that binds a key to a tenant
//! (init, `rotate --replace-cmk`, an epoch shred's re-wrap) or destroys one
//! (tenant and epoch shreds, the old key of a CMK replacement).
//!
//! The descriptor names a tenant's keys, but it is clear JSON that whoever can
//! write the store can edit: it cannot be what a destruction rests on. What
//! can:
//!
//! - **the key itself**: a key K is proven tenant T's when it unwraps an
//!   object bound to T by its wrap context: a key claim
//!   (`tenants/T/keys/claims/<id>`, context `{T, key-claim, 0}`) or one of
//!   T's envelopes (`{T, tenant-data-key, e}`). Only a holder of K can make
//!   such an object, and the context stops a copy from serving another tenant;
//! - **the key registry** of this installation (`<state_dir>/keys.json`),
//!   written at every binding, which the store cannot write and which
//!   outlives the key (a shred resumed after its keys were destroyed);
//! - **the policies** (which key each tenant's policy names), local too.
//!
//! A key is destroyed only when it is proven the tenant's and no other tenant
//! known anywhere uses it: not the readable descriptors (any state, every key
//! they name), not the objects of any other tenant (tried under the key:
//! authenticated, whatever their descriptor says), not the registry, not the
//! policies. An unproven key is refused by name (or left untouched on the
//! operator's explicit word); a key already destroyed needs no proof, since
//! nothing is done to it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{PutMode, UpdateVersion};

use crate::config::{DeclaredKey, declared_keys, declared_keys_cached};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::format::claim::{KeyClaim, claim_id};
use crate::format::descriptor::{Descriptor, Lifecycle};
use crate::format::shred::KeyRole;
use crate::keys::{KeyError, KeyRef, KeyState, ProviderKind, WrapContext, WrappedKey};
use crate::state::{KeyBinding, KeyRegistry};
use crate::store::layout::Dir;
use crate::store::{ObjectName, TenantStore};
use crate::tenant::TenantId;

/// Descriptors read at once while surveying the store.
const SURVEY_CONCURRENCY: usize = 16;

/// Why a key is known to be a tenant's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// The key registry of this installation bound it to the tenant.
    Registry {
        bound_at: DateTime<Utc>,
        why: String,
    },
    /// A key claim in the tenant's prefix unwraps under it.
    Claim { object: String },
    /// An envelope of the tenant unwraps under it.
    Envelope { object: String },
}

impl fmt::Display for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proof::Registry { bound_at, why } => write!(
                f,
                "the key registry of this host bound it to the tenant ({why}, {})",
                bound_at.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            Proof::Claim { object } => write!(f, "the key claim {object} unwraps under it"),
            Proof::Envelope { object } => write!(f, "the envelope {object} unwraps under it"),
        }
    }
}

/// How far a survey of the store goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// What the store, the registry and the policies name; objects are tried
    /// under the key only for tenants whose descriptor is unreadable, missing
    /// or not active. A descriptor edited to name another key hides its
    /// tenant: only for a key name nothing uses yet (a fresh re-wrap key that
    /// its provider does not know, so nothing can be wrapped under it).
    Named,
    /// Also every other tenant's envelopes and claims, tried under the key:
    /// use that no edit of a descriptor can hide. For every binding of an
    /// existing key (init, a first backup, CMK replacement, re-wrap) and
    /// before destroying a key.
    Authenticated,
}

/// What a key is being checked for: an unreadable tenant whose objects could
/// not be tried counts against a new binding (nothing shows the key is free),
/// not against destroying a key already proven the tenant's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Bind,
    Destroy,
}

/// One way another tenant uses a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub tenant: TenantId,
    pub how: String,
}

/// What a shred does with one of the tenant's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Proven the tenant's and used by no other: destroy it.
    Destroy { proof: Proof },
    /// Unproven, but the provider already shows it destroyed (or does not
    /// know it): nothing to destroy, and custos does not touch it.
    AlreadyGone { state: Option<KeyState> },
    /// Unproven (or refused by `[residency]`), and the operator asked to
    /// leave it untouched; `why` says what stopped the proof or the call.
    Skip { why: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVerdict {
    pub key: KeyRef,
    pub role: KeyRole,
    pub verdict: Verdict,
}

/// Whether a key state shows a destruction already under way or done.
fn shows_destruction(state: &KeyState) -> bool {
    matches!(
        state,
        KeyState::PendingDeletion { .. } | KeyState::PendingImport | KeyState::Destroyed { .. }
    )
}

fn role_name(role: KeyRole) -> &'static str {
    match role {
        KeyRole::Current => "current",
        KeyRole::Pending => "pending",
        KeyRole::Previous => "previous",
    }
}

// ---------------------------------------------------------------------------
// Unwrapping under a key

/// What trying an object under a key showed.
enum Tried {
    Unwraps,
    Not,
    /// The key cannot be used now (disabled, destroyed, unknown, denied):
    /// nothing can be tried under it.
    KeyUnusable(KeyError),
}

async fn try_unwrap(
    ctx: &Context,
    key: &KeyRef,
    wrapped: &WrappedKey,
    wctx: &WrapContext,
    fingerprint: Option<&str>,
) -> Result<Tried> {
    let cmk = match ctx.keys.key(key) {
        Ok(p) => p,
        Err(e) => return Ok(Tried::KeyUnusable(e)),
    };
    match cmk.unwrap(wrapped, wctx).await {
        Ok(secret) => {
            // The wrap authenticates; the fingerprint check is the envelope's own rule.
            let ok = fingerprint.is_none_or(|f| secret.fingerprint() == f);
            Ok(if ok { Tried::Unwraps } else { Tried::Not })
        }
        Err(KeyError::InvalidCiphertext { .. }) => Ok(Tried::Not),
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => Ok(Tried::KeyUnusable(e)),
    }
}

/// An envelope or claim of a tenant, as something to try under a key. The
/// context comes from where the object lies, never from its content.
struct KeyObject {
    object: String,
    wrapped: WrappedKey,
    fingerprint: Option<String>,
    context: WrapContext,
    is_claim: bool,
    /// The key the object says it is wrapped under: unauthenticated, a
    /// candidate only until the object unwraps under it.
    named: Option<KeyRef>,
}

/// The wrapped key, fingerprint and named key of an envelope or claim, read
/// leniently: an object that does not parse cannot unwrap anyway.
fn wrapped_of(bytes: &[u8]) -> Option<(WrappedKey, Option<String>, Option<KeyRef>)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let wrapped: WrappedKey = serde_json::from_value(v.get("wrapped")?.clone()).ok()?;
    let fingerprint = v
        .get("fingerprint")
        .and_then(|f| f.as_str())
        .map(str::to_owned);
    let named = v
        .get("key")
        .and_then(|k| k.as_str())
        .and_then(|k| KeyRef::parse(k).ok());
    Some((wrapped, fingerprint, named))
}

/// Every envelope and claim under `tenants/<t>/keys/`, claims first (the
/// cheapest proof, and the one that survives rotation).
async fn key_objects(store: &TenantStore) -> Result<Vec<KeyObject>> {
    let tenant = store.tenant();
    let mut out = Vec::new();
    for l in store.list(Dir::Keys).await? {
        let (context, is_claim) = match &l.name {
            Some(ObjectName::Envelope(e)) => (WrapContext::tdk(tenant, *e), false),
            Some(ObjectName::KeyClaim(_)) => (WrapContext::claim(tenant), true),
            _ => continue,
        };
        let name = l.name.clone().expect("matched above");
        let Some((bytes, _)) = store.get_if_exists(&name).await? else {
            continue;
        };
        if let Some((wrapped, fingerprint, named)) = wrapped_of(&bytes) {
            out.push(KeyObject {
                object: store.display(&name),
                wrapped,
                fingerprint,
                context,
                is_claim,
                named,
            });
        }
    }
    out.sort_by_key(|o| !o.is_claim);
    Ok(out)
}

/// Whether the provider of `key` says it does not know it: then nothing can
/// be wrapped under it, as [`first_under`] would find object by object (its
/// `NotFound`). Any other answer, or none, says nothing: the objects are tried.
async fn provider_lacks(ctx: &Context, key: &KeyRef) -> bool {
    match ctx.keys.key(key) {
        Ok(cmk) => matches!(cmk.describe().await, Err(KeyError::NotFound { .. })),
        Err(_) => false,
    }
}

/// The first of `objects` that unwraps under `key`; `Err(why)` when the key
/// cannot be used to try them.
async fn first_under(
    ctx: &Context,
    key: &KeyRef,
    objects: &[KeyObject],
) -> Result<std::result::Result<Option<usize>, KeyError>> {
    for (i, o) in objects.iter().enumerate() {
        match try_unwrap(ctx, key, &o.wrapped, &o.context, o.fingerprint.as_deref()).await? {
            Tried::Unwraps => return Ok(Ok(Some(i))),
            Tried::Not => {}
            Tried::KeyUnusable(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(None))
}

// ---------------------------------------------------------------------------
// Resolving and comparing keys

/// The id a provider resolves a key to (`local:<name>`, the KMS key ARN).
/// Local names are their own ids; AWS KMS keys are described (an alias and
/// an ARN can name one key). `Ok(None)`: the provider does not know the key.
async fn resolve(ctx: &Context, key: &KeyRef) -> std::result::Result<Option<String>, String> {
    if key.kind() == ProviderKind::Local {
        return Ok(Some(key.to_string()));
    }
    let cmk = ctx.keys.key(key).map_err(|e| e.to_string())?;
    match cmk.describe().await {
        Ok(info) => Ok(Some(info.key_id)),
        Err(KeyError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Resolved ids, each key described once per survey.
#[derive(Default)]
struct Ids(HashMap<KeyRef, std::result::Result<Option<String>, String>>);

impl Ids {
    async fn get(
        &mut self,
        ctx: &Context,
        key: &KeyRef,
    ) -> std::result::Result<Option<String>, String> {
        if let Some(v) = self.0.get(key) {
            return v.clone();
        }
        let v = resolve(ctx, key).await;
        self.0.insert(key.clone(), v.clone());
        v
    }

    /// Whether `theirs` is the key `ours` (resolved to `ours_id`): the same
    /// reference, or the same provider id. `Err` when it cannot be told
    /// (their key cannot be described): callers count that as a use.
    async fn same(
        &mut self,
        ctx: &Context,
        ours: &KeyRef,
        ours_id: Option<&str>,
        theirs: &KeyRef,
    ) -> std::result::Result<bool, String> {
        if ours == theirs {
            return Ok(true);
        }
        if ours.kind() != theirs.kind() || ours.kind() == ProviderKind::Local {
            return Ok(false);
        }
        let Some(ours_id) = ours_id else {
            return Ok(false);
        };
        Ok(self.get(ctx, theirs).await?.as_deref() == Some(ours_id))
    }
}

// ---------------------------------------------------------------------------
// Proof of ownership

/// Why a key is not proven a tenant's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unproven {
    /// Every claim and envelope of the tenant was tried under the key and
    /// none unwrapped: nothing of the tenant is wrapped under it. False when
    /// the key could not be used to try them (disabled, destroyed, denied).
    pub tried_all: bool,
    pub why: String,
}

impl fmt::Display for Unproven {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.why)
    }
}

/// Proves that `key` is the key of `store.tenant()`, if anything can: the
/// registry, a claim, or an envelope unwrapping under it. `resolved`: the key
/// as its provider resolved it, when known.
pub async fn prove(
    ctx: &Context,
    store: &TenantStore,
    key: &KeyRef,
    resolved: Option<&str>,
) -> Result<std::result::Result<Proof, Unproven>> {
    let tenant = store.tenant();
    let registry = ctx.state.key_registry()?;
    if let Some(b) = registry
        .bindings_of(key, resolved)
        .find(|b| &b.tenant == tenant)
    {
        return Ok(Ok(Proof::Registry {
            bound_at: b.bound_at,
            why: b.why.clone(),
        }));
    }
    let mut objects = key_objects(store).await?;
    // The claim named after this key first: one unwrap proves it (a KMS call each).
    let own = store.display(&ObjectName::KeyClaim(claim_id(key)));
    objects.sort_by_key(|o| o.object != own);
    Ok(Err(match first_under(ctx, key, &objects).await? {
        Ok(Some(i)) => {
            let object = objects[i].object.clone();
            return Ok(Ok(if objects[i].is_claim {
                Proof::Claim { object }
            } else {
                Proof::Envelope { object }
            }));
        }
        Ok(None) => Unproven {
            tried_all: true,
            why: format!(
                "no key claim (tenants/{tenant}/keys/claims/) or envelope of {tenant} unwraps under it \
                 ({} tried), and the key registry of this host has no entry binding it to {tenant}",
                objects.len()
            ),
        },
        Err(e) => Unproven {
            tried_all: false,
            why: format!(
                "its claims and envelopes cannot be tried while the key is unusable ({e}), and the key \
                 registry of this host has no entry binding it to {tenant}"
            ),
        },
    }))
}

/// Every key the tenant is known to own: `named` (the keys its descriptor
/// names, with their roles), then each key the key registry of this host
/// binds to the tenant and that is not destroyed, then each key one of the
/// tenant's claims or envelopes names and unwraps under (with the tenant's
/// context: only a holder of the key could have made it, and it holds the
/// tenant's data key or binding). The added keys come as previous keys.
///
/// What a shred destroys starts here, not at the descriptor alone: the
/// descriptor is unauthenticated, and a store writer who drops a key from it
/// (a previous CMK, or the current one when no policy pins it) would
/// otherwise leave that key alive, able to unwrap every old copy of the
/// tenant's envelopes, under a certificate saying all its keys were
/// destroyed. Each key still goes through [`decide_destroy`].
///
/// A key named by one of the tenant's objects that cannot be tried (refused
/// by `[residency]`, disabled, unknown to its provider, not configured) is
/// kept as a candidate: nothing shows it is not the tenant's, so the shred
/// must prove and destroy it, refuse, or certify that it was left
/// untouched, never leave it out. Only a key under which the object
/// provably does not unwrap (planted, naming someone else's key) is dropped.
pub async fn known_keys(
    ctx: &Context,
    store: &TenantStore,
    named: Vec<(KeyRef, KeyRole)>,
) -> Result<Vec<(KeyRef, KeyRole)>> {
    let tenant = store.tenant();
    let mut out = named;
    let mut ids = Ids::default();
    let registry = ctx.state.key_registry()?;
    for b in registry
        .keys
        .iter()
        .filter(|b| &b.tenant == tenant && b.destroyed_at.is_none())
    {
        if !listed(ctx, &mut ids, &out, &b.key).await {
            out.push((b.key.clone(), KeyRole::Previous));
        }
    }
    for o in key_objects(store).await? {
        let Some(key) = &o.named else { continue };
        if listed(ctx, &mut ids, &out, key).await {
            continue;
        }
        match try_unwrap(ctx, key, &o.wrapped, &o.context, o.fingerprint.as_deref()).await? {
            Tried::Unwraps | Tried::KeyUnusable(_) => out.push((key.clone(), KeyRole::Previous)),
            Tried::Not => {}
        }
    }
    Ok(out)
}

/// Whether `key` is in `keys`, as written or (KMS) by resolved id.
async fn listed(ctx: &Context, ids: &mut Ids, keys: &[(KeyRef, KeyRole)], key: &KeyRef) -> bool {
    if keys.iter().any(|(k, _)| k == key) {
        return true;
    }
    if key.kind() == ProviderKind::Local {
        return false;
    }
    let resolved = ids.get(ctx, key).await.ok().flatten();
    for (k, _) in keys {
        if ids
            .same(ctx, key, resolved.as_deref(), k)
            .await
            .unwrap_or(false)
        {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------
// Who else uses a key

enum View {
    Readable(Arc<Descriptor>),
    /// Junk, another tenant's, or older than one seen before (replayed).
    Unreadable(String),
    /// The prefix holds objects but no descriptor.
    Missing,
}

struct Other {
    tenant: TenantId,
    view: View,
    objects: Option<Vec<KeyObject>>,
}

/// What custos knows about every tenant but one, for the key checks.
pub struct Survey {
    tenant: TenantId,
    depth: Depth,
    others: Vec<Other>,
    registry: KeyRegistry,
    policies: Vec<DeclaredKey>,
    ids: Ids,
}

/// Every key a descriptor names, with its role.
fn named_keys(d: &Descriptor) -> Vec<(KeyRef, &'static str)> {
    let mut out = vec![(d.key.clone(), "current")];
    if let Some(p) = &d.pending_key {
        out.push((p.clone(), "pending"));
    }
    for k in &d.previous_keys {
        out.push((k.clone(), "previous"));
    }
    if let Some(to) = d.epoch_shred.as_ref().and_then(|e| e.rewrap_to.as_ref()) {
        out.push((to.clone(), "re-wrap target"));
    }
    out
}

async fn view_of(ctx: &Context, tenant: &TenantId) -> Result<View> {
    let store = TenantStore::new(ctx.store.clone(), tenant);
    // Read before the store, as `Repo::open_for` does: a generation recorded
    // after the store read would make a writer's progress look like a replay.
    let seen = ctx.state.tenant_memory(tenant)?.descriptor_generation;
    // Parsed once per version the store holds (one conditional read each).
    let Some(parsed) = ctx.survey_cache.descriptor(&store).await? else {
        return Ok(View::Missing);
    };
    let d = match parsed {
        Ok(d) => d,
        Err(e) => return Ok(View::Unreadable(format!("does not parse ({e})"))),
    };
    if &d.tenant != tenant {
        return Ok(View::Unreadable(format!("names tenant {}", d.tenant)));
    }
    if d.generation < seen {
        return Ok(View::Unreadable(format!(
            "is generation {}, older than generation {seen} seen before (replayed)",
            d.generation
        )));
    }
    Ok(View::Readable(d))
}

impl Survey {
    /// Reads every other tenant's descriptor in the store, the key registry
    /// and the policies.
    pub async fn take(ctx: &Context, tenant: &TenantId, depth: Depth) -> Result<Survey> {
        let listing = ctx
            .store
            .list_with_delimiter(Some(&StorePath::from("tenants")))
            .await
            .map_err(|e| Error::store("list", "tenants/", e))?;
        let names: Vec<TenantId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| TenantId::new(p.filename()?).ok())
            .filter(|t| t != tenant)
            .collect();
        let views: Vec<(TenantId, Result<View>)> = futures::stream::iter(names)
            .map(|t| async move {
                let v = view_of(ctx, &t).await;
                (t, v)
            })
            .buffer_unordered(SURVEY_CONCURRENCY)
            .collect()
            .await;
        let mut others = Vec::with_capacity(views.len());
        for (t, v) in views {
            others.push(Other {
                tenant: t,
                view: v?,
                objects: None,
            });
        }
        others.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let policies = match &ctx.policies_dir {
            Some(dir) => {
                let (keys, unreadable) = declared_keys_cached(dir, &ctx.survey_cache.policies);
                for (file, why) in unreadable {
                    tracing::warn!(event = "policy.unreadable", file = %file.display(), error = %why, "key checks cannot read this policy's key");
                }
                keys
            }
            None => Vec::new(),
        };
        Ok(Survey {
            tenant: tenant.clone(),
            depth,
            others,
            registry: ctx.state.key_registry()?,
            policies,
            ids: Ids::default(),
        })
    }

    /// Every other tenant that uses `key` (resolved to `resolved`), by every
    /// source: descriptors, their objects tried under the key, the registry,
    /// the policies.
    async fn users(
        &mut self,
        ctx: &Context,
        key: &KeyRef,
        resolved: Option<&str>,
        purpose: Purpose,
    ) -> Result<Vec<Use>> {
        let Survey {
            tenant,
            depth,
            others,
            registry,
            policies,
            ids,
        } = self;
        let mut uses = Vec::new();
        let mut key_absent = None;
        for other in others.iter_mut() {
            let t = other.tenant.clone();
            let mut probe = *depth == Depth::Authenticated;
            let mut unreadable = None;
            match &other.view {
                View::Readable(d) => {
                    for (k, role) in named_keys(d) {
                        match ids.same(ctx, key, resolved, &k).await {
                            Ok(true) => uses.push(Use {
                                tenant: t.clone(),
                                how: format!(
                                    "its descriptor ({}) names {k} as its {role} key",
                                    d.state.as_str()
                                ),
                            }),
                            Ok(false) => {}
                            Err(why) => uses.push(Use {
                                tenant: t.clone(),
                                how: format!(
                                    "its descriptor names {k} as its {role} key, which could not be compared with {key}: {why}"
                                ),
                            }),
                        }
                    }
                    // "shredded" or "shredding" is a claim anyone can write:
                    // such a tenant's objects are tried too.
                    probe |= d.state != Lifecycle::Active;
                }
                View::Unreadable(why) => {
                    probe = true;
                    unreadable = Some(format!("its descriptor {why}"));
                }
                View::Missing => {
                    probe = true;
                    unreadable = Some("it has objects but no descriptor".to_owned());
                }
            }
            if !probe {
                continue;
            }
            // Asked once, before any object is read: with a thousand tenants
            // a first backup would otherwise read every other tenant's keys/.
            let absent = match key_absent {
                Some(a) => a,
                None => *key_absent.insert(provider_lacks(ctx, key).await),
            };
            if absent {
                continue;
            }
            if other.objects.is_none() {
                let store = TenantStore::new(ctx.store.clone(), &other.tenant);
                other.objects = Some(key_objects(&store).await?);
            }
            let objects = other.objects.as_deref().unwrap_or_default();
            match first_under(ctx, key, objects).await? {
                Ok(Some(i)) => uses.push(Use {
                    tenant: t.clone(),
                    how: format!("{} unwraps under it", objects[i].object),
                }),
                Ok(None) => {}
                // A key the provider does not know wraps nothing.
                Err(KeyError::NotFound { .. }) => {}
                Err(e) => {
                    if let (Some(state), Purpose::Bind) = (&unreadable, purpose) {
                        uses.push(Use {
                            tenant: t.clone(),
                            how: format!(
                                "{state}, and its objects could not be tried under {key} ({e}): nothing shows it does not use the key"
                            ),
                        });
                    }
                }
            }
        }
        for b in registry.bindings_of(key, resolved) {
            if &b.tenant != tenant && b.destroyed_at.is_none() {
                uses.push(Use {
                    tenant: b.tenant.clone(),
                    how: format!(
                        "the key registry of this host bound it to {} ({}, {})",
                        b.tenant,
                        b.why,
                        b.bound_at.format("%Y-%m-%d %H:%M:%S UTC")
                    ),
                });
            }
        }
        for p in policies.iter() {
            if &p.tenant == tenant {
                continue;
            }
            match ids.same(ctx, key, resolved, &p.key).await {
                Ok(true) => uses.push(Use {
                    tenant: p.tenant.clone(),
                    how: format!("its policy {} names it (as {})", p.file.display(), p.key),
                }),
                Ok(false) => {}
                Err(why) => uses.push(Use {
                    tenant: p.tenant.clone(),
                    how: format!(
                        "its policy {} names {}, which could not be compared with {key}: {why}",
                        p.file.display(),
                        p.key
                    ),
                }),
            }
        }
        Ok(uses)
    }
}

fn in_use(key: &KeyRef, uses: &[Use], refusing: &str) -> Error {
    let first = uses
        .first()
        .map(|u| u.tenant.to_string())
        .unwrap_or_default();
    let why: Vec<String> = uses
        .iter()
        .map(|u| format!("tenant {}: {}", u.tenant, u.how))
        .collect();
    Error::KeyInUse {
        key: key.to_string(),
        other: first,
        message: format!(
            "{} — {refusing} (one key serves one tenant: destroying a shared key would erase the other tenant's backups)",
            why.join("; ")
        ),
    }
}

/// Audits a refusal as `<scope>.refused` (`key.refused` for a binding,
/// `shred.refused`, `rotate.refused` for a destruction); the refusal stands
/// whether or not the record can be written.
async fn record_refusal(ctx: &Context, tenant: &TenantId, scope: &str, key: &KeyRef, e: &Error) {
    let event = format!("{scope}.refused");
    tracing::warn!(event = %event, tenant = %tenant, key = %key, error_kind = %e.kind(), error = %e, "key {key}: refused");
    let details = serde_json::json!({
        "reason": e.kind(),
        "key": key,
        "error": e.to_string(),
    });
    if let Err(err) = ctx.record(&event, Some(tenant), details).await {
        tracing::error!(event = "audit.failed", tenant = %tenant, error = %err, "could not record a key refusal");
    }
}

// ---------------------------------------------------------------------------
// Binding a key to a tenant

/// Every tenant but `tenant` that uses `key`, as far as a survey of `depth`
/// shows (for a new binding: an unreadable tenant whose objects cannot be
/// tried counts).
pub async fn users(
    ctx: &Context,
    tenant: &TenantId,
    key: &KeyRef,
    depth: Depth,
) -> Result<Vec<Use>> {
    let resolved = resolve(ctx, key).await.ok().flatten();
    let mut survey = Survey::take(ctx, tenant, depth).await?;
    survey
        .users(ctx, key, resolved.as_deref(), Purpose::Bind)
        .await
}

/// Refuses `key` for `tenant` when it is outside `[residency]` or any other
/// tenant uses it (the store, the registry, the policies; see [`Depth`]),
/// with an audit record (`key.refused`). Writes nothing else.
pub async fn check_bindable(
    ctx: &Context,
    tenant: &TenantId,
    key: &KeyRef,
    depth: Depth,
) -> Result<()> {
    if let Err(v) = ctx.residency.check_key(key) {
        let e = Error::Policy(format!("refusing {key} for tenant {tenant}: {v}"));
        record_refusal(ctx, tenant, "key", key, &e).await;
        return Err(e);
    }
    let uses = users(ctx, tenant, key, depth).await?;
    if uses.is_empty() {
        return Ok(());
    }
    let e = in_use(key, &uses, &format!("refusing it for tenant {tenant}"));
    record_refusal(ctx, tenant, "key", key, &e).await;
    Err(e)
}

/// Binds `key` to the tenant of `store`: refuses it when another tenant
/// uses it, then writes the tenant's key claim and the registry entry. The
/// key must exist and be usable (the claim is wrapped under it). Returns the
/// bytes written to the store (0 when the claim was there).
pub async fn bind(
    ctx: &Context,
    store: &TenantStore,
    key: &KeyRef,
    why: &str,
    depth: Depth,
) -> Result<u64> {
    check_bindable(ctx, store.tenant(), key, depth).await?;
    record_binding(ctx, store, key, why).await
}

/// Writes the claim and the registry entry of a binding already checked (or
/// proven: a key whose envelope of this tenant unwraps under it). Returns the
/// bytes written to the store.
pub async fn record_binding(
    ctx: &Context,
    store: &TenantStore,
    key: &KeyRef,
    why: &str,
) -> Result<u64> {
    let written = write_claim(ctx, store, key, why).await?;
    register(ctx, store.tenant(), key, why).await?;
    Ok(written)
}

/// Adds `key` to the registry for `tenant`; a conflicting entry is refused.
async fn register(ctx: &Context, tenant: &TenantId, key: &KeyRef, why: &str) -> Result<()> {
    let binding = KeyBinding {
        key: key.clone(),
        key_id: resolve(ctx, key).await.ok().flatten(),
        tenant: tenant.clone(),
        bound_at: Utc::now(),
        why: why.to_owned(),
        destroyed_at: None,
    };
    match ctx.state.bind_key(binding)? {
        Ok(()) => Ok(()),
        Err(other) => {
            let e = in_use(
                key,
                &[Use {
                    tenant: other.tenant.clone(),
                    how: format!(
                        "the key registry of this host bound it to {} ({}, {})",
                        other.tenant,
                        other.why,
                        other.bound_at.format("%Y-%m-%d %H:%M:%S UTC")
                    ),
                }],
                &format!("refusing it for tenant {tenant}"),
            );
            record_refusal(ctx, tenant, "key", key, &e).await;
            Err(e)
        }
    }
}

/// Writes the tenant's claim on `key` (`keys/claims/<claim id>`), unless a
/// valid one is there. A claim that does not unwrap (junk a store writer
/// left at the name) is replaced. Returns the bytes written (0: none).
pub async fn write_claim(
    ctx: &Context,
    store: &TenantStore,
    key: &KeyRef,
    why: &str,
) -> Result<u64> {
    let tenant = store.tenant();
    let name = ObjectName::KeyClaim(claim_id(key));
    let existing = store.get_if_exists(&name).await?;
    if let Some((bytes, _)) = &existing
        && claim_unwraps(ctx, tenant, key, bytes).await?
    {
        return Ok(0);
    }
    let (token, wrapped) = ctx
        .keys
        .key(key)?
        .generate_data_key(&WrapContext::claim(tenant))
        .await?;
    let claim = KeyClaim::new(tenant, key.clone(), why, wrapped, token.fingerprint());
    drop(token);
    let mode = match existing {
        None => PutMode::Create,
        Some((_, meta)) => PutMode::Update(UpdateVersion {
            e_tag: meta.e_tag,
            version: meta.version,
        }),
    };
    match store
        .put_conditional(&name, Bytes::from(claim.to_json()), mode)
        .await
    {
        Ok(_) => Ok(claim.to_json().len() as u64),
        // Another process wrote the claim meanwhile: it must be a valid one.
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => match store.get_if_exists(&name).await? {
            Some((bytes, _)) if claim_unwraps(ctx, tenant, key, &bytes).await? => Ok(0),
            _ => Err(Error::LeaseContended {
                tenant: tenant.to_string(),
                holder: format!(
                    "another writer changed {} concurrently",
                    store.display(&name)
                ),
                expires: "n/a".into(),
            }),
        },
        Err(e) => Err(Error::store("put", store.display(&name), e)),
    }
}

async fn claim_unwraps(
    ctx: &Context,
    tenant: &TenantId,
    key: &KeyRef,
    bytes: &[u8],
) -> Result<bool> {
    let Ok(claim) = KeyClaim::parse(bytes) else {
        return Ok(false);
    };
    Ok(matches!(
        try_unwrap(
            ctx,
            key,
            &claim.wrapped,
            &KeyClaim::context_for(tenant),
            Some(&claim.fingerprint)
        )
        .await?,
        Tried::Unwraps
    ))
}

/// For a tenant made before key claims existed: when `key` is proven the
/// tenant's by one of its envelopes (or the registry) but has no claim yet,
/// writes the claim and the registry entry, so the key stays provable after
/// its envelopes move away. Does nothing for an unproven key. Returns
/// whether the key is proven, and the bytes written to the store.
pub async fn ensure_claimed(
    ctx: &Context,
    store: &TenantStore,
    key: &KeyRef,
) -> Result<(bool, u64)> {
    let resolved = resolve(ctx, key).await.ok().flatten();
    match prove(ctx, store, key, resolved.as_deref()).await? {
        Ok(Proof::Claim { .. }) => {
            // The registry may not know it yet (a binding made on another host).
            if !ctx
                .state
                .key_registry()?
                .bindings_of(key, resolved.as_deref())
                .any(|b| &b.tenant == store.tenant())
            {
                register(ctx, store.tenant(), key, "proven-by-claim").await?;
            }
            Ok((true, 0))
        }
        Ok(Proof::Envelope { .. }) => Ok((
            true,
            record_binding(ctx, store, key, "proven-by-envelope").await?,
        )),
        // The registry proves it; a claim is written when the key can wrap
        // one (a disabled key cannot, and needs none to stay proven here).
        Ok(Proof::Registry { why, .. }) => match write_claim(ctx, store, key, &why).await {
            Ok(written) => Ok((true, written)),
            Err(Error::Key(e)) if !e.is_transient() => Ok((true, 0)),
            Err(e) => Err(e),
        },
        Err(_) => Ok((false, 0)),
    }
}

/// The checks before a shredded tenant id is reused with `key`
/// (`tenant init --allow-reuse`): the key must not be one the old lineage
/// names (a shredded tenant's keys are destroyed; one still alive means the
/// shred left it, and a new lineage must not inherit it), and no envelope of
/// the old lineage may still unwrap under the key it names: then the tenant
/// is not shredded at all, whatever its descriptor (which a store writer can
/// set to "shredded") says. `new_epoch`'s envelope under `key` is the
/// reuse's own, left by an interrupted run.
pub async fn check_reuse(
    ctx: &Context,
    store: &TenantStore,
    old: &Descriptor,
    key: &KeyRef,
    new_epoch: u32,
) -> Result<()> {
    let tenant = store.tenant();
    let resolved = resolve(ctx, key).await.ok().flatten();
    let mut ids = Ids::default();
    for (k, role) in named_keys(old) {
        if ids
            .same(ctx, key, resolved.as_deref(), &k)
            .await
            .unwrap_or(true)
        {
            return Err(Error::KeyInUse {
                key: key.to_string(),
                other: tenant.to_string(),
                message: format!(
                    "it is the {role} key of the shredded lineage of tenant {tenant}: a reused tenant id \
                     needs a new key (the old lineage's keys must stay destroyed)"
                ),
            });
        }
    }
    for l in store.list(Dir::Keys).await? {
        let Some(ObjectName::Envelope(e)) = l.name else {
            continue;
        };
        let name = ObjectName::Envelope(e);
        let Some((bytes, _)) = store.get_if_exists(&name).await? else {
            continue;
        };
        let Ok(env) = crate::format::envelope::Envelope::parse(&bytes) else {
            continue;
        };
        if e == new_epoch && &env.key == key {
            continue;
        }
        let wctx = WrapContext::tdk(tenant, e);
        if let Tried::Unwraps =
            try_unwrap(ctx, &env.key, &env.wrapped, &wctx, Some(&env.fingerprint)).await?
        {
            return Err(Error::TenantState {
                tenant: tenant.to_string(),
                state: old.state.as_str().into(),
                message: format!(
                    "is marked {} but its envelope {} still unwraps under {}: its keys were not \
                     destroyed, so it is not shredded; refusing to reuse the id over live data",
                    old.state.as_str(),
                    store.display(&name),
                    env.key
                ),
            });
        }
    }
    Ok(())
}

/// The cheap check every job with a policy makes: the registry of this host
/// must not bind `key` to another tenant.
pub fn check_registry(ctx: &Context, tenant: &TenantId, key: &KeyRef) -> Result<()> {
    let registry = ctx.state.key_registry()?;
    let uses: Vec<Use> = registry
        .bindings_of(key, None)
        .filter(|b| &b.tenant != tenant && b.destroyed_at.is_none())
        .map(|b| Use {
            tenant: b.tenant.clone(),
            how: format!(
                "the key registry of this host bound it to {} ({}, {})",
                b.tenant,
                b.why,
                b.bound_at.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        })
        .collect();
    if uses.is_empty() {
        Ok(())
    } else {
        Err(in_use(
            key,
            &uses,
            &format!("refusing to run a job of tenant {tenant} under it"),
        ))
    }
}

/// The policies of other tenants naming `key` as written (the check of a
/// CLI job, which reads only its own tenant's policy file).
pub fn check_policies(dir: &std::path::Path, tenant: &TenantId, key: &KeyRef) -> Result<()> {
    let uses: Vec<Use> = declared_keys(dir)
        .0
        .into_iter()
        .filter(|p| &p.tenant != tenant && &p.key == key)
        .map(|p| Use {
            tenant: p.tenant.clone(),
            how: format!("its policy {} names it", p.file.display()),
        })
        .collect();
    if uses.is_empty() {
        Ok(())
    } else {
        Err(in_use(
            key,
            &uses,
            &format!("refusing to run a job of tenant {tenant} under it"),
        ))
    }
}

/// Refuses to end `key` while one of the tenant's own envelopes (but
/// `except`'s, the epoch being shredded) still unwraps under it: for every
/// destruction but a tenant shred (the old key of `rotate --replace-cmk`,
/// the keys an epoch shred's re-wrap ends). Which key is "old" comes from
/// the descriptor (a re-run takes its last previous key), which a store
/// writer can set to the current key; and one key can be spelled two ways
/// (a KMS alias and its ARN). Trying the envelopes under the key is what no
/// edit or spelling hides: a key that still opens live data keys is not old.
/// A key that cannot be used (already destroyed, disabled) opens nothing.
pub async fn refuse_if_wrapping_live_envelopes(
    ctx: &Context,
    store: &TenantStore,
    key: &KeyRef,
    except: Option<u32>,
    action: &str,
) -> Result<()> {
    let tenant = store.tenant();
    let live: Vec<KeyObject> = key_objects(store)
        .await?
        .into_iter()
        .filter(|o| !o.is_claim && Some(o.context.epoch) != except)
        .collect();
    if let Ok(Some(i)) = first_under(ctx, key, &live).await? {
        let e = Error::KeyInUse {
            key: key.to_string(),
            other: tenant.to_string(),
            message: format!(
                "{} unwraps under it: it still wraps a live data key of tenant {tenant} — refusing to \
                 destroy it (only a shred of the whole tenant ends a key its live envelopes need)",
                live[i].object
            ),
        };
        record_refusal(ctx, tenant, action, key, &e).await;
        return Err(e);
    }
    Ok(())
}

/// Marks keys a shred or rotation destroyed in the registry.
pub fn record_destroyed(ctx: &Context, tenant: &TenantId, keys: &[KeyRef]) -> Result<()> {
    let now = Utc::now();
    for k in keys {
        ctx.state.mark_key_destroyed(k, tenant, now)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Destroying keys

/// Decides, for each of the tenant's keys, whether it may be destroyed. A key
/// is destroyed only when proven the tenant's ([`prove`]) and used by no
/// other tenant known anywhere ([`Depth::Authenticated`]). A key the provider
/// already shows destroyed (or does not know) needs no proof: nothing is done
/// to it. An unproven live key is refused by name, unless `skip` lists it
/// (the operator's word to leave it untouched). Refusals are audited
/// (`key.refused`); nothing is changed.
pub async fn decide_destroy(
    ctx: &Context,
    store: &TenantStore,
    keys: &[(KeyRef, KeyRole)],
    skip: &[KeyRef],
    action: &str,
) -> Result<Vec<KeyVerdict>> {
    let tenant = store.tenant().clone();
    let mut survey: Option<Survey> = None;
    let mut out = Vec::new();
    for (key, role) in keys {
        let verdict = match decide_one(ctx, store, &mut survey, key, *role, skip).await {
            Ok(v) => v,
            Err(e) => {
                if matches!(
                    e,
                    Error::KeyInUse { .. }
                        | Error::KeyOwnershipUnproven { .. }
                        | Error::Key(KeyError::Refused { .. })
                ) {
                    record_refusal(ctx, &tenant, action, key, &e).await;
                }
                return Err(e);
            }
        };
        out.push(KeyVerdict {
            key: key.clone(),
            role: *role,
            verdict,
        });
    }
    Ok(out)
}

async fn decide_one(
    ctx: &Context,
    store: &TenantStore,
    survey: &mut Option<Survey>,
    key: &KeyRef,
    role: KeyRole,
    skip: &[KeyRef],
) -> Result<Verdict> {
    let tenant = store.tenant();
    let described = match ctx.keys.key(key) {
        Ok(p) => p.describe().await,
        Err(e) => Err(e),
    };
    let (state, resolved) = match described {
        Ok(info) => (Some(info.state), Some(info.key_id)),
        // `[residency]` forbids calling its provider: nothing can be proven,
        // destroyed or checked. Left untouched on the operator's word (the
        // certificate then says so), else refused with what to change.
        Err(KeyError::Refused {
            key: name,
            operation,
            message,
        }) => {
            if skip.contains(key) {
                return Ok(Verdict::Skip {
                    why: format!("this configuration refuses to call its provider: {message}"),
                });
            }
            return Err(Error::Key(KeyError::Refused {
                key: name,
                operation,
                message: format!(
                    "{message}. A shred must end every key tenant {tenant} is known to own (its {} key {key}), \
                     and this configuration forbids calling its provider: allow it in [residency] for the shred \
                     and run the shred again (an interrupted shred stays fenced until then and resumes where it \
                     stopped), or leave it untouched with --skip-unproven-key {key}: the certificate then says \
                     it was not destroyed",
                    role_name(role)
                ),
            }));
        }
        Err(KeyError::NotFound { message, .. }) => {
            // A local key custos destroyed reads as destroyed (its tombstone
            // stays), never as missing. One the provider does not find is
            // elsewhere (the configuration names another key directory, or
            // another host sharing the store made it) or was removed outside
            // custos: "gone" would be a guess, and the certificate would call
            // it destroyed while it may live on. Whether or not this host's
            // registry bound it (a host that did not bind it knows least).
            if !key.kind().absence_means_gone() {
                if skip.contains(key) {
                    return Ok(Verdict::Skip {
                        why: format!("its provider does not find it ({message})"),
                    });
                }
                let bound = ctx
                    .state
                    .key_registry()?
                    .bindings_of(key, None)
                    .find(|b| &b.tenant == tenant && b.destroyed_at.is_none())
                    .map(|b| {
                        format!(
                            "; the key registry of this host bound it to tenant {tenant} ({}, {}) and custos \
                             never destroyed it",
                            b.why,
                            b.bound_at.format("%Y-%m-%d %H:%M:%S UTC")
                        )
                    })
                    .unwrap_or_default();
                return Err(Error::Key(KeyError::NotFound {
                    key: key.to_string(),
                    message: format!(
                        "{message}{bound}. A destroyed local key leaves its tombstone, so a missing one is \
                         not a destroyed one: it may live in another key directory or on the host that made \
                         it. Check that [local_keys] dir is the directory the key was made in (and shred on \
                         that host), or leave it untouched with --skip-unproven-key {key}: the certificate \
                         then says it was not destroyed. Refusing to record it as gone"
                    ),
                }));
            }
            return Ok(Verdict::AlreadyGone { state: None });
        }
        Err(e) if e.is_transient() => return Err(e.into()),
        // State unknown (not configured, access denied): proof decides.
        Err(_) => (None, resolve(ctx, key).await.ok().flatten()),
    };
    let gone = state.as_ref().is_some_and(shows_destruction);
    match prove(ctx, store, key, resolved.as_deref()).await? {
        // Proven and already destroyed: destroying again finishes what an
        // interrupted run began (a local key file left behind) and reports
        // the state; no other tenant can lose anything more.
        Ok(proof) if gone => Ok(Verdict::Destroy { proof }),
        Err(_) if gone => Ok(Verdict::AlreadyGone { state }),
        Err(why) if skip.contains(key) => Ok(Verdict::Skip {
            why: format!("nothing proved it the tenant's: {why}"),
        }),
        Err(why) => Err(Error::KeyOwnershipUnproven {
            key: key.to_string(),
            tenant: tenant.to_string(),
            message: format!(
                "tenant {tenant}'s descriptor or one of its claims or envelopes names it (as its {} key), \
                 but what the store says is not authenticated (whoever can write the store can edit it), \
                 and {why}. custos destroys \
                 only keys a tenant provably owns. If {key} is {tenant}'s key, make it provable \
                 (custos tenant init {tenant} records the current key's claim) or leave it \
                 untouched with --skip-unproven-key {key}: the certificate then says it was not destroyed",
                role_name(role)
            ),
        }),
        Ok(proof) => {
            if survey.is_none() {
                *survey = Some(Survey::take(ctx, tenant, Depth::Authenticated).await?);
            }
            let s = survey.as_mut().expect("taken above");
            let uses = s
                .users(ctx, key, resolved.as_deref(), Purpose::Destroy)
                .await?;
            if uses.is_empty() {
                Ok(Verdict::Destroy { proof })
            } else {
                Err(in_use(key, &uses, "refusing to destroy it"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::descriptor::Descriptor;

    async fn ctx() -> (tempfile::TempDir, Context) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::embedded(dir.path()).unwrap();
        (dir, ctx)
    }

    fn t(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn k(name: &str) -> KeyRef {
        KeyRef::local(name).unwrap()
    }

    /// A tenant with a descriptor and an envelope of epoch 1 under `key`.
    async fn tenant_with(ctx: &Context, tenant: &str, key: &str) -> TenantStore {
        let store = TenantStore::new(ctx.store.clone(), &t(tenant));
        let key = k(key);
        ctx.keys
            .local
            .as_ref()
            .unwrap()
            .create_key(&key)
            .await
            .unwrap();
        crate::repo::Repo::create_epoch_envelope(ctx, &store, &key, 1)
            .await
            .unwrap();
        let d = Descriptor::new(t(tenant), key, Utc::now());
        store
            .put(&ObjectName::Descriptor, Bytes::from(d.to_json()))
            .await
            .unwrap();
        store
    }

    async fn put_descriptor(store: &TenantStore, f: impl FnOnce(&mut Descriptor)) {
        let (bytes, _) = store
            .get_if_exists(&ObjectName::Descriptor)
            .await
            .unwrap()
            .unwrap();
        let mut d = Descriptor::parse(&bytes).unwrap();
        f(&mut d);
        store
            .put(&ObjectName::Descriptor, Bytes::from(d.to_json()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn proof_by_envelope_claim_and_registry() {
        let (_dir, ctx) = ctx().await;
        let alpha = tenant_with(&ctx, "alpha", "alpha").await;
        let beta = tenant_with(&ctx, "beta", "beta").await;
        // The current key: its envelope proves it.
        let p = prove(&ctx, &alpha, &k("alpha"), None)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(p, Proof::Envelope { .. }), "{p}");
        // Beta's key proves nothing for alpha, even with beta's envelope
        // and claim copied into alpha's prefix (their context names beta).
        record_binding(&ctx, &beta, &k("beta"), "tenant-init")
            .await
            .unwrap();
        for name in [
            ObjectName::Envelope(1),
            ObjectName::KeyClaim(claim_id(&k("beta"))),
        ] {
            let (bytes, _) = beta.get_if_exists(&name).await.unwrap().unwrap();
            let target = match name {
                ObjectName::Envelope(_) => ObjectName::Envelope(7),
                other => other,
            };
            alpha.put(&target, bytes).await.unwrap();
        }
        let why = prove(&ctx, &alpha, &k("beta"), None)
            .await
            .unwrap()
            .unwrap_err();
        assert!(why.tried_all && why.why.contains("no key claim"), "{why}");
        // Beta's own claim proves beta's key; the registry too.
        let p = prove(&ctx, &beta, &k("beta"), None).await.unwrap().unwrap();
        assert!(matches!(p, Proof::Registry { .. }), "{p}");
        std::fs::remove_file(ctx.state.root().join("keys.json")).unwrap();
        let p = prove(&ctx, &beta, &k("beta"), None).await.unwrap().unwrap();
        assert!(matches!(p, Proof::Claim { .. }), "{p}");
    }

    #[tokio::test]
    async fn junk_at_a_claims_name_is_no_proof_and_is_replaced() {
        let (_dir, ctx) = ctx().await;
        let alpha = tenant_with(&ctx, "alpha", "alpha").await;
        let name = ObjectName::KeyClaim(claim_id(&k("alpha")));
        alpha
            .put(&name, Bytes::from_static(b"{\"wrapped\": 1}"))
            .await
            .unwrap();
        // Still proven, by the envelope; the junk is overwritten by a valid claim.
        let p = prove(&ctx, &alpha, &k("alpha"), None)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(p, Proof::Envelope { .. }), "{p}");
        assert!(
            write_claim(&ctx, &alpha, &k("alpha"), "test")
                .await
                .unwrap()
                > 0
        );
        assert_eq!(
            write_claim(&ctx, &alpha, &k("alpha"), "test")
                .await
                .unwrap(),
            0
        );
        alpha.delete(&ObjectName::Envelope(1)).await.unwrap();
        let p = prove(&ctx, &alpha, &k("alpha"), None)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(p, Proof::Claim { .. }), "{p}");
    }

    #[tokio::test]
    async fn a_survey_finds_use_however_the_descriptor_is_hidden() {
        let (_dir, ctx) = ctx().await;
        let _alpha = tenant_with(&ctx, "alpha", "alpha").await;
        let beta = tenant_with(&ctx, "beta", "beta").await;
        let users = async |depth| {
            let mut s = Survey::take(&ctx, &t("alpha"), depth).await.unwrap();
            s.users(&ctx, &k("beta"), Some("local:beta"), Purpose::Destroy)
                .await
                .unwrap()
        };
        assert_eq!(users(Depth::Named).await.len(), 1);
        // Junk, deleted or "shredded": the envelope still unwraps under the key.
        beta.put(&ObjectName::Descriptor, Bytes::from_static(b"{junk"))
            .await
            .unwrap();
        let u = users(Depth::Named).await;
        assert!(u[0].how.contains("tenants/beta/keys/1 unwraps"), "{u:?}");
        beta.delete(&ObjectName::Descriptor).await.unwrap();
        assert_eq!(users(Depth::Named).await.len(), 1);
        let d = Descriptor::new(t("beta"), k("other"), Utc::now());
        beta.put(&ObjectName::Descriptor, Bytes::from(d.to_json()))
            .await
            .unwrap();
        // A readable, active descriptor naming another key hides beta from
        // the named survey, not from the authenticated one.
        assert!(users(Depth::Named).await.is_empty());
        assert_eq!(users(Depth::Authenticated).await.len(), 1);
        put_descriptor(&beta, |d| d.state = Lifecycle::Shredded).await;
        assert_eq!(users(Depth::Named).await.len(), 1);
        // Nothing in the store at all: the registry still knows.
        for l in beta.list_all().await.unwrap() {
            beta.delete_path(&l.path).await.unwrap();
        }
        assert!(users(Depth::Authenticated).await.is_empty());
        ctx.state
            .bind_key(KeyBinding {
                key: k("beta"),
                key_id: None,
                tenant: t("beta"),
                bound_at: Utc::now(),
                why: "tenant-init".into(),
                destroyed_at: None,
            })
            .unwrap()
            .unwrap();
        let u = users(Depth::Named).await;
        assert!(u[0].how.contains("key registry"), "{u:?}");
    }

    #[tokio::test]
    async fn policies_name_keys_too() {
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = Context::embedded(dir.path()).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("beta.toml"),
            "tenant = \"beta\"\nkey = \"local:beta\"\n",
        )
        .unwrap();
        // A broken file still declares its key.
        std::fs::write(
            policies.join("gamma.toml"),
            "key = \"local:gamma\"\nbogus = [\n",
        )
        .unwrap();
        ctx.policies_dir = Some(policies.clone());
        let err = check_bindable(&ctx, &t("zeta"), &k("beta"), Depth::Named)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "key_in_use");
        assert!(err.to_string().contains("beta.toml"), "{err}");
        assert!(
            check_bindable(&ctx, &t("beta"), &k("beta"), Depth::Named)
                .await
                .is_ok()
        );
        assert!(check_policies(&policies, &t("zeta"), &k("beta")).is_err());
        assert!(check_policies(&policies, &t("beta"), &k("beta")).is_ok());
    }

    /// An AWS KMS stand-in that resolves an alias and an ARN to one key id,
    /// and unwraps nothing.
    #[derive(Debug)]
    struct FakeKms;

    const ARN: &str =
        "arn:aws:kms:eu-central-1:111122223333:key/0b6f2c1e-1111-2222-3333-444455556666";

    #[async_trait::async_trait]
    impl crate::keys::KeyProvider for FakeKms {
        fn kind(&self) -> ProviderKind {
            ProviderKind::AwsKms
        }
        fn custody(&self, _key: &KeyRef) -> crate::keys::Custody {
            crate::keys::Custody {
                provider: ProviderKind::AwsKms,
                holder: "a fake KMS".into(),
                details: Default::default(),
                network: false,
            }
        }
        async fn describe(
            &self,
            key: &KeyRef,
        ) -> std::result::Result<crate::keys::KeyInfo, KeyError> {
            match key.id() {
                "alias/beta" | ARN => Ok(crate::keys::KeyInfo {
                    reference: key.clone(),
                    key_id: ARN.into(),
                    state: KeyState::Enabled,
                    origin: crate::keys::KeyOrigin::Provider,
                    current_version: None,
                    created_at: None,
                    rotated_at: None,
                }),
                _ => Err(KeyError::NotFound {
                    key: key.to_string(),
                    message: String::new(),
                }),
            }
        }
        async fn create_key(
            &self,
            _: &KeyRef,
        ) -> std::result::Result<crate::keys::KeyInfo, KeyError> {
            Err(unsupported())
        }
        async fn generate_data_key(
            &self,
            _: &KeyRef,
            _: &WrapContext,
        ) -> std::result::Result<(crate::keys::DataKey, WrappedKey), KeyError> {
            Err(unsupported())
        }
        async fn wrap(
            &self,
            _: &KeyRef,
            _: &crate::keys::DataKey,
            _: &WrapContext,
        ) -> std::result::Result<WrappedKey, KeyError> {
            Err(unsupported())
        }
        async fn unwrap(
            &self,
            key: &KeyRef,
            _: &WrappedKey,
            _: &WrapContext,
        ) -> std::result::Result<crate::keys::DataKey, KeyError> {
            Err(KeyError::InvalidCiphertext {
                key: key.to_string(),
                message: String::new(),
            })
        }
        async fn rewrap(
            &self,
            _: &KeyRef,
            _: &WrappedKey,
            _: &WrapContext,
            _: &KeyRef,
        ) -> std::result::Result<WrappedKey, KeyError> {
            Err(unsupported())
        }
        async fn rotate(&self, _: &KeyRef) -> std::result::Result<crate::keys::KeyInfo, KeyError> {
            Err(unsupported())
        }
        async fn disable(&self, _: &KeyRef) -> std::result::Result<crate::keys::KeyInfo, KeyError> {
            Err(unsupported())
        }
        async fn enable(&self, _: &KeyRef) -> std::result::Result<crate::keys::KeyInfo, KeyError> {
            Err(unsupported())
        }
        async fn destroy(
            &self,
            _: &KeyRef,
            _: u32,
        ) -> std::result::Result<crate::keys::Destruction, KeyError> {
            Err(unsupported())
        }
    }

    fn unsupported() -> KeyError {
        KeyError::Unsupported {
            provider: "aws-kms",
            operation: "this test",
        }
    }

    #[tokio::test]
    async fn one_kms_key_by_alias_and_by_arn_is_one_key() {
        let (_dir, mut ctx) = ctx().await;
        ctx.keys.aws_kms = Some(std::sync::Arc::new(FakeKms));
        let alias = KeyRef::parse("aws-kms:alias/beta").unwrap();
        let arn = KeyRef::parse(&format!("aws-kms:{ARN}")).unwrap();
        let beta = TenantStore::new(ctx.store.clone(), &t("beta"));
        let d = Descriptor::new(t("beta"), alias.clone(), Utc::now());
        beta.put(&ObjectName::Descriptor, Bytes::from(d.to_json()))
            .await
            .unwrap();
        // Beta's descriptor names the alias; the ARN is the same key.
        let err = check_bindable(&ctx, &t("zeta"), &arn, Depth::Named)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "key_in_use");
        assert!(err.to_string().contains("aws-kms:alias/beta"), "{err}");
        // Another alias that the provider does not know is another key.
        let other = KeyRef::parse("aws-kms:alias/zeta").unwrap();
        check_bindable(&ctx, &t("zeta"), &other, Depth::Named)
            .await
            .unwrap();
        // The registry compares by resolved id too: beta's descriptor gone,
        // its binding (made under the ARN) still refuses the alias.
        beta.delete(&ObjectName::Descriptor).await.unwrap();
        check_bindable(&ctx, &t("zeta"), &alias, Depth::Named)
            .await
            .unwrap();
        ctx.state
            .bind_key(KeyBinding {
                key: arn.clone(),
                key_id: Some(ARN.into()),
                tenant: t("beta"),
                bound_at: Utc::now(),
                why: "tenant-init".into(),
                destroyed_at: None,
            })
            .unwrap()
            .unwrap();
        let err = check_bindable(&ctx, &t("zeta"), &alias, Depth::Named)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("key registry"), "{err}");
    }

    #[tokio::test]
    async fn destroy_needs_proof_and_no_other_user() {
        let (_dir, ctx) = ctx().await;
        let alpha = tenant_with(&ctx, "alpha", "alpha").await;
        let _beta = tenant_with(&ctx, "beta", "beta").await;
        let keys = [
            (k("alpha"), KeyRole::Current),
            (k("beta"), KeyRole::Previous),
        ];
        let err = decide_destroy(&ctx, &alpha, &keys, &[], "shred")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "key_ownership_unproven", "{err}");
        assert!(err.to_string().contains("local:beta"), "{err}");
        // Skipped on the operator's word: left untouched.
        let v = decide_destroy(&ctx, &alpha, &keys, &[k("beta")], "shred")
            .await
            .unwrap();
        assert!(matches!(v[0].verdict, Verdict::Destroy { .. }));
        assert!(matches!(v[1].verdict, Verdict::Skip { .. }));
        // A local key the provider does not find is not a gone one (a
        // destroyed local key leaves its tombstone): refused, or skipped on
        // the operator's word.
        let gone = [(k("nobody"), KeyRole::Previous)];
        let err = decide_destroy(&ctx, &alpha, &gone, &[], "shred")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "key_unavailable", "{err}");
        let v = decide_destroy(&ctx, &alpha, &gone, &[k("nobody")], "shred")
            .await
            .unwrap();
        assert!(matches!(v[0].verdict, Verdict::Skip { .. }));
        // Proven, but another tenant's policy... here its registry entry names it.
        ctx.state
            .bind_key(KeyBinding {
                key: k("alpha"),
                key_id: None,
                tenant: t("beta"),
                bound_at: Utc::now(),
                why: "tenant-init".into(),
                destroyed_at: None,
            })
            .unwrap()
            .unwrap();
        let err = decide_destroy(&ctx, &alpha, &keys[..1], &[], "shred")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "key_in_use", "{err}");
    }

    /// The survey's descriptor cache (one per context) reuses a parse only
    /// while the store answers its ETag, and re-judges replay every time: a
    /// descriptor unchanged in the store reads as replayed once this host
    /// saw a newer generation (another job, another process).
    #[tokio::test]
    async fn a_cached_descriptor_is_rejudged_and_reread() {
        let (_dir, ctx) = ctx().await;
        let _alpha = tenant_with(&ctx, "alpha", "alpha").await;
        let beta = tenant_with(&ctx, "beta", "beta").await;
        let users = async |key: &str| {
            let mut s = Survey::take(&ctx, &t("alpha"), Depth::Named).await.unwrap();
            s.users(&ctx, &k(key), None, Purpose::Bind).await.unwrap()
        };
        let u = users("beta").await;
        assert!(u[0].how.contains("its descriptor (active) names"), "{u:?}");
        // Cached now; the same bytes, but this host saw generation 1 + theirs.
        let (bytes, _) = beta
            .get_if_exists(&ObjectName::Descriptor)
            .await
            .unwrap()
            .unwrap();
        let generation = Descriptor::parse(&bytes).unwrap().generation;
        ctx.state
            .saw_descriptor_generation(&t("beta"), generation + 1)
            .unwrap();
        let u = users("beta").await;
        assert_eq!(u.len(), 1, "{u:?}");
        assert!(u[0].how.contains("tenants/beta/keys/1 unwraps"), "{u:?}");
        // A rewritten descriptor is read again: it now names a fresh key.
        put_descriptor(&beta, |d| {
            d.generation = generation + 2;
            d.pending_key = Some(k("fresh"));
        })
        .await;
        let u = users("fresh").await;
        assert!(
            u[0].how.contains("names local:fresh as its pending key"),
            "{u:?}"
        );
    }

    /// A key its provider does not know wraps nothing, so no tenant's
    /// objects are read for it; what the descriptors, the registry and the
    /// policies name still counts.
    #[tokio::test]
    async fn an_unknown_key_is_still_refused_by_name() {
        let (_dir, ctx) = ctx().await;
        let beta = tenant_with(&ctx, "beta", "beta").await;
        let _gamma = tenant_with(&ctx, "gamma", "gamma").await;
        put_descriptor(&beta, |d| d.pending_key = Some(k("fresh"))).await;
        let err = check_bindable(&ctx, &t("alpha"), &k("fresh"), Depth::Authenticated)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "key_in_use", "{err}");
        assert!(err.to_string().contains("tenant beta"), "{err}");
        // Unknown and named by nobody: free, whatever the store holds (an
        // unreadable descriptor included).
        beta.put(&ObjectName::Descriptor, Bytes::from_static(b"{junk"))
            .await
            .unwrap();
        check_bindable(&ctx, &t("alpha"), &k("fresh"), Depth::Authenticated)
            .await
            .unwrap();
        // Once the key exists, beta's objects are tried under it again.
        let fresh = k("fresh");
        ctx.keys
            .local
            .as_ref()
            .unwrap()
            .create_key(&fresh)
            .await
            .unwrap();
        crate::repo::Repo::create_epoch_envelope(&ctx, &beta, &fresh, 2)
            .await
            .unwrap();
        let err = check_bindable(&ctx, &t("alpha"), &fresh, Depth::Authenticated)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("tenants/beta/keys/2 unwraps"),
            "{err}"
        );
    }
}
