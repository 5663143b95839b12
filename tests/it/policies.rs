//! Tenant policies: the shipped examples validate, and every kind of bad input
//! is reported with its file, line, column and an exact message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use custos::config::{
    DeletionState, DrillPick, Policy, PolicyError, SourceSpec, load_policies, load_policy_file,
    validate_dir,
};
use custos::keys::ProviderKind;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary policies directory holding `files`.
fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

/// An error as "file-name:line:column: message" (the directory left out).
fn short(e: &PolicyError) -> String {
    let name = e.file.file_name().unwrap().to_string_lossy();
    match (e.line, e.column) {
        (Some(l), Some(c)) => format!("{name}:{l}:{c}: {}", e.message),
        (Some(l), None) => format!("{name}:{l}: {}", e.message),
        _ => format!("{name}: {}", e.message),
    }
}

/// Every error of a directory, shortened; also checks that loading refuses it.
fn errors(files: &[(&str, &str)]) -> Vec<String> {
    let dir = dir_with(files);
    let report = validate_dir(dir.path());
    let loaded = load_policies(dir.path());
    let errs: Vec<String> = report.errors.iter().map(short).collect();
    match loaded {
        Ok(_) => assert!(
            errs.is_empty(),
            "load_policies accepted what validate_dir refused: {errs:?}"
        ),
        Err(e) => assert_eq!(e.errors().iter().map(short).collect::<Vec<_>>(), errs),
    }
    errs
}

/// A minimal valid tenant file for "acme", with `extra` appended (tables only,
/// since anything after [[sources]] belongs to it).
fn acme(extra: &str) -> String {
    format!(
        "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"/srv/acme\"\n{extra}"
    )
}

fn load_one(files: &[(&str, &str)], tenant: &str) -> Policy {
    let dir = dir_with(files);
    let set = load_policies(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    set.policies
        .into_iter()
        .find(|(t, _)| t.as_str() == tenant)
        .expect("tenant loaded")
        .1
}

#[test]
fn shipped_policies_validate() {
    let dir = manifest_dir().join("policies");
    let set = load_policies(&dir).unwrap_or_else(|e| panic!("shipped policies are invalid:\n{e}"));
    let tenants: Vec<&str> = set.tenants().map(|t| t.as_str()).collect();
    assert_eq!(tenants, ["example", "sqlite-demo"]);
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);

    let p = &set.policies.values().next().unwrap();
    assert_eq!(p.key.to_string(), "local:example");
    assert_eq!(p.key.kind(), ProviderKind::Local);
    let root = manifest_dir().canonicalize().unwrap();
    let names: Vec<&str> = p.sources.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["docs", "policies"]);
    let SourceSpec::Path { path, exclude, .. } = &p.sources[0] else {
        panic!("{:?}", p.sources[0])
    };
    assert_eq!(path, &root.join("docs"));
    assert_eq!(exclude, &["*.tmp", "*.swp"]);
    let SourceSpec::Path {
        path,
        one_file_system,
        ..
    } = &p.sources[1]
    else {
        panic!()
    };
    assert_eq!((path, *one_file_system), (&root.join("policies"), true));
    for s in &p.sources {
        let SourceSpec::Path { path, .. } = s else {
            panic!()
        };
        assert!(
            path.is_dir(),
            "{} must exist in a fresh clone",
            path.display()
        );
    }
    // Own values, and values inherited from defaults.toml.
    assert_eq!(p.backup.schedule.as_ref().unwrap().as_str(), "0 1 * * *");
    assert_eq!(
        (
            p.retention.rules.keep_last,
            p.retention.rules.keep_daily,
            p.retention.rules.keep_weekly
        ),
        (3, 7, 4)
    );
    assert_eq!(
        p.retention.rules.keep_within,
        Some(Duration::from_secs(2 * 86_400))
    );
    assert_eq!(
        p.retention.schedule.as_ref().unwrap().as_str(),
        "30 3 * * *"
    );
    assert_eq!(p.drill.rto, Some(Duration::from_secs(15 * 60)));
    assert_eq!(p.drill.pick, DrillPick::Latest);
    assert_eq!(p.drill.schedule.as_ref().unwrap().as_str(), "0 5 * * 1");
    assert_eq!(
        p.rotation.epoch_every,
        Some(Duration::from_secs(30 * 86_400))
    );
    assert_eq!(p.deletion.state, DeletionState::Active);
    assert_eq!(p.file, dir.join("example.toml"));

    let report = validate_dir(&dir);
    assert!(report.is_ok());
    let text = report.to_string();
    assert!(text.starts_with("ok       example ("), "{text}");
    assert!(
        text.ends_with("2 tenants valid, 0 errors, 0 warnings"),
        "{text}"
    );

    // Both files are listed with a content hash.
    let hashed: Vec<_> = set
        .files
        .iter()
        .map(|f| f.path.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        hashed,
        ["defaults.toml", "example.toml", "sqlite-demo.toml"]
    );
    assert!(set.files.iter().all(|f| f.blake3.len() == 64));
}

