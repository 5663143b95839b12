//! C2SP signed notes (<https://c2sp.org/signed-note>), Ed25519 only.
//!
//! ```text
//! <text, ending in a newline>
//!
//! — <key name> <base64(key id, 4 bytes big-endian ‖ Ed25519 signature of the text)>
//! ```
//!
//! - key ID = the first 4 bytes of SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ 32-byte public key)
//!   (0x01 is the signature type of Ed25519);
//! - the verifier key, the text an auditor pins, is
//!   `<name>+<8 hex digits of the key ID>+<base64(0x01 ‖ public key)>`, the
//!   encoding of Go's `golang.org/x/mod/sumdb/note`;
//! - key names are non-empty and hold no Unicode space and no `+`;
//! - a note is valid UTF-8 with no control character but newline; the text is
//!   separated from the signatures by the last blank line.
//!
//! Parsing is strict (canonical base64, exactly one space after the name, at
//! most [`MAX_SIGNATURES`] lines). Verification follows the spec: signatures by
//! other keys (another name or key ID) are ignored; one by the trusted key must
//! verify, or the whole note is rejected; a note with no signature by the
//! trusted key is rejected.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Signature type byte of Ed25519 in the signed-note spec.
pub const ALG_ED25519: u8 = 0x01;

/// Most signature lines a note may carry (the spec asks verifiers to accept at least 16).
pub const MAX_SIGNATURES: usize = 100;

const SIG_PREFIX: &str = "\u{2014} ";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("malformed verifier key: {0}")]
    BadVerifierKey(String),
    #[error("invalid key name {0:?}: it must be non-empty, without spaces or '+'")]
    BadKeyName(String),
    #[error("the note is not signed by {0}")]
    NotSigned(String),
    #[error("the signature by {0} does not verify")]
    BadSignature(String),
}

/// Whether `name` can name a key: non-empty, no Unicode white space, no `+`
/// (and, since notes forbid them, no control characters).
pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// `SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4]`, big-endian.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0x0A, ALG_ED25519]);
    h.update(public_key);
    let d: [u8; 32] = h.finalize().into();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A trusted Ed25519 note key: its name, key ID and public key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl VerifierKey {
    pub fn new(name: &str, key: VerifyingKey) -> Result<Self, NoteError> {
        if !valid_key_name(name) {
            return Err(NoteError::BadKeyName(name.chars().take(100).collect()));
        }
        Ok(VerifierKey {
            name: name.to_owned(),
            id: key_id(name, key.as_bytes()),
            key,
        })
    }

    /// Parses `<name>+<hex key id>+<base64(0x01 ‖ public key)>` (surrounding
    /// white space, such as a trailing newline in a key file, is ignored).
    pub fn parse(text: &str) -> Result<Self, NoteError> {
        let bad = |why: &str| Err(NoteError::BadVerifierKey(why.to_owned()));
        let text = text.trim();
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key64)) = (parts.next(), parts.next(), parts.next())
        else {
            return bad("expected <name>+<key id>+<key>");
        };
        if !valid_key_name(name) {
            return Err(NoteError::BadKeyName(name.chars().take(100).collect()));
        }
        if id_hex.len() != 8 || !id_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("the key id must be 8 hex digits");
        }
        let id = u32::from_str_radix(id_hex, 16).expect("8 hex digits");
        let Ok(raw) = STANDARD.decode(key64) else {
            return bad("the key is not base64");
        };
        if raw.first() != Some(&ALG_ED25519) {
            return bad("not an Ed25519 key (signature type 0x01)");
        }
        let Ok(pk) = <[u8; 32]>::try_from(&raw[1..]) else {
            return bad("an Ed25519 public key is 32 bytes");
        };
        let Ok(key) = VerifyingKey::from_bytes(&pk) else {
            return bad("not a valid Ed25519 public key");
        };
        if key_id(name, &pk) != id {
            return bad("the key id does not match the name and key");
        }
        Ok(VerifierKey {
            name: name.to_owned(),
            id,
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn public_key(&self) -> &VerifyingKey {
        &self.key
    }
}

impl fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        write!(f, "{}+{:08x}+{}", self.name, self.id, STANDARD.encode(raw))
    }
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifierKey({self})")
    }
}

