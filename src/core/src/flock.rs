//! `flock(2)` locks that hold across mounts.
//!
//! A lock held through an open file is one etcd key, `f/<ino>/x/<instance><fh>` when exclusive
//! or `f/<ino>/s/<instance><fh>` when shared (the inode, this mount's instance and the handle:
//! `flock` locks belong to an open file description, which is one handle here), put under the
//! mount's session lease, so a mount that dies loses its locks within the lease's TTL and
//! nobody waits for it longer.
//!
//! Taking one is a single transaction, without reading first: it puts the handle's key of the
//! wanted kind (deleting its key of the other kind, for a conversion) if range compares find no
//! other holder that conflicts: no key at all in `f/<ino>/` but the handle's own for an
//! exclusive lock, no key in `f/<ino>/x/` but its own for a shared one. etcd evaluates the
//! compares and the writes atomically, so two takers can never both get conflicting locks, and
//! two shared takers both succeed. A failed compare means a conflicting holder: `LOCK_NB` gets
//! EWOULDBLOCK; a taker that waits sleeps until a holder of the inode lets go here or this
//! mount's watch sees one change elsewhere (`Fs::note_flock_change`), or at most
//! [`WAIT_POLL_MAX`], and tries again. Letting go deletes the handle's keys.
//!
//! As Linux does, changing a held lock's kind (shared to exclusive or back) first lets go of
//! the old one when the new one has to wait, so two holders converting at once cannot
//! deadlock. Locks go with the handle: at its release (the last close of the open file) it
//! lets go. POSIX record locks (`fcntl`) stay the kernel's own, per mount (SEMANTICS.md).

use std::collections::HashMap;
use std::time::Duration;

use futures::channel::oneshot;
use serde::{Deserialize, Serialize};

use crate::error::{FsError, FsResult};
use crate::fs::{Fs, Txn};
use crate::kv::prefix_end;
use crate::schema::encode;

/// Longest sleep of a waiting taker between two attempts when no change is seen (a safety net:
/// the watch normally wakes it when a holder goes), and so the longest a signal to the waiting
/// process goes unnoticed.
pub const WAIT_POLL_MAX: Duration = Duration::from_millis(200);

/// The kind of a `flock` lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlockKind {
    Shared,
    Exclusive,
}

/// The key right after `key` in etcd's byte order.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// The value of a lock key.
#[derive(Debug, Serialize, Deserialize)]
struct FlockRec {
    kind: FlockKind,
    /// The process that took it, on its node (for people reading etcd).
    pid: u32,
}

/// The locks this instance holds and the takers waiting for a change.
#[derive(Default)]
pub(crate) struct Flocks {
    /// (inode, handle) → the kind held.
    held: HashMap<(u64, u64), FlockKind>,
    /// inode → takers waiting for one of its holders to change.
    waiters: HashMap<u64, Vec<oneshot::Sender<()>>>,
}

