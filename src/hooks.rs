//! The seams where test builds inject faults and crashes, and the only place
//! production code reaches them.
//!
//! Built with the `test-hooks` cargo feature (the test suite, the crash loop,
//! the fuzz targets), three environment variables take effect:
//!
//! - `CUSTOS_FAULTS`: every store opened through [`crate::context::open_store`]
//!   is wrapped in the fault injector `store::faults::FaultyStore`;
//! - `CUSTOS_KEY_FAULTS`: every configured key provider is wrapped in
//!   `keys::faults::FaultyKeyProvider`;
//! - `CUSTOS_CRASH_AT=<scope>:<point>`: the process aborts at that crash point
//!   (`std::process::abort`: no destructors, no lease release, no audit
//!   `.end` record), as if killed there;
//! - `CUSTOS_NOW=<RFC 3339 time>`: [`now`], the time audit records are
//!   stamped with and compliance reports are computed at, starts at that
//!   time and runs on from it, so a test builds months of history in seconds;
//! - `CUSTOS_INDEX_FILE_BLOBS=<n>`: index files are written with at most `n`
//!   blobs ([`index_file_blobs`]), so that a crash loop whose backups store a
//!   few blobs writes index files along the way as one of millions does;
//! - `CUSTOS_CHECK_WINDOW=<bytes>`: `check --read-data` reads packs in windows
//!   of that many bytes and reads that much of a pack's end first
//!   ([`check_window`]), so the small packs of a test are read in pieces as
//!   a 16 MiB pack is;
//! - `CUSTOS_RESTORE_BATCH_FILES=<n>`: a restore puts its files in place in
//!   batches of at most `n` ([`restore_batch_files`]), so a test's few files
//!   make several overlapping batches.
//!
//! In the default build (what ships) each function below is an empty inline
//! function: no variable is read, nothing is wrapped, no crash point is
//! reachable, so no environment can make a production daemon fail or crash on
//! purpose. `scripts/check-default-build.sh` proves it on the binary.

use crate::keys::KeyProviders;
use crate::store::SharedStore;

/// The check-window variable (`test-hooks` builds only).
#[cfg(feature = "test-hooks")]
pub const CHECK_WINDOW: &str = "CUSTOS_CHECK_WINDOW";

/// The bytes `check --read-data` reads of a pack at a time and of its end
/// first: `default`; in a `test-hooks` build with `CUSTOS_CHECK_WINDOW` set,
/// that number for both.
#[inline]
pub fn check_window(default: (u64, u64)) -> (u64, u64) {
    #[cfg(feature = "test-hooks")]
    if let Ok(text) = std::env::var(CHECK_WINDOW) {
        match text.parse::<u64>() {
            Ok(n) if n > 0 => return (n, n),
            _ => {
                eprintln!("{CHECK_WINDOW}={text:?}: not a positive number; aborting (test hook)");
                std::process::abort();
            }
        }
    }
    default
}

/// The restore-batch variable (`test-hooks` builds only).
#[cfg(feature = "test-hooks")]
pub const RESTORE_BATCH_FILES: &str = "CUSTOS_RESTORE_BATCH_FILES";

/// Files a restore batch takes at most: `default`; in a `test-hooks` build
/// with `CUSTOS_RESTORE_BATCH_FILES` set, that number, so that a test's few
/// files make several batches, as millions do.
#[inline]
pub fn restore_batch_files(default: usize) -> usize {
    #[cfg(feature = "test-hooks")]
    if let Ok(text) = std::env::var(RESTORE_BATCH_FILES) {
        match text.parse::<usize>() {
            Ok(n) if n > 0 => return n,
            _ => {
                eprintln!(
                    "{RESTORE_BATCH_FILES}={text:?}: not a positive number; aborting (test hook)"
                );
                std::process::abort();
            }
        }
    }
    default
}

/// The crash-point variable (`test-hooks` builds only).
#[cfg(feature = "test-hooks")]
pub const CRASH_AT: &str = "CUSTOS_CRASH_AT";

/// The clock variable (`test-hooks` builds only).
#[cfg(feature = "test-hooks")]
pub const NOW: &str = "CUSTOS_NOW";

/// The index-file-size variable (`test-hooks` builds only).
#[cfg(feature = "test-hooks")]
pub const INDEX_FILE_BLOBS: &str = "CUSTOS_INDEX_FILE_BLOBS";

/// Blobs an index file custos writes holds at most:
/// [`MAX_FILE_BLOBS`](crate::format::index::MAX_FILE_BLOBS); in a
/// `test-hooks` build with `CUSTOS_INDEX_FILE_BLOBS` set, that number.
#[inline]
pub fn index_file_blobs() -> usize {
    #[cfg(feature = "test-hooks")]
    if let Ok(text) = std::env::var(INDEX_FILE_BLOBS) {
        match text.parse::<usize>() {
            Ok(n) if n > 0 => return n,
            _ => {
                // A test's typo must not silently run with the real size.
                eprintln!(
                    "{INDEX_FILE_BLOBS}={text:?}: not a positive number; aborting (test hook)"
                );
                std::process::abort();
            }
        }
    }
    crate::format::index::MAX_FILE_BLOBS
}

/// The time of the audit log and of compliance reports: the system clock;
/// in a `test-hooks` build with `CUSTOS_NOW` set, that time plus the time
/// elapsed since this process first asked (so it still moves forward).
#[inline]
pub fn now() -> chrono::DateTime<chrono::Utc> {
    #[cfg(feature = "test-hooks")]
    if let Some(t) = fake_now() {
        return t;
    }
    chrono::Utc::now()
}

