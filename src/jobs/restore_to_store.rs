//! `custos restore … --target-url s3://bucket/prefix/`: writes a snapshot's
//! files back as objects under a prefix (the snapshot path is the key, e.g.
//! `prefix/attachments/a/x.pdf`), with the same verification as a restore
//! into a directory: every blob is authenticated, decrypted and checked
//! against its keyed id before a byte of it is written.
//!
//! Each file is streamed blob by blob into a buffered upload (one PUT for
//! small files, a multipart upload for large ones), so memory does not grow
//! with file size. An upload that fails is aborted, so a half-written object
//! never appears. Directories are implicit in keys; symlinks cannot be
//! objects and are skipped (counted in `skipped_symlinks`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Instant;

use futures::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use tokio::io::AsyncWriteExt;

use super::Progress;
use crate::config::PathGlobs;
use crate::error::{Error, Result};
use crate::format::tree::{Entry, EntryKind};
use crate::pipeline::blobs::read_blob;
use crate::pipeline::tree::TreeReader;
use crate::repo::{Index, Repo};
use crate::store::SharedStore;

/// Buffered before an upload turns multipart (and the part size then).
const UPLOAD_BUFFER: usize = 8 << 20;

pub struct RestoreToStoreOptions {
    /// The target store, already scoped to the target prefix.
    pub target: SharedStore,
    /// The target as given (`s3://bucket/prefix/`), for messages.
    pub target_url: String,
    /// Globs over snapshot paths; a matching directory brings its subtree. Empty: everything.
    pub include: Vec<String>,
    /// Write over existing objects; without it the prefix must be empty.
    pub overwrite: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreToStoreReport {
    pub snapshot: Option<crate::format::ids::SnapshotId>,
    pub target_url: String,
    pub files: u64,
    pub bytes: u64,
    /// Files large enough to be uploaded in parts.
    pub multipart_uploads: u64,
    pub skipped_symlinks: u64,
    pub duration_ms: u64,
}

impl crate::report::JobOutput for RestoreToStoreReport {
    fn metrics(&self) -> crate::report::JobMetrics {
        crate::report::JobMetrics {
            bytes_in: Some(self.bytes),
            files: Some(self.files),
            snapshot: self.snapshot.map(|s| s.to_hex()),
            ..Default::default()
        }
    }
}

/// Restores the snapshot `wanted` names (an id, a prefix or `latest`):
/// the options and the target are checked before the snapshot and the index
/// are read.
pub async fn run(
    repo: &Repo,
    wanted: &str,
    opts: &RestoreToStoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreToStoreReport> {
    let started = Instant::now();
    repo.require_active("restore")?;
    let include = PathGlobs::new(&opts.include)
        .map_err(|e| Error::InvalidArgument(format!("--include: {e}")))?;
    let store_err = |op: &'static str, e: object_store::Error| {
        Error::store(op, format!("{} (restore target)", opts.target_url), e)
    };
    if !opts.overwrite
        && let Some(first) = opts.target.list(None).next().await
    {
        let first = first.map_err(|e| store_err("list", e))?;
        return Err(Error::InvalidArgument(format!(
            "restore target {} is not empty (it holds {}; use --overwrite to write over existing objects)",
            opts.target_url, first.location
        )));
    }
    let (snapshot, index) = repo.find_snapshot_and_load_index(wanted).await?;
    let mut tree = TreeReader::new(
        repo,
        &index,
        &snapshot.tree,
        format!("tree of snapshot {}", snapshot.id),
    );
    let mut report = RestoreToStoreReport {
        snapshot: Some(snapshot.id),
        target_url: opts.target_url.clone(),
        ..Default::default()
    };
    let filter = !opts.include.is_empty();
    let mut selected_dirs: Vec<Vec<u8>> = Vec::new();
    while let Some(e) = tree.next_entry().await? {
        let in_selected_dir = selected_dirs
            .iter()
            .any(|d| e.path.starts_with(d) && e.path.get(d.len()) == Some(&b'/'));
        let selected = !filter
            || in_selected_dir
            || include.is_match(std::path::Path::new(OsStr::from_bytes(&e.path)));
        if !selected {
            continue;
        }
        match e.kind {
            EntryKind::Dir => {
                if filter && !in_selected_dir {
                    selected_dirs.push(e.path.clone());
                }
            }
            EntryKind::Symlink => {
                report.skipped_symlinks += 1;
                tracing::warn!(path = %e.display_path(), "symlink not restored to an object store");
            }
            EntryKind::File => {
                let multipart = write_file(repo, &index, &e, opts, progress).await?;
                report.files += 1;
                report.bytes += e.size;
                report.multipart_uploads += u64::from(multipart);
                progress.file_done(e.size);
            }
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// Streams one file into its object; returns whether it went multipart.
async fn write_file(
    repo: &Repo,
    index: &Index,
    e: &Entry,
    opts: &RestoreToStoreOptions,
    progress: &dyn Progress,
) -> Result<bool> {
    let key = std::str::from_utf8(&e.path)
        .ok()
        .and_then(|s| Path::parse(s).ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} cannot be an object key (not UTF-8 or not a valid key); restore it into a directory instead",
                e.display_path()
            ))
        })?;
    let object = format!("{}/{}", opts.target_url.trim_end_matches('/'), key);
    let mut writer = BufWriter::with_capacity(opts.target.clone(), key.clone(), UPLOAD_BUFFER);
    let result = async {
        let mut written = 0u64;
        for id in &e.blobs {
            let plain = read_blob(repo, index, id).await?;
            written += plain.len() as u64;
            progress.bytes_read(plain.len() as u64);
            writer
                .write_all(&plain)
                .await
                .map_err(|err| Error::io(&object, err))?;
        }
        if written != e.size {
            return Err(Error::corrupt(
                format!("tree of a snapshot of tenant {}", repo.tenant()),
                format!(
                    "{}: blobs add up to {written} bytes, entry says {}",
                    e.display_path(),
                    e.size
                ),
            ));
        }
        writer
            .shutdown()
            .await
            .map_err(|err| Error::io(&object, err))?;
        Ok(())
    }
    .await;
    if let Err(err) = result {
        let _ = writer.abort().await;
        return Err(err);
    }
    Ok(e.size > UPLOAD_BUFFER as u64)
}