#[test]
fn documented_examples_validate() {
    let examples = manifest_dir().join("docs/policy-examples");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        manifest_dir().join("policies/defaults.toml"),
        dir.path().join("defaults.toml"),
    )
    .unwrap();
    let mut copied = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if let Some(target) = name.strip_suffix(".example") {
            std::fs::copy(&path, dir.path().join(target)).unwrap();
            copied.push(target.to_owned());
        }
    }
    copied.sort();
    assert_eq!(copied, ["aws-tenant.toml", "offboarding-tenant.toml"]);
    let set = load_policies(dir.path())
        .unwrap_or_else(|e| panic!("documented examples are invalid:\n{e}"));
    assert_eq!(set.len(), 2);

    let aws = &set.policies.values().next().unwrap();
    assert_eq!(aws.tenant.as_str(), "aws-tenant");
    assert_eq!(aws.key.kind(), ProviderKind::AwsKms);
    assert_eq!(aws.key.id(), "alias/custos-aws-tenant");
    let SourceSpec::Path { path, .. } = &aws.sources[0] else {
        panic!()
    };
    assert_eq!(path, Path::new("/srv/tenants/aws-tenant"));
    let SourceSpec::Command {
        name,
        argv,
        timeout,
    } = &aws.sources[1]
    else {
        panic!()
    };
    assert_eq!(name, "db.dump");
    assert_eq!(argv, &["pg_dump", "--format=custom", "--dbname=aws-tenant"]);
    assert_eq!(*timeout, Some(Duration::from_secs(3_600)));
    assert_eq!(
        aws.sources[2],
        SourceSpec::ObjectStore {
            name: "attachments".into(),
            url: "s3://attachments/aws-tenant/".into()
        }
    );
    assert_eq!(aws.backup.pack_size, 64 << 20);
    let verify = aws.drill.verify_command.as_ref().unwrap();
    assert_eq!(
        verify.expand(Path::new("/scratch/r")),
        ["pg_restore", "--list", "/scratch/r/db.dump"].map(std::ffi::OsString::from)
    );
    assert_eq!(
        aws.drill.scratch.as_deref(),
        Some(Path::new("/var/tmp/custos-drills/aws-tenant"))
    );
    // The aws-tenant source directory does not exist here: a warning, not an error.
    assert!(
        set.warnings.iter().any(|w| w
            .message
            .starts_with("sources[0].path: /srv/tenants/aws-tenant does not exist")),
        "{:?}",
        set.warnings
    );

    let leaving = &set.policies.values().nth(1).unwrap();
    assert_eq!(leaving.deletion.state, DeletionState::Offboarding);
    assert_eq!(leaving.deletion.kms_pending_window_days, 7);
    assert_eq!(
        leaving.deletion.shred_due_at().unwrap().to_rfc3339(),
        "2026-12-01T00:00:00+00:00"
    );
    assert_eq!(
        leaving.drill.schedule, None,
        "schedule = \"off\" overrides defaults.toml"
    );
    assert!(
        leaving.backup.schedule.is_some(),
        "inherited from defaults.toml"
    );
}

#[test]
fn unknown_keys() {
    let top = "tenant = \"acme\"\nkey = \"local:acme\"\nretension = 3\n[[sources]]\ntype = \"path\"\npath = \"/srv/acme\"\n";
    assert_eq!(
        errors(&[("acme.toml", top)]),
        ["acme.toml:3:1: retension: unknown key (did you mean \"retention\"?)"]
    );

    let section = acme("[retention]\nkeep_dayly = 7\n");
    assert_eq!(
        errors(&[("acme.toml", &section)]),
        ["acme.toml:7:1: retention.keep_dayly: unknown key (did you mean \"keep_daily\"?)"]
    );

    let in_source = acme("path_to = \"/x\"\n");
    assert_eq!(
        errors(&[("acme.toml", &in_source)]),
        [
            "acme.toml:6:1: sources[0].path_to: unknown key (expected one of: type, name, path, exclude, one_file_system)"
        ]
    );
}

