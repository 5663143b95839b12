//! The key hierarchy: customer-managed keys (CMKs) in a key provider wrap the
//! tenant data keys (TDKs), from which every working key is derived.
//!
//! ```text
//! CMK (KeyProvider: local key file / AWS KMS; never leaves it)
//!  └─ wraps ─ TDK, one per key epoch             (envelope: tenants/<t>/keys/<epoch>)
//!              └─ HKDF ─ chunk-id key, chunker seed, per-object seal keys  (derive.rs)
//! ```
//!
//! Providers sit behind [`KeyProvider`], whose semantics follow AWS KMS (key
//! states, backing-key versions, on-demand rotation, scheduled deletion), so
//! the local provider cannot promise anything the KMS one could not keep.

pub mod aws_kms;
pub mod derive;
// The fault injector: unit tests and `test-hooks` builds only (see `crate::hooks`).
#[cfg(any(test, feature = "test-hooks"))]
pub mod faults;
pub mod kmip;
pub mod local;
mod object_record;
pub mod pkcs11;
pub mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use secret::{DataKey, KEY_LEN, SecretKey};

use crate::error::ErrorKind;
use crate::tenant::TenantId;

/// Which provider a [`KeyRef`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    Local,
    AwsKms,
    /// An HSM or token behind a PKCS#11 module (`pkcs11:token=…;object=…`).
    Pkcs11,
    /// A key manager spoken to over KMIP (`kmip:<uid>` or `kmip:name/<name>`).
    Kmip,
}

impl ProviderKind {
    pub fn scheme(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::AwsKms => "aws-kms",
            ProviderKind::Pkcs11 => "pkcs11",
            ProviderKind::Kmip => "kmip",
        }
    }

    pub const ALL: [ProviderKind; 4] = [
        ProviderKind::Local,
        ProviderKind::AwsKms,
        ProviderKind::Pkcs11,
        ProviderKind::Kmip,
    ];

    pub fn from_scheme(scheme: &str) -> Option<ProviderKind> {
        Self::ALL.into_iter().find(|k| k.scheme() == scheme)
    }

    /// Whether a key this provider does not find can be taken for a key
    /// that is gone. AWS KMS: yes (a key is not found once its waiting
    /// period is over). Local: never: custos destroys a local key by leaving
    /// its tombstone, so "no key file" only means "not in this host's
    /// [local_keys] dir": the key may live in another directory or on the
    /// host that made it (a store several hosts share). Every decision that
    /// would record or accept such a key as destroyed asks this.
    /// PKCS#11 and KMIP: never, for the same reason. "Not found" there
    /// also means another token with the same label, a session that lost
    /// its login (private objects vanish from searches), a renamed object,
    /// or a key manager that does not show this client the object. Their
    /// providers leave a destruction record (a `custos-destroyed/1` data
    /// object on the token, a tombstone on the key manager) and describe a
    /// destroyed key as `Destroyed` from it; absence alone proves nothing.
    pub fn absence_means_gone(self) -> bool {
        match self {
            ProviderKind::Local | ProviderKind::Pkcs11 | ProviderKind::Kmip => false,
            ProviderKind::AwsKms => true,
        }
    }
}

/// A reference to a customer-managed key: `local:<name>` or
/// `aws-kms:<key-id | alias/name | arn:aws:kms:…>`. Never the key itself.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    kind: ProviderKind,
    id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key reference {input:?}: {reason}")]
pub struct InvalidKeyRef {
    pub input: String,
    pub reason: String,
}

