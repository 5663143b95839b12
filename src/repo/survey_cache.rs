//! What the key-ownership survey ([`super::ownership`]) read before, kept for
//! the life of the process: a daemon initialising a thousand tenants would
//! otherwise read and parse every other tenant's descriptor and every policy
//! file again for each one.
//!
//! Nothing here outlives a change: a descriptor is reused only when the store
//! answers a conditional read (`If-None-Match` its ETag) with "not modified",
//! one request per tenant per survey that sees any write, another host's
//! included; the replay check (generation against the one this host saw) is
//! not cached and runs on every survey. A policy file is reused only while
//! its stat is unchanged ([`DeclaredKeysCache`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::DeclaredKeysCache;
use crate::error::Result;
use crate::format::descriptor::Descriptor;
use crate::store::tenant::Fetched;
use crate::store::{ObjectName, TenantStore};
use crate::tenant::TenantId;

/// A descriptor as parsed, or why it does not parse.
pub type Parsed = std::result::Result<Arc<Descriptor>, String>;

#[derive(Debug, Default)]
pub struct SurveyCache {
    descriptors: Mutex<HashMap<TenantId, (String, Parsed)>>,
    pub policies: DeclaredKeysCache,
}

impl SurveyCache {
    /// The tenant's descriptor as the store holds it now (`None`: it has
    /// none), parsed once per version of it.
    pub async fn descriptor(&self, store: &TenantStore) -> Result<Option<Parsed>> {
        let tenant = store.tenant();
        let known = self.entries().get(tenant).map(|(tag, _)| tag.clone());
        let mut fetched = store
            .get_if_changed(&ObjectName::Descriptor, known.as_deref())
            .await?;
        if let Fetched::Unchanged = fetched {
            if let Some((tag, parsed)) = self.entries().get(tenant)
                && Some(tag) == known.as_ref()
            {
                return Ok(Some(parsed.clone()));
            }
            // Another survey replaced the entry meanwhile: read it whole.
            fetched = store.get_if_changed(&ObjectName::Descriptor, None).await?;
        }
        let Fetched::Changed(bytes, meta) = fetched else {
            self.entries().remove(tenant);
            return Ok(None);
        };
        let parsed: Parsed = Descriptor::parse(&bytes)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        match meta.e_tag {
            Some(tag) => {
                self.entries().insert(tenant.clone(), (tag, parsed.clone()));
            }
            None => {
                self.entries().remove(tenant);
            }
        }
        Ok(Some(parsed))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, (String, Parsed)>> {
        self.descriptors.lock().unwrap_or_else(|p| p.into_inner())
    }
}
