//! The stable, machine-readable kind of an error or a fault: `error_kind` in
//! events, job reports, the audit log and every command's `--json` envelope.
//!
//! The strings are public (operators alert on them), so each variant's string
//! never changes; `docs/errors.md` lists them all, and a test holds the two
//! lists equal.

use std::fmt;

/// What went wrong, in one of a fixed set of words.
///
/// Most kinds come from [`crate::Error::kind`]; two never do:
/// [`ErrorKind::UnknownObject`] (a `check` fault) and
/// [`ErrorKind::UnsupportedJob`] (a daemon run of a job this build lacks).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    InvalidTenantId,
    InvalidArgument,
    InvalidConfig,
    InvalidPolicy,
    CorruptObject,
    ForeignObject,
    MissingObject,
    /// An object under a tenant's prefix that custos does not write (a fault
    /// that listings report and `check`, prune and `latest` pass over).
    UnknownObject,
    RollbackDetected,
    StoreError,
    InvalidStore,
    IoError,
    SourceError,
    TenantUnavailable,
    TenantNotFound,
    NotFound,
    LeaseContended,
    ReaderLost,
    ReadersActive,
    ConditionalWritesUnsupported,
    InsufficientSpace,
    Cancelled,
    LegalHold,
    ShredVerificationFailed,
    KeyInUse,
    KeyOwnershipUnproven,
    InsecurePermissions,
    AuditUnavailable,
    AuditVerificationFailed,
    CertificateInvalid,
    UnsafeTarget,
    KeyUnavailable,
    KeyUnwrapFailed,
    KmsThrottled,
    KmsUnreachable,
    InvalidKeyReference,
    KeyProviderUnsupported,
    KeyProviderError,
    /// A policy schedules a job this build cannot run (daemon only).
    UnsupportedJob,
    /// A bug. Declared last (a test counts the variants by it).
    Internal,
}

impl ErrorKind {
    /// Every kind, in the order of `docs/errors.md`.
    pub const ALL: [ErrorKind; 40] = [
        ErrorKind::InvalidTenantId,
        ErrorKind::InvalidArgument,
        ErrorKind::InvalidConfig,
        ErrorKind::InvalidPolicy,
        ErrorKind::CorruptObject,
        ErrorKind::ForeignObject,
        ErrorKind::MissingObject,
        ErrorKind::UnknownObject,
        ErrorKind::RollbackDetected,
        ErrorKind::StoreError,
        ErrorKind::InvalidStore,
        ErrorKind::IoError,
        ErrorKind::SourceError,
        ErrorKind::TenantUnavailable,
        ErrorKind::TenantNotFound,
        ErrorKind::NotFound,
        ErrorKind::LeaseContended,
        ErrorKind::ReaderLost,
        ErrorKind::ReadersActive,
        ErrorKind::ConditionalWritesUnsupported,
        ErrorKind::InsufficientSpace,
        ErrorKind::Cancelled,
        ErrorKind::LegalHold,
        ErrorKind::ShredVerificationFailed,
        ErrorKind::KeyInUse,
        ErrorKind::KeyOwnershipUnproven,
        ErrorKind::InsecurePermissions,
        ErrorKind::AuditUnavailable,
        ErrorKind::AuditVerificationFailed,
        ErrorKind::CertificateInvalid,
        ErrorKind::UnsafeTarget,
        ErrorKind::KeyUnavailable,
        ErrorKind::KeyUnwrapFailed,
        ErrorKind::KmsThrottled,
        ErrorKind::KmsUnreachable,
        ErrorKind::InvalidKeyReference,
        ErrorKind::KeyProviderUnsupported,
        ErrorKind::KeyProviderError,
        ErrorKind::UnsupportedJob,
        ErrorKind::Internal,
    ];

