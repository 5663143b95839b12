//! AWS KMS key provider (also LocalStack, moto, any KMS-compatible endpoint).
//!
//! Each tenant's CMK is a symmetric KMS key owned by the customer; custos only
//! calls `GenerateDataKey`, `Encrypt`, `Decrypt`, `ReEncrypt` and the lifecycle
//! operations on it. Every wrap binds the [`WrapContext`] as the KMS
//! `EncryptionContext`, and every unwrap pins `KeyId` to the tenant's key, so a
//! wrapped key is refused for another tenant, epoch, purpose or key.
//!
//! # Retries
//!
//! The SDK's own retry layer is disabled ([`RetryConfig::disabled`]) and this
//! module retries by itself, so there is exactly one policy and one place that
//! decides what is transient:
//!
//! - throttling (`ThrottlingException`, `LimitExceededException`), KMS-side
//!   transient faults (`KMSInternalException`, `DependencyTimeoutException`,
//!   `KeyUnavailableException`) and HTTP 5xx other than 501: up to
//!   [`MAX_ATTEMPTS`] attempts with exponential backoff and full jitter, at most
//!   [`RETRY_BUDGET`] of sleeping in all, then [`KeyError::Throttled`];
//! - a connection that could not be made or broke (I/O): one more attempt after
//!   a short pause (a stale pooled connection), then [`KeyError::Unreachable`];
//! - timeouts: no retry (the time is already spent), [`KeyError::Unreachable`];
//! - everything else (disabled key, wrong context, access denied, …) is
//!   permanent and is never retried.
//!
//! Callers see [`KeyError::is_transient`] on the last two kinds and may retry
//! the whole job later.
//!
//! # Plaintext data keys
//!
//! `GenerateDataKey` and `Decrypt` return the plaintext key in an ordinary
//! `Blob`: it is copied into a [`SecretKey`] at once and the SDK buffer is
//! zeroized. `Encrypt` has to hand the SDK a plaintext `Blob` of its own; the
//! SDK drops that buffer (without zeroizing it) once the request is serialized.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::Client;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::{Credentials, Region};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::{Blob, DateTime as AwsDateTime};
use aws_sdk_kms::types::{DataKeySpec, KeyMetadata, KeyState as AwsKeyState, OriginType};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

// Creating (and importing material into) KMS keys is for tests only.
#[cfg(feature = "test-hooks")]
mod test_keys;

use super::{
    Custody, DataKey, DestroyAction, Destruction, KeyError, KeyInfo, KeyOrigin, KeyProvider,
    KeyRef, KeyState, ProviderKind, SecretKey, WrapContext, WrappedKey,
};

const PROVIDER: &str = "aws-kms";

/// Most attempts for one KMS call that keeps being throttled.
pub const MAX_ATTEMPTS: u32 = 5;
/// Most time spent sleeping between the attempts of one KMS call.
pub const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// First backoff step; doubled per attempt, with full jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(200);
/// Longest single backoff sleep.
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// TCP (and TLS) connect timeout: an unreachable endpoint fails fast.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest single KMS call, from sending to the parsed response.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
/// ScheduleKeyDeletion's limits on the pending window, in days.
pub const PENDING_WINDOW_DAYS: std::ops::RangeInclusive<u32> = 7..=30;

/// Connection settings of the AWS KMS provider (`[aws]` in custos.toml).
///
/// Unset fields fall back to the AWS SDK's standard sources: `AWS_REGION` /
/// `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_KMS` / `AWS_ENDPOINT_URL`, the
/// credential chain (environment, profile, web identity, ECS, instance
/// metadata) and `AWS_PROFILE`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AwsKmsSettings {
    pub region: Option<String>,
    /// E.g. `http://127.0.0.1:4566` for LocalStack.
    pub endpoint_url: Option<String>,
    /// Static credentials; both or neither.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// A named profile of the shared AWS config files.
    pub profile: Option<String>,
}

impl fmt::Debug for AwsKmsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsSettings")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("profile", &self.profile)
            .finish()
    }
}

/// The AWS KMS [`KeyProvider`].
#[derive(Clone)]
pub struct AwsKmsProvider {
    client: Client,
    region: String,
    /// Where requests go, for error messages (`https://kms.<region>.amazonaws.com` by default).
    endpoint: String,
}

