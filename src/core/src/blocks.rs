//! The block abstraction ([`BlockIo`]) and [`MemBlocks`], an in-memory store for tests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Several blocks, each as `get` returns it, in `hashes`' order. By default one `get`
    /// each, in parallel; a store that can fetch many in one request does so.
    fn get_many(&self, hashes: Vec<BlockHash>) -> BoxFuture<'_, Vec<Result<Bytes, BlockError>>> {
        futures::future::join_all(hashes.into_iter().map(|h| self.get(h))).boxed()
    }
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
    inner: Arc<dyn BlockIo>,
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
    pub fn new(inner: Arc<dyn BlockIo>, budget: usize) -> CachedBlocks {
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
                    .or_insert_with(|| self.fetch_one(hash))
                    .clone()
            };
            self.settle(hash, fetch.await)
        }
        .boxed()
    }

    /// Cached blocks at once; blocks already in flight by joining their fetch; the rest in
    /// one `get_many` of the store below, registered as in flight so that a read of one of
    /// them meanwhile shares this fetch instead of starting its own (and drives it, should
    /// this future be dropped).
    fn get_many(&self, hashes: Vec<BlockHash>) -> BoxFuture<'_, Vec<Result<Bytes, BlockError>>> {
        async move {
            let cached: Vec<Option<Bytes>> = {
                let mut state = self.lock();
                hashes.iter().map(|h| state.touch(h)).collect()
            };
            let hits = cached.iter().flatten().count() as u64;
            self.hits.fetch_add(hits, Ordering::Relaxed);
            self.misses
                .fetch_add(hashes.len() as u64 - hits, Ordering::Relaxed);
            let sources: Vec<Source> = {
                let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                let mut batch: Vec<BlockHash> = Vec::new();
                for (hash, c) in hashes.iter().zip(&cached) {
                    if c.is_none() && !inflight.contains_key(hash) && !batch.contains(hash) {
                        batch.push(*hash);
                    }
                }
                if !batch.is_empty() {
                    let inner = self.inner.clone();
                    let list = batch.clone();
                    let results = async move { Arc::new(inner.get_many(list).await) }
                        .boxed()
                        .shared();
                    for (n, hash) in batch.into_iter().enumerate() {
                        let results = results.clone();
                        let one = async move {
                            results.await.get(n).cloned().unwrap_or_else(|| {
                                Err(BlockError::Other("block store answered too few".into()))
                            })
                        };
                        inflight.insert(hash, one.boxed().shared());
                    }
                }
                hashes
                    .iter()
                    .zip(cached)
                    .map(|(hash, c)| match c {
                        Some(data) => Source::Cached(data),
                        None => Source::Fetch(
                            inflight
                                .entry(*hash)
                                .or_insert_with(|| self.fetch_one(*hash))
                                .clone(),
                        ),
                    })
                    .collect()
            };
            let results = futures::future::join_all(sources.into_iter().map(|s| async move {
                match s {
                    Source::Cached(data) => (Ok(data), false),
                    Source::Fetch(fetch) => (fetch.await, true),
                }
            }))
            .await;
            hashes
                .iter()
                .zip(results)
                .map(|(hash, (r, fetched))| if fetched { self.settle(*hash, r) } else { r })
                .collect()
        }
        .boxed()
    }
}

/// Where `CachedBlocks::get_many` finds a block.
enum Source {
    Cached(Bytes),
    Fetch(SharedFetch),
}

impl CachedBlocks {
    /// A fetch of one block from the store below, to share among its readers.
    fn fetch_one(&self, hash: BlockHash) -> SharedFetch {
        let inner = self.inner.clone();
        async move { inner.get(hash).await }.boxed().shared()
    }

    /// A fetch of `hash` ended: it is no longer in flight, and good bytes are cached.
    fn settle(
        &self,
        hash: BlockHash,
        result: Result<Bytes, BlockError>,
    ) -> Result<Bytes, BlockError> {
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

    /// A store that counts `get_many` calls and the blocks they asked for, and holds the
    /// first batch until released (to have a read arrive while it is in flight).
    struct Batching {
        mem: MemBlocks,
        batches: Mutex<Vec<usize>>,
        gate: Mutex<Option<futures::channel::oneshot::Receiver<()>>>,
    }

    impl BlockIo for Batching {
        fn put(&self, data: Bytes) -> BoxFuture<'_, Result<BlockHash, BlockError>> {
            self.mem.put(data)
        }
        fn get(&self, hash: BlockHash) -> BoxFuture<'_, Result<Bytes, BlockError>> {
            self.mem.get(hash)
        }
        fn get_many(
            &self,
            hashes: Vec<BlockHash>,
        ) -> BoxFuture<'_, Vec<Result<Bytes, BlockError>>> {
            async move {
                self.batches.lock().unwrap().push(hashes.len());
                let gate = self.gate.lock().unwrap().take();
                if let Some(gate) = gate {
                    gate.await.unwrap();
                }
                let mut out = Vec::new();
                for h in hashes {
                    out.push(self.mem.get(h).await);
                }
                out
            }
            .boxed()
        }
    }

    #[test]
    fn get_many_fetches_what_is_not_cached_in_one_batch_that_reads_share() {
        let (release, gate) = futures::channel::oneshot::channel();
        let store = Arc::new(Batching {
            mem: MemBlocks::new(),
            batches: Mutex::new(Vec::new()),
            gate: Mutex::new(Some(gate)),
        });
        let blocks: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i; 1000])).collect();
        let hashes: Vec<BlockHash> = blocks
            .iter()
            .map(|b| block_on(store.mem.put(b.clone())).unwrap())
            .collect();
        let cache = CachedBlocks::new(store.clone(), 1 << 20);
        // Block 0 is cached already.
        assert_eq!(block_on(cache.get(hashes[0])).unwrap(), blocks[0]);
        let gets_before = store.mem.counts().1;
        let missing = BlockHash::of(b"nowhere");
        let mut asked = hashes.clone();
        asked.push(missing);
        asked.push(hashes[3]); // twice in one batch: fetched once
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut batch = cache.get_many(asked.clone());
        assert!(batch.poll_unpin(&mut cx).is_pending(), "held by the store");
        // A read of a block in the batch, while the batch is held, waits for it.
        let mut read = cache.get(hashes[2]);
        assert!(
            read.poll_unpin(&mut cx).is_pending(),
            "the read shares the held batch"
        );
        release.send(()).unwrap();
        let got = block_on(batch);
        assert_eq!(block_on(read).unwrap(), blocks[2]);
        assert_eq!(
            *store.batches.lock().unwrap(),
            vec![5],
            "blocks 1-4 and the missing one, in one batch"
        );
        assert_eq!(got.len(), asked.len());
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(got[i].as_ref().unwrap(), b);
        }
        assert_eq!(got[5], Err(BlockError::NotFound(missing)));
        assert_eq!(got[6].as_ref().unwrap(), &blocks[3]);
        // Everything fetched is cached now: no store reads, no more batches.
        for (h, b) in hashes.iter().zip(&blocks) {
            assert!(cache.contains(h));
            assert_eq!(&block_on(cache.get(*h)).unwrap(), b);
        }
        assert_eq!(
            store.mem.counts().1,
            gets_before + 5,
            "one store read per block fetched"
        );
        assert_eq!(store.batches.lock().unwrap().len(), 1);
    }
}
