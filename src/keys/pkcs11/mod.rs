//! The PKCS#11 key provider: CMKs are AES-256 secret keys on an HSM or
//! token, reached through its PKCS#11 module (`cryptoki`).

mod uri;

pub use uri::Pkcs11Uri;

/// Checks the part of a `pkcs11:` reference after the scheme.
pub fn validate_key_id(id: &str) -> Result<(), String> {
    Pkcs11Uri::parse(id).map(|_| ())
}
