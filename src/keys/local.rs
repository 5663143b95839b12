//! Local key provider: one key file per CMK under a directory (mode 0700),
//! each holding versioned 256-bit key material (mode 0600).
//!
//! It keeps the semantics of a KMS: a key has a state (enabled, disabled,
//! destroyed), rotation adds a version and old versions keep unwrapping,
//! and destruction overwrites and removes the material, leaving a tombstone
//! (no material) so that the destruction can be shown later.
//!
//! Wrapped-key layout (docs/FORMAT.md §Local key provider):
//! `version u32 BE ‖ nonce[12] ‖ AES-256-GCM(wrap key, data key)[32] ‖ tag[16]`,
//! wrap key = HKDF-SHA256(ikm = version material, info = "custos/v1/local-wrap" ‖ 0 ‖ name),
//! AAD = "custos/v1/local-wrap" ‖ 0 ‖ name ‖ 0 ‖ version u32 BE ‖ canonical context.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{
    DataKey, DestroyAction, Destruction, KeyError, KeyInfo, KeyOrigin, KeyProvider, KeyRef,
    KeyState, ProviderKind, SecretKey, WrapContext, WrappedKey,
};
use crate::util::{base64_bytes, random_bytes, sync_dir, write_file_atomic};

const KEY_FILE_FORMAT: &str = "custos-local-key/1";
const WRAP_LABEL: &[u8] = b"custos/v1/local-wrap";
const WRAPPED_LEN: usize = 4 + 12 + 32 + 16;

/// Local key names: `[a-z0-9][a-z0-9._-]{0,127}`, safe as a file name.
pub fn valid_key_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    name: String,
    state: FileState,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    current_version: u32,
    versions: Vec<KeyVersion>,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum FileState {
    Enabled,
    Disabled,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyVersion {
    version: u32,
    created_at: DateTime<Utc>,
    #[serde(with = "base64_bytes")]
    material: Vec<u8>,
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        for v in &mut self.versions {
            v.material.zeroize();
        }
    }
}

/// What remains of a destroyed key: when, and how many versions. No material.
#[derive(Serialize, Deserialize)]
struct Tombstone {
    format: String,
    name: String,
    destroyed_at: DateTime<Utc>,
    versions: u32,
}

/// The local provider. Reads its key file for every operation, so no CMK
/// material stays in memory between calls.
#[derive(Debug)]
pub struct LocalKeyProvider {
    dir: PathBuf,
    // Serialises read-modify-write of key files within this process.
    write_lock: Mutex<()>,
}

