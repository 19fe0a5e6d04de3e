//! The `fuser::Filesystem` implementation: translates kernel requests into calls on the core
//! ([`twinfs_core::Fs`]) and the core's answers into replies.
//!
//! Threading: fuser's worker threads (several, each with its own cloned `/dev/fuse` fd) read
//! requests. Metadata requests are spawned onto the tokio runtime and reply when done, so many
//! run at once. Writes run on the fuser thread itself (`Handle::block_on`): the kernel's data
//! buffer is copied once, into the file's chunk buffer, instead of into a per-request `Vec`.
//!
//! Kernel caches: attributes and entries are cached by the kernel for `attr_ttl`; changes made
//! by other nodes are pushed out of those caches by the etcd watch (`watch.rs`) well before
//! that. `open` re-reads the inode from etcd (close-to-open): when it changed since the kernel
//! was last told, the page cache is dropped and the kernel's attributes are invalidated before
//! the open returns, so the new size and data are seen even if the watch is late.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tokio::sync::RwLock;
use twinfs_cluster::metrics::{metrics, OpLabel};
use twinfs_core::{
    Attr, DirEntry, FileKind, FlockKind, Fs, FsError, OpenFile, SetAttr, TimeSet, XattrReply,
    XattrSet,
};

/// Largest write the kernel sends in one request (with FUSE_MAX_PAGES).
const MAX_WRITE: u32 = 1 << 20;
/// Kernel read-ahead window.
const MAX_READAHEAD: u32 = 1 << 20;
/// Chunks fetched ahead of a sequential reader.
const READ_AHEAD_CHUNKS: u64 = 4;
/// Entries read from etcd at a time for an open directory.
const READDIR_PAGE: usize = 512;
/// Entries whose attributes a readdirplus reply resolves at a time (from the watch cache, else
/// one etcd round trip); a reply holds ~25 (the kernel asks for one 4 KiB page at a time).
const READDIRPLUS_BATCH: usize = 32;

/// Capacity figures for `statfs`, supplied by the mount (live nodes' space or the quota).
#[derive(Clone, Copy, Debug, Default)]
pub struct SpaceInfo {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

pub type SpaceFn = Arc<dyn Fn() -> SpaceInfo + Send + Sync>;

/// Counters of one mount, for logs and metrics.
#[derive(Debug, Default)]
pub struct MountStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// One open file: the core's handle plus the adapter's read-ahead state.
struct Handle_ {
    ino: u64,
    file: RwLock<Option<OpenFile>>,
    /// End offset of the last read, to recognise sequential access.
    last_read_end: AtomicU64,
    /// Chunk index last prefetched (+1; 0 = none).
    prefetched: AtomicU64,
}

/// The version (size, mtime) of an inode the kernel's cached pages may date from: what the
/// last open on this mount found, or what the kernel was first told.
#[derive(Debug, Clone, Copy)]
struct Told {
    size: u64,
    mtime_ns: i64,
    /// Another node changed the file's content since the kernel may have cached its pages. Set
    /// by the watch, cleared by the next open, which then drops the pages. Without it, a lookup
    /// answered with the new attributes between the watch's event and the kernel's page
    /// invalidation (which runs on another thread) made the next open keep stale pages (the
    /// first of two stale reads the overwrite test found with the watch-fed lookup cache on;
    /// the second is the read floor in `EtcdKv::cached`).
    pages_stale: bool,
}

/// One open directory: the page of entries last read from etcd and where the kernel is in it.
/// The kernel asks for a listing 4 KiB at a time (about 25 entries with attributes), each
/// request at the cookie of the last entry it got; reading etcd per request cost three range
/// reads per `getdents` (`tar` of the WordPress tree: 1,546 range reads for 258 directories).
/// A page is a snapshot: entries added or removed after it was read may or may not be listed
/// (as POSIX allows after `opendir`); `rewinddir` (offset 0) reads afresh. Attributes are not
/// kept here: readdirplus resolves them when it hands an entry out.
#[derive(Default)]
struct DirStream {
    /// Entries after cookie `from`, in cookie order, as read from etcd.
    page: Vec<DirEntry>,
    from: u64,
    /// `page` was read at all.
    read: bool,
    /// `page` reached the end of the directory.
    last: bool,
    /// Index in `page` of the next entry to hand out, and the offset the kernel passes for it
    /// (the cookie of the entry handed out before it): exact even when two names share a
    /// cookie (a 64-bit name-hash collision).
    next: usize,
    next_offset: u64,
}

impl DirStream {
    /// Positions the stream at the entry after `offset`, reading etcd only when the page does
    /// not hold it (offset 0: a new listing; otherwise a seek outside the page).
    async fn seek(&mut self, fs: &Fs, dir: u64, offset: u64) -> Result<(), FsError> {
        if self.read && offset != 0 {
            if offset == self.next_offset {
                return Ok(());
            }
            // After "." and ".." (cookies 1 and 2), with a page read from the beginning.
            if offset < 16 && self.from < 16 {
                self.next = 0;
                self.next_offset = offset;
                return Ok(());
            }
            if offset >= self.from && self.page.last().is_some_and(|l| offset < l.cookie) {
                if let Some(i) = self.page.iter().position(|e| e.cookie > offset) {
                    self.next = i;
                    self.next_offset = offset;
                    return Ok(());
                }
            }
        }
        self.fetch(fs, dir, offset).await
    }

