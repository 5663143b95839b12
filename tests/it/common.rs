//! Helpers shared by the integration tests: test trees, tree comparison,
//! contexts and the CI gating of tests that need extra tools.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The integration tests drive the binary's test hooks (`CUSTOS_FAULTS`,
/// `CUSTOS_KEY_FAULTS`, `CUSTOS_CRASH_AT`, KMS test keys, fuzz entry points),
/// which only a `--features test-hooks` build has. Without it the files that
/// need them compile to nothing, and this fails the run rather than let it
/// pass having tested less.
#[cfg(not(feature = "test-hooks"))]
#[test]
fn built_with_the_test_hooks_feature() {
    panic!(
        "the integration tests need the test hooks: run `cargo test --features test-hooks` (scripts/test.sh does)"
    );
}

/// True when the run must not skip anything (scripts/test.sh and CI set it).
pub fn strict() -> bool {
    std::env::var("CUSTOS_TEST_EMULATORS").is_ok_and(|v| v == "1")
}

/// Skips (locally) or fails (CI) when a test's prerequisite is missing.
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    if strict() {
        panic!("{what} is required when CUSTOS_TEST_EMULATORS=1 (scripts/test.sh sets it up)");
    }
    eprintln!("skipped: {what} is not available (scripts/test.sh sets it up)");
    false
}

/// A small mixed tree: text, random binary over several chunks, many small
/// files, a symlink, an empty file, an empty directory, a non-UTF-8 name,
/// unusual modes.
pub fn make_tree(root: &Path, small_files: usize) {
    make_tree_with(root, small_files, 3 << 20);
}

