//! A store that ignores conditional writes (garage's behaviour: `If-None-Match`
//! and `If-Match` accepted and ignored) is found by the probe, and every
//! feature that relies on conditional writes refuses to run on it instead of
//! corrupting it. The probe result is cached per store URL in the state dir.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use custos::TenantId;
use custos::context::Context;
use custos::jobs::runner::{JobSpec, run_job};
use custos::keys::KeyRef;
use custos::repo::Repo;
use custos::report::JobKind;
use futures::FutureExt;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// Wraps `InMemory` and turns every `Create`/`Update` into `Overwrite`.
#[derive(Debug, Default)]
struct IgnoresConditions(InMemory);

impl std::fmt::Display for IgnoresConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IgnoresConditions")
    }
}

#[async_trait]
impl ObjectStore for IgnoresConditions {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> Result<PutResult> {
        opts.mode = PutMode::Overwrite;
        self.0.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.0.get_opts(location, options).await
    }
    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.0.get_ranges(location, ranges).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.0.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.list(prefix)
    }
    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.list_with_offset(prefix, offset)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.0.copy_opts(from, to, options).await
    }
    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.0.rename_opts(from, to, options).await
    }
}

/// Every object outside `audit/` (the audit log's replica records the refusal,
/// which is wanted; what must not exist is tenant data).
async fn all_objects(store: &Arc<dyn ObjectStore>) -> Vec<String> {
    let all: Vec<String> = store
        .list(None)
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    all.into_iter()
        .filter(|p| !p.starts_with("audit/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_ignoring_conditional_writes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(IgnoresConditions::default());
    let ctx = Context::with_store(store.clone(), "s3://garage-like/x".into(), tmp.path()).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let key = KeyRef::local("acme").unwrap();

    let rec = custos::store::probe::probe_cached(&ctx, false)
        .await
        .unwrap();
    assert!(!rec.supported());
    assert!(rec.result.conclusive);
    assert!(
        rec.result
            .detail
            .as_deref()
            .unwrap()
            .contains("If-None-Match ignored"),
        "{rec:?}"
    );
    assert!(!rec.cached);

    // Initialisation (descriptor create) is refused...
    let err = Repo::init(&ctx, &tenant, &key, false).await.unwrap_err();
    assert_eq!(err.kind(), "conditional_writes_unsupported", "{err}");
    assert!(err.to_string().contains("s3://garage-like/x"), "{err}");
    // ...and so is every job that takes a lease, before it touches the store.
    let run = run_job(
        &ctx,
        JobSpec {
            tenant: &tenant,
            job: JobKind::Backup,
            policy_key: Some(&key),
            init_with: Some(&key),
        },
        |_repo, _lease, _| async { Ok(custos::jobs::check::CheckReport::default()) }.boxed(),
    )
    .await;
    let err = run.result.expect_err("refused");
    assert_eq!(err.kind(), "conditional_writes_unsupported");
    assert_eq!(
        run.report.error_kind,
        Some("conditional_writes_unsupported")
    );
    assert!(all_objects(&store).await.is_empty(), "nothing was written");

    // The result was cached: the next call does not probe again.
    let rec = custos::store::probe::probe_cached(&ctx, false)
        .await
        .unwrap();
    assert!(rec.cached && !rec.supported());
    assert!(
        std::fs::read_dir(tmp.path().join("state/probes"))
            .unwrap()
            .count()
            == 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_store_passes_and_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = Context::with_store(custos::store::memory(), "memory://".into(), tmp.path()).unwrap();
    let rec = custos::store::probe::probe_cached(&ctx, false)
        .await
        .unwrap();
    assert!(rec.supported() && !rec.cached);
    custos::store::probe::require_conditional_writes(&ctx)
        .await
        .unwrap();
    let again = custos::store::probe::probe_cached(&ctx, false)
        .await
        .unwrap();
    assert!(again.cached);
    let fresh = custos::store::probe::probe_cached(&ctx, true)
        .await
        .unwrap();
    assert!(!fresh.cached && fresh.supported());
    assert!(
        all_objects(&ctx.store).await.is_empty(),
        "probe objects are removed"
    );
}
