//! [`EtcdKv`]: the core's [`MetaKv`] over etcd's KV API.
//!
//! | core call | etcd request |
//! |---|---|
//! | `get(key)` | `Range{key}` → (value, mod_revision) |
//! | `range(start, end, limit)` | `Range{start, range_end, limit}`; an empty `end` becomes etcd's `"\0"` (to the end of the key space); `more` from the response |
//! | `txn(compares, ops)` | `Txn{compare: mod_revision(key) == rev for each, success: puts/deletes}` → `succeeded` |
//!
//! Every request is bounded by [`EtcdKv::timeout`] (5 s by default): an etcd that does not
//! answer becomes [`KvError::Unavailable`], never a hang. Reads are idempotent, so a read that
//! fails transiently is retried a couple of times with a short back-off inside that same bound.
//! A transaction is sent again only when it certainly never reached etcd (no connection could
//! be made). After a timeout or a broken connection it may or may not have committed: its keys
//! are read back to find out (`settle`): applied → `Ok(true)`; not applied with every compare
//! still holding → sent once more (the compares keep the two attempts exclusive); not applied
//! with a compare failing → `Ok(false)`, so the core re-reads and retries as after any
//! conflict. Only when the read-back itself fails does the caller see the error.
//!
//! The instance remembers the revisions of its own committed write transactions (the last
//! [`OWN_REVISIONS_KEPT`]), so the mount's etcd watch can tell its own changes from other
//! mounts' ([`EtcdKv::is_own_write`]), also when an event overtakes its transaction's reply.
//!
//! The futures use `tokio::time` and must be polled inside a tokio runtime.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::claim_session::ClaimSession;
use etcd_client::{CompareOp, DeleteOptions, GetOptions, KvClient, PutOptions, TxnOpResponse};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::time::Instant;
use twinfs_core::kv::{prefix_end, Versioned};
use twinfs_core::{Compare, KvEntry, KvError, MetaKv, RangePage, Revision, TxnOp};

/// Default bound on one request, its retries included: while etcd is unreachable (a restart, a
/// leader election) requests are retried for this long before they fail with EIO. Ten seconds
/// outlasts an etcd restart or election (seconds) and stays short of what makes an application
/// look hung.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one attempt within a request.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How many of this instance's own write revisions are remembered.
pub const OWN_REVISIONS_KEPT: usize = 4096;
/// Back-off before the first read retry (doubled for the next).
const READ_BACKOFF: Duration = Duration::from_millis(50);

/// The core's metadata store over etcd. Cheap to share (`Arc<EtcdKv>`); all methods take `&self`.
pub struct EtcdKv {
    kv: KvClient,
    timeout: Duration,
    own: Mutex<BTreeSet<Revision>>,
    /// Writes of cached kinds in transactions sent but not yet answered, by transaction: the
    /// watch can bring a commit's events before its reply does, when the revision is not yet
    /// known to be ours (see [`EtcdKv::is_own_write`]).
    in_flight: Mutex<InFlight>,
    round_trips: AtomicU64,
    /// The oldest revision the watch cache may answer from: the highest revision of every
    /// value this instance has read from etcd under `cache_prefix` (its own commits are
    /// written into the cache instead; see `write_through`). See [`EtcdKv::cached`].
    floor: AtomicI64,
    /// The keys the watch follows (empty: all).
    cache_prefix: Vec<u8>,
    cache: Mutex<WatchCache>,
    /// The lease [`TxnOp::PutOwned`] puts go under (directory claims); none: no sessions.
    claims: Option<Arc<ClaimSession>>,
}

/// What a transaction writes under cached kinds: each key with its new value (`None`: deleted).
type Writes = Arc<[(Vec<u8>, Option<Vec<u8>>)]>;

#[derive(Default)]
struct InFlight {
    next_id: u64,
    txns: HashMap<u64, Writes>,
}

/// Takes a transaction's puts out of [`EtcdKv::in_flight`] when it is answered (or abandoned).
struct InFlightGuard<'a> {
    kv: &'a EtcdKv,
    id: Option<u64>,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.kv.in_flight().txns.remove(&id);
        }
    }
}

/// Inode and entry values as the volume's watch last reported them (see [`EtcdKv::cached`]).
#[derive(Default)]
struct WatchCache {
    map: HashMap<Vec<u8>, (Vec<u8>, Revision)>,
    /// Every change up to this revision has been applied.
    applied: Revision,
    /// False until the watch runs, and after anything that may have made it miss a change.
    valid: bool,
    /// Keys a read found absent at the given revision while the cache still held a value:
    /// not served, and puts up to that revision (still on their way through the watch) are
    /// not taken in, until the watch has applied it.
    absent: HashMap<Vec<u8>, Revision>,
    /// Key prefixes (directories' entry prefixes) of which the map holds every key: known
    /// whole at some revision (an own transaction proved the prefix empty, or a read listed
    /// all of it) with every change since applied. Emptied with the map.
    complete: HashSet<Vec<u8>>,
    /// `applied` when the map was last emptied: a prefix known whole at an older revision
    /// may have lost keys the watch put in before that.
    cleared_at: Revision,
    /// How many times the map was emptied: a prefix is marked whole only if the map was not
    /// emptied while its keys went in.
    clears: u64,
    hits: u64,
}

