//! `custos.toml`: where the store, keys, state and policies live, how to reach
//! AWS, and how the daemon paces itself.
//!
//! Discovery: `--config FILE`, else `$CUSTOS_CONFIG`, else `./custos.toml` if it
//! exists, else built-in defaults (the embedded setup: a local directory store
//! and the local key provider under `./custos-data`, policies in `./policies`),
//! so a first run needs neither a file nor a server. Relative paths in a file
//! are relative to that file's directory; keys a file leaves out take the same
//! built-in defaults, relative to that directory.

use std::ffi::OsStr;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};
use toml::de::DeTable;
use zeroize::Zeroizing;

use super::diag::{PolicyError, SourceText};
use super::paths::{base_dir_of, check_path_text, resolve};
use super::residency::{self, Placement, Residency};
use super::units::{serde_duration, truncate};
use super::walk::{Diags, Item, Table};
use crate::keys::ProviderKind;

/// The file `discover` looks for in the current directory.
pub const CONFIG_FILE_NAME: &str = "custos.toml";
/// The environment variable naming a configuration file.
pub const CONFIG_ENV: &str = "CUSTOS_CONFIG";

/// Where a tenant's objects are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local directory (absolute path).
    Local(PathBuf),
    /// An S3 (or S3-compatible) bucket and a key prefix without leading or trailing '/'.
    S3 { bucket: String, prefix: String },
    /// An in-memory store (`memory://`), for tests: nothing survives the process.
    Memory,
}

impl StoreLocation {
    /// Parses `file:///abs/dir`, `s3://bucket/prefix`, `memory://`, or a plain
    /// path (relative paths are joined onto `base_dir`).
    pub fn parse(text: &str, base_dir: &Path) -> Result<StoreLocation, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(
                "expected a store location (a directory, file:///dir or s3://bucket/prefix)".into(),
            );
        }
        if let Some(rest) = text.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(format!(
                    "{:?}: a file:// URL must be absolute (file:///path/to/store); for a directory relative to \
                     this file write the plain path",
                    truncate(text, 80)
                ));
            }
            check_path_text(rest)?;
            return Ok(StoreLocation::Local(resolve(base_dir, rest)));
        }
        if text.starts_with("s3://") {
            let (bucket, prefix) = parse_s3_url(text)?;
            return Ok(StoreLocation::S3 { bucket, prefix });
        }
        if let Some(rest) = text.strip_prefix("memory://") {
            if !rest.is_empty() {
                return Err(format!("{:?}: memory:// takes no path", truncate(text, 80)));
            }
            return Ok(StoreLocation::Memory);
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "unknown store scheme {:?} (expected file://, s3://, memory:// or a plain directory path)",
                truncate(scheme, 20)
            ));
        }
        check_path_text(text)?;
        Ok(StoreLocation::Local(resolve(base_dir, text)))
    }

    /// The location as a URL: `file:///…`, `s3://bucket/prefix`, `memory://`.
    pub fn url(&self) -> String {
        match self {
            StoreLocation::Local(p) => format!("file://{}", p.display()),
            StoreLocation::S3 { bucket, prefix } if prefix.is_empty() => format!("s3://{bucket}"),
            StoreLocation::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            StoreLocation::Memory => "memory://".into(),
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url())
    }
}

impl Serialize for StoreLocation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.url())
    }
}

/// Splits `s3://bucket/some/prefix/` into a validated bucket name and a prefix
/// (`some/prefix`, no leading or trailing '/').
pub fn parse_s3_url(text: &str) -> Result<(String, String), String> {
    let Some(rest) = text.strip_prefix("s3://") else {
        return Err(format!(
            "{:?}: expected s3://bucket/prefix",
            truncate(text, 80)
        ));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    validate_bucket_name(bucket)?;
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok((bucket.to_owned(), String::new()));
    }
    if prefix.len() > 512 {
        return Err("the prefix of an s3:// URL is longer than 512 bytes".into());
    }
    for segment in prefix.split('/') {
        let why = match segment {
            "" => Some("empty segment ('//')"),
            "." | ".." => Some("'.' or '..' segment"),
            s if s.chars().any(|c| c.is_control()) => Some("control character"),
            s if s.contains(['?', '#']) => {
                Some("'?' or '#' (write the prefix without query or fragment)")
            }
            _ => None,
        };
        if let Some(why) = why {
            return Err(format!("invalid prefix in {:?}: {why}", truncate(text, 80)));
        }
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// S3 bucket naming rules (general purpose buckets): 3–63 characters of
/// lowercase letters, digits, '.' and '-', starting and ending with a letter
/// or digit, no "..", not an IP address, none of the reserved prefixes and suffixes.
pub fn validate_bucket_name(name: &str) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "invalid S3 bucket name {:?}: {why}",
            truncate(name, 80)
        ))
    };
    if name.is_empty() {
        return fail("it is empty (expected s3://bucket/prefix)");
    }
    if !(3..=63).contains(&name.len()) {
        return fail("a bucket name has 3 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return fail("only lowercase letters, digits, '.' and '-' are allowed");
    }
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge_ok(name.as_bytes()[0]) || !edge_ok(name.as_bytes()[name.len() - 1]) {
        return fail("it must start and end with a letter or digit");
    }
    if name.contains("..") {
        return fail("it cannot contain two adjacent periods");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return fail("it cannot be formatted as an IP address");
    }
    if ["xn--", "sthree-", "amzn-s3-demo-"]
        .iter()
        .any(|p| name.starts_with(p))
        || ["-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"]
            .iter()
            .any(|s| name.ends_with(s))
    {
        return fail("it uses a prefix or suffix that AWS reserves");
    }
    Ok(())
}

