//! The KMIP key provider: CMKs live on the customer's key manager and are
//! used only through its Encrypt and Decrypt operations, over TLS with a
//! client certificate. custos never fetches key material (no Get).
//!
//! # Wrapping (docs/FORMAT.md §3, "KMIP envelope")
//!
//! Not every key manager binds associated data: the PyKMIP server refuses
//! AES-GCM. So custos binds the [`WrapContext`] itself, the same way on every
//! server: per wrap it draws a fresh 32-byte wrapping key WK, asks the server
//! to encrypt WK under the CMK (AES-256-CBC, PKCS#5 padding, a random IV), and
//! seals the data key locally with AES-256-GCM under WK, with associated data
//! naming the format, the CMK version object and the context. Unwrapping asks
//! the server to decrypt WK, then opens the seal: a wrong tenant, purpose or
//! epoch, or any changed byte, fails the GCM tag ([`KeyError::InvalidCiphertext`]),
//! and nothing unwraps without the server. WK is zeroized after use.
//!
//! # Versions (rotation)
//!
//! KMIP's Re-key is optional and PyKMIP lacks it, so a version is an object
//! of its own. Key `kmip:name/<n>` is every object that carries the Name
//! `<n>`; version `k` also carries the Name `<n>@v<k>`. The current version
//! is the highest. `rotate` creates (Create, Activate) version k+1; old
//! versions stay Active for unwrapping. A `kmip:<unique-identifier>` key is
//! one object the customer made: it has one version and cannot be rotated
//! or created by custos (the key manager assigns identifiers).
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
mod reference;
mod settings;
mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kmip_protocol::types::common::{
    AttributeIndex, AttributeName, AttributeValue, CompromiseOccurrenceDate,
    CryptographicAlgorithm, ObjectType, RevocationReasonCode, State, UniqueIdentifier,
};
use kmip_protocol::types::request::{self as req, RequestPayload, RevocationReason};
use kmip_protocol::types::response::{ResponsePayload, ResultReason};
use zeroize::Zeroizing;

pub use reference::KmipKeyId;
pub use settings::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_OPERATION_TIMEOUT, KmipSettings,
};

use super::{
    Custody, DataKey, DestroyAction, Destruction, KeyError, KeyInfo, KeyOrigin, KeyProvider,
    KeyRef, KeyState, ProviderKind, SecretKey, WrapContext, WrappedKey,
};
use wire::{Request, Response, Transport, WireError};

const PROVIDER: &str = "kmip";

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectKind {
    Version(u32),
    /// Left by `destroy`: the key was destroyed at this time (seconds).
    Tombstone(i64),
    /// Carries the key's Name but no custos version name (made by someone else).
    Foreign,
}

/// What the key manager holds of one key.
#[derive(Debug)]
struct Family {
    versions: Vec<(u32, Object)>,
    tombstone: Option<(i64, String)>,
}

fn is_destroyed(state: State) -> bool {
    matches!(state, State::Destroyed | State::DestroyedCompromised)
}

impl Family {
    fn current(&self) -> Option<&(u32, Object)> {
        self.versions.iter().max_by_key(|(v, _)| *v)
    }

    /// Versions whose material still exists on the server. A server that
    /// follows KMIP keeps a destroyed object (State Destroyed) and lists it;
    /// PyKMIP deletes it.
    fn live(&self) -> impl Iterator<Item = &(u32, Object)> {
        self.versions.iter().filter(|(_, o)| !is_destroyed(o.state))
    }

    /// A destruction began: there is a tombstone, or some version is destroyed.
    fn destruction_began(&self) -> bool {
        self.tombstone.is_some() || self.versions.iter().any(|(_, o)| is_destroyed(o.state))
    }

    /// The key's state over all its versions, never the newest alone: a
    /// destruction that stopped half-way (a crash, a refused Destroy) leaves
    /// older versions that still decrypt, and must not read as destroyed.
    fn state(&self) -> Option<KeyState> {
        if self.destruction_began() {
            return Some(match self.live().next() {
                None => KeyState::Destroyed {
                    destroyed_at: self.tombstone.as_ref().and_then(|(at, _)| time(*at)),
                },
                Some(_) => KeyState::Other {
                    name: "destroy_incomplete".into(),
                },
            });
        }
        self.current().map(|(_, o)| state_of(o.state))
    }
}

