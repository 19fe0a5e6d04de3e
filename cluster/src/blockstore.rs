//! A node's block store: immutable blocks named by their BLAKE3 hash. Large blocks are plain
//! files; small ones are records in an append-only log (`smalllog.rs`).
//!
//! Layout under the store's directory:
//!
//! ```text
//!   blocks/ab/abcdef…   one file per block, in 256 fan-out directories by the first hash byte
//!   small/<seq>.log     blocks of at most `LOG_BLOCK_MAX` bytes, appended (smalllog.rs)
//!   tmp/                blocks being written; emptied on open
//!   quarantine/         copies that failed verification, kept for inspection, never served
//!   index.redb          hash -> (size, stored-at); hash -> place in the log; the log's
//!                       watermark; the bytes of small blocks stored by older versions
//! ```
//!
//! Durability of a put of a large block: write to `tmp/`, fsync the file, rename into
//! `blocks/ab/`, fsync that directory. Then commit the index entry, unflushed but for one put
//! in 64: the index is rebuilt from the files on open.
//!
//! A block of at most `LOG_BLOCK_MAX` (1 MiB: most files of a web site, most uploads) is
//! appended to the log and flushed.
//! Its index entry is committed with the others that waited (about 64 at a time, in the
//! background after the put is answered), each such commit durable and carrying
//! the log's watermark. Either way the put is acknowledged only once the block is durable.
//!
//! The files and the log are the truth, and the index is derived from them: `open` reconciles
//! the two.
//! - An entry whose file or log segment is gone is dropped.
//! - A file without an entry, left by a crash between the rename and the index commit, is
//!   indexed.
//! - Log records past the watermark, whose entries a crash lost, are indexed again.
//!
//! A crash at any point leaves a consistent store.
//!
//! A verified read (`get`, `verify`) re-hashes the whole block before any byte leaves the
//! store; a mismatch moves the copy to `quarantine/`, drops it from the index and counts it.
//! `read_unverified` serves whole blocks to a requester that hashes them itself.
//!
//! A failed write to the database (redb then refuses every later call with `PreviousIo`) is
//! noted, and the next request reopens the database and reconciles it with the files.
//!
//! All methods block on disk I/O: async callers run them under `spawn_blocking`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::smalllog::{advise_will_need, Loc, SmallLog, Watermark, Written};
use crate::wire::{ByteRange, ListEntry, MAX_BLOCK_SIZE};
use crate::BlockHash;

/// hash -> (size in bytes, stored at, seconds since the epoch)
const BLOCKS: TableDefinition<&[u8; 32], (u64, u64)> = TableDefinition::new("blocks");

/// hash -> content, for blocks of at most `LOG_BLOCK_MAX` bytes stored by versions before
/// the small-block log (still read; nothing new goes there).
const INLINE: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("inline_blocks");

/// hash -> (segment, offset, length) of a small block in the small-block log.
const SMALL: TableDefinition<&[u8; 32], (u64, u64, u32)> = TableDefinition::new("small_blocks");

/// Store-wide values: `SMALL_LOG_END` -> the small-block log's watermark (segment, offset),
/// committed with every small block's entry: the log is replayed from it on open.
const META: TableDefinition<&str, (u64, u64)> = TableDefinition::new("meta");
const SMALL_LOG_END: &str = "small_log_end";

/// Blocks up to this size are appended to the log; larger ones are files. A file costs a
/// put an inode, a directory entry and two flushes (the file's, the directory's): in the W3
/// copy, ext4's inode allocation was the largest item of a node's profile, and with 1 MiB
/// rather than 32 KiB the W4 write of 20-400 KiB files ran 7-20 % faster (3 alternating runs).
pub const LOG_BLOCK_MAX: usize = 1 << 20;

/// Free space below which small blocks go to files too. The log grows in zero-filled steps, and
/// redb takes any failed write (a full disk) as fatal for the open database: every later read
/// and write fails until it is reopened. A block file that does not fit fails alone, with
/// `NoSpace`, and the node goes on serving.
const INLINE_FREE_SPACE_RESERVE: u64 = 64 << 20;

/// redb's page cache. Its 1 GiB default would fill with small blocks that clients have cached
/// already; the index's hot pages are far smaller.
const INDEX_CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("block {0} not found")]
    NotFound(BlockHash),
    #[error("data does not hash to {0}")]
    HashMismatch(BlockHash),
    #[error("stored copy of {0} is corrupt; quarantined")]
    Corrupt(BlockHash),
    #[error("no space left on the block store device")]
    NoSpace,
    #[error("block of {0} bytes exceeds the {MAX_BLOCK_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("range {offset}+{len:?} lies outside a block of {size} bytes")]
    BadRange {
        offset: u64,
        len: Option<u64>,
        size: u64,
    },
    #[error("block store I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("block index error: {0}")]
    Index(String),
}

impl StoreError {
    fn index(e: impl std::fmt::Display) -> StoreError {
        StoreError::Index(e.to_string())
    }

    /// A database error, with a full disk reported as such (a small block's put writes the
    /// database).
    fn db(e: impl Into<redb::Error>) -> StoreError {
        match e.into() {
            redb::Error::Io(io) => io_or_nospace(io),
            other => StoreError::Index(other.to_string()),
        }
    }
}

/// Where a copy lives.
enum Copy {
    File(File, u64),
    Inline(Vec<u8>),
}

fn io_or_nospace(e: io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        StoreError::NoSpace
    } else {
        StoreError::Io(e)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub blocks: u64,
    pub bytes_used: u64,
    pub corrupt_detected: u64,
}

/// Stripes of the lock that makes a put and a garbage-collecting delete of the same block
/// exclusive (a put that finds the block present must not lose it to a delete in between).
const LOCK_STRIPES: usize = 64;

/// A put of a block already present re-stamps its stored-at time when older than this, so
/// garbage collection (which spares copies younger than its grace period, an hour or more)
/// never takes a block that a write in flight has just stored again. Bounded so that repeated
/// puts of a popular block cost an index write at most once per this long.
const RESTAMP_AFTER_SECS: u64 = 60;

/// One put in this many commits its index entry durably; the others are not flushed (see
/// `BlockStore::put`). redb frees pages only in durable commits, so some must be.
const PUTS_PER_DURABLE_INDEX_COMMIT: u64 = 64;

/// A log segment (not the one appended to) with less than this much left in it is compacted.
const COMPACT_BELOW: u64 = crate::smalllog::SEGMENT_MAX / 4;

/// Small blocks' index entries are committed this many at a time (`commit_unindexed`), by
/// the node in the background (`claim_index_commit`), off the puts' path.
const INDEX_BATCH: usize = 64;

/// Waiting entries past which a put commits them itself: a store that nobody commits for in
/// the background still keeps its index current.
const INDEX_BATCH_INLINE: usize = 512;

/// Small blocks that may wait for the index; beyond, small puts are refused (only while the
/// index refuses commits).
const UNINDEXED_MAX: usize = 4096;

/// Opens (creating if needed) the index database at a path.
pub type IndexOpener =
    Box<dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync + 'static>;

fn open_index_file(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder()
        .set_cache_size(INDEX_CACHE_BYTES)
        .create(path)
}

/// The small-block log's watermark as the index last committed it.
fn read_watermark(index: &Database) -> Result<Watermark, StoreError> {
    let txn = index.begin_read().map_err(StoreError::index)?;
    let table = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((0, 0)),
        Err(e) => return Err(StoreError::index(e)),
    };
    let v = table.get(SMALL_LOG_END).map_err(StoreError::index)?;
    Ok(v.map_or((0, 0), |v| v.value()))
}

fn index_unavailable() -> StoreError {
    StoreError::Index("the block index could not be reopened after a failed write yet".into())
}

