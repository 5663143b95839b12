//! The record of versions at work (see `record`): adoption at a key's first
//! sight, the check before a wrap, and the search a shred makes for the
//! recorded versions wherever they are now.

use std::collections::{BTreeMap, BTreeSet};

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;

use super::pool::{Fail, Token, ck};
use super::record::{KeyObjects, Pinned, Record};
use super::{Ctx, VERSION_ID_LEN, Version, View};
use crate::keys::KeyError;

/// Most AES-256 secret keys a shred examines (one `C_Encrypt` each)
/// when it searches the token for recorded versions by check value; a
/// token holding more fails the shred rather than certify what it did not
/// search.
pub(super) const MAX_SCAN: usize = 4096;

const BLOCK: usize = 16;

/// The key check value of `handle`, AES_K(0¹²⁸), all 16 bytes, as its
/// fingerprint (the value itself is the GCM hash subkey: it never leaves
/// memory); ECB where the token allows it, else CBC from a zero IV (the same
/// value for one block). `None`: the token refused both (the key cannot
/// encrypt: a disabled key, another key type).
pub(super) fn check_value(s: &Session, handle: ObjectHandle) -> Option<String> {
    let zero = [0u8; BLOCK];
    let out = zeroize::Zeroizing::new(
        s.encrypt(&Mechanism::AesEcb, handle, &zero)
            .or_else(|_| s.encrypt(&Mechanism::AesCbc([0; BLOCK]), handle, &zero))
            .ok()?,
    );
    (out.len() == BLOCK).then(|| crate::keys::object_record::fingerprint(&out))
}

/// The check values of the objects under the key's label, by `CKA_ID`
/// (hex), and the handles made to encrypt for it. An object that cannot
/// encrypt (custos's own disable clears `CKA_ENCRYPT`) is let encrypt first:
/// a shred is about to destroy it, and an id alone names no material.
fn checks_here(s: &Session, view: &View) -> (Vec<(String, Option<String>)>, Vec<ObjectHandle>) {
    let mut opened = Vec::new();
    let here = view
        .versions
        .iter()
        .map(|v| {
            let mut check = check_value(s, v.handle);
            if check.is_none()
                && !v.encrypt
                && s.update_attributes(v.handle, &[Attribute::Encrypt(true)])
                    .is_ok()
            {
                opened.push(v.handle);
                check = check_value(s, v.handle);
            }
            (hex::encode(&v.id), check)
        })
        .collect();
    (here, opened)
}

/// An object away from the key's label holding a recorded version's material.
pub(super) struct Stray {
    pub handle: ObjectHandle,
    /// Named as in a destruction's objects.
    pub name: String,
    /// The `CKA_ID` (hex) of the recorded version whose material it holds.
    pub version: String,
}

/// What a search of the token by check value found.
pub(super) struct Scan {
    /// The objects holding a recorded version's material.
    pub strays: Vec<Stray>,
    /// Their check values.
    pub found: BTreeSet<String>,
    /// The keys that would not compute a check value (named).
    pub unchecked: Vec<String>,
}

/// Where a shred found the recorded versions.
pub(super) struct Located {
    /// Recorded versions (`CKA_ID`, hex) under the key's label with their
    /// recorded check value (or their id, for one recorded without one).
    pub in_place: BTreeSet<String>,
    pub strays: Vec<Stray>,
    /// The token was searched by check value (and the proof searches again).
    pub scanned: bool,
}

impl Ctx {
    fn entry(&self, token: &Token) -> String {
        Record::entry(&token.serial, &self.uri.object)
    }

    fn update(&self, token: &Token, change: impl FnOnce(&mut KeyObjects)) -> Result<(), Fail> {
        self.record
            .update(&self.entry(token), &self.key, change)
            .map(drop)
            .map_err(Fail::Key)
    }

