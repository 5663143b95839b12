//! One object read front to back in parts the reader asks for (a pack's
//! header, then its blobs one run at a time, then its directory), with one
//! request: a restore streams a pack instead of holding all of it, so more
//! packs are read at once in the same memory. A read that fails part-way is
//! resumed where it stopped; the object must stay the one listed (its size,
//! and its ETag when the store gives one).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::{GetOptions, GetRange, GetResultPayload, ObjectStore};

use super::{ATTEMPTS, TenantStore, is_transient};
use crate::error::{Error, Result};
use crate::store::ObjectName;

/// A local object is read in parts of this size at most (one blocking read
/// each); a remote one arrives in whatever chunks the connection gives.
const FILE_READ_MAX: u64 = 8 << 20;

pub struct SequentialRead {
    store: TenantStore,
    name: ObjectName,
    /// The size the object was listed with: it must still be that.
    size: u64,
    /// Where the read ends (the size, unless [`SequentialRead::until`]).
    end: u64,
    /// Bytes handed to the reader so far.
    pos: u64,
    /// Bytes received past `pos`, not yet asked for.
    pending: Bytes,
    e_tag: Option<String>,
    source: Option<Source>,
    /// A part failed: what was received of it is gone, so no later part
    /// can be handed out in its place.
    failed: bool,
}

enum Source {
    /// A local file: read where asked, in the reader's parts.
    File(Arc<std::fs::File>),
    Stream(BoxStream<'static, object_store::Result<Bytes>>),
}

/// Why one attempt stopped: the store's error (retried when transient), or
/// the object is no longer the one listed (never retried).
enum Stop {
    Store(object_store::Error),
    Changed(String),
}

impl From<object_store::Error> for Stop {
    fn from(e: object_store::Error) -> Self {
        Stop::Store(e)
    }
}

impl TenantStore {
    /// Reads `name`, listed as `size` bytes, from its start; nothing is
    /// requested before the first part is asked for.
    pub fn read_sequential(&self, name: ObjectName, size: u64) -> SequentialRead {
        SequentialRead {
            store: self.clone(),
            name,
            size,
            end: size,
            pos: 0,
            pending: Bytes::new(),
            e_tag: None,
            source: None,
            failed: false,
        }
    }
}

impl SequentialRead {
    /// The object's full store path, for messages (formatted only when one is made).
    fn object(&self) -> String {
        self.store.display(&self.name)
    }

    /// The size the object was listed with.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads only up to `end` (a part of the object already read another way).
    pub fn until(mut self, end: u64) -> Self {
        self.end = end.min(self.size);
        self
    }

    /// The object must still be this version (the ETag of an earlier read).
    pub fn of_version(mut self, e_tag: Option<String>) -> Self {
        self.e_tag = e_tag;
        self
    }

    /// Bytes of the object handed out or skipped so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next `n` bytes. Asking past the listed size is a corrupt object:
    /// the caller's plan (the index, the pack trailer) placed something there.
    pub async fn take(&mut self, n: u64) -> Result<BytesMut> {
        let mut out = BytesMut::new();
        self.advance(n, Some(&mut out)).await?;
        Ok(out)
    }

    /// Skips the next `n` bytes (what of a pack no file needs): a local
    /// object seeks past them, a remote one receives and drops them.
    pub async fn skip(&mut self, n: u64) -> Result<()> {
        self.advance(n, None).await
    }

    /// Moves `n` bytes on, into `out` unless they are skipped, resuming a
    /// read that broke off (a transient error) where it stopped.
    async fn advance(&mut self, n: u64, out: Option<&mut BytesMut>) -> Result<()> {
        if self.failed {
            return Err(Error::Internal(format!(
                "{}: read on after a failed part",
                self.object()
            )));
        }
        if n > self.end.saturating_sub(self.pos) {
            return Err(Error::corrupt(
                self.object(),
                format!(
                    "{n} bytes wanted at offset {}, past its {} listed bytes",
                    self.pos, self.end
                ),
            ));
        }
        let result = self.advance_resuming(n, out).await;
        self.failed = result.is_err();
        result
    }

