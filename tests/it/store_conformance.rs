//! One conformance suite for every object store custos opens, the way
//! `object_store`'s own `integration` module checks its backends: the local
//! store (`file://`, `custos::store::local`), the fault decorator with no fault
//! configured (`custos::store::faults::FaultyStore`, which must then be
//! invisible), and S3 (the emulator the environment names; runs, and must pass,
//! when `CUSTOS_TEST_EMULATORS=1`, else prints `skipped:`).
//!
//! The generic checks are object_store's; the custos checks below them are the
//! properties the leases, the tenant scoping and the pack reader rest on.

use bytes::Bytes;
use custos::TenantId;
#[cfg(feature = "test-hooks")]
use custos::store::faults::{FaultConfig, FaultyStore};
use custos::store::{ObjectName, SharedStore, TenantStore};
use futures::TryStreamExt;
use object_store::integration;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion};

use crate::common;

/// A store under test, empty, with whatever keeps it alive.
struct Subject {
    store: SharedStore,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh `file://` store, opened as custos opens one.
fn local() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let store = custos::store::local::open(&dir.path().join("store")).unwrap();
    Subject {
        store,
        _dir: Some(dir),
    }
}

/// The local store behind the fault decorator with every rate at zero.
#[cfg(feature = "test-hooks")]
fn faults_off() -> Subject {
    let Subject { store, _dir } = local();
    Subject {
        store: std::sync::Arc::new(FaultyStore::new(store, FaultConfig::default())),
        _dir,
    }
}

/// A fresh random prefix of the emulator's test bucket (object_store's checks
/// delete everything they can list, so never the bucket's root).
fn s3() -> Option<Subject> {
    if !common::require(
        common::strict(),
        "the S3 emulator (CUSTOS_TEST_EMULATORS=1)",
    ) {
        return None;
    }
    let prefix = format!(
        "conformance/{}",
        hex::encode(custos::util::random_bytes::<6>())
    );
    let store = custos::store::s3::open(&common::s3_bucket(), &prefix, &common::s3_options())
        .expect("S3 store from the test environment");
    Some(Subject { store, _dir: None })
}

/// One `#[tokio::test]` per store and check, named `<store>::<check>`.
macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::local().store).await;
                }
            )*
        }
        #[cfg(feature = "test-hooks")]
        mod faults_off {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(&super::faults_off().store).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    if let Some(s) = super::s3() {
                        super::$check(&s.store).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    put_get_delete_list,
    get_opts,
    conditional_puts,
    list_uses_directories,
    list_with_delimiter,
    missing_object,
    multipart_upload,
    concurrent_creates_have_one_winner,
    update_takes_the_version_head_reports,
    tenant_views_are_isolated,
    deleting_a_missing_object_succeeds,
    ranges_read_exact_bytes,
    a_range_past_the_end_is_a_corrupt_object,
);

// ---------------------------------------------------------------------------
// object_store's checks
// ---------------------------------------------------------------------------

/// Put, get (whole, ranges, several ranges), head, list by prefix and offset, delete.
async fn put_get_delete_list(store: &SharedStore) {
    integration::put_get_delete_list(store.as_ref()).await;
}

/// Conditional gets (if-match, if-modified-since, …) and ranges through `get_opts`.
async fn get_opts(store: &SharedStore) {
    integration::get_opts(store.as_ref()).await;
}

/// `PutMode::Create` refuses an existing object; `PutMode::Update` with a stale
/// or missing version fails; concurrent read-modify-write loses no update.
/// The leases rest on exactly this.
async fn conditional_puts(store: &SharedStore) {
    integration::put_opts(store.as_ref(), true).await;
}

async fn list_uses_directories(store: &SharedStore) {
    integration::list_uses_directories_correctly(store.as_ref()).await;
}

/// Tenant discovery lists `tenants/` with a delimiter.
async fn list_with_delimiter(store: &SharedStore) {
    integration::list_with_delimiter(store.as_ref()).await;
}

async fn missing_object(store: &SharedStore) {
    let err = integration::get_nonexistent_object(store.as_ref(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
}

/// Restores to a store upload through `BufWriter`, i.e. multipart.
async fn multipart_upload(store: &SharedStore) {
    integration::stream_get(store.as_ref()).await;
}

// ---------------------------------------------------------------------------
// What custos relies on beyond that
// ---------------------------------------------------------------------------

fn create() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    }
}

/// Two daemons racing for a lease: of many creates of one name at once,
/// exactly one succeeds and every other sees `AlreadyExists`.
async fn concurrent_creates_have_one_winner(store: &SharedStore) {
    let path = Path::from("locks/lease");
    let attempts = (0..8).map(|i| {
        let store = store.clone();
        let path = path.clone();
        tokio::spawn(async move {
            store
                .put_opts(&path, format!("holder {i}").into(), create())
                .await
        })
    });
    let results = futures::future::join_all(attempts).await;
    let mut winners = 0;
    for r in results {
        match r.unwrap() {
            Ok(_) => winners += 1,
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => panic!("a losing create must fail with AlreadyExists, not: {e}"),
        }
    }
    assert_eq!(winners, 1, "exactly one create wins");
}

/// A lease renewal reads the object's version with `head` (or `get`) and
/// writes with `PutMode::Update` of that version: the version a put returns,
/// the one `head` reports and the one `get` reports must be the same, and
/// must change with every write.
async fn update_takes_the_version_head_reports(store: &SharedStore) {
    let path = Path::from("locks/lease");
    let put = store.put_opts(&path, "a".into(), create()).await.unwrap();
    let head = store.head(&path).await.unwrap();
    assert!(head.e_tag.is_some(), "conditional updates need an e-tag");
    assert_eq!(put.e_tag, head.e_tag, "put and head agree on the version");
    let got = store.get(&path).await.unwrap();
    assert_eq!(
        got.meta.e_tag, head.e_tag,
        "get and head agree on the version"
    );

    let seen = UpdateVersion {
        e_tag: head.e_tag.clone(),
        version: head.version.clone(),
    };
    let renewed = store
        .put_opts(&path, "bb".into(), PutMode::Update(seen.clone()).into())
        .await
        .unwrap();
    assert_ne!(renewed.e_tag, head.e_tag, "a write changes the version");
    let err = store
        .put_opts(&path, "c".into(), PutMode::Update(seen).into())
        .await
        .unwrap_err();
    assert!(
        matches!(err, object_store::Error::Precondition { .. }),
        "{err}"
    );
    let body = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(body, "bb", "the stale update changed nothing");
}

/// A tenant's view never reaches a tenant whose id extends it (`acme` and
/// `acme-2`): prefixes end at a path segment, in listings and in deletes.
async fn tenant_views_are_isolated(store: &SharedStore) {
    let a = TenantStore::new(store.clone(), &TenantId::new("acme").unwrap());
    let b = TenantStore::new(store.clone(), &TenantId::new("acme-2").unwrap());
    a.put(&ObjectName::Descriptor, Bytes::from_static(b"a"))
        .await
        .unwrap();
    b.put(&ObjectName::Descriptor, Bytes::from_static(b"b"))
        .await
        .unwrap();
    b.put(&ObjectName::Lease, Bytes::from_static(b"lease"))
        .await
        .unwrap();

    let listed: Vec<_> = a
        .list_all()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.path.to_string())
        .collect();
    assert_eq!(listed, ["tenant.json"]);
    a.delete(&ObjectName::Lease).await.unwrap();
    assert!(b.head(&ObjectName::Lease).await.unwrap().is_some());
    assert_eq!(b.get(&ObjectName::Descriptor).await.unwrap(), "b");

    let root: Vec<Path> = store
        .list(Some(&Path::from("tenants")))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(root.len(), 3, "{root:?}");
    let tenants = store
        .list_with_delimiter(Some(&Path::from("tenants")))
        .await
        .unwrap();
    let mut dirs: Vec<_> = tenants
        .common_prefixes
        .iter()
        .map(|p| p.to_string())
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["tenants/acme", "tenants/acme-2"]);
}

