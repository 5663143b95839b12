//! A tenant's policy: which key, what to back up, when, how long to keep it,
//! how to prove it restores, when to rotate keys and when to erase the tenant.
//!
//! One TOML file per tenant (`policies/<tenant>.toml`), merged over
//! `defaults.toml` per key (a tenant's value replaces the default; arrays
//! such as `sources`, `exclude` and `verify_command` are replaced, never
//! concatenated). The examples in `policies/` document every key; this module
//! turns the merged files into typed values and reports every problem with
//! its file and line (see [`super::policy_set`] for the directory loader).
//!
//! `{tenant}` in `key`, in the strings of `sources` and in `drill.scratch` and
//! `drill.verify_command` is replaced by the tenant id, so `defaults.toml` can
//! say `key = "local:{tenant}"` once for every tenant.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Serialize;
use toml::de::DeValue;

use super::paths::{check_path_text, resolve};
use super::schedule::Schedule;
use super::settings::parse_s3_url;
use super::units::{format_duration, serde_duration, serde_opt_duration, truncate};
use super::walk::{Diags, Item, Table};
use crate::keys::KeyRef;
use crate::tenant::TenantId;

/// Smallest and largest pack size a policy may ask for.
pub const MIN_PACK_SIZE: u64 = 4 << 20;
pub const MAX_PACK_SIZE: u64 = 128 << 20;
pub const DEFAULT_PACK_SIZE: u64 = 16 << 20;
/// zstd levels custos accepts (the long-window and "ultra" levels above 19 are refused).
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;

const DAY: Duration = Duration::from_secs(86_400);

/// A tenant's validated policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    pub tenant: TenantId,
    pub key: KeyRef,
    pub sources: Vec<SourceSpec>,
    pub backup: BackupPolicy,
    pub retention: RetentionPolicy,
    pub check: CheckPolicy,
    pub drill: DrillPolicy,
    pub rotation: RotationPolicy,
    pub deletion: DeletionPolicy,
    /// The tenant's policy file.
    pub file: PathBuf,
}

/// What a backup reads.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceSpec {
    /// A directory tree.
    Path {
        name: String,
        /// Absolute. It need not exist when the policy is loaded (it may be mounted later).
        path: PathBuf,
        /// Globs relative to `path`, see [`PathGlobs`].
        exclude: Vec<String>,
        /// Do not descend into other file systems (mount points).
        one_file_system: bool,
    },
    /// The standard output of a command (e.g. `pg_dump`), stored as the file `name`.
    Command {
        name: String,
        #[serde(rename = "command")]
        argv: Vec<String>,
        #[serde(with = "serde_opt_duration")]
        timeout: Option<Duration>,
    },
    /// Objects under an object-store prefix (`s3://bucket/prefix/`).
    ObjectStore { name: String, url: String },
}

impl SourceSpec {
    /// The name the source is stored under in a snapshot, unique per tenant.
    pub fn name(&self) -> &str {
        match self {
            SourceSpec::Path { name, .. }
            | SourceSpec::Command { name, .. }
            | SourceSpec::ObjectStore { name, .. } => name,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::Path { .. } => "path",
            SourceSpec::Command { .. } => "command",
            SourceSpec::ObjectStore { .. } => "object_store",
        }
    }
}

/// Compiled path globs: the `exclude` patterns of a path source, and the
/// `--include` patterns of a restore.
///
/// Patterns match the path of an entry relative to the source root, with '/'
/// separators: `*` and `?` stay within one component and `**` crosses any
/// number. As in `.gitignore`, a pattern without '/' matches the entry's name
/// at any depth (`*.tmp`), one with '/' matches from the root (`cache/**`), and
/// a leading '/' only anchors (`/build`).
#[derive(Debug, Clone)]
pub struct PathGlobs {
    set: GlobSet,
}

impl PathGlobs {
    pub fn new(patterns: &[String]) -> Result<PathGlobs, String> {
        let mut builder = GlobSetBuilder::new();
        for p in patterns {
            builder.add(compile_exclude(p)?);
        }
        builder
            .build()
            .map(|set| PathGlobs { set })
            .map_err(|e| e.to_string())
    }

    /// True when `relative` (relative to the source root, or a snapshot path) matches.
    pub fn is_match(&self, relative: &Path) -> bool {
        // Matching builds a candidate string from the path: not for nothing.
        !self.set.is_empty() && self.set.is_match(relative)
    }
}

fn compile_exclude(pattern: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err("an exclude pattern cannot be empty".into());
    }
    if pattern.len() > 1024 || pattern.contains('\0') {
        return Err("an exclude pattern has at most 1024 bytes and no NUL".into());
    }
    let trimmed = pattern.trim_end_matches('/');
    let full = match trimmed.strip_prefix('/') {
        Some(anchored) => anchored.to_owned(),
        None if !trimmed.contains('/') => format!("**/{trimmed}"),
        None => trimmed.to_owned(),
    };
    GlobBuilder::new(&full)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("invalid glob {:?}: {}", truncate(pattern, 80), e.kind()))
}

/// Source names: a file name in a snapshot, `[A-Za-z0-9._-]+`, not `.` or `..`.
pub fn validate_source_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid source name {:?}: use 1 to 255 of A-Z a-z 0-9 . _ - (not \".\" or \"..\")",
            truncate(name, 80)
        ))
    }
}