#[test]
fn bad_tenant_ids() {
    for (id, reason) in [
        ("../x", "it must start with a lowercase letter or a digit"),
        ("Acme", "it must start with a lowercase letter or a digit"),
        (
            "ac/me",
            "only lowercase ASCII letters, digits and '-' are allowed (no '/', '.', uppercase or unicode)",
        ),
    ] {
        let text = format!(
            "tenant = \"{id}\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"/srv\"\n"
        );
        assert_eq!(
            errors(&[("acme.toml", &text)]),
            [format!(
                "acme.toml:1:10: tenant: invalid tenant id \"{id}\": {reason} (expected [a-z0-9][a-z0-9-]{{0,62}})"
            )]
        );
    }
}

#[test]
fn bad_key_references() {
    let text =
        "tenant = \"acme\"\nkey = \"vault:x\"\n[[sources]]\ntype = \"path\"\npath = \"/srv\"\n";
    assert_eq!(
        errors(&[("acme.toml", text)]),
        [
            "acme.toml:2:7: key: invalid key reference \"vault:x\": unknown key provider \"vault\" (known: \"local\", \"aws-kms\", \"pkcs11\", \"kmip\")"
        ]
    );
    let text =
        "tenant = \"acme\"\nkey = \"local:../x\"\n[[sources]]\ntype = \"path\"\npath = \"/srv\"\n";
    assert_eq!(
        errors(&[("acme.toml", text)]),
        [
            "acme.toml:2:7: key: invalid key reference \"local:../x\": a local key name is [a-z0-9][a-z0-9._-]{0,127}"
        ]
    );
}

#[test]
fn cron_forms() {
    let ok = acme(
        "[backup]\nschedule = \"0 2 * * *\"\n[retention]\nschedule = \"0 30 3 * * *\"\n[check]\nschedule = \"0 0 4 * * SUN 2099\"\n[drill]\nschedule = \"@weekly\"\n",
    );
    let p = load_one(&[("acme.toml", &ok)], "acme");
    assert_eq!(p.backup.schedule.unwrap().as_str(), "0 2 * * *");
    assert_eq!(p.retention.schedule.unwrap().as_str(), "0 30 3 * * *");
    assert_eq!(p.check.schedule.unwrap().as_str(), "0 0 4 * * SUN 2099");
    assert_eq!(p.drill.schedule.unwrap().as_str(), "@weekly");

    let bad = acme(
        "[backup]\nschedule = \"0 2 * *\"\n[check]\nschedule = \"0 25 * * *\"\n[drill]\nschedule = 5\n[rotation]\nschedule = \"0 0 0 30 2 *\"\n",
    );
    assert_eq!(
        errors(&[("acme.toml", &bad)]),
        [
            "acme.toml:7:12: backup.schedule: invalid cron expression \"0 2 * *\": expected 5 fields (minute hour \
             day-of-month month day-of-week), 6 (with seconds first) or 7 (with a year last), found 4",
            "acme.toml:9:12: check.schedule: invalid cron expression \"0 25 * * *\": Hours must be less than 23. ('25' specified.)",
            "acme.toml:11:12: drill.schedule: expected a cron expression string such as \"0 2 * * *\" (or \"off\"), found an integer (5)",
            &format!(
                "acme.toml:13:12: rotation.schedule: \"0 0 0 30 2 *\" never fires after {} (use \"off\" for no schedule)",
                chrono::Utc::now().format("%Y-%m-%d")
            ),
        ]
    );
}

#[test]
fn bad_durations_numbers_and_types() {
    let text = acme(
        "[drill]\nrto = \"15 minutez\"\nverify_timeout = \"0s\"\n[retention]\nkeep_daily = -1\nkeep_weekly = 1.5\n[backup]\ncompression_level = \"high\"\npack_size = \"1MiB\"\n[check]\nread_data_fraction = 1.5\n",
    );
    let errs = errors(&[("acme.toml", &text)]);
    assert_eq!(errs.len(), 7, "{errs:#?}");
    assert!(
        errs[0].starts_with("acme.toml:7:7: drill.rto: invalid duration \"15 minutez\": unknown time unit \"minutez\""),
        "{}",
        errs[0]
    );
    assert_eq!(
        errs[1],
        "acme.toml:8:18: drill.verify_timeout: must be longer than zero"
    );
    assert_eq!(
        errs[2],
        "acme.toml:10:14: retention.keep_daily: expected a non-negative integer, found -1"
    );
    assert_eq!(
        errs[3],
        "acme.toml:11:15: retention.keep_weekly: expected a non-negative integer, found a float (1.5)"
    );
    assert_eq!(
        errs[4],
        "acme.toml:13:21: backup.compression_level: expected an integer from 1 to 19, found a string (\"high\")"
    );
    assert_eq!(
        errs[5],
        "acme.toml:14:13: backup.pack_size: must be from 4 MiB to 128 MiB, found 1 MiB"
    );
    assert_eq!(
        errs[6],
        "acme.toml:16:22: check.read_data_fraction: must be from 0 to 1 (a fraction of the packs), found 1.5"
    );

    let wrong = "tenant = \"acme\"\nkey = \"local:acme\"\nsources = \"/srv\"\nbackup = []\n";
    assert_eq!(
        errors(&[("acme.toml", wrong)]),
        [
            "acme.toml:3:11: sources: expected an array of tables ([[sources]]), found a string (\"/srv\")",
            "acme.toml:4:10: backup: expected a table, found an array",
        ]
    );
}

