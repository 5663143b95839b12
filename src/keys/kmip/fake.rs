//! An in-memory KMIP key manager for unit tests: the provider's logic
//! against a server whose behaviour the test chooses (unique Names, small
//! Locate pages, destroyed objects kept or deleted, CBC without padding
//! offered or not), with real AES, so that envelopes open only with the
//! key the server holds.

use std::sync::Mutex;

use aes_gcm::aes::Aes256;
use aes_gcm::aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use async_trait::async_trait;
use kmip_protocol::types::common::{CryptographicAlgorithm, RevocationReasonCode, State};
use kmip_protocol::types::response::ResultReason;
use zeroize::Zeroizing;

use super::messages::{Attributes, Cipher, Filter, Request, Response};
use super::wire::{Link, WireError};

fn block_cipher(key: &[u8; 32]) -> Aes256 {
    Aes256::new(&Array::from(*key))
}

/// AES-256-CBC encryption, with PKCS#5 padding or (data a multiple of 16) none.
pub(super) fn cbc_encrypt(key: &[u8; 32], iv: [u8; 16], data: &[u8], pad: bool) -> Vec<u8> {
    let mut buf = data.to_vec();
    if pad {
        let n = 16 - buf.len() % 16;
        buf.extend(std::iter::repeat_n(n as u8, n));
    }
    assert_eq!(buf.len() % 16, 0, "CBC without padding takes whole blocks");
    let c = block_cipher(key);
    let mut prev = iv;
    for chunk in buf.chunks_mut(16) {
        let mut b = Array::from(std::array::from_fn::<u8, 16, _>(|i| chunk[i] ^ prev[i]));
        c.encrypt_block(&mut b);
        chunk.copy_from_slice(&b);
        prev.copy_from_slice(&b);
    }
    buf
}

/// AES-256-CBC decryption; `None` for a length or padding the mode refuses.
pub(super) fn cbc_decrypt(key: &[u8; 32], iv: [u8; 16], data: &[u8], pad: bool) -> Option<Vec<u8>> {
    if data.is_empty() || !data.len().is_multiple_of(16) {
        return None;
    }
    let c = block_cipher(key);
    let mut prev = iv;
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(16) {
        let mut b = Array::from(<[u8; 16]>::try_from(chunk).ok()?);
        c.decrypt_block(&mut b);
        out.extend(b.iter().zip(prev).map(|(x, p)| x ^ p));
        prev.copy_from_slice(chunk);
    }
    if pad {
        let n = *out.last()? as usize;
        if n == 0 || n > 16 || !out[out.len() - n..].iter().all(|&b| b as usize == n) {
            return None;
        }
        out.truncate(out.len() - n);
    }
    Some(out)
}

/// AES-256-CTR: counter blocks IV, IV+1, … (a 128-bit big-endian counter).
pub(super) fn ctr(key: &[u8; 32], iv: [u8; 16], data: &[u8]) -> Vec<u8> {
    let c = block_cipher(key);
    let mut counter = u128::from_be_bytes(iv);
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(16) {
        let mut b = Array::from(counter.to_be_bytes());
        c.encrypt_block(&mut b);
        out.extend(chunk.iter().zip(b.iter()).map(|(x, k)| x ^ k));
        counter = counter.wrapping_add(1);
    }
    out
}

/// What the server's Encrypt or Decrypt with `cipher` answers, if anything.
fn crypt(
    key: &[u8; 32],
    cipher: Cipher,
    decrypt: bool,
    iv: [u8; 16],
    data: &[u8],
) -> Option<Vec<u8>> {
    let pad = cipher == Cipher::CbcPkcs5;
    match (cipher, decrypt) {
        (Cipher::Ctr, _) => Some(ctr(key, iv, data)),
        (_, false) => {
            (pad || data.len().is_multiple_of(16)).then(|| cbc_encrypt(key, iv, data, pad))
        }
        (_, true) => cbc_decrypt(key, iv, data, pad),
    }
}