    async fn fetch(&mut self, fs: &Fs, dir: u64, after: u64) -> Result<(), FsError> {
        let page = fs.readdir(dir, after, READDIR_PAGE).await?;
        self.last = page.len() < READDIR_PAGE;
        self.page = page;
        self.from = after;
        self.read = true;
        self.next = 0;
        self.next_offset = after;
        Ok(())
    }

    /// The entries not handed out yet from the current page.
    fn rest(&self) -> &[DirEntry] {
        self.page.get(self.next..).unwrap_or(&[])
    }

    /// `n` more entries of `rest()` went into a reply.
    fn handed(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.next = (self.next + n).min(self.page.len());
        if let Some(e) = self.page.get(self.next - 1) {
            self.next_offset = e.cookie;
        }
    }

    /// Reads the page after the current one; false at the end of the directory.
    async fn next_page(&mut self, fs: &Fs, dir: u64) -> Result<bool, FsError> {
        if self.last {
            return Ok(false);
        }
        let after = self.page.last().map_or(self.from, |e| e.cookie);
        self.fetch(fs, dir, after).await?;
        Ok(!self.page.is_empty())
    }
}

/// State shared by the fuser threads, the tokio tasks and the watch.
pub struct Shared {
    pub fs: Arc<Fs>,
    pub attr_ttl: Duration,
    pub stats: MountStats,
    handles: Mutex<HashMap<u64, Arc<Handle_>>>,
    /// Open directories by handle (their own numbering; 0 is never used).
    dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirStream>>>>,
    next_dir_handle: AtomicU64,
    /// What the kernel was last handed about each inode, to decide at open time whether its
    /// cached pages of the file may be kept.
    told_kernel: Mutex<HashMap<u64, Told>>,
    notifier: OnceLock<Notifier>,
    space: SpaceFn,
}

impl Shared {
    pub fn new(fs: Arc<Fs>, attr_ttl: Duration, space: SpaceFn) -> Arc<Shared> {
        Arc::new(Shared {
            fs,
            attr_ttl,
            stats: MountStats::default(),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_dir_handle: AtomicU64::new(1),
            told_kernel: Mutex::new(HashMap::new()),
            notifier: OnceLock::new(),
            space,
        })
    }

    /// Set once the session exists (the notifier comes from it).
    pub fn set_notifier(&self, n: Notifier) {
        let _ = self.notifier.set(n);
    }

    pub fn notifier(&self) -> Option<&Notifier> {
        self.notifier.get()
    }

    /// The watch saw another node change `ino` (`data`: its size or mtime). Called before the
    /// new values reach any cache, so that whatever attributes are handed out afterwards, the
    /// next open does not keep pages the kernel cached before the change.
    pub fn changed_elsewhere(&self, ino: u64, data: bool) {
        let mut told = self.told_kernel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = told.get_mut(&ino) {
            t.pages_stale |= data;
        }
    }