#[cfg(feature = "test-hooks")]
fn fake_now() -> Option<chrono::DateTime<chrono::Utc>> {
    use std::sync::OnceLock;
    static START: OnceLock<Option<(chrono::DateTime<chrono::Utc>, std::time::Instant)>> =
        OnceLock::new();
    let (base, since) = START
        .get_or_init(|| {
            let text = std::env::var(NOW).ok()?;
            match chrono::DateTime::parse_from_rfc3339(&text) {
                Ok(t) => Some((t.with_timezone(&chrono::Utc), std::time::Instant::now())),
                Err(e) => {
                    // A test's typo must not silently run on the real clock.
                    eprintln!("{NOW}={text:?}: not an RFC 3339 time ({e}); aborting (test hook)");
                    std::process::abort();
                }
            }
        })
        .as_ref()?;
    let elapsed = chrono::Duration::from_std(since.elapsed()).unwrap_or_default();
    Some(*base + elapsed)
}

/// Returns `store`, wrapped in the fault injector when this is a
/// `test-hooks` build and `CUSTOS_FAULTS` is set.
#[inline]
pub fn wrap_store(store: SharedStore) -> crate::Result<SharedStore> {
    #[cfg(feature = "test-hooks")]
    let store = crate::store::faults::from_env(store)?;
    Ok(store)
}

/// Wraps every configured key provider in the fault injector when this is a
/// `test-hooks` build and `CUSTOS_KEY_FAULTS` is set.
#[inline]
pub fn wrap_keys(keys: &mut KeyProviders) -> crate::Result<()> {
    #[cfg(feature = "test-hooks")]
    crate::keys::faults::from_env(keys).map_err(|message| crate::Error::Config {
        path: "CUSTOS_KEY_FAULTS".into(),
        message,
    })?;
    #[cfg(not(feature = "test-hooks"))]
    let _ = keys;
    Ok(())
}

/// A crash point: in a `test-hooks` build, aborts the process when
/// `CUSTOS_CRASH_AT` names `<scope>:<point>`; an unset or unknown value does
/// nothing. Empty in the default build.
#[inline(always)]
pub fn crash_point(scope: &str, point: &str) {
    #[cfg(feature = "test-hooks")]
    crash_at(scope, point);
    #[cfg(not(feature = "test-hooks"))]
    let _ = (scope, point);
}

// Out of line, so that the hot callers inline only the call.
#[cfg(feature = "test-hooks")]
#[inline(never)]
fn crash_at(scope: &str, point: &str) {
    let Ok(wanted) = std::env::var(CRASH_AT) else {
        return;
    };
    if wanted.split_once(':') == Some((scope, point)) {
        eprintln!("{CRASH_AT}={wanted}: aborting here (test hook)");
        std::process::abort();
    }
}

/// The default build ignores the variables. Setting them in this process
/// would race with every other test reading the environment, so the test
/// re-runs its own binary with them set, and that child calls the hooks.
#[cfg(all(test, not(feature = "test-hooks")))]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Values that, in a `test-hooks` build, fail every store and key call and
    /// abort at the first crash point of a shred and of a local key write.
    const HOSTILE: &[(&str, &str)] = &[
        ("CUSTOS_FAULTS", "seed=1,error=1"),
        ("CUSTOS_KEY_FAULTS", "unreachable"),
        ("CUSTOS_CRASH_AT", "shred:fence"),
        ("CUSTOS_NOW", "2001-01-01T00:00:00Z"),
        ("CUSTOS_INDEX_FILE_BLOBS", "1"),
    ];
    const CHILD: &str = "CUSTOS_HOOKS_TEST_CHILD";

    #[test]
    fn the_default_build_ignores_the_hook_variables() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "hooks::tests::child_calls_every_hook",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(HOSTILE.iter().copied())
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child failed or aborted ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Run by the test above, with the variables set.
    #[tokio::test]
    #[ignore = "run by the_default_build_ignores_the_hook_variables, with the variables set"]
    async fn child_calls_every_hook() {
        use object_store::ObjectStoreExt;
        assert_eq!(
            std::env::var(CHILD).as_deref(),
            Ok("1"),
            "run by the parent"
        );
        for (k, v) in HOSTILE {
            assert_eq!(std::env::var(k).as_deref(), Ok(*v));
        }
        let store = crate::store::memory();
        let wrapped = wrap_store(store.clone()).unwrap();
        assert!(Arc::ptr_eq(&store, &wrapped), "the store was wrapped");
        let p = object_store::path::Path::from("a");
        wrapped.put(&p, b"x".to_vec().into()).await.unwrap();
        assert_eq!(
            &wrapped.get(&p).await.unwrap().bytes().await.unwrap()[..],
            b"x"
        );

        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn crate::keys::KeyProvider> =
            Arc::new(crate::keys::local::LocalKeyProvider::new(dir.path()).unwrap());
        let mut keys = KeyProviders {
            local: Some(local.clone()),
            ..Default::default()
        };
        wrap_keys(&mut keys).unwrap();
        assert!(
            Arc::ptr_eq(keys.local.as_ref().unwrap(), &local),
            "the key provider was wrapped"
        );

        // The clock is the system's, not 2001.
        assert!(now() > chrono::DateTime::parse_from_rfc3339("2020-01-01T00:00:00Z").unwrap());

        assert_eq!(index_file_blobs(), crate::format::index::MAX_FILE_BLOBS);

        // Would abort the process in a test-hooks build.
        crash_point("shred", "fence");
        crate::jobs::shred::hook::crash_point("shred", "fence");
    }
}