/// One signature line of a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    pub name: String,
    pub key_id: u32,
    /// The signature bytes after the key ID.
    pub signature: Vec<u8>,
}

/// A parsed (not yet verified) signed note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNote {
    text: String,
    signatures: Vec<NoteSignature>,
}

/// Signs `text` (which must end in a newline) with `key` under `name` and
/// returns the whole note.
pub fn sign(text: &str, name: &str, key: &SigningKey) -> Result<String, NoteError> {
    if !valid_key_name(name) {
        return Err(NoteError::BadKeyName(name.chars().take(100).collect()));
    }
    check_chars(text)?;
    if !text.ends_with('\n') {
        return Err(NoteError::Malformed(
            "the text must end with a newline".into(),
        ));
    }
    let id = key_id(name, key.verifying_key().as_bytes());
    let sig: Signature = key.sign(text.as_bytes());
    let mut raw = Vec::with_capacity(68);
    raw.extend_from_slice(&id.to_be_bytes());
    raw.extend_from_slice(&sig.to_bytes());
    Ok(format!(
        "{text}\n{SIG_PREFIX}{name} {}\n",
        STANDARD.encode(raw)
    ))
}

fn check_chars(s: &str) -> Result<(), NoteError> {
    if s.chars().any(|c| c < '\u{20}' && c != '\n') {
        return Err(NoteError::Malformed(
            "control characters other than newline are not allowed".into(),
        ));
    }
    Ok(())
}

impl SignedNote {
    /// Parses a note strictly; signatures are not checked here.
    pub fn parse(msg: &[u8]) -> Result<Self, NoteError> {
        let bad = |why: &str| Err(NoteError::Malformed(why.to_owned()));
        let Ok(msg) = std::str::from_utf8(msg) else {
            return bad("not valid UTF-8");
        };
        check_chars(msg)?;
        let Some(split) = msg.rfind("\n\n") else {
            return bad("no blank line before the signatures");
        };
        let (text, sigs) = (&msg[..split + 1], &msg[split + 2..]);
        if sigs.is_empty() || !sigs.ends_with('\n') {
            return bad("the signature block must be non-empty and end with a newline");
        }
        let mut signatures = Vec::new();
        for line in sigs[..sigs.len() - 1].split('\n') {
            if signatures.len() == MAX_SIGNATURES {
                return bad("too many signatures");
            }
            let Some(rest) = line.strip_prefix(SIG_PREFIX) else {
                return bad("a signature line must start with an em dash and a space");
            };
            let Some((name, b64)) = rest.split_once(' ') else {
                return bad("a signature line is \"— <name> <base64>\"");
            };
            if !valid_key_name(name) {
                return bad("invalid key name in a signature line");
            }
            let Ok(raw) = STANDARD.decode(b64) else {
                return bad("a signature is not canonical base64");
            };
            if raw.len() < 5 {
                return bad("a signature is too short");
            }
            signatures.push(NoteSignature {
                name: name.to_owned(),
                key_id: u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
                signature: raw[4..].to_vec(),
            });
        }
        Ok(SignedNote {
            text: text.to_owned(),
            signatures,
        })
    }