/// How the fake key manager behaves.
#[derive(Debug, Clone)]
pub(super) struct Behaviour {
    /// Refuse a Create whose Name another object already carries (most
    /// enterprise key managers; PyKMIP does not).
    pub unique_names: bool,
    /// Keep destroyed objects (State Destroyed, as KMIP says) rather than
    /// delete them (PyKMIP).
    pub keep_destroyed: bool,
    /// Offer CBC without padding (PyKMIP does not).
    pub cbc_without_padding: bool,
    /// Never answer more than this many identifiers to one Locate.
    pub page_cap: usize,
    /// Answer Located Items (KMIP 1.3; PyKMIP does not).
    pub located_items: bool,
    /// Give a new object the identifier after the highest held, so that
    /// a deleted top identifier is given again (PyKMIP's SQLite rowid).
    pub reuse_ids: bool,
    /// Refuse Sensitive (a server without KMIP 1.4).
    pub refuses_sensitive: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            unique_names: true,
            keep_destroyed: false,
            cbc_without_padding: true,
            page_cap: usize::MAX,
            located_items: false,
            reuse_ids: false,
            refuses_sensitive: false,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Object {
    pub uid: String,
    pub bits: i32,
    pub state: State,
    pub names: Vec<String>,
    pub groups: Vec<String>,
    pub usage_mask: i32,
    /// Created with Sensitive = true.
    pub sensitive: bool,
    material: [u8; 32],
}

#[derive(Default)]
struct Store {
    objects: Vec<Object>,
    next: u64,
    log: Vec<String>,
}

impl Store {
    fn new_uid(&mut self, reuse: bool) -> String {
        if reuse {
            self.next = self
                .objects
                .iter()
                .filter_map(|o| o.uid.parse::<u64>().ok())
                .max()
                .unwrap_or(0);
        }
        self.next += 1;
        self.next.to_string()
    }

    fn find(&mut self, uid: &str) -> Result<&mut Object, WireError> {
        self.objects
            .iter_mut()
            .find(|o| o.uid == uid)
            .ok_or_else(|| failed(ResultReason::ItemNotFound, "no such object"))
    }
}

pub(super) struct FakeKmip {
    pub behaviour: Behaviour,
    store: Mutex<Store>,
}

fn failed(reason: ResultReason, message: &str) -> WireError {
    WireError::Failed {
        reason: Some(reason),
        message: message.into(),
    }
}

impl FakeKmip {
    pub(super) fn new(behaviour: Behaviour) -> Self {
        FakeKmip {
            behaviour,
            store: Mutex::new(Store::default()),
        }
    }

    /// Every object the server holds, oldest first.
    pub(super) fn objects(&self) -> Vec<Object> {
        self.store.lock().unwrap().objects.clone()
    }

    /// The operations received, oldest first (`Decrypt`, `Locate`, …).
    pub(super) fn log(&self) -> Vec<String> {
        self.store.lock().unwrap().log.clone()
    }

    pub(super) fn clear_log(&self) {
        self.store.lock().unwrap().log.clear();
    }

    /// Puts an object on the server as another client (or an older custos) would.
    pub(super) fn insert(&self, names: &[&str], groups: &[&str], state: State) -> String {
        let mut s = self.store.lock().unwrap();
        let uid = s.new_uid(self.behaviour.reuse_ids);
        s.objects.push(Object {
            uid: uid.clone(),
            bits: 256,
            state,
            names: names.iter().map(|n| n.to_string()).collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            usage_mask: 0x4 | 0x8,
            sensitive: false,
            material: crate::util::random_bytes::<32>(),
        });
        uid
    }

    /// Deletes an object as another client would.
    pub(super) fn remove(&self, uid: &str) {
        self.store.lock().unwrap().objects.retain(|o| o.uid != uid);
    }

