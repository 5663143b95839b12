//! The PKCS#11 key provider: CMKs are AES-256 secret keys on an HSM or
//! token, reached through its PKCS#11 module (`cryptoki`). custos never
//! reads key bytes out of the token; every wrap and unwrap is a
//! `C_Encrypt` / `C_Decrypt` with `CKM_AES_GCM` on the token.
//!
//! Object conventions (docs/FORMAT.md §3, docs/keys-you-hold.md):
//!
//! - a key `pkcs11:token=T;object=L` is every secret-key object labelled
//!   `L` on token `T`; each version of the key is one object, its
//!   `CKA_ID` the version as a 4-byte big-endian number (`00000001` for
//!   the first); the current version is the highest;
//! - custos creates them `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not
//!   `CKA_EXTRACTABLE`, AES, 32 bytes, `CKA_START_DATE` the day of creation,
//!   and refuses to use an object that is extractable or not sensitive;
//! - disabled = `CKA_ENCRYPT` and `CKA_DECRYPT` false on every version
//!   (the token itself then refuses the key: `CKR_KEY_FUNCTION_NOT_PERMITTED`);
//! - destroyed = a data object (`CKO_DATA`, label `L`, `CKA_APPLICATION`
//!   `custos-destroyed/1`, no key material) records when and which objects
//!   were destroyed, then `C_DestroyObject` of every version. Without it a
//!   destroyed key and one never made would look the same.
//!
//! Wrapped key: `IV[12] ‖ AES-256-GCM ciphertext[32] ‖ tag[16]`, AAD =
//! [`WrapContext::canonical_bytes`], version in `WrappedKey.key_version`.

mod pinning;
mod pool;
mod record;
mod uri;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::{AuthPin, Date, Ulong};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use self::pool::{Fail, Pool, Token, ck, short};
use self::record::Record;
pub use pool::module_lock;
pub use uri::Pkcs11Uri;

use super::{
    Custody, DataKey, DestroyAction, Destruction, KeyError, KeyInfo, KeyOrigin, KeyProvider,
    KeyRef, KeyState, ProviderKind, SecretKey, WrapContext, WrappedKey,
};

/// Checks the part of a `pkcs11:` reference after the scheme.
pub fn validate_key_id(id: &str) -> Result<(), String> {
    Pkcs11Uri::parse(id).map(|_| ())
}

/// Where the PIN comes from (`[pkcs11]` of custos.toml). The PIN itself is
/// read when the provider opens and is never part of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PinSource {
    /// `pin_file`: a file only custos's user can read (0600 or 0400).
    File(PathBuf),
    /// `pin_env`: an environment variable.
    Env(String),
    /// `pin_credential`: a systemd credential (`LoadCredential=`), read
    /// from `$CREDENTIALS_DIRECTORY/<name>`.
    Credential(String),
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "pin_file {}", p.display()),
            PinSource::Env(v) => write!(f, "pin_env {v}"),
            PinSource::Credential(c) => write!(f, "pin_credential {c}"),
        }
    }
}

/// A PIN is short; a large file is not one.
const MAX_PIN_FILE: u64 = 4096;

impl PinSource {
    /// Reads the PIN. Errors name the source, never the PIN.
    pub fn read(&self) -> Result<AuthPin, KeyError> {
        let not_configured = |message: String| KeyError::NotConfigured {
            provider: "pkcs11",
            message,
        };
        let pin: Zeroizing<String> = match self {
            PinSource::File(path) => read_pin_file(path, "PKCS#11 PIN file")?,
            PinSource::Credential(name) => {
                let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
                    return Err(not_configured(format!(
                        "pin_credential {name}: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential={name}:…)"
                    )));
                };
                read_pin_file(&PathBuf::from(dir).join(name), "PKCS#11 PIN credential")?
            }
            PinSource::Env(var) => match std::env::var(var) {
                Ok(v) => Zeroizing::new(v),
                Err(_) => {
                    return Err(not_configured(format!(
                        "pin_env {var}: the variable is not set or not UTF-8"
                    )));
                }
            },
        };
        let trimmed = pin
            .strip_suffix("\r\n")
            .or_else(|| pin.strip_suffix('\n'))
            .unwrap_or(&pin);
        if trimmed.is_empty() {
            return Err(not_configured(format!("{self}: the PIN is empty")));
        }
        Ok(AuthPin::from(trimmed))
    }
}

fn read_pin_file(path: &std::path::Path, what: &str) -> Result<Zeroizing<String>, KeyError> {
    use crate::secure_fs::{CheckError, Readers};
    let bytes = crate::secure_fs::read_trusted(path, what, Readers::OwnerOnly, MAX_PIN_FILE)
        .map_err(|e| match e {
            CheckError::Insecure(i) => KeyError::InsecurePermissions {
                path: i.path,
                message: i.message,
            },
            CheckError::Io(path, e) => KeyError::LocalFile {
                path,
                message: format!("cannot read the {what}: {e}"),
            },
        })?;
    match std::str::from_utf8(&bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(_) => Err(KeyError::LocalFile {
            path: path.to_owned(),
            message: format!("the {what} is not UTF-8 text"),
        }),
    }
}

/// `[pkcs11]` of custos.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module (shared library) of the HSM.
    pub module: PathBuf,
    pub pin: PinSource,
    /// Sessions open at once (default 4): the pool's bound.
    pub max_sessions: usize,
    /// Longest wait for a session plus the token's answer (default 30s);
    /// past it the call fails as `key_unavailable`.
    #[serde(with = "crate::config::units::serde_duration")]
    pub timeout: Duration,
    /// True when the module talks to a network HSM (a Luna Network HSM, a
    /// CloudHSM client): key operations then leave this host.
    pub network: bool,
}

