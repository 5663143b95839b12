//! Loading the policies directory for the daemon, at start and on SIGHUP.
//!
//! `custos policy validate` refuses a directory with any error; a daemon of a
//! thousand tenants must not stop backing up 999 of them for one typo. So a
//! tenant whose file does not validate is refused alone, with one
//! `policy.rejected` event per problem (file:line:column and message), and
//! keeps the version that was running (none at start: it is not scheduled);
//! valid changes of other tenants apply. A broken `defaults.toml` (which every
//! tenant inherits) or an unreadable directory refuses the whole reload.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::policy_set::DEFAULTS_FILE;
use crate::config::{Policy, PolicyError, ResidencyRules, load_policies, load_policy_file};
use crate::tenant::TenantId;

pub type Policies = BTreeMap<TenantId, Arc<Policy>>;

/// The outcome of a load.
pub struct Loaded {
    pub policies: Policies,
    /// Every problem found (each was logged as `policy.rejected`).
    pub rejected: Vec<PolicyError>,
    /// Tenants whose previous policy was kept because their file was refused.
    pub kept: Vec<TenantId>,
    /// True when nothing new could be used (unreadable directory, broken defaults.toml).
    pub refused_whole: bool,
}

/// Loads `dir`, falling back per tenant to `previous` (see the module docs).
/// A tenant whose key is outside `[residency]` is refused like one whose
/// file does not validate.
pub fn load(dir: &Path, previous: &Policies, rules: &ResidencyRules) -> Loaded {
    match load_policies(dir) {
        Ok(set) => {
            let outside: Vec<PolicyError> = set
                .policies
                .values()
                .filter_map(|p| rules.check_policy(p).err())
                .collect();
            if !outside.is_empty() {
                return partial(dir, previous, outside, rules);
            }
            for w in &set.warnings {
                tracing::debug!(event = "policy.warning", file = %w.file.display(), line = w.line, message = %w.message, "{w}");
            }
            let policies = set
                .policies
                .into_iter()
                .map(|(t, p)| {
                    // Unchanged policies keep their Arc, so the scheduler sees them as the same.
                    match previous.get(&t) {
                        Some(old) if **old == p => (t, old.clone()),
                        _ => (t, Arc::new(p)),
                    }
                })
                .collect();
            Loaded {
                policies,
                rejected: Vec::new(),
                kept: Vec::new(),
                refused_whole: false,
            }
        }
        Err(errors) => partial(dir, previous, errors.into_errors(), rules),
    }
}

fn partial(
    dir: &Path,
    previous: &Policies,
    mut errors: Vec<PolicyError>,
    rules: &ResidencyRules,
) -> Loaded {
    // Every file's policy, checked against the rules before anything is
    // logged, so each refusal is logged once.
    let files = match tenant_files(dir) {
        Ok(f) => f,
        Err(_) => {
            log_rejected(previous, &errors);
            return keep_all(previous, errors);
        }
    };
    let mut loaded_files = BTreeMap::new();
    for file in &files {
        if errors.iter().any(|e| &e.file == file) {
            continue;
        }
        let name = file.file_name().map(PathBuf::from).unwrap_or_default();
        if let Ok(p) = load_policy_file(dir, &name) {
            match rules.check_policy(&p) {
                Ok(()) => {
                    loaded_files.insert(file.clone(), p);
                }
                Err(e) => errors.push(e),
            }
        }
    }
    log_rejected(previous, &errors);
    partial_from(previous, errors, &files, loaded_files)
}

fn log_rejected(previous: &Policies, errors: &[PolicyError]) {
    let tenant_of_file: BTreeMap<&Path, &TenantId> = previous
        .iter()
        .map(|(t, p)| (p.file.as_path(), t))
        .collect();
    for e in errors {
        let tenant = tenant_of_file.get(e.file.as_path());
        tracing::error!(
            event = "policy.rejected",
            file = %e.file.display(),
            line = e.line,
            column = e.column,
            message = %e.message,
            tenant = tenant.map(|t| t.as_str()),
            kept_previous = tenant.is_some(),
            "policy rejected: {e}"
        );
    }
}

fn partial_from(
    previous: &Policies,
    errors: Vec<PolicyError>,
    files: &[PathBuf],
    mut loaded_files: BTreeMap<PathBuf, Policy>,
) -> Loaded {
    let tenant_of_file: BTreeMap<&Path, &TenantId> = previous
        .iter()
        .map(|(t, p)| (p.file.as_path(), t))
        .collect();
    let bad: BTreeSet<&Path> = errors.iter().map(|e| e.file.as_path()).collect();
    let whole = bad.iter().any(|f| {
        f.file_name().is_some_and(|n| n == DEFAULTS_FILE) || !files.contains(&f.to_path_buf())
    });
    if whole {
        return keep_all(previous, errors);
    }
    let mut policies = Policies::new();
    let mut kept = Vec::new();
    for file in files {
        let fallback = tenant_of_file.get(file.as_path()).copied();
        let loaded = if bad.contains(file.as_path()) {
            None
        } else {
            loaded_files.remove(file)
        };
        match (loaded, fallback) {
            (Some(p), _) => {
                let t = p.tenant.clone();
                let arc = match previous.get(&t) {
                    Some(old) if **old == p => old.clone(),
                    _ => Arc::new(p),
                };
                policies.insert(t, arc);
            }
            (None, Some(t)) => {
                if !policies.contains_key(t) {
                    policies.insert(t.clone(), previous[t].clone());
                    kept.push(t.clone());
                }
            }
            (None, None) => {}
        }
    }
    Loaded {
        policies,
        rejected: errors,
        kept,
        refused_whole: false,
    }
}

