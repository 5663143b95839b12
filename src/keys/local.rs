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

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{
    Custody, DataKey, DestroyAction, Destruction, KeyError, KeyInfo, KeyOrigin, KeyProvider,
    KeyRef, KeyState, Leftover, ProviderKind, SecretKey, WrapContext, WrappedKey,
};
use crate::secure_fs::{self, CheckError, DirLock, Install};
use crate::util::{base64_bytes, random_bytes, sync_dir, write_file_atomic};

const KEY_FILE_FORMAT: &str = "custos-local-key/1";
const WRAP_LABEL: &[u8] = b"custos/v1/local-wrap";
const WRAPPED_LEN: usize = 4 + 12 + 32 + 16;
/// Every write of the key directory (create, rotate, enable, disable,
/// destroy, sweep) holds an exclusive `flock` on this file, across processes.
const LOCK_FILE: &str = ".custos-keys.lock";
/// Writers hold the lock for milliseconds; past this a holder is stuck.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// A key file is a few hundred bytes per version; refuse to read a huge one.
const MAX_KEY_FILE: u64 = 1 << 20;
/// Temporary files of a key `<name>`: `.<name><suffix>-<12 hex digits>`.
/// `.key.tmp`: a key file being written (this version and earlier ones);
/// `.new`: a key file being created (earlier versions); `.destroyed.tmp`: a
/// tombstone being written (no material, swept all the same).
const TEMP_SUFFIXES: [&str; 3] = [".key.tmp", ".destroyed.tmp", ".new"];

/// Local key names: `[a-z0-9][a-z0-9._-]{0,127}`, safe as a file name.
pub fn valid_key_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
}

/// The key a temporary file of the key directory belongs to, if `file_name`
/// is one. The suffixes are fixed strings none of which ends another, so a
/// name parses one way only (`.a.new.key.tmp-…` is key `a.new`'s).
fn temp_owner(file_name: &str) -> Option<&str> {
    let (stem, random) = file_name.strip_prefix('.')?.rsplit_once('-')?;
    if random.len() != 12 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    TEMP_SUFFIXES
        .iter()
        .find_map(|s| stem.strip_suffix(s))
        .filter(|n| valid_key_name(n))
}