impl WatchCache {
    /// `key` became `value` (`None`: deleted) at `rev`, unless the cache already knows a later
    /// state of it: this mount's own commits are written through before the watch brings
    /// them, and a read may have found the key gone after `rev`.
    fn put(&mut self, key: &[u8], value: Option<&[u8]>, rev: Revision) {
        if self.absent.get(key).is_some_and(|gone| rev <= *gone)
            || self.map.get(key).is_some_and(|(_, held)| rev < *held)
        {
            return;
        }
        match value {
            Some(v) => {
                if self.map.len() >= CACHE_MAX_ENTRIES {
                    self.clear();
                }
                self.map.insert(key.to_vec(), (v.to_vec(), rev));
            }
            None => {
                self.map.remove(key);
            }
        }
    }

    /// `key` is known absent as of `rev`: not answered, and older puts of it not taken in,
    /// until the watch has applied `rev`.
    fn gone(&mut self, key: &[u8], rev: Revision) {
        if self.map.get(key).is_some_and(|(_, held)| *held > rev) {
            return; // re-created since (an own commit written through after a slower read)
        }
        self.map.remove(key);
        if rev <= self.applied {
            return;
        }
        if self.absent.len() >= CACHE_MAX_ENTRIES {
            self.clear();
            self.absent.clear();
        }
        let seen = self.absent.entry(key.to_vec()).or_insert(rev);
        *seen = (*seen).max(rev);
    }

    /// Forgets every value (and so every prefix known whole).
    fn clear(&mut self) {
        self.map.clear();
        self.complete.clear();
        self.cleared_at = self.applied;
        self.clears += 1;
    }

    /// Every key under `prefix` as of revision `at` went into the map (none, or all a read
    /// returned) since the map's `clears` count was `clears`: the prefix is whole from now on,
    /// provided every change after `at` is in the map too, which holds when the map was not
    /// emptied after the watch passed `at`. (The watch puts every change of a cached kind,
    /// held before or not, and moves `applied` past a change only with it in the map.)
    fn whole_at(&mut self, prefix: &[u8], at: Revision, clears: u64) {
        if !self.valid || at < self.cleared_at || clears != self.clears {
            return;
        }
        if self.complete.len() >= COMPLETE_PREFIXES_MAX {
            self.complete.clear();
        }
        self.complete.insert(prefix.to_vec());
    }
}

/// Most directories the watch cache knows whole at once (a prefix each; beyond, it starts over).
const COMPLETE_PREFIXES_MAX: usize = 100_000;

/// Key kinds (after the volume prefix) the watch cache holds: inodes, directory entries and
/// directory times.
const CACHED_KINDS: [&[u8]; 3] = [b"i/", b"d/", b"t/"];

/// One change reported by the watch: key, new value (`None`: deleted), revision.
pub type CacheChange = (Vec<u8>, Option<Vec<u8>>, Revision);

/// Entries the watch cache holds before it starts over (~100 MB at worst).
const CACHE_MAX_ENTRIES: usize = 250_000;

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("timeout", &self.timeout)
            .field("round_trips", &self.round_trips())
            .finish()
    }
}

/// What went wrong with one attempt, before it is mapped to a [`KvError`].
/// Whether a failed request certainly never reached etcd: no connection could be made.
fn never_sent(e: &etcd_client::Error) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    (text.contains("connect error")
        || text.contains("connection refused")
        || text.contains("error trying to connect"))
        && !text.contains("reset")
}

