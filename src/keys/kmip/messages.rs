//! The KMIP operations custos sends, and their TTLV encoding.
//!
//! [`Request`] and [`Response`] are custos's own small vocabulary: exactly
//! the operations and fields the provider uses, so that its logic can be
//! checked against an in-memory key manager (`fake.rs`, tests only) as well
//! as against a real one. Messages are built and parsed with NLnet Labs'
//! `kmip-protocol` types (serialized by its TTLV codec, `kmip-ttlv`), except
//! Encrypt, Decrypt and a paged Locate, which that crate (0.4.3) lacks:
//! those are declared here in the same style (KMIP 1.2 §4.29, §4.30; KMIP
//! 1.3 §4.9 for Locate's Maximum Items and Offset Items).

use kmip_protocol::types::common::{
    AttributeIndex, AttributeName, AttributeValue, BlockCipherMode, CompromiseOccurrenceDate,
    CryptographicAlgorithm, CryptographicParameters, Data, ObjectType, Operation, PaddingMethod,
    RevocationReasonCode, State, UniqueIdentifier,
};
use kmip_protocol::types::request::{
    self as req, Authentication, BatchCount, MaximumResponseSize, ProtocolVersion,
    ProtocolVersionMajor, ProtocolVersionMinor, RequestHeader, RequestPayload, RevocationReason,
};
use kmip_protocol::types::response::{
    ResponseHeader, ResponseMessage, ResponsePayload, ResultReason, ResultStatus,
};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::wire::WireError;

/// What an object is made with (Create of an AES key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Template {
    /// Cryptographic Length in bits (256 for a version, 128 for a tombstone).
    pub bits: i32,
    /// Cryptographic Usage Mask (KMIP bits: Encrypt 0x4, Decrypt 0x8).
    pub usage_mask: i32,
    /// Name attributes, each unique on the server.
    pub names: Vec<String>,
    /// The Object Group that ties a key's objects together.
    pub group: String,
    /// Sent with Sensitive = true (a KMIP 1.4 attribute): a server that
    /// honours it never returns the key's value to a Get.
    pub sensitive: bool,
}

/// What a Locate looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Filter {
    /// Objects carrying this Name (the scheme before Object Groups).
    Name(String),
    /// Objects in this Object Group.
    Group(String),
}

/// How the server's AES-256 Encrypt or Decrypt of a wrapping key runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cipher {
    /// CBC with PKCS#5 padding (envelope format 1: unwrap only).
    CbcPkcs5,
    /// CBC without padding (envelope format 2, mode 1).
    Cbc,
    /// CTR, the IV being the initial counter block (envelope format 2, mode 2).
    Ctr,
}

/// One KMIP operation, as custos uses it.
pub(super) enum Request {
    Create(Template),
    Activate(String),
    Revoke {
        uid: String,
        reason: RevocationReasonCode,
        /// Unix seconds; KMIP requires it with Key Compromise.
        compromised_at: Option<i64>,
    },
    Destroy(String),
    /// One page of the objects matching `filter`.
    Locate {
        filter: Filter,
        max_items: i32,
        offset_items: i32,
    },
    /// State, Names and Object Groups of one object (never Get).
    GetAttributes(String),
    Crypt {
        decrypt: bool,
        uid: String,
        cipher: Cipher,
        iv: [u8; 16],
        data: Zeroizing<Vec<u8>>,
    },
}

impl Request {
    pub(super) fn operation(&self) -> Operation {
        match self {
            Request::Create(_) => Operation::Create,
            Request::Activate(_) => Operation::Activate,
            Request::Revoke { .. } => Operation::Revoke,
            Request::Destroy(_) => Operation::Destroy,
            Request::Locate { .. } => Operation::Locate,
            Request::GetAttributes(_) => Operation::GetAttributes,
            Request::Crypt { decrypt: false, .. } => Operation::Encrypt,
            Request::Crypt { decrypt: true, .. } => Operation::Decrypt,
        }
    }
}

/// What an object carries, of what custos asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Attributes {
    /// The Unique Identifier the server says these are of.
    pub uid: String,
    pub state: Option<State>,
    pub names: Vec<String>,
    pub groups: Vec<String>,
    pub algorithm: Option<CryptographicAlgorithm>,
    /// Cryptographic Length, in bits.
    pub bits: Option<i32>,
}