fn keep_all(previous: &Policies, errors: Vec<PolicyError>) -> Loaded {
    Loaded {
        policies: previous.clone(),
        rejected: errors,
        kept: previous.keys().cloned().collect(),
        refused_whole: true,
    }
}

/// The tenant files of a policies directory, as `load_policies` reads them.
fn tenant_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !name.ends_with(".toml") || name == DEFAULTS_FILE {
            continue;
        }
        let path = dir.join(name);
        if path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, tenant: &str, body: &str) {
        std::fs::write(
            dir.join(format!("{tenant}.toml")),
            format!(
                "tenant = \"{tenant}\"\nkey = \"local:{tenant}\"\n[[sources]]\ntype = \"path\"\npath = \"/srv/{tenant}\"\n{body}"
            ),
        )
        .unwrap();
    }

    #[test]
    fn a_bad_file_keeps_its_tenants_previous_policy_only() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a", "[backup]\nschedule = \"0 1 * * *\"\n");
        write(d, "b", "[backup]\nschedule = \"0 2 * * *\"\n");
        let first = load(d, &Policies::new(), &ResidencyRules::default());
        assert!(first.rejected.is_empty());
        assert_eq!(first.policies.len(), 2);

        // a breaks, b changes validly, c is new and broken, e is new and valid.
        write(d, "a", "[retention]\nkeep_last = -1\n");
        write(d, "b", "[backup]\nschedule = \"0 3 * * *\"\n");
        write(d, "c", "[backup]\nschedule = \"not cron\"\n");
        write(d, "e", "");
        let second = load(d, &first.policies, &ResidencyRules::default());
        assert!(!second.refused_whole);
        let files: BTreeSet<_> = second.rejected.iter().map(|e| e.file.clone()).collect();
        assert_eq!(files, [d.join("a.toml"), d.join("c.toml")].into());
        assert!(second.rejected.iter().all(|e| e.line.is_some()));
        let a = TenantId::new("a").unwrap();
        let b = TenantId::new("b").unwrap();
        assert!(Arc::ptr_eq(&second.policies[&a], &first.policies[&a]));
        assert_eq!(second.kept, std::slice::from_ref(&a));
        assert_eq!(
            second.policies[&b]
                .backup
                .schedule
                .as_ref()
                .unwrap()
                .as_str(),
            "0 3 * * *"
        );
        assert!(!second.policies.contains_key(&TenantId::new("c").unwrap()));
        assert!(second.policies.contains_key(&TenantId::new("e").unwrap()));

        // A broken defaults.toml refuses the whole reload.
        std::fs::write(d.join("defaults.toml"), "[backup\n").unwrap();
        let third = load(d, &second.policies, &ResidencyRules::default());
        assert!(third.refused_whole);
        assert_eq!(third.policies.len(), second.policies.len());
    }

    #[test]
    fn a_key_outside_residency_is_refused_like_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a", "");
        write(d, "b", "");
        let rules = ResidencyRules {
            residency: crate::config::Residency {
                key_providers: Some(vec![crate::keys::ProviderKind::Local]),
                ..Default::default()
            },
            placement: Default::default(),
        };
        let first = load(d, &Policies::new(), &rules);
        assert!(first.rejected.is_empty());
        // b moves to a key the rules do not allow: refused, its previous
        // policy kept; a is untouched.
        std::fs::write(
            d.join("b.toml"),
            "tenant = \"b\"\nkey = \"aws-kms:alias/b\"\n[[sources]]\ntype = \"path\"\npath = \"/srv/b\"\n",
        )
        .unwrap();
        let second = load(d, &first.policies, &rules);
        assert_eq!(second.rejected.len(), 1);
        assert!(
            second.rejected[0]
                .message
                .contains("[residency] key_providers"),
            "{}",
            second.rejected[0]
        );
        let b = TenantId::new("b").unwrap();
        assert_eq!(second.kept, std::slice::from_ref(&b));
        assert_eq!(second.policies[&b].key.to_string(), "local:b");
        // At start (nothing to keep) the tenant is not scheduled at all.
        let fresh = load(d, &Policies::new(), &rules);
        assert!(!fresh.policies.contains_key(&b));
        assert!(fresh.policies.contains_key(&TenantId::new("a").unwrap()));
    }
}
