//! **Test hook** (`test-hooks` builds only; empty in the default build, see
//! [`crate::hooks`]): crash injection. With `CUSTOS_CRASH_AT=shred:<point>` (a
//! tenant shred) or `CUSTOS_CRASH_AT=shred-epoch:<point>` (an epoch shred),
//! the process aborts (`std::process::abort`: no destructors, no lease
//! release, no audit `.end` record) when the shred reaches that point, as if
//! it had been killed there. The tests use it to show that a re-run finishes
//! the shred and yields one valid certificate. `CUSTOS_CRASH_AT=local-key:<point>`
//! does the same inside any write of a local key file (creation, `rotate
//! --cmk`): the tests show that no key material survives the next shred.
//! `CUSTOS_CRASH_AT=pkcs11-destroy:<point>` aborts inside the destruction of
//! a PKCS#11 key (the crash loop's PKCS#11 case). It has no other use; an
//! unset or unknown value does nothing.

/// The points, in the order a tenant shred reaches them. Each sits after a
/// step's work and before the descriptor records it, the worst place to die
/// (`certified`: the certificate stored and its audit record written, the
/// descriptor not yet marked shredded).
pub const TENANT_POINTS: &[&str] = &[
    "fence",
    "scope",
    "keys",
    "delete-partial",
    "delete",
    "verify",
    "certificate-signed",
    "certificate",
    "certified",
];

/// The points of an epoch shred (`rewrap*` only with `--rewrap`).
pub const EPOCH_POINTS: &[&str] = &[
    "fence",
    "scope",
    "delete-partial",
    "delete",
    "rewrap-partial",
    "rewrap",
    "keys",
    "verify",
    "certificate-signed",
    "certificate",
    "certified",
];

/// The points of a local key file write ([`crate::keys::local`]): the
/// temporary file is durable but not in place; it is in place, the directory
/// not yet fsynced.
pub const LOCAL_KEY_POINTS: &[&str] = &["written", "installed"];

/// The points of a PKCS#11 key destruction (`CUSTOS_CRASH_AT=pkcs11-destroy:<point>`,
/// [`crate::keys::pkcs11`]): the destruction record is on the token, no
/// version destroyed yet; a version's objects destroyed, its destruction
/// not yet recorded locally; one version destroyed and recorded, another
/// still there (a key with two versions or more).
pub const PKCS11_DESTROY_POINTS: &[&str] = &["recorded", "unrecorded", "between-versions"];

#[cfg(feature = "test-hooks")]
pub const ENV: &str = crate::hooks::CRASH_AT;

/// Aborts the process if `CUSTOS_CRASH_AT` names `<scope>:<point>` (a
/// `test-hooks` build); nothing otherwise.
#[inline(always)]
pub(crate) fn crash_point(scope: &str, point: &str) {
    crate::hooks::crash_point(scope, point);
}
