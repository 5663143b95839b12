//! The KMIP key provider: CMKs live on a key manager, used only through its
//! Encrypt/Decrypt operations over TLS with a client certificate.

mod reference;

pub use reference::KmipKeyId;

/// Checks the part of a `kmip:` reference after the scheme.
pub fn validate_key_id(id: &str) -> Result<(), String> {
    KmipKeyId::parse(id).map(|_| ())
}
