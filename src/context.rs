//! What every job needs from its surroundings: the store, the key providers,
//! the state directory, and who is acting. Built once by the CLI or daemon.

use std::time::Duration;

use crate::keys::{KeyProviders, ProviderKind};
use crate::state::StateDir;
use crate::store::SharedStore;

#[derive(Clone)]
pub struct Context {
    pub store: SharedStore,
    /// The store as configured (`file:///…`, `s3://…`), for messages and reports.
    pub store_url: String,
    pub keys: KeyProviders,
    pub state: StateDir,
    /// Lease holder name of this process.
    pub holder: String,
    pub lease_ttl: Duration,
    /// How long a deleter (prune, forget, epoch shred) waits for readers that
    /// started before its deletion plan; then it defers (prune, forget) or
    /// fails retryably (epoch shred).
    pub reader_wait: Duration,
    /// The tamper-evident audit log every job writes to.
    pub audit: Option<crate::audit::AuditLog>,
    /// Who acts, as recorded in the audit log (`cli:<user>@<host>`, `daemon:<host>`).
    pub actor: String,
    /// S3 settings (`[aws]` / environment) for stores other than the main one:
    /// object-store sources and `restore --target-url`.
    pub s3: crate::store::s3::S3Options,
    /// The tenant policies directory, read by the key-ownership checks (which
    /// key each tenant's policy names); `None` outside a configuration.
    pub policies_dir: Option<std::path::PathBuf>,
    /// `[residency]`: a key outside it is never bound to a tenant.
    pub residency: crate::config::ResidencyRules,
    /// What the key-ownership survey read, reused while unchanged (shared by
    /// the jobs of one process: the daemon's many tenant inits).
    pub survey_cache: std::sync::Arc<crate::repo::survey_cache::SurveyCache>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("store", &self.store_url)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// What the store probe needs of a context: the store layer knows nothing
/// above it, so the context hands it down.
impl<'a> From<&'a Context> for crate::store::probe::ProbeTarget<'a> {
    fn from(ctx: &'a Context) -> Self {
        crate::store::probe::ProbeTarget {
            store: &ctx.store,
            url: &ctx.store_url,
            state_dir: ctx.state.root(),
        }
    }
}

impl Context {
    /// The embedded setup under one directory: `store/` (local object store),
    /// `keys/` (local key provider) and `state/`.
    pub fn embedded(root: &std::path::Path) -> crate::Result<Context> {
        let store = crate::store::local::open(&root.join("store"))?;
        Context::with_store(
            store,
            format!("file://{}", root.join("store").display()),
            root,
        )
    }

    /// A context over any store, with local keys and state under `root`.
    pub fn with_store(
        store: SharedStore,
        store_url: String,
        root: &std::path::Path,
    ) -> crate::Result<Context> {
        let local = crate::keys::local::LocalKeyProvider::new(root.join("keys"))?;
        Ok(Context {
            audit: Some(crate::audit::AuditLog::open_with(
                &root.join("state/audit"),
                crate::audit::AuditKey::load_or_create(&root.join("state/audit.key"))?,
                Some(store.clone()),
                store_url.strip_prefix("file://").map(std::path::Path::new),
            )?),
            store,
            store_url,
            keys: KeyProviders {
                local: Some(std::sync::Arc::new(local)),
                ..Default::default()
            },
            state: StateDir::open(root.join("state"))?,
            holder: crate::store::lease::holder_id(),
            lease_ttl: Duration::from_secs(120),
            reader_wait: Duration::from_secs(300),
            actor: default_actor("cli"),
            s3: Default::default(),
            policies_dir: None,
            residency: Default::default(),
            survey_cache: Default::default(),
        })
    }
}

