//! Which key manager holds a key: the marker key custos leaves on each
//! server, and the binding of every recorded key to one (see [`super::pins`]).
//!
//! An object's Unique Identifier names it only on the server that assigned
//! it, and "Item Not Found" proves a destruction only there: pointed at
//! another key manager (a wrong `[kmip] server`, a DR site, a test server
//! that shares the CA), custos would read every version of a key as gone
//! and certify a destruction while the key lives on, or destroy that
//! server's objects that carry the same identifiers. So nothing of a
//! recorded key is judged until the server gives the key check value of
//! the key's marker under its identifier: material, which no other server
//! holds and no Name can forge.

use std::collections::BTreeSet;

use super::messages::Template;
use super::pins::{KeyObjects, Marker};
use super::{Family, KmipProvider, USAGE_DECRYPT, USAGE_ENCRYPT, label};
use crate::keys::kmip::messages::Request;
use crate::keys::{KeyError, KeyRef};
use kmip_protocol::types::common::State;

/// The Name of a marker key: the prefix and 128 random bits (hex).
const MARKER_PREFIX: &str = "custos-server/";
/// The Object Group of marker keys: never a key's (those are
/// `custos-key/…` and `custos-uid/…`).
const MARKER_GROUP: &str = "custos-server";

impl KmipProvider {
    /// The Names of the recorded markers this server holds: those whose
    /// check value it gives under their identifier. Cached for the life of
    /// the provider unless `fresh`.
    pub(super) async fn markers_here(
        &self,
        key: &KeyRef,
        fresh: bool,
    ) -> Result<BTreeSet<String>, KeyError> {
        if !fresh && let Some(here) = self.marker_cache() {
            return Ok(here);
        }
        self.link.forget_connections();
        let mut here = BTreeSet::new();
        for (name, marker) in self.pins.servers(&label(key))? {
            // A creation that stopped before its check value: not a marker.
            if marker.check.is_empty() {
                continue;
            }
            match self.check_value(key, &marker.uid).await {
                Ok(check) if check == marker.check => {
                    here.insert(name);
                }
                // No answer: nothing is known of this server.
                Err(e @ (KeyError::Unreachable { .. } | KeyError::Throttled { .. })) => {
                    return Err(e);
                }
                // Other material, no object, one this client may not use:
                // not the server that holds this marker.
                Ok(_) | Err(_) => {}
            }
        }
        self.set_marker_cache(Some(here.clone()));
        Ok(here)
    }

    /// A marker of this server to bind a key to: one it holds, or a new one
    /// (recorded before it is activated, and with its check value after).
    /// Asked afresh: a binding written on a stale verdict (a DNS failover
    /// since) would tie the key to another server than the one that holds it.
    async fn marker_to_bind(&self, key: &KeyRef) -> Result<String, KeyError> {
        if let Some(name) = self.markers_here(key, true).await?.into_iter().next() {
            return Ok(name);
        }
        let name = format!(
            "{MARKER_PREFIX}{}",
            hex::encode(crate::util::random_bytes::<16>())
        );
        let uid = self
            .create(
                key,
                Template {
                    bits: 256,
                    usage_mask: USAGE_ENCRYPT | USAGE_DECRYPT,
                    names: vec![name.clone()],
                    group: MARKER_GROUP.into(),
                    sensitive: true,
                },
            )
            .await?;
        let recorded = |check: String| Marker {
            uid: uid.clone(),
            check,
        };
        self.pins
            .add_server(&name, recorded(String::new()), &label(key))?;
        self.simple(key, "Activate", Request::Activate(uid.clone()))
            .await?;
        let check = self.check_value(key, &uid).await?;
        self.pins.add_server(&name, recorded(check), &label(key))?;
        tracing::info!(event = "kmip.server_marker_created", server = %self.server, object = %uid, marker = %name, "custos marked KMIP server {} as the key manager holding its keys (object {uid}, Name {name}): do not destroy or revoke this object", self.server);
        self.set_marker_cache(None);
        Ok(name)
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
        if self.markers_here(key, fresh).await?.contains(bound) {
            return Ok(());
        }
        // A cached "not here" is asked again: the server may be back.
        if !fresh && self.markers_here(key, true).await?.contains(bound) {
            return Ok(());
        }
        Err(KeyError::Unavailable {
            key: label(key),
            message: format!(
                "this key is recorded on the key manager that holds custos's marker key {bound:?}, and the KMIP server {} does not give that marker's key check value: [kmip] server names another key manager than the one holding this key (or the marker was destroyed or revoked there). custos judges none of the key's objects on it, since an identifier absent there says nothing of a destruction; see docs/keys-you-hold.md (\"Which key manager holds a key\")",
                self.server
            ),
        })
    }

    /// After a write whose outcome depends on which server answered (a
    /// version created and pinned, a shred's proof): the server must still
    /// give the key's marker, asked afresh; else the answers may have come
    /// from another key manager, and nothing is concluded from them.
    pub(super) async fn still_on_own_server(&self, key: &KeyRef) -> Result<(), KeyError> {
        match self.pins.get(&self.record_entry(key), &label(key))? {
            Some(r) => self.check_server(key, &r, true).await,
            None => Ok(()),
        }
    }

    /// Binds a key custos has just met or is making to this server.
    pub(super) async fn bind_new(&self, key: &KeyRef, entry: &str) -> Result<(), KeyError> {
        let marker = self.marker_to_bind(key).await?;
        self.pins.update(entry, &label(key), |r| {
            r.server.get_or_insert(marker);
        })?;
        Ok(())
    }

    /// Binds a key recorded before markers to this server, once the server
    /// proves it holds the key's material: every Active version custos
    /// pinned gives its check value, and there is at least one. Identifiers
    /// alone prove nothing (another server numbers its objects alike).
    pub(super) async fn bind_legacy(
        &self,
        key: &KeyRef,
        entry: &str,
        fam: &Family,
    ) -> Result<(), KeyError> {
        let mut proven = 0;
        for (_, o) in fam.versions.iter().filter(|(_, o)| o.pinned) {
            let (State::Active, Some(pinned)) = (o.state, &o.check) else {
                continue;
            };
            if &self.check_value(key, &o.uid).await? != pinned {
                proven = 0;
                break;
            }
            proven += 1;
        }
        if proven == 0 {
            return Err(KeyError::Unavailable {
                key: label(key),
                message: format!(
                    "custos recorded this key before it bound keys to their key manager, and the KMIP server {} does not prove it holds the key: none of its Active versions gives the key check value custos recorded (or one gives another). custos cannot tell this from a wrong [kmip] server, and judges none of its objects here; see docs/keys-you-hold.md (\"Which key manager holds a key\")",
                    self.server
                ),
            });
        }
        self.bind_new(key, entry).await
    }

    fn marker_cache(&self) -> Option<BTreeSet<String>> {
        self.marker.lock().ok().and_then(|m| m.clone())
    }

    fn set_marker_cache(&self, here: Option<BTreeSet<String>>) {
        if let Ok(mut m) = self.marker.lock() {
            *m = here;
        }
    }
}
