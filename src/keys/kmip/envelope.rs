//! The KMIP envelope (docs/FORMAT.md §3, "KMIP envelope"). Format 2, what
//! custos writes:
//!
//! ```text
//! u8 format = 2
//! u8 mode                  1 = server AES-256-CBC without padding, 2 = AES-256-CTR
//! u16 BE uid length ‖ uid  the CMK version object (Unique Identifier)
//! 16-byte IV               of the server's encryption of WK
//! E_CMK(WK)                32 bytes: no padding, so the server cannot refuse a Decrypt for it
//! 12-byte nonce ‖ GCM ciphertext (32) ‖ tag (16)
//! AAD = "custos-kmip-wrap-v2" ‖ every byte above the nonce ‖ WrapContext::canonical_bytes()
//! ```
//!
//! Format 1 (still unwrapped, never written): no mode byte, CBC with PKCS#5
//! padding, `u16 BE length ‖ E_CMK(WK)` (48 bytes), and
//! AAD = "custos-kmip-wrap-v1" ‖ u16 BE uid length ‖ uid ‖ context.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use zeroize::Zeroizing;

use super::messages::Cipher;
use crate::keys::{DataKey, KEY_LEN, SecretKey, WrapContext};

/// The format custos writes.
pub const FORMAT: u8 = 2;
const LABEL_V1: &[u8] = b"custos-kmip-wrap-v1";
const LABEL_V2: &[u8] = b"custos-kmip-wrap-v2";
const MAX_UID: usize = 1024;
const TAG_LEN: usize = 16;

/// The one answer to an envelope that does not open. In format 2 only the
/// local GCM tag gives it; in format 1 the server's padding check can too,
/// with the same words, so that the two cannot be told apart by message.
pub const REFUSED: &str =
    "the wrapped key does not open under this key: tampered envelope or wrong context";

/// The mode byte of format 2.
fn mode_byte(cipher: Cipher) -> Option<u8> {
    match cipher {
        Cipher::Cbc => Some(1),
        Cipher::Ctr => Some(2),
        Cipher::CbcPkcs5 => None,
    }
}

/// A CTR initial counter block whose second block (IV + 1) is the same in
/// every counter convention (a 32-, 64- or 128-bit big-endian counter): its
/// last byte is below 0xff, so adding one carries into no other byte.
pub fn ctr_iv() -> [u8; 16] {
    let mut iv = crate::util::random_bytes::<16>();
    iv[15] &= 0x7f;
    iv
}

/// What the server made of a wrapping key WK: its encryption `wk_ct` of WK
/// under object `uid`, with `cipher` and `iv`.
pub struct ServerWrap<'a> {
    pub cipher: Cipher,
    pub uid: &'a str,
    pub iv: [u8; 16],
    pub wk_ct: &'a [u8],
}

/// A format-2 envelope sealing `data_key` under `wk` with `nonce` (random
/// but for test vectors).
pub fn seal(
    server: &ServerWrap<'_>,
    wk: &SecretKey,
    data_key: &DataKey,
    ctx: &WrapContext,
    nonce: [u8; 12],
) -> Result<Vec<u8>, String> {
    let ServerWrap {
        cipher,
        uid,
        iv,
        wk_ct,
    } = *server;
    let Some(mode) = mode_byte(cipher) else {
        return Err("format 1 (CBC with padding) is no longer written".into());
    };
    if uid.is_empty() || uid.len() > MAX_UID {
        return Err(format!(
            "the KMIP server named an object of {} bytes (1 to {MAX_UID} allowed)",
            uid.len()
        ));
    }
    if wk_ct.len() != KEY_LEN {
        return Err(format!(
            "the KMIP server's Encrypt of a {KEY_LEN}-byte wrapping key returned {} bytes, not {KEY_LEN}",
            wk_ct.len()
        ));
    }
    let mut out = Vec::with_capacity(4 + uid.len() + 16 + KEY_LEN + 12 + KEY_LEN + TAG_LEN);
    out.push(FORMAT);
    out.push(mode);
    out.extend_from_slice(&(uid.len() as u16).to_be_bytes());
    out.extend_from_slice(uid.as_bytes());
    out.extend_from_slice(&iv);
    out.extend_from_slice(wk_ct);
    let aad = aad(LABEL_V2, &out, ctx);
    let mut buf = Zeroizing::new(data_key.expose().to_vec());
    let gcm = Aes256Gcm::new_from_slice(wk.expose()).map_err(|e| e.to_string())?;
    let tag = gcm
        .encrypt_inout_detached(&nonce.into(), &aad, buf.as_mut_slice().into())
        .map_err(|e| format!("sealing the data key failed: {e}"))?;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    Ok(out)
}

