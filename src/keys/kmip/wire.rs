//! KMIP over TLS: connections, framing, and the messages custos sends.
//!
//! Messages are built and parsed with NLnet Labs' `kmip-protocol` types
//! (serialized by its TTLV codec, `kmip-ttlv`), except Encrypt and Decrypt,
//! which that crate (0.4.3) lacks: their request and response are declared
//! here in the same style (KMIP 1.2 §4.29, §4.30). The TLS stream is custos's
//! own (rustls 0.23, the one the rest of the tree uses): the crate's TLS
//! features pin rustls 0.19.
//!
//! Every call runs on a blocking thread under one deadline (the connect
//! timeout plus the operation timeout) that bounds the whole call, however
//! slowly a server drips its answer, never a hang of the runtime. A request
//! is sent twice only if it is idempotent: a Create, Revoke or Destroy the
//! server may have carried out before the connection broke is never resent.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmip_protocol::types::common::{
    CryptographicAlgorithm, CryptographicParameters, Data, Operation, PaddingMethod,
    UniqueIdentifier,
};
use kmip_protocol::types::request::{
    Authentication, BatchCount, MaximumResponseSize, ProtocolVersion, ProtocolVersionMajor,
    ProtocolVersionMinor, RequestHeader, RequestPayload,
};
use kmip_protocol::types::response::{
    ResponseHeader, ResponseMessage, ResponsePayload, ResultReason, ResultStatus,
};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// Largest response custos reads (a Locate of many versions is a few KiB).
const MAX_RESPONSE: usize = 1 << 20;

/// Why a KMIP call failed, before it is mapped onto [`super::KeyError`].
#[derive(Debug)]
pub(super) enum WireError {
    /// No TCP connection (refused, no route, connect timeout).
    Connect(String),
    /// The TLS handshake failed: wrong CA, a certificate the server refused, …
    Tls(String),
    /// The connection broke or timed out during a call.
    Io(String),
    /// The server's answer could not be understood.
    Protocol(String),
    /// The server answered "operation failed".
    Failed {
        reason: Option<ResultReason>,
        message: String,
    },
}

/// What a call sends: one of the crate's payloads, or an Encrypt/Decrypt.
pub(super) enum Request {
    Std(Box<RequestPayload>),
    /// AES-CBC with PKCS#5 padding under `uid`, with the given IV.
    Cbc {
        decrypt: bool,
        uid: String,
        iv: [u8; 16],
        data: Zeroizing<Vec<u8>>,
    },
}

impl Request {
    pub(super) fn operation(&self) -> Operation {
        match self {
            Request::Std(p) => p.operation(),
            Request::Cbc { decrypt: false, .. } => Operation::Encrypt,
            Request::Cbc { decrypt: true, .. } => Operation::Decrypt,
        }
    }
}

pub(super) enum Response {
    Std(Box<ResponsePayload>),
    /// The Data of an Encrypt or Decrypt response (a plaintext WK after Decrypt).
    Data(Zeroizing<Vec<u8>>),
}

// --- Encrypt / Decrypt messages (absent from kmip-protocol 0.4.3) ---------

#[derive(Serialize)]
#[serde(rename = "0x420078")]
struct CbcRequestMessage(RequestHeader, Vec<CbcBatchItem>);

#[derive(Serialize)]
#[serde(rename = "0x42000F")]
struct CbcBatchItem(Operation, CbcRequestPayload);

#[derive(Serialize)]
#[serde(rename = "0x420079")]
struct CbcRequestPayload(
    UniqueIdentifier,
    CryptographicParameters,
    Data,
    IvCounterNonce,
);