/// A secret string from the configuration: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(s: &str) -> Self {
        SecretString(Zeroizing::new(s.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl Serialize for SecretString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// `[aws]`: how to reach AWS (or an emulator). Everything is optional; what is
/// absent comes from the standard AWS environment (variables, profile files,
/// instance role). Static keys here are supported but discouraged: prefer the
/// environment or an instance role, which do not sit in a file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AwsSettings {
    pub region: Option<String>,
    /// Endpoint for both KMS and S3 (emulators: LocalStack, MinIO).
    pub endpoint_url: Option<String>,
    /// Endpoint for KMS only; overrides `endpoint_url` for KMS.
    pub kms_endpoint_url: Option<String>,
    /// Endpoint for S3 only; overrides `endpoint_url` for S3.
    pub s3_endpoint_url: Option<String>,
    /// Permits `http://` endpoints (emulators). Off by default.
    pub allow_http: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretString>,
    pub session_token: Option<SecretString>,
    pub profile: Option<String>,
}

impl AwsSettings {
    /// The endpoint to use for KMS, if one is configured.
    pub fn kms_endpoint(&self) -> Option<&str> {
        self.kms_endpoint_url
            .as_deref()
            .or(self.endpoint_url.as_deref())
    }

    /// The endpoint to use for S3, if one is configured.
    pub fn s3_endpoint(&self) -> Option<&str> {
        self.s3_endpoint_url
            .as_deref()
            .or(self.endpoint_url.as_deref())
    }

    pub fn has_static_credentials(&self) -> bool {
        self.access_key_id.is_some() && self.secret_access_key.is_some()
    }
}

/// `[daemon]`: pacing of scheduled jobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DaemonSettings {
    /// Jobs running at once across all tenants (default 2: backup is CPU- and
    /// I/O-heavy, and hosts are often shared).
    pub max_concurrent_jobs: usize,
    /// Largest random delay added to each scheduled start, so tenants with the
    /// same schedule do not all hit the store at once (default 5m).
    #[serde(with = "serde_duration")]
    pub jitter: Duration,
    /// How long running jobs get to finish after SIGTERM (default 5m).
    #[serde(with = "serde_duration")]
    pub shutdown_timeout: Duration,
    /// Lifetime of a tenant lease before it must be renewed (default 2m).
    #[serde(with = "serde_duration")]
    pub lease_ttl: Duration,
    /// How long a deleter waits for readers that started before it (default
    /// 5m); then prune and forget defer their deletions to their next run.
    #[serde(with = "serde_duration")]
    pub reader_wait: Duration,
    /// Address of the Prometheus endpoint; none when absent.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        DaemonSettings {
            max_concurrent_jobs: 2,
            jitter: Duration::from_secs(5 * 60),
            shutdown_timeout: Duration::from_secs(5 * 60),
            lease_ttl: Duration::from_secs(2 * 60),
            reader_wait: Duration::from_secs(5 * 60),
            metrics_listen: None,
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditSettings {
    /// The daemon's Ed25519 signing key for audit checkpoints (default `<state_dir>/audit.key`).
    pub key_file: PathBuf,
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigOrigin {
    File(PathBuf),
    BuiltIn,
}

/// Something about the configuration worth telling the operator that does
/// not stop custos (loose file permissions). Returned, not logged, so the
/// caller decides where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigWarning {
    pub file: PathBuf,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    /// Every problem found in the file, one per line when displayed.
    #[error("{}", render(errors))]
    Invalid {
        path: PathBuf,
        errors: Vec<PolicyError>,
    },
    #[error("cannot determine the current directory: {0}")]
    CurrentDir(#[source] std::io::Error),
    /// The file (or a directory above it) could be changed by another local
    /// user: refused, as ssh's StrictModes refuses (`insecure_permissions`).
    #[error("{message}")]
    Insecure { path: PathBuf, message: String },
}

fn render(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The located problems (one, without a position, for a file that cannot be read).
    pub fn errors(&self) -> Vec<PolicyError> {
        match self {
            ConfigError::Read { path, message } => vec![PolicyError::file(path, message)],
            ConfigError::Invalid { errors, .. } => errors.clone(),
            ConfigError::CurrentDir(e) => vec![PolicyError::file(".", e.to_string())],
            ConfigError::Insecure { path, message } => vec![PolicyError::file(path, message)],
        }
    }
}

impl From<ConfigError> for crate::Error {
    fn from(e: ConfigError) -> Self {
        if let ConfigError::Insecure { path, message } = e {
            return crate::Error::InsecurePermissions { path, message };
        }
        let path = match &e {
            ConfigError::Read { path, .. } | ConfigError::Invalid { path, .. } => path.clone(),
            ConfigError::CurrentDir(_) | ConfigError::Insecure { .. } => PathBuf::from("."),
        };
        let message = match &e {
            ConfigError::Read { message, .. } => message.clone(),
            other => other.to_string(),
        };
        crate::Error::Config { path, message }
    }
}

/// The daemon's and CLI's configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub store: StoreLocation,
    pub state_dir: PathBuf,
    pub policies_dir: PathBuf,
    pub local_keys_dir: PathBuf,
    pub aws: AwsSettings,
    /// `[pkcs11]`: the PKCS#11 module and its PIN source; `None` when absent.
    pub pkcs11: Option<crate::keys::pkcs11::Pkcs11Settings>,
    /// `[kmip]`: the KMIP key manager, when one is configured.
    pub kmip: Option<crate::keys::kmip::KmipSettings>,
    pub daemon: DaemonSettings,
    pub audit: AuditSettings,
    /// Where tenants' keys and backups may be (`[residency]`).
    pub residency: Residency,
    /// The compliance report's thresholds (`[controls]`).
    pub controls: super::report::Controls,
    /// When and where the daemon writes the compliance report (`[report]`).
    pub report: super::report::ReportSettings,
    pub origin: ConfigOrigin,
    /// Problems that do not stop custos, such as loose permissions on the file.
    #[serde(skip)]
    pub warnings: Vec<ConfigWarning>,
}

const TOP_KEYS: &[&str] = &[
    "store",
    "state_dir",
    "policies_dir",
    "local_keys",
    "aws",
    "pkcs11",
    "kmip",
    "daemon",
    "audit",
    "residency",
    "controls",
    "report",
];
const PKCS11_KEYS: &[&str] = &[
    "module",
    "pin_file",
    "pin_env",
    "pin_credential",
    "max_sessions",
    "timeout",
    "network",
];
const KMIP_KEYS: &[&str] = &[
    "server",
    "server_name",
    "ca_file",
    "client_cert_file",
    "client_key_file",
    "connect_timeout",
    "operation_timeout",
    "max_connections",
];
const AWS_KEYS: &[&str] = &[
    "region",
    "endpoint_url",
    "kms_endpoint_url",
    "s3_endpoint_url",
    "allow_http",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "profile",
];
const DAEMON_KEYS: &[&str] = &[
    "max_concurrent_jobs",
    "jitter",
    "shutdown_timeout",
    "lease_ttl",
    "reader_wait",
    "metrics_listen",
];

impl Config {
    /// The embedded setup under `base_dir`: store `custos-data/store`, local
    /// keys `custos-data/keys`, state `custos-data/state`, policies `policies`.
    pub fn builtin(base_dir: &Path) -> Config {
        let base = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        let data = base.join("custos-data");
        let state_dir = data.join("state");
        Config {
            store: StoreLocation::Local(data.join("store")),
            local_keys_dir: data.join("keys"),
            audit: AuditSettings {
                key_file: state_dir.join("audit.key"),
            },
            report: super::report::ReportSettings::defaults(&state_dir),
            controls: super::report::Controls::default(),
            state_dir,
            policies_dir: base.join("policies"),
            aws: AwsSettings::default(),
            pkcs11: None,
            kmip: None,
            daemon: DaemonSettings::default(),
            residency: Residency::default(),
            origin: ConfigOrigin::BuiltIn,
            warnings: Vec::new(),
        }
    }

    /// Where the configuration sends key operations beyond what a key
    /// reference says, for [`Residency::check_key`].
    pub fn placement(&self) -> Placement {
        let env_region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
        let env_endpoint = ["AWS_ENDPOINT_URL_KMS", "AWS_ENDPOINT_URL"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()));
        let kms_region = self.aws.region.clone().or(env_region);
        // As the AWS KMS provider resolves it (keys::aws_kms).
        let kms_endpoint = self
            .aws
            .kms_endpoint()
            .map(str::to_owned)
            .or(env_endpoint)
            .or_else(|| {
                kms_region
                    .as_ref()
                    .map(|r| format!("https://kms.{r}.amazonaws.com"))
            });
        Placement {
            kms_region,
            kms_endpoint,
            kmip_server: self.kmip.as_ref().map(|k| k.server.clone()),
        }
    }

    /// `[residency]` with the facts it is checked against.
    pub fn residency_rules(&self) -> super::residency::Rules {
        super::residency::Rules {
            residency: self.residency.clone(),
            placement: self.placement(),
        }
    }

    /// Finds the configuration from the process's arguments and environment.
    pub fn discover(cli: Option<&Path>) -> Result<Config, ConfigError> {
        let cwd = std::env::current_dir().map_err(ConfigError::CurrentDir)?;
        let env = std::env::var_os(CONFIG_ENV);
        Config::discover_from(cli, env.as_deref(), &cwd)
    }

    /// [`Config::discover`] with the environment made explicit (for tests):
    /// `cli`, else `env` (the value of `$CUSTOS_CONFIG`, ignored when empty),
    /// else `cwd/custos.toml` if it exists, else the built-in setup in `cwd`.
    /// A file named by `cli` or `env` must exist.
    pub fn discover_from(
        cli: Option<&Path>,
        env: Option<&OsStr>,
        cwd: &Path,
    ) -> Result<Config, ConfigError> {
        if let Some(path) = cli {
            return Config::load(&cwd.join(path));
        }
        if let Some(path) = env.filter(|v| !v.is_empty()) {
            return Config::load(&cwd.join(path));
        }
        let local = cwd.join(CONFIG_FILE_NAME);
        if local.is_file() {
            return Config::load(&local);
        }
        Ok(Config::builtin(cwd))
    }

    /// Loads a configuration file. Every problem is reported, each with its line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let source = SourceText::read(&path).map_err(|e| ConfigError::Read {
            path: path.clone(),
            message: e.message.clone(),
        })?;
        // It says where the keys, state and store are: whoever can edit it
        // can redirect them.
        crate::secure_fs::check_file(&path, "configuration file").map_err(|e| match e {
            crate::secure_fs::CheckError::Insecure(i) => ConfigError::Insecure {
                path: i.path,
                message: i.message,
            },
            crate::secure_fs::CheckError::Io(p, e) => ConfigError::Read {
                path: p,
                message: format!("cannot read: {e}"),
            },
        })?;
        let mut config = Config::parse(source)?;
        config.warnings = permission_warnings(
            &path,
            config.aws.secret_access_key.is_some() || config.aws.session_token.is_some(),
        );
        Ok(config)
    }

    fn parse(source: SourceText) -> Result<Config, ConfigError> {
        let path = source.path.clone();
        let base = base_dir_of(&path);
        let files = [source];
        let (doc, syntax) = DeTable::parse_recoverable(&files[0].text);
        if !syntax.is_empty() {
            let errors = syntax
                .iter()
                .map(|e| files[0].error_at(e.span().map(|s| s.start), e.message().to_owned()))
                .collect();
            return Err(ConfigError::Invalid { path, errors });
        }
        let mut d = Diags::new(&files);
        let root = Table::root(vec![(0, doc.get_ref())]);
        root.check_keys(&mut d, TOP_KEYS);

        let mut config = Config::builtin(&base);
        config.origin = ConfigOrigin::File(path.clone());
        if let Some(item) = root.get("store")
            && let Some(text) = d.str(&item)
        {
            match StoreLocation::parse(text, &base) {
                Ok(store) => config.store = store,
                Err(e) => d.err(&item, e),
            }
        }
        let dir = |d: &mut Diags<'_>, item: Option<Item<'_>>, target: &mut PathBuf| {
            if let Some(item) = item
                && let Some(text) = d.str(&item)
            {
                match check_path_text(text) {
                    Ok(()) => *target = resolve(&base, text),
                    Err(e) => d.err(&item, e),
                }
            }
        };
        dir(&mut d, root.get("state_dir"), &mut config.state_dir);
        dir(&mut d, root.get("policies_dir"), &mut config.policies_dir);
        let local_keys = root.section(&mut d, "local_keys");
        local_keys.check_keys(&mut d, &["dir"]);
        dir(&mut d, local_keys.get("dir"), &mut config.local_keys_dir);
        let audit = root.section(&mut d, "audit");
        audit.check_keys(&mut d, &["key_file"]);
        config.audit.key_file = config.state_dir.join("audit.key");
        dir(&mut d, audit.get("key_file"), &mut config.audit.key_file);

        let aws = root.section(&mut d, "aws");
        config.aws = parse_aws(&mut d, &aws);
        if root.get("pkcs11").is_some() {
            let pkcs11 = root.section(&mut d, "pkcs11");
            config.pkcs11 = parse_pkcs11(&mut d, &pkcs11, &base);
        }
        if root.get("kmip").is_some() {
            let kmip = root.section(&mut d, "kmip");
            config.kmip = parse_kmip(&mut d, &kmip, &base);
        }
        let daemon = root.section(&mut d, "daemon");
        config.daemon = parse_daemon(&mut d, &daemon);
        let residency = root.section(&mut d, "residency");
        config.residency = parse_residency(&mut d, &residency, &base);
        let controls = root.section(&mut d, "controls");
        config.controls = super::report::parse_controls(&mut d, &controls);
        let report = root.section(&mut d, "report");
        config.report = super::report::parse_report(&mut d, &report, &base, &config.state_dir);
        config.residency.file = Some(path.clone());
        // The store is the configuration's own: one outside the rules is an
        // error of this file, pointed at the store line.
        if let Err(e) = config
            .residency
            .check_store(&config.store, config.aws.s3_endpoint())
        {
            match root.get("store").or_else(|| residency.get(e.rule)) {
                Some(item) => d.err(&item, e),
                None => d.error(0, None, e.to_string()),
            }
        }

        if d.errors.is_empty() {
            Ok(config)
        } else {
            let mut errors = d.errors;
            errors.sort();
            Err(ConfigError::Invalid { path, errors })
        }
    }
}

