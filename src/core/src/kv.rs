//! The metadata key-value abstraction ([`MetaKv`], shaped like etcd) and [`MemKv`], an in-memory
//! implementation with etcd's revision semantics, used by the tests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;

/// etcd's revision numbers: a global counter bumped by every successful write transaction.
pub type Revision = i64;

/// etcd's default `--max-txn-ops`.
pub const ETCD_MAX_TXN_OPS: usize = 128;
/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const ETCD_MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// One stored key with its value and the revision of its last modification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: Revision,
}

/// One page of a range read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangePage {
    /// Entries in ascending key order.
    pub entries: Vec<KvEntry>,
    /// True when the range held more entries than the limit allowed.
    pub more: bool,
}

/// A transaction guard: `key`'s current mod_revision must equal `mod_revision`
/// (0 = the key must not exist), exactly like etcd's `Compare::mod_revision(.., Equal, ..)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub mod_revision: Revision,
    /// When not empty, the compare covers every key in `[key, range_end)`: each must have
    /// this mod_revision, and an empty range compares as one missing key (revision 0). So
    /// `mod_revision: 0` over a range means "the range is empty" (etcd's range compare).
    pub range_end: Vec<u8>,
}

impl Compare {
    /// `key`'s mod_revision must be `mod_revision` (0 = must not exist).
    pub fn key(key: Vec<u8>, mod_revision: Revision) -> Compare {
        Compare {
            key,
            mod_revision,
            range_end: Vec::new(),
        }
    }

    /// No key may exist in `[start, end)`.
    pub fn range_empty(start: Vec<u8>, end: Vec<u8>) -> Compare {
        Compare {
            key: start,
            mod_revision: 0,
            range_end: end,
        }
    }
}

