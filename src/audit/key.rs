//! The audit signing key: an Ed25519 key that signs the log's checkpoints.
//!
//! It is a 32-byte seed, read from (in this order):
//!
//! 1. the systemd credential `custos-audit-key` (`$CREDENTIALS_DIRECTORY/custos-audit-key`,
//!    as set up by `LoadCredential=` / `LoadCredentialEncrypted=`), when it exists;
//! 2. the key file (`[audit] key_file`, default `<state_dir>/audit.key`),
//!    which must be mode 0600 or stricter;
//! 3. or, when neither exists, a new random seed written to the key file
//!    (mode 0600, created atomically: concurrent first uses agree on one key).
//!
//! The key's name (the checkpoint origin) is derived from its public key:
//! `custos/audit/<first 8 bytes of SHA-256(public key), hex>`, so it is
//! unique per installation, stable for the key's life and needs no
//! configuration. The seed lives in zeroizing memory (`SigningKey` zeroizes
//! on drop) and `Debug` prints only the name and key ID.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::checkpoint::{Checkpoint, CheckpointError, SignedCheckpoint};
use super::note::VerifierKey;
use crate::error::{Error, Result};
use crate::secure_fs;
use crate::util::random_bytes;

/// The systemd credential name custos reads the audit key from.
pub const CREDENTIAL_NAME: &str = "custos-audit-key";

/// Where the key came from (shown by `audit public-key`, never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Credential(PathBuf),
    Generated(PathBuf),
    /// Built from bytes in memory (tests, tools).
    Memory,
}

pub struct AuditKey {
    signing: SigningKey,
    verifier: VerifierKey,
    source: KeySource,
}

/// The checkpoint origin and key name of an audit public key.
pub fn key_name(public_key: &ed25519_dalek::VerifyingKey) -> String {
    let d: [u8; 32] = Sha256::digest(public_key.as_bytes()).into();
    format!("custos/audit/{}", hex::encode(&d[..8]))
}

