//! [`Fs`]: the namespace operations (the data path lives in `data.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;

use crate::blocks::BlockIo;
use crate::error::{FsError, FsResult};
use crate::kv::{prefix_end, Compare, MetaKv, Revision, TxnOp};
use crate::schema::{
    decode, decode_inode, decode_raw, encode, encode_raw, CounterRec, DirTimesRec, DirentRec,
    FileKind, InodeRec, Keys, OrphanRec, VolumeRec,
};
use crate::usage::{bytes_i64, encode_usage, Slot, UsageView, USAGE_SLOTS};

/// The root directory's inode number (FUSE's `FUSE_ROOT_ID`).
pub const ROOT_INO: u64 = 1;
/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Largest chunk size a volume may use (the wire format's block limit is 8 MiB).
pub const MAX_CHUNK_SIZE: u32 = 8 << 20;
/// Longest file name (bytes), as on Linux.
pub const NAME_MAX: usize = 255;
/// Longest symlink target (bytes).
pub const SYMLINK_MAX: usize = 4095;
/// Largest xattr value (Linux's XATTR_SIZE_MAX).
pub const XATTR_SIZE_MAX: usize = 64 * 1024;
/// Inodes remembered as created here without xattrs (the set starts over when full).
const XATTR_FREE_MAX: usize = 1 << 20;
/// Largest file size (2^60 bytes keeps every offset well inside i64).
pub const MAX_FILE_SIZE: u64 = 1 << 60;
/// Operations a namespace transaction may need, whatever `max_txn_ops` is (etcd allows 128).
pub const NAMESPACE_TXN_OPS: usize = 16;
/// Most hard links to one inode.
pub const MAX_LINKS: u32 = 65_000;

/// An async sleep supplied by the runtime (tokio's `sleep` in production), used to back off
/// between conflicting transactions. The core itself never blocks.
pub type Sleeper = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// Runs a future in the background (tokio's `spawn` in production). With one, a chunk that a
/// writer has filled completely is stored at once, while the writer goes on with the next
/// one; without (the tests' executor), every block is stored at flush.
pub type Spawner = Arc<dyn Fn(BoxFuture<'static, ()>) + Send + Sync>;

/// Tunables of one [`Fs`] instance.
#[derive(Clone)]
pub struct FsOptions {
    /// Chunk size written into the volume record when this instance formats the volume.
    /// An existing volume keeps its own.
    pub chunk_size: u32,
    /// Unflushed bytes one open file may buffer before `write` flushes by itself.
    pub max_dirty_bytes: usize,
    /// Most ops (and most compares) per transaction; etcd's default limit is 128.
    pub max_txn_ops: usize,
    /// Most attempts of one optimistic transaction before giving up with EAGAIN.
    pub max_retries: u32,
    /// Inode numbers reserved per allocation transaction.
    pub ino_batch: u64,
    /// Back-off between attempts; `None` retries at once.
    pub sleep: Option<Sleeper>,
    /// Background execution for eager block uploads; `None` stores every block at flush.
    pub spawn: Option<Spawner>,
    /// Answer lookup and getattr of files from [`MetaKv::cached`] (the values the volume's
    /// watch delivered). Off by default (a store without a watch has nothing to offer); mounts
    /// turn it on. Close-to-open holds because `open` reads the store, the store's cache never
    /// answers older than what was read (its read floor), and the mount drops the kernel's pages
    /// of any file the watch saw change (the FUSE adapter's `pages_stale`). (Unlink's and
    /// create's first attempts use the cache regardless: their transactions compare what they
    /// read.)
    pub cached_lookups: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_dirty_bytes: 64 << 20,
            max_txn_ops: 64,
            max_retries: 50,
            ino_batch: 1024,
            sleep: None,
            spawn: None,
            cached_lookups: false,
        }
    }
}

impl std::fmt::Debug for FsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsOptions")
            .field("chunk_size", &self.chunk_size)
            .field("max_dirty_bytes", &self.max_dirty_bytes)
            .field("max_txn_ops", &self.max_txn_ops)
            .field("max_retries", &self.max_retries)
            .field("ino_batch", &self.ino_batch)
            .finish()
    }
}

/// An inode's attributes as handed to the FUSE layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: FileKind,
    /// Permission bits (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks, for `st_blocks`.
    pub blocks: u64,
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub rdev: u32,
}

impl Attr {
    /// `st_mode`: type bits | permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | self.perm
    }

    pub(crate) fn from_rec(ino: u64, r: &InodeRec) -> Attr {
        Attr {
            ino,
            kind: r.kind,
            perm: r.mode & 0o7777,
            uid: r.uid,
            gid: r.gid,
            size: r.size,
            blocks: r.size.div_ceil(512),
            nlink: r.nlink,
            atime_ns: r.atime_ns,
            mtime_ns: r.mtime_ns,
            ctime_ns: r.ctime_ns,
            rdev: r.rdev,
        }
    }
}

/// One directory entry returned by [`Fs::readdir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: FileKind,
    /// Pass this back to `readdir` to continue after this entry. Stable across calls and
    /// across concurrent changes to the directory; always ≥ 16.
    pub cookie: u64,
}

/// A time to set with [`SetAttr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    Ns(i64),
}

/// The attributes `setattr` changes (`None` = unchanged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

/// `renameat2` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

impl RenameFlags {
    /// From the raw `renameat2` flags (RENAME_WHITEOUT and unknown bits → EINVAL).
    pub fn from_bits(bits: u32) -> FsResult<RenameFlags> {
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if bits & !known != 0 {
            return Err(FsError::Invalid("unsupported rename flags"));
        }
        let f = RenameFlags {
            noreplace: bits & libc::RENAME_NOREPLACE != 0,
            exchange: bits & libc::RENAME_EXCHANGE != 0,
        };
        if f.noreplace && f.exchange {
            return Err(FsError::Invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
        }
        Ok(f)
    }
}

/// `setxattr` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XattrSet {
    #[default]
    Any,
    /// XATTR_CREATE: fail with EEXIST if present.
    Create,
    /// XATTR_REPLACE: fail with ENODATA if absent.
    Replace,
}

impl XattrSet {
    pub fn from_flags(flags: i32) -> FsResult<XattrSet> {
        match flags {
            0 => Ok(XattrSet::Any),
            libc::XATTR_CREATE => Ok(XattrSet::Create),
            libc::XATTR_REPLACE => Ok(XattrSet::Replace),
            _ => Err(FsError::Invalid("bad xattr flags")),
        }
    }
}

/// What `getxattr`/`listxattr` answer for a caller's buffer size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XattrReply {
    /// The caller asked for the size (size 0).
    Size(u32),
    Data(Vec<u8>),
}

impl XattrReply {
    /// FUSE semantics: size 0 asks for the length; a too-small buffer is ERANGE.
    pub fn for_size(data: Vec<u8>, size: u32) -> FsResult<XattrReply> {
        let len = u32::try_from(data.len()).map_err(|_| FsError::Range)?;
        if size == 0 {
            Ok(XattrReply::Size(len))
        } else if len > size {
            Err(FsError::Range)
        } else {
            Ok(XattrReply::Data(data))
        }
    }
}

/// What a new inode looks like.
#[derive(Clone, Debug)]
pub(crate) struct NewNode {
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub target: Option<Vec<u8>>,
}

impl NewNode {
    /// A regular file.
    pub(crate) fn file(perm: u32, uid: u32, gid: u32) -> NewNode {
        NewNode {
            kind: FileKind::File,
            perm,
            uid,
            gid,
            rdev: 0,
            target: None,
        }
    }

    /// A directory.
    pub(crate) fn dir(perm: u32, uid: u32, gid: u32) -> NewNode {
        NewNode {
            kind: FileKind::Dir,
            ..NewNode::file(perm, uid, gid)
        }
    }
}

/// One optimistic transaction being built: compares on everything read, ops last-write-wins.
#[derive(Default)]
pub(crate) struct Txn {
    compares: BTreeMap<Vec<u8>, Revision>,
    ops: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Inodes whose last link this transaction removes and that nobody here has open: the
    /// same transaction deletes the inode, its chunk map and its xattrs (no orphan record).
    purges: Vec<Purge>,
    /// "No key in [start, end)" compares (an empty directory stays empty).
    empty_ranges: Vec<(Vec<u8>, Vec<u8>)>,
    /// Puts that last only while the store's session does ([`TxnOp::PutOwned`]).
    owned_puts: Vec<(Vec<u8>, Vec<u8>)>,
    /// Set when the same key was read twice with different revisions: a conflict already.
    stale: bool,
    /// Change of the volume's usage (bytes of regular files) this transaction makes; put in
    /// one of this instance's usage delta keys by [`Fs::commit`].
    pub usage: i64,
    /// Inodes whose last link this transaction removes while they are open here: orphaned
    /// (`o/<ino>`), purged at their last release once the transaction has committed.
    orphaned: Vec<u64>,
}

/// An inode a transaction deletes, and which of its other keys may exist (each costs an
/// operation; a batch of unlinks fits more files in a transaction without the needless ones).
pub(crate) struct Purge {
    ino: u64,
    /// A directory: its times key.
    dir_times: bool,
    /// A regular file with data: chunk records (a file's chunks never extend past its size,
    /// and the transaction compares the inode's revision).
    chunks: bool,
}

