//! Early creates and unlinks, answered before their transactions commit.
//!
//! Early creates: a regular file created in a directory this instance holds the claim on
//! (see `claims.rs`) is answered at once. Its transaction waits (up to `MERGE_WINDOW`) for the
//! file's first flush, which stores the blocks and commits the create with the content in one
//! transaction (`Fs::take_early_create`); anything else here that needs the file or its name
//! first starts the create's own transaction (`Fs::hurry`) and waits for it, as does a flush
//! that finds it started. A W4-like upload (create, write, close) spent 0.75 ms of about
//! 4.4 ms waiting for the create's transaction before creates were answered early.
//!
//! Why the answer cannot turn out wrong: no other mount makes a name in a claimed directory
//! without recalling the claim first, and the recall (`Fs::release_claim`) waits for the
//! directory's early creates; the name was known absent (the directory's entries are cached
//! whole). So the transaction fails only if etcd fails it past every retry, or the claim's
//! lease lapsed meanwhile and another mount took the same name: then every later operation
//! on the file, its `close` included, fails with that error (EIO, or EEXIST).
//!
//! Until it commits, this instance makes every operation that could observe the difference
//! wait for it: any use of the inode but writes into the buffer and the xattr reads it can
//! answer itself (a new inode has none), and any use of the name or a listing of the
//! directory. Other mounts see the file when the transaction commits, before its `close`
//! returns, as close-to-open asks.
//!
//! Early unlinks (`Fs::unlink_early`): in such a directory, an unlink of a file with one link
//! that no handle here has open is answered at once and its transaction is committed in a
//! batch with others; until then every use of the name here waits for it, as above.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures::channel::oneshot;
use futures::future::{BoxFuture, Shared};
use futures::FutureExt;

use crate::error::{FsError, FsResult};
use crate::fs::{check_name, now_ns, Attr, Fs, NewNode, Txn, MAX_LINKS};
use crate::kv::KvError;
use crate::schema::{FileKind, InodeRec};
use std::time::Duration;

type Outcome = Shared<BoxFuture<'static, FsResult<()>>>;

/// Failures remembered for later operations (failed creates per inode, failed unlinks per
/// directory); beyond, the older ones are forgotten.
const FAILED_KEPT: usize = 10_000;

/// Most early unlinks waiting for their transaction; beyond, an unlink waits for its own.
const UNLINKS_QUEUED_MAX: usize = 256;

/// How long an early create waits for the file's first flush to take its transaction over
/// (one etcd commit for the create and the content); anything on this mount that waits for
/// the create starts it at once (`Fs::hurry`).
const MERGE_WINDOW: Duration = Duration::from_millis(50);

/// What starts an early create's own transaction: `None` (or the sender dropped) starts it;
/// `Some` hands it to a flush, which reports the outcome through the receiver.
type StartCreate = oneshot::Sender<Option<oneshot::Receiver<FsResult<()>>>>;

/// An early create the file's first flush took over: the flush commits it with the file's
/// content and reports the outcome through `done` (dropped unsent, the create commits alone).
pub(crate) struct TakenCreate {
    pub parent: u64,
    pub name: Vec<u8>,
    pub node: NewNode,
    pub at: i64,
    pub done: oneshot::Sender<FsResult<()>>,
}

#[derive(Default)]
pub(crate) struct EarlyOps {
    pending: HashMap<u64, Pending>,
    failed: HashMap<u64, FsError>,
    /// Directories with early operations in flight: the newest time those will write as the
    /// directory's mtime and ctime, and how many are in flight. Its attributes show them at
    /// once (a `stat` after an unlink sees the times move) without waiting for the commit,
    /// which the kernel's permission check of the directory before every unlink would do.
    dir_times: HashMap<u64, (i64, usize)>,
    /// Directories an early unlink in failed since their last fsyncdir.
    failed_dirs: HashMap<u64, FsError>,
    /// Directories made early whose transaction has not finished: their records, for their
    /// attributes and for the early creates and mkdirs in them.
    dirs: HashMap<u64, InodeRec>,
    /// Directories with early mkdirs in flight: the link count they will have once those
    /// commit, and how many are in flight.
    dir_links: HashMap<u64, (u32, usize)>,
    /// Early unlinks not yet sent, in the order they were answered.
    unlinks: VecDeque<QueuedUnlink>,
    /// Whether a task is committing `unlinks` (one at a time, so batches stay in order).
    draining: bool,
}

