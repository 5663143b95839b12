//! A record of the objects custos made on a key holder (a KMIP server, a
//! PKCS#11 token), kept where no holder of that device's credentials can
//! write: a JSON file in the state directory (`<state_dir>/kmip-objects.json`,
//! `<state_dir>/pkcs11-objects.json`), one entry per key. Read through
//! `secure_fs` (owned by custos's user, not writable by others, no symlink),
//! bounded in size, changed under an exclusive lock (other custos processes
//! of this installation change it too) and written atomically. A provider
//! built without a state directory (tests) keeps it in memory.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::KeyError;
use crate::secure_fs::{self, Readers};

/// The record is small (a few objects per key); a larger file is refused.
const MAX_FILE: u64 = 16 << 20;

/// What a record keeps of a key check value, AES_K(0¹²⁸): a fingerprint
/// (BLAKE3 in key-derivation mode, 32 bytes, hex), never the value. The
/// value itself is also the key's AES-GCM hash subkey H, and whoever knows
/// H and one wrap under the key can forge wraps under it (same IV, another
/// data key or context); the fingerprint still names the material.
pub(crate) fn fingerprint(check_value: &[u8]) -> String {
    hex::encode(blake3::derive_key(
        "custos 2026-12 key check value fingerprint",
        check_value,
    ))
}

/// Check values as read from a record: one an earlier build wrote as the
/// value itself (16 bytes, 32 hex digits) becomes its fingerprint; the file
/// is then rewritten at once (see [`ObjectRecord::load`]).
pub(crate) mod check_from_disk {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer};

    fn upgraded(check: String) -> String {
        match hex::decode(&check) {
            Ok(raw) if raw.len() == 16 => super::fingerprint(&raw),
            _ => check,
        }
    }

    pub fn one<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        String::deserialize(d).map(upgraded)
    }

    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(upgraded))
    }

    pub fn map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        Ok(BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| (k, upgraded(v)))
            .collect())
    }
}

/// What a record file is: whose, named how in messages, which format.
pub(crate) struct Spec<E: 'static> {
    pub provider: &'static str,
    /// In messages: "KMIP object record".
    pub what: &'static str,
    pub format: &'static str,
    /// Older formats read (and rewritten as `format` at the first read),
    /// each with what turns its entries into current ones.
    pub legacy: &'static [(&'static str, Upgrade<E>)],
}

/// Every entry by key, and what is known of each key holder by name.
pub(crate) type Everything<E, S> = (BTreeMap<String, E>, BTreeMap<String, S>);

/// Turns the entries of an older format into current ones.
pub(crate) type Upgrade<E> = fn(&mut BTreeMap<String, E>);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(bound(
    serialize = "E: Serialize, S: Serialize",
    deserialize = "E: DeserializeOwned, S: DeserializeOwned"
))]
struct File<E, S> {
    format: String,
    /// What the record knows of the key holders themselves (KMIP: the
    /// marker key of each server), by name.
    #[serde(default = "BTreeMap::new", skip_serializing_if = "BTreeMap::is_empty")]
    servers: BTreeMap<String, S>,
    keys: BTreeMap<String, E>,
}

impl<E, S> File<E, S> {
    fn empty(format: &str) -> Self {
        File {
            format: format.to_owned(),
            servers: BTreeMap::new(),
            keys: BTreeMap::new(),
        }
    }
}

/// The record of one provider: entries `E` per key, and `S` per key holder.
pub(crate) struct ObjectRecord<E: 'static, S: 'static = ()> {
    spec: &'static Spec<E>,
    path: Option<PathBuf>,
    /// The record itself without a path; with one, the lock that orders
    /// this process's changes.
    memory: Mutex<File<E, S>>,
}

