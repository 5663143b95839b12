//! What every job needs from its surroundings: the store, the key providers,
//! the state directory, and who is acting. Built once by the CLI or daemon.

use std::time::Duration;

use crate::keys::KeyProviders;
use crate::state::StateDir;
use crate::store::SharedStore;

#[derive(Clone)]
pub struct Context {
    pub store: SharedStore,
    /// The store as configured (`file:///…`, `s3://…`), for messages and reports.
    pub store_url: String,
    pub keys: KeyProviders,
    pub state: StateDir,
    /// Lease holder name of this process.
    pub holder: String,
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("store", &self.store_url)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// The embedded setup under one directory: `store/` (local object store),
    /// `keys/` (local key provider) and `state/`.
    pub fn embedded(root: &std::path::Path) -> crate::Result<Context> {
        let store = crate::store::local::open(&root.join("store"))?;
        Context::with_store(
            store,
            format!("file://{}", root.join("store").display()),
            root,
        )
    }

    /// A context over any store, with local keys and state under `root`.
    pub fn with_store(
        store: SharedStore,
        store_url: String,
        root: &std::path::Path,
    ) -> crate::Result<Context> {
        let local = crate::keys::local::LocalKeyProvider::new(root.join("keys"))?;
        Ok(Context {
            store,
            store_url,
            keys: KeyProviders {
                local: Some(std::sync::Arc::new(local)),
                aws_kms: None,
            },
            state: StateDir::open(root.join("state"))?,
            holder: crate::store::lease::holder_id(),
            lease_ttl: Duration::from_secs(120),
        })
    }
}
