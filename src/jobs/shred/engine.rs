//! The shred engine: one driver runs every shred, of a tenant or of an
//! epoch ([`ShredSubject`]). A shred moves through typed steps, each
//! recorded in the descriptor before the next begins:
//!
//! ```text
//! fenced → scoped → keys destroyed → deleted → verified → certified   (tenant)
//! fenced → scoped → deleted [→ rewrapped → keys destroyed] → verified → certified   (epoch)
//! ```
//!
//! The subject does each step's work and journals it; the driver owns what
//! is common: skipping what an earlier run recorded, the lease check before
//! anything destructive, the crash point after each step (between its audit
//! `.end` record and the descriptor write, the worst place to die), the
//! descriptor write itself, and the certificate.

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::format::descriptor::{Descriptor, ShredState};
use crate::format::shred::{
    DeletionRecord, KeyDestruction, RewrapRecord, ScopeRecord, ShredProgress, ShredStep,
    VerificationRecord,
};
use crate::keys::KeyRef;
use crate::repo::Repo;
use crate::store::ObjectName;
use crate::store::lease::LeaseGuard;

use super::certificate::Certificate;
use super::issue::issue_certificate;
use super::journal::{Journal, Slot, save};
use super::{ShredReport, ShredRequest, holds};

/// A step after the fence, in the order a subject lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Scope,
    Keys,
    Delete,
    Rewrap,
    Verify,
}

impl Step {
    /// Whether an earlier run recorded this step's outcome.
    fn done(self, p: &ShredProgress) -> bool {
        match self {
            Step::Scope => p.scope.is_some(),
            Step::Keys => p.keys.is_some(),
            Step::Delete => p.deletion.is_some(),
            Step::Rewrap => p.rewrap.is_some(),
            Step::Verify => p.verification.is_some(),
        }
    }

    /// Steps that destroy or move something run only while the lease is
    /// still ours; listing and verifying change nothing.
    fn needs_lease(self) -> bool {
        !matches!(self, Step::Scope | Step::Verify)
    }
}

/// What a step reached, with its record: the typed progress of a shred.
pub(super) enum Progress {
    Scoped(ScopeRecord),
    KeysDestroyed {
        keys: Vec<KeyDestruction>,
        at: DateTime<Utc>,
    },
    Deleted(DeletionRecord),
    Rewrapped(RewrapRecord),
    Verified(VerificationRecord),
}

impl Progress {
    /// The crash point after the step (names as in [`super::hook`]).
    fn point(&self) -> &'static str {
        match self {
            Progress::Scoped(_) => "scope",
            Progress::KeysDestroyed { .. } => "keys",
            Progress::Deleted(_) => "delete",
            Progress::Rewrapped(_) => "rewrap",
            Progress::Verified(_) => "verify",
        }
    }

    /// Records the step in the persisted progress.
    fn record(self, p: &mut ShredProgress) {
        match self {
            Progress::Scoped(r) => {
                p.scope = Some(r);
                p.step = ShredStep::Scoped;
            }
            Progress::KeysDestroyed { keys, at } => {
                p.keys = Some(keys);
                p.executed_at = Some(at);
                p.step = ShredStep::KeysDestroyed;
            }
            Progress::Deleted(r) => {
                p.deletion = Some(r);
                p.step = ShredStep::Deleted;
            }
            Progress::Rewrapped(r) => {
                p.rewrap = Some(r);
                p.step = ShredStep::Rewrapped;
            }
            Progress::Verified(r) => {
                p.verification = Some(r);
                p.step = ShredStep::Verified;
            }
        }
    }
}

/// How a subject's start went.
pub(super) enum Begun {
    /// Shredded before: the stored certificate, checked.
    Finished(Box<ShredReport>),
    /// Fenced (or started) by this run.
    Started,
    /// An interrupted shred, at the step it had recorded.
    Resumed(Option<ShredStep>),
}