impl KeyRef {
    pub fn parse(input: &str) -> Result<Self, InvalidKeyRef> {
        let fail = |reason: &str| {
            Err(InvalidKeyRef {
                input: input.chars().take(200).collect(),
                reason: reason.to_owned(),
            })
        };
        let Some((scheme, id)) = input.split_once(':') else {
            return fail(
                "expected <provider>:<key>, e.g. \"local:acme\" or \"aws-kms:alias/custos-acme\"",
            );
        };
        match scheme {
            "local" => {
                if !local::valid_key_name(id) {
                    return fail("a local key name is [a-z0-9][a-z0-9._-]{0,127}");
                }
                Ok(KeyRef {
                    kind: ProviderKind::Local,
                    id: id.to_owned(),
                })
            }
            "aws-kms" => {
                if let Err(reason) = aws_kms::validate_key_id(id) {
                    return fail(&reason);
                }
                Ok(KeyRef {
                    kind: ProviderKind::AwsKms,
                    id: id.to_owned(),
                })
            }
            "pkcs11" => {
                if let Err(reason) = pkcs11::validate_key_id(id) {
                    return fail(&reason);
                }
                Ok(KeyRef {
                    kind: ProviderKind::Pkcs11,
                    id: id.to_owned(),
                })
            }
            "kmip" => {
                if let Err(reason) = kmip::validate_key_id(id) {
                    return fail(&reason);
                }
                Ok(KeyRef {
                    kind: ProviderKind::Kmip,
                    id: id.to_owned(),
                })
            }
            other => fail(&format!(
                "unknown key provider {other:?} (known: \"local\", \"aws-kms\", \"pkcs11\", \"kmip\")"
            )),
        }
    }

    pub fn local(name: &str) -> Result<Self, InvalidKeyRef> {
        Self::parse(&format!("local:{name}"))
    }

    pub fn kind(&self) -> ProviderKind {
        self.kind
    }

    /// The provider-specific part: local key name, or KMS key id / alias / ARN.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.scheme(), self.id)
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRef({self})")
    }
}

impl std::str::FromStr for KeyRef {
    type Err = InvalidKeyRef;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyRef::parse(s)
    }
}

impl Serialize for KeyRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a wrapped key is for; part of every wrap's encryption context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPurpose {
    /// A tenant data key of one epoch.
    TenantDataKey,
    /// The random token of a key claim (`tenants/<t>/keys/claims/<id>`): proof
    /// that whoever wrote it held the key and bound it to the tenant. Never a
    /// data key; its own purpose keeps the two from ever being swapped.
    KeyClaim,
}

impl KeyPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPurpose::TenantDataKey => "tenant-data-key",
            KeyPurpose::KeyClaim => "key-claim",
        }
    }
}

/// The encryption context bound to a wrap (AWS KMS EncryptionContext, local AAD).
/// A wrapped key only unwraps with the same context, so it cannot be replayed
/// for another tenant, purpose or epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrapContext {
    pub tenant: TenantId,
    pub purpose: KeyPurpose,
    pub epoch: u32,
}

impl WrapContext {
    pub fn tdk(tenant: &TenantId, epoch: u32) -> Self {
        WrapContext {
            tenant: tenant.clone(),
            purpose: KeyPurpose::TenantDataKey,
            epoch,
        }
    }

    /// The context of a key claim: `{tenant, key-claim, 0}` (docs/FORMAT.md §3a).
    pub fn claim(tenant: &TenantId) -> Self {
        WrapContext {
            tenant: tenant.clone(),
            purpose: KeyPurpose::KeyClaim,
            epoch: 0,
        }
    }

    /// The context as string pairs, sorted by key: `custos:tenant`, `custos:purpose`, `custos:epoch`.
    pub fn pairs(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("custos:epoch".to_owned(), self.epoch.to_string()),
            (
                "custos:purpose".to_owned(),
                self.purpose.as_str().to_owned(),
            ),
            ("custos:tenant".to_owned(), self.tenant.to_string()),
        ])
    }

    /// Canonical byte encoding used as AAD by the local provider (see docs/FORMAT.md):
    /// for each pair in key order, u32 BE length ‖ key ‖ u32 BE length ‖ value.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        for (k, v) in self.pairs() {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }
}

