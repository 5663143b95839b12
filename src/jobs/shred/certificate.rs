//! Deletion certificates: a signed JSON document that proves, to anyone who
//! trusts only the audit public key, what a shred destroyed, what remains,
//! how it was verified, and that the shred is recorded in the audit log.
//!
//! # File format (`custos-deletion-certificate/2`; `/1` is still verified)
//!
//! ```json
//! {
//!   "certificate": { …the body, see [`Certificate`]… },
//!   "signature": {
//!     "algorithm": "ed25519",
//!     "signer": "<verifier key text, as `custos audit public-key` prints it>",
//!     "value": "<base64 of the 64-byte Ed25519 signature>"
//!   }
//! }
//! ```
//!
//! - **Canonical JSON** ([`canonical_json`]): UTF-8; object members sorted by
//!   key (bytewise); strings escaped as JSON requires and nothing more (`"`,
//!   `\`, `\b \f \n \r \t`, other control characters as `\u00xx`, lowercase
//!   hex; everything else, `/` and non-ASCII included, written as is); only
//!   integers, no floats. Compact: no white space at all. This is what
//!   Python's `json.dumps(v, sort_keys=True, separators=(",", ":"),
//!   ensure_ascii=False)` writes.
//! - **Signature**: Ed25519 (RFC 8032, strict verification) by the audit key
//!   over `certificate.format ‖ "\n" ‖ canonical_json(certificate)`
//!   (`"custos-deletion-certificate/2\n" ‖ …`; a `/1` certificate was signed
//!   with its own label, `"custos-deletion-certificate/1\n"`).
//! - **The file** is the whole document in the pretty canonical form: the same
//!   members and escaping, indented by two spaces, `": "` after keys, each
//!   member and element on its own line, `[]` and `{}` when empty, and one
//!   final newline. Verification renders the parsed document again and
//!   requires the very same bytes, so every edit of the file, even of white
//!   space, fails verification; reformat a copy (`jq`) only to read it.
//! - **Audit anchor** (`certificate.audit`): the `shred.certificate.begin`
//!   record, appended before signing, names the certificate id and
//!   `certificate_sha256` = hex SHA-256 of the canonical JSON of the body
//!   *without* its `audit` member; the anchor holds that record's seq, its
//!   Merkle leaf hash, the same digest and the record's inclusion evidence
//!   against a signed checkpoint ([`crate::audit::InclusionEvidence`]). The
//!   record and the certificate thus name each other, and the log proves when
//!   the certificate was issued.

use std::fmt::Write as _;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::audit::note::VerifierKey;
use crate::audit::record::{AuditRecord, leaf_hash};
use crate::audit::{AuditKey, InclusionEvidence};
use crate::format::shred::{
    DeletionRecord, KeyDestruction, RewrapRecord, ScopeRecord, VerificationRecord,
};
use crate::tenant::TenantId;

/// The format custos issues. `/2` added `guarantee.destruction_began_at`:
/// a verifier of `/1` parses strictly (unknown members are refused, so that
/// nothing unsigned-for can be read into a certificate), so a new member
/// takes a new version, never a silent addition. Every member of a `/2`
/// body is signed; a `/1` certificate keeps verifying (see [`FORMATS`]).
pub const CERTIFICATE_FORMAT: &str = "custos-deletion-certificate/2";
/// The first format (custos 0.1 until `/2`).
pub const CERTIFICATE_FORMAT_V1: &str = "custos-deletion-certificate/1";
/// Every format this verifier accepts. `/1` certificates issued while
/// `destruction_began_at` was added under `/1` (briefly, before `/2`) carry
/// that member too: they verify as they were signed.
pub const FORMATS: &[&str] = &[CERTIFICATE_FORMAT_V1, CERTIFICATE_FORMAT];

/// Domain label prefixed to the signed bytes: the body's format and a
/// newline (`custos-deletion-certificate/2\n`).
pub fn signing_label(format: &str) -> Vec<u8> {
    format!("{format}\n").into_bytes()
}
/// The audit event whose record a certificate's evidence proves.
pub const ANCHOR_EVENT: &str = "shred.certificate.begin";

/// What was shredded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Tenant,
    Epoch,
}