struct Pending {
    parent: u64,
    name: Vec<u8>,
    /// An unlink: its name is gone, its inode is not; a failure is the directory's
    /// (fsyncdir's), not the inode's.
    removal: bool,
    outcome: Outcome,
    /// An early create whose transaction has not started yet; dropped, it starts.
    waiting: Option<WaitingCreate>,
}

/// An early create waiting for the file's first flush to take its transaction over.
struct WaitingCreate {
    start: StartCreate,
    /// What the create's transaction makes, and its time.
    node: NewNode,
    at: i64,
}

struct QueuedUnlink {
    parent: u64,
    name: Vec<u8>,
    ino: u64,
    txn: Txn,
    done: oneshot::Sender<FsResult<()>>,
}

impl EarlyOps {
    /// Whether an early create or unlink of `name` in `parent` is in flight.
    fn has_pending_name(&self, parent: u64, name: &[u8]) -> bool {
        self.pending
            .values()
            .any(|p| p.parent == parent && p.name == name)
    }
}

/// Remembers a failure, forgetting the older ones past [`FAILED_KEPT`].
fn keep_bounded(failures: &mut HashMap<u64, FsError>, key: u64, e: FsError) {
    if failures.len() >= FAILED_KEPT {
        failures.clear();
    }
    failures.insert(key, e);
}

