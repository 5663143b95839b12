//! The signed intent of an append (`<audit dir>/pending`): what the log
//! writes before it appends a record and removes once the record's
//! checkpoint is signed, and what verification reads to tell a crash in
//! between from a record appended without the key. Its own module, so that
//! the log (which writes it) and verification (which reads it) share it
//! without importing each other.

use super::merkle::Hash;
use super::note::VerifierKey;

/// The file, in the audit directory, of the append in progress.
pub const PENDING_FILE: &str = "pending";

/// The signed intent custos writes (to `pending`) before it appends a
/// record: `custos audit append`, the tree size after the append, and the
/// record's leaf hash, signed with the audit key. It tells a crash between a
/// record and its checkpoint apart from a record appended by someone without
/// the key.
pub(crate) fn pending_text(size: u64, leaf: &Hash) -> String {
    use base64::Engine;
    format!(
        "{PENDING_ORIGIN}\n{size}\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(leaf)
    )
}

const PENDING_ORIGIN: &str = "custos audit append";

/// A pending intent that verifies with `verifier`: (size, leaf hash).
pub(crate) fn parse_pending(text: &[u8], verifier: &VerifierKey) -> Option<(u64, Hash)> {
    use base64::Engine;
    let note = super::note::SignedNote::parse(text).ok()?;
    note.verify(verifier).ok()?;
    let mut lines = note.text().lines();
    if lines.next()? != PENDING_ORIGIN {
        return None;
    }
    let size = lines.next()?.parse().ok()?;
    let leaf = base64::engine::general_purpose::STANDARD
        .decode(lines.next()?)
        .ok()?
        .try_into()
        .ok()?;
    lines.next().is_none().then_some((size, leaf))
}
