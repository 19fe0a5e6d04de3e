//! The data path: open files with per-chunk write buffers, flush (blocks first, then one
//! metadata transaction), reads through the buffer, and truncation.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use twinfs_cluster::BlockHash;

use crate::blocks::BlockError;
use crate::early::TakenCreate;
use crate::error::{FsError, FsResult};
use crate::fs::{now_ns, Fs, Txn, MAX_FILE_SIZE};
use crate::kv::{prefix_end, Revision};
use crate::schema::{decode, encode, ChunkRec, FileKind, InodeRec};
use crate::usage::bytes_i64;

/// A chunk to reference at commit: index, the revision its record was read at, and its block
/// when already known (else it is among the blocks being stored).
type ChunkRef = (u64, Revision, Option<(BlockHash, u32)>);

/// Blocks stored concurrently by one flush.
const PUTS_IN_FLIGHT: usize = 4;

/// Copies `content[a..b]` (clipped to what `content` holds) to the front of `dst`; the rest of
/// `dst` stays zero (a block shorter than its chunk is followed by zeros).
fn copy_clipped(dst: &mut [u8], content: &[u8], a: usize, b: usize) {
    let have = content.len().min(b);
    if a < have {
        if let (Some(d), Some(s)) = (dst.get_mut(..have - a), content.get(a..have)) {
            d.copy_from_slice(s);
        }
    }
}

/// Largest single read served (a FUSE read is at most a few MiB; longer asks read short).
const MAX_READ: usize = 64 << 20;

/// Unflushed writes to one chunk: `data` holds the written bytes at their offsets within the
/// chunk; `ranges` (sorted, disjoint, non-adjacent) says which bytes of `data` were written —
/// the gaps are filled from the chunk's committed content at flush time.
#[derive(Default, Clone)]
struct DirtyChunk {
    /// The written bytes while the chunk is being written (see [`DirtyChunk::bytes`]).
    data: Vec<u8>,
    /// The chunk's bytes once it was filled completely and its upload started: shared with
    /// the upload instead of copied (4 MiB per full chunk); a later write to the chunk moves
    /// them back into `data`.
    full: Option<Bytes>,
    ranges: Vec<(usize, usize)>,
    /// The block of `data`, being stored in the background since the chunk was filled
    /// completely (dropped by any later write to the chunk).
    upload: Option<PendingUpload>,
    /// When that upload started (ns since the epoch).
    upload_started_ns: i64,
}

/// A background upload older than this is stored again before its commit: garbage collection
/// spares only blocks stored within its grace period (an hour by default), and a file may stay
/// open far longer than that between filling a chunk and closing. Putting a present block again
/// only re-stamps it on the nodes.
const REUPLOAD_AFTER_NS: i64 = 10 * 60 * 1_000_000_000;

type PendingUpload =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<BlockHash, BlockError>>>;

impl std::fmt::Debug for DirtyChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyChunk")
            .field("len", &self.len())
            .field("ranges", &self.ranges)
            .field("uploading", &self.upload.is_some())
            .finish()
    }
}

impl DirtyChunk {
    /// The chunk's background upload, unless it started too long ago to be referenced
    /// without storing the block again (see [`REUPLOAD_AFTER_NS`]).
    fn fresh_upload(&self) -> Option<PendingUpload> {
        let fresh = now_ns().saturating_sub(self.upload_started_ns) < REUPLOAD_AFTER_NS;
        self.upload.clone().filter(|_| fresh)
    }

    /// The written bytes, at their offsets within the chunk.
    fn bytes(&self) -> &[u8] {
        match &self.full {
            Some(b) => b,
            None => &self.data,
        }
    }

    fn len(&self) -> usize {
        self.bytes().len()
    }

    /// The chunk, full, as the bytes of its block: moved, not copied.
    fn freeze(&mut self) -> Bytes {
        let b = Bytes::from(std::mem::take(&mut self.data));
        self.full = Some(b.clone());
        b
    }

    fn write(&mut self, off: usize, bytes: &[u8]) {
        self.upload = None;
        if let Some(full) = self.full.take() {
            self.data = Vec::from(full);
        }
        let end = off + bytes.len();
        if off >= self.data.len() {
            // Appending (the common case): no zero-fill of bytes about to be overwritten.
            self.data.resize(off, 0);
            self.data.extend_from_slice(bytes);
        } else {
            if self.data.len() < end {
                self.data.resize(end, 0);
            }
            if let Some(dst) = self.data.get_mut(off..end) {
                dst.copy_from_slice(bytes);
            }
        }
        self.ranges.push((off, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.ranges.len());
        for &(s, e) in &self.ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
    }

    /// True when `[a, b)` was entirely written.
    fn covers(&self, a: usize, b: usize) -> bool {
        a >= b || self.ranges.iter().any(|&(s, e)| s <= a && b <= e)
    }

    /// The chunk's content in a file that had none committed.
    fn new_content(&self) -> Vec<u8> {
        if self.covers(0, self.len()) {
            self.bytes().to_vec()
        } else {
            let mut base = Vec::new();
            self.patch(&mut base);
            base
        }
    }

    /// Writes the written ranges over `base` (grown with zeros as needed).
    fn patch(&self, base: &mut Vec<u8>) {
        let data = self.bytes();
        if base.len() < data.len() {
            base.resize(data.len(), 0);
        }
        for &(s, e) in &self.ranges {
            if let (Some(dst), Some(src)) = (base.get_mut(s..e), data.get(s..e)) {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// An open regular file on this instance. Owned by the caller (the FUSE layer keeps it in its
/// handle table); pass it to [`Fs::write`], [`Fs::read`], [`Fs::flush`] and finally
/// [`Fs::release`].
#[derive(Debug)]
pub struct OpenFile {
    fh: u64,
    ino: u64,
    dirty: BTreeMap<u64, DirtyChunk>,
    dirty_bytes: usize,
    /// The committed size and chunk map as last read through this handle, tagged with the
    /// inode's invalidation generation at the time of reading (see [`Fs::invalidate`]).
    meta: std::sync::Mutex<Option<MetaCache>>,
    /// Created by this handle's create and not flushed since: the first flush guesses that
    /// the file has no chunk records and takes the inode from the watch cache, so it reads
    /// nothing (its transaction compares both; a wrong guess costs one retry).
    new_here: bool,
    /// The attributes this handle was opened with: `fstat` of a file another mount deleted
    /// meanwhile answers from them (see [`Fs::getattr_open`]).
    opened_attr: Option<crate::fs::Attr>,
}

/// What a handle remembers of the committed file between reads, so a sequential read costs
/// no metadata round trip per request. Valid while the inode's generation is unchanged.
#[derive(Debug, Clone)]
struct MetaCache {
    generation: u64,
    size: u64,
    /// Chunk index → its record (None = a hole), for the indices looked up so far.
    chunks: BTreeMap<u64, Option<ChunkRec>>,
    /// The inode is gone from etcd (another mount removed its last link while this handle
    /// was open here): what the handle read before is what the file held, and nothing more
    /// can be read from etcd. See [`Fs::view_of_deleted`].
    deleted: bool,
}

/// Chunk records fetched per metadata range read on a cache miss (sequential reads then cost
/// one round trip per this many chunks).
const CHUNK_MAP_PAGE: u64 = 32;

impl OpenFile {
    /// A handle number unique within this [`Fs`] instance.
    pub fn fh(&self) -> u64 {
        self.fh
    }
    pub fn ino(&self) -> u64 {
        self.ino
    }
    /// Bytes buffered and not yet flushed.
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_bytes
    }
    fn pending_end(&self, cs: u64) -> u64 {
        self.dirty
            .iter()
            .next_back()
            .map_or(0, |(idx, d)| idx * cs + d.len() as u64)
    }
}

impl Fs {
    /// Opens regular file `ino` for reading and writing.
    pub async fn open(&self, ino: u64) -> FsResult<OpenFile> {
        Ok(self.open_attr(ino).await?.0)
    }

    /// Opens regular file `ino` and returns its attributes as read for the open (one read).
    pub async fn open_attr(&self, ino: u64) -> FsResult<(OpenFile, crate::fs::Attr)> {
        self.settle_ino(ino).await?;
        // The inode and the first chunk records together: the first read then needs no
        // metadata round trip of its own.
        let generation = self.generation(ino);
        let (rec, chunks) = self.read_view(ino, 0, CHUNK_MAP_PAGE - 1).await?;
        match rec.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("not a regular file")),
        }
        if rec.nlink == 0 && !self.is_open_locally(ino) {
            return Err(FsError::NotFound);
        }
        let h = self.new_handle(ino);
        if rec.kind == FileKind::File {
            *h.meta.lock().unwrap_or_else(|e| e.into_inner()) = Some(MetaCache {
                generation,
                size: rec.size,
                chunks,
                deleted: false,
            });
        }
        let attr = self.local_attr(ino, &rec);
        let mut h = h;
        h.opened_attr = Some(attr.clone());
        Ok((h, attr))
    }

    /// Opens a regular file this instance has just created (no need to read it back).
    pub fn open_created(&self, attr: &crate::fs::Attr) -> FsResult<OpenFile> {
        if attr.kind != FileKind::File {
            return Err(FsError::Invalid("not a regular file"));
        }
        let mut h = self.new_handle(attr.ino);
        h.opened_attr = Some(attr.clone());
        // Just created here: its committed size is known (the quota check needs it).
        *h.meta.lock().unwrap_or_else(|e| e.into_inner()) = Some(MetaCache {
            generation: self.generation(attr.ino),
            size: attr.size,
            chunks: BTreeMap::new(),
            deleted: false,
        });
        Ok(h)
    }

    /// [`Fs::open_created`] for a file the create really made (not an existing one it
    /// returned): its first flush needs no read (see `OpenFile::new_here`).
    pub fn open_new(&self, attr: &crate::fs::Attr) -> FsResult<OpenFile> {
        let mut h = self.open_created(attr)?;
        h.new_here = true;
        Ok(h)
    }

    fn new_handle(&self, ino: u64) -> OpenFile {
        *self
            .open_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(ino)
            .or_insert(0) += 1;
        OpenFile {
            fh: self.next_fh.fetch_add(1, Ordering::Relaxed),
            ino,
            dirty: BTreeMap::new(),
            dirty_bytes: 0,
            meta: std::sync::Mutex::new(None),
            new_here: false,
            opened_attr: None,
        }
    }

    /// Flushes `h` and closes it. When it was the last handle on this instance to an inode
    /// whose last link is gone, the inode is purged.
    pub async fn release(&self, mut h: OpenFile) -> FsResult<()> {
        let flushed = self.flush(&mut h).await;
        // Whatever could not be flushed is dropped with the handle.
        self.set_unflushed(h.ino, h.fh, 0);
        self.unreserve(h.fh);
        let orphaned_and_last = {
            // One lock with the pending-orphan check: see `Fs::settle_orphans`.
            let mut counts = self.open_counts.lock().unwrap_or_else(|e| e.into_inner());
            let last = match counts.get_mut(&h.ino) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    counts.remove(&h.ino);
                    true
                }
            };
            last && self.take_pending_orphan(h.ino)
        };
        if orphaned_and_last {
            if let Some((rec, _)) = self.get_inode_opt(h.ino).await? {
                if rec.nlink == 0 {
                    self.purge(h.ino).await?;
                }
            }
        }
        flushed
    }

