//! KMIP over TLS: connections and framing (the messages are `messages.rs`).
//!
//! The TLS stream is custos's own (rustls 0.23, the one the rest of the tree
//! uses): the TLS features of `kmip-protocol` pin rustls 0.19.
//!
//! Every call runs on a blocking thread: the TCP connect within the connect
//! timeout, then the handshake and the whole exchange within one operation
//! timeout, however slowly a server drips its answer; never a hang of the
//! runtime. A request is sent twice only if it is idempotent: a Create,
//! Revoke or Destroy the server may have carried out before the connection
//! broke is never resent.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kmip_protocol::types::common::Operation;
use kmip_protocol::types::response::ResultReason;
use rustls::pki_types::ServerName;
use zeroize::Zeroizing;

use super::messages::{Request, Response, decode, encode};

/// Largest response custos reads (a Locate page of many objects is a few KiB).
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

/// Whatever carries a request to a key manager and brings its answer back:
/// the TLS [`Transport`], or in unit tests an in-memory key manager.
#[async_trait]
pub(super) trait Link: Send + Sync {
    async fn call(&self, req: Request) -> Result<Response, WireError>;

    /// Drops idle connections, so that the next request resolves the
    /// server's name and connects again, as every write does: a check of
    /// which key manager answers must reach the one the writes reach.
    fn forget_connections(&self) {}
}

#[async_trait]
impl Link for Arc<Transport> {
    async fn call(&self, req: Request) -> Result<Response, WireError> {
        Transport::call(self, req).await
    }

    fn forget_connections(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

// --- Connections -----------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ClientConnection, DeadlineSocket>;

/// A socket whose every read and write may wait only until `deadline`: each
/// system call gets what is left as its timeout, so a server that drips its
/// answer (or its handshake) a byte at a time cannot stretch a call.
pub(super) struct DeadlineSocket {
    sock: TcpStream,
    deadline: Instant,
}

impl DeadlineSocket {
    fn arm(&self, read: bool) -> std::io::Result<()> {
        let left = remaining(self.deadline);
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        match read {
            true => self.sock.set_read_timeout(Some(left)),
            false => self.sock.set_write_timeout(Some(left)),
        }
    }
}

impl Read for DeadlineSocket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm(true)?;
        self.sock.read(buf)
    }
}

impl Write for DeadlineSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm(false)?;
        self.sock.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

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
        }
    }

    /// Sends one request and returns its answer.
    pub(super) async fn call(self: &Arc<Self>, req: Request) -> Result<Response, WireError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| WireError::Io("the connection pool is closed".into()))?;
        let op = req.operation();
        let bytes = encode(req)?;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.call_blocking(op, &bytes))
            .await
            .map_err(|e| WireError::Io(format!("the KMIP call did not finish: {e}")))?
    }

    fn call_blocking(&self, op: Operation, bytes: &[u8]) -> Result<Response, WireError> {
        // A pooled connection the server closed in the meantime fails on
        // first use; a read-only or repeatable request is then sent once
        // more on a fresh connection. Any other request goes on a fresh
        // connection only: were it sent on a stale one and the answer lost,
        // custos could not tell whether the server carried it out.
        if idempotent(op) {
            let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
            let deadline = Instant::now() + self.operation_timeout;
            if let Some(mut conn) = pooled
                && let Ok(buf) = exchange(&mut conn, bytes, deadline)
            {
                return self.finish(conn, op, buf);
            }
        }
        // The handshake and the exchange share one operation timeout.
        let mut conn = self.connect()?;
        let deadline = conn.sock.deadline;
        let buf = exchange(&mut conn, bytes, deadline)?;
        self.finish(conn, op, buf)
    }

    /// Decodes the answer, and pools the connection only if it is in step:
    /// the answer parsed, and nothing more arrived after it. A connection
    /// that carried a malformed answer, or bytes beyond it (an answer meant
    /// for an earlier request, or junk), is dropped: the next request on it
    /// would read them as its own answer.
    fn finish(
        &self,
        mut conn: Tls,
        op: Operation,
        buf: Zeroizing<Vec<u8>>,
    ) -> Result<Response, WireError> {
        let answer = decode(op, &buf)?;
        if in_step(&mut conn)
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push(conn);
        }
        Ok(answer)
    }

    fn connect(&self) -> Result<Tls, WireError> {
        let addrs: Vec<_> = self
            .server
            .to_socket_addrs()
            .map_err(|e| WireError::Connect(format!("cannot resolve {}: {e}", self.server)))?
            .collect();
        let connect_by = Instant::now() + self.connect_timeout;
        let mut last = None;
        let mut sock = None;
        for addr in addrs {
            let left = remaining(connect_by);
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
        let deadline = Instant::now() + self.operation_timeout;
        let mut tls = rustls::StreamOwned::new(conn, DeadlineSocket { sock, deadline });
        // The handshake now, so that a wrong CA or a refused client
        // certificate is named as such rather than as a broken call.
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(alert_after(&mut tls).unwrap_or_else(|| tls_error(&e)));
            }
        }
        Ok(tls)
    }
}

