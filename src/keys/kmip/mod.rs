//! The KMIP key provider: CMKs live on the customer's key manager and are
//! used only through its Encrypt and Decrypt operations, over TLS with a
//! client certificate. custos never fetches key material (no Get).
//!
//! # Wrapping (docs/FORMAT.md §3, "KMIP envelope")
//!
//! Not every key manager binds associated data: the PyKMIP server refuses
//! AES-GCM. So custos binds the [`WrapContext`] itself, the same way on every
//! server: per wrap it draws a fresh 32-byte wrapping key WK, asks the server
//! to encrypt WK under the CMK (AES-256, CBC without padding, or CTR where
//! the server offers no unpadded CBC, such as PyKMIP), and seals the data
//! key locally with AES-256-GCM under WK, with associated data naming the
//! format, the mode, the CMK version object, the server's ciphertext and the
//! context. Without padding the server's Decrypt accepts any 32 bytes: only
//! the local GCM tag can refuse an envelope ([`KeyError::InvalidCiphertext`]),
//! after the same calls whatever was changed, so no answer or timing tells
//! a tamperer more than "no". Nothing unwraps without the server. WK is
//! zeroized after use. Envelopes of format 1 (CBC with PKCS#5 padding) still
//! unwrap; rotation re-wraps them in format 2.
//!
//! # Objects (rotation, destruction)
//!
//! KMIP's Re-key is optional and PyKMIP lacks it, so a version is an object
//! of its own. Every object has Names of its own, since most key managers
//! refuse a Name another object carries: version `k` of `kmip:name/<n>` is
//! named `<n>@v<k>`, a tombstone `<n>@destroyed@<seconds>`. The Object Group
//! `custos-key/<n>` ties them together; a Locate of the group, read in
//! pages, lists them. Objects made before groups (every one carried the
//! Name `<n>`) are found by a Locate of that Name as well, so existing keys
//! keep working without a migration. The current version is the highest.
//! `rotate` creates (Create, Activate) version k+1; old versions stay Active
//! for unwrapping. A `kmip:<unique-identifier>` key is one object the
//! customer made: it has one version and cannot be rotated or created by
//! custos (the key manager assigns identifiers); its tombstone is in the
//! group `custos-uid/<uid>`.
//!
//! # States
//!
//! KMIP states map onto [`KeyState`]: Active → Enabled, Deactivated →
//! Disabled, Pre-Active → `pre_active`, Compromised → `compromised` (both
//! unusable), Destroyed and Destroyed-Compromised → Destroyed. `disable` is
//! Revoke (Active → Deactivated), which KMIP cannot undo: `enable` is
//! unsupported. `destroy` revokes and destroys every version, then leaves a
//! tombstone (see [`KmipProvider::destroy`]).

mod envelope;
#[cfg(test)]
mod fake;
mod messages;
mod pins;
mod reference;
mod server;
mod settings;
mod wire;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kmip_protocol::types::common::{CryptographicAlgorithm, RevocationReasonCode, State};
use kmip_protocol::types::response::ResultReason;
use zeroize::Zeroizing;

pub use reference::KmipKeyId;
pub use settings::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_OPERATION_TIMEOUT, KmipSettings,
};

use super::{
    Custody, DataKey, DestroyAction, Destruction, KeyError, KeyInfo, KeyOrigin, KeyProvider,
    KeyRef, KeyState, ProviderKind, SecretKey, WrapContext, WrappedKey,
};
use messages::{Attributes, Cipher, Filter, Request, Response, Template};
use wire::{Link, WireError};

const PROVIDER: &str = "kmip";

/// Identifiers asked for per Locate. A server may answer fewer (its own
/// page size), so the end of a listing is proven, never inferred from a
/// short page (see [`KmipProvider::locate`]).
const LOCATE_PAGE: i32 = 32;
/// Objects one read of a key's family processes, at most: far more than a
/// key rotated monthly for decades has, few enough that objects planted in
/// its group cannot make a read run for hours (each costs a GetAttributes).
const MAX_OBJECTS: usize = 1_000;
/// Paged reads begun again when the listing moved under them, at most.
const LOCATE_ATTEMPTS: usize = 3;

/// KMIP Cryptographic Usage Mask bits.
const USAGE_ENCRYPT: i32 = 0x4;
const USAGE_DECRYPT: i32 = 0x8;

/// Checks the part of a `kmip:` reference after the scheme.
pub fn validate_key_id(id: &str) -> Result<(), String> {
    KmipKeyId::parse(id).map(|_| ())
}

/// One object of a key: a version, or the tombstone of a destroyed key.
#[derive(Debug, Clone)]
struct Object {
    uid: String,
    state: State,
    kind: ObjectKind,
    /// AES-256, as every version must be to wrap.
    aes_256: bool,
    /// In this installation's record of the key's objects ([`pins`]):
    /// created by custos (or there when it first met the key). Only such a
    /// version is wrapped under.
    pinned: bool,
    /// The fingerprint of its key check value in the record (see
    /// `object_record::fingerprint`): the material custos pinned.
    /// `None`: recorded before check values, or never Active since.
    check: Option<String>,
    /// What its Name says it is in the family it was read for.
    claims: ObjectKind,
    /// Its identifier is dead in the record (read by a destruction, which
    /// asks for dead identifiers too).
    dead: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectKind {
    Version(u32),
    /// Left by `destroy`: the key was destroyed at this time (seconds).
    Tombstone(i64),
    /// Found by the key's group or Name, but with no custos name of the key
    /// (made by someone else).
    Foreign,
}

/// What the key manager holds of one key, judged against the record.
#[derive(Debug, Default)]
struct Family {
    versions: Vec<(u32, Object)>,
    /// custos's own tombstone: the time it chose (from the record, never
    /// from the object's Name, which any client can set), its uid and its
    /// state on the server (`None`: not there any more).
    tombstone: Option<(i64, String, Option<State>)>,
    /// Tombstones custos did not leave (planted, or left by another
    /// installation): they make the key refuse use, and prove nothing.
    foreign_tombstones: Vec<String>,
    /// Versions the record names that the server, asked by identifier,
    /// no longer holds (or once did not: see `pins::KeyObjects::dead`):
    /// the proof of a destruction.
    gone: Vec<String>,
    /// Recorded versions found gone or destroyed by this read, to be marked
    /// dead in the record.
    newly_dead: Vec<String>,
    /// Objects the record holds for other keys: never this key's.
    elsewhere: std::collections::BTreeSet<String>,
    /// A listed object custos may not read fails the read (a destruction
    /// must see every object), rather than being skipped.
    unreadable_fatal: bool,
}

fn is_destroyed(state: State) -> bool {
    matches!(state, State::Destroyed | State::DestroyedCompromised)
}

impl Family {
    /// The version custos wraps under: the highest it created (or adopted).
    fn current(&self) -> Option<&(u32, Object)> {
        self.versions
            .iter()
            .filter(|(_, o)| o.pinned)
            .max_by_key(|(v, _)| *v)
    }

    /// The highest version number any object claims (a rotation numbers
    /// past it, so that its new Name is free).
    fn newest(&self) -> Option<&(u32, Object)> {
        self.versions.iter().max_by_key(|(v, _)| *v)
    }

    /// Versions whose material still exists on the server. A server that
    /// follows KMIP keeps a destroyed object (State Destroyed) and lists it;
    /// PyKMIP deletes it.
    fn live(&self) -> impl Iterator<Item = &(u32, Object)> {
        self.versions.iter().filter(|(_, o)| !is_destroyed(o.state))
    }

    /// A destruction began: there is a tombstone (anyone's: a planted one
    /// can at worst make the key refuse use), or some version is destroyed.
    fn destruction_began(&self) -> bool {
        self.own_destruction_began() || !self.foreign_marks().is_empty()
    }

    /// custos's own signs of a destruction: its recorded tombstone, or a
    /// version it recorded destroyed or gone. Only these may send the
    /// operator to run the shred again.
    fn own_destruction_began(&self) -> bool {
        self.tombstone.is_some()
            || self
                .versions
                .iter()
                .any(|(_, o)| o.pinned && is_destroyed(o.state))
    }

    /// Signs of a destruction custos did not leave: tombstones not in its
    /// record, and destroyed objects named as versions that it did not
    /// create.
    fn foreign_marks(&self) -> Vec<&str> {
        let destroyed = self
            .versions
            .iter()
            .filter(|(_, o)| !o.pinned && is_destroyed(o.state))
            .map(|(_, o)| o.uid.as_str());
        self.foreign_tombstones
            .iter()
            .map(String::as_str)
            .chain(destroyed)
            .collect()
    }

    /// When the key was destroyed, as custos itself recorded it.
    fn destroyed_at(&self) -> Option<DateTime<Utc>> {
        self.tombstone.as_ref().and_then(|(at, _, _)| time(*at))
    }