/// A write inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// A put that lasts only while this store's session does (etcd: under the mount's claim
    /// lease, so it goes when the mount dies): a directory claim. Only sent while
    /// [`MetaKv::session`] is `Some`; a store without sessions keeps it as a plain put.
    PutOwned {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Deletes every key in `[start, end)` (etcd's DeleteRange with a range_end): one small
    /// operation however many keys it removes.
    DeleteRange {
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

impl TxnOp {
    pub fn key(&self) -> &[u8] {
        match self {
            TxnOp::Put { key, .. } | TxnOp::PutOwned { key, .. } | TxnOp::Delete { key } => key,
            TxnOp::DeleteRange { start, .. } => start,
        }
    }
    fn encoded_len(&self) -> usize {
        match self {
            TxnOp::Put { key, value } | TxnOp::PutOwned { key, value } => {
                key.len() + value.len() + 16
            }
            TxnOp::Delete { key } => key.len() + 16,
            TxnOp::DeleteRange { start, end } => start.len() + end.len() + 16,
        }
    }
}

/// The value and mod_revision of one key, if it exists.
pub type Versioned = Option<(Vec<u8>, Revision)>;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    /// The store could not be reached or did not answer (retryable by a higher layer).
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// The request broke a size or operation-count limit of the store.
    #[error("metadata transaction too large: {0}")]
    TooLarge(String),
    #[error("metadata store error: {0}")]
    Other(String),
}

/// The end key of a prefix scan: the smallest key greater than every key starting with `prefix`
/// (etcd's `get_prefix` range end). An empty vector means "to the end of the key space".
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// The metadata store, shaped like etcd's KV API. Implementations: [`MemKv`] here; an etcd one
/// elsewhere (get → Range, range → Range with range_end/limit, txn → Txn with
/// `Compare::mod_revision(key, Equal, rev)` and Put/Delete in the success branch).
pub trait MetaKv: Send + Sync {
    /// The value and mod_revision of `key`, if it exists.
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Versioned, KvError>>;

    /// Keys in `[start, end)` in ascending order, at most `limit` of them (0 = no limit).
    /// An empty `end` means "to the end of the key space". Use [`prefix_end`] for prefix scans.
    fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<RangePage, KvError>>;

    /// Applies every op atomically iff every compare holds; returns whether it did.
    fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> BoxFuture<'_, Result<bool, KvError>>;

    /// Several keys read at one revision, in one round trip (etcd: a read-only transaction of
    /// Range requests). At most [`ETCD_MAX_TXN_OPS`] keys.
    fn get_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<Vec<Versioned>, KvError>>;

    /// `key`'s value from a local cache that is at most a moment behind the store (the
    /// mount's etcd watch feeds it), or `None` when not cached; never older than anything this
    /// store has already returned or committed. For answers an application may get from a
    /// cache anyway (lookup, getattr). The default has no cache.
    fn cached(&self, _key: &[u8]) -> Versioned {
        None
    }

    /// Like [`MetaKv::cached`] but possibly older than what this store has already seen: only
    /// for the first attempt of a transaction that compares the value's revision, where a
    /// stale value costs one failed transaction and a retry from the store, never a wrong
    /// answer. (A mount's cache waits for its watch to pass every value the mount read; a
    /// create or unlink need not wait, nor read instead.)
    fn cached_to_compare(&self, key: &[u8]) -> Versioned {
        self.cached(key)
    }

    /// True when a local cache knows `key` absent: it holds every key under the prefix
    /// `within` (a directory's entries: the directory was made by this store, or listed
    /// whole), `key` is not among them, and the cache is as fresh as [`MetaKv::cached`]
    /// requires. The default knows nothing.
    fn cached_absent(&self, _key: &[u8], _within: &[u8]) -> bool {
        false
    }

    /// While this store holds a session (etcd: a lease it keeps alive), its number: puts made
    /// with [`TxnOp::PutOwned`] under that number certainly still exist (unless deleted).
    /// `None` when it has none or it may have lapsed; a new number means everything owned
    /// under an older one may be gone. The default has no sessions.
    fn session(&self) -> Option<u64> {
        None
    }

    /// Whether this store has sessions at all ([`MetaKv::session`] can be `Some`): a store
    /// that has none keeps [`TxnOp::PutOwned`] as plain puts.
    fn has_sessions(&self) -> bool {
        false
    }

    /// Keys and one range `[start, end)` (at most `limit` entries, 0 = all) read at one
    /// revision, in one round trip: a consistent snapshot of, say, an inode and its chunk map.
    fn get_many_and_range<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<Versioned>, RangePage), KvError>>;
}

type Hook = Box<dyn FnOnce(&MemKv) + Send>;
type EntryIter<'a> = Box<dyn Iterator<Item = (&'a Vec<u8>, &'a (Vec<u8>, Revision))> + 'a>;

#[derive(Default)]
struct MemState {
    revision: Revision,
    map: BTreeMap<Vec<u8>, (Vec<u8>, Revision)>,
}

/// Counters of a [`MemKv`], for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemKvStats {
    pub txns: u64,
    pub failed_txns: u64,
    pub max_ops_seen: u64,
    pub max_bytes_seen: u64,
}

/// In-memory [`MetaKv`] with etcd semantics: a global revision bumped once per successful
/// non-empty write transaction, per-key mod_revision, and etcd's default limits (128 ops,
/// 1.5 MiB per request) enforced so tests catch oversized transactions.
pub struct MemKv {
    state: Mutex<MemState>,
    hook: Mutex<Option<Hook>>,
    max_ops: usize,
    max_bytes: usize,
    txns: AtomicU64,
    failed: AtomicU64,
    max_ops_seen: AtomicU64,
    max_bytes_seen: AtomicU64,
}

impl Default for MemKv {
    fn default() -> Self {
        Self::new()
    }
}

impl MemKv {
    pub fn new() -> MemKv {
        MemKv::with_limits(ETCD_MAX_TXN_OPS, ETCD_MAX_REQUEST_BYTES)
    }