/// The records a certificate states, all present. The descriptor is store
/// JSON: a record missing where a later step ran is a corrupt descriptor,
/// reported as such, never a panic.
pub(super) struct Records<'a> {
    pub state: &'a ShredState,
    pub progress: &'a ShredProgress,
    pub certificate_id: &'a str,
    pub scope: &'a ScopeRecord,
    pub deletion: &'a DeletionRecord,
    pub verification: &'a VerificationRecord,
}

impl<'a> Records<'a> {
    pub fn of(repo: &'a Repo, slot: Slot) -> Result<Self> {
        let d = repo.descriptor();
        let state = slot.state(d).ok_or_else(|| missing(repo, "shred state"))?;
        let progress = slot.progress(d)?;
        Ok(Records {
            state,
            progress,
            certificate_id: state
                .certificate_id
                .as_deref()
                .ok_or_else(|| missing(repo, "certificate id"))?,
            scope: scoped(repo, progress)?,
            deletion: progress
                .deletion
                .as_ref()
                .ok_or_else(|| missing(repo, "deletion"))?,
            verification: progress
                .verification
                .as_ref()
                .ok_or_else(|| missing(repo, "verification"))?,
        })
    }
}

/// The scope record a later step needs.
pub(super) fn scoped<'a>(repo: &Repo, p: &'a ShredProgress) -> Result<&'a ScopeRecord> {
    p.scope.as_ref().ok_or_else(|| missing(repo, "scope"))
}

/// A shred record the descriptor lacks although a later step needs it.
pub(super) fn missing(repo: &Repo, what: &str) -> Error {
    Error::corrupt(
        repo.store().display(&ObjectName::Descriptor),
        format!("the shred's {what} record is missing although a later step needs it"),
    )
}

/// A shred's subject: what is fenced, scoped, destroyed, deleted, verified
/// and certified. Implemented by [`super::tenant::TenantSubject`] and
/// [`super::epoch::EpochSubject`].
pub(super) trait ShredSubject {
    /// Where its state lives in the descriptor.
    const SLOT: Slot;

    /// The epoch shredded (`None`: the whole tenant).
    fn epoch(&self) -> Option<u32>;

    /// Checks the request against the descriptor; reports a finished shred,
    /// resumes an interrupted one, or fences and starts a new one.
    async fn begin(&mut self, repo: &mut Repo, req: &ShredRequest) -> Result<Begun>;

    /// The steps after the fence, in order (read once the shred began).
    fn steps(&self, d: &Descriptor) -> Vec<Step>;

    /// Does one step's work, journals it, and returns what it reached.
    async fn run(
        &mut self,
        step: Step,
        repo: &mut Repo,
        journal: &Journal,
        lease: &LeaseGuard,
    ) -> Result<Progress>;

    /// What else the descriptor write recording `p` changes.
    fn on_recorded(&self, _d: &mut Descriptor, _p: &Progress) {}

    /// After the descriptor recorded `step`.
    async fn after_recorded(&mut self, _repo: &Repo, _step: Step) -> Result<()> {
        Ok(())
    }