    async fn advance_resuming(&mut self, n: u64, mut out: Option<&mut BytesMut>) -> Result<()> {
        let mut done = 0;
        // Failures in a row without a byte received, and in all: a read
        // that keeps breaking off after some progress is resumed a while.
        let (mut failures, mut resumed) = (0, 0);
        let mut delay = Duration::from_millis(100);
        loop {
            let before = done;
            match self.fill(n, &mut done, out.as_deref_mut()).await {
                Ok(()) => {
                    self.pos += n;
                    return Ok(());
                }
                Err(Stop::Store(e))
                    if is_transient(&e)
                        && resumed < 4 * ATTEMPTS
                        && (done > before || failures + 1 < ATTEMPTS) =>
                {
                    if done > before {
                        (failures, delay) = (0, Duration::from_millis(100));
                    }
                    failures += 1;
                    resumed += 1;
                    tracing::debug!(error = %e, object = %self.object(), failures, "store read broke off; resuming");
                    self.source = None;
                    let jitter =
                        Duration::from_millis(rand::random_range(0..=delay.as_millis() as u64 / 2));
                    tokio::time::sleep(delay + jitter).await;
                    delay *= 3;
                }
                Err(Stop::Store(object_store::Error::NotFound { .. })) => {
                    return Err(Error::missing(self.object(), "not found in the store"));
                }
                Err(Stop::Store(e)) => {
                    // An object cut short since it was listed is refused by
                    // the store as a bad range: say so, not a store error.
                    return match self.store.head(&self.name).await? {
                        Some(meta) if meta.size != self.size => Err(Error::corrupt(
                            self.object(),
                            format!(
                                "object is {} bytes, listed as {} (changed since it was listed)",
                                meta.size, self.size
                            ),
                        )),
                        None => Err(Error::missing(self.object(), "not found in the store")),
                        Some(_) => Err(Error::store("get", self.object(), e)),
                    };
                }
                Err(Stop::Changed(why)) => {
                    return Err(Error::corrupt(self.object(), why));
                }
            }
        }
    }

