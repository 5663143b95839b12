//! Buffers handed back for reuse by the write path.
//!
//! A backup copies every new chunk into a buffer of its own (the worker that
//! compresses it runs on another thread) and builds every pack in a buffer of
//! the pack size and 1 MiB. Freshly allocated, each of those is memory the
//! kernel faults in and zeroes page by page: a first backup of 1 GiB took
//! 191,000–289,000 page faults (BENCHMARKS.md, "Buffers reused by the
//! backup"). Buffers that come back here are reused while they are warm.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Requests below this size are not pooled.
pub const SMALL: usize = 64 << 10;

/// A bounded set of emptied buffers, shared by the threads of one job.
///
/// A reused buffer serves only a request of at least half its capacity, so
/// that it holds at most twice what was asked. Requests under [`SMALL`] are
/// left to the allocator, whose bins serve them from memory it already
/// holds. When the pool is full, the buffers given back longest ago make
/// room: a pool full of sizes no longer asked for does not stay so.
#[derive(Clone)]
pub struct BufferPool(Arc<Mutex<Pool>>);

struct Pool {
    /// Oldest first.
    free: VecDeque<Vec<u8>>,
    /// Capacity of the buffers in `free`.
    held: usize,
    /// Most capacity kept.
    limit: usize,
    /// Largest buffer kept: one grown past what its requests need is freed.
    largest: usize,
    /// New buffers are allocated at the next power of two.
    round_up: bool,
    #[cfg(test)]
    reused: usize,
}

impl BufferPool {
    /// A pool for buffers of one size: keeping at most `limit` bytes of
    /// capacity between uses, none of a buffer larger than `largest`.
    pub fn new(limit: usize, largest: usize) -> Self {
        Self::with(limit, largest, false)
    }

    /// A pool for buffers of many sizes: allocated at the next power of two,
    /// so that requests of similar sizes share them.
    pub fn rounding_up(limit: usize) -> Self {
        Self::with(limit, limit, true)
    }

    fn with(limit: usize, largest: usize, round_up: bool) -> Self {
        BufferPool(Arc::new(Mutex::new(Pool {
            free: VecDeque::new(),
            held: 0,
            limit,
            largest: largest.min(limit),
            round_up,
            #[cfg(test)]
            reused: 0,
        })))
    }

    /// An empty buffer with room for at least `capacity` bytes: a reused one
    /// of at most twice that when the pool has one, else a new one.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity < SMALL {
            return Vec::with_capacity(capacity);
        }
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let fits = |b: &Vec<u8>| (capacity..=capacity.saturating_mul(2)).contains(&b.capacity());
        if let Some(buf) = pool
            .free
            .iter()
            .rposition(fits)
            .and_then(|i| pool.free.remove(i))
        {
            pool.held -= buf.capacity();
            #[cfg(test)]
            {
                pool.reused += 1;
            }
            return buf;
        }
        let round_up = pool.round_up;
        drop(pool);
        match capacity.checked_next_power_of_two() {
            Some(rounded) if round_up => Vec::with_capacity(rounded),
            _ => Vec::with_capacity(capacity),
        }
    }

    /// Gives a buffer back for reuse; its contents are dropped.
    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !(SMALL..=pool.largest).contains(&buf.capacity()) {
            return;
        }
        // Freed once the lock is released: a pack buffer is a large munmap.
        let mut evicted = Vec::new();
        while pool.held + buf.capacity() > pool.limit {
            let oldest = pool.free.pop_front().expect("held counts the free buffers");
            pool.held -= oldest.capacity();
            evicted.push(oldest);
        }
        pool.held += buf.capacity();
        pool.free.push_back(buf);
        drop(pool);
        drop(evicted);
    }

    /// Bytes of capacity waiting in the pool.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.0.lock().unwrap().held
    }

    /// Requests served by a buffer given back.
    #[cfg(test)]
    pub(crate) fn reused(&self) -> usize {
        self.0.lock().unwrap().reused
    }
}

/// A buffer lent out as [`bytes::Bytes`] (a pack being uploaded): it goes
/// back to its pool when the last reference to it is dropped.
pub struct Lent {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl Lent {
    pub fn bytes(buf: Vec<u8>, pool: &BufferPool) -> bytes::Bytes {
        bytes::Bytes::from_owner(Lent {
            buf,
            pool: pool.clone(),
        })
    }
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 1 << 10;