    pub fn with_limits(max_ops: usize, max_bytes: usize) -> MemKv {
        MemKv {
            state: Mutex::new(MemState::default()),
            hook: Mutex::new(None),
            max_ops,
            max_bytes,
            txns: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            max_ops_seen: AtomicU64::new(0),
            max_bytes_seen: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` right before the next transaction is evaluated (outside any lock), so a test
    /// can slip in a conflicting change from "another node" deterministically.
    pub fn before_next_txn(&self, f: impl FnOnce(&MemKv) + Send + 'static) {
        *self.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    pub fn revision(&self) -> Revision {
        self.lock().revision
    }

    pub fn stats(&self) -> MemKvStats {
        MemKvStats {
            txns: self.txns.load(Ordering::Relaxed),
            failed_txns: self.failed.load(Ordering::Relaxed),
            max_ops_seen: self.max_ops_seen.load(Ordering::Relaxed),
            max_bytes_seen: self.max_bytes_seen.load(Ordering::Relaxed),
        }
    }

    pub fn get_sync(&self, key: &[u8]) -> Option<(Vec<u8>, Revision)> {
        self.lock().map.get(key).cloned()
    }

    /// Every entry whose key starts with `prefix`.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Vec<KvEntry> {
        let end = prefix_end(prefix);
        self.range_sync(prefix, &end, 0).entries
    }

    pub fn range_sync(&self, start: &[u8], end: &[u8], limit: usize) -> RangePage {
        let st = self.lock();
        Self::range_in(&st, start, end, limit)
    }

    fn range_in(st: &MemState, start: &[u8], end: &[u8], limit: usize) -> RangePage {
        let mut page = RangePage::default();
        let iter: EntryIter<'_> = if end.is_empty() {
            Box::new(st.map.range(start.to_vec()..))
        } else if start >= end {
            return page;
        } else {
            Box::new(st.map.range(start.to_vec()..end.to_vec()))
        };
        for (k, (v, rev)) in iter {
            if limit != 0 && page.entries.len() == limit {
                page.more = true;
                break;
            }
            page.entries.push(KvEntry {
                key: k.clone(),
                value: v.clone(),
                mod_revision: *rev,
            });
        }
        page
    }

    /// Unconditional put (bumps the revision), for tests that tamper with the store.
    pub fn put_sync(&self, key: &[u8], value: &[u8]) {
        let mut st = self.lock();
        st.revision += 1;
        let rev = st.revision;
        st.map.insert(key.to_vec(), (value.to_vec(), rev));
    }

    pub fn txn_sync(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, KvError> {
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = hook {
            h(self);
        }
        let n_ops = ops.len().max(compares.len());
        let bytes: usize = ops.iter().map(TxnOp::encoded_len).sum::<usize>()
            + compares.iter().map(|c| c.key.len() + 16).sum::<usize>();
        self.max_ops_seen.fetch_max(n_ops as u64, Ordering::Relaxed);
        self.max_bytes_seen
            .fetch_max(bytes as u64, Ordering::Relaxed);
        if n_ops > self.max_ops {
            return Err(KvError::TooLarge(format!(
                "{n_ops} operations (limit {})",
                self.max_ops
            )));
        }
        if bytes > self.max_bytes {
            return Err(KvError::TooLarge(format!(
                "{bytes} bytes (limit {})",
                self.max_bytes
            )));
        }
        // etcd refuses a txn that writes the same key twice, or puts a key that a delete
        // range of the same txn covers.
        let mut seen = std::collections::HashSet::new();
        for op in &ops {
            if !seen.insert(op.key()) {
                return Err(KvError::Other("duplicate key in transaction".into()));
            }
        }
        for op in &ops {
            if let TxnOp::DeleteRange { start, end } = op {
                let covered = ops.iter().any(|o| {
                    matches!(o, TxnOp::Put { key, .. } | TxnOp::PutOwned { key, .. } | TxnOp::Delete { key }
                        if key >= start && (end.is_empty() || key < end))
                });
                if covered {
                    return Err(KvError::Other("duplicate key in transaction".into()));
                }
            }
        }
        self.txns.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        for c in &compares {
            let holds = if c.range_end.is_empty() {
                st.map.get(&c.key).map(|(_, r)| *r).unwrap_or(0) == c.mod_revision
            } else {
                let page = Self::range_in(&st, &c.key, &c.range_end, 0);
                if page.entries.is_empty() {
                    c.mod_revision == 0
                } else {
                    page.entries
                        .iter()
                        .all(|e| e.mod_revision == c.mod_revision)
                }
            };
            if !holds {
                self.failed.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
        }
        if ops.is_empty() {
            return Ok(true);
        }
        st.revision += 1;
        let rev = st.revision;
        for op in ops {
            match op {
                TxnOp::Put { key, value } | TxnOp::PutOwned { key, value } => {
                    st.map.insert(key, (value, rev));
                }
                TxnOp::Delete { key } => {
                    st.map.remove(&key);
                }
                TxnOp::DeleteRange { start, end } => {
                    let doomed: Vec<Vec<u8>> = st
                        .map
                        .range(start.clone()..)
                        .take_while(|(k, _)| end.is_empty() || **k < end)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in doomed {
                        st.map.remove(&k);
                    }
                }
            }
        }
        Ok(true)
    }
}

impl MetaKv for MemKv {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Versioned, KvError>> {
        futures::future::ready(Ok(self.get_sync(key))).boxed()
    }

    fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<RangePage, KvError>> {
        futures::future::ready(Ok(self.range_sync(start, end, limit))).boxed()
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> BoxFuture<'_, Result<bool, KvError>> {
        futures::future::ready(self.txn_sync(compares, ops)).boxed()
    }

    fn get_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<Vec<Versioned>, KvError>> {
        let r = if keys.len() > self.max_ops {
            Err(KvError::TooLarge(format!(
                "{} keys in one read",
                keys.len()
            )))
        } else {
            let st = self.lock();
            Ok(keys.iter().map(|k| st.map.get(k).cloned()).collect())
        };
        futures::future::ready(r).boxed()
    }

    fn get_many_and_range<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<Versioned>, RangePage), KvError>> {
        let r = if keys.len() + 1 > self.max_ops {
            Err(KvError::TooLarge(format!(
                "{} keys in one read",
                keys.len()
            )))
        } else {
            // One lock for both: the same snapshot, as etcd's read-only txn gives.
            let st = self.lock();
            let values = keys.iter().map(|k| st.map.get(k).cloned()).collect();
            let page = Self::range_in(&st, start, end, limit);
            Ok((values, page))
        };
        futures::future::ready(r).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_and_compares() {
        let kv = MemKv::new();
        assert!(kv
            .txn_sync(
                vec![Compare::key(b"a".to_vec(), 0)],
                vec![TxnOp::Put {
                    key: b"a".to_vec(),
                    value: b"1".to_vec()
                }]
            )
            .unwrap());
        let (_, r1) = kv.get_sync(b"a").unwrap();
        assert_eq!(r1, 1);
        // must-not-exist now fails
        assert!(!kv
            .txn_sync(
                vec![Compare::key(b"a".to_vec(), 0)],
                vec![TxnOp::Delete { key: b"a".to_vec() }]
            )
            .unwrap());
        kv.put_sync(b"b", b"2");
        assert_eq!(kv.get_sync(b"b").unwrap().1, 2);
        assert_eq!(kv.get_sync(b"a").unwrap().1, 1);
        let page = kv.range_sync(b"a", b"c", 1);
        assert_eq!(page.entries.len(), 1);
        assert!(page.more);
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), Vec::<u8>::new());
        let too_many: Vec<TxnOp> = (0..200)
            .map(|i| TxnOp::Delete {
                key: format!("k{i}").into_bytes(),
            })
            .collect();
        assert!(matches!(
            kv.txn_sync(vec![], too_many),
            Err(KvError::TooLarge(_))
        ));
    }
}