/// Which guarantee the certificate gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuaranteeKind {
    /// Every key that ever wrapped the shredded data keys is destroyed: all
    /// copies of the ciphertext, wherever they survive, are unrecoverable.
    KeysDestroyed,
    /// Epoch shred without re-wrap: the epoch's envelope is deleted from the
    /// store, but the key that wrapped it lives on for the other epochs, so a
    /// copy of the envelope kept elsewhere could still be unwrapped.
    EnvelopeDeleted,
    /// Some keys named as the tenant's were not destroyed because nothing
    /// proved they were its (`keys[].outcome = not_destroyed`): a copy of an
    /// envelope once wrapped under one of them could still be unwrapped while
    /// it lives. `guarantee.pending` names them.
    KeysPartlyDestroyed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guarantee {
    pub kind: GuaranteeKind,
    pub statement: String,
    /// When custos began destroying keys (the first run of the shred's
    /// `keys` step, before its first destroy call); absent when no key was
    /// destroyed, and in certificates issued before custos recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destruction_began_at: Option<DateTime<Utc>>,
    /// After this instant nothing can undo the erasure (the latest of the
    /// keys' `irreversible_at`: when the last key's destruction completed,
    /// or a scheduled deletion's date); absent when no key was destroyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irreversible_at: Option<DateTime<Utc>>,
    /// What is still pending, and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

impl Guarantee {
    /// A guarantee whose times [`Certificate::new`] fills in from the keys.
    pub fn new(kind: GuaranteeKind, statement: String, pending: Option<String>) -> Self {
        Guarantee {
            kind,
            statement,
            destruction_began_at: None,
            irreversible_at: None,
            pending,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Algorithms {
    pub data_encryption: String,
    pub key_derivation: String,
    pub chunk_ids: String,
    /// One line per provider whose keys wrapped the destroyed data keys.
    pub key_wrapping: Vec<String>,
    pub scope_tree: String,
    pub signature: String,
}

impl Algorithms {
    pub fn new(providers: &[&str]) -> Self {
        let mut key_wrapping: Vec<String> = providers
            .iter()
            .map(|p| match *p {
                "aws-kms" => "aws-kms: AWS KMS symmetric key (SYMMETRIC_DEFAULT, AES-256-GCM inside KMS), encryption context {tenant, purpose, epoch}".to_owned(),
                "local" => "local: AES-256-GCM under a wrap key derived with HKDF-SHA256 from the key version's material, AAD binding {tenant, purpose, epoch}".to_owned(),
                other => other.to_owned(),
            })
            .collect();
        key_wrapping.sort();
        key_wrapping.dedup();
        Algorithms {
            data_encryption: "AES-256-GCM with per-object keys and key commitment".into(),
            key_derivation: "HKDF-SHA256 from the epoch's tenant data key".into(),
            chunk_ids: "keyed BLAKE3".into(),
            key_wrapping,
            scope_tree: "RFC 6962 Merkle tree, SHA-256, leaves custos-shred-scope/1".into(),
            signature: "Ed25519 (RFC 8032) by the audit key".into(),
        }
    }
}

/// The scope as the certificate states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeSummary {
    pub listed_at: DateTime<Utc>,
    pub objects: u64,
    pub bytes: u64,
    pub merkle_root: String,
    pub leaf_encoding: String,
    pub envelopes: Vec<u32>,
    /// Seq of the `shred.scope.end` audit record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_envelopes: Vec<String>,
}

impl From<ScopeRecord> for ScopeSummary {
    /// What of the recorded scope a certificate states: not the captured
    /// wrapped keys or the sample pack, which only the verification used.
    fn from(scope: ScopeRecord) -> Self {
        Self {
            listed_at: scope.listed_at,
            objects: scope.objects,
            bytes: scope.bytes,
            merkle_root: scope.merkle_root,
            leaf_encoding: scope.leaf_encoding,
            envelopes: scope.envelopes,
            audit_seq: scope.audit_seq,
            foreign_envelopes: scope.foreign_envelopes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreInfo {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnchor {
    pub event: String,
    pub seq: u64,
    /// Hex SHA-256(0x00 ‖ record line).
    pub leaf_hash: String,
    /// Hex SHA-256 of the canonical body without `audit`, as the record states it.
    pub body_sha256: String,
    pub evidence: InclusionEvidence,
}

/// The certificate body: everything that is signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub format: String,
    pub id: String,
    pub subject: Subject,
    pub tenant: TenantId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    pub reason: String,
    pub requested_by: String,
    pub actor: String,
    pub requested_at: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub executed_at: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    pub method: String,
    pub guarantee: Guarantee,
    pub algorithms: Algorithms,
    pub keys: Vec<KeyDestruction>,
    pub scope: ScopeSummary,
    pub deletion: DeletionRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrap: Option<RewrapRecord>,
    pub verification: VerificationRecord,
    pub store: StoreInfo,
    pub custos_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditAnchor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureBlock {
    pub algorithm: String,
    pub signer: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateDocument {
    pub certificate: Certificate,
    pub signature: SignatureBlock,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("not a JSON document: {0}")]
    NotJson(String),
    #[error("not in canonical form (the file was edited or reformatted)")]
    NotCanonical,
    #[error("not a deletion certificate: {0}")]
    Malformed(String),
    #[error("trusted key: {0}")]
    BadTrustedKey(String),
    #[error("signed by {found}, not by the trusted key {expected}")]
    WrongSigner { found: String, expected: String },
    #[error("the signature does not verify")]
    BadSignature,
    #[error("audit evidence: {0}")]
    Evidence(String),
    #[error("the audit record does not match the certificate: {0}")]
    AuditMismatch(String),
    #[error("the certificate states that verification failed")]
    VerificationFailed,
}

/// What a successful verification established.
#[derive(Debug, Clone)]
pub struct Verified {
    pub certificate: Certificate,
    /// The audit record the evidence proves (`shred.certificate.begin`).
    pub record: AuditRecord,
    /// Size and root of the signed checkpoint the record is included in.
    pub checkpoint_size: u64,
}

// ---------------------------------------------------------------------------
// Canonical JSON

/// The canonical encoding of a JSON value (see the module docs): compact, or
/// `pretty` (the file form, without the final newline). Fails on floats.
pub fn canonical_json(v: &Value, pretty: bool) -> Result<String, CertificateError> {
    let mut out = String::new();
    write_value(&mut out, v, pretty.then_some(0))?;
    Ok(out)
}

fn write_value(out: &mut String, v: &Value, indent: Option<usize>) -> Result<(), CertificateError> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if !(n.is_u64() || n.is_i64()) {
                return Err(CertificateError::Malformed(format!(
                    "{n}: only integers are allowed"
                )));
            }
            let _ = write!(out, "{n}");
        }
        Value::String(s) => out.push_str(&serde_json::to_string(s).expect("strings serialise")),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent.map(|d| d + 1));
                write_value(out, item, indent.map(|d| d + 1))?;
            }
            newline(out, indent);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, indent.map(|d| d + 1));
                out.push_str(&serde_json::to_string(k).expect("strings serialise"));
                out.push(':');
                if indent.is_some() {
                    out.push(' ');
                }
                write_value(out, &map[k], indent.map(|d| d + 1))?;
            }
            newline(out, indent);
            out.push('}');
        }
    }
    Ok(())
}