    /// The key's state over all its versions, never the newest alone: a
    /// destruction that stopped half-way (a crash, a refused Destroy) leaves
    /// older versions that still decrypt, and must not read as destroyed.
    fn state(&self) -> Option<KeyState> {
        let live = self.live().next().is_some();
        if self.destruction_began() || (!live && !self.gone.is_empty()) {
            return Some(match live {
                false => KeyState::Destroyed {
                    destroyed_at: self.destroyed_at(),
                },
                true if self.own_destruction_began() => KeyState::Other {
                    name: "destroy_incomplete".into(),
                },
                // Only marks someone else left: no destruction of custos's.
                true => KeyState::Other {
                    name: "foreign_tombstone".into(),
                },
            });
        }
        match (self.current(), self.versions.is_empty()) {
            (Some((_, o)), _) => Some(state_of(o.state)),
            (None, true) => None,
            // Only objects custos did not make: nothing it will use.
            (None, false) => Some(KeyState::Other {
                name: "no_custos_version".into(),
            }),
        }
    }

    /// Every version object custos knows of (listed now, or in the record
    /// and gone), oldest first: what a destruction must prove gone.
    fn known_uids(&self) -> Vec<String> {
        let mut versions: Vec<_> = self.versions.iter().collect();
        versions.sort_by_key(|(v, o)| (*v, o.uid.clone()));
        let mut out: Vec<String> = versions.into_iter().map(|(_, o)| o.uid.clone()).collect();
        for uid in &self.gone {
            if !out.contains(uid) {
                out.push(uid.clone());
            }
        }
        out
    }
}

/// The KMIP [`KeyProvider`].
pub struct KmipProvider {
    server: String,
    link: Box<dyn Link>,
    /// How many of each operation this provider sent: lets tests prove that
    /// no Get ever left custos, and shows an operator what custos asked for.
    sent: Mutex<BTreeMap<String, u64>>,
    /// What the server's Encrypt of a WK uses: unknown until the first wrap
    /// (CBC without padding is tried first), then the mode that worked.
    wrap_mode: AtomicU8,
    locate_page: i32,
    /// The objects custos made on this server ([`pins`]).
    pins: pins::Pins,
    /// The Name of this server's marker object once it answered for it
    /// ([`server`]).
    marker: Mutex<Option<std::collections::BTreeSet<String>>>,
    /// The server refused Sensitive once: later Creates go without it.
    insensitive: AtomicBool,
}

const MODE_UNKNOWN: u8 = 0;
const MODE_CBC: u8 = 1;
const MODE_CTR: u8 = 2;

impl fmt::Debug for KmipProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipProvider")
            .field("server", &self.server)
            .finish()
    }
}

/// The Object Group of every object of key `kmip:name/<name>`.
fn key_group(name: &str) -> String {
    format!("custos-key/{name}")
}

/// The Object Group (and, before groups, the Name) of the tombstone of
/// key `kmip:<uid>`.
fn uid_group(uid: &str) -> String {
    format!("custos-uid/{uid}")
}

fn version_name(name: &str, v: u32) -> String {
    format!("{name}@v{v}")
}

fn tombstone_name(name: &str, at: i64) -> String {
    format!("{name}@destroyed@{at}")
}

/// Decimal digits without a sign or a leading zero: one spelling per number.
fn canonical_number<T: std::str::FromStr>(s: &str) -> Option<T> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

fn classify(family_name: &str, names: &[String]) -> ObjectKind {
    for n in names {
        if let Some(rest) = n.strip_prefix(family_name) {
            if let Some(v) = rest.strip_prefix("@v").and_then(canonical_number) {
                return ObjectKind::Version(v);
            }
            if let Some(t) = rest.strip_prefix("@destroyed@").and_then(canonical_number) {
                return ObjectKind::Tombstone(t);
            }
        }
    }
    ObjectKind::Foreign
}

fn state_of(s: State) -> KeyState {
    match s {
        State::Active => KeyState::Enabled,
        State::Deactivated => KeyState::Disabled,
        State::PreActive => KeyState::Other {
            name: "pre_active".into(),
        },
        State::Compromised => KeyState::Other {
            name: "compromised".into(),
        },
        State::Destroyed | State::DestroyedCompromised => {
            KeyState::Destroyed { destroyed_at: None }
        }
        // The enum is non-exhaustive: a state a later KMIP adds is unusable here.
        other => KeyState::Other {
            name: format!("{other:?}").to_lowercase(),
        },
    }
}

/// A Locate filter in words, for errors.
fn describe_filter(filter: &Filter) -> String {
    match filter {
        Filter::Group(g) => format!("Object Group {g:?}"),
        Filter::Name(n) => format!("Name {n:?}"),
    }
}

fn label(key: &KeyRef) -> String {
    key.to_string()
}

fn time(secs: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(secs, 0)
}

impl KmipProvider {
    /// Reads the certificates and key and builds the TLS client. Makes no
    /// connection: a server that is down fails the first key operation.
    pub fn new(settings: &KmipSettings) -> Result<Self, KeyError> {
        let transport = settings.transport()?;
        Ok(Self::with_link(
            settings.server.clone(),
            Box::new(std::sync::Arc::new(transport)),
        ))
    }

    fn with_link(server: String, link: Box<dyn Link>) -> Self {
        KmipProvider {
            server,
            link,
            sent: Mutex::new(BTreeMap::new()),
            wrap_mode: AtomicU8::new(MODE_UNKNOWN),
            locate_page: LOCATE_PAGE,
            pins: pins::Pins::in_memory(),
            marker: Mutex::new(None),
            insensitive: AtomicBool::new(false),
        }
    }

    /// Keeps the record of the objects custos creates in `path` (in the
    /// state directory), rather than in memory: a version custos made is
    /// then known as its own across processes and restarts.
    pub fn with_object_record(mut self, path: std::path::PathBuf) -> Self {
        self.pins = pins::Pins::at(path);
        self
    }

    /// Rewrites the object record at `path` in the current format, if it
    /// exists in an older one (see `object_record::ObjectRecord::migrate`).
    pub fn migrate_object_record(path: std::path::PathBuf) -> Result<(), KeyError> {
        pins::Pins::at(path).migrate()
    }

    /// The record's entry of `key`: its id alone, so that a changed server
    /// string (another port, a DNS name for an address) is the same key.
    fn record_entry(&self, key: &KeyRef) -> String {
        key.id().to_owned()
    }

    /// Identifiers asked for per Locate (tests of families longer than a page).
    #[cfg(feature = "test-hooks")]
    pub fn set_locate_page(&mut self, items: i32) {
        self.locate_page = items;
    }