/// `[kmip]`: `server`, the three PEM files (relative to the file) and
/// optional timeouts. `None` when a required key is missing (reported).
fn parse_kmip(
    d: &mut Diags<'_>,
    t: &Table<'_>,
    base: &Path,
) -> Option<crate::keys::kmip::KmipSettings> {
    use crate::keys::kmip::KmipSettings;
    t.check_keys(d, KMIP_KEYS);
    let text = |d: &mut Diags<'_>, key: &str, what: &str| -> Option<String> {
        match t.get(key) {
            Some(item) => d.str(&item).map(str::to_owned),
            None => {
                d.missing(t, key, what);
                None
            }
        }
    };
    let server = text(
        d,
        "server",
        "the key manager as host:port, e.g. \"kmip.hospital.internal:5696\"",
    );
    let file = |d: &mut Diags<'_>, key: &str, what: &str| -> Option<PathBuf> {
        let item = match t.get(key) {
            Some(item) => item,
            None => {
                d.missing(t, key, what);
                return None;
            }
        };
        let text = d.str(&item)?;
        match check_path_text(text) {
            Ok(()) => Some(resolve(base, text)),
            Err(e) => {
                d.err(&item, e);
                None
            }
        }
    };
    let ca = file(
        d,
        "ca_file",
        "the PEM file of the CA that signs the server's certificate",
    );
    let cert = file(d, "client_cert_file", "custos's client certificate (PEM)");
    let key = file(
        d,
        "client_key_file",
        "the client certificate's private key (PEM, mode 0600)",
    );
    let mut s = KmipSettings::new(
        server.as_deref().unwrap_or_default(),
        &ca.clone().unwrap_or_default(),
        &cert.clone().unwrap_or_default(),
        &key.clone().unwrap_or_default(),
    );
    if let Some(server) = &server
        && let Some(item) = t.get("server")
        && server
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        d.err(
            &item,
            format!("{:?} is not host:port", truncate(server, 80)),
        );
    }
    if let Some(item) = t.get("server_name") {
        s.server_name = d.str(&item).map(str::to_owned);
    }
    for (key, slot, max) in [
        (
            "connect_timeout",
            &mut s.connect_timeout,
            Duration::from_secs(300),
        ),
        (
            "operation_timeout",
            &mut s.operation_timeout,
            Duration::from_secs(3_600),
        ),
    ] {
        let Some(item) = t.get(key) else { continue };
        let Some(v) = d.duration(&item) else { continue };
        if v < Duration::from_millis(100) || v > max {
            d.err(
                &item,
                format!(
                    "must be from 100ms to {}",
                    super::units::format_duration(max)
                ),
            );
        } else {
            *slot = v;
        }
    }
    if let Some(item) = t.get("max_connections")
        && let Some(n) = d.int_in(&item, 1, 64)
    {
        s.max_connections = n as usize;
    }
    (server.is_some() && ca.is_some() && cert.is_some() && key.is_some()).then_some(s)
}