#[test]
fn missing_tenant_and_sources() {
    let text = "key = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"/srv\"\n";
    assert_eq!(
        errors(&[("acme.toml", text)]),
        ["acme.toml: tenant: missing; every policy names its tenant, e.g. tenant = \"acme\""]
    );
    let text = "tenant = \"acme\"\nkey = \"local:acme\"\n";
    assert_eq!(
        errors(&[("acme.toml", text)]),
        [
            "acme.toml: sources: missing; a policy backs up at least one source: add a [[sources]] table with type = \"path\", \"command\" or \"object_store\""
        ]
    );
    let text = "tenant = \"acme\"\nkey = \"local:acme\"\nsources = []\n";
    assert_eq!(
        errors(&[("acme.toml", text)]),
        ["acme.toml:3:11: sources: at least one source is required"]
    );
    let text = "tenant = \"acme\"\n[[sources]]\npath = \"/srv\"\n";
    assert_eq!(
        errors(&[("acme.toml", text)]),
        [
            "acme.toml: key: missing; e.g. key = \"local:acme\" or key = \"aws-kms:alias/custos-acme\"",
            "acme.toml:2:1: sources[0].type: missing; one of \"path\", \"command\" or \"object_store\"",
        ]
    );
}

#[test]
fn duplicate_tenants_and_file_names() {
    let copy =
        "tenant = \"acme\"\nkey = \"local:copy\"\n[[sources]]\ntype = \"path\"\npath = \"/srv\"\n";
    let dir = dir_with(&[("acme.toml", &acme("")), ("copy.toml", copy)]);
    let report = validate_dir(dir.path());
    let errs: Vec<String> = report.errors.iter().map(short).collect();
    let acme_path = dir.path().join("acme.toml");
    assert_eq!(
        errs,
        [
            "copy.toml:1:10: tenant: \"acme\" does not match the file name \"copy.toml\"; a tenant's policy file must be named acme.toml".to_owned(),
            format!(
                "copy.toml:1:10: tenant: \"acme\" is already defined in {}",
                acme_path.display()
            ),
        ]
    );
    // acme.toml itself is fine and listed.
    assert_eq!(report.tenants.len(), 1);
    assert_eq!(report.tenants[0].tenant.as_str(), "acme");

    // A mismatch alone.
    assert_eq!(
        errors(&[("other.toml", &acme(""))]),
        [
            "other.toml:1:10: tenant: \"acme\" does not match the file name \"other.toml\"; a tenant's policy file must be named acme.toml"
        ]
    );
}

#[test]
fn shared_keys_and_duplicate_source_names() {
    let beta =
        "tenant = \"beta\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"/srv\"\n";
    let dir = dir_with(&[("acme.toml", &acme("")), ("beta.toml", beta)]);
    let errs: Vec<String> = validate_dir(dir.path()).errors.iter().map(short).collect();
    assert_eq!(
        errs,
        [format!(
            "beta.toml:2:7: key: local:acme is also the key of tenant acme ({}); every tenant needs its own key, or \
             shredding one tenant would destroy the other's backups",
            dir.path().join("acme.toml").display()
        )]
    );

    let dup = acme(
        "[[sources]]\ntype = \"path\"\npath = \"/other/acme\"\n[[sources]]\ntype = \"command\"\nname = \"acme\"\ncommand = [\"true\"]\n",
    );
    assert_eq!(
        errors(&[("acme.toml", &dup)]),
        [
            "acme.toml:8:8: sources[1].name: duplicate source name \"acme\" (also used by sources[0]); names must be unique per tenant",
            "acme.toml:11:8: sources[2].name: duplicate source name \"acme\" (also used by sources[0]); names must be unique per tenant",
        ]
    );
}

