//! Loading the policies directory: every `*.toml` but `defaults.toml` is one
//! tenant (sorted by file name), merged over `defaults.toml` when present.
//!
//! Problems are collected across all files before anything is refused, so an
//! operator sees every mistake at once (`custos policy validate`), and a
//! daemon reloading on SIGHUP can refuse a bad set whole and keep the old one.
//! Files whose names start with '.' (editor lock and swap files) and
//! subdirectories are ignored.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Spanned;
use toml::de::DeTable;

use super::diag::{PolicyError, PolicyErrors, SourceText};
use super::paths::base_dir_of;
use super::policy::{Built, Mode, Policy, build};
use super::walk::{Diags, Table};
use crate::keys::KeyRef;
use crate::secure_fs;
use crate::tenant::TenantId;

/// The file in a policies directory whose values every tenant inherits.
pub const DEFAULTS_FILE: &str = "defaults.toml";

/// Every tenant's policy, as loaded from one directory.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySet {
    pub dir: PathBuf,
    pub policies: BTreeMap<TenantId, Policy>,
    /// Every file read (defaults.toml included), with its content hash.
    pub files: Vec<PolicyFile>,
    /// Problems that do not invalidate the set (a source directory missing, no schedule).
    pub warnings: Vec<PolicyError>,
}

/// A file a [`PolicySet`] was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyFile {
    pub path: PathBuf,
    /// BLAKE3 of the file's bytes, hex.
    pub blake3: String,
    /// The tenant the file defines; `None` for defaults.toml.
    pub tenant: Option<TenantId>,
}

/// How a reloaded set differs from the running one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyChanges {
    pub added: Vec<TenantId>,
    pub removed: Vec<TenantId>,
    pub changed: Vec<TenantId>,
}