/// [`make_tree`] with `random_bytes` of random data in `dir/random.bin`
/// (tests that scale the amount of data).
pub fn make_tree_with(root: &Path, small_files: usize, random_bytes: usize) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("hello.txt"), "hello world\n".repeat(1000)).unwrap();
    fs::write(root.join("zero"), b"").unwrap();
    let mut rnd = vec![0u8; random_bytes];
    custos::util::fill_random(&mut rnd);
    fs::write(root.join("dir/random.bin"), &rnd).unwrap();
    for i in 0..small_files {
        fs::write(root.join(format!("dir/sub/small-{i}")), format!("file {i}")).unwrap();
    }
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::write(root.join(OsStr::from_bytes(b"name-\xff\xfe")), b"non-utf8").unwrap();
    fs::set_permissions(root.join("hello.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(root.join("dir/sub"), fs::Permissions::from_mode(0o750)).unwrap();
}

/// Asserts two trees are identical: types, contents, modes, mtimes (ns), link targets.
pub fn assert_same(a: &Path, b: &Path) {
    let ma = fs::symlink_metadata(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let mb = fs::symlink_metadata(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(ma.file_type(), mb.file_type(), "{}", a.display());
    if ma.file_type().is_symlink() {
        assert_eq!(
            fs::read_link(a).unwrap(),
            fs::read_link(b).unwrap(),
            "{}",
            a.display()
        );
        return;
    }
    assert_eq!(
        ma.mode() & 0o7777,
        mb.mode() & 0o7777,
        "mode of {}",
        a.display()
    );
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "mtime of {}",
        a.display()
    );
    if ma.is_file() {
        assert_eq!(ma.len(), mb.len(), "size of {}", a.display());
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "content of {}",
            a.display()
        );
    }
    if ma.is_dir() {
        let names = |p: &Path| {
            let mut n: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            n.sort();
            n
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "entries of {}", a.display());
        for n in na {
            assert_same(&a.join(&n), &b.join(&n));
        }
    }
}

/// Every file under `root` that is not a directory (symlinks to directories
/// are followed), or nothing when `root` does not exist.
pub fn files_under(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every file under `root` with its bytes, in path order: to assert that
/// something changed nothing.
pub fn tree_contents(root: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = files_under(root)
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

/// The AWS_* variables of the test environment (the emulators'), for runs
/// that need them back (see [`Cli::run_env`]).
pub fn aws_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect()
}

/// A custos installation in a temp dir, driven through the real binary:
/// `custos.toml`, a local store, local keys, state and a policies directory.
pub struct Cli {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

impl Cli {
    pub fn new() -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("policies")).unwrap();
        fs::write(
            d.join("custos.toml"),
            format!(
                "store = \"file://{0}/store\"\nstate_dir = \"{0}/state\"\npolicies_dir = \"{0}/policies\"\n[local_keys]\ndir = \"{0}/keys\"\n",
                d.display()
            ),
        )
        .unwrap();
        Cli { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn store(&self) -> std::path::PathBuf {
        self.path().join("store")
    }

    /// Writes `policies/<tenant>.toml` backing up `source` (a directory).
    pub fn policy(&self, tenant: &str, source: &Path) {
        fs::write(
            self.path().join(format!("policies/{tenant}.toml")),
            format!(
                "tenant = \"{tenant}\"\nkey = \"local:{tenant}\"\n[[sources]]\ntype = \"path\"\npath = \"{}\"\nname = \"data\"\n[retention]\nkeep_last = 2\n",
                source.display()
            ),
        )
        .unwrap();
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    /// Runs with extra environment variables (e.g. `CUSTOS_FAULTS`).
    pub fn run_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_custos"))
            .arg("--config")
            .arg(self.path().join("custos.toml"))
            .args(args)
            .env("CUSTOS_LOG", "warn")
            .env("CUSTOS_LOG_FORMAT", "text")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            // Under scripts/test.sh the emulators' AWS_* variables are exported;
            // these CLI cases describe a machine without any AWS configuration
            // (tests that need AWS pass it back with `run_env` and `aws_env`).
            .env_remove("AWS_REGION")
            .env_remove("AWS_DEFAULT_REGION")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_KMS")
            .env_remove("AWS_ENDPOINT_URL_S3")
            .envs(envs.iter().copied())
            .output()
            .expect("run custos");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(
            r.code, 0,
            "custos {args:?} failed:\n{}\n{}",
            r.stdout, r.stderr
        );
        r
    }

    /// Restores the tenant's latest snapshot into `target`, asserting success.
    pub fn restore_latest(&self, tenant: &str, target: &Path) -> Run {
        self.ok(&[
            "restore",
            tenant,
            "latest",
            "--target",
            target.to_str().unwrap(),
        ])
    }

    /// Sets a short lease TTL (10 s): a test re-running a command that a
    /// crash hook aborted waits this long for the dead run's lease.
    pub fn short_lease(&self) {
        let toml = self.path().join("custos.toml");
        let mut text = fs::read_to_string(&toml).unwrap();
        text.push_str("[daemon]\nlease_ttl = \"10s\"\n");
        fs::write(&toml, text).unwrap();
    }

    pub fn descriptor_path(&self, tenant: &str) -> std::path::PathBuf {
        self.store()
            .join("tenants")
            .join(tenant)
            .join("tenant.json")
    }

    /// A tenant's descriptor as JSON.
    pub fn descriptor(&self, tenant: &str) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.descriptor_path(tenant)).unwrap()).unwrap()
    }

    /// What a store writer does: edits a descriptor and bumps its
    /// generation, so no replay check can tell.
    pub fn tamper(&self, tenant: &str, f: impl FnOnce(&mut serde_json::Value)) {
        let mut d = self.descriptor(tenant);
        f(&mut d);
        d["generation"] = (d["generation"].as_u64().unwrap() + 1).into();
        fs::write(
            self.descriptor_path(tenant),
            serde_json::to_vec_pretty(&d).unwrap(),
        )
        .unwrap();
    }

    /// Every object of a tenant (relative path → bytes), leases excluded.
    pub fn objects(&self, tenant: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let root = self.store().join("tenants").join(tenant);
        let mut out = std::collections::BTreeMap::new();
        for p in files_under(&root) {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if !rel.starts_with("locks/") && !rel.contains("/.") {
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
        out
    }

    /// Store paths of a tenant's objects under `dir` ("packs", "index", "snapshots", "keys").
    pub fn object_paths(&self, tenant: &str, dir: &str) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = self
            .objects(tenant)
            .into_keys()
            .filter(|k| k.starts_with(&format!("{dir}/")))
            .map(|k| self.store().join("tenants").join(tenant).join(k))
            .collect();
        v.sort();
        v
    }
}

/// Options for a backup of one directory, as source `data`, with defaults otherwise.
pub fn backup_options(path: &Path) -> custos::jobs::backup::BackupOptions {
    custos::jobs::backup::BackupOptions {
        sources: vec![custos::source::Source::Path {
            name: "data".into(),
            path: path.to_owned(),
            exclude: vec![],
            one_file_system: false,
        }],
        packer: custos::pipeline::packer::PackerConfig::default(),
        allow_unreadable: false,
        tags: vec![],
        force_read: false,
    }
}

/// One backup of `path` through the library, under a lease of its own.
pub async fn backup_dir(
    ctx: &custos::context::Context,
    repo: &custos::repo::Repo,
    path: &Path,
) -> custos::jobs::backup::BackupReport {
    backup_with(ctx, repo, backup_options(path)).await
}

/// One backup with `opts` through the library, under a lease of its own.
pub async fn backup_with(
    ctx: &custos::context::Context,
    repo: &custos::repo::Repo,
    opts: custos::jobs::backup::BackupOptions,
) -> custos::jobs::backup::BackupReport {
    let lease = custos::store::lease::LeaseGuard::acquire(
        repo.store(),
        &ctx.holder,
        "backup",
        ctx.lease_ttl,
    )
    .await
    .unwrap();
    let report = custos::jobs::backup::run(repo, &lease, opts, &custos::jobs::NoProgress)
        .await
        .unwrap();
    lease.release().await;
    report
}

/// A variable of the test environment, unset when empty or blank.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Settings for the KMS the environment names (`scripts/emulators.sh env`),
/// with the emulator defaults for anything unset. Passed explicitly, so the
/// test process never needs to change its environment.
pub fn aws_settings() -> custos::keys::aws_kms::AwsKmsSettings {
    custos::keys::aws_kms::AwsKmsSettings {
        region: Some(
            env("AWS_REGION")
                .or_else(|| env("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|| "us-east-1".into()),
        ),
        endpoint_url: env("AWS_ENDPOINT_URL_KMS")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| Some("http://127.0.0.1:4566".into())),
        access_key_id: Some(env("AWS_ACCESS_KEY_ID").unwrap_or_else(|| "test".into())),
        secret_access_key: Some(env("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|| "test".into())),
        profile: None,
    }
}

/// Connection settings for the S3 the environment names, with the same
/// defaults as [`aws_settings`].
pub fn s3_options() -> custos::store::s3::S3Options {
    let kms = aws_settings();
    custos::store::s3::S3Options {
        region: kms.region,
        endpoint_url: env("AWS_ENDPOINT_URL_S3")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| Some("http://127.0.0.1:4566".into())),
        allow_http: Some(true),
        access_key_id: kms.access_key_id,
        secret_access_key: kms.secret_access_key,
        session_token: None,
    }
}

/// The emulator's test bucket (`scripts/emulators.sh` creates it).
pub fn s3_bucket() -> String {
    env("CUSTOS_TEST_S3_BUCKET").unwrap_or_else(|| "custos-test".into())
}

/// The PKCS#11 token the environment names (`scripts/softhsm.sh start`, or a
/// real HSM's module, token and PIN file exported by hand). `None` (with a
/// `skipped:` line) when unset; a panic when unset and `CUSTOS_TEST_EMULATORS=1`.
pub fn pkcs11_settings() -> Option<(custos::keys::pkcs11::Pkcs11Settings, String)> {
    let vars = (
        env("CUSTOS_TEST_PKCS11_MODULE"),
        env("CUSTOS_TEST_PKCS11_TOKEN"),
        env("CUSTOS_TEST_PKCS11_PIN_FILE"),
    );
    let (Some(module), Some(token), Some(pin_file)) = vars else {
        require(
            false,
            "a PKCS#11 token (CUSTOS_TEST_PKCS11_MODULE, _TOKEN, _PIN_FILE from scripts/softhsm.sh start)",
        );
        return None;
    };
    Some((
        custos::keys::pkcs11::Pkcs11Settings {
            module: module.into(),
            pin: custos::keys::pkcs11::PinSource::File(pin_file.into()),
            max_sessions: 4,
            timeout: std::time::Duration::from_secs(30),
            network: false,
        },
        token,
    ))
}

/// SoftHSM2's file object store is not safe for two processes on one token:
/// while one writes, another can see `C_GenerateKey: GeneralError` or the
/// token as uninitialised ("tokens present: \"\""). Tests that use the token
/// only from this process share it; a test that runs custos as a child
/// process on it holds it alone. A real HSM does not need this; it costs
/// little there.
static TOKEN_USERS: std::sync::Mutex<TokenUsers> = std::sync::Mutex::new(TokenUsers {
    shared: 0,
    alone: false,
    waiting_alone: 0,
});
static TOKEN_USERS_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

struct TokenUsers {
    shared: usize,
    alone: bool,
    /// Tests waiting to hold it alone: new sharers wait behind them.
    waiting_alone: usize,
}

/// Held while a test uses the PKCS#11 token (see [`TOKEN_USERS`]). A plain
/// value, unlike a lock guard, so the async fixtures that hold it stay `Send`.
pub struct TokenUse {
    alone: bool,
}

fn token_users() -> std::sync::MutexGuard<'static, TokenUsers> {
    TOKEN_USERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn wait_token_users(
    users: std::sync::MutexGuard<'static, TokenUsers>,
) -> std::sync::MutexGuard<'static, TokenUsers> {
    TOKEN_USERS_CHANGED
        .wait(users)
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The token, from this process only, beside other such tests.
pub fn pkcs11_shared() -> TokenUse {
    let mut users = token_users();
    while users.alone || users.waiting_alone > 0 {
        users = wait_token_users(users);
    }
    users.shared += 1;
    TokenUse { alone: false }
}

/// The token, from child processes too: no other test uses it meanwhile.
pub fn pkcs11_alone() -> TokenUse {
    let mut users = token_users();
    users.waiting_alone += 1;
    while users.alone || users.shared > 0 {
        users = wait_token_users(users);
    }
    users.waiting_alone -= 1;
    users.alone = true;
    TokenUse { alone: true }
}

impl Drop for TokenUse {
    fn drop(&mut self) {
        let mut users = token_users();
        if self.alone {
            users.alone = false;
        } else {
            users.shared -= 1;
        }
        drop(users);
        TOKEN_USERS_CHANGED.notify_all();
    }
}

/// A session on the test token, opened directly (not through custos)
/// and logged in as the user. Callers hold `module_lock`, as custos does
/// around every call on SoftHSM2 (it fails writes beside other threads'
/// calls) and around its writes on any module.
pub fn token_session(
    settings: &custos::keys::pkcs11::Pkcs11Settings,
    token: &str,
) -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::UserType;
    let ctx = Pkcs11::new(&settings.module).unwrap();
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("C_Initialize: {e}"),
    }
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .expect("the test token");
    // Never finalised: C_Finalize on drop would end the module for the
    // provider this process's other tests use at the same time.
    let ctx = std::mem::ManuallyDrop::new(ctx);
    let session = ctx.open_rw_session(slot).unwrap();
    let custos::keys::pkcs11::PinSource::File(pin_file) = &settings.pin else {
        unreachable!()
    };
    let pin = std::fs::read_to_string(pin_file).unwrap();
    match session.login(UserType::User, Some(&pin.trim().into())) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
        }
        Err(e) => panic!("C_Login: {e}"),
    }
    session
}