impl Pkcs11Settings {
    pub const DEFAULT_MAX_SESSIONS: usize = 4;
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
}

/// The crash points of a destruction (`CUSTOS_CRASH_AT=pkcs11-destroy:<point>`,
/// `test-hooks` builds only; see `jobs::shred::hook::PKCS11_DESTROY_POINTS`).
const DESTROY_CRASH_SCOPE: &str = "pkcs11-destroy";

/// `CKA_ID` of a version object: the version, 4 bytes big-endian.
const VERSION_ID_LEN: usize = 4;
/// `CKA_APPLICATION` of the record a destruction leaves.
const TOMBSTONE_APP: &[u8] = b"custos-destroyed/1";
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = IV_LEN + super::KEY_LEN + TAG_LEN;

/// What a destruction leaves on the token (`CKA_VALUE` of the data object).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tombstone {
    destroyed_at: DateTime<Utc>,
    objects: Vec<String>,
}

/// One secret-key object labelled with the key's label.
struct Version {
    handle: ObjectHandle,
    id: Vec<u8>,
    /// `None`: its `CKA_ID` is no custos version id.
    version: Option<u32>,
    encrypt: bool,
    decrypt: bool,
    sensitive: bool,
    extractable: bool,
    aes256: bool,
    /// `CKA_LOCAL`: generated on the token (not imported, not unwrapped).
    local: bool,
    /// `CKA_NEVER_EXTRACTABLE`: never was extractable, so never left the token.
    never_extractable: bool,
    /// `CKA_ALWAYS_SENSITIVE`: its value was never readable.
    always_sensitive: bool,
    /// `CKA_WRAP`, `CKA_UNWRAP`, `CKA_DERIVE`: uses custos never makes of a
    /// version (it generates them false); true on one it is to wrap under
    /// means another hand made or changed it.
    wrap: bool,
    unwrap: bool,
    derive: bool,
    /// `CKA_COPYABLE` (PKCS#11 2.40), where the token reports it: a
    /// copyable version can be copied (`C_CopyObject`) with attributes
    /// changed where the token allows it.
    copyable: Option<bool>,
    start: Option<NaiveDate>,
}

/// Everything on the token under one label.
struct View {
    versions: Vec<Version>,
    tombstone: Option<(ObjectHandle, Tombstone)>,
}

/// The PKCS#11 provider: one module, any of its tokens.
pub struct Pkcs11Provider {
    pool: Arc<Pool>,
    settings: Pkcs11Settings,
    permits: Arc<tokio::sync::Semaphore>,
    /// The versions custos generated or adopted (see `record`).
    record: Arc<Record>,
}

impl std::fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The PIN source is a place, not the PIN; the PIN is never shown.
        f.debug_struct("Pkcs11Provider")
            .field("module", &self.settings.module)
            .field("pin", &format_args!("<{}>", self.settings.pin))
            .field("max_sessions", &self.settings.max_sessions)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Provider {
    /// Reads the PIN, loads and initialises the module. Tokens are found
    /// when a key is used, so a token plugged in later is found then.
    pub fn open(settings: &Pkcs11Settings) -> Result<Self, KeyError> {
        // First of all, whether the provider opens or not: the commands
        // custos runs must never see the PIN.
        if let PinSource::Env(var) = &settings.pin {
            crate::util::hide_from_children(var);
        }
        // Whoever can replace the module runs code inside custos.
        crate::secure_fs::check_file(&settings.module, "PKCS#11 module").map_err(|e| match e {
            crate::secure_fs::CheckError::Insecure(i) => KeyError::InsecurePermissions {
                path: i.path,
                message: i.message,
            },
            crate::secure_fs::CheckError::Io(path, e) => KeyError::NotConfigured {
                provider: "pkcs11",
                message: format!("PKCS#11 module {}: {e}", path.display()),
            },
        })?;
        let pin = settings.pin.read()?;
        let ctx =
            pool::load_module(&settings.module).map_err(|message| KeyError::NotConfigured {
                provider: "pkcs11",
                message,
            })?;
        let pool = Pool::new(ctx, settings.module.clone(), pin, settings.pin.to_string());
        Ok(Pkcs11Provider {
            pool: Arc::new(pool),
            settings: settings.clone(),
            permits: Arc::new(tokio::sync::Semaphore::new(settings.max_sessions)),
            record: Arc::new(Record::in_memory()),
        })
    }

    /// Keeps the record of the versions custos generates in `path` (in the
    /// state directory), rather than in memory: a version custos made is
    /// then known as its own across processes and restarts.
    pub fn with_object_record(mut self, path: PathBuf) -> Self {
        self.record = Arc::new(Record::at(path));
        self
    }

    /// Rewrites the object record at `path` in the current format, if it
    /// exists in an older one (see `object_record::ObjectRecord::migrate`).
    pub fn migrate_object_record(path: PathBuf) -> Result<(), KeyError> {
        Record::at(path).migrate()
    }

    pub fn settings(&self) -> &Pkcs11Settings {
        &self.settings
    }

    /// Takes every session permit, as if all sessions were busy, until the
    /// returned permit is dropped (tests of the pool's bound and timeout).
    #[cfg(any(test, feature = "test-hooks"))]
    pub async fn hold_all_sessions(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        // `None` only if the semaphore were closed, which the provider never does.
        self.permits
            .clone()
            .acquire_many_owned(self.settings.max_sessions as u32)
            .await
            .ok()
    }

    fn uri(key: &KeyRef) -> Result<Pkcs11Uri, KeyError> {
        if key.kind() != ProviderKind::Pkcs11 {
            return Err(KeyError::Unsupported {
                provider: "pkcs11",
                operation: "keys of another provider",
            });
        }
        Pkcs11Uri::parse(key.id()).map_err(|reason| {
            KeyError::InvalidReference(super::InvalidKeyRef {
                input: key.to_string(),
                reason,
            })
        })
    }

    /// Runs `f` on a session of the key's token, on a blocking thread, within
    /// the configured timeout (the wait for a session included).
    async fn run<T, F>(&self, key: &KeyRef, op: &'static str, f: F) -> Result<T, KeyError>
    where
        T: Send + 'static,
        F: FnOnce(&Pool, &Session, &Token, &Ctx) -> Result<T, Fail> + Send + 'static,
    {
        let uri = Self::uri(key)?;
        let name = key.to_string();
        let timeout = self.settings.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let shown = crate::config::units::format_duration(timeout);
        let permit = match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned())
            .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) | Err(_) => {
                return Err(KeyError::Unavailable {
                    key: name,
                    message: format!(
                        "all {} PKCS#11 sessions stayed busy for {shown} ([pkcs11] max_sessions, timeout)",
                        self.settings.max_sessions
                    ),
                });
            }
        };
        let pool = self.pool.clone();
        let record = self.record.clone();
        let key_name = name.clone();
        let task = tokio::task::spawn_blocking(move || {
            // Held until the module returns, even past the timeout: a hung
            // call keeps its session, and the pool's bound stays true.
            let _permit = permit;
            let ctx = Ctx {
                key: key_name.clone(),
                uri: uri.clone(),
                record,
            };
            let _calling = pool.calling();
            pool.with_session(&key_name, &uri, |s, t| f(&pool, s, t, &ctx))
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(KeyError::Backend {
                provider: "pkcs11",
                key: name,
                message: format!("{op}: the call into the PKCS#11 module failed: {e}"),
            }),
            Err(_) => Err(KeyError::Unavailable {
                key: name,
                message: format!(
                    "{op}: the token did not answer within {shown} ([pkcs11] timeout); its session stays busy until it does"
                ),
            }),
        }
    }
}