    /// The signed text, including its final newline.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn signatures(&self) -> &[NoteSignature] {
        &self.signatures
    }

    /// Checks the note against one trusted key (see the module docs).
    pub fn verify(&self, key: &VerifierKey) -> Result<(), NoteError> {
        let mut verified = false;
        for s in &self.signatures {
            if s.name != key.name || s.key_id != key.id {
                continue; // another key's signature: ignored, as the spec requires
            }
            let ok = <[u8; 64]>::try_from(s.signature.as_slice())
                .map(|b| Signature::from_bytes(&b))
                .is_ok_and(|sig| key.key.verify_strict(self.text.as_bytes(), &sig).is_ok());
            if !ok {
                return Err(NoteError::BadSignature(key.to_string()));
            }
            verified = true;
        }
        if verified {
            Ok(())
        } else {
            Err(NoteError::NotSigned(key.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example of golang.org/x/mod/sumdb/note's package documentation
    // (note.go): a signer key, its verifier key and the note it signs.
    const GO_SKEY: &str =
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    const GO_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    const GO_TEXT: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n";
    const GO_NOTE: &str = "If you think cryptography is the answer to your problem,\n\
                           then you don't know what your problem is.\n\
                           \n\
                           \u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    fn go_signing_key() -> SigningKey {
        let b64 = GO_SKEY.splitn(5, '+').nth(4).unwrap();
        let raw = STANDARD.decode(b64).unwrap();
        assert_eq!(raw[0], ALG_ED25519);
        SigningKey::from_bytes(&raw[1..].try_into().unwrap())
    }

    #[test]
    fn reproduces_the_go_note_example() {
        let sk = go_signing_key();
        let vk = VerifierKey::new("PeterNeumann", sk.verifying_key()).unwrap();
        assert_eq!(vk.to_string(), GO_VKEY);
        assert_eq!(vk.id(), 0xc74f20a3);
        assert_eq!(sign(GO_TEXT, "PeterNeumann", &sk).unwrap(), GO_NOTE);
        let parsed = VerifierKey::parse(GO_VKEY).unwrap();
        assert_eq!(parsed, vk);
        let note = SignedNote::parse(GO_NOTE.as_bytes()).unwrap();
        assert_eq!(note.text(), GO_TEXT);
        note.verify(&parsed).unwrap();
    }

    #[test]
    fn verification_rejects_tampering_and_other_keys() {
        let sk = go_signing_key();
        let vk = VerifierKey::parse(GO_VKEY).unwrap();
        let edited = GO_NOTE.replace("answer", "Answer");
        let err = SignedNote::parse(edited.as_bytes())
            .unwrap()
            .verify(&vk)
            .unwrap_err();
        assert!(matches!(err, NoteError::BadSignature(_)), "{err}");

        let other = SigningKey::from_bytes(&[7; 32]);
        let other_vk = VerifierKey::new("PeterNeumann", other.verifying_key()).unwrap();
        let note = SignedNote::parse(GO_NOTE.as_bytes()).unwrap();
        assert!(matches!(
            note.verify(&other_vk),
            Err(NoteError::NotSigned(_))
        ));

        // A signature by an unknown key is ignored, a known one still verifies.
        let both = format!(
            "{}{}",
            sign(GO_TEXT, "someone.else", &other).unwrap(),
            GO_NOTE.rsplit_once("\n\n").unwrap().1
        );
        let n = SignedNote::parse(both.as_bytes()).unwrap();
        assert_eq!(n.signatures().len(), 2);
        n.verify(&vk).unwrap();
        let _ = sk;
    }

    #[test]
    fn parsing_is_strict() {
        for bad in [
            "no blank line\n\u{2014} a AAAAAAA=\n",
            "text\n\n",
            "text\n\n\u{2014} a QUJDREVG\n\n",
            "text\n\n- a QUJDREVG\n",
            "text\n\n\u{2014} a  QUJDREVG\n",
            "text\n\n\u{2014} a QUJDREVG",
            "text\n\n\u{2014} a QUJD\n",
            "text\n\n\u{2014} a QUJDREVGRw\n",
            "te\txt\n\n\u{2014} a QUJDREVG\n",
            "text\r\n\n\u{2014} a QUJDREVG\n",
            "text\n\n\u{2014} a+b QUJDREVG\n",
        ] {
            assert!(SignedNote::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(SignedNote::parse(b"text\n\n\xe2\x80\x94 a \xff\n").is_err());
        let ok = SignedNote::parse("a\n\nb\n\n\u{2014} k QUJDREVG\n".as_bytes()).unwrap();
        assert_eq!(ok.text(), "a\n\nb\n", "the last blank line separates");
    }

    #[test]
    fn verifier_keys_are_checked() {
        for bad in [
            "",
            "name",
            "name+c74f20a3",
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "PeterNeumann+c74f20a3+Apc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        ] {
            assert!(VerifierKey::parse(bad).is_err(), "{bad:?}");
        }
        assert!(VerifierKey::parse(&format!("{GO_VKEY}\n")).is_ok());
        assert!(valid_key_name("custos.example/audit"));
        assert!(!valid_key_name("a b") && !valid_key_name("a+b") && !valid_key_name(""));
        assert!(!valid_key_name("a\u{a0}b"), "Unicode spaces are refused");
    }
}
