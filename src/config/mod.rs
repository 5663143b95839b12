//! Configuration: `custos.toml` (where things are, how to reach AWS, daemon
//! pacing) and the tenant policies (one TOML file per tenant).
//!
//! Both are read by hand from spanned TOML rather than through serde, so that
//! every problem of every file is reported at once, each with its file, line
//! and column, and values inherited from `defaults.toml` keep pointing at the
//! file that set them.
//!
//! - [`settings`]: [`Config`], its discovery and the store location;
//! - [`policy`]: [`Policy`] and its sections;
//! - [`policy_set`]: loading and validating a policies directory;
//! - [`report`]: the compliance report's controls and schedule;
//! - [`schedule`]: cron schedules; [`units`]: durations and sizes;
//! - [`diag`]: located errors (`file:line:column: message`).

pub mod diag;
mod paths;
pub mod policy;
pub mod policy_set;
pub mod report;
pub mod residency;
pub mod schedule;
pub mod settings;
pub mod units;
mod walk;

pub use diag::{PolicyError, PolicyErrors};
pub use policy::{
    BackupPolicy, CheckPolicy, DeletionPolicy, DeletionState, DrillMode, DrillPick, DrillPolicy,
    KeepRules, PathGlobs, Policy, RetentionPolicy, RotationPolicy, SourceSpec, VerifyCommand,
};
pub use policy_set::{
    DeclaredKey, DeclaredKeysCache, PolicyChanges, PolicyFile, PolicySet, TenantSummary,
    ValidationReport, declared_keys, declared_keys_cached, load_policies, load_policy_file,
    validate_dir, validate_dir_under,
};
pub use report::{Controls, ReportFormat, ReportSettings};
pub use residency::{Placement, Residency, ResidencyViolation, Rules as ResidencyRules};
pub use schedule::Schedule;
pub use settings::{
    AuditSettings, AwsSettings, Config, ConfigError, ConfigOrigin, ConfigWarning, DaemonSettings,
    SecretString, StoreLocation,
};