/// What an operation knows about its key.
struct Ctx {
    key: String,
    uri: Pkcs11Uri,
    record: Arc<Record>,
}

impl Ctx {
    /// The resolved id: the reference with the token's serial.
    fn key_id(&self, token: &Token) -> String {
        let resolved = Pkcs11Uri {
            token: token.label.clone(),
            object: self.uri.object.clone(),
            serial: (!token.serial.is_empty()).then(|| token.serial.clone()),
        };
        format!("pkcs11:{resolved}")
    }

    fn backend(&self, message: String) -> Fail {
        Fail::Key(KeyError::Backend {
            provider: "pkcs11",
            key: self.key.clone(),
            message,
        })
    }

    fn invalid(&self, message: impl Into<String>) -> Fail {
        Fail::Key(KeyError::InvalidCiphertext {
            key: self.key.clone(),
            message: message.into(),
        })
    }

    fn object_name(&self, token: &Token, id: &[u8]) -> String {
        object_name(token, &self.uri.object, id)
    }

    fn read(&self, s: &Session) -> Result<View, Fail> {
        let label = self.uri.object.as_bytes().to_vec();
        // Private objects only (CKA_PRIVATE: visible and creatable only
        // after a login with the PIN): a public object anyone can plant in a
        // session without the PIN, and custos would wrap tenants' data keys
        // under a key whose bytes the planter chose, or read a forged
        // destruction record.
        let handles = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label.clone()),
            ])
            .map_err(ck("C_FindObjects (secret keys)"))?;
        let mut versions = Vec::with_capacity(handles.len());
        for handle in handles {
            let attrs = attributes(
                s,
                handle,
                &[
                    AttributeType::Id,
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                ],
                &[
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Derive,
                    AttributeType::Copyable,
                    AttributeType::Local,
                    AttributeType::NeverExtractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::StartDate,
                ],
            )?;
            let mut v = Version {
                handle,
                id: Vec::new(),
                version: None,
                encrypt: false,
                decrypt: false,
                sensitive: false,
                extractable: true,
                aes256: false,
                local: false,
                never_extractable: false,
                always_sensitive: false,
                // Unreported is not shown false.
                wrap: true,
                unwrap: true,
                derive: true,
                copyable: None,
                start: None,
            };
            let (mut aes, mut len32) = (false, false);
            for a in attrs {
                match a {
                    Attribute::Id(id) => v.id = id,
                    Attribute::KeyType(t) => aes = t == KeyType::AES,
                    Attribute::ValueLen(n) => len32 = u64::from(n) == super::KEY_LEN as u64,
                    Attribute::Sensitive(b) => v.sensitive = b,
                    Attribute::Extractable(b) => v.extractable = b,
                    Attribute::Encrypt(b) => v.encrypt = b,
                    Attribute::Decrypt(b) => v.decrypt = b,
                    Attribute::Local(b) => v.local = b,
                    Attribute::NeverExtractable(b) => v.never_extractable = b,
                    Attribute::AlwaysSensitive(b) => v.always_sensitive = b,
                    Attribute::Wrap(b) => v.wrap = b,
                    Attribute::Unwrap(b) => v.unwrap = b,
                    Attribute::Derive(b) => v.derive = b,
                    Attribute::Copyable(b) => v.copyable = Some(b),
                    Attribute::StartDate(d) => v.start = date_of(&d),
                    _ => {}
                }
            }
            v.aes256 = aes && len32;
            v.version = <[u8; VERSION_ID_LEN]>::try_from(v.id.as_slice())
                .ok()
                .map(u32::from_be_bytes)
                .filter(|&n| n >= 1);
            versions.push(v);
        }
        versions.sort_by_key(|v| v.version);
        let tombstones = s
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label),
                Attribute::Application(TOMBSTONE_APP.to_vec()),
            ])
            .map_err(ck("C_FindObjects (destruction records)"))?;
        let tombstone = match tombstones.first() {
            None => None,
            Some(&h) => {
                let value = s
                    .get_attributes(h, &[AttributeType::Value])
                    .map_err(ck("C_GetAttributeValue"))?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Value(v) => Some(v),
                        _ => None,
                    })
                    .unwrap_or_default();
                let t: Tombstone = serde_json::from_slice(&value).map_err(|e| {
                    self.backend(format!(
                        "the destruction record of {:?} on the token is malformed: {e}",
                        self.uri.object
                    ))
                })?;
                Some((h, t))
            }
        };
        Ok(View {
            versions,
            tombstone,
        })
    }

    /// The key's state from what is on the token.
    fn state(view: &View) -> KeyState {
        match (&view.tombstone, view.versions.is_empty()) {
            (Some((_, t)), true) => KeyState::Destroyed {
                destroyed_at: Some(t.destroyed_at),
            },
            // A destruction that stopped half-way: refuses all use; a
            // second destroy finishes it.
            (Some(_), false) => KeyState::Other {
                name: "destroy_incomplete".into(),
            },
            (None, _) => {
                if view.versions.iter().all(|v| v.encrypt && v.decrypt) {
                    KeyState::Enabled
                } else {
                    KeyState::Disabled
                }
            }
        }
    }

    fn not_found(&self, token: &Token) -> Fail {
        Fail::Key(KeyError::NotFound {
            key: self.key.clone(),
            message: format!(
                "no secret-key object labelled {:?} on token {:?} (serial {})",
                self.uri.object, token.label, token.serial
            ),
        })
    }

    /// The view of a key that must exist, be usable and carry custos
    /// version ids; errors in the order a caller can act on them.
    fn usable(&self, s: &Session, token: &Token) -> Result<View, Fail> {
        let view = self.read(s)?;
        self.pinned(s, token, &view)?;
        match Self::state(&view) {
            KeyState::Enabled if view.versions.is_empty() => Err(self.not_found(token)),
            KeyState::Enabled => {
                if let Some(v) = view.versions.iter().find(|v| v.version.is_none()) {
                    return Err(self.backend(format!(
                        "object {:?} with CKA_ID {:?} has no custos version id (CKA_ID 00000001 for the first version; see docs/keys-you-hold.md)",
                        self.uri.object,
                        hex::encode(&v.id)
                    )));
                }
                Ok(view)
            }
            KeyState::Disabled => Err(Fail::Key(KeyError::Disabled {
                key: self.key.clone(),
            })),
            KeyState::Destroyed { destroyed_at } => Err(Fail::Key(KeyError::Destroyed {
                key: self.key.clone(),
                destroyed_at,
            })),
            other => Err(Fail::Key(KeyError::Unavailable {
                key: self.key.clone(),
                message: format!(
                    "its destruction did not finish ({}): run the shred again",
                    other.name()
                ),
            })),
        }
    }

    /// The one object of `version`, checked to be a CMK custos may use.
    fn version<'v>(&self, view: &'v View, version: u32) -> Result<&'v Version, Fail> {
        let mut matching = view.versions.iter().filter(|v| v.version == Some(version));
        let Some(v) = matching.next() else {
            return Err(self.backend(format!(
                "version {version} of {:?} is not on the token",
                self.uri.object
            )));
        };
        if matching.next().is_some() {
            return Err(self.backend(format!(
                "two objects labelled {:?} have CKA_ID {}: remove the duplicate",
                self.uri.object,
                hex::encode(version.to_be_bytes())
            )));
        }
        if !v.aes256 || !v.sensitive || v.extractable {
            return Err(self.backend(format!(
                "object {:?} (CKA_ID {}) is not a CMK custos uses: it must be an AES key of 32 bytes, \
                 CKA_SENSITIVE true and CKA_EXTRACTABLE false",
                self.uri.object,
                hex::encode(&v.id)
            )));
        }
        Ok(v)
    }

    /// The version new data keys are wrapped under: the highest, and only
    /// if its value never existed outside the token (see [`Self::born_on_token`])
    /// and custos generated (or adopted) it, its material unchanged (see
    /// [`Self::check_pinned`]).
    fn current<'v>(&self, s: &Session, token: &Token, view: &'v View) -> Result<&'v Version, Fail> {
        let v = self.latest(view)?;
        self.born_on_token(v)?;
        self.uses_only_encrypt(s, v)?;
        self.check_pinned(s, token, v)?;
        Ok(v)
    }

    /// Refuses a version that can wrap, unwrap or derive keys (custos
    /// generates every version with all three false), and makes a copyable
    /// one not copyable (a one-way change PKCS#11 allows; versions custos
    /// generated before it set `CKA_COPYABLE` false at generation are
    /// copyable by the token's default): a copy made with attributes changed
    /// (`C_CopyObject`) could otherwise be put under the key's label.
    fn uses_only_encrypt(&self, s: &Session, v: &Version) -> Result<(), Fail> {
        let mut found = Vec::new();
        for (set, name) in [
            (v.wrap, "CKA_WRAP"),
            (v.unwrap, "CKA_UNWRAP"),
            (v.derive, "CKA_DERIVE"),
        ] {
            if set {
                found.push(name);
            }
        }
        if v.copyable == Some(true)
            && s.update_attributes(v.handle, &[Attribute::Copyable(false)])
                .is_err()
        {
            found.push("CKA_COPYABLE (and the token refused to clear it)");
        }
        if found.is_empty() {
            return Ok(());
        }
        Err(Fail::Key(KeyError::AccessDenied {
            key: self.key.clone(),
            message: format!(
                "refusing to wrap data keys under version {} of {:?} (CKA_ID {}): the token reports {} true (or \
                 does not report it false); custos generates versions that can only encrypt and decrypt. \
                 Destroy that object, or generate a new version (custos rotate --cmk); see docs/keys-you-hold.md",
                v.version.map(|n| n.to_string()).unwrap_or_default(),
                self.uri.object,
                hex::encode(&v.id),
                found.join(", ")
            ),
        }))
    }

    /// The highest version, whatever its origin (a rotation adds the next).
    fn latest<'v>(&self, view: &'v View) -> Result<&'v Version, Fail> {
        let max = view
            .versions
            .iter()
            .filter_map(|v| v.version)
            .max()
            .unwrap_or(0);
        self.version(view, max)
    }

    /// Refuses a version whose value may exist outside the token. Anyone
    /// with the PIN can add an object under the key's label with a higher
    /// `CKA_ID`: imported with a value they know (`C_CreateObject`), or
    /// generated extractable and wrapped out before `CKA_EXTRACTABLE` was
    /// cleared. Data keys wrapped under it could then be unwrapped off the
    /// token, after a shred too. The token alone sets `CKA_LOCAL` (generated
    /// on it), `CKA_NEVER_EXTRACTABLE` and `CKA_ALWAYS_SENSITIVE` (their
    /// history), and no one can set them: a version with all three true has
    /// no copy anywhere, like every version custos generates.
    fn born_on_token(&self, v: &Version) -> Result<(), Fail> {
        let mut missing = Vec::new();
        if !v.local {
            missing.push("CKA_LOCAL (generated on the token, not imported)");
        }
        if !v.never_extractable {
            missing.push("CKA_NEVER_EXTRACTABLE");
        }
        if !v.always_sensitive {
            missing.push("CKA_ALWAYS_SENSITIVE");
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(Fail::Key(KeyError::AccessDenied {
            key: self.key.clone(),
            message: format!(
                "refusing to wrap data keys under version {} of {:?} (CKA_ID {}): the token does not report {} \
                 true, so a copy of its value may exist outside the token (an object imported with a known \
                 value, or wrapped out before it was made non-extractable). Destroy that object, or generate \
                 the version on the token (custos rotate --cmk); see docs/keys-you-hold.md",
                v.version.map(|n| n.to_string()).unwrap_or_default(),
                self.uri.object,
                hex::encode(&v.id),
                missing.join(", ")
            ),
        }))
    }

    fn info(&self, key: &KeyRef, token: &Token, view: &View) -> KeyInfo {
        let current = view.versions.iter().filter_map(|v| v.version).max();
        let first = view.versions.iter().find(|v| v.version.is_some());
        let last = view.versions.iter().rfind(|v| v.version.is_some());
        let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
        KeyInfo {
            reference: key.clone(),
            key_id: self.key_id(token),
            state: Self::state(view),
            origin: if view.versions.iter().all(|v| v.local) {
                KeyOrigin::Provider
            } else {
                KeyOrigin::External
            },
            current_version: current.map(|v| v.to_string()),
            created_at: first.and_then(|v| v.start).and_then(midnight),
            rotated_at: last
                .filter(|v| v.version > Some(1))
                .and_then(|v| v.start)
                .and_then(midnight),
        }
    }

    /// A new version object: AES-256 generated on the token, never
    /// extractable, recorded before anything is wrapped under it.
    fn generate(&self, s: &Session, token: &Token, version: u32) -> Result<(), Fail> {
        let today = Utc::now().date_naive();
        let start = Date::new_from_str_slice(
            &format!("{:04}", today.year()),
            &format!("{:02}", today.month()),
            &format!("{:02}", today.day()),
        )
        .map_err(ck("CKA_START_DATE"))?;
        let handle = s
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(Ulong::from(super::KEY_LEN as u64)),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Modifiable(true),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Wrap(false),
                    Attribute::Unwrap(false),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::Derive(false),
                    Attribute::Copyable(false),
                    Attribute::Label(self.uri.object.as_bytes().to_vec()),
                    Attribute::Id(version.to_be_bytes().to_vec()),
                    Attribute::StartDate(start),
                ],
            )
            .map_err(ck("C_GenerateKey (CKM_AES_KEY_GEN)"))?;
        self.record_generated(s, token, handle, version)
    }

    fn wrap(
        &self,
        s: &Session,
        v: &Version,
        data_key: &DataKey,
        aad: &[u8],
    ) -> Result<Vec<u8>, Fail> {
        let iv: [u8; IV_LEN] = crate::util::random_bytes();
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, Ulong::from(8 * TAG_LEN as u64))
            .map_err(ck("CK_GCM_PARAMS"))?;
        let ct = s
            .encrypt(&Mechanism::AesGcm(params), v.handle, data_key.expose())
            .map_err(ck("C_Encrypt (CKM_AES_GCM)"))?;
        if ct.len() != super::KEY_LEN + TAG_LEN {
            return Err(self.backend(format!(
                "C_Encrypt (CKM_AES_GCM) returned {} bytes for a 32-byte key (expected 48)",
                ct.len()
            )));
        }
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap(
        &self,
        s: &Session,
        token: &Token,
        wrapped: &WrappedKey,
        aad: &[u8],
    ) -> Result<DataKey, Fail> {
        // Pinned to this key: an envelope of another key, token or provider
        // is refused before the token is asked.
        let theirs = wrapped
            .key_id
            .strip_prefix("pkcs11:")
            .and_then(|id| Pkcs11Uri::parse(id).ok());
        let ours_serial = (!token.serial.is_empty()).then_some(token.serial.as_str());
        let same = theirs.is_some_and(|t| {
            t.token == token.label
                && t.object == self.uri.object
                && (t.serial.is_none()
                    || ours_serial.is_none()
                    || t.serial.as_deref() == ours_serial)
        });
        if !same {
            return Err(self.invalid(format!(
                "the envelope was wrapped by {}, not by {}",
                wrapped.key_id,
                self.key_id(token)
            )));
        }
        let version = wrapped
            .key_version
            .as_deref()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&v| v >= 1)
            .ok_or_else(|| self.invalid("the envelope names no key version"))?;
        if wrapped.ciphertext.len() != WRAPPED_LEN {
            return Err(self.invalid(format!(
                "{} bytes, a PKCS#11 wrapped key has {WRAPPED_LEN}",
                wrapped.ciphertext.len()
            )));
        }
        let view = self.usable(s, token)?;
        let v = self.version(&view, version)?;
        let (iv, ct) = wrapped.ciphertext.split_at(IV_LEN);
        let mut iv: [u8; IV_LEN] = iv
            .try_into()
            .map_err(|_| self.invalid("short initialisation vector"))?;
        let params = GcmParams::new(&mut iv, aad, Ulong::from(8 * TAG_LEN as u64))
            .map_err(ck("CK_GCM_PARAMS"))?;
        match s.decrypt(&Mechanism::AesGcm(params), v.handle, ct) {
            Ok(mut plain) => {
                let key = SecretKey::from_slice(&plain);
                plain.zeroize();
                key.ok_or_else(|| self.invalid("the unwrapped key is not 32 bytes"))
            }
            // The tag did not verify: wrong context, another version, or a
            // changed ciphertext.
            Err(
                e @ cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::EncryptedDataInvalid
                    | cryptoki::error::RvError::EncryptedDataLenRange,
                    _,
                ),
            ) => Err(self.invalid(short(&e))),
            // SoftHSM2 reports a failed tag as a general error, which a
            // faulty token also reports: it is a bad envelope only if the
            // same key version still seals and opens a probe of its own.
            Err(
                e @ cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::GeneralError
                    | cryptoki::error::RvError::FunctionFailed,
                    _,
                ),
            ) => match self.round_trips(s, v.handle) {
                true => Err(self.invalid(short(&e))),
                false => Err(Fail::Ck("C_Decrypt (CKM_AES_GCM)", e)),
            },
            Err(e) => Err(Fail::Ck("C_Decrypt (CKM_AES_GCM)", e)),
        }
    }

    /// Whether `handle` encrypts a random probe with AES-GCM and decrypts it
    /// back: a token that does is working, so its failure to open an
    /// envelope means the envelope is wrong.
    fn round_trips(&self, s: &Session, handle: ObjectHandle) -> bool {
        let probe: [u8; 32] = crate::util::random_bytes();
        let aad = b"custos-pkcs11-probe";
        let mut iv: [u8; IV_LEN] = crate::util::random_bytes();
        let Ok(params) = GcmParams::new(&mut iv, aad, Ulong::from(8 * TAG_LEN as u64)) else {
            return false;
        };
        let Ok(ct) = s.encrypt(&Mechanism::AesGcm(params), handle, &probe) else {
            return false;
        };
        let mut iv2 = iv;
        let Ok(params) = GcmParams::new(&mut iv2, aad, Ulong::from(8 * TAG_LEN as u64)) else {
            return false;
        };
        s.decrypt(&Mechanism::AesGcm(params), handle, &ct)
            .is_ok_and(|back| back == probe)
    }

    /// The shred: every object under the label and every recorded version
    /// wherever it is now (relabelled, or copied: see `pinning`), after the
    /// destruction record; then the proof that none is left.
    fn destroy(&self, s: &Session, token: &Token) -> Result<Destruction, Fail> {
        let view = self.read(s)?;
        let rec = self.pinned(s, token, &view)?;
        if view.versions.is_empty() && view.tombstone.is_none() && rec.versions.is_empty() {
            return Err(self.not_found(token));
        }
        let located = self.locate(s, token, &view, &rec)?;
        let mut names: Vec<String> = view
            .versions
            .iter()
            .map(|v| self.object_name(token, &v.id))
            .chain(located.strays.iter().map(|o| o.name.clone()))
            .collect();
        let tombstone = match &view.tombstone {
            Some((_, t)) => t.clone(),
            None => self.leave_tombstone(s, &names)?,
        };
        // Every secret key under the label, custos version id or not (all
        // of it is the key's material), and the recorded versions found
        // elsewhere; grouped by the recorded version each holds, which is
        // recorded as destroyed once its last object is.
        let mut groups: std::collections::BTreeMap<Option<String>, Vec<ObjectHandle>> =
            std::collections::BTreeMap::new();
        for v in &view.versions {
            let id = hex::encode(&v.id);
            let version = located.in_place.contains(&id).then_some(id);
            groups.entry(version).or_default().push(v.handle);
        }
        for o in &located.strays {
            groups
                .entry(Some(o.version.clone()))
                .or_default()
                .push(o.handle);
        }
        // A crash between a C_DestroyObject and the record leaves a version
        // found nowhere and not recorded: the next shred refuses while the
        // token holds keys that give no check value (fail-safe, see
        // `pinning::search`).
        let last = groups.len();
        for (i, (version, handles)) in groups.into_iter().enumerate() {
            for h in handles {
                s.destroy_object(h).map_err(ck("C_DestroyObject"))?;
            }
            crate::hooks::crash_point(DESTROY_CRASH_SCOPE, "unrecorded");
            // Only a version that cannot have copies elsewhere: one that
            // may (copyable when adopted, or no check value to find them
            // by) is never excused from being found.
            if let Some(id) = version
                && rec
                    .versions
                    .get(&id)
                    .is_some_and(|p| !p.copyable && p.check.is_some())
            {
                self.record_destroyed(token, id)?;
            }
            if i + 1 < last {
                crate::hooks::crash_point(DESTROY_CRASH_SCOPE, "between-versions");
            }
        }
        self.prove_gone(s, token, &rec, located.scanned)?;
        let mut objects = tombstone.objects.clone();
        names.retain(|n| !objects.contains(n));
        objects.extend(names);
        Ok(Destruction {
            action: DestroyAction::ObjectsDestroyed,
            state_after: KeyState::Destroyed {
                destroyed_at: Some(tombstone.destroyed_at),
            },
            effective_at: tombstone.destroyed_at,
            objects,
        })
    }

    /// The destruction record, first, so that a destruction cut short is
    /// known as one (the key refuses all use) and the next one finishes it.
    fn leave_tombstone(&self, s: &Session, names: &[String]) -> Result<Tombstone, Fail> {
        let mut objects = names.to_vec();
        objects.sort();
        let t = Tombstone {
            destroyed_at: Utc::now(),
            objects,
        };
        let value =
            serde_json::to_vec(&t).map_err(|e| self.backend(format!("destruction record: {e}")))?;
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(self.uri.object.as_bytes().to_vec()),
            Attribute::Application(TOMBSTONE_APP.to_vec()),
            Attribute::Value(value),
        ])
        .map_err(ck("C_CreateObject (destruction record)"))?;
        crate::hooks::crash_point(DESTROY_CRASH_SCOPE, "recorded");
        Ok(t)
    }

    /// The proof: a search by label finds no secret key, and (when the
    /// shred had to search the token by check value) neither does a search
    /// for the recorded versions' material.
    fn prove_gone(
        &self,
        s: &Session,
        token: &Token,
        rec: &record::KeyObjects,
        scanned: bool,
    ) -> Result<(), Fail> {
        let after = self.read(s)?;
        if !after.versions.is_empty() {
            return Err(self.backend(format!(
                "{} object(s) labelled {:?} are still on the token after C_DestroyObject",
                after.versions.len(),
                self.uri.object
            )));
        }
        if !scanned {
            return Ok(());
        }
        let left = self.scan(s, token, &[], rec)?.strays;
        if left.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = left.iter().map(|o| o.name.as_str()).collect();
        Err(self.backend(format!(
            "objects holding recorded versions of {:?} are still on the token after C_DestroyObject: {}",
            self.uri.object,
            names.join(", ")
        )))
    }

    fn set_enabled(&self, s: &Session, token: &Token, enabled: bool) -> Result<View, Fail> {
        let view = self.read(s)?;
        match Self::state(&view) {
            KeyState::Enabled | KeyState::Disabled if view.versions.is_empty() => {
                return Err(self.not_found(token));
            }
            KeyState::Enabled | KeyState::Disabled => {}
            KeyState::Destroyed { destroyed_at } => {
                return Err(Fail::Key(KeyError::Destroyed {
                    key: self.key.clone(),
                    destroyed_at,
                }));
            }
            other => {
                return Err(Fail::Key(KeyError::Unavailable {
                    key: self.key.clone(),
                    message: format!("its destruction did not finish ({})", other.name()),
                }));
            }
        }
        for v in &view.versions {
            s.update_attributes(
                v.handle,
                &[Attribute::Encrypt(enabled), Attribute::Decrypt(enabled)],
            )
            .map_err(ck("C_SetAttributeValue (CKA_ENCRYPT, CKA_DECRYPT)"))?;
        }
        self.read(s)
    }
}

