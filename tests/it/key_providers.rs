//! The key-provider conformance suite: one set of checks (`suite::*`), run
//! against every [`KeyProvider`] through a [`Fixture`] that makes fresh keys.
//!
//! - The local provider, in a temporary directory: always runs.
//! - AWS KMS on an emulator (LocalStack or moto) or on real AWS: runs when
//!   `CUSTOS_TEST_EMULATORS=1` (and then must pass: an unreachable endpoint is a
//!   failure); otherwise each test prints a `skipped:` line and returns. The
//!   endpoint, region and credentials come from the usual AWS variables, as
//!   printed by `scripts/emulators.sh start`, and are passed to the provider
//!   explicitly. `CUSTOS_EMULATOR=moto` marks an emulator that ignores key
//!   states: the key-state cases then print `SKIPPED (moto does not enforce KMS
//!   key states): <case>` and assert nothing.
//! - AWS KMS error mapping and retries against a scripted fake KMS on
//!   127.0.0.1 (`mock` module): always run, no emulator needed.
// Drives the test hooks (see src/hooks.rs); without `--features test-hooks`
// this file is empty and tests/common fails the run instead.
#![cfg(feature = "test-hooks")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{self, env};
use async_trait::async_trait;
use custos::TenantId;
use custos::keys::aws_kms::{AwsKmsProvider, AwsKmsSettings};
use custos::keys::kmip::KmipProvider;
use custos::keys::local::LocalKeyProvider;
use custos::keys::pkcs11::Pkcs11Provider;
use custos::keys::{
    DestroyAction, KeyError, KeyOrigin, KeyProvider, KeyPurpose, KeyRef, KeyState, SecretKey,
    WrapContext,
};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// A provider under test plus a way to make fresh keys in it.
#[async_trait]
trait Fixture: Send + Sync {
    fn name(&self) -> &str;
    fn provider(&self) -> &dyn KeyProvider;
    /// A new, enabled key that no other test uses.
    async fn fresh_key(&self) -> KeyRef;
    /// A new key whose material can be deleted at once (AWS: imported material);
    /// `None` where the provider has no such keys.
    async fn fresh_imported_key(&self) -> Option<KeyRef>;
    /// False where the backend ignores key states (moto): key-state cases are skipped.
    fn enforces_states(&self) -> bool;
    /// False where a disabled key cannot be enabled again (KMIP: Revoke is
    /// final). The disable case then checks that `enable` says so
    /// (`Unsupported`) and the key stays refused.
    fn reenables(&self) -> bool {
        true
    }
    /// Removes what the test made, where that matters (real KMS keys cost money).
    async fn cleanup(&self) {}
}

const SKIP_EMULATORS: &str = "skipped: set CUSTOS_TEST_EMULATORS=1 (scripts/emulators.sh start)";

struct AwsFixture {
    provider: AwsKmsProvider,
    emulator: String,
    /// Keys this fixture created, scheduled for deletion by `cleanup`.
    created: std::sync::Mutex<Vec<KeyRef>>,
}

impl AwsFixture {
    async fn new() -> Option<Self> {
        if !common::strict() {
            eprintln!("{SKIP_EMULATORS}");
            return None;
        }
        let provider = AwsKmsProvider::new(&common::aws_settings())
            .await
            .expect("AWS KMS provider from the test environment");
        let emulator = env("CUSTOS_EMULATOR").unwrap_or_else(|| "aws".into());
        Some(AwsFixture {
            provider,
            emulator,
            created: Default::default(),
        })
    }

    fn track(&self, key: &KeyRef) -> KeyRef {
        self.created.lock().unwrap().push(key.clone());
        key.clone()
    }
}

#[async_trait]
impl Fixture for AwsFixture {
    fn name(&self) -> &str {
        &self.emulator
    }
    fn provider(&self) -> &dyn KeyProvider {
        &self.provider
    }
    async fn fresh_key(&self) -> KeyRef {
        let key = self
            .provider
            .create_test_key(None)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "CUSTOS_TEST_EMULATORS=1 but creating a KMS key at {} failed: {e}",
                    self.provider.endpoint()
                )
            });
        self.track(&key)
    }
    async fn fresh_imported_key(&self) -> Option<KeyRef> {
        let key = self
            .provider
            .create_imported_key(None)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "creating a KMS key with imported material at {} failed: {e}",
                    self.provider.endpoint()
                )
            });
        Some(self.track(&key))
    }
    fn enforces_states(&self) -> bool {
        self.emulator != "moto"
    }
    /// Real KMS keys cost money: destroy (7-day window) what the test made.
    async fn cleanup(&self) {
        let keys = std::mem::take(&mut *self.created.lock().unwrap());
        for key in keys {
            if let Err(e) = self.provider.destroy(&key, 7).await {
                eprintln!("[{}] cleanup of {key}: {e}", self.name());
            }
        }
    }
}

struct LocalFixture {
    provider: LocalKeyProvider,
    _dir: tempfile::TempDir,
}

impl LocalFixture {
    fn new() -> Option<Self> {
        let dir = tempfile::tempdir().expect("temporary key directory");
        let provider = LocalKeyProvider::new(dir.path().join("keys")).expect("local key provider");
        Some(LocalFixture {
            provider,
            _dir: dir,
        })
    }
}

#[async_trait]
impl Fixture for LocalFixture {
    fn name(&self) -> &str {
        "local"
    }
    fn provider(&self) -> &dyn KeyProvider {
        &self.provider
    }
    async fn fresh_key(&self) -> KeyRef {
        let name = format!("k-{}", hex::encode(custos::util::random_bytes::<6>()));
        let key = KeyRef::local(&name).unwrap();
        self.provider
            .create_key(&key)
            .await
            .expect("create local key");
        key
    }
    async fn fresh_imported_key(&self) -> Option<KeyRef> {
        None
    }
    fn enforces_states(&self) -> bool {
        true
    }
}

/// A PKCS#11 token: SoftHSM2 from `scripts/softhsm.sh start`, or any module,
/// token and PIN file the `CUSTOS_TEST_PKCS11_*` variables name.
struct Pkcs11Fixture {
    provider: Pkcs11Provider,
    token: String,
    created: std::sync::Mutex<Vec<KeyRef>>,
    _use: common::TokenUse,
}

impl Pkcs11Fixture {
    fn new() -> Option<Self> {
        let (settings, token) = common::pkcs11_settings()?;
        let _use = common::pkcs11_shared();
        let provider = Pkcs11Provider::open(&settings).unwrap_or_else(|e| {
            panic!(
                "opening PKCS#11 module {} failed: {e}",
                settings.module.display()
            )
        });
        Some(Pkcs11Fixture {
            provider,
            token,
            created: Default::default(),
            _use,
        })
    }
}

#[async_trait]
impl Fixture for Pkcs11Fixture {
    fn name(&self) -> &str {
        "pkcs11"
    }
    fn provider(&self) -> &dyn KeyProvider {
        &self.provider
    }
    async fn fresh_key(&self) -> KeyRef {
        let key = common::pkcs11_key(&self.token, "k");
        self.provider
            .create_key(&key)
            .await
            .unwrap_or_else(|e| panic!("creating {key} on the token failed: {e}"));
        self.created.lock().unwrap().push(key.clone());
        key
    }
    /// No such thing: every version object is destroyed at once anyway.
    async fn fresh_imported_key(&self) -> Option<KeyRef> {
        None
    }
    fn enforces_states(&self) -> bool {
        true
    }
    /// A real HSM's test partition should not fill up with test keys.
    async fn cleanup(&self) {
        let keys = std::mem::take(&mut *self.created.lock().unwrap());
        for key in keys {
            if let Err(e) = self.provider.destroy(&key, 7).await {
                eprintln!("[pkcs11] cleanup of {key}: {e}");
            }
        }
    }
}

/// A KMIP key manager (PyKMIP from scripts/pykmip.sh, or a real one named
/// by the CUSTOS_TEST_KMIP_* variables). Keys are `kmip:name/<random>`.
struct KmipFixture {
    provider: KmipProvider,
}

impl KmipFixture {
    fn new() -> Option<Self> {
        let settings = common::kmip_settings()?;
        let provider =
            KmipProvider::new(&settings).expect("KMIP provider from the test environment");
        Some(KmipFixture { provider })
    }
}

#[async_trait]
impl Fixture for KmipFixture {
    fn name(&self) -> &str {
        "kmip"
    }
    fn provider(&self) -> &dyn KeyProvider {
        &self.provider
    }
    async fn fresh_key(&self) -> KeyRef {
        let key = KeyRef::parse(&format!(
            "kmip:name/custos-test-{}",
            hex::encode(custos::util::random_bytes::<6>())
        ))
        .unwrap();
        self.provider.create_key(&key).await.unwrap_or_else(|e| {
            panic!(
                "creating a key on the KMIP server {} failed: {e}",
                self.provider.server()
            )
        });
        key
    }
    async fn fresh_imported_key(&self) -> Option<KeyRef> {
        None
    }
    fn enforces_states(&self) -> bool {
        true
    }
    fn reenables(&self) -> bool {
        false
    }
}

// ---------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------

fn ctx(tenant: &str, epoch: u32) -> WrapContext {
    WrapContext::tdk(&TenantId::new(tenant).unwrap(), epoch)
}

/// The error of `r`, logged with its kind (the log shows each backend's codes).
#[track_caller]
fn expect_err<T: std::fmt::Debug>(f: &dyn Fixture, case: &str, r: Result<T, KeyError>) -> KeyError {
    match r {
        Ok(v) => panic!("[{}] {case}: expected an error, got {v:?}", f.name()),
        Err(e) => {
            eprintln!("[{}] {case}: {e} (kind {})", f.name(), e.kind());
            e
        }
    }
}

/// Prints the skip line and returns false when `f` does not enforce key states.
fn states_enforced(f: &dyn Fixture, case: &str) -> bool {
    if f.enforces_states() {
        true
    } else {
        eprintln!(
            "SKIPPED ({} does not enforce KMS key states): {case}",
            f.name()
        );
        false
    }
}

/// An unwrap under the wrong key must be refused as an invalid ciphertext
/// (AWS and LocalStack: `IncorrectKeyException`). moto answers a KeyId mismatch
/// with `AccessDeniedException` instead; that is accepted there, and noted.
#[track_caller]
fn assert_wrong_key(f: &dyn Fixture, e: &KeyError) {
    if f.name() == "moto" && matches!(e, KeyError::AccessDenied { .. }) {
        eprintln!(
            "NOTE [moto]: KeyId mismatch answered with AccessDeniedException (AWS: IncorrectKeyException)"
        );
        return;
    }
    assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
    assert_eq!(e.kind(), "key_unwrap_failed");
}

fn assert_no_key_bytes(err: &KeyError, key: &SecretKey) {
    let hex = hex::encode(key.expose());
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains(&hex), "error shows key bytes: {shown}");
    }
}

mod suite {
    use super::*;