fn temp_name(name: &str) -> String {
    format!(".{name}.key.tmp-{}", hex::encode(random_bytes::<6>()))
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
///
/// **Leftovers of interrupted writes.** A key file is written to a
/// temporary file (`.<name>.key.tmp-…`, 0600, `O_EXCL`) that is renamed over
/// the key file; a crash in between leaves the temporary file, holding every
/// version of the key. Such files are swept (overwritten, then unlinked)
/// when the provider opens and by `destroy`, so a shredded key leaves no
/// material behind. Why sweeping cannot hurt a writer: every writer, in any
/// process, holds the directory's `flock` ([`LOCK_FILE`]) from before it
/// creates its temporary file until after the rename, and the kernel drops
/// the lock of a process that dies. So whoever holds the lock sees only
/// temporary files whose writer is dead. A dead writer's file was never
/// renamed into place, and nothing depends on it: a rotation wraps envelopes
/// under a new version only after its key file rename has landed (and been
/// fsynced). A temporary file that is a second link to the live key file
/// (a creation killed between its link and its unlink) is only unlinked,
/// never overwritten. The open-time sweep only tries the lock and skips when
/// a writer holds it (that writer's own temporary file is in use); `destroy`
/// waits for the lock, so a shred always sweeps.
#[derive(Debug)]
pub struct LocalKeyProvider {
    dir: PathBuf,
    /// What the open-time sweep removed (key name, path): reported by
    /// `leftover_material`, so a verification still sees what was there.
    swept: Vec<(String, PathBuf)>,
}

fn check_error(e: CheckError) -> KeyError {
    match e {
        CheckError::Insecure(i) => KeyError::InsecurePermissions {
            path: i.path,
            message: i.message,
        },
        CheckError::Io(path, e) => KeyError::LocalFile {
            path,
            message: e.to_string(),
        },
    }
}

impl LocalKeyProvider {
    /// Opens (and creates, mode 0700) the key directory, refuses it if
    /// another local user could write it or a directory above it (see
    /// `secure_fs`), and sweeps leftovers of interrupted writes.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, KeyError> {
        let dir = dir.into();
        secure_fs::create_private_dir(&dir).map_err(|e| KeyError::LocalFile {
            path: dir.clone(),
            message: format!("cannot create key directory: {e}"),
        })?;
        secure_fs::check_dir(&dir, "key directory", secure_fs::Kind::PrivateDir)
            .map_err(check_error)?;
        let mut provider = LocalKeyProvider {
            dir,
            swept: Vec::new(),
        };
        let lock = match DirLock::try_acquire(&provider.dir, LOCK_FILE) {
            Ok(lock) => Some(lock),
            // A key directory this process may only read (a read-only mount):
            // it can use the keys, and could remove nothing anyway.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EROFS | libc::EACCES | libc::EPERM)
                ) =>
            {
                tracing::debug!(
                    event = "keys.sweep_skipped",
                    dir = %provider.dir.display(),
                    error = %e,
                    "the key directory is not writable here; no sweep"
                );
                None
            }
            Err(e) => {
                return Err(KeyError::LocalFile {
                    path: provider.dir.join(LOCK_FILE),
                    message: e.to_string(),
                });
            }
        };
        match lock {
            None => {}
            Some(None) => tracing::debug!(
                event = "keys.sweep_skipped",
                dir = %provider.dir.display(),
                "another process is writing a key; its leftovers are swept by the next open or destroy"
            ),
            Some(Some(_lock)) => match provider.sweep(None) {
                Ok(swept) => provider.swept = swept,
                // The files stay private (0600 in a checked directory); destroy
                // and `certificate verify --online` still find them.
                Err(e) => tracing::warn!(
                    event = "keys.sweep_failed",
                    dir = %provider.dir.display(),
                    error = %e,
                    "could not remove leftovers of interrupted key writes"
                ),
            },
        }
        Ok(provider)
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

    fn lock(&self) -> Result<DirLock, KeyError> {
        DirLock::acquire(&self.dir, LOCK_FILE, LOCK_WAIT).map_err(|e| KeyError::LocalFile {
            path: self.dir.join(LOCK_FILE),
            message: e.to_string(),
        })
    }

    /// The tombstone of a destroyed (or being destroyed) key.
    fn tombstone(&self, name: &str) -> Option<Tombstone> {
        let t = fs::read(self.tombstone_path(name)).ok()?;
        serde_json::from_slice::<Tombstone>(&t).ok()
    }

    /// Files that hold or may hold material of key `only` (of any key when
    /// `None`) without being a live key file: temporary files, and the key
    /// file of a key that has a tombstone. As (key name, path).
    fn leftovers(&self, only: Option<&str>) -> Result<Vec<(String, PathBuf)>, KeyError> {
        let io = |e: std::io::Error| KeyError::LocalFile {
            path: self.dir.clone(),
            message: format!("cannot list the key directory: {e}"),
        };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let owner = match temp_owner(file_name) {
                Some(n) => Some(n),
                None => file_name
                    .strip_suffix(".key")
                    .filter(|n| valid_key_name(n) && self.tombstone(n).is_some()),
            };
            if let Some(n) = owner
                && only.is_none_or(|o| o == n)
            {
                out.push((n.to_owned(), entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes [`leftovers`](Self::leftovers) as destruction does. The
    /// caller holds the directory lock, so no writer is alive (see the type's
    /// documentation).
    fn sweep(&self, only: Option<&str>) -> Result<Vec<(String, PathBuf)>, KeyError> {
        let found = self.leftovers(only)?;
        for (name, path) in &found {
            // A second link to the live key file is unlinked, not overwritten.
            let keep = match self.tombstone(name) {
                Some(_) => None,
                None => secure_fs::inode_of(&self.key_path(name)),
            };
            secure_fs::destroy_file(path, keep).map_err(|e| KeyError::LocalFile {
                path: path.clone(),
                message: format!("cannot remove leftover key material: {e}"),
            })?;
            tracing::warn!(
                event = "keys.leftover_removed",
                key = %format!("local:{name}"),
                path = %path.display(),
                "removed leftover key material of an interrupted write or destruction"
            );
        }
        if !found.is_empty() {
            sync_dir(&self.dir).map_err(|e| KeyError::LocalFile {
                path: self.dir.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(found)
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
        let refused = |message: String| KeyError::LocalFile {
            path: path.clone(),
            message,
        };
        // One open, no symlink followed; mode, owner and bytes all come from
        // that one file (no window for a swap between a check and the read).
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeyError::NotFound {
                    key: key.to_string(),
                    message: format!("no key file {}", path.display()),
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(refused(
                    "is a symlink; a key file must be a regular file".into(),
                ));
            }
            Err(e) => return Err(refused(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| refused(e.to_string()))?;
        if !meta.is_file() || meta.len() > MAX_KEY_FILE {
            return Err(refused("not a custos key file".into()));
        }
        let mode = meta.mode();
        if mode & 0o077 != 0 {
            return Err(refused(format!(
                "permissions {:04o} are too open; key files must be 0600 (chmod 600)",
                mode & 0o7777
            )));
        }
        let me = secure_fs::euid();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(refused(format!(
                "owned by uid {}, neither root nor uid {me} that runs custos; run chown {me} {}",
                meta.uid(),
                path.display()
            )));
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        file.take(MAX_KEY_FILE)
            .read_to_end(&mut bytes)
            .map_err(|e| refused(e.to_string()))?;
        let file: KeyFile = serde_json::from_slice(&bytes)
            .map_err(|e| refused(format!("not a custos key file: {e}")))?;
        if file.format != KEY_FILE_FORMAT || file.name != name {
            return Err(refused(format!(
                "key file is for {:?} in format {:?}",
                file.name, file.format
            )));
        }
        if file.versions.iter().any(|v| v.material.len() != 32)
            || file.version(file.current_version).is_none()
        {
            return Err(refused("key file has malformed key material".into()));
        }
        Ok(file)
    }

    /// Writes a key file in place (or, `Install::CreateNew`, only where none
    /// exists). Callers hold the directory lock. Crash points for the tests
    /// (`test-hooks` builds): `CUSTOS_CRASH_AT=local-key:written` (temporary file durable, not yet
    /// in place) and `local-key:installed` (renamed, directory not fsynced).
    fn write(&self, file: &KeyFile, install: Install) -> Result<bool, KeyError> {
        let path = self.key_path(&file.name);
        // Replacing renames a new inode over the key file. Any other name of
        // the old inode (a hard link made elsewhere, by a copy tool or an
        // admin) would keep its material for good, beyond the reach of a
        // destroy, which overwrites the inode it finds: refuse first.
        if install == Install::Replace
            && let Ok(m) = fs::symlink_metadata(&path)
            && m.nlink() > 1
        {
            return Err(KeyError::LocalFile {
                path,
                message: format!(
                    "the key file has {} names (hard links): the others would keep its current material once it is replaced, where no destroy reaches; find them (find / -xdev -samefile <key file>) and remove them",
                    m.nlink()
                ),
            });
        }
        let json = Zeroizing::new(serde_json::to_vec_pretty(file).expect("key file serialises"));
        secure_fs::write_secret(
            &self.dir,
            &format!("{}.key", file.name),
            &temp_name(&file.name),
            &json,
            install,
            &|point| crate::hooks::crash_point("local-key", point),
        )
        .map_err(|e| KeyError::LocalFile {
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

    /// Read-modify-write under the directory lock, so two processes changing
    /// one key cannot lose each other's update (a lost key version would
    /// leave the envelopes wrapped under it unreadable).
    fn modify(&self, key: &KeyRef, f: impl FnOnce(&mut KeyFile)) -> Result<KeyInfo, KeyError> {
        let _lock = self.lock()?;
        let mut file = self.read(key)?;
        f(&mut file);
        file.updated_at = Utc::now();
        self.write(&file, Install::Replace)?;
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
        let _lock = self.lock()?;
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
        // CreateNew (a hard link): even a writer that does not take the lock
        // (an older custos) cannot have its key overwritten by this one.
        if self.write(&file, Install::CreateNew)? {
            Ok(self.info(key, &file))
        } else {
            let existing = self.read(key)?;
            Ok(self.info(key, &existing))
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
    /// unlinks it, sweeps the key's leftover temporary files the same way
    /// and fsyncs the directory; then confirms that no file of the key is
    /// left. Immediate and irreversible (the window applies to AWS KMS only).
    /// Resumable: the tombstone comes first, so a crash at any point leaves a
    /// key that reads as destroyed (never as missing, never usable), and a
    /// re-run (or the next open's sweep) finishes the overwrite and unlink.
    /// On copy-on-write or wear-levelled media old blocks may survive
    /// physically: use a KMS or HSM where that matters.
    async fn destroy(
        &self,
        key: &KeyRef,
        _pending_window_days: u32,
    ) -> Result<Destruction, KeyError> {
        let name = Self::name_of(key)?.to_owned();
        // Waits for any writer of the directory: after this no temporary
        // file of the key can be in use, and none can appear.
        let _lock = self.lock()?;
        let path = self.key_path(&name);
        let io = |e: std::io::Error| KeyError::LocalFile {
            path: path.clone(),
            message: e.to_string(),
        };
        let destroyed_at = match self.tombstone(&name) {
            Some(t) => t.destroyed_at,
            None => {
                let file = match self.read(key) {
                    Ok(file) => file,
                    Err(e @ KeyError::NotFound { .. }) => {
                        // Never created, or created by a run killed before its
                        // key file landed: that run's temporary file still
                        // holds material.
                        self.sweep(Some(&name))?;
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                };
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
        secure_fs::destroy_file(&path, None).map_err(io)?;
        self.sweep(Some(&name))?;
        sync_dir(&self.dir).map_err(io)?;
        let left = self.leftovers(Some(&name))?;
        if !left.is_empty() || fs::symlink_metadata(&path).is_ok() {
            return Err(KeyError::LocalFile {
                path,
                message: format!(
                    "key material is still on disk after its destruction: {}",
                    left.iter()
                        .map(|(_, p)| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(Destruction {
            objects: Vec::new(),
            action: DestroyAction::MaterialDestroyed,
            state_after: KeyState::Destroyed {
                destroyed_at: Some(destroyed_at),
            },
            effective_at: destroyed_at,
        })
    }

    /// Leftover temporary files of the key, and its key file if the key has
    /// a tombstone; with those the open-time sweep removed.
    fn custody(&self, _key: &KeyRef) -> Custody {
        Custody {
            provider: ProviderKind::Local,
            holder: format!("local key directory {} on this host", self.dir.display()),
            details: BTreeMap::from([("key_dir".to_owned(), self.dir.display().to_string())]),
            network: false,
        }
    }

    async fn leftover_material(&self, key: &KeyRef) -> Result<Vec<Leftover>, KeyError> {
        let name = Self::name_of(key)?;
        let mut out: Vec<Leftover> = self
            .swept
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, path)| Leftover {
                path: path.clone(),
                removed: true,
            })
            .collect();
        out.extend(
            self.leftovers(Some(name))?
                .into_iter()
                .map(|(_, path)| Leftover {
                    path,
                    removed: false,
                }),
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;
    use std::os::unix::fs::PermissionsExt;

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

    #[test]
    fn temporary_file_names_parse_to_their_key() {
        assert_eq!(temp_owner(".alpha.key.tmp-0123456789ab"), Some("alpha"));
        assert_eq!(temp_owner(".alpha.new-0123456789ab"), Some("alpha"));
        assert_eq!(
            temp_owner(".alpha.destroyed.tmp-0123456789ab"),
            Some("alpha")
        );
        assert_eq!(temp_owner(".my-key.key.tmp-0123456789ab"), Some("my-key"));
        assert_eq!(temp_owner(".a.new.key.tmp-0123456789ab"), Some("a.new"));
        for not in [
            "alpha.key",
            "alpha.destroyed",
            ".custos-keys.lock",
            ".alpha.key.tmp-0123",
            ".alpha.key.tmp-0123456789xz",
            ".Alpha.key.tmp-0123456789ab",
            ".alpha.other-0123456789ab",
            "..key.tmp-0123456789ab",
        ] {
            assert_eq!(temp_owner(not), None, "{not}");
        }
        let made = temp_name("alpha");
        assert_eq!(temp_owner(&made), Some("alpha"), "{made}");
    }

    /// A copy of `name`'s key file under a temporary name, as a write killed
    /// before its rename leaves it; a hard link outside the directory shows
    /// what becomes of its bytes.
    fn plant_leftover(dir: &Path, outside: &Path, name: &str, tag: &str) -> (PathBuf, PathBuf) {
        let leftover = dir.join(format!(".{name}.key.tmp-{tag}"));
        fs::copy(dir.join(format!("{name}.key")), &leftover).unwrap();
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o600)).unwrap();
        let witness = outside.join(format!("witness-{name}-{tag}"));
        fs::hard_link(&leftover, &witness).unwrap();
        (leftover, witness)
    }

    fn zeroed(p: &Path) -> bool {
        let b = fs::read(p).unwrap();
        !b.is_empty() && b.iter().all(|&x| x == 0)
    }

    #[tokio::test]
    async fn opening_sweeps_leftovers_of_interrupted_writes() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        let p = LocalKeyProvider::new(&dir).unwrap();
        let alpha = KeyRef::local("alpha").unwrap();
        p.create_key(&alpha).await.unwrap();
        let (leftover, witness) = plant_leftover(&dir, t.path(), "alpha", "0123456789ab");
        // A creation killed between its link and its unlink: a second name of
        // the live key file, which must survive the sweep.
        let second = dir.join(".alpha.new-00000000000a");
        fs::hard_link(dir.join("alpha.key"), &second).unwrap();
        let live = fs::read(dir.join("alpha.key")).unwrap();

        let p = LocalKeyProvider::new(&dir).unwrap();
        assert!(!leftover.exists() && !second.exists());
        assert!(
            zeroed(&witness),
            "the leftover was overwritten before its unlink"
        );
        assert_eq!(fs::read(dir.join("alpha.key")).unwrap(), live);
        p.describe(&alpha).await.unwrap();
        let found = p.leftover_material(&alpha).await.unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|l| l.removed), "{found:?}");
        assert!(
            LocalKeyProvider::new(&dir)
                .unwrap()
                .leftover_material(&alpha)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_writer_holding_the_lock_keeps_its_temporary_file() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        let p = LocalKeyProvider::new(&dir).unwrap();
        let alpha = KeyRef::local("alpha").unwrap();
        p.create_key(&alpha).await.unwrap();
        let (leftover, witness) = plant_leftover(&dir, t.path(), "alpha", "0123456789ab");
        // A live writer (another process: flock conflicts across open files).
        let writer = DirLock::try_acquire(&dir, LOCK_FILE).unwrap().unwrap();
        let p = LocalKeyProvider::new(&dir).unwrap();
        assert!(leftover.exists() && !zeroed(&witness));
        let found = p.leftover_material(&alpha).await.unwrap();
        assert_eq!(
            found,
            vec![Leftover {
                path: leftover.clone(),
                removed: false
            }]
        );
        // Destroy waits for the writer, then sweeps.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(writer);
        });
        p.destroy(&alpha, 7).await.unwrap();
        release.join().unwrap();
        assert!(!leftover.exists() && zeroed(&witness));
        assert!(p.leftover_material(&alpha).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn destroy_sweeps_the_keys_leftovers_and_no_other_keys() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        let p = LocalKeyProvider::new(&dir).unwrap();
        let (alpha, beta) = (
            KeyRef::local("alpha").unwrap(),
            KeyRef::local("beta").unwrap(),
        );
        p.create_key(&alpha).await.unwrap();
        p.create_key(&beta).await.unwrap();
        let (_, wrapped) = p.generate_data_key(&alpha, &ctx("alpha", 1)).await.unwrap();
        // Left after this provider opened (so only destroy can sweep them).
        let (a_left, a_witness) = plant_leftover(&dir, t.path(), "alpha", "0123456789ab");
        let (b_left, b_witness) = plant_leftover(&dir, t.path(), "beta", "0123456789ab");
        p.destroy(&alpha, 7).await.unwrap();
        assert!(!a_left.exists() && zeroed(&a_witness));
        assert!(b_left.exists() && !zeroed(&b_witness));
        assert!(matches!(
            p.unwrap(&alpha, &wrapped, &ctx("alpha", 1)).await,
            Err(KeyError::Destroyed { .. })
        ));
        // A key whose file never landed: its leftover goes, and it is not found.
        let gamma = KeyRef::local("gamma").unwrap();
        let g_left = dir.join(".gamma.key.tmp-0123456789ab");
        fs::copy(dir.join("beta.key"), &g_left).unwrap();
        assert!(matches!(
            p.destroy(&gamma, 7).await,
            Err(KeyError::NotFound { .. })
        ));
        assert!(!g_left.exists());
        // A key file left beside a tombstone is a leftover too.
        fs::copy(dir.join("beta.key"), dir.join("alpha.key")).unwrap();
        let found = p.leftover_material(&alpha).await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].path, dir.join("alpha.key"));
        LocalKeyProvider::new(&dir).unwrap();
        assert!(!dir.join("alpha.key").exists());
        assert!(dir.join("beta.key").exists());
    }

    #[test]
    fn concurrent_writers_lose_no_key_version() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        let k = KeyRef::local("alpha").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(LocalKeyProvider::new(&dir).unwrap().create_key(&k))
            .unwrap();
        // Separate providers stand for separate processes: only the
        // directory's flock orders their read-modify-writes.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let p = LocalKeyProvider::new(&dir).unwrap();
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    for _ in 0..5 {
                        rt.block_on(p.rotate(&k)).unwrap();
                    }
                });
            }
        });
        let p = LocalKeyProvider::new(&dir).unwrap();
        let file = p.read(&k).unwrap();
        assert_eq!(file.versions.len(), 21);
        assert_eq!(file.current_version, 21);
        assert!(rt.block_on(p.leftover_material(&k)).unwrap().is_empty());
    }

    #[test]
    fn a_loose_key_directory_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        LocalKeyProvider::new(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = LocalKeyProvider::new(&dir).unwrap_err();
        assert_eq!(err.kind(), "insecure_permissions");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("chmod 700 {}", dir.display())),
            "{msg}"
        );
        // Parents it creates are private too.
        let deep = t.path().join("a/b/keys");
        LocalKeyProvider::new(&deep).unwrap();
        for d in [t.path().join("a"), t.path().join("a/b"), deep] {
            assert_eq!(
                fs::metadata(&d).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
    }

    #[tokio::test]
    async fn a_symlinked_or_foreign_key_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        let p = LocalKeyProvider::new(&dir).unwrap();
        let k = KeyRef::local("alpha").unwrap();
        p.create_key(&k).await.unwrap();
        fs::rename(dir.join("alpha.key"), t.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(t.path().join("elsewhere"), dir.join("alpha.key")).unwrap();
        let err = p.describe(&k).await.unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        fs::remove_file(dir.join("alpha.key")).unwrap();
        fs::rename(t.path().join("elsewhere"), dir.join("alpha.key")).unwrap();
        p.describe(&k).await.unwrap();
        if secure_fs::euid() == 0 {
            std::os::unix::fs::chown(dir.join("alpha.key"), Some(65534), None).unwrap();
            let err = p.describe(&k).await.unwrap_err();
            assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        }
    }
}