pub(super) enum Response {
    /// The Unique Identifier of a created object.
    Created(String),
    /// Activate, Revoke, Destroy.
    Done,
    Attributes(Attributes),
    /// An Encrypt's or Decrypt's Data (a plaintext WK after Decrypt), the
    /// Unique Identifier of the key the server says it used, and the IV or
    /// counter it says it used, if it returned one.
    Data {
        uid: String,
        data: Zeroizing<Vec<u8>>,
        iv: Option<Vec<u8>>,
    },
    /// One Locate page, and (KMIP 1.3) how many objects match in all.
    Located {
        uids: Vec<String>,
        total: Option<i32>,
    },
}

// --- Messages absent from kmip-protocol 0.4.3 -------------------------------

#[derive(Serialize)]
#[serde(rename = "0x420078")]
struct RequestMessage<P>(RequestHeader, Vec<RequestItem<P>>);

#[derive(Serialize)]
#[serde(rename = "0x42000F")]
struct RequestItem<P>(Operation, P);

#[derive(Serialize)]
#[serde(rename = "0x420079")]
struct CryptPayload(
    UniqueIdentifier,
    CryptographicParameters,
    Data,
    IvCounterNonce,
);

#[derive(Serialize)]
#[serde(rename = "Transparent:0x42003D")]
struct IvCounterNonce(#[serde(with = "serde_bytes")] Vec<u8>);

#[derive(Serialize)]
#[serde(rename = "0x420079")]
struct LocatePayload(MaximumItems, OffsetItems, Vec<req::Attribute>);

#[derive(Serialize)]
#[serde(rename = "Transparent:0x42004F")]
struct MaximumItems(i32);

#[derive(Serialize)]
#[serde(rename = "Transparent:0x4200D4")]
struct OffsetItems(i32);

#[derive(Deserialize)]
#[serde(rename = "0x42007B")]
struct CustomResponseMessage<P> {
    #[serde(rename = "0x42007A")]
    _header: ResponseHeader,
    #[serde(rename = "0x42000F")]
    batch_items: Vec<CustomResponseItem<P>>,
}

#[derive(Deserialize)]
#[serde(rename = "0x42000F")]
struct CustomResponseItem<P> {
    #[serde(rename = "0x42005C")]
    operation: Option<Operation>,
    #[serde(rename = "0x42007F")]
    result_status: ResultStatus,
    #[serde(rename = "0x42007E")]
    result_reason: Option<ResultReason>,
    #[serde(rename = "0x42007D")]
    result_message: Option<String>,
    #[serde(rename = "0x42007C")]
    payload: Option<P>,
}

#[derive(Deserialize)]
#[serde(rename = "0x42007C")]
struct CryptResponsePayload {
    #[serde(rename = "0x420094")]
    unique_identifier: String,
    #[serde(rename = "0x4200C2", with = "serde_bytes")]
    data: Vec<u8>,
    #[serde(rename = "0x42003D", default, with = "serde_bytes")]
    iv: Option<Vec<u8>>,
}

#[derive(Deserialize)]
#[serde(rename = "0x42007C")]
struct LocateResponsePayload {
    /// KMIP 1.3: how many objects match in all (not only on this page).
    #[serde(rename = "0x4200D5")]
    located_items: Option<i32>,
    #[serde(rename = "0x420094", default)]
    unique_identifiers: Vec<String>,
}

fn header(version_minor: i32) -> RequestHeader {
    RequestHeader(
        ProtocolVersion(ProtocolVersionMajor(1), ProtocolVersionMinor(version_minor)),
        Option::<MaximumResponseSize>::None,
        Option::<Authentication>::None,
        BatchCount(1),
    )
}

/// A Name attribute; several on one object need their index (PyKMIP insists).
fn name_attribute(name: String, index: i32) -> req::Attribute {
    let mut a = req::Attribute::Name(name);
    a.1 = Some(AttributeIndex(index));
    a
}

fn integer_attribute(name: &str, value: i32) -> req::Attribute {
    req::Attribute(
        AttributeName(name.into()),
        None,
        AttributeValue::Integer(value),
    )
}

fn filter_attribute(filter: Filter) -> req::Attribute {
    match filter {
        Filter::Name(n) => req::Attribute::Name(n),
        Filter::Group(g) => req::Attribute::ObjectGroup(g),
    }
}

fn crypt_parameters(cipher: Cipher) -> CryptographicParameters {
    let (mode, padding) = match cipher {
        Cipher::CbcPkcs5 => (BlockCipherMode::CBC, PaddingMethod::PKCS5),
        Cipher::Cbc => (BlockCipherMode::CBC, PaddingMethod::None),
        Cipher::Ctr => (BlockCipherMode::CTR, PaddingMethod::None),
    };
    CryptographicParameters {
        block_cipher_mode: Some(mode),
        padding_method: Some(padding),
        cryptographic_algorithm: Some(CryptographicAlgorithm::AES),
        ..Default::default()
    }
}

fn std_payload(req: Request) -> RequestPayload {
    let uid = |u: String| Some(UniqueIdentifier(u));
    match req {
        Request::Create(t) => {
            let mut attrs = vec![
                req::Attribute::CryptographicAlgorithm(CryptographicAlgorithm::AES),
                req::Attribute::CryptographicLength(t.bits),
                integer_attribute("Cryptographic Usage Mask", t.usage_mask),
            ];
            attrs.extend((0..).zip(t.names).map(|(i, name)| name_attribute(name, i)));
            attrs.push(req::Attribute::ObjectGroup(t.group));
            if t.sensitive {
                attrs.push(req::Attribute(
                    AttributeName("Sensitive".into()),
                    None,
                    AttributeValue::Boolean(true),
                ));
            }
            RequestPayload::Create(
                ObjectType::SymmetricKey,
                req::TemplateAttribute::unnamed(attrs),
            )
        }
        Request::Activate(u) => RequestPayload::Activate(uid(u)),
        Request::Revoke {
            uid: u,
            reason,
            compromised_at,
        } => RequestPayload::Revoke(
            uid(u),
            RevocationReason(reason, None),
            compromised_at.map(|t| CompromiseOccurrenceDate(t.max(0) as u64)),
        ),
        Request::Destroy(u) => RequestPayload::Destroy(uid(u)),
        Request::GetAttributes(u) => RequestPayload::GetAttributes(
            uid(u),
            Some(vec![
                AttributeName("State".into()),
                AttributeName("Name".into()),
                AttributeName("Object Group".into()),
                AttributeName("Cryptographic Algorithm".into()),
                AttributeName("Cryptographic Length".into()),
            ]),
        ),
        Request::Locate { .. } | Request::Crypt { .. } => {
            unreachable!("encoded by their own messages")
        }
    }
}

/// The TTLV bytes of one request.
pub(super) fn encode(req: Request) -> Result<Zeroizing<Vec<u8>>, WireError> {
    let op = req.operation();
    let bytes = match req {
        Request::Locate {
            filter,
            max_items,
            offset_items,
        } => kmip_ttlv::ser::to_vec(&RequestMessage(
            // Offset Items is a KMIP 1.3 field.
            header(3),
            vec![RequestItem(
                op,
                LocatePayload(
                    MaximumItems(max_items),
                    OffsetItems(offset_items),
                    vec![filter_attribute(filter)],
                ),
            )],
        )),
        Request::Crypt {
            uid,
            cipher,
            iv,
            mut data,
            ..
        } => {
            // Encrypt and Decrypt are KMIP 1.2 operations.
            let mut msg = RequestMessage(
                header(2),
                vec![RequestItem(
                    op,
                    CryptPayload(
                        UniqueIdentifier(uid),
                        crypt_parameters(cipher),
                        Data(std::mem::take(&mut *data)),
                        IvCounterNonce(iv.to_vec()),
                    ),
                )],
            );
            let out = kmip_ttlv::ser::to_vec(&msg);
            // The plaintext WK (Encrypt) must not linger in the message either.
            for item in &mut msg.1 {
                (item.1).2.0.zeroize();
            }
            out
        }
        // Sensitive is a KMIP 1.4 attribute: the message says 1.4.
        Request::Create(t) if t.sensitive => kmip_ttlv::ser::to_vec(&req::RequestMessage(
            header(4),
            vec![req::BatchItem(op, None, std_payload(Request::Create(t)))],
        )),
        other => kmip_protocol::request::to_vec(std_payload(other), None),
    };
    bytes
        .map(Zeroizing::new)
        .map_err(|e| WireError::Protocol(format!("cannot encode the request: {e}")))
}

fn failed(
    status: ResultStatus,
    reason: Option<ResultReason>,
    message: Option<String>,
) -> WireError {
    WireError::Failed {
        message: match (status, message) {
            (ResultStatus::OperationFailed, Some(m)) => m,
            (ResultStatus::OperationFailed, None) => "operation failed".into(),
            (other, _) => format!("unsupported result status {other:?}"),
        },
        reason,
    }
}

/// The one batch item of a response, if it succeeded and answers `op`.
fn only_item<P>(op: Operation, mut items: Vec<CustomResponseItem<P>>) -> Result<P, WireError> {
    let Some(item) = items.pop().filter(|_| items.is_empty()) else {
        return Err(WireError::Protocol(
            "expected one batch item in the response".into(),
        ));
    };
    if item.result_status != ResultStatus::Success {
        return Err(failed(
            item.result_status,
            item.result_reason,
            item.result_message,
        ));
    }
    if item.operation.is_some_and(|o| o != op) {
        return Err(WireError::Protocol(format!(
            "asked for {op:?}, the server answered {:?}",
            item.operation
        )));
    }
    item.payload
        .ok_or_else(|| WireError::Protocol(format!("{op:?} answered no payload")))
}

/// Nesting deeper than any KMIP response custos reads.
const MAX_DEPTH: usize = 16;

/// Checks that `buf` is exactly one well-formed TTLV item: every length
/// fits in the bytes its enclosing structure holds, fixed-size types have
/// their size, and values are padded to 8 bytes. The TTLV parser allocates
/// a value's length before reading it: a length of 4 GiB in a 1 MiB message
/// must be refused here, before any allocation.
pub(super) fn check_ttlv(buf: &[u8]) -> Result<(), String> {
    fn items(mut buf: &[u8], depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("TTLV nested deeper than {MAX_DEPTH} structures"));
        }
        while !buf.is_empty() {
            let Some(head) = buf.get(..8) else {
                return Err(format!("a truncated TTLV header ({} bytes)", buf.len()));
            };
            let kind = head[3];
            let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let padded = len.div_ceil(8) * 8;
            let rest = &buf[8..];
            if padded > rest.len() {
                return Err(format!(
                    "a TTLV item of tag {:02x}{:02x}{:02x} claims {len} bytes, {} remain",
                    head[0],
                    head[1],
                    head[2],
                    rest.len()
                ));
            }
            let fixed = match kind {
                0x01 => None,
                0x02 | 0x05 | 0x0A => Some(4),
                0x03 | 0x06 | 0x09 => Some(8),
                0x04 => (!len.is_multiple_of(8)).then_some(len.div_ceil(8) * 8),
                0x07 | 0x08 => None,
                t => return Err(format!("unknown TTLV item type {t:#04x}")),
            };
            if let Some(want) = fixed
                && len != want
            {
                return Err(format!(
                    "a TTLV item of type {kind:#04x} has length {len}, not {want}"
                ));
            }
            if kind == 0x01 {
                if len != padded {
                    return Err("a TTLV structure whose length is not a multiple of 8".into());
                }
                items(&rest[..len], depth + 1)?;
            }
            buf = &rest[padded..];
        }
        Ok(())
    }
    let len = buf
        .get(4..8)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or("a message shorter than one TTLV header")?;
    if buf.get(3) != Some(&0x01) || buf.len() != 8 + len {
        return Err(format!(
            "not one TTLV structure of {} bytes",
            buf.len().saturating_sub(8)
        ));
    }
    items(buf, 0)
}

