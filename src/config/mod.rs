//! Configuration: `custos.toml` (where things are, how to reach AWS, daemon
//! pacing) and the tenant policies (being written).
//!
//! Read by hand from spanned TOML rather than through serde, so that every
//! problem of a file is reported at once, each with its file, line and column.
//!
//! - [`settings`]: [`Config`], its discovery and the store location;
//! - [`schedule`]: cron schedules; [`units`]: durations and sizes;
//! - [`diag`]: located errors (`file:line:column: message`).

pub mod diag;
mod paths;
pub mod schedule;
pub mod settings;
pub mod units;
mod walk;

pub use diag::{PolicyError, PolicyErrors};
pub use schedule::Schedule;
pub use settings::{
    AuditSettings, AwsSettings, Config, ConfigError, ConfigOrigin, ConfigWarning, DaemonSettings,
    SecretString, StoreLocation,
};