/// A data key wrapped (encrypted) under a CMK. Safe to store anywhere.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// The key that wrapped it, resolved by the provider: `local:<name>`, or the key ARN.
    pub key_id: String,
    /// The backing-key version used, where the provider exposes it (local: "3").
    /// AWS KMS embeds it in the ciphertext and does not expose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<String>,
    /// Provider ciphertext, base64 in JSON.
    #[serde(with = "crate::util::base64_bytes")]
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// Lifecycle state of a CMK, as AWS KMS models it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum KeyState {
    Enabled,
    Disabled,
    /// Deletion scheduled; the key refuses all use and is destroyed at `deletion_date`.
    PendingDeletion {
        deletion_date: Option<DateTime<Utc>>,
    },
    /// Imported key material is absent (never imported, or deleted): unusable.
    PendingImport,
    /// Key material destroyed. Nothing it wrapped can ever be unwrapped again.
    Destroyed {
        destroyed_at: Option<DateTime<Utc>>,
    },
    /// Any other provider state (e.g. AWS `Unavailable`, `Creating`).
    Other {
        name: String,
    },
}

impl KeyState {
    pub fn is_usable(&self) -> bool {
        matches!(self, KeyState::Enabled)
    }

    pub fn name(&self) -> String {
        match self {
            KeyState::Enabled => "enabled".into(),
            KeyState::Disabled => "disabled".into(),
            KeyState::PendingDeletion { .. } => "pending_deletion".into(),
            KeyState::PendingImport => "pending_import".into(),
            KeyState::Destroyed { .. } => "destroyed".into(),
            KeyState::Other { name } => name.clone(),
        }
    }
}

/// Where a key's material came from. Imported (external) material can be
/// deleted at once; KMS-generated material only by scheduled deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrigin {
    /// Generated by the provider (AWS_KMS, or the local provider).
    Provider,
    /// Imported by the customer (AWS `EXTERNAL`).
    External,
    Other,
}

/// What a provider knows about a CMK.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyInfo {
    pub reference: KeyRef,
    /// Resolved identifier: `local:<name>` or the key ARN.
    pub key_id: String,
    #[serde(flatten)]
    pub state: KeyState,
    pub origin: KeyOrigin,
    /// Current backing-key version, where the provider exposes it.
    pub current_version: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
    /// When the backing key last changed (rotation), where known.
    pub rotated_at: Option<DateTime<Utc>>,
}

/// Who holds a key and where: for `tenant show`, residency rules and
/// deletion certificates. Names places, never secrets (no PIN, no key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Custody {
    pub provider: ProviderKind,
    /// One line a person reads: "AWS KMS in eu-central-1", "PKCS#11 token
    /// custos (serial 1a2b…)", "local key directory /var/lib/custos/keys".
    pub holder: String,
    /// The same as fields a program (or a residency rule) matches on, e.g.
    /// `region`, `endpoint`, `token_label`, `token_serial`, `module`,
    /// `server`, `key_dir`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
    /// Whether a key operation leaves this host (a network call).
    pub network: bool,
}

/// How a key was destroyed, for the deletion certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestroyAction {
    /// Local key material overwritten and removed; irreversible at once.
    MaterialDestroyed,
    /// AWS `DeleteImportedKeyMaterial`: irreversible at once.
    ImportedMaterialDeleted,
    /// AWS `DisableKey` + `ScheduleKeyDeletion`: irreversible at `effective_at`.
    DeletionScheduled,
    /// PKCS#11 `C_DestroyObject` of every version object: irreversible at once.
    ObjectsDestroyed,
    /// KMIP `Revoke` then `Destroy` of every version: irreversible at once.
    RevokedAndDestroyed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Destruction {
    pub action: DestroyAction,
    pub state_after: KeyState,
    /// When the destruction can no longer be undone.
    pub effective_at: DateTime<Utc>,
    /// The provider's own names for what it destroyed (PKCS#11 object labels
    /// and ids, KMIP unique identifiers), so an auditor can find them in the
    /// HSM's or key manager's log. Empty where the key is one object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<String>,
}