#[test]
fn bad_sources() {
    let text = acme(
        "exclude = [\"*.tmp\", \"a[b\"]\n[[sources]]\ntype = \"command\"\nname = \"db.dump\"\ncommand = []\n[[sources]]\ntype = \"command\"\ncommand = [\"pg_dump\"]\n[[sources]]\ntype = \"object_store\"\nurl = \"s3://My_Bucket/x\"\n[[sources]]\ntype = \"tape\"\n[[sources]]\ntype = \"path\"\npath = \"/\"\n[[sources]]\ntype = \"path\"\nname = \"../up\"\npath = \"/srv\"\n",
    );
    assert_eq!(
        errors(&[("acme.toml", &text)]),
        [
            "acme.toml:6:21: sources[0].exclude[1]: invalid glob \"a[b\": unclosed character class; missing ']'",
            "acme.toml:10:11: sources[1].command: expected a non-empty argv array, e.g. [\"pg_dump\", \"-Fc\", \"acme\"]",
            "acme.toml:11:1: sources[2].name: missing; the file name the output is stored under, e.g. name = \"db.dump\"",
            "acme.toml:16:7: sources[3].url: invalid S3 bucket name \"My_Bucket\": only lowercase letters, digits, '.' and '-' are allowed",
            "acme.toml:18:8: sources[4].type: unknown source type \"tape\" (expected \"path\", \"command\" or \"object_store\")",
            "acme.toml:21:8: sources[5].path: cannot name this source after \"/\": set name = \"…\" ([A-Za-z0-9._-]+)",
            "acme.toml:24:8: sources[6].name: invalid source name \"../up\": use 1 to 255 of A-Z a-z 0-9 . _ - (not \".\" or \"..\")",
        ]
    );
}

#[test]
fn bad_verify_command_placeholders() {
    let text = acme(
        "[drill]\nverify_command = [\"sqlite3\", \"{fil:app.db}\", \"{file:../etc/shadow}\"]\n",
    );
    // One error per command: the first bad argument.
    assert_eq!(
        errors(&[("acme.toml", &text)]),
        [
            "acme.toml:7:30: drill.verify_command[1]: unknown placeholder {fil:app.db} (known: {dir}, {file:NAME}, {tenant})"
        ]
    );
    let text = acme("[drill]\nverify_command = [\"test\", \"-s\", \"{file:app.db\"]\n");
    assert_eq!(
        errors(&[("acme.toml", &text)]),
        [
            "acme.toml:7:33: drill.verify_command[2]: unclosed '{' in \"{file:app.db\" (write '{{' for a literal brace)"
        ]
    );
}

#[test]
fn deletion_rules() {
    let text = acme("[deletion]\nstate = \"offboarding\"\nkms_pending_window_days = 3\n");
    assert_eq!(
        errors(&[("acme.toml", &text)]),
        [
            "acme.toml:7:9: deletion.requested_at: missing; required when deletion.state = \"offboarding\" (e.g. requested_at = \"2026-11-01T00:00:00Z\")",
            "acme.toml:8:27: deletion.kms_pending_window_days: must be from 7 to 30, found 3",
        ]
    );
    let text = acme("[deletion]\nstate = \"gone\"\nrequested_at = \"2026-11-01\"\n");
    assert_eq!(
        errors(&[("acme.toml", &text)]),
        [
            "acme.toml:7:9: deletion.state: expected \"active\" or \"offboarding\", found \"gone\"",
            "acme.toml:8:16: deletion.requested_at: expected an RFC 3339 date-time with a time zone, e.g. 2026-11-01T00:00:00Z, found \"2026-11-01\"",
        ]
    );
    // Both the TOML date-time and the string form are accepted.
    for requested in ["2026-11-01T00:00:00Z", "\"2026-11-01T01:00:00+01:00\""] {
        let text = acme(&format!(
            "[deletion]\nstate = \"offboarding\"\nrequested_at = {requested}\ngrace = \"7d\"\n"
        ));
        let p = load_one(&[("acme.toml", &text)], "acme");
        assert_eq!(
            p.deletion.shred_due_at().unwrap().to_rfc3339(),
            "2026-11-08T00:00:00+00:00"
        );
    }
    // Offboarding is per tenant, never from defaults.toml.
    let defaults = "tenant = \"all\"\n[deletion]\nstate = \"offboarding\"\nrequested_at = 2026-11-01T00:00:00Z\n";
    assert_eq!(
        errors(&[("defaults.toml", defaults), ("acme.toml", &acme(""))]),
        [
            "defaults.toml:1:10: tenant: not allowed in defaults.toml (defaults apply to every tenant; name each tenant in its own file)",
            "defaults.toml:3:9: deletion.state: not allowed in defaults.toml (offboarding is decided per tenant)",
            "defaults.toml:4:16: deletion.requested_at: not allowed in defaults.toml (offboarding is decided per tenant)",
        ]
    );
}

