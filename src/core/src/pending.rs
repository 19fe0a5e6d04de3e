//! Pending content: the first flush of a file created early (see `early.rs`) stores its blocks
//! while the transaction that creates the file with them commits, instead of before it. That
//! takes one of the two round trips of a new file's `close` off its latency (bench/RESULTS.md:
//! the WordPress copy 5.3 → 4.4 s, upload-like files 352 → 390 files/s on a dev cluster).
//!
//! Promise 2 forbids a committed reference to a block that is not durable, and a writer that
//! died before its puts finished would leave one. So the transaction also writes `p/<ino>`
//! (a [`PendingRec`]: which chunks' blocks were in flight, and the writer's instance and
//! session) and, under the writer's lease, `s/<instance>/<session>`. The rules:
//!
//! - The writer's `close` succeeds only when its puts and the transaction both succeeded and
//!   its session certainly lived until then ([`MetaKv::session`] unchanged): its lease, and the
//!   `s/` key under it, outlived the puts.
//! - While `s/…` exists, only the writer settles `p/<ino>`: after a successful `close` it
//!   deletes it (in the background, batched); when its puts failed it withdraws the chunks
//!   itself and flushes again the ordinary way (blocks first), whose failure `close` reports.
//! - Once `s/…` is gone (the lease expired: the writer can acknowledge nothing more), anyone
//!   may settle it: every block of the record present on a live node → the content stays;
//!   any absent from all of them → every chunk of the record is withdrawn and the file goes
//!   back to size 0 (a crashed first write leaves an empty file, as a crash between the
//!   create and the write would; never part of the content).
//! - A reader (or another mount's read-modify-write or truncate) that finds a block missing
//!   looks for `p/<ino>`: none → the block is lost (EIO,
//!   as ever); a live writer → it waits for the put in flight and tries again, for at most
//!   [`PENDING_WAIT`]; a dead one → it settles as above and reads again.
//! - Repair and fsck count a missing block of a file with `p/<ino>` as in flight, not lost.
//!
//! A reader may thus read a block that the writer then withdraws because it could not store
//! its other copy: as a read racing any write before its `close`, it sees content that the
//! file does not keep (SEMANTICS.md).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;

use crate::blocks::BlockError;
use crate::error::{FsError, FsResult};
use crate::fs::{now_ns, Fs, Sleeper, Txn};
use crate::kv::{KvError, MetaKv, Revision, TxnOp};
use crate::schema::{decode, encode, ChunkRec, Keys, PendingRec};
use crate::usage::bytes_i64;
use crate::BlockHash;

/// How long a reader waits for a live writer's block in flight before it reports EIO. A put
/// that cannot reach a node gives up well within this (the client's request timeouts).
pub const PENDING_WAIT: Duration = Duration::from_secs(30);

/// Between a reader's checks of a writer's block in flight.
const PENDING_POLL: Duration = Duration::from_millis(20);

/// How long the background clear waits for more closes to join its transaction: the pending
/// records matter only to readers that find a block missing, so there is no hurry, and one
/// etcd commit per batch instead of per file keeps the cost of the overlap low.
const CLEAR_DELAY: Duration = Duration::from_millis(50);

/// Attempts of one batch of clears before it is left to readers and repair to settle.
const CLEAR_ATTEMPTS: u32 = 5;

/// Records of closes that succeeded, to delete in the background.
#[derive(Default)]
pub(crate) struct PendingClears {
    inos: Vec<u64>,
    draining: bool,
}

/// What a reader that found a block missing learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingState {
    /// The file has no content in flight: the block is lost.
    None,
    /// Its writer lives and its put may still land: read again.
    Waited,
    /// The writer is gone and the record was settled: read the file again.
    Settled,
}

impl Fs {
    /// For the transaction of a new file's first content, committed while some of the blocks
    /// of `chunks` (chunk index, block: every chunk it writes) are still being stored under
    /// `session`.
    pub(crate) fn mark_pending(
        &self,
        txn: &mut Txn,
        ino: u64,
        session: u64,
        chunks: &[(u64, BlockHash)],
    ) {
        let rec = PendingRec {
            instance: self.instance,
            session,
            blocks: chunks.iter().map(|(i, h)| (*i, h.to_hex())).collect(),
        };
        let key = self.keys.pending(ino);
        txn.cmp(key.clone(), 0);
        txn.put(key, encode(&rec));
        // Once per session: the key lives with the session's lease.
        if self.writer_alive_put.load(Ordering::Relaxed) != session.wrapping_add(1) {
            txn.put_owned(self.keys.writer_alive(self.instance, session), Vec::new());
        }
    }

    /// A transaction from [`Fs::mark_pending`] under `session` committed: its
    /// `s/<instance>/<session>` key exists until the session's lease ends.
    pub(crate) fn note_writer_alive(&self, session: u64) {
        self.writer_alive_put
            .store(session.wrapping_add(1), Ordering::Relaxed);
    }