/// Errors of key providers. Each names the key by reference, never by value.
/// Cloned to answer a repeated request the provider already refused within
/// one job ([`crate::repo::Repo::epoch_keys`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("key {key} not found{}", detail(.message))]
    NotFound { key: String, message: String },
    #[error("key {key} is disabled")]
    Disabled { key: String },
    #[error("key {key} is pending deletion{}", .deletion_date.map(|d| format!(" (deleted on {d})")).unwrap_or_default())]
    PendingDeletion {
        key: String,
        deletion_date: Option<DateTime<Utc>>,
    },
    #[error("key {key} has no key material (pending import)")]
    PendingImport { key: String },
    #[error("key {key} was destroyed{}", .destroyed_at.map(|d| format!(" on {d}")).unwrap_or_default())]
    Destroyed {
        key: String,
        destroyed_at: Option<DateTime<Utc>>,
    },
    #[error("access to key {key} denied: {message}")]
    AccessDenied { key: String, message: String },
    /// The device that holds the key cannot be used now: a PKCS#11 token
    /// that is absent, whose PIN is locked, or that has no free session.
    /// Never taken for a missing key (see [`ProviderKind::absence_means_gone`]).
    #[error("key {key} is unavailable: {message}")]
    Unavailable { key: String, message: String },
    #[error("key provider throttled requests for {key} and retries ran out: {message}")]
    Throttled { key: String, message: String },
    #[error("key provider {endpoint} unreachable: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error(
        "key {key} refused the wrapped key: tampered ciphertext, wrong key or wrong encryption context{}",
        detail(.message)
    )]
    InvalidCiphertext { key: String, message: String },
    #[error(transparent)]
    InvalidReference(#[from] InvalidKeyRef),
    /// A rule of the configuration (`[residency]`) forbids this key: its
    /// provider was not called. `message` names the rule.
    #[error("refusing to {operation} key {key}: {message}")]
    Refused {
        key: String,
        operation: &'static str,
        message: String,
    },
    #[error("{provider} key provider does not support {operation}")]
    Unsupported {
        provider: &'static str,
        operation: &'static str,
    },
    #[error("{provider} key provider is not configured: {message}")]
    NotConfigured {
        provider: &'static str,
        message: String,
    },
    #[error("key file {path}: {message}")]
    LocalFile {
        path: std::path::PathBuf,
        message: String,
    },
    /// The key directory (or a directory above it) could be changed by
    /// another local user (see `secure_fs`).
    #[error("{message}")]
    InsecurePermissions {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{provider} key provider error on {key}: {message}")]
    Backend {
        provider: &'static str,
        key: String,
        message: String,
    },
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl KeyError {
    /// Machine-readable kind, used as `error_kind` in events and reports.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KeyError::NotFound { .. }
            | KeyError::Disabled { .. }
            | KeyError::PendingDeletion { .. }
            | KeyError::PendingImport { .. }
            | KeyError::Destroyed { .. }
            | KeyError::AccessDenied { .. }
            | KeyError::Unavailable { .. } => ErrorKind::KeyUnavailable,
            KeyError::InvalidCiphertext { .. } => ErrorKind::KeyUnwrapFailed,
            KeyError::Throttled { .. } => ErrorKind::KmsThrottled,
            KeyError::Unreachable { .. } => ErrorKind::KmsUnreachable,
            KeyError::InvalidReference(_) => ErrorKind::InvalidKeyReference,
            KeyError::Refused { .. } => ErrorKind::InvalidPolicy,
            KeyError::Unsupported { .. } | KeyError::NotConfigured { .. } => {
                ErrorKind::KeyProviderUnsupported
            }
            KeyError::LocalFile { .. } | KeyError::Backend { .. } => ErrorKind::KeyProviderError,
            KeyError::InsecurePermissions { .. } => ErrorKind::InsecurePermissions,
        }
    }

    /// True when retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KeyError::Throttled { .. } | KeyError::Unreachable { .. }
        )
    }
}