    pub async fn round_trip(f: &dyn Fixture) {
        let p = f.provider();
        let key = f.fresh_key().await;
        let c = ctx("acme", 1);

        let (dk, wrapped) = p
            .generate_data_key(&key, &c)
            .await
            .expect("generate_data_key");
        assert!(!wrapped.key_id.is_empty());
        assert!(
            !wrapped.ciphertext.windows(32).any(|w| w == dk.expose()),
            "key in the clear in the envelope"
        );
        let back = p
            .unwrap(&key, &wrapped, &c)
            .await
            .expect("unwrap of generate_data_key");
        assert_eq!(back, dk);

        let own = SecretKey::generate();
        let wrapped2 = p.wrap(&key, &own, &c).await.expect("wrap");
        assert_eq!(
            p.unwrap(&key, &wrapped2, &c).await.expect("unwrap of wrap"),
            own
        );
        assert_ne!(wrapped.ciphertext, wrapped2.ciphertext);

        // The same key wrapped twice gives different envelopes, both valid.
        let wrapped3 = p.wrap(&key, &own, &c).await.expect("wrap again");
        assert_ne!(wrapped2.ciphertext, wrapped3.ciphertext);
        assert_eq!(p.unwrap(&key, &wrapped3, &c).await.unwrap(), own);

        let info = p.describe(&key).await.expect("describe");
        assert_eq!(info.state, KeyState::Enabled);
        assert_eq!(
            info.key_id, wrapped.key_id,
            "envelope names the resolved key id"
        );
        eprintln!(
            "[{}] wrapped key sizes: generate_data_key {} bytes, wrap {} bytes; key_id {}",
            f.name(),
            wrapped.ciphertext.len(),
            wrapped2.ciphertext.len(),
            wrapped.key_id
        );
    }

    pub async fn wrong_context_fails(f: &dyn Fixture) {
        let p = f.provider();
        let key = f.fresh_key().await;
        let c = ctx("acme", 7);
        let (dk, wrapped) = p.generate_data_key(&key, &c).await.unwrap();

        let other_tenant = ctx("globex", 7);
        let e = expect_err(
            f,
            "unwrap with another tenant",
            p.unwrap(&key, &wrapped, &other_tenant).await,
        );
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
        assert_eq!(e.kind(), "key_unwrap_failed");
        assert_no_key_bytes(&e, &dk);

        let other_epoch = ctx("acme", 8);
        let e = expect_err(
            f,
            "unwrap with another epoch",
            p.unwrap(&key, &wrapped, &other_epoch).await,
        );
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");

        // KeyPurpose has one variant today; every other purpose must be refused
        // once there is one. The purpose is part of the bound context:
        assert_eq!(c.purpose, KeyPurpose::TenantDataKey);
        assert!(c.pairs().contains_key("custos:purpose"));

        // Rewrap checks the source context too.
        let to = f.fresh_key().await;
        let e = expect_err(
            f,
            "rewrap with another tenant",
            p.rewrap(&key, &wrapped, &other_tenant, &to).await,
        );
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");

        // The right context still works.
        assert_eq!(p.unwrap(&key, &wrapped, &c).await.unwrap(), dk);
    }

    pub async fn unwrap_is_pinned_to_the_key(f: &dyn Fixture) {
        let p = f.provider();
        let a = f.fresh_key().await;
        let b = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (_, wrapped) = p.generate_data_key(&a, &c).await.unwrap();
        let e = expect_err(
            f,
            "unwrap under another key",
            p.unwrap(&b, &wrapped, &c).await,
        );
        assert_wrong_key(f, &e);
    }

    pub async fn tampered_ciphertext_fails(f: &dyn Fixture) {
        let p = f.provider();
        let key = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (_, mut wrapped) = p.generate_data_key(&key, &c).await.unwrap();
        let last = wrapped.ciphertext.len() - 1;
        wrapped.ciphertext[last] ^= 0x01;
        let e = expect_err(
            f,
            "unwrap of a tampered envelope",
            p.unwrap(&key, &wrapped, &c).await,
        );
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
    }

    pub async fn rotation_keeps_old_wraps(f: &dyn Fixture) {
        let p = f.provider();
        let key = f.fresh_key().await;
        let c = ctx("acme", 3);
        let (dk1, w1) = p.generate_data_key(&key, &c).await.unwrap();
        let before = p.describe(&key).await.unwrap();

        let after = p.rotate(&key).await.expect("rotate");
        assert_eq!(after.state, KeyState::Enabled);
        assert_eq!(after.key_id, before.key_id);
        eprintln!(
            "[{}] rotation: version {:?} -> {:?}",
            f.name(),
            before.current_version,
            after.current_version
        );
        if let (Some(old), Some(new)) = (&before.current_version, &after.current_version) {
            assert_ne!(old, new, "rotation must change the backing key version");
        }

        assert_eq!(
            p.unwrap(&key, &w1, &c)
                .await
                .expect("old wrap after rotation"),
            dk1
        );
        let (dk2, w2) = p
            .generate_data_key(&key, &c)
            .await
            .expect("new wrap after rotation");
        assert_eq!(p.unwrap(&key, &w2, &c).await.unwrap(), dk2);
        // A second rotation: everything still readable.
        p.rotate(&key).await.expect("rotate again");
        assert_eq!(p.unwrap(&key, &w1, &c).await.unwrap(), dk1);
        assert_eq!(p.unwrap(&key, &w2, &c).await.unwrap(), dk2);
    }

    pub async fn rewrap_moves_to_another_key(f: &dyn Fixture) {
        let p = f.provider();
        let a = f.fresh_key().await;
        let b = f.fresh_key().await;
        let c = ctx("acme", 2);
        let (dk, wa) = p.generate_data_key(&a, &c).await.unwrap();
        let wb = p.rewrap(&a, &wa, &c, &b).await.expect("rewrap a -> b");
        assert_eq!(
            wb.key_id,
            p.describe(&b).await.unwrap().key_id,
            "rewrapped envelope names the new key"
        );
        assert_eq!(p.unwrap(&b, &wb, &c).await.expect("unwrap under b"), dk);
        let e = expect_err(
            f,
            "unwrap of the rewrapped envelope under the old key",
            p.unwrap(&a, &wb, &c).await,
        );
        assert_wrong_key(f, &e);
        // Rewrap within one key (after rotation: onto the current backing key).
        p.rotate(&a).await.unwrap();
        let wa2 = p.rewrap(&a, &wa, &c, &a).await.expect("rewrap a -> a");
        assert_eq!(p.unwrap(&a, &wa2, &c).await.unwrap(), dk);
    }

    pub async fn disabled_key_refuses_and_enable_restores(f: &dyn Fixture) {
        if !states_enforced(f, "disabled key refuses unwrap, enable restores") {
            return;
        }
        let p = f.provider();
        let key = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (dk, wrapped) = p.generate_data_key(&key, &c).await.unwrap();

        let info = p.disable(&key).await.expect("disable");
        assert_eq!(info.state, KeyState::Disabled);
        assert!(!info.state.is_usable());
        let e = expect_err(
            f,
            "unwrap with a disabled key",
            p.unwrap(&key, &wrapped, &c).await,
        );
        assert!(matches!(e, KeyError::Disabled { .. }), "{e:?}");
        assert_eq!(e.kind(), "key_unavailable");
        assert!(!e.is_transient());
        let e = expect_err(
            f,
            "generate_data_key with a disabled key",
            p.generate_data_key(&key, &c).await,
        );
        assert!(matches!(e, KeyError::Disabled { .. }), "{e:?}");
        let e = expect_err(f, "wrap with a disabled key", p.wrap(&key, &dk, &c).await);
        assert!(matches!(e, KeyError::Disabled { .. }), "{e:?}");

        if !f.reenables() {
            let e = expect_err(f, "enable", p.enable(&key).await);
            assert!(matches!(e, KeyError::Unsupported { .. }), "{e:?}");
            eprintln!(
                "NOT APPLICABLE [{}]: a disabled key cannot be enabled again; checked that enable says so and the key stays refused",
                f.name()
            );
            assert_eq!(p.describe(&key).await.unwrap().state, KeyState::Disabled);
            let e = expect_err(
                f,
                "unwrap after a refused enable",
                p.unwrap(&key, &wrapped, &c).await,
            );
            assert!(matches!(e, KeyError::Disabled { .. }), "{e:?}");
            return;
        }
        let info = p.enable(&key).await.expect("enable");
        assert_eq!(info.state, KeyState::Enabled);
        assert_eq!(
            p.unwrap(&key, &wrapped, &c)
                .await
                .expect("unwrap after enable"),
            dk
        );
    }

    pub async fn destroyed_key_refuses(f: &dyn Fixture) {
        if !states_enforced(f, "destroyed key refuses unwrap") {
            return;
        }
        let p = f.provider();
        let key = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (_, wrapped) = p.generate_data_key(&key, &c).await.unwrap();
        let started = chrono::Utc::now();

        let d = p.destroy(&key, 7).await.expect("destroy");
        eprintln!("[{}] destroy: {d:?}", f.name());
        assert!(!d.state_after.is_usable());
        match d.action {
            DestroyAction::DeletionScheduled => {
                assert!(
                    matches!(d.state_after, KeyState::PendingDeletion { .. }),
                    "{d:?}"
                );
                let days = (d.effective_at - started).num_hours() as f64 / 24.0;
                assert!(
                    (6.9..=7.1).contains(&days),
                    "deletion in {days} days, expected 7: {d:?}"
                );
            }
            DestroyAction::MaterialDestroyed
            | DestroyAction::ImportedMaterialDeleted
            | DestroyAction::ObjectsDestroyed
            | DestroyAction::RevokedAndDestroyed => {
                assert!(d.effective_at <= chrono::Utc::now());
            }
        }
        let info = p.describe(&key).await.expect("describe after destroy");
        assert!(!info.state.is_usable(), "{info:?}");

        let e = expect_err(
            f,
            "unwrap with a destroyed key",
            p.unwrap(&key, &wrapped, &c).await,
        );
        assert!(
            matches!(
                e,
                KeyError::PendingDeletion { .. } | KeyError::Destroyed { .. }
            ),
            "expected PendingDeletion or Destroyed, got {e:?}"
        );
        assert_eq!(e.kind(), "key_unavailable");
        let e = expect_err(
            f,
            "generate_data_key with a destroyed key",
            p.generate_data_key(&key, &c).await,
        );
        assert_eq!(e.kind(), "key_unavailable");

        // Idempotent: the second call reports the first destruction.
        let again = p.destroy(&key, 30).await.expect("destroy again");
        assert_eq!(again.action, d.action);
        assert_eq!(
            again.effective_at, d.effective_at,
            "second destroy must report the existing schedule"
        );
    }