    /// The record of the key. At its first sight by this installation the
    /// versions under its label are recorded as found (adopted, logged).
    pub(super) fn pinned(
        &self,
        s: &Session,
        token: &Token,
        view: &View,
    ) -> Result<KeyObjects, Fail> {
        if let Some(r) = self.record.get(&self.entry(token), &self.key)? {
            return Ok(r);
        }
        if view.versions.is_empty() {
            return Ok(KeyObjects::default());
        }
        let found: BTreeMap<String, Pinned> = view
            .versions
            .iter()
            .map(|v| {
                let pinned = Pinned {
                    check: check_value(s, v.handle),
                    // CKA_COPYABLE only goes true → false: false now
                    // says nothing of copies made before.
                    copyable: true,
                    adopted: true,
                };
                (hex::encode(&v.id), pinned)
            })
            .collect();
        let ids: Vec<&String> = found.keys().collect();
        tracing::warn!(event = "pkcs11.versions_adopted", key = %self.key, token_serial = %token.serial, ids = ?ids, "first use of {} by this installation: its version objects (CKA_ID {ids:?}) are recorded as custos's as found", self.key);
        let out = self
            .record
            .update(&self.entry(token), &self.key, |r| {
                for (id, p) in found {
                    r.versions.entry(id).or_insert(p);
                }
            })
            .map_err(Fail::Key)?;
        Ok(out)
    }

    /// The number after the highest version on the token and in the record:
    /// a recorded version moved away from the label keeps its number.
    pub(super) fn next_version(&self, token: &Token, on_token: u32) -> Result<u32, Fail> {
        let recorded = self
            .record
            .get(&self.entry(token), &self.key)?
            .unwrap_or_default()
            .versions
            .keys()
            .filter_map(|id| hex::decode(id).ok())
            .filter_map(|id| <[u8; VERSION_ID_LEN]>::try_from(id.as_slice()).ok())
            .map(u32::from_be_bytes)
            .max()
            .unwrap_or(0);
        on_token
            .max(recorded)
            .checked_add(1)
            .ok_or_else(|| self.backend("no version after 4294967295".into()))
    }

    /// Before `create_key` makes version 1 under a label with no object:
    /// refused if custos recorded versions of the key, since another hand
    /// relabelled or destroyed them (a shred finds them wherever they are).
    pub(super) fn refuse_if_moved(&self, token: &Token) -> Result<(), Fail> {
        let rec = self.record.get(&self.entry(token), &self.key)?;
        let Some(rec) = rec.filter(|r| !r.versions.is_empty()) else {
            return Ok(());
        };
        let ids: Vec<&String> = rec.versions.keys().collect();
        Err(Fail::Key(KeyError::Unavailable {
            key: self.key.clone(),
            message: format!(
                "custos recorded versions (CKA_ID {ids:?}) of {:?} on this token and none is under that label now: \
                 another hand relabelled or destroyed them. custos does not make a new key under the name; \
                 a shred destroys the recorded versions wherever they are",
                self.uri.object
            ),
        }))
    }

    /// Records a version custos just generated, before anything is wrapped
    /// under it.
    pub(super) fn record_generated(
        &self,
        s: &Session,
        token: &Token,
        handle: ObjectHandle,
        version: u32,
    ) -> Result<(), Fail> {
        let check = check_value(s, handle).ok_or_else(|| {
            self.backend(format!(
                "the token did not compute the key check value (CKM_AES_ECB, CKM_AES_CBC) of version {version}, which it just generated"
            ))
        })?;
        let pinned = Pinned {
            check: Some(check),
            copyable: false,
            adopted: false,
        };
        self.update(token, |r| {
            r.versions
                .insert(hex::encode(version.to_be_bytes()), pinned);
        })
    }

    /// After a shred destroyed every object it found of recorded version
    /// `id` (see `KeyObjects::destroyed`).
    pub(super) fn record_destroyed(&self, token: &Token, id: String) -> Result<(), Fail> {
        self.update(token, |r| {
            r.destroyed.insert(id);
        })
    }

    fn refused(&self, v: &Version, why: &str) -> Fail {
        Fail::Key(KeyError::AccessDenied {
            key: self.key.clone(),
            message: format!(
                "refusing to wrap data keys under version {} of {:?} (CKA_ID {}): {why}; \
                 generate a new version (custos rotate --cmk); see docs/keys-you-hold.md",
                v.version.map(|n| n.to_string()).unwrap_or_default(),
                self.uri.object,
                hex::encode(&v.id),
            ),
        })
    }