    /// After a `close` whose pending content is durable: deletes `ino`'s record, batched in
    /// the background (at once without a spawner).
    pub(crate) async fn clear_pending(&self, ino: u64) {
        let Some(spawn) = self.opts.spawn.clone() else {
            let _ = clear_batch(&*self.kv, &self.keys, &[ino]).await;
            return;
        };
        let mut q = self
            .pending_clears
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        q.inos.push(ino);
        if q.draining {
            return;
        }
        q.draining = true;
        drop(q);
        let (kv, keys, queue) = (
            self.kv.clone(),
            self.keys.clone(),
            self.pending_clears.clone(),
        );
        let sleep = self.opts.sleep.clone();
        let budget = self.opts.max_txn_ops.max(1);
        spawn(async move { drain_clears(kv, keys, queue, sleep, budget).await }.boxed());
    }

    /// The writer's pending content could not be stored: withdraws its chunks (those still
    /// holding the blocks it put in flight), as anyone would once the writer is gone.
    pub(crate) async fn withdraw_own_pending(&self, ino: u64) -> FsResult<()> {
        let key = self.keys.pending(ino);
        let Some((v, rev)) = self.kv.get(&key).await? else {
            return Ok(());
        };
        let rec: PendingRec = decode(&key, &v)?;
        if rec.instance != self.instance {
            return Ok(());
        }
        let blocks = parse_blocks(&rec)?;
        self.withdraw(ino, &blocks, rev).await
    }

    /// The session changed between the pending commit and the end of its puts: someone may
    /// have settled the record since. `Ok` when the content is still the file's (and the
    /// record is now cleared), an error when it was withdrawn.
    pub(crate) async fn confirm_own_pending(
        &self,
        ino: u64,
        in_flight: &[(u64, BlockHash)],
    ) -> FsResult<()> {
        let key = self.keys.pending(ino);
        if let Some((_, rev)) = self.kv.get(&key).await? {
            if self.delete_record(ino, rev).await? {
                return Ok(());
            }
        }
        // Settled by someone else: kept only if every chunk still holds our block.
        for &(idx, hash) in in_flight {
            match self.get_chunk(ino, idx).await? {
                Some((c, _)) if c.hash()? == hash => {}
                _ => {
                    return Err(FsError::Block(BlockError::Other(
                        "the file's new content was withdrawn: this mount's session lapsed \
                         before its blocks were stored"
                            .into(),
                    )))
                }
            }
        }
        Ok(())
    }

    /// After a read found a block of `ino` missing: whether content is in flight, and if its
    /// writer is gone, settles it.
    pub(crate) async fn pending_state(&self, ino: u64) -> FsResult<PendingState> {
        let key = self.keys.pending(ino);
        let Some((v, rev)) = self.kv.get(&key).await? else {
            return Ok(PendingState::None);
        };
        let rec: PendingRec = decode(&key, &v)?;
        let alive = self.keys.writer_alive(rec.instance, rec.session);
        if self.kv.get(&alive).await?.is_some() {
            if let Some(sleep) = &self.opts.sleep {
                sleep(PENDING_POLL).await;
            }
            return Ok(PendingState::Waited);
        }
        let blocks = parse_blocks(&rec)?;
        let mut all_landed = true;
        for &(_, hash) in &blocks {
            match self.blocks.get(hash).await {
                Ok(_) => {}
                Err(BlockError::NotFound(_)) => {
                    all_landed = false;
                    break;
                }
                // A node that does not answer may hold it: undecided, the read fails.
                Err(e) => return Err(e.into()),
            }
        }
        if all_landed {
            self.delete_record(ino, rev).await?;
        } else {
            self.withdraw(ino, &blocks, rev).await?;
        }
        self.invalidate(ino);
        Ok(PendingState::Settled)
    }

    /// Runs `op` again while it fails on a missing block of `ino` whose content is in flight
    /// (see the module comment), for at most [`PENDING_WAIT`].
    pub(crate) async fn retry_while_pending<T, F, Fut>(&self, ino: u64, mut op: F) -> FsResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = FsResult<T>>,
    {
        let started = Instant::now();
        loop {
            match op().await {
                Err(FsError::Block(BlockError::NotFound(h))) => {
                    if !self.worth_another_try(ino, started).await? {
                        return Err(FsError::Block(BlockError::NotFound(h)));
                    }
                    self.invalidate(ino);
                }
                r => return r,
            }
        }
    }

    /// A block of `ino` was missing: true when it may be found (or the file read differently)
    /// on another try, because content is in flight and its writer lives (waited for a moment)
    /// or was just settled; false when the block is lost, or still missing [`PENDING_WAIT`]
    /// after `since`.
    async fn worth_another_try(&self, ino: u64, since: Instant) -> FsResult<bool> {
        if since.elapsed() >= PENDING_WAIT {
            return Ok(false);
        }
        Ok(match self.pending_state(ino).await? {
            PendingState::None => false,
            // Without a sleeper (the tests' executor) waiting would spin.
            PendingState::Waited => self.opts.sleep.is_some(),
            PendingState::Settled => true,
        })
    }