impl Context {
    /// Builds the context a configuration describes: its store (local
    /// directory or S3), the local key provider, AWS KMS when a region is
    /// configured (in custos.toml `[aws]` or the standard AWS environment),
    /// PKCS#11 when `[pkcs11]` is and KMIP when `[kmip]` is.
    pub async fn from_config(cfg: &crate::config::Config) -> crate::Result<Context> {
        Self::configured(cfg, true).await
    }

    /// [`Context::from_config`] without the audit log, for what only reads
    /// it (the compliance report verifies it itself, and must still report
    /// on a log that no longer opens for appends). Records nothing.
    pub async fn from_config_unaudited(cfg: &crate::config::Config) -> crate::Result<Context> {
        Self::configured(cfg, false).await
    }

    async fn configured(cfg: &crate::config::Config, audited: bool) -> crate::Result<Context> {
        let store = open_store(cfg)?;
        let local = crate::keys::local::LocalKeyProvider::new(&cfg.local_keys_dir)?;
        let mut keys = KeyProviders {
            local: Some(std::sync::Arc::new(local)),
            ..Default::default()
        };
        let aws = aws_kms_settings(cfg);
        let env_region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        if aws.region.is_some() || env_region {
            match crate::keys::aws_kms::AwsKmsProvider::new(&aws).await {
                Ok(p) => keys.aws_kms = Some(std::sync::Arc::new(p)),
                Err(e) => {
                    keys.unavailable.insert(ProviderKind::AwsKms, e.to_string());
                }
            }
        } else {
            // Without a region the SDK would probe the EC2 metadata service; custos
            // never does that implicitly.
            keys.unavailable.insert(
                ProviderKind::AwsKms,
                "AWS KMS needs a region: set [aws] region in custos.toml or AWS_REGION".into(),
            );
        }
        // Whatever is configured: no check value an earlier build recorded
        // stays on disk (see `object_record::fingerprint`).
        let pkcs11_record = cfg.state_dir.join("pkcs11-objects.json");
        let kmip_record = cfg.state_dir.join("kmip-objects.json");
        for (file, migrated) in [
            (
                &pkcs11_record,
                crate::keys::pkcs11::Pkcs11Provider::migrate_object_record(pkcs11_record.clone()),
            ),
            (
                &kmip_record,
                crate::keys::kmip::KmipProvider::migrate_object_record(kmip_record.clone()),
            ),
        ] {
            if let Err(e) = migrated {
                tracing::warn!(event = "key_record.migrate_failed", file = %file.display(), error = %e, "{e}");
            }
        }
        match &cfg.pkcs11 {
            Some(settings) => match crate::keys::pkcs11::Pkcs11Provider::open(settings) {
                // Which versions custos generated, where no PIN holder can write.
                Ok(p) => {
                    keys.pkcs11 = Some(std::sync::Arc::new(p.with_object_record(pkcs11_record)))
                }
                Err(e) => {
                    keys.unavailable.insert(ProviderKind::Pkcs11, e.to_string());
                }
            },
            None => {
                keys.unavailable.insert(
                    ProviderKind::Pkcs11,
                    "PKCS#11 needs a module and a PIN source: add [pkcs11] to custos.toml".into(),
                );
            }
        }
        match &cfg.kmip {
            Some(settings) => match crate::keys::kmip::KmipProvider::new(settings) {
                // Which objects custos made, where no KMIP client can write.
                Ok(p) => keys.kmip = Some(std::sync::Arc::new(p.with_object_record(kmip_record))),
                Err(e) => {
                    keys.unavailable.insert(ProviderKind::Kmip, e.to_string());
                }
            },
            None => {
                keys.unavailable.insert(
                    ProviderKind::Kmip,
                    "no KMIP key manager is configured: add [kmip] (server, ca_file, client_cert_file, client_key_file) to custos.toml".into(),
                );
            }
        }
        crate::hooks::wrap_keys(&mut keys)?;
        let state = StateDir::open(&cfg.state_dir)?;
        let audit = match audited {
            true => Some(
                crate::audit::AuditLog::from_config(cfg, Some(store.clone())).map_err(
                    |e| match e {
                        // A configuration problem keeps its kind and its fix.
                        e @ crate::Error::Config { .. } => e,
                        e => crate::Error::AuditUnavailable {
                            event: "anything (the audit log does not open)".into(),
                            reason: e.to_string(),
                        },
                    },
                )?,
            ),
            false => None,
        };
        let mut ctx = Context {
            audit,
            store,
            store_url: cfg.store.url(),
            keys,
            state,
            holder: crate::store::lease::holder_id(),
            lease_ttl: cfg.daemon.lease_ttl,
            reader_wait: cfg.daemon.reader_wait,
            actor: default_actor("cli"),
            s3: s3_options(cfg),
            policies_dir: Some(cfg.policies_dir.clone()),
            residency: cfg.residency_rules(),
            survey_cache: Default::default(),
        };
        ctx.install_key_gate();
        Ok(ctx)
    }

