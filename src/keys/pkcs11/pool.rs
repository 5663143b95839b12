//! The PKCS#11 module, the tokens found in it and a pool of logged-in
//! sessions. Everything here blocks (it calls into the module); the provider
//! runs it on tokio's blocking threads, under a timeout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::uri::Pkcs11Uri;
use crate::keys::KeyError;

/// One context per module per process. `C_Initialize` may be called once
/// per process, and every provider in it (a configuration reload, tests)
/// shares the module's login state anyway; contexts are never finalized.
static MODULES: Mutex<BTreeMap<PathBuf, Module>> = Mutex::new(BTreeMap::new());

/// A loaded module and the lock that serialises calls into it.
#[derive(Clone)]
pub(super) struct Module {
    pub ctx: Pkcs11,
    /// Taken, across every provider of the process, by what creates,
    /// changes or destroys token objects; by every call where the module is
    /// SoftHSM2. SoftHSM2 2.6.1 fails object writes that run beside other
    /// calls from other threads with CKR_GENERAL_ERROR (SoftHSMv2#573;
    /// parsec serialises its PKCS#11 provider for the same reason). Key
    /// administration is rare, so an HSM loses nothing to the write lock.
    pub lock: Arc<Mutex<()>>,
    /// The module is SoftHSM2: every call takes [`Self::lock`].
    pub serialise_all: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent at every await-free step:
    // a panicking holder leaves nothing half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads and initialises the module at `path` (once per process).
pub(super) fn load_module(path: &Path) -> Result<Module, String> {
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("PKCS#11 module {}: {e}", path.display()))?;
    let mut modules = lock(&MODULES);
    if let Some(module) = modules.get(&canonical) {
        return Ok(module.clone());
    }
    let ctx = Pkcs11::new(&canonical)
        .map_err(|e| format!("cannot load PKCS#11 module {}: {e}", canonical.display()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "C_Initialize of PKCS#11 module {} failed: {}",
                canonical.display(),
                short(&e)
            ));
        }
    }
    let serialise_all = ctx
        .get_library_info()
        .is_ok_and(|i| i.manufacturer_id().trim_end().starts_with("SoftHSM"));
    let module = Module {
        ctx,
        lock: Arc::default(),
        serialise_all,
    };
    modules.insert(canonical, module.clone());
    Ok(module)
}

/// The lock custos takes around every write to the token objects of the
/// module at `path` in this process, and around every call on SoftHSM2 (see
/// [`Module::lock`]). Other code in the process that calls the same module
/// should take it around its writes.
pub fn module_lock(path: &Path) -> Result<Arc<Mutex<()>>, String> {
    load_module(path).map(|m| m.lock)
}

/// A PKCS#11 error in one line: the function and the `CKR_` name, not the
/// specification's paragraph that cryptoki's `Display` prints.
pub(super) fn short(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?}: {rv:?}"),
        other => other.to_string(),
    }
}

/// A token the provider found, by label (and serial), never by slot number:
/// slot ids change when tokens are added or re-initialised.
#[derive(Debug, Clone)]
pub(super) struct Token {
    pub slot: Slot,
    pub label: String,
    pub serial: String,
}