fn aad(label: &[u8], bound: &[u8], ctx: &WrapContext) -> Vec<u8> {
    let mut out = label.to_vec();
    out.extend_from_slice(bound);
    out.extend_from_slice(&ctx.canonical_bytes());
    out
}

/// A parsed envelope, borrowing the bytes.
pub struct Envelope<'a> {
    pub format: u8,
    /// How the server decrypts `wk_ct`.
    pub cipher: Cipher,
    pub uid: &'a str,
    pub iv: [u8; 16],
    pub wk_ct: &'a [u8],
    /// The bytes the AAD binds after its label (format 2: all before the nonce).
    bound: Vec<u8>,
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
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

impl<'a> Envelope<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        let mut c = Cursor(bytes);
        let format = c.take(1)?[0];
        let cipher = match format {
            1 => Cipher::CbcPkcs5,
            2 => match c.take(1)?[0] {
                1 => Cipher::Cbc,
                2 => Cipher::Ctr,
                m => return Err(format!("the KMIP envelope names an unknown mode ({m})")),
            },
            f => return Err(format!("not a KMIP envelope of format 1 or 2 (byte {f})")),
        };
        let n = c.u16()?;
        if n == 0 || n > MAX_UID {
            return Err(format!(
                "the KMIP envelope names an object of {n} bytes (1 to {MAX_UID} allowed)"
            ));
        }
        let uid = std::str::from_utf8(c.take(n)?)
            .map_err(|_| "the KMIP envelope names a non-UTF-8 object".to_owned())?;
        let iv = c.array::<16>()?;
        let (wk_ct, bound) = if format == 1 {
            // 32 bytes and a full block of padding.
            let n = c.u16()?;
            if n != KEY_LEN + 16 {
                return Err(format!(
                    "the KMIP envelope's wrapped key has {n} bytes, not {}",
                    KEY_LEN + 16
                ));
            }
            let mut bound = (uid.len() as u16).to_be_bytes().to_vec();
            bound.extend_from_slice(uid.as_bytes());
            (c.take(n)?, bound)
        } else {
            let wk_ct = c.take(KEY_LEN)?;
            let head = bytes.len() - c.0.len();
            (wk_ct, bytes[..head].to_vec())
        };
        let nonce = c.array::<12>()?;
        let sealed = c.take(KEY_LEN + TAG_LEN)?;
        if !c.0.is_empty() {
            return Err("the KMIP envelope has trailing bytes".into());
        }
        Ok(Envelope {
            format,
            cipher,
            uid,
            iv,
            wk_ct,
            bound,
            nonce,
            sealed,
        })
    }

    /// Opens the seal with the WK the server decrypted.
    pub fn open(&self, wk: &[u8], ctx: &WrapContext) -> Result<DataKey, String> {
        let refused = || REFUSED.to_owned();
        let label = if self.format == 1 { LABEL_V1 } else { LABEL_V2 };
        let gcm = Aes256Gcm::new_from_slice(wk).map_err(|_| refused())?;
        let mut buf = Zeroizing::new(self.sealed[..KEY_LEN].to_vec());
        let tag: [u8; TAG_LEN] = self.sealed[KEY_LEN..].try_into().map_err(|_| refused())?;
        gcm.decrypt_inout_detached(
            &self.nonce.into(),
            &aad(label, &self.bound, ctx),
            buf.as_mut_slice().into(),
            &tag.into(),
        )
        .map_err(|_| refused())?;
        SecretKey::from_slice(&buf).ok_or_else(refused)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::TenantId;

    /// A format-1 envelope, as custos wrote them before format 2 (tests of
    /// the unwrapping custos keeps for them).
    pub(in crate::keys::kmip) fn seal_v1(
        uid: &str,
        iv: [u8; 16],
        wk_ct: &[u8],
        wk: &SecretKey,
        data_key: &DataKey,
        ctx: &WrapContext,
        nonce: [u8; 12],
    ) -> Vec<u8> {
        let mut bound = (uid.len() as u16).to_be_bytes().to_vec();
        bound.extend_from_slice(uid.as_bytes());
        let mut buf = data_key.expose().to_vec();
        let tag = Aes256Gcm::new_from_slice(wk.expose())
            .unwrap()
            .encrypt_inout_detached(
                &nonce.into(),
                &aad(LABEL_V1, &bound, ctx),
                buf.as_mut_slice().into(),
            )
            .unwrap();
        let mut out = vec![1];
        out.extend_from_slice(&bound);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&(wk_ct.len() as u16).to_be_bytes());
        out.extend_from_slice(wk_ct);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out.extend_from_slice(&tag);
        out
    }

    fn sw<'a>(cipher: Cipher, uid: &'a str, wk_ct: &'a [u8]) -> ServerWrap<'a> {
        ServerWrap {
            cipher,
            uid,
            iv: [7; 16],
            wk_ct,
        }
    }

    #[test]
    fn seals_and_opens_only_under_the_same_context() {
        let t = TenantId::new("acme").unwrap();
        let ctx = WrapContext::tdk(&t, 1);
        let wk = SecretKey::generate();
        let dk = SecretKey::generate();
        for cipher in [Cipher::Cbc, Cipher::Ctr] {
            let bytes = seal(&sw(cipher, "42", &[1; 32]), &wk, &dk, &ctx, [3; 12]).unwrap();
            let env = Envelope::parse(&bytes).unwrap();
            assert_eq!((env.format, env.cipher, env.uid), (2, cipher, "42"));
            assert_eq!(env.wk_ct, &[1; 32]);
            assert_eq!(env.open(wk.expose(), &ctx).unwrap(), dk);
            assert!(env.open(wk.expose(), &WrapContext::tdk(&t, 2)).is_err());
            assert!(env.open(SecretKey::generate().expose(), &ctx).is_err());
            // Every byte is bound: whatever changes (the mode, the object,
            // the IV, the server's ciphertext, the nonce, the seal), the tag
            // fails even under the right WK, or the envelope does not parse.
            for at in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[at] ^= 1;
                let opened = Envelope::parse(&bad).and_then(|e| e.open(wk.expose(), &ctx));
                assert!(opened.is_err(), "byte {at} is not bound");
            }
            for cut in 0..bytes.len() {
                assert!(Envelope::parse(&bytes[..cut]).is_err(), "{cut}");
            }
        }
        // Nothing but a 32-byte server ciphertext is sealed.
        for bad in [
            sw(Cipher::Cbc, "42", &[1; 48]),
            sw(Cipher::CbcPkcs5, "42", &[1; 32]),
            sw(Cipher::Ctr, "", &[1; 32]),
        ] {
            assert!(seal(&bad, &wk, &dk, &ctx, [3; 12]).is_err());
        }
    }

    #[test]
    fn format_1_still_opens() {
        let ctx = WrapContext::tdk(&TenantId::new("acme").unwrap(), 1);
        let wk = SecretKey::generate();
        let dk = SecretKey::generate();
        let bytes = seal_v1("42", [7; 16], &[1; 48], &wk, &dk, &ctx, [9; 12]);
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(
            (env.format, env.cipher, env.uid),
            (1, Cipher::CbcPkcs5, "42")
        );
        assert_eq!(env.open(wk.expose(), &ctx).unwrap(), dk);
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

    #[test]
    fn ctr_ivs_never_carry_out_of_the_last_byte() {
        for _ in 0..64 {
            assert!(ctr_iv()[15] < 0xff);
        }
    }
}