    /// Buffers `data` at `offset`; flushes by itself when the handle's buffer exceeds
    /// `max_dirty_bytes`. Returns the number of bytes accepted (all of them).
    pub async fn write(&self, h: &mut OpenFile, offset: u64, data: &[u8]) -> FsResult<usize> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        if self.quota().is_some() && !data.is_empty() {
            // Growth past the file's size as this instance knows it (committed, or extended
            // by unflushed writes of any handle here) counts against the quota now, so the
            // application gets ENOSPC at this write rather than at close.
            let known = self.known_size(h).await?;
            self.reserve(h.fh, end.saturating_sub(known))?;
        }
        let cs = self.chunk_size;
        let mut pos = offset;
        let mut src = data;
        while pos < end {
            let idx = pos / cs;
            let within = (pos % cs) as usize;
            let n = ((cs - pos % cs) as usize).min(src.len());
            let (piece, rest) = src.split_at(n);
            let chunk = h.dirty.entry(idx).or_default();
            if chunk.full.is_none()
                && chunk.data.capacity() == 0
                && within == 0
                && self.opts.spawn.is_some()
            {
                // A writer starting at a chunk's beginning usually fills it: one allocation.
                chunk.data.reserve_exact(cs as usize);
            }
            let before = chunk.len();
            chunk.write(within, piece);
            h.dirty_bytes += chunk.len() - before;
            if let Some(spawn) = &self.opts.spawn {
                if chunk.len() as u64 == cs && chunk.covers(0, cs as usize) {
                    // Full: its block cannot depend on the committed content. Store it now.
                    let blocks = self.blocks.clone();
                    let data = chunk.freeze();
                    let upload = async move { blocks.put(data).await }.boxed().shared();
                    let driver = upload.clone();
                    spawn(
                        async move {
                            let _ = driver.await;
                        }
                        .boxed(),
                    );
                    chunk.upload = Some(upload);
                    chunk.upload_started_ns = now_ns();
                }
            }
            src = rest;
            pos += n as u64;
        }
        self.set_unflushed(h.ino, h.fh, h.pending_end(cs));
        if h.dirty_bytes > self.opts.max_dirty_bytes {
            self.flush(h).await?;
        }
        Ok(data.len())
    }

    /// The size of `h`'s file as this instance knows it: the committed size (from the
    /// handle's cache while the inode has not been invalidated, else read) or the end of the
    /// unflushed writes of any handle here, whichever is larger.
    async fn known_size(&self, h: &OpenFile) -> FsResult<u64> {
        let generation = self.generation(h.ino);
        let cached = h
            .meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|m| m.generation == generation)
            .map(|m| m.size);
        let committed = match cached {
            Some(size) => size,
            None => {
                let idx = h.pending_end(self.chunk_size) / self.chunk_size;
                self.committed_view(h, idx, idx).await?.0
            }
        };
        Ok(committed.max(self.unflushed_end(h.ino)))
    }

    /// The volume's watch saw chunk record `key` written (`value`) or deleted (`None`) by
    /// another mount: remember a file's first block, for [`Fs::prefetch_first_block`].
    pub fn note_chunk_change(&self, key: &[u8], value: Option<&[u8]>) {
        let Ok((ino, 0)) = self.keys.parse_any_chunk(key) else {
            return;
        };
        let block = value
            .and_then(|v| decode::<ChunkRec>(key, v).ok())
            .and_then(|c| Some((c.hash().ok()?, c.len)));
        let mut hints = self.first_blocks.lock().unwrap_or_else(|e| e.into_inner());
        match block {
            Some((hash, len)) => hints.insert(ino, hash, len),
            None => hints.remove(ino),
        }
    }

    /// This mount is handing out a directory listing: `inos` in the order listed. Opens that
    /// then follow it fetch the next files' first blocks ahead (see `prefetch_first_block`).
    /// When `listing_starts` (the first entries of a listing), the first blocks of up to
    /// [`OPEN_AHEAD`] of them, those of at most [`BATCHED_BLOCK_MAX`], are fetched at once,
    /// in one batch: a directory's listing is most often followed by opens of its files
    /// (tar, cp -r, rsync), and the first opens have no order to follow yet. Bounded (16 small
    /// blocks a listing, once cached not fetched again), so `ls -l` costs little.
    pub fn note_listed(&self, inos: impl IntoIterator<Item = u64>, listing_starts: bool) {
        let wanted = {
            let mut hints = self.first_blocks.lock().unwrap_or_else(|e| e.into_inner());
            let mut wanted = Vec::new();
            for ino in inos {
                hints.listed(ino);
                if listing_starts && wanted.len() < OPEN_AHEAD {
                    wanted.extend(hints.first_block(ino).filter(|&(_, len)| batched(len)));
                }
            }
            wanted
        };
        self.fetch_ahead(wanted);
    }

    /// Starts fetching, in the background, the block the watch last saw as `ino`'s first
    /// chunk, so that it travels while `open` reads the file's metadata from etcd (a round
    /// trip that close-to-open forbids skipping) instead of after it: for a small file the
    /// first read then waits for one round trip, not two. Only a guess: the read uses the
    /// chunk map `open` reads, and a stale guess costs a fetch, never wrong data (blocks are
    /// named by their hash and verified). Nothing without a spawner or a hint. When opens
    /// follow the order in which other mounts wrote the files, the next files' first blocks
    /// travel too (see `FirstBlockHints::on_open`): reading 600 uploads of 20-400 KiB in
    /// write order waited for each block's fetch (about 0.6 ms of 1.6 ms per file). Those of
    /// up to [`BATCHED_BLOCK_MAX`] go in one request per node ([`BlockIo::get_many`]): a
    /// small block's fetch costs its request, not its bytes (a cold `tar` of a WordPress tree
    /// cost the nodes 0.21 ms and this mount 0.14 ms of CPU per block fetched one by one).
    pub fn prefetch_first_block(&self, ino: u64) {
        let wanted = self
            .first_blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_open(ino);
        self.fetch_ahead(wanted);
    }

    /// Fetches `wanted` (blocks with their lengths) into the block cache in the background:
    /// the small ones in one batch, the others one by one. Nothing without a spawner.
    fn fetch_ahead(&self, wanted: Vec<(BlockHash, u32)>) {
        let Some(spawn) = self.opts.spawn.as_ref().filter(|_| !wanted.is_empty()) else {
            return;
        };
        let (small, large): (Vec<_>, Vec<_>) =
            wanted.into_iter().partition(|&(_, len)| batched(len));
        let blocks = self.blocks.clone();
        spawn(
            async move {
                let small = small.into_iter().map(|(hash, _)| hash).collect();
                let one_by_one = large.into_iter().map(|(hash, _)| blocks.get(hash));
                futures::future::join(
                    blocks.get_many(small),
                    futures::future::join_all(one_by_one),
                )
                .await;
            }
            .boxed(),
        );
    }

    pub(crate) async fn fetch_chunk(&self, rec: &ChunkRec) -> FsResult<Bytes> {
        let hash = rec.hash()?;
        let bytes = self.blocks.get(hash).await?;
        if bytes.len() != rec.len as usize || bytes.len() as u64 > self.chunk_size {
            return Err(FsError::Corrupt(format!(
                "block {hash} has {} bytes, chunk map says {}",
                bytes.len(),
                rec.len
            )));
        }
        Ok(bytes)
    }

    pub(crate) async fn get_chunk(
        &self,
        ino: u64,
        idx: u64,
    ) -> FsResult<Option<(ChunkRec, Revision)>> {
        let key = self.keys.chunk(ino, idx);
        let v = self.kv.get(&key).await?;
        self.decode_chunk(ino, idx, v)
    }

    fn decode_chunk(
        &self,
        ino: u64,
        idx: u64,
        v: Option<(Vec<u8>, Revision)>,
    ) -> FsResult<Option<(ChunkRec, Revision)>> {
        let key = self.keys.chunk(ino, idx);
        match v {
            None => Ok(None),
            Some((v, rev)) => {
                let rec: ChunkRec = decode(&key, &v)?;
                if u64::from(rec.len) > self.chunk_size || rec.len == 0 {
                    return Err(FsError::Corrupt(format!(
                        "chunk {idx} of inode {ino}: bad length {}",
                        rec.len
                    )));
                }
                Ok(Some((rec, rev)))
            }
        }
    }

    /// The inode and its chunk records `[first, upto]` (holes as `None`), read as one
    /// snapshot in one round trip: a flush committing in between cannot pair a new size with
    /// an old chunk map (which would read as zeros).
    async fn read_view(
        &self,
        ino: u64,
        first: u64,
        upto: u64,
    ) -> FsResult<(InodeRec, BTreeMap<u64, Option<ChunkRec>>)> {
        let cs = self.chunk_size;
        let ikey = self.keys.inode(ino);
        let start = self.keys.chunk(ino, first);
        let mut end = self.keys.chunk(ino, upto);
        end.push(0);
        let keys = [ikey];
        let (values, page) = self.kv.get_many_and_range(&keys, &start, &end, 0).await?;
        let rec = match values.into_iter().next().flatten() {
            Some((v, _)) => crate::schema::decode_inode(&keys[0], &v)?,
            None => return Err(FsError::NotFound),
        };
        let mut fetched: BTreeMap<u64, Option<ChunkRec>> =
            (first..=upto).map(|i| (i, None)).collect();
        for e in page.entries {
            let idx = self.keys.parse_chunk(ino, &e.key)?;
            let c: ChunkRec = decode(&e.key, &e.value)?;
            if u64::from(c.len) > cs || c.len == 0 {
                return Err(FsError::Corrupt(format!(
                    "chunk {idx} of inode {ino}: bad length {}",
                    c.len
                )));
            }
            fetched.insert(idx, Some(c));
        }
        Ok((rec, fetched))
    }

    /// The committed size of `h`'s file and the records of chunks `[first, last]`, from the
    /// handle's cache when the inode has not been invalidated since, else from the store
    /// (one inode read and one chunk-map range read of at least [`CHUNK_MAP_PAGE`] chunks).
    async fn committed_view(
        &self,
        h: &OpenFile,
        first: u64,
        last: u64,
    ) -> FsResult<(u64, BTreeMap<u64, Option<ChunkRec>>)> {
        let generation = self.generation(h.ino);
        {
            let guard = h.meta.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = guard.as_ref() {
                let known = (first..=last).all(|i| m.chunks.contains_key(&i));
                if (m.generation == generation || m.deleted) && known {
                    let view = m.chunks.range(first..=last).map(|(k, v)| (*k, v.clone()));
                    return Ok((m.size, view.collect()));
                }
                if m.deleted {
                    return Err(FsError::NotFound);
                }
            }
        }
        let upto = last.max(first.saturating_add(CHUNK_MAP_PAGE - 1));
        let (rec, fetched) = match self.read_view(h.ino, first, upto).await {
            Err(FsError::NotFound) => return self.view_of_deleted(h, first, last),
            r => r?,
        };
        let view: BTreeMap<u64, Option<ChunkRec>> = fetched
            .range(first..=last)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut guard = h.meta.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut() {
            Some(m) if m.generation == generation && m.size == rec.size => m.chunks.extend(fetched),
            _ => {
                *guard = Some(MetaCache {
                    generation,
                    size: rec.size,
                    chunks: fetched,
                    deleted: false,
                })
            }
        }
        Ok((rec.size, view))
    }

    /// `h`'s file is gone from etcd: another mount removed its last link (inode numbers are
    /// never reused, so the inode cannot come back). As on a local filesystem, the open
    /// descriptor keeps the file as it was: the size and chunk records this handle last read
    /// serve every later read of the chunks they cover, for as long as their blocks are kept
    /// (GC removes unreferenced blocks only when older than its grace period, 1 h by
    /// default). Chunks this handle never looked up cannot be known any more: ENOENT.
    fn view_of_deleted(
        &self,
        h: &OpenFile,
        first: u64,
        last: u64,
    ) -> FsResult<(u64, BTreeMap<u64, Option<ChunkRec>>)> {
        let mut guard = h.meta.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = guard.as_mut() else {
            return Err(FsError::NotFound);
        };
        m.deleted = true;
        if !(first..=last).all(|i| m.chunks.contains_key(&i)) {
            return Err(FsError::NotFound);
        }
        let view = m.chunks.range(first..=last).map(|(k, v)| (*k, v.clone()));
        Ok((m.size, view.collect()))
    }

    /// Attributes of `h`'s file (`fstat` through the descriptor): as [`Fs::getattr`], or, when
    /// another mount deleted the file meanwhile, the attributes it was opened with, with no
    /// link left and the size this handle knows.
    pub async fn getattr_open(&self, h: &OpenFile) -> FsResult<crate::fs::Attr> {
        match self.getattr(h.ino).await {
            Err(FsError::NotFound) => {
                let mut attr = h.opened_attr.clone().ok_or(FsError::NotFound)?;
                let committed = h
                    .meta
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map_or(attr.size, |m| m.size);
                attr.size = committed.max(h.pending_end(self.chunk_size));
                attr.blocks = attr.size.div_ceil(512);
                attr.nlink = 0;
                Ok(attr)
            }
            r => r,
        }
    }

    /// Reads up to `len` bytes at `offset`: committed data overlaid with this handle's own
    /// unflushed writes; holes read as zeros; short at end of file. A block missing because
    /// another mount's put of it is still in flight is waited for (see `pending.rs`).
    pub async fn read(&self, h: &OpenFile, offset: u64, len: usize) -> FsResult<Bytes> {
        self.retry_while_pending(h.ino, || self.read_once(h, offset, len))
            .await
    }

    async fn read_once(&self, h: &OpenFile, offset: u64, len: usize) -> FsResult<Bytes> {
        let cs = self.chunk_size;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.settle_ino(h.ino).await?;
        let want_end = offset.saturating_add(len.min(MAX_READ) as u64);
        let first = offset / cs;
        let last = (want_end - 1) / cs;
        let (committed_size, chunks) = self.committed_view(h, first, last).await?;
        let size = committed_size.max(h.pending_end(cs));
        if offset >= size {
            return Ok(Bytes::new());
        }
        let end = size.min(want_end);
        // The common case, a read inside one committed block with nothing buffered over it:
        // a slice of the (cached, verified) block, no copy.
        if first == (end - 1) / cs && !h.dirty.contains_key(&first) {
            if let Some(Some(c)) = chunks.get(&first) {
                let bytes = self.fetch_chunk(c).await?;
                let a = (offset - first * cs) as usize;
                let b = (end - first * cs) as usize;
                if b <= bytes.len() {
                    return Ok(bytes.slice(a..b));
                }
            }
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let idx = pos / cs;
            let cstart = idx * cs;
            let a = (pos - cstart) as usize;
            let b = (end.min(cstart + cs) - cstart) as usize;
            let dst_off = (pos - offset) as usize;
            let dirty = h.dirty.get(&idx);
            let dst = out
                .get_mut(dst_off..dst_off + (b - a))
                .ok_or_else(|| FsError::Corrupt("internal: read range".into()))?;
            match dirty {
                Some(d) if d.covers(a, b) && b <= d.len() => {
                    if let Some(src) = d.bytes().get(a..b) {
                        dst.copy_from_slice(src);
                    }
                }
                _ => {
                    let committed = match chunks.get(&idx) {
                        Some(Some(c)) => Some(self.fetch_chunk(c).await?),
                        _ => None,
                    };
                    match dirty {
                        Some(d) => {
                            let mut content = committed.map(|b| b.to_vec()).unwrap_or_default();
                            d.patch(&mut content);
                            copy_clipped(dst, &content, a, b);
                        }
                        None => {
                            if let Some(bytes) = committed {
                                copy_clipped(dst, &bytes, a, b);
                            }
                        }
                    }
                }
            }
            pos = cstart + b as u64;
        }
        Ok(Bytes::from(out))
    }

    /// Warms the block cache with the chunk holding `offset` (read-ahead). Errors are ignored:
    /// the real read will report them.
    pub async fn prefetch(&self, h: &OpenFile, offset: u64) {
        let idx = offset / self.chunk_size;
        if let Ok((size, chunks)) = self.committed_view(h, idx, idx).await {
            if offset < size {
                if let Some(Some(c)) = chunks.get(&idx) {
                    let _ = self.fetch_chunk(c).await;
                }
            }
        }
    }

    /// Stores chunk `idx`'s `content` as a block: (idx, hash, length).
    async fn store_chunk(&self, idx: u64, content: Vec<u8>) -> FsResult<(u64, BlockHash, u32)> {
        let len =
            u32::try_from(content.len()).map_err(|_| FsError::Corrupt("chunk too large".into()))?;
        let hash = self.blocks.put(Bytes::from(content)).await?;
        Ok((idx, hash, len))
    }

    /// Makes every buffered write of `h` durable and visible: each dirty chunk becomes a new
    /// block (read-modify-write when partly overwritten), and then the new chunk references,
    /// size and mtime are committed in one transaction (several only when more chunks are dirty
    /// than fit in one; in ascending chunk order, each a consistent state).
    pub async fn flush(&self, h: &mut OpenFile) -> FsResult<()> {
        if h.dirty.is_empty() {
            // A file created early exists for other mounts once its `close` returns.
            if h.new_here {
                self.settle_ino(h.ino).await?;
            }
            return Ok(());
        }
        let cs = self.chunk_size;
        // Chunk records + the inode + this instance's usage key.
        let per_txn = self.opts.max_txn_ops.saturating_sub(2).max(1);
        let idxs: Vec<u64> = h.dirty.keys().copied().collect();
        // Blocks stored before the loop (for the chunks of a new file, base revision 0).
        let mut prestored: HashMap<u64, (Revision, BlockHash, u32)> = HashMap::new();
        // A file created early whose create has not started: one transaction for both
        // (room for the create's entry and directory times beside the chunk records).
        if h.new_here && idxs.len() + 2 <= per_txn {
            if let Some(taken) = self.take_early_create(h.ino) {
                if self.flush_with_create(h, taken, &mut prestored).await? {
                    return Ok(());
                }
            }
        }
        for batch in idxs.chunks(per_txn) {
            // Blocks already stored for a given committed base revision: a retry whose base
            // did not change reuses them.
            let mut stored: HashMap<u64, (Revision, BlockHash, u32)> =
                std::mem::take(&mut prestored);
            if h.new_here && self.is_early(h.ino) {
                // Created early, its transaction not committed yet: store the blocks (a new
                // file has no committed content to patch) while it commits, then wait for it.
                // The chunks not stored in the background (a file's last, partial one; at most
                // the handle's dirty limit).
                let contents: Vec<(u64, Vec<u8>)> = batch
                    .iter()
                    .filter(|idx| !stored.contains_key(idx))
                    .filter_map(|idx| {
                        let d = h.dirty.get(idx).filter(|d| d.upload.is_none())?;
                        Some((*idx, d.new_content()))
                    })
                    .collect();
                let puts = futures::future::join_all(
                    contents
                        .into_iter()
                        .map(|(idx, content)| self.store_chunk(idx, content)),
                );
                let (puts, settled) = futures::future::join(puts, self.settle_ino(h.ino)).await;
                settled?;
                for r in puts {
                    let (idx, hash, len) = r?;
                    stored.insert(idx, (0, hash, len));
                }
            } else if h.new_here {
                // One that finished already: its failure, if it failed.
                self.settle_ino(h.ino).await?;
            }
            let mut attempt = 0;
            let started = std::time::Instant::now();
            'attempt: loop {
                let ikey = self.keys.inode(h.ino);
                let mut current: HashMap<u64, Option<(ChunkRec, Revision)>> = HashMap::new();
                // A file created by this handle and not flushed yet: no chunk records, the
                // inode as the watch cache knows it (this mount's create was written through).
                let guess = if attempt == 0 && h.new_here {
                    self.cached_inode_to_compare(h.ino)
                } else {
                    None
                };
                let (mut rec, rev) = match guess {
                    Some(known) => known,
                    None => {
                        // The inode and every chunk record of the batch, in one round trip.
                        let mut keys = vec![ikey.clone()];
                        keys.extend(batch.iter().map(|&idx| self.keys.chunk(h.ino, idx)));
                        let got = self.kv.get_many(&keys).await?;
                        let mut got = got.into_iter();
                        let known = match got.next().flatten() {
                            Some((v, rev)) => (crate::schema::decode_inode(&ikey, &v)?, rev),
                            None => {
                                self.discard_writes_of_deleted(h);
                                return Ok(());
                            }
                        };
                        for (&idx, v) in batch.iter().zip(got) {
                            current.insert(idx, self.decode_chunk(h.ino, idx, v)?);
                        }
                        known
                    }
                };
                if rec.kind != FileKind::File {
                    return Err(FsError::Invalid("not a regular file"));
                }
                let mut txn = Txn::default();
                let mut new_size = rec.size;
                // Phase 1: the content of each dirty chunk whose block is not stored yet
                // (read-modify-write when partly overwritten); phase 2: store those blocks,
                // several in flight at once; phase 3: reference them all in one transaction.
                let mut refs: Vec<ChunkRef> = Vec::new();
                let mut uploads: Vec<(u64, Revision, Vec<u8>)> = Vec::new();
                for &idx in batch {
                    let Some(d) = h.dirty.get(&idx) else { continue };
                    let cur = current.remove(&idx).flatten();
                    let crev = cur.as_ref().map_or(0, |(_, r)| *r);
                    new_size = new_size.max(idx * cs + d.len() as u64);
                    if let Some(up) = d.fresh_upload() {
                        // A full chunk stored in the background: its block is the content
                        // whatever the committed base is.
                        let len = u32::try_from(d.len())
                            .map_err(|_| FsError::Corrupt("chunk too large".into()))?;
                        match up.await {
                            Ok(hash) => {
                                refs.push((idx, crev, Some((hash, len))));
                                continue;
                            }
                            Err(e) => {
                                // Store it again at the next flush.
                                if let Some(dm) = h.dirty.get_mut(&idx) {
                                    dm.upload = None;
                                }
                                return Err(e.into());
                            }
                        }
                    }
                    match stored.get(&idx) {
                        Some(&(r, hash, len)) if r == crev => {
                            refs.push((idx, crev, Some((hash, len))));
                        }
                        _ => {
                            let base_len = cur.as_ref().map_or(0, |(c, _)| c.len as usize);
                            let content = if d.covers(0, d.len()) && d.len() >= base_len {
                                d.bytes().to_vec()
                            } else {
                                let mut base = match &cur {
                                    Some((c, _)) => match self
                                        .fetch_chunk_unless_pending(h.ino, c, started)
                                        .await?
                                    {
                                        Some(bytes) => bytes.to_vec(),
                                        // Another mount's new content in flight: once it
                                        // landed or was settled, build on what is there then.
                                        None => continue 'attempt,
                                    },
                                    None => Vec::new(),
                                };
                                d.patch(&mut base);
                                base
                            };
                            refs.push((idx, crev, None));
                            uploads.push((idx, crev, content));
                        }
                    }
                }
                let puts = uploads.into_iter().map(|(idx, crev, content)| async move {
                    let (idx, hash, len) = self.store_chunk(idx, content).await?;
                    Ok::<_, FsError>((idx, crev, hash, len))
                });
                let mut in_flight = futures::stream::iter(puts).buffer_unordered(PUTS_IN_FLIGHT);
                while let Some(r) = in_flight.next().await {
                    let (idx, crev, hash, len) = r?;
                    stored.insert(idx, (crev, hash, len));
                }
                for (idx, crev, known) in refs {
                    let (hash, len) = match known {
                        Some(k) => k,
                        None => match stored.get(&idx) {
                            Some(&(_, hash, len)) => (hash, len),
                            None => {
                                return Err(FsError::Corrupt("internal: block not stored".into()))
                            }
                        },
                    };
                    let ckey = self.keys.chunk(h.ino, idx);
                    txn.cmp(ckey.clone(), crev);
                    txn.put(
                        ckey,
                        encode(&ChunkRec {
                            block: hash.to_hex(),
                            len,
                        }),
                    );
                }
                let now = now_ns();
                txn.usage = bytes_i64(new_size).saturating_sub(bytes_i64(rec.size));
                rec.size = new_size;
                rec.mtime_ns = now;
                rec.ctime_ns = now;
                txn.cmp(ikey.clone(), rev);
                txn.put(ikey, encode(&rec));
                if self.commit(txn).await? {
                    break;
                }
                self.backoff(&mut attempt).await?;
            }
            self.note_flushed(h, batch);
        }
        // Committed: the growth is in this instance's usage now, no longer reserved.
        self.unreserve(h.fh);
        Ok(())
    }

    /// Another mount removed the last link of `h`'s file while it was open here, and the
    /// inode is gone: as on a local filesystem, what was written through a descriptor of a
    /// deleted file goes with it, and the `close` succeeds. (Blocks already stored for it are
    /// garbage for GC.)
    fn discard_writes_of_deleted(&self, h: &mut OpenFile) {
        h.dirty.clear();
        h.dirty_bytes = 0;
        h.new_here = false;
        if let Some(m) = h.meta.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            m.deleted = true;
        }
        self.set_unflushed(h.ino, h.fh, 0);
        self.unreserve(h.fh);
    }

    /// After a flush's transaction committed chunks `idxs` of `h`: they are no longer dirty,
    /// the file exists in etcd, and cached attributes of it are stale.
    fn note_flushed(&self, h: &mut OpenFile, idxs: &[u64]) {
        h.new_here = false;
        self.invalidate(h.ino);
        for idx in idxs {
            if let Some(d) = h.dirty.remove(idx) {
                h.dirty_bytes = h.dirty_bytes.saturating_sub(d.len());
            }
        }
        self.set_unflushed(h.ino, h.fh, h.pending_end(self.chunk_size));
    }

    /// The first flush of a file created early, whose create `taken` has not committed: stores
    /// the blocks, then commits the create and the content in one transaction (one etcd commit
    /// per new file instead of two). `true` when that committed; otherwise the create has
    /// committed on its own (or its error is returned) and the ordinary flush is to follow,
    /// reusing the blocks stored here (`stored`).
    async fn flush_with_create(
        &self,
        h: &mut OpenFile,
        taken: TakenCreate,
        stored: &mut HashMap<u64, (Revision, BlockHash, u32)>,
    ) -> FsResult<bool> {
        // Each dirty chunk's block: a full chunk stored in the background already (awaited);
        // the others stored now, while the transaction commits when this instance has a
        // session to vouch for them (pending content, see `pending.rs`), else before it. A
        // block that failed is left out, and the ordinary flush redoes it.
        let per_txn = self.opts.max_txn_ops.saturating_sub(2).max(1);
        let session = self.kv.session().filter(|_| h.dirty.len() + 4 <= per_txn);
        let mut in_flight: Vec<(u64, BlockHash)> = Vec::new();
        let mut now_puts = Vec::new();
        let mut background = Vec::new();
        for (&idx, d) in &h.dirty {
            let len = u32::try_from(d.len()).map_err(|_| FsError::Invalid("chunk too large"));
            match d.fresh_upload() {
                Some(up) => {
                    background.push(async move { Ok::<_, FsError>((idx, up.await?, len?)) })
                }
                None => {
                    let content = d.new_content();
                    if session.is_some() {
                        let hash = BlockHash::of(&content);
                        in_flight.push((idx, hash));
                        stored.insert(idx, (0, hash, len?));
                    }
                    now_puts.push(self.store_chunk(idx, content));
                }
            }
        }
        for (idx, hash, len) in futures::future::join_all(background)
            .await
            .into_iter()
            .flatten()
        {
            stored.insert(idx, (0, hash, len));
        }
        let pending = session.filter(|_| !in_flight.is_empty());
        // The record names every chunk the transaction writes, the ones stored already too: a
        // withdrawal takes them all, so a new file is left whole or empty, never partly.
        let recorded: Vec<(u64, BlockHash)> = h
            .dirty
            .keys()
            .filter_map(|idx| stored.get(idx).map(|&(_, hash, _)| (*idx, hash)))
            .collect();
        let (merged, put_error) = match pending {
            Some(session) => {
                let (merged, puts) = futures::future::join(
                    self.commit_create_with_content(h, &taken, stored, Some((session, &recorded))),
                    futures::future::join_all(now_puts),
                )
                .await;
                let put_error = puts.into_iter().find_map(|r| r.err());
                if put_error.is_some() {
                    for (idx, _) in &in_flight {
                        stored.remove(idx);
                    }
                }
                (merged, put_error)
            }
            None => {
                let puts = futures::future::join_all(now_puts).await;
                for (idx, hash, len) in puts.into_iter().flatten() {
                    stored.insert(idx, (0, hash, len));
                }
                let merged = self
                    .commit_create_with_content(h, &taken, stored, None)
                    .await;
                (merged, None)
            }
        };
        if let (Ok(true), Some(session)) = (&merged, pending) {
            // The file exists for everyone now (its create committed with the content).
            let _ = taken.done.send(Ok(()));
            self.note_writer_alive(session);
            if put_error.is_some() {
                // Its content could not be stored: withdrawn. The ordinary flush follows, which
                // stores the blocks again (a node may have come back or been replaced) and
                // reports its own failure.
                h.new_here = false;
                self.invalidate(h.ino);
                self.withdraw_own_pending(h.ino).await?;
                return Ok(false);
            }
            if self.kv.session() == Some(session) {
                self.clear_pending(h.ino).await;
            } else {
                self.confirm_own_pending(h.ino, &recorded).await?;
            }
            let idxs: Vec<u64> = h.dirty.keys().copied().collect();
            self.note_flushed(h, &idxs);
            self.unreserve(h.fh);
            return Ok(true);
        }
        if pending.is_some() && put_error.is_none() && merged.is_err() {
            // The transaction's outcome is unknown: if it committed, its record goes (the
            // blocks are durable).
            self.clear_pending(h.ino).await;
        }
        if let Ok(true) = merged {
            let _ = taken.done.send(Ok(()));
            let idxs: Vec<u64> = h.dirty.keys().copied().collect();
            self.note_flushed(h, &idxs);
            self.unreserve(h.fh);
            return Ok(true);
        }
        // Refused (the parent changed since, a block is missing) or failed: the create alone,
        // the ordinary way, which reads etcd as it must.
        let made = self
            .make_in_settled(
                taken.parent,
                &taken.name,
                taken.node.clone(),
                h.ino,
                taken.at,
            )
            .await;
        let _ = taken.done.send(made.clone());
        made.map(|()| false)
    }

    /// The transaction of an early create (as `make_node_as` builds its first attempt: the
    /// parent as cached, compared; name, inode and claim compared) with the file's first
    /// content: its chunk records (compared absent) and the inode with its size. `false` when
    /// it cannot be built from what is known (the caller falls back) or etcd refuses it.
    async fn commit_create_with_content(
        &self,
        h: &OpenFile,
        taken: &TakenCreate,
        stored: &HashMap<u64, (Revision, BlockHash, u32)>,
        pending: Option<(u64, &[(u64, BlockHash)])>,
    ) -> FsResult<bool> {
        // A parent made early commits first (the blocks are stored meanwhile).
        self.settle_ino(taken.parent).await?;
        let Some((p, prev)) = self.cached_inode_to_compare(taken.parent) else {
            return Ok(false);
        };
        // The early create answered without set-group-ID; a parent that has it now decides
        // the group differently: the create alone then.
        if p.kind != FileKind::Dir || p.nlink == 0 || p.mode & libc::S_ISGID != 0 {
            return Ok(false);
        }
        let cs = self.chunk_size;
        let mut txn = Txn::default();
        txn.cmp(self.keys.inode(taken.parent), prev);
        let node = &taken.node;
        let mut rec = self.new_inode_rec(node, taken.parent, node.perm, node.gid, taken.at);
        for (&idx, d) in &h.dirty {
            let Some(&(_, hash, len)) = stored.get(&idx) else {
                return Ok(false);
            };
            let ckey = self.keys.chunk(h.ino, idx);
            txn.cmp(ckey.clone(), 0);
            txn.put(
                ckey,
                encode(&ChunkRec {
                    block: hash.to_hex(),
                    len,
                }),
            );
            rec.size = rec.size.max(idx * cs + d.len() as u64);
        }
        let now = now_ns();
        rec.mtime_ns = now;
        rec.ctime_ns = now;
        txn.usage = bytes_i64(rec.size);
        self.put_new_entry(&mut txn, taken.parent, &taken.name, h.ino, &rec, taken.at);
        if let Some((session, in_flight)) = pending {
            self.mark_pending(&mut txn, h.ino, session, in_flight);
        }
        self.commit(txn).await
    }

    /// fsync: the same as [`Fs::flush`] (a committed transaction is durable in etcd, and
    /// blocks are durable when `BlockIo::put` returns).
    pub async fn fsync(&self, h: &mut OpenFile) -> FsResult<()> {
        self.flush(h).await
    }

    /// Indices of `ino`'s chunks at or after `from`, ascending.
    pub(crate) async fn chunk_indices_from(&self, ino: u64, from: u64) -> FsResult<Vec<u64>> {
        let end = prefix_end(&self.keys.chunks(ino));
        let mut start = self.keys.chunk(ino, from);
        let mut out = Vec::new();
        loop {
            let page = self.kv.range(&start, &end, 1024).await?;
            for e in &page.entries {
                out.push(self.keys.parse_chunk(ino, &e.key)?);
            }
            match (page.more, page.entries.last()) {
                (true, Some(last)) => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// Sets the size of regular file `ino`. Growing only changes the size (chunks never extend
    /// past the size, so the new range reads as zeros). Shrinking drops the chunks past the end
    /// and re-cuts the last partial one; when too many chunks go for one transaction, it drops
    /// them from the top down, each step a file consistently truncated to a chunk boundary.
    pub(crate) async fn truncate(&self, ino: u64, new_size: u64) -> FsResult<()> {
        let r = self.truncate_inner(ino, new_size).await;
        self.invalidate(ino);
        r
    }

    async fn truncate_inner(&self, ino: u64, new_size: u64) -> FsResult<()> {
        if new_size > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig);
        }
        let cs = self.chunk_size;
        // Chunk deletes + the last chunk's re-cut + the inode + this instance's usage key.
        let budget = self.opts.max_txn_ops.saturating_sub(3).max(1);
        let mut attempt = 0;
        let started = std::time::Instant::now();
        'outer: loop {
            let (mut rec, mut rev) = self.get_inode(ino).await?;
            match rec.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("truncate of a special file")),
            }
            let ikey = self.keys.inode(ino);
            let now = now_ns();
            rec.mtime_ns = now;
            rec.ctime_ns = now;
            if new_size >= rec.size {
                // Growth beyond what this instance's unflushed writes already reserved.
                let known = rec.size.max(self.unflushed_end(ino));
                self.check_growth(new_size.saturating_sub(known))?;
                let mut txn = Txn::default();
                txn.usage = bytes_i64(new_size).saturating_sub(bytes_i64(rec.size));
                rec.size = new_size;
                txn.cmp(ikey.clone(), rev);
                txn.put(ikey, encode(&rec));
                if self.commit(txn).await? {
                    return Ok(());
                }
                self.backoff(&mut attempt).await?;
                continue;
            }
            let keep = new_size.div_ceil(cs);
            let mut doomed = self.chunk_indices_from(ino, keep).await?;
            while doomed.len() > budget {
                let top = doomed.split_off(doomed.len() - budget);
                let lowest = top.first().copied().unwrap_or(keep);
                let old_size = rec.size;
                rec.size = rec.size.min(lowest.saturating_mul(cs)).max(new_size);
                let mut txn = Txn::default();
                txn.usage = bytes_i64(rec.size).saturating_sub(bytes_i64(old_size));
                txn.cmp(ikey.clone(), rev);
                for idx in top {
                    txn.del(self.keys.chunk(ino, idx));
                }
                txn.put(ikey.clone(), encode(&rec));
                if !self.commit(txn).await? {
                    self.backoff(&mut attempt).await?;
                    continue 'outer;
                }
                // Our own commit changed the inode's revision: pick it up, and start over if
                // anyone else got in between.
                match self.get_inode_opt(ino).await? {
                    Some((r2, rev2)) if r2 == rec => rev = rev2,
                    _ => continue 'outer,
                }
            }
            let mut txn = Txn::default();
            txn.cmp(ikey.clone(), rev);
            for idx in doomed {
                txn.del(self.keys.chunk(ino, idx));
            }
            let keep_len = new_size % cs;
            if keep_len != 0 {
                let last = new_size / cs;
                if let Some((c, crev)) = self.get_chunk(ino, last).await? {
                    if u64::from(c.len) > keep_len {
                        let Some(bytes) = self.fetch_chunk_unless_pending(ino, &c, started).await?
                        else {
                            continue 'outer;
                        };
                        let cut = bytes.slice(..keep_len as usize);
                        let hash = self.blocks.put(cut).await?;
                        let ckey = self.keys.chunk(ino, last);
                        txn.cmp(ckey.clone(), crev);
                        txn.put(
                            ckey,
                            encode(&ChunkRec {
                                block: hash.to_hex(),
                                len: keep_len as u32,
                            }),
                        );
                    }
                }
            }
            txn.usage = bytes_i64(new_size).saturating_sub(bytes_i64(rec.size));
            rec.size = new_size;
            txn.put(ikey, encode(&rec));
            if self.commit(txn).await? {
                return Ok(());
            }
            self.backoff(&mut attempt).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DirtyChunk;
    use crate::{Fs, FsOptions, MemBlocks, MemKv, ROOT_INO};
    use futures::executor::block_on;
    use std::sync::Arc;

    /// `stat` after a buffered write shows the new size (pjdfstest open::interact_2gb, fsx's
    /// size checks), on this instance only, until the flush commits it for everyone.
    #[test]
    fn attributes_include_unflushed_writes() {
        block_on(async {
            let kv = Arc::new(MemKv::new());
            let blocks = Arc::new(MemBlocks::new());
            let opts = FsOptions {
                chunk_size: 16,
                ..FsOptions::default()
            };
            let a = Fs::open_volume(kv.clone(), blocks.clone(), "v", opts.clone())
                .await
                .unwrap();
            let b = Fs::open_volume(kv, blocks, "v", opts).await.unwrap();
            let (f, _) = a.create(ROOT_INO, b"f", 0o644, 0, 0, true).await.unwrap();
            let mut h1 = a.open(f.ino).await.unwrap();
            let mut h2 = a.open(f.ino).await.unwrap();
            a.write(&mut h1, 40, b"abc").await.unwrap();
            a.write(&mut h2, 5, b"x").await.unwrap();
            assert_eq!(a.getattr(f.ino).await.unwrap().size, 43);
            assert_eq!(a.lookup(ROOT_INO, b"f").await.unwrap().size, 43);
            assert_eq!(b.getattr(f.ino).await.unwrap().size, 0);
            assert!(a.has_unflushed_writes(f.ino, Some(h2.fh())));
            a.flush(&mut h1).await.unwrap();
            assert!(!a.has_unflushed_writes(f.ino, Some(h2.fh())));
            assert!(a.has_unflushed_writes(f.ino, None));
            assert_eq!(b.getattr(f.ino).await.unwrap().size, 43);
            a.release(h2).await.unwrap();
            assert!(!a.has_unflushed_writes(f.ino, None));
            a.release(h1).await.unwrap();
            assert_eq!(a.getattr(f.ino).await.unwrap().size, 43);
        });
    }

    #[test]
    fn dirty_chunk_ranges_merge() {
        let mut d = DirtyChunk::default();
        d.write(4, b"ab");
        d.write(0, b"xy");
        assert!(!d.covers(0, 6));
        d.write(2, b"zz");
        assert_eq!(d.ranges, vec![(0, 6)]);
        assert!(d.covers(0, 6));
        let mut base = b"0123456789".to_vec();
        d.patch(&mut base);
        assert_eq!(&base, b"xyzzab6789");
    }
}