impl Fs {
    fn early(&self) -> std::sync::MutexGuard<'_, EarlyOps> {
        self.early.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates regular file `name` in `parent` without waiting for its transaction, when that
    /// is safe (see the module comment): `None` when it is not, and the caller creates it the
    /// ordinary way.
    pub async fn create_early(
        self: &Arc<Self>,
        parent: u64,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Option<FsResult<Attr>> {
        let spawn = self.opts.spawn.clone()?;
        // The parent's record decides the new file's group and mode: only without
        // set-group-ID (checked there), so that the answer is what the transaction will write.
        self.early_parent(parent, name)?;
        let ino = match self.alloc_new_ino().await {
            Ok(ino) => ino,
            Err(e) => return Some(Err(e)),
        };
        let node = NewNode::file(perm, uid, gid);
        let now = now_ns();
        let attr = Attr::from_rec(ino, &self.new_inode_rec(&node, parent, perm, gid, now));
        let fs = self.clone();
        let name_owned = name.to_vec();
        let node_kept = node.clone();
        let (start, started) = oneshot::channel();
        let sleep = self.opts.sleep.clone();
        let outcome: Outcome = async move {
            // The file's first flush usually comes within a millisecond (cp, an upload) and
            // commits the create with the content; past the window, or when anything here
            // waits for it, the create commits on its own.
            let window = async move {
                match sleep {
                    Some(sleep) => sleep(MERGE_WINDOW).await,
                    None => futures::future::pending().await,
                }
            };
            let taken = match futures::future::select(started, window.boxed()).await {
                futures::future::Either::Left((Ok(Some(done)), _)) => Some(done),
                _ => None,
            };
            let made = match taken {
                Some(done) => match done.await {
                    Ok(made) => made,
                    // The flush gave up before reporting: the create on its own.
                    Err(_) => {
                        fs.make_in_settled(parent, &name_owned, node, ino, now)
                            .await
                    }
                },
                None => {
                    fs.make_in_settled(parent, &name_owned, node, ino, now)
                        .await
                }
            };
            fs.early_done(ino, parent, made.as_ref().err().cloned());
            made
        }
        .boxed()
        .shared();
        // Registered before it can run, so that it is never done before it is known.
        let mut early = self.early();
        Self::dir_touched(&mut early, parent, now);
        early.pending.insert(
            ino,
            Pending {
                parent,
                name: name.to_vec(),
                removal: false,
                outcome: outcome.clone(),
                waiting: Some(WaitingCreate {
                    start,
                    node: node_kept,
                    at: now,
                }),
            },
        );
        drop(early);
        spawn(outcome.map(|_| ()).boxed());
        Some(Ok(attr))
    }

    /// Where an early create or mkdir of `name` in `parent` may be answered at once: a
    /// directory this instance holds the claim on (made early, or committed and cached
    /// whole), `name` known absent and not in flight, no set-group-ID. The parent's record.
    fn early_parent(&self, parent: u64, name: &[u8]) -> Option<InodeRec> {
        if !self.opts.cached_lookups || check_name(name).is_err() || !self.holds_claim(parent) {
            return None;
        }
        let dkey = self.keys.dirent(parent, name);
        let made_early = self.early().dirs.get(&parent).cloned();
        let p = match made_early {
            // Its names are the ones made early in it (checked below) and, once it
            // committed, the ones written through to the cache.
            Some(rec) => {
                if self.kv.cached(&dkey).is_some() {
                    return None;
                }
                rec
            }
            None => {
                if !self.kv.cached_absent(&dkey, &self.keys.dir(parent)) {
                    return None;
                }
                self.cached_inode_to_compare(parent)?.0
            }
        };
        // A removed directory (no links) takes no new names: the slow path says ENOENT.
        if p.kind != FileKind::Dir || p.nlink == 0 || p.mode & libc::S_ISGID != 0 {
            return None;
        }
        if self.early().has_pending_name(parent, name) {
            return None;
        }
        Some(p)
    }

    /// The transaction of an early create or mkdir: once its parent, if made early too,
    /// committed (its failure is this one's).
    pub(crate) async fn make_in_settled(
        &self,
        parent: u64,
        name: &[u8],
        node: NewNode,
        ino: u64,
        at: i64,
    ) -> FsResult<()> {
        self.settle_ino(parent).await?;
        self.make_node_as(parent, name, node, ino, Some(at))
            .await
            .map(|_| ())
    }

    /// Makes directory `name` in `parent` without waiting for its transaction, when that is
    /// safe (as for [`Fs::create_early`]): `None` when it is not, and the caller makes it the
    /// ordinary way. The new directory is claimed at once (its transaction claims it), so
    /// that what `cp -r` or `tar x` makes in it is answered early too; the transactions of
    /// those wait for this one. A copy of the WordPress tree made 258 directories at about
    /// 0.7 ms each, one at a time, before this.
    pub async fn mkdir_early(
        self: &Arc<Self>,
        parent: u64,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Option<FsResult<Attr>> {
        let spawn = self.opts.spawn.clone()?;
        let p = self.early_parent(parent, name)?;
        let session = self.kv.session()?;
        let links = self.pending_dir_links(parent).unwrap_or(0).max(p.nlink);
        if links >= MAX_LINKS || !self.room_for_claim() {
            return None;
        }
        let ino = match self.alloc_new_ino().await {
            Ok(ino) => ino,
            Err(e) => return Some(Err(e)),
        };
        let node = NewNode::dir(perm, uid, gid);
        let now = now_ns();
        let rec = self.new_inode_rec(&node, parent, perm, gid, now);
        let attr = Attr::from_rec(ino, &rec);
        let fs = self.clone();
        let name_owned = name.to_vec();
        let outcome: Outcome = async move {
            let made = fs
                .make_in_settled(parent, &name_owned, node, ino, now)
                .await;
            if made.is_err() {
                // Its claim was never made, or may have been: never answered from.
                fs.note_claim(ino, None);
            }
            fs.early_dir_done(ino, parent, made.as_ref().err().cloned());
            made
        }
        .boxed()
        .shared();
        let mut early = self.early();
        Self::dir_touched(&mut early, parent, now);
        let entry = early.dir_links.entry(parent).or_insert((links, 0));
        entry.0 = entry.0.max(links) + 1;
        entry.1 += 1;
        early.dirs.insert(ino, rec);
        early.pending.insert(
            ino,
            Pending {
                parent,
                name: name.to_vec(),
                removal: false,
                outcome: outcome.clone(),
                waiting: None,
            },
        );
        // Claimed before anything can be made in it; the transaction writes the claim.
        self.note_claim(ino, Some(session));
        drop(early);
        spawn(outcome.map(|_| ()).boxed());
        Some(Ok(attr))
    }

    fn early_dir_done(&self, ino: u64, parent: u64, failed: Option<FsError>) {
        let mut early = self.early();
        early.dirs.remove(&ino);
        if let Some(entry) = early.dir_links.get_mut(&parent) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                early.dir_links.remove(&parent);
            }
        }
        drop(early);
        self.early_done(ino, parent, failed);
    }

    /// The record of directory `ino` when it was made early and its transaction has not
    /// finished.
    pub(crate) fn early_dir(&self, ino: u64) -> Option<InodeRec> {
        self.early().dirs.get(&ino).cloned()
    }

    /// The link count directory `dir` takes once its early mkdirs commit, if any are in
    /// flight.
    pub(crate) fn pending_dir_links(&self, dir: u64) -> Option<u32> {
        self.early().dir_links.get(&dir).map(|(n, _)| *n)
    }