impl PolicyChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl PolicySet {
    pub fn get(&self, tenant: &TenantId) -> Option<&Policy> {
        self.policies.get(tenant)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &TenantId> {
        self.policies.keys()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// True when the same files with the same contents were read: a reload can stop here.
    pub fn same_files(&self, other: &PolicySet) -> bool {
        self.files == other.files
    }

    /// Tenants added, removed, or whose effective policy changed (through their
    /// own file or defaults.toml), from `old` to `self`.
    pub fn changes_from(&self, old: &PolicySet) -> PolicyChanges {
        let mut changes = PolicyChanges::default();
        for (tenant, policy) in &self.policies {
            match old.policies.get(tenant) {
                None => changes.added.push(tenant.clone()),
                Some(before) if before != policy => changes.changed.push(tenant.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .policies
            .keys()
            .filter(|t| !self.policies.contains_key(*t))
            .cloned()
            .collect();
        changes
    }
}

/// Loads and validates every policy in `dir`. Any error anywhere refuses the
/// whole set, with every error listed.
pub fn load_policies(dir: &Path) -> Result<PolicySet, PolicyErrors> {
    let outcome = load(dir, None);
    if !outcome.errors.is_empty() {
        return Err(PolicyErrors::new(outcome.errors));
    }
    Ok(PolicySet {
        dir: dir.to_path_buf(),
        policies: outcome
            .built
            .into_iter()
            .map(|b| (b.policy.tenant.clone(), b.policy))
            .collect(),
        files: outcome.files,
        warnings: sorted(outcome.warnings),
    })
}

/// Loads one tenant's policy file (a name in `dir`, or a path) over `dir`'s
/// defaults.toml. Checks across tenants (duplicate ids, shared keys) are
/// [`load_policies`]'s.
pub fn load_policy_file(dir: &Path, file: &Path) -> Result<Policy, PolicyErrors> {
    let path = dir.join(file);
    if path.file_name().is_some_and(|n| n == DEFAULTS_FILE) {
        return Err(PolicyErrors::new(vec![PolicyError::file(
            path,
            "defaults.toml holds the defaults of every tenant; it is not a tenant policy",
        )]));
    }
    let mut outcome = load(dir, Some(&path));
    match (outcome.errors.is_empty(), outcome.built.pop()) {
        (true, Some(built)) => Ok(built.policy),
        _ => Err(PolicyErrors::new(outcome.errors)),
    }
}

/// The key one policy file names, read leniently: only `tenant` and `key`
/// (falling back to defaults.toml's `key`, with `{tenant}` substituted), so a
/// file that fails validation for any other reason still says which key its
/// tenant uses. What the key-ownership checks read (`repo::ownership`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredKey {
    pub file: PathBuf,
    /// The file's `tenant`, else its file name without `.toml`.
    pub tenant: TenantId,
    pub key: KeyRef,
}

/// Every tenant file's key in `dir` ([`DeclaredKey`]), and the files whose
/// tenant or key could not be read at all (with why). A missing directory
/// declares nothing.
pub fn declared_keys(dir: &Path) -> (Vec<DeclaredKey>, Vec<(PathBuf, String)>) {
    declared_keys_cached(dir, &DeclaredKeysCache::default())
}

/// [`declared_keys`], reusing what `cache` read of a file while the file is
/// unchanged (see [`DeclaredKeysCache`]).
pub fn declared_keys_cached(
    dir: &Path,
    cache: &DeclaredKeysCache,
) -> (Vec<DeclaredKey>, Vec<(PathBuf, String)>) {
    let mut keys = Vec::new();
    let mut unreadable = Vec::new();
    let (tenant_paths, defaults_path) = match scan(dir) {
        Ok(found) => found,
        Err(_) if !dir.exists() => return (keys, unreadable),
        Err(e) => {
            unreadable.push((dir.to_path_buf(), e.to_string()));
            return (keys, unreadable);
        }
    };
    let default_key = defaults_path
        .as_deref()
        .and_then(|p| cache.fields(p).ok())
        .and_then(|f| f.key.clone());
    for path in tenant_paths {
        let fields = match cache.fields(&path) {
            Ok(f) => f,
            Err(e) => {
                unreadable.push((path, e));
                continue;
            }
        };
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_owned();
        let raw_tenant = fields.tenant.clone().unwrap_or(stem);
        let Ok(tenant) = TenantId::new(&raw_tenant) else {
            unreadable.push((
                path,
                format!("tenant {raw_tenant:?} is not a valid tenant id"),
            ));
            continue;
        };
        let raw_key = fields.key.clone().or_else(|| default_key.clone());
        match raw_key.map(|k| KeyRef::parse(&k.replace("{tenant}", tenant.as_str()))) {
            Some(Ok(key)) => keys.push(DeclaredKey {
                file: path,
                tenant,
                key,
            }),
            Some(Err(e)) => unreadable.push((path, e.to_string())),
            None => unreadable.push((path, "names no key".into())),
        }
    }
    (keys, unreadable)
}

/// The two values of a policy file the key checks read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFields {
    pub tenant: Option<String>,
    pub key: Option<String>,
}

/// What [`declared_keys_cached`] read of each policy file, reused while the
/// file's device, inode, size, mtime and ctime are those it had: any write,
/// rename over it or relinked symlink target changes one of them. A file
/// changed within a second before it was read is not kept (a second write
/// in the same clock tick could leave all five equal: git's "racily clean"
/// entries), so it is read again next time.
#[derive(Debug, Default)]
pub struct DeclaredKeysCache {
    files: std::sync::Mutex<HashMap<PathBuf, (FileStamp, std::sync::Arc<KeyFields>)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the file's last change is at least a second older than `now`.
    fn settled(&self, now: std::time::SystemTime) -> bool {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.ctime.0 < now - 1
    }
}

impl DeclaredKeysCache {
    /// `tenant` and `key` of one policy file (following symlinks, as the
    /// policy loader does).
    pub fn fields(&self, path: &Path) -> Result<std::sync::Arc<KeyFields>, String> {
        let now = std::time::SystemTime::now();
        let stamp = FileStamp::of(&std::fs::metadata(path).map_err(|e| e.to_string())?);
        if let Some((s, f)) = self.lock().get(path)
            && *s == stamp
        {
            return Ok(f.clone());
        }
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let table = text.parse::<toml::Table>().map_err(|e| e.to_string())?;
        let text_of = |k: &str| table.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let fields = std::sync::Arc::new(KeyFields {
            tenant: text_of("tenant"),
            key: text_of("key"),
        });
        // Read after the stat: a write in between leaves a stamp older than
        // the content, which the next stat no longer matches.
        let mut files = self.lock();
        if stamp.settled(now) {
            files.insert(path.to_owned(), (stamp, fields.clone()));
        } else {
            files.remove(path);
        }
        Ok(fields)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (FileStamp, std::sync::Arc<KeyFields>)>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What `custos policy validate [DIR]` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub dir: PathBuf,
    /// Tenants whose policy is valid on its own.
    pub tenants: Vec<TenantSummary>,
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<PolicyError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantSummary {
    pub tenant: TenantId,
    pub file: PathBuf,
    pub key: KeyRef,
    pub sources: Vec<String>,
    pub backup_schedule: Option<String>,
}

impl ValidationReport {
    /// True when there is no error (warnings allowed): the exit status of `policy validate`.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tenants {
            let schedule = t.backup_schedule.as_deref().unwrap_or("on demand");
            writeln!(
                f,
                "ok       {} ({}): key {}, sources {}, backup {}",
                t.tenant,
                t.file.display(),
                t.key,
                t.sources.join(", "),
                schedule
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "warning  {w}")?;
        }
        for e in &self.errors {
            writeln!(f, "error    {e}")?;
        }
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        write!(
            f,
            "{}: {} valid, {}, {}",
            self.dir.display(),
            plural(self.tenants.len(), "tenant"),
            plural(self.errors.len(), "error"),
            plural(self.warnings.len(), "warning")
        )
    }
}

/// Validates every policy in `dir`, listing the valid tenants and every error.
pub fn validate_dir(dir: &Path) -> ValidationReport {
    validate_dir_under(dir, &super::ResidencyRules::default())
}

/// [`validate_dir`], also refusing a tenant whose key is outside `[residency]`.
pub fn validate_dir_under(dir: &Path, rules: &super::ResidencyRules) -> ValidationReport {
    let mut outcome = load(dir, None);
    let (inside, outside): (Vec<Built>, Vec<Built>) = outcome
        .built
        .into_iter()
        .partition(|b| rules.check_policy(&b.policy).is_ok());
    outcome.built = inside;
    outcome.errors.extend(
        outside
            .iter()
            .filter_map(|b| rules.check_policy(&b.policy).err()),
    );
    let tenants = outcome
        .built
        .iter()
        .map(|b| TenantSummary {
            tenant: b.policy.tenant.clone(),
            file: b.policy.file.clone(),
            key: b.policy.key.clone(),
            sources: b
                .policy
                .sources
                .iter()
                .map(|s| s.name().to_owned())
                .collect(),
            backup_schedule: b.policy.backup.schedule.as_ref().map(|s| s.to_string()),
        })
        .collect();
    ValidationReport {
        dir: dir.to_path_buf(),
        tenants,
        errors: PolicyErrors::new(outcome.errors).into_errors(),
        warnings: sorted(outcome.warnings),
    }
}

fn sorted(mut v: Vec<PolicyError>) -> Vec<PolicyError> {
    v.sort();
    v.dedup();
    v
}

struct Outcome {
    /// Policies that are valid on their own (cross-file conflicts are in `errors`).
    built: Vec<Built>,
    files: Vec<PolicyFile>,
    errors: Vec<PolicyError>,
    warnings: Vec<PolicyError>,
}

/// The directory's tenant files (sorted) and its defaults.toml, if any.
fn scan(dir: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>), PolicyError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| PolicyError::file(dir, format!("cannot read the policies directory: {e}")))?;
    let mut tenants = Vec::new();
    let mut defaults = None;
    for entry in entries {
        let entry = entry.map_err(|e| {
            PolicyError::file(dir, format!("cannot list the policies directory: {e}"))
        })?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(PolicyError::file(
                dir.join(&name),
                "file name is not valid UTF-8",
            ));
        };
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        let path = dir.join(name);
        // Follows symlinks: a linked policy file counts, a directory named x.toml does not.
        if !path.is_file() {
            continue;
        }
        if name == DEFAULTS_FILE {
            defaults = Some(path);
        } else {
            tenants.push(path);
        }
    }
    tenants.sort();
    Ok((tenants, defaults))
}