    /// Puts `[residency]` in front of every key operation (see
    /// [`ResidencyGate`]), recording refusals as `actor`: call again after
    /// changing the rules, the audit log or the actor. Unrestricted rules
    /// install no gate.
    pub fn install_key_gate(&mut self) {
        self.keys.gate = (!self.residency.residency.is_unrestricted()).then(|| {
            std::sync::Arc::new(ResidencyGate {
                rules: self.residency.clone(),
                audit: self.audit.clone(),
                actor: self.actor.clone(),
            }) as std::sync::Arc<dyn crate::keys::KeyGate>
        });
    }
}

/// `[residency]` at every key operation: binding a key checks the rules,
/// but a key can also reach a job from the store (a descriptor or envelope
/// the store operator wrote, a tenant bound before the rules). Checked with
/// the facts the key's provider reports (the AWS KMS region and endpoint it
/// calls, the KMIP server), so a key outside the rules is refused before
/// its provider is called; the refusal is recorded (`key.refused`).
struct ResidencyGate {
    rules: crate::config::ResidencyRules,
    audit: Option<crate::audit::AuditLog>,
    actor: String,
}

impl std::fmt::Debug for ResidencyGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidencyGate")
            .field("residency", &self.rules.residency)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl crate::keys::KeyGate for ResidencyGate {
    async fn admit(
        &self,
        key: &crate::keys::KeyRef,
        custody: &crate::keys::Custody,
        operation: &'static str,
    ) -> Result<(), crate::keys::KeyError> {
        let at = self.rules.placement.with_custody(custody);
        let Err(violation) = self.rules.residency.check_key(key, &at) else {
            return Ok(());
        };
        let e = crate::keys::KeyError::Refused {
            key: key.to_string(),
            operation,
            message: violation.to_string(),
        };
        tracing::warn!(event = "key.refused", key = %key, operation, rule = violation.rule, error = %e, "key {key}: refused by [residency]");
        // A refused `describe` is a question about a key, asked by read-only
        // surveys (`tenant show`, `tenant list`, a report's custody table):
        // they write no audit record. A job that acts on the refusal (a shred
        // that cannot end the key) records its own; every refused use
        // (wrap, unwrap, destroy, …) is recorded here.
        if operation == crate::keys::DESCRIBE {
            return Err(e);
        }
        if let Some(log) = &self.audit {
            let details = serde_json::json!({
                "reason": e.kind(),
                "key": key,
                "operation": operation,
                "rule": violation.rule,
                "error": e.to_string(),
            });
            if let Err(err) = log.append("key.refused", None, &self.actor, details).await {
                tracing::error!(event = "audit.failed", key = %key, error = %err, "could not record a key refusal");
            }
        }
        Err(e)
    }
}

/// Opens the configured object store (in `test-hooks` builds, wrapped in the
/// fault injector when `CUSTOS_FAULTS` is set, see [`crate::hooks`]).
pub fn open_store(cfg: &crate::config::Config) -> crate::Result<SharedStore> {
    crate::hooks::wrap_store(open_configured_store(cfg)?)
}