fn parse_residency(d: &mut Diags<'_>, t: &Table<'_>, base: &Path) -> Residency {
    t.check_keys(d, residency::KEYS);
    let mut r = Residency::default();
    let strings = |d: &mut Diags<'_>, key: &str| -> Option<Vec<(Item<'_>, String)>> {
        let item = t.get(key)?;
        let items = d.str_array(&item)?;
        Some(items.into_iter().map(|(i, s)| (i, s.to_owned())).collect())
    };
    if let Some(items) = strings(d, "key_providers") {
        let mut kinds = Vec::new();
        for (item, s) in items {
            match ProviderKind::from_scheme(&s) {
                Some(k) => kinds.push(k),
                None => d.err(
                    &item,
                    format!(
                        "unknown key provider {:?} (known: {})",
                        truncate(&s, 40),
                        ProviderKind::ALL
                            .map(|k| format!("{:?}", k.scheme()))
                            .join(", ")
                    ),
                ),
            }
        }
        r.key_providers = Some(kinds);
    }
    let plain = |items: Vec<(Item<'_>, String)>| items.into_iter().map(|(_, s)| s).collect();
    r.pkcs11_tokens = strings(d, "pkcs11_tokens").map(plain);
    r.kmip_servers = strings(d, "kmip_servers").map(plain);
    r.kms_regions = strings(d, "kms_regions").map(plain);
    r.s3_endpoints = strings(d, "s3_endpoints").map(plain);
    if let Some(items) = strings(d, "kms_endpoints") {
        let mut endpoints = Vec::new();
        for (item, s) in items {
            match validate_endpoint(&s) {
                Ok(()) => endpoints.push(s),
                Err(e) => d.err(&item, e),
            }
        }
        r.kms_endpoints = Some(endpoints);
    }
    if let Some(items) = strings(d, "stores") {
        let mut stores = Vec::new();
        for (item, s) in items {
            match StoreLocation::parse(&s, base) {
                Ok(l) => stores.push(l),
                Err(e) => d.err(&item, e),
            }
        }
        r.stores = Some(stores);
    }
    r
}

fn parse_aws(d: &mut Diags<'_>, t: &Table<'_>) -> AwsSettings {
    t.check_keys(d, AWS_KEYS);
    let mut aws = AwsSettings::default();
    if let Some(item) = t.get("allow_http") {
        aws.allow_http = d.bool(&item).unwrap_or(false);
    }
    let text = |d: &mut Diags<'_>, key: &str, check: &dyn Fn(&str) -> Result<(), String>| {
        let item = t.get(key)?;
        let value = d.str(&item)?;
        match check(value) {
            Ok(()) => Some((item, value.to_owned())),
            Err(e) => {
                d.err(&item, e);
                None
            }
        }
    };
    aws.region = text(d, "region", &|v| {
        let ok = !v.is_empty()
            && v.len() <= 64
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(())
        } else {
            Err(format!(
                "invalid region {:?}: expected e.g. \"us-east-1\"",
                truncate(v, 40)
            ))
        }
    })
    .map(|(_, v)| v);
    for (key, slot) in [
        ("endpoint_url", &mut aws.endpoint_url),
        ("kms_endpoint_url", &mut aws.kms_endpoint_url),
        ("s3_endpoint_url", &mut aws.s3_endpoint_url),
    ] {
        if let Some((item, url)) = text(d, key, &validate_endpoint) {
            if url.starts_with("http://") && !aws.allow_http {
                d.err(&item, "uses plain http://; set allow_http = true in [aws] to permit it (local emulators only)");
            } else {
                *slot = Some(url);
            }
        }
    }
    let token = |what: &'static str, max: usize| {
        move |v: &str| {
            if v.is_empty()
                || v.len() > max
                || v.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                Err(format!(
                    "expected {what} (1 to {max} characters, no spaces)"
                ))
            } else {
                Ok(())
            }
        }
    };
    let access = text(d, "access_key_id", &token("an access key id", 128));
    let secret = text(d, "secret_access_key", &token("a secret access key", 256));
    let session = text(d, "session_token", &token("a session token", 4096));
    let profile = text(d, "profile", &token("a profile name", 128));
    if let Some((item, _)) = &access
        && t.get("secret_access_key").is_none()
    {
        d.err(
            item,
            "is set without secret_access_key; set both or neither",
        );
    }
    if let Some((item, _)) = &secret
        && t.get("access_key_id").is_none()
    {
        d.err(item, "is set without access_key_id; set both or neither");
    }
    if let (Some((item, _)), Some(_)) = (&profile, &access) {
        d.err(
            item,
            "cannot be combined with static keys (access_key_id); choose one",
        );
    }
    if let (Some((item, _)), None) = (&session, t.get("access_key_id")) {
        d.err(item, "needs access_key_id and secret_access_key");
    }
    aws.access_key_id = access.map(|(_, v)| v);
    aws.secret_access_key = secret.map(|(_, v)| SecretString::new(&v));
    aws.session_token = session.map(|(_, v)| SecretString::new(&v));
    aws.profile = profile.map(|(_, v)| v);
    aws
}