    /// Unlinks `name` in `parent` without waiting for its transaction, when that is safe: a
    /// directory this instance holds the claim on, and the plain case the watch cache can
    /// answer whole (a file with one link that no handle here has open). The transaction
    /// joins a batch: one etcd commit removes many names (`rm -r`, a cache purge). `false`
    /// when it is not safe, and the caller unlinks the ordinary way.
    ///
    /// Why the answer cannot turn out wrong: no other mount makes a name in the directory
    /// without recalling the claim, and the recall waits for the directory's early unlinks; a
    /// batch that fails (another mount changed the inode through a handle it has open, or
    /// removed the name first) is redone one unlink at a time, reading etcd.
    pub fn unlink_early(self: &Arc<Self>, parent: u64, name: &[u8]) -> bool {
        let Some(spawn) = self.opts.spawn.clone() else {
            return false;
        };
        if !self.opts.cached_lookups || check_name(name).is_err() || !self.holds_claim(parent) {
            return false;
        }
        let Some((ino, nlink, at, txn)) = self.cached_unlink_txn(parent, name) else {
            return false;
        };
        if nlink != 1 || self.is_open_locally(ino) {
            return false;
        }
        let (done, answer) = oneshot::channel();
        let outcome: Outcome = async move {
            answer.await.unwrap_or_else(|_| {
                Err(FsError::Kv(KvError::Unavailable(
                    "an early unlink was dropped before it committed".into(),
                )))
            })
        }
        .boxed()
        .shared();
        let mut early = self.early();
        if early.unlinks.len() >= UNLINKS_QUEUED_MAX
            || early.pending.contains_key(&ino)
            || early.has_pending_name(parent, name)
        {
            return false;
        }
        early.pending.insert(
            ino,
            Pending {
                parent,
                name: name.to_vec(),
                removal: true,
                outcome,
                waiting: None,
            },
        );
        Self::dir_touched(&mut early, parent, at);
        early.unlinks.push_back(QueuedUnlink {
            parent,
            name: name.to_vec(),
            ino,
            txn,
            done,
        });
        if !early.draining {
            early.draining = true;
            drop(early);
            let fs = self.clone();
            spawn(async move { fs.commit_early_unlinks().await }.boxed());
        }
        true
    }

    /// Commits the queued early unlinks, as many per transaction as fit, until none is left.
    /// A batch etcd refuses is redone one unlink at a time, reading etcd: a name another mount
    /// removed first is gone as the application was told.
    async fn commit_early_unlinks(self: Arc<Self>) {
        let budget = self.opts.max_txn_ops.saturating_sub(2).max(1);
        loop {
            let mut together = Txn::default();
            let mut batch = Vec::new();
            {
                let mut early = self.early();
                while let Some(next) = early.unlinks.pop_front() {
                    if !batch.is_empty() && together.weight() + next.txn.weight() > budget {
                        early.unlinks.push_front(next);
                        break;
                    }
                    together.absorb(next.txn);
                    batch.push((next.parent, next.name, next.ino, next.done));
                }
                if batch.is_empty() {
                    early.draining = false;
                    return;
                }
            }
            let committed = matches!(self.commit(together).await, Ok(true));
            for (parent, name, ino, done) in batch {
                let result = if committed {
                    Ok(())
                } else {
                    match self.unlink_now(parent, &name, Some(ino)).await {
                        Err(FsError::NotFound) => Ok(()),
                        other => other,
                    }
                };
                let mut early = self.early();
                early.pending.remove(&ino);
                Self::dir_settled(&mut early, parent);
                if let Err(e) = &result {
                    // The name is still there: the directory's next fsyncdir says so (its
                    // first failure).
                    if !early.failed_dirs.contains_key(&parent) {
                        keep_bounded(&mut early.failed_dirs, parent, e.clone());
                    }
                }
                drop(early);
                let _ = done.send(result);
            }
        }
    }

    /// An early operation in `dir` answered, whose transaction writes `at` as its times.
    fn dir_touched(early: &mut EarlyOps, dir: u64, at: i64) {
        let entry = early.dir_times.entry(dir).or_insert((at, 0));
        entry.0 = entry.0.max(at);
        entry.1 += 1;
    }