/// `[backup]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupPolicy {
    /// When the daemon backs the tenant up; none: only on demand.
    pub schedule: Option<Schedule>,
    /// zstd level, 1..=19 (default 3).
    pub compression_level: i32,
    /// Target pack size in bytes, 4 MiB..=128 MiB (default 16 MiB).
    pub pack_size: u64,
    /// Skip files that cannot be read (and report them) instead of failing the backup.
    pub allow_unreadable: bool,
}

impl Default for BackupPolicy {
    fn default() -> Self {
        BackupPolicy {
            schedule: None,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            pack_size: DEFAULT_PACK_SIZE,
            allow_unreadable: false,
        }
    }
}

/// `[retention]`: which snapshots `forget` keeps, when the daemon forgets,
/// and whether it prunes afterwards.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetentionPolicy {
    #[serde(flatten)]
    pub rules: KeepRules,
    /// When the daemon runs forget (and prune); none: only on demand.
    pub schedule: Option<Schedule>,
    /// Remove unreferenced packs after forgetting.
    pub prune: bool,
}

/// Built-in retention: the last 7 snapshots, 7 daily, 4 weekly and 12 monthly.
impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            rules: KeepRules {
                keep_last: 7,
                keep_daily: 7,
                keep_weekly: 4,
                keep_monthly: 12,
                ..KeepRules::default()
            },
            schedule: None,
            prune: true,
        }
    }
}

/// The keep rules (restic semantics: a snapshot is kept if any rule keeps
/// it). Declared once for both front ends: a policy's `[retention]` table
/// fills it, and so do `custos forget`'s `--keep-*` flags. The default keeps
/// nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, clap::Args)]
pub struct KeepRules {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub keep_hourly: u32,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub keep_daily: u32,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub keep_weekly: u32,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub keep_monthly: u32,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub keep_yearly: u32,
    /// Keep every snapshot taken within this long before now (e.g. 30d).
    ///
    /// Measured from the clock, not from the newest snapshot, so time-based
    /// rules resist retention poisoning (snapshots forged with future times
    /// pushing real ones out of keep_last).
    #[arg(long, value_name = "DURATION", value_parser = super::units::parse_duration)]
    #[serde(with = "serde_opt_duration")]
    pub keep_within: Option<Duration>,
}

impl KeepRules {
    /// True when no rule keeps anything: applying it would forget every snapshot.
    pub fn keeps_nothing(&self) -> bool {
        let counts = [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ];
        counts.iter().all(|&n| n == 0) && self.keep_within.is_none_or(|d| d.is_zero())
    }

    /// Refuses rules that would forget every snapshot.
    pub fn validate(&self) -> Result<(), String> {
        if self.keeps_nothing() {
            return Err("keeps no snapshot (every keep_* is 0 and keep_within is not set): it would forget every \
                        snapshot; keep at least one"
                .into());
        }
        Ok(())
    }
}

/// `[check]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckPolicy {
    pub schedule: Option<Schedule>,
    /// Fraction of packs read and decrypted per scheduled check (0..=1; default
    /// 0.1), chosen so that every pack is read over successive checks.
    pub read_data_fraction: f64,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        CheckPolicy {
            schedule: None,
            read_data_fraction: 0.1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillPick {
    /// The newest snapshot.
    Latest,
    /// A random snapshot taken within `drill.within`.
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillMode {
    /// Restore everything and verify every file.
    Full,
    /// Restore and verify `sample_files` random files.
    Sample,
}

/// `[drill]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillPolicy {
    pub schedule: Option<Schedule>,
    pub pick: DrillPick,
    /// Window for `pick = "random"` (default 30d).
    #[serde(with = "serde_duration")]
    pub within: Duration,
    /// Recovery time objective; a drill slower than this fails. None: not measured against a target.
    #[serde(with = "serde_opt_duration")]
    pub rto: Option<Duration>,
    pub verify_command: Option<VerifyCommand>,
    /// When set, the verify command must also print exactly this on stdout
    /// (both trimmed of surrounding whitespace): `sqlite3 … "PRAGMA
    /// integrity_check"` exits 0 even on a corrupt database and only its
    /// output ("ok") tells. None: the exit status alone decides.
    pub verify_expect_stdout: Option<String>,
    /// Default 10m.
    #[serde(with = "serde_duration")]
    pub verify_timeout: Duration,
    pub mode: DrillMode,
    /// Files verified when `mode = "sample"` (default 100).
    pub sample_files: u32,
    /// Where drills restore to; none: a temporary directory.
    pub scratch: Option<PathBuf>,
    /// Free space that must remain on the scratch file system after the
    /// restore (default 64 MiB); a drill that would eat into it is refused.
    pub scratch_reserve: u64,
}

/// Default `drill.scratch_reserve`.
pub const DEFAULT_SCRATCH_RESERVE: u64 = 64 << 20;

impl Default for DrillPolicy {
    fn default() -> Self {
        DrillPolicy {
            schedule: None,
            pick: DrillPick::Latest,
            within: 30 * DAY,
            rto: None,
            verify_command: None,
            verify_expect_stdout: None,
            verify_timeout: Duration::from_secs(600),
            mode: DrillMode::Full,
            sample_files: 100,
            scratch: None,
            scratch_reserve: DEFAULT_SCRATCH_RESERVE,
        }
    }
}

/// A drill's verify command: argv with placeholders `{dir}` (the restore
/// directory), `{file:NAME}` (the restored file NAME, relative to that
/// directory) and `{tenant}`; `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct VerifyCommand {
    argv: Vec<String>,
    #[serde(skip)]
    parts: Vec<Vec<Part>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Dir,
    File(String),
}