impl Fs {
    fn flocks(&self) -> std::sync::MutexGuard<'_, Flocks> {
        self.flocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes (`Some(kind)`) or lets go of (`None`) the `flock` lock of handle `fh` on `ino`.
    /// A conflicting holder on any mount makes it wait when `wait`, else fail with
    /// [`FsError::WouldBlock`] (EWOULDBLOCK). A waiting taker gives up with
    /// [`FsError::Interrupted`] (EINTR) once `interrupted()` says its caller got a signal: the
    /// FUSE library answers the kernel's interrupt requests with ENOSYS, so without this a
    /// `flock -w 5` or a Ctrl-C would wait for the holder.
    pub async fn flock(
        &self,
        ino: u64,
        fh: u64,
        kind: Option<FlockKind>,
        wait: bool,
        pid: u32,
        interrupted: &(dyn Fn() -> bool + Sync),
    ) -> FsResult<()> {
        let Some(kind) = kind else {
            return self.flock_release(ino, fh).await;
        };
        if self.kv.has_sessions() && self.kv.session().is_none() {
            // A lock put now could not be tied to this mount's life: refuse rather than
            // leave one behind that nobody would ever let go of.
            return Err(FsError::NoLocks);
        }
        let exclusive = kind == FlockKind::Exclusive;
        let mine = self.keys.flock(ino, exclusive, self.instance, fh);
        let mine_other_kind = self.keys.flock(ino, !exclusive, self.instance, fh);
        // Where a conflicting holder's key would be: any lock for an exclusive taking, an
        // exclusive one for a shared taking; this handle's own keys are not conflicts.
        let conflicts = if exclusive {
            self.keys.flocks(ino)
        } else {
            self.keys.flocks_exclusive(ino)
        };
        let conflicts_end = prefix_end(&conflicts);
        let mut own = [mine.clone(), mine_other_kind.clone()];
        own.sort_unstable();
        let mut pause = Duration::from_millis(2);
        loop {
            // Registered before the attempt, so a change right after it is not missed.
            let woken = wait.then(|| {
                let (tx, rx) = oneshot::channel();
                let mut flocks = self.flocks();
                let list = flocks.waiters.entry(ino).or_default();
                // Takers that stopped waiting (took the lock, or gave up) leave their sender.
                list.retain(|tx| !tx.is_canceled());
                list.push(tx);
                rx
            });
            let mut txn = Txn::default();
            let mut from = conflicts.clone();
            for key in own
                .iter()
                .filter(|k| **k >= conflicts && **k < conflicts_end)
            {
                txn.cmp_empty(from, key.clone());
                from = successor(key);
            }
            txn.cmp_empty(from, conflicts_end.clone());
            txn.del(mine_other_kind.clone());
            txn.put_owned(mine.clone(), encode(&FlockRec { kind, pid }));
            if self.commit(txn).await? {
                self.flocks().held.insert((ino, fh), kind);
                return Ok(());
            }
            if self.kv.has_sessions() && self.kv.session().is_none() {
                // The transaction may have failed for the lapsed session, not a holder.
                return Err(FsError::NoLocks);
            }
            let Some(woken) = woken else {
                return Err(FsError::WouldBlock);
            };
            if interrupted() {
                return Err(FsError::Interrupted);
            }
            let held = self.flocks().held.get(&(ino, fh)).copied();
            if held.is_some_and(|h| h != kind) {
                // A conversion that must wait lets go of the old lock first (as Linux does),
                // so two holders converting at once do not wait for each other forever.
                self.flock_release(ino, fh).await?;
            }
            match &self.opts.sleep {
                Some(sleep) => {
                    futures::future::select(woken, sleep(pause)).await;
                }
                None => std::thread::yield_now(),
            }
            pause = (pause * 2).min(WAIT_POLL_MAX);
        }
    }

    /// Lets go of handle `fh`'s lock on `ino`, if it holds one: `LOCK_UN`, or the handle is
    /// closed for good. Kept as held until the delete committed: a failure leaves it for the
    /// handle's release to let go of again (and the mount's session bounds it in any case).
    pub async fn flock_release(&self, ino: u64, fh: u64) -> FsResult<()> {
        if !self.flocks().held.contains_key(&(ino, fh)) {
            return Ok(());
        }
        let mut txn = Txn::default();
        txn.del(self.keys.flock(ino, true, self.instance, fh));
        txn.del(self.keys.flock(ino, false, self.instance, fh));
        self.commit(txn).await?;
        self.flocks().held.remove(&(ino, fh));
        // Takers here need not wait for the watch to hear of it.
        self.wake_flock_waiters(ino);
        Ok(())
    }

    /// The mount's watch saw a lock key of another mount change (taken or let go): takers
    /// waiting on that inode read again.
    pub fn note_flock_change(&self, key: &[u8]) {
        if let Some(ino) = self.keys.parse_flock(key) {
            self.wake_flock_waiters(ino);
        }
    }

    fn wake_flock_waiters(&self, ino: u64) {
        let waiters = self.flocks().waiters.remove(&ino).unwrap_or_default();
        for w in waiters {
            let _ = w.send(());
        }
    }

    /// Locks this instance holds (for tests and diagnostics): (inode, handle, kind).
    pub fn flocks_held(&self) -> Vec<(u64, u64, FlockKind)> {
        let mut v: Vec<_> = self
            .flocks()
            .held
            .iter()
            .map(|(&(ino, fh), &k)| (ino, fh, k))
            .collect();
        v.sort_unstable_by_key(|&(ino, fh, _)| (ino, fh));
        v
    }
}