/// Shred and prune delete what may already be gone (a re-run after a crash):
/// the stores differ (S3 succeeds, a file system says `NotFound`), the
/// tenant view makes both a success, and a missing object reads as absent.
async fn deleting_a_missing_object_succeeds(store: &SharedStore) {
    let t = TenantStore::new(store.clone(), &TenantId::new("gone").unwrap());
    t.delete(&ObjectName::Lease).await.unwrap();
    assert!(t.head(&ObjectName::Lease).await.unwrap().is_none());
    assert!(t.get_if_exists(&ObjectName::Lease).await.unwrap().is_none());
    assert!(t.get(&ObjectName::Lease).await.is_err());
    assert!(t.list_all().await.unwrap().is_empty());
}

/// The pack reader fetches headers and blobs by range, several at once.
async fn ranges_read_exact_bytes(store: &SharedStore) {
    let t = TenantStore::new(store.clone(), &TenantId::new("ranges").unwrap());
    let body: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    t.put(&ObjectName::Descriptor, Bytes::from(body.clone()))
        .await
        .unwrap();
    let ranges = [
        0..16,
        50_000..50_001,
        99_000..100_000,
        10..20_000,
        0..100_000,
    ];
    let parts = t
        .get_ranges(&ObjectName::Descriptor, &ranges)
        .await
        .unwrap();
    for (part, r) in parts.iter().zip(&ranges) {
        let want = &body[r.start as usize..r.end as usize];
        assert!(part.as_ref() == want, "range {r:?}");
    }
}

/// An object shorter than its index says (truncated or replaced) is reported
/// as corrupt, not retried as a short read nor returned short.
async fn a_range_past_the_end_is_a_corrupt_object(store: &SharedStore) {
    let t = TenantStore::new(store.clone(), &TenantId::new("short").unwrap());
    t.put(&ObjectName::Descriptor, Bytes::from(vec![7u8; 1000]))
        .await
        .unwrap();
    for range in [900..1100, 1000..1010, 2000..2100] {
        let err = t
            .get_range(&ObjectName::Descriptor, range.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("shorter than"), "{range:?}: {err}");
        assert!(!err.is_transient(), "{range:?}: {err}");
    }
}