/// `[pkcs11]`: `module` (required), exactly one PIN source, and the pool's
/// bounds. The PIN itself is read when the provider opens, never here, so
/// it is in no `Config` (which is printed and serialised).
fn parse_pkcs11(
    d: &mut Diags<'_>,
    t: &Table<'_>,
    base: &Path,
) -> Option<crate::keys::pkcs11::Pkcs11Settings> {
    use crate::keys::pkcs11::{PinSource, Pkcs11Settings};
    t.check_keys(d, PKCS11_KEYS);
    let path = |d: &mut Diags<'_>, key: &str| {
        let item = t.get(key)?;
        let text = d.str(&item)?;
        match check_path_text(text) {
            Ok(()) => Some(resolve(base, text)),
            Err(e) => {
                d.err(&item, e);
                None
            }
        }
    };
    let module = path(d, "module");
    if t.get("module").is_none() {
        d.missing(
            t,
            "module",
            "the PKCS#11 module (shared library) of the HSM, e.g. \"/usr/lib/softhsm/libsofthsm2.so\"",
        );
    }
    // Environment variable and credential names: what a shell or systemd's
    // LoadCredential= accepts, so a typo is caught here, not at first use.
    let name = |d: &mut Diags<'_>, key: &str, credential: bool| {
        let item = t.get(key)?;
        let text = d.str(&item)?;
        let ok = !text.is_empty()
            && text.len() <= 255
            && if credential {
                text != "."
                    && text != ".."
                    && !text.contains('/')
                    && !text.chars().any(char::is_control)
            } else {
                !text.starts_with(|c: char| c.is_ascii_digit())
                    && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            };
        if ok {
            Some(text.to_owned())
        } else if credential {
            d.err(
                &item,
                "expected a systemd credential name (no '/', as in LoadCredential=NAME:…)",
            );
            None
        } else {
            d.err(
                &item,
                "expected an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            );
            None
        }
    };
    let sources: Vec<(Item<'_>, Option<PinSource>)> = [
        ("pin_file", path(d, "pin_file").map(PinSource::File)),
        ("pin_env", name(d, "pin_env", false).map(PinSource::Env)),
        (
            "pin_credential",
            name(d, "pin_credential", true).map(PinSource::Credential),
        ),
    ]
    .into_iter()
    .filter_map(|(key, v)| t.get(key).map(|item| (item, v)))
    .collect();
    if sources.is_empty() {
        d.missing(
            t,
            "pin_file",
            "one PIN source: pin_file, pin_env or pin_credential (the PIN never goes in custos.toml)",
        );
    }
    for (item, _) in sources.iter().skip(1) {
        d.err(
            item,
            "a second PIN source: set one of pin_file, pin_env and pin_credential",
        );
    }
    let mut settings = Pkcs11Settings {
        module: module?,
        pin: sources.into_iter().next()?.1?,
        max_sessions: Pkcs11Settings::DEFAULT_MAX_SESSIONS,
        timeout: Pkcs11Settings::DEFAULT_TIMEOUT,
        network: false,
    };
    if let Some(item) = t.get("max_sessions")
        && let Some(n) = d.int_in(&item, 1, 256)
    {
        settings.max_sessions = n as usize;
    }
    if let Some(item) = t.get("timeout")
        && let Some(v) = d.duration(&item)
    {
        if v < Duration::from_secs(1) || v > Duration::from_secs(600) {
            d.err(&item, "must be from 1s to 10m");
        } else {
            settings.timeout = v;
        }
    }
    if let Some(item) = t.get("network") {
        settings.network = d.bool(&item).unwrap_or(false);
    }
    Some(settings)
}

/// An `http://` or `https://` URL with a host and no whitespace.
fn validate_endpoint(url: &str) -> Result<(), String> {
    let shown = truncate(url, 80);
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return Err(format!(
            "invalid endpoint {shown:?}: expected an http:// or https:// URL"
        ));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(format!("invalid endpoint {shown:?}: no host"));
    }
    if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid endpoint {shown:?}: no spaces or control characters, at most 2048 bytes"
        ));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("invalid endpoint {shown:?}: bad port {port:?}"));
    }
    Ok(())
}

fn parse_daemon(d: &mut Diags<'_>, t: &Table<'_>) -> DaemonSettings {
    t.check_keys(d, DAEMON_KEYS);
    let mut s = DaemonSettings::default();
    if let Some(item) = t.get("max_concurrent_jobs")
        && let Some(n) = d.int_in(&item, 1, 256)
    {
        s.max_concurrent_jobs = n as usize;
    }
    let bounded =
        |d: &mut Diags<'_>, key: &str, min: Duration, max: Duration, slot: &mut Duration| {
            let Some(item) = t.get(key) else { return };
            let Some(v) = d.duration(&item) else { return };
            if v < min || v > max {
                d.err(
                    &item,
                    format!(
                        "must be from {} to {}",
                        super::units::format_duration(min),
                        super::units::format_duration(max)
                    ),
                );
            } else {
                *slot = v;
            }
        };
    const DAY: Duration = Duration::from_secs(86_400);
    bounded(d, "jitter", Duration::ZERO, DAY, &mut s.jitter);
    bounded(
        d,
        "shutdown_timeout",
        Duration::from_secs(1),
        DAY,
        &mut s.shutdown_timeout,
    );
    bounded(
        d,
        "lease_ttl",
        // As low as 1s so crash tests (tests/it/crash_loop.rs) need not wait long for a
        // killed holder's lease to run out; production setups keep minutes.
        Duration::from_secs(1),
        Duration::from_secs(3_600),
        &mut s.lease_ttl,
    );
    bounded(d, "reader_wait", Duration::ZERO, DAY, &mut s.reader_wait);
    if let Some(item) = t.get("metrics_listen")
        && let Some(text) = d.str(&item)
    {
        match text.parse::<SocketAddr>() {
            Ok(addr) => s.metrics_listen = Some(addr),
            Err(_) => d.err(
                &item,
                format!("invalid address {:?}: expected <ip>:<port>, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\"", truncate(text, 80)),
            ),
        }
    }
    s
}