fn newline(out: &mut String, indent: Option<usize>) {
    if let Some(depth) = indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str("  ");
        }
    }
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("certificates serialise")
}

/// Hex SHA-256 of the canonical body without its `audit` member.
pub fn body_digest(body: &Certificate) -> String {
    let mut v = to_value(body);
    if let Value::Object(m) = &mut v {
        m.remove("audit");
    }
    digest_value(&v).expect("certificate bodies hold no floats")
}

fn digest_value(v: &Value) -> Result<String, CertificateError> {
    Ok(hex::encode(Sha256::digest(
        canonical_json(v, false)?.as_bytes(),
    )))
}

fn signed_message(body: &Value, format: &str) -> Result<Vec<u8>, CertificateError> {
    let mut msg = signing_label(format);
    msg.extend_from_slice(canonical_json(body, false)?.as_bytes());
    Ok(msg)
}

/// Signs a body (whose `audit` anchor is set) and returns the file's bytes.
pub fn sign(body: &Certificate, key: &AuditKey) -> Vec<u8> {
    let body_value = to_value(body);
    let msg = signed_message(&body_value, &body.format).expect("certificate bodies hold no floats");
    let doc = CertificateDocument {
        certificate: body.clone(),
        signature: SignatureBlock {
            algorithm: "ed25519".into(),
            signer: key.public_key_text(),
            value: STANDARD.encode(key.sign_message(&msg)),
        },
    };
    render(&to_value(&doc))
}

fn render(doc: &Value) -> Vec<u8> {
    let mut text = canonical_json(doc, true).expect("certificates hold no floats");
    text.push('\n');
    text.into_bytes()
}

/// Parses a certificate file without checking anything but its shape.
pub fn parse_unverified(bytes: &[u8]) -> Result<CertificateDocument, CertificateError> {
    serde_json::from_slice(bytes).map_err(|e| CertificateError::Malformed(e.to_string()))
}