#[derive(Serialize)]
#[serde(rename = "Transparent:0x42003D")]
struct IvCounterNonce(#[serde(with = "serde_bytes")] Vec<u8>);

#[derive(Deserialize)]
#[serde(rename = "0x42007B")]
struct CbcResponseMessage {
    #[serde(rename = "0x42007A")]
    _header: ResponseHeader,
    #[serde(rename = "0x42000F")]
    batch_items: Vec<CbcResponseItem>,
}

#[derive(Deserialize)]
#[serde(rename = "0x42000F")]
struct CbcResponseItem {
    #[serde(rename = "0x42005C")]
    _operation: Option<Operation>,
    #[serde(rename = "0x42007F")]
    result_status: ResultStatus,
    #[serde(rename = "0x42007E")]
    result_reason: Option<ResultReason>,
    #[serde(rename = "0x42007D")]
    result_message: Option<String>,
    #[serde(rename = "0x42007C")]
    payload: Option<CbcResponsePayload>,
}

#[derive(Deserialize)]
#[serde(rename = "0x42007C")]
struct CbcResponsePayload {
    #[serde(rename = "0x420094")]
    _unique_identifier: String,
    #[serde(rename = "0x4200C2", with = "serde_bytes")]
    data: Vec<u8>,
    #[serde(rename = "0x42003D", default, with = "serde_bytes")]
    _iv: Option<Vec<u8>>,
}

fn header(version_minor: i32) -> RequestHeader {
    RequestHeader(
        ProtocolVersion(ProtocolVersionMajor(1), ProtocolVersionMinor(version_minor)),
        Option::<MaximumResponseSize>::None,
        Option::<Authentication>::None,
        BatchCount(1),
    )
}

fn encode(req: Request) -> Result<Zeroizing<Vec<u8>>, WireError> {
    let bytes = match req {
        Request::Std(payload) => kmip_protocol::request::to_vec(*payload, None),
        Request::Cbc {
            decrypt,
            uid,
            iv,
            mut data,
        } => {
            let params = CryptographicParameters {
                block_cipher_mode: Some(kmip_protocol::types::common::BlockCipherMode::CBC),
                padding_method: Some(PaddingMethod::PKCS5),
                cryptographic_algorithm: Some(CryptographicAlgorithm::AES),
                ..Default::default()
            };
            let op = if decrypt {
                Operation::Decrypt
            } else {
                Operation::Encrypt
            };
            // Encrypt and Decrypt are KMIP 1.2 operations.
            let mut msg = CbcRequestMessage(
                header(2),
                vec![CbcBatchItem(
                    op,
                    CbcRequestPayload(
                        UniqueIdentifier(uid),
                        params,
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

fn decode(op: Operation, buf: &[u8]) -> Result<Response, WireError> {
    let bad = |e: kmip_ttlv::error::Error| {
        WireError::Protocol(format!("cannot parse the {op:?} response: {e}"))
    };
    if matches!(op, Operation::Encrypt | Operation::Decrypt) {
        let mut msg: CbcResponseMessage = kmip_ttlv::de::from_slice(buf).map_err(bad)?;
        let Some(mut item) = msg.batch_items.pop().filter(|_| msg.batch_items.is_empty()) else {
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
        return match item.payload.take() {
            Some(p) => Ok(Response::Data(Zeroizing::new(p.data))),
            None => Err(WireError::Protocol(format!("{op:?} answered no data"))),
        };
    }
    let mut msg: ResponseMessage = kmip_ttlv::de::from_slice(buf).map_err(bad)?;
    let Some(mut item) = msg.batch_items.pop().filter(|_| msg.batch_items.is_empty()) else {
        return Err(WireError::Protocol(
            "expected one batch item in the response".into(),
        ));
    };
    if item.result_status != ResultStatus::Success {
        return Err(failed(
            item.result_status,
            item.result_reason,
            item.result_message.take(),
        ));
    }
    if item.operation != Some(op) {
        return Err(WireError::Protocol(format!(
            "asked for {op:?}, the server answered {:?}",
            item.operation
        )));
    }
    item.payload
        .take()
        .map(|p| Response::Std(Box::new(p)))
        .ok_or_else(|| WireError::Protocol(format!("{op:?} answered no payload")))
}

// --- Connections -----------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// TLS client settings and a bounded pool of idle connections.
pub(super) struct Transport {
    pub(super) server: String,
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    connect_timeout: Duration,
    operation_timeout: Duration,
    idle: Mutex<Vec<Tls>>,
    /// At most this many calls (and so connections) at once.
    permits: tokio::sync::Semaphore,
    max_idle: usize,
    /// How many of each operation this process sent: lets tests prove that
    /// no Get ever left custos, and shows an operator what custos asked for.
    sent: Mutex<BTreeMap<String, u64>>,
}

impl Transport {
    pub(super) fn new(
        server: String,
        tls: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        connect_timeout: Duration,
        operation_timeout: Duration,
        max_connections: usize,
    ) -> Self {
        Transport {
            server,
            tls,
            server_name,
            connect_timeout,
            operation_timeout,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(max_connections.max(1)),
            max_idle: max_connections.max(1),
            sent: Mutex::new(BTreeMap::new()),
        }
    }

    pub(super) fn operations_sent(&self) -> BTreeMap<String, u64> {
        self.sent.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Sends one request and returns its answer.
    pub(super) async fn call(self: &Arc<Self>, req: Request) -> Result<Response, WireError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| WireError::Io("the connection pool is closed".into()))?;
        let op = req.operation();
        if let Ok(mut sent) = self.sent.lock() {
            *sent.entry(format!("{op:?}")).or_default() += 1;
        }
        let bytes = encode(req)?;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.call_blocking(op, &bytes))
            .await
            .map_err(|e| WireError::Io(format!("the KMIP call did not finish: {e}")))?
    }

    fn call_blocking(&self, op: Operation, bytes: &[u8]) -> Result<Response, WireError> {
        let deadline = Instant::now() + self.connect_timeout + self.operation_timeout;
        // A pooled connection the server closed in the meantime fails on
        // first use; a read-only or repeatable request is then sent once
        // more on a fresh connection. Any other request goes on a fresh
        // connection only: were it sent on a stale one and the answer lost,
        // custos could not tell whether the server carried it out.
        if idempotent(op) {
            let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
            if let Some(mut conn) = pooled
                && let Ok(buf) = exchange(&mut conn, bytes, deadline)
            {
                return self.finish(conn, op, buf);
            }
        }
        let mut conn = self.connect(deadline)?;
        let buf = exchange(&mut conn, bytes, deadline)?;
        self.finish(conn, op, buf)
    }

    fn finish(
        &self,
        conn: Tls,
        op: Operation,
        buf: Zeroizing<Vec<u8>>,
    ) -> Result<Response, WireError> {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push(conn);
        }
        decode(op, &buf)
    }

    fn connect(&self, deadline: Instant) -> Result<Tls, WireError> {
        let addrs: Vec<_> = self
            .server
            .to_socket_addrs()
            .map_err(|e| WireError::Connect(format!("cannot resolve {}: {e}", self.server)))?
            .collect();
        let mut last = None;
        let mut sock = None;
        for addr in addrs {
            let left = remaining(deadline).min(self.connect_timeout);
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&addr, left) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let Some(sock) = sock else {
            return Err(WireError::Connect(match last {
                Some(e) if e.kind() == std::io::ErrorKind::TimedOut => format!(
                    "no connection within {} s",
                    self.connect_timeout.as_secs_f64()
                ),
                Some(e) => e.to_string(),
                None => "the name resolves to no address".into(),
            }));
        };
        let io = |e: std::io::Error| WireError::Connect(e.to_string());
        sock.set_nodelay(true).map_err(io)?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .map_err(|e| WireError::Tls(e.to_string()))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        // The handshake now, so that a wrong CA or a refused client
        // certificate is named as such rather than as a broken call.
        while tls.conn.is_handshaking() {
            set_deadline(&tls.sock, deadline).map_err(|e| tls_error(&e))?;
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| tls_error(&e))?;
        }
        Ok(tls)
    }
}

/// A TLS failure in words an operator can act on.
fn tls_error(e: &std::io::Error) -> WireError {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(c)) => WireError::Tls(format!(
            "the server's certificate is not trusted ({c:?}): check ca_file, and that the server certificate names the host in `server` (or set server_name)"
        )),
        Some(rustls::Error::AlertReceived(alert)) => {
            use rustls::AlertDescription as A;
            let why = match alert {
                A::UnknownCA
                | A::BadCertificate
                | A::CertificateUnknown
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::AccessDenied
                | A::CertificateRequired => {
                    "the server does not accept the client certificate (client_cert_file): signed by a CA it does not trust, expired or revoked"
                }
                A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity => {
                    "no TLS version or cipher suite both sides speak (custos: TLS 1.2/1.3 with AES-GCM or ChaCha20; a server with an RSA certificate may offer only CBC suites)"
                }
                _ => "the server ended the handshake",
            };
            WireError::Tls(format!(
                "the server refused the TLS handshake ({alert:?}): {why}"
            ))
        }
        Some(other) => WireError::Tls(other.to_string()),
        None if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) =>
        {
            WireError::Io("the TLS handshake timed out".into())
        }
        None => WireError::Tls(format!("the TLS handshake failed: {e}")),
    }
}

/// Operations that may be sent again after a connection broke mid-call:
/// they change nothing on the server (Locate, Get Attributes), or repeating
/// them is harmless (an Encrypt or Decrypt of custos's own data).
fn idempotent(op: Operation) -> bool {
    matches!(
        op,
        Operation::Locate | Operation::GetAttributes | Operation::Encrypt | Operation::Decrypt
    )
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Lets the next socket read or write wait only until `deadline`.
fn set_deadline(sock: &TcpStream, deadline: Instant) -> std::io::Result<()> {
    let left = remaining(deadline);
    if left.is_zero() {
        return Err(std::io::ErrorKind::TimedOut.into());
    }
    sock.set_read_timeout(Some(left))?;
    sock.set_write_timeout(Some(left))
}

/// Sends one request and reads its response, all before `deadline`: each
/// read may wait only for what is left, so an answer dripped a byte at a
/// time cannot stretch the call.
fn exchange(
    conn: &mut Tls,
    bytes: &[u8],
    deadline: Instant,
) -> Result<Zeroizing<Vec<u8>>, WireError> {
    let io = |e: std::io::Error| {
        if e.get_ref()
            .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
        {
            return tls_error(&e);
        }
        match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                WireError::Io("no answer within the operation timeout".into())
            }
            _ => WireError::Io(e.to_string()),
        }
    };
    set_deadline(&conn.sock, deadline).map_err(io)?;
    conn.write_all(bytes).map_err(io)?;
    conn.flush().map_err(io)?;
    // TTLV: tag (3 bytes), type (1), length (4, big-endian), then the value.
    let mut head = [0u8; 8];
    read_before(conn, &mut head, deadline).map_err(io)?;
    let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if head[..3] != [0x42, 0x00, 0x7B] || len > MAX_RESPONSE {
        return Err(WireError::Protocol(format!(
            "not a KMIP response message (tag {:02x}{:02x}{:02x}, {len} bytes)",
            head[0], head[1], head[2]
        )));
    }
    let mut buf = Zeroizing::new(vec![0u8; 8 + len]);
    buf[..8].copy_from_slice(&head);
    read_before(conn, &mut buf[8..], deadline).map_err(io)?;
    Ok(buf)
}

/// `read_exact` with the socket's timeout shortened before every read to
/// what is left until `deadline`.
fn read_before(conn: &mut Tls, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        set_deadline(&conn.sock, deadline)?;
        match conn.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