    /// A chunk's block for a read-modify-write: `None` when it is missing because another
    /// mount's put of it is in flight (waited for a moment) or was just settled, so the caller
    /// reads the file's chunk records again; an error when it is lost, or still missing
    /// [`PENDING_WAIT`] after `since`.
    pub(crate) async fn fetch_chunk_unless_pending(
        &self,
        ino: u64,
        rec: &ChunkRec,
        since: Instant,
    ) -> FsResult<Option<Bytes>> {
        match self.fetch_chunk(rec).await {
            Err(FsError::Block(BlockError::NotFound(h))) => {
                if self.worth_another_try(ino, since).await? {
                    Ok(None)
                } else {
                    Err(FsError::Block(BlockError::NotFound(h)))
                }
            }
            r => r.map(Some),
        }
    }

    /// Deletes `ino`'s pending record if it is still at revision `rev`: whether it was.
    async fn delete_record(&self, ino: u64, rev: Revision) -> FsResult<bool> {
        let key = self.keys.pending(ino);
        let mut txn = Txn::default();
        txn.cmp(key.clone(), rev);
        txn.del(key);
        self.commit(txn).await
    }

    /// Deletes the chunk records of `ino` that still hold the `blocks` of its pending record,
    /// and the record (at revision `rev`); a file left without chunks gets size 0. (Only a
    /// chunk another mount rewrote since survives, with the size.)
    async fn withdraw(&self, ino: u64, blocks: &[(u64, BlockHash)], rev: Revision) -> FsResult<()> {
        let pkey = self.keys.pending(ino);
        let mut attempt = 0;
        loop {
            let mut txn = Txn::default();
            txn.cmp(pkey.clone(), rev);
            txn.del(pkey.clone());
            // Deleted meanwhile: nothing references the blocks any more, only the record goes.
            if let Some((mut inode, irev)) = self.get_inode_opt(ino).await? {
                let mut withdrawn = Vec::new();
                for &(idx, hash) in blocks {
                    if let Some((c, crev)) = self.get_chunk(ino, idx).await? {
                        if c.hash()? == hash {
                            let ckey = self.keys.chunk(ino, idx);
                            txn.cmp(ckey.clone(), crev);
                            txn.del(ckey);
                            withdrawn.push(idx);
                        }
                    }
                }
                let remaining = self
                    .chunk_indices_from(ino, 0)
                    .await?
                    .into_iter()
                    .filter(|i| !withdrawn.contains(i))
                    .count();
                if remaining == 0 && inode.size != 0 {
                    txn.usage = bytes_i64(0).saturating_sub(bytes_i64(inode.size));
                    inode.size = 0;
                    let now = now_ns();
                    inode.mtime_ns = now;
                    inode.ctime_ns = now;
                    let ikey = self.keys.inode(ino);
                    txn.cmp(ikey.clone(), irev);
                    txn.put(ikey, encode(&inode));
                }
            }
            if self.commit(txn).await? {
                self.invalidate(ino);
                return Ok(());
            }
            // The record may have gone (settled by another) or the file changed: look again.
            match self.kv.get(&pkey).await? {
                Some((_, r)) if r == rev => self.backoff(&mut attempt).await?,
                _ => return Ok(()),
            }
        }
    }
}

fn parse_blocks(rec: &PendingRec) -> FsResult<Vec<(u64, BlockHash)>> {
    rec.blocks
        .iter()
        .map(|(i, h)| {
            h.parse()
                .map(|hash| (*i, hash))
                .map_err(|_| FsError::Corrupt(format!("pending record: bad block hash {h:?}")))
        })
        .collect()
}

/// Deletes the pending records of `inos` in one transaction. Each is its writer's own and
/// written once (inode numbers are never reused), so no compare is needed.
async fn clear_batch(kv: &dyn MetaKv, keys: &Keys, inos: &[u64]) -> Result<bool, KvError> {
    let ops = inos
        .iter()
        .map(|&ino| TxnOp::Delete {
            key: keys.pending(ino),
        })
        .collect();
    kv.txn(Vec::new(), ops).await
}

async fn drain_clears(
    kv: Arc<dyn MetaKv>,
    keys: Keys,
    queue: Arc<Mutex<PendingClears>>,
    sleep: Option<Sleeper>,
    budget: usize,
) {
    let mut failures = 0;
    loop {
        if let Some(sleep) = &sleep {
            sleep(CLEAR_DELAY).await;
        }
        let batch: Vec<u64> = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.inos.is_empty() {
                q.draining = false;
                return;
            }
            let n = q.inos.len().min(budget);
            q.inos.drain(..n).collect()
        };
        if clear_batch(&*kv, &keys, &batch).await.is_err() {
            failures += 1;
            if failures < CLEAR_ATTEMPTS {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                q.inos.extend(batch);
            }
            // Beyond: the records stay; a reader that finds a block missing, or repair,
            // settles them once this mount's session is gone (the blocks are durable).
        } else {
            failures = 0;
        }
    }
}