impl fmt::Debug for AwsKmsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKmsProvider")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

fn not_configured(message: impl Into<String>) -> KeyError {
    KeyError::NotConfigured {
        provider: PROVIDER,
        message: message.into(),
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl AwsKmsProvider {
    /// Builds a client from `settings` and the standard AWS sources. Makes no request.
    ///
    /// Fails with [`KeyError::NotConfigured`] when no region can be found (rather
    /// than with `MissingSigningRegion` on the first call), when only half of a
    /// static key pair is given, or when the endpoint is not an http(s) URL.
    pub async fn new(settings: &AwsKmsSettings) -> Result<Self, KeyError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(region) = non_empty(&settings.region) {
            loader = loader.region(Region::new(region.to_owned()));
        }
        if let Some(profile) = non_empty(&settings.profile) {
            loader = loader.profile_name(profile);
        }
        let endpoint_override = non_empty(&settings.endpoint_url).map(str::to_owned);
        if let Some(url) = &endpoint_override {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(not_configured(format!(
                    "endpoint_url {url:?} is not an http:// or https:// URL"
                )));
            }
            loader = loader.endpoint_url(url.clone());
        }
        match (
            non_empty(&settings.access_key_id),
            non_empty(&settings.secret_access_key),
        ) {
            (Some(ak), Some(sk)) => {
                loader = loader.credentials_provider(Credentials::new(
                    ak,
                    sk,
                    None,
                    None,
                    "custos-config",
                ));
            }
            (None, None) => {}
            _ => {
                return Err(not_configured(
                    "access_key_id and secret_access_key must be given together (or neither, to use the AWS credential chain)",
                ));
            }
        }
        let sdk_config = loader.load().await;
        let Some(region) = sdk_config.region().map(|r| r.as_ref().to_owned()) else {
            return Err(not_configured(
                "no AWS region: set region in [aws] of custos.toml, or AWS_REGION in the environment",
            ));
        };
        // aws-config applies AWS_ENDPOINT_URL_KMS itself when building the KMS
        // config; it is looked up here only to name the endpoint in errors.
        let endpoint = endpoint_override
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL_KMS"))
            .or_else(|| sdk_config.endpoint_url().map(str::to_owned))
            .or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
            .unwrap_or_else(|| format!("https://kms.{region}.amazonaws.com"));
        let client = Client::new(&sdk_config);
        Ok(AwsKmsProvider {
            client,
            region,
            endpoint,
        })
    }

    /// The region requests are signed for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The endpoint requests go to (as configured; for error messages and reports).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The underlying SDK client, for tests and tools.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn backend(&self, key: &str, message: String) -> KeyError {
        KeyError::Backend {
            provider: PROVIDER,
            key: label(key),
            message,
        }
    }

    fn info(&self, reference: &KeyRef, meta: &KeyMetadata) -> KeyInfo {
        KeyInfo {
            reference: reference.clone(),
            key_id: meta.arn().unwrap_or(meta.key_id()).to_owned(),
            state: map_state(meta),
            origin: match meta.origin() {
                Some(OriginType::AwsKms) | None => KeyOrigin::Provider,
                Some(OriginType::External) => KeyOrigin::External,
                Some(_) => KeyOrigin::Other,
            },
            current_version: meta.current_key_material_id().map(str::to_owned),
            created_at: meta.creation_date().and_then(to_chrono),
            rotated_at: None,
        }
    }

    async fn describe_meta(&self, key: &KeyRef) -> Result<KeyMetadata, KeyError> {
        let out = self
            .call("DescribeKey", &[key.id()], || {
                self.client.describe_key().key_id(key.id()).send()
            })
            .await?;
        out.key_metadata
            .ok_or_else(|| self.backend(key.id(), "DescribeKey returned no key metadata".into()))
    }

    /// The key id for the key-management calls (rotate, disable, enable,
    /// destroy). Those take no alias, cannot be used across accounts anyway,
    /// and moto accepts only the bare id for some of them (DisableKey with an
    /// ARN fails there with a 500); so the reference is resolved by
    /// `DescribeKey` to the bare key id first.
    async fn lifecycle_id(&self, key: &KeyRef) -> Result<String, KeyError> {
        Ok(self.describe_meta(key).await?.key_id().to_owned())
    }

    /// Runs one KMS operation under the retry policy of this module (see the
    /// module docs) and maps its errors to [`KeyError`]. `keys` are the provider
    /// key ids involved, first the one errors are reported against.
    async fn call<T, E, F, Fut>(
        &self,
        op: &'static str,
        keys: &[&str],
        mut send: F,
    ) -> Result<T, KeyError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        // The SDK sends every call to the client's regional endpoint, whatever
        // region a key ARN names: a key of another region would be asked
        // about there (and refused by KMS), so the call is not made.
        for key in keys {
            if let Some(r) = arn_region(key)
                && r != self.region
            {
                return Err(KeyError::Refused {
                    key: format!("{}:{key}", ProviderKind::AwsKms.scheme()),
                    operation: op,
                    message: format!(
                        "its ARN names region {r:?}, but the AWS KMS client calls region {:?} at {}: the request \
                         would go there, not to {r:?}. Set [aws] region = {r:?} (and its endpoint), or name a key \
                         of region {:?}",
                        self.region, self.endpoint, self.region
                    ),
                });
            }
        }
        let started = Instant::now();
        let mut slept = Duration::ZERO;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let err = match send().await {
                Ok(out) => return Ok(out),
                Err(err) => err,
            };
            let key = keys.first().copied().unwrap_or("(new key)");
            let failure = self.classify(op, key, &err);
            let pause = match &failure {
                Failure::Throttle(_) if attempt < MAX_ATTEMPTS => Some(backoff(attempt)),
                Failure::Connect(_) if attempt == 1 => Some(Duration::from_millis(150)),
                _ => None,
            };
            if let Some(pause) = pause.filter(|p| {
                slept + *p <= RETRY_BUDGET && started.elapsed() + *p < OPERATION_TIMEOUT
            }) {
                tracing::debug!(op, key = %label(key), attempt, pause_ms = pause.as_millis() as u64, "retrying KMS call");
                tokio::time::sleep(pause).await;
                slept += pause;
                continue;
            }
            return Err(match failure {
                Failure::Throttle(message) => KeyError::Throttled {
                    key: label(key),
                    message: format!(
                        "{message} (gave up after {attempt} attempts in {:.1} s)",
                        started.elapsed().as_secs_f64()
                    ),
                },
                Failure::Connect(message) => KeyError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    message,
                },
                Failure::Permanent(e) => e,
                Failure::InvalidState(message) => self.explain_invalid_state(keys, message).await,
            });
        }
    }

    fn classify<E>(&self, op: &str, key: &str, err: &SdkError<E, HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let unreachable = |what: &str| {
            Failure::Permanent(KeyError::Unreachable {
                endpoint: self.endpoint.clone(),
                message: format!("{op} {what}: {}", chain(err)),
            })
        };
        match err {
            SdkError::TimeoutError(_) => return unreachable("timed out"),
            SdkError::DispatchFailure(d) => {
                return if d.is_timeout() {
                    unreachable("timed out")
                } else if d.is_io() {
                    Failure::Connect(format!("{op} could not connect: {}", chain(err)))
                } else if d.is_user() {
                    Failure::Permanent(not_configured(format!("{op}: {}", chain(err))))
                } else {
                    unreachable("failed")
                };
            }
            // Before anything was sent: no credentials, bad endpoint, invalid input.
            SdkError::ConstructionFailure(_) => {
                return Failure::Permanent(not_configured(format!("{op}: {}", chain(err))));
            }
            _ => {}
        }
        let status = err.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
        let code = err.code().unwrap_or("");
        let message = match (code, err.message()) {
            ("", Some(m)) => format!("{op}: HTTP {status}: {m}"),
            ("", None) => format!("{op}: HTTP {status}: {}", chain(err)),
            (c, Some(m)) => format!("{op}: {c}: {m}"),
            (c, None) => format!("{op}: {c}"),
        };
        let key = label(key);
        match code {
            "DisabledException" => Failure::Permanent(KeyError::Disabled { key }),
            "KMSInvalidStateException" => Failure::InvalidState(message),
            "NotFoundException" | "InvalidArnException" => {
                Failure::Permanent(KeyError::NotFound { key, message })
            }
            "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "IncompleteSignatureException"
            | "SignatureDoesNotMatch"
            | "InvalidClientTokenId"
            | "InvalidAccessKeyId"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "MissingAuthenticationToken"
            | "MissingAuthenticationTokenException"
            | "AuthFailure" => Failure::Permanent(KeyError::AccessDenied { key, message }),
            "InvalidCiphertextException" | "IncorrectKeyException" => {
                Failure::Permanent(KeyError::InvalidCiphertext { key, message })
            }
            "ThrottlingException"
            | "Throttling"
            | "ThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "LimitExceededException"
            | "KMSInternalException"
            | "DependencyTimeoutException"
            | "KeyUnavailableException"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "InternalFailure" => Failure::Throttle(message),
            _ if status >= 500 && status != 501 => Failure::Throttle(message),
            _ => Failure::Permanent(KeyError::Backend {
                provider: PROVIDER,
                key,
                message,
            }),
        }
    }

    /// `KMSInvalidStateException` covers several states; describe the keys
    /// involved to report the one that is unusable (pending deletion, pending import…).
    async fn explain_invalid_state(&self, keys: &[&str], message: String) -> KeyError {
        for &id in keys {
            let Ok(out) = self.client.describe_key().key_id(id).send().await else {
                continue;
            };
            let Some(meta) = out.key_metadata() else {
                continue;
            };
            let key = label(id);
            match map_state(meta) {
                KeyState::Enabled => continue,
                KeyState::Disabled => return KeyError::Disabled { key },
                KeyState::PendingDeletion { deletion_date } => {
                    return KeyError::PendingDeletion { key, deletion_date };
                }
                KeyState::PendingImport => return KeyError::PendingImport { key },
                KeyState::Destroyed { destroyed_at } => {
                    return KeyError::Destroyed { key, destroyed_at };
                }
                KeyState::Other { name } => {
                    return self.backend(id, format!("{message} (key state {name})"));
                }
            }
        }
        // Describe failed or every key looks usable: go by the message.
        let key = label(keys.first().copied().unwrap_or("(new key)"));
        let lower = message.to_ascii_lowercase();
        if lower.contains("pending deletion") || lower.contains("pendingdeletion") {
            KeyError::PendingDeletion {
                key,
                deletion_date: None,
            }
        } else if lower.contains("pending import") || lower.contains("pendingimport") {
            KeyError::PendingImport { key }
        } else if lower.contains("disabled") {
            KeyError::Disabled { key }
        } else {
            KeyError::Backend {
                provider: PROVIDER,
                key,
                message,
            }
        }
    }

    fn context(ctx: &WrapContext) -> HashMap<String, String> {
        ctx.pairs().into_iter().collect()
    }

    /// Copies a plaintext key out of an SDK buffer into a [`DataKey`] and zeroizes the buffer.
    fn take_plaintext(
        &self,
        key: &KeyRef,
        op: &str,
        blob: Option<Blob>,
    ) -> Result<DataKey, KeyError> {
        let mut bytes = Zeroizing::new(blob.map(Blob::into_inner).unwrap_or_default());
        let len = bytes.len();
        let data_key = SecretKey::from_slice(&bytes);
        bytes.zeroize();
        data_key.ok_or_else(|| {
            self.backend(
                key.id(),
                format!(
                    "{op} returned a {len}-byte plaintext key, expected {}",
                    super::KEY_LEN
                ),
            )
        })
    }

    fn wrapped(
        &self,
        key: &KeyRef,
        op: &str,
        key_id: Option<String>,
        blob: Option<Blob>,
    ) -> Result<WrappedKey, KeyError> {
        let ciphertext = blob.map(Blob::into_inner).filter(|c| !c.is_empty());
        let Some(ciphertext) = ciphertext else {
            return Err(self.backend(key.id(), format!("{op} returned no ciphertext")));
        };
        Ok(WrappedKey {
            key_id: key_id.unwrap_or_else(|| key.id().to_owned()),
            key_version: None,
            ciphertext,
        })
    }
}

