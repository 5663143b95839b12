//! S3 and S3-compatible stores (AWS S3, MinIO, LocalStack, moto, s3s-fs).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::error::{Error, Result};

/// Connection settings; anything unset comes from the standard AWS
/// environment (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `AWS_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_ALLOW_HTTP`, …).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub allow_http: Option<bool>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// With temporary credentials (STS): the session token.
    pub session_token: Option<String>,
}

/// Opens `s3://bucket/prefix`. Requests are path-style (virtual-hosted names
/// such as `bucket.localhost` do not resolve on every machine).
pub fn open(bucket: &str, prefix: &str, opts: &S3Options) -> Result<Arc<dyn ObjectStore>> {
    let url = format!("s3://{bucket}/{prefix}");
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(false);
    if let Some(r) = &opts.region {
        b = b.with_region(r);
    }
    if let Some(e) = &opts.endpoint_url {
        b = b.with_endpoint(e);
    }
    if let (Some(k), Some(s)) = (&opts.access_key_id, &opts.secret_access_key) {
        b = b.with_access_key_id(k).with_secret_access_key(s);
        if let Some(t) = &opts.session_token {
            b = b.with_token(t);
        }
    }
    let allow_http = opts.allow_http.unwrap_or_else(|| {
        std::env::var("AWS_ALLOW_HTTP")
            .map(|v| v.eq_ignore_ascii_case("true"))
            .unwrap_or(false)
    });
    // `with_client_options` replaces every client option, so allow_http must be set
    // inside the options passed here (an earlier `with_allow_http` would be dropped).
    b = b.with_client_options(
        ClientOptions::new()
            .with_allow_http(allow_http)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120)),
    );
    // Fail within about half a minute when the endpoint is down, instead of
    // the default three minutes; custos retries whole operations above this.
    b = b.with_retry(RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 4,
        retry_timeout: Duration::from_secs(30),
    });
    let store = b.build().map_err(|e| Error::StoreConfig {
        url: url.clone(),
        message: e.to_string(),
    })?;
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        Ok(Arc::new(store))
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix)))
    }
}