/// Why an operation failed: already a [`KeyError`], or a PKCS#11 error of
/// the function named, mapped by [`map_ck`] once the key is known.
pub(super) enum Fail {
    Key(KeyError),
    Ck(&'static str, CkError),
}

impl From<KeyError> for Fail {
    fn from(e: KeyError) -> Self {
        Fail::Key(e)
    }
}

/// `map_err` helper: a PKCS#11 error of `what`.
pub(super) fn ck(what: &'static str) -> impl Fn(CkError) -> Fail {
    move |e| Fail::Ck(what, e)
}

fn unavailable(key: &str, message: String) -> KeyError {
    KeyError::Unavailable {
        key: key.to_owned(),
        message,
    }
}

/// The `KeyError` of a PKCS#11 error: the token's state (absent, locked,
/// out of sessions) is `key_unavailable`; a refused PIN is access denied.
pub(super) fn map_ck(key: &str, what: &str, e: &CkError) -> KeyError {
    let message = format!("{what}: {}", short(e));
    match e {
        CkError::Pkcs11(rv, _) => match rv {
            RvError::PinIncorrect
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired => KeyError::AccessDenied {
                key: key.to_owned(),
                message,
            },
            RvError::KeyFunctionNotPermitted => KeyError::Disabled {
                key: key.to_owned(),
            },
            RvError::PinLocked
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::DeviceMemory
            | RvError::SessionCount
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::SlotIdInvalid
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized => unavailable(key, message),
            _ => KeyError::Backend {
                provider: "pkcs11",
                key: key.to_owned(),
                message,
            },
        },
        _ => KeyError::Backend {
            provider: "pkcs11",
            key: key.to_owned(),
            message,
        },
    }
}

/// Errors after which a session (and the slot it was opened on) is not
/// worth keeping: the token went away or the session was closed under us.
fn is_dead(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid
                | RvError::UserNotLoggedIn,
            _
        )
    )
}

/// The module, its tokens and the idle sessions. Bounded from outside: the
/// provider holds one semaphore permit per session in use, so at most
/// `max_sessions` sessions are ever open or being opened.
pub(super) struct Pool {
    ctx: Pkcs11,
    module: PathBuf,
    pin: AuthPin,
    /// Where the PIN came from, for messages (never the PIN).
    pin_source: String,
    /// Resolved tokens by (label, serial asked for).
    tokens: Mutex<HashMap<(String, Option<String>), Token>>,
    /// Idle logged-in sessions by slot id.
    idle: Mutex<HashMap<u64, Vec<Session>>>,
    /// Serials of tokens that refused the PIN: custos does not try again
    /// (an HSM locks the PIN, some erase the partition, after a few failures).
    refused: Mutex<BTreeSet<String>>,
    /// Labels and serials of the tokens seen, for custody reports.
    seen: Mutex<BTreeMap<String, BTreeSet<String>>>,
    /// Serialises key creation, rotation, state changes and destruction in
    /// this process, across providers of the same module (a tenant's lease
    /// serialises them across processes: one key, one tenant).
    admin: Arc<Mutex<()>>,
    /// Every call takes `admin` (SoftHSM2, see [`Module::serialise_all`]).
    serialise_all: bool,
}

impl Pool {
    pub fn new(loaded: Module, module: PathBuf, pin: AuthPin, pin_source: String) -> Self {
        let pool = Pool {
            ctx: loaded.ctx,
            module,
            pin,
            pin_source,
            tokens: Mutex::default(),
            idle: Mutex::default(),
            refused: Mutex::default(),
            seen: Mutex::default(),
            admin: loaded.lock,
            serialise_all: loaded.serialise_all,
        };
        // What tokens there are, for custody; an error here is not fatal
        // (a token may be plugged in later).
        let _ = pool.scan();
        pool
    }

