//! twinfs filesystem core: the POSIX namespace and data path of one volume, over two
//! abstractions — a metadata KV store shaped like etcd ([`MetaKv`]) and a content-addressed
//! block store ([`BlockIo`]). No FUSE, no network, no runtime: every method is an `async fn`
//! that only awaits those two traits, so the whole core runs under `futures::executor` in
//! tests, with [`MemKv`] and [`MemBlocks`].
//!
//! # Key schema
//!
//! Everything of volume `V` lives under the prefix `/twinfs/v/V/`. Numbers in keys are 16
//! lower-case hex digits (fixed width), so byte order is numeric order and range scans work.
//!
//! | key | value | |
//! |---|---|---|
//! | `m` | [`schema::VolumeRec`] | volume parameters fixed at format time (chunk size) |
//! | `n` | [`schema::CounterRec`] | next free inode number; an instance reserves `ino_batch` (1024) at a time with one CAS transaction |
//! | `i/<ino>` | [`schema::InodeRec`] | kind, mode, uid, gid, size, nlink, a/m/ctime (ns), rdev, parent (directories), symlink target |
//! | `d/<parent>/<hash>/<name>` | [`schema::DirentRec`] | one key per directory entry: child ino + kind |
//! | `c/<ino>/<index>` | [`schema::ChunkRec`] | chunk `index` of a file: block hash + length |
//! | `x/<ino>/<name>` | raw bytes | one key per extended attribute |
//! | `t/<ino>` | [`schema::DirTimesRec`] | a directory's mtime/ctime since its entries last changed, written without a compare (see below) |
//! | `o/<ino>` | [`schema::OrphanRec`] | inode with no links left whose data is still to be purged |
//! | `w/<dir>`, `r/<dir>` | instance id (8 bytes, big-endian) | a directory's claim by the mount that made it, and another mount's recall of it (see [`claims`]) |
//! | `p/<ino>` | [`schema::PendingRec`] | a new file's content committed while its blocks were still being stored (see `pending.rs`) |
//! | `s/<instance>/<session>` | empty | exists while that mount's session (its claim lease) lives |
//! | `f/<ino>/x/<instance><fh>`, `f/<ino>/s/<instance><fh>` | version byte + JSON (kind, pid) | an exclusive or shared `flock` lock held through handle `fh` of a mount, under its session lease (see [`flock`]) |
//! | `usage/base` | [`schema::UsageRec`] | folded usage total: bytes of regular files (see [`usage`]) |
//! | `usage/d/<instance>/<slot>` | [`schema::UsageRec`] | one instance's cumulative signed usage change, written only by it |
//!
//! * **Directory entries** carry `<hash>`, a 62-bit BLAKE3 hash of the name (≥ 16), between the
//!   parent and the name. A directory listing is a range scan of `d/<parent>/`, ordered by
//!   hash, and the hash *is* the readdir cookie: resuming after cookie `h` scans from
//!   `d/<parent>/<h+1>/`. Cookies therefore stay valid however the directory changes between
//!   calls (the kernel's `seekdir`/NFS requirement), without any per-directory counter. A page
//!   never splits names that share a hash. A lookup is a single `get` (the key is computed).
//! * **Chunks**: a file is cut into fixed-size chunks (`chunk_size`, 4 MiB by default, stored in
//!   `m`). A chunk's content is one immutable block; a missing chunk key reads as zeros (sparse
//!   files); a block shorter than the chunk is followed by zeros up to the file size.
//!   Invariant kept by every operation: no chunk holds bytes at or past the file size
//!   (`index * chunk_size + len <= size`), so growing a file never resurrects old bytes.
//! * **Directories** store their parent's inode number (a directory has exactly one), so the
//!   "move a directory under itself" check of rename is a walk up the parent chain.
//!
//! # Value encoding
//!
//! Structured values are one version byte (`1`) followed by JSON (serde). Xattr values are the
//! byte `0x81` followed by the raw value. Any other version byte, malformed JSON, a missing
//! field, an unknown enum tag, an undecodable block hash, a chunk length of 0 or past the chunk
//! size, or a symlink without a target is [`FsError::Corrupt`] → `EIO`, never a panic. JSON
//! keeps values inspectable with `etcdctl get`; the version byte lets a later release switch to
//! a binary encoding key by key.
//!
//! # Transaction rules
//!
//! * Every change is **one optimistic transaction**: each key read to decide the change is
//!   compared on its `mod_revision` (0 = must not exist), and the writes apply only if none
//!   changed. On a failed compare the whole operation is re-read and retried, at most
//!   `max_retries` (50) times with a back-off supplied by the runtime, then `EAGAIN`.
//! * A change to a directory's entries compares the directory's inode (it still exists, it is
//!   still a directory) and rewrites it only when the directory's link count changes (mkdir,
//!   rmdir, rename of a directory). Its mtime/ctime go to `t/<dir>` without a compare, so
//!   creates and unlinks of files in one directory from many nodes never conflict. Readers take
//!   a directory's mtime from `t/<dir>` when present, and its ctime as the later of both.
//!   "Is this directory empty" (rmdir, rename over a directory) is re-checked by the
//!   transaction itself: a range compare that no key exists under `d/<dir>/`.
//! * Likewise every change of a file's chunk map rewrites its inode (size/mtime), so a flush
//!   and a truncate on different nodes cannot interleave silently.
//! * Transactions stay small: at most `max_txn_ops` (64, under etcd's default 128) puts/deletes
//!   and as many compares, each value a few hundred bytes (xattr values ≤ 64 KiB), far below
//!   etcd's 1.5 MiB. A namespace operation touches at most ~6 keys. A flush touches the dirty
//!   chunks plus the inode; more dirty chunks than fit are committed in several transactions in
//!   ascending chunk order (with the default 64 MiB write buffer and 4 MiB chunks, one
//!   transaction). A shrinking truncate that drops more chunks than fit first deletes them
//!   top-down in steps, each step leaving a file consistently truncated to a chunk boundary.
//!   Purging an orphan deletes chunk keys in batches before the inode.
//! * **Blocks before references**: a flush puts every new block through [`BlockIo::put`]
//!   (durable on return) before the transaction that references it, so a crash leaves at worst
//!   an unreferenced block (collected later by the cluster's GC after a grace period), never a
//!   chunk pointing at a missing block.
//! * **Unlinked but open**: when the last link of an inode goes, the same transaction sets
//!   `nlink = 0` and writes `o/<ino>`. If no handle of this instance has it open, it is purged at
//!   once (chunks and xattrs in batches, then inode and orphan record together); otherwise at
//!   the last [`Fs::release`], or right after the transaction commits if that release came
//!   while it was in flight (decided under the lock that counts handles). Orphans left by a
//!   crash are purged by [`Fs::purge_orphans`].
//!   Limitation: open handles on *other* instances are not tracked (a session/lease registry
//!   would be needed); such a handle sees ENOENT after the purge.
//!
//! # Data path
//!
//! [`Fs::write`] buffers per chunk in the [`OpenFile`] (bounded by `max_dirty_bytes`, after
//! which it flushes by itself). [`Fs::flush`] stores each dirty chunk as a new block —
//! reading the old block and patching it when the chunk was only partly overwritten — and then
//! commits the chunk references with the new size and mtime. [`Fs::read`] reads committed
//! chunks overlaid with the handle's own unflushed writes (read-after-write on a handle), zeros
//! for holes, short at end of file. Close-to-open consistency across nodes follows: after
//! `flush` returns on one instance, any read on another sees the data.

#![forbid(unsafe_code)]

pub mod blocks;
pub mod claims;
mod data;
mod early;
pub mod error;
pub mod flock;
pub mod fs;
pub mod kv;
mod pending;
pub mod scan;
pub mod schema;
pub mod usage;

pub use blocks::{BlockError, BlockIo, CachedBlocks, MemBlocks};
pub use data::OpenFile;
pub use error::{FsError, FsResult};
pub use flock::FlockKind;
pub use fs::{
    Attr, DirEntry, Fs, FsOptions, RenameFlags, SetAttr, Sleeper, Spawner, TimeSet, XattrReply,
    XattrSet, DEFAULT_CHUNK_SIZE, MAX_FILE_SIZE, NAME_MAX, ROOT_INO,
};
pub use kv::{prefix_end, Compare, KvEntry, KvError, MemKv, MetaKv, RangePage, Revision, TxnOp};
pub use schema::FileKind;
pub use twinfs_cluster::BlockHash;