    #[test]
    fn a_buffer_given_back_is_reused_empty_for_a_request_it_fits() {
        let pool = BufferPool::rounding_up(16 << 20);
        let mut a = pool.take(600 * K);
        assert_eq!(a.capacity(), 1024 * K, "rounded up to a power of two");
        a.extend_from_slice(&[7; 1000]);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(512 * K);
        assert!(b.is_empty());
        assert_eq!(b.as_ptr(), ptr, "reused");
        let c = pool.take(512 * K);
        assert_ne!(c.as_ptr(), ptr, "one buffer is never handed out twice");
        pool.give(b);
        let smaller = pool.take(300 * K);
        assert_ne!(smaller.as_ptr(), ptr, "never for less than half of it");
        let larger = pool.take(1025 * K);
        assert_ne!(larger.as_ptr(), ptr, "never too small");
        let same = pool.take(1024 * K);
        assert_eq!(same.as_ptr(), ptr);
    }

    #[test]
    fn small_buffers_are_left_to_the_allocator() {
        let pool = BufferPool::new(16 << 20, 16 << 20);
        assert_eq!(pool.take(1000).capacity(), 1000);
        pool.give(Vec::with_capacity(SMALL - 1));
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_limit_and_the_newest_first() {
        let pool = BufferPool::new(3 * 128 * K, 256 * K);
        let bufs: Vec<_> = (0..4).map(|_| pool.take(128 * K)).collect();
        let oldest = bufs[0].as_ptr();
        let newest = bufs[3].as_ptr();
        for b in bufs {
            pool.give(b);
        }
        assert_eq!(pool.held(), 3 * 128 * K);
        let first = pool.take(128 * K);
        assert_eq!(first.as_ptr(), newest, "the newest is reused first");
        let taken: Vec<_> = (0..2).map(|_| pool.take(128 * K)).chain([first]).collect();
        assert!(
            taken.iter().all(|b| b.as_ptr() != oldest),
            "the oldest made room"
        );
        assert_eq!(pool.reused(), 3);
    }

    #[test]
    fn one_large_buffer_evicts_as_many_small_ones_as_it_needs() {
        let pool = BufferPool::rounding_up(1 << 20);
        for _ in 0..4 {
            pool.give(Vec::with_capacity(256 * K));
        }
        assert_eq!(pool.held(), 1 << 20);
        pool.give(Vec::with_capacity(1 << 20));
        assert_eq!(pool.held(), 1 << 20);
        assert_eq!(pool.take(1 << 20).capacity(), 1 << 20);
        assert_eq!(pool.held(), 0, "only the large one was left");
    }

    #[test]
    fn a_buffer_grown_past_the_largest_kept_is_freed() {
        let pool = BufferPool::new(1 << 20, 256 * K);
        let mut grown = pool.take(128 * K);
        grown.extend_from_slice(&vec![1; 300 * K]);
        pool.give(grown);
        assert_eq!(pool.held(), 0);
    }

    #[test]
    fn buffers_no_request_fits_make_room_for_those_that_do() {
        let pool = BufferPool::rounding_up(2 << 20);
        pool.give(Vec::with_capacity(1 << 20));
        pool.give(Vec::with_capacity(1 << 20));
        assert_eq!(pool.held(), 2 << 20);
        // Requests of 100 KiB now: buffers of 128 KiB come back.
        let small = pool.take(100 * K);
        assert_eq!(
            small.capacity(),
            128 * K,
            "a 1 MiB buffer is too large for it"
        );
        pool.give(small);
        assert_eq!(
            pool.held(),
            (1 << 20) + 128 * K,
            "the oldest 1 MiB buffer made room"
        );
        assert_eq!(pool.take(100 * K).capacity(), 128 * K);
        assert_eq!(pool.reused(), 1);
    }

    #[test]
    fn a_lent_buffer_returns_when_its_last_reference_drops() {
        let pool = BufferPool::new(16 << 20, 16 << 20);
        let mut buf = pool.take(SMALL);
        buf.extend_from_slice(b"pack bytes");
        let ptr = buf.as_ptr();
        let bytes = Lent::bytes(buf, &pool);
        let copy = bytes.clone();
        assert_eq!(&copy[..], b"pack bytes");
        drop(bytes);
        assert_eq!(pool.held(), 0, "still referenced");
        drop(copy);
        assert_eq!(pool.held(), SMALL);
        let again = pool.take(SMALL);
        assert_eq!(again.as_ptr(), ptr);
    }
}
