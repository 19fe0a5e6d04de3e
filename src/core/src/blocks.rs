//! The block abstraction ([`BlockIo`]) and [`MemBlocks`], an in-memory store for tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use twinfs_cluster::BlockHash;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("block {0} not found")]
    NotFound(BlockHash),
    #[error("block {0} is corrupt")]
    Corrupt(BlockHash),
    /// No node had room for the block.
    #[error("no space for the block: {0}")]
    NoSpace(String),
    #[error("block store error: {0}")]
    Other(String),
}

/// Content-addressed, immutable block storage (the cluster's replicated block client in
/// production). `put` returns only when the block is durable on its replicas; `get` returns
/// bytes that hash to the requested [`BlockHash`] or an error, never unverified bytes.
pub trait BlockIo: Send + Sync {
    fn put(&self, data: Bytes) -> BoxFuture<'_, Result<BlockHash, BlockError>>;
    fn get(&self, hash: BlockHash) -> BoxFuture<'_, Result<Bytes, BlockError>>;
}

/// In-memory [`BlockIo`] that verifies every read, with knobs for tests.
#[derive(Default)]
pub struct MemBlocks {
    blocks: Mutex<HashMap<BlockHash, Bytes>>,
    puts: AtomicU64,
    gets: AtomicU64,
}

impl MemBlocks {
    pub fn new() -> MemBlocks {
        MemBlocks::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BlockHash, Bytes>> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces a stored block's bytes (simulates bit rot).
    pub fn corrupt(&self, hash: &BlockHash, bytes: &[u8]) {
        self.lock().insert(*hash, Bytes::copy_from_slice(bytes));
    }

    pub fn remove(&self, hash: &BlockHash) {
        self.lock().remove(hash);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// (puts, gets) performed so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.puts.load(Ordering::Relaxed),
            self.gets.load(Ordering::Relaxed),
        )
    }
}

impl BlockIo for MemBlocks {
    fn put(&self, data: Bytes) -> BoxFuture<'_, Result<BlockHash, BlockError>> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        let hash = BlockHash::of(&data);
        self.lock().insert(hash, data);
        futures::future::ready(Ok(hash)).boxed()
    }

    fn get(&self, hash: BlockHash) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let r = match self.lock().get(&hash) {
            None => Err(BlockError::NotFound(hash)),
            Some(b) if !hash.verifies(b) => Err(BlockError::Corrupt(hash)),
            Some(b) => Ok(b.clone()),
        };
        futures::future::ready(r).boxed()
    }
}

/// A byte-bounded LRU cache in front of a [`BlockIo`]. Blocks are immutable and named by their
/// hash, so a cached block can never be stale: no invalidation is ever needed. Puts are written
/// through (a block just written is often read back: partial-chunk rewrites, read-after-write).
pub struct CachedBlocks {
    inner: std::sync::Arc<dyn BlockIo>,
    budget: usize,
    state: Mutex<LruState>,
    /// Fetches in flight: concurrent reads of one block (the kernel's parallel read-ahead
    /// requests, a prefetch and the read it anticipated) share one transfer.
    inflight: Mutex<HashMap<BlockHash, SharedFetch>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

type SharedFetch = futures::future::Shared<BoxFuture<'static, Result<Bytes, BlockError>>>;

#[derive(Default)]
struct LruState {
    map: HashMap<BlockHash, (Bytes, u64)>,
    order: std::collections::BTreeMap<u64, BlockHash>,
    tick: u64,
    bytes: usize,
}

impl LruState {
    fn touch(&mut self, hash: &BlockHash) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (data, old) = self.map.get_mut(hash).map(|(d, t)| {
            let old = *t;
            *t = tick;
            (d.clone(), old)
        })?;
        self.order.remove(&old);
        self.order.insert(tick, *hash);
        Some(data)
    }

    fn insert(&mut self, hash: BlockHash, data: Bytes, budget: usize) {
        if data.len() > budget / 4 || self.touch(&hash).is_some() {
            return;
        }
        self.tick += 1;
        self.bytes += data.len();
        self.order.insert(self.tick, hash);
        self.map.insert(hash, (data, self.tick));
        while self.bytes > budget {
            let Some((_, victim)) = self.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.map.remove(&victim) {
                self.bytes -= d.len();
            }
        }
    }
}

impl CachedBlocks {
    /// `budget`: most bytes of block data kept (0 disables caching).
    pub fn new(inner: std::sync::Arc<dyn BlockIo>, budget: usize) -> CachedBlocks {
        CachedBlocks {
            inner,
            budget,
            state: Mutex::new(LruState::default()),
            inflight: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (hits, misses) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Whether `hash` is cached (without touching it).
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.lock().map.contains_key(hash)
    }
}

impl BlockIo for CachedBlocks {
    fn put(&self, data: Bytes) -> BoxFuture<'_, Result<BlockHash, BlockError>> {
        async move {
            let hash = self.inner.put(data.clone()).await?;
            if self.budget > 0 {
                self.lock().insert(hash, data, self.budget);
            }
            Ok(hash)
        }
        .boxed()
    }

    fn get(&self, hash: BlockHash) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        async move {
            if let Some(b) = self.lock().touch(&hash) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(b);
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            let fetch = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                inflight
                    .entry(hash)
                    .or_insert_with(|| {
                        let inner = self.inner.clone();
                        async move { inner.get(hash).await }.boxed().shared()
                    })
                    .clone()
            };
            let result = fetch.await;
            self.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&hash);
            let data = result?;
            if self.budget > 0 {
                self.lock().insert(hash, data.clone(), self.budget);
            }
            Ok(data)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use std::sync::Arc;

    #[test]
    fn cache_serves_repeats_and_stays_within_budget() {
        let mem = Arc::new(MemBlocks::new());
        let cache = CachedBlocks::new(mem.clone(), 400);
        let blocks: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 100])).collect();
        let hashes: Vec<BlockHash> = blocks
            .iter()
            .map(|b| block_on(cache.put(b.clone())).unwrap())
            .collect();
        // Only the last 4 fit (400 bytes); they are served without asking the store.
        let (_, gets_before) = mem.counts();
        for h in &hashes[4..] {
            assert!(cache.contains(h));
            block_on(cache.get(*h)).unwrap();
        }
        assert_eq!(mem.counts().1, gets_before);
        assert!(!cache.contains(&hashes[0]));
        assert_eq!(block_on(cache.get(hashes[0])).unwrap(), blocks[0]);
        assert_eq!(mem.counts().1, gets_before + 1);
        // A corrupt block in the store is still refused through the cache.
        let h1 = hashes[1];
        mem.corrupt(&h1, b"rotten");
        assert!(!cache.contains(&h1));
        assert!(block_on(cache.get(h1)).is_err());
    }
}
