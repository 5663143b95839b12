//! How many store requests a restore makes, counted the way an S3 client
//! makes them (the default `get_ranges`: one GET per range after merging
//! ranges closer than 1 MiB), and the whole-pack read path refusing a pack
//! served truncated, extended or with a flipped byte.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path as StorePath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use custos::context::Context;
use custos::jobs::{self, NoProgress};
use custos::keys::KeyRef;
use custos::repo::Repo;
use custos::store::SharedStore;
use custos::tenant::TenantId;

use crate::common;

/// Counts GETs (ranged or not) by object path, and apart those that read up
/// to the object's end (a pack's directory); everything else passes.
#[derive(Debug)]
struct CountingStore {
    inner: SharedStore,
    gets: Arc<Mutex<BTreeMap<String, usize>>>,
    ends: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CountingStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &StorePath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &StorePath,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &StorePath, options: GetOptions) -> Result<GetResult> {
        let head = options.head;
        if !head {
            *self
                .gets
                .lock()
                .unwrap()
                .entry(location.to_string())
                .or_default() += 1;
        }
        let got = self.inner.get_opts(location, options).await?;
        if !head && got.range.end == got.meta.size {
            *self
                .ends
                .lock()
                .unwrap()
                .entry(location.to_string())
                .or_default() += 1;
        }
        Ok(got)
    }

    // `get_ranges` is the trait's default on purpose: each merged range is
    // one `get_opts`, as the S3 client sends them.

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<StorePath>>,
    ) -> BoxStream<'static, Result<StorePath>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&StorePath>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&StorePath>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: CopyOptions,
    ) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    ctx: Context,
    repo: Repo,
    gets: Arc<Mutex<BTreeMap<String, usize>>>,
    ends: Arc<Mutex<BTreeMap<String, usize>>>,
}

/// A tenant backed up (10 MiB of random data and small files) into several
/// small packs of a local store seen through a [`CountingStore`].
async fn setup() -> Setup {
    setup_with(3 << 20, |data| common::make_tree_with(data, 50, 10 << 20)).await
}

/// [`setup`] with packs of `pack_size` and the tree `make` writes.
async fn setup_with(pack_size: usize, make: impl FnOnce(&Path)) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let local = custos::store::local::open(&root.join("store")).unwrap();
    let gets = Arc::new(Mutex::new(BTreeMap::new()));
    let ends = Arc::new(Mutex::new(BTreeMap::new()));
    let store: SharedStore = Arc::new(CountingStore {
        inner: local,
        gets: gets.clone(),
        ends: ends.clone(),
    });
    let ctx =
        Context::with_store(store, format!("file://{}/store", root.display()), &root).unwrap();
    let tenant = TenantId::new("acme").unwrap();
    let (repo, _) = Repo::init(&ctx, &tenant, &KeyRef::local("acme").unwrap(), false)
        .await
        .unwrap();
    let data = root.join("data");
    make(&data);
    let mut opts = common::backup_options(&data);
    opts.packer.pack_size = pack_size;
    // One packer: each pack holds a run of the tree, whatever the threads'
    // timing (two packers can leave one pack spanning three batches).
    opts.packer.workers = 1;
    common::backup_with(&ctx, &repo, opts).await;
    Setup {
        _tmp: tmp,
        root,
        ctx,
        repo,
        gets,
        ends,
    }
}

async fn restore(s: &Setup, target: &Path) -> custos::Result<jobs::restore::RestoreReport> {
    let snap = s.repo.find_snapshot("latest").await.unwrap();
    jobs::restore::run(
        &s.repo,
        &snap,
        &jobs::restore::RestoreOptions {
            target: target.to_owned(),
            include: vec![],
            overwrite: false,
        },
        &NoProgress,
    )
    .await
}

fn pack_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(root.join("store/tenants/acme/packs")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for f in std::fs::read_dir(&shard).unwrap() {
                out.push(f.unwrap().path());
            }
        } else {
            out.push(shard);
        }
    }
    out.sort();
    out
}

/// A full restore reads each pack in one request: every blob of it is
/// wanted, so it is read whole, not as header, trailer and ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restore_reads_each_pack_once() {
    let s = setup().await;
    let packs = pack_files(&s.root);
    assert!(packs.len() >= 3, "{} packs: too few to count", packs.len());
    s.gets.lock().unwrap().clear();
    s.ends.lock().unwrap().clear();
    let target = s.root.join("restore");
    let r = restore(&s, &target).await.unwrap();
    assert_eq!(r.files, 54);
    common::assert_same(&s.root.join("data"), &target.join("data"));
    assert_each_pack_read_once(&s, packs.len()).await;
    drop(s.ctx);
}