impl LocalKeyProvider {
    /// Opens (and creates, mode 0700) the key directory.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, KeyError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| KeyError::LocalFile {
                path: dir.clone(),
                message: format!("cannot create key directory: {e}"),
            })?;
        Ok(LocalKeyProvider {
            dir,
            write_lock: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    fn tombstone_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.destroyed"))
    }

    fn name_of(key: &KeyRef) -> Result<&str, KeyError> {
        if key.kind() != ProviderKind::Local {
            return Err(KeyError::Unsupported {
                provider: "local",
                operation: "keys of another provider",
            });
        }
        Ok(key.id())
    }

    /// The tombstone of a destroyed (or being destroyed) key.
    fn tombstone(&self, name: &str) -> Option<Tombstone> {
        let t = fs::read(self.tombstone_path(name)).ok()?;
        serde_json::from_slice::<Tombstone>(&t).ok()
    }

    fn read(&self, key: &KeyRef) -> Result<KeyFile, KeyError> {
        let name = Self::name_of(key)?;
        let path = self.key_path(name);
        // A tombstone wins over a key file still there: a destruction in
        // progress (or interrupted) never makes the key usable again.
        if let Some(t) = self.tombstone(name) {
            return Err(KeyError::Destroyed {
                key: key.to_string(),
                destroyed_at: Some(t.destroyed_at),
            });
        }
        let bytes = match fs::read(&path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    key: key.to_string(),
                    message: format!("no key file {}", path.display()),
                });
            }
            Err(e) => {
                return Err(KeyError::LocalFile {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let mode = fs::metadata(&path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(KeyError::LocalFile {
                path,
                message: format!(
                    "permissions {:04o} are too open; key files must be 0600 (chmod 600)",
                    mode & 0o7777
                ),
            });
        }
        let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| KeyError::LocalFile {
            path: path.clone(),
            message: format!("not a custos key file: {e}"),
        })?;
        if file.format != KEY_FILE_FORMAT || file.name != name {
            return Err(KeyError::LocalFile {
                path,
                message: format!(
                    "key file is for {:?} in format {:?}",
                    file.name, file.format
                ),
            });
        }
        if file.versions.iter().any(|v| v.material.len() != 32)
            || file.version(file.current_version).is_none()
        {
            return Err(KeyError::LocalFile {
                path,
                message: "key file has malformed key material".into(),
            });
        }
        Ok(file)
    }

    fn write(&self, file: &KeyFile) -> Result<(), KeyError> {
        let path = self.key_path(&file.name);
        let json = Zeroizing::new(serde_json::to_vec_pretty(file).expect("key file serialises"));
        write_file_atomic(&path, &json, 0o600).map_err(|e| KeyError::LocalFile {
            path,
            message: e.to_string(),
        })
    }

    fn info(&self, key: &KeyRef, file: &KeyFile) -> KeyInfo {
        KeyInfo {
            reference: key.clone(),
            key_id: key.to_string(),
            state: match file.state {
                FileState::Enabled => KeyState::Enabled,
                FileState::Disabled => KeyState::Disabled,
            },
            origin: KeyOrigin::Provider,
            current_version: Some(file.current_version.to_string()),
            created_at: Some(file.created_at),
            rotated_at: file.version(file.current_version).map(|v| v.created_at),
        }
    }

    fn usable(&self, key: &KeyRef) -> Result<KeyFile, KeyError> {
        let file = self.read(key)?;
        match file.state {
            FileState::Enabled => Ok(file),
            FileState::Disabled => Err(KeyError::Disabled {
                key: key.to_string(),
            }),
        }
    }

    fn modify(&self, key: &KeyRef, f: impl FnOnce(&mut KeyFile)) -> Result<KeyInfo, KeyError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = self.read(key)?;
        f(&mut file);
        file.updated_at = Utc::now();
        self.write(&file)?;
        Ok(self.info(key, &file))
    }
}

impl KeyFile {
    fn version(&self, v: u32) -> Option<&KeyVersion> {
        self.versions.iter().find(|k| k.version == v)
    }
}

fn cipher_for(name: &str, material: &[u8]) -> Aes256Gcm {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, material);
    let mut info = WRAP_LABEL.to_vec();
    info.push(0);
    info.extend_from_slice(name.as_bytes());
    let mut k = Zeroizing::new([0u8; 32]);
    hk.expand(&info, k.as_mut()).expect("valid HKDF length");
    Aes256Gcm::new_from_slice(k.as_ref()).expect("32-byte key")
}

fn aad(name: &str, version: u32, ctx: &WrapContext) -> Vec<u8> {
    let mut out = WRAP_LABEL.to_vec();
    out.push(0);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&ctx.canonical_bytes());
    out
}

fn seal(name: &str, version: &KeyVersion, data_key: &DataKey, ctx: &WrapContext) -> Vec<u8> {
    wrap_with_nonce(
        name,
        version.version,
        &version.material,
        data_key,
        ctx,
        random_bytes(),
    )
}

/// The local wrap, given its nonce (docs/FORMAT.md; public for the test vectors).
pub fn wrap_with_nonce(
    name: &str,
    version: u32,
    material: &[u8],
    data_key: &DataKey,
    ctx: &WrapContext,
    nonce: [u8; 12],
) -> Vec<u8> {
    let mut buf = Zeroizing::new(data_key.expose().to_vec());
    let tag = cipher_for(name, material)
        .encrypt_inout_detached(
            &nonce.into(),
            &aad(name, version, ctx),
            buf.as_mut_slice().into(),
        )
        .expect("a 32-byte message is within AES-GCM limits");
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    out
}

