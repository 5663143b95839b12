//! What most commands do first: load the configuration, build the context,
//! find the tenant's policy.

use std::path::Path;

use crate::config::{Config, Policy, load_policy_file};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::tenant::TenantId;

pub struct Setup {
    pub config: Config,
    pub ctx: Context,
}

pub async fn setup(config: Option<&Path>) -> Result<Setup> {
    let config = Config::discover(config)?;
    print_warnings(&config);
    let ctx = Context::from_config(&config).await?;
    Ok(Setup { config, ctx })
}

/// Warns about the configuration (loose permissions on custos.toml): every
/// command that reads it calls this, so the warning is never missed.
pub fn print_warnings(config: &Config) {
    for w in &config.warnings {
        tracing::warn!(event = "config.warning", "{w}");
    }
}

pub fn tenant_id(arg: &str) -> Result<TenantId> {
    Ok(TenantId::new(arg)?)
}

/// The tenant's policy (`<policies_dir>/<tenant>.toml`), if there is one.
/// Only that file (and defaults.toml) is read, so a broken policy of another
/// tenant does not stop this one.
pub fn policy(config: &Config, tenant: &TenantId) -> Result<Option<Policy>> {
    let file = format!("{tenant}.toml");
    if !config.policies_dir.join(&file).exists() {
        return Ok(None);
    }
    load_policy_file(&config.policies_dir, Path::new(&file))
        .map(Some)
        .map_err(Error::from)
}

/// The tenant's policy, required (jobs that read sources or rules from it).
pub fn require_policy(config: &Config, tenant: &TenantId) -> Result<Policy> {
    policy(config, tenant)?.ok_or_else(|| {
        Error::Policy(format!(
            "no policy for tenant {tenant}: expected {}",
            config.policies_dir.join(format!("{tenant}.toml")).display()
        ))
    })
}