    /// Inodes the kernel may hold cached attributes for.
    pub fn told_inodes(&self) -> Vec<u64> {
        self.told_kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    fn told(&self, a: &Attr) {
        // Only the first time: afterwards the entry keeps the version the kernel's pages were
        // opened at (set by `revalidate_for_open`). Handing out newer attributes (a lookup
        // answered from etcd before the watch's event arrived) does not make those pages
        // fresh; updating the entry here let the next open keep stale pages (round 57 of
        // the overwrite test in one CI run). Own writes change mtime too, so the next open
        // of an own-written file drops its pages: a re-read from the block cache, never stale.
        let mut told = self.told_kernel.lock().unwrap_or_else(|e| e.into_inner());
        told.entry(a.ino).or_insert(Told {
            size: a.size,
            mtime_ns: a.mtime_ns,
            pages_stale: false,
        });
    }

    /// An open handle of `ino` on this mount, if any.
    fn any_handle_of(&self, ino: u64) -> Option<Arc<Handle_>> {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|h| h.ino == ino)
            .cloned()
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<Handle_>> {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
    }

    /// The open directory `fh`, locked and positioned at the entry after `offset`. The lock is
    /// held across etcd reads: the kernel sends one request at a time per open directory, so
    /// nothing else waits on it.
    async fn dir_stream_at(
        &self,
        fh: FileHandle,
        dir: u64,
        offset: u64,
    ) -> Result<tokio::sync::OwnedMutexGuard<DirStream>, FsError> {
        // A handle we did not hand out (none should come) gets a stream of its own, which
        // reads etcd at every request, as a listing without opendir would.
        let stream: Arc<tokio::sync::Mutex<DirStream>> = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh.0)
            .cloned()
            .unwrap_or_default();
        let mut ds = stream.lock_owned().await;
        ds.seek(&self.fs, dir, offset).await?;
        Ok(ds)
    }

    fn add_handle(&self, f: OpenFile) -> u64 {
        let fh = f.fh();
        let h = Arc::new(Handle_ {
            ino: f.ino(),
            file: RwLock::new(Some(f)),
            last_read_end: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
        });
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, h);
        fh
    }

    /// Flushes the buffered writes of every handle of this mount on `ino` except `except`, so
    /// that what comes next (a read through another descriptor, a truncate) sees them and
    /// is ordered after them, as on a local filesystem. Cheap when there are none.
    async fn flush_inode(&self, ino: u64, except: Option<u64>) -> Result<(), FsError> {
        if !self.fs.has_unflushed_writes(ino, except) {
            return Ok(());
        }
        let others: Vec<Arc<Handle_>> = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(fh, h)| h.ino == ino && Some(**fh) != except)
            .map(|(_, h)| h.clone())
            .collect();
        for h in others {
            let mut g = h.file.write().await;
            if let Some(f) = g.as_mut() {
                self.fs.flush(f).await?;
            }
        }
        Ok(())
    }

    /// Flushes every open file (before an unmount). Returns how many failed.
    pub async fn flush_all(&self) -> usize {
        let all: Vec<Arc<Handle_>> = self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut failed = 0;
        for h in all {
            let mut g = h.file.write().await;
            if let Some(f) = g.as_mut() {
                if let Err(e) = self.fs.flush(f).await {
                    tracing::error!(ino = f.ino(), error = %e, "flush at unmount failed");
                    failed += 1;
                }
            }
        }
        // Files created early and never written still have to exist, and names unlinked
        // early still have to go.
        self.fs.settle_all_early().await;
        failed
    }

    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

tokio::task_local! {
    /// The FUSE operation a spawned request serves, so errors are counted under it.
    static CURRENT_OP: &'static str;
}

pub struct TwinFs {
    shared: Arc<Shared>,
    rt: Handle,
}

impl TwinFs {
    pub fn new(shared: Arc<Shared>, rt: Handle) -> TwinFs {
        TwinFs { shared, rt }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_nanos(ns.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
    }
}

fn time_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::Ns(time_ns(t)),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 1 << 20,
        flags: 0,
    }
}

impl TwinFs {
    fn entry(&self, reply: ReplyEntry, r: Result<Attr, FsError>) {
        match r {
            Ok(a) => {
                self.shared.told(&a);
                reply.entry(&self.shared.attr_ttl, &fattr(&a), Generation(0))
            }
            Err(e) => {
                self.count_err(&e);
                reply.error(errno(&e))
            }
        }
    }

    /// Lets go of the flock taken through handle `fh` of `ino`, if any (its last close).
    async fn release_flock(&self, ino: u64, fh: u64) {
        if let Err(e) = self.shared.fs.flock_release(ino, fh).await {
            // The lock key stays until this mount's session ends (its lease's TTL after
            // the mount stops or loses etcd).
            tracing::error!(ino, error = %e, "letting go of a flock failed");
        }
    }

