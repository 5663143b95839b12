//! PKCS#11 key references: the RFC 7512 URI attributes that name a secret
//! key on a token, after the `pkcs11:` scheme.

use std::fmt;

/// `token=<label>;object=<label>[;serial=<serial>][;type=secret-key]`.
/// Values are percent-decoded (RFC 7512 §2.3); the attributes' order does not
/// matter. A PIN is never part of a reference (`?pin-value` is refused): it
/// lives in `[pkcs11]` of custos.toml.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pkcs11Uri {
    /// `CKA_LABEL` of the token (`CK_TOKEN_INFO.label`, at most 32 bytes).
    pub token: String,
    /// `CKA_LABEL` of the key's objects (one per version, told apart by
    /// `CKA_ID`, see the provider).
    pub object: String,
    /// `CK_TOKEN_INFO.serialNumber`, to tell apart tokens with one label.
    pub serial: Option<String>,
}

/// `CK_TOKEN_INFO.label` is 32 bytes, blank-padded.
const MAX_TOKEN_LABEL: usize = 32;
/// `CKA_LABEL` has no length limit in PKCS#11; custos keeps references
/// readable in logs and certificates.
const MAX_OBJECT_LABEL: usize = 255;

impl Pkcs11Uri {
    pub fn parse(id: &str) -> Result<Self, String> {
        if id.contains('?') {
            return Err(
                "a PKCS#11 key reference takes no query (no pin-value, no module-path): \
                 the module and the PIN source are set in [pkcs11] of custos.toml"
                    .into(),
            );
        }
        let (mut token, mut object, mut serial) = (None, None, None);
        for attr in id.split(';') {
            let Some((name, value)) = attr.split_once('=') else {
                return Err(format!(
                    "expected attr=value, found {attr:?} (e.g. \"pkcs11:token=custos;object=acme\")"
                ));
            };
            let value = percent_decode(value)?;
            let slot = match name {
                "token" => &mut token,
                "object" => &mut object,
                "serial" => &mut serial,
                "type" => {
                    if value != "secret-key" {
                        return Err(format!(
                            "type={value} cannot be a CMK: custos wraps with an AES secret key (type=secret-key)"
                        ));
                    }
                    continue;
                }
                other => {
                    return Err(format!(
                        "unsupported attribute {other:?} (known: token, object, serial, type)"
                    ));
                }
            };
            if slot.replace(value).is_some() {
                return Err(format!("attribute {name:?} given twice"));
            }
        }
        let token = token.ok_or("missing token=<label>")?;
        let object = object.ok_or("missing object=<label>")?;
        for (what, v, max) in [
            ("token", &token, MAX_TOKEN_LABEL),
            ("object", &object, MAX_OBJECT_LABEL),
        ] {
            if v.is_empty() || v.len() > max {
                return Err(format!("{what} label must be 1 to {max} bytes"));
            }
            if v.chars().any(char::is_control) {
                return Err(format!("{what} label has a control character"));
            }
        }
        if let Some(s) = &serial
            && (s.is_empty() || s.len() > 16 || !s.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err("serial must be 1 to 16 printable characters".into());
        }
        Ok(Pkcs11Uri {
            token,
            object,
            serial,
        })
    }
}

impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token={}", percent_encode(&self.token))?;
        if let Some(s) = &self.serial {
            write!(f, ";serial={}", percent_encode(s))?;
        }
        write!(f, ";object={}", percent_encode(&self.object))
    }
}

fn percent_decode(v: &str) -> Result<String, String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in {v:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{v:?} does not decode to UTF-8"))
}

fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let u = Pkcs11Uri::parse("token=custos;object=acme").unwrap();
        assert_eq!((u.token.as_str(), u.object.as_str()), ("custos", "acme"));
        let u =
            Pkcs11Uri::parse("object=a%20b;serial=0a1b;token=My%3Btoken;type=secret-key").unwrap();
        assert_eq!(u.object, "a b");
        assert_eq!(u.token, "My;token");
        assert_eq!(u.serial.as_deref(), Some("0a1b"));
        assert_eq!(Pkcs11Uri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            "token=custos",
            "object=acme",
            "token=custos;object=acme;token=x",
            "token=custos;object=acme?pin-value=1234",
            "token=custos;object=acme;id=%01",
            "token=custos;object=acme;type=private",
            "token=custos;object=%zz",
            "token=;object=acme",
            "token=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa;object=acme",
            "token=custos;object=a%0ab",
            "token=custos;object=%ff",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
        }
        let long = format!("token=custos;object={}", "a".repeat(256));
        assert!(Pkcs11Uri::parse(&long).is_err());
        // Object labels longer than a token label are fine.
        let u = Pkcs11Uri::parse(&format!("token=custos;object={}", "a".repeat(64))).unwrap();
        assert_eq!(u.object.len(), 64);
        let e = Pkcs11Uri::parse("token=custos;object=acme?pin-value=1234").unwrap_err();
        assert!(e.contains("[pkcs11]"), "{e}");
        assert!(!e.contains("1234"), "{e}");
    }
}