impl Txn {
    pub fn cmp(&mut self, key: Vec<u8>, rev: Revision) {
        if let Some(old) = self.compares.insert(key, rev) {
            if old != rev {
                self.stale = true;
            }
        }
    }
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.insert(key, Some(value));
    }
    pub fn del(&mut self, key: Vec<u8>) {
        self.ops.insert(key, None);
    }
    /// A put that goes with the store's session (see [`TxnOp::PutOwned`]).
    pub fn put_owned(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.owned_puts.push((key, value));
    }
    /// The transaction applies only if no key exists in `[start, end)` when it commits.
    pub fn cmp_empty(&mut self, start: Vec<u8>, end: Vec<u8>) {
        self.empty_ranges.push((start, end));
    }
    /// Adds `other`'s compares and changes to this one (a batch of independent operations);
    /// a key compared at two revisions makes the whole batch stale.
    pub(crate) fn absorb(&mut self, other: Txn) {
        for (key, rev) in other.compares {
            self.cmp(key, rev);
        }
        self.ops.extend(other.ops);
        self.purges.extend(other.purges);
        self.orphaned.extend(other.orphaned);
        self.empty_ranges.extend(other.empty_ranges);
        self.owned_puts.extend(other.owned_puts);
        self.stale |= other.stale;
        self.usage = self.usage.saturating_add(other.usage);
    }

    /// How many etcd operations (or compares, whichever is more) this takes once committed:
    /// a purge adds its xattr range, and its times key and chunk range where it has them, to
    /// the inode's own put (`drop_link` stages it).
    pub(crate) fn weight(&self) -> usize {
        let ops = self.ops.len()
            + self
                .purges
                .iter()
                .map(|p| 1 + usize::from(p.dir_times) + usize::from(p.chunks))
                .sum::<usize>()
            + self.owned_puts.len()
            + usize::from(self.usage != 0);
        ops.max(self.compares.len() + self.empty_ranges.len())
    }
}

/// Inodes read for one transaction: compared at commit, written back if modified.
#[derive(Default)]
pub(crate) struct Stage {
    inodes: BTreeMap<u64, (InodeRec, Revision, bool)>,
}

impl Stage {
    /// Adds an inode read elsewhere (e.g. in a batched read) without marking it dirty.
    fn insert(&mut self, ino: u64, rec: InodeRec, rev: Revision) {
        self.inodes.entry(ino).or_insert((rec, rev, false));
    }

    async fn load(&mut self, fs: &Fs, ino: u64) -> FsResult<&mut InodeRec> {
        if let std::collections::btree_map::Entry::Vacant(slot) = self.inodes.entry(ino) {
            let (rec, rev) = fs.get_inode(ino).await?;
            slot.insert((rec, rev, false));
        }
        self.get(ino)
    }
    fn get(&mut self, ino: u64) -> FsResult<&mut InodeRec> {
        match self.inodes.get_mut(&ino) {
            Some((rec, _, dirty)) => {
                *dirty = true;
                Ok(rec)
            }
            None => Err(FsError::Corrupt(format!("inode {ino} not staged"))),
        }
    }
    /// Mutable access without marking the inode dirty (only for values that are not written).
    fn peek_mut_clean(&mut self, ino: u64) -> FsResult<&mut InodeRec> {
        self.inodes
            .get_mut(&ino)
            .map(|(r, _, _)| r)
            .ok_or_else(|| FsError::Corrupt(format!("inode {ino} not staged")))
    }
    fn peek(&self, ino: u64) -> FsResult<&InodeRec> {
        self.inodes
            .get(&ino)
            .map(|(r, _, _)| r)
            .ok_or_else(|| FsError::Corrupt(format!("inode {ino} not staged")))
    }
    /// Loads without marking dirty (for checks only).
    async fn look(&mut self, fs: &Fs, ino: u64) -> FsResult<&InodeRec> {
        if let std::collections::btree_map::Entry::Vacant(slot) = self.inodes.entry(ino) {
            let (rec, rev) = fs.get_inode(ino).await?;
            slot.insert((rec, rev, false));
        }
        self.peek(ino)
    }
    fn into_txn(self, fs: &Fs, txn: &mut Txn) {
        for (ino, (rec, rev, dirty)) in self.inodes {
            let key = fs.keys.inode(ino);
            txn.cmp(key.clone(), rev);
            if dirty {
                txn.put(key, encode(&rec));
            }
        }
    }
}

/// An unlink's inputs as the watch cache knows them (each with its mod revision).
struct CachedUnlink {
    parent: (InodeRec, Revision),
    entry: (DirentRec, Revision),
    child: (InodeRec, Revision),
}

/// The filesystem core of one volume, as seen by one node. Cheap to share (`Arc<Fs>`); every
/// method takes `&self`. Several `Fs` over the same [`MetaKv`] (one per node) stay consistent
/// through optimistic transactions.
pub struct Fs {
    pub(crate) kv: Arc<dyn MetaKv>,
    pub(crate) blocks: Arc<dyn BlockIo>,
    pub(crate) keys: Keys,
    pub(crate) chunk_size: u64,
    pub(crate) opts: FsOptions,
    /// Reserved inode numbers: [next, end).
    ino_pool: Mutex<(u64, u64)>,
    /// Open handles per inode on this instance.
    pub(crate) open_counts: Mutex<HashMap<u64, u32>>,
    pub(crate) instance: u64,
    pub(crate) next_fh: AtomicU64,
    /// Per-inode invalidation generation: bumped whenever the inode's committed data may have
    /// changed (by this instance's own flushes and truncates, and by [`Fs::invalidate`] calls
    /// from the mount's etcd watch for other nodes' changes). Handles' read caches carry the
    /// generation they were filled at.
    generations: Mutex<HashMap<u64, u64>>,
    generation_seq: AtomicU64,
    /// Inodes this instance created that have had no xattr since, as far as it knows: their
    /// getxattr (the kernel asks for `security.capability` before every write) is answered
    /// without a read. Every xattr change also rewrites the inode, so the watch drops an
    /// inode from the set when another node rewrites it ([`Fs::xattrs_may_exist`]).
    xattr_free: Mutex<std::collections::HashSet<u64>>,
    /// Inodes a read found without any xattr, with the inode's revision at that read. Every
    /// xattr change rewrites the inode, so while the watch cache holds the inode at that same
    /// revision it still has none: `ls -l` (an ACL and a security label asked of every file)
    /// and the kernel's `security.capability` before each write are then answered without
    /// etcd for files other mounts made too.
    xattr_free_at: Mutex<HashMap<u64, Revision>>,
    /// Directories this instance claimed (see [`crate::claims`]).
    pub(crate) claims: Mutex<HashMap<u64, crate::claims::Held>>,
    /// Creates and unlinks answered before their transactions committed (see `early.rs`).
    pub(crate) early: Mutex<crate::early::EarlyOps>,
    /// Pending-content records of closes that succeeded, to delete (see `pending.rs`).
    pub(crate) pending_clears: Arc<Mutex<crate::pending::PendingClears>>,
    /// 1 + the session whose `s/<instance>/<session>` key a committed transaction put (0:
    /// none yet): later pending records of that session need not put it again.
    pub(crate) writer_alive_put: AtomicU64,
    /// The first block of files as other mounts last committed them (see
    /// [`Fs::prefetch_first_block`]).
    pub(crate) first_blocks: Mutex<crate::data::FirstBlockHints>,
    /// Inodes whose last link went while open here: purged at their last release.
    pending_orphans: Mutex<std::collections::HashSet<u64>>,
    /// Where the unflushed writes of this instance's open handles end: inode → handle → end
    /// offset. Attributes handed out include them (size = max(committed, buffered end)), so a
    /// `stat` after a buffered `write` shows the new size, as POSIX requires.
    unflushed: Mutex<HashMap<u64, HashMap<u64, u64>>>,
    /// The base and other instances' usage deltas (see [`crate::usage`]).
    pub(crate) usage: Mutex<UsageView>,
    /// Sum of this instance's committed usage deltas (its slots' values).
    pub(crate) own_usage: AtomicI64,
    /// This instance's usage delta keys, each locked from its put to the answer.
    pub(crate) slots: Vec<futures::lock::Mutex<Slot>>,
    pub(crate) slot_rr: AtomicUsize,
    /// Bumped by [`Fs::usage_resync`]: slots synced at an older epoch are read back.
    pub(crate) usage_epoch: AtomicU64,
    /// The quota in bytes (0 = none).
    pub(crate) quota: AtomicU64,
    /// Growth reserved by open handles' unflushed writes: handle → bytes.
    pub(crate) reserved: Mutex<HashMap<u64, u64>>,
    /// `flock` locks held here and takers waiting (see `flock.rs`).
    pub(crate) flocks: Mutex<crate::flock::Flocks>,
}

pub(crate) fn now_ns() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// A directory entry as read (`None`: no such entry), with its revision.
fn decode_dirent(
    key: &[u8],
    read: Option<(Vec<u8>, Revision)>,
) -> FsResult<Option<(DirentRec, Revision)>> {
    read.map(|(v, rev)| Ok((decode::<DirentRec>(key, &v)?, rev)))
        .transpose()
}

pub(crate) fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::Invalid("bad file name"));
    }
    Ok(())
}

fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(FsError::Range);
    }
    if name.contains(&0) {
        return Err(FsError::Invalid("NUL in xattr name"));
    }
    Ok(())
}

fn instance_id() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&now_ns().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&SEQ.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b) | 1
}