    pub async fn imported_material_destroy_is_immediate(f: &dyn Fixture) {
        if !states_enforced(
            f,
            "destroy of imported key material is immediate (PendingImport)",
        ) {
            return;
        }
        let p = f.provider();
        let Some(key) = f.fresh_imported_key().await else {
            eprintln!(
                "[{}] not applicable: no imported key material in this provider",
                f.name()
            );
            return;
        };
        let info = p.describe(&key).await.unwrap();
        assert_eq!(info.origin, KeyOrigin::External);
        assert_eq!(info.state, KeyState::Enabled);
        let c = ctx("acme", 1);
        let (dk, wrapped) = p
            .generate_data_key(&key, &c)
            .await
            .expect("generate_data_key with imported key");
        assert_eq!(p.unwrap(&key, &wrapped, &c).await.unwrap(), dk);

        let before = chrono::Utc::now();
        let d = p.destroy(&key, 7).await.expect("destroy imported key");
        eprintln!("[{}] destroy imported: {d:?}", f.name());
        assert_eq!(d.action, DestroyAction::ImportedMaterialDeleted);
        assert_eq!(d.state_after, KeyState::PendingImport);
        assert!(d.effective_at >= before && d.effective_at <= chrono::Utc::now());

        let t = Instant::now();
        let e = expect_err(
            f,
            "unwrap after imported material deletion",
            p.unwrap(&key, &wrapped, &c).await,
        );
        assert!(matches!(e, KeyError::PendingImport { .. }), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(
            p.describe(&key).await.unwrap().state,
            KeyState::PendingImport
        );
        // Enabling cannot bring it back. AWS refuses EnableKey on a key pending
        // import; LocalStack accepts it and reports Enabled, but the material is
        // gone all the same (Decrypt then fails with an internal error).
        match p.enable(&key).await {
            Err(e) => {
                eprintln!(
                    "[{}] enable after imported material deletion: {e} (kind {})",
                    f.name(),
                    e.kind()
                );
                assert_eq!(e.kind(), "key_unavailable");
            }
            Ok(info) => {
                eprintln!(
                    "NOTE [{}]: EnableKey accepted on a key whose material was deleted (state now {}); AWS refuses it",
                    f.name(),
                    info.state.name()
                );
                assert_ne!(
                    f.name(),
                    "aws",
                    "real AWS KMS must refuse EnableKey without key material"
                );
                let e = expect_err(
                    f,
                    "unwrap after enable without material",
                    p.unwrap(&key, &wrapped, &c).await,
                );
                assert!(!matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
            }
        }

        let again = p.destroy(&key, 7).await.expect("destroy again");
        assert_eq!(again.action, DestroyAction::ImportedMaterialDeleted);
    }

    pub async fn error_kinds(f: &dyn Fixture, missing: &KeyRef) {
        let p = f.provider();
        let c = ctx("acme", 1);
        let e = expect_err(f, "describe of a missing key", p.describe(missing).await);
        assert!(matches!(e, KeyError::NotFound { .. }), "{e:?}");
        assert_eq!(e.kind(), "key_unavailable");
        let e = expect_err(
            f,
            "generate_data_key with a missing key",
            p.generate_data_key(missing, &c).await,
        );
        assert!(matches!(e, KeyError::NotFound { .. }), "{e:?}");
        assert!(!e.is_transient());
        // Errors name the key by reference.
        assert!(e.to_string().contains(missing.id()), "{e}");
    }
}

// ---------------------------------------------------------------------------
// Instantiation per backend
// ---------------------------------------------------------------------------

macro_rules! conformance {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn round_trip() {
                if let Some(f) = $fixture {
                    suite::round_trip(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn wrong_context_fails() {
                if let Some(f) = $fixture {
                    suite::wrong_context_fails(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn unwrap_is_pinned_to_the_key() {
                if let Some(f) = $fixture {
                    suite::unwrap_is_pinned_to_the_key(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn tampered_ciphertext_fails() {
                if let Some(f) = $fixture {
                    suite::tampered_ciphertext_fails(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn rotation_keeps_old_wraps() {
                if let Some(f) = $fixture {
                    suite::rotation_keeps_old_wraps(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn rewrap_moves_to_another_key() {
                if let Some(f) = $fixture {
                    suite::rewrap_moves_to_another_key(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn disabled_key_refuses_and_enable_restores() {
                if let Some(f) = $fixture {
                    suite::disabled_key_refuses_and_enable_restores(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn destroyed_key_refuses() {
                if let Some(f) = $fixture {
                    suite::destroyed_key_refuses(&f).await;
                    f.cleanup().await;
                }
            }
            #[tokio::test]
            async fn imported_material_destroy_is_immediate() {
                if let Some(f) = $fixture {
                    suite::imported_material_destroy_is_immediate(&f).await;
                    f.cleanup().await;
                }
            }
        }
    };
}

conformance!(local, LocalFixture::new());
conformance!(aws_kms, AwsFixture::new().await);
conformance!(pkcs11, Pkcs11Fixture::new());
conformance!(kmip, KmipFixture::new());

mod local_specific {
    use super::*;

    #[tokio::test]
    async fn error_kinds() {
        let f = LocalFixture::new().unwrap();
        let missing = KeyRef::local("no-such-key").unwrap();
        suite::error_kinds(&f, &missing).await;
    }

    /// An envelope of another provider is refused, not misread.
    #[tokio::test]
    async fn foreign_envelope_is_refused() {
        let f = LocalFixture::new().unwrap();
        let key = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (_, mut wrapped) = f.provider.generate_data_key(&key, &c).await.unwrap();
        wrapped.key_id = "arn:aws:kms:us-east-1:000000000000:key/1234".into();
        let e = expect_err(
            &f,
            "unwrap of a foreign envelope",
            f.provider.unwrap(&key, &wrapped, &c).await,
        );
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
    }
}

// ---------------------------------------------------------------------------
// PKCS#11 specifics on the token (SoftHSM2 in CI)
// ---------------------------------------------------------------------------

mod pkcs11_specific {
    use super::*;
    use crate::common::{on_token, token_session, version_handle};
    use custos::keys::pkcs11::{PinSource, Pkcs11Settings};
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn error_kinds() {
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let missing = common::pkcs11_key(&f.token, "missing");
        suite::error_kinds(&f, &missing).await;
    }

    /// An envelope of another key or provider is refused before the token
    /// is asked, as an invalid ciphertext.
    #[tokio::test]
    async fn foreign_envelope_is_refused() {
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let key = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (_, mut wrapped) = f.provider.generate_data_key(&key, &c).await.unwrap();
        assert_eq!(wrapped.key_version.as_deref(), Some("1"));
        assert_eq!(
            wrapped.ciphertext.len(),
            12 + 32 + 16,
            "IV ‖ ciphertext ‖ tag"
        );
        let mut other_version = wrapped.clone();
        other_version.key_version = Some("2".into());
        let e = expect_err(
            &f,
            "unwrap naming a version that does not exist",
            f.provider.unwrap(&key, &other_version, &c).await,
        );
        assert!(!matches!(e, KeyError::NotFound { .. }), "{e:?}");
        wrapped.key_id = "arn:aws:kms:us-east-1:000000000000:key/1234".into();
        let e = expect_err(
            &f,
            "unwrap of a foreign envelope",
            f.provider.unwrap(&key, &wrapped, &c).await,
        );
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
        f.cleanup().await;
    }

    /// Opens the test token directly (not through custos) and returns the
    /// attributes of the objects labelled `label`.
    fn token_objects(
        settings: &Pkcs11Settings,
        token: &str,
        label: &str,
    ) -> Vec<Vec<cryptoki::object::Attribute>> {
        use cryptoki::object::{Attribute, AttributeType, ObjectClass};
        let lock = custos::keys::pkcs11::module_lock(&settings.module).unwrap();
        let _serial = lock.lock().unwrap();
        let session = token_session(settings, token);
        let handles = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap();
        let mut out = Vec::new();
        for h in handles {
            // The key bytes cannot be read: the token refuses CKA_VALUE.
            let value = session.get_attributes(h, &[AttributeType::Value]);
            assert!(
                !matches!(&value, Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(_)))),
                "the token handed out CKA_VALUE of a CMK"
            );
            out.push(
                session
                    .get_attributes(
                        h,
                        &[
                            AttributeType::Id,
                            AttributeType::Token,
                            AttributeType::Sensitive,
                            AttributeType::Extractable,
                            AttributeType::NeverExtractable,
                            AttributeType::AlwaysSensitive,
                            AttributeType::ValueLen,
                        ],
                    )
                    .unwrap(),
            );
        }
        out
    }

    /// Plants a version object the way someone holding the PIN could:
    /// imported with a value they know (`C_CreateObject`), or generated
    /// extractable and then made non-extractable (its value could have been
    /// wrapped out in between).
    fn plant_version(settings: &Pkcs11Settings, token: &str, label: &str, id: u32, imported: bool) {
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::{Attribute, KeyType, ObjectClass};
        use cryptoki::types::Ulong;
        let lock = custos::keys::pkcs11::module_lock(&settings.module).unwrap();
        let _serial = lock.lock().unwrap();
        let session = token_session(settings, token);
        let common = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_be_bytes().to_vec()),
        ];
        if imported {
            let mut attrs = common;
            attrs.push(Attribute::Extractable(false));
            attrs.push(Attribute::Value(vec![0x42; 32]));
            session.create_object(&attrs).unwrap();
        } else {
            let mut attrs = common;
            attrs.push(Attribute::Extractable(true));
            attrs.push(Attribute::ValueLen(Ulong::from(32u64)));
            let h = session.generate_key(&Mechanism::AesKeyGen, &attrs).unwrap();
            session
                .update_attributes(h, &[Attribute::Extractable(false)])
                .unwrap();
        }
    }

    /// A version generated on the token, never extractable (so it passes the
    /// origin check), but able to wrap, unwrap or derive keys is never
    /// wrapped under: custos's own versions only encrypt and decrypt, and
    /// are not copyable (`C_CopyObject` could copy one with attributes
    /// changed where the token allows it).
    #[tokio::test]
    async fn a_version_that_can_wrap_or_derive_is_never_wrapped_under() {
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
        use cryptoki::types::Ulong;
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let key = f.fresh_key().await;
        let label = key.id().rsplit("object=").next().unwrap().to_owned();
        let c = ctx("acme", 1);
        let (dk, _) = f.provider.generate_data_key(&key, &c).await.unwrap();
        let session = token_session(&settings, &token);
        // custos's version 1: not copyable (where the token reports it).
        let v1 = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .unwrap();
        let copyable = session
            .get_attributes(v1[0], &[AttributeType::Copyable])
            .unwrap_or_default();
        for a in copyable {
            if let Attribute::Copyable(b) = a {
                assert!(!b, "custos generated a copyable version");
            }
        }
        // Under the module lock, as custos's own calls on this token are
        // (SoftHSM2 answered CKR_GENERAL_ERROR to an unserialized one under load).
        let lock = custos::keys::pkcs11::module_lock(&settings.module).unwrap();
        let serial = lock.lock().unwrap();
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(Ulong::from(32u64)),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Wrap(true),
                    Attribute::Derive(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(2u32.to_be_bytes().to_vec()),
                ],
            )
            .unwrap();
        drop(serial);
        let e = expect_err(
            &f,
            "wrap under a version that can wrap and derive",
            f.provider.wrap(&key, &dk, &c).await,
        );
        let msg = e.to_string();
        assert!(
            msg.contains("version 2") && msg.contains("CKA_WRAP") && msg.contains("CKA_DERIVE"),
            "{msg}"
        );
        f.provider.rotate(&key).await.unwrap();
        let w = f.provider.wrap(&key, &dk, &c).await.unwrap();
        assert_eq!(w.key_version.as_deref(), Some("3"));
        f.cleanup().await;
    }

    /// A newer version that someone with the PIN planted is never used for
    /// new wraps: its value may exist outside the token. Older envelopes
    /// still unwrap, and a rotation generates a clean version above it.
    #[tokio::test]
    async fn a_planted_version_is_never_wrapped_under() {
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        for imported in [true, false] {
            let key = f.fresh_key().await;
            let label = key.id().rsplit("object=").next().unwrap().to_owned();
            let c = ctx("acme", 1);
            let (dk, before) = f.provider.generate_data_key(&key, &c).await.unwrap();
            plant_version(&settings, &token, &label, 2, imported);
            let case = if imported {
                "imported"
            } else {
                "once extractable"
            };
            let e = expect_err(
                &f,
                &format!("wrap under a planted version 2 ({case})"),
                f.provider.wrap(&key, &dk, &c).await,
            );
            assert_eq!(e.kind(), "key_unavailable", "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("version 2") && msg.contains("CKA_"),
                "{case}: {msg}"
            );
            if imported {
                assert!(msg.contains("CKA_LOCAL"), "{msg}");
            } else {
                assert!(msg.contains("CKA_NEVER_EXTRACTABLE"), "{msg}");
            }
            // What version 1 wrapped still unwraps.
            let back = f.provider.unwrap(&key, &before, &c).await.unwrap();
            assert_eq!(back.expose(), dk.expose());
            // custos's own rotation makes version 3 on the token: used again.
            f.provider.rotate(&key).await.unwrap();
            let w = f.provider.wrap(&key, &dk, &c).await.unwrap();
            assert_eq!(w.key_version.as_deref(), Some("3"), "{case}");
        }
        f.cleanup().await;
    }

    /// A fresh key with two versions, disabled (CKA_ENCRYPT false), and
    /// version 1 relabelled `<label>-hidden` by another hand: (key, label,
    /// hidden label).
    async fn disabled_with_v1_relabelled(
        f: &Pkcs11Fixture,
        settings: &Pkcs11Settings,
        token: &str,
    ) -> (KeyRef, String, String) {
        use cryptoki::object::Attribute;
        let key = f.fresh_key().await;
        f.provider.rotate(&key).await.unwrap();
        f.provider.disable(&key).await.unwrap();
        let label = key.id().rsplit("object=").next().unwrap().to_owned();
        let hidden = format!("{label}-hidden");
        on_token(settings, token, |s| {
            let v1 = version_handle(s, &label, 1);
            s.update_attributes(v1, &[Attribute::Label(hidden.as_bytes().to_vec())])
                .unwrap();
        });
        (key, label, hidden)
    }

    /// Lets the relabelled version 1 (under `hidden`) encrypt again, as its
    /// owner would after a refused shred; the shred then finds it, destroys
    /// it and names it.
    async fn shred_once_v1_can_encrypt(
        f: &Pkcs11Fixture,
        settings: &Pkcs11Settings,
        token: &str,
        key: &KeyRef,
        hidden: &str,
    ) {
        use cryptoki::object::Attribute;
        on_token(settings, token, |s| {
            let v1 = version_handle(s, hidden, 1);
            s.update_attributes(v1, &[Attribute::Encrypt(true)])
                .unwrap();
        });
        let d = f.provider.destroy(key, 7).await.unwrap();
        assert!(
            d.objects
                .iter()
                .any(|o| o.contains(&format!("object={hidden};id=00000001"))),
            "{d:?}"
        );
        assert!(token_objects(settings, token, hidden).is_empty());
    }

    /// Generates a version as custos would, but by another hand (so custos
    /// has no record of it): AES-256 on the token, never extractable, able
    /// only to encrypt and decrypt; `copyable` as asked.
    fn generate_by_hand(s: &cryptoki::session::Session, label: &str, id: u32, copyable: bool) {
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::{Attribute, KeyType, ObjectClass};
        use cryptoki::types::Ulong;
        s.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::from(32u64)),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Wrap(false),
                Attribute::Unwrap(false),
                Attribute::Derive(false),
                Attribute::Copyable(copyable),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_be_bytes().to_vec()),
            ],
        )
        .unwrap();
    }

    /// A version custos generated and someone holding the PIN relabelled
    /// (C_SetAttributeValue of CKA_LABEL) is still found by the shred, by
    /// its recorded check value: destroyed, and named in the destruction.
    #[tokio::test]
    async fn a_relabelled_version_is_destroyed_by_the_shred() {
        use cryptoki::object::Attribute;
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let key = f.fresh_key().await;
        f.provider.rotate(&key).await.unwrap();
        let label = key.id().rsplit("object=").next().unwrap().to_owned();
        let hidden = format!("{label}-hidden");
        on_token(&settings, &token, |s| {
            let v1 = version_handle(s, &label, 1);
            s.update_attributes(v1, &[Attribute::Label(hidden.as_bytes().to_vec())])
                .unwrap();
        });
        assert_eq!(token_objects(&settings, &token, &label).len(), 1);
        assert_eq!(token_objects(&settings, &token, &hidden).len(), 1);
        let d = f.provider.destroy(&key, 7).await.unwrap();
        assert!(
            d.objects
                .iter()
                .any(|o| o.contains(&format!("object={hidden};id=00000001"))),
            "{d:?}"
        );
        assert!(
            d.objects
                .iter()
                .any(|o| o.contains(&format!("object={label};id=00000002"))),
            "{d:?}"
        );
        assert!(token_objects(&settings, &token, &hidden).is_empty());
        assert!(token_objects(&settings, &token, &label).is_empty());
    }

    /// The decoy attack: a version relabelled away, and another object put
    /// under the label with the version's CKA_ID and CKA_ENCRYPT false (so
    /// it gives no check value as it is). The shred does not take the id for
    /// the version: it makes the decoy encrypt, sees other material, searches
    /// the token, and destroys the relabelled version too.
    #[tokio::test]
    async fn a_decoy_under_a_version_id_does_not_hide_the_relabelled_version() {
        use cryptoki::object::Attribute;
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let key = f.fresh_key().await;
        let label = key.id().rsplit("object=").next().unwrap().to_owned();
        let hidden = format!("{label}-hidden");
        on_token(&settings, &token, |s| {
            let v1 = version_handle(s, &label, 1);
            s.update_attributes(v1, &[Attribute::Label(hidden.as_bytes().to_vec())])
                .unwrap();
            generate_by_hand(s, &label, 1, false);
            let decoy = version_handle(s, &label, 1);
            s.update_attributes(decoy, &[Attribute::Encrypt(false)])
                .unwrap();
        });
        let d = f.provider.destroy(&key, 7).await.unwrap();
        assert!(
            d.objects
                .iter()
                .any(|o| o.contains(&format!("object={hidden};id=00000001"))),
            "{d:?}"
        );
        assert!(token_objects(&settings, &token, &hidden).is_empty());
        assert!(token_objects(&settings, &token, &label).is_empty());
    }

    /// A relabelled version that cannot encrypt gives no check value: the
    /// shred cannot tell it from another key, so it refuses, naming it, and
    /// leaves the key as it was (still disabled). Once it can encrypt, the
    /// shred finds and destroys it.
    #[tokio::test]
    async fn a_relabelled_version_that_cannot_encrypt_refuses_the_shred() {
        use cryptoki::object::{Attribute, AttributeType};
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let (key, label, hidden) = disabled_with_v1_relabelled(&f, &settings, &token).await;
        let e = f.provider.destroy(&key, 7).await.unwrap_err().to_string();
        assert!(e.contains(&format!("object={hidden};id=00000001")), "{e}");
        assert!(e.contains("CKA_ID [\"00000001\"]"), "{e}");
        assert_eq!(token_objects(&settings, &token, &hidden).len(), 1);
        assert_eq!(token_objects(&settings, &token, &label).len(), 1);
        let encrypts = on_token(&settings, &token, |s| {
            let v2 = version_handle(s, &label, 2);
            s.get_attributes(v2, &[AttributeType::Encrypt]).unwrap()
        });
        assert!(
            matches!(encrypts.as_slice(), [Attribute::Encrypt(false)]),
            "{encrypts:?}"
        );
        let info = f.provider.describe(&key).await.unwrap();
        assert!(matches!(info.state, KeyState::Disabled), "{info:?}");
        shred_once_v1_can_encrypt(&f, &settings, &token, &key, &hidden).await;
        assert!(token_objects(&settings, &token, &label).is_empty());
    }

    /// A destruction record on the token is anyone's to write: one planted
    /// by a PIN holder, naming a version they relabelled with CKA_ENCRYPT
    /// cleared, does not excuse that version from being found. Only what a
    /// shred of this installation destroyed (its local record) is excused.
    #[tokio::test]
    async fn a_planted_destruction_record_does_not_excuse_a_hidden_version() {
        use cryptoki::object::{Attribute, ObjectClass};
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let (key, label, hidden) = disabled_with_v1_relabelled(&f, &settings, &token).await;
        // The token part of an object's name, as custos prints it.
        let e = f.provider.destroy(&key, 7).await.unwrap_err().to_string();
        let prefix = e
            .split(&format!(";object={hidden};id=00000001"))
            .next()
            .and_then(|before| before.rsplit(' ').next())
            .unwrap()
            .to_owned();
        assert!(prefix.starts_with("token="), "{e}");
        let planted = serde_json::json!({
            "destroyed_at": "2026-01-01T00:00:00Z",
            "objects": [format!("{prefix};object={label};id=00000001")],
        });
        on_token(&settings, &token, |s| {
            s.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Application(b"custos-destroyed/1".to_vec()),
                Attribute::Value(serde_json::to_vec(&planted).unwrap()),
            ])
            .unwrap();
        });
        let e = f.provider.destroy(&key, 7).await.unwrap_err().to_string();
        assert!(e.contains(&format!("object={hidden};id=00000001")), "{e}");
        assert!(e.contains("CKA_ID [\"00000001\"]"), "{e}");
        assert_eq!(token_objects(&settings, &token, &hidden).len(), 1);
        shred_once_v1_can_encrypt(&f, &settings, &token, &key, &hidden).await;
    }

    /// A version custos did not generate and the token reports copyable is
    /// adopted at the key's first sight; a copy of it under another label
    /// (C_CopyObject) is then destroyed by the shred too, found by the
    /// adopted version's check value.
    #[tokio::test]
    async fn a_copy_of_an_adopted_copyable_version_is_destroyed_by_the_shred() {
        use cryptoki::object::Attribute;
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let key = common::pkcs11_key(&token, "adopted");
        let label = key.id().rsplit("object=").next().unwrap().to_owned();
        let copy = format!("{label}-copy");
        on_token(&settings, &token, |s| generate_by_hand(s, &label, 1, true));
        // First sight: adopted as found.
        let info = f.provider.describe(&key).await.unwrap();
        assert_eq!(info.current_version.as_deref(), Some("1"));
        on_token(&settings, &token, |s| {
            let v1 = version_handle(s, &label, 1);
            s.copy_object(v1, &[Attribute::Label(copy.as_bytes().to_vec())])
                .unwrap();
        });
        assert_eq!(token_objects(&settings, &token, &copy).len(), 1);
        // (No wrap under it: SoftHSM2 2.6 refuses to clear CKA_COPYABLE,
        // so custos refuses the version for wrapping.)
        let d = f.provider.destroy(&key, 7).await.unwrap();
        assert!(
            d.objects
                .iter()
                .any(|o| o.contains(&format!("object={copy};id=00000001"))),
            "{d:?}"
        );
        assert!(token_objects(&settings, &token, &copy).is_empty());
        assert!(token_objects(&settings, &token, &label).is_empty());
        let info = f.provider.describe(&key).await.unwrap();
        assert!(matches!(info.state, KeyState::Destroyed { .. }), "{info:?}");
    }

    /// Other material under a version's label and CKA_ID (the version
    /// destroyed and a new object generated in its place) is refused for
    /// wrapping, for good; so is a clean version custos did not generate.
    /// A rotation makes a version custos records, used again.
    #[tokio::test]
    async fn a_version_with_swapped_material_is_refused_for_wrapping() {
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let key = f.fresh_key().await;
        let label = key.id().rsplit("object=").next().unwrap().to_owned();
        let c = ctx("acme", 1);
        let (dk, _) = f.provider.generate_data_key(&key, &c).await.unwrap();
        on_token(&settings, &token, |s| {
            s.destroy_object(version_handle(s, &label, 1)).unwrap();
            generate_by_hand(s, &label, 1, false);
        });
        for attempt in ["first", "second"] {
            let e = expect_err(
                &f,
                &format!("{attempt} wrap under swapped material"),
                f.provider.wrap(&key, &dk, &c).await,
            );
            assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
            assert!(e.to_string().contains("other material"), "{e}");
        }
        on_token(&settings, &token, |s| generate_by_hand(s, &label, 2, false));
        let e = expect_err(
            &f,
            "wrap under a version custos did not generate",
            f.provider.wrap(&key, &dk, &c).await,
        );
        let msg = e.to_string();
        assert!(
            msg.contains("version 2") && msg.contains("custos did not generate it"),
            "{msg}"
        );
        f.provider.rotate(&key).await.unwrap();
        let w = f.provider.wrap(&key, &dk, &c).await.unwrap();
        assert_eq!(w.key_version.as_deref(), Some("3"));
        f.cleanup().await;
    }

    /// What custos creates is a token object, sensitive and never
    /// extractable, and each rotation adds one with the next CKA_ID.
    #[tokio::test]
    async fn created_objects_are_not_extractable() {
        use cryptoki::object::Attribute;
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let (settings, token) = common::pkcs11_settings().unwrap();
        let key = f.fresh_key().await;
        f.provider.rotate(&key).await.unwrap();
        let label = key.id().rsplit("object=").next().unwrap().to_owned();
        let objects = token_objects(&settings, &token, &label);
        assert_eq!(objects.len(), 2, "one object per version");
        let mut ids = Vec::new();
        for attrs in &objects {
            let mut seen = 0;
            for a in attrs {
                match a {
                    Attribute::Id(id) => ids.push(id.clone()),
                    Attribute::Token(b)
                    | Attribute::Sensitive(b)
                    | Attribute::NeverExtractable(b)
                    | Attribute::AlwaysSensitive(b) => {
                        assert!(*b, "{a:?}");
                        seen += 1;
                    }
                    Attribute::Extractable(b) => {
                        assert!(!*b, "CKA_EXTRACTABLE must be false");
                        seen += 1;
                    }
                    Attribute::ValueLen(n) => assert_eq!(u64::from(*n), 32),
                    _ => {}
                }
            }
            assert_eq!(seen, 5, "{attrs:?}");
        }
        ids.sort();
        assert_eq!(ids, [vec![0, 0, 0, 1], vec![0, 0, 0, 2]]);
        let info = f.provider.describe(&key).await.unwrap();
        assert_eq!(info.current_version.as_deref(), Some("2"));
        assert_eq!(info.origin, KeyOrigin::Provider);
        // CKA_START_DATE, where the token returns it (SoftHSM2 does not for
        // a private object).
        eprintln!("[pkcs11] created_at {:?}", info.created_at);

        // Destroyed: a search finds no object, and the certificate's list
        // names each version.
        let d = f.provider.destroy(&key, 7).await.unwrap();
        assert_eq!(d.action, DestroyAction::ObjectsDestroyed);
        assert_eq!(d.objects.len(), 2, "{d:?}");
        assert!(
            d.objects.iter().any(|o| o.ends_with("id=00000002")),
            "{d:?}"
        );
        assert!(token_objects(&settings, &token, &label).is_empty());
        // And an existing object is not made again by create_key.
        let e = expect_err(
            &f,
            "create_key of a destroyed key",
            f.provider.create_key(&key).await,
        );
        assert!(matches!(e, KeyError::Destroyed { .. }), "{e:?}");
    }

    /// A token that is not there is `key_unavailable`, never "not found":
    /// absence of a PKCS#11 key is taken as its destruction.
    #[tokio::test]
    async fn absent_token_is_unavailable() {
        let Some(f) = Pkcs11Fixture::new() else {
            return;
        };
        let key = KeyRef::parse("pkcs11:token=custos-no-such-token;object=acme").unwrap();
        for (case, r) in [
            ("describe", f.provider.describe(&key).await.map(|_| ())),
            (
                "generate_data_key",
                f.provider
                    .generate_data_key(&key, &ctx("acme", 1))
                    .await
                    .map(|_| ()),
            ),
            ("destroy", f.provider.destroy(&key, 7).await.map(|_| ())),
        ] {
            let e = expect_err(&f, case, r);
            assert!(matches!(e, KeyError::Unavailable { .. }), "{case}: {e:?}");
            assert_eq!(e.kind(), "key_unavailable");
            assert!(e.to_string().contains("custos-no-such-token"), "{e}");
        }
        // With a serial that does not match, too.
        let (_, token) = common::pkcs11_settings().unwrap();
        let key = KeyRef::parse(&format!(
            "pkcs11:token={token};serial=0000000000000000;object=acme"
        ))
        .unwrap();
        let e = expect_err(
            &f,
            "a serial that does not match",
            f.provider.describe(&key).await,
        );
        assert_eq!(e.kind(), "key_unavailable");
    }

    /// When every session is busy, a call fails as `key_unavailable` after
    /// the configured timeout, never hangs; it works again once one is free.
    #[tokio::test]
    async fn pool_exhaustion_times_out() {
        let Some((mut settings, token)) = common::pkcs11_settings() else {
            return;
        };
        let _use = common::pkcs11_shared();
        settings.max_sessions = 1;
        settings.timeout = Duration::from_secs(1);
        let provider = Pkcs11Provider::open(&settings).unwrap();
        let key = common::pkcs11_key(&token, "pool");
        provider.create_key(&key).await.unwrap();
        let held = provider.hold_all_sessions().await.unwrap();
        let t = Instant::now();
        let e = provider.describe(&key).await.unwrap_err();
        let took = t.elapsed();
        eprintln!("[pkcs11] all sessions busy: {e} after {took:?}");
        assert!(matches!(e, KeyError::Unavailable { .. }), "{e:?}");
        assert_eq!(e.kind(), "key_unavailable");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
        drop(held);
        // Concurrent callers share the one session in turn.
        let calls = (0..8).map(|_| provider.describe(&key));
        for r in futures::future::join_all(calls).await {
            assert_eq!(r.unwrap().state, KeyState::Enabled);
        }
        provider.destroy(&key, 7).await.unwrap();
    }

    /// The PIN shows nowhere: not in the settings' or the provider's Debug,
    /// not in errors; and a PIN file others can read is refused.
    #[tokio::test]
    async fn pin_never_shows() {
        let Some((settings, _)) = common::pkcs11_settings() else {
            return;
        };
        let _use = common::pkcs11_shared();
        let PinSource::File(pin_file) = &settings.pin else {
            unreachable!()
        };
        let pin = std::fs::read_to_string(pin_file).unwrap().trim().to_owned();
        let provider = Pkcs11Provider::open(&settings).unwrap();
        for shown in [format!("{settings:?}"), format!("{provider:?}")] {
            assert!(!shown.contains(&pin), "PIN in {shown}");
        }
        // A PIN from the environment: the same.
        let var = format!(
            "CUSTOS_TEST_PIN_{}",
            hex::encode(custos::util::random_bytes::<4>())
        );
        let env_settings = Pkcs11Settings {
            pin: PinSource::Env(var.clone()),
            ..settings.clone()
        };
        let e = Pkcs11Provider::open(&env_settings).unwrap_err();
        assert!(e.to_string().contains(&var), "{e}");
        // A PIN file that group or others can read.
        let dir = tempfile::tempdir().unwrap();
        let loose = dir.path().join("pin");
        std::fs::write(&loose, format!("{pin}\n")).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loose_settings = Pkcs11Settings {
            pin: PinSource::File(loose.clone()),
            ..settings.clone()
        };
        let e = Pkcs11Provider::open(&loose_settings).unwrap_err();
        eprintln!("[pkcs11] loose PIN file: {e}");
        assert_eq!(e.kind(), "insecure_permissions");
        for shown in [e.to_string(), format!("{e:?}")] {
            assert!(!shown.contains(&pin), "PIN in {shown}");
        }
    }
}

// ---------------------------------------------------------------------------
// AWS KMS specifics on the emulator
// ---------------------------------------------------------------------------

mod aws_kms_specific {
    use super::*;
    use aws_sdk_kms::primitives::Blob;

    #[tokio::test]
    async fn error_kinds() {
        let Some(f) = AwsFixture::new().await else {
            return;
        };
        let missing = KeyRef::parse("aws-kms:00000000-0000-4000-8000-00000000dead").unwrap();
        suite::error_kinds(&f, &missing).await;
        let missing_alias = KeyRef::parse("aws-kms:alias/custos-no-such-alias").unwrap();
        suite::error_kinds(&f, &missing_alias).await;
        let e = expect_err(&f, "create_key", f.provider.create_key(&missing).await);
        assert!(matches!(e, KeyError::Unsupported { .. }), "{e:?}");
    }

    /// The KMS EncryptionContext is exactly `WrapContext::pairs()`: decrypting
    /// with those pairs straight through the SDK works, and changing any one
    /// pair (including the purpose, which the suite cannot vary) fails.
    #[tokio::test]
    async fn encryption_context_is_the_wrap_context() {
        let Some(f) = AwsFixture::new().await else {
            return;
        };
        let key = f.fresh_key().await;
        let c = ctx("acme", 5);
        let (dk, wrapped) = f.provider.generate_data_key(&key, &c).await.unwrap();
        let client = f.provider.client();
        let decrypt = |pairs: std::collections::BTreeMap<String, String>| {
            client
                .decrypt()
                .key_id(key.id())
                .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
                .set_encryption_context(Some(pairs.into_iter().collect()))
                .send()
        };
        let out = decrypt(c.pairs())
            .await
            .expect("decrypt with exactly ctx.pairs()");
        assert_eq!(out.plaintext().unwrap().as_ref(), dk.expose());
        for field in ["custos:tenant", "custos:purpose", "custos:epoch"] {
            let mut pairs = c.pairs();
            pairs.insert(field.into(), "other".into());
            let err = decrypt(pairs).await.expect_err(field);
            let code = aws_sdk_kms::error::ProvideErrorMetadata::code(&err)
                .unwrap_or("?")
                .to_owned();
            eprintln!("[{}] decrypt with another {field}: {code}", f.name());
            assert_eq!(code, "InvalidCiphertextException", "{field}");
        }
        let mut pairs = c.pairs();
        pairs.remove("custos:purpose");
        assert!(decrypt(pairs).await.is_err(), "a missing purpose must fail");
        f.cleanup().await;
    }

    #[tokio::test]
    async fn destroy_validates_the_pending_window() {
        let Some(f) = AwsFixture::new().await else {
            return;
        };
        let p = &f.provider;
        let key = f.fresh_key().await;
        for bad in [0, 6, 31] {
            let e = expect_err(
                &f,
                &format!("destroy with a {bad}-day window"),
                p.destroy(&key, bad).await,
            );
            assert!(matches!(e, KeyError::Unsupported { .. }), "{e:?}");
        }
        // Nothing changed: still enabled.
        assert_eq!(p.describe(&key).await.unwrap().state, KeyState::Enabled);
        if states_enforced(&f, "destroy with a 30-day window is scheduled 30 days out") {
            let d = p.destroy(&key, 30).await.unwrap();
            let days = (d.effective_at - chrono::Utc::now()).num_hours() as f64 / 24.0;
            assert!((29.9..=30.1).contains(&days), "{d:?}");
        }
        f.cleanup().await;
    }

    #[tokio::test]
    async fn aliases_resolve_to_the_key_arn() {
        let Some(f) = AwsFixture::new().await else {
            return;
        };
        let alias = format!(
            "alias/custos-test-{}",
            hex::encode(custos::util::random_bytes::<6>())
        );
        let key = f.track(&f.provider.create_test_key(Some(&alias)).await.unwrap());
        let by_alias = KeyRef::parse(&format!("aws-kms:{alias}")).unwrap();
        let info = f.provider.describe(&by_alias).await.unwrap();
        assert_eq!(info.key_id, key.id());
        assert_eq!(info.reference, by_alias);
        let c = ctx("acme", 1);
        let (dk, wrapped) = f.provider.generate_data_key(&by_alias, &c).await.unwrap();
        assert_eq!(
            wrapped.key_id,
            key.id(),
            "envelope names the ARN, not the alias"
        );
        assert_eq!(f.provider.unwrap(&key, &wrapped, &c).await.unwrap(), dk);
        assert_eq!(
            f.provider.unwrap(&by_alias, &wrapped, &c).await.unwrap(),
            dk
        );
        // Key-management calls take no alias in KMS: the provider resolves it.
        let rotated = f.provider.rotate(&by_alias).await.expect("rotate by alias");
        assert_eq!(rotated.key_id, key.id());
        let disabled = f
            .provider
            .disable(&by_alias)
            .await
            .expect("disable by alias");
        let enabled = f.provider.enable(&by_alias).await.expect("enable by alias");
        if f.enforces_states() {
            assert_eq!(disabled.state, KeyState::Disabled);
            assert_eq!(enabled.state, KeyState::Enabled);
        }
        let d = f
            .provider
            .destroy(&by_alias, 7)
            .await
            .expect("destroy by alias");
        assert_eq!(d.action, DestroyAction::DeletionScheduled);
        f.cleanup().await;
    }

    /// The script's aliases exist (scripts/emulators.sh start creates them).
    #[tokio::test]
    async fn script_aliases_exist() {
        let Some(f) = AwsFixture::new().await else {
            return;
        };
        if f.emulator == "aws" {
            eprintln!("not applicable on real AWS");
            return;
        }
        for alias in ["alias/custos-test-a", "alias/custos-test-b"] {
            let key = KeyRef::parse(&format!("aws-kms:{alias}")).unwrap();
            let info = f
                .provider
                .describe(&key)
                .await
                .unwrap_or_else(|e| panic!("{alias}: {e}"));
            assert_eq!(info.state, KeyState::Enabled, "{alias}");
        }
    }

    /// What the emulator does with credentials it cannot know. Real AWS refuses
    /// them (AccessDenied; the mapping is tested against the fake KMS below);
    /// LocalStack and moto check no signatures, so this only records the fact.
    #[tokio::test]
    async fn wrong_credentials() {
        let Some(f) = AwsFixture::new().await else {
            return;
        };
        let key = f.fresh_key().await;
        let settings = AwsKmsSettings {
            access_key_id: Some("AKIAIOSFODNN7EXAMPLE".into()),
            secret_access_key: Some("not-the-secret".into()),
            ..common::aws_settings()
        };
        let bad = AwsKmsProvider::new(&settings).await.unwrap();
        let settings = AwsKmsSettings {
            secret_access_key: Some("not-the-secret".into()),
            ..common::aws_settings()
        };
        let bad_secret = AwsKmsProvider::new(&settings).await.unwrap();
        for (what, p) in [
            ("unknown access key", &bad),
            ("right key id, wrong secret", &bad_secret),
        ] {
            let r = p.describe(&key).await;
            match (&r, f.emulator.as_str()) {
                (Err(e), _) => {
                    eprintln!(
                        "[{}] wrong credentials ({what}): {e} (kind {})",
                        f.name(),
                        e.kind()
                    );
                    if f.emulator == "aws" {
                        assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
                    } else {
                        assert_eq!(e.kind(), "key_unavailable", "{e:?}");
                    }
                }
                (Ok(info), "aws") => panic!("real AWS accepted wrong credentials: {info:?}"),
                (Ok(_), emulator) => {
                    eprintln!(
                        "[{emulator}] wrong credentials ({what}): accepted (the emulator checks no signatures)"
                    )
                }
            }
        }
        f.cleanup().await;
    }
}

// ---------------------------------------------------------------------------
// AWS KMS error mapping and retries against a scripted fake KMS (no emulator)
// ---------------------------------------------------------------------------

mod mock {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    type Responder = dyn Fn(&str, usize) -> (u16, String) + Send + Sync;

    /// An HTTP/1.1 server on 127.0.0.1 that answers KMS JSON requests from a
    /// script: `respond(target, n)` gets the operation (`Decrypt`, …) and how
    /// many requests came before, and returns (status, JSON body).
    struct FakeKms {
        addr: SocketAddr,
        hits: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeKms {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FakeKms {
        async fn start(
            respond: impl Fn(&str, usize) -> (u16, String) + Send + Sync + 'static,
        ) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(Mutex::new(Vec::new()));
            let respond: Arc<Responder> = Arc::new(respond);
            let task = {
                let hits = hits.clone();
                tokio::spawn(async move {
                    loop {
                        let Ok((mut sock, _)) = listener.accept().await else {
                            return;
                        };
                        let hits = hits.clone();
                        let respond = respond.clone();
                        tokio::spawn(async move {
                            let Some(target) = read_request(&mut sock).await else {
                                return;
                            };
                            let n = {
                                let mut h = hits.lock().unwrap();
                                h.push(target.clone());
                                h.len() - 1
                            };
                            let (status, body) = respond(&target, n);
                            let head = format!(
                                "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.1\r\n\
                                 content-length: {}\r\nconnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = sock.write_all(head.as_bytes()).await;
                            let _ = sock.write_all(body.as_bytes()).await;
                            let _ = sock.shutdown().await;
                        });
                    }
                })
            };
            FakeKms { addr, hits, task }
        }

        async fn provider(&self) -> AwsKmsProvider {
            AwsKmsProvider::new(&AwsKmsSettings {
                region: Some("us-east-1".into()),
                endpoint_url: Some(format!("http://{}", self.addr)),
                access_key_id: Some("test".into()),
                secret_access_key: Some("test".into()),
                profile: None,
            })
            .await
            .unwrap()
        }

        fn hits(&self) -> Vec<String> {
            self.hits.lock().unwrap().clone()
        }
    }

    /// Reads one request; returns the operation named by `X-Amz-Target`.
    async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<String> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let header_end = loop {
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).to_ascii_lowercase();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                l.strip_prefix(name)
                    .map(|v| v.trim_start_matches(':').trim().to_owned())
            })
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < header_end + len {
            let n = sock.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let target = header("x-amz-target").unwrap_or_default();
        // Header values were lower-cased above; give the operation its usual spelling back.
        let op = target.rsplit('.').next().unwrap_or("").to_owned();
        Some(
            match op.as_str() {
                "decrypt" => "Decrypt",
                "describekey" => "DescribeKey",
                "generatedatakey" => "GenerateDataKey",
                "encrypt" => "Encrypt",
                _ => "Other",
            }
            .to_owned(),
        )
    }

    fn error(code: &str, message: &str) -> String {
        format!(r#"{{"__type":"{code}","message":"{message}"}}"#)
    }

    fn metadata(state: &str, extra: &str) -> String {
        format!(
            r#"{{"KeyMetadata":{{"KeyId":"1234abcd-12ab-34cd-56ef-1234567890ab","Arn":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","KeyState":"{state}","Enabled":false,"Origin":"EXTERNAL","CreationDate":1700000000{extra}}}}}"#
        )
    }

    fn key() -> KeyRef {
        KeyRef::parse("aws-kms:1234abcd-12ab-34cd-56ef-1234567890ab").unwrap()
    }

    fn wrapped() -> custos::keys::WrappedKey {
        custos::keys::WrappedKey {
            key_id: key().id().into(),
            key_version: None,
            ciphertext: vec![7; 116],
        }
    }

    #[tokio::test]
    async fn bad_credentials_read_as_access_denied_and_are_not_retried() {
        for code in [
            "UnrecognizedClientException",
            "InvalidSignatureException",
            "AccessDeniedException",
            "ExpiredTokenException",
        ] {
            let fake = FakeKms::start(move |_, _| {
                (
                    400,
                    error(
                        code,
                        "The security token included in the request is invalid.",
                    ),
                )
            })
            .await;
            let e = fake
                .provider()
                .await
                .unwrap(&key(), &wrapped(), &ctx("acme", 1))
                .await
                .unwrap_err();
            eprintln!("fake {code}: {e}");
            assert!(matches!(e, KeyError::AccessDenied { .. }), "{code}: {e:?}");
            assert_eq!(e.kind(), "key_unavailable");
            assert!(e.to_string().contains(code), "{e}");
            assert_eq!(fake.hits().len(), 1, "{code} must not be retried");
        }
    }

    type Check = fn(&KeyError) -> bool;

    #[tokio::test]
    async fn permanent_errors_map_and_are_not_retried() {
        let cases: [(&str, u16, Check); 5] = [
            ("InvalidCiphertextException", 400, |e| {
                matches!(e, KeyError::InvalidCiphertext { .. })
            }),
            ("IncorrectKeyException", 400, |e| {
                matches!(e, KeyError::InvalidCiphertext { .. })
            }),
            ("DisabledException", 400, |e| {
                matches!(e, KeyError::Disabled { .. })
            }),
            ("NotFoundException", 400, |e| {
                matches!(e, KeyError::NotFound { .. })
            }),
            ("UnsupportedOperationException", 501, |e| {
                matches!(e, KeyError::Backend { .. })
            }),
        ];
        for (code, status, check) in cases {
            let fake = FakeKms::start(move |_, _| (status, error(code, "no"))).await;
            let e = fake
                .provider()
                .await
                .unwrap(&key(), &wrapped(), &ctx("acme", 1))
                .await
                .unwrap_err();
            eprintln!("fake {code}: {e} (kind {})", e.kind());
            assert!(check(&e), "{code}: {e:?}");
            assert!(!e.is_transient());
            assert_eq!(fake.hits().len(), 1, "{code} must not be retried");
        }
    }

    #[tokio::test]
    async fn throttling_is_retried_with_backoff_then_reported() {
        let fake =
            FakeKms::start(|_, _| (400, error("ThrottlingException", "Rate exceeded"))).await;
        let t = Instant::now();
        let e = fake
            .provider()
            .await
            .unwrap(&key(), &wrapped(), &ctx("acme", 1))
            .await
            .unwrap_err();
        let took = t.elapsed();
        eprintln!("fake throttling: {e} after {took:?}");
        assert!(matches!(e, KeyError::Throttled { .. }), "{e:?}");
        assert_eq!(e.kind(), "kms_throttled");
        assert!(e.is_transient());
        assert_eq!(fake.hits().len(), 5);
        assert!(took < Duration::from_secs(11), "{took:?}");
    }

    #[tokio::test]
    async fn server_errors_are_retried_and_recover() {
        let ok = r#"{"KeyId":"arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab","Plaintext":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}"#;
        let fake = FakeKms::start(move |_, n| match n {
            0 => (500, error("KMSInternalException", "oops")),
            1 => (503, String::new()),
            2 => (400, error("LimitExceededException", "slow down")),
            _ => (200, ok.to_owned()),
        })
        .await;
        let dk = fake
            .provider()
            .await
            .unwrap(&key(), &wrapped(), &ctx("acme", 1))
            .await
            .expect("recovers");
        assert_eq!(dk.expose(), &std::array::from_fn::<u8, 32, _>(|i| i as u8));
        assert_eq!(fake.hits().len(), 4);
    }

    #[tokio::test]
    async fn a_short_plaintext_is_refused() {
        let fake =
            FakeKms::start(|_, _| (200, r#"{"KeyId":"k","Plaintext":"AAECAw=="}"#.to_owned()))
                .await;
        let e = fake
            .provider()
            .await
            .unwrap(&key(), &wrapped(), &ctx("acme", 1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("4-byte plaintext"), "{e}");
        assert!(!e.to_string().contains("AAECAw"), "{e}");
    }

    #[tokio::test]
    async fn invalid_state_is_explained_by_describing_the_key() {
        let fake = FakeKms::start(|op, _| match op {
            "DescribeKey" => (200, metadata("PendingImport", "")),
            _ => (
                400,
                error("KMSInvalidStateException", "key is pending import"),
            ),
        })
        .await;
        let e = fake
            .provider()
            .await
            .unwrap(&key(), &wrapped(), &ctx("acme", 1))
            .await
            .unwrap_err();
        assert!(matches!(e, KeyError::PendingImport { .. }), "{e:?}");
        assert_eq!(fake.hits(), ["Decrypt", "DescribeKey"]);

        let fake = FakeKms::start(|op, _| match op {
            "DescribeKey" => (
                200,
                metadata("PendingDeletion", r#","DeletionDate":1800000000"#),
            ),
            _ => (
                400,
                error("KMSInvalidStateException", "key is pending deletion"),
            ),
        })
        .await;
        let e = fake
            .provider()
            .await
            .unwrap(&key(), &wrapped(), &ctx("acme", 1))
            .await
            .unwrap_err();
        match e {
            KeyError::PendingDeletion {
                deletion_date: Some(d),
                ..
            } => assert_eq!(d.timestamp(), 1_800_000_000),
            other => panic!("{other:?}"),
        }

        // Describe fails too: the message decides.
        let fake = FakeKms::start(|op, _| match op {
            "DescribeKey" => (400, error("AccessDeniedException", "no describe")),
            _ => (
                400,
                error("KMSInvalidStateException", "arn:… is pending deletion."),
            ),
        })
        .await;
        let e = fake
            .provider()
            .await
            .unwrap(&key(), &wrapped(), &ctx("acme", 1))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                KeyError::PendingDeletion {
                    deletion_date: None,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn describe_maps_states_and_origin() {
        let fake = FakeKms::start(|_, _| (200, metadata("PendingImport", ""))).await;
        let info = fake.provider().await.describe(&key()).await.unwrap();
        assert_eq!(info.state, KeyState::PendingImport);
        assert_eq!(info.origin, KeyOrigin::External);
        assert_eq!(
            info.key_id,
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        );
        assert_eq!(info.created_at.unwrap().timestamp(), 1_700_000_000);
        let fake = FakeKms::start(|_, _| (200, metadata("Unavailable", ""))).await;
        let info = fake.provider().await.describe(&key()).await.unwrap();
        assert_eq!(
            info.state,
            KeyState::Other {
                name: "Unavailable".into()
            }
        );
    }

    #[tokio::test]
    async fn unreachable_endpoint_fails_fast() {
        let p = AwsKmsProvider::new(&AwsKmsSettings {
            region: Some("us-east-1".into()),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            profile: None,
        })
        .await
        .unwrap();
        let t = Instant::now();
        let e = p
            .unwrap(&key(), &wrapped(), &ctx("acme", 1))
            .await
            .unwrap_err();
        let took = t.elapsed();
        eprintln!("unreachable: {e} (kind {}) after {took:?}", e.kind());
        match &e {
            KeyError::Unreachable { endpoint, .. } => assert_eq!(endpoint, "http://127.0.0.1:9"),
            other => panic!("{other:?}"),
        }
        assert_eq!(e.kind(), "kms_unreachable");
        assert!(e.is_transient());
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn missing_region_is_a_configuration_error() {
        // Only meaningful when the environment supplies no region either, and
        // only safe when the SDK may not ask instance metadata (169.254.169.254)
        // for one: that address is never to be contacted from here.
        if env("AWS_REGION").is_some()
            || env("AWS_DEFAULT_REGION").is_some()
            || env("AWS_PROFILE").is_some()
        {
            eprintln!("not applicable: the environment names a region or profile");
            return;
        }
        if env("AWS_EC2_METADATA_DISABLED").as_deref() != Some("true") {
            eprintln!(
                "not applicable: needs AWS_EC2_METADATA_DISABLED=true (else the SDK asks instance metadata)"
            );
            return;
        }
        let e = AwsKmsProvider::new(&AwsKmsSettings {
            endpoint_url: Some("http://127.0.0.1:9".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(e, KeyError::NotConfigured { .. }), "{e:?}");
        assert!(e.to_string().contains("region"), "{e}");
    }
}

// ---------------------------------------------------------------------------
// KMIP specifics (PyKMIP from scripts/pykmip.sh, or a real key manager)
// ---------------------------------------------------------------------------

mod kmip_specific {
    use super::*;
    use custos::keys::kmip::KmipSettings;
    use std::path::{Path, PathBuf};

    fn settings() -> Option<KmipSettings> {
        common::kmip_settings()
    }

    /// Registers (never Create: the value is the caller's) an active
    /// AES-256 key with `names` in `group` through PyKMIP's own client, as
    /// another application holding the same client certificate could.
    /// Returns its Unique Identifier.
    fn register_known_value(s: &KmipSettings, group: &str, names: &[&str]) -> String {
        const SCRIPT: &str = r#"
import sys
from kmip.pie.client import ProxyKmipClient
from kmip.pie import objects
from kmip.core import enums
from kmip.core import objects as cobjects
from kmip.core.factories import attributes as af
host, port = sys.argv[1].rsplit(":", 1)
ca, cert, key, group, names = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
f = af.AttributeFactory()
attrs = [f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                            [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT])]
attrs += [f.create_attribute(enums.AttributeType.NAME, n, i) for i, n in enumerate(names)]
attrs.append(f.create_attribute(enums.AttributeType.OBJECT_GROUP, group))
known = objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 256, bytes(range(32)))
with ProxyKmipClient(hostname=host, port=int(port), cert=cert, key=key, ca=ca, config_file="/dev/null") as c:
    r = c.proxy.register(enums.ObjectType.SYMMETRIC_KEY, cobjects.TemplateAttribute(attributes=attrs),
                         c.object_factory.convert(known))
    if r.result_status.value != enums.ResultStatus.SUCCESS:
        sys.exit("register failed: %s %s" % (r.result_reason, r.result_message))
    c.activate(r.uuid)
    print(r.uuid)
"#;
        let mut args = vec![group];
        args.extend_from_slice(names);
        pykmip_client(s, SCRIPT, &args)
    }

    /// Runs `script` with PyKMIP's own client, given the server, CA, client
    /// certificate and key, then `args`; returns what it printed.
    fn pykmip_client(s: &KmipSettings, script: &str, args: &[&str]) -> String {
        // The interpreter PyKMIP is installed for (scripts/pykmip.sh).
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".emu/pykmip/bin/python3");
        let python = if venv.exists() {
            venv
        } else {
            PathBuf::from("/usr/bin/python3")
        };
        let out = std::process::Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(&s.server)
            .arg(&s.ca_file)
            .arg(&s.client_cert_file)
            .arg(&s.client_key_file)
            .args(args)
            .output()
            .expect("python3 with PyKMIP");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Review #15: another client with custos's credentials Registers
    /// `<n>@v99` in the key's group, with a value it knows. custos never
    /// wraps under it (a later shred would leave those data keys readable
    /// to whoever knows that value), and a shred destroys it with the rest.
    #[tokio::test]
    async fn a_registered_version_with_a_known_value_is_never_wrapped_under() {
        let Some(f) = KmipFixture::new() else { return };
        let Some(s) = settings() else { return };
        let p = &f.provider;
        let key = f.fresh_key().await;
        let name = key.id().strip_prefix("name/").unwrap().to_owned();
        let mine = p.describe(&key).await.unwrap().current_version.unwrap();
        let planted =
            register_known_value(&s, &format!("custos-key/{name}"), &[&format!("{name}@v99")]);
        let c = ctx("acme", 1);
        let (dk, w) = p.generate_data_key(&key, &c).await.unwrap();
        assert_eq!(w.key_version.as_deref(), Some(mine.as_str()));
        assert_eq!(p.unwrap(&key, &w, &c).await.unwrap(), dk);
        // A rotation makes version 2, custos's own (from its highest recorded).
        p.rotate(&key).await.unwrap();
        let (_, w2) = p.generate_data_key(&key, &c).await.unwrap();
        assert_ne!(w2.key_version.as_deref(), Some(planted.as_str()));
        assert_ne!(w2.key_version.as_deref(), Some(mine.as_str()));
        let d = p.destroy(&key, 7).await.unwrap();
        assert!(d.objects.contains(&planted), "{d:?}");
        assert!(!p.object_present(&key, &planted).await.unwrap());
    }

    /// Revokes and destroys object `uid` through PyKMIP's own client, as
    /// another application holding custos's credentials could.
    fn destroy_behind_custos(s: &KmipSettings, uid: &str) {
        const SCRIPT: &str = r#"
import sys
from kmip.pie.client import ProxyKmipClient
from kmip.core import enums
host, port = sys.argv[1].rsplit(":", 1)
ca, cert, key, uid = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
with ProxyKmipClient(hostname=host, port=int(port), cert=cert, key=key, ca=ca, config_file="/dev/null") as c:
    c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
    c.destroy(uid)
"#;
        pykmip_client(s, SCRIPT, &[uid]);
    }

    /// Review #15, round 2: PyKMIP gives a destroyed top identifier to the
    /// next object. Another client destroys custos's current version and
    /// Registers a value it knows under the same Name and group: it gets
    /// the same identifier (unless a test running beside this one took it),
    /// and custos still never wraps under it: the key material is pinned.
    #[tokio::test]
    async fn a_reused_identifier_with_a_known_value_is_never_wrapped_under() {
        let Some(f) = KmipFixture::new() else { return };
        let Some(s) = settings() else { return };
        let p = &f.provider;
        let key = f.fresh_key().await;
        let name = key.id().strip_prefix("name/").unwrap().to_owned();
        let c = ctx("acme", 1);
        let (dk, _) = p.generate_data_key(&key, &c).await.unwrap();
        let mine = p.describe(&key).await.unwrap().current_version.unwrap();
        destroy_behind_custos(&s, &mine);
        let planted =
            register_known_value(&s, &format!("custos-key/{name}"), &[&format!("{name}@v1")]);
        eprintln!(
            "[kmip] destroyed {mine}, registered {planted} (reused: {})",
            planted == mine
        );
        let e = p.wrap(&key, &dk, &c).await.unwrap_err();
        assert_eq!(e.kind(), "key_unavailable", "{e}");
        if planted == mine {
            assert!(e.to_string().contains(&format!("{mine:?}")), "{e}");
        }
        // Never trusted again.
        let e = p.generate_data_key(&key, &c).await.unwrap_err();
        assert_eq!(e.kind(), "key_unavailable", "{e}");
    }

    #[tokio::test]
    async fn error_kinds() {
        let Some(f) = KmipFixture::new() else { return };
        let missing = KeyRef::parse("kmip:name/custos-no-such-key").unwrap();
        suite::error_kinds(&f, &missing).await;
        let missing_uid = KeyRef::parse("kmip:no-such-object-4711").unwrap();
        suite::error_kinds(&f, &missing_uid).await;
        // The key manager assigns identifiers: custos creates only named keys.
        let e = expect_err(&f, "create_key", f.provider.create_key(&missing_uid).await);
        assert!(matches!(e, KeyError::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("kmip:name/"), "{e}");
    }

    /// The CMK is used only through Encrypt/Decrypt: over a whole life
    /// (create, wrap, unwrap, rotate, rewrap, disable, destroy) the client
    /// sends no Get, and the operations it sends are those the docs list.
    #[tokio::test]
    async fn no_get_of_key_material() {
        let Some(f) = KmipFixture::new() else { return };
        let p = &f.provider;
        let a = f.fresh_key().await;
        let b = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (dk, w) = p.generate_data_key(&a, &c).await.unwrap();
        assert_eq!(p.unwrap(&a, &w, &c).await.unwrap(), dk);
        p.rotate(&a).await.unwrap();
        let wb = p.rewrap(&a, &w, &c, &b).await.unwrap();
        assert_eq!(p.unwrap(&b, &wb, &c).await.unwrap(), dk);
        p.disable(&b).await.unwrap();
        p.destroy(&a, 7).await.unwrap();
        p.destroy(&b, 7).await.unwrap();
        let sent = p.operations_sent();
        eprintln!("[kmip] operations sent: {sent:?}");
        assert!(!sent.contains_key("Get"), "{sent:?}");
        let documented = [
            "Create",
            "Activate",
            "Locate",
            "GetAttributes",
            "Encrypt",
            "Decrypt",
            "Revoke",
            "Destroy",
        ];
        for op in sent.keys() {
            assert!(documented.contains(&op.as_str()), "undocumented {op}");
        }
        for op in ["Encrypt", "Decrypt", "Revoke", "Destroy"] {
            assert!(sent.contains_key(op), "{op} never sent: {sent:?}");
        }
    }

    /// Destroy revokes and destroys every version; afterwards the server
    /// holds none of them (GetAttributes: not found), the key reads as
    /// destroyed, and a retained envelope no longer unwraps.
    #[tokio::test]
    async fn destroy_removes_every_version() {
        let Some(f) = KmipFixture::new() else { return };
        let p = &f.provider;
        let key = f.fresh_key().await;
        let c = ctx("acme", 2);
        let (_, w1) = p.generate_data_key(&key, &c).await.unwrap();
        p.rotate(&key).await.unwrap();
        let (_, w2) = p.generate_data_key(&key, &c).await.unwrap();
        assert_ne!(w1.key_version, w2.key_version);
        let d = p.destroy(&key, 7).await.unwrap();
        assert_eq!(d.action, DestroyAction::RevokedAndDestroyed);
        assert_eq!(d.objects.len(), 2, "{d:?}");
        for uid in &d.objects {
            assert!(
                !p.object_present(&key, uid).await.unwrap(),
                "{uid} still there"
            );
        }
        for w in [&w1, &w2] {
            assert!(d.objects.contains(w.key_version.as_ref().unwrap()));
            let e = expect_err(&f, "unwrap after destroy", p.unwrap(&key, w, &c).await);
            assert!(matches!(e, KeyError::Destroyed { .. }), "{e:?}");
        }
        assert!(matches!(
            p.describe(&key).await.unwrap().state,
            KeyState::Destroyed {
                destroyed_at: Some(_)
            }
        ));
        // A destroyed name is not brought back by --create-key.
        let e = expect_err(&f, "create after destroy", p.create_key(&key).await);
        assert!(matches!(e, KeyError::Destroyed { .. }), "{e:?}");
    }

    /// A key with more versions than one Locate page (2 here) is read whole
    /// through the server's paging (Maximum Items, Offset Items): the newest
    /// version is current, the oldest still unwraps, destroy reaches all.
    #[tokio::test]
    async fn a_family_longer_than_a_locate_page() {
        let Some(mut f) = KmipFixture::new() else {
            return;
        };
        f.provider.set_locate_page(2);
        let p = &f.provider;
        let key = f.fresh_key().await;
        let c = ctx("acme", 3);
        let (dk, first) = p.generate_data_key(&key, &c).await.unwrap();
        let mut current = p.describe(&key).await.unwrap().current_version;
        for _ in 0..4 {
            let after = p.rotate(&key).await.unwrap().current_version;
            assert_ne!(after, current, "rotation made no newer version");
            current = after;
        }
        let (_, last) = p.generate_data_key(&key, &c).await.unwrap();
        assert_eq!(last.key_version, current);
        assert_eq!(p.unwrap(&key, &first, &c).await.unwrap(), dk);
        let d = p.destroy(&key, 7).await.unwrap();
        assert_eq!(d.objects.len(), 5, "{d:?}");
        for uid in &d.objects {
            assert!(!p.object_present(&key, uid).await.unwrap(), "{uid}");
        }
    }

    /// A change anywhere in the envelope (the server's ciphertext of WK, the
    /// IV, the object it names, the seal) or a key_version that disagrees
    /// with it is refused as an invalid ciphertext. New envelopes are format
    /// 2 (docs/FORMAT.md §3): PyKMIP offers no unpadded CBC, so mode 2 (CTR).
    #[tokio::test]
    async fn tampered_envelope_is_invalid_ciphertext() {
        let Some(f) = KmipFixture::new() else { return };
        let p = &f.provider;
        let key = f.fresh_key().await;
        let c = ctx("acme", 1);
        let (dk, w) = p.generate_data_key(&key, &c).await.unwrap();
        assert_eq!(w.ciphertext[0], 2, "format");
        assert!(matches!(w.ciphertext[1], 1 | 2), "mode {}", w.ciphertext[1]);
        let uid_len = u16::from_be_bytes([w.ciphertext[2], w.ciphertext[3]]) as usize;
        let iv_at = 4 + uid_len;
        let wk_at = iv_at + 16;
        for (what, at) in [
            ("mode", 1),
            ("IV", iv_at),
            ("server ciphertext (last block)", wk_at + 31),
            ("server ciphertext (first block)", wk_at),
            ("nonce", wk_at + 32),
            ("sealed key", wk_at + 32 + 12),
            ("tag", w.ciphertext.len() - 1),
        ] {
            let mut bad = w.clone();
            bad.ciphertext[at] ^= 0x03;
            let e = expect_err(&f, what, p.unwrap(&key, &bad, &c).await);
            assert!(
                matches!(e, KeyError::InvalidCiphertext { .. }),
                "{what}: {e:?}"
            );
            assert_no_key_bytes(&e, &dk);
        }
        let mut bad = w.clone();
        bad.key_version = Some("another-object".into());
        let e = expect_err(&f, "key_version", p.unwrap(&key, &bad, &c).await);
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
        let mut bad = w.clone();
        bad.ciphertext.truncate(10);
        let e = expect_err(&f, "truncated", p.unwrap(&key, &bad, &c).await);
        assert!(matches!(e, KeyError::InvalidCiphertext { .. }), "{e:?}");
        assert_eq!(p.unwrap(&key, &w, &c).await.unwrap(), dk);
    }

    /// A server that is down: a clear kms_unreachable error at once. A
    /// server that accepts but never answers: the same after the operation
    /// timeout, never a hang.
    #[tokio::test]
    async fn server_down_is_unreachable_without_hang() {
        let Some(s) = settings() else { return };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let down = KmipProvider::new(&KmipSettings {
            server: format!("127.0.0.1:{port}"),
            server_name: Some("127.0.0.1".into()),
            ..s.clone()
        })
        .unwrap();
        let key = KeyRef::parse("kmip:name/custos-down").unwrap();
        let t = Instant::now();
        let e = down.describe(&key).await.unwrap_err();
        eprintln!("[kmip] server down: {e} (kind {})", e.kind());
        assert!(matches!(e, KeyError::Unreachable { .. }), "{e:?}");
        assert_eq!(e.kind(), "kms_unreachable");
        assert!(e.is_transient());
        assert!(e.to_string().contains(&port.to_string()), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));

        // Accepts the connection, then says nothing.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = std::thread::spawn(move || {
            let conn = silent.accept();
            std::thread::sleep(Duration::from_secs(4));
            drop(conn);
        });
        let mute = KmipProvider::new(&KmipSettings {
            server: addr.to_string(),
            server_name: Some("127.0.0.1".into()),
            operation_timeout: Duration::from_secs(1),
            ..s.clone()
        })
        .unwrap();
        let t = Instant::now();
        let e = mute.describe(&key).await.unwrap_err();
        eprintln!(
            "[kmip] silent server: {e} (kind {}) after {:?}",
            e.kind(),
            t.elapsed()
        );
        assert_eq!(e.kind(), "kms_unreachable", "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        hold.join().unwrap();
    }

    /// A server certificate from another CA is refused, and the error says so.
    #[tokio::test]
    async fn wrong_ca_is_named() {
        let Some(s) = settings() else { return };
        let other = common::env("CUSTOS_TEST_KMIP_OTHER_CA")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                // A real key manager: any self-made CA will do.
                let dir = tempfile::tempdir().unwrap().keep();
                let ca = dir.join("ca.crt");
                let ok = std::process::Command::new("openssl")
                    .args([
                        "req",
                        "-x509",
                        "-newkey",
                        "ec",
                        "-pkeyopt",
                        "ec_paramgen_curve:prime256v1",
                        "-nodes",
                        "-days",
                        "1",
                        "-subj",
                        "/CN=other",
                    ])
                    .arg("-keyout")
                    .arg(dir.join("ca.key"))
                    .arg("-out")
                    .arg(&ca)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "openssl could not make a CA");
                ca
            });
        let p = KmipProvider::new(&KmipSettings {
            ca_file: other,
            ..s.clone()
        })
        .unwrap();
        let key = KeyRef::parse("kmip:name/custos-wrong-ca").unwrap();
        let e = p.describe(&key).await.unwrap_err();
        eprintln!("[kmip] wrong CA: {e} (kind {})", e.kind());
        assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
        assert!(
            e.to_string().contains("not trusted") && e.to_string().contains("ca_file"),
            "{e}"
        );
        assert!(!e.is_transient());
    }

    /// A client certificate the server does not trust: the handshake is
    /// refused, and the error points at the client certificate.
    #[tokio::test]
    async fn wrong_client_certificate_is_named() {
        let Some(s) = settings() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        let ok = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=custos",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl could not make a certificate");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let p = KmipProvider::new(&KmipSettings {
            client_cert_file: cert,
            client_key_file: key,
            ..s.clone()
        })
        .unwrap();
        let k = KeyRef::parse("kmip:name/custos-wrong-cert").unwrap();
        let t = Instant::now();
        let e = p.describe(&k).await.unwrap_err();
        eprintln!(
            "[kmip] untrusted client certificate: {e} (kind {})",
            e.kind()
        );
        assert!(matches!(e, KeyError::AccessDenied { .. }), "{e:?}");
        assert!(e.to_string().contains("client certificate"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    fn copy_key(from: &Path, dir: &Path, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let to = dir.join("client.key");
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
        to
    }

    /// The client's private key never shows: not in the settings' or the
    /// provider's Debug, not in any error; a key file others can read is
    /// refused (as for every secret custos keeps); a broken one is named by
    /// path only.
    #[tokio::test]
    async fn client_key_never_leaks() {
        let Some(s) = settings() else { return };
        let pem = std::fs::read_to_string(&s.client_key_file).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(body.len() > 40);
        let leaks = |shown: &str| shown.contains(&body[..40]) || shown.contains("PRIVATE KEY");
        let p = KmipProvider::new(&s).unwrap();
        for shown in [format!("{s:?}"), format!("{p:?}")] {
            assert!(!leaks(&shown), "{shown}");
        }
        let dir = tempfile::tempdir().unwrap();
        let loose = copy_key(&s.client_key_file, dir.path(), 0o644);
        let e = KmipProvider::new(&KmipSettings {
            client_key_file: loose.clone(),
            ..s.clone()
        })
        .unwrap_err();
        eprintln!("[kmip] readable client key: {e}");
        assert_eq!(e.kind(), "insecure_permissions", "{e:?}");
        assert!(!leaks(&e.to_string()) && !leaks(&format!("{e:?}")));
        // Not a key at all: named by its path, its content never echoed.
        std::fs::write(&loose, format!("garbage {}\n", &body[..40])).unwrap();
        std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let e = KmipProvider::new(&KmipSettings {
            client_key_file: loose.clone(),
            ..s.clone()
        })
        .unwrap_err();
        eprintln!("[kmip] broken client key: {e}");
        assert!(e.to_string().contains(&loose.display().to_string()), "{e}");
        assert!(!leaks(&e.to_string()) && !leaks(&format!("{e:?}")), "{e:?}");
        // Errors of a working provider carry no key either.
        let key = KeyRef::parse("kmip:name/custos-no-such-key").unwrap();
        let e = p.describe(&key).await.unwrap_err();
        assert!(!leaks(&e.to_string()) && !leaks(&format!("{e:?}")));
    }
}
