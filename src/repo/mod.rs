//! One tenant's repository, opened for a job: its descriptor (lifecycle fence,
//! CMK, epochs), its data keys (unwrapped on demand, dropped with the repo),
//! its index and its snapshots.

mod claimed;
pub mod index;
pub mod ownership;
pub mod survey_cache;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use object_store::{PutMode, UpdateVersion};
use tokio::sync::Mutex;

pub use index::{BlobMarks, ByPack, Dedup, Index, IndexBuilder, Location};

use crate::context::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::format::descriptor::{Descriptor, EpochState, Lifecycle};
use crate::format::envelope::Envelope;
use crate::format::ids::{IndexId, SnapshotId};
use crate::format::index::IndexFile;
use crate::format::seal::Header;
use crate::format::snapshot::Snapshot;
use crate::keys::derive::EpochKeys;
use crate::keys::{KeyError, KeyRef, WrapContext};
use crate::store::deletions::Hidden;
use crate::store::layout::Dir;
use crate::store::tenant::Listed;
use crate::store::{ObjectName, TenantStore};
use crate::tenant::TenantId;

/// Parallel reads when loading many small objects (index files, snapshots).
const LOAD_CONCURRENCY: usize = 8;

/// A problem found in the repository, for `check` and listings that go on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fault {
    pub object: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl Fault {
    pub fn from_error(object: impl Into<String>, e: &Error) -> Self {
        Fault {
            object: object.into(),
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// The data keys a job unwrapped, and the envelopes its provider refused.
#[derive(Default)]
struct KeyCache {
    unwrapped: BTreeMap<u32, Arc<EpochKeys>>,
    refused: BTreeMap<u32, (Envelope, KeyError)>,
}

pub struct Repo {
    ctx: Context,
    store: TenantStore,
    descriptor: Descriptor,
    descriptor_version: UpdateVersion,
    keys: Mutex<KeyCache>,
    /// What pending deletions hide from this job's view (readers and backup:
    /// see [`Repo::reload`]); `None` sees everything.
    hidden: Option<Arc<Hidden>>,
    /// A descriptor read after this one, for an epoch or a key that a writer
    /// running beside this reader added meanwhile (a new epoch, a CMK move).
    newer: std::sync::Mutex<Option<Arc<Descriptor>>>,
}

/// What a job does with the tenant's key, for the policy check of
/// [`Repo::open_for`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyUse {
    /// The job may encrypt new data or wrap new data keys (backup, rotate,
    /// and the writers kept strict: forget, prune): the policy must name the
    /// tenant's key.
    Writes,
    /// The job only reads, or destroys (restore, drill, check, snapshots,
    /// shred): a policy that still names a key the tenant moved away from is
    /// a warning (`policy.stale_key`), not a refusal.
    ReadsOnly,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("tenant", &self.descriptor.tenant)
            .finish_non_exhaustive()
    }
}

impl Repo {
    /// Opens an initialised tenant. `policy_key` is the key the operator's policy
    /// names: the descriptor must use it (or be moving to or from it), so a store
    /// attacker cannot swap in a key of their own.
    pub async fn open(
        ctx: &Context,
        tenant: &TenantId,
        policy_key: Option<&KeyRef>,
    ) -> Result<Repo> {
        Repo::open_for(ctx, tenant, policy_key, PolicyUse::Writes).await
    }

    /// [`Repo::open`] for a job that uses the key as `usage` says.
    pub async fn open_for(
        ctx: &Context,
        tenant: &TenantId,
        policy_key: Option<&KeyRef>,
        usage: PolicyUse,
    ) -> Result<Repo> {
        let store = TenantStore::new(ctx.store.clone(), tenant);
        // What was seen is read *before* the store: a writer beside this job
        // records a generation only after the store holds it, so the store
        // read below sees at least that one. Read after, a writer's update
        // in between would look like a replay.
        let seen = ctx.state.tenant_memory(tenant)?.descriptor_generation;
        let Some((bytes, meta)) = store.get_if_exists(&ObjectName::Descriptor).await? else {
            if seen > 0 {
                return Err(Error::missing(
                    store.display(&ObjectName::Descriptor),
                    format!("the tenant descriptor is gone (generation {seen} was seen before)"),
                ));
            }
            return Err(Error::TenantNotFound {
                tenant: tenant.to_string(),
            });
        };
        let descriptor = Descriptor::parse(&bytes)
            .map_err(|e| Error::corrupt(store.display(&ObjectName::Descriptor), e))?;
        if &descriptor.tenant != tenant {
            return Err(Error::Foreign {
                object: store.display(&ObjectName::Descriptor),
                reason: format!("descriptor is for tenant {}", descriptor.tenant),
            });
        }
        let repo = Repo {
            ctx: ctx.clone(),
            store,
            descriptor,
            descriptor_version: UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            },
            keys: Mutex::default(),
            hidden: None,
            newer: std::sync::Mutex::new(None),
        };
        repo.check_generation(seen)?;
        if let Some(k) = policy_key {
            match usage {
                PolicyUse::Writes => repo.check_policy_key(k)?,
                PolicyUse::ReadsOnly => repo.check_policy_key_for_reading(k)?,
            }
        }
        Ok(repo)
    }

    /// `seen`: the generation this installation had seen before the
    /// descriptor was read.
    fn check_generation(&self, seen: u64) -> Result<()> {
        let now = self.descriptor.generation;
        if now < seen {
            return Err(Error::Rollback {
                object: self.store.display(&ObjectName::Descriptor),
                reason: format!(
                    "descriptor generation {now} is older than generation {seen} seen before (replayed)"
                ),
            });
        }
        if now > seen {
            self.ctx
                .state
                .saw_descriptor_generation(self.tenant(), now)?;
        }
        Ok(())
    }

    /// The policy must name the tenant's key, or, while a `rotate --replace-cmk`
    /// is moving the tenant, the key it moves to (the operator may update the
    /// policy before or after running the move).
    ///
    /// A policy naming a *previous* key is refused: the policy pins the key that
    /// protects new data, and accepting any key listed in `previous_keys` (which
    /// the store holds) would let whoever can write the descriptor substitute a
    /// key of their own and list the operator's key as "previous".
    pub fn check_policy_key(&self, policy_key: &KeyRef) -> Result<()> {
        let d = &self.descriptor;
        if &d.key == policy_key || d.pending_key.as_ref() == Some(policy_key) {
            return Ok(());
        }
        let tenant = &d.tenant;
        if d.previous_keys.contains(policy_key) {
            let when = d
                .cmk_rotated_at
                .map(|t| format!(" on {}", t.format("%Y-%m-%d %H:%M UTC")))
                .unwrap_or_default();
            return Err(Error::Policy(format!(
                "tenant {tenant} was moved from key {policy_key} to {}{when} (custos rotate --replace-cmk), \
                 but its policy still names the old key: set `key = \"{}\"` in the policy of {tenant}",
                d.key, d.key
            )));
        }
        Err(Error::Policy(format!(
            "tenant {tenant} is under key {}, but its policy names {policy_key}; \
             to move the tenant to {policy_key}, run `custos rotate {tenant} --replace-cmk {policy_key}`",
            d.key
        )))
    }

    /// [`Repo::check_policy_key`] for a job that neither encrypts new data
    /// nor wraps new keys: a policy naming a key the tenant moved away from
    /// (configuration drift after `rotate --replace-cmk`) lets it run, with
    /// a `policy.stale_key` warning that says what to change. A key that was
    /// never the tenant's is still refused. This keeps the reasoning above:
    /// nothing new is ever protected by a key the store chose, since every
    /// job that would protect something new uses [`PolicyUse::Writes`].
    pub fn check_policy_key_for_reading(&self, policy_key: &KeyRef) -> Result<()> {
        match self.check_policy_key(policy_key) {
            Err(e) if self.descriptor.previous_keys.contains(policy_key) => {
                let d = &self.descriptor;
                tracing::warn!(
                    event = "policy.stale_key",
                    tenant = %d.tenant,
                    policy_key = %policy_key,
                    key = %d.key,
                    "{e}; reading and shredding go on, backups and rotations are refused until the policy names {}",
                    d.key
                );
                Ok(())
            }
            other => other,
        }
    }

    /// Initialises a tenant: its CMK (created if the local provider manages it),
    /// the data key of epoch 1, the descriptor. Idempotent; resumes an
    /// interrupted init; never writes over existing tenant data.
    pub async fn init(
        ctx: &Context,
        tenant: &TenantId,
        key: &KeyRef,
        allow_reuse: bool,
    ) -> Result<(Repo, bool)> {
        let create = key.kind() == crate::keys::ProviderKind::Local;
        Repo::init_with(ctx, tenant, key, allow_reuse, create).await
    }

    /// [`Repo::init`], saying whether the CMK may be created in its provider
    /// when it lacks it (`tenant init --create-key`). Without it the key must
    /// exist: an HSM object is made only when asked for. Local keys are
    /// always created ([`Repo::init`]); AWS KMS keys never are (the
    /// customer's to create).
    pub async fn init_with(
        ctx: &Context,
        tenant: &TenantId,
        key: &KeyRef,
        allow_reuse: bool,
        create_key: bool,
    ) -> Result<(Repo, bool)> {
        // The descriptor is created and updated conditionally.
        crate::store::probe::require_conditional_writes(ctx).await?;
        let store = TenantStore::new(ctx.store.clone(), tenant);
        let mut leftovers = Vec::new();
        // Twice at most: a descriptor that appears between the first look and
        // the listing is another process's init (two daemons racing for the
        // first backup); it is opened, not refused as foreign data.
        for _ in 0..2 {
            match Repo::open(ctx, tenant, None).await {
                Ok(repo) => {
                    if repo.descriptor.state == Lifecycle::Active {
                        repo.check_policy_key(key)?;
                        // A tenant made before key claims existed gets its
                        // claim now, proven by its envelope (and a key another
                        // tenant's binding holds is refused here).
                        ownership::ensure_claimed(ctx, &repo.store, &repo.descriptor.key).await?;
                        return Ok((repo, false));
                    }
                    if !allow_reuse {
                        return Err(repo.lifecycle_error("cannot be initialised again"));
                    }
                    return Repo::reinit(ctx, repo, key, create_key)
                        .await
                        .map(|r| (r, true));
                }
                Err(Error::TenantNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            leftovers = store
                .list_all()
                .await?
                .into_iter()
                // Lease and reader records are operational, not data; the first
                // envelope and the key claim are an interrupted init's own.
                .filter(|l| {
                    !matches!(
                        l.name,
                        Some(
                            ObjectName::Envelope(1)
                                | ObjectName::Lease
                                | ObjectName::Reader(_)
                                | ObjectName::KeyClaim(_)
                        )
                    )
                })
                .collect();
            if !leftovers
                .iter()
                .any(|l| l.name == Some(ObjectName::Descriptor))
            {
                break;
            }
        }
        if let Some(first) = leftovers.first() {
            return Err(Error::InvalidArgument(format!(
                "tenant {tenant} has no descriptor but its prefix holds {} object(s) (e.g. tenants/{tenant}/{}): \
                 refusing to initialise over existing data",
                leftovers.len(),
                first.path
            )));
        }
        // One key, one tenant: refused before anything is created. Every
        // other tenant's objects are tried under the key (once per tenant's
        // life): a store writer can make a descriptor name another key, and
        // a host whose registry and policies do not know that tenant would
        // otherwise bind its key to a second tenant, whose data the first
        // tenant's key holder could then decrypt.
        ownership::check_bindable(ctx, tenant, key, ownership::Depth::Authenticated).await?;
        // Recorded before any key is created: no record, no init.
        ctx.record(
            "tenant.init.begin",
            Some(tenant),
            serde_json::json!({ "key": key, "epoch": 1, "reuse": false }),
        )
        .await?;
        let info = Repo::ensure_key(ctx, key, create_key).await?;
        if !info.state.is_usable() {
            return Err(Error::Key(KeyError::Backend {
                provider: key.kind().scheme(),
                key: key.to_string(),
                message: format!("the key is {}, not enabled", info.state.name()),
            }));
        }
        let now = Utc::now();
        let descriptor = Descriptor::new(tenant.clone(), key.clone(), now);
        Repo::create_epoch_envelope(ctx, &store, key, 1).await?;
        // Before the descriptor: a tenant never exists without its claim.
        ownership::record_binding(ctx, &store, key, "tenant-init").await?;
        let body = Bytes::from(descriptor.to_json());
        let r = store
            .put_conditional(&ObjectName::Descriptor, body, PutMode::Create)
            .await
            .map_err(|e| conditional_error(&store, &ObjectName::Descriptor, e))?;
        ctx.state
            .saw_descriptor_generation(tenant, descriptor.generation)?;
        ctx.record(
            "tenant.init",
            Some(tenant),
            serde_json::json!({ "key": key, "key_id": info.key_id, "epoch": 1, "reuse": false }),
        )
        .await?;
        let repo = Repo {
            ctx: ctx.clone(),
            store,
            descriptor,
            descriptor_version: UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            },
            keys: Mutex::default(),
            hidden: None,
            newer: std::sync::Mutex::new(None),
        };
        Ok((repo, true))
    }

    /// A shredded tenant id, reused on request: a new lineage whose epochs
    /// continue after the old ones, so no old envelope name is ever reused.
    async fn reinit(ctx: &Context, mut old: Repo, key: &KeyRef, create_key: bool) -> Result<Repo> {
        if old.descriptor.state != Lifecycle::Shredded {
            return Err(
                old.lifecycle_error("is being shredded; finish the shred before reusing the id")
            );
        }
        let epoch = old
            .descriptor
            .epochs
            .iter()
            .map(|e| e.epoch)
            .max()
            .unwrap_or(0)
            + 1;
        // `--allow-reuse` is no way around one key, one tenant: the key is
        // checked like a first init's, and must not be the old lineage's.
        ownership::check_reuse(ctx, &old.store, &old.descriptor, key, epoch).await?;
        ownership::check_bindable(ctx, old.tenant(), key, ownership::Depth::Authenticated).await?;
        ctx.record(
            "tenant.init.begin",
            Some(old.tenant()),
            serde_json::json!({ "key": key, "epoch": epoch, "reuse": true }),
        )
        .await?;
        Repo::ensure_key(ctx, key, create_key).await?;
        Repo::create_epoch_envelope(ctx, &old.store, key, epoch).await?;
        ownership::record_binding(ctx, &old.store, key, "tenant-reinit").await?;
        let now = Utc::now();
        old.update_descriptor(|d| {
            let generation = d.generation;
            *d = Descriptor::new(d.tenant.clone(), key.clone(), now);
            d.generation = generation;
            d.current_epoch = epoch;
            d.epochs[0].epoch = epoch;
        })
        .await?;
        ctx.record(
            "tenant.init",
            Some(old.tenant()),
            serde_json::json!({ "key": key, "epoch": epoch, "reuse": true }),
        )
        .await?;
        Ok(old)
    }

    /// The CMK a new tenant is made under: created where `create` allows it
    /// and the provider manages creation, else described (it must exist).
    async fn ensure_key(ctx: &Context, key: &KeyRef, create: bool) -> Result<crate::keys::KeyInfo> {
        let cmk = ctx.keys.key(key)?;
        if create {
            match cmk.create().await {
                Ok(info) => return Ok(info),
                Err(KeyError::Unsupported { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match cmk.describe().await {
            Ok(info) => Ok(info),
            // PKCS#11 objects and KMIP keys are made only when asked for.
            Err(KeyError::NotFound { key: k, message })
                if !create
                    && matches!(
                        key.kind(),
                        crate::keys::ProviderKind::Pkcs11 | crate::keys::ProviderKind::Kmip
                    ) =>
            {
                Err(Error::Key(KeyError::NotFound {
                    key: k,
                    message: format!("{message}; `custos tenant init --create-key` creates it"),
                }))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Generates the data key of `epoch` and stores its envelope (create-only;
    /// an envelope left by an interrupted run is reused if it unwraps).
    pub async fn create_epoch_envelope(
        ctx: &Context,
        store: &TenantStore,
        key: &KeyRef,
        epoch: u32,
    ) -> Result<()> {
        let tenant = store.tenant();
        // The shred fence: no new data key for a tenant being shredded, whatever
        // the caller's copy of the descriptor says.
        if let Some((bytes, _)) = store.get_if_exists(&ObjectName::Descriptor).await?
            && let Ok(d) = Descriptor::parse(&bytes)
            && d.state == Lifecycle::Shredding
        {
            return Err(Error::TenantState {
                tenant: tenant.to_string(),
                state: d.state.as_str().into(),
                message: "is being shredded: new data keys refused".into(),
            });
        }
        let name = ObjectName::Envelope(epoch);
        if let Some((bytes, _)) = store.get_if_exists(&name).await? {
            let env =
                Envelope::parse(&bytes).map_err(|e| Error::corrupt(store.display(&name), e))?;
            let ctx_w = WrapContext::tdk(tenant, epoch);
            if &env.key == key
                && ctx
                    .keys
                    .key(key)?
                    .unwrap(&env.wrapped, &ctx_w)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            return Err(Error::InvalidArgument(format!(
                "{} already exists and does not unwrap under {key}: refusing to replace a data key",
                store.display(&name)
            )));
        }
        let (data_key, wrapped) = ctx
            .keys
            .key(key)?
            .generate_data_key(&WrapContext::tdk(tenant, epoch))
            .await?;
        let env = Envelope::new(tenant, epoch, key.clone(), wrapped, data_key.fingerprint());
        store
            .put_conditional(&name, Bytes::from(env.to_json()), PutMode::Create)
            .await
            .map_err(|e| conditional_error(store, &name, e))?;
        Ok(())
    }

    /// Re-reads the descriptor from the store and, with `hide`, leaves what
    /// pending deletions name out of this job's view: index files, packs,
    /// snapshots and envelopes a deleter has planned to delete
    /// (`locks/deletions/`). Both reads go out side by side (one round trip).
    ///
    /// Jobs call it (through the runner) right after taking the tenant lease
    /// or registering their reader record, so the lifecycle fence is checked
    /// on the state the lease protects, and readers never read what a deleter
    /// may delete under them (they hide); backup hides so that it never
    /// deduplicates against such data. Deleters themselves never hide: they
    /// decide from the whole repository, never from a plan (which the store
    /// could forge).
    pub async fn reload(&mut self, hide: bool) -> Result<()> {
        let tenant = self.descriptor.tenant.clone();
        let hidden = async {
            match hide {
                true => Hidden::load(&self.store).await.map(Some),
                false => Ok(None),
            }
        };
        let (fresh, hidden) = tokio::try_join!(Repo::open(&self.ctx, &tenant, None), hidden)?;
        if fresh.descriptor != self.descriptor {
            *self.keys.lock().await = KeyCache::default();
        }
        self.descriptor = fresh.descriptor;
        self.descriptor_version = fresh.descriptor_version;
        if let Some(hidden) = hidden {
            if hidden.plans > 0 {
                tracing::debug!(tenant = %self.tenant(), plans = hidden.plans, "pending deletions hidden from this job");
            }
            self.hidden = Some(Arc::new(hidden));
        }
        Ok(())
    }

    pub fn tenant(&self) -> &TenantId {
        &self.descriptor.tenant
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    pub fn store(&self) -> &TenantStore {
        &self.store
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// What this job's view hides (nothing unless [`Repo::reload`] hid it).
    pub fn hidden(&self) -> Option<&Hidden> {
        self.hidden.as_deref()
    }

    fn is_hidden(&self, name: &ObjectName) -> bool {
        let Some(h) = &self.hidden else { return false };
        match name {
            ObjectName::Index(id) => h.index.contains(id),
            ObjectName::Pack(id) => h.packs.contains(id),
            ObjectName::Snapshot(id) => h.snapshots.contains(id),
            ObjectName::Envelope(e) => h.envelopes.contains(e),
            _ => false,
        }
    }

    /// The epochs whose keys a reader may need: live ones, less any whose
    /// envelope a pending epoch shred hides.
    pub fn live_epochs(&self) -> Vec<u32> {
        self.descriptor
            .live_epochs()
            .map(|e| e.epoch)
            .filter(|e| !self.is_hidden(&ObjectName::Envelope(*e)))
            .collect()
    }

    /// Whether `epoch` is an epoch of the tenant, by this job's descriptor or,
    /// failing that, by the descriptor now in the store (a backup beside this
    /// reader may have started a new epoch since it opened the tenant).
    pub async fn knows_epoch(&self, epoch: u32) -> Result<bool> {
        Ok(self.epoch_record(epoch).await?.is_some())
    }

    async fn epoch_record(
        &self,
        epoch: u32,
    ) -> Result<Option<crate::format::descriptor::EpochRecord>> {
        if let Some(r) = self.descriptor.epoch(epoch) {
            return Ok(Some(r.clone()));
        }
        Ok(self
            .newer_descriptor(|d| d.epoch(epoch).is_some())
            .await?
            .and_then(|d| d.epoch(epoch).cloned()))
    }

    /// A descriptor at least as new as this job's, read again from the store
    /// if the one kept so far does not satisfy `wanted`. Same tenant, never
    /// an older generation (that would be a rollback; it is ignored here and
    /// reported by the next job that opens the tenant).
    async fn newer_descriptor(
        &self,
        wanted: impl Fn(&Descriptor) -> bool,
    ) -> Result<Option<Arc<Descriptor>>> {
        let kept = self.newer.lock().expect("not poisoned").clone();
        if let Some(d) = kept.filter(|d| wanted(d)) {
            return Ok(Some(d));
        }
        let Some((bytes, _)) = self.store.get_if_exists(&ObjectName::Descriptor).await? else {
            return Ok(None);
        };
        let Ok(d) = Descriptor::parse(&bytes) else {
            return Ok(None);
        };
        if d.tenant != self.descriptor.tenant || d.generation < self.descriptor.generation {
            return Ok(None);
        }
        let d = Arc::new(d);
        *self.newer.lock().expect("not poisoned") = Some(d.clone());
        Ok(wanted(&d).then_some(d))
    }

    fn lifecycle_error(&self, what: &str) -> Error {
        let d = &self.descriptor;
        let since = d
            .shredding
            .as_ref()
            .map(|s| {
                s.finished_at
                    .unwrap_or(s.started_at)
                    .format("%Y-%m-%d %H:%M:%SZ")
                    .to_string()
            })
            .unwrap_or_else(|| d.updated_at.format("%Y-%m-%d %H:%M:%SZ").to_string());
        let state = match d.state {
            Lifecycle::Shredded => format!("shredded on {since}"),
            Lifecycle::Shredding => format!("being shredded since {since}"),
            Lifecycle::Active => "active".into(),
        };
        Error::TenantState {
            tenant: d.tenant.to_string(),
            state: d.state.as_str().into(),
            message: format!("{state}: {what}"),
        }
    }

    /// The lifecycle fence: fails unless the tenant is active.
    pub fn require_active(&self, action: &str) -> Result<()> {
        if self.descriptor.state == Lifecycle::Active {
            Ok(())
        } else {
            Err(self.lifecycle_error(&format!("{action} refused")))
        }
    }

    /// The shred fence for reads: no data key of a tenant that is being (or
    /// was) shredded is unwrapped, and none of its objects is opened, so every
    /// reader (restore, drill, snapshots, check) names the shred.
    fn require_readable(&self) -> Result<()> {
        self.require_active("reading its data")
    }

    /// Applies `f` to the descriptor and writes it back conditionally (the
    /// version read must still be current), bumping its generation.
    ///
    /// A backstop of the shred fence: once a tenant is shredding, no update may
    /// make it active again, and while it is not active none may add an epoch
    /// (a data key) or a CMK; only the reuse of a shredded id (`reinit`, which
    /// starts a new lineage) turns a shredded tenant active.
    pub async fn update_descriptor(&mut self, f: impl FnOnce(&mut Descriptor)) -> Result<()> {
        let mut d = self.descriptor.clone();
        f(&mut d);
        let old = &self.descriptor;
        if old.state == Lifecycle::Shredding && d.state == Lifecycle::Active {
            return Err(self.lifecycle_error("a shred in progress cannot be undone"));
        }
        if old.state != Lifecycle::Active
            && d.state != Lifecycle::Active
            && (d.epochs.len() > old.epochs.len()
                || d.key != old.key
                || (d.pending_key.is_some() && d.pending_key != old.pending_key))
        {
            return Err(self.lifecycle_error("new data keys or CMKs refused"));
        }
        d.generation = self.descriptor.generation + 1;
        d.updated_at = Utc::now();
        let r = self
            .store
            .put_conditional(
                &ObjectName::Descriptor,
                Bytes::from(d.to_json()),
                PutMode::Update(self.descriptor_version.clone()),
            )
            .await
            .map_err(|e| conditional_error(&self.store, &ObjectName::Descriptor, e))?;
        self.ctx
            .state
            .saw_descriptor_generation(self.tenant(), d.generation)?;
        self.descriptor = d;
        self.descriptor_version = UpdateVersion {
            e_tag: r.e_tag,
            version: r.version,
        };
        Ok(())
    }

    pub async fn load_envelope(&self, epoch: u32) -> Result<Envelope> {
        let name = ObjectName::Envelope(epoch);
        let bytes = self.store.get(&name).await?;
        let env =
            Envelope::parse(&bytes).map_err(|e| Error::corrupt(self.store.display(&name), e))?;
        if &env.tenant != self.tenant() || env.epoch != epoch {
            return Err(Error::Foreign {
                object: self.store.display(&name),
                reason: format!("envelope is for tenant {} epoch {}", env.tenant, env.epoch),
            });
        }
        Ok(env)
    }

    /// The keys of `epoch`, unwrapping its envelope on first use. A provider
    /// that refused an envelope is not asked about the same envelope again
    /// in this job: listing a thousand snapshots under a disabled or
    /// unreachable key asks it once (with its retries), not once a snapshot.
    pub async fn epoch_keys(&self, epoch: u32) -> Result<Arc<EpochKeys>> {
        self.require_readable()?;
        let mut cache = self.keys.lock().await;
        if let Some(k) = cache.unwrapped.get(&epoch) {
            return Ok(k.clone());
        }
        let name = ObjectName::Envelope(epoch);
        match self.epoch_record(epoch).await? {
            None => {
                return Err(Error::corrupt(
                    self.store.display(&name),
                    format!("epoch {epoch} is not an epoch of tenant {}", self.tenant()),
                ));
            }
            Some(rec) if rec.state == EpochState::Shredded => {
                return Err(Error::TenantState {
                    tenant: self.tenant().to_string(),
                    state: "epoch_shredded".into(),
                    message: format!("epoch {epoch} was shredded; its data cannot be read"),
                });
            }
            Some(_) => {}
        }
        let env = self.load_envelope(epoch).await?;
        // Only the same envelope: one re-wrapped since (a CMK move beside
        // this job) is a new question for the provider.
        if let Some((refused, err)) = cache.refused.get(&epoch)
            && *refused == env
        {
            return Err(err.clone().into());
        }
        let of_tenant = |d: &Descriptor| {
            env.key == d.key
                || Some(&env.key) == d.pending_key.as_ref()
                || d.previous_keys.contains(&env.key)
        };
        // A CMK move beside this reader re-wraps envelopes under a key this
        // job's descriptor does not know yet: the store's newer one may.
        if !of_tenant(&self.descriptor) && self.newer_descriptor(|d| of_tenant(d)).await?.is_none()
        {
            return Err(Error::corrupt(
                self.store.display(&name),
                format!(
                    "wrapped under {}, which is not a key of this tenant",
                    env.key
                ),
            ));
        }
        let unwrapped = match self.ctx.keys.key(&env.key) {
            Ok(provider) => provider.unwrap(&env.wrapped, &env.context()).await,
            Err(e) => Err(e),
        };
        let data_key = match unwrapped {
            Ok(k) => k,
            Err(e) => {
                cache.refused.insert(epoch, (env, e.clone()));
                return Err(e.into());
            }
        };
        if data_key.fingerprint() != env.fingerprint {
            return Err(Error::corrupt(
                self.store.display(&name),
                "unwrapped key does not match the envelope's fingerprint",
            ));
        }
        let keys = Arc::new(EpochKeys::new(self.tenant().clone(), epoch, data_key));
        cache.unwrapped.insert(epoch, keys.clone());
        Ok(keys)
    }

    /// Asks the key provider whether the CMK wrapping the current epoch is
    /// still usable. The data key is unwrapped once, at the start of a job;
    /// a backup calls this again before committing its snapshot, so a key
    /// disabled (or scheduled for deletion) during the backup stops it from
    /// committing: revoking the key takes effect for every backup still
    /// running, not only for the next one.
    pub async fn confirm_key_usable(&self) -> Result<()> {
        let env = self.load_envelope(self.descriptor.current_epoch).await?;
        let key = env.key;
        let info = self.ctx.keys.key(&key)?.describe().await?;
        let name = key.to_string();
        let refused = match info.state {
            crate::keys::KeyState::Enabled => return Ok(()),
            crate::keys::KeyState::Disabled => KeyError::Disabled { key: name },
            crate::keys::KeyState::PendingDeletion { deletion_date } => KeyError::PendingDeletion {
                key: name,
                deletion_date,
            },
            crate::keys::KeyState::PendingImport => KeyError::PendingImport { key: name },
            crate::keys::KeyState::Destroyed { destroyed_at } => KeyError::Destroyed {
                key: name,
                destroyed_at,
            },
            crate::keys::KeyState::Other { name: state } => KeyError::Backend {
                provider: key.kind().scheme(),
                key: name,
                message: format!("the key is {state}, not enabled"),
            },
        };
        Err(refused.into())
    }

    pub async fn current_keys(&self) -> Result<Arc<EpochKeys>> {
        self.epoch_keys(self.descriptor.current_epoch).await
    }

    /// Reads and opens one sealed object, choosing the key by the epoch its header states.
    async fn open_sealed<T>(
        &self,
        name: &ObjectName,
        open: impl FnOnce(&EpochKeys, &[u8]) -> std::result::Result<T, crate::format::seal::SealError>,
    ) -> Result<(u32, T)> {
        self.require_readable()?;
        let bytes = self.store.get(name).await?;
        let epoch = Header::peek_epoch(&bytes).map_err(|e| e.at(self.store.display(name)))?;
        if !self.knows_epoch(epoch).await? {
            return Err(Error::corrupt(
                self.store.display(name),
                format!("sealed under unknown epoch {epoch}"),
            ));
        }
        let keys = self.epoch_keys(epoch).await?;
        let value = open(&keys, &bytes).map_err(|e| e.at(self.store.display(name)))?;
        Ok((epoch, value))
    }

    /// Stores `file` as index files (see [`write_index`]), each only while
    /// `lease` is held.
    pub async fn put_index(
        &self,
        keys: &EpochKeys,
        file: IndexFile,
        lease: &crate::store::lease::LeaseGuard,
    ) -> Result<(Vec<IndexId>, u64)> {
        write_index(&self.store, keys, file, || lease.ensure_held()).await
    }

    /// Loads every index file. Unreadable files are returned as faults (check
    /// reports them; other jobs refuse to go on with an incomplete index).
    pub async fn load_index(&self) -> Result<(Index, Vec<Fault>)> {
        self.require_readable()?;
        let listed = self.store.list(Dir::Index).await?;
        let removed = self.ctx.state.tenant_memory(self.tenant())?.removed_indexes;
        let mut faults = Vec::new();
        let mut ids = Vec::new();
        for l in listed {
            match l.name {
                // Planned for deletion: superseded by an index written before the plan.
                Some(name @ ObjectName::Index(_)) if self.is_hidden(&name) => {}
                Some(ObjectName::Index(id)) if removed.contains(&id) => faults.push(Fault {
                    object: self.store.display(&ObjectName::Index(id)),
                    kind: ErrorKind::RollbackDetected,
                    message: "index file was replaced by prune before and has reappeared (index rolled back)".into(),
                }),
                Some(ObjectName::Index(id)) => ids.push(id),
                _ => faults.push(unknown_object(&self.store, &l.path)),
            }
        }
        // In id order (`buffered` keeps it), each file added and dropped as it
        // arrives: the parsed files are never all in memory beside the index.
        ids.sort();
        let mut loaded = futures::stream::iter(ids)
            .map(|id| async move {
                let r = self
                    .open_sealed(&ObjectName::Index(id), |k, b| IndexFile::open(k, &id, b))
                    .await;
                (id, r)
            })
            .buffered(LOAD_CONCURRENCY);
        let mut builder = IndexBuilder::default();
        while let Some((id, r)) = loaded.next().await {
            match r {
                Ok((epoch, file)) => builder.add_file(id, epoch, &file),
                // Ciphertext of a shredded epoch that the store kept (Object
                // Lock, a versioned bucket): unreadable by design, as are the
                // packs it lists, which no snapshot of a live epoch names.
                // The shred's certificate lists it as retained.
                Err(Error::TenantState { state, .. }) if state == "epoch_shredded" => {}
                Err(e) if is_object_fault(&e) => faults.push(Fault::from_error(
                    self.store.display(&ObjectName::Index(id)),
                    &e,
                )),
                Err(e) => return Err(e),
            }
        }
        let mut index = builder.build();
        // Blobs indexed in two packs (stored again after their pack was lost):
        // read them from the pack that exists. One listing, and only then.
        if index.has_alternatives() {
            let stored = self.list_packs().await?;
            index.prefer_stored(&stored);
        }
        Ok((index, faults))
    }

    /// Loads the index and fails on the first fault.
    pub async fn load_index_strict(&self) -> Result<Index> {
        let (index, faults) = self.load_index().await?;
        first_fault(faults)?;
        Ok(index)
    }

    pub async fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        self.require_readable()?;
        let name = ObjectName::Snapshot(*id);
        let memory = self.ctx.state.tenant_memory(self.tenant())?;
        if memory.forgotten_snapshots.contains(id) {
            return Err(Error::Rollback {
                object: self.store.display(&name),
                reason: "this snapshot was forgotten and has reappeared (replayed)".into(),
            });
        }
        if memory.forgetting_snapshots.contains(id) || self.is_hidden(&name) {
            return Err(Error::NotFound {
                what: format!(
                    "snapshot {id} (it is being forgotten: an interrupted or deferred forget, which the next forget or prune finishes)"
                ),
            });
        }
        Ok(self
            .open_sealed(&name, |k, b| Snapshot::open(k, id, b))
            .await?
            .1)
    }

    /// Epochs of the envelopes in the store (`keys/<n>`) that are not
    /// shredded, one left by an interrupted `rotate --new-epoch` included:
    /// what a rotation or an epoch shred must keep re-wrapped.
    pub async fn unshredded_envelope_epochs(&self) -> Result<Vec<u32>> {
        let d = &self.descriptor;
        Ok(self
            .store
            .list(Dir::Keys)
            .await?
            .into_iter()
            .filter_map(|l| match l.name {
                Some(ObjectName::Envelope(n)) => Some(n),
                _ => None,
            })
            .filter(|n| d.epoch(*n).is_none_or(|e| e.state != EpochState::Shredded))
            .collect())
    }

    /// Every snapshot, oldest first, with faults for those that cannot be read.
    pub async fn list_snapshots(&self) -> Result<(Vec<Snapshot>, Vec<Fault>)> {
        self.require_readable()?;
        let listed = self.store.list(Dir::Snapshots).await?;
        self.load_listed_snapshots(listed).await
    }

    /// The snapshots of a listing of `snapshots/`, oldest first, as
    /// [`Repo::list_snapshots`].
    async fn load_listed_snapshots(
        &self,
        listed: Vec<Listed>,
    ) -> Result<(Vec<Snapshot>, Vec<Fault>)> {
        let forgetting = self
            .ctx
            .state
            .tenant_memory(self.tenant())?
            .forgetting_snapshots;
        let mut faults = Vec::new();
        let mut ids = Vec::new();
        for l in listed {
            match l.name {
                // Left by an interrupted forget, or planned for deletion by
                // one: no longer a snapshot of the tenant.
                Some(ObjectName::Snapshot(id))
                    if forgetting.contains(&id) || self.is_hidden(&ObjectName::Snapshot(id)) => {}
                Some(ObjectName::Snapshot(id)) => ids.push(id),
                _ => faults.push(unknown_object(&self.store, &l.path)),
            }
        }
        let results: Vec<(SnapshotId, Result<Snapshot>)> = futures::stream::iter(ids)
            .map(|id| async move { (id, self.load_snapshot(&id).await) })
            .buffer_unordered(LOAD_CONCURRENCY)
            .collect()
            .await;
        let mut snaps = Vec::new();
        for (id, r) in results {
            match r {
                Ok(s) => snaps.push(s),
                // A forget began removing it after the listing (a reader
                // beside a forget): no longer a snapshot of the tenant, as
                // above, not a fault.
                Err(Error::NotFound { .. }) => {}
                Err(e) if is_object_fault(&e) => faults.push(Fault::from_error(
                    self.store.display(&ObjectName::Snapshot(id)),
                    &e,
                )),
                Err(e) => return Err(e),
            }
        }
        snaps.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        Ok((snaps, faults))
    }

    /// Resolves `latest`, a full id or a unique prefix of at least 4 hex digits.
    pub async fn find_snapshot(&self, spec: &str) -> Result<Snapshot> {
        let wanted = self.list_snapshots_for(spec).await?;
        self.pick_snapshot(wanted).await
    }

    /// [`Repo::find_snapshot`] and [`Repo::load_index_strict`], with the
    /// key of the snapshot's epoch unwrapped (cached for the job), in fewer
    /// round trips: the snapshots are listed first, then the chosen one is
    /// read (and its key unwrapped) while the index loads. Listed before the
    /// index files, never beside them: a backup stores its index files before
    /// its snapshot, so every snapshot listed here has its index files in the
    /// index listing made after (one made alongside could miss them and fail
    /// the job with blobs "in no index file").
    pub async fn find_snapshot_and_load_index(&self, spec: &str) -> Result<(Snapshot, Index)> {
        let wanted = self.list_snapshots_for(spec).await?;
        let snapshot = async {
            let snapshot = self.pick_snapshot(wanted).await?;
            self.epoch_keys(snapshot.epoch).await?;
            Ok(snapshot)
        };
        tokio::try_join!(snapshot, self.load_index_strict())
    }

    /// Parses a snapshot spec and lists the snapshots if it needs them
    /// (all but a whole id).
    async fn list_snapshots_for<'s>(&self, spec: &'s str) -> Result<Wanted<'s>> {
        self.require_readable()?;
        Ok(match SnapshotSpec::parse(spec)? {
            SnapshotSpec::Id(id) => Wanted::Id(id),
            SnapshotSpec::Prefix(prefix) => {
                Wanted::Prefix(prefix, self.store.list(Dir::Snapshots).await?)
            }
            SnapshotSpec::Latest => Wanted::Latest(self.store.list(Dir::Snapshots).await?),
        })
    }

    /// The snapshot [`Repo::list_snapshots_for`] found wanted.
    async fn pick_snapshot(&self, wanted: Wanted<'_>) -> Result<Snapshot> {
        let listed = match wanted {
            Wanted::Id(id) => return self.load_snapshot(&id).await,
            Wanted::Prefix(prefix, listed) => return self.pick_by_prefix(prefix, listed).await,
            Wanted::Latest(listed) => listed,
        };
        // "latest" must not quietly fall back to an older snapshot when a newer
        // one may be unreadable: any unreadable snapshot fails it.
        let (snaps, faults) = self.load_listed_snapshots(listed).await?;
        first_fault(
            faults
                .into_iter()
                .filter(|f| f.kind != ErrorKind::UnknownObject)
                .collect(),
        )?;
        snaps.into_iter().last().ok_or_else(|| Error::NotFound {
            what: format!("a snapshot of tenant {}", self.tenant()),
        })
    }

    async fn pick_by_prefix(&self, prefix: &str, listed: Vec<Listed>) -> Result<Snapshot> {
        let matches: Vec<SnapshotId> = listed
            .into_iter()
            .filter_map(|l| match l.name {
                Some(ObjectName::Snapshot(id))
                    if id.to_hex().starts_with(prefix)
                        && !self.is_hidden(&ObjectName::Snapshot(id)) =>
                {
                    Some(id)
                }
                _ => None,
            })
            .collect();
        match matches.as_slice() {
            [id] => self.load_snapshot(id).await,
            [] => Err(Error::NotFound {
                what: format!("snapshot {prefix} of tenant {}", self.tenant()),
            }),
            _ => Err(Error::InvalidArgument(format!(
                "snapshot prefix {prefix} is ambiguous ({} matches)",
                matches.len()
            ))),
        }
    }

    /// Lists every object of the tenant (shred scope, check).
    pub async fn list_objects(&self) -> Result<Vec<crate::store::tenant::Listed>> {
        self.store.list_all().await
    }

    pub async fn list_packs(&self) -> Result<BTreeMap<crate::format::ids::PackId, u64>> {
        let mut out = BTreeMap::new();
        for l in self.store.list(Dir::Packs).await? {
            if let Some(ObjectName::Pack(id)) = l.name
                && !self.is_hidden(&ObjectName::Pack(id))
            {
                out.insert(id, l.meta.size);
            }
        }
        Ok(out)
    }

    /// Drops every unwrapped data key now (they are also dropped with the repo).
    pub async fn forget_keys(&self) {
        *self.keys.lock().await = KeyCache::default();
    }
}

/// Errors that describe a bad object (reported as a fault), as opposed to a
/// failure of the job itself (store down, key unavailable).
pub fn is_object_fault(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. }
            | Error::Foreign { .. }
            | Error::Missing { .. }
            | Error::Rollback { .. }
    )
}

/// What `restore`, `drill` and friends accept as a snapshot.
#[derive(Debug, Clone, Copy)]
enum SnapshotSpec<'s> {
    Id(SnapshotId),
    /// At least 4 lowercase hex digits.
    Prefix(&'s str),
    Latest,
}

/// A parsed spec with the listing it needs.
enum Wanted<'s> {
    Id(SnapshotId),
    Prefix(&'s str, Vec<Listed>),
    Latest(Vec<Listed>),
}

impl<'s> SnapshotSpec<'s> {
    fn parse(spec: &'s str) -> Result<Self> {
        if spec == "latest" {
            return Ok(SnapshotSpec::Latest);
        }
        if let Some(id) = SnapshotId::from_hex(spec) {
            return Ok(SnapshotSpec::Id(id));
        }
        if spec.len() < 4
            || !spec
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot {spec:?}: expected \"latest\", a snapshot id or a prefix of at least 4 lowercase hex digits"
            )));
        }
        Ok(SnapshotSpec::Prefix(spec))
    }
}

fn first_fault(faults: Vec<Fault>) -> Result<()> {
    match faults.into_iter().next() {
        None => Ok(()),
        Some(mut f) => Err({
            // A fault made from an error already says "<kind> <object>: ";
            // the error rebuilt from it says so again otherwise.
            if let Some((_, reason)) = f.message.split_once(&format!("{}: ", f.object)) {
                f.message = reason.to_owned();
            }
            match f.kind {
                ErrorKind::ForeignObject => Error::Foreign {
                    object: f.object,
                    reason: f.message,
                },
                ErrorKind::RollbackDetected => Error::Rollback {
                    object: f.object,
                    reason: f.message,
                },
                ErrorKind::MissingObject => Error::Missing {
                    object: f.object,
                    reason: f.message,
                },
                _ => Error::Corrupt {
                    object: f.object,
                    reason: f.message,
                },
            }
        }),
    }
}

/// Stores `file` as index files of at most
/// [`MAX_FILE_BLOBS`](crate::format::index::MAX_FILE_BLOBS) blobs each
/// ([`crate::hooks::index_file_blobs`]),
/// sealed one at a time, each put only if `held` says the job's lease still
/// is. Returns their ids and the bytes stored.
pub async fn write_index(
    store: &TenantStore,
    keys: &EpochKeys,
    file: IndexFile,
    held: impl Fn() -> Result<()>,
) -> Result<(Vec<IndexId>, u64)> {
    let mut ids = Vec::new();
    let mut bytes_stored = 0;
    for part in file.split(crate::hooks::index_file_blobs()) {
        let (id, bytes) = part.seal(keys);
        bytes_stored += bytes.len() as u64;
        held()?;
        store
            .put(&ObjectName::Index(id), Bytes::from(bytes))
            .await?;
        ids.push(id);
    }
    Ok((ids, bytes_stored))
}

fn unknown_object(store: &TenantStore, path: &object_store::path::Path) -> Fault {
    Fault {
        object: format!("tenants/{}/{}", store.tenant(), path),
        kind: ErrorKind::UnknownObject,
        message: "not an object custos writes (left alone by prune)".into(),
    }
}

fn conditional_error(store: &TenantStore, name: &ObjectName, e: object_store::Error) -> Error {
    match e {
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            Error::LeaseContended {
                tenant: store.tenant().to_string(),
                holder: format!(
                    "another writer changed {} concurrently",
                    store.display(name)
                ),
                expires: "n/a".into(),
            }
        }
        object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. } => {
            Error::ConditionalWritesUnsupported {
                url: store.display(name),
                message: e.to_string(),
            }
        }
        e => Error::store("put", store.display(name), e),
    }
}

/// Turns the first fault into an error (jobs that cannot go on past one).
pub fn fault_error(faults: Vec<Fault>) -> Result<()> {
    first_fault(faults)
}