/// Verifies a certificate file offline with nothing but the trusted verifier
/// key text (`custos audit public-key`): canonical form, signature, the audit
/// evidence (inclusion proof and checkpoint signature), that the audit record
/// and the certificate name each other, and that the certificate reports a
/// passed verification.
pub fn verify(bytes: &[u8], trusted_key_text: &str) -> Result<Verified, CertificateError> {
    let trusted = VerifierKey::parse(trusted_key_text)
        .map_err(|e| CertificateError::BadTrustedKey(e.to_string()))?;
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| CertificateError::NotJson(e.to_string()))?;
    // Floats cannot be rendered canonically: a document holding one is not canonical.
    let rendered = match canonical_json(&doc, true) {
        Ok(mut t) => {
            t.push('\n');
            t
        }
        Err(_) => return Err(CertificateError::NotCanonical),
    };
    if rendered.as_bytes() != bytes {
        return Err(CertificateError::NotCanonical);
    }
    let Value::Object(members) = &doc else {
        return Err(CertificateError::Malformed("not a JSON object".into()));
    };
    let (Some(body_value), Some(sig_value)) =
        (members.get("certificate"), members.get("signature"))
    else {
        return Err(CertificateError::Malformed(
            "expected the members certificate and signature".into(),
        ));
    };
    // The format first: a body of a format this verifier does not know is
    // refused as such (upgrade custos), not as an unknown member.
    let format = body_value
        .get("format")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !FORMATS.contains(&format) {
        return Err(CertificateError::Malformed(format!(
            "format {format:?} is not one this verifier knows ({}): a newer custos issued it, verify it with that version",
            FORMATS.join(", ")
        )));
    }
    let parsed: CertificateDocument = serde_json::from_value(doc.clone())
        .map_err(|e| CertificateError::Malformed(e.to_string()))?;
    let sig: SignatureBlock = serde_json::from_value(sig_value.clone())
        .map_err(|e| CertificateError::Malformed(e.to_string()))?;
    if sig.algorithm != "ed25519" {
        return Err(CertificateError::Malformed(format!(
            "signature algorithm {:?}",
            sig.algorithm
        )));
    }
    // The signer is compared as text in its canonical rendering (a key id in
    // upper-case hex would parse to the same key, but is not the same bytes).
    if sig.signer != trusted.to_string() {
        return Err(CertificateError::WrongSigner {
            found: sig.signer.chars().take(120).collect(),
            expected: trusted.to_string(),
        });
    }
    let raw = STANDARD
        .decode(&sig.value)
        .map_err(|_| CertificateError::BadSignature)?;
    let raw: [u8; 64] = raw.try_into().map_err(|_| CertificateError::BadSignature)?;
    let msg = signed_message(body_value, format)?;
    trusted
        .public_key()
        .verify_strict(&msg, &Signature::from_bytes(&raw))
        .map_err(|_| CertificateError::BadSignature)?;

    let cert = parsed.certificate;
    let anchor = cert
        .audit
        .as_ref()
        .ok_or_else(|| CertificateError::Malformed("no audit anchor".into()))?;
    let record = anchor
        .evidence
        .verify(&trusted.to_string())
        .map_err(|e| CertificateError::Evidence(e.to_string()))?;
    let mismatch = |what: String| Err(CertificateError::AuditMismatch(what));
    if record.seq != anchor.seq {
        return mismatch(format!(
            "the evidence is for record {}, the anchor names {}",
            record.seq, anchor.seq
        ));
    }
    if hex::encode(leaf_hash(anchor.evidence.record.as_bytes())) != anchor.leaf_hash {
        return mismatch("leaf hash".into());
    }
    if record.event != ANCHOR_EVENT || anchor.event != ANCHOR_EVENT {
        return mismatch(format!("event {:?}", record.event));
    }
    if record.tenant.as_ref() != Some(&cert.tenant) {
        return mismatch("tenant".into());
    }
    let mut unanchored = body_value.clone();
    if let Value::Object(m) = &mut unanchored {
        m.remove("audit");
    }
    let digest = digest_value(&unanchored)?;
    let details = &record.details;
    if details.get("certificate_id").and_then(Value::as_str) != Some(cert.id.as_str()) {
        return mismatch("the record names another certificate id".into());
    }
    if details.get("certificate_sha256").and_then(Value::as_str) != Some(digest.as_str())
        || anchor.body_sha256 != digest
    {
        return mismatch("the record's certificate_sha256 is not this body's digest".into());
    }
    if !cert.verification.passed {
        return Err(CertificateError::VerificationFailed);
    }
    let checkpoint_size = anchor.evidence.tree_size;
    Ok(Verified {
        certificate: cert,
        record,
        checkpoint_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_and_escapes() {
        let v: Value = serde_json::from_str(
            r#"{"b":[1,{"z":null,"a":"x\"y\n\u0001/é"}],"a":{},"c":[],"B":true}"#,
        )
        .unwrap();
        assert_eq!(
            canonical_json(&v, false).unwrap(),
            r#"{"B":true,"a":{},"b":[1,{"a":"x\"y\n\u0001/é","z":null}],"c":[]}"#
        );
        assert_eq!(
            canonical_json(&v, true).unwrap(),
            "{\n  \"B\": true,\n  \"a\": {},\n  \"b\": [\n    1,\n    {\n      \"a\": \"x\\\"y\\n\\u0001/é\",\n      \"z\": null\n    }\n  ],\n  \"c\": []\n}"
        );
        let f: Value = serde_json::from_str(r#"{"x":1.5}"#).unwrap();
        assert!(canonical_json(&f, false).is_err());
    }
}
