//! A fault-injecting key provider: wraps any [`KeyProvider`] and makes its
//! calls fail as an unreachable or throttling KMS would (after the SDK's own
//! retries). For tests and manual runs: `CUSTOS_KEY_FAULTS=unreachable`,
//! `throttled`, or `rate=<p>` (a transient failure with probability p per
//! call, half unreachable, half throttled), or `unwrap_delay=<duration>`
//! (every unwrap reaches the provider that much later, as from a slow KMS:
//! the envelope was read before, the key is asked after). A key disabled mid-job needs no
//! injection: disable it (local key file, or the KMS) while the job runs.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{
    Custody, DataKey, Destruction, KeyError, KeyInfo, KeyProvider, KeyRef, Leftover, ProviderKind,
    WrapContext, WrappedKey,
};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeyFaults {
    /// Every call fails: the KMS endpoint cannot be reached.
    Unreachable,
    /// Every call fails: throttled, retries exhausted.
    Throttled,
    /// Each call fails transiently with this probability.
    Rate(f64),
    /// Every unwrap waits this long before it reaches the provider.
    UnwrapDelay(std::time::Duration),
}

impl KeyFaults {
    pub fn parse(spec: &str) -> Result<KeyFaults, String> {
        match spec.trim() {
            "unreachable" => Ok(KeyFaults::Unreachable),
            "throttled" => Ok(KeyFaults::Throttled),
            other if other.starts_with("unwrap_delay=") => {
                humantime::parse_duration(&other["unwrap_delay=".len()..])
                    .map(KeyFaults::UnwrapDelay)
                    .map_err(|e| format!("CUSTOS_KEY_FAULTS={other:?}: {e}"))
            }
            other => other
                .strip_prefix("rate=")
                .and_then(|p| p.parse::<f64>().ok())
                .filter(|p| (0.0..=1.0).contains(p))
                .map(KeyFaults::Rate)
                .ok_or_else(|| {
                    format!(
                        "CUSTOS_KEY_FAULTS={other:?}: expected unreachable, throttled, rate=<0..1> or unwrap_delay=<duration>"
                    )
                }),
        }
    }
}

#[derive(Debug)]
pub struct FaultyKeyProvider {
    inner: Arc<dyn KeyProvider>,
    faults: KeyFaults,
    rng: Mutex<u64>,
}

impl FaultyKeyProvider {
    pub fn new(inner: Arc<dyn KeyProvider>, faults: KeyFaults) -> Self {
        FaultyKeyProvider {
            inner,
            faults,
            rng: Mutex::new(0x6b65_7966_6175_6c74),
        }
    }

    fn draw(&self) -> f64 {
        let mut s = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The failure for this call, if one is drawn.
    fn fault(&self, key: &KeyRef, operation: &'static str) -> Result<(), KeyError> {
        let unreachable = || KeyError::Unreachable {
            endpoint: format!("{} (injected)", key.kind().scheme()),
            message: "injected fault: connection refused".into(),
        };
        let throttled = || KeyError::Throttled {
            key: key.to_string(),
            message: "injected fault: ThrottlingException: Rate exceeded".into(),
        };
        let injected = match self.faults {
            KeyFaults::Unreachable => Err(unreachable()),
            KeyFaults::Throttled => Err(throttled()),
            KeyFaults::Rate(p) if self.draw() < p => {
                if self.draw() < 0.5 {
                    Err(unreachable())
                } else {
                    Err(throttled())
                }
            }
            KeyFaults::Rate(_) | KeyFaults::UnwrapDelay(_) => Ok(()),
        };
        // One event a refused call: how often a job asked a failing
        // provider is visible (and tested).
        if let Err(e) = &injected {
            tracing::warn!(event = "keys.fault_injected", key = %key, operation, error = %e, "injected key provider fault on {operation}");
        }
        injected
    }
}

#[async_trait]
impl KeyProvider for FaultyKeyProvider {
    fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }

    fn custody(&self, key: &KeyRef) -> Custody {
        self.inner.custody(key)
    }

    async fn describe(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.fault(key, "describe")?;
        self.inner.describe(key).await
    }

    async fn create_key(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.fault(key, "create_key")?;
        self.inner.create_key(key).await
    }

    async fn generate_data_key(
        &self,
        key: &KeyRef,
        ctx: &WrapContext,
    ) -> Result<(DataKey, WrappedKey), KeyError> {
        self.fault(key, "generate_data_key")?;
        self.inner.generate_data_key(key, ctx).await
    }

    async fn wrap(
        &self,
        key: &KeyRef,
        data_key: &DataKey,
        ctx: &WrapContext,
    ) -> Result<WrappedKey, KeyError> {
        self.fault(key, "wrap")?;
        self.inner.wrap(key, data_key, ctx).await
    }

    async fn unwrap(
        &self,
        key: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
    ) -> Result<DataKey, KeyError> {
        self.fault(key, "unwrap")?;
        if let KeyFaults::UnwrapDelay(d) = self.faults {
            tokio::time::sleep(d).await;
        }
        self.inner.unwrap(key, wrapped, ctx).await
    }

    async fn rewrap(
        &self,
        from: &KeyRef,
        wrapped: &WrappedKey,
        ctx: &WrapContext,
        to: &KeyRef,
    ) -> Result<WrappedKey, KeyError> {
        self.fault(from, "rewrap")?;
        self.inner.rewrap(from, wrapped, ctx, to).await
    }

    async fn rotate(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.fault(key, "rotate")?;
        self.inner.rotate(key).await
    }

    async fn disable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.fault(key, "disable")?;
        self.inner.disable(key).await
    }

    async fn enable(&self, key: &KeyRef) -> Result<KeyInfo, KeyError> {
        self.fault(key, "enable")?;
        self.inner.enable(key).await
    }

    async fn destroy(
        &self,
        key: &KeyRef,
        pending_window_days: u32,
    ) -> Result<Destruction, KeyError> {
        self.fault(key, "destroy")?;
        self.inner.destroy(key, pending_window_days).await
    }

    async fn leftover_material(&self, key: &KeyRef) -> Result<Vec<Leftover>, KeyError> {
        self.fault(key, "leftover_material")?;
        self.inner.leftover_material(key).await
    }
}

/// Wraps every configured provider when `CUSTOS_KEY_FAULTS` is set.
pub fn from_env(providers: &mut super::KeyProviders) -> Result<(), String> {
    let Ok(spec) = std::env::var("CUSTOS_KEY_FAULTS") else {
        return Ok(());
    };
    let faults = KeyFaults::parse(&spec)?;
    tracing::warn!(event = "keys.faults", spec = %spec, "injecting key provider faults (CUSTOS_KEY_FAULTS is set)");
    for slot in [&mut providers.local, &mut providers.aws_kms] {
        if let Some(p) = slot.take() {
            *slot = Some(Arc::new(FaultyKeyProvider::new(p, faults)));
        }
    }
    Ok(())
}