    /// Moves `done` up to `n`, appending to `out` (when given) what it
    /// passes, opening the object (again, from where `done` stands) when
    /// there is no source.
    async fn fill(
        &mut self,
        n: u64,
        done: &mut u64,
        mut out: Option<&mut BytesMut>,
    ) -> std::result::Result<(), Stop> {
        while *done < n {
            let want = n - *done;
            if !self.pending.is_empty() {
                let part = self
                    .pending
                    .split_to(want.min(self.pending.len() as u64) as usize);
                *done += part.len() as u64;
                match out.as_deref_mut() {
                    // One chunk held all of it: no copy when it was the last
                    // of its buffer.
                    Some(out) if out.is_empty() && *done == n => *out = BytesMut::from(part),
                    Some(out) => {
                        out.reserve((n - out.len() as u64) as usize); // once: room for all of it
                        out.extend_from_slice(&part)
                    }
                    None => {}
                }
                continue;
            }
            let at = self.pos + *done;
            if self.source.is_none() && out.is_none() {
                *done = n; // skipped without a request: the next part opens past it
                break;
            }
            if self.source.is_none() {
                self.source = Some(self.open(at).await?);
            }
            match self.source.as_mut().expect("opened above") {
                Source::File(_) if out.is_none() => *done = n, // read from where asked next
                Source::File(file) => {
                    let file = file.clone();
                    let len = want.min(FILE_READ_MAX) as usize;
                    let part = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
                        let mut buf = vec![0; len];
                        file.read_exact_at(&mut buf, at)?;
                        Ok(buf)
                    })
                    .await
                    .map_err(|e| object_store::Error::JoinError { source: e })?;
                    match part {
                        Ok(part) => self.pending = Bytes::from(part),
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            return Err(Stop::Changed(format!(
                                "object ends before {} bytes, listed as {} (changed since it was listed)",
                                at + len as u64,
                                self.size
                            )));
                        }
                        Err(e) => {
                            return Err(Stop::Store(object_store::Error::Generic {
                                store: "custos",
                                source: Box::new(e),
                            }));
                        }
                    }
                }
                Source::Stream(stream) => match stream.next().await {
                    Some(chunk) => self.pending = chunk?,
                    None => {
                        // Cut short without an error (a proxy, a buggy
                        // server): resumed from here like a broken read.
                        return Err(Stop::Store(object_store::Error::Generic {
                            store: "custos",
                            source: format!(
                                "read of {} ended at {at} of {} bytes",
                                self.object(),
                                self.size
                            )
                            .into(),
                        }));
                    }
                },
            }
        }
        Ok(())
    }

    /// Requests the object from `at` to its end, checking it is still the
    /// object listed (and the one read so far).
    async fn open(&mut self, at: u64) -> std::result::Result<Source, Stop> {
        let options = GetOptions {
            // All of it unranged: a server may answer a range covering all
            // of an object with 200 rather than 206.
            range: (at > 0 || self.end < self.size).then_some(GetRange::Bounded(at..self.end)),
            ..Default::default()
        };
        let r = self
            .store
            .scoped
            .get_opts(&self.name.relative(), options)
            .await?;
        if r.meta.size != self.size {
            return Err(Stop::Changed(format!(
                "object is {} bytes, listed as {} (changed since it was listed)",
                r.meta.size, self.size
            )));
        }
        match (&self.e_tag, &r.meta.e_tag) {
            (Some(before), now) if Some(before) != now.as_ref() => {
                return Err(Stop::Changed(
                    "object changed while being read (its ETag changed)".into(),
                ));
            }
            (None, now) => self.e_tag = now.clone(),
            _ => {}
        }
        let wanted = at..self.end;
        if r.range != wanted {
            return Err(Stop::Changed(format!(
                "the store answered bytes {:?} for {wanted:?}",
                r.range
            )));
        }
        Ok(match r.payload {
            GetResultPayload::File(file, _) => Source::File(Arc::new(file)),
            GetResultPayload::Stream(stream) => Source::Stream(stream),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ids::PackId;
    use crate::store::memory;
    use crate::tenant::TenantId;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};

    fn pack() -> ObjectName {
        ObjectName::Pack(PackId([7; 32]))
    }

    async fn stored(root: &crate::store::SharedStore, bytes: &[u8]) -> TenantStore {
        let store = TenantStore::new(root.clone(), &TenantId::new("t1").unwrap());
        store
            .put(&pack(), Bytes::copy_from_slice(bytes))
            .await
            .unwrap();
        store
    }

    #[tokio::test]
    async fn parts_taken_and_skipped_add_up_to_the_object() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let local: crate::store::SharedStore =
            Arc::new(crate::store::local::LocalStore::new(dir.path()).unwrap());
        for root in [memory(), local] {
            let store = stored(&root, &bytes).await;
            let mut read = store.read_sequential(pack(), bytes.len() as u64);
            assert_eq!(read.take(10).await.unwrap(), &bytes[..10]);
            read.skip(40_000).await.unwrap();
            assert_eq!(read.take(0).await.unwrap(), &b""[..]);
            assert_eq!(read.take(50_000).await.unwrap(), &bytes[40_010..90_010]);
            assert_eq!(read.position(), 90_010);
            let err = read.take(10_000).await.unwrap_err();
            assert!(
                err.to_string().contains("past its 100000 listed bytes"),
                "{err}"
            );
            assert_eq!(read.take(9_990).await.unwrap(), &bytes[90_010..]);
        }
    }

    #[tokio::test]
    async fn a_read_cut_short_resumes_where_it_stopped() {
        use crate::store::faults::{FaultConfig, FaultyStore};
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let root = memory();
        stored(&root, &bytes).await;
        // Every other answer cut short at a random point: each part still
        // arrives whole and in order, from resumed reads.
        let faults = FaultyStore::new(root, FaultConfig::parse("seed=3,short_read=0.5").unwrap());
        let stats = faults.stats();
        let store = TenantStore::new(Arc::new(faults), &TenantId::new("t1").unwrap());
        for _ in 0..8 {
            let mut read = store.read_sequential(pack(), bytes.len() as u64);
            let mut got = Vec::new();
            for part in [1_000u64, 99_000, 50_000] {
                got.extend_from_slice(&read.take(part).await.unwrap());
            }
            read.skip(50_000).await.unwrap();
            got.extend_from_slice(&read.take(100_000).await.unwrap());
            assert_eq!(&got[..150_000], &bytes[..150_000]);
            assert_eq!(&got[150_000..], &bytes[200_000..]);
        }
        assert!(stats.short_reads.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn an_object_not_of_its_listed_size_is_refused() {
        let root = memory();
        let store = stored(&root, b"0123456789").await;
        let err = store.read_sequential(pack(), 12).take(4).await.unwrap_err();
        assert!(err.to_string().contains("listed as 12"), "{err}");
        let err = store
            .read_sequential(ObjectName::Pack(PackId([8; 32])), 4)
            .take(4)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }

    #[tokio::test]
    async fn an_object_replaced_between_parts_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root: crate::store::SharedStore =
            Arc::new(crate::store::local::LocalStore::new(dir.path()).unwrap());
        let store = stored(&root, &[1; 4096]).await;
        let mut read = store.read_sequential(pack(), 4096);
        read.take(100).await.unwrap();
        // The same size, other content: a resumed read must notice by ETag.
        read.source = None;
        let path = Path::from(format!("tenants/t1/{}", pack().relative()));
        std::thread::sleep(Duration::from_millis(20));
        root.put(&path, PutPayload::from_static(&[2; 4096]))
            .await
            .unwrap();
        let err = read.take(100).await.unwrap_err();
        assert!(
            err.to_string().contains("changed while being read"),
            "{err}"
        );
    }
}