impl<E, S> ObjectRecord<E, S>
where
    E: Clone + Default + Serialize + DeserializeOwned,
    S: Clone + Serialize + DeserializeOwned,
{
    pub fn in_memory(spec: &'static Spec<E>) -> Self {
        ObjectRecord {
            spec,
            path: None,
            memory: Mutex::new(File::empty(spec.format)),
        }
    }

    pub fn at(spec: &'static Spec<E>, path: PathBuf) -> Self {
        ObjectRecord {
            spec,
            path: Some(path),
            memory: Mutex::new(File::empty(spec.format)),
        }
    }

    fn fail(&self, key: &str, message: String) -> KeyError {
        KeyError::Backend {
            provider: self.spec.provider,
            key: key.to_owned(),
            message,
        }
    }

    fn poisoned(&self, key: &str) -> KeyError {
        self.fail(key, format!("the {}'s lock is poisoned", self.spec.what))
    }

    /// The file, and whether it reads otherwise than it would be written
    /// (an older format, check values written before fingerprints).
    fn read(&self, key: &str) -> Result<(File<E, S>, bool), KeyError> {
        let (Some(path), what) = (&self.path, self.spec.what) else {
            return Ok((File::empty(self.spec.format), false));
        };
        let bytes = match secure_fs::read_trusted(path, what, Readers::Anyone, MAX_FILE) {
            Ok(bytes) => bytes,
            Err(secure_fs::CheckError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((File::empty(self.spec.format), false));
            }
            Err(e) => return Err(self.fail(key, e.to_string())),
        };
        let mut f: File<E, S> = serde_json::from_slice(&bytes)
            .map_err(|e| self.fail(key, format!("unreadable {what} {}: {e}", path.display())))?;
        if let Some((_, upgrade)) = self.spec.legacy.iter().find(|(old, _)| f.format == *old) {
            upgrade(&mut f.keys);
        } else if f.format != self.spec.format {
            return Err(self.fail(
                key,
                format!(
                    "{what} {} has format {:?}, not {:?}",
                    path.display(),
                    f.format,
                    self.spec.format
                ),
            ));
        }
        f.format = self.spec.format.to_owned();
        let stale = serde_json::to_vec_pretty(&f).map_or(true, |now| now != *bytes);
        Ok((f, stale))
    }

    /// The record. One that reads otherwise than it would be written is
    /// rewritten first, so that no check value stays on disk once read; where
    /// the file cannot be written (a read-only copy of the state directory)
    /// it is used as read, with a warning.
    fn load(&self, key: &str) -> Result<File<E, S>, KeyError> {
        if self.path.is_none() {
            return Ok(self.memory.lock().map_err(|_| self.poisoned(key))?.clone());
        }
        let (f, stale) = self.read(key)?;
        if stale && let Err(e) = self.change(key, |_| {}) {
            tracing::warn!(event = "key_record.rewrite_failed", record = self.spec.what, error = %e, "could not rewrite the {} in the current format: {e}", self.spec.what);
        }
        Ok(f)
    }

    /// Rewrites the record in the current format if it is in another (see
    /// [`Self::load`]): at startup, whatever providers are configured, so
    /// that no check value an earlier build wrote stays on disk.
    pub fn migrate(&self) -> Result<(), KeyError> {
        self.load(self.spec.what).map(drop)
    }

    /// What is recorded of `entry`; `None` if this installation never saw it.
    pub fn get(&self, entry: &str, key: &str) -> Result<Option<E>, KeyError> {
        Ok(self.load(key)?.keys.remove(entry))
    }

    /// Every entry and what the record knows of each key holder, from one read.
    pub fn all(&self, key: &str) -> Result<Everything<E, S>, KeyError> {
        let f = self.load(key)?;
        Ok((f.keys, f.servers))
    }

    /// What the record knows of each key holder, by name.
    pub fn servers(&self, key: &str) -> Result<BTreeMap<String, S>, KeyError> {
        Ok(self.load(key)?.servers)
    }

    /// Records (or replaces) what is known of the key holder `name`.
    pub fn set_server(&self, name: &str, server: S, key: &str) -> Result<(), KeyError> {
        self.change(key, |f| {
            f.servers.insert(name.to_owned(), server);
        })
    }

    /// Changes the record of `entry` under an exclusive lock, written
    /// atomically; returns the entry as written.
    pub fn update(
        &self,
        entry: &str,
        key: &str,
        change: impl FnOnce(&mut E),
    ) -> Result<E, KeyError> {
        let mut out = E::default();
        self.change(key, |f| {
            let objects = f.keys.entry(entry.to_owned()).or_default();
            change(objects);
            out = objects.clone();
        })?;
        Ok(out)
    }

    /// Changes every entry and key holder under one exclusive lock, written
    /// atomically.
    pub fn update_all(
        &self,
        key: &str,
        change: impl FnOnce(&mut BTreeMap<String, E>, &mut BTreeMap<String, S>),
    ) -> Result<(), KeyError> {
        self.change(key, |f| change(&mut f.keys, &mut f.servers))
    }

    /// Removes temporary files a writer killed mid-write left beside the
    /// record (they may hold what an earlier build recorded). Called under
    /// the lock, which every writer holds while its temporary file exists.
    fn remove_orphans(&self, path: &std::path::Path) {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix)
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                tracing::warn!(event = "key_record.orphan_left", path = %entry.path().display(), error = %e, "could not remove a temporary file of the {}", self.spec.what);
            }
        }
    }

    /// Changes the record under an exclusive lock (other custos processes
    /// of this installation change it too), written atomically.
    fn change(&self, key: &str, change: impl FnOnce(&mut File<E, S>)) -> Result<(), KeyError> {
        let mut mem = self.memory.lock().map_err(|_| self.poisoned(key))?;
        let (Some(path), what) = (&self.path, self.spec.what) else {
            change(&mut mem);
            return Ok(());
        };
        let lock_path = path.with_extension("lock");
        let lock = secure_fs::open_trusted(
            &lock_path,
            &format!("{what} lock"),
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600),
        )
        .map_err(|e| self.fail(key, e.to_string()))?;
        lock.lock()
            .map_err(|e| self.fail(key, format!("cannot lock {}: {e}", lock_path.display())))?;
        self.remove_orphans(path);
        let (mut file, _) = self.read(key)?;
        change(&mut file);
        let json = serde_json::to_vec_pretty(&file)
            .map_err(|e| self.fail(key, format!("cannot encode the {what}: {e}")))?;
        crate::util::write_file_atomic(path, &json, 0o600).map_err(|e| {
            self.fail(
                key,
                format!("cannot write the {what} {}: {e}", path.display()),
            )
        })?;
        drop(mem);
        Ok(())
    }
}