fn classify(e: etcd_client::Error) -> KvError {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::GRpcStatus(s) => {
            let msg = s.message().to_string();
            let lower = msg.to_ascii_lowercase();
            let too_large = lower.contains("too many operations")
                || lower.contains("too large")
                || lower.contains("larger than max");
            match s.code() {
                _ if too_large => KvError::TooLarge(msg),
                Code::ResourceExhausted => KvError::TooLarge(msg),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                    KvError::Unavailable(format!("{:?}: {msg}", s.code()))
                }
                // tonic reports connection-level failures as Unknown with a transport message.
                Code::Unknown
                    if lower.contains("transport")
                        || lower.contains("connect")
                        || lower.contains("broken pipe")
                        || lower.contains("connection") =>
                {
                    KvError::Unavailable(msg)
                }
                code => KvError::Other(format!("{code:?}: {msg}")),
            }
        }
        E::TransportError(t) => KvError::Unavailable(format!("transport error: {t}")),
        E::IoError(io) => KvError::Unavailable(format!("i/o error: {io}")),
        E::EndpointError(m) => KvError::Unavailable(format!("endpoint error: {m}")),
        other => KvError::Other(other.to_string()),
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl EtcdKv {
    /// Wraps a connected client (see `twinfs_cluster::etcd::EtcdConfig::connect`).
    pub fn new(client: etcd_client::Client) -> EtcdKv {
        EtcdKv {
            kv: client.kv_client(),
            timeout: DEFAULT_TIMEOUT,
            own: Mutex::new(BTreeSet::new()),
            in_flight: Mutex::new(InFlight::default()),
            round_trips: AtomicU64::new(0),
            floor: AtomicI64::new(0),
            cache_prefix: Vec::new(),
            cache: Mutex::new(WatchCache::default()),
            claims: None,
        }
    }

    /// Owned puts go under `session`'s lease, and [`MetaKv::session`] reports it.
    pub fn with_claim_session(mut self, session: Arc<ClaimSession>) -> EtcdKv {
        self.claims = Some(session);
        self
    }

    /// Ends the claim session, if any: this mount's claims go at once.
    pub async fn end_claim_session(&self) {
        if let Some(s) = &self.claims {
            s.end().await;
        }
    }

    /// Only reads of keys under `prefix` (the keys the mount's watch follows) hold the watch
    /// cache back: a read elsewhere has no event that would ever let the cache catch up.
    pub fn with_cache_prefix(mut self, prefix: &[u8]) -> EtcdKv {
        self.cache_prefix = prefix.to_vec();
        self
    }

    /// Whether the watch cache holds `key` (an inode, entry or directory-times key under the
    /// cache prefix): the watch feeds it only those.
    pub fn caches_key(&self, key: &[u8]) -> bool {
        key.strip_prefix(self.cache_prefix.as_slice())
            .is_some_and(|rest| CACHED_KINDS.iter().any(|k| rest.starts_with(k)))
    }

    /// Whether a committed DeleteRange `[start, end)` may have removed keys the cache holds
    /// (then the cache waits for the watch instead of being written through).
    fn range_may_hold_cached(&self, start: &[u8], end: &[u8]) -> bool {
        let Some(rest) = start.strip_prefix(self.cache_prefix.as_slice()) else {
            return true;
        };
        let kind_len = self.cache_prefix.len() + 2;
        match (rest.get(..2), start.get(..kind_len), end.get(..kind_len)) {
            // Within one kind the cache does not hold (a file's chunk records).
            (Some(kind), Some(a), Some(b)) if a == b => CACHED_KINDS.contains(&kind),
            _ => true,
        }
    }

    /// A transaction of this instance committed at `rev`: its writes to cached keys go into
    /// the cache at once, so the next lookup or `stat` after an own create or unlink (the
    /// kernel asks for the directory's attributes again) needs no read and no wait for the
    /// watch. A DeleteRange over cached keys instead makes the cache wait for the watch.
    /// Prefixes `proven_empty` were empty at `rev`: the cache knows them whole from then on.
    fn write_through(
        &self,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
        whole_range: bool,
        proven_empty: &[Vec<u8>],
        rev: Revision,
    ) {
        if whole_range {
            self.floor.fetch_max(rev, Ordering::Relaxed);
        }
        if writes.is_empty() && proven_empty.is_empty() {
            return;
        }
        let mut c = self.cache();
        if !c.valid {
            return;
        }
        let clears = c.clears;
        for (key, value) in writes {
            match value {
                Some(_) => c.put(key, value.as_deref(), rev),
                None => c.gone(key, rev),
            }
        }
        for prefix in proven_empty {
            c.whole_at(prefix, rev, clears);
        }
    }

    /// Sets the bound on every request (at least 1 ms).
    pub fn with_timeout(mut self, timeout: Duration) -> EtcdKv {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The bound on every request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Requests sent to etcd so far (retries included).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, WatchCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watch reports the changes of one response, in revision order (`None`: deleted;
    /// keys the cache does not hold are left out), up to revision `upto`. Applied under one
    /// lock, and the revision gate moves only after all of them: a reader never sees half of
    /// a transaction's changes as "caught up" (an inode still old while its chunks are new).
    pub fn cache_apply(&self, changes: &[CacheChange], upto: Revision) {
        let mut c = self.cache();
        for (key, value, rev) in changes {
            c.put(key, value.as_deref(), *rev);
        }
        c.applied = c.applied.max(upto);
        if !c.absent.is_empty() {
            let applied = c.applied;
            c.absent.retain(|_, seen| *seen > applied);
        }
    }

    /// The watch is (again) following every change from revision `from` on: cached values
    /// are trusted from now on.
    pub fn cache_start(&self, from: Revision) {
        let mut c = self.cache();
        c.applied = c.applied.max(from);
        c.valid = true;
    }

    /// A transaction's outcome is unknown (it may have committed at a revision never learnt):
    /// forget every cached value, so that only what the watch applies from now on is served
    /// (that includes the transaction's changes if it did commit). The cache stays in use: the
    /// watch still follows. (It used to be switched off until the watch restarted, which on a
    /// quiet stream could be never: every lookup then went to etcd.)
    fn cache_forget(&self) {
        self.cache().clear();
    }

    /// The watch broke or fell behind: forget everything until it follows again.
    pub fn cache_reset(&self) {
        let mut c = self.cache();
        c.clear();
        c.absent.clear();
        c.valid = false;
    }

    /// A read returned `key` at `found` (its mod revision; `None`: absent) as of etcd revision
    /// `at`. The cache must not answer anything older from now on: a present value raises the
    /// floor to its revision (the watch delivers that event, so the cache catches up); an
    /// absent one the cache still holds is withheld until the watch reaches `at`.
    fn observed(&self, key: &[u8], found: Option<Revision>, at: Revision) {
        if !key.starts_with(&self.cache_prefix) {
            return;
        }
        match found {
            Some(rev) => {
                self.floor.fetch_max(rev, Ordering::Relaxed);
            }
            // Also when the cache does not hold it: a put older than `at` may still be on its
            // way through the watch.
            None => self.cache().gone(key, at),
        }
    }

    /// [`EtcdKv::observed`] for the entries of a range read served at revision `at` (present
    /// values only: the names a range did not return are not known to be absent from the
    /// cache), which also go into the cache.
    /// `whole`: the read returned every key under this prefix (a directory listed in one
    /// page), which the cache then knows whole (see [`MetaKv::cached_absent`]).
    fn observed_entries(&self, entries: &[KvEntry], at: Revision, whole: Option<&[u8]>) {
        if let Some(max) = entries
            .iter()
            .filter(|e| e.key.starts_with(&self.cache_prefix))
            .map(|e| e.mod_revision)
            .max()
        {
            self.floor.fetch_max(max, Ordering::Relaxed);
        }
        self.fill(
            entries
                .iter()
                .map(|e| (e.key.as_slice(), e.value.as_slice(), e.mod_revision)),
            at,
            whole,
        );
    }

    /// Values a read returned as of etcd revision `at` (key, value, mod revision) go into the
    /// watch cache, so that a mount that did not see a file being made (it started later)
    /// answers the next `stat` or lookup of it without etcd, as one that watched it does.
    /// Safe only while the watch has applied nothing past `at`: every later change of those
    /// keys is then still to come through the watch and replaces the value (a change the
    /// watch already applied after `at`, a delete of a key the cache did not hold, would
    /// leave no trace to stop a stale value). Otherwise the values are left out.
    fn fill<'k>(
        &self,
        found: impl Iterator<Item = (&'k [u8], &'k [u8], Revision)>,
        at: Revision,
        whole: Option<&[u8]>,
    ) {
        let mut found = found.filter(|(k, _, _)| self.caches_key(k)).peekable();
        let whole = whole.filter(|prefix| self.caches_key(prefix));
        if found.peek().is_none() && whole.is_none() {
            return;
        }
        let mut c = self.cache();
        if !c.valid || c.applied > at {
            return;
        }
        let clears = c.clears;
        for (key, value, rev) in found {
            c.put(key, Some(value), rev);
        }
        if let Some(prefix) = whole {
            c.whole_at(prefix, at, clears);
        }
    }

    /// `key` from the watch cache while it follows etcd; with `floor`, only once it has applied
    /// everything this instance read (see [`MetaKv::cached`]).
    fn cache_lookup(&self, key: &[u8], floor: bool) -> Versioned {
        let least = if floor {
            self.floor.load(Ordering::Relaxed)
        } else {
            Revision::MIN
        };
        let mut c = self.cache();
        if !c.valid || c.applied < least || (floor && c.absent.contains_key(key)) {
            return None;
        }
        let hit = c.map.get(key).cloned();
        if hit.is_some() {
            c.hits += 1;
        }
        hit
    }

    /// The value the watch cache holds for `key` from before revision `rev` (what a watch
    /// event at `rev` replaced), if it holds one. The watch asks for no previous values from
    /// etcd: each one costs etcd a historical read per event and watcher (~1 ms of etcd CPU per
    /// create or unlink here, per mount).
    pub fn value_before(&self, key: &[u8], rev: Revision) -> Option<Vec<u8>> {
        let c = self.cache();
        match c.map.get(key) {
            Some((v, held)) if c.valid && *held < rev => Some(v.clone()),
            _ => None,
        }
    }

    /// Lookups answered from the watch cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.cache().hits
    }

    /// True when `rev` is the revision of a write transaction this instance committed (among
    /// the last [`OWN_REVISIONS_KEPT`]). Every event of an etcd watch carries the revision of the
    /// transaction that caused it, so the watch can skip the mount's own changes.
    pub fn is_own_revision(&self, rev: Revision) -> bool {
        self.own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&rev)
    }

    /// True when a watch event is this instance's own write: its revision is one of ours, or
    /// it puts exactly the value one of our unanswered transactions puts under that key (the
    /// watch and the reply race; inode and entry values carry inode numbers and nanosecond
    /// times, so another mount's identical bytes are not a practical case, and would leave
    /// nothing to invalidate anyway). Deletes are judged by revision only.
    pub fn is_own_write(&self, rev: Revision, key: &[u8], put: Option<&[u8]>) -> bool {
        if self.is_own_revision(rev) {
            return true;
        }
        let Some(value) = put else { return false };
        self.in_flight()
            .txns
            .values()
            .flat_map(|w| w.iter())
            .any(|(k, v)| k == key && v.as_deref() == Some(value))
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a transaction's writes (shared, not copied) until the guard drops.
    fn track_in_flight(&self, through: &Writes) -> InFlightGuard<'_> {
        if !through.iter().any(|(_, v)| v.is_some()) {
            return InFlightGuard { kv: self, id: None };
        }
        let mut f = self.in_flight();
        let id = f.next_id;
        f.next_id += 1;
        f.txns.insert(id, through.clone());
        InFlightGuard {
            kv: self,
            id: Some(id),
        }
    }

    fn remember_own(&self, rev: Revision) {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        own.insert(rev);
        while own.len() > OWN_REVISIONS_KEPT {
            own.pop_first();
        }
    }

    /// Runs a read with retries on transient failures, all within one `timeout`.
    async fn read<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, KvError>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = READ_BACKOFF;
        loop {
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            let until = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
            let err = match tokio::time::timeout_at(until, attempt(self.kv.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => classify(e),
                Err(_) if Instant::now() >= deadline => {
                    return Err(KvError::Unavailable(format!(
                        "etcd {what} did not answer within {:?}",
                        self.timeout
                    )))
                }
                Err(_) => KvError::Unavailable(format!("etcd {what} attempt timed out")),
            };
            // Reads are safe to repeat: retry transient failures until the deadline.
            let transient = matches!(err, KvError::Unavailable(_));
            if !transient || Instant::now() + backoff >= deadline {
                return Err(err);
            }
            tracing::debug!(error = %err, "etcd {what} failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn get_impl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Revision)>, KvError> {
        if key.is_empty() {
            return Ok(None); // etcd has no empty key (and refuses to look one up)
        }
        let resp = self
            .read("get", |mut kv| {
                let key = key.to_vec();
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(self.found(resp.kvs(), key, header_revision(resp.header())))
    }

    /// `key`'s value and mod revision among a read's results (served at revision `at`),
    /// noted for the watch cache's floor (see [`EtcdKv::observed`]).
    fn found(&self, kvs: &[etcd_client::KeyValue], key: &[u8], at: Revision) -> Versioned {
        let found = kvs
            .iter()
            .find(|kv| kv.key() == key)
            .map(|kv| (kv.value().to_vec(), kv.mod_revision()));
        self.observed(key, found.as_ref().map(|f| f.1), at);
        if let Some((value, rev)) = &found {
            self.fill(std::iter::once((key, value.as_slice(), *rev)), at, None);
        }
        found
    }

    async fn range_impl(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<RangePage, KvError> {
        if !end.is_empty() && start >= end {
            return Ok(RangePage::default());
        }
        let prefix = (!end.is_empty() && end == prefix_end(start).as_slice()).then_some(start);
        // etcd refuses an empty key; "\0" is the smallest key that can exist.
        let start: Vec<u8> = if start.is_empty() {
            vec![0]
        } else {
            start.to_vec()
        };
        // An empty end means "to the end of the key space": etcd spells that "\0".
        let end: Vec<u8> = if end.is_empty() {
            vec![0]
        } else {
            end.to_vec()
        };
        let mut resp = self
            .read("range", |mut kv| {
                let start = start.clone();
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(to_i64(limit));
                async move { kv.get(start, Some(opts)).await }
            })
            .await?;
        let more = resp.more();
        let at = header_revision(resp.header());
        let mut entries: Vec<KvEntry> = resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let mod_revision = kv.mod_revision();
                let (key, value) = kv.into_key_value();
                KvEntry {
                    key,
                    value,
                    mod_revision,
                }
            })
            .collect();
        // Defensive: never hand the core more than it asked for.
        let more = if limit != 0 && entries.len() > limit {
            entries.truncate(limit);
            true
        } else {
            more
        };
        self.observed_entries(&entries, at, prefix.filter(|_| !more));
        Ok(RangePage { entries, more })
    }

    async fn txn_impl(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<bool, KvError> {
        // Does a successful commit certainly create a new revision? A put always does; a delete
        // only if its key existed, which is certain when the same txn compared it to a real
        // revision. Otherwise etcd may leave the revision unchanged, and the header's revision
        // would be somebody else's write: not ours to claim.
        let writes = ops.iter().any(|op| match op {
            TxnOp::Put { .. } | TxnOp::PutOwned { .. } => true,
            TxnOp::Delete { key } => compares.iter().any(|c| &c.key == key && c.mod_revision > 0),
            TxnOp::DeleteRange { .. } => false,
        });
        // What the cache learns if it commits (see `write_through`).
        let mut through = Vec::new();
        let mut range_over_cached = false;
        for op in &ops {
            match op {
                TxnOp::Put { key, value } if self.caches_key(key) => {
                    through.push((key.clone(), Some(value.clone())))
                }
                TxnOp::Delete { key } if self.caches_key(key) => through.push((key.clone(), None)),
                TxnOp::DeleteRange { start, end } => {
                    range_over_cached |= self.range_may_hold_cached(start, end)
                }
                _ => {}
            }
        }
        // Prefixes the transaction proves empty at its revision (a new directory's entries):
        // the cache knows them whole once it commits.
        let proven_empty: Vec<Vec<u8>> = compares
            .iter()
            .filter(|c| {
                c.mod_revision == 0
                    && !c.range_end.is_empty()
                    && c.range_end == prefix_end(&c.key)
                    && self.caches_key(&c.key)
            })
            .map(|c| c.key.clone())
            .collect();
        // Owned puts go under the session's current lease; without one (it lapsed since the
        // core asked), the transaction is not sent and counts as failed, so the core retries
        // without the claim.
        let owned_lease = if ops.iter().any(|op| matches!(op, TxnOp::PutOwned { .. })) {
            match self.claims.as_ref().and_then(|s| s.current()) {
                Some((_, lease)) => Some(lease),
                None => return Ok(false),
            }
        } else {
            None
        };
        // Dropped after the reply is handled, so after `remember_own`: no gap in which the
        // watch could see neither.
        let through: Writes = through.into();
        let _in_flight = self.track_in_flight(&through);
        let txn = etcd_txn(&compares, &ops, owned_lease);
        // Set once an attempt failed after it may have reached etcd: from then on a refusal
        // may be our own earlier attempt's doing, and is checked (see `settle`).
        let mut uncertain = false;
        let mut resent = false;
        let resp = loop {
            let failure = match self.send_txn(&txn).await {
                Ok(r) => break r,
                // Rejected as a whole (the lease was revoked or expired): never applied.
                Err(Some(e))
                    if owned_lease.is_some() && e.to_string().contains("lease not found") =>
                {
                    if let Some(s) = &self.claims {
                        s.lapsed();
                    }
                    return Ok(false);
                }
                // Never reached etcd, until the deadline: nothing to settle.
                Err(Some(e)) if never_sent(&e) => return Err(classify(e)),
                Err(Some(e)) => classify(e),
                Err(None) => KvError::Unavailable(format!(
                    "etcd txn did not answer within {:?} (it may or may not have been applied)",
                    self.timeout
                )),
            };
            // It may have been applied at a revision we will never learn.
            self.cache_forget();
            if !matches!(failure, KvError::Unavailable(_)) {
                return Err(failure);
            }
            uncertain = true;
            match self.settle(&compares, &ops).await {
                Ok(Settled::Applied) => return Ok(true),
                Ok(Settled::NotApplied) => return Ok(false),
                // Certainly not applied, and nothing it depends on changed: send it again. The
                // compares make the two attempts exclusive, should the first still commit.
                Ok(Settled::ComparesHold) if !resent => {
                    resent = true;
                    tracing::info!(error = %failure, "etcd txn lost on the way; sending it again");
                }
                Ok(Settled::ComparesHold) | Err(_) => return Err(failure),
            }
        };
        if uncertain && !resp.succeeded() {
            // Refused after a lost attempt: that attempt may have committed meanwhile.
            self.cache_forget();
            return Ok(self.settle(&compares, &ops).await? == Settled::Applied);
        }
        let ok = resp.succeeded();
        if ok {
            match resp.header().map(|h| h.revision()) {
                Some(rev) if rev > 0 => {
                    if writes {
                        self.remember_own(rev);
                    }
                    // Without `writes` the revision may be another's; deletes written
                    // through at it only withhold keys, never answer one.
                    self.write_through(&through, range_over_cached, &proven_empty, rev);
                }
                _ => {
                    tracing::warn!("etcd txn response without a revision");
                    self.cache_forget();
                }
            }
        }
        Ok(ok)
    }
}

/// What a read-back tells about a transaction whose reply was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Every key it writes holds what it wrote, every key it deletes is gone.
    Applied,
    /// Not applied (or applied and overwritten since; see [`EtcdKv::settle`]), and a compare no
    /// longer holds: sending it again would be refused.
    NotApplied,
    /// Not applied and every compare still holds: safe to send again.
    ComparesHold,
}

/// The etcd request for a core transaction. Owned puts go under `lease`.
fn etcd_txn(compares: &[Compare], ops: &[TxnOp], lease: Option<i64>) -> etcd_client::Txn {
    etcd_client::Txn::new()
        .when(
            compares
                .iter()
                .map(|c| {
                    let cmp = etcd_client::Compare::mod_revision(
                        c.key.clone(),
                        CompareOp::Equal,
                        c.mod_revision,
                    );
                    if c.range_end.is_empty() {
                        cmp
                    } else {
                        cmp.with_range(c.range_end.clone())
                    }
                })
                .collect::<Vec<_>>(),
        )
        .and_then(
            ops.iter()
                .map(|op| match op {
                    TxnOp::Put { key, value } => {
                        etcd_client::TxnOp::put(key.clone(), value.clone(), None)
                    }
                    TxnOp::PutOwned { key, value } => etcd_client::TxnOp::put(
                        key.clone(),
                        value.clone(),
                        lease.map(|l| PutOptions::new().with_lease(l)),
                    ),
                    TxnOp::Delete { key } => etcd_client::TxnOp::delete(key.clone(), None),
                    TxnOp::DeleteRange { start, end } => etcd_client::TxnOp::delete(
                        start.clone(),
                        Some(DeleteOptions::new().with_range(if end.is_empty() {
                            vec![0]
                        } else {
                            end.clone()
                        })),
                    ),
                })
                .collect::<Vec<_>>(),
        )
}

impl EtcdKv {
    /// Sends `txn` within one `timeout`, again only while it certainly never reached etcd (no
    /// connection could be made: etcd restarting). `Err(None)`: no answer in time.
    async fn send_txn(
        &self,
        txn: &etcd_client::Txn,
    ) -> Result<etcd_client::TxnResponse, Option<etcd_client::Error>> {
        let deadline = Instant::now() + self.timeout;
        let mut backoff = READ_BACKOFF;
        loop {
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            let mut kv = self.kv.clone();
            let until = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
            match tokio::time::timeout_at(until, kv.txn(txn.clone())).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) if never_sent(&e) && Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %e, "etcd unreachable; retrying the txn");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Ok(Err(e)) => return Err(Some(e)),
                Err(_) => return Err(None),
            }
        }
    }

    /// Finds out by reading back (linearizable reads, retried while etcd is unreachable)
    /// whether a transaction whose reply was lost (the connection broke: an etcd restart)
    /// was applied. Its writes all present → applied: the state is what it would have made,
    /// which is the answer the caller needs even in the unlikely case another writer made the
    /// same values. Not all present, and a compare fails → not applied, unless another writer
    /// changed its keys again in the moments since; the caller then retries against that
    /// newer state, as after any refused compare. Every compare still holding → certainly not
    /// applied (each namespace transaction compares a key it writes).
    ///
    /// Before this, such a transaction failed with EIO: a rename under load while etcd
    /// restarted reached the application as "Input/output error" (the etcd-restart failover
    /// scenario, 1 error in 2,002 writes).
    async fn settle(&self, compares: &[Compare], ops: &[TxnOp]) -> Result<Settled, KvError> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            if let TxnOp::Put { key, .. } | TxnOp::PutOwned { key, .. } | TxnOp::Delete { key } = op
            {
                keys.push(key.clone());
            }
        }
        let written = keys.len();
        keys.extend(
            compares
                .iter()
                .filter(|c| c.range_end.is_empty())
                .map(|c| c.key.clone()),
        );
        let found = self.get_many_impl(&keys).await?;
        let (now_written, now_compared) = found.split_at(written.min(found.len()));
        // A transaction without writes (compares only) is settled by its compares alone.
        let mut applied = !ops.is_empty();
        for (op, now) in ops
            .iter()
            .filter(|op| !matches!(op, TxnOp::DeleteRange { .. }))
            .zip(now_written)
        {
            applied &= match op {
                TxnOp::Put { value, .. } | TxnOp::PutOwned { value, .. } => {
                    now.as_ref().is_some_and(|(v, _)| v == value)
                }
                _ => now.is_none(),
            };
        }
        for op in ops {
            if let TxnOp::DeleteRange { start, end } = op {
                if applied {
                    applied = self.range_impl(start, end, 1).await?.entries.is_empty();
                }
            }
        }
        if applied {
            return Ok(Settled::Applied);
        }
        let mut hold = true;
        for (c, now) in compares
            .iter()
            .filter(|c| c.range_end.is_empty())
            .zip(now_compared)
        {
            hold &= now.as_ref().map_or(0, |(_, rev)| *rev) == c.mod_revision;
        }
        for c in compares.iter().filter(|c| !c.range_end.is_empty()) {
            // Only "the range is empty" is checked; any other range compare counts as failed.
            hold = hold
                && c.mod_revision == 0
                && self
                    .range_impl(&c.key, &c.range_end, 1)
                    .await?
                    .entries
                    .is_empty();
        }
        Ok(if hold {
            Settled::ComparesHold
        } else {
            Settled::NotApplied
        })
    }
}