pub struct BlockStore {
    root: PathBuf,
    /// `None` only while a reopen after a failed write has not succeeded yet.
    index: std::sync::RwLock<Option<Database>>,
    /// A write to the database failed: redb then refuses every later read and write
    /// (`PreviousIo`) until the database is reopened, which the next request does.
    index_failed: std::sync::atomic::AtomicBool,
    open_index: IndexOpener,
    locks: Vec<std::sync::Mutex<()>>,
    /// The last block count read from the index (`stats` reports it when the index fails).
    last_block_count: AtomicU64,
    bytes_used: AtomicU64,
    corrupt_detected: AtomicU64,
    puts: AtomicU64,
    /// Fan-out directories (`blocks/ab/`) this store has made or found: a put into one of them
    /// skips `create_dir_all` (a mkdir that fails with EEXIST and a stat, ~0.1 ms of a put's
    /// critical path under strace). A directory removed behind the store's back is made again
    /// when the rename into it fails.
    fanout_made: Vec<std::sync::atomic::AtomicBool>,
    /// Small blocks' bytes (see `smalllog.rs`).
    small: SmallLog,
    /// Indexed small blocks per log segment, (count, bytes): a segment none is left in is
    /// removed, one with little left is compacted (`compact_log`).
    small_live: std::sync::Mutex<HashMap<u64, (u64, u64)>>,
    /// Segments mostly emptied by deletes, to compact at the next `compact_log`.
    compact_due: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Small blocks stored but not yet in the index: hash -> (where, stored at).
    unindexed: std::sync::Mutex<HashMap<[u8; 32], (Loc, u64)>>,
    /// Serializes `commit_unindexed`.
    index_committer: std::sync::Mutex<()>,
    /// A background commit of the waiting entries is due or running (`claim_index_commit`).
    index_commit_claimed: std::sync::atomic::AtomicBool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Tells the kernel the just-synced pages of a block need not stay cached. A node writes far
/// more than it re-reads soon (clients cache what they read), and growing the page cache with
/// every write made the kernel's copy into new pages the largest CPU cost of a put (perf on the
/// block benchmark, 2-core VM). Advisory: failure changes nothing but speed.
fn drop_from_page_cache(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; `f` is an open descriptor for the
    // duration of the call.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// How much of a block is read per `read` call while it is hashed: hashing a piece overlaps
/// with the disk reading the next ones (the whole file was asked for up front).
const READ_PIECE: u64 = 512 << 10;

/// Block files at least this large are served with `O_DIRECT` (see [`read_direct`]).
const DIRECT_READ_MIN: u64 = 1 << 20;
/// Buffer and length alignment for `O_DIRECT`: the page size, which covers every logical
/// block size Linux disks use.
const DIRECT_ALIGN: usize = 4096;

/// Whether at least half of `file`'s `len` bytes are in the page cache (mincore(2) on a
/// mapping that is never touched, so nothing is read and nothing can fault). `false` when it
/// cannot tell.
fn mostly_cached(file: &File, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    // SAFETY: sysconf only reads its integer argument.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let Ok(page) = usize::try_from(page) else {
        return false;
    };
    if page == 0 || len == 0 {
        return false;
    }
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: mmap with a null address makes a new mapping that aliases no Rust memory; it is
    // only passed to mincore, never dereferenced (so a truncated file cannot fault here), and
    // unmapped with the same address and length before returning. mincore writes one byte per
    // page of the `len`-byte range, `len.div_ceil(page)` bytes, which is `resident`'s length,
    // and `resident` outlives the call. `file` is an open descriptor for the whole block.
    let ok = unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if addr == libc::MAP_FAILED {
            return false;
        }
        let r = libc::mincore(addr, len, resident.as_mut_ptr());
        libc::munmap(addr, len);
        r == 0
    };
    ok && resident.iter().filter(|b| *b & 1 != 0).count() * 2 >= resident.len()
}

