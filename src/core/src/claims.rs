//! Directory claims: the mount that made a directory may answer "no such name" in it from its
//! own cache, which spares the etcd read the kernel's lookup of every new name costs before a
//! create, mkdir or symlink (`cp -r`, `tar x`, an upload directory of the month).
//!
//! A cache may only say "absent" if no other mount can have made the name: a name made through
//! mount B must be found through mount A as soon as B's call returns (SEMANTICS.md), and A's
//! watch may be a moment behind. So the mkdir that makes a directory also puts a claim key
//! (`w/<dir>`) under the mount's session (an etcd lease it keeps alive). While it holds the
//! claim, only it makes names in the directory: every other mount's create, mknod, mkdir,
//! symlink, link or rename into the directory compares the claim key absent in its
//! transaction. When that comparison fails, the other mount puts a recall key (`r/<dir>`) and
//! waits; the holder's watch sees the recall, the holder stops answering from its cache for
//! that directory, and only then deletes the claim. A holder that died loses its claims with
//! its lease (its TTL bounds the wait); one that cannot be sure its lease still lives
//! ([`MetaKv::session`] is `None`, or a new session started) answers nothing from claims.

use std::time::{Duration, Instant};

use crate::error::{FsError, FsResult};
use crate::fs::{Fs, Txn};
use crate::kv::{KvError, TxnOp};

/// Most directories one instance holds claims on; beyond, new directories are made unclaimed.
pub(crate) const CLAIMS_MAX: usize = 10_000;

/// How long a create waits for another mount's claim on its directory to go: at once when the
/// holder is alive (a watch event and one transaction), within the holder's lease TTL when it
/// died (see the mount's claim session).
pub const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// How often a waiting create repeats its recall.
const RECALL_REPEAT: Duration = Duration::from_secs(1);

/// A claim this instance may hold: under which session, if it is sure it made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    /// Made by a committed mkdir under this session number.
    Under(u64),
    /// Perhaps made (the mkdir's outcome is unknown): never used for an answer, but given
    /// up when recalled.
    Unsure,
}

impl Fs {
    fn own_claim_value(&self) -> Vec<u8> {
        self.instance.to_be_bytes().to_vec()
    }

    /// True while this instance holds `dir`'s claim under its current session: no other
    /// mount can make a name in `dir` until it gives the claim up.
    pub(crate) fn holds_claim(&self, dir: u64) -> bool {
        let session = self.kv.session();
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        match (claims.get(&dir), session) {
            (Some(Held::Under(s)), Some(now)) if *s == now => true,
            (Some(Held::Under(_)), _) => {
                // The session lapsed or was replaced: every claim made under it may be gone.
                claims.retain(|_, h| matches!(h, Held::Under(s) if Some(*s) == session));
                false
            }
            _ => false,
        }
    }

    /// For a mkdir of `ino`: the transaction also claims the new directory, when this
    /// instance has a session and room. Returns the session it is claimed under.
    pub(crate) fn claim_new_dir(&self, txn: &mut Txn, ino: u64) -> Option<u64> {
        let session = self.kv.session()?;
        {
            let claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
            // A directory made early is claimed already (answers were given on it): room
            // was made for it then.
            if !claims.contains_key(&ino) && claims.len() >= CLAIMS_MAX {
                return None;
            }
        }
        txn.put_owned(self.keys.claim(ino), self.own_claim_value());
        Some(session)
    }

    /// Whether this instance may claim one more directory.
    pub(crate) fn room_for_claim(&self) -> bool {
        self.claims.lock().unwrap_or_else(|e| e.into_inner()).len() < CLAIMS_MAX
    }

    /// The mkdir that claimed `dir` committed (`Some(session)`), or its outcome is unknown.
    pub(crate) fn note_claim(&self, dir: u64, committed_under: Option<u64>) {
        let held = committed_under.map_or(Held::Unsure, Held::Under);
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir, held);
    }

    /// A transaction that makes a name in `dir`: unless this instance holds the claim, it
    /// applies only while nobody does.
    pub(crate) fn cmp_unclaimed(&self, txn: &mut Txn, dir: u64) {
        if !self.holds_claim(dir) {
            txn.cmp(self.keys.claim(dir), 0);
        }
    }

    /// After a failed transaction that compared `dir` unclaimed: if another mount claims it,
    /// asks for the claim and waits until it is gone (the holder lets go at once; a dead
    /// holder's claim goes with its lease). A claim of this instance's own that it does not
    /// hold for answers (unknown outcome, older session) is simply deleted.
    pub(crate) async fn clear_claim(&self, dir: u64) -> FsResult<()> {
        if self.holds_claim(dir) {
            return Ok(());
        }
        let key = self.keys.claim(dir);
        let Some((holder, rev)) = self.kv.get(&key).await? else {
            return Ok(());
        };
        let recall = self.keys.recall(dir);
        if holder == self.own_claim_value() {
            self.claims
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&dir);
            self.kv
                .txn(
                    vec![crate::Compare::key(key.clone(), rev)],
                    vec![TxnOp::Delete { key }],
                )
                .await?;
            return Ok(());
        }
        let ask = || {
            self.kv.txn(
                Vec::new(),
                vec![TxnOp::Put {
                    key: recall.clone(),
                    value: self.own_claim_value(),
                }],
            )
        };
        ask().await?;
        let deadline = Instant::now() + CLAIM_WAIT;
        let mut asked = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if self.kv.get(&key).await?.is_none() {
                break;
            }
            // Asked again now and then: a holder whose watch restarted past a compaction
            // never saw the first request.
            if asked.elapsed() >= RECALL_REPEAT {
                ask().await?;
                asked = Instant::now();
            }
            if Instant::now() >= deadline {
                return Err(FsError::Kv(KvError::Unavailable(format!(
                    "directory {dir} is claimed by another mount that did not let go within {CLAIM_WAIT:?}"
                ))));
            }
            match &self.opts.sleep {
                Some(sleep) => sleep(pause).await,
                None => std::thread::yield_now(),
            }
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        // The holder deletes the recall with its claim; a dead holder leaves it behind.
        self.kv
            .txn(Vec::new(), vec![TxnOp::Delete { key: recall }])
            .await?;
        Ok(())
    }

    /// Another mount recalled `dir`'s claim (the mount's watch calls this): if the claim is
    /// this instance's, it stops answering from it, then deletes it (and the recall).
    pub async fn release_claim(&self, dir: u64) -> FsResult<()> {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dir);
        // No create or unlink in it is answered early from now on; those answered already
        // must commit before another mount may make names in it (see `early.rs`).
        self.settle_names(dir, None).await;
        // Read even when not held in memory: a claim made as a session ended, or by a mkdir
        // whose outcome was lost, is still this instance's to give up.
        let key = self.keys.claim(dir);
        if let Some((holder, rev)) = self.kv.get(&key).await? {
            if holder == self.own_claim_value() {
                self.kv
                    .txn(
                        vec![crate::Compare::key(key.clone(), rev)],
                        vec![
                            TxnOp::Delete { key },
                            TxnOp::Delete {
                                key: self.keys.recall(dir),
                            },
                        ],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Forgets `dir`'s claim (the directory is removed; its transaction deletes the key).
    pub(crate) fn drop_claim(&self, dir: u64) {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dir);
    }
}