    /// The stable string (`error_kind`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidTenantId => "invalid_tenant_id",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::InvalidPolicy => "invalid_policy",
            ErrorKind::CorruptObject => "corrupt_object",
            ErrorKind::ForeignObject => "foreign_object",
            ErrorKind::MissingObject => "missing_object",
            ErrorKind::UnknownObject => "unknown_object",
            ErrorKind::RollbackDetected => "rollback_detected",
            ErrorKind::StoreError => "store_error",
            ErrorKind::InvalidStore => "invalid_store",
            ErrorKind::IoError => "io_error",
            ErrorKind::SourceError => "source_error",
            ErrorKind::TenantUnavailable => "tenant_unavailable",
            ErrorKind::TenantNotFound => "tenant_not_found",
            ErrorKind::NotFound => "not_found",
            ErrorKind::LeaseContended => "lease_contended",
            ErrorKind::ReaderLost => "reader_lost",
            ErrorKind::ReadersActive => "readers_active",
            ErrorKind::ConditionalWritesUnsupported => "conditional_writes_unsupported",
            ErrorKind::InsufficientSpace => "insufficient_space",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::LegalHold => "legal_hold",
            ErrorKind::ShredVerificationFailed => "shred_verification_failed",
            ErrorKind::KeyInUse => "key_in_use",
            ErrorKind::KeyOwnershipUnproven => "key_ownership_unproven",
            ErrorKind::InsecurePermissions => "insecure_permissions",
            ErrorKind::AuditUnavailable => "audit_unavailable",
            ErrorKind::AuditVerificationFailed => "audit_verification_failed",
            ErrorKind::CertificateInvalid => "certificate_invalid",
            ErrorKind::UnsafeTarget => "unsafe_target",
            ErrorKind::KeyUnavailable => "key_unavailable",
            ErrorKind::KeyUnwrapFailed => "key_unwrap_failed",
            ErrorKind::KmsThrottled => "kms_throttled",
            ErrorKind::KmsUnreachable => "kms_unreachable",
            ErrorKind::InvalidKeyReference => "invalid_key_reference",
            ErrorKind::KeyProviderUnsupported => "key_provider_unsupported",
            ErrorKind::KeyProviderError => "key_provider_error",
            ErrorKind::UnsupportedJob => "unsupported_job",
            ErrorKind::Internal => "internal",
        }
    }

    /// The kind a string names (as written in reports and the audit log).
    pub fn parse(s: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ErrorKind::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error kind {s:?}")))
    }
}

/// So that tests and callers holding a string compare without converting.
impl PartialEq<&str> for ErrorKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for ErrorKind {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl From<ErrorKind> for String {
    fn from(k: ErrorKind) -> String {
        k.as_str().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_string_and_json() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
            assert_eq!(k.to_string(), k.as_str());
            let json = serde_json::to_value(k).unwrap();
            assert_eq!(json, serde_json::json!(k.as_str()));
            assert_eq!(serde_json::from_value::<ErrorKind>(json).unwrap(), k);
            assert_eq!(k, k.as_str());
        }
        assert_eq!(ErrorKind::parse("no_such_kind"), None);
        assert!(serde_json::from_value::<ErrorKind>(serde_json::json!("no_such_kind")).is_err());
    }

    #[test]
    fn strings_are_distinct() {
        let set: std::collections::BTreeSet<_> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(set.len(), ErrorKind::ALL.len());
    }

    /// A kind added here but not to `docs/errors.md` (or the other way round)
    /// fails: the doc is the operators' contract.
    #[test]
    fn the_documented_kinds_are_exactly_the_kinds() {
        let doc = include_str!("../../docs/errors.md");
        let documented: Vec<&str> = doc
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let ours: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            documented, ours,
            "docs/errors.md lists the kinds in ErrorKind::ALL order"
        );
    }

    /// `ALL` holds every variant in declaration order: a variant left out of
    /// it would have a string no reader can parse back. (`Internal` is
    /// declared last, so its discriminant counts the variants.)
    #[test]
    fn all_lists_every_variant_in_order() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        assert_eq!(ErrorKind::ALL.len(), ErrorKind::Internal as usize + 1);
    }
}