#[test]
fn retention_that_keeps_nothing_is_refused() {
    let text =
        acme("[retention]\nkeep_last = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n");
    assert_eq!(
        errors(&[("acme.toml", &text)]),
        [
            "acme.toml:6:1: retention: keeps no snapshot (every keep_* is 0 and keep_within is not set): it would forget every snapshot; keep at least one"
        ]
    );
    let text = acme(
        "[retention]\nkeep_last = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nkeep_within = \"30d\"\n",
    );
    assert_eq!(
        load_one(&[("acme.toml", &text)], "acme")
            .retention
            .rules
            .keep_within,
        Some(Duration::from_secs(30 * 86_400))
    );
}

#[test]
fn defaults_inheritance() {
    let defaults = r#"
key = "local:{tenant}"
[[sources]]
type = "path"
path = "data/{tenant}"
exclude = ["*.tmp"]
[retention]
keep_daily = 9
keep_weekly = 5
[drill]
verify_command = ["check", "{dir}"]
rto = "1h"
"#;
    let alpha = r#"tenant = "alpha"
[[sources]]
type = "path"
path = "/srv/alpha"
[retention]
keep_daily = 3
[drill]
verify_command = ["other"]
"#;
    let beta = "tenant = \"beta\"\n";
    let dir = dir_with(&[
        ("defaults.toml", defaults),
        ("alpha.toml", alpha),
        ("beta.toml", beta),
    ]);
    let set = load_policies(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let base = dir.path().canonicalize().unwrap();
    let alpha = set.policies.values().next().unwrap();
    let beta = set.policies.values().nth(1).unwrap();
    // {tenant} placeholder.
    assert_eq!(
        (alpha.key.to_string(), beta.key.to_string()),
        ("local:alpha".into(), "local:beta".into())
    );
    // Scalars: the tenant's value wins, the rest is inherited, the rest of the rest is built in.
    assert_eq!(
        (
            alpha.retention.rules.keep_daily,
            alpha.retention.rules.keep_weekly
        ),
        (3, 5)
    );
    assert_eq!(
        (
            beta.retention.rules.keep_daily,
            beta.retention.rules.keep_weekly
        ),
        (9, 5)
    );
    assert_eq!(alpha.retention.rules.keep_monthly, 12);
    assert_eq!(alpha.drill.rto, Some(Duration::from_secs(3_600)));
    // Arrays are replaced, not merged.
    assert_eq!(alpha.sources.len(), 1);
    assert_eq!(
        alpha.sources[0],
        SourceSpec::Path {
            name: "alpha".into(),
            path: "/srv/alpha".into(),
            exclude: vec![],
            one_file_system: false,
        }
    );
    assert_eq!(
        alpha.drill.verify_command.as_ref().unwrap().argv(),
        ["other"]
    );
    assert_eq!(
        beta.drill.verify_command.as_ref().unwrap().argv(),
        ["check", "{dir}"]
    );
    // beta inherits the defaults' sources, relative to defaults.toml's directory, named after the directory.
    assert_eq!(
        beta.sources,
        [SourceSpec::Path {
            name: "beta".into(),
            path: base.join("data/beta"),
            exclude: vec!["*.tmp".into()],
            one_file_system: false,
        }]
    );
    // Missing source directories are warnings, pointing at the `path` that named them.
    let warnings: Vec<String> = set.warnings.iter().map(short).collect();
    assert!(
        warnings.contains(&"alpha.toml:4:8: sources[0].path: /srv/alpha does not exist (yet); backups fail until it does".to_owned()),
        "{warnings:?}"
    );
    assert!(
        warnings.contains(&format!(
            "defaults.toml:5:8: sources[0].path: {} does not exist (yet); backups fail until it does",
            base.join("data/beta").display()
        )),
        "{warnings:?}"
    );
    // Both are backed up only on demand: a warning each, no error.
    assert!(warnings.contains(&"alpha.toml: backup.schedule: not set; this tenant is backed up only on demand (custos backup)".to_owned()), "{warnings:?}");
    assert!(warnings.contains(&"beta.toml: backup.schedule: not set; this tenant is backed up only on demand (custos backup)".to_owned()), "{warnings:?}");
}

#[test]
fn errors_in_defaults_point_at_defaults_once() {
    let defaults = "[backup]\nschedule = \"nightly\"\n";
    let b = acme("").replace("acme", "bbb");
    assert_eq!(
        errors(&[
            ("defaults.toml", defaults),
            ("acme.toml", &acme("")),
            ("bbb.toml", &b)
        ]),
        [
            "defaults.toml:2:12: backup.schedule: invalid cron expression \"nightly\": expected 5 fields (minute hour \
          day-of-month month day-of-week), 6 (with seconds first) or 7 (with a year last), found 1"
        ]
    );
}

#[test]
fn relative_paths_follow_the_file_that_set_them() {
    // The tenant file lives elsewhere (load_policy_file accepts a path); the
    // defaults.toml of the policies directory still applies.
    let dir = dir_with(&[
        ("policies/defaults.toml", "[drill]\nscratch = \"scratch\"\n"),
        (
            "elsewhere/acme.toml",
            "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"../data\"\n",
        ),
    ]);
    let base = dir.path().canonicalize().unwrap();
    let p = load_policy_file(
        &dir.path().join("policies"),
        &dir.path().join("elsewhere/acme.toml"),
    )
    .unwrap();
    let SourceSpec::Path { path, name, .. } = &p.sources[0] else {
        panic!()
    };
    assert_eq!(
        (path.as_path(), name.as_str()),
        (base.join("data").as_path(), "data")
    );
    assert_eq!(p.drill.scratch, Some(base.join("policies/scratch")));

    // defaults.toml is not a tenant.
    let err =
        load_policy_file(&dir.path().join("policies"), Path::new("defaults.toml")).unwrap_err();
    assert!(err.to_string().ends_with("defaults.toml: defaults.toml holds the defaults of every tenant; it is not a tenant policy"), "{err}");
}

#[test]
fn hostile_input_fails_cleanly() {
    // Huge strings: refused with a bounded message.
    let huge = "a".repeat(300_000);
    let text = format!(
        "tenant = \"{huge}\"\nkey = \"local:{huge}\"\n[[sources]]\ntype = \"path\"\npath = \"/{huge}\"\n"
    );
    let errs = errors(&[("acme.toml", &text)]);
    assert_eq!(errs.len(), 3, "{}", errs.len());
    assert!(
        errs.iter().all(|e| e.len() < 400),
        "messages echo at most a bounded prefix of the input"
    );
    assert!(
        errs[0].starts_with("acme.toml:1:10: tenant: invalid tenant id \"aaaa"),
        "{}",
        &errs[0][..80]
    );
    assert!(
        errs[0].contains("it is longer than 63 characters"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].starts_with("acme.toml:2:7: key: invalid key reference \"local:aaaa"),
        "{}",
        errs[1]
    );
    assert!(
        errs[1].ends_with("…\": a local key name is [a-z0-9][a-z0-9._-]{0,127}"),
        "{}",
        errs[1]
    );
    assert_eq!(
        errs[2],
        "acme.toml:5:8: sources[0].path: path is longer than 4096 bytes"
    );
    // A file over 1 MiB is not parsed at all.
    let big = format!("# {}\n", "x".repeat(1 << 20));
    assert_eq!(
        errors(&[("acme.toml", &big)]),
        ["acme.toml: file is larger than 1024 KiB; refusing to parse it"]
    );

    // Deep nesting: refused by the parser, no stack overflow.
    let deep_array = format!("tenant = {}1{}\n", "[".repeat(10_000), "]".repeat(10_000));
    let errs = errors(&[("acme.toml", &deep_array)]);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("acme.toml:1:") && errs[0].contains("recurse"),
        "{errs:?}"
    );
    let deep_keys = format!("{} = 1\n", vec!["a"; 100_000].join("."));
    let errs = errors(&[("acme.toml", &deep_keys)]);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].contains("recursion limit"), "{errs:?}");
    // Nested tables where a value belongs: a type error.
    let nested = acme("[retention]\nkeep_daily = { a = { b = { c = 1 } } }\n");
    assert_eq!(
        errors(&[("acme.toml", &nested)]),
        ["acme.toml:7:14: retention.keep_daily: expected a non-negative integer, found a table"]
    );

    // NUL bytes: raw ones are a syntax error; escaped ones are refused where they matter.
    let raw_nul = "tenant = \"ac\0me\"\n";
    let errs = errors(&[("acme.toml", raw_nul)]);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("acme.toml:1:13: invalid basic string"),
        "{errs:?}"
    );
    let escaped = "tenant = \"acme\"\nkey = \"local:acme\"\n[[sources]]\ntype = \"path\"\npath = \"/srv/\\u0000x\"\n[[sources]]\ntype = \"command\"\nname = \"x\"\ncommand = [\"sh\", \"a\\u0000b\"]\n";
    assert_eq!(
        errors(&[("acme.toml", escaped)]),
        [
            "acme.toml:5:8: sources[0].path: a path cannot contain a NUL byte",
            "acme.toml:9:18: sources[1].command[1]: an argument cannot contain a NUL byte",
        ]
    );
    let tenant_nul = "tenant = \"ac\\u0000me\"\n";
    let errs = errors(&[("acme.toml", tenant_nul)]);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("acme.toml:1:10: tenant: invalid tenant id \"ac\\0me\"")),
        "{errs:?}"
    );

    // Not UTF-8, not TOML at all.
    let dir = dir_with(&[]);
    std::fs::write(
        dir.path().join("acme.toml"),
        b"tenant = \"\xff\xfe\"\n\x00\x01\x02",
    )
    .unwrap();
    let errs: Vec<String> = validate_dir(dir.path()).errors.iter().map(short).collect();
    assert_eq!(errs, ["acme.toml:1: file is not valid UTF-8"]);
    let errs = errors(&[("acme.toml", "}}}{{{[[[[ = = =\n")]);
    assert!(
        !errs.is_empty() && errs.iter().all(|e| e.starts_with("acme.toml:1:")),
        "{errs:?}"
    );
}