/// The `len` bytes of the block file at `path`, read with `O_DIRECT`: the disk writes them
/// straight into the buffer that goes out on the wire, instead of into the page cache and
/// from there, by the CPU, into the buffer. Serving a cold 1 GiB that copy and the page
/// cache's bookkeeping were ~17 % of all CPU samples of a sequential read through another
/// mount on this project's 2-vCPU VM (nodes and the mount share the cores); a client keeps
/// the blocks it reads in its own cache, so the node's page cache mostly held a second copy.
/// Only for large blocks the page cache does not hold (`mostly_cached`): a cached one is
/// copied faster than the disk reads it again (a warm 1 GiB read ~15 % slower direct), and a
/// small one costs little to copy and is read again soon (a web page's images). `None` when
/// the file system refuses `O_DIRECT` (tmpfs) or the file is not `len` bytes long: the caller
/// then reads it the ordinary way.
fn read_direct(path: &Path, len: u64) -> io::Result<Option<Bytes>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => f,
        // Gone meanwhile (deleted, quarantined) or no O_DIRECT here: the caller's open copy
        // decides.
        Err(_) => return Ok(None),
    };
    let len = usize::try_from(len).map_err(io::Error::other)?;
    let padded = len.next_multiple_of(DIRECT_ALIGN);
    // Aligned without `unsafe`: one page more than needed, and the data starts at the first
    // page boundary inside (zeroed pages cost nothing until the disk writes into them).
    let mut buf = vec![0u8; padded + DIRECT_ALIGN];
    let start = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
    let mut done = 0;
    while done < padded {
        match (&file).read(&mut buf[start + done..start + padded]) {
            Ok(0) => break,
            // A read that ends off a page boundary reached the end of the file.
            Ok(n) if (done + n) % DIRECT_ALIGN != 0 => {
                done += n;
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    if done != len {
        return Ok(None);
    }
    Ok(Some(Bytes::from(buf).slice(start..start + len)))
}

/// Reads all `len` bytes of `file` and their BLAKE3 hash. The kernel is told at once that the
/// whole file is wanted, so the disk works on the later pieces while the earlier ones are hashed
/// (reading everything first left the disk idle during the hash).
fn read_hashing(file: &mut File, len: u64) -> io::Result<(Vec<u8>, [u8; 32])> {
    advise_will_need(file, 0, 0);
    let mut data = Vec::with_capacity(len as usize);
    let mut hasher = blake3::Hasher::new();
    loop {
        let before = data.len();
        let n = Read::by_ref(file).take(READ_PIECE).read_to_end(&mut data)?;
        if n == 0 {
            break;
        }
        hasher.update(&data[before..]);
    }
    Ok((data, *hasher.finalize().as_bytes()))
}

/// Takes `count` records of `bytes` off segment `seg`'s live count; what is left, `None` when
/// the segment has no count.
fn take_live(
    live: &mut HashMap<u64, (u64, u64)>,
    seg: u64,
    count: u64,
    bytes: u64,
) -> Option<(u64, u64)> {
    let l = live.get_mut(&seg)?;
    l.0 = l.0.saturating_sub(count);
    l.1 = l.1.saturating_sub(bytes);
    Some(*l)
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BlockStore {
    /// Opens (creating if needed) the store in `root`, and reconciles index and files.
    pub fn open(root: &Path) -> Result<BlockStore, StoreError> {
        BlockStore::open_with(root, Box::new(open_index_file))
    }

    /// [`BlockStore::open`] with the index database opened by `open_index` (tests inject
    /// faults into its storage with it).
    pub fn open_with(root: &Path, open_index: IndexOpener) -> Result<BlockStore, StoreError> {
        for sub in ["blocks", "tmp", "quarantine"] {
            fs::create_dir_all(root.join(sub))?;
        }
        // Anything in tmp/ is a write that was never acknowledged.
        for entry in fs::read_dir(root.join("tmp"))? {
            let _ = fs::remove_file(entry?.path());
        }
        let index = open_index(&root.join("index.redb")).map_err(StoreError::index)?;
        let from = read_watermark(&index)?;
        let (small, replayed) = SmallLog::open(&root.join("small"), from, LOG_BLOCK_MAX)?;
        let store = BlockStore {
            root: root.to_path_buf(),
            index: std::sync::RwLock::new(Some(index)),
            index_failed: std::sync::atomic::AtomicBool::new(false),
            open_index,
            locks: (0..LOCK_STRIPES)
                .map(|_| std::sync::Mutex::new(()))
                .collect(),
            last_block_count: AtomicU64::new(0),
            bytes_used: AtomicU64::new(0),
            corrupt_detected: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            fanout_made: (0..256)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            small,
            small_live: Default::default(),
            compact_due: Default::default(),
            unindexed: Default::default(),
            index_committer: Default::default(),
            index_commit_claimed: Default::default(),
        };
        store.reconcile_with(Some(replayed))?;
        Ok(store)
    }

    /// Runs `begin` on the index database, reopened first after a failed write.
    fn begin<T>(
        &self,
        begin: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.reopen_index_if_failed();
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index
            .as_ref()
            .map_or_else(|| Err(index_unavailable()), begin)
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.begin(|db| db.begin_read().map_err(|e| self.index_err(e)))
    }

    fn write_txn(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.begin(|db| db.begin_write().map_err(|e| self.db_err(e)))
    }

    /// Notes an I/O failure of the database (see `index_failed`).
    fn note_index_error(&self, e: &redb::Error) {
        if matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            self.index_failed.store(true, Ordering::Release);
        }
    }

    /// [`StoreError::index`] for a database error, noting an I/O failure.
    fn index_err(&self, e: impl Into<redb::Error>) -> StoreError {
        let e = e.into();
        self.note_index_error(&e);
        StoreError::index(e)
    }

    /// [`StoreError::db`] for a database error, noting an I/O failure.
    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        let e = e.into();
        self.note_index_error(&e);
        StoreError::db(e)
    }

    /// After a failed write (a full disk, a device error), redb answers every later call with
    /// `PreviousIo` until the database is reopened: without this, one failed index commit
    /// left a node unable to serve even the blocks it held until it was restarted. Reopening
    /// recovers the database to its last commit; `reconcile` then indexes block files whose
    /// entry was lost with the failed commit. The file stays locked, and the reopen fails, while
    /// a transaction of the old database is still alive: the next request tries again.
    fn reopen_index_if_failed(&self) {
        if !self.index_failed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            if !self.index_failed.load(Ordering::Acquire) {
                return; // another request reopened it
            }
            drop(index.take());
            match (self.open_index)(&self.root.join("index.redb")) {
                Ok(db) => {
                    *index = Some(db);
                    self.index_failed.store(false, Ordering::Release);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "block index still unavailable after a failed write; will retry");
                    return;
                }
            }
        }
        tracing::warn!("block index reopened after a failed write");
        if let Err(e) = self.reconcile() {
            tracing::warn!(error = %e, "block index reconcile after reopening failed");
        }
    }

    fn block_path(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("blocks").join(&hex[..2]).join(hex)
    }

    /// Makes the index agree with the files and the small-block log (its records past the
    /// watermark, whose entries a crash may have lost, are indexed again), and loads the
    /// counters.
    fn reconcile(&self) -> Result<(), StoreError> {
        self.reconcile_with(None)
    }

    /// [`BlockStore::reconcile`], given the records past the watermark when the caller has just
    /// scanned for them (the log's open does).
    fn reconcile_with(&self, replayed: Option<Vec<(BlockHash, Loc)>>) -> Result<(), StoreError> {
        // Taken before the transaction, as a put does: no append can slip past the watermark
        // written below.
        let tail = self.small.lock();
        let mut on_disk = std::collections::BTreeMap::new();
        for fan in fs::read_dir(self.root.join("blocks"))? {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(fan.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(hash) = name.to_str().and_then(|n| n.parse::<BlockHash>().ok()) else {
                    tracing::warn!(path = %entry.path().display(), "stray file in block store");
                    continue;
                };
                on_disk.insert(hash.0, entry.metadata()?.len());
            }
        }
        let txn = self.write_txn()?;
        let mut live: HashMap<u64, (u64, u64)> = Default::default();
        {
            let from = txn
                .open_table(META)
                .map_err(|e| self.index_err(e))?
                .get(SMALL_LOG_END)
                .map_err(|e| self.index_err(e))?
                .map_or((0, 0), |v| v.value());
            let replayed = match replayed {
                Some(r) => r,
                None => self.small.scan_from(from, LOG_BLOCK_MAX)?.0,
            };
            let segments: std::collections::HashSet<u64> =
                self.small.segment_seqs().into_iter().collect();
            let mut small = txn.open_table(SMALL).map_err(|e| self.index_err(e))?;
            for (hash, loc) in &replayed {
                if small.get(&hash.0).map_err(|e| self.index_err(e))?.is_none() {
                    small
                        .insert(&hash.0, (loc.seg, loc.offset, loc.len))
                        .map_err(|e| self.index_err(e))?;
                }
            }
            let mut lost = Vec::new();
            for item in small.iter().map_err(|e| self.index_err(e))? {
                let (k, v) = item.map_err(|e| self.index_err(e))?;
                let (seg, _, len) = v.value();
                if segments.contains(&seg) {
                    on_disk.insert(*k.value(), u64::from(len));
                    let l = live.entry(seg).or_default();
                    l.0 += 1;
                    l.1 += u64::from(len);
                } else {
                    lost.push(*k.value());
                }
            }
            for k in &lost {
                small.remove(k).map_err(|e| self.index_err(e))?;
            }
            drop(small);
            txn.open_table(META)
                .map_err(|e| self.index_err(e))?
                .insert(SMALL_LOG_END, tail.watermark())
                .map_err(|e| self.index_err(e))?;
            // Small blocks of older versions: their content and entry were committed together.
            let inline = txn.open_table(INLINE).map_err(|e| self.index_err(e))?;
            for item in inline.iter().map_err(|e| self.index_err(e))? {
                let (k, v) = item.map_err(|e| self.index_err(e))?;
                on_disk.insert(*k.value(), v.value().len() as u64);
            }
            drop(inline);
            let mut table = txn.open_table(BLOCKS).map_err(|e| self.index_err(e))?;
            let mut stale = Vec::new();
            for item in table.iter().map_err(|e| self.index_err(e))? {
                let (k, _) = item.map_err(|e| self.index_err(e))?;
                if !on_disk.contains_key(k.value()) {
                    stale.push(*k.value());
                }
            }
            for k in &stale {
                table.remove(k).map_err(|e| self.index_err(e))?;
            }
            let now = now_secs();
            for (k, size) in &on_disk {
                if table.get(k).map_err(|e| self.index_err(e))?.is_none() {
                    table
                        .insert(k, (*size, now))
                        .map_err(|e| self.index_err(e))?;
                }
            }
            if !stale.is_empty() {
                tracing::warn!(
                    count = stale.len(),
                    "dropped index entries without a block file"
                );
            }
        }
        txn.commit().map_err(|e| self.index_err(e))?;
        let empty: Vec<u64> = self
            .small
            .segment_seqs()
            .into_iter()
            .filter(|seq| !live.contains_key(seq))
            .collect();
        let tail_seq = tail.seq();
        self.compact_due
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(
                live.iter()
                    .filter(|(seq, l)| **seq != tail_seq && l.1 < COMPACT_BELOW)
                    .map(|(seq, _)| *seq),
            );
        *self.small_live.lock().unwrap_or_else(|e| e.into_inner()) = live;
        drop(tail);
        self.last_block_count
            .store(on_disk.len() as u64, Ordering::Relaxed);
        self.bytes_used
            .store(on_disk.values().sum(), Ordering::Relaxed);
        for seq in empty {
            self.small.remove_segment(seq)?;
        }
        Ok(())
    }

    /// Stores a block durably. Verifies that `data` hashes to `hash` first. Returns `false` when
    /// the block was already present (and nothing was written).
    pub fn put(&self, hash: &BlockHash, data: &[u8]) -> Result<bool, StoreError> {
        if data.len() > MAX_BLOCK_SIZE {
            return Err(StoreError::TooLarge(data.len()));
        }
        if !hash.verifies(data) {
            return Err(StoreError::HashMismatch(*hash));
        }
        let _guard = self.lock(hash);
        let path = self.block_path(hash);
        if let Some((_, stored)) = self.entry(hash)? {
            if self.small_present(hash)? || path.exists() {
                if stored + RESTAMP_AFTER_SECS < now_secs() {
                    self.stamp(hash, data.len() as u64)?;
                }
                return Ok(false);
            }
        }
        if data.len() <= LOG_BLOCK_MAX && self.room_for_inline() {
            return self.put_small(hash, data);
        }
        let dir = path.parent().expect("block path has a fan-out parent");
        let fanout = &self.fanout_made[usize::from(hash.0[0])];
        if !fanout.load(Ordering::Relaxed) {
            fs::create_dir_all(dir).map_err(io_or_nospace)?;
            fanout.store(true, Ordering::Relaxed);
        }
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{}.{:016x}", hash.to_hex(), rand::random::<u64>()));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            drop_from_page_cache(&f);
            match fs::rename(&tmp, &path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // The fan-out directory went away since it was made: make it again.
                    fs::create_dir_all(dir)?;
                    fs::rename(&tmp, &path)?;
                }
                r => r?,
            }
            fsync_dir(dir)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_or_nospace(e));
        }
        // The file is durable already (fsync, rename, fsync of the directory) and the index is
        // derived from the files: `open` re-indexes any block file a crash left unindexed. So
        // the index commit need not be flushed. (redb's `Eventual` still calls fdatasync on
        // Linux, 0.38 ms per put here under strace; only `None` skips it.)
        let n = self.puts.fetch_add(1, Ordering::Relaxed);
        let durability = if n.is_multiple_of(PUTS_PER_DURABLE_INDEX_COMMIT) {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        self.commit_entry(hash, data, durability)
    }

    /// Stores a small block: appended to the log and flushed, which makes it durable; its
    /// index entry waits in memory (`unindexed`) for a batch commit (see `smalllog.rs` for
    /// why, and how a crash's lost entries come back). The caller holds the hash's lock and
    /// has found no copy. The flush runs without the log's lock, so puts that arrive meanwhile
    /// share the next one.
    fn put_small(&self, hash: &BlockHash, data: &[u8]) -> Result<bool, StoreError> {
        let written = self.write_small(hash, data)?;
        let flushed = self.small.flush(&written);
        self.land_small(hash, &written, flushed)
    }

    /// The first half of a small put: the record written, unflushed, in flight.
    fn write_small(&self, hash: &BlockHash, data: &[u8]) -> Result<Written, StoreError> {
        let mut tail = self.small.lock();
        let waiting = self.unindexed().len();
        if waiting >= UNINDEXED_MAX {
            // The index has refused commits for a while: stop taking blocks it cannot list.
            return Err(StoreError::Index(format!(
                "{waiting} small blocks wait for the block index, which refuses commits"
            )));
        }
        let written = self
            .small
            .write(&mut tail, hash, data)
            .map_err(io_or_nospace)?;
        // Counted before the log's lock goes (see `forget`).
        self.count_live(written.loc);
        Ok(written)
    }

    /// The second half, once the flush is done: the entry joins the waiting ones (under the
    /// log's lock, in the same step that takes the record out of flight, so an index commit
    /// sees it in one place or the other), or the put fails.
    fn land_small(
        &self,
        hash: &BlockHash,
        written: &Written,
        flushed: io::Result<()>,
    ) -> Result<bool, StoreError> {
        let full = {
            let mut tail = self.small.lock();
            tail.landed(written.start);
            match &flushed {
                Ok(()) => {
                    let mut unindexed = self.unindexed();
                    unindexed.insert(hash.0, (written.loc, now_secs()));
                    unindexed.len() >= INDEX_BATCH_INLINE
                }
                Err(_) => {
                    // Dead space: never indexed (a replay may index it, harmlessly).
                    self.uncount_live(written.loc);
                    false
                }
            }
        };
        flushed.map_err(io_or_nospace)?;
        self.bytes_used
            .fetch_add(u64::from(written.loc.len), Ordering::Relaxed);
        if full {
            // The block is durable whatever this says; a failed commit is retried by the next.
            if let Err(e) = self.commit_unindexed() {
                tracing::warn!(error = %e, "committing small blocks' index entries failed; will retry");
            }
        }
        Ok(true)
    }

    /// True when a batch of small blocks' entries waits and no one has claimed its commit: the
    /// caller has claimed it and must call [`BlockStore::commit_unindexed`] (on a blocking
    /// thread, after answering the put), which releases the claim.
    pub fn claim_index_commit(&self) -> bool {
        self.unindexed().len() >= INDEX_BATCH
            && !self.index_commit_claimed.swap(true, Ordering::AcqRel)
    }

    /// Counts a record appended to the log (under the log's lock, see `forget`).
    fn count_live(&self, loc: Loc) {
        let mut live = self.small_live.lock().unwrap_or_else(|e| e.into_inner());
        let l = live.entry(loc.seg).or_default();
        l.0 += 1;
        l.1 += u64::from(loc.len);
    }

    /// Takes back [`BlockStore::count_live`] for a record whose flush failed. The segment is
    /// kept even if nothing is left in it (the next open removes it).
    fn uncount_live(&self, loc: Loc) {
        let mut live = self.small_live.lock().unwrap_or_else(|e| e.into_inner());
        take_live(&mut live, loc.seg, 1, u64::from(loc.len));
    }

    /// Moves the blocks still live in segments mostly emptied by deletes (less than a quarter
    /// of a segment left) to the end of the log, and removes those segments: without it, a
    /// segment with one block left in it would keep its 64 MiB for good. Deletes run it.
    pub fn compact_log(&self) -> Result<(), StoreError> {
        let due = std::mem::take(&mut *self.compact_due.lock().unwrap_or_else(|e| e.into_inner()));
        for seg in due {
            self.compact_segment(seg)?;
        }
        Ok(())
    }

    fn compact_segment(&self, seg: u64) -> Result<(), StoreError> {
        if seg == self.small.lock().seq() {
            return Ok(()); // appended to: compacted, if still due, once it is not
        }
        let records = self.small.records_of(seg, LOG_BLOCK_MAX)?;
        let (mut moved, mut moved_bytes) = (0u64, 0u64);
        for (hash, loc) in records {
            let _guard = self.lock(&hash);
            if self.small_loc(&hash)? != Some(loc) {
                continue; // deleted, or stored again elsewhere
            }
            let Some(data) = self.small.read(loc)? else {
                continue;
            };
            if !hash.verifies(&data) {
                self.quarantine(&hash, Some(&data), "content does not match its hash")?;
                continue;
            }
            let stamp = self.entry(&hash)?.map_or_else(now_secs, |(_, s)| s);
            let mut tail = self.small.lock();
            let new = self
                .small
                .append(&mut tail, &hash, &data)
                .map_err(io_or_nospace)?;
            self.unindexed().insert(hash.0, (new, stamp));
            self.count_live(new);
            drop(tail);
            moved += 1;
            moved_bytes += u64::from(loc.len);
        }
        // Durable before the old copies go.
        self.commit_unindexed()?;
        let mut live = self.small_live.lock().unwrap_or_else(|e| e.into_inner());
        let Some((left, _)) = take_live(&mut live, seg, moved, moved_bytes) else {
            return Ok(()); // emptied by deletes meanwhile, and removed
        };
        if left > 0 {
            // Indexed records the scan did not reach (a damaged header ends it): kept.
            tracing::warn!(segment = seg, left, "small-block log segment kept after compaction: some of its blocks could not be moved");
            return Ok(());
        }
        live.remove(&seg);
        drop(live);
        self.small.remove_segment(seg)?;
        Ok(())
    }

    fn unindexed(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Loc, u64)>> {
        self.unindexed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits the index entries of small blocks stored since the last such commit, with the
    /// log's watermark, durably. Anything that lists or deletes blocks calls it first.
    pub fn commit_unindexed(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self
            .index_committer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Whatever waits now is in this commit: a later batch may be claimed again.
        self.index_commit_claimed.store(false, Ordering::Release);
        // Taken under the log's lock: every record before the watermark is in `batch` or
        // was committed before.
        let (batch, watermark) = {
            let tail = self.small.lock();
            let batch: Vec<([u8; 32], (Loc, u64))> =
                self.unindexed().iter().map(|(k, v)| (*k, *v)).collect();
            (batch, tail.watermark())
        };
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.write_txn()?;
        {
            let mut small = txn.open_table(SMALL).map_err(|e| self.db_err(e))?;
            let mut blocks = txn.open_table(BLOCKS).map_err(|e| self.db_err(e))?;
            for (hash, (loc, stamp)) in &batch {
                small
                    .insert(hash, (loc.seg, loc.offset, loc.len))
                    .map_err(|e| self.db_err(e))?;
                blocks
                    .insert(hash, (u64::from(loc.len), *stamp))
                    .map_err(|e| self.db_err(e))?;
            }
            txn.open_table(META)
                .map_err(|e| self.db_err(e))?
                .insert(SMALL_LOG_END, watermark)
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))?;
        let mut unindexed = self.unindexed();
        for (hash, (loc, _)) in &batch {
            if unindexed.get(hash).is_some_and(|(l, _)| l == loc) {
                unindexed.remove(hash);
            }
        }
        Ok(())
    }

    /// Forgets the entries waiting for the index without committing them, as a crash does
    /// (tests).
    #[cfg(test)]
    fn crash_unindexed(&self) {
        self.unindexed().clear();
    }

    /// Commits a large block's index entry and counts the block if it is new. Always
    /// `Ok(true)`: the put stored something.
    fn commit_entry(
        &self,
        hash: &BlockHash,
        data: &[u8],
        durability: redb::Durability,
    ) -> Result<bool, StoreError> {
        let mut txn = self.write_txn()?;
        txn.set_durability(durability);
        let inserted = {
            let mut table = txn.open_table(BLOCKS).map_err(|e| self.db_err(e))?;
            let previous = table
                .insert(&hash.0, (data.len() as u64, now_secs()))
                .map_err(|e| self.db_err(e))?;
            previous.is_none()
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        if inserted {
            self.bytes_used
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Whether the device has room for the log and the database to grow by a small block
    /// without coming near a full disk (see `INLINE_FREE_SPACE_RESERVE`).
    fn room_for_inline(&self) -> bool {
        disk_space(&self.root).is_ok_and(|(_, free)| free >= INLINE_FREE_SPACE_RESERVE)
    }

    /// Where the log holds `hash`, if it does.
    fn small_loc(&self, hash: &BlockHash) -> Result<Option<Loc>, StoreError> {
        if let Some((loc, _)) = self.unindexed().get(&hash.0) {
            return Ok(Some(*loc));
        }
        let txn = self.read_txn()?;
        let table = match txn.open_table(SMALL) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.index_err(e)),
        };
        let v = table.get(&hash.0).map_err(|e| self.index_err(e))?;
        Ok(v.map(|v| {
            let (seg, offset, len) = v.value();
            Loc { seg, offset, len }
        }))
    }

    /// Whether a small copy of `hash` is kept (in the log, or in the database by an older
    /// version), without reading it.
    fn small_present(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        if self.small_loc(hash)?.is_some() {
            return Ok(true);
        }
        let txn = self.read_txn()?;
        let table = match txn.open_table(INLINE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(self.index_err(e)),
        };
        Ok(table.get(&hash.0).map_err(|e| self.index_err(e))?.is_some())
    }

    /// A small block's copy as stored: from the log, or from the database (older versions).
    fn inline_copy(&self, hash: &BlockHash) -> Result<Option<Vec<u8>>, StoreError> {
        // A compaction may move the block and remove its segment between the lookup and the
        // read: then the lookup finds its new place.
        for _ in 0..2 {
            let Some(loc) = self.small_loc(hash)? else {
                break;
            };
            if let Some(data) = self.small.read(loc)? {
                return Ok(Some(data));
            }
        }
        let txn = self.read_txn()?;
        let table = match txn.open_table(INLINE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.index_err(e)),
        };
        let v = table.get(&hash.0).map_err(|e| self.index_err(e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn lock(&self, hash: &BlockHash) -> std::sync::MutexGuard<'_, ()> {
        let stripe = &self.locks[hash.0[0] as usize % LOCK_STRIPES];
        // A poisoned stripe only means another thread panicked holding it; the data it
        // guards is on disk, not in the mutex.
        stripe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (size, stored-at) of an indexed block.
    fn entry(&self, hash: &BlockHash) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some((loc, stamp)) = self.unindexed().get(&hash.0) {
            return Ok(Some((u64::from(loc.len), *stamp)));
        }
        let txn = self.read_txn()?;
        let table = match txn.open_table(BLOCKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.index_err(e)),
        };
        let v = table.get(&hash.0).map_err(|e| self.index_err(e))?;
        Ok(v.map(|v| v.value()))
    }

    /// The size the index records for `hash`, if the block is stored (a cheap check before
    /// reading it).
    pub fn stored_size(&self, hash: &BlockHash) -> Result<Option<u64>, StoreError> {
        Ok(self.entry(hash)?.map(|(size, _)| size))
    }

    /// Sets a present block's stored-at time to now.
    fn stamp(&self, hash: &BlockHash, size: u64) -> Result<(), StoreError> {
        let mut txn = self.write_txn()?;
        txn.set_durability(redb::Durability::Eventual);
        txn.open_table(BLOCKS)
            .map_err(|e| self.index_err(e))?
            .insert(&hash.0, (size, now_secs()))
            .map_err(|e| self.index_err(e))?;
        txn.commit().map_err(|e| self.index_err(e))
    }

    /// Re-reads and re-hashes each block: true for a present, good copy. A bad copy is
    /// quarantined (as by any read).
    pub fn verify(&self, hashes: &[BlockHash]) -> Result<Vec<bool>, StoreError> {
        hashes
            .iter()
            .map(|h| match self.get(h, None) {
                Ok(_) => Ok(true),
                Err(StoreError::NotFound(_) | StoreError::Corrupt(_)) => Ok(false),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// Garbage collection: deletes each block whose copy was stored before `older_than_unix`;
    /// true for each one deleted. Exclusive with puts of the same block, so a put that
    /// re-stamped a block (a write in flight) is never undone.
    pub fn collect(
        &self,
        hashes: &[BlockHash],
        older_than_unix: u64,
    ) -> Result<Vec<bool>, StoreError> {
        let collected = hashes
            .iter()
            .map(|h| {
                let _guard = self.lock(h);
                match self.entry(h)? {
                    Some((_, stored)) if stored < older_than_unix => {
                        self.delete_unlocked(h)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            })
            .collect();
        self.compact_log_or_warn();
        collected
    }

    /// The copy, in the database or as a file (with its length); a file larger than any block
    /// is quarantined.
    fn open_block(&self, hash: &BlockHash) -> Result<Copy, StoreError> {
        if let Some(data) = self.inline_copy(hash)? {
            return Ok(Copy::Inline(data));
        }
        let file = match File::open(self.block_path(hash)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(*hash))
            }
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata()?.len();
        if len > MAX_BLOCK_SIZE as u64 {
            self.quarantine(hash, None, "larger than any block")?;
            return Err(StoreError::Corrupt(*hash));
        }
        Ok(Copy::File(file, len))
    }

    /// The whole copy as stored, **not verified**: for a requester that hashes what it gets
    /// (the block client does, and reports a mismatch with `Verify`, which quarantines the
    /// copy). Hashing here too cost 6 % of the machine's CPU in a sequential read.
    pub fn read_unverified(&self, hash: &BlockHash) -> Result<Bytes, StoreError> {
        let (mut file, len) = match self.open_block(hash)? {
            Copy::Inline(data) => return Ok(data.into()),
            Copy::File(file, len) => (file, len),
        };
        if len >= DIRECT_READ_MIN && !mostly_cached(&file, len) {
            if let Some(data) = read_direct(&self.block_path(hash), len)? {
                return Ok(data);
            }
        }
        advise_will_need(&file, 0, 0);
        let mut data = Vec::with_capacity(len as usize);
        Read::by_ref(&mut file)
            .take(MAX_BLOCK_SIZE as u64 + 1)
            .read_to_end(&mut data)?;
        Ok(data.into())
    }

    /// The copy (or a range of it), verified against its hash first; a bad copy is
    /// quarantined and reported as `Corrupt`.
    pub fn get(&self, hash: &BlockHash, range: Option<ByteRange>) -> Result<Vec<u8>, StoreError> {
        let (data, good, inline) = match self.open_block(hash)? {
            Copy::File(mut file, len) => {
                let (data, hashed) = read_hashing(&mut file, len)?;
                (data, BlockHash(hashed) == *hash, false)
            }
            Copy::Inline(data) => {
                let good = hash.verifies(&data);
                (data, good, true)
            }
        };
        if !good {
            let copy = inline.then_some(data.as_slice());
            self.quarantine(hash, copy, "content does not match its hash")?;
            return Err(StoreError::Corrupt(*hash));
        }
        match range {
            None => Ok(data),
            Some(ByteRange { offset, len: rlen }) => {
                let size = data.len() as u64;
                let end = match rlen {
                    None => size,
                    Some(l) => offset.saturating_add(l),
                };
                if offset > size || end > size {
                    return Err(StoreError::BadRange {
                        offset,
                        len: rlen,
                        size,
                    });
                }
                if offset == 0 && end == size {
                    return Ok(data);
                }
                Ok(data[offset as usize..end as usize].to_vec())
            }
        }
    }

    /// Moves a bad copy out of the way so it is never served again, and counts it. `inline` is
    /// the content of a copy kept in the database: it is written to `quarantine/` and dropped
    /// from the database.
    fn quarantine(
        &self,
        hash: &BlockHash,
        inline: Option<&[u8]>,
        why: &str,
    ) -> Result<(), StoreError> {
        let from = self.block_path(hash);
        let to = self
            .root
            .join("quarantine")
            .join(format!("{}.{}", hash.to_hex(), now_secs()));
        tracing::error!(block = %hash, reason = why, quarantined_to = %to.display(),
            "corrupt block copy detected");
        self.corrupt_detected.fetch_add(1, Ordering::Relaxed);
        if let Some(bytes) = inline {
            // Kept for inspection only: failing to write it must not keep the copy served.
            if let Err(e) = fs::write(&to, bytes) {
                tracing::warn!(error = %e, "could not keep the corrupt copy in quarantine");
            }
            return self.forget(hash);
        }
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                // Could not move it: delete it rather than leave it to be served.
                tracing::error!(error = %e, "quarantine rename failed; deleting the copy");
                let _ = fs::remove_file(&from);
            }
        }
        self.forget(hash)
    }

    /// Drops a block from the index and, if it is kept there, its content from the database;
    /// a log segment left without indexed blocks is removed once that is durable.
    fn forget(&self, hash: &BlockHash) -> Result<(), StoreError> {
        // Waiting entries committed first, with a watermark past their records: neither the
        // next batch nor a replay brings a forgotten block back.
        self.commit_unindexed()?;
        let txn = self.write_txn()?;
        let emptied;
        let removed = {
            txn.open_table(INLINE)
                .map_err(|e| self.index_err(e))?
                .remove(&hash.0)
                .map_err(|e| self.index_err(e))?;
            let small = txn
                .open_table(SMALL)
                .map_err(|e| self.index_err(e))?
                .remove(&hash.0)
                .map_err(|e| self.index_err(e))?
                .map(|v| {
                    let (seg, offset, len) = v.value();
                    Loc { seg, offset, len }
                });
            emptied = small;
            let mut table = txn.open_table(BLOCKS).map_err(|e| self.index_err(e))?;
            let r = table.remove(&hash.0).map_err(|e| self.index_err(e))?;
            r.map(|v| v.value().0)
        };
        // Flushed (the default durability): a segment is removed only when no entry that
        // points into it can come back.
        txn.commit().map_err(|e| self.index_err(e))?;
        if let Some(size) = removed {
            self.bytes_used.fetch_sub(size, Ordering::Relaxed);
        }
        if let Some(loc) = emptied {
            // Only the segment appended to gains records (under the log's lock, which a put
            // keeps until it has counted its record), so a count that reaches zero for any
            // other segment stays zero. The one appended to is kept (and removed on a later
            // open if it is still empty then).
            let tail_seq = self.small.lock().seq();
            let mut live = self.small_live.lock().unwrap_or_else(|e| e.into_inner());
            let (now_empty, little_left) =
                match take_live(&mut live, loc.seg, 1, u64::from(loc.len)) {
                    Some((count, bytes)) => (count == 0, bytes < COMPACT_BELOW),
                    None => (false, false),
                };
            if now_empty {
                live.remove(&loc.seg);
            }
            drop(live);
            if now_empty {
                self.small.remove_segment(loc.seg)?;
            } else if little_left && loc.seg != tail_seq {
                self.compact_due
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(loc.seg);
            }
        }
        Ok(())
    }

    pub fn contains(&self, hash: &BlockHash) -> Result<bool, StoreError> {
        if self.unindexed().contains_key(&hash.0) {
            return Ok(true);
        }
        let txn = self.read_txn()?;
        let table = match txn.open_table(BLOCKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(self.index_err(e)),
        };
        Ok(table.get(&hash.0).map_err(|e| self.index_err(e))?.is_some())
    }

    pub fn has_many(&self, hashes: &[BlockHash]) -> Result<Vec<bool>, StoreError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(BLOCKS).map_err(|e| self.index_err(e))?;
        let unindexed = self.unindexed().clone();
        hashes
            .iter()
            .map(|h| {
                Ok(unindexed.contains_key(&h.0)
                    || table.get(&h.0).map_err(|e| self.index_err(e))?.is_some())
            })
            .collect()
    }

    /// Deletes a block. Deleting an absent block is not an error.
    pub fn delete(&self, hash: &BlockHash) -> Result<(), StoreError> {
        {
            let _guard = self.lock(hash);
            self.delete_unlocked(hash)?;
        }
        self.compact_log_or_warn();
        Ok(())
    }

    /// Compacts the log after deletes; a failure leaves the segments as they are, to be tried
    /// again after the next delete, and fails no delete.
    fn compact_log_or_warn(&self) {
        if let Err(e) = self.compact_log() {
            tracing::warn!(error = %e, "compacting the small-block log failed; will retry");
        }
    }

    fn delete_unlocked(&self, hash: &BlockHash) -> Result<(), StoreError> {
        let path = self.block_path(hash);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    fsync_dir(dir)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.forget(hash)
    }

    /// A page of the inventory in hash order, starting after `after`.
    pub fn list(
        &self,
        after: Option<BlockHash>,
        limit: usize,
    ) -> Result<(Vec<ListEntry>, bool), StoreError> {
        self.commit_unindexed()?;
        let txn = self.read_txn()?;
        let table = txn.open_table(BLOCKS).map_err(|e| self.index_err(e))?;
        let iter = match after {
            None => table.range::<&[u8; 32]>(..),
            Some(h) => table
                .range::<&[u8; 32]>((std::ops::Bound::Excluded(&h.0), std::ops::Bound::Unbounded)),
        }
        .map_err(|e| self.index_err(e))?;
        let mut entries = Vec::new();
        let mut more = false;
        for item in iter {
            let (k, v) = item.map_err(|e| self.index_err(e))?;
            if entries.len() == limit {
                more = true;
                break;
            }
            let (size, stored_unix) = v.value();
            entries.push(ListEntry {
                hash: BlockHash(*k.value()),
                size,
                stored_unix,
            });
        }
        Ok((entries, more))
    }

    /// The store's counters. The block count is read from the index (its length, plus the
    /// small blocks whose entries wait in memory), not kept beside it: `twinfs status` sums
    /// these, and a kept counter was seen in CI summing to 18 copies for 8 blocks while every
    /// index held 16.
    pub fn stats(&self) -> StoreStats {
        let blocks = match self.count_blocks() {
            Ok(n) => {
                self.last_block_count.store(n, Ordering::Relaxed);
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "counting blocks in the index failed; reporting the last count");
                self.last_block_count.load(Ordering::Relaxed)
            }
        };
        StoreStats {
            blocks,
            bytes_used: self.bytes_used.load(Ordering::Relaxed),
            corrupt_detected: self.corrupt_detected.load(Ordering::Relaxed),
        }
    }

    /// Entries in the index plus waiting entries not yet in it, without committing them. The
    /// waiting entries are read before the index's snapshot is taken: a commit removes
    /// entries only after it lands, so one that leaves the waiting set in between is in the
    /// snapshot, and one in both is counted once.
    fn count_blocks(&self) -> Result<u64, StoreError> {
        let waiting: Vec<[u8; 32]> = self.unindexed().keys().copied().collect();
        let txn = self.read_txn()?;
        let table = match txn.open_table(BLOCKS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(waiting.len() as u64),
            Err(e) => return Err(self.index_err(e)),
        };
        let mut n = table.len().map_err(|e| self.index_err(e))?;
        for hash in &waiting {
            if table.get(hash).map_err(|e| self.index_err(e))?.is_none() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// (capacity, free) of the device holding the store, in bytes.
    pub fn disk_space(&self) -> io::Result<(u64, u64)> {
        disk_space(&self.root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the copy of `hash` lives on disk when it is a file (blocks larger than
    /// `LOG_BLOCK_MAX`; operators and tests).
    pub fn path_of(&self, hash: &BlockHash) -> PathBuf {
        self.block_path(hash)
    }

    /// Number of entries in the index (tests compare it with the counters).
    pub fn index_len(&self) -> Result<u64, StoreError> {
        self.commit_unindexed()?;
        let txn = self.read_txn()?;
        let table = txn.open_table(BLOCKS).map_err(|e| self.index_err(e))?;
        table.len().map_err(|e| self.index_err(e))
    }
}

impl Drop for BlockStore {
    /// A clean stop leaves nothing for the next open to replay.
    fn drop(&mut self) {
        if let Err(e) = self.commit_unindexed() {
            tracing::warn!(error = %e, "small blocks' index entries not committed at close; the next open replays them");
        }
    }
}

/// (capacity, free-for-unprivileged) of the filesystem holding `path`.
pub fn disk_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs initialises it fully when it returns 0, which we check before reading.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    // The field types differ between 32- and 64-bit targets; the casts are no-ops on 64-bit.
    #[allow(clippy::unnecessary_cast)]
    let frsize = st.f_frsize as u64;
    #[allow(clippy::unnecessary_cast)]
    let (blocks, avail) = (st.f_blocks as u64, st.f_bavail as u64);
    Ok((blocks * frsize, avail * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smalllog::HEADER as HEADER_LEN;

    fn block(n: u8, len: usize) -> (BlockHash, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(n))
            .collect();
        (BlockHash::of(&data), data)
    }

    /// Large blocks are served with O_DIRECT unless the page cache holds them; either way the
    /// bytes are the block's.
    #[test]
    fn large_blocks_read_the_same_whether_cached_or_not() {
        use std::os::fd::AsRawFd;
        // Under the crate, not /tmp: a tmpfs /tmp keeps its pages whatever it is told (then
        // only the cached path is checked).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, d) = block(9, (4 << 20) - 1000);
        assert!(store.put(&h, &d).unwrap());
        let path = store.block_path(&h);
        // A put leaves nothing cached (drop_from_page_cache); reading the file caches it.
        assert_eq!(fs::read(&path).unwrap(), d);
        let file = File::open(&path).unwrap();
        assert!(mostly_cached(&file, d.len() as u64));
        assert_eq!(store.read_unverified(&h).unwrap(), d);
        // Evicted (it is on disk: put fsyncs it): read with O_DIRECT.
        // SAFETY: posix_fadvise only reads its integer arguments; `file` is open.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
        let evicted = !mostly_cached(&file, d.len() as u64);
        assert_eq!(store.read_unverified(&h).unwrap(), d);
        if evicted {
            assert!(
                !mostly_cached(&file, d.len() as u64),
                "O_DIRECT left it uncached"
            );
            assert_eq!(read_direct(&path, d.len() as u64).unwrap().unwrap(), d);
        }
    }

    #[test]
    fn put_get_roundtrip_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, d) = block(1, 100_000);
        assert!(store.put(&h, &d).unwrap());
        assert!(!store.put(&h, &d).unwrap(), "second put is a no-op");
        assert_eq!(store.get(&h, None).unwrap(), d);
        let r = ByteRange {
            offset: 10,
            len: Some(20),
        };
        assert_eq!(store.get(&h, Some(r)).unwrap(), &d[10..30]);
        let r = ByteRange {
            offset: 99_990,
            len: None,
        };
        assert_eq!(store.get(&h, Some(r)).unwrap(), &d[99_990..]);
        let r = ByteRange {
            offset: 99_990,
            len: Some(11),
        };
        assert!(matches!(
            store.get(&h, Some(r)),
            Err(StoreError::BadRange { .. })
        ));
        assert_eq!(store.stats().blocks, 1);
        assert_eq!(store.stats().bytes_used, 100_000);
    }

    #[test]
    fn put_with_wrong_hash_is_refused_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, _) = block(1, 1000);
        let (_, other) = block(2, 1000);
        assert!(matches!(
            store.put(&h, &other),
            Err(StoreError::HashMismatch(_))
        ));
        assert!(!store.contains(&h).unwrap());
        assert_eq!(store.stats().blocks, 0);
    }

    #[test]
    fn an_unverified_read_returns_the_copy_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, d) = block(4, LOG_BLOCK_MAX + 70_000);
        assert!(matches!(
            store.read_unverified(&h),
            Err(StoreError::NotFound(_))
        ));
        store.put(&h, &d).unwrap();
        assert_eq!(store.read_unverified(&h).unwrap(), d);
        // Rot is returned as is (the requester hashes it); a verified read then finds it.
        let mut bad = d.clone();
        bad[10] ^= 0x01;
        fs::write(store.path_of(&h), &bad).unwrap();
        assert_eq!(store.read_unverified(&h).unwrap(), bad);
        assert!(matches!(store.get(&h, None), Err(StoreError::Corrupt(_))));
        assert_eq!(store.stats().corrupt_detected, 1);
    }

    #[test]
    fn corrupt_copy_is_quarantined_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, d) = block(3, LOG_BLOCK_MAX + 50_000);
        store.put(&h, &d).unwrap();
        let path = store.path_of(&h);
        let mut bad = d.clone();
        bad[100] ^= 0xff;
        fs::write(&path, &bad).unwrap();
        assert!(matches!(store.get(&h, None), Err(StoreError::Corrupt(_))));
        assert!(!path.exists());
        assert_eq!(
            fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
            1
        );
        assert!(matches!(store.get(&h, None), Err(StoreError::NotFound(_))));
        assert!(!store.contains(&h).unwrap());
        assert_eq!(store.stats().corrupt_detected, 1);
        assert_eq!(store.stats().blocks, 0);
    }

    #[test]
    fn a_put_remakes_a_fan_out_directory_removed_behind_its_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, d) = block(7, LOG_BLOCK_MAX + 100_000);
        assert!(store.put(&h, &d).unwrap());
        // The store made the fan-out directory once and no longer checks it; an operator
        // (or a cleanup script) removes it with the block in it.
        let fanout = store.path_of(&h).parent().unwrap().to_path_buf();
        fs::remove_dir_all(&fanout).unwrap();
        assert!(
            store.put(&h, &d).unwrap(),
            "the missing copy is written again"
        );
        assert_eq!(store.get(&h, None).unwrap(), d);
        assert!(fanout.is_dir());
    }

    #[test]
    fn reopen_reconciles_index_with_files() {
        let dir = tempfile::tempdir().unwrap();
        let (h1, d1) = block(4, LOG_BLOCK_MAX + 100_000);
        let (h2, d2) = block(5, LOG_BLOCK_MAX + 200_000);
        {
            let store = BlockStore::open(dir.path()).unwrap();
            store.put(&h1, &d1).unwrap();
            store.put(&h2, &d2).unwrap();
            // A file removed behind the index's back (or lost by a crash before its rename) ...
            fs::remove_file(store.path_of(&h1)).unwrap();
            // ... and a leftover temp file from an interrupted write.
            fs::write(dir.path().join("tmp").join("partial"), b"xx").unwrap();
        }
        // A block file renamed into place whose index commit never happened.
        let (h3, d3) = block(6, LOG_BLOCK_MAX + 300_000);
        let p3 = {
            let hex = h3.to_hex();
            dir.path().join("blocks").join(&hex[..2]).join(hex)
        };
        fs::create_dir_all(p3.parent().unwrap()).unwrap();
        fs::write(&p3, &d3).unwrap();

        let store = BlockStore::open(dir.path()).unwrap();
        assert!(!store.contains(&h1).unwrap());
        assert!(store.contains(&h2).unwrap());
        assert!(store.contains(&h3).unwrap());
        assert_eq!(store.stats().blocks, 2);
        assert_eq!(store.stats().bytes_used, 2 * LOG_BLOCK_MAX as u64 + 500_000);
        assert_eq!(store.index_len().unwrap(), 2);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.get(&h3, None).unwrap(), d3);
    }

    /// Rewrites a small block's stored content behind the store's back: rot that the
    /// database's own checks did not catch (fault injection; a real disk cannot be made to).
    fn rot_inline_copy(store: &BlockStore, hash: &BlockHash, bytes: &[u8]) {
        let loc = store.small_loc(hash).unwrap().expect("a small block");
        store.small.rot(loc, bytes);
    }

    /// Makes the index forget `hashes` and the log's watermark, as a crash that lost
    /// unflushed index commits does.
    fn lose_index_entries(store: &BlockStore, hashes: &[BlockHash]) {
        let txn = store.write_txn().unwrap();
        for h in hashes {
            txn.open_table(SMALL).unwrap().remove(&h.0).unwrap();
            txn.open_table(BLOCKS).unwrap().remove(&h.0).unwrap();
        }
        txn.open_table(META)
            .unwrap()
            .insert(SMALL_LOG_END, (0, 0))
            .unwrap();
        txn.commit().unwrap();
    }

    /// Group commit: a record written but not yet flushed while another put's entry is
    /// committed with the log's watermark must stay behind that watermark, or a crash after
    /// its put was answered would leave it out of the replay. (Fails with the watermark at the
    /// log's end.)
    #[test]
    fn a_block_in_flight_during_an_index_commit_is_replayed_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (h1, d1) = block(90, 2000);
        let (h2, d2) = block(91, 3000);
        {
            let store = BlockStore::open(dir.path()).unwrap();
            let in_flight = store.write_small(&h2, &d2).unwrap();
            assert!(store.put(&h1, &d1).unwrap());
            store.commit_unindexed().unwrap();
            let flushed = store.small.flush(&in_flight);
            assert!(store.land_small(&h2, &in_flight, flushed).unwrap());
            assert_eq!(store.get(&h2, None).unwrap(), d2);
            store.crash_unindexed();
        }
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&h1, None).unwrap(), d1);
        assert_eq!(store.get(&h2, None).unwrap(), d2);
        assert_eq!(store.index_len().unwrap(), 2);
    }

    /// Puts from many threads at once (their flushes shared) are each durable and indexed: all
    /// there after a crash that lost every waiting entry, and after a clean reopen.
    #[test]
    fn small_puts_from_many_threads_are_all_there_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        // Sizes that roll the (test-sized) segments several times.
        let blocks: Vec<_> = (0..96u8)
            .map(|i| block(i, 1000 + 700 * usize::from(i % 16)))
            .collect();
        {
            let store = BlockStore::open(dir.path()).unwrap();
            std::thread::scope(|scope| {
                for part in blocks.chunks(12) {
                    let store = &store;
                    scope.spawn(move || {
                        for (h, d) in part {
                            assert!(store.put(h, d).unwrap());
                        }
                    });
                }
            });
            store.crash_unindexed();
        }
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.index_len().unwrap(), blocks.len() as u64);
        for (h, d) in &blocks {
            assert_eq!(&store.get(h, None).unwrap(), d);
        }
    }

    #[test]
    fn small_blocks_whose_index_entries_were_lost_are_found_again_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<_> = (0..3)
            .map(|i| block(40 + i, 3000 + 100 * i as usize))
            .collect();
        {
            let store = BlockStore::open(dir.path()).unwrap();
            for (h, d) in &blocks {
                assert!(store.put(h, d).unwrap());
            }
            assert_eq!(store.index_len().unwrap(), 3);
            lose_index_entries(&store, &[blocks[1].0, blocks[2].0]);
        }
        // A torn record after the last one: a crash in the middle of an append.
        let seg = dir.path().join("small").join(format!("{:016x}.log", 0));
        let end: u64 = blocks
            .iter()
            .map(|(_, d)| HEADER_LEN + d.len() as u64)
            .sum();
        {
            use std::os::unix::fs::FileExt;
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            let mut torn = b"TWB1".to_vec();
            torn.extend_from_slice(&5000u32.to_le_bytes());
            torn.extend_from_slice(&[7u8; 32]);
            torn.extend_from_slice(&[1u8; 100]);
            f.write_all_at(&torn, end).unwrap();
        }
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().blocks, 3);
        assert_eq!(store.index_len().unwrap(), 3);
        for (h, d) in &blocks {
            assert_eq!(&store.get(h, None).unwrap(), d);
        }
        // The next append goes after the torn record (passed over: its header is whole). A
        // crash before its entry was committed: the replay finds it.
        let (h4, d4) = block(44, 1000);
        assert!(store.put(&h4, &d4).unwrap());
        assert_eq!(
            store.get(&h4, None).unwrap(),
            d4,
            "served before it is indexed"
        );
        store.crash_unindexed();
        assert!(!store.contains(&h4).unwrap());
        drop(store);
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().blocks, 4);
        assert_eq!(store.get(&h4, None).unwrap(), d4);
        // A deleted block is not brought back by a later replay.
        store.delete(&blocks[0].0).unwrap();
        drop(store);
        let store = BlockStore::open(dir.path()).unwrap();
        assert!(!store.contains(&blocks[0].0).unwrap());
        assert_eq!(store.stats().blocks, 3);
    }

    #[test]
    fn a_log_segment_mostly_emptied_by_deletes_is_compacted_and_its_space_freed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let blocks: Vec<_> = (0..24).map(|i| block(80 + i, 30_000)).collect();
        for (h, d) in &blocks {
            store.put(h, d).unwrap();
        }
        let seg_of = |h: &BlockHash| store.small_loc(h).unwrap().unwrap().seg;
        let in_first: Vec<BlockHash> = blocks
            .iter()
            .map(|(h, _)| *h)
            .filter(|h| seg_of(h) == 0)
            .collect();
        assert!(
            in_first.len() >= 4,
            "{} blocks in the first segment",
            in_first.len()
        );
        let first = dir.path().join("small").join(format!("{:016x}.log", 0));
        // All but one deleted: less than a quarter of the segment left.
        let kept = in_first[0];
        for h in &in_first[1..] {
            store.delete(h).unwrap();
        }
        assert!(!first.exists(), "the segment was compacted away");
        assert_ne!(seg_of(&kept), 0);
        for (h, d) in &blocks {
            if *h == kept || !in_first.contains(h) {
                assert_eq!(&store.get(h, None).unwrap(), d);
            } else {
                assert!(!store.contains(h).unwrap());
            }
        }
        let left = blocks.len() - in_first.len() + 1;
        assert_eq!(store.stats().blocks, left as u64);
        // The move is durable: a crash right after loses nothing.
        store.crash_unindexed();
        drop(store);
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().blocks, left as u64);
        assert_eq!(store.index_len().unwrap(), left as u64);
        let kept_data = &blocks.iter().find(|(h, _)| *h == kept).unwrap().1;
        assert_eq!(&store.get(&kept, None).unwrap(), kept_data);
    }

    #[test]
    fn a_log_segment_cut_short_behind_the_stores_back_is_a_corrupt_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, d) = block(90, 5000);
        store.put(&h, &d).unwrap();
        let loc = store.small_loc(&h).unwrap().unwrap();
        let seg = dir
            .path()
            .join("small")
            .join(format!("{:016x}.log", loc.seg));
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(loc.offset + 100)
            .unwrap();
        assert!(matches!(store.get(&h, None), Err(StoreError::Corrupt(_))));
        assert!(!store.contains(&h).unwrap());
        assert_eq!(store.stats().corrupt_detected, 1);
        // A good copy can be stored again (repair).
        assert!(store.put(&h, &d).unwrap());
        assert_eq!(store.get(&h, None).unwrap(), d);
    }

    #[test]
    fn a_rotted_log_record_does_not_hide_the_records_after_it_from_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<_> = (0..3).map(|i| block(50 + i, 2000)).collect();
        {
            let store = BlockStore::open(dir.path()).unwrap();
            for (h, d) in &blocks {
                store.put(h, d).unwrap();
            }
            // The first record's bytes rot, and a crash loses every entry.
            let loc = store.small_loc(&blocks[0].0).unwrap().unwrap();
            store.small.rot(loc, b"rot");
            store.crash_unindexed();
        }
        let store = BlockStore::open(dir.path()).unwrap();
        assert!(!store.contains(&blocks[0].0).unwrap());
        for (h, d) in &blocks[1..] {
            assert_eq!(&store.get(h, None).unwrap(), d);
        }
        assert_eq!(store.stats().blocks, 2);
    }

    #[test]
    fn a_log_segment_whose_blocks_are_all_deleted_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        // 30 KB blocks: a few per (test-sized) segment, several segments.
        let blocks: Vec<_> = (0..24).map(|i| block(60 + i, 30_000)).collect();
        for (h, d) in &blocks {
            store.put(h, d).unwrap();
        }
        let segments = || -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(dir.path().join("small"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        let before = segments();
        assert!(before.len() >= 3, "several segments: {before:?}");
        let in_first: Vec<BlockHash> = blocks
            .iter()
            .filter(|(h, _)| store.small_loc(h).unwrap().unwrap().seg == 0)
            .map(|(h, _)| *h)
            .collect();
        assert!(!in_first.is_empty());
        // Collected in one batch: the last delete empties it.
        assert_eq!(
            store.collect(&in_first, now_secs() + 10).unwrap(),
            vec![true; in_first.len()]
        );
        assert_eq!(
            segments(),
            before[1..].to_vec(),
            "the emptied segment is gone"
        );
        for (h, d) in blocks.iter().filter(|(h, _)| !in_first.contains(h)) {
            assert_eq!(&store.get(h, None).unwrap(), d);
        }
        drop(store);
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().blocks, (blocks.len() - in_first.len()) as u64);
        assert_eq!(segments(), before[1..].to_vec());
    }

    /// The index database's file, with writes that fail while `fail` is set (a full disk
    /// or a device error at exactly the moment a test wants it).
    #[derive(Debug)]
    struct FailingFile {
        file: redb::backends::FileBackend,
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl redb::StorageBackend for FailingFile {
        fn len(&self) -> Result<u64, io::Error> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.failing()?;
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
            self.failing()?;
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            self.failing()?;
            self.file.write(offset, data)
        }
    }

    impl FailingFile {
        fn failing(&self) -> Result<(), io::Error> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }
    }

    #[test]
    fn a_failed_index_write_does_not_stop_the_store_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener_fail = fail.clone();
        let store = BlockStore::open_with(
            dir.path(),
            Box::new(move |path| {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                Database::builder().create_with_backend(FailingFile {
                    file: redb::backends::FileBackend::new(file)?,
                    fail: opener_fail.clone(),
                })
            }),
        )
        .unwrap();
        let (held, held_data) = block(1, 1000);
        let (large, large_data) = block(3, LOG_BLOCK_MAX + 1);
        let (small, small_data) = block(4, 3000);
        assert!(store.put(&held, &held_data).unwrap());

        fail.store(true, Ordering::SeqCst);
        assert!(
            store.put(&large, &large_data).is_err(),
            "a large block's index commit fails"
        );
        assert!(
            store.index_len().is_err(),
            "committing a small block's waiting entry fails"
        );
        fail.store(false, Ordering::SeqCst);

        // The next requests reopen the database: what was stored is served, and writes work.
        assert_eq!(store.get(&held, None).unwrap(), held_data);
        assert!(store.put(&small, &small_data).unwrap());
        assert_eq!(store.get(&small, None).unwrap(), small_data);
        // The large block's file was in place before its entry failed: the reopen indexed it.
        store.put(&large, &large_data).unwrap();
        assert_eq!(store.get(&large, None).unwrap(), large_data);
        assert_eq!(store.stats().blocks, 3);
        assert_eq!(store.index_len().unwrap(), 3);
        drop(store);
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().blocks, 3);
        assert_eq!(store.get(&held, None).unwrap(), held_data);
    }

    #[test]
    fn a_small_block_is_kept_in_the_log_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (small, small_data) = block(7, LOG_BLOCK_MAX);
        let (large, large_data) = block(8, LOG_BLOCK_MAX + 1);
        {
            let store = BlockStore::open(dir.path()).unwrap();
            assert!(store.put(&small, &small_data).unwrap());
            assert!(
                !store.put(&small, &small_data).unwrap(),
                "second put is a no-op"
            );
            assert!(store.put(&large, &large_data).unwrap());
            assert!(!store.path_of(&small).exists(), "no file for a small block");
            assert!(store.path_of(&large).exists());
            assert_eq!(store.get(&small, None).unwrap(), small_data);
            let r = ByteRange {
                offset: 5,
                len: Some(10),
            };
            assert_eq!(store.get(&small, Some(r)).unwrap(), &small_data[5..15]);
            assert_eq!(store.read_unverified(&small).unwrap(), small_data);
            assert_eq!(store.verify(&[small]).unwrap(), vec![true]);
        }
        let store = BlockStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().blocks, 2);
        assert_eq!(
            store.stats().bytes_used,
            (small_data.len() + large_data.len()) as u64
        );
        assert_eq!(store.index_len().unwrap(), 2);
        assert_eq!(store.get(&small, None).unwrap(), small_data);
        let (page, _) = store.list(None, 10).unwrap();
        assert!(page
            .iter()
            .any(|e| e.hash == small && e.size == small_data.len() as u64));
        // Deleting and collecting take it out of the database, and its space out of the count.
        store.delete(&small).unwrap();
        assert!(!store.contains(&small).unwrap());
        assert!(matches!(
            store.get(&small, None),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.stats().bytes_used, large_data.len() as u64);
        store.put(&small, &small_data).unwrap();
        assert_eq!(
            store.collect(&[small], now_secs() + 10).unwrap(),
            vec![true]
        );
        assert!(!store.contains(&small).unwrap());
        let store = {
            drop(store);
            BlockStore::open(dir.path()).unwrap()
        };
        assert_eq!(store.stats().blocks, 1);
        assert!(!store.contains(&small).unwrap());
    }

    #[test]
    fn a_corrupt_small_copy_is_quarantined_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let (h, d) = block(9, 4000);
        store.put(&h, &d).unwrap();
        let mut bad = d.clone();
        bad[17] ^= 0x01;
        rot_inline_copy(&store, &h, &bad);
        // Served as stored to a requester that hashes it; never by a verified read.
        assert_eq!(store.read_unverified(&h).unwrap(), bad);
        assert_eq!(store.verify(&[h]).unwrap(), vec![false]);
        assert!(matches!(store.get(&h, None), Err(StoreError::NotFound(_))));
        assert!(!store.contains(&h).unwrap());
        assert_eq!(store.stats().corrupt_detected, 1);
        assert_eq!(store.stats().blocks, 0);
        let kept: Vec<_> = fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .map(|e| fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert_eq!(kept, vec![bad], "the bad copy is kept for inspection");
        // A good copy can be stored again (repair).
        assert!(store.put(&h, &d).unwrap());
        assert_eq!(store.get(&h, None).unwrap(), d);
    }

    #[test]
    fn list_pages_through_inventory_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let mut all = Vec::new();
        for i in 0..25u8 {
            let (h, d) = block(i, 100 + i as usize);
            store.put(&h, &d).unwrap();
            all.push(h);
        }
        all.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = store.list(after, 7).unwrap();
            assert!(page.len() <= 7);
            seen.extend(page.iter().map(|e| e.hash));
            after = page.last().map(|e| e.hash);
            if !more {
                break;
            }
        }
        assert_eq!(seen, all);
        assert_eq!(store.has_many(&all[..3]).unwrap(), vec![true; 3]);
        store.delete(&all[0]).unwrap();
        store.delete(&all[0]).unwrap();
        assert_eq!(store.has_many(&all[..2]).unwrap(), vec![false, true]);
        assert_eq!(store.stats().blocks, 24);
    }
}