impl Fs {
    /// Opens `volume` (formatting it with a root directory and `opts.chunk_size` if it does not
    /// exist yet).
    pub async fn open_volume(
        kv: Arc<dyn MetaKv>,
        blocks: Arc<dyn BlockIo>,
        volume: &str,
        opts: FsOptions,
    ) -> FsResult<Fs> {
        if volume.is_empty()
            || volume.len() > 64
            || !volume
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            || volume.starts_with('.')
        {
            return Err(FsError::Invalid("bad volume name"));
        }
        if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK_SIZE {
            return Err(FsError::Invalid("bad chunk size"));
        }
        if opts.max_txn_ops < 8 || opts.ino_batch == 0 || opts.max_retries == 0 {
            return Err(FsError::Invalid("bad options"));
        }
        let keys = Keys::new(volume);
        let mut attempt = 0;
        let vol = loop {
            if let Some((v, _)) = kv.get(&keys.volume()).await? {
                let vol: VolumeRec = decode(&keys.volume(), &v)?;
                if vol.chunk_size == 0 || vol.chunk_size > MAX_CHUNK_SIZE {
                    return Err(FsError::Corrupt("volume record: bad chunk size".into()));
                }
                break vol;
            }
            let vol = VolumeRec {
                chunk_size: opts.chunk_size,
            };
            let now = now_ns();
            let root = InodeRec {
                kind: FileKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                nlink: 2,
                atime_ns: now,
                mtime_ns: now,
                ctime_ns: now,
                rdev: 0,
                parent: ROOT_INO,
                target: None,
            };
            let compares = vec![
                Compare::key(keys.volume(), 0),
                Compare::key(keys.inode(ROOT_INO), 0),
            ];
            let ops = vec![
                TxnOp::Put {
                    key: keys.volume(),
                    value: encode(&vol),
                },
                TxnOp::Put {
                    key: keys.inode(ROOT_INO),
                    value: encode(&root),
                },
                TxnOp::Put {
                    key: keys.counter(),
                    value: encode(&CounterRec { next: ROOT_INO + 1 }),
                },
                // A new volume holds no bytes: usage accounting starts from a known base.
                TxnOp::Put {
                    key: keys.usage_base(),
                    value: encode_usage(0),
                },
            ];
            if kv.txn(compares, ops).await? {
                break vol;
            }
            attempt += 1;
            if attempt >= opts.max_retries {
                return Err(FsError::Contention(attempt));
            }
        };
        Ok(Fs {
            kv,
            blocks,
            keys,
            chunk_size: u64::from(vol.chunk_size),
            opts,
            ino_pool: Mutex::new((0, 0)),
            open_counts: Mutex::new(HashMap::new()),
            instance: instance_id(),
            next_fh: AtomicU64::new(1),
            generations: Mutex::new(HashMap::new()),
            xattr_free: Mutex::new(std::collections::HashSet::new()),
            claims: Mutex::new(HashMap::new()),
            early: Mutex::new(Default::default()),
            pending_clears: Default::default(),
            writer_alive_put: AtomicU64::new(0),
            xattr_free_at: Mutex::new(HashMap::new()),
            generation_seq: AtomicU64::new(0),
            pending_orphans: Mutex::new(std::collections::HashSet::new()),
            first_blocks: Mutex::new(Default::default()),
            unflushed: Mutex::new(HashMap::new()),
            usage: Mutex::new(UsageView::default()),
            own_usage: AtomicI64::new(0),
            slots: (0..USAGE_SLOTS)
                .map(|_| futures::lock::Mutex::new(Slot::default()))
                .collect(),
            slot_rr: AtomicUsize::new(0),
            usage_epoch: AtomicU64::new(0),
            quota: AtomicU64::new(0),
            reserved: Mutex::new(HashMap::new()),
            flocks: Mutex::new(Default::default()),
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// This instance's id (owner of the orphans it keeps alive).
    pub fn instance_id(&self) -> u64 {
        self.instance
    }

    /// Forgets what open handles cached of `ino`'s committed size and chunk map: the next read
    /// on any handle re-reads them. The mount calls this when its etcd watch reports another
    /// node's change to the inode or its chunks.
    pub fn invalidate(&self, ino: u64) {
        let g = self.generation_seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.generations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ino, g);
    }

    /// Forgets every handle's cached metadata (after the watch lost track of changes).
    pub fn invalidate_all(&self) {
        self.xattr_free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let g = self.generation_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut gens = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        for v in gens.values_mut() {
            *v = g;
        }
        // Inodes not in the map read generation 0; move the floor above every cached tag.
        gens.insert(0, g);
    }

    /// `ino` may have xattrs (from now on its getxattr reads etcd). The mount's watch calls
    /// this when another node rewrote or deleted the inode (every xattr change rewrites it).
    pub fn xattrs_may_exist(&self, ino: u64) {
        self.xattr_free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino);
        self.xattr_free_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino);
    }

    /// Whether `ino` has no xattr as far as this instance knows: it made the inode and saw no
    /// change of it since, or a read found none at the inode revision the watch cache still
    /// holds.
    fn knows_xattr_free(&self, ino: u64) -> bool {
        if self.is_xattr_free(ino) {
            return true;
        }
        let Some(at) = self
            .xattr_free_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .copied()
        else {
            return false;
        };
        self.kv
            .cached(&self.keys.inode(ino))
            .is_some_and(|(_, rev)| rev == at)
    }

    fn note_xattr_free_at(&self, ino: u64, rev: Revision) {
        let mut m = self.xattr_free_at.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= XATTR_FREE_MAX {
            m.clear();
        }
        m.insert(ino, rev);
    }