/// A source of customer-managed keys. Implemented by the local provider and
/// by AWS KMS; both pass the same conformance suite (tests/it/key_providers.rs).
///
/// The provider never hands out CMK material. Data keys cross the boundary
/// only as [`DataKey`] (zeroizing) or wrapped.
#[async_trait]
pub trait KeyProvider: Send + Sync + fmt::Debug {
    fn kind(&self) -> ProviderKind;

    /// State, origin and version of a key (AWS `DescribeKey`).
    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo, KeyError>;

    /// Creates the key if the provider manages key creation (local provider).
    /// AWS KMS keys are the customer's to create: `Unsupported`.
    async fn create_key(&self, key: &KeyRef) -> Result<KeyInfo, KeyError>;

    /// A fresh random data key, returned both in the clear and wrapped
    /// (AWS `GenerateDataKey`).
    async fn generate_data_key(
        &self,
        key: &KeyRef,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError>;

    /// Wraps an existing data key (AWS `Encrypt`).
    async fn wrap(
        &self,
        key: &KeyRef,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError>;

    /// Unwraps a data key (AWS `Decrypt` with `KeyId` pinned to `key`).
    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError>;

    /// Re-wraps under `to` (the current backing key of `to`), without the data key
    /// leaving the provider where it can (AWS `ReEncrypt` with `SourceKeyId`).
    /// The default unwraps and wraps again: the data key is in this
    /// process, zeroizing, for the moment between (providers without a
    /// re-encrypt: local, PKCS#11, KMIP).
    async fn rewrap(
        &self,
        from: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
        to: &KeyRef,
    ) -> Result<WrappedKey, KeyError> {
        let data_key = self.unwrap(from, wrapped, ctx).await?;
        self.wrap(to, &data_key, ctx).await
    }

    /// New backing-key material for new wraps; old material stays usable for
    /// unwrapping (AWS `RotateKeyOnDemand`, local: a new key version).
    async fn rotate(&self, key: &KeyRef) -> Result<KeyInfo, KeyError>;

    /// Refuses all further use until re-enabled (AWS `DisableKey`).
    async fn disable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError>;

    /// Undoes `disable` (AWS `EnableKey`).
    async fn enable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError>;

    /// Ends the key for good: local material is destroyed at once; AWS imported
    /// material is deleted at once, else the key is disabled and scheduled for
    /// deletion after `pending_window_days` (7–30).
    async fn destroy(
        &self,
        key: &KeyRef,
        pending_window_days: u32,
    ) -> Result<Destruction, KeyError>;

    /// Files on this host that hold, or may hold, material of `key` outside
    /// its live key: temporary files of interrupted writes and, for a
    /// destroyed key, whatever is left of its key file. Includes those this
    /// process found and removed when it opened the provider, so that a
    /// verification run after the removal still reports them. Providers whose
    /// material never leaves the KMS have none (the default).
    async fn leftover_material(&self, _key: &KeyRef) -> Result<Vec<Leftover>, KeyError> {
        Ok(Vec::new())
    }

    /// Who holds `key` and where (see [`Custody`]). Makes no key operation:
    /// it answers from the configuration and what the provider learnt when
    /// it opened.
    fn custody(&self, key: &KeyRef) -> Custody;
}

/// Key material found on this host where none should be (see
/// [`KeyProvider::leftover_material`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leftover {
    pub path: std::path::PathBuf,
    /// True: this process removed it when it opened the provider (it was
    /// there until then). False: it is still there.
    pub removed: bool,
}

/// The operation name [`KeyHandle::describe`] gives the [`KeyGate`]: the
/// one read-only operation (it asks about a key, uses none).
pub const DESCRIBE: &str = "describe";

/// What every key operation passes before its provider is called: the
/// configuration's rules on which keys may be used (`[residency]`, see
/// `crate::context`). A key the store names (a tampered descriptor or
/// envelope, a legacy tenant) is checked as much as one a policy names.
#[async_trait]
pub trait KeyGate: Send + Sync + fmt::Debug {
    /// `Ok` to `operation` on `key`, whose provider describes itself as
    /// `custody`; else [`KeyError::Refused`], which the gate records.
    async fn admit(
        &self,
        key: &KeyRef,
        custody: &Custody,
        operation: &'static str,
    ) -> Result<(), KeyError>;
}

/// The configured providers, chosen by the scheme of a [`KeyRef`].
#[derive(Debug, Clone, Default)]
pub struct KeyProviders {
    pub local: Option<Arc<dyn KeyProvider>>,
    pub aws_kms: Option<Arc<dyn KeyProvider>>,
    pub pkcs11: Option<Arc<dyn KeyProvider>>,
    pub kmip: Option<Arc<dyn KeyProvider>>,
    /// Why a provider is missing (not configured, or failed to open), told
    /// to whoever asks for one of its keys.
    pub unavailable: BTreeMap<ProviderKind, String>,
    /// Checked before every key operation; `None` admits every key.
    pub gate: Option<Arc<dyn KeyGate>>,
}

impl KeyProviders {
    pub fn slot(&self, kind: ProviderKind) -> &Option<Arc<dyn KeyProvider>> {
        match kind {
            ProviderKind::Local => &self.local,
            ProviderKind::AwsKms => &self.aws_kms,
            ProviderKind::Pkcs11 => &self.pkcs11,
            ProviderKind::Kmip => &self.kmip,
        }
    }