/// Runs `f` on a session of the test token opened directly (not through
/// custos), under the module lock.
pub fn on_token<T>(
    settings: &custos::keys::pkcs11::Pkcs11Settings,
    token: &str,
    f: impl FnOnce(&cryptoki::session::Session) -> T,
) -> T {
    let lock = custos::keys::pkcs11::module_lock(&settings.module).unwrap();
    let _serial = lock.lock().unwrap();
    f(&token_session(settings, token))
}

/// The one secret key labelled `label` with CKA_ID `id`.
pub fn version_handle(
    s: &cryptoki::session::Session,
    label: &str,
    id: u32,
) -> cryptoki::object::ObjectHandle {
    use cryptoki::object::{Attribute, ObjectClass};
    let found = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_be_bytes().to_vec()),
        ])
        .unwrap();
    assert_eq!(found.len(), 1, "{label} id {id}: {found:?}");
    found[0]
}

/// A fresh PKCS#11 key reference on the test token (not created).
pub fn pkcs11_key(token: &str, hint: &str) -> custos::keys::KeyRef {
    custos::keys::KeyRef::parse(&format!(
        "pkcs11:token={token};object=custos-test-{hint}-{}",
        hex::encode(custos::util::random_bytes::<6>())
    ))
    .unwrap()
}