/// Files' first blocks as the watch saw other mounts commit them (newest
/// [`FIRST_BLOCK_HINTS`] inodes, oldest forgotten first), with two orders readers tend to
/// follow: the order they were written in (uploads verified or served in sequence) and the
/// order this mount listed them in (tar, cp -r, rsync read a directory's files as listed).
#[derive(Default)]
pub(crate) struct FirstBlockHints {
    /// Each file's first block and its length.
    map: HashMap<u64, (BlockHash, u32)>,
    written: OpenOrder,
    listed: OpenOrder,
}

/// ~1 MiB of hints: more files than a directory tree being copied in usually has.
pub(crate) const FIRST_BLOCK_HINTS: usize = 16_384;
/// Files fetched ahead once opens follow an order.
pub(crate) const OPEN_AHEAD: usize = 16;
/// Fetching ahead resumes when fewer files than this are still ahead of the one opened, so
/// that the next files' first blocks go in batches of about `OPEN_AHEAD / 2` (see
/// [`BATCHED_BLOCK_MAX`]) rather than one per open.
const OPEN_AHEAD_REFILL: u64 = OPEN_AHEAD as u64 / 2;
/// First blocks up to this size are fetched ahead in batches (one request per node); larger
/// ones one by one, so that a batch's small blocks do not wait behind a large block's bytes.
pub(crate) const BATCHED_BLOCK_MAX: usize = 256 << 10;

