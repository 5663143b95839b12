//! The KMIP envelope (docs/FORMAT.md §3, "KMIP envelope"):
//!
//! ```text
//! u8 format = 1 (server AES-256-CBC/PKCS#5 wraps WK; AES-256-GCM seals the data key under WK)
//! u16 BE uid length ‖ uid            the CMK version object (Unique Identifier)
//! 16-byte IV                          of the server's CBC encryption of WK
//! u16 BE length ‖ E_CMK(WK)           48 bytes for a 32-byte WK
//! 12-byte nonce ‖ GCM ciphertext (32) ‖ tag (16)
//! AAD = "custos-kmip-wrap-v1" ‖ u16 BE uid length ‖ uid ‖ WrapContext::canonical_bytes()
//! ```

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use zeroize::Zeroizing;

use crate::keys::{DataKey, KEY_LEN, SecretKey, WrapContext};

pub const FORMAT: u8 = 1;
const LABEL: &[u8] = b"custos-kmip-wrap-v1";
const MAX_UID: usize = 1024;

fn aad(uid: &str, ctx: &WrapContext) -> Vec<u8> {
    let mut out = LABEL.to_vec();
    out.extend_from_slice(&(uid.len() as u16).to_be_bytes());
    out.extend_from_slice(uid.as_bytes());
    out.extend_from_slice(&ctx.canonical_bytes());
    out
}

/// Seals `data_key` under `wk`; `wk_ct` is the server's encryption of `wk`.
/// The one answer to an envelope that does not open, whether the server
/// could not decrypt WK (bad CBC padding) or WK does not open the seal: two
/// answers would let whoever can alter stored envelopes use custos as a
/// padding oracle against the server's CBC.
pub const REFUSED: &str =
    "the wrapped key does not open under this key: tampered envelope or wrong context";

pub fn seal(
    uid: &str,
    iv: [u8; 16],
    wk_ct: &[u8],
    wk: &SecretKey,
    data_key: &DataKey,
    ctx: &WrapContext,
) -> Result<Vec<u8>, String> {
    if uid.len() > MAX_UID || wk_ct.len() > u16::MAX as usize {
        return Err("the KMIP server answered an oversized identifier or ciphertext".into());
    }
    let nonce = crate::util::random_bytes::<12>();
    let mut buf = Zeroizing::new(data_key.expose().to_vec());
    let cipher = Aes256Gcm::new_from_slice(wk.expose()).map_err(|e| e.to_string())?;
    let tag = cipher
        .encrypt_inout_detached(&nonce.into(), &aad(uid, ctx), buf.as_mut_slice().into())
        .map_err(|e| format!("sealing the data key failed: {e}"))?;
    let mut out = Vec::with_capacity(1 + 2 + uid.len() + 16 + 2 + wk_ct.len() + 12 + 48);
    out.push(FORMAT);
    out.extend_from_slice(&(uid.len() as u16).to_be_bytes());
    out.extend_from_slice(uid.as_bytes());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&(wk_ct.len() as u16).to_be_bytes());
    out.extend_from_slice(wk_ct);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// A parsed envelope, borrowing the bytes.
pub struct Envelope<'a> {
    pub uid: &'a str,
    pub iv: [u8; 16],
    pub wk_ct: &'a [u8],
    nonce: [u8; 12],
    sealed: &'a [u8],
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the KMIP envelope is truncated".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<usize, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
}

impl<'a> Envelope<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let mut c = Cursor(bytes);
        let format = c.take(1)?[0];
        if format != FORMAT {
            return Err(format!(
                "not a KMIP envelope of format {FORMAT} (byte {format})"
            ));
        }
        let n = c.u16()?;
        let uid = std::str::from_utf8(c.take(n)?)
            .map_err(|_| "the KMIP envelope names a non-UTF-8 object".to_owned())?;
        let mut iv = [0u8; 16];
        iv.copy_from_slice(c.take(16)?);
        let n = c.u16()?;
        let wk_ct = c.take(n)?;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(c.take(12)?);
        let sealed = c.take(KEY_LEN + 16)?;
        if !c.0.is_empty() {
            return Err("the KMIP envelope has trailing bytes".into());
        }
        Ok(Envelope {
            uid,
            iv,
            wk_ct,
            nonce,
            sealed,
        })
    }

    /// Opens the seal with the WK the server decrypted.
    pub fn open(&self, wk: &[u8], ctx: &WrapContext) -> Result<DataKey, String> {
        let refused = || REFUSED.to_owned();
        let cipher = Aes256Gcm::new_from_slice(wk).map_err(|_| refused())?;
        let mut buf = Zeroizing::new(self.sealed[..KEY_LEN].to_vec());
        let tag: [u8; 16] = self.sealed[KEY_LEN..].try_into().map_err(|_| refused())?;
        cipher
            .decrypt_inout_detached(
                &self.nonce.into(),
                &aad(self.uid, ctx),
                buf.as_mut_slice().into(),
                &tag.into(),
            )
            .map_err(|_| refused())?;
        SecretKey::from_slice(&buf).ok_or_else(refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TenantId;

    #[test]
    fn seals_and_opens_only_under_the_same_context() {
        let t = TenantId::new("acme").unwrap();
        let ctx = WrapContext::tdk(&t, 1);
        let wk = SecretKey::generate();
        let dk = SecretKey::generate();
        let bytes = seal("42", [7; 16], &[1; 48], &wk, &dk, &ctx).unwrap();
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.uid, "42");
        assert_eq!(env.wk_ct, &[1; 48]);
        assert_eq!(env.open(wk.expose(), &ctx).unwrap(), dk);
        assert!(env.open(wk.expose(), &WrapContext::tdk(&t, 2)).is_err());
        assert!(env.open(SecretKey::generate().expose(), &ctx).is_err());
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(
            Envelope::parse(&bad)
                .unwrap()
                .open(wk.expose(), &ctx)
                .is_err()
        );
        // Another object named: the AAD differs.
        let mut moved = bytes.clone();
        moved[3] = b'3';
        assert!(
            Envelope::parse(&moved)
                .unwrap()
                .open(wk.expose(), &ctx)
                .is_err()
        );
        for cut in 0..bytes.len() {
            assert!(Envelope::parse(&bytes[..cut]).is_err(), "{cut}");
        }
    }
}