/// Settings for the KMIP server the environment names (`scripts/pykmip.sh
/// start` prints them): `None`, with a `skipped:` line, when they are unset
/// outside CI; with `CUSTOS_TEST_EMULATORS=1` a missing server fails the test.
pub fn kmip_settings() -> Option<custos::keys::kmip::KmipSettings> {
    let vars = [
        "CUSTOS_TEST_KMIP_SERVER",
        "CUSTOS_TEST_KMIP_CA",
        "CUSTOS_TEST_KMIP_CERT",
        "CUSTOS_TEST_KMIP_KEY",
    ];
    let values: Vec<Option<String>> = vars.iter().map(|v| env(v)).collect();
    if values.iter().any(Option::is_none) {
        if strict() {
            panic!(
                "CUSTOS_TEST_EMULATORS=1 but {} unset: the KMIP tests need a KMIP server (scripts/pykmip.sh start)",
                vars.join(", ")
            );
        }
        eprintln!(
            "skipped: set CUSTOS_TEST_KMIP_* (scripts/pykmip.sh start) to test the KMIP provider"
        );
        return None;
    }
    let v: Vec<String> = values.into_iter().flatten().collect();
    Some(custos::keys::kmip::KmipSettings::new(
        &v[0],
        Path::new(&v[1]),
        Path::new(&v[2]),
        Path::new(&v[3]),
    ))
}