fn open_configured_store(cfg: &crate::config::Config) -> crate::Result<SharedStore> {
    use crate::config::StoreLocation;
    match &cfg.store {
        StoreLocation::Local(path) => crate::store::local::open(path),
        StoreLocation::Memory => Ok(crate::store::memory()),
        StoreLocation::S3 { bucket, prefix } => {
            crate::store::s3::open(bucket, prefix, &s3_options(cfg))
        }
    }
}

/// S3 connection settings from `[aws]` (the environment fills in the rest).
pub fn s3_options(cfg: &crate::config::Config) -> crate::store::s3::S3Options {
    let aws = &cfg.aws;
    crate::store::s3::S3Options {
        region: aws.region.clone(),
        endpoint_url: aws.s3_endpoint().map(str::to_owned),
        allow_http: aws.allow_http.then_some(true),
        access_key_id: aws.access_key_id.clone(),
        secret_access_key: aws
            .secret_access_key
            .as_ref()
            .map(|s| s.expose().to_owned()),
        session_token: aws.session_token.as_ref().map(|s| s.expose().to_owned()),
    }
}

fn aws_kms_settings(cfg: &crate::config::Config) -> crate::keys::aws_kms::AwsKmsSettings {
    let aws = &cfg.aws;
    crate::keys::aws_kms::AwsKmsSettings {
        region: aws.region.clone(),
        endpoint_url: aws.kms_endpoint().map(str::to_owned),
        access_key_id: aws.access_key_id.clone(),
        secret_access_key: aws
            .secret_access_key
            .as_ref()
            .map(|s| s.expose().to_owned()),
        profile: aws.profile.clone(),
    }
}

/// `<role>:<user>@<host>`: who acts, for the audit log.
pub fn default_actor(role: &str) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        // Not the owner of /proc/self: custos is not dumpable (see main), so
        // that is root whoever runs it.
        .unwrap_or_else(|_| format!("uid{}", crate::secure_fs::euid()));
    format!("{role}:{user}@{}", crate::store::lease::hostname())
}

impl Context {
    /// Appends an audit record. Without an audit log (never in production
    /// setups) it records nothing. A record that cannot be written is
    /// `audit_unavailable`, whatever the cause (full disk, I/O error, a log
    /// that no longer matches its checkpoints), so callers fail closed on
    /// one kind.
    pub async fn record(
        &self,
        event: &str,
        tenant: Option<&crate::tenant::TenantId>,
        details: serde_json::Value,
    ) -> crate::Result<Option<crate::audit::Receipt>> {
        let (receipt, replication) = self
            .record_deferring_replication(event, tenant, details)
            .await?;
        if let Some(replication) = replication {
            replication.run().await;
        }
        Ok(receipt)
    }

    /// [`Context::record`] that returns once the record is in the local log,
    /// leaving its copy to the store to the caller (see
    /// [`crate::audit::AuditLog::append_deferring_replication`]).
    pub async fn record_deferring_replication(
        &self,
        event: &str,
        tenant: Option<&crate::tenant::TenantId>,
        details: serde_json::Value,
    ) -> crate::Result<(
        Option<crate::audit::Receipt>,
        Option<crate::audit::log::Replication>,
    )> {
        match &self.audit {
            Some(log) => log
                .append_deferring_replication(event, tenant, &self.actor, details)
                .await
                .map(|(receipt, replication)| (Some(receipt), Some(replication)))
                .map_err(|e| match e {
                    // A malformed event name is the caller's bug, not the log's.
                    e @ crate::Error::InvalidArgument(_) => e,
                    e => crate::Error::AuditUnavailable {
                        event: event.to_owned(),
                        reason: e.to_string(),
                    },
                }),
            None => Ok((None, None)),
        }
    }
}