impl VerifyCommand {
    /// Parses argv; on error, the index of the bad argument and why.
    pub fn parse(argv: &[String], tenant: &TenantId) -> Result<VerifyCommand, (usize, String)> {
        if argv.is_empty() {
            return Err((0, "expected a non-empty argv array, e.g. [\"sqlite3\", \"{file:app.db}\", \"PRAGMA integrity_check\"]".into()));
        }
        if argv[0].is_empty() {
            return Err((0, "the program name is empty".into()));
        }
        let parts = argv
            .iter()
            .enumerate()
            .map(|(i, arg)| parse_placeholders(arg, tenant).map_err(|e| (i, e)))
            .collect::<Result<_, _>>()?;
        Ok(VerifyCommand {
            argv: argv.to_vec(),
            parts,
        })
    }

    /// The files named by `{file:NAME}` placeholders, relative to the restore
    /// directory (a sampled drill always restores them).
    pub fn files(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .parts
            .iter()
            .flatten()
            .filter_map(|p| match p {
                Part::File(name) => Some(name.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The argv as written, placeholders unexpanded.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The argv with placeholders filled in for a restore into `restore_dir`.
    pub fn expand(&self, restore_dir: &Path) -> Vec<OsString> {
        self.parts
            .iter()
            .map(|parts| {
                let mut arg = OsString::new();
                for part in parts {
                    match part {
                        Part::Text(t) => arg.push(t),
                        Part::Dir => arg.push(restore_dir.as_os_str()),
                        Part::File(name) => arg.push(restore_dir.join(name).as_os_str()),
                    }
                }
                arg
            })
            .collect()
    }
}

fn parse_placeholders(arg: &str, tenant: &TenantId) -> Result<Vec<Part>, String> {
    if arg.contains('\0') {
        return Err("an argument cannot contain a NUL byte".into());
    }
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find(['{', '}']) {
        text.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            text.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            text.push('}');
            rest = after;
        } else if tail.starts_with('}') {
            return Err(format!(
                "unmatched '}}' in {:?} (write '}}}}' for a literal brace)",
                truncate(arg, 80)
            ));
        } else {
            let Some(end) = tail.find('}') else {
                return Err(format!(
                    "unclosed '{{' in {:?} (write '{{{{' for a literal brace)",
                    truncate(arg, 80)
                ));
            };
            let inner = &tail[1..end];
            let part = match inner {
                "dir" => Part::Dir,
                "tenant" => Part::Text(tenant.to_string()),
                _ => match inner.strip_prefix("file:") {
                    Some(name) => Part::File(check_restored_name(name)?),
                    None => {
                        return Err(format!(
                            "unknown placeholder {{{}}} (known: {{dir}}, {{file:NAME}}, {{tenant}})",
                            truncate(inner, 40)
                        ));
                    }
                },
            };
            if let Part::Text(t) = part {
                text.push_str(&t);
            } else {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(part);
            }
            rest = &tail[end + 1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() || parts.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

/// `{file:NAME}`: a relative path inside the restore, never escaping it.
fn check_restored_name(name: &str) -> Result<String, String> {
    let path = Path::new(name);
    let escapes = path
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)));
    if name.is_empty() || path.is_absolute() || escapes {
        return Err(format!(
            "{{file:{}}}: NAME must be a relative path inside the restore (no leading '/', '.' or '..')",
            truncate(name, 80)
        ));
    }
    Ok(name.to_owned())
}

/// `[rotation]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RotationPolicy {
    /// Rotate the CMK (new backing key material) this often; none: never by custos.
    #[serde(with = "serde_opt_duration")]
    pub cmk_every: Option<Duration>,
    /// Start a new key epoch (fresh TDK) this often (default 30d); none: never.
    #[serde(with = "serde_opt_duration")]
    pub epoch_every: Option<Duration>,
    /// When the daemon checks whether a rotation is due; none: only on demand.
    pub schedule: Option<Schedule>,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        RotationPolicy {
            cmk_every: None,
            epoch_every: Some(30 * DAY),
            schedule: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionState {
    Active,
    /// The tenant is leaving: no new backups; shredded after `grace` unless on legal hold.
    Offboarding,
}

/// `[deletion]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeletionPolicy {
    pub state: DeletionState,
    /// When offboarding was requested; required when offboarding.
    pub requested_at: Option<DateTime<Utc>>,
    /// Time between the request and the shred (default 30d).
    #[serde(with = "serde_duration")]
    pub grace: Duration,
    /// Blocks shredding while true.
    pub legal_hold: bool,
    /// AWS KMS ScheduleKeyDeletion waiting period, 7..=30 days (default 30).
    pub kms_pending_window_days: u32,
}

impl Default for DeletionPolicy {
    fn default() -> Self {
        DeletionPolicy {
            state: DeletionState::Active,
            requested_at: None,
            grace: 30 * DAY,
            legal_hold: false,
            kms_pending_window_days: 30,
        }
    }
}

impl DeletionPolicy {
    /// When the tenant may be shredded: offboarding, not on legal hold, after the grace period.
    pub fn shred_due_at(&self) -> Option<DateTime<Utc>> {
        if self.state != DeletionState::Offboarding || self.legal_hold {
            return None;
        }
        let grace = chrono::Duration::from_std(self.grace).ok()?;
        self.requested_at?.checked_add_signed(grace)
    }
}

// ---------------------------------------------------------------------------
// Building a policy from (layered) TOML.

const TOP_KEYS: &[&str] = &[
    "tenant",
    "key",
    "sources",
    "backup",
    "retention",
    "check",
    "drill",
    "rotation",
    "deletion",
];
const BACKUP_KEYS: &[&str] = &[
    "schedule",
    "compression_level",
    "pack_size",
    "allow_unreadable",
];
const RETENTION_KEYS: &[&str] = &[
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_within",
    "schedule",
    "prune",
];
const CHECK_KEYS: &[&str] = &["schedule", "read_data_fraction"];
const DRILL_KEYS: &[&str] = &[
    "schedule",
    "pick",
    "within",
    "rto",
    "verify_command",
    "verify_expect_stdout",
    "verify_timeout",
    "mode",
    "sample_files",
    "scratch",
    "scratch_reserve",
];
const ROTATION_KEYS: &[&str] = &["cmk_every", "epoch_every", "schedule"];
const DELETION_KEYS: &[&str] = &[
    "state",
    "requested_at",
    "grace",
    "legal_hold",
    "kms_pending_window_days",
];
const SOURCE_TYPES: &str = "\"path\", \"command\" or \"object_store\"";

/// What is being built: a tenant's policy (its file name without `.toml`, if
/// any, must equal the tenant), or `defaults.toml` on its own.
#[derive(Clone, Copy)]
pub(crate) enum Mode<'m> {
    Tenant { file_stem: Option<&'m str> },
    Defaults,
}

/// A built policy plus where its key was written, for cross-file checks.
pub(crate) struct Built {
    pub policy: Policy,
    /// File number and offset of the `key` value.
    pub key_at: (usize, usize),
}

/// Stand-in tenant id for `{tenant}` while checking `defaults.toml` alone or a
/// file whose own tenant id is invalid.
const PLACEHOLDER_TENANT: &str = "tenant";

/// Builds one policy from `root` (tenant layer first, then defaults). Every
/// problem goes to `d`; `None` when there was any. `bases[i]` is the directory
/// relative paths of file `i` are resolved against.
pub(crate) fn build(
    d: &mut Diags<'_>,
    root: &Table<'_>,
    mode: Mode<'_>,
    bases: &[PathBuf],
) -> Option<Built> {
    let errors_before = d.errors.len();
    let tenant_mode = matches!(mode, Mode::Tenant { .. });
    root.check_keys(d, TOP_KEYS);

    let tenant = match mode {
        Mode::Defaults => {
            if let Some(item) = root.get_top("tenant") {
                d.err(&item, "not allowed in defaults.toml (defaults apply to every tenant; name each tenant in its own file)");
            }
            None
        }
        Mode::Tenant { file_stem } => parse_tenant(d, root, file_stem),
    };
    let placeholder = TenantId::new(PLACEHOLDER_TENANT).expect("valid placeholder");
    let tid = tenant.as_ref().map(|(t, _)| t).unwrap_or(&placeholder);
    let sub = |s: &str| s.replace("{tenant}", tid.as_str());

    let key = match root.get("key") {
        None => {
            if tenant_mode {
                d.missing(
                    root,
                    "key",
                    "e.g. key = \"local:acme\" or key = \"aws-kms:alias/custos-acme\"",
                );
            }
            None
        }
        Some(item) => d.str(&item).and_then(|raw| match KeyRef::parse(&sub(raw)) {
            Ok(k) => Some((k, (item.file, item.start))),
            Err(e) => {
                d.err(
                    &item,
                    format!(
                        "invalid key reference {:?}: {}",
                        truncate(raw, 100),
                        e.reason
                    ),
                );
                None
            }
        }),
    };

    let sources = parse_sources(d, root, tenant_mode, &sub, bases);
    let backup_section = root.section(d, "backup");
    let backup = parse_backup(d, &backup_section);
    let section = root.section(d, "retention");
    let retention = parse_retention(d, &section);
    let section = root.section(d, "check");
    let check = parse_check(d, &section);
    let section = root.section(d, "drill");
    let drill = parse_drill(d, &section, tid, &sub, bases);
    let section = root.section(d, "rotation");
    let rotation = parse_rotation(d, &section);
    let section = root.section(d, "deletion");
    let deletion = parse_deletion(d, &section, mode);

    let backup_schedule_set = backup_section.get("schedule").is_some();
    if tenant_mode && !backup_schedule_set && d.errors.len() == errors_before {
        let (file, _) = root.anchor.unwrap_or((0, None));
        d.warn(
            file,
            None,
            "backup.schedule: not set; this tenant is backed up only on demand (custos backup)",
        );
    }
    if d.errors.len() != errors_before {
        return None;
    }
    let ((tenant, tenant_at), (key, key_at)) = (tenant?, key?);
    let file = d.files[tenant_at.0].path.clone();
    Some(Built {
        policy: Policy {
            tenant,
            key,
            sources,
            backup,
            retention,
            check,
            drill,
            rotation,
            deletion,
            file,
        },
        key_at,
    })
}

fn parse_tenant(
    d: &mut Diags<'_>,
    root: &Table<'_>,
    file_stem: Option<&str>,
) -> Option<(TenantId, (usize, usize))> {
    let Some(item) = root.get_top("tenant") else {
        d.missing(
            root,
            "tenant",
            "every policy names its tenant, e.g. tenant = \"acme\"",
        );
        return None;
    };
    let text = d.str(&item)?;
    let tenant = match TenantId::new(text) {
        Ok(t) => t,
        Err(e) => {
            d.err(&item, e);
            return None;
        }
    };
    if let Some(stem) = file_stem
        && stem != tenant.as_str()
    {
        d.err(
            &item,
            format!(
                "{:?} does not match the file name {:?}; a tenant's policy file must be named {tenant}.toml",
                tenant.as_str(),
                truncate(&format!("{stem}.toml"), 80)
            ),
        );
        return None;
    }
    Some((tenant, (item.file, item.start)))
}

fn parse_sources(
    d: &mut Diags<'_>,
    root: &Table<'_>,
    tenant_mode: bool,
    sub: &dyn Fn(&str) -> String,
    bases: &[PathBuf],
) -> Vec<SourceSpec> {
    let Some((item, tables)) = root.array_of_tables(d, "sources") else {
        if tenant_mode {
            d.missing(
                root,
                "sources",
                &format!("a policy backs up at least one source: add a [[sources]] table with type = {SOURCE_TYPES}"),
            );
        }
        return Vec::new();
    };
    if tenant_mode && matches!(item.value, DeValue::Array(a) if a.is_empty()) {
        d.err(&item, "at least one source is required");
    }
    let mut out = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for t in &tables {
        let Some((source, at)) = parse_source(d, t, sub, bases) else {
            continue;
        };
        if let Some(first) = seen.get(source.name()) {
            d.error(
                at.0,
                Some(at.1),
                format!(
                    "{}.name: duplicate source name {:?} (also used by {first}); names must be unique per tenant",
                    t.path,
                    source.name()
                ),
            );
            continue;
        }
        seen.insert(source.name().to_owned(), t.path.clone());
        if let SourceSpec::Path { path, .. } = &source
            && tenant_mode
            && !path.exists()
            && let Some(path_item) = t.get("path")
        {
            d.warn(
                path_item.file,
                Some(path_item.start),
                format!(
                    "{}.path: {} does not exist (yet); backups fail until it does",
                    t.path,
                    path.display()
                ),
            );
        }
        out.push(source);
    }
    out
}

/// One `[[sources]]` entry, and where its name (or path, when the name is derived) was written.
fn parse_source(
    d: &mut Diags<'_>,
    t: &Table<'_>,
    sub: &dyn Fn(&str) -> String,
    bases: &[PathBuf],
) -> Option<(SourceSpec, (usize, usize))> {
    let Some(ty_item) = t.get("type") else {
        d.missing(t, "type", &format!("one of {SOURCE_TYPES}"));
        return None;
    };
    let ty = d.str(&ty_item)?;
    let name_of = |d: &mut Diags<'_>| source_name(d, t, sub);
    let required = |d: &mut Diags<'_>, key: &str, hint: &str| required(d, t, key, hint);
    match ty {
        "path" => {
            t.check_keys(d, &["type", "name", "path", "exclude", "one_file_system"]);
            let name = name_of(d);
            let path_item = required(
                d,
                "path",
                "the directory to back up, e.g. path = \"/srv/tenants/acme\"",
            )?;
            let raw = d.str(&path_item)?;
            let text = sub(raw);
            if let Err(e) = check_path_text(&text) {
                d.err(&path_item, e);
                return None;
            }
            let path = resolve(&bases[path_item.file], &text);
            let mut exclude = Vec::new();
            if let Some(item) = t.get("exclude") {
                for (element, pattern) in d.str_array(&item).unwrap_or_default() {
                    match compile_exclude(pattern) {
                        Ok(_) => exclude.push(pattern.to_owned()),
                        Err(e) => d.err(&element, e),
                    }
                }
            }
            let one_file_system = t
                .get("one_file_system")
                .and_then(|i| d.bool(&i))
                .unwrap_or(false);
            let (name, at) = match name? {
                Some((name, item)) => (name, (item.file, item.start)),
                None => {
                    let derived = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
                    match derived.filter(|n| validate_source_name(n).is_ok()) {
                        Some(n) => (n, (path_item.file, path_item.start)),
                        None => {
                            d.err(
                                &path_item,
                                format!(
                                    "cannot name this source after {:?}: set name = \"…\" ([A-Za-z0-9._-]+)",
                                    truncate(&path.display().to_string(), 80)
                                ),
                            );
                            return None;
                        }
                    }
                }
            };
            Some((
                SourceSpec::Path {
                    name,
                    path,
                    exclude,
                    one_file_system,
                },
                at,
            ))
        }
        "command" => {
            t.check_keys(d, &["type", "name", "command", "timeout"]);
            let name = name_of(d);
            let cmd_item = required(
                d,
                "command",
                "the argv to run, e.g. command = [\"pg_dump\", \"-Fc\", \"acme\"]",
            );
            let timeout = t.get("timeout").and_then(|i| d.positive_duration(&i));
            let name = name?;
            let Some((name, name_item)) = name else {
                d.missing(
                    t,
                    "name",
                    "the file name the output is stored under, e.g. name = \"db.dump\"",
                );
                return None;
            };
            let cmd_item = cmd_item?;
            let elements = d.str_array(&cmd_item)?;
            if elements.is_empty() {
                d.err(
                    &cmd_item,
                    "expected a non-empty argv array, e.g. [\"pg_dump\", \"-Fc\", \"acme\"]",
                );
                return None;
            }
            let mut argv = Vec::with_capacity(elements.len());
            for (i, (element, arg)) in elements.iter().enumerate() {
                if arg.contains('\0') {
                    d.err(element, "an argument cannot contain a NUL byte");
                } else if i == 0 && arg.is_empty() {
                    d.err(element, "the program name is empty");
                }
                argv.push(sub(arg));
            }
            Some((
                SourceSpec::Command {
                    name,
                    argv,
                    timeout,
                },
                (name_item.file, name_item.start),
            ))
        }
        "object_store" => {
            t.check_keys(d, &["type", "name", "url"]);
            let name = name_of(d);
            let url_item = required(d, "url", "e.g. url = \"s3://attachments/acme/\"")?;
            let url = sub(d.str(&url_item)?);
            let derived = match parse_s3_url(&url) {
                Ok((bucket, prefix)) => prefix
                    .rsplit('/')
                    .next()
                    .filter(|s| !s.is_empty())
                    .unwrap_or(bucket.as_str())
                    .to_owned(),
                Err(e) => {
                    let e = if url.starts_with("s3://") {
                        e
                    } else {
                        format!(
                            "expected an s3://bucket/prefix URL, found {:?}",
                            truncate(&url, 80)
                        )
                    };
                    d.err(&url_item, e);
                    return None;
                }
            };
            let (name, at) = match name? {
                Some((name, item)) => (name, (item.file, item.start)),
                None if validate_source_name(&derived).is_ok() => {
                    (derived, (url_item.file, url_item.start))
                }
                None => {
                    d.err(
                        &url_item,
                        format!(
                            "cannot name this source after {:?}: set name = \"…\"",
                            truncate(&derived, 80)
                        ),
                    );
                    return None;
                }
            };
            Some((SourceSpec::ObjectStore { name, url }, at))
        }
        other => {
            d.err(
                &ty_item,
                format!(
                    "unknown source type {:?} (expected {SOURCE_TYPES})",
                    truncate(other, 40)
                ),
            );
            None
        }
    }
}

/// The optional `name` of a source: `Some(None)` when absent, `None` when invalid.
fn source_name<'a>(
    d: &mut Diags<'_>,
    t: &Table<'a>,
    sub: &dyn Fn(&str) -> String,
) -> Option<Option<(String, Item<'a>)>> {
    let Some(item) = t.get("name") else {
        return Some(None);
    };
    let name = sub(d.str(&item)?);
    match validate_source_name(&name) {
        Ok(()) => Some(Some((name, item))),
        Err(e) => {
            d.err(&item, e);
            None
        }
    }
}

/// A required key of `t`, reported as missing when absent.
fn required<'a>(d: &mut Diags<'_>, t: &Table<'a>, key: &str, hint: &str) -> Option<Item<'a>> {
    let item = t.get(key);
    if item.is_none() {
        d.missing(t, key, hint);
    }
    item
}

/// Reads `key` from `t` with `f` when present.
fn opt<T>(
    d: &mut Diags<'_>,
    t: &Table<'_>,
    key: &str,
    f: impl FnOnce(&mut Diags<'_>, &Item<'_>) -> Option<T>,
) -> Option<T> {
    let item = t.get(key)?;
    f(d, &item)
}

/// A duration of at least `min`.
fn duration_at_least(d: &mut Diags<'_>, item: &Item<'_>, min: Duration) -> Option<Duration> {
    let v = d.duration(item)?;
    if v < min {
        d.err(
            item,
            format!(
                "must be at least {}, found {}",
                format_duration(min),
                format_duration(v)
            ),
        );
        return None;
    }
    Some(v)
}

fn count(d: &mut Diags<'_>, item: &Item<'_>) -> Option<u32> {
    d.uint(item, u64::from(u32::MAX)).map(|n| n as u32)
}

fn parse_backup(d: &mut Diags<'_>, t: &Table<'_>) -> BackupPolicy {
    t.check_keys(d, BACKUP_KEYS);
    let schedule = opt(d, t, "schedule", |d, i| d.schedule(i));
    let mut b = BackupPolicy {
        schedule,
        ..BackupPolicy::default()
    };
    if let Some(level) = opt(d, t, "compression_level", |d, i| d.int_in(i, 1, 19)) {
        b.compression_level = level as i32;
    }
    if let Some(item) = t.get("pack_size")
        && let Some(size) = d.size(&item)
    {
        if (MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&size) {
            b.pack_size = size;
        } else {
            d.err(
                &item,
                format!(
                    "must be from 4 MiB to 128 MiB, found {}",
                    super::units::format_size(size)
                ),
            );
        }
    }
    if let Some(v) = opt(d, t, "allow_unreadable", |d, i| d.bool(i)) {
        b.allow_unreadable = v;
    }
    b
}

fn parse_retention(d: &mut Diags<'_>, t: &Table<'_>) -> RetentionPolicy {
    t.check_keys(d, RETENTION_KEYS);
    let mut r = RetentionPolicy::default();
    let mut ok = true;
    for (key, slot) in [
        ("keep_last", &mut r.rules.keep_last),
        ("keep_hourly", &mut r.rules.keep_hourly),
        ("keep_daily", &mut r.rules.keep_daily),
        ("keep_weekly", &mut r.rules.keep_weekly),
        ("keep_monthly", &mut r.rules.keep_monthly),
        ("keep_yearly", &mut r.rules.keep_yearly),
    ] {
        if let Some(item) = t.get(key) {
            match count(d, &item) {
                Some(n) => *slot = n,
                None => ok = false,
            }
        }
    }
    if let Some(item) = t.get("keep_within") {
        r.rules.keep_within = d.duration(&item);
        ok &= r.rules.keep_within.is_some();
    }
    r.schedule = opt(d, t, "schedule", |d, i| d.schedule(i));
    if let Some(v) = opt(d, t, "prune", |d, i| d.bool(i)) {
        r.prune = v;
    }
    if ok && let Err(e) = r.rules.validate() {
        let (file, offset) = t.anchor.unwrap_or((0, None));
        d.error(file, offset, format!("retention: {e}"));
    }
    r
}

fn parse_check(d: &mut Diags<'_>, t: &Table<'_>) -> CheckPolicy {
    t.check_keys(d, CHECK_KEYS);
    let schedule = opt(d, t, "schedule", |d, i| d.schedule(i));
    let mut c = CheckPolicy {
        schedule,
        ..CheckPolicy::default()
    };
    if let Some(item) = t.get("read_data_fraction")
        && let Some(f) = d.float(&item)
    {
        if (0.0..=1.0).contains(&f) {
            c.read_data_fraction = f;
        } else {
            d.err(
                &item,
                format!("must be from 0 to 1 (a fraction of the packs), found {f}"),
            );
        }
    }
    c
}

fn parse_drill(
    d: &mut Diags<'_>,
    t: &Table<'_>,
    tenant: &TenantId,
    sub: &dyn Fn(&str) -> String,
    bases: &[PathBuf],
) -> DrillPolicy {
    t.check_keys(d, DRILL_KEYS);
    let schedule = opt(d, t, "schedule", |d, i| d.schedule(i));
    let mut p = DrillPolicy {
        schedule,
        ..DrillPolicy::default()
    };
    if let Some(item) = &t.get("pick")
        && let Some(text) = d.str(item)
    {
        match text {
            "latest" => p.pick = DrillPick::Latest,
            "random" => p.pick = DrillPick::Random,
            other => d.err(
                item,
                format!(
                    "expected \"latest\" or \"random\", found {:?}",
                    truncate(other, 40)
                ),
            ),
        }
    }
    if let Some(v) = opt(d, t, "within", |d, i| d.positive_duration(i)) {
        p.within = v;
    }
    p.rto = opt(d, t, "rto", |d, i| d.positive_duration(i));
    if let Some(item) = t.get("verify_command")
        && let Some(elements) = d.str_array(&item)
    {
        let argv: Vec<String> = elements.iter().map(|(_, s)| (*s).to_owned()).collect();
        match VerifyCommand::parse(&argv, tenant) {
            Ok(cmd) => p.verify_command = Some(cmd),
            Err((i, e)) => match elements.get(i) {
                Some((element, _)) => d.err(element, e),
                None => d.err(&item, e),
            },
        }
    }
    if let Some(item) = t.get("verify_expect_stdout")
        && let Some(text) = d.str(&item)
    {
        if text.contains('\0') {
            d.err(&item, "cannot contain a NUL byte");
        } else if p.verify_command.is_none() && t.get("verify_command").is_none() {
            d.err(
                &item,
                "needs a verify_command whose output it judges (e.g. [\"sqlite3\", \"{file:app.db}\", \"PRAGMA integrity_check\"])",
            );
        } else {
            p.verify_expect_stdout = Some(text.to_owned());
        }
    }
    if let Some(v) = opt(d, t, "verify_timeout", |d, i| d.positive_duration(i)) {
        p.verify_timeout = v;
    }
    if let Some(item) = t.get("mode")
        && let Some(text) = d.str(&item)
    {
        match text {
            "full" => p.mode = DrillMode::Full,
            "sample" => p.mode = DrillMode::Sample,
            other => d.err(
                &item,
                format!(
                    "expected \"full\" or \"sample\", found {:?}",
                    truncate(other, 40)
                ),
            ),
        }
    }
    if let Some(item) = t.get("sample_files")
        && let Some(n) = count(d, &item)
    {
        if n == 0 {
            d.err(&item, "must be at least 1");
        } else {
            p.sample_files = n;
        }
    }
    if let Some(item) = t.get("scratch")
        && let Some(raw) = d.str(&item)
    {
        let text = sub(raw);
        match check_path_text(&text) {
            Ok(()) => p.scratch = Some(resolve(&bases[item.file], &text)),
            Err(e) => d.err(&item, e),
        }
    }
    if let Some(v) = opt(d, t, "scratch_reserve", |d, i| d.size(i)) {
        p.scratch_reserve = v;
    }
    p
}

fn parse_rotation(d: &mut Diags<'_>, t: &Table<'_>) -> RotationPolicy {
    t.check_keys(d, ROTATION_KEYS);
    let mut r = RotationPolicy::default();
    // AWS limits on-demand rotations per key, and every rotation re-wraps every
    // envelope: more often than daily is a mistake.
    if let Some(item) = t.get("cmk_every") {
        r.cmk_every = duration_at_least(d, &item, DAY);
    }
    if let Some(item) = t.get("epoch_every") {
        r.epoch_every = duration_at_least(d, &item, Duration::from_secs(3_600));
    }
    r.schedule = opt(d, t, "schedule", |d, i| d.schedule(i));
    r
}

fn parse_deletion(d: &mut Diags<'_>, t: &Table<'_>, mode: Mode<'_>) -> DeletionPolicy {
    t.check_keys(d, DELETION_KEYS);
    let mut p = DeletionPolicy::default();
    if matches!(mode, Mode::Defaults) {
        // Offboarding every tenant at once from defaults.toml is never what was meant.
        for key in ["state", "requested_at"] {
            if let Some(item) = t.get(key) {
                d.err(
                    &item,
                    "not allowed in defaults.toml (offboarding is decided per tenant)",
                );
            }
        }
    }
    let state_item = t.get("state");
    if let Some(item) = &state_item
        && let Some(text) = d.str(item)
    {
        match text {
            "active" => p.state = DeletionState::Active,
            "offboarding" => p.state = DeletionState::Offboarding,
            other => d.err(
                item,
                format!(
                    "expected \"active\" or \"offboarding\", found {:?}",
                    truncate(other, 40)
                ),
            ),
        }
    }
    let requested_item = t.get("requested_at");
    if let Some(item) = &requested_item {
        let text = match item.value {
            DeValue::Datetime(dt) => Some(dt.to_string()),
            DeValue::String(s) => Some(s.to_string()),
            other => {
                d.err(
                    item,
                    format!(
                        "expected an RFC 3339 date-time, found {}",
                        super::walk::describe(other)
                    ),
                );
                None
            }
        };
        if let Some(text) = text {
            match DateTime::parse_from_rfc3339(&text) {
                Ok(t) => p.requested_at = Some(t.with_timezone(&Utc)),
                Err(_) => d.err(
                    item,
                    format!(
                        "expected an RFC 3339 date-time with a time zone, e.g. 2026-11-01T00:00:00Z, found {:?}",
                        truncate(&text, 40)
                    ),
                ),
            }
        }
    }
    if let Some(v) = opt(d, t, "grace", |d, i| d.duration(i)) {
        p.grace = v;
    }
    if let Some(v) = opt(d, t, "legal_hold", |d, i| d.bool(i)) {
        p.legal_hold = v;
    }
    if let Some(n) = opt(d, t, "kms_pending_window_days", |d, i| d.int_in(i, 7, 30)) {
        p.kms_pending_window_days = n as u32;
    }
    if p.state == DeletionState::Offboarding
        && requested_item.is_none()
        && let Some(item) = &state_item
    {
        d.error(
            item.file,
            Some(item.start),
            "deletion.requested_at: missing; required when deletion.state = \"offboarding\" (e.g. requested_at = \"2026-11-01T00:00:00Z\")",
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn verify_command_placeholders() {
        let cmd = VerifyCommand::parse(
            &args(&[
                "sqlite3",
                "{file:data/app.db}",
                "PRAGMA integrity_check",
                "--dir={dir}",
                "{tenant}-{{x}}",
            ]),
            &tenant(),
        )
        .unwrap();
        let out = cmd.expand(Path::new("/scratch/r1"));
        assert_eq!(
            out,
            [
                "sqlite3",
                "/scratch/r1/data/app.db",
                "PRAGMA integrity_check",
                "--dir=/scratch/r1",
                "acme-{x}"
            ]
            .map(OsString::from)
        );
        assert_eq!(cmd.argv()[1], "{file:data/app.db}");
        assert_eq!(serde_json::to_value(&cmd).unwrap()[4], "{tenant}-{{x}}");
    }

    #[test]
    fn verify_command_refuses_bad_placeholders() {
        for (argv, at, why) in [
            (&["x", "{files:a}"][..], 1, "unknown placeholder {files:a}"),
            (&["x", "{dir"][..], 1, "unclosed '{'"),
            (&["x", "a}"][..], 1, "unmatched '}'"),
            (&["x", "{file:}"][..], 1, "NAME must be a relative path"),
            (
                &["x", "{file:../etc/passwd}"][..],
                1,
                "NAME must be a relative path",
            ),
            (
                &["x", "{file:/etc/passwd}"][..],
                1,
                "NAME must be a relative path",
            ),
            (&["", "x"][..], 0, "program name is empty"),
            (&[][..], 0, "non-empty argv"),
        ] {
            let (i, e) = VerifyCommand::parse(&args(argv), &tenant()).unwrap_err();
            assert_eq!(i, at, "{argv:?}");
            assert!(e.contains(why), "{argv:?}: {e}");
        }
    }

    #[test]
    fn excludes_match_like_gitignore() {
        let set = PathGlobs::new(&args(&["*.tmp", "cache/**", "/build", "logs/"])).unwrap();
        for yes in [
            "a.tmp",
            "deep/er/b.tmp",
            "cache/x",
            "cache/y/z",
            "build",
            "logs",
        ] {
            assert!(set.is_match(Path::new(yes)), "{yes}");
        }
        for no in ["a.tmpx", "src/cache/x", "src/build", "cache", "tmp"] {
            assert!(!set.is_match(Path::new(no)), "{no}");
        }
        let err = PathGlobs::new(&args(&["a[b"])).unwrap_err();
        assert!(
            err.starts_with("invalid glob \"a[b\": unclosed character class"),
            "{err}"
        );
        assert!(PathGlobs::new(&args(&[""])).is_err());
    }

    #[test]
    fn source_names() {
        for ok in ["docs", "db.dump", "A_b-9", "..."] {
            assert!(validate_source_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"a".repeat(256)] {
            assert!(validate_source_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keep_rules_that_keep_nothing_are_refused() {
        let mut r = KeepRules::default();
        assert!(r.keeps_nothing());
        assert!(r.validate().unwrap_err().contains("keeps no snapshot"));
        r.keep_daily = 7;
        assert!(r.validate().is_ok());
        let within = KeepRules {
            keep_within: Some(DAY),
            ..KeepRules::default()
        };
        assert!(!within.keeps_nothing());
        assert!(!RetentionPolicy::default().rules.keeps_nothing());
    }

    #[test]
    fn shred_due_date() {
        let requested = DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut p = DeletionPolicy {
            state: DeletionState::Offboarding,
            requested_at: Some(requested),
            ..Default::default()
        };
        assert_eq!(
            p.shred_due_at().unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        p.legal_hold = true;
        assert_eq!(p.shred_due_at(), None);
        assert_eq!(DeletionPolicy::default().shred_due_at(), None);
    }
}