impl EtcdKv {
    async fn get_many_impl(&self, keys: &[Vec<u8>]) -> Result<Vec<Versioned>, KvError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let resp = self
            .read("get_many", |mut kv| {
                let ops: Vec<etcd_client::TxnOp> = keys
                    .iter()
                    .map(|k| etcd_client::TxnOp::get(k.clone(), None))
                    .collect();
                async move { kv.txn(etcd_client::Txn::new().and_then(ops)).await }
            })
            .await?;
        let replies = resp.op_responses();
        if replies.len() != keys.len() {
            return Err(KvError::Other(format!(
                "etcd answered {} of {} reads",
                replies.len(),
                keys.len()
            )));
        }
        let at = header_revision(resp.header());
        let mut out = Vec::with_capacity(keys.len());
        for (key, r) in keys.iter().zip(replies) {
            match r {
                TxnOpResponse::Get(g) => out.push(self.found(g.kvs(), key, at)),
                _ => return Err(KvError::Other("etcd answered a read with a write".into())),
            }
        }
        Ok(out)
    }
}

impl EtcdKv {
    async fn get_many_and_range_impl(
        &self,
        keys: &[Vec<u8>],
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<(Vec<Versioned>, RangePage), KvError> {
        let prefix = (!end.is_empty() && end == prefix_end(start).as_slice()).then_some(start);
        let start: Vec<u8> = if start.is_empty() {
            vec![0]
        } else {
            start.to_vec()
        };
        let end: Vec<u8> = if end.is_empty() {
            vec![0]
        } else {
            end.to_vec()
        };
        let resp = self
            .read("get_many_and_range", |mut kv| {
                let mut ops: Vec<etcd_client::TxnOp> = keys
                    .iter()
                    .map(|k| etcd_client::TxnOp::get(k.clone(), None))
                    .collect();
                ops.push(etcd_client::TxnOp::get(
                    start.clone(),
                    Some(
                        GetOptions::new()
                            .with_range(end.clone())
                            .with_limit(to_i64(limit)),
                    ),
                ));
                async move { kv.txn(etcd_client::Txn::new().and_then(ops)).await }
            })
            .await?;
        let replies = resp.op_responses();
        if replies.len() != keys.len() + 1 {
            return Err(KvError::Other(format!(
                "etcd answered {} of {} reads",
                replies.len(),
                keys.len() + 1
            )));
        }
        let at = header_revision(resp.header());
        let mut values = Vec::with_capacity(keys.len());
        let mut page = RangePage::default();
        for (i, r) in replies.into_iter().enumerate() {
            let TxnOpResponse::Get(g) = r else {
                return Err(KvError::Other("etcd answered a read with a write".into()));
            };
            if let Some(key) = keys.get(i) {
                values.push(self.found(g.kvs(), key, at));
            } else {
                page.more = g.more();
                page.entries = g
                    .kvs()
                    .iter()
                    .map(|kv| KvEntry {
                        key: kv.key().to_vec(),
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    })
                    .collect();
                if limit != 0 && page.entries.len() > limit {
                    page.entries.truncate(limit);
                    page.more = true;
                }
                self.observed_entries(&page.entries, at, prefix.filter(|_| !page.more));
            }
        }
        Ok((values, page))
    }
}

/// The revision a response was served at; without a header (never seen from etcd), the
/// highest revision there is, so that nothing cached is trusted over it.
fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map(|h| h.revision()).unwrap_or(Revision::MAX)
}