#[async_trait]
impl KeyProvider for LocalKeyProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        match self.read(key) {
            Ok(file) => Ok(self.info(key, &file)),
            Err(KeyError::Destroyed { destroyed_at, .. }) => Ok(KeyInfo {
                reference: key.clone(),
                key_id: key.to_string(),
                state: KeyState::Destroyed { destroyed_at },
                origin: KeyOrigin::Provider,
                current_version: None,
                created_at: None,
                rotated_at: None,
            }),
            Err(e) => Err(e),
        }
    }

    async fn create_key(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let name = Self::name_of(key)?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        match self.read(key) {
            Ok(file) => return Ok(self.info(key, &file)),
            Err(KeyError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        let now = Utc::now();
        let file = KeyFile {
            format: KEY_FILE_FORMAT.into(),
            name: name.to_owned(),
            state: FileState::Enabled,
            created_at: now,
            updated_at: now,
            current_version: 1,
            versions: vec![KeyVersion {
                version: 1,
                created_at: now,
                material: SecretKey::generate().expose().to_vec(),
            }],
        };
        // create_new: two processes creating the same key must not overwrite each other.
        let path = self.key_path(name);
        let json = Zeroizing::new(serde_json::to_vec_pretty(&file).expect("key file serialises"));
        let tmp = self
            .dir
            .join(format!(".{name}.new-{}", hex::encode(random_bytes::<6>())));
        let io = |e: std::io::Error| KeyError::LocalFile {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&json).and_then(|_| f.sync_all()).map_err(io)?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(&self.dir).map_err(io)?;
                Ok(self.info(key, &file))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let existing = self.read(key)?;
                Ok(self.info(key, &existing))
            }
            Err(e) => Err(io(e)),
        }
    }

    async fn generate_data_key(
        &self,
        key: &KeyRef,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        let data_key = SecretKey::generate();
        let wrapped = self.wrap(key, &data_key, ctx).await?;
        Ok((data_key, wrapped))
    }

    async fn wrap(
        &self,
        key: &KeyRef,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        let file = self.usable(key)?;
        let version = file.version(file.current_version).expect("checked on read");
        Ok(WrappedKey {
            key_id: key.to_string(),
            key_version: Some(version.version.to_string()),
            ciphertext: seal(&file.name, version, data_key, ctx),
        })
    }

    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError> {
        let file = self.usable(key)?;
        let refused = |message: &str| KeyError::InvalidCiphertext {
            key: key.to_string(),
            message: message.into(),
        };
        if wrapped.key_id != key.to_string() {
            return Err(refused(&format!(
                "wrapped under {}, not this key",
                wrapped.key_id
            )));
        }
        let ct = &wrapped.ciphertext;
        if ct.len() != WRAPPED_LEN {
            return Err(refused("wrong length"));
        }
        let version_no = u32::from_be_bytes(ct[..4].try_into().expect("4 bytes"));
        let version = file
            .version(version_no)
            .ok_or_else(|| refused(&format!("unknown key version {version_no}")))?;
        let nonce: [u8; 12] = ct[4..16].try_into().expect("12 bytes");
        let mut buf = Zeroizing::new(ct[16..48].to_vec());
        let tag: [u8; 16] = ct[48..].try_into().expect("16 bytes");
        cipher_for(&file.name, &version.material)
            .decrypt_inout_detached(
                &nonce.into(),
                &aad(&file.name, version_no, ctx),
                buf.as_mut_slice().into(),
                &tag.into(),
            )
            .map_err(|_| refused(""))?;
        Ok(SecretKey::from_slice(&buf).expect("32 bytes"))
    }

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

    async fn rotate(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let _ = self.usable(key)?;
        self.modify(key, |file| {
            let next = file.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
            file.versions.push(KeyVersion {
                version: next,
                created_at: Utc::now(),
                material: SecretKey::generate().expose().to_vec(),
            });
            file.current_version = next;
        })
    }

    async fn disable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.modify(key, |file| file.state = FileState::Disabled)
    }

    async fn enable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.modify(key, |file| file.state = FileState::Enabled)
    }

    /// Writes a tombstone, then overwrites the key file with zeros, fsyncs,
    /// unlinks it and fsyncs the directory. Immediate and irreversible (the
    /// window applies to AWS KMS only). Resumable: the tombstone comes first,
    /// so a crash at any point leaves a key that reads as destroyed (never as
    /// missing, never usable), and a re-run finishes the overwrite and unlink.
    /// On copy-on-write or wear-levelled media old blocks may survive
    /// physically: use a KMS or HSM where that matters.
    async fn destroy(
        &self,
        key: &KeyRef,
        _pending_window_days: u32,
    ) -> Result<Destruction, KeyError> {
        let name = Self::name_of(key)?.to_owned();
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.key_path(&name);
        let io = |e: std::io::Error| KeyError::LocalFile {
            path: path.clone(),
            message: e.to_string(),
        };
        let destroyed_at = match self.tombstone(&name) {
            Some(t) => t.destroyed_at,
            None => {
                let file = self.read(key)?;
                let now = Utc::now();
                let tomb = Tombstone {
                    format: "custos-local-key-tombstone/1".into(),
                    name: name.clone(),
                    destroyed_at: now,
                    versions: file.versions.len() as u32,
                };
                write_file_atomic(
                    &self.tombstone_path(&name),
                    &serde_json::to_vec_pretty(&tomb).expect("serialises"),
                    0o600,
                )
                .map_err(io)?;
                now
            }
        };
        // Whatever is left of the key file (all of it, or a partly zeroed
        // one after a crash): overwritten, then unlinked.
        match fs::metadata(&path) {
            Ok(m) => {
                let mut f = fs::OpenOptions::new().write(true).open(&path).map_err(io)?;
                f.write_all(&vec![0u8; m.len() as usize])
                    .and_then(|_| f.sync_all())
                    .map_err(io)?;
                drop(f);
                fs::remove_file(&path).map_err(io)?;
                sync_dir(&self.dir).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        Ok(Destruction {
            action: DestroyAction::MaterialDestroyed,
            state_after: KeyState::Destroyed {
                destroyed_at: Some(destroyed_at),
            },
            effective_at: destroyed_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;

    fn ctx(t: &str, epoch: u32) -> WrapContext {
        WrapContext::tdk(&TenantId::new(t).unwrap(), epoch)
    }

    #[tokio::test]
    async fn key_files_are_private_and_hold_no_plain_data_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalKeyProvider::new(dir.path().join("keys")).unwrap();
        let k = KeyRef::local("acme").unwrap();
        p.create_key(&k).await.unwrap();
        let meta = fs::metadata(dir.path().join("keys/acme.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(dir.path().join("keys"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        let (dk, _) = p.generate_data_key(&k, &ctx("acme", 1)).await.unwrap();
        let file = fs::read(dir.path().join("keys/acme.key")).unwrap();
        assert!(!file.windows(32).any(|w| w == dk.expose()));
    }

    #[tokio::test]
    async fn loose_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalKeyProvider::new(dir.path()).unwrap();
        let k = KeyRef::local("acme").unwrap();
        p.create_key(&k).await.unwrap();
        fs::set_permissions(
            dir.path().join("acme.key"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = p.describe(&k).await.unwrap_err();
        assert!(err.to_string().contains("too open"), "{err}");
    }

    #[tokio::test]
    async fn destroy_leaves_no_material_and_a_tombstone() {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalKeyProvider::new(dir.path()).unwrap();
        let k = KeyRef::local("acme").unwrap();
        p.create_key(&k).await.unwrap();
        let (_, wrapped) = p.generate_data_key(&k, &ctx("acme", 1)).await.unwrap();
        let d = p.destroy(&k, 7).await.unwrap();
        assert_eq!(d.action, DestroyAction::MaterialDestroyed);
        assert!(!dir.path().join("acme.key").exists());
        assert!(matches!(
            p.unwrap(&k, &wrapped, &ctx("acme", 1)).await,
            Err(KeyError::Destroyed { .. })
        ));
        assert!(matches!(
            p.describe(&k).await.unwrap().state,
            KeyState::Destroyed { .. }
        ));
        // Re-running destroy is idempotent.
        p.destroy(&k, 7).await.unwrap();
        // Interrupted after the tombstone, with the key file intact or
        // partly zeroed: destroyed already for every reader, and a re-run
        // removes the file.
        for leftover in [None, Some(vec![0u8; 40])] {
            let j = KeyRef::local("jolly").unwrap();
            p.create_key(&j).await.unwrap();
            let key_file = dir.path().join("jolly.key");
            let material = fs::read(&key_file).unwrap();
            fs::remove_file(dir.path().join("jolly.destroyed")).ok();
            p.destroy(&j, 7).await.unwrap();
            fs::write(&key_file, leftover.as_deref().unwrap_or(&material)).unwrap();
            fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
            assert!(matches!(p.read(&j), Err(KeyError::Destroyed { .. })));
            p.destroy(&j, 7).await.unwrap();
            assert!(!key_file.exists());
            fs::remove_file(dir.path().join("jolly.destroyed")).unwrap();
        }
        // And the name cannot silently come back.
        assert!(matches!(
            p.create_key(&k).await,
            Err(KeyError::Destroyed { .. })
        ));
    }
}