impl AuditKey {
    /// Builds a key from a seed (tests and tools; the daemon uses [`AuditKey::load_or_create`]).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::with_source(SigningKey::from_bytes(seed), KeySource::Memory)
    }

    fn with_source(signing: SigningKey, source: KeySource) -> Self {
        let public = signing.verifying_key();
        let verifier = VerifierKey::new(&key_name(&public), public)
            .expect("derived key names are valid note key names");
        AuditKey {
            signing,
            verifier,
            source,
        }
    }

    /// Reads the key from the systemd credential when `$CREDENTIALS_DIRECTORY`
    /// holds one, else from `path`, creating it there on first use.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::load_or_create_with(path, creds.as_deref())
    }

    /// [`AuditKey::load_or_create`] with the credentials directory explicit.
    pub fn load_or_create_with(path: &Path, credentials_dir: Option<&Path>) -> Result<Self> {
        if let Some(key) = Self::from_credential(credentials_dir)? {
            return Ok(key);
        }
        match Self::read_file(path)? {
            Some(key) => Ok(key),
            None => Self::create(path),
        }
    }

    /// Reads an existing key (credential or file) without creating one.
    /// `Error::NotFound` when there is none.
    pub fn load(path: &Path) -> Result<Self> {
        let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::load_with(path, creds.as_deref())
    }

    /// [`AuditKey::load`] with the credentials directory explicit.
    pub fn load_with(path: &Path, credentials_dir: Option<&Path>) -> Result<Self> {
        if let Some(key) = Self::from_credential(credentials_dir)? {
            return Ok(key);
        }
        Self::read_file(path)?.ok_or_else(|| Error::NotFound {
            what: format!("audit key {}", path.display()),
        })
    }

    fn from_credential(dir: Option<&Path>) -> Result<Option<Self>> {
        let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) else {
            return Ok(None);
        };
        let path = dir.join(CREDENTIAL_NAME);
        match fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                // systemd keeps credentials private to the unit; no mode check here.
                let seed = seed_from(&bytes, &path)?;
                Ok(Some(Self::with_source(
                    SigningKey::from_bytes(&seed),
                    KeySource::Credential(path),
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn read_file(path: &Path) -> Result<Option<Self>> {
        let bytes = match fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        // Whoever could replace it (or its directory) could sign checkpoints.
        secure_fs::check_file(path, "audit key file")?;
        let mode = fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::Config {
                path: path.to_owned(),
                message: format!(
                    "the audit key file has permissions {:04o}; it must be readable by its owner only (chmod 600)",
                    mode & 0o7777
                ),
            });
        }
        let seed = seed_from(&bytes, path)?;
        sweep_leftovers(path);
        Ok(Some(Self::with_source(
            SigningKey::from_bytes(&seed),
            KeySource::File(path.to_owned()),
        )))
    }

    /// Writes a new seed to `path` without ever replacing an existing file:
    /// a temporary file (0600, `O_EXCL`, fsynced) is hard-linked to `path`,
    /// which fails if another process created the key first; then the winner
    /// is read.
    fn create(path: &Path) -> Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        secure_fs::create_private_dir(dir).map_err(|e| Error::io(dir, e))?;
        secure_fs::check_dir(dir, "audit key directory", secure_fs::Kind::Dir)?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Config {
                path: path.to_owned(),
                message: "the audit key file needs a UTF-8 file name".into(),
            })?;
        let seed = Zeroizing::new(random_bytes::<32>());
        let tmp = format!(".{file_name}.tmp-{}", hex::encode(random_bytes::<6>()));
        let created = match secure_fs::write_secret(
            dir,
            file_name,
            &tmp,
            seed.as_ref(),
            secure_fs::Install::CreateNew,
            &|_| {},
        ) {
            Ok(created) => created,
            // A concurrent loader found the key in place and swept this
            // temporary file (see `sweep_leftovers`): the key exists.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.exists() => false,
            Err(e) => return Err(Error::io(path, e)),
        };
        let key = Self::read_file(path)?.ok_or_else(|| {
            Error::Internal(format!(
                "audit key {} vanished after creation",
                path.display()
            ))
        })?;
        if created {
            tracing::info!(
                event = "audit.key_created",
                path = %path.display(),
                key = %key.verifier,
                "generated the audit signing key"
            );
            Ok(AuditKey {
                source: KeySource::Generated(path.to_owned()),
                ..key
            })
        } else {
            Ok(key)
        }
    }

    /// The key name, which is also the checkpoint origin.
    pub fn name(&self) -> &str {
        self.verifier.name()
    }

    pub fn key_id(&self) -> u32 {
        self.verifier.id()
    }

    pub fn verifier(&self) -> &VerifierKey {
        &self.verifier
    }

    /// The verifier key text an auditor pins: `<name>+<key id>+<base64(0x01 ‖ public key)>`.
    pub fn public_key_text(&self) -> String {
        self.verifier.to_string()
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Signs a message that is not a checkpoint (a deletion certificate's
    /// body) with Ed25519. Callers prefix the message with a domain label of
    /// their own (the certificate's format, `custos-deletion-certificate/N`, and a newline), so such a
    /// signature can never pass for a checkpoint's: a checkpoint note's text
    /// starts with this key's origin line, `custos/audit/…`.
    pub fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.signing.sign(message).to_bytes()
    }

    /// Signs `text` (ending in a newline) as a signed note under this key's name.
    pub(crate) fn sign_note(&self, text: &str) -> Result<String, super::note::NoteError> {
        super::note::sign(text, self.name(), &self.signing)
    }

    /// Signs a checkpoint of this key's log.
    pub fn sign_checkpoint(
        &self,
        size: u64,
        root: super::merkle::Hash,
    ) -> Result<SignedCheckpoint, CheckpointError> {
        SignedCheckpoint::sign(
            Checkpoint {
                origin: self.name().to_owned(),
                size,
                root,
            },
            self.name(),
            &self.signing,
        )
    }
}