/// Counts one etcd request (retries included) in the process's metrics.
fn timed<'a, T: 'a>(
    op: &'static str,
    request: impl std::future::Future<Output = Result<T, KvError>> + Send + 'a,
) -> BoxFuture<'a, Result<T, KvError>> {
    async move {
        let start = std::time::Instant::now();
        let r = request.await;
        twinfs_cluster::metrics::metrics()
            .etcd_requests
            .record(op, start, r.is_ok());
        r
    }
    .boxed()
}

impl MetaKv for EtcdKv {
    /// From the watch cache, only while it follows etcd and has applied every value this
    /// instance read from etcd (the floor); its own commits are already in it (written
    /// through). So nothing is answered older than what was already answered: an `open`, which reads
    /// etcd, moves every later `stat` of the file to at least that version (close-to-open
    /// across mounts holds for attributes too). Otherwise at most a watch delay behind other
    /// mounts' changes, like the kernel caches the same watch invalidates. Without the read
    /// floor, a `getattr` right after an open could answer from a cache still at the
    /// writer's truncate (size 0): the 150-round overwrite test read an empty or old file in
    /// about 1 of 3 runs.
    fn cached(&self, key: &[u8]) -> Versioned {
        self.cache_lookup(key, true)
    }

    /// From the watch cache while it follows etcd, whatever the floor.
    fn cached_to_compare(&self, key: &[u8]) -> Versioned {
        self.cache_lookup(key, false)
    }

