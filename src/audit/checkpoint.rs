//! Checkpoints: C2SP tlog-checkpoint notes (<https://c2sp.org/tlog-checkpoint>)
//! over the audit log's Merkle tree.
//!
//! ```text
//! custos/audit/fe812c12f3ab4ce6                  origin (= the audit key's name)
//! 2                                              tree size, decimal, no leading zeros
//! a2pEJuPt7BUE7UIBECQiKQ4LIyFb8oTJilANSwzbMQw=   root hash, base64
//!
//! — custos/audit/fe812c12f3ab4ce6 <base64(key id ‖ Ed25519 signature)>
//! ```
//!
//! custos writes no extension lines and refuses checkpoints that carry any,
//! and it requires the origin to equal the signing key's name (the spec's
//! SHOULD), so a checkpoint cannot be presented as another log's.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::merkle::Hash;
use super::note::{self, NoteError, SignedNote, VerifierKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    #[error(transparent)]
    Note(#[from] NoteError),
    #[error("the checkpoint is for log {found:?}, not {expected:?}")]
    WrongOrigin { expected: String, found: String },
}

/// A tree head: which log, how many leaves, what root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: `<origin>\n<size>\n<base64 root>\n`.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// Parses a note text strictly: exactly the three lines custos writes.
    pub fn parse_body(text: &str) -> Result<Self, CheckpointError> {
        let bad = |why: &str| Err(CheckpointError::Malformed(why.to_owned()));
        let Some(body) = text.strip_suffix('\n') else {
            return bad("the text must end with a newline");
        };
        let lines: Vec<&str> = body.split('\n').collect();
        if lines.len() < 3 {
            return bad("expected origin, tree size and root hash lines");
        }
        if lines.len() > 3 {
            return bad("custos checkpoints carry no extension lines");
        }
        let (origin, size, root) = (lines[0], lines[1], lines[2]);
        if !note::valid_key_name(origin) {
            return bad("the origin must be non-empty, without spaces or '+'");
        }
        if size.is_empty()
            || !size.bytes().all(|b| b.is_ascii_digit())
            || (size.len() > 1 && size.starts_with('0'))
        {
            return bad("the tree size must be a decimal number without leading zeros");
        }
        let Ok(size) = size.parse::<u64>() else {
            return bad("the tree size is too large");
        };
        let root: Hash = match STANDARD.decode(root).ok().map(<[u8; 32]>::try_from) {
            Some(Ok(h)) => h,
            _ => return bad("the root hash must be 32 bytes of canonical base64"),
        };
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// A checkpoint together with its signed note text, exactly as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    checkpoint: Checkpoint,
    text: String,
}

impl SignedCheckpoint {
    /// Signs `checkpoint` with `key` under `name` (which must be the origin).
    pub(crate) fn sign(
        checkpoint: Checkpoint,
        name: &str,
        key: &ed25519_dalek::SigningKey,
    ) -> Result<Self, CheckpointError> {
        if checkpoint.origin != name {
            return Err(CheckpointError::WrongOrigin {
                expected: name.to_owned(),
                found: checkpoint.origin,
            });
        }
        let text = note::sign(&checkpoint.body(), name, key)?;
        Ok(SignedCheckpoint { checkpoint, text })
    }

    /// Parses a signed checkpoint without checking its signature.
    pub fn parse_unverified(text: &[u8]) -> Result<Self, CheckpointError> {
        let note = SignedNote::parse(text)?;
        let checkpoint = Checkpoint::parse_body(note.text())?;
        Ok(SignedCheckpoint {
            checkpoint,
            text: String::from_utf8(text.to_vec()).expect("checked by the note parser"),
        })
    }

    /// Parses and verifies: a valid signature by `key`, and an origin equal to
    /// the key's name.
    pub fn verify(text: &[u8], key: &VerifierKey) -> Result<Self, CheckpointError> {
        let note = SignedNote::parse(text)?;
        let checkpoint = Checkpoint::parse_body(note.text())?;
        if checkpoint.origin != key.name() {
            return Err(CheckpointError::WrongOrigin {
                expected: key.name().to_owned(),
                found: checkpoint.origin,
            });
        }
        note.verify(key)?;
        Ok(SignedCheckpoint {
            checkpoint,
            text: String::from_utf8(text.to_vec()).expect("checked by the note parser"),
        })
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    pub fn size(&self) -> u64 {
        self.checkpoint.size
    }

    pub fn root(&self) -> &Hash {
        &self.checkpoint.root
    }

    /// The signed note, as written to `checkpoints/<size>`.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::merkle::empty_root;
    use ed25519_dalek::SigningKey;

    fn key() -> (SigningKey, VerifierKey) {
        let sk = SigningKey::from_bytes(&[42; 32]);
        let vk = VerifierKey::new("custos/audit/test", sk.verifying_key()).unwrap();
        (sk, vk)
    }

    #[test]
    fn the_spec_example_body_parses() {
        // From c2sp.org/tlog-checkpoint.
        let cp = Checkpoint::parse_body(
            "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n",
        )
        .unwrap();
        assert_eq!(cp.origin, "example.com/behind-the-sofa");
        assert_eq!(cp.size, 20852163);
        assert_eq!(
            cp.body(),
            "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
        );
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let (sk, vk) = key();
        let cp = Checkpoint {
            origin: vk.name().to_owned(),
            size: 0,
            root: empty_root(),
        };
        let signed = SignedCheckpoint::sign(cp.clone(), vk.name(), &sk).unwrap();
        assert!(signed.text().starts_with(
            "custos/audit/test\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n\n\u{2014} custos/audit/test "
        ));
        let back = SignedCheckpoint::verify(signed.text().as_bytes(), &vk).unwrap();
        assert_eq!(back.checkpoint(), &cp);
        assert_eq!(back, signed);
    }

    #[test]
    fn wrong_key_or_origin_or_edit_fails() {
        let (sk, vk) = key();
        let signed = SignedCheckpoint::sign(
            Checkpoint {
                origin: vk.name().to_owned(),
                size: 7,
                root: [9; 32],
            },
            vk.name(),
            &sk,
        )
        .unwrap();
        let other = SigningKey::from_bytes(&[43; 32]);
        let other_vk = VerifierKey::new(vk.name(), other.verifying_key()).unwrap();
        assert!(matches!(
            SignedCheckpoint::verify(signed.text().as_bytes(), &other_vk),
            Err(CheckpointError::Note(NoteError::NotSigned(_)))
        ));
        let renamed = VerifierKey::new("custos/audit/other", sk.verifying_key()).unwrap();
        assert!(matches!(
            SignedCheckpoint::verify(signed.text().as_bytes(), &renamed),
            Err(CheckpointError::WrongOrigin { .. })
        ));
        let edited = signed.text().replacen("\n7\n", "\n8\n", 1);
        assert!(matches!(
            SignedCheckpoint::verify(edited.as_bytes(), &vk),
            Err(CheckpointError::Note(NoteError::BadSignature(_)))
        ));
    }

    #[test]
    fn bodies_are_parsed_strictly() {
        let root = STANDARD.encode([1u8; 32]);
        for bad in [
            format!("o\n1\n{root}"),
            format!("o\n01\n{root}\n"),
            format!("o\n-1\n{root}\n"),
            format!("o\n\n{root}\n"),
            format!("o\n1\n{root}\next\n"),
            "o\n1\nAAAA\n".to_string(),
            format!("o p\n1\n{root}\n"),
            format!("\n1\n{root}\n"),
            format!("o\n18446744073709551616\n{root}\n"),
        ] {
            assert!(Checkpoint::parse_body(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Checkpoint::parse_body(&format!("o\n0\n{root}\n"))
                .unwrap()
                .size,
            0
        );
    }
}
