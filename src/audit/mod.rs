//! The tamper-evident audit log.
//!
//! Every action that touches tenant data or keys (tenant init, backup,
//! restore, drill, check, forget/prune, rotation, shred, policy change, lease
//! takeover) is appended as a JSON-lines record that holds the hash of the
//! record before it ([`record`]). The records are also the leaves of an
//! RFC 6962 Merkle tree ([`merkle`]) whose checkpoints (tree size + root) custos
//! signs with its Ed25519 audit key ([`key`]) as C2SP signed notes
//! ([`note`], [`checkpoint`]). The log lives in `<state_dir>/audit` and is
//! replicated under the store's `audit/` prefix ([`log`]).
//!
//! `custos audit verify` ([`verify`]) checks chain, tree and signatures with
//! nothing but the public key; a deletion certificate embeds the
//! [`evidence`] of its audit record (line, inclusion proof, signed
//! checkpoint), which an auditor checks offline the same way.

pub mod checkpoint;
pub mod evidence;
pub mod key;
pub mod log;
pub mod merkle;
pub mod note;
pub mod record;