    fn is_xattr_free(&self, ino: u64) -> bool {
        self.xattr_free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&ino)
    }

    pub(crate) fn generation(&self, ino: u64) -> u64 {
        let gens = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        let floor = gens.get(&0).copied().unwrap_or(0);
        gens.get(&ino).copied().unwrap_or(0).max(floor)
    }

    // ----- helpers -------------------------------------------------------------------------

    pub(crate) async fn backoff(&self, attempt: &mut u32) -> FsResult<()> {
        *attempt += 1;
        if *attempt >= self.opts.max_retries {
            return Err(FsError::Contention(*attempt));
        }
        if let Some(sleep) = &self.opts.sleep {
            // 100 µs doubling up to ~13 ms, with cheap jitter from the instance id.
            let base = 100u64 << (*attempt).min(7);
            let jitter = (self.instance.rotate_left(*attempt) ^ now_ns() as u64) % base.max(1);
            sleep(Duration::from_micros(base / 2 + jitter / 2)).await;
        }
        Ok(())
    }

    pub(crate) async fn commit(&self, mut txn: Txn) -> FsResult<bool> {
        if txn.stale {
            return Ok(false);
        }
        let mut ranges = Vec::new();
        for p in std::mem::take(&mut txn.purges) {
            txn.ops.insert(self.keys.inode(p.ino), None);
            if p.dir_times {
                txn.ops.insert(self.keys.dir_times(p.ino), None);
            }
            txn.ops.remove(&self.keys.orphan(p.ino));
            // Xattrs are always deleted: no cache can prove an inode has none at the revision
            // compared.
            let prefixes = [
                p.chunks.then(|| self.keys.chunks(p.ino)),
                Some(self.keys.xattrs(p.ino)),
            ];
            for prefix in prefixes.into_iter().flatten() {
                let end = prefix_end(&prefix);
                ranges.push(TxnOp::DeleteRange { start: prefix, end });
            }
        }
        // Data operations batch to `max_txn_ops`; a namespace operation is a fixed handful of
        // keys (a rename replacing a directory: ~12), allowed whatever that option says.
        let limit = self.opts.max_txn_ops.max(NAMESPACE_TXN_OPS);
        let usage_ops = usize::from(txn.usage != 0) + txn.owned_puts.len();
        if txn.ops.len() + ranges.len() + usage_ops > limit
            || txn.compares.len() + txn.empty_ranges.len() > limit
        {
            return Err(FsError::Corrupt(format!(
                "internal: transaction of {} ops / {} compares exceeds the limit",
                txn.ops.len(),
                txn.compares.len()
            )));
        }
        let compares = txn
            .compares
            .into_iter()
            .map(|(key, mod_revision)| Compare::key(key, mod_revision))
            .chain(
                std::mem::take(&mut txn.empty_ranges)
                    .into_iter()
                    .map(|(start, end)| Compare::range_empty(start, end)),
            )
            .collect();
        let mut ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|(key, v)| match v {
                Some(value) => TxnOp::Put { key, value },
                None => TxnOp::Delete { key },
            })
            .collect();
        ops.extend(ranges);
        ops.extend(
            std::mem::take(&mut txn.owned_puts)
                .into_iter()
                .map(|(key, value)| TxnOp::PutOwned { key, value }),
        );
        let orphaned = std::mem::take(&mut txn.orphaned);
        let committed = self.txn_with_usage(compares, ops, txn.usage).await?;
        if committed && !orphaned.is_empty() {
            self.settle_orphans(orphaned).await;
        }
        Ok(committed)
    }

    /// Inodes a just-committed transaction orphaned because they were open here: from now on
    /// their last release purges them, or, when that release came while the transaction was
    /// in flight (it then found the inode still linked), they are purged now. Deciding under
    /// the lock that `release` counts handles under closes that gap: a `close` racing an
    /// `unlink` of the same file otherwise left the orphan, and its bytes in the volume's
    /// usage, until the next mount (seen as a flaky `usage_survives_a_crashed_mount`). A purge
    /// that fails leaves the orphan record to [`Fs::purge_orphans`].
    fn settle_orphans(&self, inos: Vec<u64>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for ino in inos {
                let still_open = {
                    let counts = self.open_counts.lock().unwrap_or_else(|e| e.into_inner());
                    let open = counts.get(&ino).is_some_and(|n| *n > 0);
                    if open {
                        self.pending_orphans
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(ino);
                    }
                    open
                };
                if !still_open {
                    let _ = self.purge(ino).await;
                }
            }
        })
    }

    pub(crate) async fn get_inode_opt(&self, ino: u64) -> FsResult<Option<(InodeRec, Revision)>> {
        let key = self.keys.inode(ino);
        match self.kv.get(&key).await? {
            None => Ok(None),
            Some((v, rev)) => Ok(Some((decode_inode(&key, &v)?, rev))),
        }
    }

    pub(crate) async fn get_inode(&self, ino: u64) -> FsResult<(InodeRec, Revision)> {
        self.get_inode_opt(ino).await?.ok_or(FsError::NotFound)
    }

    async fn get_dirent(
        &self,
        parent: u64,
        name: &[u8],
    ) -> FsResult<Option<(DirentRec, Revision)>> {
        let key = self.keys.dirent(parent, name);
        match self.kv.get(&key).await? {
            None => Ok(None),
            Some((v, rev)) => Ok(Some((decode(&key, &v)?, rev))),
        }
    }

    /// Checks that `ino` is a live directory (NotDir / NotFound otherwise), staged for the
    /// transaction's compares but not to be rewritten.
    async fn look_dir(&self, stage: &mut Stage, ino: u64) -> FsResult<()> {
        let rec = stage.look(self, ino).await?;
        if rec.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if rec.nlink == 0 {
            return Err(FsError::NotFound);
        }
        Ok(())
    }

    /// A live directory (NotDir / NotFound otherwise).
    async fn load_dir<'s>(&self, stage: &'s mut Stage, ino: u64) -> FsResult<&'s mut InodeRec> {
        let rec = stage.load(self, ino).await?;
        if rec.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if rec.nlink == 0 {
            return Err(FsError::NotFound);
        }
        Ok(rec)
    }

    /// Records that `dir`'s entries changed at `now`: a blind write of `t/<dir>`, so that
    /// concurrent entry changes in one directory do not conflict on its inode.
    pub(crate) fn touch_dir(&self, txn: &mut Txn, dir: u64, now: i64) {
        txn.put(
            self.keys.dir_times(dir),
            encode(&DirTimesRec {
                mtime_ns: now,
                ctime_ns: now,
            }),
        );
    }

    /// Makes `dir`'s emptiness part of the transaction: it commits only if `dir` has no entry.
    fn cmp_dir_empty(&self, txn: &mut Txn, dir: u64) {
        let start = self.keys.dir(dir);
        let end = prefix_end(&start);
        txn.cmp_empty(start, end);
    }

    /// An inode record as applications see it: a directory's times come from `t/<ino>`.
    fn with_dir_times(
        &self,
        ino: u64,
        mut rec: InodeRec,
        times: Option<&[u8]>,
    ) -> FsResult<InodeRec> {
        if rec.kind == FileKind::Dir {
            if let Some(v) = times {
                let t: DirTimesRec = decode(&self.keys.dir_times(ino), v)?;
                rec.mtime_ns = t.mtime_ns;
                rec.ctime_ns = rec.ctime_ns.max(t.ctime_ns);
            }
        }
        Ok(rec)
    }

    /// `ino`'s record with directory times applied, in one round trip.
    async fn get_inode_for_attr(&self, ino: u64) -> FsResult<Option<InodeRec>> {
        let keys = [self.keys.inode(ino), self.keys.dir_times(ino)];
        let mut got = self.kv.get_many(&keys).await?.into_iter();
        let (inode, times) = (got.next().flatten(), got.next().flatten());
        match inode {
            None => Ok(None),
            Some((v, _)) => {
                let rec = decode_inode(&keys[0], &v)?;
                Ok(Some(self.with_dir_times(
                    ino,
                    rec,
                    times.as_ref().map(|(t, _)| t.as_slice()),
                )?))
            }
        }
    }

    async fn dir_is_empty(&self, ino: u64) -> FsResult<bool> {
        let start = self.keys.dir(ino);
        let end = prefix_end(&start);
        Ok(self.kv.range(&start, &end, 1).await?.entries.is_empty())
    }

    pub(crate) fn is_open_locally(&self, ino: u64) -> bool {
        self.open_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
            .is_some_and(|n| *n > 0)
    }

    pub(crate) async fn alloc_ino(&self) -> FsResult<u64> {
        {
            let mut pool = self.ino_pool.lock().unwrap_or_else(|e| e.into_inner());
            if pool.0 < pool.1 {
                pool.0 += 1;
                return Ok(pool.0 - 1);
            }
        }
        let key = self.keys.counter();
        let mut attempt = 0;
        loop {
            let (next, rev) = match self.kv.get(&key).await? {
                Some((v, rev)) => (decode::<CounterRec>(&key, &v)?.next, rev),
                None => (ROOT_INO + 1, 0),
            };
            let end = next
                .checked_add(self.opts.ino_batch)
                .filter(|e| *e < u64::MAX / 2)
                .ok_or_else(|| FsError::Corrupt("inode numbers exhausted".into()))?;
            if next <= ROOT_INO {
                return Err(FsError::Corrupt("inode counter below the root".into()));
            }
            let mut txn = Txn::default();
            txn.cmp(key.clone(), rev);
            txn.put(key.clone(), encode(&CounterRec { next: end }));
            if self.commit(txn).await? {
                let mut pool = self.ino_pool.lock().unwrap_or_else(|e| e.into_inner());
                *pool = (next + 1, end);
                return Ok(next);
            }
            self.backoff(&mut attempt).await?;
        }
    }

    /// Drops one link of `ino` (staged). When that was the last one, the inode goes: at once,
    /// in the same transaction, when nobody here has it open; otherwise it becomes an orphan
    /// (nlink 0, `o/<ino>`) purged at the last [`Fs::release`].
    fn drop_link(&self, stage: &mut Stage, txn: &mut Txn, ino: u64, now: i64) -> FsResult<()> {
        let rec = stage.get(ino)?;
        rec.ctime_ns = now;
        if rec.kind != FileKind::Dir && rec.nlink > 1 {
            rec.nlink -= 1;
            return Ok(());
        }
        rec.nlink = 0;
        if self.is_open_locally(ino) {
            txn.put(
                self.keys.orphan(ino),
                encode(&OrphanRec {
                    owner: self.instance,
                }),
            );
            txn.orphaned.push(ino);
        } else {
            if rec.kind == FileKind::File {
                txn.usage = txn.usage.saturating_sub(bytes_i64(rec.size));
            }
            txn.purges.push(Purge {
                ino,
                dir_times: rec.kind == FileKind::Dir,
                chunks: rec.kind == FileKind::File && rec.size > 0,
            });
        }
        Ok(())
    }

    /// Records where handle `fh`'s unflushed writes to `ino` end (0 = it has none).
    pub(crate) fn set_unflushed(&self, ino: u64, fh: u64, end: u64) {
        let mut m = self.unflushed.lock().unwrap_or_else(|e| e.into_inner());
        if end == 0 {
            if let Some(per) = m.get_mut(&ino) {
                per.remove(&fh);
                if per.is_empty() {
                    m.remove(&ino);
                }
            }
        } else {
            m.entry(ino).or_default().insert(fh, end);
        }
    }

    /// Where the unflushed writes of this instance's handles to `ino` end (0 = none).
    pub(crate) fn unflushed_end(&self, ino: u64) -> u64 {
        let m = self.unflushed.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&ino)
            .and_then(|per| per.values().copied().max())
            .unwrap_or(0)
    }

    /// Whether a handle of this instance other than `fh` holds unflushed writes to `ino`.
    /// The FUSE layer flushes those before a read through `fh` (same-node read-after-write
    /// across file descriptors) and before a truncate.
    pub fn has_unflushed_writes(&self, ino: u64, except_fh: Option<u64>) -> bool {
        let m = self.unflushed.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&ino)
            .is_some_and(|per| per.keys().any(|fh| Some(*fh) != except_fh))
    }

    /// The attributes of `ino` as this instance sees them: the committed record, with a file's
    /// size extended to the end of its handles' unflushed writes and a directory's times moved
    /// by the early operations in it (`early.rs`).
    pub(crate) fn local_attr(&self, ino: u64, rec: &InodeRec) -> Attr {
        let mut a = Attr::from_rec(ino, rec);
        if a.kind == FileKind::Dir {
            if let Some(at) = self.pending_dir_time(ino) {
                a.mtime_ns = a.mtime_ns.max(at);
                a.ctime_ns = a.ctime_ns.max(at);
            }
            if let Some(links) = self.pending_dir_links(ino) {
                a.nlink = a.nlink.max(links);
            }
        }
        if a.kind == FileKind::File {
            let end = self.unflushed_end(ino);
            if end > a.size {
                a.size = end;
                a.blocks = end.div_ceil(512);
            }
        }
        a
    }

    /// Whether `ino` was orphaned while open here (to be purged at its last release). Called
    /// under the `open_counts` lock (see [`Fs::settle_orphans`]).
    pub(crate) fn take_pending_orphan(&self, ino: u64) -> bool {
        self.pending_orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ino)
    }

    // ----- namespace ------------------------------------------------------------------------

    /// Attributes of `ino`.
    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        // A directory made early: as its mkdir answered, with what was made in it since (the
        // kernel asks after every create in it).
        if let Some(rec) = self.early_dir(ino) {
            return Ok(self.local_attr(ino, &rec));
        }
        self.settle_ino(ino).await?;
        if self.opts.cached_lookups {
            if let Some(rec) = self.cached_inode_for_attr(ino) {
                return Ok(self.local_attr(ino, &rec));
            }
        }
        let rec = self
            .get_inode_for_attr(ino)
            .await?
            .ok_or(FsError::NotFound)?;
        Ok(self.local_attr(ino, &rec))
    }

    /// The entry `name` of directory `parent`: one batched read of the entry and the parent
    /// (so a miss costs one round trip), then the child's inode.
    pub async fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        self.settle_names_only(parent, Some(name)).await;
        let dkey = self.keys.dirent(parent, name);
        if self.opts.cached_lookups {
            if let Some(a) = self.lookup_cached(parent, name) {
                return Ok(a);
            }
            // A directory made early holds only what was made in it early (waited for above,
            // then in the cache): nothing else can be there yet.
            if self.early_dir(parent).is_some() {
                return Err(FsError::NotFound);
            }
            // The kernel looks up every new name before it makes it (create, mkdir, symlink,
            // link, rename's target): in a directory this instance claimed (nobody else makes
            // names in it) and its cache holds whole, that is answered without etcd.
            if self.holds_claim(parent) && self.kv.cached_absent(&dkey, &self.keys.dir(parent)) {
                return Err(FsError::NotFound);
            }
        }
        self.lookup_stored(parent, name, &dkey).await
    }

    /// [`Fs::lookup`] from etcd, never from the cache: what a create that found the name
    /// taken opens (the cache may not have it yet).
    async fn lookup_stored(&self, parent: u64, name: &[u8], dkey: &[u8]) -> FsResult<Attr> {
        // A missing entry is ENOENT in a directory, ENOTDIR in anything else: the parent is
        // read with the entry unless the watch cache knows it is a directory (an inode's kind
        // never changes, so any cached value of it will do; a directory removed meanwhile
        // gives ENOENT either way). The new name of every create is looked up first: one
        // plain read instead of a two-key transaction there.
        let parent_is_dir = self
            .cached_inode_to_compare(parent)
            .is_some_and(|(p, _)| p.kind == FileKind::Dir);
        for _ in 0..self.opts.max_retries {
            // Without the parent's record, a missing entry is ENOENT below.
            let (dirent, parent_rec) = if parent_is_dir {
                (decode_dirent(dkey, self.kv.get(dkey).await?)?, None)
            } else {
                self.read_dirent_and_parent(parent, name).await?
            };
            match dirent {
                None => {
                    let (p, _) = parent_rec.ok_or(FsError::NotFound)?;
                    return Err(if p.kind == FileKind::Dir {
                        FsError::NotFound
                    } else {
                        FsError::NotDir
                    });
                }
                Some((d, drev)) => match self.get_inode_for_attr(d.ino).await? {
                    Some(rec) => return Ok(self.local_attr(d.ino, &rec)),
                    None => {
                        // Either a concurrent unlink (retry) or a dangling entry (corrupt).
                        match self.kv.get(dkey).await? {
                            Some((_, r)) if r == drev => {
                                return Err(FsError::Corrupt(format!(
                                    "entry points to missing inode {}",
                                    d.ino
                                )))
                            }
                            _ => continue,
                        }
                    }
                },
            }
        }
        Err(FsError::Contention(self.opts.max_retries))
    }

    /// A lookup answered from the store's watch-fed cache, when the entry and its inode are
    /// both there (a directory only with its times key, see `cached_inode_for_attr`). Anything
    /// odd falls back to etcd.
    fn lookup_cached(&self, parent: u64, name: &[u8]) -> Option<Attr> {
        let dkey = self.keys.dirent(parent, name);
        let (dv, _) = self.kv.cached(&dkey)?;
        let d: DirentRec = decode(&dkey, &dv).ok()?;
        self.cached_entry_attr(d.ino, d.kind)
    }

    /// The attributes of an entry naming `ino` as a `kind`, from the watch cache, when the
    /// cached inode agrees with the entry (same kind, a non-directory still linked) and a
    /// getattr would answer from the cache (see `cached_inode_for_attr`).
    fn cached_entry_attr(&self, ino: u64, kind: FileKind) -> Option<Attr> {
        let rec = self.cached_inode_for_attr(ino)?;
        if rec.kind != kind || (rec.kind != FileKind::Dir && rec.nlink == 0) {
            return None;
        }
        Some(self.local_attr(ino, &rec))
    }

    /// `ino`'s record and revision from the watch cache, possibly older than what this store
    /// has seen: for a first attempt that compares the revision, or for what never changes
    /// (a kind). See [`MetaKv::cached_to_compare`].
    pub(crate) fn cached_inode_to_compare(&self, ino: u64) -> Option<(InodeRec, Revision)> {
        let key = self.keys.inode(ino);
        let (v, rev) = self.kv.cached_to_compare(&key)?;
        Some((decode_inode(&key, &v).ok()?, rev))
    }

    /// `ino`'s record from the watch cache with directory times applied; a directory only
    /// when its times key is cached too (every directory made since mkdir writes it; an
    /// older one without it is read from etcd).
    fn cached_inode_for_attr(&self, ino: u64) -> Option<InodeRec> {
        let ikey = self.keys.inode(ino);
        let (v, _) = self.kv.cached(&ikey)?;
        let rec = decode_inode(&ikey, &v).ok()?;
        if rec.kind != FileKind::Dir {
            return Some(rec);
        }
        let (times, _) = self.kv.cached(&self.keys.dir_times(ino))?;
        self.with_dir_times(ino, rec, Some(&times)).ok()
    }

    /// Entry `name` of `parent` and its inode from the watch cache, each with its revision,
    /// when the cache has both and they agree on a linked non-directory. `to_compare`: for a
    /// transaction that compares both revisions (see [`MetaKv::cached_to_compare`]).
    #[allow(clippy::type_complexity)]
    fn cached_file_entry(
        &self,
        parent: u64,
        name: &[u8],
        to_compare: bool,
    ) -> Option<((DirentRec, Revision), (InodeRec, Revision))> {
        let cached = |key: &[u8]| {
            if to_compare {
                self.kv.cached_to_compare(key)
            } else {
                self.kv.cached(key)
            }
        };
        let dkey = self.keys.dirent(parent, name);
        let (dv, drev) = cached(&dkey)?;
        let d: DirentRec = decode(&dkey, &dv).ok()?;
        if d.kind == FileKind::Dir {
            return None;
        }
        let ikey = self.keys.inode(d.ino);
        let (iv, irev) = cached(&ikey)?;
        let rec = decode_inode(&ikey, &iv).ok()?;
        if rec.nlink == 0 || rec.kind != d.kind {
            return None;
        }
        Some(((d, drev), (rec, irev)))
    }

    /// The entry `name` of `parent` and `parent`'s inode, read together in one round trip.
    #[allow(clippy::type_complexity)]
    async fn read_dirent_and_parent(
        &self,
        parent: u64,
        name: &[u8],
    ) -> FsResult<(Option<(DirentRec, Revision)>, Option<(InodeRec, Revision)>)> {
        let keys = [self.keys.dirent(parent, name), self.keys.inode(parent)];
        let got = self.kv.get_many(&keys).await?;
        let mut it = got.into_iter();
        let dirent = decode_dirent(&keys[0], it.next().flatten())?;
        let parent_rec = match it.next().flatten() {
            Some((v, rev)) => Some((decode_inode(&keys[1], &v)?, rev)),
            None => None,
        };
        Ok((dirent, parent_rec))
    }

    /// Stages `parent` (read in the same round trip as its entry `name`) and returns the entry.
    async fn stage_dir_and_entry(
        &self,
        stage: &mut Stage,
        parent: u64,
        name: &[u8],
    ) -> FsResult<Option<(DirentRec, Revision)>> {
        let (dirent, parent_rec) = self.read_dirent_and_parent(parent, name).await?;
        let (rec, rev) = parent_rec.ok_or(FsError::NotFound)?;
        stage.insert(parent, rec, rev);
        Ok(dirent)
    }

    pub(crate) async fn make_node(
        &self,
        parent: u64,
        name: &[u8],
        node: NewNode,
    ) -> FsResult<Attr> {
        check_name(name)?;
        self.settle_names(parent, Some(name)).await;
        let ino = self.alloc_new_ino().await?;
        let made = self.make_node_as(parent, name, node, ino, None).await;
        if made.is_err() {
            self.xattrs_may_exist(ino);
        }
        made
    }

    /// A number for a new inode, noted as new ([`Fs::note_new_inode`]).
    pub(crate) async fn alloc_new_ino(&self) -> FsResult<u64> {
        let ino = self.alloc_ino().await?;
        self.note_new_inode(ino);
        Ok(ino)
    }

    /// A new inode has no xattrs: noted before it exists, so no other node's xattr change
    /// can precede this.
    pub(crate) fn note_new_inode(&self, ino: u64) {
        let mut free = self.xattr_free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() >= XATTR_FREE_MAX {
            free.clear();
        }
        free.insert(ino);
    }

    /// The record of a new inode made in `parent` at `now`, with the group and mode the
    /// parent's set-group-ID bit decided.
    pub(crate) fn new_inode_rec(
        &self,
        node: &NewNode,
        parent: u64,
        perm: u32,
        gid: u32,
        now: i64,
    ) -> InodeRec {
        InodeRec {
            kind: node.kind,
            mode: perm & 0o7777,
            uid: node.uid,
            gid,
            size: node.target.as_ref().map_or(0, |t| t.len() as u64),
            nlink: if node.kind == FileKind::Dir { 2 } else { 1 },
            atime_ns: now,
            mtime_ns: now,
            ctime_ns: now,
            rdev: node.rdev,
            parent: if node.kind == FileKind::Dir {
                parent
            } else {
                0
            },
            target: node.target.clone(),
        }
    }

    /// What every create writes besides its parent's record: the parent's times touched, its
    /// claim compared (see `cmp_unclaimed`), the entry and the new inode compared absent and
    /// put. Shared by [`Fs::make_node_as`] and the joint create and flush, so the two cannot
    /// drift apart.
    pub(crate) fn put_new_entry(
        &self,
        txn: &mut Txn,
        parent: u64,
        name: &[u8],
        ino: u64,
        rec: &InodeRec,
        now: i64,
    ) {
        self.touch_dir(txn, parent, now);
        self.cmp_unclaimed(txn, parent);
        let dkey = self.keys.dirent(parent, name);
        let ikey = self.keys.inode(ino);
        txn.cmp(dkey.clone(), 0);
        txn.cmp(ikey.clone(), 0);
        txn.put(
            dkey,
            encode(&DirentRec {
                ino,
                kind: rec.kind,
            }),
        );
        txn.put(ikey, encode(rec));
    }

    /// Makes the node as inode `ino`; with `at`, its times are `at` (an early create's
    /// answer already gave them).
    pub(crate) async fn make_node_as(
        &self,
        parent: u64,
        name: &[u8],
        node: NewNode,
        ino: u64,
        at: Option<i64>,
    ) -> FsResult<Attr> {
        let mut attempt = 0;
        loop {
            let mut stage = Stage::default();
            let mut txn = Txn::default();
            let now = at.unwrap_or_else(now_ns);
            // First try: the parent as the watch cache knows it, and no read of the entry at
            // all: the transaction compares both (parent unchanged, name absent), so a stale
            // cache or an existing name only makes it fail, and the retry reads etcd. A mkdir
            // rewrites the parent (its link count) from that value, which the same comparison
            // makes safe.
            let cached_parent = if attempt == 0 {
                self.cached_inode_to_compare(parent)
            } else {
                None
            };
            let existing = match cached_parent {
                Some((rec, rev)) => {
                    stage.insert(parent, rec, rev);
                    None
                }
                None => self.stage_dir_and_entry(&mut stage, parent, name).await?,
            };
            // The parent is compared, not rewritten, unless its link count changes (mkdir):
            // creates of files in one directory from many nodes then never conflict.
            let p = if node.kind == FileKind::Dir {
                self.load_dir(&mut stage, parent).await?
            } else {
                self.look_dir(&mut stage, parent).await?;
                stage.peek_mut_clean(parent)?
            };
            // A set-group-ID directory gives new nodes its group, and new subdirectories
            // its set-group-ID bit (as ext4 and every Linux filesystem do).
            let (gid, perm) = if p.mode & libc::S_ISGID != 0 {
                let sgid = if node.kind == FileKind::Dir {
                    libc::S_ISGID
                } else {
                    0
                };
                (p.gid, node.perm | sgid)
            } else {
                (node.gid, node.perm)
            };
            if node.kind == FileKind::Dir {
                if p.nlink >= MAX_LINKS {
                    return Err(FsError::TooManyLinks);
                }
                p.nlink += 1;
                p.mtime_ns = now;
                p.ctime_ns = now;
            }
            if node.kind == FileKind::Dir {
                // Its own times key from the start: its attributes can then be answered from
                // the watch cache, which cannot tell a missing key from an uncached one.
                self.touch_dir(&mut txn, ino, now);
                // Trivially true for a new inode number; said so that the store's cache learns
                // the directory's entries whole (every one made later reaches it), and answers
                // lookups of new names in it (`MetaKv::cached_absent`) without etcd.
                self.cmp_dir_empty(&mut txn, ino);
            }
            let claimed = if node.kind == FileKind::Dir {
                self.claim_new_dir(&mut txn, ino)
            } else {
                None
            };
            if existing.is_some() {
                return Err(FsError::Exists);
            }
            let rec = self.new_inode_rec(&node, parent, perm, gid, now);
            self.put_new_entry(&mut txn, parent, name, ino, &rec, now);
            stage.into_txn(self, &mut txn);
            let committed = self.commit(txn).await;
            if let Some(session) = claimed {
                match &committed {
                    Ok(true) => self.note_claim(ino, Some(session)),
                    Ok(false) => {}
                    Err(_) => self.note_claim(ino, None),
                }
            }
            if committed? {
                return Ok(Attr::from_rec(ino, &rec));
            }
            self.clear_claim(parent).await?;
            self.backoff(&mut attempt).await?;
        }
    }

    /// Creates a regular file. With `exclusive` (O_EXCL) an existing entry is EEXIST; without,
    /// an existing regular file is returned as is (`false`: not created) and a directory is
    /// EISDIR.
    pub async fn create(
        &self,
        parent: u64,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> FsResult<(Attr, bool)> {
        match self
            .make_node(parent, name, NewNode::file(perm, uid, gid))
            .await
        {
            Ok(a) => Ok((a, true)),
            Err(FsError::Exists) if !exclusive => {
                let a = self
                    .lookup_stored(parent, name, &self.keys.dirent(parent, name))
                    .await?;
                match a.kind {
                    FileKind::Dir => Err(FsError::IsDir),
                    _ => Ok((a, false)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// mknod: `mode` carries the type bits (0 = regular file); directories and symlinks have
    /// their own calls.
    pub async fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        let kind = if mode & libc::S_IFMT == 0 {
            FileKind::File
        } else {
            FileKind::from_mode(mode).ok_or(FsError::Invalid("bad file type"))?
        };
        if matches!(kind, FileKind::Dir | FileKind::Symlink) {
            return Err(FsError::Invalid("mknod of a directory or symlink"));
        }
        let rdev = if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            rdev
        } else {
            0
        };
        self.make_node(
            parent,
            name,
            NewNode {
                kind,
                perm: mode,
                uid,
                gid,
                rdev,
                target: None,
            },
        )
        .await
    }

    pub async fn mkdir(
        &self,
        parent: u64,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        self.make_node(parent, name, NewNode::dir(perm, uid, gid))
            .await
    }

    pub async fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> FsResult<Attr> {
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() > SYMLINK_MAX {
            return Err(FsError::NameTooLong);
        }
        if target.contains(&0) {
            return Err(FsError::Invalid("NUL in symlink target"));
        }
        self.make_node(
            parent,
            name,
            NewNode {
                kind: FileKind::Symlink,
                perm: 0o777,
                uid,
                gid,
                rdev: 0,
                target: Some(target.to_vec()),
            },
        )
        .await
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (rec, _) = self.get_inode(ino).await?;
        match (rec.kind, rec.target) {
            (FileKind::Symlink, Some(t)) => Ok(t),
            _ => Err(FsError::Invalid("not a symlink")),
        }
    }

    /// Removes a non-directory entry.
    pub async fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        check_name(name)?;
        self.settle_names(parent, Some(name)).await;
        self.unlink_now(parent, name, None).await
    }

    /// The unlink itself, once nothing answered early stands in its way; with `expect`, only
    /// the name of that inode is removed (another is NotFound).
    pub(crate) async fn unlink_now(
        &self,
        parent: u64,
        name: &[u8],
        expect: Option<u64>,
    ) -> FsResult<()> {
        let mut attempt = 0;
        loop {
            // First try: parent, entry and inode as the watch cache knows them, no read at
            // all. The transaction compares all three, so a stale cache only makes it fail and
            // the retry reads etcd; anything but the plain case (a file that is there) goes to
            // etcd at once, so no error is ever answered from the cache.
            let cached = if attempt == 0 {
                self.cached_unlink_txn(parent, name)
                    .filter(|(ino, ..)| expect.is_none_or(|e| e == *ino))
            } else {
                None
            };
            let txn = match cached {
                Some((.., txn)) => txn,
                None => {
                    let mut stage = Stage::default();
                    let entry = self.stage_dir_and_entry(&mut stage, parent, name).await?;
                    let p = stage.look(self, parent).await?;
                    if p.kind != FileKind::Dir {
                        return Err(FsError::NotDir);
                    }
                    let (d, drev) = entry.ok_or(FsError::NotFound)?;
                    if d.kind == FileKind::Dir {
                        return Err(FsError::IsDir);
                    }
                    if expect.is_some_and(|e| e != d.ino) {
                        return Err(FsError::NotFound);
                    }
                    stage.load(self, d.ino).await?;
                    self.unlink_txn(stage, parent, name, (d.ino, drev), now_ns())?
                }
            };
            if self.commit(txn).await? {
                return Ok(());
            }
            self.backoff(&mut attempt).await?;
        }
    }

    /// An unlink's transaction built from the watch cache alone, for the plain case (see
    /// [`Fs::cached_unlink_inputs`]); with the inode it removes a link of, that inode's link
    /// count before, and the time it writes.
    pub(crate) fn cached_unlink_txn(
        &self,
        parent: u64,
        name: &[u8],
    ) -> Option<(u64, u32, i64, Txn)> {
        let c = self.cached_unlink_inputs(parent, name)?;
        let ino = c.entry.0.ino;
        let nlink = c.child.0.nlink;
        let mut stage = Stage::default();
        stage.insert(parent, c.parent.0, c.parent.1);
        stage.insert(ino, c.child.0, c.child.1);
        let now = now_ns();
        let txn = self
            .unlink_txn(stage, parent, name, (ino, c.entry.1), now)
            .ok()?;
        Some((ino, nlink, now, txn))
    }

    /// The transaction that removes entry `name` (of inode `ino`, at revision `drev`) from
    /// `parent`, both inodes staged.
    fn unlink_txn(
        &self,
        mut stage: Stage,
        parent: u64,
        name: &[u8],
        (ino, drev): (u64, Revision),
        now: i64,
    ) -> FsResult<Txn> {
        let mut txn = Txn::default();
        self.touch_dir(&mut txn, parent, now);
        let dkey = self.keys.dirent(parent, name);
        txn.cmp(dkey.clone(), drev);
        txn.del(dkey);
        self.drop_link(&mut stage, &mut txn, ino, now)?;
        stage.into_txn(self, &mut txn);
        Ok(txn)
    }

    /// What an unlink of `parent`/`name` reads, from the watch cache, when it has all of it and
    /// it describes the plain case: `parent` a directory, `name` a non-directory present in it.
    fn cached_unlink_inputs(&self, parent: u64, name: &[u8]) -> Option<CachedUnlink> {
        let (prec, prev) = self.cached_inode_to_compare(parent)?;
        if prec.kind != FileKind::Dir {
            return None;
        }
        let (entry, child) = self.cached_file_entry(parent, name, true)?;
        Some(CachedUnlink {
            parent: (prec, prev),
            entry,
            child,
        })
    }

    /// Removes an empty directory.
    pub async fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        check_name(name)?;
        self.settle_names(parent, Some(name)).await;
        let mut attempt = 0;
        loop {
            let mut stage = Stage::default();
            let mut txn = Txn::default();
            let now = now_ns();
            let entry = self.stage_dir_and_entry(&mut stage, parent, name).await?;
            if let Some((d, _)) = &entry {
                // Files created early in it must be there to make it not empty.
                self.settle_names(d.ino, None).await;
            }
            let p = self.load_dir(&mut stage, parent).await?;
            p.mtime_ns = now;
            p.ctime_ns = now;
            p.nlink = p.nlink.saturating_sub(1).max(2);
            self.touch_dir(&mut txn, parent, now);
            let dkey = self.keys.dirent(parent, name);
            let (d, drev) = entry.ok_or(FsError::NotFound)?;
            if d.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            stage.load(self, d.ino).await?;
            if !self.dir_is_empty(d.ino).await? {
                return Err(FsError::NotEmpty);
            }
            // Entries are added without rewriting the directory's inode, so the emptiness
            // seen above is re-checked by etcd at commit.
            self.cmp_dir_empty(&mut txn, d.ino);
            txn.cmp(dkey.clone(), drev);
            txn.del(dkey);
            // Its claim, if any (a blind delete: nobody else can hold it).
            txn.del(self.keys.claim(d.ino));
            self.drop_link(&mut stage, &mut txn, d.ino, now)?;
            stage.into_txn(self, &mut txn);
            if self.commit(txn).await? {
                self.drop_claim(d.ino);
                return Ok(());
            }
            self.backoff(&mut attempt).await?;
        }
    }

    /// Adds the name `newname` in `newparent` for `ino` (not a directory).
    pub async fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        check_name(newname)?;
        self.settle_ino(ino).await?;
        self.settle_names(newparent, Some(newname)).await;
        let mut attempt = 0;
        loop {
            let mut stage = Stage::default();
            let mut txn = Txn::default();
            let now = now_ns();
            let rec = stage.load(self, ino).await?;
            if rec.kind == FileKind::Dir {
                return Err(FsError::NotPermitted("hard link to a directory"));
            }
            if rec.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if rec.nlink >= MAX_LINKS {
                return Err(FsError::TooManyLinks);
            }
            rec.nlink += 1;
            rec.ctime_ns = now;
            self.look_dir(&mut stage, newparent).await?;
            self.touch_dir(&mut txn, newparent, now);
            let dkey = self.keys.dirent(newparent, newname);
            if self.kv.get(&dkey).await?.is_some() {
                return Err(FsError::Exists);
            }
            let kind = stage.peek(ino)?.kind;
            txn.cmp(dkey.clone(), 0);
            self.cmp_unclaimed(&mut txn, newparent);
            txn.put(dkey, encode(&DirentRec { ino, kind }));
            let attr = self.local_attr(ino, stage.peek(ino)?);
            stage.into_txn(self, &mut txn);
            if self.commit(txn).await? {
                return Ok(attr);
            }
            self.clear_claim(newparent).await?;
            self.backoff(&mut attempt).await?;
        }
    }

    /// Walks from `from` up to the root; true if `target` is `from` or one of its ancestors.
    /// Every inode read is staged, so the answer is part of the transaction's snapshot.
    async fn is_ancestor(&self, stage: &mut Stage, target: u64, from: u64) -> FsResult<bool> {
        let mut cur = from;
        for _ in 0..4096 {
            if cur == target {
                return Ok(true);
            }
            if cur == ROOT_INO {
                return Ok(false);
            }
            let rec = stage.look(self, cur).await?;
            if rec.kind != FileKind::Dir || rec.parent == 0 {
                return Err(FsError::Corrupt(format!("directory {cur} has no parent")));
            }
            cur = rec.parent;
        }
        Err(FsError::Corrupt("directory tree too deep or cyclic".into()))
    }

    /// rename / renameat2 with POSIX replacement rules (checked in the kernel's order).
    pub async fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        check_name(name)?;
        check_name(newname)?;
        if flags.noreplace && flags.exchange {
            return Err(FsError::Invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
        }
        self.settle_names(parent, Some(name)).await;
        self.settle_names(newparent, Some(newname)).await;
        let mut attempt = 0;
        loop {
            let mut stage = Stage::default();
            let mut txn = Txn::default();
            let now = now_ns();
            self.load_dir(&mut stage, parent).await?;
            self.load_dir(&mut stage, newparent).await?;
            let skey = self.keys.dirent(parent, name);
            let dkey = self.keys.dirent(newparent, newname);
            let (sd, sdrev) = self
                .get_dirent(parent, name)
                .await?
                .ok_or(FsError::NotFound)?;
            let dst = self.get_dirent(newparent, newname).await?;
            txn.cmp(skey.clone(), sdrev);
            txn.cmp(dkey.clone(), dst.as_ref().map_or(0, |(_, r)| *r));
            let new_name = dst.is_none();
            if flags.noreplace && dst.is_some() {
                return Err(FsError::Exists);
            }
            if flags.exchange && dst.is_none() {
                return Err(FsError::NotFound);
            }
            if parent != newparent {
                if sd.kind == FileKind::Dir
                    && self.is_ancestor(&mut stage, sd.ino, newparent).await?
                {
                    return Err(FsError::Invalid("rename of a directory into itself"));
                }
                if let Some((dd, _)) = &dst {
                    if dd.kind == FileKind::Dir
                        && self.is_ancestor(&mut stage, dd.ino, parent).await?
                    {
                        return Err(if flags.exchange {
                            FsError::Invalid("exchange with an ancestor")
                        } else {
                            FsError::NotEmpty
                        });
                    }
                }
            }
            if let Some((dd, _)) = &dst {
                if dd.ino == sd.ino {
                    return Ok(());
                }
            }
            stage.load(self, sd.ino).await?.ctime_ns = now;
            match dst {
                Some((dd, _)) if flags.exchange => {
                    stage.load(self, dd.ino).await?.ctime_ns = now;
                    txn.put(skey, encode(&dd));
                    txn.put(dkey, encode(&sd));
                    if parent != newparent {
                        if sd.kind == FileKind::Dir {
                            stage.get(sd.ino)?.parent = newparent;
                            let p = stage.get(parent)?;
                            p.nlink = p.nlink.saturating_sub(1);
                            stage.get(newparent)?.nlink += 1;
                        }
                        if dd.kind == FileKind::Dir {
                            stage.get(dd.ino)?.parent = parent;
                            let np = stage.get(newparent)?;
                            np.nlink = np.nlink.saturating_sub(1);
                            stage.get(parent)?.nlink += 1;
                        }
                    }
                }
                dst => {
                    if let Some((dd, _)) = dst {
                        if sd.kind == FileKind::Dir && dd.kind != FileKind::Dir {
                            return Err(FsError::NotDir);
                        }
                        if sd.kind != FileKind::Dir && dd.kind == FileKind::Dir {
                            return Err(FsError::IsDir);
                        }
                        stage.load(self, dd.ino).await?;
                        if dd.kind == FileKind::Dir {
                            // Files created early in it must be there to make it not empty
                            // (as for rmdir).
                            self.settle_names(dd.ino, None).await;
                            if !self.dir_is_empty(dd.ino).await? {
                                return Err(FsError::NotEmpty);
                            }
                            self.cmp_dir_empty(&mut txn, dd.ino);
                            let np = stage.get(newparent)?;
                            np.nlink = np.nlink.saturating_sub(1);
                        }
                        self.drop_link(&mut stage, &mut txn, dd.ino, now)?;
                    }
                    txn.del(skey);
                    txn.put(dkey, encode(&sd));
                    if sd.kind == FileKind::Dir && parent != newparent {
                        stage.get(sd.ino)?.parent = newparent;
                        let p = stage.get(parent)?;
                        p.nlink = p.nlink.saturating_sub(1);
                        stage.get(newparent)?.nlink += 1;
                    }
                }
            }
            for p in [parent, newparent] {
                let rec = stage.get(p)?;
                rec.mtime_ns = now;
                rec.ctime_ns = now;
                rec.nlink = rec.nlink.max(2);
                self.touch_dir(&mut txn, p, now);
            }
            // Ancestors walked only for the loop check are compared, not rewritten; a very deep
            // tree could exceed the compare limit, so drop the farthest ones if needed.
            stage.into_txn(self, &mut txn);
            while txn.compares.len() > self.opts.max_txn_ops {
                let Some(k) = txn
                    .compares
                    .keys()
                    .find(|k| !txn.ops.contains_key(*k))
                    .cloned()
                else {
                    break;
                };
                txn.compares.remove(&k);
            }
            if new_name {
                self.cmp_unclaimed(&mut txn, newparent);
            }
            if self.commit(txn).await? {
                return Ok(());
            }
            if new_name {
                self.clear_claim(newparent).await?;
            }
            self.backoff(&mut attempt).await?;
        }
    }

    /// One page of `dir`'s entries after `cookie` (0, or anything below 16, = from the start).
    /// At most about `limit` entries (entries whose names share a hash are never split).
    pub async fn readdir(&self, dir: u64, cookie: u64, limit: usize) -> FsResult<Vec<DirEntry>> {
        self.settle_names(dir, None).await;
        // An inode's kind never changes, so any cached value of it tells; only without one is
        // it read (one round trip fewer per listing; a directory removed meanwhile lists empty,
        // as on a local filesystem, instead of failing).
        let kind = match self.cached_inode_to_compare(dir) {
            Some((rec, _)) => rec.kind,
            None => self.get_inode(dir).await?.0.kind,
        };
        if kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if cookie >= (1 << 62) - 1 {
            return Ok(Vec::new());
        }
        let limit = limit.clamp(1, 4096);
        let dir_prefix = self.keys.dir(dir);
        let end = prefix_end(&dir_prefix);
        let start = if cookie < 16 {
            dir_prefix.clone()
        } else {
            self.keys.dirent_hash(dir, cookie + 1)
        };
        let page = self.kv.range(&start, &end, limit).await?;
        let mut entries = page.entries;
        if page.more {
            if let Some(last) = entries.last() {
                let (h, _) = self.keys.parse_dirent(dir, &last.key)?;
                let mut from = last.key.clone();
                from.push(0);
                let group_end = prefix_end(&self.keys.dirent_hash(dir, h));
                let rest = self.kv.range(&from, &group_end, 0).await?;
                entries.extend(rest.entries);
            }
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let (cookie, name) = self.keys.parse_dirent(dir, &e.key)?;
            let d: DirentRec = decode(&e.key, &e.value)?;
            out.push(DirEntry {
                name: name.to_vec(),
                ino: d.ino,
                kind: d.kind,
                cookie,
            });
        }
        Ok(out)
    }

    /// The attributes of entries [`Fs::readdir`] listed, for readdirplus (the kernel then needs
    /// no lookup per name): from the watch cache where a getattr would answer from it (see
    /// [`Fs::getattr`]), the rest from etcd, one round trip per 32 entries. An entry whose
    /// inode vanished meanwhile (a concurrent unlink) gets `None`.
    pub async fn entry_attrs(&self, entries: &[DirEntry]) -> FsResult<Vec<Option<Attr>>> {
        let mut out: Vec<Option<Attr>> = Vec::with_capacity(entries.len());
        // The cache answers what a getattr would take from it; only the rest is read.
        let mut missing = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let cached = if self.opts.cached_lookups {
                self.cached_entry_attr(e.ino, e.kind)
            } else {
                None
            };
            match cached {
                Some(attr) => out.push(Some(attr)),
                None => {
                    out.push(None);
                    missing.push(i);
                }
            }
        }
        for batch in missing.chunks(32) {
            // Each entry's inode and, for directories, its times: one round trip.
            let mut keys: Vec<Vec<u8>> = Vec::with_capacity(batch.len() * 2);
            for &i in batch {
                keys.push(self.keys.inode(entries[i].ino));
                keys.push(self.keys.dir_times(entries[i].ino));
            }
            let got = self.kv.get_many(&keys).await?;
            let mut got = got.into_iter();
            for &i in batch {
                let e = &entries[i];
                let (inode, times) = (got.next().flatten(), got.next().flatten());
                let attr = match inode {
                    Some((v, _)) => {
                        let rec = decode_inode(&self.keys.inode(e.ino), &v)?;
                        let rec = self.with_dir_times(
                            e.ino,
                            rec,
                            times.as_ref().map(|(t, _)| t.as_slice()),
                        )?;
                        Some(self.local_attr(e.ino, &rec))
                    }
                    None => None,
                };
                out[i] = attr;
            }
        }
        Ok(out)
    }

    /// chmod / chown / truncate / utimens. A size change runs first (it may take several
    /// transactions for a huge shrink), then the other attributes in one transaction.
    pub async fn setattr(&self, ino: u64, sa: SetAttr) -> FsResult<Attr> {
        self.settle_ino(ino).await?;
        if let Some(size) = sa.size {
            self.truncate(ino, size).await?;
        }
        if sa.mode.is_none()
            && sa.uid.is_none()
            && sa.gid.is_none()
            && sa.atime.is_none()
            && sa.mtime.is_none()
        {
            return self.getattr(ino).await;
        }
        let mut attempt = 0;
        loop {
            let keys = [self.keys.inode(ino), self.keys.dir_times(ino)];
            let mut got = self.kv.get_many(&keys).await?.into_iter();
            let (inode, times) = (got.next().flatten(), got.next().flatten());
            let (mut rec, rev) = match inode {
                Some((v, rev)) => (decode_inode(&keys[0], &v)?, rev),
                None => return Err(FsError::NotFound),
            };
            let now = now_ns();
            if let Some(m) = sa.mode {
                rec.mode = m & 0o7777;
            }
            if let Some(u) = sa.uid {
                rec.uid = u;
            }
            if let Some(g) = sa.gid {
                rec.gid = g;
            }
            let t = |ts: TimeSet| match ts {
                TimeSet::Now => now,
                TimeSet::Ns(n) => n,
            };
            if let Some(a) = sa.atime {
                rec.atime_ns = t(a);
            }
            if let Some(m) = sa.mtime {
                rec.mtime_ns = t(m);
            }
            rec.ctime_ns = now;
            let key = self.keys.inode(ino);
            let mut txn = Txn::default();
            txn.cmp(key.clone(), rev);
            txn.put(key, encode(&rec));
            let shown = if rec.kind == FileKind::Dir && sa.mtime.is_some() {
                // A directory's times live in t/<ino>: set them there.
                txn.put(
                    keys[1].clone(),
                    encode(&DirTimesRec {
                        mtime_ns: rec.mtime_ns,
                        ctime_ns: now,
                    }),
                );
                rec.clone()
            } else {
                self.with_dir_times(ino, rec.clone(), times.as_ref().map(|(t, _)| t.as_slice()))?
            };
            if self.commit(txn).await? {
                return Ok(self.local_attr(ino, &shown));
            }
            self.backoff(&mut attempt).await?;
        }
    }

    // ----- xattrs ---------------------------------------------------------------------------

    pub async fn get_xattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        check_xattr_name(name)?;
        if self.knows_xattr_free(ino) {
            return Err(FsError::NoData);
        }
        self.settle_ino(ino).await?;
        // The attribute, the inode and whether it has any xattr at all, in one round trip: a
        // miss (the common answer: most files have no xattrs, and `ls -l` asks for ACLs) must
        // still tell ENODATA from ENOENT, and a file with none is then known to have none.
        let keys = [self.keys.xattr(ino, name), self.keys.inode(ino)];
        let prefix = self.keys.xattrs(ino);
        let (got, any) = self
            .kv
            .get_many_and_range(&keys, &prefix, &prefix_end(&prefix), 1)
            .await?;
        let mut got = got.into_iter();
        match (got.next().flatten(), got.next().flatten()) {
            (Some((v, _)), _) => decode_raw(&keys[0], &v),
            (None, Some((_, rev))) => {
                if any.entries.is_empty() {
                    self.note_xattr_free_at(ino, rev);
                }
                Err(FsError::NoData)
            }
            (None, None) => Err(FsError::NotFound),
        }
    }

    pub async fn set_xattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        how: XattrSet,
    ) -> FsResult<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        self.settle_ino(ino).await?;
        // Before the transaction: whatever its outcome, the inode may have xattrs now.
        self.xattrs_may_exist(ino);
        let key = self.keys.xattr(ino, name);
        let mut attempt = 0;
        loop {
            let (mut rec, rev) = self.get_inode(ino).await?;
            let cur = self.kv.get(&key).await?;
            match (how, &cur) {
                (XattrSet::Create, Some(_)) => return Err(FsError::Exists),
                (XattrSet::Replace, None) => return Err(FsError::NoData),
                _ => {}
            }
            rec.ctime_ns = now_ns();
            let mut txn = Txn::default();
            txn.cmp(self.keys.inode(ino), rev);
            txn.cmp(key.clone(), cur.map_or(0, |(_, r)| r));
            txn.put(self.keys.inode(ino), encode(&rec));
            txn.put(key.clone(), encode_raw(value));
            if self.commit(txn).await? {
                return Ok(());
            }
            self.backoff(&mut attempt).await?;
        }
    }

    /// Names of `ino`'s xattrs, in key order.
    pub async fn list_xattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        if self.knows_xattr_free(ino) {
            return Ok(Vec::new());
        }
        self.settle_ino(ino).await?;
        self.get_inode(ino).await?;
        let prefix = self.keys.xattrs(ino);
        let end = prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut out = Vec::new();
        loop {
            let page = self.kv.range(&start, &end, 256).await?;
            for e in &page.entries {
                match e.key.strip_prefix(prefix.as_slice()) {
                    Some(n) if !n.is_empty() => out.push(n.to_vec()),
                    _ => return Err(FsError::Corrupt("bad xattr key".into())),
                }
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

    /// `listxattr`'s buffer: every name followed by a NUL.
    pub fn xattr_list_bytes(names: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(n);
            out.push(0);
        }
        out
    }

    pub async fn remove_xattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        check_xattr_name(name)?;
        self.settle_ino(ino).await?;
        let key = self.keys.xattr(ino, name);
        let mut attempt = 0;
        loop {
            let (mut rec, rev) = self.get_inode(ino).await?;
            let Some((_, xrev)) = self.kv.get(&key).await? else {
                return Err(FsError::NoData);
            };
            rec.ctime_ns = now_ns();
            let mut txn = Txn::default();
            txn.cmp(self.keys.inode(ino), rev);
            txn.cmp(key.clone(), xrev);
            txn.put(self.keys.inode(ino), encode(&rec));
            txn.del(key.clone());
            if self.commit(txn).await? {
                return Ok(());
            }
            self.backoff(&mut attempt).await?;
        }
    }

    // ----- orphans --------------------------------------------------------------------------

    /// Deletes an orphaned inode: its chunk map and xattrs in bounded batches, then the inode
    /// and its orphan record together. Does nothing to an inode that still has links.
    pub async fn purge(&self, ino: u64) -> FsResult<()> {
        self.xattrs_may_exist(ino);
        let batch = self.opts.max_txn_ops.saturating_sub(2).max(1);
        let mut attempt = 0;
        loop {
            let Some((rec, rev)) = self.get_inode_opt(ino).await? else {
                let mut txn = Txn::default();
                txn.del(self.keys.orphan(ino));
                self.commit(txn).await?;
                return Ok(());
            };
            if rec.nlink > 0 {
                let mut txn = Txn::default();
                txn.del(self.keys.orphan(ino));
                self.commit(txn).await?;
                return Ok(());
            }
            // Chunk refs and xattrs of an unreachable inode: dropping them only turns blocks
            // into garbage, so these batches need no compares.
            for prefix in [self.keys.chunks(ino), self.keys.xattrs(ino)] {
                let end = prefix_end(&prefix);
                loop {
                    let page = self.kv.range(&prefix, &end, batch).await?;
                    if page.entries.is_empty() {
                        break;
                    }
                    let mut txn = Txn::default();
                    for e in page.entries {
                        txn.del(e.key);
                    }
                    self.commit(txn).await?;
                }
            }
            let mut txn = Txn::default();
            txn.cmp(self.keys.inode(ino), rev);
            txn.del(self.keys.inode(ino));
            txn.del(self.keys.orphan(ino));
            if rec.kind == FileKind::File {
                txn.usage = -bytes_i64(rec.size);
            }
            if self.commit(txn).await? {
                return Ok(());
            }
            self.backoff(&mut attempt).await?;
        }
    }

    /// Inode numbers with an orphan record, and the instance keeping each alive (0 = none).
    pub async fn list_orphans(&self) -> FsResult<Vec<(u64, u64)>> {
        let prefix = self.keys.orphans();
        let end = prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut out = Vec::new();
        loop {
            let page = self.kv.range(&start, &end, 256).await?;
            for e in &page.entries {
                let ino = self.keys.parse_orphan(&e.key)?;
                let rec: OrphanRec = decode(&e.key, &e.value)?;
                out.push((ino, rec.owner));
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

    /// Purges orphans nobody keeps open: owner 0, this instance (when not open here), or an
    /// owner listed in `dead_owners` (instances known to be gone, e.g. expired sessions).
    /// Returns how many were purged.
    pub async fn purge_orphans(&self, dead_owners: &[u64]) -> FsResult<usize> {
        let mut n = 0;
        for (ino, owner) in self.list_orphans().await? {
            let ours = owner == self.instance && !self.is_open_locally(ino);
            if owner == 0 || ours || dead_owners.contains(&owner) {
                self.purge(ino).await?;
                n += 1;
            }
        }
        Ok(n)
    }
}
