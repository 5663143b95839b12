//! What this installation knows of its KMIP keys' objects, kept where no
//! holder of KMIP credentials can write: `<state_dir>/kmip-objects.json`.
//!
//! Anyone with credentials for the key manager (another administrator, an
//! application sharing custos's client certificate) can Register an object
//! with a value they know, name it `<n>@v<huge>` and put it in the key's
//! group; nothing the server records tells it from a version custos created
//! (PyKMIP reports neither Never Extractable, Always Sensitive nor Fresh, and
//! a KMIP 2 Import sets even those to whatever the client sends). So custos
//! remembers the Unique Identifier of every version it creates (before
//! activating it) and of every tombstone it leaves (with the time it chose),
//! and wraps only under a version it remembers. A key first seen without a
//! record (made before this record existed, or by the customer) is adopted
//! as found, once, and logged: that first sight is the one thing trusted.
//!
//! The record also names the objects a destruction must prove gone *by
//! identifier*: an object renamed or moved out of the key's group is still
//! found, and still destroyed.
//!
//! An identifier means something only on the server that assigned it (PyKMIP
//! counts from 1), and "not found" proves a destruction only there. So each
//! key is bound to the key manager that holds it: custos leaves a marker key
//! on every server it makes or adopts keys on (Name `custos-server/<128
//! random bits>`), records its identifier and key check value here, and
//! names the marker in the entry of each key. Before custos judges a key's
//! objects, the server must give the marker's check value under its
//! identifier: another server (a wrong `[kmip] server`) cannot, whatever
//! Names its objects carry, and no absence there is taken for a destruction
//! (see `server.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::PROVIDER;
use crate::keys::KeyError;
use crate::keys::object_record::{ObjectRecord, Spec};

const FORMAT: &str = "custos-kmip-objects-v4";
/// As v4, with key check values as themselves, not fingerprints (read as
/// fingerprints: see `object_record::check_from_disk`). Bumped so that a
/// build that compares raw values refuses a record of fingerprints.
const FORMAT_V3: &str = "custos-kmip-objects-v3";
/// As v3, and no server markers (its
/// keys are bound to a server on their next use, see [`KeyObjects::server`]).
const FORMAT_V2: &str = "custos-kmip-objects-v2";
/// As v2, and also no check values, no dead identifiers, entries keyed
/// `"<server> <key id>"`.
const FORMAT_V1: &str = "custos-kmip-objects-v1";

/// A marker key on one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Marker {
    /// Its Unique Identifier on that server.
    pub uid: String,
    /// The fingerprint of its key check value (see
    /// [`fingerprint`](crate::keys::object_record::fingerprint)): what
    /// proves the server is that one.
    #[serde(deserialize_with = "crate::keys::object_record::check_from_disk::one")]
    pub check: String,
}

/// The objects custos made (or adopted) for one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyObjects {
    /// Unique Identifier → version number.
    pub versions: BTreeMap<String, u32>,
    /// Unique Identifier → the destruction time (Unix seconds) custos chose.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tombstones: BTreeMap<String, i64>,
    /// Unique Identifier of a version → the fingerprint of its key check
    /// value (the server's AES of the all-zero block under that object, see
    /// [`fingerprint`](crate::keys::object_record::fingerprint)), taken when
    /// custos created (or adopted, or vouched for) it. The identifier alone
    /// proves nothing: a server may give a freed one to the next object.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::keys::object_record::check_from_disk::map"
    )]
    pub checks: BTreeMap<String, String>,
    /// Identifiers once found gone, destroyed, or holding other material:
    /// never trusted again, whatever later answers for them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub dead: BTreeSet<String>,
    /// The Name of the marker object of the key manager that holds this
    /// key (see the module's docs). `None`: recorded before markers; bound
    /// to the server of its next use on which none of its objects is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