    /// Held while token objects are created, changed or destroyed (already
    /// held by the whole call where every call takes it).
    pub fn writing(&self) -> Option<MutexGuard<'_, ()>> {
        (!self.serialise_all).then(|| lock(&self.admin))
    }

    /// Held by a whole call, where the module needs every call serialised.
    pub fn calling(&self) -> Option<MutexGuard<'_, ()>> {
        self.serialise_all.then(|| lock(&self.admin))
    }

    pub fn module(&self) -> &Path {
        &self.module
    }

    /// Serials seen for a token label.
    pub fn serials_of(&self, label: &str) -> Vec<String> {
        lock(&self.seen)
            .get(label)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every token present: (slot, label, serial).
    fn scan(&self) -> Result<Vec<Token>, CkError> {
        let mut out = Vec::new();
        for slot in self.ctx.get_slots_with_token()? {
            let info = match self.ctx.get_token_info(slot) {
                Ok(i) => i,
                // A token removed between the two calls.
                Err(_) => continue,
            };
            let token = Token {
                slot,
                label: info.label().trim_end().to_owned(),
                serial: info.serial_number().trim_end().to_owned(),
            };
            lock(&self.seen)
                .entry(token.label.clone())
                .or_default()
                .insert(token.serial.clone());
            out.push(token);
        }
        Ok(out)
    }

    /// The token a reference names: by label, and serial when given. Absent
    /// or ambiguous is `key_unavailable`, never "key not found".
    fn token(&self, key: &str, uri: &Pkcs11Uri) -> Result<Token, KeyError> {
        let wanted = (uri.token.clone(), uri.serial.clone());
        if let Some(t) = lock(&self.tokens).get(&wanted) {
            return Ok(t.clone());
        }
        let all = self
            .scan()
            .map_err(|e| map_ck(key, "listing the module's tokens", &e))?;
        let matching: Vec<&Token> = all
            .iter()
            .filter(|t| t.label == uri.token && uri.serial.as_deref().is_none_or(|s| s == t.serial))
            .collect();
        let token = match matching.as_slice() {
            [one] => (*one).clone(),
            [] => {
                let present: Vec<String> = all
                    .iter()
                    .map(|t| format!("{:?} (serial {})", t.label, t.serial))
                    .collect();
                return Err(unavailable(
                    key,
                    format!(
                        "no token labelled {:?}{} in PKCS#11 module {} (tokens present: {})",
                        uri.token,
                        uri.serial
                            .as_deref()
                            .map(|s| format!(" with serial {s}"))
                            .unwrap_or_default(),
                        self.module.display(),
                        if present.is_empty() {
                            "none".to_owned()
                        } else {
                            present.join(", ")
                        }
                    ),
                ));
            }
            many => {
                return Err(unavailable(
                    key,
                    format!(
                        "{} tokens are labelled {:?} in PKCS#11 module {}: add serial=<serial> to the key reference ({})",
                        many.len(),
                        uri.token,
                        self.module.display(),
                        many.iter()
                            .map(|t| t.serial.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        };
        lock(&self.tokens).insert(wanted, token.clone());
        Ok(token)
    }

    /// Drops what is known about a token that failed: its cached slot and
    /// its idle sessions (the next use finds it again, by label).
    fn forget(&self, token: &Token) {
        lock(&self.tokens).retain(|_, t| t.slot != token.slot);
        lock(&self.idle).remove(&token.slot.id());
    }

    /// Whether the slot still holds the token found there (label and
    /// serial, `C_GetTokenInfo`): a token swapped since (another token in
    /// the same reader or slot) must not receive this key's operations.
    /// A swap forgets the slot (`Ok(false)`): the next lookup finds the
    /// token by label and serial again.
    fn still_there(&self, key: &str, token: &Token) -> Result<bool, KeyError> {
        let info = match self.ctx.get_token_info(token.slot) {
            Ok(i) => i,
            Err(e) => {
                if is_dead(&e) {
                    self.forget(token);
                }
                return Err(map_ck(key, "reading the token's information", &e));
            }
        };
        let (label, serial) = (info.label().trim_end(), info.serial_number().trim_end());
        if label == token.label && serial == token.serial {
            return Ok(true);
        }
        tracing::warn!(event = "pkcs11.token_swapped", key = %key, slot = token.slot.id(), expected_label = %token.label, expected_serial = %token.serial, found_label = %label, found_serial = %serial, "the token in this slot changed since custos found it");
        self.forget(token);
        Ok(false)
    }

    /// An idle session of `token`, or a new one, logged in, once the slot
    /// is confirmed to hold that token still. `Ok(None)`: it no longer does.
    fn checkout(&self, key: &str, token: &Token) -> Result<Option<Session>, KeyError> {
        if let Some(s) = lock(&self.idle)
            .get_mut(&token.slot.id())
            .and_then(Vec::pop)
        {
            return Ok(Some(s));
        }
        // Every new session checks the token again (one C_GetTokenInfo):
        // the slot was resolved by label and serial once, and a token can be
        // swapped under a running daemon.
        if !self.still_there(key, token)? {
            return Ok(None);
        }
        if lock(&self.refused).contains(&token.serial) {
            return Err(KeyError::AccessDenied {
                key: key.to_owned(),
                message: format!(
                    "token {:?} (serial {}) refused the PIN from {} earlier; custos does not try a refused PIN again \
                     (HSMs lock the PIN after a few failures): fix the PIN and restart custos",
                    token.label, token.serial, self.pin_source
                ),
            });
        }
        let session = self.ctx.open_rw_session(token.slot).map_err(|e| {
            if is_dead(&e) {
                self.forget(token);
            }
            match e {
                CkError::Pkcs11(RvError::SessionCount, _) => unavailable(
                    key,
                    format!(
                        "token {:?} has no free session (C_OpenSession: SessionCount); lower [pkcs11] max_sessions or close other applications' sessions",
                        token.label
                    ),
                ),
                e => map_ck(key, "opening a session", &e),
            }
        })?;
        // Login is per application and token: once one session is logged in,
        // every session is, and C_Login answers UserAlreadyLoggedIn.
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(Some(session)),
            Err(
                e @ CkError::Pkcs11(
                    RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                    _,
                ),
            ) => {
                lock(&self.refused).insert(token.serial.clone());
                Err(KeyError::AccessDenied {
                    key: key.to_owned(),
                    message: format!(
                        "token {:?} (serial {}) refused the PIN from {} ({}); custos will not try it again until restarted",
                        token.label,
                        token.serial,
                        self.pin_source,
                        short(&e)
                    ),
                })
            }
            Err(e @ CkError::Pkcs11(RvError::PinLocked, _)) => Err(unavailable(
                key,
                format!(
                    "the user PIN of token {:?} (serial {}) is locked ({}): the token's security officer must unlock it",
                    token.label,
                    token.serial,
                    short(&e)
                ),
            )),
            Err(e) => {
                if is_dead(&e) {
                    self.forget(token);
                }
                Err(map_ck(key, "logging in", &e))
            }
        }
    }

    fn checkin(&self, token: &Token, session: Session) {
        lock(&self.idle)
            .entry(token.slot.id())
            .or_default()
            .push(session);
    }

    /// Runs `f` on a logged-in session of the token `uri` names. The
    /// session goes back to the pool unless the token failed under it.
    pub fn with_session<T>(
        &self,
        key: &str,
        uri: &Pkcs11Uri,
        f: impl FnOnce(&Session, &Token) -> Result<T, Fail>,
    ) -> Result<T, KeyError> {
        let mut token = self.token(key, uri)?;
        let session = match self.checkout(key, &token)? {
            Some(s) => s,
            // Swapped: found again by label and serial (or absent), once.
            None => {
                token = self.token(key, uri)?;
                self.checkout(key, &token)?.ok_or_else(|| {
                    unavailable(
                        key,
                        format!(
                            "the token in the slot of {:?} changed twice while custos opened a session: try again",
                            uri.token
                        ),
                    )
                })?
            }
        };
        match f(&session, &token) {
            Ok(v) => {
                self.checkin(&token, session);
                Ok(v)
            }
            Err(Fail::Key(e)) => {
                self.checkin(&token, session);
                Err(e)
            }
            Err(Fail::Ck(what, e)) => {
                if is_dead(&e) {
                    drop(session);
                    self.forget(&token);
                } else {
                    self.checkin(&token, session);
                }
                Err(map_ck(key, what, &e))
            }
        }
    }
}