/// Whether a block of `len` bytes is fetched ahead in a batch ([`BATCHED_BLOCK_MAX`]).
fn batched(len: u32) -> bool {
    len as usize <= BATCHED_BLOCK_MAX
}
/// How far (in places) an open may jump forward and still count as following the order.
const OPEN_GAP: u64 = 4;

/// Inodes in an order (oldest [`FIRST_BLOCK_HINTS`] forgotten), and how far opens have
/// followed it.
#[derive(Default)]
struct OpenOrder {
    place_of: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
    next_place: u64,
    /// Place of the last file opened in this order.
    last_open: Option<u64>,
    /// Highest place already fetched ahead.
    ahead_to: u64,
}

impl OpenOrder {
    /// Puts `ino` last, unless it has a place already and `keep` says to keep it. Returns
    /// the inode forgotten to make room, if any.
    fn append(&mut self, ino: u64, keep: bool) -> Option<u64> {
        if keep && self.place_of.contains_key(&ino) {
            return None;
        }
        self.remove(ino);
        self.next_place += 1;
        self.place_of.insert(ino, self.next_place);
        self.order.insert(self.next_place, ino);
        if self.place_of.len() <= FIRST_BLOCK_HINTS {
            return None;
        }
        let (_, old) = self.order.pop_first()?;
        self.place_of.remove(&old);
        Some(old)
    }