/// An object as a destruction names it.
fn object_name(token: &Token, label: &str, id: &[u8]) -> String {
    format!(
        "token={};serial={};object={label};id={}",
        token.label,
        token.serial,
        hex::encode(id)
    )
}

/// The `required` attributes of an object, and those of `optional` the
/// token gives. One C_GetAttributeValue for all where the token answers
/// it; else one per attribute (some tokens fail the whole template for
/// one attribute they do not keep: SoftHSM2 2.6 answers CKA_START_DATE of
/// a private object with CKR_GENERAL_ERROR, so `created_at` is unknown there).
fn attributes(
    s: &Session,
    handle: ObjectHandle,
    required: &[AttributeType],
    optional: &[AttributeType],
) -> Result<Vec<Attribute>, Fail> {
    let all: Vec<AttributeType> = required.iter().chain(optional).copied().collect();
    if let Ok(attrs) = s.get_attributes(handle, &all) {
        return Ok(attrs);
    }
    let mut out = Vec::with_capacity(all.len());
    for t in required {
        out.extend(
            s.get_attributes(handle, std::slice::from_ref(t))
                .map_err(ck("C_GetAttributeValue"))?,
        );
    }
    for t in optional {
        if let Ok(a) = s.get_attributes(handle, std::slice::from_ref(t)) {
            out.extend(a);
        }
    }
    Ok(out)
}