    /// An early operation in `dir` finished, committed or not.
    fn dir_settled(early: &mut EarlyOps, dir: u64) {
        if let Some(entry) = early.dir_times.get_mut(&dir) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                early.dir_times.remove(&dir);
            }
        }
    }

    /// The times directory `dir` takes once its early operations commit, if any are in flight.
    pub(crate) fn pending_dir_time(&self, dir: u64) -> Option<i64> {
        self.early().dir_times.get(&dir).map(|(at, _)| *at)
    }

    fn early_done(&self, ino: u64, parent: u64, failed: Option<FsError>) {
        let mut early = self.early();
        early.pending.remove(&ino);
        Self::dir_settled(&mut early, parent);
        if let Some(e) = failed {
            self.xattrs_may_exist(ino);
            keep_bounded(&mut early.failed, ino, e);
        }
    }

    /// Whether `ino` was created early and its transaction has not finished.
    pub(crate) fn is_early(&self, ino: u64) -> bool {
        self.early().pending.get(&ino).is_some_and(|p| !p.removal)
    }

    /// The early create of `ino`, if its transaction has not started: the caller (the file's
    /// first flush) commits it with its own changes and must report through `done`.
    pub(crate) fn take_early_create(&self, ino: u64) -> Option<TakenCreate> {
        let mut early = self.early();
        let p = early.pending.get_mut(&ino)?;
        let waiting = p.waiting.take()?;
        let (done, report) = oneshot::channel();
        // The create's task has already gone its own way if this fails (its window closed).
        waiting.start.send(Some(report)).ok()?;
        Some(TakenCreate {
            parent: p.parent,
            name: p.name.clone(),
            node: waiting.node,
            at: waiting.at,
            done,
        })
    }

    /// Starts the transactions of the early creates `which` selects that are still waiting
    /// for a flush to take them over: someone here waits for them.
    fn hurry(early: &mut EarlyOps, which: impl Fn(&Pending) -> bool) {
        for p in early.pending.values_mut().filter(|p| which(p)) {
            // Dropping the sender starts it.
            p.waiting = None;
        }
    }

    /// Waits until inode `ino`, if created or unlinked early, is committed; its error if its
    /// create failed.
    pub(crate) async fn settle_ino(&self, ino: u64) -> FsResult<()> {
        let (outcome, removal) = {
            let mut early = self.early();
            if let Some(e) = early.failed.get(&ino) {
                return Err(e.clone());
            }
            let Some(p) = early.pending.get_mut(&ino) else {
                return Ok(());
            };
            p.waiting = None;
            (p.outcome.clone(), p.removal)
        };
        let settled = outcome.await;
        if removal {
            return Ok(());
        }
        settled
    }

    /// Waits for the early creates and unlinks of `name` in `parent` (of every name with
    /// `None`). Their failures are not this caller's: the name simply is as etcd has it.
    /// A directory made early is waited for first: anything but a lookup or an early create
    /// in it needs it in etcd.
    pub(crate) async fn settle_names(&self, parent: u64, name: Option<&[u8]>) {
        if self.early_dir(parent).is_some() {
            let _ = self.settle_ino(parent).await;
        }
        self.settle_names_only(parent, name).await;
    }

    /// [`Fs::settle_names`] without waiting for the directory itself.
    pub(crate) async fn settle_names_only(&self, parent: u64, name: Option<&[u8]>) {
        let outcomes =
            self.early_outcomes(|p| p.parent == parent && name.is_none_or(|n| p.name == n));
        let _ = first_failure(outcomes).await;
    }

    /// fsyncdir: waits until the early creates and unlinks in `dir` committed; the first
    /// failure among them (a name the application made is not there, or one it removed is).
    pub async fn sync_dir(&self, dir: u64) -> FsResult<()> {
        let settled = first_failure(self.early_outcomes(|p| p.parent == dir)).await;
        let unlink_failed = self.early().failed_dirs.remove(&dir);
        settled.and(unlink_failed.map_or(Ok(()), Err))
    }

    /// Waits for every early create and unlink (unmount).
    pub async fn settle_all_early(&self) {
        let _ = first_failure(self.early_outcomes(|_| true)).await;
    }

    /// The outcomes of the pending early operations `which` selects.
    fn early_outcomes(&self, which: impl Fn(&Pending) -> bool) -> Vec<Outcome> {
        let mut early = self.early();
        Self::hurry(&mut early, &which);
        early
            .pending
            .values()
            .filter(|p| which(p))
            .map(|p| p.outcome.clone())
            .collect()
    }
}

/// Waits for all of `outcomes`; the first failure among them.
async fn first_failure(outcomes: Vec<Outcome>) -> FsResult<()> {
    let mut first = Ok(());
    for o in outcomes {
        if let Err(e) = o.await {
            first = first.and(Err(e));
        }
    }
    first
}