    fn remove(&mut self, ino: u64) {
        if let Some(place) = self.place_of.remove(&ino) {
            self.order.remove(&place);
        }
    }

    /// `ino` is opened: when it follows the last file opened in this order and fewer than
    /// [`OPEN_AHEAD_REFILL`] files after it are fetched ahead already, the next
    /// [`OPEN_AHEAD`] inodes after it not yet fetched ahead.
    fn open(&mut self, ino: u64) -> Vec<u64> {
        let Some(&place) = self.place_of.get(&ino) else {
            return Vec::new();
        };
        let follows = self
            .last_open
            .is_some_and(|last| place > last && place - last <= OPEN_GAP);
        self.last_open = Some(place);
        if !follows {
            // A jump (another directory, or back to the one a subdirectory interrupted):
            // the window starts over here. Blocks fetched ahead before are cached; asking
            // again costs no transfer.
            self.ahead_to = place;
            return Vec::new();
        }
        if self.ahead_to >= place + OPEN_AHEAD_REFILL {
            return Vec::new();
        }
        let mut ahead = Vec::new();
        for (&p, &next) in self.order.range(place + 1..).take(OPEN_AHEAD) {
            if p > self.ahead_to {
                ahead.push(next);
                self.ahead_to = p;
            }
        }
        ahead
    }
}