    /// `host:port` of the key manager.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// How many of each KMIP operation this provider sent (e.g. `Encrypt`:
    /// 3). There is no code path that sends Get; tests check it here.
    pub fn operations_sent(&self) -> BTreeMap<String, u64> {
        self.sent.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Whether the server still holds object `uid` (GetAttributes; an
    /// auditor's check that a destroyed version is gone).
    pub async fn object_present(&self, key: &KeyRef, uid: &str) -> Result<bool, KeyError> {
        match self.attributes(key, uid).await {
            Ok(_) => Ok(true),
            Err(KeyError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn call(&self, req: Request) -> Result<Response, WireError> {
        if let Ok(mut sent) = self.sent.lock() {
            *sent.entry(format!("{:?}", req.operation())).or_default() += 1;
        }
        self.link.call(req).await
    }

    fn err(&self, key: &KeyRef, op: &str, e: WireError) -> KeyError {
        let server = &self.server;
        match e {
            WireError::Connect(m) | WireError::Io(m) => KeyError::Unreachable {
                endpoint: format!("kmip://{server}"),
                message: format!("{op}: {m}"),
            },
            WireError::Tls(m) => KeyError::AccessDenied {
                key: label(key),
                message: format!("TLS with KMIP server {server}: {m}"),
            },
            WireError::Protocol(m) => KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!("{op}: {m}"),
            },
            WireError::Failed { reason, message } => match reason {
                Some(ResultReason::ItemNotFound) => KeyError::NotFound {
                    key: label(key),
                    message: format!("KMIP server {server}: {message}"),
                },
                Some(
                    ResultReason::PermissionDenied | ResultReason::AuthenticationNotSuccessful,
                ) => KeyError::AccessDenied {
                    key: label(key),
                    message: format!("{op} on KMIP server {server}: {message}"),
                },
                _ => KeyError::Backend {
                    provider: PROVIDER,
                    key: label(key),
                    message: format!("{op} on KMIP server {server} failed ({reason:?}): {message}"),
                },
            },
        }
    }

    fn wrong_answer(&self, key: &KeyRef, op: &str) -> KeyError {
        self.err(
            key,
            op,
            WireError::Protocol("the server answered another operation".into()),
        )
    }

    /// Activate, Revoke or Destroy.
    async fn simple(&self, key: &KeyRef, op: &str, req: Request) -> Result<(), KeyError> {
        match self.call(req).await {
            Ok(Response::Done) => Ok(()),
            Ok(_) => Err(self.wrong_answer(key, op)),
            Err(e) => Err(self.err(key, op, e)),
        }
    }

    /// Every object `filter` matches, read a page at a time. Each page after
    /// the first starts with the last identifier of the one before: if that
    /// one moved (an object made or deleted meanwhile shifted the listing),
    /// the read begins again, so no object is skipped unseen. A short page
    /// is not taken for the last (a server may cap its pages): the listing
    /// ends when the server's Located Items is reached, or when the page
    /// after the last identifier read adds nothing.
    async fn locate(&self, key: &KeyRef, filter: &Filter) -> Result<Vec<String>, KeyError> {
        let page = self.locate_page.max(2);
        'attempt: for _ in 0..LOCATE_ATTEMPTS {
            let mut uids: Vec<String> = Vec::new();
            loop {
                let offset = uids.len().saturating_sub(1);
                let req = Request::Locate {
                    filter: filter.clone(),
                    max_items: page,
                    // MAX_OBJECTS keeps it far below i32::MAX.
                    offset_items: i32::try_from(offset).unwrap_or(i32::MAX),
                };
                let (found, total) = match self.call(req).await {
                    Ok(Response::Located { uids, total }) => (uids, total),
                    Ok(_) => return Err(self.wrong_answer(key, "Locate")),
                    Err(e) => return Err(self.err(key, "Locate", e)),
                };
                let mut found = found.into_iter();
                if !uids.is_empty() && found.next().as_ref() != uids.last() {
                    continue 'attempt;
                }
                let before = uids.len();
                uids.extend(found.take(MAX_OBJECTS + 1));
                if uids.len() > MAX_OBJECTS {
                    return Err(self.too_many_objects(key, filter));
                }
                let all_counted =
                    total.is_some_and(|t| usize::try_from(t).is_ok_and(|t| uids.len() >= t));
                if uids.len() == before || all_counted {
                    return Ok(uids);
                }
            }
        }
        Err(KeyError::Backend {
            provider: PROVIDER,
            key: label(key),
            message: format!(
                "the KMIP server's Locate answers of {} kept changing while custos paged through them ({LOCATE_ATTEMPTS} attempts)",
                describe_filter(filter)
            ),
        })
    }

    fn too_many_objects(&self, key: &KeyRef, filter: &Filter) -> KeyError {
        KeyError::Backend {
            provider: PROVIDER,
            key: label(key),
            message: format!(
                "the KMIP server lists more than {MAX_OBJECTS} objects of {}: more than any key of custos has; remove the objects that are not this key's",
                describe_filter(filter)
            ),
        }
    }

    /// The objects of every filter, each once.
    async fn locate_any(&self, key: &KeyRef, filters: &[Filter]) -> Result<Vec<String>, KeyError> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for f in filters {
            for uid in self.locate(key, f).await? {
                if seen.insert(uid.clone()) {
                    out.push(uid);
                }
            }
            // Bounded over all filters too: each object costs a GetAttributes.
            if out.len() > MAX_OBJECTS {
                return Err(self.too_many_objects(key, f));
            }
        }
        Ok(out)
    }

    /// State, Names and Object Groups of one object (GetAttributes; never Get).
    async fn attributes(&self, key: &KeyRef, uid: &str) -> Result<Attributes, KeyError> {
        let a = match self.call(Request::GetAttributes(uid.to_owned())).await {
            Ok(Response::Attributes(a)) => a,
            Ok(_) => return Err(self.wrong_answer(key, "GetAttributes")),
            Err(e) => return Err(self.err(key, "GetAttributes", e)),
        };
        // Another object's attributes (a server's mistake, an answer meant
        // for another request) would let one object pass for another.
        if a.uid != uid {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!(
                    "GetAttributes of object {uid:?} answered for object {:?}",
                    a.uid
                ),
            });
        }
        if a.state.is_none() {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!("GetAttributes of object {uid:?} returned no State"),
            });
        }
        Ok(a)
    }

    async fn object(&self, key: &KeyRef, family_name: &str, uid: &str) -> Result<Object, KeyError> {
        let a = self.attributes(key, uid).await?;
        Ok(Object {
            uid: uid.to_owned(),
            state: a.state.unwrap_or(State::Compromised),
            kind: classify(family_name, &a.names),
            aes_256: a.algorithm == Some(CryptographicAlgorithm::AES) && a.bits == Some(256),
            pinned: false,
            check: None,
            claims: classify(family_name, &a.names),
            dead: false,
        })
    }

    /// The objects the filters find, classified against `family_name` and
    /// judged against the record: versions (if `versions`) and tombstones
    /// go into `fam`, anything else is ignored.
    async fn gather(
        &self,
        key: &KeyRef,
        fam: &mut Family,
        family_name: &str,
        filters: &[Filter],
        versions: bool,
        record: Option<&pins::KeyObjects>,
    ) -> Result<(), KeyError> {
        for uid in self.locate_any(key, filters).await? {
            let mut obj = match self.object(key, family_name, &uid).await {
                Ok(o) => o,
                // Destroyed between the Locate and now (the record, if it
                // knows the object, asks again by identifier below).
                Err(KeyError::NotFound { .. }) => continue,
                // Unreachable, throttled: nothing is known of the object.
                Err(e @ (KeyError::Unreachable { .. } | KeyError::Throttled { .. })) => {
                    return Err(e);
                }
                Err(e) => {
                    let own = record.is_some_and(|r| {
                        r.versions.contains_key(&uid) || r.tombstones.contains_key(&uid)
                    });
                    let listed = filters.iter().map(describe_filter).collect::<Vec<_>>();
                    if own || fam.unreadable_fatal {
                        return Err(KeyError::Backend {
                            provider: PROVIDER,
                            key: label(key),
                            message: format!(
                                "object {uid:?}, listed by {}, cannot be read: {e}",
                                listed.join(" or ")
                            ),
                        });
                    }
                    tracing::warn!(event = "kmip.unreadable_object_skipped", key = %key, object = %uid, "object {uid} listed by {} cannot be read and custos did not create it: skipped ({e})", listed.join(" or "));
                    continue;
                }
            };
            // An identifier a destruction proved gone holds someone else's
            // object now; a destruction looks again (the mark may be wrong,
            // see `destroy`).
            if record.is_some_and(|r| r.dead.contains(&uid)) {
                if !fam.unreadable_fatal {
                    if record.is_some_and(|r| r.versions.contains_key(&uid)) {
                        fam.gone.push(uid);
                    }
                    continue;
                }
                obj.dead = true;
            }
            if is_destroyed(obj.state) && record.is_some_and(|r| r.versions.contains_key(&uid)) {
                fam.newly_dead.push(uid.clone());
            }
            let own_tombstone = record.and_then(|r| r.tombstones.get(&uid));
            let own_version = record.and_then(|r| r.versions.get(&uid));
            // Another key's object, renamed or moved into this key's group.
            if own_tombstone.is_none() && own_version.is_none() && fam.elsewhere.contains(&uid) {
                continue;
            }
            obj.check = record.and_then(|r| r.checks.get(&uid)).cloned();
            match (obj.kind, own_tombstone, own_version) {
                // custos's own tombstone (the earliest, if a race left two);
                // under a dead identifier, another object is there now.
                (_, Some(&at), _)
                    if !obj.dead && fam.tombstone.as_ref().is_none_or(|(t, _, _)| at < *t) =>
                {
                    fam.tombstone = Some((at, uid, Some(obj.state)));
                }
                (ObjectKind::Tombstone(_), None, _) => fam.foreign_tombstones.push(uid),
                // The number custos gave it, whatever its Name says now.
                (_, None, Some(&v)) if versions => {
                    obj.kind = ObjectKind::Version(v);
                    obj.pinned = true;
                    fam.versions.push((v, obj));
                }
                (ObjectKind::Version(v), None, None) if versions => fam.versions.push((v, obj)),
                // An object someone else named like the key: not custos's to use.
                _ => {}
            }
        }
        Ok(())
    }

    /// The objects the record names that no Locate listed (renamed, moved
    /// out of the group, or gone), asked for by identifier: only the
    /// server's answer for that identifier says an object is gone.
    async fn recorded(
        &self,
        key: &KeyRef,
        fam: &mut Family,
        family_name: &str,
        record: &pins::KeyObjects,
    ) -> Result<(), KeyError> {
        for (uid, &v) in &record.versions {
            if fam.versions.iter().any(|(_, o)| &o.uid == uid) || fam.gone.contains(uid) {
                continue;
            }
            let dead = record.dead.contains(uid);
            if dead && !fam.unreadable_fatal {
                fam.gone.push(uid.clone());
                continue;
            }
            match self.object(key, family_name, uid).await {
                Ok(mut obj) => {
                    if is_destroyed(obj.state) {
                        fam.newly_dead.push(uid.clone());
                    }
                    obj.kind = ObjectKind::Version(v);
                    obj.pinned = true;
                    obj.dead = dead;
                    obj.check = record.checks.get(uid).cloned();
                    fam.versions.push((v, obj));
                }
                Err(KeyError::NotFound { .. }) => {
                    fam.gone.push(uid.clone());
                    fam.newly_dead.push(uid.clone());
                }
                Err(e) => return Err(e),
            }
        }
        if fam.tombstone.is_none()
            && let Some((at, uid)) = record.tombstone()
        {
            // A dead identifier holds another object now (custos created
            // one there since): the tombstone counts as gone, made again.
            let state = match self.attributes(key, uid).await {
                _ if record.dead.contains(uid) => None,
                Ok(a) => a.state,
                Err(KeyError::NotFound { .. }) => None,
                Err(e) => return Err(e),
            };
            fam.tombstone = Some((at, uid.to_owned(), state));
        }
        Ok(())
    }

    /// Every object of `key`, with its state, judged against the record;
    /// a key met for the first time is adopted.
    async fn family(&self, key: &KeyRef) -> Result<Family, KeyError> {
        self.family_adopting(key, true, false).await
    }

    /// As [`Self::family`]; with `adopt` false, versions of a key met for
    /// the first time stay unpinned (`create_key` never adopts: it makes).
    /// With `strict`, an object listed that custos may not read fails the
    /// read even if custos did not create it (a destruction).
    async fn family_adopting(
        &self,
        key: &KeyRef,
        adopt: bool,
        strict: bool,
    ) -> Result<Family, KeyError> {
        let id = KmipKeyId::parse(key.id()).map_err(|reason| super::InvalidKeyRef {
            input: key.to_string(),
            reason,
        })?;
        let entry = self.record_entry(key);
        let record = self.pins.get(&entry, &label(key))?;
        // Nothing of a key is judged on another server than its own; a
        // destruction asks the server again rather than trust the cache.
        if let Some(r) = &record {
            self.check_server(key, r, strict).await?;
        }
        let mut fam = Family {
            elsewhere: self.pins.others(&entry, &label(key))?,
            unreadable_fatal: strict,
            ..Family::default()
        };
        match &id {
            KmipKeyId::Name(name) => {
                let filters = [Filter::Group(key_group(name)), Filter::Name(name.clone())];
                self.gather(key, &mut fam, name, &filters, true, record.as_ref())
                    .await?;
            }
            KmipKeyId::Uid(uid) => {
                // The one object the customer named: custos's by configuration
                // (its material pinned at first sight), unless once gone.
                let dead = record.as_ref().is_some_and(|r| r.dead.contains(uid));
                let own = record
                    .as_ref()
                    .is_some_and(|r| r.versions.contains_key(uid));
                match self.object(key, "", uid).await {
                    Ok(_) if dead && !strict => {
                        fam.gone.push(uid.clone());
                    }
                    // Recorded as another key's object (or a marker): never
                    // taken for this key's at first sight.
                    Ok(_) if !own && fam.elsewhere.contains(uid) => {}
                    Ok(mut obj) => {
                        if is_destroyed(obj.state) {
                            fam.newly_dead.push(uid.clone());
                        }
                        obj.kind = ObjectKind::Version(1);
                        obj.claims = ObjectKind::Version(1);
                        obj.dead = dead;
                        obj.pinned = true;
                        obj.check = record.as_ref().and_then(|r| r.checks.get(uid)).cloned();
                        fam.versions.push((1, obj));
                    }
                    // Gone, if the record knows it (asked again below).
                    Err(KeyError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                // Always looked for: a tombstone beside a live object is an
                // interrupted destruction, and a re-run must reuse it.
                let marker = uid_group(uid);
                let filters = [Filter::Group(marker.clone()), Filter::Name(marker.clone())];
                self.gather(key, &mut fam, &marker, &filters, false, record.as_ref())
                    .await?;
            }
        }
        let family_name = match &id {
            KmipKeyId::Name(name) => name.clone(),
            KmipKeyId::Uid(uid) => uid_group(uid),
        };
        match &record {
            Some(r) => {
                self.recorded(key, &mut fam, &family_name, r).await?;
                if r.server.is_none() {
                    self.bind_legacy(key, &entry, &fam).await?;
                }
            }
            // First sight of the key: what is there is adopted, once.
            None if adopt && !fam.versions.is_empty() => {
                self.bind_new(key, &entry).await?;
                self.adopt(key, &entry, &mut fam).await?;
            }
            None => {}
        }
        // Identifiers are marked dead by a destruction alone: it asked the
        // server again whose marker's material answered just now. Any
        // other read may run on a cached verdict about the server (one a
        // DNS failover made stale), and a wrong dead mark would later let
        // a live version pass for a destroyed one.
        if strict && !fam.newly_dead.is_empty() {
            let dead = std::mem::take(&mut fam.newly_dead);
            self.record(key, |r| r.dead.extend(dead))?;
        }
        Ok(fam)
    }

    /// Records every version of a key met for the first time as custos's:
    /// a key made before the record existed, or by the customer.
    /// Their material is pinned as found too (a check value of each Active
    /// AES-256 version): the first sight is the one thing trusted.
    async fn adopt(&self, key: &KeyRef, entry: &str, fam: &mut Family) -> Result<(), KeyError> {
        for (_, o) in &mut fam.versions {
            o.pinned = true;
            if o.state == State::Active && o.aes_256 {
                o.check = Some(self.check_value(key, &o.uid).await?);
            }
        }
        let found: Vec<(String, u32, Option<String>)> = fam
            .versions
            .iter()
            .map(|(v, o)| (o.uid.clone(), *v, o.check.clone()))
            .collect();
        self.pins.update(entry, &label(key), |r| {
            for (uid, v, check) in &found {
                r.versions.entry(uid.clone()).or_insert(*v);
                if let Some(c) = check {
                    r.checks.entry(uid.clone()).or_insert_with(|| c.clone());
                }
            }
        })?;
        let uids: Vec<&str> = found.iter().map(|(u, _, _)| u.as_str()).collect();
        tracing::warn!(event = "kmip.versions_adopted", key = %key, objects = ?uids, "first use of {key} by this installation: its version objects {uids:?} are recorded as custos's as found");
        Ok(())
    }

    /// Records a version or tombstone custos just created, before it is
    /// activated or revoked: a crash after this leaves an object custos
    /// knows as its own.
    fn record(
        &self,
        key: &KeyRef,
        change: impl FnOnce(&mut pins::KeyObjects),
    ) -> Result<(), KeyError> {
        self.pins
            .update(&self.record_entry(key), &label(key), change)
            .map(drop)
    }

    fn not_found(&self, key: &KeyRef) -> KeyError {
        KeyError::NotFound {
            key: label(key),
            message: format!("no such key on KMIP server {}", self.server),
        }
    }

    fn info(&self, key: &KeyRef, fam: &Family) -> Result<KeyInfo, KeyError> {
        let state = fam.state().ok_or_else(|| self.not_found(key))?;
        Ok(KeyInfo {
            reference: key.clone(),
            key_id: key.to_string(),
            state,
            origin: KeyOrigin::Provider,
            current_version: fam.current().map(|(_, o)| o.uid.clone()),
            created_at: None,
            rotated_at: None,
        })
    }

    /// Why a key that is not Active cannot be used, as the suite's errors.
    fn unusable(&self, key: &KeyRef, state: State) -> KeyError {
        match state {
            State::Deactivated => KeyError::Disabled { key: label(key) },
            State::Destroyed | State::DestroyedCompromised => KeyError::Destroyed {
                key: label(key),
                destroyed_at: None,
            },
            other => KeyError::AccessDenied {
                key: label(key),
                message: format!("the key is {other:?} on the KMIP server, not Active"),
            },
        }
    }

    /// Refuses every use of a key whose destruction began: destroyed, or
    /// half destroyed (a second shred finishes it).
    fn refuse_if_destroying(&self, key: &KeyRef, fam: &Family) -> Result<(), KeyError> {
        match fam.state() {
            Some(KeyState::Destroyed { destroyed_at }) => Err(KeyError::Destroyed {
                key: label(key),
                destroyed_at,
            }),
            Some(KeyState::Other { name }) if fam.own_destruction_began() => {
                Err(KeyError::Unavailable {
                    key: label(key),
                    message: format!(
                        "its destruction did not finish ({name}): run the shred again"
                    ),
                })
            }
            _ if fam.destruction_began() => Err(self.foreign_tombstone(key, fam)),
            _ => Ok(()),
        }
    }

    /// A key refused for marks of destruction custos did not leave: never
    /// "run the shred again", which would destroy a live key.
    fn foreign_tombstone(&self, key: &KeyRef, fam: &Family) -> KeyError {
        KeyError::Unavailable {
            key: label(key),
            message: format!(
                "the KMIP server holds object(s) {:?} named as this key's tombstone or destroyed version, but custos did not leave them (they are not in its record of this key's objects): custos did not destroy this key, and refuses it until they are explained; do not run the shred because of them (it would destroy the live key); see docs/keys-you-hold.md",
                fam.foreign_marks()
            ),
        }
    }

    /// The current version, Active, or why there is none.
    async fn current(&self, key: &KeyRef) -> Result<Object, KeyError> {
        self.current_version(key).await.map(|(_, _, obj)| obj)
    }

    /// The family of `key`, and its current version (the highest custos
    /// made) with its number, activated if a creation left it Pre-Active;
    /// refused unless usable. A higher version custos did not make is
    /// never wrapped under: it is named in a warning, and left alone.
    async fn current_version(&self, key: &KeyRef) -> Result<(Family, u32, Object), KeyError> {
        let fam = self.family(key).await?;
        self.refuse_if_destroying(key, &fam)?;
        let current = fam.current().cloned();
        if let Some((v, obj)) = fam.newest()
            && !obj.pinned
        {
            tracing::warn!(event = "kmip.unknown_version", key = %key, version = v, object = %obj.uid, "object {} names itself version {v} of {key}, but custos did not create it: it is not wrapped under (see docs/keys-you-hold.md)", obj.uid);
        }
        match current {
            Some((v, obj)) if obj.state == State::Active => Ok((fam, v, obj)),
            // A Create whose Activate never ran (a crash in create_key or
            // rotate). It is not activated: custos takes a version's check
            // value once it is Active, so nothing proves the identifier
            // still names the object custos created (another client may
            // have destroyed it and Registered a value it knows under the
            // same identifier). A new version replaces it, as the
            // interrupted call meant; a shred destroys the orphan too.
            Some((v, obj)) if obj.state == State::PreActive => {
                let KmipKeyId::Name(name) =
                    KmipKeyId::parse(key.id()).map_err(|reason| super::InvalidKeyRef {
                        input: key.to_string(),
                        reason,
                    })?
                else {
                    return Err(self.orphan(key, v, &obj));
                };
                let next = self.next_number(key, &fam, v)?;
                tracing::warn!(event = "kmip.orphan_version", key = %key, version = v, object = %obj.uid, "version {v} of {key} (object {}) was left Pre-Active by an interrupted creation: not activated; version {next} replaces it", obj.uid);
                self.create_version(key, &name, next).await?;
                let fam = self.family(key).await?;
                match fam.current().cloned() {
                    Some((v, obj)) if obj.state == State::Active => Ok((fam, v, obj)),
                    _ => Err(self.orphan(key, v, &obj)),
                }
            }
            Some((_, obj)) => Err(self.unusable(key, obj.state)),
            None if !fam.versions.is_empty() => Err(self.no_custos_version(key, &fam)),
            None => Err(self.not_found(key)),
        }
    }

    /// The number of the version after `v`: the first above it that no
    /// object claims, so that its Name is free.
    fn next_number(&self, key: &KeyRef, fam: &Family, v: u32) -> Result<u32, KeyError> {
        let taken: HashSet<u32> = fam.versions.iter().map(|(v, _)| *v).collect();
        (v.saturating_add(1)..=u32::MAX)
            .find(|n| !taken.contains(n))
            .ok_or_else(|| KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!(
                    "version {v} of this key is the highest number there is: there is no next one"
                ),
            })
    }

    /// A Pre-Active version custos recorded but never pinned material of.
    fn orphan(&self, key: &KeyRef, v: u32, obj: &Object) -> KeyError {
        KeyError::Unavailable {
            key: label(key),
            message: format!(
                "version {v} (object {:?}) was left Pre-Active by an interrupted creation, before custos took its key check value: custos does not activate it (nothing proves the identifier still names the object it created); rotate --cmk makes a new version of a kmip:name/<n> key, rotate --replace-cmk moves a kmip:<uid> key's tenant to another key (a shred destroys this one too)",
                obj.uid
            ),
        }
    }

    /// Only objects custos did not create carry the key's version names.
    fn no_custos_version(&self, key: &KeyRef, fam: &Family) -> KeyError {
        let found: Vec<&str> = fam.versions.iter().map(|(_, o)| o.uid.as_str()).collect();
        KeyError::AccessDenied {
            key: label(key),
            message: format!(
                "the KMIP server lists objects {found:?} as versions of this key, but custos did not create any of them (they are not in its record of this key's objects): it wraps only under a version it created; see docs/keys-you-hold.md"
            ),
        }
    }

    async fn create_version(&self, key: &KeyRef, name: &str, v: u32) -> Result<String, KeyError> {
        // The key's first object binds it to this server (a record that
        // exists was bound, or refused, by the family read before); the
        // server is asked afresh before and after (see `still_on_own_server`).
        self.still_on_own_server(key).await?;
        self.bind_new(key, &self.record_entry(key)).await?;
        let uid = self
            .create(
                key,
                Template {
                    bits: 256,
                    // Encrypt | Decrypt: the only uses custos makes of the key.
                    usage_mask: USAGE_ENCRYPT | USAGE_DECRYPT,
                    names: vec![version_name(name, v)],
                    group: key_group(name),
                    sensitive: true,
                },
            )
            .await?;
        // Recorded before it is activated: a crash in between leaves a
        // Pre-Active version custos knows (never activated: replaced).
        self.record(key, |r| {
            r.versions.insert(uid.clone(), v);
        })?;
        self.simple(key, "Activate", Request::Activate(uid.clone()))
            .await?;
        self.pin_material(key, &uid).await?;
        self.still_on_own_server(key).await?;
        self.pins.bury(&self.record_entry(key), &uid, &label(key))?;
        tracing::info!(event = "kmip.key_created", key = %key, version = v, object = %uid, "created version {v} of {key} on the KMIP server");
        Ok(uid)
    }

    /// Create of an AES key, Sensitive (KMIP 1.4) where the server takes
    /// it: one that refuses the attribute or the version gets the Create
    /// again without it, and custos says so once.
    async fn create(&self, key: &KeyRef, mut template: Template) -> Result<String, KeyError> {
        template.sensitive = !self.insensitive.load(Ordering::Relaxed);
        let first = self.call(Request::Create(template.clone())).await;
        let answer = match first {
            Err(WireError::Failed {
                reason: Some(r),
                message,
            }) if template.sensitive && version_or_attribute_refused(r) => {
                template.sensitive = false;
                let again = self.call(Request::Create(template)).await;
                if again.is_ok() {
                    self.insensitive.store(true, Ordering::Relaxed);
                    tracing::warn!(event = "kmip.sensitive_unsupported", server = %self.server, "the KMIP server {} refused a Create with Sensitive = true (KMIP 1.4; {r:?}: {message}): custos creates its objects without it, so only the server's own policy keeps their value from a Get; see docs/keys-you-hold.md", self.server);
                }
                again
            }
            other => other,
        };
        match answer {
            Ok(Response::Created(uid)) => Ok(uid),
            Ok(_) => Err(self.wrong_answer(key, "Create")),
            Err(e) => Err(self.err(key, "Create", e)),
        }
    }

    /// Revokes `uid`. A key-compromise revocation carries its Compromise
    /// Occurrence Date (`compromised_at`, Unix seconds), which KMIP requires
    /// with that reason.
    async fn revoke(
        &self,
        key: &KeyRef,
        uid: &str,
        reason: RevocationReasonCode,
        compromised_at: Option<i64>,
    ) -> Result<(), KeyError> {
        let req = Request::Revoke {
            uid: uid.to_owned(),
            reason,
            compromised_at,
        };
        self.simple(key, "Revoke", req).await
    }

    /// Revoke for Cessation of Operation: Active → Deactivated.
    async fn deactivate(&self, key: &KeyRef, uid: &str) -> Result<(), KeyError> {
        self.revoke(key, uid, RevocationReasonCode::CessationOfOperation, None)
            .await
    }

    async fn crypt(
        &self,
        decrypt: bool,
        uid: &str,
        cipher: Cipher,
        iv: [u8; 16],
        data: Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, WireError> {
        let sent_len = data.len();
        let req = Request::Crypt {
            decrypt,
            uid: uid.to_owned(),
            cipher,
            iv,
            data,
        };
        let (used, out, used_iv) = match self.call(req).await? {
            Response::Data { uid, data, iv } => (uid, data, iv),
            _ => {
                return Err(WireError::Protocol(
                    "the server answered another operation".into(),
                ));
            }
        };
        // A server that used another key than the one asked for would
        // leave an envelope naming a key that cannot open it.
        if used != uid {
            return Err(WireError::Protocol(format!(
                "asked to use object {uid:?}, the server answered for object {used:?}"
            )));
        }
        // custos chose the IV (or initial counter) and the envelope records
        // that one: a server that says it used another cannot be believed.
        if let Some(other) = used_iv.filter(|v| v.as_slice() != iv) {
            return Err(WireError::Protocol(format!(
                "the server answered an IV/counter of {} bytes other than the one custos sent",
                other.len()
            )));
        }
        // Without padding, the output is as long as the input.
        if cipher != Cipher::CbcPkcs5 && out.len() != sent_len {
            return Err(WireError::Protocol(format!(
                "the server's {} of {sent_len} bytes returned {} bytes",
                if decrypt { "Decrypt" } else { "Encrypt" },
                out.len()
            )));
        }
        Ok(out)
    }

    /// The server's Encrypt of `wk` under version `uid`: CBC without padding,
    /// or CTR on a server that refuses unpadded CBC (the first wrap finds out).
    async fn encrypt_wk(
        &self,
        key: &KeyRef,
        uid: &str,
        wk: &SecretKey,
    ) -> Result<(Cipher, [u8; 16], Zeroizing<Vec<u8>>), KeyError> {
        self.server_encrypt(key, uid, wk.expose(), None).await
    }

    /// The key check value of object `uid`: the server's AES of the
    /// all-zero block, CBC from a zero IV or CTR from a zero counter, both
    /// AES_K(0) whatever mode the server offers. All 16 bytes: fewer would
    /// let whoever Registers a key search for one that matches. As its
    /// fingerprint: the value itself is the GCM hash subkey.
    async fn check_value(&self, key: &KeyRef, uid: &str) -> Result<String, KeyError> {
        let (_, _, out) = self
            .server_encrypt(key, uid, &[0; 16], Some([0; 16]))
            .await?;
        Ok(crate::keys::object_record::fingerprint(out.as_slice()))
    }

    /// Takes the check value of a version custos just created (or activated
    /// after creating it) and records it.
    async fn pin_material(&self, key: &KeyRef, uid: &str) -> Result<String, KeyError> {
        let check = self.check_value(key, uid).await?;
        self.record(key, |r| {
            r.checks.insert(uid.to_owned(), check.clone());
        })?;
        Ok(check)
    }

    /// Refuses to wrap under `obj` unless it still holds the material custos
    /// pinned: an identifier the server freed and gave to another object
    /// (PyKMIP reuses the top one after a Destroy) fails here, and is never
    /// trusted again.
    async fn check_material(&self, key: &KeyRef, obj: &Object) -> Result<(), KeyError> {
        let Some(pinned) = &obj.check else {
            return Err(KeyError::Unavailable {
                key: label(key),
                message: format!(
                    "version object {:?} was recorded before custos pinned key material (no check value): custos no longer wraps under it (old envelopes still unwrap); rotate --cmk makes a version it pins; see docs/keys-you-hold.md",
                    obj.uid
                ),
            });
        };
        let now = self.check_value(key, &obj.uid).await?;
        if &now == pinned {
            return Ok(());
        }
        tracing::error!(event = "kmip.material_changed", key = %key, object = %obj.uid, "object {} of {key} no longer holds the key material custos created: the identifier now names another object (or [kmip] server another key manager); refused", obj.uid);
        Err(KeyError::AccessDenied {
            key: label(key),
            message: format!(
                "KMIP object {:?} no longer holds the key material custos pinned for this version (its key check value changed): the server gave its identifier to another object; custos does not wrap under it (rotate --cmk makes a new version)",
                obj.uid
            ),
        })
    }

    /// The server's Encrypt of `plain` under `uid`: CBC without padding, or
    /// CTR on a server that refuses unpadded CBC (the first call finds out);
    /// from `fixed_iv`, or from a fresh IV/counter.
    async fn server_encrypt(
        &self,
        key: &KeyRef,
        uid: &str,
        data: &[u8],
        fixed_iv: Option<[u8; 16]>,
    ) -> Result<(Cipher, [u8; 16], Zeroizing<Vec<u8>>), KeyError> {
        let plain = || Zeroizing::new(data.to_vec());
        let mode = self.wrap_mode.load(Ordering::Relaxed);
        if mode != MODE_CTR {
            let iv = fixed_iv.unwrap_or_else(crate::util::random_bytes::<16>);
            match self.crypt(false, uid, Cipher::Cbc, iv, plain()).await {
                Ok(ct) => {
                    self.wrap_mode.store(MODE_CBC, Ordering::Relaxed);
                    return Ok((Cipher::Cbc, iv, ct));
                }
                // The server refused the parameters: try CTR, once per process.
                Err(WireError::Failed {
                    reason: Some(r), ..
                }) if mode == MODE_UNKNOWN && !refusal_of_the_key(r) => {}
                Err(e) => return Err(self.explain_encrypt(key, uid, e).await),
            }
        }
        let iv = fixed_iv.unwrap_or_else(envelope::ctr_iv);
        match self.crypt(false, uid, Cipher::Ctr, iv, plain()).await {
            Ok(ct) => {
                if mode == MODE_UNKNOWN {
                    tracing::info!(event = "kmip.wrap_mode", server = %self.server, "the KMIP server {} offers no AES-CBC without padding: wrapping keys are encrypted with AES-CTR", self.server);
                }
                self.wrap_mode.store(MODE_CTR, Ordering::Relaxed);
                Ok((Cipher::Ctr, iv, ct))
            }
            Err(e) => Err(self.explain_encrypt(key, uid, e).await),
        }
    }

    /// Why an Encrypt failed, from the object's state: a revoked key is
    /// Disabled, a destroyed one Destroyed. (Encrypt only: it carries
    /// custos's own fresh WK, so its failure says nothing about stored data.)
    async fn explain_encrypt(&self, key: &KeyRef, uid: &str, e: WireError) -> KeyError {
        if !matches!(e, WireError::Failed { .. }) {
            return self.err(key, "Encrypt", e);
        }
        let plain = self.err(key, "Encrypt", e);
        match self.attributes(key, uid).await {
            Ok(a) if a.state == Some(State::Active) => plain,
            Ok(a) => self.unusable(key, a.state.unwrap_or(State::Compromised)),
            Err(KeyError::NotFound { .. }) => KeyError::Destroyed {
                key: label(key),
                destroyed_at: None,
            },
            Err(_) => plain,
        }
    }

    async fn wrap_under(
        &self,
        key: &KeyRef,
        obj: &Object,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        if !obj.aes_256 {
            return Err(KeyError::AccessDenied {
                key: label(key),
                message: format!(
                    "object {:?} on the KMIP server is not an AES-256 key: custos wraps only under AES-256",
                    obj.uid
                ),
            });
        }
        self.check_material(key, obj).await?;
        let wk = SecretKey::generate();
        let (cipher, iv, wk_ct) = self.encrypt_wk(key, &obj.uid, &wk).await?;
        // A server whose "Encrypt" returns its input would leave the
        // wrapping key, and so the data key, in the clear in the store.
        if wk_ct.as_slice() == wk.expose().as_slice() {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: "the KMIP server's Encrypt returned the wrapping key unchanged".into(),
            });
        }
        // Once per wrap: what the server encrypted must decrypt to WK under
        // the same object, or no envelope is written that could not open.
        let back = self
            .crypt(true, &obj.uid, cipher, iv, Zeroizing::new(wk_ct.to_vec()))
            .await
            .map_err(|e| self.err(key, "Decrypt (checking the wrap)", e))?;
        if back.as_slice() != wk.expose().as_slice() {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!(
                    "the KMIP server's Decrypt under object {:?} does not give back the wrapping key it just encrypted: no envelope written",
                    obj.uid
                ),
            });
        }
        // The identifier may have been given to other material between the
        // check above and the Encrypt (a Destroy and a Register in between):
        // checked again, so that two matching check values bracket the wrap.
        self.check_material(key, obj).await?;
        let server = envelope::ServerWrap {
            cipher,
            uid: &obj.uid,
            iv,
            wk_ct: &wk_ct,
        };
        let nonce = crate::util::random_bytes::<12>();
        let ciphertext =
            envelope::seal(&server, &wk, data_key, ctx, nonce).map_err(|m| KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: m,
            })?;
        Ok(WrappedKey {
            key_id: key.to_string(),
            key_version: Some(obj.uid.clone()),
            ciphertext,
        })
    }
}

