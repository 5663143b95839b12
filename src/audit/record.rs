//! One audit record: a JSON line of fixed shape, chained to its predecessor.
//!
//! ```text
//! {"seq":0,"time":"2025-01-02T03:04:05.678901Z","event":"tenant.init","tenant":"acme","actor":"cli:root","details":{…},"prev":"0000…0000"}
//! ```
//!
//! The stored line is the canonical serialisation: serde_json in the field
//! order above, `time` in RFC 3339 UTC with exactly six fractional digits,
//! `tenant` `null` when the action concerns no tenant, object keys of
//! `details` as serde_json writes them, no white space, no trailing newline.
//! Those bytes are what is hashed:
//!
//! - `prev` of record n+1 = hex SHA-256(line n); `prev` of record 0 is 64 zeros;
//! - the Merkle leaf of record n = SHA-256(0x00 ‖ line n).
//!
//! Parsing refuses unknown fields; [`AuditRecord::parse_line`] also refuses a
//! line that is not canonical, so even a white-space edit is caught.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::merkle::{self, Hash};
use crate::tenant::TenantId;

/// `prev` of the first record.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    #[serde(with = "time_micros")]
    pub time: DateTime<Utc>,
    pub event: String,
    pub tenant: Option<TenantId>,
    pub actor: String,
    pub details: serde_json::Value,
    /// Hex SHA-256 of the previous record's line, or [`GENESIS_PREV`].
    pub prev: String,
}

/// Why a line is not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not an audit record: {0}")]
    Malformed(String),
    #[error("not in canonical form (re-serialised it differs: edited by hand?)")]
    NotCanonical,
}

impl AuditRecord {
    /// A record stamped now (truncated to microseconds, the stored precision;
    /// the clock of [`crate::hooks::now`]).
    pub fn new(
        seq: u64,
        event: &str,
        tenant: Option<&TenantId>,
        actor: &str,
        details: serde_json::Value,
        prev: String,
    ) -> Self {
        AuditRecord {
            seq,
            time: crate::hooks::now().trunc_subsecs(6),
            event: event.to_owned(),
            tenant: tenant.cloned(),
            actor: actor.to_owned(),
            details,
            prev,
        }
    }

    /// The canonical line (no trailing newline).
    pub fn to_line(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an audit record always serialises")
    }

    /// Parses a line strictly: known fields only, a well-formed `prev`, and
    /// canonical bytes.
    pub fn parse_line(line: &[u8]) -> Result<Self, RecordError> {
        let record = Self::from_line(line)?;
        if !record.is_canonical(line) {
            return Err(RecordError::NotCanonical);
        }
        Ok(record)
    }

    /// Parses a line (known fields only, a well-formed `prev`) without the
    /// canonical-form check, so a verifier can still follow the chain past a
    /// re-formatted record.
    pub fn from_line(line: &[u8]) -> Result<Self, RecordError> {
        let record: AuditRecord =
            serde_json::from_slice(line).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if record.prev.len() != 64
            || !record
                .prev
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(RecordError::Malformed(
                "prev must be 64 lowercase hex digits".into(),
            ));
        }
        Ok(record)
    }

    /// Whether `line` is exactly this record's canonical serialisation.
    pub fn is_canonical(&self, line: &[u8]) -> bool {
        self.to_line() == line
    }
}

/// SHA-256 of a line: what the next record's `prev` holds.
pub fn line_hash(line: &[u8]) -> Hash {
    Sha256::digest(line).into()
}

/// The Merkle leaf hash of a line: SHA-256(0x00 ‖ line).
pub fn leaf_hash(line: &[u8]) -> Hash {
    merkle::leaf_hash(line)
}

/// Event names: `[a-z][a-z0-9._-]{0,63}` ("backup", "shred.begin", "lease.takeover").
pub fn valid_event(event: &str) -> bool {
    let b = event.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
}

/// Actors: 1 to 256 characters, no control characters ("cli:alice", "daemon:host-1").
pub fn valid_actor(actor: &str) -> bool {
    !actor.is_empty() && actor.chars().count() <= 256 && !actor.chars().any(char::is_control)
}