/// A restore of more files than a batch takes (4,096, fewer under a low
/// open-file limit) still reads each pack once: the packs a batch wants
/// only part of, those the backup was filling where the batch ends, are
/// deferred to the next batch, which wants the rest (before, each such pack
/// was read twice: streamed by one batch, by ranges by the next).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_of_several_batches_reads_each_pack_once() {
    // Packs of at most about 750 of these files: the pack being filled where
    // a batch ends feeds fewer than half of its files, and is deferred.
    let s = setup_with(3 << 19, |data| {
        for d in 0..3 {
            let dir = data.join(format!("d{d}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..3000 {
                let mut content = vec![0u8; 1500 + (i * 7) % 1000];
                custos::util::fill_random(&mut content);
                std::fs::write(dir.join(format!("f{i:04}")), &content).unwrap();
            }
        }
    })
    .await;
    let packs = pack_files(&s.root);
    assert!(packs.len() >= 4, "{} packs: too few to count", packs.len());
    s.gets.lock().unwrap().clear();
    s.ends.lock().unwrap().clear();
    let target = s.root.join("restore");
    let r = restore(&s, &target).await.unwrap();
    assert_eq!(r.files, 9000);
    common::assert_same(&s.root.join("data"), &target.join("data"));
    assert_each_pack_read_once(&s, packs.len()).await;
    drop(s.ctx);
}

/// Every pack was read, each once, but for the reads of the snapshot's tree
/// blobs: its end (the directory, which a tree blob's read never reaches) by
/// exactly one request.
async fn assert_each_pack_read_once(s: &Setup, packs: usize) {
    let ends = s.ends.lock().unwrap().clone();
    let ends_of_packs: Vec<_> = ends.iter().filter(|(p, _)| p.contains("/packs/")).collect();
    assert_eq!(
        ends_of_packs.len(),
        packs,
        "every pack's end is read: {ends:?}"
    );
    assert!(
        ends_of_packs.iter().all(|(_, n)| **n == 1),
        "each pack's end is read once: {ends:?}"
    );
    let gets = s.gets.lock().unwrap().clone();
    let on_packs: Vec<(&String, &usize)> =
        gets.iter().filter(|(p, _)| p.contains("/packs/")).collect();
    assert_eq!(on_packs.len(), packs, "every pack is read: {on_packs:?}");
    // The snapshot's tree blobs are read before the restore plans, by their
    // own requests (`TreeReader`): a pack's header and the blob, two GETs
    // when they lie more than 1 MiB apart (object_store coalesces closer
    // ranges). Which packs hold tree blobs depends on how the backup's
    // packers interleaved, so it is taken from the index. Every pack without
    // a tree blob is read exactly once.
    let (index, _) = s.repo.load_index().await.unwrap();
    let mut trees_by_pack: BTreeMap<String, usize> = BTreeMap::new();
    for (_, loc) in index.blobs() {
        if loc.kind == custos::format::pack::BlobKind::Tree {
            *trees_by_pack
                .entry(index.pack(loc).0.to_string())
                .or_default() += 1;
        }
    }
    assert!(!trees_by_pack.is_empty(), "the snapshot has tree blobs");
    for id in trees_by_pack.keys() {
        assert!(
            on_packs.iter().any(|(p, _)| p.ends_with(id.as_str())),
            "tree pack {id} is read: {on_packs:?}"
        );
    }
    for (pack, n) in &on_packs {
        let trees = pack
            .rsplit('/')
            .next()
            .and_then(|id| trees_by_pack.get(id))
            .copied()
            .unwrap_or(0);
        let most = 1 + 2 * trees;
        assert!(
            **n <= most,
            "{pack}: {n} GETs, at most {most}: {on_packs:?}"
        );
    }
}

/// The largest pack of the store (the one holding most of the random file).
fn largest_pack(root: &Path) -> std::path::PathBuf {
    pack_files(root)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
}

async fn refused_after(tamper: impl FnOnce(&Path)) {
    let s = setup().await;
    tamper(&largest_pack(&s.root));
    let target = s.root.join("restore");
    let err = restore(&s, &target).await.unwrap_err();
    assert_eq!(err.kind(), "corrupt_object", "{err}");
    assert!(err.to_string().contains("/packs/"), "{err}");
    // Nothing claims to be restored: no file is in place, and no temporary
    // one is left behind.
    let left: Vec<_> = common::files_under(&target)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).unwrap().is_file())
        .collect();
    assert!(left.is_empty(), "left after a refused restore: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pack_read_refuses_a_truncated_pack() {
    refused_after(|p| {
        let len = std::fs::metadata(p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(len - 100).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pack_read_refuses_an_extended_pack() {
    refused_after(|p| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pack_read_refuses_a_flipped_byte() {
    refused_after(|p| {
        let mut b = std::fs::read(p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x40;
        std::fs::write(p, b).unwrap();
    })
    .await;
}