impl KeyObjects {
    /// custos's own tombstone, the earliest if a race left two; one under
    /// a dead identifier only if no other is left (its time still dates
    /// the destruction; the object is made again).
    pub fn tombstone(&self) -> Option<(i64, &str)> {
        self.tombstones
            .iter()
            .map(|(uid, at)| (self.dead.contains(uid), *at, uid.as_str()))
            .min()
            .map(|(_, at, uid)| (at, uid))
    }
}

impl KeyObjects {
    /// Takes in what another entry of the same key recorded.
    fn merge(&mut self, other: KeyObjects) {
        for (uid, v) in other.versions {
            self.versions.entry(uid).or_insert(v);
        }
        for (uid, at) in other.tombstones {
            self.tombstones.entry(uid).or_insert(at);
        }
        for (uid, c) in other.checks {
            self.checks.entry(uid).or_insert(c);
        }
        self.dead.extend(other.dead);
        self.server = self.server.take().or(other.server);
    }
}

/// Entries of v1 (`"<server> <key id>"`) merged under their key id, so
/// that a changed server string never makes custos meet a key afresh.
fn upgrade_v1(keys: &mut BTreeMap<String, KeyObjects>) {
    let old: Vec<String> = keys.keys().filter(|k| k.contains(' ')).cloned().collect();
    for entry in old {
        let Some(objects) = keys.remove(&entry) else {
            continue;
        };
        let id = entry.rsplit(' ').next().unwrap_or_default().to_owned();
        keys.entry(id).or_default().merge(objects);
    }
}

/// v2 entries are v3 entries without a server.
fn upgrade_v2(_: &mut BTreeMap<String, KeyObjects>) {}

static SPEC: Spec<KeyObjects> = Spec {
    provider: PROVIDER,
    what: "KMIP object record",
    format: FORMAT,
    legacy: &[
        (FORMAT_V1, upgrade_v1),
        (FORMAT_V2, upgrade_v2),
        (FORMAT_V3, |_| {}),
    ],
};

/// The record: in the state directory, or (tests, a provider built without
/// one) in memory for the life of the process.
pub(super) struct Pins(ObjectRecord<KeyObjects, Marker>);

impl Pins {
    pub fn in_memory() -> Self {
        Pins(ObjectRecord::in_memory(&SPEC))
    }

    pub fn at(path: PathBuf) -> Self {
        Pins(ObjectRecord::at(&SPEC, path))
    }

    /// What is recorded of `entry` (the key id); `None` if the key was
    /// never seen by this installation.
    pub fn get(&self, entry: &str, key: &str) -> Result<Option<KeyObjects>, KeyError> {
        self.0.get(entry, key)
    }

    /// See [`ObjectRecord::migrate`].
    pub fn migrate(&self) -> Result<(), KeyError> {
        self.0.migrate()
    }

    /// Every object the record holds for keys other than `entry`: never a
    /// version or tombstone of `entry`, whatever it is named. Server
    /// markers are among them: never a key's object either. An identifier
    /// dead in the entry that recorded it is not: that object is gone, and
    /// the server may have given the identifier to this key's.
    pub fn others(&self, entry: &str, key: &str) -> Result<BTreeSet<String>, KeyError> {
        let (keys, servers) = self.0.all(key)?;
        let markers = servers.into_values().map(|m| m.uid);
        Ok(keys
            .into_iter()
            .filter(|(e, _)| e != entry)
            .flat_map(|(_, o)| {
                let dead = o.dead;
                o.versions
                    .into_keys()
                    .chain(o.tombstones.into_keys())
                    .filter(move |uid| !dead.contains(uid))
            })
            .chain(markers)
            .collect())
    }

    /// The marker keys recorded: Name → marker.
    pub fn servers(&self, key: &str) -> Result<BTreeMap<String, Marker>, KeyError> {
        self.0.servers(key)
    }

    /// Records a marker key just created on a server (its identifier first,
    /// `check` empty; then again with its check value).
    pub fn add_server(&self, name: &str, marker: Marker, key: &str) -> Result<(), KeyError> {
        self.0.set_server(name, marker, key)
    }