mod time_micros {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> AuditRecord {
        AuditRecord {
            seq: 3,
            time: DateTime::parse_from_rfc3339("2025-01-02T03:04:05.678901Z")
                .unwrap()
                .with_timezone(&Utc),
            event: "shred.begin".into(),
            tenant: Some(TenantId::new("acme").unwrap()),
            actor: "cli:root".into(),
            details: json!({"key": "local:acme", "fingerprint": "00112233aabbccdd", "epochs": [1, 2]}),
            prev: "ab".repeat(32),
        }
    }

    #[test]
    fn canonical_line_has_fixed_field_order() {
        let line = String::from_utf8(sample().to_line()).unwrap();
        assert_eq!(
            line,
            format!(
                "{{\"seq\":3,\"time\":\"2025-01-02T03:04:05.678901Z\",\"event\":\"shred.begin\",\
                 \"tenant\":\"acme\",\"actor\":\"cli:root\",\"details\":{{\"epochs\":[1,2],\
                 \"fingerprint\":\"00112233aabbccdd\",\"key\":\"local:acme\"}},\"prev\":\"{}\"}}",
                "ab".repeat(32)
            )
        );
        assert_eq!(AuditRecord::parse_line(line.as_bytes()).unwrap(), sample());
    }

    #[test]
    fn no_tenant_is_null() {
        let mut r = sample();
        r.tenant = None;
        let line = r.to_line();
        assert!(String::from_utf8_lossy(&line).contains("\"tenant\":null"));
        assert_eq!(AuditRecord::parse_line(&line).unwrap(), r);
    }

    #[test]
    fn rejects_unknown_fields_and_non_canonical_lines() {
        let line = String::from_utf8(sample().to_line()).unwrap();
        let extra = line.replacen("{\"seq\"", "{\"x\":1,\"seq\"", 1);
        assert!(matches!(
            AuditRecord::parse_line(extra.as_bytes()),
            Err(RecordError::Malformed(_))
        ));
        let spaced = line.replacen("\"seq\":3", "\"seq\": 3", 1);
        assert_eq!(
            AuditRecord::parse_line(spaced.as_bytes()),
            Err(RecordError::NotCanonical)
        );
        let reordered = line.replacen(
            "\"seq\":3,\"time\":\"2025-01-02T03:04:05.678901Z\"",
            "\"time\":\"2025-01-02T03:04:05.678901Z\",\"seq\":3",
            1,
        );
        assert_eq!(
            AuditRecord::parse_line(reordered.as_bytes()),
            Err(RecordError::NotCanonical)
        );
        let other_zone = line.replacen("03:04:05.678901Z", "04:04:05.678901+01:00", 1);
        assert_eq!(
            AuditRecord::parse_line(other_zone.as_bytes()),
            Err(RecordError::NotCanonical)
        );
        let upper = line.replace(&"ab".repeat(32), &"AB".repeat(32));
        assert!(matches!(
            AuditRecord::parse_line(upper.as_bytes()),
            Err(RecordError::Malformed(_))
        ));
        let bad_tenant = line.replacen("\"acme\"", "\"../x\"", 1);
        assert!(AuditRecord::parse_line(bad_tenant.as_bytes()).is_err());
        assert!(AuditRecord::parse_line(format!("{line}\n").as_bytes()).is_err());
    }

    #[test]
    fn hashes_differ_by_domain() {
        let line = sample().to_line();
        assert_ne!(line_hash(&line), leaf_hash(&line));
        let mut pre = vec![0u8];
        pre.extend_from_slice(&line);
        assert_eq!(leaf_hash(&line), line_hash(&pre));
    }

    #[test]
    fn names_are_validated() {
        assert!(
            valid_event("backup") && valid_event("shred.begin") && valid_event("lease.take-over")
        );
        assert!(
            !valid_event("") && !valid_event("Backup") && !valid_event("a b") && !valid_event("1x")
        );
        assert!(valid_actor("cli:alice") && !valid_actor("") && !valid_actor("a\nb"));
    }
}