/// The alert a server sent before it closed the connection, if any. A
/// server that refuses the client certificate sends an alert and closes; a
/// write racing that close fails with EPIPE, which says nothing, while the
/// alert waiting in the socket says why.
fn alert_after(tls: &mut Tls) -> Option<WireError> {
    // After a close this read returns at once (the alert, EOF or a reset);
    // otherwise it waits no longer than the call's deadline.
    let _ = tls.conn.read_tls(&mut tls.sock);
    match tls.conn.process_new_packets() {
        Err(e) => Some(tls_error(&std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e,
        ))),
        Ok(_) => None,
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

/// Whether nothing is left to read on `conn` after an answer: no plaintext
/// buffered, and no TLS record waiting that would decrypt to some.
fn in_step(conn: &mut Tls) -> bool {
    conn.conn
        .process_new_packets()
        .is_ok_and(|state| state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed())
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

/// Sends one request and reads its response, all before `deadline`.
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
    conn.sock.deadline = deadline;
    if let Err(e) = conn.write_all(bytes).and_then(|()| conn.flush()) {
        return Err(alert_after(conn).unwrap_or_else(|| io(e)));
    }
    // TTLV: tag (3 bytes), type (1), length (4, big-endian), then the value.
    let mut head = [0u8; 8];
    conn.read_exact(&mut head).map_err(io)?;
    let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if head[..3] != [0x42, 0x00, 0x7B] || len > MAX_RESPONSE {
        return Err(WireError::Protocol(format!(
            "not a KMIP response message (tag {:02x}{:02x}{:02x}, {len} bytes)",
            head[0], head[1], head[2]
        )));
    }
    let mut buf = Zeroizing::new(vec![0u8; 8 + len]);
    buf[..8].copy_from_slice(&head);
    conn.read_exact(&mut buf[8..]).map_err(io)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A server that answers the TLS handshake with a record header of a
    /// large record and then one byte every 50 ms: every read returns within
    /// the per-read timeout, so only a deadline over the whole call ends it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_dripping_its_answer_cannot_stretch_a_call_past_the_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let Ok((mut sock, _)) = listener.accept() else {
                return;
            };
            let mut drip = vec![0x16, 0x03, 0x03, 0x40, 0x00];
            drip.extend(std::iter::repeat_n(0u8, 400));
            for b in drip {
                if sock.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let transport = Arc::new(Transport::new(
            addr.to_string(),
            Arc::new(tls),
            ServerName::try_from("localhost").unwrap(),
            Duration::from_millis(300),
            Duration::from_millis(300),
            1,
        ));
        let started = Instant::now();
        let r = transport
            .call(Request::Crypt {
                decrypt: true,
                uid: "1".into(),
                cipher: super::super::messages::Cipher::Ctr,
                iv: [0; 16],
                data: Zeroizing::new(vec![0; 32]),
            })
            .await;
        let took = started.elapsed();
        assert!(
            matches!(r, Err(WireError::Io(_)) | Err(WireError::Tls(_))),
            "{:?}",
            r.err()
        );
        // The drip lasts 20 s; the deadline is 0.6 s after the start.
        assert!(took < Duration::from_secs(5), "the call took {took:?}");
    }
}