impl FirstBlockHints {
    fn insert(&mut self, ino: u64, hash: BlockHash, len: u32) {
        // A rewritten first chunk keeps the file's place.
        self.map.insert(ino, (hash, len));
        if let Some(old) = self.written.append(ino, true) {
            self.map.remove(&old);
        }
    }

    fn remove(&mut self, ino: u64) {
        self.map.remove(&ino);
        self.written.remove(ino);
        self.listed.remove(ino);
    }

    /// This mount listed `ino` (next in a directory listing it is handing out).
    fn listed(&mut self, ino: u64) {
        let _ = self.listed.append(ino, false);
    }

    /// `ino`'s first block and its length, if known.
    fn first_block(&self, ino: u64) -> Option<(BlockHash, u32)> {
        self.map.get(&ino).copied()
    }

    #[cfg(test)]
    fn get(&self, ino: u64) -> Option<BlockHash> {
        self.first_block(ino).map(|(hash, _)| hash)
    }

    /// `ino` is being opened: its first block, then the first blocks of the files after it
    /// in whichever order its opens follow (see [`OpenOrder::open`]), with their lengths.
    fn on_open(&mut self, ino: u64) -> Vec<(BlockHash, u32)> {
        let Some(&first) = self.map.get(&ino) else {
            return Vec::new();
        };
        let mut ahead = self.written.open(ino);
        ahead.extend(self.listed.open(ino));
        let mut out = vec![first];
        out.extend(ahead.iter().filter_map(|i| self.map.get(i).copied()));
        out
    }
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    fn hash(i: u64) -> BlockHash {
        BlockHash::of(&i.to_le_bytes())
    }