/// A refused or unreadable policies path, as a file-level policy error.
fn check_error(path: &Path, cannot: &str, e: secure_fs::CheckError) -> PolicyError {
    match e {
        secure_fs::CheckError::Insecure(i) => PolicyError::file(i.path, i.message),
        secure_fs::CheckError::Io(p, e)
            if p == path || p == std::path::absolute(path).unwrap_or_default() =>
        {
            PolicyError::file(path, format!("{cannot}: {e}"))
        }
        secure_fs::CheckError::Io(p, e) => {
            PolicyError::file(path, format!("cannot examine {}: {e}", p.display()))
        }
    }
}

/// Reads, parses and builds. `only`: a single tenant file instead of the whole directory.
fn load(dir: &Path, only: Option<&Path>) -> Outcome {
    let mut out = Outcome {
        built: Vec::new(),
        files: Vec::new(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    // A policy names the sources to read and the key to use: whoever could
    // change one could make custos back up (or shred) the wrong thing.
    if let Err(e) = secure_fs::check_dir(dir, "policies directory", secure_fs::Kind::Dir) {
        out.errors
            .push(check_error(dir, "cannot read the policies directory", e));
        return out;
    }
    let (tenant_paths, defaults_path) = match only {
        Some(file) => {
            let defaults = dir.join(DEFAULTS_FILE);
            (
                vec![file.to_path_buf()],
                defaults.is_file().then_some(defaults),
            )
        }
        None => match scan(dir) {
            Ok(found) => found,
            Err(e) => {
                out.errors.push(e);
                return out;
            }
        },
    };

    // Read every file first (defaults.toml, when present, is number 0); parse
    // after, since the parsed trees borrow the texts.
    let mut texts = Vec::new();
    let mut defaults_broken = false;
    let read = |path: &Path| {
        secure_fs::check_file(path, "policy file")
            .map_err(|e| check_error(path, "cannot read", e))?;
        SourceText::read(path)
    };
    if let Some(path) = &defaults_path {
        match read(path) {
            Ok(s) => texts.push(s),
            Err(e) => {
                defaults_broken = true;
                out.errors.push(e);
            }
        }
    }
    let first_tenant = texts.len();
    for path in &tenant_paths {
        match read(path) {
            Ok(s) => texts.push(s),
            Err(e) => out.errors.push(e),
        }
    }
    let bases: Vec<PathBuf> = texts.iter().map(|s| base_dir_of(&s.path)).collect();

    let mut parsed: Vec<Option<Spanned<DeTable<'_>>>> = Vec::with_capacity(texts.len());
    for source in &texts {
        let (doc, syntax) = DeTable::parse_recoverable(&source.text);
        if syntax.is_empty() {
            parsed.push(Some(doc));
        } else {
            for e in &syntax {
                out.errors
                    .push(source.error_at(e.span().map(|s| s.start), e.message().to_owned()));
            }
            parsed.push(None);
        }
    }

    let mut d = Diags::new(&texts);
    let defaults = match first_tenant {
        1 => match &parsed[0] {
            Some(doc) => Some((0, doc.get_ref())),
            None => {
                defaults_broken = true;
                None
            }
        },
        _ => None,
    };
    if let Some(layer) = defaults {
        build(&mut d, &Table::root(vec![layer]), Mode::Defaults, &bases);
    }
    // With a broken defaults.toml no tenant can be built faithfully: its errors stand alone.
    if !defaults_broken {
        for (i, doc) in parsed.iter().enumerate().skip(first_tenant) {
            let Some(doc) = doc else { continue };
            let mut layers = vec![(i, doc.get_ref())];
            layers.extend(defaults);
            let stem = texts[i].path.file_stem().and_then(|s| s.to_str());
            if let Some(built) = build(
                &mut d,
                &Table::root(layers),
                Mode::Tenant { file_stem: stem },
                &bases,
            ) {
                out.built.push(built);
            }
        }
    }

    if only.is_none() {
        duplicate_tenants(&mut d, &parsed, first_tenant);
        shared_keys(&mut d, &mut out.built);
    }
    out.errors.extend(d.errors);
    out.warnings.extend(d.warnings);
    let tenants_by_file: HashMap<&Path, &TenantId> = out
        .built
        .iter()
        .map(|b| (b.policy.file.as_path(), &b.policy.tenant))
        .collect();
    out.files = texts
        .iter()
        .map(|s| PolicyFile {
            path: s.path.clone(),
            blake3: blake3::hash(s.text.as_bytes()).to_hex().to_string(),
            tenant: tenants_by_file.get(s.path.as_path()).map(|t| (*t).clone()),
        })
        .collect();
    out
}

/// Two files naming the same tenant. Checked on the raw `tenant` values, so it
/// is reported even when one of the files also fails otherwise (a copied file
/// not yet renamed); the file named after the tenant is taken as its owner.
fn duplicate_tenants(
    d: &mut Diags<'_>,
    parsed: &[Option<Spanned<DeTable<'_>>>],
    first_tenant: usize,
) {
    let mut claims: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, doc) in parsed.iter().enumerate().skip(first_tenant) {
        let Some(doc) = doc else { continue };
        let Some(item) = Table::root(vec![(i, doc.get_ref())]).get_top("tenant") else {
            continue;
        };
        if let toml::de::DeValue::String(s) = item.value
            && TenantId::new(s).is_ok()
        {
            claims
                .entry(s.to_string())
                .or_default()
                .push((i, item.start));
        }
    }
    for (tenant, files) in claims.into_iter().filter(|(_, f)| f.len() > 1) {
        let stem_of = |i: usize| {
            d.files[i]
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_owned)
        };
        let owner = files
            .iter()
            .position(|&(i, _)| stem_of(i).as_deref() == Some(tenant.as_str()))
            .unwrap_or(0);
        let owner_file = d.files[files[owner].0].path.display().to_string();
        for (n, &(file, offset)) in files.iter().enumerate() {
            if n != owner {
                d.error(
                    file,
                    Some(offset),
                    format!("tenant: {tenant:?} is already defined in {owner_file}"),
                );
            }
        }
    }
}

/// One key per tenant: a CMK shared by two tenants would make shredding one
/// destroy the other's backups. The later file (by name) is refused.
fn shared_keys(d: &mut Diags<'_>, built: &mut Vec<Built>) {
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut refused = vec![false; built.len()];
    for (i, b) in built.iter().enumerate() {
        let key = b.policy.key.to_string();
        if let Some(&first) = by_key.get(&key) {
            let other = &built[first].policy;
            d.error(
                b.key_at.0,
                Some(b.key_at.1),
                format!(
                    "key: {key} is also the key of tenant {} ({}); every tenant needs its own key, or shredding one \
                     tenant would destroy the other's backups",
                    other.tenant,
                    other.file.display()
                ),
            );
            refused[i] = true;
        } else {
            by_key.insert(key, i);
        }
    }
    let mut refused = refused.into_iter();
    built.retain(|_| !refused.next().unwrap_or(false));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_of(dir: &Path, cache: &DeclaredKeysCache) -> Vec<String> {
        let (keys, unreadable) = declared_keys_cached(dir, cache);
        assert!(unreadable.is_empty(), "{unreadable:?}");
        keys.into_iter().map(|k| k.key.to_string()).collect()
    }

    /// A policy file changed on disk counts at once, cached or not: a
    /// rewrite of the same size in the same second (not cached yet), an
    /// in-place edit of a settled file (its ctime moves), a replacement.
    #[test]
    fn the_key_cache_sees_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("beta.toml");
        let cache = DeclaredKeysCache::default();
        std::fs::write(&file, "key = \"local:aaaa\"\n").unwrap();
        assert_eq!(keys_of(dir.path(), &cache), ["local:aaaa"]);
        std::fs::write(&file, "key = \"local:bbbb\"\n").unwrap();
        assert_eq!(keys_of(dir.path(), &cache), ["local:bbbb"]);
        // Settled (changed over a second ago): kept, and reused.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(keys_of(dir.path(), &cache), ["local:bbbb"]);
        assert_eq!(cache.lock().len(), 1);
        std::fs::write(&file, "key = \"local:cccc\"\n").unwrap();
        assert_eq!(keys_of(dir.path(), &cache), ["local:cccc"]);
        let other = dir.path().join("new");
        std::fs::write(&other, "key = \"local:dddd\"\n").unwrap();
        std::fs::rename(&other, &file).unwrap();
        assert_eq!(keys_of(dir.path(), &cache), ["local:dddd"]);
    }
}