/// The KMIP [`KeyProvider`].
pub struct KmipProvider {
    transport: Arc<Transport>,
}

impl fmt::Debug for KmipProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipProvider")
            .field("server", &self.transport.server)
            .finish()
    }
}

fn version_name(name: &str, v: u32) -> String {
    format!("{name}@v{v}")
}

fn tombstone_name(name: &str, at: i64) -> String {
    format!("{name}@destroyed@{at}")
}

/// The Name all objects of a `kmip:<uid>` key's tombstone carry.
fn uid_marker(uid: &str) -> String {
    format!("custos-uid/{uid}")
}

fn classify(family_name: &str, names: &[String]) -> ObjectKind {
    for n in names {
        if let Some(rest) = n.strip_prefix(family_name) {
            if let Some(v) = rest.strip_prefix("@v").and_then(|v| v.parse().ok()) {
                return ObjectKind::Version(v);
            }
            if let Some(t) = rest
                .strip_prefix("@destroyed@")
                .and_then(|t| t.parse().ok())
            {
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

fn usage_mask(mask: i32) -> req::Attribute {
    req::Attribute(
        AttributeName("Cryptographic Usage Mask".into()),
        None,
        AttributeValue::Integer(mask),
    )
}

/// A Name attribute; several on one object need their index (PyKMIP insists).
fn name_attribute(name: String, index: i32) -> req::Attribute {
    let mut a = req::Attribute::Name(name);
    a.1 = Some(AttributeIndex(index));
    a
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
        Ok(KmipProvider {
            transport: Arc::new(transport),
        })
    }

    /// `host:port` of the key manager.
    pub fn server(&self) -> &str {
        &self.transport.server
    }

    /// How many of each KMIP operation this provider sent (e.g. `Encrypt`:
    /// 3). There is no code path that sends Get; tests check it here.
    pub fn operations_sent(&self) -> BTreeMap<String, u64> {
        self.transport.operations_sent()
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

    fn err(&self, key: &KeyRef, op: &str, e: WireError) -> KeyError {
        let server = &self.transport.server;
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

    async fn std(
        &self,
        key: &KeyRef,
        payload: RequestPayload,
    ) -> Result<ResponsePayload, WireError> {
        match self.transport.call(Request::Std(Box::new(payload))).await? {
            Response::Std(p) => Ok(*p),
            Response::Data(_) => Err(WireError::Protocol(format!(
                "unexpected data answer for key {key}"
            ))),
        }
    }

    async fn locate(&self, key: &KeyRef, name: &str) -> Result<Vec<String>, KeyError> {
        let payload = RequestPayload::Locate(vec![req::Attribute::Name(name.to_owned())]);
        match self.std(key, payload).await {
            Ok(ResponsePayload::Locate(p)) => {
                Ok(p.unique_identifiers.into_iter().map(|u| u.0).collect())
            }
            Ok(_) => Err(self.err(key, "Locate", WireError::Protocol("wrong payload".into()))),
            Err(e) => Err(self.err(key, "Locate", e)),
        }
    }

    /// State and Names of one object (GetAttributes; never Get).
    async fn attributes(&self, key: &KeyRef, uid: &str) -> Result<(State, Vec<String>), KeyError> {
        let payload = RequestPayload::GetAttributes(
            Some(UniqueIdentifier(uid.to_owned())),
            Some(vec![
                AttributeName("State".into()),
                AttributeName("Name".into()),
            ]),
        );
        let p = match self.std(key, payload).await {
            Ok(ResponsePayload::GetAttributes(p)) => p,
            Ok(_) => {
                return Err(self.err(
                    key,
                    "GetAttributes",
                    WireError::Protocol("wrong payload".into()),
                ));
            }
            Err(e) => return Err(self.err(key, "GetAttributes", e)),
        };
        let mut state = None;
        let mut names = Vec::new();
        for a in p.attributes.unwrap_or_default() {
            match a.value {
                AttributeValue::State(s) => state = Some(s),
                AttributeValue::Name(n, _) => names.push(n.0),
                _ => {}
            }
        }
        let state = state.ok_or_else(|| KeyError::Backend {
            provider: PROVIDER,
            key: label(key),
            message: format!("GetAttributes of object {uid} returned no State"),
        })?;
        Ok((state, names))
    }

    async fn object(&self, key: &KeyRef, family_name: &str, uid: &str) -> Result<Object, KeyError> {
        let (state, names) = self.attributes(key, uid).await?;
        let kind = classify(family_name, &names);
        Ok(Object {
            uid: uid.to_owned(),
            state,
            kind,
        })
    }

    /// Every object of `key`, with its state.
    async fn family(&self, key: &KeyRef) -> Result<Family, KeyError> {
        let id = KmipKeyId::parse(key.id()).map_err(|reason| super::InvalidKeyRef {
            input: key.to_string(),
            reason,
        })?;
        let mut fam = Family {
            versions: Vec::new(),
            tombstone: None,
        };
        match id {
            KmipKeyId::Name(name) => {
                for uid in self.locate(key, &name).await? {
                    let obj = match self.object(key, &name, &uid).await {
                        Ok(o) => o,
                        // Destroyed between the Locate and now.
                        Err(KeyError::NotFound { .. }) => continue,
                        Err(e) => return Err(e),
                    };
                    match obj.kind {
                        ObjectKind::Version(v) => fam.versions.push((v, obj)),
                        ObjectKind::Tombstone(t) => fam.tombstone = Some((t, obj.uid)),
                        // An object someone else named like the key: not custos's to use.
                        ObjectKind::Foreign => {}
                    }
                }
            }
            KmipKeyId::Uid(uid) => {
                let marker = uid_marker(&uid);
                match self.object(key, &marker, &uid).await {
                    Ok(mut obj) => {
                        obj.kind = ObjectKind::Version(1);
                        fam.versions.push((1, obj));
                    }
                    Err(KeyError::NotFound { .. }) => {
                        for t in self.locate(key, &marker).await? {
                            if let ObjectKind::Tombstone(at) =
                                self.object(key, &marker, &t).await?.kind
                            {
                                fam.tombstone = Some((at, t));
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(fam)
    }

    fn not_found(&self, key: &KeyRef) -> KeyError {
        KeyError::NotFound {
            key: label(key),
            message: format!("no such key on KMIP server {}", self.transport.server),
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
            Some(KeyState::Other { name }) => Err(KeyError::Unavailable {
                key: label(key),
                message: format!("its destruction did not finish ({name}): run the shred again"),
            }),
            _ => Ok(()),
        }
    }

    /// The current version, Active, or why there is none.
    async fn current(&self, key: &KeyRef) -> Result<Object, KeyError> {
        self.current_version(key).await.map(|(_, obj)| obj)
    }

    /// The newest version of `key` and its number, activated if a creation
    /// left it Pre-Active; refused unless usable.
    async fn current_version(&self, key: &KeyRef) -> Result<(u32, Object), KeyError> {
        let fam = self.family(key).await?;
        self.refuse_if_destroying(key, &fam)?;
        match (fam.current(), fam.tombstone.as_ref()) {
            (Some((v, obj)), _) if obj.state == State::Active => Ok((*v, obj.clone())),
            // A Create whose Activate never ran (a crash in create_key or
            // rotate): finish it, as the same call would have.
            (Some((v, obj)), _) if obj.state == State::PreActive => {
                self.simple(
                    key,
                    "Activate",
                    RequestPayload::Activate(Some(UniqueIdentifier(obj.uid.clone()))),
                )
                .await?;
                tracing::info!(event = "kmip.key_activated", key = %key, version = v, object = %obj.uid, "activated version {v} of {key}, left Pre-Active by an interrupted creation");
                Ok((
                    *v,
                    Object {
                        state: State::Active,
                        ..obj.clone()
                    },
                ))
            }
            (Some((_, obj)), _) => Err(self.unusable(key, obj.state)),
            (None, Some((at, _))) => Err(KeyError::Destroyed {
                key: label(key),
                destroyed_at: time(*at),
            }),
            (None, None) => Err(self.not_found(key)),
        }
    }

    async fn create_version(&self, key: &KeyRef, name: &str, v: u32) -> Result<String, KeyError> {
        // Encrypt | Decrypt: the only uses custos makes of the key.
        let usage = usage_mask(0x4 | 0x8);
        let attrs = vec![
            req::Attribute::CryptographicAlgorithm(CryptographicAlgorithm::AES),
            req::Attribute::CryptographicLength(256),
            usage,
            name_attribute(name.to_owned(), 0),
            name_attribute(version_name(name, v), 1),
        ];
        let uid = self.create(key, attrs).await?;
        self.simple(
            key,
            "Activate",
            RequestPayload::Activate(Some(UniqueIdentifier(uid.clone()))),
        )
        .await?;
        tracing::info!(event = "kmip.key_created", key = %key, version = v, object = %uid, "created version {v} of {key} on the KMIP server");
        Ok(uid)
    }

    async fn create(&self, key: &KeyRef, attrs: Vec<req::Attribute>) -> Result<String, KeyError> {
        let payload = RequestPayload::Create(
            ObjectType::SymmetricKey,
            req::TemplateAttribute::unnamed(attrs),
        );
        match self.std(key, payload).await {
            Ok(ResponsePayload::Create(p)) => Ok(p.unique_identifier.0),
            Ok(_) => Err(self.err(key, "Create", WireError::Protocol("wrong payload".into()))),
            Err(e) => Err(self.err(key, "Create", e)),
        }
    }

    async fn simple(
        &self,
        key: &KeyRef,
        op: &str,
        payload: RequestPayload,
    ) -> Result<(), KeyError> {
        self.std(key, payload)
            .await
            .map(|_| ())
            .map_err(|e| self.err(key, op, e))
    }

    /// Revokes `uid`. A key-compromise revocation carries its Compromise
    /// Occurrence Date (`compromised_at`, Unix seconds), which KMIP requires
    /// with that reason.
    async fn revoke(
        &self,
        key: &KeyRef,
        uid: &str,
        code: RevocationReasonCode,
        compromised_at: Option<i64>,
    ) -> Result<(), KeyError> {
        self.simple(
            key,
            "Revoke",
            RequestPayload::Revoke(
                Some(UniqueIdentifier(uid.to_owned())),
                RevocationReason(code, None),
                compromised_at.map(|t| CompromiseOccurrenceDate(t.max(0) as u64)),
            ),
        )
        .await
    }

    /// Revoke for Cessation of Operation: Active → Deactivated.
    async fn deactivate(&self, key: &KeyRef, uid: &str) -> Result<(), KeyError> {
        self.revoke(key, uid, RevocationReasonCode::CessationOfOperation, None)
            .await
    }

    async fn cbc(
        &self,
        key: &KeyRef,
        decrypt: bool,
        uid: &str,
        iv: [u8; 16],
        data: Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let op = if decrypt { "Decrypt" } else { "Encrypt" };
        let r = self
            .transport
            .call(Request::Cbc {
                decrypt,
                uid: uid.to_owned(),
                iv,
                data,
            })
            .await;
        match r {
            Ok(Response::Data(d)) => Ok(d),
            Ok(Response::Std(_)) => {
                Err(self.err(key, op, WireError::Protocol("wrong payload".into())))
            }
            Err(e @ WireError::Failed { .. }) => {
                // Say why, from the object's state: a revoked key is
                // Disabled, a destroyed one Destroyed; an Active key that
                // cannot decrypt was given a ciphertext it did not make.
                let plain = self.err(key, op, e);
                match self.attributes(key, uid).await {
                    // The same words as a seal that does not open (envelope::REFUSED).
                    Ok((State::Active, _)) if decrypt => Err(KeyError::InvalidCiphertext {
                        key: label(key),
                        message: envelope::REFUSED.to_owned(),
                    }),
                    Ok((State::Active, _)) => Err(plain),
                    Ok((state, _)) => Err(self.unusable(key, state)),
                    Err(KeyError::NotFound { .. }) => Err(KeyError::Destroyed {
                        key: label(key),
                        destroyed_at: None,
                    }),
                    Err(_) => Err(plain),
                }
            }
            Err(e) => Err(self.err(key, op, e)),
        }
    }

    async fn wrap_under(
        &self,
        key: &KeyRef,
        obj: &Object,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        let wk = SecretKey::generate();
        let iv = crate::util::random_bytes::<16>();
        let wk_ct = self
            .cbc(
                key,
                false,
                &obj.uid,
                iv,
                Zeroizing::new(wk.expose().to_vec()),
            )
            .await?;
        // 32 bytes under CBC with PKCS#5 padding are exactly three blocks;
        // anything else is not what was asked for, and would not unwrap.
        if wk_ct.len() != 48 {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!(
                    "the KMIP server's Encrypt of a 32-byte wrapping key returned {} bytes, not 48",
                    wk_ct.len()
                ),
            });
        }
        let ciphertext = envelope::seal(&obj.uid, iv, &wk_ct, &wk, data_key, ctx).map_err(|m| {
            KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: m,
            }
        })?;
        Ok(WrappedKey {
            key_id: key.to_string(),
            key_version: Some(obj.uid.clone()),
            ciphertext,
        })
    }
}

#[async_trait]
impl KeyProvider for KmipProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Kmip
    }

    fn custody(&self, _key: &KeyRef) -> Custody {
        Custody {
            provider: ProviderKind::Kmip,
            holder: format!("KMIP key manager {}", self.transport.server),
            details: BTreeMap::from([("server".to_owned(), self.transport.server.clone())]),
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
        let fam = self.family(key).await?;
        if let Some((at, _)) = fam.tombstone {
            return Err(KeyError::Destroyed {
                key: label(key),
                destroyed_at: time(at),
            });
        }
        match fam.current() {
            None => {
                self.create_version(key, &name, 1).await?;
            }
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
        let Some((_, version)) = fam.versions.iter().find(|(_, o)| o.uid == env.uid) else {
            self.current(key).await?;
            return Err(invalid(format!(
                "the envelope was wrapped by object {}, which is not a version of this key",
                env.uid
            )));
        };
        if version.state != State::Active {
            return Err(self.unusable(key, version.state));
        }
        let wk = self
            .cbc(
                key,
                true,
                env.uid,
                env.iv,
                Zeroizing::new(env.wk_ct.to_vec()),
            )
            .await?;
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
        // another key reference naming the same object could have filled.
        let (v, _) = self.current_version(key).await?;
        self.create_version(key, &name, v + 1).await?;
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

    /// Revoke (where Active), then Destroy, every version; then a Locate
    /// must find none. First of all, a tombstone object is created (never activated,
    /// revoked as compromised, so it can never encrypt or decrypt) whose
    /// Names record the key and the time of destruction: servers such as
    /// PyKMIP delete destroyed objects, and `describe` must still tell a
    /// destroyed key from one that never existed. Immediate and
    /// irreversible; idempotent (a second call reports the tombstone).
    async fn destroy(
        &self,
        key: &KeyRef,
        _pending_window_days: u32,
    ) -> Result<Destruction, KeyError> {
        let id = KmipKeyId::parse(key.id()).map_err(|reason| super::InvalidKeyRef {
            input: key.to_string(),
            reason,
        })?;
        let mut fam = self.family(key).await?;
        if fam.live().next().is_none() && (fam.tombstone.is_some() || fam.versions.is_empty()) {
            return match fam.tombstone {
                Some((at, _)) => {
                    let at = time(at).unwrap_or_else(Utc::now);
                    Ok(Destruction {
                        action: DestroyAction::RevokedAndDestroyed,
                        state_after: KeyState::Destroyed {
                            destroyed_at: Some(at),
                        },
                        effective_at: at,
                        objects: Vec::new(),
                    })
                }
                None => Err(self.not_found(key)),
            };
        }
        // The tombstone first: a crash after the Destroys below must still
        // leave the record that tells this key's destruction from a key that
        // never existed (absence proves nothing, see `absence_means_gone`).
        let at = match fam.tombstone {
            Some((at, _)) => at,
            None => {
                let at = Utc::now().timestamp();
                let family_name = match &id {
                    KmipKeyId::Name(n) => n.clone(),
                    KmipKeyId::Uid(u) => uid_marker(u),
                };
                let tomb = self
                    .create(
                        key,
                        vec![
                            req::Attribute::CryptographicAlgorithm(CryptographicAlgorithm::AES),
                            req::Attribute::CryptographicLength(128),
                            // No use at all (the server insists on a mask).
                            usage_mask(0),
                            name_attribute(family_name.clone(), 0),
                            name_attribute(tombstone_name(&family_name, at), 1),
                        ],
                    )
                    .await?;
                self.revoke(key, &tomb, RevocationReasonCode::KeyCompromise, Some(at))
                    .await?;
                at
            }
        };
        let mut objects = Vec::new();
        // Oldest first; a version already destroyed (a re-run, on a server
        // that keeps destroyed objects) is only recorded.
        fam.versions.sort_by_key(|(v, _)| *v);
        for (_, obj) in &fam.versions {
            if is_destroyed(obj.state) {
                objects.push(obj.uid.clone());
                continue;
            }
            if obj.state == State::Active {
                self.deactivate(key, &obj.uid).await?;
            }
            match self
                .simple(
                    key,
                    "Destroy",
                    RequestPayload::Destroy(Some(UniqueIdentifier(obj.uid.clone()))),
                )
                .await
            {
                Ok(()) | Err(KeyError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            objects.push(obj.uid.clone());
            tracing::info!(event = "kmip.object_destroyed", key = %key, object = %obj.uid, "revoked and destroyed {} of {key}", obj.uid);
        }
        let left = self.family(key).await?;
        let live = left.live().count();
        if live > 0 {
            return Err(KeyError::Backend {
                provider: PROVIDER,
                key: label(key),
                message: format!(
                    "after Destroy the KMIP server still lists {live} version object(s) that are not Destroyed"
                ),
            });
        }
        let when = time(at).unwrap_or_else(Utc::now);
        Ok(Destruction {
            action: DestroyAction::RevokedAndDestroyed,
            state_after: KeyState::Destroyed {
                destroyed_at: Some(when),
            },
            effective_at: when,
            objects,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify_versions_and_tombstones() {
        let n = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(classify("a", &n(&["a", "a@v3"])), ObjectKind::Version(3));
        assert_eq!(
            classify("a", &n(&["a", "a@destroyed@17"])),
            ObjectKind::Tombstone(17)
        );
        assert_eq!(classify("a", &n(&["a"])), ObjectKind::Foreign);
        assert_eq!(classify("a", &n(&["a", "ab@v2"])), ObjectKind::Foreign);
        assert_eq!(classify("a", &n(&["a", "a@vx"])), ObjectKind::Foreign);
    }

    fn family(versions: &[(u32, State)], tombstone: Option<i64>) -> Family {
        Family {
            versions: versions
                .iter()
                .map(|&(v, state)| {
                    let obj = Object {
                        uid: format!("uid-{v}"),
                        state,
                        kind: ObjectKind::Version(v),
                    };
                    (v, obj)
                })
                .collect(),
            tombstone: tombstone.map(|at| (at, "uid-t".to_owned())),
        }
    }

    #[test]
    fn a_half_destroyed_key_never_reads_as_destroyed_or_usable() {
        use State::{Active, Deactivated, Destroyed};
        let name = |f: &Family| f.state().map(|s| s.name());
        // Before any destruction: the newest version's state.
        assert_eq!(
            name(&family(&[(1, Active), (2, Active)], None)).unwrap(),
            "enabled"
        );
        assert_eq!(
            name(&family(&[(1, Deactivated)], None)).unwrap(),
            "disabled"
        );
        assert_eq!(family(&[], None).state(), None);
        // The newest destroyed (a server that keeps destroyed objects lists
        // it), an older one still Active: not destroyed.
        for f in [
            family(&[(1, Active), (2, Destroyed)], None),
            family(&[(1, Deactivated), (2, Destroyed)], Some(1_700_000_000)),
            family(&[(1, Active)], Some(1_700_000_000)),
        ] {
            assert_eq!(name(&f).unwrap(), "destroy_incomplete");
            assert!(!f.state().unwrap().is_usable());
        }
        // Every version gone or destroyed: destroyed, at the tombstone's time.
        let f = family(&[(1, Destroyed), (2, Destroyed)], Some(1_700_000_000));
        assert_eq!(
            f.state(),
            Some(KeyState::Destroyed {
                destroyed_at: time(1_700_000_000)
            })
        );
        assert_eq!(
            family(&[], Some(1_700_000_000)).state(),
            Some(KeyState::Destroyed {
                destroyed_at: time(1_700_000_000)
            })
        );
    }

    #[test]
    fn states_map_onto_key_states() {
        assert_eq!(state_of(State::Active), KeyState::Enabled);
        assert_eq!(state_of(State::Deactivated), KeyState::Disabled);
        assert!(!state_of(State::PreActive).is_usable());
        assert!(!state_of(State::Compromised).is_usable());
        assert!(matches!(
            state_of(State::Destroyed),
            KeyState::Destroyed { .. }
        ));
        assert!(matches!(
            state_of(State::DestroyedCompromised),
            KeyState::Destroyed { .. }
        ));
    }
}