    /// After custos created object `uid` for `entry` (and saw the server
    /// still holds the entry's marker): the server gave `uid` to a new
    /// object, so whatever another key on the same server recorded under it
    /// was deleted. It is dead there, and a shred of that key neither
    /// destroys nor waits for the object now under it.
    pub fn bury(&self, entry: &str, uid: &str, key: &str) -> Result<(), KeyError> {
        self.0.update_all(key, |keys, _| {
            let Some(server) = keys.get(entry).and_then(|o| o.server.clone()) else {
                return;
            };
            for (other, o) in keys.iter_mut() {
                if other != entry
                    && o.server.as_deref() == Some(server.as_str())
                    && (o.versions.contains_key(uid) || o.tombstones.contains_key(uid))
                {
                    o.dead.insert(uid.to_owned());
                }
            }
        })
    }

    /// Changes the record of `entry` (other custos processes of this
    /// installation update it too).
    pub fn update(
        &self,
        entry: &str,
        key: &str,
        change: impl FnOnce(&mut KeyObjects),
    ) -> Result<KeyObjects, KeyError> {
        self.0.update(entry, key, change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_new_process_and_refuses_a_file_others_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmip-objects.json");
        let pins = Pins::at(path.clone());
        assert_eq!(pins.get("s name/a", "k").unwrap(), None);
        pins.update("s name/a", "k", |o| {
            o.versions.insert("7".into(), 1);
        })
        .unwrap();
        pins.update("s name/a", "k", |o| {
            o.tombstones.insert("9".into(), 1_700_000_000);
        })
        .unwrap();
        let again = Pins::at(path.clone());
        let got = again.get("s name/a", "k").unwrap().unwrap();
        assert_eq!(got.versions.get("7"), Some(&1));
        assert_eq!(got.tombstone(), Some((1_700_000_000, "9")));
        assert_eq!(again.get("s name/b", "k").unwrap(), None);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = again.get("s name/a", "k").unwrap_err();
        assert!(e.to_string().contains("writable"), "{e}");
    }

    /// A record of the first round (entries `"<server> <key id>"`, no check
    /// values) is read under the key id, whatever the server string.
    #[test]
    fn a_first_round_record_is_read_under_the_key_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmip-objects.json");
        let v1 = r#"{"format":"custos-kmip-objects-v1","keys":{
            "old-host:5696 name/a":{"versions":{"7":1}},
            "new-host:5696 name/a":{"versions":{"8":2},"tombstones":{"9":5}}}}"#;
        std::fs::write(&path, v1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pins = Pins::at(path.clone());
        let got = pins.get("name/a", "k").unwrap().unwrap();
        assert_eq!(got.versions.len(), 2);
        assert_eq!(got.tombstone(), Some((5, "9")));
        pins.update("name/a", "k", |o| {
            o.dead.insert("7".into());
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(FORMAT) && !text.contains("host"), "{text}");
    }

    /// Check values an earlier build recorded as themselves (a version's, a
    /// server marker's) are read as fingerprints, and the file is rewritten
    /// at the first read without them.
    #[test]
    fn check_values_an_earlier_build_recorded_are_fingerprinted_on_the_first_read() {
        use crate::keys::object_record::fingerprint;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmip-objects.json");
        let (version, marker) = ("1a".repeat(16), "2b".repeat(16));
        let old = serde_json::json!({
            "format": FORMAT_V3,
            "servers": {"m": {"uid": "3", "check": marker}},
            "keys": {"name/a": {"versions": {"7": 1}, "checks": {"7": version}}},
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pins = Pins::at(path.clone());
        let got = pins.get("name/a", "k").unwrap().unwrap();
        assert_eq!(got.checks["7"], fingerprint(&[0x1a; 16]));
        assert_eq!(
            pins.servers("k").unwrap()["m"].check,
            fingerprint(&[0x2b; 16])
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&version) && !text.contains(&marker),
            "{text}"
        );
        assert!(text.contains(&fingerprint(&[0x1a; 16])), "{text}");
        assert!(text.contains(FORMAT), "{text}");
    }
}