enum Failure {
    /// Worth retrying with backoff; becomes [`KeyError::Throttled`].
    Throttle(String),
    /// Connection could not be made or broke; one quick retry, then [`KeyError::Unreachable`].
    Connect(String),
    /// `KMSInvalidStateException`: explained by describing the key.
    InvalidState(String),
    Permanent(KeyError),
}

/// Full-jitter exponential backoff: uniform in [0, min(MAX, BASE·2^(attempt-1))], at least 10 ms.
fn backoff(attempt: u32) -> Duration {
    let cap = BASE_BACKOFF
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(MAX_BACKOFF);
    let r = u64::from_le_bytes(crate::util::random_bytes::<8>());
    let ms = cap.as_millis() as u64;
    Duration::from_millis((r % (ms + 1)).max(10))
}

/// An error and its sources, `a: b: c`, without repeats (the SDK's own
/// `DisplayErrorContext` appends a `Debug` dump, too noisy for an event).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let shown = e.to_string();
        if !shown.is_empty() && parts.last().is_none_or(|last| !last.contains(&shown)) {
            parts.push(shown);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn label(id: &str) -> String {
    format!("{PROVIDER}:{id}")
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn to_chrono(t: &AwsDateTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.secs(), t.subsec_nanos())
}

fn map_state(meta: &KeyMetadata) -> KeyState {
    match meta.key_state() {
        Some(AwsKeyState::Enabled) => KeyState::Enabled,
        Some(AwsKeyState::Disabled) => KeyState::Disabled,
        Some(AwsKeyState::PendingDeletion) => KeyState::PendingDeletion {
            deletion_date: meta.deletion_date().and_then(to_chrono),
        },
        Some(AwsKeyState::PendingImport) => KeyState::PendingImport,
        Some(other) => KeyState::Other {
            name: other.as_str().to_owned(),
        },
        None => KeyState::Other {
            name: "Unknown".to_owned(),
        },
    }
}

#[async_trait]
impl KeyProvider for AwsKmsProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::AwsKms
    }

    fn custody(&self, _key: &KeyRef) -> Custody {
        Custody {
            provider: ProviderKind::AwsKms,
            holder: format!("AWS KMS in {} ({})", self.region, self.endpoint),
            details: BTreeMap::from([
                ("region".to_owned(), self.region.clone()),
                ("endpoint".to_owned(), self.endpoint.clone()),
            ]),
            network: true,
        }
    }

    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let meta = self.describe_meta(key).await?;
        Ok(self.info(key, &meta))
    }

    async fn create_key(&self, _key: &KeyRef) -> Result<KeyInfo, KeyError> {
        Err(KeyError::Unsupported {
            provider: PROVIDER,
            operation: "creating keys (the customer creates the CMK and grants custos access to it)",
        })
    }

    async fn generate_data_key(
        &self,
        key: &KeyRef,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        let context = Self::context(ctx);
        let out = self
            .call("GenerateDataKey", &[key.id()], || {
                self.client
                    .generate_data_key()
                    .key_id(key.id())
                    .key_spec(DataKeySpec::Aes256)
                    .set_encryption_context(Some(context.clone()))
                    .send()
            })
            .await?;
        let mut out = out;
        let data_key = self.take_plaintext(key, "GenerateDataKey", out.plaintext.take())?;
        let wrapped = self.wrapped(
            key,
            "GenerateDataKey",
            out.key_id.take(),
            out.ciphertext_blob.take(),
        )?;
        Ok((data_key, wrapped))
    }

    async fn wrap(
        &self,
        key: &KeyRef,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        let context = Self::context(ctx);
        let mut out = self
            .call("Encrypt", &[key.id()], || {
                self.client
                    .encrypt()
                    .key_id(key.id())
                    .plaintext(Blob::new(data_key.expose().to_vec()))
                    .set_encryption_context(Some(context.clone()))
                    .send()
            })
            .await?;
        self.wrapped(
            key,
            "Encrypt",
            out.key_id.take(),
            out.ciphertext_blob.take(),
        )
    }

    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError> {
        let context = Self::context(ctx);
        let mut out = self
            .call("Decrypt", &[key.id()], || {
                self.client
                    .decrypt()
                    .key_id(key.id())
                    .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
                    .set_encryption_context(Some(context.clone()))
                    .send()
            })
            .await?;
        self.take_plaintext(key, "Decrypt", out.plaintext.take())
    }

    async fn rewrap(
        &self,
        from: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
        to: &KeyRef,
    ) -> Result<WrappedKey, KeyError> {
        let context = Self::context(ctx);
        let mut out = self
            .call("ReEncrypt", &[from.id(), to.id()], || {
                self.client
                    .re_encrypt()
                    .ciphertext_blob(Blob::new(wrapped.ciphertext.clone()))
                    // Always named: pins the source key, and LocalStack answers 500 without it.
                    .source_key_id(from.id())
                    .set_source_encryption_context(Some(context.clone()))
                    .destination_key_id(to.id())
                    .set_destination_encryption_context(Some(context.clone()))
                    .send()
            })
            .await?;
        self.wrapped(
            to,
            "ReEncrypt",
            out.key_id.take(),
            out.ciphertext_blob.take(),
        )
    }

    async fn rotate(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let id = self.lifecycle_id(key).await?;
        self.call("RotateKeyOnDemand", &[key.id()], || {
            self.client.rotate_key_on_demand().key_id(&id).send()
        })
        .await?;
        self.describe(key).await
    }

    async fn disable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let id = self.lifecycle_id(key).await?;
        self.call("DisableKey", &[key.id()], || {
            self.client.disable_key().key_id(&id).send()
        })
        .await?;
        self.describe(key).await
    }

    async fn enable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        let id = self.lifecycle_id(key).await?;
        self.call("EnableKey", &[key.id()], || {
            self.client.enable_key().key_id(&id).send()
        })
        .await?;
        self.describe(key).await
    }

    /// Imported material (origin `EXTERNAL`): `DisableKey` then
    /// `DeleteImportedKeyMaterial`, irreversible at once. Otherwise `DisableKey`
    /// then `ScheduleKeyDeletion` with `pending_window_days` (7–30), irreversible
    /// at the returned deletion date. Idempotent: a key already pending deletion
    /// reports its existing schedule, an imported key without material reports
    /// the deletion as done (with `effective_at` = now, as KMS does not say when).
    async fn destroy(
        &self,
        key: &KeyRef,
        pending_window_days: u32,
    ) -> Result<Destruction, KeyError> {
        let meta = self.describe_meta(key).await?;
        let info = self.info(key, &meta);
        // See `lifecycle_id`: the bare key id, resolved once, for every call below.
        let id = meta.key_id();
        match (&info.state, info.origin) {
            (KeyState::PendingDeletion { deletion_date }, _) => {
                return Ok(Destruction {
                    objects: Vec::new(),
                    action: DestroyAction::DeletionScheduled,
                    effective_at: deletion_date.unwrap_or_else(Utc::now),
                    state_after: info.state.clone(),
                });
            }
            (KeyState::PendingImport, KeyOrigin::External) => {
                return Ok(Destruction {
                    objects: Vec::new(),
                    action: DestroyAction::ImportedMaterialDeleted,
                    state_after: KeyState::PendingImport,
                    effective_at: Utc::now(),
                });
            }
            _ => {}
        }
        if info.origin != KeyOrigin::External && !PENDING_WINDOW_DAYS.contains(&pending_window_days)
        {
            return Err(KeyError::Unsupported {
                provider: PROVIDER,
                operation: "a deletion pending window outside 7..=30 days (ScheduleKeyDeletion's limits)",
            });
        }
        if info.state != KeyState::Disabled {
            self.call("DisableKey", &[key.id()], || {
                self.client.disable_key().key_id(id).send()
            })
            .await?;
        }
        if info.origin == KeyOrigin::External {
            self.call("DeleteImportedKeyMaterial", &[key.id()], || {
                self.client.delete_imported_key_material().key_id(id).send()
            })
            .await?;
            let after = self.describe(key).await?;
            return Ok(Destruction {
                objects: Vec::new(),
                action: DestroyAction::ImportedMaterialDeleted,
                state_after: after.state,
                effective_at: Utc::now(),
            });
        }
        let window = pending_window_days as i32;
        let out = self
            .call("ScheduleKeyDeletion", &[key.id()], || {
                self.client
                    .schedule_key_deletion()
                    .key_id(id)
                    .pending_window_in_days(window)
                    .send()
            })
            .await?;
        let deletion_date = out.deletion_date().and_then(to_chrono);
        let effective_at = deletion_date
            .unwrap_or_else(|| Utc::now() + chrono::Duration::days(i64::from(pending_window_days)));
        Ok(Destruction {
            objects: Vec::new(),
            action: DestroyAction::DeletionScheduled,
            state_after: KeyState::PendingDeletion {
                deletion_date: Some(effective_at),
            },
            effective_at,
        })
    }
}