    /// Before a wrap under `v`: custos generated (or adopted) it, and its
    /// material still answers with the recorded check value. Other material
    /// under a recorded `CKA_ID` is refused for good.
    pub(super) fn check_pinned(&self, s: &Session, token: &Token, v: &Version) -> Result<(), Fail> {
        let id = hex::encode(&v.id);
        let rec = self
            .record
            .get(&self.entry(token), &self.key)?
            .unwrap_or_default();
        if rec.dead.contains(&id) {
            return Err(self.refused(
                v,
                "it once held other material than the version custos recorded under that CKA_ID",
            ));
        }
        let Some(pinned) = rec.versions.get(&id) else {
            return Err(self.refused(
                v,
                "custos did not generate it, and it was not there when this installation first used the key \
                 (it is not in the PKCS#11 object record)",
            ));
        };
        let now = check_value(s, v.handle).ok_or_else(|| {
            self.backend(format!(
                "the token did not compute the key check value (CKM_AES_ECB, CKM_AES_CBC) of version {}",
                v.version.map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        match &pinned.check {
            Some(c) if *c == now => Ok(()),
            // Adopted while it could not encrypt (disabled): pinned now.
            None => self.update(token, |r| {
                if let Some(p) = r.versions.get_mut(&id) {
                    p.check.get_or_insert(now);
                }
            }),
            Some(_) => {
                tracing::error!(event = "pkcs11.material_changed", key = %self.key, token_serial = %token.serial, id = %id, "the object under CKA_ID {id} holds other material than the version custos recorded: never wrapped under again");
                self.update(token, |r| {
                    r.dead.insert(id);
                })?;
                Err(self.refused(
                    v,
                    "it holds other material than the version custos recorded (its key check value changed); \
                     it is never wrapped under again",
                ))
            }
        }
    }

    /// Where the recorded versions are. The token is searched by check
    /// value (see [`Self::scan`]) unless every recorded version is under the
    /// key's label with its `CKA_ID` and its recorded check value (the id
    /// alone decides only for a version recorded without one), none may
    /// have been copied and none once held other material. A recorded
    /// version found nowhere while the search met keys that give no check
    /// value refuses the shred: one of them may hold it.
    pub(super) fn locate(
        &self,
        s: &Session,
        token: &Token,
        view: &View,
        rec: &KeyObjects,
    ) -> Result<Located, Fail> {
        let (here, opened) = checks_here(s, view);
        let out = self.search(s, token, view, rec, &here);
        if out.is_err() {
            // Not destroyed after all: disabled versions stay disabled.
            for h in opened {
                if let Err(e) = s.update_attributes(h, &[Attribute::Encrypt(false)]) {
                    tracing::warn!(event = "pkcs11.reclose_failed", key = %self.key, error = %e, "could not clear CKA_ENCRYPT again on object {h:?} under {:?} after a refused shred", self.uri.object);
                }
            }
        }
        out
    }

    fn search(
        &self,
        s: &Session,
        token: &Token,
        view: &View,
        rec: &KeyObjects,
        here: &[(String, Option<String>)],
    ) -> Result<Located, Fail> {
        let in_place = |id: &String, p: &Pinned| {
            here.iter()
                .any(|(i, now)| i == id && p.check.as_ref().is_none_or(|c| now.as_ref() == Some(c)))
        };
        let scan = !rec.dead.is_empty()
            || rec
                .versions
                .iter()
                .any(|(id, p)| p.copyable || !in_place(id, p));
        let in_place_ids: BTreeSet<String> = rec
            .versions
            .iter()
            .filter(|(id, p)| in_place(id, p))
            .map(|(id, _)| id.clone())
            .collect();
        if !scan {
            return Ok(Located {
                in_place: in_place_ids,
                strays: Vec::new(),
                scanned: false,
            });
        }
        let mine: Vec<ObjectHandle> = view.versions.iter().map(|v| v.handle).collect();
        let Scan {
            strays,
            found,
            unchecked,
        } = self.scan(s, token, &mine, rec)?;
        let absent: Vec<(&String, &Pinned)> = rec
            .versions
            .iter()
            .filter(|(id, p)| {
                !in_place(id, p) && p.check.as_ref().is_none_or(|c| !found.contains(c))
            })
            .collect();
        // A destruction of this installation cut short destroyed these
        // (see `KeyObjects::destroyed`).
        let lost: Vec<&String> = absent
            .iter()
            .filter(|(id, p)| p.check.is_some() && !rec.destroyed.contains(*id))
            .map(|(id, _)| *id)
            .collect();
        if !lost.is_empty() && !unchecked.is_empty() {
            return Err(self.backend(format!(
                "refusing to destroy {:?}: recorded versions (CKA_ID {lost:?}) are neither under its label nor \
                 anywhere on the token by their check value, and these AES-256 secret keys give no check value \
                 (they cannot encrypt), so one of them may hold such a version: {}. Check each of them (is it \
                 another key's, or a version of this one relabelled with CKA_ENCRYPT cleared?); destroy the ones \
                 that are this key's, or let them encrypt, then destroy again; see docs/keys-you-hold.md",
                self.uri.object,
                unchecked.join(", ")
            )));
        }
        if !absent.is_empty() {
            let ids: Vec<&String> = absent.iter().map(|(id, _)| *id).collect();
            tracing::warn!(event = "pkcs11.recorded_version_absent", key = %self.key, token_serial = %token.serial, ids = ?ids, "recorded versions (CKA_ID {ids:?}) are neither under the key's label nor anywhere on the token by their check value (every AES-256 secret key on it gave one)");
        }
        Ok(Located {
            in_place: in_place_ids,
            strays,
            scanned: true,
        })
    }

    /// The token's AES-256 secret keys other than `exclude` that hold a
    /// recorded version's material (by check value). Public ones too: a
    /// copy (`C_CopyObject`) may have cleared `CKA_PRIVATE`.
    pub(super) fn scan(
        &self,
        s: &Session,
        token: &Token,
        exclude: &[ObjectHandle],
        rec: &KeyObjects,
    ) -> Result<Scan, Fail> {
        let wanted = rec.checks();
        let handles = s
            .iter_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::from(crate::keys::KEY_LEN as u64)),
            ])
            .map_err(ck("C_FindObjects (AES secret keys)"))?
            .take(MAX_SCAN + 1)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ck("C_FindObjects (AES secret keys)"))?;
        if handles.len() > MAX_SCAN {
            return Err(self.backend(format!(
                "token {:?} holds more than {MAX_SCAN} AES-256 secret keys: custos cannot search them all \
                 for relabelled or copied versions of {:?}, and does not certify a search it did not make; \
                 see docs/keys-you-hold.md",
                token.label, self.uri.object
            )));
        }
        let (mut strays, mut found, mut unchecked) = (Vec::new(), BTreeSet::new(), Vec::new());
        for h in handles.into_iter().filter(|h| !exclude.contains(h)) {
            match check_value(s, h) {
                Some(c) if wanted.contains_key(c.as_str()) => {
                    strays.push(Stray {
                        handle: h,
                        name: self.name_of(s, token, h)?,
                        version: wanted[c.as_str()].to_owned(),
                    });
                    found.insert(c);
                }
                Some(_) => {}
                // Named for the refusal only: best effort.
                None => unchecked.push(
                    self.name_of(s, token, h)
                        .unwrap_or_else(|_| format!("object handle {h:?}")),
                ),
            }
        }
        Ok(Scan {
            strays,
            found,
            unchecked,
        })
    }

    /// An object's name as a destruction lists it: token, label, id.
    fn name_of(&self, s: &Session, token: &Token, h: ObjectHandle) -> Result<String, Fail> {
        let (mut label, mut id) = (Vec::new(), Vec::new());
        for a in s
            .get_attributes(h, &[AttributeType::Label, AttributeType::Id])
            .map_err(ck("C_GetAttributeValue (CKA_LABEL, CKA_ID)"))?
        {
            match a {
                Attribute::Label(l) => label = l,
                Attribute::Id(i) => id = i,
                _ => {}
            }
        }
        Ok(super::object_name(
            token,
            &String::from_utf8_lossy(&label),
            &id,
        ))
    }
}