/// The answers of a server that does not take a KMIP 1.4 message or its
/// Sensitive attribute; any other refusal of a Create is its own error.
fn version_or_attribute_refused(r: ResultReason) -> bool {
    matches!(
        r,
        ResultReason::InvalidMessage
            | ResultReason::OperationNotSupported
            | ResultReason::FeatureNotSupported
            | ResultReason::InvalidField
    )
}

/// Failures that concern the key or the client, not the Encrypt parameters.
fn refusal_of_the_key(r: ResultReason) -> bool {
    matches!(
        r,
        ResultReason::ItemNotFound
            | ResultReason::PermissionDenied
            | ResultReason::AuthenticationNotSuccessful
    )
}

#[async_trait]
impl KeyProvider for KmipProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Kmip
    }

    fn custody(&self, _key: &KeyRef) -> Custody {
        Custody {
            provider: ProviderKind::Kmip,
            holder: format!("KMIP key manager {}", self.server),
            details: BTreeMap::from([("server".to_owned(), self.server.clone())]),
            network: true,
        }
    }

    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let fam = self.family(key).await?;
        self.info(key, &fam)
    }

    /// Create + Activate of version 1 of a `kmip:name/<n>` key; idempotent
    /// when the key exists. A destroyed name is not reused.
    async fn create_key(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let name = match KmipKeyId::parse(key.id()) {
            Ok(KmipKeyId::Name(n)) => n,
            Ok(KmipKeyId::Uid(_)) => {
                return Err(KeyError::Unsupported {
                    provider: PROVIDER,
                    operation: "creating a key by unique identifier (the key manager assigns identifiers): use a kmip:name/<name> reference with --create-key",
                });
            }
            Err(reason) => {
                return Err(KeyError::InvalidReference(super::InvalidKeyRef {
                    input: key.to_string(),
                    reason,
                }));
            }
        };
        // Objects already under the name that custos has no record of are
        // refused by name below, never adopted by the call meant to create.
        let fam = self.family_adopting(key, false, false).await?;
        // Any tombstone, custos's or not: a destroyed name is not reused.
        // Beside a live version, one custos did not leave is no destruction.
        if fam.own_destruction_began() || (fam.destruction_began() && fam.live().next().is_none()) {
            return Err(KeyError::Destroyed {
                key: label(key),
                destroyed_at: fam.destroyed_at(),
            });
        }
        if fam.destruction_began() {
            return Err(self.foreign_tombstone(key, &fam));
        }
        match fam.current() {
            None if fam.versions.is_empty() => {
                self.create_version(key, &name, 1).await?;
            }
            None => return Err(self.no_custos_version(key, &fam)),
            // An earlier creation stopped between Create and Activate.
            Some((_, obj)) if obj.state == State::PreActive => {
                self.current(key).await?;
            }
            Some(_) => {}
        }
        self.describe(key).await
    }

    async fn generate_data_key(
        &self,
        key: &KeyRef,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        let obj = self.current(key).await?;
        let dk = SecretKey::generate();
        let wrapped = self.wrap_under(key, &obj, &dk, ctx).await?;
        Ok((dk, wrapped))
    }

    async fn wrap(
        &self,
        key: &KeyRef,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        let obj = self.current(key).await?;
        self.wrap_under(key, &obj, data_key, ctx).await
    }

    /// The same calls whatever is wrong with the envelope (the family's
    /// Locates and GetAttributes, one Decrypt), and in format 2 one answer
    /// for any changed byte: the local GCM tag's.
    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError> {
        let invalid = |message: String| KeyError::InvalidCiphertext {
            key: label(key),
            message,
        };
        let env = envelope::Envelope::parse(&wrapped.ciphertext).map_err(invalid)?;
        if wrapped.key_version.as_deref().is_some_and(|v| v != env.uid) {
            return Err(invalid(
                "the envelope's key version does not match its ciphertext".into(),
            ));
        }
        // The key as a whole first (disabled, destroyed or half destroyed
        // refuses), then the version: a server that follows KMIP still
        // decrypts with a Deactivated object, so custos checks the state
        // itself rather than relying on the server's refusal.
        let fam = self.family(key).await?;
        self.refuse_if_destroying(key, &fam)?;
        // A version custos knows that the server, asked by identifier, no
        // longer holds: destroyed (out of band, or by a shred elsewhere).
        if fam.gone.iter().any(|g| g == env.uid) {
            return Err(KeyError::Destroyed {
                key: label(key),
                destroyed_at: fam.destroyed_at(),
            });
        }
        let Some((_, version)) = fam.versions.iter().find(|(_, o)| o.uid == env.uid) else {
            if let Some((_, current)) = fam.current()
                && current.state != State::Active
            {
                return Err(self.unusable(key, current.state));
            }
            if fam.versions.is_empty() {
                return Err(self.not_found(key));
            }
            return Err(invalid(format!(
                "the envelope was wrapped by object {:?}, which is not a version of this key",
                env.uid
            )));
        };
        if version.state != State::Active {
            return Err(self.unusable(key, version.state));
        }
        let data = Zeroizing::new(env.wk_ct.to_vec());
        let wk = match self.crypt(true, env.uid, env.cipher, env.iv, data).await {
            Ok(wk) => wk,
            // Listed a moment ago: destroyed since.
            Err(WireError::Failed {
                reason: Some(ResultReason::ItemNotFound),
                ..
            }) => {
                return Err(KeyError::Destroyed {
                    key: label(key),
                    destroyed_at: None,
                });
            }
            // Format 1: the server's padding check refused it; the same
            // words as a seal that does not open, and no further call.
            // Format 2: the server accepts any 32 bytes, so only the mode
            // (which is no secret) can be refused.
            Err(WireError::Failed { reason, message })
                if !reason.is_some_and(refusal_of_the_key) =>
            {
                return Err(invalid(match env.cipher {
                    Cipher::CbcPkcs5 => envelope::REFUSED.to_owned(),
                    mode => format!(
                        "the KMIP server refused to decrypt with the envelope's mode ({mode:?}): {message}; the envelope was altered, or the server no longer offers that mode"
                    ),
                }));
            }
            Err(e) => return Err(self.err(key, "Decrypt", e)),
        };
        // Format 1: a plaintext of the wrong length means the PKCS#5 padding
        // was valid but not a full block's: answering that differently from
        // a refused padding would be a padding oracle for whoever can write
        // envelopes and read the job's error kind. One answer for both.
        if wk.len() != crate::keys::KEY_LEN && env.cipher == Cipher::CbcPkcs5 {
            return Err(invalid(envelope::REFUSED.to_owned()));
        }
        if wk.len() != crate::keys::KEY_LEN {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!(
                    "the KMIP server's Decrypt of a wrapping key returned {} bytes, not {}",
                    wk.len(),
                    crate::keys::KEY_LEN
                ),
            });
        }
        env.open(&wk, ctx).map_err(invalid)
    }

    /// A new version object (Create, Activate), current from now on.
    async fn rotate(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let name = match KmipKeyId::parse(key.id()) {
            Ok(KmipKeyId::Name(n)) => n,
            _ => {
                return Err(KeyError::Unsupported {
                    provider: PROVIDER,
                    operation: "rotating a key named by unique identifier (a new version is a new object): use a kmip:name/<name> key, or rotate --replace-cmk",
                });
            }
        };
        // The number comes from the family just read, not from a cache that
        // another key reference naming the same object could have filled:
        // the next after the highest version custos recorded (an object
        // planted as `<n>@v4294967295` cannot use the numbers up), skipping
        // numbers an object already claims, so that the Name is free.
        let (fam, v, _) = self.current_version(key).await?;
        let next = self.next_number(key, &fam, v)?;
        self.create_version(key, &name, next).await?;
        self.describe(key).await
    }

    /// Revoke (Cessation of Operation) of every Active version: Deactivated.
    async fn disable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let fam = self.family(key).await?;
        if fam.versions.is_empty() {
            return self.info(key, &fam);
        }
        for (_, obj) in &fam.versions {
            if obj.state == State::Active {
                self.deactivate(key, &obj.uid).await?;
            }
        }
        self.describe(key).await
    }

    async fn enable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let _ = key;
        Err(KeyError::Unsupported {
            provider: PROVIDER,
            operation: "enable: KMIP has no way back from Deactivated (Revoke is final); wrap under a new key (rotate --replace-cmk) instead",
        })
    }

    /// Revoke (where Active), then Destroy, every version; then each one,
    /// asked for by its identifier, must be gone or Destroyed. First of
    /// all, a tombstone object is created (never activated, revoked as
    /// compromised, so it can never encrypt or decrypt) whose Name and
    /// Object Group record the key and the time of destruction: servers
    /// such as PyKMIP delete destroyed objects, and `describe` on another
    /// installation must still tell a destroyed key from one that never
    /// existed. The tombstone and the time are in custos's record too,
    /// which alone dates the destruction (anyone can name an object like a
    /// tombstone). Immediate and irreversible; idempotent: a run again, also
    /// after a crash half-way, reuses custos's own tombstone, revoked as a
    /// fresh one is, and ends in the same state as one clean run.
    async fn destroy(
        &self,
        key: &KeyRef,
        _pending_window_days: u32,
    ) -> Result<Destruction, KeyError> {
        let id = KmipKeyId::parse(key.id()).map_err(|reason| super::InvalidKeyRef {
            input: key.to_string(),
            reason,
        })?;
        let mut fam = self.family_adopting(key, true, true).await?;
        // What is under each identifier custos recorded, judged before
        // anything is destroyed: its version (destroyed), another object the
        // server gave a freed identifier (left alone, and no proof asked of
        // it), or neither can be told (the shred stops, naming it).
        let mut reused = Vec::new();
        for (v, obj) in fam.versions.iter().filter(|(_, o)| o.pinned) {
            match self.identity(key, &id, *v, obj).await? {
                Identity::Version => {}
                Identity::Reused => reused.push(obj.uid.clone()),
                Identity::Unknown => return Err(self.unknown_identity(key, obj)),
            }
        }
        fam.versions.retain(|(_, o)| !reused.contains(&o.uid));
        for uid in &reused {
            tracing::warn!(event = "kmip.reused_identifier_left_alone", key = %key, object = %uid, "object {uid} is under an identifier custos recorded for {key}, but does not hold its version (another object the server gave the freed identifier): not destroyed, not listed");
        }
        let known = fam.known_uids();
        // Nothing custos knows of, and no tombstone of its own: absence
        // proves nothing (a Locate finds no object renamed or moved away).
        if known.is_empty() && fam.tombstone.is_none() {
            return Err(self.not_found(key));
        }
        // The tombstone first: a crash after the Destroys below must still
        // leave the record that tells this key's destruction from a key that
        // never existed.
        let at = match fam.tombstone.take() {
            Some((at, uid, Some(state))) => {
                self.settle_tombstone(key, &uid, state, at).await?;
                at
            }
            // custos's tombstone was deleted: made again, with its time.
            Some((at, _, None)) => {
                self.new_tombstone(key, &id, at).await?;
                at
            }
            None => {
                let at = Utc::now().timestamp();
                self.new_tombstone(key, &id, at).await?;
                at
            }
        };
        // custos's own versions first, then the objects someone else named
        // as versions (oldest first); a version already destroyed (a re-run,
        // on a server that keeps destroyed objects) is only checked below.
        // An object custos did not create that refuses its Revoke or
        // Destroy does not block the shred of custos's own: it is named at
        // the end and not listed as destroyed.
        fam.versions.sort_by_key(|(v, o)| (!o.pinned, *v));
        let mut refused: Vec<(String, KeyError)> = Vec::new();
        for (_, obj) in &fam.versions {
            if is_destroyed(obj.state) {
                continue;
            }
            match self.revoke_and_destroy(key, obj).await {
                Ok(()) => {}
                Err(e) if !obj.pinned => refused.push((obj.uid.clone(), e)),
                Err(e) => return Err(e),
            }
        }
        let known: Vec<String> = known
            .into_iter()
            .filter(|u| !refused.iter().any(|(r, _)| r == u))
            .collect();
        // The proof, per identifier: the server's answer for each object
        // custos knows (listed before, or in its record), never a Locate's
        // silence.
        let mut left = Vec::new();
        for uid in &known {
            match self.attributes(key, uid).await {
                Err(KeyError::NotFound { .. }) => {}
                Ok(a) if a.state.is_some_and(is_destroyed) => {}
                Ok(a) => left.push(format!("{uid} ({:?})", a.state)),
                Err(e) => return Err(e),
            }
        }
        // And no version appeared meanwhile (the tenant is fenced first).
        let after = self.family(key).await?;
        left.extend(
            after
                .live()
                .filter(|(_, o)| !known.contains(&o.uid) && !reused.contains(&o.uid))
                .filter(|(_, o)| !refused.iter().any(|(r, _)| r == &o.uid))
                .map(|(_, o)| format!("{} ({:?})", o.uid, o.state)),
        );
        // The answers above came from the key's own key manager only if it
        // still gives its marker now (it did at this shred's start).
        self.still_on_own_server(key).await?;
        if !left.is_empty() {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!(
                    "after Destroy the KMIP server still holds version object(s) that are not Destroyed: {}",
                    left.join(", ")
                ),
            });
        }
        for (uid, e) in &refused {
            tracing::warn!(event = "kmip.foreign_object_not_destroyed", key = %key, object = %uid, "object {uid} is named as a version of {key} but custos did not create it, and the KMIP server refused to revoke or destroy it ({e}): custos's own versions are destroyed; this object is not listed as destroyed; remove it on the key manager");
        }
        // Recorded versions the server no longer held when this shred began
        // (destroyed before, by a shred that stopped half-way or out of
        // band): proven gone, not destroyed by this run.
        for uid in &fam.gone {
            tracing::info!(event = "kmip.object_found_absent", key = %key, object = %uid, "version object {uid} of {key} was already absent when this shred began");
        }
        // Proven gone on the server whose marker answered at the start of
        // this shred: never versions of this key again, whatever the server
        // later puts under these identifiers.
        self.record(key, |r| r.dead.extend(known.iter().chain(&reused).cloned()))?;
        let when = time(at).unwrap_or_else(Utc::now);
        Ok(Destruction {
            action: DestroyAction::RevokedAndDestroyed,
            state_after: KeyState::Destroyed {
                destroyed_at: Some(when),
            },
            effective_at: when,
            objects: known,
        })
    }
}

