//! `[kmip]` in custos.toml: where the key manager is and how custos proves
//! who it is (TLS with a client certificate).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use zeroize::Zeroizing;

use super::wire::Transport;
use crate::keys::KeyError;
use crate::secure_fs::{CheckError, Readers};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS: usize = 4;

/// Connection settings of the KMIP provider. Holds paths, never key bytes.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct KmipSettings {
    /// `host:port` of the key manager (KMIP's port is 5696).
    pub server: String,
    /// The name the server's certificate must carry; default: the host of `server`.
    pub server_name: Option<String>,
    /// PEM file of the CA(s) that sign the server's certificate.
    pub ca_file: PathBuf,
    /// PEM file of custos's client certificate (and chain).
    pub client_cert_file: PathBuf,
    /// PEM file of the client's private key: owned by custos's user (or
    /// root), no access for group or others.
    pub client_key_file: PathBuf,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
    /// Most connections (and calls in flight) at once.
    pub max_connections: usize,
}

impl fmt::Debug for KmipSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipSettings")
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

fn not_configured(message: String) -> KeyError {
    KeyError::NotConfigured {
        provider: "kmip",
        message,
    }
}

impl KmipSettings {
    pub fn new(server: &str, ca: &Path, cert: &Path, key: &Path) -> Self {
        KmipSettings {
            server: server.to_owned(),
            server_name: None,
            ca_file: ca.to_owned(),
            client_cert_file: cert.to_owned(),
            client_key_file: key.to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// The host part of `server` (`[::1]:5696` → `::1`).
    fn host(&self) -> Result<&str, KeyError> {
        let (host, port) = self
            .server
            .rsplit_once(':')
            .ok_or_else(|| not_configured(format!("server {:?} is not host:port", self.server)))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(not_configured(format!(
                "server {:?} is not host:port",
                self.server
            )));
        }
        Ok(host.trim_start_matches('[').trim_end_matches(']'))
    }

    pub(super) fn transport(&self) -> Result<Transport, KeyError> {
        let host = self.host()?;
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| not_configured(format!("{name:?} is not a valid TLS server name")))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&self.ca_file, "ca_file")? {
            roots
                .add(cert)
                .map_err(|e| not_configured(format!("ca_file {}: {e}", self.ca_file.display())))?;
        }
        let chain = read_certs(&self.client_cert_file, "client_cert_file")?;
        let key = read_key(&self.client_key_file)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| not_configured(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                not_configured(format!(
                    "client_cert_file {} and client_key_file {} do not form a usable pair: {e}",
                    self.client_cert_file.display(),
                    self.client_key_file.display()
                ))
            })?;
        Ok(Transport::new(
            self.server.clone(),
            Arc::new(tls),
            server_name,
            self.connect_timeout,
            self.operation_timeout,
            self.max_connections,
        ))
    }
}

/// PEM files are small; more than this is not one (and a FIFO or device
/// in its place must not hang custos or fill its memory).
const MAX_PEM_FILE: u64 = 1 << 20;

/// Reads one of the TLS files after checking, as for every file custos
/// trusts, that no other local user can replace it: whoever could write the
/// CA file could make custos trust their own server, and hand it the
/// wrapping keys. The private key must also be unreadable to others.
fn read_trusted(path: &Path, what: &str, readers: Readers) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    crate::secure_fs::read_trusted(path, &format!("KMIP {what}"), readers, MAX_PEM_FILE).map_err(
        |e| match e {
            CheckError::Insecure(i) => KeyError::InsecurePermissions {
                path: i.path,
                message: i.message,
            },
            CheckError::Io(p, e) => not_configured(format!("{what} {}: {e}", p.display())),
        },
    )
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let bytes = read_trusted(path, what, Readers::Anyone)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_configured(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(not_configured(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Reads the client's private key; its bytes never reach an error message.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, KeyError> {
    let bytes = read_trusted(path, "client_key_file", Readers::OwnerOnly)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        not_configured(format!(
            "client_key_file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ))
    })
}