/// Warnings for a configuration file others can read while it holds secrets
/// (one others can write is refused: see [`Config::load`]).
fn permission_warnings(path: &Path, holds_secret: bool) -> Vec<ConfigWarning> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let mode = meta.permissions().mode() & 0o777;
    let mut out = Vec::new();
    if holds_secret && mode & 0o044 != 0 {
        out.push(ConfigWarning {
            file: path.to_path_buf(),
            message: format!(
                "holds AWS credentials and is readable by group or others (mode {mode:04o}); run chmod 600, or better, \
                 use the AWS environment, a profile or an instance role instead of keys in a file"
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn errors_of(text: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "custos.toml", text);
        let err = Config::load(&p).unwrap_err();
        err.errors()
            .iter()
            .map(|e| {
                format!(
                    "{}:{}: {}",
                    e.line.unwrap_or(0),
                    e.column.unwrap_or(0),
                    e.message
                )
            })
            .collect()
    }

    #[test]
    fn parses_store_locations() {
        let base = Path::new("/etc/custos");
        let parse = |s| StoreLocation::parse(s, base);
        assert_eq!(
            parse("file:///var/lib/custos/store"),
            Ok(StoreLocation::Local("/var/lib/custos/store".into()))
        );
        assert_eq!(
            parse("/srv/store/"),
            Ok(StoreLocation::Local("/srv/store".into()))
        );
        assert_eq!(
            parse("data/store"),
            Ok(StoreLocation::Local("/etc/custos/data/store".into()))
        );
        assert_eq!(
            parse("../store"),
            Ok(StoreLocation::Local("/etc/store".into()))
        );
        assert_eq!(
            parse("s3://backups/custos/prod/"),
            Ok(StoreLocation::S3 {
                bucket: "backups".into(),
                prefix: "custos/prod".into()
            })
        );
        assert_eq!(
            parse("s3://backups"),
            Ok(StoreLocation::S3 {
                bucket: "backups".into(),
                prefix: String::new()
            })
        );
        assert_eq!(parse("memory://"), Ok(StoreLocation::Memory));
        assert_eq!(
            parse("s3://backups/custos").unwrap().url(),
            "s3://backups/custos"
        );
        assert_eq!(
            parse("/srv/store").unwrap().to_string(),
            "file:///srv/store"
        );

        let err = parse("file://relative/store").unwrap_err();
        assert!(
            err.contains("a file:// URL must be absolute (file:///path/to/store)"),
            "{err}"
        );
        assert!(
            parse("gs://bucket")
                .unwrap_err()
                .starts_with("unknown store scheme \"gs\"")
        );
        assert!(parse("memory://x").unwrap_err().contains("takes no path"));
        assert!(
            parse("s3://backups/a//b")
                .unwrap_err()
                .contains("empty segment")
        );
        assert!(parse("s3://backups/a/../b").unwrap_err().contains("'..'"));
        assert!(parse("").is_err());
    }

    #[test]
    fn refuses_bad_bucket_names() {
        for (bad, why) in [
            ("s3://", "it is empty"),
            ("s3:///prefix", "it is empty"),
            ("s3://ab", "3 to 63"),
            (&format!("s3://{}", "a".repeat(64)), "3 to 63"),
            ("s3://My_Bucket", "only lowercase"),
            ("s3://-bucket", "start and end"),
            ("s3://bucket.", "start and end"),
            ("s3://my..bucket", "adjacent periods"),
            ("s3://192.168.1.1", "IP address"),
            ("s3://xn--bucket", "reserves"),
            ("s3://bucket-s3alias", "reserves"),
        ] {
            let err = parse_s3_url(bad).unwrap_err();
            assert!(
                err.starts_with("invalid S3 bucket name") && err.contains(why),
                "{bad}: {err}"
            );
        }
        for ok in ["s3://my-bucket.example", "s3://abc", "s3://0backups9"] {
            assert!(parse_s3_url(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn builtin_defaults() {
        let c = Config::builtin(Path::new("/opt/custos"));
        assert_eq!(
            c.store,
            StoreLocation::Local("/opt/custos/custos-data/store".into())
        );
        assert_eq!(c.local_keys_dir, Path::new("/opt/custos/custos-data/keys"));
        assert_eq!(c.state_dir, Path::new("/opt/custos/custos-data/state"));
        assert_eq!(c.policies_dir, Path::new("/opt/custos/policies"));
        assert_eq!(
            c.audit.key_file,
            Path::new("/opt/custos/custos-data/state/audit.key")
        );
        assert_eq!(c.origin, ConfigOrigin::BuiltIn);
        assert_eq!(c.daemon, DaemonSettings::default());
        assert_eq!(c.aws, AwsSettings::default());
        assert!(
            Config::builtin(Path::new("rel"))
                .store
                .url()
                .starts_with("file:///")
        );
    }

    #[test]
    fn loads_a_full_file_relative_to_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let p = write(
            &root,
            "etc/custos.toml",
            r#"
store = "s3://backups/custos"
state_dir = "state"
policies_dir = "../policies"
[local_keys]
dir = "/var/lib/custos/keys"
[aws]
region = "eu-central-1"
endpoint_url = "http://127.0.0.1:4566"
s3_endpoint_url = "https://minio.example:9000"
allow_http = true
profile = "backup"
[daemon]
max_concurrent_jobs = 4
jitter = "5m"
shutdown_timeout = "1h 30m"
lease_ttl = "2m"
metrics_listen = "127.0.0.1:9464"
"#,
        );
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.store,
            StoreLocation::S3 {
                bucket: "backups".into(),
                prefix: "custos".into()
            }
        );
        assert_eq!(c.state_dir, root.join("etc/state"));
        assert_eq!(c.policies_dir, root.join("policies"));
        assert_eq!(c.local_keys_dir, Path::new("/var/lib/custos/keys"));
        assert_eq!(c.audit.key_file, root.join("etc/state/audit.key"));
        assert_eq!(c.aws.kms_endpoint(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.aws.s3_endpoint(), Some("https://minio.example:9000"));
        assert_eq!(c.aws.region.as_deref(), Some("eu-central-1"));
        assert_eq!(c.aws.profile.as_deref(), Some("backup"));
        assert_eq!(c.daemon.max_concurrent_jobs, 4);
        assert_eq!(c.daemon.shutdown_timeout, Duration::from_secs(5_400));
        assert_eq!(
            c.daemon.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(c.origin, ConfigOrigin::File(root.join("etc/custos.toml")));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["store"], "s3://backups/custos");
        assert_eq!(json["daemon"]["shutdown_timeout"], "1h 30m");
    }

    #[test]
    fn absent_keys_default_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let p = write(
            &root,
            "custos.toml",
            "[audit]\nkey_file = \"keys/audit.key\"\n",
        );
        let c = Config::load(&p).unwrap();
        let builtin = Config::builtin(&root);
        assert_eq!((c.store, c.state_dir), (builtin.store, builtin.state_dir));
        assert_eq!(c.audit.key_file, root.join("keys/audit.key"));
    }

    #[test]
    fn controls_and_report_sections() {
        use crate::config::{Controls, ReportFormat};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let p = write(
            &root,
            "custos.toml",
            "state_dir = \"st\"\n[controls]\nbackup_max_gap = \"2d\"\nbackup_min_success_rate = 1\ndrill_rto_met = false\n[report]\nschedule = \"0 6 * * 1\"\nformats = [\"md\"]\n",
        );
        let c = Config::load(&p).unwrap();
        assert_eq!(c.controls.backup_max_gap, Duration::from_secs(2 * 86_400));
        assert_eq!(c.controls.backup_min_success_rate, 1.0);
        assert!(!c.controls.drill_rto_met);
        assert_eq!(c.controls.cmk_max_age, Controls::default().cmk_max_age);
        assert_eq!(c.report.schedule.as_ref().unwrap().as_str(), "0 6 * * 1");
        assert_eq!(c.report.formats, [ReportFormat::Md]);
        assert_eq!(c.report.output_dir, root.join("st/compliance"));
        assert_eq!(c.report.since, Duration::from_secs(90 * 86_400));
        let builtin = Config::builtin(&root);
        assert_eq!(
            (builtin.controls, builtin.report.schedule),
            (Controls::default(), None)
        );

        let errs = errors_of(
            "[controls]\nbackup_max_gap = \"26\"\ncmk_max_age = \"30s\"\nbackup_min_success_rate = 1.5\ndrill_rto_met = \"yes\"\nrto = \"1h\"\n[report]\nformats = [\"html\", \"pdf\", \"html\"]\nsince = \"1h\"\nschedule = \"daily\"\n",
        );
        let all = errs.join("\n");
        for want in [
            "controls.backup_max_gap: invalid duration \"26\"",
            "controls.cmk_max_age: must be at least 1m",
            "controls.backup_min_success_rate: must be from 0 to 1",
            "controls.drill_rto_met: expected true or false",
            "controls.rto: unknown key",
            "report.formats[1]: unknown format \"pdf\"",
            "report.formats[2]: \"html\" is listed twice",
            "report.since: must be from 1d to 3653d",
            "report.schedule:",
        ] {
            assert!(all.contains(want), "{want} not in {all}");
        }
    }

    #[test]
    fn kmip_section() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let p = write(
            &root,
            "custos.toml",
            "[kmip]\nserver = \"kmip.example:5696\"\nca_file = \"kmip/ca.crt\"\nclient_cert_file = \"/etc/c.crt\"\nclient_key_file = \"kmip/c.key\"\noperation_timeout = \"10s\"\nmax_connections = 2\n",
        );
        let c = Config::load(&p).unwrap();
        let k = c.kmip.expect("[kmip] parsed");
        assert_eq!(k.server, "kmip.example:5696");
        assert_eq!(k.ca_file, root.join("kmip/ca.crt"));
        assert_eq!(k.client_cert_file, Path::new("/etc/c.crt"));
        assert_eq!(k.client_key_file, root.join("kmip/c.key"));
        assert_eq!(k.operation_timeout, Duration::from_secs(10));
        assert_eq!(
            k.connect_timeout,
            crate::keys::kmip::DEFAULT_CONNECT_TIMEOUT
        );
        assert_eq!(k.max_connections, 2);
        assert!(Config::builtin(&root).kmip.is_none());

        let errs = errors_of(
            "[kmip]\nserver = \"no-port\"\nca_file = \"ca\"\nconnect_timeout = \"1ms\"\nbogus = 1\n",
        );
        let all = errs.join("\n");
        for want in [
            "kmip.server: \"no-port\" is not host:port",
            "kmip.client_cert_file: missing",
            "kmip.client_key_file: missing",
            "kmip.connect_timeout: must be from 100ms",
            "kmip.bogus: unknown key",
        ] {
            assert!(all.contains(want), "{want} not in {all}");
        }
    }

    #[test]
    fn reports_every_error_with_its_line() {
        let errs = errors_of(
            "store = \"file://rel\"\nbogus = 1\n[daemon]\nlease_ttl = \"500ms\"\njitter = \"soon\"\nmetrics_listen = \"localhost:9464\"\nmax_concurrent_jobs = 0\nthreads = 3\n[aws]\nendpoint_url = \"http://127.0.0.1:4566\"\n",
        );
        assert_eq!(errs.len(), 8, "{errs:#?}");
        assert!(
            errs[0].starts_with("1:9: store: \"file://rel\": a file:// URL must be absolute"),
            "{}",
            errs[0]
        );
        assert_eq!(
            errs[1],
            "2:1: bogus: unknown key (expected one of: store, state_dir, policies_dir, local_keys, aws, pkcs11, kmip, daemon, audit, residency, controls, report)"
        );
        assert_eq!(errs[2], "4:13: daemon.lease_ttl: must be from 1s to 1h");
        assert!(
            errs[3].starts_with("5:10: daemon.jitter: invalid duration \"soon\""),
            "{}",
            errs[3]
        );
        assert!(
            errs[4].starts_with("6:18: daemon.metrics_listen: invalid address \"localhost:9464\""),
            "{}",
            errs[4]
        );
        assert_eq!(
            errs[5],
            "7:23: daemon.max_concurrent_jobs: must be from 1 to 256, found 0"
        );
        assert!(
            errs[6].starts_with("8:1: daemon.threads: unknown key"),
            "{}",
            errs[6]
        );
        assert!(
            errs[7].starts_with("10:16: aws.endpoint_url: uses plain http://"),
            "{}",
            errs[7]
        );
        let region = errors_of("[aws]\nregion = \"US East\"\n");
        assert_eq!(
            region,
            ["2:10: aws.region: invalid region \"US East\": expected e.g. \"us-east-1\""]
        );
    }

    #[test]
    fn syntax_errors_and_wrong_types() {
        let errs = errors_of("store = \n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("1:"), "{errs:?}");
        let errs = errors_of("store = 5\n[daemon]\njitter = 5\n[aws]\nallow_http = \"yes\"\n");
        assert_eq!(
            errs,
            [
                "1:9: store: expected a string, found an integer (5)",
                "3:10: daemon.jitter: expected a duration string such as \"15m\" or \"90d\", found an integer (5)",
                "5:14: aws.allow_http: expected true or false, found a string (\"yes\")",
            ]
        );
        let errs = errors_of("daemon = 3\n");
        assert_eq!(
            errs,
            ["1:10: daemon: expected a table, found an integer (3)"]
        );
    }

    #[test]
    fn credentials_rules() {
        let errs = errors_of("[aws]\naccess_key_id = \"AKIA1\"\n");
        assert_eq!(
            errs,
            ["2:17: aws.access_key_id: is set without secret_access_key; set both or neither"]
        );
        let errs = errors_of("[aws]\nsecret_access_key = \"s\"\n");
        assert_eq!(
            errs,
            ["2:21: aws.secret_access_key: is set without access_key_id; set both or neither"]
        );
        let errs =
            errors_of("[aws]\naccess_key_id = \"A\"\nsecret_access_key = \"s\"\nprofile = \"p\"\n");
        assert_eq!(
            errs,
            ["4:11: aws.profile: cannot be combined with static keys (access_key_id); choose one"]
        );
    }

    #[test]
    fn refuses_writable_and_warns_about_readable_files_never_printing_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "custos.toml",
            "[aws]\naccess_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"hunter2hunter2\"\n",
        );
        assert!(Config::load(&p).unwrap().warnings.is_empty());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].message.starts_with(
                "holds AWS credentials and is readable by group or others (mode 0644)"
            )
        );
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.aws.secret_access_key.as_ref().unwrap().expose(),
            "hunter2hunter2"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("hunter2"));

        // Without secrets, a world-readable file is fine; a world-writable one is not.
        let q = write(dir.path(), "plain.toml", "store = \"/srv\"\n");
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::load(&q).unwrap().warnings.is_empty());
        // One others can write is refused, secrets or not, naming the fix.
        for (file, mode) in [(&q, 0o646), (&q, 0o664), (&p, 0o666)] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Config::load(file).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("chmod go-w {}", file.display())),
                "{text}"
            );
            assert!(!text.contains("hunter2"), "{text}");
            assert_eq!(crate::Error::from(err).kind(), "insecure_permissions");
        }
        // So is one in a directory others can write.
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Config::load(&q).unwrap_err().to_string();
        assert!(
            err.contains(&format!("chmod go-w {}", dir.path().display())),
            "{err}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn discovery_order() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().canonicalize().unwrap();
        let cli = write(&cwd, "cli.toml", "store = \"/cli\"\n");
        let env = write(&cwd, "env.toml", "store = \"/env\"\n");
        let store = |c: Config| c.store;

        // Nothing: built-in defaults in cwd.
        let c = Config::discover_from(None, None, &cwd).unwrap();
        assert_eq!(c.origin, ConfigOrigin::BuiltIn);
        assert_eq!(c.store, StoreLocation::Local(cwd.join("custos-data/store")));
        // ./custos.toml beats built-in.
        write(&cwd, "custos.toml", "store = \"/local\"\n");
        assert_eq!(
            store(Config::discover_from(None, None, &cwd).unwrap()),
            StoreLocation::Local("/local".into())
        );
        // An empty $CUSTOS_CONFIG is ignored.
        assert_eq!(
            store(Config::discover_from(None, Some(OsStr::new("")), &cwd).unwrap()),
            StoreLocation::Local("/local".into())
        );
        // $CUSTOS_CONFIG (relative to cwd) beats ./custos.toml.
        assert_eq!(
            store(Config::discover_from(None, Some(OsStr::new("env.toml")), &cwd).unwrap()),
            StoreLocation::Local("/env".into())
        );
        // --config beats everything.
        let c = Config::discover_from(Some(&cli), Some(env.as_os_str()), &cwd).unwrap();
        assert_eq!(c.store, StoreLocation::Local("/cli".into()));
        assert_eq!(c.origin, ConfigOrigin::File(cli.clone()));
        // A named file must exist.
        let err = Config::discover_from(Some(Path::new("nope.toml")), None, &cwd).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().contains("nope.toml: cannot read: "),
            "{err}"
        );
        let err = Config::discover_from(None, Some(OsStr::new("gone.toml")), &cwd).unwrap_err();
        assert!(err.to_string().contains("gone.toml"), "{err}");
    }

    #[test]
    fn pkcs11_section() {
        use crate::keys::pkcs11::PinSource;
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "custos.toml",
            "[pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\npin_file = \"pkcs11.pin\"\nmax_sessions = 2\ntimeout = \"5s\"\nnetwork = true\n",
        );
        let c = Config::load(&path).unwrap();
        let p = c.pkcs11.as_ref().unwrap();
        assert_eq!(p.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        let base = base_dir_of(&path);
        assert_eq!(p.pin, PinSource::File(base.join("pkcs11.pin")));
        assert_eq!(
            (p.max_sessions, p.timeout, p.network),
            (2, Duration::from_secs(5), true)
        );
        assert!(Config::builtin(dir.path()).pkcs11.is_none());

        let errs = errors_of("[pkcs11]\npin_env = \"PIN\"\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("pkcs11.module: missing"), "{errs:?}");
        let errs = errors_of("[pkcs11]\nmodule = \"/m.so\"\n");
        assert!(
            errs[0].contains("pin_file, pin_env or pin_credential"),
            "{errs:?}"
        );
        let errs = errors_of(
            "[pkcs11]\nmodule = \"/m.so\"\npin_env = \"PIN\"\npin_credential = \"pin\"\n",
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("second PIN source"), "{errs:?}");
        for (bad, what) in [
            ("pin_env = \"1PIN\"", "environment variable"),
            ("pin_credential = \"a/b\"", "credential"),
            ("pin_env = \"P\"\nmax_sessions = 0", "max_sessions"),
            ("pin_env = \"P\"\ntimeout = \"1h\"", "1s to 10m"),
            ("pin_env = \"P\"\npin = \"1234\"", "unknown key"),
        ] {
            let errs = errors_of(&format!("[pkcs11]\nmodule = \"/m.so\"\n{bad}\n"));
            assert!(errs.iter().any(|e| e.contains(what)), "{bad}: {errs:?}");
            assert!(!errs.iter().any(|e| e.contains("1234")), "{errs:?}");
        }
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(validate_endpoint("https://kms.eu-central-1.amazonaws.com").is_ok());
        assert!(validate_endpoint("http://[::1]:4566").is_ok());
        assert!(validate_endpoint("http://localhost:4566/").is_ok());
        assert!(
            validate_endpoint("localhost:4566")
                .unwrap_err()
                .contains("http:// or https://")
        );
        assert!(
            validate_endpoint("https://")
                .unwrap_err()
                .contains("no host")
        );
        assert!(
            validate_endpoint("https://a b")
                .unwrap_err()
                .contains("no spaces")
        );
        assert!(
            validate_endpoint("https://host:port")
                .unwrap_err()
                .contains("bad port")
        );
    }
}