    fn count_err(&self, e: &FsError) {
        // Answers applications expect in normal work are not errors of the mount.
        if !matches!(
            e,
            FsError::NotFound
                | FsError::NoData
                | FsError::Exists
                | FsError::WouldBlock
                | FsError::Interrupted
        ) {
            let op = CURRENT_OP.try_with(|op| *op).unwrap_or("write");
            metrics()
                .fuse_ops
                .errors
                .get_or_create(&OpLabel { op })
                .inc();
            self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            if matches!(e, FsError::Corrupt(_) | FsError::Kv(_) | FsError::Block(_)) {
                tracing::error!(error = %e, "request failed");
            }
        }
    }

    /// Runs one request's work, counted and timed as `op`: first on the thread that read the
    /// request, until it would wait, then on the runtime.
    ///
    /// Most requests are answered from caches without waiting (a lookup, a getattr, an early
    /// unlink): answered here, they cost no wake-up of a runtime worker and no switch to it,
    /// which was most of a cached request's cost (W5 unlinks: ~0.2 ms of CPU each, a third of
    /// it in the scheduler). A request that does wait goes to the runtime, which polls it
    /// again at once with its own waker: futures register the waker of their latest poll, so
    /// no wake-up is lost to the first poll's no-op one.
    fn spawn<F>(&self, op: &'static str, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let start = std::time::Instant::now();
        let mut work = Box::pin(CURRENT_OP.scope(op, async move {
            f.await;
            metrics().fuse_ops.record(op, start, true);
        }));
        // Tokio's timers and I/O need its context on this (non-runtime) thread.
        let _runtime = self.rt.enter();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        if std::future::Future::poll(work.as_mut(), &mut cx).is_pending() {
            self.rt.spawn(work);
        }
    }

    fn this(&self) -> TwinFs {
        TwinFs {
            shared: self.shared.clone(),
            rt: self.rt.clone(),
        }
    }
}

fn empty(this: &TwinFs, reply: ReplyEmpty, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => {
            this.count_err(&e);
            reply.error(errno(&e))
        }
    }
}

fn xattr(this: &TwinFs, reply: ReplyXattr, r: Result<XattrReply, FsError>) {
    match r {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => {
            this.count_err(&e);
            reply.error(errno(&e))
        }
    }
}

