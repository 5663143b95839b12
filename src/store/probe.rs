//! Probes whether a store honours conditional writes. Some S3 clones (garage)
//! accept `If-None-Match: *` and silently overwrite; leases on such a store
//! would let two daemons run one tenant's jobs at once.

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::SharedStore;

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConditionalWrites {
    /// A second `PutMode::Create` on the same name failed with `AlreadyExists`.
    pub create_exclusive: bool,
    /// A `PutMode::Update` with a stale e-tag failed with `Precondition`.
    pub update_checked: bool,
    /// What went wrong, when something did.
    pub detail: Option<String>,
}

impl ConditionalWrites {
    pub fn supported(&self) -> bool {
        self.create_exclusive && self.update_checked
    }
}

/// Writes and removes two small objects under `probe/` (outside tenant prefixes).
pub async fn probe_conditional_writes(store: &SharedStore) -> ConditionalWrites {
    let path = Path::from(format!(
        "probe/conditional-{}",
        hex::encode(crate::util::random_bytes::<8>())
    ));
    let result = run(store, &path).await;
    let _ = store.delete(&path).await;
    result
}

async fn run(store: &SharedStore, path: &Path) -> ConditionalWrites {
    let opts = |mode| PutOptions {
        mode,
        ..Default::default()
    };
    let mut out = ConditionalWrites {
        create_exclusive: false,
        update_checked: false,
        detail: None,
    };
    let first = match store
        .put_opts(path, PutPayload::from_static(b"1"), opts(PutMode::Create))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.detail = Some(format!("conditional create failed: {e}"));
            return out;
        }
    };
    match store
        .put_opts(path, PutPayload::from_static(b"2"), opts(PutMode::Create))
        .await
    {
        Err(object_store::Error::AlreadyExists { .. }) => out.create_exclusive = true,
        Ok(_) => {
            out.detail = Some(
                "a second create-if-absent of the same object succeeded (If-None-Match ignored)"
                    .into(),
            );
            return out;
        }
        Err(e) => {
            out.detail = Some(format!(
                "second conditional create failed unexpectedly: {e}"
            ));
            return out;
        }
    }
    let current = UpdateVersion {
        e_tag: first.e_tag.clone(),
        version: first.version.clone(),
    };
    let second = match store
        .put_opts(
            path,
            PutPayload::from_static(b"3"),
            opts(PutMode::Update(current.clone())),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            out.detail = Some(format!("conditional update failed: {e}"));
            return out;
        }
    };
    if second.e_tag == first.e_tag && second.version == first.version {
        out.detail = Some("an update did not change the object's e-tag or version".into());
        return out;
    }
    match store
        .put_opts(
            path,
            PutPayload::from_static(b"4"),
            opts(PutMode::Update(current)),
        )
        .await
    {
        Err(object_store::Error::Precondition { .. }) => out.update_checked = true,
        Ok(_) => {
            out.detail = Some("an update with a stale e-tag succeeded (If-Match ignored)".into())
        }
        Err(e) => out.detail = Some(format!("stale conditional update failed unexpectedly: {e}")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_and_local_stores_pass() {
        assert!(
            probe_conditional_writes(&super::super::memory())
                .await
                .supported()
        );
        let dir = tempfile::tempdir().unwrap();
        let local = super::super::local::open(dir.path()).unwrap();
        let r = probe_conditional_writes(&local).await;
        assert!(r.supported(), "{r:?}");
    }
}