    /// The certificate body, from the descriptor's records alone.
    fn certificate(&self, repo: &Repo, records: &Records<'_>) -> Result<Certificate>;

    /// What [`holds::confirm_before_signing`] checks of `body`: whether its
    /// keys must show destruction, and a key of the tenant it spares.
    fn confirm_terms(&self, body: &Certificate) -> (bool, Option<KeyRef>);

    /// The descriptor once the certificate is stored.
    fn finish(&self, d: &mut Descriptor, certificate_id: &str, now: DateTime<Utc>);

    /// Logs the certification.
    fn certified(&self, repo: &Repo, certificate_id: &str);
}

/// Runs a shred of `subject` to its certificate (or reports the finished one).
pub(super) async fn drive<S: ShredSubject>(
    mut subject: S,
    repo: &mut Repo,
    lease: &LeaseGuard,
    req: &ShredRequest,
) -> Result<ShredReport> {
    let (resumed, resumed_after) = match subject.begin(repo, req).await? {
        Begun::Finished(report) => return Ok(*report),
        Begun::Started => (false, None),
        Begun::Resumed(after) => (true, after),
    };
    let journal = Journal::new(repo, S::SLOT, subject.epoch())?;
    if resumed {
        // A shred with steps left to run resumes only where it began (a
        // tenant fenced without step records got custos's own fence record
        // in `begin`; an epoch's gets none and is refused here, before any
        // step runs).
        let progress = S::SLOT.progress(repo.descriptor())?;
        let steps_left = subject
            .steps(repo.descriptor())
            .iter()
            .any(|s| !s.done(progress));
        if steps_left {
            holds::require_begun_here(repo, &journal.certificate_id, subject.epoch())?;
        }
        resume_skip_list::<S>(repo, &journal, req).await?;
    }
    for step in subject.steps(repo.descriptor()) {
        if step.done(S::SLOT.progress(repo.descriptor())?) {
            continue;
        }
        if step.needs_lease() {
            lease.ensure_held()?;
        }
        let reached = subject.run(step, repo, &journal, lease).await?;
        journal.crash(reached.point());
        S::SLOT.progress(repo.descriptor())?;
        repo.update_descriptor(|d| {
            subject.on_recorded(d, &reached);
            if let Some(p) = S::SLOT.state_mut(d).and_then(|s| s.progress.as_mut()) {
                reached.record(p);
            }
        })
        .await?;
        subject.after_recorded(repo, step).await?;
    }
    lease.ensure_held()?;
    certify(&subject, repo, &journal, resumed_after).await
}

/// A resumed run honours the skip list an earlier run recorded as well as
/// its own. The operator's own list is recorded in the audit log
/// ([`holds::RESUMED_EVENT`]): a key left untouched is certified only if an
/// audit record of the shred asked for it, since the descriptor's list is
/// store JSON anyone who can write the store can extend.
async fn resume_skip_list<S: ShredSubject>(
    repo: &mut Repo,
    journal: &Journal,
    req: &ShredRequest,
) -> Result<()> {
    if !req.skip_unproven.is_empty() {
        journal
            .event(
                holds::RESUMED_EVENT,
                serde_json::json!({ "skip_unproven": req.skip_unproven }),
            )
            .await?;
    }
    let recorded = S::SLOT.progress(repo.descriptor())?.skip_unproven.clone();
    let skip = super::skip_list(req, S::SLOT.progress(repo.descriptor()).ok());
    if skip != recorded {
        save(repo, S::SLOT, |p| p.skip_unproven = skip).await?;
    }
    Ok(())
}

/// The `certificate` step: build, check, anchor, sign and store the
/// certificate; then the descriptor records the shred finished.
async fn certify<S: ShredSubject>(
    subject: &S,
    repo: &mut Repo,
    journal: &Journal,
    resumed_after: Option<ShredStep>,
) -> Result<ShredReport> {
    let ctx = repo.context().clone();
    let tenant = repo.tenant().clone();
    let id = journal.certificate_id.clone();
    let mut body = subject.certificate(repo, &Records::of(repo, S::SLOT)?)?;
    let (destroys_keys, spared) = subject.confirm_terms(&body);
    let ended =
        holds::confirm_before_signing(repo, &mut body, destroys_keys, spared.as_ref()).await?;
    let bytes = issue_certificate(&ctx, &tenant, journal, body, ended.as_deref()).await?;
    journal.crash("certified");
    let now = crate::hooks::now();
    repo.update_descriptor(|d| subject.finish(d, &id, now))
        .await?;
    subject.certified(repo, &id);
    ShredReport::new(&tenant, &id, bytes, false, resumed_after)
}

/// The progress record a shred starts with (`actor` is who runs it).
pub(super) fn new_progress(req: &ShredRequest, now: DateTime<Utc>, actor: String) -> ShredProgress {
    ShredProgress {
        step: ShredStep::Fenced,
        requested_at: req.requested_at.unwrap_or(now),
        actor,
        pending_window_days: req.pending_window_days,
        skip_unproven: req.skip_unproven.clone(),
        scope: None,
        keys_began_at: None,
        keys: None,
        executed_at: None,
        deletion: None,
        rewrap: None,
        verification: None,
    }
}