#[test]
fn directory_scanning() {
    // Dot files, other extensions and subdirectories are ignored; a missing directory is an error.
    let dir = dir_with(&[
        ("acme.toml", &acme("")),
        (".#acme.toml", "garbage"),
        ("notes.txt", "garbage"),
        ("sub/x.toml", "garbage"),
    ]);
    let set = load_policies(dir.path()).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(set.files.len(), 1);
    let missing = dir.path().join("nope");
    let err = load_policies(&missing).unwrap_err();
    assert_eq!(err.errors().len(), 1);
    assert!(
        err.to_string().starts_with(&format!(
            "{}: cannot read the policies directory: ",
            missing.display()
        )),
        "{err}"
    );
    // An empty directory holds no tenants, which is valid.
    let empty = dir_with(&[]);
    assert!(load_policies(empty.path()).unwrap().is_empty());
}

#[test]
fn reload_detects_changes() {
    let dir = dir_with(&[
        ("acme.toml", &acme("")),
        ("beta.toml", &acme("").replace("acme", "beta")),
    ]);
    let old = load_policies(dir.path()).unwrap();
    let same = load_policies(dir.path()).unwrap();
    assert!(same.same_files(&old));
    assert!(same.changes_from(&old).is_empty());

    std::fs::write(
        dir.path().join("acme.toml"),
        acme("[backup]\nschedule = \"0 3 * * *\"\n"),
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("beta.toml")).unwrap();
    std::fs::write(
        dir.path().join("gamma.toml"),
        acme("").replace("acme", "gamma"),
    )
    .unwrap();
    let new = load_policies(dir.path()).unwrap();
    assert!(!new.same_files(&old));
    let changes = new.changes_from(&old);
    let names = |v: &[custos::TenantId]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    assert_eq!(names(&changes.added), ["gamma"]);
    assert_eq!(names(&changes.removed), ["beta"]);
    assert_eq!(names(&changes.changed), ["acme"]);

    // Only a comment changed: different hash, same policy.
    std::fs::write(
        dir.path().join("gamma.toml"),
        format!("# note\n{}", acme("").replace("acme", "gamma")),
    )
    .unwrap();
    let newer = load_policies(dir.path()).unwrap();
    assert!(!newer.same_files(&new));
    assert!(newer.changes_from(&new).is_empty());
}

#[test]
fn policies_serialize_for_tenant_show() {
    let text = acme(
        "[[sources]]\ntype = \"command\"\nname = \"db.dump\"\ncommand = [\"pg_dump\", \"acme\"]\ntimeout = \"1h 30m\"\n[drill]\nrto = \"15m\"\n",
    );
    let p = load_one(&[("acme.toml", &text)], "acme");
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["tenant"], "acme");
    assert_eq!(json["key"], "local:acme");
    assert_eq!(json["sources"][0]["type"], "path");
    assert_eq!(json["sources"][1]["type"], "command");
    assert_eq!(json["sources"][1]["command"][0], "pg_dump");
    assert_eq!(json["sources"][1]["timeout"], "1h 30m");
    assert_eq!(json["drill"]["rto"], "15m");
    assert_eq!(json["drill"]["within"], "30d");
    assert_eq!(json["retention"]["keep_last"], 7);
    assert_eq!(json["backup"]["pack_size"], 16 << 20);
    assert_eq!(json["deletion"]["state"], "active");
}