/// What is under an identifier custos recorded as a version.
enum Identity {
    /// The version: its material answers, or it carries the version's Name.
    Version,
    /// Another object the server gave the freed identifier.
    Reused,
    /// Neither can be told.
    Unknown,
}

impl KmipProvider {
    /// What object `obj`, under the identifier custos recorded for version
    /// `v`, is: by its material where it can still encrypt and custos
    /// pinned a check value (the only proof), else by its Name (the Name
    /// custos gave it, or by configuration for a `kmip:<uid>` key). An
    /// object with neither under an identifier a destruction proved gone
    /// is another object; under a live identifier it may be custos's
    /// version renamed to survive the shred, or another object: unknown.
    /// So is other material under the version's Name.
    async fn identity(
        &self,
        key: &KeyRef,
        id: &KmipKeyId,
        v: u32,
        obj: &Object,
    ) -> Result<Identity, KeyError> {
        let named = match id {
            // By configuration, unless the identifier is dead: a shred
            // proved it gone, or custos since created another object under
            // it (see `pins::Pins::bury`).
            KmipKeyId::Uid(_) => !obj.dead,
            KmipKeyId::Name(_) => obj.claims == ObjectKind::Version(v),
        };
        if obj.state == State::Active
            && let Some(pinned) = &obj.check
        {
            // Other material under the version's own Name is not taken for
            // another object on one answer (a server whose CTR and CBC
            // disagree would answer so for every version): the shred stops.
            return Ok(
                match (&self.check_value(key, &obj.uid).await? == pinned, named) {
                    (true, _) => Identity::Version,
                    (false, false) => Identity::Reused,
                    (false, true) => Identity::Unknown,
                },
            );
        }
        Ok(match (named, obj.dead) {
            (true, _) => Identity::Version,
            (false, true) => Identity::Reused,
            (false, false) => Identity::Unknown,
        })
    }

