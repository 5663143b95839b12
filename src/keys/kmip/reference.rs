//! KMIP key references: `kmip:<unique-identifier>` or `kmip:name/<name>`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KmipKeyId {
    /// The server's Unique Identifier of the key object.
    Uid(String),
    /// The key's Name attribute; resolved with Locate.
    Name(String),
}

const MAX_LEN: usize = 256;

impl KmipKeyId {
    pub fn parse(id: &str) -> Result<Self, String> {
        let (value, make): (&str, fn(String) -> KmipKeyId) = match id.strip_prefix("name/") {
            Some(name) => (name, KmipKeyId::Name),
            None => (id, KmipKeyId::Uid),
        };
        if value.is_empty() || value.len() > MAX_LEN {
            return Err(format!(
                "a KMIP key is kmip:<unique-identifier> or kmip:name/<name>, 1 to {MAX_LEN} bytes"
            ));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err("a KMIP key reference has a control character".into());
        }
        // Names are custos' own namespace on the server: `<n>@v<k>` for
        // versions, `<n>@destroyed@<t>` and the group `custos-uid/<uid>` for
        // tombstones. A name that could spell one of those is refused.
        if id.starts_with("name/") && (value.contains('@') || value.starts_with("custos-uid/")) {
            return Err(
                "a KMIP key name may not contain '@' or start with 'custos-uid/' (custos names its versions and tombstones with them)"
                    .into(),
            );
        }
        Ok(make(value.to_owned()))
    }
}

impl fmt::Display for KmipKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KmipKeyId::Uid(u) => f.write_str(u),
            KmipKeyId::Name(n) => write!(f, "name/{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uids_and_names() {
        assert_eq!(KmipKeyId::parse("42").unwrap(), KmipKeyId::Uid("42".into()));
        assert_eq!(
            KmipKeyId::parse("name/custos-acme").unwrap(),
            KmipKeyId::Name("custos-acme".into())
        );
        for bad in [
            "",
            "name/",
            "a\nb",
            &"x".repeat(257),
            "name/acme@v2",
            "name/acme@destroyed@1",
            "name/custos-uid/42",
        ] {
            assert!(KmipKeyId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