    /// Under the same floor as [`EtcdKv::cached`]: a name another mount made is answered
    /// absent for at most a watch delay, as the kernel's caches would, and never once this
    /// mount has read anything as new as it.
    fn session(&self) -> Option<u64> {
        self.claims.as_ref()?.current().map(|(number, _)| number)
    }

    fn has_sessions(&self) -> bool {
        self.claims.is_some()
    }

    fn cached_absent(&self, key: &[u8], within: &[u8]) -> bool {
        if !key.starts_with(within) {
            return false;
        }
        let least = self.floor.load(Ordering::Relaxed);
        let mut c = self.cache();
        if !c.valid || c.applied < least || !c.complete.contains(within) || c.map.contains_key(key)
        {
            return false;
        }
        c.hits += 1;
        true
    }

    fn get_many_and_range<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<Versioned>, RangePage), KvError>> {
        timed(
            "get_many_and_range",
            self.get_many_and_range_impl(keys, start, end, limit),
        )
    }

    fn get_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<Vec<Versioned>, KvError>> {
        timed("get_many", self.get_many_impl(keys))
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Versioned, KvError>> {
        timed("get", self.get_impl(key))
    }

    fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<RangePage, KvError>> {
        timed("range", self.range_impl(start, end, limit))
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> BoxFuture<'_, Result<bool, KvError>> {
        timed("txn", self.txn_impl(compares, ops))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn errors_are_classified() {
        use tonic::Code;
        assert!(matches!(
            classify(status(
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request"
            )),
            KvError::TooLarge(_)
        ));
        assert!(matches!(
            classify(status(
                Code::InvalidArgument,
                "etcdserver: request is too large"
            )),
            KvError::TooLarge(_)
        ));
        assert!(matches!(
            classify(status(
                Code::ResourceExhausted,
                "grpc: received message larger than max (2000000 vs. 1572864)"
            )),
            KvError::TooLarge(_)
        ));
        assert!(matches!(
            classify(status(Code::Unavailable, "etcdserver: leader changed")),
            KvError::Unavailable(_)
        ));
        assert!(matches!(
            classify(status(Code::Cancelled, "Timeout expired")),
            KvError::Unavailable(_)
        ));
        assert!(matches!(
            classify(status(Code::Unknown, "transport error")),
            KvError::Unavailable(_)
        ));
        assert!(matches!(
            classify(status(
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request"
            )),
            KvError::Other(_)
        ));
        assert!(matches!(
            classify(status(
                Code::PermissionDenied,
                "etcdserver: permission denied"
            )),
            KvError::Other(_)
        ));
    }
}