    /// Gives an object other Names and Object Groups, as another client can
    /// (Modify Attribute, Delete Attribute).
    pub(super) fn rename(&self, uid: &str, names: &[&str], groups: &[&str]) {
        if let Ok(o) = self.store.lock().unwrap().find(uid) {
            o.names = names.iter().map(|n| n.to_string()).collect();
            o.groups = groups.iter().map(|g| g.to_string()).collect();
        }
    }

    pub(super) fn set_bits(&self, uid: &str, bits: i32) {
        if let Ok(o) = self.store.lock().unwrap().find(uid) {
            o.bits = bits;
        }
    }

    /// Encrypts as the server would with object `uid` (tests that make
    /// envelopes of an older format).
    pub(super) fn encrypt_as_server(
        &self,
        uid: &str,
        cipher: Cipher,
        iv: [u8; 16],
        data: &[u8],
    ) -> Vec<u8> {
        let mut s = self.store.lock().unwrap();
        let o = s.find(uid).unwrap();
        crypt(&o.material, cipher, false, iv, data).unwrap()
    }

    fn handle(&self, req: Request) -> Result<Response, WireError> {
        let mut s = self.store.lock().unwrap();
        s.log.push(format!("{:?}", req.operation()));
        match req {
            Request::Create(t) => {
                if t.sensitive && self.behaviour.refuses_sensitive {
                    return Err(failed(
                        ResultReason::InvalidMessage,
                        "protocol version 1.4 is not supported",
                    ));
                }
                if self.behaviour.unique_names
                    && let Some(n) = t
                        .names
                        .iter()
                        .find(|n| s.objects.iter().any(|o| o.names.contains(n)))
                {
                    return Err(failed(
                        ResultReason::InvalidField,
                        &format!("the name {n} is already in use"),
                    ));
                }
                let uid = s.new_uid(self.behaviour.reuse_ids);
                s.objects.push(Object {
                    uid: uid.clone(),
                    bits: t.bits,
                    state: State::PreActive,
                    names: t.names,
                    groups: vec![t.group],
                    usage_mask: t.usage_mask,
                    sensitive: t.sensitive,
                    material: crate::util::random_bytes::<32>(),
                });
                Ok(Response::Created(uid))
            }
            Request::Activate(uid) => {
                let o = s.find(&uid)?;
                if o.state != State::PreActive {
                    return Err(failed(ResultReason::PermissionDenied, "not Pre-Active"));
                }
                o.state = State::Active;
                Ok(Response::Done)
            }
            Request::Revoke {
                uid,
                reason,
                compromised_at,
            } => {
                let o = s.find(&uid)?;
                o.state = match (reason, o.state) {
                    (RevocationReasonCode::KeyCompromise, State::Destroyed) => {
                        State::DestroyedCompromised
                    }
                    (RevocationReasonCode::KeyCompromise, _) if compromised_at.is_some() => {
                        State::Compromised
                    }
                    (RevocationReasonCode::KeyCompromise, _) => {
                        return Err(failed(ResultReason::InvalidField, "no compromise date"));
                    }
                    (_, State::Active) => State::Deactivated,
                    _ => return Err(failed(ResultReason::PermissionDenied, "not Active")),
                };
                Ok(Response::Done)
            }
            Request::Destroy(uid) => {
                let i = s
                    .objects
                    .iter()
                    .position(|o| o.uid == uid)
                    .ok_or_else(|| failed(ResultReason::ItemNotFound, "no such object"))?;
                match s.objects[i].state {
                    State::Active => {
                        return Err(failed(ResultReason::PermissionDenied, "object is Active"));
                    }
                    State::Compromised if self.behaviour.keep_destroyed => {
                        s.objects[i].state = State::DestroyedCompromised;
                    }
                    _ if self.behaviour.keep_destroyed => s.objects[i].state = State::Destroyed,
                    _ => {
                        s.objects.remove(i);
                        return Ok(Response::Done);
                    }
                }
                s.objects[i].material = [0; 32];
                Ok(Response::Done)
            }
            Request::Locate {
                filter,
                max_items,
                offset_items,
            } => {
                // Newest first, as PyKMIP answers.
                let matching: Vec<_> = s
                    .objects
                    .iter()
                    .rev()
                    .filter(|o| match &filter {
                        Filter::Name(n) => o.names.contains(n),
                        Filter::Group(g) => o.groups.contains(g),
                    })
                    .collect();
                let take = usize::try_from(max_items)
                    .unwrap_or(0)
                    .min(self.behaviour.page_cap);
                Ok(Response::Located {
                    total: self
                        .behaviour
                        .located_items
                        .then(|| i32::try_from(matching.len()).unwrap()),
                    uids: matching
                        .into_iter()
                        .skip(usize::try_from(offset_items).unwrap_or(0))
                        .take(take)
                        .map(|o| o.uid.clone())
                        .collect(),
                })
            }
            Request::GetAttributes(uid) => {
                let o = s.find(&uid)?;
                Ok(Response::Attributes(Attributes {
                    uid: o.uid.clone(),
                    state: Some(o.state),
                    names: o.names.clone(),
                    groups: o.groups.clone(),
                    algorithm: Some(CryptographicAlgorithm::AES),
                    bits: Some(o.bits),
                }))
            }
            Request::Crypt {
                decrypt,
                uid,
                cipher,
                iv,
                data,
            } => {
                let o = s.find(&uid)?;
                let usable = match decrypt {
                    // KMIP lets a Deactivated key still decrypt.
                    true => {
                        matches!(o.state, State::Active | State::Deactivated)
                            && o.usage_mask & 0x8 != 0
                    }
                    false => o.state == State::Active && o.usage_mask & 0x4 != 0,
                };
                if !usable {
                    return Err(failed(ResultReason::PermissionDenied, "object not usable"));
                }
                if cipher == Cipher::Cbc && !self.behaviour.cbc_without_padding {
                    return Err(failed(
                        ResultReason::InvalidField,
                        "Padding method 'PaddingMethod.NONE' is not supported.",
                    ));
                }
                crypt(&o.material, cipher, decrypt, iv, &data)
                    .map(|d| Response::Data {
                        uid: uid.clone(),
                        data: Zeroizing::new(d),
                        iv: None,
                    })
                    .ok_or_else(|| {
                        failed(ResultReason::CryptographicFailure, "bad padding or length")
                    })
            }
        }
    }
}

#[async_trait]
impl Link for FakeKmip {
    async fn call(&self, req: Request) -> Result<Response, WireError> {
        self.handle(req)
    }
}

#[async_trait]
impl Link for std::sync::Arc<FakeKmip> {
    async fn call(&self, req: Request) -> Result<Response, WireError> {
        self.handle(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// NIST SP 800-38A, F.2.5 (CBC-AES256) and F.5.5 (CTR-AES256), first two blocks.
    #[test]
    fn block_modes_match_nist_sp_800_38a() {
        let key: [u8; 32] = h("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
            .try_into()
            .unwrap();
        let plain = h("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51");
        let iv: [u8; 16] = h("000102030405060708090a0b0c0d0e0f").try_into().unwrap();
        let cbc = cbc_encrypt(&key, iv, &plain, false);
        assert_eq!(
            hex::encode(&cbc),
            "f58c4c04d6e5f1ba779eabfb5f7bfbd69cfc4e967edb808d679f777bc6702c7d"
        );
        assert_eq!(cbc_decrypt(&key, iv, &cbc, false).unwrap(), plain);
        let counter: [u8; 16] = h("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap();
        assert_eq!(
            hex::encode(ctr(&key, counter, &plain)),
            "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
        );
        // PKCS#5: a whole block of 0x10 after 32 bytes, checked on the way back.
        let padded = cbc_encrypt(&key, iv, &plain, true);
        assert_eq!(padded.len(), 48);
        assert_eq!(cbc_decrypt(&key, iv, &padded, true).unwrap(), plain);
        assert_eq!(cbc_decrypt(&key, iv, &cbc, true), None);
    }
}