    /// The blocks `on_open` asks for, without their lengths.
    fn on_open(h: &mut FirstBlockHints, ino: u64) -> Vec<BlockHash> {
        h.on_open(ino).into_iter().map(|(hash, _)| hash).collect()
    }

    #[test]
    fn first_block_hints_keep_the_newest_files_and_stay_bounded() {
        let mut h = FirstBlockHints::default();
        let n = FIRST_BLOCK_HINTS as u64;
        for ino in 0..n + 100 {
            h.insert(ino, hash(ino), 0);
        }
        assert_eq!(h.map.len(), FIRST_BLOCK_HINTS);
        assert_eq!(h.get(99), None, "the oldest are forgotten");
        assert_eq!(h.get(100), Some(hash(100)));
        assert_eq!(h.get(n + 99), Some(hash(n + 99)));
        // A rewritten first chunk replaces the hint in place.
        h.insert(n + 99, hash(7), 0);
        assert_eq!(h.get(n + 99), Some(hash(7)));
        // Files hinted, removed (deleted) and hinted again, many times: still bounded.
        for round in 0..5 * n {
            let ino = 1_000_000 + round % 3;
            h.remove(ino);
            h.insert(ino, hash(round), 0);
        }
        assert!(h.map.len() <= FIRST_BLOCK_HINTS);
        assert_eq!(h.written.order.len(), h.map.len());
        assert!(h.get(1_000_000 + (5 * n - 1) % 3).is_some());
    }