#[cfg(test)]
mod counter_tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, bool),
        Delete(u8),
        Collect(u8),
        Corrupt(u8),
        Reopen,
        CommitIndex,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12, any::<bool>()).prop_map(|(n, big)| Op::Put(n, big)),
            2 => (0u8..12).prop_map(Op::Delete),
            1 => (0u8..12).prop_map(Op::Collect),
            1 => (0u8..12).prop_map(Op::Corrupt),
            1 => Just(Op::Reopen),
            1 => Just(Op::CommitIndex),
        ]
    }

    fn data_of(n: u8, big: bool) -> (BlockHash, Vec<u8>) {
        let len = if big {
            40_000 + usize::from(n)
        } else {
            1000 + usize::from(n)
        };
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(n)).collect();
        (BlockHash::of(&data), data)
    }

    fn exact(store: &BlockStore) -> (u64, u64) {
        let (entries, _) = store.list(None, 10_000).unwrap();
        (
            entries.len() as u64,
            entries.iter().map(|e| e.size).sum::<u64>(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn counters_agree_with_the_index(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = BlockStore::open(dir.path()).unwrap();
            for op in ops {
                match op {
                    Op::Put(n, big) => {
                        let (h, d) = data_of(n, big);
                        store.put(&h, &d).unwrap();
                    }
                    Op::Delete(n) => {
                        for big in [false, true] {
                            store.delete(&data_of(n, big).0).unwrap();
                        }
                    }
                    Op::Collect(n) => {
                        let hs: Vec<_> = [false, true].iter().map(|b| data_of(n, *b).0).collect();
                        store.collect(&hs, now_secs() + 10).unwrap();
                    }
                    Op::Corrupt(n) => {
                        for big in [false, true] {
                            let (h, _) = data_of(n, big);
                            let p = store.block_path(&h);
                            if p.exists() {
                                std::fs::write(&p, b"rot").unwrap();
                            }
                            let _ = store.get(&h, None);
                        }
                    }
                    Op::Reopen => {
                        drop(store);
                        store = BlockStore::open(dir.path()).unwrap();
                    }
                    Op::CommitIndex => store.commit_unindexed().unwrap(),
                }
                let s = store.stats();
                prop_assert_eq!((s.blocks, s.bytes_used), exact(&store));
            }
        }
    }
}