/// Parses the answer to a request of operation `op`.
pub(super) fn decode(op: Operation, buf: &[u8]) -> Result<Response, WireError> {
    check_ttlv(buf)
        .map_err(|m| WireError::Protocol(format!("a malformed {op:?} response: {m}")))?;
    let bad = |e: kmip_ttlv::error::Error| {
        WireError::Protocol(format!("cannot parse the {op:?} response: {e}"))
    };
    match op {
        Operation::Encrypt | Operation::Decrypt => {
            let msg: CustomResponseMessage<CryptResponsePayload> =
                kmip_ttlv::de::from_slice(buf).map_err(bad)?;
            let p = only_item(op, msg.batch_items)?;
            return Ok(Response::Data {
                uid: p.unique_identifier,
                data: Zeroizing::new(p.data),
                iv: p.iv,
            });
        }
        Operation::Locate => {
            let msg: CustomResponseMessage<LocateResponsePayload> =
                kmip_ttlv::de::from_slice(buf).map_err(bad)?;
            let p = only_item(op, msg.batch_items)?;
            return Ok(Response::Located {
                uids: p.unique_identifiers,
                total: p.located_items,
            });
        }
        _ => {}
    }
    let msg: ResponseMessage = kmip_ttlv::de::from_slice(buf).map_err(bad)?;
    let items = msg
        .batch_items
        .into_iter()
        .map(|i| CustomResponseItem {
            operation: i.operation,
            result_status: i.result_status,
            result_reason: i.result_reason,
            result_message: i.result_message,
            payload: i.payload,
        })
        .collect();
    let wrong = || WireError::Protocol(format!("{op:?} answered a payload of another operation"));
    match (op, only_item(op, items)?) {
        (Operation::Create, ResponsePayload::Create(p)) => {
            Ok(Response::Created(p.unique_identifier.0))
        }
        (Operation::GetAttributes, ResponsePayload::GetAttributes(p)) => {
            let mut out = Attributes {
                uid: p.unique_identifier.0,
                ..Attributes::default()
            };
            for a in p.attributes.unwrap_or_default() {
                match a.value {
                    AttributeValue::State(s) => out.state = Some(s),
                    AttributeValue::Name(n, _) => out.names.push(n.0),
                    AttributeValue::ObjectGroup(g) => out.groups.push(g),
                    AttributeValue::CryptographicAlgorithm(alg) => out.algorithm = Some(alg),
                    // An Integer: only its name tells it from the usage mask.
                    AttributeValue::Integer(bits) if a.name.0 == "Cryptographic Length" => {
                        out.bits = Some(bits)
                    }
                    _ => {}
                }
            }
            Ok(Response::Attributes(out))
        }
        (Operation::Activate, ResponsePayload::Activate(_))
        | (Operation::Revoke, ResponsePayload::Revoke(_))
        | (Operation::Destroy, ResponsePayload::Destroy(_)) => Ok(Response::Done),
        _ => Err(wrong()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// One TTLV item: tag, type, value (padded here).
    fn item(tag: u32, kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = tag.to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().div_ceil(8) * 8, 0);
        out
    }

    fn structure(tag: u32, items: &[Vec<u8>]) -> Vec<u8> {
        item(tag, 0x01, &items.concat())
    }

    fn int(tag: u32, v: i32) -> Vec<u8> {
        item(tag, 0x02, &v.to_be_bytes())
    }

    fn enumeration(tag: u32, v: u32) -> Vec<u8> {
        item(tag, 0x05, &v.to_be_bytes())
    }

    /// A Locate response as a server sends it: two identifiers.
    fn locate_response(uids: &[&str]) -> Vec<u8> {
        let header = structure(
            0x42007A,
            &[
                structure(0x420069, &[int(0x42006A, 1), int(0x42006B, 3)]),
                item(0x420092, 0x09, &1_700_000_000i64.to_be_bytes()),
                int(0x42000D, 1),
            ],
        );
        let payload: Vec<Vec<u8>> = uids
            .iter()
            .map(|u| item(0x420094, 0x07, u.as_bytes()))
            .collect();
        let batch = structure(
            0x42000F,
            &[
                enumeration(0x42005C, 8),
                enumeration(0x42007F, 0),
                structure(0x42007C, &payload),
            ],
        );
        structure(0x42007B, &[header, batch])
    }

    #[test]
    fn a_well_formed_response_parses() {
        let buf = locate_response(&["7", "12"]);
        check_ttlv(&buf).unwrap();
        match decode(Operation::Locate, &buf).unwrap() {
            Response::Located { uids, total } => {
                assert_eq!(uids, ["7", "12"]);
                assert_eq!(total, None);
            }
            _ => panic!("not a Locate answer"),
        }
    }

    /// A length of 4 GiB inside a small message is refused before the
    /// parser could allocate it; so is every truncation.
    #[test]
    fn lengths_beyond_the_message_are_refused_before_parsing() {
        let buf = locate_response(&["7"]);
        // The identifier's length field: header(8) + response header + batch item…
        let at = buf
            .windows(4)
            .position(|w| w == [0x42, 0x00, 0x94, 0x07])
            .unwrap();
        for len in [u32::MAX, 1 << 30, 4096] {
            let mut bad = buf.clone();
            bad[at + 4..at + 8].copy_from_slice(&len.to_be_bytes());
            let e = decode(Operation::Locate, &bad).err().unwrap();
            assert!(format!("{e:?}").contains("claims"), "{e:?}");
        }
        for cut in 0..buf.len() {
            assert!(decode(Operation::Locate, &buf[..cut]).is_err(), "{cut}");
        }
    }

    proptest! {
        /// Random bytes, and a valid answer with random bytes changed,
        /// never panic and never parse into more than they hold.
        #[test]
        fn no_input_panics(
            junk in proptest::collection::vec(any::<u8>(), 0..512),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        ) {
            for op in [Operation::Locate, Operation::GetAttributes, Operation::Encrypt, Operation::Create] {
                let _ = decode(op, &junk);
            }
            let mut buf = locate_response(&["7", "12"]);
            for (at, b) in flips {
                let n = buf.len();
                buf[at % n] ^= b;
            }
            for op in [Operation::Locate, Operation::GetAttributes, Operation::Decrypt] {
                if let Ok(Response::Located { uids, .. }) = decode(op, &buf) {
                    prop_assert!(uids.iter().map(|u| u.len()).sum::<usize>() <= buf.len());
                }
            }
        }
    }
}