/// Removes temporary files of interrupted creations of the key at `path`
/// (`.<name>.tmp-…`, and `.audit-key.tmp-…` of earlier versions): each holds
/// a seed, either one that never became the key or a second link to the key.
/// Called once the key file exists, when no creation can succeed any more: a
/// creator still running fails to link (the key exists) or finds its
/// temporary file gone, and reads the key in place either way. A second link
/// to the key is unlinked, never overwritten.
fn sweep_leftovers(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let keep = secure_fs::inode_of(path);
    let prefixes = [format!(".{name}.tmp-"), ".audit-key.tmp-".to_owned()];
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let is_leftover = prefixes.iter().any(|p| {
            file_name
                .strip_prefix(p.as_str())
                .is_some_and(|r| r.len() == 12 && r.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        if !is_leftover {
            continue;
        }
        match secure_fs::destroy_file(&entry.path(), keep) {
            Ok(()) => tracing::warn!(
                event = "audit.key_leftover_removed",
                path = %entry.path().display(),
                "removed a leftover of an interrupted audit key creation"
            ),
            Err(e) => tracing::warn!(
                event = "audit.key_leftover_failed",
                path = %entry.path().display(),
                error = %e,
                "could not remove a leftover of an interrupted audit key creation"
            ),
        }
    }
}

fn seed_from(bytes: &[u8], path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let seed: [u8; 32] = bytes.try_into().map_err(|_| Error::Config {
        path: path.to_owned(),
        message: format!(
            "an audit key is a 32-byte Ed25519 seed; this file holds {} bytes",
            bytes.len()
        ),
    })?;
    Ok(Zeroizing::new(seed))
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AuditKey(name={}, key_id={:08x})",
            self.name(),
            self.key_id()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_once_with_mode_0600_and_reloads_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/audit.key");
        let a = AuditKey::load_or_create_with(&path, None).unwrap();
        assert!(matches!(a.source(), KeySource::Generated(_)));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap().len(), 32);
        let b = AuditKey::load_or_create_with(&path, None).unwrap();
        assert!(matches!(b.source(), KeySource::File(_)));
        assert_eq!(a.public_key_text(), b.public_key_text());
        assert!(a.name().starts_with("custos/audit/"));
        assert_eq!(a.name().len(), "custos/audit/".len() + 16);
        let leftovers = fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary files are left behind");
    }

    #[test]
    fn refuses_a_readable_key_file_and_wrong_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        AuditKey::load_or_create_with(&path, None).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = AuditKey::load_or_create_with(&path, None).unwrap_err();
        assert!(err.to_string().contains("0644"), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(AuditKey::load_with(&path, None).is_err());

        fs::write(&path, b"short").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = AuditKey::load_with(&path, None).unwrap_err();
        assert!(err.to_string().contains("32-byte"), "{err}");
    }

    #[test]
    fn prefers_the_systemd_credential() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        fs::create_dir(&creds).unwrap();
        fs::write(creds.join(CREDENTIAL_NAME), [5u8; 32]).unwrap();
        let path = dir.path().join("audit.key");
        let k = AuditKey::load_or_create_with(&path, Some(&creds)).unwrap();
        assert!(matches!(k.source(), KeySource::Credential(_)));
        assert_eq!(
            k.public_key_text(),
            AuditKey::from_seed(&[5; 32]).public_key_text()
        );
        assert!(
            !path.exists(),
            "no key file is created when a credential is used"
        );
        // An empty credentials directory falls back to the file.
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(AuditKey::load_with(&path, Some(&empty)).is_err());
    }

    #[test]
    fn debug_shows_only_the_name_and_id() {
        let k = AuditKey::from_seed(&[0xAB; 32]);
        let shown = format!("{k:?}");
        assert!(shown.starts_with("AuditKey(name=custos/audit/"), "{shown}");
        assert!(!shown.contains("abab"), "{shown}");
        assert!(!shown.contains(&hex::encode([0xAB; 32])));
    }

    #[test]
    fn concurrent_first_use_agrees_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let keys: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|_| s.spawn(|| AuditKey::load_or_create_with(&path, None).unwrap()))
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap().public_key_text())
                .collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]), "{keys:?}");
    }

    #[test]
    fn leftovers_of_an_interrupted_creation_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = state.join("audit.key");
        let a = AuditKey::load_or_create_with(&path, None).unwrap();
        // Killed before the link: a seed that never became the key (a hard
        // link outside shows it is overwritten). Killed between link and
        // unlink: a second name of the key, which must stay intact.
        let unused = state.join(".audit.key.tmp-0123456789ab");
        fs::write(&unused, [7u8; 32]).unwrap();
        let witness = dir.path().join("witness");
        fs::hard_link(&unused, &witness).unwrap();
        let legacy = state.join(".audit-key.tmp-00000000000a");
        fs::hard_link(&path, &legacy).unwrap();
        let other = state.join(".audit.key.tmp-short");
        fs::write(&other, b"not ours").unwrap();
        let b = AuditKey::load_with(&path, None).unwrap();
        assert_eq!(a.public_key_text(), b.public_key_text());
        assert!(!unused.exists() && !legacy.exists());
        assert_eq!(fs::read(&witness).unwrap(), vec![0u8; 32]);
        assert!(other.exists(), "only names of the exact pattern are swept");
        assert_eq!(
            AuditKey::load_with(&path, None).unwrap().public_key_text(),
            a.public_key_text()
        );
    }

    #[test]
    fn refuses_a_key_directory_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let path = state.join("audit.key");
        AuditKey::load_or_create_with(&path, None).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        for r in [
            AuditKey::load_with(&path, None),
            AuditKey::load_or_create_with(&path, None),
        ] {
            let err = r.unwrap_err();
            assert_eq!(err.kind(), "insecure_permissions", "{err}");
            assert!(err.to_string().contains("chmod go-w"), "{err}");
        }
        fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
        fs::remove_file(&path).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o770)).unwrap();
        let err = AuditKey::load_or_create_with(&path, None).unwrap_err();
        assert_eq!(err.kind(), "insecure_permissions", "{err}");
        assert!(
            !path.exists(),
            "no key is created in a directory others can write"
        );
    }
}