impl Filesystem for TwinFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_READAHEAD);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        for cap in [
            // Drop the page cache when a getattr shows a new mtime or size (another node wrote).
            InitFlags::FUSE_AUTO_INVAL_DATA,
            // Lookups and readdirs of one directory may run in parallel.
            InitFlags::FUSE_PARALLEL_DIROPS,
            // Listings carry attributes: `ls -l`, `tar`, `rsync` need no lookup per name.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
            // flock(2) requests come here (as setlk), to hold across mounts (the core's
            // flock.rs); fcntl record locks, not asked for, stay the kernel's, per mount.
            InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        let shared = self.shared.clone();
        let failed = self.rt.block_on(async move { shared.flush_all().await });
        if failed > 0 {
            tracing::error!(failed, "some open files could not be flushed at unmount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        self.spawn("lookup", async move {
            let r = this.shared.fs.lookup(parent.0, &name).await;
            this.entry(reply, r);
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let this = self.this();
        self.spawn("getattr", async move {
            let mut r = this.shared.fs.getattr(ino.0).await;
            if matches!(r, Err(FsError::NotFound)) {
                // A file another mount deleted while it is open here keeps, for `fstat`
                // through its descriptors, the attributes it was opened with (the kernel
                // sends fstat's getattr without the handle: any handle of the inode will do).
                let handle = fh
                    .and_then(|fh| this.shared.handle(fh))
                    .or_else(|| this.shared.any_handle_of(ino.0));
                if let Some(h) = handle {
                    if let Some(f) = h.file.read().await.as_ref() {
                        r = this.shared.fs.getattr_open(f).await;
                    }
                }
            }
            match r {
                Ok(a) => {
                    this.shared.told(&a);
                    reply.attr(&this.shared.attr_ttl, &fattr(&a))
                }
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let this = self.this();
        self.spawn("setattr", async move {
            // A truncate must not be undone by writes buffered before it (through this handle
            // or any other of this mount): flush them first, so the truncate applies on top.
            if size.is_some() {
                if let Err(e) = this.shared.flush_inode(ino.0, None).await {
                    this.count_err(&e);
                    return reply.error(errno(&e));
                }
            }
            let sa = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: atime.map(time_set),
                mtime: mtime.map(time_set),
            };
            match this.shared.fs.setattr(ino.0, sa).await {
                Ok(a) => {
                    this.shared.told(&a);
                    reply.attr(&this.shared.attr_ttl, &fattr(&a))
                }
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let this = self.this();
        self.spawn("readlink", async move {
            match this.shared.fs.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("mknod", async move {
            let r = this
                .shared
                .fs
                .mknod(parent.0, &name, mode, rdev, uid, gid)
                .await;
            this.entry(reply, r);
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("mkdir", async move {
            let fs = &this.shared.fs;
            // In a directory this mount holds the claim on, answered before the transaction
            // commits (see the core's early.rs).
            let r = match fs
                .mkdir_early(parent.0, &name, mode & 0o7777, uid, gid)
                .await
            {
                Some(made) => made,
                None => fs.mkdir(parent.0, &name, mode & 0o7777, uid, gid).await,
            };
            this.entry(reply, r);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        self.spawn("unlink", async move {
            let fs = &this.shared.fs;
            // In a directory this mount holds the claim on, answered before the transaction
            // commits, which joins a batch (see the core's early.rs).
            let r = if fs.unlink_early(parent.0, &name) {
                Ok(())
            } else {
                fs.unlink(parent.0, &name).await
            };
            empty(&this, reply, r);
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        self.spawn("rmdir", async move {
            let r = this.shared.fs.rmdir(parent.0, &name).await;
            empty(&this, reply, r);
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let this = self.this();
        let name = link_name.as_bytes().to_vec();
        let target = target.as_os_str().as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn("symlink", async move {
            let r = this
                .shared
                .fs
                .symlink(parent.0, &name, &target, uid, gid)
                .await;
            this.entry(reply, r);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        let newname = newname.as_bytes().to_vec();
        let bits = flags.bits();
        self.spawn("rename", async move {
            let r = async {
                let flags = twinfs_core::RenameFlags::from_bits(bits)?;
                this.shared
                    .fs
                    .rename(parent.0, &name, newparent.0, &newname, flags)
                    .await
            }
            .await;
            empty(&this, reply, r);
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let this = self.this();
        let newname = newname.as_bytes().to_vec();
        self.spawn("link", async move {
            let r = this.shared.fs.link(ino.0, newparent.0, &newname).await;
            this.entry(reply, r);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let this = self.this();
        // An open for reading is nearly always followed by a read of the start: let the
        // first block travel while `open_attr` reads the metadata.
        if flags.0 & libc::O_ACCMODE != libc::O_WRONLY && flags.0 & libc::O_TRUNC == 0 {
            this.shared.fs.prefetch_first_block(ino.0);
        }
        self.spawn("open", async move {
            let r = this
                .shared
                .fs
                .open_attr(ino.0)
                .await
                .map(|(f, attr)| (attr, f));
            match r {
                Ok((attr, f)) => {
                    let mut fopen = this.revalidate_for_open(&attr);
                    // A read-only handle never has data to flush, and POSIX locks are the
                    // kernel's own: its close needs no FLUSH round trip (tar, cp and web
                    // servers close every file they read).
                    if flags.0 & libc::O_ACCMODE == libc::O_RDONLY {
                        fopen |= FopenFlags::FOPEN_NOFLUSH;
                    }
                    let fh = this.shared.add_handle(f);
                    reply.opened(FileHandle(fh), fopen)
                }
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let this = self.this();
        self.spawn("read", async move {
            let Some(h) = this.shared.handle(fh) else {
                return reply.error(Errno::EBADF);
            };
            // Writes buffered through other descriptors of this mount must be visible.
            if let Err(e) = this.shared.flush_inode(h.ino, Some(fh.0)).await {
                this.count_err(&e);
                return reply.error(errno(&e));
            }
            let r = {
                let g = h.file.read().await;
                match g.as_ref() {
                    Some(f) => this.shared.fs.read(f, offset, size as usize).await,
                    None => return reply.error(Errno::EBADF),
                }
            };
            match r {
                Ok(data) => {
                    this.shared
                        .stats
                        .bytes_read
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    metrics().fuse_bytes_read.inc_by(data.len() as u64);
                    let end = offset + data.len() as u64;
                    let sequential = h.last_read_end.swap(end, Ordering::Relaxed) == offset;
                    reply.data(&data);
                    if sequential && !data.is_empty() {
                        this.read_ahead(&h, end);
                    }
                }
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let start = std::time::Instant::now();
        let Some(h) = self.shared.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        // On the fuser thread: `data` is borrowed from the request buffer and copied once,
        // into the chunk buffer.
        let r = self.rt.block_on(async {
            let mut g = h.file.write().await;
            match g.as_mut() {
                Some(f) => Some(self.shared.fs.write(f, offset, data).await),
                None => None,
            }
        });
        match r {
            None => reply.error(Errno::EBADF),
            Some(Ok(n)) => {
                self.shared
                    .stats
                    .bytes_written
                    .fetch_add(n as u64, Ordering::Relaxed);
                metrics().fuse_bytes_written.inc_by(n as u64);
                metrics().fuse_ops.record("write", start, true);
                reply.written(n as u32)
            }
            Some(Err(e)) => {
                self.count_err(&e);
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let this = self.this();
        self.spawn("flush", async move {
            let r = this.flush_handle(fh).await;
            empty(&this, reply, r);
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let this = self.this();
        self.spawn("release", async move {
            let h = this
                .shared
                .handles
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&fh.0);
            let Some(h) = h else {
                return reply.error(Errno::EBADF);
            };
            let f = h.file.write().await.take();
            let r = match f {
                Some(f) => this.shared.fs.release(f).await,
                None => Ok(()),
            };
            if let Err(e) = &r {
                tracing::error!(error = %e, "release failed (buffered data may be lost)");
            }
            // The last close of the open file: a flock taken through it goes too.
            this.release_flock(h.ino, fh.0).await;
            empty(&this, reply, r);
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let this = self.this();
        self.spawn("fsync", async move {
            let r = this.flush_handle(fh).await;
            empty(&this, reply, r);
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let this = self.this();
        self.spawn("opendir", async move {
            match this.shared.fs.getattr(ino.0).await {
                Ok(a) if a.kind == FileKind::Dir => {
                    let fh = this.shared.next_dir_handle.fetch_add(1, Ordering::Relaxed);
                    this.shared
                        .dirs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(fh, Default::default());
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Ok(_) => reply.error(Errno::ENOTDIR),
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let this = self.this();
        self.spawn("readdir", async move {
            // Cookies: "." is 1, ".." is 2, entries carry their name hash (≥ 16).
            if offset == 0 && reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            if offset <= 1 && reply.add(ino, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            let fs = &this.shared.fs;
            let mut ds = match this.shared.dir_stream_at(fh, ino.0, offset).await {
                Ok(ds) => ds,
                Err(e) => {
                    this.count_err(&e);
                    return reply.error(errno(&e));
                }
            };
            loop {
                let mut added = 0;
                let mut full = false;
                for e in ds.rest() {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), e.cookie, file_type(e.kind), name) {
                        full = true;
                        break;
                    }
                    added += 1;
                }
                fs.note_listed(ds.rest().iter().take(added).map(|e| e.ino), offset == 0);
                ds.handed(added);
                if full {
                    return reply.ok();
                }
                match ds.next_page(fs, ino.0).await {
                    Ok(true) => {}
                    Ok(false) => return reply.ok(),
                    Err(e) => {
                        this.count_err(&e);
                        return reply.error(errno(&e));
                    }
                }
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let this = self.this();
        self.spawn("readdirplus", async move {
            let ttl = this.shared.attr_ttl;
            if offset <= 1 {
                // "." and ".." carry the directory's own attributes (the kernel ignores them
                // for caching; they only need to be well-formed).
                let dir = match this.shared.fs.getattr(ino.0).await {
                    Ok(a) => a,
                    Err(e) => {
                        this.count_err(&e);
                        return reply.error(errno(&e));
                    }
                };
                if offset == 0 && reply.add(ino, 1, ".", &ttl, &fattr(&dir), Generation(0)) {
                    return reply.ok();
                }
                if reply.add(ino, 2, "..", &ttl, &fattr(&dir), Generation(0)) {
                    return reply.ok();
                }
            }
            let fs = &this.shared.fs;
            let mut ds = match this.shared.dir_stream_at(fh, ino.0, offset).await {
                Ok(ds) => ds,
                Err(e) => {
                    this.count_err(&e);
                    return reply.error(errno(&e));
                }
            };
            // Whether the entries handed out next begin the directory's listing.
            let mut starts = offset == 0;
            loop {
                let batch: Vec<DirEntry> =
                    ds.rest().iter().take(READDIRPLUS_BATCH).cloned().collect();
                if batch.is_empty() {
                    match ds.next_page(fs, ino.0).await {
                        Ok(true) => continue,
                        Ok(false) => return reply.ok(),
                        Err(e) => {
                            this.count_err(&e);
                            return reply.error(errno(&e));
                        }
                    }
                }
                // Resolved as they are handed out, never kept: the watch may have changed an
                // inode since the page was read.
                let attrs = match fs.entry_attrs(&batch).await {
                    Ok(a) => a,
                    Err(e) => {
                        this.count_err(&e);
                        return reply.error(errno(&e));
                    }
                };
                let mut added = 0;
                for (e, attr) in batch.iter().zip(attrs) {
                    // An entry whose inode vanished meanwhile (a concurrent unlink) is skipped.
                    if let Some(a) = attr {
                        let name = OsStr::from_bytes(&e.name);
                        if reply.add(
                            INodeNo(e.ino),
                            e.cookie,
                            name,
                            &ttl,
                            &fattr(&a),
                            Generation(0),
                        ) {
                            fs.note_listed(batch.iter().take(added).map(|e| e.ino), starts);
                            ds.handed(added);
                            return reply.ok();
                        }
                        this.shared.told(&a);
                    }
                    added += 1;
                }
                fs.note_listed(batch.iter().take(added).map(|e| e.ino), starts);
                starts = false;
                ds.handed(added);
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.shared
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    /// `flock(2)`: the kernel sends it as a lock of the whole file, owned by the open file
    /// (one handle here); only flock requests come, as the mount asks for no fcntl locks.
    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let kind = match typ {
            libc::F_RDLCK => Some(FlockKind::Shared),
            libc::F_WRLCK => Some(FlockKind::Exclusive),
            libc::F_UNLCK => None,
            _ => return reply.error(Errno::EINVAL),
        };
        let this = self.this();
        self.spawn("flock", async move {
            let interrupted = move || signal_pending(pid);
            let r = this
                .shared
                .fs
                .flock(ino.0, fh.0, kind, sleep, pid, &interrupted)
                .await;
            empty(&this, reply, r);
        });
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every namespace change is a committed etcd transaction when its request returns,
        // but for early creates and unlinks (see the core's early.rs): wait for those in this
        // directory.
        let this = self.this();
        self.spawn("fsyncdir", async move {
            match this.shared.fs.sync_dir(ino.0).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = (self.shared.space)();
        let bsize: u64 = 4096;
        let blocks = s.total_bytes / bsize;
        let bfree = (s.free_bytes / bsize).min(blocks);
        reply.statfs(
            blocks,
            bfree,
            bfree,
            1 << 40,
            1 << 40,
            bsize as u32,
            twinfs_core::NAME_MAX as u32,
            bsize as u32,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        let value = value.to_vec();
        self.spawn("setxattr", async move {
            let r = async {
                let how = XattrSet::from_flags(flags)?;
                this.shared.fs.set_xattr(ino.0, &name, &value, how).await
            }
            .await;
            empty(&this, reply, r);
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        self.spawn("getxattr", async move {
            let r = async {
                let v = this.shared.fs.get_xattr(ino.0, &name).await?;
                XattrReply::for_size(v, size)
            }
            .await;
            xattr(&this, reply, r);
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let this = self.this();
        self.spawn("listxattr", async move {
            let r = async {
                let names = this.shared.fs.list_xattr(ino.0).await?;
                XattrReply::for_size(Fs::xattr_list_bytes(&names), size)
            }
            .await;
            xattr(&this, reply, r);
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        self.spawn("removexattr", async move {
            let r = this.shared.fs.remove_xattr(ino.0, &name).await;
            empty(&this, reply, r);
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only answers whether
        // the inode exists.
        let this = self.this();
        self.spawn("access", async move {
            let r = this.shared.fs.getattr(ino.0).await.map(|_| ());
            empty(&this, reply, r);
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let this = self.this();
        let name = name.as_bytes().to_vec();
        let (uid, gid) = (req.uid(), req.gid());
        let exclusive = flags & libc::O_EXCL != 0;
        self.spawn("create", async move {
            let r = async {
                let fs = &this.shared.fs;
                // In a directory this mount holds the claim on, answered before the
                // transaction commits (see the core's early.rs).
                let early = fs
                    .create_early(parent.0, &name, mode & 0o7777, uid, gid)
                    .await;
                let (attr, created) = match early {
                    Some(made) => (made?, true),
                    None => {
                        fs.create(parent.0, &name, mode & 0o7777, uid, gid, exclusive)
                            .await?
                    }
                };
                let f = if created {
                    this.shared.fs.open_new(&attr)?
                } else {
                    this.shared.fs.open_created(&attr)?
                };
                Ok::<_, FsError>((attr, f))
            }
            .await;
            match r {
                Ok((attr, f)) => {
                    this.shared.told(&attr);
                    let fh = this.shared.add_handle(f);
                    reply.created(
                        &this.shared.attr_ttl,
                        &fattr(&attr),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::FOPEN_KEEP_CACHE,
                    )
                }
                Err(e) => {
                    this.count_err(&e);
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls: ENOTTY is what a regular file answers to terminal ioctls (Python's
        // open() asks TCGETS through isatty()), without a log line each time.
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let this = self.this();
        self.spawn("fallocate", async move {
            let r = async {
                if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
                    return Err(FsError::NotSupported("fallocate mode"));
                }
                if mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                    // Space is not reserved ahead in twinfs; nothing to do.
                    return Ok(());
                }
                let end = offset.checked_add(length).ok_or(FsError::FileTooBig)?;
                // Buffered writes first, so the size compared below is the real one.
                this.flush_handle(fh).await?;
                let a = this.shared.fs.getattr(ino.0).await?;
                if end > a.size {
                    let sa = SetAttr {
                        size: Some(end),
                        ..Default::default()
                    };
                    let a = this.shared.fs.setattr(ino.0, sa).await?;
                    this.shared.told(&a);
                    if let Some(n) = this.shared.notifier() {
                        let _ = n.inval_inode(INodeNo(ino.0), -1, 0);
                    }
                }
                Ok(())
            }
            .await;
            empty(&this, reply, r);
        });
    }
}

impl TwinFs {
    async fn flush_handle(&self, fh: FileHandle) -> Result<(), FsError> {
        let Some(h) = self.shared.handle(fh) else {
            return Ok(());
        };
        let mut g = h.file.write().await;
        match g.as_mut() {
            Some(f) => self.shared.fs.flush(f).await,
            None => Ok(()),
        }
    }

    /// Close-to-open: if the inode changed since the kernel was last told, make the kernel
    /// drop its cached attributes and pages before this open returns.
    fn revalidate_for_open(&self, fresh: &Attr) -> FopenFlags {
        let before = self
            .shared
            .told_kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                fresh.ino,
                Told {
                    size: fresh.size,
                    mtime_ns: fresh.mtime_ns,
                    pages_stale: false,
                },
            );
        match before {
            Some(b) if !b.pages_stale && (b.size, b.mtime_ns) == (fresh.size, fresh.mtime_ns) => {
                FopenFlags::FOPEN_KEEP_CACHE
            }
            _ => {
                if let Some(n) = self.shared.notifier() {
                    // Attributes only (offset -1): a quick call that takes no inode lock, so it
                    // is safe from inside a request. Without KEEP_CACHE the kernel drops the
                    // file's pages itself.
                    let _ = n.inval_inode(INodeNo(fresh.ino), -1, 0);
                }
                FopenFlags::empty()
            }
        }
    }

    /// After a sequential read ending at `end`, fetch the blocks of the next
    /// [`READ_AHEAD_CHUNKS`] chunks into the block cache, so the reader never waits for the
    /// network at a chunk boundary.
    fn read_ahead(&self, h: &Arc<Handle_>, end: u64) {
        let cs = self.shared.fs.chunk_size();
        let first = end / cs + 1;
        let last = first + READ_AHEAD_CHUNKS - 1;
        // `prefetched` holds one past the highest chunk already asked for.
        let prev = h.prefetched.fetch_max(last + 1, Ordering::Relaxed);
        if prev > last {
            return;
        }
        for idx in first.max(prev)..=last {
            let h = h.clone();
            let fs = self.shared.fs.clone();
            self.rt.spawn(async move {
                let g = h.file.read().await;
                if let Some(f) = g.as_ref() {
                    fs.prefetch(f, idx * cs).await;
                }
            });
        }
    }
}

/// Whether thread `tid` (a FUSE request's caller, as the kernel numbers it in this mount's PID
/// namespace) has a signal pending that it neither blocks nor ignores: the kernel would have
/// sent FUSE_INTERRUPT, which the FUSE library answers with ENOSYS, so a waiting `flock` looks
/// for itself. A caller not visible here (0, another PID namespace, gone) reads as not
/// signalled. Reading procfs does not touch a disk; it is safe on an async thread.
fn signal_pending(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return false;
    };
    let mask = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    pending & !mask("SigBlk:") & !mask("SigIgn:") != 0
}