    pub fn slot_mut(&mut self, kind: ProviderKind) -> &mut Option<Arc<dyn KeyProvider>> {
        match kind {
            ProviderKind::Local => &mut self.local,
            ProviderKind::AwsKms => &mut self.aws_kms,
            ProviderKind::Pkcs11 => &mut self.pkcs11,
            ProviderKind::Kmip => &mut self.kmip,
        }
    }

    /// The key `key`, in the provider its scheme names: every key operation
    /// goes through it, so the key is named once.
    pub fn key<'a>(&'a self, key: &'a KeyRef) -> Result<KeyHandle<'a>, KeyError> {
        Ok(KeyHandle {
            key,
            provider: self.for_key(key)?,
            gate: self.gate.as_ref(),
        })
    }

    fn for_key(&self, key: &KeyRef) -> Result<&Arc<dyn KeyProvider>, KeyError> {
        self.slot(key.kind())
            .as_ref()
            .ok_or_else(|| KeyError::NotConfigured {
                provider: key.kind().scheme(),
                message: match self.unavailable.get(&key.kind()) {
                    Some(why) => format!("key {key}: {why}"),
                    None => format!(
                        "no {} provider is configured for key {key}",
                        key.kind().scheme()
                    ),
                },
            })
    }
    /// Re-wraps `wrapped` from `from` to `to`; across providers this unwraps in
    /// memory and wraps again, within one provider it uses the provider's re-wrap.
    pub async fn rewrap(
        &self,
        from: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
        to: &KeyRef,
    ) -> Result<WrappedKey, KeyError> {
        let (source, target) = (self.key(from)?, self.key(to)?);
        source.admit("unwrap under").await?;
        target.admit("wrap under").await?;
        if from.kind() == to.kind() {
            return source.provider.rewrap(from, wrapped, ctx, to).await;
        }
        let data_key = source.provider.unwrap(from, wrapped, ctx).await?;
        target.provider.wrap(to, &data_key, ctx).await
    }
}

/// One CMK in its provider (see [`KeyProviders::key`]).
#[derive(Clone, Copy)]
pub struct KeyHandle<'a> {
    key: &'a KeyRef,
    provider: &'a Arc<dyn KeyProvider>,
    gate: Option<&'a Arc<dyn KeyGate>>,
}