/// Checks the `<key>` part of `aws-kms:<key>`: a key id (UUID or `mrk-…`),
/// `alias/<name>`, or a key / alias ARN.
/// The region a key ARN names (`arn:<partition>:kms:<region>:…`); `None`
/// for a key id or alias, which resolve in the client's region.
pub fn arn_region(id: &str) -> Option<&str> {
    id.strip_prefix("arn:")?
        .split(':')
        .nth(2)
        .filter(|r| !r.is_empty())
}

pub fn validate_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("an AWS KMS key reference needs a key id, alias/<name> or an ARN".into());
    }
    if id.len() > 2048 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an AWS KMS key id has no whitespace and at most 2048 characters".into());
    }
    if let Some(alias) = id.strip_prefix("alias/") {
        let ok = !alias.is_empty()
            && !alias.starts_with("aws/")
            && alias
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c));
        return if ok {
            Ok(())
        } else {
            Err(
                "an alias is alias/<name> with letters, digits, '/', '_' or '-' (not alias/aws/…)"
                    .into(),
            )
        };
    }
    if id.starts_with("arn:") {
        let parts: Vec<&str> = id.splitn(6, ':').collect();
        let ok = parts.len() == 6
            && parts[2] == "kms"
            && (parts[5].starts_with("key/") || parts[5].starts_with("alias/"));
        return if ok {
            Ok(())
        } else {
            Err("expected arn:<partition>:kms:<region>:<account>:key/<id> or …:alias/<name>".into())
        };
    }
    if id
        .chars()
        .all(|c| c.is_ascii_hexdigit() || c == '-' || c == 'm' || c == 'r' || c == 'k')
    {
        return Ok(());
    }
    Err("expected a key id (UUID), alias/<name> or an arn:aws:kms:… ARN".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        for attempt in 1..=MAX_ATTEMPTS {
            let cap = BASE_BACKOFF
                .saturating_mul(1 << (attempt - 1))
                .min(MAX_BACKOFF);
            for _ in 0..50 {
                let b = backoff(attempt);
                assert!(
                    b <= cap.max(Duration::from_millis(10)),
                    "{attempt}: {b:?} > {cap:?}"
                );
            }
        }
        // The worst case of all sleeps stays inside the budget.
        let worst: Duration = (1..MAX_ATTEMPTS)
            .map(|a| BASE_BACKOFF.saturating_mul(1 << (a - 1)).min(MAX_BACKOFF))
            .sum();
        assert!(worst <= RETRY_BUDGET, "{worst:?}");
    }

    #[test]
    fn settings_debug_redacts_the_secret() {
        let s = AwsKmsSettings {
            access_key_id: Some("AKIDEXAMPLE".into()),
            secret_access_key: Some("wJalrXUtnFEMI".into()),
            ..Default::default()
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[tokio::test]
    async fn half_a_key_pair_or_a_bad_endpoint_is_not_configured() {
        let s = AwsKmsSettings {
            region: Some("us-east-1".into()),
            access_key_id: Some("AK".into()),
            ..Default::default()
        };
        let err = AwsKmsProvider::new(&s).await.unwrap_err();
        assert_eq!(err.kind(), "key_provider_unsupported", "{err}");
        let s = AwsKmsSettings {
            region: Some("us-east-1".into()),
            endpoint_url: Some("127.0.0.1:1".into()),
            ..Default::default()
        };
        let err = AwsKmsProvider::new(&s).await.unwrap_err();
        assert!(err.to_string().contains("not an http"), "{err}");
    }

    #[test]
    fn validates_key_ids() {
        for ok in [
            "alias/custos-acme",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
            "arn:aws:kms:us-east-1:000000000000:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-1:000000000000:alias/custos-acme",
        ] {
            assert!(validate_key_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "alias/",
            "alias/aws/ebs",
            "alias/a b",
            "arn:aws:s3:::bucket",
            "key id",
        ] {
            assert!(validate_key_id(bad).is_err(), "{bad}");
        }
    }
}
