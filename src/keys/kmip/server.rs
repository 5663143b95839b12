//! Which key manager holds a key: the marker object custos leaves on each
//! server, and the binding of every recorded key to one (see [`super::pins`]).
//!
//! An object's Unique Identifier names it only on the server that assigned
//! it, and "Item Not Found" proves a destruction only there: pointed at
//! another key manager (a wrong `[kmip] server`, a DR site, a test server
//! that shares the CA), custos would read every version of a key as gone,
//! mark it dead and certify a destruction while the key lives on. So
//! nothing of a recorded key is judged until the server answers for the
//! key's marker, by its identifier, with its random Name.

use super::messages::Template;
use super::pins::KeyObjects;
use super::{KmipProvider, label};
use crate::keys::{KeyError, KeyRef};

/// The Name of a marker object: the prefix and 128 random bits (hex).
const MARKER_PREFIX: &str = "custos-server/";
/// The Object Group of marker objects: never a key's (those are
/// `custos-key/…` and `custos-uid/…`).
const MARKER_GROUP: &str = "custos-server";

impl KmipProvider {
    /// The Name of this server's marker: the first recorded marker the
    /// server holds by its identifier with that Name. Cached for the life
    /// of the provider unless `fresh`; with `make`, a server that holds none
    /// gets a new one (recorded before it is used).
    pub(super) async fn server_marker(
        &self,
        key: &KeyRef,
        make: bool,
        fresh: bool,
    ) -> Result<Option<String>, KeyError> {
        if !fresh && let Some(name) = self.marker_cache() {
            return Ok(Some(name));
        }
        self.set_marker_cache(None);
        for (name, uid) in self.pins.servers(&label(key))? {
            match self.attributes(key, &uid).await {
                Ok(a) if a.names.contains(&name) => {
                    self.set_marker_cache(Some(name.clone()));
                    return Ok(Some(name));
                }
                // Another object under that identifier, none, or one this
                // client may not read: not the server that holds the marker.
                Ok(_) | Err(KeyError::NotFound { .. } | KeyError::AccessDenied { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if !make {
            return Ok(None);
        }
        let name = format!(
            "{MARKER_PREFIX}{}",
            hex::encode(crate::util::random_bytes::<16>())
        );
        // Never activated and with no usage: it can neither encrypt nor
        // decrypt, and is no key of anyone's.
        let uid = self
            .create(
                key,
                Template {
                    bits: 128,
                    usage_mask: 0,
                    names: vec![name.clone()],
                    group: MARKER_GROUP.into(),
                    sensitive: true,
                },
            )
            .await?;
        self.pins.add_server(&name, &uid, &label(key))?;
        tracing::info!(event = "kmip.server_marker_created", server = %self.server, object = %uid, marker = %name, "custos marked KMIP server {} as a key manager holding its keys (object {uid}, Name {name}); do not destroy this object", self.server);
        self.set_marker_cache(Some(name.clone()));
        Ok(Some(name))
    }

    /// Refuses a key recorded on another key manager than this one.
    pub(super) async fn check_server(
        &self,
        key: &KeyRef,
        record: &KeyObjects,
        fresh: bool,
    ) -> Result<(), KeyError> {
        let Some(bound) = &record.server else {
            return Ok(());
        };
        if self.server_marker(key, false, fresh).await?.as_ref() == Some(bound) {
            return Ok(());
        }
        Err(KeyError::Unavailable {
            key: label(key),
            message: format!(
                "this key is recorded on the key manager that holds custos's marker object {bound:?}, and the KMIP server {} does not hold it: [kmip] server names another key manager than the one holding this key (or the marker was deleted there). custos judges none of the key's objects on it, since an identifier absent there says nothing of a destruction; see docs/keys-you-hold.md (\"Which key manager holds a key\")",
                self.server
            ),
        })
    }

    /// Binds a key to this server: one met for the first time (`record`
    /// `None`), or recorded before markers when none of its objects is
    /// gone. A record from before markers with objects gone is refused:
    /// custos cannot tell their destruction from a wrong server.
    pub(super) async fn bind_here(
        &self,
        key: &KeyRef,
        entry: &str,
        record: Option<&KeyObjects>,
        gone: &[String],
    ) -> Result<(), KeyError> {
        if record.is_some_and(|r| r.server.is_some()) {
            return Ok(());
        }
        if record.is_some() && !gone.is_empty() {
            return Err(KeyError::Unavailable {
                key: label(key),
                message: format!(
                    "custos recorded this key before it bound keys to their key manager, and the KMIP server {} does not hold its version object(s) {gone:?}: custos cannot tell their destruction from a wrong [kmip] server, and treats neither as one. Check on the key manager; see docs/keys-you-hold.md (\"Which key manager holds a key\") to bind the key by hand",
                    self.server
                ),
            });
        }
        let Some(marker) = self.server_marker(key, true, false).await? else {
            return Ok(());
        };
        self.pins.update(entry, &label(key), |r| {
            r.server.get_or_insert(marker);
        })?;
        Ok(())
    }

    fn marker_cache(&self) -> Option<String> {
        self.marker.lock().ok().and_then(|m| m.clone())
    }

    fn set_marker_cache(&self, name: Option<String>) {
        if let Ok(mut m) = self.marker.lock() {
            *m = name;
        }
    }
}
