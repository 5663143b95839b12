//! The scope of a shred: every object it covers, summarised by a count, a
//! byte total and a Merkle root that the audit log records before anything
//! is destroyed (`shred.scope.end`), so that an auditor can later check
//! whether a given object (name, size, ETag) was covered.
//!
//! Leaf encoding `custos-shred-scope/1`, one leaf per object, leaves ordered
//! by the object's full store path (bytewise):
//!
//! ```text
//! entry = u32 BE len(path) ‖ path ‖ u64 BE size ‖ u32 BE len(etag) ‖ etag
//! leaf  = SHA-256(0x00 ‖ entry)
//! root  = RFC 6962 Merkle tree hash of the leaves (SHA-256(""), the empty tree, for no objects)
//! ```
//!
//! `path` is the UTF-8 store path below the store root (`tenants/<t>/packs/…`),
//! `etag` the ETag the store reported when listing, without quotes as
//! `object_store` gives it, empty when the store reports none. Interior nodes
//! are SHA-256(0x01 ‖ left ‖ right), as in the audit log ([`crate::audit::merkle`]).

use serde_json::json;

use super::journal::Journal;
use super::keys::all_tenant_keys;
use crate::audit::merkle::{self, Hash};
use crate::error::Result;
use crate::format::seal::{HEADER_LEN, Header};
use crate::format::shred::{SamplePack, ScopeRecord};
use crate::repo::Repo;
use crate::store::ObjectName;
use crate::store::tenant::Listed;
use crate::tenant::TenantId;

pub const LEAF_ENCODING: &str = "custos-shred-scope/1";

/// One object in a shred's scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeObject {
    /// Full store path, `tenants/<t>/…`.
    pub path: String,
    pub size: u64,
    pub etag: Option<String>,
    /// The object's typed name, when custos wrote it.
    pub name: Option<ObjectName>,
}

impl ScopeObject {
    pub fn from_listed(tenant: &TenantId, l: &Listed) -> Self {
        ScopeObject {
            path: format!("tenants/{tenant}/{}", l.path),
            size: l.meta.size,
            etag: l.meta.e_tag.clone(),
            name: l.name.clone(),
        }
    }

    /// The entry bytes hashed into this object's leaf.
    pub fn leaf_entry(&self) -> Vec<u8> {
        let etag = self.etag.as_deref().unwrap_or("").as_bytes();
        let mut out = Vec::with_capacity(20 + self.path.len() + etag.len());
        out.extend_from_slice(&(self.path.len() as u32).to_be_bytes());
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&(etag.len() as u32).to_be_bytes());
        out.extend_from_slice(etag);
        out
    }
}

/// Objects a tenant shred covers: all under the tenant prefix but the
/// descriptor (kept: it carries the fence and outlives the shred), the
/// lease (bookkeeping of the running job) and reader records (bookkeeping
/// of readers, which may register beside the shred and then find it).
pub fn in_tenant_scope(l: &Listed) -> bool {
    !matches!(
        l.name,
        Some(ObjectName::Descriptor) | Some(ObjectName::Lease) | Some(ObjectName::Reader(_))
    )
}

/// The Merkle root of a scope (leaves in path order, whatever the input order).
pub fn merkle_root(objects: &[ScopeObject]) -> Hash {
    let mut sorted: Vec<&ScopeObject> = objects.iter().collect();
    sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let leaves: Vec<Hash> = sorted
        .iter()
        .map(|o| merkle::leaf_hash(&o.leaf_entry()))
        .collect();
    merkle::root(&leaves)
}

/// Records the scope of a shred whose `scope` step has begun: the `listed`
/// objects' count, bytes and root in `shred.scope.end`, and in the record the
/// envelopes among them (captured when under one of the tenant's keys, else
/// named as foreign: custos never destroys a key it cannot prove the
/// tenant's) and one pack for verification to try again.
pub(super) async fn record(
    repo: &Repo,
    journal: &Journal,
    listed: &[Listed],
) -> Result<ScopeRecord> {
    let tenant = repo.tenant();
    let objects: Vec<ScopeObject> = listed
        .iter()
        .map(|l| ScopeObject::from_listed(tenant, l))
        .collect();
    let own_keys: Vec<_> = all_tenant_keys(repo)
        .await?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut captured = Vec::new();
    let mut foreign = Vec::new();
    let mut epochs = Vec::new();
    let mut sample_pack = None;
    for l in listed {
        match &l.name {
            Some(ObjectName::Envelope(e)) => {
                epochs.push(*e);
                match repo.load_envelope(*e).await {
                    Ok(env) if own_keys.contains(&env.key) => captured.push(env),
                    Ok(env) => foreign.push(format!(
                        "tenants/{tenant}/keys/{e}: wrapped under {}, not a key of this tenant (not destroyed)",
                        env.key
                    )),
                    Err(err) => foreign.push(format!("tenants/{tenant}/keys/{e}: unreadable ({err})")),
                }
            }
            Some(name @ ObjectName::Pack(_)) if sample_pack.is_none() => {
                if let Ok(head) = repo.store().get_range(name, 0..HEADER_LEN as u64).await
                    && let Ok(epoch) = Header::peek_epoch(&head)
                {
                    sample_pack = Some(SamplePack {
                        object: repo.store().display(name),
                        epoch,
                    });
                }
            }
            _ => {}
        }
    }
    let root = hex::encode(merkle_root(&objects));
    let bytes: u64 = objects.iter().map(|o| o.size).sum();
    let receipt = journal
        .end(
            "scope",
            json!({
                "objects": objects.len(),
                "bytes": bytes,
                "merkle_root": root,
                "leaf_encoding": LEAF_ENCODING,
                "envelopes": epochs,
                "foreign_envelopes": foreign.len(),
            }),
        )
        .await?;
    Ok(ScopeRecord {
        listed_at: crate::hooks::now(),
        objects: objects.len() as u64,
        bytes,
        merkle_root: root,
        leaf_encoding: LEAF_ENCODING.into(),
        envelopes: epochs,
        audit_seq: Some(receipt.seq),
        sample_pack,
        captured,
        foreign_envelopes: foreign,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(path: &str, size: u64, etag: Option<&str>) -> ScopeObject {
        ScopeObject {
            path: path.into(),
            size,
            etag: etag.map(str::to_owned),
            name: None,
        }
    }

    #[test]
    fn leaf_entry_layout() {
        let e = obj("tenants/a/keys/1", 300, Some("xy")).leaf_entry();
        let mut want = vec![0, 0, 0, 16];
        want.extend_from_slice(b"tenants/a/keys/1");
        want.extend_from_slice(&300u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 2]);
        want.extend_from_slice(b"xy");
        assert_eq!(e, want);
        // No ETag: an empty one.
        assert!(obj("p", 1, None).leaf_entry().ends_with(&[0, 0, 0, 0]));
    }

    #[test]
    fn root_vector_and_order_independence() {
        // Computed independently (Python hashlib, RFC 6962 hashing).
        let a = obj("tenants/acme/keys/1", 312, Some("\"e1\""));
        let b = obj("tenants/acme/packs/ab/ab00", 4096, None);
        let c = obj("tenants/acme/index/00ff", 77, Some("e3"));
        let root = merkle_root(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(root, merkle_root(&[c, a, b]));
        assert_eq!(hex::encode(root), ROOT_VECTOR);
        assert_eq!(merkle_root(&[]), merkle::empty_root());
    }

    const ROOT_VECTOR: &str = "9c4a7a709ab29815a673f80cbd43a8cba39ff9b3b51a925e5273bade467f804e";
}