impl fmt::Debug for KeyHandle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHandle({})", self.key)
    }
}

impl<'a> KeyHandle<'a> {
    pub fn reference(&self) -> &'a KeyRef {
        self.key
    }

    pub fn custody(&self) -> Custody {
        self.provider.custody(self.key)
    }

    /// The gate's word on `operation` ([`KeyGate`]), before any call to the provider.
    async fn admit(&self, operation: &'static str) -> Result<(), KeyError> {
        match self.gate {
            Some(gate) => gate.admit(self.key, &self.custody(), operation).await,
            None => Ok(()),
        }
    }

    pub async fn describe(&self) -> Result<KeyInfo, KeyError> {
        self.admit(DESCRIBE).await?;
        self.provider.describe(self.key).await
    }

    pub async fn create(&self) -> Result<KeyInfo, KeyError> {
        self.admit("create").await?;
        self.provider.create_key(self.key).await
    }

    pub async fn generate_data_key(
        &self,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        self.admit("generate a data key under").await?;
        self.provider.generate_data_key(self.key, ctx).await
    }

    pub async fn wrap(
        &self,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        self.admit("wrap under").await?;
        self.provider.wrap(self.key, data_key, ctx).await
    }

    pub async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError> {
        self.admit("unwrap under").await?;
        self.provider.unwrap(self.key, wrapped, ctx).await
    }

    pub async fn rotate(&self) -> Result<KeyInfo, KeyError> {
        self.admit("rotate").await?;
        self.provider.rotate(self.key).await
    }

    pub async fn disable(&self) -> Result<KeyInfo, KeyError> {
        self.admit("disable").await?;
        self.provider.disable(self.key).await
    }

    pub async fn enable(&self) -> Result<KeyInfo, KeyError> {
        self.admit("enable").await?;
        self.provider.enable(self.key).await
    }

    pub async fn destroy(&self, pending_window_days: u32) -> Result<Destruction, KeyError> {
        self.admit("destroy").await?;
        self.provider.destroy(self.key, pending_window_days).await
    }

    pub async fn leftover_material(&self) -> Result<Vec<Leftover>, KeyError> {
        self.provider.leftover_material(self.key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_refs() {
        let k = KeyRef::parse("local:acme").unwrap();
        assert_eq!(k.kind(), ProviderKind::Local);
        assert_eq!(k.to_string(), "local:acme");
        let k = KeyRef::parse("aws-kms:alias/custos-acme").unwrap();
        assert_eq!(k.kind(), ProviderKind::AwsKms);
        assert_eq!(k.id(), "alias/custos-acme");
    }

    #[test]
    fn refuses_unknown_or_malformed_refs() {
        for bad in [
            "acme",
            "vault:acme",
            "local:",
            "local:../x",
            "local:Acme",
            "aws-kms:",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad}");
        }
        let err = KeyRef::parse("vault:acme").unwrap_err();
        assert!(err.to_string().contains("unknown key provider"), "{err}");
    }

    #[test]
    fn context_is_canonical_and_sorted() {
        let t = TenantId::new("acme").unwrap();
        let ctx = WrapContext::tdk(&t, 3);
        let keys: Vec<_> = ctx.pairs().into_keys().collect();
        assert_eq!(keys, ["custos:epoch", "custos:purpose", "custos:tenant"]);
        let bytes = ctx.canonical_bytes();
        assert_eq!(&bytes[..4], &12u32.to_be_bytes());
        assert_eq!(&bytes[4..16], b"custos:epoch");
        assert_ne!(bytes, WrapContext::tdk(&t, 4).canonical_bytes());
        // A claim's context differs from every data key's, epoch 0 included.
        let claim = WrapContext::claim(&t);
        assert_eq!(claim.pairs()["custos:purpose"], "key-claim");
        assert_ne!(
            claim.canonical_bytes(),
            WrapContext::tdk(&t, 0).canonical_bytes()
        );
    }
}