/// A token date as a day; `None` when empty or malformed.
fn date_of(d: &Date) -> Option<NaiveDate> {
    if d.is_empty() {
        return None;
    }
    let num = |b: &[u8]| std::str::from_utf8(b).ok()?.trim().parse::<u32>().ok();
    NaiveDate::from_ymd_opt(num(&d.year)? as i32, num(&d.month)?, num(&d.day)?)
}

#[async_trait]
impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Pkcs11
    }

    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let key2 = key.clone();
        self.run(key, "describe", move |_, s, token, c| {
            let view = c.read(s)?;
            if view.versions.is_empty() && view.tombstone.is_none() {
                return Err(c.not_found(token));
            }
            c.pinned(s, token, &view)?;
            Ok(c.info(&key2, token, &view))
        })
        .await
    }

    async fn create_key(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let key2 = key.clone();
        self.run(key, "create_key", move |pool, s, token, c| {
            let _writing = pool.writing();
            let view = c.read(s)?;
            if let Some((_, t)) = &view.tombstone {
                return Err(Fail::Key(KeyError::Destroyed {
                    key: c.key.clone(),
                    destroyed_at: Some(t.destroyed_at),
                }));
            }
            // Idempotent, like the local provider: an existing key is described.
            if !view.versions.is_empty() {
                c.pinned(s, token, &view)?;
                return Ok(c.info(&key2, token, &view));
            }
            c.refuse_if_moved(token)?;
            c.generate(s, token, 1)?;
            let view = c.read(s)?;
            Ok(c.info(&key2, token, &view))
        })
        .await
    }

    async fn generate_data_key(
        &self,
        key: &KeyRef,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        // custos's RNG (getrandom), as for the other providers; the token's
        // own C_GenerateRandom would add a call and no strength.
        let data_key = DataKey::generate();
        let wrapped = self.wrap(key, &data_key, ctx).await?;
        Ok((data_key, wrapped))
    }

    async fn wrap(
        &self,
        key: &KeyRef,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        let aad = ctx.canonical_bytes();
        let data_key = data_key.clone();
        self.run(key, "wrap", move |_, s, token, c| {
            let view = c.usable(s, token)?;
            let v = c.current(s, token, &view)?;
            let ciphertext = c.wrap(s, v, &data_key, &aad)?;
            Ok(WrappedKey {
                key_id: c.key_id(token),
                key_version: v.version.map(|n| n.to_string()),
                ciphertext,
            })
        })
        .await
    }

    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError> {
        let aad = ctx.canonical_bytes();
        let wrapped = wrapped.clone();
        self.run(key, "unwrap", move |_, s, token, c| {
            c.unwrap(s, token, &wrapped, &aad)
        })
        .await
    }

    async fn rotate(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let key2 = key.clone();
        self.run(key, "rotate", move |pool, s, token, c| {
            let _writing = pool.writing();
            let view = c.usable(s, token)?;
            let current = c.latest(&view)?.version.unwrap_or(0);
            let next = c.next_version(token, current)?;
            c.generate(s, token, next)?;
            let view = c.read(s)?;
            Ok(c.info(&key2, token, &view))
        })
        .await
    }

    async fn disable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let key2 = key.clone();
        self.run(key, "disable", move |pool, s, token, c| {
            let _writing = pool.writing();
            let view = c.set_enabled(s, token, false)?;
            Ok(c.info(&key2, token, &view))
        })
        .await
    }

    async fn enable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let key2 = key.clone();
        self.run(key, "enable", move |pool, s, token, c| {
            let _writing = pool.writing();
            let view = c.set_enabled(s, token, true)?;
            Ok(c.info(&key2, token, &view))
        })
        .await
    }

    async fn destroy(
        &self,
        key: &KeyRef,
        _pending_window_days: u32,
    ) -> Result<Destruction, KeyError> {
        // C_DestroyObject is immediate: there is no waiting period to honour.
        self.run(key, "destroy", move |pool, s, token, c| {
            let _writing = pool.writing();
            c.destroy(s, token)
        })
        .await
    }

    fn custody(&self, key: &KeyRef) -> Custody {
        let mut details = std::collections::BTreeMap::new();
        details.insert(
            "module".to_owned(),
            self.settings.module.display().to_string(),
        );
        let mut holder = "PKCS#11 token".to_owned();
        if let Ok(uri) = Pkcs11Uri::parse(key.id()) {
            let serial = uri.serial.clone().or_else(|| {
                let seen = self.pool.serials_of(&uri.token);
                (seen.len() == 1).then(|| seen[0].clone())
            });
            holder = format!(
                "PKCS#11 token {}{} via {}",
                uri.token,
                serial
                    .as_deref()
                    .map(|s| format!(" (serial {s})"))
                    .unwrap_or_default(),
                self.pool.module().display()
            );
            details.insert("token_label".to_owned(), uri.token);
            if let Some(s) = serial {
                details.insert("token_serial".to_owned(), s);
            }
            details.insert("object".to_owned(), uri.object);
        }
        Custody {
            provider: ProviderKind::Pkcs11,
            holder,
            details,
            network: self.settings.network,
        }
    }
}