    fn unknown_identity(&self, key: &KeyRef, obj: &Object) -> KeyError {
        let what = match obj.state {
            State::Active => "it carries the version's Name but answers another key check value than the one custos pinned: another object registered under the version's identifier and Name, or a server whose modes disagree".to_owned(),
            state => format!("it is {state:?} (so its key check value cannot be asked) and no longer carries the version's Name: custos's version renamed, or another object the server gave the identifier after the version was deleted behind custos"),
        };
        KeyError::Unavailable {
            key: label(key),
            message: format!(
                "object {:?} is under an identifier custos recorded as a version of this key, but {what}. custos destroys nothing on a guess; check the object on the key manager (destroy it there if it is this key's), then run the shred again; see docs/keys-you-hold.md",
                obj.uid
            ),
        }
    }

    /// Revoke (where Active), then Destroy, of one version; already gone
    /// is as good.
    async fn revoke_and_destroy(&self, key: &KeyRef, obj: &Object) -> Result<(), KeyError> {
        if obj.state == State::Active {
            self.deactivate(key, &obj.uid).await?;
        }
        match self
            .simple(key, "Destroy", Request::Destroy(obj.uid.clone()))
            .await
        {
            Ok(()) | Err(KeyError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        tracing::info!(event = "kmip.object_destroyed", key = %key, object = %obj.uid, "revoked and destroyed {} of {key}", obj.uid);
        Ok(())
    }

    /// Creates the tombstone of `key` destroyed at `at`, records it, then
    /// revokes it.
    async fn new_tombstone(&self, key: &KeyRef, id: &KmipKeyId, at: i64) -> Result<(), KeyError> {
        let (family_name, group) = match id {
            KmipKeyId::Name(n) => (n.clone(), key_group(n)),
            KmipKeyId::Uid(u) => (uid_group(u), uid_group(u)),
        };
        let tomb = self
            .create(
                key,
                Template {
                    bits: 128,
                    // No use at all (the server insists on a mask).
                    usage_mask: 0,
                    names: vec![tombstone_name(&family_name, at)],
                    group,
                    sensitive: true,
                },
            )
            .await?;
        self.record(key, |r| {
            r.tombstones.insert(tomb.clone(), at);
        })?;
        self.settle_tombstone(key, &tomb, State::PreActive, at)
            .await
    }

    /// Revokes custos's tombstone as compromised unless it already is: a
    /// tombstone reused by a re-run (a crash after its Create) ends as a
    /// fresh one does, unable to encrypt or decrypt.
    async fn settle_tombstone(
        &self,
        key: &KeyRef,
        uid: &str,
        state: State,
        at: i64,
    ) -> Result<(), KeyError> {
        if matches!(
            state,
            State::Compromised | State::DestroyedCompromised | State::Destroyed
        ) {
            return Ok(());
        }
        self.revoke(key, uid, RevocationReasonCode::KeyCompromise, Some(at))
            .await
    }
}

#[cfg(test)]
mod tests;
