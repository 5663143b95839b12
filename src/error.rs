//! The library's error type. Every variant names what failed (tenant, object,
//! key reference, file) and maps to a stable machine-readable kind used as
//! `error_kind` in events, reports and drill outcomes.

mod kind;

use std::path::PathBuf;

pub use kind::ErrorKind;

use crate::keys::KeyError;
use crate::tenant::InvalidTenantId;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenantId),

    #[error("{0}")]
    InvalidArgument(String),

    #[error("configuration {}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    #[error("{0}")]
    Policy(String),

    #[error(transparent)]
    Key(#[from] KeyError),

    /// An object failed authentication or parsing: tampered, truncated or corrupt.
    #[error("corrupt object {object}: {reason}")]
    Corrupt { object: String, reason: String },

    /// An object sealed for another tenant or epoch (moved or copied across prefixes).
    #[error("foreign object {object}: {reason}")]
    Foreign { object: String, reason: String },

    /// An object that must exist (pack, index entry, envelope, snapshot) is missing.
    #[error("missing object {object}: {reason}")]
    Missing { object: String, reason: String },

    /// The store shows an older state than custos last saw: replayed descriptor,
    /// resurrected snapshot, rolled-back index.
    #[error("rollback detected on {object}: {reason}")]
    Rollback { object: String, reason: String },

    #[error("object store {operation} {path}: {source}")]
    Store {
        operation: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },

    #[error("object store {url}: {message}")]
    StoreConfig { url: String, message: String },

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("source {source_name}: {message}")]
    Source {
        source_name: String,
        message: String,
    },

    #[error("tenant {tenant} {message}")]
    TenantState {
        tenant: String,
        state: String,
        message: String,
    },

    #[error(
        "tenant {tenant} is not initialised (run `custos tenant init {tenant}` or a backup first)"
    )]
    TenantNotFound { tenant: String },

    #[error("{what} not found")]
    NotFound { what: String },

    #[error("tenant {tenant} is busy: lease held by {holder} until {expires}")]
    LeaseContended {
        tenant: String,
        holder: String,
        expires: String,
    },

    /// A reader's record lapsed (expired without renewal, or removed): a
    /// deleter may have removed what it read, so its result is not trusted.
    /// Retryable.
    #[error(
        "tenant {tenant}: this reader's record lapsed ({reason}); a concurrent prune may have removed data it was reading, so its result is not used: run it again"
    )]
    ReaderLost { tenant: String, reason: String },

    /// A deletion (an epoch shred) that must not run under live readers, and
    /// they were still reading after the configured wait. Retryable.
    #[error(
        "tenant {tenant}: {readers} still reading after {waited}; nothing was deleted, run it again later (or `custos unlock {tenant}` if they are gone)"
    )]
    ReadersActive {
        tenant: String,
        readers: String,
        waited: String,
    },

    #[error("object store {url} does not honour conditional writes: {message}")]
    ConditionalWritesUnsupported { url: String, message: String },

    /// Not enough free space for what a job is about to write (a drill's
    /// scratch file system); a disk that fills up while writing is `Io` or
    /// `Store` with the OS error, of the same kind.
    #[error("not enough space on {}: {message}", path.display())]
    InsufficientSpace { path: PathBuf, message: String },

    /// A job the daemon abandoned at its shutdown timeout.
    #[error("{what} was cancelled: {reason}")]
    Cancelled { what: String, reason: String },

    /// A shred refused because the tenant is under legal hold.
    #[error("tenant {tenant} is under legal hold: shredding refused ({message})")]
    LegalHold { tenant: String, message: String },

    /// A shred's verification found data that can still be decrypted: no
    /// certificate is issued; a re-run verifies again.
    #[error("shred of tenant {tenant} failed verification: {message}")]
    ShredVerification { tenant: String, message: String },

    /// A key another tenant uses (store, key registry or policies say so):
    /// binding it to a second tenant, or destroying it, is refused.
    #[error("key {key} is in use by tenant {other}: {message}")]
    KeyInUse {
        key: String,
        other: String,
        message: String,
    },

    /// Nothing authenticated proves that the key is the tenant's (no key
    /// claim or envelope unwraps under it, the key registry does not know
    /// it): custos does not destroy it.
    #[error("key {key} is not proven to be a key of tenant {tenant}: {message}")]
    KeyOwnershipUnproven {
        key: String,
        tenant: String,
        message: String,
    },

    /// A key, state or configuration path that another local user could
    /// change (ssh's StrictModes); the message names it and the fix.
    #[error("{message}")]
    InsecurePermissions { path: PathBuf, message: String },

    /// An audit record could not be written. For a `.begin` record the
    /// action was not taken; for an `.end` record it was, unrecorded.
    #[error("audit log unavailable: could not record {event}: {reason}")]
    AuditUnavailable { event: String, reason: String },

    /// `audit verify` found faults (the report lists them).
    #[error("audit log {source_name} failed verification: {message}")]
    AuditVerification {
        source_name: String,
        message: String,
    },

    /// A deletion certificate that does not verify.
    #[error("certificate {file} is invalid: {message}")]
    CertificateInvalid { file: String, message: String },
    /// A restore refused to write through a symlink (or a swapped entry) in
    /// its target, or to a target that is a symlink: nothing is written
    /// outside the target.
    #[error("restore target {}: {reason}", path.display())]
    UnsafeTarget { path: PathBuf, reason: String },

    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Stable machine-readable kind (`error_kind` in logs and JSON reports).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidTenant(_) => ErrorKind::InvalidTenantId,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Config { .. } => ErrorKind::InvalidConfig,
            Error::Policy(_) => ErrorKind::InvalidPolicy,
            Error::Key(k) => k.kind(),
            Error::Corrupt { .. } => ErrorKind::CorruptObject,
            Error::Foreign { .. } => ErrorKind::ForeignObject,
            Error::Missing { .. } => ErrorKind::MissingObject,
            Error::Rollback { .. } => ErrorKind::RollbackDetected,
            Error::Store { source, .. } => match source {
                object_store::Error::NotFound { .. } => ErrorKind::MissingObject,
                e if crate::store::local::is_out_of_space(e) => ErrorKind::InsufficientSpace,
                _ => ErrorKind::StoreError,
            },
            Error::StoreConfig { .. } => ErrorKind::InvalidStore,
            Error::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::StorageFull => ErrorKind::InsufficientSpace,
                _ => ErrorKind::IoError,
            },
            Error::Source { .. } => ErrorKind::SourceError,
            Error::TenantState { .. } => ErrorKind::TenantUnavailable,
            Error::TenantNotFound { .. } => ErrorKind::TenantNotFound,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::LeaseContended { .. } => ErrorKind::LeaseContended,
            Error::ReaderLost { .. } => ErrorKind::ReaderLost,
            Error::ReadersActive { .. } => ErrorKind::ReadersActive,
            Error::ConditionalWritesUnsupported { .. } => ErrorKind::ConditionalWritesUnsupported,
            Error::InsufficientSpace { .. } => ErrorKind::InsufficientSpace,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::LegalHold { .. } => ErrorKind::LegalHold,
            Error::ShredVerification { .. } => ErrorKind::ShredVerificationFailed,
            Error::KeyInUse { .. } => ErrorKind::KeyInUse,
            Error::KeyOwnershipUnproven { .. } => ErrorKind::KeyOwnershipUnproven,

            Error::InsecurePermissions { .. } => ErrorKind::InsecurePermissions,

            Error::AuditUnavailable { .. } => ErrorKind::AuditUnavailable,
            Error::AuditVerification { .. } => ErrorKind::AuditVerificationFailed,
            Error::CertificateInvalid { .. } => ErrorKind::CertificateInvalid,
            Error::UnsafeTarget { .. } => ErrorKind::UnsafeTarget,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn store(
        operation: &'static str,
        path: impl ToString,
        source: object_store::Error,
    ) -> Self {
        Error::Store {
            operation,
            path: path.to_string(),
            source,
        }
    }

    pub fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    pub fn missing(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Missing {
            object: object.into(),
            reason: reason.into(),
        }
    }

    /// True for failures worth retrying with backoff (network, throttling, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Key(k) => k.is_transient(),
            Error::ReaderLost { .. } | Error::ReadersActive { .. } => true,
            Error::Store { source, .. } => crate::store::tenant::is_transient(source),
            _ => false,
        }
    }
}