    #[test]
    fn opens_in_write_order_fetch_the_next_files_ahead_once() {
        assert_eq!(
            (OPEN_AHEAD, OPEN_AHEAD_REFILL),
            (16, 8),
            "the figures below"
        );
        let mut h = FirstBlockHints::default();
        for ino in 1..=60 {
            h.insert(ino, hash(ino), 0);
        }
        h.remove(5); // deleted since: skipped
        let ahead = |from: u64, to: u64| -> Vec<BlockHash> {
            (from..=to).filter(|i| *i != 5).map(hash).collect()
        };
        // A first open, or one out of order, fetches only its own block.
        assert_eq!(on_open(&mut h, 1), vec![hash(1)]);
        assert_eq!(on_open(&mut h, 30), vec![hash(30)]);
        assert_eq!(on_open(&mut h, 1), vec![hash(1)], "backwards");
        // The next file in write order: the following 16 (the removed one skipped).
        let mut want = vec![hash(2)];
        want.extend(ahead(3, 19));
        assert_eq!(on_open(&mut h, 2), want);
        // Further along, nothing more while at least half the window is still ahead; then
        // the files not fetched ahead yet, in one batch.
        assert_eq!(on_open(&mut h, 3), vec![hash(3)]);
        assert_eq!(on_open(&mut h, 7), vec![hash(7)]);
        assert_eq!(on_open(&mut h, 11), vec![hash(11)]);
        let mut want = vec![hash(12)];
        want.extend(ahead(20, 28));
        assert_eq!(on_open(&mut h, 12), want);
        // A jump out of the window stops it; unknown files (written here) fetch nothing.
        assert_eq!(on_open(&mut h, 40), vec![hash(40)]);
        assert_eq!(on_open(&mut h, 99), Vec::<BlockHash>::new());
        assert_eq!(on_open(&mut h, 41), ahead(41, 57), "follows 40 again");
    }

    #[test]
    fn opens_in_listing_order_fetch_the_next_listed_files_ahead() {
        let mut h = FirstBlockHints::default();
        // Written in one order (30 down to 1), listed in another (1 up to 30; 4 is a
        // directory or a file written here: no hint).
        for ino in (1..=30).rev().filter(|i| *i != 4) {
            h.insert(ino, hash(ino), 0);
        }
        for ino in 1..=30 {
            h.listed(ino);
        }
        assert_eq!(on_open(&mut h, 1), vec![hash(1)]);
        // Opens in listing order fetch the next 16 listed (4 has nothing to fetch).
        let next_listed: Vec<BlockHash> = (3..=18).filter(|i| *i != 4).map(hash).collect();
        let mut want = vec![hash(2)];
        want.extend(next_listed.iter().copied());
        assert_eq!(on_open(&mut h, 2), want);
        assert_eq!(on_open(&mut h, 3), vec![hash(3)], "enough fetched ahead");
        // Listing the directory again starts its order over, after the old places.
        for ino in 1..=30 {
            h.listed(ino);
        }
        assert_eq!(
            on_open(&mut h, 1),
            vec![hash(1)],
            "not after 3 in the new listing"
        );
        assert_eq!(on_open(&mut h, 2)[1..], next_listed[..]);
    }

    /// tar and cp -r list a directory, open some of its files, recurse into a subdirectory
    /// (listed after it), and come back: the parent's files are fetched ahead again.
    #[test]
    fn opens_back_in_a_directory_after_a_subdirectory_fetch_ahead_again() {
        let mut h = FirstBlockHints::default();
        let parent: Vec<u64> = (1..=40).collect();
        let sub: Vec<u64> = (101..=130).collect();
        // Written in the reverse order: only the listing's order is followed here.
        for &ino in parent.iter().chain(&sub).rev() {
            h.insert(ino, hash(ino), 0);
        }
        for &ino in &parent {
            h.listed(ino);
        }
        on_open(&mut h, 1);
        assert_eq!(on_open(&mut h, 2).len(), 17, "2 and the next 16");
        for &ino in &sub {
            h.listed(ino);
        }
        on_open(&mut h, 101);
        assert_eq!(
            on_open(&mut h, 102).len(),
            17,
            "the subdirectory's own window"
        );
        for ino in 103..=120 {
            on_open(&mut h, ino);
        }
        // Back in the parent: the first open is a jump; the next follows and fetches ahead
        // from there (some of it cached since, which costs no transfer).
        assert_eq!(on_open(&mut h, 3), vec![hash(3)]);
        let want: Vec<BlockHash> = (4..=20).map(hash).collect();
        assert_eq!(on_open(&mut h, 4), want);
    }
}
